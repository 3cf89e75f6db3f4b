//! Appending committed source transactions to `weir.events`.
//!
//! ```text
//! Appender::submit([txn, txn, …])          (txns in WAL commit order, from the source)
//!   skip txns whose commit LSN ≤ the last one planned  (already stored before a crash)
//!   plan on the client: positions, rows, staged moves   (relations interned, partitions made)
//!   spawn on a connection of its own:
//!     BEGIN
//!       INSERT … SELECT FROM unnest(…) (positions planned, WAL order in each txn)
//!       streamed txns: move weir.staged_changes rows, numbered by their WAL sequence
//!       (once the append before holds the source state's row lock)
//!       SELECT position FROM weir.source_state FOR UPDATE   (= the one planned before, or refuse)
//!       UPDATE weir.source_state SET lsn, position
//!       NOTIFY weir_events, '<last position>'
//!     COMMIT  ──► settle(): only now may the caller acknowledge the slot up to its LSN
//!   wait for the append before it to commit, return what is committed
//! ```
//!
//! One appender per database writes the log (the source leader holds an advisory-lock lease),
//! which is what makes positions gap-free and commit-ordered.
//!
//! Two appends overlap: while one executes and commits on the server, the next is planned and
//! sent on the second connection. Their order stays the submission order because each one's
//! `SELECT position FROM weir.source_state … FOR UPDATE` is sent only once the one before has
//! taken the row's lock, so it waits for that one's commit and then must find the position
//! that one left (the one it planned from); if that one rolled back, it does not: then
//! the later one rolls back too ([`Error::Moved`](crate::Error::Moved)), and no position is
//! ever committed after a gap.
//!
//! Beside the appends, the partition being filled is analyzed on a third, short-lived
//! connection each time its rows double (`analyze_if_grown`), so that readers of a backlog
//! just ingested are planned on statistics rather than on a guess.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use weir_core::{Change, Lsn, Position, Source, Transaction};

use crate::backfill::ChunkStored;
use crate::{Error, NOTIFY_CHANNEL, Result};

/// The source's persisted progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceState {
    /// End LSN of the last commit whose changes are in the log.
    pub lsn: Lsn,
    /// Last position assigned.
    pub position: Position,
}

/// The single writer of the log. Holds its own two connections.
#[derive(Debug)]
pub struct Appender {
    /// Connections not executing an append (one or two): planning, staging and heartbeats
    /// use the first.
    idle: Vec<PgConnection>,
    /// The append executing on the other connection, if any.
    in_flight: Option<InFlight>,
    slot: String,
    /// What is committed.
    state: SourceState,
    /// What will be committed once the append in flight is (equal to `state` without one).
    planned: SourceState,
    partition_size: i64,
    /// Exclusive upper bound of the highest partition.
    partition_upper: i64,
    /// Interned relation shapes, keyed by the `Arc`'s address (the `Arc` is kept alive here, so
    /// the address cannot be reused while cached).
    relations: HashMap<usize, (Arc<Source>, i32)>,
    head: watch::Sender<Position>,
    /// The readers of this process, told of each append as its commit returns.
    readers: Option<crate::Wake>,
    /// For the connection that analyzes the partition being filled.
    options: sqlx::postgres::PgConnectOptions,
    /// The committed position at which that partition is analyzed next.
    next_analyze: Position,
    analyzing: Option<JoinHandle<()>>,
}

/// An append executing on a connection it owns until it is done.
#[derive(Debug)]
struct InFlight {
    task: JoinHandle<(PgConnection, Result<()>)>,
    to: SourceState,
    /// Fires once the append holds the source state's row lock (dropped if it fails first).
    locked: Option<oneshot::Receiver<()>>,
}

