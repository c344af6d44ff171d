//! What a handler reads from a request before its own work, and the one
//! error every handler returns: the answer format ([`AnswerFormat`]), the
//! caller ([`Caller`], refused in JSON), the caller of a request about a run
//! ([`RunCaller`], refused in the answer format with the run's ID), and
//! [`ApiError`], which renders the refusal.
//!
//! Extractors run in the order of a handler's arguments: each one goes after
//! the path and query extractors its handler had before it, so a request
//! wrong in two ways is refused for the same one as before.

use std::convert::Infallible;

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::auth::{self, AuthError, Caller};
use super::wire::{self, ExecJobAsyncResponse, Format, Reply};
use crate::server::Service;
use crate::store::{RunKey, RunRecord};

/// The format the caller wants the answer in: `Accept`, else the request's
/// `Content-Type`, else JSON.
#[derive(Debug, Clone, Copy)]
pub struct AnswerFormat(pub Format);

impl<S: Send + Sync> FromRequestParts<S> for AnswerFormat {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(AnswerFormat(wire::answer_format(&parts.headers)))
    }
}

/// The shape a refusal is written in.
#[derive(Debug)]
enum Shape {
    /// The v1 shape, `execJobAsyncResponse` with `started: false`, in the
    /// answer format, naming the run the request was about ("" if none).
    Refusal { format: Format, run_id: String },
    /// tidepool's own endpoints' shape: `{"error": …}` in JSON.
    Error,
}

/// Why a request was refused: the status, the reason, and the shape it is
/// written in. A 401 carries `WWW-Authenticate: Bearer`; a refusal the
/// caller may simply retry (a full queue, a store failure while accepting)
/// carries `Retry-After: 1`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    shape: Shape,
    retry_after: bool,
}

impl ApiError {
    /// A v1 refusal, in JSON and about no run until said otherwise.
    pub fn refusal(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            shape: Shape::Refusal {
                format: Format::Json,
                run_id: String::new(),
            },
            retry_after: false,
        }
    }

    /// An error of tidepool's own endpoints: `{"error": message}`.
    pub fn error(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            shape: Shape::Error,
            retry_after: false,
        }
    }

    /// A refusal for a caller whose credentials did not check out: 401, or
    /// 503 when the store could not tell.
    pub fn unauthenticated(e: AuthError) -> Self {
        let status = match e {
            AuthError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        };
        Self::refusal(status, e.to_string())
    }

    /// The same refusal, written in `format`.
    pub fn in_format(mut self, format: Format) -> Self {
        if let Shape::Refusal { format: f, .. } = &mut self.shape {
            *f = format;
        }
        self
    }

    /// The same refusal, naming the run `run_id` (as the caller sent it).
    pub fn for_run(mut self, run_id: impl Into<String>) -> Self {
        if let Shape::Refusal { run_id: r, .. } = &mut self.shape {
            *r = run_id.into();
        }
        self
    }

    /// The same refusal, telling the caller to try again in a second.
    pub fn retry_after(mut self) -> Self {
        self.retry_after = true;
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        Self::unauthenticated(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self.shape {
            Shape::Refusal { format, run_id } => {
                let mut reply = Reply::one(
                    self.status,
                    format,
                    &ExecJobAsyncResponse {
                        run_id,
                        started: false,
                        error: Some(self.message),
                    },
                );
                if self.status == StatusCode::UNAUTHORIZED {
                    reply = reply.header(header::WWW_AUTHENTICATE, "Bearer");
                }
                if self.retry_after {
                    reply = reply.header(header::RETRY_AFTER, "1");
                }
                reply.into_response()
            }
            Shape::Error => {
                let mut response =
                    (self.status, axum::Json(json!({"error": self.message}))).into_response();
                if self.retry_after {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                }
                response
            }
        }
    }
}

/// The caller, authenticated; refused (401, or 503 when the store fails)
/// in JSON, naming no run.
impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        Ok(auth::authenticate(app, &parts.headers).await?)
    }
}

/// The caller of a request about the run `{id}` of the path, with that ID
/// as sent and the answer format; refused in that format, naming the run.
pub struct RunCaller {
    /// Who is asking.
    pub caller: Caller,
    /// The run's ID as the path has it.
    pub id: String,
    /// The format the answer is written in.
    pub format: Format,
}

impl FromRequestParts<AppState> for RunCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        let format = wire::answer_format(&parts.headers);
        let Path(id) = Path::<String>::from_request_parts(parts, app)
            .await
            .map_err(|e| ApiError::refusal(e.status(), e.body_text()).in_format(format))?;
        match auth::authenticate(app, &parts.headers).await {
            Ok(caller) => Ok(RunCaller { caller, id, format }),
            Err(e) => Err(ApiError::from(e).in_format(format).for_run(id)),
        }
    }
}

impl RunCaller {
    /// A refusal about this run, in the answer format.
    pub fn refuse(&self, status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError::refusal(status, message)
            .in_format(self.format)
            .for_run(&self.id)
    }

    /// The run, in `instance` (default the caller's primary one), if the
    /// caller may see it; else the run is unknown (404): another instance's
    /// run answers like one that does not exist.
    pub async fn run(
        &self,
        svc: &Service,
        instance: Option<String>,
    ) -> Result<RunRecord, ApiError> {
        self.find(svc, instance)
            .await?
            .ok_or_else(|| self.refuse(StatusCode::NOT_FOUND, format!("unknown run {}", self.id)))
    }

    /// The run, as [`RunCaller::run`], or None; a store that cannot answer
    /// is a 503 (the client retries), never "unknown run".
    pub async fn find(
        &self,
        svc: &Service,
        instance: Option<String>,
    ) -> Result<Option<RunRecord>, ApiError> {
        let Ok(run_id) = uuid::Uuid::try_parse(self.id.trim()) else {
            return Ok(None);
        };
        let instance = instance.unwrap_or_else(|| self.caller.primary.clone());
        if !self.caller.can_see(&instance) {
            return Ok(None);
        }
        svc.store
            .run(&RunKey { instance, run_id })
            .await
            .map_err(|e| {
                self.refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                    .retry_after()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn rendered(e: ApiError) -> (StatusCode, axum::http::HeaderMap, String) {
        let r = e.into_response();
        let (parts, body) = r.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (
            parts.status,
            parts.headers,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn a_refusal_names_its_run_in_the_answer_format_with_its_headers() {
        let (status, headers, body) =
            rendered(ApiError::unauthenticated(AuthError::Missing).for_run("r1")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        assert!(headers.get(header::RETRY_AFTER).is_none());
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["runID"], "r1");
        assert_eq!(v["started"], false);
        assert_eq!(v["error"], AuthError::Missing.to_string());

        let (status, headers, body) = rendered(
            ApiError::refusal(StatusCode::SERVICE_UNAVAILABLE, "full")
                .in_format(Format::Xml)
                .retry_after(),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], "1");
        assert!(headers.get(header::WWW_AUTHENTICATE).is_none());
        assert!(
            body.starts_with("<execJobAsyncResponse ")
                && body.contains("<error>full</error><runID></runID><started>false</started>"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn tidepools_own_errors_are_json_objects_whatever_the_format() {
        let (status, _, body) = rendered(
            ApiError::error(StatusCode::BAD_REQUEST, "limit must be 1 to 500")
                .in_format(Format::Xml)
                .for_run("ignored"),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body, r#"{"error":"limit must be 1 to 500"}"#);
    }
}
