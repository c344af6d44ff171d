//! `tidepool serve` as a child process: started by one builder, ready when it
//! answers HTTP (polled with a deadline), killed when dropped, its stderr
//! kept in a file for assertions and printed when a test panics.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to listen, or to stop, on a busy machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// A free loopback port (the server binds it a moment later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `tidepool ARGS --data-dir DATA` with `TIDEPOOL_PASSWORD` set, as an
/// administrator does to add users and keys.
pub fn tidepool_cli(data: &Path, args: &[&str], password: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env("TIDEPOOL_PASSWORD", password)
        .output()
        .expect("run tidepool")
}

/// [`tidepool_cli`] that must succeed; returns its stdout.
pub fn tidepool_cli_ok(data: &Path, args: &[&str], password: &str) -> String {
    let out = tidepool_cli(data, args, password);
    assert!(
        out.status.success(),
        "tidepool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `GET url` and its JSON body.
pub async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    let answer = client.get(url).send().await.unwrap();
    answer.json().await.unwrap()
}

/// What to start: `tidepool serve --listen 127.0.0.1:PORT --data-dir DATA
/// --projects PROJECTS [--config FILE] ARGS`.
pub struct ServeBuilder {
    /// None: a `data` folder in the server's own temporary directory.
    data: Option<PathBuf>,
    projects: PathBuf,
    config: Option<String>,
    port: Option<u16>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    current_dir: Option<PathBuf>,
    open_files: Option<u64>,
    log: String,
}

/// A builder for a server on `data` and `projects`.
pub fn serve(data: &Path, projects: &Path) -> ServeBuilder {
    ServeBuilder {
        data: Some(data.to_owned()),
        projects: projects.to_owned(),
        config: None,
        port: None,
        args: Vec::new(),
        env: Vec::new(),
        current_dir: None,
        open_files: None,
        log: "warn".into(),
    }
}

/// A builder for a server on a fresh data folder of its own (removed with
/// the server) and the repository's projects.
pub fn serve_scratch() -> ServeBuilder {
    ServeBuilder {
        data: None,
        ..serve(Path::new(""), super::repo_projects())
    }
}

impl ServeBuilder {
    /// A config file with this TOML text, passed as `--config`.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_owned());
        self
    }

    /// This port instead of a free one (a restart on the same address).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// More command-line arguments after the usual ones.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(OsString::from));
        self
    }

    /// An environment variable for the server.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The server's working directory.
    pub fn current_dir(mut self, dir: &Path) -> Self {
        self.current_dir = Some(dir.to_owned());
        self
    }

    /// Soft and hard open-file limits of `n` for the server.
    pub fn open_files(mut self, n: u64) -> Self {
        self.open_files = Some(n);
        self
    }

    /// `TIDEPOOL_LOG` (default `warn`).
    pub fn log(mut self, level: &str) -> Self {
        self.log = level.to_owned();
        self
    }

    /// Starts the process without waiting for it to listen.
    pub fn spawn(self) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = self.port.unwrap_or_else(free_port);
        let stderr_path = dir.path().join("stderr.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidepool"));
        let data = self.data.unwrap_or_else(|| dir.path().join("data"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(&data)
            .arg("--projects")
            .arg(&self.projects);
        if let Some(toml) = &self.config {
            let file = dir.path().join("tidepool.toml");
            std::fs::write(&file, toml).unwrap();
            cmd.arg("--config").arg(file);
        }
        cmd.args(&self.args)
            .env("TIDEPOOL_LOG", &self.log)
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        if let Some(dir) = &self.current_dir {
            cmd.current_dir(dir);
        }
        if let Some(n) = self.open_files {
            limit_open_files(&mut cmd, n);
        }
        let child = cmd.spawn().expect("start tidepool serve");
        Server {
            child,
            port,
            base: format!("http://127.0.0.1:{port}"),
            stderr_path,
            _dir: dir,
        }
    }

    /// Starts the process and waits until it answers HTTP.
    pub fn start(self) -> Server {
        let mut server = self.spawn();
        server.wait_ready();
        server
    }

    /// [`ServeBuilder::start`] from async code, without holding up a runtime
    /// thread (a test's own HTTP receivers may run there).
    pub async fn start_async(self) -> Server {
        tokio::task::spawn_blocking(move || self.start())
            .await
            .unwrap()
    }
}

fn limit_open_files(cmd: &mut Command, n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit is async-signal-safe; `lim` is copied in.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A running `tidepool serve`, killed (and reaped) when dropped.
pub struct Server {
    child: Child,
    /// Its loopback port.
    pub port: u16,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Polls `GET /healthz` until any HTTP answer comes; panics (with the
    /// server's stderr) if the process exits or the deadline passes.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tidepool serve exited ({status}):\n{}", self.stderr());
            }
            if self.answers_http() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tidepool serve did not answer on {}:\n{}",
                self.base,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers_http(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let asked = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let mut head = [0u8; 5];
        asked.is_ok() && s.read_exact(&mut head).is_ok() && &head == b"HTTP/"
    }

    /// What the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (a clean stop).
    pub fn sigterm(&self) {
        // SAFETY: kill(2) with our own child's pid.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM: {}", std::io::Error::last_os_error());
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit status if the process ended within `limit` (polled).
    pub fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status; panics (with stderr) if the process does not end in
    /// a minute.
    pub fn wait_exit(&mut self) -> ExitStatus {
        self.exit_within(PATIENCE)
            .unwrap_or_else(|| panic!("tidepool serve did not stop:\n{}", self.stderr()))
    }

    /// [`Server::wait_exit`] from async code.
    pub async fn wait_exit_async(mut self) -> (ExitStatus, Server) {
        tokio::task::spawn_blocking(move || (self.wait_exit(), self))
            .await
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("tidepool serve stderr:\n{}", self.stderr());
        }
    }
}
