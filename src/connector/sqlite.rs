//! SQLite databases: an origin that streams a query, a destination with all five
//! stage actions, `match` fields as the WHERE.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{CachedStatement, Connection, ErrorCode, OpenFlags, Statement};
use serde::Deserialize;

use super::{
    ALL_ACTIONS, Capabilities, ColumnSets, Connector, ConnectorError, Destination,
    DestinationRequest, Flow, Origin, OriginInput, OriginRequest, RowAction, RowRead, StagePlan,
    WriteResult, bind_tokens, find_columns, resolve_path, unindexed_note,
};
use crate::connector::StageAction;
use crate::value::{Row, Value};

/// `kind = "sqlite"`: a SQLite database file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteConfig {
    /// The database file; relative to the project folder.
    pub path: PathBuf,
    /// SQL run each time the connection opens, e.g. `CREATE TABLE IF NOT EXISTS …`.
    /// It must be safe to run again. With it, a missing database file is created.
    #[serde(default)]
    pub init_sql: Vec<String>,
    /// `PRAGMA journal_mode` to set (`wal`, `delete`, …); left alone by default.
    pub journal_mode: Option<String>,
    /// `PRAGMA synchronous` to set (`off`, `normal`, `full`, `extra`); left alone by default.
    pub synchronous: Option<String>,
    /// How long to wait for another writer's lock, in milliseconds. Default 60000.
    #[serde(default = "default_busy_ms")]
    pub busy_timeout_ms: u64,
}

fn default_busy_ms() -> u64 {
    60_000
}

const JOURNAL_MODES: &[&str] = &["delete", "truncate", "persist", "memory", "wal", "off"];
const SYNC_MODES: &[&str] = &["off", "normal", "full", "extra"];

impl SqliteConfig {
    fn open(&self, base: &Path, preview: bool) -> Result<(Connection, PathBuf), ConnectorError> {
        let path = resolve_path(base, &self.path);
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let create = !self.init_sql.is_empty() && !preview;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
            if let Some(dir) = path.parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|e| ConnectorError::Open {
                    what: format!("sqlite database {}", path.display()),
                    reason: e.to_string(),
                    cause: Some(e.into()),
                })?;
            }
        }
        let open_err = |reason: String, cause: Option<rusqlite::Error>| ConnectorError::Open {
            what: format!("sqlite database {}", path.display()),
            reason,
            cause: cause.map(Into::into),
        };
        let conn = if path.exists() || create {
            Connection::open_with_flags(&path, flags)
        } else if preview && !self.init_sql.is_empty() {
            // A preview must not create the file: it sees the empty database a
            // real run would start from.
            Connection::open_in_memory()
        } else {
            return Err(open_err(
                "the file does not exist (give init_sql to create it)".into(),
                None,
            ));
        }
        .map_err(|e| open_err(e.to_string(), Some(e)))?;
        conn.busy_timeout(Duration::from_millis(self.busy_timeout_ms))
            .map_err(|e| open_err(e.to_string(), Some(e)))?;
        conn.set_prepared_statement_cache_capacity(64);
        if let Some(mode) = &self.journal_mode {
            let m = mode.to_ascii_lowercase();
            if !JOURNAL_MODES.contains(&m.as_str()) {
                return Err(ConnectorError::schema(format!(
                    "journal_mode {mode:?} is not one of {}",
                    JOURNAL_MODES.join(", ")
                )));
            }
            if !preview {
                conn.query_row(&format!("PRAGMA journal_mode={m}"), [], |_| Ok(()))
                    .map_err(|e| open_err(format!("setting journal_mode: {e}"), Some(e)))?;
            }
        }
        if let Some(mode) = &self.synchronous {
            let m = mode.to_ascii_lowercase();
            if !SYNC_MODES.contains(&m.as_str()) {
                return Err(ConnectorError::schema(format!(
                    "synchronous {mode:?} is not one of {}",
                    SYNC_MODES.join(", ")
                )));
            }
            conn.execute_batch(&format!("PRAGMA synchronous={m}"))
                .map_err(|e| open_err(format!("setting synchronous: {e}"), Some(e)))?;
        }
        Ok((conn, path))
    }

    fn run_init(&self, conn: &Connection) -> Result<(), ConnectorError> {
        for sql in &self.init_sql {
            conn.execute_batch(sql)
                .map_err(|e| ConnectorError::schema_caused(format!("init_sql failed: {e}"), e))?;
        }
        Ok(())
    }
}

