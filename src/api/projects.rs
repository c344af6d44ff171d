//! Projects for the console: those that failed to load (with their
//! problems) beside the loaded ones, and `POST /v1/Projects/reload`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use super::AppState;
use super::auth::Caller;
use super::runs::json_error;
use crate::connector::Target;
use crate::project::{Field, FieldSource, Job, OriginSpec, Project, RunGraph, Stage};
use crate::server::Service;
use crate::server::reload::FailedProject;
use crate::store::Role;
use crate::template::{Part, Template};

/// A project that did not load, as `GET /v1/Projects` lists it.
fn failed_json(f: &FailedProject) -> serde_json::Value {
    json!({
        "projectID": f.id,
        "instance": f.instance,
        "loaded": false,
        "errors": f.errors,
    })
}

/// The projects that did not load, of the caller's instances.
pub(super) fn failed_for(svc: &Service, caller: &Caller) -> Vec<serde_json::Value> {
    svc.failed_projects()
        .iter()
        .filter(|f| caller.can_see(&f.instance))
        .map(failed_json)
        .collect()
}

/// Why project `id` of `instance` is unknown, if it is there but did not load.
pub(super) fn load_failure(svc: &Service, instance: &str, id: &str) -> Option<String> {
    svc.failed_projects()
        .into_iter()
        .find(|f| f.instance == instance && f.id.eq_ignore_ascii_case(id))
        .map(|f| format!("project {id:?} did not load: {}", f.errors.join("; ")))
}

/// The caller's projects, loaded or not (as `GET /v1/Projects`).
fn listing(svc: &Service, caller: &Caller) -> Vec<serde_json::Value> {
    let loaded = svc.projects();
    let mut list: Vec<_> = loaded
        .projects
        .iter()
        .filter(|p| caller.can_see(&p.instance))
        .map(super::project_json)
        .collect();
    list.extend(failed_for(svc, caller));
    list
}

/// Loads every project again, at once; runs already going keep their version.
#[utoipa::path(post, path = "/v1/Projects/reload", tag = "tidepool",
    responses((status = 200, description = "the caller's projects as GET /v1/Projects lists them, after the reload"),
        (status = 401, description = "missing or bad credentials"),
        (status = 403, description = "{error}: needs Owner or Full in an instance")))]
pub async fn reload(State(svc): State<AppState>, caller: Caller) -> Response {
    let allowed = match caller.instances() {
        None => true,
        Some(list) => list.iter().any(|i| caller.role_in(i) >= Some(Role::Full)),
    };
    if !allowed {
        return json_error(
            StatusCode::FORBIDDEN,
            "reloading projects needs Owner or Full in an instance",
        );
    }
    let s = svc.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || s.reload_projects()).await {
        return json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the reload failed: {e}"),
        );
    }
    axum::Json(listing(&svc, &caller)).into_response()
}

/// One project in detail, as `GET /v1/Projects/{id}` answers it: what
/// `GET /v1/Projects` lists, and for each job its origin, destination,
/// stages with their field mappings, and its job graph (`next`, `needs`). Connections are named
/// with their kind and where they point, never with a password, header or
/// auth value.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectDetail {
    /// The project.
    #[serde(rename = "projectID")]
    #[schema(rename = "projectID")]
    pub project_id: String,
    /// A human name.
    pub name: String,
    /// The instance that owns it.
    pub instance: String,
    /// Always true here (a project that did not load answers 404).
    pub loaded: bool,
    /// The jobs, by ID.
    pub jobs: Vec<JobDetail>,
    /// The project's job graph by levels: the jobs that wait for none first,
    /// then each job one level after the last of the jobs it waits for.
    pub levels: Vec<Vec<String>>,
}

/// One job of a project in detail.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobDetail {
    /// The job.
    #[serde(rename = "jobID")]
    #[schema(rename = "jobID")]
    pub job_id: String,
    /// A human name.
    pub name: String,
    /// The first job `nextJobs` names (a straight chain's next job).
    pub next: Option<String>,
    /// The jobs that start, in parallel, after this one completes in a chained run.
    pub next_jobs: Vec<String>,
    /// The jobs that must all have completed before this one starts in a chained run.
    pub needs: Vec<String>,
    /// How many stages it has (the detail is in `stageDetails`).
    pub stages: usize,
    /// The jobs a chained run of this job executes, in the order they may
    /// start: this one first, then the jobs that depend on it.
    pub chain: Vec<String>,
    /// The job file, relative to the project folder.
    pub file: String,
    /// Where rows come from.
    pub origin: ConnectionUse,
    /// Where stages write unless they `useOrigin`.
    pub destination: Option<ConnectionUse>,
    /// The stages, in order, with their field mappings.
    pub stage_details: Vec<StageDetail>,
    /// Rows per destination transaction.
    pub batch_size: usize,
    /// The job stops at its first row error.
    pub halt_on_error: bool,
    /// Where rejected rows are written.
    pub error_file: Option<String>,
    /// Times a batch is tried again when the destination's connection is lost.
    pub retry_attempts: u32,
}

