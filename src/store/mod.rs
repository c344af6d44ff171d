//! Where runs, their results, the webhook outbox and the users live.
//!
//! The store is the single source of truth for a run's state: anything the
//! API answers about a run comes from it. [`Store`] is the seam: the embedded
//! default is [`SqliteStore`]; a PostgreSQL store for several nodes implements
//! the same trait without touching the API or the engine.

pub mod history;
mod sqlite;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

use crate::run::RunStatus;
pub use history::RunHistory;
pub use sqlite::SqliteStore;

/// A run is named by its instance and the caller's GUID: the same GUID in two
/// instances is two runs, and neither instance learns of the other's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunKey {
    /// The instance (tenant).
    pub instance: String,
    /// The caller's run ID.
    pub run_id: uuid::Uuid,
}

impl fmt::Display for RunKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.instance, self.run_id)
    }
}

/// A run to record as Queued.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// Its key.
    pub key: RunKey,
    /// The project.
    pub project_id: String,
    /// The first job.
    pub job_id: String,
    /// The request, as the API will want it back to execute the run.
    pub request_json: String,
    /// What makes two submissions "the same parameters".
    pub fingerprint: String,
    /// Where to POST the result.
    pub webhook_url: Option<String>,
    /// When it was accepted.
    pub accepted_at: DateTime<FixedOffset>,
}

/// What [`Store::submit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Recorded, durably, as Queued.
    Accepted,
    /// The same run ID with the same parameters was recorded before: nothing new.
    Duplicate,
    /// The same run ID with other parameters: refused.
    Conflict,
}

/// A run as stored.
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// Its key.
    pub key: RunKey,
    /// The project.
    pub project_id: String,
    /// The first job.
    pub job_id: String,
    /// The request (API-owned JSON).
    pub request_json: String,
    /// Where to POST the result.
    pub webhook_url: Option<String>,
    /// Queued, Running, Complete, Failed or Cancelled.
    pub status: RunStatus,
    /// When it was accepted.
    pub accepted_at: DateTime<FixedOffset>,
    /// Live or final per-job results (API-owned JSON), once running.
    pub results_json: Option<String>,
    /// The final answer (API-owned JSON), once ended.
    pub response_json: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Tells a repeat of the same request from another one under its runID.
    pub fingerprint: String,
}

/// How a run ended, to record in one transaction with its webhook.
#[derive(Debug, Clone)]
pub struct RunEnd {
    /// Complete, Failed or Cancelled.
    pub status: RunStatus,
    /// Per-job results (API-owned JSON).
    pub results_json: String,
    /// The final answer (API-owned JSON).
    pub response_json: String,
    /// The completion webhook's body (the answer, its log capped).
    pub webhook_json: String,
    /// Why it failed.
    pub error: Option<String>,
}

/// What one step of [`Store::purge_ended`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Purged {
    /// Runs deleted, with their logs, results and webhook rows.
    pub deleted: u64,
    /// More old runs may be waiting: call again soon. False once the sweep
    /// has reached runs younger than the cutoff (the next call starts over).
    pub more: bool,
}

/// A webhook delivery that is due.
#[derive(Debug, Clone)]
pub struct WebhookDue {
    /// The run.
    pub key: RunKey,
    /// Where to POST.
    pub url: String,
    /// What to POST.
    pub body: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the webhook was created (retries stop some hours after it).
    pub created_at: DateTime<FixedOffset>,
}

/// One delivery attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookAttempt {
    /// 1-based.
    pub attempt: u32,
    /// When.
    pub at: DateTime<FixedOffset>,
    /// The receiver's HTTP status, if it answered.
    pub status_code: Option<u16>,
    /// What went wrong.
    pub error: Option<String>,
}

/// What happens to a webhook after an attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WebhookNext {
    /// Delivered: done.
    Delivered,
    /// Try again at this time.
    RetryAt(DateTime<FixedOffset>),
    /// Retries are used up (or the address is refused): done, undelivered.
    GiveUp,
}

