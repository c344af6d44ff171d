//! `tidepool serve` settings: a TOML file, overridden by flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why the settings cannot be used. The cause is the error's source, not part
/// of its text, so `cannot read PATH: CAUSE` reads once when the chain is printed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// What reading said.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has a key or value the settings do not take.
    #[error("{}", path.display())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// Where and why it does not parse.
        source: toml::de::Error,
    },
    /// `store` names a kind of store this build cannot open.
    #[error("store {0:?} is not supported: use sqlite:PATH or postgres://USER@HOST:PORT/DATABASE")]
    UnsupportedStore(String),
    /// `lease_secs` is too short to renew in time.
    #[error("lease_secs = {0}: use at least 3 seconds (a lease is renewed every third of it)")]
    LeaseTooShort(u64),
}

/// Everything `tidepool serve` needs; every key has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where runs and the store keep their files.
    pub data_dir: PathBuf,
    /// The folder of projects.
    pub projects: PathBuf,
    /// The store: `sqlite:PATH` (one node), or `postgres://USER@HOST:PORT/DB`
    /// (any number of nodes sharing it); default `<data_dir>/tidepool.sqlite`.
    pub store: Option<String>,
    /// This node's name in a shared store; default `HOST:PORT` of `listen`
    /// (with the machine's host name for an unspecified address).
    pub node_id: Option<String>,
    /// Seconds a node holds a run without renewing it; a run whose node stops
    /// renewing (it died, froze or lost the store) is taken over by another
    /// node after this long. Renewed every third of it.
    pub lease_secs: u64,
    /// Runs that execute at once.
    pub workers: usize,
    /// Runs that may wait; past this ExecuteJobAsync answers 503.
    pub queue_size: u64,
    /// The largest request body, in bytes.
    pub body_limit: usize,
    /// How long shutdown waits for running runs before leaving them to recovery.
    pub shutdown_grace_secs: u64,
    /// Serve without users on a non-loopback address.
    pub insecure: bool,
    /// How long a bearer token from `/token` lives.
    pub token_lifetime_secs: u64,
    /// Live bearer tokens kept per user: a new one past it revokes that
    /// user's oldest (expired ones are forgotten as new ones are issued).
    pub max_tokens_per_user: usize,
    /// How long `ExecuteJob` waits for its run; past it, it answers 202 with
    /// the run as it stands (read the rest from Results). 0: as long as the
    /// run takes.
    pub execute_job_wait_secs: u64,
    /// Completion webhooks.
    pub webhooks: WebhookConfig,
    /// `POST /token`: how many password checks run at once, and the backoff
    /// after failed attempts.
    pub login: LoginConfig,
    /// Seconds a client has to send a request's head (request line and
    /// headers), counted from when the connection opens or the first byte of
    /// the next request arrives; past it the connection is closed.
    pub header_read_timeout_secs: f64,
    /// Seconds a kept-alive connection may wait for its next request, and a
    /// client may leave a response unread, before the connection is closed.
    pub idle_timeout_secs: f64,
    /// Seconds a request's body may take to arrive, counted from its head;
    /// past it the request is answered 408 and the connection closed.
    pub body_read_timeout_secs: f64,
    /// The largest request head (request line and headers) in bytes; a larger
    /// one is answered 431. At least 8192.
    pub max_header_bytes: usize,
    /// Connections open at once. At the limit, the oldest connection without a
    /// request in progress (or whose request body is still on its way) is
    /// closed to admit a new one; when every one is
    /// busy, new ones wait in the listen queue. Default: from the open-file
    /// limit (which `serve` raises to its hard limit), leaving room for the
    /// store and job files, at most 4096.
    pub max_connections: Option<usize>,
    /// Ended runs older than this many days are deleted with their results,
    /// log and webhook (only once the webhook is delivered or given up).
    /// Fractions are allowed (0.5 = 12 hours); 0 keeps runs forever.
    pub retention_days: f64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".parse().expect("static address"),
            data_dir: "tidepool-data".into(),
            projects: "projects".into(),
            store: None,
            node_id: None,
            lease_secs: 15,
            workers: 4,
            queue_size: 100_000,
            body_limit: 1024 * 1024,
            shutdown_grace_secs: 30,
            insecure: false,
            token_lifetime_secs: 5 * 24 * 3600,
            max_tokens_per_user: 10_000,
            execute_job_wait_secs: 0,
            webhooks: WebhookConfig::default(),
            login: LoginConfig::default(),
            header_read_timeout_secs: 10.0,
            idle_timeout_secs: 60.0,
            body_read_timeout_secs: 60.0,
            max_header_bytes: 64 * 1024,
            max_connections: None,
            retention_days: 30.0,
        }
    }
}

/// How completion webhooks are delivered.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Signing secret (Standard Webhooks: `whsec_` + base64, or any text).
    pub secret: Option<String>,
    /// Retries stop this many hours after the run ended.
    pub max_retry_hours: f64,
    /// The first retry waits this long; each next one twice as long.
    pub first_retry_secs: f64,
    /// The longest wait between two attempts.
    pub max_retry_interval_secs: f64,
    /// One attempt's timeout.
    pub timeout_secs: f64,
    /// Also refuse loopback, private (RFC 1918), unique-local, CGNAT,
    /// benchmarking and local-use NAT64 addresses (for shared deployments);
    /// see `server::webhook::policy`.
    pub block_private: bool,
    /// Allow link-local addresses (169.254.0.0/16, fe80::/10); refused by
    /// default. Cloud metadata addresses stay refused.
    pub allow_link_local: bool,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            secret: None,
            max_retry_hours: 24.0,
            first_retry_secs: 5.0,
            max_retry_interval_secs: 3600.0,
            timeout_secs: 10.0,
            block_private: false,
            allow_link_local: false,
        }
    }
}

