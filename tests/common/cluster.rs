//! A cluster of `tidepool serve` nodes sharing one PostgreSQL database of the
//! test's own (created at the start, dropped at the end), the projects they
//! all serve, a webhook receiver, and the test's own SQL connection to count
//! destination rows and to pace or hold the runs.
//!
//! The jobs write into tables of schema `dst` of the same database. Table
//! `dst.slow` has a trigger that takes a share lock on the row of `dst.gate`
//! (the test closes the gate by holding it for update) and then sleeps
//! `dst.ctl.delay` seconds per row, so a test can keep a run going (mid-run
//! for as long as it likes), hold it inside a batch (and see it waiting
//! there), or let it race to the end, without a fixed sleep anywhere.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::databases::pg_url;
use crate::common::wait::Received;
use crate::common::{Fixture, ServeBuilder, Server, webhook_receiver};

/// The lease the nodes of a test hold runs under, in seconds: short, so
/// takeovers come soon, yet long enough that a store slowed by a loaded
/// machine (a stall of two seconds and more was seen in CI) does not cost a
/// healthy node its run.
pub const LEASE_SECS: u64 = 6;

/// How long a condition may take on a loaded machine.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Rows of the slow job (`slow.csv`): 400 × 50 ms is 20 s at the least.
pub const SLOW_ROWS: i64 = 400;
/// Rows of the short job (`mid.csv`).
pub const SHORT_ROWS: i64 = 20;
/// Rows of the quick job (`few.csv`).
pub const QUICK_ROWS: i64 = 5;
/// The batch size of the jobs that write into `dst.slow`.
pub const BATCH: i64 = 2;

/// The application name of the destination sessions (never cut with the store's).
pub const DST_APP: &str = "tp_dst";
/// The application name of the test's own sessions.
pub const TEST_APP: &str = "tp_test";

/// A database of the test's own on the local PostgreSQL.
pub struct TestDb {
    /// Its name, `tp_<test>_<random>`.
    pub name: String,
}

/// `url` with its database replaced by `db` (and the query string dropped).
fn url_of(url: &str, db: &str) -> String {
    let url = url.split('?').next().unwrap_or(url);
    let (base, _) = url.rsplit_once('/').expect("a database URL");
    format!("{base}/{db}")
}

/// Runs `f` on a thread of its own: the `postgres` crate blocks on a
/// runtime of its own, which a tokio worker thread may not do.
fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().expect("admin thread")
}

impl TestDb {
    /// Creates `tp_<test>_<random>`.
    pub fn new(test: &str) -> TestDb {
        let name = format!(
            "tp_{test}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let create = format!("CREATE DATABASE {name}");
        off_runtime(move || {
            let mut admin = postgres::Client::connect(&pg_url(), postgres::NoTls)
                .expect("PostgreSQL must be running on 127.0.0.1:5432 (see .ci/run)");
            admin.batch_execute(&create).unwrap();
        });
        TestDb { name }
    }

    /// `postgres://…/NAME`, as `--store` takes it.
    pub fn url(&self) -> String {
        url_of(&pg_url(), &self.name)
    }

    /// A new connection of the test's own to the database.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let url = format!("{}?application_name={TEST_APP}", self.url());
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(conn);
        client
    }
}

impl Drop for TestDb {
    /// Best effort: cuts whoever is still connected, then drops the database.
    fn drop(&mut self) {
        let name = self.name.clone();
        off_runtime(move || {
            let Ok(mut admin) = postgres::Client::connect(&pg_url(), postgres::NoTls) else {
                return;
            };
            let _ = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                &[&name],
            );
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        });
    }
}

/// The destination tables, the pacing trigger and its controls.
const DESTINATION_SQL: &str = r#"
CREATE SCHEMA dst;
CREATE TABLE dst.ctl(delay float8 NOT NULL);
INSERT INTO dst.ctl VALUES (0.05);
CREATE TABLE dst.gate(id int PRIMARY KEY);
INSERT INTO dst.gate VALUES (1);
CREATE TABLE dst.quick(run text, id integer, name text, PRIMARY KEY (run, id));
CREATE TABLE dst.slow(run text, id integer, name text,
                      at timestamptz NOT NULL DEFAULT clock_timestamp(),
                      PRIMARY KEY (run, id));
CREATE FUNCTION dst.pace() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM 1 FROM dst.gate FOR SHARE;
  PERFORM pg_sleep((SELECT delay FROM dst.ctl));
  NEW.at := clock_timestamp();
  RETURN NEW;
