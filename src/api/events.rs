//! `GET /v1/Runs/{id}/events`: a run followed live as Server-Sent Events.
//!
//! The stream reads the store (the run's live results are saved a few times
//! a second by whichever node runs it) about once a second, and at once when
//! a run on this node ends: `status` when the status changes, `counters` with
//! rows/s while it runs, its `log` lines as they are stored (the node running
//! it appends them a few times a second; each event's id is the line's `seq`,
//! so a client reconnecting with `Last-Event-ID` resumes after it), then
//! `end` with the final summary, and closes.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};

use super::AppState;
use super::runs::{json_error, log_line_json, param, rate};
use super::wire::ResultsResponse;
use crate::run::{Counters, RunStatus};
use crate::server::Service;
use crate::store::{RunKey, RunRecord};

/// Event streams open at once, over all callers; past it, 503.
pub const EVENT_STREAMS_MAX: usize = 256;
/// How often a running run's counters are sent.
const TICK: Duration = Duration::from_secs(1);
/// Log lines a stream carries at most (the rest: `GET /v1/Runs/{id}/log`).
const STREAM_LOG_MAX: usize = 1000;

fn streams() -> Arc<Semaphore> {
    static STREAMS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    STREAMS
        .get_or_init(|| Arc::new(Semaphore::new(EVENT_STREAMS_MAX)))
        .clone()
}

/// A stream's state between events.
struct Follow {
    svc: Arc<Service>,
    key: RunKey,
    ended: broadcast::Receiver<RunKey>,
    pending: VecDeque<Event>,
    status: Option<RunStatus>,
    /// Each job's rows when last seen, and when: rows/s between ticks (the
    /// jobs of a graph run side by side).
    last: HashMap<String, (u64, Instant)>,
    /// The `seq` of the last log line sent (or the client's `Last-Event-ID`).
    log_seq: u64,
    /// Log lines sent so far.
    log_sent: usize,
    done: bool,
    first: bool,
    _permit: OwnedSemaphorePermit,
}

fn event(name: &str, data: serde_json::Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// The end of a run: its status, counters summed and per job, its error.
fn end_summary(rec: &RunRecord, jobs: &[ResultsResponse]) -> serde_json::Value {
    let mut counters = Counters::default();
    for j in jobs {
        counters.add(&j.counters);
    }
    let final_answer = super::final_response(rec);
    json!({
        "runID": rec.key.run_id.to_string(),
        "instance": rec.key.instance,
        "status": rec.status,
        "counters": counters,
        "runTime": final_answer.as_ref().map(|a| a.run_time.clone()),
        "error": rec.error,
        "jobs": jobs,
    })
}

impl Follow {
    /// Reads the run and queues what changed; true once it has ended.
    async fn poll(&mut self) {
        let rec = match self.svc.store.run(&self.key).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.pending
                    .push_back(event("error", json!({"error": "the run is gone"})));
                self.done = true;
                return;
            }
            // A store hiccup: try again at the next tick.
            Err(_) => return,
        };
        if self.status != Some(rec.status) {
            self.status = Some(rec.status);
            self.pending
                .push_back(event("status", json!({"status": rec.status})));
        }
        let jobs: Vec<ResultsResponse> = rec
            .results_json
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        if rec.status == RunStatus::Running {
            self.counters(&jobs);
        }
        if !matches!(rec.status, RunStatus::Queued | RunStatus::Running) {
            self.finish(&rec, &jobs).await;
        } else if self.log_sent < STREAM_LOG_MAX {
            self.send_log().await;
        }
    }

    /// Queues the counters of each running job (of the last one between two
    /// jobs), with its rows/s since the last tick.
    fn counters(&mut self, jobs: &[ResultsResponse]) {
        let now = Instant::now();
        let running: Vec<&ResultsResponse> = jobs
            .iter()
            .filter(|j| j.status == RunStatus::Running)
            .collect();
        let shown = if running.is_empty() {
            jobs.last().into_iter().collect()
        } else {
            running
        };
        for job in shown {
            let rows = job.counters.total_rows;
            let per_sec = self.last.get(&job.job_id).and_then(|(r, t)| {
                rate(
                    rows.saturating_sub(*r),
                    now.duration_since(*t).as_millis() as u64,
                )
            });
            self.last.insert(job.job_id.clone(), (rows, now));
            self.pending.push_back(event(
                "counters",
                json!({"jobID": job.job_id, "status": job.status, "counters": job.counters,
                       "runTime": job.run_time, "rowsPerSec": per_sec}),
            ));
        }
    }

    /// Queues the log lines stored since the last sent, up to the stream's
    /// bound; whether more are stored past it.
    async fn send_log(&mut self) -> bool {
        let room = STREAM_LOG_MAX.saturating_sub(self.log_sent);
        let lines = self
            .svc
            .store
            .log_lines(&self.key, 3, self.log_seq, room + 1)
            .await
            .unwrap_or_default();
        for l in lines.iter().take(room) {
            self.pending
                .push_back(event("log", log_line_json(l)).id(l.seq.to_string()));
            self.log_seq = l.seq;
            self.log_sent += 1;
        }
        lines.len() > room
    }

    /// Queues the rest of the stored log and the `end` event.
    async fn finish(&mut self, rec: &RunRecord, jobs: &[ResultsResponse]) {
        let truncated = self.send_log().await;
        let mut end = end_summary(rec, jobs);
        end["logTruncated"] = json!(truncated);
        self.pending.push_back(event("end", end));
        self.done = true;
    }

    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some((Ok(e), self));
            }
            if self.done {
                return None;
            }
            if self.first {
                self.first = false;
            } else {
                let key = self.key.clone();
                let wait = async {
                    loop {
                        match self.ended.recv().await {
                            Ok(k) if k == key => return,
                            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(broadcast::error::RecvError::Closed) => {
                                std::future::pending::<()>().await
                            }
                        }
                    }
                };
                let _ = tokio::time::timeout(TICK, wait).await;
            }
            self.poll().await;
        }
    }
}

