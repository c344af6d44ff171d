//! Scripts beyond fields: operations at every moment of a run, stage results,
//! the persisted cross-reference lists, lookups, limits; on real files and SQLite.

mod common;

use common::{Fixture, request, rows};
use tidepool::RunReport;
use tidepool::engine::{LogLevel, RunStatus};

const PROJECT: &str = r#"
[connections.src]
kind = "csv"
path = "in.csv"

[connections.db]
kind = "sqlite"
path = "${DATA_DIR}/people.sqlite"

[connections.codes]
kind = "csv"
path = "codes.csv"
"#;

fn fixture(jobs: &[(&str, &str)]) -> Fixture {
    let f = Fixture::new();
    f.project("p", PROJECT, jobs);
    f.write(
        "projects/p/in.csv",
        "id,name,city\n1,Ann,Oslo\n2,Bob,Rome\n3,Cy,Lima\n",
    );
    f.write(
        "projects/p/codes.csv",
        "city,code\nOslo,NO-OSL\nRome,IT-ROM\n",
    );
    let db = f.db("people.sqlite");
    db.execute_batch(
        "CREATE TABLE people(id INTEGER PRIMARY KEY, name TEXT, city TEXT);
         CREATE TABLE cities(name TEXT, code TEXT);
         INSERT INTO cities VALUES ('Oslo', 'OSL'), ('Rome', 'ROM'), ('Rome', 'second');
         CREATE TABLE audit(id INTEGER, note TEXT);",
    )
    .unwrap();
    f
}

fn run(f: &Fixture, job: &str) -> RunReport {
    let mut req = request("p", job);
    req.logging_level = LogLevel::High;
    f.run(&req)
}

/// A job from `src` (in.csv) into `db`: `head` (job keys, each ending in a
/// newline) above `[origin]`, then `body` (operations and stages).
fn job(head: &str, body: &[String]) -> String {
    format!(
        "\n{head}[origin]\nconnection = \"src\"\n[destination]\nconnection = \"db\"\n{}",
        body.concat()
    )
}

/// An `[[operations]]` table running `script` at `when`.
fn op(when: &str, script: &str) -> String {
    op_keyed(when, "", script)
}

/// An `[[operations]]` table with more `keys` (`key = value` lines) between
/// `when` and `script`; a script of several lines goes in triple quotes.
fn op_keyed(when: &str, keys: &str, script: &str) -> String {
    let quote = if script.contains('\n') {
        "\"\"\""
    } else {
        "\""
    };
    format!("[[operations]]\nwhen = \"{when}\"\n{keys}script = {quote}{script}{quote}\n")
}

/// A `[[stages]]` table: its keys (`name`, `table`, `action`) and fields
/// (inline tables), one a line.
fn stage(keys: &[(&str, &str)], fields: &[&str]) -> String {
    let mut t = String::from("[[stages]]\n");
    for (k, v) in keys {
        t.push_str(&format!("{k} = \"{v}\"\n"));
    }
    t.push_str("fields = [\n");
    for f in fields {
        t.push_str(&format!("  {f},\n"));
    }
    t.push_str("]\n");
    t
}

/// Stage keys: into `people`, inserting.
const INSERT_PEOPLE: &[(&str, &str)] = &[("table", "people"), ("action", "insert")];
/// The `id` field from the origin's `id`.
const ID: &str = r#"{ column = "id", origin = "id" }"#;

fn messages(r: &RunReport) -> Vec<String> {
    r.jobs[0].log.iter().map(|e| e.message.clone()).collect()
}

const EVERY_MOMENT: &str = r#"
[origin]
connection = "src"
[destination]
connection = "db"

[[operations]]
when = "once"
script = "log('once'); vars.Seen = 'once'"
[[operations]]
when = "before_connections"
script = "log('before_connections ' + vars.Seen)"
[[operations]]
when = "before_query"
script = "log('before_query ' + event.query)"
[[operations]]
when = "after_query"
script = "log('after_query ' + event.columns.join('+'))"
[[operations]]
when = "before_row"
script = "log('before_row ' + row.id); vars.Rows = (vars.Rows || 0) + 1"
[[operations]]
when = "before_stage"
script = "log('before_stage ' + row.id + ' ' + event.stageNumber + ' ' + event.stage)"
[[operations]]
when = "after_stage"
stage = "people"
script = "log('after_stage ' + row.id + ' ' + stages[event.stageNumber].action)"
[[operations]]
when = "after_row"
script = "log('after_row ' + row.id + ' ' + stages[1].action + ' ' + stages.audit.action)"
[[operations]]
when = "end"
script = "log('end ' + event.counters.inserts + ' rows ' + vars.Rows); returnValue = 'done ' + event.counters.totalRows"

