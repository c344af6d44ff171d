//! Schedules end to end: real `tidepool serve` nodes on a PostgreSQL store
//! of the test's own, schedules that fire every 2 s, and what a user checks:
//! the ticks the store recorded, the runs they made, the rows those runs
//! wrote, and what `GET /v1/Schedules` and `GET /v1/Runs/{id}` say.

// Not every helper of the cluster tests is used here.
#[allow(dead_code)]
#[path = "common/cluster.rs"]
mod cluster;
mod common;

use chrono::{DateTime, Utc};
use cluster::{Cluster, DST_APP, PATIENCE, within};
use serde_json::Value;

/// `id,name` rows of the scheduled jobs' origin.
const ROWS: i64 = 20;

/// A job that copies `mid.csv` (20 rows) into `dst.{table}`, one row per
/// origin row and run, with `schedule` as its one `[[schedules]]` entry.
fn scheduled_job(schedule: &str, table: &str) -> String {
    format!(
        r#"batch_size = 2
[[schedules]]
{schedule}
[origin]
connection = "mid"
[destination]
connection = "dst"
[[stages]]
table = "dst.{table}"
action = "insert"
fields = [
  {{ column = "run", function = "run_id" }},
  {{ column = "id", origin = "id" }},
  {{ column = "name", origin = "name" }},
]
"#
    )
}

/// Project `s` with these jobs (the cluster's own projects have no schedules).
fn project(c: &Cluster, jobs: &[(&str, String)]) {
    let conns = format!(
        "[connections.mid]\nkind = \"csv\"\npath = \"mid.csv\"\n\
         [connections.dst]\nkind = \"postgres\"\nurl = \"{}?application_name={DST_APP}\"\n",
        c.db.url()
    );
    c.fixture.write("projects/s/project.toml", &conns);
    let mut csv = String::from("id,name\n");
    for i in 1..=ROWS {
        csv.push_str(&format!("{i},n{i}\n"));
    }
    c.fixture.write("projects/s/mid.csv", csv);
    for (id, toml) in jobs {
        c.fixture.write(&format!("projects/s/jobs/{id}.toml"), toml);
    }
}

/// A tick as the store recorded it.
#[derive(Debug, Clone)]
struct Tick {
    at: DateTime<Utc>,
    outcome: String,
    run: Option<uuid::Uuid>,
    covers: i64,
    catch_up: bool,
    reason: Option<String>,
}

/// The ticks of job `job`'s schedules, oldest first.
async fn ticks(c: &Cluster, job: &str) -> Vec<Tick> {
    c.sql
        .query(
            "SELECT tick_at, outcome, run_id, covers, catch_up, reason FROM schedule_ticks
             WHERE project_id = 's' AND job_id = $1 ORDER BY tick_at",
            &[&job],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Tick {
            at: r.get(0),
            outcome: r.get(1),
            run: r.get(2),
            covers: r.get(3),
            catch_up: r.get(4),
            reason: r.get(5),
        })
        .collect()
}

fn with<'a>(ticks: &'a [Tick], outcome: &str) -> Vec<&'a Tick> {
    ticks.iter().filter(|t| t.outcome == outcome).collect()
}

/// Waits until job `job` has ticks for which `holds` is true; its ticks.
async fn ticks_until(
    c: &Cluster,
    job: &str,
    what: &str,
    holds: impl Fn(&[Tick]) -> bool,
) -> Vec<Tick> {
    within(PATIENCE, &format!("{job}: {what}"), || async {
        let t = ticks(c, job).await;
        holds(&t).then_some(t)
    })
    .await
}

