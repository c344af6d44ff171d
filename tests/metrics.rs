//! `/metrics` through the real router on a real SQLite store: behind the
//! same credentials as the API when users exist, filtered to the caller's
//! instances, open in open mode.
//!
//! The Prometheus recorder is one per process, so each test names its own
//! instances (a fresh suffix) and looks only at their series.

mod common;

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
    _f: Fixture,
    svc: api::AppState,
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

/// A project `p` in `instance`: two CSV rows into a SQLite table.
fn project(f: &Fixture, instance: &str) {
    f.project(
        instance,
        &format!(
            r#"
id = "p"
instance = "{instance}"
[connections.src]
kind = "csv"
path = "in.csv"
[connections.db]
kind = "sqlite"
path = "${{DATA_DIR}}/{instance}.sqlite"
init_sql = ["CREATE TABLE IF NOT EXISTS people (id INTEGER PRIMARY KEY, name TEXT)"]
"#
        ),
        &[(
            "load",
            r#"
[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "people"
action = "insert"
fields = [
  { column = "id", origin = "id" },
  { column = "name", origin = "name" },
]
"#,
        )],
    );
    f.write(
        &format!("projects/{instance}/in.csv"),
        "id,name\n1,ann\n2,bob\n",
    );
}

/// One hash for every user (argon2 is slow in a debug build).
fn password_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| api::auth::hash_password("a-long-password").unwrap())
}

fn user(name: &str, grants: &[(&str, Role)]) -> UserRecord {
    UserRecord {
        name: name.into(),
        password_hash: password_hash().to_owned(),
        primary_instance: grants[0].0.into(),
        grants: grants.iter().map(|(i, r)| (i.to_string(), *r)).collect(),
    }
}

/// A server with projects in `instances` and these users (none: open mode).
async fn serve(instances: &[&str], users: Vec<UserRecord>) -> Api {
    serve_in(Fixture::new(), instances, users).await
}

async fn serve_in(f: Fixture, instances: &[&str], users: Vec<UserRecord>) -> Api {
    for i in instances {
        project(&f, i);
    }
    let config = ServerConfig {
        data_dir: f.data.clone(),
        projects: f.projects.clone(),
        workers: 2,
        ..ServerConfig::default()
    };
    let store = Arc::new(SqliteStore::open(&f.data.join("tidepool.sqlite")).unwrap());
    for u in users {
        store.put_user(u).await.unwrap();
    }
    let svc = Service::new(config, store).await.unwrap();
    svc.start();
    Api {
        _f: f,
        svc: api::AppState::new(svc),
    }
}

impl Api {
    async fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
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

    async fn key_for(&self, user: &str) -> String {
        let key = api::auth::new_secret("tpk_");
        self.svc
            .store
            .put_api_key(&api::auth::digest(&key), user, "test")
            .await
            .unwrap();
        key
    }

