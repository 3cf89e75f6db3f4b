//! Process status: has a change been handled by every consumer that listens to it?
//!
//! Derived from the checkpoints, so every process answers the same:
//! - a consumer's watermark is the lowest checkpoint of its lanes; every event it selects at or
//!   below the watermark is handled (lanes move past other lanes' events too);
//! - an event's timestamp is the row's `timestamp_column` (default `updated_at`) when the table
//!   has such a timestamp column, else the commit time.
//!
//! `processed(entity, ts)` is true iff a change of `entity` with a timestamp at or after `ts` is
//! in the log, no change of `entity` with a timestamp at or below `ts` lies beyond the watermark
//! of a consumer listening to it, and none is parked. An entity no consumer listens to counts as
//! processed once logged.
//!
//! ## An LSN token
//!
//! A writer reads `pg_current_wal_insert_lsn()` right after its commit: the token `T`. `T` is
//! processed when every commit at or below `T` that touches a watched table is in the log and
//! handled by every consumer. [`processed_lsn`] is the highest such LSN, the first of:
//!
//! 1. an event lies beyond the lowest watermark of any consumer: the LSN just below that
//!    event's commit. The log is in commit order, so every commit below it is logged and, being
//!    at or below every watermark, handled;
//! 2. otherwise everything logged is handled, and the answer is how far the log is known to be
//!    complete: the greatest of the last appended commit (`weir.source_state.lsn`), the
//!    ingesting process's confirmed position (`confirmed_lsn`, its heartbeat) and the slot's
//!    `confirmed_flush_lsn` in `pg_replication_slots`.
//!
//! Why the last two: `T` is usually *beyond* the last logged commit. Between the writer's
//! commit and its `pg_current_wal_insert_lsn()`, other sessions write WAL too — weir's own
//! lanes (checkpoints), heartbeats and appends among them — so `T` lands after WAL that
//! touches no watched table and that no event will ever carry. Only the walsender can say
//! nothing watched lies there: its keepalive carries the position it has decoded up to, and
//! ingestion acknowledges that position to the slot once every transaction received before the
//! keepalive is appended (`weir::ingest`'s invariant; the acknowledgement never runs ahead of
//! the log). Before, this path read only the heartbeat's `confirmed_lsn`, written once a second:
//! a token behind weir's own writes waited up to a second. The slot's `confirmed_flush_lsn` is
//! updated in the server's memory the moment the walsender reads the acknowledgement, which
//! ingestion sends at most 100 ms after its position moves (at once when idle). Soundness
//! holds because each of the three only ever covers commits that are in the log; a slot
//! moved by hand (`pg_replication_slot_advance`) skips changes for good, so nothing waits for
//! them anyway.
//!
//! ## One watcher for many waiters
//!
//! ```text
//!  long-poll / TooEarlyLayer ─┐ register (LSN or entity, ts)       ┌─► resolved: 200
//!  long-poll ─────────────────┼──► ProcessWatch ── one tick query ─┤
//!  long-poll ─────────────────┘    (a task while anyone waits)     └─► timeout: 425
//!                 ▲ woken by: an append (Wake: in-process watch or NOTIFY weir_events),
//!                 │ a new waiter, a timer (checkpoints have no notification: 2 ms while a
//!                 │ lane has events to handle, 10 ms otherwise)
//! ```
//!
//! [`ProcessWatch`] holds the waiters; its task, started by the first and gone with the last,
//! reads [`Tick`](crate::store::process) (head, watermarks, the LSNs above, fingerprints of the
//! checkpoints and parked events) in one statement per tick however many wait, resolves every
//! LSN waiter at or below the answer, and — only when something moved or a waiter is new —
//! asks the entity waiters' questions in one more statement. So a thousand long-polls cost what
//! one does.
//!
//! The `processed` channel (weir-server) walks the log behind the watermarks with
//! [`watermarks`] and [`processed_events`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{Notify, oneshot};
use weir_core::{Lsn, Position};
use weir_log::Wake;

