//! `POST /v1/Runs/{id}/rerun`: the same request again under a new runID, or
//! (`?from=failure`) a Failed or interrupted run's failed job again from its
//! first row not committed, going on with its chain. And what `GET
//! /v1/Runs/{id}` adds for retries and reruns: the run's attempts and the run
//! it continues.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use super::runs::param;
use super::{ApiError, AppState, RunCaller};
use crate::project::JobId;
use crate::run::{JobResult, RunStatus, Submission};
use crate::server::SubmitError;
use crate::server::retry::{Attempt, attempts_of};
use crate::store::Role;
use crate::store::{RunRecord, Submitted};

/// The white space the parameters' patterns allow around a value.
const HTTP_BLANK: [char; 5] = [' ', '\t', '\n', '\x0c', '\r'];

/// The answer of `POST /v1/Runs/{id}/rerun`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = rerunResponse)]
#[serde(rename_all = "camelCase")]
pub struct RerunAnswer {
    /// The new run.
    #[serde(rename = "runID")]
    #[schema(rename = "runID")]
    pub run_id: String,
    /// Recorded durably: it will run.
    pub started: bool,
    /// The job the new run starts with.
    #[serde(rename = "jobID")]
    #[schema(rename = "jobID")]
    pub job_id: String,
    /// The origin row that job starts at (a rerun from the failure).
    pub resume_at_row: Option<u64>,
    /// The run it continues (a rerun from the failure).
    pub continues: Option<String>,
}

/// Runs a run's request again under a new runID; with `from=failure`, starts
/// where the run failed.
#[utoipa::path(post, path = "/v1/Runs/{id}/rerun", tag = "tidepool", operation_id = "RerunRun",
    params(("id" = String, Path, description = "the runID of the run to run again"),
        ("from" = Option<String>, Query, pattern = r"^[ \t\n\f\r]*([Ff][Aa][Ii][Ll][Uu][Rr][Ee])?[ \t\n\f\r]*$", description = "failure: start the failed job at its first row not committed and go on with its chain; blank or absent: the whole request again"),
        ("runID" = Option<String>, Query, pattern = r"^[ \t\n\f\r]*$|^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$", description = "the new run's GUID in its 36-character form; blank or absent: a new one"),
        ("instance" = Option<String>, Query, description = "the instance the run belongs to; default the caller's primary instance")),
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 202, description = "the new run is recorded durably; it will run", body = RerunAnswer),
        (status = 400, description = "a parameter breaks its rule", body = super::wire::ExecJobAsyncResponse),
        (status = 401, description = "missing or bad credentials", body = super::wire::ExecJobAsyncResponse),
        (status = 403, description = "read-only role", body = super::wire::ExecJobAsyncResponse),
        (status = 404, description = "unknown run, or another instance's", body = super::wire::ExecJobAsyncResponse),
        (status = 409, description = "refused, with the reason: from=failure on a run that did not fail, whose progress is unknown, or whose origin is not ordered; or the runID was used with other parameters", body = super::wire::ExecJobAsyncResponse),
        (status = 503, description = "the queue is full, the server is stopping, or the store failed; see Retry-After", body = super::wire::ExecJobAsyncResponse),
    ))]
pub async fn rerun(
    State(svc): State<AppState>,
    Query(q): Query<Vec<(String, String)>>,
    who: RunCaller,
) -> Result<Response, ApiError> {
    let rec = who
        .run(&svc, param(&q, "instance").map(str::to_owned))
        .await?;
    if who.caller.role_in(&rec.key.instance) < Some(Role::Full) {
        return Err(who.refuse(StatusCode::FORBIDDEN, "running a job needs Owner or Full"));
    }
    let bad = |m: String| who.refuse(StatusCode::BAD_REQUEST, m);
    let from_failure = match param(&q, "from").map(|f| f.trim_matches(HTTP_BLANK)) {
        None | Some("") => false,
        Some(f) if f.eq_ignore_ascii_case("failure") => true,
        Some(other) => {
            return Err(bad(format!(
                "from must be \"failure\" or absent, not {other:?}"
            )));
        }
    };
    let run_id = match param(&q, "runID") {
        None => uuid::Uuid::new_v4(),
        Some(t) if t.trim_matches(HTTP_BLANK).is_empty() => uuid::Uuid::new_v4(),
        Some(t) => uuid::Uuid::try_parse(t)
            .ok()
            .filter(|_| t.len() == 36)
            .ok_or_else(|| bad(format!("runID {t:?} is not a GUID (8-4-4-4-12 hex digits)")))?,
    };
    let mut sub: Submission = serde_json::from_str(&rec.request_json).map_err(|e| {
        who.refuse(
            StatusCode::CONFLICT,
            format!("the run's request cannot be read: {e}"),
        )
    })?;
    sub.run_id = run_id;
    if from_failure {
        let (job, row) =
            failure_start(&svc, &rec).map_err(|m| who.refuse(StatusCode::CONFLICT, m))?;
        sub.job_id = job;
        sub.resume_at_row = Some(row);
        sub.continues = Some(rec.key.run_id);
    }
    let conflict = || {
        who.refuse(
            StatusCode::CONFLICT,
            format!("runID {run_id} was already used with other parameters"),
        )
    };
    match svc.submit(&rec.key.instance, &sub).await {
        Ok(Submitted::Accepted | Submitted::Duplicate) => {}
        Ok(Submitted::Conflict) | Err(SubmitError::Conflict(_)) => return Err(conflict()),
        Err(e) => {
            return Err(who
                .refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                .retry_after());
        }
    }
    let answer = RerunAnswer {
        run_id: run_id.to_string(),
        started: true,
        job_id: sub.job_id.clone(),
        resume_at_row: sub.resume_at_row,
        continues: sub.continues.map(|c| c.to_string()),
    };
    Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response())
}

