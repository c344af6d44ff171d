//! The HTTP API: the Starfish ETL v1 job API and tidepool's additions.
//!
//! Paths match case-insensitively (as ASP.NET routes do); bodies are read by
//! our own extractor that switches on `Content-Type`; answers are JSON or XML
//! by `Accept`. Every refusal carries `started: false` and an `error` naming
//! the problem. Handlers take the caller and the answer format as extractors
//! and refuse with one error type, [`ApiError`] (see [`extract`]); the
//! credential cache and login limits live in the router's [`AppState`].

pub mod auth;
pub mod console;
pub mod events;
pub mod extract;
pub mod incremental;
pub mod nodes;
pub mod preview;
pub mod projects;
pub mod rerun;
pub mod runs;
pub mod schedules;
pub mod scrape;
pub mod wire;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use crate::project::Project;
use crate::run::RunStatus;
use crate::server::{Service, SubmitError};
use crate::store::{Role, RunKey, RunRecord, Submitted};
use auth::Caller;
pub use extract::{AnswerFormat, ApiError, RunCaller};
use wire::{
    ExecJobAsyncRequestDoc, ExecJobAsyncRequestTextDoc, ExecJobAsyncResponse, ExecJobRequest,
    ExecJobRequestDoc, ExecJobRequestTextDoc, ExecJobResponse, FieldMap, Format, Many, Reply,
    ResultsResponse, WebhookAttemptLine, WireValue,
};

/// What the handlers share: the server, and the API's own state for
/// authenticating callers (the run queue has no use for it). It derefs to the
/// [`Service`], which is what most handlers need of it.
#[derive(Clone)]
pub struct AppState {
    /// The server.
    pub service: Arc<Service>,
    /// Credentials that checked out recently.
    pub credentials: Arc<auth::CredentialCache>,
    /// `POST /token`'s limits: password checks at once, backoff.
    pub logins: Arc<auth::LoginGuard>,
}

impl AppState {
    /// The API's state over `service`, with an empty credential cache and
    /// login guard. Build it once per server: the login limits live in it.
    pub fn new(service: Arc<Service>) -> Self {
        let logins = Arc::new(auth::LoginGuard::new(&service.config.login));
        AppState {
            service,
            credentials: Default::default(),
            logins,
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.service
    }
}

/// The router, with paths matched case-insensitively.
pub fn app(
    state: AppState,
) -> impl tower::Service<
    Request,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    metrics_handle();
    let router = Router::new()
        .route("/v1/executejobasync", post(execute_job_async))
        .route("/v1/executejob", post(execute_job))
        .route("/v1/results/{id}", get(results))
        .route("/v1/webhook", post(webhook))
        .route("/token", post(token))
        .route("/v1/runs", get(runs::list_runs))
        .route("/v1/runs/{id}", get(run_detail))
        .route("/v1/runs/{id}/cancel", post(cancel))
        .route("/v1/runs/{id}/rerun", post(rerun::rerun))
        .route("/v1/runs/{id}/log", get(runs::run_log))
        .route("/v1/runs/{id}/errors", get(runs::run_errors))
        .route("/v1/runs/{id}/events", get(events::run_events))
        .route("/v1/projects", get(projects))
        .route("/v1/projects/{id}", get(project))
        .route("/v1/projects/reload", post(projects::reload))
        .route("/v1/preview", post(preview::preview))
        .route("/v1/nodes", get(nodes::nodes))
        .route("/v1/schedules", get(schedules::list))
        .route(
            "/v1/schedules/{project}/{job}/{name}/pause",
            post(schedules::pause),
        )
        .route(
            "/v1/schedules/{project}/{job}/{name}/resume",
            post(schedules::resume),
        )
        .route(
            "/v1/jobs/{project}/{job}/highwater",
            axum::routing::delete(incremental::reset_high_water),
        )
        .route("/console/login", post(console::login))
        .route("/console/logout", post(console::logout))
        .route("/console/me", get(console::me))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .merge(console::pages::routes())
        .fallback(not_found)
        .layer(middleware::from_fn(console::csrf_guard))
        .layer(middleware::from_fn(observe))
        .with_state(state);
    tower::ServiceBuilder::new()
        .map_request(|mut req: Request| {
            let lower = req.uri().path().to_ascii_lowercase();
            if lower != req.uri().path() {
                let pq = match req.uri().query() {
                    Some(q) => format!("{lower}?{q}"),
                    None => lower,
                };
                if let Ok(pq) = pq.parse::<axum::http::uri::PathAndQuery>() {
                    let mut parts = req.uri().clone().into_parts();
                    parts.path_and_query = Some(pq);
                    if let Ok(uri) = axum::http::Uri::from_parts(parts) {
                        *req.uri_mut() = uri;
                    }
                }
            }
            req
        })
        .map_response(retry_after_on_503)
        .service(router)
}

