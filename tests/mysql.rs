//! The MySQL/MariaDB connector against the real local server, each test in its
//! own database so tests run in parallel.

mod common;

use common::{Fixture, request};
use mysql::prelude::Queryable;
use tidepool::engine::{LogLevel, RunStatus};

fn base_url() -> String {
    std::env::var("TIDEPOOL_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

fn admin() -> mysql::Conn {
    mysql::Conn::new(mysql::Opts::from_url(&base_url()).unwrap()).unwrap()
}

/// Rows in `db`.people, for [`common::when_count_passes`].
fn people_count(db: String) -> impl Fn(&mut mysql::Conn) -> i64 + Send + 'static {
    move |c| {
        c.query_first::<Option<i64>, _>(format!("SELECT count(*) FROM {db}.people"))
            .unwrap()
            .flatten()
            .unwrap_or(0)
    }
}

/// A database of its own, dropped at the end.
struct Db {
    name: String,
    admin: mysql::Conn,
}

impl Db {
    fn new() -> Self {
        let mut admin = mysql::Conn::new(mysql::Opts::from_url(&base_url()).unwrap())
            .expect("MariaDB must be running on 127.0.0.1:3306 (see .ci/run)");
        let name = format!("tp_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        admin.query_drop(format!("CREATE DATABASE {name}")).unwrap();
        admin.query_drop(format!("USE {name}")).unwrap();
        Db { name, admin }
    }

    fn url(&self) -> String {
        format!("{}/{}", base_url(), self.name)
    }

    fn exec(&mut self, sql: &str) {
        for stmt in sql.split(';').filter(|s| !s.trim().is_empty()) {
            self.admin.query_drop(stmt).unwrap();
        }
    }

    fn rows(&mut self, sql: &str) -> Vec<String> {
        let rows: Vec<mysql::Row> = self.admin.query(sql).unwrap();
        rows.into_iter()
            .map(|r| {
                r.unwrap()
                    .into_iter()
                    .map(|v| match v {
                        mysql::Value::NULL => "∅".to_owned(),
                        mysql::Value::Bytes(b) => String::from_utf8_lossy(&b).into_owned(),
                        other => other.as_sql(true).trim_matches('\'').to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect()
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = self
            .admin
            .query_drop(format!("DROP DATABASE {}", self.name));
    }
}

fn project(db: &Db) -> String {
    format!(
        "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.my]\nkind = \"mariadb\"\nurl = \"{}\"\n[connections.out]\nkind = \"csv\"\npath = \"${{DATA_DIR}}/out.csv\"\n",
        db.url()
    )
}

fn people_job(action: &str, extra: &str) -> String {
    format!(
        r#"
[origin]
connection = "src"
[destination]
connection = "my"
[[stages]]
table = "people"
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

fn people(db: &mut Db, key: &str) {
    db.exec(&format!(
        "CREATE TABLE people(id integer {key}, name varchar(50), city varchar(50));
         INSERT INTO people VALUES (1,'Ann','Oslo'), (2,'Bob','Rome'), (3,'Cy','Lima')"
    ));
}

#[test]
fn every_stage_action_counts_exactly() {
    // action, stage extra, key, [inserts, updates, deletes, skips, ignores], table after
    type Case<'a> = (&'a str, &'a str, &'a str, [u64; 5], &'a [&'a str]);
    let cases: [Case; 6] = [
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
            &[
                "1|Ann|Oslo",
                "2|Bobby|Rome",
                "3|Cy|Lima",
                "4|Dan|Kyiv",
                "5|Eve|Pisa",
            ],
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
            &[
                "1|Ann|Oslo",
                "2|Bobby|Rome",
                "3|Cy|Lima",
                "4|Dan|Kyiv",
                "5|Eve|Pisa",
            ],
        ),
        (
            "update/insert",
            "update_on_difference = true",
            "",
            [2, 1, 0, 1, 0],
            &[
                "1|Ann|Oslo",
                "2|Bobby|Rome",
                "3|Cy|Lima",
                "4|Dan|Kyiv",
                "5|Eve|Pisa",
            ],
        ),
    ];
    for (action, extra, key, expected, table) in cases {
        let mut db = Db::new();
        people(&mut db, key);
        let f = Fixture::new();
        f.project("p", &project(&db), &[("j", &people_job(action, extra))]);
        f.write(
            "projects/p/in.csv",
            "id,name,city\n2,Bobby,Rome\n3,Cy,Lima\n4,Dan,Kyiv\n5,Eve,Pisa\n",
        );
        let mut req = request("p", "j");
        req.logging_level = LogLevel::Low;
        let r = f.run(&req);
        assert_eq!(r.status, RunStatus::Complete, "{action}: {:?}", r.error);
        let c = r.counters;
        assert_eq!(
            [c.inserts, c.updates, c.deletes, c.skips, c.ignores],
            expected,
            "{action} {extra} {key}"
        );
        // A table with no index on the match field says so in the log.
        let noted = r.jobs[0].log.iter().any(|e| {
            e.message
                .contains("no index on `people` starts with a match field (id)")
        });
        assert_eq!(noted, key.is_empty(), "{action} {extra} {key}");
        assert_eq!((c.total_rows, c.errors), (4, 0));
        assert_eq!(
            db.rows("SELECT * FROM people ORDER BY id"),
            table,
            "{action} {extra} {key}"
        );
    }
}

#[test]
fn types_round_trip_and_a_bad_value_costs_only_its_row() {
    let mut db = Db::new();
    db.exec("CREATE TABLE m(id integer PRIMARY KEY, amount decimal(12,2), seen datetime(6), ok boolean, day date, note text)");
    let f = Fixture::new();
    let fields = "fields = [{ column = \"id\", origin = \"id\" }, { column = \"amount\", origin = \"amount\" }, { column = \"seen\", origin = \"seen\" }, { column = \"ok\", origin = \"ok\" }, { column = \"day\", origin = \"day\" }, { column = \"note\", origin = \"note\" }]";
    let load = format!(
        "[origin]\nconnection = \"src\"\n[destination]\nconnection = \"my\"\n[[stages]]\ntable = \"m\"\naction = \"insert\"\n{fields}\n"
    );
    let back = format!(
        "[origin]\nconnection = \"my\"\nquery = \"SELECT id, amount, seen, ok, day, note FROM m WHERE id >= '@@VAR:JobArgument@@' ORDER BY id\"\n[destination]\nconnection = \"out\"\n[[stages]]\naction = \"insert\"\n{fields}\n"
    );
    f.project("p", &project(&db), &[("load", &load), ("back", &back)]);
    f.write(
        "projects/p/in.csv",
        "id,amount,seen,ok,day,note\n1,12.50,2024-04-20 11:06:49.638407,1,2024-02-29,\"tab\there\"\n2,abc,2024-04-20 11:06:49,0,2024-03-01,x\n3,99999999.99,,,,\n",
    );
    let mut req = request("p", "load");
    req.logging_level = LogLevel::Low;
    let r = f.run(&req);
    let c = r.counters;
    assert_eq!(
        (c.total_rows, c.inserts, c.errors),
        (3, 2, 1),
        "{:?}",
        r.jobs[0].log
    );
    let err = &r.jobs[0]
        .log
        .iter()
        .find(|e| e.row == Some(2))
        .unwrap()
        .message;
    assert!(err.contains("amount"), "{err}");
    assert_eq!(
        db.rows("SELECT id, amount, seen, ok, day, note FROM m ORDER BY id"),
        [
            "1|12.50|2024-04-20 11:06:49.638407|1|2024-02-29|tab\there",
            "3|99999999.99|∅|∅|∅|"
        ]
    );
    let mut req = request("p", "back");
    req.argument = "1".into();
    let r = f.run(&req);
    assert_eq!(r.counters.inserts, 2, "{:?}", r.error);
    assert_eq!(
        std::fs::read_to_string(f.data.join("out.csv")).unwrap(),
        "id,amount,seen,ok,day,note\n1,12.50,2024-04-20 11:06:49.638407,1,2024-02-29,tab\there\n3,99999999.99,,,,\n"
    );
}

#[test]
fn threads_and_duplicate_keys() {
    let mut csv = String::from("id,name,city\n");
    for i in 1..=3000 {
        csv.push_str(&format!("{i},n{i},c{}\n", i % 7));
    }
    csv.push_str("7,again,z\n");
    let mut outcomes = Vec::new();
    for threads in [1, 4] {
        let mut db = Db::new();
        people(&mut db, "PRIMARY KEY");
        let f = Fixture::new();
        let job =
            people_job("update/insert", "").replace("[origin]", "batch_size = 5000\n[origin]");
        f.project("p", &project(&db), &[("j", &job)]);
        f.write("projects/p/in.csv", &csv);
        let mut req = request("p", "j");
        req.thread_count = threads;
        let r = f.run(&req);
        assert_eq!(r.status, RunStatus::Complete, "{:?}", r.error);
        outcomes.push((
            r.counters,
            db.rows("SELECT count(*), md5(group_concat(id, name, city ORDER BY id)) FROM people"),
        ));
        assert_eq!(db.rows("SELECT name FROM people WHERE id = 7"), ["again"]);
    }
    assert_eq!((outcomes[0].0.inserts, outcomes[0].0.updates), (2997, 4));
    assert_eq!(outcomes[0], outcomes[1]);
}

#[test]
fn a_refused_connection_fails_the_job_clearly() {
    let db = Db::new();
    let f = Fixture::new();
    let proj = project(&db).replace("127.0.0.1:3306", "127.0.0.1:1");
    f.project("p", &proj, &[("j", &people_job("insert", ""))]);
    f.write("projects/p/in.csv", "id,name,city\n1,a,b\n");
    let r = f.run(&request("p", "j"));
    assert_eq!(r.status, RunStatus::Failed);
    let e = r.error.unwrap();
    assert!(
        e.contains("cannot open mysql database mysql://root@127.0.0.1:1/"),
        "{e}"
    );
}

#[test]
fn a_connection_killed_mid_run_is_retried_and_nothing_is_lost() {
    let mut db = Db::new();
    people(&mut db, "PRIMARY KEY");
    let f = Fixture::new();
    let job = people_job("update/insert", "")
        .replace("[origin]", "batch_size = 50\nretry_wait_ms = 100\n[origin]");
    f.project("p", &project(&db), &[("j", &job)]);
    let csv = common::people_csv(200_000);
    f.write("projects/p/in.csv", &csv);
    let name = db.name.clone();
    let admin_id = db.admin.connection_id();
    // Once rows are landing, cut tidepool's connections.
    let killer = common::when_count_passes(admin, people_count(name.clone()), 2000, move |c| {
        let ids: Vec<u64> = c
            .query(format!(
                "SELECT id FROM information_schema.PROCESSLIST WHERE db = '{name}' AND id NOT IN (CONNECTION_ID(), {admin_id})"
            ))
            .unwrap();
        for id in &ids {
            let _ = c.query_drop(format!("KILL {id}"));
        }
        ids.len()
    });
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Medium;
    let r = f.run(&req);
    let killed = killer.join().unwrap().unwrap_or(0);
    assert_eq!(r.status, RunStatus::Complete, "{:?}", r.error);
    let c = r.counters;
    assert_eq!(
        (c.total_rows, c.inserts + c.updates, c.errors),
        (200_000, 200_000, 0)
    );
    assert_eq!(db.rows("SELECT count(*) FROM people"), ["200000"]);
    assert!(killed > 0, "the test did not manage to cut the connection");
    let log: Vec<&str> = r.jobs[0].log.iter().map(|e| e.message.as_str()).collect();
    assert!(
        log.iter().any(|m| m.contains("connection was lost")),
        "{log:#?}"
    );
}

#[test]
fn scripts_look_up_values_with_typed_criteria() {
    let mut db = Db::new();
    people(&mut db, "PRIMARY KEY");
    db.exec(
        "CREATE TABLE accounts(num int, region varchar(10), code varchar(20), balance decimal(12,2));
         INSERT INTO accounts VALUES (2, 'eu', 'ACC-2', 10.50), (3, NULL, 'ACC-3', 7.25)",
    );
    let f = Fixture::new();
    let job = r#"
[origin]
connection = "src"
[destination]
connection = "my"
[[stages]]
table = "people"
action = "update"
fields = [
  { column = "id", origin = "id", match = true },
  { column = "name", script = "lookup('my', 'accounts', 'code', {num: row.id, region: row.city === 'Lima' ? null : 'eu'}) || 'none'" },
  { column = "city", script = "lookup('my', 'accounts', 'balance', {num: Number(row.id)})" },
]
"#;
    f.project("p", &project(&db), &[("j", job)]);
    f.write(
        "projects/p/in.csv",
        "id,name,city\n2,x,Rome\n3,y,Lima\n1,z,Oslo\n",
    );
    let r = f.run(&request("p", "j"));
    assert_eq!(r.status, RunStatus::Complete, "{:?}", r.error);
    assert_eq!(r.jobs[0].counters.updates, 3);
    assert_eq!(
        db.rows("SELECT id, name, city FROM people ORDER BY id"),
        ["1|none|∅", "2|ACC-2|10.50", "3|ACC-3|7.25"]
    );
}

#[test]
fn upsert_on_a_unique_key_is_one_statement_with_exact_counts() {
    let mut db = Db::new();
    db.exec(
        "CREATE TABLE people(id int AUTO_INCREMENT PRIMARY KEY, email varchar(60) NOT NULL UNIQUE,
                             name varchar(50), city varchar(50), source varchar(10));
         INSERT INTO people (email, name, city, source) VALUES
           ('ann@x.io','Ann','Oslo','old'), ('bob@x.io','Bob','Rome','old'), ('cy@x.io','Cy','Lima','old')",
    );
    let f = Fixture::new();
    let job = r#"
[origin]
connection = "src"
[destination]
connection = "my"
[[stages]]
table = "people"
action = "update/insert"
omit_blank = true
fields = [
  { column = "email", origin = "email", match = true },
  { column = "name", origin = "name" },
  { column = "city", origin = "city" },
  { column = "source", value = "new", insert_only = true },
]
"#;
    f.project("p", &project(&db), &[("j", job)]);
    // Bob changes, Cy is unchanged, Ann's blank city keeps Oslo, Dan is new.
    f.write(
        "projects/p/in.csv",
        "email,name,city\nbob@x.io,Bobby,Rome\ncy@x.io,Cy,Lima\nann@x.io,Anna,\ndan@x.io,Dan,Kyiv\n",
    );
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Medium;
    let r = f.run(&req);
    assert_eq!(r.status, RunStatus::Complete, "{:?}", r.error);
    let c = r.counters;
    assert_eq!((c.inserts, c.updates, c.errors), (1, 3, 0));
    let log: Vec<&str> = r.jobs[0].log.iter().map(|e| e.message.as_str()).collect();
    assert!(!log.iter().any(|m| m.contains("replaying")), "{log:#?}");
    assert_eq!(
        db.rows("SELECT email, name, city, source FROM people ORDER BY email"),
        [
            "ann@x.io|Anna|Oslo|old",
            "bob@x.io|Bobby|Rome|old",
            "cy@x.io|Cy|Lima|old",
            "dan@x.io|Dan|Kyiv|new"
        ]
    );
}

#[test]
fn a_second_unique_key_never_lets_a_new_row_update_another() {
    let mut db = Db::new();
    db.exec(
        "CREATE TABLE people(id int PRIMARY KEY, email varchar(60) UNIQUE, name varchar(50));
         INSERT INTO people VALUES (1, 'ann@x.io', 'Ann'), (2, 'bob@x.io', 'Bob')",
    );
    let f = Fixture::new();
    let job = r#"
[origin]
connection = "src"
[destination]
connection = "my"
[[stages]]
table = "people"
action = "update/insert"
fields = [
  { column = "id", origin = "id", match = true },
  { column = "email", origin = "email" },
  { column = "name", origin = "name" },
]
"#;
    f.project("p", &project(&db), &[("j", job)]);
    // Row 2 is new by id but takes Ann's email: an error, not an update of Ann.
    f.write(
        "projects/p/in.csv",
        "id,email,name\n2,bob@x.io,Bobby\n3,ann@x.io,Impostor\n4,dan@x.io,Dan\n",
    );
    let r = f.run(&request("p", "j"));
    let c = r.counters;
    assert_eq!((c.inserts, c.updates, c.errors), (1, 1, 1), "{:?}", r.error);
    assert_eq!(
        db.rows("SELECT id, email, name FROM people ORDER BY id"),
        ["1|ann@x.io|Ann", "2|bob@x.io|Bobby", "4|dan@x.io|Dan"]
    );
}

#[test]
fn an_origin_cut_mid_stream_fails_the_job_and_counts_only_what_landed() {
    let mut db = Db::new();
    db.exec("CREATE TABLE src(id integer PRIMARY KEY, name text)");
    db.exec(
        "CREATE TABLE d(i integer);
         INSERT INTO d VALUES (0),(1),(2),(3),(4),(5),(6),(7),(8),(9);
         INSERT INTO src SELECT n, concat('n', n) FROM (
           SELECT 1 + a.i + 10*b.i + 100*c.i + 1000*e.i + 10000*g.i + 100000*h.i AS n
           FROM d a, d b, d c, d e, d g, (SELECT 0 AS i UNION SELECT 1 UNION SELECT 2) h) x",
    );
    let f = Fixture::new();
    let proj = format!(
        "[connections.my]\nkind = \"mariadb\"\nurl = \"{}\"\n[connections.db]\nkind = \"sqlite\"\npath = \"${{DATA_DIR}}/out.sqlite\"\n",
        db.url()
    );
    // Slow enough on the SQLite side that the cut lands mid-stream.
    let job = "batch_size = 100\n[origin]\nconnection = \"my\"\nquery = \"SELECT id, name FROM src ORDER BY id\"\n[destination]\nconnection = \"db\"\n[[stages]]\ntable = \"people\"\naction = \"insert\"\nfields = [{ column = \"id\", origin = \"id\" }, { column = \"name\", origin = \"name\" }]\n";
    f.project("p", &proj, &[("j", job)]);
    let out = f.data.join("out.sqlite");
    rusqlite::Connection::open(&out)
        .unwrap()
        .execute_batch("CREATE TABLE people(id integer PRIMARY KEY, name text)")
        .unwrap();
    let name = db.name.clone();
    let admin_id = db.admin.connection_id();
    // Once the origin's query is streaming, cut it.
    let readers = move |c: &mut mysql::Conn| -> Vec<u64> {
        c.query(format!(
            "SELECT id FROM information_schema.PROCESSLIST WHERE db = '{name}' AND info LIKE 'SELECT id, name FROM src%' AND id NOT IN (CONNECTION_ID(), {admin_id})"
        ))
        .unwrap()
    };
    let watching = readers.clone();
    let killer = common::when_count_passes(
        admin,
        move |c| watching(c).len() as i64,
        0,
        move |c| {
            let ids = readers(c);
            for id in &ids {
                let _ = c.query_drop(format!("KILL {id}"));
            }
            ids.len()
        },
    );
    let r = f.run(&request("p", "j"));
    assert_eq!(
        killer.join().unwrap(),
        Some(1),
        "the test did not cut the origin"
    );
    assert_eq!(r.status, RunStatus::Failed);
    let e = r.error.clone().unwrap_or_default();
    let landed: i64 = rusqlite::Connection::open(&out)
        .unwrap()
        .query_row("SELECT count(*) FROM people", [], |r| r.get(0))
        .unwrap();
    assert!(landed < 300_000, "{landed}");
    assert_eq!(r.counters.inserts as i64, landed, "counted = landed");
    assert!(e.contains("origin \"my\""), "{e}");
    assert!(
        e.contains(&format!("the {landed} rows read before it were processed")),
        "{e}"
    );
}

#[test]
fn upserts_switching_between_new_and_present_stretches_stay_exact() {
    // New stretches go in as plain inserts; the first batch that meets a
    // present key falls back to the full path, with nothing written twice.
    let mut db = Db::new();
    db.exec(
        "CREATE TABLE people(id integer PRIMARY KEY, name varchar(50), city varchar(50));
         INSERT INTO people VALUES (1050, 'old', 'x'), (1051, 'n1051', 'c');",
    );
    let csv = common::people_csv(2000);
    let f = Fixture::new();
    let job = people_job("update/insert", "").replace("[origin]", "batch_size = 100\n[origin]");
    f.project("p", &project(&db), &[("j", &job)]);
    f.write("projects/p/in.csv", &csv);
    let r = f.run(&request("p", "j"));
    let c = r.counters;
    assert_eq!(
        (c.inserts, c.updates, c.errors),
        (1998, 2, 0),
        "{:?}",
        r.error
    );
    assert_eq!(
        db.rows("SELECT count(*) FROM people WHERE name = concat('n', id) AND city = 'c'"),
        ["2000"]
    );
}

#[test]
fn a_database_gone_for_good_fails_the_job_after_its_retries() {
    const BATCH: i64 = 200;
    let mut db = Db::new();
    people(&mut db, "PRIMARY KEY");
    let proxy = common::Proxy::start("127.0.0.1:3306");
    let f = Fixture::new();
    let job = people_job("update/insert", "").replace(
        "[origin]",
        &format!("batch_size = {BATCH}\nretry_attempts = 2\nretry_wait_ms = 50\n[origin]"),
    );
    // Through the proxy only: without prefer_socket=false the driver moves
    // to the server's Unix socket.
    let proj = project(&db)
        .replace("127.0.0.1:3306", &format!("127.0.0.1:{}", proxy.port))
        .replace(
            &format!("/{}\"", db.name),
            &format!("/{}?prefer_socket=false\"", db.name),
        );
    f.project("p", &proj, &[("j", &job)]);
    let csv = common::people_csv(200_000);
    f.write("projects/p/in.csv", &csv);
    let down = common::when_count_passes(admin, people_count(db.name.clone()), 3000, move |_| {
        proxy.take_down()
    });
    let r = f.run(&request("p", "j"));
    assert!(
        down.join().unwrap().is_some(),
        "the test did not take the database down"
    );
    assert_eq!(
        r.status,
        RunStatus::Failed,
        "{:?} {:?}",
        r.counters,
        r.error
    );
    let e = r.error.clone().unwrap_or_default();
    assert!(
        e.contains("connection was lost") && e.contains("gave up after 2 retries"),
        "{e}"
    );
    let landed: i64 = db.rows("SELECT count(*) FROM people")[0].parse().unwrap();
    let c = r.counters;
    // A batch whose COMMIT was on its way when the link went down may have
    // landed without the answer reaching us: at most that one batch.
    let uncounted = landed - (c.inserts + c.updates) as i64;
    assert!(
        uncounted == 0 || uncounted == BATCH,
        "{landed} landed, {c:?}"
    );
    assert!(c.total_rows < 200_000 && c.errors == 1, "{c:?}");
}
