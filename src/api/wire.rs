//! The v1 wire types: request parsing (JSON, XML, form, field names in any
//! case, numbers in strings), the answers in JSON and in the WCF DataContract
//! XML shape, and content negotiation.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::engine::MAX_THREADS;
use crate::run::RunStatus;
/// The run's own types are the wire's: their serde form is what travels.
pub use crate::run::{
    JobResult as ResultsResponse, LogLine, RunResult as ExecJobResponse,
    Submission as ExecJobRequest, WEBHOOK_LOG_MAX, WebhookAttemptLine, timespan,
};

/// The DataContract namespace of the vendor's types.
pub const XML_NS: &str = "http://schemas.datacontract.org/2004/07/StarfishAPI.Controllers";
const XML_NS_I: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// A body format on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json`, `text/json`.
    Json,
    /// `application/xml`, `text/xml`.
    Xml,
    /// `application/x-www-form-urlencoded` (requests only).
    Form,
}

impl Format {
    fn of_media(media: &str) -> Option<Format> {
        let m = media
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match m.as_str() {
            "application/json" | "text/json" => Some(Format::Json),
            "application/xml" | "text/xml" => Some(Format::Xml),
            "application/x-www-form-urlencoded" => Some(Format::Form),
            _ => None,
        }
    }
}

/// The answer's format: `Accept` first, then the request's `Content-Type`, then JSON.
pub fn answer_format(headers: &HeaderMap) -> Format {
    if let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        // The first listed JSON or XML type wins; quality values are rarely sent by clients here.
        for media in accept.split(',') {
            match Format::of_media(media) {
                Some(Format::Json) => return Format::Json,
                Some(Format::Xml) => return Format::Xml,
                _ => {}
            }
        }
    }
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(Format::of_media)
    {
        Some(Format::Xml) => Format::Xml,
        _ => Format::Json,
    }
}

/// A field value as it arrived, before the field's rule reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum WireValue {
    /// JSON null, or XML `i:nil="true"`.
    Null,
    /// A JSON boolean.
    Bool(bool),
    /// A JSON number, as its text.
    Number(String),
    /// A string (every XML and form value).
    Text(String),
    /// A JSON array or object, or XML elements inside the field's element:
    /// ignored in an unknown field (as unknown fields are), refused in a known one.
    Nested,
}

/// Request fields by lower-cased name (names are read case-insensitively).
pub type FieldMap = BTreeMap<String, WireValue>;

/// Why a body could not be read; `unsupported` means 415.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BodyError {
    /// 415 rather than 400.
    pub unsupported: bool,
    /// What is wrong.
    pub message: String,
}

impl BodyError {
    fn bad(message: impl Into<String>) -> Self {
        BodyError {
            unsupported: false,
            message: message.into(),
        }
    }
}

/// Reads a request body as JSON, XML or form, by its `Content-Type`.
pub fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<FieldMap, BodyError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = if ct.is_empty() {
        // No Content-Type: guess from the first byte, as lenient clients expect.
        match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'<') => Format::Xml,
            Some(b'{') | None => Format::Json,
            _ => Format::Form,
        }
    } else {
        Format::of_media(ct).ok_or_else(|| BodyError {
            unsupported: true,
            message: format!(
                "unsupported media type {ct:?}: send application/json, text/json, application/xml, text/xml or application/x-www-form-urlencoded"
            ),
        })?
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BodyError::bad("the request body is empty"));
    }
    match format {
        Format::Json => parse_json(body),
        Format::Xml => parse_xml(body),
        Format::Form => parse_form(body),
    }
}

fn parse_json(body: &[u8]) -> Result<FieldMap, BodyError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| BodyError::bad(format!("malformed JSON: {e}")))?;
    let serde_json::Value::Object(obj) = v else {
        return Err(BodyError::bad("the JSON body must be an object"));
    };
    let mut map = FieldMap::new();
    for (k, v) in obj {
        let w = match v {
            serde_json::Value::Null => WireValue::Null,
            serde_json::Value::Bool(b) => WireValue::Bool(b),
            serde_json::Value::Number(n) => WireValue::Number(n.to_string()),
            serde_json::Value::String(s) => WireValue::Text(s),
            serde_json::Value::Array(_) | serde_json::Value::Object(_) => WireValue::Nested,
        };
        map.insert(k.to_ascii_lowercase(), w);
    }
    Ok(map)
}

fn parse_form(body: &[u8]) -> Result<FieldMap, BodyError> {
    Ok(form_pairs(body)?
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), WireValue::Text(v)))
        .collect())
}

