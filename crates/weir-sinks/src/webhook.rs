//! The webhook sink: POST each event, or a batch, signed the Standard Webhooks way, and turn
//! the receiver's answer into what the engine does next.
//!
//! ```text
//! deliver(events)            consecutive events of one emitter (lane), in log order
//!   └─ events.chunks(batch_size), one request each, in order, one at a time:
//!        batch_size 1   body = envelope(event)                    webhook-id = <sub>:<position>
//!        batch_size N   body = {"subscription", "events": [...]}  webhook-id = <sub>:<first>-<last>
//!        headers        content-type, webhook-id, webhook-timestamp (Unix seconds, now),
//!                       webhook-signature (over the exact body bytes), user-agent weir/<version>
//!        POST url ─► answer within `timeout` ─► classify (one function, `Failure::action`):
//!          2xx                      delivered: the next chunk
//!          410 Gone                 stop the subscription with the reason (`start` tries again)
//!          any other non-2xx        retry — after Retry-After (seconds or an HTTP date, at most
//!                                   an hour) when the receiver sent one, else the backoff
//!          3xx                      not followed: retry, the message names the Location
//!          other 4xx                the receiver refuses the event: retried, then the
//!                                   subscription's on_exhausted (halt, skip, park) — never
//!                                   silently dropped
//!          timeout, refused, reset, DNS, closed without an answer: retry
//! ```
//!
//! An error stops the chunks: the engine rolls the group back and tries its events again one
//! at a time, so a receiver may see an event again — always with the same `webhook-id` (a
//! batch's events each carry their own `id` in the envelope). A receiver deduplicates by it.
//!
//! One HTTP client per [`Webhook`] (one per subscription and generation, built by the
//! catalog; an [`Outbound`], the signed POST the `http` job workers send too): connections are kept alive and reused across deliveries. Redirects are never
//! followed (hyper's client does not), so a signed body is only ever sent to the configured
//! URL. https uses rustls with the `ring` provider (given to the connector, not installed
//! process-wide) and the system's root certificates (`SSL_CERT_FILE` / `SSL_CERT_DIR` are
//! honoured).
//!
//! Metrics, labelled `subscription` and `sink="webhook"`: `weir_sink_delivered_total`
//! (events), `weir_sink_failed_total` (failed requests), `weir_sink_request_seconds` (per
//! request) and `weir_sink_commit_to_ack_seconds` (per event: from its source commit to the
//! receiver's 2xx). Each failed request logs one warning; neither the secret nor the signature
//! is ever logged.

use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hyper::StatusCode;
use weir_consumer::OperatorError;
use weir_core::Event;

use crate::outbound::{self, Outbound};
use crate::{Delivery, Secrets, WebhookSink, envelope, message_id};

/// How much of a failed answer's body is quoted.
const EXCERPT_CHARS: usize = 200;

const DELIVERED: &str = "weir_sink_delivered_total";
const FAILED: &str = "weir_sink_failed_total";
const REQUEST_SECONDS: &str = "weir_sink_request_seconds";
const COMMIT_TO_ACK_SECONDS: &str = "weir_sink_commit_to_ack_seconds";

/// Posts a subscription's events to one URL.
pub struct Webhook {
    subscription: String,
    sink: WebhookSink,
    outbound: Outbound,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("subscription", &self.subscription)
            .field("sink", &self.sink)
            .field("outbound", &self.outbound)
            .finish()
    }
}

impl Webhook {
    /// A webhook delivery of `subscription`; fails when the sink is invalid or its secret is
    /// not in this process's environment. Does no network I/O (an https URL reads the system's
    /// root certificates).
    pub fn new(subscription: &str, sink: &WebhookSink) -> Result<Self, String> {
        sink.validate()?;
        let secrets = sink.secrets()?;
        Self::with_secrets(subscription, sink, secrets)
    }

    /// A webhook delivery signed with `secrets` given here rather than read from `secret_env`
    /// (an application holding its secrets elsewhere; tests).
    pub fn with_secrets(
        subscription: &str,
        sink: &WebhookSink,
        secrets: Secrets,
    ) -> Result<Self, String> {
        sink.validate()?;
        let outbound =
            Outbound::new(&sink.url, sink.timeout).map_err(|e| format!("webhook {e}"))?;
        Ok(Self {
            subscription: subscription.into(),
            sink: sink.clone(),
            outbound: outbound.signed(secrets),
        })
    }

    /// The `webhook-id` and body of one request carrying `chunk`.
    fn request_body(&self, chunk: &[&Event]) -> (String, Vec<u8>) {
        let sub = self.subscription.as_str();
        if self.sink.batch_size <= 1
            && let [event] = chunk
        {
            let body = serde_json::to_vec(&envelope(sub, event)).expect("JSON values serialise");
            return (message_id(sub, event.position), body);
        }
        let (first, last) = (chunk[0].position, chunk[chunk.len() - 1].position);
        let events: Vec<_> = chunk.iter().map(|e| envelope(sub, e)).collect();
        let body = serde_json::to_vec(&serde_json::json!({"subscription": sub, "events": events}))
            .expect("JSON values serialise");
        (format!("{sub}:{first}-{last}"), body)
    }

