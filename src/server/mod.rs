//! The job server: durable run queue, run workers, recovery after a crash,
//! completion webhooks, and `serve` itself.

pub mod config;
mod graph;
pub mod history;
mod lease;
pub mod reload;
pub mod retry;
pub mod scheduler;
pub mod webhook;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::Local;
use tokio::sync::{Notify, broadcast};

use crate::engine::{self, JobReport, LogLevel, RunObserver, RunRequest};
use crate::project::{JobId, LoadOptions, LoadOutcome, RunGraph, load_projects};
use crate::run::{Counters, JobResult, RunId, RunResult, RunStatus, Submission};
use crate::store::{
    EndIf, LeaseState, NewRun, NodeInfo, RunEnd, RunKey, RunRecord, Store, StoreError, Submitted,
};
pub use config::{ServerConfig, StoreLocation, WebhookConfig};

/// Why a run could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full.
    #[error("the run queue is full ({0} runs waiting); try again shortly")]
    QueueFull(u64),
    /// The same run ID was used with other parameters.
    #[error("runID {0} was already used with other parameters")]
    Conflict(uuid::Uuid),
    /// The server is stopping.
    #[error("the server is shutting down; try again shortly")]
    ShuttingDown,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The server's state, shared by the API, the workers and the webhook sender.
pub struct Service {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Settings.
    pub config: ServerConfig,
    /// No users: every caller is the owner of every instance.
    pub open: bool,
    projects: RwLock<Arc<LoadOutcome>>,
    queued: AtomicU64,
    work: Notify,
    /// Wakes the webhook sender.
    pub webhooks_due: Notify,
    running: Mutex<HashMap<RunKey, lease::Held>>,
    ended: broadcast::Sender<RunKey>,
    /// Who this node is, as it tells the store.
    node: NodeInfo,
    /// How long a run is held without renewal.
    lease: Duration,
    /// Wakes whoever waits for this node's runs to end (a drain).
    run_left: Notify,
    stopping: AtomicBool,
    stop: Notify,
}

impl Service {
    /// Builds the service over `store`, loading the projects and recovering
    /// runs a crash left behind. Workers and the webhook sender start with [`Service::start`].
    pub async fn new(config: ServerConfig, store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let open = !store.has_users().await?;
        let node = NodeInfo {
            node_id: config.node_name(),
            address: config.listen.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: Local::now().fixed_offset(),
            running: 0,
            workers: config.workers as u32,
            draining: false,
        };
        let lease = Duration::from_secs(config.lease_secs.max(3));
        let projects = Arc::new(load_projects(
            &config.projects,
            &LoadOptions {
                data_dir: std::path::absolute(&config.data_dir).unwrap_or(config.data_dir.clone()),
            },
        ));
        for p in &projects.problems {
            tracing::warn!("project not loaded: {p}");
        }
        let (ended, _) = broadcast::channel(1024);
        let svc = Arc::new(Service {
            store,
            config,
            open,
            projects: RwLock::new(projects),
            queued: AtomicU64::new(0),
            work: Notify::new(),
            webhooks_due: Notify::new(),
            running: Mutex::new(HashMap::new()),
            ended,
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            node,
            lease,
            run_left: Notify::new(),
        });
        svc.store.heartbeat(&svc.node_now()).await?;
        svc.recover().await?;
        svc.queued
            .store(svc.store.queued_count().await?, Ordering::SeqCst);
        Ok(svc)
    }

    /// Starts the run workers and the webhook sender.
    pub fn start(self: &Arc<Self>) {
        // workers = 0 makes an accept-only node: runs wait for another node (or a restart).
        for _ in 0..self.config.workers {
            tokio::spawn(self.clone().worker());
        }
        tokio::spawn(webhook::deliver_loop(self.clone()));
        tokio::spawn(self.clone().node_loop());
        tokio::spawn(scheduler::schedule_loop(self.clone()));
        if let Some(news) = self.store.news() {
            tokio::spawn(self.clone().news_loop(news));
        }
        if let Some(keep) = retention(self.config.retention_days) {
            tokio::spawn(self.clone().retention_loop(keep));
        }
    }

