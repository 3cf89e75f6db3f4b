//! What a sink is configured with, in `weir.toml` (`[subscriptions.sink]`), in the
//! subscriptions API (`"sink": {"type": "webhook", ...}`) and in the CLI — validated before
//! anything is stored or started, each message naming the field and the fix.
//!
//! Secrets are never part of a configuration: it names the environment variable that holds
//! them (`secret_env`, `token_env`), which each delivering process reads. So a stored or
//! printed configuration never shows a secret.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use weir_core::serde_duration;

use crate::signature::Secrets;

/// Most events one webhook request carries.
pub const MAX_BATCH_SIZE: u32 = 1000;
/// Most PubAcks a NATS emitter waits for at once.
pub const MAX_IN_FLIGHT: u32 = 4096;

/// A webhook sink: POST each event (or a batch) as JSON to `url`, signed the Standard
/// Webhooks way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSink {
    /// Where to POST: an `http://` or `https://` URL.
    pub url: String,
    /// The environment variable holding the signing secret (`whsec_` and base64 of 24 to 64
    /// bytes). During a rotation it holds several, separated by spaces: each signs every
    /// request, so receivers verify with either. `weir webhooks secret` makes one.
    pub secret_env: String,
    /// How long a request may take before it counts as failed (and is retried). Default 15 s.
    #[serde(default = "default_timeout", with = "serde_duration")]
    #[schema(value_type = String, example = "15s")]
    pub timeout: Duration,
    /// Events per request: 1 (the default) posts each event alone; more posts
    /// `{"events": [...]}` with up to this many consecutive events of one emitter.
    #[serde(default = "one")]
    pub batch_size: u32,
    /// How long an emitter waits for a batch to fill before it posts what it has. Default 0.
    #[serde(default, with = "serde_duration")]
    #[schema(value_type = String, example = "0ms")]
    pub linger: Duration,
}

