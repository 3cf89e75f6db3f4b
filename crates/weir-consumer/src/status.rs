//! Status of consumers and their lanes, read from the database (every process answers the
//! same): state, position, lag in events and seconds, current event, attempt, last error.

use serde::Serialize;
use sqlx::PgPool;

use crate::Result;

/// One lane.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow, utoipa::ToSchema)]
pub struct LaneStatus {
    /// Lane number.
    pub lane: i32,
    /// `running`, `retrying`, `idle` or `halted`.
    pub state: String,
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
    /// `running` or `halted`.
    pub state: String,
    /// Where it halted: `{lane, position, attempt, error}`.
    pub halted: Option<serde_json::Value>,
    /// Parked events.
    pub parked: i64,
    /// Its lanes.
    pub lanes: Vec<LaneStatus>,
}

/// The status of every consumer.
pub async fn consumers(pool: &PgPool) -> Result<Vec<ConsumerStatus>> {
    let rows: Vec<ConsumerRow> = sqlx::query_as(
        "select k.name, k.state, k.halted_lane, k.halted_position, k.halted_attempt, k.halted_error,
                (select count(*) from weir.parked p where p.consumer = k.name)
         from weir.consumers k order by k.name",
    )
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for (name, state, lane, position, attempt, error, parked) in rows {
        let lanes: Vec<LaneStatus> = sqlx::query_as(
            "select c.lane, case when k.state = 'halted' then 'halted' else c.status end as state,
                    c.position,
                    greatest(coalesce((select max(position) from weir.source_state), 0) - c.position, 0) as lag_events,
                    coalesce(extract(epoch from now() - (select e.commit_ts from weir.events e
                        where e.position > c.position order by e.position limit 1))::float8, 0) as lag_seconds,
                    c.current_position, c.attempt, c.last_error, c.owner
             from weir.checkpoints c join weir.consumers k on k.name = c.consumer
             where c.consumer = $1 order by c.lane",
        )
        .bind(&name)
        .fetch_all(pool)
        .await?;
        let halted = position.map(|p| {
            serde_json::json!({"lane": lane, "position": p, "attempt": attempt, "error": error})
        });
        out.push(ConsumerStatus { name, state, halted, parked, lanes });
    }
    Ok(out)
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
    Ok(sqlx::query_as(
        "select consumer, position, partition_key, entity, error, attempts, retry_requested
         from weir.parked where $1::text is null or consumer = $1 order by consumer, position",
    )
    .bind(consumer)
    .fetch_all(pool)
    .await?)
}

/// Asks for parked events to be retried (all of `consumer`'s, or one position). Returns how many.
pub async fn retry_parked(pool: &PgPool, consumer: &str, position: Option<i64>) -> Result<u64> {
    Ok(sqlx::query(
        "update weir.parked set retry_requested = true
         where consumer = $1 and ($2::bigint is null or position = $2)",
    )
    .bind(consumer)
    .bind(position)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Discards parked events (all of `consumer`'s, or one position). Returns how many.
pub async fn discard_parked(pool: &PgPool, consumer: &str, position: Option<i64>) -> Result<u64> {
    Ok(sqlx::query(
        "delete from weir.parked where consumer = $1 and ($2::bigint is null or position = $2)",
    )
    .bind(consumer)
    .bind(position)
    .execute(pool)
    .await?
    .rows_affected())
}

/// name, state, halted lane, position, attempt, error, parked count.
type ConsumerRow = (String, String, Option<i32>, Option<i64>, Option<i32>, Option<String>, i64);
