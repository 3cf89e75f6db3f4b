//! Fuzz target `pgoutput`: arbitrary bytes as the messages of one replication connection,
//! through the pgoutput decoder and the transaction assembler.
//!
//! ```text
//! input: [version] ([u16 length][message]) ([u16 length][message]) …
//!           │ 2 + version % 3: protocol 2, 3 or 4
//!           ▼
//!   pgoutput::Decoder::decode   ─┐ one of each for the whole input, so state carries across
//!   assemble::Assembler::push   ─┘ messages: relations, types, the streamed block, the open
//!           │                      transaction, the streamed transactions in progress
//!           ▼
//!   the JSON of every change, written as the log writer binds it
//! ```
//!
//! A length longer than what is left takes the rest. The seeds (fuzz/corpus/pgoutput) are real
//! PostgreSQL 15 messages in this framing, written by fuzz/capture.py.
//!
//! Checked: nothing panics, and the decoder's documented state rule: a decoded `StreamStart`
//! opens a block, a `StreamStop` closes it, a rejected message leaves the state as it was.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use weir_source::assemble::{Assembler, Output};
use weir_source::pgoutput::{Decoder, Message};

fuzz_target!(|data: &[u8]| {
    let Some((&version, mut rest)) = data.split_first() else { return };
    let protocol_version = 2 + u32::from(version % 3);
    let mut decoder = Decoder::new(protocol_version);
    let mut assembler = Assembler::new(protocol_version, "weir", "fuzz");
    let mut out = Vec::new();
    while let Some((message, tail)) = next_message(rest) {
        rest = tail;
        let message = Bytes::copy_from_slice(message);

        let was_in_stream = decoder.in_stream();
        match decoder.decode(message.clone()) {
            Ok(decoded) => match decoded.message {
                Message::StreamStart { .. } => assert!(decoder.in_stream()),
                Message::StreamStop => assert!(!decoder.in_stream()),
                _ => assert_eq!(decoder.in_stream(), was_in_stream),
            },
            Err(_) => assert_eq!(decoder.in_stream(), was_in_stream, "a rejected message"),
        }

        // An error ends a real connection; going on reaches the states that follow it too.
        let _ = assembler.push(message, &mut out);
        for output in out.drain(..) {
            write_json(&mut assembler, output);
        }
    }
});

/// The next `[u16 length][message]` frame and what follows it.
fn next_message(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    Some(rest.split_at(len))
}

/// Serializes what the log writer would bind as `jsonb`; answers `set_primary_key` as ingest
/// does for `REPLICA IDENTITY FULL` tables (with a name that may or may not exist).
fn write_json(assembler: &mut Assembler, output: Output) {
    let changes = match output {
        Output::Commit(transaction) => transaction.changes,
        Output::Stage { changes, .. } => changes.into_iter().map(|(_, c)| c).collect(),
        Output::Abort { .. } => return,
        Output::RelationSeen { relation_id, full_identity, .. } => {
            if full_identity {
                assembler.set_primary_key(relation_id, &["id".to_string()]);
            }
            return;
        }
    };
    for change in changes {
        let values = [Some(&change.key), change.new_record.as_ref(), change.old_record.as_ref()];
        for value in values.into_iter().flatten().chain(change.changes.as_ref()) {
            serde_json::to_vec(value).expect("a cast value serializes");
        }
    }
}
