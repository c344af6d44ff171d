//! The origin (a streamed query) and lookups.

use mysql::prelude::Queryable;
use mysql::{Conn, Params};

use super::MysqlConfig;
use super::config::{is_lost, to_connector_error};
use super::types::{from_mysql, quote_ident, to_param};
use crate::connector::{
    ConnectorError, Failure, Flow, Lookup, Origin, OriginRequest, RowRead, bind_tokens, lookup_sql,
};
use crate::value::{Row, Value};

/// Prepares the origin query, its tokens bound as parameters.
pub(super) fn open(
config: &MysqlConfig,
req: &OriginRequest,
) -> Result<Box<dyn Origin>, ConnectorError> {
    let query = req
        .query
        .ok_or_else(|| ConnectorError::schema("a mysql origin needs origin.query"))?;
    let mut conn = config.connect()?;
    let (sql, params) = bind_tokens(query.trim().trim_end_matches(';'), req.variables, |_| {
        "?".into()
    })
    ?;
    let stmt = conn
        .prep(&sql)
        .map_err(|e| ConnectorError::schema_caused(format!("origin query: {e}"), e))?;
    let columns = stmt
        .columns()
        .iter()
        .map(|c| c.name_str().into_owned())
        .collect();
    Ok(Box::new(MysqlOrigin {
        conn,
        stmt,
        params: params.iter().map(to_param).collect(),
        columns,
    }))
}

/// A lookup connection.
pub(super) fn open_lookup(config: &MysqlConfig) -> Result<Box<dyn Lookup>, ConnectorError> {
    Ok(Box::new(MysqlLookup {
        conn: config.connect()?,
    }))
}

/// Lookups on their own connection (the driver caches prepared statements).
struct MysqlLookup {
    conn: Conn,
}

impl Lookup for MysqlLookup {
    fn find(
        &mut self,
        table: &str,
        field: &str,
        criteria: &[(String, Value)],
    ) -> Result<Option<Value>, ConnectorError> {
        let sql = lookup_sql(table, field, criteria, quote_ident, |_| "?".into());
        let params: Vec<mysql::Value> = criteria
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(_, v)| to_param(v))
            .collect();
        let row: Option<mysql::Row> =
            self.conn
                .exec_first(&sql, params)
                .map_err(|e| match is_lost(&e) {
                    true => ConnectorError::Lost(Failure::of(e)),
                    false => ConnectorError::schema_caused(format!("lookup in {table:?}: {e}"), e),
                })?;
        Ok(row.map(|mut r| from_mysql(r.take(0).unwrap_or(mysql::Value::NULL))))
    }
}

struct MysqlOrigin {
    conn: Conn,
    stmt: mysql::Statement,
    params: Vec<mysql::Value>,
    columns: Vec<String>,
}

impl Origin for MysqlOrigin {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn read(&mut self, sink: &mut dyn FnMut(RowRead) -> Flow) -> Result<(), ConnectorError> {
        let params = if self.params.is_empty() {
            Params::Empty
        } else {
            Params::Positional(self.params.clone())
        };
        let result = self
            .conn
            .exec_iter(&self.stmt, params)
            .map_err(to_connector_error)?;
        for row in result {
            let row = row.map_err(to_connector_error)?;
            let values = row.unwrap().into_iter().map(from_mysql).collect();
            if sink(Ok(Row::from_values(values))) == Flow::Stop {
                break;
            }
        }
        Ok(())
    }
}