/// A connection as a job uses it: its name, kind and where it points.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionUse {
    /// The connection's name in the project.
    pub connection: String,
    /// `csv`, `json`, `sqlite`, `postgres`, `mysql` or `http`.
    pub kind: String,
    /// The origin's SQL query (for http: the request path, secret-looking parameters hidden).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The file read or written (`${DATA_DIR}/…`, or relative to the project folder).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The database or API address, without password, query string or fragment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// One stage of a job, with its field mappings.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageDetail {
    /// 1-based, as row errors and `@@STG:n@@` count stages.
    pub number: usize,
    /// A human name.
    pub name: String,
    /// The table or object written to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// `insert`, `update`, `delete`, `update/insert` or `skip/insert`.
    pub action: String,
    /// It writes to the origin's connection (write-back).
    pub use_origin: bool,
    /// A blank mapped value leaves the destination's alone.
    pub omit_blank: bool,
    /// An update writes only when a value differs.
    pub update_on_difference: bool,
    /// The columns that find the destination row (`match = true`).
    pub match_fields: Vec<String>,
    /// The field mappings, in order.
    pub fields: Vec<FieldDetail>,
}

/// One field mapping: a destination column and where its value comes from
/// (exactly one of `origin`, `template`, `value`, `function`, `script`).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FieldDetail {
    /// The destination column.
    pub column: String,
    /// An origin field, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// A template with `@@…@@` tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// A constant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    /// A built-in function (`now`, `new_guid`, `row_number`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// A JavaScript expression or function body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// The type the value is converted to last.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    #[schema(rename = "type")]
    pub ty: Option<String>,
    /// Text transforms applied in order, before `type`.
    pub transform: Vec<String>,
    /// Part of the match that finds the destination row.
    #[serde(rename = "match")]
    #[schema(rename = "match")]
    pub is_match: bool,
    /// Written only when a row is inserted.
    pub insert_only: bool,
    /// Written only when a row is updated.
    pub update_only: bool,
}

/// The detail of a loaded project (`GET /v1/Projects/{id}`).
pub(super) fn project_detail(p: &Project) -> ProjectDetail {
    ProjectDetail {
        project_id: p.id.0.clone(),
        name: p.name.clone(),
        instance: p.instance.clone(),
        loaded: true,
        jobs: p.jobs.values().map(|j| job_detail(p, j)).collect(),
        levels: RunGraph::whole(p)
            .levels()
            .into_iter()
            .map(|l| l.into_iter().map(|j| j.0).collect())
            .collect(),
    }
}

fn job_detail(p: &Project, j: &Job) -> JobDetail {
    JobDetail {
        job_id: j.id.0.clone(),
        name: j.name.clone(),
        next: j.next.first().map(|n| n.0.clone()),
        next_jobs: j.next.iter().map(|n| n.0.clone()).collect(),
        needs: j.needs.iter().map(|n| n.0.clone()).collect(),
        stages: j.stages.len(),
        chain: chain_of(p, j),
        file: shown_path(p, &j.file),
        origin: origin_use(p, &j.origin),
        destination: j
            .destination
            .as_ref()
            .map(|name| connection_use(p, name, None)),
        stage_details: j
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| stage_detail(i + 1, s))
            .collect(),
        batch_size: j.batch_size,
        halt_on_error: j.halt_on_error,
        error_file: j.error_file.as_deref().map(|f| shown_path(p, f)),
        retry_attempts: j.retry_attempts,
    }
}

/// The jobs a chained run of `j` executes, in the order they may start.
fn chain_of(p: &Project, j: &Job) -> Vec<String> {
    RunGraph::of(p, &j.id.0, true)
        .map(|g| g.jobs().iter().map(|id| id.0.clone()).collect())
        .unwrap_or_else(|| vec![j.id.0.clone()])
}

fn origin_use(p: &Project, o: &OriginSpec) -> ConnectionUse {
    let mut used = connection_use(p, &o.connection, o.path.as_deref());
    used.query = o.query.as_ref().map(|q| match &used.kind[..] {
        "http" => without_secret_parameters(q),
        _ => q.clone(),
    });
    used
}

/// A connection by name: its kind and where it points (a file path, or an
/// address without password, query string or fragment). `path` overrides a
/// file connection's.
fn connection_use(p: &Project, name: &str, path: Option<&std::path::Path>) -> ConnectionUse {
    let config = p.connections.get(name);
    let (file, target) = match config.map(|c| c.connector().target()) {
        Some(Target::File(f)) => (Some(f), None),
        Some(Target::Address(a)) => (None, Some(redacted_address(a))),
        None => (None, None),
    };
    ConnectionUse {
        connection: name.to_owned(),
        kind: config.map_or("unknown", |c| c.kind()).to_owned(),
        query: None,
        path: path.or(file).map(|f| shown_path(p, f)),
        target,
    }
}

