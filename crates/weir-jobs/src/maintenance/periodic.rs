//! Periodic jobs: a job enqueued at every time its cron expression matches (UTC), by the
//! maintenance leader.
//!
//! Each has a mark in `weir.job_periodic` (the last time it was enqueued for). A round moves
//! the mark forward to the latest due time and enqueues, in one transaction; the mark only
//! moves forward, so two leaders never enqueue the same run, and missed runs (no leader for a
//! while) become one run, never a burst. A periodic job seen for the first time starts
//! counting from now: no backfill.

use chrono::{DateTime, Utc};
use sqlx::Connection;
use tracing::debug;

use crate::cron::Cron;
use crate::job::{Job, enqueue};
use crate::{Error, Result, store};

/// A job enqueued at every time its cron expression matches (UTC), by the maintenance leader.
#[derive(Debug, Clone)]
pub struct PeriodicJob {
    pub(crate) name: String,
    pub(crate) cron: Cron,
    pub(crate) job: Job,
}

impl PeriodicJob {
    /// A periodic job named `name` (its mark in `weir.job_periodic`); a bad expression is an
    /// error naming its column.
    pub fn new(name: impl Into<String>, cron: &str, job: Job) -> Result<Self> {
        let name = name.into();
        if name.is_empty() {
            return Err(Error::Registration("a periodic job's name is empty".into()));
        }
        job.validate()?;
        Ok(Self { name, cron: Cron::parse(cron)?, job })
    }
}

/// Enqueues `p` if a cron time passed since its mark: at most one run however many were missed.
/// Returns the time it enqueued for.
pub(super) async fn enqueue_periodic(
    conn: &mut sqlx::PgConnection,
    p: &PeriodicJob,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>> {
    let Some(last) = store::periodic_last(conn, &p.name).await? else {
        // First sight: start counting from now, never backfill.
        store::periodic_advance(conn, &p.name, now).await?;
        return Ok(None);
    };
    let Some(mut due) = p.cron.next_after(last) else { return Ok(None) };
    if due > now {
        return Ok(None);
    }
    // Skip to the latest time at or before now.
    for _ in 0..10_000 {
        match p.cron.next_after(due) {
            Some(n) if n <= now => due = n,
            _ => break,
        }
    }
    let mut tx = conn.begin().await?;
    if !store::periodic_advance(&mut tx, &p.name, due).await? {
        return Ok(None); // another leader did it
    }
    let job = enqueue(&mut tx, &p.job).await?;
    tx.commit().await?;
    debug!(name = %p.name, %due, id = %job.id, "enqueued periodic job");
    Ok(Some(due))
}
