//! Run history for the console and scripts: `GET /v1/Runs` (filtered, newest
//! first, cursor-paged from an index), a run's log by line and its row errors.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, FixedOffset, SecondsFormat};
use serde::Serialize;
use serde_json::json;

use super::auth::Caller;
use super::wire::ResultsResponse;
use super::{ApiError, AppState, RunCaller};
use crate::run::{Counters, RunStatus};
use crate::store::history::{RunCursor, RunFilter, RunListed};

/// Runs a page holds when the caller names no limit.
pub const RUNS_PAGE_DEFAULT: usize = 50;
/// The most runs one page may hold.
pub const RUNS_PAGE_MAX: usize = 500;

/// A JSON refusal: `{"error": …}`.
pub(super) fn json_error(status: StatusCode, msg: impl Into<String>) -> Response {
    ApiError::error(status, msg).into_response()
}

/// A query parameter by name, case-insensitively; empty counts as absent.
pub(super) fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        // ASCII whitespace only, as the OpenAPI patterns say: a no-break
        // space is text, not blank.
        .map(|(_, v)| v.trim_matches(|c: char| c.is_ascii_whitespace()))
        .filter(|v| !v.is_empty())
}

/// A `limit` parameter: `default` when absent, 1 to `max`.
pub(super) fn limit_param(
    q: &[(String, String)],
    default: usize,
    max: usize,
) -> Result<usize, String> {
    match param(q, "limit") {
        None => Ok(default),
        Some(t) => match t.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(format!(
                "limit must be an integer from 1 to {max}, not {t:?}"
            )),
        },
    }
}

/// A status name, case-insensitively.
pub(super) fn parse_status(t: &str) -> Option<RunStatus> {
    [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Complete,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ]
    .into_iter()
    .find(|s| s.to_string().eq_ignore_ascii_case(t))
}

fn time_param(q: &[(String, String)], name: &str) -> Result<Option<DateTime<FixedOffset>>, String> {
    param(q, name)
        .map(|t| {
            DateTime::parse_from_rfc3339(t).map_err(|_| {
                format!("{name} must be an RFC 3339 time (2026-12-01T09:00:00Z), not {t:?}")
            })
        })
        .transpose()
}

/// Reads the list's query parameters into a filter for `caller`.
fn run_filter(caller: &Caller, q: &[(String, String)]) -> Result<RunFilter, String> {
    let mut errors = Vec::new();
    let mut f = RunFilter {
        instances: caller.instances(),
        project_id: param(q, "project").map(str::to_owned),
        job_id: param(q, "job").map(str::to_owned),
        text: param(q, "q").map(str::to_owned),
        limit: RUNS_PAGE_DEFAULT,
        ..RunFilter::default()
    };
    if let Some(i) = param(q, "instance") {
        // Another instance's runs are simply not there for this caller.
        f.instances = Some(if caller.can_see(i) {
            vec![i.to_owned()]
        } else {
            Vec::new()
        });
    }
    if let Some(t) = param(q, "status") {
        match parse_status(t) {
            Some(s) => f.status = Some(s),
            None => errors.push(format!(
                "status must be Queued, Running, Complete, Failed or Cancelled, not {t:?}"
            )),
        }
    }
    match (time_param(q, "since"), time_param(q, "until")) {
        (Ok(s), Ok(u)) => (f.since, f.until) = (s, u),
        (a, b) => errors.extend(a.err().into_iter().chain(b.err())),
    }
    match limit_param(q, RUNS_PAGE_DEFAULT, RUNS_PAGE_MAX) {
        Ok(n) => f.limit = n,
        Err(e) => errors.push(e),
    }
    if let Some(c) = param(q, "cursor") {
        match RunCursor::decode(c) {
            Some(c) => f.after = Some(c),
            None => errors.push(format!(
                "cursor {c:?} is not one this server gave (use nextCursor as it came)"
            )),
        }
    }
    if f.text.as_ref().is_some_and(|t| t.chars().count() > 200) {
        errors.push("q is longer than 200 characters".into());
    }
    if errors.is_empty() {
        Ok(f)
    } else {
        Err(errors.join("; "))
    }
}

/// An RFC 3339 time with milliseconds, as the console shows them.
pub(super) fn rfc3339(t: &DateTime<FixedOffset>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, false)
}

