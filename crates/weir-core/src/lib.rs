//! weir's vocabulary: the [`Event`], [`Lsn`], log positions, durations and the configuration.
//!
//! Where it sits: under everything. The source produces [`Event`]s, the log stores them, the
//! consumers read them; all of them agree on the types defined here. This crate does no I/O.

mod backoff;
mod change;
mod config;
mod duration;
mod event;
mod failure;
mod identity;
pub mod json;
mod lsn;

pub use backoff::Backoff;
pub use change::{Change, Transaction};
pub use config::{
    ChannelConfig, Config, ConfigError, ConsumersConfig, DEFAULT_BATCH_MAX_EVENTS,
    DEFAULT_JOB_CONCURRENCY, DEFAULT_JOB_HEARTBEAT_INTERVAL, DEFAULT_JOB_POLL_INTERVAL,
    DEFAULT_JOB_QUEUE, DEFAULT_JOB_RESCUE_AFTER, DEFAULT_JOB_SWEEP_INTERVAL,
    DEFAULT_MESSAGE_PREFIX, DEFAULT_PARTITION_SIZE, DEFAULT_PUBLICATION, DEFAULT_RETENTION,
    DEFAULT_SLOT, DatabaseConfig, HttpConfig, JobBackoffConfig, JobsConfig, LogConfig,
    MAX_JOB_TIMEOUT, OnExhausted, OperatorConfig, Ordering, PeriodicConfig, QueueConfig,
    QueueLimits, Rate, RetryConfig, Secret, SourceConfig, StartFrom, SubscriptionConfig,
    WorkerConfig, WorkerType,
};
pub use duration::{DurationError, format_duration, parse_duration, serde_duration};
pub use event::{Event, Kind, Source};
pub use failure::{BoxError, Chain, panic_message};
pub use identity::ProcessId;
pub use lsn::{Lsn, LsnParseError};

/// A position in the event log: gap-free, assigned in WAL commit order, starting at 1.
pub type Position = i64;
