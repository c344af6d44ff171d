//! Loading and validating project files: every problem with file, line and reason.

mod common;

use common::Fixture;
use tidepool::engine;

const CONNS: &str = r#"
[connections.src]
kind = "csv"
path = "in.csv"

[connections.db]
kind = "sqlite"
path = "${DATA_DIR}/t.sqlite"
init_sql = ["CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, name TEXT)"]
"#;

const GOOD_JOB: &str = r#"[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "t"
action = "update/insert"
fields = [
  { column = "id", origin = "id", match = true },
  { column = "name", origin = "name" },
]
"#;

fn messages(f: &Fixture) -> Vec<String> {
    f.load().problems.iter().map(|p| p.to_string()).collect()
}

#[test]
fn a_good_project_loads_and_its_connections_check_out() {
    let f = Fixture::new();
    f.project("p", CONNS, &[("j", GOOD_JOB)]);
    f.write("projects/p/in.csv", "id,name\n1,a\n");
    let loaded = f.load();
    assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
    let p = loaded.project("p").unwrap();
    assert_eq!(p.jobs.len(), 1);
    let check = engine::check_connections(p);
    assert!(
        check.problems.is_empty() && check.notes.is_empty(),
        "{check:?}"
    );
    // Checking created nothing.
    assert!(!f.data.join("t.sqlite").exists());
}

#[test]
fn bad_toml_names_file_and_line() {
    let f = Fixture::new();
    f.project(
        "p",
        CONNS,
        &[("j", "[origin]\nconnection = \"src\"\n[[stages]\n")],
    );
    let m = messages(&f);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].contains("projects/p/jobs/j.toml:3:"), "{}", m[0]);
}

#[test]
fn unknown_connection_and_misspelt_keys_are_reported_with_lines() {
    let f = Fixture::new();
    let job = GOOD_JOB.replace("connection = \"db\"", "connection = \"dbb\"");
    let typo = GOOD_JOB.replace("match = true", "mtach = true");
    f.project("p", CONNS, &[("a", &job), ("b", &typo)]);
    let m = messages(&f);
    assert!(
        m.iter().any(|m| m
            .contains("jobs/a.toml:4: unknown connection \"dbb\"; project.toml defines: db, src")),
        "{m:#?}"
    );
    assert!(
        m.iter()
            .any(|m| m.contains("jobs/b.toml:") && m.contains("unknown field `mtach`")),
        "{m:#?}"
    );
    assert!(
        f.load().project("p").is_none(),
        "a project with problems does not load"
    );
}

#[test]
fn a_chain_that_loops_is_refused() {
    let f = Fixture::new();
    let a = format!("next = \"b\"\n{GOOD_JOB}");
    let b = format!("next = \"a\"\n{GOOD_JOB}");
    let c = format!("next = \"zzz\"\n{GOOD_JOB}");
    f.project("p", CONNS, &[("a", &a), ("b", &b), ("c", &c)]);
    let m = messages(&f);
    assert!(
        m.iter()
            .any(|m| m.contains("jobs/a.toml:1: the job graph has a cycle: a → b → a")),
        "{m:#?}"
    );
    assert!(
        m.iter()
            .any(|m| m.contains("jobs/c.toml:1: next = \"zzz\": no such job")),
        "{m:#?}"
    );
}

#[test]
fn a_missing_environment_variable_is_named() {
    let f = Fixture::new();
    let conns = CONNS.replace("in.csv", "${TIDEPOOL_TEST_UNSET_VAR}/in.csv");
    f.project("p", &conns, &[("j", GOOD_JOB)]);
    let m = messages(&f);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].contains("project.toml:2: connection \"src\": environment variable TIDEPOOL_TEST_UNSET_VAR is not set"), "{}", m[0]);
}

