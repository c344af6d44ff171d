//! Executing one job: reader thread, writer threads, batches, counters, log.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Local;
use smallvec::{SmallVec, smallvec};

mod batch;
mod drops;
mod finish;
mod incremental;
mod operations;
mod prepare;
mod pump;
mod resume;
mod writers;

use super::host::RunHost;
use super::mapping::{self, CompiledStage, RowContext, Target};
use super::state::RunState;
use super::{
    CancelToken, Counters, JobReport, LogEntry, LogLevel, ROW_ERRORS_KEPT, RowError, RunObserver,
    RunRequest, RunStatus,
};
use crate::connector::{
    ConnectionConfig, ConnectorError, Destination, DestinationRequest, Origin, OriginRequest,
    RowAction, RowRead,
};
use crate::project::{Job, Project};
use crate::script::{ScriptHost, ScriptRuntime};
use crate::value::{Row, Value};
use finish::Ending;
use operations::{OpRef, OperationError};
use prepare::{Plan, Prelude};
use writers::ErrorFile;

/// Why a job fails before its rows run, or its connections do not check.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    /// The once-only operations' runtime does not compile.
    #[error("an operation does not compile: {0}")]
    OperationsCompile(#[source] crate::script::ScriptError),
    /// An operation outside rows failed.
    #[error(transparent)]
    Operation(#[from] OperationError),
    /// The job names a connection the project does not have.
    #[error("unknown connection {0:?}")]
    UnknownConnection(String),
    /// The origin does not open.
    #[error("origin {name:?}: {source}")]
    Origin {
        name: String,
        #[source]
        source: ConnectorError,
    },
    /// The stages do not compile against the origin's fields.
    #[error(transparent)]
    Mapping(crate::engine::mapping::MappingError),
    /// The field scripts (and row operations) do not compile.
    #[error("a script does not compile: {0}")]
    ScriptCompile(#[source] crate::script::ScriptError),
    /// Stages write to a target with no connection.
    #[error("no connection for the stages of {0}")]
    NoConnection(String),
    /// A writer's connection does not open; `name` says which (destination or write-back).
    #[error("{name}: {source}")]
    Writer {
        name: String,
        #[source]
        source: ConnectorError,
    },
    /// The error file cannot be created.
    #[error("cannot create error file {}: {source}", path.display())]
    ErrorFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The incremental field is not the origin's, or a file drop cannot be listed.
    #[error("{0}")]
    Load(String),
    /// A destination does not open or finish when the job's connections are checked.
    #[error("destination {name:?}: {source}")]
    Destination {
        name: String,
        #[source]
        source: ConnectorError,
    },
}

/// Log entries kept per job; past this the log says how many were dropped.
const MAX_LOG_ENTRIES: usize = super::LOG_ENTRIES_KEPT;
/// How often observers hear the live counters.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// The counters, shared by the writers and read live by observers.
#[derive(Default)]
struct LiveCounters([AtomicU64; 7]);

impl LiveCounters {
    fn add(&self, c: &Counters) {
        let vals = [
            c.total_rows,
            c.inserts,
            c.updates,
            c.deletes,
            c.errors,
            c.skips,
            c.ignores,
        ];
        for (a, v) in self.0.iter().zip(vals) {
            if v != 0 {
                a.fetch_add(v, Ordering::Relaxed);
            }
        }
    }

    fn snapshot(&self) -> Counters {
        let v: Vec<u64> = self.0.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        Counters {
            total_rows: v[0],
            inserts: v[1],
            updates: v[2],
            deletes: v[3],
            errors: v[4],
            skips: v[5],
            ignores: v[6],
        }
    }
}

/// The job's log, filtered by level and capped; each entry kept is told to
/// the run's observer as it is made.
struct RunLog<'o> {
    observer: &'o dyn RunObserver,
    level: LogLevel,
    job: crate::project::JobId,
    entries: Vec<LogEntry>,
    dropped: u64,
    /// Row errors are kept at every level (up to [`ROW_ERRORS_KEPT`]), apart from the log.
    row_errors: Vec<RowError>,
    row_errors_total: u64,
}

impl<'o> RunLog<'o> {
    fn row_error(&mut self, e: RowError) {
        self.row_errors_total += 1;
        if self.row_errors.len() < ROW_ERRORS_KEPT {
            self.row_errors.push(e);
        }
    }

    fn push(&mut self, level: LogLevel, row: Option<u64>, message: String) {
        if level > self.level || self.level == LogLevel::None {
            return;
        }
        if self.entries.len() >= MAX_LOG_ENTRIES {
            self.dropped += 1;
            return;
        }
        let entry = LogEntry {
            time: Local::now().fixed_offset(),
            level,
            job_id: self.job.clone(),
            row,
            message,
        };
        self.observer.log(&self.job, &entry);
        self.entries.push(entry);
    }

    fn finish(mut self) -> Vec<LogEntry> {
        if self.dropped > 0 {
            let n = self.dropped;
            self.dropped = 0;
            let entry = LogEntry {
                time: Local::now().fixed_offset(),
                level: LogLevel::Low,
                job_id: self.job.clone(),
                row: None,
                message: format!(
                    "{n} further log entries were dropped (the log keeps {MAX_LOG_ENTRIES})"
                ),
            };
            self.observer.log(&self.job, &entry);
            self.entries.push(entry);
        }
        self.entries
    }
}

/// A stage's values for a row, or why they could not be worked out.
type Mapped = Result<Vec<Value>, String>;

/// One row on its way through the stages.
struct RowState {
    number: u64,
    values: Row,
    read_error: Option<String>,
    actions: SmallVec<[Option<RowAction>; 4]>,
    /// Values of the stages mapped ahead on the reader thread (see `premap`).
    pre: SmallVec<[Option<Mapped>; 2]>,
    /// The stage (1-based; 0 = reading or the batch) and reason of the row's error.
    error: Option<(usize, String)>,
    /// A script called gotoNextRow(): the row's later stages do not run.
    skipped: bool,
    processed: bool,
    /// The values each stage wrote (kept in jobs whose scripts read `stages`).
    written: SmallVec<[Option<Vec<Value>>; 2]>,
    /// What scripts logged for the row on the reader (mapping ahead), and on
    /// the writer (cleared when a batch is replayed, so nothing logs twice);
    /// the log gets both when the row is counted.
    logs: Vec<String>,
    writer_logs: Vec<String>,
}

impl RowState {
    fn reset(&mut self) {
        self.actions.iter_mut().for_each(|a| *a = None);
        self.written.iter_mut().for_each(|w| *w = None);
        self.writer_logs.clear();
        self.error = self.read_error.clone().map(|e| (0, e));
        self.skipped = false;
        self.processed = false;
    }
}

/// A writer thread's connections: the destination, and the origin for write-back stages.
struct Writer {
    dest: Option<Box<dyn Destination>>,
    back: Option<Box<dyn Destination>>,
}

impl Writer {
    fn each(
        &mut self,
        f: &mut dyn FnMut(&mut dyn Destination) -> Result<(), ConnectorError>,
    ) -> Result<(), ConnectorError> {
        if let Some(d) = self.dest.as_deref_mut() {
            f(d)?;
        }
        if let Some(d) = self.back.as_deref_mut() {
            f(d)?;
        }
        Ok(())
    }

    fn target(&mut self, t: Target) -> &mut dyn Destination {
        match t {
            Target::Destination => self.dest.as_deref_mut(),
            Target::Origin => self.back.as_deref_mut(),
        }
        .expect("a writer has a connection for every target its stages use")
    }

    fn finish(self) -> Result<(), ConnectorError> {
        let a = self.dest.map(|d| d.finish()).unwrap_or(Ok(()));
        let b = self.back.map(|d| d.finish()).unwrap_or(Ok(()));
        a.and(b)
    }
}

/// What the writers share.
struct Shared<'a> {
    job: &'a Job,
    stages: Vec<CompiledStage>,
    counters: LiveCounters,
    stage_counts: Mutex<Vec<Counters>>,
    log: Mutex<RunLog<'a>>,
    level: LogLevel,
    stop: AtomicBool,
    halted: Mutex<Option<String>>,
    cancel: &'a CancelToken,
    error_file: Option<ErrorFile>,
    run_id: String,
    /// The origin's field names (a script's `row` object).
    columns: Vec<String>,
    /// The job's script fields, compiled again in each writer thread.
    scripts: Vec<String>,
    variables: BTreeMap<String, Value>,
    /// The last `returnValue` a script thread left.
    return_value: Mutex<Option<Value>>,
    /// Variables the scripts changed (kept for the next run when the job completes).
    changed_vars: Mutex<BTreeMap<String, Value>>,
    /// The operations that run inside rows (and on row errors).
    ops: Vec<OpRef>,
    /// Rows go through the stages one at a time, every stage mapped on the
    /// writer: row operations and scripts that read `stages` see each row's
    /// own results, in order.
    row_wise: bool,
    limits: crate::script::ScriptLimits,
    host: Option<Arc<RunHost>>,
    /// Hears each row of a preview run (with what each stage would write).
    previewer: Option<&'a dyn RunObserver>,
    /// The first origin row not committed.
    mark: resume::CommitMark,
    /// The job's first failure was a connection that could not be reached.
    unreachable: AtomicBool,
    /// Hears of the rows that landed: the incremental mark, the file drop.
    landing: incremental::Landing,
}

