//! [`RunHistory`] on SQLite: the run list's indexes, the log and row-error tables.

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter, types::Value as Sql};

use super::{SqliteStore, now_text, parse_status, parse_time};
use crate::store::history::{
    RowErrorTotals, RunCursor, RunDetails, RunFilter, RunHistory, RunListed, StoredLogLine,
    StoredRowError,
};
use crate::store::{NewRun, RunEnd, RunKey, StoreError, Submitted};

/// The run list's indexes and the tables a run's details are paged from.
const HISTORY_SCHEMA: &str = r#"
CREATE INDEX IF NOT EXISTS runs_recent ON runs(instance, accepted_ms, run_id);
CREATE INDEX IF NOT EXISTS runs_recent_status ON runs(instance, status, accepted_ms, run_id);
CREATE INDEX IF NOT EXISTS runs_recent_project ON runs(instance, project_id, accepted_ms, run_id);
CREATE INDEX IF NOT EXISTS runs_recent_job ON runs(instance, project_id, job_id, accepted_ms, run_id);
CREATE TABLE IF NOT EXISTS run_log (
  instance TEXT NOT NULL,
  run_id   TEXT NOT NULL,
  seq      INTEGER NOT NULL,
  time     TEXT NOT NULL,
  level    INTEGER NOT NULL,
  job      TEXT NOT NULL,
  row      INTEGER,
  message  TEXT NOT NULL,
  PRIMARY KEY (instance, run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_row_errors (
  instance   TEXT NOT NULL,
  run_id     TEXT NOT NULL,
  seq        INTEGER NOT NULL,
  job        TEXT NOT NULL,
  row        INTEGER NOT NULL,
  stage      INTEGER NOT NULL,
  stage_name TEXT,
  message    TEXT NOT NULL,
  origin     TEXT NOT NULL,
  PRIMARY KEY (instance, run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_error_totals (
  instance TEXT NOT NULL,
  run_id   TEXT NOT NULL,
  total    INTEGER NOT NULL,
  kept     INTEGER NOT NULL,
  PRIMARY KEY (instance, run_id)
) WITHOUT ROWID;
"#;

/// The run list's text index: each run's argument cut in trigrams (any three
/// characters of it find it, case folded), keyed by the run's rowid. It keeps
/// its own copy of the argument, so a delete needs only the rowid and any
/// SQLite from 3.34 (trigram) reads and writes the file.
/// `runs_text_backfill` holds how far the runs a store had before the index
/// are indexed (no row: all of them).
const TEXT_INDEX_SCHEMA: &str = r#"
CREATE VIRTUAL TABLE runs_text USING fts5(argument, tokenize = 'trigram');
CREATE TABLE runs_text_backfill (next_rowid INTEGER NOT NULL, upto INTEGER NOT NULL);
INSERT INTO runs_text_backfill SELECT 0, max(rowid) FROM runs HAVING max(rowid) IS NOT NULL;
"#;

/// The argument of a run's stored request (NULL if it has none).
macro_rules! argument_of {
    ($request:literal) => {
        concat!(
            "CASE WHEN json_valid(tp_text(",
            $request,
            ")) THEN json_extract(tp_text(",
            $request,
            "), '$.argument') END"
        )
    };
}

/// Keeps the text index in step with every insert and delete of a run
/// (submit, a run recorded ended, the retention purge, and anything else that
/// writes the file). A run's request is never updated.
/// The insert trigger is made anew at each open: one from before requests
/// were packed would read a packed request as no argument.
const TEXT_TRIGGERS: &str = concat!(
    "DROP TRIGGER IF EXISTS runs_text_insert;
     CREATE TRIGGER runs_text_insert AFTER INSERT ON runs BEGIN
       INSERT INTO runs_text (rowid, argument) SELECT new.rowid, a FROM (SELECT ",
    argument_of!("new.request"),
    " AS a) WHERE a IS NOT NULL AND a <> '';
     END;
     CREATE TRIGGER IF NOT EXISTS runs_text_delete AFTER DELETE ON runs BEGIN
       DELETE FROM runs_text WHERE rowid = old.rowid;
     END;"
);

/// Runs indexed per transaction while the text index is filled in.
pub(super) const TEXT_BACKFILL_BATCH: i64 = 5000;

/// Adds the text index (and its triggers) to a store file that lacks it; the
/// runs already there are indexed later, by [`backfill_text`].
fn text_index_schema(conn: &Connection) -> rusqlite::Result<()> {
    let tx = conn.unchecked_transaction()?;
    let exists: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'runs_text')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        tx.execute_batch(TEXT_INDEX_SCHEMA)?;
    }
    tx.execute_batch(TEXT_TRIGGERS)?;
    tx.commit()
}

/// Whether runs a store held before its text index are still being indexed.
pub(super) fn text_backfill_pending(c: &Connection) -> rusqlite::Result<bool> {
    c.prepare_cached("SELECT EXISTS (SELECT 1 FROM runs_text_backfill)")?
        .query_row([], |r| r.get(0))
}

/// Indexes the text of the next `batch` runs that predate the text index.
/// False once there are none left (the index is then complete).
pub(super) fn backfill_text(c: &Connection, batch: i64) -> rusqlite::Result<bool> {
    let state: Option<(i64, i64)> = c
        .query_row("SELECT next_rowid, upto FROM runs_text_backfill", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((next, upto)) = state else {
        return Ok(false);
    };
    let last: Option<i64> = c.query_row(
        "SELECT max(rowid) FROM (SELECT rowid FROM runs WHERE rowid > ?1 AND rowid <= ?2
           ORDER BY rowid LIMIT ?3)",
        params![next, upto, batch],
        |r| r.get(0),
    )?;
    let Some(last) = last else {
        c.execute("DELETE FROM runs_text_backfill", [])?;
        return Ok(false);
    };
    // OR REPLACE: a run the trigger indexed already (a rowid reused) is indexed once.
    c.execute(
        concat!(
            "INSERT OR REPLACE INTO runs_text (rowid, argument) SELECT rowid, a FROM (SELECT rowid, ",
            argument_of!("request"),
            " AS a FROM runs WHERE rowid > ?1 AND rowid <= ?2) WHERE a IS NOT NULL AND a <> ''"
        ),
        params![next, last],
    )?;
    c.execute("UPDATE runs_text_backfill SET next_rowid = ?1", [last])?;
    Ok(true)
}

/// Adds what run history needs to a store file (old files included).
pub(super) fn history_schema(conn: &Connection) -> rusqlite::Result<()> {
    let has_ms: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_xinfo('runs') WHERE name = 'accepted_ms')",
        [],
        |r| r.get(0),
    )?;
    if !has_ms {
        // A plain column written with each run (not one SQLite computes from
        // the text: SQLite versions differ in how they round fractions, and
        // an index must never disagree with its table).
        conn.execute_batch("ALTER TABLE runs ADD COLUMN accepted_ms INTEGER")?;
    }
    // Runs written before the column (or by an older tidepool) get it here, once.
    conn.execute_batch(
        "UPDATE runs SET accepted_ms = CAST(round((julianday(accepted_at) - 2440587.5) * 86400000.0) AS INTEGER)
         WHERE accepted_ms IS NULL",
    )?;
    conn.execute_batch(HISTORY_SCHEMA)?;
    text_index_schema(conn)
}

/// How long a text search of the run list may scan.
const TEXT_SEARCH_BUDGET: std::time::Duration = std::time::Duration::from_secs(3);

const LIST_COLUMNS: &str =
    "instance, run_id, project_id, job_id, status, accepted_at, started_at, finished_at,
  coalesce(substr(json_extract(tp_text(request), '$.argument'), 1, 500), ''),
  CASE WHEN results IS NULL AND json_valid(tp_text(response)) THEN json_extract(tp_text(response), '$.results') ELSE results END,
  error, accepted_ms";

fn listed_row(r: &rusqlite::Row) -> rusqlite::Result<RunListed> {
    let instance: String = r.get(0)?;
    let run_id: String = r.get(1)?;
    let time = |i: usize| -> rusqlite::Result<Option<chrono::DateTime<chrono::FixedOffset>>> {
        Ok(r.get::<_, Option<String>>(i)?.map(|t| parse_time(&t)))
    };
    Ok(RunListed {
        key: RunKey {
            instance: instance.clone(),
            run_id: uuid::Uuid::parse_str(&run_id).unwrap_or_default(),
        },
        project_id: r.get(2)?,
        job_id: r.get(3)?,
        status: parse_status(&r.get::<_, String>(4)?),
        accepted_at: parse_time(&r.get::<_, String>(5)?),
        started_at: time(6)?,
        finished_at: time(7)?,
        argument: r.get(8)?,
        results_json: r.get(9)?,
        error: r.get(10)?,
        cursor: RunCursor {
            accepted_ms: r.get::<_, Option<i64>>(11)?.unwrap_or(0),
            instance,
            run_id,
        },
    })
}

/// The instances that have runs, one index seek each (not a scan).
fn run_instances(c: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut st = c.prepare_cached(
        "WITH RECURSIVE i(name) AS (
           SELECT min(instance) FROM runs
           UNION ALL
           SELECT (SELECT min(instance) FROM runs WHERE instance > i.name) FROM i WHERE i.name IS NOT NULL)
         SELECT name FROM i WHERE name IS NOT NULL",
    )?;
    st.query_map([], |r| r.get(0))?.collect()
}

