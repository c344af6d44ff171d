//! Connectors: one module per kind, each an origin and a destination.
//!
//! A kind is a serde config struct (one variant of [`ConnectionConfig`]) that
//! implements [`Connector`]; adding a kind means adding its module (a file or
//! a folder) and one line in the `connection_kinds!` registry below, in the
//! way Vector registers its sources and sinks. Connectors never count or log
//! run results: they report what happened to each row and the engine counts.

mod error;
pub mod file;
pub(crate) mod sql_destination;

pub(crate) use error::reconnect_failed;
pub use error::{Cause, ConnectorError, Failure};

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::template::{Part, Template, Token};
use crate::value::{Row, Value};

/// Declares the kinds: each line's module, the [`ConnectionConfig`] variant
/// holding its config type, and the names `kind = "…"` accepts (the first is
/// the kind's own).
macro_rules! connection_kinds {
    ($(
        $(#[doc = $doc:literal])*
        $module:ident::$config:ident as $variant:ident = $name:literal $(| $alias:literal)*;
    )*) => {
        $(pub mod $module;)*

        /// A connection as written in `project.toml` under `[connections.<name>]`,
        /// chosen by its `kind`.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(tag = "kind")]
        pub enum ConnectionConfig {
            $(
                $(#[doc = $doc])*
                #[serde(rename = $name $(, alias = $alias)*)]
                $variant($module::$config),
            )*
        }

        impl ConnectionConfig {
            /// The kind's implementation.
            pub fn connector(&self) -> &dyn Connector {
                match self {
                    $(ConnectionConfig::$variant(c) => c,)*
                }
            }

            /// The kind's name, as written in `kind = "…"`.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(ConnectionConfig::$variant(_) => $name,)*
                }
            }
        }

        /// Every kind, in the order they are declared.
        pub const KINDS: &[Kind] = &[
            $(Kind {
                name: $name,
                aliases: &[$($alias),*],
                config_type: std::any::type_name::<$module::$config>,
            },)*
        ];
    };
}

// The registry: a kind is its module and one line here.
connection_kinds! {
    /// A CSV file.
    csv::CsvConfig as Csv = "csv";
    /// A JSON array or JSON Lines file.
    json::JsonConfig as Json = "json";
    /// A SQLite database file.
    sqlite::SqliteConfig as Sqlite = "sqlite";
    /// A PostgreSQL database.
    postgres::PostgresConfig as Postgres = "postgres" | "postgresql";
    /// A MySQL or MariaDB database.
    mysql::MysqlConfig as Mysql = "mysql" | "mariadb";
    /// A JSON resource of an HTTP API.
    http::HttpConfig as Http = "http";
}

/// A registered connection kind.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// The name `kind = "…"` gives.
    pub name: &'static str,
    /// Other names the kind answers to.
    pub aliases: &'static [&'static str],
    /// The Rust path of the kind's config type (`tidepool::connector::csv::CsvConfig`).
    pub config_type: fn() -> &'static str,
}

impl ConnectionConfig {
    /// What the kind can do.
    pub fn capabilities(&self) -> Capabilities {
        self.connector().capabilities()
    }
}

/// Where a connection points.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A file (a file kind's `path`, SQLite's database file).
    File(&'a Path),
    /// A network address, as configured (it may hold a password).
    Address(&'a str),
}

/// How an origin of a kind is told what to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginInput {
    /// A SQL query (`origin.query`).
    Query,
    /// A file (the connection's `path`, or `origin.path`).
    File,
}

/// What a connector kind supports; the loader checks jobs against it.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// Stage actions the kind can perform as a destination.
    pub actions: &'static [StageAction],
    /// How an origin is told what to read.
    pub origin: OriginInput,
    /// Whether stages must name a `table`.
    pub needs_table: bool,
    /// The most destination writers that may work at once (files: one).
    pub max_writers: Option<usize>,
    /// Rows per transaction when a job does not say (`batch_size`): what the
    /// kind loads fastest with (a PostgreSQL commit waits for the disk).
    pub batch_size: usize,
}

