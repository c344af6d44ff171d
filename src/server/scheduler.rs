//! The scheduler: in every node, a task that sleeps until the next tick of
//! the loaded projects' schedules and fires the ticks that are due.
//!
//! Every node fires every tick; the store keeps one record per schedule and
//! tick (and queues the run in the same transaction), so exactly one run is
//! queued per tick however many nodes there are. The state of a schedule
//! (paused, the last tick dealt with) lives in the store, so a node that
//! starts after downtime knows which ticks were missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Local, Utc};

use super::Service;
use crate::project::{DueTick, Job, LoadOutcome, MissedTicks, Project, Schedule, TickPlan};
use crate::run::Submission;
use crate::store::schedules::{
    NewTick, ScheduleKey, ScheduleState, TickFire, TickOutcome, TickRecorded,
};
use crate::store::{NewRun, RunKey, StoreError};

/// The longest the scheduler sleeps: it looks again at least this often (for
/// reloaded projects, and schedules paused or resumed through other nodes).
const MAX_NAP: Duration = Duration::from_secs(5);
/// The wait after the store failed.
const RETRY: Duration = Duration::from_secs(1);

/// The namespace of the run IDs of scheduled runs (UUIDv5 of the tick).
const TICK_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b1e_5c0a_3f7d_4e2b_9a41_0d8c_2f6e_7a13);

/// A loaded schedule with its project and job.
pub struct Loaded<'a> {
    /// How the store names it.
    pub key: ScheduleKey,
    /// Its project.
    pub project: &'a Project,
    /// Its job.
    pub job: &'a Job,
    /// The schedule.
    pub schedule: &'a Schedule,
}

/// Every schedule of the loaded projects (of `instance`, or of all).
pub fn loaded_schedules<'a>(projects: &'a LoadOutcome, instance: Option<&str>) -> Vec<Loaded<'a>> {
    let mut out = Vec::new();
    for p in projects
        .projects
        .iter()
        .filter(|p| instance.is_none_or(|i| p.instance == i))
    {
        for j in p.jobs.values() {
            for s in &j.schedules {
                out.push(Loaded {
                    key: ScheduleKey {
                        instance: p.instance.clone(),
                        project_id: p.id.0.clone(),
                        job_id: j.id.0.clone(),
                        name: s.name.clone(),
                    },
                    project: p,
                    job: j,
                    schedule: s,
                });
            }
        }
    }
    out
}

/// The run ID of a tick: the same on every node, so a tick makes one run.
pub fn tick_run_id(key: &ScheduleKey, at: DateTime<Utc>) -> uuid::Uuid {
    let name = format!(
        "{}\n{}\n{}\n{}\n{}",
        key.instance,
        key.project_id,
        key.job_id,
        key.name,
        at.to_rfc3339()
    );
    uuid::Uuid::new_v5(&TICK_NAMESPACE, name.as_bytes())
}

