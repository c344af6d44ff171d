//! `DELETE /v1/Jobs/{projectID}/{jobID}/HighWater`: a job's incremental mark
//! forgotten, so its next run reads everything (tidepool's addition).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::auth::Caller;
use super::runs::json_error;
use crate::engine::{ResetError, reset_incremental};
use crate::store::Role;

/// The answer of a reset.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = highWaterReset)]
pub struct HighWaterReset {
    /// The project.
    #[serde(rename = "projectID")]
    pub project_id: String,
    /// The job.
    #[serde(rename = "jobID")]
    pub job_id: String,
    /// The mark that was kept (null: none was).
    pub previous: Option<String>,
}

/// Forgets a job's incremental mark (needs Owner or Full in the project's instance).
#[utoipa::path(delete, path = "/v1/Jobs/{projectID}/{jobID}/HighWater", tag = "tidepool",
    operation_id = "ResetHighWater",
    params(
        ("projectID" = String, Path, description = "the project (any case)", example = "sync"),
        ("jobID" = String, Path, description = "the job (any case)", example = "orders"),
    ),
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "the mark is forgotten: the job's next run reads everything", body = HighWaterReset),
        (status = 401, description = "missing or bad credentials", body = super::wire::ExecJobAsyncResponse),
        (status = 403, description = "{error}: needs Owner or Full in the project's instance", body = super::wire::ErrorDoc),
        (status = 404, description = "unknown project or job, or another instance's", body = super::wire::ErrorDoc),
        (status = 409, description = "the job's origin is not incremental", body = super::wire::ErrorDoc),
        (status = 503, description = "the job's kept state cannot be read or written", body = super::wire::ErrorDoc),
    ))]
pub async fn reset_high_water(
    State(svc): State<AppState>,
    Path((project_id, job_id)): Path<(String, String)>,
    caller: Caller,
) -> Response {
    let loaded = svc.projects();
    let Some(project) = loaded
        .projects
        .iter()
        .find(|p| caller.can_see(&p.instance) && p.id.0.eq_ignore_ascii_case(&project_id))
        .cloned()
    else {
        return json_error(
            StatusCode::NOT_FOUND,
            format!("unknown project {project_id:?}"),
        );
    };
    if caller.role_in(&project.instance) < Some(Role::Full) {
        return json_error(
            StatusCode::FORBIDDEN,
            "resetting a job's mark needs Owner or Full in the project's instance",
        );
    }
    let kept = svc.store.kept_state(None);
    let job = job_id.clone();
    let reset = tokio::task::spawn_blocking(move || {
        reset_incremental(&project, &job, kept).map(|prev| (project, prev))
    })
    .await;
    match reset {
        Ok(Ok((project, previous))) => {
            let job = project
                .jobs
                .keys()
                .find(|j| j.0.eq_ignore_ascii_case(&job_id))
                .map(|j| j.0.clone())
                .unwrap_or(job_id);
            let body = HighWaterReset {
                project_id: project.id.0.clone(),
                job_id: job,
                previous,
            };
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Ok(Err(e @ ResetError::UnknownJob { .. })) => {
            json_error(StatusCode::NOT_FOUND, e.to_string())
        }
        Ok(Err(e @ ResetError::NotIncremental(_))) => {
            json_error(StatusCode::CONFLICT, e.to_string())
        }
        Ok(Err(e @ ResetError::State(_))) => {
            json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Err(e) => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the reset did not finish: {e}"),
        ),
    }
}
