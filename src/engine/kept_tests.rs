//! The engine keeps its variables and xref lists where its caller says
//! ([`run_with_state`]), and in `<data dir>/state.sqlite` when it says nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::state::{JobState, KeptState, StateError};
use super::{
    CancelToken, LogLevel, NoObserver, RunReport, RunRequest, RunStatus, run, run_with_state,
};
use crate::project::{LoadOptions, Project, load_project};

/// Kept state in memory, counting the calls it gets.
#[derive(Default)]
struct MemoryState {
    inner: Mutex<Memory>,
    /// Every save is refused as if the run had lost its lease.
    fenced: bool,
}

#[derive(Default)]
struct Memory {
    vars: HashMap<(String, String), BTreeMap<String, String>>,
    xref: HashMap<(String, String, String), String>,
    loads: usize,
    saves: usize,
    xref_gets: usize,
    xref_puts: usize,
}

impl KeptState for MemoryState {
    fn load(&self, project: &str, job: &str) -> Result<BTreeMap<String, String>, StateError> {
        let mut m = self.inner.lock().unwrap();
        m.loads += 1;
        let key = (project.to_owned(), job.to_owned());
        Ok(m.vars.get(&key).cloned().unwrap_or_default())
    }

    fn save(
        &self,
        project: &str,
        job: &str,
        vars: &BTreeMap<String, String>,
    ) -> Result<(), StateError> {
        let mut m = self.inner.lock().unwrap();
        m.saves += 1;
        if self.fenced {
            return Err(StateError::Fenced);
        }
        let key = (project.to_owned(), job.to_owned());
        m.vars.entry(key).or_default().extend(vars.clone());
        Ok(())
    }

    fn xref_get(&self, project: &str, list: &str, key: &str) -> Result<Option<String>, StateError> {
        let mut m = self.inner.lock().unwrap();
        m.xref_gets += 1;
        let k = (project.to_owned(), list.to_owned(), key.to_owned());
        Ok(m.xref.get(&k).cloned())
    }

    fn xref_put(&self, project: &str, entries: &[(&str, &str, &str)]) -> Result<(), StateError> {
        let mut m = self.inner.lock().unwrap();
        m.xref_puts += 1;
        for (list, key, value) in entries {
            let k = (project.to_owned(), (*list).to_owned(), (*key).to_owned());
            m.xref.insert(k, (*value).to_owned());
        }
        Ok(())
    }
}

/// Project `p` in a temporary folder: job `a` reads `in.csv` into table `a`,
/// writing `LastRunDate` into `last` and each id's xref entry; then (chained)
/// job `b` reads the same rows into table `b`, its `note` read from the xref list.
struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    project: Project,
}

const PROJECT: &str = r#"
[connections.src]
kind = "csv"
path = "in.csv"

[connections.db]
kind = "sqlite"
path = "${DATA_DIR}/out.sqlite"
init_sql = [
  "CREATE TABLE IF NOT EXISTS a(id INTEGER PRIMARY KEY, last TEXT)",
  "CREATE TABLE IF NOT EXISTS b(id INTEGER PRIMARY KEY, note TEXT)",
]
"#;

