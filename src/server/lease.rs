//! A node among others on one store: leases on the runs it executes, its
//! heartbeat, taking over runs whose node went silent, and news from the
//! other nodes (runs queued, ended, cancels asked).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};

use super::Service;
use crate::engine::CancelToken;
use crate::project::{JobId, LoadOutcome};
use crate::store::{ConcurrencyLimits, LeaseState, NodeInfo, RunKey, StoreError, StoreNews};

/// Runs taken over per sweep; the rest wait for the next one.
const TAKEOVER_BATCH: usize = 64;

/// A node silent this long (stopped or lost) leaves the list of nodes: node
/// names that change with every deployment must not pile up there.
const FORGET_NODES_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// How often a node looks for nodes to forget.
const FORGET_NODES_EVERY: Duration = Duration::from_secs(3600);

/// A run this node executes: the lease it holds it under and the switches
/// that stop it.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    /// The lease epoch of the claim: every write of the run's state names it.
    pub(crate) epoch: i64,
    /// Stops the engine between batches.
    pub(crate) cancel: CancelToken,
    lost: Arc<AtomicBool>,
    handed_back: Arc<AtomicBool>,
    done: Arc<Notify>,
}

impl Held {
    pub(crate) fn new(epoch: i64) -> Self {
        Held {
            epoch,
            cancel: CancelToken::new(),
            lost: Arc::default(),
            handed_back: Arc::default(),
            done: Arc::default(),
        }
    }

    /// Another node took the run over: stop, and write nothing more.
    pub(crate) fn lose(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.cancel.cancel();
    }

    /// Whether the lease was lost, or could not be confirmed in time.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst) || self.cancel.deadline_passed()
    }

    /// A renewal sent at `sent` was confirmed: the run is surely ours for
    /// `sure_for` from then.
    pub(crate) fn confirmed(&self, sent: tokio::time::Instant, sure_for: Duration) {
        self.cancel.stop_at((sent + sure_for).into_std());
    }

    /// The node drains: stop the run and queue it again for another node.
    pub(crate) fn hand_back(&self) {
        self.handed_back.store(true, Ordering::SeqCst);
        self.cancel.cancel();
    }

    /// Whether the run is being handed back.
    pub(crate) fn is_handed_back(&self) -> bool {
        self.handed_back.load(Ordering::SeqCst)
    }

    /// The engine returned: renewals stop.
    pub(crate) fn stop_renewing(&self) {
        self.done.notify_one();
    }
}

impl Service {
    /// What this node tells the store about itself now.
    pub(crate) fn node_now(&self) -> NodeInfo {
        NodeInfo {
            running: self.running_count() as u32,
            draining: self.is_stopping(),
            ..self.node.clone()
        }
    }

    /// This node's name in the store.
    pub fn node_id(&self) -> &str {
        &self.node.node_id
    }