use crate::{Error, Result, store};

/// The newest timestamp (µs since the Unix epoch) among the recent events of `entity` handled
/// by every consumer listening to it; `None` when there is none.
pub async fn last_processed(pool: &PgPool, entity: &str, column: &str) -> Result<Option<i64>> {
    let ts = store::process::last_processed(pool, entity, column).await?;
    Ok(ts.map(|ts| ts.timestamp_micros()))
}

/// Whether every change of `entity` with a timestamp at or below `ts_us` (µs since the Unix
/// epoch) has been handled by every consumer listening to it.
///
/// True iff a change of `entity` with a timestamp at or after `ts_us` is in the log (the
/// write the caller made has been captured), no change of `entity` with a timestamp at or
/// below `ts_us` lies beyond the watermark of a consumer listening to it, and none is parked.
/// Timestamps need not rise with log position (an update may carry an older `updated_at`).
pub async fn processed(pool: &PgPool, entity: &str, ts_us: i64, column: &str) -> Result<bool> {
    store::process::processed(pool, entity, ts_us, column).await
}

/// The WAL position up to which every logged change has been handled by every consumer: a
/// writer that reads `pg_current_wal_insert_lsn()` after its commit can wait for it. (Not
/// `pg_current_wal_lsn()`: with `synchronous_commit = off` that write position can still be
/// behind the commit that just returned.) See the module docs for how it is found.
pub async fn processed_lsn(pool: &PgPool) -> Result<Lsn> {
    Ok(lsn_of(&store::process::tick(pool).await?))
}

fn lsn_of(tick: &store::process::Tick) -> Lsn {
    let pick = tick.beyond.as_deref().or(tick.logged.as_deref()).unwrap_or("0/0");
    pick.parse().unwrap_or(Lsn::ZERO)
}

/// Waits until [`processed_lsn`] reaches `lsn`, or `timeout` passes. Returns whether it did.
///
/// For one caller (a script, a test): it watches alone, polling every few milliseconds. A
/// process with many waiters shares one [`ProcessWatch`].
pub async fn wait_for(pool: &PgPool, lsn: Lsn, timeout: Duration) -> Result<bool> {
    ProcessWatch::new(pool.clone(), DEFAULT_TIMESTAMP_COLUMN).wait_lsn(lsn, timeout).await
}

/// The timestamp column [`wait_for`]'s watcher would compare (it asks only about LSNs).
const DEFAULT_TIMESTAMP_COLUMN: &str = "updated_at";

/// Between ticks while a lane has events beyond its checkpoint (a checkpoint is about to move).
const TICK_BUSY: Duration = Duration::from_millis(2);
/// Between ticks otherwise (waiting for an append, or for the slot's acknowledgement).
const TICK_IDLE: Duration = Duration::from_millis(10);
/// Least time between two ticks when new waiters keep arriving.
const TICK_MIN: Duration = Duration::from_millis(1);
/// Entity waiters are asked again at least this often, even when nothing seemed to move.
const ENTITY_REFRESH: Duration = Duration::from_secs(1);

/// What a waiter is told: processed, or the watcher's query failed.
type Reply = std::result::Result<(), Arc<Error>>;

/// One process-status watcher shared by every waiter of a process: long-polls and the `425`
/// layer register what they wait for, and one task reads the database once per tick for all of
/// them (see the module docs). Cheap to clone; clones share the watcher.
#[derive(Debug, Clone)]
pub struct ProcessWatch(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    pool: PgPool,
    column: String,
    wake: Option<Wake>,
    waiters: Mutex<Waiters>,
    /// A waiter came (ask soon) or the last one left (stop soon).
    kick: Notify,
    queries: AtomicU64,
}

#[derive(Debug, Default)]
struct Waiters {
    /// A watcher task runs.
    running: bool,
    next_id: u64,
    lsn: BTreeMap<(Lsn, u64), oneshot::Sender<Reply>>,
    entity: BTreeMap<(String, i64), HashMap<u64, oneshot::Sender<Reply>>>,
    /// An entity question nobody asked the database yet.
    new_entity: bool,
    /// The last [`processed_lsn`] the running watcher read.
    processed: Option<Lsn>,
}