const JOB_A: &str = r#"
next = "b"
[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "a"
action = "update/insert"
fields = [
  { column = "id", origin = "id", match = true },
  { column = "last", script = "xrefWrite('people', String(row.id), 'P-' + row.id); return vars.LastRunDate || 'never'" },
]
"#;

const JOB_B: &str = r#"
[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "b"
action = "update/insert"
fields = [
  { column = "id", origin = "id", match = true },
  { column = "note", script = "xrefRead('people', String(row.id)) || 'none'" },
]
"#;

impl Fixture {
    /// The project, its runs keeping their files in `data` (below the temp dir).
    fn new(data: impl FnOnce(&Path) -> PathBuf) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let proj = dir.path().join("p");
        std::fs::create_dir_all(proj.join("jobs")).unwrap();
        std::fs::write(proj.join("project.toml"), PROJECT).unwrap();
        std::fs::write(proj.join("jobs/a.toml"), JOB_A).unwrap();
        std::fs::write(proj.join("jobs/b.toml"), JOB_B).unwrap();
        std::fs::write(proj.join("in.csv"), "id\n1\n2\n").unwrap();
        let data = data(dir.path());
        let project = load_project(
            &proj,
            &LoadOptions {
                data_dir: data.clone(),
            },
        )
        .unwrap_or_else(|p| panic!("{p:#?}"));
        Fixture {
            _dir: dir,
            data,
            project,
        }
    }

    fn request() -> RunRequest {
        let mut req = RunRequest::new("p", "a");
        req.chain_jobs = true;
        req.logging_level = LogLevel::Medium;
        req
    }

    fn run(&self, kept: Option<Arc<dyn KeptState>>) -> RunReport {
        let req = Self::request();
        run_with_state(&self.project, &req, &CancelToken::new(), &NoObserver, kept).unwrap()
    }

    /// The rows of `table` as `id|value`.
    fn rows(&self, table: &str) -> Vec<String> {
        let db = rusqlite::Connection::open(self.data.join("out.sqlite")).unwrap();
        let sql = match table {
            "a" => "SELECT id || '|' || last FROM a ORDER BY id",
            _ => "SELECT id || '|' || note FROM b ORDER BY id",
        };
        let mut st = db.prepare(sql).unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }
}

fn job_start(report: &RunReport, job: usize) -> String {
    report.jobs[job]
        .start_time
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

#[test]
fn variables_and_xref_lists_go_to_the_given_state_not_the_file() {
    let f = Fixture::new(|d| d.join("data"));
    let mem = Arc::new(MemoryState::default());
    mem.inner.lock().unwrap().vars.insert(
        ("p".into(), "a".into()),
        [(
            "LastRunDate".to_owned(),
            "2001-02-03T04:05:06+00:00".to_owned(),
        )]
        .into(),
    );
    let report = f.run(Some(mem.clone()));
    assert_eq!(report.status, RunStatus::Complete, "{:?}", report.error);
    assert_eq!(report.jobs.len(), 2);
    // Job a saw the LastRunDate the state gave; job b read a's xref entries back.
    assert_eq!(
        f.rows("a"),
        ["1|2001-02-03T04:05:06+00:00", "2|2001-02-03T04:05:06+00:00"]
    );
    assert_eq!(f.rows("b"), ["1|P-1", "2|P-2"]);
    let m = mem.inner.lock().unwrap();
    assert_eq!((m.loads, m.saves, m.xref_puts), (2, 2, 1));
    assert_eq!(m.xref_gets, 2, "job b's host asks the shared state");
    assert_eq!(
        m.vars[&("p".to_owned(), "a".to_owned())]["LastRunDate"],
        job_start(&report, 0)
    );
    assert_eq!(
        m.vars[&("p".to_owned(), "b".to_owned())]["LastRunDate"],
        job_start(&report, 1)
    );
    assert_eq!(
        m.xref[&("p".to_owned(), "people".to_owned(), "2".to_owned())],
        "P-2"
    );
    assert!(
        !f.data.join("state.sqlite").exists(),
        "nothing went to the data dir's state file"
    );
}

#[test]
fn a_fenced_save_fails_the_run_saying_the_lease_was_lost() {
    let f = Fixture::new(|d| d.join("data"));
    let mem = Arc::new(MemoryState {
        fenced: true,
        ..MemoryState::default()
    });
    let report = f.run(Some(mem.clone()));
    let said = "job variables cannot be kept: the run's lease was taken over by another node; \
                its state was not saved";
    assert_eq!(report.status, RunStatus::Failed);
    assert_eq!(report.jobs[0].status, RunStatus::Failed);
    assert_eq!(
        report.error.as_deref(),
        Some(&*format!(
            "job a: {said}; not run: b (it depends on job a, which did not complete)"
        ))
    );
    assert!(report.jobs[0].log.iter().any(|e| e.message == said));
    // The chain stops at the failed job; its rows were written.
    assert_eq!(report.jobs.len(), 1);
    assert_eq!(f.rows("a"), ["1|never", "2|never"]);
    assert_eq!(mem.inner.lock().unwrap().saves, 1);
}

#[test]
fn without_a_state_the_data_dirs_file_keeps_them() {
    let f = Fixture::new(|d| d.join("data"));
    let first = run(
        &f.project,
        &Fixture::request(),
        &CancelToken::new(),
        &NoObserver,
    )
    .unwrap();
    assert_eq!(first.status, RunStatus::Complete, "{:?}", first.error);
    let second = f.run(None);
    assert_eq!(second.status, RunStatus::Complete, "{:?}", second.error);
    let start = job_start(&first, 0);
    assert_eq!(f.rows("a"), [format!("1|{start}"), format!("2|{start}")]);
    assert_eq!(f.rows("b"), ["1|P-1", "2|P-2"]);
    let file = JobState::open(&f.data).unwrap();
    assert_eq!(
        file.load("p", "a").unwrap()["LastRunDate"],
        job_start(&second, 0)
    );
    assert_eq!(
        file.xref_get("p", "people", "1").unwrap().as_deref(),
        Some("P-1")
    );
}

#[test]
fn a_state_file_that_cannot_open_keeps_nothing_and_the_run_goes_on() {
    // state.sqlite is a folder: it cannot be opened as a database.
    let f = Fixture::new(|d| {
        let data = d.join("data");
        std::fs::create_dir_all(data.join("state.sqlite")).unwrap();
        data
    });
    let report = f.run(None);
    assert_eq!(report.status, RunStatus::Complete, "{:?}", report.error);
    for job in &report.jobs {
        let not_kept = job
            .log
            .iter()
            .filter(|e| e.message.starts_with("job variables are not kept: "))
            .count();
        assert_eq!(not_kept, 1, "{:#?}", job.log);
    }
    // Nothing carries over: not LastRunDate, not the xref list from job to job.
    assert_eq!(f.rows("a"), ["1|never", "2|never"]);
    assert_eq!(f.rows("b"), ["1|none", "2|none"]);
}
