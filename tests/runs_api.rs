//! The console's API through the real router on a real SQLite store: the run
//! list (filters, paging, instances), a run's log and row errors, live events.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::Fixture;
use serde_json::{Value, json};
use tidepool::api;
use tidepool::server::{ServerConfig, Service};
use tidepool::store::{Role, SqliteStore, Store, UserRecord};
use tower::ServiceExt;

struct Api {
    f: Fixture,
    svc: api::AppState,
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// The demo project, in instance `default` and (same ID) in instance `other`.
fn copy_demo(f: &Fixture) {
    let src = common::repo_projects().join("demo");
    for (dir, instance) in [("demo", None), ("demo_other", Some("other"))] {
        for rel in [
            "project.toml",
            "jobs/contacts.toml",
            "jobs/countries.toml",
            "data/contacts.csv",
        ] {
            let mut text = std::fs::read_to_string(src.join(rel)).unwrap();
            if let (Some(i), "project.toml") = (instance, rel) {
                text = text.replacen(
                    "id = \"demo\"",
                    &format!("id = \"demo\"\ninstance = \"{i}\""),
                    1,
                );
            }
            f.write(&format!("projects/{dir}/{rel}"), text);
        }
    }
}

/// API keys of the test users: `key-<name>`.
fn key_of(name: &str) -> String {
    format!("tpk_test_{name}")
}

/// A server over the demo project; `users` get an API key each (`key_of`).
async fn api_with(users: &[(&str, &[(&str, Role)])], start: bool) -> Api {
    let f = Fixture::new();
    copy_demo(&f);
    let config = ServerConfig {
        data_dir: f.data.clone(),
        projects: f.projects.clone(),
        workers: 2,
        ..ServerConfig::default()
    };
    let store = Arc::new(SqliteStore::open(&f.data.join("tidepool.sqlite")).unwrap());
    for (name, grants) in users {
        store
            .put_user(UserRecord {
                name: name.to_string(),
                password_hash: String::new(),
                primary_instance: grants[0].0.into(),
                grants: grants.iter().map(|(i, r)| (i.to_string(), *r)).collect(),
            })
            .await
            .unwrap();
        store
            .put_api_key(&api::auth::digest(&key_of(name)), name, "test")
            .await
            .unwrap();
    }
    let svc = Service::new(config, store).await.unwrap();
    if start {
        svc.start();
    }
    Api {
        f,
        svc: api::AppState::new(svc),
    }
}

impl Api {
    async fn call(&self, method: &str, path: &str, who: Option<&str>, body: Value) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        if let Some(name) = who {
            req = req.header("x-api-key", key_of(name));
        }
        let body = if body.is_null() {
            Body::empty()
        } else {
            Body::from(body.to_string())
        };
        let resp = api::app(self.svc.clone())
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn get(&self, path: &str, who: Option<&str>) -> Answer {
        self.call("GET", path, who, Value::Null).await
    }

