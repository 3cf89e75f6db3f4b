//! Clients attached to a subscription over SSE or WebSocket: one delivery task per connection
//! owns the [`Attachment`] (its emitters' leases), and the transports only render what it
//! sends.
//!
//! ```text
//! GET …/sse | …/ws ─► Attachment::attach (404, 409 busy, 400 here, before the stream starts)
//!   delivery task:  attached {token, emitters}
//!     loop: acks (WS frames) ─► Attachment::ack
//!           every 3 s ─► renew the leases (and read back acks posted to …/ack)
//!           unacknowledged ≥ http.client_buffer ─► wait for acks (no more reading)
//!           next() ─► events ─► the transport      | caught up ─► wait for the log's wake-up
//!                 ─► paused (stopped, halted): say so once, poll
//!                 ─► reattach (re-split, new definition, lease lost): say why, end
//!     end: server stop ─► close {shutdown}; client gone ─► release the emitters
//! ```
//!
//! The promise: a client that reconnects gets exactly what it has not acknowledged. The
//! checkpoints move only on acknowledgements (or past events the subscription does not select
//! while nothing is outstanding), and `Attachment::next` is never cancelled mid-way: every
//! wait in the loop is around it, never on it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};
use weir_consumer::ConsumerState;
use weir_log::Wake;
use weir_streams::attach::{Attachment, Delivery, Next, ack_token};

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};

/// Leases are renewed this often (they last `weir_streams::attach::LEASE_TTL`, 10 s).
const RENEW_EVERY: Duration = Duration::from_secs(3);
/// A keep-alive after this much silence.
// Also how soon a client that left is noticed (a write to its connection fails) and its
// emitters are released for the next attach.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// How often a paused subscription is looked at again.
const PAUSE_POLL: Duration = Duration::from_secs(1);
/// How often acks posted elsewhere are read back while the client is at its limit.
const ACK_POLL: Duration = Duration::from_millis(200);
/// When no wake-up comes (appends logged by another process), the log is read again after this.
const FALLBACK_POLL: Duration = Duration::from_secs(1);
/// Most log rows read per step.
const BATCH: usize = 256;

/// Which emitters to attach to.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AttachQuery {
    /// Emitters, comma-separated (`0,3`); default: every free one.
    #[param(pattern = r"^\s*([+-]?[0-9]{1,9}\s*)?(,\s*([+-]?[0-9]{1,9}\s*)?)*$")]
    emitters: Option<String>,
    /// The bearer token, for clients that cannot set headers (under `http.protect_reads`).
    #[allow(dead_code)]
    access_token: Option<String>,
}

impl AttachQuery {
    fn emitters(&self) -> Result<Option<Vec<i32>>, ApiError> {
        let Some(list) = self.emitters.as_deref() else { return Ok(None) };
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<i32>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "emitters `{list}`: `{s}` is not an emitter number; use numbers \
                         separated by commas, such as `0,3`"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// What the delivery task sends to the transport.
#[derive(Debug)]
enum Out {
    Attached { token: String, emitters: Vec<i32> },
    Events(Vec<Delivery>),
    Paused(ConsumerState),
    Reattach(String),
    KeepAlive,
    Shutdown,
}

/// The answer to an acknowledgement.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Acked {
    /// The subscription.
    subscription: String,
    /// Everything delivered to the attachment at or below it is acknowledged.
    position: i64,
}

/// An acknowledgement for an attachment, from any connection.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Ack {
    /// The attachment's token (the `attached` event's).
    token: String,
    /// The last position handled: everything delivered at or below it is acknowledged.
    position: i64,
}