/// Every 503 (a full queue, a store that cannot be reached, a server
/// stopping) tells the client when to try again, whichever handler wrote it.
fn retry_after_on_503(mut res: Response) -> Response {
    if res.status() == StatusCode::SERVICE_UNAVAILABLE
        && !res.headers().contains_key(axum::http::header::RETRY_AFTER)
    {
        res.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
    }
    res
}

/// The Prometheus recorder, installed once per process.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Request latency and a log line per request.
async fn observe(req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let secs = t0.elapsed().as_secs_f64();
    let route = route_label(&path);
    metrics::histogram!("tidepool_http_request_duration_seconds", "route" => route).record(secs);
    tracing::debug!(%method, path, status = resp.status().as_u16(), ms = secs * 1e3, "request");
    resp
}

fn route_label(path: &str) -> &'static str {
    match path.split('/').nth(2).unwrap_or("") {
        "executejobasync" => "ExecuteJobAsync",
        "executejob" => "ExecuteJob",
        "results" => "Results",
        "webhook" => "Webhook",
        "runs" => "Runs",
        "projects" => "Projects",
        _ if path == "/token" => "token",
        _ => "other",
    }
}

/// The body, up to the server's limit; past it, a 413 refusal.
async fn read_body(svc: &Service, body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, svc.config.body_limit)
        .await
        .map_err(|_| {
            ApiError::refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than {} bytes",
                    svc.config.body_limit
                ),
            )
        })
}

/// The run ID as sent, for answers about a request that did not validate.
fn raw_run_id(fields: &FieldMap) -> String {
    match fields.get("runid") {
        Some(WireValue::Text(s)) | Some(WireValue::Number(s)) => s.chars().take(36).collect(),
        _ => String::new(),
    }
}

/// Resolves the instance and project of a request for `caller`, who must be
/// allowed to execute there. Another instance's project answers like an unknown one.
fn target<'a>(
    svc: &Service,
    projects: &'a crate::project::LoadOutcome,
    caller: &Caller,
    req: &ExecJobRequest,
) -> Result<(String, &'a Project), (StatusCode, String)> {
    let instance = req
        .instance
        .clone()
        .unwrap_or_else(|| caller.primary.clone());
    let unknown = || {
        (
            StatusCode::NOT_FOUND,
            format!(
                "unknown project {:?} or job {:?}",
                req.project_id, req.job_id
            ),
        )
    };
    let role = caller.role_in(&instance).ok_or_else(unknown)?;
    let project =
        projects.project_in(&instance, &req.project_id).ok_or_else(
            || match projects::load_failure(svc, &instance, &req.project_id) {
                Some(why) => (StatusCode::NOT_FOUND, why),
                None => unknown(),
            },
        )?;
    project.job(&req.job_id).ok_or_else(unknown)?;
    if role < Role::Full {
        return Err((
            StatusCode::FORBIDDEN,
            format!(
                "your role in instance {instance:?} is read-only: executing jobs needs Owner or Full"
            ),
        ));
    }
    Ok((instance, project))
}

