//! One run: a [`RunRequest`] in, a [`RunReport`] out.
//!
//! A run executes a job (and, with `chain_jobs`, the jobs its `next` names):
//! one reader streams origin rows in batches through a bounded channel to
//! `thread_count` writers, each with its own destination connection. Each
//! batch is one transaction; a batch that fails is replayed row by row so only
//! the bad rows count as errors. Counters are exact and live.

mod host;
mod job;
mod mapping;
mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, FixedOffset, Local};
use serde::{Serialize, Serializer};

use crate::project::{JobId, Problem, Project, ProjectId};
pub use crate::run::{Counters, RunId, RunStatus};

/// How much a run logs: 0 = None, 1 = Low, 2 = Medium, 3 = High.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize)]
pub enum LogLevel {
    /// Nothing.
    #[default]
    None = 0,
    /// Start, end and errors.
    Low = 1,
    /// Plus per-stage summaries and warnings.
    Medium = 2,
    /// Plus every row's actions.
    High = 3,
}

impl LogLevel {
    /// The level for a number; above 3 means High.
    pub fn from_number(n: u64) -> Self {
        match n {
            0 => LogLevel::None,
            1 => LogLevel::Low,
            2 => LogLevel::Medium,
            _ => LogLevel::High,
        }
    }
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The run's ID.
    pub run_id: RunId,
    /// The project.
    pub project: ProjectId,
    /// The job (the first of the chain).
    pub job: JobId,
    /// `@@VAR:JobArgument@@`.
    pub argument: String,
    /// The first origin row processed (1-based); rows before it are read and dropped.
    pub begin_at_row: u64,
    /// The last origin row processed, inclusive; `None` for all rows.
    pub end_after_row: Option<u64>,
    /// Writers, each with its own destination connection.
    pub thread_count: usize,
    /// What the report's log keeps.
    pub logging_level: LogLevel,
    /// Run the job's `next` job after it, and so on.
    pub chain_jobs: bool,
    /// Run everything but write nothing (database work rolled back, files untouched).
    pub preview: bool,
}

impl RunRequest {
    /// A request with the API's defaults: all rows, one thread, no log, no chain.
    pub fn new(project: &str, job: &str) -> Self {
        RunRequest {
            run_id: RunId::new(),
            project: ProjectId(project.to_owned()),
            job: JobId(job.to_owned()),
            argument: String::new(),
            begin_at_row: 1,
            end_after_row: None,
            thread_count: 1,
            logging_level: LogLevel::None,
            chain_jobs: false,
            preview: false,
        }
    }
}

/// The most writer threads one job may use.
pub const MAX_THREADS: usize = 64;

/// One line of a run's log.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    /// When.
    pub time: DateTime<FixedOffset>,
    /// How important (Low entries show at levels 1 to 3).
    pub level: LogLevel,
    /// The job it is about.
    #[serde(rename = "jobID")]
    pub job_id: JobId,
    /// The origin row, where it is about one.
    pub row: Option<u64>,
    /// What happened.
    pub message: String,
}

/// A row that failed, kept with its origin values whatever the log level.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RowError {
    /// The origin row (1-based).
    pub row: u64,
    /// The stage that failed (1-based; 0 = reading the row, or its batch).
    pub stage: usize,
    /// That stage's name.
    pub stage_name: Option<String>,
    /// What went wrong.
    pub message: String,
    /// The row's origin values by column, as text.
    pub values: Vec<(String, String)>,
}

