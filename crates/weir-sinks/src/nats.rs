//! The NATS JetStream sink: publish each event of a group with `Nats-Msg-Id`, await every
//! PubAck, and only then let the engine move the checkpoint.
//!
//! ```text
//! deliver(group: consecutive events of one emitter, ≤ max_in_flight, in log order)
//!   connection: one per Nats value (shared by the subscription's emitters in this process),
//!               made on the first delivery; async-nats reconnects on its own after that
//!   disconnected? ───────────────────────────────────────────────► Err(retry) "unreachable"
//!   the stream: looked up on first use and after any failure
//!     absent  ─► create_stream ? create (subjects(), retention, duplicate_window)
//!                              : Err(retry) "create it: nats stream add … | create_stream"
//!   each event's subject (the template, tokens sanitised) must match one of the stream's
//!   subjects ─────────────────────────────────────────────────────► Err(retry) naming both
//!   publish every event, in order, without waiting (headers Nats-Msg-Id, weir-subscription,
//!   weir-position, weir-type; body: the envelope)
//!   await all PubAcks (each within ack_timeout)
//!     all acked ─► Ok: the engine commits the checkpoint past the group
//!     any not   ─► Err(retry) naming the first failure and how many were acked
//! ```
//!
//! Nothing is checkpointed without its PubAck, so a NATS outage, a missing stream or a crash
//! loses nothing: the engine retries (with the subscription's backoff, then halt / skip / park)
//! and the retries carry the same `Nats-Msg-Id` ([`message_id`]), which JetStream drops within
//! the stream's duplicate window. Each event is stored once as long as a retry comes within
//! that window (2 minutes by default) — make it longer than the outages to ride out.
//!
//! # Order
//!
//! Events of one key (stream, row) are in one emitter, so in one group, in log order, published
//! on one connection: the server stores them in that order. A failed group is rolled back and
//! the engine retries its events one at a time from the first (those already stored are
//! acknowledged as duplicates), so the stream keeps the order as long as no event of a group is
//! stored after an earlier one that failed. The sink avoids the ways that happens:
//!
//! - rejections that depend on the event are checked before anything is published: each
//!   subject against the stream's subjects (async-nats checks the size against the server's
//!   `max_payload`, and the group stops publishing at the first publish that fails);
//! - a group is not published into a disconnected client (async-nats queues publishes while it
//!   reconnects and sends them afterwards, behind the lost ones): the publishing stops when
//!   the connection is not up.
//!
//! What remains is the moment a connection breaks under a group in flight: publishes written to
//! the dead socket are lost while those still queued in the client go out on the new connection,
//! and then later events are stored ahead of the lost ones. The sink logs it (`stored out of
//! order`) when a PubAck shows it. `max_in_flight = 1` rules it out, at one round trip per event.
//!
//! Metrics, labelled `subscription` and `sink = "nats"`: `weir_sink_delivered_total` (events of
//! groups wholly acknowledged), `weir_sink_failed_total` (failed deliveries), `weir_sink_request_seconds`
//! (per group, first publish to last PubAck), `weir_sink_commit_to_ack_seconds` (per event, its
//! commit to its PubAck).

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::future::BoxFuture;
use serde_json::Value;
use weir_consumer::OperatorError;
use weir_core::{Event, Kind, Secret};

use crate::config::SUBJECT_TOKENS;
use crate::{Delivery, NatsSink, envelope, event_type, message_id};

/// PubAcks the connection's JetStream context lets wait at once, over all emitters.
const ACKS_IN_FLIGHT: usize = 65_536;

/// Publishes a subscription's events to JetStream.
pub struct Nats {
    subscription: String,
    sink: NatsSink,
    token: Option<Secret>,
    /// The connection, made on the first delivery (the lock makes concurrent emitters wait
    /// for one attempt rather than each making its own).
    connection: tokio::sync::Mutex<Option<Connection>>,
    /// The stream's subjects, as last looked up; `None` until then and after a failure.
    stream_subjects: Mutex<Option<Arc<Vec<String>>>>,
}

