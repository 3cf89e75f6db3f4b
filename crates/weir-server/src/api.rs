//! The JSON API under `/v1`: health, readiness, the source, consumers (resume, skip, parked),
//! process status (check, long-poll) and the log. Thin handlers over the library: every answer
//! comes from the database, so every weir process answers the same.

use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, extract::State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use weir_consumer::status::{ConsumerStatus, Failure, Parked};
use weir_core::{Event, Kind};
use weir_log::EventFilter;

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
use crate::too_early::{Watermark, too_early_response};

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(source))
        .routes(routes!(consumers))
        .routes(routes!(consumer))
        .routes(routes!(resume))
        .routes(routes!(skip))
        .routes(routes!(all_parked))
        .routes(routes!(consumer_parked))
        .routes(routes!(consumer_failures))
        .routes(routes!(retry_parked))
        .routes(routes!(discard_parked))
        .routes(routes!(process_entity))
        .routes(routes!(process_check))
        .routes(routes!(process_wait))
        .routes(routes!(log))
}

/// Liveness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Health {
    /// Always `ok`.
    status: String,
}

/// The process is up (it does not look at the database).
#[utoipa::path(get, path = "/v1/health", tag = "health",
    responses((status = 200, description = "Up", body = Health)))]
async fn health() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

/// Readiness checks.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Ready {
    /// All checks passed.
    ready: bool,
    /// The database answers.
    database: bool,
    /// weir's schema is migrated (`weir init` ran).
    schema: bool,
    /// What failed, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<String>,
}

/// Ready to serve: the database answers and weir's schema exists.
#[utoipa::path(get, path = "/v1/ready", tag = "health",
    responses((status = 200, description = "Ready", body = Ready),
              (status = 503, description = "Not ready; `problem` says why", body = Ready)))]
async fn ready(State(state): State<AppState>) -> Response {
    let check: Result<Option<String>, sqlx::Error> =
        sqlx::query_scalar("select to_regclass('weir.checkpoints')::text")
            .fetch_one(state.pool())
            .await;
    let r = match check {
        Ok(Some(_)) => Ready { ready: true, database: true, schema: true, problem: None },
        Ok(None) => Ready {
            ready: false,
            database: true,
            schema: false,
            problem: Some("weir's schema is missing; run `weir init`".into()),
        },
        Err(e) => {
            tracing::warn!(error = %e, "readiness: database unreachable");
            Ready {
                ready: false,
                database: false,
                schema: false,
                problem: Some("the database does not answer".into()),
            }
        }
    };
    let status = if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(r)).into_response()
}

/// The source: slot lag, log position, rate, delay and who holds the slot.
#[utoipa::path(get, path = "/v1/source", tag = "source",
    responses((status = 200, description = "Source status", body = weir::status::SourceStatus),
              (status = 401, description = "Token required", body = ErrorBody)))]
async fn source(
    State(state): State<AppState>,
) -> Result<Json<weir::status::SourceStatus>, ApiError> {
    Ok(Json(weir::status::source_status(state.pool(), state.config()).await?))
}

/// Every consumer with its lanes.
#[utoipa::path(get, path = "/v1/consumers", tag = "consumers",
    responses((status = 200, description = "Consumers", body = Vec<ConsumerStatus>),
              (status = 401, description = "Token required", body = ErrorBody)))]
async fn consumers(State(state): State<AppState>) -> Result<Json<Vec<ConsumerStatus>>, ApiError> {
    Ok(Json(weir_consumer::status::consumers(state.pool()).await?))
}

async fn find(state: &AppState, name: &str) -> Result<ConsumerStatus, ApiError> {
    weir_consumer::status::consumers(state.pool())
        .await?
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| {
            ApiError::not_found(
                "unknown_consumer",
                format!("no consumer named `{name}`; GET /v1/consumers lists them"),
            )
        })
}

/// One consumer with its lanes.
#[utoipa::path(get, path = "/v1/consumers/{name}", tag = "consumers",
    params(("name" = String, Path, description = "Consumer name")),
    responses((status = 200, description = "The consumer", body = ConsumerStatus),
              (status = 404, description = "No such consumer", body = ErrorBody)))]
async fn consumer(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ConsumerStatus>, ApiError> {
    Ok(Json(find(&state, &name).await?))
}

/// The answer to resume.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Resumed {
    /// The consumer.
    pub(crate) consumer: String,
    /// False when it was not halted (nothing changed).
    pub(crate) resumed: bool,
}

