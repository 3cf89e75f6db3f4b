//! Ingestion: the replication slot into the log, exactly once, in commit order.
//!
//! ```text
//!             ┌──────────── session (one leader per slot) ─────────────────────────────┐
//!  lease ───► │ reader task                        channel (bounded)   writer task       │
//!  advisory   │  ReplicationStream ─► Assembler ──► Commit / Stage / ──► Appender         │
//!  lock       │   ▲ status(flushed = persisted)     Abort / Idle(lsn)     append batch ──┐ │
//!             │   └────────────── persisted LSN (watch) ◄─────────────────────────────────┘ │
//!             └──────────────────────────────────────────────────────────────────────────┘
//!  error ─► transient? reconnect with backoff (500 ms × 2 up to 10 s) : stop with the error
//! ```
//!
//! Invariants:
//! - The slot is acknowledged (flush position) only with an LSN the writer has committed to
//!   the log, or with a keepalive position that went through the channel after every
//!   transaction before it was stored (so every commit at or below it is in the log).
//! - The writer groups whatever transactions are queued into one append (throughput) but never
//!   waits for more to arrive (latency). While one append commits, the next is gathered and
//!   sent ([`Appender::submit`]); an idle LSN is acknowledged only once nothing is in flight.
//! - The channel is bounded and streamed transactions leave the assembler in chunks, so a huge
//!   transaction costs bounded memory.
//! - One reader per slot: a second process waits on the advisory lock as a standby and takes
//!   over within about a second of the leader's connection closing.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, PgPool};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use weir_core::{Backoff, Config, Lsn, ProcessId, Transaction};
use weir_log::Appender;
use weir_log::backfill::ChunkStored;
use weir_source::assemble::{Assembler, Output, STAGE_CHUNK};
use weir_source::stream::{Frame, ReplicationStream, StreamOptions};

use crate::backfill::{self, Chunks, Observed};
use crate::{Error, Result, db, fault};

/// Work for the writer, in WAL order.
#[derive(Debug)]
enum Item {
    Commit(Transaction),
    Stage {
        xid: u32,
        first_seq: i64,
        changes: Vec<(u32, weir_core::Change)>,
    },
    Abort {
        xid: u32,
        subxid: Option<u32>,
    },
    /// Every transaction committed at or below this LSN has been queued before this item.
    Idle(Lsn),
}

impl Item {
    /// Queue permits it takes: the changes it carries (at least one).
    fn weight(&self) -> u32 {
        let n = match self {
            Item::Commit(t) => t.changes.len(),
            Item::Stage { changes, .. } => changes.len(),
            Item::Abort { .. } | Item::Idle(_) => 1,
        };
        n.max(1) as u32
    }
}

/// Items that may wait between reader and writer; what bounds memory is the number of changes
/// they carry (`2 × batch_max_events` permits), so many small transactions can queue up to
/// make a large append while a few large ones cannot exhaust memory.
const CHANNEL: usize = 65_536;
/// Least time between two status updates to the server.
const STATUS_MIN_GAP: Duration = Duration::from_millis(100);
/// How often a standby tries the lease.
const LEASE_POLL: Duration = Duration::from_millis(500);

/// Streams changes into the log until `cancel` fires. Waits as a standby while another process
/// holds the slot. Returns an error only for problems reconnecting cannot fix (a dropped slot,
/// a missing publication, refused permissions).
///
/// `holder` is this process's identity, stored as the lease's holder (`weir status` shows it).
pub async fn run(
    config: &Config,
    pool: &PgPool,
    holder: &ProcessId,
    cancel: CancellationToken,
) -> Result<()> {
    run_waking(config, pool, holder, None, cancel).await
}

