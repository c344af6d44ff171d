//! PostgreSQL: an origin that streams a query, a destination with all five
//! stage actions, set-based per batch.
//!
//! Inserts go through `COPY … FROM STDIN`. The other actions copy the batch
//! into a session-local staging table and run one statement per action over
//! it (`UPDATE … FROM`, `DELETE … USING`, `INSERT … SELECT`), each returning
//! the staging row numbers it touched, so every row's outcome is exact. Values
//! travel as text and the server converts them to each column's type, so
//! numerics stay exact and dates keep their zones; a value that does not fit
//! its column fails the batch, which the engine then replays row by row.
//! An update whose values equal the row's (as text) still counts as an update
//! but is not rewritten when the table has nothing (trigger, rule, policy,
//! child, publication) that would see the difference. Where a unique index
//! is exactly the match columns, an upsert batch after one that matched
//! nothing is first tried as a plain `COPY` (in a savepoint; a broken key
//! means something matched, and the batch goes the full way).

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::Type;
use postgres::{Client, NoTls};
use serde::Deserialize;

use super::{
    ALL_ACTIONS, BatchError, Capabilities, ColumnSets, Connector, ConnectorError, Destination,
    DestinationRequest, Flow, Origin, OriginInput, OriginRequest, RowAction, RowRead,
    SavepointWriter, StagePlan, WriteResult, bind_tokens, find_columns, reconnect_failed,
    redact_url, unindexed_note,
};
use crate::connector::StageAction;
use crate::value::{Row, Value};

/// `kind = "postgres"`: a PostgreSQL database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// A connection URL, `postgres://user:password@host:port/dbname` (put the
    /// password in `${ENV}`).
    pub url: String,
    /// SQL run each time the connection opens (must be safe to run again).
    #[serde(default)]
    pub init_sql: Vec<String>,
    /// How long to wait for a connection.
    #[serde(default = "default_connect_secs")]
    pub connect_timeout_secs: u64,
}

fn default_connect_secs() -> u64 {
    10
}

impl PostgresConfig {
    fn connect(&self) -> Result<Client, ConnectorError> {
        let mut cfg: postgres::Config = self.url.parse().map_err(|e| ConnectorError::Open {
            what: "postgres connection".into(),
            reason: format!("bad url: {e}"),
        })?;
        cfg.connect_timeout(Duration::from_secs(self.connect_timeout_secs));
        if cfg.get_application_name().is_none() {
            cfg.application_name("tidepool");
        }
        let mut client = cfg.connect(NoTls).map_err(|e| ConnectorError::Open {
            what: format!("postgres database {}", redact_url(&self.url)),
            reason: pg_message(&e),
        })?;
        for sql in &self.init_sql {
            client.batch_execute(sql).map_err(|e| {
                ConnectorError::Schema(format!("init_sql failed: {}", pg_message(&e)))
            })?;
        }
        Ok(client)
    }
}

/// A PostgreSQL error as a person should read it: message, detail, where.
fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut m = db.message().to_owned();
            if let Some(d) = db.detail() {
                let _ = write!(m, " ({d})");
            }
            if let Some(w) = db.where_() {
                let _ = write!(m, " [{w}]");
            }
            m
        }
        None => e.to_string(),
    }
}

/// Whether the error means the connection is gone (retry on a new one).
fn is_lost(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(c) => {
            let c = c.code();
            c.starts_with("08") || c.starts_with("57P")
        }
        None => std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
    }
}

fn to_connector_error(e: postgres::Error) -> ConnectorError {
    PostgresDestination::classify(&e)
}