    /// Runs job `load` of project `p` in `instance` to its end, as `auth`.
    async fn run(&self, instance: &str, auth: &[(&str, &str)]) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let body = json!({"runID": id, "projectID": "p", "jobID": "load", "instance": instance});
        let mut headers = vec![("content-type", "application/json")];
        headers.extend_from_slice(auth);
        let r = self
            .call("POST", "/v1/ExecuteJobAsync", &headers, &body.to_string())
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let path = format!("/v1/Results/{id}?instance={instance}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.call("GET", &path, auth, "").await;
            let v: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
            if v[0]["status"] == "Complete" {
                return id;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {id}: {}",
                r.body
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metrics(&self, auth: &[(&str, &str)]) -> Answer {
        self.call("GET", "/metrics", auth, "").await
    }
}

fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

fn runs_line(instance: &str) -> String {
    format!("tidepool_runs_total{{instance=\"{instance}\",status=\"Complete\"}} 1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_a_credential_and_show_the_callers_instances_only() {
    let s = suffix();
    let (acme, globex) = (format!("acme-{s}"), format!("globex-{s}"));
    let users = vec![
        user("ann", &[(&acme, Role::Owner)]),
        user("gus", &[(&globex, Role::Owner)]),
        user("scraper", &[(&acme, Role::Metrics)]),
        user("all", &[("*", Role::Metrics)]),
        user("ro", &[(&acme, Role::ReadOnly), (&globex, Role::Full)]),
    ];
    let a = serve(&[&acme, &globex], users).await;
    assert!(!a.svc.open);
    let ann = a.key_for("ann").await;
    let gus = a.key_for("gus").await;
    let acme_run = a.run(&acme, &[("x-api-key", &ann)]).await;
    a.run(&globex, &[("x-api-key", &gus)]).await;

    // No credentials, or bad ones: 401, as everywhere in the API.
    let r = a.metrics(&[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert!(!r.body.contains("tidepool_"), "{}", r.body);
    let r = a.metrics(&[("x-api-key", "tpk_nope")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Roles that read runs but not metrics: 403, naming what is needed.
    let ro = a.key_for("ro").await;
    let r = a.metrics(&[("x-api-key", &ro)]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(r.body.contains("Metrics role"), "{}", r.body);

    // A Metrics key for acme: acme's series only, none server-wide.
    let scraper = a.key_for("scraper").await;
    let r = a.metrics(&[("x-api-key", &scraper)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(r.body.contains(&runs_line(&acme)), "{}", r.body);
    assert!(
        r.body.contains(&format!(
            "tidepool_rows_total{{instance=\"{acme}\",counter=\"inserts\"}} 2"
        )),
        "{}",
        r.body
    );
    assert!(
        r.body.contains("# TYPE tidepool_runs_total counter"),
        "{}",
        r.body
    );
    for absent in [
        globex.as_str(),
        "tidepool_queue_depth",
        "tidepool_http_request",
    ] {
        assert!(!r.body.contains(absent), "{absent} in {}", r.body);
    }
    for line in r.body.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.contains(&format!("instance=\"{acme}\"")), "{line}");
    }
    // ...and nothing else: not acme's runs, projects or jobs.
    let r = a
        .call(
            "GET",
            &format!("/v1/Results/{acme_run}?instance={acme}"),
            &[("x-api-key", &scraper)],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = a
        .call("GET", "/v1/Projects", &[("x-api-key", &scraper)], "")
        .await;
    assert_eq!(r.body, "[]");
    let body = json!({"runID": uuid::Uuid::new_v4().to_string(), "projectID": "p", "jobID": "load", "instance": acme});
    let r = a
        .call(
            "POST",
            "/v1/ExecuteJobAsync",
            &[
                ("content-type", "application/json"),
                ("x-api-key", &scraper),
            ],
            &body.to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // An Owner reads its own instance's series, with a bearer token too.
    let tok = a
        .call(
            "POST",
            "/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            "grant_type=password&username=gus&password=a-long-password",
        )
        .await;
    let tok: Value = serde_json::from_str(&tok.body).unwrap();
    let bearer = format!("Bearer {}", tok["access_token"].as_str().unwrap());
    let r = a.metrics(&[("authorization", &bearer)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains(&runs_line(&globex)), "{}", r.body);
    assert!(!r.body.contains(&acme), "{}", r.body);

    // Metrics on * reads everything, server-wide series included.
    let all = a.key_for("all").await;
    let r = a.metrics(&[("x-api-key", &all)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    for present in [
        runs_line(&acme),
        runs_line(&globex),
        "tidepool_queue_depth".into(),
    ] {
        assert!(
            r.body.contains(&present),
            "{present} missing from {}",
            r.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_metrics_stay_open_and_whole() {
    let s = suffix();
    let (one, two) = (format!("one-{s}"), format!("two-{s}"));
    let a = serve(&[&one, &two], Vec::new()).await;
    assert!(a.svc.open);
    a.run(&one, &[]).await;
    a.run(&two, &[]).await;
    let r = a.metrics(&[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    for present in [
        runs_line(&one),
        runs_line(&two),
        "tidepool_queue_depth".into(),
    ] {
        assert!(
            r.body.contains(&present),
            "{present} missing from {}",
            r.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_makes_metrics_users_and_keeps_star_for_metrics() {
    let f = Fixture::new();
    let tp = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(args)
            .arg("--data-dir")
            .arg(&f.data)
            .env("TIDEPOOL_PASSWORD", "a-long-password")
            .output()
            .unwrap()
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let out = tp(&["user", "add", "boss", "--instance", "*:Owner"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("goes with the Metrics role only"),
        "{}",
        text(&out.stderr)
    );
    let out = tp(&["user", "add", "prom", "--instance", "*:metrics"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = tp(&["key", "create", "prom"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = text(&out.stdout).trim().to_owned();

    let one = format!("one-{}", suffix());
    let a = serve_in(f, &[&one], Vec::new()).await;
    assert!(!a.svc.open);
    let r = a
        .metrics(&[("authorization", &format!("Bearer {key}"))])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("tidepool_queue_depth"), "{}", r.body);
    assert_eq!(a.metrics(&[]).await.status, StatusCode::UNAUTHORIZED);
}
