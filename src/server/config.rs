//! `tidepool serve` settings: a TOML file, overridden by flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
    /// The store: `sqlite:PATH`; default `<data_dir>/tidepool.sqlite`.
    pub store: Option<String>,
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
    /// How long `ExecuteJob` waits for its run; past it, it answers 202 with
    /// the run as it stands (read the rest from Results). 0: as long as the
    /// run takes.
    pub execute_job_wait_secs: u64,
    /// Completion webhooks.
    pub webhooks: WebhookConfig,
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
            workers: 4,
            queue_size: 100_000,
            body_limit: 1024 * 1024,
            shutdown_grace_secs: 30,
            insecure: false,
            token_lifetime_secs: 5 * 24 * 3600,
            execute_job_wait_secs: 0,
            webhooks: WebhookConfig::default(),
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
    /// Refuse loopback and private addresses (for shared deployments).
    pub block_private: bool,
    /// Allow link-local addresses (169.254.0.0/16: cloud metadata); refused by default.
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

impl ServerConfig {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The store's SQLite file.
    pub fn store_path(&self) -> anyhow::Result<PathBuf> {
        match &self.store {
            None => Ok(self.data_dir.join("tidepool.sqlite")),
            Some(url) => match url.strip_prefix("sqlite:") {
                Some(p) => Ok(PathBuf::from(p.trim_start_matches("//"))),
                None => anyhow::bail!(
                    "store {url:?} is not supported by this build: use sqlite:PATH (a PostgreSQL store is planned behind the same trait)"
                ),
            },
        }
    }
}
