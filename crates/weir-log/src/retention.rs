//! Retention: whole partitions of `weir.events` whose newest event is older than the retention
//! period are dropped — cheap, no dead tuples. The partition holding the head is always kept,
//! so the log never loses its last position.

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
}

/// Drops partitions whose newest `commit_ts` is older than `retention`.
pub async fn enforce_retention(pool: &PgPool, retention: Duration) -> Result<RetentionReport> {
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
    for (i, (name, _lo)) in partitions.iter().enumerate() {
        let next_lo = partitions.get(i + 1).map(|p| p.1);
        // The partition that holds (or will next hold) the head stays.
        if next_lo.is_none_or(|n| n > head) {
            break;
        }
        let newest: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            sqlx::AssertSqlSafe(format!("select max(commit_ts) from weir.\"{name}\"")),
        )
        .fetch_one(pool)
        .await?;
        if newest.is_none_or(|ts| ts < cutoff) {
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
    Ok(RetentionReport { dropped, oldest_position })
}