impl Connector for PostgresConfig {
    fn target(&self) -> super::Target<'_> {
        super::Target::Address(&self.url)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            actions: ALL_ACTIONS,
            origin: OriginInput::Query,
            needs_table: true,
            max_writers: None,
            batch_size: 10_000,
        }
    }

    fn open_origin(&self, req: &OriginRequest) -> Result<Box<dyn Origin>, ConnectorError> {
        let query = req
            .query
            .ok_or_else(|| ConnectorError::Schema("a postgres origin needs origin.query".into()))?;
        let mut client = self.connect()?;
        let query = query.trim().trim_end_matches(';');
        let (sql, params) = bind_tokens(query, req.variables, |n| format!("${n}"))
            .map_err(ConnectorError::Schema)?;
        let first = client
            .prepare(&sql)
            .map_err(|e| ConnectorError::Schema(format!("origin query: {}", pg_message(&e))))?;
        // Parameters travel as text, cast to what the server expects there.
        let param_types: Vec<Type> = first.params().to_vec();
        let sql = if param_types.iter().all(|t| *t == Type::TEXT) {
            sql
        } else {
            bind_tokens(query, req.variables, |n| match param_types.get(n - 1) {
                Some(t) if *t != Type::TEXT => format!("(${n}::text::{})", t.name()),
                _ => format!("${n}"),
            })
            .map_err(ConnectorError::Schema)?
            .0
        };
        let stmt = client
            .prepare(&sql)
            .map_err(|e| ConnectorError::Schema(format!("origin query: {}", pg_message(&e))))?;
        let columns: Vec<String> = stmt.columns().iter().map(|c| c.name().to_owned()).collect();
        // Types tidepool does not read natively are read as their text form
        // (numeric stays exact, timestamps keep their zone).
        let mut unique = columns.clone();
        unique.sort();
        unique.dedup();
        let wrap =
            unique.len() == columns.len() && stmt.columns().iter().any(|c| !native(c.type_()));
        let stmt = if wrap {
            let list: Vec<String> = stmt
                .columns()
                .iter()
                .map(|c| {
                    let q = quote_ident(c.name());
                    if native(c.type_()) {
                        format!("q.{q}")
                    } else {
                        format!("q.{q}::text AS {q}")
                    }
                })
                .collect();
            let wrapped = format!("SELECT {} FROM ({sql}) AS q", list.join(", "));
            client
                .prepare(&wrapped)
                .map_err(|e| ConnectorError::Schema(format!("origin query: {}", pg_message(&e))))?
        } else {
            stmt
        };
        let params: Vec<Option<String>> = params
            .iter()
            .map(|v| match v {
                Value::Null => None,
                v => Some(v.to_text()),
            })
            .collect();
        Ok(Box::new(PostgresOrigin {
            client,
            stmt,
            params,
            columns,
        }))
    }

    fn open_lookup(
        &self,
        _base_dir: &std::path::Path,
    ) -> Result<Box<dyn super::Lookup>, ConnectorError> {
        Ok(Box::new(PostgresLookup {
            client: self.connect()?,
            statements: Default::default(),
        }))
    }

    fn open_destination(
        &self,
        req: &DestinationRequest,
    ) -> Result<Box<dyn Destination>, ConnectorError> {
        let mut dest = PostgresDestination {
            config: self.clone(),
            client: self.connect()?,
            stages: Vec::new(),
            plans: req.stages.to_vec(),
            preview: req.preview,
        };
        dest.prepare_session()?;
        Ok(Box::new(dest))
    }
}

/// Lookups on their own connection, statements prepared once per shape.
struct PostgresLookup {
    client: Client,
    statements: std::collections::HashMap<String, postgres::Statement>,
}

impl super::Lookup for PostgresLookup {
    fn find(
        &mut self,
        table: &str,
        field: &str,
        criteria: &[(String, Value)],
    ) -> Result<Option<Value>, ConnectorError> {
        let plain = super::lookup_sql(table, field, criteria, quote_ident, |n| format!("${n}"));
        let stmt = match self.statements.get(&plain) {
            Some(s) => s.clone(),
            None => {
                let bad = |e: postgres::Error| {
                    ConnectorError::Schema(format!("lookup in {table:?}: {}", pg_message(&e)))
                };
                let first = self.client.prepare(&plain).map_err(bad)?;
                // Criteria travel as text, cast to the column's type (as origin tokens do);
                // a value tidepool does not read natively comes back as text.
                let types = first.params().to_vec();
                let field_sql = if native(first.columns()[0].type_()) {
                    quote_ident(field)
                } else {
                    format!("{}::text", quote_ident(field))
                };
                let sql = super::lookup_sql(table, field, criteria, quote_ident, |n| {
                    match types.get(n - 1) {
                        Some(t) if *t != Type::TEXT => format!("(${n}::text::{})", t.name()),
                        _ => format!("${n}"),
                    }
                })
                .replacen(&quote_ident(field), &field_sql, 1);
                let stmt = self.client.prepare(&sql).map_err(bad)?;
                self.statements.insert(plain, stmt.clone());
                stmt
            }
        };
        let params: Vec<String> = criteria
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(_, v)| v.to_text())
            .collect();
        let mut rows = self
            .client
            .query_raw(&stmt, params.iter())
            .map_err(to_connector_error)?;
        match rows.next().map_err(to_connector_error)? {
            Some(r) => Ok(Some(cell(&r, 0).map_err(to_connector_error)?)),
            None => Ok(None),
        }
    }
}

