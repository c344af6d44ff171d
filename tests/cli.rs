//! The `tidepool` binary, driven as a user would from a shell.

mod common;

use std::process::{Command, Output};

use common::Fixture;

fn tidepool(args: &[&str], f: &Fixture) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(args)
        .current_dir(&f.root)
        .env_remove("TIDEPOOL_PROJECTS")
        .env_remove("TIDEPOOL_DATA_DIR")
        .output()
        .expect("run tidepool")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// A fixture whose runs use the repository's projects in place, data in the temp dir.
fn with_demo() -> Fixture {
    Fixture::new()
}

#[test]
fn run_demo_with_chain_prints_a_summary_and_exits_zero() {
    let f = with_demo();
    let projects = common::repo_projects().to_str().unwrap().to_owned();
    let out = tidepool(
        &[
            "run",
            "demo",
            "contacts",
            "--chain",
            "--projects",
            &projects,
            "--data-dir",
            "d",
        ],
        &f,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains(": Complete"), "{stdout}");
    let contacts = stdout.lines().find(|l| l.starts_with("contacts ")).unwrap();
    let cells: Vec<&str> = contacts.split_whitespace().collect();
    assert_eq!(
        &cells[..9],
        [
            "contacts", "Complete", "1000", "997", "0", "0", "3", "0", "0"
        ]
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("countries ")),
        "{stdout}"
    );
    assert!(
        stdout.contains("row 101, stage 1 (upsert contacts)"),
        "{stdout}"
    );
    // No progress bar when stderr is not a terminal.
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    assert!(f.root.join("d/countries.csv").exists());
}

#[test]
fn run_json_report_and_preview() {
    let f = with_demo();
    let projects = common::repo_projects().to_str().unwrap().to_owned();
    let out = tidepool(
        &[
            "run",
            "demo",
            "contacts",
            "--json",
            "--preview",
            "--projects",
            &projects,
            "--data-dir",
            "d",
            "--begin-at-row",
            "11",
            "--end-after-row",
            "20",
            "--run-id",
            "0b5bd1c9-7c2e-4f2e-9a51-3c4f7d0e8a11",
        ],
        &f,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["runID"], "0b5bd1c9-7c2e-4f2e-9a51-3c4f7d0e8a11");
    assert_eq!(report["status"], "Complete");
    assert_eq!(report["totalRows"], 10);
    assert_eq!(report["jobs"][0]["inserts"], 10);
    assert!(
        !f.root.join("d/demo.sqlite").exists(),
        "preview wrote the database"
    );
}

#[test]
fn a_failed_run_exits_one_and_an_unknown_project_exits_two() {
    let f = Fixture::new();
    f.project(
        "p",
        "[connections.src]\nkind = \"csv\"\npath = \"missing.csv\"\n[connections.out]\nkind = \"csv\"\npath = \"out.csv\"\n",
        &[(
            "j",
            "[origin]\nconnection = \"src\"\n[destination]\nconnection = \"out\"\n[[stages]]\naction = \"insert\"\nfields = [{ column = \"a\", origin = \"a\" }]\n",
        )],
    );
    let out = tidepool(&["run", "p", "j"], &f);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("Failed") && stdout.contains("missing.csv"),
        "{stdout}"
    );

    let out = tidepool(&["run", "nope", "j"], &f);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("no project \"nope\"") && stderr.contains("loaded: p"),
        "{stderr}"
    );
}

