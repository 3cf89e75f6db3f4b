//! `GET /v1/channels/ws`: WebSocket.
//!
//! Server → client: one text frame per message, `{"id", "type": "change" | "processed",
//! "channel", "position", …}`. Slow client: Close 1008 `slow_client: …`; shutdown: Close 1001.
//! Client → server: `{"type": "subscribe", "channels": [...]}` adds live-only channels.

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use std::time::Duration;

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
/// Largest message (and frame: tungstenite would otherwise accept, and reserve memory for, a
/// frame of up to 16 MiB before looking at the message limit) a client may send.
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
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| run(socket, session)))
}

#[derive(Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    channels: Vec<String>,
}

/// How long the close frame may wait for a slow client to read what was written before it;
/// then the connection is dropped without it.
const SLOW_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// The same at shutdown.
const SHUTDOWN_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

async fn run(mut socket: WebSocket, mut session: Session) {
    loop {
        let step = tokio::select! {
            step = session.next() => step,
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(Message::Text(text))) => {
                    if let Some(reply) = client_message(&mut session, text.as_str()) {
                        // Guarded like any write: a client that sends bad frames and stops
                        // reading must not pin this task past its drop or the shutdown.
                        tokio::select! {
                            sent = socket.send(Message::Text(reply.into())) => {
                                if sent.is_err() { return }
                            }
                            _ = session.interrupted() => {}
                        }
                    }
                    continue;
                }
                Some(Ok(_)) => continue,
            },
        };
        let frames: Vec<Message> = match step {
            Step::Messages(msgs) => {
                msgs.iter().map(|(m, cursor)| Message::Text(frame(m, cursor).into())).collect()
            }
            Step::Gap { after, oldest } => {
                let notice = serde_json::json!({
                    "type": "gap",
                    "reason": "retention",
                    "message": format!(
                        "events after {after} are no longer retained; replaying from the oldest, {oldest}"
                    ),
                    "after": after,
                    "oldest": oldest,
                });
                vec![Message::Text(notice.to_string().into())]
            }
            Step::KeepAlive => vec![Message::Ping(Default::default())],
            Step::Close(reason) => {
                let (code, text, wait) = match reason {
                    CloseReason::SlowClient => (
                        close_code::POLICY,
                        format!(
                            "slow_client: fell more than {} messages behind; reconnect with after=<last id>",
                            session.client_buffer
                        ),
                        SLOW_CLOSE_TIMEOUT,
                    ),
                    CloseReason::Shutdown => (
                        close_code::AWAY,
                        "shutdown: the server is stopping; reconnect with after=<last id>".into(),
                        SHUTDOWN_CLOSE_TIMEOUT,
                    ),
                };
                let close =
                    Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from(text) }));
                // A client that stopped reading for good cannot take it: drop the connection.
                let _ = tokio::time::timeout(wait, socket.send(close)).await;
                return;
            }
            Step::End => return,
        };
        // A write stuck on a client that stopped reading gives way to its drop (slow_client)
        // or to the shutdown; the next step then says which.
        tokio::select! {
            sent = send_all(&mut socket, frames) => if sent.is_err() { return },
            _ = session.interrupted() => {}
        }
    }
}

async fn send_all(socket: &mut WebSocket, frames: Vec<Message>) -> Result<(), axum::Error> {
    for f in frames {
        socket.feed(f).await?;
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
    match parse_channels(msg.channels.iter().map(String::as_str))
        .and_then(|channels| session.add_live(channels))
    {
        Ok(()) => None,
        Err(e) => error(e.to_string()),
    }
}
