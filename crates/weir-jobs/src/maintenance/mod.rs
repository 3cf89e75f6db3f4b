//! Maintenance, on one elected process at a time.
//!
//! ```text
//! every sweep_interval, each process: elect (take or renew the lease in weir.job_leader)
//!   leader only:
//!     scheduler  scheduled/retryable jobs that are due → available (one NOTIFY per queue)
//!     rescuer    (every rescue_after / 2) running jobs of processes silent for rescue_after
//!                → available (or discarded)
//!     periodic   each cron job: one job per slot due since its mark (slots older than the
//!                lease and two sweeps collapse into one), with the mark advanced, one
//!                transaction
//!     cleaner    (every minute) trim history past retention, in batches; drop expired unique
//!                keys and processes long gone
//! ```
//!
//! The lease is a row with an expiry (it works through connection poolers, unlike a session
//! advisory lock); it lasts five sweep intervals, so a dead leader is replaced within seconds.
//! Two leaders at once (a paused process that wakes up) are harmless: every maintenance
//! statement is idempotent or fenced (the periodic mark only moves forward).

mod cleaner;
mod periodic;
mod rescuer;
mod scheduler;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use periodic::PeriodicJob;

use crate::shared::Shared;
use crate::{Error, store};

/// Runs the election and, while leader, every maintenance role, until `stop`; then resigns.
pub(crate) async fn run(shared: Arc<Shared>, periodic: Vec<PeriodicJob>, stop: CancellationToken) {
    let config = &shared.config;
    let ttl = (config.sweep_interval * 5).max(Duration::from_secs(5));
    let mut tick = tokio::time::interval(config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_trim: Option<Instant> = None;
    let mut last_rescue: Option<Instant> = None;
    let rescue_every = (config.rescue_after / 2).max(config.sweep_interval);
    // Periodic slots this old are still enqueued: a late round, or a handover (a lease).
    let catch_up = ttl + config.sweep_interval * 2;
    let mut leader = false;
    let process = shared.process.as_str();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let round = async {
            let mut conn = shared.pool.acquire().await?;
            let now_leader = store::elect(&mut conn, process, ttl.as_secs_f64()).await?;
            if now_leader != leader {
                info!(process, leader = now_leader, "maintenance leadership");
                leader = now_leader;
            }
            if !leader {
                return Ok(());
            }
            scheduler::activate_due(&mut conn).await?;
            if last_rescue.is_none_or(|t| t.elapsed() >= rescue_every) {
                last_rescue = Some(Instant::now());
                rescuer::rescue(&mut conn, config).await?;
            }
            for p in &periodic {
                periodic::enqueue_periodic(&mut conn, p, Utc::now(), catch_up).await?;
            }
            if last_trim.is_none_or(|t| t.elapsed() >= cleaner::EVERY) {
                last_trim = Some(Instant::now());
                cleaner::clean(&mut conn, config).await?;
            }
            Ok::<(), Error>(())
        };
        if let Err(e) = round.await {
            warn!(error = %e, transient = e.is_transient(), "maintenance round failed");
        }
    }
    if leader
        && let Ok(mut conn) = shared.pool.acquire().await
        && let Err(e) = store::resign(&mut conn, process).await
    {
        debug!(error = %e, "resigning leadership failed; the lease will expire");
    }
}
