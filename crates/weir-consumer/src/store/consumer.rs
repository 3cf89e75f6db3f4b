//! A consumer's row: registration, halt, resume, skip.

use sqlx::{Connection, PgConnection, PgPool};

use crate::state::{ConsumerKind, ConsumerState, Outcome};
use crate::{Error, Result};

/// Creates the consumer's row and its lanes' checkpoints; refuses a changed lane count.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn register(
    conn: &mut PgConnection,
    name: &str,
    kind: ConsumerKind,
    lanes: i32,
    ordering: &str,
    entities: &[String],
    kinds: &[String],
    start: i64,
) -> Result<()> {
    let mut tx = conn.begin().await?;
    // Two processes may register the same new consumer at once: the insert is idempotent, and
    // the row lock below orders them.
    sqlx::query(
        "insert into weir.consumers (name, lanes, ordering, entities, kinds, kind)
         values ($1, $2, $3, $4, $5, $6)
         on conflict (name) do nothing",
    )
    .bind(name)
    .bind(lanes)
    .bind(ordering)
    .bind(entities)
    .bind(kinds)
    .bind(kind)
    .execute(&mut *tx)
    .await?;
    let (stored, stored_kind): (i32, ConsumerKind) =
        sqlx::query_as("select lanes, kind from weir.consumers where name = $1 for update")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
    if stored_kind != kind {
        return Err(Error::Config {
            consumer: name.to_string(),
            problem: format!("the name is taken by a {stored_kind}; pick another name"),
        });
    }
    // A subscription's pool changes size only through a re-split (`begin_resplit`).
    if stored != lanes && kind == ConsumerKind::Operator {
        return Err(Error::LanesChanged { consumer: name.to_string(), stored, configured: lanes });
    }
    let lanes = stored;
    // The selector may change between runs (process status reads it); the lanes may not.
    sqlx::query(
        "update weir.consumers set entities = $2, kinds = $3, ordering = $4 where name = $1",
    )
    .bind(name)
    .bind(entities)
    .bind(kinds)
    .bind(ordering)
    .execute(&mut *tx)
    .await?;
    // A new lane starts at `start`; an existing one keeps its checkpoint.
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

/// Halts the consumer at `position` of `lane`, remembering the attempt and its error.
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
         set state = $6, halted_lane = $2, halted_position = $3, halted_attempt = $4,
             halted_error = $5, halted_at = now()
         where name = $1",
    )
    .bind(consumer)
    .bind(lane)
    .bind(position)
    .bind(attempt)
    .bind(error)
    .bind(ConsumerState::Halted)
    .execute(pool)
    .await?;
    Ok(())
}

/// The consumer's state and, while a re-split is in progress, the position its lanes drain to.
pub(crate) async fn state(pool: &PgPool, consumer: &str) -> Result<(ConsumerState, Option<i64>)> {
    sqlx::query_as("select state, drain_to from weir.consumers where name = $1")
        .bind(consumer)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| Error::UnknownConsumer(consumer.to_string()))
}

/// Every consumer in the database: name, kind, state, by name.
pub(crate) async fn registered(
    pool: &PgPool,
) -> Result<Vec<(String, ConsumerKind, ConsumerState)>> {
    Ok(sqlx::query_as("select name, kind, state from weir.consumers order by name")
        .fetch_all(pool)
        .await?)
}

/// The consumer that needs the oldest event: the lowest position any consumer has not handled
/// (one past its lowest lane checkpoint, or its oldest parked event), whatever its state.
pub(crate) async fn oldest_need(pool: &PgPool) -> Result<Option<crate::Need>> {
    let row: Option<(String, ConsumerKind, ConsumerState, i64)> = sqlx::query_as(
        "select c.name, c.kind, c.state, n.position
         from weir.consumers c
         cross join lateral (
             select least((select min(k.position) + 1 from weir.checkpoints k
                           where k.consumer = c.name),
                          (select min(p.position) from weir.parked p
                           where p.consumer = c.name)) as position) n
         where n.position is not null
         order by n.position, c.name
         limit 1",
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(consumer, kind, state, position)| crate::Need { consumer, kind, state, position }))
}

