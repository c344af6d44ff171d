//! Console sessions: `POST /console/login` sets an HttpOnly, SameSite=Strict
//! cookie holding a bearer token from the same token store as `POST /token`;
//! `authenticate` accepts it. A state-changing request authenticated by that
//! cookie must carry `X-Tidepool-Csrf` (a header no cross-site form can send).

/// The console's pages (the embedded single-page app at `/`).
pub mod pages;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::auth::{self, Caller};
use super::runs::{json_caller, json_error};
use crate::server::Service;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "tidepool_session";
/// The header a state-changing request authenticated by the cookie must carry.
pub const CSRF_HEADER: &str = "x-tidepool-csrf";

/// The session token in the request's cookies, if any.
pub fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Refuses a state-changing request that only the session cookie
/// authenticates and that lacks the CSRF header (403).
pub async fn csrf_guard(req: Request, next: Next) -> Response {
    let h = req.headers();
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let by_cookie_only = session_token(h).is_some()
        && !h.contains_key(header::AUTHORIZATION)
        && !h.contains_key("x-api-key");
    // Logging in sets the cookie; a stale one must not stop it.
    let login = req.uri().path() == "/console/login";
    if !safe && by_cookie_only && !login && !h.contains_key(CSRF_HEADER) {
        return json_error(
            StatusCode::FORBIDDEN,
            format!(
                "a request authenticated by the console's session cookie must carry the header {CSRF_HEADER}: 1"
            ),
        );
    }
    next.run(req).await
}

/// Who the caller is: `{user, roles: {instance: role}, open}`.
fn me_json(caller: &Caller, open: bool) -> serde_json::Value {
    let roles: serde_json::Map<String, serde_json::Value> = caller
        .instances()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| {
            let role = caller.role_in(&i)?;
            Some((i, json!(role)))
        })
        .collect();
    json!({"user": caller.user, "roles": roles, "open": open})
}

#[derive(serde::Deserialize)]
struct Login {
    #[serde(alias = "username")]
    user: Option<String>,
    password: Option<String>,
}

fn session_cookie(token: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("tidepool_session=; Max-Age=0"))
}

/// Logs in with a user name and password (JSON or form); sets the session cookie.
#[utoipa::path(post, path = "/console/login", tag = "console",
    request_body(content = String, description = "{user, password} as JSON or a form"),
    responses((status = 200, description = "{user, roles, open}; Set-Cookie: tidepool_session (HttpOnly, SameSite=Strict)"),
        (status = 400, description = "{error}: malformed body"),
        (status = 401, description = "{error}: wrong user name or password")))]
pub async fn login(State(svc): State<Arc<Service>>, headers: HeaderMap, body: Body) -> Response {
    if svc.open {
        return axum::Json(me_json(&Caller::open(), true)).into_response();
    }
    let Ok(bytes) = super::read_body(&svc, body).await else {
        return json_error(StatusCode::PAYLOAD_TOO_LARGE, "the body is too large");
    };
    let form_like = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    let parsed: Result<Login, String> = if form_like {
        serde_urlencoded::from_bytes(&bytes).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    };
    let (user, password) = match parsed {
        Ok(Login {
            user: Some(u),
            password: Some(p),
        }) => (u, p),
        Ok(_) => return json_error(StatusCode::BAD_REQUEST, "user and password are required"),
        Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("malformed body: {e}")),
    };
    let record = match svc.store.user(&user).await {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let hash = record.as_ref().map(|r| r.password_hash.clone());
    let ok = tokio::task::spawn_blocking(move || {
        hash.is_some_and(|h| auth::verify_password(&password, &h))
    })
    .await
    .unwrap_or(false);
    if !ok {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "the user name or password is incorrect",
        );
    }
    let token = auth::new_secret("tpt_");
    let lifetime = svc.config.token_lifetime_secs;
    let expires = chrono::Local::now().fixed_offset() + chrono::Duration::seconds(lifetime as i64);
    if let Err(e) = svc
        .store
        .put_token(&auth::digest(&token), &user, expires)
        .await
    {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    let mut h = HeaderMap::new();
    h.insert(header::SET_COOKIE, session_cookie(&token, lifetime));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let caller = match json_caller(&svc, &{
        let mut with = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
            with.insert(header::AUTHORIZATION, v);
        }
        with
    })
    .await
    {
        Ok(c) => c,
        Err(r) => return r,
    };
    (h, axum::Json(me_json(&caller, false))).into_response()
}

/// Ends the session: its token stops working and the cookie is cleared.
#[utoipa::path(post, path = "/console/logout", tag = "console",
    responses((status = 204, description = "logged out; the cookie is cleared")))]
pub async fn logout(State(svc): State<Arc<Service>>, headers: HeaderMap) -> Response {
    if let Some(token) = session_token(&headers)
        && let Ok(caller) = auth::authenticate(&svc, &headers).await
        && let Some(user) = caller.user
    {
        // Expired now: the store answers for it no more (a cached
        // credential lasts a few seconds at most).
        let now = chrono::Local::now().fixed_offset();
        let _ = svc.store.put_token(&auth::digest(&token), &user, now).await;
    }
    let mut h = HeaderMap::new();
    h.insert(header::SET_COOKIE, session_cookie("", 0));
    (StatusCode::NO_CONTENT, h).into_response()
}

/// Who the caller is.
#[utoipa::path(get, path = "/console/me", tag = "console",
    responses((status = 200, description = "{user, roles: {instance: role}, open}"),
        (status = 401, description = "not logged in")))]
pub async fn me(State(svc): State<Arc<Service>>, headers: HeaderMap) -> Response {
    match json_caller(&svc, &headers).await {
        Ok(c) => axum::Json(me_json(&c, svc.open)).into_response(),
        Err(r) => r,
    }
}
