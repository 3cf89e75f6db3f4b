//! The process's liveness and its ears: the heartbeat, and the LISTEN connection that turns
//! notifications into wake-ups and cancel requests.
//!
//! ```text
//! heartbeat, every heartbeat_interval:
//!   update weir.job_processes (the heartbeat of every job this process runs; gone → register
//!   again) ─► sample the gauges: available jobs per queue (one grouped count), running here
//!
//! listener: LISTEN weir_jobs, weir_job_cancel
//!   weir_jobs <queue>      ─► wake that queue's producer
//!   weir_job_cancel <id>   ─► cancel the job's attempt if it runs here
//!   connection lost        ─► wake every producer (notifications sent meanwhile are gone)
//! ```
//!
//! Neither is needed for correctness: producers poll, and the rescue only needs the heartbeat
//! to stop when the process does. See [LISTEN](https://www.postgresql.org/docs/current/sql-listen.html).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::shared::Shared;
use crate::{metrics, store};

/// Channel of the wake-ups; the payload is the queue.
pub const WAKE_CHANNEL: &str = "weir_jobs";
/// Channel of cancel requests for running jobs; the payload is the job id.
pub const CANCEL_CHANNEL: &str = "weir_job_cancel";
/// Channel of completion and discard events of jobs enqueued with `notify(true)`.
pub const EVENTS_CHANNEL: &str = "weir_job_events";

/// Heartbeats the process until `stop`; registers again if the row was pruned.
pub(crate) async fn heartbeat(
    shared: Arc<Shared>,
    served: serde_json::Value,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(shared.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let beat = async {
            let mut conn = shared.pool.acquire().await?;
            if !store::heartbeat(&mut conn, shared.process.as_str()).await? {
                warn!(process = %shared.process, "process row was gone; registering again");
                store::register_process(&mut conn, shared.process.as_str(), &served).await?;
            }
            if let Err(e) = sample(&shared, &mut conn).await {
                debug!(error = %e, "job gauges not sampled");
            }
            Ok::<(), sqlx::Error>(())
        };
        if let Err(e) = beat.await {
            warn!(error = %e, "heartbeat failed");
        }
    }
}

/// Sets the job gauges of this process's queues: the available jobs in the table (one grouped
/// statement) and the jobs running here.
async fn sample(shared: &Shared, conn: &mut sqlx::PgConnection) -> sqlx::Result<()> {
    let queues: Vec<String> = shared.config.queues.iter().map(|q| q.name.clone()).collect();
    let available = store::available_by_queue(conn, &queues).await?;
    for queue in &queues {
        let n = available.iter().find(|(q, _)| q == queue).map_or(0, |(_, n)| *n);
        metrics::sample_queued(queue, n);
    }
    for counters in shared.metrics.queues.values() {
        counters.sample_running();
    }
    Ok(())
}

/// LISTENs for wake-ups and cancel requests; after any reconnect, wakes every producer since
/// notifications may have been lost meanwhile.
pub(crate) async fn listen(
    shared: Arc<Shared>,
    wakes: HashMap<String, Vec<Arc<Notify>>>,
    stop: CancellationToken,
) {
    let wake_all = || wakes.values().flatten().for_each(|w| w.notify_one());
    'connect: loop {
        let mut listener = match PgListener::connect_with(&shared.pool).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "LISTEN connection failed; polling meanwhile");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'connect,
                }
            }
        };
        if let Err(e) = listener.listen_all([WAKE_CHANNEL, CANCEL_CHANNEL]).await {
            warn!(error = %e, "LISTEN failed; polling meanwhile");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'connect,
            }
        }
        wake_all();
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) if n.channel() == WAKE_CHANNEL => {
                    for w in wakes.get(n.payload()).into_iter().flatten() {
                        w.notify_one();
                    }
                }
                Ok(Some(n)) => {
                    if let Ok(id) = n.payload().parse::<i64>()
                        && let Some(t) = shared.running.lock().expect("running lock").get(&id)
                    {
                        info!(id, "cancel requested for a running job");
                        t.cancel();
                    }
                }
                Ok(None) => {
                    // The connection was lost and will be re-established by the next call:
                    // anything sent meanwhile is gone, so claim now.
                    warn!("LISTEN connection lost; reconnecting");
                    wake_all();
                }
                Err(e) => {
                    warn!(error = %e, "LISTEN failed; reconnecting");
                    continue 'connect;
                }
            }
        }
    }
}
