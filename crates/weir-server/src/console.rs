//! The console: the web page `weir run` serves at `/`, and the three endpoints only it needs.
//!
//! ```text
//! GET /                  index.html ─┐  embedded in the binary (include_bytes!), open to all:
//! GET /console/<file>    modules, CSS ┘  the page holds no data, it asks the API for it
//!
//! GET /v1/access         open: is a token configured, are reads protected? (the login form)
//! GET /v1/overview       source, log, consumers, subscriptions, queues: one snapshot
//! GET /v1/overview/live  SSE: that snapshot every second (`event: overview`), read once for
//!                        all the process's watchers (`LiveOverview`)
//!                                   │
//! the page ──fetch, Authorization: Bearer (session storage, never a URL)──► every /v1 route
//! ```
//!
//! The page's own code is in `crates/weir-server/console/` (plain ES modules, no build step;
//! uPlot vendored for the charts); `docs/console.md` says what it shows and how it is tested.
//! Every answer carries a Content-Security-Policy that allows only this origin's scripts,
//! styles and connections, so an event's data can never run as code in the page.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::watch;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use weir_consumer::status::ConsumerStatus;
use weir_jobs::QueueStats;
use weir_streams::subscriptions::Subscription;

use crate::AppState;
use crate::error::ApiError;

/// The page's files: name under `/console/`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("index.html", "text/html; charset=utf-8", include_bytes!("../console/index.html")),
    ("style.css", "text/css; charset=utf-8", include_bytes!("../console/style.css")),
    ("errors.js", "text/javascript; charset=utf-8", include_bytes!("../console/errors.js")),
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../console/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_bytes!("../console/api.js")),
    ("dom.js", "text/javascript; charset=utf-8", include_bytes!("../console/dom.js")),
    ("charts.js", "text/javascript; charset=utf-8", include_bytes!("../console/charts.js")),
    ("views.js", "text/javascript; charset=utf-8", include_bytes!("../console/views.js")),
    ("jobs.js", "text/javascript; charset=utf-8", include_bytes!("../console/jobs.js")),
    ("live.js", "text/javascript; charset=utf-8", include_bytes!("../console/live.js")),
    (
        "vendor/uPlot.esm.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/vendor/uPlot.esm.js"),
    ),
    (
        "vendor/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../console/vendor/uPlot.min.css"),
    ),
];

/// Only this origin's scripts, styles, images and connections; no frames, no inline script.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Whether `path` is one of the page's files (open to everyone, like `/v1/health`).
pub(crate) fn is_page(path: &str) -> bool {
    path == "/" || path.starts_with("/console/")
}

/// `/` and `/console/<file>`, when `[http] console` is on.
pub(crate) fn page_routes() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/console/{*file}", get(asset))
}

async fn index() -> Response {
    serve("index.html")
}

async fn asset(Path(file): Path<String>) -> Response {
    serve(&file)
}

fn serve(name: &str) -> Response {
    let Some((_, content_type, bytes)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return ApiError::not_found("not_found", format!("the console has no file `{name}`"))
            .into_response();
    };
    let mut r = Response::new(Body::from(Bytes::from_static(bytes)));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Revalidated on every load, so a new binary's page is never mixed with an old module.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(access)).routes(routes!(overview)).routes(routes!(live))
}

/// What a client must send: the console asks before its first read, to show a login field
/// or say that it is read-only.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Access {
    /// A token is configured: state-changing requests need it (without one they answer 403).
    token_configured: bool,
    /// Reads and channels need the token too (`http.protect_reads`).
    protect_reads: bool,
    /// The longest wait a long-poll may ask for (`http.max_wait`), in seconds.
    max_wait_seconds: u64,
}

/// Whether a token is configured and whether reads need it. Open, like `/v1/health`.
#[utoipa::path(get, path = "/v1/access", tag = "health",
    responses((status = 200, description = "What requests need", body = Access)))]
async fn access(State(state): State<AppState>) -> Json<Access> {
    let http = &state.config().http;
    Json(Access {
        token_configured: http.token.is_some(),
        protect_reads: http.protect_reads,
        max_wait_seconds: http.max_wait.as_secs(),
    })
}

/// The log at a glance.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LogInfo {
    /// The last position appended (0 when empty).
    head: i64,
    /// The oldest position still retained; none when the log is empty.
    oldest: Option<i64>,
    /// How long events are kept (`[log] retention`), in seconds.
    retention_seconds: u64,
    /// The consumer furthest behind and the first position it has not handled: retention
    /// keeps every event from there, however old (none when no consumer has a checkpoint).
    oldest_need: Option<weir_consumer::Need>,
    /// The entities the log has seen (`posts`, `sales.orders`, `weir.stream_events`).
    entities: Vec<String>,
}

