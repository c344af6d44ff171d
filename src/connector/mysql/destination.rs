//! The destination: multi-row inserts, a staging table for the other actions.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use mysql::prelude::Queryable;
use mysql::{Conn, Params};

use super::MysqlConfig;
use super::config::to_connector_error;
use super::types::{quote_ident, quote_table, to_param};
use crate::connector::sql_destination::{BatchError, SqlSession};
use crate::connector::{
    ColumnSets, ConnectorError, RowAction, StageAction, StagePlan, find_columns, unindexed_note,
};
use crate::value::Value;

/// Rows of one multi-row statement (MySQL allows 65,535 placeholders).
const MAX_PARAMS: usize = 60_000;

#[derive(Debug, Clone)]
struct Column {
    name: String,
    /// Blank text is NULL here (every type but the character ones).
    blank_is_null: bool,
}

/// MySQL's "Duplicate entry … for key …".
const ER_DUP_ENTRY: u16 = 1062;

struct StageSql {
    plan: StagePlan,
    table: String,
    staging: String,
    columns: Vec<Column>,
    insert_cols: Vec<usize>,
    set_cols: Vec<usize>,
    match_cols: Vec<usize>,
    /// A unique key is exactly the match columns: update/insert can write
    /// with one `INSERT … ON DUPLICATE KEY UPDATE`, after a probe of the keys.
    unique_on_match: bool,
    /// An index starts with a match column (without one, every batch's
    /// join scans the table).
    indexed: bool,
    /// The last one-statement upsert matched no row: the next batch is first
    /// tried as a plain insert (an upsert into an empty table runs as fast
    /// as an insert).
    expect_new: bool,
}

impl StageSql {
    fn new(conn: &mut Conn, plan: &StagePlan, index: usize) -> Result<Self, ConnectorError> {
        let table = plan
            .table
            .clone()
            .ok_or_else(|| ConnectorError::schema(format!("stage {:?} has no table", plan.name)))?;
        let (schema_sql, name) = match table.split_once('.') {
            Some((db, t)) => ("?", (Some(db.to_owned()), t.to_owned())),
            None => ("DATABASE()", (None, table.clone())),
        };
        let sql = format!(
            "SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = {schema_sql} AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION"
        );
        let params: Vec<mysql::Value> = match &name.0 {
            Some(db) => vec![db.as_str().into(), name.1.as_str().into()],
            None => vec![name.1.as_str().into()],
        };
        let existing: Vec<(String, String)> = conn.exec(sql, params).map_err(to_connector_error)?;
        const TEXT_TYPES: &[&str] = &[
            "char",
            "varchar",
            "text",
            "tinytext",
            "mediumtext",
            "longtext",
            "enum",
            "set",
        ];
        let columns: Vec<Column> = find_columns(&existing, plan, &table)?
            .into_iter()
            .map(|(n, ty)| Column {
                name: n.clone(),
                blank_is_null: !TEXT_TYPES.contains(&ty.to_ascii_lowercase().as_str()),
            })
            .collect();
        let sets = ColumnSets::of(plan);
        let sql = format!(
            "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS
             WHERE TABLE_SCHEMA = {schema_sql} AND TABLE_NAME = ? AND NON_UNIQUE = 0"
        );
        let params: Vec<mysql::Value> = match &name.0 {
            Some(db) => vec![db.as_str().into(), name.1.as_str().into()],
            None => vec![name.1.as_str().into()],
        };
        let unique: Vec<(String, String)> = conn.exec(sql, params).map_err(to_connector_error)?;
        let mut match_names: Vec<String> = sets
            .matches
            .iter()
            .map(|&i| columns[i].name.to_ascii_lowercase())
            .collect();
        match_names.sort();
        let mut by_index: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (index, col) in &unique {
            by_index
                .entry(index)
                .or_default()
                .push(col.to_ascii_lowercase());
        }
        // ON DUPLICATE KEY UPDATE fires on any unique key: every other one
        // must have a column the insert does not write (an auto-increment
        // id), or a new row could update some other row instead.
        let written: Vec<String> = sets
            .insert
            .iter()
            .map(|&i| columns[i].name.to_ascii_lowercase())
            .collect();
        let keys: Vec<Vec<String>> = by_index
            .into_values()
            .map(|mut cols| {
                cols.sort();
                cols
            })
            .collect();
        let unique_on_match = keys.contains(&match_names)
            && keys
                .iter()
                .all(|k| *k == match_names || k.iter().any(|c| !written.contains(c)));
        let sql = format!(
            "SELECT COLUMN_NAME FROM information_schema.STATISTICS
             WHERE TABLE_SCHEMA = {schema_sql} AND TABLE_NAME = ? AND SEQ_IN_INDEX = 1"
        );
        let params: Vec<mysql::Value> = match &name.0 {
            Some(db) => vec![db.as_str().into(), name.1.as_str().into()],
            None => vec![name.1.as_str().into()],
        };
        let leading: Vec<String> = conn.exec(sql, params).map_err(to_connector_error)?;
        let indexed = leading
            .iter()
            .any(|l| match_names.contains(&l.to_ascii_lowercase()));
        Ok(StageSql {
            indexed,
            plan: plan.clone(),
            table: quote_table(&table),
            staging: format!("tidepool_stage_{index}"),
            insert_cols: sets.insert,
            set_cols: sets.set,
            match_cols: sets.matches,
            columns,
            unique_on_match,
            expect_new: true,
        })
    }