/// Resumes a halted consumer at the event it halted on.
#[utoipa::path(post, path = "/v1/consumers/{name}/resume", tag = "consumers",
    params(("name" = String, Path, description = "Consumer name")),
    security(("bearer" = [])),
    responses((status = 200, description = "Resumed (or was not halted)", body = Resumed),
              (status = 401, description = "Token missing or wrong", body = ErrorBody),
              (status = 403, description = "No token configured", body = ErrorBody),
              (status = 404, description = "No such consumer", body = ErrorBody)))]
async fn resume(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Resumed>, ApiError> {
    let resumed = weir_consumer::resume(state.pool(), &name).await?;
    tracing::info!(consumer = %name, resumed, "resume over HTTP");
    Ok(Json(Resumed { consumer: name, resumed }))
}

/// The answer to skip.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Skipped {
    /// The consumer.
    pub(crate) consumer: String,
    /// The position skipped.
    pub(crate) skipped: i64,
}

/// Skips the event a halted consumer stopped on (recorded as skipped) and resumes after it.
#[utoipa::path(post, path = "/v1/consumers/{name}/skip", tag = "consumers",
    params(("name" = String, Path, description = "Consumer name")),
    security(("bearer" = [])),
    responses((status = 200, description = "Skipped", body = Skipped),
              (status = 401, description = "Token missing or wrong", body = ErrorBody),
              (status = 403, description = "No token configured", body = ErrorBody),
              (status = 404, description = "No such consumer", body = ErrorBody),
              (status = 409, description = "The consumer is not halted", body = ErrorBody)))]
async fn skip(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Skipped>, ApiError> {
    let skipped = weir_consumer::skip(state.pool(), &name).await?;
    tracing::info!(consumer = %name, skipped, "skip over HTTP");
    Ok(Json(Skipped { consumer: name, skipped }))
}

/// Every parked event, oldest first.
#[utoipa::path(get, path = "/v1/parked", tag = "consumers",
    responses((status = 200, description = "Parked events", body = Vec<Parked>)))]
async fn all_parked(State(state): State<AppState>) -> Result<Json<Vec<Parked>>, ApiError> {
    Ok(Json(weir_consumer::status::parked(state.pool(), None).await?))
}

/// The parked events of one consumer, oldest first.
#[utoipa::path(get, path = "/v1/consumers/{name}/parked", tag = "consumers",
    params(("name" = String, Path, description = "Consumer name")),
    responses((status = 200, description = "Parked events", body = Vec<Parked>),
              (status = 404, description = "No such consumer", body = ErrorBody)))]
async fn consumer_parked(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Vec<Parked>>, ApiError> {
    find(&state, &name).await?;
    Ok(Json(weir_consumer::status::parked(state.pool(), Some(&name)).await?))
}

/// How many failures to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct FailuresQuery {
    /// At most this many, newest first (1 to 1000, default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// A consumer's latest failed attempts, newest first: retried, halted on, skipped or parked.
#[utoipa::path(get, path = "/v1/consumers/{name}/failures", tag = "consumers",
    params(("name" = String, Path, description = "Consumer name"), FailuresQuery),
    responses((status = 200, description = "Failed attempts", body = Vec<Failure>),
              (status = 400, description = "A bad limit", body = ErrorBody),
              (status = 404, description = "No such consumer", body = ErrorBody)))]
async fn consumer_failures(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<FailuresQuery>,
) -> Result<Json<Vec<Failure>>, ApiError> {
    let limit = crate::error::page_limit(q.limit, 50)?;
    find(&state, &name).await?;
    Ok(Json(weir_consumer::status::failures(state.pool(), &name, limit).await?))
}

/// Which parked events: one position, or all of the consumer's when absent.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ParkedSelection {
    /// Only this position.
    #[serde(default)]
    pub(crate) position: Option<i64>,
}

/// How many parked events were affected.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct ParkedCount {
    /// The consumer.
    pub(crate) consumer: String,
    /// Parked events affected.
    pub(crate) count: u64,
}

/// Asks for parked events to be handled again (in order, by their lane).
#[utoipa::path(post, path = "/v1/consumers/{name}/parked/retry", tag = "consumers",
    params(("name" = String, Path, description = "Consumer name")),
    request_body(content = Option<ParkedSelection>, description = "Omit or `{}` for all"),
    security(("bearer" = [])),
    responses((status = 200, description = "Retry requested", body = ParkedCount),
              (status = 400, description = "Malformed body", body = ErrorBody),
              (status = 401, description = "Token missing or wrong", body = ErrorBody),
              (status = 404, description = "No such consumer", body = ErrorBody),
              (status = 413, description = "Body too large", body = ErrorBody)))]
