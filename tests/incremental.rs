//! Incremental loads: `incremental = { field = … }` keeps the largest value
//! landed as `@@VAR:HighWater@@`. Against real SQLite, PostgreSQL and MariaDB
//! origins (and a CSV file, filtered by the engine): the first run reads
//! everything, the next only the rows inserted or changed since, a preview
//! keeps nothing, a reset reads everything again. Rows land in SQLite, where
//! the test counts them.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::databases::{MariaDb, PgSchema, pg_url};
use common::{Fixture, request, rows};
use mysql::prelude::Queryable;
use serde_json::{Value, json};
use tidepool::engine;
use tidepool::server::{ServerConfig, Service};
use tidepool::store::SqliteStore;
use tidepool::{RunReport, RunStatus};
use tower::ServiceExt;

const QUERY: &str = "SELECT id, name, modified_at FROM items \
     WHERE (@@VAR:HighWater@@ IS NULL OR modified_at > @@VAR:HighWater@@) ORDER BY modified_at";

/// Project `p`, job `items`: `origin` (a connection's TOML) read through
/// `query` into the SQLite table `items` of `dst.sqlite`, upserted on id.
fn project(f: &Fixture, origin: &str, query: &str) {
    f.project(
        "p",
        &format!(
            "[connections.src]\n{origin}\n[connections.dst]\nkind = \"sqlite\"\npath = \"${{DATA_DIR}}/dst.sqlite\"\n\
             init_sql = [\"CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, name TEXT, modified_at TEXT)\"]\n"
        ),
        &[(
            "items",
            &format!(
                "[origin]\nconnection = \"src\"\nincremental = {{ field = \"modified_at\" }}\nquery = \"\"\"\n{query}\n\"\"\"\n\
                 [destination]\nconnection = \"dst\"\n[[stages]]\ntable = \"items\"\naction = \"update/insert\"\n\
                 fields = [{{ column = \"id\", origin = \"id\", match = true }}, {{ column = \"name\", origin = \"name\" }}, \
                 {{ column = \"modified_at\", origin = \"modified_at\" }}]\n"
            ),
        )],
    );
}

fn run(f: &Fixture, preview: bool) -> RunReport {
    let mut req = request("p", "items");
    req.preview = preview;
    let r = f.run(&req);
    assert_eq!(r.status, RunStatus::Complete, "{:#?}", r.jobs[0].log);
    r
}

/// (rows read, inserts, updates).
fn counts(r: &RunReport) -> (u64, u64, u64) {
    let c = &r.jobs[0].counters;
    (c.total_rows, c.inserts, c.updates)
}

fn landed(f: &Fixture) -> Vec<String> {
    rows(
        &f.db("dst.sqlite"),
        "SELECT id, name FROM items ORDER BY id",
    )
}

/// The whole story against one origin; `exec` runs SQL on it, `at(n)` is
/// the n-th timestamp in its SQL form.
fn the_story(f: &Fixture, exec: &mut dyn FnMut(&str), at: &dyn Fn(u32) -> String) {
    exec(&format!(
        "INSERT INTO items VALUES (1, 'a', {}), (2, 'b', {}), (3, 'c', {})",
        at(1),
        at(2),
        at(3)
    ));
    // The first run: no mark yet, everything.
    let r = run(f, false);
    assert_eq!(counts(&r), (3, 3, 0));
    let hw = r.jobs[0]
        .load
        .high_water
        .clone()
        .expect("a mark in the report");
    assert_eq!((hw.before.as_deref(), hw.kept), (None, true));
    let first_mark = hw.after.expect("a mark after the first run");
    assert!(first_mark.contains("10:03"), "{first_mark}");

    // A new row and a changed one: only they are read.
    exec(&format!(
        "INSERT INTO items VALUES (4, 'd', {}); UPDATE items SET name = 'B', modified_at = {} WHERE id = 2",
        at(4),
        at(5)
    ));
    let r = run(f, false);
    assert_eq!(counts(&r), (2, 1, 1));
    assert_eq!(landed(f), ["1|a", "2|B", "3|c", "4|d"]);
    let hw = r.jobs[0].load.high_water.clone().unwrap();
    assert_eq!(hw.before.as_deref(), Some(first_mark.as_str()));
    assert!(hw.after.as_deref().unwrap().contains("10:05"), "{hw:?}");

    // Nothing new: nothing read.
    assert_eq!(counts(&run(f, false)), (0, 0, 0));

    // A preview reads the new row, writes nothing and keeps no mark.
    exec(&format!("INSERT INTO items VALUES (5, 'e', {})", at(6)));
    let r = run(f, true);
    assert_eq!(r.jobs[0].counters.total_rows, 1);
    assert!(!r.jobs[0].load.high_water.as_ref().unwrap().kept);
    assert_eq!(landed(f).len(), 4);
    assert_eq!(counts(&run(f, false)), (1, 1, 0));

    // A reset: everything again.
    let loaded = f.load();
    let project = loaded.project("p").unwrap();
    let was = engine::reset_incremental(project, "items", None).unwrap();
    assert!(was.is_some_and(|m| m.contains("10:06")));
    assert_eq!(counts(&run(f, false)), (5, 0, 5));
    assert_eq!(counts(&run(f, false)), (0, 0, 0));
}

