//! End-to-end runs of the engine on real files and real SQLite databases.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use common::{Fixture, request, rows};
use tidepool::engine::{self, CancelToken, LogLevel, RunObserver, RunStatus};
use tidepool::project::JobId;

/// A fixture with the repository's demo project copied in.
fn demo() -> Fixture {
    let f = Fixture::new();
    f.copy_demo();
    f
}

#[test]
fn demo_contacts_twice_inserts_then_updates_with_three_errors() {
    let f = demo();
    let first = f.run(&request("demo", "contacts"));
    assert_eq!(first.status, RunStatus::Complete, "{:?}", first.error);
    let c = first.counters;
    assert_eq!(
        (c.total_rows, c.inserts, c.updates, c.errors),
        (1000, 997, 0, 3)
    );
    assert_eq!((c.deletes, c.skips, c.ignores), (0, 0, 0));

    let db = f.db("demo.sqlite");
    assert_eq!(rows(&db, "SELECT count(*) FROM contacts"), ["997"]);
    // The mapping of bench.md: concatenation, lower-cased email, blank company as NULL.
    assert_eq!(
        rows(
            &db,
            "SELECT id, full_name, email, company, country, amount FROM contacts WHERE id IN (1, 7) ORDER BY id"
        ),
        [
            "1|Dev Smith|dev.smith1@example.com|Smith & Co|FR|275.03",
            "7|Ana Garcia|ana.garcia7@example.com|∅|FR|422.61",
        ]
    );
    assert_eq!(
        rows(
            &db,
            "SELECT typeof(id), typeof(amount) FROM contacts WHERE id = 2"
        ),
        ["integer|real"]
    );
    assert_eq!(
        rows(
            &db,
            "SELECT count(*) FROM contacts WHERE id IN (101, 502, 903)"
        ),
        ["0"]
    );

    // The error file lists the three rejected rows with their reasons and data.
    let errors = std::fs::read_to_string(f.data.join("contacts-errors.csv")).unwrap();
    let lines: Vec<&str> = errors.lines().collect();
    assert_eq!(lines.len(), 4, "{errors}");
    assert!(lines[0].starts_with("row,stage,error,Id,FirstName"));
    assert!(lines[1].starts_with("101,upsert contacts,"), "{}", lines[1]);
    assert!(
        lines[1].contains("\"\"n/a\"\" is not a number"),
        "{}",
        lines[1]
    );
    assert!(lines[2].starts_with("502,") && lines[3].starts_with("903,"));

    let second = f.run(&request("demo", "contacts"));
    let c = second.counters;
    assert_eq!(
        (c.total_rows, c.inserts, c.updates, c.errors),
        (1000, 0, 997, 3)
    );
    assert_eq!(rows(&db, "SELECT count(*) FROM contacts"), ["997"]);
}

#[test]
fn row_window_processes_exactly_the_rows_asked_for() {
    let f = demo();
    let mut req = request("demo", "contacts");
    req.begin_at_row = 11;
    req.end_after_row = Some(20);
    let r = f.run(&req);
    assert_eq!(r.counters.total_rows, 10);
    assert_eq!(r.counters.inserts, 10);
    let db = f.db("demo.sqlite");
    assert_eq!(
        rows(&db, "SELECT min(id), max(id), count(*) FROM contacts"),
        ["11|20|10"]
    );

    // A window that holds a bad row counts it; one past the end processes nothing.
    let mut req = request("demo", "contacts");
    req.begin_at_row = 100;
    req.end_after_row = Some(102);
    let r = f.run(&req);
    assert_eq!((r.counters.total_rows, r.counters.errors), (3, 1));
    let mut req = request("demo", "contacts");
    req.begin_at_row = 5000;
    assert_eq!(f.run(&req).counters.total_rows, 0);
}

