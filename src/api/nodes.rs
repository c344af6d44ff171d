//! `GET /v1/Nodes`: the nodes sharing the store, and whether each is alive.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::auth::Caller;
use super::runs::json_error;
use crate::store::NodeRecord;

/// One node as `GET /v1/Nodes` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeLine {
    /// `--node-id`, default `host:port`.
    pub node_id: String,
    /// Where it listens.
    pub address: String,
    /// Its tidepool version.
    pub version: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Its last heartbeat (RFC 3339, the store's clock).
    pub heartbeat_at: String,
    /// Seconds since that heartbeat.
    pub silent_secs: f64,
    /// Runs executing on it at its last heartbeat.
    pub running: u32,
    /// Runs it executes at once.
    pub workers: u32,
    /// `active`, `draining` (stopping: claims nothing, hands its runs back),
    /// `stopped` (shut down cleanly) or `lost` (no heartbeat for a lease: its
    /// runs are taken over by the others).
    pub state: String,
    /// Whether this is the node that answered.
    pub this_node: bool,
}

/// The answer of `GET /v1/Nodes`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeList {
    /// Every node the store knows, by id.
    pub nodes: Vec<NodeLine>,
    /// The lease in seconds: a node silent this long is lost.
    pub lease_secs: u64,
}

/// What state a node is in, from its record and the lease.
pub fn node_state(n: &NodeRecord, lease_secs: u64) -> &'static str {
    if n.stopped {
        "stopped"
    } else if n.silent_secs > lease_secs as f64 {
        "lost"
    } else if n.info.draining {
        "draining"
    } else {
        "active"
    }
}

/// Lists the nodes sharing the store.
#[utoipa::path(get, path = "/v1/Nodes", tag = "tidepool", operation_id = "Nodes",
    security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "every node the store knows", body = NodeList),
        (status = 401, description = "missing or bad credentials", body = super::wire::ExecJobAsyncResponse),
        (status = 403, description = "the caller holds no role", body = super::wire::ErrorDoc),
        (status = 503, description = "the store cannot be read", body = super::wire::ErrorDoc),
    ))]
pub async fn nodes(State(svc): State<AppState>, caller: Caller) -> Response {
    let holds_a_role =
        caller.instances().is_none_or(|l| !l.is_empty()) || caller.metrics_scope().is_some();
    if !holds_a_role {
        return json_error(
            StatusCode::FORBIDDEN,
            "listing nodes needs a role in an instance",
        );
    }
    let records = match svc.store.nodes().await {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let lease_secs = svc.lease().as_secs();
    let nodes = records
        .iter()
        .map(|n| NodeLine {
            node_id: n.info.node_id.clone(),
            address: n.info.address.clone(),
            version: n.info.version.clone(),
            started_at: n.info.started_at.to_rfc3339(),
            heartbeat_at: n.heartbeat_at.to_rfc3339(),
            silent_secs: n.silent_secs,
            running: n.info.running,
            workers: n.info.workers,
            state: node_state(n, lease_secs).to_owned(),
            this_node: n.info.node_id == svc.node_id(),
        })
        .collect();
    axum::Json(NodeList { nodes, lease_secs }).into_response()
}