/// A path as an operator reads it: below the data folder as `${DATA_DIR}/…`,
/// below the project folder relative to it, else as it is.
fn shown_path(p: &Project, path: &std::path::Path) -> String {
    if let Ok(rest) = path.strip_prefix(&p.data_dir) {
        return format!("${{DATA_DIR}}/{}", rest.display());
    }
    match path.strip_prefix(&p.dir) {
        Ok(rest) => rest.display().to_string(),
        Err(_) => path.display().to_string(),
    }
}

/// A database or API address without what may be secret: the password of
/// `scheme://user:password@host/…`, the query string and fragment (where
/// `?password=` and tokens go), and of a `key=value` connection string every
/// key but host, port, dbname and user.
fn redacted_address(address: &str) -> String {
    let Some((scheme, rest)) = address.split_once("://") else {
        return address
            .split_whitespace()
            .filter(|kv| {
                let key = kv.split('=').next().unwrap_or("").to_ascii_lowercase();
                matches!(&key[..], "host" | "hostaddr" | "port" | "dbname" | "user")
            })
            .collect::<Vec<_>>()
            .join(" ");
    };
    let (user, rest) = match rest.rsplit_once('@') {
        // An `@` past the host (a password holding `/`, `?` or `#`, or an `@`
        // in the path or query): which part is secret is unclear, so no part shows.
        Some((userinfo, _)) if userinfo.contains(['/', '?', '#']) => {
            return format!("{scheme}://…");
        }
        Some((userinfo, rest)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            (format!("{user}@"), rest)
        }
        None => (String::new(), rest),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    format!("{scheme}://{user}{rest}")
}

/// An HTTP request path with the values of secret-looking query parameters
/// (key, token, secret, password, auth, signature) replaced by `***`.
fn without_secret_parameters(path: &str) -> String {
    let Some((before, query)) = path.split_once('?') else {
        return path.to_owned();
    };
    let hidden = [
        "key",
        "token",
        "secret",
        "pass",
        "auth",
        "sig",
        "credential",
    ];
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if hidden.iter().any(|h| name.to_ascii_lowercase().contains(h)) => {
                format!("{name}=***")
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("{before}?{}", query.join("&"))
}

fn stage_detail(number: usize, s: &Stage) -> StageDetail {
    StageDetail {
        number,
        name: s.name.clone(),
        table: s.table.clone(),
        action: s.action.to_string(),
        use_origin: s.use_origin,
        omit_blank: s.omit_blank,
        update_on_difference: s.update_on_difference,
        match_fields: s
            .fields
            .iter()
            .filter(|f| f.is_match)
            .map(|f| f.column.clone())
            .collect(),
        fields: s.fields.iter().map(field_detail).collect(),
    }
}

fn field_detail(f: &Field) -> FieldDetail {
    let mut detail = FieldDetail {
        column: f.column.clone(),
        origin: None,
        template: None,
        value: None,
        function: None,
        script: None,
        ty: f.ty.map(|t| name_of(&t)),
        transform: f.transforms.iter().map(name_of).collect(),
        is_match: f.is_match,
        insert_only: f.insert_only,
        update_only: f.update_only,
    };
    match &f.source {
        FieldSource::Origin(name) => detail.origin = Some(name.clone()),
        FieldSource::Constant(v) => detail.value = Some(v.to_json()),
        FieldSource::Template(t) => detail.template = Some(template_text(t)),
        FieldSource::Function(func) => detail.function = Some(name_of(func)),
        FieldSource::Script(s) => detail.script = Some(s.clone()),
    }
    detail
}

/// The name a job file gives an enum value (its serde name).
fn name_of<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// A template as it was written.
fn template_text(t: &Template) -> String {
    t.parts
        .iter()
        .map(|part| match part {
            Part::Literal(s) => s.clone(),
            Part::Token(token) => token.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_lose_passwords_query_strings_and_secret_keys() {
        assert_eq!(
            redacted_address("postgres://etl:pw@db:5432/app?password=pw#x"),
            "postgres://etl@db:5432/app"
        );
        assert_eq!(
            redacted_address("mysql://root@127.0.0.1/test"),
            "mysql://root@127.0.0.1/test"
        );
        assert_eq!(
            redacted_address("https://api.example.com?token=t"),
            "https://api.example.com"
        );
        assert_eq!(
            redacted_address("host=db port=5432 password=pw user=etl sslkey=k dbname=app"),
            "host=db port=5432 user=etl dbname=app"
        );
        assert_eq!(
            without_secret_parameters("/people?page=2&API_KEY=k&sig=s"),
            "/people?page=2&API_KEY=***&sig=***"
        );
        assert_eq!(
            redacted_address("postgres://etl:p/a?s#s@db/app"),
            "postgres://…"
        );
        assert_eq!(
            redacted_address("postgres://db/app?password=p@ss"),
            "postgres://…"
        );
        assert_eq!(without_secret_parameters("/people"), "/people");
    }
}
