//! `POST /v1/Preview`: a job's first rows as they would be written and what
//! each stage would do with them; the engine's preview mode writes nothing
//! (database work rolled back, files untouched) and nothing is recorded.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;

use super::AppState;
use super::auth::Caller;
use super::runs::json_error;
use super::wire::MAX_ROW;
use crate::engine::{self, CancelToken, LogLevel, PreviewRow, RunObserver, RunRequest};
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
    /// A number, read by [`whole`] (JSON's `20.0` is 20 too).
    rows: Option<serde_json::Number>,
    begin_at_row: Option<serde_json::Number>,
    instance: Option<String>,
}

/// The body of `POST /v1/Preview` in the OpenAPI document.
pub struct PreviewRequestDoc;

impl utoipa::PartialSchema for PreviewRequestDoc {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let schema = json!({
            "type": "object",
            "description": "Unknown fields are ignored.",
            "required": ["projectID", "jobID"],
            "properties": {
                "projectID": {"type": "string", "description": "the project (name in any case)", "example": "demo"},
                "jobID": {"type": "string", "description": "the job", "example": "contacts"},
                "argument": {"type": "string", "description": "@@VAR:JobArgument@@ in the job; default empty"},
                "rows": {"type": ["integer", "null"], "minimum": 1, "maximum": PREVIEW_ROWS_MAX,
                    "description": format!("rows to show, 1 to {PREVIEW_ROWS_MAX}; default {PREVIEW_ROWS_DEFAULT}")},
                "beginAtRow": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_ROW,
                    "description": "the first origin row shown (1-based); default 1"},
                "instance": {"type": ["string", "null"], "description": "the instance; default the caller's primary instance"},
            },
        });
        serde_json::from_value(schema).expect("the preview request schema is valid OpenAPI")
    }
}

impl utoipa::ToSchema for PreviewRequestDoc {
    fn name() -> std::borrow::Cow<'static, str> {
        "previewRequest".into()
    }
}

/// What one stage would do with a preview row.
#[derive(utoipa::ToSchema)]
#[schema(as = previewStage)]
#[allow(dead_code)]
pub struct PreviewStageDoc {
    /// The stage's name.
    stage: String,
    /// Insert, Update, Delete, Skip, Ignore or Error.
    action: String,
    /// The destination columns, in order.
    columns: Vec<String>,
    /// The values it would write, by destination column.
    values: std::collections::HashMap<String, String>,
}

/// A preview row.
#[derive(utoipa::ToSchema)]
#[schema(as = previewRow)]
#[allow(dead_code)]
pub struct PreviewRowDoc {
    /// The origin row (1-based).
    row: u64,
    /// The origin columns, in order.
    columns: Vec<String>,
    /// The origin values by column.
    origin: std::collections::HashMap<String, String>,
    /// Why the row failed, if it did.
    error: Option<String>,
    stages: Vec<PreviewStageDoc>,
}

/// The answer of `POST /v1/Preview`.
#[derive(utoipa::ToSchema)]
#[schema(as = previewResponse)]
#[allow(dead_code)]
pub struct PreviewAnswerDoc {
    #[schema(rename = "projectID")]
    project_id: String,
    #[schema(rename = "jobID")]
    job_id: String,
    status: crate::run::RunStatus,
    /// Why the preview failed or was stopped.
    error: Option<String>,
    counters: crate::run::Counters,
    rows: Vec<PreviewRowDoc>,
    log: Vec<super::wire::LogLine>,
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

/// A whole number from 1 to `max`, as JSON writes it (`20` or `20.0`).
fn whole(n: Option<&serde_json::Number>, name: &str, max: u64) -> Result<Option<u64>, String> {
    let Some(n) = n else { return Ok(None) };
    let value = n.as_u64().or_else(|| {
        // An integral float below 2^64 converts exactly.
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f < 18_446_744_073_709_551_616.0)
            .map(|f| f as u64)
    });
    match value {
        Some(v) if (1..=max).contains(&v) => Ok(Some(v)),
        _ => Err(format!(
            "{name} must be a whole number from 1 to {max}, not {n}"
        )),
    }
}

/// Checks the body: the request, or the refusal.
fn read_request(bytes: &[u8]) -> Result<(PreviewBody, u64, u64), String> {
    let body: PreviewBody =
        serde_json::from_slice(bytes).map_err(|e| format!("malformed preview request: {e}"))?;
    let rows = whole(body.rows.as_ref(), "rows", PREVIEW_ROWS_MAX)?.unwrap_or(PREVIEW_ROWS_DEFAULT);
    let begin = whole(body.begin_at_row.as_ref(), "beginAtRow", MAX_ROW)?.unwrap_or(1);
    Ok((body, rows, begin))
}

/// Runs a job in preview mode on its first rows; writes nothing.
#[utoipa::path(post, path = "/v1/Preview", tag = "tidepool", operation_id = "Preview",
    request_body(content = PreviewRequestDoc, content_type = "application/json"),
    security(("bearer" = []), ("apiKey" = [])),
    responses((status = 200, description = "the rows as they would be written, and what each stage would do with them", body = PreviewAnswerDoc),
        (status = 400, description = "the body is not a preview request, or a field breaks its rule", body = super::wire::ErrorDoc),
        (status = 401, description = "missing or bad credentials", body = super::wire::ExecJobAsyncResponse),
        (status = 403, description = "read-only role", body = super::wire::ErrorDoc),
        (status = 404, description = "unknown project or job (in the caller's instance)", body = super::wire::ErrorDoc),
        (status = 413, description = "the body is too large", body = super::wire::ErrorDoc),
        (status = 500, description = "the preview crashed (a bug)", body = super::wire::ErrorDoc),
        (status = 503, description = "too many previews at once, or the store failed", body = super::wire::ErrorDoc)))]
pub async fn preview(State(svc): State<AppState>, caller: Caller, body: Body) -> Response {
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
    // Near the largest row there may be fewer than `rows` rows to show.
    req.end_after_row = Some(begin.saturating_add(rows - 1).min(MAX_ROW));
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
        "log": report.jobs.iter().flat_map(|j| j.log.iter()).map(crate::server::history::log_line).collect::<Vec<_>>(),
    }))
    .into_response()
}
