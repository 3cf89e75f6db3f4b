//! Process status: has a change been handled by every consumer that listens to it?
//!
//! Derived from the checkpoints, so every process answers the same:
//! - a consumer's watermark is the lowest checkpoint of its lanes; every event it selects at or
//!   below the watermark is handled (lanes move past other lanes' events too);
//! - an event's timestamp is the row's `timestamp_column` (default `updated_at`) when the table
//!   has such a timestamp column, else the commit time.
//!
//! `processed(entity, ts)` is true iff a change of `entity` with a timestamp at or after `ts` is
//! in the log, no change of `entity` with a timestamp at or below `ts` lies beyond the watermark
//! of a consumer listening to it, and none is parked. An entity no consumer listens to counts as
//! processed once logged.
//!
//! The `processed` channel (weir-server) walks the log behind the watermarks with
//! [`watermarks`] and [`processed_events`].

use std::time::{Duration, Instant};

use sqlx::PgPool;
use weir_core::{Lsn, Position};

use crate::{Result, store};

/// The newest timestamp (µs since the Unix epoch) among the recent events of `entity` handled
/// by every consumer listening to it; `None` when there is none.
pub async fn last_processed(pool: &PgPool, entity: &str, column: &str) -> Result<Option<i64>> {
    let ts = store::process::last_processed(pool, entity, column).await?;
    Ok(ts.map(|ts| ts.timestamp_micros()))
}

/// Whether every change of `entity` with a timestamp at or below `ts_us` (µs since the Unix
/// epoch) has been handled by every consumer listening to it.
///
/// True iff a change of `entity` with a timestamp at or after `ts_us` is in the log (the
/// write the caller made has been captured), no change of `entity` with a timestamp at or
/// below `ts_us` lies beyond the watermark of a consumer listening to it, and none is parked.
/// Timestamps need not rise with log position (an update may carry an older `updated_at`).
pub async fn processed(pool: &PgPool, entity: &str, ts_us: i64, column: &str) -> Result<bool> {
    store::process::processed(pool, entity, ts_us, column).await
}

/// The WAL position up to which every logged change has been handled by every consumer: a
/// writer that reads `pg_current_wal_insert_lsn()` after its commit can wait for it. (Not
/// `pg_current_wal_lsn()`: with `synchronous_commit = off` that write position can still be
/// behind the commit that just returned.)
pub async fn processed_lsn(pool: &PgPool) -> Result<Lsn> {
    let (beyond, source) = store::process::processed_lsn(pool).await?;
    let pick = beyond.or(source).unwrap_or_else(|| "0/0".into());
    Ok(pick.parse().unwrap_or(Lsn::ZERO))
}

/// Waits until [`processed_lsn`] reaches `lsn`, or `timeout` passes. Returns whether it did.
pub async fn wait_for(pool: &PgPool, lsn: Lsn, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if processed_lsn(pool).await? >= lsn {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The log head and every consumer's watermark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watermarks {
    /// The log's head position.
    pub head: Position,
    /// Each consumer's watermark, sorted.
    pub consumers: Vec<ConsumerWatermark>,
}

/// What one consumer listens to and how far it has handled all of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConsumerWatermark {
    /// The entities it listens to (empty: all).
    pub entities: Vec<String>,
    /// Every event it selects at or below this position is handled.
    pub watermark: Position,
}

impl ConsumerWatermark {
    /// Whether this consumer listens to `entity`.
    pub fn listens_to(&self, entity: &str) -> bool {
        self.entities.is_empty() || self.entities.iter().any(|e| e == entity)
    }
}

/// The watermarks; `None` when the consumer tables (or the log) do not exist yet.
pub async fn watermarks(pool: &PgPool) -> Result<Option<Watermarks>> {
    store::process::watermarks(pool).await
}

/// A logged event as the `processed` channel announces it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedEvent {
    /// Log position.
    pub position: Position,
    /// Entity.
    pub entity: String,
    /// Primary key.
    pub key: serde_json::Value,
    /// Kind (`insert`, …).
    pub kind: String,
    /// The commit's LSN.
    pub lsn: String,
    /// Whether a consumer ever parked it: read from the failures (outcome `park`), which are
    /// never deleted, not from `weir.parked`, whose row goes when the event is retried or
    /// discarded — so the live tail and a later replay agree on whether it is announced.
    pub parked: bool,
}

/// Logged events in (`after`, `upto`], at most `limit`, oldest first, with their parked flag.
pub async fn processed_events(
    pool: &PgPool,
    after: Position,
    upto: Position,
    limit: i64,
) -> Result<Vec<ProcessedEvent>> {
    store::process::processed_events(pool, after, upto, limit).await
}

/// For tests: forgets recorded failures and parked events and moves every checkpoint to the
/// log's head, so everything logged so far counts as processed.
#[cfg(feature = "testing")]
pub async fn reset(pool: &PgPool) -> Result<()> {
    store::process::reset(pool).await
}