    /// Deletes ended runs older than `keep`, a small batch at a time so that
    /// accepts never wait long behind it, until the server stops.
    async fn retention_loop(self: Arc<Self>, keep: chrono::Duration) {
        // A sweep a minute; more often for a retention of minutes.
        let pause = (keep.to_std().unwrap_or(Duration::MAX) / 4)
            .clamp(Duration::from_millis(250), Duration::from_secs(60));
        while !self.is_stopping() {
            // A retention longer than the calendar keeps everything.
            let Some(cutoff) = Local::now().fixed_offset().checked_sub_signed(keep) else {
                return;
            };
            let more = match self.store.purge_ended(cutoff, PURGE_BATCH).await {
                Ok(step) => {
                    metrics::counter!("tidepool_runs_purged_total").increment(step.deleted);
                    step.more
                }
                Err(e) => {
                    tracing::warn!("retention: deleting old runs: {e}");
                    false
                }
            };
            let wait = if more {
                Duration::from_millis(20)
            } else {
                pause
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.stop.notified() => {}
            }
        }
    }

    /// The loaded projects.
    pub fn projects(&self) -> Arc<LoadOutcome> {
        self.projects.read().expect("projects lock").clone()
    }

    /// Hears of every run that ends on this node (the key), as it ends.
    pub fn subscribe_ended(&self) -> broadcast::Receiver<RunKey> {
        self.ended.subscribe()
    }

