//! The accept-path ceiling on PostgreSQL: a bare axum handler that records
//! each `POST /v1/ExecuteJobAsync` body in PostgreSQL with group commit and
//! answers after the commit (synchronous_commit on). `bench/cluster.py`
//! compares tidepool's PostgreSQL store against it.
//!
//!     cargo run --release --example pg_ceiling -- 127.0.0.1:8099 postgres://postgres@127.0.0.1:5432/bench [WRITERS]
//!
//! Requests go to one writer task (or WRITERS tasks, each with its own
//! connection, taking turns at the queue); it takes everything waiting (up
//! to `BATCH`) and inserts it in one statement, which is one transaction,
//! then answers each request.
use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::get, routing::post};
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::NoTls;
use uuid::Uuid;

/// The most requests one transaction takes.
const BATCH: usize = 4096;

/// A request waiting for its commit: its run ID, its body and where to answer.
type Pending = (Uuid, String, oneshot::Sender<Result<(), String>>);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(url)) = (args.next(), args.next()) else {
        return Err("usage: pg_ceiling LISTEN_ADDR POSTGRES_URL [WRITERS]".into());
    };
    let writers: usize = args.next().map_or(Ok(1), |w| w.parse())?;
    let client = connect(&url).await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS ceiling_runs(run_id uuid PRIMARY KEY, request jsonb NOT NULL,
                 accepted_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let (tx, rx) = mpsc::channel::<Pending>(65536);
    let rx = Arc::new(Mutex::new(rx));
    tokio::spawn(writer(client, rx.clone()));
    for _ in 1..writers {
        tokio::spawn(writer(connect(&url).await?, rx.clone()));
    }
    let app = Router::new()
        .route("/v1/ExecuteJobAsync", post(accept))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// A connection (synchronous_commit on) whose driver runs in its own task;
/// the process ends if it drops.
async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("pg_ceiling: the connection ended: {e}");
            std::process::exit(1);
        }
    });
    client.batch_execute("SET synchronous_commit = on").await?;
    Ok(client)
}

/// Parses the body, queues it to the writer and answers once it is committed.
async fn accept(State(tx): State<mpsc::Sender<Pending>>, body: Bytes) -> (StatusCode, String) {
    let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&body);
    let Some(run_id) = parsed.ok().and_then(|v| {
        v.get("runID")
            .and_then(|r| r.as_str())
            .and_then(|r| Uuid::parse_str(r).ok())
    }) else {
        return (StatusCode::BAD_REQUEST, r#"{"started":false}"#.into());
    };
    let text = String::from_utf8_lossy(&body).into_owned();
    let (done, answer) = oneshot::channel();
    if tx.send((run_id, text, done)).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"started":false}"#.into(),
        );
    }
    match answer.await {
        Ok(Ok(())) => (
            StatusCode::OK,
            format!(r#"{{"runID":"{run_id}","started":true}}"#),
        ),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"started":false}"#.into(),
        ),
    }
}

/// Inserts everything waiting in one transaction, then answers each request.
async fn writer(client: tokio_postgres::Client, rx: Arc<Mutex<mpsc::Receiver<Pending>>>) {
    let insert = match client
        .prepare(
            "INSERT INTO ceiling_runs(run_id, request)
             SELECT id, body::jsonb FROM unnest($1::uuid[], $2::text[]) AS t(id, body)
             ON CONFLICT (run_id) DO NOTHING",
        )
        .await
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pg_ceiling: cannot prepare the insert: {e}");
            std::process::exit(1);
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    // The queue is held only while taking a batch, so another writer takes
    // the next one while this one's commit is in flight.
    while rx.lock().await.recv_many(&mut batch, BATCH).await > 0 {
        let ids: Vec<Uuid> = batch.iter().map(|p| p.0).collect();
        let bodies: Vec<&str> = batch.iter().map(|p| p.1.as_str()).collect();
        let outcome = client
            .execute(&insert, &[&ids, &bodies])
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        for (_, _, done) in batch.drain(..) {
            let _ = done.send(outcome.clone());
        }
    }
}
