//! The destination of the SQL servers (PostgreSQL, MariaDB/MySQL): one flow
//! of transactions and savepoints over a dialect's session.
//!
//! A batch is a transaction (a savepoint of the run's one transaction in a
//! preview). Each stage's set-based write runs inside its own savepoint, so a
//! refused batch leaves the transaction usable: one row gets its own error, a
//! whole batch goes back to the engine, which replays it row by row. A lost
//! connection is reopened at the next batch (never in a preview, whose work
//! went with it).
//!
//! SQLite does not take this shape: it writes row by row through prepared
//! statements on a local file, where a failed statement undoes only itself,
//! so a savepoint per write would add work and there is no connection to lose.

use super::{
    ConnectorError, Destination, DestinationRequest, RowAction, StagePlan, WriteResult,
    duplicate_keys, reconnect_failed,
};
use crate::value::Value;

/// Why a set-based write of a batch did not go through.
pub(crate) enum BatchError<E> {
    /// The server refused a statement.
    Db(E),
    /// The table changed between two statements of the batch (another writer).
    Changed,
}

impl<E> From<E> for BatchError<E> {
    fn from(e: E) -> Self {
        BatchError::Db(e)
    }
}

/// The savepoint around a batch in a preview.
const BATCH: &str = "tidepool_batch";
/// The savepoint around one stage's write.
const WRITE: &str = "tidepool_write";

/// A dialect's session: a connection prepared for the run's stages, and the
/// hooks the shared flow calls. The transaction hooks default to standard
/// SQL; a server that has no `RELEASE SAVEPOINT` (SQL Server's `SAVE
/// TRANSACTION`) makes `release_savepoint` do nothing.
pub(crate) trait SqlSession: Sized + Send {
    /// The connection's config.
    type Config: Clone + Send;
    /// An open connection, not yet prepared.
    type Connection;
    /// The driver's error.
    type DbError;

    /// Opens a connection.
    fn connect(config: &Self::Config) -> Result<Self::Connection, ConnectorError>;
    /// Prepares `conn` for the stages (checks tables, makes staging tables);
    /// in a preview it first begins the run's one transaction.
    fn open(
        conn: Self::Connection,
        stages: &[StagePlan],
        preview: bool,
    ) -> Result<Self, ConnectorError>;
    /// Whether the connection is gone (checked before each batch).
    fn connection_lost(&mut self) -> bool;
    /// Runs SQL that returns no rows.
    fn execute(&mut self, sql: &str) -> Result<(), Self::DbError>;
    /// The driver's error as a lost connection or a failure.
    fn classify(e: Self::DbError) -> ConnectorError;
    /// The stage's set-based write of the batch.
    fn write_batch(
        &mut self,
        stage: usize,
        rows: &[&[Value]],
    ) -> Result<Vec<RowAction>, BatchError<Self::DbError>>;
    /// The stage's match columns, when it finds rows by them.
    fn match_cols(&self, stage: usize) -> Option<&[usize]>;
    /// See [`Destination::notes`].
    fn notes(&self) -> Vec<String>;
    /// Closes the connection (a lost one has nothing to close).
    fn close(self) -> Result<(), ConnectorError>;

    /// Starts a transaction.
    fn begin_transaction(&mut self) -> Result<(), Self::DbError> {
        self.execute("START TRANSACTION")
    }
    /// Commits the transaction.
    fn commit_transaction(&mut self) -> Result<(), Self::DbError> {
        self.execute("COMMIT")
    }
    /// Rolls the transaction back.
    fn rollback_transaction(&mut self) -> Result<(), Self::DbError> {
        self.execute("ROLLBACK")
    }
    /// Sets a savepoint.
    fn savepoint(&mut self, name: &str) -> Result<(), Self::DbError> {
        self.execute(&format!("SAVEPOINT {name}"))
    }
    /// Undoes the work since a savepoint (the savepoint stays).
    fn rollback_to_savepoint(&mut self, name: &str) -> Result<(), Self::DbError> {
        self.execute(&format!("ROLLBACK TO SAVEPOINT {name}"))
    }
    /// Forgets a savepoint, keeping its work.
    fn release_savepoint(&mut self, name: &str) -> Result<(), Self::DbError> {
        self.execute(&format!("RELEASE SAVEPOINT {name}"))
    }
}

