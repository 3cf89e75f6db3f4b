//! Reading the event store, and the streams' own bookkeeping: the second step of the data flow,
//! after [`crate::append`].
//!
//! ```text
//! weir.stream_events ──► read_stream(stream, from, direction, limit)   one stream, by version
//! weir.streams       ──► list_streams / stream_info / delete_stream / truncate_stream
//! weir.events        ──► read_log(type, tags any|all, after, limit)   every stream, in the
//!   (kind `append`)                                                   log's global order
//! weir.stream_snapshots ► save_snapshot / load_snapshot (the latest)
//! ```
//!
//! Invariants and choices:
//!
//! - Nothing is ever physically deleted from `weir.stream_events`, so the log (which already
//!   holds every appended event) and the store never disagree. Truncating sets the stream's
//!   `truncate_before`: stream reads hide older versions. Deleting is soft: it sets
//!   `deleted_at` and hides every version so far (`truncate_before = version + 1`); reads and
//!   snapshots then answer [`Error::UnknownStream`]. Appending again with `any` or `no_stream`
//!   brings the stream back, *continuing* after its last version (versions are never reused,
//!   so an event's `(stream, version)` names one event for ever); the old events stay hidden.
//! - Stream reads carry no log position (`position` is `None`): the store does not know it.
//!   Reads from the log ([`read_log`]) carry it and ignore truncation and deletion: the log is
//!   the history, and it is cut by the log's retention only.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{Error, Result};

/// The most events or streams one read returns.
pub const MAX_LIMIT: i64 = 10_000;

/// Which way a read goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Oldest first.
    #[default]
    Forward,
    /// Newest first.
    Backward,
}

impl std::str::FromStr for Direction {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "forward" => Ok(Self::Forward),
            "backward" => Ok(Self::Backward),
            _ => Err(Error::Invalid(format!("direction must be forward or backward, got `{s}`"))),
        }
    }
}

/// An event as stored in a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RecordedEvent {
    /// Its stream.
    pub stream: String,
    /// Its version in the stream (from 1).
    pub version: i64,
    /// Its id.
    #[schema(value_type = String)]
    pub id: Uuid,
    /// What happened.
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub event_type: String,
    /// Its payload: any JSON value but `null`.
    #[schema(schema_with = crate::append::payload_schema)]
    pub data: Value,
    /// Its metadata (`{}` when none was given).
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// Its tags.
    pub tags: Vec<String>,
    /// When the append's transaction started.
    pub recorded_at: DateTime<Utc>,
    /// Its position in the log, for reads from the log; `None` for stream reads.
    #[serde(default)]
    #[sqlx(default)]
    pub position: Option<i64>,
}

/// A stream's bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StreamInfo {
    /// The stream.
    pub stream: String,
    /// Its last version.
    pub version: i64,
    /// Its first append.
    pub created_at: DateTime<Utc>,
    /// Its last append, truncation or deletion.
    pub updated_at: DateTime<Utc>,
    /// When it was deleted, if it is.
    pub deleted_at: Option<DateTime<Utc>>,
    /// Stream reads hide versions below this (0: nothing hidden).
    pub truncate_before: i64,
    /// The stream's metadata (`{}`).
    #[schema(value_type = Object)]
    pub metadata: Value,
}

/// The OpenAPI schema of a snapshot's state: any JSON value, the application's to choose.
pub fn state_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    let types = [
        Type::Object,
        Type::Array,
        Type::String,
        Type::Number,
        Type::Integer,
        Type::Boolean,
        Type::Null,
    ];
    ObjectBuilder::new().schema_type(types.into_iter().collect::<SchemaType>()).build()
}

/// A snapshot: a stream's state folded up to a version, saved by the application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Snapshot {
    /// The stream.
    pub stream: String,
    /// The version the state includes.
    pub version: i64,
    /// The state: any JSON value.
    #[schema(schema_with = crate::read::state_schema)]
    pub data: Value,
    /// When it was saved.
    pub taken_at: DateTime<Utc>,
}

/// How a log read matches tags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TagsMatch {
    /// An event with at least one of the tags.
    #[default]
    Any,
    /// An event with every one of the tags.
    All,
}

