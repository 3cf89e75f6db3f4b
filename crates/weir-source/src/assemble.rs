//! Turning decoded pgoutput messages into committed transactions of changes.
//!
//! ```text
//! Decoder ─► Assembler::push(frame)
//!   Begin … Insert/Update/Delete/Truncate/Message … Commit   ─► Output::Commit(Transaction)
//!   StreamStart(xid) … changes … StreamStop                   ─► Output::Stage{xid, changes}
//!                                                                (every STAGE_CHUNK changes too)
//!   StreamAbort(xid, subxid)                                  ─► Output::Abort
//!   StreamCommit(xid)                                         ─► Output::Commit(staged: true)
//!   Relation                                                  ─► Output::RelationSeen
//! ```
//!
//! Invariants:
//! - Changes keep their WAL order inside a transaction; transactions come out in commit order.
//! - A streamed transaction never sits in memory: its changes leave in chunks to be staged.
//! - Nothing leaves as committed that was not committed: streamed changes are only staged until
//!   their `StreamCommit`, and an aborted (sub)transaction's staged changes are discarded.
//! - An unchanged TOAST value is never turned into `null`: the column is left out of
//!   `new_record` and named in `unchanged_toast` (or, when `REPLICA IDENTITY FULL` sent the old
//!   row, filled from it — the value did not change).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use weir_core::{Change, Event, Kind, Lsn, Source, Transaction};

use crate::Error;
use crate::cast::TypeRegistry;
use crate::pgoutput::{ColumnValue, Decoder, Message, OldTuple};

/// Changes of a streamed transaction are handed out for staging at least this often.
pub const STAGE_CHUNK: usize = 2_000;

/// What the assembler produces, in the order it must be applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A committed transaction. Its `changes` may be empty (nothing published changed).
    Commit(Transaction),
    /// Changes of the in-progress transaction `xid` to stage, each with its (sub)xid,
    /// numbered from `first_seq` in WAL order.
    Stage {
        /// Top-level transaction.
        xid: u32,
        /// Sequence number of the first change.
        first_seq: i64,
        /// The changes with the (sub)transaction that made each.
        changes: Vec<(u32, Change)>,
    },
    /// A streamed transaction (`subxid == None`) or one of its subtransactions aborted.
    Abort {
        /// Top-level transaction.
        xid: u32,
        /// The aborted subtransaction, when only it aborted.
        subxid: Option<u32>,
    },
    /// A table was described (first use, or its shape changed).
    RelationSeen {
        /// Table OID.
        relation_id: u32,
        /// Schema.
        schema: String,
        /// Table.
        table: String,
        /// `REPLICA IDENTITY FULL`: every column is flagged as key, so the caller should tell
        /// [`Assembler::set_primary_key`] the real primary key.
        full_identity: bool,
    },
}

#[derive(Debug)]
struct RelInfo {
    source: Arc<Source>,
    entity: String,
    names: Vec<String>,
    oids: Vec<u32>,
    key_idx: Vec<usize>,
}

#[derive(Debug)]
struct OpenTxn {
    xid: u32,
    changes: Vec<Change>,
}

/// The prefix of the logical messages a backfill writes around each chunk it reads (its low
/// and high watermarks). They always reach the log writer, whatever `message_prefix` is, and
/// never become events.
pub const WATERMARK_PREFIX: &str = "weir-backfill";

/// Assembles decoded messages into transactions. One per replication connection.
#[derive(Debug)]
pub struct Assembler {
    decoder: Decoder,
    types: TypeRegistry,
    relations: HashMap<u32, RelInfo>,
    message_prefix: String,
    db: String,
    open: Option<OpenTxn>,
    /// Streamed transactions in progress → next sequence number.
    streams: HashMap<u32, i64>,
    /// The streamed block being received.
    stream_xid: Option<u32>,
    pending: Vec<(u32, Change)>,
}