/// The `name=value` pairs of an `application/x-www-form-urlencoded` body,
/// decoded (`+` is a space, `%XX` a byte). Unlike the usual decoders, bytes
/// that are not UTF-8 are refused, naming the field, instead of being
/// replaced with U+FFFD: a job must never see text the caller did not send.
pub fn form_pairs(body: &[u8]) -> Result<Vec<(String, String)>, BodyError> {
    let mut pairs = Vec::new();
    for part in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match part.iter().position(|&b| b == b'=') {
            Some(i) => (&part[..i], &part[i + 1..]),
            None => (part, &part[..0]),
        };
        let name = String::from_utf8(percent_decode(name))
            .map_err(|_| BodyError::bad("the body is not valid UTF-8 (in a field name)"))?;
        let value = String::from_utf8(percent_decode(value)).map_err(|e| {
            BodyError::bad(format!(
                "{name} is not valid UTF-8 (byte {} of its decoded value)",
                e.utf8_error().valid_up_to() + 1
            ))
        })?;
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// Form decoding of one name or value: `+` is a space, `%XX` a byte; a `%`
/// not followed by two hex digits stays as it is (as browsers send it).
fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Reads `<anyRoot><field>text</field>…</anyRoot>`: elements in any order, any
/// namespace prefix, `i:nil="true"` as null. DTDs and entities other than XML's
/// five are refused (no expansion ever happens).
fn parse_xml(body: &[u8]) -> Result<FieldMap, BodyError> {
    use quick_xml::events::Event;
    let text = std::str::from_utf8(body)
        .map_err(|e| BodyError::bad(format!("malformed XML: not UTF-8 ({e})")))?;
    let mut reader = quick_xml::Reader::from_str(text);
    let mut map = FieldMap::new();
    let mut depth = 0usize;
    // The field being read: name, text, nil, holds elements.
    let mut current: Option<(String, String, bool, bool)> = None;
    let at = |r: &quick_xml::Reader<&[u8]>| r.buffer_position();
    let bad = |pos: u64, msg: String| BodyError::bad(format!("malformed XML at byte {pos}: {msg}"));
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| bad(at(&reader), e.to_string()))?;
        match ev {
            Event::Eof => break,
            Event::DocType(_) => {
                return Err(bad(at(&reader), "a DTD is not allowed".into()));
            }
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) => {}
            Event::Empty(_) if depth == 0 => {} // an empty root: no fields
            Event::Start(_) if depth == 0 => depth = 1,
            Event::Start(e) => {
                if depth >= 2 {
                    // Elements inside a field: its value is nested (read no further).
                    if let Some(field) = current.as_mut() {
                        field.3 = true;
                    }
                    depth += 1;
                    continue;
                }
                depth = 2;
                current = Some((
                    local_name(e.name().as_ref()),
                    String::new(),
                    is_nil(&e),
                    false,
                ));
            }
            Event::Empty(e) => {
                if depth >= 2 {
                    if let Some(field) = current.as_mut() {
                        field.3 = true;
                    }
                    continue;
                }
                let v = if is_nil(&e) {
                    WireValue::Null
                } else {
                    WireValue::Text(String::new())
                };
                map.insert(local_name(e.name().as_ref()).to_ascii_lowercase(), v);
            }
            Event::Text(t) => {
                let s = t.into_inner();
                match current.as_mut() {
                    Some((_, buf, _, _)) => buf.push_str(&s),
                    None if s.trim().is_empty() => {}
                    None => return Err(bad(at(&reader), "text outside a field".into())),
                }
            }
            Event::CData(t) => {
                if let Some((_, buf, _, _)) = current.as_mut() {
                    buf.push_str(&t.into_inner());
                }
            }
            Event::GeneralRef(r) => {
                let name = r.as_ref().to_owned();
                let ch = match name.as_str() {
                    "amp" => Some('&'),
                    "lt" => Some('<'),
                    "gt" => Some('>'),
                    "quot" => Some('"'),
                    "apos" => Some('\''),
                    n if n.starts_with("#x") => u32::from_str_radix(&n[2..], 16)
                        .ok()
                        .and_then(char::from_u32),
                    n if n.starts_with('#') => n[1..].parse::<u32>().ok().and_then(char::from_u32),
                    _ => None,
                };
                let ch = ch.ok_or_else(|| bad(at(&reader), format!("unknown entity &{name};")))?;
                if let Some((_, buf, _, _)) = current.as_mut() {
                    buf.push(ch);
                }
            }
            Event::End(_) => {
                if depth == 2
                    && let Some((name, text, nil, nested)) = current.take()
                {
                    let v = if nested {
                        WireValue::Nested
                    } else if nil {
                        WireValue::Null
                    } else {
                        WireValue::Text(text)
                    };
                    map.insert(name.to_ascii_lowercase(), v);
                }
                depth = depth.saturating_sub(1);
            }
        }
    }
    Ok(map)
}

fn local_name(qname: &str) -> String {
    match qname.rsplit_once(':') {
        Some((_, local)) => local.to_owned(),
        None => qname.to_owned(),
    }
}

fn is_nil(e: &quick_xml::events::BytesStart) -> bool {
    e.attributes().flatten().any(|a| {
        local_name(a.key.as_ref()) == "nil" && a.value.as_ref().eq_ignore_ascii_case("true")
    })
}

fn text_of(v: &WireValue) -> Option<String> {
    match v {
        WireValue::Null => None,
        WireValue::Bool(b) => Some(b.to_string()),
        WireValue::Number(n) | WireValue::Text(n) => Some(n.clone()),
        WireValue::Nested => None,
    }
}

/// The largest row number a request may name: runs are stored with their
/// rows as SQLite integers, which are signed 64-bit.
pub const MAX_ROW: u64 = i64::MAX as u64;

/// Blank, which in a request means "not given": empty, or nothing but
/// ASCII spaces, tabs and line breaks.
fn is_blank(t: &str) -> bool {
    t.bytes().all(|b| b.is_ascii_whitespace())
}

/// The value of a number written in ASCII digits only (leading zeros allowed):
/// `None` if anything else is in it, `Some(None)` if it is past `u64`.
fn digits_value(t: &str) -> Option<Option<u64>> {
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(t.bytes().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    }))
}

/// The value of a field as a whole number: in a string, ASCII digits only
/// (`None` for anything else; `Some(None)` past `u64`). A JSON number is a
/// number however it is written, so `36.0` and `3.6e1` are 36 (as JSON Schema
/// counts them integers), and `36.5` is not whole.
fn whole_value(v: &WireValue) -> Option<Option<u64>> {
    match v {
        WireValue::Text(t) => digits_value(t),
        WireValue::Number(t) => digits_value(t).or_else(|| {
            let x: f64 = t.parse().ok()?;
            // 2^64 is the first float past u64.
            let whole = x.is_finite() && x.fract() == 0.0 && x >= 0.0;
            whole.then_some((x < 18_446_744_073_709_551_616.0).then_some(x as u64))
        }),
        WireValue::Null | WireValue::Bool(_) | WireValue::Nested => None,
    }
}

/// A value for an error message, cut short: the whole of a long one would
/// only echo the body back.
fn shown(t: &str) -> String {
    const MAX: usize = 40;
    if t.chars().count() <= MAX {
        format!("{t:?}")
    } else {
        format!("{:?}…", t.chars().take(MAX).collect::<String>())
    }
}

