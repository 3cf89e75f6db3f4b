//! "Has my write reached the derived data yet?" over HTTP: `425 Too Early` until it has.
//!
//! A client that wrote a row sends what it wrote with its next request, as one of
//!
//! - `X-Weir-Entity-Timestamp: posts/1422057007123000` — the entity and the row's timestamp in
//!   microseconds since the Unix epoch (the `timestamp_column`, default `updated_at`); the
//!   EventStreamex `X-Event-Streamex-Entity-Timestamp` pattern;
//! - `X-Weir-Lsn: 0/16B3748` — `pg_current_wal_insert_lsn()` read after the commit: exact.
//!
//! [`TooEarlyLayer`] answers `425` (with `Retry-After: 1`) until every consumer listening to
//! the entity has handled the write, then lets the request through. The same check serves
//! `GET /v1/process/check` and the long-poll `GET /v1/process/wait`. Requests without either
//! header pass untouched; a malformed header is a `400`.
//!
//! Waiting (the long-poll, [`TooEarlyLayer::wait_up_to`]) goes through one
//! [`ProcessWatch`] per server (or per layer): the waiters register what they wait for and one
//! task reads the database once per tick for all of them, woken at every append — see
//! [`weir_consumer::process`] for the watcher and for why a token resolves as soon as the log
//! and the consumers have it.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) {
//! use axum::{Router, routing::get};
//! let app: Router = Router::new()
//!     .route("/posts/{id}/stats", get(|| async { "fresh" }))
//!     .route_layer(weir_server::TooEarlyLayer::new(pool, "updated_at"));
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use tower::{Layer, Service};
use weir_consumer::process::ProcessWatch;
use weir_core::Lsn;

use crate::error::ApiError;

/// The entity-timestamp header.
pub const ENTITY_TIMESTAMP_HEADER: &str = "x-weir-entity-timestamp";
/// The LSN header.
pub const LSN_HEADER: &str = "x-weir-lsn";

/// A write a client wants to see processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watermark {
    /// A change of `entity` whose timestamp is `ts_us` (µs since the Unix epoch).
    Entity {
        /// The entity (`posts`, `sales.orders`).
        entity: String,
        /// The row's timestamp.
        ts_us: i64,
    },
    /// Everything committed at or before this WAL position.
    Lsn(Lsn),
}

impl Watermark {
    /// Parses `posts/1422057007123000`.
    pub fn parse_entity_timestamp(value: &str) -> Result<Watermark, ApiError> {
        let bad = || {
            ApiError::bad_request(format!(
                "`{value}` is not `<entity>/<timestamp in microseconds>`, \
                 e.g. `X-Weir-Entity-Timestamp: posts/1422057007123000`"
            ))
        };
        let (entity, ts) = value.trim().rsplit_once('/').ok_or_else(bad)?;
        if entity.is_empty() {
            return Err(bad());
        }
        let ts_us: i64 = ts.parse().map_err(|_| bad())?;
        Ok(Watermark::Entity { entity: entity.to_string(), ts_us })
    }

    /// Parses `0/16B3748`.
    pub fn parse_lsn(value: &str) -> Result<Watermark, ApiError> {
        value.trim().parse::<Lsn>().map(Watermark::Lsn).map_err(|_| {
            ApiError::bad_request(format!(
                "`{value}` is not an LSN like `0/16B3748` (read `pg_current_wal_insert_lsn()` after the commit)"
            ))
        })
    }

    /// The watermark a request carries, if any.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Watermark>, ApiError> {
        let text = |name: &str| -> Result<Option<&str>, ApiError> {
            match headers.get(name) {
                None => Ok(None),
                Some(v) => v.to_str().map(Some).map_err(|_| {
                    ApiError::bad_request(format!("header {name} is not visible ASCII"))
                }),
            }
        };
        if let Some(v) = text(ENTITY_TIMESTAMP_HEADER)? {
            return Self::parse_entity_timestamp(v).map(Some);
        }
        if let Some(v) = text(LSN_HEADER)? {
            return Self::parse_lsn(v).map(Some);
        }
        Ok(None)
    }

    /// Whether the write has been handled by every consumer listening to it, asked now.
    pub async fn reached(&self, watch: &ProcessWatch) -> Result<bool, ApiError> {
        Ok(match self {
            Watermark::Entity { entity, ts_us } => watch.check_entity(entity, *ts_us).await?,
            Watermark::Lsn(lsn) => watch.check_lsn(*lsn).await?,
        })
    }

    /// Waits until [`Watermark::reached`] or `timeout`; returns whether it was reached. The
    /// waiting is `watch`'s: one query per tick for all of its waiters.
    pub async fn wait(&self, watch: &ProcessWatch, timeout: Duration) -> Result<bool, ApiError> {
        Ok(match self {
            Watermark::Entity { entity, ts_us } => {
                watch.wait_entity(entity, *ts_us, timeout).await?
            }
            Watermark::Lsn(lsn) => watch.wait_lsn(*lsn, timeout).await?,
        })
    }
}

