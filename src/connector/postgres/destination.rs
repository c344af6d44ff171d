//! The destination: COPY for inserts, a staging table for the other actions.

use std::io::Write as _;

use postgres::Client;

use super::config::to_connector_error;
use super::types::{copy_value, quote_ident};
use super::PostgresConfig;
use crate::connector::sql_destination::{BatchError, SqlSession};
use crate::connector::{
    ColumnSets, ConnectorError, RowAction, StageAction, StagePlan, find_columns, unindexed_note,
};
use crate::value::Value;

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
            .ok_or_else(|| ConnectorError::schema(format!("stage {:?} has no table", plan.name)))?;
        let found = client
            .query_opt("SELECT to_regclass($1::text)::text", &[&table])
            .map_err(to_connector_error)?;
        let qualified: Option<String> = found.and_then(|r| r.get(0));
        let Some(qualified) = qualified else {
            return Err(ConnectorError::schema(format!(
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



/// A session's connection and its stages' SQL.
pub(super) struct PostgresSession {
    client: Client,
    stages: Vec<StageSql>,
}

impl PostgresSession {
    /// Checks the tables and makes the session's staging tables; again after a reconnect.
    fn prepare_session(&mut self, plans: &[StagePlan], preview: bool) -> Result<(), ConnectorError> {
        if preview {
            self.client
                .batch_execute("BEGIN")
                .map_err(to_connector_error)?;
        }
        let mut stages = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
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

impl SqlSession for PostgresSession {
    type Config = PostgresConfig;
    type Connection = Client;
    type DbError = postgres::Error;

    fn connect(config: &PostgresConfig) -> Result<Client, ConnectorError> {
        config.connect()
    }

    fn open(client: Client, stages: &[StagePlan], preview: bool) -> Result<Self, ConnectorError> {
        let mut session = PostgresSession {
            client,
            stages: Vec::new(),
        };
        session.prepare_session(stages, preview)?;
        Ok(session)
    }

    fn connection_lost(&mut self) -> bool {
        self.client.is_closed()
    }

    fn execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.client.batch_execute(sql)
    }

    fn classify(e: postgres::Error) -> ConnectorError {
        super::config::classify(e)
    }

    fn write_batch(
        &mut self,
        stage: usize,
        rows: &[&[Value]],
    ) -> Result<Vec<RowAction>, BatchError<postgres::Error>> {
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
        if self.client.is_closed() {
            // Every batch was committed or reported; a dead connection has
            // nothing left to lose (its loss was already reported).
            return Ok(());
        }
        self.client.close().map_err(to_connector_error)
    }
}
