//! What a subscription is: a named selector over the log, a pool of emitters, and where it
//! starts — validated before anything is stored, so a selector that cannot match is refused at
//! creation (reckon_db accepted such filters and then delivered nothing).
//!
//! ```text
//! type           selector                              matches
//! stream         "order-42" | "order-*" (prefix)        appended events of those streams
//! event_type     "order.placed"                         appended events of that type
//! event_pattern  "order.*" (glob: * and ?)              appended events whose type matches
//! event_payload  {"customer": "c-1"} (an object)        appended events whose data contains it
//! tags           {"any": ["vip"]} | {"all": [...]}      appended events with any / all tags
//! entity         "posts" | {"entities": [...],          captured row changes of those tables
//!                 "kinds": ["insert", ...]}              (and kinds); `weir.stream_events`
//!                                                        among them: appended events too
//! ```
//!
//! The engine reads with the coarse [`Selector`] (entity and kind, in SQL) and asks
//! [`SubscriptionDef::matches`] for the rest. Events are routed to emitters by
//! [`SubscriptionDef::partition_key`]: the stream for appended events, the table and primary
//! key for row changes, or a field named by `options.partition_by`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use weir_consumer::Selector;
use weir_core::{Event, Kind, OnExhausted, RetryConfig};

use crate::sink::Sink;
use crate::{Error, Result};

/// Most emitters a subscription may have.
pub const MAX_POOL_SIZE: u32 = 1024;

/// A subscription's type: what its selector selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionKind {
    /// One stream, or every stream with a prefix (`order-*`).
    Stream,
    /// Appended events of one type.
    EventType,
    /// Appended events whose type matches a glob (`order.*`).
    EventPattern,
    /// Appended events whose data contains a JSON object.
    EventPayload,
    /// Appended events with any (or all) of some tags.
    Tags,
    /// Captured row changes of tables.
    Entity,
}

impl SubscriptionKind {
    /// The word used in the database, JSON and `weir.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stream => "stream",
            Self::EventType => "event_type",
            Self::EventPattern => "event_pattern",
            Self::EventPayload => "event_payload",
            Self::Tags => "tags",
            Self::Entity => "entity",
        }
    }
}

impl std::str::FromStr for SubscriptionKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "stream" => Self::Stream,
            "event_type" => Self::EventType,
            "event_pattern" => Self::EventPattern,
            "event_payload" => Self::EventPayload,
            "tags" => Self::Tags,
            "entity" => Self::Entity,
            other => {
                return Err(Error::InvalidSubscription(format!(
                    "`{other}` is not a subscription type; use stream, event_type, \
                     event_pattern, event_payload, tags or entity"
                )));
            }
        })
    }
}

impl std::fmt::Display for SubscriptionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Where a new subscription starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StartAt {
    /// With the oldest event the log still holds.
    #[default]
    Beginning,
    /// With the next event logged.
    Now,
    /// After this log position (its next event is the first delivered).
    After(i64),
    /// With the first event committed at or after this time.
    Time(DateTime<Utc>),
}

/// The OpenAPI schema of a selector: a string (`"order-*"`, `"order.placed"`) or an object
/// (`{"any": ["vip"]}`, `{"entities": ["posts"]}`), by the subscription's type.
pub fn selector_schema() -> utoipa::openapi::schema::Object {
    selector_schema_of(false)
}

/// [`selector_schema`] or `null` (an update that keeps the selector).
pub fn nullable_selector_schema() -> utoipa::openapi::schema::Object {
    selector_schema_of(true)
}

fn selector_schema_of(nullable: bool) -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let mut types = vec![Type::String, Type::Object];
    if nullable {
        types.push(Type::Null);
    }
    ObjectBuilder::new()
        .schema_type(types.into_iter().collect::<utoipa::openapi::schema::SchemaType>())
        .build()
}

/// The OpenAPI schema of a [`StartAt`] in its JSON form ([`StartAt::to_value`]): `"beginning"`,
/// `"now"`, an RFC 3339 time, or a log position (0 or more).
pub fn start_from_schema() -> utoipa::openapi::schema::Schema {
    start_from_schema_of(false)
}

/// [`start_from_schema`] or `null` (the default, `beginning`).
pub fn nullable_start_from_schema() -> utoipa::openapi::schema::Schema {
    start_from_schema_of(true)
}

fn start_from_schema_of(nullable: bool) -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Type};
    // anyOf: a validator that leaves `format` unchecked takes "now" for a time too.
    let mut any_of = AnyOfBuilder::new()
        .item(
            ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["beginning", "now"])),
        )
        .item(ObjectBuilder::new().schema_type(Type::String).format(Some(
            utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::DateTime),
        )))
        .item(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)));
    if nullable {
        any_of = any_of.item(ObjectBuilder::new().schema_type(Type::Null));
    }
    any_of.build().into()
}

