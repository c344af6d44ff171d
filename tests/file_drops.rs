//! File drops: a CSV origin that names a folder and a pattern. Each run takes
//! the files not processed before, in name order; a file still being written
//! waits; a processed file is moved (or deleted) and never read again; a file
//! whose rows were not all committed stays for the next run. Rows land in
//! SQLite, where the test counts them.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use common::{Fixture, request, rows, until_blocking};
use tidepool::run::FileStatus;
use tidepool::{RunReport, RunStatus};

/// Project `d`, job `drop`: `inbox/*.csv` upserted into SQLite table `items`;
/// `origin_keys` are added to its `[origin]`.
fn project(f: &Fixture, origin_keys: &str, job_keys: &str) {
    f.project(
        "d",
        "[connections.inbox]\nkind = \"csv\"\npath = \"inbox/*.csv\"\n[connections.dst]\nkind = \"sqlite\"\n\
         path = \"${DATA_DIR}/dst.sqlite\"\ninit_sql = [\"CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, name TEXT)\"]\n",
        &[(
            "drop",
            &format!(
                "{job_keys}\n[origin]\nconnection = \"inbox\"\n{origin_keys}\n[destination]\nconnection = \"dst\"\n\
                 [[stages]]\ntable = \"items\"\naction = \"update/insert\"\n\
                 fields = [{{ column = \"id\", origin = \"id\", match = true, type = \"integer\" }}, {{ column = \"name\", origin = \"name\" }}]\n"
            ),
        )],
    );
    std::fs::create_dir_all(f.projects.join("d/inbox")).unwrap();
}

fn drop_file(f: &Fixture, name: &str, ids: std::ops::RangeInclusive<u32>) {
    let mut csv = String::from("id,name\n");
    for i in ids {
        csv.push_str(&format!("{i},n{i}\n"));
    }
    f.write(&format!("projects/d/inbox/{name}"), csv);
}

fn run(f: &Fixture) -> RunReport {
    f.run(&request("d", "drop"))
}

/// (name, rows, status) of each file in the report.
fn files(r: &RunReport) -> Vec<(String, u64, FileStatus)> {
    r.jobs[0]
        .load
        .files
        .iter()
        .map(|f| (f.name.clone(), f.rows, f.status))
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    n.sort();
    n
}

fn count(f: &Fixture) -> String {
    rows(&f.db("dst.sqlite"), "SELECT COUNT(*) FROM items").remove(0)
}

/// Waits until `file` has not changed for more than `secs`.
fn settled(file: &Path, secs: f64) {
    until_blocking(&format!("{} to settle", file.display()), || {
        let m = std::fs::metadata(file).unwrap().modified().unwrap();
        SystemTime::now()
            .duration_since(m)
            .is_ok_and(|age| age.as_secs_f64() > secs)
    });
}

fn processed(name: &str, rows: u64) -> (String, u64, FileStatus) {
    (name.to_owned(), rows, FileStatus::Processed)
}