/// Stops a consumer (its lanes wait; checkpoints stay), with the handler's `reason` when a
/// handler stopped it. Returns its state before.
pub(crate) async fn stop<'c>(
    db: impl sqlx::PgExecutor<'c>,
    name: &str,
    reason: Option<&str>,
) -> Result<ConsumerState> {
    let before: Option<ConsumerState> = sqlx::query_scalar(
        "with old as (select name, state from weir.consumers where name = $1 for update),
              upd as (update weir.consumers c
                      set state = 'stopped', halted_lane = null, halted_position = null,
                          halted_attempt = null, halted_error = null, halted_at = null,
                          stopped_reason = $2
                      from old where c.name = old.name)
         select state from old",
    )
    .bind(name)
    .bind(reason)
    .fetch_optional(db)
    .await?;
    before.ok_or_else(|| Error::UnknownConsumer(name.to_string()))
}

/// Starts a stopped consumer from its checkpoints. Returns its state before (unchanged unless
/// it was stopped).
pub(crate) async fn start<'c>(db: impl sqlx::PgExecutor<'c>, name: &str) -> Result<ConsumerState> {
    let before: Option<ConsumerState> = sqlx::query_scalar(
        "with old as (select name, state from weir.consumers where name = $1 for update),
              upd as (update weir.consumers c set state = 'running', stopped_reason = null
                      from old where c.name = old.name and old.state = 'stopped')
         select state from old",
    )
    .bind(name)
    .fetch_optional(db)
    .await?;
    before.ok_or_else(|| Error::UnknownConsumer(name.to_string()))
}

/// Deletes a consumer with its checkpoints, failures and parked events (in `conn`'s
/// transaction). False when there was none.
pub(crate) async fn delete(conn: &mut PgConnection, name: &str) -> Result<bool> {
    sqlx::query("delete from weir.parked where consumer = $1")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    sqlx::query("delete from weir.consumer_failures where consumer = $1")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::query("delete from weir.consumers where name = $1")
        .bind(name)
        .execute(&mut *conn)
        .await?
        .rows_affected()
        == 1)
}

/// Asks for a re-split into `lanes` lanes: every lane drains to a common position (the log
/// head, or the furthest checkpoint), then [`finish_resplit`] re-splits. A re-split already in
/// progress keeps its position and takes the new count. Returns the drain position.
///
/// The drain position must cover every event a lane delivered, even one whose transaction
/// commits while this one is open: the lanes' checkpoint rows are locked first (after the
/// consumer's row, the order [`finish_resplits`] locks them in), which waits for the
/// checkpoint transactions in flight and holds off the next ones until this commits; those
/// then find the drain position and refuse to pass it (the lane's `fenced_checkpoint`).
/// Without the locks, a lane that had not seen the re-split yet delivered past the position,
/// and the new lanes, starting there, delivered those events again.
pub(crate) async fn begin_resplit(conn: &mut PgConnection, name: &str, lanes: i32) -> Result<i64> {
    // A savepoint when `conn` is in a transaction already.
    let mut tx = conn.begin().await?;
    let exists: Option<String> =
        sqlx::query_scalar("select name from weir.consumers where name = $1 for update")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    if exists.is_none() {
        return Err(Error::UnknownConsumer(name.to_string()));
    }
    sqlx::query("select 1 from weir.checkpoints where consumer = $1 order by lane for update")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    // A statement after the locks: it sees every checkpoint committed before them.
    let drain_to: i64 = sqlx::query_scalar(
        "update weir.consumers k
         set next_lanes = $2,
             drain_to = coalesce(k.drain_to, greatest(
                 (select max(position) from weir.checkpoints c where c.consumer = k.name),
                 (select coalesce(max(position), 0) from weir.source_state)))
         where name = $1
         returning drain_to",
    )
    .bind(name)
    .bind(lanes)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(drain_to)
}

/// The position a re-split in progress drains to, read by its own statement (so it sees a
/// re-split committed while an earlier statement of the transaction waited for its locks).
pub(crate) async fn drain_to(conn: &mut PgConnection, consumer: &str) -> Result<Option<i64>> {
    Ok(sqlx::query_scalar("select drain_to from weir.consumers where name = $1")
        .bind(consumer)
        .fetch_optional(conn)
        .await?
        .flatten())
}