/// Validates and records a run; the answer of ExecuteJobAsync (and the first
/// step of ExecuteJob). The body is read before the caller is authenticated:
/// a refusal names the run ID the body sent.
async fn accept(
    svc: &AppState,
    headers: &HeaderMap,
    body: Body,
    webhook: bool,
) -> Result<(RunKey, ExecJobRequest), ApiError> {
    let format = wire::answer_format(headers);
    let bytes = read_body(svc, body)
        .await
        .map_err(|e| e.in_format(format))?;
    let fields = wire::parse_body(headers, &bytes).map_err(|e| {
        let status = if e.unsupported {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::refusal(status, e.message).in_format(format)
    })?;
    let run_id = raw_run_id(&fields);
    let refused = |status, message: String| {
        ApiError::refusal(status, message)
            .in_format(format)
            .for_run(&run_id)
    };
    let caller = auth::authenticate(svc, headers)
        .await
        .map_err(|e| ApiError::from(e).in_format(format).for_run(&run_id))?;
    let req = ExecJobRequest::from_fields(&fields, webhook)
        .map_err(|e| refused(StatusCode::BAD_REQUEST, e.to_string()))?;
    let projects = svc.projects();
    let (instance, _) = target(svc, &projects, &caller, &req).map_err(|(s, e)| refused(s, e))?;
    match svc.submit(&instance, &req).await {
        Ok(Submitted::Accepted | Submitted::Duplicate) => Ok((
            RunKey {
                instance,
                run_id: req.run_id,
            },
            req,
        )),
        Ok(Submitted::Conflict) | Err(SubmitError::Conflict(_)) => Err(refused(
            StatusCode::CONFLICT,
            format!("runID {run_id} was already used with other parameters"),
        )),
        Err(e @ (SubmitError::QueueFull(_) | SubmitError::ShuttingDown)) => {
            Err(refused(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).retry_after())
        }
        Err(SubmitError::Store(e)) => Err(refused(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the run could not be recorded: {e}"),
        )
        .retry_after()),
    }
}

/// Starts a run and answers at once.
#[utoipa::path(post, path = "/v1/ExecuteJobAsync", tag = "v1", operation_id = "ExecuteJobAsync",
    request_body(description = "JSON, XML (DataContract) or form", content(
        (ExecJobAsyncRequestDoc = "application/json"), (ExecJobAsyncRequestDoc = "text/json"),
        (ExecJobAsyncRequestTextDoc = "application/xml"), (ExecJobAsyncRequestTextDoc = "text/xml"),
        (ExecJobAsyncRequestTextDoc = "application/x-www-form-urlencoded"))),
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "recorded durably; it will run (also the answer to the same request again)", body = ExecJobAsyncResponse,
        links(
            ("Results" = (operation_id = "Results", parameters(("id" = "$response.body#/runID")), description = "the run's per-job results")),
            ("Run" = (operation_id = "Run", parameters(("id" = "$response.body#/runID")), description = "the run's full answer")),
            ("CancelRun" = (operation_id = "CancelRun", parameters(("id" = "$response.body#/runID")), description = "cancel the run"))
        )),
        (status = 400, description = "a field breaks its rule, or the body does not parse", body = ExecJobAsyncResponse),
        (status = 401, description = "missing or bad credentials", body = ExecJobAsyncResponse),
        (status = 403, description = "read-only role", body = ExecJobAsyncResponse),
        (status = 404, description = "unknown project or job (in the caller's instance)", body = ExecJobAsyncResponse),
        (status = 409, description = "the runID was used with other parameters", body = ExecJobAsyncResponse),
        (status = 413, description = "the body is too large", body = ExecJobAsyncResponse),
        (status = 415, description = "unsupported media type", body = ExecJobAsyncResponse),
        (status = 503, description = "the queue is full, the server is stopping, or the store failed; see Retry-After", body = ExecJobAsyncResponse),
    ))]
async fn execute_job_async(
    State(svc): State<AppState>,
    AnswerFormat(format): AnswerFormat,
    headers: HeaderMap,
    body: Body,
) -> Result<Reply, ApiError> {
    let (key, _) = accept(&svc, &headers, body, true).await?;
    Ok(Reply::one(
        StatusCode::OK,
        format,
        &ExecJobAsyncResponse {
            run_id: key.run_id.to_string(),
            started: true,
            error: None,
        },
    ))
}

/// Runs a job and answers when the run (and its chain) ends.
#[utoipa::path(post, path = "/v1/ExecuteJob", tag = "v1", operation_id = "ExecuteJob",
    request_body(description = "JSON, XML (DataContract) or form", content(
        (ExecJobRequestDoc = "application/json"), (ExecJobRequestDoc = "text/json"),
        (ExecJobRequestTextDoc = "application/xml"), (ExecJobRequestTextDoc = "text/xml"),
        (ExecJobRequestTextDoc = "application/x-www-form-urlencoded"))),
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "the run ended", body = ExecJobResponse, links(
            ("Results" = (operation_id = "Results", parameters(("id" = "$response.body#/runID")), description = "the run's per-job results")),
            ("Run" = (operation_id = "Run", parameters(("id" = "$response.body#/runID")), description = "the run's full answer")),
            ("CancelRun" = (operation_id = "CancelRun", parameters(("id" = "$response.body#/runID")), description = "cancel the run"))
        )),
        (status = 202, description = "execute_job_wait_secs is up: the run as it stands", body = ExecJobResponse, links(
            ("Results" = (operation_id = "Results", parameters(("id" = "$response.body#/runID")), description = "the run's per-job results")),
            ("Run" = (operation_id = "Run", parameters(("id" = "$response.body#/runID")), description = "the run's full answer")),
            ("CancelRun" = (operation_id = "CancelRun", parameters(("id" = "$response.body#/runID")), description = "cancel the run"))
        )),
        (status = 400, description = "a field breaks its rule, or the body does not parse", body = ExecJobAsyncResponse),
        (status = 401, description = "missing or bad credentials", body = ExecJobAsyncResponse),
        (status = 403, description = "read-only role", body = ExecJobAsyncResponse),
        (status = 404, description = "unknown project or job (in the caller's instance)", body = ExecJobAsyncResponse),
        (status = 409, description = "the runID was used with other parameters", body = ExecJobAsyncResponse),
        (status = 413, description = "the body is too large", body = ExecJobAsyncResponse),
        (status = 415, description = "unsupported media type", body = ExecJobAsyncResponse),
        (status = 500, description = "the run ended without a result (a bug)", body = ExecJobAsyncResponse),
        (status = 503, description = "the queue is full, this node runs no jobs (--workers 0) and shares its store with no other, or the store failed", body = ExecJobAsyncResponse),
    ))]