#[test]
fn two_complete_files_are_taken_and_moved_while_a_half_written_one_waits() {
    let f = Fixture::new();
    project(&f, "after = { move_to = \"done/\" }\nsettle_secs = 1", "");
    drop_file(&f, "a.csv", 1..=2);
    drop_file(&f, "b.csv", 3..=5);
    let inbox = f.projects.join("d/inbox");
    let c = inbox.join("c.csv");
    std::fs::write(&c, "id,name\n").unwrap();
    // A writer keeps appending to c.csv (a row every 50 ms, at most 400).
    let writing = Arc::new(AtomicBool::new(true));
    let appender = {
        let (writing, c) = (writing.clone(), c.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut n = 0;
            while writing.load(Ordering::SeqCst) && n < 400 {
                let mut file = std::fs::OpenOptions::new().append(true).open(&c).unwrap();
                writeln!(file, "{},c{n}", 100 + n).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            n
        })
    };
    settled(&inbox.join("a.csv"), 1.1);
    settled(&inbox.join("b.csv"), 1.1);
    let r = run(&f);
    assert_eq!(r.status, RunStatus::Complete, "{:#?}", r.jobs[0].log);
    assert_eq!(r.jobs[0].counters.total_rows, 5);
    assert_eq!(
        files(&r),
        [
            processed("a.csv", 2),
            processed("b.csv", 3),
            ("c.csv".into(), 0, FileStatus::Waiting)
        ]
    );
    assert_eq!(count(&f), "5");
    assert_eq!(names(&inbox), ["c.csv"]);
    assert_eq!(names(&f.projects.join("d/done")), ["a.csv", "b.csv"]);
    let moved = r.jobs[0].load.files[0].moved_to.clone().unwrap();
    assert!(moved.ends_with("done/a.csv"), "{moved}");

    // The writer finishes; once c.csv has settled, the next run takes it alone.
    writing.store(false, Ordering::SeqCst);
    let written = appender.join().unwrap() as u64;
    settled(&c, 1.1);
    let r = run(&f);
    assert_eq!(files(&r), [processed("c.csv", written)]);
    assert_eq!(r.jobs[0].counters.total_rows, written);
    assert_eq!(count(&f), (5 + written).to_string());
    assert!(names(&inbox).is_empty());

    // Nothing new: a run with no files completes with 0 rows.
    let r = run(&f);
    assert_eq!(r.status, RunStatus::Complete);
    assert_eq!((r.jobs[0].counters.total_rows, files(&r)), (0, vec![]));

    // A file dropped again under a processed name is new; its move finds the name taken.
    drop_file(&f, "a.csv", 1..=3);
    settled(&inbox.join("a.csv"), 1.1);
    let r = run(&f);
    assert_eq!(files(&r), [processed("a.csv", 3)]);
    assert_eq!(
        names(&f.projects.join("d/done")),
        ["a-1.csv", "a.csv", "b.csv", "c.csv"]
    );
}

#[test]
fn a_file_already_processed_is_not_read_again_and_delete_mode_deletes() {
    let f = Fixture::new();
    // Left in place: recorded by name, size and time, so never read again.
    project(&f, "settle_secs = 0", "");
    drop_file(&f, "a.csv", 1..=2);
    let r = run(&f);
    assert_eq!(files(&r), [processed("a.csv", 2)]);
    let r = run(&f);
    assert_eq!(
        (
            r.jobs[0].counters.total_rows,
            r.jobs[0].load.files_not_listed
        ),
        (0, 1)
    );
    assert_eq!(names(&f.projects.join("d/inbox")), ["a.csv"]);

    // Deleted once processed; a preview reads but neither records nor deletes.
    project(
        &f,
        "settle_secs = 0\npath = \"inbox/new-*.csv\"\nafter = \"delete\"",
        "",
    );
    drop_file(&f, "new-1.csv", 10..=12);
    let mut req = request("d", "drop");
    req.preview = true;
    let r = f.run(&req);
    assert_eq!(files(&r), [("new-1.csv".into(), 3, FileStatus::Previewed)]);
    assert_eq!(names(&f.projects.join("d/inbox")), ["a.csv", "new-1.csv"]);
    let r = run(&f);
    assert_eq!(files(&r), [processed("new-1.csv", 3)]);
    assert_eq!(names(&f.projects.join("d/inbox")), ["a.csv"]);
    assert_eq!(count(&f), "5");
}

#[test]
fn a_file_whose_rows_were_not_all_committed_stays_for_the_next_run() {
    let f = Fixture::new();
    project(
        &f,
        "settle_secs = 0\nafter = { move_to = \"done\" }",
        "halt_on_error = true",
    );
    drop_file(&f, "a.csv", 1..=3);
    f.write("projects/d/inbox/b.csv", "id,name\n4,n4\nfive,n5\n6,n6\n");
    drop_file(&f, "c.csv", 7..=8);
    let r = run(&f);
    assert_eq!(r.status, RunStatus::Failed);
    // How far the reader got past the bad row depends on timing; what landed does not.
    let statuses: Vec<_> = files(&r).into_iter().map(|(n, _, s)| (n, s)).collect();
    assert_eq!(
        statuses,
        [
            ("a.csv".into(), FileStatus::Processed),
            ("b.csv".into(), FileStatus::Incomplete),
            ("c.csv".into(), FileStatus::Incomplete)
        ]
    );
    assert_eq!(names(&f.projects.join("d/inbox")), ["b.csv", "c.csv"]);
    // Fixed, b.csv is read again in full (upserts: no duplicates), with c.csv.
    f.write("projects/d/inbox/b.csv", "id,name\n4,n4\n5,n5\n6,n6\n");
    let r = run(&f);
    assert_eq!(r.status, RunStatus::Complete, "{:#?}", r.jobs[0].log);
    assert_eq!(files(&r), [processed("b.csv", 3), processed("c.csv", 2)]);
    assert_eq!(count(&f), "8");
    assert!(names(&f.projects.join("d/inbox")).is_empty());
}

