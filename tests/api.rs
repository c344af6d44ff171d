//! The v1 API through the real router (and, for crash recovery, the real
//! binary), on a real SQLite store and a real webhook receiver on loopback.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

async fn api_with(
    tweak: impl FnOnce(&mut ServerConfig),
    users: Vec<UserRecord>,
    start: bool,
) -> Api {
    let f = Fixture::new();
    f.copy_demo();
    let mut config = ServerConfig {
        data_dir: f.data.clone(),
        projects: f.projects.clone(),
        workers: 2,
        ..ServerConfig::default()
    };
    config.webhooks.first_retry_secs = 0.2;
    tweak(&mut config);
    let store = Arc::new(SqliteStore::open(&f.data.join("tidepool.sqlite")).unwrap());
    for u in users {
        store.put_user(u).await.unwrap();
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

async fn api() -> Api {
    api_with(|_| {}, Vec::new(), true).await
}

impl Api {
    async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = api::app(self.svc.clone())
            .oneshot(req.body(body.into()).unwrap())
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

    async fn post_json(&self, path: &str, body: Value) -> Answer {
        self.call(
            "POST",
            path,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }

    /// Polls Results until every job has ended.
    async fn wait_results(&self, run_id: &str, headers: &[(&str, &str)]) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let a = self
                .call(
                    "GET",
                    &format!("/v1/Results/{run_id}"),
                    headers,
                    Body::empty(),
                )
                .await;
            if a.status == StatusCode::OK {
                let v = a.json();
                let done = v
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|r| !matches!(r["status"].as_str(), Some("Queued" | "Running")));
                if done {
                    return v;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("run {run_id} did not end");
    }

    async fn run_count(&self) -> i64 {
        let db = rusqlite::Connection::open(self.f.data.join("tidepool.sqlite")).unwrap();
        db.query_row("SELECT count(*) FROM runs", [], |r| r.get(0))
            .unwrap()
    }
}

fn guid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn run_body(run_id: &str) -> Value {
    json!({"runID": run_id, "projectID": "demo", "jobID": "contacts"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_async_then_results_show_exact_counters_per_job() {
    let a = api().await;
    let id = guid();
    let mut body = run_body(&id);
    body["chainJobs"] = json!(true);
    body["loggingLevel"] = json!(1);
    let r = a.post_json("/v1/ExecuteJobAsync", body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"runID": id, "started": true, "error": null})
    );
    let results = a.wait_results(&id, &[]).await;
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 2, "one resultsResponse per job of the chain");
    assert_eq!(results[0]["jobID"], "contacts");
    assert_eq!(results[0]["status"], "Complete");
    for (k, v) in [
        ("totalRows", 1000),
        ("inserts", 997),
        ("updates", 0),
        ("errors", 3),
        ("skips", 0),
        ("ignores", 0),
        ("deletes", 0),
    ] {
        assert_eq!(results[0][k], v, "{k}");
    }
    assert_eq!(results[1]["jobID"], "countries");
    assert_eq!(results[1]["inserts"], 7);
    let start = results[0]["startTime"].as_str().unwrap();
    assert_eq!(
        start.len(),
        "2024-04-20T11:06:49.6384073-05:00".len(),
        "{start}"
    );
    let rt = results[0]["runTime"].as_str().unwrap();
    assert!(rt.starts_with("00:00:") && rt.len() == 16, "{rt}");

    // The full answer, with the log at the requested level.
    let detail = a
        .call("GET", &format!("/v1/Runs/{id}"), &[], Body::empty())
        .await
        .json();
    assert_eq!(detail["status"], "Complete");
    assert_eq!(detail["inserts"], 1004);
    let log = detail["log"].as_array().unwrap();
    assert!(log.iter().any(|e| e["row"] == 101), "{log:?}");
    assert_eq!(detail["webhookAttempts"], json!([]));
    // The demo's table holds the rows.
    let db = a.f.db("demo.sqlite");
    assert_eq!(common::rows(&db, "SELECT count(*) FROM contacts"), ["997"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xml_and_form_bodies_case_insensitive_paths_and_names() {
    let a = api().await;
    let id = guid();
    let xml = format!(
        r#"<execJobAsyncRequest xmlns:i="http://www.w3.org/2001/XMLSchema-instance" xmlns="http://schemas.datacontract.org/2004/07/StarfishAPI.Controllers"><projectID>demo</projectID><runID>{id}</runID><jobID>contacts</jobID><endAfterRow>10</endAfterRow><webHookURL i:nil="true"/></execJobAsyncRequest>"#
    );
    let r = a
        .call(
            "POST",
            "/v1/executejobasync",
            &[("content-type", "text/xml")],
            xml,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body,
        format!(
            "<execJobAsyncResponse xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns=\"http://schemas.datacontract.org/2004/07/StarfishAPI.Controllers\"><error i:nil=\"true\"/><runID>{id}</runID><started>true</started></execJobAsyncResponse>"
        )
    );
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/xml")
    );
    a.wait_results(&id, &[]).await;
    let x = a
        .call(
            "GET",
            &format!("/V1/RESULTS/{id}"),
            &[("accept", "application/xml")],
            Body::empty(),
        )
        .await;
    assert!(x.body.starts_with("<ArrayOfresultsResponse xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns=\"http://schemas.datacontract.org/2004/07/StarfishAPI.Controllers\"><resultsResponse><deletes>0</deletes><errors>0</errors><ignores>0</ignores><inserts>10</inserts>"), "{}", x.body);

    let id2 = guid();
    let form = format!(
        "RUNID={id2}&PROJECTID=demo&jobid=contacts&beginAtRow=11&endAfterRow=20&chainJobs=False&threadCount=2"
    );
    let r = a
        .call(
            "POST",
            "/V1/ExecuteJobAsync",
            &[("content-type", "application/x-www-form-urlencoded")],
            form,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let res = a.wait_results(&id2, &[]).await;
    assert_eq!(res[0]["totalRows"], 10);
    assert_eq!(res.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_status_and_names_the_problem() {
    let a = api_with(|c| c.body_limit = 4096, Vec::new(), false).await;
    let ct = [("content-type", "application/json")];
    let cases: Vec<(Answer, StatusCode, &str)> = vec![
        (a.post_json("/v1/ExecuteJobAsync", json!({"runID": guid(), "projectID": "demo"})).await, StatusCode::BAD_REQUEST, "jobID is required"),
        (a.post_json("/v1/ExecuteJobAsync", json!({"runID": "123", "projectID": "demo", "jobID": "contacts"})).await, StatusCode::BAD_REQUEST, "runID must be a GUID"),
        (a.post_json("/v1/ExecuteJobAsync", json!({"runID": guid(), "projectID": "demo", "jobID": "contacts", "beginAtRow": "abc"})).await, StatusCode::BAD_REQUEST, "beginAtRow must be a positive integer"),
        (a.post_json("/v1/ExecuteJobAsync", json!({"runID": guid(), "projectID": "demo", "jobID": "contacts", "beginAtRow": "5", "endAfterRow": "4"})).await, StatusCode::BAD_REQUEST, "endAfterRow (4) must not be less than beginAtRow (5)"),
        (a.post_json("/v1/ExecuteJobAsync", json!({"runID": guid(), "projectID": "demo", "jobID": "contacts", "loggingLevel": -1})).await, StatusCode::BAD_REQUEST, "loggingLevel"),
        (a.post_json("/v1/ExecuteJobAsync", json!({"runID": guid(), "projectID": "demo", "jobID": "contacts", "webHookURL": "not a url"})).await, StatusCode::BAD_REQUEST, "webHookURL must be an absolute http or https URL"),
        (a.call("POST", "/v1/ExecuteJobAsync", &ct, "{\"runID\": ").await, StatusCode::BAD_REQUEST, "malformed JSON: EOF while parsing a value at line 1 column 10"),
        (a.call("POST", "/v1/ExecuteJobAsync", &[("content-type", "text/xml"), ("accept", "application/json")], "<x><runID>1</x>").await, StatusCode::BAD_REQUEST, "malformed XML"),
        (a.call("POST", "/v1/ExecuteJobAsync", &[("content-type", "text/plain")], "hello").await, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported media type"),
        (a.post_json("/v1/ExecuteJobAsync", json!({"runID": guid(), "projectID": "nope", "jobID": "contacts"})).await, StatusCode::NOT_FOUND, "unknown project \"nope\""),
        (a.post_json("/v1/ExecuteJobAsync", json!({"runID": guid(), "projectID": "demo", "jobID": "nope"})).await, StatusCode::NOT_FOUND, "job \"nope\""),
        (a.call("POST", "/v1/ExecuteJobAsync", &ct, vec![b' '; 5000]).await, StatusCode::PAYLOAD_TOO_LARGE, "larger than 4096 bytes"),
    ];
    for (answer, status, text) in cases {
        assert_eq!(answer.status, status, "{text}: {}", answer.body);
        let v = answer.json();
        assert_eq!(v["started"], false, "{}", answer.body);
        assert!(
            v["error"].as_str().unwrap().contains(text),
            "{text:?} not in {}",
            answer.body
        );
    }
    assert_eq!(a.run_count().await, 0, "no refused request recorded a run");

    // Unknown runs: 404 with an empty collection.
    let r = a
        .call(
            "GET",
            &format!("/v1/Results/{}", guid()),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::NOT_FOUND, "[]"));
    let r = a
        .call("GET", "/v1/Results/not-a-guid", &[], Body::empty())
        .await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::NOT_FOUND, "[]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_run_id_never_runs_twice() {
    let a = api_with(|_| {}, Vec::new(), false).await;
    let id = guid();
    let first = a.post_json("/v1/ExecuteJobAsync", run_body(&id)).await;
    assert_eq!(first.status, StatusCode::OK);
    let again = a.post_json("/v1/ExecuteJobAsync", run_body(&id)).await;
    assert_eq!((again.status, again.json()), (StatusCode::OK, first.json()));
    let mut other = run_body(&id);
    other["argument"] = json!("different");
    let conflict = a.post_json("/v1/ExecuteJobAsync", other).await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    assert!(
        conflict.json()["error"]
            .as_str()
            .unwrap()
            .contains("already used with other parameters")
    );
    // Upper-case GUID is the same run.
    let upper = a
        .post_json("/v1/ExecuteJobAsync", run_body(&id.to_uppercase()))
        .await;
    assert_eq!(upper.status, StatusCode::OK);
    assert_eq!(a.run_count().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let a = api_with(|c| c.queue_size = 2, Vec::new(), false).await;
    let first = guid();
    for id in [first.clone(), guid()] {
        assert_eq!(
            a.post_json("/v1/ExecuteJobAsync", run_body(&id))
                .await
                .status,
            StatusCode::OK
        );
    }
    let r = a.post_json("/v1/ExecuteJobAsync", run_body(&guid())).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["retry-after"], "1");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("queue is full")
    );
    // A client repeating an accepted request still gets its first answer,
    // and one reusing its runID for other parameters still gets 409.
    let again = a.post_json("/v1/ExecuteJobAsync", run_body(&first)).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.json()["started"], true);
    let mut other = run_body(&first);
    other["argument"] = json!("x");
    let clash = a.post_json("/v1/ExecuteJobAsync", other).await;
    assert_eq!(clash.status, StatusCode::CONFLICT, "{}", clash.body);
    assert_eq!(a.run_count().await, 2);
    // Queued runs show as such, and one can be cancelled before it starts.
    let id = guid();
    let a = api_with(|_| {}, Vec::new(), false).await;
    a.post_json("/v1/ExecuteJobAsync", run_body(&id)).await;
    let q = a
        .call("GET", &format!("/v1/Results/{id}"), &[], Body::empty())
        .await
        .json();
    assert_eq!(q[0]["status"], "Queued");
    let c = a
        .call("POST", &format!("/v1/Runs/{id}/cancel"), &[], Body::empty())
        .await;
    assert_eq!(c.status, StatusCode::ACCEPTED);
    assert_eq!(c.json()["status"], "Cancelled");
    let q = a
        .call("GET", &format!("/v1/Runs/{id}"), &[], Body::empty())
        .await
        .json();
    assert_eq!(q["status"], "Cancelled");
    assert_eq!(q["error"], "cancelled before it started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_a_4xx_and_change_nothing() {
    let a = api().await;
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let r = a
        .call(
            "POST",
            "/v1/ExecuteJobAsync",
            &[("content-type", "application/json")],
            nested,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    let r = a
        .call(
            "POST",
            "/v1/ExecuteJobAsync",
            &[("content-type", "application/json")],
            deep,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("recursion limit"),
        "{}",
        r.body
    );
    let billion = r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]><execJobAsyncRequest><runID>&lol2;</runID></execJobAsyncRequest>"#;
    let r = a
        .call(
            "POST",
            "/v1/ExecuteJobAsync",
            &[("content-type", "application/xml")],
            billion,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("DTD is not allowed"), "{}", r.body);
    let big = vec![b'a'; 10 * 1024 * 1024];
    let r = a
        .call(
            "POST",
            "/v1/ExecuteJobAsync",
            &[("content-type", "application/json")],
            big,
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let r = a
        .call(
            "POST",
            "/v1/ExecuteJobAsync",
            &[("content-type", "application/json")],
            vec![b'{', 0xff, 0xfe, b'}'],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = a
        .call(
            "POST",
            "/v1/ExecuteJobAsync",
            &[("content-type", "application/xml")],
            vec![b'<', 0xff, b'>'],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.run_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_job_waits_as_configured_and_never_for_a_node_that_runs_nothing() {
    // Workers not started: the run stays queued, and the wait is up after 1 s.
    let a = api_with(|c| c.execute_job_wait_secs = 1, Vec::new(), false).await;
    let id = guid();
    let r = a.post_json("/v1/ExecuteJob", run_body(&id)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let v = r.json();
    assert_eq!(
        (v["runID"].as_str(), v["status"].as_str()),
        (Some(id.as_str()), Some("Queued"))
    );
    assert_eq!(v["error"], Value::Null);
    assert_eq!(a.run_count().await, 1);
    // An accept-only node refuses ExecuteJob at once and records nothing.
    let a = api_with(|c| c.workers = 0, Vec::new(), false).await;
    let r = a.post_json("/v1/ExecuteJob", run_body(&guid())).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("ExecuteJobAsync"),
        "{}",
        r.body
    );
    assert_eq!(a.run_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_job_answers_when_the_run_ends() {
    let a = api().await;
    let id = guid();
    let r = a
        .post_json(
            "/v1/ExecuteJob",
            json!({"runID": id, "projectID": "demo", "jobID": "contacts", "chainJobs": "true", "loggingLevel": 2, "endAfterRow": "200"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = r.json();
    assert_eq!(v["runID"], id);
    assert_eq!(v["status"], "Complete");
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    assert_eq!(v["results"][0]["totalRows"], 200);
    assert_eq!(v["errors"], 1);
    let levels: Vec<&str> = v["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["level"].as_str().unwrap())
        .collect();
    assert!(
        levels.contains(&"Medium") && !levels.contains(&"High"),
        "{levels:?}"
    );
    // XML answer of the same shape.
    let r = a
        .call(
            "POST",
            "/v1/ExecuteJob",
            &[("content-type", "application/json"), ("accept", "text/xml")],
            json!({"runID": guid(), "projectID": "demo", "jobID": "contacts", "endAfterRow": 1})
                .to_string(),
        )
        .await;
    assert!(
        r.body.starts_with("<execJobResponse xmlns:i="),
        "{}",
        r.body
    );
    assert!(
        r.body
            .contains("<status>Complete</status><totalRows>1</totalRows>"),
        "{}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_endpoint_runs_the_job_with_the_body_as_argument() {
    let a = api().await;
    let r = a
        .call(
            "POST",
            "/v1/Webhook?projectid=demo&JOBID=contacts",
            &[("content-type", "text/plain")],
            "{\"event\":\"x\"}",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = r.json();
    assert_eq!(v["started"], true);
    let id = v["runID"].as_str().unwrap().to_owned();
    let res = a.wait_results(&id, &[]).await;
    assert_eq!(res[0]["totalRows"], 1000);
    let r = a.call("POST", "/v1/Webhook?projectid=demo", &[], "x").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("jobid is required")
    );
}

fn user(name: &str, password: &str, grants: &[(&str, Role)]) -> UserRecord {
    UserRecord {
        name: name.into(),
        password_hash: api::auth::hash_password(password).unwrap(),
        primary_instance: grants[0].0.into(),
        grants: grants.iter().map(|(i, r)| (i.to_string(), *r)).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_stops_working_when_it_expires_even_just_after_use() {
    let users = vec![user("ann", "ann-secret-1", &[("default", Role::Owner)])];
    // Long enough that the two uses below fall inside it on a busy machine.
    let a = api_with(|c| c.token_lifetime_secs = 3, users, false).await;
    let tok = a
        .call(
            "POST",
            "/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            "grant_type=password&username=ann&password=ann-secret-1",
        )
        .await
        .json();
    let bearer = format!("Bearer {}", tok["access_token"].as_str().unwrap());
    let ann = [("authorization", bearer.as_str())];
    // Used (and so remembered) while valid...
    for _ in 0..2 {
        let r = a.call("GET", "/v1/Projects", &ann, Body::empty()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    // ...and refused once its time is up, though it is used all along: polled
    // with a deadline, each poll a use.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = a.call("GET", "/v1/Projects", &ann, Body::empty()).await;
        if r.status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert!(
            std::time::Instant::now() < deadline,
            "the expired token still works"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keys_roles_and_instance_isolation() {
    let users = vec![
        user("ann", "ann-secret-1", &[("default", Role::Owner)]),
        user("bob", "bob-secret-1", &[("other", Role::Owner)]),
        user("ro", "ro-secret-12", &[("default", Role::ReadOnly)]),
    ];
    let a = api_with(|_| {}, users, true).await;
    assert!(!a.svc.open);
    let form = [("content-type", "application/x-www-form-urlencoded")];

    let r = a.post_json("/v1/ExecuteJobAsync", run_body(&guid())).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert_eq!(r.json()["started"], false);

    let bad = a
        .call(
            "POST",
            "/token",
            &form,
            "grant_type=password&username=ann&password=wrong",
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.json()["error"], "invalid_grant");
    let tok = a
        .call(
            "POST",
            "/token",
            &form,
            "grant_type=password&username=ann&password=ann-secret-1",
        )
        .await;
    assert_eq!(tok.status, StatusCode::OK, "{}", tok.body);
    let t = tok.json();
    assert_eq!(t["token_type"], "bearer");
    assert_eq!(t["expires_in"], 432000);
    let bearer = format!("Bearer {}", t["access_token"].as_str().unwrap());
    let ann = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];

    let id = guid();
    let r = a
        .call(
            "POST",
            "/v1/ExecuteJobAsync",
            &ann,
            run_body(&id).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    a.wait_results(&id, &ann).await;

    // Bob (another instance) cannot see Ann's run, nor her project.
    let bob_tok = a
        .call(
            "POST",
            "/token",
            &form,
            "grant_type=password&username=bob&password=bob-secret-1",
        )
        .await
        .json();
    let bob_bearer = format!("Bearer {}", bob_tok["access_token"].as_str().unwrap());
    let bob = [
        ("authorization", bob_bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let r = a
        .call("GET", &format!("/v1/Results/{id}"), &bob, Body::empty())
        .await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::NOT_FOUND, "[]"));
    let r = a
        .call(
            "GET",
            &format!("/v1/Results/{id}?instance=default"),
            &bob,
            Body::empty(),
        )
        .await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::NOT_FOUND, "[]"));
    let r = a
        .call(
            "POST",
            "/v1/ExecuteJobAsync",
            &bob,
            run_body(&guid()).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let p = a
        .call("GET", "/v1/Projects", &bob, Body::empty())
        .await
        .json();
    assert_eq!(p, json!([]));
    let p = a
        .call("GET", "/v1/Projects", &ann, Body::empty())
        .await
        .json();
    assert_eq!(p[0]["projectID"], "demo");

    // Read-only: may read, may not execute.
    let ro_tok = a
        .call(
            "POST",
            "/token",
            &form,
            "grant_type=password&username=ro&password=ro-secret-12",
        )
        .await
        .json();
    let ro_bearer = format!("Bearer {}", ro_tok["access_token"].as_str().unwrap());
    let ro = [
        ("authorization", ro_bearer.as_str()),
        ("content-type", "application/json"),
    ];
    assert_eq!(
        a.call("GET", &format!("/v1/Results/{id}"), &ro, Body::empty())
            .await
            .status,
        StatusCode::OK
    );
    let r = a
        .call(
            "POST",
            "/v1/ExecuteJobAsync",
            &ro,
            run_body(&guid()).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // API keys.
    let key = api::auth::new_secret("tpk_");
    a.svc
        .store
        .put_api_key(&api::auth::digest(&key), "ann", "test")
        .await
        .unwrap();
    let r = a
        .call(
            "GET",
            &format!("/v1/Results/{id}"),
            &[("x-api-key", key.as_str())],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a
        .call(
            "GET",
            &format!("/v1/Results/{id}"),
            &[("x-api-key", "tpk_nope")],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = a
        .call(
            "GET",
            &format!("/v1/Results/{id}"),
            &[("authorization", "Bearer tpt_forged")],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[derive(Clone)]
struct Receiver {
    hits: Arc<AtomicUsize>,
    fail_first: usize,
    secret: String,
    verified: Arc<std::sync::Mutex<Vec<Value>>>,
}

async fn receive(
    axum::extract::State(r): axum::extract::State<Receiver>,
    headers: axum::http::HeaderMap,
    body: String,
) -> StatusCode {
    let n = r.hits.fetch_add(1, Ordering::SeqCst) + 1;
    if n <= r.fail_first {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let wh = standardwebhooks::Webhook::new(&r.secret).unwrap();
    match wh.verify(body.as_bytes(), &headers) {
        Ok(()) => {
            r.verified
                .lock()
                .unwrap()
                .push(serde_json::from_str(&body).unwrap());
            StatusCode::NO_CONTENT
        }
        Err(_) => StatusCode::UNAUTHORIZED,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_webhook_is_retried_then_delivered_signed() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let recv = Receiver {
        hits: Arc::new(AtomicUsize::new(0)),
        fail_first: 2,
        secret: secret.into(),
        verified: Arc::new(std::sync::Mutex::new(Vec::new())),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(recv.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let a = api_with(
        |c| c.webhooks.secret = Some(secret.into()),
        Vec::new(),
        true,
    )
    .await;
    let id = guid();
    let mut body = run_body(&id);
    body["webHookURL"] = json!(format!("http://{addr}/hook"));
    body["chainJobs"] = json!(true);
    assert_eq!(
        a.post_json("/v1/ExecuteJobAsync", body).await.status,
        StatusCode::OK
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if !recv.verified.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let got = recv.verified.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "one verified delivery");
    assert_eq!(got[0]["runID"], id);
    assert_eq!(got[0]["status"], "Complete");
    assert_eq!(
        got[0]["results"].as_array().unwrap().len(),
        2,
        "one webhook after the whole chain"
    );
    assert_eq!(recv.hits.load(Ordering::SeqCst), 3);
    // The third attempt is recorded just after the receiver answered it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let d = loop {
        let d = a
            .call("GET", &format!("/v1/Runs/{id}"), &[], Body::empty())
            .await
            .json();
        if d["webhookAttempts"].as_array().map_or(0, Vec::len) >= 3
            || std::time::Instant::now() > deadline
        {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let attempts = d["webhookAttempts"].as_array().unwrap();
    let codes: Vec<Value> = attempts.iter().map(|x| x["statusCode"].clone()).collect();
    assert_eq!(codes, [json!(500), json!(500), json!(204)]);
    assert!(attempts[0]["error"].as_str().unwrap().contains("HTTP 500"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_to_metadata_and_link_local_addresses_are_refused() {
    // Every URL here is refused by the address policy before any connection
    // is tried: IP literals and metadata host names are judged first.
    let a = api().await;
    let cases = [
        (
            "http://169.254.169.254/latest/meta-data",
            "169.254.169.254 is a cloud metadata address",
        ),
        ("http://169.254.1.1/", "a link-local address"),
        ("http://[fd00:ec2::254]/", "a cloud metadata address"),
        ("http://100.100.100.200/", "a cloud metadata address"),
        (
            "http://[64:ff9b::a9fe:a9fe]/",
            "carries 169.254.169.254, a cloud metadata address",
        ),
        (
            "http://[2002:a9fe:a9fe::1]/",
            "carries 169.254.169.254, a cloud metadata address",
        ),
        (
            "http://metadata.google.internal/",
            "cloud metadata host name",
        ),
    ];
    let mut ids = Vec::new();
    for (url, _) in cases {
        let id = guid();
        let mut body = run_body(&id);
        body["webHookURL"] = json!(url);
        body["endAfterRow"] = json!(1);
        assert_eq!(
            a.post_json("/v1/ExecuteJobAsync", body).await.status,
            StatusCode::OK
        );
        ids.push(id);
    }
    for (id, (url, says)) in ids.iter().zip(cases) {
        a.wait_results(id, &[]).await;
        let mut attempts = Value::Null;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            attempts = a
                .call("GET", &format!("/v1/Runs/{id}"), &[], Body::empty())
                .await
                .json()["webhookAttempts"]
                .clone();
            if !attempts.as_array().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(attempts.as_array().unwrap().len(), 1, "{url}: {attempts}");
        assert_eq!(attempts[0]["statusCode"], Value::Null, "{url}");
        let e = attempts[0]["error"].as_str().unwrap();
        assert!(
            e.starts_with("refused by the webhook address policy: ") && e.contains(says),
            "{url}: {e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_resolving_to_a_blocked_address_is_refused_where_it_connects() {
    // The name is resolved once, by the connection itself, and its loopback
    // address is refused there: no window between a check and the connect.
    let a = api_with(|c| c.webhooks.block_private = true, Vec::new(), true).await;
    let id = guid();
    let mut body = run_body(&id);
    body["webHookURL"] = json!("http://localhost:9/hook");
    body["endAfterRow"] = json!(1);
    assert_eq!(
        a.post_json("/v1/ExecuteJobAsync", body).await.status,
        StatusCode::OK
    );
    a.wait_results(&id, &[]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let seen = a
            .call("GET", &format!("/v1/Runs/{id}"), &[], Body::empty())
            .await
            .json()["webhookAttempts"]
            .clone();
        if !seen.as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Refused once and given up, not retried: the store says so in the same
    // write as the attempt (no waiting to see that nothing more happens).
    let state: String = rusqlite::Connection::open(a.f.data.join("tidepool.sqlite"))
        .unwrap()
        .query_row("SELECT state FROM webhooks WHERE run_id = ?1", [&id], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(state, "failed", "given up, no retry scheduled");
    let attempts = a
        .call("GET", &format!("/v1/Runs/{id}"), &[], Body::empty())
        .await
        .json()["webhookAttempts"]
        .clone();
    assert_eq!(attempts.as_array().unwrap().len(), 1, "{attempts}");
    let e = attempts[0]["error"].as_str().unwrap();
    assert!(
        e.contains("refused by the webhook address policy: localhost is")
            && e.contains("block_private"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_unknown_paths() {
    let a = api().await;
    let h = a.call("GET", "/healthz", &[], Body::empty()).await;
    assert_eq!(h.json()["status"], "ok");
    let id = guid();
    a.post_json("/v1/ExecuteJobAsync", run_body(&id)).await;
    a.wait_results(&id, &[]).await;
    // The run's counters are recorded just after its result.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let m = loop {
        let m = a.call("GET", "/metrics", &[], Body::empty()).await.body;
        if m.contains("tidepool_runs_total{instance=\"default\",status=\"Complete\"}")
            || std::time::Instant::now() > deadline
        {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(
        m.contains("tidepool_runs_total{instance=\"default\",status=\"Complete\"}"),
        "{m}"
    );
    assert!(
        m.contains("tidepool_rows_total{instance=\"default\",counter=\"inserts\"}"),
        "{m}"
    );
    assert!(m.contains("tidepool_queue_depth"), "{m}");
    let spec = a
        .call("GET", "/openapi.json", &[], Body::empty())
        .await
        .json();
    assert!(
        spec["paths"]["/v1/ExecuteJobAsync"]["post"].is_object(),
        "{spec}"
    );
    let schemas = &spec["components"]["schemas"];
    for name in [
        "execJobAsyncRequest",
        "execJobAsyncResponse",
        "resultsResponse",
        "execJobResponse",
    ] {
        assert!(schemas[name].is_object(), "{name} missing from {schemas}");
    }
    assert!(schemas["execJobAsyncRequest"]["properties"]["runID"].is_object());
    let r = a.call("GET", "/v2/nothing", &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}
