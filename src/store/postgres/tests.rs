//! The PostgreSQL store against a real server (127.0.0.1:5432, user
//! postgres): each test has a fresh database of its own.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset};

use super::*;
use crate::engine::StateError;
use crate::store::history::{RunDetails, RunFilter, StoredLogLine, StoredRowError};
use crate::store::{
    ConcurrencyLimits, EndIf, LeaseState, NewRun, NodeInfo, Purged, Role, RunEnd, RunHistory,
    RunKey, Store, Submitted, UserRecord, WebhookAttempt, WebhookNext,
};

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// A database of a test's own, dropped (best effort) by [`TestDb::drop_db`].
struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    async fn new() -> TestDb {
        let name = format!("tidepool_t_{}", uuid::Uuid::new_v4().simple());
        let admin = session(&format!("{SERVER}/test")).await.unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        TestDb {
            url: format!("{SERVER}/{name}"),
            name,
        }
    }

    async fn store(&self) -> PostgresStore {
        PostgresStore::connect(&self.url, PgStoreOptions::default())
            .await
            .unwrap()
    }

    async fn sql(&self) -> tokio_postgres::Client {
        session(&self.url).await.unwrap()
    }

    async fn drop_db(self) {
        if let Ok(admin) = session(&format!("{SERVER}/test")).await {
            let _ = admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await;
        }
    }
}

fn now() -> DateTime<FixedOffset> {
    chrono::Local::now().fixed_offset()
}

fn new_run(job: &str, webhook: Option<&str>) -> NewRun {
    let key = RunKey {
        instance: "default".into(),
        run_id: uuid::Uuid::new_v4(),
    };
    NewRun {
        fingerprint: key.run_id.to_string(),
        key,
        project_id: "p".into(),
        job_id: job.into(),
        request_json: r#"{"argument":"hello world"}"#.into(),
        webhook_url: webhook.map(str::to_owned),
        accepted_at: now(),
    }
}

async fn queued(store: &PostgresStore, job: &str, webhook: Option<&str>) -> RunKey {
    let run = new_run(job, webhook);
    let key = run.key.clone();
    assert_eq!(store.submit(run).await.unwrap(), Submitted::Accepted);
    key
}

