//! HTTP JSON APIs: an origin that pages through records, a destination that
//! sends one request per row and maps the answer's status to the row's outcome.
//!
//! The connection is one resource of an API. As an origin, `origin.query` is
//! the path and query string (tokens are URL-encoded), `records` points into
//! each answer (JSON pointer), and pagination follows a next link, a page
//! number or a cursor. As a destination, a stage's `table` is the collection
//! path: insert is `POST {table}`; update, delete and update/insert address
//! `{table}/{match value}` with `PATCH`/`DELETE`/`PUT`; skip/insert asks
//! `GET {table}/{match value}` first. 429 and 5xx answers are retried,
//! honouring `Retry-After`. Scripts' `lookup()` asks `GET {table}?{criteria}`
//! and takes the first record (of the first page) that matches them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde::Deserialize;

use super::{
    ALL_ACTIONS, Capabilities, Connector, ConnectorError, Destination, DestinationRequest, Flow,
    Lookup, Origin, OriginInput, OriginRequest, RowAction, RowRead, StagePlan, WriteResult,
};
use crate::connector::StageAction;
use crate::template::{Part, Template, Token};
use crate::value::{Row, Value};

/// `kind = "http"`: a JSON resource of an HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// The API's base, e.g. `https://api.example.com/v2`.
    pub base_url: String,
    /// Headers sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Authentication.
    pub auth: Option<HttpAuth>,
    /// Where the records are in an answer (JSON pointer, e.g. `/data`); the
    /// answer itself (an array) by default.
    #[serde(default)]
    pub records: String,
    /// How the origin pages.
    #[serde(default)]
    pub pagination: Pagination,
    /// Seconds before a request gives up.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Retries of a request answered 429 or 5xx (or not answered).
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Insert stages send each batch as one `POST {table}` with a JSON array
    /// (a 2xx answer inserts every row; any other fails the batch, which is
    /// then sent again one row per request, as an array of one).
    #[serde(default)]
    pub batch: bool,
}

fn default_timeout() -> u64 {
    30
}
fn default_retries() -> u32 {
    3
}

/// How requests authenticate.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HttpAuth {
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// HTTP basic.
    Basic {
        /// User.
        user: String,
        /// Password.
        password: String,
    },
    /// A key in a header of its own.
    Header {
        /// The header.
        name: String,
        /// Its value.
        value: String,
    },
}

/// How an origin pages through results.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum Pagination {
    /// One request.
    #[default]
    None,
    /// The answer holds the next page's URL at `pointer` (absent or null ends).
    NextLink {
        /// JSON pointer, e.g. `/links/next`.
        pointer: String,
    },
    /// A page-number query parameter, from `start`, until a page has no records.
    Page {
        /// The parameter, e.g. `page`.
        param: String,
        /// The first page's number.
        #[serde(default = "one")]
        start: u64,
    },
    /// The answer holds a cursor at `pointer`, sent back as `param` (empty ends).
    Cursor {
        /// The query parameter.
        param: String,
        /// JSON pointer to the next cursor.
        pointer: String,
    },
}

fn one() -> u64 {
    1
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl HttpConfig {
    fn client(&self) -> Result<Client, ConnectorError> {
        Client::builder()
            .timeout(Duration::from_secs(self.timeout_secs))
            .user_agent(concat!("tidepool/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConnectorError::Open {
                what: format!("http client for {}", self.base_url),
                reason: e.to_string(),
                cause: Some(e.into()),
            })
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            return path.to_owned();
        }
        format!(
            "{}/{}",
            self.base_url.trim_end_matches('/'),
            path.trim_start_matches('/')
        )
    }

    fn prepare(&self, mut rb: RequestBuilder) -> RequestBuilder {
        for (k, v) in &self.headers {
            rb = rb.header(k, v);
        }
        match &self.auth {
            Some(HttpAuth::Bearer(t)) => rb.bearer_auth(t),
            Some(HttpAuth::Basic { user, password }) => rb.basic_auth(user, Some(password)),
            Some(HttpAuth::Header { name, value }) => rb.header(name, value),
            None => rb,
        }
    }

    /// Sends, retrying 429/5xx and failures to connect, honouring Retry-After.
    fn send(&self, make: &dyn Fn() -> RequestBuilder) -> Result<Response, reqwest::Error> {
        let mut attempt = 0;
        loop {
            let res = self.prepare(make()).send();
            let retry_in = match &res {
                Ok(r)
                    if r.status() == StatusCode::TOO_MANY_REQUESTS
                        || r.status().is_server_error() =>
                {
                    let after = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    Some(Duration::from_secs(
                        after.unwrap_or(1 << attempt.min(5)).min(60),
                    ))
                }
                Ok(_) => None,
                Err(e) if e.is_connect() || e.is_timeout() => {
                    Some(Duration::from_secs(1 << attempt.min(5)))
                }
                Err(_) => None,
            };
            match retry_in {
                Some(wait) if attempt < self.max_retries => {
                    std::thread::sleep(wait);
                    attempt += 1;
                }
                _ => return res,
            }
        }
    }
}

