//! The event store and subscriptions: the fourth part of weir.
//!
//! ```text
//! append(stream, expected, events) ─► weir.stream_events (one transaction, expected version
//!        checked under the stream's lock, idempotent by event id)
//!        ─► WAL ─► ingestion ─► weir.events as kind `append` (one order with row changes)
//! subscription (weir.subscriptions + a consumer of the engine):
//!        selector (stream | event_type | event_pattern | event_payload | tags | entity)
//!        ─► pool_size emitters = the consumer's lanes, routed by hash(stream or row key)
//!        ─► delivery: an in-process Rust handler (in the checkpoint's transaction), or SSE /
//!           WebSocket clients attached by name that acknowledge
//! ```
//!
//! Modules, in the order of the data flow: [`append`] and [`read`] (the streams),
//! [`subscription`] (what a subscription is: its selector, validated), [`subscriptions`] (kept
//! in the database: create, update, stop, start, delete), [`handler`] (in-process delivery on
//! the consumer engine).

pub mod append;
pub mod attach;
pub mod handler;
pub mod read;
pub mod sink;
pub mod subscription;
pub mod subscriptions;

pub use append::{AppendResult, Expected, NewEvent, append};
pub use handler::{Handler, SubscriptionCatalog};
pub use read::{
    Direction, LogQuery, RecordedEvent, Snapshot, StreamInfo, TagsMatch, delete_stream,
    list_streams, load_snapshot, read_log, read_stream, save_snapshot, stream_info,
    truncate_stream,
};
pub use sink::Sink;
pub use subscription::{SinkKind, StartAt, SubscriptionDef, SubscriptionKind, SubscriptionOptions};
pub use subscriptions::{Subscription, SubscriptionUpdate};

/// What can go wrong with streams and subscriptions. Each message names what is wrong and how
/// to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The stream is not at the version the append expected.
    #[error("stream `{stream}` is at {actual}, but the append expected {expected}")]
    WrongExpectedVersion {
        /// The stream.
        stream: String,
        /// What the caller expected (`any`, `no_stream`, `stream_exists` or a version).
        expected: String,
        /// What the stream is at (`no_stream` or its last version).
        actual: String,
    },
    /// An append or a read was refused before anything was stored; the message says why and
    /// how to fix it.
    #[error("{0}")]
    Invalid(String),
    /// A subscription's definition was refused before anything was stored; the message names
    /// the field and the fix.
    #[error("{0}")]
    InvalidSubscription(String),
    /// An event id of the append is stored already, but the append is not a retry of the one
    /// that stored it (only some of its ids are stored, or in another stream, or in another
    /// order); nothing was stored. The message names the id.
    #[error("{0}")]
    EventIdConflict(String),
    /// No stream by that name (or it was deleted).
    #[error("no stream named `{0}`")]
    UnknownStream(String),
    /// No subscription by that name.
    #[error("no subscription named `{0}`; `weir subscriptions list` lists them")]
    UnknownSubscription(String),
    /// A subscription (or an operator) by that name exists already.
    #[error("a {what} named `{name}` exists already; pick another name or update it")]
    Duplicate {
        /// `subscription` or `operator`.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// What was asked for is held by someone else (an emitter another client or process
    /// holds); the message says when to retry.
    #[error("{0}")]
    Busy(String),
    /// The consumer engine failed.
    #[error(transparent)]
    Consumer(#[from] weir_consumer::Error),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The log failed.
    #[error(transparent)]
    Log(#[from] weir_log::Error),
}

/// `Result` with the streams [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The event store's and the subscriptions' migrations (component `streams`).
pub const MIGRATIONS: &[weir_log::schema::Migration] = &[
    weir_log::schema::Migration {
        version: 1,
        name: "streams",
        sql: include_str!("../migrations/0001_streams.sql"),
    },
    weir_log::schema::Migration {
        version: 2,
        name: "subscriptions",
        sql: include_str!("../migrations/0002_subscriptions.sql"),
    },
    weir_log::schema::Migration {
        version: 3,
        name: "sinks",
        sql: include_str!("../migrations/0003_sinks.sql"),
    },
];

/// Creates or upgrades the event store and subscription tables (idempotent). The consumer
/// tables come first: a subscription is a consumer.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<()> {
    weir_consumer::migrate(pool).await?;
    weir_log::schema::migrate(pool, "streams", MIGRATIONS).await?;
    Ok(())
}