/// Which appended events to read from the log, across every stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    /// Only events of this type.
    pub event_type: Option<String>,
    /// Only events with these tags (matched by `tags_match`); empty: any tags.
    pub tags: Vec<String>,
    /// Any or all of `tags`.
    pub tags_match: TagsMatch,
    /// Events after this log position. Defaults to 0 (from the start).
    pub after: i64,
    /// At most this many (1 to [`MAX_LIMIT`]). Defaults to 100.
    pub limit: i64,
}

impl Default for LogQuery {
    fn default() -> Self {
        Self {
            event_type: None,
            tags: Vec::new(),
            tags_match: TagsMatch::Any,
            after: 0,
            limit: 100,
        }
    }
}

/// The columns of a [`RecordedEvent`] read from `weir.stream_events` (a macro, so statements
/// stay `&'static str`: sqlx audits dynamic SQL).
macro_rules! event_columns {
    () => {
        "stream, version, id, type, data, metadata, tags, recorded_at, null::bigint as position"
    };
}

/// The columns of a [`StreamInfo`].
macro_rules! stream_columns {
    () => {
        "stream, version, created_at, updated_at, deleted_at, truncate_before, metadata"
    };
}

fn check_limit(limit: i64) -> Result<()> {
    if (1..=MAX_LIMIT).contains(&limit) {
        Ok(())
    } else {
        Err(Error::Invalid(format!("limit {limit} is not from 1 to {MAX_LIMIT}")))
    }
}

/// Reads up to `limit` events of `stream`: forward from version `from` inclusive (default: the
/// first visible one), or backward from `from` inclusive (default: the last one). Versions
/// hidden by truncation are skipped. A deleted or unknown stream is [`Error::UnknownStream`].
pub async fn read_stream(
    pool: &PgPool,
    stream: &str,
    from: Option<i64>,
    direction: Direction,
    limit: i64,
) -> Result<Vec<RecordedEvent>> {
    check_limit(limit)?;
    let info = stream_info(pool, stream).await?;
    if info.deleted_at.is_some() {
        return Err(Error::UnknownStream(stream.to_string()));
    }
    let sql = match direction {
        Direction::Forward => concat!(
            "select ",
            event_columns!(),
            " from weir.stream_events
             where stream = $1 and version >= greatest($2, $3)
             order by version limit $4"
        ),
        Direction::Backward => concat!(
            "select ",
            event_columns!(),
            " from weir.stream_events
             where stream = $1 and version >= $3 and version <= $2
             order by version desc limit $4"
        ),
    };
    let from = from.unwrap_or(match direction {
        Direction::Forward => 1,
        Direction::Backward => i64::MAX,
    });
    Ok(sqlx::query_as(sql)
        .bind(stream)
        .bind(from)
        .bind(info.truncate_before)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// Streams by name, after `after` (exclusive), starting with `prefix`, deleted ones included
/// (see `deleted_at`).
pub async fn list_streams(
    pool: &PgPool,
    prefix: Option<&str>,
    limit: i64,
    after: Option<&str>,
) -> Result<Vec<StreamInfo>> {
    check_limit(limit)?;
    let sql = concat!(
        "select ",
        stream_columns!(),
        " from weir.streams
         where version > 0
           and ($1::text is null or starts_with(stream, $1))
           and ($2::text is null or stream > $2)
         order by stream limit $3"
    );
    Ok(sqlx::query_as(sql).bind(prefix).bind(after).bind(limit).fetch_all(pool).await?)
}

/// A stream's bookkeeping, deleted or not; [`Error::UnknownStream`] if it never had an event.
pub async fn stream_info(pool: &PgPool, stream: &str) -> Result<StreamInfo> {
    let sql = concat!(
        "select ",
        stream_columns!(),
        " from weir.streams where stream = $1 and version > 0"
    );
    sqlx::query_as(sql)
        .bind(stream)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| Error::UnknownStream(stream.to_string()))
}

/// Soft-deletes `stream`: reads answer [`Error::UnknownStream`], its events stay stored (and
/// in the log). Appending with `any` or `no_stream` starts it again after its last version.
pub async fn delete_stream(pool: &PgPool, stream: &str) -> Result<StreamInfo> {
    let sql = concat!(
        "update weir.streams
            set deleted_at = now(), updated_at = now(), truncate_before = version + 1
          where stream = $1 and version > 0 and deleted_at is null
          returning ",
        stream_columns!()
    );
    sqlx::query_as(sql)
        .bind(stream)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| Error::UnknownStream(stream.to_string()))
}