async fn execute_job(
    State(svc): State<AppState>,
    AnswerFormat(format): AnswerFormat,
    headers: HeaderMap,
    body: Body,
) -> Result<Reply, ApiError> {
    if svc.config.workers == 0 && !svc.store.is_shared() {
        // Nothing would ever run it (on a shared store, another node will):
        // say so instead of waiting forever.
        return Err(ApiError::refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server runs no jobs (--workers 0): call ExecuteJobAsync and read /v1/Results/{runID}",
        )
        .in_format(format));
    }
    let (key, _) = accept(&svc, &headers, body, false).await?;
    let ended = match svc.config.execute_job_wait_secs {
        0 => svc.wait_for_end(&key).await,
        secs => {
            let wait = std::time::Duration::from_secs(secs);
            match tokio::time::timeout(wait, svc.wait_for_end(&key)).await {
                Ok(ended) => ended,
                Err(_) => return still_going(&svc, &key, format).await,
            }
        }
    };
    let refused = |status, message: String| {
        ApiError::refusal(status, message)
            .in_format(format)
            .for_run(key.run_id.to_string())
    };
    match ended {
        Ok(Some(rec)) => final_reply(&rec, format),
        Ok(None) => Err(refused(StatusCode::NOT_FOUND, "the run is gone".into())),
        Err(e) => Err(refused(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

/// ExecuteJob's answer when its wait is up: 202 with the run as it stands
/// (status Queued or Running, counters so far); the rest is in Results.
async fn still_going(svc: &Service, key: &RunKey, format: wire::Format) -> Result<Reply, ApiError> {
    let id = key.run_id.to_string();
    let refused = |status, message: String| {
        ApiError::refusal(status, message)
            .in_format(format)
            .for_run(&id)
    };
    match svc.store.run(key).await {
        Ok(Some(rec)) if matches!(rec.status, RunStatus::Queued | RunStatus::Running) => {
            let mut resp = ExecJobResponse::ended_without_report(
                &id,
                rec.status,
                &rec.accepted_at,
                results_of(&rec),
                "",
            );
            resp.error = None;
            Ok(Reply::one(StatusCode::ACCEPTED, format, &resp))
        }
        // It ended just now: the final answer after all.
        Ok(Some(rec)) => final_reply(&rec, format),
        Ok(None) => Err(refused(StatusCode::NOT_FOUND, "the run is gone".into())),
        Err(e) => Err(refused(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

/// The final answer of an ended run; a 500 if it has none (a bug).
fn final_reply(rec: &RunRecord, format: Format) -> Result<Reply, ApiError> {
    match final_response(rec) {
        Some(resp) => Ok(Reply::one(StatusCode::OK, format, &resp)),
        None => Err(ApiError::refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the run ended without a result",
        )
        .in_format(format)
        .for_run(rec.key.run_id.to_string())),
    }
}

fn final_response(rec: &RunRecord) -> Option<ExecJobResponse> {
    rec.response_json
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok())
}

/// The results of a run as the Results API shows them (live while it runs).
fn results_of(rec: &RunRecord) -> Vec<ResultsResponse> {
    let mut out: Vec<ResultsResponse> = rec
        .results_json
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default();
    // Until the run's end is recorded it is going: a job that just completed
    // may still be followed by the next of its chain (unless another job of
    // its graph is still running).
    if rec.status == RunStatus::Running
        && !out.iter().any(|r| r.status == RunStatus::Running)
        && let Some(last) = out.last_mut()
    {
        last.status = RunStatus::Running;
    }
    if out.is_empty() {
        out.push(ResultsResponse::new(
            &rec.key.run_id.to_string(),
            &rec.job_id,
            &rec.accepted_at,
            std::time::Duration::ZERO,
            rec.status,
            &Default::default(),
        ));
    }
    out
}

#[derive(serde::Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct InstanceQuery {
    /// The instance the run belongs to; default the caller's primary instance.
    #[serde(alias = "Instance", alias = "INSTANCE")]
    instance: Option<String>,
}

/// The per-job results of a run (live while it runs).
#[utoipa::path(get, path = "/v1/Results/{id}", tag = "v1", operation_id = "Results",
    params(("id" = String, Path, description = "the runID"), InstanceQuery),
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "one per job the run executed, in order (live while it runs)", body = Vec<ResultsResponse>),
        (status = 401, description = "missing or bad credentials", body = ExecJobAsyncResponse),
        (status = 404, description = "unknown run, or another instance's: []", body = Vec<ResultsResponse>),
        (status = 503, description = "the store failed", body = ExecJobAsyncResponse),
    ))]