#[derive(Clone)]
struct Connection {
    client: async_nats::Client,
    jetstream: jetstream::Context,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats")
            .field("subscription", &self.subscription)
            .field("url", &self.sink.url)
            .field("stream", &self.sink.stream)
            .field("subject", &self.sink.subject)
            .finish_non_exhaustive()
    }
}

impl Nats {
    /// A NATS delivery of `subscription`; fails when the sink is invalid or its token is not in
    /// this process's environment. Does no I/O: it connects on the first delivery.
    pub fn new(subscription: &str, sink: &NatsSink) -> Result<Self, String> {
        sink.validate()?;
        let token = match &sink.token_env {
            Some(name) => match std::env::var(name) {
                Ok(t) if !t.is_empty() => Some(Secret::new(t)),
                Ok(_) => {
                    return Err(format!(
                        "the environment variable {name} (the NATS sink's token_env) is empty \
                         in this process"
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "the environment variable {name} (the NATS sink's token_env) is not \
                         set in this process"
                    ));
                }
            },
            None => None,
        };
        Ok(Self {
            subscription: subscription.into(),
            sink: sink.clone(),
            token,
            connection: tokio::sync::Mutex::new(None),
            stream_subjects: Mutex::new(None),
        })
    }

    /// The subject `event` is published to: the template with each token's value sanitised.
    pub fn subject(&self, event: &Event) -> String {
        subject(&self.sink.subject, &self.subscription, event)
    }

