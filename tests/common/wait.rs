//! Waiting for a condition with a deadline, never for a fixed time: on a busy
//! machine everything takes its time, and a test that waits for the thing it
//! needs is as fast as the machine allows and never flaky.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a condition may take to hold on a busy machine.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// Polls `check` until it gives `Some`, panicking with `what` after
/// [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it holds, panicking with `what` after [`DEADLINE`].
pub async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually(what, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await
}

/// [`until`] for blocking code.
pub fn until_blocking(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The webhook bodies a [`webhook_receiver`] got, in order.
pub type Received = Arc<Mutex<Vec<Value>>>;

/// An HTTP receiver on a free loopback port that records every webhook body
/// and answers with `status(body)`. Returns its URL and what it got.
pub async fn webhook_receiver(
    status: impl Fn(&Value) -> axum::http::StatusCode + Clone + Send + Sync + 'static,
) -> (String, Received) {
    let got: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let (sink, status) = (sink.clone(), status.clone());
            async move {
                let v: Value = serde_json::from_str(&body).unwrap();
                let answer = status(&v);
                sink.lock().unwrap().push(v);
                answer
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}
