//! Watermark moves: a lane's checkpoint moved past events it does not handle (other lanes'
//! events, or nothing selected up to the head), so that the lowest checkpoint of a consumer
//! stays a watermark for process status. Every lane moves on almost every event at a live
//! rate; written one by one, a consumer with N lanes would commit N times per event. Here the
//! lanes of this process share one writer:
//!
//! ```text
//! lane ─► Marks::advance(lane, fence, position) ─► queued
//!         the writer's turn (one at a time): take everything queued ─► one UPDATE … FROM
//!         unnest(…), fenced per lane (rows locked in (consumer, lane) order) ─► answer each
//!         lane: moved, or its lease is gone
//! ```
//!
//! A lane that asks while a write is in flight is carried by the next one, so the writes
//! batch themselves under load and cost one statement when idle. The lane still waits for
//! its answer, as it did for its own write: nothing else in the lane changes.

use std::sync::Mutex;

use sqlx::PgPool;
use tokio::sync::oneshot;

use crate::{Result, store};

/// One lane's request.
#[derive(Clone)]
pub(crate) struct Mark {
    pub(crate) consumer: String,
    pub(crate) lane: i32,
    pub(crate) fence: i64,
    pub(crate) position: i64,
}

/// A queued request and where its answer goes.
struct Queued {
    id: u64,
    mark: Mark,
    answer: oneshot::Sender<bool>,
}

#[derive(Default)]
pub(crate) struct Marks {
    queued: Mutex<(u64, Vec<Queued>)>,
    writer: tokio::sync::Mutex<()>,
}

impl Marks {
    /// Moves the lane's checkpoint to `mark.position` (never backwards) while `node` holds its
    /// lease with `mark.fence`; false when the lease is gone.
    pub(crate) async fn advance(&self, pool: &PgPool, node: &str, mark: Mark) -> Result<bool> {
        let (mut id, mut rx) = self.queue(mark.clone());
        let _turn = self.writer.lock().await;
        // Carried by the write before this turn? (An answer is sent before the turn ends.)
        match rx.try_recv() {
            Ok(moved) => return Ok(moved),
            Err(oneshot::error::TryRecvError::Empty) => {}
            // Taken by a turn that was dropped mid-write (its task cancelled): queued again.
            Err(oneshot::error::TryRecvError::Closed) => id = self.queue(mark).0,
        }
        let batch = std::mem::take(&mut self.queued.lock().expect("marks").1);
        let marks: Vec<&Mark> = batch.iter().map(|q| &q.mark).collect();
        match store::lane::advance_marks(pool, node, &marks).await {
            Ok(moved) => {
                let mut own = false;
                for q in batch {
                    let held =
                        moved.iter().any(|(c, l)| *c == q.mark.consumer && *l == q.mark.lane);
                    if q.id == id {
                        own = held;
                    } else {
                        let _ = q.answer.send(held);
                    }
                }
                Ok(own)
            }
            Err(e) => {
                // This lane reports the error; the others are written in the next turn.
                let mut queued = self.queued.lock().expect("marks");
                queued.1.extend(batch.into_iter().filter(|q| q.id != id));
                Err(e)
            }
        }
    }

    /// Queues `mark`; returns its id and where its answer comes.
    fn queue(&self, mark: Mark) -> (u64, oneshot::Receiver<bool>) {
        let (answer, rx) = oneshot::channel();
        let mut queued = self.queued.lock().expect("marks");
        queued.0 += 1;
        let id = queued.0;
        queued.1.push(Queued { id, mark, answer });
        (id, rx)
    }
}