#[test]
fn stage_rules_are_checked() {
    let f = Fixture::new();
    let no_match = GOOD_JOB.replace("match = true", "match = false");
    let two_sources = GOOD_JOB.replace("origin = \"name\"", "origin = \"name\", value = \"x\"");
    let csv_update = r#"[origin]
connection = "db"
query = "SELECT 1 AS id"
[destination]
connection = "src"
[[stages]]
action = "update"
fields = [{ column = "id", origin = "id", match = true }]
"#;
    let stg_ahead = GOOD_JOB.replace("origin = \"name\"", "template = \"@@STG:1,#Action@@\"");
    let bad_token = GOOD_JOB.replace("origin = \"name\"", "template = \"@@FOO:x@@\"");
    let no_query = "[origin]\nconnection = \"db\"\n[destination]\nconnection = \"db\"\n[[stages]]\ntable = \"t\"\naction = \"insert\"\nfields = [{ column = \"id\", value = 1 }]\n";
    let bad_action = GOOD_JOB.replace("update/insert", "merge");
    f.project(
        "p",
        CONNS,
        &[
            ("a", &no_match),
            ("b", &two_sources),
            ("c", csv_update),
            ("d", &stg_ahead),
            ("e", &bad_token),
            ("f", no_query),
            ("g", &bad_action),
        ],
    );
    let m = messages(&f).join("\n");
    for expected in [
        "jobs/a.toml:5: stage 1: a update/insert stage needs at least one field with match = true",
        "jobs/b.toml:10: stage 1, column \"name\": give exactly one of origin, value, template, function or script",
        "jobs/c.toml:6: stage 1: a csv connection (\"src\") cannot update; it supports: insert",
        "jobs/d.toml:10: stage 1, column \"name\": @@STG:1,#Action@@ reads a stage that has not run yet",
        "jobs/e.toml:10: stage 1, column \"name\": token @@FOO:x@@ has unknown kind",
        "jobs/f.toml:1: origin: connection \"db\" (sqlite) needs origin.query",
        "jobs/g.toml:7: unknown variant `merge`",
    ] {
        assert!(m.contains(expected), "missing {expected:?} in:\n{m}");
    }
}

#[test]
fn connection_checks_find_missing_fields_files_and_columns() {
    let f = Fixture::new();
    let bad_field = GOOD_JOB.replace("origin = \"name\"", "origin = \"Nmae\"");
    let bad_column = GOOD_JOB.replace("column = \"name\"", "column = \"nom\"");
    f.project("p", CONNS, &[("a", &bad_field), ("b", &bad_column)]);
    f.write("projects/p/in.csv", "id,name\n1,a\n");
    let loaded = f.load();
    assert!(loaded.problems.is_empty());
    let m: Vec<String> = engine::check_connections(loaded.project("p").unwrap())
        .problems
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(m.len(), 2, "{m:#?}");
    assert!(
        m[0].contains("the origin has no field \"Nmae\"; it has: id, name"),
        "{}",
        m[0]
    );
    assert!(m[0].contains("line 10 of a.toml"), "{}", m[0]);
    assert!(
        m[1].contains("table \"t\" has no column \"nom\""),
        "{}",
        m[1]
    );

    std::fs::remove_file(f.projects.join("p/in.csv")).unwrap();
    let m = engine::check_connections(f.load().project("p").unwrap()).problems;
    assert!(m[0].to_string().contains("cannot open csv file"), "{m:?}");
}

#[test]
fn one_broken_project_does_not_stop_the_others() {
    let f = Fixture::new();
    f.project("good", CONNS, &[("j", GOOD_JOB)]);
    f.project("bad", "id = [", &[]);
    let loaded = f.load();
    assert_eq!(loaded.projects.len(), 1);
    assert_eq!(loaded.projects[0].id.0, "good");
    assert_eq!(loaded.problems.len(), 1);
    assert!(
        loaded.problems[0]
            .to_string()
            .contains("projects/bad/project.toml:1")
    );
}

#[test]
fn a_match_field_without_an_index_is_a_note_not_a_problem() {
    let f = Fixture::new();
    let conns = CONNS.replace("id INTEGER PRIMARY KEY", "id INTEGER");
    f.project("p", &conns, &[("j", GOOD_JOB)]);
    f.write("projects/p/in.csv", "id,name\n1,a\n");
    let check = engine::check_connections(f.load().project("p").unwrap());
    assert!(check.problems.is_empty(), "{:?}", check.problems);
    let notes: Vec<String> = check.notes.iter().map(|n| n.to_string()).collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("j.toml")
            && notes[0].contains("no index on \"t\" starts with a match field (id)"),
        "{notes:?}"
    );
}