#[test]
fn a_failed_run_says_which_row_to_go_on_from() {
    let f = Fixture::new();
    let rows: String = (1..=10).map(|i| format!("{i},n{i}\n")).collect();
    let project = "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n\
        [connections.db]\nkind = \"sqlite\"\npath = \"${DATA_DIR}/t.sqlite\"\n\
        init_sql = [\"CREATE TABLE IF NOT EXISTS t(id INTEGER CHECK (id < 5), name TEXT)\", \
        \"CREATE TABLE IF NOT EXISTS u(id INTEGER CHECK (id < 3))\"]\n";
    // A SQL origin without ORDER BY: its rows have no order to go on from.
    let unordered = "halt_on_error = true\n[origin]\nconnection = \"db\"\nquery = \"SELECT id FROM t\"\n\
        [destination]\nconnection = \"db\"\n[[stages]]\ntable = \"u\"\naction = \"insert\"\n\
        fields = [{ column = \"id\", origin = \"id\" }]\n";
    let job = "halt_on_error = true\nbatch_size = 2\n[origin]\nconnection = \"src\"\n\
        [destination]\nconnection = \"db\"\n[[stages]]\ntable = \"t\"\naction = \"insert\"\n\
        fields = [{ column = \"id\", origin = \"id\" }, { column = \"name\", origin = \"name\" }]\n";
    f.project("p", project, &[("j", job), ("k", unordered)]);
    std::fs::write(f.root.join("projects/p/in.csv"), format!("id,name\n{rows}")).unwrap();
    let out = tidepool(&["run", "p", "j", "--data-dir", "data"], &f);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            "job j stopped before origin row 5: to go on from there, run `tidepool run p j --begin-at-row 5`"
        ),
        "{stdout}"
    );
    // Rows 5 and on fixed, the hint's command lands the rest.
    let fixed: String = (1..=10).map(|i| format!("{},n{i}\n", i.min(4))).collect();
    std::fs::write(
        f.root.join("projects/p/in.csv"),
        format!("id,name\n{fixed}"),
    )
    .unwrap();
    let out = tidepool(
        &["run", "p", "j", "--data-dir", "data", "--begin-at-row", "5"],
        &f,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let db = rusqlite::Connection::open(f.data.join("t.sqlite")).unwrap();
    let n: i64 = db
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 10, "rows 1-4, then 5-10, each once");
    let again = tidepool(&["run", "p", "j", "--data-dir", "data"], &f);
    assert!(!text(&again.stdout).contains("stopped before"));
    let out = tidepool(&["run", "p", "k", "--data-dir", "data"], &f);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("job k stopped before origin row 3, but it cannot go on from there (")
            && stdout.contains("ORDER BY")
            && stdout.contains("run it again whole"),
        "{stdout}"
    );
}

#[test]
fn validate_reports_problems_with_lines_and_exits_one() {
    let f = Fixture::new();
    f.project(
        "p",
        "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n",
        &[("j", "[origin]\nconnection = \"nope\"\n")],
    );
    let out = tidepool(&["validate"], &f);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("jobs/j.toml:2: unknown connection \"nope\""),
        "{stdout}"
    );
    assert!(stdout.contains("problem(s)"), "{stdout}");

    let projects = common::repo_projects().to_str().unwrap().to_owned();
    let out = tidepool(&["validate", &projects, "--data-dir", "d"], &f);
    assert!(out.status.success(), "{}", text(&out.stdout));
    // Every project of the repository loads (demo, sync, …).
    let n = std::fs::read_dir(&projects)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("project.toml").is_file())
        .count();
    assert!(
        text(&out.stdout).starts_with(&format!("ok: {n} project(s), ")),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn keys_are_listed_revoked_and_go_with_their_user() {
    let f = with_demo();
    let data = f.data.to_str().unwrap().to_owned();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--data-dir", &data]);
        let mut c = Command::new(env!("CARGO_BIN_EXE_tidepool"));
        c.args(&all)
            .current_dir(&f.root)
            .env("TIDEPOOL_PASSWORD", "long-enough-1");
        c.output().unwrap()
    };
    for u in ["ann", "bob"] {
        assert!(
            run(&["user", "add", u, "--instance", "default:Full"])
                .status
                .success()
        );
    }
    let key = |u: &str, label: &str| {
        let o = run(&["key", "create", u, "--label", label]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        text(&o.stdout).trim().to_owned()
    };
    let (k1, k2, k3) = (key("ann", "crm"), key("ann", "erp"), key("bob", "ci"));
    let listed = |want: usize| {
        let o = run(&["key", "list"]);
        let out = text(&o.stdout);
        assert_eq!(out.lines().count(), want + 1, "{out}");
        assert!(!out.contains("tpk_"), "keys are never shown again: {out}");
        out
    };
    let out = listed(3);
    assert!(
        out.contains("ann") && out.contains("crm") && out.contains("ci"),
        "{out}"
    );
    // Revoke by the key itself, then by the ID the list prints.
    assert!(run(&["key", "revoke", &k1]).status.success());
    let out = listed(2);
    let erp_id = out
        .lines()
        .find(|l| l.ends_with("erp"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    let o = run(&["key", "revoke", &erp_id[..4]]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("at least 8 characters"));
    assert!(run(&["key", "revoke", &erp_id]).status.success());
    let o = run(&["key", "revoke", &k2]);
    assert_eq!(o.status.code(), Some(2), "revoked twice");
    listed(1);
    // Removing a user takes its keys along.
    assert!(run(&["user", "remove", "bob"]).status.success());
    listed(0);
    let o = run(&["key", "revoke", &k3]);
    assert!(
        text(&o.stderr).contains("no such API key"),
        "{}",
        text(&o.stderr)
    );
    let o = run(&["user", "remove", "bob"]);
    assert!(
        text(&o.stderr).contains("no user \"bob\""),
        "{}",
        text(&o.stderr)
    );
}