/// [`run`], telling `readers` (the lanes of this process) of each append as its commit returns
/// instead of through the `NOTIFY` round trip ([`weir_log::Appender::wake_readers`]).
pub async fn run_waking(
    config: &Config,
    pool: &PgPool,
    holder: &ProcessId,
    readers: Option<weir_log::Wake>,
    cancel: CancellationToken,
) -> Result<()> {
    let backoff = Backoff::RECONNECT;
    let mut attempt = 0u32;
    while !cancel.is_cancelled() {
        let started = Instant::now();
        let result = async {
            let Some(lease) = acquire_lease(config, &cancel).await? else {
                return Ok(());
            };
            tracing::info!(slot = %config.source.slot, %holder, "holding the source lease");
            session(config, pool, lease, holder.as_str(), readers.clone(), &cancel).await
        }
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                // A session that ran a while starts the waits over.
                attempt = if started.elapsed() > Duration::from_secs(30) { 1 } else { attempt + 1 };
                let delay = backoff.delay(attempt);
                tracing::warn!(error = %weir_core::Chain(&e), retry_in = ?delay, "ingestion interrupted; reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Takes the slot's lease: a session advisory lock on a dedicated connection, held for the
/// whole session. Returns `None` when cancelled while waiting.
async fn acquire_lease(
    config: &Config,
    cancel: &CancellationToken,
) -> Result<Option<PgConnection>> {
    let options = db::connect_options(config)?;
    let target = db::describe(&options);
    let mut conn = PgConnection::connect_with(&options)
        .await
        .map_err(|source| Error::connect(target, source))?;
    let mut announced = false;
    loop {
        let got: bool = sqlx::query_scalar(
            "select pg_try_advisory_lock(hashtext('weir.source'), hashtext($1))",
        )
        .bind(&config.source.slot)
        .fetch_one(&mut conn)
        .await?;
        if got {
            return Ok(Some(conn));
        }
        if !announced {
            tracing::info!(slot = %config.source.slot, "another process holds the slot; waiting as a standby");
            announced = true;
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(LEASE_POLL) => {}
        }
    }
}

async fn primary_key(pool: &PgPool, relation_id: u32) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "select a.attname::text
         from pg_index i
         join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
         where i.indrelid = $1::oid and i.indisprimary
         order by array_position(i.indkey::int2[], a.attnum)",
    )
    .bind(i64::from(relation_id))
    .fetch_all(pool)
    .await?)
}