impl Shared<'_> {
    /// A row as the reader hands it on, with the stages that allow it mapped ahead.
    fn new_row(&self, number: u64, read: RowRead, js: Option<&ScriptRuntime>) -> RowState {
        let (values, read_error) = match read {
            Ok(v) => (v, None),
            Err(e) => (Row::from_values(Vec::new()), Some(e)),
        };
        let actions: SmallVec<[Option<RowAction>; 4]> = smallvec![None; self.stages.len()];
        let mut pre = SmallVec::new();
        let logs = std::cell::RefCell::new(Vec::new());
        if read_error.is_none() {
            for stage in &self.stages {
                if !stage.premap {
                    pre.push(None);
                    continue;
                }
                let mut out = Vec::new();
                let ctx = RowContext {
                    number,
                    values: &values,
                    actions: &actions,
                    run_id: &self.run_id,
                    columns: &self.columns,
                    scripts: js,
                    stages: None,
                    log: &|_, m| logs.borrow_mut().push(m),
                };
                pre.push(Some(
                    stage
                        .evaluate(&ctx, &mut out)
                        .map(|()| out)
                        .map_err(|e| e.to_string()),
                ));
            }
        }
        RowState {
            number,
            error: read_error.clone().map(|e| (0, e)),
            processed: read_error.is_some(),
            values,
            read_error,
            actions,
            pre,
            skipped: false,
            written: if self.row_wise {
                smallvec![None; self.stages.len()]
            } else {
                SmallVec::new()
            },
            logs: logs.into_inner(),
            writer_logs: Vec::new(),
        }
    }

    /// A new script runtime for a thread (field scripts, then the operations).
    fn runtime(&self) -> Result<Option<ScriptRuntime>, JobError> {
        if self.scripts.is_empty() {
            return Ok(None);
        }
        let host = self.host.clone().map(|h| h as Arc<dyn ScriptHost>);
        ScriptRuntime::new(&self.scripts, &self.variables, self.limits, host)
            .map(Some)
            .map_err(JobError::ScriptCompile)
    }

    /// Keeps what a thread's scripts left in `returnValue`, if anything.
    fn keep_return_value(&self, js: Option<&ScriptRuntime>) {
        let Some(js) = js else { return };
        if let Some(v) = js.return_value() {
            *self.return_value.lock().expect("return value lock") = Some(v);
        }
        let changed = js.changed_vars(&self.variables);
        self.changed_vars
            .lock()
            .expect("changed vars lock")
            .extend(changed);
    }

    /// Stops the job with `why` as its error (the first reason wins), which
    /// counts as one error.
    fn fail_job(&self, why: String) {
        let mut h = self.halted.lock().expect("halt lock");
        if h.is_none() {
            *h = Some(why);
            self.counters.add(&Counters {
                errors: 1,
                ..Counters::default()
            });
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.cancel.is_cancelled()
    }

    fn log(&self, level: LogLevel, row: Option<u64>, message: String) {
        if level <= self.level {
            self.log.lock().expect("log lock").push(level, row, message);
        }
    }
}

