//! [`RunHistory`] on PostgreSQL: the run list (through the `runs_recent*`
//! indexes), each run's log and row errors.

use async_trait::async_trait;
use chrono::{DateTime, FixedOffset, Utc};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{PostgresStore, local, parse_status, submit::argument_of};
use crate::store::history::{
    RowErrorTotals, RunCursor, RunDetails, RunFilter, RunHistory, RunListed, StoredLogLine,
    StoredRowError,
};
use crate::store::{NewRun, RunEnd, RunKey, StoreError, Submitted};

/// How long a text search of the run list may scan.
const TEXT_SEARCH_BUDGET_MS: u64 = 3000;

const LIST_COLUMNS: &str = "r.instance, r.run_id, r.project_id, r.job_id, r.status, r.accepted_at,
  r.started_at, r.finished_at, left(r.argument, 500),
  coalesce(r.results, CASE WHEN r.response IS NOT NULL THEN (r.response::json -> 'results')::text END),
  r.error, r.accepted_ms";

fn listed_row(r: &tokio_postgres::Row) -> RunListed {
    let instance: String = r.get(0);
    let run_id: Uuid = r.get(1);
    let time = |i: usize| r.get::<_, Option<DateTime<Utc>>>(i).map(local);
    RunListed {
        key: RunKey {
            instance: instance.clone(),
            run_id,
        },
        project_id: r.get(2),
        job_id: r.get(3),
        status: parse_status(r.get(4)),
        accepted_at: local(r.get(5)),
        started_at: time(6),
        finished_at: time(7),
        argument: r.get(8),
        results_json: r.get(9),
        error: r.get(10),
        cursor: RunCursor {
            accepted_ms: r.get(11),
            instance,
            run_id: run_id.to_string(),
        },
    }
}

/// A query's text and its arguments, built a condition at a time.
#[derive(Default)]
struct Query {
    sql: String,
    args: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Query {
    /// Adds `cond`, whose `$` is the next argument, `arg`.
    fn and(&mut self, cond: &str, arg: impl ToSql + Sync + Send + 'static) {
        self.args.push(Box::new(arg));
        let n = self.args.len();
        self.sql.push_str(" AND ");
        self.sql.push_str(&cond.replace('$', &format!("${n}")));
    }
}

/// The shortest text the trigram index finds; shorter text is scanned for.
const INDEXED_TEXT_MIN_CHARS: usize = 3;

/// `text` as a LIKE pattern that matches it alone: `\\`, `%` and `_` escaped
/// (with `\\`, LIKE's default escape).
fn like_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The run list's query: newest first in (accepted_ms, instance, run_id).
fn list_query(f: &RunFilter) -> Query {
    let mut q = Query {
        sql: format!("SELECT {LIST_COLUMNS} FROM runs r WHERE true"),
        ..Query::default()
    };
    if let Some(list) = &f.instances {
        q.and("r.instance = ANY($)", list.clone());
    }
    if let Some(p) = &f.project_id {
        q.and("r.project_id = $", p.clone());
    }
    if let Some(j) = &f.job_id {
        q.and("r.job_id = $", j.clone());
    }
    if let Some(s) = f.status {
        q.and("r.status = $", s.to_string());
    }
    if let Some(t) = f.since {
        q.and("r.accepted_ms >= $", t.timestamp_millis());
    }
    if let Some(t) = f.until {
        q.and("r.accepted_ms <= $", t.timestamp_millis());
    }
    if let Some(cur) = &f.after {
        q.and("r.accepted_ms <= $", cur.accepted_ms);
        let n = q.args.len();
        q.args.push(Box::new(cur.instance.clone()));
        q.args.push(Box::new(cur.run_id.clone()));
        q.sql.push_str(&format!(
            " AND (r.accepted_ms, r.instance, r.run_id::text) < (${n}, ${}, ${})",
            n + 1,
            n + 2
        ));
    }
    if let Some(t) = &f.text {
        if t.chars().count() >= INDEXED_TEXT_MIN_CHARS {
            // The form of `runs_argument_trgm` (migration 3), so its trigrams
            // answer; the user's % and _ (and \\) are escaped to plain characters.
            q.and(
                "lower(r.argument) LIKE '%' || lower($) || '%'",
                like_escaped(t),
            );
        } else {
            q.and("strpos(lower(r.argument), lower($)) > 0", t.clone());
        }
    }
    q.args.push(Box::new(f.limit as i64 + 1));
    q.sql.push_str(&format!(
        " ORDER BY r.accepted_ms DESC, r.instance DESC, r.run_id DESC LIMIT ${}",
        q.args.len()
    ));
    q
}

#[async_trait]
impl RunHistory for PostgresStore {
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunListed>, StoreError> {
        let q = list_query(filter);
        let mut conn = self.conn().await?;
        let tx = conn.build_transaction().read_only(true).start().await?;
        if filter.text.is_some() {
            // A scan for text (no trigram index, or text too short for one)
            // gets a time budget.
            tx.batch_execute(&format!(
                "SET LOCAL statement_timeout = {TEXT_SEARCH_BUDGET_MS}"
            ))
            .await?;
        }
        let args: Vec<&(dyn ToSql + Sync)> = q
            .args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = tx.query(&q.sql, &args).await?;
        tx.commit().await?;
        Ok(rows.iter().map(listed_row).collect())
    }

