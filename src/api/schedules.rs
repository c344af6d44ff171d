//! `GET /v1/Schedules` and `POST /v1/Schedules/{projectID}/{jobID}/{name}/pause|resume`:
//! the loaded projects' schedules with their next fire times and last
//! ticks, and pausing them (in the store, for every node).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::AppState;
use super::auth::Caller;
use super::runs::json_error;
use crate::project::Schedule;
use crate::server::scheduler::{Loaded, loaded_schedules};
use crate::store::Role;
use crate::store::schedules::{ScheduleState, TickRecord};

/// Fire times shown per schedule.
const NEXT_SHOWN: usize = 5;
/// Ticks shown per schedule.
const TICKS_SHOWN: usize = 10;

/// A tick as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TickLine {
    /// The fire time, in the schedule's time zone (RFC 3339); for missed
    /// ticks, the last of them.
    pub tick: String,
    /// `queued`, `skipped` or `missed`.
    pub outcome: String,
    /// The run queued for it.
    #[serde(rename = "runID")]
    pub run_id: Option<String>,
    /// How many ticks it stands for (missed ticks, or a catch-up run).
    pub covers: u64,
    /// The first tick it stands for.
    pub first_tick: String,
    /// A catch-up run after downtime (`catch_up = "last"`).
    pub catch_up: bool,
    /// Why there is no run (skipped).
    pub reason: Option<String>,
    /// The node that recorded it.
    pub node: Option<String>,
}

/// One schedule as `GET /v1/Schedules` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleLine {
    /// The instance of its project.
    pub instance: String,
    /// The project.
    #[serde(rename = "projectID")]
    pub project_id: String,
    /// The job.
    #[serde(rename = "jobID")]
    pub job_id: String,
    /// The schedule's name in its job.
    pub name: String,
    /// The cron expression.
    pub cron: String,
    /// The IANA time zone it is read in.
    pub timezone: String,
    /// `none` or `last`.
    pub catch_up: String,
    /// `skip` or `queue`.
    pub overlap: String,
    /// Paused: no ticks fire.
    pub paused: bool,
    /// The next fire times (RFC 3339, in the schedule's time zone).
    pub next_fire_times: Vec<String>,
    /// The latest tick recorded.
    pub last_tick: Option<TickLine>,
    /// The latest ticks, newest first.
    pub recent_ticks: Vec<TickLine>,
}

/// The answer of `GET /v1/Schedules`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ScheduleList {
    /// The schedules of the caller's instances' loaded projects.
    pub schedules: Vec<ScheduleLine>,
}

fn in_zone(s: &Schedule, t: DateTime<Utc>) -> String {
    t.with_timezone(&s.timezone).to_rfc3339()
}

fn tick_line(s: &Schedule, t: &TickRecord) -> TickLine {
    TickLine {
        tick: in_zone(s, t.tick_at),
        outcome: t.outcome.as_str().to_owned(),
        run_id: t.run_id.map(|r| r.to_string()),
        covers: t.covers,
        first_tick: in_zone(s, t.first_tick),
        catch_up: t.catch_up,
        reason: t.reason.clone(),
        node: t.node_id.clone(),
    }
}

fn lower_json<T: Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A schedule's line from the loaded schedule, its state and its ticks.
async fn line(
    svc: &AppState,
    l: &Loaded<'_>,
    state: Option<&ScheduleState>,
) -> Result<ScheduleLine, crate::store::StoreError> {
    let s = l.schedule;
    let mut next = Vec::new();
    let mut at = Utc::now();
    while next.len() < NEXT_SHOWN {
        let Some(t) = crate::project::next_after(s, at) else {
            break;
        };
        next.push(in_zone(s, t));
        at = t;
    }
    let recent = svc.store.recent_ticks(&l.key, TICKS_SHOWN).await?;
    Ok(ScheduleLine {
        instance: l.key.instance.clone(),
        project_id: l.key.project_id.clone(),
        job_id: l.key.job_id.clone(),
        name: l.key.name.clone(),
        cron: s.cron.clone(),
        timezone: s.timezone.name().to_owned(),
        catch_up: lower_json(s.catch_up),
        overlap: lower_json(s.overlap),
        paused: state.is_some_and(|st| st.paused),
        next_fire_times: next,
        last_tick: state
            .and_then(|st| st.last.as_ref())
            .map(|t| tick_line(s, t)),
        recent_ticks: recent.iter().map(|t| tick_line(s, t)).collect(),
    })
}

/// The schedules of the caller's instances.
#[utoipa::path(get, path = "/v1/Schedules", tag = "tidepool", operation_id = "Schedules",
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "the schedules of the caller's instances' projects", body = ScheduleList),
        (status = 401, description = "missing or bad credentials", body = super::wire::ExecJobAsyncResponse),
        (status = 503, description = "the store cannot be read", body = super::wire::ErrorDoc),
    ))]