/// The variables a job's tokens see: the project's, then the run's.
fn job_variables(
    project: &Project,
    job: &Job,
    argument: &str,
    run_id: &str,
) -> BTreeMap<String, Value> {
    let mut variables: BTreeMap<String, Value> = project
        .variables
        .iter()
        .map(|(k, v)| (k.clone(), Value::Text(v.clone())))
        .collect();
    variables.insert("JobArgument".into(), Value::from(argument));
    variables.insert("RunID".into(), Value::from(run_id));
    variables.insert("JobID".into(), Value::Text(job.id.0.clone()));
    variables.insert("ProjectID".into(), Value::Text(project.id.0.clone()));
    variables
}

/// Opens the job's origin; the error names the connection. `changed` is the
/// query (or, for file kinds, the path) a `before_query` operation gave.
fn open_origin<'p>(
    project: &'p Project,
    job: &Job,
    variables: &BTreeMap<String, Value>,
    preview: bool,
    changed: Option<&str>,
) -> Result<(&'p ConnectionConfig, Box<dyn Origin>), JobError> {
    let name = &job.origin.connection;
    let conn = project
        .connections
        .get(name)
        .ok_or_else(|| JobError::UnknownConnection(name.clone()))?;
    let by_query = conn.capabilities().origin == crate::connector::OriginInput::Query;
    let query = match changed {
        Some(q) if by_query => Some(q),
        _ => job.origin.query.as_deref(),
    };
    let path = match changed {
        Some(p) if !by_query => Some(std::path::Path::new(p)),
        _ => job.origin.path.as_deref(),
    };
    let origin = conn
        .connector()
        .open_origin(&OriginRequest {
            base_dir: &project.dir,
            query,
            path,
            variables,
            fields: &mapping::origin_fields(job),
            preview,
        })
        .map_err(|source| JobError::Origin {
            name: name.clone(),
            source,
        })?;
    Ok((conn, origin))
}