[[stages]]
name = "people"
table = "people"
action = "insert"
fields = [
  { column = "id", origin = "id" },
  { column = "name", script = "row.name + '#' + vars.Rows" },
  { column = "city", origin = "city" },
]

[[stages]]
name = "audit"
table = "audit"
action = "insert"
fields = [
  { column = "id", origin = "id" },
  { column = "note", script = "@@STG:1,#Action@@ + ' ' + stages.people.values.name" },
]
"#;

#[test]
fn operations_run_at_every_moment_in_order() {
    let f = fixture(&[("j", EVERY_MOMENT)]);
    let r = run(&f, "j");
    let job = &r.jobs[0];
    assert_eq!(job.status, RunStatus::Complete, "{:?}", job.error);
    assert_eq!((job.counters.total_rows, job.counters.inserts), (3, 6));
    let log: Vec<String> = messages(&r)
        .into_iter()
        .map(|m| m.split_once(": ").map(|(_, m)| m.to_owned()).unwrap_or(m))
        .filter(|m| {
            ["once", "before_", "after_", "end"]
                .iter()
                .any(|p| m.starts_with(p))
        })
        .collect();
    let mut want = vec![
        "once".to_owned(),
        "before_connections once".into(),
        "before_query in.csv".into(),
        "after_query id+name+city".into(),
    ];
    for id in 1..=3 {
        want.extend([
            format!("before_row {id}"),
            format!("before_stage {id} 1 people"),
            format!("after_stage {id} Insert"),
            format!("before_stage {id} 2 audit"),
            format!("after_row {id} Insert Insert"),
        ]);
    }
    want.push("end 6 rows 3".into());
    assert_eq!(log, want);
    // A field sees the variable its row's before_row set; a later stage sees
    // the earlier stage's action and values.
    let db = f.db("people.sqlite");
    assert_eq!(
        rows(&db, "SELECT id, name FROM people ORDER BY id"),
        ["1|Ann#1", "2|Bob#2", "3|Cy#3"]
    );
    assert_eq!(
        rows(&db, "SELECT id, note FROM audit ORDER BY id"),
        ["1|Insert Ann#1", "2|Insert Bob#2", "3|Insert Cy#3"]
    );
    assert_eq!(job.return_value.as_deref(), Some("done 3"));
}

#[test]
fn before_query_changes_the_origin_query_with_bound_variables() {
    let job = r#"
[origin]
connection = "db"
query = "SELECT name, code FROM cities"
[destination]
connection = "db"
[[operations]]
when = "once"
script = "vars.Wanted = 'Rome'"
[[operations]]
when = "before_query"
script = "return event.query + ' WHERE name = ' + varToken('Wanted')"
[[stages]]
table = "audit"
action = "insert"
fields = [
  { column = "id", value = 7 },
  { column = "note", origin = "code" },
]
"#;
    let f = fixture(&[("j", job)]);
    let r = run(&f, "j");
    assert_eq!(
        r.jobs[0].status,
        RunStatus::Complete,
        "{:?}",
        r.jobs[0].error
    );
    assert_eq!(r.jobs[0].counters.inserts, 2);
    let db = f.db("people.sqlite");
    assert_eq!(
        rows(&db, "SELECT note FROM audit ORDER BY note"),
        ["ROM", "second"]
    );
}

