//! `GET /v1/Projects/{id}` through the real router: each job's origin,
//! destination, stages with their field mappings and `next` chain, as the
//! console's job page shows them, and never a connection's secrets.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::Fixture;
use serde_json::Value;
use tidepool::api;
use tidepool::server::{ServerConfig, Service};
use tidepool::store::SqliteStore;
use tower::ServiceExt;

const PG_PASSWORD: &str = "Pg-s3cret-pw";
const API_TOKEN: &str = "tok-5ecret-bearer";
const HEADER_KEY: &str = "hdr-5ecret-key";
const QUERY_KEY: &str = "qry-5ecret-key";

/// The repository's demo project, plus a PostgreSQL connection with a
/// password in its URL and an HTTP API with a token, a secret header and a key
/// in the origin's request path, used by a `warehouse` job.
fn demo_with_secrets(f: &Fixture) {
    let src = common::repo_projects().join("demo");
    for rel in [
        "project.toml",
        "jobs/contacts.toml",
        "jobs/countries.toml",
        "data/contacts.csv",
    ] {
        let mut text = std::fs::read_to_string(src.join(rel)).unwrap();
        if rel == "project.toml" {
            text.push_str(&format!(
                r#"
[connections.warehouse]
kind = "postgres"
url = "postgres://etl:{PG_PASSWORD}@127.0.0.1:5432/test?sslmode=disable&password={PG_PASSWORD}"

[connections.crm]
kind = "http"
base_url = "http://crm-user:{PG_PASSWORD}@127.0.0.1:9/v2?api_key={QUERY_KEY}"
headers = {{ X-Api-Key = "{HEADER_KEY}" }}
auth = {{ bearer = "{API_TOKEN}" }}
records = "/data"
"#
            ));
        }
        f.write(&format!("projects/demo/{rel}"), text);
    }
    f.write(
        "projects/demo/jobs/warehouse.toml",
        format!(
            r#"
[origin]
connection = "crm"
query = "/people?page_size=50&access_token={QUERY_KEY}"

[destination]
connection = "warehouse"

[[stages]]
table = "people"
action = "skip/insert"
fields = [
  {{ column = "id", origin = "id", match = true, type = "integer" }},
  {{ column = "source", value = "crm" }},
  {{ column = "loaded_at", function = "utc_now" }},
  {{ column = "label", script = "row.name.toUpperCase()" }},
]
"#
        ),
    );
}