/// What a user may do in an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Read the instance's series of `/metrics`, nothing else (on the
    /// instance `*`: every instance's series and the server-wide ones).
    Metrics,
    /// Read runs, results and projects.
    ReadOnly,
    /// Also execute jobs.
    Full,
    /// Everything.
    Owner,
}

impl std::str::FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, UnknownRole> {
        match s.to_ascii_lowercase().as_str() {
            "owner" => Ok(Role::Owner),
            "full" => Ok(Role::Full),
            "readonly" | "read-only" | "read_only" | "read" => Ok(Role::ReadOnly),
            "metrics" => Ok(Role::Metrics),
            _ => Err(UnknownRole(s.to_owned())),
        }
    }
}

/// An API key as stored: its hash, never the key.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyRecord {
    /// SHA-256 of the key, hex.
    pub key_hash: String,
    /// The user it acts as.
    pub user: String,
    /// What its creator called it.
    pub label: String,
}

/// A user and the instances it holds roles in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    /// The user name.
    pub name: String,
    /// An argon2 PHC string.
    pub password_hash: String,
    /// The instance used when a request names none.
    pub primary_instance: String,
    /// Roles by instance.
    pub grants: Vec<(String, Role)>,
}

/// A store failure, keeping the database's own error where there is one.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A statement failed.
    #[error("store: {0}")]
    Database(#[from] rusqlite::Error),
    /// The commit of the transaction that held the write failed; every write
    /// of that transaction shares the one error.
    #[error("store: {0}")]
    Commit(#[source] std::sync::Arc<rusqlite::Error>),
    /// The store's folder or one of its threads could not be made.
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
    /// The write-ahead log stayed busy past the patience given.
    #[error("store: checkpoint: the log is busy ({frames} frames left)")]
    LogBusy {
        /// Frames still in the log.
        frames: i64,
    },
    /// A blocking store task panicked or was cancelled.
    #[error("store: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The store is shutting down.
    #[error("store: closed")]
    Closed,
}

impl StoreError {
    /// The database's error, if the failure came from it.
    pub fn database_error(&self) -> Option<&rusqlite::Error> {
        match self {
            StoreError::Database(e) => Some(e),
            StoreError::Commit(e) => Some(e),
            _ => None,
        }
    }

    /// The database's extended result code (`SQLITE_BUSY` is 5,
    /// `SQLITE_CONSTRAINT_UNIQUE` 2067, …), if the failure came from it.
    pub fn code(&self) -> Option<i32> {
        match self.database_error()? {
            rusqlite::Error::SqliteFailure(e, _) => Some(e.extended_code),
            _ => None,
        }
    }

    /// The database's primary error class (busy, constraint, corrupt, …),
    /// if the failure came from it.
    pub fn class(&self) -> Option<rusqlite::ErrorCode> {
        self.database_error()?.sqlite_error_code()
    }
}

/// A role name that is none of Owner, Full, ReadOnly or Metrics.
#[derive(Debug, thiserror::Error)]
#[error("unknown role {0:?}: use Owner, Full, ReadOnly or Metrics")]
pub struct UnknownRole(pub String);

/// Revocations (a user replaced or removed, a password changed, an API key
/// removed) committed through any store of this process: a credential cache
/// of this process forgets what it learned before the last one at once.
static REVOCATIONS: AtomicU64 = AtomicU64::new(0);

/// How many revocations this process has committed (see [`REVOCATIONS`]);
/// the CLI's, from another process, are not counted.
pub fn revocation_epoch() -> u64 {
    REVOCATIONS.load(Ordering::Acquire)
}

/// Called by a store once a revoking write has committed.
fn note_revocation() {
    REVOCATIONS.fetch_add(1, Ordering::AcqRel);
}

/// Runs, results, the webhook outbox, users, keys and tokens.
#[async_trait]
pub trait Store: RunHistory + Send + Sync + 'static {
    /// Records a run as Queued, durably, before the caller is told it started.
    async fn submit(&self, run: NewRun) -> Result<Submitted, StoreError>;
    /// Takes the oldest Queued run and marks it Running.
    async fn claim_next(&self) -> Result<Option<RunRecord>, StoreError>;
    /// Saves live per-job results of a Running run.
    async fn save_progress(&self, key: &RunKey, results_json: &str) -> Result<(), StoreError>;
    /// Ends a run that is in status `from`, and queues its webhook, in one
    /// transaction. False if the run was not in `from`.
    async fn finish(&self, key: &RunKey, from: RunStatus, end: RunEnd) -> Result<bool, StoreError>;
    /// A run.
    async fn run(&self, key: &RunKey) -> Result<Option<RunRecord>, StoreError>;
    /// Runs in a status (recovery uses Running).
    async fn runs_in(&self, status: RunStatus) -> Result<Vec<RunRecord>, StoreError>;
    /// How many runs are Queued.
    async fn queued_count(&self) -> Result<u64, StoreError>;
    /// Retention: deletes up to `limit` runs that ended before `cutoff`, with
    /// their results, log, webhook and its attempts, in one short transaction.
    /// A run whose webhook is still being delivered is kept until it is
    /// delivered or given up.
    async fn purge_ended(
        &self,
        cutoff: DateTime<FixedOffset>,
        limit: usize,
    ) -> Result<Purged, StoreError>;
    /// Folds the write-ahead log into the database and empties it (at shutdown).
    async fn checkpoint(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Webhooks due at `now`, oldest first.
    async fn due_webhooks(
        &self,
        now: DateTime<FixedOffset>,
        limit: usize,
    ) -> Result<Vec<WebhookDue>, StoreError>;
    /// Records an attempt and what comes next.
    async fn record_attempt(
        &self,
        key: &RunKey,
        attempt: WebhookAttempt,
        next: WebhookNext,
    ) -> Result<(), StoreError>;
    /// The attempts of a run's webhook.
    async fn attempts(&self, key: &RunKey) -> Result<Vec<WebhookAttempt>, StoreError>;
    /// Adds or replaces a user; replacing revokes its bearer tokens (its
    /// password may have changed), not its API keys.
    async fn put_user(&self, user: UserRecord) -> Result<(), StoreError>;
    /// Changes a user's password hash and revokes its bearer tokens, in one
    /// transaction; false if there is no such user.
    async fn set_password(&self, name: &str, password_hash: &str) -> Result<bool, StoreError>;
    /// A user by name.
    async fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError>;
    /// Whether any user exists.
    async fn has_users(&self) -> Result<bool, StoreError>;
    /// Stores an API key (its SHA-256) for a user.
    async fn put_api_key(&self, key_hash: &str, user: &str, label: &str) -> Result<(), StoreError>;
    /// The user an API key (its SHA-256) belongs to.
    async fn api_key_user(&self, key_hash: &str) -> Result<Option<String>, StoreError>;
    /// Every API key (hashes only), by user and label.
    async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Removes an API key; whether it existed.
    async fn remove_api_key(&self, key_hash: &str) -> Result<bool, StoreError>;
    /// Removes a user with its API keys and tokens; whether it existed.
    async fn remove_user(&self, name: &str) -> Result<bool, StoreError>;
    /// Stores a bearer token (its SHA-256) for a user until `expires`.
    async fn put_token(
        &self,
        token_hash: &str,
        user: &str,
        expires: DateTime<FixedOffset>,
    ) -> Result<(), StoreError>;
    /// The user a bearer token (its SHA-256) belongs to and when the token
    /// expires, if it has not.
    async fn token_user(
        &self,
        token_hash: &str,
        now: DateTime<FixedOffset>,
    ) -> Result<Option<(String, DateTime<FixedOffset>)>, StoreError>;
}