    /// How long a run is held without renewal.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// One fewer run waits (claimed or cancelled here).
    pub(crate) fn queue_left(&self, n: u64) {
        let _ = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                Some(q.saturating_sub(n))
            });
    }

    /// The per-job limits of these projects.
    pub(crate) fn limits(projects: &LoadOutcome) -> ConcurrencyLimits {
        if !projects
            .projects
            .iter()
            .any(|p| p.jobs.values().any(|j| j.max_concurrent_runs.is_some()))
        {
            return ConcurrencyLimits::default();
        }
        let mut limits = ConcurrencyLimits::default();
        for p in &projects.projects {
            for job in p.jobs.values() {
                if let Some(n) = job.max_concurrent_runs {
                    limits
                        .0
                        .insert((p.instance.clone(), p.id.0.clone(), job.id.0.clone()), n);
                }
            }
        }
        limits
    }

    /// Renews a run's lease every third of it until the engine returns; a
    /// lost lease stops the run, a cancel asked through another node cancels
    /// it. A node that cannot reach the store stops the run itself before its
    /// lease can have run out (four fifths of a lease after the last renewal
    /// it sent that succeeded): past that, another node may have taken it over.
    /// A renewal that failed or went unanswered is tried again after a
    /// twelfth of the lease, not a third: one slow answer from a busy store
    /// must not cost the run.
    pub(crate) async fn keep_lease(self: Arc<Self>, key: RunKey, held: Held) {
        let every = self.lease / 3;
        let again = self.lease / 12;
        let sure_for = self.lease.mul_f64(0.8);
        // Alone on the store, no one else could take the run over: no deadline.
        let shared = self.store.is_shared();
        if shared {
            held.confirmed(tokio::time::Instant::now(), sure_for);
        }
        let mut failures = 0u32;
        loop {
            let pause = if failures == 0 { every } else { again };
            tokio::select! {
                _ = held.done.notified() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            let sent = tokio::time::Instant::now();
            let renewed =
                tokio::time::timeout(every, self.store.renew(&key, held.epoch, self.lease));
            let answer = match renewed.await {
                Ok(Ok(state)) => Ok(state),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {every:?}")),
            };
            let state = match answer {
                Ok(state) => state,
                Err(why) => {
                    // The first failure of a streak is said; the retries
                    // that follow it only at debug level.
                    if failures == 0 {
                        tracing::warn!(run = %key, "renewing the run's lease: {why}; trying again every {again:?}");
                    } else {
                        tracing::debug!(run = %key, "renewing the run's lease: {why}");
                    }
                    failures += 1;
                    continue;
                }
            };
            if std::mem::take(&mut failures) > 0 {
                tracing::info!(run = %key, "the run's lease is renewed again");
            }
            if state == LeaseState::Lost || held.is_lost() {
                // Lost, or confirmed too late: a takeover may have happened.
                tracing::error!(run = %key, "lease lost: another node took the run over (or may have); stopping it");
                held.lose();
                return;
            }
            if shared {
                held.confirmed(sent, sure_for);
            }
            if state == LeaseState::CancelRequested {
                held.cancel.cancel();
            }
        }
    }

    /// The node's own beat: tells the store it is alive, takes over runs whose
    /// node went silent, and refreshes the queue depth, every third of a lease.
    pub(crate) async fn node_loop(self: Arc<Self>) {
        let every = self.lease / 3;
        let mut forgot_at: Option<tokio::time::Instant> = None;
        while !self.is_stopping() {
            if let Err(e) = self.store.heartbeat(&self.node_now()).await {
                tracing::warn!("heartbeat: {e}");
            }
            if forgot_at.is_none_or(|t| t.elapsed() >= FORGET_NODES_EVERY) {
                forgot_at = Some(tokio::time::Instant::now());
                match self.store.forget_nodes(FORGET_NODES_AFTER).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("forgot {n} node(s) silent for a week"),
                    Err(e) => tracing::warn!("forgetting long-silent nodes: {e}"),
                }
            }
            if let Err(e) = self.take_over().await {
                tracing::warn!("taking over runs of lost nodes: {e}");
            }
            if self.store.is_shared()
                && let Ok(n) = self.store.queued_count().await
            {
                self.queued.store(n, Ordering::SeqCst);
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.stop.notified() => {}
            }
        }
    }

    /// Ends (or queues again, once, where the job allows) every run whose
    /// lease ran out.
    async fn take_over(&self) -> Result<(), StoreError> {
        loop {
            let found = self
                .store
                .take_over_expired(&self.node.node_id, self.lease, TAKEOVER_BATCH)
                .await?;
            let n = found.len();
            for rec in found {
                let lost = rec.node_id.clone().unwrap_or_else(|| "?".into());
                let may_rerun = rec.requeues == 0
                    && self.reruns_on_node_loss(&rec.key, &rec.project_id, &rec.job_id);
                if may_rerun && self.store.requeue(&rec.key, rec.lease_epoch, true).await? {
                    tracing::warn!(run = %rec.key, node = %lost, "node lost: run queued again (rerun_on_node_loss)");
                    self.work.notify_waiters();
                    continue;
                }
                let why = format!("interrupted: node {lost} stopped renewing its lease");
                self.end_interrupted(&rec, &why).await?;
            }
            if n < TAKEOVER_BATCH {
                return Ok(());
            }
        }
    }

    /// Whether the run's first job says it may run again after its node was lost.
    fn reruns_on_node_loss(&self, key: &RunKey, project: &str, job: &str) -> bool {
        let projects = self.projects();
        projects
            .project_in(&key.instance, project)
            .and_then(|p| p.jobs.get(&JobId(job.to_owned())))
            .is_some_and(|j| j.rerun_on_node_loss)
    }

    /// Acts on what other nodes did: wakes the workers for queued runs,
    /// waiters for ended ones, and cancels runs held here.
    pub(crate) async fn news_loop(self: Arc<Self>, mut news: broadcast::Receiver<StoreNews>) {
        loop {
            let item = tokio::select! {
                n = news.recv() => n,
                _ = self.stop.notified() => return,
            };
            match item {
                Ok(StoreNews::Queued) | Ok(StoreNews::Reconnected) => self.work.notify_waiters(),
                Ok(StoreNews::Ended(key)) => {
                    let _ = self.ended.send(key);
                }
                Ok(StoreNews::Cancel(key)) => {
                    if let Some(held) = self.running.lock().expect("running lock").get(&key) {
                        tracing::info!(run = %key, "cancel asked through another node");
                        held.cancel.cancel();
                    }
                }
                // Fell behind: something may have been missed; look again.
                Err(broadcast::error::RecvError::Lagged(_)) => self.work.notify_waiters(),
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Retries a store write while the store is unreachable (a PostgreSQL
    /// restart, a lost connection), for up to ten minutes.
    pub(crate) async fn retry_store<T, F, Fut>(&self, mut write: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(600);
        let mut pause = Duration::from_millis(100);
        loop {
            match write().await {
                Err(e) if e.is_unreachable() && tokio::time::Instant::now() < give_up => {
                    tracing::warn!("store unreachable, retrying in {pause:?}: {e}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }
}
