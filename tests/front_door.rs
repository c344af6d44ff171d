//! The HTTP front door of `tidepool serve` cannot be held without logging in:
//! slow and idle connections are closed after their time limits, a flood of
//! them under a low open-file limit leaves room for a normal request, large
//! headers are refused, and SIGTERM still lets requests in flight finish.

mod common;

use common::Server;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// `tidepool serve` on a scratch data folder with `config` (TOML keys) and,
/// if given, soft and hard open-file limits of `open_files`; it logs at info
/// level, which some tests read.
fn start(config: &str, open_files: Option<u64>) -> Server {
    let builder = common::server::serve_scratch().config(config).log("info");
    match open_files {
        Some(n) => builder.open_files(n),
        None => builder,
    }
    .start()
}

/// A connection to `server` with a read timeout.
fn connect(server: &Server) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Reads one response: its status and body (Content-Length framed).
fn read_response(s: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0; len];
    s.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A one-off GET; None if the connection failed.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    read_response(&mut s).ok()
}

/// How long until the server closes `s` (end of stream or reset), reading and
/// dropping whatever it sends first. Panics past `limit`.
fn closed_after(s: &mut TcpStream, since: Instant, limit: Duration) -> Duration {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return since.elapsed(),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return since.elapsed(), // reset
        }
        assert!(
            since.elapsed() < limit,
            "the server kept the connection open for {limit:?}"
        );
    }
}

fn raise_own_file_limit(need: u64) {
    // SAFETY: plain get/set of this process's limit through a local struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < need {
            assert!(
                lim.rlim_max >= need,
                "this test needs an open-file limit of {need}; the hard limit is {}",
                lim.rlim_max
            );
            lim.rlim_cur = lim.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

/// A request whose body stops after its first bytes.
const SLOW_BODY: &[u8] = b"POST /token HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\ngrant_type=";

#[test]
fn slow_connections_under_a_low_file_limit_leave_room_for_a_normal_request() {
    raise_own_file_limit(1400);
    // Long client time limits: only the connection cap can make room.
    let server = start(
        "header_read_timeout_secs = 120\nidle_timeout_secs = 120\nbody_read_timeout_secs = 120",
        Some(256),
    );
    assert!(
        server
            .stderr()
            .contains("open-file limit 256; at most 192 connections"),
        "{}",
        server.stderr()
    );
    let mut held = Vec::new();
    for i in 0..1100 {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
        // Writes may fail once the server has shed the connection.
        let _ = match i % 4 {
            0 => Ok(()), // connected, silent
            1 => s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: "),
            2 => s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"), // then idle
            _ => s.write_all(SLOW_BODY), // the body's first bytes only
        };
        held.push(s);
    }
    let t0 = Instant::now();
    let answer = get(server.port, "/healthz");
    let took = t0.elapsed();
    assert_eq!(answer.map(|a| a.0), Some(200), "{}", server.stderr());
    assert!(took < Duration::from_secs(10), "{took:?}");
    let log = server.stderr();
    assert_eq!(
        log.matches("connection limit 192 reached").count(),
        1,
        "one line per burst:\n{log}"
    );
    assert!(!log.contains("accept error"), "{log}");
    drop(held);
}

#[test]
fn a_half_sent_or_trickled_header_is_closed_after_the_header_timeout() {
    let server = start("header_read_timeout_secs = 1\nidle_timeout_secs = 60", None);
    let t0 = Instant::now();
    let mut half = connect(&server);
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    let silent = connect(&server);
    // A byte every 100 ms keeps sending, but never finishes the head.
    let mut trickle = connect(&server);
    let t_trickle = Instant::now();
    let mut sent = 0;
    let trickled = loop {
        if trickle.write_all(b"X").is_err() {
            break t_trickle.elapsed();
        }
        sent += 1;
        trickle
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut b = [0u8; 64];
        match trickle.read(&mut b) {
            Ok(_) => break t_trickle.elapsed(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break t_trickle.elapsed(),
        }
        assert!(sent < 300, "a trickled head was kept for 30 s");
    };
    assert!(trickled >= Duration::from_millis(900), "{trickled:?}");
    let closed = closed_after(&mut half, t0, Duration::from_secs(20));
    assert!(closed >= Duration::from_millis(900), "{closed:?}");
    let mut silent = silent;
    let closed = closed_after(&mut silent, t0, Duration::from_secs(20));
    assert!(closed >= Duration::from_millis(900), "{closed:?}");
    // A head sent at once is answered.
    assert_eq!(get(server.port, "/healthz").map(|a| a.0), Some(200));
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    // The header timeout is longer than the idle one, so only the idle
    // timeout can close the connection early.
    let server = start("header_read_timeout_secs = 60\nidle_timeout_secs = 2", None);
    let mut s = connect(&server);
    let mut idle_since = Instant::now();
    for _ in 0..2 {
        // Taken before the request: the server's idle time starts after its
        // answer, so a slow read here cannot make the connection look closed
        // early.
        idle_since = Instant::now();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut s).unwrap().0, 200, "kept alive");
    }
    let closed = closed_after(&mut s, idle_since, Duration::from_secs(30));
    assert!(closed >= Duration::from_millis(1900), "{closed:?}");
}

