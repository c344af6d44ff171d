//! Runs: claims under leases, fenced writes, takeovers, requeues, cancels,
//! reads and retention.

use std::time::Duration;

use chrono::{DateTime, FixedOffset};
use uuid::Uuid;

use super::retry::CLAIMABLE;
use super::{NEWS_CHANNEL, ORPHAN_LEASE, PostgresStore, RUN_COLUMNS, run_row, secs};
use crate::run::RunStatus;
use crate::store::{
    ConcurrencyLimits, EndIf, LeaseState, Purged, RunEnd, RunKey, RunRecord, StoreError,
};

/// Queued runs looked at by one claim when some jobs have limits.
const CLAIM_SCAN: i64 = 256;

/// What a claim sets: Running on node `$1`, a new epoch, a lease of `$2` s
/// by the store's clock.
const CLAIM_SET: &str = "UPDATE runs r SET status = 'Running', node_id = $1,
       lease_epoch = r.lease_epoch + 1, lease_until = now() + make_interval(secs => $2),
       started_at = now(), cancel_requested = false";

impl PostgresStore {
    pub(super) async fn claim_next_pg(
        &self,
        node: &str,
        lease: Duration,
        limits: &ConcurrencyLimits,
    ) -> Result<Option<RunRecord>, StoreError> {
        if !limits.0.is_empty() {
            return self.claim_limited(node, lease, limits).await;
        }
        let conn = self.conn().await?;
        let sql = format!(
            "{CLAIM_SET} WHERE (r.instance, r.run_id) = (
               SELECT instance, run_id FROM runs WHERE status = 'Queued' AND {CLAIMABLE}
               ORDER BY accepted_ms, run_id LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING {RUN_COLUMNS}"
        );
        let st = conn.prepare_cached(&sql).await?;
        let row = conn.query_opt(&st, &[&node, &secs(lease)]).await?;
        Ok(row.as_ref().map(run_row))
    }