    /// Whether update/insert takes the `ON DUPLICATE KEY UPDATE` path: a
    /// unique key on the match columns, every updated column also inserted,
    /// and no comparison of old and new values.
    fn upserts_in_one_statement(&self) -> bool {
        self.plan.action == StageAction::UpdateInsert
            && self.unique_on_match
            && !self.plan.update_on_difference
            && !self.set_cols.is_empty()
            && self.set_cols.iter().all(|c| self.insert_cols.contains(c))
    }

    /// The session's table of a batch's match values, for the key probe.
    fn keys_table(&self) -> String {
        format!("{}_keys", self.staging)
    }

    fn create_keys_table(&self, engine: &str) -> String {
        let cols: Vec<String> = self
            .match_cols
            .iter()
            .map(|&i| format!("t.{} AS v{i}", self.col(i)))
            .collect();
        format!(
            "CREATE TEMPORARY TABLE IF NOT EXISTS {} (tidepool_ord INT NOT NULL DEFAULT 0 PRIMARY KEY) {engine} SELECT {} FROM {} AS t LIMIT 0",
            self.keys_table(),
            cols.join(", "),
            self.table
        )
    }

    /// `ON DUPLICATE KEY UPDATE …` for the set columns.
    fn on_duplicate(&self) -> String {
        let sets: Vec<String> = self
            .set_cols
            .iter()
            .map(|&i| {
                let c = self.col(i);
                if self.plan.omit_blank {
                    format!(
                        "{c} = IF(VALUES({c}) IS NULL OR CAST(VALUES({c}) AS CHAR) = '', {c}, VALUES({c}))"
                    )
                } else {
                    format!("{c} = VALUES({c})")
                }
            })
            .collect();
        format!(" ON DUPLICATE KEY UPDATE {}", sets.join(", "))
    }

    fn col(&self, i: usize) -> String {
        quote_ident(&self.columns[i].name)
    }

    fn param(&self, i: usize, v: &Value) -> mysql::Value {
        if self.columns[i].blank_is_null && matches!(v, Value::Text(s) if s.trim().is_empty()) {
            mysql::Value::NULL
        } else {
            to_param(v)
        }
    }

