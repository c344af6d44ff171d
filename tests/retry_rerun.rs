//! Retries of a run and reruns from the failure, through the real binary:
//! a run whose destination cannot be reached waits and runs again under its
//! runID once the database is back (one webhook, after the last attempt);
//! row errors are not retried; a run cut mid-way is rerun from its first row
//! not committed and every row lands exactly once; an unordered origin is
//! refused.

mod common;

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::databases::pg_url;
use common::{Fixture, eventually, until};
use serde_json::{Value, json};

/// A TCP gate in front of PostgreSQL on a fixed loopback port: while shut,
/// nothing listens there (connections are refused) and open ones are cut.
struct Gate {
    port: u16,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Gate {
    /// A gate on a free port, shut.
    fn shut_new() -> Gate {
        Gate {
            port: common::free_port(),
            open: Arc::default(),
            conns: Arc::default(),
        }
    }

    /// Listens on the port and forwards each connection to PostgreSQL,
    /// until [`Gate::shut`].
    fn open(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("gate port");
        listener.set_nonblocking(true).unwrap();
        self.open.store(true, Ordering::SeqCst);
        let (open, conns) = (self.open.clone(), self.conns.clone());
        let upstream = pg_upstream();
        std::thread::spawn(move || {
            while open.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                {
                    let mut c = conns.lock().unwrap();
                    c.push(client.try_clone().unwrap());
                    c.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
            // The listener is dropped here: the port refuses again.
        });
    }

    /// Cuts every open connection and stops listening.
    fn shut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The PostgreSQL URL through the gate.
    fn url(&self) -> String {
        let url = pg_url();
        let (scheme_user, rest) = url.split_once('@').unwrap();
        let (_, db) = rest.split_once('/').unwrap();
        format!("{scheme_user}@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.shut();
    }
}

/// A PostgreSQL schema of the test's own (async client), dropped at the end.
struct Schema {
    name: String,
    client: tokio_postgres::Client,
}

impl Schema {
    async fn new() -> Schema {
        let (client, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL must be running on 127.0.0.1:5432");
        tokio::spawn(conn);
        let name = format!("tp_retry_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .unwrap();
        Schema { name, client }
    }

    /// Runs `sql` with `S.` naming the schema.
    async fn exec(&self, sql: &str) {
        let sql = sql.replace("S.", &format!("{}.", self.name));
        self.client.batch_execute(&sql).await.unwrap();
    }

    /// A count.
    async fn count(&self, sql: &str) -> i64 {
        let sql = sql.replace("S.", &format!("{}.", self.name));
        self.client.query_one(&sql, &[]).await.unwrap().get(0)
    }

    fn table(&self, t: &str) -> String {
        format!("{}.{t}", self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA {} CASCADE", self.name);
        // A thread of its own: the blocking client cannot run on the runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(mut c) = postgres::Client::connect(&pg_url(), postgres::NoTls) {
                let _ = c.batch_execute(&sql);
            }
        })
        .join();
    }
}

/// The `host:port` of the test PostgreSQL.
fn pg_upstream() -> String {
    let url = pg_url();
    let rest = url.split_once('@').unwrap().1;
    rest.split('/').next().unwrap().to_owned()
}

/// Project `p`: `in.csv` (ids 1..=rows) into `table` through `url`; `job`
/// is the job file's extra keys.
fn project(f: &Fixture, url: &str, table: &str, rows: u32, job: &str) {
    f.project(
        "p",
        &format!(
            "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.db]\nkind = \"postgres\"\nurl = \"{url}\"\nconnect_timeout_secs = 5\n"
        ),
        &[(
            "load",
            &format!(
                "{job}\n[origin]\nconnection = \"src\"\n[destination]\nconnection = \"db\"\n[[stages]]\ntable = \"{table}\"\naction = \"insert\"\nfields = [{{ column = \"id\", origin = \"id\" }}, {{ column = \"name\", origin = \"name\" }}]\n"
            ),
        )],
    );
    f.write("projects/p/in.csv", common::people_csv(rows));
}

async fn post(client: &reqwest::Client, url: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = client.post(url);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let answer = r.send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

async fn detail(client: &reqwest::Client, base: &str, id: &str) -> Value {
    common::get_json(client, &format!("{base}/v1/Runs/{id}")).await
}

async fn wait_ended(client: &reqwest::Client, base: &str, id: &str) -> Value {
    eventually("the run ends", || async {
        let d = detail(client, base, id).await;
        matches!(
            d["status"].as_str(),
            Some("Complete" | "Failed" | "Cancelled")
        )
        .then_some(d)
    })
    .await
}

/// A database of the test's own for a shared store, dropped at the end.
struct StoreDb(String);

impl StoreDb {
    fn new() -> StoreDb {
        let name = format!(
            "tp_retry_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        admin(format!("CREATE DATABASE {name}"));
        StoreDb(name)
    }

    fn url(&self) -> String {
        let url = pg_url();
        let (base, _) = url.rsplit_once('/').unwrap();
        format!("{base}/{}", self.0)
    }
}

impl Drop for StoreDb {
    fn drop(&mut self) {
        admin(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0));
    }
}

/// Runs `sql` on the test PostgreSQL from a thread of its own (the blocking
/// client cannot run on the test's runtime).
fn admin(sql: String) {
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&pg_url(), postgres::NoTls)
            .expect("PostgreSQL must be running on 127.0.0.1:5432");
        c.batch_execute(&sql).unwrap();
    })
    .join()
    .unwrap();
}

/// A run whose destination refuses at first fails, waits Queued, and runs
/// again under its runID once the database is back (on whichever of
/// `nodes` claims it); one webhook, after the last attempt.
async fn retried_once_the_database_is_back(f: &Fixture, store: Option<&StoreDb>, nodes: usize) {
    let pg = Schema::new().await;
    pg.exec("CREATE TABLE S.t (id integer, name text)").await;
    let gate = Gate::shut_new();
    project(
        f,
        &gate.url(),
        &pg.table("t"),
        50,
        "retry = { attempts = 2, wait_secs = 3, backoff = 1.0 }",
    );
    let (hook, got) = common::webhook_receiver(|_| axum::http::StatusCode::OK).await;
    let mut servers = Vec::new();
    for n in 0..nodes {
        let data = f.root.join(format!("data-{n}"));
        std::fs::create_dir_all(&data).unwrap();
        let mut b = common::server::serve(&data, &f.projects);
        if let Some(db) = store {
            b = b.args(&["--store", &db.url(), "--node-id", &format!("n{n}")]);
        }
        servers.push(b.start_async().await);
    }
    let (client, base) = (reqwest::Client::new(), servers[0].base.clone());
    let id = uuid::Uuid::new_v4().to_string();
    let (status, _) = post(
        &client,
        &format!("{base}/v1/ExecuteJobAsync"),
        Some(json!({"runID": id, "projectID": "p", "jobID": "load", "webHookURL": hook})),
    )
    .await;
    assert_eq!(status, 200);

    // The first attempt fails (nothing listens); the run waits Queued.
    let waiting = eventually("the run waits for its second attempt", || async {
        let d = detail(&client, &base, &id).await;
        (d["status"] == "Queued" && d["attempts"].as_array().is_some_and(|a| a.len() == 1))
            .then_some(d)
    })
    .await;
    let first = &waiting["attempts"][0];
    assert_eq!(first["attempt"], 1, "{waiting}");
    assert_eq!(first["status"], "Failed", "{waiting}");
    assert!(first["nextNotBefore"].is_string(), "{waiting}");
    assert!(
        got.lock().unwrap().is_empty(),
        "no webhook between attempts"
    );
    gate.open();

    let done = wait_ended(&client, &base, &id).await;
    assert_eq!(done["status"], "Complete", "{done}");
    let attempts = done["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{done}");
    assert_eq!(attempts[1]["status"], "Complete");
    assert_eq!(done["inserts"], 50, "Results show the last attempt: {done}");
    assert_eq!(pg.count("SELECT count(*) FROM S.t").await, 50);

    until("the completion webhook", || async {
        !got.lock().unwrap().is_empty()
    })
    .await;
    let hooks = got.lock().unwrap().clone();
    assert_eq!(
        hooks.len(),
        1,
        "one webhook, after the last attempt: {hooks:?}"
    );
    assert_eq!(hooks[0]["status"], "Complete");
    assert_eq!(hooks[0]["runID"], id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_retried_under_its_run_id_once_the_database_is_back() {
    retried_once_the_database_is_back(&Fixture::new(), None, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_any_node_runs_the_next_attempt() {
    let store = StoreDb::new();
    retried_once_the_database_is_back(&Fixture::new(), Some(&store), 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_errors_and_halts_are_not_retried() {
    let f = Fixture::new();
    let pg = Schema::new().await;
    pg.exec("CREATE TABLE S.t (id integer CHECK (id < 5), name text)")
        .await;
    project(
        &f,
        &pg_url(),
        &pg.table("t"),
        10,
        "halt_on_error = true\nretry = { attempts = 3, wait_secs = 0 }",
    );
    let (hook, got) = common::webhook_receiver(|_| axum::http::StatusCode::OK).await;
    let server = f.serve().start_async().await;
    let (client, base) = (reqwest::Client::new(), server.base.clone());
    let id = uuid::Uuid::new_v4().to_string();
    post(
        &client,
        &format!("{base}/v1/ExecuteJobAsync"),
        Some(json!({"runID": id, "projectID": "p", "jobID": "load", "webHookURL": hook})),
    )
    .await;
    let done = wait_ended(&client, &base, &id).await;
    assert_eq!(done["status"], "Failed", "{done}");
    assert!(done["error"].as_str().unwrap().contains("halted"), "{done}");
    assert!(done.get("attempts").is_none(), "not retried: {done}");
    until("the webhook", || async { !got.lock().unwrap().is_empty() }).await;
    assert_eq!(got.lock().unwrap().len(), 1);
    assert_eq!(pg.count("SELECT count(*) FROM S.t").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_from_the_failure_lands_each_row_exactly_once() {
    let f = Fixture::new();
    let pg = Schema::new().await;
    // No unique key: a row written twice would be there twice. A row takes
    // a moment, so the run is still going when the database goes away.
    pg.exec(
        "CREATE TABLE S.t (id integer, name text);
         CREATE FUNCTION S.slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END $$;
         CREATE TRIGGER slow BEFORE INSERT ON S.t FOR EACH ROW EXECUTE FUNCTION S.slow();",
    )
    .await;
    let gate = Gate::shut_new();
    gate.open();
    let rows = 600;
    project(
        &f,
        &gate.url(),
        &pg.table("t"),
        rows,
        "batch_size = 10\nretry_attempts = 0",
    );
    let server = f.serve().start_async().await;
    let (client, base) = (reqwest::Client::new(), server.base.clone());
    let table = pg.table("t");
    let gate = Arc::new(gate);
    let cut = gate.clone();
    let watcher = common::when_count_passes(
        || postgres::Client::connect(&pg_url(), postgres::NoTls).unwrap(),
        move |c| {
            c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .unwrap()
                .get::<_, i64>(0)
        },
        100,
        move |_| cut.shut(),
    );
    let id = uuid::Uuid::new_v4().to_string();
    post(
        &client,
        &format!("{base}/v1/ExecuteJobAsync"),
        Some(json!({"runID": id, "projectID": "p", "jobID": "load"})),
    )
    .await;
    let failed = wait_ended(&client, &base, &id).await;
    assert!(
        watcher.join().unwrap().is_some(),
        "the gate was shut mid-run"
    );
    assert_eq!(failed["status"], "Failed", "{failed}");
    let resume = failed["results"][0]["resumeAtRow"]
        .as_u64()
        .expect("resumeAtRow");
    let landed = pg.count("SELECT count(*) FROM S.t").await as u64;
    assert!(resume > 100 && resume <= u64::from(rows), "{failed}");
    assert_eq!(
        landed,
        resume - 1,
        "rows before the mark landed, none after"
    );

    gate.open();
    let new_id = uuid::Uuid::new_v4().to_string();
    let (status, answer) = post(
        &client,
        &format!("{base}/v1/Runs/{id}/rerun?from=failure&runID={new_id}"),
        None,
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["runID"], new_id);
    assert_eq!(answer["resumeAtRow"], resume);
    assert_eq!(answer["continues"], id);
    let done = wait_ended(&client, &base, &new_id).await;
    assert_eq!(done["status"], "Complete", "{done}");
    assert_eq!(done["continues"], id, "{done}");
    assert_eq!(done["inserts"].as_u64(), Some(u64::from(rows) - resume + 1));
    let rows = i64::from(rows);
    assert_eq!(pg.count("SELECT count(*) FROM S.t").await, rows);
    assert_eq!(
        pg.count("SELECT count(DISTINCT id) FROM S.t").await,
        rows,
        "each origin row exactly once"
    );
    assert_eq!(pg.count("SELECT max(id)::bigint FROM S.t").await, rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_from_the_failure_is_refused_with_the_reason() {
    let f = Fixture::new();
    let nobody = Gate::shut_new(); // nothing ever listens: the run fails
    let db = f.data.join("src.sqlite");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE src (id INTEGER, name TEXT); INSERT INTO src VALUES (1, 'a');")
        .unwrap();
    f.project(
        "q",
        &format!(
            "[connections.src]\nkind = \"sqlite\"\npath = \"{}\"\n[connections.db]\nkind = \"postgres\"\nurl = \"{}\"\nconnect_timeout_secs = 5\n",
            db.display(),
            nobody.url()
        ),
        &[(
            "load",
            "[origin]\nconnection = \"src\"\nquery = \"SELECT id, name FROM src\"\n[destination]\nconnection = \"db\"\n[[stages]]\ntable = \"t\"\naction = \"insert\"\nfields = [{ column = \"id\", origin = \"id\" }]\n",
        )],
    );
    let server = f.serve().start_async().await;
    let (client, base) = (reqwest::Client::new(), server.base.clone());
    let id = uuid::Uuid::new_v4().to_string();
    post(
        &client,
        &format!("{base}/v1/ExecuteJobAsync"),
        Some(json!({"runID": id, "projectID": "q", "jobID": "load"})),
    )
    .await;
    let failed = wait_ended(&client, &base, &id).await;
    assert_eq!(failed["status"], "Failed", "{failed}");

    let (status, answer) = post(
        &client,
        &format!("{base}/v1/Runs/{id}/rerun?from=failure"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("ORDER BY"),
        "{answer}"
    );
    let (status, answer) = post(
        &client,
        &format!("{base}/v1/Runs/{id}/rerun?from=somewhere"),
        None,
    )
    .await;
    assert_eq!(status, 400, "{answer}");

    // The whole request again is allowed: a new run of the same job.
    let (status, again) = post(&client, &format!("{base}/v1/Runs/{id}/rerun"), None).await;
    assert_eq!(status, 202, "{again}");
    assert_ne!(again["runID"], id);
    assert!(again["continues"].is_null(), "{again}");
    let other = wait_ended(&client, &base, again["runID"].as_str().unwrap()).await;
    assert_eq!(other["status"], "Failed");
    let (status, answer) = post(
        &client,
        &format!(
            "{base}/v1/Runs/{}/rerun?from=failure&runID={}",
            again["runID"].as_str().unwrap(),
            id
        ),
        None,
    )
    .await;
    assert_eq!(status, 409, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_between_two_attempts_ends_the_run_cancelled() {
    let f = Fixture::new();
    let nobody = Gate::shut_new(); // nothing ever listens
    project(
        &f,
        &nobody.url(),
        "t",
        5,
        "retry = { attempts = 5, wait_secs = 600 }",
    );
    let (hook, got) = common::webhook_receiver(|_| axum::http::StatusCode::OK).await;
    let server = f.serve().start_async().await;
    let (client, base) = (reqwest::Client::new(), server.base.clone());
    let id = uuid::Uuid::new_v4().to_string();
    post(
        &client,
        &format!("{base}/v1/ExecuteJobAsync"),
        Some(json!({"runID": id, "projectID": "p", "jobID": "load", "webHookURL": hook})),
    )
    .await;
    until("the run waits for its second attempt", || async {
        let d = detail(&client, &base, &id).await;
        d["status"] == "Queued" && d["attempts"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    let (status, answer) = post(&client, &format!("{base}/v1/Runs/{id}/cancel"), None).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (202, Some("Cancelled")),
        "{answer}"
    );
    let done = detail(&client, &base, &id).await;
    assert_eq!(done["status"], "Cancelled", "{done}");
    until("the webhook", || async { !got.lock().unwrap().is_empty() }).await;
    let hooks = got.lock().unwrap().clone();
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    assert_eq!(hooks[0]["status"], "Cancelled");
}