    /// Starts the demo job; returns the runID.
    async fn start(&self, who: Option<&str>, job: &str, argument: &str, level: u8) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let r = self
            .call(
                "POST",
                "/v1/ExecuteJobAsync",
                who,
                json!({"runID": id, "projectID": "demo", "jobID": job,
                       "argument": argument, "loggingLevel": level}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        id
    }

    /// Polls the run until it has ended; returns `GET /v1/Runs/{id}`.
    async fn wait_end(&self, id: &str, who: Option<&str>) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.get(&format!("/v1/Runs/{id}"), who).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            let v = r.json();
            if !matches!(v["status"].as_str(), Some("Queued" | "Running")) {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "run {id} did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every page of `GET /v1/Runs?{query}` with `limit`, in order.
    async fn all_pages(&self, query: &str, limit: usize, who: Option<&str>) -> Vec<Value> {
        let mut runs = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..1000 {
            let mut path = format!("/v1/Runs?limit={limit}&{query}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let r = self.get(&path, who).await;
            assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
            let v = r.json();
            let page = v["runs"].as_array().unwrap().clone();
            assert!(page.len() <= limit, "a page holds at most limit runs");
            runs.extend(page);
            match v["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return runs,
            }
        }
        panic!("paging did not end");
    }
}

fn ids(runs: &[Value]) -> Vec<String> {
    runs.iter()
        .map(|r| r["runID"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_list_pages_newest_first_without_gaps_or_duplicates_and_filters() {
    // Not started: runs stay Queued unless cancelled, so statuses are ours to set.
    let a = api_with(&[], false).await;
    let mut started = Vec::new();
    for i in 0..23 {
        let job = if i % 3 == 0 { "countries" } else { "contacts" };
        let arg = if i % 5 == 0 { "Nightly-EU" } else { "adhoc" };
        started.push(a.start(None, job, arg, 0).await);
    }
    for id in started.iter().step_by(4) {
        let r = a
            .call("POST", &format!("/v1/Runs/{id}/cancel"), None, Value::Null)
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    }

    let all = a.all_pages("", 5, None).await;
    let got = ids(&all);
    assert_eq!(got.len(), 23, "every run once");
    assert_eq!(
        got.iter().collect::<HashSet<_>>().len(),
        23,
        "no duplicates"
    );
    let mut newest_first = started.clone();
    newest_first.reverse();
    // Accepted in order, one after the other: newest first is the reverse
    // (runs accepted in the same millisecond are ordered by ID).
    let accepted: Vec<&str> = all
        .iter()
        .map(|r| r["accepted"].as_str().unwrap())
        .collect();
    let mut sorted = accepted.clone();
    sorted.sort_by(|x, y| y.cmp(x));
    assert_eq!(accepted, sorted, "newest first");
    assert_eq!(
        got.iter().collect::<HashSet<_>>(),
        newest_first.iter().collect::<HashSet<_>>()
    );

    let first = &all[0];
    assert_eq!(first["projectID"], "demo");
    assert_eq!(first["instance"], "default");
    assert!(first["counters"]["totalRows"].is_number(), "{first}");

    // Filters, each paged.
    let cancelled = a.all_pages("status=cancelled", 2, None).await;
    assert_eq!(cancelled.len(), 6);
    assert!(cancelled.iter().all(|r| r["status"] == "Cancelled"));
    let queued = a.all_pages("status=Queued&job=countries", 3, None).await;
    let expect = (0..23).filter(|i| i % 3 == 0 && i % 4 != 0).count();
    assert_eq!(queued.len(), expect);
    assert!(
        queued
            .iter()
            .all(|r| r["jobID"] == "countries" && r["status"] == "Queued")
    );
    let nightly = a.all_pages("q=nightly-eu&project=demo", 2, None).await;
    assert_eq!(nightly.len(), 5, "argument text, case-insensitive");
    assert!(nightly.iter().all(|r| r["argument"] == "Nightly-EU"));
    assert!(a.all_pages("project=nosuch", 5, None).await.is_empty());

    // A time window: nothing after a time in the future, everything since the past.
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let q = format!("since={}", url_encode(&future));
    assert!(a.all_pages(&q, 5, None).await.is_empty());
    let q = format!("since={}&until={}", url_encode(&past), url_encode(&future));
    assert_eq!(a.all_pages(&q, 50, None).await.len(), 23);

    // Bad parameters are named.
    for (q, word) in [
        ("status=Done", "status"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("since=yesterday", "since"),
        ("cursor=xyz", "cursor"),
    ] {
        let r = a.get(&format!("/v1/Runs?{q}"), None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {}", r.body);
        assert!(
            r.json()["error"].as_str().unwrap().contains(word),
            "{q}: {}",
            r.body
        );
    }
}

fn url_encode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_sees_only_the_runs_of_their_instances() {
    let a = api_with(
        &[
            ("ann", &[("default", Role::Owner)]),
            ("bob", &[("other", Role::Owner)]),
            ("cy", &[("other", Role::Full), ("default", Role::ReadOnly)]),
        ],
        false,
    )
    .await;
    let mine: Vec<String> = [
        a.start(Some("ann"), "contacts", "", 0).await,
        a.start(Some("ann"), "contacts", "", 0).await,
    ]
    .into();
    let r = a.get("/v1/Runs", Some("ann")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(ids(r.json()["runs"].as_array().unwrap()).len(), 2);

    let r = a.get("/v1/Runs?instance=other", Some("ann")).await;
    assert_eq!(r.json(), json!({"runs": [], "nextCursor": null}));
    let r = a.get("/v1/Runs", Some("bob")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json(), json!({"runs": [], "nextCursor": null}));
    let theirs: Vec<String> = [
        a.start(Some("bob"), "contacts", "", 0).await,
        a.start(Some("bob"), "countries", "", 0).await,
    ]
    .into();
    let r = a.get("/v1/Runs", Some("bob")).await;
    let got = ids(r.json()["runs"].as_array().unwrap());
    assert_eq!(got, vec![theirs[1].clone(), theirs[0].clone()]);
    assert!(
        r.json()["runs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["instance"] == "other")
    );
    let r = a.get("/v1/Runs?instance=default", Some("bob")).await;
    assert_eq!(
        r.json()["runs"],
        json!([]),
        "asking for another instance finds nothing"
    );
    for id in &mine {
        let r = a.get(&format!("/v1/Runs/{id}"), Some("bob")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }

    // A user of two instances sees both, merged newest first, across pages.
    let all = a.all_pages("", 1, Some("cy")).await;
    let mut got = ids(&all);
    got.sort();
    let mut want = [mine.clone(), theirs.clone()].concat();
    want.sort();
    assert_eq!(got, want);
    let accepted: Vec<&str> = all
        .iter()
        .map(|r| r["accepted"].as_str().unwrap())
        .collect();
    let mut sorted = accepted.clone();
    sorted.sort_by(|x, y| y.cmp(x));
    assert_eq!(accepted, sorted, "newest first across instances");

    let r = a.get("/v1/Runs", None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demos_three_row_errors_are_kept_at_logging_level_0_with_their_origin_values() {
    let a = api_with(&[], true).await;
    let id = a.start(None, "contacts", "", 0).await;
    let run = a.wait_end(&id, None).await;
    assert_eq!(run["errors"], 3);
    assert_eq!(
        run["log"],
        json!([]),
        "level 0: the answer's log stays empty"
    );

    let r = a.get(&format!("/v1/Runs/{id}/errors"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = r.json();
    assert_eq!(v["total"], 3);
    assert_eq!(v["kept"], 3);
    assert_eq!(v["truncated"], false);
    assert_eq!(v["nextCursor"], Value::Null);
    let errors = v["errors"].as_array().unwrap();
    let rows: Vec<u64> = errors.iter().map(|e| e["row"].as_u64().unwrap()).collect();
    assert_eq!(rows, [101, 502, 903]);
    let amounts: Vec<&str> = errors
        .iter()
        .map(|e| e["values"]["Amount"].as_str().unwrap())
        .collect();
    assert_eq!(amounts, ["n/a", "12,50", "abc"]);
    let first = &errors[0];
    assert_eq!(first["jobID"], "contacts");
    assert_eq!(first["stage"], 1);
    assert_eq!(first["stageName"], "upsert contacts");
    assert_eq!(first["values"]["Id"], "101");
    assert_eq!(first["values"]["City"], "Perth");
    assert_eq!(first["columns"][0], "Id");
    assert!(
        first["message"].as_str().unwrap().contains("amount"),
        "{first}"
    );

    // Paged one at a time: the same three, in order.
    let p1 = a
        .get(&format!("/v1/Runs/{id}/errors?limit=2"), None)
        .await
        .json();
    assert_eq!(p1["errors"].as_array().unwrap().len(), 2);
    let c = p1["nextCursor"].as_str().unwrap();
    let p2 = a
        .get(&format!("/v1/Runs/{id}/errors?limit=2&cursor={c}"), None)
        .await
        .json();
    assert_eq!(p2["errors"][0]["row"], 903);
    assert_eq!(p2["nextCursor"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_level_3_log_pages_line_by_line_and_filters_by_level() {
    let a = api_with(&[], true).await;
    let id = a.start(None, "contacts", "", 3).await;
    let run = a.wait_end(&id, None).await;
    let whole = run["log"].as_array().unwrap().clone();
    assert!(
        whole.len() > 1000,
        "a line per row at level 3: {}",
        whole.len()
    );

    let mut lines = Vec::new();
    let mut cursor = String::new();
    loop {
        let r = a
            .get(
                &format!("/v1/Runs/{id}/log?limit=300&cursor={cursor}"),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let v = r.json();
        let page = v["lines"].as_array().unwrap();
        assert!(page.len() <= 300);
        lines.extend(page.iter().cloned());
        match v["nextCursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    assert_eq!(
        lines.len(),
        whole.len(),
        "the pages hold the whole log once"
    );
    for (paged, blob) in lines.iter().zip(&whole) {
        assert_eq!(paged["message"], blob["message"]);
        assert_eq!(paged["level"], blob["level"]);
        assert_eq!(paged["row"], blob["row"]);
    }
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");

    let low = a
        .get(&format!("/v1/Runs/{id}/log?level=Low&limit=1000"), None)
        .await
        .json();
    let low = low["lines"].as_array().unwrap();
    let want = whole.iter().filter(|l| l["level"] == "Low").count();
    assert_eq!(low.len(), want);
    assert!(low.iter().all(|l| l["level"] == "Low"));
    assert!(
        low.iter()
            .any(|l| l["message"].as_str().unwrap().contains("row 502")),
        "row errors are Low lines"
    );
    let r = a.get(&format!("/v1/Runs/{id}/log?level=9"), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("level"), "{}", r.body);
    let r = a
        .get(&format!("/v1/Runs/{}/log", uuid::Uuid::new_v4()), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// The events of an SSE body: (name, data as JSON).
fn sse_events(body: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for block in body.split("\n\n") {
        let mut name = String::from("message");
        let mut data = String::new();
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event:") {
                name = n.trim().to_owned();
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            }
        }
        if !data.is_empty() {
            out.push((name, serde_json::from_str(&data).unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_of_a_run_ends_with_its_final_counters_and_closes() {
    let a = api_with(&[], true).await;
    let id = a.start(None, "contacts", "", 1).await;
    // The stream closes by itself after `end`: reading the whole body ends.
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        a.get(&format!("/v1/Runs/{id}/events"), None),
    )
    .await
    .expect("the stream closes after the run ends");
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_events(&r.body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"status"), "{names:?}");
    assert_eq!(names.last(), Some(&"end"), "{names:?}");
    let end = &events.last().unwrap().1;
    assert_eq!(end["status"], "Complete");
    assert_eq!(end["runID"], id.as_str());
    assert_eq!(end["counters"]["totalRows"], 1000);
    assert_eq!(end["counters"]["inserts"], 997);
    assert_eq!(end["counters"]["errors"], 3);
    // The run list says the same once the run has ended (an ended run keeps
    // its results inside its response).
    let listed = a.get("/v1/Runs", None).await.json();
    assert_eq!(listed["runs"][0]["runID"], id.as_str(), "{listed}");
    assert_eq!(listed["runs"][0]["counters"]["inserts"], 997, "{listed}");
    assert_eq!(listed["runs"][0]["counters"]["errors"], 3, "{listed}");
    let log: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "log")
        .map(|(_, v)| v)
        .collect();
    assert!(
        log.iter()
            .any(|l| l["message"].as_str().unwrap().contains("row 903")),
        "the log lines come before the end: {log:?}"
    );
    let statuses: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "status")
        .map(|(_, v)| &v["status"])
        .collect();
    assert_eq!(statuses.last().unwrap().as_str(), Some("Complete"));

    // A run that has ended already: status, its log, end.
    let again = a.get(&format!("/v1/Runs/{id}/events"), None).await;
    let names: Vec<String> = sse_events(&again.body)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names.first().map(String::as_str), Some("status"));
    assert_eq!(names.last().map(String::as_str), Some("end"));

    let r = a
        .get(&format!("/v1/Runs/{}/events", uuid::Uuid::new_v4()), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// `tidepool run` on the fixture's projects and data dir.
fn cli_run(a: &Api, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args([
            "run",
            "demo",
            "contacts",
            "--logging-level",
            "0",
            "--projects",
        ])
        .arg(&a.f.projects)
        .arg("--data-dir")
        .arg(&a.f.data)
        .args(extra)
        .env_remove("TIDEPOOL_PROJECTS")
        .env_remove("TIDEPOOL_DATA_DIR")
        .env_remove("TIDEPOOL_STORE")
        .output()
        .expect("run tidepool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_the_command_line_are_in_the_servers_history() {
    let a = api_with(&[], false).await;
    let id = uuid::Uuid::new_v4().to_string();
    let out = cli_run(&a, &["--run-id", &id, "--argument", "from the shell"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let r = a.get("/v1/Runs", None).await.json();
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(
        ids(runs),
        vec![id.clone()],
        "recorded in the data dir's store"
    );
    assert_eq!(runs[0]["status"], "Complete");
    assert_eq!(runs[0]["argument"], "from the shell");
    assert_eq!(runs[0]["counters"]["inserts"], 997);
    assert!(runs[0]["durationMs"].is_number(), "{}", runs[0]);
    let detail = a.get(&format!("/v1/Runs/{id}"), None).await.json();
    assert_eq!(detail["errors"], 3);
    let errors = a.get(&format!("/v1/Runs/{id}/errors"), None).await.json();
    assert_eq!(errors["total"], 3);
    assert_eq!(errors["errors"][1]["values"]["Amount"], "12,50");

    // Opted out, or a preview: not recorded.
    let out = cli_run(&a, &["--no-record"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli_run(&a, &["--preview"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = a.get("/v1/Runs", None).await.json();
    assert_eq!(r["runs"].as_array().unwrap().len(), 1);

    // Another store, named.
    let other = a.f.root.join("elsewhere.sqlite");
    let out = cli_run(&a, &["--store", &format!("sqlite:{}", other.display())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = rusqlite::Connection::open(&other).unwrap();
    let n: i64 = db
        .query_row(
            "SELECT count(*) FROM runs WHERE status = 'Complete'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
}

const TAGGED_PROJECT: &str = r#"id = "tagged"
[connections.src]
kind = "csv"
path = "in.csv"
[connections.db]
kind = "sqlite"
path = "${DATA_DIR}/tagged.sqlite"
init_sql = ["CREATE TABLE IF NOT EXISTS t(id INTEGER, name TEXT, tag TEXT)"]
"#;

/// A job that inserts every row with `tag` set to this text.
fn tagged_job(tag: &str) -> String {
    format!(
        r#"[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "t"
action = "insert"
fields = [{{ column = "id", origin = "id" }}, {{ column = "name", origin = "name" }}, {{ column = "tag", template = "{tag}" }}]
"#
    )
}

fn tags(a: &Api) -> Vec<(String, i64)> {
    let db = rusqlite::Connection::open(a.f.data.join("tagged.sqlite")).unwrap();
    let mut st = db
        .prepare("SELECT tag, count(*) FROM t GROUP BY tag ORDER BY tag")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_picks_up_new_projects_reports_broken_ones_and_runs_keep_their_version() {
    let a = api_with(&[], true).await;
    let r = a.get("/v1/Projects", None).await.json();
    assert!(
        r.as_array()
            .unwrap()
            .iter()
            .all(|p| p["projectID"] != "tagged")
    );

    let mut csv = String::from("id,name\n");
    for i in 0..200_000 {
        csv.push_str(&format!("{i},name {i}\n"));
    }
    a.f.project("tagged", TAGGED_PROJECT, &[("load", &tagged_job("v1"))]);
    a.f.write("projects/tagged/in.csv", csv);
    // A broken project: a stage with an unknown action, on line 7 of its job.
    a.f.project(
        "m1",
        "id = \"m1\"\n[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n",
        &[(
            "orders",
            "[origin]\nconnection = \"src\"\n[destination]\nconnection = \"src\"\n[[stages]]\ntable = \"t\"\naction = \"explode\"\n",
        )],
    );
    let r = a
        .call("POST", "/v1/Projects/reload", None, Value::Null)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let list = r.json();
    let tagged = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["projectID"] == "tagged")
        .unwrap_or_else(|| panic!("the new project is listed: {list}"));
    assert_eq!(tagged["loaded"], true);
    let m1 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["projectID"] == "m1")
        .unwrap_or_else(|| panic!("the broken project is listed: {list}"));
    assert_eq!(m1["loaded"], false);
    let errors: Vec<&str> = m1["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("orders.toml:7:")),
        "file:line: reason: {errors:?}"
    );

    // A run of the broken project says why it is unknown.
    let r = a
        .call(
            "POST",
            "/v1/ExecuteJobAsync",
            None,
            json!({"runID": uuid::Uuid::new_v4().to_string(), "projectID": "m1", "jobID": "orders"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let why = r.json()["error"].as_str().unwrap().to_owned();
    assert!(
        why.contains("did not load") && why.contains("orders.toml:7:"),
        "{why}"
    );

    // A run going when the job changes keeps the version it started with.
    // The test holds the destination's write lock, so the run cannot end
    // (its writer waits, up to the connection's 60 s busy timeout) until the
    // reload is done, however fast or slow the machine.
    let lock = rusqlite::Connection::open(a.f.data.join("tagged.sqlite")).unwrap();
    lock.execute_batch(
        "CREATE TABLE IF NOT EXISTS t(id INTEGER, name TEXT, tag TEXT); BEGIN IMMEDIATE",
    )
    .unwrap();
    let first = uuid::Uuid::new_v4().to_string();
    let body = json!({"runID": first, "projectID": "tagged", "jobID": "load"});
    let r = a.call("POST", "/v1/ExecuteJobAsync", None, body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = a.get(&format!("/v1/Results/{first}"), None).await.json();
        if v[0]["status"] == "Running" {
            break;
        }
        assert!(
            v[0]["status"] != "Complete",
            "the run ended before the reload"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the run did not start"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.f.write("projects/tagged/jobs/load.toml", tagged_job("v2"));
    let r = a
        .call("POST", "/v1/Projects/reload", None, Value::Null)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = a.get(&format!("/v1/Results/{first}"), None).await.json();
    assert_eq!(
        v[0]["status"], "Running",
        "the reload happened while the run went"
    );
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let run = a.wait_end(&first, None).await;
    assert_eq!(run["status"], "Complete", "{run}");
    assert_eq!(tags(&a), vec![("v1".to_owned(), 200_000)]);

    // The next run gets the new version.
    let second = uuid::Uuid::new_v4().to_string();
    let body =
        json!({"runID": second, "projectID": "tagged", "jobID": "load", "endAfterRow": "10"});
    let r = a.call("POST", "/v1/ExecuteJobAsync", None, body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    a.wait_end(&second, None).await;
    assert_eq!(
        tags(&a),
        vec![("v1".to_owned(), 200_000), ("v2".to_owned(), 10)]
    );
}

impl Api {
    /// A request with these headers (and a JSON or form body).
    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = api::app(self.svc.clone())
            .oneshot(req.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }
}

/// Sets a user's password (the API-key users of `api_with` have none).
async fn set_password(a: &Api, name: &str, password: &str) {
    let mut u = a.svc.store.user(name).await.unwrap().unwrap();
    u.password_hash = api::auth::hash_password(password).unwrap();
    a.svc.store.put_user(u).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_login_sets_a_strict_cookie_and_state_changes_need_the_csrf_header() {
    let a = api_with(
        &[
            ("ann", &[("default", Role::Owner)]),
            ("rita", &[("default", Role::ReadOnly)]),
        ],
        false,
    )
    .await;
    set_password(&a, "ann", "ann-secret-1").await;
    set_password(&a, "rita", "rita-secret-1").await;
    let json_ct = ("content-type", "application/json");

    let r = a
        .send(
            "POST",
            "/console/login",
            &[json_ct],
            r#"{"user":"ann","password":"nope"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert!(r.headers.get("set-cookie").is_none());

    let r = a
        .send(
            "POST",
            "/console/login",
            &[("content-type", "application/x-www-form-urlencoded")],
            "user=ann&password=ann-secret-1",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["user"], "ann");
    assert_eq!(r.json()["roles"]["default"], "Owner");
    let set = r.headers["set-cookie"].to_str().unwrap().to_owned();
    for part in [
        "tidepool_session=tpt_",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
    ] {
        assert!(set.contains(part), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_owned();

    let r = a
        .send("GET", "/console/me", &[("cookie", &cookie)], "")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"user": "ann", "roles": {"default": "Owner"}, "open": false})
    );
    let r = a.send("GET", "/v1/Runs", &[("cookie", &cookie)], "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = a.send("GET", "/console/me", &[], "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Starting a run by cookie: refused without the CSRF header, accepted with it.
    let body =
        |id: &str| json!({"runID": id, "projectID": "demo", "jobID": "contacts"}).to_string();
    let id = uuid::Uuid::new_v4().to_string();
    let r = a
        .send(
            "POST",
            "/v1/ExecuteJobAsync",
            &[json_ct, ("cookie", &cookie)],
            &body(&id),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(r.body.contains("x-tidepool-csrf"), "{}", r.body);
    assert_eq!(
        a.get("/v1/Runs", Some("ann")).await.json()["runs"],
        json!([])
    );
    let csrf = ("x-tidepool-csrf", "1");
    let r = a
        .send(
            "POST",
            "/v1/ExecuteJobAsync",
            &[json_ct, ("cookie", &cookie), csrf],
            &body(&id),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let cancel = format!("/v1/Runs/{id}/cancel");
    let r = a.send("POST", &cancel, &[("cookie", &cookie)], "").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    // An API key needs no CSRF header (no browser sends it by itself).
    let key = key_of("ann");
    let r = a
        .send("POST", "/v1/Projects/reload", &[("x-api-key", &key)], "")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // ReadOnly: may read, may neither start nor cancel.
    let r = a
        .send(
            "POST",
            "/console/login",
            &[json_ct],
            r#"{"user":"rita","password":"rita-secret-1"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let rita = r.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let ro = [json_ct, ("cookie", rita.as_str()), csrf];
    let r = a.send("GET", "/v1/Runs", &ro, "").await;
    assert_eq!(ids(r.json()["runs"].as_array().unwrap()), vec![id.clone()]);
    let r = a
        .send(
            "POST",
            "/v1/ExecuteJobAsync",
            &ro,
            &body(&uuid::Uuid::new_v4().to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = a.send("POST", &cancel, &ro, "").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = a.send("POST", "/v1/Projects/reload", &ro, "").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let preview = json!({"projectID": "demo", "jobID": "contacts", "rows": 2}).to_string();
    let r = a.send("POST", "/v1/Preview", &ro, &preview).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    // The owner may cancel (it is still queued: no workers run).
    let r = a
        .send("POST", &cancel, &[("cookie", &cookie), csrf], "")
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.json()["status"], "Cancelled");

    // Logging out clears the cookie and ends the session (within the
    // credential cache's few seconds).
    let r = a
        .send("POST", "/console/logout", &[("cookie", &cookie), csrf], "")
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert!(
        r.headers["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = a
            .send("GET", "/console/me", &[("cookie", &cookie)], "")
            .await;
        if r.status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the session outlived logout"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_server_needs_no_login() {
    let a = api_with(&[], false).await;
    let r = a.get("/console/me", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json(), json!({"user": null, "roles": {}, "open": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_shows_the_first_rows_and_each_stages_action_and_writes_nothing() {
    let a = api_with(&[], true).await;
    let r = a
        .call(
            "POST",
            "/v1/Preview",
            None,
            json!({"projectID": "demo", "jobID": "contacts", "rows": 5}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = r.json();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "{v}");
    assert_eq!(v["counters"]["totalRows"], 5);
    let first = &rows[0];
    assert_eq!(first["row"], 1);
    assert_eq!(first["origin"]["Id"], "1");
    let stage = &first["stages"][0];
    assert_eq!(stage["stage"], "upsert contacts");
    assert_eq!(stage["action"], "Insert");
    let name = format!(
        "{} {}",
        first["origin"]["FirstName"].as_str().unwrap(),
        first["origin"]["LastName"].as_str().unwrap()
    );
    assert_eq!(stage["values"]["full_name"], name.as_str());
    assert_eq!(stage["columns"][0], "id");

    // A window over a bad row: the row's error and the stage's Error.
    let r = a
        .call(
            "POST",
            "/v1/Preview",
            None,
            json!({"projectID": "demo", "jobID": "contacts", "rows": 3, "beginAtRow": 100}),
        )
        .await;
    let v = r.json();
    let rows = v["rows"].as_array().unwrap();
    let bad = rows
        .iter()
        .find(|r| r["row"] == 101)
        .unwrap_or_else(|| panic!("{v}"));
    assert!(bad["error"].as_str().unwrap().contains("amount"), "{bad}");
    assert_eq!(bad["stages"][0]["action"], "Error");
    assert_eq!(bad["origin"]["Amount"], "n/a");

    // Nothing written, nothing recorded.
    let db = a.f.data.join("demo.sqlite");
    if db.exists() {
        let c = rusqlite::Connection::open(&db).unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM contacts", [], |r| r.get(0))
            .unwrap_or(0);
        assert_eq!(n, 0, "a preview writes no row");
    }
    assert!(!a.f.data.join("contacts-errors.csv").exists());
    assert_eq!(a.get("/v1/Runs", None).await.json()["runs"], json!([]));

    for (body, status) in [
        (
            json!({"projectID": "demo", "jobID": "contacts", "rows": 101}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"projectID": "demo", "jobID": "nosuch"}),
            StatusCode::NOT_FOUND,
        ),
        (json!({"projectID": "demo"}), StatusCode::BAD_REQUEST),
    ] {
        let r = a.call("POST", "/v1/Preview", None, body.clone()).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert!(r.json()["error"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_answer_carries_its_request_to_run_it_again() {
    let a = api_with(&[], false).await;
    let id = uuid::Uuid::new_v4().to_string();
    let body = json!({"runID": id, "projectID": "demo", "jobID": "contacts", "argument": "again",
                      "beginAtRow": "3", "endAfterRow": "9", "threadCount": 2, "loggingLevel": 2,
                      "chainJobs": true});
    let r = a.call("POST", "/v1/ExecuteJobAsync", None, body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = a.get(&format!("/v1/Runs/{id}"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = r.json();
    assert_eq!(v["runID"], id.as_str());
    assert_eq!(v["instance"], "default");
    let req = &v["request"];
    assert_eq!(req["argument"], "again");
    assert_eq!(req["beginAtRow"], 3);
    assert_eq!(req["endAfterRow"], 9);
    assert_eq!(req["threadCount"], 2);
    assert_eq!(req["loggingLevel"], 2);
    assert_eq!(req["chainJobs"], true);
    assert_eq!(req["jobID"], "contacts");
}
