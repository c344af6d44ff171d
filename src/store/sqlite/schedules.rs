//! [`ScheduleStore`] on SQLite: the schedules' state and their ticks.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteStore, now_text};
use crate::store::schedules::{
    NewTick, ScheduleKey, ScheduleState, ScheduleStore, TICKS_KEPT, TickFire, TickOutcome,
    TickRecord, TickRecorded,
};
use crate::store::{RunKey, StoreError};

const SCHEDULE_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS schedules (
  instance   TEXT NOT NULL,
  project_id TEXT NOT NULL,
  job_id     TEXT NOT NULL,
  name       TEXT NOT NULL,
  paused     INTEGER NOT NULL DEFAULT 0,
  since      TEXT NOT NULL,
  last_tick  TEXT,
  PRIMARY KEY (instance, project_id, job_id, name)
);
CREATE TABLE IF NOT EXISTS schedule_ticks (
  instance    TEXT NOT NULL,
  project_id  TEXT NOT NULL,
  job_id      TEXT NOT NULL,
  name        TEXT NOT NULL,
  tick_at     TEXT NOT NULL,
  outcome     TEXT NOT NULL,
  run_id      TEXT,
  covers      INTEGER NOT NULL,
  first_tick  TEXT NOT NULL,
  catch_up    INTEGER NOT NULL,
  reason      TEXT,
  node_id     TEXT,
  recorded_at TEXT NOT NULL,
  PRIMARY KEY (instance, project_id, job_id, name, tick_at)
);
CREATE INDEX IF NOT EXISTS schedule_ticks_run ON schedule_ticks(instance, run_id);
"#;

/// Creates the tables (at open).
pub(super) fn schedule_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEDULE_SCHEMA)
}

/// Tick times as text that sorts as time does (UTC, fixed width).
fn tick_text(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn parse_utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default()
}

const TICK_COLUMNS: &str =
    "t.instance, t.project_id, t.job_id, t.name, t.tick_at, t.outcome, t.run_id,
    t.covers, t.first_tick, t.catch_up, t.reason, t.node_id, t.recorded_at";

fn tick_row(r: &rusqlite::Row, at: usize) -> rusqlite::Result<TickRecord> {
    let run: Option<String> = r.get(at + 6)?;
    Ok(TickRecord {
        key: ScheduleKey {
            instance: r.get(at)?,
            project_id: r.get(at + 1)?,
            job_id: r.get(at + 2)?,
            name: r.get(at + 3)?,
        },
        tick_at: parse_utc(&r.get::<_, String>(at + 4)?),
        outcome: TickOutcome::from_stored(&r.get::<_, String>(at + 5)?),
        run_id: run.and_then(|s| uuid::Uuid::parse_str(&s).ok()),
        covers: r.get::<_, i64>(at + 7)?.max(1) as u64,
        first_tick: parse_utc(&r.get::<_, String>(at + 8)?),
        catch_up: r.get(at + 9)?,
        reason: r.get(at + 10)?,
        node_id: r.get(at + 11)?,
        recorded_at: parse_utc(&r.get::<_, String>(at + 12)?),
    })
}

/// The run of the tick's job that is Queued or Running, if any.
fn active_run(c: &Connection, key: &ScheduleKey) -> rusqlite::Result<Option<String>> {
    c.prepare_cached(
        // One arm per status: each reads its partial index (only the Queued
        // or Running runs), never the history of ended ones.
        "SELECT run_id FROM runs WHERE status = 'Running' AND instance = ?1
           AND project_id = ?2 COLLATE NOCASE AND job_id = ?3 COLLATE NOCASE
         UNION ALL
         SELECT run_id FROM runs WHERE status = 'Queued' AND instance = ?1
           AND project_id = ?2 COLLATE NOCASE AND job_id = ?3 COLLATE NOCASE
         LIMIT 1",
    )?
    .query_row(params![key.instance, key.project_id, key.job_id], |r| {
        r.get(0)
    })
    .optional()
}

