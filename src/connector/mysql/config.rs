//! The connection's config, how it opens, and how its errors read.

use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{Conn, Opts, OptsBuilder};
use serde::Deserialize;

use crate::connector::{ConnectorError, Failure, redact_url};

/// `kind = "mysql"` (or `"mariadb"`): a MySQL or MariaDB database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    /// `mysql://user:password@host:port/database` (put the password in `${ENV}`).
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

const SESSION: &str = "SET NAMES utf8mb4, SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION'";


impl MysqlConfig {
    pub(super) fn connect(&self) -> Result<Conn, ConnectorError> {
        let open = |reason: String, cause: Option<mysql::Error>| ConnectorError::Open {
            what: format!("mysql database {}", redact_url(&self.url)),
            reason,
            cause: cause.map(Into::into),
        };
        let opts = Opts::from_url(&self.url).map_err(|e| open(format!("bad url: {e}"), None))?;
        let opts = OptsBuilder::from_opts(opts)
            .tcp_connect_timeout(Some(Duration::from_secs(self.connect_timeout_secs)));
        let mut conn = Conn::new(opts).map_err(|e| open(e.to_string(), Some(e)))?;
        conn.query_drop(SESSION).map_err(|e| open(e.to_string(), Some(e)))?;
        for sql in &self.init_sql {
            conn.query_drop(sql)
                .map_err(|e| ConnectorError::schema_caused(format!("init_sql failed: {e}"), e))?;
        }
        Ok(conn)
    }
}

pub(super) fn is_lost(e: &mysql::Error) -> bool {
    match e {
        mysql::Error::IoError(_) | mysql::Error::CodecError(_) => true,
        mysql::Error::DriverError(d) => matches!(
            d,
            mysql::DriverError::ConnectTimeout | mysql::DriverError::CouldNotConnect(_)
        ),
        mysql::Error::MySqlError(m) => matches!(m.code, 1927 | 2006 | 2013 | 1053),
        _ => false,
    }
}

pub(super) fn to_connector_error(e: mysql::Error) -> ConnectorError {
    classify(e)
}

/// The error as a lost connection (retry on a new one) or a failure.
pub(super) fn classify(e: mysql::Error) -> ConnectorError {
    if is_lost(&e) {
        ConnectorError::Lost(Failure::of(e))
    } else {
        ConnectorError::Io(Failure::of(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_error_keeps_its_number_and_sqlstate() {
        let config = MysqlConfig {
            url: "mysql://root@127.0.0.1:3306/test".into(),
            init_sql: vec![],
            connect_timeout_secs: 10,
        };
        let mut conn = config.connect().expect("the test server (see RULES.md)");
        let e = conn
            .query_drop("SELECT * FROM tidepool_no_such_table")
            .unwrap_err();
        let shown = e.to_string();
        let e = classify(e);
        assert_eq!(e.error_code(), Some(1146));
        assert_eq!(e.sql_state(), Some("42S02"));
        assert_eq!(e.to_string(), shown);
    }
}