fn end(status: RunStatus) -> RunEnd {
    let results = r#"[{"jobID":"j","status":"Complete"}]"#.to_owned();
    RunEnd {
        status,
        response_json: format!(r#"{{"status":"{status}","results":{results},"log":[]}}"#),
        results_json: results,
        webhook_json: r#"{"hook":true}"#.into(),
        error: None,
    }
}

const LEASE: Duration = Duration::from_secs(30);

/// Claims the next run on node `n`.
async fn claim(store: &PostgresStore, n: &str) -> Option<crate::store::RunRecord> {
    store
        .claim_next(n, LEASE, &ConcurrencyLimits::default())
        .await
        .unwrap()
}

/// A run submitted, claimed and ended Complete.
async fn ended(store: &PostgresStore, webhook: Option<&str>) -> RunKey {
    let key = queued(store, "j", webhook).await;
    let rec = claim(store, "n").await.unwrap();
    assert_eq!(rec.key, key);
    let done = end(RunStatus::Complete);
    assert!(
        store
            .finish(&key, EndIf::Leased(rec.lease_epoch), done)
            .await
            .unwrap()
    );
    key
}

async fn versions(db: &TestDb) -> Vec<i32> {
    db.sql()
        .await
        .query("SELECT version FROM tidepool_schema ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_run_from_empty_and_from_version_1_and_refuse_a_newer_schema() {
    let db = TestDb::new().await;
    assert_eq!(PostgresStore::migrate_to(&db.url, 1).await.unwrap(), 1);
    assert_eq!(versions(&db).await, vec![1]);
    let has_nodes = "SELECT to_regclass('nodes') IS NOT NULL";
    let found: bool = db
        .sql()
        .await
        .query_one(has_nodes, &[])
        .await
        .unwrap()
        .get(0);
    assert!(!found, "version 1 has no nodes table");
    let store = db.store().await;
    assert_eq!(
        versions(&db).await,
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
    assert!(store.nodes().await.unwrap().is_empty());
    drop(store);
    // Again: nothing to do.
    assert_eq!(
        PostgresStore::migrate_to(&db.url, SCHEMA_VERSION)
            .await
            .unwrap(),
        SCHEMA_VERSION
    );
    db.sql()
        .await
        .execute("INSERT INTO tidepool_schema (version) VALUES (99)", &[])
        .await
        .unwrap();
    let Err(e) = PostgresStore::connect(&db.url, PgStoreOptions::default()).await else {
        panic!("a newer schema was accepted");
    };
    assert!(matches!(e, StoreError::Schema(_)), "{e:?}");
    assert!(
        e.to_string().contains(&format!(
            "version 99; this tidepool knows up to {SCHEMA_VERSION}"
        )),
        "{e}"
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_starting_at_once_on_an_empty_database_migrate_once() {
    let db = TestDb::new().await;
    let (a, b) = tokio::join!(
        PostgresStore::connect(&db.url, PgStoreOptions::default()),
        PostgresStore::connect(&db.url, PgStoreOptions::default())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        versions(&db).await,
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
    let k = queued(&a, "j", None).await;
    assert!(b.run(&k).await.unwrap().is_some());
    drop((a, b));
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_server_is_unreachable() {
    let e = PostgresStore::connect(
        "postgres://postgres@127.0.0.1:1/x",
        PgStoreOptions::default(),
    )
    .await
    .err()
    .unwrap();
    assert!(e.is_unreachable(), "{e:?}");
    assert!(matches!(e, StoreError::Unreachable(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_accepts_repeats_and_conflicts_and_groups_concurrent_submits() {
    let db = TestDb::new().await;
    let store = Arc::new(db.store().await);
    let run = new_run("j", None);
    assert_eq!(
        store.submit(run.clone()).await.unwrap(),
        Submitted::Accepted
    );
    assert_eq!(
        store.submit(run.clone()).await.unwrap(),
        Submitted::Duplicate
    );
    let mut other = run.clone();
    other.fingerprint = "something else".into();
    assert_eq!(store.submit(other).await.unwrap(), Submitted::Conflict);

    // The same new run twice at once: one is accepted, the other a repeat.
    let twice = new_run("j", None);
    let (x, y) = tokio::join!(store.submit(twice.clone()), store.submit(twice.clone()));
    let mut got = vec![x.unwrap(), y.unwrap()];
    got.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(got, vec![Submitted::Accepted, Submitted::Duplicate]);

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.submit(new_run("j", None)).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Submitted::Accepted);
    }
    assert_eq!(store.queued_count().await.unwrap(), 202);
    // 204 accepts, fewer transactions: concurrent ones were grouped.
    assert!(store.accept_groups() < 204, "{}", store.accept_groups());
    let rec = store.run(&run.key).await.unwrap().unwrap();
    assert_eq!(rec.status, RunStatus::Queued);
    assert_eq!(rec.lease_epoch, 0);
    assert_eq!(rec.request_json, run.request_json);
    drop(store);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_submission_fails_alone_in_its_group() {
    let db = TestDb::new().await;
    let store = Arc::new(db.store().await);
    let mut bad = new_run("j", None);
    // PostgreSQL text holds no NUL.
    bad.request_json = "{\"argument\":\"a\u{0}b\"}".into();
    let mut tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.submit(new_run("j", None)).await })
        })
        .collect();
    let s = store.clone();
    tasks.insert(10, tokio::spawn(async move { s.submit(bad).await }));
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let e = outcomes.remove(10).unwrap_err();
    assert!(!e.is_unreachable(), "{e:?}");
    assert!(e.sql_state().is_some(), "{e:?}");
    assert!(
        outcomes
            .into_iter()
            .all(|o| o.unwrap() == Submitted::Accepted)
    );
    assert_eq!(store.queued_count().await.unwrap(), 20);
    drop(store);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_stores_claiming_at_once_never_take_a_run_twice() {
    let db = TestDb::new().await;
    let a = Arc::new(db.store().await);
    let b = Arc::new(db.store().await);
    let mut keys = HashSet::new();
    for _ in 0..200 {
        keys.insert(queued(&a, "j", None).await);
    }
    let mut tasks = Vec::new();
    for (i, s) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(rec) = claim(&s, &format!("n{i}")).await {
                assert_eq!(rec.lease_epoch, 1);
                got.push(rec.key);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 200);
    assert_eq!(all.into_iter().collect::<HashSet<_>>(), keys);
    assert_eq!(a.runs_in(RunStatus::Running).await.unwrap().len(), 200);
    drop((a, b));
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_at_its_limit_waits_until_its_run_ends() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let mut limits = ConcurrencyLimits::default();
    limits
        .0
        .insert(("default".into(), "p".into(), "limited".into()), 1);
    let first = queued(&store, "limited", None).await;
    let second = queued(&store, "limited", None).await;
    let free = queued(&store, "free", None).await;
    let claim = |n: &'static str| store.claim_next(n, LEASE, &limits);
    let got = claim("a").await.unwrap().unwrap();
    assert_eq!(got.key, first);
    // The second of the job waits; a run of another job goes past it.
    assert_eq!(claim("b").await.unwrap().unwrap().key, free);
    assert!(claim("b").await.unwrap().is_none());
    let done = end(RunStatus::Complete);
    assert!(
        store
            .finish(&first, EndIf::Leased(got.lease_epoch), done)
            .await
            .unwrap()
    );
    assert_eq!(claim("b").await.unwrap().unwrap().key, second);

    // Twenty claimers on two stores at once never run more than the limit.
    limits
        .0
        .insert(("default".into(), "p".into(), "two".into()), 2);
    for _ in 0..20 {
        queued(&store, "two", None).await;
    }
    let other = Arc::new(db.store().await);
    let store = Arc::new(store);
    let limits = Arc::new(limits);
    let start = Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let s = if i % 2 == 0 {
                store.clone()
            } else {
                other.clone()
            };
            let (limits, start) = (limits.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let mut n = 0;
                while let Some(r) = s.claim_next("c", LEASE, &limits).await.unwrap() {
                    assert_eq!(r.job_id, "two");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut claimed = 0;
    for t in tasks {
        claimed += t.await.unwrap();
    }
    assert_eq!(claimed, 2);
    assert_eq!(store.queued_count().await.unwrap(), 18);
    drop((store, other));
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_limited_claim_counts_under_the_jobs_advisory_lock() {
    let db = TestDb::new().await;
    let store = Arc::new(db.store().await);
    let mut limits = ConcurrencyLimits::default();
    limits
        .0
        .insert(("default".into(), "p".into(), "j".into()), 1);
    let key = queued(&store, "j", None).await;
    // Another claimer holds the job's lock: this claim waits for it.
    let mut other = db.sql().await;
    let tx = other.transaction().await.unwrap();
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('default/p/j'))", &[])
        .await
        .unwrap();
    let s = store.clone();
    let claim = tokio::spawn(async move { s.claim_next("a", LEASE, &limits).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = tx
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the claim never waited for the job's lock"
        );
        tokio::task::yield_now().await;
    }
    assert!(!claim.is_finished());
    tx.commit().await.unwrap();
    assert_eq!(claim.await.unwrap().unwrap().unwrap().key, key);
    drop(store);
    db.drop_db().await;
}

/// Waits for the run's lease (taken for 0 s) to be behind the store's clock.
async fn expire(store: &PostgresStore, node: &str) -> Vec<crate::store::RunRecord> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = store.take_over_expired(node, LEASE, 10).await.unwrap();
        if !got.is_empty() {
            return got;
        }
        assert!(Instant::now() < deadline, "the lease never ran out");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_takeover_fences_the_old_owner_out() {
    let db = TestDb::new().await;
    let store = Arc::new(db.store().await);
    let key = queued(&store, "j", Some("http://127.0.0.1:9/h")).await;
    let old = store
        .claim_next("a", Duration::ZERO, &ConcurrencyLimits::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((old.lease_epoch, old.node_id.as_deref()), (1, Some("a")));
    let taken = expire(&store, "b").await;
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].key, key);
    assert_eq!(
        taken[0].node_id.as_deref(),
        Some("a"),
        "the node that lost it"
    );
    assert_eq!(taken[0].lease_epoch, 2);
    assert!(
        store
            .take_over_expired("c", LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );

    assert!(!store.save_progress(&key, 1, "[]").await.unwrap());
    assert_eq!(store.renew(&key, 1, LEASE).await.unwrap(), LeaseState::Lost);
    let done = end(RunStatus::Failed);
    assert!(
        !store
            .finish(&key, EndIf::Leased(1), done.clone())
            .await
            .unwrap()
    );
    assert!(
        !store
            .finish(&key, EndIf::Queued, done.clone())
            .await
            .unwrap()
    );
    assert!(!store.requeue(&key, 1, true).await.unwrap());

    let (stale, fresh) = (
        store.kept_state(Some((key.clone(), 1))).unwrap(),
        store.kept_state(Some((key.clone(), 2))).unwrap(),
    );
    let vars: std::collections::BTreeMap<String, String> =
        [("LastRunDate".to_owned(), "2026-01-01".to_owned())].into();
    let v = vars.clone();
    let r = tokio::task::spawn_blocking(move || stale.save("p", "j", &v))
        .await
        .unwrap();
    assert!(matches!(r, Err(StateError::Fenced)), "{r:?}");
    let r = tokio::task::spawn_blocking(move || fresh.xref_put("p", &[("l", "k", "v")]))
        .await
        .unwrap();
    assert!(r.is_ok(), "{r:?}");

    assert!(store.save_progress(&key, 2, "[1]").await.unwrap());
    assert_eq!(store.renew(&key, 2, LEASE).await.unwrap(), LeaseState::Held);
    assert!(store.finish(&key, EndIf::Leased(2), done).await.unwrap());
    assert_eq!(
        store.run(&key).await.unwrap().unwrap().status,
        RunStatus::Failed
    );
    // Ended: the lease is gone for everyone.
    assert_eq!(store.renew(&key, 2, LEASE).await.unwrap(), LeaseState::Lost);
    assert_eq!(store.due_webhooks(now(), 10).await.unwrap().len(), 1);
    drop(store);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kept_state_reads_back_and_blocks_safely_from_plain_threads() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let state = store.kept_state(None).unwrap();
    let vars: std::collections::BTreeMap<String, String> = [
        ("a".to_owned(), "1".to_owned()),
        ("b".to_owned(), "2".to_owned()),
    ]
    .into();
    let read = std::thread::spawn(move || {
        state.save("p", "j", &vars)?;
        state.xref_put(
            "p",
            &[("l", "k", "old"), ("l", "k", "new"), ("l", "x", "y")],
        )?;
        Ok::<_, StateError>((
            state.load("p", "j")?,
            state.xref_get("p", "l", "k")?,
            state.xref_get("p", "l", "none")?,
        ))
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(read.0.get("b").map(String::as_str), Some("2"));
    assert_eq!(read.1.as_deref(), Some("new"));
    assert_eq!(read.2, None);
    drop(store);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn orphans_are_a_nodes_own_running_runs_under_a_new_epoch() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let key = queued(&store, "j", None).await;
    let rec = claim(&store, "a").await.unwrap();
    assert!(store.orphans("b").await.unwrap().is_empty());
    let mine = store.orphans("a").await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(
        (mine[0].key.clone(), mine[0].lease_epoch),
        (key.clone(), rec.lease_epoch + 1)
    );
    assert!(
        !store
            .save_progress(&key, rec.lease_epoch, "[]")
            .await
            .unwrap()
    );
    drop(store);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_requeued_run_is_claimed_again_under_a_new_epoch() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let key = queued(&store, "j", None).await;
    let rec = claim(&store, "a").await.unwrap();
    assert!(
        store
            .save_progress(&key, rec.lease_epoch, "[1]")
            .await
            .unwrap()
    );
    assert!(store.requeue(&key, rec.lease_epoch, true).await.unwrap());
    assert!(!store.requeue(&key, rec.lease_epoch, true).await.unwrap());
    let back = store.run(&key).await.unwrap().unwrap();
    assert_eq!(back.status, RunStatus::Queued);
    assert_eq!(
        (back.requeues, back.node_id, back.results_json),
        (1, None, None)
    );
    let again = claim(&store, "b").await.unwrap();
    assert_eq!(again.lease_epoch, rec.lease_epoch + 2);
    assert!(store.requeue(&key, again.lease_epoch, false).await.unwrap());
    assert_eq!(store.run(&key).await.unwrap().unwrap().requeues, 1);
    drop(store);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_request_reaches_the_renewal_and_the_other_node() {
    let db = TestDb::new().await;
    let (a, b) = (db.store().await, db.store().await);
    let mut heard = b.news().unwrap();
    let key = queued(&a, "j", None).await;
    assert!(
        !a.request_cancel(&key).await.unwrap(),
        "a queued run has no node"
    );
    let rec = claim(&a, "a").await.unwrap();
    assert!(b.request_cancel(&key).await.unwrap());
    assert_eq!(
        a.renew(&key, rec.lease_epoch, LEASE).await.unwrap(),
        LeaseState::CancelRequested
    );
    wait_for(&mut heard, StoreNews::Cancel(key.clone())).await;
    drop((a, b));
    db.drop_db().await;
}

/// Waits (with a deadline) until `rx` hears `want`.
async fn wait_for(rx: &mut broadcast::Receiver<StoreNews>, want: StoreNews) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(n)) if n == want => return,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("news closed: {e}"),
            Err(_) => panic!("never heard {want:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_nodes_accepts_and_ends_are_news_to_another() {
    let db = TestDb::new().await;
    let (a, b) = (db.store().await, db.store().await);
    let mut heard = b.news().unwrap();
    let key = queued(&a, "j", None).await;
    wait_for(&mut heard, StoreNews::Queued).await;
    let rec = claim(&a, "a").await.unwrap();
    let done = end(RunStatus::Complete);
    assert!(
        a.finish(&key, EndIf::Leased(rec.lease_epoch), done)
            .await
            .unwrap()
    );
    wait_for(&mut heard, StoreNews::Ended(key)).await;
    assert_eq!(
        news::parse("ended:a/b/6f1c0a52-0000-4000-8000-000000000001"),
        Some(StoreNews::Ended(RunKey {
            instance: "a/b".into(),
            run_id: uuid::Uuid::parse_str("6f1c0a52-0000-4000-8000-000000000001").unwrap(),
        }))
    );
    assert_eq!(news::parse("ended:junk"), None);
    drop((a, b));
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_listener_reconnects_after_its_connection_is_killed() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let mut heard = store.news().unwrap();
    let killed: i64 = db
        .sql()
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'tidepool-listen%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    wait_for(&mut heard, StoreNews::Reconnected).await;
    queued(&store, "j", None).await;
    wait_for(&mut heard, StoreNews::Queued).await;
    drop(store);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_connections_read_as_unreachable_and_the_pool_recovers() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let key = queued(&store, "j", None).await;
    // Every pooled connection busy at once, so the pool holds several.
    let reads: Vec<_> = (0..8).map(|_| store.run(&key)).collect();
    for r in futures_util::future::join_all(reads).await {
        assert!(r.unwrap().is_some());
    }
    let killed: i64 = db
        .sql()
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND application_name NOT LIKE 'tidepool-listen%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 1, "{killed}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut failures = 0;
    loop {
        match store.run(&key).await {
            Ok(found) => {
                assert!(found.is_some());
                break;
            }
            Err(e) => {
                assert!(e.is_unreachable(), "{e:?}");
                failures += 1;
            }
        }
        assert!(Instant::now() < deadline, "the pool never recovered");
    }
    assert!(failures <= 16, "{failures}");
    assert_eq!(claim(&store, "a").await.unwrap().key, key);
    drop(store);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_run_is_ended_before_it_starts_with_its_webhook() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let key = queued(&store, "j", Some("http://127.0.0.1:9/h")).await;
    let cancelled = end(RunStatus::Cancelled);
    assert!(
        !store
            .finish(&key, EndIf::Leased(0), cancelled.clone())
            .await
            .unwrap()
    );
    assert!(
        store
            .finish(&key, EndIf::Queued, cancelled.clone())
            .await
            .unwrap()
    );
    assert!(!store.finish(&key, EndIf::Queued, cancelled).await.unwrap());
    let rec = store.run(&key).await.unwrap().unwrap();
    assert_eq!(rec.status, RunStatus::Cancelled);
    assert!(claim(&store, "a").await.is_none());
    let due = store.due_webhooks(now(), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(
        (due[0].key.clone(), due[0].url.as_str()),
        (key, "http://127.0.0.1:9/h")
    );
    drop(store);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_asking_for_due_webhooks_at_once_get_disjoint_claims() {
    let db = TestDb::new().await;
    let (a, b) = (db.store().await, db.store().await);
    let mut keys = HashSet::new();
    for _ in 0..20 {
        keys.insert(ended(&a, Some("http://127.0.0.1:9/h")).await);
    }
    let (x, y) = tokio::join!(a.due_webhooks(now(), 15), b.due_webhooks(now(), 15));
    let (x, y) = (x.unwrap(), y.unwrap());
    let xs: HashSet<RunKey> = x.iter().map(|d| d.key.clone()).collect();
    let ys: HashSet<RunKey> = y.iter().map(|d| d.key.clone()).collect();
    assert!(xs.is_disjoint(&ys), "{xs:?} {ys:?}");
    assert_eq!(xs.len() + ys.len(), 20);
    assert_eq!(xs.union(&ys).cloned().collect::<HashSet<_>>(), keys);
    assert_eq!(x[0].body, r#"{"hook":true}"#);
    assert!(
        a.due_webhooks(now(), 50).await.unwrap().is_empty(),
        "all claimed"
    );

    let key = x[0].key.clone();
    let attempt = WebhookAttempt {
        attempt: 1,
        at: now(),
        status_code: Some(500),
        error: Some("boom".into()),
    };
    a.record_attempt(&key, attempt.clone(), WebhookNext::RetryAt(now()))
        .await
        .unwrap();
    let again = b.due_webhooks(now(), 50).await.unwrap();
    assert_eq!(again.len(), 1, "the attempt gave the claim back");
    assert_eq!((again[0].key.clone(), again[0].attempts), (key.clone(), 1));
    let got = a.attempts(&key).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].status_code, got[0].error.as_deref()),
        (Some(500), Some("boom"))
    );
    a.record_attempt(
        &key,
        WebhookAttempt {
            attempt: 2,
            ..attempt
        },
        WebhookNext::Delivered,
    )
    .await
    .unwrap();
    assert_eq!(a.attempts(&key).await.unwrap().len(), 2);
    // An expired claim is given back.
    db.sql()
        .await
        .execute(
            "UPDATE webhooks SET claimed_until = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(b.due_webhooks(now(), 50).await.unwrap().len(), 19);
    drop((a, b));
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn users_keys_and_tokens_and_their_revocation() {
    let db = TestDb::new().await;
    let store = db.store().await;
    assert!(!store.has_users().await.unwrap());
    let user = UserRecord {
        name: "ann".into(),
        password_hash: "h1".into(),
        primary_instance: "default".into(),
        grants: vec![
            ("default".into(), Role::Owner),
            ("x".into(), Role::ReadOnly),
        ],
    };
    let before = crate::store::revocation_epoch();
    store.put_user(user.clone()).await.unwrap();
    assert!(crate::store::revocation_epoch() > before);
    assert_eq!(store.user("ann").await.unwrap(), Some(user.clone()));
    assert!(store.has_users().await.unwrap());
    let later = now() + chrono::Duration::hours(1);
    store.put_token("t1", "ann", later, 10).await.unwrap();
    let (who, exp) = store.token_user("t1", now()).await.unwrap().unwrap();
    assert_eq!((who.as_str(), exp.timestamp()), ("ann", later.timestamp()));
    assert_eq!(
        store.token_user("t1", later).await.unwrap(),
        None,
        "expired"
    );
    let before = crate::store::revocation_epoch();
    assert!(store.set_password("ann", "h2").await.unwrap());
    assert!(crate::store::revocation_epoch() > before);
    assert_eq!(
        store.token_user("t1", now()).await.unwrap(),
        None,
        "revoked"
    );
    assert!(!store.set_password("bob", "h").await.unwrap());
    assert_eq!(
        store.user("ann").await.unwrap().unwrap().password_hash,
        "h2"
    );

    store.put_api_key("k1", "ann", "ci").await.unwrap();
    assert!(store.put_api_key("k1", "ann", "again").await.is_err());
    assert_eq!(
        store.api_key_user("k1").await.unwrap().as_deref(),
        Some("ann")
    );
    assert_eq!(store.api_keys().await.unwrap()[0].label, "ci");
    store.put_user(user).await.unwrap();
    assert!(
        store.api_key_user("k1").await.unwrap().is_some(),
        "keys outlive a put_user"
    );
    assert!(store.remove_api_key("k1").await.unwrap());
    assert!(!store.remove_api_key("k1").await.unwrap());
    store.put_api_key("k2", "ann", "ci").await.unwrap();
    store.put_token("t2", "ann", later, 10).await.unwrap();
    assert!(store.remove_user("ann").await.unwrap());
    assert!(!store.remove_user("ann").await.unwrap());
    assert_eq!(store.api_key_user("k2").await.unwrap(), None);
    assert_eq!(store.token_user("t2", now()).await.unwrap(), None);
    assert!(!store.has_users().await.unwrap());
    drop(store);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_goes_in_batches_and_keeps_queued_runs_and_pending_webhooks() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let plain = ended(&store, None).await;
    let pending = ended(&store, Some("http://127.0.0.1:9/h")).await;
    let delivered = ended(&store, Some("http://127.0.0.1:9/h")).await;
    let attempt = WebhookAttempt {
        attempt: 1,
        at: now(),
        status_code: Some(200),
        error: None,
    };
    store
        .record_attempt(&delivered, attempt, WebhookNext::Delivered)
        .await
        .unwrap();
    for _ in 0..5 {
        ended(&store, None).await;
    }
    let waiting = queued(&store, "j", None).await;
    let past = now() - chrono::Duration::hours(1);
    assert_eq!(store.purge_ended(past, 10).await.unwrap().deleted, 0);
    let later = now() + chrono::Duration::hours(1);
    let mut steps = Vec::new();
    loop {
        let step = store.purge_ended(later, 3).await.unwrap();
        steps.push(step.deleted);
        if !step.more {
            break;
        }
    }
    assert_eq!(steps.iter().sum::<u64>(), 7, "{steps:?}");
    assert!(steps.iter().all(|&n| n <= 3), "{steps:?}");
    assert!(store.run(&plain).await.unwrap().is_none());
    assert!(store.run(&delivered).await.unwrap().is_none());
    assert!(store.attempts(&delivered).await.unwrap().is_empty());
    assert!(store.run(&pending).await.unwrap().is_some());
    assert!(store.run(&waiting).await.unwrap().is_some());
    assert_eq!(
        store.purge_ended(later, 3).await.unwrap(),
        Purged {
            deleted: 0,
            more: false
        }
    );
    drop(store);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ended_run_keeps_its_results_once_and_reads_them_back() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let key = ended(&store, None).await;
    let rec = store.run(&key).await.unwrap().unwrap();
    assert_eq!(
        rec.results_json.as_deref(),
        Some(r#"[{"jobID":"j","status":"Complete"}]"#)
    );
    let stored: Option<String> = db
        .sql()
        .await
        .query_one("SELECT results FROM runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, None, "results stored twice");
    drop(store);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_register_beat_and_stop() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let mut info = NodeInfo {
        node_id: "n1".into(),
        address: "127.0.0.1:8080".into(),
        version: "0.1.0".into(),
        started_at: now(),
        running: 2,
        workers: 8,
        draining: false,
    };
    store.heartbeat(&info).await.unwrap();
    info.draining = true;
    store.heartbeat(&info).await.unwrap();
    store.node_stopped("n1").await.unwrap();
    let nodes = store.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        nodes[0].info.started_at.timestamp(),
        info.started_at.timestamp()
    );
    assert!(nodes[0].info.draining && nodes[0].stopped);
    assert_eq!((nodes[0].info.running, nodes[0].info.workers), (2, 8));
    assert!(
        (0.0..60.0).contains(&nodes[0].silent_secs),
        "{}",
        nodes[0].silent_secs
    );
    store.heartbeat(&info).await.unwrap();
    assert!(!store.nodes().await.unwrap()[0].stopped);
    drop(store);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn history_lists_pages_filters_and_details() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let mut keys = Vec::new();
    for i in 0..5 {
        let mut run = new_run(if i % 2 == 0 { "even" } else { "odd" }, None);
        run.accepted_at = now() - chrono::Duration::seconds(10 - i);
        run.request_json = format!(r#"{{"argument":"Arg number {i}"}}"#);
        keys.push(run.key.clone());
        assert_eq!(store.submit(run).await.unwrap(), Submitted::Accepted);
    }
    let all = RunFilter {
        limit: 2,
        ..RunFilter::default()
    };
    let page = store.list_runs(&all).await.unwrap();
    assert_eq!(page.len(), 3, "one more than asked");
    assert_eq!(
        (page[0].key.clone(), page[1].key.clone()),
        (keys[4].clone(), keys[3].clone())
    );
    let next = RunFilter {
        after: Some(page[1].cursor.clone()),
        ..all.clone()
    };
    let page = store.list_runs(&next).await.unwrap();
    assert_eq!(
        page.iter().map(|r| r.key.clone()).collect::<Vec<_>>(),
        keys[..3].iter().rev().cloned().collect::<Vec<_>>()
    );
    let filtered = RunFilter {
        job_id: Some("odd".into()),
        instances: Some(vec!["default".into()]),
        limit: 10,
        ..RunFilter::default()
    };
    assert_eq!(store.list_runs(&filtered).await.unwrap().len(), 2);
    let text = RunFilter {
        text: Some("NUMBER 3".into()),
        limit: 10,
        ..RunFilter::default()
    };
    let found = store.list_runs(&text).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].key.clone(), found[0].argument.as_str()),
        (keys[3].clone(), "Arg number 3")
    );
    let elsewhere = RunFilter {
        instances: Some(vec!["other".into()]),
        limit: 10,
        ..RunFilter::default()
    };
    assert!(store.list_runs(&elsewhere).await.unwrap().is_empty());
    details_read_back(&store, &keys[0]).await;

    let done = new_run("j", None);
    let again = done.clone();
    let finished = end(RunStatus::Complete);
    assert_eq!(
        store
            .record_ended(done, now(), finished.clone())
            .await
            .unwrap(),
        Submitted::Accepted
    );
    assert_eq!(
        store.record_ended(again, now(), finished).await.unwrap(),
        Submitted::Conflict
    );
    drop(store);
    db.drop_db().await;
}

async fn details_read_back(store: &PostgresStore, key: &RunKey) {
    let line = |level: u8, message: &str| StoredLogLine {
        seq: 0,
        time: "2026-01-01T00:00:00Z".into(),
        level,
        job: "j".into(),
        row: Some(7),
        message: message.into(),
    };
    let error = StoredRowError {
        seq: 0,
        job: "j".into(),
        row: 3,
        stage: 1,
        stage_name: Some("load".into()),
        message: "bad".into(),
        values: vec![("id".into(), "3".into())],
    };
    let details = RunDetails {
        log: vec![line(1, "low"), line(3, "high"), line(2, "medium")],
        row_errors: vec![error.clone(), error],
        totals: crate::store::history::RowErrorTotals { total: 9, kept: 2 },
    };
    store.save_details(key, details.clone()).await.unwrap();
    store.save_details(key, details).await.unwrap();
    let lines = store.log_lines(key, 2, 0, 10).await.unwrap();
    let got: Vec<(u64, &str)> = lines.iter().map(|l| (l.seq, l.message.as_str())).collect();
    assert_eq!(got, vec![(1, "low"), (3, "medium")]);
    assert_eq!(
        store.log_lines(key, 3, 1, 1).await.unwrap()[0].message,
        "high"
    );
    let (errors, totals) = store.row_errors(key, 1, 10).await.unwrap();
    assert_eq!(
        (errors.len(), errors[0].seq, totals.total, totals.kept),
        (1, 2, 9, 2)
    );
    assert_eq!(errors[0].values, vec![("id".to_owned(), "3".to_owned())]);
    assert_eq!(errors[0].stage_name.as_deref(), Some("load"));
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_per_user_are_bounded_and_silent_nodes_are_forgotten() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let later = now() + chrono::Duration::hours(1);
    store
        .put_token("old", "ann", now() - chrono::Duration::seconds(1), 3)
        .await
        .unwrap();
    store.put_token("bob1", "bob", later, 3).await.unwrap();
    let conn = db.sql().await;
    let count = || async {
        let row = conn
            .query_one("SELECT count(*) FROM tokens WHERE user_name = 'ann'", &[])
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    // Later tokens expire later: the first ones are the oldest.
    for (i, t) in ["t1", "t2", "t3", "t4", "t5"].into_iter().enumerate() {
        let exp = later + chrono::Duration::seconds(i as i64);
        store.put_token(t, "ann", exp, 3).await.unwrap();
        if i == 0 {
            assert_eq!(count().await, 1, "the expired token is forgotten");
        }
    }
    let mut kept = vec![];
    for t in ["old", "t1", "t2", "t3", "t4", "t5", "bob1"] {
        kept.push(store.token_user(t, now()).await.unwrap().is_some());
    }
    assert_eq!(kept, [false, false, false, true, true, true, true]);
    assert_eq!(count().await, 3);

    for id in ["a", "b"] {
        let node = crate::store::NodeInfo {
            node_id: id.into(),
            address: "127.0.0.1:1".into(),
            version: "test".into(),
            started_at: now(),
            running: 0,
            workers: 1,
            draining: false,
        };
        store.heartbeat(&node).await.unwrap();
    }
    conn.execute(
        "UPDATE nodes SET heartbeat_at = now() - interval '8 days' WHERE node_id = 'a'",
        &[],
    )
    .await
    .unwrap();
    let week = std::time::Duration::from_secs(7 * 24 * 3600);
    assert_eq!(store.forget_nodes(week).await.unwrap(), 1);
    let ids: Vec<String> = store
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.info.node_id)
        .collect();
    assert_eq!(ids, ["b"]);
    drop(store);
    db.drop_db().await;
}
