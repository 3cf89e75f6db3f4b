//! Wake-ups for readers: a [`Wake`] holds the last log head this process knows of.
//!
//! ```text
//! appender in this process ──(after COMMIT: Wake::advance)──────────────┐
//! appender anywhere ──(NOTIFY weir_events, '<position>', at commit)──► listener ──► Wake ──► lanes,
//!                                                                                   channels, tail
//! ```
//!
//! The appender sends `NOTIFY` in its append transaction, so readers in other processes learn
//! of new events at commit; readers in the appender's own process are told directly after the
//! commit returns ([`crate::Appender::wake_readers`]), without the notification's round trip
//! through the server. Both feed the same [`Wake`], which only moves forward. The head a
//! `Wake` holds was always committed before it was seen, so everything up to it is readable.
//! Readers still poll on a timer as a fallback (a notification can be lost across a
//! reconnect; the listener reads the head again after each).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weir_core::Position;

/// The channel the appender notifies on.
pub const NOTIFY_CHANNEL: &str = "weir_events";

/// The log head as this process knows it, and a way to wait for it to move. Clones share it.
#[derive(Debug, Clone)]
pub struct Wake {
    tx: Arc<watch::Sender<Position>>,
    rx: watch::Receiver<Position>,
}

impl Default for Wake {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Wake {
    /// A wake at `head` that moves only through [`advance`](Self::advance) (no listener).
    pub fn new(head: Position) -> Self {
        let (tx, rx) = watch::channel(head);
        Self { tx: Arc::new(tx), rx }
    }

    /// The last head seen.
    pub fn head(&self) -> Position {
        *self.rx.borrow()
    }

    /// Moves the head to `head` if that is further, waking every waiter. Only a committed
    /// position may be given.
    pub fn advance(&self, head: Position) {
        self.tx.send_if_modified(|h| bump(h, head));
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
    let wake = Wake::new(0);
    let feed = wake.clone();
    let task = tokio::spawn(async move {
        loop {
            if cancel.is_cancelled() {
                return;
            }
            if let Err(e) = listen_once(&pool, &feed, &cancel).await {
                tracing::debug!(error = %e, "log listener reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    });
    (wake, task)
}

async fn listen_once(
    pool: &PgPool,
    wake: &Wake,
    cancel: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    let head: Option<i64> =
        sqlx::query_scalar("select max(position) from weir.source_state").fetch_one(pool).await?;
    wake.advance(head.unwrap_or(0));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            n = listener.recv() => {
                let n = n?;
                if let Ok(p) = n.payload().parse::<i64>() {
                    wake.advance(p);
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
