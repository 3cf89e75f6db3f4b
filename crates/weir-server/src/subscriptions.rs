//! Subscriptions over HTTP: create, list, show, update (a new pool size re-splits), stop,
//! start, delete, parked events, resume and skip — thin handlers over
//! `weir_streams::subscriptions` and the consumer engine the subscription runs on. Clients
//! attach to a subscription with a `client` sink over SSE or WebSocket ([`attached`]).
//!
//! ```text
//! POST /v1/subscriptions ─► weir_streams::subscriptions::create ─► weir.subscriptions + a
//!                           consumer (kind subscription, pool_size lanes = emitters)
//! GET  /v1/subscriptions/{name}/sse | ws ─► Attachment (leases emitters) ─► deliveries ─► client
//! POST /v1/subscriptions/{name}/ack ◄── client (SSE: from any connection; WS: ack frames)
//! ```
//!
//! Every answer comes from the database, so any weir process answers the same; errors keep
//! their meaning here: `invalid_subscription` 400, `unknown_subscription` 404, `duplicate` and
//! `busy` 409.

pub(crate) mod attached;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use weir_consumer::status::Parked;
use weir_streams::subscription::MAX_POOL_SIZE;
use weir_streams::{
    Sink, StartAt, Subscription, SubscriptionDef, SubscriptionOptions, SubscriptionUpdate,
    subscriptions,
};

use crate::AppState;
use crate::api::{ParkedCount, ParkedSelection, Resumed, Skipped};
use crate::error::{ApiError, ApiJson, ApiPath, ErrorBody};

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, update, delete))
        .routes(routes!(stop))
        .routes(routes!(start))
        .routes(routes!(parked))
        .routes(routes!(retry_parked))
        .routes(routes!(discard_parked))
        .routes(routes!(resume))
        .routes(routes!(skip))
        .routes(routes!(attached::sse))
        .routes(routes!(attached::ws))
        .routes(routes!(attached::ack))
}

impl From<weir_streams::Error> for ApiError {
    fn from(e: weir_streams::Error) -> Self {
        use weir_streams::Error as E;
        match e {
            E::Invalid(m) => ApiError::bad_request(m),
            E::InvalidSubscription(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_subscription", m)
            }
            e @ E::UnknownSubscription(_) => {
                ApiError::not_found("unknown_subscription", e.to_string())
            }
            e @ E::UnknownStream(_) => ApiError::not_found("unknown_stream", e.to_string()),
            e @ E::Duplicate { .. } => {
                ApiError::new(StatusCode::CONFLICT, "duplicate", e.to_string())
            }
            E::Busy(m) => ApiError::new(StatusCode::CONFLICT, "busy", m),
            e @ E::WrongExpectedVersion { .. } => {
                ApiError::new(StatusCode::CONFLICT, "wrong_expected_version", e.to_string())
            }
            e @ E::EventIdConflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "event_id_conflict", e.to_string())
            }
            E::Consumer(e) => e.into(),
            E::Database(e) => e.into(),
            E::Log(e) => e.into(),
            other => ApiError::unexpected(other),
        }
    }
}

/// A subscription to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewSubscription {
    /// Its name: 1 to 200 letters, digits, `-`, `_` or `.`; shared with operators.
    name: String,
    /// `stream`, `event_type`, `event_pattern`, `event_payload`, `tags` or `entity`.
    #[serde(rename = "type")]
    #[schema(value_type = weir_streams::SubscriptionKind)]
    kind: String,
    /// The selector of that type: `"order-*"`, `"order.placed"`, `{"customer": "c-1"}`,
    /// `{"any": ["vip"]}`, `{"entities": ["posts"], "kinds": ["insert"]}`…
    #[schema(schema_with = weir_streams::subscription::selector_schema)]
    selector: Value,
    /// Emitters, 1 to 1024. Defaults to 1.
    #[serde(default)]
    pool_size: Option<i64>,
    /// `"beginning"` (default), `"now"`, a log position, or an RFC 3339 time.
    #[serde(default)]
    #[schema(schema_with = weir_streams::subscription::nullable_start_from_schema)]
    start_from: Option<Value>,
    /// `{retry, on_exhausted, partition_by}`.
    #[serde(default)]
    options: Option<SubscriptionOptions>,
    /// `client` (default: SSE and WebSocket clients attach), `rust` (a handler registered with
    /// `Weir::builder().subscription` in some process delivers), or a webhook or NATS sink:
    /// `{"type": "webhook", "url": "https://…", "secret_env": "HOOK_SECRET"}`,
    /// `{"type": "nats", "subject": "weir.{entity}.{kind}", "stream": "WEIR"}` (docs/sinks.md).
    #[serde(default)]
    sink: Option<Sink>,
}