impl HttpConfig {
    /// `r`, unless it says the API is not taking requests (429 or 503 after
    /// every retry).
    fn check_available(&self, what: &str, r: Response) -> Result<Response, Unavailable> {
        let status = r.status();
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            return Err(Unavailable(format!(
                "{what}: HTTP {status} after {} retries",
                self.max_retries
            )));
        }
        Ok(r)
    }
}

impl Connector for HttpConfig {
    fn target(&self) -> super::Target<'_> {
        super::Target::Address(&self.base_url)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            actions: ALL_ACTIONS,
            origin: OriginInput::Query,
            needs_table: true,
            max_writers: None,
            batch_size: 1000,
        }
    }

    fn open_origin(&self, req: &OriginRequest) -> Result<Box<dyn Origin>, ConnectorError> {
        let query = req.query.unwrap_or("");
        let template = Template::parse(query).map_err(|e| ConnectorError::schema(e.to_string()))?;
        let mut path = String::new();
        for part in &template.parts {
            match part {
                Part::Literal(s) => path.push_str(s),
                Part::Token(Token::Variable(name)) => {
                    let v = req
                        .variables
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(name))
                        .map(|(_, v)| v.to_text())
                        .unwrap_or_default();
                    path.push_str(&encode(&v));
                }
                Part::Token(t) => {
                    return Err(ConnectorError::schema(format!(
                        "{t} cannot be used in an origin request: only @@VAR:…@@ tokens are known before rows are read"
                    )));
                }
            }
        }
        Ok(Box::new(HttpOrigin {
            config: self.clone(),
            client: self.client()?,
            first: self.url(&path),
            columns: req.fields.to_vec(),
        }))
    }

    fn open_lookup(&self, _base_dir: &Path) -> Result<Box<dyn Lookup>, ConnectorError> {
        Ok(Box::new(HttpLookup {
            config: self.clone(),
            client: self.client()?,
        }))
    }

    fn open_destination(
        &self,
        req: &DestinationRequest,
    ) -> Result<Box<dyn Destination>, ConnectorError> {
        if req
            .stages
            .iter()
            .any(|s| s.action != StageAction::Insert && !s.columns.iter().any(|c| c.is_match))
        {
            return Err(ConnectorError::Schema(
                "an http stage other than insert needs a match field (the resource's id)".into(),
            ));
        }
        Ok(Box::new(HttpDestination {
            config: self.clone(),
            client: self.client()?,
            stages: req.stages.to_vec(),
            preview: req.preview,
            down: None,
        }))
    }
}

/// Answers `lookup(connection, path, field, criteria)` with
/// `GET {path}?{criteria}`. The API is trusted to filter, but the records are
/// checked against the criteria again, since an API may ignore a parameter it
/// does not know; only the first page is read.
struct HttpLookup {
    config: HttpConfig,
    client: Client,
}

/// A record's `field`, by exact name or else ignoring case.
fn field_of<'a>(
    record: &'a serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Option<&'a serde_json::Value> {
    record.get(field).or_else(|| {
        record
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(field))
            .map(|(_, v)| v)
    })
}

