//! The event log: `weir.events`, one row per change, in WAL commit order.
//!
//! Where it sits: between the source and every consumer.
//!
//! ```text
//! source ─► Appender::append(batch of committed transactions)
//!              │ one transaction: events + source_state(lsn, position) + NOTIFY (two overlap)
//!              ▼
//!           weir.events (range partitions over position) ─► read / tail / consumers
//!              │                                            ▲
//!              └─ Wake: watch channel in-process, NOTIFY weir_events across processes
//! ```
//!
//! Invariants:
//! - Positions are gap-free and assigned here, by the one appender, in the order transactions
//!   are handed over — which is WAL commit order — so no reader can ever see position `n + 1`
//!   committed before `n`.
//! - A batch and the source's last commit LSN commit together; the caller acknowledges the slot
//!   only after [`Appender::append`] returns.
//! - Transactions at or below the stored LSN are skipped, so a change enters the log once.
//!
//! Other crates keep their own tables in the `weir` schema with [`schema::migrate`].

mod append;
pub mod backfill;
mod read;
mod retention;
pub mod schema;
pub mod sqlstate;
mod wake;

pub use append::{Appender, SourceState};
pub use read::{EventFilter, LogReader};
pub use retention::{RetentionReport, enforce_retention};
pub use wake::{NOTIFY_CHANNEL, Wake, listen_for_appends};
pub use weir_core::{Change, Transaction};

/// What can go wrong talking to the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database refused or the connection broke.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The log's last position was not the one this appender continued from: the append
    /// before it failed, or another process appended (the lease was lost). Nothing of this
    /// append was stored; reopening the appender starts again from what is stored.
    #[error("the log moved under its appender (expected it at position {expected}); reopening")]
    Moved {
        /// The position the append continued from.
        expected: i64,
    },
    /// A stored row could not be read back into an event.
    #[error("corrupt log row at position {position}: {problem}")]
    Corrupt {
        /// The row's position.
        position: i64,
        /// What was wrong.
        problem: String,
    },
}

/// `Result` with the log [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Creates or upgrades the log's tables (idempotent).
pub async fn migrate(pool: &sqlx::PgPool) -> Result<()> {
    schema::migrate(pool, "log", MIGRATIONS).await
}

/// The log's own numbered migrations.
pub const MIGRATIONS: &[schema::Migration] = &[
    schema::Migration { version: 1, name: "log", sql: include_str!("../migrations/0001_log.sql") },
    schema::Migration {
        version: 2,
        name: "backfills",
        sql: include_str!("../migrations/0002_backfills.sql"),
    },
];