impl NewSubscription {
    /// The definition, checked as far as it can be without a database.
    pub(crate) fn definition(self) -> Result<SubscriptionDef, weir_streams::Error> {
        let invalid = weir_streams::Error::InvalidSubscription;
        let kind =
            self.kind.parse().map_err(|e| invalid(format!("subscription `{}`: {e}", self.name)))?;
        let pool_size = match self.pool_size {
            None => 1,
            Some(n) => u32::try_from(n).map_err(|_| {
                invalid(format!(
                    "subscription `{}`: pool_size {n} is out of range; use 1 to {MAX_POOL_SIZE}",
                    self.name
                ))
            })?,
        };
        let start_from = match &self.start_from {
            None => StartAt::Beginning,
            Some(v) => StartAt::from_value(v)
                .map_err(|e| invalid(format!("subscription `{}`: {e}", self.name)))?,
        };
        let def = SubscriptionDef {
            name: self.name,
            kind,
            selector: self.selector,
            pool_size,
            start_from,
            options: self.options.unwrap_or_default(),
            sink: self.sink.unwrap_or(Sink::Client),
        };
        def.validate()?;
        // This process delivers it: a secret missing from its environment is refused now.
        def.sink
            .check_environment()
            .map_err(|e| invalid(format!("subscription `{}`: {e}", def.name)))?;
        Ok(def)
    }
}

/// Every subscription with its state and emitters, by name.
#[utoipa::path(get, path = "/v1/subscriptions", tag = "subscriptions",
    responses((status = 200, description = "Subscriptions", body = Vec<Subscription>)))]
async fn list(State(state): State<AppState>) -> Result<Json<Vec<Subscription>>, ApiError> {
    Ok(Json(subscriptions::list(state.pool()).await?))
}

/// Creates a subscription; nothing is stored when the definition is invalid.
#[utoipa::path(post, path = "/v1/subscriptions", tag = "subscriptions",
    request_body = NewSubscription,
    security(("bearer" = [])),
    responses((status = 201, description = "Created", body = Subscription),
              (status = 400, description = "An invalid definition (`invalid_subscription`: the \
                  message names the field; a sink whose secret's environment variable is not set \
                  in this process among them) or a malformed body", body = ErrorBody),
              (status = 409, description = "A subscription or an operator of that name exists \
                  (`duplicate`)", body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<NewSubscription>,
) -> Result<(StatusCode, Json<Subscription>), ApiError> {
    let def = body.definition()?;
    let created = subscriptions::create(state.pool(), &def).await?;
    tracing::info!(subscription = %def.name, "subscription created over HTTP");
    Ok((StatusCode::CREATED, Json(created)))
}

/// One subscription with its state and emitters (position, lag, state, owner).
#[utoipa::path(get, path = "/v1/subscriptions/{name}", tag = "subscriptions",
    params(("name" = String, Path, description = "Subscription name")),
    responses((status = 200, description = "The subscription", body = Subscription),
              (status = 404, description = "No such subscription", body = ErrorBody)))]
async fn show(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Subscription>, ApiError> {
    Ok(Json(subscriptions::get(state.pool(), &name).await?))
}

/// Changes a subscription. A new pool size re-splits the emitters at a common position without
/// loss or repetition; the answer shows `pending_pool_size` until that is done. A new `sink`
/// replaces the old one as a whole, checked like a created one (its secret's environment
/// variable must be set in this process); its emitters restart from their checkpoints.
#[utoipa::path(patch, path = "/v1/subscriptions/{name}", tag = "subscriptions",
    params(("name" = String, Path, description = "Subscription name")),
    request_body = SubscriptionUpdate,
    security(("bearer" = [])),
    responses((status = 200, description = "Updated", body = Subscription),
              (status = 400, description = "An invalid change (`invalid_subscription`), a sink \
                  among them whose secret's environment variable is not set here", body = ErrorBody),
              (status = 404, description = "No such subscription", body = ErrorBody)))]
async fn update(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<SubscriptionUpdate>,
) -> Result<Json<Subscription>, ApiError> {
    if let Some(sink) = &body.sink {
        require(&state, &name).await?;
        // As at creation: this process delivers it, so a secret missing here is refused now.
        sink.check_environment().map_err(|e| {
            weir_streams::Error::InvalidSubscription(format!("subscription `{name}`: {e}"))
        })?;
    }
    let updated = subscriptions::update(state.pool(), &name, body).await?;
    tracing::info!(subscription = %name, "subscription updated over HTTP");
    Ok(Json(updated))
}

/// Deletes a subscription with its checkpoints, failures and parked events.
#[utoipa::path(delete, path = "/v1/subscriptions/{name}", tag = "subscriptions",
    params(("name" = String, Path, description = "Subscription name")),
    security(("bearer" = [])),
    responses((status = 204, description = "Deleted"),
              (status = 404, description = "No such subscription", body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    subscriptions::delete(state.pool(), &name).await?;
    tracing::info!(subscription = %name, "subscription deleted over HTTP");
    Ok(StatusCode::NO_CONTENT)
}

/// Stops a subscription: its emitters finish what they are delivering and wait (attached
/// clients get `paused`); the checkpoints stay.
#[utoipa::path(post, path = "/v1/subscriptions/{name}/stop", tag = "subscriptions",
    params(("name" = String, Path, description = "Subscription name")),
    security(("bearer" = [])),
    responses((status = 200, description = "Stopped", body = Subscription),
              (status = 404, description = "No such subscription", body = ErrorBody)))]
