//! What a run is made of, as it is submitted, recorded and answered: the
//! request ([`Submission`]), each job's result ([`JobResult`]), the run's
//! answer ([`RunResult`]) and the status and counters they carry; and what
//! the engine takes and gives back: a [`RunRequest`] in, a [`RunReport`]
//! (one [`JobReport`] per job) out.
//!
//! These are plain data with their serde shape fixed: the store keeps them as
//! JSON (rows written by older versions must still read) and the API sends
//! that same JSON. Reading and writing them on the wire (XML, forms, the
//! field rules) is `api::wire`'s work; making them from an engine report is
//! `server::history`'s.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize, Serializer};

use crate::value::datetime_text;

mod loads;
pub use loads::{FileReport, FileStatus, HighWaterReport, JobLoad};

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

impl RunStatus {
    /// A status as a store wrote it (its `Display` text); anything else reads
    /// as Failed, so a damaged row never passes for a live or good run.
    pub fn from_stored(s: &str) -> RunStatus {
        match s {
            "Queued" => RunStatus::Queued,
            "Running" => RunStatus::Running,
            "Complete" => RunStatus::Complete,
            "Cancelled" => RunStatus::Cancelled,
            _ => RunStatus::Failed,
        }
    }

    /// A job of an ended run that stopped short: it failed, or was still
    /// running when the run was interrupted. A rerun from the failure starts
    /// at such a job (the API's and the CLI's hint alike).
    pub fn stopped_short(self) -> bool {
        matches!(self, RunStatus::Failed | RunStatus::Running)
    }
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
    /// The first job starts at this origin row instead of `beginAtRow` (a
    /// rerun from the failure: the first row its failed run did not commit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_at_row: Option<u64>,
    /// The run this one continues (a rerun from the failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continues: Option<uuid::Uuid>,
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
    /// The first origin row not yet committed (tidepool's addition): where a
    /// rerun from the failure starts this job. Absent when nothing is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_at_row: Option<u64>,
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
            resume_at_row: None,
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
    /// Each job's incremental mark and dropped files (tidepool's addition;
    /// only jobs that have them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loads: Vec<JobLoad>,
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
            loads: Vec::new(),
        }
    }
}

/// The ID of a project: what the API's `projectID` names (max 36 characters).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProjectId(pub String);

/// The ID of a job within its project: what the API's `jobID` names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub String);

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How much a run logs: 0 = None, 1 = Low, 2 = Medium, 3 = High.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize)]
pub enum LogLevel {
    /// Nothing.
    #[default]
    None = 0,
    /// Start, end and errors.
    Low = 1,
    /// Plus per-stage summaries and warnings.
    Medium = 2,
    /// Plus every row's actions.
    High = 3,
}

impl LogLevel {
    /// The level for a number; above 3 means High.
    pub fn from_number(n: u64) -> Self {
        match n {
            0 => LogLevel::None,
            1 => LogLevel::Low,
            2 => LogLevel::Medium,
            _ => LogLevel::High,
        }
    }
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The run's ID.
    pub run_id: RunId,
    /// The project.
    pub project: ProjectId,
    /// The job (the first of the chain).
    pub job: JobId,
    /// `@@VAR:JobArgument@@`.
    pub argument: String,
    /// The first origin row processed (1-based); rows before it are read and dropped.
    pub begin_at_row: u64,
    /// The last origin row processed, inclusive; `None` for all rows.
    pub end_after_row: Option<u64>,
    /// Writers, each with its own destination connection.
    pub thread_count: usize,
    /// What the report's log keeps.
    pub logging_level: LogLevel,
    /// Run the job's `next` job after it, and so on.
    pub chain_jobs: bool,
    /// Run everything but write nothing (database work rolled back, files untouched).
    pub preview: bool,
    /// The first job (only) starts at this origin row instead of
    /// `begin_at_row`: a rerun or retry that resumes where a run stopped.
    pub resume_at_row: Option<u64>,
}

