//! Channel names, which channels an event belongs to, cursors, and the messages themselves.
//!
//! A message is serialized once ([`Msg::body`], a JSON object) and shared by every subscriber;
//! each transport only wraps it with the subscriber's cursor (`id`) when writing it out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use weir_core::{Config, Event, Kind, Position};

use crate::ApiError;

/// The reserved name of the processed-notification channel.
pub(crate) const PROCESSED: &str = "processed";

/// Most channels one connection may hold (query string and WebSocket `subscribe`s together).
pub(crate) const MAX_CHANNELS: usize = 256;

/// The 400 for a connection that would hold `total` channels, more than [`MAX_CHANNELS`].
pub(crate) fn too_many_channels(total: usize) -> ApiError {
    ApiError::bad_request(format!(
        "too many channels: {total} on one connection, at most {MAX_CHANNELS} allowed; \
         subscribe to the entity channel (`posts`) instead of many row channels, or open \
         another connection"
    ))
}

/// A parsed, valid channel name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Channel {
    /// `processed`.
    Processed,
    /// `<entity>`, `<entity>/<id>` or `<parent>/<value>/<entity>`: the full name and the entity
    /// whose events it carries.
    Change { name: Box<str>, entity: Box<str> },
}

impl Channel {
    /// Parses one channel name: 1 to 3 non-empty `/`-separated segments.
    pub(crate) fn parse(name: &str) -> Result<Channel, ApiError> {
        if name.is_empty() {
            return Err(ApiError::bad_request("a channel name is empty"));
        }
        let segments: Vec<&str> = name.split('/').collect();
        if segments.len() > 3 {
            return Err(ApiError::bad_request(format!(
                "channel `{name}` has more than 3 segments; channels are `<entity>`, \
                 `<entity>/<id>` or `<parent>/<value>/<entity>`"
            )));
        }
        if segments.iter().any(|s| s.is_empty()) {
            return Err(ApiError::bad_request(format!(
                "channel `{name}` has an empty segment; channels are `<entity>`, \
                 `<entity>/<id>` or `<parent>/<value>/<entity>`"
            )));
        }
        if segments.iter().any(|s| s.chars().any(char::is_control)) {
            return Err(ApiError::bad_request(format!(
                "channel {name:?} contains a control character"
            )));
        }
        if name == PROCESSED {
            return Ok(Channel::Processed);
        }
        let entity = match segments.len() {
            3 => segments[2],
            _ => segments[0],
        };
        Ok(Channel::Change { name: name.into(), entity: entity.into() })
    }
}

/// Parses the `channel` parameters: each may hold several names separated by `,`. A piece
/// without `/` right after an `<entity>/<id>` piece continues that id (a composite key,
/// `orders/7,2`). Duplicates are removed (the first occurrence keeps its place); at least one
/// channel is required, at most [`MAX_CHANNELS`].
pub(crate) fn parse_channels<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<Channel>, ApiError> {
    let mut names: Vec<String> = Vec::new();
    for value in values {
        let mut pieces: Vec<String> = Vec::new();
        for piece in value.split(',') {
            let piece = piece.trim();
            match pieces.last_mut() {
                Some(prev) if !piece.is_empty() && !piece.contains('/') && is_id_channel(prev) => {
                    prev.push(',');
                    prev.push_str(piece);
                }
                _ => pieces.push(piece.to_string()),
            }
        }
        names.extend(pieces);
    }
    if names.is_empty() {
        return Err(ApiError::bad_request(
            "no channel given: pass `channel=<name>` (repeat it, or separate names with `,`), \
             e.g. `channel=posts&channel=posts/42/comments`",
        ));
    }
    let mut seen: HashSet<Channel> = HashSet::new();
    let mut out: Vec<Channel> = Vec::new();
    for name in names {
        let c = Channel::parse(&name)?;
        if seen.insert(c.clone()) {
            out.push(c);
        }
    }
    if out.len() > MAX_CHANNELS {
        return Err(too_many_channels(out.len()));
    }
    Ok(out)
}

