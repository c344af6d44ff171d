//! What jobs keep across runs, in `<data dir>/state.sqlite`, shared by
//! `tidepool run` and `tidepool serve`: each job's variables (`LastRunDate`,
//! and those its scripts set) and each project's cross-reference lists
//! (`xrefWrite`/`xrefRead`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use rusqlite::{Connection, params};

/// Where jobs keep what they carry from one run to the next: variables
/// (`LastRunDate` and those scripts set) per job, and cross-reference lists
/// per project. The embedded default is `<data dir>/state.sqlite`
/// ([`JobState`]); a store shared by several nodes keeps them in its database,
/// with each write fenced by the lease of the run that makes it.
///
/// Called from the run's blocking threads: implementations may block.
pub trait KeptState: Send + Sync {
    /// The job's variables, by name.
    fn load(&self, project: &str, job: &str) -> Result<BTreeMap<String, String>, StateError>;
    /// Saves `vars` for the job (others it has stay).
    fn save(
        &self,
        project: &str,
        job: &str,
        vars: &BTreeMap<String, String>,
    ) -> Result<(), StateError>;
    /// The value `key` maps to in the project's cross-reference list `list`.
    fn xref_get(&self, project: &str, list: &str, key: &str) -> Result<Option<String>, StateError>;
    /// Keeps `entries` (list, key, value) in the project's cross-reference lists.
    fn xref_put(&self, project: &str, entries: &[(&str, &str, &str)]) -> Result<(), StateError>;
    /// Removes the job's variables named `names` (a reset of its high-water mark).
    fn forget(&self, _project: &str, _job: &str, _names: &[&str]) -> Result<(), StateError> {
        Err(StateError::Unsupported("forgetting variables"))
    }
    /// The dropped files the job has processed (see [`FileMark`]).
    fn processed_files(&self, _project: &str, _job: &str) -> Result<Vec<FileMark>, StateError> {
        Err(StateError::Unsupported("file drops"))
    }
    /// Records `files` as processed by the job (a file of the same name is replaced).
    fn files_processed(
        &self,
        _project: &str,
        _job: &str,
        _files: &[FileMark],
    ) -> Result<(), StateError> {
        Err(StateError::Unsupported("file drops"))
    }
}

/// A dropped file a job processed: by name (in its folder), size and
/// modification time. A file dropped again under the same name with another
/// size or time is new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMark {
    /// The file's name in the drop folder.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its modification time, in nanoseconds since the Unix epoch.
    pub modified_ns: i64,
}

/// A run's kept state (shared by the jobs of its chain), or why the data
/// dir's `state.sqlite` cannot be opened (then nothing is kept).
pub(crate) type RunState = Result<std::sync::Arc<dyn KeptState>, String>;

