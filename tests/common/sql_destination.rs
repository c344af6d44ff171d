//! One table of stage-action cases and one set of fault scenarios, run
//! against every SQL destination: SQLite, PostgreSQL and MariaDB. Each
//! database is a small type that makes a place of its own (a file, a schema,
//! a database), reads rows back and, for the servers, finds and cuts
//! tidepool's connections.

use mysql::prelude::Queryable;
use tidepool::engine::{LogLevel, RunStatus};

use super::{Fixture, Proxy, people_csv, request, when_count_passes};

/// A SQL database a job can write to, in a place of its own for one test.
pub trait SqlDestination {
    /// Names the database in failure messages.
    fn label(&self) -> &'static str;
    /// The lines of a `[connections.X]` table that reach it.
    fn connection(&self) -> String;
    /// `name` as a job's stage names the table.
    fn table(&self, name: &str) -> String;
    /// The column type for short text.
    fn text_type(&self) -> &'static str {
        "text"
    }
    /// Runs `;`-separated statements.
    fn exec(&mut self, sql: &str);
    /// The rows of a query, each as text columns joined by `|` (NULL as `∅`).
    fn rows(&mut self, sql: &str) -> Vec<String>;
    /// Whether the run log says so when no index starts with a match field.
    fn notes_a_missing_index(&self) -> bool {
        false
    }
}

/// A database server tidepool reaches over TCP, so its connections can be
/// refused, killed and taken down.
pub trait ServerDestination: SqlDestination {
    /// The server's `host:port` as the connection names it.
    fn upstream(&self) -> &'static str;
    /// The error of a job whose connection goes to a closed port (`127.0.0.1:1`).
    fn refused_message(&self) -> &'static str;
    /// [`SqlDestination::connection`], but through `127.0.0.1:port`.
    fn through(&self, port: u16) -> String {
        self.connection()
            .replace(self.upstream(), &format!("127.0.0.1:{port}"))
    }
    /// A connection whose sessions [`Watcher::cut`] finds (and no one else's).
    fn killable_connection(&self) -> String {
        self.connection()
    }
    /// A connection of the test's own, to count rows and cut tidepool's.
    fn watcher(&self) -> Box<dyn Watcher>;
    /// The batch size for the killed-mid-run scenario.
    fn kill_batch(&self) -> u32;
    /// The batch size and rows landed before the server is taken down for good.
    fn gone_plan(&self) -> (i64, i64);
    /// What the error of a job whose server went for good says (any of them).
    fn gone_messages(&self) -> &'static [&'static str];
    /// Makes `SELECT id, name` rows for the origin-cut scenario: the query, how
    /// many rows it gives and the batch size that keeps it streaming.
    fn origin_rows(&mut self) -> (String, i64, u32);
    /// What the error says when the origin was cut, besides its name.
    fn origin_cut_message(&self) -> Option<&'static str>;
}

/// The test's own connection to a database server.
pub trait Watcher: Send {
    /// Rows in table `name` of the test's place.
    fn count(&mut self, name: &str) -> i64;
    /// How many of tidepool's sessions wait on a row lock.
    fn blocked(&mut self) -> i64;
    /// Cuts tidepool's sessions (found as [`ServerDestination::killable_connection`]
    /// names them); returns how many.
    fn cut(&mut self) -> usize;
}

/// `(action, stage extra, key of id, [inserts, updates, deletes, skips,
/// ignores], the table after)` for a table of Ann, Bob and Cy (1..3) and an
/// input of Bobby (changed), Cy (unchanged), Dan and Eve (new).
type StageCase = (
    &'static str,
    &'static str,
    &'static str,
    [u64; 5],
    &'static [&'static str],
);

const ALL_FIVE: &[&str] = &[
    "1|Ann|Oslo",
    "2|Bobby|Rome",
    "3|Cy|Lima",
    "4|Dan|Kyiv",
    "5|Eve|Pisa",
];