/// Completes the re-splits whose lanes all reached their drain position: new lanes, all at that
/// position, parked events moved to their key's new lane, the generation bumped (so every
/// process restarts the consumer's lanes). Returns the consumers re-split.
pub(crate) async fn finish_resplits(pool: &PgPool) -> Result<Vec<String>> {
    let ready: Vec<String> = sqlx::query_scalar(
        "select k.name from weir.consumers k
         where k.drain_to is not null
           and not exists (select 1 from weir.checkpoints c
                           where c.consumer = k.name and c.position < k.drain_to)",
    )
    .fetch_all(pool)
    .await?;
    let mut done = Vec::new();
    for name in ready {
        let mut tx = pool.begin().await?;
        // Under the row lock: another process may have finished it first.
        let row: Option<(i64, i32)> = sqlx::query_as(
            "select drain_to, next_lanes from weir.consumers
             where name = $1 and drain_to is not null for update",
        )
        .bind(&name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((drain_to, lanes)) = row else { continue };
        let behind: bool = sqlx::query_scalar(
            "select exists (select 1 from weir.checkpoints where consumer = $1 and position < $2)",
        )
        .bind(&name)
        .bind(drain_to)
        .fetch_one(&mut *tx)
        .await?;
        if behind {
            continue;
        }
        sqlx::query("delete from weir.checkpoints where consumer = $1")
            .bind(&name)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "insert into weir.checkpoints (consumer, lane, position)
             select $1, l, $3 from generate_series(0, $2 - 1) l",
        )
        .bind(&name)
        .bind(lanes)
        .bind(drain_to)
        .execute(&mut *tx)
        .await?;
        let keys: Vec<String> = sqlx::query_scalar(
            "select distinct partition_key from weir.parked where consumer = $1",
        )
        .bind(&name)
        .fetch_all(&mut *tx)
        .await?;
        for key in keys {
            sqlx::query(
                "update weir.parked set lane = $3 where consumer = $1 and partition_key = $2",
            )
            .bind(&name)
            .bind(&key)
            .bind(crate::route::route(&key, lanes))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "update weir.consumers
             set lanes = next_lanes, next_lanes = null, drain_to = null,
                 generation = generation + 1
             where name = $1",
        )
        .bind(&name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(consumer = %name, lanes, position = drain_to, "re-split the lanes");
        done.push(name);
    }
    Ok(done)
}

/// Resumes a halted consumer; false when it was not halted.
pub(crate) async fn resume(pool: &PgPool, name: &str) -> Result<bool> {
    // One statement: whether it exists, and whether it was halted before this update.
    let was_halted: Option<bool> = sqlx::query_scalar(
        "with old as (select name, state = 'halted' as halted from weir.consumers
                      where name = $1 for update),
              upd as (update weir.consumers c
                      set state = 'running', halted_lane = null, halted_position = null,
                          halted_attempt = null, halted_error = null, halted_at = null
                      from old where c.name = old.name and old.halted
                      returning c.name)
         select halted from old",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?;
    was_halted.ok_or_else(|| Error::UnknownConsumer(name.to_string()))
}

/// Skips the event a halted consumer stopped on: records it as skipped, moves that lane's
/// checkpoint past it and resumes. Returns the skipped position.
pub(crate) async fn skip_halted(pool: &PgPool, name: &str) -> Result<i64> {
    let mut tx = pool.begin().await?;
    // The row lock keeps a concurrent resume or skip out until this one commits.
    let row: Option<HaltedRow> = sqlx::query_as(
        "select state, halted_lane, halted_position, halted_attempt, halted_error
         from weir.consumers where name = $1 for update",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    let (lane, position, attempt, error) = match row {
        None => return Err(Error::UnknownConsumer(name.to_string())),
        Some((_, Some(lane), Some(position), attempt, error)) => (lane, position, attempt, error),
        Some((state, ..)) => {
            return Err(Error::NotHalted { consumer: name.to_string(), state });
        }
    };
    super::lane::record_failure(
        &mut tx,
        name,
        lane,
        position,
        attempt.unwrap_or(0),
        &error.unwrap_or_default(),
        Outcome::Skip,
    )
    .await?;
    sqlx::query(
        "update weir.checkpoints set position = greatest(position, $3)
         where consumer = $1 and lane = $2",
    )
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
type HaltedRow = (ConsumerState, Option<i32>, Option<i64>, Option<i32>, Option<String>);
