//! Strict request input through the real router, on a real SQLite store: form
//! bodies that are not UTF-8 and row numbers that are not plain digits are
//! refused with 400 naming the field, and nothing is recorded for them; the
//! forms the contract allows are accepted and recorded as sent.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::Fixture;
use serde_json::{Value, json};
use tidepool::api;
use tidepool::server::{ServerConfig, Service};
use tidepool::store::{RunKey, SqliteStore};
use tower::ServiceExt;

const FORM: &str = "application/x-www-form-urlencoded";

/// A server that records runs but never starts them, so every accepted run
/// stays queued where the test can read it.
struct Api {
    _f: Fixture,
    svc: api::AppState,
}

impl Api {
    async fn new() -> Api {
        let f = Fixture::new();
        let src = common::repo_projects().join("demo");
        for rel in ["project.toml", "jobs/contacts.toml", "jobs/countries.toml"] {
            f.write(
                &format!("projects/demo/{rel}"),
                std::fs::read(src.join(rel)).unwrap(),
            );
        }
        let config = ServerConfig {
            data_dir: f.data.clone(),
            projects: f.projects.clone(),
            ..ServerConfig::default()
        };
        let store = Arc::new(SqliteStore::open(&f.data.join("tidepool.sqlite")).unwrap());
        let svc = Service::new(config, store).await.unwrap();
        Api {
            _f: f,
            svc: api::AppState::new(svc),
        }
    }

