//! Console sessions: `POST /console/login` sets an HttpOnly, SameSite=Strict
//! cookie holding a bearer token from the same token store as `POST /token`;
//! `authenticate` accepts it. A state-changing request authenticated by that
//! cookie must carry `X-Tidepool-Csrf` (a header no cross-site form can send).

/// The console's pages (the embedded single-page app at `/`).
pub mod pages;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::auth::{self, Caller};
use super::runs::json_error;

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
    user: Option<String>,
    /// `user` by the name `POST /token` uses; `user` wins if both are given.
    username: Option<String>,
    password: Option<String>,
}

/// The body of `POST /console/login` in the OpenAPI document.
pub struct LoginRequestDoc;

impl utoipa::PartialSchema for LoginRequestDoc {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let schema = json!({
            "type": "object",
            "description": "`user` (or `username`) and `password`; unknown fields are ignored.",
            "required": ["user", "password"],
            "properties": {
                "user": {"type": "string", "description": "the user", "example": "ops"},
                "username": {"type": "string", "description": "the user, by the name POST /token uses (`user` wins)"},
                "password": {"type": "string", "format": "password", "description": "the user's password"},
            },
        });
        serde_json::from_value(schema).expect("the login request schema is valid OpenAPI")
    }
}

impl utoipa::ToSchema for LoginRequestDoc {
    fn name() -> std::borrow::Cow<'static, str> {
        "loginRequest".into()
    }
}

/// `GET /console/me` and `POST /console/login` answer who the caller is.
#[derive(utoipa::ToSchema)]
#[schema(as = consoleMe)]
#[allow(dead_code)]
pub struct MeDoc {
    /// The user; null in open mode.
    user: Option<String>,
    /// The caller's role in each of its instances: Metrics, ReadOnly, Full or Owner.
    roles: std::collections::HashMap<String, String>,
    /// The server takes no credentials (no users configured).
    open: bool,
}

fn session_cookie(token: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("tidepool_session=; Max-Age=0"))
}

/// Logs in with a user name and password (JSON or form); sets the session
/// cookie. Failed attempts count against the same limits as `POST /token`.
#[utoipa::path(post, path = "/console/login", tag = "console", operation_id = "ConsoleLogin",
    request_body(content(
        (LoginRequestDoc = "application/json"),
        (LoginRequestDoc = "application/x-www-form-urlencoded"))),
    responses((status = 200, description = "logged in (Set-Cookie: tidepool_session, HttpOnly, SameSite=Strict); in open mode, at once", body = MeDoc),
        (status = 400, description = "the body does not parse, or user or password is missing", body = super::wire::ErrorDoc),
        (status = 401, description = "wrong user name or password", body = super::wire::ErrorDoc),
        (status = 413, description = "the body is too large", body = super::wire::ErrorDoc),
        (status = 429, description = "too many failed attempts for the user or from the address, or too many password checks at once: see Retry-After", body = super::wire::ErrorDoc),
        (status = 503, description = "the store failed", body = super::wire::ErrorDoc)))]
pub async fn login(
    State(svc): State<AppState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
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
            ..
        })
        | Ok(Login {
            user: None,
            username: Some(u),
            password: Some(p),
        }) => (u, p),
        Ok(_) => return json_error(StatusCode::BAD_REQUEST, "user and password are required"),
        Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("malformed body: {e}")),
    };
    let peer = peer.map(|axum::Extension(info)| info.0.ip());
    match auth::check_login(&svc, &user, password, peer).await {
        auth::LoginOutcome::Granted => {}
        auth::LoginOutcome::Denied => {
            return json_error(
                StatusCode::UNAUTHORIZED,
                "the user name or password is incorrect",
            );
        }
        auth::LoginOutcome::Throttled(left) => {
            let secs = (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1);
            return too_many(
                format!(
                    "too many failed attempts for this user or from this address: try again in {secs} s"
                ),
                secs,
            );
        }
        auth::LoginOutcome::Busy => {
            return too_many(
                "too many password checks at once: try again shortly".into(),
                1,
            );
        }
        auth::LoginOutcome::Store(e) => {
            return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
    }
    let token = auth::new_secret("tpt_");
    let lifetime = svc.config.token_lifetime_secs;
    let expires = chrono::Local::now().fixed_offset() + chrono::Duration::seconds(lifetime as i64);
    if let Err(e) = svc
        .store
        .put_token(
            &auth::digest(&token),
            &user,
            expires,
            svc.config.max_tokens_per_user,
        )
        .await
    {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    let mut h = HeaderMap::new();
    h.insert(header::SET_COOKIE, session_cookie(&token, lifetime));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let caller = match auth::authenticate(&svc, &{
        let mut with = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
            with.insert(header::AUTHORIZATION, v);
        }
        with
    })
    .await
    {
        Ok(c) => c,
        Err(e) => return super::ApiError::from(e).into_response(),
    };
    (h, axum::Json(me_json(&caller, false))).into_response()
}

/// A 429 with Retry-After.
fn too_many(msg: String, retry_after_secs: u64) -> Response {
    let mut r = json_error(StatusCode::TOO_MANY_REQUESTS, msg);
    r.headers_mut()
        .insert(header::RETRY_AFTER, retry_after_secs.into());
    r
}

/// Ends the session: its token stops working and the cookie is cleared.
/// It needs no credentials: without a session there is nothing to end.
#[utoipa::path(post, path = "/console/logout", tag = "console", operation_id = "ConsoleLogout",
    responses((status = 204, description = "logged out; the cookie is cleared"),
        (status = 403, description = "authenticated by the session cookie alone, without the X-Tidepool-Csrf header", body = super::wire::ErrorDoc)))]
pub async fn logout(State(svc): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = session_token(&headers)
        && let Ok(caller) = auth::authenticate(&svc, &headers).await
        && let Some(user) = caller.user
    {
        // Expired now: the store answers for it no more (a cached
        // credential lasts a few seconds at most).
        let now = chrono::Local::now().fixed_offset();
        let keep = svc.config.max_tokens_per_user;
        let _ = svc
            .store
            .put_token(&auth::digest(&token), &user, now, keep)
            .await;
    }
    let mut h = HeaderMap::new();
    h.insert(header::SET_COOKIE, session_cookie("", 0));
    (StatusCode::NO_CONTENT, h).into_response()
}

/// Who the caller is.
#[utoipa::path(get, path = "/console/me", tag = "console", operation_id = "ConsoleMe",
    security(("bearer" = []), ("apiKey" = [])),
    responses((status = 200, description = "the caller, its roles, and whether the server is open", body = MeDoc),
        (status = 401, description = "not logged in: missing or bad credentials", body = super::wire::ExecJobAsyncResponse),
        (status = 503, description = "the store failed", body = super::wire::ExecJobAsyncResponse)))]
pub async fn me(State(svc): State<AppState>, caller: Caller) -> axum::Json<serde_json::Value> {
    axum::Json(me_json(&caller, svc.open))
}