impl Lookup for HttpLookup {
    fn find(
        &mut self,
        table: &str,
        field: &str,
        criteria: &[(String, Value)],
    ) -> Result<Option<Value>, ConnectorError> {
        let mut url = self.config.url(table);
        for (k, v) in criteria.iter().filter(|(_, v)| !v.is_null()) {
            url = with_param(&url, k, &v.to_text());
        }
        let resp = self
            .config
            .send(&|| self.client.get(&url))
            .map_err(|e| ConnectorError::failed_caused(format!("lookup GET {url}: {e}"), e))?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            let body = resp.text().unwrap_or_default();
            return Err(ConnectorError::failed(format!(
                "lookup GET {url}: HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            )));
        }
        let answer: serde_json::Value = resp.json().map_err(|e| {
            ConnectorError::failed(format!("lookup GET {url}: the answer is not JSON: {e}"))
        })?;
        let records = match pointer(&answer, &self.config.records) {
            Some(serde_json::Value::Array(a)) => a.iter().collect(),
            Some(one @ serde_json::Value::Object(_)) => vec![one],
            _ => Vec::new(),
        };
        let matches = |r: &serde_json::Map<String, serde_json::Value>| {
            criteria.iter().all(|(k, want)| {
                let got = field_of(r, k).cloned().map(Value::from_json);
                match got {
                    None | Some(Value::Null) => want.is_null(),
                    Some(got) => !want.is_null() && got.to_text() == want.to_text(),
                }
            })
        };
        Ok(records
            .into_iter()
            .filter_map(serde_json::Value::as_object)
            .find(|r| matches(r))
            .map(|r| {
                field_of(r, field)
                    .cloned()
                    .map(Value::from_json)
                    .unwrap_or(Value::Null)
            }))
    }
}

struct HttpOrigin {
    config: HttpConfig,
    client: Client,
    first: String,
    columns: Vec<String>,
}

fn pointer<'a>(v: &'a serde_json::Value, p: &str) -> Option<&'a serde_json::Value> {
    if p.is_empty() { Some(v) } else { v.pointer(p) }
}