async fn session(
    config: &Config,
    pool: &PgPool,
    mut lease: PgConnection,
    holder: &str,
    readers: Option<weir_log::Wake>,
    cancel: &CancellationToken,
) -> Result<()> {
    let options = db::connect_options(config)?;
    let mut appender =
        Appender::open(&options, &config.source.slot, config.log.partition_size).await?;
    if let Some(wake) = readers {
        appender.wake_readers(wake);
    }
    // In-progress transactions are sent again from their start after a reconnect.
    appender.clear_staged().await?;
    let start = appender.state().lsn;
    let db_name: String = sqlx::query_scalar("select current_database()").fetch_one(pool).await?;
    let mut stream = ReplicationStream::start(
        &db::replication_conninfo(config),
        StreamOptions {
            slot: config.source.slot.clone(),
            publication: config.source.publication.clone(),
            protocol_version: 4,
        },
        start,
    )
    .await?;
    tracing::info!(slot = %config.source.slot, from = %start, position = appender.state().position, "streaming");
    let mut assembler =
        Assembler::new(stream.protocol_version(), &config.source.message_prefix, &db_name);

    let (tx, rx) = mpsc::channel::<(Item, OwnedSemaphorePermit)>(CHANNEL);
    let budget = (2 * config.source.batch_max_events).max(STAGE_CHUNK * 2) as u32;
    let permits = Arc::new(Semaphore::new(budget as usize));
    let (persisted_tx, mut persisted) = watch::channel(start);
    let (received, received_rx) = watch::channel(start);
    let chunks = Chunks::default();
    let mut writer = tokio::spawn(writer(
        appender,
        rx,
        persisted_tx,
        config.source.batch_max_events,
        holder.to_string(),
        received_rx,
        chunks.clone(),
    ));
    // Backfills run while this session holds the slot, and stop with it.
    let backfills = cancel.child_token();
    let driver =
        tokio::spawn(backfill::drive(pool.clone(), chunks, db_name.clone(), backfills.clone()));

    let mut outputs = Vec::new();
    let mut status_timer = tokio::time::interval(config.source.status_interval);
    status_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lease_check = tokio::time::interval(Duration::from_secs(1));
    lease_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = Instant::now();
    let mut status_due = false;
    let result: Result<()> = loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break Ok(()),
            done = &mut writer => {
                // The writer only ends early on an error.
                break match done {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(())) => Ok(()),
                    Err(join) => {
                        Err(Error::Panicked { part: "the log writer", message: join.to_string() })
                    }
                };
            }
            _ = persisted.changed() => {
                // Acknowledge promptly, at most every 100 ms; a throttled update is deferred,
                // never dropped (a server shutting down waits for it).
                status_due = true;
            }
            _ = tokio::time::sleep_until((last_status + STATUS_MIN_GAP).into()), if status_due => {
                status_due = false;
                if let Err(e) = stream.send_status(current(&persisted)).await {
                    break Err(e.into());
                }
                last_status = Instant::now();
            }
            _ = status_timer.tick() => {
                if let Err(e) = stream.send_status(current(&persisted)).await {
                    break Err(e.into());
                }
                last_status = Instant::now();
            }
            _ = lease_check.tick() => {
                // Losing the lease connection means another process may take over: stop.
                if let Err(e) = lease.ping().await {
                    break Err(Error::Database(e));
                }
            }
            // Last: while frames keep coming, status updates and the lease check still run.
            frame = stream.next() => {
                let frame = match frame {
                    Ok(f) => f,
                    Err(e) => break Err(e.into()),
                };
                let _ = received.send(stream.received());
                match frame {
                    Frame::Data { data, .. } => {
                        if let Err(e) = assembler.push(data, &mut outputs) {
                            break Err(e.into());
                        }
                        let mut failed = None;
                        for output in outputs.drain(..) {
                            let item = match output {
                                Output::RelationSeen { relation_id, full_identity, .. } => {
                                    if full_identity {
                                        match primary_key(pool, relation_id).await {
                                            Ok(pk) => assembler.set_primary_key(relation_id, &pk),
                                            Err(e) => { failed = Some(e); break; }
                                        }
                                    }
                                    continue;
                                }
                                Output::Commit(t) if t.changes.is_empty() && !t.staged => Item::Idle(t.commit_lsn),
                                Output::Commit(t) => Item::Commit(t),
                                Output::Stage { xid, first_seq, changes } => Item::Stage { xid, first_seq, changes },
                                Output::Abort { xid, subxid } => Item::Abort { xid, subxid },
                            };
                            let weight = item.weight().min(budget);
                            let Ok(permit) = permits.clone().acquire_many_owned(weight).await else { break };
                            if tx.send((item, permit)).await.is_err() {
                                break;
                            }
                        }
                        if let Some(e) = failed {
                            break Err(e);
                        }
                    }
                    Frame::Keepalive { wal_end, reply_requested } => {
                        if let Ok(permit) = permits.clone().acquire_many_owned(1).await {
                            let _ = tx.send((Item::Idle(wal_end), permit)).await;
                        }
                        if reply_requested {
                            if let Err(e) = stream.send_status(current(&persisted)).await {
                                break Err(e.into());
                            }
                            last_status = Instant::now();
                        }
                    }
                }
            }
        }
    };
    backfills.cancel();
    let _ = driver.await;
    // Let the writer store what is queued (graceful), then acknowledge it.
    drop(tx);
    if !writer.is_finished() {
        match tokio::time::timeout(Duration::from_secs(30), &mut writer).await {
            Ok(Ok(Err(e))) if result.is_ok() => return Err(e),
            Err(_) => writer.abort(),
            _ => {}
        }
    }
    // Always report the final position: it only ever holds what is stored, and a server that
    // is shutting down waits for it before it lets the walsender go.
    let _ = stream.send_status(current(&persisted)).await;
    result
}

