//! Appending to a stream: one transaction, the expected version checked under the stream's
//! lock, idempotent by event id. (To be written.)

/// What the stream must be at for an append to go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Whatever it is at.
    Any,
    /// The stream must not exist.
    NoStream,
    /// The stream must exist.
    StreamExists,
    /// The stream's last version must be exactly this.
    Exact(i64),
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {}

/// What an append stored.
#[derive(Debug, Clone)]
pub struct AppendResult {}

/// Appends.
pub async fn append() {}
