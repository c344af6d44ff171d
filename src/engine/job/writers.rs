//! Opening the writers: one set of connections per writer thread, and the
//! error file they share.

use std::fs::File;
use std::sync::Mutex;

use super::{JobError, RunLog, Writer};
use crate::connector::{ConnectionConfig, Destination, DestinationRequest, StagePlan};
use crate::engine::mapping::{self, Target};
use crate::engine::{LogLevel, RunRequest};
use crate::project::{Job, Project};

/// The error file's CSV writer, shared by the writer threads.
pub(super) type ErrorFile = Mutex<::csv::Writer<File>>;

/// What one writer opens: the connection and the stages it writes, by target.
struct Targets<'a> {
    dest_conn: Option<&'a ConnectionConfig>,
    dest_plans: Vec<StagePlan>,
    dest_name: String,
    back_conn: &'a ConnectionConfig,
    back_plans: Vec<StagePlan>,
    back_name: String,
}

/// Opens one writer per thread (fewer when a destination takes fewer); the
/// first one's notes go to the log. On an error, those opened are finished.
pub(super) fn open_writers(
    project: &Project,
    job: &Job,
    req: &RunRequest,
    origin_conn: &ConnectionConfig,
    log: &mut RunLog<'_>,
) -> Result<Vec<Writer>, JobError> {
    let t = Targets {
        dest_conn: job
            .destination
            .as_ref()
            .and_then(|d| project.connections.get(d)),
        dest_plans: mapping::plans(&job.stages, Target::Destination),
        dest_name: format!(
            "destination {:?}",
            job.destination.clone().unwrap_or_default()
        ),
        back_conn: origin_conn,
        back_plans: mapping::plans(&job.stages, Target::Origin),
        back_name: format!("origin {:?} (write-back)", job.origin.connection),
    };
    let threads = writer_count(&t, req, log);
    let mut writers = Vec::with_capacity(threads);
    for _ in 0..threads {
        match open_writer(project, req, &t) {
            Ok(w) => {
                if writers.is_empty() {
                    let (dest, back) = (w.dest.as_deref(), w.back.as_deref());
                    for (d, name) in [(dest, &t.dest_name), (back, &t.back_name)] {
                        for note in d.map(|d| d.notes()).unwrap_or_default() {
                            log.push(LogLevel::Low, None, format!("{name}: {note}"));
                        }
                    }
                }
                writers.push(w)
            }
            Err(e) => {
                finish_all(writers);
                return Err(e);
            }
        }
    }
    Ok(writers)
}

/// Finishes writers the job will not use.
pub(super) fn finish_all(writers: Vec<Writer>) {
    for w in writers {
        let _ = w.finish();
    }
}

/// The run's threadCount (one in a preview), capped by what each target takes.
fn writer_count(t: &Targets, req: &RunRequest, log: &mut RunLog<'_>) -> usize {
    let mut threads = if req.preview {
        1
    } else {
        req.thread_count.max(1)
    };
    for (conn, plans) in [
        (t.dest_conn, &t.dest_plans),
        (Some(t.back_conn), &t.back_plans),
    ] {
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
    threads
}

/// One writer thread's connections: the destination, then the origin's write-back.
fn open_writer(project: &Project, req: &RunRequest, t: &Targets) -> Result<Writer, JobError> {
    let dest = open_target(project, req, t.dest_conn, &t.dest_plans, &t.dest_name)?;
    Ok(Writer {
        dest,
        back: open_target(project, req, Some(t.back_conn), &t.back_plans, &t.back_name)?,
    })
}

/// A connection for the stages in `plans` (none when there are none).
fn open_target(
    project: &Project,
    req: &RunRequest,
    conn: Option<&ConnectionConfig>,
    plans: &[StagePlan],
    name: &str,
) -> Result<Option<Box<dyn Destination>>, JobError> {
    if plans.is_empty() {
        return Ok(None);
    }
    let c = conn.ok_or_else(|| JobError::NoConnection(name.to_owned()))?;
    c.connector()
        .open_destination(&DestinationRequest {
            base_dir: &project.dir,
            stages: plans,
            preview: req.preview,
        })
        .map(Some)
        .map_err(|source| JobError::Writer {
            name: name.to_owned(),
            source,
        })
}

/// Creates the job's error file with its header (none in a preview).
pub(super) fn open_error_file(
    job: &Job,
    req: &RunRequest,
    columns: &[String],
) -> Result<Option<ErrorFile>, JobError> {
    let Some(path) = job.error_file.as_ref().filter(|_| !req.preview) else {
        return Ok(None);
    };
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
            Ok(Some(Mutex::new(w)))
        }
        Err(source) => Err(JobError::ErrorFile {
            path: path.clone(),
            source,
        }),
    }
}
