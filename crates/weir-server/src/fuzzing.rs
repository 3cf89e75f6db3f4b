//! The JSON request bodies, decoded and checked without a server: the entry point of the
//! `http_bodies` fuzz target (fuzz/fuzz_targets/http_bodies.rs). Built with the `fuzzing`
//! feature only.
//!
//! ```text
//! request body bytes ─► a POST with Content-Type: application/json
//!   ─► ApiJson (the handlers' own extractor: serde_json, a JSON object, the type)
//!   ─► the checks the handler makes before the database ─► Ok, or the ApiError answer
//! ```
//!
//! What each handler checks later in SQL (a truncation's `before`, a snapshot's version, a
//! backfill's tables) is not reached here: those bodies are only decoded.

use axum::extract::{FromRequest, OptionalFromRequest, Request};
use axum::http::HeaderValue;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use serde::de::DeserializeOwned;

use crate::{ApiError, ApiJson};

/// A request body the API decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Body {
    /// `POST /v1/streams/{stream}`.
    Append,
    /// `POST /v1/streams/{stream}/truncate`.
    Truncate,
    /// `PUT /v1/streams/{stream}/snapshot`.
    Snapshot,
    /// `POST /v1/subscriptions`.
    SubscriptionCreate,
    /// `PATCH /v1/subscriptions/{name}`.
    SubscriptionUpdate,
    /// `POST /v1/subscriptions/{name}/ack`.
    Ack,
    /// `POST /v1/consumers/{name}/parked/retry` and the other parked actions.
    ParkedSelection,
    /// `POST /v1/jobs`.
    Job,
    /// `POST /v1/backfills`.
    Backfill,
}

/// Every [`Body`], in a fixed order (the fuzz target picks one by an input byte).
pub const BODIES: [Body; 9] = [
    Body::Append,
    Body::Truncate,
    Body::Snapshot,
    Body::SubscriptionCreate,
    Body::SubscriptionUpdate,
    Body::Ack,
    Body::ParkedSelection,
    Body::Job,
    Body::Backfill,
];

/// Decodes `bytes` as `body` and makes the checks its handler makes before it touches the
/// database. `Err` is the answer a client would get, already rendered.
pub fn check(body: Body, bytes: &[u8]) -> Result<(), ApiError> {
    let result = checked(body, bytes);
    if let Err(e) = &result {
        // The error answer is built as a handler's would be.
        let _ = e.clone().into_response();
    }
    result
}

fn checked(body: Body, bytes: &[u8]) -> Result<(), ApiError> {
    match body {
        Body::Append => {
            let body: crate::streams::AppendBody = decode(bytes)?;
            weir_streams::append::check("stream-1", body.expected_version, &body.events)?;
            // `append` writes the events as JSON for the SQL function.
            serde_json::to_value(&body.events).map_err(ApiError::internal)?;
        }
        Body::Truncate => drop(decode::<crate::streams::TruncateBody>(bytes)?),
        Body::Snapshot => drop(decode::<crate::streams::SnapshotBody>(bytes)?),
        Body::SubscriptionCreate => {
            let body: crate::subscriptions::NewSubscription = decode(bytes)?;
            body.definition()?;
        }
        Body::SubscriptionUpdate => {
            let update: weir_streams::SubscriptionUpdate = decode(bytes)?;
            if let Some(sink) = &update.sink {
                sink.check_environment().map_err(weir_streams::Error::InvalidSubscription)?;
            }
        }
        Body::Ack => drop(decode::<crate::subscriptions::attached::Ack>(bytes)?),
        Body::ParkedSelection => {
            // Optional: an empty body means "all".
            let request = request(bytes);
            let body =
                <ApiJson<crate::api::ParkedSelection> as OptionalFromRequest<()>>::from_request(
                    request,
                    &(),
                );
            drop(futures::executor::block_on(body)?);
        }
        Body::Job => {
            let new: crate::jobs::NewJob = decode(bytes)?;
            new.job()?.validate()?;
        }
        Body::Backfill => drop(decode::<crate::backfills::NewBackfill>(bytes)?),
    }
    Ok(())
}

/// `bytes` decoded by [`ApiJson`], as a handler receives its body. The body is in memory, so
/// the extractor's future is ready at its first poll.
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let body = <ApiJson<T> as FromRequest<()>>::from_request(request(bytes), &());
    futures::executor::block_on(body).map(|ApiJson(v)| v)
}

fn request(bytes: &[u8]) -> Request {
    let body = axum::body::Body::from(bytes.to_vec());
    let mut request = Request::new(body);
    request.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    request
}
