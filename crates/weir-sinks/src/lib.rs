//! Sinks: where a subscription's events leave the database — webhooks and NATS JetStream.
//!
//! ```text
//! subscription (weir-streams) ─► consumer engine: emitters = lanes, routed by stream / key
//!   ─► group of consecutive events of one emitter (≤ batch_size / max_in_flight)
//!   ─► Delivery::deliver(events) ─┬─ webhook: POST (one event, or {"events": [...]}),
//!   │                             │  Standard Webhooks headers, 2xx = delivered
//!   │                             └─ nats: publish each with Nats-Msg-Id, await every PubAck
//!   └─ Ok ─► the checkpoint moves past the group (in the engine's transaction)
//!      Err ─► rolled back; retried (backoff, Retry-After), then halt / skip / park; 410 Gone
//!             stops the subscription with the reason
//! ```
//!
//! Delivery is at least once: a crash after the receiver has an event and before the
//! checkpoint commits sends it again, with the same [`message_id`] — so a receiver that drops
//! ids it has seen (JetStream does, within its duplicate window) gets each event exactly once.
//!
//! Modules: [`config`] (what a sink is configured with, validated), [`signature`] (Standard
//! Webhooks signing and verifying), [`outbound`] (the signed POST, shared with `http` job
//! workers), [`webhook`] and [`nats`] (the deliveries).

pub mod config;
pub mod nats;
pub mod outbound;
pub mod signature;
pub mod webhook;

use futures::future::BoxFuture;
use serde_json::Value;
use weir_consumer::OperatorError;
use weir_core::{Event, Kind};

pub use config::{NatsSink, WebhookSink};
pub use signature::Secrets;

/// Delivers a subscription's events to a receiver outside the database.
pub trait Delivery: Send + Sync + 'static {
    /// Delivers `events` — consecutive events of one emitter, in log order — and returns once
    /// the receiver has them all (a 2xx, every PubAck). An error means none may be counted as
    /// delivered: the engine retries them, and the receiver may see some twice (same ids).
    fn deliver<'a>(&'a self, events: &'a [&'a Event]) -> BoxFuture<'a, Result<(), OperatorError>>;
}

/// The id of `subscription`'s delivery of the event at log `position`: the same on every retry
/// and every redelivery, so receivers deduplicate by it (`webhook-id`, `Nats-Msg-Id`). It names
/// the subscription: a subscription deleted and created again under the same name delivers
/// the same ids, which a deduplicating receiver drops — create it under a new name to deliver
/// again.
pub fn message_id(subscription: &str, position: i64) -> String {
    format!("{subscription}:{position}")
}

/// What a sink calls an event's type: an appended event's own type, else `<entity>.<kind>`
/// (`posts.insert`).
pub fn event_type(event: &Event) -> String {
    if event.kind == Kind::Append
        && let Some(t) =
            event.new_record.as_ref().and_then(|r| r.get("type")).and_then(Value::as_str)
    {
        return t.to_string();
    }
    format!("{}.{}", event.entity, event.kind.as_str())
}

/// The JSON a sink sends for one event (a webhook body, an element of a batch's `events`, a
/// NATS message):
///
/// ```json
/// {"id": "orders:42", "subscription": "orders", "position": 42, "type": "order.placed",
///  "timestamp": "2026-12-01T12:00:00.000001Z", "event": { ...the event as logged... }}
/// ```
pub fn envelope(subscription: &str, event: &Event) -> Value {
    serde_json::json!({
        "id": message_id(subscription, event.position),
        "subscription": subscription,
        "position": event.position,
        "type": event_type(event),
        "timestamp": event.commit_ts,
        "event": event,
    })
}
