//! The embedded store: one SQLite file (WAL, `synchronous=FULL`).
//!
//! Every write goes to one writer thread, which commits whatever writes are
//! waiting as one transaction (group commit): each caller is answered only
//! after the fsync that made its write durable, and under load one fsync
//! serves many callers. Reads use their own connections, in parallel.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, FixedOffset};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{
    ApiKeyRecord, ConcurrencyLimits, EndIf, NewRun, NodeInfo, NodeRecord, Purged, Role, RunEnd,
    RunKey, RunRecord, Store, StoreError, Submitted, UserRecord, WebhookAttempt, WebhookDue,
    WebhookNext,
};
use crate::run::RunStatus;

mod history;
mod packed;
mod retry;
mod schedules;

/// Hears whether the transaction that held the write committed.
type Reply = Box<dyn FnOnce(Result<(), Arc<rusqlite::Error>>) + Send>;
/// A write, and whether it needs a savepoint of its own (several statements
/// that must land together; a lone statement is atomic already).
type Op = (bool, Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>);

/// Writes that one transaction may hold.
const GROUP_MAX: usize = 2048;

/// Past this much log, a checkpoint waits for readers and writers so that the
/// log can start over (a passive one cannot while they keep it busy), and a
/// log that restarts is cut back to this size.
const WAL_RESTART_BYTES: i64 = 64 * 1024 * 1024;

/// How often the checkpointer looks at the log.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS runs (
  instance      TEXT NOT NULL,
  run_id        TEXT NOT NULL,
  project_id    TEXT NOT NULL,
  job_id        TEXT NOT NULL,
  request       TEXT NOT NULL,
  fingerprint   TEXT NOT NULL,
  webhook_url   TEXT,
  status        TEXT NOT NULL,
  accepted_at   TEXT NOT NULL,
  started_at    TEXT,
  finished_at   TEXT,
  results       TEXT,
  response      TEXT,
  error         TEXT,
  PRIMARY KEY (instance, run_id)
);
DROP INDEX IF EXISTS runs_by_status;
CREATE INDEX IF NOT EXISTS runs_queued ON runs(status) WHERE status = 'Queued';
CREATE INDEX IF NOT EXISTS runs_running ON runs(instance, project_id, job_id) WHERE status = 'Running';
CREATE TABLE IF NOT EXISTS webhooks (
  instance        TEXT NOT NULL,
  run_id          TEXT NOT NULL,
  url             TEXT NOT NULL,
  body            TEXT NOT NULL,
  created_at      TEXT NOT NULL,
  next_attempt_at TEXT,
  attempts        INTEGER NOT NULL DEFAULT 0,
  state           TEXT NOT NULL DEFAULT 'pending',
  PRIMARY KEY (instance, run_id)
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS webhook_attempts (
  instance    TEXT NOT NULL,
  run_id      TEXT NOT NULL,
  attempt     INTEGER NOT NULL,
  at          TEXT NOT NULL,
  status_code INTEGER,
  error       TEXT,
  PRIMARY KEY (instance, run_id, attempt)
);
CREATE TABLE IF NOT EXISTS users (
  name             TEXT PRIMARY KEY,
  password_hash    TEXT NOT NULL,
  primary_instance TEXT NOT NULL,
  grants           TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
  key_hash   TEXT PRIMARY KEY,
  user       TEXT NOT NULL,
  label      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
  token_hash TEXT PRIMARY KEY,
  user       TEXT NOT NULL,
  expires_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tokens_by_user ON tokens (user);
"#;

/// The embedded SQLite store.
pub struct SqliteStore {
    _alive: Arc<()>,
    writer: crossbeam_channel::Sender<Op>,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    /// Where the retention sweep goes on from (a rowid; 0: from the start).
    purge_cursor: Mutex<i64>,
    /// The nodes on this store: this process alone, so they live in memory
    /// (what it said, when, and whether it stopped).
    nodes: Mutex<std::collections::BTreeMap<String, NodeSeen>>,
}

/// What a node said at its last heartbeat, when, and whether it stopped.
type NodeSeen = (NodeInfo, DateTime<FixedOffset>, bool);

fn open_conn(path: &Path, write: bool) -> rusqlite::Result<Connection> {
    let flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let c = Connection::open_with_flags(path, flags)?;
    c.busy_timeout(std::time::Duration::from_secs(30))?;
    packed::register(&c)?;
    Ok(c)
}

impl SqliteStore {
    /// Folds the write-ahead log into the store file and empties it, trying
    /// again while another connection holds a checkpoint (SQLite answers
    /// busy at once then) until `patience` is spent. For the end of a
    /// process, once nothing else writes.
    pub fn empty_log(path: &Path, patience: Duration) -> Result<(), StoreError> {
        let conn = open_conn(path, true)?;
        let deadline = std::time::Instant::now() + patience;
        loop {
            match checkpoint(&conn, "TRUNCATE")? {
                (_, false) => return Ok(()),
                (frames, true) if std::time::Instant::now() >= deadline => {
                    return Err(StoreError::LogBusy { frames });
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Opens (or creates) the store file and starts its writer thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let conn = open_conn(path, true)?;
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
        // FULL: a commit is on disk (fsync'd) before any caller is answered.
        conn.execute_batch("PRAGMA synchronous=FULL")?;
        conn.execute_batch(SCHEMA)?;
        history::history_schema(&conn)?;
        schedules::schedule_schema(&conn)?;
        retry::retry_schema(&conn)?;
        // Checkpoints run on their own thread so the writer never stalls on
        // copying the log into the database (and the fsync that follows).
        conn.execute_batch("PRAGMA wal_autocheckpoint=0")?;
        // A log that grew under load is cut back to this size when it restarts.
        conn.execute_batch(&format!("PRAGMA journal_size_limit={WAL_RESTART_BYTES}"))?;
        // Whatever a previous process left in the log goes into the database now.
        checkpoint(&conn, "TRUNCATE")?;
        let checkpointer = open_conn(path, true)?;
        let (tx, rx) = crossbeam_channel::unbounded::<Op>();
        let alive = Arc::new(());
        let log = Arc::new(LogState::default());
        let weak = Arc::downgrade(&alive);
        let watched = log.clone();
        std::thread::Builder::new()
            .name("tidepool-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, weak, watched))?;
        let backfill = history::text_backfill_pending(&conn)?;
        std::thread::Builder::new()
            .name("tidepool-store".into())
            .spawn(move || writer_loop(conn, rx, log))?;
        if backfill {
            // Runs from before the text index: indexed in the background
            // (searches scan until then), so a big store opens at once.
            let (writer, weak) = (tx.clone(), Arc::downgrade(&alive));
            std::thread::Builder::new()
                .name("tidepool-text-index".into())
                .spawn(move || backfill_loop(writer, weak))?;
        }
        Ok(SqliteStore {
            _alive: alive,
            writer: tx,
            readers: Arc::new(Mutex::new(Vec::new())),
            path: path.to_owned(),
            purge_cursor: Mutex::new(0),
            nodes: Mutex::new(std::collections::BTreeMap::new()),
        })
    }

    /// A write of several statements that land together or not at all.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_op(true, f).await
    }

    /// A write whose one changing statement is atomic by itself.
    async fn write_one<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_op(false, f).await
    }

    async fn write_op<T: Send + 'static>(
        &self,
        savepoint: bool,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let op: Op = (
            savepoint,
            Box::new(move |conn| {
                let r = f(conn);
                let ok = r.is_ok();
                let reply: Reply = Box::new(move |commit| {
                    let out = match (r, commit) {
                        (Ok(v), Ok(())) => Ok(v),
                        (Err(e), _) => Err(StoreError::Database(e)),
                        (Ok(_), Err(e)) => Err(StoreError::Commit(e)),
                    };
                    let _ = tx.send(out);
                });
                (ok, reply)
            }),
        );
        self.writer.send(op).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.lock().expect("reader pool").pop();
            let conn = match conn {
                Some(c) => c,
                None => open_conn(&path, false)?,
            };
            let r = f(&conn).map_err(StoreError::from);
            let mut pool = readers.lock().expect("reader pool");
            if pool.len() < 16 {
                pool.push(conn);
            }
            r
        })
        .await?
    }
}

/// Runs `PRAGMA wal_checkpoint(MODE)`: the log's size in frames (0 once it
/// is truncated), and whether the checkpoint could not finish.
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(i64, bool)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        let busy: i64 = r.get(0)?;
        let frames: i64 = r.get(1)?;
        Ok((frames.max(0), busy != 0))
    })
}

