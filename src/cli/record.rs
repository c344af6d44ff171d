//! `tidepool run` records its runs in the server's store, so the console's
//! history holds them too.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tidepool::engine::{RunReport, RunRequest};
use tidepool::project::Project;
use tidepool::run::Submission;
use tidepool::server::history::{details_of, run_result};
use tidepool::store::{NewRun, RunEnd, RunHistory, RunKey, SqliteStore, Submitted};

/// Where a run is recorded: `--store`, else the data dir's store if one exists.
pub fn store_path(
    store: Option<&str>,
    data_dir: &Path,
    no_record: bool,
) -> anyhow::Result<Option<PathBuf>> {
    if no_record {
        return Ok(None);
    }
    match store {
        Some(url) => {
            let path = url
                .strip_prefix("sqlite:")
                .map(|p| p.trim_start_matches("//"))
                .ok_or_else(|| anyhow::anyhow!("--store {url:?}: use sqlite:PATH"))?;
            Ok(Some(PathBuf::from(path)))
        }
        None => {
            let default = data_dir.join("tidepool.sqlite");
            Ok(default.is_file().then_some(default))
        }
    }
}

/// Records an ended run (its answer, log and row errors) as the server would.
pub fn record(
    path: &Path,
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
    let store = Arc::new(
        SqliteStore::open(path)
            .with_context(|| format!("cannot open the store {}", path.display()))?,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        match store.record_ended(run, report.start_time, end).await? {
            Submitted::Accepted => {}
            _ => anyhow::bail!("run {} is in the store already", req.run_id),
        }
        store.save_details(&key, details_of(report)).await?;
        Ok(())
    })
}
