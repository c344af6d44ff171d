//! `tidepool incremental reset` and `tidepool run --reset-incremental`: a
//! job's mark forgotten, so its next run reads everything; and the marks and
//! dropped files a run's report shows.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use tidepool::engine::{self, KeptState, RunReport};
use tidepool::project::Project;
use tidepool::run::FileStatus;
use tidepool::server::StoreLocation;

use super::{Dirs, load, record};

/// `tidepool incremental reset PROJECT JOB`.
#[derive(Args)]
pub struct ResetArgs {
    /// The project's ID.
    project: String,
    /// The job's ID.
    job: String,
    #[command(flatten)]
    dirs: Dirs,
    /// The store that keeps the jobs' state (postgres://… for a cluster);
    /// default: the data dir's `state.sqlite`.
    #[arg(long, env = "TIDEPOOL_STORE")]
    store: Option<String>,
}

/// Forgets a job's mark and says what it was.
pub fn reset(args: ResetArgs) -> anyhow::Result<ExitCode> {
    let loaded = load(&args.dirs.projects, &args.dirs.data_dir);
    let Some(project) = loaded.project(&args.project) else {
        bail!(
            "no project {:?} loaded from {}; run `tidepool validate` for details",
            args.project,
            args.dirs.projects.display()
        );
    };
    let location = record::store_location(args.store.as_deref(), &args.dirs.data_dir, false)?;
    let recorder = match location {
        Some(loc @ StoreLocation::Postgres(_)) => Some(record::Recorder::open(loc)?),
        _ => None,
    };
    reset_job(project, &args.job, recorder.and_then(|r| r.kept_state()))?;
    Ok(ExitCode::SUCCESS)
}

/// Forgets the job's mark in `kept` (None: the data dir's `state.sqlite`) and says so.
pub fn reset_job(
    project: &Project,
    job: &str,
    kept: Option<std::sync::Arc<dyn KeptState>>,
) -> anyhow::Result<()> {
    let before = engine::reset_incremental(project, job, kept)
        .with_context(|| format!("cannot reset the mark of {}/{job}", project.id))?;
    match before {
        Some(m) => println!(
            "{}/{job}: the incremental mark {m} was reset; the next run reads everything",
            project.id
        ),
        None => println!(
            "{}/{job}: no incremental mark was kept; the next run reads everything",
            project.id
        ),
    }
    Ok(())
}

/// The report's incremental marks and dropped files, a line each.
pub fn print_loads(report: &RunReport) {
    for j in &report.jobs {
        if let Some(h) = &j.load.high_water {
            println!(
                "{}: HighWater ({}) {} -> {}{}",
                j.job_id,
                h.field,
                h.before.as_deref().unwrap_or("(none)"),
                h.after.as_deref().unwrap_or("(none)"),
                if h.kept { "" } else { " (not kept)" }
            );
        }
        for f in &j.load.files {
            let status = match f.status {
                FileStatus::Processed => "processed",
                FileStatus::Previewed => "previewed",
                FileStatus::Incomplete => "incomplete",
                FileStatus::Failed => "failed",
                FileStatus::Waiting => "waiting (still being written)",
            };
            let moved = f.moved_to.as_deref().map(|m| format!(", moved to {m}"));
            let error = f.error.as_deref().map(|e| format!(": {e}"));
            println!(
                "{}: file {}: {} rows, {status}{}{}",
                j.job_id,
                f.name,
                f.rows,
                moved.unwrap_or_default(),
                error.unwrap_or_default()
            );
        }
        if j.load.files_not_listed > 0 {
            println!(
                "{}: {} more matching files were already processed or wait for a later run",
                j.job_id, j.load.files_not_listed
            );
        }
    }
}