/// What the checkpointer and the writer share about the log.
#[derive(Default)]
struct LogState {
    /// Transactions committed (the checkpointer's "was anything written").
    commits: AtomicU64,
    /// The log has passed [`WAL_RESTART_BYTES`]: the writer truncates it
    /// between two transactions.
    too_big: AtomicBool,
}

/// Passive checkpoints every tick while there are writes: they never block
/// anyone, but under steady load they cannot let the log start over. Once the
/// log has passed [`WAL_RESTART_BYTES`] the writer is asked to truncate it.
/// Ends when the store is dropped.
fn checkpoint_loop(conn: Connection, alive: Weak<()>, log: Arc<LogState>) {
    let page_size: i64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap_or(4096);
    let mut seen = log.commits.load(Ordering::Relaxed);
    while alive.upgrade().is_some() {
        std::thread::sleep(CHECKPOINT_EVERY);
        let commits = log.commits.load(Ordering::Relaxed);
        if commits == seen {
            continue;
        }
        seen = commits;
        if let Ok((frames, _)) = checkpoint(&conn, "PASSIVE")
            && frames * page_size > WAL_RESTART_BYTES
        {
            log.too_big.store(true, Ordering::Relaxed);
        }
    }
}

/// The writer's own TRUNCATE checkpoint: it holds no transaction, so only
/// readers of an older snapshot can make it wait, and not for long (writes
/// queue meanwhile): a busy log is tried again later. True if the log is now
/// empty.
fn truncate_log(conn: &Connection) -> bool {
    let _ = conn.busy_timeout(Duration::from_millis(100));
    let done = matches!(checkpoint(conn, "TRUNCATE"), Ok((0, false)));
    let _ = conn.busy_timeout(Duration::from_secs(30));
    done
}

