//! How far a job got, for a retry or a rerun from the failure: the first
//! origin row not committed (a contiguous low-water mark over batches that
//! commit out of order), and whether a failure means "unreachable".

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use super::{JobError, RowState, Shared};
use crate::connector::{Cause, ConnectorError};
use crate::engine::RunRequest;
use crate::project::Job;

/// The first origin row not committed. Batches commit out of order with
/// several writers: a range that commits past a gap waits until the gap
/// closes; a gap that never closes (a batch that did not commit) holds the
/// mark there for good.
pub(super) struct CommitMark {
    /// The first row not committed, and the committed ranges past it
    /// (first row → one past the last).
    state: Mutex<(u64, BTreeMap<u64, u64>)>,
}

impl CommitMark {
    /// A mark for a job that begins at row `first`.
    pub(super) fn new(first: u64) -> Self {
        CommitMark {
            state: Mutex::new((first, BTreeMap::new())),
        }
    }

    /// Rows `first` up to (not including) `end` are committed.
    pub(super) fn committed(&self, first: u64, end: u64) {
        if end <= first {
            return;
        }
        let mut st = self.state.lock().expect("commit mark lock");
        let (next, ranges) = &mut *st;
        ranges.insert(first, end);
        while let Some(end) = ranges.remove(next) {
            *next = end;
        }
    }

    /// The first row not committed.
    pub(super) fn next(&self) -> u64 {
        self.state.lock().expect("commit mark lock").0
    }
}

/// The origin row a job begins at: the run's resume row for its first job,
/// else the request's `beginAtRow`.
pub(super) fn first_row(job: &Job, req: &RunRequest) -> u64 {
    match req.resume_at_row {
        Some(r) if job.id == req.job => r.max(req.begin_at_row),
        _ => req.begin_at_row,
    }
}

impl Shared<'_> {
    /// Records the rows of a batch that are done: the leading rows processed
    /// (written and committed, or counted as row errors); with halt on
    /// error, a row that failed is not done (a rerun starts at it).
    pub(super) fn mark_done(&self, rows: &[RowState]) {
        let Some(first) = rows.first().map(|r| r.number) else {
            return;
        };
        let halt = self.job.halt_on_error;
        let done = rows
            .iter()
            .take_while(|r| r.processed && !(halt && r.error.is_some()))
            .count() as u64;
        self.mark.committed(first, first + done);
    }

    /// Fails the job because a connection is unreachable (the first reason wins).
    pub(super) fn fail_unreachable(&self, why: String) {
        if self.halted.lock().expect("halt lock").is_none() {
            self.unreachable.store(true, Ordering::SeqCst);
        }
        self.fail_job(why);
    }
}

impl JobError {
    /// Whether the job failed because a connection could not be reached.
    pub(super) fn is_unreachable(&self) -> bool {
        match self {
            JobError::Origin { source, .. }
            | JobError::Writer { source, .. }
            | JobError::Destination { source, .. } => is_unreachable(source),
            _ => false,
        }
    }
}

/// Whether `e` means the other side could not be reached (refused, timed
/// out, lost, not answering), not that it refused what was asked.
pub(crate) fn is_unreachable(e: &ConnectorError) -> bool {
    match e {
        ConnectorError::Lost(_) | ConnectorError::Unavailable(_) => true,
        ConnectorError::Open { cause, .. } => cause.as_ref().is_some_and(cause_unreachable),
        _ => false,
    }
}

fn cause_unreachable(c: &Cause) -> bool {
    use std::io::ErrorKind as K;
    match c {
        Cause::Io(e) => matches!(
            e.kind(),
            K::ConnectionRefused
                | K::ConnectionReset
                | K::ConnectionAborted
                | K::NotConnected
                | K::TimedOut
                | K::BrokenPipe
                | K::UnexpectedEof
                | K::HostUnreachable
                | K::NetworkUnreachable
        ),
        Cause::Postgres(e) => {
            e.is_closed()
                || e.code().is_some_and(|c| {
                    let c = c.code();
                    c.starts_with("08") || c.starts_with("57P") || c == "53300"
                })
                || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        }
        Cause::Mysql(e) => match e.as_ref() {
            ::mysql::Error::IoError(_) => true,
            ::mysql::Error::DriverError(d) => matches!(
                d,
                ::mysql::DriverError::CouldNotConnect(_) | ::mysql::DriverError::ConnectTimeout
            ),
            // Too many connections, server shutting down.
            ::mysql::Error::MySqlError(m) => matches!(m.code, 1040 | 1053),
            _ => false,
        },
        Cause::Sqlite(e) => matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        ),
        Cause::Http(e) => e.is_connect() || e.is_timeout(),
        Cause::Csv(_) | Cause::Json(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_waits_for_gaps_and_stops_at_one_that_never_closes() {
        let m = CommitMark::new(1);
        m.committed(11, 21);
        assert_eq!(m.next(), 1, "rows 1-10 are not committed yet");
        m.committed(1, 11);
        assert_eq!(m.next(), 21);
        m.committed(31, 41);
        m.committed(21, 25); // a batch that committed only its first 4 rows
        assert_eq!(m.next(), 25);
        m.committed(41, 51);
        assert_eq!(m.next(), 25, "row 25 never commits: the mark stays");
        m.committed(7, 7);
        assert_eq!(m.next(), 25);
    }

    #[test]
    fn a_refused_connection_is_unreachable_a_schema_error_is_not() {
        let refused = ConnectorError::Open {
            what: "db".into(),
            reason: "refused".into(),
            cause: Some(Cause::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            ))),
        };
        assert!(is_unreachable(&refused));
        let missing = ConnectorError::Open {
            what: "file".into(),
            reason: "missing".into(),
            cause: Some(Cause::Io(std::io::Error::from(
                std::io::ErrorKind::NotFound,
            ))),
        };
        assert!(!is_unreachable(&missing));
        assert!(!is_unreachable(&ConnectorError::schema("no column x")));
        assert!(is_unreachable(&ConnectorError::Unavailable("503".into())));
    }
}