fn is_id_channel(name: &str) -> bool {
    let mut it = name.split('/');
    matches!((it.next(), it.next(), it.next()), (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty())
}

/// A subscriber's place in its streams: the last change position and, when it listens to
/// `processed`, the last processed position. Written as the message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) change: Position,
    pub(crate) processed: Option<Position>,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.processed {
            Some(p) => write!(f, "{}:{}", self.change, p),
            None => write!(f, "{}", self.change),
        }
    }
}

/// A cursor as a client sends it back: `<change>` or `<change>:<processed>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GivenCursor {
    pub(crate) change: Position,
    pub(crate) processed: Option<Position>,
}

impl GivenCursor {
    /// Parses a cursor; empty means none.
    pub(crate) fn parse(text: &str) -> Result<Option<GivenCursor>, ApiError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        let bad = || {
            ApiError::bad_request(format!(
                "malformed cursor `{text}`: pass back the `id` of the last message received \
                 (`<position>` or `<position>:<processed position>`)"
            ))
        };
        let number = |s: &str| -> Result<Position, ApiError> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            s.parse::<Position>().map_err(|_| bad())
        };
        Ok(Some(match text.split_once(':') {
            Some((c, p)) => GivenCursor { change: number(c)?, processed: Some(number(p)?) },
            None => GivenCursor { change: number(text)?, processed: None },
        }))
    }
}

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MsgKind {
    Change,
    Processed,
}

impl MsgKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MsgKind::Change => "change",
            MsgKind::Processed => "processed",
        }
    }
}

/// One message, serialized once and shared by every subscriber of its channel.
#[derive(Debug)]
pub(crate) struct Msg {
    pub(crate) kind: MsgKind,
    pub(crate) position: Position,
    /// `{"channel":…,"position":…,…}`: the SSE `data` line, and the WebSocket frame without
    /// its leading `id` and `type`.
    pub(crate) body: Box<str>,
}

impl Msg {
    /// A change on `channel`; `event_json` is the event serialized once for all its channels.
    pub(crate) fn change(channel: &str, position: Position, event_json: &str) -> Arc<Msg> {
        let channel = json_string(channel);
        let mut body = String::with_capacity(channel.len() + event_json.len() + 48);
        body.push_str("{\"channel\":");
        body.push_str(&channel);
        body.push_str(",\"position\":");
        body.push_str(&position.to_string());
        body.push_str(",\"event\":");
        body.push_str(event_json);
        body.push('}');
        Arc::new(Msg { kind: MsgKind::Change, position, body: body.into() })
    }