/// Commits waiting writes in groups; between groups, truncates the log when
/// it has grown too big or when no write came for a while (the queue is idle),
/// and once more when the store is dropped.
fn writer_loop(conn: Connection, rx: crossbeam_channel::Receiver<Op>, log: Arc<LogState>) {
    let mut log_dirty = false;
    loop {
        if log.too_big.swap(false, Ordering::Relaxed) {
            log_dirty = !truncate_log(&conn);
        }
        let first = match rx.recv_timeout(CHECKPOINT_EVERY) {
            Ok(op) => op,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if log_dirty {
                    log_dirty = !truncate_log(&conn);
                }
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                truncate_log(&conn);
                return;
            }
        };
        log_dirty = true;
        let mut ops = vec![first];
        while ops.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        if conn.execute_batch("BEGIN IMMEDIATE").is_err() {
            // No transaction to be had (the file is locked or failing): each
            // write runs on its own and answers with its own outcome.
            for (_, op) in ops {
                let (_, reply) = op(&conn);
                reply(Ok(()));
            }
            continue;
        }
        let mut replies = Vec::with_capacity(ops.len());
        for (savepoint, op) in ops {
            // A write of several statements gets its own savepoint: one that
            // fails halfway leaves nothing behind, and the others land.
            if savepoint {
                let _ = exec_cached(&conn, "SAVEPOINT op");
            }
            let (ok, reply) = op(&conn);
            if savepoint {
                if !ok {
                    let _ = exec_cached(&conn, "ROLLBACK TO op");
                }
                let _ = exec_cached(&conn, "RELEASE op");
            }
            replies.push(reply);
        }
        let commit = conn.execute_batch("COMMIT").map_err(Arc::new);
        log.commits.fetch_add(1, Ordering::Relaxed);
        if commit.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for reply in replies {
            reply(commit.clone());
        }
    }
}

/// Fills in the run list's text index a batch per transaction on the writer
/// (other writes wait for one batch at most), until it is complete, a batch
/// fails (the next open goes on from there) or the store is dropped.
fn backfill_loop(writer: crossbeam_channel::Sender<Op>, alive: Weak<()>) {
    let started = std::time::Instant::now();
    while alive.upgrade().is_some() {
        let (tx, rx) = std::sync::mpsc::channel();
        let op: Op = (
            true,
            Box::new(move |conn| {
                let r = history::backfill_text(conn, history::TEXT_BACKFILL_BATCH);
                let ok = r.is_ok();
                let reply: Reply = Box::new(move |commit| {
                    let _ = tx.send(
                        commit
                            .map_err(|e| e.to_string())
                            .and(r.map_err(|e| e.to_string())),
                    );
                });
                (ok, reply)
            }),
        );
        if writer.send(op).is_err() {
            return;
        }
        match rx.recv() {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                tracing::info!(
                    secs = started.elapsed().as_secs_f64(),
                    "the run list's text index is complete"
                );
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the run list's text index could not be filled in: text searches scan");
                return;
            }
            Err(_) => return,
        }
    }
}

/// Runs a statement kept prepared (the writer runs these for every write).
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute([])
}

fn now_text(t: &DateTime<FixedOffset>) -> String {
    t.to_rfc3339()
}

fn parse_time(s: &str) -> DateTime<FixedOffset> {
    DateTime::parse_from_rfc3339(s).unwrap_or_default()
}

fn parse_status(s: &str) -> RunStatus {
    RunStatus::from_stored(s)
}

/// An ended run's results are kept once, inside its response (see `finish`).
/// Requests and responses are read through `tp_text` (see [`packed`]).
const RUN_COLUMNS: &str = "instance, run_id, project_id, job_id, tp_text(request), webhook_url, status, accepted_at,
    CASE WHEN results IS NULL AND json_valid(tp_text(response)) THEN json_extract(tp_text(response), '$.results') ELSE results END,
    tp_text(response), error, fingerprint";

