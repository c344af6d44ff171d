//! Job graphs: a diamond a → (b, c) → d on SQLite destinations, run by the
//! engine and by the real server. b and c read an HTTP origin on loopback
//! whose answer to each waits (with a deadline) until the other one asked:
//! the run completes only if b and c really run at the same time.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use common::{Fixture, request, rows};
use serde_json::{Value, json};
use tidepool::engine::{LogLevel, RunStatus};

/// How long one job's request waits for the other's.
const BARRIER_WAIT: Duration = Duration::from_secs(30);

/// The origin API: `/rows/{job}` answers three rows at once;
/// `/barrier/{job}` answers them once every barrier job asked (and the
/// test let them go); `/fail` answers 500.
#[derive(Clone, Default)]
struct Origin {
    arrived: Arc<Mutex<BTreeSet<String>>>,
    held: Arc<Mutex<bool>>,
}

impl Origin {
    fn arrived(&self) -> BTreeSet<String> {
        self.arrived.lock().unwrap().clone()
    }
    fn hold(&self, held: bool) {
        *self.held.lock().unwrap() = held;
    }
}

fn three_rows() -> axum::Json<Value> {
    axum::Json(json!([{"id": 1}, {"id": 2}, {"id": 3}]))
}

async fn barrier(
    State(o): State<Origin>,
    Path(job): Path<String>,
) -> (StatusCode, axum::Json<Value>) {
    o.arrived.lock().unwrap().insert(job);
    let deadline = Instant::now() + BARRIER_WAIT;
    loop {
        let both = o.arrived().len() == 2 && !*o.held.lock().unwrap();
        if both {
            return (StatusCode::OK, three_rows());
        }
        if Instant::now() > deadline {
            let msg = "the other job never asked while this one waited";
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"error": msg})),
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts the origin API on a loopback port in a runtime of its own thread.
fn serve_origin(origin: Origin) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = Router::new()
                .route("/rows/{job}", get(|| async { three_rows() }))
                .route("/barrier/{job}", get(barrier))
                .route("/fail", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }))
                .with_state(origin);
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}

/// Project `g`: a copies a CSV; b and c read `b_path` and `c_path` of the
/// origin API; d (needs b and c) counts what b and c landed. Every job
/// writes to one SQLite database.
fn diamond(f: &Fixture, api: &str, b_path: &str, c_path: &str) {
    let project = format!(
        r#"max_parallel_jobs = 2
[connections.csv]
kind = "csv"
path = "in.csv"
[connections.api]
kind = "http"
base_url = "{api}"
max_retries = 0
timeout_secs = 60
[connections.db]
kind = "sqlite"
path = "${{DATA_DIR}}/g.sqlite"
init_sql = [
  "CREATE TABLE IF NOT EXISTS landed(job TEXT, id INTEGER, PRIMARY KEY (job, id))",
  "CREATE TABLE IF NOT EXISTS summary(job TEXT PRIMARY KEY, n INTEGER)",
]
"#
    );
    let copy = |job: &str, keys: &str, connection: &str, query: &str| {
        format!(
            "{keys}\n[origin]\nconnection = \"{connection}\"\n{query}\n[destination]\nconnection = \"db\"\n\
             [[stages]]\ntable = \"landed\"\naction = \"insert\"\n\
             fields = [{{ column = \"job\", value = \"{job}\" }}, {{ column = \"id\", origin = \"id\" }}]\n"
        )
    };
    let a = copy("a", "next = [\"b\", \"c\"]", "csv", "");
    let b = copy("b", "", "api", &format!("query = \"{b_path}\""));
    let c = copy("c", "", "api", &format!("query = \"{c_path}\""));
    let d = "needs = [\"b\", \"c\"]\n[origin]\nconnection = \"db\"\n\
             query = \"SELECT job, count(*) AS n FROM landed WHERE job IN ('b', 'c') GROUP BY job ORDER BY job\"\n\
             [destination]\nconnection = \"db\"\n\
             [[stages]]\ntable = \"summary\"\naction = \"insert\"\n\
             fields = [{ column = \"job\", origin = \"job\" }, { column = \"n\", origin = \"n\" }]\n";
    f.project("g", &project, &[("a", &a), ("b", &b), ("c", &c), ("d", d)]);
    f.write("projects/g/in.csv", "id\n1\n2\n3\n");
}

fn ids(r: &tidepool::engine::RunReport) -> Vec<&str> {
    r.jobs.iter().map(|j| j.job_id.0.as_str()).collect()
}

