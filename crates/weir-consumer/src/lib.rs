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
//!
//! Modules, in the order of the data flow: `engine` (specs, start and stop), `supervisor`
//! (leases, rebalancing), `pages` (log pages read once for all of a consumer's lanes), `lane`
//! (the lane task: read, route, handle, retry, halt, skip, park), `route` (key → lane),
//! `store` (all the SQL), and the read side: [`status`], [`process`], [`state`].

mod engine;
mod lane;
mod marks;
mod operator;
mod pages;
pub mod process;
pub mod rebuild;
mod route;
mod sql_operator;
pub mod state;
pub mod status;
mod store;
mod supervisor;
mod view;

pub use engine::{
    Catalog, ConsumerSpec, Engine, ErrorReporter, TracingReporter, register_consumer,
};
pub use operator::{BoxError, Operator, OperatorError, Selector};
pub use sql_operator::SqlOperator;
pub use state::{ConsumerKind, ConsumerState, LaneState, Outcome};

/// What can go wrong in the engine itself (a handler's failure is not an error here: it is
/// retried and then halted, skipped or parked).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Reading the log failed.
    #[error(transparent)]
    Log(#[from] weir_log::Error),
    /// An operator is configured wrongly; `problem` says what and how to fix it.
    #[error("operator `{consumer}`: {problem}")]
    Config {
        /// The operator (consumer) name.
        consumer: String,
        /// What is wrong, and the fix.
        problem: String,
    },
    /// One of an operator's statements does not prepare (bad SQL, a missing table).
    #[error("operator `{consumer}`: the {statement} does not prepare")]
    Prepare {
        /// The operator (consumer) name.
        consumer: String,
        /// Which statement (`sql`, `delete_with statement`).
        statement: &'static str,
        /// The server's answer.
        #[source]
        source: sqlx::Error,
    },
    /// The configured lane count differs from the one the consumer was created with.
    #[error(
        "consumer `{consumer}` has {stored} lanes in the database and {configured} configured; \
         changing the lane count would reorder keys. Keep {stored}, or pick a new consumer name"
    )]
    LanesChanged {
        /// The consumer.
        consumer: String,
        /// Lanes in the database.
        stored: i32,
        /// Lanes configured.
        configured: i32,
    },
    /// `skip` asked of a consumer that is not halted.
    #[error("consumer `{consumer}` is not halted (it is {state})")]
    NotHalted {
        /// The consumer.
        consumer: String,
        /// Its state.
        state: ConsumerState,
    },
    /// The process-status watcher's query failed; every request waiting on it gets this.
    #[error("process status: the watcher's query failed")]
    ProcessWatch(#[source] std::sync::Arc<Error>),
    /// The supervisor task panicked (a bug); the message is the panic's.
    #[error("the consumer supervisor panicked: {0}")]
    SupervisorPanicked(String),
    /// No consumer by that name.
    #[error("no consumer named `{0}`; `weir status` lists them")]
    UnknownConsumer(String),
    /// A rebuild that cannot start or go on; `problem` says why and what to do.
    #[error("cannot rebuild `{consumer}`: {problem}")]
    Rebuild {
        /// The operator (consumer) name.
        consumer: String,
        /// What is wrong, and the fix.
        problem: String,
    },
    /// The operator's statement failed for one key during a rebuild (it would fail the same
    /// way live).
    #[error(
        "rebuilding `{consumer}`: the statement failed for key `{key}`; fix the cause and run \
         the rebuild again, or `weir operators rebuild {consumer} --abort`"
    )]
    RebuildKey {
        /// The operator (consumer) name.
        consumer: String,
        /// The key, as text.
        key: String,
        /// What the statement answered.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Whether trying again later may succeed (the database was away), by
    /// [`weir_log::sqlstate::is_transient`].
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(e) | Error::Log(weir_log::Error::Database(e)) => {
                weir_log::sqlstate::is_transient(e)
            }
            Error::ProcessWatch(e) => e.is_transient(),
            _ => false,
        }
    }
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
    weir_log::schema::Migration {
        version: 3,
        name: "subscriptions and re-splits",
        sql: include_str!("../migrations/0003_subscriptions.sql"),
    },
    weir_log::schema::Migration {
        version: 4,
        name: "stopped reason",
        sql: include_str!("../migrations/0004_stopped_reason.sql"),
    },
    weir_log::schema::Migration {
        version: 5,
        name: "rebuilds",
        sql: include_str!("../migrations/0005_rebuilds.sql"),
    },
    weir_log::schema::Migration {
        version: 6,
        name: "recent failures",
        sql: include_str!("../migrations/0006_recent_failures.sql"),
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
    store::consumer::skip_halted(pool, name).await
}

/// Stops a consumer: its lanes finish their current event and wait; the checkpoints stay.
/// Returns its state before.
pub async fn stop(pool: &sqlx::PgPool, name: &str) -> Result<ConsumerState> {
    store::consumer::stop(pool, name, None).await
}

