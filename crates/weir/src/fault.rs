//! Fault injection at the crash windows that prove the ingestion guarantee. Tests start a real
//! `weir run` with `WEIR_FAULT=<point>` and the process aborts there, exactly as a crash would:
//! no destructor runs, no acknowledgement is sent.
//!
//! Points: `before_append` (a batch is assembled but not stored), `after_append` (stored,
//! slot not yet acknowledged).

use std::sync::OnceLock;

pub(crate) fn point(name: &str) {
    static FAULT: OnceLock<Option<String>> = OnceLock::new();
    let armed = FAULT.get_or_init(|| std::env::var("WEIR_FAULT").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("weir: fault injection: aborting at {name}");
        std::process::abort();
    }
}