async fn results(
    State(svc): State<AppState>,
    Query(q): Query<InstanceQuery>,
    who: RunCaller,
) -> Result<Reply, ApiError> {
    Ok(match who.find(&svc, q.instance).await? {
        Some(rec) => Reply::many(StatusCode::OK, who.format, &Many(results_of(&rec))),
        None => {
            Reply::many::<ResultsResponse>(StatusCode::NOT_FOUND, who.format, &Many(Vec::new()))
        }
    })
}

/// The full answer of a run, with its log and webhook attempts.
#[utoipa::path(get, path = "/v1/Runs/{id}", tag = "tidepool", operation_id = "Run",
    params(("id" = String, Path, description = "the runID"), InstanceQuery),
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "the run's answer (live while it runs), with its webhook attempts", body = ExecJobResponse),
        (status = 401, description = "missing or bad credentials", body = ExecJobAsyncResponse),
        (status = 404, description = "unknown run, or another instance's", body = ExecJobAsyncResponse),
        (status = 503, description = "the store failed", body = ExecJobAsyncResponse),
    ))]
async fn run_detail(
    State(svc): State<AppState>,
    Query(q): Query<InstanceQuery>,
    who: RunCaller,
) -> Result<Response, ApiError> {
    let rec = who.run(&svc, q.instance).await?;
    let mut resp = final_response(&rec).unwrap_or_else(|| {
        let results = results_of(&rec);
        let mut r = ExecJobResponse::ended_without_report(
            &rec.key.run_id.to_string(),
            rec.status,
            &rec.accepted_at,
            results,
            "",
        );
        r.error = None;
        r
    });
    let attempts = svc.store.attempts(&rec.key).await.unwrap_or_default();
    resp.webhook_attempts = Some(
        attempts
            .into_iter()
            .map(|a| WebhookAttemptLine {
                attempt: a.attempt,
                time: wire::datetime(&a.at),
                status_code: a.status_code,
                error: a.error,
            })
            .collect(),
    );
    if who.format == Format::Json {
        // The request as accepted, so a console can run it again; the
        // schedule tick that queued it, if one did.
        let tick = svc.store.tick_of_run(&rec.key).await.ok().flatten();
        // Its attempts and the run it continues (retries, reruns).
        let extras = rerun::run_extras(&svc, &rec, &resp.results).await;
        return Ok(runs::with_request(&resp, &rec, tick.as_ref(), &extras));
    }
    Ok(Reply::one(StatusCode::OK, who.format, &resp).into_response())
}

/// Cancels a run: a queued one at once, a running one between batches.
#[utoipa::path(post, path = "/v1/Runs/{id}/cancel", tag = "tidepool", operation_id = "CancelRun",
    params(("id" = String, Path, description = "the runID"), InstanceQuery),
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 202, description = "a queued run is Cancelled at once; a running one stops between batches", body = wire::CancelAnswerDoc),
        (status = 401, description = "missing or bad credentials", body = ExecJobAsyncResponse),
        (status = 403, description = "read-only role", body = ExecJobAsyncResponse),
        (status = 404, description = "unknown run, or another instance's", body = ExecJobAsyncResponse),
        (status = 503, description = "the store failed", body = ExecJobAsyncResponse),
    ))]
async fn cancel(
    State(svc): State<AppState>,
    Query(q): Query<InstanceQuery>,
    who: RunCaller,
) -> Result<Response, ApiError> {
    let rec = who.run(&svc, q.instance).await?;
    if who.caller.role_in(&rec.key.instance) < Some(Role::Full) {
        return Err(who.refuse(StatusCode::FORBIDDEN, "cancelling needs Owner or Full"));
    }
    match svc.cancel(&rec.key).await {
        Ok(Some(status)) => Ok((
            StatusCode::ACCEPTED,
            axum::Json(json!({"runID": rec.key.run_id.to_string(), "status": status})),
        )
            .into_response()),
        Ok(None) => Err(who.refuse(StatusCode::NOT_FOUND, "unknown run")),
        Err(e) => Err(who.refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

/// Runs a job with the raw body as its argument; the server makes the runID.
#[utoipa::path(post, path = "/v1/Webhook", tag = "v1", operation_id = "Webhook",
    params(
        ("projectid" = String, Query, min_length = 1, max_length = 36, pattern = r"\S", description = "the project (name in any case)"),
        ("jobid" = String, Query, min_length = 1, max_length = 36, pattern = r"\S", description = "the job (name in any case)"),
        ("instance" = Option<String>, Query, max_length = 255, description = "the instance to run in; default the caller's primary instance"),
    ),
    request_body(content = Option<String>, content_type = "text/plain", description = "any UTF-8 text: the job argument"),
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "recorded durably under a new runID; it will run", body = ExecJobAsyncResponse, links(
            ("Results" = (operation_id = "Results", parameters(("id" = "$response.body#/runID")), description = "the run's per-job results")),
            ("Run" = (operation_id = "Run", parameters(("id" = "$response.body#/runID")), description = "the run's full answer")),
            ("CancelRun" = (operation_id = "CancelRun", parameters(("id" = "$response.body#/runID")), description = "cancel the run"))
        )),
        (status = 400, description = "a parameter breaks its rule, or the body is not UTF-8", body = ExecJobAsyncResponse),
        (status = 401, description = "missing or bad credentials", body = ExecJobAsyncResponse),
        (status = 403, description = "read-only role", body = ExecJobAsyncResponse),
        (status = 404, description = "unknown project or job (in the caller's instance)", body = ExecJobAsyncResponse),
        (status = 413, description = "the body is too large", body = ExecJobAsyncResponse),
        (status = 503, description = "the queue is full, the server is stopping, or the store failed; see Retry-After", body = ExecJobAsyncResponse),
    ))]