#[test]
fn on_row_error_sees_the_error_and_may_suppress_it() {
    let job = job(
        "",
        &[
            op(
                "on_row_error",
                "\nlog('saw ' + event.error + ' in ' + event.stage);\nreturn row.id === '2';\n",
            ),
            stage(
                &[
                    ("name", "people"),
                    ("table", "people"),
                    ("action", "insert"),
                ],
                &[
                    ID,
                    r#"{ column = "name", script = "if (row.id !== '1') throw new Error('no ' + row.id); return row.name" }"#,
                ],
            ),
        ],
    );
    let f = fixture(&[("j", &job)]);
    let r = run(&f, "j");
    let job = &r.jobs[0];
    // Row 2's error is suppressed: neither counted nor logged as an error;
    // row 3's is counted.
    assert_eq!(
        (
            job.counters.total_rows,
            job.counters.inserts,
            job.counters.errors
        ),
        (3, 1, 1)
    );
    let log = messages(&r);
    assert!(
        log.iter().any(
            |m| m.contains("saw column \"name\": the script failed: no 2")
                && m.contains("in people")
        ),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|m| m.starts_with("row 3, stage 1 (people)")),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|m| m.starts_with("row 2, stage 1")),
        "{log:#?}"
    );
}

#[test]
fn go_to_next_row_in_an_operation_skips_the_row() {
    let job = job(
        "",
        &[
            op("before_row", "if (row.city === 'Rome') gotoNextRow();"),
            stage(
                INSERT_PEOPLE,
                &[ID, r#"{ column = "name", origin = "name" }"#],
            ),
        ],
    );
    let f = fixture(&[("j", &job)]);
    let r = run(&f, "j");
    let c = &r.jobs[0].counters;
    assert_eq!((c.total_rows, c.inserts, c.skips), (3, 2, 1));
    let db = f.db("people.sqlite");
    assert_eq!(rows(&db, "SELECT id FROM people ORDER BY id"), ["1", "3"]);
}

#[test]
fn an_operation_that_fails_before_the_rows_fails_the_job_with_its_line() {
    let job = job(
        "",
        &[
            op("once", "throw new Error('not today')"),
            stage(INSERT_PEOPLE, &[ID]),
        ],
    );
    let f = fixture(&[("j", &job)]);
    let r = run(&f, "j");
    assert_eq!(r.jobs[0].status, RunStatus::Failed);
    let e = r.jobs[0].error.clone().unwrap();
    assert!(
        e.contains("operation once (line 6)") && e.contains("not today"),
        "{e}"
    );
    let db = f.db("people.sqlite");
    assert!(rows(&db, "SELECT id FROM people").is_empty());
}

#[test]
fn xref_lists_persist_across_runs_and_jobs_but_not_from_a_preview() {
    let write = job(
        "",
        &[stage(
            INSERT_PEOPLE,
            &[
                ID,
                r#"{ column = "name", script = "xrefWrite('people', row.id, 'P-' + row.id); return xrefRead('people', row.id)" }"#,
            ],
        )],
    );
    let read = job(
        "",
        &[stage(
            &[("table", "audit"), ("action", "insert")],
            &[
                ID,
                r#"{ column = "note", script = "xrefRead('people', @@ORG:id@@) || 'none'" }"#,
            ],
        )],
    );
    let f = fixture(&[("write", &write), ("read", &read)]);
    // A preview writes nothing, and keeps no xref entries.
    let mut preview = request("p", "write");
    preview.preview = true;
    let r = f.run(&preview);
    assert_eq!(r.jobs[0].counters.inserts, 3, "{:?}", r.jobs[0].error);
    let r = run(&f, "read");
    assert_eq!(r.jobs[0].counters.inserts, 3);
    let db = f.db("people.sqlite");
    assert_eq!(
        rows(&db, "SELECT note FROM audit ORDER BY id"),
        ["none", "none", "none"]
    );
    db.execute("DELETE FROM audit", []).unwrap();

    // Within a run a write is read back at once; afterwards another job reads it.
    let r = run(&f, "write");
    assert_eq!(
        r.jobs[0].status,
        RunStatus::Complete,
        "{:?}",
        r.jobs[0].error
    );
    assert_eq!(
        rows(&db, "SELECT name FROM people ORDER BY id"),
        ["P-1", "P-2", "P-3"]
    );
    let r = run(&f, "read");
    assert_eq!(
        r.jobs[0].status,
        RunStatus::Complete,
        "{:?}",
        r.jobs[0].error
    );
    assert_eq!(
        rows(&db, "SELECT note FROM audit ORDER BY id"),
        ["P-1", "P-2", "P-3"]
    );
}

#[test]
fn lookups_find_values_in_sqlite_and_csv_connections_with_a_run_cache() {
    let job = job(
        "",
        &[stage(
            INSERT_PEOPLE,
            &[
                ID,
                r#"{ column = "name", script = "lookup('db', 'cities', 'code', {name: row.city}) || 'unknown'" }"#,
                r#"{ column = "city", script = "lookup('codes', '', 'code', {city: row.city})" }"#,
            ],
        )],
    );
    let f = fixture(&[("j", &job)]);
    f.write(
        "projects/p/in.csv",
        "id,name,city\n1,Ann,Oslo\n2,Bob,Rome\n3,Cy,Lima\n4,Di,Oslo\n",
    );
    let r = run(&f, "j");
    let job = &r.jobs[0];
    assert_eq!(job.status, RunStatus::Complete, "{:?}", job.error);
    let db = f.db("people.sqlite");
    // The first matching row answers; no match is NULL.
    assert_eq!(
        rows(&db, "SELECT id, name, city FROM people ORDER BY id"),
        [
            "1|OSL|NO-OSL",
            "2|ROM|IT-ROM",
            "3|unknown|∅",
            "4|OSL|NO-OSL"
        ]
    );
    let log = messages(&r);
    assert!(
        log.iter()
            .any(|m| m == "lookups: 8, 2 answered from the run's cache"),
        "{log:#?}"
    );
}

#[test]
fn a_lookup_that_cannot_be_answered_is_a_row_error_naming_the_problem() {
    let job = job(
        "",
        &[stage(
            INSERT_PEOPLE,
            &[
                ID,
                r#"{ column = "name", script = "row.id === '1' ? lookup(['no', 'pe'].join(''), 't', 'f', {a: 1}) : row.id === '2' ? lookup('db', 'missing', 'code', {name: row.city}) : lookup('db', 'cities', 'code', row.city)" }"#,
            ],
        )],
    );
    let f = fixture(&[("j", &job)]);
    let r = run(&f, "j");
    assert_eq!(r.jobs[0].counters.errors, 3);
    let log = messages(&r).join("\n");
    assert!(
        log.contains("lookup: the project has no connection \"nope\""),
        "{log}"
    );
    assert!(log.contains("no such table: missing"), "{log}");
    assert!(
        log.contains("row 3, stage 1") && log.contains("lookup: the criteria must be an object"),
        "{log}"
    );
}

#[test]
fn script_limits_are_configurable_per_job() {
    let job = job(
        "script_time_limit_ms = 50\n",
        &[stage(
            INSERT_PEOPLE,
            &[
                ID,
                r#"{ column = "name", script = "if (row.id === '2') { while (true) {} } return row.name" }"#,
            ],
        )],
    );
    let f = fixture(&[("j", &job)]);
    let t = std::time::Instant::now();
    let r = run(&f, "j");
    // Without the limit the loop never ends; the bound is generous so that a
    // busy machine does not fail the test, and the log says the limit struck.
    assert!(t.elapsed() < std::time::Duration::from_secs(60));
    let c = &r.jobs[0].counters;
    assert_eq!((c.inserts, c.errors), (2, 1));
    assert!(
        messages(&r)
            .iter()
            .any(|m| m.contains("ran longer than 50 ms")),
        "{:#?}",
        messages(&r)
    );
}

#[test]
fn broken_operations_are_load_errors_with_their_line() {
    let job = job(
        "script_memory_limit_mb = 0\n",
        &[
            op_keyed("after_stage", "stage = \"nope\"\n", "log(1)"),
            op_keyed("before_row", "stage = 1\n", "log(1)"),
            op("end", "log(("),
            stage(
                INSERT_PEOPLE,
                &[
                    ID,
                    r#"{ column = "name", script = "lookup('crm', 'accounts', 'id', {name: row.name})" }"#,
                ],
            ),
        ],
    );
    let f = fixture(&[("j", &job)]);
    let problems: Vec<String> = f.load().problems.iter().map(|p| p.to_string()).collect();
    let all = problems.join("\n");
    assert!(
        all.contains("j.toml:2: script_memory_limit_mb must be"),
        "{all}"
    );
    assert!(
        all.contains("j.toml:7: operation after_stage: stage \"nope\" is not a stage of this job"),
        "{all}"
    );
    assert!(
        all.contains("j.toml:11: operation before_row: only before_stage and after_stage"),
        "{all}"
    );
    assert!(
        all.contains("j.toml:15: operation end: the script does not compile"),
        "{all}"
    );
    assert!(
        all.contains("j.toml:23: stage 1, column \"name\": unknown connection \"crm\"; project.toml defines: codes, db, src"),
        "{all}"
    );
    let bad_when = f.write(
        "projects/p/jobs/j.toml",
        "[origin]\nconnection = \"src\"\n[[operations]]\nwhen = \"sometimes\"\nscript = \"1\"\n",
    );
    let problems: Vec<String> = f.load().problems.iter().map(|p| p.to_string()).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains(&bad_when.display().to_string()) && p.contains("sometimes")),
        "{problems:#?}"
    );
}