/// Attaches to a subscription over Server-Sent Events.
///
/// The first event is `attached` with `{token, emitters}`; then `event` messages with
/// `id: <log position>` and data `{emitter, event}`, in log order. Acknowledge with
/// `POST /v1/subscriptions/{name}/ack {token, position}`: a client that reconnects gets exactly
/// what it has not acknowledged. More than `http.client_buffer` unacknowledged deliveries and
/// the server waits. `paused` (`{state, message}`) when the subscription is stopped or halted
/// (events follow when it runs again); `reattach` (`{reason}`) before the stream ends because
/// the subscription changed — attach again; `close` (`{reason: "shutdown"}`) when the server
/// stops. `: keep-alive` comments every 15 s of silence.
#[utoipa::path(get, path = "/v1/subscriptions/{name}/sse", tag = "subscriptions",
    params(("name" = String, Path, description = "Subscription name"), AttachQuery),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = crate::channels::SseEvent),
        (status = 400, description = "A bad emitter list, or the subscription delivers to a \
            Rust handler", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody),
        (status = 409, description = "Every requested emitter is held by another client \
            (`busy`)", body = ErrorBody),
    ))]
pub(crate) async fn sse(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<AttachQuery>,
) -> Result<Response, ApiError> {
    let emitters = query.emitters()?;
    let attachment = Attachment::attach(state.pool(), &name, emitters.as_deref()).await?;
    tracing::info!(subscription = %name, emitters = ?attachment.emitters(), "client attached over SSE");
    let rx = spawn_delivery(&state, attachment, None);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let out = rx.recv().await?;
        let end = matches!(out, Out::Reattach(_) | Out::Shutdown);
        let chunk = Ok::<Bytes, Infallible>(Bytes::from(render_sse(&out)));
        // The last message ends the stream (the task ends too).
        Some((chunk, if end { close(rx) } else { rx }))
    });
    Ok(crate::channels::event_stream(stream))
}

/// A receiver that yields nothing more.
fn close(mut rx: mpsc::Receiver<Out>) -> mpsc::Receiver<Out> {
    rx.close();
    while rx.try_recv().is_ok() {}
    rx
}

fn render_sse(out: &Out) -> String {
    let event = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
    match out {
        Out::Attached { token, emitters } => {
            event("attached", serde_json::json!({"token": token, "emitters": emitters}))
        }
        Out::Events(deliveries) => {
            let mut s = String::new();
            for d in deliveries {
                s.push_str(&format!("id: {}\nevent: event\ndata: ", d.event.position));
                s.push_str(&serde_json::to_string(d).unwrap_or_default());
                s.push_str("\n\n");
            }
            s
        }
        Out::Paused(st) => event("paused", paused_json(*st)),
        Out::Reattach(reason) => event("reattach", serde_json::json!({"reason": reason})),
        Out::KeepAlive => ": keep-alive\n\n".to_string(),
        Out::Shutdown => event("close", shutdown_json()),
    }
}

fn paused_json(state: ConsumerState) -> serde_json::Value {
    serde_json::json!({
        "state": state,
        "message": format!(
            "the subscription is {state}; events follow when it runs again \
             (POST …/start, or …/resume or …/skip when halted)"
        ),
    })
}

fn shutdown_json() -> serde_json::Value {
    serde_json::json!({
        "reason": "shutdown",
        "message": "the server is stopping; attach again to continue from what you acknowledged",
    })
}

/// Attaches to a subscription over WebSocket.
///
/// Server → client text frames: `{"type":"attached","token","emitters"}`, then
/// `{"type":"event","id":<log position>,"emitter","event"}` in log order, `{"type":"paused",
/// "state","message"}`, `{"type":"reattach","reason"}` (then Close 1000: attach again).
/// Client → server: `{"type":"ack","position":N}` acknowledges everything delivered at or below
/// N. Shutdown: Close 1001.
#[utoipa::path(get, path = "/v1/subscriptions/{name}/ws", tag = "subscriptions",
    params(("name" = String, Path, description = "Subscription name"), AttachQuery),
    responses(
        (status = 101, description = "Switching to WebSocket"),
        (status = 400, description = "A bad emitter list, a Rust-handler subscription, or not \
            a WebSocket upgrade", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody),
        (status = 409, description = "Every requested emitter is held by another client \
            (`busy`)", body = ErrorBody),
    ))]
