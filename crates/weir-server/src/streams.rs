//! The event store's streams over HTTP: append, read, list, read every stream from the log,
//! delete, truncate and snapshots. Thin handlers over `weir_streams`; the rules (expected
//! versions, idempotency by event id, what a bad event is) are the store's own, in its SQL
//! function, and its errors keep their meaning here (400, 404, 409).
//!
//! ```text
//! POST /v1/streams/{stream} ─► head = last log position ─► weir_streams::append (commits)
//!      ─► poll weir.events for this stream's new versions past head, until they are all
//!         there or min(http.max_wait, 5 s) passed ─► 201 {…, positions: [..] | null}
//! ```
//!
//! `positions` are the events' places in the global log. They exist only once ingestion has
//! read the append from the WAL, so the answer waits briefly for them; when ingestion has not
//! caught up in time (or is not running) the append is still committed and `positions` is
//! `null`. A retry that stored nothing (`duplicate`) answers 200 with `positions: null`.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;
use weir_streams::{
    Direction, Expected, LogQuery, NewEvent, RecordedEvent, Snapshot, StreamInfo, TagsMatch,
};

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};

/// The longest an append waits for its log positions (shorter when `http.max_wait` is).
const POSITIONS_WAIT: Duration = Duration::from_secs(5);

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(append, read, delete))
        .routes(routes!(list))
        .routes(routes!(read_all))
        .routes(routes!(truncate))
        .routes(routes!(save_snapshot, load_snapshot))
}

/// An append.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AppendBody {
    /// `"any"`, `"no_stream"`, `"stream_exists"` or the stream's current version (a number;
    /// `0` is `no_stream`). Defaults to `"any"`.
    #[serde(default = "any")]
    #[schema(schema_with = expected_version_schema)]
    pub(crate) expected_version: Expected,
    /// The events, stored at consecutive versions in this order, all or none.
    pub(crate) events: Vec<NewEvent>,
}

fn any() -> Expected {
    Expected::Any
}

/// [`Expected`] in JSON: one of its words, or a version (0 or more).
fn expected_version_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::String).enum_values(Some([
            "any",
            "no_stream",
            "stream_exists",
        ])))
        .item(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)))
        .examples(["no_stream"])
        .build()
        .into()
}

/// What an append stored.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Appended {
    /// The stream.
    stream: String,
    /// The events' versions, in the request's order.
    versions: Vec<i64>,
    /// The events' ids, in the same order.
    #[schema(value_type = Vec<String>)]
    ids: Vec<Uuid>,
    /// The events' log positions, or `null` when ingestion had not logged them within
    /// min(`http.max_wait`, 5 s) (the append is committed either way), and for duplicates.
    positions: Option<Vec<i64>>,
    /// An idempotent retry: every id was stored already, nothing was stored now.
    duplicate: bool,
}

/// Appends events to a stream if it is at the expected version.
#[utoipa::path(post, path = "/v1/streams/{stream}", tag = "streams",
    params(("stream" = String, Path, description = "The stream")),
    request_body = AppendBody,
    security(("bearer" = [])),
    responses((status = 201, description = "Appended", body = Appended),
              (status = 200, description = "A retry: every event id was stored already by the same append; nothing stored", body = Appended),
              (status = 400, description = "A bad event, stream name or expected version; nothing stored", body = ErrorBody),
              (status = 409, description = "`wrong_expected_version`: the stream is at another version; `event_id_conflict`: an id is stored already by another append", body = ErrorBody)))]
async fn append(
    State(state): State<AppState>,
    ApiPath(stream): ApiPath<String>,
    ApiJson(body): ApiJson<AppendBody>,
) -> Result<(StatusCode, Json<Appended>), ApiError> {
    let mut conn = state.pool().acquire().await?;
    let head: Option<i64> = sqlx::query_scalar("select max(position) from weir.source_state")
        .fetch_one(&mut *conn)
        .await?;
    let done =
        weir_streams::append(&mut conn, &stream, body.expected_version, &body.events).await?;
    drop(conn);
    let (status, positions) = if done.duplicate {
        (StatusCode::OK, None)
    } else {
        let wait = state.config().http.max_wait.min(POSITIONS_WAIT);
        (StatusCode::CREATED, positions(&state, &done, head.unwrap_or(0), wait).await?)
    };
    Ok((
        status,
        Json(Appended {
            stream: done.stream,
            versions: done.versions,
            ids: done.ids,
            positions,
            duplicate: done.duplicate,
        }),
    ))
}

