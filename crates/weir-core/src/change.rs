//! A change before it has a log position, and the committed transaction that carries it:
//! what the source hands to the log.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::{Kind, Lsn, Source};

/// A change before it has a log position.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// What happened.
    pub kind: Kind,
    /// Entity name (`posts`, `sales.orders`, a message prefix).
    pub entity: String,
    /// The table's shape; `None` for messages.
    pub relation: Option<Arc<Source>>,
    /// Replica-identity values (`{}` when none).
    pub key: Value,
    /// Row after the change.
    pub new_record: Option<Value>,
    /// Row before the change.
    pub old_record: Option<Value>,
    /// Changed columns of an update.
    pub changes: Option<Value>,
    /// Columns left out as unchanged TOAST values.
    pub unchanged_toast: Vec<String>,
}

/// A committed source transaction, ready to be logged.
#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    /// Top-level transaction id.
    pub xid: u32,
    /// End of the commit record: the position the slot is acknowledged with.
    pub commit_lsn: Lsn,
    /// Commit time.
    pub commit_ts: DateTime<Utc>,
    /// The changes in WAL order (empty for a streamed transaction, whose changes are staged).
    pub changes: Vec<Change>,
    /// The changes were streamed before the commit and wait in `weir.staged_changes`.
    pub staged: bool,
}
