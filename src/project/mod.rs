//! The job model: projects, connections, jobs, stages and fields, loaded from
//! `projects/<project>/project.toml` and `projects/<project>/jobs/*.toml`.
//!
//! [`load_projects`] reads a folder of projects and validates them statically;
//! every problem is a [`Problem`] with file, line and reason.

mod graph;
pub mod incremental;
mod load;
mod retry;
mod schedule;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::connector::ConnectionConfig;
pub use crate::connector::StageAction;
pub use crate::script::ScriptLimits;
use crate::template::Template;
use crate::value::{FieldType, Value};
pub use graph::{DEFAULT_MAX_PARALLEL_JOBS, MAX_PARALLEL_JOBS, RunGraph};
pub use load::{
    DEFAULT_INSTANCE, LoadOptions, LoadOutcome, load_project, load_project_text, load_projects,
};
pub use schedule::{
    CatchUp, DueTick, MissedTicks, Overlap, Schedule, TickPlan, next_after, parse_cron, plan,
};

pub use crate::run::{JobId, ProjectId};
pub use retry::RetryPolicy;

/// A loaded, statically valid project.
#[derive(Debug, Clone)]
pub struct Project {
    /// The project's ID.
    pub id: ProjectId,
    /// The instance (tenant) the project belongs to; callers see only their instances'.
    pub instance: String,
    /// A human name.
    pub name: String,
    /// The folder the project was loaded from; relative paths resolve against it.
    pub dir: PathBuf,
    /// Where runs keep their files (`${DATA_DIR}`), and the jobs' persisted variables.
    pub data_dir: PathBuf,
    /// Project variables (`@@VAR:Name@@`), after `${ENV}` interpolation.
    pub variables: BTreeMap<String, String>,
    /// Named connections.
    pub connections: BTreeMap<String, ConnectionConfig>,
    /// The jobs, by ID.
    pub jobs: BTreeMap<JobId, Job>,
    /// How many jobs of a chained run may run at once (`max_parallel_jobs`).
    pub max_parallel_jobs: usize,
}

impl Project {
    /// The job with this ID, matched case-insensitively as Starfish does.
    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs
            .get(&JobId(id.to_owned()))
            .or_else(|| self.jobs.values().find(|j| j.id.0.eq_ignore_ascii_case(id)))
    }
}

/// One job: an origin, a destination and the stages each row passes through.
#[derive(Debug, Clone)]
pub struct Job {
    /// The job's ID.
    pub id: JobId,
    /// A human name.
    pub name: String,
    /// The file the job was loaded from (for messages).
    pub file: PathBuf,
    /// Where rows come from.
    pub origin: OriginSpec,
    /// The connection stages write to unless they say `use_origin`.
    pub destination: Option<String>,
    /// The stages, in order.
    pub stages: Vec<Stage>,
    /// The jobs that start (in parallel) after this one completes when the
    /// request chains jobs (`next`: one job ID or a list).
    pub next: Vec<JobId>,
    /// The jobs that must all have completed before this one starts in a
    /// chained run (`needs`; those not part of the run count as done).
    pub needs: Vec<JobId>,
    /// Stop the job at the first row error (the job then fails).
    pub halt_on_error: bool,
    /// Where rejected rows are written (CSV: row, stage, error, origin fields).
    pub error_file: Option<PathBuf>,
    /// Rows per destination transaction.
    pub batch_size: usize,
    /// Times a batch is tried again when the destination's connection is lost.
    pub retry_attempts: u32,
    /// The wait before the first retry; it doubles each time.
    pub retry_wait: std::time::Duration,
    /// Scripts run at fixed moments of the run (`[[operations]]`).
    pub operations: Vec<Operation>,
    /// Limits on every script of the job.
    pub script_limits: ScriptLimits,
    /// How many runs of this job may run at once across every node
    /// (`max_concurrent_runs`, at least 1); `None`: no limit. A queued run of
    /// a job at its limit waits.
    pub max_concurrent_runs: Option<u32>,
    /// When the node running a run of this job is lost, the run is queued
    /// again (once) instead of ending Failed (`rerun_on_node_loss`; for jobs
    /// that are safe to run twice, such as upserts).
    pub rerun_on_node_loss: bool,
    /// When the server runs the job by itself (`[[schedules]]`).
    pub schedules: Vec<Schedule>,
    /// How a run that failed because a connection could not be reached is
    /// tried again (`retry = { attempts, wait_secs, backoff }`); None: never.
    pub retry: Option<RetryPolicy>,
}

/// A script the engine runs at a fixed moment of a job (Starfish's Exec operations).
#[derive(Debug, Clone)]
pub struct Operation {
    /// When it runs.
    pub when: Moment,
    /// For `before_stage`/`after_stage`: the one stage (0-based) it runs for; `None`: every stage.
    pub stage: Option<usize>,
    /// A JavaScript expression or function body, like a script field's.
    pub script: String,
    /// The line of the operation in its job file (for messages).
    pub line: usize,
}