impl HttpOrigin {
    fn fetch(&self, url: &str) -> Result<serde_json::Value, ConnectorError> {
        let resp = self
            .config
            .send(&|| self.client.get(url))
            .map_err(|e| ConnectorError::failed_caused(format!("GET {url}: {e}"), e))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().unwrap_or_default();
            return Err(ConnectorError::failed(format!(
                "GET {url}: HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            )));
        }
        resp.json()
            .map_err(|e| ConnectorError::failed_caused(format!("GET {url}: the answer is not JSON: {e}"), e))
    }

    fn row(&self, v: serde_json::Value) -> RowRead {
        let serde_json::Value::Object(mut map) = v else {
            return Err("the record is not a JSON object".into());
        };
        Ok(Row::from_values(
            self.columns
                .iter()
                .map(|c| {
                    let v = match map.remove(c) {
                        Some(v) => Some(v),
                        None => {
                            let key = map.keys().find(|k| k.eq_ignore_ascii_case(c)).cloned();
                            key.and_then(|k| map.remove(&k))
                        }
                    };
                    v.map(Value::from_json).unwrap_or(Value::Null)
                })
                .collect(),
        ))
    }
}

fn with_param(url: &str, name: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{}={}", encode(name), encode(value))
}

impl Origin for HttpOrigin {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn read(&mut self, sink: &mut dyn FnMut(RowRead) -> Flow) -> Result<(), ConnectorError> {
        let mut url = match &self.config.pagination {
            Pagination::Page { param, start } => with_param(&self.first, param, &start.to_string()),
            _ => self.first.clone(),
        };
        let mut page = match &self.config.pagination {
            Pagination::Page { start, .. } => *start,
            _ => 1,
        };
        for _ in 0..1_000_000 {
            let answer = self.fetch(&url)?;
            let records = match pointer(&answer, &self.config.records) {
                Some(serde_json::Value::Array(a)) => a.clone(),
                Some(serde_json::Value::Null) | None => Vec::new(),
                Some(_) => {
                    return Err(ConnectorError::failed(format!(
                        "GET {url}: {:?} in the answer is not an array",
                        self.config.records
                    )));
                }
            };
            let empty = records.is_empty();
            for r in records {
                if sink(self.row(r)) == Flow::Stop {
                    return Ok(());
                }
            }
            url = match &self.config.pagination {
                Pagination::None => return Ok(()),
                Pagination::NextLink { pointer: p } => match pointer(&answer, p) {
                    Some(serde_json::Value::String(next)) if !next.is_empty() => {
                        self.config.url(next)
                    }
                    _ => return Ok(()),
                },
                Pagination::Page { param, .. } => {
                    if empty {
                        return Ok(());
                    }
                    page += 1;
                    with_param(&self.first, param, &page.to_string())
                }
                Pagination::Cursor { param, pointer: p } => match pointer(&answer, p) {
                    Some(serde_json::Value::String(c)) if !c.is_empty() => {
                        with_param(&self.first, param, c)
                    }
                    Some(serde_json::Value::Number(n)) => {
                        with_param(&self.first, param, &n.to_string())
                    }
                    _ => return Ok(()),
                },
            };
        }
        Err(ConnectorError::Io(
            "pagination did not end after a million pages".into(),
        ))
    }
}

struct HttpDestination {
    config: HttpConfig,
    client: Client,
    stages: Vec<StagePlan>,
    preview: bool,
    /// Why the API stopped taking requests (no answer, or 429/503 after
    /// every retry): later rows are not sent and the job stops.
    down: Option<String>,
}

/// A request that failed with the API itself, not with the row: no answer,
/// or "too many requests" / "unavailable" after every retry.
struct Unavailable(String);

impl HttpDestination {
    fn body(plan: &StagePlan, row: &[Value], inserting: bool) -> serde_json::Value {
        let mut obj = serde_json::Map::new();
        for (c, v) in plan.columns.iter().zip(row) {
            // An update sends neither insert-only fields nor the key (it is in the URL).
            let wanted = if inserting {
                !c.update_only
            } else {
                !c.insert_only && !c.is_match
            };
            let skip = !wanted || (plan.omit_blank && v.is_blank());
            if !skip {
                obj.insert(c.name.clone(), v.to_json());
            }
        }
        serde_json::Value::Object(obj)
    }

    fn item_url(&self, plan: &StagePlan, row: &[Value]) -> String {
        let mut path = plan.table.clone().unwrap_or_default();
        for (c, v) in plan.columns.iter().zip(row) {
            if c.is_match {
                path = format!("{}/{}", path.trim_end_matches('/'), encode(&v.to_text()));
            }
        }
        self.config.url(&path)
    }

    /// Sends one row's request(s): the row's outcome, or [`Unavailable`].
    fn one(&self, plan: &StagePlan, row: &[Value]) -> Result<WriteResult, Unavailable> {
        let collection = self.config.url(plan.table.as_deref().unwrap_or(""));
        let item = self.item_url(plan, row);
        let send = |method: reqwest::Method, url: &str, body: Option<serde_json::Value>| {
            let what = format!("{method} {url}");
            let r = self
                .config
                .send(&|| {
                    let rb = self.client.request(method.clone(), url);
                    match &body {
                        Some(b) => rb.json(b),
                        None => rb,
                    }
                })
                .map_err(|e| Unavailable(format!("{what}: {e}")))?;
            self.config.check_available(&what, r)
        };
        let fail = |what: &str, r: Response| -> String {
            let status = r.status();
            let text = r.text().unwrap_or_default();
            format!(
                "{what}: HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            )
        };
        if self.preview && plan.action != StageAction::SkipInsert {
            // A preview reads nothing back and changes nothing remotely.
            return Ok(Ok(match plan.action {
                StageAction::Delete => RowAction::Delete,
                StageAction::Update => RowAction::Update,
                _ => RowAction::Insert,
            }));
        }
        let insert = |this: &Self| -> Result<WriteResult, Unavailable> {
            if this.preview {
                return Ok(Ok(RowAction::Insert));
            }
            let r = send(
                reqwest::Method::POST,
                &collection,
                Some(Self::body(plan, row, true)),
            )?;
            Ok(if r.status().is_success() {
                Ok(RowAction::Insert)
            } else {
                Err(fail(&format!("POST {collection}"), r))
            })
        };
        Ok(match plan.action {
            StageAction::Insert => return insert(self),
            StageAction::Update => {
                let r = send(
                    reqwest::Method::PATCH,
                    &item,
                    Some(Self::body(plan, row, false)),
                )?;
                match r.status() {
                    s if s.is_success() => Ok(RowAction::Update),
                    StatusCode::NOT_FOUND => Ok(RowAction::Ignore),
                    _ => Err(fail(&format!("PATCH {item}"), r)),
                }
            }
            StageAction::Delete => {
                let r = send(reqwest::Method::DELETE, &item, None)?;
                match r.status() {
                    s if s.is_success() => Ok(RowAction::Delete),
                    StatusCode::NOT_FOUND | StatusCode::GONE => Ok(RowAction::Ignore),
                    _ => Err(fail(&format!("DELETE {item}"), r)),
                }
            }
            StageAction::UpdateInsert => {
                let mut body = Self::body(plan, row, false);
                if let (serde_json::Value::Object(b), serde_json::Value::Object(full)) =
                    (&mut body, Self::body(plan, row, true))
                {
                    for (k, v) in full {
                        b.entry(k).or_insert(v);
                    }
                }
                let r = send(reqwest::Method::PUT, &item, Some(body))?;
                match r.status() {
                    StatusCode::CREATED => Ok(RowAction::Insert),
                    s if s.is_success() => Ok(RowAction::Update),
                    _ => Err(fail(&format!("PUT {item}"), r)),
                }
            }
            StageAction::SkipInsert => {
                let r = send(reqwest::Method::GET, &item, None)?;
                match r.status() {
                    s if s.is_success() => Ok(RowAction::Skip),
                    StatusCode::NOT_FOUND => return insert(self),
                    _ => Err(fail(&format!("GET {item}"), r)),
                }
            }
        })
    }
}

impl HttpDestination {
    fn batch_insert(
        &mut self,
        plan: &StagePlan,
        rows: &[&[Value]],
    ) -> Result<Vec<WriteResult>, ConnectorError> {
        if self.preview {
            return Ok(vec![Ok(RowAction::Insert); rows.len()]);
        }
        let url = self.config.url(plan.table.as_deref().unwrap_or(""));
        let body: Vec<serde_json::Value> = rows.iter().map(|r| Self::body(plan, r, true)).collect();
        let body = serde_json::Value::Array(body);
        let what = format!("POST {url}");
        let answer = self
            .config
            .send(&|| self.client.post(&url).json(&body))
            .map_err(|e| Unavailable(format!("{what}: {e}")))
            .and_then(|r| self.config.check_available(&what, r));
        let failure = match answer {
            Ok(r) if r.status().is_success() => {
                return Ok(vec![Ok(RowAction::Insert); rows.len()]);
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().unwrap_or_default();
                format!(
                    "{what}: HTTP {status}: {}",
                    text.chars().take(200).collect::<String>()
                )
            }
            Err(Unavailable(why)) => {
                // Nothing of this batch was taken: it is not counted, and
                // the job stops.
                self.down = Some(why.clone());
                return Err(ConnectorError::Unavailable(why));
            }
        };
        if rows.len() == 1 {
            Ok(vec![Err(failure)])
        } else {
            Err(ConnectorError::failed(failure))
        }
    }
}

impl Destination for HttpDestination {
    fn begin(&mut self) -> Result<(), ConnectorError> {
        match &self.down {
            Some(why) => Err(ConnectorError::Unavailable(why.clone())),
            None => Ok(()),
        }
    }

    fn write(
        &mut self,
        stage: usize,
        rows: &[&[Value]],
    ) -> Result<Vec<WriteResult>, ConnectorError> {
        let plan = self.stages[stage].clone();
        if self.config.batch && plan.action == StageAction::Insert {
            return self.batch_insert(&plan, rows);
        }
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            if let Some(why) = &self.down {
                // Sent rows are counted; the rest of the batch is not sent,
                // and each says why (they land in the error file).
                out.push(Err(format!("not sent: the API stopped answering ({why})")));
                continue;
            }
            match self.one(&plan, r) {
                Ok(result) => out.push(result),
                Err(Unavailable(why)) => {
                    out.push(Err(format!("not sent: the API stopped answering ({why})")));
                    self.down = Some(why);
                }
            }
        }
        Ok(out)
    }

    fn commit(&mut self) -> Result<(), ConnectorError> {
        Ok(())
    }

    fn rollback(&mut self) -> Result<(), ConnectorError> {
        // Requests already answered cannot be taken back; each row's outcome
        // was reported as it happened.
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), ConnectorError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_joins_urls() {
        assert_eq!(encode("a b&c/é"), "a%20b%26c%2F%C3%A9");
        assert_eq!(
            with_param("http://x/y?a=1", "page", "2"),
            "http://x/y?a=1&page=2"
        );
        let c = HttpConfig {
            base_url: "http://h/api/".into(),
            headers: BTreeMap::new(),
            auth: None,
            records: String::new(),
            pagination: Pagination::None,
            timeout_secs: 1,
            max_retries: 0,
            batch: false,
        };
        assert_eq!(c.url("/items"), "http://h/api/items");
        assert_eq!(c.url("https://other/x"), "https://other/x");
    }
}
