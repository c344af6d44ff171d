//! File drops: a file origin that names a folder and a pattern. Each run
//! takes the files not processed before (by name, size and modification
//! time, kept through [`KeptState`]), in name order, at most `max_files`;
//! a file modified within the settle time is still being written and waits.
//! The files are read one after another as one origin; a file is recorded
//! as processed (then moved or deleted) only once every row read from it
//! went through a committed batch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::incremental::HighWater;
use super::{JobError, RowState, RunLog};
use crate::connector::{
    ConnectionConfig, ConnectorError, Flow, Origin, OriginRequest, RowRead, resolve_path,
};
use crate::engine::LogLevel;
use crate::engine::state::{FileMark, KeptState, StateError};
use crate::project::incremental::{AfterFile, FileDrop, matches};
use crate::project::{Job, Project};
use crate::run::{FileReport, FileStatus};
use crate::value::Value;

/// Waiting files a report lists at most (the rest are counted).
const WAITING_LISTED: usize = 100;

/// A file the run takes or leaves waiting.
struct DropFile {
    path: PathBuf,
    mark: FileMark,
}

/// How far the run got with each file it takes.
#[derive(Default)]
struct Progress {
    /// (rows read before the file, file index), in the order files were started.
    starts: Vec<(u64, usize)>,
    /// Rows read from each file.
    rows: Vec<u64>,
    /// Whether the file was read to its end.
    read_all: Vec<bool>,
    /// Rows of each file that went through a committed batch.
    landed: Vec<u64>,
    /// Why a file could not be read.
    failed: Vec<Option<String>>,
}

/// The files of one run of a file-drop job, and how far each got.
pub(super) struct DropRun {
    after: AfterFile,
    /// The files taken, in name order.
    files: Vec<DropFile>,
    /// Files still being written.
    waiting: Vec<DropFile>,
    /// Files already processed, and files past `max_files`.
    not_listed: u64,
    progress: Mutex<Progress>,
}

impl DropRun {
    /// Lists the drop folder: the files matching the pattern that are not in
    /// `processed` with the same size and time; those modified within the
    /// settle time wait.
    fn list(
        project: &Project,
        spec: &FileDrop,
        processed: &HashMap<String, FileMark>,
    ) -> Result<DropRun, JobError> {
        let folder = resolve_path(&project.dir, &spec.folder);
        let entries = std::fs::read_dir(&folder).map_err(|e| {
            JobError::Load(format!(
                "the drop folder {} cannot be listed: {e}",
                folder.display()
            ))
        })?;
        let now = SystemTime::now();
        let (mut ready, mut waiting, mut already) = (Vec::new(), Vec::new(), 0u64);
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !matches(&spec.pattern, &name) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified().unwrap_or(now);
            let mark = FileMark {
                name,
                size: meta.len(),
                modified_ns: modified
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as i64)
                    .unwrap_or(0),
            };
            if processed.get(&mark.name) == Some(&mark) {
                already += 1;
                continue;
            }
            let file = DropFile {
                path: entry.path(),
                mark,
            };
            // A clock step back makes the age an error: the file waits.
            let settled = now
                .duration_since(modified)
                .is_ok_and(|age| age >= spec.settle);
            if settled {
                ready.push(file);
            } else {
                waiting.push(file);
            }
        }
        ready.sort_by(|a, b| a.mark.name.cmp(&b.mark.name));
        waiting.sort_by(|a, b| a.mark.name.cmp(&b.mark.name));
        let past_max = ready.len().saturating_sub(spec.max_files);
        ready.truncate(spec.max_files);
        let past_listed = waiting.len().saturating_sub(WAITING_LISTED);
        waiting.truncate(WAITING_LISTED);
        let n = ready.len();
        Ok(DropRun {
            after: spec.after.clone(),
            files: ready,
            waiting,
            not_listed: already + past_max as u64 + past_listed as u64,
            progress: Mutex::new(Progress {
                rows: vec![0; n],
                read_all: vec![false; n],
                landed: vec![0; n],
                failed: vec![None; n],
                starts: Vec::new(),
            }),
        })
    }

    /// Counts the rows of a batch that went through (committed, or row errors).
    pub(super) fn landed(&self, rows: &[RowState]) {
        let mut p = self.progress.lock().expect("drop progress lock");
        for r in rows.iter().filter(|r| r.processed) {
            let at = p.starts.partition_point(|(before, _)| *before < r.number);
            if let Some(&(_, file)) = at.checked_sub(1).and_then(|i| p.starts.get(i)) {
                p.landed[file] += 1;
            }
        }
    }

    /// Records the files all of whose rows landed (unless `preview`, or the
    /// writers did not finish), moves or deletes them, and reports each file.
    pub(super) fn settle(
        &self,
        project: &Project,
        job: &Job,
        state: Option<&Arc<dyn KeptState>>,
        (preview, writers_ok): (bool, bool),
        log: &mut RunLog<'_>,
    ) -> (Vec<FileReport>, u64, Option<StateError>) {
        let p = self.progress.lock().expect("drop progress lock");
        let mut reports: Vec<FileReport> = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let done = p.read_all[i] && p.landed[i] == p.rows[i] && writers_ok;
                FileReport {
                    name: f.mark.name.clone(),
                    rows: p.rows[i],
                    status: match (&p.failed[i], done, preview) {
                        (Some(_), _, _) => FileStatus::Failed,
                        (None, true, true) => FileStatus::Previewed,
                        (None, true, false) => FileStatus::Processed,
                        (None, false, _) => FileStatus::Incomplete,
                    },
                    moved_to: None,
                    error: p.failed[i].clone(),
                }
            })
            .collect();
        drop(p);
        let done: Vec<FileMark> = self
            .files
            .iter()
            .zip(&reports)
            .filter(|(_, r)| r.status == FileStatus::Processed)
            .map(|(f, _)| f.mark.clone())
            .collect();
        let mut fenced = None;
        if !done.is_empty()
            && let Some(st) = state
            && let Err(e) = st.files_processed(&project.id.0, &job.id.0, &done)
        {
            // Not recorded: the files stay where they are, for the next run.
            for r in reports
                .iter_mut()
                .filter(|r| r.status == FileStatus::Processed)
            {
                r.status = FileStatus::Incomplete;
                r.error = Some(format!("cannot be recorded as processed: {e}"));
            }
            fenced = matches!(e, StateError::Fenced).then_some(e);
        }
        for (f, r) in self.files.iter().zip(reports.iter_mut()) {
            if r.status == FileStatus::Processed {
                self.after_file(project, f, r);
            }
        }
        reports.extend(self.waiting.iter().map(|f| FileReport {
            name: f.mark.name.clone(),
            rows: 0,
            status: FileStatus::Waiting,
            moved_to: None,
            error: None,
        }));
        for r in &reports {
            log.push(LogLevel::Low, None, file_line(r));
        }
        if self.not_listed > 0 {
            log.push(
                LogLevel::Medium,
                None,
                format!(
                    "file drop: {} more matching files were already processed or wait for a later run",
                    self.not_listed
                ),
            );
        }
        (reports, self.not_listed, fenced)
    }

    /// Moves or deletes a processed file; a failure is the file's error.
    fn after_file(&self, project: &Project, f: &DropFile, r: &mut FileReport) {
        match &self.after {
            AfterFile::Keep => {}
            AfterFile::Delete => {
                if let Err(e) = std::fs::remove_file(&f.path) {
                    r.error = Some(format!("cannot delete it: {e}"));
                }
            }
            AfterFile::MoveTo(dir) => match move_into(&f.path, &resolve_path(&project.dir, dir)) {
                Ok(to) => r.moved_to = Some(to.display().to_string()),
                Err(e) => r.error = Some(format!("cannot move it: {e}")),
            },
        }
    }
}