/// Records the tick (and queues its run) on the writer's connection.
fn record(c: &Connection, tick: &NewTick, fire: TickFire) -> rusqlite::Result<TickRecorded> {
    let k = &tick.key;
    let at = tick_text(&tick.tick_at);
    let inserted = c
        .prepare_cached(
            "INSERT INTO schedule_ticks (instance, project_id, job_id, name, tick_at, outcome,
               covers, first_tick, catch_up, node_id, recorded_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'missed', ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            k.instance,
            k.project_id,
            k.job_id,
            k.name,
            at,
            tick.covers as i64,
            tick_text(&tick.first_tick),
            tick.catch_up,
            tick.node_id,
            tick_text(&Utc::now()),
        ])?;
    if inserted == 0 {
        return Ok(TickRecorded::AlreadyRecorded);
    }
    let (outcome, run_id, reason) = match fire {
        TickFire::Missed => (TickOutcome::Missed, None, None),
        TickFire::Skipped(why) => (TickOutcome::Skipped, None, Some(why)),
        TickFire::Run {
            run,
            skip_if_active,
        } => match active_run(c, k)?.filter(|_| skip_if_active) {
            Some(other) => (
                TickOutcome::Skipped,
                None,
                Some(format!("the job was still running (run {other})")),
            ),
            None => {
                c.prepare_cached(
                    "INSERT INTO runs (instance, run_id, project_id, job_id, request, fingerprint, webhook_url, status, accepted_at, accepted_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'Queued', ?8, ?9)
                     ON CONFLICT (instance, run_id) DO NOTHING",
                )?
                .execute(params![
                    run.key.instance,
                    run.key.run_id.to_string(),
                    run.project_id,
                    run.job_id,
                    super::packed::pack(&run.request_json),
                    run.fingerprint,
                    run.webhook_url,
                    now_text(&run.accepted_at),
                    run.accepted_at.timestamp_millis(),
                ])?;
                (TickOutcome::Queued, Some(run.key.run_id.to_string()), None)
            }
        },
    };
    c.prepare_cached(
        "UPDATE schedule_ticks SET outcome = ?6, run_id = ?7, reason = ?8
         WHERE instance = ?1 AND project_id = ?2 AND job_id = ?3 AND name = ?4 AND tick_at = ?5",
    )?
    .execute(params![
        k.instance,
        k.project_id,
        k.job_id,
        k.name,
        at,
        outcome.as_str(),
        run_id,
        reason
    ])?;
    c.prepare_cached(
        "INSERT INTO schedules (instance, project_id, job_id, name, since, last_tick)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5)
         ON CONFLICT DO UPDATE SET last_tick = max(coalesce(last_tick, ''), excluded.last_tick)",
    )?
    .execute(params![k.instance, k.project_id, k.job_id, k.name, at])?;
    c.prepare_cached(
        "DELETE FROM schedule_ticks WHERE instance = ?1 AND project_id = ?2 AND job_id = ?3 AND name = ?4
           AND tick_at <= (SELECT tick_at FROM schedule_ticks WHERE instance = ?1 AND project_id = ?2
                             AND job_id = ?3 AND name = ?4 ORDER BY tick_at DESC LIMIT 1 OFFSET ?5)",
    )?
    .execute(params![k.instance, k.project_id, k.job_id, k.name, TICKS_KEPT as i64])?;
    Ok(TickRecorded::Recorded(outcome))
}

