//! The replication connection: one module between weir and the wire.
//!
//! ```text
//! libpq ([`crate::libpq`]: auth, TLS, PG* variables, .pgpass)
//!   START_REPLICATION SLOT s LOGICAL <lsn> (proto_version '2', streaming 'on', messages 'true')
//!   ◄── CopyData 'w' XLogData {wal_start, wal_end, send_time, pgoutput bytes}  → Frame::Data
//!   ◄── CopyData 'k' keepalive {wal_end, send_time, reply_requested}            → Frame::Keepalive
//!   ──► CopyData 'r' standby status {written, flushed, applied}                 ← send_status
//! ```
//!
//! The transport is libpq's; decoding is ours ([`crate::pgoutput`]), and so is the decision of what to acknowledge: the flushed position we report is always a commit
//! LSN already stored in the log (see the `weir` crate's ingest module), never a keepalive
//! position while anything received is still unstored.
//!
//! `next` is cancel-safe: libpq keeps whatever arrived in its buffer, so it can sit in a
//! `select!` beside timers and the shutdown signal.
//!
//! Protocol: <https://www.postgresql.org/docs/current/protocol-replication.html>

use bytes::BufMut;
use bytes::{Buf, Bytes};
use weir_core::Lsn;

use crate::Error;
use crate::libpq::{Connection, PqError};

/// One message from the server.
#[derive(Debug, Clone)]
pub enum Frame {
    /// WAL data: one pgoutput message.
    Data {
        /// Where the message's WAL starts.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The pgoutput bytes.
        data: Bytes,
    },
    /// A keepalive: everything committed at or below `wal_end` has been sent before it.
    Keepalive {
        /// The server's send position.
        wal_end: Lsn,
        /// The server wants a status update now.
        reply_requested: bool,
    },
}

/// What to stream.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// pgoutput protocol version (2 for PostgreSQL 14 and 15, 4 from 16 on).
    pub protocol_version: u32,
}

/// A logical replication connection in streaming mode.
pub struct ReplicationStream {
    conn: Connection,
    options: StreamOptions,
    received: Lsn,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream").field("options", &self.options).finish()
    }
}

/// Builds the libpq connection string for replication from a `postgres://` URL (or from the
/// `PG*` environment when `url` is `None`), with the session settings our casts rely on.
pub fn replication_conninfo(url: Option<&str>, decoding_work_mem: &str) -> String {
    // `logical_decoding_work_mem` is per session: above it PostgreSQL streams a transaction
    // before it commits, which bounds what the walsender and weir hold for one transaction.
    let settings = [
        "DateStyle=ISO",
        "TimeZone=UTC",
        "IntervalStyle=iso_8601",
        "bytea_output=hex",
        "extra_float_digits=3",
        &format!("logical_decoding_work_mem={decoding_work_mem}"),
    ];
    match url {
        Some(u) => {
            let sep = if u.contains('?') { '&' } else { '?' };
            let opts: Vec<String> =
                settings.iter().map(|s| format!("-c%20{}", s.replace('=', "%3D"))).collect();
            format!("{u}{sep}replication=database&options={}", opts.join("%20"))
        }
        None => {
            let opts: Vec<String> = settings.iter().map(|s| format!("-c {s}")).collect();
            format!("replication=database options='{}'", opts.join(" "))
        }
    }
}

impl ReplicationStream {
    /// Connects and starts streaming from `start` (the slot's confirmed position when `start`
    /// is lower).
    pub async fn start(conninfo: &str, options: StreamOptions, start: Lsn) -> Result<Self, Error> {
        let mut conn = Connection::connect(conninfo).await.map_err(|e| classify(e, &options))?;
        let version = conn.server_version();
        let protocol = if version >= 160_000 { 4 } else { 2 };
        let options = StreamOptions {
            protocol_version: protocol.min(options.protocol_version.max(2)),
            ..options
        };
        conn.start_copy_both(&start_replication(&options, start))
            .await
            .map_err(|e| classify(e, &options))?;
        Ok(Self { conn, options, received: start })
    }

    /// The pgoutput protocol version in use.
    pub fn protocol_version(&self) -> u32 {
        self.options.protocol_version
    }

    /// The highest WAL position received so far.
    pub fn received(&self) -> Lsn {
        self.received
    }

    /// Waits for the next message. Cancel-safe.
    pub async fn next(&mut self) -> Result<Frame, Error> {
        loop {
            let mut data = self.conn.read().await.map_err(|e| classify(e, &self.options))?;
            if data.is_empty() {
                continue;
            }
            let tag = data.get_u8();
            match tag {
                b'w' if data.len() >= 24 => {
                    let wal_start = Lsn(data.get_u64());
                    let wal_end = Lsn(data.get_u64());
                    let _send_time = data.get_i64();
                    self.received = self.received.max(wal_end);
                    return Ok(Frame::Data { wal_start, wal_end, data });
                }
                b'k' if data.len() >= 17 => {
                    let wal_end = Lsn(data.get_u64());
                    let _send_time = data.get_i64();
                    let reply_requested = data.get_u8() == 1;
                    self.received = self.received.max(wal_end);
                    return Ok(Frame::Keepalive { wal_end, reply_requested });
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected replication message `{}` of {} bytes",
                        other as char,
                        data.len() + 1
                    )));
                }
            }
        }
    }

    /// Reports progress: `flushed` must be a position whose changes are durably in the log.
    pub async fn send_status(&mut self, flushed: Lsn) -> Result<(), Error> {
        let flushed = flushed.min(self.received).max(Lsn(1));
        let message = standby_status(self.received, flushed, std::time::SystemTime::now());
        self.conn.send(&message).await.map_err(|e| classify(e, &self.options))
    }
}