fn run_row(r: &rusqlite::Row) -> rusqlite::Result<RunRecord> {
    let run_id: String = r.get(1)?;
    Ok(RunRecord {
        key: RunKey {
            instance: r.get(0)?,
            run_id: uuid::Uuid::parse_str(&run_id).unwrap_or_default(),
        },
        project_id: r.get(2)?,
        job_id: r.get(3)?,
        request_json: r.get(4)?,
        webhook_url: r.get(5)?,
        status: parse_status(&r.get::<_, String>(6)?),
        accepted_at: parse_time(&r.get::<_, String>(7)?),
        results_json: r.get(8)?,
        response_json: r.get(9)?,
        error: r.get(10)?,
        fingerprint: r.get(11)?,
        lease_epoch: 0,
        node_id: None,
        requeues: 0,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn submit(&self, run: NewRun) -> Result<Submitted, StoreError> {
        self.write_one(move |c| {
            let inserted = c
                .prepare_cached(
                    "INSERT INTO runs (instance, run_id, project_id, job_id, request, fingerprint, webhook_url, status, accepted_at, accepted_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'Queued', ?8, ?9)
                     ON CONFLICT (instance, run_id) DO NOTHING",
                )?
                .execute(params![
                run.key.instance,
                run.key.run_id.to_string(),
                run.project_id,
                run.job_id,
                packed::pack(&run.request_json),
                run.fingerprint,
                run.webhook_url,
                    now_text(&run.accepted_at),
                    run.accepted_at.timestamp_millis(),
                ])?;
            if inserted == 1 {
                return Ok(Submitted::Accepted);
            }
            let fp: String = c
                .prepare_cached("SELECT fingerprint FROM runs WHERE instance = ?1 AND run_id = ?2")?
                .query_row(params![run.key.instance, run.key.run_id.to_string()], |r| r.get(0))?;
            Ok(if fp == run.fingerprint {
                Submitted::Duplicate
            } else {
                Submitted::Conflict
            })
        })
        .await
    }

    async fn claim_next(
        &self,
        _node: &str,
        _lease: Duration,
        limits: &ConcurrencyLimits,
    ) -> Result<Option<RunRecord>, StoreError> {
        let limits = limits.clone();
        self.write(move |c| {
            // The oldest run first; a run of a job at its limit waits (a
            // few hundred of them at most are looked past in one claim).
            let mut st = c.prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE status = 'Queued' AND {} ORDER BY rowid LIMIT ?1",
                retry::CLAIMABLE
            ))?;
            let scan = if limits.0.is_empty() { 1 } else { 256 };
            let queued: Vec<RunRecord> = st.query_map([scan], run_row)?.collect::<Result<_, _>>()?;
            let mut running = c.prepare_cached(
                "SELECT count(*) FROM runs WHERE status = 'Running' AND instance = ?1 AND project_id = ?2 AND job_id = ?3",
            )?;
            for mut rec in queued {
                if let Some(limit) = limits.of(&rec.key.instance, &rec.project_id, &rec.job_id) {
                    let n: i64 = running.query_row(
                        params![rec.key.instance, rec.project_id, rec.job_id],
                        |r| r.get(0),
                    )?;
                    if n >= i64::from(limit) {
                        continue;
                    }
                }
                c.execute(
                    "UPDATE runs SET status = 'Running', started_at = ?3 WHERE instance = ?1 AND run_id = ?2",
                    params![
                        rec.key.instance,
                        rec.key.run_id.to_string(),
                        now_text(&chrono::Local::now().fixed_offset())
                    ],
                )?;
                rec.status = RunStatus::Running;
                return Ok(Some(rec));
            }
            Ok(None)
        })
        .await
    }

    async fn save_progress(
        &self,
        key: &RunKey,
        _epoch: i64,
        results_json: &str,
    ) -> Result<bool, StoreError> {
        let (k, r) = (key.clone(), results_json.to_owned());
        self.write_one(move |c| {
            let n = c.execute(
                "UPDATE runs SET results = ?3 WHERE instance = ?1 AND run_id = ?2 AND status = 'Running'",
                params![k.instance, k.run_id.to_string(), r],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn finish(&self, key: &RunKey, when: EndIf, end: RunEnd) -> Result<bool, StoreError> {
        let k = key.clone();
        // One process holds every run: a lease is the Running status.
        let from = match when {
            EndIf::Queued => RunStatus::Queued,
            EndIf::Leased(_) => RunStatus::Running,
        };
        // Results that the response carries verbatim are not stored twice
        // (reads take them from the response).
        let embedded = end
            .response_json
            .contains(&format!("\"results\":{}", end.results_json));
        let results = (!embedded).then_some(end.results_json);
        self.write(move |c| {
            let now = chrono::Local::now().fixed_offset();
            let n = c.execute(
                "UPDATE runs SET status = ?3, results = ?4, response = ?5, error = ?6, finished_at = ?7
                 WHERE instance = ?1 AND run_id = ?2 AND status = ?8",
                params![
                    k.instance,
                    k.run_id.to_string(),
                    end.status.to_string(),
                    results,
                    packed::pack(&end.response_json),
                    end.error,
                    now_text(&now),
                    from.to_string(),
                ],
            )?;
            if n == 0 {
                return Ok(false);
            }
            c.execute(
                "INSERT OR IGNORE INTO webhooks (instance, run_id, url, body, created_at, next_attempt_at)
                 SELECT instance, run_id, webhook_url, ?3, ?4, ?4 FROM runs
                 WHERE instance = ?1 AND run_id = ?2 AND webhook_url IS NOT NULL",
                params![k.instance, k.run_id.to_string(), end.webhook_json, now_text(&now)],
            )?;
            Ok(true)
        })
        .await
    }

    async fn retry_later(
        &self,
        key: &RunKey,
        _epoch: i64,
        retry: super::retry::RetryLater,
    ) -> Result<bool, StoreError> {
        self.retry_later_sqlite(key, retry).await
    }

    async fn retry_state(&self, key: &RunKey) -> Result<super::retry::RetryState, StoreError> {
        self.retry_state_sqlite(key).await
    }

    async fn run(&self, key: &RunKey) -> Result<Option<RunRecord>, StoreError> {
        let k = key.clone();
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE instance = ?1 AND run_id = ?2"),
                params![k.instance, k.run_id.to_string()],
                run_row,
            )
            .optional()
        })
        .await
    }

    async fn runs_in(&self, status: RunStatus) -> Result<Vec<RunRecord>, StoreError> {
        self.read(move |c| {
            // The status written out, not bound: only then can SQLite use the
            // partial index of Queued or Running runs (ended ones have none).
            let status = match status {
                RunStatus::Queued => "Queued",
                RunStatus::Running => "Running",
                RunStatus::Complete => "Complete",
                RunStatus::Failed => "Failed",
                RunStatus::Cancelled => "Cancelled",
            };
            let mut st = c.prepare(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE status = '{status}' ORDER BY rowid"
            ))?;
            st.query_map([], run_row)?.collect()
        })
        .await
    }

    async fn queued_count(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT count(*) FROM runs WHERE status = 'Queued'",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| n as u64)
    }

    async fn purge_ended(
        &self,
        cutoff: DateTime<FixedOffset>,
        limit: usize,
    ) -> Result<Purged, StoreError> {
        let after = *self.purge_cursor.lock().expect("purge cursor");
        // Candidates are read off the writer, in the order runs were accepted;
        // the sweep stops at the first run accepted after the cutoff.
        let scan = limit.saturating_mul(4).max(64);
        let rows = self
            .read(move |c| {
                c.prepare_cached(
                    "SELECT rowid, instance, run_id, status, accepted_at, finished_at FROM runs
                     WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
                )?
                .query_map(params![after, scan as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        parse_status(&r.get::<_, String>(3)?),
                        parse_time(&r.get::<_, String>(4)?),
                        r.get::<_, Option<String>>(5)?.map(|t| parse_time(&t)),
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        let mut more = rows.len() == scan;
        let mut cursor = after;
        let mut picked = Vec::new();
        for (rowid, instance, run_id, status, accepted, finished) in rows {
            if accepted >= cutoff {
                more = false;
                break;
            }
            cursor = rowid;
            let ended = !matches!(status, RunStatus::Queued | RunStatus::Running);
            if ended && finished.is_some_and(|f| f < cutoff) {
                picked.push((instance, run_id));
                if picked.len() >= limit {
                    more = true;
                    break;
                }
            }
        }
        *self.purge_cursor.lock().expect("purge cursor") = if more { cursor } else { 0 };
        if picked.is_empty() {
            return Ok(Purged { deleted: 0, more });
        }
        let deleted = self
            .write(move |c| {
                let mut deleted = 0;
                for (instance, run_id) in picked {
                    // Checked again here: the run is ended and its webhook is
                    // not pending, whatever happened since it was read.
                    let n = c
                        .prepare_cached(
                            "DELETE FROM runs WHERE instance = ?1 AND run_id = ?2
                               AND status IN ('Complete', 'Failed', 'Cancelled')
                               AND NOT EXISTS (SELECT 1 FROM webhooks w
                                 WHERE w.instance = ?1 AND w.run_id = ?2 AND w.state = 'pending')",
                        )?
                        .execute(params![instance, run_id])?;
                    if n == 1 {
                        deleted += 1;
                        c.prepare_cached(
                            "DELETE FROM webhooks WHERE instance = ?1 AND run_id = ?2",
                        )?
                        .execute(params![instance, run_id])?;
                        // The run's stored log and row errors (keyed by the run
                        // first, so each is one range of its primary key).
                        for table in [
                            "webhook_attempts",
                            "run_log",
                            "run_row_errors",
                            "run_error_totals",
                        ] {
                            c.prepare_cached(&format!(
                                "DELETE FROM {table} WHERE instance = ?1 AND run_id = ?2"
                            ))?
                            .execute(params![instance, run_id])?;
                        }
                    }
                }
                Ok(deleted)
            })
            .await?;
        Ok(Purged { deleted, more })
    }

    async fn checkpoint(&self) -> Result<(), StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || Self::empty_log(&path, Duration::from_secs(2))).await?
    }

    async fn due_webhooks(
        &self,
        now: DateTime<FixedOffset>,
        limit: usize,
    ) -> Result<Vec<WebhookDue>, StoreError> {
        self.read(move |c| {
            let mut st = c.prepare(
                "SELECT instance, run_id, url, body, attempts, created_at, next_attempt_at FROM webhooks
                 WHERE state = 'pending' ORDER BY next_attempt_at LIMIT ?1",
            )?;
            let rows = st.query_map([limit as i64], |r| {
                let run_id: String = r.get(1)?;
                let next: String = r.get(6)?;
                Ok((
                    WebhookDue {
                        key: RunKey {
                            instance: r.get(0)?,
                            run_id: uuid::Uuid::parse_str(&run_id).unwrap_or_default(),
                        },
                        url: r.get(2)?,
                        body: r.get(3)?,
                        attempts: r.get(4)?,
                        created_at: parse_time(&r.get::<_, String>(5)?),
                    },
                    parse_time(&next),
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (due, next) = row?;
                if next <= now {
                    out.push(due);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn record_attempt(
        &self,
        key: &RunKey,
        attempt: WebhookAttempt,
        next: WebhookNext,
    ) -> Result<(), StoreError> {
        let k = key.clone();
        self.write(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO webhook_attempts (instance, run_id, attempt, at, status_code, error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    k.instance,
                    k.run_id.to_string(),
                    attempt.attempt,
                    now_text(&attempt.at),
                    attempt.status_code,
                    attempt.error
                ],
            )?;
            let (state, next_at) = match next {
                WebhookNext::Delivered => ("delivered", None),
                WebhookNext::GiveUp => ("failed", None),
                WebhookNext::RetryAt(t) => ("pending", Some(now_text(&t))),
            };
            c.execute(
                "UPDATE webhooks SET attempts = ?3, state = ?4, next_attempt_at = ?5 WHERE instance = ?1 AND run_id = ?2",
                params![k.instance, k.run_id.to_string(), attempt.attempt, state, next_at],
            )?;
            Ok(())
        })
        .await
    }

    async fn attempts(&self, key: &RunKey) -> Result<Vec<WebhookAttempt>, StoreError> {
        let k = key.clone();
        self.read(move |c| {
            let mut st = c.prepare(
                "SELECT attempt, at, status_code, error FROM webhook_attempts
                 WHERE instance = ?1 AND run_id = ?2 ORDER BY attempt",
            )?;
            st.query_map(params![k.instance, k.run_id.to_string()], |r| {
                Ok(WebhookAttempt {
                    attempt: r.get(0)?,
                    at: parse_time(&r.get::<_, String>(1)?),
                    status_code: r.get(2)?,
                    error: r.get(3)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn put_user(&self, user: UserRecord) -> Result<(), StoreError> {
        self.write(move |c| {
            let grants = serde_json::to_string(&user.grants).unwrap_or_else(|_| "[]".into());
            c.execute(
                "INSERT OR REPLACE INTO users (name, password_hash, primary_instance, grants) VALUES (?1, ?2, ?3, ?4)",
                params![user.name, user.password_hash, user.primary_instance, grants],
            )?;
            c.execute("DELETE FROM tokens WHERE user = ?1", [&user.name])?;
            Ok(())
        })
        .await
        .inspect(|_| super::note_revocation())
    }

    async fn set_password(&self, name: &str, password_hash: &str) -> Result<bool, StoreError> {
        let (n, h) = (name.to_owned(), password_hash.to_owned());
        self.write(move |c| {
            let found = c.execute(
                "UPDATE users SET password_hash = ?2 WHERE name = ?1",
                [&n, &h],
            )? > 0;
            c.execute("DELETE FROM tokens WHERE user = ?1", [&n])?;
            Ok(found)
        })
        .await
        .inspect(|_| super::note_revocation())
    }

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        let name = name.to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT name, password_hash, primary_instance, grants FROM users WHERE name = ?1",
                [name],
                |r| {
                    let grants: String = r.get(3)?;
                    Ok(UserRecord {
                        name: r.get(0)?,
                        password_hash: r.get(1)?,
                        primary_instance: r.get(2)?,
                        grants: serde_json::from_str::<Vec<(String, Role)>>(&grants)
                            .unwrap_or_default(),
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn has_users(&self) -> Result<bool, StoreError> {
        self.read(|c| c.query_row("SELECT EXISTS (SELECT 1 FROM users)", [], |r| r.get(0)))
            .await
    }

    async fn put_api_key(&self, key_hash: &str, user: &str, label: &str) -> Result<(), StoreError> {
        let (h, u, l) = (key_hash.to_owned(), user.to_owned(), label.to_owned());
        self.write(move |c| {
            c.execute(
                "INSERT INTO api_keys (key_hash, user, label) VALUES (?1, ?2, ?3)",
                params![h, u, l],
            )?;
            Ok(())
        })
        .await
    }

    async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.read(|c| {
            c.prepare("SELECT key_hash, user, label FROM api_keys ORDER BY user, label")?
                .query_map([], |r| {
                    Ok(ApiKeyRecord {
                        key_hash: r.get(0)?,
                        user: r.get(1)?,
                        label: r.get(2)?,
                    })
                })?
                .collect()
        })
        .await
    }

    async fn remove_api_key(&self, key_hash: &str) -> Result<bool, StoreError> {
        let h = key_hash.to_owned();
        self.write(move |c| Ok(c.execute("DELETE FROM api_keys WHERE key_hash = ?1", [h])? > 0))
            .await
            .inspect(|_| super::note_revocation())
    }

    async fn remove_user(&self, name: &str) -> Result<bool, StoreError> {
        let n = name.to_owned();
        self.write(move |c| {
            c.execute("DELETE FROM api_keys WHERE user = ?1", [&n])?;
            c.execute("DELETE FROM tokens WHERE user = ?1", [&n])?;
            Ok(c.execute("DELETE FROM users WHERE name = ?1", [&n])? > 0)
        })
        .await
        .inspect(|_| super::note_revocation())
    }

    async fn api_key_user(&self, key_hash: &str) -> Result<Option<String>, StoreError> {
        let h = key_hash.to_owned();
        self.read(move |c| {
            c.query_row("SELECT user FROM api_keys WHERE key_hash = ?1", [h], |r| {
                r.get(0)
            })
            .optional()
        })
        .await
    }

    async fn put_token(
        &self,
        token_hash: &str,
        user: &str,
        expires: DateTime<FixedOffset>,
        keep: usize,
    ) -> Result<(), StoreError> {
        let (h, u) = (token_hash.to_owned(), user.to_owned());
        // The token just issued always stays.
        let keep = i64::try_from(keep.max(1)).unwrap_or(i64::MAX);
        self.write(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO tokens (token_hash, user, expires_at) VALUES (?1, ?2, ?3)",
                params![h, u, now_text(&expires)],
            )?;
            // Every token lives equally long: the newest rows expire last.
            c.execute(
                "DELETE FROM tokens WHERE user = ?1 AND (julianday(expires_at) < julianday('now')
                   OR rowid NOT IN (SELECT rowid FROM tokens WHERE user = ?1
                                    ORDER BY rowid DESC LIMIT ?2))",
                params![u, keep],
            )?;
            Ok(())
        })
        .await
    }

    async fn heartbeat(&self, node: &NodeInfo) -> Result<(), StoreError> {
        let now = chrono::Local::now().fixed_offset();
        self.nodes
            .lock()
            .expect("nodes lock")
            .insert(node.node_id.clone(), (node.clone(), now, false));
        Ok(())
    }

    async fn node_stopped(&self, node_id: &str) -> Result<(), StoreError> {
        if let Some(n) = self.nodes.lock().expect("nodes lock").get_mut(node_id) {
            n.2 = true;
        }
        Ok(())
    }

    async fn forget_nodes(&self, silent_for: std::time::Duration) -> Result<u64, StoreError> {
        let Ok(silent_for) = chrono::Duration::from_std(silent_for) else {
            return Ok(0);
        };
        let now = chrono::Local::now().fixed_offset();
        let mut nodes = self.nodes.lock().expect("nodes lock");
        let before = nodes.len();
        nodes.retain(|_, (_, at, _)| now - *at < silent_for);
        Ok((before - nodes.len()) as u64)
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let now = chrono::Local::now().fixed_offset();
        Ok(self
            .nodes
            .lock()
            .expect("nodes lock")
            .values()
            .map(|(info, at, stopped)| NodeRecord {
                info: info.clone(),
                heartbeat_at: *at,
                silent_secs: (now - *at).num_milliseconds() as f64 / 1000.0,
                stopped: *stopped,
            })
            .collect())
    }

    async fn token_user(
        &self,
        token_hash: &str,
        now: DateTime<FixedOffset>,
    ) -> Result<Option<(String, DateTime<FixedOffset>)>, StoreError> {
        let h = token_hash.to_owned();
        self.read(move |c| {
            let row: Option<(String, String)> = c
                .query_row(
                    "SELECT user, expires_at FROM tokens WHERE token_hash = ?1",
                    [h],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(row.and_then(|(u, exp)| {
                let exp = parse_time(&exp);
                (exp > now).then_some((u, exp))
            }))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RunKey {
        RunKey {
            instance: "default".into(),
            run_id: uuid::Uuid::new_v4(),
        }
    }

    async fn queued(store: &SqliteStore, webhook: Option<&str>) -> RunKey {
        let k = key();
        let run = NewRun {
            key: k.clone(),
            project_id: "p".into(),
            job_id: "j".into(),
            request_json: "{}".into(),
            fingerprint: k.run_id.to_string(),
            webhook_url: webhook.map(str::to_owned),
            accepted_at: chrono::Local::now().fixed_offset(),
        };
        assert_eq!(store.submit(run).await.unwrap(), Submitted::Accepted);
        k
    }

    async fn queued_of(store: &SqliteStore, job: &str) -> RunKey {
        let k = key();
        let run = NewRun {
            key: k.clone(),
            project_id: "p".into(),
            job_id: job.into(),
            request_json: "{}".into(),
            fingerprint: k.run_id.to_string(),
            webhook_url: None,
            accepted_at: chrono::Local::now().fixed_offset(),
        };
        assert_eq!(store.submit(run).await.unwrap(), Submitted::Accepted);
        k
    }

    #[tokio::test]
    async fn a_job_at_its_limit_waits_and_others_pass_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).unwrap();
        let mut limits = ConcurrencyLimits::default();
        limits
            .0
            .insert(("default".into(), "p".into(), "one".into()), 1);
        let lease = Duration::from_secs(15);
        let first = queued_of(&store, "one").await;
        let second = queued_of(&store, "one").await;
        let other = queued_of(&store, "free").await;
        let claim = || store.claim_next("n", lease, &limits);
        assert_eq!(claim().await.unwrap().unwrap().key, first);
        // The second run of "one" is older than "free"'s, but its job is full.
        assert_eq!(claim().await.unwrap().unwrap().key, other);
        assert!(claim().await.unwrap().is_none());
        let end = RunEnd {
            status: RunStatus::Complete,
            results_json: "[]".into(),
            response_json: "{}".into(),
            webhook_json: "{}".into(),
            error: None,
        };
        assert!(store.finish(&first, EndIf::Leased(0), end).await.unwrap());
        assert_eq!(claim().await.unwrap().unwrap().key, second);
    }

    /// A run submitted, claimed and ended Complete.
    async fn ended(store: &SqliteStore, webhook: Option<&str>) -> RunKey {
        let k = queued(store, webhook).await;
        let claimed = store
            .claim_next("n", Duration::from_secs(15), &ConcurrencyLimits::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claimed.key, k);
        let results = format!(
            r#"[{{"jobID":"j","runID":"{}","status":"Complete"}}]"#,
            k.run_id
        );
        let end = RunEnd {
            status: RunStatus::Complete,
            response_json: format!(r#"{{"status":"Complete","results":{results},"log":[]}}"#),
            results_json: results,
            webhook_json: "{}".into(),
            error: None,
        };
        assert!(store.finish(&k, EndIf::Leased(0), end).await.unwrap());
        k
    }

    fn later() -> DateTime<FixedOffset> {
        chrono::Local::now().fixed_offset() + chrono::Duration::hours(1)
    }

    #[tokio::test]
    async fn a_user_keeps_a_bounded_number_of_tokens_and_expired_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).unwrap();
        let now = chrono::Local::now().fixed_offset();
        let later = now + chrono::Duration::hours(1);
        // Nanoseconds in the stored time: SQLite's date functions read them.
        let gone = now - chrono::Duration::nanoseconds(1_500_000_001);
        store.put_token("old", "ann", gone, 3).await.unwrap();
        store.put_token("bob1", "bob", later, 3).await.unwrap();
        let count = || {
            store.read(|c| {
                c.query_row("SELECT count(*) FROM tokens WHERE user = 'ann'", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
        };
        store.put_token("t1", "ann", later, 3).await.unwrap();
        assert_eq!(count().await.unwrap(), 1, "the expired token is forgotten");
        for t in ["t2", "t3", "t4", "t5"] {
            store.put_token(t, "ann", later, 3).await.unwrap();
        }
        let live = |t: &'static str| {
            let store = &store;
            async move { store.token_user(t, now).await.unwrap().is_some() }
        };
        let kept = [
            live("t1").await,
            live("t2").await,
            live("t3").await,
            live("t4").await,
            live("t5").await,
        ];
        assert_eq!(kept, [false, false, true, true, true]);
        assert!(live("bob1").await, "another user's tokens are not touched");
        assert_eq!(count().await.unwrap(), 3);
        // 0 means at least the new token.
        store.put_token("t6", "ann", later, 0).await.unwrap();
        assert!(live("t6").await);
        assert!(!live("t5").await);
    }

    #[tokio::test]
    async fn a_failed_write_keeps_the_databases_error_and_its_code() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).unwrap();
        let k = key();
        // No project_id: the NOT NULL constraint refuses the row.
        let e = store
            .write(move |c| {
                c.execute(
                    "INSERT INTO runs (instance, run_id) VALUES (?1, ?2)",
                    rusqlite::params![k.instance, k.run_id.to_string()],
                )
            })
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Database(_)), "{e:?}");
        assert_eq!(e.class(), Some(rusqlite::ErrorCode::ConstraintViolation));
        assert_eq!(e.code(), Some(rusqlite::ffi::SQLITE_CONSTRAINT_NOTNULL));
        assert!(e.to_string().starts_with("store: "), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(StoreError::Closed.code(), None);
    }

    #[tokio::test]
    async fn purge_deletes_ended_runs_but_not_queued_ones_or_pending_webhooks() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).unwrap();
        let plain = ended(&store, None).await;
        let pending = ended(&store, Some("http://127.0.0.1:9/hook")).await;
        let delivered = ended(&store, Some("http://127.0.0.1:9/hook")).await;
        let attempt = WebhookAttempt {
            attempt: 1,
            at: chrono::Local::now().fixed_offset(),
            status_code: Some(200),
            error: None,
        };
        store
            .record_attempt(&delivered, attempt, WebhookNext::Delivered)
            .await
            .unwrap();
        let waiting = queued(&store, None).await;

        // Nothing ended before a cutoff in the past.
        let past = chrono::Local::now().fixed_offset() - chrono::Duration::hours(1);
        assert_eq!(store.purge_ended(past, 10).await.unwrap().deleted, 0);

        let step = store.purge_ended(later(), 10).await.unwrap();
        assert_eq!(
            step,
            Purged {
                deleted: 2,
                more: false
            }
        );
        assert!(store.run(&plain).await.unwrap().is_none());
        assert!(store.run(&delivered).await.unwrap().is_none());
        assert!(store.attempts(&delivered).await.unwrap().is_empty());
        assert!(store.run(&pending).await.unwrap().is_some());
        assert!(store.run(&waiting).await.unwrap().is_some());
        assert_eq!(store.due_webhooks(later(), 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn purge_goes_in_batches_and_starts_over_after_a_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).unwrap();
        for _ in 0..10 {
            ended(&store, None).await;
        }
        let mut steps = Vec::new();
        loop {
            let step = store.purge_ended(later(), 3).await.unwrap();
            steps.push(step.deleted);
            if !step.more {
                break;
            }
        }
        assert_eq!(steps.iter().sum::<u64>(), 10, "{steps:?}");
        assert!(steps.iter().all(|&n| n <= 3), "{steps:?}");
        // A new sweep finds the runs that ended since.
        ended(&store, None).await;
        assert_eq!(store.purge_ended(later(), 3).await.unwrap().deleted, 1);
    }

    #[tokio::test]
    async fn an_ended_run_keeps_its_results_once_and_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let store = SqliteStore::open(&path).unwrap();
        let k = ended(&store, None).await;
        let rec = store.run(&k).await.unwrap().unwrap();
        let results: serde_json::Value =
            serde_json::from_str(rec.results_json.as_deref().unwrap()).unwrap();
        assert_eq!(results[0]["status"], "Complete");
        assert_eq!(results[0]["runID"], k.run_id.to_string());
        let raw = open_conn(&path, false).unwrap();
        let stored: Option<String> = raw
            .query_row("SELECT results FROM runs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, None, "results stored twice");
    }

    #[tokio::test]
    async fn the_log_is_empty_once_writes_pause_and_after_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let wal = dir.path().join("s.sqlite-wal");
        let store = SqliteStore::open(&path).unwrap();
        for _ in 0..20 {
            queued(&store, None).await;
        }
        store.checkpoint().await.unwrap();
        assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0);
        for _ in 0..20 {
            queued(&store, None).await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > 0 {
            assert!(std::time::Instant::now() < deadline, "the log stayed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
