//! Decoder of `pgoutput` messages, PostgreSQL's logical replication protocol, versions 1 to 4.
//!
//! Where it sits:
//!
//! ```text
//! replication stream (CopyData 'w' XLogData; its 25-byte header already stripped)
//!   │ payload: one pgoutput message
//!   ▼
//! pgoutput::Decoder::decode ──▶ Message ──▶ source assembles transactions
//!                                              │ cast::TypeRegistry::cast each column value
//!                                              ▼
//!                                           the event's JSON ──▶ log
//! ```
//!
//! The layouts are PostgreSQL's "Logical Replication Message Formats":
//! <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>.
//! Integers are big-endian, strings NUL-terminated.
//!
//! Invariants:
//! - [`Decoder::decode`] never panics, whatever the bytes: it returns a [`DecodeError`] naming
//!   the message and the field. A message must be consumed exactly; trailing bytes are an error,
//!   so a misreading (a missing or extra streamed xid) is caught at once rather than later.
//! - The only state is whether we are inside a `StreamStart` … `StreamStop` block. Inside it
//!   (protocol ≥ 2), `Relation`, `Type`, `Insert`, `Update`, `Delete`, `Truncate` and `Message`
//!   carry the (sub)transaction xid right after the tag byte; it is returned in
//!   [`Decoded::xid`]. A message that is rejected leaves the state unchanged.
//! - Column values are [`Bytes`] slices of the input: no copy. Allocation per message is the
//!   column vector and the strings (names, prefixes).
//! - Two-phase commit messages (`b`, `P`, `K`, `r`, `p`) are not requested (no `two_phase`
//!   option) and are rejected as [`DecodeError::Unsupported`].

use bytes::Bytes;

/// One pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `B`: a (non-streamed) transaction begins.
    Begin {
        /// LSN of the transaction's commit record.
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01 00:00:00 UTC.
        commit_ts: i64,
        /// Transaction id.
        xid: u32,
    },
    /// `C`: the transaction begun by the last `Begin` commits.
    Commit {
        /// Unused by PostgreSQL so far (always 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: u64,
        /// LSN just past the commit record: where to resume after this transaction.
        end_lsn: u64,
        /// Commit time, microseconds since 2000-01-01 00:00:00 UTC.
        commit_ts: i64,
    },
    /// `O`: the changes that follow were replicated from another node.
    Origin {
        /// Commit LSN on the origin server (0 when sent after `StreamStart`).
        lsn: u64,
        /// Name of the replication origin.
        name: String,
    },
    /// `R`: the description of a table, sent before its first change (and after it changed).
    Relation(Relation),
    /// `Y`: a non-builtin type used by a column, sent before the first `Relation` using it.
    Type {
        /// Type OID.
        oid: u32,
        /// Schema of the type; empty for `pg_catalog`.
        namespace: String,
        /// `pg_type.typname`.
        name: String,
    },
    /// `I`: a row was inserted.
    Insert {
        /// OID of the table, described by an earlier `Relation`.
        relation_id: u32,
        /// The new row, one value per column of the relation.
        new: Vec<ColumnValue>,
    },
    /// `U`: a row was updated.
    Update {
        /// OID of the table, described by an earlier `Relation`.
        relation_id: u32,
        /// The old row: its key if the key changed, the whole row with `REPLICA IDENTITY FULL`,
        /// absent otherwise.
        old: Option<OldTuple>,
        /// The new row.
        new: Vec<ColumnValue>,
    },
    /// `D`: a row was deleted.
    Delete {
        /// OID of the table, described by an earlier `Relation`.
        relation_id: u32,
        /// The deleted row's key, or the whole row with `REPLICA IDENTITY FULL`.
        old: OldTuple,
    },
    /// `T`: tables were truncated.
    Truncate {
        /// Bit 1: `CASCADE`, bit 2: `RESTART IDENTITY`.
        options: u8,
        /// OIDs of the truncated tables.
        relation_ids: Vec<u32>,
    },
    /// `M`: a logical decoding message (`pg_logical_emit_message`).
    Message {
        /// Whether the message is part of its transaction (else it was sent at once).
        transactional: bool,
        /// LSN of the message.
        lsn: u64,
        /// The prefix given to `pg_logical_emit_message`.
        prefix: String,
        /// The content, as bytes.
        content: Bytes,
    },
    /// `S`: a block of changes of an in-progress (streamed) transaction starts (protocol ≥ 2).
    StreamStart {
        /// Top-level transaction id.
        xid: u32,
        /// Whether this is the transaction's first block.
        first_segment: bool,
    },
    /// `E`: the current streamed block ends.
    StreamStop,
    /// `c`: a streamed transaction commits.
    StreamCommit {
        /// Top-level transaction id.
        xid: u32,
        /// Unused by PostgreSQL so far (always 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: u64,
        /// LSN just past the commit record.
        end_lsn: u64,
        /// Commit time, microseconds since 2000-01-01 00:00:00 UTC.
        commit_ts: i64,
    },
    /// `A`: a streamed (sub)transaction aborts: drop its changes.
    StreamAbort {
        /// Top-level transaction id.
        xid: u32,
        /// The aborted subtransaction; equal to `xid` when the whole transaction aborts.
        subxid: u32,
        /// LSN of the abort: protocol 4 with `streaming = parallel` only.
        abort_lsn: Option<u64>,
        /// Abort time, microseconds since 2000-01-01: protocol 4 with `streaming = parallel`
        /// only.
        abort_ts: Option<i64>,
    },
}

