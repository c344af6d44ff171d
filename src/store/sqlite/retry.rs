//! Retries of a run in the embedded store: the columns, putting a run back
//! as its next attempt, and reading its attempts.

use rusqlite::{Connection, OptionalExtension, params};

use super::SqliteStore;
use crate::store::retry::{RetryLater, RetryState};
use crate::store::{RunKey, StoreError};

/// What a claim adds to `status = 'Queued'`: a run waiting between two
/// attempts is not claimed before its time.
pub(super) const CLAIMABLE: &str = "(not_before_ms IS NULL OR not_before_ms <= CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER))";

/// Adds the retry columns to a store file that lacks them.
pub(super) fn retry_schema(conn: &Connection) -> rusqlite::Result<()> {
    for (column, ty) in [
        ("not_before_ms", "INTEGER"),
        ("attempts", "TEXT"),
        ("retry_next", "TEXT"),
    ] {
        let has: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_xinfo('runs') WHERE name = ?1)",
            [column],
            |r| r.get(0),
        )?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE runs ADD COLUMN {column} {ty}"))?;
        }
    }
    Ok(())
}

impl SqliteStore {
    /// [`crate::store::Store::retry_later`] for the embedded store (one
    /// process holds every run: the lease is the Running status).
    pub(super) async fn retry_later_sqlite(
        &self,
        key: &RunKey,
        retry: RetryLater,
    ) -> Result<bool, StoreError> {
        let k = key.clone();
        let not_before = chrono::Utc::now().timestamp_millis()
            + i64::try_from(retry.wait.as_millis()).unwrap_or(i64::MAX / 2);
        self.write_one(move |c| {
            let n = c.execute(
                "UPDATE runs SET status = 'Queued', started_at = NULL, not_before_ms = ?3,
                   attempts = ?4, retry_next = ?5
                 WHERE instance = ?1 AND run_id = ?2 AND status = 'Running'",
                params![
                    k.instance,
                    k.run_id.to_string(),
                    not_before,
                    retry.attempts_json,
                    retry.next_json
                ],
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// [`crate::store::Store::retry_state`] for the embedded store.
    pub(super) async fn retry_state_sqlite(&self, key: &RunKey) -> Result<RetryState, StoreError> {
        let k = key.clone();
        self.read(move |c| {
            c.query_row(
                "SELECT attempts, retry_next FROM runs WHERE instance = ?1 AND run_id = ?2",
                params![k.instance, k.run_id.to_string()],
                |r| {
                    Ok(RetryState {
                        attempts_json: r.get(0)?,
                        next_json: r.get(1)?,
                    })
                },
            )
            .optional()
            .map(Option::unwrap_or_default)
        })
        .await
    }
}
