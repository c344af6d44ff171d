//! Shared by the request targets: a body through `parse_body` and the field rules,
//! as ExecuteJobAsync (no webhook) and ExecuteJob (webhook) read it.

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue};
use tidepool::api::wire::{self, ExecJobRequest};

/// Decodes `body` sent with `content_type`, and again with no `Content-Type`
/// (the server then guesses the format from the first byte).
pub fn decode(content_type: &str, body: &[u8]) {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
    check(&headers, body);
    check(&HeaderMap::new(), body);
}

fn check(headers: &HeaderMap, body: &[u8]) {
    let _ = wire::answer_format(headers);
    let Ok(fields) = wire::parse_body(headers, body) else {
        return;
    };
    for webhook in [false, true] {
        if let Ok(req) = ExecJobRequest::from_fields(&fields, webhook) {
            accepted_request_is_within_its_rules(&req, webhook);
        }
    }
}

/// What every accepted request promises the rest of the server.
fn accepted_request_is_within_its_rules(req: &ExecJobRequest, webhook: bool) {
    for id in [&req.project_id, &req.job_id] {
        assert!(!id.is_empty() && id.chars().count() <= 36, "{id:?}");
        assert_eq!(id.trim(), id);
    }
    assert!(req.logging_level <= 3);
    assert!(req.begin_at_row >= 1);
    if let Some(end) = req.end_after_row {
        assert!(end >= req.begin_at_row);
    }
    assert!((1..=tidepool::engine::MAX_THREADS).contains(&req.thread_count));
    // Only ExecuteJob takes a webhook URL.
    assert!(webhook || req.web_hook_url.is_none());
    if let Some(i) = &req.instance {
        assert!(!i.is_empty() && i.chars().count() <= 255);
    }
    assert_eq!(req.fingerprint().len(), 64);
}
