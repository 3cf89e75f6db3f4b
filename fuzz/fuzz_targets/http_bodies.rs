//! Fuzz target `http_bodies`: arbitrary bytes as the JSON body of each request the HTTP API
//! decodes, through the handler's extractor and its checks before the database.
//!
//! ```text
//! input: [body selector][body bytes]
//!           │ BODIES[selector % BODIES.len()]: append, truncate, snapshot, subscription
//!           │ create and update, ack, parked selection, job, backfill
//!           ▼
//!   weir_server::fuzzing::check   ApiJson, then e.g. weir_streams::append::check,
//!                                 NewSubscription::definition, NewJob::job + Job::validate
//! ```
//!
//! The seeds (fuzz/corpus/http_bodies) are the JSON examples of docs/http.md, once per body
//! type, written by fuzz/capture.py.
//!
//! Checked: nothing panics; a refusal is an answer, not a failure.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_server::fuzzing::{BODIES, check};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let _ = check(BODIES[usize::from(selector) % BODIES.len()], body);
});
