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
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use tower::{Layer, Service};
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

    /// Whether the write has been handled by every consumer listening to it.
    pub async fn reached(&self, pool: &PgPool, timestamp_column: &str) -> Result<bool, ApiError> {
        Ok(match self {
            Watermark::Entity { entity, ts_us } => {
                weir_consumer::process::processed(pool, entity, *ts_us, timestamp_column).await?
            }
            Watermark::Lsn(lsn) => weir_consumer::process::processed_lsn(pool).await? >= *lsn,
        })
    }

    /// Waits until [`Watermark::reached`] or `timeout`; returns whether it was reached.
    pub async fn wait(
        &self,
        pool: &PgPool,
        timestamp_column: &str,
        timeout: Duration,
    ) -> Result<bool, ApiError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(2);
        loop {
            if self.reached(pool, timestamp_column).await? {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

/// The `425 Too Early` answer.
pub fn too_early_response(watermark: &Watermark) -> Response {
    let what = match watermark {
        Watermark::Entity { entity, ts_us } => format!("the change of {entity} at {ts_us}"),
        Watermark::Lsn(lsn) => format!("the writes up to {lsn}"),
    };
    let mut r = ApiError::new(
        StatusCode::TOO_EARLY,
        "too_early",
        format!("{what} has not been processed yet; retry shortly"),
    )
    .into_response();
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Puts the processed check in front of a service. See the module docs.
#[derive(Debug, Clone)]
pub struct TooEarlyLayer {
    pool: PgPool,
    column: String,
    wait: Duration,
}

impl TooEarlyLayer {
    /// Checks against `pool`'s weir schema, comparing `timestamp_column` (`updated_at`).
    pub fn new(pool: PgPool, timestamp_column: impl Into<String>) -> Self {
        Self { pool, column: timestamp_column.into(), wait: Duration::ZERO }
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
                watermark.reached(&layer.pool, &layer.column).await
            } else {
                watermark.wait(&layer.pool, &layer.column, layer.wait).await
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
