//! Accepts, group-committed: every submission waiting when the committer
//! comes round goes into one transaction (one insert of them all), and each
//! caller is answered after the commit that made its run durable.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{NEWS_CHANNEL, pool_error};
use crate::store::{NewRun, StoreError, Submitted};

/// A submission and where its answer goes.
pub(super) type SubmitOp = (NewRun, oneshot::Sender<Result<Submitted, StoreError>>);

/// Submissions one transaction may hold.
const GROUP_MAX: usize = 1000;

/// Starts the committer; it ends when the store (the last sender) is dropped.
/// `groups` counts the transactions that held submissions.
pub(super) fn start(pool: Pool, groups: Arc<AtomicU64>) -> mpsc::Sender<SubmitOp> {
    let (tx, mut rx) = mpsc::channel::<SubmitOp>(4 * GROUP_MAX);
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(GROUP_MAX);
        while rx.recv_many(&mut batch, GROUP_MAX).await > 0 {
            let ops = std::mem::take(&mut batch);
            groups.fetch_add(1, Ordering::Relaxed);
            let runs: Vec<&NewRun> = ops.iter().map(|(r, _)| r).collect();
            match commit_group(&pool, &runs).await {
                Ok(answers) => {
                    for ((_, reply), a) in ops.into_iter().zip(answers) {
                        let _ = reply.send(Ok(a));
                    }
                }
                // No database to be had: every submission hears so at once
                // (not one pool timeout after another).
                Err(e) if e.is_unreachable() => {
                    let why = e.to_string();
                    for (_, reply) in ops {
                        let _ = reply.send(Err(StoreError::Unreachable(why.clone())));
                    }
                }
                // The group failed as a whole: each submission runs on its
                // own and answers with its own outcome.
                Err(_) if ops.len() > 1 => {
                    for (run, reply) in ops {
                        let _ =
                            reply.send(commit_group(&pool, &[&run]).await.map(|mut a| a.remove(0)));
                    }
                }
                Err(e) => {
                    if let Some((_, reply)) = ops.into_iter().next() {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    });
    tx
}

/// The job argument the run list shows (its first 500 characters) and searches.
pub(super) fn argument_of(request_json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(request_json)
        .ok()
        .and_then(|v| match v.get("argument") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Null) | None => None,
            Some(other) => Some(other.to_string()),
        })
        .unwrap_or_default()
}

/// Inserts the runs in one transaction (with a `queued` notification if any
/// was new) and tells each what became of it, in order.
/// Wakes the other nodes' claimers when the transaction commits.
async fn notify_queued(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute(
        &tx.prepare_cached("SELECT pg_notify($1, 'queued')").await?,
        &[&NEWS_CHANNEL],
    )
    .await?;
    Ok(())
}

async fn commit_group(pool: &Pool, runs: &[&NewRun]) -> Result<Vec<Submitted>, StoreError> {
    let mut conn = pool.get().await.map_err(pool_error)?;
    let tx = conn.transaction().await?;
    let instances: Vec<&str> = runs.iter().map(|r| r.key.instance.as_str()).collect();
    let ids: Vec<Uuid> = runs.iter().map(|r| r.key.run_id).collect();
    let projects: Vec<&str> = runs.iter().map(|r| r.project_id.as_str()).collect();
    let jobs: Vec<&str> = runs.iter().map(|r| r.job_id.as_str()).collect();
    let requests: Vec<&str> = runs.iter().map(|r| r.request_json.as_str()).collect();
    let arguments: Vec<String> = runs.iter().map(|r| argument_of(&r.request_json)).collect();
    let fingerprints: Vec<&str> = runs.iter().map(|r| r.fingerprint.as_str()).collect();
    let webhooks: Vec<Option<&str>> = runs.iter().map(|r| r.webhook_url.as_deref()).collect();
    let accepted: Vec<chrono::DateTime<chrono::FixedOffset>> =
        runs.iter().map(|r| r.accepted_at).collect();
    let accepted_ms: Vec<i64> = runs
        .iter()
        .map(|r| r.accepted_at.timestamp_millis())
        .collect();
    let inserted = tx
        .query(
            &tx.prepare_cached("INSERT INTO runs (instance, run_id, project_id, job_id, request, argument, fingerprint,
               webhook_url, status, accepted_at, accepted_ms)
             SELECT i, id, p, j, rq, a, f, w, 'Queued', at, ms
             FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::text[], $9::timestamptz[], $10::int8[])
                  AS u(i, id, p, j, rq, a, f, w, at, ms)
             ON CONFLICT (instance, run_id) DO NOTHING
             RETURNING instance, run_id").await?,
            &[
                &instances, &ids, &projects, &jobs, &requests, &arguments, &fingerprints,
                &webhooks, &accepted, &accepted_ms,
            ],
        )
        .await?;
    if inserted.len() == runs.len() {
        // Every run was new (so their keys were distinct): nothing to compare.
        notify_queued(&tx).await?;
        tx.commit().await?;
        return Ok(vec![Submitted::Accepted; runs.len()]);
    }
    let mut new: HashMap<(String, Uuid), bool> = inserted
        .iter()
        .map(|r| ((r.get::<_, String>(0), r.get::<_, Uuid>(1)), true))
        .collect();
    // The stored fingerprint of every key, to tell a repeat from a conflict.
    let stored: HashMap<(String, Uuid), String> = tx
        .query(
            &tx.prepare_cached("SELECT r.instance, r.run_id, r.fingerprint FROM runs r
             JOIN unnest($1::text[], $2::uuid[]) AS u(i, id) ON r.instance = u.i AND r.run_id = u.id").await?,
            &[&instances, &ids],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    if !inserted.is_empty() {
        notify_queued(&tx).await?;
    }
    tx.commit().await?;
    Ok(runs
        .iter()
        .map(|r| {
            let key = (r.key.instance.clone(), r.key.run_id);
            let fp = stored.get(&key);
            // The first submission of a key inserted in this group is the one accepted.
            match new.get_mut(&key) {
                Some(first) if *first && fp == Some(&r.fingerprint) => {
                    *first = false;
                    Submitted::Accepted
                }
                _ if fp == Some(&r.fingerprint) => Submitted::Duplicate,
                _ => Submitted::Conflict,
            }
        })
        .collect())
}