impl Assembler {
    /// An assembler for `protocol_version`, turning logical messages whose prefix is
    /// `message_prefix` (or starts with `<message_prefix>.`) into `message` events.
    pub fn new(protocol_version: u32, message_prefix: &str, db: &str) -> Self {
        Self {
            decoder: Decoder::new(protocol_version),
            types: TypeRegistry::new(),
            relations: HashMap::new(),
            message_prefix: message_prefix.to_string(),
            db: db.to_string(),
            open: None,
            streams: HashMap::new(),
            stream_xid: None,
            pending: Vec::new(),
        }
    }

    /// No transaction is open and no streamed transaction is in progress: everything received
    /// has been handed out as output.
    pub fn is_idle(&self) -> bool {
        self.open.is_none() && self.streams.is_empty() && self.stream_xid.is_none()
    }

    /// Uses `columns` as the key of `relation_id` (for `REPLICA IDENTITY FULL` tables, whose
    /// Relation message flags every column). Unknown names are ignored.
    pub fn set_primary_key(&mut self, relation_id: u32, columns: &[String]) {
        if let Some(rel) = self.relations.get_mut(&relation_id) {
            let idx: Vec<usize> =
                columns.iter().filter_map(|c| rel.names.iter().position(|n| n == c)).collect();
            if !idx.is_empty() {
                rel.key_idx = idx;
            }
        }
    }