async fn webhook(
    State(svc): State<AppState>,
    AnswerFormat(format): AnswerFormat,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
    body: Body,
) -> Result<Reply, ApiError> {
    let refused = |status, message: String| ApiError::refusal(status, message).in_format(format);
    let param = |n: &str| {
        q.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let bytes = read_body(&svc, body)
        .await
        .map_err(|e| e.in_format(format))?;
    let caller = auth::authenticate(&svc, &headers)
        .await
        .map_err(|e| ApiError::from(e).in_format(format))?;
    let argument = String::from_utf8(bytes.to_vec()).map_err(|e| {
        refused(
            StatusCode::BAD_REQUEST,
            format!("the body is not UTF-8 text: {e}"),
        )
    })?;
    let run_id = uuid::Uuid::new_v4();
    let mut fields = FieldMap::new();
    fields.insert("runid".into(), WireValue::Text(run_id.to_string()));
    for (name, key) in [
        ("projectid", "projectid"),
        ("jobid", "jobid"),
        ("instance", "instance"),
    ] {
        if let Some(v) = param(key) {
            fields.insert(name.into(), WireValue::Text(v));
        }
    }
    fields.insert("argument".into(), WireValue::Text(argument));
    let req = ExecJobRequest::from_fields(&fields, false).map_err(|e| {
        // The query names its parameters in lower case.
        let message = e
            .to_string()
            .replace("projectID", "projectid")
            .replace("jobID", "jobid");
        refused(StatusCode::BAD_REQUEST, message)
    })?;
    let projects = svc.projects();
    let (instance, _) = target(&svc, &projects, &caller, &req).map_err(|(s, e)| refused(s, e))?;
    svc.submit(&instance, &req)
        .await
        .map_err(|e| refused(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).retry_after())?;
    Ok(Reply::one(
        StatusCode::OK,
        format,
        &ExecJobAsyncResponse {
            run_id: run_id.to_string(),
            started: true,
            error: None,
        },
    ))
}

#[derive(serde::Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

/// A 429 from `/token`, in its OAuth error shape, with Retry-After.
fn too_many(error: &str, description: &str, retry_after_secs: u64) -> Response {
    let mut r = oauth_error(StatusCode::TOO_MANY_REQUESTS, error, description);
    r.headers_mut()
        .insert(header::RETRY_AFTER, retry_after_secs.into());
    r
}

/// `POST /token`'s largest body: a user name and a password fit easily.
const TOKEN_BODY_LIMIT: usize = 8 * 1024;

/// `POST /token`: the OAuth2 password grant, under [`auth::LoginGuard`]'s limits.
#[utoipa::path(post, path = "/token", tag = "v1", operation_id = "Token",
    request_body(content = wire::TokenRequestDoc, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "a bearer token", body = wire::TokenAnswerDoc),
        (status = 400, description = "invalid_request, unsupported_grant_type, or invalid_grant (a wrong user name or password, as RFC 6749 answers it)", body = wire::OAuthErrorDoc),
        (status = 413, description = "the body is larger than 8 KiB", body = wire::OAuthErrorDoc),
        (status = 429, description = "too many failed attempts for the user or from the address, or too many password checks at once: see Retry-After", body = wire::OAuthErrorDoc),
        (status = 503, description = "the store failed", body = wire::OAuthErrorDoc),
    ))]
