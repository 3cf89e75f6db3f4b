//! One URL weir POSTs JSON to, signed the Standard Webhooks way: the webhook sink's deliveries
//! and the `http` job workers declared in `weir.toml` (weir-jobs) both send through it, so
//! both sign, connect, time out and describe a failure the same way.
//!
//! ```text
//! Outbound::new(url, connect_timeout)   parse the URL; https: rustls (ring) + system roots
//!   .signed(secrets)                     webhook-signature over "<id>.<timestamp>.<body>"
//!   .header(name, value)                 extra headers (refused: the ones weir sets)
//! post(id, body) ─► POST url  content-type: application/json, webhook-id, webhook-timestamp,
//!                             webhook-signature (when signed), user-agent weir/<version>
//!   ├─ an answer ─► Answer {status, Retry-After, Location, body (first 16 KiB)}
//!   └─ none      ─► Transport {what happened, in words; the cause}
//! ```
//!
//! What an answer *means* is the caller's decision (a sink retries a 400, a job discards
//! it). The caller bounds the whole exchange with its own timeout; connecting alone is
//! bounded by `connect_timeout`. Connections are kept alive and reused; redirects are never
//! followed, so a signed body only ever goes to the configured URL.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{
    CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER, USER_AGENT,
};
use hyper::{Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::Secrets;

/// The status of an [`Answer`] (hyper's).
pub use hyper::StatusCode;

/// The longest `Retry-After` honoured; a longer one waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How much of an answer's body is read; a longer one is left unread (and its connection
/// closed).
pub const BODY_READ: usize = 16 * 1024;
/// How long an idle connection is kept for the next request.
const IDLE: Duration = Duration::from_secs(60);
const AGENT: &str = concat!("weir/", env!("CARGO_PKG_VERSION"));
/// The headers weir sets itself; configured extra headers may not replace them.
const OWN_HEADERS: [&str; 5] =
    ["content-type", "webhook-id", "webhook-timestamp", "webhook-signature", "user-agent"];

/// A URL to POST signed JSON to, with its kept-alive connections.
#[derive(Clone)]
pub struct Outbound {
    url: String,
    uri: Uri,
    secrets: Option<Secrets>,
    headers: HeaderMap,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("url", &self.url)
            .field("secrets", &self.secrets)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The receiver's answer: any status (what it means is the caller's decision).
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its `Retry-After`, when it sent one that parses (see [`retry_after`]).
    pub retry_after: Option<Duration>,
    /// Its `Location`, as text.
    pub location: Option<String>,
    /// Its body, unless it was longer than [`BODY_READ`] or broke off.
    pub body: Option<Bytes>,
}

/// No answer: the request could not be sent, or the receiver did not answer HTTP.
#[derive(Debug, thiserror::Error)]
#[error("{what} ({cause})")]
pub struct Transport {
    /// What happened, in words ("the connection was refused").
    pub what: &'static str,
    /// The innermost error's text.
    pub cause: String,
    /// The client's error.
    #[source]
    pub source: hyper_util::client::legacy::Error,
}