async fn retry_parked(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    body: Option<ApiJson<ParkedSelection>>,
) -> Result<Json<ParkedCount>, ApiError> {
    let position = body.and_then(|b| b.0.position);
    parked_action(&state, name, position, weir_consumer::status::retry_parked).await
}

/// Retry and discard: the same checks and answer around a different statement.
async fn parked_action<F>(
    state: &AppState,
    name: String,
    position: Option<i64>,
    action: F,
) -> Result<Json<ParkedCount>, ApiError>
where
    F: AsyncFnOnce(&sqlx::PgPool, &str, Option<i64>) -> weir_consumer::Result<u64>,
{
    find(state, &name).await?;
    let count = action(state.pool(), &name, position).await?;
    Ok(Json(ParkedCount { consumer: name, count }))
}

/// Discards parked events for good (recorded as failures).
#[utoipa::path(post, path = "/v1/consumers/{name}/parked/discard", tag = "consumers",
    params(("name" = String, Path, description = "Consumer name")),
    request_body(content = Option<ParkedSelection>, description = "Omit or `{}` for all"),
    security(("bearer" = [])),
    responses((status = 200, description = "Discarded", body = ParkedCount),
              (status = 400, description = "Malformed body", body = ErrorBody),
              (status = 401, description = "Token missing or wrong", body = ErrorBody),
              (status = 404, description = "No such consumer", body = ErrorBody),
              (status = 413, description = "Body too large", body = ErrorBody)))]
async fn discard_parked(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    body: Option<ApiJson<ParkedSelection>>,
) -> Result<Json<ParkedCount>, ApiError> {
    let position = body.and_then(|b| b.0.position);
    parked_action(&state, name, position, weir_consumer::status::discard_parked).await
}

/// Process status of an entity.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct EntityProcess {
    /// The entity.
    entity: String,
    /// Newest timestamp (µs since the Unix epoch) of a change of the entity handled by every
    /// consumer listening to it; `null` when none.
    last_processed: Option<i64>,
    /// The WAL position up to which every logged change has been handled.
    processed_lsn: String,
}

/// How far an entity's changes have been processed.
#[utoipa::path(get, path = "/v1/process/{entity}", tag = "process",
    params(("entity" = String, Path, description = "Entity (`posts`, `sales.orders`)")),
    responses((status = 200, description = "Process status", body = EntityProcess)))]
async fn process_entity(
    State(state): State<AppState>,
    ApiPath(entity): ApiPath<String>,
) -> Result<Json<EntityProcess>, ApiError> {
    let column = &state.config().consumers.timestamp_column;
    let last = weir_consumer::process::last_processed(state.pool(), &entity, column).await?;
    let lsn = weir_consumer::process::processed_lsn(state.pool()).await?;
    Ok(Json(EntityProcess { entity, last_processed: last, processed_lsn: lsn.to_string() }))
}

/// The answer when a write has been processed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Processed {
    /// Always true (a write not yet processed gets 425).
    processed: bool,
}

/// What to check, as query parameters (instead of the headers).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct CheckQuery {
    /// `posts/1422057007123000`, like the `X-Weir-Entity-Timestamp` header.
    entity_timestamp: Option<String>,
    /// `0/16B3748`, like the `X-Weir-Lsn` header.
    lsn: Option<String>,
    /// Long-poll only: how long to wait (`5s`, `250ms`); at most `http.max_wait`. Default `10s`.
    timeout: Option<String>,
}

fn watermark(headers: &HeaderMap, q: &CheckQuery) -> Result<Watermark, ApiError> {
    if let Some(v) = &q.entity_timestamp {
        return Watermark::parse_entity_timestamp(v);
    }
    if let Some(v) = &q.lsn {
        return Watermark::parse_lsn(v);
    }
    Watermark::from_headers(headers)?.ok_or_else(|| {
        ApiError::bad_request(
            "say which write to check: header `X-Weir-Entity-Timestamp: posts/1422057007123000` \
             or `X-Weir-Lsn: 0/16B3748` (or the query parameters entity_timestamp / lsn)",
        )
    })
}