/// Runs until the server stops.
pub(super) async fn schedule_loop(svc: Arc<Service>) {
    let watching = Utc::now();
    while !svc.is_stopping() {
        let nap = match pass(&svc, watching).await {
            Ok(Some(next)) => (next - Utc::now())
                .to_std()
                .unwrap_or_default()
                .min(MAX_NAP),
            Ok(None) => MAX_NAP,
            Err(e) => {
                tracing::warn!("scheduler: {e}");
                RETRY
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            _ = svc.stop.notified() => {}
        }
    }
}

/// Fires what is due now; the next tick of any schedule.
async fn pass(svc: &Service, watching: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, StoreError> {
    let projects = svc.projects();
    let loaded = loaded_schedules(&projects, None);
    if loaded.is_empty() {
        return Ok(None);
    }
    let states: HashMap<ScheduleKey, ScheduleState> = svc
        .store
        .schedule_states(None)
        .await?
        .into_iter()
        .map(|s| (s.key.clone(), s))
        .collect();
    let now = Utc::now();
    let mut next: Option<DateTime<Utc>> = None;
    for l in &loaded {
        match states.get(&l.key) {
            // First seen: it starts from now (no history to catch up).
            None => svc.store.register_schedule(&l.key, now).await?,
            Some(state) if !state.paused => {
                let todo =
                    crate::project::plan(l.schedule, state.dealt_with_until(), now, watching);
                carry_out(svc, l, todo).await?;
            }
            Some(_) => {}
        }
        if let Some(t) = crate::project::next_after(l.schedule, now) {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
    }
    Ok(next)
}

/// Records missed ticks and fires the due one.
async fn carry_out(svc: &Service, l: &Loaded<'_>, todo: TickPlan) -> Result<(), StoreError> {
    if let Some(m) = todo.missed {
        record_missed(svc, l, m).await?;
    }
    if let Some(due) = todo.fire {
        fire(svc, l, due).await?;
    }
    Ok(())
}

async fn record_missed(svc: &Service, l: &Loaded<'_>, m: MissedTicks) -> Result<(), StoreError> {
    let tick = NewTick {
        key: l.key.clone(),
        tick_at: m.last,
        covers: m.count,
        first_tick: m.first,
        catch_up: false,
        node_id: svc.node.node_id.clone(),
    };
    if svc.store.record_tick(tick, TickFire::Missed).await? != TickRecorded::AlreadyRecorded {
        tracing::warn!(project = %l.key.project_id, job = %l.key.job_id, schedule = %l.key.name,
            first = %m.first, last = %m.last, count = m.count, "scheduled ticks missed (no node was running)");
    }
    Ok(())
}

/// The request a schedule's run is made with.
fn submission(l: &Loaded<'_>, run_id: uuid::Uuid) -> Submission {
    let s = l.schedule;
    Submission {
        run_id,
        project_id: l.project.id.0.clone(),
        job_id: l.job.id.0.clone(),
        chain_jobs: s.chain_jobs,
        logging_level: s.logging_level,
        argument: s.argument.clone(),
        begin_at_row: s.begin_at_row,
        end_after_row: s.end_after_row,
        thread_count: s.thread_count,
        web_hook_url: s.web_hook_url.clone(),
        instance: None,
        resume_at_row: None,
        continues: None,
    }
}

/// Records a due tick and queues its run (or skips it), in one transaction.
async fn fire(svc: &Service, l: &Loaded<'_>, due: DueTick) -> Result<(), StoreError> {
    let run_id = tick_run_id(&l.key, due.at);
    let req = submission(l, run_id);
    let depth = svc.queued.load(Ordering::Relaxed);
    let what = if depth >= svc.config.queue_size {
        TickFire::Skipped(format!("the run queue was full ({depth} runs waiting)"))
    } else {
        TickFire::Run {
            run: NewRun {
                key: RunKey {
                    instance: l.key.instance.clone(),
                    run_id,
                },
                project_id: req.project_id.clone(),
                job_id: req.job_id.clone(),
                request_json: serde_json::to_string(&req).unwrap_or_default(),
                fingerprint: req.fingerprint(),
                webhook_url: req.web_hook_url.clone(),
                accepted_at: Local::now().fixed_offset(),
            },
            skip_if_active: l.schedule.overlap == crate::project::Overlap::Skip,
        }
    };
    let tick = NewTick {
        key: l.key.clone(),
        tick_at: due.at,
        covers: due.covers,
        first_tick: due.at,
        catch_up: due.catch_up,
        node_id: svc.node.node_id.clone(),
    };
    let recorded = svc.store.record_tick(tick, what).await?;
    let (project, job, schedule) = (&l.key.project_id, &l.key.job_id, &l.key.name);
    match recorded {
        TickRecorded::Recorded(TickOutcome::Queued) => {
            svc.queued.fetch_add(1, Ordering::SeqCst);
            metrics::gauge!("tidepool_queue_depth").set(svc.queue_depth() as f64);
            svc.work.notify_one();
            tracing::info!(%project, %job, %schedule, tick = %due.at, run = %run_id,
                catch_up = due.catch_up, "scheduled run queued");
        }
        TickRecorded::Recorded(outcome) => {
            tracing::info!(%project, %job, %schedule, tick = %due.at, outcome = outcome.as_str(),
                "scheduled tick without a run");
        }
        TickRecorded::AlreadyRecorded => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_has_one_run_id_everywhere() {
        let key = ScheduleKey {
            instance: "default".into(),
            project_id: "p".into(),
            job_id: "j".into(),
            name: "s".into(),
        };
        let t = DateTime::parse_from_rfc3339("2026-01-01T00:00:02Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(tick_run_id(&key, t), tick_run_id(&key.clone(), t));
        assert_ne!(
            tick_run_id(&key, t),
            tick_run_id(&key, t + chrono::Duration::seconds(2))
        );
        let other = ScheduleKey {
            name: "s2".into(),
            ..key.clone()
        };
        assert_ne!(tick_run_id(&key, t), tick_run_id(&other, t));
    }
}