impl Appender {
    /// Opens the appender for `slot` on two dedicated connections and loads its state.
    pub async fn open(
        options: &sqlx::postgres::PgConnectOptions,
        slot: &str,
        partition_size: i64,
    ) -> Result<Self> {
        let mut conn = PgConnection::connect_with(options).await?;
        sqlx::query("insert into weir.source_state (slot) values ($1) on conflict do nothing")
            .bind(slot)
            .execute(&mut conn)
            .await?;
        let (lsn, position): (String, i64) =
            sqlx::query_as("select lsn::text, position from weir.source_state where slot = $1")
                .bind(slot)
                .fetch_one(&mut conn)
                .await?;
        let lsn = lsn.parse().unwrap_or(Lsn::ZERO);
        let partition_upper = highest_partition_upper(&mut conn).await?;
        let second = PgConnection::connect_with(options).await?;
        let (head, _) = watch::channel(position);
        let state = SourceState { lsn, position };
        Ok(Self {
            idle: vec![conn, second],
            in_flight: None,
            slot: slot.to_string(),
            state,
            planned: state,
            partition_size,
            partition_upper,
            relations: HashMap::new(),
            head,
            readers: None,
            options: options.clone(),
            // A partition filled before a restart is analyzed at the first append.
            next_analyze: partition_start(position, partition_size) + first_analyze(partition_size),
            analyzing: None,
        })
    }

    /// The committed progress.
    pub fn state(&self) -> SourceState {
        self.state
    }

    /// Whether an append is still executing ([`settle`](Self::settle) waits for it).
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// A receiver of the last appended position, updated after every commit.
    pub fn subscribe(&self) -> watch::Receiver<Position> {
        self.head.subscribe()
    }

    /// Tells `wake` of every append as soon as its commit returns, so readers in this process
    /// (the lanes of `weir run`) do not wait for the `NOTIFY` to come back from the server.
    pub fn wake_readers(&mut self, wake: crate::Wake) {
        wake.advance(self.state.position);
        self.readers = Some(wake);
    }

    /// Appends `txns` (in commit order) in one transaction and waits for it; returns the new
    /// state. Transactions at or below the stored LSN are skipped. Only after this returns may
    /// the slot be acknowledged up to the returned LSN.
    pub async fn append(&mut self, txns: &[Transaction]) -> Result<SourceState> {
        self.append_with(txns, &[]).await
    }

    /// [`append`](Self::append), storing the progress of the backfill chunks whose `read`
    /// events `txns` carry in the same transaction (so a backfill resumes after exactly the
    /// chunks that are in the log). Nothing is stored when every transaction was stored before.
    pub async fn append_with(
        &mut self,
        txns: &[Transaction],
        chunks: &[ChunkStored],
    ) -> Result<SourceState> {
        self.submit(txns, chunks).await?;
        self.settle().await
    }