    /// The connection, made now if this is the first delivery (or the last attempt failed).
    async fn connection(&self) -> Result<Connection, String> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let subscription = self.subscription.clone();
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("weir {}", self.subscription))
            .max_reconnects(None)
            .event_callback(move |event| {
                let subscription = subscription.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            tracing::warn!(%subscription, "NATS sink disconnected; reconnecting");
                        }
                        async_nats::Event::Connected => {
                            tracing::info!(%subscription, "NATS sink connected");
                        }
                        other => tracing::debug!(%subscription, event = %other, "NATS sink"),
                    }
                }
            });
        if let Some(token) = &self.token {
            options = options.token(token.expose().to_string());
        }
        let servers: Vec<&str> = self.sink.url.split(',').map(str::trim).collect();
        let client = options.connect(servers).await.map_err(|e| {
            format!(
                "the NATS server {} is unreachable ({e}); delivery is retried until it answers",
                self.sink.url
            )
        })?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(self.sink.ack_timeout)
            .max_ack_inflight(ACKS_IN_FLIGHT)
            .backpressure_on_inflight(false)
            .build(client.clone());
        let c = Connection { client, jetstream };
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The stream's subjects: looked up (and the stream created, with `create_stream`) on first
    /// use and after a failure.
    async fn stream_subjects(&self, js: &jetstream::Context) -> Result<Arc<Vec<String>>, String> {
        if let Some(s) = self.stream_subjects.lock().expect("stream subjects").clone() {
            return Ok(s);
        }
        let name = &self.sink.stream;
        let subjects = match js.get_stream(name).await {
            Ok(stream) => stream.cached_info().config.subjects.clone(),
            Err(e) if stream_not_found(&e) && self.sink.create_stream => {
                self.create_stream(js).await?
            }
            Err(e) if stream_not_found(&e) => {
                return Err(format!(
                    "the JetStream stream {name} does not exist on {}; create it (nats stream \
                     add {name} --subjects '{}' --dupe-window {}) or set create_stream = true \
                     on the sink to let weir create it",
                    self.sink.url,
                    self.sink.subjects().join(","),
                    humantime(self.sink.duplicate_window),
                ));
            }
            Err(e) => return Err(self.lookup_failed(&e)),
        };
        let subjects = Arc::new(subjects);
        *self.stream_subjects.lock().expect("stream subjects") = Some(subjects.clone());
        Ok(subjects)
    }

    async fn create_stream(&self, js: &jetstream::Context) -> Result<Vec<String>, String> {
        let name = &self.sink.stream;
        let config = stream::Config {
            name: name.clone(),
            subjects: self.sink.subjects(),
            retention: match self.sink.retention.as_str() {
                "interest" => stream::RetentionPolicy::Interest,
                "workqueue" => stream::RetentionPolicy::WorkQueue,
                _ => stream::RetentionPolicy::Limits,
            },
            duplicate_window: self.sink.duplicate_window,
            ..Default::default()
        };
        match js.create_stream(config).await {
            Ok(stream) => {
                tracing::info!(subscription = %self.subscription, stream = %name, subjects = ?self.sink.subjects(), "created the JetStream stream");
                Ok(stream.cached_info().config.subjects.clone())
            }
            Err(create) => match js.get_stream(name).await {
                // Created meanwhile by someone else (another emitter, another process).
                Ok(stream) => Ok(stream.cached_info().config.subjects.clone()),
                Err(_) => Err(format!(
                    "cannot create the JetStream stream {name} (subjects {}) on {}: {create}",
                    self.sink.subjects().join(","),
                    self.sink.url
                )),
            },
        }
    }

    fn lookup_failed(&self, e: &dyn std::fmt::Display) -> String {
        let e = e.to_string();
        let hint = if e.contains("no responders") {
            " (no JetStream answered: is the server started with JetStream, nats-server -js?)"
        } else {
            ""
        };
        format!(
            "cannot look up the JetStream stream {} on {}: {e}{hint}",
            self.sink.stream, self.sink.url
        )
    }

    /// Why `subject` (of the event at `position`) cannot be published: the stream does not
    /// store it.
    fn not_covered(&self, subject: &str, position: i64, stream_subjects: &[String]) -> String {
        let name = &self.sink.stream;
        let mut wanted = stream_subjects.to_vec();
        for s in self.sink.subjects() {
            if !wanted.contains(&s) {
                wanted.push(s);
            }
        }
        format!(
            "the JetStream stream {name} does not store subject {subject} (the event at \
             position {position}; the sink's subject is {}): the stream's subjects are [{}], \
             this sink's are [{}]; add them to the stream (nats stream edit {name} --subjects \
             '{}'), or point the sink at another stream (with create_stream = true to create \
             it)",
            self.sink.subject,
            stream_subjects.join(", "),
            self.sink.subjects().join(", "),
            wanted.join(","),
        )
    }

    async fn try_deliver(&self, events: &[&Event]) -> Result<(), String> {
        let Connection { client, jetstream: js } = self.connection().await?;
        if client.connection_state() != State::Connected {
            return Err(format!(
                "the NATS server {} is unreachable (disconnected; reconnecting)",
                self.sink.url
            ));
        }
        let covered = self.stream_subjects(&js).await?;
        // Everything that depends on the event is checked before anything is published.
        let mut messages = Vec::with_capacity(events.len());
        for event in events {
            let subject = self.subject(event);
            if !covered.iter().any(|filter| subject_matches(filter, &subject)) {
                return Err(self.not_covered(&subject, event.position, &covered));
            }
            let body = serde_json::to_vec(&envelope(&self.subscription, event)).map_err(|e| {
                format!("cannot encode the event at position {}: {e}", event.position)
            })?;
            messages.push((subject, body));
        }

        let started = Instant::now();
        let n = events.len();
        let mut results: Vec<Option<Result<PublishAck, String>>> = (0..n).map(|_| None).collect();
        let mut pending: VecDeque<(usize, BoxFuture<'static, Result<PublishAck, String>>)> =
            VecDeque::new();
        let mut stopped = None;
        'publish: for (i, (event, (subject, body))) in events.iter().zip(messages).enumerate() {
            let publish = PublishMessage::build()
                .message_id(message_id(&self.subscription, event.position))
                .header("weir-subscription", self.subscription.as_str())
                .header("weir-position", event.position.to_string().as_str())
                .header("weir-type", event_type(event).as_str())
                .payload(Bytes::from(body));
            loop {
                // Not into a disconnected client: it would send them after the lost ones.
                if client.connection_state() != State::Connected {
                    stopped = Some((i, "the connection went down before it was published".into()));
                    break 'publish;
                }
                match js.send_publish(subject.clone(), publish.clone()).await {
                    Ok(ack) => {
                        let ack = ack.into_future();
                        pending.push_back((
                            i,
                            Box::pin(async move { ack.await.map_err(|e| describe(&e)) }),
                        ));
                        break;
                    }
                    // Every PubAck slot taken (other emitters too): wait for our oldest.
                    Err(e) if e.kind() == PublishErrorKind::MaxAckPending => {
                        match pending.pop_front() {
                            Some((j, ack)) => results[j] = Some(ack.await),
                            None => tokio::time::sleep(Duration::from_millis(5)).await,
                        }
                    }
                    Err(e) => {
                        stopped = Some((i, describe(&e)));
                        break 'publish;
                    }
                }
            }
        }
        let (indices, acks): (Vec<usize>, Vec<_>) = pending.into_iter().unzip();
        for (i, r) in indices.into_iter().zip(futures::future::join_all(acks).await) {
            results[i] = Some(r);
        }
        let elapsed = started.elapsed();

        let labels = [("subscription", self.subscription.clone()), ("sink", "nats".to_string())];
        let now = chrono::Utc::now();
        let mut acked = 0;
        let mut first_failure: Option<(usize, String)> = None;
        let mut out_of_order = false;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Some(Ok(ack)) => {
                    acked += 1;
                    if first_failure.is_some() && !ack.duplicate {
                        out_of_order = true;
                    }
                    let lag = (now - events[i].commit_ts).num_microseconds().unwrap_or(0);
                    metrics::histogram!("weir_sink_commit_to_ack_seconds", &labels)
                        .record(lag.max(0) as f64 / 1e6);
                }
                Some(Err(e)) if first_failure.is_none() => first_failure = Some((i, e)),
                Some(Err(_)) => {}
                None if first_failure.is_none() => {
                    first_failure = stopped.take().or(Some((i, "not published".into())));
                }
                None => {}
            }
        }
        metrics::histogram!("weir_sink_request_seconds", &labels).record(elapsed.as_secs_f64());
        let Some((i, error)) = first_failure else {
            // Counted once the whole group is acknowledged (a failed group's acknowledged
            // events come again, as duplicates, and are counted then).
            metrics::counter!("weir_sink_delivered_total", &labels).increment(n as u64);
            return Ok(());
        };
        let event = events[i];
        let mut message = format!(
            "publishing the event at position {} to {} failed: {error}; {acked} of {n} \
             acknowledged",
            event.position,
            self.subject(event),
        );
        if error.contains("no stream") {
            message.push_str(&format!(
                " (is the JetStream stream {} still there, with its subjects?)",
                self.sink.stream
            ));
        }
        if out_of_order {
            message.push_str("; later events of the group were stored, so the stream has them stored out of order");
        }
        Err(message)
    }
}