async fn stop(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Subscription>, ApiError> {
    Ok(Json(subscriptions::stop(state.pool(), &name).await?))
}

/// Starts a stopped subscription from its checkpoints.
#[utoipa::path(post, path = "/v1/subscriptions/{name}/start", tag = "subscriptions",
    params(("name" = String, Path, description = "Subscription name")),
    security(("bearer" = [])),
    responses((status = 200, description = "Started (or was not stopped)", body = Subscription),
              (status = 404, description = "No such subscription", body = ErrorBody)))]
async fn start(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Subscription>, ApiError> {
    Ok(Json(subscriptions::start(state.pool(), &name).await?))
}

/// The subscription, or 404 `unknown_subscription` (not `unknown_consumer`: operators are not
/// reachable here).
async fn require(state: &AppState, name: &str) -> Result<(), ApiError> {
    subscriptions::get(state.pool(), name).await.map(drop).map_err(ApiError::from)
}

/// The subscription's parked events, oldest first.
#[utoipa::path(get, path = "/v1/subscriptions/{name}/parked", tag = "subscriptions",
    params(("name" = String, Path, description = "Subscription name")),
    responses((status = 200, description = "Parked events", body = Vec<Parked>),
              (status = 404, description = "No such subscription", body = ErrorBody)))]
async fn parked(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Vec<Parked>>, ApiError> {
    require(&state, &name).await?;
    Ok(Json(weir_consumer::status::parked(state.pool(), Some(&name)).await?))
}

/// Asks for parked events to be delivered again, in order, by their emitter (all of them, or
/// one `position`).
#[utoipa::path(post, path = "/v1/subscriptions/{name}/parked/retry", tag = "subscriptions",
    params(("name" = String, Path, description = "Subscription name")),
    request_body(content = Option<ParkedSelection>, description = "Omit or `{}` for all"),
    security(("bearer" = [])),
    responses((status = 200, description = "Retry requested", body = ParkedCount),
              (status = 404, description = "No such subscription", body = ErrorBody)))]
async fn retry_parked(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    body: Option<ApiJson<ParkedSelection>>,
) -> Result<Json<ParkedCount>, ApiError> {
    require(&state, &name).await?;
    let position = body.and_then(|b| b.0.position);
    let count = weir_consumer::status::retry_parked(state.pool(), &name, position).await?;
    Ok(Json(ParkedCount { consumer: name, count }))
}

/// Discards parked events for good (recorded as failures): all of them, or one `position`.
#[utoipa::path(post, path = "/v1/subscriptions/{name}/parked/discard", tag = "subscriptions",
    params(("name" = String, Path, description = "Subscription name")),
    request_body(content = Option<ParkedSelection>, description = "Omit or `{}` for all"),
    security(("bearer" = [])),
    responses((status = 200, description = "Discarded", body = ParkedCount),
              (status = 404, description = "No such subscription", body = ErrorBody)))]
async fn discard_parked(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    body: Option<ApiJson<ParkedSelection>>,
) -> Result<Json<ParkedCount>, ApiError> {
    require(&state, &name).await?;
    let position = body.and_then(|b| b.0.position);
    let count = weir_consumer::status::discard_parked(state.pool(), &name, position).await?;
    Ok(Json(ParkedCount { consumer: name, count }))
}

/// Resumes a halted subscription at the event it halted on.
#[utoipa::path(post, path = "/v1/subscriptions/{name}/resume", tag = "subscriptions",
    params(("name" = String, Path, description = "Subscription name")),
    security(("bearer" = [])),
    responses((status = 200, description = "Resumed (or was not halted)", body = Resumed),
              (status = 404, description = "No such subscription", body = ErrorBody)))]
async fn resume(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Resumed>, ApiError> {
    require(&state, &name).await?;
    let resumed = weir_consumer::resume(state.pool(), &name).await?;
    tracing::info!(subscription = %name, resumed, "resume over HTTP");
    Ok(Json(Resumed { consumer: name, resumed }))
}

/// Skips the event a halted subscription stopped on (recorded as skipped) and resumes after it.
#[utoipa::path(post, path = "/v1/subscriptions/{name}/skip", tag = "subscriptions",
    params(("name" = String, Path, description = "Subscription name")),
    security(("bearer" = [])),
    responses((status = 200, description = "Skipped", body = Skipped),
              (status = 404, description = "No such subscription", body = ErrorBody),
              (status = 409, description = "The subscription is not halted", body = ErrorBody)))]
async fn skip(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Skipped>, ApiError> {
    require(&state, &name).await?;
    let skipped = weir_consumer::skip(state.pool(), &name).await?;
    tracing::info!(subscription = %name, skipped, "skip over HTTP");
    Ok(Json(Skipped { consumer: name, skipped }))
}