    /// Starts appending `txns` (in commit order, after everything submitted before) and
    /// returns once everything submitted before has committed: one append executes while the
    /// caller gathers the next. Returns the committed state, which does not include `txns`
    /// yet; [`settle`](Self::settle) waits for them. Not cancel-safe: await it to the end.
    /// After an error the appender is spent (what it planned is not what is stored): open a
    /// new one, which starts from the stored state.
    pub async fn submit(
        &mut self,
        txns: &[Transaction],
        chunks: &[ChunkStored],
    ) -> Result<SourceState> {
        self.analyze_if_grown();
        let fresh: Vec<&Transaction> =
            txns.iter().filter(|t| t.commit_lsn > self.planned.lsn).collect();
        let Some(last) = fresh.last() else {
            return self.settle().await;
        };
        let last_lsn = last.commit_lsn;
        for change in fresh.iter().flat_map(|t| &t.changes) {
            if let Some(rel) = &change.relation {
                self.intern(rel).await?;
            }
        }
        let mut staged_counts = HashMap::new();
        for t in fresh.iter().filter(|t| t.staged) {
            let n: i64 =
                sqlx::query_scalar("select count(*) from weir.staged_changes where xid = $1")
                    .bind(i64::from(t.xid))
                    .fetch_one(&mut self.idle[0])
                    .await?;
            staged_counts.insert(t.xid, n);
        }
        let total: i64 = fresh
            .iter()
            .map(|t| if t.staged { staged_counts[&t.xid] } else { t.changes.len() as i64 })
            .sum();
        self.ensure_partitions(self.planned.position + total).await?;

        let from = self.planned.position;
        let mut position = from;
        let mut steps = Vec::new();
        let mut rows = Rows::default();
        for t in &fresh {
            if t.staged {
                if rows.len() > 0 {
                    steps.push(Step::Insert(rows.take()));
                }
                let count = staged_counts[&t.xid];
                steps.push(Step::MoveStaged {
                    after: position,
                    count,
                    lsn: t.commit_lsn.to_string(),
                    xid: i64::from(t.xid),
                    commit_ts: t.commit_ts,
                });
                position += count;
                continue;
            }
            let lsn = t.commit_lsn.to_string();
            for c in &t.changes {
                position += 1;
                let relation_id =
                    c.relation.as_ref().map(|r| self.relations[&(Arc::as_ptr(r) as usize)].1);
                rows.head.push((position, lsn.clone(), i64::from(t.xid), t.commit_ts));
                rows.push(c, relation_id);
                if rows.len() >= ROWS_PER_STATEMENT {
                    steps.push(Step::Insert(rows.take()));
                }
            }
        }
        if rows.len() > 0 {
            steps.push(Step::Insert(rows));
        }
        let to = SourceState { lsn: last_lsn, position };
        let xids =
            fresh.iter().filter(|t| t.staged || !t.changes.is_empty()).map(|t| i64::from(t.xid));
        let plan = Plan {
            steps,
            chunks: chunks.to_vec(),
            slot: self.slot.clone(),
            from,
            to,
            xids: xids.collect(),
        };
        // With the previous append still in flight this takes the last idle connection; that
        // append gives its own back below, before anything needs one again.
        let mut conn = self.idle.pop().expect("an idle connection");
        // This append's rows go in at once; its source state update waits until the one
        // before holds the row lock, so it queues behind that one's commit, never before it.
        let after = self.in_flight.as_mut().and_then(|f| f.locked.take());
        let (locked_tx, locked) = oneshot::channel();
        let task = tokio::spawn(async move {
            let result = plan.execute(&mut conn, after, locked_tx).await;
            (conn, result)
        });
        let previous = self.in_flight.replace(InFlight { task, to, locked: Some(locked) });
        self.planned = to;
        if let Some(previous) = previous {
            self.finish(previous).await?;
        }
        Ok(self.state)
    }

    /// Waits for the append in flight, if any, to commit; returns the committed state.
    ///
    /// Cancel-safe: dropped before the append is done, it leaves the append in flight.
    pub async fn settle(&mut self) -> Result<SourceState> {
        if let Some(in_flight) = &mut self.in_flight {
            // Polling the handle by reference leaves it in place if this future is dropped.
            let done = (&mut in_flight.task).await;
            let in_flight = self.in_flight.take().expect("checked above");
            self.finished(in_flight.to, done)?;
        }
        Ok(self.state)
    }

    async fn finish(&mut self, in_flight: InFlight) -> Result<()> {
        let done = in_flight.task.await;
        self.finished(in_flight.to, done)
    }

    fn finished(
        &mut self,
        to: SourceState,
        done: std::result::Result<(PgConnection, Result<()>), tokio::task::JoinError>,
    ) -> Result<()> {
        let (conn, result) = match done {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Err(Error::Moved { expected: self.state.position }),
        };
        // The idle connection keeps its place in front: it holds nothing of the append.
        self.idle.push(conn);
        result?;
        self.state = to;
        self.head.send_replace(to.position);
        if let Some(readers) = &self.readers {
            readers.advance(to.position);
        }
        Ok(())
    }

