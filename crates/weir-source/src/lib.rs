//! weir's change source: from the replication slot's bytes to committed transactions.
//!
//! ```text
//! stream (libpq replication connection) ─► pgoutput::Decoder ─► assemble::Assembler
//!                                                 cast: text values → the event's JSON ┘
//!                                          ─► Transaction / Stage / Abort for the log writer
//! ```
//!
//! The loop that drives these parts and acknowledges the slot lives in the `weir` crate's
//! ingest module; this crate does no database writes.

pub mod assemble;
pub mod cast;
mod error;
mod libpq;
pub mod pgoutput;
pub mod stream;

pub use error::Error;
