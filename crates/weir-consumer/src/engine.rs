//! Running consumers: a supervisor that shares lanes among processes, and one task per lane.
//!
//! ```text
//! supervisor (every second): heartbeat weir.consumer_nodes → live processes P
//!   per consumer: fair share = ceil(lanes / P)
//!     below share → lease free or expired lanes (fence + 1), start a lane task
//!     above share → stop a lane task, release its lease (others take it)
//!     renew held leases; a lost lease stops its lane task
//! lane task: read after checkpoint ─► route ─► handle with retries ─► fenced checkpoint
//! ```

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use weir_core::{ConsumersConfig, Event, OnExhausted, Ordering, RetryConfig, StartFrom};
use weir_log::{LogReader, Wake};

use crate::{Operator, Result, store};

/// Lease length; a dead process's lanes move after this.
const LEASE_TTL: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_millis(500);
const PAGE: i64 = 500;
/// Most events of one lane handled in one transaction.
const GROUP: usize = 50;

/// One consumer to run.
#[derive(Clone)]
pub struct ConsumerSpec {
    /// Unique name; its checkpoints are kept under it.
    pub name: String,
    /// The handler.
    pub operator: Arc<dyn Operator>,
    /// `global` (one lane) or `per_key`.
    pub ordering: Ordering,
    /// Lanes for `per_key`.
    pub lanes: u32,
    /// Retry policy.
    pub retry: RetryConfig,
    /// After the retries.
    pub on_exhausted: OnExhausted,
    /// Where a new consumer starts.
    pub start_from: StartFrom,
    /// Polling fallback when no wake-up arrives.
    pub poll_interval: Duration,
}

impl std::fmt::Debug for ConsumerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerSpec")
            .field("name", &self.name)
            .field("lanes", &self.lanes)
            .finish()
    }
}

impl ConsumerSpec {
    /// A consumer with the `[consumers]` defaults.
    pub fn new(
        name: impl Into<String>,
        operator: Arc<dyn Operator>,
        defaults: &ConsumersConfig,
    ) -> Self {
        Self {
            name: name.into(),
            operator,
            ordering: defaults.ordering,
            lanes: defaults.lanes,
            retry: defaults.retry,
            on_exhausted: defaults.on_exhausted,
            start_from: defaults.start_from,
            poll_interval: defaults.poll_interval,
        }
    }

    fn lane_count(&self) -> i32 {
        match self.ordering {
            Ordering::Global => 1,
            Ordering::PerKey => self.lanes.max(1) as i32,
        }
    }
}

/// Receives every retry and every final failure (EventStreamex's `ErrorLoggerAdapter`).
pub trait ErrorReporter: Send + Sync + 'static {
    /// A handler failed and will be retried after `delay`.
    fn retry(&self, consumer: &str, event: &Event, attempt: u32, error: &str, delay: Duration);
    /// Retries ran out; `outcome` is what happens now.
    fn exhausted(
        &self,
        consumer: &str,
        event: &Event,
        attempt: u32,
        error: &str,
        outcome: OnExhausted,
    );
}

/// The default reporter: logs through `tracing`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingReporter;

impl ErrorReporter for TracingReporter {
    fn retry(&self, consumer: &str, event: &Event, attempt: u32, error: &str, delay: Duration) {
        tracing::warn!(
            consumer,
            position = event.position,
            attempt,
            error,
            ?delay,
            "handler failed; retrying"
        );
    }
    fn exhausted(
        &self,
        consumer: &str,
        event: &Event,
        attempt: u32,
        error: &str,
        outcome: OnExhausted,
    ) {
        tracing::error!(
            consumer,
            position = event.position,
            attempt,
            error,
            ?outcome,
            "handler failed for good"
        );
    }
}

/// Runs consumers until cancelled.
#[derive(Debug)]
pub struct Engine {
    task: tokio::task::JoinHandle<Result<()>>,
    cancel: CancellationToken,
}

#[derive(Clone)]
struct Shared {
    /// Consumers halted as seen by this process: set by the lane that halts (so the other
    /// lanes here stop before their next event), synced from the database every batch.
    halted: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    pool: PgPool,
    reader: LogReader,
    wake: Wake,
    node: String,
    reporter: Arc<dyn ErrorReporter>,
}

