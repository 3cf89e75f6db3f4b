//! Processes and lane leases: what the supervisor reads and writes every tick.
//!
//! A lease is `(owner, lease_until, fence)` on a lane's checkpoint row. Taking a lane bumps
//! its fence, so whatever the previous holder still tries to write (fenced on the old value)
//! finds no row.

use std::collections::HashMap;

use sqlx::PgPool;

use crate::Result;
use crate::state::LaneState;

/// Records that `node` is alive and runs `consumers`; returns, per consumer, how many live
/// processes (heartbeat in the last 10 s) run it.
pub(crate) async fn heartbeat(
    pool: &PgPool,
    node: &str,
    consumers: &[String],
) -> Result<HashMap<String, i64>> {
    sqlx::query(
        "insert into weir.consumer_nodes (node, consumers) values ($1, $2)
         on conflict (node) do update set heartbeat_at = now(), consumers = excluded.consumers",
    )
    .bind(node)
    .bind(consumers)
    .execute(pool)
    .await?;
    // Forget the long dead.
    sqlx::query("delete from weir.consumer_nodes where heartbeat_at < now() - interval '1 hour'")
        .execute(pool)
        .await?;
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "select c, count(*) from weir.consumer_nodes n, unnest(n.consumers) c
         where n.heartbeat_at > now() - interval '10 seconds'
         group by c",
    )
    .fetch_all(pool)
    .await?;
    Ok(counts.into_iter().collect())
}

/// Releases every lane `node` holds and forgets the process (a graceful stop).
pub(crate) async fn leave(pool: &PgPool, node: &str) -> Result<()> {
    sqlx::query(
        // Rows locked in (consumer, lane) order, as every statement that locks several lanes does.
        "with l as (select consumer, lane from weir.checkpoints where owner = $1
                    order by consumer, lane for update)
         update weir.checkpoints c set owner = null, lease_until = null, status = $2
         from l where c.consumer = l.consumer and c.lane = l.lane",
    )
    .bind(node)
    .bind(LaneState::Idle)
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
           -- free, expired, or ours already (a restarted lane task of this process)
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

/// Gives a lane back (rebalancing), if this process still holds it with `fence`.
pub(crate) async fn release(
    pool: &PgPool,
    consumer: &str,
    lane: i32,
    node: &str,
    fence: i64,
) -> Result<()> {
    sqlx::query(
        "update weir.checkpoints set owner = null, lease_until = null, status = $5
         where consumer = $1 and lane = $2 and owner = $3 and fence = $4",
    )
    .bind(consumer)
    .bind(lane)
    .bind(node)
    .bind(fence)
    .bind(LaneState::Idle)
    .execute(pool)
    .await?;
    Ok(())
}
