//! Where runs, their results, the webhook outbox and the users live.
//!
//! The store is the single source of truth for a run's state: anything the
//! API answers about a run comes from it. [`Store`] is the seam: the embedded
//! default is [`SqliteStore`]; a PostgreSQL store for several nodes implements
//! the same trait without touching the API or the engine.

pub mod history;
mod postgres;
pub mod retry;
pub mod schedules;
mod sqlite;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

use crate::run::RunStatus;
pub use history::RunHistory;
pub use postgres::{PgStoreOptions, PostgresStore};
pub use schedules::ScheduleStore;
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
    /// The lease epoch: bumped by every claim, takeover and requeue. A node's
    /// writes of a run's state hold only while the epoch it claimed is current
    /// (its fencing token). Always 0 in a single-node store.
    pub lease_epoch: i64,
    /// The node that holds (or last held) the run; None in a single-node store.
    pub node_id: Option<String>,
    /// How many times the run was queued again after its node was lost.
    pub requeues: u32,
}

/// Which state a run must be in for [`Store::finish`] to end it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndIf {
    /// Queued (a cancel before it started).
    Queued,
    /// Running under this lease epoch (a node ending its own run, or one it took over).
    Leased(i64),
}

/// What renewing a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Still ours, extended.
    Held,
    /// Still ours, extended, and someone asked (through any node) to cancel it.
    CancelRequested,
    /// Gone: another node took the run over (or it ended). Write nothing more.
    Lost,
}

/// Per-job limits on runs at once across every node, by (instance, project, job).
/// A Queued run of a job at its limit is left for later.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConcurrencyLimits(pub std::collections::HashMap<(String, String, String), u32>);

impl ConcurrencyLimits {
    /// The limit of a run's first job, if it has one.
    pub fn of(&self, instance: &str, project: &str, job: &str) -> Option<u32> {
        self.0
            .get(&(instance.to_owned(), project.to_owned(), job.to_owned()))
            .copied()
    }
}

/// What a node hears from the others through the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreNews {
    /// Runs were queued: claim.
    Queued,
    /// A run ended (a sync `ExecuteJob` may be waiting for it).
    Ended(RunKey),
    /// Someone asked to cancel a run (its node stops it).
    Cancel(RunKey),
    /// The notification connection was lost and is back: anything may have
    /// been missed, so look again.
    Reconnected,
}

/// A node as it registers itself in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// `--node-id`, default `host:port`.
    pub node_id: String,
    /// Where it listens.
    pub address: String,
    /// The binary's version.
    pub version: String,
    /// When it started.
    pub started_at: DateTime<FixedOffset>,
    /// Runs executing on it now.
    pub running: u32,
    /// Runs it executes at once.
    pub workers: u32,
    /// It has stopped claiming (SIGTERM) and is handing its runs back.
    pub draining: bool,
}