impl Connector for SqliteConfig {
    fn target(&self) -> super::Target<'_> {
        super::Target::File(&self.path)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            actions: ALL_ACTIONS,
            origin: OriginInput::Query,
            needs_table: true,
            max_writers: None,
            batch_size: 5_000,
        }
    }

    fn open_origin(&self, req: &OriginRequest) -> Result<Box<dyn Origin>, ConnectorError> {
        let query = req
            .query
            .ok_or_else(|| ConnectorError::schema("a sqlite origin needs origin.query"))?;
        let (conn, path) = self.open(req.base_dir, req.preview)?;
        if req.preview {
            // init_sql runs inside a transaction that is never committed: the
            // query sees the tables, the file is left as it was.
            conn.execute_batch("BEGIN").map_err(ConnectorError::io)?;
        }
        self.run_init(&conn)?;
        let (sql, params) = bind_tokens(query, req.variables, |n| format!("?{n}"))
            ?;
        let columns = {
            let stmt = conn.prepare(&sql).map_err(|e| {
                ConnectorError::schema_caused(format!("origin query on {}: {e}", path.display()), e)
            })?;
            stmt.column_names().into_iter().map(str::to_owned).collect()
        };
        Ok(Box::new(SqliteOrigin {
            conn,
            sql,
            params,
            columns,
        }))
    }

    fn open_lookup(&self, base_dir: &Path) -> Result<Box<dyn super::Lookup>, ConnectorError> {
        let (conn, _) = self.open(base_dir, true)?;
        Ok(Box::new(SqliteLookup { conn }))
    }

    fn open_destination(
        &self,
        req: &DestinationRequest,
    ) -> Result<Box<dyn Destination>, ConnectorError> {
        let (conn, path) = self.open(req.base_dir, req.preview)?;
        if req.preview {
            // One transaction for the whole run, rolled back in `finish`;
            // batches are savepoints inside it.
            conn.execute_batch("BEGIN IMMEDIATE")
                .map_err(ConnectorError::io)?;
        }
        self.run_init(&conn)?;
        let stages = req
            .stages
            .iter()
            .map(|s| StageSql::new(&conn, s, &path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Box::new(SqliteDestination {
            conn,
            stages,
            preview: req.preview,
        }))
    }
}

struct SqliteOrigin {
    conn: Connection,
    sql: String,
    params: Vec<Value>,
    columns: Vec<String>,
}

impl Origin for SqliteOrigin {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn read(&mut self, sink: &mut dyn FnMut(RowRead) -> Flow) -> Result<(), ConnectorError> {
        let mut stmt = self.conn.prepare(&self.sql).map_err(ConnectorError::io)?;
        for (i, p) in self.params.iter().enumerate() {
            stmt.raw_bind_parameter(i + 1, plain(p))
                .map_err(ConnectorError::io)?;
        }
        let n = self.columns.len();
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next().map_err(ConnectorError::io)? {
            let mut values = Vec::with_capacity(n);
            for i in 0..n {
                let v = row.get_ref(i).map_err(ConnectorError::io)?;
                values.push(from_sql(v));
            }
            if sink(Ok(Row::from_values(values))) == Flow::Stop {
                break;
            }
        }
        Ok(())
    }
}

fn from_sql(v: ValueRef) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Text(String::from_utf8_lossy(b).into_owned()),
    }
}

/// A value bound as it is, without column affinity (query parameters).
fn plain(v: &Value) -> ToSqlOutput<'_> {
    match v {
        Value::Null => ToSqlOutput::Owned(rusqlite::types::Value::Null),
        Value::Bool(b) => ToSqlOutput::Owned(rusqlite::types::Value::Integer(*b as i64)),
        Value::Int(i) => ToSqlOutput::Owned(rusqlite::types::Value::Integer(*i)),
        Value::Float(f) => ToSqlOutput::Owned(rusqlite::types::Value::Real(*f)),
        Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
    }
}

/// SQLite's type affinity of a column, from its declared type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Affinity {
    Integer,
    Text,
    Blob,
    Real,
    Numeric,
}

impl Affinity {
    fn of(declared: &str) -> Affinity {
        let t = declared.to_ascii_uppercase();
        if t.contains("INT") {
            Affinity::Integer
        } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
            Affinity::Text
        } else if t.contains("BLOB") || t.is_empty() {
            Affinity::Blob
        } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
            Affinity::Real
        } else {
            Affinity::Numeric
        }
    }
}