/// The data of each event of `GET /v1/Runs/{id}/events`: a JSON object.
pub struct EventDataDoc;

impl utoipa::PartialSchema for EventDataDoc {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let schema = json!({
            "type": "object",
            "description": "status: {status}; counters (each running job): {jobID, status, counters, runTime, rowsPerSec}; log: a log line {seq, time, level, jobID, row, message}, sent as it is stored (the event's id is its seq); end: {runID, instance, status, counters, runTime, error, jobs, logTruncated}; error: {error}",
        });
        serde_json::from_value(schema).expect("the event data schema is valid OpenAPI")
    }
}

impl utoipa::ToSchema for EventDataDoc {
    fn name() -> std::borrow::Cow<'static, str> {
        "runEventData".into()
    }
}

/// Follows a run live: `status`, `counters` (about once a second, with
/// rows/s), its `log` lines as they are stored (at most 1000 a stream; each
/// with its `seq` as the event id: `Last-Event-ID` resumes after it), then
/// `end`; the stream then closes.
#[utoipa::path(get, path = "/v1/Runs/{id}/events", tag = "tidepool", operation_id = "RunEvents",
    params(("id" = String, Path, description = "the runID"),
        ("instance" = Option<String>, Query, description = "the instance the run belongs to; default the caller's primary instance")),
    security(("bearer" = []), ("apiKey" = [])),
    responses((status = 200, description = "Server-Sent Events: `status`, `counters`, `log` (as the lines are stored, the id of each its seq; `Last-Event-ID` resumes after it), `end` (or `error`), each with a JSON object as its data; the stream closes after `end`",
            body = EventDataDoc, content_type = "text/event-stream"),
        (status = 401, description = "missing or bad credentials", body = super::wire::ExecJobAsyncResponse),
        (status = 404, description = "unknown run, or another instance's", body = super::wire::ExecJobAsyncResponse),
        (status = 503, description = "too many event streams are open, or the store failed", body = super::wire::ErrorDoc)))]
pub async fn run_events(
    State(svc): State<AppState>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    who: super::RunCaller,
) -> Response {
    let instance = param(&q, "instance").map(str::to_owned);
    let rec = match who.run(&svc, instance).await {
        Ok(rec) => rec,
        Err(refusal) => return refusal.into_response(),
    };
    let Ok(permit) = streams().try_acquire_owned() else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{EVENT_STREAMS_MAX} event streams are open already; try again shortly"),
        );
    };
    let follow = Follow {
        ended: svc.subscribe_ended(),
        svc: svc.service.clone(),
        key: rec.key,
        pending: VecDeque::new(),
        status: None,
        last: HashMap::new(),
        // A reconnecting client resumes after the last line it had.
        log_seq: headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
        log_sent: 0,
        done: false,
        first: true,
        _permit: permit,
    };
    let stream = futures_util::stream::unfold(follow, Follow::next);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
