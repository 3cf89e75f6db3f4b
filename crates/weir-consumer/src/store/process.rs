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

/// Consumers listening to `entity` (an SQL expression) and their watermarks (an empty entity
/// list listens to all).
fn watermarks_of(entity: &str) -> String {
    format!(
        "select k.name, min(c.position) as w
         from weir.consumers k join weir.checkpoints c on c.consumer = k.name
         where {entity} = any(k.entities) or cardinality(k.entities) = 0
         group by k.name"
    )
}

/// How many recent events of an entity the timestamp look-ups scan (newest first).
const RECENT: i64 = 100_000;

/// See [`crate::process::last_processed`].
pub(crate) async fn last_processed(
    pool: &PgPool,
    entity: &str,
    column: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    let sql = format!(
        "with w as ({})
         select max(ts) from (
             select {TS} as ts from weir.events e left join weir.relations r on r.id = e.relation_id
             where e.entity = $1
               -- handled by all of them: at or below the lowest watermark (no consumer: logged)
               and e.position <= coalesce((select min(w) from w), (select max(position) from weir.source_state))
             order by e.position desc limit {RECENT}
         ) x",
        watermarks_of("$1")
    );
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(entity)
        .bind(column)
        .fetch_one(pool)
        .await?)
}

/// See [`crate::process::processed`]: one question of [`processed_many`].
pub(crate) async fn processed(
    pool: &PgPool,
    entity: &str,
    ts_us: i64,
    column: &str,
) -> Result<bool> {
    let answers = processed_many(pool, &[(entity.to_string(), ts_us)], column).await?;
    Ok(answers.first().copied().unwrap_or(false))
}

/// For each (entity, timestamp in µs) whether it is processed ([`crate::process::processed`]),
/// in the order asked: one statement for all of a watcher's entity waiters.
pub(crate) async fn processed_many(
    pool: &PgPool,
    questions: &[(String, i64)],
    column: &str,
) -> Result<Vec<bool>> {
    let sql = format!(
        "select (
             -- the caller's write is captured: a change at or after ts is logged
             exists (
                 select 1 from (
                     select {TS} as ts from weir.events e left join weir.relations r on r.id = e.relation_id
                     where e.entity = q.entity order by e.position desc limit {RECENT}
                 ) x where x.ts >= q.at
             -- no change at or before ts lies beyond a listening consumer's watermark
             ) and not exists (
                 select 1 from ({watermarks}) w join weir.events e on e.entity = q.entity and e.position > w.w
                 left join weir.relations r on r.id = e.relation_id
                 where {TS} <= q.at
             -- and none is parked by one
             ) and not exists (
                 select 1 from weir.parked p join ({watermarks}) w on p.consumer = w.name
                 join weir.events e on e.position = p.position
                 left join weir.relations r on r.id = e.relation_id
                 where p.entity = q.entity and {TS} <= q.at
             )
         )
         from (select u.entity, u.i, timestamptz 'epoch' + u.ts * interval '1 microsecond' as at
               from unnest($1::text[], $3::float8[]) with ordinality as u(entity, ts, i)) q
         order by q.i",
        watermarks = watermarks_of("q.entity")
    );
    let entities: Vec<&str> = questions.iter().map(|(e, _)| e.as_str()).collect();
    // µs since the epoch fit a float8 exactly (below 2^53 until the year 2255).
    let ts: Vec<f64> = questions.iter().map(|(_, t)| *t as f64).collect();
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(entities)
        .bind(column)
        .bind(ts)
        .fetch_all(pool)
        .await?)
}

/// What a process-status watcher reads on each tick, in one statement (see
/// [`crate::process`] for why each part is there).
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub(crate) struct Tick {
    /// The log's head position.
    pub(crate) head: i64,
    /// The lowest watermark of any consumer (none without consumers).
    pub(crate) low: Option<i64>,
    /// The LSN just before the first event beyond `low`: every commit below that event's is
    /// handled by every consumer (none when nothing lies beyond).
    pub(crate) beyond: Option<String>,
    /// The LSN up to which every commit is in the log: the last appended commit, the
    /// ingesting process's confirmed position (its heartbeat), and the slot's
    /// `confirmed_flush_lsn` (what it acknowledged, in the server's memory at once).
    pub(crate) logged: Option<String>,
    /// Changes whenever a checkpoint moves (the sum of all positions and their count).
    pub(crate) checkpoints: i64,
    /// Changes whenever an event is parked, retried or discarded.
    pub(crate) parked: i64,
}

/// See [`Tick`].
pub(crate) async fn tick(pool: &PgPool) -> Result<Tick> {
    Ok(sqlx::query_as(
        "with c as (select consumer, min(position) as w from weir.checkpoints group by consumer),
              m as (select min(w) as w from c)
         select
             (select coalesce(max(position), 0) from weir.source_state) as head,
             (select w from m) as low,
             -- `> (select …)`, a parameter to the plan: an index range from the watermark
             -- (a join with `m` read the log from its start, the whole log without consumers)
             (select (e.lsn - 1)::text from weir.events e where e.position > (select w from m)
              order by e.position limit 1) as beyond,
             (select max(greatest(s.lsn, s.confirmed_lsn, r.confirmed_flush_lsn))::text
              from weir.source_state s
              -- the slot acknowledges only what ingestion stored (weir::ingest's invariant)
              left join pg_replication_slots r
                     on r.slot_name = s.slot and r.database = current_database()) as logged,
             (select coalesce(sum(position), 0)::int8 + count(*) from weir.checkpoints) as checkpoints,
             (select count(*) + coalesce(sum(position), 0)::int8 from weir.parked) as parked",
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
