//! The rescuer: running jobs of a process that stopped heartbeating for `rescue_after` go back
//! to `available` (their attempt counted, an error recorded), or are discarded when that was
//! their last attempt.
//!
//! The old run, should its process wake up, fails the fence: the next claim raises the attempt.

use tracing::warn;

use crate::{Config, store};

/// Rescues the jobs of silent processes; logs how many.
pub(super) async fn rescue(conn: &mut sqlx::PgConnection, config: &Config) -> sqlx::Result<()> {
    let rescued = store::rescue(conn, config.rescue_after.as_secs_f64()).await?;
    if rescued > 0 {
        warn!(rescued, "rescued jobs of processes that stopped heartbeating");
    }
    Ok(())
}