impl StartAt {
    /// Parses `beginning`, `now`, a position, or an RFC 3339 time.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "beginning" => Ok(Self::Beginning),
            "now" => Ok(Self::Now),
            _ => {
                if let Ok(p) = s.parse::<i64>() {
                    if p < 0 {
                        return Err(Error::InvalidSubscription(format!(
                            "start_from {p}: a position is 0 or more"
                        )));
                    }
                    return Ok(Self::After(p));
                }
                DateTime::parse_from_rfc3339(s).map(|t| Self::Time(t.with_timezone(&Utc))).map_err(
                    |_| {
                        Error::InvalidSubscription(format!(
                            "start_from `{s}`: use beginning, now, a log position, or an RFC 3339 \
                             time such as 2026-12-01T12:00:00Z"
                        ))
                    },
                )
            }
        }
    }

    /// The JSON kept with the subscription.
    pub fn to_value(&self) -> Value {
        match self {
            Self::Beginning => Value::from("beginning"),
            Self::Now => Value::from("now"),
            Self::After(p) => Value::from(*p),
            Self::Time(t) => Value::from(t.to_rfc3339()),
        }
    }

    /// From the JSON form (a word, a number, a time).
    pub fn from_value(v: &Value) -> Result<Self> {
        match v {
            // A position, however written (`42`, `42.0`), as the schema's `integer` admits.
            Value::Number(n) => match weir_core::json::whole_i64(n) {
                Some(p) => Self::parse(&p.to_string()),
                None => Self::parse(&n.to_string()),
            },
            Value::String(s) => Self::parse(s),
            Value::Null => Ok(Self::Beginning),
            other => Err(Error::InvalidSubscription(format!(
                "start_from {other}: use \"beginning\", \"now\", a log position, or a time"
            ))),
        }
    }
}

/// How a subscription delivers: the kind of its [`Sink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// To SSE and WebSocket clients attached by name, which acknowledge what they handled.
    Client,
    /// To a Rust handler in the process that registered it (`Weir::builder().subscription`).
    Rust,
    /// POSTed to a URL (Standard Webhooks).
    Webhook,
    /// Published to NATS JetStream.
    Nats,
}

impl SinkKind {
    /// The word stored in `weir.subscriptions.sink`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Rust => "rust",
            Self::Webhook => "webhook",
            Self::Nats => "nats",
        }
    }
}

/// Settings beyond the selector.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionOptions {
    /// Retries before `on_exhausted` (default: `[consumers.retry]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub retry: Option<RetryConfig>,
    /// After the retries: `halt`, `skip` or `park` (default: `[consumers] on_exhausted`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub on_exhausted: Option<OnExhausted>,
    /// Route by this field instead of the stream (or row key): a dotted path into an appended
    /// event's `data` (`customer.id`), or a column of a row change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_by: Option<String>,
}

/// A subscription as created: everything but what the database adds (id, checkpoints).
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionDef {
    /// Unique name (shared with operators: a consumer name).
    pub name: String,
    /// What the selector selects.
    pub kind: SubscriptionKind,
    /// The selector (see the module doc for each type's form).
    pub selector: Value,
    /// Emitters: events of one stream (or row) go to one emitter, in order. 1 to 1024.
    pub pool_size: u32,
    /// Where it starts when created.
    pub start_from: StartAt,
    /// Retries, failure policy, routing.
    pub options: SubscriptionOptions,
    /// How it delivers.
    pub sink: Sink,
}

impl SubscriptionDef {
    /// A subscription with one emitter, starting at the beginning, delivering to clients.
    pub fn new(name: impl Into<String>, kind: SubscriptionKind, selector: Value) -> Self {
        Self {
            name: name.into(),
            kind,
            selector,
            pool_size: 1,
            start_from: StartAt::Beginning,
            options: SubscriptionOptions::default(),
            sink: Sink::Client,
        }
    }

    /// Delivering to `sink`.
    pub fn sink(mut self, sink: Sink) -> Self {
        self.sink = sink;
        self
    }

    /// With `pool_size` emitters.
    pub fn pool_size(mut self, pool_size: u32) -> Self {
        self.pool_size = pool_size;
        self
    }

    /// Starting at `start`.
    pub fn start_from(mut self, start: StartAt) -> Self {
        self.start_from = start;
        self
    }

    /// With these options.
    pub fn options(mut self, options: SubscriptionOptions) -> Self {
        self.options = options;
        self
    }

