//! Delivery to clients: an SSE or WebSocket client attaches to a subscription by name, leases
//! its emitters (all, or some) like an engine process would, receives their events in log
//! order, and acknowledges. A client that reconnects gets exactly what it has not acknowledged.
//!
//! ```text
//! attach(name, emitters?) ─► lease each emitter (owner = client:<uuid>, fence)
//! next() ─► read the log after the cursor (starting at the lowest held checkpoint)
//!           ─► selector ─► route: hash(stream or key) % pool_size ∈ held emitters
//!           ─► position > that emitter's checkpoint ─► deliver (emitter, event)
//! ack(p) ─► every held emitter's checkpoint := p (fenced): the delivery is in log order over
//!           all held emitters, so everything of theirs at or below p was delivered; when p is
//!           the last delivered, the checkpoints move to the cursor (past unselected events)
//! renew() every few seconds; release() on disconnect (a crash: the lease expires)
//! ```
//!
//! A re-split or a definition change (the consumer's generation) ends the attachment with
//! [`Next::Reattach`]: the client attaches again and continues from the checkpoints.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;
use weir_consumer::{ConsumerState, leases};
use weir_core::Event;
use weir_log::{EventFilter, LogReader};

use crate::subscription::{Matcher, SinkKind, SubscriptionDef};
use crate::{Error, Result, subscriptions};

/// How long an attachment's leases last without a renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// One delivered event and the emitter it came through.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Delivery {
    /// The emitter (lane) that delivers it.
    pub emitter: i32,
    /// The event, as logged.
    pub event: Event,
}

/// What [`Attachment::next`] found.
#[derive(Debug)]
pub enum Next {
    /// Events to deliver, in log order (possibly none: caught up).
    Events(Vec<Delivery>),
    /// The subscription is stopped or halted: wait, then ask again.
    Paused(ConsumerState),
    /// The subscription changed (re-split, new definition) or a lease was lost: attach again.
    Reattach(String),
}

/// A client's hold on some of a subscription's emitters.
#[derive(Debug)]
pub struct Attachment {
    pool: PgPool,
    reader: LogReader,
    def: SubscriptionDef,
    matcher: Matcher,
    filter: EventFilter,
    owner: String,
    generation: i64,
    pool_size: i32,
    /// Held emitters: lane → fence.
    held: HashMap<i32, i64>,
    /// Held emitters: lane → checkpoint (as acknowledged).
    acked: HashMap<i32, i64>,
    /// Read up to here.
    cursor: i64,
    /// The last position delivered (0: none yet).
    last_delivered: i64,
}

impl Attachment {
    /// Attaches to subscription `name` (its sink must be `client`), leasing the given emitters
    /// or all of them. Emitters another client or process holds are left out; none free is an
    /// error.
    pub async fn attach(pool: &PgPool, name: &str, emitters: Option<&[i32]>) -> Result<Self> {
        let def = subscriptions::load(pool, name).await?;
        let delivers_to = match def.sink.kind() {
            SinkKind::Client => None,
            SinkKind::Rust => Some("a Rust handler in the process that registered it"),
            SinkKind::Webhook => Some("a webhook"),
            SinkKind::Nats => Some("NATS JetStream"),
        };
        if let Some(to) = delivers_to {
            return Err(Error::InvalidSubscription(format!(
                "subscription `{name}` delivers to {to}; attach clients to a subscription with \
                 sink `client`"
            )));
        }
        let matcher = def.matcher()?;
        let (generation, pool_size): (i64, i32) =
            sqlx::query_as("select generation, lanes from weir.consumers where name = $1")
                .bind(name)
                .fetch_one(pool)
                .await?;
        let wanted: Vec<i32> = match emitters {
            Some(list) => {
                if let Some(bad) = list.iter().find(|e| **e < 0 || **e >= pool_size) {
                    return Err(Error::InvalidSubscription(format!(
                        "subscription `{name}` has emitters 0 to {}; there is no emitter {bad}",
                        pool_size - 1
                    )));
                }
                list.to_vec()
            }
            None => (0..pool_size).collect(),
        };
        let owner = format!("client:{}", Uuid::new_v4());
        let mut held = HashMap::new();
        for lane in wanted {
            if let Some(fence) = leases::take(pool, name, lane, &owner, LEASE_TTL).await? {
                held.insert(lane, fence);
            }
        }
        if held.is_empty() {
            return Err(Error::Busy(format!(
                "every requested emitter of subscription `{name}` is held by another client or \
                 process; retry after it disconnects (its lease expires within {} s)",
                LEASE_TTL.as_secs()
            )));
        }
        let acked: HashMap<i32, i64> = leases::positions(pool, name)
            .await?
            .into_iter()
            .filter(|(lane, _)| held.contains_key(lane))
            .collect();
        let cursor = acked.values().copied().min().unwrap_or(0);
        let filter = {
            let coarse = def.coarse_selector();
            EventFilter { entities: coarse.entities, kinds: coarse.kinds }
        };
        Ok(Self {
            reader: LogReader::new(pool.clone()).await?,
            pool: pool.clone(),
            def,
            matcher,
            filter,
            owner,
            generation,
            pool_size,
            held,
            acked,
            cursor,
            last_delivered: 0,
        })
    }

    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// The emitters held, in order.
    pub fn emitters(&self) -> Vec<i32> {
        let mut e: Vec<i32> = self.held.keys().copied().collect();
        e.sort_unstable();
        e
    }

    /// The token naming this attachment (its lease owner); acknowledgements made elsewhere
    /// ([`ack_token`]) name it.
    pub fn token(&self) -> &str {
        &self.owner
    }

