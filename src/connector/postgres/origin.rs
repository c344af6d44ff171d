//! The origin (a streamed query) and lookups.

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::Type;
use postgres::Client;

use super::config::{pg_message, to_connector_error};
use super::types::{cell, native, quote_ident};
use super::PostgresConfig;
use crate::connector::{
    ConnectorError, Flow, Lookup, Origin, OriginRequest, RowRead, bind_tokens, lookup_sql,
};
use crate::value::{Row, Value};

/// Prepares the origin query: tokens bound as text cast to what the server
/// expects, types tidepool does not read natively wrapped as text.
pub(super) fn open(
config: &PostgresConfig,
req: &OriginRequest,
) -> Result<Box<dyn Origin>, ConnectorError> {
    let query = req
        .query
        .ok_or_else(|| ConnectorError::schema("a postgres origin needs origin.query"))?;
    let mut client = config.connect()?;
    let query = query.trim().trim_end_matches(';');
    let (sql, params, untyped) = prepare_untyped(&mut client, query, req.variables)?;
    let first = client
        .prepare(&sql)
        .map_err(|e| ConnectorError::schema_caused(format!("origin query: {}", pg_message(&e)), e))?;
    // Parameters travel as text, cast to what the server expects there.
    let param_types: Vec<Type> = first.params().to_vec();
    let sql = if param_types.iter().all(|t| *t == Type::TEXT) {
        sql
    } else {
        bind_tokens(query, req.variables, |n| match param_types.get(n - 1) {
            _ if untyped.contains(&n) => format!("${n}::text"),
            Some(t) if *t != Type::TEXT => format!("(${n}::text::{})", t.name()),
            _ => format!("${n}"),
        })
        ?
        .0
    };
    let stmt = client
        .prepare(&sql)
        .map_err(|e| ConnectorError::schema_caused(format!("origin query: {}", pg_message(&e)), e))?;
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
            .map_err(|e| ConnectorError::schema_caused(format!("origin query: {}", pg_message(&e)), e))?
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

/// The query with its tokens as placeholders, and the parameters; a
/// parameter whose type the server cannot tell (`@@VAR:HighWater@@ IS NULL`)
/// is sent as text (`$n::text`). The third: those parameters' numbers.
fn prepare_untyped(
    client: &mut Client,
    query: &str,
    variables: &std::collections::BTreeMap<String, Value>,
) -> Result<(String, Vec<Value>, Vec<usize>), ConnectorError> {
    let mut untyped: Vec<usize> = Vec::new();
    loop {
        let (sql, params) = bind_tokens(query, variables, |n| {
            if untyped.contains(&n) {
                format!("${n}::text")
            } else {
                format!("${n}")
            }
        })?;
        let Err(e) = client.prepare(&sql) else {
            return Ok((sql, params, untyped));
        };
        match indeterminate_param(&e) {
            Some(n) if n <= params.len() && !untyped.contains(&n) => untyped.push(n),
            _ => return Ok((sql, params, untyped)),
        }
    }
}

/// The parameter number of "could not determine data type of parameter $n".
fn indeterminate_param(e: &postgres::Error) -> Option<usize> {
    let db = e.as_db_error()?;
    if *db.code() != postgres::error::SqlState::INDETERMINATE_DATATYPE {
        return None;
    }
    let (_, n) = db.message().rsplit_once('$')?;
    n.trim().parse().ok()
}

/// A lookup connection.
pub(super) fn open_lookup(config: &PostgresConfig) -> Result<Box<dyn Lookup>, ConnectorError> {
    Ok(Box::new(PostgresLookup {
        client: config.connect()?,
        statements: Default::default(),
    }))
}

/// Lookups on their own connection, statements prepared once per shape.
struct PostgresLookup {
    client: Client,
    statements: std::collections::HashMap<String, postgres::Statement>,
}

impl Lookup for PostgresLookup {
    fn find(
        &mut self,
        table: &str,
        field: &str,
        criteria: &[(String, Value)],
    ) -> Result<Option<Value>, ConnectorError> {
        let plain = lookup_sql(table, field, criteria, quote_ident, |n| format!("${n}"));
        let stmt = match self.statements.get(&plain) {
            Some(s) => s.clone(),
            None => {
                let bad = |e: postgres::Error| {
                    ConnectorError::schema_caused(format!("lookup in {table:?}: {}", pg_message(&e)), e)
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
                let sql = lookup_sql(table, field, criteria, quote_ident, |n| {
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

struct PostgresOrigin {
    client: Client,
    stmt: postgres::Statement,
    params: Vec<Option<String>>,
    columns: Vec<String>,
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
