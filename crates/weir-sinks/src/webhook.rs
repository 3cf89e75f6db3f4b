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
//! catalog): connections are kept alive and reused across deliveries. Redirects are never
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

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HeaderValue, LOCATION, RETRY_AFTER, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use weir_consumer::OperatorError;
use weir_core::Event;

use crate::{Delivery, Secrets, WebhookSink, envelope, message_id};

/// The longest `Retry-After` honoured; a longer one waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How much of a failed answer's body is read (and at most 200 characters of it quoted).
const EXCERPT_READ: usize = 16 * 1024;
const EXCERPT_CHARS: usize = 200;
/// How long an idle connection is kept for the next delivery.
const IDLE: Duration = Duration::from_secs(60);
const AGENT: &str = concat!("weir/", env!("CARGO_PKG_VERSION"));

const DELIVERED: &str = "weir_sink_delivered_total";
const FAILED: &str = "weir_sink_failed_total";
const REQUEST_SECONDS: &str = "weir_sink_request_seconds";
const COMMIT_TO_ACK_SECONDS: &str = "weir_sink_commit_to_ack_seconds";

/// Posts a subscription's events to one URL.
pub struct Webhook {
    subscription: String,
    sink: WebhookSink,
    uri: Uri,
    secrets: Secrets,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("subscription", &self.subscription)
            .field("sink", &self.sink)
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
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
        let uri: Uri = sink.url.parse().map_err(|e| {
            format!("webhook url `{}` is not a URL ({e}); write it as https://host/path", sink.url)
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = hyper_rustls::HttpsConnectorBuilder::new();
        let tls = if uri.scheme_str() == Some("https") {
            tls.with_provider_and_native_roots(provider).map_err(|e| {
                format!(
                    "webhook url `{}` is https but this system's root certificates could not \
                     be loaded ({e}); install them (the ca-certificates package) or point \
                     SSL_CERT_FILE at a PEM bundle",
                    sink.url
                )
            })?
        } else {
            // Never used for http://, but the connector wants a configuration.
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("the TLS configuration failed: {e}"))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            tls.with_tls_config(config)
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(sink.timeout));
        http.set_keepalive(Some(IDLE));
        http.set_nodelay(true);
        let connector = tls.https_or_http().enable_http1().wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(IDLE).build(connector);
        Ok(Self { subscription: subscription.into(), sink: sink.clone(), uri, secrets, client })
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
        let timestamp = chrono::Utc::now().timestamp();
        let signature = self.secrets.sign(&id, timestamp, &body);
        let request = Request::post(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .header(USER_AGENT, AGENT)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| OperatorError::retry(format!("webhook {}: {e}", self.sink.url)))?;

        let started = Instant::now();
        let outcome = match tokio::time::timeout(self.sink.timeout, self.exchange(request)).await {
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

    /// Sends `request` and reads the answer (within the caller's timeout).
    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<(), Failure> {
        let url = || self.sink.url.clone();
        let response = self.client.request(request).await.map_err(|e| transport(url(), e))?;
        let status = response.status();
        let retry_after =
            response.headers().get(RETRY_AFTER).and_then(|v| retry_after(v, SystemTime::now()));
        let location = response
            .headers()
            .get(LOCATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        // Read the body (a 2xx's too, so the connection can be reused); a failed answer's is
        // quoted. One too long to read is left unread (and the connection closed).
        let body = Limited::new(response.into_body(), EXCERPT_READ).collect().await;
        if status.is_success() {
            return Ok(());
        }
        let excerpt = body.map(|b| excerpt(&b.to_bytes())).unwrap_or_default();
        Err(if status == StatusCode::GONE {
            Failure::Gone { url: url() }
        } else if status.is_redirection() {
            Failure::Redirect {
                url: url(),
                status,
                location: location.unwrap_or_else(|| "(no Location header)".into()),
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

/// Classifies a failure to get an answer at all.
fn transport(url: String, e: hyper_util::client::legacy::Error) -> Failure {
    let mut root: &(dyn std::error::Error + 'static) = &e;
    let mut hyper_error = None;
    while let Some(next) = root.source() {
        if let Some(h) = next.downcast_ref::<hyper::Error>() {
            hyper_error = Some(h);
        }
        root = next;
    }
    let io = root.downcast_ref::<std::io::Error>();
    let tls = is_tls(root);
    let what = match io.map(std::io::Error::kind) {
        _ if tls => "the TLS handshake failed",
        Some(std::io::ErrorKind::ConnectionRefused) => "the connection was refused",
        Some(std::io::ErrorKind::ConnectionReset) => "the connection was reset",
        Some(std::io::ErrorKind::TimedOut) => "connecting timed out",
        _ if hyper_error.is_some_and(hyper::Error::is_incomplete_message) => {
            "the receiver closed the connection without answering"
        }
        _ if e.is_connect() => "could not connect",
        _ => "the request failed",
    };
    Failure::Transport { url, what, cause: root.to_string(), source: e }
}

/// Whether `e` is (or wraps, in `io::Error`s) a rustls error: the TLS handshake failed.
fn is_tls(mut e: &(dyn std::error::Error + 'static)) -> bool {
    loop {
        if e.is::<rustls::Error>() {
            return true;
        }
        match e.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref) {
            Some(inner) => e = inner,
            None => return false,
        }
    }
}

/// A `Retry-After` header: seconds, or an HTTP date (as a wait from `now`), at most
/// [`MAX_RETRY_AFTER`]. `None` when it is neither.
pub fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    let wait = if let Ok(seconds) = text.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let at = httpdate::parse_http_date(text).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The start of a body, on one line, for an error message.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_a_date_and_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let v = |s: &str| retry_after(&HeaderValue::from_str(s).unwrap(), now);
        assert_eq!(v("2"), Some(Duration::from_secs(2)));
        assert_eq!(v(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(v("86400"), Some(MAX_RETRY_AFTER));
        // 1445412480 is Wed, 21 Oct 2015 07:28:00 GMT.
        assert_eq!(v("Wed, 21 Oct 2015 07:28:30 GMT"), Some(Duration::from_secs(30)));
        assert_eq!(v("Wed, 21 Oct 2015 07:27:00 GMT"), Some(Duration::ZERO), "a past date");
        assert_eq!(v("soon"), None);
        assert_eq!(v("-5"), None);
    }

    #[test]
    fn excerpts_are_one_short_line() {
        assert_eq!(excerpt(b"  no\n such\tthing "), "no such thing");
        let long = "é".repeat(500);
        let e = excerpt(long.as_bytes());
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
        assert!(e.ends_with('…'));
    }
}