/// A counted field (`beginAtRow`, `endAfterRow`, `threadCount`): a whole
/// number from 1 to `max` in digits only, in a string or a JSON number; blank
/// or null means not given. " 5", "+5", "5.0" and "1e3" are refused, not guessed at.
fn positive(name: &str, v: Option<&WireValue>, max: u64, errors: &mut Vec<String>) -> Option<u64> {
    let v = v?;
    let t = match v {
        WireValue::Null | WireValue::Nested => return None,
        WireValue::Text(t) if is_blank(t) => return None,
        WireValue::Text(t) | WireValue::Number(t) => t.as_str(),
        WireValue::Bool(b) => {
            if *b {
                "true"
            } else {
                "false"
            }
        }
    };
    match whole_value(v) {
        Some(Some(n)) if (1..=max).contains(&n) => Some(n),
        _ => {
            errors.push(format!(
                "{name} must be a positive integer from 1 to {max} in digits only (no sign, spaces or decimal point), not {}",
                shown(t)
            ));
            None
        }
    }
}

/// `loggingLevel`: 0 to 3 in digits only, in a string or a JSON number; above
/// 3 means 3 (as the vendor documents); blank or null means 0.
fn logging_level(v: Option<&WireValue>, errors: &mut Vec<String>) -> u8 {
    let (v, t) = match v {
        None | Some(WireValue::Null) => return 0,
        Some(WireValue::Text(t)) if is_blank(t) => return 0,
        Some(v) => (v, text_of(v).unwrap_or_default()),
    };
    match whole_value(v) {
        Some(n) => n.map_or(3, |n| n.min(3)) as u8,
        None => {
            errors.push(format!(
                "loggingLevel must be 0 to 3 (above 3 means 3), a whole number in digits only, not {}",
                shown(&t)
            ));
            0
        }
    }
}

/// The fields of a request that break their rules, each said in a sentence
/// that names the field (all of them, not only the first).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct FieldErrors(pub Vec<String>);

impl ExecJobRequest {
    /// Checks every field's rule; all failures are reported together, by field name.
    /// `webhook` says whether `webHookURL` is part of this request type.
    pub fn from_fields(f: &FieldMap, webhook: bool) -> Result<Self, FieldErrors> {
        let mut errors = Vec::new();
        let mut known = vec![
            "runID",
            "projectID",
            "jobID",
            "chainJobs",
            "loggingLevel",
            "argument",
            "beginAtRow",
            "endAfterRow",
            "threadCount",
            "instance",
        ];
        if webhook {
            known.push("webHookURL");
        }
        for name in known {
            if f.get(&name.to_ascii_lowercase()) == Some(&WireValue::Nested) {
                errors.push(format!(
                    "{name} must be a string, number or boolean, not an array, object or elements"
                ));
            }
        }
        // A nested value was reported above; the rules below see it as absent.
        let get = |n: &str| {
            f.get(&n.to_ascii_lowercase())
                .filter(|v| **v != WireValue::Nested)
        };
        let required = |name: &str, max: usize, errors: &mut Vec<String>| -> String {
            match get(name).and_then(text_of) {
                None => {
                    errors.push(format!("{name} is required"));
                    String::new()
                }
                Some(s) if s.trim().is_empty() => {
                    errors.push(format!("{name} is required"));
                    String::new()
                }
                Some(s) if s.chars().count() > max => {
                    errors.push(format!("{name} is longer than {max} characters"));
                    String::new()
                }
                Some(s) => s.trim().to_owned(),
            }
        };
        let run_text = required("runID", 36, &mut errors);
        let run_id = if run_text.is_empty() {
            uuid::Uuid::nil()
        } else {
            match uuid::Uuid::try_parse(&run_text) {
                Ok(u) if run_text.len() == 36 => u,
                _ => {
                    errors.push(format!(
                        "runID must be a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx), not {run_text:?}"
                    ));
                    uuid::Uuid::nil()
                }
            }
        };
        let project_id = required("projectID", 36, &mut errors);
        let job_id = required("jobID", 36, &mut errors);
        let chain_jobs = match get("chainJobs") {
            None | Some(WireValue::Null) => false,
            Some(WireValue::Bool(b)) => *b,
            Some(v) => {
                let t = text_of(v).unwrap_or_default();
                match t
                    .trim_matches(|c: char| c.is_ascii_whitespace())
                    .to_ascii_lowercase()
                    .as_str()
                {
                    "" | "false" => false,
                    "true" => true,
                    _ => {
                        errors.push(format!("chainJobs must be true or false, not {t:?}"));
                        false
                    }
                }
            }
        };
        let logging_level = logging_level(get("loggingLevel"), &mut errors);
        let argument = get("argument").and_then(text_of).unwrap_or_default();
        let begin_at_row =
            positive("beginAtRow", get("beginAtRow"), MAX_ROW, &mut errors).unwrap_or(1);
        let end_after_row = positive("endAfterRow", get("endAfterRow"), MAX_ROW, &mut errors);
        if let Some(end) = end_after_row
            && end < begin_at_row
        {
            errors.push(format!(
                "endAfterRow ({end}) must not be less than beginAtRow ({begin_at_row})"
            ));
        }
        let thread_count = positive(
            "threadCount",
            get("threadCount"),
            MAX_THREADS as u64,
            &mut errors,
        )
        .unwrap_or(1);
        let web_hook_url = if webhook {
            match get("webHookURL").and_then(text_of) {
                Some(u) if !is_blank(&u) => {
                    let u = u.trim_matches(|c: char| c.is_ascii_whitespace()).to_owned();
                    match reqwest::Url::parse(&u) {
                        Ok(url)
                            if matches!(url.scheme(), "http" | "https") && url.host().is_some() =>
                        {
                            Some(u)
                        }
                        _ => {
                            errors.push(format!(
                                "webHookURL must be an absolute http or https URL, not {u:?}"
                            ));
                            None
                        }
                    }
                }
                _ => None,
            }
        } else {
            None
        };
        let instance = match get("instance").and_then(text_of) {
            Some(i) if i.chars().count() > 255 => {
                errors.push("instance is longer than 255 characters".into());
                None
            }
            Some(i) if !i.trim().is_empty() => Some(i.trim().to_owned()),
            _ => None,
        };
        if !errors.is_empty() {
            return Err(FieldErrors(errors));
        }
        Ok(ExecJobRequest {
            run_id,
            project_id,
            job_id,
            chain_jobs,
            logging_level,
            argument,
            begin_at_row,
            end_after_row,
            thread_count: thread_count as usize,
            web_hook_url,
            instance,
            resume_at_row: None,
            continues: None,
        })
    }
}