#[test]
fn sqlite_origin_reads_only_what_changed_since_the_last_run() {
    let f = Fixture::new();
    let src = f.db("src.sqlite");
    src.execute_batch("CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, modified_at TEXT)")
        .unwrap();
    project(
        &f,
        "kind = \"sqlite\"\npath = \"${DATA_DIR}/src.sqlite\"",
        QUERY,
    );
    the_story(&f, &mut |sql| src.execute_batch(sql).unwrap(), &|n| {
        format!("'2026-03-01 10:0{n}:00'")
    });
}

#[test]
fn postgres_origin_reads_only_what_changed_since_the_last_run() {
    let f = Fixture::new();
    let mut pg = PgSchema::new();
    pg.admin
        .batch_execute("CREATE TABLE items(id int PRIMARY KEY, name text, modified_at timestamptz)")
        .unwrap();
    let query = QUERY.replace("FROM items", &format!("FROM {}.items", pg.name));
    project(
        &f,
        &format!("kind = \"postgres\"\nurl = \"{}\"", pg_url()),
        &query,
    );
    let name = pg.name.clone();
    the_story(
        &f,
        &mut |sql| {
            pg.admin
                .batch_execute(&format!("SET search_path TO {name}; {sql}"))
                .unwrap()
        },
        &|n| format!("'2026-03-01 10:0{n}:00.123456+00'"),
    );
}

#[test]
fn mariadb_origin_reads_only_what_changed_since_the_last_run() {
    let f = Fixture::new();
    let mut db = MariaDb::new();
    db.admin
        .query_drop(
            "CREATE TABLE items(id INT PRIMARY KEY, name VARCHAR(20), modified_at DATETIME(6))",
        )
        .unwrap();
    project(
        &f,
        &format!("kind = \"mariadb\"\nurl = \"{}\"", db.url()),
        QUERY,
    );
    the_story(
        &f,
        &mut |sql| {
            for stmt in sql.split(';') {
                db.admin.query_drop(stmt).unwrap();
            }
        },
        &|n| format!("'2026-03-01 10:0{n}:00.250000'"),
    );
}

#[test]
fn a_csv_origin_is_filtered_by_the_engine_from_the_initial_value_on() {
    let f = Fixture::new();
    f.project(
        "p",
        "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.dst]\nkind = \"sqlite\"\n\
         path = \"${DATA_DIR}/dst.sqlite\"\ninit_sql = [\"CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, name TEXT)\"]\n",
        &[(
            "items",
            "[origin]\nconnection = \"src\"\nincremental = { field = \"id\", initial = 1 }\n[destination]\nconnection = \"dst\"\n\
             [[stages]]\ntable = \"items\"\naction = \"insert\"\n\
             fields = [{ column = \"id\", origin = \"id\" }, { column = \"name\", origin = \"name\" }]\n",
        )],
    );
    // Ids compare as numbers (10 > 9), not as text; row 1 is at the initial value.
    f.write("projects/p/in.csv", "id,name\n1,a\n2,b\n9,c\n");
    assert_eq!(run(&f, false).jobs[0].counters.inserts, 2);
    f.write("projects/p/in.csv", "id,name\n1,a\n2,b\n9,c\n10,d\n");
    let r = run(&f, false);
    assert_eq!(r.jobs[0].counters.total_rows, 1);
    assert_eq!(landed(&f), ["2|b", "9|c", "10|d"]);
    let hw = r.jobs[0].load.high_water.clone().unwrap();
    assert_eq!(
        (hw.before.as_deref(), hw.after.as_deref()),
        (Some("9"), Some("10"))
    );
}

#[test]
fn a_failed_run_keeps_the_old_mark() {
    let f = Fixture::new();
    let src = f.db("src.sqlite");
    src.execute_batch(
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, modified_at TEXT);
         INSERT INTO items VALUES (1, 'a', '2026-03-01 10:01:00')",
    )
    .unwrap();
    project(
        &f,
        "kind = \"sqlite\"\npath = \"${DATA_DIR}/src.sqlite\"",
        QUERY,
    );
    run(&f, false);
    src.execute_batch("INSERT INTO items VALUES (2, 'b', '2026-03-01 10:02:00')")
        .unwrap();
    // An end operation throws: the job fails after its rows, the mark stays.
    let job = f.projects.join("p/jobs/items.toml");
    let text = std::fs::read_to_string(&job).unwrap();
    f.write(
        "projects/p/jobs/items.toml",
        format!("{text}[[operations]]\nwhen = \"end\"\nscript = \"throw new Error('boom')\"\n"),
    );
    let r = f.run(&request("p", "items"));
    assert_eq!(r.status, RunStatus::Failed, "{:#?}", r.jobs[0].log);
    let hw = r.jobs[0].load.high_water.clone().unwrap();
    assert_eq!(
        (hw.after.as_deref(), hw.kept),
        (Some("2026-03-01 10:02:00"), false)
    );
    f.write("projects/p/jobs/items.toml", text);
    // Row 2 landed in the failed run; it is read again (an update), as the mark stayed.
    assert_eq!(counts(&run(&f, false)), (1, 0, 1));
}