#[test]
fn max_files_bounds_a_run_and_bad_keys_are_named() {
    let f = Fixture::new();
    project(&f, "settle_secs = 0\nmax_files = 2", "");
    for (i, name) in ["c.csv", "a.csv", "b.csv"].iter().enumerate() {
        let i = i as u32 * 10;
        drop_file(&f, name, i + 1..=i + 2);
    }
    let r = run(&f);
    assert_eq!(files(&r), [processed("a.csv", 2), processed("b.csv", 2)]);
    assert_eq!(r.jobs[0].load.files_not_listed, 1);
    assert_eq!(files(&run(&f)), [processed("c.csv", 2)]);

    project(&f, "settle_secs = -1\nafter = \"shred\"", "");
    let problems: Vec<String> = f.load().problems.iter().map(|p| p.to_string()).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("drop.toml:") && p.contains("origin.after must be")),
        "{problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("origin.settle_secs")),
        "{problems:#?}"
    );
}

#[test]
fn the_processed_files_live_in_a_shared_postgres_store() {
    use tidepool::engine::{CancelToken, NoObserver, run_with_state};
    use tidepool::store::{PgStoreOptions, PostgresStore, Store};
    let name = format!(
        "tp_drops_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let base = common::databases::pg_url();
    let mut admin =
        postgres::Client::connect(&base, postgres::NoTls).expect("PostgreSQL on 127.0.0.1:5432");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt
        .block_on(PostgresStore::connect(&url, PgStoreOptions::default()))
        .unwrap();
    let kept = store.kept_state(None).expect("a shared store keeps state");

    let f = Fixture::new();
    project(&f, "settle_secs = 0\nafter = \"delete\"", "");
    drop_file(&f, "a.csv", 1..=2);
    let loaded = f.load();
    let project = loaded.project("d").unwrap();
    let req = request("d", "drop");
    let run = || {
        run_with_state(
            project,
            &req,
            &CancelToken::new(),
            &NoObserver,
            Some(kept.clone()),
        )
        .unwrap()
    };
    assert_eq!(files(&run()), [processed("a.csv", 2)]);
    let marks = kept.processed_files("d", "drop").unwrap();
    assert_eq!(
        (marks.len(), marks[0].name.as_str(), marks[0].size),
        (1, "a.csv", 18)
    );
    // The next run reads the new file alone.
    drop_file(&f, "b.csv", 3..=4);
    let path = f.projects.join("d/inbox/b.csv");
    let r = run();
    assert_eq!(files(&r), [processed("b.csv", 2)]);
    assert!(!path.exists());
    // A mark is forgotten there too (a reset).
    let vars = std::collections::BTreeMap::from([("HighWater".to_owned(), "5".to_owned())]);
    kept.save("d", "drop", &vars).unwrap();
    kept.forget("d", "drop", &["HighWater"]).unwrap();
    assert!(!kept.load("d", "drop").unwrap().contains_key("HighWater"));
    // Nothing in the data dir's state file: it all lives in the store.
    let local = rusqlite::Connection::open(f.data.join("state.sqlite"))
        .and_then(|c| {
            c.query_row("SELECT COUNT(*) FROM processed_files", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .unwrap_or(0);
    assert_eq!(local, 0);
    drop(kept);
    drop(store);
    drop(rt);
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .unwrap();
}
