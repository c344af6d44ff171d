//! A running run's log is seen live: the server appends its lines to the
//! store while it goes (`RunHistory::append_log`, fenced by the lease epoch
//! on PostgreSQL), `GET /v1/Runs/{id}/log` pages them and the event stream
//! sends them; at the end the log holds each line once, as before.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{Fixture, eventually, until};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tidepool::api;
use tidepool::server::{ServerConfig, Service};
use tidepool::store::history::{RunDetails, StoredLogLine};
use tidepool::store::{
    ConcurrencyLimits, NewRun, PgStoreOptions, PostgresStore, RunHistory, RunKey, SqliteStore,
    Store, Submitted,
};
use tower::ServiceExt;

const ROWS: u32 = 20_000;

/// Project `live`, job `load`: `ROWS` CSV rows inserted into SQLite in
/// batches of 10 (a transaction each), so that a run holds its writes often.
fn live_project(f: &Fixture) {
    let mut csv = String::from("id,name\n");
    for i in 1..=ROWS {
        csv.push_str(&format!("{i},n{i}\n"));
    }
    f.project(
        "live",
        "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.db]\nkind = \"sqlite\"\npath = \"${DATA_DIR}/live.sqlite\"\ninit_sql = [\"CREATE TABLE IF NOT EXISTS t(id INTEGER, name TEXT)\"]\n",
        &[(
            "load",
            "batch_size = 10\n[origin]\nconnection = \"src\"\n[destination]\nconnection = \"db\"\n[[stages]]\ntable = \"t\"\naction = \"insert\"\nfields = [{ column = \"id\", origin = \"id\" }, { column = \"name\", origin = \"name\" }]\n",
        )],
    );
    f.write("projects/live/in.csv", csv);
}

async fn get(app: &api::AppState, path: &str) -> (StatusCode, Value) {
    let req = Request::builder().uri(path).body(Body::empty()).unwrap();
    let resp = api::app(app.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, v)
}

/// Every line of the run's log, paged by `GET /log`.
async fn whole_log(app: &api::AppState, id: &str) -> Vec<Value> {
    let mut lines = Vec::new();
    let mut cursor = String::new();
    loop {
        let (s, v) = get(
            app,
            &format!("/v1/Runs/{id}/log?limit=1000&cursor={cursor}"),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        lines.extend(v["lines"].as_array().unwrap().iter().cloned());
        match v["nextCursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => return lines,
        }
    }
}

/// The events of an SSE text so far: (name, id, data).
fn sse_events(body: &str) -> Vec<(String, Option<String>, Value)> {
    let mut out = Vec::new();
    // Only whole events (a block ends with a blank line).
    let whole = match body.rfind("\n\n") {
        Some(i) => &body[..i],
        None => return out,
    };
    for block in whole.split("\n\n") {
        let (mut name, mut id, mut data) = ("message".to_owned(), None, String::new());
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event:") {
                name = n.trim().to_owned();
            } else if let Some(i) = line.strip_prefix("id:") {
                id = Some(i.trim().to_owned());
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            }
        }
        if !data.is_empty() {
            out.push((name, id, serde_json::from_str(&data).unwrap()));
        }
    }
    out
}

/// Opens the run's event stream and reads it into a shared text until it closes.
async fn follow(
    app: &api::AppState,
    id: &str,
    last_event_id: Option<&str>,
) -> (Arc<Mutex<String>>, tokio::task::JoinHandle<()>) {
    let mut req = Request::builder().uri(format!("/v1/Runs/{id}/events"));
    if let Some(l) = last_event_id {
        req = req.header("last-event-id", l);
    }
    let resp = api::app(app.clone())
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    let reader = tokio::spawn(async move {
        let mut body = resp.into_body().into_data_stream();
        while let Some(Ok(chunk)) = body.next().await {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk));
        }
    });
    (text, reader)
}

async fn status_of(app: &api::AppState, id: &str) -> String {
    let (_, v) = get(app, &format!("/v1/Runs/{id}")).await;
    v["status"].as_str().unwrap_or_default().to_owned()
}