impl Waiters {
    fn is_empty(&self) -> bool {
        self.lsn.is_empty() && self.entity.is_empty()
    }
}

/// What one waiter waits for (to deregister it when it leaves).
enum Key {
    Lsn(Lsn, u64),
    Entity(String, i64, u64),
}

impl ProcessWatch {
    /// A watcher of `pool`'s weir schema; entity timestamps compare `timestamp_column`
    /// (`updated_at`). Without [`ProcessWatch::wake_on`] it learns of appends by its timer.
    pub fn new(pool: PgPool, timestamp_column: impl Into<String>) -> Self {
        Self(Arc::new(Shared {
            pool,
            column: timestamp_column.into(),
            wake: None,
            waiters: Mutex::new(Waiters::default()),
            kick: Notify::new(),
            queries: AtomicU64::new(0),
        }))
    }

    /// Also asks at once after every append `wake` announces ([`weir_log::listen_for_appends`]
    /// or the ingesting process's own).
    pub fn wake_on(self, wake: Wake) -> Self {
        let s = Arc::try_unwrap(self.0).unwrap_or_else(|shared| Shared {
            pool: shared.pool.clone(),
            column: shared.column.clone(),
            wake: None,
            waiters: Mutex::new(Waiters::default()),
            kick: Notify::new(),
            queries: AtomicU64::new(0),
        });
        Self(Arc::new(Shared { wake: Some(wake), ..s }))
    }

    /// The timestamp column entity waits compare.
    pub fn timestamp_column(&self) -> &str {
        &self.0.column
    }

    /// Statements this watcher has sent to the database (ticks, entity questions, checks).
    pub fn queries(&self) -> u64 {
        self.0.queries.load(Ordering::Relaxed)
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        let w = self.lock();
        w.lsn.len() + w.entity.values().map(HashMap::len).sum::<usize>()
    }

    /// Whether the watcher task runs (someone waits, or the last one just left).
    pub fn is_watching(&self) -> bool {
        self.lock().running
    }

    /// Whether everything committed at or below `lsn` is processed, asked now.
    pub async fn check_lsn(&self, lsn: Lsn) -> Result<bool> {
        if self.lock().processed.is_some_and(|p| p >= lsn) {
            return Ok(true);
        }
        self.count();
        Ok(processed_lsn(&self.0.pool).await? >= lsn)
    }

    /// [`processed`] for `entity` at `ts_us`, asked now.
    pub async fn check_entity(&self, entity: &str, ts_us: i64) -> Result<bool> {
        self.count();
        processed(&self.0.pool, entity, ts_us, &self.0.column).await
    }