    /// POSTs `body` to ExecuteJobAsync; the status and the JSON answer.
    async fn post(&self, content_type: &str, body: impl Into<Body>) -> (StatusCode, Value) {
        let req = Request::post("/v1/ExecuteJobAsync")
            .header("content-type", content_type)
            .header("accept", "application/json")
            .body(body.into())
            .unwrap();
        let resp = api::app(self.svc.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
        (status, v)
    }

    /// The request recorded for `run_id`, if any.
    async fn recorded(&self, run_id: &str) -> Option<Value> {
        let key = RunKey {
            instance: "default".into(),
            run_id: uuid::Uuid::parse_str(run_id).unwrap(),
        };
        let rec = self.svc.store.run(&key).await.unwrap()?;
        Some(serde_json::from_str(&rec.request_json).unwrap())
    }

    async fn queued(&self) -> u64 {
        self.svc.store.queued_count().await.unwrap()
    }

    /// Asserts a 400 whose error contains `text`, and that nothing was recorded.
    async fn refused(&self, content_type: &str, body: Vec<u8>, run_id: &str, text: &str) {
        let before = self.queued().await;
        let shown = String::from_utf8_lossy(&body).into_owned();
        let (status, v) = self.post(content_type, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{shown}: {v}");
        assert_eq!(v["started"], false, "{shown}: {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains(text), "{text:?} not in {error:?} ({shown})");
        assert_eq!(self.recorded(run_id).await, None, "{shown} was recorded");
        assert_eq!(self.queued().await, before, "{shown} queued a run");
    }

    /// Asserts a 200 `started: true`, and returns the request as recorded.
    async fn accepted(&self, content_type: &str, body: Vec<u8>, run_id: &str) -> Value {
        let shown = String::from_utf8_lossy(&body).into_owned();
        let (status, v) = self.post(content_type, body).await;
        assert_eq!(status, StatusCode::OK, "{shown}: {v}");
        assert_eq!(v["started"], true, "{shown}: {v}");
        self.recorded(run_id)
            .await
            .unwrap_or_else(|| panic!("{shown} was accepted but not recorded"))
    }
}

fn guid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn form(run_id: &str, extra: &[u8]) -> Vec<u8> {
    let mut body = format!("runID={run_id}&projectID=demo&jobID=contacts").into_bytes();
    body.extend_from_slice(extra);
    body
}

fn json_body(run_id: &str, field: &str, value: Value) -> Vec<u8> {
    json!({"runID": run_id, "projectID": "demo", "jobID": "contacts", field: value})
        .to_string()
        .into_bytes()
}

fn xml_body(run_id: &str, field: &str, value: &str) -> Vec<u8> {
    format!(
        "<execJobAsyncRequest><runID>{run_id}</runID><projectID>demo</projectID><jobID>contacts</jobID><{field}>{value}</{field}></execJobAsyncRequest>"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_bodies_that_are_not_utf8_are_refused_naming_the_field() {
    let a = Api::new().await;
    let cases: [(&[u8], &str); 5] = [
        (b"&argument=%FF%FE", "argument is not valid UTF-8 (byte 1"),
        (b"&argument=ok%C3", "argument is not valid UTF-8 (byte 3"),
        (b"&argument=raw\xff", "argument is not valid UTF-8 (byte 4"),
        (b"&Argument=%E2%82", "Argument is not valid UTF-8"),
        (
            b"&%FFname=1",
            "the body is not valid UTF-8 (in a field name)",
        ),
    ];
    for (extra, text) in cases {
        let id = guid();
        a.refused(FORM, form(&id, extra), &id, text).await;
    }
    // A bad byte in the runID itself: refused, and no run under any ID.
    let id = guid();
    a.refused(
        FORM,
        format!("runID={id}%FF").into_bytes(),
        &id,
        "runID is not valid UTF-8",
    )
    .await;
    assert_eq!(a.queued().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_bodies_in_utf8_are_recorded_as_sent() {
    let a = Api::new().await;
    let id = guid();
    let req = a
        .accepted(
            FORM,
            form(
                &id,
                b"&argument=caf%C3%A9+%E2%82%AC+100%25+50%+%F0%9F%8C%8A",
            ),
            &id,
        )
        .await;
    assert_eq!(req["argument"], "café € 100% 50% 🌊");
    // Raw (unencoded) UTF-8 is UTF-8 too.
    let id = guid();
    let req = a
        .accepted(FORM, form(&id, "&argument=naïve".as_bytes()), &id)
        .await;
    assert_eq!(req["argument"], "naïve");
    assert_eq!(a.queued().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_numbers_that_are_not_plain_digits_are_refused_in_every_format() {
    let a = Api::new().await;
    let bad = [
        " 5",
        "5 ",
        "+5",
        "-5",
        "0",
        "000",
        "5.0",
        "1e3",
        "0x10",
        "5\n",
        "٥",
        "five",
        "9223372036854775808",
        "18446744073709551615",
        "99999999999999999999999",
    ];
    for field in ["beginAtRow", "endAfterRow"] {
        let rule = format!("{field} must be a positive integer from 1 to 9223372036854775807");
        for v in bad {
            let id = guid();
            a.refused(
                "application/json",
                json_body(&id, field, json!(v)),
                &id,
                &rule,
            )
            .await;
            let id = guid();
            let enc: String = form_urlencoded(v);
            a.refused(
                FORM,
                form(&id, format!("&{field}={enc}").as_bytes()),
                &id,
                &rule,
            )
            .await;
            let id = guid();
            a.refused("application/xml", xml_body(&id, field, v), &id, &rule)
                .await;
        }
        // JSON numbers follow the same rule, by value: 5.5 is not whole.
        for n in [
            "0",
            "-5",
            "5.5",
            "1e-3",
            "-0.0",
            "9223372036854775808",
            "18446744073709551615",
            "1e19",
        ] {
            let id = guid();
            let body = format!(
                r#"{{"runID":"{id}","projectID":"demo","jobID":"contacts","{field}":{n}}}"#
            );
            a.refused("application/json", body.into_bytes(), &id, &rule)
                .await;
        }
        let id = guid();
        a.refused(
            "application/json",
            json_body(&id, field, json!(true)),
            &id,
            &rule,
        )
        .await;
    }
    assert_eq!(a.queued().await, 0, "nothing refused was queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_numbers_in_digits_are_accepted_and_blank_means_not_given() {
    let a = Api::new().await;
    let cases: [(Value, Value); 7] = [
        (json!("5"), json!(5)),
        (json!("007"), json!(7)),
        (json!("9223372036854775807"), json!(9223372036854775807u64)),
        (json!(12), json!(12)),
        (json!(9223372036854775807u64), json!(9223372036854775807u64)),
        (json!(""), Value::Null),
        (Value::Null, Value::Null),
    ];
    for (sent, stored) in cases {
        let id = guid();
        let req = a
            .accepted(
                "application/json",
                json_body(&id, "endAfterRow", sent.clone()),
                &id,
            )
            .await;
        assert_eq!(req["endAfterRow"], stored, "endAfterRow {sent}");
        let id = guid();
        let req = a
            .accepted(
                "application/json",
                json_body(&id, "beginAtRow", sent.clone()),
                &id,
            )
            .await;
        let begin = if stored.is_null() { json!(1) } else { stored };
        assert_eq!(req["beginAtRow"], begin, "beginAtRow {sent}");
    }
    // A JSON number is a number however it is written (JSON Schema's integers).
    for (n, stored) in [("5.0", 5), ("1e3", 1000), ("2.5e1", 25)] {
        let id = guid();
        let body = format!(
            r#"{{"runID":"{id}","projectID":"demo","jobID":"contacts","endAfterRow":{n},"loggingLevel":{n}}}"#
        );
        let req = a.accepted("application/json", body.into_bytes(), &id).await;
        assert_eq!(req["endAfterRow"], stored, "{n}");
        assert_eq!(req["loggingLevel"], 3, "{n}");
    }
    // Blank is "not given" in every format.
    let id = guid();
    let req = a
        .accepted(FORM, form(&id, b"&beginAtRow=&endAfterRow=+"), &id)
        .await;
    assert_eq!(
        (&req["beginAtRow"], &req["endAfterRow"]),
        (&json!(1), &Value::Null)
    );
    let id = guid();
    let req = a
        .accepted("text/xml", xml_body(&id, "beginAtRow", " "), &id)
        .await;
    assert_eq!(req["beginAtRow"], 1);
    let id = guid();
    let req = a
        .accepted(FORM, form(&id, b"&beginAtRow=10&endAfterRow=0020"), &id)
        .await;
    assert_eq!(
        (&req["beginAtRow"], &req["endAfterRow"]),
        (&json!(10), &json!(20))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_count_and_logging_level_are_digits_only_in_their_range() {
    let a = Api::new().await;
    let tc_rule = "threadCount must be a positive integer from 1 to 64";
    for v in [" 2", "+2", "0", "65", "2.0", "-1"] {
        let id = guid();
        a.refused(
            "application/json",
            json_body(&id, "threadCount", json!(v)),
            &id,
            tc_rule,
        )
        .await;
    }
    let ll_rule = "loggingLevel must be 0 to 3";
    for v in [" 1", "+1", "-1", "1.0", "one"] {
        let id = guid();
        a.refused(
            "application/json",
            json_body(&id, "loggingLevel", json!(v)),
            &id,
            ll_rule,
        )
        .await;
        let id = guid();
        let enc = form_urlencoded(v);
        a.refused(
            FORM,
            form(&id, format!("&loggingLevel={enc}").as_bytes()),
            &id,
            ll_rule,
        )
        .await;
    }
    let id = guid();
    a.refused(
        "application/json",
        format!(r#"{{"runID":"{id}","projectID":"demo","jobID":"contacts","loggingLevel":-1}}"#)
            .into_bytes(),
        &id,
        ll_rule,
    )
    .await;
    assert_eq!(a.queued().await, 0);

    for (sent, stored) in [("64", 64), ("001", 1)] {
        let id = guid();
        let req = a
            .accepted(
                "application/json",
                json_body(&id, "threadCount", json!(sent)),
                &id,
            )
            .await;
        assert_eq!(req["threadCount"], stored, "threadCount {sent}");
    }
    // Above 3 means 3, however many digits (the vendor's rule); blank means 0.
    for (sent, stored) in [
        (json!("2"), 2),
        (json!(7), 3),
        (json!("99999999999999999999999999"), 3),
        (json!(""), 0),
    ] {
        let id = guid();
        let req = a
            .accepted(
                "application/json",
                json_body(&id, "loggingLevel", sent.clone()),
                &id,
            )
            .await;
        assert_eq!(req["loggingLevel"], stored, "loggingLevel {sent}");
    }
}

/// Form-encodes a value the way a browser does (space as `+`).
fn form_urlencoded(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        match b {
            b' ' => out.push('+'),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_request_that_is_not_utf8_is_refused_naming_the_field() {
    let a = Api::new().await;
    let mut body = b"grant_type=password&username=ann&password=".to_vec();
    body.extend_from_slice(b"%FF%FE");
    let req = Request::post("/token")
        .header("content-type", FORM)
        .body(Body::from(body))
        .unwrap();
    let resp = api::app(a.svc.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["error"], "invalid_request", "{v}");
    let says = v["error_description"].as_str().unwrap();
    assert!(
        says.contains("password") && says.contains("UTF-8"),
        "{says}"
    );
}