/// A run in the list.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    /// The run.
    #[serde(rename = "runID")]
    pub run_id: String,
    /// The project.
    #[serde(rename = "projectID")]
    pub project_id: String,
    /// The first job.
    #[serde(rename = "jobID")]
    pub job_id: String,
    /// The instance.
    pub instance: String,
    /// Queued, Running, Complete, Failed or Cancelled.
    pub status: RunStatus,
    /// The job argument (its first 500 characters).
    pub argument: String,
    /// When it was accepted (RFC 3339).
    pub accepted: String,
    /// When a worker took it.
    pub started: Option<String>,
    /// When it ended.
    pub ended: Option<String>,
    /// From start to end (or to now while it runs).
    pub duration_ms: Option<u64>,
    /// The counters summed over its jobs so far.
    pub counters: Counters,
    /// Origin rows per second over the run so far.
    pub rows_per_sec: Option<f64>,
    /// Why it failed.
    pub error: Option<String>,
    /// Each job's results so far (the Results answer).
    pub jobs: Vec<ResultsResponse>,
}

/// Origin rows per second over `ms` milliseconds, to one decimal.
pub(super) fn rate(rows: u64, ms: u64) -> Option<f64> {
    (ms > 0).then(|| (rows as f64 * 10_000.0 / ms as f64).round() / 10.0)
}

impl RunSummary {
    /// The summary of a listed run.
    pub fn of(r: &RunListed) -> Self {
        let jobs: Vec<ResultsResponse> = r
            .results_json
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        let mut counters = Counters::default();
        for j in &jobs {
            counters.add(&j.counters);
        }
        let end = match r.status {
            RunStatus::Running => Some(chrono::Local::now().fixed_offset()),
            _ => r.finished_at,
        };
        let duration_ms = match (r.started_at, end) {
            (Some(s), Some(e)) => Some((e - s).num_milliseconds().max(0) as u64),
            _ => None,
        };
        RunSummary {
            run_id: r.key.run_id.to_string(),
            project_id: r.project_id.clone(),
            job_id: r.job_id.clone(),
            instance: r.key.instance.clone(),
            status: r.status,
            argument: r.argument.clone(),
            accepted: rfc3339(&r.accepted_at),
            started: r.started_at.as_ref().map(rfc3339),
            ended: r.finished_at.as_ref().map(rfc3339),
            duration_ms,
            rows_per_sec: duration_ms.and_then(|ms| rate(counters.total_rows, ms)),
            counters,
            error: r.error.clone(),
            jobs,
        }
    }
}

/// A page of the run list.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunPage {
    /// Newest first.
    pub runs: Vec<RunSummary>,
    /// Send as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The caller's runs, newest first, filtered and paged.
#[utoipa::path(get, path = "/v1/Runs", tag = "tidepool", operation_id = "Runs",
    params(
        ("project" = Option<String>, Query, description = "only this project"),
        ("job" = Option<String>, Query, description = "only runs whose first job is this"),
        ("status" = Option<String>, Query, pattern = r"^[ \t\n\f\r]*$|^[ \t\n\f\r]*([Qq][Uu][Ee][Uu][Ee][Dd]|[Rr][Uu][Nn][Nn][Ii][Nn][Gg]|[Cc][Oo][Mm][Pp][Ll][Ee][Tt][Ee]|[Ff][Aa][Ii][Ll][Ee][Dd]|[Cc][Aa][Nn][Cc][Ee][Ll][Ll][Ee][Dd])[ \t\n\f\r]*$",
            description = "Queued, Running, Complete, Failed or Cancelled (any case); blank means any"),
        ("since" = Option<String>, Query, pattern = r"^[ \t\n\f\r]*$|^[ \t\n\f\r]*[1-9][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])[ \t\n\f\r]*$", description = "accepted at or after (RFC 3339, as 2026-12-01T09:00:00Z); blank means any"),
        ("until" = Option<String>, Query, pattern = r"^[ \t\n\f\r]*$|^[ \t\n\f\r]*[1-9][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])[ \t\n\f\r]*$", description = "accepted at or before (RFC 3339, as 2026-12-01T09:00:00Z); blank means any"),
        ("q" = Option<String>, Query, max_length = 200, description = "text the argument contains (case-insensitive), at most 200 characters"),
        ("instance" = Option<String>, Query, description = "only this instance"),
        ("limit" = Option<String>, Query, pattern = r"^[ \t\n\f\r]*$|^[ \t\n\f\r]*0*([1-9]|[1-9][0-9]|[1-4][0-9]{2}|500)[ \t\n\f\r]*$", description = "1 to 500 in digits; 50 if absent or blank"),
        ("cursor" = Option<String>, Query, pattern = r"^[A-Za-z0-9_-]*$", description = "nextCursor of the page before, as it came (base64url)"),
    ),
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "a page of runs, newest first", body = RunPage),
        (status = 400, description = "a parameter breaks its rule", body = super::wire::ErrorDoc),
        (status = 401, description = "missing or bad credentials", body = super::wire::ExecJobAsyncResponse),
        (status = 503, description = "the store failed", body = super::wire::ErrorDoc)))]
