//! The consumers' rows as the lanes of one process see them: state and a re-split's drain
//! position, read from `weir.consumers` at most once per [`FRESH`] for all the lanes of a
//! consumer, instead of by every lane before every page.
//!
//! ```text
//! lane, before a page ─► View::state(consumer): read within FRESH? ─► that
//!                                               └► one lane reads (the others wait for it)
//! lane that halts or stops its consumer ─► View::forget(consumer): the next asks the database
//! ```
//!
//! Nothing depends on the view being current for correctness: a lane that still sees
//! `running` for up to [`FRESH`] after a stop or a halt elsewhere only handles what it would
//! have handled had the stop come a moment later; the checks that must hold are made in the
//! handling transaction itself (the fenced checkpoint, a re-split's drain position), and the
//! lanes of this process learn of a halt here at once (`Shared::halted`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::state::ConsumerState;
use crate::{Result, store};

/// How long a read of a consumer's row serves the lanes of this process.
pub(crate) const FRESH: Duration = Duration::from_millis(50);

/// A consumer's row: its state and, while a re-split is in progress, the drain position.
pub(crate) type Row = (ConsumerState, Option<i64>);

#[derive(Default)]
pub(crate) struct View {
    rows: tokio::sync::Mutex<HashMap<String, (Instant, Row)>>,
}

impl View {
    /// The consumer's row, read within the last [`FRESH`].
    pub(crate) async fn state(&self, pool: &PgPool, consumer: &str) -> Result<Row> {
        // Held across the read: the lanes asking meanwhile take its answer.
        let mut rows = self.rows.lock().await;
        if let Some((at, row)) = rows.get(consumer)
            && at.elapsed() < FRESH
        {
            return Ok(*row);
        }
        let row = store::consumer::state(pool, consumer).await?;
        rows.insert(consumer.to_string(), (Instant::now(), row));
        Ok(row)
    }

    /// Forgets what was read of the consumer (this process just changed its row).
    pub(crate) async fn forget(&self, consumer: &str) {
        self.rows.lock().await.remove(consumer);
    }
}