/// The patterns of the request fields, as the OpenAPI document states them.
/// Each says exactly what the rules in [`ExecJobRequest::from_fields`] accept
/// (a unit test holds both to the same answers), so a client that follows the
/// document is never refused and a value outside it never slips in.
pub mod patterns {
    /// `runID`: a GUID in its 36-character form, any case.
    pub const GUID: &str =
        "^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$";
    /// `projectID`, `jobID`: something other than white space and control
    /// characters (which XML cannot carry, so an XML body could not either).
    pub const NOT_BLANK: &str = r"[^\s\x00-\x1f\x7f\uFFFE\uFFFF]";
    /// `beginAtRow`, `endAfterRow`: blank, or 1 to 2^63-1 in digits.
    pub const ROW: &str = r"^[ \t\n\f\r]*$|^0*([1-9][0-9]{0,17}|[1-8][0-9]{18}|9[0-1][0-9]{17}|92[0-1][0-9]{16}|922[0-2][0-9]{15}|9223[0-2][0-9]{14}|92233[0-6][0-9]{13}|922337[0-1][0-9]{12}|92233720[0-2][0-9]{10}|922337203[0-5][0-9]{9}|9223372036[0-7][0-9]{8}|92233720368[0-4][0-9]{7}|922337203685[0-3][0-9]{6}|9223372036854[0-6][0-9]{5}|92233720368547[0-6][0-9]{4}|922337203685477[0-4][0-9]{3}|9223372036854775[0-7][0-9]{2}|922337203685477580[0-6]|9223372036854775807)$";
    /// `threadCount`: blank, or 1 to 64 in digits.
    pub const THREADS: &str = r"^[ \t\n\f\r]*$|^0*([1-9]|[1-5][0-9]|6[0-4])$";
    /// `loggingLevel`: blank, or digits (above 3 means 3).
    pub const LEVEL: &str = r"^[ \t\n\f\r]*$|^[0-9]+$";
    /// `chainJobs` in a string: blank, true or false, any case.
    pub const BOOL: &str = r"^[ \t\n\f\r]*([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee])?[ \t\n\f\r]*$";
    /// `webHookURL`: blank, or a plain http(s) URL. The server takes any
    /// absolute http or https URL; this is the part of that a fuzzer can be
    /// told of without suggesting strings no URL parser accepts.
    pub const WEBHOOK_URL: &str = r"^[ \t\n\f\r]*$|^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z][A-Za-z0-9]*(\.[A-Za-z][A-Za-z0-9]*)*(:[1-9][0-9]{0,3})?(/[A-Za-z0-9._~/?=&-]*)?$";
}

/// The schema of `execJobAsyncRequest` (`webhook`) or `execJobRequest`: the
/// fields as they travel. In JSON (`text` false) a field may also be a number,
/// boolean or null where the rules take one; in XML and forms (`text`) every
/// value is text.
fn exec_request_schema(webhook: bool, text: bool) -> serde_json::Value {
    use serde_json::{Value, json};
    // The text form of a field, and in JSON its other forms too.
    let field = |description: &str, string: Value, json_alternatives: &[Value]| {
        if text || json_alternatives.is_empty() {
            let mut v = string;
            v["description"] = description.into();
            v
        } else {
            let mut any = vec![string];
            any.extend_from_slice(json_alternatives);
            json!({"description": description, "anyOf": any})
        }
    };
    let null = json!({"type": "null"});
    let counted = |pattern: &str, max: u64, what: &str| {
        field(
            &format!(
                "{what}: a whole number from 1 to {max} in digits only (in JSON a number is taken too); blank means not given"
            ),
            json!({"type": "string", "pattern": pattern}),
            &[
                json!({"type": "integer", "minimum": 1, "maximum": max}),
                null.clone(),
            ],
        )
    };
    let mut properties = json!({
        "runID": {
            "type": "string", "minLength": 36, "maxLength": 36, "pattern": patterns::GUID,
            "description": "the caller's GUID for the run (any case; the same run either way)",
            "example": "0b5bd1c9-7c2e-4f2e-9a51-3c4f7d0e8a11",
        },
        "projectID": {
            "type": "string", "minLength": 1, "maxLength": 36, "pattern": patterns::NOT_BLANK,
            "description": "the project", "example": "demo",
        },
        "jobID": {
            "type": "string", "minLength": 1, "maxLength": 36, "pattern": patterns::NOT_BLANK,
            "description": "the job", "example": "contacts",
        },
        "chainJobs": field(
            "run the job's chain: true or false in any case (in JSON a boolean); default false",
            json!({"type": "string", "pattern": patterns::BOOL}),
            &[json!({"type": "boolean"}), null.clone()],
        ),
        "loggingLevel": field(
            "0 none, 1 low, 2 medium, 3 high, in digits only; above 3 means 3; negative is an error; default 0",
            json!({"type": "string", "pattern": patterns::LEVEL}),
            &[json!({"type": "integer", "minimum": 0, "maximum": u64::MAX}), null.clone()],
        ),
        "argument": field(
            "@@VAR:JobArgument@@ in the job (in JSON a number or boolean is taken as its text)",
            json!({"type": "string"}),
            &[json!({"type": "number"}), json!({"type": "boolean"}), null.clone()],
        ),
        "beginAtRow": counted(patterns::ROW, MAX_ROW, "the first origin row processed (1-based); default 1"),
        "endAfterRow": counted(patterns::ROW, MAX_ROW, "the last origin row processed, inclusive, not less than beginAtRow; default all rows"),
        "threadCount": counted(patterns::THREADS, MAX_THREADS as u64, "writers into the destination; default 1"),
        "instance": field(
            "the instance to run in; default the caller's primary instance",
            json!({"type": "string", "maxLength": 255}),
            std::slice::from_ref(&null),
        ),
    });
    if webhook {
        properties["webHookURL"] = field(
            "an absolute http or https URL: the run's execJobResponse is POSTed there when it ends",
            json!({"type": "string", "pattern": patterns::WEBHOOK_URL, "example": "https://hooks.example.com/tidepool"}),
            &[null],
        );
    }
    let name = if webhook {
        "execJobAsyncRequest"
    } else {
        "execJobRequest"
    };
    json!({
        "type": "object",
        "description": "Field names are read in any case; unknown fields are ignored; every rule broken is reported in `error`.",
        "required": ["runID", "projectID", "jobID"],
        "properties": properties,
        "xml": {"name": name, "namespace": XML_NS},
    })
}

