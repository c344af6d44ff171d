//! Operations: the scripts a job runs at fixed moments (Starfish's Exec
//! stages), in the row's order on the writer threads, or once per job.

use super::{LogLevel, RowState, RunLog, Shared};
use crate::connector::RowAction;
use crate::project::{Job, Moment};
use crate::script::{CallInput, ScriptRuntime, StageView};
use crate::value::{Row, Value};

/// An operation that failed: when it runs, its line in the job file, why.
#[derive(Debug, thiserror::Error)]
#[error("operation {} (line {line}): {reason}", when.as_str())]
pub(crate) struct OperationError {
    when: Moment,
    line: usize,
    /// The script's error.
    reason: String,
}

/// Why a row's operations stopped.
#[derive(Debug, thiserror::Error)]
pub(super) enum RowOpError {
    /// One called gotoNextRow(): the row's later stages do not run.
    #[error("{}", crate::script::SKIP_ROW)]
    Skip,
    /// One failed.
    #[error(transparent)]
    Failed(#[from] OperationError),
}

/// An operation of the job, compiled in the threads' runtimes.
#[derive(Debug, Clone)]
pub(super) struct OpRef {
    /// When it runs.
    pub(super) when: Moment,
    /// The one stage (0-based) it runs for, if it names one.
    pub(super) stage: Option<usize>,
    /// Its index among the runtime's scripts.
    pub(super) script: usize,
    /// Its line in the job file (for messages).
    pub(super) line: usize,
    /// The origin fields its `row` gets (those it reads).
    pub(super) read: Vec<usize>,
    /// Whether it reads `stages` / `event` (each is built only then).
    pub(super) wants_stages: bool,
    pub(super) wants_event: bool,
}

impl Shared<'_> {
    /// The row's stage results, as scripts see them in `stages`.
    pub(super) fn views<'r>(&'r self, row: &'r RowState) -> Vec<StageView<'r>> {
        self.stages
            .iter()
            .enumerate()
            .map(|(i, st)| StageView {
                name: &st.name,
                action: row.actions.get(i).copied().flatten().map(RowAction::as_str),
                columns: &st.columns,
                values: row.written.get(i).and_then(|w| w.as_deref()),
            })
            .collect()
    }

    /// Runs the operations at `when` (for stage `stage`) on one row. Returns
    /// whether one returned `true`.
    pub(super) fn row_ops(
        &self,
        js: Option<&ScriptRuntime>,
        when: Moment,
        stage: Option<usize>,
        row: &RowState,
        error: Option<&str>,
        logs: &mut Vec<String>,
    ) -> Result<bool, RowOpError> {
        let Some(js) = js else { return Ok(false) };
        let mut said_true = false;
        let mut event = None;
        for op in &self.ops {
            if op.when != when || (op.stage.is_some() && op.stage != stage) {
                continue;
            }
            let ev = op.wants_event.then(|| {
                &*event.get_or_insert_with(|| {
                    let mut ev = serde_json::json!({"when": when.as_str(), "row": row.number});
                    if let Some(si) = stage {
                        ev["stage"] = self.stages[si].name.clone().into();
                        ev["stageNumber"] = (si + 1).into();
                    }
                    if let Some(e) = error {
                        ev["error"] = e.into();
                    }
                    ev
                })
            });
            let views = if op.wants_stages {
                self.views(row)
            } else {
                Vec::new()
            };
            let out = js.call(
                op.script,
                &CallInput {
                    columns: &self.columns,
                    read: &op.read,
                    row: &row.values,
                    stages: op.wants_stages.then_some(views.as_slice()),
                    event: ev,
                },
            );
            logs.extend(js.take_logs());
            match out {
                Ok(v) => said_true |= v == Value::Bool(true),
                Err(e) if e.is_skip_row() => return Err(RowOpError::Skip),
                Err(reason) => {
                    return Err(RowOpError::Failed(OperationError {
                        when,
                        line: op.line,
                        reason: reason.to_string(),
                    }));
                }
            }
        }
        Ok(said_true)
    }

    pub(super) fn has_ops(&self, when: Moment) -> bool {
        self.ops.iter().any(|o| o.when == when)
    }

    /// Whether an `on_row_error` operation suppresses the row's error.
    pub(super) fn suppressed(&self, js: Option<&ScriptRuntime>, r: &RowState) -> bool {
        let Some((stage, msg)) = &r.error else {
            return false;
        };
        if !self.has_ops(Moment::OnRowError) {
            return false;
        }
        let stage = stage.checked_sub(1);
        let mut logs = Vec::new();
        let done = self.row_ops(js, Moment::OnRowError, stage, r, Some(msg), &mut logs);
        for m in logs {
            self.log(
                LogLevel::Low,
                Some(r.number),
                format!("row {}: {m}", r.number),
            );
        }
        match done {
            Ok(suppress) => suppress,
            Err(e) => {
                self.log(
                    LogLevel::Low,
                    Some(r.number),
                    format!("row {}: {e}", r.number),
                );
                false
            }
        }
    }
}

/// Runs a job's operations at a moment outside rows (in `js`, compiled from
/// the job's operations in order); the value the last one returned.
pub(super) fn job_ops(
    js: &ScriptRuntime,
    job: &Job,
    when: Moment,
    event: &serde_json::Value,
    log: &mut RunLog<'_>,
) -> Result<Option<Value>, OperationError> {
    let empty = Row::from_values(Vec::new());
    let mut last = None;
    for (i, op) in job.operations.iter().enumerate() {
        if op.when != when {
            continue;
        }
        let out = js.call(
            i,
            &CallInput {
                columns: &[],
                read: &[],
                row: &empty,
                stages: None,
                event: Some(event),
            },
        );
        for m in js.take_logs() {
            log.push(LogLevel::Low, None, m);
        }
        match out {
            Ok(v) => last = Some(v),
            Err(e) => {
                let e = if e.is_skip_row() {
                    "gotoNextRow() was called outside a row".to_owned()
                } else {
                    e.to_string()
                };
                return Err(OperationError {
                    when,
                    line: op.line,
                    reason: e,
                });
            }
        }
    }
    Ok(last)
}
