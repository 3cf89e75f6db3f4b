//! Where the routes come together. Every route is registered through utoipa-axum's
//! `OpenApiRouter`, so the OpenAPI document served at `/v1/openapi.json` is made from the same
//! list the router serves: a route cannot exist undocumented, nor a documented path unserved.
//!
//! The layers, outermost first: metrics (every answer counted, refusals too) ─► timeout (503
//! after `http.request_timeout`; streams excepted once their head is sent) ─► body size (413)
//! ─► bearer token (401/403) ─► handler.

use std::sync::OnceLock;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, payload_too_large};
use crate::{
    AppState, api, auth, backfills, channels, console, jobs, metrics, streams, subscriptions,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "weir",
        description = "Ordered, reliable reactions to changes in PostgreSQL: process status, \
                       consumers, the log, jobs, the event store's streams and realtime channels. Errors are \
                       `{error, message}`. State-changing endpoints need `Authorization: Bearer`."
    ),
    modifiers(&BearerScheme),
    tags(
        (name = "health", description = "Liveness and readiness"),
        (name = "source", description = "Change capture"),
        (name = "consumers", description = "Operators: status, resume, skip, parked events"),
        (name = "process", description = "Has a write been processed? 200 or 425 Too Early"),
        (name = "log", description = "The event log"),
        (name = "jobs", description = "The job queue"),
        (name = "streams", description = "The event store: streams appended with expected versions"),
        (name = "channels", description = "Realtime channels over SSE and WebSocket"),
        (name = "subscriptions", description = "Subscriptions: definitions, state, parked \
            events, and clients attached over SSE and WebSocket that acknowledge"),
        (name = "backfills", description = "Existing rows loaded into the log as `read` events"),
        (name = "metrics", description = "Prometheus metrics"),
    )
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The answers every route can give besides its own, added to each operation from the same
/// rules the layers apply: 500 and 503 (timeout) anywhere; 401 wherever a token can be asked
/// for (writes always, reads under `protect_reads`); 403 on writes (no token configured);
/// 400, 413 and 415 where a body is read.
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::Operation;
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                )
                .build()
        };
        let add = |op: &mut Operation, status: &str, description: &str| {
            op.responses
                .responses
                .entry(status.to_string())
                .or_insert_with(|| error(description).into());
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let open = auth::OPEN.contains(&path.as_str());
            let ops = [
                (false, item.get.as_mut()),
                (false, item.head.as_mut()),
                (true, item.post.as_mut()),
                (true, item.put.as_mut()),
                (true, item.patch.as_mut()),
                (true, item.delete.as_mut()),
            ];
            for (writes, op) in ops {
                let Some(op) = op else { continue };
                add(op, "500", "Internal error (details in the server log)");
                add(op, "503", "No answer within http.request_timeout");
                if !open {
                    add(op, "401", "Token missing or wrong (reads: only under http.protect_reads)");
                }
                if writes {
                    add(op, "403", "No token is configured: state-changing endpoints are off");
                }
                if op.request_body.is_some() {
                    add(op, "400", "Malformed body");
                    add(op, "413", "Body larger than http.max_body_bytes");
                    add(op, "415", "Body without Content-Type: application/json");
                }
            }
        }
    }
}

fn build() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(api::routes())
        .merge(streams::routes())
        .merge(jobs::routes())
        .merge(channels::routes())
        .merge(subscriptions::routes())
        .merge(backfills::routes())
        .merge(console::routes())
        .routes(routes!(metrics::render))
        .routes(routes!(openapi_json))
        .split_for_parts();
    // After the routes are in: a modifier in `#[openapi]` would run on an empty document.
    CommonResponses.modify(&mut doc);
    (router, doc)
}

/// The document, built once.
pub(crate) fn document() -> utoipa::openapi::OpenApi {
    static DOC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(|| build().1).clone()
}

/// This OpenAPI document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json() -> Response {
    Json(document()).into_response()
}

/// The whole router with its layers.
pub(crate) fn router(state: AppState) -> Router {
    let http = &state.config().http;
    let limit = http.max_body_bytes;
    let (mut routes, _) = build();
    if http.console {
        routes = routes.merge(console::page_routes());
    }
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), auth::require_token))
        .layer(middleware::from_fn_with_state(state.clone(), limit_body))
        .layer(middleware::from_fn_with_state(state.clone(), timeout))
        .layer(middleware::from_fn(metrics::track))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(
        "not_found",
        format!("no route {}; GET /v1/openapi.json lists them", req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Refuses a declared body over the limit before reading it (chunked bodies meet
/// `DefaultBodyLimit` while being read).
async fn limit_body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > state.config().http.max_body_bytes) {
        return payload_too_large().into_response();
    }
    next.run(req).await
}

async fn timeout(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.config().http.request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!("no answer within http.request_timeout ({limit:?})"),
        )
        .into_response(),
    }
}
