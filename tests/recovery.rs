//! A run accepted by `tidepool serve` survives `kill -9`: the run that was going
//! is marked Failed (and its webhook sent), queued runs execute after restart.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Fixture;
use serde_json::{Value, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn serve(f: &Fixture, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--workers",
            "1",
        ])
        .arg("--data-dir")
        .arg(&f.data)
        .arg("--projects")
        .arg(&f.projects)
        .env("TIDEPOOL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tidepool serve")
}

async fn wait_up(client: &reqwest::Client, base: &str) {
    for _ in 0..200 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not come up");
}

async fn results(client: &reqwest::Client, base: &str, id: &str) -> Value {
    client
        .get(format!("{base}/v1/Results/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing() {
    let f = Fixture::new();
    // A job slow enough to be caught running: many rows, tiny batches.
    let mut csv = String::from("id,name\n");
    for i in 1..=400_000 {
        csv.push_str(&format!("{i},n{i}\n"));
    }
    f.project(
        "slow",
        "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.db]\nkind = \"sqlite\"\npath = \"${DATA_DIR}/slow.sqlite\"\ninit_sql = [\"CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, name TEXT)\"]\n",
        &[(
            "load",
            "batch_size = 10\n[origin]\nconnection = \"src\"\n[destination]\nconnection = \"db\"\n[[stages]]\ntable = \"t\"\naction = \"update/insert\"\nfields = [{ column = \"id\", origin = \"id\", match = true }, { column = \"name\", origin = \"name\" }]\n",
        )],
    );
    f.write("projects/slow/in.csv", csv);
    let src = common::repo_projects().join("demo");
    for rel in [
        "project.toml",
        "jobs/contacts.toml",
        "jobs/countries.toml",
        "data/contacts.csv",
    ] {
        f.write(
            &format!("projects/demo/{rel}"),
            std::fs::read(src.join(rel)).unwrap(),
        );
    }

    // A webhook receiver that records what it gets.
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let sink = sink.clone();
            async move {
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_str(&body).unwrap());
                axum::http::StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut server = serve(&f, port);
    wait_up(&client, &base).await;

    let slow = uuid::Uuid::new_v4().to_string();
    let queued = uuid::Uuid::new_v4().to_string();
    for body in [
        json!({"runID": slow, "projectID": "slow", "jobID": "load", "webHookURL": hook}),
        json!({"runID": queued, "projectID": "demo", "jobID": "contacts"}),
    ] {
        let r: Value = client
            .post(format!("{base}/v1/ExecuteJobAsync"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["started"], true, "{r}");
    }
    // Wait until the slow run is going and has counted rows.
    let mut live = Value::Null;
    for _ in 0..400 {
        live = results(&client, &base, &slow).await;
        if live[0]["status"] == "Running" && live[0]["totalRows"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(live[0]["status"], "Running", "{live}");
    assert_eq!(
        results(&client, &base, &queued).await[0]["status"],
        "Queued"
    );

    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();

    let mut server = serve(&f, port);
    wait_up(&client, &base).await;
    let after = results(&client, &base, &slow).await;
    assert_eq!(after[0]["status"], "Failed", "{after}");
    let detail: Value = client
        .get(format!("{base}/v1/Runs/{slow}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        detail["error"].as_str().unwrap().contains("interrupted"),
        "{detail}"
    );

    // The queued run executes after the restart, exactly once.
    let mut done = Value::Null;
    for _ in 0..400 {
        done = results(&client, &base, &queued).await;
        if done[0]["status"] == "Complete" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(done[0]["status"], "Complete", "{done}");
    assert_eq!(done[0]["inserts"], 997);

    // The interrupted run's webhook arrives, saying Failed.
    for _ in 0..200 {
        if !got.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let hooks = got.lock().unwrap().clone();
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    assert_eq!(hooks[0]["runID"], slow);
    assert_eq!(hooks[0]["status"], "Failed");
    server.kill().unwrap();
    let _ = server.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_keys_and_sigterm_through_the_binary() {
    let f = Fixture::new();
    let src = common::repo_projects().join("demo");
    for rel in [
        "project.toml",
        "jobs/contacts.toml",
        "jobs/countries.toml",
        "data/contacts.csv",
    ] {
        f.write(
            &format!("projects/demo/{rel}"),
            std::fs::read(src.join(rel)).unwrap(),
        );
    }
    let tp = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(args)
            .arg("--data-dir")
            .arg(&f.data)
            .env("TIDEPOOL_PASSWORD", "correct horse battery")
            .output()
            .unwrap()
    };
    // Without users, a non-loopback address is refused.
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--data-dir",
        ])
        .arg(&f.data)
        .arg("--projects")
        .arg(&f.projects)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no users are configured"));

    let out = tp(&["user", "add", "ann", "--instance", "default:Owner"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tp(&["key", "create", "ann", "--label", "ci"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(key.starts_with("tpk_") && key.len() > 60, "{key}");
    assert_eq!(tp(&["key", "create", "nobody"]).status.code(), Some(2));

    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut server = serve(&f, port);
    wait_up(&client, &base).await;
    let body = json!({"runID": uuid::Uuid::new_v4().to_string(), "projectID": "demo", "jobID": "contacts"});
    let r = client
        .post(format!("{base}/v1/ExecuteJobAsync"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .post(format!("{base}/v1/ExecuteJobAsync"))
        .header("x-api-key", &key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tok: Value = client
        .post(format!("{base}/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=password&username=ann&password=correct+horse+battery")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tok["token_type"], "bearer");

    // SIGTERM: a clean stop.
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || server.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// The statuses of a list of job results.
fn statuses(results: &Value) -> Vec<String> {
    results
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {results}"))
        .iter()
        .map(|r| r["status"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The status a run must have, given its jobs' statuses.
fn run_status_of(jobs: &[String]) -> &'static str {
    if jobs.iter().all(|s| s == "Complete") {
        "Complete"
    } else if jobs.iter().any(|s| s == "Cancelled") {
        "Cancelled"
    } else {
        "Failed"
    }
}

/// Copies the demo project (contacts, chained to countries) into the fixture.
fn demo_project(f: &Fixture) {
    let src = common::repo_projects().join("demo");
    for rel in [
        "project.toml",
        "jobs/contacts.toml",
        "jobs/countries.toml",
        "data/contacts.csv",
    ] {
        f.write(
            &format!("projects/demo/{rel}"),
            std::fs::read(src.join(rel)).unwrap(),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_each_point_of_a_run_end_leaves_one_truth() {
    let f = Fixture::new();
    demo_project(&f);
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let sink = sink.clone();
            async move {
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_str(&body).unwrap());
                axum::http::StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();

    // (abort point, chained?, the status the run must end with)
    let cases = [
        ("job_started", false, "Failed"),
        ("after_job_commit", false, "Failed"),
        ("after_job_saved", false, "Failed"),
        ("before_finish", false, "Failed"),
        ("after_finish", false, "Complete"),
        ("job_started", true, "Failed"),
        ("after_job_commit", true, "Failed"),
        ("after_job_saved", true, "Failed"),
        ("before_finish", true, "Failed"),
        ("after_finish", true, "Complete"),
    ];
    for (point, chain, expected) in cases {
        let case = format!("{point}, chainJobs {chain}");
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        // The test hook (debug builds) aborts the server at `point`, as kill -9 would.
        let mut server = Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(&f.data)
            .arg("--projects")
            .arg(&f.projects)
            .current_dir(&f.root)
            .env("TIDEPOOL_LOG", "error")
            .env("TIDEPOOL_TEST_ABORT_AT", point)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_up(&client, &base).await;
        let run = uuid::Uuid::new_v4().to_string();
        let body = json!({"runID": run, "projectID": "demo", "jobID": "contacts",
                          "chainJobs": chain, "webHookURL": hook});
        let r = client
            .post(format!("{base}/v1/ExecuteJobAsync"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{case}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let exit = loop {
            if let Some(status) = server.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{case}: the server did not stop at the abort point"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(!exit.success(), "{case}: {exit:?}");

        let mut server = serve(&f, port);
        wait_up(&client, &base).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let hook_body = loop {
            let found = got
                .lock()
                .unwrap()
                .iter()
                .find(|h| h["runID"] == run.as_str())
                .cloned();
            if let Some(h) = found {
                break h;
            }
            assert!(std::time::Instant::now() < deadline, "{case}: no webhook");
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let listed = results(&client, &base, &run).await;
        let detail: Value = client
            .get(format!("{base}/v1/Runs/{run}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let jobs = statuses(&listed);
        assert_eq!(detail["status"], expected, "{case}: {detail}");
        assert_eq!(hook_body["status"], expected, "{case}: {hook_body}");
        assert_eq!(run_status_of(&jobs), expected, "{case}: {listed}");
        assert_eq!(statuses(&detail["results"]), jobs, "{case}: {detail}");
        assert_eq!(statuses(&hook_body["results"]), jobs, "{case}: {hook_body}");
        let job_ids: Vec<&str> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["jobID"].as_str().unwrap())
            .collect();
        // A chain that stopped after its first job says which job did not run.
        if chain && point != "job_started" && point != "after_job_commit" {
            assert_eq!(job_ids, ["contacts", "countries"], "{case}: {listed}");
        } else if !chain {
            assert_eq!(job_ids, ["contacts"], "{case}: {listed}");
        }
        if expected == "Failed" {
            assert!(
                detail["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("interrupted"),
                "{case}: {detail}"
            );
        }
        server.kill().unwrap();
        server.wait().unwrap();
    }
}