/// A query's text and its arguments, built a condition at a time.
#[derive(Clone)]
struct Query {
    sql: String,
    args: Vec<Sql>,
}

impl Query {
    fn and(&mut self, cond: &str, args: impl IntoIterator<Item = Sql>) {
        self.sql.push_str(" AND ");
        self.sql.push_str(cond);
        self.args.extend(args);
    }
}

/// How the list looks for the text an argument contains.
enum TextSearch {
    /// By reading each run's argument.
    Scan(String),
    /// Through the text index, which finds few runs (at most [`FEW_MATCHES`]
    /// in the store): they are read by rowid and sorted.
    Few(String),
    /// Through the text index, which finds many runs: the newest runs of the
    /// filter are read first, as by a scan, while that soon fills a page;
    /// else they are read newest first and kept if the index found them.
    Many {
        /// The FTS5 query.
        phrase: String,
        /// The text, for the scan.
        text: String,
    },
}

/// The shortest text the index finds (one trigram); shorter text is scanned for.
const INDEXED_TEXT_MIN_CHARS: usize = 3;

/// At most this many runs found by the text index are read and sorted.
const FEW_MATCHES: i64 = 1000;

/// Virtual machine steps between two calls of a search's progress handler.
const PROGRESS_STEPS: i32 = 1000;