/// 200 when the write has been processed by every consumer listening to it, else 425.
#[utoipa::path(get, path = "/v1/process/check", tag = "process",
    params(CheckQuery,
        ("X-Weir-Entity-Timestamp" = Option<String>, Header, description = "`posts/1422057007123000`"),
        ("X-Weir-Lsn" = Option<String>, Header, description = "`0/16B3748`")),
    responses((status = 200, description = "Processed", body = Processed),
              (status = 400, description = "No or malformed watermark", body = ErrorBody),
              (status = 425, description = "Not processed yet", body = ErrorBody)))]
async fn process_check(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<CheckQuery>,
) -> Result<Response, ApiError> {
    let w = watermark(&headers, &q)?;
    if w.reached(state.process_watch()).await? {
        Ok(Json(Processed { processed: true }).into_response())
    } else {
        Ok(too_early_response(&w))
    }
}

/// Long-poll: waits until the write is processed (200) or the timeout passes (425).
#[utoipa::path(get, path = "/v1/process/wait", tag = "process",
    params(CheckQuery,
        ("X-Weir-Entity-Timestamp" = Option<String>, Header, description = "`posts/1422057007123000`"),
        ("X-Weir-Lsn" = Option<String>, Header, description = "`0/16B3748`")),
    responses((status = 200, description = "Processed", body = Processed),
              (status = 400, description = "No or malformed watermark, or a bad timeout", body = ErrorBody),
              (status = 425, description = "Not processed within the timeout", body = ErrorBody)))]
async fn process_wait(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<CheckQuery>,
) -> Result<Response, ApiError> {
    let w = watermark(&headers, &q)?;
    let max = state.config().http.max_wait;
    let timeout = match &q.timeout {
        None => Duration::from_secs(10).min(max),
        Some(t) => weir_core::parse_duration(t).map_err(|e| {
            ApiError::bad_request(format!("timeout `{t}`: {e} (e.g. `5s`, `250ms`)"))
        })?,
    };
    if timeout > max {
        return Err(ApiError::bad_request(format!(
            "timeout {timeout:?} is longer than http.max_wait ({max:?})"
        )));
    }
    if w.wait(state.process_watch(), timeout).await? {
        Ok(Json(Processed { processed: true }).into_response())
    } else {
        Ok(too_early_response(&w))
    }
}

/// A range of the log.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct LogQuery {
    /// Events after this position (default 0: from the oldest retained).
    after: Option<i64>,
    /// At most this many (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Only these entities, comma-separated (`posts,comments`).
    entity: Option<String>,
    /// Only these kinds, comma-separated (`insert,update`).
    #[param(
        pattern = r"^\s*((insert|update|delete|truncate|message)\s*)?(,\s*((insert|update|delete|truncate|message)\s*)?)*$"
    )]
    kind: Option<String>,
}

/// A page of the log.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct LogPage {
    /// The events, in log order.
    events: Vec<Event>,
    /// Pass as `after` for the next page.
    next_after: i64,
    /// The log's last position now.
    head: i64,
}

/// Reads the log: events after a position, in order, optionally filtered.
#[utoipa::path(get, path = "/v1/log", tag = "log",
    params(LogQuery),
    responses((status = 200, description = "A page of events", body = LogPage),
              (status = 400, description = "A bad parameter", body = ErrorBody)))]
async fn log(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Result<Json<LogPage>, ApiError> {
    let after = q.after.unwrap_or(0);
    let limit = crate::error::page_limit(q.limit, 100)?;
    let list = |s: &Option<String>| -> Vec<String> {
        s.as_deref()
            .map(|s| {
                s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
            })
            .unwrap_or_default()
    };
    let mut kinds = Vec::new();
    for k in list(&q.kind) {
        kinds.push(Kind::parse(&k).ok_or_else(|| {
            ApiError::bad_request(format!(
                "kind `{k}` is not one of insert, update, delete, truncate, message"
            ))
        })?);
    }
    let filter = EventFilter { entities: list(&q.entity), kinds };
    let reader = state.log();
    // The head first: a short page then covers everything up to it, so a filtered reader
    // skips what did not match instead of scanning it again.
    let head = reader.head().await?;
    let events = reader.read(after, limit, &filter).await?;
    let last = events.last().map_or(after.max(0), |e| e.position);
    let next_after = if (events.len() as i64) < limit { last.max(head) } else { last };
    Ok(Json(LogPage { events, next_after, head }))
}