/// Why kept state cannot be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The data directory cannot be created.
    #[error(transparent)]
    Dir(#[from] std::io::Error),
    /// SQLite refused (busy past the timeout, a full disk, a damaged file).
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// The shared store refused or could not be reached.
    #[error("state store: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// This kind of kept state cannot do it.
    #[error("this state store does not support {0}")]
    Unsupported(&'static str),
    /// The run lost its lease (another node took it over): nothing was written.
    #[error("the run's lease was taken over by another node; its state was not saved")]
    Fenced,
}

impl StateError {
    /// SQLite's extended result code (`SQLITE_BUSY_SNAPSHOT`, `SQLITE_FULL`, …),
    /// when SQLite itself refused.
    // The engine reports state errors as text today; the code is for a caller
    // that tells a busy file (worth retrying) from a damaged one.
    #[allow(dead_code)]
    pub(crate) fn sqlite_code(&self) -> Option<i32> {
        match self {
            StateError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => Some(e.extended_code),
            _ => None,
        }
    }
}

/// The embedded [`KeptState`]: `<data dir>/state.sqlite`, one connection
/// shared by the run's threads (and the jobs of a chain).
pub(crate) struct JobState {
    conn: Mutex<Connection>,
}

impl JobState {
    /// Opens (or creates) the state file in `data_dir`.
    pub(crate) fn open(data_dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(data_dir)?;
        let conn = Connection::open(data_dir.join("state.sqlite"))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS job_variables (
               project TEXT NOT NULL, job TEXT NOT NULL, name TEXT NOT NULL, value TEXT,
               PRIMARY KEY (project, job, name));
             CREATE TABLE IF NOT EXISTS xref (
               project TEXT NOT NULL, list TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
               PRIMARY KEY (project, list, key)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS processed_files (
               project TEXT NOT NULL, job TEXT NOT NULL, name TEXT NOT NULL,
               size INTEGER NOT NULL, modified_ns INTEGER NOT NULL, processed_at TEXT NOT NULL,
               PRIMARY KEY (project, job, name)) WITHOUT ROWID",
        )?;
        Ok(JobState {
            conn: Mutex::new(conn),
        })
    }

    /// The connection. A thread that panicked while it held it left no open
    /// transaction (a dropped one rolls back), so a poisoned lock is taken as is.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl KeptState for JobState {
    fn load(&self, project: &str, job: &str) -> Result<BTreeMap<String, String>, StateError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT name, value FROM job_variables WHERE project = ?1 AND job = ?2",
        )?;
        let rows = st.query_map(params![project, job], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?.unwrap_or_default(),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn save(
        &self,
        project: &str,
        job: &str,
        vars: &BTreeMap<String, String>,
    ) -> Result<(), StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO job_variables (project, job, name, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (project, job, name) DO UPDATE SET value = excluded.value",
            )?;
            for (k, v) in vars {
                st.execute(params![project, job, k, v])?;
            }
        }
        Ok(tx.commit()?)
    }

    fn xref_get(&self, project: &str, list: &str, key: &str) -> Result<Option<String>, StateError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT value FROM xref WHERE project = ?1 AND list = ?2 AND key = ?3",
        )?;
        let mut rows = st.query(params![project, list, key])?;
        match rows.next()? {
            Some(r) => Ok(r.get(0)?),
            None => Ok(None),
        }
    }

    fn xref_put(&self, project: &str, entries: &[(&str, &str, &str)]) -> Result<(), StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO xref (project, list, key, value) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (project, list, key) DO UPDATE SET value = excluded.value",
            )?;
            for (list, key, value) in entries {
                st.execute(params![project, list, key, value])?;
            }
        }
        Ok(tx.commit()?)
    }

    fn forget(&self, project: &str, job: &str, names: &[&str]) -> Result<(), StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for name in names {
            tx.execute(
                "DELETE FROM job_variables WHERE project = ?1 AND job = ?2 AND name = ?3",
                params![project, job, name],
            )?;
        }
        Ok(tx.commit()?)
    }

    fn processed_files(&self, project: &str, job: &str) -> Result<Vec<FileMark>, StateError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT name, size, modified_ns FROM processed_files WHERE project = ?1 AND job = ?2",
        )?;
        let rows = st.query_map(params![project, job], |r| {
            Ok(FileMark {
                name: r.get(0)?,
                size: r.get::<_, i64>(1)? as u64,
                modified_ns: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn files_processed(
        &self,
        project: &str,
        job: &str,
        files: &[FileMark],
    ) -> Result<(), StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO processed_files (project, job, name, size, modified_ns, processed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (project, job, name) DO UPDATE SET size = excluded.size,
                   modified_ns = excluded.modified_ns, processed_at = excluded.processed_at",
            )?;
            let now = chrono::Utc::now().to_rfc3339();
            for f in files {
                st.execute(params![
                    project,
                    job,
                    f.name,
                    f.size as i64,
                    f.modified_ns,
                    now
                ])?;
            }
        }
        Ok(tx.commit()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_statement_keeps_sqlites_code() {
        let dir = tempfile::tempdir().unwrap();
        let state = JobState::open(dir.path()).unwrap();
        // Another connection holds the write lock; this one gives up at once.
        let other = Connection::open(dir.path().join("state.sqlite")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        state
            .conn()
            .busy_timeout(std::time::Duration::ZERO)
            .unwrap();
        let e = state
            .xref_put("p", &[("list", "key", "value")])
            .unwrap_err();
        assert_eq!(e.sqlite_code(), Some(rusqlite::ffi::SQLITE_BUSY));
        assert_eq!(e.to_string(), "database is locked");
        let Err(e) = JobState::open(&dir.path().join("state.sqlite").join("x")) else {
            panic!("a directory under a file cannot be made");
        };
        assert!(matches!(e, StateError::Dir(_)), "{e:?}");
        assert_eq!(e.sqlite_code(), None);
    }

    #[test]
    fn processed_files_and_forgotten_variables_are_kept_per_job() {
        let dir = tempfile::tempdir().unwrap();
        let state = JobState::open(dir.path()).unwrap();
        let mark = |name: &str, size| FileMark {
            name: name.into(),
            size,
            modified_ns: 7,
        };
        state
            .files_processed("p", "j", &[mark("a.csv", 1), mark("b.csv", 2)])
            .unwrap();
        state
            .files_processed("p", "j", &[mark("a.csv", 3)])
            .unwrap();
        let mut got = state.processed_files("p", "j").unwrap();
        got.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(got, vec![mark("a.csv", 3), mark("b.csv", 2)]);
        assert!(state.processed_files("p", "other").unwrap().is_empty());
        let vars = BTreeMap::from([("HighWater".to_owned(), "5".to_owned())]);
        state.save("p", "j", &vars).unwrap();
        state.forget("p", "j", &["HighWater"]).unwrap();
        assert!(state.load("p", "j").unwrap().is_empty());
    }
}