/// Starts a stopped consumer from its checkpoints. Returns its state before (a consumer that
/// was not stopped is left as it was).
pub async fn start(pool: &sqlx::PgPool, name: &str) -> Result<ConsumerState> {
    store::consumer::start(pool, name).await
}

/// The consumer's state and, while a re-split is in progress, the position its lanes drain to.
pub async fn state(pool: &sqlx::PgPool, name: &str) -> Result<(ConsumerState, Option<i64>)> {
    store::consumer::state(pool, name).await
}

/// The consumer that needs the oldest event of the log, and that event's position: what
/// retention must keep. Every consumer counts, halted and stopped ones too (they read on from
/// there when they resume); deleting a consumer releases what it holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Need {
    /// The consumer's name.
    pub consumer: String,
    /// Operator or subscription.
    pub kind: ConsumerKind,
    /// Its state.
    pub state: ConsumerState,
    /// The lowest position it has not handled.
    pub position: i64,
}

/// Every consumer in the database (operators that ran, subscriptions): name, kind, state.
pub async fn registered(pool: &sqlx::PgPool) -> Result<Vec<(String, ConsumerKind, ConsumerState)>> {
    store::consumer::registered(pool).await
}

/// The consumer that needs the oldest event ([`Need`]); none when no consumer has a
/// checkpoint.
pub async fn oldest_need(pool: &sqlx::PgPool) -> Result<Option<Need>> {
    store::consumer::oldest_need(pool).await
}

/// Deletes a consumer with its checkpoints, failures and parked events, in `conn`'s
/// transaction. False when there was none.
pub async fn delete(conn: &mut sqlx::PgConnection, name: &str) -> Result<bool> {
    store::consumer::delete(conn, name).await
}

/// Re-splits a consumer into `lanes` lanes without losing or repeating an event: its lanes
/// drain to a common position (returned), then the engine (any process running one) replaces
/// them with `lanes` lanes starting there, parked events following their keys. A lane that is
/// halted holds the re-split until it is resumed or skipped.
pub async fn begin_resplit(conn: &mut sqlx::PgConnection, name: &str, lanes: i32) -> Result<i64> {
    store::consumer::begin_resplit(conn, name, lanes).await
}

/// Completes every re-split whose lanes have all drained; returns the consumers re-split. The
/// engine's supervisor calls it every tick; a process that serves subscriptions without an
/// engine calls it itself.
pub async fn finish_resplits(pool: &sqlx::PgPool) -> Result<Vec<String>> {
    store::consumer::finish_resplits(pool).await
}

/// Leases on lanes for holders other than the engine: SSE and WebSocket clients attached to a
/// subscription hold its emitters (lanes) under the same leases and fences as engine
/// processes, so a lane is never delivered to two holders at once.
pub mod leases {
    use sqlx::{PgConnection, PgPool};

    use crate::{Result, store};

    /// Takes a free or expired lane (or one `owner` holds already); its new fence.
    pub async fn take(
        pool: &PgPool,
        consumer: &str,
        lane: i32,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<i64>> {
        store::lease::try_lease(pool, consumer, lane, owner, ttl.as_secs_f64()).await
    }

    /// Extends a held lease; false when it was lost.
    pub async fn renew(
        pool: &PgPool,
        consumer: &str,
        lane: i32,
        owner: &str,
        fence: i64,
        ttl: std::time::Duration,
    ) -> Result<bool> {
        store::lease::renew(pool, consumer, lane, owner, fence, ttl.as_secs_f64()).await
    }

    /// Gives a lane back.
    pub async fn release(
        pool: &PgPool,
        consumer: &str,
        lane: i32,
        owner: &str,
        fence: i64,
    ) -> Result<()> {
        store::lease::release(pool, consumer, lane, owner, fence).await
    }

    /// Moves the lane's checkpoint to `position` (never backwards) while `owner` holds it with
    /// `fence`; false when the lease is gone.
    pub async fn checkpoint(
        conn: &mut PgConnection,
        consumer: &str,
        lane: i32,
        owner: &str,
        fence: i64,
        position: i64,
    ) -> Result<bool> {
        store::lane::checkpoint(conn, consumer, lane, owner, fence, position).await
    }

    /// Every lane's checkpoint, by lane.
    pub async fn positions(pool: &PgPool, consumer: &str) -> Result<Vec<(i32, i64)>> {
        Ok(sqlx::query_as(
            "select lane, position from weir.checkpoints where consumer = $1 order by lane",
        )
        .bind(consumer)
        .fetch_all(pool)
        .await?)
    }
}

/// Which lane of `lanes` a partition key goes to (the same function the lanes route by).
pub fn lane_of(key: &str, lanes: i32) -> i32 {
    route::route(key, lanes)
}

/// Resumes a halted consumer at the event it halted on. Returns false, changing nothing, when
/// it was not halted.
pub async fn resume(pool: &sqlx::PgPool, name: &str) -> Result<bool> {
    store::consumer::resume(pool, name).await
}
