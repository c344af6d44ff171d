//! The MySQL/MariaDB connector against the real local server, each test in its
//! own database so tests run in parallel.

mod common;

use common::databases::MariaDb as Db;
use common::sql_destination::{self as scenario, SqlDestination};
use common::{Fixture, request};
use tidepool::engine::{LogLevel, RunStatus};

fn project(db: &Db) -> String {
    format!(
        "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.my]\nkind = \"mariadb\"\nurl = \"{}\"\n[connections.out]\nkind = \"csv\"\npath = \"${{DATA_DIR}}/out.csv\"\n",
        db.url()
    )
}

/// A job from the CSV `src` into `people`, id matched.
fn people_job(action: &str, extra: &str) -> String {
    scenario::people_job_into("my", "people", action, "", extra)
}

/// Table `people` with Ann, Bob and Cy.
fn people(db: &mut Db, key: &str) {
    scenario::people(db, key);
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

// The stage-action table and the fault scenarios every SQL destination runs
// (tests/common/sql_destination.rs).

#[test]
fn every_stage_action_counts_exactly() {
    scenario::every_stage_action_counts_exactly(Db::new);
}

#[test]
fn a_refused_connection_fails_the_job_clearly() {
    scenario::a_refused_connection_fails_the_job_clearly(&Db::new());
}

#[test]
fn a_connection_killed_mid_run_is_retried_and_nothing_is_lost() {
    scenario::a_connection_killed_mid_run_is_retried_and_nothing_is_lost(&mut Db::new());
}

#[test]
fn an_origin_cut_mid_stream_fails_the_job_and_counts_only_what_landed() {
    scenario::an_origin_cut_mid_stream_fails_the_job_and_counts_only_what_landed(&mut Db::new());
}

#[test]
fn a_database_gone_for_good_fails_the_job_after_its_retries() {
    scenario::a_database_gone_for_good_fails_the_job_after_its_retries(&mut Db::new());
}