    fn join(&self) -> String {
        self.match_cols
            .iter()
            .map(|&i| format!("t.{c} <=> s.v{i}", c = self.col(i)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn set_value(&self, i: usize) -> String {
        if self.plan.omit_blank {
            format!(
                "IF(s.v{i} IS NULL OR CAST(s.v{i} AS CHAR) = '', t.{c}, s.v{i})",
                c = self.col(i)
            )
        } else {
            format!("s.v{i}")
        }
    }

    fn unchanged(&self) -> String {
        self.set_cols
            .iter()
            .map(|&i| format!("t.{} <=> {}", self.col(i), self.set_value(i)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn create_staging(&self) -> String {
        let cols: Vec<String> = (0..self.columns.len())
            .map(|i| format!("t.{} AS v{i}", self.col(i)))
            .collect();
        format!(
            "CREATE TEMPORARY TABLE IF NOT EXISTS {} (tidepool_ord INT NOT NULL DEFAULT 0 PRIMARY KEY) SELECT {} FROM {} AS t LIMIT 0",
            self.staging,
            cols.join(", "),
            self.table
        )
    }
}

/// A session's connection and its stages' SQL.
pub(super) struct MysqlSession {
    conn: Conn,
    stages: Vec<StageSql>,
}

/// Multi-row `INSERT INTO table (cols) VALUES …` of `rows`, in chunks.
fn insert_rows(
    conn: &mut Conn,
    table: &str,
    names: &[String],
    rows: &mut dyn Iterator<Item = Vec<mysql::Value>>,
) -> Result<(), mysql::Error> {
    insert_rows_then(conn, table, names, rows, "").map(|_| ())
}

/// [`insert_rows`] with `tail` after each statement's values; the rows the
/// statements affected.
fn insert_rows_then(
    conn: &mut Conn,
    table: &str,
    names: &[String],
    rows: &mut dyn Iterator<Item = Vec<mysql::Value>>,
    tail: &str,
) -> Result<u64, mysql::Error> {
    let per_row = names.len().max(1);
    let chunk = (MAX_PARAMS / per_row).max(1);
    let head = format!("INSERT INTO {table} ({}) VALUES ", names.join(", "));
    let one = format!("({})", vec!["?"; names.len()].join(", "));
    let mut params = Vec::with_capacity(chunk * per_row);
    let mut count = 0usize;
    let mut affected = 0u64;
    let mut flush = |conn: &mut Conn, params: &mut Vec<mysql::Value>, count: &mut usize| {
        if *count == 0 {
            return Ok(());
        }
        let sql = format!("{head}{}{tail}", vec![one.as_str(); *count].join(", "));
        let r = conn.exec_drop(sql, Params::Positional(std::mem::take(params)));
        *count = 0;
        affected += conn.affected_rows();
        r
    };
    for row in rows {
        params.extend(row);
        count += 1;
        if count == chunk {
            flush(conn, &mut params, &mut count)?;
        }
    }
    flush(conn, &mut params, &mut count)?;
    Ok(affected)
}

impl MysqlSession {
    fn prepare_session(&mut self, plans: &[StagePlan], preview: bool) -> Result<(), ConnectorError> {
        if preview {
            self.conn
                .query_drop("START TRANSACTION")
                .map_err(to_connector_error)?;
        }
        let mut stages = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            let st = StageSql::new(&mut self.conn, plan, i)?;
            if plan.action != StageAction::Insert {
                self.conn
                    .query_drop(st.create_staging())
                    .map_err(to_connector_error)?;
            }
            if st.upserts_in_one_statement() {
                // In memory when the key's type allows it (not TEXT or BLOB).
                let in_memory = self.conn.query_drop(st.create_keys_table("ENGINE=MEMORY"));
                if in_memory.is_err() {
                    self.conn
                        .query_drop(st.create_keys_table(""))
                        .map_err(to_connector_error)?;
                }
            }
            stages.push(st);
        }
        self.stages = stages;
        Ok(())
    }

    fn ords(&mut self, sql: String) -> Result<Vec<usize>, mysql::Error> {
        let v: Vec<i64> = self.conn.query(sql)?;
        Ok(v.into_iter().map(|o| o as usize).collect())
    }

    /// Update/insert in one `INSERT … ON DUPLICATE KEY UPDATE`: a probe of the
    /// batch's keys tells updates from inserts first. (A locking probe would
    /// take gap locks that serialize, and deadlock, parallel writers.)
    /// Tries the batch as a plain multi-row insert in a savepoint: `true`
    /// when every row went in (so none matched); `false`, with nothing
    /// written, when a key was already there.
    fn insert_all_new(
        &mut self,
        st: usize,
        rows: &[&[Value]],
    ) -> Result<bool, BatchError<mysql::Error>> {
        let s = &self.stages[st];
        let names: Vec<String> = s.insert_cols.iter().map(|&i| s.col(i)).collect();
        let table = s.table.clone();
        let mut values = rows
            .iter()
            .map(|r| {
                s.insert_cols
                    .iter()
                    .map(|&i| s.param(i, &r[i]))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .into_iter();
        self.conn.query_drop("SAVEPOINT tidepool_new")?;
        match insert_rows(&mut self.conn, &table, &names, &mut values) {
            Ok(()) => {
                self.conn.query_drop("RELEASE SAVEPOINT tidepool_new")?;
                Ok(true)
            }
            Err(mysql::Error::MySqlError(e)) if e.code == ER_DUP_ENTRY => {
                self.conn.query_drop("ROLLBACK TO SAVEPOINT tidepool_new")?;
                self.conn.query_drop("RELEASE SAVEPOINT tidepool_new")?;
                self.stages[st].expect_new = false;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn upsert_batch(
        &mut self,
        st: usize,
        rows: &[&[Value]],
    ) -> Result<Vec<RowAction>, BatchError<mysql::Error>> {
        if self.stages[st].expect_new && self.insert_all_new(st, rows)? {
            return Ok(vec![RowAction::Insert; rows.len()]);
        }
        let s = &self.stages[st];
        let keys = s.keys_table();
        let mut names = vec!["tidepool_ord".to_owned()];
        names.extend(s.match_cols.iter().map(|i| format!("v{i}")));
        let key_rows: Vec<Vec<mysql::Value>> = rows
            .iter()
            .enumerate()
            .map(|(ord, r)| {
                let mut p = vec![mysql::Value::Int(ord as i64)];
                p.extend(s.match_cols.iter().map(|&i| s.param(i, &r[i])));
                p
            })
            .collect();
        let (table, join, tail) = (s.table.clone(), s.join(), s.on_duplicate());
        let insert_names: Vec<String> = s.insert_cols.iter().map(|&i| s.col(i)).collect();
        self.conn.query_drop(format!("DELETE FROM {keys}"))?;
        insert_rows(&mut self.conn, &keys, &names, &mut key_rows.into_iter())?;
        let matched = self.ords(format!(
            "SELECT s.tidepool_ord FROM {keys} AS s JOIN {table} AS t ON {join}"
        ))?;
        self.stages[st].expect_new = matched.is_empty();
        let s = &self.stages[st];
        let values: Vec<Vec<mysql::Value>> = rows
            .iter()
            .map(|r| s.insert_cols.iter().map(|&i| s.param(i, &r[i])).collect())
            .collect();
        let mut out = vec![RowAction::Insert; rows.len()];
        for &o in &matched {
            if let Some(a) = out.get_mut(o) {
                *a = RowAction::Update;
            }
        }
        let affected = insert_rows_then(
            &mut self.conn,
            &table,
            &insert_names,
            &mut values.into_iter(),
            &tail,
        )?;
        // The server counts one per insert, two per changed row and none per
        // unchanged one: a key another writer inserted after the probe (an
        // "insert" that became an update) breaks the range or the parity, and
        // the batch is replayed row by row for true outcomes.
        let inserts = (rows.len() - matched.len()) as u64;
        let extra = affected.checked_sub(inserts);
        if !extra.is_some_and(|x| x % 2 == 0 && x <= 2 * matched.len() as u64) {
            return Err(BatchError::Changed);
        }
        Ok(out)
    }

    fn write_stage(
        &mut self,
        st: usize,
        rows: &[&[Value]],
    ) -> Result<Vec<RowAction>, BatchError<mysql::Error>> {
        if self.stages[st].upserts_in_one_statement() {
            return self.upsert_batch(st, rows);
        }
        let n = rows.len();
        let s = &self.stages[st];
        let action = s.plan.action;
        if action == StageAction::Insert {
            let names: Vec<String> = s.insert_cols.iter().map(|&i| s.col(i)).collect();
            let table = s.table.clone();
            let cols = s.insert_cols.clone();
            let mut values: Vec<Vec<mysql::Value>> = rows
                .iter()
                .map(|r| cols.iter().map(|&i| s.param(i, &r[i])).collect())
                .collect();
            insert_rows(&mut self.conn, &table, &names, &mut values.drain(..))?;
            return Ok(vec![RowAction::Insert; n]);
        }
        // Load the batch into the staging table (typed like the target).
        let staging = s.staging.clone();
        let mut names = vec!["tidepool_ord".to_owned()];
        names.extend((0..s.columns.len()).map(|i| format!("v{i}")));
        let mut staged: Vec<Vec<mysql::Value>> = rows
            .iter()
            .enumerate()
            .map(|(ord, r)| {
                let mut p = vec![mysql::Value::Int(ord as i64)];
                p.extend(r.iter().enumerate().map(|(i, v)| s.param(i, v)));
                p
            })
            .collect();
        let (join, unchanged) = (s.join(), s.unchanged());
        let sets: Vec<String> = s
            .set_cols
            .iter()
            .map(|&i| format!("t.{} = {}", s.col(i), s.set_value(i)))
            .collect();
        let (table, diff, has_set) = (
            s.table.clone(),
            s.plan.update_on_difference,
            !s.set_cols.is_empty(),
        );
        let insert_names: Vec<String> = s.insert_cols.iter().map(|&i| s.col(i)).collect();
        let insert_vals: Vec<String> = s.insert_cols.iter().map(|&i| format!("s.v{i}")).collect();
        self.conn.query_drop(format!("DELETE FROM {staging}"))?;
        insert_rows(&mut self.conn, &staging, &names, &mut staged.drain(..))?;

        let matched = self.ords(format!(
            "SELECT DISTINCT s.tidepool_ord FROM {staging} AS s JOIN {table} AS t ON {join}"
        ))?;
        let mut out: Vec<Option<RowAction>> = vec![None; n];
        match action {
            StageAction::Insert => unreachable!("handled above"),
            StageAction::Delete => {
                if !matched.is_empty() {
                    self.conn.query_drop(format!(
                        "DELETE t FROM {table} AS t JOIN {staging} AS s ON {join}"
                    ))?;
                }
                for o in matched {
                    out[o] = Some(RowAction::Delete);
                }
            }
            StageAction::SkipInsert => {
                for o in matched {
                    out[o] = Some(RowAction::Skip);
                }
            }
            StageAction::Update | StageAction::UpdateInsert => {
                let changed: Vec<usize> = if !has_set {
                    Vec::new()
                } else if diff {
                    self.ords(format!(
                        "SELECT DISTINCT s.tidepool_ord FROM {staging} AS s JOIN {table} AS t ON {join} WHERE NOT ({unchanged})"
                    ))?
                } else {
                    matched.clone()
                };
                if !changed.is_empty() {
                    let mut sql = format!(
                        "UPDATE {table} AS t JOIN {staging} AS s ON {join} SET {}",
                        sets.join(", ")
                    );
                    if diff {
                        let _ = write!(sql, " WHERE NOT ({unchanged})");
                    }
                    self.conn.query_drop(sql)?;
                }
                for o in matched {
                    out[o] = Some(RowAction::Skip);
                }
                for o in changed {
                    out[o] = Some(RowAction::Update);
                }
            }
        }
        if matches!(action, StageAction::UpdateInsert | StageAction::SkipInsert) {
            let missing: Vec<String> = out
                .iter()
                .enumerate()
                .filter(|(_, a)| a.is_none())
                .map(|(i, _)| i.to_string())
                .collect();
            if !missing.is_empty() {
                self.conn.query_drop(format!(
                    "INSERT INTO {table} ({}) SELECT {} FROM {staging} AS s WHERE s.tidepool_ord IN ({}) ORDER BY s.tidepool_ord",
                    insert_names.join(", "),
                    insert_vals.join(", "),
                    missing.join(",")
                ))?;
                for a in out.iter_mut().filter(|a| a.is_none()) {
                    *a = Some(RowAction::Insert);
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|a| a.unwrap_or(RowAction::Ignore))
            .collect())
    }
}

impl SqlSession for MysqlSession {
    type Config = MysqlConfig;
    type Connection = Conn;
    type DbError = mysql::Error;

    fn connect(config: &MysqlConfig) -> Result<Conn, ConnectorError> {
        config.connect()
    }

    fn open(conn: Conn, stages: &[StagePlan], preview: bool) -> Result<Self, ConnectorError> {
        let mut session = MysqlSession {
            conn,
            stages: Vec::new(),
        };
        session.prepare_session(stages, preview)?;
        Ok(session)
    }

    fn connection_lost(&mut self) -> bool {
        self.conn.ping().is_err()
    }

    fn execute(&mut self, sql: &str) -> Result<(), mysql::Error> {
        self.conn.query_drop(sql)
    }

    fn classify(e: mysql::Error) -> ConnectorError {
        super::config::classify(e)
    }

    fn write_batch(
        &mut self,
        stage: usize,
        rows: &[&[Value]],
    ) -> Result<Vec<RowAction>, BatchError<mysql::Error>> {
        self.write_stage(stage, rows)
    }

    fn match_cols(&self, stage: usize) -> Option<&[usize]> {
        let s = &self.stages[stage];
        (s.plan.action != StageAction::Insert).then_some(s.match_cols.as_slice())
    }

    fn notes(&self) -> Vec<String> {
        self.stages
            .iter()
            .filter_map(|s| unindexed_note(&s.plan, &s.table, s.indexed))
            .collect()
    }

    fn close(self) -> Result<(), ConnectorError> {
        // Dropping the connection closes it.
        Ok(())
    }
}