pub async fn list_runs(
    State(svc): State<AppState>,
    Query(q): Query<Vec<(String, String)>>,
    caller: Caller,
) -> Response {
    let filter = match run_filter(&caller, &q) {
        Ok(f) => f,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    let mut found = match svc.store.list_runs(&filter).await {
        Ok(r) => r,
        Err(e) if filter.text.is_some() && e.to_string().contains("text search") => {
            return json_error(StatusCode::BAD_REQUEST, e.to_string());
        }
        // PostgreSQL's statement timeout (57014) on an unindexed text search.
        Err(e) if filter.text.is_some() && e.sql_state() == Some("57014") => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "the text search took too long: narrow it with project, job, status or since",
            );
        }
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let more = found.len() > filter.limit;
    found.truncate(filter.limit);
    let next_cursor = more
        .then(|| found.last().map(|r| r.cursor.encode()))
        .flatten();
    axum::Json(RunPage {
        runs: found.iter().map(RunSummary::of).collect(),
        next_cursor,
    })
    .into_response()
}

/// A log line of `GET /v1/Runs/{id}/log` (and of the event stream).
#[derive(utoipa::ToSchema)]
#[schema(as = runLogLine)]
#[allow(dead_code)]
pub struct LogLineDoc {
    /// Its place in the run's log: a cursor.
    seq: u64,
    /// When it was written.
    time: String,
    /// Low, Medium or High.
    level: String,
    #[schema(rename = "jobID")]
    job_id: String,
    /// The origin row it is about.
    row: Option<u64>,
    message: String,
}

/// A page of `GET /v1/Runs/{id}/log`.
#[derive(utoipa::ToSchema)]
#[schema(as = runLogPage)]
#[allow(dead_code)]
pub struct LogPageDoc {
    lines: Vec<LogLineDoc>,
    /// Send as `cursor` for the next page; null on the last page.
    #[schema(rename = "nextCursor")]
    next_cursor: Option<String>,
}

/// A row error of `GET /v1/Runs/{id}/errors`.
#[derive(utoipa::ToSchema)]
#[schema(as = rowError)]
#[allow(dead_code)]
pub struct RowErrorDoc {
    seq: u64,
    #[schema(rename = "jobID")]
    job_id: String,
    /// The origin row.
    row: u64,
    /// The stage (1-based; 0: reading the row or its batch).
    stage: u64,
    #[schema(rename = "stageName")]
    stage_name: Option<String>,
    message: String,
    /// The origin columns, in order.
    columns: Vec<String>,
    /// The origin values by column.
    values: std::collections::HashMap<String, String>,
}

/// A page of `GET /v1/Runs/{id}/errors`.
#[derive(utoipa::ToSchema)]
#[schema(as = rowErrorPage)]
#[allow(dead_code)]
pub struct ErrorPageDoc {
    errors: Vec<RowErrorDoc>,
    /// Row errors of the run in all.
    total: u64,
    /// Row errors kept (the first of each job).
    kept: u64,
    /// Some were not kept.
    truncated: bool,
    /// Row errors kept per job at most.
    #[schema(rename = "keptPerJob")]
    kept_per_job: u64,
    /// Send as `cursor` for the next page; null on the last page.
    #[schema(rename = "nextCursor")]
    next_cursor: Option<String>,
}

/// Log lines a page holds when the caller names no limit, and at most.
const LOG_PAGE_DEFAULT: usize = 200;
const LOG_PAGE_MAX: usize = 1000;
/// Row errors a page holds when the caller names no limit, and at most.
const ERRORS_PAGE_DEFAULT: usize = 100;
const ERRORS_PAGE_MAX: usize = 1000;

/// The name of a log level number.
pub(super) fn level_name(level: u8) -> &'static str {
    match level {
        1 => "Low",
        2 => "Medium",
        _ => "High",
    }
}

/// `level`: 1 to 3 or Low, Medium, High (lines at that level or more important).
fn level_param(q: &[(String, String)]) -> Result<u8, String> {
    let Some(t) = param(q, "level") else {
        return Ok(3);
    };
    match t.to_ascii_lowercase().as_str() {
        "1" | "low" => Ok(1),
        "2" | "medium" => Ok(2),
        "3" | "high" => Ok(3),
        _ => Err(format!(
            "level must be 1, 2, 3, Low, Medium or High, not {t:?}"
        )),
    }
}

