//! Reading project folders: TOML with spans, `${ENV}` interpolation, static checks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::graph::{self, EdgeLines};
use super::{
    BuiltinFunction, Field, FieldSource, Job, JobId, Moment, Operation, OriginSpec, Problem,
    Project, ProjectId, ScriptLimits, Stage, StageAction, Transform,
};
use crate::connector::{ConnectionConfig, OriginInput};
use crate::template::{Template, Token};
use crate::value::{FieldType, Value};

/// Settings that loading needs from outside the project files.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// What `${DATA_DIR}` stands for: where runs keep their files.
    pub data_dir: PathBuf,
}

/// What [`load_projects`] found: the projects that loaded and every problem.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    /// Projects without problems, sorted by ID.
    pub projects: Vec<Project>,
    /// Problems of the projects that did not load (and of the folder itself).
    pub problems: Vec<Problem>,
}

impl LoadOutcome {
    /// The project with this ID in `instance` (case-insensitive, as Starfish matches IDs).
    pub fn project_in(&self, instance: &str, id: &str) -> Option<&Project> {
        let mine = || self.projects.iter().filter(|p| p.instance == instance);
        mine()
            .find(|p| p.id.0 == id)
            .or_else(|| mine().find(|p| p.id.0.eq_ignore_ascii_case(id)))
    }

    /// The project with this ID in any instance (case-insensitive, as Starfish matches IDs).
    pub fn project(&self, id: &str) -> Option<&Project> {
        self.projects.iter().find(|p| p.id.0 == id).or_else(|| {
            self.projects
                .iter()
                .find(|p| p.id.0.eq_ignore_ascii_case(id))
        })
    }
}

/// The instance of a project that names none.
pub const DEFAULT_INSTANCE: &str = "default";

/// The most rows a destination transaction may hold.
const MAX_BATCH: usize = 100_000;
/// The longest ID the API accepts.
const MAX_ID: usize = 36;

/// Loads every project below `dir` (each a folder with a `project.toml`).
///
/// A project with problems is left out and its problems reported; the others load.
pub fn load_projects(dir: &Path, opts: &LoadOptions) -> LoadOutcome {
    let mut out = LoadOutcome::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            out.problems.push(Problem::new(
                dir,
                None,
                format!("cannot read the projects folder: {e}"),
            ));
            return out;
        }
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("project.toml").is_file())
        .collect();
    dirs.sort();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for d in dirs {
        match load_project(&d, opts) {
            Ok(p) => {
                let key = format!("{}/{}", p.instance, p.id.0.to_ascii_lowercase());
                if let Some(first) = seen.get(&key) {
                    out.problems.push(Problem::new(
                        &d.join("project.toml"),
                        None,
                        format!(
                            "project id {:?} is already used by {}",
                            p.id.0,
                            first.display()
                        ),
                    ));
                } else {
                    seen.insert(key, d.clone());
                    out.projects.push(p);
                }
            }
            Err(problems) => out.problems.extend(problems),
        }
    }
    out.projects.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProject {
    id: Option<Spanned<String>>,
    instance: Option<Spanned<String>>,
    name: Option<String>,
    #[serde(default)]
    variables: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    connections: BTreeMap<String, Spanned<toml::Value>>,
    /// Any TOML value, so that 0, a negative or a non-integer gets the key's own message.
    max_parallel_jobs: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    id: Option<Spanned<String>>,
    name: Option<String>,
    /// One job ID or a list (see [`graph::job_list`]).
    next: Option<Spanned<toml::Value>>,
    /// One job ID or a list.
    needs: Option<Spanned<toml::Value>>,
    #[serde(default)]
    halt_on_error: bool,
    error_file: Option<Spanned<String>>,
    batch_size: Option<Spanned<usize>>,
    #[serde(default = "default_retry_attempts")]
    retry_attempts: u32,
    #[serde(default = "default_retry_wait_ms")]
    retry_wait_ms: u64,
    origin: Spanned<RawOrigin>,
    destination: Option<RawDestination>,
    #[serde(default)]
    stages: Vec<Spanned<RawStage>>,
    #[serde(default)]
    operations: Vec<Spanned<RawOperation>>,
    script_time_limit_ms: Option<Spanned<u64>>,
    script_memory_limit_mb: Option<Spanned<usize>>,
    /// Any TOML value, so that 0, a negative or a non-integer gets the key's own message.
    max_concurrent_runs: Option<Spanned<toml::Value>>,
    #[serde(default)]
    rerun_on_node_loss: bool,
    #[serde(default)]
    schedules: Vec<Spanned<super::schedule::RawSchedule>>,
    retry: Option<Spanned<super::retry::RawRetry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperation {
    when: Moment,
    /// A stage's name or 1-based number (before_stage/after_stage only).
    stage: Option<toml::Value>,
    script: String,
}

fn default_retry_attempts() -> u32 {
    3
}

fn default_retry_wait_ms() -> u64 {
    1000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrigin {
    connection: Spanned<String>,
    query: Option<String>,
    path: Option<String>,
    incremental: Option<super::incremental::RawIncremental>,
    after: Option<toml::Value>,
    settle_secs: Option<toml::Value>,
    max_files: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    connection: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: Option<String>,
    table: Option<String>,
    action: StageAction,
    #[serde(default)]
    omit_blank: bool,
    #[serde(default)]
    update_on_difference: bool,
    #[serde(default)]
    use_origin: bool,
    #[serde(default)]
    fields: Vec<Spanned<RawField>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    column: String,
    origin: Option<String>,
    value: Option<toml::Value>,
    template: Option<String>,
    function: Option<BuiltinFunction>,
    script: Option<String>,
    #[serde(default, rename = "match")]
    is_match: bool,
    #[serde(default)]
    insert_only: bool,
    #[serde(default)]
    update_only: bool,
    #[serde(default)]
    transform: OneOrMany<Transform>,
    #[serde(rename = "type")]
    ty: Option<FieldType>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A source file's text, for turning byte offsets into line numbers.
struct SourceFile<'a> {
    path: &'a Path,
    text: &'a str,
}

impl SourceFile<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn problem<T>(&self, at: &Spanned<T>, message: impl Into<String>) -> Problem {
        Problem::new(self.path, Some(self.line(at.span().start)), message)
    }

    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, Problem> {
        toml::from_str(self.text).map_err(|e| {
            let line = e.span().map(|s| self.line(s.start));
            Problem::new(self.path, line, e.message().trim().to_owned())
        })
    }
}

/// Why a `${NAME}` reference cannot be replaced.
#[derive(Debug, thiserror::Error)]
enum InterpolateError {
    /// A `${` without its `}`.
    #[error("unterminated ${{…}} in {text:?}")]
    Unterminated { text: String },
    /// The environment does not set the variable.
    #[error(
        "environment variable {name} is not set (used as ${{{name}}}); set it or remove the reference"
    )]
    Unset {
        name: String,
        #[source]
        source: std::env::VarError,
    },
}

