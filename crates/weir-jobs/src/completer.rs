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

/// How far a batch has been written.
#[derive(Debug, Default)]
struct Progress {
    /// The batch's completions are in.
    completions_written: bool,
    /// Outcomes before this index are in (or were not for the database).
    next: usize,
}

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
            // What a failed try already wrote is not written (nor counted) again.
            let mut progress = Progress::default();
            loop {
                match self.write(&batch, &mut progress).await {
                    Ok(()) => break,
                    Err(e) if tries < WRITE_TRIES => {
                        tries += 1;
                        let wait = WRITE_RETRY.delay(tries);
                        let transient = weir_log::sqlstate::is_transient(&e);
                        warn!(error = %e, transient, ?wait, "writing job outcomes failed; retrying");
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

    /// Writes `batch` from where `progress` says an earlier try stopped: the completions in
    /// one statement, then each other outcome in its own. Figures are counted once a statement
    /// has taken effect, so a retried batch counts each outcome once.
    async fn write(&self, batch: &[Finished], progress: &mut Progress) -> sqlx::Result<()> {
        let mut conn = self.shared.pool.acquire().await?;
        let metrics = &self.shared.metrics;
        let counters = |q: &str| metrics.queue(q).expect("queue has counters");
        let done: Vec<&Finished> =
            batch.iter().filter(|f| matches!(f.outcome, Outcome::Completed)).collect();
        if !done.is_empty() && !progress.completions_written {
            let ids: Vec<i64> = done.iter().map(|f| f.id).collect();
            let attempts: Vec<i32> = done.iter().map(|f| f.attempt).collect();
            let completed =
                store::complete(&mut conn, &ids, &attempts, self.shared.config.keep_completed)
                    .await?;
            progress.completions_written = true;
            counters(&done[0].queue).completion_written();
            for f in &done {
                if completed.contains(&f.id) {
                    counters(&f.queue).completed(1);
                } else {
                    self.fenced(f);
                }
            }
        }
        for (i, f) in batch.iter().enumerate().skip(progress.next) {
            let c = counters(&f.queue);
            let now = Utc::now();
            let ok = match &f.outcome {
                // Written above, in the batch's one statement.
                Outcome::Completed => true,
                Outcome::CompletedInTx => {
                    c.completed(1);
                    true
                }
                Outcome::Cancelled => {
                    debug!(id = f.id, "job cancelled while running");
                    true
                }
                Outcome::Failed { error, .. } if f.attempt >= f.max_attempts => {
                    let ok = store::discard(&mut conn, f.id, f.attempt, error).await?;
                    c.discarded(true);
                    ok
                }
                Outcome::Failed { error, retry_in } => {
                    debug!(id = f.id, attempt = f.attempt, error, "job attempt failed");
                    let ok = store::retry(
                        &mut conn,
                        f.id,
                        f.attempt,
                        error,
                        now + chrono_duration(*retry_in),
                    )
                    .await?;
                    c.retried();
                    ok
                }
                Outcome::Discard(error) => {
                    let ok = store::discard(&mut conn, f.id, f.attempt, error).await?;
                    c.discarded(false);
                    ok
                }
                Outcome::Snooze(d) => {
                    let ok = store::put_back(
                        &mut conn,
                        f.id,
                        f.attempt,
                        now + chrono_duration(*d),
                        None,
                    )
                    .await?;
                    c.snoozed();
                    ok
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
            progress.next = i + 1;
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
