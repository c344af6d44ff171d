//! Retries of a run: a run whose job failed because a connection could not
//! be reached, and whose job has a `retry` policy, waits Queued and runs
//! again under the same runID, from the job that failed (at the first row not
//! committed when its origin is ordered). The attempts are kept with the run;
//! the completion webhook goes once, after the last attempt.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Local;
use serde::{Deserialize, Serialize};

use super::{Service, history, lease};
use crate::engine::{self, FailureKind, RunReport, RunRequest};
use crate::project::{JobId, LoadOutcome};
use crate::run::{JobResult, RunStatus};
use crate::store::RunRecord;
use crate::store::retry::RetryLater;
use crate::value::datetime_text;

/// One attempt of a run, as `GET /v1/Runs/{id}` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    /// 1-based.
    pub attempt: u32,
    /// When it started.
    pub start_time: String,
    /// When it ended (None for the run's current or last attempt: the
    /// run's own answer says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    /// How it ended.
    pub status: RunStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// Its jobs' results.
    pub results: Vec<JobResult>,
    /// When the next attempt may start (None for the last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_not_before: Option<String>,
}

/// Where a run's next attempt starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NextStart {
    /// The attempt's number (2 for the first retry).
    pub attempt: u32,
    /// The job that failed: the attempt starts there (and goes on with its chain).
    #[serde(rename = "jobID")]
    pub job_id: String,
    /// The origin row the job starts at (its origin is ordered); None: the
    /// request's `beginAtRow`.
    pub resume_at_row: Option<u64>,
}

/// The attempts a run made before the current one (as stored).
pub fn attempts_of(json: Option<&str>) -> Vec<Attempt> {
    json.and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default()
}

/// Whether the run goes on to another attempt, and where it starts: its last
/// job failed because a connection could not be reached, and that job's
/// `retry` allows another try after `attempt`.
pub fn plan(
    projects: &LoadOutcome,
    rec: &RunRecord,
    report: &RunReport,
    attempt: u32,
) -> Option<(Duration, NextStart)> {
    if report.status != RunStatus::Failed {
        return None;
    }
    // In a graph, jobs beside the failed one may have completed after it: the
    // attempt starts at the one job that failed (with what depends on it). Two
    // failed branches cannot both be where one attempt starts: no retry then.
    let mut failed_jobs = report
        .jobs
        .iter()
        .filter(|j| j.status != RunStatus::Complete);
    let failed = failed_jobs.next()?;
    if failed_jobs.next().is_some()
        || failed.status != RunStatus::Failed
        || failed.failure != Some(FailureKind::Unreachable)
    {
        return None;
    }
    let project = projects.project_in(&rec.key.instance, &rec.project_id)?;
    let job = project.jobs.get(&failed.job_id)?;
    let policy = job.retry?;
    if attempt >= policy.attempts {
        return None;
    }
    let resume_at_row = failed
        .resume_at_row
        .filter(|_| engine::origin_order(project, job).is_ok());
    Some((
        policy.wait_before(attempt + 1),
        NextStart {
            attempt: attempt + 1,
            job_id: failed.job_id.0.clone(),
            resume_at_row,
        },
    ))
}