/// How many [`PROGRESS_STEPS`] the scan for common text may take before the
/// text index is asked instead: about 8 steps a run, so some 12,000 runs (a
/// page of text in 1 % of them; reading the index's matches for it costs more).
const COMMON_SCAN_STEPS: u32 = 100;

/// How `text` is looked for: through the index once it is complete and the
/// text has a trigram, else by a scan.
fn text_search(c: &Connection, text: &str) -> rusqlite::Result<TextSearch> {
    if text.chars().count() < INDEXED_TEXT_MIN_CHARS || text_backfill_pending(c)? {
        return Ok(TextSearch::Scan(text.to_owned()));
    }
    // One quoted FTS5 string: every character in it is literal (a quote
    // doubled), and its trigrams must follow each other: a substring.
    let phrase = format!("\"{}\"", text.replace('"', "\"\""));
    let found: i64 = c
        .prepare_cached(
            "SELECT count(*) FROM (SELECT 1 FROM runs_text WHERE runs_text MATCH ?1 LIMIT ?2)",
        )?
        .query_row(params![phrase, FEW_MATCHES + 1], |r| r.get(0))?;
    Ok(if found <= FEW_MATCHES {
        TextSearch::Few(phrase)
    } else {
        TextSearch::Many {
            phrase,
            text: text.to_owned(),
        }
    })
}

/// The conditions of one instance's page but the text, from `AND`s on.
fn conditions(instance: &str, f: &RunFilter) -> Query {
    let mut q = Query {
        sql: String::new(),
        args: Vec::new(),
    };
    q.and("instance = ?", [Sql::Text(instance.to_owned())]);
    if let Some(p) = &f.project_id {
        q.and("project_id = ?", [Sql::Text(p.clone())]);
    }
    if let Some(j) = &f.job_id {
        q.and("job_id = ?", [Sql::Text(j.clone())]);
    }
    if let Some(s) = f.status {
        q.and("status = ?", [Sql::Text(s.to_string())]);
    }
    if let Some(t) = f.since {
        q.and("accepted_ms >= ?", [Sql::Integer(t.timestamp_millis())]);
    }
    if let Some(t) = f.until {
        q.and("accepted_ms <= ?", [Sql::Integer(t.timestamp_millis())]);
    }
    if let Some(cur) = &f.after {
        // The order is (accepted_ms, instance, run_id), newest first.
        let ms = Sql::Integer(cur.accepted_ms);
        match instance.cmp(cur.instance.as_str()) {
            std::cmp::Ordering::Less => q.and("accepted_ms <= ?", [ms]),
            std::cmp::Ordering::Greater => q.and("accepted_ms < ?", [ms]),
            std::cmp::Ordering::Equal => q.and(
                "(accepted_ms, run_id) < (?, ?)",
                [ms, Sql::Text(cur.run_id.clone())],
            ),
        }
    }
    q
}