fn as_seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// What one job of a run did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobReport {
    /// The job.
    #[serde(rename = "jobID")]
    pub job_id: JobId,
    /// When it started.
    pub start_time: DateTime<FixedOffset>,
    /// How long it took.
    #[serde(rename = "runTimeSeconds", serialize_with = "as_seconds")]
    pub run_time: Duration,
    /// Complete, Failed or Cancelled.
    pub status: RunStatus,
    /// The counters.
    #[serde(flatten)]
    pub counters: Counters,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// The log at the requested level.
    pub log: Vec<LogEntry>,
    /// What the job's scripts left in `returnValue` (objects as JSON text).
    pub return_value: Option<String>,
    /// The first row errors (at any log level), at most `ROW_ERRORS_KEPT`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub row_errors: Vec<RowError>,
    /// Row errors counted, kept or not.
    #[serde(skip_serializing_if = "is_zero")]
    pub row_errors_total: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Row errors a job keeps with their origin values; past it they are only counted.
pub const ROW_ERRORS_KEPT: usize = 1000;

/// What a run did: one [`JobReport`] per job executed, in order.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// The run.
    #[serde(rename = "runID")]
    pub run_id: RunId,
    /// Complete only if every job completed.
    pub status: RunStatus,
    /// When the run started.
    pub start_time: DateTime<FixedOffset>,
    /// How long the whole run took.
    #[serde(rename = "runTimeSeconds", serialize_with = "as_seconds")]
    pub run_time: Duration,
    /// The counters summed over the jobs.
    #[serde(flatten)]
    pub counters: Counters,
    /// Why the run failed, if it did (the first failing job's error).
    pub error: Option<String>,
    /// The last `returnValue` a job's scripts set.
    pub return_value: Option<String>,
    /// One report per job executed.
    pub jobs: Vec<JobReport>,
}

/// A flag that asks a run to stop; the engine checks it between rows and batches.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks the run to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether stop was asked.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// One row of a preview run: what each stage would do with it, and the values.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PreviewRow {
    /// The job.
    #[serde(rename = "jobID")]
    pub job_id: JobId,
    /// The origin row (1-based).
    pub row: u64,
    /// The origin values by column, as text.
    pub origin: Vec<(String, String)>,
    /// Each stage that ran for the row, in order.
    pub stages: Vec<PreviewStage>,
    /// Why the row failed, if it did.
    pub error: Option<String>,
}

/// What one stage would do with a preview row.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PreviewStage {
    /// The stage's name.
    pub stage: String,
    /// Insert, Update, Delete, Skip, Ignore or Error.
    pub action: String,
    /// The values the stage would write, by destination column, as text.
    pub values: Vec<(String, String)>,
}

/// Hears about a run while it goes (progress bars, live Results).
pub trait RunObserver: Sync {
    /// A row of a preview run went through the stages (preview runs only).
    fn row_previewed(&self, _row: &PreviewRow) {}
    /// A job begins.
    fn job_started(&self, _job: &JobId) {}
    /// The job's counters so far (called a few times a second).
    fn progress(&self, _job: &JobId, _counters: &Counters) {}
    /// A job ended.
    fn job_finished(&self, _report: &JobReport) {}
}

/// An observer that ignores everything.
pub struct NoObserver;
impl RunObserver for NoObserver {}

/// Why a run could not start at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The project has no such job.
    #[error("project {project:?} has no job {job:?}; it has: {known}")]
    UnknownJob {
        /// The project.
        project: String,
        /// The job asked for.
        job: String,
        /// The jobs it has.
        known: String,
    },
    /// `beginAtRow` is 0.
    #[error("beginAtRow must be a positive integer")]
    BeginAtRow,
    /// `endAfterRow` comes before `beginAtRow`.
    #[error("endAfterRow ({end}) must not be less than beginAtRow ({begin})")]
    EndBeforeBegin {
        /// `endAfterRow`.
        end: u64,
        /// `beginAtRow`.
        begin: u64,
    },
    /// `threadCount` is 0 or more than [`MAX_THREADS`].
    #[error("threadCount must be 1 to {MAX_THREADS}")]
    ThreadCount,
}

