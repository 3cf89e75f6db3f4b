//! Appending committed source transactions to `weir.events`.
//!
//! ```text
//! Appender::append([txn, txn, …])          (txns in WAL commit order, from the source)
//!   skip txns whose commit LSN ≤ source_state.lsn     (already stored before a crash)
//!   intern relation shapes → weir.relations ids        (autocommit; immutable facts)
//!   create partitions the batch will reach              (autocommit, short)
//!   BEGIN
//!     INSERT … SELECT FROM unnest(…) (positions state.position+1 …, WAL order in each txn)
//!     streamed txns: move weir.staged_changes rows, numbered by their WAL sequence
//!     UPDATE weir.source_state SET lsn = last commit LSN, position = last position
//!     NOTIFY weir_events, '<last position>'
//!   COMMIT  ──► only now may the caller acknowledge the slot up to the returned LSN
//! ```
//!
//! One appender per database writes the log (the source leader holds an advisory-lock lease),
//! which is what makes positions gap-free and commit-ordered.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use weir_core::{Change, Lsn, Position, Source, Transaction};

use crate::backfill::ChunkStored;
use crate::{NOTIFY_CHANNEL, Result};

/// The source's persisted progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceState {
    /// End LSN of the last commit whose changes are in the log.
    pub lsn: Lsn,
    /// Last position assigned.
    pub position: Position,
}

/// The single writer of the log. Holds its own connection.
#[derive(Debug)]
pub struct Appender {
    conn: PgConnection,
    slot: String,
    state: SourceState,
    partition_size: i64,
    /// Exclusive upper bound of the highest partition.
    partition_upper: i64,
    /// Interned relation shapes, keyed by the `Arc`'s address (the `Arc` is kept alive here, so
    /// the address cannot be reused while cached).
    relations: HashMap<usize, (Arc<Source>, i32)>,
    head: watch::Sender<Position>,
    /// The readers of this process, told of each append as its commit returns.
    readers: Option<crate::Wake>,
}

impl Appender {
    /// Opens the appender for `slot` on a dedicated connection and loads its state.
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
        let (head, _) = watch::channel(position);
        Ok(Self {
            conn,
            slot: slot.to_string(),
            state: SourceState { lsn, position },
            partition_size,
            partition_upper,
            relations: HashMap::new(),
            head,
            readers: None,
        })
    }

    /// The persisted progress.
    pub fn state(&self) -> SourceState {
        self.state
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

    /// Appends `txns` (in commit order) in one transaction; returns the new state. Transactions
    /// at or below the stored LSN are skipped. Only after this returns may the slot be
    /// acknowledged up to the returned LSN.
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
        let fresh: Vec<&Transaction> =
            txns.iter().filter(|t| t.commit_lsn > self.state.lsn).collect();
        let Some(last) = fresh.last() else {
            return Ok(self.state);
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
                    .fetch_one(&mut self.conn)
                    .await?;
            staged_counts.insert(t.xid, n);
        }
        let total: i64 = fresh
            .iter()
            .map(|t| if t.staged { staged_counts[&t.xid] } else { t.changes.len() as i64 })
            .sum();
        self.ensure_partitions(self.state.position + total).await?;

        let mut position = self.state.position;
        let mut tx = self.conn.begin().await?;
        let mut rows = Rows::default();
        for t in &fresh {
            if t.staged {
                rows.insert_events(&mut tx).await?;
                let moved = sqlx::query(MOVE_STAGED)
                    .bind(position)
                    .bind(t.commit_lsn.to_string())
                    .bind(i64::from(t.xid))
                    .bind(t.commit_ts)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                position += moved as i64;
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
                    rows.insert_events(&mut tx).await?;
                }
            }
        }
        rows.insert_events(&mut tx).await?;
        for chunk in chunks {
            chunk.store(&mut tx).await?;
        }
        sqlx::query(
            "update weir.source_state set lsn = $2::pg_lsn, position = $3, updated_at = now()
             where slot = $1",
        )
        .bind(&self.slot)
        .bind(last_lsn.to_string())
        .bind(position)
        .execute(&mut *tx)
        .await?;
        if position > self.state.position {
            sqlx::query("select pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(position.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.state = SourceState { lsn: last_lsn, position };
        self.head.send_replace(position);
        if let Some(readers) = &self.readers {
            readers.advance(position);
        }
        Ok(self.state)
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
        .execute(&mut self.conn)
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
                rows.insert_staged(&mut self.conn).await?;
            }
        }
        rows.insert_staged(&mut self.conn).await?;
        Ok(())
    }

    /// Forgets staged changes of an aborted transaction, or of one aborted subtransaction.
    pub async fn discard_staged(&mut self, xid: u32, subxid: Option<u32>) -> Result<u64> {
        let n = match subxid {
            Some(sub) if sub != xid => {
                sqlx::query("delete from weir.staged_changes where xid = $1 and subxid = $2")
                    .bind(i64::from(xid))
                    .bind(i64::from(sub))
                    .execute(&mut self.conn)
                    .await?
            }
            _ => {
                sqlx::query("delete from weir.staged_changes where xid = $1")
                    .bind(i64::from(xid))
                    .execute(&mut self.conn)
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
            .fetch_all(&mut self.conn)
            .await?)
    }

    /// Drops every staged change: at start the slot sends in-progress transactions again.
    pub async fn clear_staged(&mut self) -> Result<()> {
        sqlx::query("truncate weir.staged_changes").execute(&mut self.conn).await?;
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
        .fetch_one(&mut self.conn)
        .await?;
        self.relations.insert(addr, (rel.clone(), id));
        Ok(id)
    }

    /// Makes sure partitions cover `last_position`, and creates the next one ahead of need.
    ///
    /// Creating a partition takes a strong lock on `weir.events`; queued behind a long-running
    /// reader it would block every other reader. So it runs with a short `lock_timeout`: a
    /// partition wanted only ahead of time is skipped on timeout (tried again at the next
    /// append), one that is needed now is retried until it gets the lock.
    async fn ensure_partitions(&mut self, last_position: Position) -> Result<()> {
        let ahead = last_position + self.partition_size / 2;
        while ahead >= self.partition_upper {
            let needed = last_position >= self.partition_upper;
            let lo = self.partition_upper.max(1);
            // Aligned to multiples of the size, so names are predictable.
            let hi = (lo / self.partition_size + 1) * self.partition_size;
            let sql = format!(
                "create table if not exists weir.events_{lo:012} partition of weir.events \
                 for values from ({lo}) to ({hi})"
            );
            let mut tx = self.conn.begin().await?;
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
#[derive(Default)]
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