fn native(t: &Type) -> bool {
    matches!(
        *t,
        Type::INT2
            | Type::INT4
            | Type::INT8
            | Type::FLOAT4
            | Type::FLOAT8
            | Type::BOOL
            | Type::TEXT
            | Type::VARCHAR
            | Type::BPCHAR
            | Type::NAME
    )
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

struct PostgresOrigin {
    client: Client,
    stmt: postgres::Statement,
    params: Vec<Option<String>>,
    columns: Vec<String>,
}

fn cell(row: &postgres::Row, i: usize) -> Result<Value, postgres::Error> {
    let t = row.columns()[i].type_().clone();
    Ok(match t {
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)?
            .map(|v| Value::Int(v as i64)),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)?
            .map(|v| Value::Int(v as i64)),
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(i)?
            .map(|v| Value::Float(v as f64)),
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(Value::Float),
        Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(Value::Bool),
        _ => row.try_get::<_, Option<String>>(i)?.map(Value::Text),
    }
    .unwrap_or(Value::Null))
}

impl Origin for PostgresOrigin {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn read(&mut self, sink: &mut dyn FnMut(RowRead) -> Flow) -> Result<(), ConnectorError> {
        let mut rows = self
            .client
            .query_raw(&self.stmt, self.params.iter())
            .map_err(to_connector_error)?;
        let n = self.columns.len();
        while let Some(row) = rows.next().map_err(to_connector_error)? {
            let mut values = Vec::with_capacity(n);
            let mut bad = None;
            for i in 0..n {
                match cell(&row, i) {
                    Ok(v) => values.push(v),
                    Err(e) => {
                        bad = Some(format!(
                            "column {:?} cannot be read ({e}); cast it to text in the query",
                            self.columns[i]
                        ));
                        break;
                    }
                }
            }
            let read = match bad {
                Some(e) => Err(e),
                None => Ok(Row::from_values(values)),
            };
            if sink(read) == Flow::Stop {
                break;
            }
        }
        Ok(())
    }
}

/// A destination column: its real name and its type as SQL (`numeric(10,2)`).
#[derive(Debug, Clone)]
struct Column {
    name: String,
    sql_type: String,
    /// Blank text is NULL here (every type but the text ones).
    blank_is_null: bool,
}

/// One stage's SQL, built when the connection opens.
struct StageSql {
    plan: StagePlan,
    table: String,
    staging: String,
    columns: Vec<Column>,
    insert_cols: Vec<usize>,
    set_cols: Vec<usize>,
    match_cols: Vec<usize>,
    /// An index starts with a match column: rows are found by index probes,
    /// so the planner is kept from hashing the whole table for each batch.
    indexed: bool,
    /// Nothing but the row itself would see an update that changes no value
    /// (a plain table without triggers, rules, row security, children or
    /// publications), so such rows are counted without being rewritten.
    quiet: bool,
    /// The last comparison found most matched rows changed: comparing first
    /// only adds a probe, so batches are written whole (and sampled again
    /// every [`RESAMPLE`] batches).
    mostly_changed: bool,
    /// Batches written whole since the last comparison.
    uncompared: u32,
    /// A unique index (checked at once, not deferred; not partial; no
    /// expressions) is exactly the match columns: a batch that breaks none
    /// of its keys matched no row.
    unique_on_match: bool,
    /// The last batch matched no row: the next is first tried as a plain
    /// `COPY` (an upsert into an empty table runs as fast as an insert).
    expect_new: bool,
}