/// Runs one job to its end and reports it; never panics on bad input.
pub(crate) fn run_job(
    project: &Project,
    job: &Job,
    req: &RunRequest,
    cancel: &CancelToken,
    observer: &dyn RunObserver,
    kept: &RunState,
) -> JobReport {
    let start_time = Local::now().fixed_offset();
    let t0 = Instant::now();
    let mut log = RunLog {
        observer,
        level: req.logging_level,
        job: job.id.clone(),
        entries: Vec::new(),
        dropped: 0,
        row_errors: Vec::new(),
        row_errors_total: 0,
    };
    log.push(
        LogLevel::Low,
        None,
        format!(
            "job {} started (run {}{})",
            job.id,
            req.run_id,
            if req.preview {
                ", preview: nothing is written"
            } else {
                ""
            }
        ),
    );
    let JobOutcome {
        counters,
        error,
        mut log,
        cancelled,
        return_value,
        unreachable,
        resume_at_row,
        mut load,
    } = execute(
        &Ending {
            project,
            job,
            req,
            cancel,
            start_time: &start_time,
        },
        observer,
        log,
        kept,
    );
    let status = if cancelled {
        RunStatus::Cancelled
    } else if error.is_some() {
        RunStatus::Failed
    } else {
        RunStatus::Complete
    };
    let run_time = t0.elapsed();
    log.push(
        LogLevel::Low,
        None,
        format!(
            "job {} ended: {status} in {:.3}s; {} rows, {} inserts, {} updates, {} deletes, {} errors, {} skips, {} ignores{}",
            job.id,
            run_time.as_secs_f64(),
            counters.total_rows,
            counters.inserts,
            counters.updates,
            counters.deletes,
            counters.errors,
            counters.skips,
            counters.ignores,
            error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
        ),
    );
    let row_errors = std::mem::take(&mut log.row_errors);
    let row_errors_total = log.row_errors_total;
    let failure = (status == RunStatus::Failed).then_some(if unreachable {
        crate::run::FailureKind::Unreachable
    } else {
        crate::run::FailureKind::Job
    });
    JobReport {
        failure,
        resume_at_row: (!req.preview)
            .then(|| resume_at_row.unwrap_or_else(|| resume::first_row(job, req))),
        row_errors,
        row_errors_total,
        job_id: job.id.clone(),
        start_time,
        run_time,
        status,
        counters,
        error,
        log: log.finish(),
        return_value: return_value.map(|v| v.to_text()),
        load: {
            load.job_id = job.id.0.clone();
            load
        },
    }
}

/// What a job's run came to.
struct JobOutcome<'o> {
    counters: Counters,
    /// Why the job failed (the first reason), if it did.
    error: Option<String>,
    log: RunLog<'o>,
    cancelled: bool,
    /// The scripts' last `returnValue`.
    return_value: Option<Value>,
    /// The first failure was a connection that could not be reached.
    unreachable: bool,
    /// The first origin row not committed (None: none was read).
    resume_at_row: Option<u64>,
    /// The incremental mark and the dropped files.
    load: crate::run::JobLoad,
}