pub(crate) async fn ws(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<AttachQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let emitters = query.emitters()?;
    let upgrade = upgrade.map_err(|r| {
        ApiError::bad_request(format!(
            "this endpoint needs a WebSocket upgrade request ({}); use …/sse for plain HTTP",
            r.body_text()
        ))
    })?;
    let attachment = Attachment::attach(state.pool(), &name, emitters.as_deref()).await?;
    tracing::info!(subscription = %name, emitters = ?attachment.emitters(), "client attached over WebSocket");
    let (ack_tx, ack_rx) = mpsc::channel(64);
    let rx = spawn_delivery(&state, attachment, Some(ack_rx));
    Ok(upgrade
        .max_message_size(64 * 1024)
        .max_frame_size(64 * 1024)
        .on_upgrade(move |socket| run_ws(socket, rx, ack_tx)))
}

#[derive(Deserialize)]
struct ClientFrame {
    #[serde(rename = "type")]
    kind: String,
    position: Option<i64>,
}

async fn run_ws(mut socket: WebSocket, mut rx: mpsc::Receiver<Out>, acks: mpsc::Sender<i64>) {
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(out) = out else { return };
                let frames: Vec<Message> = match out {
                    Out::Attached { token, emitters } => vec![text(serde_json::json!({
                        "type": "attached", "token": token, "emitters": emitters}))],
                    Out::Events(ds) => ds.iter().map(|d| text(serde_json::json!({
                        "type": "event", "id": d.event.position, "emitter": d.emitter,
                        "event": d.event}))).collect(),
                    Out::Paused(st) => {
                        let mut v = paused_json(st);
                        v["type"] = "paused".into();
                        vec![text(v)]
                    }
                    Out::Reattach(reason) => {
                        let notice = text(serde_json::json!({"type": "reattach", "reason": reason}));
                        let close = Message::Close(Some(CloseFrame {
                            code: close_code::NORMAL,
                            reason: Utf8Bytes::from("reattach"),
                        }));
                        let _ = tokio::time::timeout(Duration::from_secs(5), async {
                            let _ = socket.send(notice).await;
                            let _ = socket.send(close).await;
                        }).await;
                        return;
                    }
                    Out::KeepAlive => vec![Message::Ping(Default::default())],
                    Out::Shutdown => {
                        let close = Message::Close(Some(CloseFrame {
                            code: close_code::AWAY,
                            reason: Utf8Bytes::from("shutdown: the server is stopping; attach again"),
                        }));
                        let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close)).await;
                        return;
                    }
                };
                for f in frames {
                    if socket.send(f).await.is_err() { return }
                }
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(Message::Text(t))) => {
                    match serde_json::from_str::<ClientFrame>(t.as_str()) {
                        Ok(ClientFrame { kind, position: Some(p) }) if kind == "ack" => {
                            if acks.send(p).await.is_err() { return }
                        }
                        _ => {
                            let error = text(serde_json::json!({
                                "type": "error", "error": "bad_request",
                                "message": "expected {\"type\":\"ack\",\"position\":N}"}));
                            if socket.send(error).await.is_err() { return }
                        }
                    }
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

fn text(v: serde_json::Value) -> Message {
    Message::Text(v.to_string().into())
}

/// Acknowledges for an attachment (from any connection, any weir process): everything
/// delivered at or below `position` will not be delivered again.
#[utoipa::path(post, path = "/v1/subscriptions/{name}/ack", tag = "subscriptions",
    params(("name" = String, Path, description = "Subscription name")),
    request_body = Ack,
    security(("bearer" = [])),
    responses((status = 200, description = "Acknowledged", body = Acked),
              (status = 404, description = "No such subscription (`unknown_subscription`), or \
                  the token holds none of its emitters (`unknown_attachment`)", body = ErrorBody)))]