#[test]
fn a_replayed_batch_logs_and_runs_row_operations_once_per_row_outcome() {
    let job = job(
        "",
        &[
            op("after_row", "log('after ' + row.id)"),
            stage(
                INSERT_PEOPLE,
                &[
                    ID,
                    r#"{ column = "name", script = "log('map ' + row.id); return row.name" }"#,
                ],
            ),
        ],
    );
    let f = fixture(&[("j", &job)]);
    // RAISE(ROLLBACK) undoes the whole batch: it is replayed row by row.
    f.db("people.sqlite")
        .execute_batch(
            "CREATE TRIGGER no_bob BEFORE INSERT ON people WHEN NEW.name = 'Bob'
             BEGIN SELECT RAISE(ROLLBACK, 'no Bob'); END;",
        )
        .unwrap();
    let r = run(&f, "j");
    let c = &r.jobs[0].counters;
    assert_eq!((c.total_rows, c.inserts, c.errors), (3, 2, 1));
    let log = messages(&r);
    assert!(log.iter().any(|m| m.contains("replaying")), "{log:#?}");
    for id in 1..=3 {
        let maps = log
            .iter()
            .filter(|m| *m == &format!("row {id}: map {id}"))
            .count();
        assert_eq!(maps, 1, "row {id}: {log:#?}");
    }
    // The failed row ran no after_row; the others ran it once (the outcome that counts).
    let afters: Vec<&String> = log.iter().filter(|m| m.contains(": after ")).collect();
    assert_eq!(afters, ["row 1: after 1", "row 3: after 3"], "{log:#?}");
}

