//! Projects for the console: those that failed to load (with their
//! problems) beside the loaded ones, and `POST /v1/Projects/reload`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::auth::Caller;
use super::runs::{json_caller, json_error};
use crate::server::Service;
use crate::server::reload::FailedProject;
use crate::store::Role;

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
pub async fn reload(State(svc): State<Arc<Service>>, headers: HeaderMap) -> Response {
    let caller = match json_caller(&svc, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
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
