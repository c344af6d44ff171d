//! Before the rows: the job's variables, the operations that run once, the
//! origin opened and the stages compiled against its fields.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::drops::{self, DropRun};
use super::incremental::{HighWater, filtered};
use super::operations::{OpRef, job_ops};
use super::{JobError, RunLog, job_variables, open_origin};
use crate::connector::{ConnectionConfig, Origin};
use crate::engine::host::RunHost;
use crate::engine::mapping::{self, CompiledStage};
use crate::engine::state::{KeptState, RunState};
use crate::engine::{LogLevel, RunRequest};
use crate::project::{FieldSource, Job, Moment, Project};
use crate::script::{ScriptHost, ScriptRuntime};
use crate::value::Value;

/// The job's variables and scripts' context, from its start to its end.
pub(super) struct Prelude {
    /// The variables tokens and scripts see, as the operations left them.
    pub(super) variables: BTreeMap<String, Value>,
    /// The variables as the job started (with those kept from earlier runs).
    pub(super) initial_vars: BTreeMap<String, Value>,
    /// Where variables are kept between runs (none if it cannot be opened).
    pub(super) state: Option<Arc<dyn KeptState>>,
    pub(super) host: Option<Arc<RunHost>>,
    /// The runtime of the operations that run once (not in rows).
    pub(super) job_js: Option<ScriptRuntime>,
    /// The scripts of the job's operations, in order.
    op_sources: Vec<String>,
    /// The job's incremental mark, if its origin is incremental.
    pub(super) high_water: Option<Arc<HighWater>>,
    /// The files the run takes, if its origin is a file drop.
    pub(super) drop_run: Option<Arc<DropRun>>,
}

/// What the rows run through: the origin and the compiled stages.
pub(super) struct Plan<'p> {
    pub(super) origin_conn: &'p ConnectionConfig,
    pub(super) origin: Box<dyn Origin>,
    /// The origin's field names.
    pub(super) columns: Vec<String>,
    pub(super) stages: Vec<CompiledStage>,
    /// The field scripts, then (when rows run operations) the operations.
    pub(super) scripts: Vec<String>,
    pub(super) ops: Vec<OpRef>,
    /// Rows go through the stages one at a time (see `Shared::row_wise`).
    pub(super) row_wise: bool,
}

impl Prelude {
    /// The job's variables (with those kept from earlier runs), its scripts'
    /// host and the runtime of its once-only operations.
    pub(super) fn open(
        project: &Project,
        job: &Job,
        req: &RunRequest,
        kept: &RunState,
        log: &mut RunLog<'_>,
    ) -> Result<Self, JobError> {
        let mut variables = job_variables(project, job, &req.argument, &req.run_id.to_string());
        let state = kept_variables(project, job, kept, &mut variables, log);
        let high_water = HighWater::open(project, job, &mut variables, log);
        let initial_vars = variables.clone();
        let has_field_scripts = job.stages.iter().any(|s| {
            s.fields
                .iter()
                .any(|f| matches!(f.source, FieldSource::Script(_)))
        });
        let host = (has_field_scripts || !job.operations.is_empty())
            .then(|| Arc::new(RunHost::new(project, req.preview, kept.as_ref().ok())));
        // Operations that run once (not in rows) run here, in a runtime of their own.
        let op_sources: Vec<String> = job.operations.iter().map(|o| o.script.clone()).collect();
        let job_js = if job
            .operations
            .iter()
            .any(|o| !o.when.in_row() && o.when != Moment::OnRowError)
        {
            let h = host.clone().map(|h| h as Arc<dyn ScriptHost>);
            let rt = ScriptRuntime::new(&op_sources, &variables, job.script_limits, h)
                .map_err(JobError::OperationsCompile)?;
            Some(rt)
        } else {
            None
        };
        Ok(Self {
            variables,
            initial_vars,
            state,
            host,
            job_js,
            op_sources,
            high_water,
            drop_run: None,
        })
    }

    /// Runs the operations before the origin opens (once, before_connections,
    /// before_query); the origin query or path a before_query operation gave.
    pub(super) fn before_origin(
        &mut self,
        project: &Project,
        job: &Job,
        log: &mut RunLog<'_>,
    ) -> Result<Option<String>, JobError> {
        let mut changed_origin: Option<String> = None;
        for when in [Moment::Once, Moment::BeforeConnections, Moment::BeforeQuery] {
            let Some(js) = &self.job_js else { break };
            let mut event = serde_json::json!({"when": when.as_str()});
            if when == Moment::BeforeQuery {
                let conn_path = project
                    .connections
                    .get(&job.origin.connection)
                    .and_then(|c| c.connector().file_path());
                let q = job.origin.query.clone().or_else(|| {
                    job.origin
                        .path
                        .as_deref()
                        .or(conn_path)
                        .map(|p| p.display().to_string())
                });
                event["query"] = q.into();
            }
            match job_ops(js, job, when, &event, log)? {
                Some(Value::Text(q)) if when == Moment::BeforeQuery => changed_origin = Some(q),
                _ => {}
            }
            self.variables.extend(js.changed_vars(&self.variables));
        }
        if let Some(q) = &changed_origin {
            log.push(
                LogLevel::Medium,
                None,
                format!("a before_query operation set the origin query: {q}"),
            );
        }
        Ok(changed_origin)
    }

