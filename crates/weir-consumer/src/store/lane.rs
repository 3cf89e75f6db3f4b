//! What a lane writes: its fenced checkpoint, its live status, failed attempts and parked
//! events.

use sqlx::{PgConnection, PgPool};

use crate::Result;
use crate::state::{LaneState, Outcome};

pub(crate) async fn checkpoint_position(pool: &PgPool, consumer: &str, lane: i32) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "select position from weir.checkpoints where consumer = $1 and lane = $2",
    )
    .bind(consumer)
    .bind(lane)
    .fetch_one(pool)
    .await?)
}

/// A condition, true for every row, that makes the statement's transaction commit without
/// waiting for its WAL to reach the disk (`synchronous_commit = off` for that transaction
/// alone): for writes whose loss in a crash costs nothing but redoing them. Evaluated for the
/// rows the statement changes, which are the only reason its commit would wait.
macro_rules! no_flush_wait {
    () => {
        "set_config('synchronous_commit', 'off', true) is not null"
    };
}

/// The fenced checkpoint: moves the lane to `position` only while this process holds the lease
/// with `fence`. Returns false when the lease is gone (the caller must roll back).
pub(crate) async fn checkpoint(
    conn: &mut PgConnection,
    consumer: &str,
    lane: i32,
    node: &str,
    fence: i64,
    position: i64,
) -> Result<bool> {
    Ok(sqlx::query(
        "update weir.checkpoints
         -- never backwards; a handled event clears the retry status
         set position = greatest(position, $5), attempt = 0, last_error = null,
             current_position = null, updated_at = now()
         -- the fence: no row (so a rollback) once another process took the lane
         where consumer = $1 and lane = $2 and owner = $3 and fence = $4",
    )
    .bind(consumer)
    .bind(lane)
    .bind(node)
    .bind(fence)
    .bind(position)
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}

/// [`checkpoint`] for several lanes in one statement (`marks.rs`): each moves to its position
/// (never backwards) while `node` holds it with its fence. The rows are locked in
/// (consumer, lane) order, the order a re-split locks them in, so the two cannot deadlock.
/// Returns the (consumer, lane) pairs moved; a lane missing from them lost its lease.
///
/// Committed without waiting for the WAL flush (`no_flush_wait!`): these moves pass only
/// events the lane does not handle, so no effect depends on them; one lost in a crash is made
/// again when the lane reads past those events once more.
pub(crate) async fn advance_marks(
    pool: &PgPool,
    node: &str,
    marks: &[&crate::marks::Mark],
) -> Result<Vec<(String, i32)>> {
    let consumers: Vec<&str> = marks.iter().map(|m| m.consumer.as_str()).collect();
    let lanes: Vec<i32> = marks.iter().map(|m| m.lane).collect();
    let fences: Vec<i64> = marks.iter().map(|m| m.fence).collect();
    let positions: Vec<i64> = marks.iter().map(|m| m.position).collect();
    Ok(sqlx::query_as(concat!(
        "with m as (
             select * from unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[])
                 as m(consumer, lane, fence, position)
         ), held as (
             select c.consumer, c.lane, m.position from weir.checkpoints c
             join m on m.consumer = c.consumer and m.lane = c.lane and m.fence = c.fence
             where c.owner = $1 and ",
        no_flush_wait!(),
        "
             order by c.consumer, c.lane
             for update of c
         )
         update weir.checkpoints c
         set position = greatest(c.position, held.position), attempt = 0, last_error = null,
             current_position = null, updated_at = now()
         from held
         where c.consumer = held.consumer and c.lane = held.lane
         returning c.consumer, c.lane",
    ))
    .bind(node)
    .bind(consumers)
    .bind(lanes)
    .bind(fences)
    .bind(positions)
    .fetch_all(pool)
    .await?)
}

