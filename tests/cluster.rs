//! The cluster: several `tidepool serve` nodes sharing one PostgreSQL store.
//! Each test makes a database of its own and real node processes on
//! loopback, acts on them as an operator would (kill -9, SIGSTOP, SIGTERM,
//! cutting the store's connections) and checks what a user would: every
//! accepted run ends exactly once, with one result and one webhook, and the
//! destination holds exactly the rows it should.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cluster::{
    BATCH, Cluster, LEASE_SECS, PATIENCE, QUICK_ROWS, SHORT_ROWS, SLOW_ROWS, guid, signal, within,
};
use common::Server;
use serde_json::{Value, json};

/// The error text of a run ended by another node after its own went silent.
fn interrupted(node: &str) -> String {
    format!("interrupted: node {node} stopped renewing its lease")
}

/// Waits until every run in `runs` has ended, asking the nodes of `bases`
/// in turn; their statuses by runID.
async fn wait_all_ended(c: &Cluster, bases: &[String], runs: &[String]) -> HashMap<String, String> {
    let deadline = Instant::now() + PATIENCE;
    let mut ended = HashMap::new();
    let mut i = 0;
    while ended.len() < runs.len() {
        for run in runs
            .iter()
            .filter(|r| !ended.contains_key(*r))
            .cloned()
            .collect::<Vec<_>>()
        {
            i += 1;
            let d = c.detail(&bases[i % bases.len()], &run).await;
            let s = d["status"].as_str().unwrap_or_default().to_owned();
            if ["Complete", "Failed", "Cancelled"].contains(&s.as_str()) {
                ended.insert(run, s);
            }
        }
        let open: Vec<&String> = runs.iter().filter(|r| !ended.contains_key(*r)).collect();
        assert!(
            Instant::now() < deadline || open.is_empty(),
            "runs never ended: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    ended
}

/// Each run Complete on every node, with one webhook saying so.
async fn all_complete_once(c: &Cluster, bases: &[String], runs: &[String]) {
    let ended = wait_all_ended(c, bases, runs).await;
    let not_complete: Vec<_> = ended.iter().filter(|(_, s)| *s != "Complete").collect();
    assert!(
        not_complete.is_empty(),
        "runs not Complete: {not_complete:?}"
    );
    for run in runs {
        c.one_hook(run, "Complete").await;
        for base in bases {
            assert_eq!(
                c.detail(base, run).await["status"],
                "Complete",
                "{run} on {base}"
            );
        }
    }
}

fn bases(nodes: &[Server]) -> Vec<String> {
    nodes.iter().map(|n| n.base.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_sixty_runs_and_each_ends_once() {
    let c = Cluster::new("share").await;
    let nodes = c
        .start(
            ["a", "b", "c"]
                .iter()
                .map(|id| c.node(id).args(&["--workers", "2"]).log("info"))
                .collect(),
        )
        .await;
    let bases = bases(&nodes);
    let runs: Vec<String> = (0..60).map(|_| guid()).collect();
    for (i, run) in runs.iter().enumerate() {
        c.submit(&bases[i % 3], run, "c", "quick").await;
    }
    all_complete_once(&c, &bases, &runs).await;
    let rows: i64 = c
        .sql
        .query_one("SELECT count(*) FROM dst.quick", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 60 * QUICK_ROWS);
    for run in &runs {
        assert_eq!(
            c.results(&bases[0], run).await[0]["inserts"],
            QUICK_ROWS,
            "{run}"
        );
    }
    // Every node lists the three, all active, itself once.
    for base in &bases {
        let list = c.nodes(base).await;
        let nodes = list["nodes"].as_array().unwrap_or_else(|| panic!("{list}"));
        let mut ids: Vec<&str> = nodes
            .iter()
            .map(|n| n["nodeId"].as_str().unwrap())
            .collect();
        ids.sort();
        assert_eq!(ids, ["a", "b", "c"], "{list}");
        assert!(nodes.iter().all(|n| n["state"] == "active"), "{list}");
        assert_eq!(
            nodes.iter().filter(|n| n["thisNode"] == true).count(),
            1,
            "{list}"
        );
        assert_eq!(list["leaseSecs"], LEASE_SECS, "{list}");
    }
    // More than one node executed runs: the run detail says where, if it
    // does; else each node's log of the runs it started.
    let detail = c.detail(&bases[0], &runs[0]).await;
    let executors: HashSet<String> = if detail.get("node").is_some() {
        let mut set = HashSet::new();
        for run in &runs {
            let d = c.detail(&bases[0], run).await;
            set.insert(d["node"].as_str().unwrap_or_default().to_owned());
        }
        set
    } else {
        nodes
            .iter()
            .zip(["a", "b", "c"])
            .filter(|(n, _)| n.stderr().lines().any(|l| l.contains("run started")))
            .map(|(_, id)| id.to_owned())
            .collect()
    };
    assert!(executors.len() > 1, "runs executed by {executors:?} only");
    // Still one webhook each, after all of the above.
    assert_eq!(c.got.lock().unwrap().len(), 60);
}

/// Node `a` alone (one worker) takes the slow run of `project`; then `b`
/// joins, quick runs go to both, and `a` is killed mid-run. Returns the
/// cluster, the surviving node, the slow run and the quick runs.
async fn kill_a_mid_run(test: &str, project: &str) -> (Cluster, Server, String, Vec<String>) {
    let c = Cluster::new(test).await;
    let mut a = c
        .start(vec![c.node("a").args(&["--workers", "1"])])
        .await
        .remove(0);
    let slow = guid();
    c.submit(&a.base, &slow, project, "slow").await;
    c.wait_mid_run(&a.base, &slow, 2 * BATCH).await;
    let b = c
        .start(vec![c.node("b").args(&["--workers", "2"])])
        .await
        .remove(0);
    let quick: Vec<String> = (0..6).map(|_| guid()).collect();
    for (i, run) in quick.iter().enumerate() {
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        c.submit(base, run, "c", "quick").await;
    }
    // Still mid-run when killed: far from its last row, still Running.
    assert_eq!(c.detail(&b.base, &slow).await["status"], "Running");
    assert!(c.rows_of("slow", &slow).await < SLOW_ROWS / 2);
    a.kill();
    (c, b, slow, quick)
}

/// Waits until a run has ended as `base` tells it; its detail.
async fn wait_ended(c: &Cluster, base: &str, run: &str) -> Value {
    within(PATIENCE, &format!("{run} ends"), || async {
        let d = c.detail(base, run).await;
        (["Complete", "Failed", "Cancelled"].contains(&d["status"].as_str().unwrap_or_default()))
            .then_some(d)
    })
    .await
}

/// The node-lost checks shared by both kill -9 scenarios.
async fn after_the_kill(c: &Cluster, b: &Server, quick: &[String]) {
    all_complete_once(c, std::slice::from_ref(&b.base), quick).await;
    within(PATIENCE, "node a listed as lost", || async {
        (c.node_line(&b.base, "a").await["state"] == "lost").then_some(())
    })
    .await;
    assert_eq!(c.node_line(&b.base, "b").await["state"], "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_ends_the_run_failed_through_another_node() {
    let (c, b, slow, quick) = kill_a_mid_run("kill", "c").await;
    let killed = Instant::now();
    let margin = Duration::from_secs(LEASE_SECS + 20);
    let d = within(
        margin,
        "another node ends the run of the killed node",
        || async {
            let d = c.detail(&b.base, &slow).await;
            (d["status"] != "Running").then_some(d)
        },
    )
    .await;
    assert_eq!(d["status"], "Failed", "{d}");
    let error = d["error"].as_str().unwrap_or_default();
    assert!(error.contains(&interrupted("a")), "{d}");
    assert!(
        killed.elapsed() >= Duration::from_secs(1),
        "ended before its lease ran out"
    );
    c.one_hook(&slow, "Failed").await;
    after_the_kill(&c, &b, &quick).await;
    assert_eq!(c.results(&b.base, &slow).await[0]["status"], "Failed");
    assert_eq!(c.hooks_for(&slow).0, 1, "the killed run's webhook, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_reruns_a_job_that_allows_it_once() {
    let (c, b, slow, quick) = kill_a_mid_run("rerun", "rr").await;
    // a is dead: its run can only go on elsewhere, so at full speed.
    c.pace(0.0).await;
    let d = wait_ended(&c, &b.base, &slow).await;
    assert_eq!(d["status"], "Complete", "{d}");
    assert_eq!(d["results"][0]["totalRows"], SLOW_ROWS, "{d}");
    c.one_hook(&slow, "Complete").await;
    assert_eq!(c.rows_of("slow", &slow).await, SLOW_ROWS);
    after_the_kill(&c, &b, &quick).await;
    assert_eq!(c.hooks_for(&slow).0, 1, "the rerun run's webhook, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_that_wakes_writes_nothing_over_the_takeover() {
    freeze_past_the_lease("freeze", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_starts_no_batch_after_its_lease_ran_out() {
    freeze_past_the_lease("freezeb", true).await;
}

/// Node `a` runs the slow job; its next batch is held at the gate and `a`
/// is frozen (SIGSTOP) past its lease, so `b` ends the run. Then `a` wakes
/// (SIGCONT). The held batch goes on once `a` has said its lease is lost
/// or, if `open_while_frozen`, while `a` is still frozen (so `a` wakes in
/// the middle of a batch it may finish, and must start no other: its lease
/// ran out long before). Either way the takeover stands.
async fn freeze_past_the_lease(test: &str, open_while_frozen: bool) {
    let c = Cluster::new(test).await;
    let a = c
        .start(vec![c.node("a").args(&["--workers", "1"])])
        .await
        .remove(0);
    let run = guid();
    c.submit(&a.base, &run, "c", "slow").await;
    c.wait_mid_run(&a.base, &run, 2 * BATCH).await;
    let b = c.start(vec![c.node("b")]).await.remove(0);
    // Hold a's next batch inside its transaction (every batch before it
    // committed), then freeze a.
    c.close_gate(1).await;
    signal(&a, libc::SIGSTOP);
    let d = within(PATIENCE, "b ends the frozen node's run", || async {
        let d = c.detail(&b.base, &run).await;
        (d["status"] != "Running").then_some(d)
    })
    .await;
    assert_eq!(d["status"], "Failed", "{d}");
    let error = d["error"].as_str().unwrap_or_default();
    assert!(error.contains(&interrupted("a")), "{d}");
    c.one_hook(&run, "Failed").await;
    let results = c.results(&b.base, &run).await;
    let rows = c.rows_of("slow", &run).await;
    let frozen = within(PATIENCE, "the frozen node listed as lost", || async {
        let me = c.node_line(&b.base, "a").await;
        (me["state"] == "lost").then_some(me)
    })
    .await;
    let frozen_beat = frozen["heartbeatAt"].clone();
    if open_while_frozen {
        c.open_gate().await;
        c.wait_for_frozen_client().await;
    }
    signal(&a, libc::SIGCONT);
    // a wakes, finds its lease gone (its log says so) and stops the run; its
    // heartbeat shows it is back and runs nothing.
    if !open_while_frozen {
        within(
            PATIENCE,
            "the woken node says its lease was lost",
            || async {
                let log = a.stderr();
                (log.contains("lease lost") || log.contains("lease was taken over")).then_some(())
            },
        )
        .await;
        c.open_gate().await;
    }
    within(
        PATIENCE,
        "the woken node beats again with nothing running",
        || async {
            let me = c.node_line(&b.base, "a").await;
            let stopped = a.stderr().contains("lease was taken over");
            let back = me["heartbeatAt"] != frozen_beat && me["state"] == "active";
            (stopped && back && me["running"] == 0).then_some(())
        },
    )
    .await;
    // The takeover stands: the same end, results and webhook, seen from both.
    for base in [&a.base, &b.base] {
        let after = c.detail(base, &run).await;
        let same = (&after["status"], &after["error"]);
        assert_eq!(same, (&d["status"], &d["error"]), "{after}");
        assert_eq!(c.results(base, &run).await, results, "results on {base}");
    }
    assert_eq!(
        c.hooks_for(&run).0,
        1,
        "webhooks after the frozen node woke"
    );
    // The destination is not fenced by the store: the batch a held when it
    // froze may land, nothing after it.
    let after = c.rows_of("slow", &run).await;
    assert!(
        after <= rows + BATCH,
        "{rows} rows at the takeover, {after} after a woke (batches of {BATCH})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_store_stops_writing_once_its_lease_runs_out() {
    let c = Cluster::new("partition").await;
    // a reaches the store through a proxy the test takes down; the
    // destination it reaches directly.
    let proxy = common::Proxy::start("127.0.0.1:5432");
    let spec = c.node("a").args(&["--workers", "1"]).store_port(proxy.port);
    let a = c.start(vec![spec]).await.remove(0);
    let run = guid();
    c.submit(&a.base, &run, "c", "slow").await;
    c.wait_mid_run(&a.base, &run, 2 * BATCH).await;
    let b = c.start(vec![c.node("b")]).await.remove(0);
    proxy.take_down();
    let d = within(PATIENCE, "b ends the run of the node cut off", || async {
        let d = c.detail(&b.base, &run).await;
        (d["status"] != "Running").then_some(d)
    })
    .await;
    assert_eq!(d["status"], "Failed", "{d}");
    let error = d["error"].as_str().unwrap_or_default();
    assert!(error.contains(&interrupted("a")), "{d}");
    let rows = c.rows_of("slow", &run).await;
    // a cannot hear that it lost the run, but its lease ran out by its own
    // clock: it must not go on writing over the takeover. It stops at its
    // next batch (or goes on to the end: then this says how far).
    c.wait_no_writer().await;
    let after = c.rows_of("slow", &run).await;
    assert!(
        after <= rows + BATCH,
        "{rows} rows when b ended the run, {after} once a stopped writing (batches of {BATCH}):\n{}",
        a.stderr()
    );
    c.one_hook(&run, "Failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_through_another_node_stops_the_run() {
    let c = Cluster::new("cancel").await;
    let a = c
        .start(vec![c.node("a").args(&["--workers", "1"])])
        .await
        .remove(0);
    let run = guid();
    c.submit(&a.base, &run, "c", "slow").await;
    c.wait_mid_run(&a.base, &run, BATCH).await;
    let b = c.start(vec![c.node("b")]).await.remove(0);
    let r = c
        .http
        .post(format!("{}/v1/Runs/{run}/cancel", b.base))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "{} {}",
        r.status(),
        r.text().await.unwrap_or_default()
    );
    let asked = Instant::now();
    let d = c.wait_status(&b.base, &run, "Cancelled").await;
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "the cancel took {:?}",
        asked.elapsed()
    );
    assert_eq!(c.detail(&a.base, &run).await["status"], "Cancelled", "{d}");
    c.one_hook(&run, "Cancelled").await;
    assert!(c.rows_of("slow", &run).await < SLOW_ROWS);
    // a is free again: it runs the next one.
    let next = guid();
    c.submit(&b.base, &next, "c", "quick").await;
    all_complete_once(&c, &[a.base.clone(), b.base.clone()], &[next]).await;
}

/// Polls the Running runs of `lim/one` on every node until `stop`; the most
/// seen Running at once.
async fn most_running_at_once(c: &Cluster, bases: &[String], stop: &AtomicBool) -> usize {
    let mut most = 0;
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let base = &bases[i % bases.len()];
        i += 1;
        let page = c
            .get(&format!(
                "{base}/v1/Runs?project=lim&job=one&status=Running&limit=500"
            ))
            .await;
        if let Some(list) = page["runs"].as_array() {
            most = most.max(list.len());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_limited_to_one_run_never_runs_twice_at_once_across_nodes() {
    let c = Cluster::new("limit").await;
    let nodes = c
        .start(
            ["a", "b", "c"]
                .iter()
                .map(|id| c.node(id).args(&["--workers", "2"]))
                .collect(),
        )
        .await;
    let bases = bases(&nodes);
    let stop = AtomicBool::new(false);
    let runs: Vec<String> = (0..6).map(|_| guid()).collect();
    let submit_and_wait = async {
        for (i, run) in runs.iter().enumerate() {
            c.submit(&bases[i % 3], run, "lim", "one").await;
        }
        all_complete_once(&c, &bases, &runs).await;
        stop.store(true, Ordering::SeqCst);
    };
    let (most, ()) = tokio::join!(most_running_at_once(&c, &bases, &stop), submit_and_wait);
    assert_eq!(most, 1, "Running at once (as GET /v1/Runs saw it)");
    // The rows say the same, to the microsecond: each run wrote all of its
    // rows before the next wrote its first.
    let spans = c
        .sql
        .query(
            "SELECT run, count(*), min(at), max(at) FROM dst.slow GROUP BY run ORDER BY min(at)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(spans.len(), runs.len());
    let mut last_end: Option<chrono::DateTime<chrono::Utc>> = None;
    for s in &spans {
        let (run, n): (String, i64) = (s.get(0), s.get(1));
        let (start, end): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
            (s.get(2), s.get(3));
        assert_eq!(n, SHORT_ROWS, "{run}");
        if let Some(prev) = last_end {
            assert!(
                start > prev,
                "{run} wrote at {start} while another run wrote until {prev}"
            );
        }
        last_end = Some(end);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_job_on_an_accept_only_node_answers_with_the_final_result() {
    let c = Cluster::new("sync").await;
    let nodes = c
        .start(vec![
            c.node("front").args(&["--workers", "0"]),
            c.node("back"),
        ])
        .await;
    let (front, back) = (&nodes[0], &nodes[1]);
    let run = guid();
    let r = c
        .http
        .post(format!("{}/v1/ExecuteJob", front.base))
        .json(&json!({"runID": run, "projectID": "c", "jobID": "short", "argument": run}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["runID"].as_str(), v["status"].as_str()),
        (Some(run.as_str()), Some("Complete")),
        "{v}"
    );
    assert_eq!(v["results"][0]["totalRows"], SHORT_ROWS, "{v}");
    assert_eq!(c.rows_of("slow", &run).await, SHORT_ROWS);
    // The back node ran it; both tell the same result.
    assert_eq!(
        c.results(&back.base, &run).await,
        c.results(&front.base, &run).await
    );
    assert_eq!(c.node_line(&front.base, "front").await["workers"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_at_once_on_an_empty_database_all_come_up() {
    let c = Cluster::new("boot").await;
    let ids = ["a", "b", "c"];
    let nodes = c.start(ids.iter().map(|id| c.node(id)).collect()).await;
    let bases = bases(&nodes);
    within(PATIENCE, "every node lists the three as active", || async {
        for base in &bases {
            let list = c.nodes(base).await;
            let active = list["nodes"]
                .as_array()
                .map_or(0, |l| l.iter().filter(|n| n["state"] == "active").count());
            if active != 3 {
                return None;
            }
        }
        Some(())
    })
    .await;
    let runs: Vec<String> = (0..3).map(|_| guid()).collect();
    for (run, base) in runs.iter().zip(&bases) {
        c.submit(base, run, "c", "quick").await;
    }
    all_complete_once(&c, &bases, &runs).await;
    for n in &nodes {
        let log = n.stderr();
        assert!(
            !log.contains("ERROR"),
            "a node logged an error while starting:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_hands_its_run_back_and_another_completes_it() {
    let c = Cluster::new("drain").await;
    let a = c
        .start(vec![
            c.node("a")
                .args(&["--workers", "1"])
                .config("shutdown_grace_secs = 1\n"),
        ])
        .await
        .remove(0);
    let run = guid();
    c.submit(&a.base, &run, "c", "slow").await;
    c.wait_mid_run(&a.base, &run, 2 * BATCH).await;
    let b = c.start(vec![c.node("b")]).await.remove(0);
    a.sigterm();
    let (exit, a) = a.wait_exit_async().await;
    assert!(exit.success(), "{exit:?}\n{}", a.stderr());
    // b runs it from the start: at full speed now.
    c.pace(0.0).await;
    let d = wait_ended(&c, &b.base, &run).await;
    assert_eq!(d["status"], "Complete", "{d}");
    assert_eq!(d["results"][0]["totalRows"], SLOW_ROWS, "{d}");
    c.one_hook(&run, "Complete").await;
    assert_eq!(c.rows_of("slow", &run).await, SLOW_ROWS);
    assert_eq!(c.node_line(&b.base, "a").await["state"], "stopped");
}

/// What every request made while the store's sessions are cut got: only
/// 2xx, or 503 with Retry-After, are allowed.
#[derive(Default)]
struct Answers {
    ok: AtomicUsize,
    unavailable: AtomicUsize,
    bad: std::sync::Mutex<Vec<String>>,
}

impl Answers {
    /// Requests answered (or failed) so far.
    fn total(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
            + self.unavailable.load(Ordering::SeqCst)
            + self.bad.lock().unwrap().len()
    }

    fn note(&self, what: &str, r: Result<reqwest::Response, reqwest::Error>) -> bool {
        match r {
            Ok(r) if r.status().is_success() => {
                self.ok.fetch_add(1, Ordering::SeqCst);
                true
            }
            Ok(r) if r.status() == 503 && r.headers().contains_key("retry-after") => {
                self.unavailable.fetch_add(1, Ordering::SeqCst);
                false
            }
            Ok(r) => {
                self.bad
                    .lock()
                    .unwrap()
                    .push(format!("{what}: {}", r.status()));
                false
            }
            Err(e) => {
                self.bad.lock().unwrap().push(format!("{what}: {e}"));
                false
            }
        }
    }
}

/// Until `stop`: submits quick runs (each retried under its runID until
/// accepted, as a client does after a 503) and reads the runs of `watch`
/// and the nodes, on every node in turn. The runs accepted.
async fn traffic(
    c: &Cluster,
    bases: &[String],
    watch: &[String],
    answers: &Answers,
    stop: &AtomicBool,
) -> Vec<String> {
    let mut accepted = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let base = &bases[i % bases.len()];
        i += 1;
        let run = guid();
        let body = json!({"runID": run, "projectID": "c", "jobID": "quick",
                          "argument": run, "webHookURL": c.hook});
        let deadline = Instant::now() + PATIENCE;
        loop {
            let r = c
                .http
                .post(format!("{base}/v1/ExecuteJobAsync"))
                .json(&body)
                .send()
                .await;
            if answers.note("ExecuteJobAsync", r) {
                accepted.push(run.clone());
                break;
            }
            assert!(Instant::now() < deadline, "{run} never accepted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (j, run) in watch.iter().enumerate() {
            let base = &bases[(i + j) % bases.len()];
            let r = c.http.get(format!("{base}/v1/Runs/{run}")).send().await;
            answers.note(&format!("Runs/{run}"), r);
            let r = c.http.get(format!("{base}/v1/Results/{run}")).send().await;
            answers.note(&format!("Results/{run}"), r);
        }
        let r = c.http.get(format!("{base}/v1/Nodes")).send().await;
        answers.note("Nodes", r);
        // A client's pace, not a wait for anything.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    accepted
}

/// Cuts the store's sessions (every session on the database but the
/// destination's and the test's) `rounds` times, each once the nodes have
/// reconnected, a run made progress and the client was answered since the
/// last cut; how many sessions each cut ended.
async fn cut_store_sessions(c: &Cluster, rounds: usize, answers: &Answers) -> Vec<i64> {
    let count_sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                     AND pid <> pg_backend_pid() AND application_name NOT IN ('tp_dst', 'tp_test')";
    let cut_sql = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND application_name NOT IN ('tp_dst', 'tp_test')";
    let landed = || async {
        let sql = "SELECT (SELECT count(*) FROM dst.slow) + (SELECT count(*) FROM dst.quick)";
        let n: i64 = c.sql.query_one(sql, &[]).await.unwrap().get(0);
        n
    };
    let mut cuts = Vec::new();
    for _ in 0..rounds {
        let before = landed().await;
        let asked = answers.total();
        within(
            PATIENCE,
            "the nodes reconnect to the store and rows land",
            || async {
                let sessions: i64 = c.sql.query_one(count_sql, &[]).await.unwrap().get(0);
                let answered = answers.total() > asked;
                (answered && sessions > 0 && landed().await > before).then_some(())
            },
        )
        .await;
        cuts.push(c.sql.query_one(cut_sql, &[]).await.unwrap().get(0));
    }
    cuts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_connections_cut_mid_run_lose_nothing_and_answer_503_at_worst() {
    let c = Cluster::new("cut").await;
    let nodes = c
        .start(
            ["a", "b"]
                .iter()
                .map(|id| c.node(id).args(&["--workers", "2"]))
                .collect(),
        )
        .await;
    let bases = bases(&nodes);
    let runs: Vec<String> = (0..12).map(|_| guid()).collect();
    for (i, run) in runs.iter().enumerate() {
        c.submit(&bases[i % 2], run, "c", "short").await;
    }
    let answers = Answers::default();
    let stop = AtomicBool::new(false);
    let cutting = async {
        let cuts = cut_store_sessions(&c, 8, &answers).await;
        stop.store(true, Ordering::SeqCst);
        cuts
    };
    let (cuts, quick) = tokio::join!(cutting, traffic(&c, &bases, &runs, &answers, &stop));
    assert!(
        cuts.iter().filter(|n| **n > 0).count() >= 4,
        "sessions cut per round: {cuts:?}"
    );
    eprintln!(
        "store sessions cut per round: {cuts:?}; answers: {} ok, {} 503; {} runs accepted meanwhile",
        answers.ok.load(Ordering::SeqCst),
        answers.unavailable.load(Ordering::SeqCst),
        quick.len()
    );
    assert!(answers.ok.load(Ordering::SeqCst) > 0);
    all_complete_once(&c, &bases, &runs).await;
    all_complete_once(&c, &bases, &quick).await;
    for run in &runs {
        assert_eq!(c.rows_of("slow", run).await, SHORT_ROWS, "{run}");
    }
    for run in &quick {
        assert_eq!(c.rows_of("quick", run).await, QUICK_ROWS, "{run}");
    }
    assert_eq!(
        c.got.lock().unwrap().len(),
        runs.len() + quick.len(),
        "webhooks in all"
    );
    // Last, so that a wrong answer does not hide how the runs ended.
    let bad = answers.bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "answers other than 2xx or 503 + Retry-After: {bad:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_run_id_sent_to_every_node_at_once_is_one_run() {
    let c = Cluster::new("same").await;
    let nodes = c
        .start(["a", "b", "c"].iter().map(|id| c.node(id)).collect())
        .await;
    let bases = bases(&nodes);
    for _ in 0..5 {
        let run = guid();
        tokio::join!(
            c.submit(&bases[0], &run, "c", "short"),
            c.submit(&bases[1], &run, "c", "short"),
            c.submit(&bases[2], &run, "c", "short"),
        );
        all_complete_once(&c, &bases, std::slice::from_ref(&run)).await;
        assert_eq!(c.rows_of("slow", &run).await, SHORT_ROWS, "{run}");
        let page = c
            .get(&format!("{}/v1/Runs?q={run}&limit=500", bases[0]))
            .await;
        let listed = page["runs"].as_array().map_or(0, Vec::len);
        assert_eq!(listed, 1, "{page}");
        let d = c.detail(&bases[0], &run).await;
        assert_eq!(d["results"].as_array().map(Vec::len), Some(1), "{d}");
        assert_eq!(d["results"][0]["inserts"], SHORT_ROWS, "{d}");
    }
}
