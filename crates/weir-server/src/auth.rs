//! The bearer token: required for every state-changing request, and for reads and channels when
//! `http.protect_reads` is set. Health, readiness, `/v1/access`, the OpenAPI document and the
//! console's files (`/`, `/console/…`: they hold no data) stay open.
//!
//! ```text
//! request ─► open path? ─yes─► handler
//!              │no
//!              ▼
//!            state-changing (not GET/HEAD/OPTIONS)? ─► no token configured ─► 403 forbidden
//!              │                                      token missing/wrong ─► 401 unauthorized
//!            read and protect_reads? ─► token missing/wrong ─► 401
//! ```
//!
//! The token comes from `Authorization: Bearer <token>`; channel requests and a subscription's
//! `sse` / `ws` may also pass `?access_token=` because a browser's `EventSource` cannot set
//! headers. The comparison is
//! constant-time.

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;

/// Paths anyone may read.
pub(crate) const OPEN: &[&str] = &["/v1/health", "/v1/ready", "/v1/access", "/v1/openapi.json"];

/// The middleware.
pub(crate) async fn require_token(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if OPEN.contains(&path) || crate::console::is_page(path) {
        return next.run(req).await;
    }
    let http = &state.config().http;
    let writes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !writes && !http.protect_reads {
        return next.run(req).await;
    }
    let Some(expected) = http.token.as_ref() else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "state-changing endpoints are disabled because no token is configured; \
             set [http] token in weir.toml or WEIR_HTTP_TOKEN",
        )
        .into_response();
    };
    let given = bearer(&req).or_else(|| is_stream(path).then(|| query_token(&req)).flatten());
    match given {
        Some(given) if bool::from(given.as_bytes().ct_eq(expected.expose().as_bytes())) => {
            next.run(req).await
        }
        Some(_) => unauthorized("the bearer token is wrong"),
        None => unauthorized(
            "this endpoint needs `Authorization: Bearer <token>` (the token of [http] token)",
        ),
    }
}

/// The streams a browser opens without headers: channels, and a subscription's `sse` / `ws`.
fn is_stream(path: &str) -> bool {
    path.starts_with("/v1/channels/")
        || (path.starts_with("/v1/subscriptions/")
            && (path.ends_with("/sse") || path.ends_with("/ws")))
}

fn unauthorized(message: &str) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    r
}

fn bearer(req: &Request) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string())
}

fn query_token(req: &Request) -> Option<String> {
    form_urlencoded::parse(req.uri().query()?.as_bytes())
        .find_map(|(k, v)| (k == "access_token").then(|| v.into_owned()))
}