/// Everything the console's overview shows, read at `at`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Overview {
    /// When it was read.
    at: DateTime<Utc>,
    /// Change capture.
    source: weir::status::SourceStatus,
    /// The log.
    log: LogInfo,
    /// Every consumer (operators and subscriptions) with its lanes.
    consumers: Vec<ConsumerStatus>,
    /// Every subscription with its emitters.
    subscriptions: Vec<Subscription>,
    /// The job queues.
    jobs: Vec<QueueStats>,
}

async fn read_overview(state: &AppState) -> Result<Overview, ApiError> {
    let pool = state.pool();
    let source = weir::status::source_status(pool, state.config()).await?;
    let reader = state.log();
    let oldest = reader.oldest().await?;
    let entities = reader.entities().await?;
    let log = LogInfo {
        head: source.position,
        oldest,
        retention_seconds: state.config().log.retention.as_secs(),
        oldest_need: weir_consumer::oldest_need(pool).await?,
        entities,
    };
    let consumers = weir_consumer::status::consumers(pool).await?;
    let subscriptions = weir_streams::subscriptions::list(pool).await?;
    let mut conn = pool.acquire().await?;
    let jobs = weir_jobs::admin::stats(&mut conn).await?;
    Ok(Overview { at: Utc::now(), source, log, consumers, subscriptions, jobs })
}

/// The source, the log, every consumer and subscription, and the job queues, in one answer.
#[utoipa::path(get, path = "/v1/overview", tag = "source",
    responses((status = 200, description = "The overview", body = Overview)))]
async fn overview(State(state): State<AppState>) -> Result<Json<Overview>, ApiError> {
    Ok(Json(read_overview(&state).await?))
}

/// How often the live overview is read.
const LIVE_EVERY: Duration = Duration::from_secs(1);

/// The live overview of one process: one reader task, started by the first watcher and gone
/// with the last, so a hundred open consoles cost one read a second, and none costs nothing.
#[derive(Debug, Default)]
pub(crate) struct LiveOverview {
    /// The last chunk read (`event: overview` or `event: problem`), for every watcher.
    latest: std::sync::OnceLock<watch::Sender<Option<Bytes>>>,
    /// A reader task runs.
    reading: AtomicBool,
}

impl LiveOverview {
    fn sender(&self) -> &watch::Sender<Option<Bytes>> {
        self.latest.get_or_init(|| watch::channel(None).0)
    }

    /// A watcher; starts the reader when none runs.
    fn watch(&self, state: &AppState) -> watch::Receiver<Option<Bytes>> {
        let mut rx = self.sender().subscribe();
        // The last read goes out at once (when there is one), not a second later.
        rx.mark_changed();
        if !self.reading.swap(true, Ordering::SeqCst) {
            tokio::spawn(read_every_second(state.clone()));
        }
        rx
    }
}

async fn read_every_second(state: AppState) {
    let live = &state.0.overview;
    let tx = live.sender();
    loop {
        if tx.receiver_count() == 0 {
            live.reading.store(false, Ordering::SeqCst);
            // A watcher that came just now saw `reading` still set and started nothing.
            if tx.receiver_count() == 0 || live.reading.swap(true, Ordering::SeqCst) {
                return;
            }
        }
        let chunk = match read_overview(&state).await {
            Ok(o) => match serde_json::to_string(&o) {
                Ok(json) => format!("event: overview\ndata: {json}\n\n"),
                Err(e) => problem(&e.to_string()),
            },
            // A database error is logged where it is made (`ApiError::internal`).
            Err(e) => problem(e.message()),
        };
        tx.send_replace(Some(Bytes::from(chunk)));
        tokio::select! {
            _ = tokio::time::sleep(LIVE_EVERY) => {}
            _ = state.0.cancel.cancelled() => {
                live.reading.store(false, Ordering::SeqCst);
                return;
            }
        }
    }
}

/// The overview every second over Server-Sent Events: `event: overview` with the same JSON as
/// `GET /v1/overview`; `event: problem` with `{message}` when one read fails (the stream goes
/// on); it ends at shutdown. Every watcher of a process gets the same reads.
#[utoipa::path(get, path = "/v1/overview/live", tag = "source",
    responses((status = 200, description = "An event stream", content_type = "text/event-stream", body = crate::channels::SseEvent)))]
async fn live(State(state): State<AppState>) -> Response {
    let cancel = state.0.cancel.clone();
    let rx = state.0.overview.watch(&state);
    let first =
        futures::stream::once(async { Ok::<Bytes, Infallible>(Bytes::from_static(b": ok\n\n")) });
    let updates = futures::stream::unfold((rx, cancel), |(mut rx, cancel)| async move {
        loop {
            tokio::select! {
                changed = rx.changed() => changed.ok()?,
                _ = cancel.cancelled() => return None,
            }
            let chunk = rx.borrow_and_update().clone();
            if let Some(chunk) = chunk {
                return Some((Ok(chunk), (rx, cancel)));
            }
        }
    });
    crate::channels::event_stream(first.chain(updates))
}

fn problem(message: &str) -> String {
    format!("event: problem\ndata: {}\n\n", serde_json::json!({ "message": message }))
}
