//! `weir.backfills`: the record of each backfill — which table, how far, in what state.
//!
//! Where it sits: `weir backfill` (or `POST /v1/backfills`, an operator with `backfill = true`,
//! a table added to the publication) asks for one here; the ingesting process runs the
//! pending ones chunk by chunk and stores each chunk's progress with the chunk's events
//! ([`Appender::append_with`](crate::Appender::append_with)), so a backfill resumes after its
//! last stored chunk whatever killed it.
//!
//! ```text
//! pending ──(the ingest leader starts it)──► running ──(last chunk stored)──► done
//!    │                                          │ └──(the table is gone, …)──► failed
//!    └────────────(cancel)──────────────────────┴──────────────────────────► cancelled
//! ```
//!
//! One backfill at a time per table (a unique index over the active states).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::Result;

/// Where a backfill is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackfillState {
    /// Asked for; the ingesting process has not started it yet.
    Pending,
    /// Chunks are being loaded.
    Running,
    /// Every row was read.
    Done,
    /// Stopped by an error (`error` says which).
    Failed,
    /// Stopped by a user.
    Cancelled,
}

impl BackfillState {
    fn parse(s: &str) -> Self {
        match s {
            "running" => Self::Running,
            "done" => Self::Done,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => Self::Pending,
        }
    }

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Still to run or running.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Pending | Self::Running)
    }
}

/// One backfill, as stored.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Backfill {
    /// Its id.
    pub id: i64,
    /// The table (`posts`, `sales.orders`).
    pub entity: String,
    /// The key it walks in order (the primary key).
    pub key_columns: Vec<String>,
    /// Where it is.
    pub state: BackfillState,
    /// Who asked: `cli`, `http`, `operator <name>`, `table added`.
    pub requested_by: String,
    /// Rows per chunk.
    pub chunk_size: i32,
    /// The key (as text, one per key column) of the last row stored; null before the first
    /// chunk.
    #[schema(value_type = Option<Vec<String>>)]
    pub last_key: Option<Value>,
    /// Rows read so far (written as `read` events or dropped because a live change of the same
    /// row came in the chunk's window).
    pub rows_done: i64,
    /// `read` events written to the log.
    pub rows_written: i64,
    /// Rows in the table when the backfill started (live writes change it as it runs).
    pub rows_total: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// When it was asked for.
    pub requested_at: DateTime<Utc>,
    /// When the first chunk started.
    pub started_at: Option<DateTime<Utc>>,
    /// When its row last changed.
    pub updated_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, entity, key_columns, state, requested_by, chunk_size, last_key,
    rows_done, rows_written, rows_total, error, requested_at, started_at, updated_at, finished_at";

type Row = (
    i64,
    String,
    Vec<String>,
    String,
    String,
    i32,
    Option<Value>,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

fn from_row(r: Row) -> Backfill {
    Backfill {
        id: r.0,
        entity: r.1,
        key_columns: r.2,
        state: BackfillState::parse(&r.3),
        requested_by: r.4,
        chunk_size: r.5,
        last_key: r.6,
        rows_done: r.7,
        rows_written: r.8,
        rows_total: r.9,
        error: r.10,
        requested_at: r.11,
        started_at: r.12,
        updated_at: r.13,
        finished_at: r.14,
    }
}

/// The answer to [`request`].
#[derive(Debug, Clone)]
pub enum Requested {
    /// A new backfill, pending.
    Created(Backfill),
    /// The table already has a pending or running backfill: this one; nothing was changed.
    AlreadyActive(Backfill),
}

/// Asks for a backfill of `entity` walking `key_columns`. Nothing changes when the table
/// already has an active one.
pub async fn request(
    pool: &PgPool,
    entity: &str,
    key_columns: &[String],
    requested_by: &str,
    chunk_size: i32,
) -> Result<Requested> {
    let created: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into weir.backfills (entity, key_columns, requested_by, chunk_size)
         values ($1, $2, $3, $4)
         on conflict (entity) where state in ('pending', 'running') do nothing
         returning {COLUMNS}"
    )))
    .bind(entity)
    .bind(key_columns)
    .bind(requested_by)
    .bind(chunk_size)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = created {
        return Ok(Requested::Created(from_row(row)));
    }
    match active(pool, entity).await? {
        Some(b) => Ok(Requested::AlreadyActive(b)),
        // It ended between the two statements: ask again.
        None => Box::pin(request(pool, entity, key_columns, requested_by, chunk_size)).await,
    }
}