    /// Checks everything that can be checked without the database; the message names the
    /// field and the fix.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        if self.pool_size == 0 || self.pool_size > MAX_POOL_SIZE {
            return Err(Error::InvalidSubscription(format!(
                "subscription `{}`: pool_size {} is out of range; use 1 to {MAX_POOL_SIZE}",
                self.name, self.pool_size
            )));
        }
        Matcher::compile(self.kind, &self.selector).map_err(|e| {
            Error::InvalidSubscription(format!("subscription `{}`: {e}", self.name))
        })?;
        if let Some(p) = &self.options.partition_by
            && (p.is_empty() || p.split('.').any(str::is_empty))
        {
            return Err(Error::InvalidSubscription(format!(
                "subscription `{}`: partition_by `{p}` is not a field path; use names separated \
                 by dots, such as `customer.id`",
                self.name
            )));
        }
        // The sink's settings too (not its environment: that is each delivering process's).
        self.sink.validate().map_err(|e| {
            Error::InvalidSubscription(format!("subscription `{}`: {e}", self.name))
        })?;
        Ok(())
    }

    /// What the engine reads in SQL (entity and kind); [`matches`](Self::matches) does the rest.
    pub fn coarse_selector(&self) -> Selector {
        match Matcher::compile(self.kind, &self.selector) {
            Ok(Matcher::Entity { entities, kinds }) => Selector { entities, kinds },
            _ => {
                Selector { entities: vec![Event::STREAM_EVENTS.into()], kinds: vec![Kind::Append] }
            }
        }
    }

    /// The compiled selector (the definition must be [valid](Self::validate)).
    pub fn matcher(&self) -> Result<Matcher> {
        Matcher::compile(self.kind, &self.selector)
            .map_err(|e| Error::InvalidSubscription(format!("subscription `{}`: {e}", self.name)))
    }
}

impl SubscriptionDef {
    /// A `[[subscriptions]]` entry of `weir.toml`, validated (the error names the entry).
    pub fn from_config(c: &weir_core::SubscriptionConfig) -> Result<Self> {
        let start_from = match &c.start_from {
            Some(s) => StartAt::parse(s)?,
            None => StartAt::Beginning,
        };
        let def = Self {
            name: c.name.clone(),
            kind: c.kind.parse().map_err(|e| {
                Error::InvalidSubscription(format!("subscription `{}`: {e}", c.name))
            })?,
            selector: c.selector.clone(),
            pool_size: c.pool_size,
            start_from,
            options: SubscriptionOptions {
                retry: c.retry,
                on_exhausted: c.on_exhausted,
                partition_by: c.partition_by.clone(),
            },
            sink: match &c.sink {
                None => Sink::Client,
                Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                    Error::InvalidSubscription(format!("subscription `{}`: sink: {e}", c.name))
                })?,
            },
        };
        def.validate()?;
        Ok(def)
    }
}

/// Names are consumer names: shown in URLs and commands.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidSubscription(format!(
            "subscription name `{name}`: use 1 to 200 letters, digits, `-`, `_` or `.`"
        )))
    }
}

/// A selector, compiled: what [`SubscriptionDef::matches`] runs per event.
#[derive(Debug, Clone, PartialEq)]
pub enum Matcher {
    /// One stream.
    Stream(String),
    /// Streams with this prefix.
    StreamPrefix(String),
    /// One event type.
    EventType(String),
    /// A glob over the type.
    EventPattern(Glob),
    /// Containment on data.
    Payload(Value),
    /// Any of the tags.
    TagsAny(Vec<String>),
    /// All of the tags.
    TagsAll(Vec<String>),
    /// Row changes of these entities (and kinds; empty lists match all).
    Entity {
        /// Entities (`posts`, `sales.orders`).
        entities: Vec<String>,
        /// Kinds.
        kinds: Vec<Kind>,
    },
}