/// What a destination did with one row in one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RowAction {
    /// A row was inserted.
    Insert,
    /// A matching row was updated.
    Update,
    /// A matching row was deleted.
    Delete,
    /// An update or delete matched nothing.
    Ignore,
    /// Nothing was written on purpose (skip/insert matched, or no difference).
    Skip,
    /// The row failed in this stage.
    Error,
}

impl RowAction {
    /// The name `@@STG:n,#Action@@` gives.
    pub fn as_str(self) -> &'static str {
        match self {
            RowAction::Insert => "Insert",
            RowAction::Update => "Update",
            RowAction::Delete => "Delete",
            RowAction::Ignore => "Ignore",
            RowAction::Skip => "Skip",
            RowAction::Error => "Error",
        }
    }
}

/// The outcome of one row in one stage: an action, or the reason it failed.
pub type WriteResult = Result<RowAction, String>;

/// One origin row, or the reason it could not be read.
pub type RowRead = Result<Row, String>;

/// Whether an origin should keep reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Read the next row.
    Continue,
    /// Stop reading (row window ended, run cancelled or halted).
    Stop,
}

/// Everything an origin needs to open.
#[derive(Debug)]
pub struct OriginRequest<'a> {
    /// Relative paths resolve against this folder (the project's).
    pub base_dir: &'a Path,
    /// The SQL query, with tokens still in it (see [`bind_tokens`]).
    pub query: Option<&'a str>,
    /// A file path overriding the connection's.
    pub path: Option<&'a Path>,
    /// Values of `@@VAR:…@@` tokens.
    pub variables: &'a BTreeMap<String, Value>,
    /// Origin fields the job reads (kinds without a fixed schema read these).
    pub fields: &'a [String],
    /// A preview run: the origin must not create or change anything either.
    pub preview: bool,
}

/// A row source.
pub trait Origin: Send {
    /// The origin's field names, in row order.
    fn columns(&self) -> &[String];
    /// Reads rows in order, handing each to `sink` until it says stop or rows end.
    /// An `Err` here ends the job; a row that cannot be read is an `Err` row.
    fn read(&mut self, sink: &mut dyn FnMut(RowRead) -> Flow) -> Result<(), ConnectorError>;
}

/// One destination column of a stage, as the destination sees it.
#[derive(Debug, Clone)]
pub struct ColumnPlan {
    /// The column name.
    pub name: String,
    /// Part of the WHERE.
    pub is_match: bool,
    /// Written only on insert.
    pub insert_only: bool,
    /// Written only on update.
    pub update_only: bool,
}

/// One stage, as the destination sees it.
#[derive(Debug, Clone)]
pub struct StagePlan {
    /// The stage's name (for messages).
    pub name: String,
    /// The table or object.
    pub table: Option<String>,
    /// What to do with each row.
    pub action: StageAction,
    /// The columns; row values come in this order.
    pub columns: Vec<ColumnPlan>,
    /// A blank value is not written.
    pub omit_blank: bool,
    /// Update only when a value differs.
    pub update_on_difference: bool,
}

/// Everything a destination needs to open.
#[derive(Debug)]
pub struct DestinationRequest<'a> {
    /// Relative paths resolve against this folder (the project's).
    pub base_dir: &'a Path,
    /// The stages this destination serves, in the indices `write` is called with.
    pub stages: &'a [StagePlan],
    /// Write nothing: roll back all database work at the end, leave files untouched.
    pub preview: bool,
}

