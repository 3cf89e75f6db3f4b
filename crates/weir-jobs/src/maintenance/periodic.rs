//! Periodic jobs: a job enqueued at every time (slot) its cron expression matches, read in the
//! job's time zone, by the maintenance leader.
//!
//! ```text
//! mark (weir.job_periodic.last_at: the last slot enqueued, an instant)
//!   │  each round, on the leader:
//!   ▼
//! slots in (max(mark, now - catch_up), now]   → one job each, in one transaction with the
//!                                               mark moved to the last of them
//! none there, but slots in (mark, now - catch_up] → one job for the latest of those
//! ```
//!
//! Exactly once per slot across processes: the mark moves only forward (`update … where
//! last_at < new`), in the transaction that enqueues, so of two leaders (a paused one that
//! wakes up) the second blocks on the row, then finds the mark already moved and enqueues
//! nothing. Each job also carries the unique key `periodic:<name>:<slot>` (unique while
//! unfinished), which names its slot and refuses a second job for a slot that is still
//! queued or running whatever happens to the mark.
//!
//! No gaps while a leader lives: a late round (a slow statement, a per-second schedule) or a
//! leader handover (up to the lease, 5 sweep intervals) leaves slots at most `catch_up` old,
//! and those are all enqueued. Slots missed for longer (no process ran) collapse into one run,
//! never a burst. A periodic job seen for the first time starts counting from now: no
//! backfill.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Connection;
use tracing::debug;

use crate::cron::{Cron, parse_timezone};
use crate::job::{Job, Unique, enqueue};
use crate::{Error, Result, store};

/// Most slots one round enqueues for one periodic job; the rest wait for the next round.
const MAX_SLOTS_PER_ROUND: usize = 1000;

/// A job enqueued at every time its cron expression matches (UTC unless given a time zone),
/// by the maintenance leader, once per time across processes.
#[derive(Debug, Clone)]
pub struct PeriodicJob {
    pub(crate) name: String,
    pub(crate) cron: Cron,
    pub(crate) job: Job,
}

impl PeriodicJob {
    /// A periodic job named `name` (its mark in `weir.job_periodic`), read in UTC; a bad
    /// expression is an error naming its column.
    pub fn new(name: impl Into<String>, cron: &str, job: Job) -> Result<Self> {
        let name = name.into();
        if name.is_empty() {
            return Err(Error::Registration("a periodic job's name is empty".into()));
        }
        job.validate()?;
        Ok(Self { name, cron: Cron::parse(cron)?, job })
    }

    /// Reads the expression in the IANA time zone `timezone` (`Europe/Paris`); daylight saving
    /// time is handled as the `cron` module documents (a time in the spring gap runs once,
    /// just after it; a fixed time in the repeated autumn hour runs once).
    pub fn timezone(mut self, timezone: &str) -> Result<Self> {
        self.cron = self.cron.in_timezone(parse_timezone(timezone)?);
        Ok(self)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its schedule.
    pub fn cron(&self) -> &Cron {
        &self.cron
    }
}

/// Enqueues one job per slot of `p` due since its mark (see the module docs for `catch_up`).
/// Returns the slots it enqueued for.
pub(super) async fn enqueue_periodic(
    conn: &mut sqlx::PgConnection,
    p: &PeriodicJob,
    now: DateTime<Utc>,
    catch_up: Duration,
) -> Result<Vec<DateTime<Utc>>> {
    let Some(last) = store::periodic_last(conn, &p.name).await? else {
        // First sight: start counting from now, never backfill.
        store::periodic_advance(conn, &p.name, now).await?;
        return Ok(Vec::new());
    };
    let window = now - chrono::Duration::from_std(catch_up).unwrap_or(chrono::Duration::MAX);
    let mut slots = Vec::new();
    let mut t = last.max(window);
    while slots.len() < MAX_SLOTS_PER_ROUND {
        match p.cron.next_after(t) {
            Some(n) if n <= now => {
                slots.push(n);
                t = n;
            }
            _ => break,
        }
    }
    if slots.is_empty() && last < window {
        // Slots missed for longer than catch_up: one run, for the latest of them.
        if let Some(latest) = p.cron.last_at_or_before(window).filter(|l| *l > last) {
            slots.push(latest);
        }
    }
    let Some(&mark) = slots.last() else { return Ok(Vec::new()) };
    let mut tx = conn.begin().await?;
    if !store::periodic_advance(&mut tx, &p.name, mark).await? {
        return Ok(Vec::new()); // another leader did it
    }
    for slot in &slots {
        let mut job = p.job.clone();
        if job.unique.is_none() {
            job.unique = Some(Unique::while_active(slot_key(&p.name, *slot)));
        }
        let enqueued = enqueue(&mut tx, &job).await?;
        debug!(name = %p.name, %slot, id = %enqueued.id, duplicate = enqueued.duplicate,
               "enqueued periodic job");
    }
    tx.commit().await?;
    Ok(slots)
}

/// The unique key of a periodic job's slot: `periodic:<name>:<slot in RFC 3339, UTC>`.
fn slot_key(name: &str, slot: DateTime<Utc>) -> String {
    format!("periodic:{name}:{}", slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}