/// A schema written as JSON, read into the document's types. The JSON is a
/// constant of this file, which a unit test reads, so it always parses.
fn schema_from_json(
    v: serde_json::Value,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    serde_json::from_value(v).expect("the request schemas of wire.rs are valid OpenAPI")
}

/// A request schema of the OpenAPI document: its type, component name, and
/// the arguments of [`exec_request_schema`].
macro_rules! request_doc {
    ($(#[$doc:meta])* $ty:ident, $name:literal, webhook: $webhook:literal, text: $text:literal) => {
        $(#[$doc])*
        pub struct $ty;

        impl utoipa::PartialSchema for $ty {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                schema_from_json(exec_request_schema($webhook, $text))
            }
        }

        impl utoipa::ToSchema for $ty {
            fn name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }
        }
    };
}

request_doc!(
    /// `execJobAsyncRequest` in JSON.
    ExecJobAsyncRequestDoc, "execJobAsyncRequest", webhook: true, text: false
);
request_doc!(
    /// `execJobAsyncRequest` in XML or a form.
    ExecJobAsyncRequestTextDoc, "execJobAsyncRequestText", webhook: true, text: true
);
request_doc!(
    /// `execJobRequest` (ExecuteJob: no `webHookURL`) in JSON.
    ExecJobRequestDoc, "execJobRequest", webhook: false, text: false
);
request_doc!(
    /// `execJobRequest` in XML or a form.
    ExecJobRequestTextDoc, "execJobRequestText", webhook: false, text: true
);

/// The form of `POST /token` in the OpenAPI document.
pub struct TokenRequestDoc;

impl utoipa::PartialSchema for TokenRequestDoc {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        schema_from_json(serde_json::json!({
            "type": "object",
            "required": ["grant_type", "username", "password"],
            "properties": {
                "grant_type": {"type": "string", "enum": ["password"], "description": "the OAuth2 password grant (read in any case)"},
                "username": {"type": "string", "description": "the user"},
                "password": {"type": "string", "format": "password", "description": "the user's password"},
            },
        }))
    }
}

impl utoipa::ToSchema for TokenRequestDoc {
    fn name() -> std::borrow::Cow<'static, str> {
        "tokenRequest".into()
    }
}

/// The answer of `POST /token`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct TokenAnswerDoc {
    /// `tpt_…`: send it as `Authorization: Bearer …`.
    access_token: String,
    /// Always `bearer`.
    token_type: String,
    /// Seconds until it expires.
    expires_in: u64,
}

/// A refusal of `POST /token` (RFC 6749 §5.2): `invalid_request`,
/// `unsupported_grant_type`, `invalid_grant`, `temporarily_unavailable`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct OAuthErrorDoc {
    /// The OAuth2 error code.
    error: String,
    /// What is wrong.
    error_description: String,
}

/// The answer of `POST /v1/Runs/{id}/cancel`.
#[derive(utoipa::ToSchema)]
#[schema(as = cancelResponse)]
#[allow(dead_code)]
pub struct CancelAnswerDoc {
    /// The run.
    #[schema(rename = "runID")]
    run_id: String,
    /// Cancelled if it was queued; still Running if it stops between batches.
    status: RunStatus,
}

/// One job of a project in `GET /v1/Projects`.
#[derive(utoipa::ToSchema)]
#[schema(as = jobInfo)]
#[allow(dead_code)]
pub struct JobInfoDoc {
    #[schema(rename = "jobID")]
    job_id: String,
    name: Option<String>,
    /// The first job its `next` names.
    next: Option<String>,
    /// The jobs that start, in parallel, after it completes in a chained run.
    #[schema(rename = "nextJobs")]
    next_jobs: Vec<String>,
    /// The jobs that must all have completed before it starts in a chained run.
    needs: Vec<String>,
    /// How many stages it has.
    stages: u64,
}

/// One project in `GET /v1/Projects`.
#[derive(utoipa::ToSchema)]
#[schema(as = projectInfo)]
#[allow(dead_code)]
pub struct ProjectInfoDoc {
    #[schema(rename = "projectID")]
    project_id: String,
    name: Option<String>,
    /// The instance that owns it.
    instance: String,
    jobs: Vec<JobInfoDoc>,
}

/// A refusal outside the v1 shapes (`GET /v1/Projects/{id}`).
#[derive(utoipa::ToSchema)]
#[schema(as = errorResponse)]
#[allow(dead_code)]
pub struct ErrorDoc {
    /// What is wrong.
    error: String,
}

/// The answer of `GET /healthz`.
#[derive(utoipa::ToSchema)]
#[schema(as = healthResponse)]
#[allow(dead_code)]
pub struct HealthDoc {
    /// `ok`, or `unavailable` (503) when the store cannot be read.
    status: String,
    /// Runs waiting.
    queued: Option<u64>,
    /// Runs executing.
    running: Option<u64>,
    /// The server is shutting down.
    stopping: Option<bool>,
    /// Why it is unavailable.
    error: Option<String>,
}

/// ISO 8601 with offset and 7 fractional digits, as .NET writes a `DateTime`.
pub use crate::value::datetime_text as datetime;