#[test]
fn a_diamond_runs_b_and_c_at_once_and_d_after_both() {
    let f = Fixture::new();
    let api = serve_origin(Origin::default());
    diamond(&f, &api, "/barrier/b", "/barrier/c");
    let mut req = request("g", "a");
    req.chain_jobs = true;
    let r = f.run(&req);
    assert_eq!(r.status, RunStatus::Complete, "{:?}", r.error);
    assert_eq!(
        ids(&r),
        ["a", "b", "c", "d"],
        "one report per job, in start order"
    );
    let ended = |i: usize| r.jobs[i].start_time + r.jobs[i].run_time;
    assert!(r.jobs[3].start_time >= ended(1), "d started before b ended");
    assert!(r.jobs[3].start_time >= ended(2), "d started before c ended");
    assert!(r.jobs[1].start_time >= ended(0), "b started before a ended");
    let db = f.db("g.sqlite");
    assert_eq!(
        rows(&db, "SELECT job, count(*) FROM landed GROUP BY job"),
        ["a|3", "b|3", "c|3"]
    );
    assert_eq!(
        rows(&db, "SELECT job, n FROM summary ORDER BY job"),
        ["b|3", "c|3"]
    );
    assert_eq!(r.counters.inserts, 3 + 3 + 3 + 2);
}

#[test]
fn a_failed_job_stops_what_depends_on_it_and_nothing_else() {
    let f = Fixture::new();
    let api = serve_origin(Origin::default());
    diamond(&f, &api, "/fail", "/rows/c");
    let mut req = request("g", "a");
    req.chain_jobs = true;
    req.logging_level = LogLevel::Low;
    let r = f.run(&req);
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(ids(&r), ["a", "b", "c"], "d did not run");
    let statuses: Vec<RunStatus> = r.jobs.iter().map(|j| j.status).collect();
    assert_eq!(
        statuses,
        [RunStatus::Complete, RunStatus::Failed, RunStatus::Complete]
    );
    let error = r.error.clone().unwrap_or_default();
    assert!(error.starts_with("job b: "), "{error}");
    assert!(
        error.ends_with("not run: d (it depends on job b, which did not complete)"),
        "{error}"
    );
    assert!(
        r.jobs[1]
            .log
            .iter()
            .any(|e| e.message == "not running d: it depends on job b, which ended Failed"),
        "{:#?}",
        r.jobs[1].log
    );
    let db = f.db("g.sqlite");
    assert_eq!(
        rows(&db, "SELECT job, count(*) FROM landed GROUP BY job"),
        ["a|3", "c|3"]
    );
    assert_eq!(rows(&db, "SELECT count(*) FROM summary"), ["0"]);
}

#[test]
fn starting_at_b_runs_b_and_what_depends_on_it() {
    let f = Fixture::new();
    let api = serve_origin(Origin::default());
    diamond(&f, &api, "/rows/b", "/rows/c");
    let mut req = request("g", "b");
    req.chain_jobs = true;
    // The row window is the start job's only: d reads all its rows.
    req.begin_at_row = 2;
    let r = f.run(&req);
    assert_eq!(r.status, RunStatus::Complete, "{:?}", r.error);
    assert_eq!(
        ids(&r),
        ["b", "d"],
        "c is not part of a run from b: d does not wait for it"
    );
    let db = f.db("g.sqlite");
    assert_eq!(
        rows(&db, "SELECT job, count(*) FROM landed GROUP BY job"),
        ["b|2"]
    );
    assert_eq!(rows(&db, "SELECT job, n FROM summary"), ["b|2"]);
    // Unchained: b alone.
    let r = f.run(&request("g", "b"));
    assert_eq!(ids(&r), ["b"]);
}

