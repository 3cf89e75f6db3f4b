//! Every error the server answers with: a status and a JSON body `{error, message}`.
//!
//! `error` is a stable snake_case code a client can match on; `message` says what is wrong and
//! how to fix it. Bodies never carry SQL, stack traces or database messages: a database failure
//! is logged here (once, with the detail) and answered as `500 internal`.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

/// The JSON body of every error.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable code: `bad_request`, `malformed_json`, `unauthorized`, `forbidden`, `not_found`,
    /// `unknown_consumer`, `too_early`, `payload_too_large`, `timeout`, `conflict`, `internal`…
    pub error: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404 with `code`.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 400 `unstorable_value` when the database refused a value the client sent (found by
    /// SQLSTATE anywhere in `e`'s source chain, see [`refused_value`]), else 500 `internal`.
    pub fn unexpected(e: impl std::error::Error + 'static) -> Self {
        refused_value(&e).unwrap_or_else(|| Self::internal(e))
    }

    /// 500 `internal`; `detail` goes to the log only.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the server log has the details",
        )
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// What is wrong and how to fix it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The database errors that mean "this value cannot be stored", whoever sends it: the client's
/// mistake (400), not the server's. By SQLSTATE
/// (<https://www.postgresql.org/docs/current/errcodes-appendix.html>):
///
/// - `22P05` untranslatable_character: a `\u0000` in JSON text (`jsonb` cannot hold it);
/// - `22021` character_not_in_repertoire: a NUL byte in text (a stream name, say).
fn refused_value(e: &(dyn std::error::Error + 'static)) -> Option<ApiError> {
    let mut at = Some(e);
    while let Some(e) = at {
        if let Some(sqlx::Error::Database(db)) = e.downcast_ref::<sqlx::Error>() {
            return match db.code().as_deref() {
                Some("22P05" | "22021") => Some(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "unstorable_value",
                    "a value holds a character PostgreSQL cannot store: NUL (`\\u0000` in \
                     JSON, or a zero byte in text)",
                )),
                _ => None,
            };
        }
        at = e.source();
    }
    None
}

/// A list's `limit` query parameter: `default` when absent, else 1 to 1000 or `400`.
pub(crate) fn page_limit(given: Option<i64>, default: i64) -> Result<i64, ApiError> {
    let limit = given.unwrap_or(default);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit {limit} is not from 1 to 1000")));
    }
    Ok(limit)
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Logged once, here; 5xx were logged with their detail where they were made.
        if self.status.is_client_error() {
            tracing::info!(status = self.status.as_u16(), error = self.code, message = %self.message, "request refused");
        }
        let body = ErrorBody { error: self.code.to_string(), message: self.message };
        (self.status, Json(body)).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::unexpected(e)
    }
}

impl From<weir_consumer::Error> for ApiError {
    fn from(e: weir_consumer::Error) -> Self {
        match e {
            weir_consumer::Error::UnknownConsumer(_) => {
                Self::not_found("unknown_consumer", e.to_string())
            }
            weir_consumer::Error::NotHalted { .. } | weir_consumer::Error::Config { .. } => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            // Transparent: the chain starts below the `sqlx::Error`, so unwrap it here.
            weir_consumer::Error::Database(e) => e.into(),
            weir_consumer::Error::Log(e) => e.into(),
            other => Self::unexpected(other),
        }
    }
}

impl From<weir::Error> for ApiError {
    fn from(e: weir::Error) -> Self {
        match e {
            weir::Error::Database(e) => e.into(),
            weir::Error::Log(e) => e.into(),
            other => Self::unexpected(other),
        }
    }
}

impl From<weir_log::Error> for ApiError {
    fn from(e: weir_log::Error) -> Self {
        match e {
            weir_log::Error::Database(e) => e.into(),
            other => Self::unexpected(other),
        }
    }
}

/// `Json<T>` whose rejections are [`ApiError`]s: 400 `malformed_json`, 415, 413.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

/// The body must be a JSON object, as every body of the API is: serde would read a struct from
/// an array of its fields too (`[5]` for `{"before": 5}`), which the documented schemas refuse.
impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<serde_json::Value>::from_request(req, state).await {
            Ok(Json(v)) => object(v).map(ApiJson),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// `v`, a JSON object, as `T`: 400 `malformed_json` when it is not an object or not a `T`.
fn object<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, ApiError> {
    if !v.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "the body must be a JSON object",
        ));
    }
    // JSON Schema's `integer` admits `2.0`: the documents say `integer`, so the handlers do too.
    weir_core::json::from_value_whole(v).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not the expected JSON: {e}"),
        )
    })
}

/// An empty body (whatever its headers say, chunked or not) is `None`; any other body must be
/// JSON with `Content-Type: application/json`. Decided on the bytes received, never on headers
/// alone: a chunked body must not be taken for "no body" (for a discard, that would mean "all").
impl<T: DeserializeOwned, S: Send + Sync> axum::extract::OptionalFromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        let json_type =
            req.headers().get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(
                |v| {
                    let mime = v.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
                    mime == "application/json" || mime.ends_with("+json")
                },
            );
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                payload_too_large()
            } else {
                ApiError::bad_request(r.body_text())
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        if json_type != Some(true) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with `Content-Type: application/json`",
            ));
        }
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("the body is not JSON: {e}"),
            )
        })?;
        object(value).map(|v| Some(ApiJson(v)))
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    let text = r.body_text();
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => payload_too_large(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            status,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        _ => ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", text),
    }
}

/// 413 `payload_too_large`.
pub(crate) fn payload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the request body is larger than http.max_body_bytes allows",
    )
}

/// `Query<T>` whose rejections are 400 [`ApiError`]s naming the parameter.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            // `limit=2.0`: the parameter's schema says `integer`, which admits it. Read again
            // with integer fields taking whole numbers however written; any other failure is
            // the first one's.
            Err(r) => {
                let query = parts.uri.query().unwrap_or("");
                let pairs = form_urlencoded::parse(query.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()));
                weir_core::json::from_text_pairs(pairs)
                    .map(ApiQuery)
                    .map_err(|_| ApiError::bad_request(r.body_text()))
            }
        }
    }
}

/// `Path<T>` whose rejections are 400 [`ApiError`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(r @ PathRejection::FailedToDeserializePathParams(_)) => {
                Err(ApiError::bad_request(r.body_text()))
            }
            Err(r) => Err(ApiError::internal(r.body_text())),
        }
    }
}
