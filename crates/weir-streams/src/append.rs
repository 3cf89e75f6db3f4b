//! Appending to a stream: the first step of the event store's data flow.
//!
//! ```text
//! append(conn, stream, expected, events)
//!   └─ select … from weir.append($stream, $expected, $events)      (0001_streams.sql)
//!        1. check the arguments                                     → WR400 → Error::Invalid
//!        2. lock the stream: upsert weir.streams, `for update`
//!        3. every id stored already, here, in order? return them    → duplicate = true
//!           some stored, or elsewhere?                              → WR422 → EventIdConflict
//!        4. check the expected version (a deleted stream is absent) → WR409 → WrongExpectedVersion
//!        5. insert at the next versions, move the stream's version
//!   ─► commit (the caller's, when `conn` is inside its transaction)
//!   ─► WAL ─► ingestion ─► weir.events, kind `append`
//! ```
//!
//! The rules live once, in the SQL function, so an append from Rust, from HTTP and from any
//! other language's `select * from weir.append(…)` behaves the same. This module checks the cheap
//! things first for clearer messages and turns the function's SQLSTATEs into typed errors.
//!
//! Invariants: versions start at 1 and are gap-free within a stream (the stream's row lock
//! orders concurrent appends); one call stores all its events or none; an event id is stored
//! once in the whole store.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{Error, Result};

/// What the stream must be at for an append to go through.
///
/// Written `any`, `no_stream`, `stream_exists` or a version number (`0` is `no_stream`), in
/// text, JSON (a string or a number) and SQL alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Whatever it is at.
    Any,
    /// The stream must not exist (or have been deleted).
    NoStream,
    /// The stream must exist and not be deleted.
    StreamExists,
    /// The stream's last version must be exactly this.
    Exact(i64),
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no_stream"),
            Self::StreamExists => f.write_str("stream_exists"),
            Self::Exact(v) => write!(f, "{v}"),
        }
    }
}

impl FromStr for Expected {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "any" => Ok(Self::Any),
            "no_stream" => Ok(Self::NoStream),
            "stream_exists" => Ok(Self::StreamExists),
            _ => match s.parse::<i64>() {
                Ok(v) if v >= 0 => Ok(Self::Exact(v)),
                _ => Err(Error::Invalid(format!(
                    "expected must be any, no_stream, stream_exists or a version number (0 or \
                     more), got `{s}`"
                ))),
            },
        }
    }
}

impl Serialize for Expected {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Exact(v) => s.serialize_i64(*v),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Expected {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => s.parse().map_err(serde::de::Error::custom),
            Value::Number(n) => weir_core::json::whole_i64(&n)
                .filter(|v| *v >= 0)
                .map(Self::Exact)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "expected version {n} is not a whole number of 0 or more"
                    ))
                }),
            other => Err(serde::de::Error::custom(format!(
                "expected must be \"any\", \"no_stream\", \"stream_exists\" or a version number, \
                 got {other}"
            ))),
        }
    }
}

/// The OpenAPI schema of an event's payload: any JSON value but `null`.
pub fn payload_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    let types =
        [Type::Object, Type::Array, Type::String, Type::Number, Type::Integer, Type::Boolean];
    ObjectBuilder::new().schema_type(types.into_iter().collect::<SchemaType>()).build()
}

/// An event to append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    /// Its id, the key of idempotency: a retry with the same ids stores nothing again.
    /// Defaults to a new random UUID (then a retry cannot be recognised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]
    pub id: Option<Uuid>,
    /// What happened (`order_placed`); 1 to 256 characters.
    #[serde(rename = "type")]
    #[schema(min_length = 1, max_length = 256)]
    pub event_type: String,
    /// Its payload: any JSON value but `null`.
    #[schema(schema_with = payload_schema)]
    pub data: Value,
    /// A JSON object about the event (correlation ids, the user). Defaults to `{}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// Tags, for reading all streams by tag. Defaults to none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl NewEvent {
    /// An event of `event_type` with `data`, a new id, no metadata and no tags.
    pub fn new(event_type: impl Into<String>, data: Value) -> Self {
        Self { id: None, event_type: event_type.into(), data, metadata: None, tags: Vec::new() }
    }

    /// With this id (for idempotent retries).
    pub fn id(mut self, id: Uuid) -> Self {
        self.id = Some(id);
        self
    }

    /// With this metadata (a JSON object).
    pub fn metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// With this tag added.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }
}

/// What an append stored (or, for a retry, had stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendResult {
    /// The stream.
    pub stream: String,
    /// The versions of the events, in the request's order (consecutive).
    pub versions: Vec<i64>,
    /// The ids of the events, in the same order.
    pub ids: Vec<Uuid>,
    /// True when every event was stored already by an earlier append with the same ids (a
    /// retry): nothing was stored this time and `versions` are the stored ones.
    pub duplicate: bool,
}

impl AppendResult {
    /// The first version appended.
    pub fn first(&self) -> i64 {
        self.versions.first().copied().unwrap_or(0)
    }

    /// The last version appended: the stream's version right after this append.
    pub fn last(&self) -> i64 {
        self.versions.last().copied().unwrap_or(0)
    }
}

