//! What jobs keep across runs, in `<data dir>/state.sqlite`, shared by
//! `tidepool run` and `tidepool serve`: each job's variables (`LastRunDate`,
//! and those its scripts set) and each project's cross-reference lists
//! (`xrefWrite`/`xrefRead`).

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, params};

/// The persisted variables of one project's jobs.
pub(crate) struct JobState {
    conn: Connection,
}

impl JobState {
    /// Opens (or creates) the state file in `data_dir`.
    pub(crate) fn open(data_dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(data_dir).map_err(|e| e.to_string())?;
        let conn = Connection::open(data_dir.join("state.sqlite")).map_err(|e| e.to_string())?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS job_variables (
               project TEXT NOT NULL, job TEXT NOT NULL, name TEXT NOT NULL, value TEXT,
               PRIMARY KEY (project, job, name));
             CREATE TABLE IF NOT EXISTS xref (
               project TEXT NOT NULL, list TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
               PRIMARY KEY (project, list, key)) WITHOUT ROWID",
        )
        .map_err(|e| e.to_string())?;
        Ok(JobState { conn })
    }

    /// The job's variables, by name.
    pub(crate) fn load(
        &self,
        project: &str,
        job: &str,
    ) -> Result<BTreeMap<String, String>, String> {
        let mut st = self
            .conn
            .prepare("SELECT name, value FROM job_variables WHERE project = ?1 AND job = ?2")
            .map_err(|e| e.to_string())?;
        let rows = st
            .query_map(params![project, job], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                ))
            })
            .map_err(|e| e.to_string())?;
        rows.collect::<Result<_, _>>().map_err(|e| e.to_string())
    }

    /// Saves `vars` for the job (others it has stay).
    pub(crate) fn save(
        &mut self,
        project: &str,
        job: &str,
        vars: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let tx = self.conn.transaction().map_err(|e| e.to_string())?;
        for (k, v) in vars {
            tx.execute(
                "INSERT INTO job_variables (project, job, name, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (project, job, name) DO UPDATE SET value = excluded.value",
                params![project, job, k, v],
            )
            .map_err(|e| e.to_string())?;
        }
        tx.commit().map_err(|e| e.to_string())
    }

    /// The value `key` maps to in the project's cross-reference list `list`.
    pub(crate) fn xref_get(
        &self,
        project: &str,
        list: &str,
        key: &str,
    ) -> Result<Option<String>, String> {
        let mut st = self
            .conn
            .prepare_cached("SELECT value FROM xref WHERE project = ?1 AND list = ?2 AND key = ?3")
            .map_err(|e| e.to_string())?;
        let mut rows = st
            .query(params![project, list, key])
            .map_err(|e| e.to_string())?;
        match rows.next().map_err(|e| e.to_string())? {
            Some(r) => r.get(0).map_err(|e| e.to_string()),
            None => Ok(None),
        }
    }

    /// Keeps `entries` (list, key, value) in the project's cross-reference lists.
    pub(crate) fn xref_put(
        &mut self,
        project: &str,
        entries: &[(&str, &str, &str)],
    ) -> Result<(), String> {
        let tx = self.conn.transaction().map_err(|e| e.to_string())?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO xref (project, list, key, value) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (project, list, key) DO UPDATE SET value = excluded.value",
                )
                .map_err(|e| e.to_string())?;
            for (list, key, value) in entries {
                st.execute(params![project, list, key, value])
                    .map_err(|e| e.to_string())?;
            }
        }
        tx.commit().map_err(|e| e.to_string())
    }
}