/// Where a rerun from the failure starts: the failed job and its first row
/// not committed; or why it cannot.
fn failure_start(svc: &AppState, rec: &RunRecord) -> Result<(String, u64), String> {
    if rec.status != RunStatus::Failed {
        return Err(format!(
            "run {} is {}: only a Failed (or interrupted) run is rerun from its failure",
            rec.key.run_id, rec.status
        ));
    }
    let results: Vec<JobResult> = rec
        .results_json
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default();
    let failed = the_failed_job(&results, &rec.key.run_id.to_string())?;
    let row = failed.resume_at_row.ok_or_else(|| {
        format!(
            "nothing is known about how far job {} got (it stopped before its first rows were committed, or it ran on an older tidepool): rerun it whole",
            failed.job_id
        )
    })?;
    let projects = svc.projects();
    let project = projects
        .project_in(&rec.key.instance, &rec.project_id)
        .ok_or_else(|| format!("project {:?} is not loaded", rec.project_id))?;
    let job = project
        .jobs
        .get(&JobId(failed.job_id.clone()))
        .ok_or_else(|| {
            format!(
                "project {:?} has no job {:?} now",
                rec.project_id, failed.job_id
            )
        })?;
    crate::engine::origin_order(project, job).map_err(|why| {
        format!(
            "job {} cannot be rerun from its failure: {why}",
            failed.job_id
        )
    })?;
    Ok((failed.job_id.clone(), row))
}

/// The one job of a run that did not end (Failed, or still Running when the
/// run was interrupted). A graph may have two failed branches: a rerun from
/// the failure starts at one job, so it refuses them, as a retry does.
fn the_failed_job<'a>(results: &'a [JobResult], run: &str) -> Result<&'a JobResult, String> {
    let failed: Vec<&JobResult> = results
        .iter()
        .filter(|r| r.status.stopped_short())
        .collect();
    match failed.as_slice() {
        [] => Err(format!(
            "no job of run {run} failed (it failed before a job started): rerun it whole"
        )),
        [one] => Ok(one),
        [first, rest @ ..] => {
            let others: Vec<&str> = rest.iter().map(|r| r.job_id.as_str()).collect();
            Err(format!(
                "jobs {} and {} of run {run} failed: a rerun from the failure starts at one job; rerun it whole",
                first.job_id,
                others.join(", ")
            ))
        }
    }
}

/// What `GET /v1/Runs/{id}` adds after the answer for a retried or continued
/// run (JSON members, each with a leading comma; empty for neither):
/// `continues` (the run this one continues) and `attempts` (each attempt,
/// the current one last).
pub(super) async fn run_extras(svc: &AppState, rec: &RunRecord, results: &[JobResult]) -> String {
    let mut out = String::new();
    let continues = serde_json::from_str::<Submission>(&rec.request_json)
        .ok()
        .and_then(|s| s.continues);
    if let Some(c) = continues {
        out.push_str(&format!(",\"continues\":{}", json!(c.to_string())));
    }
    let state = svc.store.retry_state(&rec.key).await.unwrap_or_default();
    let mut attempts = attempts_of(state.attempts_json.as_deref());
    if attempts.is_empty() {
        return out;
    }
    // Queued between two attempts: the last one listed is the one that
    // ended; else the current (or final) attempt is the run itself.
    if rec.status != RunStatus::Queued {
        attempts.push(Attempt {
            attempt: attempts.len() as u32 + 1,
            start_time: results
                .first()
                .map(|r| r.start_time.clone())
                .unwrap_or_default(),
            end_time: None,
            status: rec.status,
            error: rec.error.clone(),
            results: results.to_vec(),
            next_not_before: None,
        });
    }
    out.push_str(&format!(
        ",\"attempts\":{}",
        serde_json::to_string(&attempts).unwrap_or_else(|_| "[]".into())
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::Counters;

    fn result(job: &str, status: RunStatus) -> JobResult {
        let start = chrono::Local::now().fixed_offset();
        let c = Counters::default();
        JobResult::new("r", job, &start, std::time::Duration::ZERO, status, &c)
    }

    #[test]
    fn a_rerun_from_the_failure_starts_at_the_one_job_that_did_not_end() {
        let done = result("a", RunStatus::Complete);
        let failed = result("b", RunStatus::Failed);
        let cut = result("c", RunStatus::Running);
        let ok = [
            done.clone(),
            failed.clone(),
            result("d", RunStatus::Complete),
        ];
        assert_eq!(the_failed_job(&ok, "r").unwrap().job_id, "b");
        let interrupted = [done.clone(), cut.clone()];
        assert_eq!(the_failed_job(&interrupted, "r").unwrap().job_id, "c");
        let e = the_failed_job(std::slice::from_ref(&done), "r").unwrap_err();
        assert!(e.contains("no job of run r failed"), "{e}");
        let two = [failed, done, cut];
        let e = the_failed_job(&two, "r").unwrap_err();
        assert!(e.starts_with("jobs b and c of run r failed"), "{e}");
        assert!(e.contains("rerun it whole"), "{e}");
    }
}