/// The log positions of the appended versions, once ingestion has logged all of them.
async fn positions(
    state: &AppState,
    done: &weir_streams::AppendResult,
    head: i64,
    wait: Duration,
) -> Result<Option<Vec<i64>>, ApiError> {
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_millis(5);
    loop {
        // Every event of the append is past `head`, read before it committed.
        let found: Vec<i64> = sqlx::query_scalar(
            "select position from weir.events
              where entity = $1 and kind = 'append' and position > $2
                and key->>'stream' = $3 and (key->>'version')::bigint between $4 and $5
              order by position",
        )
        .bind(weir_core::Event::STREAM_EVENTS)
        .bind(head)
        .bind(&done.stream)
        .bind(done.first())
        .bind(done.last())
        .fetch_all(state.pool())
        .await?;
        if found.len() == done.versions.len() {
            return Ok(Some(found));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// How to read one stream.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ReadQuery {
    /// The first version to return (inclusive). Defaults to the first (forward) or the last
    /// (backward).
    from: Option<i64>,
    /// `forward` (oldest first, the default) or `backward`.
    #[param(inline)]
    direction: Option<Direction>,
    /// At most this many (1 to 10000, default 100).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<i64>,
}

/// Events of one stream.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct StreamEvents {
    /// The stream.
    stream: String,
    /// Its events, in the direction asked.
    events: Vec<RecordedEvent>,
}

/// Reads a stream's events by version (truncated versions hidden).
#[utoipa::path(get, path = "/v1/streams/{stream}", tag = "streams",
    params(("stream" = String, Path, description = "The stream"), ReadQuery),
    responses((status = 200, description = "The events", body = StreamEvents),
              (status = 400, description = "A bad parameter", body = ErrorBody),
              (status = 404, description = "No such stream, or it was deleted", body = ErrorBody)))]
async fn read(
    State(state): State<AppState>,
    ApiPath(stream): ApiPath<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Json<StreamEvents>, ApiError> {
    let events = weir_streams::read_stream(
        state.pool(),
        &stream,
        q.from,
        q.direction.unwrap_or_default(),
        q.limit.unwrap_or(100),
    )
    .await?;
    Ok(Json(StreamEvents { stream, events }))
}

/// Soft-deletes a stream: reads answer 404; its events stay in the store and the log.
/// Appending with `any` or `no_stream` starts it again after its last version.
#[utoipa::path(delete, path = "/v1/streams/{stream}", tag = "streams",
    params(("stream" = String, Path, description = "The stream")),
    security(("bearer" = [])),
    responses((status = 200, description = "Deleted", body = StreamInfo),
              (status = 404, description = "No such stream, or deleted already", body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    ApiPath(stream): ApiPath<String>,
) -> Result<Json<StreamInfo>, ApiError> {
    Ok(Json(weir_streams::delete_stream(state.pool(), &stream).await?))
}

/// Which streams to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only streams whose name starts with this.
    prefix: Option<String>,
    /// Streams after this name (the last of the previous page).
    after: Option<String>,
    /// At most this many, by name (1 to 10000, default 100).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<i64>,
}

/// Lists streams by name, deleted ones included (`deleted_at`).
#[utoipa::path(get, path = "/v1/streams", tag = "streams",
    params(ListQuery),
    responses((status = 200, description = "Streams", body = Vec<StreamInfo>),
              (status = 400, description = "A bad parameter", body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<StreamInfo>>, ApiError> {
    let streams = weir_streams::list_streams(
        state.pool(),
        q.prefix.as_deref(),
        q.limit.unwrap_or(100),
        q.after.as_deref(),
    )
    .await?;
    Ok(Json(streams))
}

/// Which appended events to read from the log.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AllQuery {
    /// Only events of this type.
    #[serde(rename = "type")]
    #[param(rename = "type", pattern = r"^[^\x00]*$")]
    event_type: Option<String>,
    /// Only events with these tags, comma-separated; none empty.
    #[param(pattern = r"^[^,\x00]*[^,\s\x00][^,\x00]*(,[^,\x00]*[^,\s\x00][^,\x00]*)*$")]
    tags: Option<String>,
    /// `any` (default: at least one of `tags`) or `all`.
    #[param(inline)]
    tags_match: Option<TagsMatch>,
    /// Events after this log position. Defaults to 0.
    after: Option<i64>,
    /// At most this many (1 to 10000, default 100).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<i64>,
}

/// Reads appended events of every stream from the log, in its global order, with positions.
#[utoipa::path(get, path = "/v1/stream-events", tag = "streams",
    params(AllQuery),
    responses((status = 200, description = "Events with their log positions", body = Vec<RecordedEvent>),
              (status = 400, description = "A bad parameter", body = ErrorBody)))]