/// Stores what the reader queues: stages and discards streamed changes at once, groups queued
/// commits into one append, then publishes the LSN that may be acknowledged.
async fn writer(
    mut appender: Appender,
    mut rx: mpsc::Receiver<(Item, OwnedSemaphorePermit)>,
    persisted: watch::Sender<Lsn>,
    max_events: usize,
    holder: String,
    received: watch::Receiver<Lsn>,
    chunks: Chunks,
) -> Result<()> {
    let mut batch: Vec<Transaction> = Vec::new();
    // Backfill chunks in the batch: their progress, stored with it, and who waits for it.
    let mut stored: Vec<ChunkStored> = Vec::new();
    let mut waiting = Vec::new();
    let mut idle = Lsn::ZERO;
    let mut behind_ms = 0i64;
    let mut last_heartbeat: Option<Instant> = None;
    // The last position counted as ingested.
    let mut counted = appender.state().position;
    let mut flying = Flying::default();
    loop {
        let first = tokio::select! {
            // Nothing queued while an append commits: publish it as soon as it is done.
            settled = appender.settle(), if appender.in_flight() => {
                settled?;
                None
            }
            item = tokio::time::timeout(Duration::from_secs(1), rx.recv()) => match item {
                Ok(Some(item)) => Some(item),
                Ok(None) => break,
                Err(_) => None,
            },
        };
        if !appender.in_flight() {
            flying.land();
        }
        let mut events = 0usize;
        let mut next = first;
        // Permits of queued commits are returned once they are appended.
        let mut held = Vec::new();
        while let Some((item, permit)) = next {
            held.push(permit);
            match item {
                Item::Commit(t) => {
                    let lsn = t.commit_lsn;
                    match chunks.observe(t, &mut appender).await? {
                        Observed::Append(t) => {
                            events += t.changes.len();
                            batch.push(t);
                        }
                        Observed::Mark => idle = idle.max(lsn),
                        Observed::Chunk(t, chunk, done) => {
                            events += t.changes.len();
                            metrics::counter!("weir_backfill_rows_total")
                                .increment(t.changes.len() as u64);
                            batch.push(t);
                            stored.push(chunk);
                            waiting.push(done);
                        }
                    }
                }
                Item::Stage { xid, first_seq, changes } => {
                    appender.stage(xid, &changes, first_seq).await?;
                }
                Item::Abort { xid, subxid } => {
                    appender.discard_staged(xid, subxid).await?;
                }
                Item::Idle(lsn) => idle = idle.max(lsn),
            }
            if events >= max_events {
                break;
            }
            next = rx.try_recv().ok();
        }
        if let Some(newest) = batch.last().map(|t| t.commit_ts) {
            fault::point("before_append");
            // Returns once the append before this one committed; this one runs on.
            appender.submit(&batch, &stored).await?;
            flying.land();
            flying = Flying {
                permits: std::mem::take(&mut held),
                waiters: std::mem::take(&mut waiting),
            };
            stored.clear();
            if rx.is_empty() {
                // Nothing to overlap with: wait for it here rather than a loop turn later.
                appender.settle().await?;
                flying.land();
            }
            behind_ms = (chrono::Utc::now() - newest).num_milliseconds().max(0);
            batch.clear();
        } else if rx.is_empty() && !appender.in_flight() {
            behind_ms = 0;
        }
        let stored = appender.state().position;
        if stored > counted {
            // Stored, and the slot not yet acknowledged for it.
            fault::point("after_append");
            metrics::counter!("weir_ingest_events_total").increment((stored - counted) as u64);
            counted = stored;
        }
        // An idle LSN vouches only for commits queued before it, which may be in flight.
        let confirm = if appender.in_flight() {
            appender.state().lsn
        } else {
            appender.state().lsn.max(idle)
        };
        publish(&persisted, confirm);
        if last_heartbeat.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            let received = *received.borrow();
            let confirmed = *persisted.borrow();
            appender.heartbeat(&holder, received, confirmed, behind_ms).await?;
            last_heartbeat = Some(Instant::now());
        }
    }
    // The reader is gone (shutdown or an error): what was submitted still lands.
    appender.settle().await?;
    flying.land();
    metrics::counter!("weir_ingest_events_total")
        .increment((appender.state().position - counted).max(0) as u64);
    publish(&persisted, appender.state().lsn.max(idle));
    Ok(())
}

/// Lets the reader acknowledge the slot up to `confirm`, if that is further than before.
fn publish(persisted: &watch::Sender<Lsn>, confirm: Lsn) {
    persisted.send_if_modified(|p| {
        let moved = confirm > *p;
        if moved {
            *p = confirm;
        }
        moved
    });
}

/// What the append in flight holds until it commits.
#[derive(Default)]
struct Flying {
    /// The queue permits of its commits.
    permits: Vec<OwnedSemaphorePermit>,
    /// Who waits for its backfill chunks to be stored.
    waiters: Vec<oneshot::Sender<()>>,
}

impl Flying {
    /// The append committed: its permits return, its chunks' waiters go on.
    fn land(&mut self) {
        self.permits.clear();
        for done in self.waiters.drain(..) {
            let _ = done.send(());
        }
    }
}

fn current(rx: &watch::Receiver<Lsn>) -> Lsn {
    *rx.borrow()
}