/// A row sink for one writer thread, with its own connection.
///
/// The engine calls `begin`, then `write` once per stage with the batch's rows,
/// then `commit`. An `Err` from `write` or `commit` fails the batch: the engine
/// rolls back and replays it row by row, so only bad rows count as errors.
pub trait Destination: Send {
    /// Starts a batch.
    fn begin(&mut self) -> Result<(), ConnectorError>;
    /// Writes `rows` (values in the stage's column order) for stage `stage`.
    /// Returns one result per row, in order.
    fn write(
        &mut self,
        stage: usize,
        rows: &[&[Value]],
    ) -> Result<Vec<WriteResult>, ConnectorError>;
    /// Makes the batch durable.
    fn commit(&mut self) -> Result<(), ConnectorError>;
    /// Undoes the batch.
    fn rollback(&mut self) -> Result<(), ConnectorError>;
    /// Ends the run: flush files, close connections; in preview, discard everything.
    fn finish(self: Box<Self>) -> Result<(), ConnectorError>;
    /// What the user should know about how the stages will be written (a
    /// missing index that makes every batch scan the table, …); logged once
    /// per run.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A connector kind.
pub trait Connector {
    /// What the kind can do.
    fn capabilities(&self) -> Capabilities;
    /// The file a file connection reads and writes (`path`).
    fn file_path(&self) -> Option<&Path> {
        None
    }
    /// Opens a row source.
    fn open_origin(&self, req: &OriginRequest) -> Result<Box<dyn Origin>, ConnectorError>;
    /// Opens a row sink (one per writer thread).
    fn open_destination(
        &self,
        req: &DestinationRequest,
    ) -> Result<Box<dyn Destination>, ConnectorError>;
    /// Where the connection points (shown in a run's connection list).
    fn target(&self) -> Target<'_>;
    /// Opens a connection that answers scripts' `lookup()` (Smart Lookup).
    fn open_lookup(&self, base_dir: &Path) -> Result<Box<dyn Lookup>, ConnectorError>;
}

/// Answers lookups: one column of the first row whose columns equal the criteria.
pub trait Lookup: Send {
    /// `field` of the first row of `table` whose columns equal `criteria`
    /// (a NULL criterion matches NULL); `None` when no row does.
    fn find(
        &mut self,
        table: &str,
        field: &str,
        criteria: &[(String, Value)],
    ) -> Result<Option<Value>, ConnectorError>;
}

/// The SQL of a lookup: `SELECT field FROM table WHERE a = $1 AND b IS NULL`,
/// with a placeholder for each non-NULL criterion, in order.
pub(crate) fn lookup_sql(
    table: &str,
    field: &str,
    criteria: &[(String, Value)],
    quote: impl Fn(&str) -> String,
    placeholder: impl Fn(usize) -> String,
) -> String {
    let table = table.split('.').map(&quote).collect::<Vec<_>>().join(".");
    let mut n = 0;
    let cond: Vec<String> = criteria
        .iter()
        .map(|(k, v)| {
            if v.is_null() {
                format!("{} IS NULL", quote(k))
            } else {
                n += 1;
                format!("{} = {}", quote(k), placeholder(n))
            }
        })
        .collect();
    format!(
        "SELECT {} FROM {table} WHERE {} LIMIT 1",
        quote(field),
        cond.join(" AND ")
    )
}

/// Lookups in file connections: a file (`table` is its path; empty: the
/// connection's own) is read once, and each set of criteria columns indexed
/// once, so every later lookup is a hash probe.
pub(crate) struct FileLookup<C: Connector> {
    config: C,
    base_dir: PathBuf,
    /// By file: its columns and rows.
    files: BTreeMap<String, (Vec<String>, Vec<Row>)>,
    /// By file, field and criteria columns: criteria values → the field's value.
    indexes: std::collections::HashMap<String, std::collections::HashMap<String, Value>>,
}

impl<C: Connector> FileLookup<C> {
    pub(crate) fn new(config: C, base_dir: &Path) -> Self {
        FileLookup {
            config,
            base_dir: base_dir.to_owned(),
            files: BTreeMap::new(),
            indexes: Default::default(),
        }
    }
}

/// The text key of a set of values (each value's text, unit-separated).
fn lookup_key<'a>(values: impl Iterator<Item = crate::value::ValueRef<'a>>) -> String {
    let mut k = String::new();
    for v in values {
        match v {
            crate::value::ValueRef::Null => k.push('\u{0}'),
            v => v.push_text(&mut k),
        }
        k.push('\u{1f}');
    }
    k
}

