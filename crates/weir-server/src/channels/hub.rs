//! The hub: one log tail and one processed tail per server, fanning messages out to the
//! clients' bounded queues.
//!
//! ```text
//! Wake / 1 s poll ─► change tail: read pages of the subscribed entities after P ─┐
//! 75 ms poll ─────► processed tail: watermarks + events after Q ─────────────────┤
//!                                                                                  ▼
//!                  registry (one mutex): P, Q, channel → clients, `processed` clients
//!                    under the lock: snapshot the subscriber lists, move P (or Q)  │
//!                                                                                  │
//!                    after it: each message serialized once, Arc shared ◄──────────┘
//!                       client queue (≤ http.client_buffer; full ⇒ dropped as slow_client)
//! ```
//!
//! A client registers under the registry lock and learns P and Q at that instant: every change
//! after P and every notification after Q reaches its queue, nothing at or before them does,
//! so a resuming client replays (cursor, P] from the log and misses nothing. The tails hold
//! the lock only to take a snapshot of the subscriber lists (copy-on-write `Arc`s) and move P
//! or Q over a part of at most 256 events; they push to the clients after releasing it, so a
//! client registering meanwhile already sees the moved position and replays that part instead.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use weir_consumer::process::{self, ConsumerWatermark, Watermarks};
use weir_core::{Config, Event, Position};
use weir_log::{EventFilter, LogReader, Wake};

use super::message::{Channel, KeyColumns, Msg, ProcessedEvent, Routing, event_json};

/// Events read per page by the tails and by replays.
pub(crate) const PAGE: i64 = 1000;
/// Most events dispatched under one hold of the registry lock (a quarter of a client's queue
/// when that is less).
const DISPATCH_CHUNK: usize = 256;
/// How often the processed tail looks at the checkpoints.
const PROCESSED_POLL: Duration = Duration::from_millis(75);
/// The change tail's fallback poll when no wake-up arrives.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

/// One log tail fanning events out to channel clients. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    pub(crate) shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    pub(crate) reader: LogReader,
    pub(crate) routing: Routing,
    pub(crate) client_buffer: usize,
    /// Events dispatched between yields: a quarter of a client's queue, at most 256.
    dispatch_chunk: usize,
    pub(crate) cancel: CancellationToken,
    registry: Mutex<Registry>,
    /// Mirrors of the registry's P and Q, readable without the lock.
    change_pos: AtomicI64,
    processed_pos: AtomicI64,
    key_columns: RwLock<Arc<KeyColumns>>,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct Registry {
    /// P: the last log position dispatched to change channels.
    change_pos: Position,
    /// Q: the last position the processed tail decided.
    processed_pos: Position,
    /// Copy-on-write: a tail pushing to a snapshot never holds up a registration.
    channels: Arc<Subscribers>,
    /// Subscriptions per entity: the change tail reads only these entities.
    entities: HashMap<Box<str>, usize>,
    /// Bumped when an entity gains its first subscriber: a page read with an older entity
    /// list must be read again.
    generation: u64,
    processed: Arc<Vec<Arc<Client>>>,
    /// What each client is registered on.
    clients: HashMap<u64, HashSet<Channel>>,
}

/// The clients of each change channel.
type Subscribers = HashMap<Box<str>, Arc<Vec<Arc<Client>>>>;

/// A client's bounded queue of shared messages.
#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) id: u64,
    cap: usize,
    queue: Mutex<Queue>,
    pub(crate) notify: Notify,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Arc<Msg>>,
    dropped: bool,
}

/// What [`Client::take`] found.
#[derive(Debug)]
pub(crate) enum Taken {
    Items(VecDeque<Arc<Msg>>),
    Empty,
    Dropped,
}

impl Client {
    /// Queues `msgs` together; a queue that would exceed its bound is emptied and marked
    /// dropped. Returns how many were queued.
    fn push(&self, msgs: &[Arc<Msg>]) -> usize {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.dropped {
            return 0;
        }
        if q.items.len() + msgs.len() > self.cap {
            q.dropped = true;
            q.items = VecDeque::new();
            drop(q);
            metrics::counter!("weir_channel_dropped_total", "reason" => "slow_client").increment(1);
            self.notify.notify_one();
            return 0;
        }
        let was_empty = q.items.is_empty();
        q.items.extend(msgs.iter().cloned());
        drop(q);
        if was_empty {
            self.notify.notify_one();
        }
        msgs.len()
    }

