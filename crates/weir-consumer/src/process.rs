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

use std::time::{Duration, Instant};

use sqlx::PgPool;
use weir_core::Lsn;

use crate::Result;

/// The event's timestamp as SQL, for `e` joined with its relation `r`; `$2` is the column name.
const TS: &str = "coalesce(
        case when r.columns ->> $2 in ('timestamptz', 'timestamp')
             then (coalesce(e.new_record, e.old_record) ->> $2)::timestamptz end,
        e.commit_ts)";

/// Consumers listening to `$1` and their watermarks.
const WATERMARKS: &str = "select k.name, min(c.position) as w
        from weir.consumers k join weir.checkpoints c on c.consumer = k.name
        where $1 = any(k.entities) or cardinality(k.entities) = 0
        group by k.name";

fn us(ts: chrono::DateTime<chrono::Utc>) -> i64 {
    ts.timestamp_micros()
}

/// How many recent events of an entity the timestamp look-ups scan (newest first).
const RECENT: i64 = 100_000;

/// The newest timestamp (µs since the Unix epoch) among the recent events of `entity` handled
/// by every consumer listening to it; `None` when there is none.
pub async fn last_processed(pool: &PgPool, entity: &str, column: &str) -> Result<Option<i64>> {
    let sql = format!(
        "with w as ({WATERMARKS})
         select max(ts) from (
             select {TS} as ts from weir.events e left join weir.relations r on r.id = e.relation_id
             where e.entity = $1
               and e.position <= coalesce((select min(w) from w), (select max(position) from weir.source_state))
             order by e.position desc limit {RECENT}
         ) x"
    );
    let ts: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(entity)
        .bind(column)
        .fetch_one(pool)
        .await?;
    Ok(ts.map(us))
}

/// Whether every change of `entity` with a timestamp at or below `ts_us` (µs since the Unix
/// epoch) has been handled by every consumer listening to it.
///
/// True iff a change of `entity` with a timestamp at or after `ts_us` is in the log (the
/// write the caller made has been captured), no change of `entity` with a timestamp at or
/// below `ts_us` lies beyond the watermark of a consumer listening to it, and none is parked.
/// Timestamps need not rise with log position (an update may carry an older `updated_at`).
pub async fn processed(pool: &PgPool, entity: &str, ts_us: i64, column: &str) -> Result<bool> {
    let sql = format!(
        "with w as ({WATERMARKS})
         select exists (
             select 1 from (
                 select {TS} as ts from weir.events e left join weir.relations r on r.id = e.relation_id
                 where e.entity = $1 order by e.position desc limit {RECENT}
             ) x where x.ts >= timestamptz 'epoch' + $3 * interval '1 microsecond'
         ) and not exists (
             select 1 from w join weir.events e on e.entity = $1 and e.position > w.w
             left join weir.relations r on r.id = e.relation_id
             where {TS} <= timestamptz 'epoch' + $3 * interval '1 microsecond'
         ) and not exists (
             select 1 from weir.parked p join w on p.consumer = w.name
             join weir.events e on e.position = p.position
             left join weir.relations r on r.id = e.relation_id
             where p.entity = $1 and {TS} <= timestamptz 'epoch' + $3 * interval '1 microsecond'
         )"
    );
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(entity)
        .bind(column)
        .bind(ts_us as f64)
        .fetch_one(pool)
        .await?)
}

/// The WAL position up to which every logged change has been handled by every consumer: a
/// writer that reads `pg_current_wal_insert_lsn()` after its commit can wait for it. (Not
/// `pg_current_wal_lsn()`: with `synchronous_commit = off` that write position can still be
/// behind the commit that just returned.)
pub async fn processed_lsn(pool: &PgPool) -> Result<Lsn> {
    let row: (Option<String>, Option<String>) = sqlx::query_as(
        "with m as (select min(w) as w from (select min(position) as w from weir.checkpoints group by consumer) x)
         select (select (e.lsn - 1)::text from weir.events e, m where e.position > m.w order by e.position limit 1),
                (select max(greatest(lsn, coalesce(confirmed_lsn, lsn)))::text from weir.source_state)",
    )
    .fetch_one(pool)
    .await?;
    let pick = row.0.or(row.1).unwrap_or_else(|| "0/0".into());
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

/// For tests: forgets recorded failures and parked events and moves every checkpoint to the
/// log's head, so everything logged so far counts as processed.
pub async fn reset(pool: &PgPool) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("delete from weir.parked").execute(&mut *tx).await?;
    sqlx::query("delete from weir.consumer_failures").execute(&mut *tx).await?;
    sqlx::query(
        "update weir.checkpoints set position = greatest(position,
             coalesce((select max(position) from weir.source_state), 0))",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
