//! One run: a [`RunRequest`] in, a [`RunReport`] out (both plain data in [`crate::run`]).
//!
//! A run executes a job (and, with `chain_jobs`, the graph of jobs that
//! depend on it, through `next` and `needs`, in parallel where they may):
//! one reader streams origin rows in batches through a bounded channel to
//! `thread_count` writers, each with its own destination connection. Each
//! batch is one transaction; a batch that fails is replayed row by row so only
//! the bad rows count as errors. Counters are exact and live.

mod graph;
mod host;
mod job;
#[cfg(test)]
mod kept_tests;
mod mapping;
mod marks;
mod order;
mod state;

pub use marks::{ResetError, reset_incremental};
pub use order::origin_order;
pub use state::{FileMark, KeptState, StateError};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::Local;
use serde::Serialize;

use crate::project::{JobId, Problem, Project, RunGraph};
pub use crate::run::{
    Counters, FailureKind, JobReport, LogEntry, LogLevel, MAX_THREADS, ROW_ERRORS_KEPT, RowError,
    RunId, RunReport, RunRequest, RunStatus,
};

/// A flag that asks a run to stop; the engine checks it between rows and
/// batches. It may also carry a deadline past which it counts as set: a node
/// whose lease on the run cannot be confirmed in time stops the run by then,
/// whatever its other threads are doing (a frozen process that wakes up
/// checks the clock before its next batch, not after a renewal).
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>, Arc<std::sync::atomic::AtomicU64>);

/// The clock deadlines are read on (monotonic, from the first use).
fn token_clock_ms(at: std::time::Instant) -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    // 1 at the earliest: 0 means "no deadline".
    at.saturating_duration_since(start).as_millis() as u64 + 1
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks the run to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether stop was asked, or the deadline has passed.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed) || self.deadline_passed()
    }
    /// Makes the token count as set from `at` on (moved by each call).
    pub fn stop_at(&self, at: std::time::Instant) {
        self.1.store(token_clock_ms(at), Ordering::SeqCst);
    }
    /// Whether a deadline was set and has passed.
    pub fn deadline_passed(&self) -> bool {
        let until = self.1.load(Ordering::Relaxed);
        until != 0 && token_clock_ms(std::time::Instant::now()) >= until
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
    /// The first origin row of the job not yet committed (called just
    /// before each [`RunObserver::progress`]).
    fn committed(&self, _job: &JobId, _resume_at_row: u64) {}
    /// A log entry was made, at the run's `logging_level` (the entries the
    /// job's final log keeps, in the same order, at most
    /// [`LOG_ENTRIES_KEPT`] and the note saying how many more were dropped).
    /// Called on the engine's threads while they hold the job's log: keep it
    /// cheap (no I/O).
    fn log(&self, _job: &JobId, _entry: &LogEntry) {}
    /// A job ended.
    fn job_finished(&self, _report: &JobReport) {}
}

/// Log entries a job's log keeps; past this it says how many were dropped.
pub const LOG_ENTRIES_KEPT: usize = 100_000;

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
/// Jobs keep their variables and xref lists in `<data dir>/state.sqlite`.
pub fn run(
    project: &Project,
    req: &RunRequest,
    cancel: &CancelToken,
    observer: &dyn RunObserver,
) -> Result<RunReport, RunError> {
    run_with_state(project, req, cancel, observer, None)
}

/// Runs `req` against `project` as [`run`] does, with the jobs of the run
/// (and its chain) keeping their variables (`LastRunDate`, those scripts set)
/// and the project's xref lists in `kept`; `None`: in the project's data dir's
/// `state.sqlite` (when that cannot be opened, nothing is kept and the jobs'
/// logs say so). A save refused with [`StateError::Fenced`] fails the job.
pub fn run_with_state(
    project: &Project,
    req: &RunRequest,
    cancel: &CancelToken,
    observer: &dyn RunObserver,
    kept: Option<Arc<dyn KeptState>>,
) -> Result<RunReport, RunError> {
    check_request(req)?;
    let graph =
        RunGraph::of(project, &req.job.0, req.chain_jobs).ok_or_else(|| RunError::UnknownJob {
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
    let kept: state::RunState = match kept {
        Some(k) => Ok(k),
        None => state::JobState::open(&project.data_dir)
            .map(|s| Arc::new(s) as Arc<dyn KeptState>)
            .map_err(|e| e.to_string()),
    };
    let graph::GraphOutcome { jobs, not_run } =
        graph::run_graph(project, &graph, req, cancel, observer, &kept);
    let mut counters = Counters::default();
    for j in &jobs {
        counters.add(&j.counters);
    }
    let status = run_status(&jobs, &not_run, cancel);
    let error = run_error(&jobs, &not_run);
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

/// Complete only if every job of the run ran and completed; Cancelled if a
/// job was, or the run was stopped before all its jobs started; else Failed.
fn run_status(jobs: &[JobReport], not_run: &[(JobId, String)], cancel: &CancelToken) -> RunStatus {
    if not_run.is_empty() && jobs.iter().all(|j| j.status == RunStatus::Complete) {
        RunStatus::Complete
    } else if jobs.iter().any(|j| j.status == RunStatus::Cancelled)
        || (!not_run.is_empty() && cancel.is_cancelled())
    {
        RunStatus::Cancelled
    } else {
        RunStatus::Failed
    }
}

/// The first job's error (in start order), and the jobs that did not run.
fn run_error(jobs: &[JobReport], not_run: &[(JobId, String)]) -> Option<String> {
    let first = jobs
        .iter()
        .find_map(|j| j.error.as_ref().map(|e| format!("job {}: {e}", j.job_id)));
    if not_run.is_empty() {
        return first;
    }
    let skipped: Vec<String> = not_run
        .iter()
        .map(|(j, why)| format!("{j} ({why})"))
        .collect();
    let skipped = format!("not run: {}", skipped.join(", "));
    Some(match first {
        Some(e) => format!("{e}; {skipped}"),
        None => skipped,
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
