//! A consumer's row: registration, halt, resume, skip.

use sqlx::PgPool;

use crate::state::{ConsumerState, Outcome};
use crate::{Error, Result};

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
         values ($1, $2, $3, $4, $5)
         on conflict (name) do nothing",
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
        return Err(Error::LanesChanged { consumer: name.to_string(), stored, configured: lanes });
    }
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

pub(crate) async fn is_halted(pool: &PgPool, consumer: &str) -> Result<bool> {
    let state: ConsumerState =
        sqlx::query_scalar("select state from weir.consumers where name = $1")
            .bind(consumer)
            .fetch_one(pool)
            .await?;
    Ok(state == ConsumerState::Halted)
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
