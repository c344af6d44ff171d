//! Executing one job: reader thread, writer threads, batches, counters, log.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Local;
use crossbeam_channel::RecvTimeoutError;
use smallvec::{SmallVec, smallvec};

mod operations;

use super::host::RunHost;
use super::mapping::{self, CompiledStage, RowContext, Target};
use super::state;
use super::{
    CancelToken, Counters, JobReport, LogEntry, LogLevel, PreviewRow, PreviewStage,
    ROW_ERRORS_KEPT, RowError, RunObserver, RunRequest, RunStatus,
};
use crate::connector::{
    ConnectionConfig, ConnectorError, Destination, DestinationRequest, Flow, Origin, OriginRequest,
    RowAction, RowRead,
};
use crate::project::{Job, Moment, Project};
use crate::script::{SKIP_ROW, ScriptHost, ScriptRuntime};
use crate::value::{Row, Value};
use operations::{OpRef, job_ops};

/// Log entries kept per job; past this the log says how many were dropped.
const MAX_LOG_ENTRIES: usize = 100_000;
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

/// The job's log, filtered by level and capped.
struct RunLog {
    level: LogLevel,
    job: crate::project::JobId,
    entries: Vec<LogEntry>,
    dropped: u64,
    /// Row errors are kept at every level (up to [`ROW_ERRORS_KEPT`]), apart from the log.
    row_errors: Vec<RowError>,
    row_errors_total: u64,
}

