//! Fuzz target `cast`: a type oid and arbitrary text through `cast::TypeRegistry`, as the
//! assembler casts every text column value of a change.
//!
//! ```text
//! input: [0xff][u32 oid][text]   any oid
//!      | [selector][text]        OIDS[selector % OIDS.len()]: the oids cast.rs treats apart
//!           ▼
//!   TypeRegistry::type_name(oid), TypeRegistry::cast(oid, text) ──▶ the event's JSON
//! ```
//!
//! The text is decoded as the assembler decodes a `ColumnValue::Text` (lossy UTF-8). The
//! seeds (fuzz/corpus/cast) are PostgreSQL 15's own text output of every type of the ingest
//! test, written by fuzz/capture.py.
//!
//! Checked: nothing panics, and the JSON serializes (as the log writer binds it to `jsonb`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_source::cast::TypeRegistry;

/// The oids whose cast is not "the text as a string": bool, bytea, the integers and `oid`,
/// the floats, numeric, json and jsonb, timestamp and timestamptz, and the arrays of each
/// (`box[]` is the one with `;` between elements); then `text` and `text[]`, the learned types
/// below, and an oid nobody knows.
const OIDS: &[u32] = &[
    16, 17, 20, 21, 23, 26, 114, 700, 701, 1700, 1114, 1184, 3802, //
    1000, 1001, 1005, 1007, 1016, 1028, 199, 1021, 1022, 1231, 1115, 1185, 3807, 1020, //
    25, 1009, 16_384, 16_385, 16_386, 99_999,
];

fuzz_target!(|data: &[u8]| {
    let (oid, text) = match data {
        [0xff, a, b, c, d, text @ ..] => (u32::from_be_bytes([*a, *b, *c, *d]), text),
        [selector, text @ ..] => (OIDS[usize::from(*selector) % OIDS.len()], text),
        [] => return,
    };
    let mut types = TypeRegistry::new();
    // What `Type` messages teach: an enum, an array of it, and a schema-qualified array.
    types.learn(16_384, "public", "mood");
    types.learn(16_385, "", "_mood");
    types.learn(16_386, "sales", "_currency");

    let _ = types.type_name(oid);
    let value = types.cast(oid, &String::from_utf8_lossy(text));
    serde_json::to_vec(&value).expect("a cast value serializes");
});
