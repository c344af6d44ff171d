//! Kept state (job variables, xref lists) in the shared database, each
//! write fenced by the lease of the run that makes it.
//!
//! [`KeptState`] is called from a run's blocking threads. Its calls run on a
//! small runtime of the store's own, with a pool of its own, and the caller
//! waits on a plain channel: nothing here needs the caller's runtime, so a
//! call from a `spawn_blocking` thread (or any thread) cannot deadlock it or
//! panic for being inside one.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use deadpool_postgres::Pool;

use super::{PostgresStore, pool_error};
use crate::engine::{FileMark, KeptState, StateError};
use crate::store::{RunKey, StoreError};

/// The runtime kept-state calls run on, and their pool.
pub(super) struct KeptRuntime {
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
}

impl KeptRuntime {
    /// One worker thread: kept-state calls are few and short.
    pub(super) fn new(pool: Pool) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tidepool-kept-state")
            .enable_all()
            .build()?;
        Ok(KeptRuntime { rt: Some(rt), pool })
    }

    /// Runs `f` on the kept-state runtime and waits for it.
    fn run<T, F>(&self, f: impl FnOnce(Pool) -> F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StateError>> + Send + 'static,
    {
        let Some(rt) = &self.rt else {
            return Err(StateError::Store(Box::new(StoreError::Closed)));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fut = f(self.pool.clone());
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(StateError::Store(Box::new(StoreError::Closed))))
    }
}

impl Drop for KeptRuntime {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's task would panic.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A database failure, as kept state reports it.
fn store_err(e: impl Into<StoreError>) -> StateError {
    StateError::Store(Box::new(e.into()))
}

/// Kept state in the store's database.
struct PgKeptState {
    rt: Arc<KeptRuntime>,
    fence: Option<(RunKey, i64)>,
}

/// In a write's transaction: whether the run still holds the fence's epoch
/// (locking its row, so no takeover commits before this write does).
async fn holds(
    tx: &deadpool_postgres::Transaction<'_>,
    fence: &Option<(RunKey, i64)>,
) -> Result<bool, StateError> {
    let Some((key, epoch)) = fence else {
        return Ok(true);
    };
    let row = tx
        .query_opt(
            "SELECT 1 FROM runs WHERE instance = $1 AND run_id = $2 AND lease_epoch = $3
               AND status = 'Running' FOR SHARE",
            &[&key.instance, &key.run_id, epoch],
        )
        .await
        .map_err(store_err)?;
    Ok(row.is_some())
}

impl KeptState for PgKeptState {
    fn load(&self, project: &str, job: &str) -> Result<BTreeMap<String, String>, StateError> {
        let (p, j) = (project.to_owned(), job.to_owned());
        self.rt.run(move |pool| async move {
            let conn = pool.get().await.map_err(|e| store_err(pool_error(e)))?;
            let rows = conn
                .query(
                    "SELECT name, value FROM job_variables WHERE project = $1 AND job = $2",
                    &[&p, &j],
                )
                .await
                .map_err(store_err)?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
                .collect())
        })
    }

    fn save(
        &self,
        project: &str,
        job: &str,
        vars: &BTreeMap<String, String>,
    ) -> Result<(), StateError> {
        let (p, j, fence) = (project.to_owned(), job.to_owned(), self.fence.clone());
        let (names, values): (Vec<String>, Vec<String>) =
            vars.iter().map(|(k, v)| (k.clone(), v.clone())).unzip();
        self.rt.run(move |pool| async move {
            let mut conn = pool.get().await.map_err(|e| store_err(pool_error(e)))?;
            let tx = conn.transaction().await.map_err(store_err)?;
            if !holds(&tx, &fence).await? {
                return Err(StateError::Fenced);
            }
            tx.execute(
                "INSERT INTO job_variables (project, job, name, value)
                 SELECT $1, $2, n, v FROM unnest($3::text[], $4::text[]) AS u(n, v)
                 ON CONFLICT (project, job, name) DO UPDATE SET value = excluded.value",
                &[&p, &j, &names, &values],
            )
            .await
            .map_err(store_err)?;
            tx.commit().await.map_err(store_err)
        })
    }

