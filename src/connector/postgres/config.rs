//! The connection's config, how it opens, and how its errors read.

use std::fmt::Write as _;
use std::time::Duration;

use postgres::{Client, NoTls};
use serde::Deserialize;

use crate::connector::{Cause, ConnectorError, Failure, redact_url};

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
    pub(super) fn connect(&self) -> Result<Client, ConnectorError> {
        let mut cfg: postgres::Config = self.url.parse().map_err(|e: postgres::Error| ConnectorError::Open {
            what: "postgres connection".into(),
            reason: format!("bad url: {e}"),
            cause: Some(e.into()),
        })?;
        cfg.connect_timeout(Duration::from_secs(self.connect_timeout_secs));
        if cfg.get_application_name().is_none() {
            cfg.application_name("tidepool");
        }
        let mut client = cfg.connect(NoTls).map_err(|e| ConnectorError::Open {
            what: format!("postgres database {}", redact_url(&self.url)),
            reason: pg_message(&e),
            cause: Some(e.into()),
        })?;
        for sql in &self.init_sql {
            client.batch_execute(sql).map_err(|e| {
                ConnectorError::schema(format!("init_sql failed: {}", pg_message(&e)))
            })?;
        }
        Ok(client)
    }
}

/// A PostgreSQL error as a person should read it: message, detail, where.
pub(super) fn pg_message(e: &postgres::Error) -> String {
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
pub(super) fn is_lost(e: &postgres::Error) -> bool {
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

pub(super) fn to_connector_error(e: postgres::Error) -> ConnectorError {
    classify(e)
}

/// The error as a lost connection (retry on a new one) or a failure.
pub(super) fn classify(e: postgres::Error) -> ConnectorError {
    let failure = Failure::caused(pg_message(&e), e);
    if failure.cause().is_some_and(|c| matches!(c, Cause::Postgres(e) if is_lost(e))) {
        ConnectorError::Lost(failure)
    } else {
        ConnectorError::Io(failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_error_keeps_its_sqlstate_and_its_message() {
        let config = PostgresConfig {
            url: "postgres://postgres@127.0.0.1:5432/test".into(),
            init_sql: vec![],
            connect_timeout_secs: 10,
        };
        let mut client = config.connect().expect("the test server (see RULES.md)");
        let e = client
            .batch_execute("SELECT * FROM tidepool_no_such_table")
            .unwrap_err();
        let shown = pg_message(&e);
        let e = classify(e);
        assert_eq!(e.sql_state(), Some("42P01"));
        assert_eq!(e.to_string(), shown);
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn a_refused_login_keeps_its_sqlstate() {
        let config = PostgresConfig {
            url: "postgres://postgres@127.0.0.1:5432/tidepool_no_such_database".into(),
            init_sql: vec![],
            connect_timeout_secs: 10,
        };
        let e = config.connect().err().expect("no such database");
        assert!(
            e.to_string().starts_with("cannot open postgres database postgres://postgres@127.0.0.1:5432/tidepool_no_such_database: "),
            "{e}"
        );
        // invalid_catalog_name
        assert_eq!(e.sql_state(), Some("3D000"));
    }
}