END $$;
CREATE TRIGGER pace BEFORE INSERT OR UPDATE ON dst.slow
  FOR EACH ROW EXECUTE FUNCTION dst.pace();
"#;

/// A job from CSV connection `origin` into `table`, keyed by the run's
/// argument (the test passes the runID) and the row's id; `head` goes above
/// `[origin]`.
fn job(head: &str, origin: &str, table: &str, batch: i64) -> String {
    format!(
        r#"{head}
batch_size = {batch}
[origin]
connection = "{origin}"
[destination]
connection = "dst"
[[stages]]
table = "dst.{table}"
action = "update/insert"
fields = [
  {{ column = "run", template = "@@VAR:JobArgument@@", match = true }},
  {{ column = "id", origin = "id", match = true }},
  {{ column = "name", origin = "name" }},
]
"#
    )
}

/// `id,name` rows 1..=n.
fn csv(n: i64) -> String {
    let mut s = String::from("id,name\n");
    for i in 1..=n {
        s.push_str(&format!("{i},n{i}\n"));
    }
    s
}

/// A node to start: its id and what it is started with besides the store,
/// its id and the lease.
pub struct NodeSpec {
    id: String,
    args: Vec<String>,
    config: Option<String>,
    log: Option<String>,
    store_port: Option<u16>,
}

impl NodeSpec {
    /// More `tidepool serve` arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// A config file with this TOML.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_owned());
        self
    }

    /// Reaches the store through this loopback port (a [`crate::common::Proxy`]).
    pub fn store_port(mut self, port: u16) -> Self {
        self.store_port = Some(port);
        self
    }

    /// `TIDEPOOL_LOG`.
    pub fn log(mut self, level: &str) -> Self {
        self.log = Some(level.to_owned());
        self
    }
}

/// A test's database, projects, webhook receiver and SQL connection.
pub struct Cluster {
    /// Projects and the nodes' data folders.
    pub fixture: Fixture,
    /// Where the webhooks go.
    pub hook: String,
    /// What the receiver got.
    pub got: Received,
    /// The test's own connection to the database.
    pub sql: tokio_postgres::Client,
    /// The connection that holds the gate closed.
    gate: tokio_postgres::Client,
    /// HTTP.
    pub http: reqwest::Client,
    /// Dropped last (declared last): cuts every session and drops the database.
    pub db: TestDb,
}

impl Cluster {
    /// A new database with the destination tables; projects `c` (jobs
    /// `quick`, `short`, `slow`), `lim` (job `one`, `max_concurrent_runs = 1`)
    /// and `rr` (job `slow`, `rerun_on_node_loss = true`).
    pub async fn new(test: &str) -> Cluster {
        let db = TestDb::new(test);
        let sql = db.connect().await;
        sql.batch_execute(DESTINATION_SQL).await.unwrap();
        let gate = db.connect().await;
        let fixture = Fixture::new();
        let conns = format!(
            "[connections.few]\nkind = \"csv\"\npath = \"few.csv\"\n\
             [connections.mid]\nkind = \"csv\"\npath = \"mid.csv\"\n\
             [connections.src]\nkind = \"csv\"\npath = \"slow.csv\"\n\
             [connections.dst]\nkind = \"postgres\"\nurl = \"{}?application_name={DST_APP}\"\n",
            db.url()
        );
        let jobs = [
            ("c", "quick", job("", "few", "quick", 10)),
            ("c", "short", job("", "mid", "slow", BATCH)),
            ("c", "slow", job("", "src", "slow", BATCH)),
            (
                "lim",
                "one",
                job("max_concurrent_runs = 1", "mid", "slow", BATCH),
            ),
            (
                "rr",
                "slow",
                job("rerun_on_node_loss = true", "src", "slow", BATCH),
            ),
        ];
        for (project, id, toml) in &jobs {
            fixture.write(&format!("projects/{project}/jobs/{id}.toml"), toml);
        }
        for project in ["c", "lim", "rr"] {
            fixture.write(&format!("projects/{project}/project.toml"), &conns);
            fixture.write(&format!("projects/{project}/few.csv"), csv(QUICK_ROWS));
            fixture.write(&format!("projects/{project}/mid.csv"), csv(SHORT_ROWS));
            fixture.write(&format!("projects/{project}/slow.csv"), csv(SLOW_ROWS));
        }
        let (hook, got) = webhook_receiver(|_| axum::http::StatusCode::OK).await;
        Cluster {
            fixture,
            hook,
            got,
            sql,
            gate,
            http: reqwest::Client::new(),
            db,
        }
    }