const STAGE_CASES: [StageCase; 6] = [
    (
        "update",
        "",
        "PRIMARY KEY",
        [0, 2, 0, 0, 2],
        &["1|Ann|Oslo", "2|Bobby|Rome", "3|Cy|Lima"],
    ),
    (
        "delete",
        "",
        "PRIMARY KEY",
        [0, 0, 2, 0, 2],
        &["1|Ann|Oslo"],
    ),
    (
        "update/insert",
        "",
        "PRIMARY KEY",
        [2, 2, 0, 0, 0],
        ALL_FIVE,
    ),
    (
        "skip/insert",
        "",
        "PRIMARY KEY",
        [2, 0, 0, 2, 0],
        &[
            "1|Ann|Oslo",
            "2|Bob|Rome",
            "3|Cy|Lima",
            "4|Dan|Kyiv",
            "5|Eve|Pisa",
        ],
    ),
    (
        "update/insert",
        "update_on_difference = true",
        "PRIMARY KEY",
        [2, 1, 0, 1, 0],
        ALL_FIVE,
    ),
    // No index on the match field: the general path, same counts.
    (
        "update/insert",
        "update_on_difference = true",
        "",
        [2, 1, 0, 1, 0],
        ALL_FIVE,
    ),
];

/// A project with a CSV origin `src` (projects/p/in.csv) and `dst` reached by
/// `connection`.
fn project(connection: &str) -> String {
    format!(
        "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.dst]\n{connection}\n"
    )
}

/// A job from `src` into `dst`'s `table` (id matched, name, city) with
/// `action`; `before` goes above `[origin]` (batch size, retries), `extra`
/// into the stage.
pub fn people_job(table: &str, action: &str, before: &str, extra: &str) -> String {
    people_job_into("dst", table, action, before, extra)
}

/// [`people_job`] into the connection named `destination`.
pub fn people_job_into(
    destination: &str,
    table: &str,
    action: &str,
    before: &str,
    extra: &str,
) -> String {
    format!(
        r#"{before}
[origin]
connection = "src"
[destination]
connection = "{destination}"
[[stages]]
table = "{table}"
action = "{action}"
{extra}
fields = [
  {{ column = "id", origin = "id", match = true }},
  {{ column = "name", origin = "name" }},
  {{ column = "city", origin = "city" }},
]
"#
    )
}

/// Table `people` (id `key`, name, city) with Ann, Bob and Cy.
pub fn people(db: &mut dyn SqlDestination, key: &str) {
    let text = db.text_type();
    db.exec(&format!(
        "CREATE TABLE people(id integer {key}, name {text}, city {text});
         INSERT INTO people VALUES (1,'Ann','Oslo'), (2,'Bob','Rome'), (3,'Cy','Lima')"
    ));
}

/// Runs every stage-action case on a fresh place made by `new`; a failure
/// names the database and the case.
pub fn every_stage_action_counts_exactly<D: SqlDestination>(new: impl Fn() -> D) {
    for (action, extra, key, expected, table) in STAGE_CASES {
        let mut db = new();
        let case = format!("{}: {action} {extra} (key: {key:?})", db.label());
        people(&mut db, key);
        let f = Fixture::new();
        let job = people_job(&db.table("people"), action, "", extra);
        f.project("p", &project(&db.connection()), &[("j", &job)]);
        f.write(
            "projects/p/in.csv",
            "id,name,city\n2,Bobby,Rome\n3,Cy,Lima\n4,Dan,Kyiv\n5,Eve,Pisa\n",
        );
        let mut req = request("p", "j");
        req.logging_level = LogLevel::Low;
        let r = f.run(&req);
        assert_eq!(r.status, RunStatus::Complete, "{case}: {:?}", r.error);
        let c = r.counters;
        assert_eq!(
            [c.inserts, c.updates, c.deletes, c.skips, c.ignores],
            expected,
            "{case}: [inserts, updates, deletes, skips, ignores]"
        );
        assert_eq!((c.total_rows, c.errors), (4, 0), "{case}: rows, errors");
        if db.notes_a_missing_index() {
            let noted = r.jobs[0].log.iter().any(|e| {
                e.message
                    .contains("no index on `people` starts with a match field (id)")
            });
            assert_eq!(noted, key.is_empty(), "{case}: the missing-index note");
        }
        assert_eq!(
            db.rows("SELECT * FROM people ORDER BY id"),
            table,
            "{case}: the table after"
        );
    }
}