async fn get(svc: &Arc<Service>, path: &str) -> (StatusCode, String) {
    let req = Request::get(path).body(Body::empty()).unwrap();
    let resp = api::app(api::AppState::new(svc.clone()))
        .oneshot(req)
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn server(f: &Fixture) -> Arc<Service> {
    let config = ServerConfig {
        data_dir: f.data.clone(),
        projects: f.projects.clone(),
        workers: 1,
        ..ServerConfig::default()
    };
    let store = Arc::new(SqliteStore::open(&f.data.join("tidepool.sqlite")).unwrap());
    Service::new(config, store).await.unwrap()
}

fn job<'a>(project: &'a Value, id: &str) -> &'a Value {
    project["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["jobID"] == id)
        .unwrap_or_else(|| panic!("no job {id} in {project:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_answers_each_jobs_origin_destination_stages_and_chain_without_secrets() {
    let f = Fixture::new();
    demo_with_secrets(&f);
    let svc = server(&f).await;
    let loaded = svc.projects();
    assert_eq!(
        loaded.projects.len(),
        1,
        "the demo with secrets loads: {:?}",
        svc.failed_projects()
            .iter()
            .map(|p| &p.errors)
            .collect::<Vec<_>>()
    );

    let (status, body) = get(&svc, "/v1/Projects/DEMO").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let project: Value = serde_json::from_str(&body).unwrap();
    // What it answered before stays.
    assert_eq!(project["projectID"], "demo");
    assert_eq!(project["instance"], "default");
    assert_eq!(project["loaded"], true);

    let contacts = job(&project, "contacts");
    assert_eq!(contacts["name"], "Contacts CSV -> SQLite");
    assert_eq!(contacts["stages"], 1, "the stage count stays a number");
    assert_eq!(contacts["next"], "countries");
    assert_eq!(contacts["nextJobs"], serde_json::json!(["countries"]));
    assert_eq!(contacts["needs"], serde_json::json!([]));
    assert_eq!(
        project["levels"],
        serde_json::json!([["contacts", "warehouse"], ["countries"]])
    );
    assert_eq!(
        contacts["chain"],
        serde_json::json!(["contacts", "countries"])
    );
    assert_eq!(
        job(&project, "countries")["chain"],
        serde_json::json!(["countries"])
    );
    assert_eq!(contacts["file"], "jobs/contacts.toml");
    assert_eq!(contacts["errorFile"], "${DATA_DIR}/contacts-errors.csv");
    assert_eq!(contacts["haltOnError"], false);
    assert!(contacts["batchSize"].as_u64().unwrap() > 0);

    assert_eq!(contacts["origin"]["connection"], "contacts_csv");
    assert_eq!(contacts["origin"]["kind"], "csv");
    assert_eq!(contacts["origin"]["path"], "data/contacts.csv");
    assert_eq!(contacts["destination"]["connection"], "local_db");
    assert_eq!(contacts["destination"]["kind"], "sqlite");
    assert_eq!(contacts["destination"]["path"], "${DATA_DIR}/demo.sqlite");
    let countries = job(&project, "countries");
    assert!(
        countries["origin"]["query"]
            .as_str()
            .unwrap()
            .contains("GROUP BY country"),
        "{countries:#}"
    );

    let stages = contacts["stageDetails"].as_array().unwrap();
    assert_eq!(stages.len(), 1);
    let stage = &stages[0];
    assert_eq!(stage["number"], 1);
    assert_eq!(stage["name"], "upsert contacts");
    assert_eq!(stage["table"], "contacts");
    assert_eq!(stage["action"], "update/insert");
    assert_eq!(stage["matchFields"], serde_json::json!(["id"]));
    let columns: Vec<&str> = stage["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["column"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        ["id", "full_name", "email", "company", "country", "amount"]
    );
    let fields = &stage["fields"];
    assert_eq!(fields[0]["origin"], "Id");
    assert_eq!(fields[0]["type"], "integer");
    assert_eq!(fields[0]["match"], true);
    assert_eq!(fields[1]["template"], "@@ORG:FirstName@@ @@ORG:LastName@@");
    assert!(fields[1].get("origin").is_none(), "{:#}", fields[1]);
    assert_eq!(fields[2]["origin"], "Email");
    assert_eq!(fields[2]["transform"], serde_json::json!(["trim", "lower"]));
    assert_eq!(fields[2]["match"], false);
    assert_eq!(fields[5]["type"], "number");

    // The other sources of a value, and connections that hold secrets.
    let warehouse = job(&project, "warehouse");
    assert_eq!(warehouse["origin"]["kind"], "http");
    assert_eq!(
        warehouse["origin"]["target"],
        "http://crm-user@127.0.0.1:9/v2"
    );
    assert_eq!(
        warehouse["origin"]["query"],
        "/people?page_size=50&access_token=***"
    );
    assert_eq!(warehouse["destination"]["kind"], "postgres");
    assert_eq!(
        warehouse["destination"]["target"],
        "postgres://etl@127.0.0.1:5432/test"
    );
    let stage = &warehouse["stageDetails"][0];
    assert_eq!(stage["action"], "skip/insert");
    assert_eq!(stage["fields"][1]["value"], "crm");
    assert_eq!(stage["fields"][2]["function"], "utc_now");
    assert_eq!(stage["fields"][3]["script"], "row.name.toUpperCase()");
    for secret in [PG_PASSWORD, API_TOKEN, HEADER_KEY, QUERY_KEY] {
        assert!(!body.contains(secret), "{secret} is in the answer: {body}");
    }

    // The list keeps its shape: a stage count per job.
    let (status, list) = get(&svc, "/v1/Projects").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(job(&list[0], "contacts")["stages"], 1);

    let (status, body) = get(&svc, "/v1/Projects/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_the_project_detail() {
    let f = Fixture::new();
    demo_with_secrets(&f);
    let svc = server(&f).await;
    let (status, body) = get(&svc, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let doc: Value = serde_json::from_str(&body).unwrap();
    let ok = &doc["paths"]["/v1/Projects/{id}"]["get"]["responses"]["200"];
    let reference = ok["content"]["application/json"]["schema"]["$ref"]
        .as_str()
        .unwrap_or_else(|| panic!("{ok:#}"));
    let name = reference.rsplit('/').next().unwrap();
    let schemas = &doc["components"]["schemas"];
    let detail = &schemas[name];
    assert!(detail["properties"]["jobs"].is_object(), "{detail:#}");
    for schema in ["JobDetail", "ConnectionUse", "StageDetail", "FieldDetail"] {
        assert!(
            schemas[schema]["properties"].is_object(),
            "{schema} is not in the document's schemas"
        );
    }
    assert!(schemas["FieldDetail"]["properties"]["match"].is_object());
    assert!(schemas["JobDetail"]["properties"]["stageDetails"].is_object());
}