    /// Feeds one pgoutput message (the payload of an XLogData frame ending at `wal_end`).
    pub fn push(&mut self, data: Bytes, out: &mut Vec<Output>) -> Result<(), Error> {
        let decoded = self.decoder.decode(data)?;
        let subxid = decoded.xid;
        match decoded.message {
            Message::Begin { xid, .. } => {
                if self.open.is_some() {
                    return Err(Error::Sequence(format!(
                        "Begin of {xid} inside an open transaction"
                    )));
                }
                self.open = Some(OpenTxn { xid, changes: Vec::new() });
            }
            Message::Commit { end_lsn, commit_ts, .. } => {
                let open = self
                    .open
                    .take()
                    .ok_or_else(|| Error::Sequence("Commit without Begin".into()))?;
                out.push(Output::Commit(Transaction {
                    xid: open.xid,
                    commit_lsn: Lsn(end_lsn),
                    commit_ts: pg_time(commit_ts),
                    changes: open.changes,
                    staged: false,
                }));
            }
            Message::Origin { .. } => {}
            Message::Relation(r) => {
                let schema =
                    if r.namespace.is_empty() { "pg_catalog".to_string() } else { r.namespace };
                let mut columns = Map::new();
                for c in &r.columns {
                    columns.insert(c.name.clone(), Value::String(self.types.type_name(c.type_oid)));
                }
                let full = r.replica_identity == b'f';
                let key_idx = r
                    .columns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.is_key)
                    .map(|(i, _)| i)
                    .collect();
                let info = RelInfo {
                    entity: Event::entity_name(&schema, &r.name),
                    source: Arc::new(Source {
                        db: self.db.clone(),
                        schema: schema.clone(),
                        table: r.name.clone(),
                        columns,
                    }),
                    names: r.columns.iter().map(|c| c.name.clone()).collect(),
                    oids: r.columns.iter().map(|c| c.type_oid).collect(),
                    key_idx,
                };
                self.relations.insert(r.id, info);
                out.push(Output::RelationSeen {
                    relation_id: r.id,
                    schema,
                    table: r.name,
                    full_identity: full,
                });
            }
            Message::Type { oid, namespace, name } => self.types.learn(oid, &namespace, &name),
            Message::Insert { relation_id, new } => {
                let rel = self.relation(relation_id)?;
                let (record, toast) = self.record(rel, &new, None);
                let key = key_of(rel, &record);
                // The event store's appends are inserts into one table; the log calls them so.
                let kind =
                    if rel.entity == Event::STREAM_EVENTS { Kind::Append } else { Kind::Insert };
                let change = Change {
                    kind,
                    entity: rel.entity.clone(),
                    relation: Some(rel.source.clone()),
                    key,
                    new_record: Some(Value::Object(record)),
                    old_record: None,
                    changes: None,
                    unchanged_toast: toast,
                };
                self.emit(subxid, change, out)?;
            }
            Message::Update { relation_id, old, new } => {
                let rel = self.relation(relation_id)?;
                let old_full = match &old {
                    Some(OldTuple::Full(values)) => Some(self.record(rel, values, None).0),
                    _ => None,
                };
                let (record, toast) = self.record(rel, &new, old_full.as_ref());
                let old_record = match &old {
                    Some(OldTuple::Full(_)) => old_full.clone().map(Value::Object),
                    Some(OldTuple::Key(values)) => {
                        Some(Value::Object(self.key_record(rel, values)))
                    }
                    None => Some(key_of(rel, &record)),
                };
                let changes = old_full.as_ref().map(|old| {
                    let mut diff = Map::new();
                    for (name, new_value) in &record {
                        let old_value = old.get(name).cloned().unwrap_or(Value::Null);
                        if &old_value != new_value {
                            diff.insert(
                                name.clone(),
                                json!({"old_value": old_value, "new_value": new_value}),
                            );
                        }
                    }
                    Value::Object(diff)
                });
                let change = Change {
                    kind: Kind::Update,
                    entity: rel.entity.clone(),
                    relation: Some(rel.source.clone()),
                    key: key_of(rel, &record),
                    new_record: Some(Value::Object(record)),
                    old_record,
                    changes,
                    unchanged_toast: toast,
                };
                self.emit(subxid, change, out)?;
            }
            Message::Delete { relation_id, old } => {
                let rel = self.relation(relation_id)?;
                let old_record = match &old {
                    OldTuple::Full(values) => self.record(rel, values, None).0,
                    OldTuple::Key(values) => self.key_record(rel, values),
                };
                let change = Change {
                    kind: Kind::Delete,
                    entity: rel.entity.clone(),
                    relation: Some(rel.source.clone()),
                    key: key_of(rel, &old_record),
                    new_record: None,
                    old_record: Some(Value::Object(old_record)),
                    changes: None,
                    unchanged_toast: Vec::new(),
                };
                self.emit(subxid, change, out)?;
            }
            Message::Truncate { options, relation_ids } => {
                for id in relation_ids {
                    let rel = self.relation(id)?;
                    let change = Change {
                        kind: Kind::Truncate,
                        entity: rel.entity.clone(),
                        relation: Some(rel.source.clone()),
                        key: json!({}),
                        new_record: Some(json!({
                            "cascade": options & 1 != 0,
                            "restart_identity": options & 2 != 0,
                        })),
                        old_record: None,
                        changes: None,
                        unchanged_toast: Vec::new(),
                    };
                    self.emit(subxid, change, out)?;
                }
            }
            Message::Message { transactional, lsn, prefix, content } => {
                let ours = prefix == self.message_prefix
                    || prefix
                        .strip_prefix(&self.message_prefix)
                        .is_some_and(|r| r.starts_with('.'))
                    // A backfill's watermark: the log writer takes it out of the transaction.
                    || (prefix == WATERMARK_PREFIX && transactional);
                if !ours {
                    return Ok(());
                }
                let content = match std::str::from_utf8(&content) {
                    Ok(text) => {
                        json!({"prefix": prefix, "content": text, "transactional": transactional})
                    }
                    Err(_) => {
                        json!({"prefix": prefix, "content_hex": hex(&content), "transactional": transactional})
                    }
                };
                let change = Change {
                    kind: Kind::Message,
                    entity: prefix,
                    relation: None,
                    key: json!({}),
                    new_record: Some(content),
                    old_record: None,
                    changes: None,
                    unchanged_toast: Vec::new(),
                };
                if transactional {
                    self.emit(subxid, change, out)?;
                } else {
                    // Sent at once, outside any transaction: a transaction of its own at its LSN.
                    out.push(Output::Commit(Transaction {
                        xid: 0,
                        commit_lsn: Lsn(lsn.max(1)),
                        commit_ts: Utc::now(),
                        changes: vec![change],
                        staged: false,
                    }));
                }
            }
            Message::StreamStart { xid, first_segment } => {
                if first_segment || !self.streams.contains_key(&xid) {
                    self.streams.entry(xid).or_insert(0);
                }
                self.stream_xid = Some(xid);
            }
            Message::StreamStop => {
                self.flush_stage(out);
                self.stream_xid = None;
            }
            Message::StreamCommit { xid, end_lsn, commit_ts, .. } => {
                self.flush_stage(out);
                self.streams.remove(&xid);
                out.push(Output::Commit(Transaction {
                    xid,
                    commit_lsn: Lsn(end_lsn),
                    commit_ts: pg_time(commit_ts),
                    changes: Vec::new(),
                    staged: true,
                }));
            }
            Message::StreamAbort { xid, subxid, .. } => {
                self.flush_stage(out);
                if subxid == xid {
                    self.streams.remove(&xid);
                    out.push(Output::Abort { xid, subxid: None });
                } else {
                    out.push(Output::Abort { xid, subxid: Some(subxid) });
                }
            }
        }
        Ok(())
    }

    fn emit(
        &mut self,
        subxid: Option<u32>,
        change: Change,
        out: &mut Vec<Output>,
    ) -> Result<(), Error> {
        if let Some(xid) = self.stream_xid {
            self.pending.push((subxid.unwrap_or(xid), change));
            if self.pending.len() >= STAGE_CHUNK {
                self.flush_stage(out);
            }
            return Ok(());
        }
        match &mut self.open {
            Some(open) => {
                open.changes.push(change);
                Ok(())
            }
            None => {
                Err(Error::Sequence(format!("a {} change outside any transaction", change.kind)))
            }
        }
    }

    fn flush_stage(&mut self, out: &mut Vec<Output>) {
        let Some(xid) = self.stream_xid else { return };
        if self.pending.is_empty() {
            return;
        }
        let seq = self.streams.entry(xid).or_insert(0);
        let first_seq = *seq;
        *seq += self.pending.len() as i64;
        out.push(Output::Stage { xid, first_seq, changes: std::mem::take(&mut self.pending) });
    }

    fn relation(&self, id: u32) -> Result<&RelInfo, Error> {
        self.relations.get(&id).ok_or_else(|| {
            Error::Sequence(format!("a change for relation {id} before its Relation message"))
        })
    }

    /// The record of a tuple; unchanged TOAST columns are filled from `old` when known, else left
    /// out and returned by name.
    fn record(
        &self,
        rel: &RelInfo,
        values: &[ColumnValue],
        old: Option<&Map<String, Value>>,
    ) -> (Map<String, Value>, Vec<String>) {
        let mut record = Map::new();
        let mut toast = Vec::new();
        for (i, value) in values.iter().enumerate() {
            let Some(name) = rel.names.get(i) else { break };
            match value {
                ColumnValue::Null => {
                    record.insert(name.clone(), Value::Null);
                }
                ColumnValue::UnchangedToast => match old.and_then(|o| o.get(name)) {
                    Some(v) => {
                        record.insert(name.clone(), v.clone());
                    }
                    None => toast.push(name.clone()),
                },
                ColumnValue::Text(bytes) => {
                    let text = String::from_utf8_lossy(bytes);
                    record.insert(name.clone(), self.types.cast(rel.oids[i], &text));
                }
                ColumnValue::Binary(bytes) => {
                    record.insert(name.clone(), Value::String(hex(bytes)));
                }
            }
        }
        (record, toast)
    }

    fn key_record(&self, rel: &RelInfo, values: &[ColumnValue]) -> Map<String, Value> {
        let (all, _) = self.record(rel, values, None);
        rel.key_idx
            .iter()
            .filter_map(|&i| rel.names.get(i))
            .filter_map(|n| all.get(n).map(|v| (n.clone(), v.clone())))
            .collect()
    }
}

fn key_of(rel: &RelInfo, record: &Map<String, Value>) -> Value {
    Value::Object(
        rel.key_idx
            .iter()
            .filter_map(|&i| rel.names.get(i))
            .filter_map(|n| record.get(n).map(|v| (n.clone(), v.clone())))
            .collect(),
    )
}

/// Microseconds since 2000-01-01 UTC → a timestamp.
fn pg_time(us: i64) -> DateTime<Utc> {
    const PG_EPOCH_US: i64 = 946_684_800_000_000;
    DateTime::from_timestamp_micros(us.saturating_add(PG_EPOCH_US)).unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
