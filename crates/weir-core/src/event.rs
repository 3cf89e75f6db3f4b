//! The event: one row change (or logical message) as it is stored in the log and handed to
//! consumers. Compatible in content with the WalEx/EventStreamex event, plus what ordering needs
//! (`position`, `lsn`, `xid`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Lsn, Position};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A row was inserted.
    Insert,
    /// A row was updated.
    Update,
    /// A row was deleted.
    Delete,
    /// The table was truncated (one event per table).
    Truncate,
    /// A row that existed before capture, loaded by a backfill (`weir backfill`): its
    /// `new_record` is the row as it was read, like an insert's.
    Read,
    /// A `pg_logical_emit_message` with weir's prefix.
    Message,
    /// An event appended to a stream of the event store: an insert into
    /// [`STREAM_EVENTS`](Event::STREAM_EVENTS), whose `new_record` carries the stream, version,
    /// id, type, data, metadata and tags.
    Append,
}

impl Kind {
    /// The lowercase name stored in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Insert => "insert",
            Kind::Update => "update",
            Kind::Delete => "delete",
            Kind::Truncate => "truncate",
            Kind::Read => "read",
            Kind::Message => "message",
            Kind::Append => "append",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "insert" => Kind::Insert,
            "update" => Kind::Update,
            "delete" => Kind::Delete,
            "truncate" => Kind::Truncate,
            "read" => Kind::Read,
            "message" => Kind::Message,
            "append" => Kind::Append,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the change came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Source {
    /// Database name.
    pub db: String,
    /// Schema name.
    pub schema: String,
    /// Table name (for a message: its prefix).
    pub table: String,
    /// Column name → type name, in table order.
    #[schema(value_type = Object)]
    pub columns: Map<String, Value>,
}

/// One change, as stored in `weir.events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Log position: gap-free, in WAL commit order.
    pub position: Position,
    /// Commit LSN of the source transaction (`0/16B3748`).
    #[schema(value_type = String)]
    pub lsn: Lsn,
    /// Source transaction id.
    pub xid: i64,
    /// Commit timestamp of the source transaction.
    pub commit_ts: DateTime<Utc>,
    /// What happened.
    pub kind: Kind,
    /// Table name, `schema.table` where the schema is not `public`; for messages, the prefix.
    pub entity: String,
    /// Where it came from.
    pub source: Source,
    /// Replica-identity (primary key) values; `{}` for truncate and messages.
    pub key: Value,
    /// The row after the change (insert, update); a message's `{prefix, content, transactional}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_record: Option<Value>,
    /// The row before the change (update, delete): complete with `REPLICA IDENTITY FULL`,
    /// otherwise the key columns only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_record: Option<Value>,
    /// For updates whose old row is known: `{column: {old_value, new_value}}` of changed columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<Value>,
    /// Columns whose value was not sent because it is an unchanged TOAST value. They are absent
    /// from `new_record`, never `null`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchanged_toast: Vec<String>,
}

impl Event {
    /// The entity of appended events: the event store's table (its inserts are logged as
    /// [`Kind::Append`]).
    pub const STREAM_EVENTS: &'static str = "weir.stream_events";

    /// The entity name for a table: `table` in `public`, `schema.table` elsewhere.
    pub fn entity_name(schema: &str, table: &str) -> String {
        if schema == "public" { table.to_string() } else { format!("{schema}.{table}") }
    }
}
