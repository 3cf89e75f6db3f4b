//! The consumer engine's SQL, in one place.

use sqlx::{PgConnection, PgPool};

use crate::Result;

/// Creates the consumer's row and its lanes' checkpoints; refuses a changed lane count.
pub(crate) async fn register(
    pool: &PgPool,
    name: &str,
    lanes: i32,
    ordering: &str,
    entities: &[String],
    kinds: &[String],
    start: i64,
) -> Result<()> {
    let mut tx = pool.begin().await?;
    // Two processes may register the same new consumer at once: the insert is idempotent, and
    // the row lock below orders them.
    sqlx::query(
        "insert into weir.consumers (name, lanes, ordering, entities, kinds)
         values ($1, $2, $3, $4, $5) on conflict (name) do nothing",
    )
    .bind(name)
    .bind(lanes)
    .bind(ordering)
    .bind(entities)
    .bind(kinds)
    .execute(&mut *tx)
    .await?;
    let stored: i32 =
        sqlx::query_scalar("select lanes from weir.consumers where name = $1 for update")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
    if stored != lanes {
        return Err(crate::Error::Config(format!(
            "consumer `{name}` has {stored} lanes in the database and {lanes} configured; changing \
             the lane count would reorder keys. Keep {stored}, or pick a new consumer name"
        )));
    }
    sqlx::query(
        "update weir.consumers set entities = $2, kinds = $3, ordering = $4 where name = $1",
    )
    .bind(name)
    .bind(entities)
    .bind(kinds)
    .bind(ordering)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into weir.checkpoints (consumer, lane, position)
         select $1, l, $3 from generate_series(0, $2 - 1) l
         on conflict (consumer, lane) do nothing",
    )
    .bind(name)
    .bind(lanes)
    .bind(start)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(crate) async fn heartbeat(pool: &PgPool, node: &str) -> Result<i64> {
    sqlx::query(
        "insert into weir.consumer_nodes (node) values ($1)
         on conflict (node) do update set heartbeat_at = now()",
    )
    .bind(node)
    .execute(pool)
    .await?;
    // Live processes; forget the long dead.
    sqlx::query("delete from weir.consumer_nodes where heartbeat_at < now() - interval '1 hour'")
        .execute(pool)
        .await?;
    Ok(sqlx::query_scalar(
        "select count(*) from weir.consumer_nodes where heartbeat_at > now() - interval '10 seconds'",
    )
    .fetch_one(pool)
    .await?)
}

pub(crate) async fn leave(pool: &PgPool, node: &str) -> Result<()> {
    sqlx::query("update weir.checkpoints set owner = null, lease_until = null, status = 'idle' where owner = $1")
        .bind(node)
        .execute(pool)
        .await?;
    sqlx::query("delete from weir.consumer_nodes where node = $1").bind(node).execute(pool).await?;
    Ok(())
}

/// Takes a free or expired lane; returns its new fence.
pub(crate) async fn try_lease(
    pool: &PgPool,
    consumer: &str,
    lane: i32,
    node: &str,
    ttl_s: f64,
) -> Result<Option<i64>> {
    Ok(sqlx::query_scalar(
        "update weir.checkpoints
         set owner = $3, lease_until = now() + make_interval(secs => $4), fence = fence + 1
         where consumer = $1 and lane = $2
           and (owner is null or lease_until < now() or owner = $3)
         returning fence",
    )
    .bind(consumer)
    .bind(lane)
    .bind(node)
    .bind(ttl_s)
    .fetch_optional(pool)
    .await?)
}

/// Extends a held lease; false when it was lost (taken over after expiry).
pub(crate) async fn renew(
    pool: &PgPool,
    consumer: &str,
    lane: i32,
    node: &str,
    fence: i64,
    ttl_s: f64,
) -> Result<bool> {
    Ok(sqlx::query(
        "update weir.checkpoints set lease_until = now() + make_interval(secs => $5)
         where consumer = $1 and lane = $2 and owner = $3 and fence = $4",
    )
    .bind(consumer)
    .bind(lane)
    .bind(node)
    .bind(fence)
    .bind(ttl_s)
    .execute(pool)
    .await?
    .rows_affected()
        == 1)
}

pub(crate) async fn release(
    pool: &PgPool,
    consumer: &str,
    lane: i32,
    node: &str,
    fence: i64,
) -> Result<()> {
    sqlx::query(
        "update weir.checkpoints set owner = null, lease_until = null, status = 'idle'
         where consumer = $1 and lane = $2 and owner = $3 and fence = $4",
    )
    .bind(consumer)
    .bind(lane)
    .bind(node)
    .bind(fence)
    .execute(pool)
    .await?;
    Ok(())
}

