//! A chained run's jobs as the store sees them while it goes: several may
//! run at once, each with its own start and counters; and, when a run was
//! cut, the jobs of its graph that were due to start but never did.

use std::time::Instant;

use chrono::{DateTime, FixedOffset, Local};

use crate::engine::JobReport;
use crate::project::{JobId, RunGraph};
use crate::run::{Counters, JobResult, RunStatus};

use super::history;

/// One job of a running run.
struct LiveJob {
    id: JobId,
    start: DateTime<FixedOffset>,
    t0: Instant,
    counters: Counters,
    /// The first origin row not committed, once a batch committed.
    resume_at_row: Option<u64>,
    /// Its result, once it ended.
    ended: Option<JobResult>,
}

/// The jobs of a running run, in start order: those that ended, those
/// running, and those due to start (every job they wait for completed).
pub(super) struct LiveJobs {
    graph: Option<RunGraph>,
    jobs: Vec<LiveJob>,
}

impl LiveJobs {
    /// No job yet, for a run of `graph` (`None`: its project does not know
    /// the job; only the jobs that start are shown).
    pub fn new(graph: Option<RunGraph>) -> Self {
        LiveJobs {
            graph,
            jobs: Vec::new(),
        }
    }

    /// A job starts (it may already be listed as due).
    pub fn started(&mut self, job: &JobId) {
        let now = (Local::now().fixed_offset(), Instant::now());
        match self
            .jobs
            .iter_mut()
            .find(|j| &j.id == job && j.ended.is_none())
        {
            Some(j) => (j.start, j.t0) = now,
            None => self.jobs.push(LiveJob {
                id: job.clone(),
                start: now.0,
                t0: now.1,
                counters: Counters::default(),
                resume_at_row: None,
                ended: None,
            }),
        }
    }

    /// A running job's counters so far.
    pub fn progress(&mut self, job: &JobId, c: &Counters) {
        if let Some(j) = self
            .jobs
            .iter_mut()
            .find(|j| &j.id == job && j.ended.is_none())
        {
            j.counters = *c;
        }
    }

    /// A running job's batches committed up to (not including) `row`.
    pub fn committed(&mut self, job: &JobId, row: u64) {
        if let Some(j) = self
            .jobs
            .iter_mut()
            .find(|j| &j.id == job && j.ended.is_none())
        {
            j.resume_at_row = Some(row);
        }
    }

    /// A job ended; the jobs this makes due to start are listed (Running)
    /// with it. Whether any was: then the results must be saved now, so
    /// that the store never shows the run between two jobs.
    pub fn finished(&mut self, run_id: &str, report: &JobReport) -> bool {
        let result = history::job_result(run_id, report);
        match self
            .jobs
            .iter_mut()
            .find(|j| j.id == report.job_id && j.ended.is_none())
        {
            Some(j) => j.ended = Some(result),
            None => self.jobs.push(LiveJob {
                id: report.job_id.clone(),
                start: report.start_time,
                t0: Instant::now(),
                counters: report.counters,
                resume_at_row: None,
                ended: Some(result),
            }),
        }
        if report.status != RunStatus::Complete {
            return false;
        }
        let Some(graph) = &self.graph else {
            return false;
        };
        let due = pending(graph, &self.results(run_id));
        let now = (Local::now().fixed_offset(), Instant::now());
        for id in &due {
            self.jobs.push(LiveJob {
                id: id.clone(),
                start: now.0,
                t0: now.1,
                counters: Counters::default(),
                resume_at_row: None,
                ended: None,
            });
        }
        !due.is_empty()
    }

    /// Every job's result so far, in start order (Running for those going).
    pub fn results(&self, run_id: &str) -> Vec<JobResult> {
        self.jobs
            .iter()
            .map(|j| match &j.ended {
                Some(r) => r.clone(),
                None => {
                    let mut live = JobResult::new(
                        run_id,
                        &j.id.0,
                        &j.start,
                        j.t0.elapsed(),
                        RunStatus::Running,
                        &j.counters,
                    );
                    // Saved with the progress: a run whose node dies has it too.
                    live.resume_at_row = j.resume_at_row;
                    live
                }
            })
            .collect()
    }
}

/// The jobs of `graph` that have no result though every job they wait for
/// completed: due to start (or, for a run that was cut, never run).
pub(super) fn pending(graph: &RunGraph, results: &[JobResult]) -> Vec<JobId> {
    let status_of = |id: &JobId| results.iter().find(|r| r.job_id == id.0).map(|r| r.status);
    graph
        .jobs()
        .iter()
        .enumerate()
        .filter(|(i, id)| {
            status_of(id).is_none()
                && graph
                    .needs(*i)
                    .iter()
                    .all(|&n| status_of(&graph.jobs()[n]) == Some(RunStatus::Complete))
        })
        .map(|(_, id)| id.clone())
        .collect()
}
