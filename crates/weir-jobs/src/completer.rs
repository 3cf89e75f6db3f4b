//! The completer: writes the outcomes of runs that no claim carried.
//!
//! ```text
//! producers ──Finished──► channel ──recv_many(completion_batch)──► one batch
//!   Completed             ─► one fenced statement for the whole batch (store::complete)
//!   Failed / Discard /    ─► one fenced statement each (retry, discard, put back)
//!   Snooze / Interrupted
//!   CompletedInTx         ─► only counted: the worker's transaction wrote it
//!   a write error         ─► the batch again after a backoff; after 10 tries the jobs stay
//!                            `running` and are rescued once this process stops heartbeating
//! ```
//!
//! It ends when every producer dropped its sender and the channel is drained, which is how a
//! stop flushes every outcome before the process deregisters.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use weir_core::Backoff;

use crate::shared::Shared;
use crate::store;

/// How a run ended, as the completer records it.
#[derive(Debug)]
pub(crate) enum Outcome {
    Completed,
    /// Completed by the worker in its own transaction.
    CompletedInTx,
    Failed {
        error: String,
        retry_in: Duration,
    },
    Discard(String),
    Snooze(Duration),
    /// Stopped by our own hard stop: put back without counting the attempt.
    Interrupted,
    /// Cancelled by request: the row already left.
    Cancelled,
    /// Prefetched but never started (the runner stopped): put back as it was.
    Unstarted,
}

/// A run that ended, sent by its producer.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) id: i64,
    pub(crate) attempt: i32,
    pub(crate) max_attempts: i32,
    pub(crate) queue: String,
    pub(crate) outcome: Outcome,
}

/// Writing outcomes again after an error: 200 ms, doubling, at most 3.2 s; 10 tries.
const WRITE_RETRY: Backoff = Backoff {
    first: Duration::from_millis(200),
    multiplier: 2.0,
    max: Duration::from_millis(3200),
};
const WRITE_TRIES: u32 = 10;

/// Writes outcomes: completions in batches, the rest one by one.
pub(crate) struct Completer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) rx: mpsc::UnboundedReceiver<Finished>,
}

impl Completer {
    pub(crate) async fn run(mut self) {
        let max = self.shared.config.completion_batch;
        let mut batch = Vec::with_capacity(max);
        while self.rx.recv_many(&mut batch, max).await > 0 {
            let mut tries = 0u32;
            loop {
                match self.write(&batch).await {
                    Ok(()) => break,
                    Err(e) if tries < WRITE_TRIES => {
                        tries += 1;
                        let wait = WRITE_RETRY.delay(tries);
                        warn!(error = %e, ?wait, "writing job outcomes failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => {
                        // The jobs stay `running`; they are rescued once our heartbeat stops.
                        warn!(error = %e, jobs = batch.len(), "giving up writing job outcomes");
                        break;
                    }
                }
            }
            batch.clear();
        }
    }

    async fn write(&self, batch: &[Finished]) -> sqlx::Result<()> {
        let mut conn = self.shared.pool.acquire().await?;
        let metrics = &self.shared.metrics;
        let counters = |q: &str| metrics.queue(q).expect("queue has counters");
        let done: Vec<&Finished> =
            batch.iter().filter(|f| matches!(f.outcome, Outcome::Completed)).collect();
        if !done.is_empty() {
            let ids: Vec<i64> = done.iter().map(|f| f.id).collect();
            let attempts: Vec<i32> = done.iter().map(|f| f.attempt).collect();
            let completed =
                store::complete(&mut conn, &ids, &attempts, self.shared.config.keep_completed)
                    .await?;
            counters(&done[0].queue).completion_written();
            for f in &done {
                if completed.contains(&f.id) {
                    counters(&f.queue).completed(1);
                } else {
                    self.fenced(f);
                }
            }
        }
        for f in batch {
            let c = counters(&f.queue);
            let now = Utc::now();
            let ok = match &f.outcome {
                Outcome::Completed => continue,
                Outcome::CompletedInTx => {
                    c.completed(1);
                    continue;
                }
                Outcome::Cancelled => {
                    debug!(id = f.id, "job cancelled while running");
                    continue;
                }
                Outcome::Failed { error, .. } if f.attempt >= f.max_attempts => {
                    c.discarded(true);
                    store::discard(&mut conn, f.id, f.attempt, error).await?
                }
                Outcome::Failed { error, retry_in } => {
                    c.retried();
                    debug!(id = f.id, attempt = f.attempt, error, "job attempt failed");
                    store::retry(
                        &mut conn,
                        f.id,
                        f.attempt,
                        error,
                        now + chrono_duration(*retry_in),
                    )
                    .await?
                }
                Outcome::Discard(error) => {
                    c.discarded(false);
                    store::discard(&mut conn, f.id, f.attempt, error).await?
                }
                Outcome::Snooze(d) => {
                    c.snoozed();
                    store::put_back(&mut conn, f.id, f.attempt, now + chrono_duration(*d), None)
                        .await?
                }
                Outcome::Unstarted => {
                    store::put_back(&mut conn, f.id, f.attempt, now, None).await?
                }
                Outcome::Interrupted => {
                    store::put_back(
                        &mut conn,
                        f.id,
                        f.attempt,
                        now,
                        Some("interrupted: runner stopped"),
                    )
                    .await?
                }
            };
            if !ok {
                self.fenced(f);
            }
        }
        Ok(())
    }

    fn fenced(&self, f: &Finished) {
        self.shared.metrics.queue(&f.queue).expect("queue has counters").fenced();
        warn!(
            id = f.id,
            attempt = f.attempt,
            "outcome rejected: the job was rescued, cancelled or finished by a newer attempt"
        );
    }
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(365 * 100))
}
