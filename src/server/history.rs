//! What a finished run leaves for the console to page through: its log, line
//! by line, and its row errors with their origin values (kept at every level).

use crate::engine::{LogLevel, RunReport};
use crate::store::history::{RowErrorTotals, RunDetails, StoredLogLine, StoredRowError};

/// The log lines (at the run's requested level) and row errors of a report.
pub fn details_of(report: &RunReport) -> RunDetails {
    let mut details = RunDetails::default();
    for job in &report.jobs {
        details.log.extend(
            job.log
                .iter()
                .filter(|e| e.level != LogLevel::None)
                .map(|e| StoredLogLine {
                    seq: 0,
                    time: crate::value::datetime_text(&e.time),
                    level: e.level as u8,
                    job: e.job_id.0.clone(),
                    row: e.row,
                    message: e.message.clone(),
                }),
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
