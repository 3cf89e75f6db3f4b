//! The supervisor: shares lanes among the processes running a consumer, and runs one lane
//! task per lane this process holds.
//!
//! ```text
//! every tick (500 ms), Supervisor::step:
//!   consumers = the fixed specs + the catalog's (subscriptions, from the database)
//!   heartbeat weir.consumer_nodes (with the consumers run here) → live processes P per consumer
//!   forget lane tasks that ended (lost lease, error)
//!   stop the lanes of consumers gone from the catalog, or whose generation changed
//!   per consumer, rebalance: fair share = ceil(lanes / P)
//!     renew held leases; a lost lease stops its lane task
//!     above share → stop lane tasks, release their leases (others take them)
//!     below share → lease free or expired lanes (fence + 1), start their lane tasks
//!   finish re-splits whose lanes all drained (any process may)
//! on cancel: stop every lane task, wait for them, release everything (leave)
//! ```
//!
//! A failed step (the database is away) is logged and tried again next tick; lanes keep
//! their leases until they expire ([`LEASE_TTL`]), so a short outage moves nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::engine::{Catalog, ConsumerSpec, Shared};
use crate::lane::Lane;
use crate::{Result, store};

/// Lease length; a dead process's lanes move after this.
const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the supervisor heartbeats, renews and rebalances.
const TICK: Duration = Duration::from_millis(500);

/// (consumer, lane).
type LaneId = (String, i32);

/// A lane this process holds.
struct Held {
    fence: i64,
    /// The consumer's generation its task started with.
    generation: i64,
    cancel: CancellationToken,
}

struct Supervisor {
    shared: Shared,
    catalog: Option<Arc<dyn Catalog>>,
    cancel: CancellationToken,
    /// The running lane tasks; each ends with its lane's id and the fence it ran under.
    tasks: JoinSet<(LaneId, i64)>,
    held: HashMap<LaneId, Held>,
}

/// Runs until `cancel` fires, then stops the lanes and releases them.
pub(crate) async fn supervise(
    shared: Shared,
    specs: Vec<ConsumerSpec>,
    catalog: Option<Arc<dyn Catalog>>,
    cancel: CancellationToken,
) -> Result<()> {
    let mut supervisor = Supervisor {
        shared,
        catalog,
        cancel: cancel.clone(),
        tasks: JoinSet::new(),
        held: HashMap::new(),
    };
    loop {
        if cancel.is_cancelled() {
            break;
        }
        if let Err(e) = supervisor.step(&specs).await {
            let transient = e.is_transient();
            tracing::warn!(error = %e, transient, "consumer supervisor step failed; retrying");
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
    supervisor.stop().await;
    Ok(())
}

impl Supervisor {
    /// One tick: heartbeat, then rebalance every consumer.
    async fn step(&mut self, fixed: &[ConsumerSpec]) -> Result<()> {
        let mut specs = fixed.to_vec();
        if let Some(catalog) = &self.catalog {
            specs.extend(catalog.specs(&self.shared.pool).await?);
        }
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let live = store::lease::heartbeat(&self.shared.pool, &self.shared.node, &names).await?;
        // Forget lanes whose task ended (lost lease or error): they may be leased again.
        while let Some(done) = self.tasks.try_join_next() {
            // Only if it is still the task held: a lane given back and taken again (a new
            // generation) runs a newer task under a newer fence.
            if let Ok((id, fence)) = done
                && self.held.get(&id).is_some_and(|h| h.fence == fence)
            {
                self.held.remove(&id);
            }
        }
        // Lanes of consumers gone from the catalog, or of an older generation, stop.
        let stale: Vec<LaneId> = self
            .held
            .iter()
            .filter(|((name, _), held)| {
                specs
                    .iter()
                    .find(|s| &s.name == name)
                    .is_none_or(|s| s.generation != held.generation)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for (name, lane) in stale {
            self.give_back(&name, &[lane]).await?;
        }
        for spec in &specs {
            let live = live.get(&spec.name).copied().unwrap_or(1).max(1);
            self.rebalance(spec, live).await?;
        }
        store::consumer::finish_resplits(&self.shared.pool).await?;
        Ok(())
    }

    /// Holds this process's fair share of `spec`'s lanes among `live` processes.
    async fn rebalance(&mut self, spec: &ConsumerSpec, live: i64) -> Result<()> {
        let total = spec.lane_count();
        let share = ((i64::from(total) + live - 1) / live) as usize;
        let mut mine: Vec<i32> =
            self.held.keys().filter(|(c, _)| c == &spec.name).map(|(_, l)| *l).collect();
        mine.sort_unstable();
        self.renew(spec, &mine).await?;
        if mine.len() > share {
            // Give lanes back so a newcomer gets its share.
            self.give_back(&spec.name, &mine[share..]).await?;
        } else if mine.len() < share {
            self.take(spec, share - mine.len()).await?;
        }
        Ok(())
    }

    /// Renews the leases of `lanes`; a lane whose lease was lost stops.
    async fn renew(&self, spec: &ConsumerSpec, lanes: &[i32]) -> Result<()> {
        let ttl = LEASE_TTL.as_secs_f64();
        for lane in lanes {
            let h = &self.held[&(spec.name.clone(), *lane)];
            if !store::lease::renew(
                &self.shared.pool,
                &spec.name,
                *lane,
                &self.shared.node,
                h.fence,
                ttl,
            )
            .await?
            {
                h.cancel.cancel();
            }
        }
        Ok(())
    }

    async fn give_back(&mut self, consumer: &str, lanes: &[i32]) -> Result<()> {
        for lane in lanes {
            if let Some(h) = self.held.remove(&(consumer.to_string(), *lane)) {
                h.cancel.cancel();
                store::lease::release(
                    &self.shared.pool,
                    consumer,
                    *lane,
                    &self.shared.node,
                    h.fence,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Leases up to `wanted` more free or expired lanes of `spec` and starts their tasks.
    async fn take(&mut self, spec: &ConsumerSpec, mut wanted: usize) -> Result<()> {
        let ttl = LEASE_TTL.as_secs_f64();
        for lane in 0..spec.lane_count() {
            if wanted == 0 {
                break;
            }
            let id = (spec.name.clone(), lane);
            if self.held.contains_key(&id) {
                continue;
            }
            let Some(fence) = store::lease::try_lease(
                &self.shared.pool,
                &spec.name,
                lane,
                &self.shared.node,
                ttl,
            )
            .await?
            else {
                continue;
            };
            wanted -= 1;
            let cancel = self.cancel.child_token();
            let generation = spec.generation;
            self.held.insert(id.clone(), Held { fence, generation, cancel: cancel.clone() });
            let task = Lane::new(self.shared.clone(), spec.clone(), lane, fence, cancel);
            self.tasks.spawn(async move {
                if let Err(e) = task.run().await {
                    let transient = e.is_transient();
                    tracing::warn!(consumer = %id.0, lane = id.1, error = %e, transient, "lane stopped");
                }
                (id, fence)
            });
        }
        Ok(())
    }

    /// Stops every lane task, waits for them, and releases this process's leases.
    async fn stop(mut self) {
        for h in self.held.values() {
            h.cancel.cancel();
        }
        while self.tasks.join_next().await.is_some() {}
        if let Err(e) = store::lease::leave(&self.shared.pool, &self.shared.node).await {
            tracing::debug!(error = %e, "releasing the lanes failed; their leases expire");
        }
    }
}