    /// A claim that looks past runs of jobs at their limit. The queue is
    /// read without locks; each candidate is then locked alone (skipped if
    /// another node holds it), so concurrent claimers do not hide runs from
    /// each other.
    async fn claim_limited(
        &self,
        node: &str,
        lease: Duration,
        limits: &ConcurrencyLimits,
    ) -> Result<Option<RunRecord>, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let queued = tx
            .query(
                &tx.prepare_cached(&format!(
                    "SELECT instance, run_id, project_id, job_id FROM runs
                 WHERE status = 'Queued' AND {CLAIMABLE} ORDER BY accepted_ms, run_id LIMIT $1"
                ))
                .await?,
                &[&CLAIM_SCAN],
            )
            .await?;
        let claim = format!(
            "{CLAIM_SET} WHERE (r.instance, r.run_id) = (
               SELECT instance, run_id FROM runs WHERE instance = $3 AND run_id = $4
                 AND status = 'Queued' FOR UPDATE SKIP LOCKED)
             RETURNING {RUN_COLUMNS}"
        );
        let claim = tx.prepare_cached(&claim).await?;
        let mut full = std::collections::HashSet::new();
        for q in queued {
            let (instance, run_id, project, job): (String, Uuid, String, String) =
                (q.get(0), q.get(1), q.get(2), q.get(3));
            let name = format!("{instance}/{project}/{job}");
            if full.contains(&name) {
                continue;
            }
            if let Some(limit) = limits.of(&instance, &project, &job) {
                // One claimer at a time counts a job's runs (until commit).
                tx.execute(
                    &tx.prepare_cached("SELECT pg_advisory_xact_lock(hashtext($1))")
                        .await?,
                    &[&name],
                )
                .await?;
                let n: i64 = tx
                    .query_one(
                        &tx.prepare_cached(
                            "SELECT count(*) FROM runs WHERE status = 'Running'
                           AND instance = $1 AND project_id = $2 AND job_id = $3",
                        )
                        .await?,
                        &[&instance, &project, &job],
                    )
                    .await?
                    .get(0);
                if n >= i64::from(limit) {
                    full.insert(name);
                    continue;
                }
            }
            let row = tx
                .query_opt(&claim, &[&node, &secs(lease), &instance, &run_id])
                .await?;
            if let Some(row) = row {
                tx.commit().await?;
                return Ok(Some(run_row(&row)));
            }
        }
        tx.commit().await?;
        Ok(None)
    }

    pub(super) async fn save_progress_pg(
        &self,
        key: &RunKey,
        epoch: i64,
        results_json: &str,
    ) -> Result<bool, StoreError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                &conn
                    .prepare_cached(
                        "UPDATE runs SET results = $3 WHERE instance = $1 AND run_id = $2
                   AND lease_epoch = $4 AND status = 'Running'",
                    )
                    .await?,
                &[&key.instance, &key.run_id, &results_json, &epoch],
            )
            .await?;
        Ok(n == 1)
    }

    pub(super) async fn finish_pg(
        &self,
        key: &RunKey,
        when: EndIf,
        end: RunEnd,
    ) -> Result<bool, StoreError> {
        let (from, epoch) = match when {
            EndIf::Queued => ("Queued", None),
            EndIf::Leased(e) => ("Running", Some(e)),
        };
        // Results that the response carries verbatim are not stored twice
        // (reads take them from the response).
        let embedded = end
            .response_json
            .contains(&format!("\"results\":{}", end.results_json));
        let results = (!embedded).then_some(end.results_json);
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let n = tx
            .execute(
                &tx.prepare_cached(
                    "UPDATE runs SET status = $3, results = $4, response = $5, error = $6,
                   finished_at = now(), lease_until = NULL
                 WHERE instance = $1 AND run_id = $2 AND status = $7
                   AND ($8::int8 IS NULL OR lease_epoch = $8)",
                )
                .await?,
                &[
                    &key.instance,
                    &key.run_id,
                    &end.status.to_string(),
                    &results,
                    &end.response_json,
                    &end.error,
                    &from,
                    &epoch,
                ],
            )
            .await?;
        if n == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO webhooks (instance, run_id, url, body, created_at, next_attempt_at)
             SELECT instance, run_id, webhook_url, $3, now(), now() FROM runs
             WHERE instance = $1 AND run_id = $2 AND webhook_url IS NOT NULL
             ON CONFLICT (instance, run_id) DO NOTHING",
            )
            .await?,
            &[&key.instance, &key.run_id, &end.webhook_json],
        )
        .await?;
        tx.execute(
            &tx.prepare_cached("SELECT pg_notify($1, $2)").await?,
            &[&NEWS_CHANNEL, &format!("ended:{key}")],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn renew_pg(
        &self,
        key: &RunKey,
        epoch: i64,
        lease: Duration,
    ) -> Result<LeaseState, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                &conn
                    .prepare_cached(
                        "UPDATE runs SET lease_until = now() + make_interval(secs => $4)
                 WHERE instance = $1 AND run_id = $2 AND lease_epoch = $3 AND status = 'Running'
                 RETURNING cancel_requested",
                    )
                    .await?,
                &[&key.instance, &key.run_id, &epoch, &secs(lease)],
            )
            .await?;
        Ok(match row {
            None => LeaseState::Lost,
            Some(r) if r.get::<_, bool>(0) => LeaseState::CancelRequested,
            Some(_) => LeaseState::Held,
        })
    }

    pub(super) async fn request_cancel_pg(&self, key: &RunKey) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let n = tx
            .execute(
                &tx.prepare_cached(
                    "UPDATE runs SET cancel_requested = true
                 WHERE instance = $1 AND run_id = $2 AND status = 'Running'",
                )
                .await?,
                &[&key.instance, &key.run_id],
            )
            .await?;
        if n == 1 {
            tx.execute(
                &tx.prepare_cached("SELECT pg_notify($1, $2)").await?,
                &[&NEWS_CHANNEL, &format!("cancel:{key}")],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    pub(super) async fn take_over_expired_pg(
        &self,
        node: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let conn = self.conn().await?;
        // The CTE reads the old owner before the update names the new one.
        let sql = format!(
            "WITH c AS (
               SELECT instance, run_id, node_id AS old_node FROM runs
               WHERE status = 'Running' AND lease_until < now()
               ORDER BY lease_until LIMIT $3 FOR UPDATE SKIP LOCKED)
             UPDATE runs r SET lease_epoch = r.lease_epoch + 1, node_id = $1,
               lease_until = now() + make_interval(secs => $2)
             FROM c WHERE r.instance = c.instance AND r.run_id = c.run_id
             RETURNING {RUN_COLUMNS}, c.old_node"
        );
        let rows = conn
            .query(
                &conn.prepare_cached(&sql).await?,
                &[&node, &secs(lease), &(limit as i64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let mut rec = run_row(row);
                rec.node_id = row.get(15);
                rec
            })
            .collect())
    }

    pub(super) async fn orphans_pg(&self, node: &str) -> Result<Vec<RunRecord>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &format!(
                    "UPDATE runs r SET lease_epoch = r.lease_epoch + 1,
                       lease_until = now() + make_interval(secs => $2)
                     WHERE r.status = 'Running' AND r.node_id = $1
                     RETURNING {RUN_COLUMNS}"
                ),
                &[&node, &secs(ORPHAN_LEASE)],
            )
            .await?;
        Ok(rows.iter().map(run_row).collect())
    }

    pub(super) async fn requeue_pg(
        &self,
        key: &RunKey,
        epoch: i64,
        lost: bool,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let n = tx
            .execute(
                &tx.prepare_cached(
                    "UPDATE runs SET status = 'Queued', node_id = NULL, lease_until = NULL,
                   lease_epoch = lease_epoch + 1, results = NULL, started_at = NULL,
                   cancel_requested = false,
                   requeues = requeues + CASE WHEN $4 THEN 1 ELSE 0 END
                 WHERE instance = $1 AND run_id = $2 AND lease_epoch = $3 AND status = 'Running'",
                )
                .await?,
                &[&key.instance, &key.run_id, &epoch, &lost],
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

    pub(super) async fn run_pg(&self, key: &RunKey) -> Result<Option<RunRecord>, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs r WHERE r.instance = $1 AND r.run_id = $2"
                ),
                &[&key.instance, &key.run_id],
            )
            .await?;
        Ok(row.as_ref().map(run_row))
    }

    pub(super) async fn runs_in_pg(&self, status: RunStatus) -> Result<Vec<RunRecord>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs r WHERE r.status = $1
                     ORDER BY r.accepted_ms, r.run_id"
                ),
                &[&status.to_string()],
            )
            .await?;
        Ok(rows.iter().map(run_row).collect())
    }

    pub(super) async fn queued_count_pg(&self) -> Result<u64, StoreError> {
        let conn = self.conn().await?;
        let n: i64 = conn
            .query_one(
                &conn
                    .prepare_cached("SELECT count(*) FROM runs WHERE status = 'Queued'")
                    .await?,
                &[],
            )
            .await?
            .get(0);
        Ok(n.max(0) as u64)
    }

    pub(super) async fn purge_ended_pg(
        &self,
        cutoff: DateTime<FixedOffset>,
        limit: usize,
    ) -> Result<Purged, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // Ended before the cutoff, and no webhook still being delivered.
        let doomed = tx
            .query(
                &tx.prepare_cached(
                    "SELECT r.instance, r.run_id FROM runs r
                 WHERE r.status IN ('Complete', 'Failed', 'Cancelled') AND r.finished_at < $1
                   AND r.accepted_at < $1
                   AND NOT EXISTS (SELECT 1 FROM webhooks w WHERE w.instance = r.instance
                                   AND w.run_id = r.run_id AND w.state = 'pending')
                 ORDER BY r.finished_at LIMIT $2 FOR UPDATE SKIP LOCKED",
                )
                .await?,
                &[&cutoff, &(limit as i64)],
            )
            .await?;
        let instances: Vec<String> = doomed.iter().map(|r| r.get(0)).collect();
        let ids: Vec<Uuid> = doomed.iter().map(|r| r.get(1)).collect();
        for table in [
            "webhook_attempts",
            "webhooks",
            "run_log",
            "run_row_errors",
            "run_error_totals",
            "runs",
        ] {
            tx.execute(
                &format!(
                    "DELETE FROM {table} t USING unnest($1::text[], $2::uuid[]) AS u(i, id)
                     WHERE t.instance = u.i AND t.run_id = u.id"
                ),
                &[&instances, &ids],
            )
            .await?;
        }
        tx.commit().await?;
        let deleted = doomed.len() as u64;
        Ok(Purged {
            deleted,
            more: limit > 0 && doomed.len() >= limit,
        })
    }
}