pub(crate) async fn ack(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<Ack>,
) -> Result<Json<Acked>, ApiError> {
    if !ack_token(state.pool(), &name, &body.token, body.position).await? {
        super::require(&state, &name).await?;
        return Err(ApiError::not_found(
            "unknown_attachment",
            format!(
                "token `{}` holds no emitter of subscription `{name}`: it disconnected (its \
                 lease expired) or never attached; attach again and acknowledge with the new \
                 token",
                body.token
            ),
        ));
    }
    Ok(Json(Acked { subscription: name, position: body.position }))
}

fn spawn_delivery(
    state: &AppState,
    attachment: Attachment,
    acks: Option<mpsc::Receiver<i64>>,
) -> mpsc::Receiver<Out> {
    // Small: what is in flight is bounded by acknowledgements, not by this queue.
    let (tx, rx) = mpsc::channel(2);
    let task = Delivering {
        limit: state.config().http.client_buffer.max(1),
        attachment,
        tx,
        acks,
        wake: state.0.wake.clone(),
        cancel: state.0.cancel.clone(),
        in_flight: VecDeque::new(),
        renew_at: Instant::now() + RENEW_EVERY,
        last_sent: Instant::now(),
    };
    tokio::spawn(task.run());
    rx
}

/// One connection's delivery task.
struct Delivering {
    attachment: Attachment,
    tx: mpsc::Sender<Out>,
    acks: Option<mpsc::Receiver<i64>>,
    wake: Wake,
    cancel: CancellationToken,
    /// Positions delivered and not acknowledged yet, in order.
    in_flight: VecDeque<i64>,
    /// At most this many in flight.
    limit: usize,
    renew_at: Instant,
    last_sent: Instant,
}

/// Why the loop ends.
enum End {
    /// Tell the client this, then end.
    Say(Out),
    /// The client is gone.
    Gone,
}

impl Delivering {
    async fn run(mut self) {
        let attached = Out::Attached {
            token: self.attachment.token().to_string(),
            emitters: self.attachment.emitters(),
        };
        let end = match self.send(attached).await {
            Ok(()) => self.deliver().await,
            Err(end) => end,
        };
        // Acks the connection sent before it went are kept.
        if let Some(acks) = &mut self.acks {
            while let Ok(p) = acks.try_recv() {
                if let Err(e) = self.attachment.ack(p).await {
                    tracing::debug!(error = %e, "a last acknowledgement was not kept");
                    break;
                }
            }
        }
        if let End::Say(out) = end {
            // The transport may be slow to take it; the leases are given back regardless.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.tx.send(out)).await;
        }
        tracing::debug!(subscription = %self.attachment.name(), "client detached");
        self.attachment.release().await;
    }

    async fn deliver(&mut self) -> End {
        let mut paused: Option<ConsumerState> = None;
        let mut pending_acks: Vec<i64> = Vec::new();
        loop {
            for p in pending_acks.drain(..) {
                if let Err(e) = self.attachment.ack(p).await {
                    return end_for(e);
                }
            }
            if let Err(e) = self.renew_if_due().await {
                return e;
            }
            self.forget_acknowledged();
            if self.in_flight.len() >= self.limit {
                // Read nothing more until the client acknowledges.
                if let Err(e) = self.wait(ACK_POLL, &mut pending_acks, None).await {
                    return e;
                }
                if let Err(e) = self.attachment.refresh_acks().await {
                    return end_for(e);
                }
                continue;
            }
            let head = self.wake.head();
            let room = (self.limit - self.in_flight.len()).min(BATCH);
            match self.attachment.next(room as i64).await {
                Ok(Next::Events(events)) if events.is_empty() => {
                    paused = None;
                    if self.last_sent.elapsed() >= KEEP_ALIVE
                        && let Err(e) = self.send(Out::KeepAlive).await
                    {
                        return e;
                    }
                    let wait =
                        FALLBACK_POLL.min(KEEP_ALIVE.saturating_sub(self.last_sent.elapsed()));
                    if let Err(e) = self.wait(wait, &mut pending_acks, Some(head)).await {
                        return e;
                    }
                }
                Ok(Next::Events(events)) => {
                    paused = None;
                    self.in_flight.extend(events.iter().map(|d| d.event.position));
                    if let Err(e) = self.send(Out::Events(events)).await {
                        return e;
                    }
                }
                Ok(Next::Paused(state)) => {
                    if paused != Some(state) {
                        paused = Some(state);
                        if let Err(e) = self.send(Out::Paused(state)).await {
                            return e;
                        }
                    } else if self.last_sent.elapsed() >= KEEP_ALIVE
                        && let Err(e) = self.send(Out::KeepAlive).await
                    {
                        return e;
                    }
                    if let Err(e) = self.wait(PAUSE_POLL, &mut pending_acks, None).await {
                        return e;
                    }
                }
                Ok(Next::Reattach(reason)) => return End::Say(Out::Reattach(reason)),
                Err(e) => return end_for(e),
            }
        }
    }