    /// Opens the origin, runs the after_query operations and compiles the
    /// stages against the origin's fields.
    pub(super) fn plan<'p>(
        &mut self,
        project: &'p Project,
        job: &Job,
        req: &RunRequest,
        log: &mut RunLog<'_>,
    ) -> Result<Plan<'p>, JobError> {
        let changed_origin = self.before_origin(project, job, log)?;
        let (origin_conn, origin) = match &job.origin.file_drop {
            Some(_) => self.open_drop(project, job, req)?,
            None => open_origin(
                project,
                job,
                &self.variables,
                req.preview,
                changed_origin.as_deref(),
            )?,
        };
        let origin = filtered(origin, self.high_water.as_ref(), self.drop_run.as_ref());
        let columns = origin.columns().to_vec();
        if let Some(h) = &self.high_water {
            h.bind_field(&columns)?;
        }
        if let Some(js) = &self.job_js {
            let event = serde_json::json!({"when": "after_query", "columns": columns});
            job_ops(js, job, Moment::AfterQuery, &event, log)?;
            self.variables.extend(js.changed_vars(&self.variables));
        }
        let (mut stages, mut scripts) =
            mapping::compile(job, &columns, &self.variables).map_err(JobError::Mapping)?;
        let ops = row_ops(job, scripts.len(), &columns);
        if !ops.is_empty() {
            scripts.extend(self.op_sources.iter().cloned());
        }
        // A preview goes row-wise too: each stage's values are kept to show them.
        let row_wise = ops.iter().any(|o| o.when.in_row())
            || stages.iter().any(|s| s.reads_stages)
            || req.preview;
        if row_wise {
            stages.iter_mut().for_each(|s| s.premap = false);
        }
        if !scripts.is_empty() {
            ScriptRuntime::new(&scripts, &self.variables, job.script_limits, None)
                .map_err(JobError::ScriptCompile)?;
        }
        Ok(Plan {
            origin_conn,
            origin,
            columns,
            stages,
            scripts,
            ops,
            row_wise,
        })
    }
}

impl Prelude {
    /// Opens the file drop's origin: the files not processed before.
    fn open_drop<'p>(
        &mut self,
        project: &'p Project,
        job: &Job,
        req: &RunRequest,
    ) -> Result<(&'p ConnectionConfig, Box<dyn Origin>), JobError> {
        let name = &job.origin.connection;
        let conn = project
            .connections
            .get(name)
            .ok_or_else(|| JobError::UnknownConnection(name.clone()))?;
        let Some(state) = &self.state else {
            return Err(JobError::Load(
                "a file drop needs kept state to know the files it processed, and it cannot be opened".into(),
            ));
        };
        let (run, origin) = drops::open(
            project,
            job,
            conn,
            (&self.variables, req.preview),
            Some(state),
            self.high_water.as_ref(),
        )?;
        self.drop_run = Some(run);
        Ok((conn, origin))
    }
}

/// Adds the variables kept from earlier runs (LastRunDate, those scripts
/// set) to `variables`; where they are kept, if that opened.
fn kept_variables(
    project: &Project,
    job: &Job,
    kept: &RunState,
    variables: &mut BTreeMap<String, Value>,
    log: &mut RunLog<'_>,
) -> Option<Arc<dyn KeptState>> {
    let state = match kept {
        Ok(s) => Arc::clone(s),
        Err(e) => {
            log.push(
                LogLevel::Medium,
                None,
                format!("job variables are not kept: {e}"),
            );
            return None;
        }
    };
    match state.load(&project.id.0, &job.id.0) {
        Ok(kept) => {
            for (k, v) in kept {
                if !matches!(k.as_str(), "JobArgument" | "RunID" | "JobID" | "ProjectID") {
                    variables.insert(k, Value::Text(v));
                }
            }
        }
        Err(e) => log.push(
            LogLevel::Medium,
            None,
            format!("job variables cannot be read: {e}"),
        ),
    }
    Some(state)
}

/// The operations that run inside rows (and on row errors), compiled in the
/// threads' runtimes after the `field_scripts` field scripts.
fn row_ops(job: &Job, field_scripts: usize, columns: &[String]) -> Vec<OpRef> {
    job.operations
        .iter()
        .enumerate()
        .filter(|(_, o)| o.when.in_row() || o.when == Moment::OnRowError)
        .map(|(i, o)| OpRef {
            when: o.when,
            stage: o.stage,
            script: field_scripts + i,
            line: o.line,
            read: mapping::script_columns(&o.script, columns),
            wants_stages: crate::script::reads_stages(&o.script),
            wants_event: o.script.contains("event"),
        })
        .collect()
}
