//! Retention: whole partitions of `weir.events` whose newest event is older than the retention
//! period are dropped — cheap, no dead tuples. The partition holding the head is always kept,
//! so the log never loses its last position, and so is every partition holding an event some
//! consumer still needs (`needed_from`, which the caller computes: consumers live in the
//! crates above this one). A halted or stopped consumer therefore holds the log, not the
//! server's WAL: the slot keeps moving, the log keeps what the consumer will read when it
//! resumes, and the report says who holds what.
//!
//! ```text
//! partitions in position order:  [1, 1M)  [1M, 2M)  [2M, 3M) ← head
//!   dropped while: not the head's  and  newest commit_ts < now − retention
//!                                  and  every position < needed_from
//!   the first partition that fails a test ends the pass (older ones are gone already)
//! ```

use std::time::Duration;

use sqlx::PgPool;

use crate::Result;

/// What a retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Partitions dropped.
    pub dropped: Vec<String>,
    /// Oldest position still in the log after the pass.
    pub oldest_position: Option<i64>,
    /// Partitions kept only because a consumer still needs them (older than `retention`, not
    /// the head's): the positions they cover, `[from, to)`.
    pub held: Option<(i64, i64)>,
}

/// Drops partitions whose newest `commit_ts` is older than `retention`, keeping the head's
/// and every one holding a position at or after `needed_from` (the lowest position a consumer
/// has not handled yet; `None` when no consumer needs anything).
pub async fn enforce_retention(
    pool: &PgPool,
    retention: Duration,
    needed_from: Option<i64>,
) -> Result<RetentionReport> {
    let partitions: Vec<(String, i64)> = sqlx::query_as(
        "select c.relname::text,
                coalesce(substring(pg_get_expr(c.relpartbound, c.oid) from 'FROM \\(''?(\\d+)')::bigint, 0)
         from pg_inherits i join pg_class c on c.oid = i.inhrelid
         where i.inhparent = 'weir.events'::regclass
         order by 2",
    )
    .fetch_all(pool)
    .await?;
    let head: Option<i64> =
        sqlx::query_scalar("select max(position) from weir.source_state").fetch_one(pool).await?;
    let head = head.unwrap_or(0);
    let cutoff = chrono::Utc::now()
        - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(36_500));
    let mut dropped = Vec::new();
    let mut held = None;
    for (i, (name, lo)) in partitions.iter().enumerate() {
        let next_lo = partitions.get(i + 1).map(|p| p.1);
        // The partition that holds (or will next hold) the head stays.
        let Some(hi) = next_lo.filter(|&n| n <= head) else {
            break;
        };
        let old = older_than(pool, name, cutoff).await?;
        if old && needed_from.is_some_and(|n| n < hi) {
            // Old enough, but a consumer has not handled all of it: it stays, and so do the
            // newer ones. Report the whole run of old partitions it holds.
            let mut to = hi;
            for (j, (later, _)) in partitions.iter().enumerate().skip(i + 1) {
                let Some(later_hi) = partitions.get(j + 1).map(|p| p.1).filter(|&n| n <= head)
                else {
                    break;
                };
                if !older_than(pool, later, cutoff).await? {
                    break;
                }
                to = later_hi;
            }
            held = Some((*lo, to));
            break;
        }
        if old {
            sqlx::query(sqlx::AssertSqlSafe(format!("drop table weir.\"{name}\"")))
                .execute(pool)
                .await?;
            tracing::info!(partition = %name, "retention dropped a log partition");
            dropped.push(name.clone());
        } else {
            break;
        }
    }
    let oldest_position =
        sqlx::query_scalar("select min(position) from weir.events").fetch_one(pool).await?;
    Ok(RetentionReport { dropped, oldest_position, held })
}

/// Whether every event of the partition `name` committed before `cutoff` (true when empty).
async fn older_than(
    pool: &PgPool,
    name: &str,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<bool> {
    let newest: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(sqlx::AssertSqlSafe(
        format!("select max(commit_ts) from weir.\"{name}\""),
    ))
    .fetch_one(pool)
    .await?;
    Ok(newest.is_none_or(|ts| ts < cutoff))
}