impl Matcher {
    /// Compiles `selector` for `kind`; the error says what is wrong with it.
    pub fn compile(kind: SubscriptionKind, selector: &Value) -> std::result::Result<Self, String> {
        let text = |what: &str| -> std::result::Result<String, String> {
            match selector.as_str() {
                Some(s) if !s.is_empty() => Ok(s.to_string()),
                _ => Err(format!("a `{}` selector is a non-empty string ({what})", kind.as_str())),
            }
        };
        match kind {
            SubscriptionKind::Stream => {
                let s = text("a stream name, or a prefix ending in `*` such as `order-*`")?;
                match s.strip_suffix('*') {
                    Some(prefix) if prefix.contains('*') => {
                        Err(format!("stream selector `{s}`: only a trailing `*` is allowed"))
                    }
                    Some(prefix) => Ok(Matcher::StreamPrefix(prefix.to_string())),
                    None if s.contains('*') => {
                        Err(format!("stream selector `{s}`: only a trailing `*` is allowed"))
                    }
                    None => Ok(Matcher::Stream(s)),
                }
            }
            SubscriptionKind::EventType => {
                Ok(Matcher::EventType(text("an event type such as `order.placed`")?))
            }
            SubscriptionKind::EventPattern => {
                let s = text("a glob over the event type such as `order.*`")?;
                Ok(Matcher::EventPattern(Glob::new(&s)?))
            }
            SubscriptionKind::EventPayload => match selector {
                Value::Object(o) if !o.is_empty() => Ok(Matcher::Payload(selector.clone())),
                Value::Object(_) => Err("an `event_payload` selector is a non-empty JSON object \
                                         that the event's data must contain"
                    .into()),
                other => Err(format!(
                    "an `event_payload` selector is a JSON object that the event's data must \
                     contain, not {other}"
                )),
            },
            SubscriptionKind::Tags => {
                let (all, list) = match selector {
                    Value::Object(o) if o.len() == 1 && o.contains_key("any") => (false, &o["any"]),
                    Value::Object(o) if o.len() == 1 && o.contains_key("all") => (true, &o["all"]),
                    Value::Array(_) => (false, selector),
                    _ => {
                        return Err(format!(
                            "a `tags` selector is {{\"any\": [tags]}} or {{\"all\": [tags]}}, not \
                             {selector}"
                        ));
                    }
                };
                let tags: Vec<String> = match list {
                    Value::Array(a) => a
                        .iter()
                        .map(|t| match t.as_str() {
                            Some(s) if !s.is_empty() => Ok(s.to_string()),
                            _ => Err(format!("tag {t} is not a non-empty string")),
                        })
                        .collect::<std::result::Result<_, _>>()?,
                    other => return Err(format!("the tags are a list of strings, not {other}")),
                };
                if tags.is_empty() {
                    return Err("a `tags` selector needs at least one tag".into());
                }
                Ok(if all { Matcher::TagsAll(tags) } else { Matcher::TagsAny(tags) })
            }
            SubscriptionKind::Entity => {
                let (entities, kinds) = match selector {
                    Value::String(s) if !s.is_empty() => (vec![Value::from(s.as_str())], None),
                    Value::Array(a) => (a.clone(), None),
                    Value::Object(o) => {
                        let unknown: Vec<&String> =
                            o.keys().filter(|k| *k != "entities" && *k != "kinds").collect();
                        if !unknown.is_empty() {
                            return Err(format!(
                                "an `entity` selector has `entities` and `kinds`, not {unknown:?}"
                            ));
                        }
                        let entities = match o.get("entities") {
                            Some(Value::Array(a)) => a.clone(),
                            Some(Value::String(s)) => vec![Value::from(s.as_str())],
                            _ => {
                                return Err("an `entity` selector needs `entities`: a list of \
                                             tables such as [\"posts\"]"
                                    .into());
                            }
                        };
                        (entities, o.get("kinds").cloned())
                    }
                    _ => {
                        return Err(format!(
                            "an `entity` selector is a table name, a list of them, or \
                             {{\"entities\": [...], \"kinds\": [...]}}, not {selector}"
                        ));
                    }
                };
                // `weir.stream_events` among them takes every appended event too: row changes
                // and appended events in one subscription, in log order.
                let entities: Vec<String> = entities
                    .iter()
                    .map(|e| match e.as_str() {
                        Some(s) if !s.is_empty() => Ok(s.to_string()),
                        _ => Err(format!("entity {e} is not a table name")),
                    })
                    .collect::<std::result::Result<_, _>>()?;
                if entities.is_empty() {
                    return Err("an `entity` selector needs at least one table".into());
                }
                let kinds: Vec<Kind> = match kinds {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|k| {
                            k.as_str().and_then(Kind::parse).ok_or_else(|| {
                                format!(
                                    "kind {k} is not one of insert, update, delete, truncate, \
                                     message, append"
                                )
                            })
                        })
                        .collect::<std::result::Result<_, _>>()?,
                    Some(other) => return Err(format!("`kinds` is a list, not {other}")),
                };
                Ok(Matcher::Entity { entities, kinds })
            }
        }
    }

    /// Whether the subscription receives `event`.
    pub fn matches(&self, event: &Event) -> bool {
        if let Matcher::Entity { entities, kinds } = self {
            return entities.contains(&event.entity)
                && (kinds.is_empty() || kinds.contains(&event.kind));
        }
        let Some(appended) = Appended::of(event) else { return false };
        match self {
            Matcher::Stream(s) => appended.stream == s,
            Matcher::StreamPrefix(p) => appended.stream.starts_with(p.as_str()),
            Matcher::EventType(t) => appended.event_type == t,
            Matcher::EventPattern(g) => g.matches(appended.event_type),
            Matcher::Payload(p) => appended.data.is_some_and(|d| contains(d, p)),
            Matcher::TagsAny(tags) => tags.iter().any(|t| appended.has_tag(t)),
            Matcher::TagsAll(tags) => tags.iter().all(|t| appended.has_tag(t)),
            Matcher::Entity { .. } => unreachable!("handled above"),
        }
    }
}