impl Service {
    /// The attempt this claim of `rec` is; for a retry, the request starts
    /// where the attempt before stopped. With the attempts made so far.
    pub(super) async fn attempt_of(
        &self,
        rec: &RunRecord,
        run_req: &mut RunRequest,
    ) -> (u32, Vec<Attempt>) {
        let state = match self.store.retry_state(&rec.key).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(run = %rec.key, "reading the run's attempts: {e}");
                return (1, Vec::new());
            }
        };
        let prior = attempts_of(state.attempts_json.as_deref());
        let next: Option<NextStart> = state
            .next_json
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok());
        match next {
            Some(n) => {
                run_req.job = JobId(n.job_id);
                run_req.resume_at_row = n.resume_at_row;
                (n.attempt, prior)
            }
            None => (1, prior),
        }
    }

    /// Puts the run back in the queue for its next attempt, when its lease
    /// still holds; true if it was. The attempt that ended is kept with it.
    pub(super) async fn retry_later(
        self: &Arc<Self>,
        rec: &RunRecord,
        lease: &lease::Held,
        report: &RunReport,
        (wait, next): (Duration, NextStart),
        mut attempts: Vec<Attempt>,
    ) -> bool {
        if lease.is_lost() || lease.is_handed_back() {
            return false;
        }
        let run_id = rec.key.run_id.to_string();
        let results: Vec<JobResult> = report
            .jobs
            .iter()
            .map(|j| history::job_result(&run_id, j))
            .collect();
        let now = Local::now().fixed_offset();
        let not_before = chrono::Duration::from_std(wait)
            .ok()
            .and_then(|w| now.checked_add_signed(w))
            .unwrap_or(now);
        attempts.push(Attempt {
            attempt: next.attempt - 1,
            start_time: datetime_text(&report.start_time),
            end_time: Some(datetime_text(&now)),
            status: report.status,
            error: report.error.clone(),
            results: results.clone(),
            next_not_before: Some(datetime_text(&not_before)),
        });
        let retry = RetryLater {
            wait,
            attempts_json: serde_json::to_string(&attempts).unwrap_or_default(),
            next_json: serde_json::to_string(&next).unwrap_or_default(),
        };
        // The live results show the attempt that ended, as it ended.
        let json = serde_json::to_string(&results).unwrap_or_default();
        let _ = self.store.save_progress(&rec.key, lease.epoch, &json).await;
        match self.store.retry_later(&rec.key, lease.epoch, retry).await {
            Ok(true) => {
                self.queued.fetch_add(1, Ordering::SeqCst);
                metrics::gauge!("tidepool_queue_depth").set(self.queue_depth() as f64);
                tracing::info!(run = %rec.key, attempt = next.attempt, job = %next.job_id,
                    wait_secs = wait.as_secs_f64(), "run failed ({}); it runs again", report.error.as_deref().unwrap_or(""));
                true
            }
            Ok(false) => {
                tracing::warn!(run = %rec.key, "run not queued for another attempt: another node holds it now");
                lease.lose();
                false
            }
            Err(e) => {
                tracing::error!(run = %rec.key, "queueing the run's next attempt: {e}");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_read_back_as_written_and_junk_reads_as_none() {
        let a = Attempt {
            attempt: 1,
            start_time: "s".into(),
            end_time: Some("e".into()),
            status: RunStatus::Failed,
            error: Some("the connection was lost".into()),
            results: Vec::new(),
            next_not_before: Some("n".into()),
        };
        let json = serde_json::to_string(&vec![a.clone()]).unwrap();
        assert_eq!(attempts_of(Some(&json)), vec![a]);
        assert!(attempts_of(Some("not json")).is_empty());
        assert!(attempts_of(None).is_empty());
    }

    /// A diamond a → (b, c) → d whose b and c retry.
    fn diamond() -> LoadOutcome {
        use std::path::{Path, PathBuf};
        let job = |id: &str, keys: &str| {
            let text = format!(
                "{keys}\n[origin]\nconnection = \"src\"\n[destination]\nconnection = \"db\"\n\
                 [[stages]]\ntable = \"t\"\naction = \"insert\"\n\
                 fields = [{{ column = \"id\", origin = \"id\" }}]\n"
            );
            (PathBuf::from(format!("/p/jobs/{id}.toml")), text)
        };
        let retry = "retry = { attempts = 3, wait_secs = 1 }";
        let project = crate::project::load_project_text(
            Path::new("/p"),
            "id = \"p\"\n[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n\
             [connections.db]\nkind = \"sqlite\"\npath = \"/d/db.sqlite\"\n",
            vec![
                job("a", "next = [\"b\", \"c\"]"),
                job("b", retry),
                job("c", retry),
                job("d", "needs = [\"b\", \"c\"]"),
            ],
            &crate::project::LoadOptions {
                data_dir: PathBuf::from("/d"),
            },
        )
        .unwrap_or_else(|e| panic!("{e:#?}"));
        LoadOutcome {
            projects: vec![project],
            problems: Vec::new(),
        }
    }

    fn report(jobs: &[(&str, RunStatus, Option<FailureKind>)]) -> RunReport {
        let now = Local::now().fixed_offset();
        let job = |(id, status, failure): &(&str, RunStatus, Option<FailureKind>)| {
            crate::run::JobReport {
                job_id: JobId(id.to_string()),
                start_time: now,
                run_time: Duration::ZERO,
                status: *status,
                counters: Default::default(),
                error: None,
                log: Vec::new(),
                return_value: None,
                row_errors: Vec::new(),
                row_errors_total: 0,
                failure: *failure,
                resume_at_row: Some(7),
                load: Default::default(),
            }
        };
        RunReport {
            run_id: crate::run::RunId::new(),
            status: RunStatus::Failed,
            start_time: now,
            run_time: Duration::ZERO,
            counters: Default::default(),
            error: None,
            return_value: None,
            jobs: jobs.iter().map(job).collect(),
        }
    }

    fn record() -> RunRecord {
        RunRecord {
            key: crate::store::RunKey {
                instance: "default".into(),
                run_id: uuid::Uuid::new_v4(),
            },
            project_id: "p".into(),
            job_id: "a".into(),
            request_json: "{}".into(),
            webhook_url: None,
            status: RunStatus::Running,
            accepted_at: Local::now().fixed_offset(),
            results_json: None,
            response_json: None,
            error: None,
            fingerprint: String::new(),
            lease_epoch: 0,
            node_id: None,
            requeues: 0,
        }
    }

    #[test]
    fn in_a_graph_the_attempt_starts_at_the_one_job_that_failed() {
        use RunStatus::{Complete, Failed};
        let (projects, rec) = (diamond(), record());
        let unreachable = Some(FailureKind::Unreachable);
        // b failed; c, started beside it, completed after it.
        let r = report(&[
            ("a", Complete, None),
            ("b", Failed, unreachable),
            ("c", Complete, None),
        ]);
        let (_, next) = plan(&projects, &rec, &r, 1).expect("a retry");
        assert_eq!(next.job_id, "b");
        // Both branches failed: one attempt cannot start at both.
        let r = report(&[
            ("a", Complete, None),
            ("b", Failed, unreachable),
            ("c", Failed, unreachable),
        ]);
        assert!(plan(&projects, &rec, &r, 1).is_none());
        // A job-level failure is not retried; nor past the attempts allowed.
        let r = report(&[("a", Complete, None), ("b", Failed, Some(FailureKind::Job))]);
        assert!(plan(&projects, &rec, &r, 1).is_none());
        let r = report(&[("a", Complete, None), ("b", Failed, unreachable)]);
        assert!(plan(&projects, &rec, &r, 3).is_none());
    }
}