    /// A node named `id` on the shared store, with its own data folder.
    pub fn node(&self, id: &str) -> NodeSpec {
        NodeSpec {
            id: id.to_owned(),
            args: Vec::new(),
            config: None,
            log: None,
            store_port: None,
        }
    }

    fn builder(&self, spec: &NodeSpec) -> ServeBuilder {
        let data: PathBuf = self.fixture.root.join(format!("data-{}", spec.id));
        std::fs::create_dir_all(&data).unwrap();
        let lease = LEASE_SECS.to_string();
        let store = match spec.store_port {
            Some(port) => self.db.url().replace(":5432/", &format!(":{port}/")),
            None => self.db.url(),
        };
        let mut b = crate::common::server::serve(&data, &self.fixture.projects).args(&[
            "--store",
            &store,
            "--node-id",
            &spec.id,
            "--lease-secs",
            &lease,
        ]);
        let args: Vec<&str> = spec.args.iter().map(String::as_str).collect();
        b = b.args(&args);
        if let Some(toml) = &spec.config {
            b = b.config(toml);
        }
        if let Some(level) = &spec.log {
            b = b.log(level);
        }
        b
    }

    /// Starts every node at once and waits until each answers HTTP as
    /// itself. A node that lost its port to another test's process (the port
    /// is picked free, then bound by the child a moment later) is started
    /// again on another.
    pub async fn start(&self, nodes: Vec<NodeSpec>) -> Vec<Server> {
        let mut servers: Vec<Server> = nodes.iter().map(|n| self.builder(n).spawn()).collect();
        for (server, spec) in servers.iter_mut().zip(&nodes) {
            let mut tries = 0;
            while !self.is_node(server, &spec.id).await {
                tries += 1;
                assert!(
                    tries < 5,
                    "node {} never came up as itself:\n{}",
                    spec.id,
                    server.stderr()
                );
                *server = self.builder(spec).spawn();
            }
        }
        servers
    }