    /// A processed notification.
    pub(crate) fn processed(n: &ProcessedEvent) -> Arc<Msg> {
        let body = serde_json::json!({
            "channel": PROCESSED,
            "position": n.position,
            "entity": n.entity,
            "key": n.key,
            "kind": n.kind,
            "lsn": n.lsn,
        })
        .to_string();
        Arc::new(Msg { kind: MsgKind::Processed, position: n.position, body: body.into() })
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The event serialized as JSON.
pub(crate) fn event_json(event: &Event) -> String {
    serde_json::to_string(event).unwrap_or_else(|e| {
        tracing::error!(position = event.position, error = %e, "event not serializable");
        "null".into()
    })
}

/// What the processed channel says about one event.
#[derive(Debug, Clone)]
pub(crate) struct ProcessedEvent {
    pub(crate) position: Position,
    pub(crate) entity: String,
    pub(crate) key: Value,
    pub(crate) kind: String,
    pub(crate) lsn: String,
}

/// Which channels events belong to: the `[channels.<entity>] scopes` of the configuration and
/// the key-column order of composite keys.
#[derive(Debug, Default)]
pub(crate) struct Routing {
    /// entity → [(column, parent)].
    scopes: HashMap<String, Vec<(String, String)>>,
}

impl Routing {
    pub(crate) fn new(config: &Config) -> Routing {
        let scopes = config
            .channels
            .iter()
            .map(|(entity, c)| {
                let list: Vec<(String, String)> =
                    c.scopes.iter().map(|(col, parent)| (col.clone(), parent.clone())).collect();
                (entity.clone(), list)
            })
            .collect();
        Routing { scopes }
    }

    /// Every channel `event` is published on, without duplicates: `<entity>`, `<entity>/<id>`,
    /// then each scope (the new value's, then the old value's when an update moved the row).
    /// `key_columns` orders a composite key.
    ///
    /// A name is only produced when it parses back to a channel of the event's entity: an
    /// entity, key or scope value containing `/` would make a name of another shape (a `posts`
    /// key `5/comments` would give `posts/5/comments`, a scope channel of `comments`), so that
    /// channel is left out. Live dispatch and replay both route through here.
    pub(crate) fn channels_of(&self, event: &Event, key_columns: Option<&[String]>) -> Vec<String> {
        let mut out = Vec::with_capacity(4);
        if event.entity.contains('/') {
            // `a/b` would be the row channel `b` of entity `a`: no channel carries it.
            return out;
        }
        out.push(event.entity.clone());
        if let Some(id) = key_text(&event.key, key_columns)
            && !id.contains('/')
        {
            out.push(format!("{}/{}", event.entity, id));
        }
        if let Some(scopes) = self.scopes.get(&event.entity) {
            for (column, parent) in scopes {
                let new = event.new_record.as_ref().and_then(|r| r.get(column));
                let old = event.old_record.as_ref().and_then(|r| r.get(column)).or_else(|| {
                    event
                        .changes
                        .as_ref()
                        .and_then(|c| c.get(column))
                        .and_then(|c| c.get("old_value"))
                });
                let values = match event.kind {
                    Kind::Delete => [old, None],
                    // An unchanged TOAST column is absent from the new row: it kept its value.
                    Kind::Update => [new.or(old), old],
                    _ => [new, None],
                };
                if parent.contains('/') {
                    continue;
                }
                for value in values.into_iter().flatten() {
                    if let Some(v) = value_text(value).filter(|v| !v.contains('/')) {
                        let name = format!("{parent}/{v}/{}", event.entity);
                        if !out.contains(&name) {
                            out.push(name);
                        }
                    }
                }
            }
        }
        out
    }
}

/// A key's id text: the value of a one-column key; a composite key's values joined by `,` in
/// key-column order. `None` for an empty key (truncate, messages) or a null value.
pub(crate) fn key_text(key: &Value, key_columns: Option<&[String]>) -> Option<String> {
    let map = key.as_object()?;
    match map.len() {
        0 => None,
        1 => map.values().next().and_then(value_text),
        _ => {
            let mut parts = Vec::with_capacity(map.len());
            match key_columns {
                Some(cols)
                    if cols.len() == map.len() && cols.iter().all(|c| map.contains_key(c)) =>
                {
                    for c in cols {
                        parts.push(value_text(&map[c])?);
                    }
                }
                _ => {
                    for v in map.values() {
                        parts.push(value_text(v)?);
                    }
                }
            }
            Some(parts.join(","))
        }
    }
}

/// A value as channel text: strings as they are, numbers and booleans printed, `null` none,
/// anything else as compact JSON.
fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        other => Some(other.to_string()),
    }
}