pub(crate) async fn checkpoint_position(pool: &PgPool, consumer: &str, lane: i32) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "select position from weir.checkpoints where consumer = $1 and lane = $2",
    )
    .bind(consumer)
    .bind(lane)
    .fetch_one(pool)
    .await?)
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
         set position = greatest(position, $5), attempt = 0, last_error = null,
             current_position = null, updated_at = now()
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

/// Live status of a lane (outside the handler's transaction).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn set_status(
    pool: &PgPool,
    consumer: &str,
    lane: i32,
    fence: i64,
    status: &str,
    current: Option<i64>,
    attempt: i32,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "update weir.checkpoints
         set status = $4, current_position = $5, attempt = $6, last_error = coalesce($7, last_error),
             updated_at = now()
         where consumer = $1 and lane = $2 and fence = $3",
    )
    .bind(consumer)
    .bind(lane)
    .bind(fence)
    .bind(status)
    .bind(current)
    .bind(attempt)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

pub(crate) async fn record_failure(
    conn: &mut PgConnection,
    consumer: &str,
    lane: i32,
    position: i64,
    attempt: i32,
    error: &str,
    outcome: &str,
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

pub(crate) async fn halt(
    pool: &PgPool,
    consumer: &str,
    lane: i32,
    position: i64,
    attempt: i32,
    error: &str,
) -> Result<()> {
    sqlx::query(
        "update weir.consumers
         set state = 'halted', halted_lane = $2, halted_position = $3, halted_attempt = $4,
             halted_error = $5, halted_at = now()
         where name = $1",
    )
    .bind(consumer)
    .bind(lane)
    .bind(position)
    .bind(attempt)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

pub(crate) async fn is_halted(pool: &PgPool, consumer: &str) -> Result<bool> {
    Ok(sqlx::query_scalar::<_, String>("select state from weir.consumers where name = $1")
        .bind(consumer)
        .fetch_one(pool)
        .await?
        == "halted")
}

pub(crate) async fn resume(pool: &PgPool, name: &str) -> Result<bool> {
    // One statement: whether it exists, and whether it was halted before this update.
    let was_halted: Option<bool> = sqlx::query_scalar(
        "with old as (select name, state = 'halted' as halted from weir.consumers
                      where name = $1 for update),
              upd as (update weir.consumers c set state = 'running', halted_lane = null,
                          halted_position = null, halted_attempt = null, halted_error = null,
                          halted_at = null
                      from old where c.name = old.name and old.halted returning c.name)
         select halted from old",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?;
    was_halted.ok_or_else(|| crate::Error::UnknownConsumer(name.to_string()))
}

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
        "insert into weir.parked (consumer, position, lane, partition_key, entity, error, attempts)
         values ($1, $2, $3, $4, $5, $6, $7)
         on conflict (consumer, position) do update set error = excluded.error, attempts = excluded.attempts,
            retry_requested = false",
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

pub(crate) async fn key_parked(pool: &PgPool, consumer: &str, key: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "select exists (select 1 from weir.parked where consumer = $1 and partition_key = $2)",
    )
    .bind(consumer)
    .bind(key)
    .fetch_one(pool)
    .await?)
}

/// Parked events of this lane that someone asked to retry, oldest first.
pub(crate) async fn retry_requests(
    pool: &PgPool,
    consumer: &str,
    lane: i32,
) -> Result<Vec<(i64, String)>> {
    Ok(sqlx::query_as(
        "select position, partition_key from weir.parked
         where consumer = $1 and lane = $2 and retry_requested order by position",
    )
    .bind(consumer)
    .bind(lane)
    .fetch_all(pool)
    .await?)
}

/// Skips the event a halted consumer stopped on: records it as skipped, moves that lane's
/// checkpoint past it and resumes. Returns the skipped position.
pub(crate) async fn skip_halted(pool: &PgPool, name: &str) -> Result<i64> {
    let mut tx = pool.begin().await?;
    let row: Option<HaltedRow> = sqlx::query_as(
        "select state, halted_lane, halted_position, halted_attempt, halted_error
         from weir.consumers where name = $1 for update",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((state, Some(lane), Some(position), attempt, error)) = row.clone() else {
        return Err(match row {
            None => crate::Error::UnknownConsumer(name.to_string()),
            Some((state, ..)) => {
                crate::Error::Config(format!("consumer `{name}` is not halted (it is {state})"))
            }
        });
    };
    let _ = state;
    record_failure(
        &mut tx,
        name,
        lane,
        position,
        attempt.unwrap_or(0),
        &error.unwrap_or_default(),
        "skip",
    )
    .await?;
    sqlx::query("update weir.checkpoints set position = greatest(position, $3) where consumer = $1 and lane = $2")
        .bind(name)
        .bind(lane)
        .bind(position)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    resume(pool, name).await?;
    Ok(position)
}

/// state, halted lane, position, attempt, error.
type HaltedRow = (String, Option<i32>, Option<i64>, Option<i32>, Option<String>);