/// The table's pending or running backfill.
pub async fn active(pool: &PgPool, entity: &str) -> Result<Option<Backfill>> {
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from weir.backfills
         where entity = $1 and state in ('pending', 'running')"
    )))
    .bind(entity)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(from_row))
}

/// One backfill by id.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<Backfill>> {
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from weir.backfills where id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(from_row))
}

/// Every backfill, newest first; the last `limit` that ended plus every active one.
pub async fn list(pool: &PgPool, limit: i64) -> Result<Vec<Backfill>> {
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "(select {COLUMNS} from weir.backfills where state in ('pending', 'running'))
         union all
         (select {COLUMNS} from weir.backfills where state not in ('pending', 'running')
          order by id desc limit $1)
         order by id desc"
    )))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// The oldest active backfill: the next one the ingesting process works on.
pub async fn next_active(pool: &PgPool) -> Result<Option<Backfill>> {
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from weir.backfills where state in ('pending', 'running')
         order by id limit 1"
    )))
    .fetch_optional(pool)
    .await?;
    Ok(row.map(from_row))
}

/// Marks a pending backfill running, with the table's row count (kept when it was running
/// already: a resumed backfill keeps its first count).
pub async fn start(pool: &PgPool, id: i64, rows_total: i64) -> Result<()> {
    sqlx::query(
        "update weir.backfills
         set state = 'running', started_at = coalesce(started_at, now()),
             rows_total = coalesce(rows_total, $2), updated_at = now()
         where id = $1 and state in ('pending', 'running')",
    )
    .bind(id)
    .bind(rows_total)
    .execute(pool)
    .await?;
    Ok(())
}

/// Ends an active backfill as `done`, `failed` (with `error`) or `cancelled`. Returns whether it
/// was active.
pub async fn finish(
    pool: &PgPool,
    id: i64,
    state: BackfillState,
    error: Option<&str>,
) -> Result<bool> {
    let n = sqlx::query(
        "update weir.backfills
         set state = $2, error = $3, finished_at = now(), updated_at = now()
         where id = $1 and state in ('pending', 'running')",
    )
    .bind(id)
    .bind(state.as_str())
    .bind(error)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// A chunk's progress, stored in the transaction that appends the chunk's events.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkStored {
    /// The backfill.
    pub backfill: i64,
    /// The text of the key columns of the chunk's last row.
    pub last_key: Vec<String>,
    /// Rows the chunk read.
    pub rows_read: i64,
    /// `read` events it wrote (rows read less those a live change overtook).
    pub rows_written: i64,
    /// It was the table's last chunk: the backfill is done.
    pub last: bool,
}

impl ChunkStored {
    pub(crate) async fn store(&self, conn: &mut PgConnection) -> Result<()> {
        sqlx::query(
            "update weir.backfills
             set last_key = $2, rows_done = rows_done + $3, rows_written = rows_written + $4,
                 updated_at = now(),
                 state = case when $5 then 'done' else state end,
                 finished_at = case when $5 then now() else finished_at end
             where id = $1 and state = 'running'",
        )
        .bind(self.backfill)
        .bind(serde_json::to_value(&self.last_key).expect("strings serialize"))
        .bind(self.rows_read)
        .bind(self.rows_written)
        .bind(self.last)
        .execute(conn)
        .await?;
        Ok(())
    }
}
