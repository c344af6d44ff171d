//! Writing batches: each row through the stages in a transaction, replayed
//! row by row when the batch fails, then counted and logged.

use std::sync::atomic::Ordering;

use super::mapping::RowContext;
use super::operations::RowOpError;
use super::{LogLevel, RowState, Shared, Writer};
use crate::connector::{ConnectorError, RowAction};
use crate::engine::{Counters, PreviewRow, PreviewStage, RowError};
use crate::project::Moment;
use crate::script::{SKIP_ROW, ScriptRuntime};
use crate::value::{Value, ValueRef};

impl Shared<'_> {
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
            self.row_hooks(js, Moment::BeforeRow, rows);
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
                match self.map_row(js, si, row, hooks, &mut vals) {
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
                self.record_write(si, row, res, vals.get(k));
                if hooks && row.error.is_none() {
                    self.row_hook(js, Moment::AfterStage, Some(si), row);
                }
            }
        }
        if hooks && self.has_ops(Moment::AfterRow) {
            self.row_hooks(js, Moment::AfterRow, rows);
        }
        Ok(())
    }

    /// Stage `si`'s values for a row (its before_stage operations first, when
    /// `hooks`): mapped ahead on the reader, or mapped now and pushed to `vals`.
    fn map_row(
        &self,
        js: Option<&ScriptRuntime>,
        si: usize,
        row: &mut RowState,
        hooks: bool,
        vals: &mut Vec<Vec<Value>>,
    ) -> Result<(), String> {
        let mut logs = Vec::new();
        let before = if hooks {
            self.row_ops(js, Moment::BeforeStage, Some(si), row, None, &mut logs)
                .map(|_| ())
                .map_err(|e| e.to_string())
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
                let r = self.stages[si]
                    .evaluate(&ctx, &mut out)
                    .map_err(|e| e.to_string());
                r.map(|()| vals.push(out))
            }
        };
        row.writer_logs.append(&mut logs.into_inner());
        mapped
    }

    /// Records what stage `si` did with a row; `vals` is the values it wrote
    /// (row-wise, every stage is mapped on the writer, so they line up).
    fn record_write(
        &self,
        si: usize,
        row: &mut RowState,
        res: Result<RowAction, String>,
        vals: Option<&Vec<Value>>,
    ) {
        match res {
            Ok(a) => {
                row.actions[si] = Some(a);
                if self.row_wise
                    && let Some(w) = row.written.get_mut(si)
                {
                    *w = vals.cloned();
                }
            }
            Err(e) => {
                row.actions[si] = Some(RowAction::Error);
                row.error = Some((si + 1, e));
            }
        }
    }

    /// Runs the before_row or after_row operations on the rows still going.
    fn row_hooks(&self, js: Option<&ScriptRuntime>, when: Moment, rows: &mut [RowState]) {
        for row in rows.iter_mut() {
            if row.error.is_some() || row.skipped {
                continue;
            }
            self.row_hook(js, when, None, row);
        }
    }

    /// Runs a row's operations at `when` (for stage `stage`): they may skip
    /// the row or fail it.
    fn row_hook(
        &self,
        js: Option<&ScriptRuntime>,
        when: Moment,
        stage: Option<usize>,
        row: &mut RowState,
    ) {
        let mut logs = Vec::new();
        let done = self.row_ops(js, when, stage, row, None, &mut logs);
        row.writer_logs.append(&mut logs);
        match done {
            Ok(_) => {}
            Err(RowOpError::Skip) => {
                // Skipped before any stage ran: the first stage counts the skip.
                if when == Moment::BeforeRow {
                    row.actions[0] = Some(RowAction::Skip);
                }
                row.skipped = true;
            }
            Err(e) => row.error = Some((stage.map_or(0, |si| si + 1), e.to_string())),
        }
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
    pub(super) fn process_batch(
        &self,
        w: &mut Writer,
        js: Option<&ScriptRuntime>,
        rows: &mut [RowState],
    ) {
        let (result, attempt) = self.transaction_retried(w, js, rows, "the batch");
        if let Err(e) = &result
            && let Some(why) = gave_up(e, attempt)
        {
            let _ = w.each(&mut |d| d.rollback());
            self.fail_unreachable(why);
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
                        self.fail_unreachable(why);
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
        self.mark_done(rows);
    }

    /// Keeps a row error with the row's origin values, whatever the log level.
    fn keep_row_error(&self, r: &RowState, stage: usize, msg: &str) {
        let values = named_texts(&self.columns, r.values.iter().map(ValueRef::to_text));
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
                    .map(|vals| named_texts(&stage.columns, vals.iter().map(Value::to_text)))
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
            origin: named_texts(&self.columns, r.values.iter().map(ValueRef::to_text)),
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
            let error = self.account_row(js, r, &mut c, &mut per_stage);
            if first_error.is_none() {
                first_error = error;
            }
        }
        self.counters.add(&c);
        self.landing.landed(rows);
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

    /// Counts and logs one processed row into `c` and `per_stage`; the
    /// row's error as logged, if it has one an operation did not suppress.
    fn account_row(
        &self,
        js: Option<&ScriptRuntime>,
        r: &RowState,
        c: &mut Counters,
        per_stage: &mut [Counters],
    ) -> Option<String> {
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
                bump(c, a);
            }
        }
        if suppressed {
            return None;
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
            self.write_error_file(r, *stage, msg);
            return Some(text);
        }
        if self.level >= LogLevel::High {
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
        None
    }

    /// Adds a row's error to the error file, if the job keeps one.
    fn write_error_file(&self, r: &RowState, stage: usize, msg: &str) {
        let Some(f) = &self.error_file else { return };
        let mut f = f.lock().expect("error file lock");
        let mut rec: Vec<String> = vec![
            r.number.to_string(),
            match stage {
                0 => String::new(),
                s => self.stages[s - 1].name.clone(),
            },
            msg.to_owned(),
        ];
        rec.extend(r.values.iter().map(ValueRef::to_text));
        if let Err(e) = f.write_record(&rec) {
            drop(f);
            self.log(
                LogLevel::Low,
                None,
                format!("cannot write the error file: {e}"),
            );
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

/// Each column's name with its value's text (NULL as "").
fn named_texts(columns: &[String], texts: impl Iterator<Item = String>) -> Vec<(String, String)> {
    columns.iter().cloned().zip(texts).collect()
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