#[test]
fn a_trickled_body_is_answered_408() {
    let server = start("body_read_timeout_secs = 1", None);
    let mut s = connect(&server);
    s.write_all(
        b"POST /token HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ngrant_type=",
    )
    .unwrap();
    let (status, body) = read_response(&mut s).unwrap();
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("did not arrive within 1s"), "{body}");
    let closed = closed_after(&mut s, Instant::now(), Duration::from_secs(20));
    assert!(closed < Duration::from_secs(20));
}

#[test]
fn a_300_kb_header_is_refused_and_normal_requests_still_work() {
    let server = start("", None);
    let mut s = connect(&server);
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(300 * 1024)
    );
    // The server may close before taking it all: then the write fails, and
    // the 431 may be lost to the reset.
    let _ = s.write_all(big.as_bytes());
    match read_response(&mut s) {
        Ok((status, _)) => assert_eq!(status, 431),
        Err(e) => assert!(
            !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "the server neither refused nor closed: {e}"
        ),
    }
    // A 32 KiB header is within the default 64 KiB.
    let mut s = connect(&server);
    write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Mid: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    )
    .unwrap();
    assert_eq!(read_response(&mut s).unwrap().0, 200);
    assert_eq!(get(server.port, "/healthz").map(|a| a.0), Some(200));
}

#[test]
fn sigterm_lets_requests_in_flight_finish_and_closes_idle_connections() {
    let mut server = start("", None);
    let mut idle = connect(&server);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut idle).unwrap().0, 200);
    let mut half = connect(&server);
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    // A request whose body is still on its way when SIGTERM comes: the
    // server's 100 Continue shows its handler is reading the body.
    let mut in_flight = connect(&server);
    in_flight
        .write_all(b"POST /token HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 29\r\n\r\n")
        .unwrap();
    let mut cont = [0u8; 25];
    in_flight.read_exact(&mut cont).unwrap();
    assert_eq!(&cont, b"HTTP/1.1 100 Continue\r\n\r\n");
    server.sigterm();
    let t0 = Instant::now();
    // Idle: closed at once (the idle timeout is 60 s).
    closed_after(&mut idle, t0, Duration::from_secs(20));
    // A head begun before SIGTERM may still be finished, and is answered.
    half.write_all(b"\r\n").unwrap();
    assert_eq!(read_response(&mut half).unwrap().0, 200);
    in_flight
        .write_all(b"grant_type=client_credentials")
        .unwrap();
    let (status, body) = read_response(&mut in_flight).unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("grant_type must be password"), "{body}");
    let status = server.exit_within(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        server.stderr()
    );
}