/// Cache of entity → key columns in order (from `weir.relations`), for composite keys.
pub(crate) type KeyColumns = BTreeMap<String, Arc<[String]>>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn channel_names() {
        assert!(Channel::parse("").is_err());
        assert!(Channel::parse("/").is_err());
        assert!(Channel::parse("a//b").is_err());
        assert!(Channel::parse("a/b/c/d").is_err());
        assert_eq!(Channel::parse("processed").unwrap(), Channel::Processed);
        assert_eq!(
            Channel::parse("posts/42/comments").unwrap(),
            Channel::Change { name: "posts/42/comments".into(), entity: "comments".into() }
        );
        assert_eq!(
            Channel::parse("sales.orders/7").unwrap(),
            Channel::Change { name: "sales.orders/7".into(), entity: "sales.orders".into() }
        );
        let list = parse_channels(["posts,posts/1/comments", "orders/7,2", "posts"]).unwrap();
        let names: Vec<String> = list
            .iter()
            .map(|c| match c {
                Channel::Processed => "processed".into(),
                Channel::Change { name, .. } => name.to_string(),
            })
            .collect();
        assert_eq!(names, ["posts", "posts/1/comments", "orders/7,2"]);
        assert!(parse_channels(std::iter::empty()).is_err());
        assert!(parse_channels(["posts,"]).is_err());
    }

    #[test]
    fn cursors() {
        assert_eq!(GivenCursor::parse("").unwrap(), None);
        assert_eq!(
            GivenCursor::parse("12").unwrap(),
            Some(GivenCursor { change: 12, processed: None })
        );
        assert_eq!(
            GivenCursor::parse("12:3").unwrap(),
            Some(GivenCursor { change: 12, processed: Some(3) })
        );
        for bad in ["x", "-1", "1:", ":1", "1:2:3", "1.5", "99999999999999999999"] {
            assert!(GivenCursor::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Cursor { change: 5, processed: Some(2) }.to_string(), "5:2");
        assert_eq!(Cursor { change: 5, processed: None }.to_string(), "5");
    }

    fn event(entity: &str, key: Value, new_record: Value) -> Event {
        serde_json::from_value(json!({
            "position": 7, "lsn": "0/16B3748", "xid": 1, "commit_ts": "2024-01-01T00:00:00Z",
            "kind": "insert", "entity": entity,
            "source": {"db": "d", "schema": "public", "table": entity, "columns": {}},
            "key": key, "new_record": new_record,
        }))
        .unwrap()
    }

    #[test]
    fn a_slash_in_a_key_or_scope_value_makes_no_channel_of_another_shape() {
        let mut config = Config::default();
        config.channels.insert(
            "comments".into(),
            weir_core::ChannelConfig { scopes: [("post_id".into(), "posts".into())].into() },
        );
        let routing = Routing::new(&config);
        let every = |e: &Event| routing.channels_of(e, None);
        // Every name produced parses back to a channel of the event's entity.
        let check = |e: &Event, names: &[String]| {
            for n in names {
                match Channel::parse(n).unwrap() {
                    Channel::Change { entity, .. } => assert_eq!(&*entity, e.entity, "{n}"),
                    Channel::Processed => panic!("{n}"),
                }
            }
        };
        let post = event("posts", json!({"id": "5/comments"}), json!({"id": "5/comments"}));
        assert_eq!(every(&post), ["posts"]);
        let post = event("posts", json!({"id": "5"}), json!({"id": "5"}));
        assert_eq!(every(&post), ["posts", "posts/5"]);
        let comment = event("comments", json!({"id": 1}), json!({"id": 1, "post_id": "1/x"}));
        assert_eq!(every(&comment), ["comments", "comments/1"]);
        check(&comment, &every(&comment));
        let comment = event("comments", json!({"id": 1}), json!({"id": 1, "post_id": 3}));
        assert_eq!(every(&comment), ["comments", "comments/1", "posts/3/comments"]);
        let odd = event("a/b", json!({"id": 1}), json!({"id": 1}));
        assert!(every(&odd).is_empty());
    }

    #[test]
    fn channels_per_connection_are_capped() {
        let names: Vec<String> = (0..MAX_CHANNELS).map(|i| format!("t{i}")).collect();
        let joined = names.join(",");
        assert_eq!(parse_channels([joined.as_str(), "t0"]).unwrap().len(), MAX_CHANNELS);
        let err = parse_channels([joined.as_str(), "one_more"]).unwrap_err().to_string();
        assert!(err.contains("257") && err.contains("256"), "{err}");
    }

    #[test]
    fn keys() {
        assert_eq!(key_text(&json!({"id": 42}), None).as_deref(), Some("42"));
        assert_eq!(key_text(&json!({"id": "a"}), None).as_deref(), Some("a"));
        assert_eq!(key_text(&json!({}), None), None);
        let cols: Vec<String> = vec!["b".into(), "a".into()];
        assert_eq!(key_text(&json!({"a": 1, "b": 2}), Some(&cols)).as_deref(), Some("2,1"));
    }
}
