//! The reads behind `weir status`, `/v1/consumers` and the parked-event commands.

use sqlx::PgPool;

use crate::Result;
use crate::state::ConsumerState;
use crate::status::{ConsumerStatus, LaneStatus, Parked};

/// Every consumer with its lanes, by name.
pub(crate) async fn consumers(pool: &PgPool, name: Option<&str>) -> Result<Vec<ConsumerStatus>> {
    let rows: Vec<ConsumerRow> = sqlx::query_as(
        "select k.name, k.state, k.halted_lane, k.halted_position, k.halted_attempt, k.halted_error,
                (select count(*) from weir.parked p where p.consumer = k.name), k.stopped_reason
         from weir.consumers k
         where $1::text is null or k.name = $1
         order by k.name",
    )
    .bind(name)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for (name, state, lane, position, attempt, error, parked, stopped_reason) in rows {
        let lanes: Vec<LaneStatus> = sqlx::query_as(
            "select c.lane,
                    -- a halted consumer halts all its lanes, whatever each last wrote; a
                    -- stopped one stops them, but a lane still finishing its page shows that
                    -- (running, retrying) until it has stopped
                    case when k.state = 'halted' then k.state
                         when k.state = 'stopped' and c.status not in ('running', 'retrying')
                             then k.state
                         else c.status end
                        as state,
                    c.position,
                    -- lag against the log head (every lane moves past other lanes' events)
                    greatest(coalesce((select max(position) from weir.source_state), 0) - c.position, 0)
                        as lag_events,
                    coalesce(extract(epoch from now() - (select e.commit_ts from weir.events e
                        where e.position > c.position order by e.position limit 1))::float8, 0)
                        as lag_seconds,
                    c.current_position, c.attempt, c.last_error, c.owner
             from weir.checkpoints c join weir.consumers k on k.name = c.consumer
             where c.consumer = $1
             order by c.lane",
        )
        .bind(&name)
        .fetch_all(pool)
        .await?;
        let halted = position.map(|p| {
            serde_json::json!({"lane": lane, "position": p, "attempt": attempt, "error": error})
        });
        out.push(ConsumerStatus { name, state, halted, parked, stopped_reason, lanes });
    }
    Ok(out)
}

/// name, state, halted lane, position, attempt, error, parked count, stopped reason.
type ConsumerRow = (
    String,
    ConsumerState,
    Option<i32>,
    Option<i64>,
    Option<i32>,
    Option<String>,
    i64,
    Option<String>,
);

/// Parked events of `consumer` (or of all), oldest first.
pub(crate) async fn parked(pool: &PgPool, consumer: Option<&str>) -> Result<Vec<Parked>> {
    Ok(sqlx::query_as(
        "select consumer, position, partition_key, entity, error, attempts, retry_requested
         from weir.parked
         where $1::text is null or consumer = $1
         order by consumer, position",
    )
    .bind(consumer)
    .fetch_all(pool)
    .await?)
}

/// The latest failures of `consumer`.
pub(crate) async fn failures(
    pool: &PgPool,
    consumer: &str,
    limit: i64,
) -> Result<Vec<crate::status::Failure>> {
    Ok(sqlx::query_as(
        "select lane, position, attempt, error, outcome, at
         from weir.consumer_failures
         where consumer = $1
         order by id desc
         limit $2",
    )
    .bind(consumer)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Asks for parked events to be retried (the lane that parked them picks the request up).
pub(crate) async fn request_retry(
    pool: &PgPool,
    consumer: &str,
    position: Option<i64>,
) -> Result<u64> {
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

/// Discards parked events; their key's later events flow again.
pub(crate) async fn discard(pool: &PgPool, consumer: &str, position: Option<i64>) -> Result<u64> {
    Ok(sqlx::query(
        "delete from weir.parked where consumer = $1 and ($2::bigint is null or position = $2)",
    )
    .bind(consumer)
    .bind(position)
    .execute(pool)
    .await?
    .rows_affected())
}
