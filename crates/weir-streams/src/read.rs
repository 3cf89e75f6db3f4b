//! Reading streams. (To be written.)

/// Which way a read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Oldest first.
    Forward,
    /// Newest first.
    Backward,
}

/// An event as stored in a stream.
#[derive(Debug, Clone)]
pub struct RecordedEvent {}