/// A NATS JetStream sink: publish each event to a subject built from a template, with
/// `Nats-Msg-Id` for JetStream's duplicate window; the checkpoint moves after the PubAck.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsSink {
    /// The server: `nats://host:port` (several separated by commas). Default
    /// `nats://127.0.0.1:4222`.
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// The subject of each event. Tokens: `{subscription}`, `{entity}` (the table, or an
    /// appended event's type), `{kind}` (insert, update, delete, append, ...), `{stream}` (an
    /// appended event's stream, else the table), `{type}` (an appended event's type, else the
    /// kind). Each token's value is sanitised (characters other than letters, digits, `-` and
    /// `_` become `_`). Default `weir.{entity}.{kind}`.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// The JetStream stream that must store the subjects. Default `WEIR`.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Create the stream when it does not exist (with `stream_subjects`, `retention`,
    /// `duplicate_window`); otherwise its absence stalls delivery with a message saying how to
    /// create it. Default false.
    #[serde(default)]
    pub create_stream: bool,
    /// The subjects of a created stream. Default: the subject template with each token
    /// replaced by `*` (`weir.*.*`).
    #[serde(default)]
    pub stream_subjects: Vec<String>,
    /// The retention of a created stream: `limits` (the default), `interest` or `workqueue`.
    #[serde(default = "default_retention")]
    pub retention: String,
    /// JetStream's window for dropping a redelivered `Nats-Msg-Id`, for a created stream.
    /// Default 2 minutes.
    #[serde(default = "default_duplicate_window", with = "serde_duration")]
    #[schema(value_type = String, example = "2m")]
    pub duplicate_window: Duration,
    /// Publishes whose PubAck an emitter waits for at once (also the events handled per
    /// checkpoint). Default 256; 1 publishes one at a time.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: u32,
    /// The environment variable holding a token for the server, if it needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// How long to wait for one PubAck before the publish counts as failed. Default 10 s.
    #[serde(default = "default_ack_timeout", with = "serde_duration")]
    #[schema(value_type = String, example = "10s")]
    pub ack_timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(15)
}
fn one() -> u32 {
    1
}
fn default_nats_url() -> String {
    "nats://127.0.0.1:4222".into()
}
fn default_subject() -> String {
    "weir.{entity}.{kind}".into()
}
fn default_stream() -> String {
    "WEIR".into()
}
fn default_retention() -> String {
    "limits".into()
}
fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}
fn default_in_flight() -> u32 {
    256
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The tokens a subject template may use.
pub const SUBJECT_TOKENS: &[&str] = &["subscription", "entity", "kind", "stream", "type"];

impl WebhookSink {
    /// A sink posting to `url`, signed with the secrets in `secret_env`, other settings at
    /// their defaults.
    pub fn new(url: impl Into<String>, secret_env: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            secret_env: secret_env.into(),
            timeout: default_timeout(),
            batch_size: 1,
            linger: Duration::ZERO,
        }
    }

    /// Checks the settings, without the environment; the message names the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        let url = url::Url::parse(&self.url).map_err(|e| {
            format!("webhook url `{}` is not a URL ({e}); write it as https://host/path", self.url)
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "webhook url `{}`: the scheme is `{}`; a webhook is posted over http:// or https://",
                self.url,
                url.scheme()
            ));
        }
        if url.password().is_some() || !url.username().is_empty() {
            return Err(format!(
                "webhook url `{}` holds credentials, which would be stored and shown; leave them \
                 out — the receiver knows weir by the signature (webhook-signature)",
                redact_url(&self.url)
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("webhook url `{}` has no host", self.url));
        }
        validate_env_name("secret_env", &self.secret_env)?;
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(300) {
            return Err(format!(
                "webhook timeout {:?} is out of range; use 1ms to 300s",
                self.timeout
            ));
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return Err(format!(
                "webhook batch_size {} is out of range; use 1 to {MAX_BATCH_SIZE}",
                self.batch_size
            ));
        }
        if self.linger > Duration::from_secs(60) {
            return Err(format!(
                "webhook linger {:?} is over a minute; use at most 60s",
                self.linger
            ));
        }
        Ok(())
    }

    /// The signing secrets, read from `secret_env` now; the message says what is missing or
    /// wrong (never the secret).
    pub fn secrets(&self) -> Result<Secrets, String> {
        Secrets::from_env(&self.secret_env)
    }

    /// The receiver's host and port (the scheme's default when the URL has none), for a
    /// reachability check (`weir doctor`); `None` when the URL is not valid.
    pub fn address(&self) -> Option<(String, u16)> {
        let url = url::Url::parse(&self.url).ok()?;
        Some((url.host_str()?.to_string(), url.port_or_known_default()?))
    }
}