/// The condition of a scan for `t`: the raw request text first (cheap),
/// where the argument's JSON escaping cannot hide a match; then the argument
/// itself. `instr`, not LIKE: the user's % and _ are plain characters.
fn scan_for(q: &mut Query, t: &str) {
    if !t.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
        q.and(
            "instr(lower(tp_text(request)), lower(?)) > 0",
            [Sql::Text(t.to_owned())],
        );
    }
    q.and(
        "instr(lower(json_extract(tp_text(request), '$.argument')), lower(?)) > 0",
        [Sql::Text(t.to_owned())],
    );
}

/// Runs one page's query; `stop` (asked every [`PROGRESS_STEPS`]) may interrupt it.
fn page(
    c: &Connection,
    from: &str,
    mut q: Query,
    limit: usize,
    stop: Option<Box<dyn FnMut() -> bool + Send>>,
) -> rusqlite::Result<Vec<RunListed>> {
    let sql = format!(
        "SELECT {LIST_COLUMNS} FROM {from} WHERE true{} ORDER BY accepted_ms DESC, run_id DESC LIMIT ?",
        q.sql
    );
    q.args.push(Sql::Integer(limit as i64 + 1));
    let watched = stop.is_some();
    if let Some(stop) = stop {
        c.progress_handler(PROGRESS_STEPS, Some(stop))?;
    }
    let rows = c.prepare_cached(&sql).and_then(|mut st| {
        st.query_map(params_from_iter(q.args), listed_row)?
            .collect()
    });
    if watched {
        c.progress_handler(0, None::<fn() -> bool>)?;
    }
    rows
}

fn interrupted(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted)
}

/// One instance's page: each instance is read through its own index range,
/// newest first, so a page costs `limit` rows per instance whatever the store
/// holds (text aside). A text search stops at `deadline`.
fn list_in(
    c: &Connection,
    instance: &str,
    f: &RunFilter,
    text: Option<&TextSearch>,
    deadline: std::time::Instant,
) -> rusqlite::Result<Vec<RunListed>> {
    let mut q = conditions(instance, f);
    let budget = move || -> Option<Box<dyn FnMut() -> bool + Send>> {
        Some(Box::new(move || std::time::Instant::now() > deadline))
    };
    match text {
        None => page(c, "runs", q, f.limit, None),
        Some(TextSearch::Scan(t)) => {
            scan_for(&mut q, t);
            page(c, "runs", q, f.limit, budget())
        }
        Some(TextSearch::Few(phrase)) => {
            let mut found = Query {
                sql: " AND runs_text MATCH ?".into(),
                args: vec![Sql::Text(phrase.clone())],
            };
            found.sql.push_str(&q.sql);
            found.args.extend(q.args);
            // The index's few runs first (CROSS JOIN: in that order), then sorted.
            let from = "runs_text CROSS JOIN runs ON runs.rowid = runs_text.rowid";
            page(c, from, found, f.limit, budget())
        }
        Some(TextSearch::Many { phrase, text }) => {
            // The scan agrees with the index on ASCII text only (it folds
            // ASCII case alone).
            if text.is_ascii() {
                let mut scan = q.clone();
                scan_for(&mut scan, text);
                let mut steps = 0;
                let stop = Box::new(move || {
                    steps += 1;
                    steps > COMMON_SCAN_STEPS || std::time::Instant::now() > deadline
                });
                match page(c, "runs", scan, f.limit, Some(stop)) {
                    Err(e) if interrupted(&e) && std::time::Instant::now() <= deadline => {}
                    done => return done,
                }
            }
            // `+rowid`: the filter's index is walked newest first, not the
            // index's (many) runs read and sorted.
            q.and(
                "+rowid IN (SELECT rowid FROM runs_text WHERE runs_text MATCH ?)",
                [Sql::Text(phrase.clone())],
            );
            page(c, "runs", q, f.limit, budget())
        }
    }
}