    /// Drops from `in_flight` what the client acknowledged.
    fn forget_acknowledged(&mut self) {
        let acked = self.attachment.acknowledged();
        while self.in_flight.front().is_some_and(|p| *p <= acked) {
            self.in_flight.pop_front();
        }
    }

    async fn renew_if_due(&mut self) -> Result<(), End> {
        if Instant::now() < self.renew_at {
            return Ok(());
        }
        self.attachment.renew().await.map_err(end_for)?;
        self.renew_at = Instant::now() + RENEW_EVERY;
        Ok(())
    }

    /// Waits up to `at_most` (never past the next renewal): an ack, the log moving past
    /// `head`, the server stopping or the client leaving end it early.
    async fn wait(
        &mut self,
        at_most: Duration,
        pending_acks: &mut Vec<i64>,
        head: Option<i64>,
    ) -> Result<(), End> {
        let until = (Instant::now() + at_most).min(self.renew_at);
        let mut wake = self.wake.clone();
        let moved = async {
            match head {
                Some(h) => {
                    wake.wait_past(h, until.saturating_duration_since(Instant::now())).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(End::Say(Out::Shutdown)),
            _ = self.tx.closed() => Err(End::Gone),
            p = recv_ack(&mut self.acks) => {
                pending_acks.push(p);
                Ok(())
            }
            _ = moved => Ok(()),
            _ = tokio::time::sleep_until(until) => Ok(()),
        }
    }

    /// Sends to the transport, renewing the leases while a slow client keeps it waiting.
    async fn send(&mut self, out: Out) -> Result<(), End> {
        let mut out = Some(out);
        loop {
            let renew_at = self.renew_at;
            let sent = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(End::Say(Out::Shutdown)),
                permit = self.tx.reserve() => {
                    if let Some(out) = out.take() {
                        permit.map_err(|_| End::Gone)?.send(out);
                    }
                    true
                }
                _ = tokio::time::sleep_until(renew_at) => false,
            };
            if sent {
                self.last_sent = Instant::now();
                return Ok(());
            }
            self.renew_if_due().await?;
        }
    }
}

/// The next ack from the connection; never, when it sends none.
async fn recv_ack(acks: &mut Option<mpsc::Receiver<i64>>) -> i64 {
    match acks {
        Some(rx) => match rx.recv().await {
            Some(p) => p,
            None => {
                *acks = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// What to tell the client when the attachment fails.
fn end_for(e: weir_streams::Error) -> End {
    match e {
        weir_streams::Error::Busy(m) => End::Say(Out::Reattach(m)),
        e @ weir_streams::Error::UnknownSubscription(_) => End::Say(Out::Reattach(e.to_string())),
        e => {
            tracing::warn!(error = %e, "an attached subscription client is stopped");
            End::Say(Out::Reattach(
                "the server could not continue this attachment (its log has the details); \
                 attach again"
                    .into(),
            ))
        }
    }
}