/// `START_REPLICATION SLOT "slot" LOGICAL X/Y (…)`, every name quoted.
fn start_replication(options: &StreamOptions, start: Lsn) -> String {
    let quote = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    // publication_names is a list of names inside one string literal.
    let publications = quote(&options.publication).replace('\'', "''");
    format!(
        "START_REPLICATION SLOT {} LOGICAL {start} (\"proto_version\" '{}', \
         \"publication_names\" '{publications}', \"streaming\" 'on', \"messages\" 'true')",
        quote(&options.slot),
        options.protocol_version,
    )
}

/// A standby status update: written and flushed positions (applied is the same as flushed),
/// the client's clock, and no reply requested.
fn standby_status(written: Lsn, flushed: Lsn, now: std::time::SystemTime) -> Vec<u8> {
    // Microseconds since 2000-01-01 00:00:00 UTC, PostgreSQL's epoch.
    const POSTGRES_EPOCH: std::time::Duration = std::time::Duration::from_secs(946_684_800);
    let since = now
        .duration_since(std::time::UNIX_EPOCH + POSTGRES_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let mut m = Vec::with_capacity(34);
    m.put_u8(b'r');
    m.put_u64(written.0);
    m.put_u64(flushed.0);
    m.put_u64(flushed.0);
    m.put_i64(since);
    m.put_u8(0);
    m
}

fn classify(e: PqError, options: &StreamOptions) -> Error {
    let text = e.to_string();
    let slot = options.slot.clone();
    match e.sqlstate.as_deref().unwrap_or("") {
        "42704" if text.contains("publication") => {
            Error::PublicationMissing { publication: options.publication.clone() }
        }
        "42704" => Error::SlotMissing { slot },
        "55000" if text.contains("does not exist") => Error::SlotMissing { slot },
        "55000" => Error::SlotInvalidated { slot, detail: text },
        "55006" => Error::SlotBusy { slot, detail: text },
        "28000" | "28P01" | "42501" | "3D000" => Error::Refused(text),
        // libpq's words for a certificate or TLS set-up it refused (not an `SSL SYSCALL
        // error`, which is a connection that dropped).
        _ if (text.contains("certificate") || text.contains("does not support SSL"))
            && !text.contains("SYSCALL") =>
        {
            Error::Tls(text)
        }
        // A refused connection carries no SQLSTATE, only the server's words.
        _ if e.connecting && refused_at_connect(&text) => Error::Refused(text),
        _ => Error::Disconnected(text),
    }
}

/// Whether libpq's message for a failed connection says that retrying will not help.
fn refused_at_connect(text: &str) -> bool {
    let text = text.to_lowercase();
    [
        "authentication failed",
        "no pg_hba.conf entry",
        "does not exist",
        "replication role",
        "permission denied",
        "invalid connection option",
        "invalid uri",
        "invalid sslmode",
        "missing \"=\"",
    ]
    .iter()
    .any(|words| text.contains(words))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_replication_quotes_names() {
        let options = StreamOptions {
            slot: "we\"ir".into(),
            publication: "it's".into(),
            protocol_version: 2,
        };
        assert_eq!(
            start_replication(&options, Lsn(0x1_0000_00A0)),
            "START_REPLICATION SLOT \"we\"\"ir\" LOGICAL 1/A0 (\"proto_version\" '2', \
             \"publication_names\" '\"it''s\"', \"streaming\" 'on', \"messages\" 'true')"
        );
    }

    #[test]
    fn standby_status_is_the_documented_layout() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(946_684_801);
        let m = standby_status(Lsn(7), Lsn(5), at);
        assert_eq!(m.len(), 34);
        assert_eq!(m[0], b'r');
        assert_eq!(&m[1..9], &7u64.to_be_bytes());
        assert_eq!(&m[9..17], &5u64.to_be_bytes());
        assert_eq!(&m[17..25], &5u64.to_be_bytes());
        assert_eq!(&m[25..33], &1_000_000i64.to_be_bytes());
        assert_eq!(m[33], 0);
    }

    #[test]
    fn conninfo_keeps_url_and_adds_replication() {
        let c = replication_conninfo(Some("postgres://u@h:5/db"), "16MB");
        assert!(c.starts_with("postgres://u@h:5/db?replication=database&options="), "{c}");
        let c = replication_conninfo(Some("postgres://u@h:5/db?sslmode=disable"), "16MB");
        assert!(c.contains("sslmode=disable&replication=database"), "{c}");
        assert!(replication_conninfo(None, "16MB").starts_with("replication=database"));
        assert!(c.contains("logical_decoding_work_mem%3D16MB"), "{c}");
    }
}