#[async_trait]
impl RunHistory for SqliteStore {
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunListed>, StoreError> {
        let f = filter.clone();
        self.read(move |c| {
            let instances = match &f.instances {
                Some(list) => list.clone(),
                None => run_instances(c)?,
            };
            let text = f.text.as_deref().map(|t| text_search(c, t)).transpose()?;
            // A text search gets a time budget.
            let deadline = std::time::Instant::now() + TEXT_SEARCH_BUDGET;
            let mut all = Vec::new();
            let mut found = Ok(());
            for i in &instances {
                match list_in(c, i, &f, text.as_ref(), deadline) {
                    Ok(page) => all.extend(page),
                    Err(e) => {
                        found = Err(e);
                        break;
                    }
                }
            }
            found.map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::OperationInterrupted) => rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_INTERRUPT),
                    Some(format!(
                        "the text search took longer than {} s: narrow it with since, until, project or status",
                        TEXT_SEARCH_BUDGET.as_secs()
                    )),
                ),
                _ => e,
            })?;
            if instances.len() > 1 {
                all.sort_by(|a, b| {
                    let key = |r: &RunListed| {
                        (
                            r.cursor.accepted_ms,
                            r.cursor.instance.clone(),
                            r.cursor.run_id.clone(),
                        )
                    };
                    key(b).cmp(&key(a))
                });
                all.truncate(f.limit + 1);
            }
            Ok(all)
        })
        .await
    }

    async fn record_ended(
        &self,
        run: NewRun,
        started_at: chrono::DateTime<chrono::FixedOffset>,
        end: RunEnd,
    ) -> Result<Submitted, StoreError> {
        self.write_one(move |c| {
            let inserted = c.execute(
                "INSERT INTO runs (instance, run_id, project_id, job_id, request, fingerprint, status,
                   accepted_at, started_at, finished_at, results, response, error, accepted_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10, ?11, ?12, ?13)
                 ON CONFLICT (instance, run_id) DO NOTHING",
                params![
                    run.key.instance,
                    run.key.run_id.to_string(),
                    run.project_id,
                    run.job_id,
                    super::packed::pack(&run.request_json),
                    run.fingerprint,
                    end.status.to_string(),
                    now_text(&started_at),
                    now_text(&chrono::Local::now().fixed_offset()),
                    end.results_json,
                    super::packed::pack(&end.response_json),
                    end.error,
                    started_at.timestamp_millis(),
                ],
            )?;
            Ok(if inserted == 1 {
                Submitted::Accepted
            } else {
                Submitted::Conflict
            })
        })
        .await
    }

    async fn save_details(&self, key: &RunKey, details: RunDetails) -> Result<(), StoreError> {
        let k = key.clone();
        self.write(move |c| {
            let (i, r) = (k.instance.as_str(), k.run_id.to_string());
            for table in ["run_log", "run_row_errors", "run_error_totals"] {
                c.execute(
                    &format!("DELETE FROM {table} WHERE instance = ?1 AND run_id = ?2"),
                    params![i, r],
                )?;
            }
            let mut st = c.prepare_cached(
                "INSERT INTO run_log (instance, run_id, seq, time, level, job, row, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for (n, l) in details.log.iter().enumerate() {
                st.execute(params![i, r, n as i64 + 1, l.time, l.level, l.job, l.row.map(|n| n as i64), l.message])?;
            }
            let mut st = c.prepare_cached(
                "INSERT INTO run_row_errors (instance, run_id, seq, job, row, stage, stage_name, message, origin)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for (n, e) in details.row_errors.iter().enumerate() {
                let origin = serde_json::to_string(&e.values).unwrap_or_else(|_| "[]".into());
                st.execute(params![
                    i,
                    r,
                    n as i64 + 1,
                    e.job,
                    e.row as i64,
                    e.stage as i64,
                    e.stage_name,
                    e.message,
                    origin
                ])?;
            }
            // No row means none (most runs): reads default to zero.
            if details.totals.total > 0 {
                c.execute(
                    "INSERT INTO run_error_totals (instance, run_id, total, kept) VALUES (?1, ?2, ?3, ?4)",
                    params![i, r, details.totals.total as i64, details.totals.kept as i64],
                )?;
            }
            Ok(())
        })
        .await
    }

    async fn log_lines(
        &self,
        key: &RunKey,
        max_level: u8,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredLogLine>, StoreError> {
        let k = key.clone();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT seq, time, level, job, row, message FROM run_log
                 WHERE instance = ?1 AND run_id = ?2 AND seq > ?3 AND level <= ?4
                 ORDER BY seq LIMIT ?5",
            )?;
            st.query_map(
                params![
                    k.instance,
                    k.run_id.to_string(),
                    after_seq as i64,
                    max_level,
                    limit as i64
                ],
                |r| {
                    Ok(StoredLogLine {
                        seq: r.get::<_, i64>(0)? as u64,
                        time: r.get(1)?,
                        level: r.get(2)?,
                        job: r.get(3)?,
                        row: r.get::<_, Option<i64>>(4)?.map(|n| n as u64),
                        message: r.get(5)?,
                    })
                },
            )?
            .collect()
        })
        .await
    }

    async fn row_errors(
        &self,
        key: &RunKey,
        after_seq: u64,
        limit: usize,
    ) -> Result<(Vec<StoredRowError>, RowErrorTotals), StoreError> {
        let k = key.clone();
        self.read(move |c| {
            let (i, r) = (k.instance.as_str(), k.run_id.to_string());
            let mut st = c.prepare_cached(
                "SELECT seq, job, row, stage, stage_name, message, origin FROM run_row_errors
                 WHERE instance = ?1 AND run_id = ?2 AND seq > ?3 ORDER BY seq LIMIT ?4",
            )?;
            let errors = st
                .query_map(params![i, r, after_seq as i64, limit as i64], |row| {
                    let origin: String = row.get(6)?;
                    Ok(StoredRowError {
                        seq: row.get::<_, i64>(0)? as u64,
                        job: row.get(1)?,
                        row: row.get::<_, i64>(2)? as u64,
                        stage: row.get::<_, i64>(3)? as usize,
                        stage_name: row.get(4)?,
                        message: row.get(5)?,
                        values: serde_json::from_str(&origin).unwrap_or_default(),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let totals = c
                .query_row(
                    "SELECT total, kept FROM run_error_totals WHERE instance = ?1 AND run_id = ?2",
                    params![i, r],
                    |row| {
                        Ok(RowErrorTotals {
                            total: row.get::<_, i64>(0)? as u64,
                            kept: row.get::<_, i64>(1)? as u64,
                        })
                    },
                )
                .optional()?
                .unwrap_or_default();
            Ok((errors, totals))
        })
        .await
    }

    async fn append_log(
        &self,
        key: &RunKey,
        _epoch: i64,
        lines: &[StoredLogLine],
    ) -> Result<bool, StoreError> {
        let (k, lines) = (key.clone(), lines.to_vec());
        self.write(move |c| {
            let (i, r) = (k.instance.as_str(), k.run_id.to_string());
            // One node: no other can hold the run; only a run still going gets lines.
            let running: Option<bool> = c
                .query_row(
                    "SELECT status = 'Running' FROM runs WHERE instance = ?1 AND run_id = ?2",
                    params![i, r],
                    |row| row.get(0),
                )
                .optional()?;
            if running != Some(true) {
                return Ok(false);
            }
            let last: i64 = c.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM run_log WHERE instance = ?1 AND run_id = ?2",
                params![i, r],
                |row| row.get(0),
            )?;
            let mut st = c.prepare_cached(
                "INSERT INTO run_log (instance, run_id, seq, time, level, job, row, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for (n, l) in lines.iter().enumerate() {
                st.execute(params![
                    i,
                    r,
                    last + n as i64 + 1,
                    l.time,
                    l.level,
                    l.job,
                    l.row.map(|n| n as i64),
                    l.message
                ])?;
            }
            Ok(true)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::history::shared_tests::{self, run_of, search};
    use crate::store::{ConcurrencyLimits, EndIf, Store};

    /// Arguments, and what each text search must find among them (by index).
    const CORPUS: [&str; 10] = [
        "Nightly-EU-1234",
        "nightly_us",
        "50% off",
        "500 off",
        "a_b",
        "axb",
        "Ünïcödé Straße",
        "été",
        r#"say "hi" \ bye"#,
        "",
    ];
    const SEARCHES: [(&str, &[usize]); 15] = [
        ("NIGHTLY", &[0, 1]),
        ("eu-12", &[0]),
        ("a_b", &[4]),
        ("0% ", &[2]),
        ("%", &[2]),
        ("_", &[1, 4]),
        ("ÜNÏ", &[6]),
        ("straße", &[6]),
        ("été", &[7]),
        ("ete", &[]),
        (r#""hi""#, &[8]),
        (r#"\ b"#, &[8]),
        ("eu", &[0]),
        ("b", &[4, 5, 8]),
        ("nowhere", &[]),
    ];

    /// How many entries of the text index `phrase` finds (read straight from the file).
    fn indexed(path: &std::path::Path, phrase: &str) -> i64 {
        let c = Connection::open(path).unwrap();
        c.query_row(
            "SELECT count(*) FROM runs_text WHERE runs_text MATCH ?1",
            [format!("\"{phrase}\"")],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn text_is_found_as_a_substring_in_any_case_with_wildcards_literal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let store = SqliteStore::open(&path).unwrap();
        let mut keys = Vec::new();
        for (i, arg) in CORPUS.iter().enumerate() {
            let run = run_of("default", arg, i as i64);
            keys.push(run.key.clone());
            assert_eq!(store.submit(run).await.unwrap(), Submitted::Accepted);
        }
        // Another instance's runs with the same arguments never show.
        for (i, arg) in CORPUS.iter().enumerate() {
            store.submit(run_of("other", arg, i as i64)).await.unwrap();
        }
        assert_eq!(indexed(&path, "nightly"), 4, "the trigger indexed them");
        for (text, want) in SEARCHES {
            let found = store.list_runs(&search(text, "default", 50)).await.unwrap();
            let mut got: Vec<RunKey> = found.into_iter().map(|r| r.key).collect();
            got.reverse();
            let want: Vec<RunKey> = want.iter().map(|&i| keys[i].clone()).collect();
            assert_eq!(got, want, "q={text:?}");
        }
    }

    #[tokio::test]
    async fn text_search_pages_with_a_cursor_and_keeps_to_its_instances() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).unwrap();
        shared_tests::text_search_pages_with_a_cursor_and_keeps_to_its_instances(&store).await;
    }

    /// Inserts runs as an older tidepool (or the benchmark) does: straight into the file.
    fn insert_raw(path: &std::path::Path, runs: impl IntoIterator<Item = NewRun>) {
        let mut c = Connection::open(path).unwrap();
        super::super::packed::register(&c).unwrap();
        let tx = c.transaction().unwrap();
        for run in runs {
            tx.execute(
                "INSERT INTO runs (instance, run_id, project_id, job_id, request, fingerprint,
                   status, accepted_at, accepted_ms) VALUES (?1, ?2, 'p', 'j', ?3, ?2, 'Queued', ?4, ?5)",
                params![
                    run.key.instance,
                    run.key.run_id.to_string(),
                    run.request_json,
                    run.accepted_at.to_rfc3339(),
                    run.accepted_at.timestamp_millis()
                ],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    #[tokio::test]
    async fn text_the_index_finds_in_many_runs_is_found_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let store = SqliteStore::open(&path).unwrap();
        // "common" in 1,500 runs of another instance and 3 of this one, among
        // 30,000 others (more than the scan reads); "ÜBER" in 6,000 of this
        // one, every fifth.
        let mut runs = Vec::new();
        let mut mine_common = Vec::new();
        let mut mine_uber = Vec::new();
        for i in 0..30_000i64 {
            let mut run = run_of("default", &format!("plain {i}"), i * 10);
            if i % 10_000 == 7 {
                run = run_of("default", &format!("a COMMON one {i}"), i * 10);
                mine_common.push(run.key.clone());
            } else if i % 5 == 0 {
                run = run_of("default", &format!("über {i}"), i * 10);
                mine_uber.push(run.key.clone());
            }
            runs.push(run);
            if i < 1500 {
                runs.push(run_of("other", &format!("common {i}"), i * 10 + 1));
            }
        }
        insert_raw(&path, runs);
        mine_common.reverse();
        mine_uber.reverse();
        let c = Connection::open(&path).unwrap();
        for text in ["common", "ÜBER"] {
            assert!(
                matches!(text_search(&c, text).unwrap(), TextSearch::Many { .. }),
                "{text}"
            );
        }
        // Few here, many elsewhere: the scan gives up, the index answers.
        let found: Vec<RunKey> = store
            .list_runs(&search("common", "default", 50))
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(found, mine_common);
        // Many here: the first page by the scan, later ones by either.
        for (text, want) in [("ÜBER", &mine_uber), ("über", &mine_uber)] {
            let seen = shared_tests::all_pages(&store, &search(text, "default", 100)).await;
            assert_eq!(&seen, want, "q={text}");
        }
        let mut common = search("COMMON", "default", 50);
        common.instances = None;
        let all = store.list_runs(&common).await.unwrap();
        assert_eq!(all.len(), 51);
        assert!(
            all.iter()
                .all(|r| r.argument.to_lowercase().contains("common"))
        );
    }

    #[tokio::test]
    async fn purged_and_recorded_runs_leave_and_enter_the_text_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let store = SqliteStore::open(&path).unwrap();
        let now = chrono::Local::now().fixed_offset();
        let mut run = run_of("default", "purge me soon", 0);
        run.accepted_at = now;
        let k = run.key.clone();
        store.submit(run).await.unwrap();
        let lease = Duration::from_secs(15);
        let limits = ConcurrencyLimits::default();
        assert!(
            store
                .claim_next("n", lease, &limits)
                .await
                .unwrap()
                .is_some()
        );
        let end = RunEnd {
            status: crate::run::RunStatus::Complete,
            results_json: "[]".into(),
            response_json: "{}".into(),
            webhook_json: "{}".into(),
            error: None,
        };
        assert!(
            store
                .finish(&k, EndIf::Leased(0), end.clone())
                .await
                .unwrap()
        );
        let mut elsewhere = run_of("default", "ran elsewhere, purge me too", 0);
        elsewhere.accepted_at = now;
        store.record_ended(elsewhere, now, end).await.unwrap();
        assert_eq!(
            store
                .list_runs(&search("PURGE ME", "default", 9))
                .await
                .unwrap()
                .len(),
            2
        );
        assert_eq!(indexed(&path, "purge me"), 2);
        let later = now + chrono::Duration::hours(1);
        assert_eq!(store.purge_ended(later, 10).await.unwrap().deleted, 2);
        assert_eq!(
            indexed(&path, "purge me"),
            0,
            "the index lost them with the runs"
        );
        assert!(
            store
                .list_runs(&search("purge me", "default", 9))
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_store_from_before_the_text_index_gets_it_filled_in_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let total = TEXT_BACKFILL_BATCH * 2 + 7;
        {
            let store = SqliteStore::open(&path).unwrap();
            store
                .submit(run_of("default", "made by this version", 0))
                .await
                .unwrap();
        }
        {
            // As an older tidepool left it: no index, and runs it wrote since.
            let mut c = Connection::open(&path).unwrap();
            super::super::packed::register(&c).unwrap();
            c.execute_batch(
                "DROP TRIGGER runs_text_insert; DROP TRIGGER runs_text_delete;
                 DROP TABLE runs_text; DROP TABLE runs_text_backfill;",
            )
            .unwrap();
            let tx = c.transaction().unwrap();
            for i in 1..total {
                let run = run_of(
                    if i % 2 == 0 { "default" } else { "other" },
                    &format!("old run {i}"),
                    i,
                );
                tx.execute(
                    "INSERT INTO runs (instance, run_id, project_id, job_id, request, fingerprint,
                       status, accepted_at, accepted_ms) VALUES (?1, ?2, 'p', 'j', ?3, ?2, 'Queued', ?4, ?5)",
                    params![run.key.instance, run.key.run_id.to_string(), run.request_json,
                        run.accepted_at.to_rfc3339(), i],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let old = |text: &str| {
            (1..total)
                .filter(|i| i % 2 == 0 && format!("old run {i}").contains(text))
                .count()
        };
        let store = SqliteStore::open(&path).unwrap();
        // Searches answer while the index fills in (by a scan), and after.
        let first = store
            .list_runs(&search("OLD RUN 1000", "default", 50))
            .await
            .unwrap();
        assert_eq!(first.len(), old("old run 1000"));
        store
            .submit(run_of("default", "old run 1000 again, new", total + 1))
            .await
            .unwrap();
        let reader = Connection::open(&path).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while text_backfill_pending(&reader).unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "the text index stayed incomplete"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The old runs, and the one submitted since.
        assert_eq!(indexed(&path, "old run"), total);
        assert_eq!(indexed(&path, "made by this"), 1);
        let found = store
            .list_runs(&search("OLD RUN 1000", "default", 500))
            .await
            .unwrap();
        assert_eq!(found.len(), 1 + old("old run 1000"));
        assert_eq!(found[0].argument, "old run 1000 again, new");
        let odd = store
            .list_runs(&search("old run 1001", "default", 500))
            .await
            .unwrap();
        assert!(odd.is_empty(), "run 1001 is the other instance's");
    }
}
