//! The errors of a connection as a whole, each keeping the driver or system
//! error behind it, so a caller can ask a database error for its code.

use std::fmt;

/// An error of a connection as a whole (not of one row).
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The connection could not be opened.
    #[error("cannot open {what}: {reason}")]
    Open {
        /// What was being opened (a path, a database).
        what: String,
        /// Why it failed.
        reason: String,
        /// The error behind it.
        #[source]
        cause: Option<Cause>,
    },
    /// The job asks for something the connection does not have.
    #[error(transparent)]
    Schema(Failure),
    /// Reading or writing failed in a way that ends the batch or the job.
    #[error(transparent)]
    Io(Failure),
    /// The connection was lost; the batch may be retried on a new one.
    #[error("the connection was lost: {0}")]
    Lost(#[source] Failure),
    /// The destination stopped taking rows (an API that no longer answers,
    /// after its own retries): the batch is not replayed and the job stops.
    #[error("the destination stopped answering: {0}")]
    Unavailable(String),
}

/// What failed, as a person should read it, and the error behind it.
#[derive(Debug)]
pub struct Failure {
    message: String,
    cause: Option<Cause>,
}

impl Failure {
    /// A failure with `message`, caused by `cause`.
    pub fn caused(message: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Failure {
            message: message.into(),
            cause: Some(cause.into()),
        }
    }

    /// A failure that is its cause, in the cause's own words.
    pub fn of(cause: impl Into<Cause>) -> Self {
        let cause = cause.into();
        Failure {
            message: cause.to_string(),
            cause: Some(cause),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error behind the failure, when there is one.
    pub fn cause(&self) -> Option<&Cause> {
        self.cause.as_ref()
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_ref().map(|c| c as _)
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure {
            message,
            cause: None,
        }
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Failure::from(message.to_owned())
    }
}

/// The system or driver error behind a [`Failure`].
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// A file or socket.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The PostgreSQL driver or server.
    #[error(transparent)]
    Postgres(#[from] ::postgres::Error),
    /// The MySQL driver or server (boxed: the driver's error is large, and
    /// every connector result carries this type).
    #[error(transparent)]
    Mysql(Box<::mysql::Error>),
    /// SQLite (boxed, as above).
    #[error(transparent)]
    Sqlite(Box<rusqlite::Error>),
    /// The HTTP client.
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    /// A CSV reader or writer.
    #[error(transparent)]
    Csv(#[from] ::csv::Error),
    /// JSON text.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl From<::mysql::Error> for Cause {
    fn from(e: ::mysql::Error) -> Self {
        Cause::Mysql(Box::new(e))
    }
}

impl From<rusqlite::Error> for Cause {
    fn from(e: rusqlite::Error) -> Self {
        Cause::Sqlite(Box::new(e))
    }
}

impl Cause {
    /// The SQLSTATE of a database error: PostgreSQL's code, MySQL's state.
    pub fn sql_state(&self) -> Option<&str> {
        match self {
            Cause::Postgres(e) => e.code().map(|c| c.code()),
            Cause::Mysql(e) => match e.as_ref() {
                ::mysql::Error::MySqlError(e) => Some(&e.state),
                _ => None,
            },
            _ => None,
        }
    }

    /// A database's own error number: MySQL's error code, SQLite's extended
    /// result code.
    pub fn error_code(&self) -> Option<i32> {
        match self {
            Cause::Mysql(e) => match e.as_ref() {
                ::mysql::Error::MySqlError(e) => Some(i32::from(e.code)),
                _ => None,
            },
            Cause::Sqlite(e) => e.sqlite_error().map(|f| f.extended_code),
            _ => None,
        }
    }
}

impl ConnectorError {
    /// A failure that ends the batch or the job, caused by `e` and worded as it.
    pub(crate) fn io(e: impl Into<Cause>) -> Self {
        ConnectorError::Io(Failure::of(e))
    }

    /// A failure that ends the batch or the job, with no error behind it.
    pub(crate) fn failed(message: impl Into<String>) -> Self {
        ConnectorError::Io(Failure::from(message.into()))
    }

    /// A failure that ends the batch or the job, worded with context, as
    /// `cause` tells.
    pub(crate) fn failed_caused(message: impl Into<String>, cause: impl Into<Cause>) -> Self {
        ConnectorError::Io(Failure::caused(message, cause))
    }

    /// Something the job asks for that the connection does not have, as
    /// `cause` (a driver's error) tells.
    pub(crate) fn schema_caused(message: impl Into<String>, cause: impl Into<Cause>) -> Self {
        ConnectorError::Schema(Failure::caused(message, cause))
    }

    /// Something the job asks for that the connection does not have.
    pub(crate) fn schema(message: impl Into<String>) -> Self {
        ConnectorError::Schema(Failure::from(message.into()))
    }

    /// The failure's message and cause, for the kinds that have one.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            ConnectorError::Schema(f) | ConnectorError::Io(f) | ConnectorError::Lost(f) => Some(f),
            _ => None,
        }
    }

    /// The driver or system error behind this one, taken out.
    fn into_cause(self) -> Option<Cause> {
        match self {
            ConnectorError::Open { cause, .. } => cause,
            ConnectorError::Schema(f) | ConnectorError::Io(f) | ConnectorError::Lost(f) => f.cause,
            _ => None,
        }
    }

    /// The driver or system error behind this one.
    pub fn cause(&self) -> Option<&Cause> {
        match self {
            ConnectorError::Open { cause, .. } => cause.as_ref(),
            other => other.failure().and_then(Failure::cause),
        }
    }

    /// The SQLSTATE of the database error behind this one (PostgreSQL,
    /// MySQL/MariaDB).
    pub fn sql_state(&self) -> Option<&str> {
        self.cause().and_then(Cause::sql_state)
    }

    /// The database's own error number behind this one (MySQL/MariaDB's
    /// error code, SQLite's extended result code).
    pub fn error_code(&self) -> Option<i32> {
        self.cause().and_then(Cause::error_code)
    }
}

/// A reconnect that failed: the connection is still lost.
pub(crate) fn reconnect_failed(e: ConnectorError) -> ConnectorError {
    match e {
        lost @ ConnectorError::Lost(_) => lost,
        other => {
            let message = format!("reconnecting failed: {other}");
            ConnectorError::Lost(match other.into_cause() {
                Some(cause) => Failure::caused(message, cause),
                None => Failure::from(message),
            })
        }
    }
}