/// The moments of a run at which an [`Operation`] runs (Starfish's "Execute When").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Moment {
    /// Once per job, before anything else.
    Once,
    /// Before the job's connections open (set variables the origin's tokens read).
    BeforeConnections,
    /// Before the origin query runs: sees `event.query` and may return a new one.
    BeforeQuery,
    /// After the origin query ran, before the first row.
    AfterQuery,
    /// Before each row's first stage.
    BeforeRow,
    /// Before each stage of each row.
    BeforeStage,
    /// After each stage of each row wrote (sees the stage's result).
    AfterStage,
    /// After each row's last stage.
    AfterRow,
    /// When a row fails: sees `event.error`; returning `true` suppresses the error.
    OnRowError,
    /// Once, after every row was written (`event.counters` holds the job's counters).
    End,
}

impl Moment {
    /// The name a job file gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Moment::Once => "once",
            Moment::BeforeConnections => "before_connections",
            Moment::BeforeQuery => "before_query",
            Moment::AfterQuery => "after_query",
            Moment::BeforeRow => "before_row",
            Moment::BeforeStage => "before_stage",
            Moment::AfterStage => "after_stage",
            Moment::AfterRow => "after_row",
            Moment::OnRowError => "on_row_error",
            Moment::End => "end",
        }
    }

    /// Whether it runs inside a row's processing, in row order with the stages.
    pub fn in_row(self) -> bool {
        matches!(
            self,
            Moment::BeforeRow | Moment::BeforeStage | Moment::AfterStage | Moment::AfterRow
        )
    }
}

/// Where a job's rows come from.
#[derive(Debug, Clone)]
pub struct OriginSpec {
    /// The connection's name in the project.
    pub connection: String,
    /// A SQL query (database kinds); tokens are bound as parameters.
    pub query: Option<String>,
    /// A file path overriding the connection's (file kinds).
    pub path: Option<PathBuf>,
    /// `incremental = { field = … }`: the mark kept across runs.
    pub incremental: Option<incremental::Incremental>,
    /// A folder and a file-name pattern: each run takes the new files.
    pub file_drop: Option<incremental::FileDrop>,
}

/// One stage of a job.
#[derive(Debug, Clone)]
pub struct Stage {
    /// A human name (defaults to "<action> <table>").
    pub name: String,
    /// The table or object written to (database kinds).
    pub table: Option<String>,
    /// What the stage does.
    pub action: StageAction,
    /// A blank mapped value does not overwrite the destination's.
    pub omit_blank: bool,
    /// Update only when a value differs; an unchanged row is counted as a skip.
    pub update_on_difference: bool,
    /// Write to the origin connection instead of the destination (write-back).
    pub use_origin: bool,
    /// The destination fields.
    pub fields: Vec<Field>,
}

/// One destination field of a stage.
#[derive(Debug, Clone)]
pub struct Field {
    /// The destination column.
    pub column: String,
    /// Where the value comes from.
    pub source: FieldSource,
    /// Part of the WHERE used by update, delete, update/insert and skip/insert.
    pub is_match: bool,
    /// Written only when a row is inserted.
    pub insert_only: bool,
    /// Written only when a row is updated.
    pub update_only: bool,
    /// Transforms applied in order, before `ty`.
    pub transforms: Vec<Transform>,
    /// Conversion applied last; a value that does not convert is a row error.
    pub ty: Option<FieldType>,
    /// The line of the field in its job file (for messages).
    pub line: usize,
}

/// Where a field's value comes from.
#[derive(Debug, Clone)]
pub enum FieldSource {
    /// An origin field, by name.
    Origin(String),
    /// A constant.
    Constant(Value),
    /// A template with tokens.
    Template(Template),
    /// A built-in function.
    Function(BuiltinFunction),
    /// A JavaScript expression or function body (see [`crate::script`]).
    Script(String),
}

/// Built-in functions a field can take its value from (`function = "…"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinFunction {
    /// The local date and time, ISO 8601 with offset.
    Now,
    /// The UTC date and time, ISO 8601 with `Z`.
    UtcNow,
    /// The local date, `YYYY-MM-DD`.
    Today,
    /// A new random GUID per row.
    NewGuid,
    /// The origin row number (1-based).
    RowNumber,
    /// The run's ID.
    RunId,
}

/// A text transform (`transform = ["trim", "lower"]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// Remove leading and trailing white space.
    Trim,
    /// Lower case.
    Lower,
    /// Upper case.
    Upper,
    /// A blank value becomes NULL.
    NullIfBlank,
}

/// A problem found while loading or checking a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in.
    pub file: PathBuf,
    /// The 1-based line, where known.
    pub line: Option<usize>,
    /// What is wrong and, where possible, what to do.
    pub message: String,
}

impl Problem {
    pub(crate) fn new(file: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        Problem {
            file: file.to_owned(),
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}
