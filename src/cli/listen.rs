//! The HTTP front door: our own accept loop on hyper, so that no client can
//! hold the server's connections, file descriptors or memory without sending
//! requests. Each connection has a time limit for every phase in which the
//! client, not the server, is the one to act: sending a request's head, its
//! body, the next request on a kept-alive connection, reading a response. The
//! number of open connections is capped below the open-file limit; at the cap
//! the oldest connection without a request in progress makes room.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::bail;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use tidepool::server::ServerConfig;

/// The largest connection cap derived from the open-file limit: enough for
/// any API client population, and bounds the read buffers (one header's worth
/// each) to a few hundred MiB.
const MAX_DERIVED_CONNECTIONS: usize = 4096;
/// hyper's smallest read buffer.
const MIN_HEADER_BYTES: usize = 8192;

/// The front door's limits, checked.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read: Duration,
    pub idle: Duration,
    pub body_read: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
}

fn secs(name: &str, v: f64) -> anyhow::Result<Duration> {
    if !v.is_finite() || v <= 0.0 || v > 1e9 {
        bail!("{name} must be a positive number of seconds, not {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// File descriptors kept for everything but client connections: the store
/// (SQLite with its WAL), run logs, job files, database and webhook sockets.
fn reserved_files(open_files: u64) -> u64 {
    (open_files / 8).max(64)
}

/// The most connections `open_files` descriptors allow.
fn connections_allowed(open_files: u64) -> usize {
    let reserved = reserved_files(open_files);
    let allowed = if open_files > 2 * reserved {
        open_files - reserved
    } else {
        open_files / 2
    };
    usize::try_from(allowed).unwrap_or(usize::MAX).max(1)
}

impl Limits {
    /// The limits `c` asks for, the connection cap kept within `open_files`.
    pub fn new(c: &ServerConfig, open_files: Option<u64>) -> anyhow::Result<Self> {
        if c.max_header_bytes < MIN_HEADER_BYTES {
            bail!(
                "max_header_bytes must be at least {MIN_HEADER_BYTES}, not {}",
                c.max_header_bytes
            );
        }
        let allowed = open_files.map(connections_allowed);
        let max_connections = match (c.max_connections, allowed) {
            (Some(0), _) => bail!("max_connections must be at least 1"),
            (Some(n), Some(a)) if n > a => {
                tracing::warn!(
                    "max_connections {n} is more than the open-file limit {} allows; using {a}",
                    open_files.unwrap_or_default()
                );
                a
            }
            (Some(n), _) => n,
            (None, Some(a)) => a.min(MAX_DERIVED_CONNECTIONS),
            (None, None) => MAX_DERIVED_CONNECTIONS,
        };
        Ok(Limits {
            header_read: secs("header_read_timeout_secs", c.header_read_timeout_secs)?,
            idle: secs("idle_timeout_secs", c.idle_timeout_secs)?,
            body_read: secs("body_read_timeout_secs", c.body_read_timeout_secs)?,
            max_header_bytes: c.max_header_bytes,
            max_connections,
        })
    }
}

/// Raises the soft open-file limit to the hard one where the system allows,
/// and returns the limit in force (None: unlimited or unknown).
pub fn raise_open_file_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur as u64)
    }
}

/// Where a connection is in its life; the client acts in all but `Request`.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request's head, since then.
    Head(Instant),
    /// A request is being answered; true while its handler waits for more
    /// of the body.
    Request { body_wait: bool },
    /// Kept alive between requests, since then.
    Idle(Instant),
}

#[derive(Debug)]
struct ConnState {
    phase: Phase,
    /// Since when a write has been waiting for the client to read.
    write_stalled: Option<Instant>,
    /// The last write that went through: a response may still be going out
    /// after hyper has taken its whole body.
    last_write: Instant,
}

/// One open connection, as the watchdog and the connection cap see it.
#[derive(Debug)]
struct Conn {
    id: u64,
    state: Mutex<ConnState>,
    wake: Notify,
    evicted: AtomicBool,
}