/// Limits on `POST /token`. Each password check is argon2id with 19 MiB of
/// memory, so the number at once bounds the server's memory; repeated
/// failures for a user or from an address are answered 429 without a check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginConfig {
    /// Password checks that run at once (each holds 19 MiB and a core for
    /// about 25 ms). Default: the number of cores, at most 8; 0 counts as 1.
    pub checks: usize,
    /// How long an attempt waits for a free check before it is answered
    /// 429 with Retry-After, in milliseconds.
    pub wait_ms: u64,
    /// Failed attempts for one user name, or from one address (IPv6: its
    /// /64), within `window_secs` before further attempts are refused.
    pub max_failures: u32,
    /// The window the failures are counted in, in seconds.
    pub window_secs: u64,
    /// The first refusal period; each further one for the same user or
    /// address is twice as long, up to `backoff_max_secs`.
    pub backoff_secs: u64,
    /// The longest refusal period, in seconds.
    pub backoff_max_secs: u64,
    /// User names and addresses tracked at most (each); past it the one seen
    /// longest ago is forgotten.
    pub tracked_max: usize,
}

impl Default for LoginConfig {
    fn default() -> Self {
        LoginConfig {
            checks: std::thread::available_parallelism().map_or(2, |n| n.get().min(8)),
            wait_ms: 1000,
            max_failures: 5,
            window_secs: 300,
            backoff_secs: 30,
            backoff_max_secs: 900,
            tracked_max: 10_000,
        }
    }
}

impl ServerConfig {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Where the store is.
    pub fn store_location(&self) -> Result<StoreLocation, ConfigError> {
        match &self.store {
            None => Ok(StoreLocation::Sqlite(self.data_dir.join("tidepool.sqlite"))),
            Some(url) => StoreLocation::parse(url),
        }
    }

    /// The lease, checked.
    pub fn lease(&self) -> Result<std::time::Duration, ConfigError> {
        if self.lease_secs < 3 {
            return Err(ConfigError::LeaseTooShort(self.lease_secs));
        }
        Ok(std::time::Duration::from_secs(self.lease_secs))
    }

    /// This node's name: `node_id`, else `host:port` of the listen address.
    pub fn node_name(&self) -> String {
        if let Some(n) = self.node_id.as_deref().filter(|n| !n.trim().is_empty()) {
            return n.trim().to_owned();
        }
        let ip = self.listen.ip();
        let host = if ip.is_unspecified() {
            host_name().unwrap_or_else(|| ip.to_string())
        } else {
            ip.to_string()
        };
        format!("{host}:{}", self.listen.port())
    }
}

/// The machine's host name, if it has one.
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// Where the runs are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// The embedded store: one SQLite file, one node.
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by any number of nodes (the URL as given).
    Postgres(String),
}

impl StoreLocation {
    /// Reads `sqlite:PATH`, `postgres://…` or `postgresql://…`.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        if let Some(p) = url.strip_prefix("sqlite:") {
            return Ok(StoreLocation::Sqlite(PathBuf::from(
                p.trim_start_matches("//"),
            )));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreLocation::Postgres(url.to_owned()));
        }
        Err(ConfigError::UnsupportedStore(url.to_owned()))
    }

    /// The location without a password, for logs.
    pub fn redacted(&self) -> String {
        match self {
            StoreLocation::Sqlite(p) => p.display().to_string(),
            StoreLocation::Postgres(url) => match (url.find("://"), url.rfind('@')) {
                (Some(s), Some(at)) if at > s => {
                    let user = &url[s + 3..at];
                    let user = user.split(':').next().unwrap_or_default();
                    format!("{}{user}{}", &url[..s + 3], &url[at..])
                }
                _ => url.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error and its causes as the CLI prints them (`error: {e:#}`).
    fn chain(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            out.push_str(&format!(": {c}"));
            cause = c.source();
        }
        out
    }

    #[test]
    fn errors_name_the_file_and_keep_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let e = ServerConfig::from_file(&missing).unwrap_err();
        let ConfigError::Read { source, .. } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(
            chain(&e),
            format!("cannot read {}: {source}", missing.display())
        );

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "listen = 5\n").unwrap();
        let e = ServerConfig::from_file(&bad).unwrap_err();
        let ConfigError::Parse { source, .. } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(chain(&e), format!("{}: {source}", bad.display()));

        let c = ServerConfig {
            store: Some("mysql://db".into()),
            ..ServerConfig::default()
        };
        assert_eq!(
            c.store_location().unwrap_err().to_string(),
            "store \"mysql://db\" is not supported: use sqlite:PATH or postgres://USER@HOST:PORT/DATABASE"
        );
    }

    #[test]
    fn store_locations_read_and_hide_passwords() {
        let pg = StoreLocation::parse("postgres://app:s3cret@db:5432/tp").unwrap();
        assert_eq!(
            pg,
            StoreLocation::Postgres("postgres://app:s3cret@db:5432/tp".into())
        );
        assert_eq!(pg.redacted(), "postgres://app@db:5432/tp");
        assert_eq!(
            StoreLocation::parse("sqlite:///tmp/x.sqlite").unwrap(),
            StoreLocation::Sqlite("/tmp/x.sqlite".into())
        );
        let c = ServerConfig {
            lease_secs: 2,
            ..ServerConfig::default()
        };
        assert!(c.lease().is_err());
        let c = ServerConfig {
            listen: "127.0.0.1:9001".parse().unwrap(),
            ..ServerConfig::default()
        };
        assert_eq!(c.node_name(), "127.0.0.1:9001");
    }
}
