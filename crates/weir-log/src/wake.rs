//! Wake-ups for readers: after each append the appender updates an in-process watch channel
//! and sends `NOTIFY weir_events, '<position>'` in the append transaction, so readers in other
//! processes learn of new events at commit. Readers still poll on a timer as a fallback (a
//! notification can be lost across a reconnect).

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weir_core::Position;

/// The channel the appender notifies on.
pub const NOTIFY_CHANNEL: &str = "weir_events";

/// A receiver of the log head. `changed()` resolves after an append.
#[derive(Debug, Clone)]
pub struct Wake {
    rx: watch::Receiver<Position>,
}

impl Wake {
    /// Wraps a receiver (e.g. [`crate::Appender::subscribe`]).
    pub fn new(rx: watch::Receiver<Position>) -> Self {
        Self { rx }
    }

    /// The last head seen.
    pub fn head(&self) -> Position {
        *self.rx.borrow()
    }

    /// Waits until the head moves past `position`, or `timeout` passes. Returns the head.
    pub async fn wait_past(&mut self, position: Position, timeout: Duration) -> Position {
        let _ = tokio::time::timeout(timeout, self.rx.wait_for(|h| *h > position)).await;
        *self.rx.borrow()
    }
}

/// Listens for `NOTIFY weir_events` on `pool`'s database and feeds a [`Wake`]. Reconnects on
/// error; reads the head from `weir.source_state` after each (re)connect so nothing is missed.
pub fn listen_for_appends(
    pool: PgPool,
    cancel: CancellationToken,
) -> (Wake, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(0);
    let task = tokio::spawn(async move {
        loop {
            if cancel.is_cancelled() {
                return;
            }
            if let Err(e) = listen_once(&pool, &tx, &cancel).await {
                tracing::debug!(error = %e, "log listener reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    });
    (Wake::new(rx), task)
}

async fn listen_once(
    pool: &PgPool,
    tx: &watch::Sender<Position>,
    cancel: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    let head: Option<i64> =
        sqlx::query_scalar("select max(position) from weir.source_state").fetch_one(pool).await?;
    tx.send_if_modified(|h| bump(h, head.unwrap_or(0)));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            n = listener.recv() => {
                let n = n?;
                if let Ok(p) = n.payload().parse::<i64>() {
                    tx.send_if_modified(|h| bump(h, p));
                }
            }
        }
    }
}

fn bump(head: &mut Position, seen: Position) -> bool {
    if seen > *head {
        *head = seen;
        true
    } else {
        false
    }
}
