//! Where a subscription delivers: its sink.
//!
//! ```text
//! "client"                                   SSE / WebSocket clients attached by name
//! "rust"                                     a Rust handler registered in a process
//! {"type": "webhook", "url", "secret_env"}   POSTed, Standard Webhooks signatures (weir-sinks)
//! {"type": "nats", "subject", "stream"}      published to NATS JetStream (weir-sinks)
//! ```
//!
//! Webhook and NATS sinks are delivered by every process that runs the engine (`weir run`, an
//! application embedding weir) and can build the sink — one whose secret's environment
//! variable is not set skips it and says so (`sink_error` in the subscription's status).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use weir_sinks::{NatsSink, WebhookSink};

use crate::subscription::SinkKind;

/// A subscription's sink. In JSON and TOML `client` and `rust` are words; webhook and NATS
/// sinks are tables with a `type`.
#[derive(Debug, Clone, PartialEq)]
pub enum Sink {
    /// SSE and WebSocket clients attached by name, which acknowledge what they handled.
    Client,
    /// A Rust handler in the process that registered it.
    Rust,
    /// POSTed to a URL.
    Webhook(WebhookSink),
    /// Published to NATS JetStream.
    Nats(NatsSink),
}

impl Sink {
    /// Its kind (the word stored in `weir.subscriptions.sink`).
    pub fn kind(&self) -> SinkKind {
        match self {
            Self::Client => SinkKind::Client,
            Self::Rust => SinkKind::Rust,
            Self::Webhook(_) => SinkKind::Webhook,
            Self::Nats(_) => SinkKind::Nats,
        }
    }

    /// The settings of a webhook or NATS sink (`None` for client and rust), as stored.
    pub fn settings(&self) -> Option<Value> {
        match self {
            Self::Client | Self::Rust => None,
            Self::Webhook(w) => serde_json::to_value(w).ok(),
            Self::Nats(n) => serde_json::to_value(n).ok(),
        }
    }

    /// From the stored kind and settings.
    pub fn from_parts(kind: &str, settings: Option<&Value>) -> Result<Self, String> {
        let mut v = settings.cloned().unwrap_or_else(|| Value::Object(Default::default()));
        if let Value::Object(o) = &mut v {
            o.insert("type".into(), Value::from(kind));
        }
        Self::from_value(if settings.is_none() { Value::from(kind) } else { v })
    }