/// A table as described by a `Relation` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Table OID.
    pub id: u32,
    /// Schema; empty for `pg_catalog`.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// `pg_class.relreplident`: `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// The published columns, in the order of the tuples' values.
    pub columns: Vec<Column>,
}

/// A column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the key).
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// OID of the column's type.
    pub type_oid: u32,
    /// `atttypmod`: e.g. the length of a `varchar(n)`, -1 when none.
    pub type_modifier: i32,
}

/// The old row of an `Update` or `Delete`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: the replica identity columns only (the others are `Null`).
    Key(Vec<ColumnValue>),
    /// `O`: the whole row (`REPLICA IDENTITY FULL`).
    Full(Vec<ColumnValue>),
}

impl OldTuple {
    /// The values, whichever kind of tuple this is.
    pub fn values(&self) -> &[ColumnValue] {
        match self {
            OldTuple::Key(values) | OldTuple::Full(values) => values,
        }
    }
}

/// One column's value in a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value that was not sent; the value is unknown, not null.
    UnchangedToast,
    /// `t`: the type's text output, in the client encoding (UTF-8 for us).
    Text(Bytes),
    /// `b`: the type's binary send format (only with the `binary` option).
    Binary(Bytes),
}

/// A decoded message, with the xid it carried if it came inside a streamed block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The message.
    pub message: Message,
    /// The (sub)transaction xid that prefixes `Relation`, `Type`, `Insert`, `Update`,
    /// `Delete`, `Truncate` and `Message` between `StreamStart` and `StreamStop`; `None`
    /// outside a streamed block and for the other messages (whose xid, if any, is a field).
    pub xid: Option<u32>,
}

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message has no bytes at all.
    #[error("empty pgoutput message")]
    Empty,
    /// The first byte is not a pgoutput message tag.
    #[error("unknown pgoutput message tag {tag:#04x}")]
    UnknownTag {
        /// The tag byte.
        tag: u8,
    },
    /// A message weir does not request, such as the two-phase commit messages.
    #[error("pgoutput {message} message is not supported: {reason}")]
    Unsupported {
        /// The message's name.
        message: &'static str,
        /// Why it is not supported.
        reason: &'static str,
    },
    /// The message ends inside a field.
    #[error("pgoutput {message} message truncated: {field} at byte {offset} is incomplete")]
    Truncated {
        /// The message's name.
        message: &'static str,
        /// The field being read.
        field: &'static str,
        /// Where the field starts in the message.
        offset: usize,
    },
    /// A field has a value the protocol does not allow.
    #[error("pgoutput {message} message: invalid {field} at byte {offset}: {reason}")]
    Invalid {
        /// The message's name.
        message: &'static str,
        /// The field being read.
        field: &'static str,
        /// Where the field starts in the message.
        offset: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Bytes remain after the last field.
    #[error("pgoutput {message} message: {count} unexpected trailing bytes at byte {offset}")]
    TrailingBytes {
        /// The message's name.
        message: &'static str,
        /// Where the extra bytes start.
        offset: usize,
        /// How many bytes there are.
        count: usize,
    },
    /// A stream framing message at a place the protocol does not allow it.
    #[error("pgoutput {message} message out of sequence: {reason}")]
    OutOfSequence {
        /// The message's name.
        message: &'static str,
        /// What was expected.
        reason: &'static str,
    },
}

/// Decodes the pgoutput messages of one replication connection, in order.
#[derive(Debug, Clone)]
pub struct Decoder {
    protocol_version: u32,
    in_stream: bool,
}

impl Decoder {
    /// A decoder for `proto_version` `protocol_version` (1 to 4, as passed to
    /// `START_REPLICATION`), outside any streamed block.
    pub fn new(protocol_version: u32) -> Self {
        Self { protocol_version, in_stream: false }
    }

    /// The protocol version given to [`Decoder::new`].
    pub fn protocol_version(&self) -> u32 {
        self.protocol_version
    }