/// A file's line in the job's log.
fn file_line(r: &FileReport) -> String {
    let mut line = format!("file {}: {} rows, {:?}", r.name, r.rows, r.status);
    if let Some(to) = &r.moved_to {
        line.push_str(&format!(", moved to {to}"));
    }
    if let Some(e) = &r.error {
        line.push_str(&format!(": {e}"));
    }
    line
}

/// Moves `file` into `dir` (created if missing). A name already taken there
/// gets a number (`a.csv` → `a-1.csv`); a move across file systems copies.
fn move_into(file: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = file.file_name().unwrap_or_default();
    let mut to = dir.join(name);
    let stem = file
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let ext = file
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let mut n = 0;
    while to.exists() {
        n += 1;
        if n > 10_000 {
            return Err(std::io::Error::other(format!(
                "{} and 10000 numbered names are taken",
                dir.join(name).display()
            )));
        }
        to = dir.join(format!("{stem}-{n}{ext}"));
    }
    if std::fs::rename(file, &to).is_err() {
        std::fs::copy(file, &to)?;
        std::fs::remove_file(file)?;
    }
    Ok(to)
}

/// The files of a drop read one after another as one origin. Every file
/// must have the first one's fields; a file that cannot be read is reported
/// and the rest are read, then the read fails naming it.
struct DropOrigin {
    run: Arc<DropRun>,
    conn: ConnectionConfig,
    base_dir: PathBuf,
    variables: std::collections::BTreeMap<String, Value>,
    fields: Vec<String>,
    preview: bool,
    columns: Vec<String>,
    /// The first file, opened to learn the fields, and its index.
    first: Option<(usize, Box<dyn Origin>)>,
    mark: Option<Arc<HighWater>>,
}

impl DropOrigin {
    fn open_file(&self, i: usize) -> Result<Box<dyn Origin>, ConnectorError> {
        self.conn.connector().open_origin(&OriginRequest {
            base_dir: &self.base_dir,
            query: None,
            path: Some(&self.run.files[i].path),
            variables: &self.variables,
            fields: &self.fields,
            preview: self.preview,
        })
    }

    fn fail(&self, i: usize, why: String) {
        self.run.progress.lock().expect("drop progress lock").failed[i] = Some(why);
    }
}

