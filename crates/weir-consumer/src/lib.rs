//! The consumer engine: reads the log after a checkpoint, in order, through a selector, and
//! hands events to a handler — with lanes, retries, halt/skip/park, leases shared across
//! processes, status, and process status ("has this change been handled yet?").
//!
//! ```text
//! weir.events ──► lane l of consumer C: read after checkpoint(C, l), selector, route
//!                   hash(partition key) % lanes == l ? handle : skip
//!                   handle: BEGIN; operator.handle(tx, event); checkpoint(C, l) := position
//!                           (fenced by the lane lease); COMMIT       — exactly-once effects
//!                   failure: retry with backoff ─► halt | skip | park
//! ```
//!
//! Invariants:
//! - Per key, events are handled in log order and never concurrently: a key always maps to
//!   one lane, a lane is one task, and a lane is leased to one process at a time.
//! - A transactional operator's writes and its checkpoint commit together; a process whose
//!   lease was taken over cannot commit (the fenced update finds no row, so the transaction
//!   rolls back).
//! - A lane's checkpoint moves past events of other lanes too, so `min(checkpoint)` over a
//!   consumer's lanes is a watermark: every selected event at or below it is handled.
//!
//! Metrics (through the `metrics` facade; the HTTP server exports them for Prometheus):
//! `weir_consumer_events_handled_total`, `weir_consumer_failures_total`,
//! `weir_consumer_retries_total` (counters per consumer), `weir_consumer_handler_seconds`
//! (histogram per consumer), `weir_consumer_position` (gauge per consumer and lane; lag is the
//! log head minus it).
//!
//! Operators are one face of this engine ([`Operator`], [`SqlOperator`]); subscriptions will be
//! another (a non-transactional handler with the same lanes and checkpoints).

mod engine;
mod operator;
pub mod process;
mod sql_operator;
pub mod status;
mod store;

pub use engine::{ConsumerSpec, Engine, ErrorReporter, TracingReporter};
pub use operator::{HandlerError, Operator, Selector};
pub use sql_operator::SqlOperator;

/// What can go wrong in the engine itself (a handler's failure is not an error here: it is
/// retried and then halted, skipped or parked).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Reading the log failed.
    #[error(transparent)]
    Log(#[from] weir_log::Error),
    /// A consumer or operator is configured wrongly; the message names it and the fix.
    #[error("{0}")]
    Config(String),
    /// No consumer by that name.
    #[error("no consumer named `{0}`; `weir status` lists them")]
    UnknownConsumer(String),
}

/// `Result` with the consumer [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The consumer tables' migrations.
pub const MIGRATIONS: &[weir_log::schema::Migration] = &[
    weir_log::schema::Migration {
        version: 1,
        name: "consumers",
        sql: include_str!("../migrations/0001_consumers.sql"),
    },
    weir_log::schema::Migration {
        version: 2,
        name: "parked positions",
        sql: include_str!("../migrations/0002_parked_positions.sql"),
    },
];

/// Creates or upgrades the consumer tables (idempotent).
pub async fn migrate(pool: &sqlx::PgPool) -> Result<()> {
    weir_log::schema::migrate(pool, "consumers", MIGRATIONS).await?;
    Ok(())
}

/// Skips the event a halted consumer stopped on (recorded as skipped) and resumes after it.
/// Returns the skipped position.
pub async fn skip(pool: &sqlx::PgPool, name: &str) -> Result<i64> {
    store::skip_halted(pool, name).await
}

/// Resumes a halted consumer at the event it halted on. Returns false, changing nothing, when
/// it was not halted.
pub async fn resume(pool: &sqlx::PgPool, name: &str) -> Result<bool> {
    store::resume(pool, name).await
}
