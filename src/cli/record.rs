//! `tidepool run` records its runs in the server's store, so the console's
//! history holds them too.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tidepool::engine::{KeptState, RunReport, RunRequest};
use tidepool::project::Project;
use tidepool::run::Submission;
use tidepool::server::StoreLocation;
use tidepool::server::history::{details_of, run_result};
use tidepool::store::{
    NewRun, PgStoreOptions, PostgresStore, RunEnd, RunKey, SqliteStore, Store, Submitted,
};

/// Where a run is recorded: `--store`, else the data dir's store if one exists.
pub fn store_location(
    store: Option<&str>,
    data_dir: &Path,
    no_record: bool,
) -> anyhow::Result<Option<StoreLocation>> {
    if no_record {
        return Ok(None);
    }
    match store {
        Some(url) => Ok(Some(
            StoreLocation::parse(url).with_context(|| format!("--store {url:?}"))?,
        )),
        None => {
            let default = data_dir.join("tidepool.sqlite");
            Ok(default.is_file().then_some(StoreLocation::Sqlite(default)))
        }
    }
}

/// An open store that `tidepool run` records its run in (and, for a shared
/// store, keeps its jobs' variables and xref lists in).
pub struct Recorder {
    rt: tokio::runtime::Runtime,
    store: Arc<dyn Store>,
    /// Where it is, for messages.
    pub location: StoreLocation,
}

impl Recorder {
    /// Opens the store.
    pub fn open(location: StoreLocation) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let named = || format!("cannot open the store {}", location.redacted());
        let store: Arc<dyn Store> = match &location {
            StoreLocation::Sqlite(path) => Arc::new(SqliteStore::open(path).with_context(named)?),
            StoreLocation::Postgres(url) => Arc::new(
                rt.block_on(PostgresStore::connect(url, PgStoreOptions::default()))
                    .with_context(named)?,
            ),
        };
        Ok(Recorder {
            rt,
            store,
            location,
        })
    }

    /// Where the run's jobs keep their state: the shared store's tables, or
    /// (None) the data dir's `state.sqlite`.
    pub fn kept_state(&self) -> Option<Arc<dyn KeptState>> {
        self.store.kept_state(None)
    }
}

/// Records an ended run (its answer, log and row errors) as the server would.
pub fn record(
    recorder: &Recorder,
    project: &Project,
    req: &RunRequest,
    report: &RunReport,
) -> anyhow::Result<()> {
    let wire = Submission {
        run_id: req.run_id.0,
        project_id: project.id.0.clone(),
        job_id: req.job.0.clone(),
        chain_jobs: req.chain_jobs,
        logging_level: req.logging_level as u8,
        argument: req.argument.clone(),
        begin_at_row: req.begin_at_row,
        end_after_row: req.end_after_row,
        thread_count: req.thread_count,
        web_hook_url: None,
        instance: None,
        resume_at_row: req.resume_at_row,
        continues: None,
    };
    let response = run_result(report, req.logging_level);
    let key = RunKey {
        instance: project.instance.clone(),
        run_id: req.run_id.0,
    };
    let run = NewRun {
        key: key.clone(),
        project_id: wire.project_id.clone(),
        job_id: wire.job_id.clone(),
        request_json: serde_json::to_string(&wire)?,
        fingerprint: wire.fingerprint(),
        webhook_url: None,
        accepted_at: report.start_time,
    };
    let end = RunEnd {
        status: report.status,
        results_json: serde_json::to_string(&response.results)?,
        response_json: serde_json::to_string(&response)?,
        webhook_json: String::new(),
        error: report.error.clone(),
    };
    let store = &recorder.store;
    recorder.rt.block_on(async {
        match store.record_ended(run, report.start_time, end).await? {
            Submitted::Accepted => {}
            _ => anyhow::bail!("run {} is in the store already", req.run_id),
        }
        store.save_details(&key, details_of(report)).await?;
        Ok(())
    })
}