impl Origin for DropOrigin {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn read(&mut self, sink: &mut dyn FnMut(RowRead) -> Flow) -> Result<(), ConnectorError> {
        let mut seen: u64 = 0;
        for i in 0..self.run.files.len() {
            let origin = match self.first.take() {
                Some((at, o)) if at == i => Ok(o),
                Some(_) | None => self.open_file(i),
            };
            let mut origin = match origin {
                Ok(o) => o,
                Err(e) => {
                    self.fail(i, e.to_string());
                    continue;
                }
            };
            if origin.columns() != self.columns.as_slice() {
                let why = format!(
                    "its fields ({}) are not the first file's ({})",
                    origin.columns().join(", "),
                    self.columns.join(", ")
                );
                self.fail(i, why);
                continue;
            }
            self.run
                .progress
                .lock()
                .expect("drop progress lock")
                .starts
                .push((seen, i));
            let (mut rows, mut stopped) = (0u64, false);
            let mark = self.mark.clone();
            let res = origin.read(&mut |r| {
                if mark.as_ref().is_some_and(|m| m.drops(&r)) {
                    return Flow::Continue;
                }
                seen += 1;
                rows += 1;
                let flow = sink(r);
                stopped = flow == Flow::Stop;
                flow
            });
            let mut p = self.run.progress.lock().expect("drop progress lock");
            p.rows[i] = rows;
            match res {
                Err(e) => p.failed[i] = Some(e.to_string()),
                Ok(()) => p.read_all[i] = !stopped,
            }
            if stopped {
                break;
            }
        }
        let p = self.run.progress.lock().expect("drop progress lock");
        let failed: Vec<String> = self
            .run
            .files
            .iter()
            .zip(&p.failed)
            .filter_map(|(f, e)| e.as_ref().map(|e| format!("{}: {e}", f.mark.name)))
            .collect();
        match failed.first() {
            None => Ok(()),
            Some(first) => Err(ConnectorError::failed(format!(
                "{} dropped file(s) could not be read; {first}",
                failed.len()
            ))),
        }
    }
}

/// Opens a file-drop origin: lists the folder (against the files the job
/// processed, from `state`; `None`: as if none were) and opens the first
/// file to learn the fields (none: the fields the job reads).
pub(super) fn open(
    project: &Project,
    job: &Job,
    conn: &ConnectionConfig,
    (variables, preview): (&std::collections::BTreeMap<String, Value>, bool),
    state: Option<&Arc<dyn KeptState>>,
    mark: Option<&Arc<HighWater>>,
) -> Result<(Arc<DropRun>, Box<dyn Origin>), JobError> {
    let spec = job
        .origin
        .file_drop
        .as_ref()
        .ok_or_else(|| JobError::Load("the origin is not a file drop".into()))?;
    let processed: HashMap<String, FileMark> = match state {
        Some(st) => st
            .processed_files(&project.id.0, &job.id.0)
            .map_err(|e| JobError::Load(format!("the processed files cannot be read: {e}")))?
            .into_iter()
            .map(|m| (m.name.clone(), m))
            .collect(),
        None => HashMap::new(),
    };
    let run = Arc::new(DropRun::list(project, spec, &processed)?);
    let mut origin = DropOrigin {
        run: Arc::clone(&run),
        conn: conn.clone(),
        base_dir: project.dir.clone(),
        variables: variables.clone(),
        fields: super::mapping::origin_fields(job),
        preview,
        columns: Vec::new(),
        first: None,
        mark: mark.cloned(),
    };
    for i in 0..run.files.len() {
        match origin.open_file(i) {
            Ok(o) => {
                origin.columns = o.columns().to_vec();
                origin.first = Some((i, o));
                break;
            }
            Err(e) => origin.fail(i, e.to_string()),
        }
    }
    if origin.first.is_none() {
        origin.columns = origin.fields.clone();
    }
    Ok((run, Box::new(origin)))
}

/// Opens a file-drop origin as a check of the job's connections does: as if
/// no file had been processed, nothing recorded.
pub(super) fn open_for_check<'p>(
    project: &'p Project,
    job: &Job,
    variables: &std::collections::BTreeMap<String, Value>,
) -> Result<(&'p ConnectionConfig, Box<dyn Origin>), JobError> {
    let name = &job.origin.connection;
    let conn = project
        .connections
        .get(name)
        .ok_or_else(|| JobError::UnknownConnection(name.clone()))?;
    let (_, origin) = open(project, job, conn, (variables, true), None, None)?;
    Ok((conn, origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_into_a_folder_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let done = dir.path().join("done");
        for round in 0..3 {
            let f = dir.path().join("a.csv");
            std::fs::write(&f, format!("round {round}")).unwrap();
            let to = move_into(&f, &done).unwrap();
            assert!(!f.exists());
            assert_eq!(
                std::fs::read_to_string(&to).unwrap(),
                format!("round {round}")
            );
        }
        let mut names: Vec<String> = std::fs::read_dir(&done)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a-1.csv", "a-2.csv", "a.csv"]);
    }
}