/// `execJobAsyncResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = execJobAsyncResponse)]
pub struct ExecJobAsyncResponse {
    /// The run's ID as the caller sent it (empty if it could not be read).
    #[serde(rename = "runID")]
    pub run_id: String,
    /// The run is durably recorded and will execute.
    pub started: bool,
    /// Why not.
    pub error: Option<String>,
}

/// Writes a type in the DataContract XML shape: children in ordinal order.
pub trait ToXml {
    /// The element name of the type (the root, or an array item).
    const NAME: &'static str;
    /// Writes the child elements (already in the right order).
    fn children(&self, out: &mut XmlOut);
}

/// An XML text being written.
#[derive(Default)]
pub struct XmlOut(String);

impl XmlOut {
    /// `<name>text</name>`.
    pub fn text(&mut self, name: &str, v: &str) {
        let _ = write!(self.0, "<{name}>{}</{name}>", quick_xml::escape::escape(v));
    }
    /// A string that may be null: `<name i:nil="true"/>`.
    pub fn opt(&mut self, name: &str, v: Option<&str>) {
        match v {
            Some(v) => self.text(name, v),
            None => {
                let _ = write!(self.0, "<{name} i:nil=\"true\"/>");
            }
        }
    }
    /// A number or boolean.
    pub fn plain(&mut self, name: &str, v: impl std::fmt::Display) {
        let _ = write!(self.0, "<{name}>{v}</{name}>");
    }
    /// A list of items, wrapped in `<name>`.
    pub fn list<T: ToXml>(&mut self, name: &str, items: &[T]) {
        let _ = write!(self.0, "<{name}>");
        for i in items {
            self.item(i);
        }
        let _ = write!(self.0, "</{name}>");
    }
    fn item<T: ToXml>(&mut self, v: &T) {
        let _ = write!(self.0, "<{}>", T::NAME);
        v.children(self);
        let _ = write!(self.0, "</{}>", T::NAME);
    }
}

/// A whole XML document with `root` as its root element.
pub fn xml_document(root: &str, f: impl FnOnce(&mut XmlOut)) -> String {
    let mut out = XmlOut::default();
    let _ = write!(out.0, "<{root} xmlns:i=\"{XML_NS_I}\" xmlns=\"{XML_NS}\">");
    f(&mut out);
    let _ = write!(out.0, "</{root}>");
    out.0
}

impl ToXml for ExecJobAsyncResponse {
    const NAME: &'static str = "execJobAsyncResponse";
    fn children(&self, o: &mut XmlOut) {
        o.opt("error", self.error.as_deref());
        o.text("runID", &self.run_id);
        o.plain("started", self.started);
    }
}

impl ToXml for ResultsResponse {
    const NAME: &'static str = "resultsResponse";
    fn children(&self, o: &mut XmlOut) {
        o.plain("deletes", self.counters.deletes);
        o.plain("errors", self.counters.errors);
        o.plain("ignores", self.counters.ignores);
        o.plain("inserts", self.counters.inserts);
        o.text("jobID", &self.job_id);
        o.text("runID", &self.run_id);
        o.text("runTime", &self.run_time);
        o.plain("skips", self.counters.skips);
        o.text("startTime", &self.start_time);
        o.plain("status", self.status);
        o.plain("totalRows", self.counters.total_rows);
        o.plain("updates", self.counters.updates);
    }
}

impl ToXml for LogLine {
    const NAME: &'static str = "logEntry";
    fn children(&self, o: &mut XmlOut) {
        o.text("jobID", &self.job_id);
        o.text("level", &self.level);
        o.text("message", &self.message);
        match self.row {
            Some(r) => o.plain("row", r),
            None => o.opt("row", None),
        }
        o.text("time", &self.time);
    }
}

impl ToXml for WebhookAttemptLine {
    const NAME: &'static str = "webhookAttempt";
    fn children(&self, o: &mut XmlOut) {
        o.plain("attempt", self.attempt);
        o.opt("error", self.error.as_deref());
        match self.status_code {
            Some(s) => o.plain("statusCode", s),
            None => o.opt("statusCode", None),
        }
        o.text("time", &self.time);
    }
}

impl ToXml for ExecJobResponse {
    const NAME: &'static str = "execJobResponse";
    fn children(&self, o: &mut XmlOut) {
        o.plain("deletes", self.counters.deletes);
        o.opt("error", self.error.as_deref());
        o.plain("errors", self.counters.errors);
        o.plain("ignores", self.counters.ignores);
        o.plain("inserts", self.counters.inserts);
        o.list("log", &self.log);
        o.list("results", &self.results);
        o.opt("returnValue", self.return_value.as_deref());
        o.text("runID", &self.run_id);
        o.text("runTime", &self.run_time);
        o.plain("skips", self.counters.skips);
        o.text("startTime", &self.start_time);
        o.plain("status", self.status);
        o.plain("totalRows", self.counters.total_rows);
        o.plain("updates", self.counters.updates);
        if let Some(a) = &self.webhook_attempts {
            o.list("webhookAttempts", a);
        }
    }
}

/// A collection answer (`ArrayOf…` in XML, an array in JSON).
pub struct Many<T>(pub Vec<T>);