impl SubscriptionDef {
    /// Whether the subscription receives `event` (the definition must be valid).
    pub fn matches(&self, event: &Event) -> bool {
        self.matcher().is_ok_and(|m| m.matches(event))
    }

    /// The key whose events one emitter delivers in order: `options.partition_by`'s value, or
    /// the stream of an appended event, or the table and primary key of a row change.
    pub fn partition_key(&self, event: &Event) -> std::result::Result<String, String> {
        partition_key(self.options.partition_by.as_deref(), event)
    }
}

/// See [`SubscriptionDef::partition_key`].
pub(crate) fn partition_key(
    partition_by: Option<&str>,
    event: &Event,
) -> std::result::Result<String, String> {
    let appended = Appended::of(event);
    match (partition_by, &appended) {
        (None, Some(a)) => Ok(a.stream.to_string()),
        (None, None) => Ok(format!("{}:{}", event.entity, event.key)),
        (Some(path), _) => {
            let root = match &appended {
                Some(a) => a.data,
                None => event.new_record.as_ref().or(event.old_record.as_ref()),
            };
            let mut v = root.ok_or_else(|| format!("the event has no fields for `{path}`"))?;
            for part in path.split('.') {
                v = v.get(part).ok_or_else(|| format!("the event has no field `{path}`"))?;
            }
            Ok(match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        }
    }
}

/// The fields of an appended event, borrowed from the logged row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Appended<'a> {
    pub(crate) stream: &'a str,
    pub(crate) event_type: &'a str,
    pub(crate) data: Option<&'a Value>,
    tags: Option<&'a Vec<Value>>,
}

impl<'a> Appended<'a> {
    pub(crate) fn of(event: &'a Event) -> Option<Self> {
        if event.kind != Kind::Append {
            return None;
        }
        let row = event.new_record.as_ref()?;
        Some(Self {
            stream: row.get("stream")?.as_str()?,
            event_type: row.get("type")?.as_str()?,
            data: row.get("data"),
            tags: row.get("tags").and_then(Value::as_array),
        })
    }

    fn has_tag(&self, tag: &str) -> bool {
        self.tags.is_some_and(|t| t.iter().any(|v| v.as_str() == Some(tag)))
    }
}

/// JSON containment as PostgreSQL's `@>` defines it: objects contain a subset of keys with
/// contained values, arrays contain every element of the other (in any order), scalars equal.
pub fn contains(doc: &Value, pattern: &Value) -> bool {
    match (doc, pattern) {
        (Value::Object(d), Value::Object(p)) => {
            p.iter().all(|(k, pv)| d.get(k).is_some_and(|dv| contains(dv, pv)))
        }
        (Value::Array(d), Value::Array(p)) => {
            p.iter().all(|pv| d.iter().any(|dv| contains(dv, pv)))
        }
        // A top-level array contains a scalar element too (`'[1,2]' @> '1'`).
        (Value::Array(d), p) if !p.is_object() => d.iter().any(|dv| same_scalar(dv, p)),
        (d, p) => same_scalar(d, p),
    }
}

/// Scalars compared as `jsonb` compares them: numbers by value with every digit
/// ([`weir_core::json::same_number`]: `1.50` is `1.5`, `1e2` is `100`).
fn same_scalar(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => weir_core::json::same_number(a, b),
        (a, b) => a == b,
    }
}

/// A glob over event types: `*` any run of characters, `?` one character, everything else
/// itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(Vec<char>);

impl Glob {
    /// Compiles a pattern; `[`, `]`, `{`, `}` and `\` are refused (they mean classes and
    /// alternatives elsewhere, and silently matching them literally would surprise).
    pub fn new(pattern: &str) -> std::result::Result<Self, String> {
        if let Some(c) = pattern.chars().find(|c| matches!(c, '[' | ']' | '{' | '}' | '\\')) {
            return Err(format!(
                "event pattern `{pattern}`: `{c}` is not supported; use `*` (any characters) \
                 and `?` (one character)"
            ));
        }
        Ok(Self(pattern.chars().collect()))
    }