    /// POSTs one chunk; Ok on a 2xx.
    async fn post(&self, chunk: &[&Event]) -> Result<(), OperatorError> {
        let (id, body) = self.request_body(chunk);
        let started = Instant::now();
        let outcome = match tokio::time::timeout(self.sink.timeout, self.exchange(&id, body)).await
        {
            Ok(outcome) => outcome,
            Err(_) => {
                Err(Failure::Timeout { url: self.sink.url.clone(), after: self.sink.timeout })
            }
        };
        let labels = [("subscription", self.subscription.clone()), ("sink", "webhook".into())];
        metrics::histogram!(REQUEST_SECONDS, &labels).record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => {
                metrics::counter!(DELIVERED, &labels).increment(chunk.len() as u64);
                let acked = chrono::Utc::now();
                let to_ack = metrics::histogram!(COMMIT_TO_ACK_SECONDS, &labels);
                for event in chunk {
                    let took = (acked - event.commit_ts).to_std().unwrap_or_default();
                    to_ack.record(took.as_secs_f64());
                }
                Ok(())
            }
            Err(failure) => {
                metrics::counter!(FAILED, &labels).increment(1);
                tracing::warn!(
                    subscription = %self.subscription,
                    url = %self.sink.url,
                    webhook_id = %id,
                    error = %failure,
                    "webhook delivery failed"
                );
                Err(failure.action())
            }
        }
    }

    /// Sends one request and classifies the answer (within the caller's timeout).
    async fn exchange(&self, id: &str, body: Vec<u8>) -> Result<(), Failure> {
        let url = || self.sink.url.clone();
        let answer = self.outbound.post(id, body).await.map_err(|t| Failure::Transport {
            url: url(),
            what: t.what,
            cause: t.cause,
            source: t.source,
        })?;
        let status = answer.status;
        if status.is_success() {
            return Ok(());
        }
        let retry_after = answer.retry_after;
        let excerpt = answer.body.map(|b| outbound::excerpt(&b, EXCERPT_CHARS)).unwrap_or_default();
        Err(if status == StatusCode::GONE {
            Failure::Gone { url: url() }
        } else if status.is_redirection() {
            Failure::Redirect {
                url: url(),
                status,
                location: answer.location.unwrap_or_else(|| "(no Location header)".into()),
                retry_after,
            }
        } else {
            Failure::Status { url: url(), status, excerpt, retry_after }
        })
    }
}

impl Delivery for Webhook {
    fn deliver<'a>(&'a self, events: &'a [&'a Event]) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(async move {
            for chunk in events.chunks(self.sink.batch_size.max(1) as usize) {
                self.post(chunk).await?;
            }
            Ok(())
        })
    }
}

/// How one request failed. Each message names the URL and what the receiver (or the network)
/// did.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(
        "webhook {url} answered 410 Gone: the receiver says it is gone; the subscription is \
         stopped — fix or remove the receiver, then start the subscription again once it is back"
    )]
    Gone { url: String },
    #[error(
        "webhook {url} answered {status}, a redirect to {location}; redirects are not followed \
         (the signed body goes only where it is configured): configure the final URL{}",
        waiting(*retry_after)
    )]
    Redirect { url: String, status: StatusCode, location: String, retry_after: Option<Duration> },
    #[error(
        "webhook {url} {} {status}{}{}",
        if refusal(*status) { "refused the event: it answered" } else { "answered" },
        if excerpt.is_empty() { String::new() } else { format!(": {excerpt}") },
        waiting(*retry_after)
    )]
    Status { url: String, status: StatusCode, excerpt: String, retry_after: Option<Duration> },
    #[error(
        "webhook {url} did not answer within {after:?} (the sink's timeout); the receiver is \
         slow or hangs"
    )]
    Timeout { url: String, after: Duration },
    #[error("webhook {url}: {what} ({cause})")]
    Transport {
        url: String,
        what: &'static str,
        cause: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
}

impl Failure {
    /// What the engine does about it: the one place that decides retry versus stop.
    fn action(self) -> OperatorError {
        match self {
            Failure::Gone { .. } => OperatorError::stop(self),
            Failure::Redirect { retry_after: Some(after), .. }
            | Failure::Status { retry_after: Some(after), .. } => {
                OperatorError::retry_after(after, self)
            }
            _ => OperatorError::retry(self),
        }
    }
}

/// A 4xx other than 408 Request Timeout and 429 Too Many Requests: the receiver refuses this
/// event, rather than being busy.
fn refusal(status: StatusCode) -> bool {
    status.is_client_error()
        && status != StatusCode::REQUEST_TIMEOUT
        && status != StatusCode::TOO_MANY_REQUESTS
}

fn waiting(retry_after: Option<Duration>) -> String {
    retry_after.map(|d| format!(" (Retry-After: {}s)", d.as_secs())).unwrap_or_default()
}
