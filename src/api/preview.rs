//! `POST /v1/Preview`: a job's first rows as they would be written and what
//! each stage would do with them; the engine's preview mode writes nothing
//! (database work rolled back, files untouched) and nothing is recorded.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;

use super::runs::{json_caller, json_error};
use crate::engine::{self, CancelToken, LogLevel, PreviewRow, RunObserver, RunRequest};
use crate::server::Service;
use crate::store::Role;

/// Rows a preview shows when the caller names no number, and at most.
pub const PREVIEW_ROWS_DEFAULT: u64 = 20;
/// The most rows a preview may show.
pub const PREVIEW_ROWS_MAX: u64 = 100;
/// How long a preview may take before it is stopped.
pub const PREVIEW_SECS: u64 = 30;
/// Previews running at once, over all callers; past it, 503.
pub const PREVIEWS_MAX: usize = 4;

fn previews() -> Arc<Semaphore> {
    static PREVIEWS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    PREVIEWS
        .get_or_init(|| Arc::new(Semaphore::new(PREVIEWS_MAX)))
        .clone()
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PreviewBody {
    #[serde(rename = "projectID")]
    project_id: String,
    #[serde(rename = "jobID")]
    job_id: String,
    #[serde(default)]
    argument: String,
    rows: Option<u64>,
    begin_at_row: Option<u64>,
    instance: Option<String>,
}

/// Keeps the preview rows of the first job.
struct Collector(Mutex<Vec<PreviewRow>>);

impl RunObserver for Collector {
    fn row_previewed(&self, row: &PreviewRow) {
        if let Ok(mut rows) = self.0.lock()
            && (rows.len() as u64) < PREVIEW_ROWS_MAX
        {
            rows.push(row.clone());
        }
    }
}

fn pairs(list: &[(String, String)]) -> (Vec<&String>, Map<String, Value>) {
    (
        list.iter().map(|(c, _)| c).collect(),
        list.iter()
            .map(|(c, v)| (c.clone(), Value::String(v.clone())))
            .collect(),
    )
}

fn row_json(r: &PreviewRow) -> Value {
    let (columns, origin) = pairs(&r.origin);
    json!({
        "row": r.row,
        "columns": columns,
        "origin": origin,
        "error": r.error,
        "stages": r.stages.iter().map(|s| {
            let (columns, values) = pairs(&s.values);
            json!({"stage": s.stage, "action": s.action, "columns": columns, "values": values})
        }).collect::<Vec<_>>(),
    })
}

/// Checks the body: the request, or the refusal.
fn read_request(bytes: &[u8]) -> Result<(PreviewBody, u64, u64), String> {
    let body: PreviewBody =
        serde_json::from_slice(bytes).map_err(|e| format!("malformed preview request: {e}"))?;
    let rows = body.rows.unwrap_or(PREVIEW_ROWS_DEFAULT);
    if !(1..=PREVIEW_ROWS_MAX).contains(&rows) {
        return Err(format!("rows must be 1 to {PREVIEW_ROWS_MAX}, not {rows}"));
    }
    let begin = body.begin_at_row.unwrap_or(1);
    if begin == 0 {
        return Err("beginAtRow must be a positive integer".into());
    }
    Ok((body, rows, begin))
}

/// Runs a job in preview mode on its first rows; writes nothing.
#[utoipa::path(post, path = "/v1/Preview", tag = "tidepool",
    request_body(content = String, description = "{projectID, jobID, argument?, rows? (1..100, default 20), beginAtRow?, instance?}", content_type = "application/json"),
    responses((status = 200, description = "{projectID, jobID, status, error, counters, rows: [{row, columns, origin, error, stages: [{stage, action, columns, values}]}], log}"),
        (status = 400, description = "{error}"), (status = 403, description = "{error}: read-only role"),
        (status = 404, description = "{error}: unknown project or job"), (status = 503, description = "{error}: too many previews at once")))]
pub async fn preview(State(svc): State<Arc<Service>>, headers: HeaderMap, body: Body) -> Response {
    let caller = match json_caller(&svc, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Ok(bytes) = super::read_body(&svc, body).await else {
        return json_error(StatusCode::PAYLOAD_TOO_LARGE, "the body is too large");
    };
    let (body, rows, begin) = match read_request(&bytes) {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    let instance = body.instance.clone().unwrap_or(caller.primary.clone());
    let unknown = || {
        let why =
            super::projects::load_failure(&svc, &instance, &body.project_id).unwrap_or(format!(
                "unknown project {:?} or job {:?}",
                body.project_id, body.job_id
            ));
        json_error(StatusCode::NOT_FOUND, why)
    };
    let Some(role) = caller.role_in(&instance) else {
        return unknown();
    };
    let loaded = svc.projects();
    let Some(project) = loaded.project_in(&instance, &body.project_id).cloned() else {
        return unknown();
    };
    if project.job(&body.job_id).is_none() {
        return unknown();
    }
    if role < Role::Full {
        return json_error(
            StatusCode::FORBIDDEN,
            "a preview runs the job's reads and scripts: it needs Owner or Full",
        );
    }
    let Ok(_permit) = previews().try_acquire_owned() else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{PREVIEWS_MAX} previews are running; try again shortly"),
        );
    };
    let mut req = RunRequest::new(&project.id.0, &body.job_id);
    req.preview = true;
    req.argument = body.argument.clone();
    req.begin_at_row = begin;
    req.end_after_row = Some(begin + rows - 1);
    req.logging_level = LogLevel::Medium;
    let cancel = CancelToken::new();
    let stop = cancel.clone();
    let mut run = tokio::task::spawn_blocking(move || {
        let collector = Collector(Mutex::new(Vec::new()));
        let report = engine::run(&project, &req, &cancel, &collector);
        (report, collector.0.into_inner().unwrap_or_default())
    });
    let (outcome, timed_out) =
        match tokio::time::timeout(Duration::from_secs(PREVIEW_SECS), &mut run).await {
            Ok(r) => (r, false),
            Err(_) => {
                stop.cancel();
                (run.await, true)
            }
        };
    let (report, shown) = match outcome {
        Ok((Ok(report), shown)) => (report, shown),
        Ok((Err(e), _)) => return json_error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => {
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the preview crashed: {e}"),
            );
        }
    };
    let error = if timed_out {
        Some(format!("the preview was stopped after {PREVIEW_SECS} s"))
    } else {
        report.error.clone()
    };
    axum::Json(json!({
        "projectID": body.project_id,
        "jobID": body.job_id,
        "status": report.status,
        "error": error,
        "counters": report.counters,
        "rows": shown.iter().map(row_json).collect::<Vec<_>>(),
        "log": report.jobs.iter().flat_map(|j| j.log.iter()).map(super::wire::LogLine::from).collect::<Vec<_>>(),
    }))
    .into_response()
}
