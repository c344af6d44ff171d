//! [`ScheduleStore`] on PostgreSQL: a tick is unique per schedule and fire
//! time (its primary key), so of several nodes firing the same tick one
//! inserts it, and queues its run in the same transaction; the others find
//! it there.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{NEWS_CHANNEL, PostgresStore, pool_error, submit::argument_of};
use crate::store::schedules::{
    NewTick, ScheduleKey, ScheduleState, ScheduleStore, TICKS_KEPT, TickFire, TickOutcome,
    TickRecord, TickRecorded,
};
use crate::store::{NewRun, RunKey, StoreError};

const TICK_COLUMNS: &str =
    "t.instance, t.project_id, t.job_id, t.name, t.tick_at, t.outcome, t.run_id,
    t.covers, t.first_tick, t.catch_up, t.reason, t.node_id, t.recorded_at";

fn tick_row(r: &tokio_postgres::Row, at: usize) -> TickRecord {
    TickRecord {
        key: ScheduleKey {
            instance: r.get(at),
            project_id: r.get(at + 1),
            job_id: r.get(at + 2),
            name: r.get(at + 3),
        },
        tick_at: r.get(at + 4),
        outcome: TickOutcome::from_stored(r.get(at + 5)),
        run_id: r.get(at + 6),
        covers: r.get::<_, i64>(at + 7).max(1) as u64,
        first_tick: r.get(at + 8),
        catch_up: r.get(at + 9),
        reason: r.get(at + 10),
        node_id: r.get(at + 11),
        recorded_at: r.get(at + 12),
    }
}

/// Queues the run of a tick (its ID is the tick's, so a repeat adds nothing).
async fn insert_run(
    tx: &deadpool_postgres::Transaction<'_>,
    run: &NewRun,
) -> Result<(), StoreError> {
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO runs (instance, run_id, project_id, job_id, request, argument, fingerprint,
               webhook_url, status, accepted_at, accepted_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'Queued', $9, $10)
             ON CONFLICT (instance, run_id) DO NOTHING",
        )
        .await?,
        &[
            &run.key.instance,
            &run.key.run_id,
            &run.project_id,
            &run.job_id,
            &run.request_json,
            &argument_of(&run.request_json),
            &run.fingerprint,
            &run.webhook_url,
            &run.accepted_at,
            &run.accepted_at.timestamp_millis(),
        ],
    )
    .await?;
    tx.execute(
        &tx.prepare_cached("SELECT pg_notify($1, 'queued')").await?,
        &[&NEWS_CHANNEL],
    )
    .await?;
    Ok(())
}

