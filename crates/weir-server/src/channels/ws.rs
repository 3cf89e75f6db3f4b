//! `GET /v1/channels/ws`: WebSocket.
//!
//! Server → client: one text frame per message, `{"id", "type": "change" | "processed",
//! "channel", "position", …}`. Slow client: Close 1008 `slow_client: …`; shutdown: Close 1001.
//! Client → server: `{"type": "subscribe", "channels": [...]}` adds live-only channels.

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use futures::SinkExt;
use serde::Deserialize;

use super::message::{Cursor, Msg, parse_channels};
use super::session::{CloseReason, Session, Step};
use super::{ChannelQuery, parse_query};
use crate::{ApiError, ApiQuery, AppState};

/// Read buffer per connection: clients send little.
const READ_BUFFER: usize = 4 * 1024;
/// Write buffer target: frames are flushed per batch anyway.
const WRITE_BUFFER: usize = 16 * 1024;
/// Largest message a client may send.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

/// Subscribes to channels over WebSocket.
///
/// Text frames `{"id": "<cursor>", "type": "change", "channel", "position", "event"}` and
/// `{"id", "type": "processed", "channel": "processed", "position", "entity", "key", "kind",
/// "lsn"}`. A slow client gets Close 1008 (`slow_client: …`), shutdown Close 1001. Resume with
/// `after=<id>`. The client may send `{"type": "subscribe", "channels": [...]}` to add
/// channels live (no replay).
#[utoipa::path(get, path = "/v1/channels/ws", tag = "channels",
    params(
        ("channel" = Vec<String>, Query, description = "Channels: `<entity>`, `<entity>/<id>`, \
            `<parent>/<value>/<entity>`, `processed`; repeat the parameter or separate with `,`"),
        ("after" = Option<String>, Query, description = "Resume after this message id"),
        ("access_token" = Option<String>, Query, description = "The bearer token, for clients \
            that cannot set headers"),
    ),
    responses(
        (status = 101, description = "Switching to WebSocket"),
        (status = 400, description = "No channel, a malformed channel name or cursor, or not a \
            WebSocket upgrade", body = crate::ErrorBody),
        (status = 401, description = "Token required", body = crate::ErrorBody),
    ))]
pub(crate) async fn ws(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ChannelQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let (channels, after) = parse_query(&query)?;
    let upgrade = upgrade.map_err(|r| {
        ApiError::bad_request(format!(
            "this endpoint needs a WebSocket upgrade request ({}); use /v1/channels/sse for \
             plain HTTP",
            r.body_text()
        ))
    })?;
    let session = Session::new(state.hub(), channels, after, "ws");
    Ok(upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| run(socket, session)))
}

#[derive(Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    channels: Vec<String>,
}

async fn run(mut socket: WebSocket, mut session: Session) {
    loop {
        let step = tokio::select! {
            step = session.next() => step,
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(Message::Text(text))) => {
                    if let Some(reply) = client_message(&mut session, text.as_str())
                        && socket.send(Message::Text(reply.into())).await.is_err()
                    {
                        return;
                    }
                    continue;
                }
                Some(Ok(_)) => continue,
            },
        };
        let sent = match step {
            Step::Messages(msgs) => send_all(&mut socket, &msgs).await,
            Step::Gap { after, oldest } => {
                let frame = serde_json::json!({
                    "type": "gap",
                    "reason": "retention",
                    "message": format!(
                        "events after {after} are no longer retained; replaying from the oldest, {oldest}"
                    ),
                    "after": after,
                    "oldest": oldest,
                });
                socket.send(Message::Text(frame.to_string().into())).await
            }
            Step::KeepAlive => socket.send(Message::Ping(Default::default())).await,
            Step::Close(reason) => {
                let (code, text) = match reason {
                    CloseReason::SlowClient => (
                        close_code::POLICY,
                        format!(
                            "slow_client: fell more than {} messages behind; reconnect with after=<last id>",
                            session.client_buffer
                        ),
                    ),
                    CloseReason::Shutdown => (
                        close_code::AWAY,
                        "shutdown: the server is stopping; reconnect with after=<last id>".into(),
                    ),
                };
                let frame = CloseFrame { code, reason: Utf8Bytes::from(text) };
                let _ = socket.send(Message::Close(Some(frame))).await;
                return;
            }
            Step::End => return,
        };
        if sent.is_err() {
            return;
        }
    }
}

async fn send_all(
    socket: &mut WebSocket,
    msgs: &[(std::sync::Arc<Msg>, Cursor)],
) -> Result<(), axum::Error> {
    for (m, cursor) in msgs {
        socket.feed(Message::Text(frame(m, cursor).into())).await?;
    }
    socket.flush().await
}

/// `{"id":"<cursor>","type":"<kind>",` + the shared body without its `{`.
fn frame(m: &Msg, cursor: &Cursor) -> String {
    let id = cursor.to_string();
    let rest = m.body.strip_prefix('{').unwrap_or(&m.body);
    let mut out = String::with_capacity(rest.len() + id.len() + 32);
    out.push_str("{\"id\":\"");
    out.push_str(&id);
    out.push_str("\",\"type\":\"");
    out.push_str(m.kind.as_str());
    out.push_str("\",");
    out.push_str(rest);
    out
}

/// Handles a client frame; returns an error frame to send back, if any.
fn client_message(session: &mut Session, text: &str) -> Option<String> {
    let error = |message: String| {
        Some(
            serde_json::json!({"type": "error", "error": "bad_request", "message": message})
                .to_string(),
        )
    };
    let msg: ClientMessage = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => {
            return error(format!("expected {{\"type\":\"subscribe\",\"channels\":[...]}}: {e}"));
        }
    };
    if msg.kind != "subscribe" {
        return error(format!(
            "unknown message type `{}`; only `subscribe` is understood",
            msg.kind
        ));
    }
    match parse_channels(msg.channels.iter().map(String::as_str)) {
        Ok(channels) => {
            session.add_live(channels);
            None
        }
        Err(e) => error(e.to_string()),
    }
}