impl Conn {
    fn new(id: u64) -> Self {
        Conn {
            id,
            state: Mutex::new(ConnState {
                phase: Phase::Head(Instant::now()),
                write_stalled: None,
                last_write: Instant::now(),
            }),
            wake: Notify::new(),
            evicted: AtomicBool::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_phase(&self, phase: Phase) {
        self.state().phase = phase;
        self.wake.notify_one();
    }

    /// The first byte of the next request starts its head's clock.
    fn bytes_read(&self) {
        let mut s = self.state();
        if matches!(s.phase, Phase::Idle(_)) {
            s.phase = Phase::Head(Instant::now());
            drop(s);
            self.wake.notify_one();
        }
    }

    fn write_pending(&self, pending: bool) {
        let mut s = self.state();
        match (pending, s.write_stalled) {
            (true, None) => {
                s.write_stalled = Some(Instant::now());
                drop(s);
                self.wake.notify_one();
            }
            (false, _) => {
                s.write_stalled = None;
                s.last_write = Instant::now();
            }
            (true, Some(_)) => {}
        }
    }

    /// When the client's time runs out, and why.
    fn deadline(&self, l: &Limits) -> Option<(Instant, &'static str)> {
        let s = self.state();
        let phase = match s.phase {
            Phase::Head(t) => Some((t + l.header_read, "request head not received in time")),
            Phase::Idle(t) => Some((t.max(s.last_write) + l.idle, "idle")),
            Phase::Request { .. } => None,
        };
        let stall = s
            .write_stalled
            .map(|t| (t + l.idle, "response not read by the client"));
        match (phase, stall) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// Whether closing it loses nothing but what the client is slow to send:
    /// no request, or one whose handler waits for the rest of its body.
    fn sheddable(&self) -> bool {
        !matches!(self.state().phase, Phase::Request { body_wait: false })
    }

    fn body_wait(&self, waiting: bool) {
        if let Phase::Request { body_wait } = &mut self.state().phase {
            *body_wait = waiting;
        }
    }
}

/// The open connections, oldest first.
#[derive(Default)]
struct Registry {
    next_id: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

impl Registry {
    fn open(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a connection, removed again when the guard drops (even if its
    /// task panics).
    fn add(&self) -> Registered<'_> {
        let conn = Arc::new(Conn::new(self.next_id.fetch_add(1, Ordering::Relaxed)));
        self.open().insert(conn.id, conn.clone());
        Registered {
            registry: self,
            conn,
        }
    }

    /// Closes the oldest connection without a request in progress; false if
    /// every one is busy.
    fn shed_oldest_idle(&self) -> bool {
        let open = self.open();
        let victim = open
            .values()
            .find(|c| !c.evicted.load(Ordering::Relaxed) && c.sheddable());
        match victim {
            Some(c) => {
                c.evicted.store(true, Ordering::Relaxed);
                c.wake.notify_one();
                true
            }
            None => false,
        }
    }
}

struct Registered<'a> {
    registry: &'a Registry,
    conn: Arc<Conn>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry.open().remove(&self.conn.id);
    }
}

/// A TCP stream that tells its connection when bytes arrive and when writes
/// wait for the client.
struct WatchedIo {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.bytes_read();
        }
        r
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.conn.write_pending(r.is_pending());
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.conn.write_pending(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
struct BodyTimeout(Duration);

/// A request body that fails once its time is up.
struct TimedBody {
    inner: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    limit: Duration,
    timed_out: Arc<AtomicBool>,
    conn: Arc<Conn>,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        this.conn.body_wait(polled.is_pending());
        match polled {
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.as_mut().poll(cx).is_ready() {
                    this.timed_out.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(BodyTimeout(this.limit).into())));
                }
                Poll::Pending
            }
            other => other.map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body; when hyper is done with it the connection is idle.
struct TrackedBody {
    inner: Body,
    conn: Arc<Conn>,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.conn.set_phase(Phase::Idle(Instant::now()));
    }
}

/// What every connection shares.
struct Shared<A> {
    app: A,
    limits: Limits,
    registry: Registry,
}

/// Answers one request: the peer's address for the handlers, the body's time
/// limit, and the connection's phase around it.
async fn answer<A>(
    shared: Arc<Shared<A>>,
    conn: Arc<Conn>,
    peer: SocketAddr,
    req: hyper::Request<Incoming>,
) -> Result<Response<TrackedBody>, Infallible>
where
    A: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send,
    A::Future: Send,
{
    conn.set_phase(Phase::Request { body_wait: false });
    let timed_out = Arc::new(AtomicBool::new(false));
    let limit = shared.limits.body_read;
    let mut req = req.map(|body| {
        if http_body::Body::is_end_stream(&body) {
            Body::new(body)
        } else {
            Body::new(TimedBody {
                inner: body,
                deadline: Instant::now() + limit,
                sleep: None,
                limit,
                timed_out: timed_out.clone(),
                conn: conn.clone(),
            })
        }
    });
    req.extensions_mut().insert(ConnectInfo(peer));
    let Ok(mut resp) = shared.app.clone().oneshot(req).await;
    if timed_out.load(Ordering::Relaxed) {
        resp = (
            StatusCode::REQUEST_TIMEOUT,
            format!("{}\n", BodyTimeout(limit)),
        )
            .into_response();
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp.map(|inner| TrackedBody { inner, conn }))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Serves one connection until it ends, its client runs out of time, it is
/// shed for a newer one, or shutdown drains it.
async fn serve_connection<A>(
    shared: Arc<Shared<A>>,
    stream: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) where
    A: tower::Service<Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    A::Future: Send,
{
    let registered = shared.registry.add();
    let conn = registered.conn.clone();
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(WatchedIo {
        inner: stream,
        conn: conn.clone(),
    });
    let service = {
        let (shared, conn) = (shared.clone(), conn.clone());
        hyper::service::service_fn(move |req| answer(shared.clone(), conn.clone(), peer, req))
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .header_read_timeout(None) // ours counts from the first byte, not from idle
        .max_buf_size(shared.limits.max_header_bytes);
    let mut http = pin!(builder.serve_connection(io, service));
    let mut draining = false;
    loop {
        let deadline = conn.deadline(&shared.limits);
        tokio::select! {
            r = http.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
                break;
            }
            () = sleep_until(deadline.map(|d| d.0)) => {
                if let Some((d, why)) = conn.deadline(&shared.limits)
                    && d <= Instant::now()
                {
                    tracing::debug!(%peer, "connection closed: {why}");
                    break;
                }
            }
            () = conn.wake.notified() => {
                if conn.evicted.load(Ordering::Relaxed) {
                    tracing::debug!(%peer, "idle connection closed to admit a new one");
                    break;
                }
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                http.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Logs the connection cap being reached once per burst, not per connection.
#[derive(Default)]
struct Burst {
    active: bool,
    shed: u64,
}

impl Burst {
    fn start(&mut self, cap: usize) {
        if !self.active {
            self.active = true;
            self.shed = 0;
            tracing::warn!(
                "connection limit {cap} reached: closing the oldest idle connections to admit new ones (those answering a request are kept; while all are busy, new ones wait)"
            );
        }
    }

    /// Ends the burst once a tenth of the slots are free again.
    fn settle(&mut self, free: usize, cap: usize) {
        if self.active && free > cap / 10 {
            self.active = false;
            tracing::info!(
                "connection limit burst over: {} idle connection(s) were closed to admit new ones",
                self.shed
            );
        }
    }
}

/// A free slot: an idle connection is shed for it if need be. None if
/// shutdown came first.
async fn wait_for_slot<A>(
    slots: &Arc<Semaphore>,
    shared: &Shared<A>,
    burst: &mut Burst,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Option<OwnedSemaphorePermit> {
    loop {
        if shared.registry.shed_oldest_idle() {
            burst.shed += 1;
        }
        tokio::select! {
            permit = slots.clone().acquire_owned() => return permit.ok(),
            // A busy connection may have gone idle: look again.
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = shutdown.as_mut() => return None,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open
/// connections finish their requests (for at most `drain`).
pub async fn serve<A>(
    listener: TcpListener,
    app: A,
    limits: Limits,
    drain: Duration,
    shutdown: impl Future<Output = ()>,
) where
    A: tower::Service<Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    A::Future: Send,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let shared = Arc::new(Shared {
        app,
        limits,
        registry: Registry::default(),
    });
    run(listener, shared, slots, drain, shutdown).await;
}

/// The accept loop; `slots` holds one permit per connection allowed.
async fn run<A>(
    listener: TcpListener,
    shared: Arc<Shared<A>>,
    slots: Arc<Semaphore>,
    drain: Duration,
    shutdown: impl Future<Output = ()>,
) where
    A: tower::Service<Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    A::Future: Send,
{
    let cap = shared.limits.max_connections;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    let mut burst = Burst::default();
    let mut accept_errors_logged = false;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept:
                    // the listener stays; log once per run of errors.
                    if !accept_errors_logged {
                        tracing::error!("accept error: {e} (retrying)");
                        accept_errors_logged = true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.as_mut() => break,
        };
        accept_errors_logged = false;
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                burst.settle(slots.available_permits(), cap);
                slot
            }
            Err(_) => {
                burst.start(cap);
                match wait_for_slot(&slots, &shared, &mut burst, &mut shutdown).await {
                    Some(slot) => slot,
                    None => break,
                }
            }
        };
        tokio::spawn(serve_connection(
            shared.clone(),
            stream,
            peer,
            stop_rx.clone(),
            slot,
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let all = u32::try_from(cap).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            "{} connection(s) still open after {drain:?} of shutdown: closing them",
            cap - slots.available_permits()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_room_for_files() {
        assert_eq!(connections_allowed(256), 192);
        assert_eq!(connections_allowed(1024), 896);
        assert_eq!(connections_allowed(100), 50);
        let c = ServerConfig::default();
        assert_eq!(Limits::new(&c, Some(1024)).unwrap().max_connections, 896);
        assert_eq!(
            Limits::new(&c, Some(1 << 20)).unwrap().max_connections,
            MAX_DERIVED_CONNECTIONS
        );
        let asked = ServerConfig {
            max_connections: Some(5000),
            ..ServerConfig::default()
        };
        assert_eq!(
            Limits::new(&asked, Some(1024)).unwrap().max_connections,
            896
        );
        assert_eq!(Limits::new(&asked, None).unwrap().max_connections, 5000);
    }

    #[tokio::test]
    async fn handlers_see_the_peer_address() {
        use axum::routing::get;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let app = axum::Router::new().route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits::new(&ServerConfig::default(), None).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            app,
            limits,
            Duration::from_secs(5),
            async {
                let _ = stopped.await;
            },
        ));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /peer HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        let me = s.local_addr().unwrap().to_string();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with(&me), "{answer} should end with {me}");
        stop.send(()).unwrap();
        server.await.unwrap();
    }

    /// A response of many chunks, pulled as the socket takes them.
    struct Chunks(usize);

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut TaskContext<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 1 << 20])))))
        }
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_off_after_the_idle_timeout() {
        use axum::routing::get;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const CHUNKS: usize = 64;
        const CAP: usize = 8;
        let app = axum::Router::new().route("/big", get(|| async { Body::new(Chunks(CHUNKS)) }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let c = ServerConfig {
            idle_timeout_secs: 0.5,
            max_connections: Some(CAP),
            ..ServerConfig::default()
        };
        let shared = Arc::new(Shared {
            app,
            limits: Limits::new(&c, None).unwrap(),
            registry: Registry::default(),
        });
        let slots = Arc::new(Semaphore::new(CAP));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(
            listener,
            shared,
            slots.clone(),
            Duration::from_secs(5),
            async {
                let _ = stopped.await;
            },
        ));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        // Not reading: the server's writes stall once the socket buffers are
        // full, and it gives up after the idle timeout.
        let t0 = Instant::now();
        while slots.available_permits() == CAP {
            assert!(t0.elapsed() < Duration::from_secs(30), "never accepted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        while slots.available_permits() < CAP {
            assert!(t0.elapsed() < Duration::from_secs(30), "never cut off");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(t0.elapsed() >= Duration::from_millis(450));
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            got += n;
        }
        assert!(got < CHUNKS << 20, "the whole body arrived: not cut off");
        stop.send(()).unwrap();
        server.await.unwrap();
    }

    #[test]
    fn bad_limits_are_refused_by_name() {
        let c = ServerConfig {
            idle_timeout_secs: 0.0,
            ..ServerConfig::default()
        };
        let e = Limits::new(&c, None).unwrap_err().to_string();
        assert!(e.contains("idle_timeout_secs"), "{e}");
        let c = ServerConfig {
            max_header_bytes: 100,
            ..ServerConfig::default()
        };
        let e = Limits::new(&c, None).unwrap_err().to_string();
        assert!(e.contains("max_header_bytes must be at least 8192"), "{e}");
        let c = ServerConfig {
            max_connections: Some(0),
            ..ServerConfig::default()
        };
        assert!(Limits::new(&c, None).is_err());
    }
}
