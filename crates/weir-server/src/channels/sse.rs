//! `GET /v1/channels/sse`: Server-Sent Events.
//!
//! Every poll of the body drains everything queued into one chunk (one write at high rates).

use std::convert::Infallible;
use std::fmt::Write as _;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::message::GivenCursor;
use super::session::{CloseReason, Session, Step};
use super::{ChannelQuery, parse_query};
use crate::{ApiError, ApiQuery, AppState};

/// Subscribes to channels over Server-Sent Events.
///
/// Each message is `id: <cursor>`, `event: change | processed`, `data: <JSON>`. Before the
/// stream ends the server sends `event: close` with `{"reason": "slow_client" | "shutdown",
/// "message"}`. `: keep-alive` comments every 15 s. Resume with `Last-Event-ID` (or `after`):
/// every message after that cursor, none twice.
#[utoipa::path(get, path = "/v1/channels/sse", tag = "channels",
    params(
        ("channel" = Vec<String>, Query, description = "Channels: `<entity>`, `<entity>/<id>`, \
            `<parent>/<value>/<entity>`, `processed`; repeat the parameter or separate with `,`"),
        ("after" = Option<String>, Query, description = "Resume after this message id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this message id \
            (wins over `after`)"),
        ("access_token" = Option<String>, Query, description = "The bearer token, for clients \
            that cannot set headers"),
    ),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "No channel, a malformed channel name or cursor", body = crate::ErrorBody),
        (status = 401, description = "Token required", body = crate::ErrorBody),
    ))]
pub(crate) async fn sse(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<ChannelQuery>,
) -> Result<Response, ApiError> {
    let (channels, after) = parse_query(&query)?;
    let given =
        match headers.get("last-event-id") {
            Some(v) => GivenCursor::parse(v.to_str().map_err(|_| {
                ApiError::bad_request("the Last-Event-ID header is not valid text")
            })?)?,
            None => None,
        }
        .or(after);
    let session = Session::new(state.hub(), channels, given, "sse");
    let stream = futures::stream::unfold((session, true), |(mut session, first)| async move {
        if first {
            // The head and a first line go out at once, whatever the channels carry.
            return Some((
                Ok::<Bytes, Infallible>(Bytes::from_static(b": ok\n\n")),
                (session, false),
            ));
        }
        let step = session.next().await;
        let chunk = render(&step, session.client_buffer)?;
        Some((Ok(chunk), (session, false)))
    });
    let mut response = Body::from_stream(stream).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// One chunk for a step; `None` ends the stream.
fn render(step: &Step, client_buffer: usize) -> Option<Bytes> {
    let text = match step {
        Step::Messages(msgs) => {
            let size: usize = msgs.iter().map(|(m, _)| m.body.len() + 48).sum();
            let mut out = String::with_capacity(size);
            for (m, cursor) in msgs {
                let _ =
                    write!(out, "id: {cursor}\nevent: {}\ndata: {}\n\n", m.kind.as_str(), m.body);
            }
            out
        }
        Step::Gap { after, oldest } => {
            let data = serde_json::json!({
                "reason": "retention",
                "message": format!(
                    "events after {after} are no longer retained; replaying from the oldest, {oldest}"
                ),
                "after": after,
                "oldest": oldest,
            });
            format!("event: gap\ndata: {data}\n\n")
        }
        Step::KeepAlive => ": keep-alive\n\n".to_string(),
        Step::Close(reason) => {
            let data = match reason {
                CloseReason::SlowClient => serde_json::json!({
                    "reason": "slow_client",
                    "message": format!(
                        "fell more than {client_buffer} messages behind; reconnect with \
                         Last-Event-ID to resume"
                    ),
                }),
                CloseReason::Shutdown => serde_json::json!({
                    "reason": "shutdown",
                    "message": "the server is shutting down; reconnect with Last-Event-ID to resume",
                }),
            };
            format!("event: close\ndata: {data}\n\n")
        }
        Step::End => return None,
    };
    Some(Bytes::from(text))
}