impl<C: Connector + Send> Lookup for FileLookup<C> {
    fn find(
        &mut self,
        table: &str,
        field: &str,
        criteria: &[(String, Value)],
    ) -> Result<Option<Value>, ConnectorError> {
        if !self.files.contains_key(table) {
            let mut fields: Vec<String> = criteria.iter().map(|(k, _)| k.clone()).collect();
            fields.push(field.to_owned());
            let path = (!table.is_empty()).then(|| Path::new(table));
            let mut origin = self.config.open_origin(&OriginRequest {
                base_dir: &self.base_dir,
                query: None,
                path,
                variables: &BTreeMap::new(),
                fields: &fields,
                preview: true,
            })?;
            let mut rows = Vec::new();
            let mut bad = None;
            origin.read(&mut |r| match r {
                Ok(r) => {
                    rows.push(r);
                    Flow::Continue
                }
                Err(e) => {
                    bad = Some(e);
                    Flow::Stop
                }
            })?;
            if let Some(e) = bad {
                return Err(ConnectorError::failed(format!(
                    "lookup file {table:?}: {e}"
                )));
            }
            self.files
                .insert(table.to_owned(), (origin.columns().to_vec(), rows));
        }
        let (columns, rows) = &self.files[table];
        let col = |name: &str| {
            columns
                .iter()
                .position(|c| c == name)
                .or_else(|| columns.iter().position(|c| c.eq_ignore_ascii_case(name)))
                .ok_or_else(|| {
                    ConnectorError::schema(format!(
                        "lookup file {table:?} has no field {name:?}; it has: {}",
                        columns.join(", ")
                    ))
                })
        };
        let fi = col(field)?;
        let ci: Vec<usize> = criteria
            .iter()
            .map(|(k, _)| col(k))
            .collect::<Result<_, _>>()?;
        let index_name = format!(
            "{table}\u{1f}{fi}\u{1f}{}",
            ci.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let index = self.indexes.entry(index_name).or_insert_with(|| {
            let mut m = std::collections::HashMap::with_capacity(rows.len());
            for r in rows {
                m.entry(lookup_key(ci.iter().map(|&i| r.get(i))))
                    .or_insert_with(|| r.get(fi).to_owned());
            }
            m
        });
        let key = lookup_key(criteria.iter().map(|(_, v)| v.as_ref()));
        Ok(index.get(&key).cloned())
    }
}

/// Every stage action: what the database kinds support.
pub(crate) const ALL_ACTIONS: &[StageAction] = &[
    StageAction::Insert,
    StageAction::Update,
    StageAction::Delete,
    StageAction::UpdateInsert,
    StageAction::SkipInsert,
];

/// A connection URL without its password, for messages.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

/// Whether two rows of a batch name the same destination row (set-based
/// writers then let the engine replay the batch row by row, in order).
pub(crate) fn duplicate_keys(rows: &[&[Value]], match_cols: &[usize]) -> bool {
    if match_cols.is_empty() || rows.len() < 2 {
        return false;
    }
    let mut keys: Vec<String> = rows
        .iter()
        .map(|r| {
            let mut k = String::new();
            for &i in match_cols {
                k.push_str(&r[i].to_text());
                k.push('\u{1f}');
            }
            k
        })
        .collect();
    keys.sort_unstable();
    keys.windows(2).any(|w| w[0] == w[1])
}

/// The note for a stage that finds matches (not an insert) when no index
/// on `table` starts with one of its match fields.
pub(crate) fn unindexed_note(plan: &StagePlan, table: &str, indexed: bool) -> Option<String> {
    if plan.action == StageAction::Insert || indexed {
        return None;
    }
    let cols: Vec<&str> = plan
        .columns
        .iter()
        .filter(|c| c.is_match)
        .map(|c| c.name.as_str())
        .collect();
    Some(format!(
        "stage {:?}: no index on {table} starts with a match field ({}), so finding matches scans the whole table (per batch, or per row); an index on them makes the stage much faster",
        plan.name,
        cols.join(", ")
    ))
}

/// Which plan columns an insert writes, an update sets, and the WHERE matches.
pub(crate) struct ColumnSets {
    pub(crate) insert: Vec<usize>,
    pub(crate) set: Vec<usize>,
    pub(crate) matches: Vec<usize>,
}

impl ColumnSets {
    pub(crate) fn of(plan: &StagePlan) -> Self {
        let pick = |f: &dyn Fn(&ColumnPlan) -> bool| -> Vec<usize> {
            plan.columns
                .iter()
                .enumerate()
                .filter(|(_, c)| f(c))
                .map(|(i, _)| i)
                .collect()
        };
        ColumnSets {
            insert: pick(&|c| !c.update_only),
            set: pick(&|c| !c.is_match && !c.insert_only),
            matches: pick(&|c| c.is_match),
        }
    }
}

/// Finds each plan column among a table's `(name, type)` columns, exactly or
/// case-insensitively; an unknown table or column is an error naming it.
pub(crate) fn find_columns<'a>(
    existing: &'a [(String, String)],
    plan: &StagePlan,
    table: &str,
) -> Result<Vec<&'a (String, String)>, ConnectorError> {
    if existing.is_empty() {
        return Err(ConnectorError::schema(format!(
            "table {table:?} does not exist (stage {:?}); create it, or add init_sql to the connection",
            plan.name
        )));
    }
    plan.columns
        .iter()
        .map(|c| {
            existing
                .iter()
                .find(|(n, _)| n == &c.name)
                .or_else(|| {
                    existing
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case(&c.name))
                })
                .ok_or_else(|| {
                    ConnectorError::schema(format!(
                        "table {table:?} has no column {:?} (stage {:?}); it has: {}",
                        c.name,
                        plan.name,
                        existing
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })
        })
        .collect()
}