pub async fn list(State(svc): State<AppState>, caller: Caller) -> Response {
    let projects = svc.projects();
    let mine: Vec<Loaded<'_>> = loaded_schedules(&projects, None)
        .into_iter()
        .filter(|l| caller.can_see(&l.key.instance))
        .collect();
    let states = match svc.store.schedule_states(None).await {
        Ok(s) => s,
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let mut out = Vec::with_capacity(mine.len());
    for l in &mine {
        let state = states.iter().find(|s| s.key == l.key);
        match line(&svc, l, state).await {
            Ok(found) => out.push(found),
            Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
    axum::Json(ScheduleList { schedules: out }).into_response()
}

/// Pauses a schedule on every node: its ticks neither fire nor count as missed.
#[utoipa::path(post, path = "/v1/Schedules/{projectID}/{jobID}/{name}/pause", tag = "tidepool", operation_id = "PauseSchedule",
    params(("projectID" = String, Path, description = "the project (any case)"),
        ("jobID" = String, Path, description = "the job (any case)"),
        ("name" = String, Path, description = "the schedule's name (any case)")),
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "paused; the schedule as it is now", body = ScheduleLine),
        (status = 401, description = "missing or bad credentials", body = super::wire::ExecJobAsyncResponse),
        (status = 403, description = "pausing needs Owner or Full in the project's instance", body = super::wire::ErrorDoc),
        (status = 404, description = "no such schedule in the caller's instances", body = super::wire::ErrorDoc),
        (status = 503, description = "the store failed", body = super::wire::ErrorDoc),
    ))]
pub async fn pause(
    State(svc): State<AppState>,
    Path((project, job, name)): Path<(String, String, String)>,
    caller: Caller,
) -> Response {
    set_paused(&svc, &caller, (&project, &job, &name), true).await
}

/// Resumes a paused schedule on every node, from now (the pause's ticks are not caught up).
#[utoipa::path(post, path = "/v1/Schedules/{projectID}/{jobID}/{name}/resume", tag = "tidepool", operation_id = "ResumeSchedule",
    params(("projectID" = String, Path, description = "the project (any case)"),
        ("jobID" = String, Path, description = "the job (any case)"),
        ("name" = String, Path, description = "the schedule's name (any case)")),
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "resumed; the schedule as it is now", body = ScheduleLine),
        (status = 401, description = "missing or bad credentials", body = super::wire::ExecJobAsyncResponse),
        (status = 403, description = "resuming needs Owner or Full in the project's instance", body = super::wire::ErrorDoc),
        (status = 404, description = "no such schedule in the caller's instances", body = super::wire::ErrorDoc),
        (status = 503, description = "the store failed", body = super::wire::ErrorDoc),
    ))]
pub async fn resume(
    State(svc): State<AppState>,
    Path((project, job, name)): Path<(String, String, String)>,
    caller: Caller,
) -> Response {
    set_paused(&svc, &caller, (&project, &job, &name), false).await
}

async fn set_paused(
    svc: &AppState,
    caller: &Caller,
    (project, job, name): (&str, &str, &str),
    paused: bool,
) -> Response {
    let projects = svc.projects();
    let all = loaded_schedules(&projects, None);
    let Some(l) = all.iter().find(|l| {
        caller.can_see(&l.key.instance)
            && l.key.project_id.eq_ignore_ascii_case(project)
            && l.key.job_id.eq_ignore_ascii_case(job)
            && l.key.name.eq_ignore_ascii_case(name)
    }) else {
        return json_error(
            StatusCode::NOT_FOUND,
            format!("no schedule {name:?} of job {job:?} in project {project:?}"),
        );
    };
    if caller.role_in(&l.key.instance) < Some(Role::Full) {
        let what = if paused { "pausing" } else { "resuming" };
        return json_error(
            StatusCode::FORBIDDEN,
            format!("{what} a schedule needs Owner or Full"),
        );
    }
    let now = Utc::now();
    if let Err(e) = svc.store.set_schedule_paused(&l.key, paused, now).await {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    tracing::info!(project = %l.key.project_id, job = %l.key.job_id, schedule = %l.key.name,
        paused, user = caller.user.as_deref().unwrap_or(""), "schedule paused or resumed");
    let state = match svc.store.schedule_states(Some(&l.key.instance)).await {
        Ok(s) => s.into_iter().find(|s| s.key == l.key),
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    match line(svc, l, state.as_ref()).await {
        Ok(found) => axum::Json(found).into_response(),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