/// `cursor` of a log or error page: the last `seq` seen.
fn seq_cursor(q: &[(String, String)]) -> Result<u64, String> {
    match param(q, "cursor") {
        None => Ok(0),
        Some(t) => t
            .parse()
            .map_err(|_| format!("cursor must be the nextCursor of the page before, not {t:?}")),
    }
}

/// A stored log line as the API shows it.
pub(super) fn log_line_json(l: &crate::store::history::StoredLogLine) -> serde_json::Value {
    json!({
        "seq": l.seq,
        "time": l.time,
        "level": level_name(l.level),
        "jobID": l.job,
        "row": l.row,
        "message": l.message,
    })
}

/// The run the path names, if the caller may see it; else the refusal (404).
async fn visible_run(
    svc: &AppState,
    who: &RunCaller,
    q: &[(String, String)],
) -> Result<crate::store::RunRecord, Response> {
    who.run(svc, param(q, "instance").map(str::to_owned))
        .await
        .map_err(IntoResponse::into_response)
}

/// A run's log, line by line, paged, at a level or more important.
#[utoipa::path(get, path = "/v1/Runs/{id}/log", tag = "tidepool", operation_id = "RunLog",
    params(("id" = String, Path, description = "the runID"),
        ("level" = Option<String>, Query, pattern = r"^[ \t\n\f\r]*$|^[ \t\n\f\r]*([123]|[Ll][Oo][Ww]|[Mm][Ee][Dd][Ii][Uu][Mm]|[Hh][Ii][Gg][Hh])[ \t\n\f\r]*$", description = "1, 2, 3 or Low, Medium, High (any case): lines at this level or more important; blank or absent: 3 (all)"),
        ("cursor" = Option<String>, Query, pattern = r"^[ \t\n\f\r]*$|^[ \t\n\f\r]*0*[0-9]{1,19}[ \t\n\f\r]*$", description = "nextCursor of the page before (a line number); blank or absent: from the start"),
        ("limit" = Option<String>, Query, pattern = r"^[ \t\n\f\r]*$|^[ \t\n\f\r]*0*([1-9]|[1-9][0-9]{1,2}|1000)[ \t\n\f\r]*$", description = "1 to 1000 in digits; 200 if absent or blank"),
        ("instance" = Option<String>, Query, description = "the instance the run belongs to; default the caller's primary instance")),
    security(("bearer" = []), ("apiKey" = [])),
    responses((status = 200, description = "a page of log lines", body = LogPageDoc),
        (status = 400, description = "a parameter breaks its rule", body = super::wire::ErrorDoc),
        (status = 401, description = "missing or bad credentials", body = super::wire::ExecJobAsyncResponse),
        (status = 404, description = "unknown run, or another instance's", body = super::wire::ExecJobAsyncResponse),
        (status = 503, description = "the store failed", body = super::wire::ErrorDoc)))]
pub async fn run_log(
    State(svc): State<AppState>,
    Query(q): Query<Vec<(String, String)>>,
    who: RunCaller,
) -> Response {
    let rec = match visible_run(&svc, &who, &q).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let args = (
        level_param(&q),
        seq_cursor(&q),
        limit_param(&q, LOG_PAGE_DEFAULT, LOG_PAGE_MAX),
    );
    let (level, after, limit) = match args {
        (Ok(l), Ok(a), Ok(n)) => (l, a, n),
        (l, a, n) => {
            let errors: Vec<String> = [l.err(), a.err(), n.err()].into_iter().flatten().collect();
            return json_error(StatusCode::BAD_REQUEST, errors.join("; "));
        }
    };
    let mut lines = match svc.store.log_lines(&rec.key, level, after, limit + 1).await {
        Ok(l) => l,
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let more = lines.len() > limit;
    lines.truncate(limit);
    let next = more
        .then(|| lines.last().map(|l| l.seq.to_string()))
        .flatten();
    axum::Json(json!({
        "lines": lines.iter().map(log_line_json).collect::<Vec<_>>(),
        "nextCursor": next,
    }))
    .into_response()
}

/// A run's row errors with their origin values, paged; kept at every log level.
#[utoipa::path(get, path = "/v1/Runs/{id}/errors", tag = "tidepool", operation_id = "RunErrors",
    params(("id" = String, Path, description = "the runID"),
        ("cursor" = Option<String>, Query, pattern = r"^[ \t\n\f\r]*$|^[ \t\n\f\r]*0*[0-9]{1,19}[ \t\n\f\r]*$", description = "nextCursor of the page before (a line number); blank or absent: from the start"),
        ("limit" = Option<String>, Query, pattern = r"^[ \t\n\f\r]*$|^[ \t\n\f\r]*0*([1-9]|[1-9][0-9]{1,2}|1000)[ \t\n\f\r]*$", description = "1 to 1000 in digits; 100 if absent or blank"),
        ("instance" = Option<String>, Query, description = "the instance the run belongs to; default the caller's primary instance")),
    security(("bearer" = []), ("apiKey" = [])),
    responses((status = 200, description = "a page of row errors", body = ErrorPageDoc),
        (status = 400, description = "a parameter breaks its rule", body = super::wire::ErrorDoc),
        (status = 401, description = "missing or bad credentials", body = super::wire::ExecJobAsyncResponse),
        (status = 404, description = "unknown run, or another instance's", body = super::wire::ExecJobAsyncResponse),
        (status = 503, description = "the store failed", body = super::wire::ErrorDoc)))]