/// A connection to a closed port fails the job, naming the database.
pub fn a_refused_connection_fails_the_job_clearly(db: &impl ServerDestination) {
    let f = Fixture::new();
    let connection = db.connection().replace(db.upstream(), "127.0.0.1:1");
    let job = people_job(&db.table("people"), "insert", "", "");
    f.project("p", &project(&connection), &[("j", &job)]);
    f.write("projects/p/in.csv", "id,name,city\n1,a,b\n");
    let r = f.run(&request("p", "j"));
    assert_eq!(r.status, RunStatus::Failed, "{}", db.label());
    let e = r.error.unwrap();
    assert!(e.contains(db.refused_message()), "{}: {e}", db.label());
}

/// Cutting tidepool's connection in the middle of a batch: the batch is
/// retried on a new connection and every row lands exactly once.
///
/// The test's own transaction holds row 5000 locked, so tidepool's batch
/// waits on it and is cut right there. A cut between two batches would be
/// healed by the next batch's connection check without ever reaching the
/// retry this scenario is about (and on a busy machine it often landed there).
pub fn a_connection_killed_mid_run_is_retried_and_nothing_is_lost(db: &mut impl ServerDestination) {
    people(db, "PRIMARY KEY");
    db.exec("INSERT INTO people VALUES (5000, 'held', 'x')");
    db.exec("BEGIN");
    db.exec("SELECT id FROM people WHERE id = 5000 FOR UPDATE");
    let f = Fixture::new();
    let before = format!("batch_size = {}\nretry_wait_ms = 100", db.kill_batch());
    let job = people_job(&db.table("people"), "update/insert", &before, "");
    f.project("p", &project(&db.killable_connection()), &[("j", &job)]);
    f.write("projects/p/in.csv", people_csv(200_000));
    let watcher = db.watcher();
    let killer = when_count_passes(move || watcher, |w| w.blocked(), 0, |w| w.cut());
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Medium;
    let (r, killed) = std::thread::scope(|s| {
        let run = s.spawn(|| f.run(&req));
        let killed = killer.join().unwrap().unwrap_or(0);
        // Let the retried batch through (or, if nothing was cut, the run).
        db.exec("COMMIT");
        (run.join().unwrap(), killed)
    });
    let label = db.label();
    assert!(killed > 0, "{label}: the test did not cut the connection");
    assert_eq!(r.status, RunStatus::Complete, "{label}: {:?}", r.error);
    let c = r.counters;
    assert_eq!(
        (c.total_rows, c.inserts + c.updates, c.errors),
        (200_000, 200_000, 0),
        "{label}"
    );
    assert_eq!(
        db.rows("SELECT count(*) FROM people"),
        ["200000"],
        "{label}"
    );
    let log: Vec<&str> = r.jobs[0].log.iter().map(|e| e.message.as_str()).collect();
    assert!(
        log.iter().any(|m| m.contains("connection was lost")),
        "{label}: {log:#?}"
    );
}

