//! A chained run's job graph, executed: a job starts as soon as every job
//! of the run it waits for completed; jobs ready at once run in parallel (each
//! a normal job run with its own threads), at most the project's
//! `max_parallel_jobs` at a time. A job that does not complete stops the jobs
//! that depend on it, directly or not, and nothing else.

use std::sync::mpsc;

use chrono::Local;

use super::state::RunState;
use super::{CancelToken, JobReport, LogEntry, LogLevel, RunObserver, RunRequest, RunStatus, job};
use crate::project::{JobId, Project, RunGraph};

/// What executing a run's graph came to.
pub(super) struct GraphOutcome {
    /// One report per job that ran, in start order.
    pub jobs: Vec<JobReport>,
    /// The jobs that did not run, each with why.
    pub not_run: Vec<(JobId, String)>,
}

/// Where each job of the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Waiting,
    Running,
    Ended(RunStatus),
    /// Stopped by a job it depends on (by index) that did not complete.
    Stopped(usize),
}

/// Runs the jobs of `graph` (its first job is the request's). The row
/// window applies to the first job only: the others read all their rows.
pub(super) fn run_graph(
    project: &Project,
    graph: &RunGraph,
    req: &RunRequest,
    cancel: &CancelToken,
    observer: &dyn RunObserver,
    kept: &RunState,
) -> GraphOutcome {
    let mut rest = req.clone();
    rest.begin_at_row = 1;
    rest.end_after_row = None;
    let limit = project.max_parallel_jobs.max(1);
    let mut steps = vec![Step::Waiting; graph.len()];
    let mut reports: Vec<Option<JobReport>> = vec![None; graph.len()];
    let mut started: Vec<usize> = Vec::new();
    std::thread::scope(|s| {
        let (done_tx, done_rx) = mpsc::channel::<(usize, JobReport)>();
        let mut running = 0;
        loop {
            while running < limit && !cancel.is_cancelled() {
                let Some(i) = next_ready(graph, &steps) else {
                    break;
                };
                let Some(job) = project.jobs.get(&graph.jobs()[i]) else {
                    steps[i] = Step::Ended(RunStatus::Failed);
                    continue;
                };
                steps[i] = Step::Running;
                running += 1;
                started.push(i);
                observer.job_started(&job.id);
                let req = if i == 0 { req } else { &rest };
                let done = done_tx.clone();
                s.spawn(move || {
                    let report = guarded(job, || {
                        job::run_job(project, job, req, cancel, observer, kept)
                    });
                    let _ = done.send((i, report));
                });
            }
            if running == 0 {
                break;
            }
            let Ok((i, mut report)) = done_rx.recv() else {
                break;
            };
            running -= 1;
            steps[i] = Step::Ended(report.status);
            if report.status != RunStatus::Complete {
                stop_dependents(
                    graph,
                    &mut steps,
                    i,
                    &mut report,
                    req.logging_level,
                    observer,
                );
            }
            observer.job_finished(&report);
            reports[i] = Some(report);
        }
    });
    let not_run = not_run(graph, &steps, cancel);
    GraphOutcome {
        jobs: started
            .into_iter()
            .filter_map(|i| reports[i].take())
            .collect(),
        not_run,
    }
}

/// The first job (in the graph's order) waiting whose every needed job completed.
fn next_ready(graph: &RunGraph, steps: &[Step]) -> Option<usize> {
    (0..graph.len()).find(|&i| {
        steps[i] == Step::Waiting
            && graph
                .needs(i)
                .iter()
                .all(|&n| steps[n] == Step::Ended(RunStatus::Complete))
    })
}

/// Runs a job; a panic (a bug, never bad input) becomes the job's failure
/// rather than a run that never ends.
fn guarded(job: &crate::project::Job, run: impl FnOnce() -> JobReport) -> JobReport {
    let start_time = Local::now().fixed_offset();
    let t0 = std::time::Instant::now();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".into());
        JobReport {
            job_id: job.id.clone(),
            start_time,
            run_time: t0.elapsed(),
            status: RunStatus::Failed,
            counters: Default::default(),
            error: Some(format!("the job crashed: {why}")),
            log: Vec::new(),
            return_value: None,
            row_errors: Vec::new(),
            row_errors_total: 0,
            failure: Some(crate::run::FailureKind::Job),
            resume_at_row: None,
            load: Default::default(),
        }
    })
}

/// Marks the waiting jobs that depend on job `i` (which did not complete) as
/// stopped, and says so in its log.
fn stop_dependents(
    graph: &RunGraph,
    steps: &mut [Step],
    i: usize,
    report: &mut JobReport,
    level: LogLevel,
    observer: &dyn RunObserver,
) {
    let mut stopped: Vec<&str> = Vec::new();
    for d in graph.descendants(i) {
        if steps[d] == Step::Waiting {
            steps[d] = Step::Stopped(i);
            stopped.push(graph.jobs()[d].0.as_str());
        }
    }
    if stopped.is_empty() || level == LogLevel::None {
        return;
    }
    let entry = LogEntry {
        time: Local::now().fixed_offset(),
        level: LogLevel::Low,
        job_id: report.job_id.clone(),
        row: None,
        message: format!(
            "not running {}: {} on job {}, which ended {}",
            stopped.join(", "),
            if stopped.len() == 1 {
                "it depends"
            } else {
                "they depend"
            },
            report.job_id,
            report.status
        ),
    };
    observer.log(&report.job_id, &entry);
    report.log.push(entry);
}

/// The jobs of the run that did not start, each with why.
fn not_run(graph: &RunGraph, steps: &[Step], cancel: &CancelToken) -> Vec<(JobId, String)> {
    steps
        .iter()
        .enumerate()
        .filter_map(|(i, step)| {
            let why = match step {
                Step::Stopped(by) => format!(
                    "it depends on job {}, which did not complete",
                    graph.jobs()[*by]
                ),
                Step::Waiting if cancel.is_cancelled() => "the run was cancelled".to_owned(),
                Step::Waiting => "a job it depends on did not complete".to_owned(),
                _ => return None,
            };
            Some((graph.jobs()[i].clone(), why))
        })
        .collect()
}
