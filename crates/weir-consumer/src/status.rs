//! Status of consumers and their lanes, read from the database (every process answers the
//! same): state, position, lag in events and seconds, current event, attempt, last error.

use serde::Serialize;
use sqlx::PgPool;

use crate::state::{ConsumerState, LaneState};
use crate::{Result, store};

/// One lane.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow, utoipa::ToSchema)]
pub struct LaneStatus {
    /// Lane number.
    pub lane: i32,
    /// `running`, `retrying`, `idle`, `halted` or `stopped`.
    pub state: LaneState,
    /// Every event of this lane at or below it is handled.
    pub position: i64,
    /// Events in the log after `position` (of any lane).
    pub lag_events: i64,
    /// Age of the oldest event after `position`, in seconds (0 when caught up).
    pub lag_seconds: f64,
    /// The event being retried.
    pub current_position: Option<i64>,
    /// Attempt at the current event.
    pub attempt: i32,
    /// Last error.
    pub last_error: Option<String>,
    /// The process holding the lane.
    pub owner: Option<String>,
}

/// One consumer.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ConsumerStatus {
    /// Name.
    pub name: String,
    /// `running`, `halted` or `stopped`.
    pub state: ConsumerState,
    /// Where it halted: `{lane, position, attempt, error}`.
    pub halted: Option<serde_json::Value>,
    /// Parked events.
    pub parked: i64,
    /// Why it is stopped, when its handler stopped it (a webhook receiver answered `410
    /// Gone`); `None` when someone stopped it or it runs.
    pub stopped_reason: Option<String>,
    /// Its lanes.
    pub lanes: Vec<LaneStatus>,
}

/// The status of every consumer.
pub async fn consumers(pool: &PgPool) -> Result<Vec<ConsumerStatus>> {
    store::status::consumers(pool, None).await
}

/// The status of one consumer (`None` when there is none by that name).
pub async fn consumer(pool: &PgPool, name: &str) -> Result<Option<ConsumerStatus>> {
    Ok(store::status::consumers(pool, Some(name)).await?.pop())
}

/// A parked event.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow, utoipa::ToSchema)]
pub struct Parked {
    /// Consumer.
    pub consumer: String,
    /// Log position.
    pub position: i64,
    /// Its partition key.
    pub partition_key: String,
    /// Entity.
    pub entity: String,
    /// Last error.
    pub error: String,
    /// Attempts so far.
    pub attempts: i32,
    /// A retry was asked for and is pending.
    pub retry_requested: bool,
}

/// Parked events of `consumer` (or of all), oldest first.
pub async fn parked(pool: &PgPool, consumer: Option<&str>) -> Result<Vec<Parked>> {
    store::status::parked(pool, consumer).await
}

/// A failed attempt, as recorded (`weir.consumer_failures`).
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow, utoipa::ToSchema)]
pub struct Failure {
    /// The lane that failed.
    pub lane: i32,
    /// The event's log position.
    pub position: i64,
    /// The attempt, from 1.
    pub attempt: i32,
    /// The error.
    pub error: String,
    /// What became of it: `retry`, `halt`, `skip`, `park` or `stop`.
    pub outcome: crate::state::Outcome,
    /// When.
    pub at: chrono::DateTime<chrono::Utc>,
}

/// `consumer`'s latest failed attempts, newest first, at most `limit`.
pub async fn failures(pool: &PgPool, consumer: &str, limit: i64) -> Result<Vec<Failure>> {
    store::status::failures(pool, consumer, limit).await
}

/// Asks for parked events to be retried (all of `consumer`'s, or one position). Returns how many.
pub async fn retry_parked(pool: &PgPool, consumer: &str, position: Option<i64>) -> Result<u64> {
    store::status::request_retry(pool, consumer, position).await
}

/// Discards parked events (all of `consumer`'s, or one position). Returns how many.
pub async fn discard_parked(pool: &PgPool, consumer: &str, position: Option<i64>) -> Result<u64> {
    store::status::discard(pool, consumer, position).await
}
