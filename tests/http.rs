//! The HTTP JSON connector against a real HTTP server on loopback.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use common::{Fixture, request};
use serde_json::{Value, json};
use tidepool::engine::{LogLevel, RunStatus};

#[derive(Clone, Default)]
struct Api {
    items: Arc<Mutex<BTreeMap<String, Value>>>,
    hits: Arc<AtomicUsize>,
}

fn authorized(h: &HeaderMap) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer t0k")
}

async fn pages(
    State(api): State<Api>,
    h: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> (StatusCode, [(&'static str, &'static str); 1], Json<Value>) {
    if !authorized(&h) {
        return (
            StatusCode::UNAUTHORIZED,
            [("retry-after", "0")],
            Json(json!({})),
        );
    }
    // The very first request is told to come back later.
    if api.hits.fetch_add(1, Ordering::SeqCst) == 0 {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "0")],
            Json(json!({})),
        );
    }
    let page: u64 = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    assert_eq!(
        q.get("since").map(String::as_str),
        Some("2024-01-01 & later")
    );
    let data: Vec<Value> = match page {
        1 => vec![
            json!({"id": 1, "name": "Ann"}),
            json!({"id": 2, "name": "Bob"}),
        ],
        2 => vec![json!({"id": 3, "name": "Cy", "tags": ["x"]})],
        _ => vec![],
    };
    (
        StatusCode::OK,
        [("x-page", "1")],
        Json(json!({"data": data})),
    )
}

async fn cursor(Query(q): Query<BTreeMap<String, String>>) -> Json<Value> {
    match q.get("cursor").map(String::as_str) {
        None => Json(json!({"items": [{"id": 1}], "next": "c2"})),
        Some("c2") => Json(json!({"items": [{"id": 2}], "next": "c3"})),
        _ => Json(json!({"items": [{"id": 3}], "next": null})),
    }
}

async fn linked(Path(n): Path<u32>) -> Json<Value> {
    let next = if n < 3 {
        json!(format!("/linked/{}", n + 1))
    } else {
        Value::Null
    };
    Json(json!({"data": [{"id": n}], "links": {"next": next}}))
}

async fn create(State(api): State<Api>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    if body["name"] == "bad" {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error": "name is bad"})),
        );
    }
    let id = body["id"].to_string();
    api.items.lock().unwrap().insert(id, body.clone());
    (StatusCode::CREATED, Json(body))
}

async fn bulk(State(api): State<Api>, Json(body): Json<Vec<Value>>) -> StatusCode {
    api.hits.fetch_add(1, Ordering::SeqCst);
    if body.iter().any(|b| b["name"] == "bad") {
        return StatusCode::UNPROCESSABLE_ENTITY;
    }
    let mut items = api.items.lock().unwrap();
    for b in body {
        items.insert(b["id"].to_string(), b);
    }
    StatusCode::CREATED
}

async fn item_get(State(api): State<Api>, Path(id): Path<String>) -> StatusCode {
    if api.items.lock().unwrap().contains_key(&id) {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

async fn item_patch(
    State(api): State<Api>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> StatusCode {
    let mut items = api.items.lock().unwrap();
    match items.get_mut(&id) {
        Some(v) => {
            for (k, x) in body.as_object().unwrap() {
                v[k] = x.clone();
            }
            StatusCode::OK
        }
        None => StatusCode::NOT_FOUND,
    }
}

async fn item_put(
    State(api): State<Api>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> StatusCode {
    let mut items = api.items.lock().unwrap();
    let existed = items.insert(id, body).is_some();
    if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    }
}

async fn item_delete(State(api): State<Api>, Path(id): Path<String>) -> StatusCode {
    if api.items.lock().unwrap().remove(&id).is_some() {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

/// A first page of two records, then a server that keeps failing (and asks
/// to be retried at once).
async fn flaky(
    State(api): State<Api>,
    Query(q): Query<BTreeMap<String, String>>,
) -> (StatusCode, [(&'static str, &'static str); 1], Json<Value>) {
    api.hits.fetch_add(1, Ordering::SeqCst);
    match q.get("page").map(String::as_str) {
        None | Some("1") => (
            StatusCode::OK,
            [("x-page", "1")],
            Json(json!({"data": [{"id": 1}, {"id": 2}]})),
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            [("retry-after", "0")],
            Json(json!({"error": "upstream down"})),
        ),
    }
}

/// Takes three requests, then is unavailable for good.
async fn going_down(State(api): State<Api>) -> (StatusCode, [(&'static str, &'static str); 1]) {
    if api.hits.fetch_add(1, Ordering::SeqCst) < 3 {
        (StatusCode::CREATED, [("x-ok", "1")])
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "0")])
    }
}

/// People filtered by `email` (other parameters are ignored, as many APIs do).
async fn people(State(api): State<Api>, Query(q): Query<BTreeMap<String, String>>) -> Json<Value> {
    api.hits.fetch_add(1, Ordering::SeqCst);
    let all = [
        json!({"Id": 7, "email": "ann@x.org", "country": "NO", "owner": null}),
        json!({"Id": 8, "email": "bob@x.org", "country": "IT", "owner": "cy"}),
    ];
    let data: Vec<Value> = all
        .into_iter()
        .filter(|p| q.get("email").is_none_or(|e| p["email"] == *e))
        .collect();
    Json(json!({"data": data}))
}

/// Starts the API on a loopback port in a runtime of its own thread.
fn serve(api: Api) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = Router::new()
                .route("/contacts", get(pages))
                .route("/cursor", get(cursor))
                .route("/people", get(people))
                .route("/gone", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }))
                .route("/flaky", get(flaky))
                .route("/down", axum::routing::post(going_down))
                .route("/linked/{n}", get(linked))
                .route("/items", axum::routing::post(create))
                .route("/bulk", axum::routing::post(bulk))
                .route(
                    "/items/{id}",
                    get(item_get)
                        .patch(item_patch)
                        .put(item_put)
                        .delete(item_delete),
                )
                .with_state(api);
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}