/// A SQL server destination: one per writer thread, with its own session.
pub(crate) struct SqlDestination<S: SqlSession> {
    config: S::Config,
    plans: Vec<StagePlan>,
    preview: bool,
    session: S,
}

impl<S: SqlSession + 'static> SqlDestination<S> {
    /// Opens and prepares a session for the request's stages.
    pub(crate) fn open(
        config: &S::Config,
        req: &DestinationRequest,
    ) -> Result<Box<dyn Destination>, ConnectorError> {
        let session = S::open(S::connect(config)?, req.stages, req.preview)?;
        Ok(Box::new(SqlDestination {
            config: config.clone(),
            plans: req.stages.to_vec(),
            preview: req.preview,
            session,
        }))
    }
}

/// A driver result as the connector's.
fn checked<S: SqlSession>(r: Result<(), S::DbError>) -> Result<(), ConnectorError> {
    r.map_err(S::classify)
}

impl<S: SqlSession> SqlDestination<S> {
    /// Undoes a stage's failed write, keeping the batch's transaction.
    fn undo_write(&mut self) -> Result<(), ConnectorError> {
        checked::<S>(self.session.rollback_to_savepoint(WRITE))?;
        checked::<S>(self.session.release_savepoint(WRITE))
    }
}

impl<S: SqlSession> Destination for SqlDestination<S> {
    fn begin(&mut self) -> Result<(), ConnectorError> {
        if self.session.connection_lost() {
            if self.preview {
                return Err(ConnectorError::Io(
                    "the connection was lost during a preview; its work is gone".into(),
                ));
            }
            // A server that does not take the new connection is still "lost":
            // the engine's retry policy applies, then the job fails.
            let conn = S::connect(&self.config).map_err(reconnect_failed)?;
            self.session = S::open(conn, &self.plans, false)?;
        }
        checked::<S>(if self.preview {
            self.session.savepoint(BATCH)
        } else {
            self.session.begin_transaction()
        })
    }

    fn write(
        &mut self,
        stage: usize,
        rows: &[&[Value]],
    ) -> Result<Vec<WriteResult>, ConnectorError> {
        if rows.len() > 1
            && self
                .session
                .match_cols(stage)
                .is_some_and(|m| duplicate_keys(rows, m))
        {
            return Err(ConnectorError::Io(
                "two rows of the batch have the same match values".into(),
            ));
        }
        checked::<S>(self.session.savepoint(WRITE))?;
        let failed = match self.session.write_batch(stage, rows) {
            Ok(actions) => {
                checked::<S>(self.session.release_savepoint(WRITE))?;
                return Ok(actions.into_iter().map(Ok).collect());
            }
            Err(BatchError::Db(e)) => match S::classify(e) {
                lost @ ConnectorError::Lost(_) => return Err(lost),
                other => other,
            },
            Err(BatchError::Changed) => ConnectorError::failed(
                "the table changed while the batch was written (another writer)",
            ),
        };
        self.undo_write()?;
        if rows.len() == 1 {
            // One row: its own error, and the transaction goes on.
            Ok(vec![Err(failed.to_string())])
        } else {
            Err(failed)
        }
    }

    fn commit(&mut self) -> Result<(), ConnectorError> {
        checked::<S>(if self.preview {
            // In a preview the batch's work stays until the end.
            self.session.release_savepoint(BATCH)
        } else {
            self.session.commit_transaction()
        })
    }

    fn rollback(&mut self) -> Result<(), ConnectorError> {
        let done = if self.preview {
            checked::<S>(self.session.rollback_to_savepoint(BATCH))
                .and_then(|()| checked::<S>(self.session.release_savepoint(BATCH)))
        } else {
            checked::<S>(self.session.rollback_transaction())
        };
        match done {
            // A lost connection has nothing left to undo.
            Err(ConnectorError::Lost(_)) => Ok(()),
            r => r,
        }
    }

    fn notes(&self) -> Vec<String> {
        self.session.notes()
    }

    fn finish(self: Box<Self>) -> Result<(), ConnectorError> {
        let mut session = self.session;
        if self.preview {
            // Whatever happens here, nothing of the preview stays.
            let _ = session.rollback_transaction();
        }
        session.close()
    }
}
