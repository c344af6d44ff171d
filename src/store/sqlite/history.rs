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
    conn.execute_batch(HISTORY_SCHEMA)
}

/// How long a text search of the run list may scan.
const TEXT_SEARCH_BUDGET: std::time::Duration = std::time::Duration::from_secs(3);

const LIST_COLUMNS: &str =
    "instance, run_id, project_id, job_id, status, accepted_at, started_at, finished_at,
  coalesce(substr(json_extract(request, '$.argument'), 1, 500), ''),
  CASE WHEN results IS NULL AND json_valid(response) THEN json_extract(response, '$.results') ELSE results END,
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

/// One instance's page: each instance is read through its own index range,
/// newest first, so a page costs `limit` rows per instance whatever the store holds.
fn list_in(c: &Connection, instance: &str, f: &RunFilter) -> rusqlite::Result<Vec<RunListed>> {
    let mut q = Query {
        sql: format!("SELECT {LIST_COLUMNS} FROM runs WHERE instance = ?"),
        args: vec![Sql::Text(instance.to_owned())],
    };
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
    if let Some(t) = &f.text {
        // The raw request text first (cheap), where the argument's JSON
        // escaping cannot hide a match; then the argument itself.
        if !t.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
            q.and(
                "instr(lower(request), lower(?)) > 0",
                [Sql::Text(t.clone())],
            );
        }
        q.and(
            "instr(lower(json_extract(request, '$.argument')), lower(?)) > 0",
            [Sql::Text(t.clone())],
        );
    }
    q.sql
        .push_str(" ORDER BY accepted_ms DESC, run_id DESC LIMIT ?");
    q.args.push(Sql::Integer(f.limit as i64 + 1));
    let mut st = c.prepare_cached(&q.sql)?;
    st.query_map(params_from_iter(q.args), listed_row)?
        .collect()
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
            // Text is found by a scan: it gets a time budget.
            if f.text.is_some() {
                let deadline = std::time::Instant::now() + TEXT_SEARCH_BUDGET;
                c.progress_handler(10_000, Some(move || std::time::Instant::now() > deadline))?;
            }
            let mut all = Vec::new();
            let mut found = Ok(());
            for i in &instances {
                match list_in(c, i, &f) {
                    Ok(page) => all.extend(page),
                    Err(e) => {
                        found = Err(e);
                        break;
                    }
                }
            }
            if f.text.is_some() {
                c.progress_handler(0, None::<fn() -> bool>)?;
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
                    run.request_json,
                    run.fingerprint,
                    end.status.to_string(),
                    now_text(&started_at),
                    now_text(&chrono::Local::now().fixed_offset()),
                    end.results_json,
                    end.response_json,
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
            c.execute(
                "INSERT INTO run_error_totals (instance, run_id, total, kept) VALUES (?1, ?2, ?3, ?4)",
                params![i, r, details.totals.total as i64, details.totals.kept as i64],
            )?;
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
