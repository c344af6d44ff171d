//! What the store keeps of schedules: each schedule's pause state and the
//! ticks it fired (one record per schedule and tick time, unique across every
//! node: the record and the run it queues are written in one transaction).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{NewRun, RunKey, StoreError};

/// Ticks kept per schedule (older ones are deleted as new ones come).
pub const TICKS_KEPT: usize = 100;

/// A schedule, as the store names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScheduleKey {
    /// The instance of its project.
    pub instance: String,
    /// The project's ID, as loaded.
    pub project_id: String,
    /// The job's ID, as loaded.
    pub job_id: String,
    /// The schedule's name in its job.
    pub name: String,
}

/// What became of a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TickOutcome {
    /// A run was queued for it.
    Queued,
    /// No run: the job was still queued or running (overlap `skip`), or the queue was full.
    Skipped,
    /// No run: no node ran the scheduler when it came due (catch-up `none`).
    Missed,
}

impl TickOutcome {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            TickOutcome::Queued => "queued",
            TickOutcome::Skipped => "skipped",
            TickOutcome::Missed => "missed",
        }
    }

    /// As stored; anything unknown reads as skipped (no run).
    pub fn from_stored(s: &str) -> Self {
        match s {
            "queued" => TickOutcome::Queued,
            "missed" => TickOutcome::Missed,
            _ => TickOutcome::Skipped,
        }
    }
}

/// A tick as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct TickRecord {
    /// Its schedule.
    pub key: ScheduleKey,
    /// The fire time (for missed ticks: the last of them).
    pub tick_at: DateTime<Utc>,
    /// What became of it.
    pub outcome: TickOutcome,
    /// The run queued for it.
    pub run_id: Option<uuid::Uuid>,
    /// How many ticks the record stands for (more than 1: missed ticks, or a catch-up run).
    pub covers: u64,
    /// The first tick it stands for.
    pub first_tick: DateTime<Utc>,
    /// A catch-up run (`catch_up = "last"` after downtime).
    pub catch_up: bool,
    /// Why there is no run (skipped).
    pub reason: Option<String>,
    /// The node that recorded it.
    pub node_id: Option<String>,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
}

/// A schedule's state in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleState {
    /// The schedule.
    pub key: ScheduleKey,
    /// Paused: no ticks fire (none are missed either).
    pub paused: bool,
    /// Ticks up to here are dealt with: when the schedule was first seen, or resumed.
    pub since: DateTime<Utc>,
    /// The latest tick recorded.
    pub last: Option<TickRecord>,
}

impl ScheduleState {
    /// Ticks up to this time are dealt with (fired, skipped, missed, or before the schedule existed).
    pub fn dealt_with_until(&self) -> DateTime<Utc> {
        match &self.last {
            Some(t) if t.tick_at > self.since => t.tick_at,
            _ => self.since,
        }
    }
}

/// A tick to record.
#[derive(Debug, Clone)]
pub struct NewTick {
    /// Its schedule.
    pub key: ScheduleKey,
    /// The fire time (missed ticks: the last of them).
    pub tick_at: DateTime<Utc>,
    /// How many ticks it stands for.
    pub covers: u64,
    /// The first of them.
    pub first_tick: DateTime<Utc>,
    /// A catch-up run.
    pub catch_up: bool,
    /// The node recording it.
    pub node_id: String,
}

/// What to record for a tick.
#[derive(Debug, Clone)]
pub enum TickFire {
    /// Queue this run (in the same transaction), unless `skip_if_active` and
    /// the job has a Queued or Running run: then the tick is skipped.
    Run {
        /// The run (its ID derived from the tick).
        run: NewRun,
        /// Overlap `skip`.
        skip_if_active: bool,
    },
    /// Skipped for this reason (no run).
    Skipped(String),
    /// Missed (no run).
    Missed,
}

/// What [`ScheduleStore::record_tick`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickRecorded {
    /// The tick was recorded before (by another node, or this one): nothing new.
    AlreadyRecorded,
    /// Recorded, with this outcome.
    Recorded(TickOutcome),
}

/// Schedules' pause state and ticks.
#[async_trait]
pub trait ScheduleStore {
    /// The state of every schedule the store knows, of `instance` or of all.
    async fn schedule_states(
        &self,
        instance: Option<&str>,
    ) -> Result<Vec<ScheduleState>, StoreError>;
    /// Starts keeping a schedule first seen now (nothing if it is known).
    async fn register_schedule(
        &self,
        key: &ScheduleKey,
        since: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Pauses or resumes a schedule; resuming at `now` lets the ticks of the
    /// pause go (they are neither run nor missed).
    async fn set_schedule_paused(
        &self,
        key: &ScheduleKey,
        paused: bool,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Records a tick and, for [`TickFire::Run`], queues its run, in one
    /// transaction; a tick recorded before is left as it is.
    async fn record_tick(&self, tick: NewTick, fire: TickFire) -> Result<TickRecorded, StoreError>;
    /// A schedule's latest ticks, newest first.
    async fn recent_ticks(
        &self,
        key: &ScheduleKey,
        limit: usize,
    ) -> Result<Vec<TickRecord>, StoreError>;
    /// The tick that queued a run, if a schedule did.
    async fn tick_of_run(&self, run: &RunKey) -> Result<Option<TickRecord>, StoreError>;
}