/// A destination column: its real name and declared type.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    declared: String,
    affinity: Affinity,
}

impl Column {
    /// Converts `v` to what the column holds; text that is not a number does
    /// not fit a numeric column and is a row error naming the column.
    fn bind<'a>(&self, v: &'a Value) -> Result<ToSqlOutput<'a>, String> {
        use rusqlite::types::Value as Sv;
        let Value::Text(s) = v else {
            return Ok(plain(v));
        };
        let numeric = match self.affinity {
            Affinity::Text | Affinity::Blob => return Ok(plain(v)),
            a => a,
        };
        let t = s.trim();
        if t.is_empty() {
            return Ok(ToSqlOutput::Owned(Sv::Null));
        }
        if numeric != Affinity::Real
            && let Ok(i) = t.parse::<i64>()
        {
            return Ok(ToSqlOutput::Owned(Sv::Integer(i)));
        }
        match t.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(ToSqlOutput::Owned(Sv::Real(f))),
            _ => Err(format!(
                "column {:?} ({}) cannot hold {s:?}: not a number",
                self.name, self.declared
            )),
        }
    }
}

/// Lookups on their own connection, statements cached by shape.
struct SqliteLookup {
    conn: Connection,
}

impl super::Lookup for SqliteLookup {
    fn find(
        &mut self,
        table: &str,
        field: &str,
        criteria: &[(String, Value)],
    ) -> Result<Option<Value>, ConnectorError> {
        let sql = super::lookup_sql(table, field, criteria, quote_ident, |n| format!("?{n}"));
        let mut stmt = self
            .conn
            .prepare_cached(&sql)
            .map_err(|e| ConnectorError::schema_caused(format!("lookup in {table:?}: {e}"), e))?;
        let params = criteria.iter().map(|(_, v)| v).filter(|v| !v.is_null());
        for (i, p) in params.enumerate() {
            stmt.raw_bind_parameter(i + 1, plain(p))
                .map_err(ConnectorError::io)?;
        }
        let mut rows = stmt.raw_query();
        match rows.next().map_err(ConnectorError::io)? {
            Some(r) => Ok(Some(from_sql(r.get_ref(0).map_err(ConnectorError::io)?))),
            None => Ok(None),
        }
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The SQL of one stage, built once when the destination opens.
struct StageSql {
    plan: StagePlan,
    table: String,
    columns: Vec<Column>,
    /// Plan column indices written on insert / set on update / used as the WHERE.
    insert_cols: Vec<usize>,
    set_cols: Vec<usize>,
    match_cols: Vec<usize>,
    /// An index (or the rowid) starts with a match column; without one each
    /// row's lookup scans the table.
    indexed: bool,
}

impl StageSql {
    fn new(conn: &Connection, plan: &StagePlan, path: &Path) -> Result<Self, ConnectorError> {
        let table = plan
            .table
            .clone()
            .ok_or_else(|| ConnectorError::schema(format!("stage {:?} has no table", plan.name)))?;
        let existing: Vec<(String, String)> = {
            let mut stmt = conn
                .prepare("SELECT name, type FROM pragma_table_info(?1)")
                .map_err(ConnectorError::io)?;
            stmt.query_map([&table], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|rows| rows.collect())
                .map_err(ConnectorError::io)?
        };
        if existing.is_empty() {
            return Err(ConnectorError::schema(format!(
                "table {table:?} does not exist in {} (stage {:?}); create it, or add init_sql to the connection",
                path.display(),
                plan.name
            )));
        }
        let columns: Vec<Column> = find_columns(&existing, plan, &table)?
            .into_iter()
            .map(|(name, declared)| Column {
                name: name.clone(),
                declared: declared.clone(),
                affinity: Affinity::of(declared),
            })
            .collect();
        let sets = ColumnSets::of(plan);
        // The first column of each index, and the INTEGER PRIMARY KEY, which
        // is the rowid and in no index list.
        let leading: Vec<String> = conn
            .prepare(
                "SELECT ii.name FROM pragma_index_list(?1) AS il, pragma_index_info(il.name) AS ii
                 WHERE ii.seqno = 0
                 UNION ALL
                 SELECT name FROM pragma_table_info(?1)
                 WHERE pk = 1 AND upper(type) = 'INTEGER'
                   AND (SELECT count(*) FROM pragma_table_info(?1) WHERE pk > 0) = 1",
            )
            .and_then(|mut stmt| {
                stmt.query_map([&table], |r| r.get(0))
                    .and_then(|rows| rows.collect())
            })
            .map_err(ConnectorError::io)?;
        let indexed = sets.matches.iter().any(|&i: &usize| {
            leading
                .iter()
                .any(|l| l.eq_ignore_ascii_case(&columns[i].name))
        });
        Ok(StageSql {
            indexed,
            table: quote_ident(&table),
            insert_cols: sets.insert,
            set_cols: sets.set,
            match_cols: sets.matches,
            columns,
            plan: plan.clone(),
        })
    }

    fn keep(&self, row: &[Value], cols: &[usize]) -> Vec<usize> {
        if self.plan.omit_blank {
            cols.iter()
                .copied()
                .filter(|&i| !row[i].is_blank() || self.plan.columns[i].is_match)
                .collect()
        } else {
            cols.to_vec()
        }
    }

    fn insert_sql(&self, cols: &[usize]) -> String {
        if cols.is_empty() {
            return format!("INSERT INTO {} DEFAULT VALUES", self.table);
        }
        let names: Vec<String> = cols
            .iter()
            .map(|&i| quote_ident(&self.columns[i].name))
            .collect();
        let marks: Vec<String> = (1..=cols.len()).map(|n| format!("?{n}")).collect();
        format!(
            "INSERT INTO {} ({}) VALUES ({})",
            self.table,
            names.join(", "),
            marks.join(", ")
        )
    }

    fn where_sql(&self, first_param: usize) -> String {
        self.match_cols
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                format!(
                    "{} IS ?{}",
                    quote_ident(&self.columns[i].name),
                    first_param + k
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// UPDATE with `set` (plan indices) as ?1..; match values follow.
    fn update_sql(&self, set: &[usize]) -> String {
        let sets: Vec<String> = set
            .iter()
            .enumerate()
            .map(|(k, &i)| format!("{} = ?{}", quote_ident(&self.columns[i].name), k + 1))
            .collect();
        let mut sql = format!(
            "UPDATE {} SET {} WHERE {}",
            self.table,
            sets.join(", "),
            self.where_sql(set.len() + 1)
        );
        if self.plan.update_on_difference {
            let diffs: Vec<String> = set
                .iter()
                .enumerate()
                .map(|(k, &i)| format!("{} IS NOT ?{}", quote_ident(&self.columns[i].name), k + 1))
                .collect();
            sql.push_str(&format!(" AND ({})", diffs.join(" OR ")));
        }
        sql
    }

    fn exists_sql(&self) -> String {
        format!(
            "SELECT 1 FROM {} WHERE {} LIMIT 1",
            self.table,
            self.where_sql(1)
        )
    }

    fn delete_sql(&self) -> String {
        format!("DELETE FROM {} WHERE {}", self.table, self.where_sql(1))
    }
}

/// A failed statement: either this row's problem, or the batch's.
enum Failure {
    Row(String),
    Batch(ConnectorError),
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        let batch = matches!(
            e.sqlite_error_code(),
            Some(
                ErrorCode::DatabaseBusy
                    | ErrorCode::DatabaseLocked
                    | ErrorCode::SystemIoFailure
                    | ErrorCode::DiskFull
                    | ErrorCode::OutOfMemory
                    | ErrorCode::ReadOnly
                    | ErrorCode::DatabaseCorrupt
                    | ErrorCode::NotADatabase
                    | ErrorCode::CannotOpen
            )
        );
        if batch {
            Failure::Batch(ConnectorError::io(e))
        } else {
            Failure::Row(e.to_string())
        }
    }
}

struct SqliteDestination {
    conn: Connection,
    stages: Vec<StageSql>,
    preview: bool,
}

/// Binds `cols` (plan indices) of `row` as ?first.. in order.
fn bind_cols(
    stmt: &mut Statement,
    st: &StageSql,
    row: &[Value],
    cols: &[usize],
    first: usize,
) -> Result<(), Failure> {
    for (k, &i) in cols.iter().enumerate() {
        let v = st.columns[i].bind(&row[i]).map_err(Failure::Row)?;
        stmt.raw_bind_parameter(first + k, v)?;
    }
    Ok(())
}

/// A stage's statements, prepared once per batch. With `omit_blank` the
/// written columns vary per row, so insert and update are built per row.
struct Prepared<'c> {
    insert: Option<CachedStatement<'c>>,
    update: Option<CachedStatement<'c>>,
    exists: Option<CachedStatement<'c>>,
    delete: Option<CachedStatement<'c>>,
}

impl<'c> Prepared<'c> {
    fn new(conn: &'c Connection, st: &StageSql) -> Result<Self, rusqlite::Error> {
        let fixed = !st.plan.omit_blank;
        let (ins, upd, ex, del) = match st.plan.action {
            StageAction::Insert => (true, false, false, false),
            StageAction::Update => (
                false,
                true,
                st.plan.update_on_difference || st.set_cols.is_empty(),
                false,
            ),
            StageAction::Delete => (false, false, false, true),
            StageAction::UpdateInsert => (
                true,
                true,
                st.plan.update_on_difference || st.set_cols.is_empty(),
                false,
            ),
            StageAction::SkipInsert => (true, false, true, false),
        };
        let prep = |want: bool,
                    sql: &dyn Fn() -> String|
         -> Result<Option<CachedStatement<'c>>, rusqlite::Error> {
            if want {
                conn.prepare_cached(&sql()).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok(Prepared {
            insert: prep(ins && fixed, &|| st.insert_sql(&st.insert_cols))?,
            update: prep(upd && fixed && !st.set_cols.is_empty(), &|| {
                st.update_sql(&st.set_cols)
            })?,
            exists: prep(ex, &|| st.exists_sql())?,
            delete: prep(del, &|| st.delete_sql())?,
        })
    }
}

impl SqliteDestination {
    fn exists(&self, p: &mut Prepared, st: &StageSql, row: &[Value]) -> Result<bool, Failure> {
        let stmt = p.exists.as_mut().expect("exists statement prepared");
        bind_cols(stmt, st, row, &st.match_cols, 1)?;
        let mut rows = stmt.raw_query();
        Ok(rows.next()?.is_some())
    }

    fn insert(&self, p: &mut Prepared, st: &StageSql, row: &[Value]) -> Result<RowAction, Failure> {
        match p.insert.as_mut() {
            Some(stmt) => {
                bind_cols(stmt, st, row, &st.insert_cols, 1)?;
                stmt.raw_execute()?;
            }
            None => {
                let cols = st.keep(row, &st.insert_cols);
                let mut stmt = self.conn.prepare_cached(&st.insert_sql(&cols))?;
                bind_cols(&mut stmt, st, row, &cols, 1)?;
                stmt.raw_execute()?;
            }
        }
        Ok(RowAction::Insert)
    }

    /// Updates; `Ok(None)` when no row matches.
    fn update(
        &self,
        p: &mut Prepared,
        st: &StageSql,
        row: &[Value],
    ) -> Result<Option<RowAction>, Failure> {
        if st.set_cols.is_empty() {
            return Ok(self.exists(p, st, row)?.then_some(RowAction::Skip));
        }
        let changed = match p.update.as_mut() {
            Some(stmt) => {
                bind_cols(stmt, st, row, &st.set_cols, 1)?;
                bind_cols(stmt, st, row, &st.match_cols, st.set_cols.len() + 1)?;
                stmt.raw_execute()?
            }
            None => {
                let set = st.keep(row, &st.set_cols);
                if set.is_empty() {
                    let mut stmt = self.conn.prepare_cached(&st.exists_sql())?;
                    bind_cols(&mut stmt, st, row, &st.match_cols, 1)?;
                    let found = stmt.raw_query().next()?.is_some();
                    return Ok(found.then_some(RowAction::Skip));
                }
                let mut stmt = self.conn.prepare_cached(&st.update_sql(&set))?;
                bind_cols(&mut stmt, st, row, &set, 1)?;
                bind_cols(&mut stmt, st, row, &st.match_cols, set.len() + 1)?;
                stmt.raw_execute()?
            }
        };
        if changed > 0 {
            return Ok(Some(RowAction::Update));
        }
        if st.plan.update_on_difference && self.exists(p, st, row)? {
            return Ok(Some(RowAction::Skip));
        }
        Ok(None)
    }

    fn write_row(
        &self,
        p: &mut Prepared,
        st: &StageSql,
        row: &[Value],
    ) -> Result<RowAction, Failure> {
        match st.plan.action {
            StageAction::Insert => self.insert(p, st, row),
            StageAction::Update => Ok(self.update(p, st, row)?.unwrap_or(RowAction::Ignore)),
            StageAction::Delete => {
                let stmt = p.delete.as_mut().expect("delete statement prepared");
                bind_cols(stmt, st, row, &st.match_cols, 1)?;
                let n = stmt.raw_execute()?;
                Ok(if n > 0 {
                    RowAction::Delete
                } else {
                    RowAction::Ignore
                })
            }
            StageAction::UpdateInsert => match self.update(p, st, row)? {
                Some(a) => Ok(a),
                None => self.insert(p, st, row),
            },
            StageAction::SkipInsert => {
                if self.exists(p, st, row)? {
                    Ok(RowAction::Skip)
                } else {
                    self.insert(p, st, row)
                }
            }
        }
    }

    fn in_transaction(&self) -> bool {
        !self.conn.is_autocommit()
    }
}

impl Destination for SqliteDestination {
    fn begin(&mut self) -> Result<(), ConnectorError> {
        let sql = if self.preview {
            "SAVEPOINT tidepool_batch"
        } else {
            "BEGIN IMMEDIATE"
        };
        self.conn.execute_batch(sql).map_err(ConnectorError::io)
    }

    fn write(
        &mut self,
        stage: usize,
        rows: &[&[Value]],
    ) -> Result<Vec<WriteResult>, ConnectorError> {
        let st = &self.stages[stage];
        let mut p = Prepared::new(&self.conn, st)
            .map_err(|e| ConnectorError::schema_caused(format!("stage {:?}: {e}", st.plan.name), e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            match self.write_row(&mut p, st, row) {
                Ok(a) => out.push(Ok(a)),
                Err(Failure::Row(msg)) => {
                    if !self.in_transaction() {
                        // SQLite rolled the whole transaction back: the batch is lost.
                        return Err(ConnectorError::failed(msg));
                    }
                    out.push(Err(msg));
                }
                Err(Failure::Batch(e)) => return Err(e),
            }
        }
        Ok(out)
    }

    fn commit(&mut self) -> Result<(), ConnectorError> {
        let sql = if self.preview {
            "RELEASE tidepool_batch"
        } else {
            "COMMIT"
        };
        self.conn.execute_batch(sql).map_err(ConnectorError::io)
    }

    fn rollback(&mut self) -> Result<(), ConnectorError> {
        if self.preview {
            self.conn
                .execute_batch("ROLLBACK TO tidepool_batch; RELEASE tidepool_batch")
                .map_err(ConnectorError::io)
        } else if self.in_transaction() {
            self.conn
                .execute_batch("ROLLBACK")
                .map_err(ConnectorError::io)
        } else {
            Ok(())
        }
    }

    fn notes(&self) -> Vec<String> {
        self.stages
            .iter()
            .filter_map(|s| unindexed_note(&s.plan, &s.table, s.indexed))
            .collect()
    }

    fn finish(self: Box<Self>) -> Result<(), ConnectorError> {
        if self.preview && self.in_transaction() {
            self.conn
                .execute_batch("ROLLBACK")
                .map_err(ConnectorError::io)?;
        }
        self.conn.close().map_err(|(_, e)| ConnectorError::io(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_follows_sqlite_rules() {
        assert_eq!(Affinity::of("INTEGER"), Affinity::Integer);
        assert_eq!(Affinity::of("bigint"), Affinity::Integer);
        assert_eq!(Affinity::of("VARCHAR(20)"), Affinity::Text);
        assert_eq!(Affinity::of(""), Affinity::Blob);
        assert_eq!(Affinity::of("double precision"), Affinity::Real);
        assert_eq!(Affinity::of("decimal(10,2)"), Affinity::Numeric);
    }

    #[test]
    fn numeric_columns_reject_text() {
        let c = Column {
            name: "amount".into(),
            declared: "REAL".into(),
            affinity: Affinity::Real,
        };
        assert!(matches!(
            c.bind(&Value::from("12.5")),
            Ok(ToSqlOutput::Owned(rusqlite::types::Value::Real(_)))
        ));
        let err = c.bind(&Value::from("n/a")).unwrap_err();
        assert!(
            err.contains("\"amount\" (REAL) cannot hold \"n/a\""),
            "{err}"
        );
        assert!(matches!(
            c.bind(&Value::from(" ")),
            Ok(ToSqlOutput::Owned(rusqlite::types::Value::Null))
        ));
    }
}