impl Outbound {
    /// A client for `url` (http or https), unsigned and without extra headers. Does no network
    /// I/O (an https URL reads the system's root certificates). The message starts with
    /// `url `… so a caller can say whose URL it is.
    pub fn new(url: &str, connect_timeout: Duration) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| {
            format!("url `{url}` is not a URL ({e}); write it as https://host/path")
        })?;
        match uri.scheme_str() {
            Some("http" | "https") if uri.host().is_some() => {}
            _ => return Err(format!("url `{url}` is not an http:// or https:// URL with a host")),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = hyper_rustls::HttpsConnectorBuilder::new();
        let tls = if uri.scheme_str() == Some("https") {
            tls.with_provider_and_native_roots(provider).map_err(|e| {
                format!(
                    "url `{url}` is https but this system's root certificates could not be \
                     loaded ({e}); install them (the ca-certificates package) or point \
                     SSL_CERT_FILE at a PEM bundle"
                )
            })?
        } else {
            // Never used for http://, but the connector wants a configuration.
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("url `{url}`: the TLS configuration failed: {e}"))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            tls.with_tls_config(config)
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(IDLE));
        http.set_nodelay(true);
        let connector = tls.https_or_http().enable_http1().wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(IDLE).build(connector);
        Ok(Self { url: url.into(), uri, secrets: None, headers: HeaderMap::new(), client })
    }

    /// Signs every request with `secrets`.
    pub fn signed(mut self, secrets: Secrets) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// Adds a header to every request; refuses a bad name or value, and the headers weir
    /// sets itself (`content-type`, `user-agent`, `webhook-*`).
    pub fn header(mut self, name: &str, value: &str) -> Result<Self, String> {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header `{name}` is not a valid header name"))?;
        if OWN_HEADERS.contains(&header.as_str()) {
            return Err(format!("header `{name}` is set by weir; leave it out"));
        }
        let value = HeaderValue::from_str(value)
            .map_err(|_| format!("header `{name}`: the value is not valid in a header"))?;
        self.headers.append(header, value);
        Ok(self)
    }

    /// The URL, as configured.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// POSTs `body` (JSON) with `webhook-id: id` and reads the answer. Not bounded in time:
    /// the caller wraps it in its timeout. `id` is one of weir's (a checked subscription name
    /// and positions, a job id and attempt): printable ASCII, so always a valid header value.
    pub async fn post(&self, id: &str, body: Vec<u8>) -> Result<Answer, Transport> {
        let timestamp = chrono::Utc::now().timestamp();
        let mut request = Request::post(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp)
            .header(USER_AGENT, AGENT);
        if let Some(secrets) = &self.secrets {
            request = request.header("webhook-signature", secrets.sign(id, timestamp, &body));
        }
        let mut request =
            request.body(Full::new(Bytes::from(body))).expect("a valid URI and header values");
        request.headers_mut().extend(self.headers.clone());
        let response = self.client.request(request).await.map_err(transport)?;
        let status = response.status();
        let retry_after =
            response.headers().get(RETRY_AFTER).and_then(|v| retry_after(v, SystemTime::now()));
        let location = response
            .headers()
            .get(LOCATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        // Read the body (a 2xx's too, so the connection can be reused). One too long to read
        // is left unread, and the connection closed.
        let body = Limited::new(response.into_body(), BODY_READ)
            .collect()
            .await
            .ok()
            .map(|b| b.to_bytes());
        Ok(Answer { status, retry_after, location, body })
    }
}

/// Classifies a failure to get an answer at all.
fn transport(e: hyper_util::client::legacy::Error) -> Transport {
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
        _ if hyper_error.is_some_and(hyper::Error::is_parse) => {
            "the receiver's answer is not HTTP/1.1"
        }
        _ if e.is_connect() => "could not connect",
        _ => "the request failed",
    };
    Transport { what, cause: root.to_string(), source: e }
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

/// The start of a body, on one line and at most `chars` characters, for an error message.
pub fn excerpt(body: &[u8], chars: usize) -> String {
    let text = String::from_utf8_lossy(body);
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(chars) {
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
        assert_eq!(excerpt(b"  no\n such\tthing ", 200), "no such thing");
        let long = "é".repeat(500);
        let e = excerpt(long.as_bytes(), 200);
        assert_eq!(e.chars().count(), 201);
        assert!(e.ends_with('…'));
    }

    #[test]
    fn headers_weir_sets_are_refused_and_bad_urls_named() {
        let o = Outbound::new("http://127.0.0.1:1/x", Duration::from_secs(1)).unwrap();
        let o = o.header("authorization", "Bearer t").unwrap();
        let e = o.clone().header("Webhook-Signature", "v1,x").unwrap_err();
        assert!(e.contains("set by weir"), "{e}");
        assert!(o.header("bad name", "x").unwrap_err().contains("not a valid header name"));
        let e = Outbound::new("ftp://host/x", Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("not an http:// or https:// URL"), "{e}");
    }
}
