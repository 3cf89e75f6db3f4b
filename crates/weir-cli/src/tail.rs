//! `weir tail`: prints events as JSON lines as they arrive, waking on the log's notifications
//! (`weir_log::listen_for_appends`) with a one-second polling fallback.
//!
//! The head is read before each page: a short page then proves nothing matching lies at or
//! below it, so a filtered tail skips ahead without missing an event appended meanwhile.

use std::io::Write;

use anyhow::Context;
use weir::{Config, EventFilter, Kind};

/// `weir tail` with the flags as given: parses the kinds, then tails.
pub(crate) async fn run(
    config: &Config,
    entity: Vec<String>,
    kind: Vec<String>,
    from: Option<i64>,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    let mut kinds = Vec::new();
    for k in &kind {
        kinds.push(Kind::parse(k).with_context(|| {
            format!("unknown kind `{k}`; use insert, update, delete, truncate or message")
        })?);
    }
    let pool = weir::db::connect(config).await?;
    tail(pool, EventFilter { entities: entity, kinds }, from, limit).await
}

/// Prints events after `from` (default: only new ones) matching `filter`, `limit` at most.
async fn tail(
    pool: sqlx::PgPool,
    filter: EventFilter,
    from: Option<i64>,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    let reader = weir::LogReader::new(pool.clone()).await?;
    let mut after = match from {
        Some(p) => p,
        None => reader.head().await?,
    };
    let cancel = crate::shutdown_signal();
    let (mut wake, _listener) = weir_log::listen_for_appends(pool, cancel.clone());
    let mut printed = 0u64;
    const PAGE: usize = 1000;
    while !cancel.is_cancelled() {
        let head = reader.head().await?;
        let events = reader.read(after, PAGE as i64, &filter).await?;
        {
            let mut out = std::io::stdout().lock();
            for e in &events {
                writeln!(out, "{}", serde_json::to_string(e)?)?;
                printed += 1;
                if limit.is_some_and(|l| printed >= l) {
                    return Ok(());
                }
            }
            out.flush()?;
        }
        let last = events.last().map_or(after, |e| e.position);
        if events.len() == PAGE {
            after = last;
            continue;
        }
        after = last.max(head);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = wake.wait_past(after, std::time::Duration::from_secs(1)) => {}
        }
    }
    Ok(())
}
