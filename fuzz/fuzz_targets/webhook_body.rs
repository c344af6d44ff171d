//! `POST /v1/Webhook?projectid=…&jobid=…`: the query (before the first
//! newline of the input) as axum's `Query` reads it, the body (after it) as
//! the job argument, then the field rules, as the handler does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool::api::wire::{ExecJobRequest, FieldMap, WireValue};

fuzz_target!(|data: &[u8]| {
    let (query, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &data[..0]),
    };
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    let Ok(params) = serde_urlencoded::from_str::<Vec<(String, String)>>(query) else {
        return;
    };
    let Ok(argument) = String::from_utf8(body.to_vec()) else {
        return;
    };
    let param = |n: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut fields = FieldMap::new();
    fields.insert(
        "runid".into(),
        WireValue::Text(uuid::Uuid::nil().to_string()),
    );
    for name in ["projectid", "jobid", "instance"] {
        if let Some(v) = param(name) {
            fields.insert(name.into(), WireValue::Text(v));
        }
    }
    fields.insert("argument".into(), WireValue::Text(argument.clone()));
    if let Ok(req) = ExecJobRequest::from_fields(&fields, false) {
        // The body reaches the job whole, as its argument.
        assert_eq!(req.argument, argument);
        assert!(!req.project_id.is_empty() && !req.job_id.is_empty());
        assert!(req.web_hook_url.is_none());
    }
});
