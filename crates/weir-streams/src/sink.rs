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
            "webhook" => serde_json::from_value(rest)
                .map(Self::Webhook)
                .map_err(|e| format!("webhook sink: {e}")),
            "nats" => {
                serde_json::from_value(rest).map(Self::Nats).map_err(|e| format!("nats sink: {e}"))
            }
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
            Self::Webhook(w) if w.batch_size > 1 => w.batch_size as usize,
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

impl utoipa::PartialSchema for Sink {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["client", "rust"]))
                    .description(Some("SSE/WebSocket clients, or a Rust handler")),
            )
            .item(ObjectBuilder::new().schema_type(Type::Object).description(Some(
                "{\"type\": \"webhook\", url, secret_env, timeout, batch_size, linger} or \
                         {\"type\": \"nats\", url, subject, stream, create_stream, \
                         stream_subjects, retention, duplicate_window, max_in_flight, \
                         token_env, ack_timeout}; see docs/sinks.md",
            )))
            .into()
    }
}

impl utoipa::ToSchema for Sink {}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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
}