    async fn record_ended(
        &self,
        run: NewRun,
        started_at: DateTime<FixedOffset>,
        end: RunEnd,
    ) -> Result<Submitted, StoreError> {
        let conn = self.conn().await?;
        let inserted = conn
            .execute(
                "INSERT INTO runs (instance, run_id, project_id, job_id, request, argument,
                   fingerprint, status, accepted_at, started_at, finished_at, results, response,
                   error, accepted_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, now(), $10, $11, $12, $13)
                 ON CONFLICT (instance, run_id) DO NOTHING",
                &[
                    &run.key.instance,
                    &run.key.run_id,
                    &run.project_id,
                    &run.job_id,
                    &run.request_json,
                    &argument_of(&run.request_json),
                    &run.fingerprint,
                    &end.status.to_string(),
                    &started_at,
                    &end.results_json,
                    &end.response_json,
                    &end.error,
                    &started_at.timestamp_millis(),
                ],
            )
            .await?;
        Ok(if inserted == 1 {
            Submitted::Accepted
        } else {
            Submitted::Conflict
        })
    }

    async fn save_details(&self, key: &RunKey, details: RunDetails) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let (i, r) = (&key.instance, &key.run_id);
        for table in ["run_log", "run_row_errors", "run_error_totals"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE instance = $1 AND run_id = $2"),
                &[i, r],
            )
            .await?;
        }
        let log = &details.log;
        let seqs: Vec<i64> = (1..=log.len() as i64).collect();
        let times: Vec<&str> = log.iter().map(|l| l.time.as_str()).collect();
        let levels: Vec<i16> = log.iter().map(|l| i16::from(l.level)).collect();
        let jobs: Vec<&str> = log.iter().map(|l| l.job.as_str()).collect();
        let rows: Vec<Option<i64>> = log.iter().map(|l| l.row.map(|n| n as i64)).collect();
        let messages: Vec<&str> = log.iter().map(|l| l.message.as_str()).collect();
        tx.execute(
            "INSERT INTO run_log (instance, run_id, seq, time, level, job, row_no, message)
             SELECT $1, $2, * FROM unnest($3::int8[], $4::text[], $5::int2[], $6::text[],
                                          $7::int8[], $8::text[])",
            &[i, r, &seqs, &times, &levels, &jobs, &rows, &messages],
        )
        .await?;
        save_row_errors(&tx, key, &details.row_errors).await?;
        tx.execute(
            "INSERT INTO run_error_totals (instance, run_id, total, kept) VALUES ($1, $2, $3, $4)",
            &[
                i,
                r,
                &(details.totals.total as i64),
                &(details.totals.kept as i64),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn log_lines(
        &self,
        key: &RunKey,
        max_level: u8,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredLogLine>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT seq, time, level, job, row_no, message FROM run_log
                 WHERE instance = $1 AND run_id = $2 AND seq > $3 AND level <= $4
                 ORDER BY seq LIMIT $5",
                &[
                    &key.instance,
                    &key.run_id,
                    &(after_seq.min(i64::MAX as u64) as i64),
                    &i16::from(max_level),
                    &(limit as i64),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| StoredLogLine {
                seq: r.get::<_, i64>(0) as u64,
                time: r.get(1),
                level: r.get::<_, i16>(2).clamp(0, 255) as u8,
                job: r.get(3),
                row: r.get::<_, Option<i64>>(4).map(|n| n as u64),
                message: r.get(5),
            })
            .collect())
    }

    async fn row_errors(
        &self,
        key: &RunKey,
        after_seq: u64,
        limit: usize,
    ) -> Result<(Vec<StoredRowError>, RowErrorTotals), StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT seq, job, row_no, stage, stage_name, message, origin FROM run_row_errors
                 WHERE instance = $1 AND run_id = $2 AND seq > $3 ORDER BY seq LIMIT $4",
                &[
                    &key.instance,
                    &key.run_id,
                    &(after_seq.min(i64::MAX as u64) as i64),
                    &(limit as i64),
                ],
            )
            .await?;
        let errors = rows
            .iter()
            .map(|r| StoredRowError {
                seq: r.get::<_, i64>(0) as u64,
                job: r.get(1),
                row: r.get::<_, i64>(2) as u64,
                stage: r.get::<_, i64>(3) as usize,
                stage_name: r.get(4),
                message: r.get(5),
                values: serde_json::from_str(r.get(6)).unwrap_or_default(),
            })
            .collect();
        let totals = conn
            .query_opt(
                "SELECT total, kept FROM run_error_totals WHERE instance = $1 AND run_id = $2",
                &[&key.instance, &key.run_id],
            )
            .await?
            .map(|r| RowErrorTotals {
                total: r.get::<_, i64>(0) as u64,
                kept: r.get::<_, i64>(1) as u64,
            })
            .unwrap_or_default();
        Ok((errors, totals))
    }

    async fn append_log(
        &self,
        key: &RunKey,
        epoch: i64,
        lines: &[StoredLogLine],
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let (i, r) = (&key.instance, &key.run_id);
        // The lease row is locked until the lines are in: a takeover (which
        // bumps the epoch) waits for them, and a stale holder writes nothing.
        let held = tx
            .query_opt(
                "SELECT 1 FROM runs WHERE instance = $1 AND run_id = $2 AND lease_epoch = $3
                   AND status = 'Running' FOR SHARE",
                &[i, r, &epoch],
            )
            .await?;
        if held.is_none() {
            return Ok(false);
        }
        let times: Vec<&str> = lines.iter().map(|l| l.time.as_str()).collect();
        let levels: Vec<i16> = lines.iter().map(|l| i16::from(l.level)).collect();
        let jobs: Vec<&str> = lines.iter().map(|l| l.job.as_str()).collect();
        let rows: Vec<Option<i64>> = lines.iter().map(|l| l.row.map(|n| n as i64)).collect();
        let messages: Vec<&str> = lines.iter().map(|l| l.message.as_str()).collect();
        tx.execute(
            "INSERT INTO run_log (instance, run_id, seq, time, level, job, row_no, message)
             SELECT $1, $2, b.last + u.n, u.time, u.level, u.job, u.row_no, u.message
             FROM (SELECT COALESCE(MAX(seq), 0) AS last FROM run_log
                   WHERE instance = $1 AND run_id = $2) b,
                  unnest($3::text[], $4::int2[], $5::text[], $6::int8[], $7::text[])
                    WITH ORDINALITY AS u(time, level, job, row_no, message, n)",
            &[i, r, &times, &levels, &jobs, &rows, &messages],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// Inserts a run's kept row errors, numbered from 1.
async fn save_row_errors(
    tx: &deadpool_postgres::Transaction<'_>,
    key: &RunKey,
    errors: &[StoredRowError],
) -> Result<(), StoreError> {
    let seqs: Vec<i64> = (1..=errors.len() as i64).collect();
    let jobs: Vec<&str> = errors.iter().map(|e| e.job.as_str()).collect();
    let rows: Vec<i64> = errors.iter().map(|e| e.row as i64).collect();
    let stages: Vec<i64> = errors.iter().map(|e| e.stage as i64).collect();
    let names: Vec<Option<&str>> = errors.iter().map(|e| e.stage_name.as_deref()).collect();
    let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
    let origins: Vec<String> = errors
        .iter()
        .map(|e| serde_json::to_string(&e.values).unwrap_or_else(|_| "[]".into()))
        .collect();
    tx.execute(
        "INSERT INTO run_row_errors (instance, run_id, seq, job, row_no, stage, stage_name,
           message, origin)
         SELECT $1, $2, * FROM unnest($3::int8[], $4::text[], $5::int8[], $6::int8[],
                                      $7::text[], $8::text[], $9::text[])",
        &[
            &key.instance,
            &key.run_id,
            &seqs,
            &jobs,
            &rows,
            &stages,
            &names,
            &messages,
            &origins,
        ],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{PgStoreOptions, session};
    use super::*;
    use crate::store::Store;
    use crate::store::history::shared_tests::{self, run_of, search};

    const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

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
    const SEARCHES: [(&str, &[usize]); 16] = [
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
        (r#"\"#, &[8]),
        ("eu", &[0]),
        ("b", &[4, 5, 8]),
        ("nowhere", &[]),
    ];

    /// A fresh database (owned by postgres), its name and a URL for `user`.
    async fn fresh_db(user: &str) -> (String, String) {
        let name = format!("tidepool_t_{}", Uuid::new_v4().simple());
        let admin = session(&format!("{SERVER}/test")).await.unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = format!("postgres://{user}@127.0.0.1:5432/{name}");
        (name, url)
    }

    async fn drop_db(name: &str) {
        if let Ok(admin) = session(&format!("{SERVER}/test")).await {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }

    /// Submits the corpus to `instance` (and again to "other"); its keys.
    async fn corpus(store: &PostgresStore) -> Vec<RunKey> {
        let mut keys = Vec::new();
        for (i, arg) in CORPUS.iter().enumerate() {
            let run = run_of("default", arg, i as i64);
            keys.push(run.key.clone());
            assert_eq!(store.submit(run).await.unwrap(), Submitted::Accepted);
            store.submit(run_of("other", arg, i as i64)).await.unwrap();
        }
        keys
    }

    async fn assert_searches(store: &PostgresStore, keys: &[RunKey]) {
        for (text, want) in SEARCHES {
            let found = store.list_runs(&search(text, "default", 50)).await.unwrap();
            let mut got: Vec<RunKey> = found.into_iter().map(|r| r.key).collect();
            got.reverse();
            let want: Vec<RunKey> = want.iter().map(|&i| keys[i].clone()).collect();
            assert_eq!(got, want, "q={text:?}");
        }
    }

    /// The plan of the run list's query for `f`, with sequential and plain
    /// index scans off (a bitmap scan needs a condition its index answers).
    async fn plan(url: &str, f: &RunFilter) -> String {
        let q = list_query(f);
        let c = session(url).await.unwrap();
        c.batch_execute("SET enable_seqscan = off; SET enable_indexscan = off")
            .await
            .unwrap();
        let args: Vec<&(dyn ToSql + Sync)> = q
            .args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = c.query(&format!("EXPLAIN {}", q.sql), &args).await.unwrap();
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn text_is_found_through_the_trigram_index_with_wildcards_literal() {
        let (name, url) = fresh_db("postgres").await;
        let store = PostgresStore::connect(&url, PgStoreOptions::default())
            .await
            .unwrap();
        let keys = corpus(&store).await;
        assert_searches(&store, &keys).await;
        let every = RunFilter {
            instances: None,
            ..search("nightly", "default", 50)
        };
        let indexed = plan(&url, &every).await;
        assert!(indexed.contains("runs_argument_trgm"), "{indexed}");
        assert_eq!(like_escaped(r"50%_\x"), r"50\%\_\\x");
        drop(store);
        drop_db(&name).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn text_search_pages_with_a_cursor_and_keeps_to_its_instances() {
        let (name, url) = fresh_db("postgres").await;
        let store = PostgresStore::connect(&url, PgStoreOptions::default())
            .await
            .unwrap();
        shared_tests::text_search_pages_with_a_cursor_and_keeps_to_its_instances(&store).await;
        drop(store);
        drop_db(&name).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn without_the_right_to_create_pg_trgm_the_store_migrates_and_scans() {
        let role = format!("tidepool_t_{}", Uuid::new_v4().simple());
        let (name, url) = fresh_db(&role).await;
        let admin = session(&format!("{SERVER}/{name}")).await.unwrap();
        // May create tables in public, not extensions in the database.
        admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN; GRANT CREATE ON SCHEMA public TO {role};"
            ))
            .await
            .unwrap();
        let store = PostgresStore::connect(&url, PgStoreOptions::default())
            .await
            .unwrap();
        let row = admin
            .query_one(
                "SELECT max(version), to_regclass('runs_argument_trgm') IS NULL,
                   NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm')
                 FROM tidepool_schema",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, i32>(0), row.get(1), row.get(2)),
            (super::super::SCHEMA_VERSION, true, true)
        );
        let keys = corpus(&store).await;
        assert_searches(&store, &keys).await;
        drop(store);
        drop(admin);
        drop_db(&name).await;
        if let Ok(admin) = session(&format!("{SERVER}/test")).await {
            let _ = admin
                .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
                .await;
        }
    }
}
