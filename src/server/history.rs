//! What a finished run leaves behind, made from the engine's report: its
//! answer and per-job results as the store keeps them, and, for the console to
//! page through, its log line by line and its row errors with their origin
//! values (kept at every level).

use crate::engine::{JobReport, LogEntry, LogLevel, RunReport};
use crate::run::{JobResult, LogLine, RunResult, timespan};
use crate::store::history::{RowErrorTotals, RunDetails, StoredLogLine, StoredRowError};

/// The log lines (at the run's requested level) and row errors of a report.
pub fn details_of(report: &RunReport) -> RunDetails {
    let mut details = RunDetails::default();
    for job in &report.jobs {
        details.log.extend(
            job.log
                .iter()
                .filter(|e| e.level != LogLevel::None)
                .map(stored_line),
        );
        details
            .row_errors
            .extend(job.row_errors.iter().map(|e| StoredRowError {
                seq: 0,
                job: job.job_id.0.clone(),
                row: e.row,
                stage: e.stage,
                stage_name: e.stage_name.clone(),
                message: e.message.clone(),
                values: e.values.clone(),
            }));
        details.totals.total += job.row_errors_total;
    }
    details.totals = RowErrorTotals {
        total: details.totals.total,
        kept: details.row_errors.len() as u64,
    };
    details
}

/// A log entry as the store keeps it (`seq` 0: the store numbers lines);
/// the same whether saved live or at the run's end.
pub fn stored_line(e: &LogEntry) -> StoredLogLine {
    StoredLogLine {
        seq: 0,
        time: crate::value::datetime_text(&e.time),
        level: e.level as u8,
        job: e.job_id.0.clone(),
        row: e.row,
        message: e.message.clone(),
    }
}

/// One job's result, as the run's results record keeps it.
pub fn job_result(run_id: &str, j: &JobReport) -> JobResult {
    let mut r = JobResult::new(
        run_id,
        &j.job_id.0,
        &j.start_time,
        j.run_time,
        j.status,
        &j.counters,
    );
    // Where a rerun from the failure would start: only for a job that did
    // not complete (a complete job is never resumed).
    if j.status != crate::run::RunStatus::Complete {
        r.resume_at_row = j.resume_at_row;
    }
    r
}

/// A log entry as a run's answer shows it.
pub fn log_line(e: &LogEntry) -> LogLine {
    LogLine {
        time: crate::value::datetime_text(&e.time),
        level: format!("{:?}", e.level),
        job_id: e.job_id.0.clone(),
        row: e.row,
        message: e.message.clone(),
    }
}

/// The answer for a finished run; the log keeps what `level` asks for.
pub fn run_result(r: &RunReport, level: LogLevel) -> RunResult {
    let run_id = r.run_id.to_string();
    RunResult {
        run_id: run_id.clone(),
        status: r.status,
        start_time: crate::value::datetime_text(&r.start_time),
        run_time: timespan(r.run_time),
        counters: r.counters,
        error: r.error.clone(),
        return_value: r.return_value.clone(),
        results: r.jobs.iter().map(|j| job_result(&run_id, j)).collect(),
        log: r
            .jobs
            .iter()
            .flat_map(|j| j.log.iter())
            .filter(|e| level != LogLevel::None && e.level <= level)
            .map(log_line)
            .collect(),
        webhook_attempts: None,
        loads: r
            .jobs
            .iter()
            .filter(|j| !j.load.is_empty())
            .map(|j| j.load.clone())
            .collect(),
    }
}