/// Takes the destination's write lock (waiting for a transaction going).
fn lock_destination(f: &Fixture) -> rusqlite::Connection {
    let lock = f.db("live.sqlite");
    lock.busy_timeout(Duration::from_secs(60)).unwrap();
    lock.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER, name TEXT); BEGIN IMMEDIATE")
        .unwrap();
    lock
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_runs_log_lines_are_seen_live_and_kept_once() {
    let f = Fixture::new();
    let store = Arc::new(SqliteStore::open(&f.data.join("tidepool.sqlite")).unwrap());
    seen_live_and_kept_once(f, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_a_running_runs_log_lines_are_seen_live_and_kept_once() {
    let (url, name) = fresh_pg().await;
    let store = PostgresStore::connect(&url, PgStoreOptions::default())
        .await
        .unwrap();
    seen_live_and_kept_once(Fixture::new(), Arc::new(store)).await;
    drop_pg(&name).await;
}

/// A level-3 run held before its first batch, then mid-way: its lines are
/// in `GET /log` and on the event stream while it goes; at its end the log
/// is its answer's, each line once.
async fn seen_live_and_kept_once(f: Fixture, store: Arc<dyn Store>) {
    live_project(&f);
    let config = ServerConfig {
        data_dir: f.data.clone(),
        projects: f.projects.clone(),
        workers: 1,
        ..ServerConfig::default()
    };
    let svc = Service::new(config, store).await.unwrap();
    svc.start();
    let app = api::AppState::new(svc);

    // The run cannot write its first batch until the test lets it.
    let lock = lock_destination(&f);
    let id = uuid::Uuid::new_v4().to_string();
    let req = Request::builder()
        .method("POST")
        .uri("/v1/ExecuteJobAsync")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"runID": id, "projectID": "live", "jobID": "load", "loggingLevel": 3})
                .to_string(),
        ))
        .unwrap();
    let r = api::app(app.clone()).oneshot(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (stream, reader) = follow(&app, &id, None).await;

    // Held before its first batch: the job's start is in the log already.
    eventually("the log's first lines while the run waits", || async {
        let (_, v) = get(&app, &format!("/v1/Runs/{id}/log")).await;
        let lines = v["lines"].as_array().cloned().unwrap_or_default();
        lines
            .iter()
            .any(|l| {
                l["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("job load started")
            })
            .then_some(())
    })
    .await;
    until("a log event on the stream while the run waits", || async {
        sse_events(&stream.lock().unwrap())
            .iter()
            .any(|(n, _, _)| n == "log")
    })
    .await;
    assert_eq!(status_of(&app, &id).await, "Running");

    // Let some rows through, then hold it again mid-way: their lines are seen.
    lock.execute_batch("ROLLBACK").unwrap();
    until("some rows written", || async {
        let (_, v) = get(&app, &format!("/v1/Results/{id}")).await;
        v[0]["totalRows"].as_u64().unwrap_or(0) >= 20
    })
    .await;
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let row_line = eventually("a row's line while the run is held mid-way", || async {
        let (_, v) = get(&app, &format!("/v1/Runs/{id}/log?limit=1000")).await;
        let lines = v["lines"].as_array().cloned().unwrap_or_default();
        lines
            .iter()
            .find(|l| l["message"].as_str().unwrap_or("").starts_with("row 1: "))
            .cloned()
    })
    .await;
    assert_eq!(
        status_of(&app, &id).await,
        "Running",
        "seen while the run goes"
    );
    until("the row's line on the stream", || async {
        sse_events(&stream.lock().unwrap())
            .iter()
            .any(|(n, _, v)| n == "log" && v["seq"] == row_line["seq"])
    })
    .await;
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    tokio::time::timeout(Duration::from_secs(300), reader)
        .await
        .expect("the stream closes after the run ends")
        .unwrap();
    let (_, run) = get(&app, &format!("/v1/Runs/{id}")).await;
    assert_eq!(run["status"], "Complete", "{}", run["error"]);
    let answer = run["log"].as_array().unwrap().clone();
    assert!(
        answer.len() as u32 > ROWS,
        "a line per row: {}",
        answer.len()
    );

    // The stored log is the answer's log, each line once, numbered 1..n.
    let stored = whole_log(&app, &id).await;
    assert_eq!(stored.len(), answer.len(), "each line once");
    for (n, (s, a)) in stored.iter().zip(&answer).enumerate() {
        assert_eq!(s["seq"], n as u64 + 1);
        assert_eq!((&s["message"], &s["level"]), (&a["message"], &a["level"]));
    }

    // The stream: log lines in order, no repeats, as stored, at most 1000.
    let events = sse_events(&stream.lock().unwrap());
    let logs: Vec<&(String, Option<String>, Value)> =
        events.iter().filter(|(n, _, _)| n == "log").collect();
    assert_eq!(logs.len(), 1000, "a stream carries 1000 lines at most");
    for (n, (_, id, v)) in logs.iter().enumerate() {
        assert_eq!(v["seq"], n as u64 + 1, "in order, none twice");
        assert_eq!(id.as_deref(), Some(v["seq"].to_string().as_str()));
        assert_eq!(v["message"], stored[n]["message"]);
    }
    let end = &events.last().unwrap();
    assert_eq!(end.0, "end");
    assert_eq!(end.2["logTruncated"], true);

    // A client reconnecting with Last-Event-ID resumes after that line.
    let (again, reader) = follow(&app, &id, Some("1500")).await;
    reader.await.unwrap();
    let events = sse_events(&again.lock().unwrap());
    let first = events.iter().find(|(n, _, _)| n == "log").unwrap();
    assert_eq!(first.2["seq"], 1501);
}

fn line(message: &str) -> StoredLogLine {
    StoredLogLine {
        seq: 0,
        time: "2026-01-01T00:00:00.000+00:00".into(),
        level: 3,
        job: "j".into(),
        row: Some(1),
        message: message.into(),
    }
}

fn new_run() -> NewRun {
    let key = RunKey {
        instance: "default".into(),
        run_id: uuid::Uuid::new_v4(),
    };
    NewRun {
        fingerprint: key.run_id.to_string(),
        key,
        project_id: "p".into(),
        job_id: "j".into(),
        request_json: "{}".into(),
        webhook_url: None,
        accepted_at: chrono::Local::now().fixed_offset(),
    }
}

fn messages(lines: &[StoredLogLine]) -> Vec<(u64, &str)> {
    lines.iter().map(|l| (l.seq, l.message.as_str())).collect()
}

/// What every store does: lines follow on while the run is held, the final
/// save replaces them; a run not held takes none.
async fn appends_follow_on_and_the_final_save_replaces(store: &dyn Store) -> (RunKey, i64) {
    let run = new_run();
    let key = run.key.clone();
    assert_eq!(store.submit(run).await.unwrap(), Submitted::Accepted);
    assert!(
        !store.append_log(&key, 1, &[line("queued")]).await.unwrap(),
        "a queued run takes no lines"
    );
    let rec = store
        .claim_next("n", Duration::from_secs(30), &ConcurrencyLimits::default())
        .await
        .unwrap()
        .unwrap();
    let epoch = rec.lease_epoch;
    assert!(
        store
            .append_log(&key, epoch, &[line("a"), line("b")])
            .await
            .unwrap()
    );
    assert!(store.append_log(&key, epoch, &[]).await.unwrap());
    assert!(store.append_log(&key, epoch, &[line("c")]).await.unwrap());
    let got = store.log_lines(&key, 3, 0, 100).await.unwrap();
    assert_eq!(messages(&got), vec![(1, "a"), (2, "b"), (3, "c")]);
    let got = store.log_lines(&key, 3, 2, 100).await.unwrap();
    assert_eq!(messages(&got), vec![(3, "c")]);
    let details = RunDetails {
        log: vec![line("a"), line("b"), line("c"), line("d")],
        ..RunDetails::default()
    };
    store.save_details(&key, details).await.unwrap();
    let got = store.log_lines(&key, 3, 0, 100).await.unwrap();
    assert_eq!(
        messages(&got),
        vec![(1, "a"), (2, "b"), (3, "c"), (4, "d")],
        "the final save replaces the live lines"
    );
    (key, epoch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_appends_log_lines_while_a_run_goes() {
    let f = Fixture::new();
    let store = SqliteStore::open(&f.data.join("tidepool.sqlite")).unwrap();
    appends_follow_on_and_the_final_save_replaces(&store).await;
}

/// A database of the test's own on the local PostgreSQL, dropped at the end.
async fn fresh_pg() -> (String, String) {
    let base = common::databases::pg_url();
    let (admin, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL must be running on 127.0.0.1:5432");
    tokio::spawn(conn);
    let name = format!("tidepool_ll_{}", uuid::Uuid::new_v4().simple());
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let i = base
        .rfind('/')
        .expect("a PostgreSQL URL names its database");
    let url = format!("{}/{name}", &base[..i]);
    (url, name)
}

async fn drop_pg(name: &str) {
    let (admin, conn) =
        tokio_postgres::connect(&common::databases::pg_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_appends_log_lines_only_under_the_runs_lease_epoch() {
    let (url, name) = fresh_pg().await;
    let store = PostgresStore::connect(&url, PgStoreOptions::default())
        .await
        .unwrap();
    let (key, epoch) = appends_follow_on_and_the_final_save_replaces(&store).await;

    // Another run, taken over by another node: its old holder appends nothing.
    let run = new_run();
    let other = run.key.clone();
    assert_eq!(store.submit(run).await.unwrap(), Submitted::Accepted);
    let rec = store
        .claim_next("a", Duration::ZERO, &ConcurrencyLimits::default())
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .append_log(&other, rec.lease_epoch, &[line("a1")])
            .await
            .unwrap()
    );
    let taken = eventually("the lease runs out", || async {
        let t = store
            .take_over_expired("b", Duration::from_secs(30), 10)
            .await
            .unwrap();
        (!t.is_empty()).then_some(t)
    })
    .await;
    assert_eq!(taken[0].key, other);
    let stale = rec.lease_epoch;
    assert!(
        !store
            .append_log(&other, stale, &[line("late")])
            .await
            .unwrap(),
        "a stale epoch appends nothing"
    );
    let now = taken[0].lease_epoch;
    assert!(now > stale);
    assert!(store.append_log(&other, now, &[line("b1")]).await.unwrap());
    let got = store.log_lines(&other, 3, 0, 100).await.unwrap();
    assert_eq!(messages(&got), vec![(1, "a1"), (2, "b1")]);
    // The first run's lines are its own.
    assert_eq!(store.log_lines(&key, 3, 0, 100).await.unwrap().len(), 4);
    assert!(epoch >= 1);
    drop(store);
    drop_pg(&name).await;
}