#[test]
fn row_operations_with_four_threads_give_the_same_rows_and_counts() {
    let job = |threads: &str| {
        let name = format!(r#"{{ column = "name", script = "'n' + row.id + '-{threads}'" }}"#);
        job(
            "",
            &[
                op("before_stage", "if (row.id % 7 === 0) gotoNextRow();"),
                stage(
                    &[("table", "people"), ("action", "update/insert")],
                    &[
                        r#"{ column = "id", origin = "id", match = true }"#,
                        &name,
                        r#"{ column = "city", script = "String(stages[1].action)" }"#,
                    ],
                ),
            ],
        )
    };
    let f = fixture(&[("one", &job("1")), ("four", &job("4"))]);
    let mut csv = String::from("id,name,city\n");
    for i in 1..=2000 {
        csv.push_str(&format!("{i},x,y\n"));
    }
    f.write("projects/p/in.csv", csv);
    let mut counts = Vec::new();
    for (name, threads) in [("one", 1), ("four", 4)] {
        let mut req = request("p", name);
        req.thread_count = threads;
        let r = f.run(&req);
        let c = r.jobs[0].counters;
        counts.push((c.total_rows, c.inserts + c.updates, c.skips, c.errors));
    }
    assert_eq!(counts[0], (2000, 1715, 285, 0));
    assert_eq!(counts[0], counts[1]);
    let db = f.db("people.sqlite");
    // Stage 1 had not run when its own field was mapped: the action is null.
    assert_eq!(
        rows(
            &db,
            "SELECT count(*), min(name), max(city) FROM people WHERE name LIKE '%-4'"
        ),
        ["1715|n1-4|null"]
    );
}
