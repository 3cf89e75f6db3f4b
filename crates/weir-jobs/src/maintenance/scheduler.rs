//! The scheduler: scheduled and retryable jobs whose time came become available.
//!
//! One statement per batch of [`BATCH`] (`for update skip locked`, so a second leader or a
//! hand-made retry never waits), repeated while batches come back full; each statement sends
//! one wake-up per queue however many jobs it activated.

use crate::store;

/// Most jobs one statement activates.
const BATCH: i64 = 5000;

/// Activates every due job, in batches.
pub(super) async fn activate_due(conn: &mut sqlx::PgConnection) -> sqlx::Result<()> {
    while store::activate_due(conn, BATCH).await? == BATCH {}
    Ok(())
}