impl<'o> JobOutcome<'o> {
    /// A job that failed before its rows ran: one error, nothing written.
    fn failed(why: JobError, log: RunLog<'o>) -> Self {
        JobOutcome {
            unreachable: why.is_unreachable(),
            resume_at_row: None,
            counters: Counters {
                errors: 1,
                ..Counters::default()
            },
            error: Some(why.to_string()),
            log,
            cancelled: false,
            return_value: None,
            load: Default::default(),
        }
    }
}

/// Runs the job's phases: variables and operations, opening the writers,
/// the reader/writer pump, finishing (`ending` says which job of which run).
fn execute<'o>(
    ending: &Ending<'o>,
    observer: &'o dyn RunObserver,
    mut log: RunLog<'o>,
    kept: &RunState,
) -> JobOutcome<'o> {
    let &Ending {
        project,
        job,
        req,
        cancel,
        ..
    } = ending;
    let mut pre = match Prelude::open(project, job, req, kept, &mut log) {
        Ok(p) => p,
        Err(e) => return JobOutcome::failed(e, log),
    };
    let plan = match pre.plan(project, job, req, &mut log) {
        Ok(p) => p,
        Err(e) => return JobOutcome::failed(e, log),
    };
    let writers = match writers::open_writers(project, job, req, plan.origin_conn, &mut log) {
        Ok(w) => w,
        Err(e) => return JobOutcome::failed(e, log),
    };
    let error_file = match writers::open_error_file(job, req, &plan.columns) {
        Ok(f) => f,
        Err(e) => {
            writers::finish_all(writers);
            return JobOutcome::failed(e, log);
        }
    };
    let Plan {
        origin,
        columns,
        stages,
        scripts,
        ops,
        row_wise,
        ..
    } = plan;
    let shared = Shared {
        job,
        stage_counts: Mutex::new(vec![Counters::default(); stages.len()]),
        stages,
        counters: LiveCounters::default(),
        level: req.logging_level,
        log: Mutex::new(log),
        stop: AtomicBool::new(false),
        halted: Mutex::new(None),
        cancel,
        error_file,
        run_id: req.run_id.to_string(),
        columns,
        scripts,
        variables: pre.variables.clone(),
        return_value: Mutex::new(None),
        changed_vars: Mutex::new(BTreeMap::new()),
        ops,
        row_wise,
        limits: job.script_limits,
        host: pre.host.clone(),
        previewer: req.preview.then_some(observer),
        mark: resume::CommitMark::new(resume::first_row(job, req)),
        unreachable: AtomicBool::new(false),
        landing: incremental::Landing {
            high_water: pre.high_water.clone(),
            drop: pre.drop_run.clone(),
        },
    };
    let pumped = pump::pump(&shared, origin, writers, req, observer);
    ending.finish(shared, pumped, pre)
}

/// Opens a job's connections as a preview run would, without reading rows:
/// finds a missing file or table, an origin field or column that does not
/// exist. Returns the destinations' notes (a missing index, …).
pub(crate) fn check_job(project: &Project, job: &Job) -> Result<Vec<String>, JobError> {
    let variables = job_variables(project, job, "", "");
    let (origin_conn, origin) = match &job.origin.file_drop {
        Some(_) => drops::open_for_check(project, job, &variables)?,
        None => open_origin(project, job, &variables, true, None)?,
    };
    mapping::compile(job, origin.columns(), &variables).map_err(JobError::Mapping)?;
    drop(origin);
    let dest_conn = job
        .destination
        .as_ref()
        .and_then(|d| project.connections.get(d));
    let mut notes = Vec::new();
    for (conn, target, name) in [
        (
            dest_conn,
            Target::Destination,
            job.destination.clone().unwrap_or_default(),
        ),
        (
            Some(origin_conn),
            Target::Origin,
            job.origin.connection.clone(),
        ),
    ] {
        let plans = mapping::plans(&job.stages, target);
        if plans.is_empty() {
            continue;
        }
        let Some(c) = conn else { continue };
        let d = c
            .connector()
            .open_destination(&DestinationRequest {
                base_dir: &project.dir,
                stages: &plans,
                preview: true,
            })
            .map_err(|source| JobError::Destination {
                name: name.clone(),
                source,
            })?;
        notes.extend(
            d.notes()
                .into_iter()
                .map(|n| format!("destination {name:?}: {n}")),
        );
        d.finish()
            .map_err(|source| JobError::Destination { name, source })?;
    }
    Ok(notes)
}