/// An answer in the negotiated format.
pub struct Reply {
    /// The HTTP status.
    pub status: StatusCode,
    /// The negotiated format.
    pub format: Format,
    json: String,
    xml: String,
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl Reply {
    /// One object.
    pub fn one<T: Serialize + ToXml>(status: StatusCode, format: Format, v: &T) -> Self {
        Reply {
            status,
            format,
            json: if format == Format::Xml {
                String::new()
            } else {
                serde_json::to_string(v).unwrap_or_default()
            },
            xml: if format == Format::Xml {
                xml_document(T::NAME, |o| v.children(o))
            } else {
                String::new()
            },
            headers: Vec::new(),
        }
    }

    /// A collection.
    pub fn many<T: Serialize + ToXml>(status: StatusCode, format: Format, v: &Many<T>) -> Self {
        Reply {
            status,
            format,
            json: if format == Format::Xml {
                String::new()
            } else {
                serde_json::to_string(&v.0).unwrap_or_default()
            },
            xml: if format == Format::Xml {
                xml_document(&format!("ArrayOf{}", T::NAME), |o| {
                    for i in &v.0 {
                        o.item(i);
                    }
                })
            } else {
                String::new()
            },
            headers: Vec::new(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: header::HeaderName, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.push((name, v));
        }
        self
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let (ct, body) = match self.format {
            Format::Xml => ("application/xml; charset=utf-8", self.xml),
            _ => ("application/json; charset=utf-8", self.json),
        };
        let mut resp = (self.status, [(header::CONTENT_TYPE, ct)], body).into_response();
        for (k, v) in self.headers {
            resp.headers_mut().append(k, v);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::RunStatus;
    use chrono::DateTime;
    use serde_json::json;
    use std::time::Duration;

    #[test]
    fn webhook_bodies_carry_a_capped_log_that_says_where_the_rest_is() {
        let start = DateTime::parse_from_rfc3339("2024-04-20T11:06:49-05:00").unwrap();
        let mut r = ExecJobResponse::ended_without_report(
            "r1",
            RunStatus::Complete,
            &start,
            Vec::new(),
            "",
        );
        let line = |n: usize| LogLine {
            time: "t".into(),
            level: "High".into(),
            job_id: "j".into(),
            row: Some(n as u64),
            message: format!("row {n}"),
        };
        r.log = (1..=1500).map(line).collect();
        let w = r.for_webhook();
        assert_eq!(w.log.len(), WEBHOOK_LOG_MAX);
        assert_eq!(w.log[998].message, "row 999");
        assert_eq!(
            w.log[999].message,
            "501 more log lines: GET /v1/Runs/r1 has the whole log"
        );
        assert_eq!(r.log.len(), 1500, "the answer itself keeps the whole log");
        r.log.truncate(WEBHOOK_LOG_MAX);
        assert_eq!(r.for_webhook().log.len(), WEBHOOK_LOG_MAX);
        assert_eq!(r.for_webhook().log[999].message, "row 1000");
    }

    fn fields(pairs: &[(&str, WireValue)]) -> FieldMap {
        pairs
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect()
    }

    #[test]
    fn form_decoding_keeps_stray_percents_and_refuses_bytes_that_are_not_utf8() {
        let pairs = form_pairs(b"a=1+2%2B3&&b=%&c=%4&d=%zz%41&e").unwrap();
        let want = [
            ("a", "1 2+3"),
            ("b", "%"),
            ("c", "%4"),
            ("d", "%zzA"),
            ("e", ""),
        ];
        assert_eq!(
            pairs,
            want.map(|(k, v)| (k.to_owned(), v.to_owned())).to_vec()
        );
        assert_eq!(
            form_pairs(b"x=%C3%A9%FF").unwrap_err().message,
            "x is not valid UTF-8 (byte 3 of its decoded value)"
        );
    }

    /// Whether the server's rules take `value` in `field` (the rest valid).
    fn accepts(field: &str, value: &str) -> bool {
        let mut f = fields(&[
            (
                "runID",
                WireValue::Text("0b5bd1c9-7c2e-4f2e-9a51-3c4f7d0e8a11".into()),
            ),
            ("projectID", WireValue::Text("demo".into())),
            ("jobID", WireValue::Text("contacts".into())),
        ]);
        f.insert(field.to_ascii_lowercase(), WireValue::Text(value.into()));
        ExecJobRequest::from_fields(&f, true).is_ok()
    }

    #[test]
    fn the_documented_patterns_say_exactly_what_the_rules_accept() {
        let mut samples: Vec<String> = [
            "",
            " ",
            "\t\r\n\x0c",
            "\x0b",
            "\u{a0}",
            "0",
            "000",
            "1",
            "3",
            "4",
            "007",
            "64",
            "065",
            "65",
            " 5",
            "5 ",
            "+5",
            "-5",
            "-0",
            "5.0",
            "1e3",
            "0x10",
            "5\n",
            "\n5",
            "٥",
            "five",
            "true",
            "True",
            " FALSE\t",
            "tru",
            "yes",
            "null",
            "9223372036854775806",
            "9223372036854775807",
            "09223372036854775807",
            "9223372036854775808",
            "9223372036854775810",
            "9300000000000000000",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999999",
            "0b5bd1c9-7c2e-4f2e-9a51-3c4f7d0e8a11",
            "0B5BD1C9-7C2E-4F2E-9A51-3C4F7D0E8A11",
            "{0b5bd1c9-7c2e-4f2e-9a51-3c4f7d0e8a11}",
            "0b5bd1c97c2e4f2e9a513c4f7d0e8a11",
            " 0b5bd1c9-7c2e-4f2e-9a51-3c4f7d0e8a1",
            "0b5bd1c9-7c2e-4f2e-9a51-3c4f7d0e8a1g",
            "demo",
            " demo",
            "d",
        ]
        .map(String::from)
        .to_vec();
        // Every number up to 100, and a spread of larger ones either side of 2^63.
        samples.extend((0..=100).map(|n| n.to_string()));
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            samples.push(x.to_string());
            samples.push((x >> (x % 64)).to_string());
        }
        // The field, its pattern, and its maxLength.
        let rules = [
            ("runID", patterns::GUID, 36),
            ("projectID", patterns::NOT_BLANK, 36),
            ("jobID", patterns::NOT_BLANK, 36),
            ("beginAtRow", patterns::ROW, usize::MAX),
            ("endAfterRow", patterns::ROW, usize::MAX),
            ("threadCount", patterns::THREADS, usize::MAX),
            ("loggingLevel", patterns::LEVEL, usize::MAX),
            ("chainJobs", patterns::BOOL, usize::MAX),
        ];
        for (field, pattern, max_len) in rules {
            let re = regex::Regex::new(pattern).unwrap();
            for v in &samples {
                assert_eq!(
                    re.is_match(v) && v.chars().count() <= max_len,
                    accepts(field, v),
                    "{field} = {v:?}: the pattern and the rules disagree"
                );
            }
        }
        // webHookURL: the pattern is a part of what the rules take.
        let re = regex::Regex::new(patterns::WEBHOOK_URL).unwrap();
        for v in [
            "",
            " ",
            "http://a",
            "HTTPS://hooks.example.com:8443/a/b?c=d&e=f",
            "http://x1.y2/~p_q.r-s",
        ] {
            assert!(re.is_match(v) && accepts("webHookURL", v), "{v:?}");
        }
        for v in ["ftp://a", "http://", "http//a", "a", "http://a b"] {
            assert!(!re.is_match(v) && !accepts("webHookURL", v), "{v:?}");
        }
    }

    #[test]
    fn the_request_schemas_read_as_openapi() {
        for (webhook, text) in [(true, false), (true, true), (false, false), (false, true)] {
            let schema = schema_from_json(exec_request_schema(webhook, text));
            let back = serde_json::to_value(&schema).unwrap();
            assert_eq!(
                back["properties"]["runID"]["pattern"],
                patterns::GUID,
                "{back}"
            );
            let row = &back["properties"]["beginAtRow"];
            if text {
                assert_eq!(row["pattern"], patterns::ROW, "{row}");
            } else {
                // Integers past 2^53 keep every digit.
                assert_eq!(row["anyOf"][1]["maximum"], json!(MAX_ROW), "{row}");
            }
            assert_eq!(back["properties"].get("webHookURL").is_some(), webhook);
        }
    }

    #[test]
    fn timespans_and_datetimes_look_like_dotnet() {
        assert_eq!(
            timespan(Duration::from_nanos(1_234_567_890)),
            "00:00:01.2345678"
        );
        assert_eq!(timespan(Duration::from_secs(90_061)), "1.01:01:01.0000000");
        let t = DateTime::parse_from_rfc3339("2024-04-20T11:06:49.6384073-05:00").unwrap();
        assert_eq!(datetime(&t), "2024-04-20T11:06:49.6384073-05:00");
    }

    #[test]
    fn request_rules_report_every_field() {
        let f = fields(&[
            ("runid", WireValue::Text("not-a-guid".into())),
            ("JobID", WireValue::Text("x".repeat(37))),
            ("beginAtRow", WireValue::Text("0".into())),
            ("threadCount", WireValue::Number("2".into())),
            ("loggingLevel", WireValue::Number("-1".into())),
            ("webHookURL", WireValue::Text("ftp://x".into())),
        ]);
        let err = ExecJobRequest::from_fields(&f, true)
            .unwrap_err()
            .to_string();
        for part in [
            "runID must be a GUID",
            "projectID is required",
            "jobID is longer than 36 characters",
            "beginAtRow must be a positive integer",
            "loggingLevel must be 0 to 3",
            "webHookURL must be an absolute http or https URL",
        ] {
            assert!(err.contains(part), "{part:?} not in {err}");
        }
    }

    #[test]
    fn request_defaults_and_string_numbers() {
        let f = fields(&[
            (
                "RUNID",
                WireValue::Text("0B5BD1C9-7C2E-4F2E-9A51-3C4F7D0E8A11".into()),
            ),
            ("projectid", WireValue::Text("demo".into())),
            ("jobid", WireValue::Text("contacts".into())),
            ("chainjobs", WireValue::Text("True".into())),
            ("loggingLevel", WireValue::Number("5".into())),
            ("beginAtRow", WireValue::Text("11".into())),
            ("endAfterRow", WireValue::Number("20".into())),
            ("threadCount", WireValue::Text("".into())),
        ]);
        let r = ExecJobRequest::from_fields(&f, true).unwrap();
        assert_eq!(r.run_id.to_string(), "0b5bd1c9-7c2e-4f2e-9a51-3c4f7d0e8a11");
        assert!(r.chain_jobs);
        assert_eq!(
            (
                r.logging_level,
                r.begin_at_row,
                r.end_after_row,
                r.thread_count
            ),
            (3, 11, Some(20), 1)
        );
    }

    #[test]
    fn xml_bodies_read_in_any_order_with_nil_and_refuse_dtds() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
        let body = br#"<execJobAsyncRequest xmlns:i="http://www.w3.org/2001/XMLSchema-instance" xmlns="http://schemas.datacontract.org/2004/07/StarfishAPI.Controllers">
  <jobID>contacts</jobID><argument>a &amp; b &#x41;</argument><webHookURL i:nil="true"/><projectID>demo</projectID>
</execJobAsyncRequest>"#;
        let m = parse_body(&h, body).unwrap();
        assert_eq!(m["jobid"], WireValue::Text("contacts".into()));
        assert_eq!(m["argument"], WireValue::Text("a & b A".into()));
        assert_eq!(m["webhookurl"], WireValue::Null);
        let dtd =
            br#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e "boom">]><x><jobID>&e;</jobID></x>"#;
        assert!(parse_body(&h, dtd).unwrap_err().message.contains("DTD"));
        let ent = b"<x><jobID>&e;</jobID></x>";
        assert!(
            parse_body(&h, ent)
                .unwrap_err()
                .message
                .contains("unknown entity")
        );
    }

    #[test]
    fn xml_answers_have_the_datacontract_shape() {
        let r = ExecJobAsyncResponse {
            run_id: "r1".into(),
            started: false,
            error: None,
        };
        assert_eq!(
            xml_document(ExecJobAsyncResponse::NAME, |o| r.children(o)),
            "<execJobAsyncResponse xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns=\"http://schemas.datacontract.org/2004/07/StarfishAPI.Controllers\"><error i:nil=\"true\"/><runID>r1</runID><started>false</started></execJobAsyncResponse>"
        );
    }

    #[test]
    fn negotiation_prefers_accept_then_content_type() {
        let mut h = HeaderMap::new();
        assert_eq!(answer_format(&h), Format::Json);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml"),
        );
        assert_eq!(answer_format(&h), Format::Xml);
        h.insert(header::ACCEPT, HeaderValue::from_static("text/json, */*"));
        assert_eq!(answer_format(&h), Format::Json);
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert_eq!(answer_format(&h), Format::Xml);
    }
}