async fn token(
    State(svc): State<AppState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    body: Body,
) -> Response {
    let Ok(bytes) = axum::body::to_bytes(body, TOKEN_BODY_LIMIT).await else {
        return oauth_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            &format!("the body is larger than {TOKEN_BODY_LIMIT} bytes"),
        );
    };
    // serde_urlencoded would turn bytes that are not UTF-8 into U+FFFD.
    if let Err(e) = wire::form_pairs(&bytes) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &e.message);
    }
    let form: TokenForm = match serde_urlencoded::from_bytes(&bytes) {
        Ok(f) => f,
        Err(e) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("malformed form body: {e}"),
            );
        }
    };
    if !form
        .grant_type
        .as_deref()
        .is_some_and(|g| g.eq_ignore_ascii_case("password"))
    {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be password",
        );
    }
    let (Some(user), Some(password)) = (form.username, form.password) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "username and password are required",
        );
    };
    let peer = peer.map(|axum::Extension(info)| info.0.ip());
    match auth::check_login(&svc, &user, password, peer).await {
        auth::LoginOutcome::Granted => {}
        auth::LoginOutcome::Denied => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "the user name or password is incorrect",
            );
        }
        auth::LoginOutcome::Throttled(left) => {
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            return too_many(
                "too_many_attempts",
                &format!(
                    "too many failed attempts for this user or from this address: try again in {secs} s"
                ),
                secs.max(1),
            );
        }
        auth::LoginOutcome::Busy => {
            return too_many(
                "temporarily_unavailable",
                "too many password checks at once: try again shortly",
                1,
            );
        }
        auth::LoginOutcome::Store(e) => {
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                &e.to_string(),
            );
        }
    }
    let token = auth::new_secret("tpt_");
    let lifetime = svc.config.token_lifetime_secs;
    let expires = chrono::Local::now().fixed_offset() + chrono::Duration::seconds(lifetime as i64);
    if let Err(e) = svc
        .store
        .put_token(
            &auth::digest(&token),
            &user,
            expires,
            svc.config.max_tokens_per_user,
        )
        .await
    {
        return oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            &e.to_string(),
        );
    }
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(json!({"access_token": token, "token_type": "bearer", "expires_in": lifetime})),
    )
        .into_response()
}

fn project_json(p: &Project) -> serde_json::Value {
    json!({
        "projectID": p.id.0,
        "name": p.name,
        "instance": p.instance,
        "loaded": true,
        "jobs": p.jobs.values().map(|j| json!({
            "jobID": j.id.0,
            "name": j.name,
            "next": j.next.first().map(|n| n.0.clone()),
            "nextJobs": j.next.iter().map(|n| n.0.clone()).collect::<Vec<_>>(),
            "needs": j.needs.iter().map(|n| n.0.clone()).collect::<Vec<_>>(),
            "stages": j.stages.len(),
        })).collect::<Vec<_>>(),
    })
}

/// The caller's projects and their jobs.
#[utoipa::path(get, path = "/v1/Projects", tag = "tidepool", operation_id = "Projects",
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "the projects of the caller's instances", body = Vec<wire::ProjectInfoDoc>),
        (status = 401, description = "missing or bad credentials", body = ExecJobAsyncResponse),
        (status = 503, description = "the store failed", body = ExecJobAsyncResponse),
    ))]
async fn projects(State(svc): State<AppState>, caller: Caller) -> Response {
    let loaded = svc.projects();
    let mut list: Vec<_> = loaded
        .projects
        .iter()
        .filter(|p| caller.can_see(&p.instance))
        .map(project_json)
        .collect();
    list.extend(projects::failed_for(&svc, &caller));
    axum::Json(list).into_response()
}

/// One of the caller's projects and its jobs in detail: origin, destination,
/// stages with their field mappings, `next` chain (no connection secrets).
#[utoipa::path(get, path = "/v1/Projects/{id}", tag = "tidepool", operation_id = "Project",
    params(("id" = String, Path, description = "the projectID (any case)", example = "demo")),
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "the project", body = projects::ProjectDetail),
        (status = 401, description = "missing or bad credentials", body = ExecJobAsyncResponse),
        (status = 404, description = "unknown project, or another instance's", body = wire::ErrorDoc),
        (status = 503, description = "the store failed", body = ExecJobAsyncResponse),
    ))]
async fn project(State(svc): State<AppState>, Path(id): Path<String>, caller: Caller) -> Response {
    let loaded = svc.projects();
    match loaded
        .projects
        .iter()
        .find(|p| caller.can_see(&p.instance) && p.id.0.eq_ignore_ascii_case(&id))
    {
        Some(p) => axum::Json(projects::project_detail(p)).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": format!("unknown project {id:?}")})),
        )
            .into_response(),
    }
}

/// Liveness and queue depth.
#[utoipa::path(get, path = "/healthz", tag = "tidepool", operation_id = "Health",
    responses(
        (status = 200, description = "up", body = wire::HealthDoc),
        (status = 503, description = "the store cannot be read", body = wire::HealthDoc),
    ))]
