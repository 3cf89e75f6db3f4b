//! Maintenance, on one elected process at a time.
//!
//! ```text
//! every sweep_interval, each process: elect (take or renew the lease in weir.job_leader)
//!   leader only:
//!     activate   scheduled/retryable jobs that are due → available (one NOTIFY per queue)
//!     rescue     (every rescue_after / 2) running jobs of processes silent for rescue_after
//!                → available (or discarded)
//!     periodic   each cron job due since its mark → advance the mark and enqueue, one transaction
//!     every min  trim history past retention, in batches; drop expired unique keys and
//!                processes long gone
//! ```
//!
//! The lease is a row with an expiry (it works through connection poolers, unlike a session
//! advisory lock); it lasts five sweep intervals, so a dead leader is replaced within seconds.
//! Two leaders at once (a paused process that wakes up) are harmless: every maintenance
//! statement is idempotent or fenced (the periodic mark only moves forward).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cron::Cron;
use crate::job::{Job, enqueue};
use crate::runner::Shared;
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
            return Err(Error::Config { field: "periodic.name".into(), problem: "empty".into() });
        }
        job.validate()?;
        Ok(Self { name, cron: Cron::parse(cron)?, job })
    }
}

const ACTIVATE_BATCH: i64 = 5000;
const TRIM_BATCH: i64 = 5000;
const TRIM_EVERY: Duration = Duration::from_secs(60);

pub(crate) async fn run(shared: Arc<Shared>, periodic: Vec<PeriodicJob>, stop: CancellationToken) {
    let config = &shared.config;
    let ttl = (config.sweep_interval * 5).max(Duration::from_secs(5));
    let mut tick = tokio::time::interval(config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_trim: Option<Instant> = None;
    let mut last_rescue: Option<Instant> = None;
    let rescue_every = (config.rescue_after / 2).max(config.sweep_interval);
    let mut leader = false;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let round = async {
            let mut conn = shared.pool.acquire().await?;
            let now_leader = store::elect(&mut conn, &shared.process, ttl.as_secs_f64()).await?;
            if now_leader != leader {
                info!(process = %shared.process, leader = now_leader, "maintenance leadership");
                leader = now_leader;
            }
            if !leader {
                return Ok(());
            }
            while store::activate_due(&mut conn, ACTIVATE_BATCH).await? == ACTIVATE_BATCH {}
            if last_rescue.is_none_or(|t| t.elapsed() >= rescue_every) {
                last_rescue = Some(Instant::now());
                let rescued = store::rescue(&mut conn, config.rescue_after.as_secs_f64()).await?;
                if rescued > 0 {
                    warn!(rescued, "rescued jobs of processes that stopped heartbeating");
                }
            }
            for p in &periodic {
                enqueue_periodic(&mut conn, p, Utc::now()).await?;
            }
            if last_trim.is_none_or(|t| t.elapsed() >= TRIM_EVERY) {
                last_trim = Some(Instant::now());
                trim(&mut conn, &shared).await?;
            }
            Ok::<(), Error>(())
        };
        if let Err(e) = round.await {
            warn!(error = %e, "maintenance round failed");
        }
    }
    if leader
        && let Ok(mut conn) = shared.pool.acquire().await
        && let Err(e) = store::resign(&mut conn, &shared.process).await
    {
        debug!(error = %e, "resigning leadership failed; the lease will expire");
    }
}

async fn trim(conn: &mut sqlx::PgConnection, shared: &Shared) -> Result<()> {
    let config = &shared.config;
    for (states, keep) in [
        (&["completed"][..], config.completed_retention),
        (&["discarded", "cancelled"][..], config.discarded_retention),
    ] {
        let mut removed = 0;
        loop {
            let n = store::trim_history(conn, states, keep.as_secs_f64(), TRIM_BATCH).await?;
            removed += n;
            if n < TRIM_BATCH as u64 {
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

/// Enqueues `p` if a cron time passed since its mark: at most one run however many were missed.
/// Returns the time it enqueued for.
pub(crate) async fn enqueue_periodic(
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
