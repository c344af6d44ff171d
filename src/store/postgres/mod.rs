//! The PostgreSQL store: one database shared by a cluster of tidepool nodes.
//!
//! PostgreSQL is the only coordinator. Every run a node executes is held
//! under a lease epoch (its fencing token): claims, takeovers and requeues
//! bump it, and every write of a run's state is conditional on it in the same
//! statement or transaction. Leases run by the database's clock (`now()`),
//! never a node's. Accepts are group-committed; nodes hear of queued, ended
//! and cancelled runs through `LISTEN tidepool_news` (and poll as well).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, FixedOffset, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_postgres::NoTls;

use super::{RunKey, RunRecord, StoreError, StoreNews};
use crate::run::RunStatus;

mod history;
mod news;
mod nodes;
mod retry;
mod runs;
mod schedules;
mod state;
mod store_impl;
mod submit;
mod users;
mod webhooks;

#[cfg(test)]
mod tests;

/// The schema version this binary knows (the number of the last migration).
pub const SCHEMA_VERSION: i32 = 6;

/// The migrations, in order: version `i + 1` is `MIGRATIONS[i]`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_nodes.sql"),
    include_str!("migrations/0003_argument_trgm.sql"),
    include_str!("migrations/0004_schedules.sql"),
    include_str!("migrations/0005_retry.sql"),
    include_str!("migrations/0006_processed_files.sql"),
];

/// The advisory lock that serialises migrations across nodes ("tidepool" in ASCII).
const MIGRATION_LOCK: i64 = 0x7469_6465_706f_6f6c;

/// The channel every node listens on.
const NEWS_CHANNEL: &str = "tidepool_news";

/// How long a node's own runs found at its start are leased for before its
/// first renewal ([`super::Store::orphans`] is given no lease).
const ORPHAN_LEASE: Duration = Duration::from_secs(30);

/// How the PostgreSQL store is set up.
#[derive(Debug, Clone)]
pub struct PgStoreOptions {
    /// Connections in the pool (default 16).
    pub pool_size: usize,
    /// How long a statement waits for a connection (or to make one) before
    /// the store is called unreachable (default 5 s).
    pub pool_timeout: Duration,
    /// This node's id (for the notification connection's application name).
    pub node_id: Option<String>,
}

impl Default for PgStoreOptions {
    fn default() -> Self {
        PgStoreOptions {
            pool_size: 16,
            pool_timeout: Duration::from_secs(5),
            node_id: None,
        }
    }
}

/// The PostgreSQL store.
pub struct PostgresStore {
    pool: Pool,
    /// Submissions waiting for the group committer.
    submits: mpsc::Sender<submit::SubmitOp>,
    /// Group transactions the committer has begun (for tests and metrics).
    groups: Arc<AtomicU64>,
    /// What the listener hears.
    news: broadcast::Sender<StoreNews>,
    /// Dropped with the store: the listener stops.
    _stop: watch::Sender<()>,
    /// Where kept state's blocking calls run.
    kept: Arc<state::KeptRuntime>,
}

/// A pool's failure to hand out a connection: the store is unreachable.
fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unreachable(e.to_string())
}

/// A connection that could not be made is the store being unreachable.
fn connect_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unreachable(e.to_string())
}

fn parse_config(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| StoreError::Unreachable(format!("the store's address {url:?}: {e}")))
}

