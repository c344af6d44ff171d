//! What other nodes did, heard on a connection of its own that `LISTEN`s to
//! `tidepool_news`. Notifications may be lost (a dropped connection): after
//! a reconnection the node hears [`StoreNews::Reconnected`] and looks again.

use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::{broadcast, oneshot, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use super::{NEWS_CHANNEL, connect_error};
use crate::store::{RunKey, StoreError, StoreNews};

/// The longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a notification's payload says.
pub(super) fn parse(payload: &str) -> Option<StoreNews> {
    if payload == "queued" {
        return Some(StoreNews::Queued);
    }
    let key = |s: &str| {
        let (instance, run_id) = s.rsplit_once('/')?;
        Some(RunKey {
            instance: instance.to_owned(),
            run_id: uuid::Uuid::parse_str(run_id).ok()?,
        })
    };
    if let Some(rest) = payload.strip_prefix("ended:") {
        return key(rest).map(StoreNews::Ended);
    }
    payload
        .strip_prefix("cancel:")
        .and_then(key)
        .map(StoreNews::Cancel)
}

/// Starts the listener and returns once it listens (so nothing committed
/// after the store is connected goes unheard). It stops when `stop`'s
/// sender (the store) is dropped.
pub(super) async fn listen(
    mut pg: tokio_postgres::Config,
    node: Option<String>,
    news: broadcast::Sender<StoreNews>,
    mut stop: watch::Receiver<()>,
) -> Result<(), StoreError> {
    pg.application_name(format!("tidepool-listen {}", node.as_deref().unwrap_or("")));
    let (ready, listening) = oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready);
        let mut backoff = Duration::from_millis(100);
        loop {
            let session = session(&pg, &news, &mut ready);
            tokio::select! {
                ended = session => {
                    if let Err(e) = ended {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Err(e));
                            return;
                        }
                        tracing::warn!("store notifications: {e}");
                    } else {
                        backoff = Duration::from_millis(100);
                    }
                }
                _ = stop.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
    listening
        .await
        .map_err(|_| StoreError::Unreachable("the notification listener stopped".into()))?
}

/// One listening connection, until it drops. Tells `ready` once it listens;
/// a session after the first says [`StoreNews::Reconnected`].
async fn session(
    pg: &tokio_postgres::Config,
    news: &broadcast::Sender<StoreNews>,
    ready: &mut Option<oneshot::Sender<Result<(), StoreError>>>,
) -> Result<(), StoreError> {
    let (client, mut conn) = pg.connect(NoTls).await.map_err(connect_error)?;
    let (lost_tx, mut lost) = oneshot::channel::<()>();
    let forward = news.clone();
    // The connection is driven here: its notifications come out of it.
    let driver = tokio::spawn(async move {
        while let Some(msg) = poll_fn(|cx| conn.poll_message(cx)).await {
            match msg {
                Ok(AsyncMessage::Notification(n)) => {
                    if let Some(item) = parse(n.payload()) {
                        let _ = forward.send(item);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("store notifications: {e}");
                    break;
                }
            }
        }
        let _ = lost_tx.send(());
    });
    let listen = format!("LISTEN {NEWS_CHANNEL}");
    let listened = tokio::select! {
        r = client.batch_execute(&listen) => r,
        _ = &mut lost => {
            return Err(StoreError::Unreachable("the notification connection closed".into()));
        }
    };
    if let Err(e) = listened {
        driver.abort();
        return Err(e.into());
    }
    match ready.take() {
        Some(r) => {
            let _ = r.send(Ok(()));
        }
        None => {
            let _ = news.send(StoreNews::Reconnected);
        }
    }
    // The client stays alive while the connection does.
    let _ = lost.await;
    drop(client);
    Ok(())
}