    /// Runs waiting to execute.
    pub fn queue_depth(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Runs executing on this node now.
    pub fn running_count(&self) -> usize {
        self.running.lock().expect("running lock").len()
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// A run that was Running when the server stopped ends with what its
    /// recorded job results say, in one transaction with them and its webhook:
    /// a job left Running (or a chain cut between two jobs) makes it Failed
    /// ("interrupted"); a run whose every job had ended (a store written by an
    /// older version) ends with their outcome. It is never lost and never run twice.
    async fn recover(&self) -> Result<(), StoreError> {
        for rec in self.store.orphans(&self.node.node_id).await? {
            self.end_interrupted(
                &rec,
                "interrupted: the server stopped while the run was going; it was not resumed",
            )
            .await?;
        }
        Ok(())
    }

    /// Ends a run nobody is running any more (held under the epoch in `rec`)
    /// with what its recorded job results say, in one transaction with its
    /// webhook: a job left Running (or a chain cut between two jobs) makes it
    /// Failed with `why`; a run whose every job had ended ends with their outcome.
    pub(crate) async fn end_interrupted(
        &self,
        rec: &RunRecord,
        why: &str,
    ) -> Result<bool, StoreError> {
        let mut results: Vec<JobResult> = rec
            .results_json
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        let run_id = rec.key.run_id.to_string();
        let zero = Counters::default();
        let mut interrupted = false;
        for r in results
            .iter_mut()
            .filter(|r| r.status == RunStatus::Running)
        {
            r.status = RunStatus::Failed;
            interrupted = true;
        }
        let due = match results.is_empty() {
            true => Vec::new(),
            false => self.chain_pending(rec, &results),
        };
        for next in due {
            // The graph stopped between jobs: one that was due never ran.
            let now = Local::now().fixed_offset();
            results.push(JobResult::new(
                &run_id,
                &next.0,
                &now,
                Duration::ZERO,
                RunStatus::Failed,
                &zero,
            ));
            interrupted = true;
        }
        if results.is_empty() {
            results.push(JobResult::new(
                &run_id,
                &rec.job_id,
                &rec.accepted_at,
                Duration::ZERO,
                RunStatus::Failed,
                &zero,
            ));
            interrupted = true;
        }
        let held = EndIf::Leased(rec.lease_epoch);
        if interrupted {
            let ended = self
                .end_without_running(rec, held, RunStatus::Failed, results, why)
                .await?;
            tracing::warn!(run = %rec.key, "run marked Failed: {why}");
            return Ok(ended);
        }
        let status = if results.iter().all(|r| r.status == RunStatus::Complete) {
            RunStatus::Complete
        } else if results.iter().any(|r| r.status == RunStatus::Cancelled) {
            RunStatus::Cancelled
        } else {
            RunStatus::Failed
        };
        let error = (status != RunStatus::Complete)
            .then(|| "the run's last job had ended when the server stopped".to_owned());
        let ended = self.record_end(rec, held, status, results, error).await?;
        tracing::warn!(run = %rec.key, %status, "run ended by recovery: every job had ended");
        Ok(ended)
    }

    /// The jobs of a run's graph that have no result though every job they
    /// wait for completed: due to start when the run was cut.
    fn chain_pending(&self, rec: &RunRecord, results: &[JobResult]) -> Vec<JobId> {
        let Ok(req) = serde_json::from_str::<Submission>(&rec.request_json) else {
            return Vec::new();
        };
        let projects = self.projects();
        projects
            .project_in(&rec.key.instance, &rec.project_id)
            .and_then(|p| RunGraph::of(p, &rec.job_id, req.chain_jobs))
            .map(|g| graph::pending(&g, results))
            .unwrap_or_default()
    }

    async fn end_without_running(
        &self,
        rec: &RunRecord,
        when: EndIf,
        status: RunStatus,
        results: Vec<JobResult>,
        error: &str,
    ) -> Result<bool, StoreError> {
        self.record_end(rec, when, status, results, Some(error.to_owned()))
            .await
    }

    /// Ends a run in status `from` with these job results (no engine report).
    async fn record_end(
        &self,
        rec: &RunRecord,
        when: EndIf,
        status: RunStatus,
        results: Vec<JobResult>,
        error: Option<String>,
    ) -> Result<bool, StoreError> {
        let run_id = rec.key.run_id.to_string();
        let mut response = RunResult::ended_without_report(
            &run_id,
            status,
            &rec.accepted_at,
            results,
            error.as_deref().unwrap_or_default(),
        );
        response.error = error.clone();
        let ok = self
            .store
            .finish(
                &rec.key,
                when,
                RunEnd {
                    status,
                    results_json: serde_json::to_string(&response.results).unwrap_or_default(),
                    response_json: serde_json::to_string(&response).unwrap_or_default(),
                    webhook_json: serde_json::to_string(&response.for_webhook())
                        .unwrap_or_default(),
                    error,
                },
            )
            .await?;
        if ok {
            metrics::counter!("tidepool_runs_total", "instance" => rec.key.instance.clone(), "status" => status.to_string())
                .increment(1);
            let _ = self.ended.send(rec.key.clone());
            self.webhooks_due.notify_one();
        }
        Ok(ok)
    }

    /// Records a run durably as Queued (the answer `started: true` may follow).
    pub async fn submit(&self, instance: &str, req: &Submission) -> Result<Submitted, SubmitError> {
        if self.is_stopping() {
            return Err(SubmitError::ShuttingDown);
        }
        let key = RunKey {
            instance: instance.to_owned(),
            run_id: req.run_id,
        };
        let depth = self.queued.load(Ordering::Relaxed);
        if depth >= self.config.queue_size {
            // A repeat of an accepted request gets its first answer, full
            // queue or not: a client retrying after a timeout must not be
            // told to retry again.
            return match self.store.run(&key).await? {
                Some(rec) if rec.fingerprint == req.fingerprint() => Ok(Submitted::Duplicate),
                Some(_) => Err(SubmitError::Conflict(req.run_id)),
                None => Err(SubmitError::QueueFull(depth)),
            };
        }
        let outcome = self
            .store
            .submit(NewRun {
                key: key.clone(),
                project_id: req.project_id.clone(),
                job_id: req.job_id.clone(),
                request_json: serde_json::to_string(req).unwrap_or_default(),
                fingerprint: req.fingerprint(),
                webhook_url: req.web_hook_url.clone(),
                accepted_at: Local::now().fixed_offset(),
            })
            .await?;
        match outcome {
            Submitted::Accepted => {
                self.queued.fetch_add(1, Ordering::SeqCst);
                metrics::gauge!("tidepool_queue_depth").set(self.queue_depth() as f64);
                self.work.notify_one();
                tracing::info!(run = %key, project = %req.project_id, job = %req.job_id, "run accepted");
                Ok(Submitted::Accepted)
            }
            Submitted::Duplicate => Ok(Submitted::Duplicate),
            Submitted::Conflict => Err(SubmitError::Conflict(req.run_id)),
        }
    }

    /// Waits until the run has ended and returns it.
    pub async fn wait_for_end(&self, key: &RunKey) -> Result<Option<RunRecord>, StoreError> {
        let mut rx = self.ended.subscribe();
        loop {
            match self.store.run(key).await? {
                None => return Ok(None),
                Some(r) if !matches!(r.status, RunStatus::Queued | RunStatus::Running) => {
                    return Ok(Some(r));
                }
                Some(_) => {}
            }
            tokio::select! {
                _ = rx.recv() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Asks a run to stop: a Queued run ends at once as Cancelled; a Running one
    /// stops between batches. Returns the run's status after the request.
    pub async fn cancel(&self, key: &RunKey) -> Result<Option<RunStatus>, StoreError> {
        let Some(rec) = self.store.run(key).await? else {
            return Ok(None);
        };
        match rec.status {
            RunStatus::Queued => {
                if self
                    .end_without_running(
                        &rec,
                        EndIf::Queued,
                        RunStatus::Cancelled,
                        Vec::new(),
                        "cancelled before it started",
                    )
                    .await?
                {
                    self.queue_left(1);
                    return Ok(Some(RunStatus::Cancelled));
                }
                Ok(self.store.run(key).await?.map(|r| r.status))
            }
            RunStatus::Running => {
                let here = self.running.lock().expect("running lock").get(key).cloned();
                match here {
                    Some(held) => held.cancel.cancel(),
                    // Running on another node: it hears through the store.
                    None => {
                        self.store.request_cancel(key).await?;
                    }
                }
                Ok(Some(RunStatus::Running))
            }
            s => Ok(Some(s)),
        }
    }

    /// Stops taking runs (drains); waits for running ones up to the grace
    /// period. On a shared store, runs still going then are stopped and
    /// handed back to the queue for another node; on the embedded store they
    /// are left to recovery at the next start.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.notify_waiters();
        self.work.notify_waiters();
        if let Err(e) = self.store.heartbeat(&self.node_now()).await {
            tracing::warn!("shutdown: telling the store this node drains: {e}");
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(self.config.shutdown_grace_secs);
        if !self.wait_for_no_runs(deadline).await && self.store.is_shared() {
            let left: Vec<lease::Held> = self
                .running
                .lock()
                .expect("running lock")
                .values()
                .cloned()
                .collect();
            tracing::warn!("shutdown: handing {} run(s) back to the queue", left.len());
            for held in left {
                held.hand_back();
            }
            // Each stops at its next batch and is queued again.
            let hand_back = tokio::time::Instant::now() + Duration::from_secs(10);
            self.wait_for_no_runs(hand_back).await;
        } else if !self.running.lock().expect("running lock").is_empty() {
            tracing::warn!("shutdown: runs still going are left to recovery at the next start");
        }
        if let Err(e) = self.store.node_stopped(&self.node.node_id).await {
            tracing::warn!("shutdown: {e}");
        }
        // Leave an empty write-ahead log behind: the store is all in one file.
        if let Err(e) = self.store.checkpoint().await {
            tracing::warn!("shutdown: {e}");
        }
    }

    /// Waits until no run executes here, or the deadline; whether none does.
    async fn wait_for_no_runs(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            // Registered before the check, so a run that leaves in between wakes it.
            let left = self.run_left.notified();
            if self.running.lock().expect("running lock").is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, left).await.is_err() {
                return self.running.lock().expect("running lock").is_empty();
            }
        }
    }

    async fn worker(self: Arc<Self>) {
        loop {
            if self.is_stopping() {
                return;
            }
            // The projects as they are before the claim: a run seen Running
            // runs the version loaded then, whatever a reload does meanwhile.
            let projects = self.projects();
            let limits = Self::limits(&projects);
            match self
                .store
                .claim_next(&self.node.node_id, self.lease, &limits)
                .await
            {
                Ok(Some(rec)) => {
                    self.queue_left(1);
                    metrics::gauge!("tidepool_queue_depth").set(self.queue_depth() as f64);
                    self.execute(rec, projects).await;
                }
                Ok(None) => {
                    tokio::select! {
                        _ = self.work.notified() => {}
                        _ = self.stop.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(e) => {
                    tracing::error!("claiming a run: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = self.stop.notified() => {}
                    }
                }
            }
        }
    }

    async fn execute(self: &Arc<Self>, rec: RunRecord, projects: Arc<LoadOutcome>) {
        let key = rec.key.clone();
        let held = EndIf::Leased(rec.lease_epoch);
        let req: Submission = match serde_json::from_str(&rec.request_json) {
            Ok(r) => r,
            Err(e) => {
                let why = format!("the stored request cannot be read: {e}");
                let _ = self
                    .end_without_running(&rec, held, RunStatus::Failed, Vec::new(), &why)
                    .await;
                return;
            }
        };
        let Some(project) = projects.project_in(&key.instance, &rec.project_id).cloned() else {
            let why = format!("project {:?} is no longer loaded", rec.project_id);
            let _ = self
                .end_without_running(&rec, held, RunStatus::Failed, Vec::new(), &why)
                .await;
            return;
        };
        let mut run_req = RunRequest {
            run_id: RunId(req.run_id),
            project: project.id.clone(),
            job: JobId(req.job_id.clone()),
            argument: req.argument.clone(),
            begin_at_row: req.begin_at_row,
            end_after_row: req.end_after_row,
            thread_count: req.thread_count,
            logging_level: LogLevel::from_number(req.logging_level as u64),
            chain_jobs: req.chain_jobs,
            preview: false,
            resume_at_row: req.resume_at_row,
        };
        let (attempt, attempts) = self.attempt_of(&rec, &mut run_req).await;
        let lease = lease::Held::new(rec.lease_epoch);
        self.running
            .lock()
            .expect("running lock")
            .insert(key.clone(), lease.clone());
        tokio::spawn(self.clone().keep_lease(key.clone(), lease.clone()));
        tracing::info!(run = %key, node = %self.node.node_id, "run started");
        let run_graph = RunGraph::of(&project, &req.job_id, req.chain_jobs);
        let appender = LogAppender::start(self.store.clone(), key.clone(), lease.epoch);
        let observer = LiveResults {
            handle: tokio::runtime::Handle::current(),
            store: self.store.clone(),
            key: key.clone(),
            lease: lease.clone(),
            run_id: req.run_id.to_string(),
            jobs: Mutex::new(graph::LiveJobs::new(run_graph)),
            log: appender.clone(),
        };
        let kept = self.store.kept_state(Some((key.clone(), rec.lease_epoch)));
        let cancel = lease.cancel.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let r = engine::run_with_state(&project, &run_req, &cancel, &observer, kept);
            (r, run_req.logging_level)
        })
        .await;
        lease.stop_renewing();
        // No live append may land after the end's log is written.
        appender.finish().await;
        let end = match outcome {
            Ok((Ok(report), level)) => {
                if let Some(next) = retry::plan(&projects, &rec, &report, attempt)
                    && self
                        .retry_later(&rec, &lease, &report, next, attempts)
                        .await
                {
                    self.running.lock().expect("running lock").remove(&key);
                    self.run_left.notify_waiters();
                    return;
                }
                self.ended_run(&key, &lease, report, level).await
            }
            Ok((Err(e), _)) => Err(e.to_string()),
            Err(e) => Err(format!("the run crashed: {e}")),
        };
        self.conclude(&rec, &lease, end).await;
        self.running.lock().expect("running lock").remove(&key);
        self.run_left.notify_waiters();
    }

    /// What the engine's report becomes in the store: the log and row errors
    /// saved now (a run seen ended has them), the end to record next.
    async fn ended_run(
        &self,
        key: &RunKey,
        lease: &lease::Held,
        report: engine::RunReport,
        level: LogLevel,
    ) -> Result<RunEnd, String> {
        if lease.is_lost() || lease.is_handed_back() {
            return Err("the run stopped before it ended".into());
        }
        // The log is not written under the epoch: renew first, so no other
        // node can take the run over while it is written (a lease from now).
        let sent = tokio::time::Instant::now();
        match self.store.renew(key, lease.epoch, self.lease).await {
            Ok(LeaseState::Lost) => {
                lease.lose();
                return Err("the run's lease was taken over".into());
            }
            Ok(_) if self.store.is_shared() && !lease.is_lost() => {
                lease.confirmed(sent, self.lease.mul_f64(0.8))
            }
            _ => {}
        }
        if lease.is_lost() {
            return Err("the run's lease could not be confirmed in time".into());
        }
        for (name, v) in counter_pairs(&report.counters) {
            metrics::counter!("tidepool_rows_total", "instance" => key.instance.clone(), "counter" => name)
                .increment(v);
        }
        let details = history::details_of(&report);
        if let Err(e) = self
            .retry_store(|| self.store.save_details(key, details.clone()))
            .await
        {
            tracing::error!(run = %key, "recording the run's log and row errors: {e}");
        }
        let response = history::run_result(&report, level);
        Ok(RunEnd {
            status: report.status,
            results_json: serde_json::to_string(&response.results).unwrap_or_default(),
            response_json: serde_json::to_string(&response).unwrap_or_default(),
            webhook_json: serde_json::to_string(&response.for_webhook()).unwrap_or_default(),
            error: report.error.clone(),
        })
    }

    /// Records how a run this node held ended: nothing if another node took
    /// it over; queued again if this node is draining and handed it back;
    /// else its end, retried while the store is unreachable.
    async fn conclude(&self, rec: &RunRecord, lease: &lease::Held, end: Result<RunEnd, String>) {
        let key = &rec.key;
        if lease.is_lost() {
            tracing::warn!(run = %key, "run stopped: its lease was taken over by another node; nothing more is recorded here");
            return;
        }
        if lease.is_handed_back() {
            match self
                .retry_store(|| self.store.requeue(key, lease.epoch, false))
                .await
            {
                Ok(true) => {
                    tracing::info!(run = %key, "run handed back to the queue (node draining)")
                }
                Ok(false) => {
                    tracing::warn!(run = %key, "run was taken over before it could be handed back")
                }
                Err(e) => tracing::error!(run = %key, "handing the run back: {e}"),
            }
            return;
        }
        let held = EndIf::Leased(lease.epoch);
        let end = match end {
            Ok(end) => end,
            Err(why) => {
                let _ = self
                    .end_without_running(rec, held, RunStatus::Failed, Vec::new(), &why)
                    .await;
                return;
            }
        };
        let status = end.status;
        abort_point("before_finish");
        match self
            .retry_store(|| self.store.finish(key, held, end.clone()))
            .await
        {
            Ok(true) => {
                abort_point("after_finish");
                metrics::counter!("tidepool_runs_total", "instance" => key.instance.clone(), "status" => status.to_string())
                    .increment(1);
                tracing::info!(run = %key, %status, "run ended");
            }
            Ok(false) => {
                tracing::warn!(run = %key, "run's end not recorded: another node holds it now")
            }
            Err(e) => tracing::error!(run = %key, "recording the end of the run: {e}"),
        }
        let _ = self.ended.send(key.clone());
        self.webhooks_due.notify_one();
    }
}

/// Runs deleted per retention transaction.
const PURGE_BATCH: usize = 500;

/// How long ended runs are kept; None: forever (0, or not a usable number).
fn retention(days: f64) -> Option<chrono::Duration> {
    if !(days.is_finite() && days > 0.0) {
        if days != 0.0 {
            tracing::warn!(
                "retention_days = {days} is not a number of days: runs are kept forever"
            );
        }
        return None;
    }
    chrono::Duration::try_milliseconds((days * 86_400_000.0).min(i64::MAX as f64 / 2.0) as i64)
}

/// A test hook (debug builds only): `TIDEPOOL_TEST_ABORT_AT=<point>` aborts
/// the process at that point of a run, as a `kill -9` would there. Points:
/// `job_started`, `after_job_commit`, `after_job_saved`, `before_finish`,
/// `after_finish`.
fn abort_point(point: &str) {
    #[cfg(debug_assertions)]
    {
        static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        if AT
            .get_or_init(|| std::env::var("TIDEPOOL_TEST_ABORT_AT").ok())
            .as_deref()
            == Some(point)
        {
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

fn counter_pairs(c: &Counters) -> [(&'static str, u64); 7] {
    [
        ("totalRows", c.total_rows),
        ("inserts", c.inserts),
        ("updates", c.updates),
        ("deletes", c.deletes),
        ("errors", c.errors),
        ("skips", c.skips),
        ("ignores", c.ignores),
    ]
}

/// Writes live per-job results to the store while a run goes. A job's end is
/// recorded together with the start of the jobs of the graph it makes due;
/// the last job's end only with the run's end (in `finish`): whatever the
/// moment the server dies, the recorded results say whether the run was
/// still going. Several jobs of a graph may run at once.
struct LiveResults {
    handle: tokio::runtime::Handle,
    store: Arc<dyn Store>,
    key: RunKey,
    /// The lease the run is held under: progress is written under its epoch.
    lease: lease::Held,
    run_id: String,
    /// The run's jobs so far (ended, running, due), in start order.
    jobs: Mutex<graph::LiveJobs>,
    /// Takes the log lines as they are made to the store.
    log: Arc<LogAppender>,
}

/// A running run's log lines on their way to the store.
#[derive(Default)]
struct LiveLog {
    /// Entries not yet in the store, in order (made into stored lines when
    /// appended, off the engine's writer threads).
    pending: Vec<engine::LogEntry>,
    /// Lines of each running job taken so far (appended or pending).
    in_job: HashMap<JobId, usize>,
    /// Each job's lines past the bound (its final log would not keep them either).
    dropped: HashMap<JobId, u64>,
    /// The store refused a batch (the run is not held any more): no more appends.
    off: bool,
}

/// Appends a running run's log lines to the store in batches, from a task
/// of its own (woken on each progress tick and job end, else every 250 ms):
/// the engine's threads only hand the entries over.
#[derive(Default)]
struct LogAppender {
    log: Mutex<LiveLog>,
    wake: tokio::sync::Notify,
    stop: AtomicBool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl LogAppender {
    fn start(store: Arc<dyn Store>, key: RunKey, epoch: i64) -> Arc<Self> {
        let app = Arc::new(LogAppender::default());
        let task = tokio::spawn(app.clone().append_loop(store, key, epoch));
        *app.task.lock().expect("appender lock") = Some(task);
        app
    }

    /// Stops appending and waits for an append under way. Lines still
    /// waiting are dropped: the run's end writes its whole log.
    async fn finish(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let task = self.task.lock().expect("appender lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Appends what the engine made since the last batch until stopped. A
    /// batch the store could not take is tried again with the next (the
    /// stored lines stay the start of the final log, in order); one it
    /// refused (the run is not held any more) ends the live log.
    async fn append_loop(self: Arc<Self>, store: Arc<dyn Store>, key: RunKey, epoch: i64) {
        while !self.stop.load(Ordering::SeqCst) {
            let lines = std::mem::take(&mut self.log.lock().expect("live log lock").pending);
            if !lines.is_empty() {
                let stored: Vec<_> = lines.iter().map(history::stored_line).collect();
                let appended = store.append_log(&key, epoch, &stored).await;
                let mut log = self.log.lock().expect("live log lock");
                match appended {
                    Ok(true) => {}
                    Ok(false) => {
                        log.off = true;
                        log.pending.clear();
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(run = %key, "appending the live log: {e}");
                        let newer = std::mem::replace(&mut log.pending, lines);
                        log.pending.extend(newer);
                    }
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }
}

/// Lines a job's live log takes at most: what its final log keeps (the
/// entries and the note saying how many more were dropped).
const LIVE_LOG_PER_JOB: usize = engine::LOG_ENTRIES_KEPT + 1;

impl LiveResults {
    /// Saves every job's result so far (those running as Running).
    fn save(&self) {
        let all = self.jobs.lock().expect("live lock").results(&self.run_id);
        let json = serde_json::to_string(&all).unwrap_or_default();
        // Called on the run's blocking threads: waiting here is fine.
        match self
            .handle
            .block_on(self.store.save_progress(&self.key, self.lease.epoch, &json))
        {
            Ok(true) => {}
            // Another node took the run over: stop at once, write nothing more.
            Ok(false) => self.lease.lose(),
            Err(e) => tracing::warn!(run = %self.key, "saving live results: {e}"),
        }
    }
}

impl RunObserver for LiveResults {
    fn job_started(&self, job: &JobId) {
        self.jobs.lock().expect("live lock").started(job);
        self.save();
        {
            let mut log = self.log.log.lock().expect("live log lock");
            log.in_job.remove(job);
            log.dropped.remove(job);
        }
        abort_point("job_started");
    }

    fn log(&self, job: &JobId, entry: &engine::LogEntry) {
        if entry.level == LogLevel::None {
            return;
        }
        let mut log = self.log.log.lock().expect("live log lock");
        if log.off {
            return;
        }
        let taken = log.in_job.get(job).copied().unwrap_or(0);
        if taken >= LIVE_LOG_PER_JOB {
            *log.dropped.entry(job.clone()).or_default() += 1;
            return;
        }
        log.in_job.insert(job.clone(), taken + 1);
        log.pending.push(entry.clone());
    }

    fn committed(&self, job: &JobId, resume_at_row: u64) {
        self.jobs
            .lock()
            .expect("live lock")
            .committed(job, resume_at_row);
    }

    fn progress(&self, job: &JobId, c: &Counters) {
        self.jobs.lock().expect("live lock").progress(job, c);
        self.save();
        self.log.wake.notify_one();
    }

    fn job_finished(&self, report: &JobReport) {
        // The job's own writes are committed by now; the store does not know yet.
        abort_point("after_job_commit");
        self.log.wake.notify_one();
        let dropped = {
            let mut log = self.log.log.lock().expect("live log lock");
            log.in_job.remove(&report.job_id);
            log.dropped.remove(&report.job_id).unwrap_or(0)
        };
        if dropped > 0 {
            tracing::warn!(run = %self.key, job = %report.job_id, "{dropped} log lines were past the live log's bound");
        }
        let due = self
            .jobs
            .lock()
            .expect("live lock")
            .finished(&self.run_id, report);
        if due {
            self.save();
        }
        abort_point("after_job_saved");
    }
}