impl Engine {
    /// Registers the consumers (creating their checkpoints) and starts running them. `wake`
    /// announces new log positions (in-process or from `NOTIFY`).
    pub async fn start(
        pool: PgPool,
        specs: Vec<ConsumerSpec>,
        wake: Wake,
        reporter: Arc<dyn ErrorReporter>,
        cancel: CancellationToken,
    ) -> Result<Self> {
        crate::migrate(&pool).await?;
        let reader = LogReader::new(pool.clone()).await?;
        for spec in &specs {
            let selector = spec.operator.selector();
            let start = match spec.start_from {
                StartFrom::Beginning => {
                    reader.oldest().await?.map_or(reader.head().await?, |p| p - 1)
                }
                StartFrom::Now => reader.head().await?,
            };
            let kinds: Vec<String> =
                selector.kinds.iter().map(|k| k.as_str().to_string()).collect();
            let ordering = match spec.ordering {
                Ordering::Global => "global",
                Ordering::PerKey => "per_key",
            };
            store::register(
                &pool,
                &spec.name,
                spec.lane_count(),
                ordering,
                &selector.entities,
                &kinds,
                start,
            )
            .await?;
        }
        let node = format!("{}:{}", hostname(), uuid::Uuid::new_v4().simple());
        let shared = Shared { halted: Arc::default(), pool, reader, wake, node, reporter };
        let task = tokio::spawn(supervise(shared, specs, cancel.clone()));
        Ok(Self { task, cancel })
    }

    /// Stops (gracefully: each lane finishes its current event) and waits.
    pub async fn stop(self) -> Result<()> {
        self.cancel.cancel();
        self.wait().await
    }