async fn healthz(State(svc): State<AppState>) -> Response {
    match svc.store.queued_count().await {
        Ok(q) => axum::Json(json!({
            "status": "ok",
            "queued": q,
            "running": svc.running_count(),
            "stopping": svc.is_stopping(),
        }))
        .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "unavailable", "error": e.to_string()})),
        )
            .into_response(),
    }
}

/// Prometheus text. With users, it takes a credential: Metrics on `*` (or
/// open mode) reads every series; Metrics or Owner in instances reads the
/// series labelled with those instances only.
async fn metrics_text(State(svc): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let Some(scope) = caller.metrics_scope() else {
        return Err(ApiError::refusal(
            StatusCode::FORBIDDEN,
            "reading /metrics needs the Metrics role (or Owner) in an instance",
        ));
    };
    metrics::gauge!("tidepool_queue_depth").set(svc.queue_depth() as f64);
    let text = metrics_handle().render();
    let text = match scope {
        auth::MetricsScope::All => text,
        auth::MetricsScope::Instances(allowed) => scrape::only_instances(&text, &allowed),
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// The OpenAPI description of this API, generated from the wire types.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "tidepool",
        description = "The Starfish ETL v1 job API, and tidepool's additions. Paths and field names match in any case. With no users configured the server is open (loopback only) and takes no credentials."
    ),
    paths(
        execute_job_async,
        execute_job,
        results,
        webhook,
        token,
        run_detail,
        cancel,
        rerun::rerun,
        runs::list_runs,
        runs::run_log,
        runs::run_errors,
        events::run_events,
        projects,
        project,
        projects::reload,
        preview::preview,
        nodes::nodes,
        schedules::list,
        schedules::pause,
        schedules::resume,
        incremental::reset_high_water,
        console::login,
        console::logout,
        console::me,
        healthz
    ),
    components(schemas(
        ExecJobAsyncRequestDoc,
        ExecJobAsyncRequestTextDoc,
        ExecJobRequestDoc,
        ExecJobRequestTextDoc,
        ExecJobAsyncResponse,
        ExecJobResponse,
        ResultsResponse,
        wire::LogLine,
        WebhookAttemptLine,
        RunStatus,
        runs::RunPage,
        runs::RunSummary,
        nodes::NodeList,
        nodes::NodeLine,
        schedules::ScheduleList,
        schedules::ScheduleLine,
        schedules::TickLine,
        rerun::RerunAnswer,
        incremental::HighWaterReset,
        crate::run::JobLoad,
        crate::run::HighWaterReport,
        crate::run::FileReport,
        crate::run::FileStatus
    )),
    modifiers(&SecuritySchemes, &XmlAnswers)
)]
pub struct ApiDoc;

/// The two ways to present credentials (see [`auth::authenticate`]).
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`Authorization: Bearer tpt_…`, a token from `POST /token`; an API key (`tpk_…`) is taken here too",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "an API key from `tidepool key create USER`",
            ))),
        );
        // Every `/v1/` operation takes credentials (`POST /token` is not
        // under `/v1/`): one whose annotation does not say so says it here.
        let required = vec![
            utoipa::openapi::security::SecurityRequirement::new("bearer", Vec::<String>::new()),
            utoipa::openapi::security::SecurityRequirement::new("apiKey", Vec::<String>::new()),
        ];
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            for op in [&mut item.get, &mut item.post].into_iter().flatten() {
                if op.security.is_none() {
                    op.security = Some(required.clone());
                }
            }
        }
    }
}

/// The answers that follow content negotiation (`Accept`, then the request's
/// `Content-Type`) come in XML as well: the document says so once, here.
struct XmlAnswers;

impl utoipa::Modify for XmlAnswers {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") || path.starts_with("/v1/Projects") {
                continue;
            }
            let ops = [&mut item.get, &mut item.post];
            for op in ops.into_iter().flatten() {
                for (status, response) in op.responses.responses.iter_mut() {
                    let utoipa::openapi::RefOr::T(response) = response else {
                        continue;
                    };
                    // Cancel answers its 202 in JSON only.
                    if path.ends_with("/cancel") && status == "202" {
                        continue;
                    }
                    if let Some(json) = response.content.get("application/json").cloned() {
                        response.content.insert("application/xml".into(), json);
                    }
                }
            }
        }
    }
}

async fn openapi() -> Response {
    axum::Json(<ApiDoc as utoipa::OpenApi>::openapi()).into_response()
}

async fn not_found(AnswerFormat(format): AnswerFormat) -> ApiError {
    ApiError::refusal(StatusCode::NOT_FOUND, "no such endpoint").in_format(format)
}