/// Replaces `${NAME}` from the environment; `DATA_DIR` and `PROJECT_DIR` are built in.
fn interpolate(text: &str, builtins: &BTreeMap<&str, String>) -> Result<String, InterpolateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| InterpolateError::Unterminated {
                text: text.to_owned(),
            })?;
        let name = &after[..end];
        match builtins.get(name) {
            Some(v) => out.push_str(v),
            None => match std::env::var(name) {
                Ok(v) => out.push_str(&v),
                Err(source) => {
                    return Err(InterpolateError::Unset {
                        name: name.to_owned(),
                        source,
                    });
                }
            },
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn interpolate_value(
    v: &mut toml::Value,
    builtins: &BTreeMap<&str, String>,
) -> Result<(), InterpolateError> {
    match v {
        toml::Value::String(s) => *s = interpolate(s, builtins)?,
        toml::Value::Array(items) => {
            for i in items {
                interpolate_value(i, builtins)?;
            }
        }
        toml::Value::Table(t) => {
            for (_, i) in t.iter_mut() {
                interpolate_value(i, builtins)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Loads one project folder; on failure, every problem found.
pub fn load_project(dir: &Path, opts: &LoadOptions) -> Result<Project, Vec<Problem>> {
    let path = dir.join("project.toml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| vec![Problem::new(&path, None, format!("cannot read: {e}"))])?;
    let jobs_dir = dir.join("jobs");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&jobs_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    let job_files = files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f);
            (f, text)
        })
        .collect();
    load_project_files(dir, &text, job_files, opts)
}

/// Loads a project from its files' text, as [`load_project`] does from the
/// folder `dir` (which is only named, never read): `project.toml`'s text and
/// each job file's path and text, in load order.
pub fn load_project_text(
    dir: &Path,
    project_toml: &str,
    jobs: Vec<(PathBuf, String)>,
    opts: &LoadOptions,
) -> Result<Project, Vec<Problem>> {
    let jobs = jobs.into_iter().map(|(f, t)| (f, Ok(t))).collect();
    load_project_files(dir, project_toml, jobs, opts)
}

/// A job file's path and its text, or why it could not be read.
type JobFile = (PathBuf, std::io::Result<String>);

fn load_project_files(
    dir: &Path,
    text: &str,
    job_files: Vec<JobFile>,
    opts: &LoadOptions,
) -> Result<Project, Vec<Problem>> {
    let path = dir.join("project.toml");
    let src = SourceFile { path: &path, text };
    let raw: RawProject = src.parse().map_err(|p| vec![p])?;
    let mut problems = Vec::new();

    let folder_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = match &raw.id {
        Some(id) => {
            check_id(&src, id, "project", &mut problems);
            id.get_ref().clone()
        }
        None => folder_name.clone(),
    };
    let builtins: BTreeMap<&str, String> = [
        ("DATA_DIR", opts.data_dir.display().to_string()),
        ("PROJECT_DIR", dir.display().to_string()),
    ]
    .into_iter()
    .collect();

    if let Some(i) = &raw.instance {
        check_id(&src, i, "instance", &mut problems);
    }
    let variables = project_variables(&src, &raw.variables, &builtins, &mut problems);
    let (connections, broken) =
        project_connections(&src, raw.connections, &builtins, &mut problems);
    let max_parallel_jobs = max_parallel_jobs(&src, raw.max_parallel_jobs.as_ref(), &mut problems);
    let jobs = load_jobs(
        dir,
        job_files,
        &connections,
        &broken,
        &builtins,
        &mut problems,
    );

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Project {
        id: ProjectId(id),
        instance: raw
            .instance
            .map(|i| i.into_inner())
            .unwrap_or_else(|| DEFAULT_INSTANCE.to_owned()),
        name: raw.name.unwrap_or(folder_name),
        dir: dir.to_owned(),
        data_dir: opts.data_dir.clone(),
        variables,
        connections,
        jobs,
        max_parallel_jobs,
    })
}

/// How many jobs of a chained run may run at once: 1 to [`graph::MAX_PARALLEL_JOBS`].
fn max_parallel_jobs(
    src: &SourceFile,
    given: Option<&Spanned<toml::Value>>,
    problems: &mut Vec<Problem>,
) -> usize {
    let Some(v) = given else {
        return graph::DEFAULT_MAX_PARALLEL_JOBS;
    };
    match v.get_ref() {
        toml::Value::Integer(n) if (1..=graph::MAX_PARALLEL_JOBS as i64).contains(n) => *n as usize,
        _ => {
            problems.push(src.problem(
                v,
                format!(
                    "max_parallel_jobs must be a whole number from 1 to {}",
                    graph::MAX_PARALLEL_JOBS
                ),
            ));
            graph::DEFAULT_MAX_PARALLEL_JOBS
        }
    }
}

/// The project's `[variables]`, interpolated.
fn project_variables(
    src: &SourceFile,
    raw: &BTreeMap<String, Spanned<String>>,
    builtins: &BTreeMap<&str, String>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, String> {
    let mut variables = BTreeMap::new();
    for (name, value) in raw {
        match interpolate(value.get_ref(), builtins) {
            Ok(v) => {
                variables.insert(name.clone(), v);
            }
            Err(e) => problems.push(src.problem(value, format!("variable {name}: {e}"))),
        }
    }
    variables
}

/// The project's `[connections]`, interpolated and parsed; and the names of
/// those that did not parse (their problems are reported here, not where a
/// job names them).
fn project_connections(
    src: &SourceFile,
    raw: BTreeMap<String, Spanned<toml::Value>>,
    builtins: &BTreeMap<&str, String>,
    problems: &mut Vec<Problem>,
) -> (BTreeMap<String, ConnectionConfig>, BTreeSet<String>) {
    let mut connections = BTreeMap::new();
    let mut broken = BTreeSet::new();
    for (name, spanned) in raw {
        let mut value = spanned.get_ref().clone();
        if let Err(e) = interpolate_value(&mut value, builtins) {
            problems.push(src.problem(&spanned, format!("connection {name:?}: {e}")));
            broken.insert(name);
            continue;
        }
        match value.try_into::<ConnectionConfig>() {
            Ok(c) => {
                connections.insert(name, c);
            }
            Err(e) => {
                problems.push(src.problem(
                    &spanned,
                    format!("connection {name:?}: {}", e.message().trim()),
                ));
                broken.insert(name);
            }
        }
    }
    (connections, broken)
}

/// The project's jobs, each ID once, with their graph checked.
fn load_jobs(
    dir: &Path,
    job_files: Vec<JobFile>,
    connections: &BTreeMap<String, ConnectionConfig>,
    broken: &BTreeSet<String>,
    builtins: &BTreeMap<&str, String>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<JobId, Job> {
    let mut jobs = BTreeMap::new();
    let mut job_lines: BTreeMap<JobId, EdgeLines> = BTreeMap::new();
    for (file, text) in job_files {
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                problems.push(Problem::new(&file, None, format!("cannot read: {e}")));
                continue;
            }
        };
        match load_job(&file, text, connections, broken, builtins, dir) {
            Ok((job, lines)) => {
                if let Some(existing) = jobs.get(&job.id) {
                    let existing: &Job = existing;
                    problems.push(Problem::new(
                        &file,
                        None,
                        format!(
                            "job id {:?} is already used by {}",
                            job.id.0,
                            existing.file.display()
                        ),
                    ));
                    continue;
                }
                job_lines.insert(job.id.clone(), lines);
                jobs.insert(job.id.clone(), job);
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    graph::check(&jobs, &job_lines, problems);
    jobs
}

fn check_id(src: &SourceFile, id: &Spanned<String>, what: &str, problems: &mut Vec<Problem>) {
    let s = id.get_ref();
    if s.is_empty() || s.len() > MAX_ID {
        problems.push(src.problem(id, format!("{what} id must be 1 to {MAX_ID} characters")));
    } else if s.chars().any(|c| c.is_control() || c == '/' || c == '\\') {
        problems.push(src.problem(
            id,
            format!("{what} id {s:?} may not contain control characters or slashes"),
        ));
    }
}

/// A job, and where its file says `next` and `needs`.
type LoadedJob = (Job, EdgeLines);

/// What a job file is checked against, and the problems found in it so far.
struct JobCheck<'a> {
    src: SourceFile<'a>,
    connections: &'a BTreeMap<String, ConnectionConfig>,
    broken: &'a BTreeSet<String>,
    problems: Vec<Problem>,
}

/// The connections a job's stages write to: its destination's, and the
/// origin's (for `use_origin` stages).
struct Targets<'a> {
    origin_name: String,
    origin_conn: Option<&'a ConnectionConfig>,
    dest_name: Option<String>,
    dest_conn: Option<&'a ConnectionConfig>,
}

fn load_job(
    file: &Path,
    text: String,
    connections: &BTreeMap<String, ConnectionConfig>,
    broken: &BTreeSet<String>,
    builtins: &BTreeMap<&str, String>,
    project_dir: &Path,
) -> Result<LoadedJob, Vec<Problem>> {
    let src = SourceFile {
        path: file,
        text: &text,
    };
    let raw: RawJob = src.parse().map_err(|p| vec![p])?;
    let mut cx = JobCheck {
        src,
        connections,
        broken,
        problems: Vec::new(),
    };

    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = match &raw.id {
        Some(id) => {
            check_id(&cx.src, id, "job", &mut cx.problems);
            id.get_ref().clone()
        }
        None => stem,
    };
    let targets = Targets {
        origin_name: raw.origin.get_ref().connection.get_ref().clone(),
        origin_conn: cx.origin(&raw.origin),
        dest_name: raw
            .destination
            .as_ref()
            .map(|d| d.connection.get_ref().clone()),
        dest_conn: cx.destination(raw.destination.as_ref()),
    };
    if raw.stages.is_empty() {
        cx.problems.push(Problem::new(
            file,
            None,
            "the job has no stages: add at least one [[stages]] with fields",
        ));
    }
    let stages: Vec<Stage> = raw
        .stages
        .into_iter()
        .enumerate()
        .map(|(i, st)| cx.stage(i + 1, st, &targets))
        .collect();
    let operations = raw
        .operations
        .into_iter()
        .map(|op| cx.operation(op, &stages))
        .collect();
    let script_limits = cx.script_limits(&raw.script_time_limit_ms, &raw.script_memory_limit_mb);
    let error_file = cx.error_file(raw.error_file.as_ref(), builtins, project_dir);
    let batch_size = cx.batch_size(&raw.batch_size, targets.dest_conn);
    let max_concurrent_runs = cx.max_concurrent_runs(raw.max_concurrent_runs.as_ref());
    let (incremental, file_drop) = cx.incremental(&raw.origin, targets.origin_conn);
    let schedules = cx.schedules(raw.schedules);
    let retry = raw.retry.as_ref().and_then(|r| match r.get_ref().check() {
        Ok(p) => Some(p),
        Err(m) => {
            cx.problems.push(cx.src.problem(r, m));
            None
        }
    });
    let (next, next_line) = cx.job_refs("next", raw.next.as_ref());
    let (needs, needs_line) = cx.job_refs("needs", raw.needs.as_ref());

    if !cx.problems.is_empty() {
        return Err(cx.problems);
    }
    let origin = raw.origin.into_inner();
    let job = Job {
        id: JobId(id.clone()),
        name: raw.name.unwrap_or(id),
        file: file.to_owned(),
        origin: OriginSpec {
            connection: targets.origin_name,
            query: origin.query,
            path: origin.path.map(PathBuf::from),
            incremental,
            file_drop,
        },
        destination: targets.dest_name,
        stages,
        next,
        needs,
        halt_on_error: raw.halt_on_error,
        error_file,
        batch_size,
        retry_attempts: raw.retry_attempts,
        retry_wait: std::time::Duration::from_millis(raw.retry_wait_ms),
        operations,
        script_limits,
        max_concurrent_runs,
        rerun_on_node_loss: raw.rerun_on_node_loss,
        schedules,
        retry,
    };
    let lines = EdgeLines {
        file: file.to_owned(),
        next: next_line,
        needs: needs_line,
    };
    Ok((job, lines))
}

impl<'a> JobCheck<'a> {
    /// A problem at a line of the job file.
    fn at(&mut self, line: usize, message: String) {
        self.problems
            .push(Problem::new(self.src.path, Some(line), message));
    }

    /// Origin: the connection must exist and take what the origin gives (a
    /// query or not); the query must parse.
    fn origin(&mut self, raw: &Spanned<RawOrigin>) -> Option<&'a ConnectionConfig> {
        let o = raw.get_ref();
        let name = o.connection.get_ref();
        let conn = self.connections.get(name);
        match conn {
            None if self.broken.contains(name) => {} // reported with the connection
            None => self.problems.push(
                self.src
                    .problem(&o.connection, unknown_connection(name, self.connections)),
            ),
            Some(c) => {
                match c.capabilities().origin {
                    OriginInput::Query if o.query.is_none() => self.problems.push(self.src.problem(
                        raw,
                        format!(
                            "origin: connection {name:?} ({}) needs origin.query: the rows' SQL (for http: the request path)",
                            c.kind()
                        ),
                    )),
                    OriginInput::File if o.query.is_some() => self.problems.push(self.src.problem(
                        raw,
                        format!(
                            "origin: connection {name:?} is a {} file: it takes no query",
                            c.kind()
                        ),
                    )),
                    _ => {}
                }
                if let Some(q) = &o.query
                    && let Err(e) = Template::parse(q)
                {
                    self.problems
                        .push(self.src.problem(raw, format!("origin.query: {e}")));
                }
            }
        }
        conn
    }

    /// The origin's incremental and file-drop keys (see [`super::incremental`]).
    fn incremental(
        &mut self,
        raw: &Spanned<RawOrigin>,
        conn: Option<&ConnectionConfig>,
    ) -> (
        Option<super::incremental::Incremental>,
        Option<super::incremental::FileDrop>,
    ) {
        let o = raw.get_ref();
        let keys = super::incremental::RawKeys {
            incremental: o.incremental.as_ref(),
            after: o.after.as_ref(),
            settle_secs: o.settle_secs.as_ref(),
            max_files: o.max_files.as_ref(),
            path: o.path.as_deref(),
            query: o.query.as_deref(),
        };
        match super::incremental::check(&keys, conn) {
            Ok(found) => found,
            Err(messages) => {
                for m in messages {
                    self.problems.push(self.src.problem(raw, m));
                }
                (None, None)
            }
        }
    }

    /// Destination: the connection, if the job names one and it exists.
    fn destination(&mut self, raw: Option<&RawDestination>) -> Option<&'a ConnectionConfig> {
        let d = raw?;
        match self.connections.get(d.connection.get_ref()) {
            Some(c) => Some(c),
            None if self.broken.contains(d.connection.get_ref()) => None,
            None => {
                self.problems.push(self.src.problem(
                    &d.connection,
                    unknown_connection(d.connection.get_ref(), self.connections),
                ));
                None
            }
        }
    }

    /// Stage `n`: its target must take its action (and a table, if it needs
    /// one), its fields must map, and a matching action needs a match field.
    fn stage(&mut self, n: usize, st: Spanned<RawStage>, targets: &Targets) -> Stage {
        let line = self.src.line(st.span().start);
        let raw_stage = st.into_inner();
        self.check_target(n, line, &raw_stage, targets);
        if raw_stage.fields.is_empty() {
            self.at(line, format!("stage {n}: no fields"));
        }
        let mut fields = Vec::new();
        let mut columns = BTreeSet::new();
        for f in raw_stage.fields {
            if let Some(field) = self.field(n, &mut columns, f) {
                fields.push(field);
            }
        }
        if raw_stage.action.needs_match() && !fields.iter().any(|f| f.is_match) {
            self.at(
                line,
                format!(
                    "stage {n}: a {} stage needs at least one field with match = true",
                    raw_stage.action
                ),
            );
        }
        let name = raw_stage.name.unwrap_or_else(|| match &raw_stage.table {
            Some(t) => format!("{} {t}", raw_stage.action),
            None => raw_stage.action.to_string(),
        });
        Stage {
            name,
            table: raw_stage.table,
            action: raw_stage.action,
            omit_blank: raw_stage.omit_blank,
            update_on_difference: raw_stage.update_on_difference,
            use_origin: raw_stage.use_origin,
            fields,
        }
    }

    /// Whether stage `n`'s target connection takes its action and table.
    fn check_target(&mut self, n: usize, line: usize, raw_stage: &RawStage, targets: &Targets) {
        let (target_name, target) = if raw_stage.use_origin {
            (Some(&targets.origin_name), targets.origin_conn)
        } else {
            (targets.dest_name.as_ref(), targets.dest_conn)
        };
        match (target_name, target) {
            (None, _) => self.at(
                line,
                format!(
                    "stage {n}: the job has no [destination]; add one or set use_origin = true"
                ),
            ),
            (Some(name), Some(c)) => {
                let caps = c.capabilities();
                if !caps.actions.contains(&raw_stage.action) {
                    self.at(
                        line,
                        format!(
                            "stage {n}: a {} connection ({name:?}) cannot {}; it supports: {}",
                            c.kind(),
                            raw_stage.action,
                            caps.actions
                                .iter()
                                .map(|a| a.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                }
                if caps.needs_table && raw_stage.table.as_deref().is_none_or(str::is_empty) {
                    self.at(
                        line,
                        format!("stage {n}: a {} destination needs `table`", c.kind()),
                    );
                }
            }
            (Some(_), None) => {} // unknown connection, reported above
        }
    }

    /// A field of stage `n`: one source, a column not mapped twice (`columns`
    /// holds those seen), not both insert_only and update_only.
    fn field(
        &mut self,
        n: usize,
        columns: &mut BTreeSet<String>,
        f: Spanned<RawField>,
    ) -> Option<Field> {
        let line = self.src.line(f.span().start);
        let mut rf = f.into_inner();
        if !columns.insert(rf.column.clone()) {
            self.at(
                line,
                format!("stage {n}: column {:?} is mapped twice", rf.column),
            );
        }
        let given = [
            rf.origin.is_some(),
            rf.value.is_some(),
            rf.template.is_some(),
            rf.function.is_some(),
            rf.script.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        let mut sources = self.field_sources(n, line, &mut rf);
        if given != 1 {
            self.at(
                line,
                format!(
                    "stage {n}, column {:?}: give exactly one of origin, value, template, function or script",
                    rf.column
                ),
            );
            return None;
        }
        // None: its problem is reported above.
        let source = sources.pop()?;
        if rf.insert_only && rf.update_only {
            self.at(
                line,
                format!(
                    "stage {n}, column {:?}: insert_only and update_only exclude each other",
                    rf.column
                ),
            );
        }
        Some(Field {
            column: rf.column,
            source,
            is_match: rf.is_match,
            insert_only: rf.insert_only,
            update_only: rf.update_only,
            transforms: rf.transform.into_vec(),
            ty: rf.ty,
            line,
        })
    }

    /// The sources a field gives (taken out of `rf`) that are valid.
    fn field_sources(&mut self, n: usize, line: usize, rf: &mut RawField) -> Vec<FieldSource> {
        let column = rf.column.clone();
        let mut sources = Vec::new();
        if let Some(o) = rf.origin.take() {
            sources.push(FieldSource::Origin(o));
        }
        if let Some(v) = rf.value.take() {
            match constant(v) {
                Ok(v) => sources.push(FieldSource::Constant(v)),
                Err(e) => self.at(line, format!("stage {n}, column {column:?}: {e}")),
            }
        }
        if let Some(t) = rf.template.take() {
            match Template::parse(&t) {
                Ok(t) => {
                    for e in unrun_stages(&t, n) {
                        self.at(line, format!("stage {n}, column {column:?}: {e}"));
                    }
                    sources.push(FieldSource::Template(t));
                }
                Err(e) => self.at(line, format!("stage {n}, column {column:?}: {e}")),
            }
        }
        if let Some(func) = rf.function.take() {
            sources.push(FieldSource::Function(func));
        }
        if let Some(script) = rf.script.take() {
            sources.extend(self.script_source(n, line, &column, script));
        }
        sources
    }

    /// A script field: the stages it reads must have run, its lookups must
    /// name connections, and it must compile.
    fn script_source(
        &mut self,
        n: usize,
        line: usize,
        column: &str,
        script: String,
    ) -> Option<FieldSource> {
        if let Ok(t) = Template::parse(&script) {
            for e in unrun_stages(&t, n) {
                self.at(line, format!("stage {n}, column {column:?}: {e}"));
            }
        }
        for name in unknown_lookups(&script, self.connections, self.broken) {
            let unknown = unknown_connection(&name, self.connections);
            self.at(line, format!("stage {n}, column {column:?}: {unknown}"));
        }
        match crate::script::check(&script) {
            Ok(()) => Some(FieldSource::Script(script)),
            Err(e) => {
                self.at(
                    line,
                    format!(
                        "stage {n}, column {column:?}: the script does not compile: {e} (lines count from the script's first line)"
                    ),
                );
                None
            }
        }
    }

    /// An operation: its stage (if it names one) must be one of `stages`,
    /// its lookups must name connections, and it must compile.
    fn operation(&mut self, op: Spanned<RawOperation>, stages: &[Stage]) -> Operation {
        let line = self.src.line(op.span().start);
        let op = op.into_inner();
        let when = op.when.as_str();
        let stage = self.operation_stage(line, &op, stages);
        for name in unknown_lookups(&op.script, self.connections, self.broken) {
            let unknown = unknown_connection(&name, self.connections);
            self.at(line, format!("operation {when}: {unknown}"));
        }
        if let Err(e) = crate::script::check(&op.script) {
            self.at(
                line,
                format!(
                    "operation {when}: the script does not compile: {e} (lines count from the script's first line)"
                ),
            );
        }
        Operation {
            when: op.when,
            stage,
            script: op.script,
            line,
        }
    }

    /// The stage (0-based) an operation names by name or number, if it names one.
    fn operation_stage(
        &mut self,
        line: usize,
        op: &RawOperation,
        stages: &[Stage],
    ) -> Option<usize> {
        let when = op.when.as_str();
        match (&op.stage, op.when) {
            (None, _) => None,
            (Some(v), Moment::BeforeStage | Moment::AfterStage) => {
                let found = match v {
                    toml::Value::Integer(n) => usize::try_from(*n)
                        .ok()
                        .filter(|n| (1..=stages.len()).contains(n))
                        .map(|n| n - 1),
                    toml::Value::String(name) => stages.iter().position(|s| &s.name == name),
                    _ => None,
                };
                if found.is_none() {
                    self.at(
                        line,
                        format!(
                            "operation {when}: stage {v} is not a stage of this job; give a stage's name or its number (1 to {}); the stages are: {}",
                            stages.len(),
                            stages
                                .iter()
                                .map(|s| format!("{:?}", s.name))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                }
                found
            }
            (Some(_), _) => {
                self.at(
                    line,
                    format!(
                        "operation {when}: only before_stage and after_stage operations take a stage"
                    ),
                );
                None
            }
        }
    }

    /// The scripts' time and memory limits, within their bounds.
    fn script_limits(
        &mut self,
        time_ms: &Option<Spanned<u64>>,
        memory_mb: &Option<Spanned<usize>>,
    ) -> ScriptLimits {
        let mut script_limits = ScriptLimits::default();
        if let Some(ms) = time_ms {
            match *ms.get_ref() {
                1..=600_000 => script_limits.time = std::time::Duration::from_millis(*ms.get_ref()),
                _ => self.problems.push(
                    self.src
                        .problem(ms, "script_time_limit_ms must be 1 to 600000"),
                ),
            }
        }
        if let Some(mb) = memory_mb {
            match *mb.get_ref() {
                1..=16_384 => script_limits.memory = *mb.get_ref() * 1024 * 1024,
                _ => self.problems.push(
                    self.src
                        .problem(mb, "script_memory_limit_mb must be 1 to 16384"),
                ),
            }
        }
        script_limits
    }

    /// The error file's path (interpolated, below the project's folder), if the job names one.
    fn error_file(
        &mut self,
        given: Option<&Spanned<String>>,
        builtins: &BTreeMap<&str, String>,
        project_dir: &Path,
    ) -> Option<PathBuf> {
        let f = given?;
        match interpolate(f.get_ref(), builtins) {
            Ok(p) => Some(project_dir.join(p)),
            Err(e) => {
                self.problems
                    .push(self.src.problem(f, format!("error_file: {e}")));
                None
            }
        }
    }

    /// The batch size given (within bounds), else the destination's default.
    fn batch_size(
        &mut self,
        given: &Option<Spanned<usize>>,
        dest_conn: Option<&ConnectionConfig>,
    ) -> usize {
        match given {
            Some(b) if *b.get_ref() == 0 || *b.get_ref() > MAX_BATCH => {
                self.problems.push(
                    self.src
                        .problem(b, format!("batch_size must be 1 to {MAX_BATCH}")),
                );
                1
            }
            Some(b) => *b.get_ref(),
            None => dest_conn
                .map(|c| c.capabilities().batch_size)
                .unwrap_or(1000),
        }
    }

    /// The job's `[[schedules]]`, checked (see `schedule.rs`).
    fn schedules(
        &mut self,
        raw: Vec<Spanned<super::schedule::RawSchedule>>,
    ) -> Vec<super::Schedule> {
        let src = &self.src;
        match super::schedule::check(raw, &|offset| src.line(offset)) {
            Ok(s) => s,
            Err(problems) => {
                for (line, message) in problems {
                    self.at(line, message);
                }
                Vec::new()
            }
        }
    }

    /// The jobs a `next` or `needs` names, and the line it is on.
    fn job_refs(
        &mut self,
        key: &str,
        given: Option<&Spanned<toml::Value>>,
    ) -> (Vec<JobId>, Option<usize>) {
        let Some(v) = given else {
            return (Vec::new(), None);
        };
        let line = self.src.line(v.span().start);
        match graph::job_list(key, v.get_ref()) {
            Ok(ids) => (ids.into_iter().map(JobId).collect(), Some(line)),
            Err(why) => {
                self.problems.push(self.src.problem(v, why));
                (Vec::new(), Some(line))
            }
        }
    }

    /// The most runs of the job at once across every node (`None`: no limit).
    fn max_concurrent_runs(&mut self, given: Option<&Spanned<toml::Value>>) -> Option<u32> {
        let v = given?;
        match v.get_ref() {
            toml::Value::Integer(n) if *n >= 1 => match u32::try_from(*n) {
                Ok(n) => Some(n),
                Err(_) => {
                    let m = format!("max_concurrent_runs must be at most {}", u32::MAX);
                    self.problems.push(self.src.problem(v, m));
                    None
                }
            },
            _ => {
                self.problems.push(
                    self.src
                        .problem(v, "max_concurrent_runs must be a whole number ≥ 1"),
                );
                None
            }
        }
    }
}

/// The connections a script's `lookup('name', …)` calls name (as a string
/// literal) that the project does not have.
fn unknown_lookups(
    script: &str,
    connections: &BTreeMap<String, ConnectionConfig>,
    broken: &BTreeSet<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = script;
    while let Some(at) = rest.find("lookup(") {
        let preceded = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.');
        rest = rest[at + "lookup(".len()..].trim_start();
        if preceded {
            continue;
        }
        let Some(q) = rest.chars().next().filter(|c| matches!(c, '\'' | '"')) else {
            continue;
        };
        if let Some(end) = rest[1..].find(q) {
            let name = &rest[1..1 + end];
            if !connections.contains_key(name)
                && !broken.contains(name)
                && !out.iter().any(|n| n == name)
            {
                out.push(name.to_owned());
            }
        }
    }
    out
}

/// The `@@STG:k,…@@` tokens of stage `n`'s field that read a stage that has not run yet.
fn unrun_stages(t: &Template, n: usize) -> impl Iterator<Item = String> + '_ {
    t.tokens().filter_map(move |tok| match tok {
        Token::StageAction(k) if *k >= n => {
            let readable = match n {
                1 => "the first stage can read none".to_owned(),
                2 => "only stage 1 can be read".to_owned(),
                _ => format!("only stages 1 to {} can be read", n - 1),
            };
            Some(format!(
                "{tok} reads a stage that has not run yet; {readable}"
            ))
        }
        _ => None,
    })
}

fn unknown_connection(name: &str, connections: &BTreeMap<String, ConnectionConfig>) -> String {
    if connections.is_empty() {
        format!("unknown connection {name:?}: project.toml defines no [connections]")
    } else {
        format!(
            "unknown connection {name:?}; project.toml defines: {}",
            connections.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    }
}

/// A field's `value` that is not a constant a field can hold.
#[derive(Debug, thiserror::Error)]
#[error("value must be a string, number, boolean or date, not {type_name}")]
struct ConstantError {
    /// The TOML type it is.
    type_name: &'static str,
}

fn constant(v: toml::Value) -> Result<Value, ConstantError> {
    Ok(match v {
        toml::Value::String(s) => Value::Text(s),
        toml::Value::Integer(i) => Value::Int(i),
        toml::Value::Float(f) => Value::Float(f),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::Text(d.to_string()),
        other => {
            return Err(ConstantError {
                type_name: other.type_str(),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads a project whose one job file starts with a comment line, then `keys`.
    fn job_with(keys: &str) -> Result<Project, Vec<Problem>> {
        let job = format!(
            "# job j\n{keys}\n[origin]\nconnection = \"src\"\n[destination]\nconnection = \"db\"\n\
             [[stages]]\ntable = \"t\"\naction = \"insert\"\nfields = [{{ column = \"id\", origin = \"id\" }}]\n"
        );
        load_project_text(
            Path::new("/p"),
            "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n\
             [connections.db]\nkind = \"sqlite\"\npath = \"${DATA_DIR}/db.sqlite\"\n",
            vec![(PathBuf::from("/p/jobs/j.toml"), job)],
            &LoadOptions {
                data_dir: PathBuf::from("/d"),
            },
        )
    }

    #[test]
    fn max_concurrent_runs_and_rerun_on_node_loss_load() {
        let job = |keys: &str| {
            let p = job_with(keys).unwrap_or_else(|e| panic!("{keys}: {e:#?}"));
            let j = p.job("j").expect("job j").clone();
            (j.max_concurrent_runs, j.rerun_on_node_loss)
        };
        assert_eq!(job(""), (None, false));
        assert_eq!(job("max_concurrent_runs = 1"), (Some(1), false));
        assert_eq!(
            job("max_concurrent_runs = 3\nrerun_on_node_loss = true"),
            (Some(3), true)
        );
        assert_eq!(job("rerun_on_node_loss = false"), (None, false));
        assert_eq!(
            job("max_concurrent_runs = 4294967295"),
            (Some(u32::MAX), false)
        );
    }

    #[test]
    fn bad_max_concurrent_runs_and_rerun_on_node_loss_say_where() {
        let said = |keys: &str| -> Vec<String> {
            match job_with(keys) {
                Ok(_) => panic!("{keys} loaded"),
                Err(problems) => problems.iter().map(|p| p.to_string()).collect(),
            }
        };
        let whole = "/p/jobs/j.toml:2: max_concurrent_runs must be a whole number ≥ 1";
        for bad in ["0", "-2", "1.5", "\"2\"", "true", "[1]"] {
            assert_eq!(
                said(&format!("max_concurrent_runs = {bad}")),
                [whole],
                "{bad}"
            );
        }
        assert_eq!(
            said("max_concurrent_runs = 4294967296"),
            ["/p/jobs/j.toml:2: max_concurrent_runs must be at most 4294967295"]
        );
        // Both keys wrong: the boolean is TOML's type error, at its line.
        let both = said("max_concurrent_runs = 0\nrerun_on_node_loss = \"yes\"");
        assert_eq!(both.len(), 1, "{both:?}");
        assert!(
            both[0].starts_with("/p/jobs/j.toml:3: ") && both[0].contains("boolean"),
            "{both:?}"
        );
    }

    #[test]
    fn interpolates_builtins_and_environment() {
        let b: BTreeMap<&str, String> = [("DATA_DIR", "/d".to_owned())].into_iter().collect();
        assert_eq!(interpolate("${DATA_DIR}/x.db", &b).unwrap(), "/d/x.db");
        // SAFETY: single-threaded access to a variable no other test reads.
        unsafe { std::env::set_var("TIDEPOOL_TEST_SECRET", "s3cr\"et") };
        assert_eq!(
            interpolate("pw=${TIDEPOOL_TEST_SECRET}", &b).unwrap(),
            "pw=s3cr\"et"
        );
        let e = interpolate("${TIDEPOOL_SURELY_MISSING}", &b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("TIDEPOOL_SURELY_MISSING is not set"), "{e}");
        assert!(interpolate("${OPEN", &b).is_err());
    }
}