/// The `425 Too Early` answer.
pub fn too_early_response(watermark: &Watermark) -> Response {
    let what = match watermark {
        Watermark::Entity { entity, ts_us } => format!("the change of {entity} at {ts_us} has"),
        Watermark::Lsn(lsn) => format!("the writes up to {lsn} have"),
    };
    let mut r = ApiError::new(
        StatusCode::TOO_EARLY,
        "too_early",
        format!("{what} not been processed yet; retry shortly"),
    )
    .into_response();
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Puts the processed check in front of a service. See the module docs.
///
/// Every clone of a layer (and every service it makes) shares one [`ProcessWatch`], so requests
/// that wait ([`TooEarlyLayer::wait_up_to`]) cost one query per tick together.
#[derive(Debug, Clone)]
pub struct TooEarlyLayer {
    watch: ProcessWatch,
    wait: Duration,
}

impl TooEarlyLayer {
    /// Checks against `pool`'s weir schema, comparing `timestamp_column` (`updated_at`), with
    /// a watcher of its own (it learns of appends by its timer).
    pub fn new(pool: PgPool, timestamp_column: impl Into<String>) -> Self {
        Self::with_watch(ProcessWatch::new(pool, timestamp_column))
    }

    /// Checks through `watch` (e.g. [`crate::Server::process_watch`], woken at every append, and
    /// shared with the server's long-polls).
    pub fn with_watch(watch: ProcessWatch) -> Self {
        Self { watch, wait: Duration::ZERO }
    }

    /// Waits up to `wait` for the write before answering 425 (default: answer at once).
    pub fn wait_up_to(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }
}

impl<S> Layer<S> for TooEarlyLayer {
    type Service = TooEarly<S>;

    fn layer(&self, inner: S) -> TooEarly<S> {
        TooEarly { inner, layer: self.clone() }
    }
}

/// The service [`TooEarlyLayer`] makes.
#[derive(Debug, Clone)]
pub struct TooEarly<S> {
    inner: S,
    layer: TooEarlyLayer,
}

impl<S, B> Service<Request<B>> for TooEarly<S>
where
    S: Service<Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The clone that was polled ready serves this request (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let watermark = match Watermark::from_headers(req.headers()) {
                Ok(None) => return inner.call(req).await,
                Ok(Some(w)) => w,
                Err(e) => return Ok(e.into_response()),
            };
            let reached = if layer.wait.is_zero() {
                watermark.reached(&layer.watch).await
            } else {
                watermark.wait(&layer.watch, layer.wait).await
            };
            match reached {
                Ok(true) => inner.call(req).await,
                Ok(false) => Ok(too_early_response(&watermark)),
                Err(e) => Ok(e.into_response()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_headers() {
        assert_eq!(
            Watermark::parse_entity_timestamp("posts/1422057007123000").unwrap(),
            Watermark::Entity { entity: "posts".into(), ts_us: 1_422_057_007_123_000 }
        );
        assert_eq!(
            Watermark::parse_entity_timestamp("sales.orders/7").unwrap(),
            Watermark::Entity { entity: "sales.orders".into(), ts_us: 7 }
        );
        for bad in ["posts", "/12", "posts/abc", "posts/", ""] {
            let e = Watermark::parse_entity_timestamp(bad).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
        assert!(matches!(Watermark::parse_lsn("0/16B3748").unwrap(), Watermark::Lsn(_)));
        assert!(Watermark::parse_lsn("16B3748").is_err());
    }
}
