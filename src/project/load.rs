//! Reading project folders: TOML with spans, `${ENV}` interpolation, static checks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    id: Option<Spanned<String>>,
    name: Option<String>,
    next: Option<Spanned<String>>,
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

/// Replaces `${NAME}` from the environment; `DATA_DIR` and `PROJECT_DIR` are built in.
fn interpolate(text: &str, builtins: &BTreeMap<&str, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated ${{…}} in {text:?}"))?;
        let name = &after[..end];
        match builtins.get(name) {
            Some(v) => out.push_str(v),
            None => match std::env::var(name) {
                Ok(v) => out.push_str(&v),
                Err(_) => {
                    return Err(format!(
                        "environment variable {name} is not set (used as ${{{name}}}); set it or remove the reference"
                    ));
                }
            },
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn interpolate_value(v: &mut toml::Value, builtins: &BTreeMap<&str, String>) -> Result<(), String> {
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
            let text = std::fs::read_to_string(&f).map_err(|e| e.to_string());
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
type JobFile = (PathBuf, Result<String, String>);

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
    let mut variables = BTreeMap::new();
    for (name, value) in &raw.variables {
        match interpolate(value.get_ref(), &builtins) {
            Ok(v) => {
                variables.insert(name.clone(), v);
            }
            Err(e) => problems.push(src.problem(value, format!("variable {name}: {e}"))),
        }
    }

    let mut connections = BTreeMap::new();
    let mut broken = BTreeSet::new();
    for (name, spanned) in raw.connections {
        let mut value = spanned.get_ref().clone();
        if let Err(e) = interpolate_value(&mut value, &builtins) {
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

    let mut jobs = BTreeMap::new();
    let mut job_lines: BTreeMap<JobId, (PathBuf, Option<Spanned<String>>, String)> =
        BTreeMap::new();
    for (file, text) in job_files {
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                problems.push(Problem::new(&file, None, format!("cannot read: {e}")));
                continue;
            }
        };
        match load_job(&file, text, &connections, &broken, &builtins, dir) {
            Ok((job, next_span, text)) => {
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
                job_lines.insert(job.id.clone(), (file.clone(), next_span, text));
                jobs.insert(job.id.clone(), job);
            }
            Err(mut p) => problems.append(&mut p),
        }
    }

    // Chains: `next` must name a job of this project, and must not loop.
    for (id, (file, next_span, text)) in &job_lines {
        let Some(next) = next_span else { continue };
        let src = SourceFile { path: file, text };
        if !jobs.contains_key(&JobId(next.get_ref().clone())) {
            problems.push(src.problem(
                next,
                format!(
                    "next = {:?}: no such job in this project (jobs: {})",
                    next.get_ref(),
                    jobs.keys().map(|j| j.0.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ));
            continue;
        }
        let mut seen = vec![id.clone()];
        let mut at = jobs.get(id).and_then(|j| j.next.clone());
        while let Some(cur) = at {
            if seen.contains(&cur) {
                seen.push(cur);
                problems.push(src.problem(
                    next,
                    format!(
                        "the chain loops: {}",
                        seen.iter().map(|j| j.0.as_str()).collect::<Vec<_>>().join(" -> ")
                    ),
                ));
                break;
            }
            seen.push(cur.clone());
            at = jobs.get(&cur).and_then(|j| j.next.clone());
        }
    }

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
    })
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

type LoadedJob = (Job, Option<Spanned<String>>, String);

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
    let mut problems = Vec::new();

    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = match &raw.id {
        Some(id) => {
            check_id(&src, id, "job", &mut problems);
            id.get_ref().clone()
        }
        None => stem,
    };

    // Origin.
    let origin_name = raw.origin.get_ref().connection.get_ref().clone();
    let origin_conn = connections.get(&origin_name);
    match origin_conn {
        None if broken.contains(&origin_name) => {} // reported with the connection
        None => problems.push(src.problem(
            &raw.origin.get_ref().connection,
            unknown_connection(&origin_name, connections),
        )),
        Some(c) => {
            let o = raw.origin.get_ref();
            match c.capabilities().origin {
                OriginInput::Query if o.query.is_none() => problems.push(src.problem(
                    &raw.origin,
                    format!(
                        "origin: connection {origin_name:?} ({}) needs origin.query: the rows' SQL (for http: the request path)",
                        c.kind()
                    ),
                )),
                OriginInput::File if o.query.is_some() => problems.push(src.problem(
                    &raw.origin,
                    format!(
                        "origin: connection {origin_name:?} is a {} file: it takes no query",
                        c.kind()
                    ),
                )),
                _ => {}
            }
            if let Some(q) = &o.query
                && let Err(e) = Template::parse(q)
            {
                problems.push(src.problem(&raw.origin, format!("origin.query: {e}")));
            }
        }
    }

    // Destination.
    let dest_name = raw
        .destination
        .as_ref()
        .map(|d| d.connection.get_ref().clone());
    let dest_conn = match &raw.destination {
        Some(d) => match connections.get(d.connection.get_ref()) {
            Some(c) => Some(c),
            None if broken.contains(d.connection.get_ref()) => None,
            None => {
                problems.push(src.problem(
                    &d.connection,
                    unknown_connection(d.connection.get_ref(), connections),
                ));
                None
            }
        },
        None => None,
    };

    if raw.stages.is_empty() {
        problems.push(Problem::new(
            file,
            None,
            "the job has no stages: add at least one [[stages]] with fields",
        ));
    }
    let mut stages = Vec::new();
    for (i, st) in raw.stages.into_iter().enumerate() {
        let n = i + 1;
        let line = src.line(st.span().start);
        let span_start = st.span().start;
        let raw_stage = st.into_inner();
        let at = |msg: String| Problem::new(file, Some(line), msg);

        let (target_name, target) = if raw_stage.use_origin {
            (Some(origin_name.clone()), origin_conn)
        } else {
            (dest_name.clone(), dest_conn)
        };
        match (target_name, target) {
            (None, _) => problems.push(at(format!(
                "stage {n}: the job has no [destination]; add one or set use_origin = true"
            ))),
            (Some(name), Some(c)) => {
                let caps = c.capabilities();
                if !caps.actions.contains(&raw_stage.action) {
                    problems.push(at(format!(
                        "stage {n}: a {} connection ({name:?}) cannot {}; it supports: {}",
                        c.kind(),
                        raw_stage.action,
                        caps.actions
                            .iter()
                            .map(|a| a.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                if caps.needs_table && raw_stage.table.as_deref().is_none_or(str::is_empty) {
                    problems.push(at(format!(
                        "stage {n}: a {} destination needs `table`",
                        c.kind()
                    )));
                }
            }
            (Some(_), None) => {} // unknown connection, reported above
        }
        if raw_stage.fields.is_empty() {
            problems.push(at(format!("stage {n}: no fields")));
        }
        let mut fields = Vec::new();
        let mut columns = BTreeSet::new();
        for f in raw_stage.fields {
            let fline = src.line(f.span().start);
            let rf = f.into_inner();
            let fat = |msg: String| Problem::new(file, Some(fline), msg);
            if !columns.insert(rf.column.clone()) {
                problems.push(fat(format!(
                    "stage {n}: column {:?} is mapped twice",
                    rf.column
                )));
            }
            let mut sources = Vec::new();
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
            if let Some(o) = rf.origin {
                sources.push(FieldSource::Origin(o));
            }
            if let Some(v) = rf.value {
                match constant(v) {
                    Ok(v) => sources.push(FieldSource::Constant(v)),
                    Err(e) => problems.push(fat(format!("stage {n}, column {:?}: {e}", rf.column))),
                }
            }
            if let Some(t) = rf.template {
                match Template::parse(&t) {
                    Ok(t) => {
                        problems.extend(
                            unrun_stages(&t, n)
                                .map(|e| fat(format!("stage {n}, column {:?}: {e}", rf.column))),
                        );
                        sources.push(FieldSource::Template(t));
                    }
                    Err(e) => problems.push(fat(format!("stage {n}, column {:?}: {e}", rf.column))),
                }
            }
            if let Some(func) = rf.function {
                sources.push(FieldSource::Function(func));
            }
            if let Some(src) = rf.script {
                if let Ok(t) = Template::parse(&src) {
                    problems.extend(
                        unrun_stages(&t, n)
                            .map(|e| fat(format!("stage {n}, column {:?}: {e}", rf.column))),
                    );
                }
                for name in unknown_lookups(&src, connections, broken) {
                    problems.push(fat(format!(
                        "stage {n}, column {:?}: {}",
                        rf.column,
                        unknown_connection(&name, connections)
                    )));
                }
                match crate::script::check(&src) {
                    Ok(()) => sources.push(FieldSource::Script(src)),
                    Err(e) => problems.push(fat(format!(
                        "stage {n}, column {:?}: the script does not compile: {e} (lines count from the script's first line)",
                        rf.column
                    ))),
                }
            }
            if given != 1 {
                problems.push(fat(format!(
                    "stage {n}, column {:?}: give exactly one of origin, value, template, function or script",
                    rf.column
                )));
                continue;
            }
            let Some(source) = sources.pop() else {
                continue; // its problem is reported above
            };
            if rf.insert_only && rf.update_only {
                problems.push(fat(format!(
                    "stage {n}, column {:?}: insert_only and update_only exclude each other",
                    rf.column
                )));
            }
            fields.push(Field {
                column: rf.column,
                source,
                is_match: rf.is_match,
                insert_only: rf.insert_only,
                update_only: rf.update_only,
                transforms: rf.transform.into_vec(),
                ty: rf.ty,
                line: fline,
            });
        }
        if raw_stage.action.needs_match() && !fields.iter().any(|f| f.is_match) {
            problems.push(Problem::new(
                file,
                Some(src.line(span_start)),
                format!(
                    "stage {n}: a {} stage needs at least one field with match = true",
                    raw_stage.action
                ),
            ));
        }
        let name = raw_stage.name.unwrap_or_else(|| match &raw_stage.table {
            Some(t) => format!("{} {t}", raw_stage.action),
            None => raw_stage.action.to_string(),
        });
        stages.push(Stage {
            name,
            table: raw_stage.table,
            action: raw_stage.action,
            omit_blank: raw_stage.omit_blank,
            update_on_difference: raw_stage.update_on_difference,
            use_origin: raw_stage.use_origin,
            fields,
        });
    }

    let mut operations = Vec::new();
    for op in raw.operations {
        let line = src.line(op.span().start);
        let op = op.into_inner();
        let at = |msg: String| Problem::new(file, Some(line), msg);
        let when = op.when.as_str();
        let stage = match (&op.stage, op.when) {
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
                    problems.push(at(format!(
                        "operation {when}: stage {v} is not a stage of this job; give a stage's name or its number (1 to {}); the stages are: {}",
                        stages.len(),
                        stages
                            .iter()
                            .map(|s| format!("{:?}", s.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                found
            }
            (Some(_), _) => {
                problems.push(at(format!(
                    "operation {when}: only before_stage and after_stage operations take a stage"
                )));
                None
            }
        };
        for name in unknown_lookups(&op.script, connections, broken) {
            problems.push(at(format!(
                "operation {when}: {}",
                unknown_connection(&name, connections)
            )));
        }
        if let Err(e) = crate::script::check(&op.script) {
            problems.push(at(format!(
                "operation {when}: the script does not compile: {e} (lines count from the script's first line)"
            )));
        }
        operations.push(Operation {
            when: op.when,
            stage,
            script: op.script,
            line,
        });
    }
    let mut script_limits = ScriptLimits::default();
    if let Some(ms) = &raw.script_time_limit_ms {
        match *ms.get_ref() {
            1..=600_000 => script_limits.time = std::time::Duration::from_millis(*ms.get_ref()),
            _ => problems.push(src.problem(ms, "script_time_limit_ms must be 1 to 600000")),
        }
    }
    if let Some(mb) = &raw.script_memory_limit_mb {
        match *mb.get_ref() {
            1..=16_384 => script_limits.memory = *mb.get_ref() * 1024 * 1024,
            _ => problems.push(src.problem(mb, "script_memory_limit_mb must be 1 to 16384")),
        }
    }

    let error_file = match &raw.error_file {
        Some(f) => match interpolate(f.get_ref(), builtins) {
            Ok(p) => Some(project_dir.join(p)),
            Err(e) => {
                problems.push(src.problem(f, format!("error_file: {e}")));
                None
            }
        },
        None => None,
    };
    let batch_size = match &raw.batch_size {
        Some(b) if *b.get_ref() == 0 || *b.get_ref() > MAX_BATCH => {
            problems.push(src.problem(b, format!("batch_size must be 1 to {MAX_BATCH}")));
            1
        }
        Some(b) => *b.get_ref(),
        None => dest_conn
            .map(|c| c.capabilities().batch_size)
            .unwrap_or(1000),
    };
    if let Some(next) = &raw.next {
        check_id(&src, next, "next job", &mut problems);
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    let origin = raw.origin.into_inner();
    let job = Job {
        id: JobId(id.clone()),
        name: raw.name.unwrap_or(id),
        file: file.to_owned(),
        origin: OriginSpec {
            connection: origin_name,
            query: origin.query,
            path: origin.path.map(PathBuf::from),
        },
        destination: dest_name,
        stages,
        next: raw.next.as_ref().map(|n| JobId(n.get_ref().clone())),
        halt_on_error: raw.halt_on_error,
        error_file,
        batch_size,
        retry_attempts: raw.retry_attempts,
        retry_wait: std::time::Duration::from_millis(raw.retry_wait_ms),
        operations,
        script_limits,
    };
    Ok((job, raw.next, text))
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

fn constant(v: toml::Value) -> Result<Value, String> {
    Ok(match v {
        toml::Value::String(s) => Value::Text(s),
        toml::Value::Integer(i) => Value::Int(i),
        toml::Value::Float(f) => Value::Float(f),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::Text(d.to_string()),
        other => {
            return Err(format!(
                "value must be a string, number, boolean or date, not {}",
                other.type_str()
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let e = interpolate("${TIDEPOOL_SURELY_MISSING}", &b).unwrap_err();
        assert!(e.contains("TIDEPOOL_SURELY_MISSING is not set"), "{e}");
        assert!(interpolate("${OPEN", &b).is_err());
    }
}
