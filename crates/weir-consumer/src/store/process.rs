//! The reads behind process status ([`crate::process`]) and the `processed` channel.

use sqlx::PgPool;

use super::undefined_table;
use crate::Result;
use crate::process::{ConsumerWatermark, ProcessedEvent, Watermarks};

/// The event's timestamp as SQL, for `e` joined with its relation `r`; `$2` is the column name.
const TS: &str = "coalesce(
        case when r.columns ->> $2 in ('timestamptz', 'timestamp')
             then (coalesce(e.new_record, e.old_record) ->> $2)::timestamptz end,
        e.commit_ts)";

/// Consumers listening to `$1` and their watermarks (an empty entity list listens to all).
const WATERMARKS: &str = "select k.name, min(c.position) as w
        from weir.consumers k join weir.checkpoints c on c.consumer = k.name
        where $1 = any(k.entities) or cardinality(k.entities) = 0
        group by k.name";

/// How many recent events of an entity the timestamp look-ups scan (newest first).
const RECENT: i64 = 100_000;

/// See [`crate::process::last_processed`].
pub(crate) async fn last_processed(
    pool: &PgPool,
    entity: &str,
    column: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    let sql = format!(
        "with w as ({WATERMARKS})
         select max(ts) from (
             select {TS} as ts from weir.events e left join weir.relations r on r.id = e.relation_id
             where e.entity = $1
               -- handled by all of them: at or below the lowest watermark (no consumer: logged)
               and e.position <= coalesce((select min(w) from w), (select max(position) from weir.source_state))
             order by e.position desc limit {RECENT}
         ) x"
    );
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(entity)
        .bind(column)
        .fetch_one(pool)
        .await?)
}

/// See [`crate::process::processed`].
pub(crate) async fn processed(
    pool: &PgPool,
    entity: &str,
    ts_us: i64,
    column: &str,
) -> Result<bool> {
    let sql = format!(
        "with w as ({WATERMARKS})
         -- the caller's write is captured: a change at or after ts is logged
         select exists (
             select 1 from (
                 select {TS} as ts from weir.events e left join weir.relations r on r.id = e.relation_id
                 where e.entity = $1 order by e.position desc limit {RECENT}
             ) x where x.ts >= timestamptz 'epoch' + $3 * interval '1 microsecond'
         -- no change at or before ts lies beyond a listening consumer's watermark
         ) and not exists (
             select 1 from w join weir.events e on e.entity = $1 and e.position > w.w
             left join weir.relations r on r.id = e.relation_id
             where {TS} <= timestamptz 'epoch' + $3 * interval '1 microsecond'
         -- and none is parked by one
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

/// See [`crate::process::processed_lsn`]: (the LSN before the first event beyond the lowest
/// watermark, the source's LSN); either may be missing.
pub(crate) async fn processed_lsn(pool: &PgPool) -> Result<(Option<String>, Option<String>)> {
    Ok(sqlx::query_as(
        "with m as (select min(w) as w from (select min(position) as w from weir.checkpoints group by consumer) x)
         select (select (e.lsn - 1)::text from weir.events e, m where e.position > m.w order by e.position limit 1),
                (select max(greatest(lsn, coalesce(confirmed_lsn, lsn)))::text from weir.source_state)",
    )
    .fetch_one(pool)
    .await?)
}

/// See [`crate::process::watermarks`].
pub(crate) async fn watermarks(pool: &PgPool) -> Result<Option<Watermarks>> {
    type Row = (Option<i64>, Option<Vec<String>>, Option<i64>);
    let rows: Vec<Row> = match sqlx::query_as(
        "select h.head, x.entities, x.w
         from (select coalesce(max(position), 0) as head from weir.source_state) h
         -- one row with nulls when there is no consumer, so the head still comes back
         left join (select k.entities, min(c.position) as w
                    from weir.consumers k join weir.checkpoints c on c.consumer = k.name
                    group by k.name, k.entities) x on true",
    )
    .fetch_all(pool)
    .await
    {
        Ok(rows) => rows,
        Err(e) if undefined_table(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let head = rows.first().and_then(|r| r.0).unwrap_or(0);
    let mut consumers: Vec<ConsumerWatermark> = rows
        .into_iter()
        .filter_map(|(_, entities, w)| {
            Some(ConsumerWatermark { entities: entities.unwrap_or_default(), watermark: w? })
        })
        .collect();
    consumers.sort();
    Ok(Some(Watermarks { head, consumers }))
}

/// See [`crate::process::processed_events`].
pub(crate) async fn processed_events(
    pool: &PgPool,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<Vec<ProcessedEvent>> {
    const WITH_PARKED: &str = "select e.position, e.entity, e.key, e.kind, e.lsn::text,
                -- ever parked (the failure row stays; the parked row may be gone)
                exists (select 1 from weir.consumer_failures f
                        where f.position = e.position and f.outcome = 'park')
         from weir.events e
         where e.position > $1 and e.position <= $2
         order by e.position
         limit $3";
    // Before any consumer ever ran, its tables do not exist: nothing is parked.
    const WITHOUT_CONSUMERS: &str = "select e.position, e.entity, e.key, e.kind, e.lsn::text, false
         from weir.events e
         where e.position > $1 and e.position <= $2
         order by e.position
         limit $3";
    type Row = (i64, String, serde_json::Value, String, String, bool);
    let query = |sql: &'static str| {
        sqlx::query_as::<_, Row>(sql).bind(after).bind(upto).bind(limit).fetch_all(pool)
    };
    let rows = match query(WITH_PARKED).await {
        Err(e) if undefined_table(&e) => query(WITHOUT_CONSUMERS).await?,
        other => other?,
    };
    Ok(rows
        .into_iter()
        .map(|(position, entity, key, kind, lsn, parked)| ProcessedEvent {
            position,
            entity,
            key,
            kind,
            lsn,
            parked,
        })
        .collect())
}

/// See [`crate::process::reset`].
#[cfg(feature = "testing")]
pub(crate) async fn reset(pool: &PgPool) -> Result<()> {
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