async fn read_all(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<AllQuery>,
) -> Result<Json<Vec<RecordedEvent>>, ApiError> {
    let query = LogQuery {
        event_type: q.event_type,
        tags: q
            .tags
            .map(|t| t.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default(),
        tags_match: q.tags_match.unwrap_or_default(),
        after: q.after.unwrap_or(0),
        limit: q.limit.unwrap_or(100),
    };
    Ok(Json(weir_streams::read_log(state.pool(), &query).await?))
}

/// Where to truncate.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TruncateBody {
    /// Hide versions below this one (1 to the stream's version plus one).
    before: i64,
}

/// Hides a stream's older versions from reads; nothing is deleted (the log keeps them).
#[utoipa::path(post, path = "/v1/streams/{stream}/truncate", tag = "streams",
    params(("stream" = String, Path, description = "The stream")),
    request_body = TruncateBody,
    security(("bearer" = [])),
    responses((status = 200, description = "Truncated", body = StreamInfo),
              (status = 400, description = "`before` out of range", body = ErrorBody),
              (status = 404, description = "No such stream, or it was deleted", body = ErrorBody)))]
async fn truncate(
    State(state): State<AppState>,
    ApiPath(stream): ApiPath<String>,
    ApiJson(body): ApiJson<TruncateBody>,
) -> Result<Json<StreamInfo>, ApiError> {
    Ok(Json(weir_streams::truncate_stream(state.pool(), &stream, body.before).await?))
}

/// A snapshot to save.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotBody {
    /// The stream version the state includes (1 to the stream's version).
    version: i64,
    /// The state: any JSON value.
    #[schema(schema_with = weir_streams::read::state_schema)]
    data: Value,
}

/// Saves a snapshot of a stream's state at a version (the same version again replaces it).
#[utoipa::path(put, path = "/v1/streams/{stream}/snapshot", tag = "streams",
    params(("stream" = String, Path, description = "The stream")),
    request_body = SnapshotBody,
    security(("bearer" = [])),
    responses((status = 200, description = "Saved", body = Snapshot),
              (status = 400, description = "The version is out of range", body = ErrorBody),
              (status = 404, description = "No such stream, or it was deleted", body = ErrorBody)))]
async fn save_snapshot(
    State(state): State<AppState>,
    ApiPath(stream): ApiPath<String>,
    ApiJson(body): ApiJson<SnapshotBody>,
) -> Result<Json<Snapshot>, ApiError> {
    let saved =
        weir_streams::save_snapshot(state.pool(), &stream, body.version, &body.data).await?;
    Ok(Json(saved))
}

/// The latest snapshot of a stream.
#[utoipa::path(get, path = "/v1/streams/{stream}/snapshot", tag = "streams",
    params(("stream" = String, Path, description = "The stream")),
    responses((status = 200, description = "The snapshot with the highest version", body = Snapshot),
              (status = 404, description = "`unknown_stream`, or `no_snapshot` saved yet", body = ErrorBody)))]
async fn load_snapshot(
    State(state): State<AppState>,
    ApiPath(stream): ApiPath<String>,
) -> Result<Json<Snapshot>, ApiError> {
    match weir_streams::load_snapshot(state.pool(), &stream).await? {
        Some(s) => Ok(Json(s)),
        None => Err(ApiError::not_found(
            "no_snapshot",
            format!(
                "stream `{stream}` has no snapshot; PUT /v1/streams/{stream}/snapshot saves one"
            ),
        )),
    }
}