/// Hides the versions of `stream` below `before` from stream reads (1 to the stream's version
/// plus one; a lower value than an earlier truncation keeps the earlier one). Nothing is
/// deleted, so the log stays the whole history.
pub async fn truncate_stream(pool: &PgPool, stream: &str, before: i64) -> Result<StreamInfo> {
    let mut tx = pool.begin().await?;
    let sql = concat!(
        "select ",
        stream_columns!(),
        " from weir.streams
          where stream = $1 and version > 0 and deleted_at is null for update"
    );
    let info: StreamInfo = sqlx::query_as(sql)
        .bind(stream)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::UnknownStream(stream.to_string()))?;
    if before < 1 || before > info.version + 1 {
        return Err(Error::Invalid(format!(
            "cannot truncate stream `{stream}` before version {before}: it must be from 1 to {} \
             (the stream's version plus one, which hides every event)",
            info.version + 1
        )));
    }
    let sql = concat!(
        "update weir.streams
            set truncate_before = greatest(truncate_before, $2), updated_at = now()
          where stream = $1 returning ",
        stream_columns!()
    );
    let info = sqlx::query_as(sql).bind(stream).bind(before).fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok(info)
}

/// Appended events of every stream from the log, in its global order, with their positions.
/// Truncation and deletion do not apply here: the log is the history.
pub async fn read_log(pool: &PgPool, query: &LogQuery) -> Result<Vec<RecordedEvent>> {
    check_limit(query.limit)?;
    if query.tags.iter().any(String::is_empty) {
        return Err(Error::Invalid("a tag to match is empty; give non-empty tags".into()));
    }
    let rows: Vec<(i64, Value)> = sqlx::query_as(
        "select position, new_record from weir.events
          where entity = $1 and kind = 'append' and position > $2
            and ($3::text is null or new_record->>'type' = $3)
            and (cardinality($4::text[]) = 0
                 or case when $5 then new_record->'tags' ?& $4 else new_record->'tags' ?| $4 end)
          order by position
          limit $6",
    )
    .bind(weir_core::Event::STREAM_EVENTS)
    .bind(query.after)
    .bind(query.event_type.as_deref())
    .bind(&query.tags)
    .bind(query.tags_match == TagsMatch::All)
    .bind(query.limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(position, record)| {
            let mut event: RecordedEvent =
                serde_json::from_value(record).map_err(|e| weir_log::Error::Corrupt {
                    position,
                    problem: format!("an appended event's record does not read back: {e}"),
                })?;
            event.position = Some(position);
            Ok(event)
        })
        .collect()
}

/// Saves `data` as the state of `stream` at `version` (1 to the stream's version); saving the
/// same version again replaces it.
pub async fn save_snapshot(
    pool: &PgPool,
    stream: &str,
    version: i64,
    data: &Value,
) -> Result<Snapshot> {
    let info = stream_info(pool, stream).await?;
    if info.deleted_at.is_some() {
        return Err(Error::UnknownStream(stream.to_string()));
    }
    if version < 1 || version > info.version {
        return Err(Error::Invalid(format!(
            "a snapshot of stream `{stream}` must be at a version from 1 to {}, got {version}",
            info.version
        )));
    }
    Ok(sqlx::query_as(
        "insert into weir.stream_snapshots (stream, version, data) values ($1, $2, $3)
         on conflict (stream, version) do update set data = excluded.data, taken_at = now()
         returning stream, version, data, taken_at",
    )
    .bind(stream)
    .bind(version)
    .bind(data)
    .fetch_one(pool)
    .await?)
}

/// The latest snapshot of `stream` (highest version), if any was saved.
pub async fn load_snapshot(pool: &PgPool, stream: &str) -> Result<Option<Snapshot>> {
    let info = stream_info(pool, stream).await?;
    if info.deleted_at.is_some() {
        return Err(Error::UnknownStream(stream.to_string()));
    }
    Ok(sqlx::query_as(
        "select stream, version, data, taken_at from weir.stream_snapshots
          where stream = $1 order by version desc limit 1",
    )
    .bind(stream)
    .fetch_optional(pool)
    .await?)
}
