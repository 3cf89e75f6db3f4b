//! All the SQL of consumers and process status, in one place (the tables are created by
//! `migrations/`, owned by this crate).
//!
//! ```text
//! weir.consumers          one row per consumer: lanes, selector, state (running | halted)
//!   └ weir.checkpoints    one row per lane: position, lease (owner, lease_until, fence), status
//! weir.consumer_nodes     processes running consumers (heartbeats; lanes are shared among them)
//! weir.consumer_failures  every failed attempt and its outcome (retry | halt | skip | park)
//! weir.parked             events set aside, with their key; retried or discarded on request
//! weir.rebuilds           a rebuild of an operator's target table in progress (or killed)
//! ```
//!
//! - [`consumer`]: registering, halting, resuming and skipping a consumer.
//! - [`lease`]: processes and the lane leases the supervisor holds.
//! - [`lane`]: what a lane writes: fenced checkpoints, status, failures, parked events.
//! - [`status`]: the reads behind `weir status` and the parked-event commands.
//! - [`process`]: the reads behind process status and the `processed` channel.
//! - [`rebuild`]: a rebuild's row (`weir.rebuilds`), lock and fence, and the statements on the
//!   application's target table (the shadow, the swap).
//!
//! Every write a lane makes on behalf of an event is fenced by its lease (`owner = node and
//! fence = f`), so a process that lost a lane cannot move its checkpoint.

pub(crate) mod consumer;
pub(crate) mod lane;
pub(crate) mod lease;
pub(crate) mod process;
pub(crate) mod rebuild;
pub(crate) mod status;

/// `42P01`: a table of weir's schema does not exist (yet: `weir init` or the first consumer
/// has not run).
fn undefined_table(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01"))
}