/// Live status of a lane (outside the handler's transaction).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn set_status(
    pool: &PgPool,
    consumer: &str,
    lane: i32,
    fence: i64,
    state: LaneState,
    current: Option<i64>,
    attempt: i32,
    error: Option<&str>,
) -> Result<()> {
    // Without waiting for the WAL flush (`no_flush_wait!`): the status is for people to read,
    // and the lane writes it again as it runs; what must survive a crash (failures, halts,
    // checkpoints of handled events) is written elsewhere, durably.
    sqlx::query(concat!(
        "update weir.checkpoints
         -- the last error stays visible until an event is handled
         set status = $4, current_position = $5, attempt = $6,
             last_error = coalesce($7, last_error), updated_at = now()
         where consumer = $1 and lane = $2 and fence = $3 and ",
        no_flush_wait!(),
    ))
    .bind(consumer)
    .bind(lane)
    .bind(fence)
    .bind(state)
    .bind(current)
    .bind(attempt)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a failed attempt and what became of it (in the caller's transaction when the
/// outcome moves the checkpoint too).
pub(crate) async fn record_failure(
    conn: &mut PgConnection,
    consumer: &str,
    lane: i32,
    position: i64,
    attempt: i32,
    error: &str,
    outcome: Outcome,
) -> Result<()> {
    sqlx::query(
        "insert into weir.consumer_failures (consumer, lane, position, attempt, error, outcome)
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(consumer)
    .bind(lane)
    .bind(position)
    .bind(attempt)
    .bind(error)
    .bind(outcome)
    .execute(conn)
    .await?;
    Ok(())
}

/// Parks an event (in the transaction that moves the checkpoint past it).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn park(
    conn: &mut PgConnection,
    consumer: &str,
    lane: i32,
    position: i64,
    key: &str,
    entity: &str,
    error: &str,
    attempts: i32,
) -> Result<()> {
    sqlx::query(
        "insert into weir.parked
             (consumer, position, lane, partition_key, entity, error, attempts, retry_requested)
         -- parked behind its key while a retry of the key is asked for: asked for too (it
         -- arrived after the request, and belongs to the replay of the key)
         values ($1, $2, $3, $4, $5, $6, $7,
                 exists (select 1 from weir.parked
                         where consumer = $1 and partition_key = $4 and retry_requested))
         -- parked again after a failed retry: the latest error, and no retry pending
         on conflict (consumer, position) do update
         set error = excluded.error, attempts = excluded.attempts, retry_requested = false",
    )
    .bind(consumer)
    .bind(position)
    .bind(lane)
    .bind(key)
    .bind(entity)
    .bind(error)
    .bind(attempts)
    .execute(conn)
    .await?;
    Ok(())
}

/// Whether an earlier event of `key` is parked (so this one must wait behind it).
pub(crate) async fn key_parked(pool: &PgPool, consumer: &str, key: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "select exists (select 1 from weir.parked where consumer = $1 and partition_key = $2)",
    )
    .bind(consumer)
    .bind(key)
    .fetch_one(pool)
    .await?)
}

/// Whether any event of this lane is parked: one look per page of events, so a lane without
/// parked events never asks [`key_parked`] per event.
pub(crate) async fn lane_has_parked(pool: &PgPool, consumer: &str, lane: i32) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "select exists (select 1 from weir.parked where consumer = $1 and lane = $2)",
    )
    .bind(consumer)
    .bind(lane)
    .fetch_one(pool)
    .await?)
}

/// Parked events of this lane that someone asked to retry, oldest first: (position, key).
pub(crate) async fn retry_requests(
    pool: &PgPool,
    consumer: &str,
    lane: i32,
) -> Result<Vec<(i64, String)>> {
    Ok(sqlx::query_as(
        "select p.position, p.partition_key from weir.parked p
         where p.consumer = $1 and p.lane = $2 and p.retry_requested
           -- never ahead of an older parked event of its key that is not being retried
           -- (one whose retry failed): the key's order holds
           and not exists (select 1 from weir.parked q
                           where q.consumer = p.consumer and q.partition_key = p.partition_key
                             and q.position < p.position and not q.retry_requested)
         order by p.position",
    )
    .bind(consumer)
    .bind(lane)
    .fetch_all(pool)
    .await?)
}

/// Forgets a parked event: retried successfully (in the handler's transaction), or dropped by
/// retention before it could be.
pub(crate) async fn unpark(conn: &mut PgConnection, consumer: &str, position: i64) -> Result<()> {
    sqlx::query("delete from weir.parked where consumer = $1 and position = $2")
        .bind(consumer)
        .bind(position)
        .execute(conn)
        .await?;
    Ok(())
}

/// A retry of a parked event failed: it stays parked with the new error, no retry pending.
pub(crate) async fn retry_failed(
    pool: &PgPool,
    consumer: &str,
    position: i64,
    error: &str,
) -> Result<()> {
    sqlx::query(
        "update weir.parked set retry_requested = false, attempts = attempts + 1, error = $3
         where consumer = $1 and position = $2",
    )
    .bind(consumer)
    .bind(position)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}
