//! Finishing a job: the stages' counts, the errors the pump met, the end
//! operations, and the variables kept for the next run.

use std::collections::BTreeMap;

use super::operations::job_ops;
use super::prepare::Prelude;
use super::pump::Pumped;
use super::{JobOutcome, Shared};
use crate::connector::ConnectorError;
use crate::engine::{CancelToken, LogLevel, RunRequest, StateError};
use crate::project::{Job, Moment, Project};
use crate::value::Value;

/// Where the job's run stands once its rows are done.
pub(super) struct Ending<'a> {
    pub(super) project: &'a Project,
    pub(super) job: &'a Job,
    pub(super) req: &'a RunRequest,
    pub(super) cancel: &'a CancelToken,
    pub(super) start_time: &'a chrono::DateTime<chrono::FixedOffset>,
}

impl Ending<'_> {
    /// Takes the job's outcome from what the writers left and the pump's end.
    pub(super) fn finish<'s>(
        &self,
        shared: Shared<'s>,
        pumped: Pumped,
        pre: Prelude,
    ) -> JobOutcome<'s> {
        let Shared {
            return_value,
            changed_vars,
            counters,
            stage_counts,
            log,
            halted,
            error_file,
            stages,
            mark,
            unreachable,
            ..
        } = shared;
        let mut log = log.into_inner().expect("log lock");
        let counters = counters.snapshot();
        if let Some(f) = error_file
            && let Err(e) = f.into_inner().expect("error file lock").flush()
        {
            log.push(
                LogLevel::Low,
                None,
                format!("cannot write the error file: {e}"),
            );
        }
        let stage_counts = stage_counts.into_inner().expect("stage counts lock");
        for (i, (stage, c)) in stages.iter().zip(stage_counts).enumerate() {
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
        let cancelled = self.cancel.is_cancelled();
        let mut outcome = JobOutcome {
            error: halted.into_inner().expect("halt lock"),
            counters,
            log,
            cancelled,
            return_value: return_value.into_inner().expect("return value lock"),
            unreachable: unreachable.into_inner(),
            resume_at_row: Some(mark.next()),
            load: Default::default(),
        };
        let writers_finished = pumped.finish_errors.is_empty();
        self.pump_errors(&mut outcome, pumped);
        // Variables changed since the job started: by the operations before the
        // rows, then by the threads' scripts.
        let mut changed: BTreeMap<String, Value> = pre
            .variables
            .iter()
            .filter(|(k, v)| pre.initial_vars.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        changed.extend(changed_vars.into_inner().expect("changed vars lock"));
        self.end_ops(&pre, &mut outcome, &mut changed);
        if let Some(h) = &pre.host {
            if let Err(e) = h.flush() {
                let log = &mut outcome.log;
                let text = format!("the xref lists cannot be kept: {e}");
                log.push(LogLevel::Low, None, text.clone());
                outcome.error.get_or_insert(text);
            }
            let (calls, cached) = h.lookup_stats();
            if calls > 0 {
                outcome.log.push(
                    LogLevel::Medium,
                    None,
                    format!("lookups: {calls}, {cached} answered from the run's cache"),
                );
            }
        }
        self.keep_files(&pre, &mut outcome, writers_finished);
        let high_water = pre.high_water.clone();
        let kept = self.keep_variables(pre, &mut outcome, changed);
        outcome.load.high_water = high_water.map(|h| h.report(kept, &mut outcome.log));
        outcome
    }

    /// Counts and logs the origin's read error and the writers' finishing errors.
    fn pump_errors(&self, outcome: &mut JobOutcome<'_>, pumped: Pumped) {
        let (counters, log, error) = (&mut outcome.counters, &mut outcome.log, &mut outcome.error);
        if let Err(e) = pumped.read_result {
            counters.errors += 1;
            if error.is_none() && super::resume::is_unreachable(&e) {
                outcome.unreachable = true;
            }
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
            error.get_or_insert(format!("origin {:?}: {e}", self.job.origin.connection));
        }
        if error.is_none() && pumped.finish_unreachable {
            outcome.unreachable = true;
        }
        for e in pumped.finish_errors {
            counters.errors += 1;
            log.push(LogLevel::Low, None, e.clone());
            error.get_or_insert(e);
        }
        if outcome.cancelled {
            error.get_or_insert("cancelled".into());
        }
    }

    /// Runs the end operations (unless the job was cancelled); `changed`
    /// becomes the variables they leave changed.
    fn end_ops(
        &self,
        pre: &Prelude,
        outcome: &mut JobOutcome<'_>,
        changed: &mut BTreeMap<String, Value>,
    ) {
        let Some(js) = &pre.job_js else { return };
        if outcome.cancelled || !self.job.operations.iter().any(|o| o.when == Moment::End) {
            return;
        }
        js.set_vars(changed);
        if let Some(rv) = &outcome.return_value {
            js.set_return_value(rv);
        }
        let event = serde_json::json!({
            "when": "end",
            "counters": serde_json::to_value(outcome.counters).unwrap_or_default(),
            "error": outcome.error.clone(),
        });
        if let Err(e) = job_ops(js, self.job, Moment::End, &event, &mut outcome.log) {
            outcome.log.push(LogLevel::Low, None, e.to_string());
            outcome.error.get_or_insert(e.to_string());
        }
        *changed = js.changed_vars(&pre.initial_vars);
        outcome.return_value = js.return_value().or(outcome.return_value.take());
    }

    /// Records the dropped files all of whose rows landed (whatever became
    /// of the job), and reports every file. A record fenced off fails the job.
    fn keep_files(&self, pre: &Prelude, outcome: &mut JobOutcome<'_>, writers_finished: bool) {
        let Some(run) = &pre.drop_run else { return };
        let (files, not_listed, fenced) = run.settle(
            self.project,
            self.job,
            pre.state.as_ref(),
            (self.req.preview, writers_finished),
            &mut outcome.log,
        );
        outcome.load.files = files;
        outcome.load.files_not_listed = not_listed;
        if let Some(e) = fenced {
            outcome
                .error
                .get_or_insert(format!("the processed files cannot be recorded: {e}"));
        }
    }

    /// Keeps the changed variables, LastRunDate and the incremental mark for
    /// the next run, when the job completed (and was not a preview); whether
    /// they were kept. A save that fails is logged; one fenced off (the run
    /// lost its lease) also fails the job.
    fn keep_variables(
        &self,
        pre: Prelude,
        outcome: &mut JobOutcome<'_>,
        changed: BTreeMap<String, Value>,
    ) -> bool {
        let Some(st) = pre.state else { return false };
        if outcome.error.is_some() || outcome.cancelled || self.req.preview {
            return false;
        }
        let mut keep: BTreeMap<String, String> =
            changed.into_iter().map(|(k, v)| (k, v.to_text())).collect();
        if let Some(h) = &pre.high_water {
            keep.extend(h.to_keep());
        }
        keep.insert(
            "LastRunDate".into(),
            self.start_time
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        );
        if let Err(e) = st.save(&self.project.id.0, &self.job.id.0, &keep) {
            let text = format!("job variables cannot be kept: {e}");
            outcome.log.push(LogLevel::Low, None, text.clone());
            // The run lost its lease: another node runs it now, and this
            // node's run must not end as if its work were kept.
            if matches!(e, StateError::Fenced) {
                outcome.error.get_or_insert(text);
            }
            return false;
        }
        true
    }
}