    /// Whether the last framing message was a `StreamStart` (not yet closed by `StreamStop`).
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Decodes one message: the payload of one XLogData.
    pub fn decode(&mut self, data: Bytes) -> Result<Decoded, DecodeError> {
        let Some(&tag) = data.first() else {
            return Err(DecodeError::Empty);
        };
        let name = tag_name(tag).ok_or(DecodeError::UnknownTag { tag })?;
        let mut r = Reader { data: &data, pos: 1, message: name };
        let mut xid = None;
        let message = match tag {
            b'B' => {
                self.outside_stream(name)?;
                let final_lsn = r.u64("final_lsn")?;
                let commit_ts = r.i64("commit_ts")?;
                let xid = r.u32("xid")?;
                Message::Begin { final_lsn, commit_ts, xid }
            }
            b'C' => {
                self.outside_stream(name)?;
                let flags = r.u8("flags")?;
                let commit_lsn = r.u64("commit_lsn")?;
                let end_lsn = r.u64("end_lsn")?;
                let commit_ts = r.i64("commit_ts")?;
                Message::Commit { flags, commit_lsn, end_lsn, commit_ts }
            }
            b'O' => {
                let lsn = r.u64("lsn")?;
                let name = r.string("name")?;
                Message::Origin { lsn, name }
            }
            b'R' => {
                xid = self.stream_xid(&mut r)?;
                Message::Relation(r.relation()?)
            }
            b'Y' => {
                xid = self.stream_xid(&mut r)?;
                let oid = r.u32("oid")?;
                let namespace = r.string("namespace")?;
                let name = r.string("name")?;
                Message::Type { oid, namespace, name }
            }
            b'I' => {
                xid = self.stream_xid(&mut r)?;
                let relation_id = r.u32("relation_id")?;
                r.expect_tuple_tag(b'N', "new tuple tag")?;
                let new = r.tuple("new tuple")?;
                Message::Insert { relation_id, new }
            }
            b'U' => {
                xid = self.stream_xid(&mut r)?;
                let relation_id = r.u32("relation_id")?;
                let offset = r.pos;
                let old = match r.u8("tuple tag")? {
                    b'K' => Some(OldTuple::Key(r.tuple("old key tuple")?)),
                    b'O' => Some(OldTuple::Full(r.tuple("old tuple")?)),
                    b'N' => None,
                    other => return Err(r.bad_tuple_tag("tuple tag", offset, other, "K, O or N")),
                };
                if old.is_some() {
                    r.expect_tuple_tag(b'N', "new tuple tag")?;
                }
                let new = r.tuple("new tuple")?;
                Message::Update { relation_id, old, new }
            }
            b'D' => {
                xid = self.stream_xid(&mut r)?;
                let relation_id = r.u32("relation_id")?;
                let offset = r.pos;
                let old = match r.u8("tuple tag")? {
                    b'K' => OldTuple::Key(r.tuple("old key tuple")?),
                    b'O' => OldTuple::Full(r.tuple("old tuple")?),
                    other => return Err(r.bad_tuple_tag("tuple tag", offset, other, "K or O")),
                };
                Message::Delete { relation_id, old }
            }
            b'T' => {
                xid = self.stream_xid(&mut r)?;
                let count = r.count32("relation count")?;
                let options = r.u8("options")?;
                // Each id takes 4 bytes: never reserve more than the message can hold.
                let mut relation_ids = Vec::with_capacity(count.min(r.remaining() / 4));
                for _ in 0..count {
                    relation_ids.push(r.u32("relation_id")?);
                }
                Message::Truncate { options, relation_ids }
            }
            b'M' => {
                xid = self.stream_xid(&mut r)?;
                let flags = r.u8("flags")?;
                let lsn = r.u64("lsn")?;
                let prefix = r.string("prefix")?;
                let len = r.count32("content length")?;
                let content = r.bytes(len, "content")?;
                Message::Message { transactional: flags & 1 != 0, lsn, prefix, content }
            }
            b'S' => {
                self.streaming_allowed(name)?;
                self.outside_stream(name)?;
                let xid = r.u32("xid")?;
                let first_segment = r.u8("first_segment")? == 1;
                Message::StreamStart { xid, first_segment }
            }
            b'E' => {
                self.streaming_allowed(name)?;
                if !self.in_stream {
                    return Err(DecodeError::OutOfSequence {
                        message: name,
                        reason: "StreamStop without a StreamStart",
                    });
                }
                Message::StreamStop
            }
            b'c' => {
                self.streaming_allowed(name)?;
                self.outside_stream(name)?;
                let xid = r.u32("xid")?;
                let flags = r.u8("flags")?;
                let commit_lsn = r.u64("commit_lsn")?;
                let end_lsn = r.u64("end_lsn")?;
                let commit_ts = r.i64("commit_ts")?;
                Message::StreamCommit { xid, flags, commit_lsn, end_lsn, commit_ts }
            }
            b'A' => {
                self.streaming_allowed(name)?;
                self.outside_stream(name)?;
                let xid = r.u32("xid")?;
                let subxid = r.u32("subxid")?;
                // Protocol 4 sends these only with `streaming = parallel`: the length tells.
                let (abort_lsn, abort_ts) = if self.protocol_version >= 4 && r.remaining() > 0 {
                    (Some(r.u64("abort_lsn")?), Some(r.i64("abort_ts")?))
                } else {
                    (None, None)
                };
                Message::StreamAbort { xid, subxid, abort_lsn, abort_ts }
            }
            b'b' | b'P' | b'K' | b'r' | b'p' => {
                return Err(DecodeError::Unsupported {
                    message: name,
                    reason: "two-phase commit messages are not requested (two_phase is off)",
                });
            }
            _ => return Err(DecodeError::UnknownTag { tag }),
        };
        r.finish()?;
        match message {
            Message::StreamStart { .. } => self.in_stream = true,
            Message::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(Decoded { message, xid })
    }

    /// Reads the xid that prefixes a change inside a streamed block.
    fn stream_xid(&self, r: &mut Reader<'_>) -> Result<Option<u32>, DecodeError> {
        if self.in_stream { r.u32("xid").map(Some) } else { Ok(None) }
    }

    fn outside_stream(&self, message: &'static str) -> Result<(), DecodeError> {
        if self.in_stream {
            return Err(DecodeError::OutOfSequence {
                message,
                reason: "inside a StreamStart..StreamStop block",
            });
        }
        Ok(())
    }

    fn streaming_allowed(&self, message: &'static str) -> Result<(), DecodeError> {
        if self.protocol_version < 2 {
            return Err(DecodeError::OutOfSequence {
                message,
                reason: "streaming messages need protocol version 2 or later",
            });
        }
        Ok(())
    }
}

/// The message name of a tag byte, as the PostgreSQL documentation calls it.
fn tag_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "StreamStart",
        b'E' => "StreamStop",
        b'c' => "StreamCommit",
        b'A' => "StreamAbort",
        b'b' => "BeginPrepare",
        b'P' => "Prepare",
        b'K' => "CommitPrepared",
        b'r' => "RollbackPrepared",
        b'p' => "StreamPrepare",
        _ => return None,
    })
}