    fn xref_get(&self, project: &str, list: &str, key: &str) -> Result<Option<String>, StateError> {
        let (p, l, k) = (project.to_owned(), list.to_owned(), key.to_owned());
        self.rt.run(move |pool| async move {
            let conn = pool.get().await.map_err(|e| store_err(pool_error(e)))?;
            let row = conn
                .query_opt(
                    "SELECT value FROM xref WHERE project = $1 AND list = $2 AND key = $3",
                    &[&p, &l, &k],
                )
                .await
                .map_err(store_err)?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn xref_put(&self, project: &str, entries: &[(&str, &str, &str)]) -> Result<(), StateError> {
        let (p, fence) = (project.to_owned(), self.fence.clone());
        let lists: Vec<String> = entries.iter().map(|e| e.0.to_owned()).collect();
        let keys: Vec<String> = entries.iter().map(|e| e.1.to_owned()).collect();
        let values: Vec<String> = entries.iter().map(|e| e.2.to_owned()).collect();
        self.rt.run(move |pool| async move {
            let mut conn = pool.get().await.map_err(|e| store_err(pool_error(e)))?;
            let tx = conn.transaction().await.map_err(store_err)?;
            if !holds(&tx, &fence).await? {
                return Err(StateError::Fenced);
            }
            // One entry per key (the last wins), as a loop of upserts would leave it.
            tx.execute(
                "INSERT INTO xref (project, list, key, value)
                 SELECT DISTINCT ON (l, k) $1, l, k, v
                 FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS u(l, k, v, n)
                 ORDER BY l, k, n DESC
                 ON CONFLICT (project, list, key) DO UPDATE SET value = excluded.value",
                &[&p, &lists, &keys, &values],
            )
            .await
            .map_err(store_err)?;
            tx.commit().await.map_err(store_err)
        })
    }

    fn forget(&self, project: &str, job: &str, names: &[&str]) -> Result<(), StateError> {
        let (p, j, fence) = (project.to_owned(), job.to_owned(), self.fence.clone());
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        self.rt.run(move |pool| async move {
            let mut conn = pool.get().await.map_err(|e| store_err(pool_error(e)))?;
            let tx = conn.transaction().await.map_err(store_err)?;
            if !holds(&tx, &fence).await? {
                return Err(StateError::Fenced);
            }
            tx.execute(
                "DELETE FROM job_variables WHERE project = $1 AND job = $2 AND name = ANY($3)",
                &[&p, &j, &names],
            )
            .await
            .map_err(store_err)?;
            tx.commit().await.map_err(store_err)
        })
    }

    fn processed_files(&self, project: &str, job: &str) -> Result<Vec<FileMark>, StateError> {
        let (p, j) = (project.to_owned(), job.to_owned());
        self.rt.run(move |pool| async move {
            let conn = pool.get().await.map_err(|e| store_err(pool_error(e)))?;
            let rows = conn
                .query(
                    "SELECT name, size, modified_ns FROM processed_files
                     WHERE project = $1 AND job = $2",
                    &[&p, &j],
                )
                .await
                .map_err(store_err)?;
            Ok(rows
                .iter()
                .map(|r| FileMark {
                    name: r.get(0),
                    size: r.get::<_, i64>(1) as u64,
                    modified_ns: r.get(2),
                })
                .collect())
        })
    }

    fn files_processed(
        &self,
        project: &str,
        job: &str,
        files: &[FileMark],
    ) -> Result<(), StateError> {
        let (p, j, fence) = (project.to_owned(), job.to_owned(), self.fence.clone());
        let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
        let sizes: Vec<i64> = files.iter().map(|f| f.size as i64).collect();
        let times: Vec<i64> = files.iter().map(|f| f.modified_ns).collect();
        self.rt.run(move |pool| async move {
            let mut conn = pool.get().await.map_err(|e| store_err(pool_error(e)))?;
            let tx = conn.transaction().await.map_err(store_err)?;
            if !holds(&tx, &fence).await? {
                return Err(StateError::Fenced);
            }
            tx.execute(
                "INSERT INTO processed_files (project, job, name, size, modified_ns)
                 SELECT DISTINCT ON (n) $1, $2, n, s, t
                 FROM unnest($3::text[], $4::bigint[], $5::bigint[]) WITH ORDINALITY AS u(n, s, t, o)
                 ORDER BY n, o DESC
                 ON CONFLICT (project, job, name) DO UPDATE SET size = excluded.size,
                   modified_ns = excluded.modified_ns, processed_at = now()",
                &[&p, &j, &names, &sizes, &times],
            )
            .await
            .map_err(store_err)?;
            tx.commit().await.map_err(store_err)
        })
    }
}

impl PostgresStore {
    pub(super) fn kept_state_pg(&self, fence: Option<(RunKey, i64)>) -> Arc<dyn KeptState> {
        Arc::new(PgKeptState {
            rt: self.kept.clone(),
            fence,
        })
    }
}