    /// Whether it was dropped as too slow.
    pub(crate) fn is_dropped(&self) -> bool {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).dropped
    }

    /// Takes everything queued.
    pub(crate) fn take(&self) -> Taken {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.dropped {
            Taken::Dropped
        } else if q.items.is_empty() {
            Taken::Empty
        } else {
            // Taking the deque leaves an unallocated one: an idle client holds no buffer.
            Taken::Items(std::mem::take(&mut q.items))
        }
    }
}

impl Hub {
    /// Starts the tails: changes at the log's head, processed notifications at the lowest
    /// consumer watermark (or the head). Both stop when `cancel` fires, and so does every
    /// stream.
    pub async fn start(
        pool: PgPool,
        config: &Config,
        wake: Wake,
        cancel: CancellationToken,
    ) -> Result<Hub, weir_log::Error> {
        let reader = LogReader::new(pool.clone()).await?;
        let head = match reader.head().await {
            Ok(head) => head,
            // `weir init` has not run yet: the log will start empty.
            Err(weir_log::Error::Database(e)) if undefined_table(&e) => 0,
            Err(e) => return Err(e),
        };
        let processed_start = match watermarks(&pool).await? {
            Some(w) => w.head.min(w.consumers.iter().map(|c| c.watermark).min().unwrap_or(w.head)),
            None => head,
        };
        let shared = Arc::new(Shared {
            pool,
            reader,
            routing: Routing::new(config),
            client_buffer: config.http.client_buffer.max(1),
            dispatch_chunk: (config.http.client_buffer / 4).clamp(1, DISPATCH_CHUNK),
            cancel: cancel.clone(),
            registry: Mutex::new(Registry {
                change_pos: head,
                processed_pos: processed_start,
                ..Registry::default()
            }),
            change_pos: AtomicI64::new(head),
            processed_pos: AtomicI64::new(processed_start),
            key_columns: RwLock::new(Arc::new(KeyColumns::new())),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(change_tail(shared.clone(), wake));
        tokio::spawn(processed_tail(shared.clone()));
        Ok(Hub { shared })
    }

    /// How many clients are registered.
    pub fn clients(&self) -> usize {
        self.shared.lock().clients.len()
    }

    /// The last log position dispatched to the change channels.
    pub fn position(&self) -> Position {
        self.shared.change_pos.load(Ordering::Acquire)
    }

    /// The last position the processed channel has decided.
    pub fn processed_position(&self) -> Position {
        self.shared.processed_pos.load(Ordering::Acquire)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn change_pos(&self) -> Position {
        self.change_pos.load(Ordering::Acquire)
    }

    pub(crate) fn processed_pos(&self) -> Position {
        self.processed_pos.load(Ordering::Acquire)
    }

    /// A new, unregistered client.
    pub(crate) fn client(&self) -> Arc<Client> {
        Arc::new(Client {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            cap: self.client_buffer,
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
        })
    }

    /// Registers `client` on `channels` (adding to what it has); returns (P, Q) at that instant.
    pub(crate) fn register<'a>(
        &self,
        client: &Arc<Client>,
        channels: impl IntoIterator<Item = &'a Channel>,
    ) -> (Position, Position) {
        let mut r = self.lock();
        let r = &mut *r;
        let mine = r.clients.entry(client.id).or_default();
        for c in channels {
            if !mine.insert(c.clone()) {
                continue;
            }
            match c {
                Channel::Processed => Arc::make_mut(&mut r.processed).push(client.clone()),
                Channel::Change { name, entity } => {
                    let list = Arc::make_mut(&mut r.channels).entry(name.clone()).or_default();
                    Arc::make_mut(list).push(client.clone());
                    let n = r.entities.entry(entity.clone()).or_insert(0);
                    if *n == 0 {
                        r.generation += 1;
                    }
                    *n += 1;
                }
            }
        }
        (r.change_pos, r.processed_pos)
    }

    /// Removes `client` everywhere.
    pub(crate) fn unregister(&self, client: u64) {
        let mut r = self.lock();
        let r = &mut *r;
        let Some(channels) = r.clients.remove(&client) else { return };
        for c in channels {
            match c {
                Channel::Processed => Arc::make_mut(&mut r.processed).retain(|x| x.id != client),
                Channel::Change { name, entity } => {
                    let channels = Arc::make_mut(&mut r.channels);
                    if let Some(list) = channels.get_mut(&name) {
                        Arc::make_mut(list).retain(|x| x.id != client);
                        if list.is_empty() {
                            channels.remove(&name);
                        }
                    }
                    if let Some(n) = r.entities.get_mut(&entity) {
                        *n -= 1;
                        if *n == 0 {
                            r.entities.remove(&entity);
                        }
                    }
                }
            }
        }
    }

    /// The key-column orders, loading them when `events` hold a composite key of an entity
    /// not known yet (or whose key changed).
    pub(crate) async fn key_columns(&self, events: &[Event]) -> Arc<KeyColumns> {
        let current = self.key_columns.read().unwrap_or_else(|e| e.into_inner()).clone();
        let stale = events.iter().any(|e| match e.key.as_object() {
            Some(k) if k.len() > 1 => match current.get(&e.entity) {
                Some(cols) => cols.len() != k.len() || cols.iter().any(|c| !k.contains_key(c)),
                None => true,
            },
            _ => false,
        });
        if !stale {
            return current;
        }
        let rows: Result<Vec<(String, String, Vec<String>)>, sqlx::Error> = sqlx::query_as(
            "select distinct on (schema_name, table_name) schema_name, table_name, key_columns
             from weir.relations order by schema_name, table_name, id desc",
        )
        .fetch_all(&self.pool)
        .await;
        match rows {
            Ok(rows) => {
                let map: KeyColumns = rows
                    .into_iter()
                    .map(|(s, t, k)| (Event::entity_name(&s, &t), Arc::from(k)))
                    .collect();
                let map = Arc::new(map);
                *self.key_columns.write().unwrap_or_else(|e| e.into_inner()) = map.clone();
                map
            }
            Err(e) => {
                tracing::debug!(error = %e, "channels: key columns not loaded");
                current
            }
        }
    }

    /// Reads and dispatches everything after P; returns when caught up.
    async fn catch_up(&self) -> Result<(), weir_log::Error> {
        loop {
            let (entities, generation, from) = {
                let r = self.lock();
                let entities: Vec<String> = r.entities.keys().map(|e| e.to_string()).collect();
                (entities, r.generation, r.change_pos)
            };
            let head = self.reader.head().await?;
            if entities.is_empty() {
                // Nobody listens: move P without reading anything.
                let mut r = self.lock();
                if r.generation != generation {
                    continue;
                }
                if head > r.change_pos {
                    r.change_pos = head;
                    self.change_pos.store(head, Ordering::Release);
                }
                return Ok(());
            }
            let filter = EventFilter { entities, kinds: vec![] };
            let page = self.reader.read(from, PAGE, &filter).await?;
            let keys = self.key_columns(&page).await;
            let full = page.len() as i64 == PAGE;
            let mut at = from;
            let mut queued = 0;
            let mut stale = false;
            // In parts of a quarter of a client's queue (at most 256 events), yielding between
            // them: a client that keeps up is not dropped by one burst, and registrations do
            // not wait long for the lock.
            for (i, part) in page.chunks(self.dispatch_chunk).enumerate() {
                if i > 0 {
                    tokio::task::yield_now().await;
                }
                let subscribers = {
                    let mut r = self.lock();
                    if r.generation != generation || r.change_pos != at {
                        stale = true;
                        break;
                    }
                    at = part.last().map_or(at, |e| e.position);
                    r.change_pos = at;
                    self.change_pos.store(at, Ordering::Release);
                    r.channels.clone()
                };
                queued += self.dispatch(&subscribers, part, &keys);
            }
            if queued > 0 {
                metrics::counter!("weir_channel_messages_total").increment(queued as u64);
            }
            if stale {
                continue;
            }
            if full {
                continue;
            }
            // A short page is the whole visible log: positions commit in order, so every
            // event up to the head read before it is in it.
            let mut r = self.lock();
            if r.generation == generation && r.change_pos == at && head > at {
                r.change_pos = head;
                self.change_pos.store(head, Ordering::Release);
            }
            return Ok(());
        }
    }

    /// Queues each event to the clients of its channels; one serialization per event (and a
    /// small envelope per channel). Returns how many messages were queued.
    fn dispatch(&self, subscribers: &Subscribers, events: &[Event], keys: &KeyColumns) -> usize {
        let mut queued = 0;
        for event in events {
            let channels = self.routing.channels_of(event, keys.get(&event.entity).map(|k| &k[..]));
            let targets: Vec<(&str, &Vec<Arc<Client>>)> = channels
                .iter()
                .filter_map(|c| subscribers.get(c.as_str()).map(|subs| (c.as_str(), &**subs)))
                .collect();
            if targets.is_empty() {
                continue;
            }
            let json = event_json(event);
            if let [(name, subs)] = targets[..] {
                let msg = [Msg::change(name, event.position, &json)];
                for client in subs {
                    queued += client.push(&msg);
                }
                continue;
            }
            // Several channels: a client on more than one gets its messages queued together.
            let mut per_client: Vec<(&Arc<Client>, Vec<Arc<Msg>>)> = Vec::new();
            let mut index: HashMap<u64, usize> = HashMap::new();
            for (name, subs) in targets {
                let msg = Msg::change(name, event.position, &json);
                for client in subs {
                    let i = *index.entry(client.id).or_insert_with(|| {
                        per_client.push((client, Vec::with_capacity(2)));
                        per_client.len() - 1
                    });
                    per_client[i].1.push(msg.clone());
                }
            }
            for (client, msgs) in per_client {
                queued += client.push(&msgs);
            }
        }
        queued
    }

    /// One look at the checkpoints: moves Q over every event handled by all the consumers
    /// listening to its entity, notifying `processed` subscribers (parked events excepted).
    async fn processed_step(&self, memo: &mut Memo) -> Result<(), sqlx::Error> {
        let Some(w) = watermarks(&self.pool).await? else {
            // No consumer tables yet: nothing listens, every logged event is processed.
            let head = self.reader.head().await.map_err(log_to_sqlx)?;
            let mut r = self.lock();
            if r.processed.is_empty() && head > r.processed_pos {
                r.processed_pos = head;
                self.processed_pos.store(head, Ordering::Release);
            }
            return Ok(());
        };
        let mut q = self.processed_pos();
        if w.head <= q {
            return Ok(());
        }
        let subscribed = !self.lock().processed.is_empty();
        if !subscribed {
            // Nobody to notify: jump to the lowest watermark (everything up to it is handled);
            // a subscriber arriving later gets the precise walk from there.
            let target =
                w.head.min(w.consumers.iter().map(|c| c.watermark).min().unwrap_or(w.head));
            let mut r = self.lock();
            if r.processed.is_empty() {
                if target > r.processed_pos {
                    r.processed_pos = target;
                    self.processed_pos.store(target, Ordering::Release);
                }
                return Ok(());
            }
        }
        if memo.blocked && memo.consumers == w.consumers && memo.at == q {
            return Ok(());
        }
        loop {
            let rows = processed_rows(&self.pool, q, w.head, PAGE).await?;
            let n = rows.len() as i64;
            let mut decided = q;
            let mut out = Vec::new();
            let mut blocked = false;
            for row in rows {
                let waits = w
                    .consumers
                    .iter()
                    .any(|c| c.watermark < row.event.position && c.listens_to(&row.event.entity));
                if waits {
                    blocked = true;
                    break;
                }
                decided = row.event.position;
                if !row.parked {
                    out.push(row.event);
                }
            }
            let mut queued = 0;
            let mut at = q;
            for (i, part) in out.chunks(self.dispatch_chunk).enumerate() {
                if i > 0 {
                    tokio::task::yield_now().await;
                }
                let subscribers = {
                    let mut r = self.lock();
                    if r.processed_pos != at {
                        return Ok(());
                    }
                    at = part.last().map_or(at, |n| n.position);
                    r.processed_pos = at;
                    self.processed_pos.store(at, Ordering::Release);
                    r.processed.clone()
                };
                for n in part {
                    let msg = [Msg::processed(n)];
                    for client in subscribers.iter() {
                        queued += client.push(&msg);
                    }
                }
            }
            {
                let mut r = self.lock();
                if r.processed_pos != at {
                    return Ok(());
                }
                r.processed_pos = decided;
                self.processed_pos.store(decided, Ordering::Release);
            }
            if queued > 0 {
                metrics::counter!("weir_channel_messages_total").increment(queued as u64);
            }
            q = decided;
            if blocked || n < PAGE {
                *memo = Memo { blocked, consumers: w.consumers, at: q };
                return Ok(());
            }
        }
    }
}

/// `42P01`: a table of weir's schema does not exist (yet).
fn undefined_table(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01"))
}

fn log_to_sqlx(e: weir_log::Error) -> sqlx::Error {
    match e {
        weir_log::Error::Database(e) => e,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

/// What the processed tail saw last time, to skip re-reading while a consumer is stuck.
#[derive(Debug, Default)]
struct Memo {
    blocked: bool,
    consumers: Vec<ConsumerWatermark>,
    at: Position,
}

/// The log head and each consumer's watermark (weir-consumer's process status); `None` when
/// the consumer tables do not exist.
async fn watermarks(pool: &PgPool) -> Result<Option<Watermarks>, sqlx::Error> {
    process::watermarks(pool).await.map_err(consumer_to_sqlx)
}

/// An event as the processed channel reports it, and whether a consumer parked it.
pub(crate) struct ProcessedRow {
    pub(crate) event: ProcessedEvent,
    pub(crate) parked: bool,
}

/// Events in (after, upto], at most `limit`, with their parked flag (see
/// [`weir_consumer::process::ProcessedEvent::parked`] for why the live tail and a replay agree).
pub(crate) async fn processed_rows(
    pool: &PgPool,
    after: Position,
    upto: Position,
    limit: i64,
) -> Result<Vec<ProcessedRow>, sqlx::Error> {
    let events =
        process::processed_events(pool, after, upto, limit).await.map_err(consumer_to_sqlx)?;
    Ok(events
        .into_iter()
        .map(|e| ProcessedRow {
            event: ProcessedEvent {
                position: e.position,
                entity: e.entity,
                key: e.key,
                kind: e.kind,
                lsn: e.lsn,
            },
            parked: e.parked,
        })
        .collect())
}

/// The tails speak `sqlx::Error` (their retry loop looks at it); the consumer engine's errors
/// here are all database errors.
fn consumer_to_sqlx(e: weir_consumer::Error) -> sqlx::Error {
    match e {
        weir_consumer::Error::Database(e)
        | weir_consumer::Error::Log(weir_log::Error::Database(e)) => e,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

async fn change_tail(shared: Arc<Shared>, mut wake: Wake) {
    loop {
        let at = shared.change_pos();
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = wake.wait_past(at, FALLBACK_POLL) => {}
        }
        if let Err(e) = shared.catch_up().await {
            match &e {
                weir_log::Error::Database(e) if undefined_table(e) => {
                    tracing::debug!("channels: no log yet (weir init has not run)");
                }
                _ => tracing::warn!(error = %e, "channels: reading the log failed; retrying"),
            }
            tokio::select! {
                _ = shared.cancel.cancelled() => return,
                _ = tokio::time::sleep(FALLBACK_POLL) => {}
            }
        }
    }
}

async fn processed_tail(shared: Arc<Shared>) {
    let mut memo = Memo::default();
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(PROCESSED_POLL) => {}
        }
        if let Err(e) = shared.processed_step(&mut memo).await {
            if undefined_table(&e) {
                tracing::debug!("channels: no log yet (weir init has not run)");
            } else {
                tracing::warn!(error = %e, "channels: reading the checkpoints failed; retrying");
            }
            tokio::select! {
                _ = shared.cancel.cancelled() => return,
                _ = tokio::time::sleep(FALLBACK_POLL) => {}
            }
        }
    }
}