#[test]
fn chain_runs_the_next_job_and_reports_each_job() {
    let f = demo();
    let mut req = request("demo", "contacts");
    req.chain_jobs = true;
    let r = f.run(&req);
    assert_eq!(r.status, RunStatus::Complete);
    let jobs: Vec<&str> = r.jobs.iter().map(|j| j.job_id.0.as_str()).collect();
    assert_eq!(jobs, ["contacts", "countries"]);
    assert_eq!(r.jobs[1].counters.inserts, 7);
    assert_eq!(r.counters.inserts, 997 + 7, "run counters sum the jobs");
    let csv = std::fs::read_to_string(f.data.join("countries.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("country,contacts,total_amount"));
    let total: u64 = lines
        .map(|l| l.split(',').nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 997);

    // Without chainJobs only the first job runs.
    let r = f.run(&request("demo", "contacts"));
    assert_eq!(r.jobs.len(), 1);
}

#[test]
fn preview_runs_everything_and_writes_nothing() {
    let f = demo();
    let mut req = request("demo", "contacts");
    req.preview = true;
    req.chain_jobs = true;
    let r = f.run(&req);
    assert_eq!(r.jobs[0].counters.inserts, 997);
    assert!(
        !f.data.join("demo.sqlite").exists(),
        "preview created the database"
    );
    assert!(!f.data.join("contacts-errors.csv").exists());
    assert!(!f.data.join("countries.csv").exists());

    // On an existing database: counted as updates, nothing changed.
    f.run(&request("demo", "contacts"));
    let db = f.db("demo.sqlite");
    db.execute("UPDATE contacts SET full_name = 'changed' WHERE id = 1", [])
        .unwrap();
    let mut req = request("demo", "contacts");
    req.preview = true;
    let r = f.run(&req);
    assert_eq!(r.counters.updates, 997);
    assert_eq!(
        rows(&db, "SELECT full_name FROM contacts WHERE id = 1"),
        ["changed"]
    );
}

const PEOPLE_PROJECT: &str = r#"
[connections.src]
kind = "csv"
path = "in.csv"

[connections.db]
kind = "sqlite"
path = "${DATA_DIR}/people.sqlite"
"#;

/// A job over `in.csv` → table `people` with `action`, `extra` TOML appended to
/// the stage, and fields id (match), name, city.
fn people_job(action: &str, stage_extra: &str) -> String {
    format!(
        r#"
[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "people"
action = "{action}"
{stage_extra}
fields = [
  {{ column = "id", origin = "id", match = true }},
  {{ column = "name", origin = "name" }},
  {{ column = "city", origin = "city" }},
]
"#
    )
}

fn people_fixture(jobs: &[(&str, String)]) -> Fixture {
    let f = Fixture::new();
    let jobs: Vec<(&str, &str)> = jobs.iter().map(|(n, t)| (*n, t.as_str())).collect();
    f.project("p", PEOPLE_PROJECT, &jobs);
    f.write(
        "projects/p/in.csv",
        "id,name,city\n2,Bobby,Rome\n3,Cy,Lima\n4,Dan,Kyiv\n5,Eve,Pisa\n",
    );
    let db = f.db("people.sqlite");
    db.execute_batch(
        "CREATE TABLE people(id INTEGER PRIMARY KEY, name TEXT, city TEXT);
         INSERT INTO people VALUES (1,'Ann','Oslo'), (2,'Bob','Rome'), (3,'Cy','Lima');",
    )
    .unwrap();
    f
}

#[test]
fn every_stage_action_counts_exactly() {
    let cases: [(&str, &str, [u64; 5], &[&str]); 5] = [
        // action, stage extra, [inserts, updates, deletes, skips, ignores], table after
        (
            "update",
            "",
            [0, 2, 0, 0, 2],
            &["1|Ann|Oslo", "2|Bobby|Rome", "3|Cy|Lima"],
        ),
        ("delete", "", [0, 0, 2, 0, 2], &["1|Ann|Oslo"]),
        (
            "update/insert",
            "",
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
    for (action, extra, expected, table) in cases {
        let f = people_fixture(&[("j", people_job(action, extra))]);
        let r = f.run(&request("p", "j"));
        let c = r.counters;
        assert_eq!(
            r.status,
            RunStatus::Complete,
            "{action} {extra}: {:?}",
            r.error
        );
        assert_eq!(
            [c.inserts, c.updates, c.deletes, c.skips, c.ignores],
            expected,
            "{action} {extra}"
        );
        assert_eq!((c.total_rows, c.errors), (4, 0), "{action} {extra}");
        assert_eq!(
            rows(&f.db("people.sqlite"), "SELECT * FROM people ORDER BY id"),
            table,
            "{action} {extra}"
        );
    }
}

#[test]
fn plain_insert_of_existing_keys_is_a_row_error_and_the_rest_land() {
    let f = people_fixture(&[("j", people_job("insert", ""))]);
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Low;
    let r = f.run(&req);
    let c = r.counters;
    assert_eq!((c.total_rows, c.inserts, c.errors), (4, 2, 2));
    assert_eq!(r.status, RunStatus::Complete);
    let errors = common::row_messages(&r);
    assert_eq!(errors.len(), 2);
    assert!(
        errors[0].starts_with("row 1, stage 1 (insert people): UNIQUE constraint failed"),
        "{}",
        errors[0]
    );
    assert_eq!(
        rows(&f.db("people.sqlite"), "SELECT id FROM people ORDER BY id"),
        ["1", "2", "3", "4", "5"]
    );
}

#[test]
fn omit_blank_keeps_the_destination_value() {
    let f = people_fixture(&[("j", people_job("update/insert", "omit_blank = true"))]);
    f.write("projects/p/in.csv", "id,name,city\n2,,Milan\n6,Fay,\n");
    let r = f.run(&request("p", "j"));
    assert_eq!((r.counters.updates, r.counters.inserts), (1, 1));
    assert_eq!(
        rows(
            &f.db("people.sqlite"),
            "SELECT * FROM people WHERE id IN (2, 6) ORDER BY id"
        ),
        ["2|Bob|Milan", "6|Fay|∅"]
    );
}

#[test]
fn insert_only_and_update_only_fields() {
    let job = r#"
[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "people"
action = "update/insert"
fields = [
  { column = "id", origin = "id", match = true },
  { column = "name", origin = "name", insert_only = true },
  { column = "city", value = "updated", update_only = true },
]
"#;
    let f = people_fixture(&[("j", job.to_owned())]);
    let r = f.run(&request("p", "j"));
    assert_eq!((r.counters.updates, r.counters.inserts), (2, 2));
    assert_eq!(
        rows(&f.db("people.sqlite"), "SELECT * FROM people ORDER BY id"),
        [
            "1|Ann|Oslo",
            "2|Bob|updated",
            "3|Cy|updated",
            "4|Dan|∅",
            "5|Eve|∅"
        ]
    );
}

#[test]
fn templates_variables_functions_and_types() {
    let job = r#"
[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "people"
action = "insert"
fields = [
  { column = "id", origin = "id", type = "integer" },
  { column = "name", template = "@@VAR:JobArgument@@/@@VAR:Region@@/@@ORG:name@@#@@ORG:id@@" },
  { column = "city", function = "new_guid" },
  { column = "n", function = "row_number" },
  { column = "k", value = 7 },
  { column = "up", origin = "name", transform = ["trim", "upper"] },
]
"#;
    let f = Fixture::new();
    f.project(
        "p",
        &format!("{PEOPLE_PROJECT}\n[variables]\nRegion = \"EU\"\n"),
        &[("j", job)],
    );
    f.write("projects/p/in.csv", "id,name,city\n10, ann ,x\n11,bo,y\n");
    f.db("people.sqlite")
        .execute_batch("CREATE TABLE people(id INTEGER PRIMARY KEY, name TEXT, city TEXT, n INTEGER, k INTEGER, up TEXT)")
        .unwrap();
    let mut req = request("p", "j");
    req.argument = "ARG".into();
    let r = f.run(&req);
    assert_eq!(r.counters.inserts, 2, "{:?}", r.error);
    let db = f.db("people.sqlite");
    assert_eq!(
        rows(
            &db,
            "SELECT id, name, n, k, up, length(city) FROM people ORDER BY id"
        ),
        ["10|ARG/EU/ ann #10|1|7|ANN|36", "11|ARG/EU/bo#11|2|7|BO|36"]
    );
}

#[test]
fn stage_actions_feed_later_stages_and_write_back_to_the_origin() {
    let f = Fixture::new();
    let project = r#"
[connections.queue]
kind = "sqlite"
path = "${DATA_DIR}/queue.sqlite"
journal_mode = "wal"

[connections.db]
kind = "sqlite"
path = "${DATA_DIR}/people.sqlite"
"#;
    let job = r#"
[origin]
connection = "queue"
query = "SELECT id, name FROM queue WHERE processed = 0 ORDER BY id"
[destination]
connection = "db"

[[stages]]
table = "people"
action = "skip/insert"
fields = [
  { column = "id", origin = "id", match = true },
  { column = "name", origin = "name" },
]

[[stages]]
table = "queue"
action = "update"
use_origin = true
fields = [
  { column = "id", origin = "id", match = true },
  { column = "processed", value = 1 },
  { column = "outcome", template = "@@STG:1,#Action@@" },
]
"#;
    f.project("p", project, &[("j", job)]);
    f.db("queue.sqlite")
        .execute_batch(
            "CREATE TABLE queue(id INTEGER PRIMARY KEY, name TEXT, processed INTEGER, outcome TEXT);
             INSERT INTO queue VALUES (1,'Ann',0,NULL), (2,'Bob',0,NULL), (3,'Cy',1,NULL);",
        )
        .unwrap();
    f.db("people.sqlite")
        .execute_batch("CREATE TABLE people(id INTEGER PRIMARY KEY, name TEXT); INSERT INTO people VALUES (2,'Bob');")
        .unwrap();
    let r = f.run(&request("p", "j"));
    assert_eq!(r.status, RunStatus::Complete, "{:?}", r.error);
    let c = r.counters;
    assert_eq!((c.total_rows, c.inserts, c.skips, c.updates), (2, 1, 1, 2));
    assert_eq!(
        rows(&f.db("queue.sqlite"), "SELECT * FROM queue ORDER BY id"),
        ["1|Ann|1|Insert", "2|Bob|1|Skip", "3|Cy|1|∅"]
    );
    // Run again: the origin query now finds nothing to do.
    assert_eq!(f.run(&request("p", "j")).counters.total_rows, 0);
}

#[test]
fn origin_query_tokens_are_bound_never_spliced() {
    let f = Fixture::new();
    let job = r#"
[origin]
connection = "db"
query = "SELECT id, name FROM people WHERE name = '@@VAR:JobArgument@@'"
[destination]
connection = "out"
[[stages]]
action = "insert"
fields = [{ column = "id", origin = "id" }]
"#;
    f.project(
        "p",
        "[connections.db]\nkind = \"sqlite\"\npath = \"${DATA_DIR}/people.sqlite\"\n[connections.out]\nkind = \"csv\"\npath = \"${DATA_DIR}/out.csv\"\n",
        &[("j", job)],
    );
    f.db("people.sqlite")
        .execute_batch("CREATE TABLE people(id INTEGER, name TEXT); INSERT INTO people VALUES (1,'Ann'), (2,'Bob');")
        .unwrap();
    let mut req = request("p", "j");
    req.argument = "x' OR '1'='1".into();
    assert_eq!(f.run(&req).counters.total_rows, 0);
    req.argument = "Bob".into();
    assert_eq!(f.run(&req).counters.total_rows, 1);
    assert_eq!(
        std::fs::read_to_string(f.data.join("out.csv")).unwrap(),
        "id\n2\n"
    );
}

#[test]
fn threads_give_the_same_table_and_counts_as_one_thread() {
    let mut csv = String::from("id,name,city\n");
    for i in 1..=5000 {
        let city = if i % 97 == 0 {
            "".to_owned()
        } else {
            format!("c{}", i % 13)
        };
        csv.push_str(&format!("{i},n{i},{city}\n"));
    }
    let job = people_job("update/insert", "").replace("[origin]", "batch_size = 100\n[origin]");
    let mut outcomes = Vec::new();
    for threads in [1, 4] {
        let f = people_fixture(&[("j", job.clone())]);
        f.write("projects/p/in.csv", &csv);
        let mut req = request("p", "j");
        req.thread_count = threads;
        let r = f.run(&req);
        assert_eq!(r.status, RunStatus::Complete, "{:?}", r.error);
        let table = rows(&f.db("people.sqlite"), "SELECT * FROM people ORDER BY id");
        outcomes.push((r.counters, table));
    }
    assert_eq!(outcomes[0].0.total_rows, 5000);
    assert_eq!(outcomes[0].0.inserts, 4997);
    assert_eq!(outcomes[0].0.updates, 3);
    assert_eq!(outcomes[0], outcomes[1]);
}

#[test]
fn halt_on_error_stops_at_the_first_bad_row() {
    let job = people_job("insert", "").replace("[origin]", "halt_on_error = true\n[origin]");
    let f = people_fixture(&[("j", job)]);
    f.write(
        "projects/p/in.csv",
        "id,name,city\n10,a,x\n11,b,x\n1,dup,x\n12,c,x\n13,d,x\n",
    );
    let r = f.run(&request("p", "j"));
    assert_eq!(r.status, RunStatus::Failed);
    let c = r.counters;
    assert_eq!((c.total_rows, c.inserts, c.errors), (3, 2, 1));
    let err = r.error.unwrap();
    assert!(err.contains("halted on error at row 3"), "{err}");
    assert_eq!(
        rows(&f.db("people.sqlite"), "SELECT id FROM people ORDER BY id"),
        ["1", "2", "3", "10", "11"]
    );
}

#[test]
fn a_batch_the_database_rolls_back_is_replayed_row_by_row() {
    let f = people_fixture(&[("j", people_job("insert", ""))]);
    f.write(
        "projects/p/in.csv",
        "id,name,city\n10,a,x\n11,boom,x\n12,c,x\n",
    );
    // RAISE(ROLLBACK) undoes the whole transaction: the batch is lost and must be replayed.
    f.db("people.sqlite")
        .execute_batch(
            "CREATE TRIGGER no_boom BEFORE INSERT ON people WHEN NEW.name = 'boom'
             BEGIN SELECT RAISE(ROLLBACK, 'boom is not allowed'); END;",
        )
        .unwrap();
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Medium;
    let r = f.run(&req);
    let c = r.counters;
    assert_eq!((c.total_rows, c.inserts, c.errors), (3, 2, 1));
    let log: Vec<&str> = r.jobs[0].log.iter().map(|e| e.message.as_str()).collect();
    assert!(
        log.iter().any(|m| m.contains("replaying it row by row")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|m| m.starts_with("row 2: ") && m.contains("boom is not allowed")),
        "{log:#?}"
    );
    assert_eq!(
        rows(
            &f.db("people.sqlite"),
            "SELECT id FROM people WHERE id >= 10 ORDER BY id"
        ),
        ["10", "12"]
    );
}

#[test]
fn malformed_csv_lines_are_row_errors_and_the_rest_land() {
    let f = people_fixture(&[("j", people_job("insert", ""))]);
    let mut content = b"id,name,city\n10,a,x\n11,b\n".to_vec();
    content.extend_from_slice(b"12,\xff\xfe,x\n13,d,x\n");
    f.write("projects/p/in.csv", content);
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Low;
    let r = f.run(&req);
    let c = r.counters;
    assert_eq!((c.total_rows, c.inserts, c.errors), (4, 2, 2));
    let msgs = common::row_messages(&r);
    assert!(
        msgs[0].starts_with("row 2: the line has 2 fields where the header has 3"),
        "{msgs:?}"
    );
    assert!(
        msgs[1].starts_with("row 3: the line is not valid UTF-8"),
        "{msgs:?}"
    );
}

#[test]
fn a_csv_with_a_bom_reads_its_first_field_name() {
    let f = people_fixture(&[("j", people_job("update/insert", ""))]);
    f.write(
        "projects/p/in.csv",
        "\u{feff}id;name;city\n\"7\";\"Q; R\";Z\n",
    );
    let project =
        PEOPLE_PROJECT.replace("path = \"in.csv\"", "path = \"in.csv\"\ndelimiter = \";\"");
    f.write("projects/p/project.toml", project);
    let r = f.run(&request("p", "j"));
    assert_eq!(r.counters.inserts, 1, "{:?}", r.error);
    assert_eq!(
        rows(&f.db("people.sqlite"), "SELECT * FROM people WHERE id = 7"),
        ["7|Q; R|Z"]
    );
}

#[test]
fn csv_files_in_other_encodings_are_read_and_written_in_them() {
    let copy = r#"
[origin]
connection = "src"
[destination]
connection = "out"
[[stages]]
action = "insert"
fields = [
  { column = "id", origin = "id" },
  { column = "name", origin = "name" },
  { column = "city", origin = "city" },
]
"#;
    let f = people_fixture(&[
        ("j", people_job("update/insert", "")),
        ("copy", copy.to_owned()),
    ]);
    let project = PEOPLE_PROJECT.replace(
        "path = \"in.csv\"",
        "path = \"in.csv\"\nencoding = \"windows-1252\"",
    ) + "[connections.out]\nkind = \"csv\"\npath = \"${DATA_DIR}/out.csv\"\nencoding = \"iso-8859-15\"\n";
    f.write("projects/p/project.toml", project);
    // windows-1252: ü is 0xFC, € is 0x80, è is 0xE8.
    let mut content = b"id,name,city\n8,M\xfcller \x80,Li\xe8ge\n9,Plain,Oslo\n".to_vec();
    content.extend_from_slice(b"10,\x93quoted\x94,Rome\n");
    f.write("projects/p/in.csv", &content);
    let r = f.run(&request("p", "j"));
    assert_eq!(r.counters.inserts, 3, "{:?}", r.error);
    assert_eq!(
        rows(
            &f.db("people.sqlite"),
            "SELECT * FROM people WHERE id >= 8 ORDER BY id"
        ),
        [
            "8|Müller €|Liège",
            "9|Plain|Oslo",
            "10|\u{201c}quoted\u{201d}|Rome"
        ]
    );
    // Written in ISO-8859-15: € is 0xA4 there; curly quotes do not exist in
    // it, so that row is an error naming the column, and the others land.
    let mut req = request("p", "copy");
    req.logging_level = LogLevel::Low;
    let r = f.run(&req);
    assert_eq!(
        (r.counters.inserts, r.counters.errors),
        (2, 1),
        "{:?}",
        r.error
    );
    let log: Vec<&str> = r.jobs[0].log.iter().map(|e| e.message.as_str()).collect();
    assert!(
        log.iter().any(|m| m.starts_with("row 3")
            && m.contains("column \"name\"")
            && m.contains("cannot be written in ISO-8859-15")),
        "{log:#?}"
    );
    let out = std::fs::read(f.data.join("out.csv")).unwrap();
    assert_eq!(
        out,
        b"id,name,city\n8,M\xfcller \xa4,Li\xe8ge\n9,Plain,Oslo\n"
    );
    // An unknown label is a clear error.
    f.write(
        "projects/p/project.toml",
        PEOPLE_PROJECT.replace(
            "path = \"in.csv\"",
            "path = \"in.csv\"\nencoding = \"klingon\"",
        ) + "[connections.out]\nkind = \"csv\"\npath = \"out.csv\"\n",
    );
    let r = f.run(&request("p", "j"));
    assert!(
        r.error
            .as_deref()
            .unwrap_or("")
            .contains("unknown csv encoding \"klingon\""),
        "{:?}",
        r.error
    );
}

#[test]
fn a_missing_origin_file_fails_the_job_with_its_path() {
    let f = people_fixture(&[("j", people_job("insert", ""))]);
    std::fs::remove_file(f.projects.join("p/in.csv")).unwrap();
    let r = f.run(&request("p", "j"));
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(r.counters.errors, 1);
    let err = r.error.unwrap();
    assert!(
        err.contains("cannot open csv file") && err.contains("in.csv"),
        "{err}"
    );
}

#[test]
fn a_missing_destination_table_fails_the_job_and_names_it() {
    let f = people_fixture(&[(
        "j",
        people_job("insert", "").replace("\"people\"", "\"nope\""),
    )]);
    let r = f.run(&request("p", "j"));
    assert_eq!(r.status, RunStatus::Failed);
    let err = r.error.unwrap();
    assert!(err.contains("table \"nope\" does not exist"), "{err}");
    assert_eq!(r.counters.total_rows, 0);
}

#[test]
fn a_value_that_does_not_fit_its_column_is_a_row_error_naming_it() {
    let f = people_fixture(&[("j", people_job("insert", ""))]);
    f.db("people.sqlite")
        .execute_batch(
            "DROP TABLE people; CREATE TABLE people(id INTEGER PRIMARY KEY, name TEXT, city REAL)",
        )
        .unwrap();
    f.write("projects/p/in.csv", "id,name,city\n1,a,2.5\n2,b,Rome\n");
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Low;
    let r = f.run(&req);
    assert_eq!((r.counters.inserts, r.counters.errors), (1, 1));
    let msg = &r.jobs[0]
        .log
        .iter()
        .find(|e| e.row == Some(2))
        .unwrap()
        .message;
    assert!(
        msg.contains("column \"city\" (REAL) cannot hold \"Rome\""),
        "{msg}"
    );
}

#[test]
fn json_array_and_json_lines_origins_and_destinations() {
    let f = Fixture::new();
    let project = r#"
[connections.arr]
kind = "json"
path = "in.json"
[connections.lines]
kind = "json"
path = "in.jsonl"
[connections.out]
kind = "json"
path = "${DATA_DIR}/out.jsonl"
"#;
    let job = |conn: &str| {
        format!(
            r#"
[origin]
connection = "{conn}"
[destination]
connection = "out"
[[stages]]
action = "insert"
fields = [
  {{ column = "id", origin = "id" }},
  {{ column = "name", origin = "Name" }},
  {{ column = "tags", origin = "tags" }},
]
"#
        )
    };
    f.project("p", project, &[("a", &job("arr")), ("l", &job("lines"))]);
    f.write(
        "projects/p/in.json",
        r#"[{"id": 1, "name": "Ann", "tags": ["x"]}, {"id": 2.5, "name": null}, 7]"#,
    );
    f.write(
        "projects/p/in.jsonl",
        "{\"id\": 1, \"Name\": \"A\"}\n\n{broken\n{\"id\": 3, \"Name\": \"C\"}\n",
    );
    let r = f.run(&request("p", "a"));
    assert_eq!(
        (r.counters.total_rows, r.counters.inserts, r.counters.errors),
        (3, 2, 1)
    );
    let out = std::fs::read_to_string(f.data.join("out.jsonl")).unwrap();
    assert_eq!(
        out,
        "{\"id\":1,\"name\":\"Ann\",\"tags\":\"[\\\"x\\\"]\"}\n{\"id\":2.5,\"name\":null,\"tags\":null}\n"
    );
    let r = f.run(&request("p", "l"));
    assert_eq!(
        (r.counters.total_rows, r.counters.inserts, r.counters.errors),
        (3, 2, 1)
    );
    let out = std::fs::read_to_string(f.data.join("out.jsonl")).unwrap();
    assert_eq!(out.lines().count(), 2);
}

#[test]
fn a_json_file_that_breaks_midway_fails_the_job_and_keeps_earlier_rows() {
    let f = Fixture::new();
    f.project(
        "p",
        "[connections.src]\nkind = \"json\"\npath = \"in.json\"\n[connections.out]\nkind = \"csv\"\npath = \"${DATA_DIR}/out.csv\"\n",
        &[(
            "j",
            "[origin]\nconnection = \"src\"\n[destination]\nconnection = \"out\"\n[[stages]]\naction = \"insert\"\nfields = [{ column = \"id\", origin = \"id\" }]\n",
        )],
    );
    f.write("projects/p/in.json", r#"[{"id": 1}, {"id": 2}, {"id": "#);
    let r = f.run(&request("p", "j"));
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!((r.counters.inserts, r.counters.errors), (2, 1));
    assert!(r.error.unwrap().contains("is not a valid JSON array"));
    assert_eq!(
        std::fs::read_to_string(f.data.join("out.csv")).unwrap(),
        "id\n1\n2\n"
    );
}

struct CancelOnStart(CancelToken, AtomicBool);
impl RunObserver for CancelOnStart {
    fn job_started(&self, _job: &JobId) {
        self.1.store(true, Ordering::SeqCst);
        self.0.cancel();
    }
}

#[test]
fn a_cancelled_run_stops_and_says_so() {
    let f = demo();
    let cancel = CancelToken::new();
    let obs = CancelOnStart(cancel.clone(), AtomicBool::new(false));
    let mut req = request("demo", "contacts");
    req.chain_jobs = true;
    let r = f.run_observed(&req, &obs, &cancel);
    assert!(obs.1.load(Ordering::SeqCst));
    assert_eq!(r.status, RunStatus::Cancelled);
    assert_eq!(r.jobs.len(), 1, "a cancelled job does not chain");
    assert!(r.counters.total_rows < 1000);
}

#[test]
fn bad_requests_and_unknown_jobs_are_refused_before_running() {
    let f = demo();
    let loaded = f.load();
    let project = loaded.project("demo").unwrap();
    let run = |req| engine::run(project, &req, &CancelToken::new(), &engine::NoObserver);
    let mut req = request("demo", "contacts");
    req.begin_at_row = 0;
    assert!(run(req).unwrap_err().to_string().contains("beginAtRow"));
    let mut req = request("demo", "contacts");
    req.begin_at_row = 5;
    req.end_after_row = Some(4);
    assert!(
        run(req)
            .unwrap_err()
            .to_string()
            .contains("endAfterRow (4)")
    );
    let mut req = request("demo", "contacts");
    req.thread_count = 0;
    assert!(run(req).unwrap_err().to_string().contains("threadCount"));
    let err = run(request("demo", "nope")).unwrap_err().to_string();
    assert!(
        err.contains("no job \"nope\"") && err.contains("contacts, countries"),
        "{err}"
    );
    // Job IDs match case-insensitively, as Starfish's do.
    assert!(run(request("demo", "CONTACTS")).is_ok());
}

#[test]
fn logging_levels_filter_the_log() {
    let f = demo();
    let count = |level| {
        let mut req = request("demo", "contacts");
        req.logging_level = level;
        req.end_after_row = Some(200);
        f.run(&req).jobs[0].log.len()
    };
    assert_eq!(count(LogLevel::None), 0);
    // start, one error (row 101), end
    assert_eq!(count(LogLevel::Low), 3);
    // plus the stage summary
    assert_eq!(count(LogLevel::Medium), 4);
    // plus one entry per row that did not fail
    assert_eq!(count(LogLevel::High), 4 + 199);
}

#[test]
fn script_fields_compute_values_and_fail_rows_not_runs() {
    let job = r#"
[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "people"
action = "update/insert"
fields = [
  { column = "id", origin = "id", match = true },
  { column = "name", script = "row.name.toUpperCase() + '/' + @@VAR:JobArgument@@" },
  { column = "city", script = """
const c = row.city;
if (c === 'boom') { throw new Error('no boom here'); }
if (row.city === 'loop') { while (true) {} }
return row.city.length > 3 ? row.city : null;""" },
]
"#;
    let f = people_fixture(&[("j", job.to_owned())]);
    f.write(
        "projects/p/in.csv",
        "id,name,city\n10,ann,Lisbon\n11,bo,Oslo\n12,cy,boom\n13,di,loop\n14,ed,Rio\n",
    );
    let mut req = request("p", "j");
    req.argument = "\"); evil(); (\"".into();
    req.logging_level = LogLevel::Low;
    req.thread_count = 2;
    let r = f.run(&req);
    assert_eq!(r.status, RunStatus::Complete, "{:?}", r.error);
    assert_eq!((r.counters.inserts, r.counters.errors), (3, 2));
    let msgs = common::row_messages(&r);
    assert!(
        msgs.iter().any(|m| m.contains("row 3")
            && m.contains("no boom here")
            && m.contains("line 2, column")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("row 4") && m.contains("longer than")),
        "{msgs:?}"
    );
    assert_eq!(
        rows(
            &f.db("people.sqlite"),
            "SELECT * FROM people WHERE id >= 10 ORDER BY id"
        ),
        [
            "10|ANN/\"); evil(); (\"|Lisbon",
            "11|BO/\"); evil(); (\"|Oslo",
            "14|ED/\"); evil(); (\"|∅",
        ]
    );
    // A preview of the same job writes nothing.
    let db = f.db("people.sqlite");
    db.execute("DELETE FROM people WHERE id >= 10", []).unwrap();
    let mut req = request("p", "j");
    req.preview = true;
    let r = f.run(&req);
    assert_eq!(r.counters.inserts, 3);
    assert_eq!(
        rows(&db, "SELECT count(*) FROM people WHERE id >= 10"),
        ["0"]
    );
}

#[test]
fn a_script_that_does_not_compile_is_a_load_error_with_its_line() {
    let job = "[origin]\nconnection = \"src\"\n[destination]\nconnection = \"db\"\n[[stages]]\ntable = \"people\"\naction = \"insert\"\nfields = [{ column = \"id\", script = \"row.id +\\n+ )\" }]\n";
    let f = people_fixture(&[("j", job.to_owned())]);
    let problems: Vec<String> = f.load().problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("jobs/j.toml:8: stage 1, column \"id\": the script does not compile"),
        "{}",
        problems[0]
    );
    assert!(problems[0].contains("line 2"), "{}", problems[0]);
}

#[test]
fn go_to_next_row_skips_the_rest_of_the_row_and_counts_a_skip() {
    let job = r#"
[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "people"
action = "update/insert"
fields = [
  { column = "id", origin = "id", match = true },
  { column = "name", script = "UCase(skipIfBlank(row.name))" },
  { column = "city", origin = "city" },
]
[[stages]]
table = "people"
action = "update"
fields = [
  { column = "id", origin = "id", match = true },
  { column = "city", template = "@@ORG:city@@ (@@STG:1,#Action@@)" },
]
"#;
    let f = people_fixture(&[("j", job.to_owned())]);
    f.write(
        "projects/p/in.csv",
        "id,name,city\n20,ann,Oslo\n21,,Rome\n22,cy,Lima\n",
    );
    let r = f.run(&request("p", "j"));
    let c = r.counters;
    assert_eq!(
        (c.total_rows, c.inserts, c.updates, c.skips, c.errors),
        (3, 2, 2, 1, 0),
        "{:?}",
        r.error
    );
    assert_eq!(
        rows(
            &f.db("people.sqlite"),
            "SELECT * FROM people WHERE id >= 20 ORDER BY id"
        ),
        ["20|ANN|Oslo (Insert)", "22|CY|Lima (Insert)"]
    );
}

#[test]
fn script_log_messages_go_to_the_run_log_with_their_row() {
    let job = "[origin]\nconnection = \"src\"\n[destination]\nconnection = \"db\"\n[[stages]]\ntable = \"people\"\naction = \"update/insert\"\nfields = [{ column = \"id\", origin = \"id\", match = true }, { column = \"name\", script = \"log('seen ' + row.name); return row.name;\" }]\n";
    let f = people_fixture(&[("j", job.to_owned())]);
    f.write("projects/p/in.csv", "id,name,city\n30,ann,x\n31,bo,y\n");
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Low;
    let r = f.run(&req);
    let msgs: Vec<(Option<u64>, &str)> = r.jobs[0]
        .log
        .iter()
        .filter(|e| e.message.contains("seen"))
        .map(|e| (e.row, e.message.as_str()))
        .collect();
    assert_eq!(
        msgs,
        [(Some(1), "row 1: seen ann"), (Some(2), "row 2: seen bo")]
    );
}

#[test]
fn variables_scripts_set_and_last_run_date_persist_across_runs() {
    let job = r#"
[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "people"
action = "update/insert"
fields = [
  { column = "id", origin = "id", match = true },
  { column = "name", script = "vars.Counter = (Number(vars.Counter) || 0) + 1; return 'run ' + vars.Counter;" },
  { column = "city", template = "last=@@VAR:LastRunDate@@" },
]
"#;
    let f = people_fixture(&[("j", job.to_owned())]);
    f.write("projects/p/in.csv", "id,name,city\n40,a,b\n");
    let first = f.run(&request("p", "j"));
    assert_eq!(first.status, RunStatus::Complete, "{:?}", first.error);
    let db = f.db("people.sqlite");
    assert_eq!(
        rows(&db, "SELECT name, city FROM people WHERE id = 40"),
        ["run 1|last="]
    );
    // A preview sees the kept values but keeps nothing itself.
    let mut preview = request("p", "j");
    preview.preview = true;
    f.run(&preview);
    f.run(&request("p", "j"));
    let got = rows(&db, "SELECT name, city FROM people WHERE id = 40");
    let start = first.jobs[0]
        .start_time
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
    assert_eq!(got, [format!("run 2|last={start}")]);
}

#[test]
fn a_stage_whose_match_field_has_no_index_says_so() {
    // The rowid, a plain index and a second-column-only index, by match field.
    let cases = [
        (
            "CREATE TABLE people(id INTEGER PRIMARY KEY, name TEXT, city TEXT)",
            false,
        ),
        (
            "CREATE TABLE people(id int, name TEXT, city TEXT); CREATE INDEX p_id ON people(id)",
            false,
        ),
        (
            "CREATE TABLE people(id int, name TEXT, city TEXT); CREATE INDEX p_ni ON people(name, id)",
            true,
        ),
        (
            "CREATE TABLE people(id int PRIMARY KEY, name TEXT, city TEXT)",
            false,
        ),
        ("CREATE TABLE people(id int, name TEXT, city TEXT)", true),
    ];
    for (ddl, noted) in cases {
        let f = Fixture::new();
        f.project(
            "p",
            PEOPLE_PROJECT,
            &[("j", &people_job("update/insert", ""))],
        );
        f.write("projects/p/in.csv", "id,name,city\n1,Ann,Oslo\n");
        f.db("people.sqlite").execute_batch(ddl).unwrap();
        let mut req = request("p", "j");
        req.logging_level = LogLevel::Low;
        let r = f.run(&req);
        assert_eq!(r.counters.inserts, 1, "{ddl}: {:?}", r.error);
        let said = r.jobs[0].log.iter().any(|e| {
            e.message
                .contains("destination \"db\": stage \"update/insert people\": no index on \"people\" starts with a match field (id), so finding matches scans")
        });
        assert_eq!(said, noted, "{ddl}: {:?}", r.jobs[0].log);
    }
}

/// SQLite in the stage-action table every SQL destination runs
/// (tests/common/sql_destination.rs); the fault scenarios there need a
/// server, which an embedded file does not have.
#[test]
fn sqlite_every_stage_action_counts_exactly() {
    common::sql_destination::every_stage_action_counts_exactly(common::databases::SqliteFile::new);
}