async fn call(
    svc: &Arc<Service>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let req = Request::builder().method(method).uri(path);
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = tidepool::api::app(tidepool::api::AppState::new(svc.clone()))
        .oneshot(req)
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_shows_the_mark_in_the_run_and_resets_it() {
    let f = Fixture::new();
    let src = f.db("src.sqlite");
    src.execute_batch(
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, modified_at TEXT);
         INSERT INTO items VALUES (1, 'a', '2026-03-01 10:01:00'), (2, 'b', '2026-03-01 10:02:00')",
    )
    .unwrap();
    project(
        &f,
        "kind = \"sqlite\"\npath = \"${DATA_DIR}/src.sqlite\"",
        QUERY,
    );
    f.write(
        "projects/p/jobs/plain.toml",
        "[origin]\nconnection = \"src\"\nquery = \"SELECT id FROM items\"\n[destination]\nconnection = \"dst\"\n\
         [[stages]]\ntable = \"items\"\naction = \"update/insert\"\nfields = [{ column = \"id\", origin = \"id\", match = true }]\n",
    );
    let config = ServerConfig {
        data_dir: f.data.clone(),
        projects: f.projects.clone(),
        workers: 1,
        ..ServerConfig::default()
    };
    let store = Arc::new(SqliteStore::open(&f.data.join("tidepool.sqlite")).unwrap());
    let svc = Service::new(config, store).await.unwrap();
    svc.start();

    let (status, run) = call(
        &svc,
        "POST",
        "/v1/ExecuteJob",
        Some(
            json!({"projectID": "p", "jobID": "items", "runID": uuid::Uuid::new_v4().to_string()}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{run:#}");
    assert_eq!(run["totalRows"], 2);
    let id = run["runID"].as_str().unwrap();
    let (_, detail) = call(&svc, "GET", &format!("/v1/Runs/{id}"), None).await;
    assert_eq!(
        detail["loads"],
        json!([{"jobID": "items", "highWater": {
            "field": "modified_at", "before": null, "after": "2026-03-01 10:02:00", "kept": true}}]),
        "{detail:#}"
    );
    // The Results contract is unchanged.
    let (_, results) = call(&svc, "GET", &format!("/v1/Results/{id}"), None).await;
    assert!(results[0].get("loads").is_none() && results[0].get("highWater").is_none());

    let (status, body) = call(&svc, "DELETE", "/v1/Jobs/P/Items/HighWater", None).await;
    assert_eq!(status, StatusCode::OK, "{body:#}");
    assert_eq!(
        body,
        json!({"projectID": "p", "jobID": "items", "previous": "2026-03-01 10:02:00"})
    );
    let (status, body) = call(&svc, "DELETE", "/v1/Jobs/p/items/HighWater", None).await;
    assert_eq!((status, &body["previous"]), (StatusCode::OK, &Value::Null));
    let (status, body) = call(&svc, "DELETE", "/v1/Jobs/p/plain/HighWater", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body:#}");
    assert!(
        body["error"].as_str().unwrap().contains("not incremental")
            || body["error"].as_str().unwrap().contains("no incremental")
    );
    for path in ["/v1/Jobs/p/nope/HighWater", "/v1/Jobs/nope/items/HighWater"] {
        let (status, body) = call(&svc, "DELETE", path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body:#}");
    }
    // Reset: the next run reads both rows again.
    let (_, run) = call(
        &svc,
        "POST",
        "/v1/ExecuteJob",
        Some(
            json!({"projectID": "p", "jobID": "items", "runID": uuid::Uuid::new_v4().to_string()}),
        ),
    )
    .await;
    assert_eq!(run["totalRows"], 2, "{run:#}");
}

#[test]
fn the_example_project_syncs_incrementally_from_the_command_line() {
    let f = Fixture::new();
    let projects = common::repo_projects().to_str().unwrap().to_owned();
    let data = f.data.to_str().unwrap().to_owned();
    let tidepool = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(args)
            .args(["--projects", &projects, "--data-dir", &data])
            .env_remove("TIDEPOOL_STORE")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let rows_of = |out: &str| -> String {
        let line = out
            .lines()
            .find(|l| l.starts_with("orders "))
            .unwrap_or_else(|| panic!("{out}"));
        line.split_whitespace().nth(2).unwrap().to_owned()
    };
    assert_eq!(rows_of(&tidepool(&["run", "sync", "orders"])), "5");
    assert_eq!(rows_of(&tidepool(&["run", "sync", "orders"])), "0");
    let out = tidepool(&["incremental", "reset", "sync", "orders"]);
    assert!(out.contains("2026-01-07 17:20:00 was reset"), "{out}");
    assert_eq!(rows_of(&tidepool(&["run", "sync", "orders"])), "5");
    let out = tidepool(&["run", "sync", "orders", "--reset-incremental"]);
    assert_eq!(rows_of(&out), "5");
    assert_eq!(
        rows(&f.db("sync-target.sqlite"), "SELECT COUNT(*) FROM orders"),
        ["5"]
    );
}