pub async fn run_errors(
    State(svc): State<AppState>,
    Query(q): Query<Vec<(String, String)>>,
    who: RunCaller,
) -> Response {
    let rec = match visible_run(&svc, &who, &q).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let (after, limit) = match (
        seq_cursor(&q),
        limit_param(&q, ERRORS_PAGE_DEFAULT, ERRORS_PAGE_MAX),
    ) {
        (Ok(a), Ok(n)) => (a, n),
        (a, n) => {
            let errors: Vec<String> = [a.err(), n.err()].into_iter().flatten().collect();
            return json_error(StatusCode::BAD_REQUEST, errors.join("; "));
        }
    };
    let (mut errors, totals) = match svc.store.row_errors(&rec.key, after, limit + 1).await {
        Ok(found) => found,
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let more = errors.len() > limit;
    errors.truncate(limit);
    let next = more
        .then(|| errors.last().map(|e| e.seq.to_string()))
        .flatten();
    let list: Vec<_> = errors
        .iter()
        .map(|e| {
            json!({
                "seq": e.seq,
                "jobID": e.job,
                "row": e.row,
                "stage": e.stage,
                "stageName": e.stage_name,
                "message": e.message,
                "columns": e.values.iter().map(|(c, _)| c).collect::<Vec<_>>(),
                "values": e.values.iter()
                    .map(|(c, v)| (c.clone(), serde_json::Value::String(v.clone())))
                    .collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    axum::Json(json!({
        "errors": list,
        "total": totals.total,
        "kept": totals.kept,
        "truncated": totals.total > totals.kept,
        "keptPerJob": crate::engine::ROW_ERRORS_KEPT,
        "nextCursor": next,
    }))
    .into_response()
}

/// `GET /v1/Runs/{id}` in JSON: the answer as before (same fields, same
/// order) and, after them, `instance` and `request`: the parameters the run
/// was accepted with (`argument`, `beginAtRow`, `endAfterRow`, `threadCount`,
/// `loggingLevel`, `chainJobs`, …), so a console can run it again.
pub(super) fn with_request(
    resp: &super::wire::ExecJobResponse,
    rec: &crate::store::RunRecord,
    tick: Option<&crate::store::schedules::TickRecord>,
    extras: &str,
) -> Response {
    let answer = serde_json::to_string(resp).unwrap_or_default();
    let scheduled = tick
        .map(|t| {
            format!(
                ",\"schedule\":{}",
                json!({"name": t.key.name, "tick": t.tick_at.to_rfc3339(),
                    "catchUp": t.catch_up, "covers": t.covers})
            )
        })
        .unwrap_or_default();
    let request: serde_json::Value = serde_json::from_str(&rec.request_json).unwrap_or_default();
    let body = match answer.strip_suffix('}') {
        // The node is there only on a shared store (where it tells which
        // node ran, or runs, the run); requeues only once there were some.
        Some(head) => format!(
            "{head},\"instance\":{}{}{}{scheduled}{extras},\"request\":{request}}}",
            json!(rec.key.instance),
            rec.node_id
                .as_ref()
                .map(|n| format!(",\"node\":{}", json!(n)))
                .unwrap_or_default(),
            if rec.requeues > 0 {
                format!(",\"requeues\":{}", rec.requeues)
            } else {
                String::new()
            }
        ),
        None => answer,
    };
    (
        StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