    /// Stops at once without releasing anything, as if the process died: its lanes move to other
    /// processes only when their leases expire. For tests of that failure.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Waits until the engine stops (after its cancellation token fires).
    pub async fn wait(self) -> Result<()> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(crate::Error::Config(format!("the consumer supervisor panicked: {e}"))),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

struct Held {
    fence: i64,
    cancel: CancellationToken,
}

async fn supervise(
    shared: Shared,
    specs: Vec<ConsumerSpec>,
    cancel: CancellationToken,
) -> Result<()> {
    let mut lanes: JoinSet<(String, i32)> = JoinSet::new();
    let mut held: HashMap<(String, i32), Held> = HashMap::new();
    let ttl = LEASE_TTL.as_secs_f64();
    let result = loop {
        if cancel.is_cancelled() {
            break Ok(());
        }
        let step: Result<()> = async {
            let live = store::heartbeat(&shared.pool, &shared.node).await?.max(1);
            // Forget lanes whose task ended (lost lease or error).
            while let Some(done) = lanes.try_join_next() {
                if let Ok(key) = done {
                    held.remove(&key);
                }
            }
            for spec in &specs {
                let total = spec.lane_count();
                let share = ((i64::from(total) + live - 1) / live) as usize;
                let mine: Vec<i32> = held.keys().filter(|(c, _)| c == &spec.name).map(|(_, l)| *l).collect();
                for lane in &mine {
                    let h = &held[&(spec.name.clone(), *lane)];
                    if !store::renew(&shared.pool, &spec.name, *lane, &shared.node, h.fence, ttl).await? {
                        h.cancel.cancel();
                    }
                }
                if mine.len() > share {
                    // Give lanes back so a newcomer gets its share.
                    for lane in mine.iter().skip(share) {
                        if let Some(h) = held.remove(&(spec.name.clone(), *lane)) {
                            h.cancel.cancel();
                            store::release(&shared.pool, &spec.name, *lane, &shared.node, h.fence).await?;
                        }
                    }
                } else if mine.len() < share {
                    for lane in 0..total {
                        if held.keys().filter(|(c, _)| c == &spec.name).count() >= share {
                            break;
                        }
                        if held.contains_key(&(spec.name.clone(), lane)) {
                            continue;
                        }
                        if let Some(fence) = store::try_lease(&shared.pool, &spec.name, lane, &shared.node, ttl).await? {
                            let lane_cancel = cancel.child_token();
                            held.insert((spec.name.clone(), lane), Held { fence, cancel: lane_cancel.clone() });
                            let ctx = Lane { shared: shared.clone(), spec: spec.clone(), lane, fence, cancel: lane_cancel };
                            lanes.spawn(async move {
                                let key = (ctx.spec.name.clone(), ctx.lane);
                                if let Err(e) = ctx.run().await {
                                    tracing::warn!(consumer = %key.0, lane = key.1, error = %e, "lane stopped");
                                }
                                key
                            });
                        }
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = step {
            tracing::warn!(error = %e, "consumer supervisor step failed; retrying");
        }
        tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            _ = tokio::time::sleep(TICK) => {}
        }
    };
    for h in held.values() {
        h.cancel.cancel();
    }
    while lanes.join_next().await.is_some() {}
    let _ = store::leave(&shared.pool, &shared.node).await;
    result
}

/// A key's lane: a stable hash, the same in every process.
pub(crate) fn route(key: &str, lanes: i32) -> i32 {
    // FNV-1a: stable across processes and versions (std's hasher is not).
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    key.hash(&mut h);
    (h.finish() % lanes.max(1) as u64) as i32
}

struct Fnv(u64);
impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

enum Handled {
    Done,
    LostLease,
}

struct Lane {
    shared: Shared,
    spec: ConsumerSpec,
    lane: i32,
    fence: i64,
    cancel: CancellationToken,
}

impl Lane {
    async fn run(self) -> Result<()> {
        let filter = self.spec.operator.selector().filter();
        let lanes = self.spec.lane_count();
        let mut pos =
            store::checkpoint_position(&self.shared.pool, &self.spec.name, self.lane).await?;
        let mut stored = pos;
        let mut wake = self.shared.wake.clone();
        let mut status = "";
        loop {
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            if self.spec.on_exhausted == OnExhausted::Park {
                self.retry_parked().await?;
            }
            if self.sync_halted().await? {
                self.set_status(&mut status, "halted", None, 0, None).await?;
                self.sleep(Duration::from_millis(200)).await;
                continue;
            }
            let head = self.shared.reader.head().await?;
            let events = self.shared.reader.read(pos, PAGE, &filter).await?;
            if events.is_empty() {
                // Nothing selected up to the head: move the watermark there.
                if head > stored {
                    if !self.checkpoint_alone(head).await? {
                        return Ok(());
                    }
                    stored = head;
                }
                pos = pos.max(head);
                self.set_status(&mut status, "idle", None, 0, None).await?;
                tokio::select! {
                    _ = self.cancel.cancelled() => return Ok(()),
                    _ = wake.wait_past(pos, self.spec.poll_interval) => {}
                }
                continue;
            }
            self.set_status(&mut status, "running", None, 0, None).await?;
            let short = (events.len() as i64) < PAGE;
            // Consecutive events of this lane are handled in one transaction with one fenced
            // checkpoint (a group); `pos` only moves past events that are done or not ours.
            let mut group: Vec<&Event> = Vec::new();
            let mut last_seen = pos;
            let mut stopped = false;
            for event in &events {
                if self.cancel.is_cancelled() || self.halted_here() {
                    stopped = true;
                    break;
                }
                let key = self.spec.operator.partition_key(event);
                let routed = match &key {
                    Ok(k) => route(k, lanes),
                    Err(_) => 0, // a key that cannot be computed fails on lane 0
                };
                last_seen = event.position;
                if routed != self.lane {
                    if group.is_empty() {
                        pos = event.position;
                    }
                    continue;
                }
                let single = key.is_err() || self.spec.on_exhausted == OnExhausted::Park;
                if !single {
                    group.push(event);
                    if group.len() < GROUP {
                        continue;
                    }
                }
                if let Handled::LostLease = self.flush(&mut group, &mut status).await? {
                    return Ok(());
                }
                if single {
                    let key = key.map_err(|e| e.to_string());
                    if let Handled::LostLease = self.handle(event, key, &mut status).await? {
                        return Ok(());
                    }
                }
                pos = last_seen;
                stored = pos;
            }
            if !stopped {
                if let Handled::LostLease = self.flush(&mut group, &mut status).await? {
                    return Ok(());
                }
                if last_seen > pos {
                    pos = last_seen;
                }
            }
            if short
                && !self.cancel.is_cancelled()
                && !store::is_halted(&self.shared.pool, &self.spec.name).await?
            {
                pos = pos.max(head);
            }
            if pos > stored {
                if !self.checkpoint_alone(pos).await? {
                    return Ok(());
                }
                stored = pos;
            }
        }
    }

    /// Handles a group of this lane's events: all in one transaction with one checkpoint; if
    /// any fails, the group rolls back and its events go one by one through the retry policy.
    async fn flush(&self, group: &mut Vec<&Event>, status: &mut &'static str) -> Result<Handled> {
        let events = std::mem::take(group);
        // One of them failing (`None`) sends them one by one below, to isolate it.
        if events.len() > 1
            && let Some(handled) = self.attempt_group(&events).await?
        {
            return Ok(handled);
        }
        for event in events {
            let key = self.spec.operator.partition_key(event).map_err(|e| e.to_string());
            if let Handled::LostLease = self.handle(event, key, status).await? {
                return Ok(Handled::LostLease);
            }
        }
        Ok(Handled::Done)
    }

    /// One transaction for several events; `None` when a handler failed (rolled back).
    async fn attempt_group(&self, events: &[&Event]) -> Result<Option<Handled>> {
        let mut conn = self.shared.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        for event in events {
            if self.call_handler(&mut tx, event).await.is_some() {
                let _ = tx.rollback().await;
                return Ok(None);
            }
        }
        let last = events.last().expect("a group has events").position;
        if !self.fenced_checkpoint(&mut tx, last).await? {
            let _ = tx.rollback().await;
            return Ok(Some(Handled::LostLease));
        }
        if let Err(e) = tx.commit().await
            && !self.committed_anyway(last, &e).await?
        {
            return Ok(None);
        }
        metrics::counter!("weir_consumer_events_handled_total", "consumer" => self.spec.name.clone())
            .increment(events.len() as u64);
        Ok(Some(Handled::Done))
    }

    /// After a failed COMMIT: the connection may have dropped after the commit took effect.
    /// The fenced checkpoint tells: if it reached `position`, the effects are in and handling
    /// again would apply them twice.
    async fn committed_anyway(&self, position: i64, error: &sqlx::Error) -> Result<bool> {
        let stored =
            store::checkpoint_position(&self.shared.pool, &self.spec.name, self.lane).await?;
        if stored >= position {
            tracing::warn!(consumer = %self.spec.name, position, %error, "commit reported an error but took effect");
            return Ok(true);
        }
        Ok(false)
    }

    /// The lane's checkpoint, fenced by its lease (see [`store::checkpoint`]).
    async fn fenced_checkpoint(&self, conn: &mut PgConnection, position: i64) -> Result<bool> {
        store::checkpoint(conn, &self.spec.name, self.lane, &self.shared.node, self.fence, position)
            .await
    }

    fn halted_here(&self) -> bool {
        self.shared.halted.lock().expect("halted set").contains(&self.spec.name)
    }

    /// Reads the consumer's state from the database into the shared set; returns it.
    async fn sync_halted(&self) -> Result<bool> {
        let halted = store::is_halted(&self.shared.pool, &self.spec.name).await?;
        let mut set = self.shared.halted.lock().expect("halted set");
        if halted {
            set.insert(self.spec.name.clone());
        } else {
            set.remove(&self.spec.name);
        }
        Ok(halted)
    }

    async fn sleep(&self, d: Duration) {
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }

    async fn set_status(
        &self,
        current: &mut &'static str,
        status: &'static str,
        at: Option<i64>,
        attempt: i32,
        error: Option<&str>,
    ) -> Result<()> {
        if *current == status && error.is_none() && at.is_none() {
            return Ok(());
        }
        *current = status;
        store::set_status(
            &self.shared.pool,
            &self.spec.name,
            self.lane,
            self.fence,
            status,
            at,
            attempt,
            error,
        )
        .await
    }

    async fn checkpoint_alone(&self, position: i64) -> Result<bool> {
        let mut conn = self.shared.pool.acquire().await?;
        self.fenced_checkpoint(&mut conn, position).await
    }

    /// One attempt: the handler and the checkpoint in one transaction. `Ok(None)`: committed;
    /// `Ok(Some(Handled::LostLease))`: rolled back, the lease is gone; `Err`: the handler failed.
    async fn attempt(&self, event: &Event) -> Result<Result<Option<Handled>, String>> {
        let mut conn = self.shared.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        if let Some(f) = self.call_handler(&mut tx, event).await {
            let _ = tx.rollback().await;
            return Ok(Err(f));
        }
        if !self.fenced_checkpoint(&mut tx, event.position).await? {
            let _ = tx.rollback().await;
            return Ok(Ok(Some(Handled::LostLease)));
        }
        match tx.commit().await {
            Ok(()) => {
                metrics::counter!("weir_consumer_events_handled_total", "consumer" => self.spec.name.clone())
                    .increment(1);
                metrics::gauge!("weir_consumer_position", "consumer" => self.spec.name.clone(), "lane" => self.lane.to_string())
                    .set(event.position as f64);
                Ok(Ok(None))
            }
            // A failed commit (serialization, constraint) is the handler's failure too.
            Err(e) if self.committed_anyway(event.position, &e).await? => Ok(Ok(None)),
            Err(e) => Ok(Err(format!("commit failed: {e}"))),
        }
    }

    async fn handle(
        &self,
        event: &Event,
        key: std::result::Result<String, String>,
        status: &mut &'static str,
    ) -> Result<Handled> {
        if let (OnExhausted::Park, Ok(k)) = (self.spec.on_exhausted, &key)
            && store::key_parked(&self.shared.pool, &self.spec.name, k).await?
        {
            return self.set_aside(event, k, "an earlier event of this key is parked", 0).await;
        }
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let result = match &key {
                Ok(_) => self.attempt(event).await?,
                Err(e) => Err(format!("no partition key: {e}")),
            };
            let error = match result {
                Ok(None) => return Ok(Handled::Done),
                Ok(Some(lost)) => return Ok(lost),
                Err(e) => e,
            };
            metrics::counter!("weir_consumer_failures_total", "consumer" => self.spec.name.clone())
                .increment(1);
            let retry = &self.spec.retry;
            if attempt <= retry.max_retries {
                metrics::counter!("weir_consumer_retries_total", "consumer" => self.spec.name.clone()).increment(1);
                let delay = retry.delay(attempt);
                self.shared.reporter.retry(&self.spec.name, event, attempt, &error, delay);
                let mut conn = self.shared.pool.acquire().await?;
                store::record_failure(
                    &mut conn,
                    &self.spec.name,
                    self.lane,
                    event.position,
                    attempt as i32,
                    &error,
                    "retry",
                )
                .await?;
                self.set_status(
                    status,
                    "retrying",
                    Some(event.position),
                    attempt as i32,
                    Some(&error),
                )
                .await?;
                self.sleep(delay).await;
                if self.cancel.is_cancelled() {
                    return Ok(Handled::LostLease);
                }
                continue;
            }
            self.shared.reporter.exhausted(
                &self.spec.name,
                event,
                attempt,
                &error,
                self.spec.on_exhausted,
            );
            match self.spec.on_exhausted {
                OnExhausted::Halt => {
                    {
                        let mut conn = self.shared.pool.acquire().await?;
                        store::record_failure(
                            &mut conn,
                            &self.spec.name,
                            self.lane,
                            event.position,
                            attempt as i32,
                            &error,
                            "halt",
                        )
                        .await?;
                    }
                    store::halt(
                        &self.shared.pool,
                        &self.spec.name,
                        self.lane,
                        event.position,
                        attempt as i32,
                        &error,
                    )
                    .await?;
                    self.set_status(
                        status,
                        "halted",
                        Some(event.position),
                        attempt as i32,
                        Some(&error),
                    )
                    .await?;
                    // Wait for `weir resume`, then start over at this same event.
                    while self.sync_halted().await? {
                        self.sleep(Duration::from_millis(200)).await;
                        if self.cancel.is_cancelled() {
                            return Ok(Handled::LostLease);
                        }
                    }
                    self.set_status(status, "running", None, 0, None).await?;
                    // `weir skip` moved the checkpoint past this event.
                    if store::checkpoint_position(&self.shared.pool, &self.spec.name, self.lane)
                        .await?
                        >= event.position
                    {
                        return Ok(Handled::Done);
                    }
                    attempt = 0;
                }
                OnExhausted::Skip => {
                    let mut conn = self.shared.pool.acquire().await?;
                    let tx = conn.begin().await?;
                    return self.settle(tx, event, attempt as i32, &error, "skip").await;
                }
                OnExhausted::Park => {
                    let k = key.clone().unwrap_or_default();
                    return self.set_aside(event, &k, &error, attempt as i32).await;
                }
            }
        }
    }

    async fn set_aside(
        &self,
        event: &Event,
        key: &str,
        error: &str,
        attempts: i32,
    ) -> Result<Handled> {
        let mut conn = self.shared.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        store::park(
            &mut tx,
            &self.spec.name,
            self.lane,
            event.position,
            key,
            &event.entity,
            error,
            attempts,
        )
        .await?;
        self.settle(tx, event, attempts, error, "park").await
    }

    /// Ends an event without its handler's effect: records the failure with `outcome` and
    /// moves the fenced checkpoint past it, in `tx` (which may already hold a parked row).
    async fn settle(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        event: &Event,
        attempts: i32,
        error: &str,
        outcome: &str,
    ) -> Result<Handled> {
        store::record_failure(
            &mut tx,
            &self.spec.name,
            self.lane,
            event.position,
            attempts,
            error,
            outcome,
        )
        .await?;
        if !self.fenced_checkpoint(&mut tx, event.position).await? {
            return Ok(Handled::LostLease);
        }
        tx.commit().await?;
        Ok(Handled::Done)
    }

    /// Runs the handler in `tx`; a returned error or a panic is the failure's message.
    async fn call_handler(&self, tx: &mut PgConnection, event: &Event) -> Option<String> {
        let started = std::time::Instant::now();
        let outcome = AssertUnwindSafe(self.spec.operator.handle(tx, event)).catch_unwind().await;
        metrics::histogram!("weir_consumer_handler_seconds", "consumer" => self.spec.name.clone())
            .record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(panic) => Some(format!("handler panicked: {}", panic_message(&panic))),
        }
    }

    /// Handles parked events someone asked to retry, oldest first; on success the parked row
    /// goes in the same transaction; a failure leaves it (and the rest of its key) parked.
    async fn retry_parked(&self) -> Result<()> {
        let requests = store::retry_requests(&self.shared.pool, &self.spec.name, self.lane).await?;
        let mut failed_keys: Vec<String> = Vec::new();
        for (position, key) in requests {
            if failed_keys.contains(&key) {
                continue;
            }
            let Some(event) = self
                .shared
                .reader
                .read(position - 1, 1, &Default::default())
                .await?
                .into_iter()
                .next()
            else {
                // Dropped by retention: nothing to retry.
                sqlx::query("delete from weir.parked where consumer = $1 and position = $2")
                    .bind(&self.spec.name)
                    .bind(position)
                    .execute(&self.shared.pool)
                    .await?;
                continue;
            };
            let mut conn = self.shared.pool.acquire().await?;
            let mut tx = conn.begin().await?;
            match self.call_handler(&mut tx, &event).await {
                None => {
                    sqlx::query("delete from weir.parked where consumer = $1 and position = $2")
                        .bind(&self.spec.name)
                        .bind(position)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                }
                Some(error) => {
                    let _ = tx.rollback().await;
                    sqlx::query(
                        "update weir.parked set retry_requested = false, attempts = attempts + 1, error = $3
                         where consumer = $1 and position = $2",
                    )
                    .bind(&self.spec.name)
                    .bind(position)
                    .bind(&error)
                    .execute(&self.shared.pool)
                    .await?;
                    failed_keys.push(key);
                }
            }
        }
        Ok(())
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_stable_and_spreads() {
        assert_eq!(route("{\"id\":1}", 8), route("{\"id\":1}", 8));
        let mut seen = std::collections::HashSet::new();
        for i in 0..100 {
            seen.insert(route(&format!("{{\"id\":{i}}}"), 8));
        }
        assert_eq!(seen.len(), 8);
        assert_eq!(route("anything", 1), 0);
    }
}
