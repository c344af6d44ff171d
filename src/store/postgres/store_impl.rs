//! [`Store`] for [`PostgresStore`]: each method is one of the modules' own.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, FixedOffset};

use super::PostgresStore;
use crate::run::RunStatus;
use crate::store::{
    ApiKeyRecord, ConcurrencyLimits, EndIf, LeaseState, NewRun, NodeInfo, NodeRecord, Purged,
    RunEnd, RunKey, RunRecord, Store, StoreError, StoreNews, Submitted, UserRecord, WebhookAttempt,
    WebhookDue, WebhookNext,
};

#[async_trait]
impl Store for PostgresStore {
    fn is_shared(&self) -> bool {
        true
    }

    async fn submit(&self, run: NewRun) -> Result<Submitted, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submits
            .send((run, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
    async fn claim_next(
        &self,
        node: &str,
        lease: Duration,
        limits: &ConcurrencyLimits,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.claim_next_pg(node, lease, limits).await
    }
    async fn save_progress(
        &self,
        key: &RunKey,
        epoch: i64,
        results_json: &str,
    ) -> Result<bool, StoreError> {
        self.save_progress_pg(key, epoch, results_json).await
    }
    async fn finish(&self, key: &RunKey, when: EndIf, end: RunEnd) -> Result<bool, StoreError> {
        self.finish_pg(key, when, end).await
    }
    async fn renew(
        &self,
        key: &RunKey,
        epoch: i64,
        lease: Duration,
    ) -> Result<LeaseState, StoreError> {
        self.renew_pg(key, epoch, lease).await
    }
    async fn request_cancel(&self, key: &RunKey) -> Result<bool, StoreError> {
        self.request_cancel_pg(key).await
    }
    async fn take_over_expired(
        &self,
        node: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StoreError> {
        self.take_over_expired_pg(node, lease, limit).await
    }
    async fn orphans(&self, node: &str) -> Result<Vec<RunRecord>, StoreError> {
        self.orphans_pg(node).await
    }
    async fn requeue(&self, key: &RunKey, epoch: i64, lost: bool) -> Result<bool, StoreError> {
        self.requeue_pg(key, epoch, lost).await
    }
    async fn retry_later(
        &self,
        key: &RunKey,
        epoch: i64,
        retry: crate::store::retry::RetryLater,
    ) -> Result<bool, StoreError> {
        self.retry_later_pg(key, epoch, retry).await
    }
    async fn retry_state(
        &self,
        key: &RunKey,
    ) -> Result<crate::store::retry::RetryState, StoreError> {
        self.retry_state_pg(key).await
    }
    async fn heartbeat(&self, node: &NodeInfo) -> Result<(), StoreError> {
        self.heartbeat_pg(node).await
    }
    async fn node_stopped(&self, node_id: &str) -> Result<(), StoreError> {
        self.node_stopped_pg(node_id).await
    }
    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.nodes_pg().await
    }
    async fn forget_nodes(&self, silent_for: std::time::Duration) -> Result<u64, StoreError> {
        self.forget_nodes_pg(silent_for).await
    }
    fn news(&self) -> Option<tokio::sync::broadcast::Receiver<StoreNews>> {
        Some(self.news.subscribe())
    }
    fn kept_state(
        &self,
        fence: Option<(RunKey, i64)>,
    ) -> Option<Arc<dyn crate::engine::KeptState>> {
        Some(self.kept_state_pg(fence))
    }
    async fn run(&self, key: &RunKey) -> Result<Option<RunRecord>, StoreError> {
        self.run_pg(key).await
    }
    async fn runs_in(&self, status: RunStatus) -> Result<Vec<RunRecord>, StoreError> {
        self.runs_in_pg(status).await
    }
    async fn queued_count(&self) -> Result<u64, StoreError> {
        self.queued_count_pg().await
    }
    async fn purge_ended(
        &self,
        cutoff: DateTime<FixedOffset>,
        limit: usize,
    ) -> Result<Purged, StoreError> {
        self.purge_ended_pg(cutoff, limit).await
    }
    async fn due_webhooks(
        &self,
        now: DateTime<FixedOffset>,
        limit: usize,
    ) -> Result<Vec<WebhookDue>, StoreError> {
        self.due_webhooks_pg(now, limit).await
    }
    async fn record_attempt(
        &self,
        key: &RunKey,
        attempt: WebhookAttempt,
        next: WebhookNext,
    ) -> Result<(), StoreError> {
        self.record_attempt_pg(key, attempt, next).await
    }
    async fn attempts(&self, key: &RunKey) -> Result<Vec<WebhookAttempt>, StoreError> {
        self.attempts_pg(key).await
    }
    async fn put_user(&self, user: UserRecord) -> Result<(), StoreError> {
        self.put_user_pg(user).await
    }
    async fn set_password(&self, name: &str, password_hash: &str) -> Result<bool, StoreError> {
        self.set_password_pg(name, password_hash).await
    }
    async fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.user_pg(name).await
    }
    async fn has_users(&self) -> Result<bool, StoreError> {
        self.has_users_pg().await
    }
    async fn put_api_key(&self, key_hash: &str, user: &str, label: &str) -> Result<(), StoreError> {
        self.put_api_key_pg(key_hash, user, label).await
    }
    async fn api_key_user(&self, key_hash: &str) -> Result<Option<String>, StoreError> {
        self.api_key_user_pg(key_hash).await
    }
    async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.api_keys_pg().await
    }
    async fn remove_api_key(&self, key_hash: &str) -> Result<bool, StoreError> {
        self.remove_api_key_pg(key_hash).await
    }
    async fn remove_user(&self, name: &str) -> Result<bool, StoreError> {
        self.remove_user_pg(name).await
    }
    async fn put_token(
        &self,
        token_hash: &str,
        user: &str,
        expires: DateTime<FixedOffset>,
        keep: usize,
    ) -> Result<(), StoreError> {
        self.put_token_pg(token_hash, user, expires, keep).await
    }
    async fn token_user(
        &self,
        token_hash: &str,
        now: DateTime<FixedOffset>,
    ) -> Result<Option<(String, DateTime<FixedOffset>)>, StoreError> {
        self.token_user_pg(token_hash, now).await
    }
}