/// Resolves a connection path against the project folder.
pub(crate) fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

/// Replaces the tokens of a SQL query with placeholders and returns the values to
/// bind, so a token's value is never spliced into SQL text. A token written inside
/// single quotes (`'@@VAR:JobArgument@@'`) replaces the quotes too.
///
/// `placeholder(n)` gives the n-th (1-based) placeholder: `?` or `$n`.
pub fn bind_tokens(
    query: &str,
    variables: &BTreeMap<String, Value>,
    placeholder: impl Fn(usize) -> String,
) -> Result<(String, Vec<Value>), BindError> {
    let template = Template::parse(query).map_err(BindError::Template)?;
    let mut sql = String::with_capacity(query.len());
    let mut params = Vec::new();
    let parts = &template.parts;
    for (i, part) in parts.iter().enumerate() {
        match part {
            Part::Literal(text) => {
                let mut t = text.as_str();
                // Drop a quote that closes a quoted token (the next part is handled below).
                if i > 0
                    && matches!(parts[i - 1], Part::Token(_))
                    && t.starts_with('\'')
                    && quoted_before(parts, i - 1)
                {
                    t = &t[1..];
                }
                if matches!(parts.get(i + 1), Some(Part::Token(_)))
                    && t.ends_with('\'')
                    && quoted_after(parts, i + 1)
                {
                    t = &t[..t.len() - 1];
                }
                sql.push_str(t);
            }
            Part::Token(Token::Variable(name)) => {
                let v = variables
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
                    .unwrap_or(Value::Null);
                params.push(v);
                sql.push_str(&placeholder(params.len()));
            }
            Part::Token(t) => return Err(BindError::NotKnownYet(t.to_string())),
        }
    }
    Ok((sql, params))
}

/// Why a query's tokens cannot be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The query's tokens do not parse.
    #[error(transparent)]
    Template(#[from] crate::template::TemplateError),
    /// A token whose value comes from rows (only `@@VAR:…@@` is known before).
    #[error(
        "{0} cannot be used in an origin query: only @@VAR:…@@ tokens are known before rows are read"
    )]
    NotKnownYet(String),
}

impl From<BindError> for ConnectorError {
    fn from(e: BindError) -> Self {
        ConnectorError::schema(e.to_string())
    }
}

fn quoted_before(parts: &[Part], token: usize) -> bool {
    token > 0 && matches!(&parts[token - 1], Part::Literal(t) if t.ends_with('\''))
}