impl RunRequest {
    /// A request with the API's defaults: all rows, one thread, no log, no chain.
    pub fn new(project: &str, job: &str) -> Self {
        RunRequest {
            run_id: RunId::new(),
            project: ProjectId(project.to_owned()),
            job: JobId(job.to_owned()),
            argument: String::new(),
            begin_at_row: 1,
            end_after_row: None,
            thread_count: 1,
            logging_level: LogLevel::None,
            chain_jobs: false,
            preview: false,
            resume_at_row: None,
        }
    }
}

/// The most writer threads one job may use.
pub const MAX_THREADS: usize = 64;

/// One line of a run's log.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    /// When.
    pub time: DateTime<FixedOffset>,
    /// How important (Low entries show at levels 1 to 3).
    pub level: LogLevel,
    /// The job it is about.
    #[serde(rename = "jobID")]
    pub job_id: JobId,
    /// The origin row, where it is about one.
    pub row: Option<u64>,
    /// What happened.
    pub message: String,
}

/// A row that failed, kept with its origin values whatever the log level.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RowError {
    /// The origin row (1-based).
    pub row: u64,
    /// The stage that failed (1-based; 0 = reading the row, or its batch).
    pub stage: usize,
    /// That stage's name.
    pub stage_name: Option<String>,
    /// What went wrong.
    pub message: String,
    /// The row's origin values by column, as text.
    pub values: Vec<(String, String)>,
}

fn as_seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// What one job of a run did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobReport {
    /// The job.
    #[serde(rename = "jobID")]
    pub job_id: JobId,
    /// When it started.
    pub start_time: DateTime<FixedOffset>,
    /// How long it took.
    #[serde(rename = "runTimeSeconds", serialize_with = "as_seconds")]
    pub run_time: Duration,
    /// Complete, Failed or Cancelled.
    pub status: RunStatus,
    /// The counters.
    #[serde(flatten)]
    pub counters: Counters,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// The log at the requested level.
    pub log: Vec<LogEntry>,
    /// What the job's scripts left in `returnValue` (objects as JSON text).
    pub return_value: Option<String>,
    /// The first row errors (at any log level), at most `ROW_ERRORS_KEPT`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub row_errors: Vec<RowError>,
    /// Row errors counted, kept or not.
    #[serde(skip_serializing_if = "is_zero")]
    pub row_errors_total: u64,
    /// Why the job failed, as a kind a server can act on (retry or not);
    /// None unless the job Failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
    /// The first origin row not committed: every row before it (from the
    /// row the job began at) was written and committed, or counted as a row
    /// error. None for a preview.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_at_row: Option<u64>,
    /// Its incremental mark and dropped files, if it has them.
    #[serde(skip_serializing_if = "JobLoad::is_empty")]
    pub load: JobLoad,
}

/// Why a job failed, in the terms a retry decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// A connection could not be reached or opened, or was lost past its
    /// batch retries: running again later may succeed.
    Unreachable,
    /// Anything else (halt on error, a script, the mapping, the job's
    /// settings, a fenced save): running again unchanged fails the same way.
    Job,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Row errors a job keeps with their origin values; past it they are only counted.
pub const ROW_ERRORS_KEPT: usize = 1000;

/// What a run did: one [`JobReport`] per job executed, in order.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// The run.
    #[serde(rename = "runID")]
    pub run_id: RunId,
    /// Complete only if every job completed.
    pub status: RunStatus,
    /// When the run started.
    pub start_time: DateTime<FixedOffset>,
    /// How long the whole run took.
    #[serde(rename = "runTimeSeconds", serialize_with = "as_seconds")]
    pub run_time: Duration,
    /// The counters summed over the jobs.
    #[serde(flatten)]
    pub counters: Counters,
    /// Why the run failed, if it did (the first failing job's error).
    pub error: Option<String>,
    /// The last `returnValue` a job's scripts set.
    pub return_value: Option<String>,
    /// One report per job executed.
    pub jobs: Vec<JobReport>,
}