    /// Waits until everything committed at or below `lsn` is processed (true), or `timeout`
    /// passes (false).
    pub async fn wait_lsn(&self, lsn: Lsn, timeout: Duration) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        let key = {
            let mut w = self.lock();
            if w.processed.is_some_and(|p| p >= lsn) {
                return Ok(true);
            }
            let id = next_id(&mut w);
            w.lsn.insert((lsn, id), tx);
            Key::Lsn(lsn, id)
        };
        self.wait(key, rx, timeout).await
    }

    /// Waits until [`processed`] holds for `entity` at `ts_us` (true), or `timeout` passes
    /// (false).
    pub async fn wait_entity(&self, entity: &str, ts_us: i64, timeout: Duration) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        let key = {
            let mut w = self.lock();
            let id = next_id(&mut w);
            w.entity.entry((entity.to_string(), ts_us)).or_default().insert(id, tx);
            w.new_entity = true;
            Key::Entity(entity.to_string(), ts_us, id)
        };
        self.wait(key, rx, timeout).await
    }

    async fn wait(
        &self,
        key: Key,
        rx: oneshot::Receiver<Reply>,
        timeout: Duration,
    ) -> Result<bool> {
        // Leaving (answered, timed out, or the request dropped) takes the waiter out.
        let _leave = Leave { watch: self, key };
        self.start_or_kick();
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(()))) => Ok(true),
            Ok(Ok(Err(e))) => Err(Error::ProcessWatch(e)),
            // The watcher went away without answering: it panicked (a bug).
            Ok(Err(_)) => Err(Error::ProcessWatch(Arc::new(Error::SupervisorPanicked(
                "the process-status watcher ended while a request waited".into(),
            )))),
            Err(_) => Ok(false),
        }
    }

    fn start_or_kick(&self) {
        let start = {
            let mut w = self.lock();
            !std::mem::replace(&mut w.running, true)
        };
        if start {
            tokio::spawn(watch(self.0.clone()));
        } else {
            self.0.kick.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        lock(&self.0)
    }

    fn count(&self) {
        count(&self.0);
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Waiters> {
    // Nothing panics while holding it; a poisoned lock still holds consistent maps.
    shared.waiters.lock().unwrap_or_else(|p| p.into_inner())
}

fn count(shared: &Shared) {
    shared.queries.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("weir_process_watch_queries_total").increment(1);
}

fn next_id(w: &mut Waiters) -> u64 {
    w.next_id += 1;
    w.next_id
}

/// Takes a waiter out of the watcher when it leaves.
struct Leave<'a> {
    watch: &'a ProcessWatch,
    key: Key,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let empty = {
            let mut w = self.watch.lock();
            match &self.key {
                Key::Lsn(lsn, id) => {
                    w.lsn.remove(&(*lsn, *id));
                }
                Key::Entity(entity, ts, id) => {
                    let k = (entity.clone(), *ts);
                    if let Some(m) = w.entity.get_mut(&k) {
                        m.remove(id);
                        if m.is_empty() {
                            w.entity.remove(&k);
                        }
                    }
                }
            }
            w.is_empty()
        };
        if empty {
            // The watcher stops now rather than at its next tick.
            self.watch.0.kick.notify_one();
        }
    }
}

/// The watcher task: one tick query for everyone while anyone waits.
async fn watch(shared: Arc<Shared>) {
    let mut wake = shared.wake.clone();
    let mut asked: Option<(i64, i64, i64, Instant)> = None;
    let mut failures = 0u32;
    loop {
        {
            let mut w = lock(&shared);
            if w.is_empty() {
                // Under the lock a waiter registers with: it either saw `running` and is
                // already in the maps (not empty), or it will see `false` and start a watcher.
                w.running = false;
                w.processed = None;
                return;
            }
        }
        let started = Instant::now();
        let seen_head = wake.as_ref().map_or(0, Wake::head);
        let mut pause = TICK_IDLE;
        count(&shared);
        match store::process::tick(&shared.pool).await {
            Ok(tick) => {
                failures = 0;
                let lsn = lsn_of(&tick);
                if tick.low.is_some_and(|low| low < tick.head) {
                    pause = TICK_BUSY;
                }
                let questions = {
                    let mut w = lock(&shared);
                    w.processed = Some(lsn);
                    // Every waiter at or below the answer.
                    let above = w.lsn.split_off(&(Lsn(lsn.0.saturating_add(1)), 0));
                    let done = std::mem::replace(&mut w.lsn, above);
                    for tx in done.into_values() {
                        let _ = tx.send(Ok(()));
                    }
                    let moved = asked.is_none_or(|(h, c, p, at)| {
                        (h, c, p) != (tick.head, tick.checkpoints, tick.parked)
                            || at.elapsed() >= ENTITY_REFRESH
                    });
                    if !w.entity.is_empty() && (moved || w.new_entity) {
                        w.new_entity = false;
                        w.entity.keys().cloned().collect::<Vec<_>>()
                    } else {
                        Vec::new()
                    }
                };
                if !questions.is_empty() {
                    asked = Some((tick.head, tick.checkpoints, tick.parked, Instant::now()));
                    count(&shared);
                    match store::process::processed_many(&shared.pool, &questions, &shared.column)
                        .await
                    {
                        Ok(answers) => {
                            let mut w = lock(&shared);
                            for (q, yes) in questions.into_iter().zip(answers) {
                                if yes && let Some(waiting) = w.entity.remove(&q) {
                                    for tx in waiting.into_values() {
                                        let _ = tx.send(Ok(()));
                                    }
                                }
                            }
                        }
                        Err(e) => fail_all(&shared, e),
                    }
                }
            }
            Err(e) => {
                failures += 1;
                fail_all(&shared, e);
                pause = weir_core::Backoff::RECONNECT.delay(failures).min(Duration::from_secs(1));
            }
        }
        // Until the next tick: an append, a new waiter (not sooner than TICK_MIN after this
        // tick began), or the timer.
        let timer = tokio::time::sleep(pause);
        let kicked = async {
            shared.kick.notified().await;
            tokio::time::sleep_until((started + TICK_MIN).into()).await;
        };
        match wake.as_mut() {
            Some(wake) => tokio::select! {
                _ = timer => {}
                _ = kicked => {}
                _ = wake.wait_past(seen_head, pause) => {}
            },
            None => tokio::select! {
                _ = timer => {}
                _ = kicked => {}
            },
        }
    }
}