impl NatsSink {
    /// A sink publishing to the server at its defaults.
    pub fn new() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every field has a default")
    }

    /// Checks the settings, without the network; the message names the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        for server in self.url.split(',') {
            let server = server.trim();
            let parsed = url::Url::parse(server).map_err(|e| {
                format!("nats url `{server}` is not a URL ({e}); write it as nats://host:4222")
            })?;
            if parsed.password().is_some() {
                return Err(format!(
                    "nats url `{}` holds a password, which would be stored and shown; put the \
                     server's token in an environment variable and name it in token_env",
                    redact_url(server)
                ));
            }
            if !matches!(parsed.scheme(), "nats" | "tls") {
                return Err(format!(
                    "nats url `{server}`: the scheme is `{}`; use nats:// (or tls://)",
                    parsed.scheme()
                ));
            }
        }
        validate_template(&self.subject)?;
        if !valid_stream_name(&self.stream) {
            return Err(format!(
                "nats stream `{}`: a JetStream stream name is 1 to 255 characters without \
                 spaces, `.`, `*`, `>`, `/` or `\\`",
                self.stream
            ));
        }
        for s in &self.stream_subjects {
            if s.is_empty() || s.contains(char::is_whitespace) || s.split('.').any(str::is_empty) {
                return Err(format!(
                    "nats stream_subjects: `{s}` is not a subject; use tokens separated by dots, \
                     with `*` and `>` as wildcards"
                ));
            }
        }
        if !matches!(self.retention.as_str(), "limits" | "interest" | "workqueue") {
            return Err(format!(
                "nats retention `{}`: use limits, interest or workqueue",
                self.retention
            ));
        }
        if self.duplicate_window.is_zero() {
            return Err("nats duplicate_window is zero: redeliveries would not be dropped; use \
                        at least 1s (the default is 2m)"
                .into());
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_IN_FLIGHT {
            return Err(format!(
                "nats max_in_flight {} is out of range; use 1 to {MAX_IN_FLIGHT}",
                self.max_in_flight
            ));
        }
        if self.ack_timeout.is_zero() {
            return Err("nats ack_timeout is zero; use at least 1ms (the default is 10s)".into());
        }
        if let Some(t) = &self.token_env {
            validate_env_name("token_env", t)?;
        }
        Ok(())
    }

    /// Each server's host and port (4222 when the URL has none), for a reachability check
    /// (`weir doctor`); servers whose URL is not valid are left out.
    pub fn addresses(&self) -> Vec<(String, u16)> {
        self.url
            .split(',')
            .filter_map(|server| {
                let url = url::Url::parse(server.trim()).ok()?;
                Some((url.host_str()?.to_string(), url.port().unwrap_or(4222)))
            })
            .collect()
    }

    /// The subjects a created stream takes: `stream_subjects`, or the template with each token
    /// replaced by `*`.
    pub fn subjects(&self) -> Vec<String> {
        if !self.stream_subjects.is_empty() {
            return self.stream_subjects.clone();
        }
        let mut s = self.subject.clone();
        for t in SUBJECT_TOKENS {
            s = s.replace(&format!("{{{t}}}"), "*");
        }
        vec![s]
    }
}

impl Default for NatsSink {
    fn default() -> Self {
        Self::new()
    }
}

/// `url` fit to print: a user and password (or a token) written into it (`nats://me:pw@host`)
/// becomes `***` (`nats://***@host`); several servers separated by commas each so. Settings
/// are printed by `weir subscriptions show`, `weir status` and `weir doctor`.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|server| {
            let Some(scheme_end) = server.find("://").map(|i| i + 3) else {
                return server.to_string();
            };
            let rest = &server[scheme_end..];
            let authority = rest.find(['/', '?', '#']).map_or(rest, |end| &rest[..end]);
            match authority.rfind('@') {
                Some(at) => format!("{}***{}", &server[..scheme_end], &rest[at..]),
                None => server.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn validate_env_name(field: &str, name: &str) -> Result<(), String> {
    // A secret pasted in place of the name is refused before it is stored or printed: one
    // with `=` padding fails the characters, one without starts with the secrets' prefix.
    let ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && !name.to_ascii_lowercase().starts_with(crate::signature::PREFIX);
    if ok {
        Ok(())
    } else {
        // Not echoed: what was written may be the secret itself.
        Err(format!(
            "{field} is not an environment variable name (letters, digits and `_`, not starting \
             with a digit); it names the variable that holds the secret (such as \
             ORDERS_WEBHOOK_SECRET), not the secret itself"
        ))
    }
}

/// A subject template: tokens separated by dots, each literal or made of `{token}`s.
fn validate_template(template: &str) -> Result<(), String> {
    if template.is_empty() || template.contains(char::is_whitespace) {
        return Err(format!("nats subject `{template}`: a subject has no spaces and is not empty"));
    }
    if template.contains(['*', '>']) {
        return Err(format!(
            "nats subject `{template}`: wildcards (`*`, `>`) cannot be published to; use tokens \
             such as {{entity}}"
        ));
    }
    if template.split('.').any(str::is_empty) {
        return Err(format!("nats subject `{template}`: a dot-separated part is empty"));
    }
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("nats subject `{template}`: a `{{` is not closed by `}}`"))?;
        let token = &rest[open + 1..open + close];
        if !SUBJECT_TOKENS.contains(&token) {
            return Err(format!(
                "nats subject `{template}`: `{{{token}}}` is not a token; use {}",
                SUBJECT_TOKENS.iter().map(|t| format!("{{{t}}}")).collect::<Vec<_>>().join(", ")
            ));
        }
        rest = &rest[open + close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("nats subject `{template}`: a `}}` has no `{{`"));
    }
    Ok(())
}

fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.contains(|c: char| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_settings_are_checked() {
        let ok = WebhookSink::new("https://example.com/hooks", "HOOK_SECRET");
        assert!(ok.validate().is_ok());
        let e = WebhookSink::new("ftp://example.com", "S").validate().unwrap_err();
        assert!(e.contains("http:// or https://"), "{e}");
        assert!(WebhookSink::new("not a url", "S").validate().is_err());
        let e = WebhookSink::new("http://x", "whsec_abc=").validate().unwrap_err();
        assert!(e.contains("names the variable"), "{e}");
        let e = WebhookSink::new("http://x", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .validate()
            .unwrap_err();
        assert!(e.contains("names the variable"), "a secret without padding too: {e}");
        assert!(!e.contains("MfKQ9r8"), "the secret is not echoed: {e}");
        let big = WebhookSink { batch_size: 1001, ..ok.clone() };
        assert!(big.validate().unwrap_err().contains("batch_size"));
        let parsed: WebhookSink = serde_json::from_value(serde_json::json!({
            "url": "http://127.0.0.1:9/x", "secret_env": "S", "timeout": "2s", "batch_size": 10
        }))
        .unwrap();
        assert_eq!(parsed.timeout, Duration::from_secs(2));
        assert!(
            serde_json::from_value::<WebhookSink>(serde_json::json!({
                "url": "http://x", "secret_env": "S", "secret": "whsec_x"
            }))
            .is_err(),
            "an unknown field (a secret written inline) is refused"
        );
    }

    #[test]
    fn nats_settings_are_checked() {
        let d = NatsSink::new();
        assert!(d.validate().is_ok());
        assert_eq!(d.subjects(), vec!["weir.*.*".to_string()]);
        let bad = |f: fn(&mut NatsSink)| {
            let mut s = NatsSink::new();
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert!(bad(|s| s.subject = "weir.{table}".into()).contains("not a token"));
        assert!(bad(|s| s.subject = "weir.>".into()).contains("wildcards"));
        assert!(bad(|s| s.subject = "weir..x".into()).contains("empty"));
        assert!(bad(|s| s.subject = "weir.{entity".into()).contains("not closed"));
        assert!(bad(|s| s.url = "http://x:4222".into()).contains("nats://"));
        assert!(bad(|s| s.stream = "a.b".into()).contains("stream name"));
        assert!(bad(|s| s.retention = "forever".into()).contains("retention"));
        assert!(bad(|s| s.max_in_flight = 0).contains("max_in_flight"));
        let e = bad(|s| s.url = "nats://u:hunter2@h:4222".into());
        assert!(e.contains("token_env") && !e.contains("hunter2"), "{e}");
        let e = WebhookSink::new("https://u:hunter2@x.io/h", "S").validate().unwrap_err();
        assert!(e.contains("credentials") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(redact_url("nats://me:pw@h:4222"), "nats://***@h:4222");
        assert_eq!(
            redact_url("nats://tok@a:4222, tls://b:4222"),
            "nats://***@a:4222, tls://b:4222"
        );
        assert_eq!(redact_url("https://u:p@x.io/h?next=a@b"), "https://***@x.io/h?next=a@b");
        assert_eq!(redact_url("https://x.io/h"), "https://x.io/h");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn addresses_for_reachability_checks() {
        let w = WebhookSink::new("https://example.com/hooks", "S");
        assert_eq!(w.address(), Some(("example.com".into(), 443)));
        let w = WebhookSink::new("http://127.0.0.1:8080/h", "S");
        assert_eq!(w.address(), Some(("127.0.0.1".into(), 8080)));
        let n = NatsSink { url: "nats://a:1, tls://u:p@b".into(), ..NatsSink::new() };
        assert_eq!(n.addresses(), vec![("a".into(), 1), ("b".into(), 4222)]);
    }
}
