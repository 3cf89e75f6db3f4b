//! The crate's one error: what reading the replication slot can fail with.
//!
//! The connection's failures are classified for the ingest loop's policy ([`Error::is_transient`]:
//! reconnect with backoff, or stop with a message that says how to fix it); a message that does
//! not decode ([`DecodeError`], with the field and offset) or does not fit the stream's sequence
//! stops ingestion, since reading the same WAL again would fail the same way.

use crate::pgoutput::DecodeError;

/// What reading the replication slot can fail with: the connection (classified for the
/// caller's reconnect policy), or bytes that do not make a valid pgoutput stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The slot does not exist (dropped, or never created).
    #[error(
        "replication slot `{slot}` does not exist; run `weir init` to create it (if it was \
         dropped while weir was running, changes made meanwhile are not in the log)"
    )]
    SlotMissing {
        /// Slot name.
        slot: String,
    },
    /// The slot was invalidated (it fell further behind than `max_slot_wal_keep_size`).
    #[error(
        "replication slot `{slot}` can no longer stream ({detail}); it fell behind \
         max_slot_wal_keep_size and WAL it needed is gone. Drop and recreate it with \
         `weir init` and re-sync derived data"
    )]
    SlotInvalidated {
        /// Slot name.
        slot: String,
        /// The server's words.
        detail: String,
    },
    /// The publication does not exist.
    #[error("publication `{publication}` does not exist; run `weir init` to create it")]
    PublicationMissing {
        /// Publication name.
        publication: String,
    },
    /// The slot is in use by another connection (another weir, or a stale session).
    #[error("replication slot `{slot}` is in use by another process: {detail}")]
    SlotBusy {
        /// Slot name.
        slot: String,
        /// The server's words.
        detail: String,
    },
    /// Authentication or permission problems: retrying will not help.
    #[error(
        "the replication connection was refused: {0}; the role needs the REPLICATION \
             attribute (`alter role … replication`) and a pg_hba.conf entry for replication"
    )]
    Refused(String),
    /// TLS could not be set up as the URL asks (a certificate that does not verify, a server
    /// without TLS under `sslmode=require`): retrying will not help.
    #[error(
        "the replication connection's TLS failed: {0}; check `sslmode` and `sslrootcert` in \
         the URL (the CA that signed the server's certificate) and that the URL's host is the \
         one the certificate names"
    )]
    Tls(String),
    /// The connection failed or dropped; retry with backoff.
    #[error("replication connection lost: {0}")]
    Disconnected(String),
    /// The server sent something we do not understand.
    #[error("replication protocol error: {0}")]
    Protocol(String),
    /// A pgoutput message did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The messages do not fit together (a change for an unknown table, a commit without begin).
    #[error("pgoutput stream out of sequence: {0}")]
    Sequence(String),
}

impl Error {
    /// Whether reconnecting may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Disconnected(_) | Error::SlotBusy { .. })
    }
}