    /// Records liveness and lag for `weir status` (about once a second).
    pub async fn heartbeat(
        &mut self,
        holder: &str,
        received: Lsn,
        confirmed: Lsn,
        behind_ms: i64,
    ) -> Result<()> {
        sqlx::query(
            "update weir.source_state
             set holder = $2, heartbeat_at = now(), received_lsn = $3::pg_lsn, behind_ms = $4,
                 confirmed_lsn = $5::pg_lsn
             where slot = $1",
        )
        .bind(&self.slot)
        .bind(holder)
        .bind(received.to_string())
        .bind(behind_ms)
        .bind(confirmed.to_string())
        .execute(&mut self.idle[0])
        .await?;
        Ok(())
    }

    /// Writes changes of a transaction that is still in progress (streamed) to
    /// `weir.staged_changes`. `first_seq` numbers them in WAL order within `xid`.
    pub async fn stage(
        &mut self,
        xid: u32,
        changes: &[(u32, Change)],
        first_seq: i64,
    ) -> Result<()> {
        for (_, change) in changes {
            if let Some(rel) = &change.relation {
                self.intern(rel).await?;
            }
        }
        let mut rows = Rows::default();
        for (i, (subxid, c)) in changes.iter().enumerate() {
            let relation_id =
                c.relation.as_ref().map(|r| self.relations[&(Arc::as_ptr(r) as usize)].1);
            rows.staged.push((i64::from(xid), i64::from(*subxid), first_seq + i as i64));
            rows.push(c, relation_id);
            if rows.len() >= ROWS_PER_STATEMENT {
                rows.insert_staged(&mut self.idle[0]).await?;
            }
        }
        rows.insert_staged(&mut self.idle[0]).await?;
        Ok(())
    }

    /// Forgets staged changes of an aborted transaction, or of one aborted subtransaction.
    pub async fn discard_staged(&mut self, xid: u32, subxid: Option<u32>) -> Result<u64> {
        let n = match subxid {
            Some(sub) if sub != xid => {
                sqlx::query("delete from weir.staged_changes where xid = $1 and subxid = $2")
                    .bind(i64::from(xid))
                    .bind(i64::from(sub))
                    .execute(&mut self.idle[0])
                    .await?
            }
            _ => {
                sqlx::query("delete from weir.staged_changes where xid = $1")
                    .bind(i64::from(xid))
                    .execute(&mut self.idle[0])
                    .await?
            }
        };
        Ok(n.rows_affected())
    }

    /// The keys of `entity`'s rows among the staged changes of `xid` (a streamed transaction
    /// that committed inside a backfill chunk's window).
    pub async fn staged_keys(&mut self, xid: u32, entity: &str) -> Result<Vec<Value>> {
        Ok(sqlx::query_scalar("select key from weir.staged_changes where xid = $1 and entity = $2")
            .bind(i64::from(xid))
            .bind(entity)
            .fetch_all(&mut self.idle[0])
            .await?)
    }

    /// Drops every staged change: at start the slot sends in-progress transactions again.
    pub async fn clear_staged(&mut self) -> Result<()> {
        sqlx::query("truncate weir.staged_changes").execute(&mut self.idle[0]).await?;
        Ok(())
    }

    async fn intern(&mut self, rel: &Arc<Source>) -> Result<i32> {
        let addr = Arc::as_ptr(rel) as usize;
        if let Some((_, id)) = self.relations.get(&addr) {
            return Ok(*id);
        }
        let id: i32 = sqlx::query_scalar(
            "insert into weir.relations (schema_name, table_name, columns, key_columns)
             values ($1, $2, $3, '{}')
             on conflict (schema_name, table_name, columns, key_columns)
               do update set schema_name = excluded.schema_name
             returning id",
        )
        .bind(&rel.schema)
        .bind(&rel.table)
        .bind(Value::Object(rel.columns.clone()))
        .fetch_one(&mut self.idle[0])
        .await?;
        self.relations.insert(addr, (rel.clone(), id));
        Ok(id)
    }

