//! weir: ordered, reliable reactions to changes in PostgreSQL.
//!
//! This crate is the facade and the engine that wires the parts together:
//!
//! ```text
//! app writes ─► tables ─WAL─► source (weir-source: slot, pgoutput, casts, transactions)
//!                               │  ingest: one leader per slot (advisory-lock lease)
//!                               ▼
//!                             log (weir-log: weir.events, position = WAL commit order)
//!                               │  the slot is acknowledged only after the append commits
//!                               ▼
//!                             readers: `weir tail`, consumers (operators, subscriptions)
//! ```
//!
//! - [`setup::init`] creates the schema, the publication and the slot (idempotent).
//! - [`doctor::diagnose`] checks the server and prints the exact fix for each problem.
//! - [`replica_identity`] finds the watched tables whose replica identity must be full for an
//!   operator's key mapping to work (doctor fails them, init sets them, start refuses them).
//! - [`ingest::run`] streams changes into the log until cancelled, reconnecting with backoff,
//!   waiting as a standby while another process holds the slot.
//! - [`status::source_status`] reports slot lag, position, rate and delay.
//! - [`retention::pass`] drops the log's old partitions, keeping what consumers still need.
//! - [`Weir::builder`] runs all of it in one process: ingestion, the consumer engine with the
//!   operators of `weir.toml` and those added in Rust, until stopped.
//!
//! ```no_run
//! # async fn demo() -> Result<(), weir::Error> {
//! let config = weir::Config::load(Some("weir.toml".as_ref()), false, std::env::vars())?;
//! let pool = weir::db::connect(&config).await?;
//! weir::setup::init(&pool, &config).await?;
//! let cancel = tokio_util::sync::CancellationToken::new();
//! weir::ingest::run(&config, &pool, &weir::ProcessId::generate(), cancel).await?;
//! # Ok(()) }
//! ```

mod app;
pub mod backfill;
pub mod db;
pub mod doctor;
mod error;
mod fault;
pub mod ingest;
pub mod replica_identity;
pub mod retention;
pub mod setup;
pub mod status;

pub use app::{Running, Weir, WeirBuilder};
pub use error::{ConnectCause, Error, Result};
pub use weir_consumer::{
    BoxError, ConsumerSpec, ConsumerState, ErrorReporter, LaneState, Operator, OperatorError,
    Selector, SqlOperator, TracingReporter, process, resume, skip, status as consumer_status,
};
pub use weir_core::{Config, Event, Kind, Lsn, Position, ProcessId};
pub use weir_log::{EventFilter, LogReader, Wake};