/// One session outside the pool (migrations), its connection driven by a task.
async fn session(url: &str) -> Result<tokio_postgres::Client, StoreError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(connect_error)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`),
    /// brings its schema up to [`SCHEMA_VERSION`], and starts the group
    /// committer and the notification listener.
    pub async fn connect(url: &str, opts: PgStoreOptions) -> Result<Self, StoreError> {
        let pg = parse_config(url)?;
        Self::migrate_to(url, SCHEMA_VERSION).await?;
        let pool = make_pool(pg.clone(), opts.pool_size.max(1), opts.pool_timeout)?;
        // A first connection proves the pool can reach the database.
        drop(pool.get().await.map_err(pool_error)?);
        let (news, _) = broadcast::channel(1024);
        let (stop, stopped) = watch::channel(());
        news::listen(pg.clone(), opts.node_id.clone(), news.clone(), stopped).await?;
        let groups = Arc::new(AtomicU64::new(0));
        let submits = submit::start(pool.clone(), groups.clone());
        let kept = Arc::new(state::KeptRuntime::new(make_pool(
            pg,
            4,
            opts.pool_timeout,
        )?)?);
        Ok(PostgresStore {
            pool,
            submits,
            groups,
            news,
            _stop: stop,
            kept,
        })
    }

    /// Applies the migrations the database at `url` lacks, up to `version`,
    /// each in its own transaction, under an advisory lock (several nodes
    /// starting at once migrate once). Refuses a database whose schema is
    /// newer than this binary knows. Returns the version it is at now.
    pub async fn migrate_to(url: &str, version: i32) -> Result<i32, StoreError> {
        let mut client = session(url).await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        // The session's end releases the lock, whatever happens below.
        let out = migrate_locked(&mut client, version.min(SCHEMA_VERSION)).await;
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        out
    }

    /// How many transactions accepts have been committed in (fewer than the
    /// accepts under concurrency: that is the group commit).
    pub fn accept_groups(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }

    /// A pooled connection, or [`StoreError::Unreachable`].
    async fn conn(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }
}

fn make_pool(pg: tokio_postgres::Config, size: usize, wait: Duration) -> Result<Pool, StoreError> {
    let mgr = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .wait_timeout(Some(wait))
        .create_timeout(Some(wait))
        .recycle_timeout(Some(wait))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Unreachable(e.to_string()))
}

async fn migrate_locked(
    client: &mut tokio_postgres::Client,
    target: i32,
) -> Result<i32, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS tidepool_schema (
               version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM tidepool_schema", &[])
        .await?;
    let current: i32 = row.get(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::Schema(format!(
            "the store's schema is version {current}; this tidepool knows up to {SCHEMA_VERSION}: upgrade tidepool"
        )));
    }
    for version in current + 1..=target {
        let tx = client.transaction().await?;
        tx.batch_execute(MIGRATIONS[(version - 1) as usize]).await?;
        tx.execute(
            "INSERT INTO tidepool_schema (version, applied_at) VALUES ($1, now())",
            &[&version],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, "store schema migrated");
    }
    Ok(current.max(target))
}

/// A stored time, in this machine's offset (as the SQLite store hands them out).
fn local(t: DateTime<Utc>) -> DateTime<FixedOffset> {
    t.with_timezone(&chrono::Local).fixed_offset()
}

fn parse_status(s: &str) -> RunStatus {
    RunStatus::from_stored(s)
}

/// A run's columns, for a query that names the runs table `r`. An ended
/// run's results are kept once, inside its response (see `finish`).
const RUN_COLUMNS: &str = "r.instance, r.run_id, r.project_id, r.job_id, r.request, r.webhook_url,
    r.status, r.accepted_at,
    coalesce(r.results, CASE WHEN r.response IS NOT NULL THEN (r.response::json -> 'results')::text END),
    r.response, r.error, r.fingerprint, r.lease_epoch, r.node_id, r.requeues";

fn run_row(r: &tokio_postgres::Row) -> RunRecord {
    RunRecord {
        key: RunKey {
            instance: r.get(0),
            run_id: r.get(1),
        },
        project_id: r.get(2),
        job_id: r.get(3),
        request_json: r.get(4),
        webhook_url: r.get(5),
        status: parse_status(r.get(6)),
        accepted_at: local(r.get(7)),
        results_json: r.get(8),
        response_json: r.get(9),
        error: r.get(10),
        fingerprint: r.get(11),
        lease_epoch: r.get(12),
        node_id: r.get(13),
        requeues: r.get::<_, i32>(14).max(0) as u32,
    }
}

/// Seconds of a lease, as the database's `make_interval` takes them.
fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