    /// Checks the settings, without the environment or the network.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Client | Self::Rust => Ok(()),
            Self::Webhook(w) => w.validate(),
            Self::Nats(n) => n.validate(),
        }
    }

    /// Checks what this process needs to deliver it: the settings, and the secrets its
    /// environment variables must hold.
    pub fn check_environment(&self) -> Result<(), String> {
        self.validate()?;
        match self {
            Self::Webhook(w) => w.secrets().map(drop),
            Self::Nats(n) => match &n.token_env {
                Some(name) if std::env::var_os(name).is_none() => Err(format!(
                    "the environment variable {name} (the NATS sink's token_env) is not set in \
                     this process"
                )),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    fn from_value(v: Value) -> Result<Self, String> {
        let fields = match v {
            Value::String(word) => {
                return match word.as_str() {
                    "client" => Ok(Self::Client),
                    "rust" => Ok(Self::Rust),
                    "webhook" => Err("a webhook sink needs its settings: {\"type\": \"webhook\", \
                                      \"url\": \"https://...\", \"secret_env\": \"NAME\"}"
                        .into()),
                    "nats" => Err("a nats sink is a table: {\"type\": \"nats\"} at least \
                                   (subject, stream and url have defaults)"
                        .into()),
                    other => Err(format!(
                        "`{other}` is not a sink; use client, rust, or a table with type \
                         webhook or nats"
                    )),
                };
            }
            Value::Object(o) => o,
            other => {
                return Err(format!(
                    "a sink is a word (client, rust) or a table with a type (webhook, nats), \
                     not {other}"
                ));
            }
        };
        let mut fields = fields;
        let kind = match fields.remove("type") {
            Some(Value::String(t)) => t,
            _ => {
                return Err("a sink table needs a `type`: webhook or nats".into());
            }
        };
        let rest = Value::Object(fields);
        match kind.as_str() {
            // Whole numbers however written (`"batch_size": 10.0`), as the API's schema admits.
            "webhook" => weir_core::json::from_value_whole(rest)
                .map(Self::Webhook)
                .map_err(|e| format!("webhook sink: {e}")),
            "nats" => weir_core::json::from_value_whole(rest)
                .map(Self::Nats)
                .map_err(|e| format!("nats sink: {e}")),
            "client" | "rust" if rest.as_object().is_some_and(|o| o.is_empty()) => {
                Self::from_value(Value::from(kind))
            }
            "client" | "rust" => Err(format!("a `{kind}` sink has no settings")),
            other => Err(format!("`{other}` is not a sink type; use webhook or nats")),
        }
    }

    fn to_value(&self) -> Value {
        let mut v = self.settings().unwrap_or(Value::Null);
        match &mut v {
            Value::Object(o) => {
                let mut tagged = serde_json::Map::new();
                tagged.insert("type".into(), Value::from(self.kind().as_str()));
                tagged.append(o);
                Value::Object(tagged)
            }
            _ => Value::from(self.kind().as_str()),
        }
    }

    /// Most consecutive events of one emitter delivered together (one transaction, one
    /// checkpoint): a webhook's batch (or 50 single posts), NATS's publishes in flight.
    pub(crate) fn group(&self) -> usize {
        match self {
            // A lingering batch is its own group: the linger waits for one batch to fill.
            Self::Webhook(w) if !w.linger.is_zero() => w.batch_size as usize,
            // Otherwise as many whole batches as fit in 50 events (at least one): fewer
            // checkpoint commits per request.
            Self::Webhook(w) => {
                let batch = w.batch_size.max(1) as usize;
                batch * (50 / batch).max(1)
            }
            Self::Nats(n) => n.max_in_flight as usize,
            _ => 50,
        }
    }

    /// How long an emitter waits for a group to fill.
    pub(crate) fn linger(&self) -> std::time::Duration {
        match self {
            Self::Webhook(w) => w.linger,
            _ => std::time::Duration::ZERO,
        }
    }
}

/// The sink in words, fit to print: a webhook's URL and the name of its secret's variable, a
/// NATS server, subject and stream — credentials written into a URL redacted
/// ([`weir_sinks::config::redact_url`]), secrets never (only their variables' names).
impl std::fmt::Display for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use weir_sinks::config::redact_url;
        match self {
            Self::Client => f.write_str("client"),
            Self::Rust => f.write_str("rust"),
            Self::Webhook(w) => {
                write!(
                    f,
                    "webhook POST {} (signed with ${}; timeout {:?}",
                    redact_url(&w.url),
                    w.secret_env,
                    w.timeout
                )?;
                if w.batch_size > 1 {
                    write!(f, ", batches of up to {}", w.batch_size)?;
                    if !w.linger.is_zero() {
                        write!(f, " within {:?}", w.linger)?;
                    }
                }
                f.write_str(")")
            }
            Self::Nats(n) => {
                write!(
                    f,
                    "nats {} subject {} into stream {}{} ({} in flight",
                    redact_url(&n.url),
                    n.subject,
                    n.stream,
                    if n.create_stream { " (created if missing)" } else { "" },
                    n.max_in_flight
                )?;
                if let Some(t) = &n.token_env {
                    write!(f, "; token in ${t}")?;
                }
                f.write_str(")")
            }
        }
    }
}

impl Serialize for Sink {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Sink {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Self::from_value(v).map_err(serde::de::Error::custom)
    }
}

