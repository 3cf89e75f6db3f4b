//! The cleaner: history past its retention is deleted in batches (no statement holds many row
//! locks or writes a burst of WAL); expired unique keys and processes long gone (ten rescue
//! periods, at least ten minutes, and running nothing) are dropped.

use std::time::Duration;

use tracing::debug;

use crate::{Config, store};

/// How often the leader cleans.
pub(super) const EVERY: Duration = Duration::from_secs(60);
/// Most history rows one statement deletes.
const BATCH: i64 = 5000;

/// Trims history by retention and prunes keys and processes.
pub(super) async fn clean(conn: &mut sqlx::PgConnection, config: &Config) -> sqlx::Result<()> {
    for (states, keep) in [
        (&["completed"][..], config.completed_retention),
        (&["discarded", "cancelled"][..], config.discarded_retention),
    ] {
        let mut removed = 0;
        loop {
            let n = store::trim_history(conn, states, keep.as_secs_f64(), BATCH).await?;
            removed += n;
            if n < BATCH as u64 {
                break;
            }
        }
        if removed > 0 {
            debug!(?states, removed, "trimmed job history");
        }
    }
    let gone = (config.rescue_after * 10).max(Duration::from_secs(600));
    store::prune(conn, gone.as_secs_f64()).await?;
    Ok(())
}