/// A cursor over one message. `pos` never exceeds `data.len()`.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn rest(&self) -> &[u8] {
        self.data.get(self.pos..).unwrap_or_default()
    }

    fn truncated(&self, field: &'static str) -> DecodeError {
        DecodeError::Truncated { message: self.message, field, offset: self.pos }
    }

    fn invalid(&self, field: &'static str, offset: usize, reason: String) -> DecodeError {
        DecodeError::Invalid { message: self.message, field, offset, reason }
    }

    fn bad_tuple_tag(
        &self,
        field: &'static str,
        offset: usize,
        byte: u8,
        expected: &str,
    ) -> DecodeError {
        self.invalid(field, offset, format!("byte {byte:#04x}, expected {expected}"))
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        match self.rest().first_chunk::<N>() {
            Some(&bytes) => {
                self.pos += N;
                Ok(bytes)
            }
            None => Err(self.truncated(field)),
        }
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        self.array(field).map(i16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_be_bytes)
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    /// An Int32 count or length, which must not be negative.
    fn count32(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let n = self.i32(field)?;
        usize::try_from(n).map_err(|_| self.invalid(field, offset, format!("negative ({n})")))
    }

    /// An Int16 count, which must not be negative.
    fn count16(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let n = self.i16(field)?;
        usize::try_from(n).map_err(|_| self.invalid(field, offset, format!("negative ({n})")))
    }

    /// `len` bytes, sharing the message's buffer.
    fn bytes(&mut self, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(self.truncated(field));
        }
        let start = self.pos;
        self.pos += len;
        Ok(self.data.slice(start..self.pos))
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let rest = self.rest();
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(self.truncated(field));
        };
        let text = rest.get(..nul).unwrap_or_default();
        let text = std::str::from_utf8(text)
            .map_err(|e| self.invalid(field, self.pos, format!("not UTF-8: {e}")))?
            .to_owned();
        self.pos += nul + 1;
        Ok(text)
    }

    fn expect_tuple_tag(&mut self, tag: u8, field: &'static str) -> Result<(), DecodeError> {
        let offset = self.pos;
        let byte = self.u8(field)?;
        if byte != tag {
            return Err(self.bad_tuple_tag(field, offset, byte, &char::from(tag).to_string()));
        }
        Ok(())
    }

    /// TupleData: Int16 column count, then per column a kind byte and maybe a counted value.
    fn tuple(&mut self, field: &'static str) -> Result<Vec<ColumnValue>, DecodeError> {
        let count = self.count16(field)?;
        // Each column takes at least one byte: never reserve more than the message can hold.
        let mut values = Vec::with_capacity(count.min(self.remaining()));
        for _ in 0..count {
            let offset = self.pos;
            let value = match self.u8("column kind")? {
                b'n' => ColumnValue::Null,
                b'u' => ColumnValue::UnchangedToast,
                b't' => {
                    let len = self.count32("column length")?;
                    ColumnValue::Text(self.bytes(len, "column value")?)
                }
                b'b' => {
                    let len = self.count32("column length")?;
                    ColumnValue::Binary(self.bytes(len, "column value")?)
                }
                other => {
                    return Err(self.bad_tuple_tag("column kind", offset, other, "n, u, t or b"));
                }
            };
            values.push(value);
        }
        Ok(values)
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let id = self.u32("relation_id")?;
        let namespace = self.string("namespace")?;
        let name = self.string("name")?;
        let replica_identity = self.u8("replica_identity")?;
        let count = self.count16("column count")?;
        // A column takes at least 10 bytes (flags, empty name, type OID, modifier).
        let mut columns = Vec::with_capacity(count.min(self.remaining() / 10));
        for _ in 0..count {
            let flags = self.u8("column flags")?;
            let name = self.string("column name")?;
            let type_oid = self.u32("column type")?;
            let type_modifier = self.i32("column type modifier")?;
            columns.push(Column { is_key: flags & 1 != 0, name, type_oid, type_modifier });
        }
        Ok(Relation { id, namespace, name, replica_identity, columns })
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => {
                Err(DecodeError::TrailingBytes { message: self.message, offset: self.pos, count })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Encodes a message the way PostgreSQL's `proto.c` writes it. `xid` is the streamed-block
    /// prefix, written for the messages that carry it.
    fn encode(message: &Message, xid: Option<u32>) -> Vec<u8> {
        let mut out = Vec::new();
        let string = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        };
        let tuple = |out: &mut Vec<u8>, values: &[ColumnValue]| {
            out.extend_from_slice(&(values.len() as i16).to_be_bytes());
            for value in values {
                match value {
                    ColumnValue::Null => out.push(b'n'),
                    ColumnValue::UnchangedToast => out.push(b'u'),
                    ColumnValue::Text(b) | ColumnValue::Binary(b) => {
                        out.push(if matches!(value, ColumnValue::Text(_)) { b't' } else { b'b' });
                        out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                        out.extend_from_slice(b);
                    }
                }
            }
        };
        let old_tuple = |out: &mut Vec<u8>, old: &OldTuple| match old {
            OldTuple::Key(values) => {
                out.push(b'K');
                tuple(out, values);
            }
            OldTuple::Full(values) => {
                out.push(b'O');
                tuple(out, values);
            }
        };
        let with_xid = |out: &mut Vec<u8>, tag: u8| {
            out.push(tag);
            if let Some(xid) = xid {
                out.extend_from_slice(&xid.to_be_bytes());
            }
        };
        match message {
            Message::Begin { final_lsn, commit_ts, xid } => {
                out.push(b'B');
                out.extend_from_slice(&final_lsn.to_be_bytes());
                out.extend_from_slice(&commit_ts.to_be_bytes());
                out.extend_from_slice(&xid.to_be_bytes());
            }
            Message::Commit { flags, commit_lsn, end_lsn, commit_ts } => {
                out.push(b'C');
                out.push(*flags);
                out.extend_from_slice(&commit_lsn.to_be_bytes());
                out.extend_from_slice(&end_lsn.to_be_bytes());
                out.extend_from_slice(&commit_ts.to_be_bytes());
            }
            Message::Origin { lsn, name } => {
                out.push(b'O');
                out.extend_from_slice(&lsn.to_be_bytes());
                string(&mut out, name);
            }
            Message::Relation(rel) => {
                with_xid(&mut out, b'R');
                out.extend_from_slice(&rel.id.to_be_bytes());
                string(&mut out, &rel.namespace);
                string(&mut out, &rel.name);
                out.push(rel.replica_identity);
                out.extend_from_slice(&(rel.columns.len() as i16).to_be_bytes());
                for col in &rel.columns {
                    out.push(u8::from(col.is_key));
                    string(&mut out, &col.name);
                    out.extend_from_slice(&col.type_oid.to_be_bytes());
                    out.extend_from_slice(&col.type_modifier.to_be_bytes());
                }
            }
            Message::Type { oid, namespace, name } => {
                with_xid(&mut out, b'Y');
                out.extend_from_slice(&oid.to_be_bytes());
                string(&mut out, namespace);
                string(&mut out, name);
            }
            Message::Insert { relation_id, new } => {
                with_xid(&mut out, b'I');
                out.extend_from_slice(&relation_id.to_be_bytes());
                out.push(b'N');
                tuple(&mut out, new);
            }
            Message::Update { relation_id, old, new } => {
                with_xid(&mut out, b'U');
                out.extend_from_slice(&relation_id.to_be_bytes());
                if let Some(old) = old {
                    old_tuple(&mut out, old);
                }
                out.push(b'N');
                tuple(&mut out, new);
            }
            Message::Delete { relation_id, old } => {
                with_xid(&mut out, b'D');
                out.extend_from_slice(&relation_id.to_be_bytes());
                old_tuple(&mut out, old);
            }
            Message::Truncate { options, relation_ids } => {
                with_xid(&mut out, b'T');
                out.extend_from_slice(&(relation_ids.len() as i32).to_be_bytes());
                out.push(*options);
                for id in relation_ids {
                    out.extend_from_slice(&id.to_be_bytes());
                }
            }
            Message::Message { transactional, lsn, prefix, content } => {
                with_xid(&mut out, b'M');
                out.push(u8::from(*transactional));
                out.extend_from_slice(&lsn.to_be_bytes());
                string(&mut out, prefix);
                out.extend_from_slice(&(content.len() as i32).to_be_bytes());
                out.extend_from_slice(content);
            }
            Message::StreamStart { xid, first_segment } => {
                out.push(b'S');
                out.extend_from_slice(&xid.to_be_bytes());
                out.push(u8::from(*first_segment));
            }
            Message::StreamStop => out.push(b'E'),
            Message::StreamCommit { xid, flags, commit_lsn, end_lsn, commit_ts } => {
                out.push(b'c');
                out.extend_from_slice(&xid.to_be_bytes());
                out.push(*flags);
                out.extend_from_slice(&commit_lsn.to_be_bytes());
                out.extend_from_slice(&end_lsn.to_be_bytes());
                out.extend_from_slice(&commit_ts.to_be_bytes());
            }
            Message::StreamAbort { xid, subxid, abort_lsn, abort_ts } => {
                out.push(b'A');
                out.extend_from_slice(&xid.to_be_bytes());
                out.extend_from_slice(&subxid.to_be_bytes());
                if let (Some(lsn), Some(ts)) = (abort_lsn, abort_ts) {
                    out.extend_from_slice(&lsn.to_be_bytes());
                    out.extend_from_slice(&ts.to_be_bytes());
                }
            }
        }
        out
    }

    /// Whether the message takes the streamed-block xid prefix.
    fn carries_xid(message: &Message) -> bool {
        matches!(
            message,
            Message::Relation(_)
                | Message::Type { .. }
                | Message::Insert { .. }
                | Message::Update { .. }
                | Message::Delete { .. }
                | Message::Truncate { .. }
                | Message::Message { .. }
        )
    }

    /// A protocol-4 decoder in the state a message needs: inside a block for a streamed change
    /// (`xid` given) and for `StreamStop`, outside otherwise.
    fn decoder_for(message: &Message, xid: Option<u32>) -> Decoder {
        let mut decoder = Decoder::new(4);
        decoder.in_stream = matches!(message, Message::StreamStop) || xid.is_some();
        decoder
    }

    fn text(s: &str) -> ColumnValue {
        ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// One valid message of every kind, with the streamed xid where it is a streamed change.
    fn samples() -> Vec<(Message, Option<u32>)> {
        let relation = Relation {
            id: 16384,
            namespace: "public".into(),
            name: "users".into(),
            replica_identity: b'd',
            columns: vec![
                Column { is_key: true, name: "id".into(), type_oid: 23, type_modifier: -1 },
                Column { is_key: false, name: "name".into(), type_oid: 1043, type_modifier: 68 },
            ],
        };
        vec![
            (
                Message::Begin { final_lsn: 0x16_B374_D848, commit_ts: 767_000_000_000, xid: 742 },
                None,
            ),
            (
                Message::Commit {
                    flags: 0,
                    commit_lsn: 0x16_B374_D848,
                    end_lsn: 0x16_B374_D878,
                    commit_ts: 767_000_000_000,
                },
                None,
            ),
            (Message::Origin { lsn: 42, name: "node_a".into() }, None),
            (Message::Relation(relation.clone()), None),
            (Message::Relation(relation), Some(900)),
            (Message::Type { oid: 16390, namespace: "public".into(), name: "mood".into() }, None),
            (Message::Insert { relation_id: 16384, new: vec![text("1"), text("ann")] }, None),
            (
                Message::Insert { relation_id: 16384, new: vec![text("2"), ColumnValue::Null] },
                Some(901),
            ),
            (
                Message::Update {
                    relation_id: 16384,
                    old: Some(OldTuple::Key(vec![text("1"), ColumnValue::Null])),
                    new: vec![text("3"), ColumnValue::UnchangedToast],
                },
                None,
            ),
            (
                Message::Update {
                    relation_id: 16384,
                    old: Some(OldTuple::Full(vec![text("1"), text("ann")])),
                    new: vec![text("1"), ColumnValue::Binary(Bytes::from_static(&[0, 0xff, 7]))],
                },
                Some(902),
            ),
            (
                Message::Update { relation_id: 16384, old: None, new: vec![text("1"), text("")] },
                None,
            ),
            (
                Message::Delete {
                    relation_id: 16384,
                    old: OldTuple::Key(vec![text("1"), ColumnValue::Null]),
                },
                None,
            ),
            (
                Message::Delete {
                    relation_id: 16384,
                    old: OldTuple::Full(vec![text("1"), text("ann")]),
                },
                Some(903),
            ),
            (Message::Truncate { options: 3, relation_ids: vec![16384, 16390] }, None),
            (
                Message::Message {
                    transactional: true,
                    lsn: 77,
                    prefix: "weir".into(),
                    content: Bytes::from_static(b"{\"a\":1}"),
                },
                Some(904),
            ),
            (
                Message::Message {
                    transactional: false,
                    lsn: 78,
                    prefix: "p".into(),
                    content: Bytes::new(),
                },
                None,
            ),
            (Message::StreamStart { xid: 900, first_segment: true }, None),
            (Message::StreamStop, None),
            (
                Message::StreamCommit {
                    xid: 900,
                    flags: 0,
                    commit_lsn: 100,
                    end_lsn: 120,
                    commit_ts: -5,
                },
                None,
            ),
            (Message::StreamAbort { xid: 900, subxid: 901, abort_lsn: None, abort_ts: None }, None),
            (
                Message::StreamAbort {
                    xid: 900,
                    subxid: 900,
                    abort_lsn: Some(130),
                    abort_ts: Some(767_000_000_001),
                },
                None,
            ),
        ]
    }

    #[test]
    fn decodes_every_message_kind() {
        for (message, xid) in samples() {
            let bytes = encode(&message, xid);
            let decoded = decoder_for(&message, xid).decode(Bytes::from(bytes)).unwrap();
            assert_eq!(decoded, Decoded { message, xid });
        }
    }

    #[test]
    fn decodes_hand_built_bytes() {
        // A streamed Insert: tag, xid, relation id, 'N', 3 columns: text "42", null, binary.
        let mut bytes = vec![b'I', 0, 0, 3, 0x84, 0, 0, 0x40, 0x00, b'N', 0, 3];
        bytes.extend_from_slice(&[b't', 0, 0, 0, 2, b'4', b'2', b'n', b'b', 0, 0, 0, 1, 9]);
        let mut decoder = Decoder::new(2);
        decoder.in_stream = true;
        let decoded = decoder.decode(Bytes::from(bytes)).unwrap();
        assert_eq!(decoded.xid, Some(900));
        assert_eq!(
            decoded.message,
            Message::Insert {
                relation_id: 16384,
                new: vec![
                    text("42"),
                    ColumnValue::Null,
                    ColumnValue::Binary(Bytes::from_static(&[9]))
                ],
            }
        );

        // The same Insert outside a block has no xid.
        let bytes = [b'I', 0, 0, 0x40, 0x00, b'N', 0, 1, b'u'];
        let decoded = Decoder::new(1).decode(Bytes::copy_from_slice(&bytes)).unwrap();
        assert_eq!(decoded.xid, None);
        assert_eq!(
            decoded.message,
            Message::Insert { relation_id: 16384, new: vec![ColumnValue::UnchangedToast] }
        );
    }

    #[test]
    fn stream_blocks_set_the_state() {
        let mut decoder = Decoder::new(2);
        let start = encode(&Message::StreamStart { xid: 7, first_segment: false }, None);
        let decoded = decoder.decode(Bytes::from(start.clone())).unwrap();
        assert_eq!(decoded.message, Message::StreamStart { xid: 7, first_segment: false });
        assert!(decoder.in_stream());

        // Inside the block, a Truncate carries the xid.
        let truncate = Message::Truncate { options: 0, relation_ids: vec![1] };
        let decoded = decoder.decode(Bytes::from(encode(&truncate, Some(7)))).unwrap();
        assert_eq!(decoded, Decoded { message: truncate, xid: Some(7) });

        // Origin inside a block (sent right after StreamStart) has no xid.
        let origin = Message::Origin { lsn: 0, name: "o".into() };
        let decoded = decoder.decode(Bytes::from(encode(&origin, None))).unwrap();
        assert_eq!(decoded, Decoded { message: origin, xid: None });

        // Nested StreamStart, Begin or Commit inside a block are rejected, state unchanged.
        assert!(matches!(
            decoder.decode(Bytes::from(start.clone())),
            Err(DecodeError::OutOfSequence { message: "StreamStart", .. })
        ));
        let begin = encode(&Message::Begin { final_lsn: 1, commit_ts: 2, xid: 3 }, None);
        assert!(matches!(
            decoder.decode(Bytes::from(begin)),
            Err(DecodeError::OutOfSequence { message: "Begin", .. })
        ));
        assert!(decoder.in_stream());

        decoder.decode(Bytes::from_static(b"E")).unwrap();
        assert!(!decoder.in_stream());
        assert!(matches!(
            decoder.decode(Bytes::from_static(b"E")),
            Err(DecodeError::OutOfSequence { message: "StreamStop", .. })
        ));

        // Protocol 1 has no streaming.
        assert!(matches!(
            Decoder::new(1).decode(Bytes::from(start)),
            Err(DecodeError::OutOfSequence { message: "StreamStart", .. })
        ));
    }

    #[test]
    fn stream_abort_fields_of_protocol_4() {
        let abort =
            Message::StreamAbort { xid: 1, subxid: 2, abort_lsn: Some(3), abort_ts: Some(4) };
        let bytes = Bytes::from(encode(&abort, None));
        assert_eq!(Decoder::new(4).decode(bytes.clone()).unwrap().message, abort);
        // Protocol 2 and 3 never send them: 16 extra bytes are trailing garbage.
        assert!(matches!(
            Decoder::new(3).decode(bytes),
            Err(DecodeError::TrailingBytes { message: "StreamAbort", offset: 9, count: 16 })
        ));
    }

    #[test]
    fn truncation_at_every_offset_is_an_error() {
        for (message, xid) in samples() {
            let bytes = encode(&message, xid);
            for cut in 0..bytes.len() {
                // The protocol 4 abort fields are optional: the short form is complete.
                if matches!(message, Message::StreamAbort { .. }) && cut == 9 {
                    continue;
                }
                let result =
                    decoder_for(&message, xid).decode(Bytes::copy_from_slice(&bytes[..cut]));
                assert!(result.is_err(), "{message:?} cut at {cut} decoded as {result:?}");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for (message, xid) in samples() {
            let mut bytes = encode(&message, xid);
            bytes.push(0);
            let result = decoder_for(&message, xid).decode(Bytes::from(bytes));
            assert!(result.is_err(), "{message:?} with a trailing byte decoded as {result:?}");
        }
    }

    #[test]
    fn errors_name_the_message_and_field() {
        let mut decoder = Decoder::new(4);
        assert!(matches!(decoder.decode(Bytes::new()), Err(DecodeError::Empty)));
        assert!(matches!(
            decoder.decode(Bytes::from_static(b"Z")),
            Err(DecodeError::UnknownTag { tag: b'Z' })
        ));
        for tag in [b'b', b'P', b'K', b'r', b'p'] {
            let err = decoder.decode(Bytes::copy_from_slice(&[tag, 0, 0])).unwrap_err();
            assert!(matches!(err, DecodeError::Unsupported { .. }), "{err}");
        }
        let err = decoder.decode(Bytes::from_static(b"B\0\0")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pgoutput Begin message truncated: final_lsn at byte 1 is incomplete"
        );
        // Negative text length.
        let err = decoder
            .decode(Bytes::from_static(&[
                b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0xff, 0xff, 0xff, 0xff,
            ]))
            .unwrap_err();
        assert!(
            matches!(err, DecodeError::Invalid { field: "column length", offset: 9, .. }),
            "{err}"
        );
        // Unknown column kind.
        let err =
            decoder.decode(Bytes::from_static(&[b'I', 0, 0, 0, 1, b'N', 0, 1, b'x'])).unwrap_err();
        assert!(
            matches!(err, DecodeError::Invalid { field: "column kind", offset: 8, .. }),
            "{err}"
        );
        // Delete needs an old tuple.
        let err = decoder.decode(Bytes::from_static(&[b'D', 0, 0, 0, 1, b'N', 0, 0])).unwrap_err();
        assert!(matches!(err, DecodeError::Invalid { field: "tuple tag", .. }), "{err}");
        // Names must be UTF-8.
        let err = decoder
            .decode(Bytes::from_static(&[b'O', 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0]))
            .unwrap_err();
        assert!(matches!(err, DecodeError::Invalid { field: "name", .. }), "{err}");
    }

    #[test]
    fn column_values_share_the_input_buffer() {
        let bytes = Bytes::from(encode(
            &Message::Insert { relation_id: 1, new: vec![text("hello")] },
            None,
        ));
        let range = bytes.as_ptr_range();
        let Message::Insert { new, .. } = Decoder::new(1).decode(bytes.clone()).unwrap().message
        else {
            panic!("not an insert");
        };
        let ColumnValue::Text(value) = &new[0] else { panic!("not text") };
        assert!(range.contains(&value.as_ptr()));
    }

    fn name() -> impl Strategy<Value = String> {
        "[^\u{0}]{0,12}"
    }

    fn column_value() -> impl Strategy<Value = ColumnValue> {
        prop_oneof![
            Just(ColumnValue::Null),
            Just(ColumnValue::UnchangedToast),
            proptest::collection::vec(any::<u8>(), 0..20)
                .prop_map(|v| ColumnValue::Text(Bytes::from(v))),
            proptest::collection::vec(any::<u8>(), 0..20)
                .prop_map(|v| ColumnValue::Binary(Bytes::from(v))),
        ]
    }

    fn tuple() -> impl Strategy<Value = Vec<ColumnValue>> {
        proptest::collection::vec(column_value(), 0..8)
    }

    fn old_tuple() -> impl Strategy<Value = OldTuple> {
        prop_oneof![tuple().prop_map(OldTuple::Key), tuple().prop_map(OldTuple::Full)]
    }

    fn message() -> impl Strategy<Value = Message> {
        let column = (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(
            |(is_key, name, type_oid, type_modifier)| Column {
                is_key,
                name,
                type_oid,
                type_modifier,
            },
        );
        let relation =
            (any::<u32>(), name(), name(), any::<u8>(), proptest::collection::vec(column, 0..6))
                .prop_map(|(id, namespace, name, replica_identity, columns)| {
                    Message::Relation(Relation { id, namespace, name, replica_identity, columns })
                });
        prop_oneof![
            (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_ts, xid)| {
                Message::Begin { final_lsn, commit_ts, xid }
            }),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_ts)| Message::Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_ts
                }
            ),
            (any::<u64>(), name()).prop_map(|(lsn, name)| Message::Origin { lsn, name }),
            relation,
            (any::<u32>(), name(), name()).prop_map(|(oid, namespace, name)| Message::Type {
                oid,
                namespace,
                name
            }),
            (any::<u32>(), tuple())
                .prop_map(|(relation_id, new)| Message::Insert { relation_id, new }),
            (any::<u32>(), proptest::option::of(old_tuple()), tuple())
                .prop_map(|(relation_id, old, new)| Message::Update { relation_id, old, new }),
            (any::<u32>(), old_tuple())
                .prop_map(|(relation_id, old)| Message::Delete { relation_id, old }),
            (any::<u8>(), proptest::collection::vec(any::<u32>(), 0..6))
                .prop_map(|(options, relation_ids)| Message::Truncate { options, relation_ids }),
            (any::<bool>(), any::<u64>(), name(), proptest::collection::vec(any::<u8>(), 0..30))
                .prop_map(|(transactional, lsn, prefix, content)| Message::Message {
                    transactional,
                    lsn,
                    prefix,
                    content: Bytes::from(content),
                }),
            (any::<u32>(), any::<bool>())
                .prop_map(|(xid, first_segment)| Message::StreamStart { xid, first_segment }),
            Just(Message::StreamStop),
            (any::<u32>(), any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
                |(xid, flags, commit_lsn, end_lsn, commit_ts)| Message::StreamCommit {
                    xid,
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_ts,
                }
            ),
            (any::<u32>(), any::<u32>(), proptest::option::of((any::<u64>(), any::<i64>())))
                .prop_map(|(xid, subxid, parallel)| Message::StreamAbort {
                    xid,
                    subxid,
                    abort_lsn: parallel.map(|p| p.0),
                    abort_ts: parallel.map(|p| p.1),
                }),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(message in message(), xid in proptest::option::of(any::<u32>())) {
            let xid = xid.filter(|_| carries_xid(&message));
            let bytes = Bytes::from(encode(&message, xid));
            let decoded = decoder_for(&message, xid).decode(bytes).unwrap();
            prop_assert_eq!(decoded, Decoded { message, xid });
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            version in 1u32..=4,
            in_stream in any::<bool>(),
        ) {
            let mut decoder = Decoder::new(version);
            decoder.in_stream = in_stream && version >= 2;
            let _ = decoder.decode(Bytes::from(bytes));
        }

        #[test]
        fn mutated_messages_never_panic(
            index in 0usize..21,
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            // Valid messages with a few bytes changed reach deeper than random bytes do.
            let samples = samples();
            let (message, xid) = &samples[index % samples.len()];
            let mut bytes = encode(message, *xid);
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            let _ = decoder_for(message, *xid).decode(Bytes::from(bytes));
        }
    }
}