/// The run of the tick's job that is Queued or Running, if any.
async fn active_run(
    tx: &deadpool_postgres::Transaction<'_>,
    k: &ScheduleKey,
) -> Result<Option<Uuid>, StoreError> {
    let row = tx
        .query_opt(
            &tx.prepare_cached(
                "SELECT run_id FROM runs WHERE status IN ('Queued', 'Running') AND instance = $1
                   AND lower(project_id) = lower($2) AND lower(job_id) = lower($3) LIMIT 1",
            )
            .await?,
            &[&k.instance, &k.project_id, &k.job_id],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

#[async_trait]
impl ScheduleStore for PostgresStore {
    async fn schedule_states(
        &self,
        instance: Option<&str>,
    ) -> Result<Vec<ScheduleState>, StoreError> {
        let c = self.pool.get().await.map_err(pool_error)?;
        let rows = c
            .query(
                &c.prepare_cached(&format!(
                    "SELECT s.instance, s.project_id, s.job_id, s.name, s.paused, s.since, {TICK_COLUMNS}
                     FROM schedules s LEFT JOIN schedule_ticks t
                       ON t.instance = s.instance AND t.project_id = s.project_id
                      AND t.job_id = s.job_id AND t.name = s.name AND t.tick_at = s.last_tick
                     WHERE $1::text IS NULL OR s.instance = $1
                     ORDER BY s.instance, s.project_id, s.job_id, s.name"
                ))
                .await?,
                &[&instance],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ScheduleState {
                key: ScheduleKey {
                    instance: r.get(0),
                    project_id: r.get(1),
                    job_id: r.get(2),
                    name: r.get(3),
                },
                paused: r.get(4),
                since: r.get(5),
                last: r
                    .get::<_, Option<String>>(6)
                    .is_some()
                    .then(|| tick_row(r, 6)),
            })
            .collect())
    }

    async fn register_schedule(
        &self,
        key: &ScheduleKey,
        since: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let c = self.pool.get().await.map_err(pool_error)?;
        c.execute(
            &c.prepare_cached(
                "INSERT INTO schedules (instance, project_id, job_id, name, since)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .await?,
            &[
                &key.instance,
                &key.project_id,
                &key.job_id,
                &key.name,
                &since,
            ],
        )
        .await?;
        Ok(())
    }

    async fn set_schedule_paused(
        &self,
        key: &ScheduleKey,
        paused: bool,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let c = self.pool.get().await.map_err(pool_error)?;
        c.execute(
            &c.prepare_cached(
                "INSERT INTO schedules (instance, project_id, job_id, name, paused, since)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (instance, project_id, job_id, name) DO UPDATE SET paused = excluded.paused,
                   since = CASE WHEN schedules.paused AND NOT excluded.paused THEN excluded.since
                                ELSE schedules.since END",
            )
            .await?,
            &[&key.instance, &key.project_id, &key.job_id, &key.name, &paused, &now],
        )
        .await?;
        Ok(())
    }

    async fn record_tick(&self, tick: NewTick, fire: TickFire) -> Result<TickRecorded, StoreError> {
        let mut c = self.pool.get().await.map_err(pool_error)?;
        let tx = c.transaction().await?;
        let k = &tick.key;
        let inserted = tx
            .execute(
                &tx.prepare_cached(
                    "INSERT INTO schedule_ticks (instance, project_id, job_id, name, tick_at, outcome,
                       covers, first_tick, catch_up, node_id)
                     VALUES ($1, $2, $3, $4, $5, 'missed', $6, $7, $8, $9)
                     ON CONFLICT DO NOTHING",
                )
                .await?,
                &[
                    &k.instance, &k.project_id, &k.job_id, &k.name, &tick.tick_at,
                    &(tick.covers as i64), &tick.first_tick, &tick.catch_up, &tick.node_id,
                ],
            )
            .await?;
        if inserted == 0 {
            return Ok(TickRecorded::AlreadyRecorded);
        }
        let (outcome, run_id, reason) = match fire {
            TickFire::Missed => (TickOutcome::Missed, None, None),
            TickFire::Skipped(why) => (TickOutcome::Skipped, None, Some(why)),
            TickFire::Run {
                run,
                skip_if_active,
            } => match active_run(&tx, k).await?.filter(|_| skip_if_active) {
                Some(other) => (
                    TickOutcome::Skipped,
                    None,
                    Some(format!("the job was still running (run {other})")),
                ),
                None => {
                    insert_run(&tx, &run).await?;
                    (TickOutcome::Queued, Some(run.key.run_id), None)
                }
            },
        };
        tx.execute(
            &tx.prepare_cached(
                "UPDATE schedule_ticks SET outcome = $6, run_id = $7, reason = $8
                 WHERE instance = $1 AND project_id = $2 AND job_id = $3 AND name = $4 AND tick_at = $5",
            )
            .await?,
            &[
                &k.instance, &k.project_id, &k.job_id, &k.name, &tick.tick_at,
                &outcome.as_str(), &run_id, &reason,
            ],
        )
        .await?;
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO schedules AS s (instance, project_id, job_id, name, since, last_tick)
                 VALUES ($1, $2, $3, $4, $5, $5)
                 ON CONFLICT (instance, project_id, job_id, name)
                 DO UPDATE SET last_tick = greatest(s.last_tick, excluded.last_tick)",
            )
            .await?,
            &[
                &k.instance,
                &k.project_id,
                &k.job_id,
                &k.name,
                &tick.tick_at,
            ],
        )
        .await?;
        tx.execute(
            &tx.prepare_cached(
                "DELETE FROM schedule_ticks WHERE instance = $1 AND project_id = $2 AND job_id = $3
                   AND name = $4 AND tick_at <= (SELECT tick_at FROM schedule_ticks
                     WHERE instance = $1 AND project_id = $2 AND job_id = $3 AND name = $4
                     ORDER BY tick_at DESC LIMIT 1 OFFSET $5)",
            )
            .await?,
            &[
                &k.instance,
                &k.project_id,
                &k.job_id,
                &k.name,
                &(TICKS_KEPT as i64),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(TickRecorded::Recorded(outcome))
    }

    async fn recent_ticks(
        &self,
        key: &ScheduleKey,
        limit: usize,
    ) -> Result<Vec<TickRecord>, StoreError> {
        let c = self.pool.get().await.map_err(pool_error)?;
        let rows = c
            .query(
                &c.prepare_cached(&format!(
                    "SELECT {TICK_COLUMNS} FROM schedule_ticks t
                     WHERE t.instance = $1 AND t.project_id = $2 AND t.job_id = $3 AND t.name = $4
                     ORDER BY t.tick_at DESC LIMIT $5"
                ))
                .await?,
                &[
                    &key.instance,
                    &key.project_id,
                    &key.job_id,
                    &key.name,
                    &(limit as i64),
                ],
            )
            .await?;
        Ok(rows.iter().map(|r| tick_row(r, 0)).collect())
    }

    async fn tick_of_run(&self, run: &RunKey) -> Result<Option<TickRecord>, StoreError> {
        let c = self.pool.get().await.map_err(pool_error)?;
        let row = c
            .query_opt(
                &c.prepare_cached(&format!(
                    "SELECT {TICK_COLUMNS} FROM schedule_ticks t WHERE t.instance = $1 AND t.run_id = $2"
                ))
                .await?,
                &[&run.instance, &run.run_id],
            )
            .await?;
        Ok(row.map(|r| tick_row(&r, 0)))
    }
}