/// Appends `events` to `stream` if it is at `expected`, in one statement of `conn`.
///
/// Give a connection inside a transaction (`&mut *tx`) to append together with other writes:
/// the events commit, or roll back, with them. Errors: [`Error::WrongExpectedVersion`],
/// [`Error::Invalid`] (nothing was stored), [`Error::EventIdConflict`].
pub async fn append(
    conn: &mut PgConnection,
    stream: &str,
    expected: Expected,
    events: &[NewEvent],
) -> Result<AppendResult> {
    check(stream, expected, events)?;
    let payload = serde_json::to_value(events)
        .map_err(|e| Error::Invalid(format!("the events cannot be written as JSON: {e}")))?;
    let rows: Vec<(Uuid, i64, bool)> =
        sqlx::query_as("select id, version, duplicate from weir.append($1, $2, $3)")
            .bind(stream)
            .bind(expected.to_string())
            .bind(payload)
            .fetch_all(conn)
            .await
            .map_err(Error::from_append)?;
    let duplicate = rows.first().is_some_and(|r| r.2);
    Ok(AppendResult {
        stream: stream.to_string(),
        versions: rows.iter().map(|r| r.1).collect(),
        ids: rows.iter().map(|r| r.0).collect(),
        duplicate,
    })
}

/// The checks that need no database, worded like the SQL function's; [`append`] makes them
/// first.
pub fn check(stream: &str, expected: Expected, events: &[NewEvent]) -> Result<()> {
    let invalid = |m: String| Err(Error::Invalid(m));
    if stream.is_empty() || stream.chars().count() > 256 {
        return invalid(format!("the stream name must be 1 to 256 characters, got `{stream}`"));
    }
    if let Expected::Exact(v) = expected
        && v < 0
    {
        return invalid(format!("expected version {v} is negative; versions start at 1"));
    }
    if events.is_empty() {
        return invalid("events is empty: an append stores at least one event".into());
    }
    for (i, e) in events.iter().enumerate() {
        let n = i + 1;
        if e.event_type.is_empty() || e.event_type.chars().count() > 256 {
            return invalid(format!("event {n} needs a type: a string of 1 to 256 characters"));
        }
        if e.data.is_null() {
            return invalid(format!(
                "event {n} (type '{}') has no data; give any JSON value but null",
                e.event_type
            ));
        }
        if e.metadata.as_ref().is_some_and(|m| !m.is_object() && !m.is_null()) {
            return invalid(format!(
                "event {n} (type '{}'): metadata must be a JSON object",
                e.event_type
            ));
        }
        if e.tags.iter().any(String::is_empty) {
            return invalid(format!(
                "event {n} (type '{}'): tags must be an array of non-empty strings",
                e.event_type
            ));
        }
    }
    Ok(())
}

/// The SQLSTATEs `weir.append` raises (see `0001_streams.sql`).
mod sqlstate {
    pub(super) const WRONG_EXPECTED_VERSION: &str = "WR409";
    pub(super) const INVALID: &str = "WR400";
    pub(super) const EVENT_ID_CONFLICT: &str = "WR422";
    pub(super) const UNIQUE_VIOLATION: &str = "23505";
}

impl Error {
    /// Classifies a failure of `weir.append` by SQLSTATE; anything not ours is
    /// [`Error::Database`].
    pub(crate) fn from_append(e: sqlx::Error) -> Self {
        let Some(db) = e.as_database_error() else { return Self::Database(e) };
        let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
        let detail = db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .and_then(|pg| pg.detail())
            .and_then(|d| serde_json::from_str::<Value>(d).ok());
        match code.as_str() {
            sqlstate::WRONG_EXPECTED_VERSION => {
                let field = |k: &str| {
                    detail
                        .as_ref()
                        .and_then(|d| d.get(k))
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                Self::WrongExpectedVersion {
                    stream: field("stream"),
                    expected: field("expected"),
                    actual: field("actual"),
                }
            }
            sqlstate::INVALID => Self::Invalid(db.message().to_string()),
            sqlstate::EVENT_ID_CONFLICT => Self::EventIdConflict(db.message().to_string()),
            sqlstate::UNIQUE_VIOLATION if db.constraint() == Some("stream_events_id_key") => {
                Self::EventIdConflict(
                    "an event id of this append was stored at the same moment by an append to \
                     another stream; new events need new ids"
                        .into(),
                )
            }
            _ => Self::Database(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_words_round_trip() {
        for (text, e) in [
            ("any", Expected::Any),
            ("no_stream", Expected::NoStream),
            ("stream_exists", Expected::StreamExists),
            ("7", Expected::Exact(7)),
        ] {
            assert_eq!(text.parse::<Expected>().unwrap(), e);
            assert_eq!(e.to_string(), text);
        }
        assert!("-1".parse::<Expected>().is_err());
        assert!("some".parse::<Expected>().is_err());
        assert_eq!(serde_json::to_value(Expected::Exact(3)).unwrap(), serde_json::json!(3));
        assert_eq!(serde_json::to_value(Expected::Any).unwrap(), serde_json::json!("any"));
        let e: Expected = serde_json::from_value(serde_json::json!(4)).unwrap();
        assert_eq!(e, Expected::Exact(4));
        let e: Expected = serde_json::from_value(serde_json::json!("12")).unwrap();
        assert_eq!(e, Expected::Exact(12));
        assert!(serde_json::from_value::<Expected>(serde_json::json!(-2)).is_err());
        assert!(serde_json::from_value::<Expected>(serde_json::json!(true)).is_err());
    }

    #[test]
    fn new_event_uses_the_field_type() {
        let e: NewEvent =
            serde_json::from_value(serde_json::json!({"type": "t", "data": {"a": 1}})).unwrap();
        assert_eq!(e, NewEvent::new("t", serde_json::json!({"a": 1})));
        let v = serde_json::to_value(NewEvent::new("t", serde_json::json!(1)).tag("x")).unwrap();
        assert_eq!(v, serde_json::json!({"type": "t", "data": 1, "tags": ["x"]}));
        assert!(serde_json::from_value::<NewEvent>(serde_json::json!({"type": "t"})).is_err());
        assert!(
            serde_json::from_value::<NewEvent>(serde_json::json!({"type": "t", "data": 1, "x": 1}))
                .is_err()
        );
    }
}