fn quoted_after(parts: &[Part], token: usize) -> bool {
    matches!(parts.get(token + 1), Some(Part::Literal(t)) if t.starts_with('\''))
}

/// What a stage does with each row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StageAction {
    /// Insert every row.
    #[serde(rename = "insert")]
    Insert,
    /// Update the rows that match; no match is an ignore.
    #[serde(rename = "update")]
    Update,
    /// Delete the rows that match; no match is an ignore.
    #[serde(rename = "delete")]
    Delete,
    /// Update if a row matches, insert if not.
    #[serde(rename = "update/insert", alias = "upsert")]
    UpdateInsert,
    /// Leave a matching row alone (a skip), insert if none matches.
    #[serde(rename = "skip/insert")]
    SkipInsert,
}

impl StageAction {
    /// Whether the stage needs `match` fields to find destination rows.
    pub fn needs_match(self) -> bool {
        !matches!(self, StageAction::Insert)
    }
}

impl fmt::Display for StageAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StageAction::Insert => "insert",
            StageAction::Update => "update",
            StageAction::Delete => "delete",
            StageAction::UpdateInsert => "update/insert",
            StageAction::SkipInsert => "skip/insert",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_read_by_name_and_alias() {
        let kind = |t: &str| toml::from_str::<ConnectionConfig>(t).map(|c| c.kind());
        assert_eq!(
            kind("kind = \"mariadb\"\nurl = \"mysql://h/d\"").unwrap(),
            "mysql"
        );
        assert_eq!(
            kind("kind = \"postgresql\"\nurl = \"x\"").unwrap(),
            "postgres"
        );
        let e = kind("kind = \"oracle\"").unwrap_err().to_string();
        assert!(
            e.contains("unknown variant `oracle`, expected one of `csv`, `json`, `sqlite`, `postgres`, `postgresql`, `mariadb`, `mysql`, `http`"),
            "{e}"
        );
    }

    #[test]
    fn a_sqlite_error_keeps_its_extended_code() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (a INTEGER PRIMARY KEY); INSERT INTO t VALUES (1)")
            .unwrap();
        let e = ConnectorError::io(conn.execute_batch("INSERT INTO t VALUES (1)").unwrap_err());
        // SQLITE_CONSTRAINT_PRIMARYKEY
        assert_eq!(e.error_code(), Some(1555));
        assert_eq!(e.sql_state(), None);
        let lost = reconnect_failed(e);
        assert!(
            lost.to_string()
                .starts_with("the connection was lost: reconnecting failed: ")
        );
        assert_eq!(lost.error_code(), Some(1555));
    }

    #[test]
    fn duplicate_keys_are_found_by_the_match_columns() {
        let a = [Value::Int(1), Value::from("x")];
        let b = [Value::Int(1), Value::from("y")];
        assert!(duplicate_keys(&[&a, &b], &[0]));
        assert!(!duplicate_keys(&[&a, &b], &[1]));
        assert!(!duplicate_keys(&[&a], &[0]));
    }

    #[test]
    fn tokens_become_bound_parameters() {
        let vars: BTreeMap<String, Value> = [(
            "JobArgument".to_owned(),
            Value::from("x'); DROP TABLE t; --"),
        )]
        .into_iter()
        .collect();
        let (sql, params) = bind_tokens(
            "SELECT * FROM t WHERE a = '@@VAR:JobArgument@@' AND b = @@VAR:jobargument@@ AND c = 'lit'",
            &vars,
            |_| "?".into(),
        )
        .unwrap();
        assert_eq!(sql, "SELECT * FROM t WHERE a = ? AND b = ? AND c = 'lit'");
        assert_eq!(params.len(), 2);
        assert_eq!(params[0], Value::from("x'); DROP TABLE t; --"));
        let (sql, _) = bind_tokens("x = @@VAR:Nope@@", &vars, |n| format!("${n}")).unwrap();
        assert_eq!(sql, "x = $1");
        assert!(bind_tokens("x = @@ORG:a@@", &vars, |_| "?".into()).is_err());
    }
}