impl Delivery for Nats {
    fn deliver<'a>(&'a self, events: &'a [&'a Event]) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(async move {
            if events.is_empty() {
                return Ok(());
            }
            self.try_deliver(events).await.map_err(|e| {
                // Look the stream up again on the next attempt: it may have changed.
                *self.stream_subjects.lock().expect("stream subjects") = None;
                metrics::counter!("weir_sink_failed_total", "subscription" => self.subscription.clone(), "sink" => "nats")
                    .increment(1);
                tracing::warn!(subscription = %self.subscription, events = events.len(), first = events[0].position, error = %e, "NATS delivery failed; it is retried");
                OperatorError::retry(e)
            })
        })
    }
}

/// A publish error in words (async-nats's kind, and the server's reason when it sent one).
fn describe(e: &async_nats::jetstream::context::PublishError) -> String {
    match e.kind() {
        PublishErrorKind::StreamNotFound => {
            "no stream stores the subject (the server answered no responders)".into()
        }
        PublishErrorKind::TimedOut => "no PubAck within ack_timeout".into(),
        _ => e.to_string(),
    }
}

fn stream_not_found(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        async_nats::jetstream::context::GetStreamErrorKind::JetStream(err)
            if err.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// `2m`, `90s`, `1500ms`: a duration as the nats CLI takes it.
fn humantime(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The subject of `event`: `template` with each `{token}` replaced by its sanitised value.
fn subject(template: &str, subscription: &str, event: &Event) -> String {
    let appended = match (&event.kind, &event.new_record) {
        (Kind::Append, Some(row)) => Some((
            row.get("stream").and_then(Value::as_str).unwrap_or_default(),
            row.get("type").and_then(Value::as_str).unwrap_or_default(),
        )),
        _ => None,
    };
    let kind = event.kind.as_str();
    let mut out = template.to_string();
    for token in SUBJECT_TOKENS {
        let placeholder = format!("{{{token}}}");
        if !out.contains(&placeholder) {
            continue;
        }
        let value = match (*token, appended) {
            ("subscription", _) => subscription,
            ("entity", Some((_, ty))) => ty,
            ("entity", None) => &event.entity,
            ("kind", _) => kind,
            ("stream", Some((stream, _))) => stream,
            ("stream", None) => &event.entity,
            ("type", Some((_, ty))) => ty,
            ("type", None) => kind,
            _ => continue,
        };
        out = out.replace(&placeholder, &sanitise(value));
    }
    out
}

/// A subject token: letters, digits, `-` and `_` kept, anything else `_`; never empty.
fn sanitise(value: &str) -> String {
    if value.is_empty() {
        return "_".into();
    }
    value
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect()
}

/// Whether a stream subject filter (with `*` for one token, `>` for the rest) matches
/// `subject`.
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(kind: Kind, entity: &str, new_record: Option<Value>) -> Event {
        Event {
            position: 7,
            lsn: weir_core::Lsn(1),
            xid: 1,
            commit_ts: chrono::Utc::now(),
            kind,
            entity: entity.into(),
            source: Default::default(),
            key: json!({}),
            new_record,
            old_record: None,
            changes: None,
            unchanged_toast: Vec::new(),
        }
    }

    #[test]
    fn subjects_follow_the_template_with_sanitised_tokens() {
        let row = event(Kind::Insert, "sales.orders", Some(json!({"id": 1})));
        assert_eq!(subject("weir.{entity}.{kind}", "s", &row), "weir.sales_orders.insert");
        assert_eq!(
            subject("x.{stream}.{type}.{subscription}", "o.1", &row),
            "x.sales_orders.insert.o_1"
        );
        let appended = event(
            Kind::Append,
            Event::STREAM_EVENTS,
            Some(json!({"stream": "order-42", "type": "order.placed", "data": {}})),
        );
        assert_eq!(subject("weir.{entity}.{kind}", "s", &appended), "weir.order_placed.append");
        assert_eq!(subject("e.{stream}.{type}", "s", &appended), "e.order-42.order_placed");
        let odd =
            event(Kind::Append, Event::STREAM_EVENTS, Some(json!({"stream": "", "type": "a b>*"})));
        assert_eq!(subject("e.{stream}.{type}", "s", &odd), "e._.a_b__");
    }

    #[test]
    fn stream_subjects_match_as_nats_does() {
        assert!(subject_matches("weir.>", "weir.posts.insert"));
        assert!(subject_matches("weir.*.*", "weir.posts.insert"));
        assert!(subject_matches("weir.posts.insert", "weir.posts.insert"));
        assert!(!subject_matches("weir.*", "weir.posts.insert"));
        assert!(!subject_matches("weir.>", "weir"));
        assert!(!subject_matches("weir.posts.*", "weir.comments.insert"));
        assert!(!subject_matches("weir.*.*.*", "weir.posts.insert"));
    }

    #[test]
    fn a_token_must_be_in_the_environment() {
        let sink = NatsSink {
            token_env: Some("WEIR_TEST_NATS_TOKEN_NEVER_SET".into()),
            ..NatsSink::new()
        };
        let e = Nats::new("s", &sink).unwrap_err();
        assert!(e.contains("WEIR_TEST_NATS_TOKEN_NEVER_SET") && e.contains("not set"), "{e}");
        assert!(Nats::new("s", &NatsSink::new()).is_ok());
        assert_eq!(humantime(Duration::from_secs(120)), "2m");
        assert_eq!(humantime(Duration::from_millis(1500)), "1500ms");
    }
}
