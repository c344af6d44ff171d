//! Test fixtures: a project folder and a data folder in a temporary directory.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};

use tidepool::engine::{self, CancelToken, RunObserver};
use tidepool::project::{LoadOptions, LoadOutcome, load_projects};
use tidepool::{RunReport, RunRequest};

pub mod databases;
pub mod server;
pub mod sql_destination;
pub mod wait;
pub use server::{ServeBuilder, Server, free_port, get_json, tidepool_cli, tidepool_cli_ok};
pub use wait::{eventually, until, until_blocking, webhook_receiver};

/// A temporary place with `projects/` and `data/`.
pub struct Fixture {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub projects: PathBuf,
    pub data: PathBuf,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_owned();
        let projects = root.join("projects");
        let data = root.join("data");
        std::fs::create_dir_all(&projects).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        Fixture {
            _dir: dir,
            root,
            projects,
            data,
        }
    }

    /// Writes `rel` (below the root) and returns its path.
    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        p
    }

    /// Writes project `id` with its `project.toml` and jobs (`(job id, toml)`).
    pub fn project(&self, id: &str, project_toml: &str, jobs: &[(&str, &str)]) -> PathBuf {
        let dir = self.projects.join(id);
        self.write(&format!("projects/{id}/project.toml"), project_toml);
        for (job, toml) in jobs {
            self.write(&format!("projects/{id}/jobs/{job}.toml"), toml);
        }
        dir
    }

    pub fn load(&self) -> LoadOutcome {
        load_projects(
            &self.projects,
            &LoadOptions {
                data_dir: self.data.clone(),
            },
        )
    }

    /// Loads the projects (failing on any problem) and runs `req`.
    pub fn run(&self, req: &RunRequest) -> RunReport {
        self.run_observed(req, &engine::NoObserver, &CancelToken::new())
    }

    pub fn run_observed(
        &self,
        req: &RunRequest,
        observer: &dyn RunObserver,
        cancel: &CancelToken,
    ) -> RunReport {
        let loaded = self.load();
        assert!(
            loaded.problems.is_empty(),
            "problems: {:#?}",
            loaded.problems
        );
        let project = loaded.project(&req.project.0).expect("project loaded");
        engine::run(project, req, cancel, observer).expect("run starts")
    }

    /// A `tidepool serve` on this fixture's data and projects folders.
    pub fn serve(&self) -> ServeBuilder {
        server::serve(&self.data, &self.projects)
    }

    /// Copies the repository's demo project (`demo`: contacts, countries).
    pub fn copy_demo(&self) {
        let src = repo_projects().join("demo");
        for rel in DEMO_FILES {
            self.write(
                &format!("projects/demo/{rel}"),
                std::fs::read(src.join(rel)).unwrap(),
            );
        }
    }

    /// Project `slow`, job `load`: `rows` CSV rows upserted into SQLite in
    /// batches of 10, so that a run is still going when a test acts on it.
    pub fn slow_project(&self, rows: u32) {
        let mut csv = String::from("id,name\n");
        for i in 1..=rows {
            csv.push_str(&format!("{i},n{i}\n"));
        }
        self.project(
            "slow",
            "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.db]\nkind = \"sqlite\"\npath = \"${DATA_DIR}/slow.sqlite\"\ninit_sql = [\"CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, name TEXT)\"]\n",
            &[(
                "load",
                "batch_size = 10\n[origin]\nconnection = \"src\"\n[destination]\nconnection = \"db\"\n[[stages]]\ntable = \"t\"\naction = \"update/insert\"\nfields = [{ column = \"id\", origin = \"id\", match = true }, { column = \"name\", origin = \"name\" }]\n",
            )],
        );
        self.write("projects/slow/in.csv", csv);
    }

    /// Opens a SQLite database below the data folder.
    pub fn db(&self, name: &str) -> rusqlite::Connection {
        rusqlite::Connection::open(self.data.join(name)).expect("open sqlite")
    }
}

/// The rows of a query, each as text columns joined by `|` (NULL as `∅`).
pub fn rows(conn: &rusqlite::Connection, sql: &str) -> Vec<String> {
    let mut stmt = conn.prepare(sql).unwrap();
    let n = stmt.column_count();
    stmt.query_map([], |r| {
        Ok((0..n)
            .map(|i| match r.get_ref(i).unwrap() {
                rusqlite::types::ValueRef::Null => "∅".to_owned(),
                rusqlite::types::ValueRef::Integer(i) => i.to_string(),
                rusqlite::types::ValueRef::Real(f) => f.to_string(),
                rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                rusqlite::types::ValueRef::Blob(b) => format!("{b:?}"),
            })
            .collect::<Vec<_>>()
            .join("|"))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// A request with defaults for `project`/`job`.
pub fn request(project: &str, job: &str) -> RunRequest {
    RunRequest::new(project, job)
}

/// The files of the demo project that tests copy.
pub const DEMO_FILES: [&str; 4] = [
    "project.toml",
    "jobs/contacts.toml",
    "jobs/countries.toml",
    "data/contacts.csv",
];

/// The repository's own demo project folder.
pub fn repo_projects() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/projects"))
}

/// A TCP proxy to a local server that can be taken down for good:
/// open connections are cut and new ones refused.
pub struct Proxy {
    /// The port to connect to instead of the server's.
    pub port: u16,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    /// Forwards a free loopback port to `upstream` (`host:port`).
    pub fn start(upstream: &'static str) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (d, c) = (down.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if d.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                {
                    let mut c = c.lock().unwrap();
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
        });
        Proxy { port, down, conns }
    }

    /// Cuts every open connection and refuses new ones.
    pub fn take_down(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Starts a thread that connects (`connect`), then polls `count` every 2 ms
/// and, once it passes `threshold`, runs `act` and returns its answer (`None`
/// if the count never got there within 120 s). Returns after the thread has
/// connected, so the run started next cannot finish before it watches.
pub fn when_count_passes<C, T>(
    connect: impl FnOnce() -> C + Send + 'static,
    count: impl Fn(&mut C) -> i64 + Send + 'static,
    threshold: i64,
    act: impl FnOnce(&mut C) -> T + Send + 'static,
) -> std::thread::JoinHandle<Option<T>>
where
    T: Send + 'static,
{
    let (ready, connected) = std::sync::mpsc::channel();
    let watcher = std::thread::spawn(move || {
        let mut c = connect();
        ready.send(()).unwrap();
        // A deadline, not a number of tries: on a busy machine a run takes
        // its time to get going.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::time::Instant::now() < deadline {
            if count(&mut c) > threshold {
                return Some(act(&mut c));
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        None
    });
    connected.recv().unwrap();
    watcher
}

/// The messages of the first job's log entries that name a row.
pub fn row_messages(r: &RunReport) -> Vec<&str> {
    r.jobs[0]
        .log
        .iter()
        .filter(|e| e.row.is_some())
        .map(|e| e.message.as_str())
        .collect()
}

/// `id,name,city` rows 1..=n with name `n{id}` and city `c`.
pub fn people_csv(n: u32) -> String {
    let mut csv = String::from("id,name,city\n");
    for i in 1..=n {
        csv.push_str(&format!("{i},n{i},c\n"));
    }
    csv
}