async fn results(client: &reqwest::Client, base: &str, run: &str) -> Vec<(String, String)> {
    let got = common::get_json(client, &format!("{base}/v1/Results/{run}")).await;
    got.as_array()
        .unwrap_or_else(|| panic!("not a list: {got}"))
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (s("jobID"), s("status"))
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_shows_parallel_jobs_live_and_one_result_per_job_in_start_order() {
    let f = Fixture::new();
    let origin = Origin::default();
    origin.hold(true);
    let api = serve_origin(origin.clone());
    diamond(&f, &api, "/barrier/b", "/barrier/c");
    let server = f.serve().start_async().await;
    let client = reqwest::Client::new();
    let run = uuid::Uuid::new_v4().to_string();
    let body = json!({"runID": run, "projectID": "g", "jobID": "a", "chainJobs": true});
    let answer = client
        .post(format!("{}/v1/ExecuteJobAsync", server.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    // b and c both asked for their rows: both are running, a is done.
    common::until("b and c both running", || async {
        origin.arrived().len() == 2
    })
    .await;
    let live = results(&client, &server.base, &run).await;
    let want = [("a", "Complete"), ("b", "Running"), ("c", "Running")];
    assert_eq!(live, pairs(&want));
    // The event stream sends the counters of each running job.
    let mut events = client
        .get(format!("{}/v1/Runs/{run}/events", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let counters_of = |text: &str, job: &str| {
        text.split("\n\n")
            .any(|e| e.contains("event: counters") && e.contains(&format!("\"jobID\":\"{job}\"")))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    while !(counters_of(&seen, "b") && counters_of(&seen, "c")) {
        let chunk = tokio::time::timeout_at(deadline, events.chunk())
            .await
            .unwrap_or_else(|_| panic!("no counters of both b and c in time:\n{seen}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the stream ended:\n{seen}"));
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(events);
    origin.hold(false);

    let detail = common::eventually("the run ends", || {
        let (client, url) = (client.clone(), format!("{}/v1/Runs/{run}", server.base));
        async move {
            let d = common::get_json(&client, &url).await;
            (d["status"] != "Running" && d["status"] != "Queued").then_some(d)
        }
    })
    .await;
    assert_eq!(detail["status"], "Complete", "{detail}");
    let want = [
        ("a", "Complete"),
        ("b", "Complete"),
        ("c", "Complete"),
        ("d", "Complete"),
    ];
    assert_eq!(results(&client, &server.base, &run).await, pairs(&want));
    let db = f.db("g.sqlite");
    assert_eq!(
        rows(&db, "SELECT job, n FROM summary ORDER BY job"),
        ["b|3", "c|3"]
    );

    // The project's detail gives each job's edges, its chain and the graph's levels.
    let p = common::get_json(&client, &format!("{}/v1/Projects/g", server.base)).await;
    let job = |id: &str| {
        p["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["jobID"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(job("a")["nextJobs"], json!(["b", "c"]));
    assert_eq!(job("a")["next"], "b");
    assert_eq!(job("d")["needs"], json!(["b", "c"]));
    assert_eq!(job("a")["chain"], json!(["a", "b", "c", "d"]));
    assert_eq!(job("c")["chain"], json!(["c", "d"]));
    assert_eq!(p["levels"], json!([["a"], ["b", "c"], ["d"]]));
}

fn tidepool(f: &Fixture, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(args)
        .arg("--projects")
        .arg(&f.projects)
        .arg("--data-dir")
        .arg(&f.data)
        .env_remove("TIDEPOOL_STORE")
        .output()
        .expect("run tidepool");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.success(),
        text + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn the_cli_shows_the_graph_before_it_runs_it_and_validate_prints_it() {
    let f = Fixture::new();
    let api = serve_origin(Origin::default());
    diamond(&f, &api, "/rows/b", "/rows/c");
    let (ok, out) = tidepool(&f, &["run", "g", "a", "--chain", "--no-record"]);
    assert!(ok, "{out}");
    let graph = "graph of the run: 4 jobs\n  level 1: a\n  level 2: b (after a), c (after a)\n  \
                 level 3: d (after b, c)\n\n";
    assert!(out.starts_with(graph), "{out}");
    for job in ["a", "b", "c", "d"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{job} ")) && l.contains("Complete")),
            "{out}"
        );
    }
    let (ok, out) = tidepool(&f, &["validate", "--graph", "--no-connect"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("project g, job graph: 4 jobs\n  level 1: a\n"),
        "{out}"
    );
    // A cycle is refused, named, with its file and line.
    f.write(
        "projects/g/jobs/e.toml",
        "next = \"a\"\nneeds = [\"d\"]\n[origin]\nconnection = \"csv\"\n[destination]\nconnection = \"db\"\n\
         [[stages]]\ntable = \"landed\"\naction = \"insert\"\nfields = [{ column = \"id\", origin = \"id\" }]\n",
    );
    let (ok, out) = tidepool(&f, &["validate", "--no-connect"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("jobs/a.toml:1: the job graph has a cycle: a → b → d → e → a"),
        "{out}"
    );
}
