//! What a run is made of, as it is submitted, recorded and answered: the
//! request ([`Submission`]), each job's result ([`JobResult`]), the run's
//! answer ([`RunResult`]) and the status and counters they carry.
//!
//! These are plain data with their serde shape fixed: the store keeps them as
//! JSON (rows written by older versions must still read) and the API sends
//! that same JSON. Reading and writing them on the wire (XML, forms, the
//! field rules) is `api::wire`'s work; making them from an engine report is
//! `server::history`'s.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

use crate::value::datetime_text;

/// The ID of a run: a GUID, supplied by the caller (API) or made new (CLI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct RunId(pub uuid::Uuid);

impl RunId {
    /// A new random run ID.
    pub fn new() -> Self {
        RunId(uuid::Uuid::new_v4())
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The state of a run or of one job in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum RunStatus {
    /// Accepted, not started.
    Queued,
    /// Going.
    Running,
    /// Ran to the end (row errors may have occurred).
    Complete,
    /// Could not run, or stopped by an error.
    Failed,
    /// Stopped on request.
    Cancelled,
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The seven counters of a job (or, summed, of a run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    /// Origin rows processed (inside the row window).
    pub total_rows: u64,
    /// Rows inserted, over all stages.
    pub inserts: u64,
    /// Rows updated, over all stages.
    pub updates: u64,
    /// Rows deleted, over all stages.
    pub deletes: u64,
    /// Row errors and job errors.
    pub errors: u64,
    /// Rows skipped (skip/insert matched, unchanged with update_on_difference).
    pub skips: u64,
    /// Updates or deletes that matched nothing.
    pub ignores: u64,
}

impl Counters {
    /// Adds `other` to `self`.
    pub fn add(&mut self, other: &Counters) {
        self.total_rows += other.total_rows;
        self.inserts += other.inserts;
        self.updates += other.updates;
        self.deletes += other.deletes;
        self.errors += other.errors;
        self.skips += other.skips;
        self.ignores += other.ignores;
    }
}

/// A run as it was submitted (`execJobAsyncRequest` / `execJobRequest`, its
/// fields checked); the store keeps it as the run's request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Submission {
    /// The caller's GUID for the run, lower-cased.
    #[serde(rename = "runID")]
    pub run_id: uuid::Uuid,
    /// The project.
    #[serde(rename = "projectID")]
    pub project_id: String,
    /// The job.
    #[serde(rename = "jobID")]
    pub job_id: String,
    /// Run the chain.
    pub chain_jobs: bool,
    /// 0 to 3.
    pub logging_level: u8,
    /// The job argument.
    pub argument: String,
    /// 1-based; a positive integer in a string (a number is accepted too).
    pub begin_at_row: u64,
    /// Inclusive; a positive integer in a string.
    pub end_after_row: Option<u64>,
    /// Writers; a positive integer in a string.
    pub thread_count: usize,
    /// Where the result is POSTed.
    #[serde(rename = "webHookURL")]
    pub web_hook_url: Option<String>,
    /// The instance asked for, if any.
    pub instance: Option<String>,
}

impl Submission {
    /// What two requests are compared by (same runID, same run?): the SHA-256
    /// of the canonical JSON of the parameters.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut c = self.clone();
        c.instance = None;
        let json = serde_json::to_vec(&c).unwrap_or_default();
        hex::encode(sha2::Sha256::digest(&json))
    }
}

/// .NET `TimeSpan` text: `hh:mm:ss.fffffff`, with `d.` in front past a day.
pub fn timespan(d: Duration) -> String {
    let ticks = d.as_nanos() / 100;
    let frac = ticks % 10_000_000;
    let secs = d.as_secs();
    let (days, h, m, s) = (
        secs / 86_400,
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
    );
    if days > 0 {
        format!("{days}.{h:02}:{m:02}:{s:02}.{frac:07}")
    } else {
        format!("{h:02}:{m:02}:{s:02}.{frac:07}")
    }
}

/// `resultsResponse`: one job of a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = resultsResponse)]
#[serde(rename_all = "camelCase")]
pub struct JobResult {
    /// The run.
    #[serde(rename = "runID")]
    pub run_id: String,
    /// ISO 8601 with offset, 7 fractional digits.
    pub start_time: String,
    /// .NET TimeSpan text.
    pub run_time: String,
    /// Queued, Running, Complete, Failed or Cancelled.
    pub status: RunStatus,
    /// The seven counters (`totalRows`, `inserts`, … on the wire).
    #[serde(flatten)]
    pub counters: Counters,
    /// The job (tidepool's addition, useful with chains).
    #[serde(rename = "jobID")]
    pub job_id: String,
}

impl JobResult {
    /// A result from its parts.
    pub fn new(
        run_id: &str,
        job_id: &str,
        start: &DateTime<FixedOffset>,
        run_time: Duration,
        status: RunStatus,
        c: &Counters,
    ) -> Self {
        JobResult {
            run_id: run_id.to_owned(),
            start_time: datetime_text(start),
            run_time: timespan(run_time),
            status,
            counters: *c,
            job_id: job_id.to_owned(),
        }
    }
}

/// One log line in `execJobResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = logEntry)]
pub struct LogLine {
    /// ISO 8601.
    pub time: String,
    /// Low, Medium or High.
    pub level: String,
    /// The job.
    #[serde(rename = "jobID")]
    pub job_id: String,
    /// The origin row, if about one.
    pub row: Option<u64>,
    /// What happened.
    pub message: String,
}

/// One delivery attempt of a completion webhook (tidepool's addition).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = webhookAttempt)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAttemptLine {
    /// 1-based.
    pub attempt: u32,
    /// When.
    pub time: String,
    /// The receiver's HTTP status, if it answered.
    pub status_code: Option<u16>,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// `execJobResponse`: the answer of ExecuteJob and the body of the webhook.
// The doc comment above is the schema's description in /openapi.json: keep it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = execJobResponse)]
#[serde(rename_all = "camelCase")]
pub struct RunResult {
    /// The run.
    #[serde(rename = "runID")]
    pub run_id: String,
    /// Complete only if every job completed.
    pub status: RunStatus,
    /// When the run started.
    pub start_time: String,
    /// How long it took.
    pub run_time: String,
    /// The counters summed over the jobs.
    #[serde(flatten)]
    pub counters: Counters,
    /// Why the run failed.
    pub error: Option<String>,
    /// What the job's scripts left in `returnValue` (objects as JSON text).
    pub return_value: Option<String>,
    /// One per job executed.
    pub results: Vec<JobResult>,
    /// The log at the requested level.
    pub log: Vec<LogLine>,
    /// Delivery attempts of the completion webhook (only in `GET /v1/Runs/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_attempts: Option<Vec<WebhookAttemptLine>>,
}

/// Log lines a completion webhook carries at most; receivers often limit
/// body sizes, and the whole log stays in `GET /v1/Runs/{id}`.
pub const WEBHOOK_LOG_MAX: usize = 1000;

impl RunResult {
    /// The webhook body: this answer with at most [`WEBHOOK_LOG_MAX`] log
    /// lines, the last of which then says where the rest is.
    pub fn for_webhook(&self) -> RunResult {
        let mut w = self.clone();
        if w.log.len() > WEBHOOK_LOG_MAX {
            let more = w.log.len() - (WEBHOOK_LOG_MAX - 1);
            w.log.truncate(WEBHOOK_LOG_MAX - 1);
            let last = w.log.last().cloned();
            w.log.push(LogLine {
                time: last.as_ref().map(|l| l.time.clone()).unwrap_or_default(),
                level: "Low".into(),
                job_id: last.map(|l| l.job_id).unwrap_or_default(),
                row: None,
                message: format!(
                    "{more} more log lines: GET /v1/Runs/{} has the whole log",
                    w.run_id
                ),
            });
        }
        w
    }

    /// The answer for a run that ended without running (interrupted, cancelled while queued).
    pub fn ended_without_report(
        run_id: &str,
        status: RunStatus,
        start: &DateTime<FixedOffset>,
        results: Vec<JobResult>,
        error: &str,
    ) -> Self {
        let mut total = Counters::default();
        for r in &results {
            total.add(&r.counters);
        }
        RunResult {
            run_id: run_id.to_owned(),
            status,
            start_time: datetime_text(start),
            run_time: timespan(Duration::ZERO),
            counters: total,
            error: Some(error.to_owned()),
            return_value: None,
            results,
            log: Vec::new(),
            webhook_attempts: None,
        }
    }
}