/// A node as the store knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// What the node said of itself at its last heartbeat.
    #[serde(flatten)]
    pub info: NodeInfo,
    /// Its last heartbeat, by the store's clock.
    pub heartbeat_at: DateTime<FixedOffset>,
    /// Seconds since that heartbeat, by the store's clock.
    pub silent_secs: f64,
    /// It said it stopped (a clean shutdown).
    pub stopped: bool,
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
    /// A PostgreSQL statement failed (its SQLSTATE is [`StoreError::sql_state`]).
    #[error("store: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The PostgreSQL store cannot be reached (no connection within the pool's
    /// patience): answer 503 and retry.
    #[error("store: unreachable: {0}")]
    Unreachable(String),
    /// The store's schema is newer than this binary, or cannot be upgraded.
    #[error("store: {0}")]
    Schema(String),
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

    /// PostgreSQL's SQLSTATE (`40001`, `57P01`, …), if the failure came from it.
    pub fn sql_state(&self) -> Option<&str> {
        match self {
            StoreError::Postgres(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// Whether the store could not be reached at all (as opposed to refusing a
    /// statement): the API answers 503 with Retry-After, the caller retries.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::Unreachable(_) => true,
            StoreError::Postgres(e) => {
                e.is_closed()
                    || match e.code() {
                        // Class 08 (connection), 57P01-03 (shutdown, cannot connect now).
                        Some(c) => c.code().starts_with("08") || c.code().starts_with("57P"),
                        // No SQLSTATE: the socket failed (not a value that would not convert).
                        None => {
                            std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
                        }
                    }
            }
            _ => false,
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
pub trait Store: RunHistory + ScheduleStore + Send + Sync + 'static {
    /// Records a run as Queued, durably, before the caller is told it started.
    async fn submit(&self, run: NewRun) -> Result<Submitted, StoreError>;
    /// Takes the oldest Queued run whose job is under its limit and marks it
    /// Running on `node` with a new lease epoch (`lease` long, by the store's
    /// clock). The returned record carries that epoch.
    async fn claim_next(
        &self,
        node: &str,
        lease: std::time::Duration,
        limits: &ConcurrencyLimits,
    ) -> Result<Option<RunRecord>, StoreError>;
    /// Saves live per-job results of a Running run held under `epoch`;
    /// false if the lease is gone (nothing written).
    async fn save_progress(
        &self,
        key: &RunKey,
        epoch: i64,
        results_json: &str,
    ) -> Result<bool, StoreError>;
    /// Ends a run that is as `when` says, and queues its webhook, in one
    /// transaction. False if it was not (ended already, or fenced out).
    async fn finish(&self, key: &RunKey, when: EndIf, end: RunEnd) -> Result<bool, StoreError>;
    /// Whether other nodes share this store (runs may be handed to them).
    fn is_shared(&self) -> bool {
        false
    }
    /// Extends the lease of a Running run held under `epoch` by `lease`.
    async fn renew(
        &self,
        _key: &RunKey,
        _epoch: i64,
        _lease: std::time::Duration,
    ) -> Result<LeaseState, StoreError> {
        Ok(LeaseState::Held)
    }
    /// Asks the node running a run to cancel it (seen at its next renewal, or
    /// at once through a notification). False where the store has no other
    /// nodes to tell (the caller cancels locally).
    async fn request_cancel(&self, _key: &RunKey) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Runs whose lease ran out (their node died, froze or lost the store):
    /// each is taken by `node` under a new epoch (fencing the old owner out)
    /// and returned with `node_id` still naming the node that lost it.
    async fn take_over_expired(
        &self,
        _node: &str,
        _lease: std::time::Duration,
        _limit: usize,
    ) -> Result<Vec<RunRecord>, StoreError> {
        Ok(Vec::new())
    }
    /// Runs this node left Running in an earlier life (a crash, a restart):
    /// no one else is running them. Taken under a new epoch. The single-node
    /// store returns every Running run.
    async fn orphans(&self, _node: &str) -> Result<Vec<RunRecord>, StoreError> {
        self.runs_in(RunStatus::Running).await
    }
    /// Puts a Running run held under `epoch` back in the queue (a drained
    /// node hands it back, or its node was lost and the job may run again);
    /// `lost` counts it in [`RunRecord::requeues`]. False if fenced out.
    async fn requeue(&self, _key: &RunKey, _epoch: i64, _lost: bool) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Puts a Running run held under `epoch` back in the queue as its next
    /// attempt, claimable once `retry.wait` has passed, with its attempts so
    /// far and where the next one starts; no webhook is queued. False if
    /// fenced out (or it is not Running).
    async fn retry_later(
        &self,
        key: &RunKey,
        epoch: i64,
        retry: retry::RetryLater,
    ) -> Result<bool, StoreError>;
    /// A run's earlier attempts and where its next attempt starts.
    async fn retry_state(&self, key: &RunKey) -> Result<retry::RetryState, StoreError>;
    /// Records that a node is alive (and what it is doing).
    async fn heartbeat(&self, node: &NodeInfo) -> Result<(), StoreError>;
    /// Records that a node stopped cleanly.
    async fn node_stopped(&self, node_id: &str) -> Result<(), StoreError>;
    /// Every node the store knows, by id.
    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Forgets the nodes not heard from for `silent_for` (stopped or lost
    /// long ago: a node that comes back is listed again at its next beat).
    /// How many were forgotten.
    async fn forget_nodes(&self, silent_for: std::time::Duration) -> Result<u64, StoreError>;
    /// What other nodes did that this one should hear of at once (a store
    /// shared by several nodes sends them with LISTEN/NOTIFY; they may be
    /// lost, so every waiter also polls). None: a single-node store.
    fn news(&self) -> Option<tokio::sync::broadcast::Receiver<StoreNews>> {
        None
    }
    /// Where a run's jobs keep variables, `LastRunDate` and xref lists, with
    /// writes fenced by the run's lease; None: the data dir's `state.sqlite`.
    fn kept_state(
        &self,
        _fence: Option<(RunKey, i64)>,
    ) -> Option<std::sync::Arc<dyn crate::engine::KeptState>> {
        None
    }
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
    /// Stores a bearer token (its SHA-256) for a user until `expires`, and
    /// forgets the user's expired tokens and, past `keep` live ones, the
    /// oldest: a user who asks for tokens in a loop spends a bounded store.
    async fn put_token(
        &self,
        token_hash: &str,
        user: &str,
        expires: DateTime<FixedOffset>,
        keep: usize,
    ) -> Result<(), StoreError>;
    /// The user a bearer token (its SHA-256) belongs to and when the token
    /// expires, if it has not.
    async fn token_user(
        &self,
        token_hash: &str,
        now: DateTime<FixedOffset>,
    ) -> Result<Option<(String, DateTime<FixedOffset>)>, StoreError>;
}