    /// Up to `limit` events to deliver after the cursor, or why not now.
    pub async fn next(&mut self, limit: i64) -> Result<Next> {
        let (state, drain_to, generation): (ConsumerState, Option<i64>, i64) = sqlx::query_as(
            "select state, drain_to, generation from weir.consumers where name = $1",
        )
        .bind(&self.def.name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::UnknownSubscription(self.def.name.clone()))?;
        if generation != self.generation {
            return Ok(Next::Reattach(format!(
                "subscription `{}` changed; attach again to continue from the checkpoints",
                self.def.name
            )));
        }
        if state != ConsumerState::Running {
            return Ok(Next::Paused(state));
        }
        let limit_pos = match drain_to {
            Some(d) if self.cursor >= d => {
                // Drained for a re-split: once everything delivered is acknowledged, move the
                // checkpoints here and wait for it (earlier would drop what is unacknowledged).
                if self.last_delivered <= self.acknowledged() {
                    self.checkpoint_all(d).await?;
                }
                return Ok(Next::Events(Vec::new()));
            }
            d => d,
        };
        let head = self.reader.head().await?;
        let mut events = self.reader.read(self.cursor, limit, &self.filter).await?;
        let mut short = (events.len() as i64) < limit;
        if let Some(d) = limit_pos
            && events.last().is_some_and(|e| e.position > d)
        {
            events.retain(|e| e.position <= d);
            short = true;
        }
        let mut out = Vec::new();
        for event in events {
            self.cursor = event.position;
            if !self.matcher.matches(&event) {
                continue;
            }
            let emitter = match self.def.partition_key(&event) {
                Ok(k) => weir_consumer::lane_of(&k, self.pool_size),
                Err(_) => 0,
            };
            if self.acked.get(&emitter).is_some_and(|cp| event.position > *cp) {
                self.last_delivered = event.position;
                out.push(Delivery { emitter, event });
            }
        }
        if short {
            // Nothing selected up to the head (or the drain position) after the cursor.
            let to = limit_pos.map_or(head, |d| head.min(d));
            self.cursor = self.cursor.max(to);
        }
        if out.is_empty() && self.last_delivered <= self.acknowledged() {
            // Nothing outstanding: the checkpoints follow the cursor (lag stays honest).
            self.checkpoint_all(self.cursor).await?;
        }
        Ok(Next::Events(out))
    }

    /// Acknowledges everything delivered at or below `position`.
    pub async fn ack(&mut self, position: i64) -> Result<()> {
        let to = if position >= self.last_delivered { self.cursor.max(position) } else { position };
        self.checkpoint_all(to).await
    }

    /// Extends the leases and reads back the checkpoints (acknowledgements made through
    /// [`ack_token`]); [`Error::Busy`] when a lease was lost (another holder took it after it
    /// expired).
    pub async fn renew(&mut self) -> Result<()> {
        self.refresh_acks().await?;
        for (lane, fence) in &self.held {
            if !leases::renew(&self.pool, &self.def.name, *lane, &self.owner, *fence, LEASE_TTL)
                .await?
            {
                return Err(self.taken_over(*lane));
            }
        }
        Ok(())
    }

    /// Gives the emitters back (their checkpoints stay).
    pub async fn release(self) {
        for (lane, fence) in &self.held {
            if let Err(e) =
                leases::release(&self.pool, &self.def.name, *lane, &self.owner, *fence).await
            {
                tracing::debug!(error = %e, "releasing an emitter failed; its lease expires");
            }
        }
    }

    /// Reads back the checkpoints (acknowledgements made through [`ack_token`]) without
    /// renewing the leases.
    pub async fn refresh_acks(&mut self) -> Result<()> {
        for (lane, position) in leases::positions(&self.pool, &self.def.name).await? {
            if let Some(cp) = self.acked.get_mut(&lane) {
                *cp = (*cp).max(position);
            }
        }
        Ok(())
    }

    /// Everything delivered at or below this position is acknowledged (the lowest held
    /// checkpoint, as of the last [`ack`](Self::ack), [`renew`](Self::renew) or
    /// [`refresh_acks`](Self::refresh_acks)).
    pub fn acknowledged(&self) -> i64 {
        self.acked.values().copied().min().unwrap_or(0)
    }

    fn taken_over(&self, lane: i32) -> Error {
        Error::Busy(format!(
            "emitter {lane} of subscription `{}` was taken over; attach again",
            self.def.name
        ))
    }

    async fn checkpoint_all(&mut self, position: i64) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        for (lane, fence) in &self.held {
            let cp = self.acked.get(lane).copied().unwrap_or(0);
            if position <= cp {
                continue;
            }
            if !leases::checkpoint(&mut conn, &self.def.name, *lane, &self.owner, *fence, position)
                .await?
            {
                return Err(self.taken_over(*lane));
            }
            self.acked.insert(*lane, position);
        }
        Ok(())
    }
}

/// Acknowledges for the attachment named by `token` from any process (an SSE client posts its
/// acknowledgements on another connection): every emitter it holds moves to `position`. Returns
/// false when the token holds no emitter of `name` (it disconnected and its lease expired).
pub async fn ack_token(pool: &PgPool, name: &str, token: &str, position: i64) -> Result<bool> {
    let moved = sqlx::query(
        "update weir.checkpoints set position = greatest(position, $3), updated_at = now()
         where consumer = $1 and owner = $2 and lease_until > now()",
    )
    .bind(name)
    .bind(token)
    .bind(position)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(moved > 0)
}