/// Waits until no run of project `s` is Queued or Running.
async fn all_runs_ended(c: &Cluster) {
    within(PATIENCE, "every scheduled run ended", || async {
        let open: i64 = c
            .sql
            .query_one(
                "SELECT count(*) FROM runs WHERE project_id = 's' AND status IN ('Queued', 'Running')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (open == 0).then_some(())
    })
    .await;
}

/// Waits until the wall clock is past `t`.
async fn clock_past(t: DateTime<Utc>) {
    within(PATIENCE, &format!("the clock passes {t}"), || async {
        (Utc::now() > t).then_some(())
    })
    .await;
}

/// POSTs pause or resume of job `job`'s first schedule; the answer.
async fn set_paused(c: &Cluster, base: &str, job: &str, verb: &str) -> Value {
    let r = c
        .http
        .post(format!("{base}/v1/Schedules/s/{job}/schedule-1/{verb}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{verb} {job}");
    r.json().await.unwrap()
}

/// Every queued tick made exactly one run, every run came from a tick, and
/// each run wrote its 20 rows into `dst.{table}` once it ended.
async fn one_run_per_queued_tick(c: &Cluster, table: &str) {
    all_runs_ended(c).await;
    let row = c
        .sql
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM schedule_ticks WHERE project_id = 's' AND outcome = 'queued'),
                        (SELECT count(DISTINCT run_id) FROM schedule_ticks WHERE project_id = 's' AND outcome = 'queued'),
                        (SELECT count(*) FROM runs WHERE project_id = 's'),
                        (SELECT count(*) FROM runs WHERE project_id = 's' AND status = 'Complete'),
                        (SELECT count(*) FROM runs r WHERE project_id = 's' AND NOT EXISTS
                           (SELECT 1 FROM schedule_ticks t WHERE t.run_id = r.run_id)),
                        (SELECT count(*) FROM dst.{table})"
            ),
            &[],
        )
        .await
        .unwrap();
    let (queued, distinct, runs, complete, orphans, rows): (i64, i64, i64, i64, i64, i64) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    );
    assert_eq!(
        (distinct, runs, complete, orphans),
        (queued, queued, queued, 0)
    );
    assert_eq!(rows, queued * ROWS, "rows in dst.{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_make_one_run_per_tick_and_pause_stops_them() {
    let c = Cluster::new("sched_three").await;
    let every = "cron = \"*/2 * * * * *\"\noverlap = \"queue\"";
    project(&c, &[("tick", scheduled_job(every, "quick"))]);
    let nodes = c.start(vec![c.node("a"), c.node("b"), c.node("c")]).await;
    let t = ticks_until(&c, "tick", "four ticks queued", |t| {
        with(t, "queued").len() >= 4
    })
    .await;
    // Ticks fall on even seconds, each once.
    for tick in &t {
        assert_eq!(tick.at.timestamp() % 2, 0, "{tick:?}");
    }
    // What a user sees: the schedule, and a run that names its tick.
    let list = c.get(&format!("{}/v1/Schedules", nodes[2].base)).await;
    let line = &list["schedules"][0];
    assert_eq!(
        (
            &line["projectID"],
            &line["jobID"],
            &line["name"],
            &line["cron"],
            &line["timezone"]
        ),
        (
            &"s".into(),
            &"tick".into(),
            &"schedule-1".into(),
            &"*/2 * * * * *".into(),
            &"UTC".into()
        )
    );
    assert_eq!(
        line["nextFireTimes"].as_array().map(Vec::len),
        Some(5),
        "{line}"
    );
    assert_eq!(line["paused"], false);
    let first = with(&t, "queued")[0].clone();
    let run = first.run.unwrap().to_string();
    let d = c.wait_status(&nodes[1].base, &run, "Complete").await;
    assert_eq!(d["schedule"]["name"], "schedule-1", "{d}");
    assert_eq!(
        d["schedule"]["tick"]
            .as_str()
            .map(|s| DateTime::parse_from_rfc3339(s).unwrap()),
        Some(first.at.fixed_offset())
    );

    // Paused through one node: no node fires a tick after that.
    let paused = set_paused(&c, &nodes[1].base, "tick", "pause").await;
    assert_eq!(paused["paused"], true, "{paused}");
    let paused_at = Utc::now();
    clock_past(paused_at + chrono::Duration::milliseconds(4500)).await;
    let after: Vec<Tick> = ticks(&c, "tick")
        .await
        .into_iter()
        .filter(|t| t.at > paused_at)
        .collect();
    assert!(after.is_empty(), "ticks while paused: {after:?}");
    one_run_per_queued_tick(&c, "quick").await;

    // Resumed through another: firing starts again.
    let resumed = set_paused(&c, &nodes[0].base, "tick", "resume").await;
    assert_eq!(resumed["paused"], false, "{resumed}");
    let resumed_at = Utc::now();
    ticks_until(&c, "tick", "a tick after resuming", |t| {
        t.iter().any(|t| t.at > resumed_at && t.outcome == "queued")
    })
    .await;
    set_paused(&c, &nodes[0].base, "tick", "pause").await;
    one_run_per_queued_tick(&c, "quick").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_downtime_catch_up_none_misses_and_last_runs_once() {
    let c = Cluster::new("sched_catchup").await;
    let none = "cron = \"*/2 * * * * *\"\noverlap = \"queue\"";
    let last = "cron = \"*/2 * * * * *\"\noverlap = \"queue\"\ncatch_up = \"last\"";
    project(
        &c,
        &[
            ("none", scheduled_job(none, "quick")),
            ("last", scheduled_job(last, "quick")),
        ],
    );
    let node = c.start(vec![c.node("a")]).await.remove(0);
    for job in ["none", "last"] {
        ticks_until(&c, job, "a tick queued", |t| !with(t, "queued").is_empty()).await;
    }
    // Stop just after a tick (the next is nearly 2 s away), cleanly: its
    // runs go back to the queue and run after the restart. The scheduler
    // stops at the signal (the drain may take longer).
    let seen = ticks(&c, "none").await.last().map(|t| t.at);
    ticks_until(&c, "none", "a newer tick", |t| {
        t.last().map(|t| t.at) > seen
    })
    .await;
    let stopped_at = Utc::now();
    node.sigterm();
    let (status, _stopped) = node.wait_exit_async().await;
    assert!(status.success(), "{status}");
    // At least three ticks come and go with no node running.
    clock_past(stopped_at + chrono::Duration::seconds(7)).await;
    let node = c.start(vec![c.node("a")]).await.remove(0);
    let restarted_at = Utc::now();
    let mut got = Vec::new();
    for job in ["none", "last"] {
        got.push(
            ticks_until(&c, job, "a tick after the restart", |t| {
                t.iter()
                    .any(|t| t.at > restarted_at && t.outcome == "queued" && !t.catch_up)
            })
            .await,
        );
    }
    let down = |t: &Tick| t.at > stopped_at && t.at < restarted_at;

    // none: the ticks of the downtime are one missed record, with no run.
    let none_down: Vec<&Tick> = got[0].iter().filter(|t| down(t)).collect();
    let missed: Vec<&Tick> = none_down
        .iter()
        .copied()
        .filter(|t| t.outcome == "missed")
        .collect();
    assert_eq!(missed.len(), 1, "{:?}", got[0]);
    assert!(missed[0].covers >= 2, "{missed:?}");
    assert!(
        none_down
            .iter()
            .all(|t| t.outcome != "queued" || t.at > missed[0].at),
        "a run for a missed tick: {none_down:?}"
    );

    // last: one catch-up run for them all, nothing missed.
    assert!(
        got[1].iter().all(|t| !(down(t) && t.outcome == "missed")),
        "{:?}",
        got[1]
    );
    let caught: Vec<&Tick> = got[1].iter().filter(|t| t.catch_up).collect();
    assert_eq!(caught.len(), 1, "{:?}", got[1]);
    assert!(
        caught[0].covers >= 2 && down(caught[0]) && caught[0].outcome == "queued",
        "{caught:?}"
    );
    let run = caught[0].run.unwrap().to_string();
    let d = c.wait_status(&node.base, &run, "Complete").await;
    assert_eq!(d["schedule"]["catchUp"], true, "{d}");
    for job in ["none", "last"] {
        set_paused(&c, &node.base, job, "pause").await;
    }
    one_run_per_queued_tick(&c, "quick").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_skip_records_skipped_ticks_and_queue_queues_runs() {
    let c = Cluster::new("sched_overlap").await;
    c.pace(0.0).await;
    let skip = "cron = \"*/2 * * * * *\"";
    let queue = "cron = \"*/2 * * * * *\"\noverlap = \"queue\"";
    project(
        &c,
        &[
            ("skip", scheduled_job(skip, "slow")),
            ("queue", scheduled_job(queue, "slow")),
        ],
    );
    // Every run waits at the first batch until the gate opens: each job is
    // slower than its schedule.
    c.close_gate(0).await;
    let node = c.start(vec![c.node("a")]).await.remove(0);
    ticks_until(&c, "skip", "two ticks skipped", |t| {
        with(t, "skipped").len() >= 2
    })
    .await;
    ticks_until(&c, "queue", "three runs queued", |t| {
        with(t, "queued").len() >= 3
    })
    .await;
    for job in ["skip", "queue"] {
        set_paused(&c, &node.base, job, "pause").await;
    }
    let paused_at = Utc::now();
    c.open_gate().await;
    all_runs_ended(&c).await;

    let skip_ticks = ticks(&c, "skip").await;
    let runs = with(&skip_ticks, "queued");
    assert_eq!(
        runs.len(),
        1,
        "skip ran more than one run at once: {skip_ticks:?}"
    );
    for t in with(&skip_ticks, "skipped") {
        assert!(t.at > runs[0].at, "{skip_ticks:?}");
        let why = t.reason.as_deref().unwrap_or_default();
        assert!(
            why.contains("still running") && why.contains(&runs[0].run.unwrap().to_string()),
            "{why}"
        );
    }
    let queue_ticks = ticks(&c, "queue").await;
    assert!(with(&queue_ticks, "skipped").is_empty(), "{queue_ticks:?}");
    for t in skip_ticks.iter().chain(&queue_ticks) {
        assert!(t.at <= paused_at, "a tick while paused: {t:?}");
    }
    one_run_per_queued_tick(&c, "slow").await;

    // The API's view: the last tick and the recent ones, with their outcomes.
    let list = c.get(&format!("{}/v1/Schedules", node.base)).await;
    let line = list["schedules"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["jobID"] == "skip").cloned())
        .unwrap_or(Value::Null);
    assert_eq!(
        (&line["paused"], &line["overlap"]),
        (&true.into(), &"skip".into()),
        "{line}"
    );
    assert_eq!(line["lastTick"]["outcome"], "skipped", "{line}");
    let outcomes: Vec<&str> = line["recentTicks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["outcome"].as_str())
        .collect();
    assert!(
        outcomes.contains(&"queued") && outcomes.contains(&"skipped"),
        "{line}"
    );
    // Unknown schedules are 404.
    let r = c
        .http
        .post(format!("{}/v1/Schedules/s/skip/nope/pause", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
