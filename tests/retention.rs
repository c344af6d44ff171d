//! The store stays small: the write-ahead log is truncated once runs stop
//! coming, on SIGTERM and at a restart after kill -9; ended runs older than
//! `retention_days` are deleted with their webhook, unless the webhook is
//! still being delivered.

mod common;

use std::path::Path;

use common::{Fixture, Server, until};
use serde_json::{Value, json};

/// `tidepool serve` with `config` as its TOML config file, on `port` if given.
async fn serve(f: &Fixture, port: Option<u16>, config: &str) -> Server {
    let builder = f.serve().config(config);
    match port {
        Some(port) => builder.port(port),
        None => builder,
    }
    .start_async()
    .await
}

/// A job of three rows into SQLite.
fn tiny_project(f: &Fixture) {
    f.project(
        "tiny",
        "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.db]\nkind = \"sqlite\"\npath = \"${DATA_DIR}/tiny.sqlite\"\ninit_sql = [\"CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, name TEXT)\"]\n",
        &[(
            "load",
            "[origin]\nconnection = \"src\"\n[destination]\nconnection = \"db\"\n[[stages]]\ntable = \"t\"\naction = \"update/insert\"\nfields = [{ column = \"id\", origin = \"id\", match = true }, { column = \"name\", origin = \"name\" }]\n",
        )],
    );
    f.write("projects/tiny/in.csv", "id,name\n1,a\n2,b\n3,c\n");
}

fn wal_size(data: &Path) -> u64 {
    std::fs::metadata(data.join("tidepool.sqlite-wal"))
        .map(|m| m.len())
        .unwrap_or(0)
}

async fn submit(client: &reqwest::Client, base: &str, body: Value) {
    let r: Value = client
        .post(format!("{base}/v1/ExecuteJobAsync"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["started"], true, "{r}");
}

/// Submits `n` tiny runs, eight at a time.
async fn burst(client: &reqwest::Client, base: &str, n: usize) {
    for _ in 0..n / 8 {
        let mut posts = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (client, base) = (client.clone(), base.to_owned());
            posts.spawn(async move {
                let body =
                    json!({"runID": uuid::Uuid::new_v4(), "projectID": "tiny", "jobID": "load"});
                submit(&client, &base, body).await
            });
        }
        while let Some(done) = posts.join_next().await {
            done.unwrap();
        }
    }
}

async fn health(client: &reqwest::Client, base: &str) -> Value {
    common::get_json(client, &format!("{base}/healthz")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_is_truncated_when_idle_on_sigterm_and_at_restart() {
    let f = Fixture::new();
    tiny_project(&f);
    let client = reqwest::Client::new();
    let server = serve(&f, None, "workers = 2\n").await;
    let (port, base) = (server.port, server.base.clone());

    // A burst, then the queue empties: the log is emptied.
    burst(&client, &base, 240).await;
    until("the queue empties and the WAL is truncated", || async {
        let h = health(&client, &base).await;
        h["queued"] == 0 && h["running"] == 0 && wal_size(&f.data) == 0
    })
    .await;

    // SIGTERM with runs still queued: the log is empty after the stop.
    burst(&client, &base, 80).await;
    server.sigterm();
    let (status, server) = server.wait_exit_async().await;
    assert!(status.success(), "{status:?}\n{}", server.stderr());
    assert_eq!(wal_size(&f.data), 0, "WAL left after SIGTERM");

    // kill -9 in a burst leaves a log (tried again in the rare case that the
    // server had emptied it already); the restart empties it.
    for attempt in 1.. {
        let mut server = serve(&f, Some(port), "workers = 2\n").await;
        burst(&client, &base, 80).await;
        server.kill();
        if wal_size(&f.data) > 0 {
            break;
        }
        assert!(attempt < 5, "kill -9 never left a log to test with");
    }
    let _server = serve(&f, Some(port), "workers = 2\n").await;
    until(
        "the restarted server's queue empties and the WAL is truncated",
        || async {
            let h = health(&client, &base).await;
            h["queued"] == 0 && h["running"] == 0 && wal_size(&f.data) == 0
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_ended_runs_once_their_webhook_is_done() {
    let f = Fixture::new();
    tiny_project(&f);
    let pending = uuid::Uuid::new_v4().to_string();
    // A receiver that takes every webhook but `pending`'s (500: retried in an hour).
    let refused = pending.clone();
    let (hook, got) = common::webhook_receiver(move |v| {
        if v["runID"] == refused.as_str() {
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        } else {
            axum::http::StatusCode::OK
        }
    })
    .await;
    let tried = |id: &str| got.lock().unwrap().iter().any(|v| v["runID"] == id);

    let client = reqwest::Client::new();
    // Runs are kept one second after they end.
    let config = format!(
        "workers = 2\nretention_days = {}\n[webhooks]\nfirst_retry_secs = 3600.0\n",
        1.0 / 86_400.0
    );
    let server = serve(&f, None, &config).await;
    let base = server.base.clone();

    let plain = uuid::Uuid::new_v4().to_string();
    let delivered = uuid::Uuid::new_v4().to_string();
    submit(
        &client,
        &base,
        json!({"runID": plain, "projectID": "tiny", "jobID": "load"}),
    )
    .await;
    for id in [&delivered, &pending] {
        submit(
            &client,
            &base,
            json!({"runID": id, "projectID": "tiny", "jobID": "load", "webHookURL": hook, "loggingLevel": 3}),
        )
        .await;
    }
    let status = |id: String| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let r = client
                .get(format!("{base}/v1/Results/{id}"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    until("both webhooks were tried", || async {
        tried(&delivered) && tried(&pending)
    })
    .await;
    until("the plain and the delivered runs are deleted", || async {
        status(plain.clone()).await.0 == 404 && status(delivered.clone()).await.0 == 404
    })
    .await;
    // A deleted run answers as an unknown one does.
    let unknown = status(uuid::Uuid::new_v4().to_string()).await;
    assert_eq!(unknown.0, 404);
    assert_eq!(status(plain.clone()).await, unknown);
    assert_eq!(status(delivered.clone()).await, unknown);
    let detail = client
        .get(format!("{base}/v1/Runs/{delivered}"))
        .send()
        .await
        .unwrap();
    assert_eq!(detail.status(), 404);

    // A later run is deleted too (a later sweep ran); the run whose webhook
    // is still pending is kept all along.
    let later = uuid::Uuid::new_v4().to_string();
    submit(
        &client,
        &base,
        json!({"runID": later, "projectID": "tiny", "jobID": "load"}),
    )
    .await;
    until("the later run is deleted", || async {
        status(later.clone()).await.0 == 404
    })
    .await;
    let (code, body) = status(pending.clone()).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("Complete"), "{body}");

    // The deleted run's webhook and its attempts are gone from the store; the
    // pending one is there.
    let db = rusqlite::Connection::open(f.data.join("tidepool.sqlite")).unwrap();
    let count = |table: &str, id: &str| -> i64 {
        db.query_row(
            &format!("SELECT count(*) FROM {table} WHERE run_id = ?1"),
            [id],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(count("webhooks", &delivered), 0);
    assert_eq!(count("webhook_attempts", &delivered), 0);
    assert_eq!(count("runs", &delivered), 0);
    assert_eq!(count("webhooks", &pending), 1);
    assert_eq!(count("webhook_attempts", &pending), 1);
    // So are its stored log lines and row errors; the kept run keeps its log.
    for table in ["run_log", "run_row_errors", "run_error_totals"] {
        assert_eq!(count(table, &delivered), 0, "{table}");
    }
    assert!(count("run_log", &pending) > 0, "the kept run's log");
}