    /// Whether `server`'s port is answered by node `id` (its `thisNode`),
    /// polled while the process lives (a node registers a moment after it
    /// listens).
    async fn is_node(&self, server: &mut Server, id: &str) -> bool {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            let list = self.nodes(&server.base).await;
            let me = list["nodes"]
                .as_array()
                .is_some_and(|l| l.iter().any(|n| n["thisNode"] == true && n["nodeId"] == id));
            if me {
                return true;
            }
            if server.exit_within(Duration::ZERO).is_some() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// Sets the per-row delay of `dst.slow` (seconds).
    pub async fn pace(&self, delay: f64) {
        self.sql
            .execute("UPDATE dst.ctl SET delay = $1", &[&delay])
            .await
            .unwrap();
    }

    /// Closes the gate of `dst.slow` (once the batches inside it have
    /// committed), then waits until `n` batches wait at it: each is held
    /// inside its transaction, every batch before it committed.
    pub async fn close_gate(&self, n: i64) {
        self.gate
            .batch_execute("BEGIN; SELECT 1 FROM dst.gate FOR UPDATE")
            .await
            .unwrap();
        let sql = "SELECT count(*) FROM pg_stat_activity
                   WHERE application_name = $1 AND wait_event_type = 'Lock'";
        within(
            PATIENCE,
            &format!("{n} batch(es) wait at the gate"),
            || async {
                let waiting: i64 = self.sql.query_one(sql, &[&DST_APP]).await.unwrap().get(0);
                (waiting >= n).then_some(())
            },
        )
        .await;
    }

    /// Waits until no job writes to the destination: every destination
    /// session closed (a job closes its connection when it ends).
    pub async fn wait_no_writer(&self) {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1";
        within(PATIENCE, "no job writes to the destination", || async {
            let open: i64 = self.sql.query_one(sql, &[&DST_APP]).await.unwrap().get(0);
            (open == 0).then_some(())
        })
        .await;
    }

    /// Waits until a destination session has done what it was asked and
    /// waits, inside its transaction, for its client (a frozen node) to go on.
    pub async fn wait_for_frozen_client(&self) {
        let sql = "SELECT count(*) FROM pg_stat_activity
                   WHERE application_name = $1 AND state = 'idle in transaction'";
        within(PATIENCE, "the frozen node's batch waits for it", || async {
            let idle: i64 = self.sql.query_one(sql, &[&DST_APP]).await.unwrap().get(0);
            (idle > 0).then_some(())
        })
        .await;
    }

    /// Opens the gate: the batches waiting at it go on.
    pub async fn open_gate(&self) {
        self.gate.batch_execute("COMMIT").await.unwrap();
    }

    /// Rows a run wrote into `table` (`quick` or `slow`).
    pub async fn rows_of(&self, table: &str, run: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM dst.{table} WHERE run = $1");
        self.sql.query_one(&sql, &[&run]).await.unwrap().get(0)
    }

    /// How many webhooks came for a run, and the status of the last.
    pub fn hooks_for(&self, run: &str) -> (usize, Option<String>) {
        let got = self.got.lock().unwrap();
        let of: Vec<&Value> = got.iter().filter(|h| h["runID"] == run).collect();
        let last = of
            .last()
            .and_then(|h| h["status"].as_str())
            .map(str::to_owned);
        (of.len(), last)
    }

    /// Submits a run of `project/job` to `base` with the runID as argument
    /// and the test's webhook; panics unless it is accepted.
    pub async fn submit(&self, base: &str, run: &str, project: &str, job: &str) {
        let body = json!({"runID": run, "projectID": project, "jobID": job,
                          "argument": run, "webHookURL": self.hook});
        let r = self
            .http
            .post(format!("{base}/v1/ExecuteJobAsync"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(
            status == 200 && v["started"] == true,
            "{project}/{job} on {base}: {status} {v}"
        );
    }

    /// `GET /v1/Runs/{run}` on `base`.
    pub async fn detail(&self, base: &str, run: &str) -> Value {
        self.get(&format!("{base}/v1/Runs/{run}")).await
    }

    /// `GET /v1/Results/{run}` on `base`.
    pub async fn results(&self, base: &str, run: &str) -> Value {
        self.get(&format!("{base}/v1/Results/{run}")).await
    }

    /// `GET /v1/Nodes` on `base`.
    pub async fn nodes(&self, base: &str) -> Value {
        self.get(&format!("{base}/v1/Nodes")).await
    }

    /// A node's line in `GET /v1/Nodes` on `base`.
    pub async fn node_line(&self, base: &str, id: &str) -> Value {
        let all = self.nodes(base).await;
        all["nodes"]
            .as_array()
            .and_then(|l| l.iter().find(|n| n["nodeId"] == id).cloned())
            .unwrap_or(Value::Null)
    }

    /// A JSON answer (Null if the body is not JSON: polls go on).
    pub async fn get(&self, url: &str) -> Value {
        match self.http.get(url).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// Waits until run `run` has status `want` as `base` tells it; its detail.
    pub async fn wait_status(&self, base: &str, run: &str, want: &str) -> Value {
        let what = format!("run {run} {want} on {base}");
        within(PATIENCE, &what, || async {
            let d = self.detail(base, run).await;
            (d["status"] == want).then_some(d)
        })
        .await
    }

    /// Waits until `run` is Running and has written `rows` rows into `dst.slow`.
    pub async fn wait_mid_run(&self, base: &str, run: &str, rows: i64) {
        self.wait_status(base, run, "Running").await;
        within(PATIENCE, &format!("{run} wrote {rows} rows"), || async {
            (self.rows_of("slow", run).await >= rows).then_some(())
        })
        .await;
    }

    /// Waits until a run's webhook came, then says it came once, with `status`.
    pub async fn one_hook(&self, run: &str, status: &str) {
        within(PATIENCE, &format!("the webhook of {run}"), || async {
            (self.hooks_for(run).0 > 0).then_some(())
        })
        .await;
        let (n, last) = self.hooks_for(run);
        assert_eq!((n, last.as_deref()), (1, Some(status)), "webhooks of {run}");
    }
}

/// Polls `check` until it gives `Some`, panicking with `what` after `limit`.
pub async fn within<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Sends `sig` (SIGSTOP, SIGCONT, …) to a node.
pub fn signal(node: &Server, sig: libc::c_int) {
    // SAFETY: kill(2) with our own child's pid.
    let sent = unsafe { libc::kill(node.pid() as libc::pid_t, sig) };
    assert_eq!(sent, 0, "signal {sig}: {}", std::io::Error::last_os_error());
}

/// A new runID.
pub fn guid() -> String {
    uuid::Uuid::new_v4().to_string()
}
