//! A run accepted by `tidepool serve` survives `kill -9`: the run that was going
//! is marked Failed (and its webhook sent), queued runs execute after restart.

mod common;

use std::process::Command;

use common::{Fixture, eventually, until};
use serde_json::{Value, json};

/// `tidepool serve` with one worker, so a second run waits in the queue.
fn serve(f: &Fixture) -> common::ServeBuilder {
    f.serve().args(&["--workers", "1"])
}

async fn results(client: &reqwest::Client, base: &str, id: &str) -> Value {
    common::get_json(client, &format!("{base}/v1/Results/{id}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing() {
    let f = Fixture::new();
    // A job slow enough to be caught running: many rows, tiny batches.
    f.slow_project(400_000);
    f.copy_demo();
    // A webhook receiver that records what it gets.
    let (hook, got) = common::webhook_receiver(|_| axum::http::StatusCode::OK).await;

    let client = reqwest::Client::new();
    let mut server = serve(&f).start_async().await;
    let (port, base) = (server.port, server.base.clone());

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
    let live = eventually("the slow run is running and has counted rows", || async {
        let live = results(&client, &base, &slow).await;
        let going =
            live[0]["status"] == "Running" && live[0]["totalRows"].as_u64().unwrap_or(0) > 0;
        going.then_some(live)
    })
    .await;
    assert_eq!(live[0]["status"], "Running", "{live}");
    assert_eq!(
        results(&client, &base, &queued).await[0]["status"],
        "Queued"
    );

    server.kill(); // SIGKILL

    let _server = serve(&f).port(port).start_async().await;
    let after = results(&client, &base, &slow).await;
    assert_eq!(after[0]["status"], "Failed", "{after}");
    let detail = common::get_json(&client, &format!("{base}/v1/Runs/{slow}")).await;
    assert!(
        detail["error"].as_str().unwrap().contains("interrupted"),
        "{detail}"
    );

    // The queued run executes after the restart, exactly once.
    let done = eventually("the queued run completes", || async {
        let done = results(&client, &base, &queued).await;
        (done[0]["status"] == "Complete").then_some(done)
    })
    .await;
    assert_eq!(done[0]["inserts"], 997);

    // The interrupted run's webhook arrives, saying Failed.
    until("the interrupted run's webhook", || async {
        !got.lock().unwrap().is_empty()
    })
    .await;
    let hooks = got.lock().unwrap().clone();
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    assert_eq!(hooks[0]["runID"], slow);
    assert_eq!(hooks[0]["status"], "Failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_keys_and_sigterm_through_the_binary() {
    let f = Fixture::new();
    f.copy_demo();
    let tp = |args: &[&str]| common::tidepool_cli(&f.data, args, "correct horse battery");
    // Without users, a non-loopback address is refused.
    let port = common::free_port();
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

    let password = "correct horse battery";
    common::tidepool_cli_ok(
        &f.data,
        &["user", "add", "ann", "--instance", "default:Owner"],
        password,
    );
    let key = common::tidepool_cli_ok(
        &f.data,
        &["key", "create", "ann", "--label", "ci"],
        password,
    )
    .trim()
    .to_owned();
    assert!(key.starts_with("tpk_") && key.len() > 60, "{key}");
    assert_eq!(tp(&["key", "create", "nobody"]).status.code(), Some(2));

    let client = reqwest::Client::new();
    let server = serve(&f).port(port).start_async().await;
    let base = server.base.clone();
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
    server.sigterm();
    let (status, server) = server.wait_exit_async().await;
    assert!(status.success(), "{status:?}\n{}", server.stderr());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_each_point_of_a_run_end_leaves_one_truth() {
    let f = Fixture::new();
    f.copy_demo();
    let (hook, got) = common::webhook_receiver(|_| axum::http::StatusCode::OK).await;
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
        // The test hook (debug builds) aborts the server at `point`, as kill -9 would.
        let aborting = f
            .serve()
            .current_dir(&f.root)
            .log("error")
            .env("TIDEPOOL_TEST_ABORT_AT", point)
            .start_async()
            .await;
        let (port, base) = (aborting.port, aborting.base.clone());
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
        let (exit, _) = aborting.wait_exit_async().await;
        assert!(!exit.success(), "{case}: {exit:?}");

        let _server = serve(&f).port(port).start_async().await;
        let hook_body = eventually(&format!("{case}: the webhook"), || async {
            got.lock()
                .unwrap()
                .iter()
                .find(|h| h["runID"] == run.as_str())
                .cloned()
        })
        .await;
        let listed = results(&client, &base, &run).await;
        let detail = common::get_json(&client, &format!("{base}/v1/Runs/{run}")).await;
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
    }
}