#[async_trait]
impl ScheduleStore for SqliteStore {
    async fn schedule_states(
        &self,
        instance: Option<&str>,
    ) -> Result<Vec<ScheduleState>, StoreError> {
        let instance = instance.map(str::to_owned);
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT s.instance, s.project_id, s.job_id, s.name, s.paused, s.since, {TICK_COLUMNS}
                 FROM schedules s LEFT JOIN schedule_ticks t
                   ON t.instance = s.instance AND t.project_id = s.project_id AND t.job_id = s.job_id
                  AND t.name = s.name AND t.tick_at = s.last_tick
                 WHERE ?1 IS NULL OR s.instance = ?1
                 ORDER BY s.instance, s.project_id, s.job_id, s.name"
            ))?;
            let rows = st.query_map(params![instance], |r| {
                let has_tick = r.get::<_, Option<String>>(6)?.is_some();
                Ok(ScheduleState {
                    key: ScheduleKey {
                        instance: r.get(0)?,
                        project_id: r.get(1)?,
                        job_id: r.get(2)?,
                        name: r.get(3)?,
                    },
                    paused: r.get(4)?,
                    since: parse_utc(&r.get::<_, String>(5)?),
                    last: if has_tick { Some(tick_row(r, 6)?) } else { None },
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn register_schedule(
        &self,
        key: &ScheduleKey,
        since: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let k = key.clone();
        self.write_one(move |c| {
            c.prepare_cached(
                "INSERT INTO schedules (instance, project_id, job_id, name, since)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            )?
            .execute(params![
                k.instance,
                k.project_id,
                k.job_id,
                k.name,
                tick_text(&since)
            ])?;
            Ok(())
        })
        .await
    }

    async fn set_schedule_paused(
        &self,
        key: &ScheduleKey,
        paused: bool,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let k = key.clone();
        self.write_one(move |c| {
            // Resuming starts the schedule over from now: the pause's ticks
            // are not caught up.
            c.prepare_cached(
                "INSERT INTO schedules (instance, project_id, job_id, name, paused, since)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT DO UPDATE SET paused = excluded.paused,
                   since = CASE WHEN schedules.paused AND NOT excluded.paused THEN excluded.since ELSE schedules.since END",
            )?
            .execute(params![k.instance, k.project_id, k.job_id, k.name, paused, tick_text(&now)])?;
            Ok(())
        })
        .await
    }

    async fn record_tick(&self, tick: NewTick, fire: TickFire) -> Result<TickRecorded, StoreError> {
        self.write(move |c| record(c, &tick, fire)).await
    }

    async fn recent_ticks(
        &self,
        key: &ScheduleKey,
        limit: usize,
    ) -> Result<Vec<TickRecord>, StoreError> {
        let k = key.clone();
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {TICK_COLUMNS} FROM schedule_ticks t
                 WHERE t.instance = ?1 AND t.project_id = ?2 AND t.job_id = ?3 AND t.name = ?4
                 ORDER BY t.tick_at DESC LIMIT ?5"
            ))?;
            let rows = st.query_map(
                params![k.instance, k.project_id, k.job_id, k.name, limit as i64],
                |r| tick_row(r, 0),
            )?;
            rows.collect()
        })
        .await
    }

    async fn tick_of_run(&self, run: &RunKey) -> Result<Option<TickRecord>, StoreError> {
        let (instance, id) = (run.instance.clone(), run.run_id.to_string());
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {TICK_COLUMNS} FROM schedule_ticks t WHERE t.instance = ?1 AND t.run_id = ?2"
            ))?
            .query_row(params![instance, id], |r| tick_row(r, 0))
            .optional()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewRun, Store};

    fn sched() -> ScheduleKey {
        ScheduleKey {
            instance: "default".into(),
            project_id: "p".into(),
            job_id: "j".into(),
            name: "s".into(),
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn tick(t: DateTime<Utc>) -> NewTick {
        NewTick {
            key: sched(),
            tick_at: t,
            covers: 1,
            first_tick: t,
            catch_up: false,
            node_id: "n".into(),
        }
    }

    fn run_of(t: DateTime<Utc>, skip_if_active: bool) -> TickFire {
        let id = uuid::Uuid::new_v5(&uuid::Uuid::nil(), t.to_rfc3339().as_bytes());
        TickFire::Run {
            run: NewRun {
                key: RunKey {
                    instance: "default".into(),
                    run_id: id,
                },
                project_id: "p".into(),
                job_id: "j".into(),
                request_json: "{}".into(),
                fingerprint: "f".into(),
                webhook_url: None,
                accepted_at: chrono::Local::now().fixed_offset(),
            },
            skip_if_active,
        }
    }

    #[tokio::test]
    async fn a_tick_is_recorded_once_with_its_run_and_skipped_while_the_job_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).unwrap();
        let t1 = at("2026-01-01T00:00:02Z");
        store
            .register_schedule(&sched(), at("2026-01-01T00:00:00Z"))
            .await
            .unwrap();
        let first = store.record_tick(tick(t1), run_of(t1, true)).await.unwrap();
        assert_eq!(first, TickRecorded::Recorded(TickOutcome::Queued));
        // The same tick again (another node): nothing new, one run.
        let again = store
            .record_tick(tick(t1), run_of(t1, false))
            .await
            .unwrap();
        assert_eq!(again, TickRecorded::AlreadyRecorded);
        assert_eq!(store.queued_count().await.unwrap(), 1);
        // The next tick while that run is queued: skipped, naming it.
        let t2 = at("2026-01-01T00:00:04Z");
        let second = store.record_tick(tick(t2), run_of(t2, true)).await.unwrap();
        assert_eq!(second, TickRecorded::Recorded(TickOutcome::Skipped));
        let recent = store.recent_ticks(&sched(), 10).await.unwrap();
        assert_eq!(recent.len(), 2);
        assert!(
            recent[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("still running")
        );
        let state = &store.schedule_states(None).await.unwrap()[0];
        assert_eq!(state.dealt_with_until(), t2);
        assert_eq!(
            state.last.as_ref().map(|t| t.outcome),
            Some(TickOutcome::Skipped)
        );
        let run = RunKey {
            instance: "default".into(),
            run_id: recent[1].run_id.unwrap(),
        };
        assert_eq!(
            store.tick_of_run(&run).await.unwrap().map(|t| t.tick_at),
            Some(t1)
        );
        assert_eq!(
            store.run(&run).await.unwrap().map(|r| r.job_id),
            Some("j".into())
        );
    }

    #[tokio::test]
    async fn resuming_starts_over_from_now_and_old_ticks_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).unwrap();
        let t0 = at("2026-01-01T00:00:00Z");
        store.set_schedule_paused(&sched(), true, t0).await.unwrap();
        let later = at("2026-01-01T01:00:00Z");
        store
            .set_schedule_paused(&sched(), true, later)
            .await
            .unwrap();
        assert_eq!(store.schedule_states(None).await.unwrap()[0].since, t0);
        store
            .set_schedule_paused(&sched(), false, later)
            .await
            .unwrap();
        let st = &store.schedule_states(Some("default")).await.unwrap()[0];
        assert_eq!((st.paused, st.since), (false, later));
        assert!(
            store
                .schedule_states(Some("other"))
                .await
                .unwrap()
                .is_empty()
        );
        for i in 0..(TICKS_KEPT as i64 + 5) {
            let t = later + chrono::Duration::seconds(i);
            store.record_tick(tick(t), TickFire::Missed).await.unwrap();
        }
        let kept = store.recent_ticks(&sched(), 1000).await.unwrap();
        assert_eq!(kept.len(), TICKS_KEPT);
        assert_eq!(
            kept[0].tick_at,
            later + chrono::Duration::seconds(TICKS_KEPT as i64 + 4)
        );
    }
}
