//! `GET /v1/channels/sse`: Server-Sent Events.
//!
//! Every poll of the body renders what is queued into one chunk (one write at high rates), up
//! to [`CHUNK_BUDGET`] bytes; the rest waits, unrendered (shared), for the next poll. A client
//! that stops reading so pins at most one chunk beyond hyper's own buffer.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::message::{Cursor, GivenCursor, Msg};
use super::session::{CloseReason, Session, Step};
use super::{ChannelQuery, parse_query};
use crate::{ApiError, ApiQuery, AppState};

/// Most bytes rendered into one chunk (one message more when a single one is larger).
const CHUNK_BUDGET: usize = 256 * 1024;

/// Messages taken from the session and not rendered yet.
type Backlog = VecDeque<(Arc<Msg>, Cursor)>;

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
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = crate::channels::SseEvent),
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
    let start = (session, Backlog::new(), true);
    let stream = futures::stream::unfold(start, |(mut session, mut backlog, first)| async move {
        if first {
            // The head and a first line go out at once, whatever the channels carry.
            return Some((
                Ok::<Bytes, Infallible>(Bytes::from_static(b": ok\n\n")),
                (session, backlog, false),
            ));
        }
        if backlog.is_empty() {
            match session.next().await {
                Step::Messages(msgs) => backlog = msgs.into(),
                step => {
                    let chunk = render(&step, session.client_buffer)?;
                    return Some((Ok(chunk), (session, backlog, false)));
                }
            }
        }
        let chunk = render_messages(&mut backlog, CHUNK_BUDGET);
        Some((Ok(chunk), (session, backlog, false)))
    });
    Ok(event_stream(stream))
}

/// One event of a `text/event-stream` answer, as a reader parses it (the `schema` of an event
/// stream describes one event in OpenAPI 3.1: there is no `itemSchema` before 3.2). Every SSE
/// route documents its answer with it; the route's own doc lists its `event` names and the
/// JSON each one's `data` holds.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub(crate) struct SseEvent {
    /// The event's name (`change`, `processed`, `attached`, `overview`, `close`…).
    event: String,
    /// Its JSON, as text.
    data: String,
    /// Its id, to resume after (`Last-Event-ID`); only on events a client can resume after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
}

/// A `text/event-stream` answer of `stream`, never cached nor buffered by a proxy: every SSE
/// route's (channels, attached subscription clients, the live overview).
pub(crate) fn event_stream<S>(stream: S) -> Response
where
    S: futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    let mut response = Body::from_stream(stream).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Takes messages from the front of `backlog` and renders them into one chunk of at most
/// `budget` bytes (at least one message, however large).
fn render_messages(backlog: &mut Backlog, budget: usize) -> Bytes {
    let mut size = 0;
    let mut n = 0;
    for (m, _) in backlog.iter() {
        // `id: <i64>:<i64>\nevent: processed\ndata: ` and `\n\n` take at most 69 bytes.
        let len = m.body.len() + 72;
        if n > 0 && size + len > budget {
            break;
        }
        size += len;
        n += 1;
    }
    let mut out = String::with_capacity(size);
    for (m, cursor) in backlog.drain(..n) {
        out.push_str("id: ");
        let _ = write!(out, "{cursor}");
        out.push_str("\nevent: ");
        out.push_str(m.kind.as_str());
        out.push_str("\ndata: ");
        out.push_str(&m.body);
        out.push_str("\n\n");
    }
    Bytes::from(out)
}

/// One chunk for a step; `None` ends the stream.
fn render(step: &Step, client_buffer: usize) -> Option<Bytes> {
    let text = match step {
        Step::Messages(msgs) => {
            let mut backlog: Backlog = msgs.iter().cloned().collect();
            return Some(render_messages(&mut backlog, usize::MAX));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::message::Msg;

    #[test]
    fn a_chunk_holds_at_most_the_budget() {
        let json = format!("{{\"body\":\"{}\"}}", "x".repeat(10_000));
        let mut backlog: Backlog = (1..=100)
            .map(|p| (Msg::change("posts", p, &json), Cursor { change: p, processed: None }))
            .collect();
        let mut chunks = Vec::new();
        while !backlog.is_empty() {
            chunks.push(render_messages(&mut backlog, 64 * 1024));
        }
        assert!(chunks.len() > 10, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.len() <= 64 * 1024));
        let text: String = chunks.iter().map(|c| std::str::from_utf8(c).unwrap()).collect();
        let ids: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("id: ")).collect();
        let want: Vec<String> = (1..=100).map(|p| p.to_string()).collect();
        assert_eq!(ids, want, "every message once, in order");
        // One message larger than the budget still goes out, alone.
        let mut big: Backlog =
            [(Msg::change("posts", 1, &json), Cursor { change: 1, processed: None })].into();
        assert!(render_messages(&mut big, 100).len() > 10_000);
        assert!(big.is_empty());
    }
}