#[test]
fn origin_pages_retries_429_and_authenticates() {
    let base = serve(Api::default());
    let f = Fixture::new();
    let project = format!(
        r#"
[connections.api]
kind = "http"
base_url = "{base}"
records = "/data"
auth = {{ bearer = "t0k" }}
pagination = {{ kind = "page", param = "page" }}
[connections.cur]
kind = "http"
base_url = "{base}"
records = "/items"
pagination = {{ kind = "cursor", param = "cursor", pointer = "/next" }}
[connections.link]
kind = "http"
base_url = "{base}"
records = "/data"
pagination = {{ kind = "next_link", pointer = "/links/next" }}
[connections.out]
kind = "json"
path = "${{DATA_DIR}}/out.jsonl"
"#
    );
    let job = |conn: &str, q: &str| {
        format!(
            "[origin]\nconnection = \"{conn}\"\nquery = \"{q}\"\n[destination]\nconnection = \"out\"\n[[stages]]\naction = \"insert\"\nfields = [{{ column = \"id\", origin = \"id\" }}, {{ column = \"name\", origin = \"name\" }}, {{ column = \"tags\", origin = \"tags\" }}]\n"
        )
    };
    f.project(
        "p",
        &project,
        &[
            ("pages", &job("api", "/contacts?since=@@VAR:JobArgument@@")),
            ("cursor", &job("cur", "/cursor")),
            ("linked", &job("link", "/linked/1")),
        ],
    );
    let mut req = request("p", "pages");
    req.argument = "2024-01-01 & later".into();
    let r = f.run(&req);
    assert_eq!(r.status, RunStatus::Complete, "{:?}", r.error);
    assert_eq!(r.counters.inserts, 3);
    let out = std::fs::read_to_string(f.data.join("out.jsonl")).unwrap();
    assert_eq!(
        out,
        "{\"id\":1,\"name\":\"Ann\",\"tags\":null}\n{\"id\":2,\"name\":\"Bob\",\"tags\":null}\n{\"id\":3,\"name\":\"Cy\",\"tags\":\"[\\\"x\\\"]\"}\n"
    );
    for job in ["cursor", "linked"] {
        let r = f.run(&request("p", job));
        assert_eq!(r.counters.inserts, 3, "{job}: {:?}", r.error);
        let ids: Vec<Value> = std::fs::read_to_string(f.data.join("out.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].clone())
            .collect();
        assert_eq!(ids, [json!(1), json!(2), json!(3)], "{job}");
    }
}

#[test]
fn destination_maps_statuses_to_outcomes() {
    let api = Api::default();
    let base = serve(api.clone());
    let f = Fixture::new();
    let project = format!(
        "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.api]\nkind = \"http\"\nbase_url = \"{base}\"\nmax_retries = 0\n"
    );
    let job = |action: &str| {
        format!(
            "[origin]\nconnection = \"src\"\n[destination]\nconnection = \"api\"\n[[stages]]\ntable = \"/items\"\naction = \"{action}\"\nfields = [{{ column = \"id\", origin = \"id\", type = \"integer\", match = true }}, {{ column = \"name\", origin = \"name\" }}]\n"
        )
    };
    f.project(
        "p",
        &project,
        &[
            ("ins", &job("insert")),
            ("upd", &job("update")),
            ("ups", &job("update/insert")),
            ("skip", &job("skip/insert")),
            ("del", &job("delete")),
        ],
    );
    f.write("projects/p/in.csv", "id,name\n1,Ann\n2,bad\n3,Cy\n");
    let mut req = request("p", "ins");
    req.logging_level = LogLevel::Low;
    let r = f.run(&req);
    assert_eq!((r.counters.inserts, r.counters.errors), (2, 1));
    let msg = &r.jobs[0]
        .log
        .iter()
        .find(|e| e.row == Some(2))
        .unwrap()
        .message;
    assert!(
        msg.contains("HTTP 422") && msg.contains("name is bad"),
        "{msg}"
    );
    assert_eq!(api.items.lock().unwrap().len(), 2);

    f.write("projects/p/in.csv", "id,name\n1,Annie\n4,Dan\n");
    let c = f.run(&request("p", "upd")).counters;
    assert_eq!((c.updates, c.ignores), (1, 1));
    assert_eq!(api.items.lock().unwrap()["1"]["name"], "Annie");
    let c = f.run(&request("p", "ups")).counters;
    assert_eq!((c.updates, c.inserts), (1, 1));
    f.write("projects/p/in.csv", "id,name\n1,X\n5,Eve\n");
    let c = f.run(&request("p", "skip")).counters;
    assert_eq!((c.skips, c.inserts), (1, 1));
    assert_eq!(api.items.lock().unwrap()["1"]["name"], "Annie");
    f.write("projects/p/in.csv", "id,name\n1,\n9,\n");
    let c = f.run(&request("p", "del")).counters;
    assert_eq!((c.deletes, c.ignores), (1, 1));
    let left: Vec<String> = api.items.lock().unwrap().keys().cloned().collect();
    assert_eq!(left, ["3", "4", "5"]);
}

#[test]
fn batches_go_in_one_request_and_a_refused_batch_is_sent_row_by_row() {
    let api = Api::default();
    let base = serve(api.clone());
    let f = Fixture::new();
    let project = format!(
        "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.api]\nkind = \"http\"\nbase_url = \"{base}\"\nbatch = true\nmax_retries = 0\n"
    );
    let job = "[origin]\nconnection = \"src\"\n[destination]\nconnection = \"api\"\n[[stages]]\ntable = \"/bulk\"\naction = \"insert\"\nfields = [{ column = \"id\", origin = \"id\", type = \"integer\" }, { column = \"name\", origin = \"name\" }]\n";
    f.project("p", &project, &[("j", job)]);
    f.write("projects/p/in.csv", "id,name\n1,Ann\n2,Bob\n");
    let r = f.run(&request("p", "j"));
    assert_eq!(r.counters.inserts, 2, "{:?}", r.error);
    assert_eq!(
        api.hits.load(Ordering::SeqCst),
        1,
        "one request for the batch"
    );
    f.write("projects/p/in.csv", "id,name\n3,Cy\n4,bad\n5,Eve\n");
    let r = f.run(&request("p", "j"));
    assert_eq!((r.counters.inserts, r.counters.errors), (2, 1));
    // 1 + the refused batch + 3 single-row requests
    assert_eq!(api.hits.load(Ordering::SeqCst), 5);
    assert_eq!(api.items.lock().unwrap().len(), 4);
}

#[test]
fn scripts_look_up_records_through_the_api() {
    let api = Api::default();
    let base = serve(api.clone());
    let f = Fixture::new();
    let project = format!(
        r#"
[connections.src]
kind = "csv"
path = "in.csv"
[connections.api]
kind = "http"
base_url = "{base}"
records = "/data"
max_retries = 0
[connections.out]
kind = "json"
path = "${{DATA_DIR}}/out.jsonl"
"#
    );
    let job = r#"
[origin]
connection = "src"
[destination]
connection = "out"
[[stages]]
action = "insert"
fields = [
  { column = "email", origin = "email" },
  { column = "id", script = "lookup('api', '/people', 'id', {email: row.email})" },
  { column = "in_it", script = "lookup('api', 'people', 'email', {email: row.email, country: 'IT'})" },
  { column = "unowned", script = "lookup('api', '/people', 'Id', {email: row.email, owner: null})" },
  { column = "gone", script = "row.email === 'x' ? lookup('api', '/gone', 'id', {a: 1}) : ''" },
]
"#;
    f.project("p", &project, &[("j", job)]);
    f.write(
        "projects/p/in.csv",
        "email\nann@x.org\nbob@x.org\nnobody@x.org\nann@x.org\nx\n",
    );
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Low;
    let r = f.run(&req);
    assert_eq!(
        (r.counters.inserts, r.counters.errors),
        (4, 1),
        "{:?}",
        r.jobs[0].log
    );
    let out: Vec<Value> = std::fs::read_to_string(f.data.join("out.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want = json!([
        {"email": "ann@x.org", "id": 7, "in_it": null, "unowned": 7, "gone": ""},
        {"email": "bob@x.org", "id": 8, "in_it": "bob@x.org", "unowned": null, "gone": ""},
        {"email": "nobody@x.org", "id": null, "in_it": null, "unowned": null, "gone": ""},
        {"email": "ann@x.org", "id": 7, "in_it": null, "unowned": 7, "gone": ""},
    ]);
    assert_eq!(Value::Array(out), want);
    // The repeated row's lookups came from the run's cache: 3 lookups for
    // each of the 4 distinct emails.
    assert_eq!(api.hits.load(Ordering::SeqCst), 12);
    let err = r.jobs[0]
        .log
        .iter()
        .find(|e| e.row == Some(5))
        .map(|e| e.message.clone())
        .unwrap_or_default();
    assert!(err.contains("/gone") && err.contains("500"), "{err}");
}

#[test]
fn an_api_failing_mid_pagination_fails_the_job_and_keeps_the_first_pages() {
    let api = Api::default();
    let base = serve(api.clone());
    let f = Fixture::new();
    let project = format!(
        r#"
[connections.api]
kind = "http"
base_url = "{base}"
records = "/data"
max_retries = 2
pagination = {{ kind = "page", param = "page" }}
[connections.out]
kind = "json"
path = "${{DATA_DIR}}/out.jsonl"
"#
    );
    let job = "[origin]\nconnection = \"api\"\nquery = \"/flaky\"\n[destination]\nconnection = \"out\"\n[[stages]]\naction = \"insert\"\nfields = [{ column = \"id\", origin = \"id\" }]\n";
    f.project("p", &project, &[("j", job)]);
    let r = f.run(&request("p", "j"));
    assert_eq!(r.status, RunStatus::Failed);
    let e = r.error.clone().unwrap_or_default();
    assert!(
        e.contains("origin \"api\"") && e.contains("/flaky?page=2") && e.contains("502"),
        "{e}"
    );
    // The first page landed and is counted; page 2 was tried 1 + 2 times.
    assert_eq!((r.counters.inserts, r.counters.errors), (2, 1));
    let out = std::fs::read_to_string(f.data.join("out.jsonl")).unwrap();
    assert_eq!(out, "{\"id\":1}\n{\"id\":2}\n");
    assert_eq!(api.hits.load(Ordering::SeqCst), 4);
}

#[test]
fn an_api_that_stops_answering_stops_the_job_and_counts_what_it_took() {
    for batch in [false, true] {
        let api = Api::default();
        let base = serve(api.clone());
        let f = Fixture::new();
        let project = format!(
            "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.api]\nkind = \"http\"\nbase_url = \"{base}\"\nmax_retries = 1\nbatch = {batch}\n"
        );
        let job = "batch_size = 4\n[origin]\nconnection = \"src\"\n[destination]\nconnection = \"api\"\n[[stages]]\ntable = \"/down\"\naction = \"insert\"\nfields = [{ column = \"id\", origin = \"id\" }]\n";
        f.project("p", &project, &[("j", job)]);
        let csv: String = std::iter::once("id\n".to_owned())
            .chain((1..=20).map(|i| format!("{i}\n")))
            .collect();
        f.write("projects/p/in.csv", csv);
        let r = f.run(&request("p", "j"));
        assert_eq!(r.status, RunStatus::Failed, "batch = {batch}");
        let e = r.error.clone().unwrap_or_default();
        assert!(
            e.contains("stopped answering") && e.contains("503"),
            "batch = {batch}: {e}"
        );
        let c = r.counters;
        if batch {
            // Three batches of four went in whole; the fourth was refused
            // (after a retry): nothing of it is counted, nothing more is sent.
            assert_eq!((c.total_rows, c.inserts, c.errors), (12, 12, 1), "{c:?}");
            assert_eq!(api.hits.load(Ordering::SeqCst), 5);
        } else {
            // Rows 1-3 went in; row 4 was refused (after a retry; its error
            // and the job's are counted) and the job stopped: no later row
            // was sent or counted.
            assert_eq!((c.total_rows, c.inserts, c.errors), (4, 3, 2), "{c:?}");
            assert_eq!(api.hits.load(Ordering::SeqCst), 5);
        }
    }
}
