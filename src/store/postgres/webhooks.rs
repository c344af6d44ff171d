//! The webhook outbox: due deliveries are claimed, so one node at a time
//! attempts each, and a node that died mid-attempt gives it back when its
//! claim runs out.

use chrono::{DateTime, FixedOffset};

use super::{PostgresStore, local};
use crate::store::{RunKey, StoreError, WebhookAttempt, WebhookDue, WebhookNext};

/// How long a claimed delivery is left to the node that claimed it.
const CLAIM_SECS: f64 = 120.0;

impl PostgresStore {
    /// Claims up to `limit` due webhooks, oldest first. Due by the store's
    /// clock (`_now`, the node's, is not used: nodes' clocks may differ).
    pub(super) async fn due_webhooks_pg(
        &self,
        _now: DateTime<FixedOffset>,
        limit: usize,
    ) -> Result<Vec<WebhookDue>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &conn
                    .prepare_cached(
                        "WITH due AS (
                   SELECT instance, run_id FROM webhooks
                   WHERE state = 'pending' AND next_attempt_at <= now()
                     AND (claimed_until IS NULL OR claimed_until < now())
                   ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                 UPDATE webhooks w SET claimed_until = now() + make_interval(secs => $2)
                 FROM due WHERE w.instance = due.instance AND w.run_id = due.run_id
                 RETURNING w.instance, w.run_id, w.url, w.body, w.attempts, w.created_at,
                   w.next_attempt_at",
                    )
                    .await?,
                &[&(limit as i64), &CLAIM_SECS],
            )
            .await?;
        let mut due: Vec<(DateTime<chrono::Utc>, WebhookDue)> = rows
            .iter()
            .map(|r| {
                let next: Option<DateTime<chrono::Utc>> = r.get(6);
                (
                    next.unwrap_or_default(),
                    WebhookDue {
                        key: RunKey {
                            instance: r.get(0),
                            run_id: r.get(1),
                        },
                        url: r.get(2),
                        body: r.get(3),
                        attempts: r.get::<_, i32>(4).max(0) as u32,
                        created_at: local(r.get(5)),
                    },
                )
            })
            .collect();
        due.sort_by_key(|(next, _)| *next);
        Ok(due.into_iter().map(|(_, d)| d).collect())
    }

    /// Records an attempt and what comes next, and gives the claim back. A
    /// retry's time is kept as a delay from now, by the store's clock.
    pub(super) async fn record_attempt_pg(
        &self,
        key: &RunKey,
        attempt: WebhookAttempt,
        next: WebhookNext,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let status = attempt.status_code.map(i32::from);
        let n = attempt.attempt as i32;
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO webhook_attempts (instance, run_id, attempt, at, status_code, error)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (instance, run_id, attempt) DO UPDATE
               SET at = excluded.at, status_code = excluded.status_code, error = excluded.error",
            )
            .await?,
            &[
                &key.instance,
                &key.run_id,
                &n,
                &attempt.at,
                &status,
                &attempt.error,
            ],
        )
        .await?;
        let (state, delay) = match next {
            WebhookNext::Delivered => ("delivered", None),
            WebhookNext::GiveUp => ("failed", None),
            WebhookNext::RetryAt(t) => {
                let ms = (t - chrono::Local::now().fixed_offset()).num_milliseconds();
                ("pending", Some(ms.max(0) as f64 / 1000.0))
            }
        };
        tx.execute(
            &tx.prepare_cached(
                "UPDATE webhooks SET attempts = $3, state = $4, claimed_until = NULL,
               next_attempt_at = CASE WHEN $5::float8 IS NULL THEN NULL
                                      ELSE now() + make_interval(secs => $5::float8) END
             WHERE instance = $1 AND run_id = $2",
            )
            .await?,
            &[&key.instance, &key.run_id, &n, &state, &delay],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn attempts_pg(
        &self,
        key: &RunKey,
    ) -> Result<Vec<WebhookAttempt>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &conn
                    .prepare_cached(
                        "SELECT attempt, at, status_code, error FROM webhook_attempts
                 WHERE instance = $1 AND run_id = $2 ORDER BY attempt",
                    )
                    .await?,
                &[&key.instance, &key.run_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| WebhookAttempt {
                attempt: r.get::<_, i32>(0).max(0) as u32,
                at: local(r.get(1)),
                status_code: r
                    .get::<_, Option<i32>>(2)
                    .and_then(|c| u16::try_from(c).ok()),
                error: r.get(3),
            })
            .collect())
    }
}
