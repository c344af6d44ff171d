//! Retries of a run on a shared store: putting a run back as its next
//! attempt under its lease (fenced), and reading its attempts.

use super::{NEWS_CHANNEL, PostgresStore, secs};
use crate::store::retry::{RetryLater, RetryState};
use crate::store::{RunKey, StoreError};

/// What a claim adds to `status = 'Queued'`: a run waiting between two
/// attempts is not claimed before its time (by the store's clock).
pub(super) const CLAIMABLE: &str = "(not_before IS NULL OR not_before <= now())";

impl PostgresStore {
    /// [`crate::store::Store::retry_later`]: only while the run is Running
    /// under `epoch`; the epoch moves on, so the node that ran the attempt
    /// writes nothing more, and any node may claim the next one.
    pub(super) async fn retry_later_pg(
        &self,
        key: &RunKey,
        epoch: i64,
        retry: RetryLater,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let n = tx
            .execute(
                &tx.prepare_cached(
                    "UPDATE runs SET status = 'Queued', node_id = NULL, lease_until = NULL,
                       lease_epoch = lease_epoch + 1, started_at = NULL, cancel_requested = false,
                       not_before = now() + make_interval(secs => $4), attempts = $5, retry_next = $6
                     WHERE instance = $1 AND run_id = $2 AND lease_epoch = $3 AND status = 'Running'",
                )
                .await?,
                &[
                    &key.instance,
                    &key.run_id,
                    &epoch,
                    &secs(retry.wait),
                    &retry.attempts_json,
                    &retry.next_json,
                ],
            )
            .await?;
        if n == 1 {
            tx.execute(
                &tx.prepare_cached("SELECT pg_notify($1, 'queued')").await?,
                &[&NEWS_CHANNEL],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// [`crate::store::Store::retry_state`] on a shared store.
    pub(super) async fn retry_state_pg(&self, key: &RunKey) -> Result<RetryState, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                &conn
                    .prepare_cached(
                        "SELECT attempts, retry_next FROM runs WHERE instance = $1 AND run_id = $2",
                    )
                    .await?,
                &[&key.instance, &key.run_id],
            )
            .await?;
        Ok(row
            .map(|r| RetryState {
                attempts_json: r.get(0),
                next_json: r.get(1),
            })
            .unwrap_or_default())
    }
}