/// How often a stage whose rows mostly change compares a batch again.
const RESAMPLE: u32 = 8;

impl StageSql {
    fn new(client: &mut Client, plan: &StagePlan, index: usize) -> Result<Self, ConnectorError> {
        let table = plan
            .table
            .clone()
            .ok_or_else(|| ConnectorError::Schema(format!("stage {:?} has no table", plan.name)))?;
        let found = client
            .query_opt("SELECT to_regclass($1::text)::text", &[&table])
            .map_err(to_connector_error)?;
        let qualified: Option<String> = found.and_then(|r| r.get(0));
        let Some(qualified) = qualified else {
            return Err(ConnectorError::Schema(format!(
                "table {table:?} does not exist (stage {:?}); create it, or add init_sql to the connection",
                plan.name
            )));
        };
        let existing: Vec<(String, String)> = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
                 FROM pg_attribute a
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                 ORDER BY a.attnum",
                &[&qualified],
            )
            .map_err(to_connector_error)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let columns: Vec<Column> = find_columns(&existing, plan, &table)?
            .into_iter()
            .map(|(name, ty)| Column {
                name: name.clone(),
                sql_type: ty.clone(),
                blank_is_null: !["text", "character", "name", "citext"]
                    .iter()
                    .any(|t| ty.starts_with(t)),
            })
            .collect();
        let sets = ColumnSets::of(plan);
        // The first key column of each plain index on the table.
        let leading: Vec<String> = client
            .query(
                "SELECT a.attname::text FROM pg_index i
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                 WHERE i.indrelid = $1::text::regclass AND i.indpred IS NULL",
                &[&qualified],
            )
            .map_err(to_connector_error)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let indexed = sets
            .matches
            .iter()
            .any(|&i| leading.iter().any(|l| *l == columns[i].name));
        let mut match_names: Vec<&str> = sets
            .matches
            .iter()
            .map(|&i| columns[i].name.as_str())
            .collect();
        match_names.sort_unstable();
        let unique_on_match = client
            .query(
                "SELECT array_agg(a.attname::text ORDER BY a.attname::text COLLATE \"C\") FROM pg_index i
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                 WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indimmediate
                   AND i.indpred IS NULL AND i.indexprs IS NULL
                 GROUP BY i.indexrelid",
                &[&qualified],
            )
            .map_err(to_connector_error)?
            .iter()
            .any(|r| r.get::<_, Vec<String>>(0) == match_names);
        // PostgreSQL writes a new row version for an update that changes
        // nothing (MariaDB does not): that is most of a re-sync's cost, so it
        // is left out where no trigger, rule, policy, child table or
        // subscriber could tell.
        let quiet: bool = client
            .query_one(
                "SELECT c.relkind = 'r' AND NOT c.relhasrules AND NOT c.relrowsecurity
                        AND NOT c.relhassubclass
                        AND NOT EXISTS (SELECT 1 FROM pg_trigger g
                                        WHERE g.tgrelid = c.oid AND NOT g.tgisinternal)
                        AND NOT EXISTS (SELECT 1 FROM pg_publication_tables p
                                        WHERE p.schemaname = n.nspname AND p.tablename = c.relname)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.oid = $1::text::regclass",
                &[&qualified],
            )
            .map_err(to_connector_error)?
            .get(0);
        Ok(StageSql {
            indexed,
            quiet,
            mostly_changed: false,
            uncompared: 0,
            unique_on_match,
            expect_new: true,
            plan: plan.clone(),
            table: qualified,
            staging: format!("tidepool_stage_{index}"),
            insert_cols: sets.insert,
            set_cols: sets.set,
            match_cols: sets.matches,
            columns,
        })
    }

    fn col(&self, i: usize) -> String {
        quote_ident(&self.columns[i].name)
    }

    /// The staging value of plan column `i`, converted to the column's type.
    fn val(&self, i: usize) -> String {
        format!("s.v{i}::{}", self.columns[i].sql_type)
    }

    fn matches(&self) -> String {
        self.match_cols
            .iter()
            .map(|&i| format!("t.{} = {}", self.col(i), self.val(i)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn set_value(&self, i: usize) -> String {
        if self.plan.omit_blank {
            format!(
                "CASE WHEN s.v{i} IS NULL OR btrim(s.v{i}) = '' THEN t.{c} ELSE {v} END",
                c = self.col(i),
                v = self.val(i)
            )
        } else {
            self.val(i)
        }
    }

    fn update_sql(&self) -> String {
        let sets: Vec<String> = self
            .set_cols
            .iter()
            .map(|&i| format!("{} = {}", self.col(i), self.set_value(i)))
            .collect();
        format!(
            "UPDATE {} AS t SET {} FROM {} AS s WHERE {}",
            self.table,
            sets.join(", "),
            self.staging,
            self.matches()
        )
    }

    /// Whether the batch row would change the matched row. Compared as text
    /// (byte for byte), so `1.0` → `1.00` in a numeric, a case change in a
    /// citext or a key order in json are changes, and json, which has no
    /// equality, compares too.
    fn differs(&self) -> String {
        self.set_cols
            .iter()
            .map(|&i| {
                format!(
                    "(t.{})::text IS DISTINCT FROM ({})::text COLLATE \"C\"",
                    self.col(i),
                    self.set_value(i)
                )
            })
            .collect::<Vec<_>>()
            .join(" OR ")
    }

    /// Every matched batch row, and whether writing it would change anything.
    fn compare_sql(&self) -> String {
        format!(
            "SELECT s.ord, {} FROM {} AS s JOIN {} AS t ON {}",
            self.differs(),
            self.staging,
            self.table,
            self.matches()
        )
    }

    /// Whether matched rows are compared before they are written: always
    /// with `update_on_difference`, and where an unchanged row need not be
    /// rewritten.
    fn compares(&self) -> bool {
        !self.set_cols.is_empty()
            && (self.plan.update_on_difference
                || (self.quiet && (!self.mostly_changed || self.uncompared >= RESAMPLE)))
    }

    fn exists_sql(&self) -> String {
        format!(
            "SELECT s.ord FROM {} AS s WHERE EXISTS (SELECT 1 FROM {} AS t WHERE {})",
            self.staging,
            self.table,
            self.matches()
        )
    }

    fn delete_sql(&self) -> String {
        format!(
            "DELETE FROM {} AS t USING {} AS s WHERE {} RETURNING s.ord",
            self.table,
            self.staging,
            self.matches()
        )
    }

    fn insert_select_sql(&self) -> String {
        let names: Vec<String> = self.insert_cols.iter().map(|&i| self.col(i)).collect();
        let vals: Vec<String> = self.insert_cols.iter().map(|&i| self.val(i)).collect();
        // The rows that matched nothing: exactly those no earlier step answered
        // for, found by the join instead of a long list of row numbers.
        format!(
            "INSERT INTO {} ({}) SELECT {} FROM {} AS s WHERE NOT EXISTS (SELECT 1 FROM {} AS t WHERE {}) ORDER BY s.ord",
            self.table,
            names.join(", "),
            vals.join(", "),
            self.staging,
            self.table,
            self.matches()
        )
    }

    fn copy_sql(&self) -> String {
        let names: Vec<String> = self.insert_cols.iter().map(|&i| self.col(i)).collect();
        format!("COPY {} ({}) FROM STDIN", self.table, names.join(", "))
    }
}

/// Appends `v` in COPY's text format; blank text is NULL where `blank_is_null`.
fn copy_value(out: &mut Vec<u8>, v: &Value, blank_is_null: bool) {
    if blank_is_null && matches!(v, Value::Text(s) if s.trim().is_empty()) {
        out.extend_from_slice(b"\\N");
        return;
    }
    copy_text(out, v);
}

/// Appends `v` in COPY's text format.
fn copy_text(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"\\N"),
        Value::Text(s) => {
            for b in s.bytes() {
                match b {
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    _ => out.push(b),
                }
            }
        }
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

struct PostgresDestination {
    config: PostgresConfig,
    client: Client,
    plans: Vec<StagePlan>,
    stages: Vec<StageSql>,
    preview: bool,
}

impl PostgresDestination {
    /// Checks the tables and makes the session's staging tables; again after a reconnect.
    fn prepare_session(&mut self) -> Result<(), ConnectorError> {
        if self.preview {
            self.client
                .batch_execute("BEGIN")
                .map_err(to_connector_error)?;
        }
        let mut stages = Vec::new();
        for (i, plan) in self.plans.iter().enumerate() {
            let st = StageSql::new(&mut self.client, plan, i)?;
            if plan.action != StageAction::Insert {
                let cols: Vec<String> = (0..st.columns.len())
                    .map(|k| format!("v{k} text"))
                    .collect();
                self.client
                    .batch_execute(&format!(
                        "CREATE TEMP TABLE IF NOT EXISTS {} (ord int4, {}) ON COMMIT DELETE ROWS",
                        st.staging,
                        cols.join(", ")
                    ))
                    .map_err(to_connector_error)?;
            }
            stages.push(st);
        }
        self.stages = stages;
        Ok(())
    }

    fn stage_rows(&mut self, st: usize, rows: &[&[Value]]) -> Result<(), postgres::Error> {
        let staging = self.stages[st].staging.clone();
        // The staging table has no statistics, and the target's are often
        // stale while it grows: left alone, the planner hashes the whole
        // table for every batch (quadratic). With an index, probe it.
        let plan = if self.stages[st].indexed {
            "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; "
        } else {
            "SET LOCAL enable_hashjoin = on; SET LOCAL enable_mergejoin = on; "
        };
        // DELETE, not TRUNCATE: on a small temporary table it is cheaper and
        // leaves the catalog alone; commits empty the table anyway.
        self.client
            .batch_execute(&format!("{plan}DELETE FROM {staging}"))?;
        let mut w = self.client.copy_in(&format!("COPY {staging} FROM STDIN"))?;
        let mut buf = Vec::with_capacity(64 * 1024);
        for (ord, row) in rows.iter().enumerate() {
            let _ = write!(buf, "{ord}");
            for (i, v) in row.iter().enumerate() {
                buf.push(b'\t');
                copy_value(&mut buf, v, self.stages[st].columns[i].blank_is_null);
            }
            buf.push(b'\n');
            if buf.len() > 60 * 1024 {
                // A failed write shows again, with the server's reason, in finish().
                let _ = w.write_all(&buf);
                buf.clear();
            }
        }
        let _ = w.write_all(&buf);
        w.finish()?;
        Ok(())
    }

    /// The staging row numbers `sql` returns; `$1` is `listed` when given.
    fn ords(&mut self, sql: &str, listed: &[i32]) -> Result<Vec<usize>, postgres::Error> {
        let rows = if listed.is_empty() {
            self.client.query(sql, &[])?
        } else {
            self.client.query(sql, &[&listed])?
        };
        Ok(rows.iter().map(|r| r.get::<_, i32>(0) as usize).collect())
    }

    /// Inserts `rows` into the stage's table by COPY.
    fn copy_into_table<'r>(
        &mut self,
        st: usize,
        rows: impl Iterator<Item = &'r [Value]>,
    ) -> Result<(), postgres::Error> {
        let sql = self.stages[st].copy_sql();
        let cols = self.stages[st].insert_cols.clone();
        let blank: Vec<bool> = cols
            .iter()
            .map(|&i| self.stages[st].columns[i].blank_is_null)
            .collect();
        let mut w = self.client.copy_in(&sql)?;
        let mut buf = Vec::with_capacity(64 * 1024);
        for row in rows {
            for (k, &i) in cols.iter().enumerate() {
                if k > 0 {
                    buf.push(b'\t');
                }
                copy_value(&mut buf, &row[i], blank[k]);
            }
            buf.push(b'\n');
            if buf.len() > 60 * 1024 {
                // A failed write shows again, with the server's reason, in finish().
                let _ = w.write_all(&buf);
                buf.clear();
            }
        }
        let _ = w.write_all(&buf);
        w.finish()?;
        Ok(())
    }

    /// The set-based write of one batch for one stage.
    fn write_stage(
        &mut self,
        st: usize,
        rows: &[&[Value]],
    ) -> Result<Vec<RowAction>, BatchError<postgres::Error>> {
        let n = rows.len();
        let action = self.stages[st].plan.action;
        if action == StageAction::Insert {
            self.copy_into_table(st, rows.iter().copied())?;
            return Ok(vec![RowAction::Insert; n]);
        }
        let inserts_new = matches!(action, StageAction::UpdateInsert | StageAction::SkipInsert);
        if inserts_new && self.stages[st].unique_on_match && self.stages[st].expect_new {
            // Most likely nothing matches: try the batch as a plain COPY; a
            // broken key means something did, and the batch takes the full path.
            self.client.batch_execute("SAVEPOINT tidepool_new")?;
            match self.copy_into_table(st, rows.iter().copied()) {
                Ok(()) => {
                    self.client
                        .batch_execute("RELEASE SAVEPOINT tidepool_new")?;
                    return Ok(vec![RowAction::Insert; n]);
                }
                Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
                    self.client.batch_execute(
                        "ROLLBACK TO SAVEPOINT tidepool_new; RELEASE SAVEPOINT tidepool_new",
                    )?;
                    self.stages[st].expect_new = false;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.stage_rows(st, rows)?;
        let mut out: Vec<Option<RowAction>> = vec![None; n];
        let s = &self.stages[st];
        let on_difference = s.plan.update_on_difference;
        let (update, compare, exists, delete, insert) = (
            s.update_sql(),
            s.compares().then(|| s.compare_sql()),
            s.exists_sql(),
            s.delete_sql(),
            s.insert_select_sql(),
        );
        let mark = |out: &mut Vec<Option<RowAction>>, ords: Vec<usize>, a: RowAction| {
            for o in ords {
                if let Some(slot) = out.get_mut(o)
                    && slot.is_none()
                {
                    *slot = Some(a);
                }
            }
        };
        match action {
            StageAction::Insert => unreachable!("handled above"),
            StageAction::Delete => {
                let d = self.ords(&delete, &[])?;
                mark(&mut out, d, RowAction::Delete);
            }
            StageAction::Update | StageAction::UpdateInsert
                if self.stages[st].set_cols.is_empty() =>
            {
                // Nothing to write: a match is a skip.
                let e = self.ords(&exists, &[])?;
                mark(&mut out, e, RowAction::Skip);
            }
            StageAction::Update | StageAction::UpdateInsert => match compare {
                Some(compare) => {
                    // One probe finds the matched rows and which of them
                    // change; only those are written.
                    let mut differs = vec![false; n];
                    for r in self.client.query(&compare, &[])? {
                        let o = r.get::<_, i32>(0) as usize;
                        if o < n {
                            differs[o] |= r.get::<_, Option<bool>>(1).unwrap_or(false);
                            out[o] = Some(RowAction::Skip);
                        }
                    }
                    let changed: Vec<i32> =
                        (0..n).filter(|&o| differs[o]).map(|o| o as i32).collect();
                    let matched = out.iter().filter(|a| a.is_some()).count();
                    let stage = &mut self.stages[st];
                    stage.uncompared = 0;
                    if matched > 0 {
                        stage.mostly_changed = changed.len() * 2 > matched;
                    }
                    if !changed.is_empty() {
                        let mut written = vec![false; n];
                        let sql = format!("{update} AND s.ord = ANY($1) RETURNING s.ord");
                        for o in self.ords(&sql, &changed)? {
                            if let Some(w) = written.get_mut(o) {
                                *w = true;
                            }
                        }
                        if changed.iter().any(|&o| !written[o as usize]) {
                            // A row went away since the probe: let the
                            // row-by-row replay give each its true outcome.
                            return Err(BatchError::Changed);
                        }
                    }
                    for (o, slot) in out.iter_mut().enumerate() {
                        if slot.is_some() && (differs[o] || !on_difference) {
                            *slot = Some(RowAction::Update);
                        }
                    }
                }
                None => {
                    self.stages[st].uncompared += 1;
                    let u = self.ords(&format!("{update} RETURNING s.ord"), &[])?;
                    mark(&mut out, u, RowAction::Update);
                }
            },
            StageAction::SkipInsert => {
                let e = self.ords(&exists, &[])?;
                mark(&mut out, e, RowAction::Skip);
            }
        }
        if matches!(action, StageAction::UpdateInsert | StageAction::SkipInsert) {
            let missing: Vec<i32> = out
                .iter()
                .enumerate()
                .filter(|(_, a)| a.is_none())
                .map(|(i, _)| i as i32)
                .collect();
            self.stages[st].expect_new = missing.len() == n;
            if !missing.is_empty() {
                if self.stages[st].indexed {
                    // The rows that matched nothing go straight in by COPY, with
                    // no second probe; a row another writer inserted meanwhile
                    // breaks the unique index and the batch is replayed row by row.
                    self.copy_into_table(st, missing.iter().map(|&i| rows[i as usize]))?;
                } else {
                    let n = self.client.execute(&insert, &[])?;
                    if n as usize != missing.len() {
                        // Someone else wrote these rows meanwhile: let the row-by-row
                        // replay give each its true outcome.
                        return Err(BatchError::Changed);
                    }
                }
                for &i in &missing {
                    out[i as usize] = Some(RowAction::Insert);
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|a| a.unwrap_or(RowAction::Ignore))
            .collect())
    }
}

impl SavepointWriter for PostgresDestination {
    type DbError = postgres::Error;

    fn execute(&mut self, sql: &str) -> Result<(), ConnectorError> {
        self.client.batch_execute(sql).map_err(to_connector_error)
    }

    fn write_batch(
        &mut self,
        stage: usize,
        rows: &[&[Value]],
    ) -> Result<Vec<RowAction>, BatchError<postgres::Error>> {
        self.write_stage(stage, rows)
    }

    fn preview(&self) -> bool {
        self.preview
    }

    fn match_cols(&self, stage: usize) -> Option<&[usize]> {
        let s = &self.stages[stage];
        (s.plan.action != StageAction::Insert).then_some(s.match_cols.as_slice())
    }

    fn classify(e: &postgres::Error) -> ConnectorError {
        if is_lost(e) {
            ConnectorError::Lost(pg_message(e))
        } else {
            ConnectorError::Io(pg_message(e))
        }
    }
}

impl Destination for PostgresDestination {
    fn begin(&mut self) -> Result<(), ConnectorError> {
        if self.client.is_closed() {
            if self.preview {
                return Err(ConnectorError::Io(
                    "the connection was lost during a preview; its work is gone".into(),
                ));
            }
            // A server that does not take the new connection is still "lost":
            // the engine's retry policy applies, then the job fails.
            self.client = self.config.connect().map_err(reconnect_failed)?;
            self.prepare_session()?;
        }
        self.begin_batch()
    }

    fn write(
        &mut self,
        stage: usize,
        rows: &[&[Value]],
    ) -> Result<Vec<WriteResult>, ConnectorError> {
        self.write_in_savepoint(stage, rows)
    }

    fn commit(&mut self) -> Result<(), ConnectorError> {
        self.commit_batch()
    }

    fn rollback(&mut self) -> Result<(), ConnectorError> {
        self.rollback_batch()
    }

    fn notes(&self) -> Vec<String> {
        self.stages
            .iter()
            .filter_map(|s| unindexed_note(&s.plan, &s.table, s.indexed))
            .collect()
    }

    fn finish(self: Box<Self>) -> Result<(), ConnectorError> {
        let mut this = *self;
        if this.client.is_closed() {
            // Every batch was committed or reported; a dead connection has
            // nothing left to lose (its loss was already reported).
            return Ok(());
        }
        if this.preview {
            let _ = this.client.batch_execute("ROLLBACK");
        }
        this.client.close().map_err(to_connector_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_and_nulls() {
        let mut b = Vec::new();
        copy_text(&mut b, &Value::from("a\tb\\c\nd"));
        b.push(b'|');
        copy_text(&mut b, &Value::Null);
        b.push(b'|');
        copy_text(&mut b, &Value::Float(0.1));
        assert_eq!(String::from_utf8(b).unwrap(), "a\\tb\\\\c\\nd|\\N|0.1");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
    }
}