/// Checks the request's numbers, the way the API reports them.
pub fn check_request(req: &RunRequest) -> Result<(), RunError> {
    if req.begin_at_row == 0 {
        return Err(RunError::BeginAtRow);
    }
    if let Some(end) = req.end_after_row
        && end < req.begin_at_row
    {
        return Err(RunError::EndBeforeBegin {
            end,
            begin: req.begin_at_row,
        });
    }
    if req.thread_count == 0 || req.thread_count > MAX_THREADS {
        return Err(RunError::ThreadCount);
    }
    Ok(())
}

/// Runs `req` against `project`, blocking until the run (and its chain) ends.
pub fn run(
    project: &Project,
    req: &RunRequest,
    cancel: &CancelToken,
    observer: &dyn RunObserver,
) -> Result<RunReport, RunError> {
    check_request(req)?;
    let first = project
        .job(&req.job.0)
        .ok_or_else(|| RunError::UnknownJob {
            project: project.id.0.clone(),
            job: req.job.0.clone(),
            known: project
                .jobs
                .keys()
                .map(|j| j.0.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let start = Local::now().fixed_offset();
    let t0 = std::time::Instant::now();
    let mut jobs = Vec::new();
    let mut current = Some(first);
    while let Some(job) = current {
        observer.job_started(&job.id);
        let report = job::run_job(project, job, req, cancel, observer);
        observer.job_finished(&report);
        let go_on = report.status == RunStatus::Complete && req.chain_jobs;
        jobs.push(report);
        current = if go_on {
            job.next.as_ref().and_then(|n| project.jobs.get(n))
        } else {
            None
        };
    }
    let mut counters = Counters::default();
    for j in &jobs {
        counters.add(&j.counters);
    }
    let status = if jobs.iter().all(|j| j.status == RunStatus::Complete) {
        RunStatus::Complete
    } else if jobs.iter().any(|j| j.status == RunStatus::Cancelled) {
        RunStatus::Cancelled
    } else {
        RunStatus::Failed
    };
    let error = jobs
        .iter()
        .find_map(|j| j.error.as_ref().map(|e| format!("job {}: {e}", j.job_id)));
    let return_value = jobs.iter().rev().find_map(|j| j.return_value.clone());
    Ok(RunReport {
        return_value,
        run_id: req.run_id,
        status,
        start_time: start,
        run_time: t0.elapsed(),
        counters,
        error,
        jobs,
    })
}

/// What opening a project's connections found.
#[derive(Debug, Default)]
pub struct ConnectionCheck {
    /// What stops a job from running as written.
    pub problems: Vec<Problem>,
    /// What the user should know though the job runs (a missing index, …).
    pub notes: Vec<Problem>,
}

/// Opens every job's connections as a preview run would, reading no rows, and
/// reports what a static load cannot see: missing files and tables, origin
/// fields and destination columns that do not exist; and the destinations' notes.
pub fn check_connections(project: &Project) -> ConnectionCheck {
    let mut check = ConnectionCheck::default();
    for j in project.jobs.values() {
        match job::check_job(project, j) {
            Ok(notes) => check
                .notes
                .extend(notes.into_iter().map(|n| Problem::new(&j.file, None, n))),
            Err(m) => check
                .problems
                .push(Problem::new(&j.file, None, m.to_string())),
        }
    }
    check
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_requests_say_which_field() {
        let said = |tweak: fn(&mut RunRequest)| {
            let mut req = RunRequest::new("p", "j");
            tweak(&mut req);
            check_request(&req).map_err(|e| e.to_string())
        };
        assert_eq!(said(|_| {}), Ok(()));
        assert_eq!(
            said(|r| r.begin_at_row = 0),
            Err("beginAtRow must be a positive integer".into())
        );
        assert_eq!(
            said(|r| {
                r.begin_at_row = 5;
                r.end_after_row = Some(4);
            }),
            Err("endAfterRow (4) must not be less than beginAtRow (5)".into())
        );
        assert_eq!(
            said(|r| r.thread_count = MAX_THREADS + 1),
            Err("threadCount must be 1 to 64".into())
        );
    }
}