impl RunLog {
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
        self.entries.push(LogEntry {
            time: Local::now().fixed_offset(),
            level,
            job_id: self.job.clone(),
            row,
            message,
        });
    }

    fn finish(mut self) -> Vec<LogEntry> {
        if self.dropped > 0 {
            let n = self.dropped;
            self.dropped = 0;
            self.entries.push(LogEntry {
                time: Local::now().fixed_offset(),
                level: LogLevel::Low,
                job_id: self.job.clone(),
                row: None,
                message: format!(
                    "{n} further log entries were dropped (the log keeps {MAX_LOG_ENTRIES})"
                ),
            });
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
    log: Mutex<RunLog>,
    level: LogLevel,
    stop: AtomicBool,
    halted: Mutex<Option<String>>,
    cancel: &'a CancelToken,
    error_file: Option<Mutex<::csv::Writer<File>>>,
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
    fn runtime(&self) -> Result<Option<ScriptRuntime>, String> {
        if self.scripts.is_empty() {
            return Ok(None);
        }
        let host = self.host.clone().map(|h| h as Arc<dyn ScriptHost>);
        ScriptRuntime::new(&self.scripts, &self.variables, self.limits, host)
            .map(Some)
            .map_err(|e| e.to_string())
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

    /// Evaluates and writes every stage for `rows` (no transaction handling).
    /// With halt on error, rows go one at a time and the first error stops the rest.
    fn write_rows(
        &self,
        w: &mut Writer,
        js: Option<&ScriptRuntime>,
        rows: &mut [RowState],
    ) -> Result<(), ConnectorError> {
        if self.job.halt_on_error || self.row_wise {
            for i in 0..rows.len() {
                self.write_chunk(w, js, &mut rows[i..=i])?;
                if rows[i].error.is_some() && self.job.halt_on_error {
                    break;
                }
            }
            Ok(())
        } else {
            self.write_chunk(w, js, rows)
        }
    }

    fn write_chunk(
        &self,
        w: &mut Writer,
        js: Option<&ScriptRuntime>,
        rows: &mut [RowState],
    ) -> Result<(), ConnectorError> {
        for r in rows.iter_mut() {
            r.processed = true;
        }
        let hooks = self.row_wise && !self.ops.is_empty();
        if hooks && self.has_ops(Moment::BeforeRow) {
            for row in rows.iter_mut() {
                if row.error.is_some() || row.skipped {
                    continue;
                }
                let mut logs = Vec::new();
                let done = self.row_ops(js, Moment::BeforeRow, None, row, None, &mut logs);
                row.writer_logs.append(&mut logs);
                match done {
                    Ok(_) => {}
                    Err(e) if e == SKIP_ROW => {
                        row.actions[0] = Some(RowAction::Skip);
                        row.skipped = true;
                    }
                    Err(e) => row.error = Some((0, e)),
                }
            }
        }
        let mut idx: Vec<usize> = Vec::with_capacity(rows.len());
        let mut vals: Vec<Vec<Value>> = Vec::new();
        for (si, stage) in self.stages.iter().enumerate() {
            idx.clear();
            vals.clear();
            for (ri, row) in rows.iter_mut().enumerate() {
                if row.error.is_some() || row.skipped {
                    continue;
                }
                let mut logs = Vec::new();
                let before = if hooks {
                    self.row_ops(js, Moment::BeforeStage, Some(si), row, None, &mut logs)
                        .map(|_| ())
                } else {
                    Ok(())
                };
                let logs = std::cell::RefCell::new(logs);
                let mapped = match (before, row.pre.get(si)) {
                    (Err(e), _) => Err(e),
                    (Ok(()), Some(Some(Ok(_)))) => Ok(()),
                    (Ok(()), Some(Some(Err(e)))) => Err(e.clone()),
                    _ => {
                        let mut out = Vec::new();
                        let views = if self.row_wise {
                            self.views(row)
                        } else {
                            Vec::new()
                        };
                        let ctx = RowContext {
                            number: row.number,
                            values: &row.values,
                            actions: &row.actions,
                            run_id: &self.run_id,
                            columns: &self.columns,
                            scripts: js,
                            stages: self.row_wise.then_some(views.as_slice()),
                            log: &|_, m| logs.borrow_mut().push(m),
                        };
                        let r = stage.evaluate(&ctx, &mut out).map_err(|e| e.to_string());
                        r.map(|()| vals.push(out))
                    }
                };
                row.writer_logs.append(&mut logs.into_inner());
                match mapped {
                    Ok(()) => idx.push(ri),
                    Err(e) if e == SKIP_ROW => {
                        row.actions[si] = Some(RowAction::Skip);
                        row.skipped = true;
                    }
                    Err(e) => {
                        row.actions[si] = Some(RowAction::Error);
                        row.error = Some((si + 1, e));
                    }
                }
            }
            if idx.is_empty() {
                continue;
            }
            let results = {
                let mut fresh = vals.iter();
                let refs: Vec<&[Value]> = idx
                    .iter()
                    .map(|&ri| match rows[ri].pre.get(si) {
                        Some(Some(Ok(v))) => v.as_slice(),
                        _ => fresh.next().map(Vec::as_slice).unwrap_or(&[]),
                    })
                    .collect();
                w.target(stage.target).write(stage.local, &refs)?
            };
            for (k, res) in results.into_iter().enumerate() {
                let row = &mut rows[idx[k]];
                match res {
                    Ok(a) => {
                        row.actions[si] = Some(a);
                        // Row-wise, every stage is mapped here: `vals` lines up with `idx`.
                        if self.row_wise
                            && let Some(w) = row.written.get_mut(si)
                        {
                            *w = vals.get(k).cloned();
                        }
                    }
                    Err(e) => {
                        row.actions[si] = Some(RowAction::Error);
                        row.error = Some((si + 1, e));
                    }
                }
                if hooks && row.error.is_none() {
                    let mut logs = Vec::new();
                    let done = self.row_ops(js, Moment::AfterStage, Some(si), row, None, &mut logs);
                    row.writer_logs.append(&mut logs);
                    match done {
                        Ok(_) => {}
                        Err(e) if e == SKIP_ROW => row.skipped = true,
                        Err(e) => row.error = Some((si + 1, e)),
                    }
                }
            }
        }
        if hooks && self.has_ops(Moment::AfterRow) {
            for row in rows.iter_mut() {
                if row.error.is_some() || row.skipped {
                    continue;
                }
                let mut logs = Vec::new();
                let done = self.row_ops(js, Moment::AfterRow, None, row, None, &mut logs);
                row.writer_logs.append(&mut logs);
                match done {
                    Ok(_) => {}
                    Err(e) if e == SKIP_ROW => row.skipped = true,
                    Err(e) => row.error = Some((0, e)),
                }
            }
        }
        Ok(())
    }

    fn transaction(
        &self,
        w: &mut Writer,
        js: Option<&ScriptRuntime>,
        rows: &mut [RowState],
    ) -> Result<(), ConnectorError> {
        w.each(&mut |d| d.begin())?;
        self.write_rows(w, js, rows)?;
        w.each(&mut |d| d.commit())
    }

    /// Runs the rows' transaction, and again on a new connection while the
    /// connection is lost (`retry_attempts` times, waiting `retry_wait`,
    /// doubling). The last result, and the retries made.
    fn transaction_retried(
        &self,
        w: &mut Writer,
        js: Option<&ScriptRuntime>,
        rows: &mut [RowState],
        what: &str,
    ) -> (Result<(), ConnectorError>, u32) {
        let mut result = self.transaction(w, js, rows);
        let mut attempt = 0;
        while let Err(ConnectorError::Lost(msg)) = &result {
            if attempt >= self.job.retry_attempts || self.stopping() {
                break;
            }
            let _ = w.each(&mut |d| d.rollback());
            let wait = self.job.retry_wait * 2u32.saturating_pow(attempt);
            attempt += 1;
            self.log(
                LogLevel::Medium,
                None,
                format!(
                    "the connection was lost ({msg}); retrying {what} in {:.1}s (attempt {attempt} of {})",
                    wait.as_secs_f64(),
                    self.job.retry_attempts
                ),
            );
            std::thread::sleep(wait);
            rows.iter_mut().for_each(RowState::reset);
            result = self.transaction(w, js, rows);
        }
        (result, attempt)
    }

    /// One batch in one transaction; on failure, replayed row by row. A
    /// destination that takes no more rows (lost past its retries, or
    /// unavailable) fails the job: what it had not taken is not counted.
    fn process_batch(&self, w: &mut Writer, js: Option<&ScriptRuntime>, rows: &mut [RowState]) {
        let (result, attempt) = self.transaction_retried(w, js, rows, "the batch");
        if let Err(e) = &result
            && let Some(why) = gave_up(e, attempt)
        {
            let _ = w.each(&mut |d| d.rollback());
            self.fail_job(why);
            return;
        }
        if let Err(e) = result {
            let _ = w.each(&mut |d| d.rollback());
            let (first, last) = (
                rows.first().map(|r| r.number).unwrap_or(0),
                rows.last().map(|r| r.number).unwrap_or(0),
            );
            self.log(
                LogLevel::Medium,
                None,
                format!("batch of rows {first}-{last} failed ({e}); replaying it row by row"),
            );
            rows.iter_mut().for_each(RowState::reset);
            for i in 0..rows.len() {
                let one = &mut rows[i..=i];
                let what = format!("row {}", one[0].number);
                let (result, attempt) = self.transaction_retried(w, js, one, &what);
                if let Err(e) = result {
                    let _ = w.each(&mut |d| d.rollback());
                    if let Some(why) = gave_up(&e, attempt) {
                        // This row and the rest of the batch are not counted.
                        one[0].reset();
                        self.fail_job(why);
                        break;
                    }
                    let r = &mut one[0];
                    r.actions.iter_mut().for_each(|a| *a = None);
                    r.error = Some((0, e.to_string()));
                    r.processed = true;
                }
                if self.job.halt_on_error && rows[i].error.is_some() {
                    break;
                }
            }
        }
        self.account(js, rows);
    }

    /// Keeps a row error with the row's origin values, whatever the log level.
    fn keep_row_error(&self, r: &RowState, stage: usize, msg: &str) {
        let values = self
            .columns
            .iter()
            .zip(r.values.iter())
            .map(|(c, v)| {
                let mut s = String::new();
                v.push_text(&mut s);
                (c.clone(), s)
            })
            .collect();
        self.log.lock().expect("log lock").row_error(RowError {
            row: r.number,
            stage,
            stage_name: stage.checked_sub(1).map(|i| self.stages[i].name.clone()),
            message: msg.to_owned(),
            values,
        });
    }

    /// Tells the previewer what the stages did with a row.
    fn preview_row(&self, r: &RowState) {
        let Some(o) = self.previewer else { return };
        let text = |v: &Value| {
            let mut s = String::new();
            v.push_text(&mut s);
            s
        };
        let stages = self
            .stages
            .iter()
            .enumerate()
            .filter_map(|(si, stage)| {
                let action = r.actions.get(si).copied().flatten()?;
                let values = r
                    .written
                    .get(si)
                    .and_then(|w| w.as_ref())
                    .map(|vals| {
                        stage
                            .columns
                            .iter()
                            .zip(vals)
                            .map(|(c, v)| (c.clone(), text(v)))
                            .collect()
                    })
                    .unwrap_or_default();
                Some(PreviewStage {
                    stage: stage.name.clone(),
                    action: action.as_str().to_owned(),
                    values,
                })
            })
            .collect();
        o.row_previewed(&PreviewRow {
            job_id: self.job.id.clone(),
            row: r.number,
            origin: self
                .columns
                .iter()
                .zip(r.values.iter())
                .map(|(c, v)| {
                    let mut s = String::new();
                    v.push_text(&mut s);
                    (c.clone(), s)
                })
                .collect(),
            stages,
            error: r.error.as_ref().map(|(_, m)| m.clone()),
        });
    }

    /// Counts, logs and records the outcome of processed rows.
    fn account(&self, js: Option<&ScriptRuntime>, rows: &[RowState]) {
        let mut c = Counters::default();
        let mut per_stage = vec![Counters::default(); self.stages.len()];
        let mut first_error: Option<String> = None;
        for r in rows.iter().filter(|r| r.processed) {
            c.total_rows += 1;
            self.preview_row(r);
            for m in r.logs.iter().chain(&r.writer_logs) {
                self.log(
                    LogLevel::Low,
                    Some(r.number),
                    format!("row {}: {m}", r.number),
                );
            }
            // An error an operation suppresses is neither counted nor logged.
            let suppressed = self.suppressed(js, r);
            for (si, a) in r.actions.iter().enumerate() {
                let Some(a) = *a else { continue };
                if a == RowAction::Error && suppressed {
                    continue;
                }
                bump(&mut per_stage[si], a);
                if a != RowAction::Error {
                    bump(&mut c, a);
                }
            }
            if suppressed {
                continue;
            }
            if let Some((stage, msg)) = &r.error {
                // A row counts one error, whichever stage failed.
                c.errors += 1;
                let place = match stage {
                    0 => String::new(),
                    s => format!(", stage {s} ({})", self.stages[s - 1].name),
                };
                let text = format!("row {}{place}: {msg}", r.number);
                self.log(LogLevel::Low, Some(r.number), text.clone());
                self.keep_row_error(r, *stage, msg);
                if first_error.is_none() {
                    first_error = Some(text);
                }
                if let Some(f) = &self.error_file {
                    let mut f = f.lock().expect("error file lock");
                    let mut rec: Vec<String> = vec![
                        r.number.to_string(),
                        match stage {
                            0 => String::new(),
                            s => self.stages[s - 1].name.clone(),
                        },
                        msg.clone(),
                    ];
                    rec.extend(r.values.iter().map(|v| {
                        let mut s = String::new();
                        v.push_text(&mut s);
                        s
                    }));
                    if let Err(e) = f.write_record(&rec) {
                        drop(f);
                        self.log(
                            LogLevel::Low,
                            None,
                            format!("cannot write the error file: {e}"),
                        );
                    }
                }
            } else if self.level >= LogLevel::High {
                let actions: Vec<String> = r
                    .actions
                    .iter()
                    .enumerate()
                    .filter_map(|(si, a)| a.map(|a| format!("stage {} {}", si + 1, a.as_str())))
                    .collect();
                self.log(
                    LogLevel::High,
                    Some(r.number),
                    format!("row {}: {}", r.number, actions.join(", ")),
                );
            }
        }
        self.counters.add(&c);
        {
            let mut s = self.stage_counts.lock().expect("stage counts lock");
            for (acc, add) in s.iter_mut().zip(&per_stage) {
                acc.add(add);
            }
        }
        if let Some(e) = first_error
            && self.job.halt_on_error
        {
            let mut h = self.halted.lock().expect("halt lock");
            if h.is_none() {
                *h = Some(format!("halted on error at {e}"));
            }
            self.stop.store(true, Ordering::SeqCst);
        }
    }
}

/// The job error when `e` means the destination takes no more rows: lost
/// past its `attempt` retries, or unavailable.
fn gave_up(e: &ConnectorError, attempt: u32) -> Option<String> {
    match e {
        ConnectorError::Lost(_) if attempt > 0 => {
            Some(format!("{e} (gave up after {attempt} retries)"))
        }
        ConnectorError::Lost(_) | ConnectorError::Unavailable(_) => Some(e.to_string()),
        _ => None,
    }
}

fn bump(c: &mut Counters, a: RowAction) {
    match a {
        RowAction::Insert => c.inserts += 1,
        RowAction::Update => c.updates += 1,
        RowAction::Delete => c.deletes += 1,
        RowAction::Ignore => c.ignores += 1,
        RowAction::Skip => c.skips += 1,
        RowAction::Error => c.errors += 1,
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
) -> Result<(&'p ConnectionConfig, Box<dyn Origin>), String> {
    let name = &job.origin.connection;
    let conn = project
        .connections
        .get(name)
        .ok_or_else(|| format!("unknown connection {name:?}"))?;
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
        .map_err(|e| format!("origin {name:?}: {e}"))?;
    Ok((conn, origin))
}

/// Runs one job to its end and reports it; never panics on bad input.
pub(crate) fn run_job(
    project: &Project,
    job: &Job,
    req: &RunRequest,
    cancel: &CancelToken,
    observer: &dyn RunObserver,
) -> JobReport {
    let start_time = Local::now().fixed_offset();
    let t0 = Instant::now();
    let mut log = RunLog {
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
    let outcome = execute(project, job, req, cancel, observer, log, &start_time);
    let (counters, error, mut log, cancelled, return_value) = outcome;
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
    JobReport {
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
    }
}

/// Counters, the job's error, its log, whether it was cancelled, and the
/// scripts' `returnValue`.
type Outcome = (Counters, Option<String>, RunLog, bool, Option<Value>);

fn execute(
    project: &Project,
    job: &Job,
    req: &RunRequest,
    cancel: &CancelToken,
    observer: &dyn RunObserver,
    mut log: RunLog,
    start_time: &chrono::DateTime<chrono::FixedOffset>,
) -> Outcome {
    let job_failed = |msg: String, log: RunLog| -> Outcome {
        let c = Counters {
            errors: 1,
            ..Counters::default()
        };
        (c, Some(msg), log, false, None)
    };

    let mut variables = job_variables(project, job, &req.argument, &req.run_id.to_string());
    // Variables kept from earlier runs (LastRunDate, those scripts set).
    let mut state = match state::JobState::open(&project.data_dir) {
        Ok(s) => Some(s),
        Err(e) => {
            log.push(
                LogLevel::Medium,
                None,
                format!("job variables are not kept: {e}"),
            );
            None
        }
    };
    if let Some(st) = &state {
        match st.load(&project.id.0, &job.id.0) {
            Ok(kept) => {
                for (k, v) in kept {
                    if !matches!(k.as_str(), "JobArgument" | "RunID" | "JobID" | "ProjectID") {
                        variables.insert(k, Value::Text(v));
                    }
                }
            }
            Err(e) => log.push(
                LogLevel::Medium,
                None,
                format!("job variables cannot be read: {e}"),
            ),
        }
    }
    let initial_vars = variables.clone();
    let has_field_scripts = job.stages.iter().any(|s| {
        s.fields
            .iter()
            .any(|f| matches!(f.source, crate::project::FieldSource::Script(_)))
    });
    let host = (has_field_scripts || !job.operations.is_empty())
        .then(|| Arc::new(RunHost::new(project, req.preview)));
    // Operations that run once (not in rows) run here, in a runtime of their own.
    let op_sources: Vec<String> = job.operations.iter().map(|o| o.script.clone()).collect();
    let job_js = if job
        .operations
        .iter()
        .any(|o| !o.when.in_row() && o.when != Moment::OnRowError)
    {
        let h = host.clone().map(|h| h as Arc<dyn ScriptHost>);
        match ScriptRuntime::new(&op_sources, &variables, job.script_limits, h) {
            Ok(rt) => Some(rt),
            Err(e) => return job_failed(format!("an operation does not compile: {e}"), log),
        }
    } else {
        None
    };
    let mut changed_origin: Option<String> = None;
    for when in [Moment::Once, Moment::BeforeConnections, Moment::BeforeQuery] {
        let Some(js) = &job_js else { break };
        let mut event = serde_json::json!({"when": when.as_str()});
        if when == Moment::BeforeQuery {
            let conn_path = project
                .connections
                .get(&job.origin.connection)
                .and_then(|c| c.connector().file_path());
            let q = job.origin.query.clone().or_else(|| {
                job.origin
                    .path
                    .as_deref()
                    .or(conn_path)
                    .map(|p| p.display().to_string())
            });
            event["query"] = q.into();
        }
        match job_ops(js, job, when, &event, &mut log) {
            Ok(Some(Value::Text(q))) if when == Moment::BeforeQuery => changed_origin = Some(q),
            Ok(_) => {}
            Err(e) => return job_failed(e, log),
        }
        variables.extend(js.changed_vars(&variables));
    }
    if let Some(q) = &changed_origin {
        log.push(
            LogLevel::Medium,
            None,
            format!("a before_query operation set the origin query: {q}"),
        );
    }
    let (origin_conn, mut origin) = match open_origin(
        project,
        job,
        &variables,
        req.preview,
        changed_origin.as_deref(),
    ) {
        Ok(o) => o,
        Err(e) => return job_failed(e, log),
    };
    let columns = origin.columns().to_vec();
    if let Some(js) = &job_js {
        let event = serde_json::json!({"when": "after_query", "columns": columns});
        if let Err(e) = job_ops(js, job, Moment::AfterQuery, &event, &mut log) {
            return job_failed(e, log);
        }
        variables.extend(js.changed_vars(&variables));
    }
    let (mut stages, mut scripts) = match mapping::compile(job, &columns, &variables) {
        Ok(s) => s,
        Err(e) => return job_failed(e.to_string(), log),
    };
    // Row operations and on_row_error run in the threads' runtimes, after the field scripts.
    let ops: Vec<OpRef> = job
        .operations
        .iter()
        .enumerate()
        .filter(|(_, o)| o.when.in_row() || o.when == Moment::OnRowError)
        .map(|(i, o)| OpRef {
            when: o.when,
            stage: o.stage,
            script: scripts.len() + i,
            line: o.line,
            read: mapping::script_columns(&o.script, &columns),
            wants_stages: crate::script::reads_stages(&o.script),
            wants_event: o.script.contains("event"),
        })
        .collect();
    if !ops.is_empty() {
        scripts.extend(op_sources.iter().cloned());
    }
    // A preview goes row-wise too: each stage's values are kept to show them.
    let row_wise =
        ops.iter().any(|o| o.when.in_row()) || stages.iter().any(|s| s.reads_stages) || req.preview;
    if row_wise {
        stages.iter_mut().for_each(|s| s.premap = false);
    }
    if !scripts.is_empty()
        && let Err(e) = ScriptRuntime::new(&scripts, &variables, job.script_limits, None)
    {
        return job_failed(format!("a script does not compile: {e}"), log);
    }

    // Open one writer per thread.
    let dest_plans = mapping::plans(&job.stages, Target::Destination);
    let back_plans = mapping::plans(&job.stages, Target::Origin);
    let dest_conn = job
        .destination
        .as_ref()
        .and_then(|d| project.connections.get(d));
    let mut threads = if req.preview {
        1
    } else {
        req.thread_count.max(1)
    };
    for (conn, plans) in [(dest_conn, &dest_plans), (Some(origin_conn), &back_plans)] {
        if let Some(c) = conn
            && !plans.is_empty()
            && let Some(max) = c.capabilities().max_writers
            && threads > max
        {
            log.push(
                LogLevel::Medium,
                None,
                format!(
                    "a {} destination takes {max} writer(s): threadCount {threads} runs as {max}",
                    c.kind()
                ),
            );
            threads = max;
        }
    }
    let mut writers = Vec::with_capacity(threads);
    for _ in 0..threads {
        let open = |conn: Option<&crate::connector::ConnectionConfig>,
                    plans: &[crate::connector::StagePlan],
                    name: &str|
         -> Result<Option<Box<dyn Destination>>, String> {
            if plans.is_empty() {
                return Ok(None);
            }
            let c = conn.ok_or_else(|| format!("no connection for the stages of {name}"))?;
            c.connector()
                .open_destination(&DestinationRequest {
                    base_dir: &project.dir,
                    stages: plans,
                    preview: req.preview,
                })
                .map(Some)
                .map_err(|e| format!("{name}: {e}"))
        };
        let dest_name = format!(
            "destination {:?}",
            job.destination.clone().unwrap_or_default()
        );
        let back_name = format!("origin {:?} (write-back)", job.origin.connection);
        let w = open(dest_conn, &dest_plans, &dest_name).and_then(|dest| {
            Ok(Writer {
                dest,
                back: open(Some(origin_conn), &back_plans, &back_name)?,
            })
        });
        match w {
            Ok(w) => {
                if writers.is_empty() {
                    let (dest, back) = (w.dest.as_deref(), w.back.as_deref());
                    for (d, name) in [(dest, &dest_name), (back, &back_name)] {
                        for note in d.map(|d| d.notes()).unwrap_or_default() {
                            log.push(LogLevel::Low, None, format!("{name}: {note}"));
                        }
                    }
                }
                writers.push(w)
            }
            Err(e) => {
                for w in writers {
                    let _ = w.finish();
                }
                return job_failed(e, log);
            }
        }
    }

    let error_file = match (&job.error_file, req.preview) {
        (Some(path), false) => {
            let opened = path
                .parent()
                .map(std::fs::create_dir_all)
                .unwrap_or(Ok(()))
                .and_then(|()| File::create(path));
            match opened {
                Ok(f) => {
                    let mut w = ::csv::Writer::from_writer(f);
                    let mut header = vec!["row".to_owned(), "stage".into(), "error".into()];
                    header.extend(columns.iter().cloned());
                    let _ = w.write_record(&header);
                    Some(Mutex::new(w))
                }
                Err(e) => {
                    for w in writers {
                        let _ = w.finish();
                    }
                    return job_failed(
                        format!("cannot create error file {}: {e}", path.display()),
                        log,
                    );
                }
            }
        }
        _ => None,
    };

    let nstages = stages.len();
    let shared = Shared {
        job,
        stage_counts: Mutex::new(vec![Counters::default(); nstages]),
        stages,
        counters: LiveCounters::default(),
        level: req.logging_level,
        log: Mutex::new(log),
        stop: AtomicBool::new(false),
        halted: Mutex::new(None),
        cancel,
        error_file,
        run_id: req.run_id.to_string(),
        columns: columns.clone(),
        scripts,
        variables: variables.clone(),
        return_value: Mutex::new(None),
        changed_vars: Mutex::new(BTreeMap::new()),
        ops,
        row_wise,
        limits: job.script_limits,
        host: host.clone(),
        previewer: req.preview.then_some(observer),
    };

    let batch_size = job.batch_size;
    let (tx, rx) = crossbeam_channel::bounded::<Vec<RowState>>(threads * 2);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
    // Processed batches go back to the reader to be freed there: the rows were
    // allocated on its thread, and freeing them there keeps the writers free for
    // writing (cross-thread frees cost the writer a fifth of its time).
    let (trash_tx, trash_rx) = crossbeam_channel::unbounded::<Vec<RowState>>();
    let begin = req.begin_at_row;
    let end = req.end_after_row;

    let (read_result, finish_errors) = std::thread::scope(|s| {
        let shared = &shared;
        let reader = s.spawn(move || {
            // Script fields of stages mapped ahead run here, in the reader's own runtime.
            let js = shared.runtime().ok().flatten();
            let mut n: u64 = 0;
            let mut batch = Vec::with_capacity(batch_size);
            let mut stopped = false;
            let res = origin.read(&mut |r| {
                if shared.stopping() {
                    stopped = true;
                    return Flow::Stop;
                }
                n += 1;
                if n < begin {
                    return Flow::Continue;
                }
                batch.push(shared.new_row(n, r, js.as_ref()));
                if batch.len() >= batch_size {
                    trash_rx.try_iter().for_each(drop);
                    if tx
                        .send(std::mem::replace(
                            &mut batch,
                            Vec::with_capacity(batch_size),
                        ))
                        .is_err()
                    {
                        return Flow::Stop;
                    }
                }
                if end.is_some_and(|e| n >= e) {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            });
            if !batch.is_empty() && !stopped {
                let _ = tx.send(batch);
            }
            shared.keep_return_value(js.as_ref());
            res
        });
        let handles: Vec<_> = writers
            .into_iter()
            .map(|mut w| {
                let rx = rx.clone();
                let done = done_tx.clone();
                let trash = trash_tx.clone();
                s.spawn(move || {
                    // A QuickJS runtime stays on its thread: one per writer.
                    let js = match shared.runtime() {
                        Ok(rt) => rt,
                        Err(e) => {
                            let mut h = shared.halted.lock().expect("halt lock");
                            h.get_or_insert(format!("a script does not compile: {e}"));
                            shared.stop.store(true, Ordering::SeqCst);
                            None
                        }
                    };
                    for batch in rx.iter() {
                        if shared.stopping() {
                            continue; // drain, so the reader never blocks
                        }
                        let mut rows = batch;
                        shared.process_batch(&mut w, js.as_ref(), &mut rows);
                        let _ = trash.send(rows);
                    }
                    shared.keep_return_value(js.as_ref());
                    drop(done);
                    w.finish()
                })
            })
            .collect();
        drop(rx);
        drop(done_tx);
        drop(trash_tx);
        while let Err(RecvTimeoutError::Timeout) = done_rx.recv_timeout(PROGRESS_EVERY) {
            observer.progress(&job.id, &shared.counters.snapshot());
        }
        let read_result = reader
            .join()
            .unwrap_or_else(|_| Err(ConnectorError::Io("the reader thread panicked".into())));
        let finish_errors: Vec<String> = handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("a writer thread panicked".into()),
            })
            .collect();
        (read_result, finish_errors)
    });

    let Shared {
        return_value,
        changed_vars,
        counters,
        stage_counts,
        log,
        halted,
        error_file,
        stages,
        ..
    } = shared;
    let mut log = log.into_inner().expect("log lock");
    let mut counters = counters.snapshot();
    if let Some(f) = error_file
        && let Err(e) = f.into_inner().expect("error file lock").flush()
    {
        log.push(
            LogLevel::Low,
            None,
            format!("cannot write the error file: {e}"),
        );
    }
    for (i, (stage, c)) in stages
        .iter()
        .zip(stage_counts.into_inner().expect("stage counts lock"))
        .enumerate()
    {
        log.push(
            LogLevel::Medium,
            None,
            format!(
                "stage {} ({}): {} inserts, {} updates, {} deletes, {} errors, {} skips, {} ignores",
                i + 1,
                stage.name,
                c.inserts,
                c.updates,
                c.deletes,
                c.errors,
                c.skips,
                c.ignores
            ),
        );
    }
    let cancelled = cancel.is_cancelled();
    let mut error = halted.into_inner().expect("halt lock");
    if let Err(e) = read_result {
        counters.errors += 1;
        // A stream cannot be resumed where it broke: say what landed, so the
        // user knows what a rerun must cover.
        let e = match e {
            ConnectorError::Lost(_) => format!(
                "{e}; the {} rows read before it were processed and counted, the rest were not read",
                counters.total_rows
            ),
            e => e.to_string(),
        };
        log.push(LogLevel::Low, None, format!("origin: {e}"));
        error.get_or_insert(format!("origin {:?}: {e}", job.origin.connection));
    }
    for e in finish_errors {
        counters.errors += 1;
        log.push(LogLevel::Low, None, e.clone());
        error.get_or_insert(e);
    }
    if cancelled {
        error.get_or_insert("cancelled".into());
    }
    let mut return_value = return_value.into_inner().expect("return value lock");
    // Variables changed since the job started: by the operations before the
    // rows, then by the threads' scripts.
    let mut changed: BTreeMap<String, Value> = variables
        .iter()
        .filter(|(k, v)| initial_vars.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    changed.extend(changed_vars.into_inner().expect("changed vars lock"));
    if let Some(js) = &job_js
        && !cancelled
        && job.operations.iter().any(|o| o.when == Moment::End)
    {
        js.set_vars(&changed);
        if let Some(rv) = &return_value {
            js.set_return_value(rv);
        }
        let event = serde_json::json!({
            "when": "end",
            "counters": serde_json::to_value(counters).unwrap_or_default(),
            "error": error.clone(),
        });
        if let Err(e) = job_ops(js, job, Moment::End, &event, &mut log) {
            log.push(LogLevel::Low, None, e.clone());
            error.get_or_insert(e);
        }
        changed = js.changed_vars(&initial_vars);
        return_value = js.return_value().or(return_value);
    }
    if let Some(h) = &host {
        if let Err(e) = h.flush() {
            log.push(
                LogLevel::Low,
                None,
                format!("the xref lists cannot be kept: {e}"),
            );
            error.get_or_insert(format!("the xref lists cannot be kept: {e}"));
        }
        let (calls, cached) = h.lookup_stats();
        if calls > 0 {
            log.push(
                LogLevel::Medium,
                None,
                format!("lookups: {calls}, {cached} answered from the run's cache"),
            );
        }
    }
    if error.is_none()
        && !cancelled
        && !req.preview
        && let Some(st) = state.as_mut()
    {
        let mut keep: BTreeMap<String, String> =
            changed.into_iter().map(|(k, v)| (k, v.to_text())).collect();
        keep.insert(
            "LastRunDate".into(),
            start_time.to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        );
        if let Err(e) = st.save(&project.id.0, &job.id.0, &keep) {
            log.push(
                LogLevel::Low,
                None,
                format!("job variables cannot be kept: {e}"),
            );
        }
    }
    (counters, error, log, cancelled, return_value)
}

/// Opens a job's connections as a preview run would, without reading rows:
/// finds a missing file or table, an origin field or column that does not
/// exist. Returns the destinations' notes (a missing index, …).
pub(crate) fn check_job(project: &Project, job: &Job) -> Result<Vec<String>, String> {
    let variables = job_variables(project, job, "", "");
    let (origin_conn, origin) = open_origin(project, job, &variables, true, None)?;
    mapping::compile(job, origin.columns(), &variables).map_err(|e| e.to_string())?;
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
            .map_err(|e| format!("destination {name:?}: {e}"))?;
        notes.extend(
            d.notes()
                .into_iter()
                .map(|n| format!("destination {name:?}: {n}")),
        );
        d.finish()
            .map_err(|e| format!("destination {name:?}: {e}"))?;
    }
    Ok(notes)
}
