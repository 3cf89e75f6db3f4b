//! `weir status` for the source: where the log is, how far the slot is behind, how fast events
//! arrive and who holds the slot.

use serde::Serialize;
use sqlx::PgPool;
use weir_core::Config;

use crate::Result;

/// The source's state as seen from the database (every process answers the same).
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct SourceStatus {
    /// Slot name.
    pub slot: String,
    /// Whether a walsender is streaming from the slot now.
    pub slot_active: bool,
    /// WAL between the server's current position and what the slot confirmed, in bytes.
    pub slot_lag_bytes: Option<i64>,
    /// Last log position.
    pub position: i64,
    /// LSN of the last commit stored in the log.
    pub lsn: String,
    /// Events logged per second over the last 10 seconds (by commit time).
    pub events_per_second: f64,
    /// Delay between commit and log of the last append; 0 when caught up.
    pub seconds_behind: f64,
    /// `host:pid` of the ingesting process and its last heartbeat age in seconds.
    pub holder: Option<String>,
    /// Seconds since the holder's last heartbeat.
    pub heartbeat_age_seconds: Option<f64>,
}

/// Reads the source's status.
pub async fn source_status(pool: &PgPool, config: &Config) -> Result<SourceStatus> {
    let slot = &config.source.slot;
    let (active, lag): (Option<bool>, Option<i64>) = sqlx::query_as(
        "select (select active from pg_replication_slots where slot_name = $1),
                (select (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
                 from pg_replication_slots where slot_name = $1)",
    )
    .bind(slot)
    .fetch_one(pool)
    .await?;
    let row: Option<StateRow> = sqlx::query_as(
        "select position, lsn::text, holder, extract(epoch from now() - heartbeat_at)::float8, behind_ms
         from weir.source_state where slot = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    let (position, lsn, holder, age, behind) = row.unwrap_or((0, "0/0".into(), None, None, None));
    // The events after the newest one committed 10 s ago or more, found by walking the
    // position index back from the head: it reads the recent events and one more, not the
    // whole window (the last 200,000 events, the most it counts) as a count(*) would.
    let recent: i64 = sqlx::query_scalar(
        "select $1 - coalesce(
             (select position from weir.events
               where position <= $1 and position > $1 - 200000
                 and commit_ts <= now() - interval '10 seconds'
               order by position desc limit 1),
             greatest($1 - 200000, (select coalesce(min(position), $1 + 1) - 1 from weir.events)))",
    )
    .bind(position)
    .fetch_one(pool)
    .await?;
    Ok(SourceStatus {
        slot: slot.clone(),
        slot_active: active.unwrap_or(false),
        slot_lag_bytes: lag,
        position,
        lsn,
        events_per_second: recent as f64 / 10.0,
        seconds_behind: behind.unwrap_or(0) as f64 / 1000.0,
        holder,
        heartbeat_age_seconds: age,
    })
}

/// position, lsn, holder, heartbeat age, behind_ms.
type StateRow = (i64, String, Option<String>, Option<f64>, Option<i64>);