/// A failed query answers every current waiter with the error (as a lone query would have).
fn fail_all(shared: &Shared, e: Error) {
    tracing::warn!(error = %e, "process status: the watcher's query failed");
    let e = Arc::new(e);
    let mut w = lock(shared);
    for tx in std::mem::take(&mut w.lsn).into_values() {
        let _ = tx.send(Err(e.clone()));
    }
    for waiting in std::mem::take(&mut w.entity).into_values() {
        for tx in waiting.into_values() {
            let _ = tx.send(Err(e.clone()));
        }
    }
}

/// The log head and every consumer's watermark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watermarks {
    /// The log's head position.
    pub head: Position,
    /// Each consumer's watermark, sorted.
    pub consumers: Vec<ConsumerWatermark>,
}

/// What one consumer listens to and how far it has handled all of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConsumerWatermark {
    /// The entities it listens to (empty: all).
    pub entities: Vec<String>,
    /// Every event it selects at or below this position is handled.
    pub watermark: Position,
}

impl ConsumerWatermark {
    /// Whether this consumer listens to `entity`.
    pub fn listens_to(&self, entity: &str) -> bool {
        self.entities.is_empty() || self.entities.iter().any(|e| e == entity)
    }
}

/// The watermarks; `None` when the consumer tables (or the log) do not exist yet.
pub async fn watermarks(pool: &PgPool) -> Result<Option<Watermarks>> {
    store::process::watermarks(pool).await
}

/// A logged event as the `processed` channel announces it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedEvent {
    /// Log position.
    pub position: Position,
    /// Entity.
    pub entity: String,
    /// Primary key.
    pub key: serde_json::Value,
    /// Kind (`insert`, …).
    pub kind: String,
    /// The commit's LSN.
    pub lsn: String,
    /// Whether a consumer ever parked it: read from the failures (outcome `park`), which are
    /// never deleted, not from `weir.parked`, whose row goes when the event is retried or
    /// discarded — so the live tail and a later replay agree on whether it is announced.
    pub parked: bool,
}

/// Logged events in (`after`, `upto`], at most `limit`, oldest first, with their parked flag.
pub async fn processed_events(
    pool: &PgPool,
    after: Position,
    upto: Position,
    limit: i64,
) -> Result<Vec<ProcessedEvent>> {
    store::process::processed_events(pool, after, upto, limit).await
}

/// For tests: forgets recorded failures and parked events and moves every checkpoint to the
/// log's head, so everything logged so far counts as processed.
#[cfg(feature = "testing")]
pub async fn reset(pool: &PgPool) -> Result<()> {
    store::process::reset(pool).await
}