/// The server goes for good (through a proxy that is taken down) once rows
/// are landing: the job fails after its retries and counts what landed.
pub fn a_database_gone_for_good_fails_the_job_after_its_retries(db: &mut impl ServerDestination) {
    let (batch, after) = db.gone_plan();
    people(db, "PRIMARY KEY");
    let proxy = Proxy::start(db.upstream());
    let f = Fixture::new();
    let before = format!("batch_size = {batch}\nretry_attempts = 2\nretry_wait_ms = 50");
    let job = people_job(&db.table("people"), "update/insert", &before, "");
    f.project("p", &project(&db.through(proxy.port)), &[("j", &job)]);
    f.write("projects/p/in.csv", people_csv(200_000));
    let watcher = db.watcher();
    let down = when_count_passes(
        move || watcher,
        |w| w.count("people"),
        after,
        move |_| proxy.take_down(),
    );
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Medium;
    let r = f.run(&req);
    let label = db.label();
    let taken_down = down.join().unwrap().is_some();
    assert!(
        taken_down,
        "{label}: the test did not take the database down"
    );
    let (c, e) = (r.counters, r.error.clone().unwrap_or_default());
    assert_eq!(r.status, RunStatus::Failed, "{label}: {c:?} {e}");
    assert!(
        db.gone_messages().iter().any(|m| e.contains(m)),
        "{label}: {e}"
    );
    assert!(e.contains("gave up after 2 retries"), "{label}: {e}");
    let landed: i64 = db.rows("SELECT count(*) FROM people")[0].parse().unwrap();
    // A batch whose COMMIT was on its way when the link went down may have
    // landed without the answer reaching us: at most that one batch.
    let uncounted = landed - (c.inserts + c.updates) as i64;
    assert!(
        uncounted == 0 || uncounted == batch,
        "{label}: {landed} landed, {c:?}"
    );
    assert!(
        c.total_rows < 200_000 && c.errors == 1,
        "{label}: {c:?} {:?}",
        r.jobs[0].log
    );
}

/// The database as an origin, cut once the first rows have landed in SQLite:
/// the job fails, naming the origin, and counts exactly what landed.
pub fn an_origin_cut_mid_stream_fails_the_job_and_counts_only_what_landed(
    db: &mut impl ServerDestination,
) {
    let (query, total, batch) = db.origin_rows();
    let f = Fixture::new();
    let proj = format!(
        "[connections.sql]\n{}\n[connections.db]\nkind = \"sqlite\"\npath = \"${{DATA_DIR}}/out.sqlite\"\n",
        db.killable_connection()
    );
    let job = format!(
        "batch_size = {batch}\n[origin]\nconnection = \"sql\"\nquery = \"{query}\"\n[destination]\nconnection = \"db\"\n[[stages]]\ntable = \"people\"\naction = \"insert\"\nfields = [{{ column = \"id\", origin = \"id\" }}, {{ column = \"name\", origin = \"name\" }}]\n"
    );
    f.project("p", &proj, &[("j", &job)]);
    let out = f.data.join("out.sqlite");
    rusqlite::Connection::open(&out)
        .unwrap()
        .execute_batch("CREATE TABLE people(id integer PRIMARY KEY, name text)")
        .unwrap();
    let landed = move |lite: &rusqlite::Connection| -> i64 {
        // Busy while the writer commits: count as nothing yet.
        lite.query_row("SELECT count(*) FROM people", [], |r| r.get(0))
            .unwrap_or(0)
    };
    let watcher = db.watcher();
    let lite_path = out.clone();
    let killer = when_count_passes(
        move || {
            let lite = rusqlite::Connection::open(&lite_path).unwrap();
            lite.busy_timeout(std::time::Duration::from_millis(50))
                .unwrap();
            (lite, watcher)
        },
        move |(lite, _)| landed(lite),
        0,
        |(_, w)| w.cut(),
    );
    let r = f.run(&request("p", "j"));
    let label = db.label();
    let cut = killer.join().unwrap();
    assert_eq!(cut, Some(1), "{label}: the test did not cut the origin");
    assert_eq!(r.status, RunStatus::Failed, "{label}");
    let e = r.error.clone().unwrap_or_default();
    assert!(e.contains("origin \"sql\""), "{label}: {e}");
    if let Some(says) = db.origin_cut_message() {
        assert!(e.contains(says), "{label}: {e}");
    }
    let landed = landed(&rusqlite::Connection::open(&out).unwrap());
    assert!(landed > 0 && landed < total, "{label}: {landed}");
    assert_eq!(
        r.counters.inserts as i64, landed,
        "{label}: counted = landed"
    );
    assert!(
        e.contains(&format!("the {landed} rows read before it were processed")),
        "{label}: {e}"
    );
    assert_eq!(r.counters.errors, 1, "{label}: the job error");
}