    /// Whether `text` matches.
    pub fn matches(&self, text: &str) -> bool {
        let t: Vec<char> = text.chars().collect();
        let p = &self.0;
        // Iterative wildcard matching with backtracking to the last `*`.
        let (mut i, mut j) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while i < t.len() {
            if j < p.len() && (p[j] == '?' || p[j] == t[i]) {
                i += 1;
                j += 1;
            } else if j < p.len() && p[j] == '*' {
                star = Some((j, i));
                j += 1;
            } else if let Some((sj, si)) = star {
                j = sj + 1;
                i = si + 1;
                star = Some((sj, si + 1));
            } else {
                return false;
            }
        }
        p[j..].iter().all(|c| *c == '*')
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn appended(stream: &str, ty: &str, data: Value, tags: &[&str]) -> Event {
        Event {
            position: 1,
            lsn: weir_core::Lsn(1),
            xid: 1,
            commit_ts: Utc::now(),
            kind: Kind::Append,
            entity: Event::STREAM_EVENTS.into(),
            source: Default::default(),
            key: json!({"stream": stream, "version": 1}),
            new_record: Some(json!({"stream": stream, "version": 1, "type": ty, "data": data,
                                    "metadata": {}, "tags": tags})),
            old_record: None,
            changes: None,
            unchanged_toast: Vec::new(),
        }
    }

    fn row(entity: &str, kind: Kind) -> Event {
        Event {
            kind,
            entity: entity.into(),
            key: json!({"id": 1}),
            new_record: Some(json!({"id": 1, "post_id": 7})),
            ..appended("x", "t", json!({}), &[])
        }
    }

    fn m(kind: SubscriptionKind, selector: Value) -> Matcher {
        Matcher::compile(kind, &selector).unwrap()
    }

    #[test]
    fn stream_selectors_match_one_stream_or_a_prefix() {
        let one = m(SubscriptionKind::Stream, json!("order-1"));
        assert!(one.matches(&appended("order-1", "t", json!({}), &[])));
        assert!(!one.matches(&appended("order-10", "t", json!({}), &[])));
        let prefix = m(SubscriptionKind::Stream, json!("order-*"));
        assert!(prefix.matches(&appended("order-10", "t", json!({}), &[])));
        assert!(prefix.matches(&appended("order-", "t", json!({}), &[])));
        assert!(!prefix.matches(&appended("orders", "t", json!({}), &[])));
        assert!(!prefix.matches(&row("order-1", Kind::Insert)));
        assert!(Matcher::compile(SubscriptionKind::Stream, &json!("a*b")).is_err());
        assert!(Matcher::compile(SubscriptionKind::Stream, &json!("")).is_err());
        assert!(Matcher::compile(SubscriptionKind::Stream, &json!(3)).is_err());
    }

    #[test]
    fn type_and_pattern_selectors() {
        let t = m(SubscriptionKind::EventType, json!("order.placed"));
        assert!(t.matches(&appended("s", "order.placed", json!({}), &[])));
        assert!(!t.matches(&appended("s", "order.placed.v2", json!({}), &[])));
        let g = m(SubscriptionKind::EventPattern, json!("order.*"));
        assert!(g.matches(&appended("s", "order.placed", json!({}), &[])));
        assert!(g.matches(&appended("s", "order.", json!({}), &[])));
        assert!(!g.matches(&appended("s", "orders.placed", json!({}), &[])));
        let q = m(SubscriptionKind::EventPattern, json!("order.?aid"));
        assert!(q.matches(&appended("s", "order.paid", json!({}), &[])));
        assert!(!q.matches(&appended("s", "order.prepaid", json!({}), &[])));
        let mid = m(SubscriptionKind::EventPattern, json!("*.placed"));
        assert!(mid.matches(&appended("s", "a.b.placed", json!({}), &[])));
        assert!(!mid.matches(&appended("s", "a.placed.x", json!({}), &[])));
        assert!(Matcher::compile(SubscriptionKind::EventPattern, &json!("order.[ab]")).is_err());
    }

    /// Options as a request body writes them and as `jsonb` gives them back (`1.50`) read the
    /// same: numbers reach the retry policy whatever their text.
    #[test]
    fn options_read_their_numbers_as_written_and_as_stored() {
        let text = r#"{"retry": {"min_restart_time": "1s", "backoff_multiplicator": 1.50,
                      "max_restart_time": "1m", "max_retries": 3}, "on_exhausted": "park"}"#;
        let direct: SubscriptionOptions = serde_json::from_str(text).unwrap();
        let stored: SubscriptionOptions =
            serde_json::from_value(serde_json::from_str::<Value>(text).unwrap()).unwrap();
        assert_eq!(direct, stored);
        let retry = direct.retry.unwrap();
        assert_eq!((retry.backoff_multiplicator, retry.max_retries), (1.5, 3));
    }

    #[test]
    fn payload_containment_follows_postgres() {
        let p = m(SubscriptionKind::EventPayload, json!({"customer": {"id": 7}, "items": [2]}));
        let data = json!({"customer": {"id": 7, "name": "x"}, "items": [1, 2, 3], "n": 1});
        assert!(p.matches(&appended("s", "t", data, &[])));
        assert!(!p.matches(&appended("s", "t", json!({"customer": {"id": 8}, "items": [2]}), &[])));
        assert!(!p.matches(&appended("s", "t", json!({"customer": {"id": 7}}), &[])));
        // Numbers by value, with every digit, as `@>` compares them.
        let n = |selector: &str, data: &str| {
            let p = m(SubscriptionKind::EventPayload, serde_json::from_str(selector).unwrap());
            p.matches(&appended("s", "t", serde_json::from_str(data).unwrap(), &[]))
        };
        assert!(n(r#"{"x": 1.5}"#, r#"{"x": 1.50}"#));
        assert!(n(r#"{"x": 100}"#, r#"{"x": 1e2}"#));
        assert!(n(r#"{"x": 0.001}"#, r#"{"x": 1E-3}"#));
        assert!(n(r#"{"x": -0}"#, r#"{"x": 0.0}"#));
        assert!(n(r#"{"x": [2.0]}"#, r#"{"x": [1, 2]}"#));
        assert!(n(
            r#"{"x": 123456789012345678901234567890}"#,
            r#"{"x": 123456789012345678901234567890.0}"#
        ));
        assert!(!n(
            r#"{"x": 123456789012345678901234567890}"#,
            r#"{"x": 123456789012345678901234567891}"#
        ));
        assert!(!n(r#"{"x": 0.1}"#, r#"{"x": 0.1000000000000000000000000001}"#));
        assert!(!n(r#"{"x": -1}"#, r#"{"x": 1}"#));
        assert!(!n(r#"{"x": 10}"#, r#"{"x": 1}"#));
        assert!(Matcher::compile(SubscriptionKind::EventPayload, &json!([1])).is_err());
        assert!(Matcher::compile(SubscriptionKind::EventPayload, &json!("x")).is_err());
        assert!(Matcher::compile(SubscriptionKind::EventPayload, &json!({})).is_err());
    }

    #[test]
    fn tags_any_and_all() {
        let any = m(SubscriptionKind::Tags, json!({"any": ["a", "b"]}));
        let all = m(SubscriptionKind::Tags, json!({"all": ["a", "b"]}));
        let ab = appended("s", "t", json!({}), &["a", "b", "c"]);
        let a = appended("s", "t", json!({}), &["a"]);
        let none = appended("s", "t", json!({}), &[]);
        assert!(any.matches(&ab) && any.matches(&a) && !any.matches(&none));
        assert!(all.matches(&ab) && !all.matches(&a) && !all.matches(&none));
        assert!(Matcher::compile(SubscriptionKind::Tags, &json!({"any": []})).is_err());
        assert!(Matcher::compile(SubscriptionKind::Tags, &json!({"some": ["a"]})).is_err());
        assert!(Matcher::compile(SubscriptionKind::Tags, &json!({"any": [1]})).is_err());
    }

    #[test]
    fn entity_selectors_take_the_listed_entities_appended_events_only_when_listed() {
        let e = m(SubscriptionKind::Entity, json!({"entities": ["posts"], "kinds": ["delete"]}));
        assert!(e.matches(&row("posts", Kind::Delete)));
        assert!(!e.matches(&row("posts", Kind::Insert)));
        assert!(!e.matches(&row("comments", Kind::Delete)));
        let s = m(SubscriptionKind::Entity, json!("posts"));
        assert!(s.matches(&row("posts", Kind::Insert)));
        // Appended events only when the event store's table is listed.
        assert!(!s.matches(&appended("order-1", "t", json!({}), &[])));
        let mixed = m(SubscriptionKind::Entity, json!(["posts", Event::STREAM_EVENTS]));
        assert!(mixed.matches(&appended("order-1", "t", json!({}), &[])));
        assert!(mixed.matches(&row("posts", Kind::Update)));
        assert!(Matcher::compile(SubscriptionKind::Entity, &json!({"entities": []})).is_err());
        assert!(Matcher::compile(SubscriptionKind::Entity, &json!({"tables": ["x"]})).is_err());
        assert!(
            Matcher::compile(
                SubscriptionKind::Entity,
                &json!({"entities": ["p"], "kinds": ["upsert"]})
            )
            .is_err()
        );
    }

    #[test]
    fn partition_keys() {
        let a = appended("order-1", "t", json!({"customer": {"id": 5}}), &[]);
        assert_eq!(partition_key(None, &a).unwrap(), "order-1");
        assert_eq!(partition_key(Some("customer.id"), &a).unwrap(), "5");
        assert!(partition_key(Some("customer.name"), &a).is_err());
        let r = row("posts", Kind::Insert);
        assert_eq!(partition_key(None, &r).unwrap(), "posts:{\"id\":1}");
        assert_eq!(partition_key(Some("post_id"), &r).unwrap(), "7");
    }

    #[test]
    fn definitions_are_validated() {
        let d = SubscriptionDef::new("orders", SubscriptionKind::Stream, json!("order-*"));
        assert!(d.clone().validate().is_ok());
        assert!(d.clone().pool_size(0).validate().is_err());
        assert!(d.clone().pool_size(1025).validate().is_err());
        assert!(d.clone().pool_size(1024).validate().is_ok());
        let bad = SubscriptionDef { name: "a b".into(), ..d.clone() };
        assert!(bad.validate().is_err());
        assert_eq!(StartAt::parse("42").unwrap(), StartAt::After(42));
        assert!(StartAt::parse("yesterday").is_err());
        assert!(matches!(StartAt::parse("2026-12-01T00:00:00Z").unwrap(), StartAt::Time(_)));
    }

    /// `[subscriptions.sink]` in weir.toml: a TOML table, kept as JSON by weir-core, read as a
    /// [`Sink`] here — and a wrong one refused with the field named.
    #[test]
    fn sinks_in_weir_toml() {
        use std::time::Duration;
        let parse = |sink: &str| {
            let text = format!(
                "[[subscriptions]]\nname = \"orders\"\ntype = \"stream\"\nselector = \"order-*\"\n\
                 {sink}"
            );
            let config = weir_core::Config::from_toml(&text, "weir.toml", []).unwrap();
            SubscriptionDef::from_config(&config.subscriptions[0])
        };
        let def = parse(
            "[subscriptions.sink]\ntype = \"webhook\"\nurl = \"https://example.com/hooks\"\n\
             secret_env = \"ORDERS_SECRET\"\ntimeout = \"5s\"\nbatch_size = 20\nlinger = \"50ms\"\n",
        )
        .unwrap();
        let Sink::Webhook(w) = &def.sink else { panic!("{:?}", def.sink) };
        assert_eq!(w.url, "https://example.com/hooks");
        assert_eq!(w.secret_env, "ORDERS_SECRET");
        assert_eq!((w.timeout, w.batch_size), (Duration::from_secs(5), 20));
        assert_eq!(w.linger, Duration::from_millis(50));
        let def = parse(
            "[subscriptions.sink]\ntype = \"nats\"\nurl = \"nats://n1:4222\"\n\
             subject = \"orders.{type}\"\nstream = \"ORDERS\"\ncreate_stream = true\n\
             stream_subjects = [\"orders.>\"]\nduplicate_window = \"5m\"\nmax_in_flight = 64\n\
             token_env = \"NATS_TOKEN\"\n",
        )
        .unwrap();
        let Sink::Nats(n) = &def.sink else { panic!("{:?}", def.sink) };
        assert_eq!((n.url.as_str(), n.subject.as_str()), ("nats://n1:4222", "orders.{type}"));
        assert_eq!((n.stream.as_str(), n.create_stream), ("ORDERS", true));
        assert_eq!(n.stream_subjects, vec!["orders.>".to_string()]);
        assert_eq!((n.duplicate_window, n.max_in_flight), (Duration::from_secs(300), 64));
        assert_eq!(n.token_env.as_deref(), Some("NATS_TOKEN"));
        assert_eq!(n.ack_timeout, Duration::from_secs(10), "the default");
        assert_eq!(parse("sink = \"client\"\n").unwrap().sink, Sink::Client);
        assert_eq!(parse("").unwrap().sink, Sink::Client, "the default");
        for (sink, says) in [
            (
                "[subscriptions.sink]\ntype = \"webhook\"\nurl = \"https://x.io\"\n\
                 secret_env = \"S\"\nsecret = \"whsec_abc\"\n",
                "unknown field `secret`",
            ),
            (
                "[subscriptions.sink]\ntype = \"nats\"\nsubject = \"weir.{nope}\"\n",
                "nats subject `weir.{nope}`: `{nope}` is not a token",
            ),
            (
                "[subscriptions.sink]\ntype = \"webhook\"\nurl = \"ftp://x.io\"\nsecret_env = \"S\"\n",
                "webhook url `ftp://x.io`",
            ),
            ("[subscriptions.sink]\ntype = \"webhook\"\nurl = \"https://x.io\"\n", "secret_env"),
            ("sink = \"kafka\"\n", "`kafka` is not a sink"),
        ] {
            let e = parse(sink).unwrap_err().to_string();
            assert!(e.starts_with("subscription `orders`: "), "{e}");
            assert!(e.contains(says), "{sink}: `{e}` should say `{says}`");
        }
    }
}