    /// Analyzes the partition being filled, in the background, each time its committed rows
    /// double from a hundredth of a partition on (7 times over a partition of a million).
    ///
    /// Autovacuum analyzes a new partition only when it comes round (a minute or more), and
    /// until then PostgreSQL plans on no statistics: a consumer with a filter of entities,
    /// reading a page of a backlog just ingested, got a plan that collects and sorts every
    /// later event of its entities — 1.5 s per page of 500 at 800,000 events to go, 1 ms once
    /// analyzed. ANALYZE takes no lock that appends or reads wait for.
    fn analyze_if_grown(&mut self) {
        let head = self.state.position;
        if head < self.next_analyze || self.analyzing.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        self.next_analyze = next_analyze(head, self.partition_size);
        let options = self.options.clone();
        self.analyzing = Some(tokio::spawn(async move {
            if let Err(e) = analyze_partition_of(&options, head).await {
                tracing::debug!(position = head, "analyzing the log partition failed: {e}");
            }
        }));
    }

    /// Makes sure partitions cover `last_position`, and creates the next one ahead of need.
    ///
    /// Creating a partition takes a strong lock on `weir.events`; queued behind a long-running
    /// reader it would block every other reader. So it runs with a short `lock_timeout`: a
    /// partition wanted only ahead of time is skipped on timeout (tried again at the next
    /// append), one that is needed now is retried until it gets the lock.
    async fn ensure_partitions(&mut self, last_position: Position) -> Result<()> {
        let ahead = last_position + self.partition_size / 2;
        if ahead >= self.partition_upper {
            // The DDL would wait for the append in flight anyway, blocking readers meanwhile.
            self.settle().await?;
        }
        while ahead >= self.partition_upper {
            let needed = last_position >= self.partition_upper;
            let lo = self.partition_upper.max(1);
            // Aligned to multiples of the size, so names are predictable.
            let hi = (lo / self.partition_size + 1) * self.partition_size;
            let sql = format!(
                "create table if not exists weir.events_{lo:012} partition of weir.events \
                 for values from ({lo}) to ({hi})"
            );
            let mut tx = self.idle[0].begin().await?;
            sqlx::query("set local lock_timeout = '200ms'").execute(&mut *tx).await?;
            match sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await {
                Ok(_) => {
                    tx.commit().await?;
                    self.partition_upper = hi;
                }
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                    drop(tx);
                    if !needed {
                        tracing::debug!("creating the next log partition waits for readers; later");
                        return Ok(());
                    }
                    tracing::warn!(
                        "a long-running query on weir.events delays creating the next partition"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Waits (at most [`VISIBLE_WAIT`]) until every transaction of `xids` is visible to a new
/// snapshot.
///
/// PostgreSQL writes a transaction's commit record, and the walsender may send it, before the
/// committing backend leaves the proc array: for that moment the transaction is committed yet
/// invisible. An event appended then could be handled by an operator that reads the source
/// table and sees the row as it was before the change — and keeps that state, as no later
/// event comes for the key (`crates/weir-cli/tests/chaos.rs` caught it on a loaded machine).
/// Committing the append only once its transactions are visible means that whoever sees an
/// event also sees its change. The window is short (the committing backend is between two
/// steps of its commit), so the wait is one query almost always.
async fn visible(conn: &mut PgConnection, xids: &[i64]) -> Result<()> {
    if xids.is_empty() {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + VISIBLE_WAIT;
    loop {
        // pgoutput's xids are 32 bits, a snapshot's are xid8 (epoch and xid): each becomes the
        // xid8 nearest the snapshot's xmax with the same low 32 bits. A committing transaction
        // can be at or above xmax (xmax follows the last *completed* transaction), so looking
        // only at the running list would miss it.
        let running: bool = sqlx::query_scalar(
            "with s as (select pg_current_snapshot() s),
                  m as (select pg_snapshot_xmax(s)::text::bigint + 2147483648 top from s)
             select exists (
               select 1 from unnest($1::bigint[]) x, s, m
                where not pg_visible_in_snapshot(
                        greatest(m.top - ((m.top - x) & 4294967295), 3)::text::xid8, s.s))",
        )
        .bind(xids)
        .fetch_one(&mut *conn)
        .await?;
        if !running {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                ?xids,
                "source transactions still invisible after {VISIBLE_WAIT:?}; appending"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// How long an append waits for its source transactions to become visible.
const VISIBLE_WAIT: Duration = Duration::from_secs(5);

/// One append as planned by [`Appender::submit`], executed on a connection of its own.
#[derive(Debug)]
struct Plan {
    steps: Vec<Step>,
    chunks: Vec<ChunkStored>,
    slot: String,
    /// The last position before this append: the source state must still hold it.
    from: Position,
    to: SourceState,
    /// The source transactions appended, which must be visible before the append commits.
    xids: Vec<i64>,
}

#[derive(Debug)]
enum Step {
    Insert(Rows),
    /// A streamed transaction's `count` staged changes, numbered after `after`.
    MoveStaged {
        after: Position,
        count: i64,
        lsn: String,
        xid: i64,
        commit_ts: DateTime<Utc>,
    },
}

impl Plan {
    /// Runs the append: its rows, then (once `after`, the append before, holds the row lock)
    /// the source state update, which takes the lock and tells `locked`, then the commit.
    async fn execute(
        self,
        conn: &mut PgConnection,
        after: Option<oneshot::Receiver<()>>,
        locked: oneshot::Sender<()>,
    ) -> Result<()> {
        let mut tx = conn.begin().await?;
        for step in self.steps {
            match step {
                Step::Insert(mut rows) => rows.insert_events(&mut tx).await?,
                Step::MoveStaged { after, count, lsn, xid, commit_ts } => {
                    let moved = sqlx::query(MOVE_STAGED)
                        .bind(after)
                        .bind(lsn)
                        .bind(xid)
                        .bind(commit_ts)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if moved as i64 != count {
                        // Nothing else writes staged rows while the session holds the slot.
                        return Err(Error::Moved { expected: self.from });
                    }
                }
            }
        }
        for chunk in &self.chunks {
            chunk.store(&mut tx).await?;
        }
        visible(&mut tx, &self.xids).await?;
        if let Some(after) = after {
            // An error means the append before failed: the update below then finds the log
            // where that one started and refuses.
            let _ = after.await;
        }
        // Waits for the append before this one to commit (it holds the row's lock) and reads
        // what it left; if that one rolled back, or another writer moved the log, the position
        // is not ours to continue from. (A predicate on the position in the update itself would
        // be judged on the row as it was before that commit, and skip it without waiting.)
        let stored: i64 =
            sqlx::query_scalar("select position from weir.source_state where slot = $1 for update")
                .bind(&self.slot)
                .fetch_one(&mut *tx)
                .await?;
        if stored != self.from {
            return Err(Error::Moved { expected: self.from });
        }
        sqlx::query(
            "update weir.source_state set lsn = $2::pg_lsn, position = $3, updated_at = now()
             where slot = $1",
        )
        .bind(&self.slot)
        .bind(self.to.lsn.to_string())
        .bind(self.to.position)
        .execute(&mut *tx)
        .await?;
        let _ = locked.send(());
        if self.to.position > self.from {
            sqlx::query("select pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(self.to.position.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Moves a streamed transaction's staged rows into the log, numbered after `$1` in WAL order.
const MOVE_STAGED: &str = "
    with moved as (
        delete from weir.staged_changes where xid = $3 returning *
    )
    insert into weir.events (position, lsn, xid, commit_ts, kind, entity, relation_id, key,
                             new_record, old_record, changes, unchanged_toast)
    select $1 + row_number() over (order by seq), $2::pg_lsn, $3, $4, kind, entity,
           relation_id, key, new_record, old_record, changes, unchanged_toast
    from moved
    order by seq";

/// Where the partition of `position` starts, as [`Appender::ensure_partitions`] creates them
/// (aligned to the size; the first one starts at 1, counted here from 0).
fn partition_start(position: Position, size: i64) -> Position {
    position / size * size
}

/// Rows in a partition at its first analyze.
fn first_analyze(size: i64) -> i64 {
    (size / 100).max(100)
}

/// The committed position, after `head`, at which the partition being filled is analyzed next:
/// where its rows have doubled, or the first mark of the next partition.
fn next_analyze(head: Position, size: i64) -> Position {
    let start = partition_start(head, size);
    let mut rows = first_analyze(size);
    while start + rows <= head {
        rows *= 2;
    }
    if rows < size { start + rows } else { start + size + first_analyze(size) }
}

/// `analyze` of the partition that holds `position`, on a connection of its own.
async fn analyze_partition_of(
    options: &sqlx::postgres::PgConnectOptions,
    position: Position,
) -> Result<()> {
    let mut conn = PgConnection::connect_with(options).await?;
    sqlx::query("set lock_timeout = '1s'").execute(&mut conn).await?;
    let partition: String =
        sqlx::query_scalar("select tableoid::regclass::text from weir.events where position = $1")
            .bind(position)
            .fetch_one(&mut conn)
            .await?;
    // A name PostgreSQL itself quoted (regclass output).
    let sql = format!("analyze {partition}");
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await?;
    tracing::debug!(partition, "analyzed the log partition being filled");
    conn.close().await?;
    Ok(())
}

async fn highest_partition_upper(conn: &mut PgConnection) -> Result<i64> {
    // Partition bounds as text: "FOR VALUES FROM ('1') TO ('1000000')".
    let bounds: Vec<String> = sqlx::query_scalar(
        "select pg_get_expr(c.relpartbound, c.oid)
         from pg_inherits i join pg_class c on c.oid = i.inhrelid
         where i.inhparent = 'weir.events'::regclass",
    )
    .fetch_all(conn)
    .await?;
    Ok(bounds
        .iter()
        .filter_map(|b| b.rsplit("TO (").next())
        .filter_map(|s| s.trim_end_matches(')').trim_matches('\'').parse::<i64>().ok())
        .max()
        .unwrap_or(1))
}

/// Rows per `insert … select from unnest(…)` statement.
const ROWS_PER_STATEMENT: usize = 5_000;

/// Changes gathered column by column, inserted with one `unnest` statement.
///
/// Not COPY: sqlx does not set `TCP_NODELAY`, and COPY's two back-to-back writes (CopyData,
/// CopyDone) then wait for the server's delayed ACK — about 40 ms per append. One statement is
/// one write and one reply.
#[derive(Debug, Default)]
struct Rows {
    /// position, lsn, xid, commit_ts (log rows).
    head: Vec<(i64, String, i64, DateTime<Utc>)>,
    /// xid, subxid, seq (staged rows).
    staged: Vec<(i64, i64, i64)>,
    kind: Vec<&'static str>,
    entity: Vec<String>,
    relation_id: Vec<Option<i32>>,
    key: Vec<String>,
    new_record: Vec<Option<String>>,
    old_record: Vec<Option<String>>,
    changes: Vec<Option<String>>,
    unchanged_toast: Vec<Option<String>>,
}

fn json(v: &Value) -> String {
    serde_json::to_string(v).expect("JSON values always serialize")
}

impl Rows {
    fn len(&self) -> usize {
        self.kind.len()
    }

    fn push(&mut self, c: &Change, relation_id: Option<i32>) {
        self.kind.push(c.kind.as_str());
        self.entity.push(c.entity.clone());
        self.relation_id.push(relation_id);
        self.key.push(json(&c.key));
        self.new_record.push(c.new_record.as_ref().map(json));
        self.old_record.push(c.old_record.as_ref().map(json));
        self.changes.push(c.changes.as_ref().map(json));
        self.unchanged_toast.push(
            (!c.unchanged_toast.is_empty())
                .then(|| serde_json::to_string(&c.unchanged_toast).expect("strings serialize")),
        );
    }

    fn take(&mut self) -> Rows {
        std::mem::take(self)
    }

    async fn insert_events(&mut self, conn: &mut PgConnection) -> Result<()> {
        if self.len() == 0 {
            return Ok(());
        }
        let r = self.take();
        let (position, lsn, xid, ts): (Vec<i64>, Vec<String>, Vec<i64>, Vec<DateTime<Utc>>) =
            r.head.into_iter().fold(Default::default(), |mut acc, (p, l, x, t)| {
                acc.0.push(p);
                acc.1.push(l);
                acc.2.push(x);
                acc.3.push(t);
                acc
            });
        sqlx::query(
            "insert into weir.events (position, lsn, xid, commit_ts, kind, entity, relation_id,
                                      key, new_record, old_record, changes, unchanged_toast)
             select * from unnest($1::int8[], $2::text[]::pg_lsn[], $3::int8[], $4::timestamptz[],
                                  $5::text[], $6::text[], $7::int4[], $8::text[]::jsonb[],
                                  $9::text[]::jsonb[], $10::text[]::jsonb[], $11::text[]::jsonb[],
                                  $12::text[]::jsonb[])",
        )
        .bind(position)
        .bind(lsn)
        .bind(xid)
        .bind(ts)
        .bind(r.kind)
        .bind(r.entity)
        .bind(r.relation_id)
        .bind(r.key)
        .bind(r.new_record)
        .bind(r.old_record)
        .bind(r.changes)
        .bind(r.unchanged_toast)
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn insert_staged(&mut self, conn: &mut PgConnection) -> Result<()> {
        if self.len() == 0 {
            return Ok(());
        }
        let r = self.take();
        let (xid, subxid, seq): (Vec<i64>, Vec<i64>, Vec<i64>) =
            r.staged.into_iter().fold(Default::default(), |mut acc, (x, s, q)| {
                acc.0.push(x);
                acc.1.push(s);
                acc.2.push(q);
                acc
            });
        sqlx::query(
            "insert into weir.staged_changes (xid, subxid, seq, kind, entity, relation_id, key,
                                              new_record, old_record, changes, unchanged_toast)
             select * from unnest($1::int8[], $2::int8[], $3::int8[], $4::text[], $5::text[],
                                  $6::int4[], $7::text[]::jsonb[], $8::text[]::jsonb[],
                                  $9::text[]::jsonb[], $10::text[]::jsonb[], $11::text[]::jsonb[])",
        )
        .bind(xid)
        .bind(subxid)
        .bind(seq)
        .bind(r.kind)
        .bind(r.entity)
        .bind(r.relation_id)
        .bind(r.key)
        .bind(r.new_record)
        .bind(r.old_record)
        .bind(r.changes)
        .bind(r.unchanged_toast)
        .execute(conn)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_analyzed_each_time_its_rows_double() {
        let size = 1_000_000;
        let mut marks = vec![];
        let mut head = 0;
        while head < 2 * size {
            head = next_analyze(head, size);
            marks.push(head);
        }
        assert_eq!(
            marks,
            [10_000, 20_000, 40_000, 80_000, 160_000, 320_000, 640_000]
                .iter()
                .chain(&[1_010_000, 1_020_000, 1_040_000, 1_080_000, 1_160_000, 1_320_000])
                .chain(&[1_640_000, 2_010_000])
                .copied()
                .collect::<Vec<_>>()
        );
        assert_eq!(next_analyze(15_000, size), 20_000);
        assert_eq!(next_analyze(700_000, size), 1_010_000);
        assert_eq!(next_analyze(0, 1_000), 100);
        assert_eq!(next_analyze(900, 1_000), 1_100);
    }
}