/// In the OpenAPI document: a word, or a webhook's or NATS sink's table — each field with its
/// own description and default (from [`WebhookSink`] and [`NatsSink`]) plus the `type` tag.
impl utoipa::PartialSchema for Sink {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
        let tagged = |kind: &str, settings: RefOr<Schema>, description: &str| {
            let mut schema = match settings {
                RefOr::T(Schema::Object(o)) => o,
                _ => unreachable!("derived struct schemas are objects"),
            };
            schema.properties.insert(
                "type".into(),
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some([kind]))
                    .description(Some("The kind of sink"))
                    .into(),
            );
            schema.required.insert(0, "type".into());
            schema.title = Some(kind.into());
            schema.description = Some(description.into());
            schema
        };
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["client", "rust"]))
                    .title(Some("client or rust"))
                    .description(Some(
                        "`client`: SSE/WebSocket clients attached by name; `rust`: a handler \
                         registered in a process",
                    )),
            )
            .item(tagged(
                "webhook",
                <WebhookSink as utoipa::PartialSchema>::schema(),
                "POSTed to `url` with Standard Webhooks signatures; the secret is read from the \
                 environment variable `secret_env` of each delivering process (docs/sinks.md)",
            ))
            .item(tagged(
                "nats",
                <NatsSink as utoipa::PartialSchema>::schema(),
                "Published to NATS JetStream, one message per event with `Nats-Msg-Id` \
                 (docs/sinks.md)",
            ))
            .description(Some(
                "Where a subscription delivers: a word, or a table with a `type`. Secrets \
                 appear only as the names of the environment variables that hold them.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Sink {}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The API's schema says `integer`, which admits `10.0`.
    #[test]
    fn whole_floats_are_integers() {
        let w: Sink = serde_json::from_value(json!({
            "type": "webhook", "url": "http://127.0.0.1:1/h", "secret_env": "HOOK",
            "batch_size": 10.0, "linger": "5ms"
        }))
        .unwrap();
        let Sink::Webhook(w) = w else { panic!("a webhook") };
        assert_eq!(w.batch_size, 10);
        use crate::subscription::StartAt;
        assert_eq!(StartAt::from_value(&json!(42.0)).unwrap(), StartAt::After(42));
        assert!(StartAt::from_value(&json!(42.5)).is_err());
    }

    #[test]
    fn words_and_tables() {
        assert_eq!(serde_json::from_value::<Sink>(json!("client")).unwrap(), Sink::Client);
        assert_eq!(serde_json::to_value(Sink::Rust).unwrap(), json!("rust"));
        let w: Sink = serde_json::from_value(json!({
            "type": "webhook", "url": "http://127.0.0.1:1/h", "secret_env": "HOOK"
        }))
        .unwrap();
        assert_eq!(w.kind(), SinkKind::Webhook);
        let back = serde_json::to_value(&w).unwrap();
        assert_eq!(back["type"], "webhook");
        assert_eq!(back["timeout"], "15s");
        assert_eq!(serde_json::from_value::<Sink>(back).unwrap(), w);
        let stored = Sink::from_parts("webhook", w.settings().as_ref()).unwrap();
        assert_eq!(stored, w);
        assert_eq!(Sink::from_parts("client", None).unwrap(), Sink::Client);
        let n: Sink = serde_json::from_value(json!({"type": "nats"})).unwrap();
        assert_eq!(n.group(), 256);
        let batch = |batch_size: u32, linger_ms: u64| {
            let mut w = weir_sinks::WebhookSink::new("http://x/h", "S");
            w.batch_size = batch_size;
            w.linger = std::time::Duration::from_millis(linger_ms);
            Sink::Webhook(w).group()
        };
        assert_eq!((batch(1, 0), batch(10, 0), batch(30, 0), batch(100, 0)), (50, 50, 30, 100));
        assert_eq!(batch(10, 20), 10, "a lingering batch is its own group");
        for (bad, says) in [
            (json!("webhook"), "needs its settings"),
            (json!("kafka"), "not a sink"),
            (json!({"url": "x"}), "needs a `type`"),
            (json!({"type": "webhook", "url": "http://x"}), "secret_env"),
            (json!({"type": "nats", "subjects": "x"}), "unknown field"),
        ] {
            let e = serde_json::from_value::<Sink>(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    /// The word-or-table form reads through a `Value`: numbers as a request body or `jsonb`
    /// writes them (serde_json keeps their text) still fill the integer settings.
    #[test]
    fn numbers_in_tables_as_text_and_as_stored() {
        for text in [
            r#"{"type": "webhook", "url": "http://x/h", "secret_env": "S", "batch_size": 10}"#,
            r#"{"type": "nats", "max_in_flight": 100}"#,
        ] {
            let direct: Sink = serde_json::from_str(text).unwrap();
            let stored: Sink =
                serde_json::from_value(serde_json::from_str::<Value>(text).unwrap()).unwrap();
            assert_eq!(direct, stored, "{text}");
            assert_eq!(
                serde_json::from_value::<Sink>(serde_json::to_value(&direct).unwrap()).unwrap(),
                direct
            );
        }
        let e = serde_json::from_str::<Sink>(
            r#"{"type": "webhook", "url": "http://x/h", "secret_env": "S", "batch_size": 1.5}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("batch_size") || e.contains("invalid"), "{e}");
    }

    #[test]
    fn in_words_without_secrets() {
        let w: Sink = serde_json::from_value(json!({
            "type": "webhook", "url": "https://me:pw@example.com/h", "secret_env": "HOOK",
            "batch_size": 10, "linger": "50ms"
        }))
        .unwrap();
        assert_eq!(
            w.to_string(),
            "webhook POST https://***@example.com/h (signed with $HOOK; timeout 15s, batches of \
             up to 10 within 50ms)"
        );
        let n: Sink = serde_json::from_value(json!({
            "type": "nats", "url": "nats://u:secret@n1:4222", "token_env": "NATS_TOKEN"
        }))
        .unwrap();
        let words = n.to_string();
        assert!(!words.contains("secret"), "{words}");
        assert_eq!(
            words,
            "nats nats://***@n1:4222 subject weir.{entity}.{kind} into stream WEIR (256 in \
             flight; token in $NATS_TOKEN)"
        );
    }
}
