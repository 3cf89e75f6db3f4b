//! Appending committed source transactions to `weir.events`.
//!
//! ```text
//! Appender::append([txn, txn, …])          (txns in WAL commit order, from the source)
//!   skip txns whose commit LSN ≤ source_state.lsn     (already stored before a crash)
//!   intern relation shapes → weir.relations ids        (autocommit; immutable facts)
//!   create partitions the batch will reach              (autocommit, short)
//!   BEGIN
//!     COPY weir.events … (positions state.position+1 …, WAL order inside each txn)
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

use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use weir_core::{Change, Lsn, Position, Source, Transaction};

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
    buf: Vec<u8>,
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
            buf: Vec::with_capacity(1 << 20),
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

    /// Appends `txns` (in commit order) in one transaction; returns the new state. Transactions
    /// at or below the stored LSN are skipped. Only after this returns may the slot be
    /// acknowledged up to the returned LSN.
    pub async fn append(&mut self, txns: &[Transaction]) -> Result<SourceState> {
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
        let mut pending = 0usize;
        self.buf.clear();
        for t in &fresh {
            if t.staged {
                flush_copy(&mut tx, &mut self.buf, &mut pending).await?;
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
            let ts = t.commit_ts.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
            let lsn = t.commit_lsn.to_string();
            for c in &t.changes {
                position += 1;
                let relation_id =
                    c.relation.as_ref().map(|r| self.relations[&(Arc::as_ptr(r) as usize)].1);
                encode_row(&mut self.buf, position, &lsn, t.xid, &ts, c, relation_id);
                pending += 1;
            }
            if self.buf.len() > (8 << 20) {
                flush_copy(&mut tx, &mut self.buf, &mut pending).await?;
            }
        }
        flush_copy(&mut tx, &mut self.buf, &mut pending).await?;
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
        self.buf.clear();
        for (i, (subxid, c)) in changes.iter().enumerate() {
            let relation_id =
                c.relation.as_ref().map(|r| self.relations[&(Arc::as_ptr(r) as usize)].1);
            encode_staged(&mut self.buf, xid, *subxid, first_seq + i as i64, c, relation_id);
        }
        let mut copy = self
            .conn
            .copy_in_raw(
                "copy weir.staged_changes (xid, subxid, seq, kind, entity, relation_id, key, \
                 new_record, old_record, changes, unchanged_toast) from stdin",
            )
            .await?;
        copy.send(self.buf.as_slice()).await?;
        copy.finish().await?;
        self.buf.clear();
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

async fn flush_copy(conn: &mut PgConnection, buf: &mut Vec<u8>, pending: &mut usize) -> Result<()> {
    if *pending == 0 {
        return Ok(());
    }
    let mut copy = conn
        .copy_in_raw(
            "copy weir.events (position, lsn, xid, commit_ts, kind, entity, relation_id, key, \
             new_record, old_record, changes, unchanged_toast) from stdin",
        )
        .await?;
    copy.send(buf.as_slice()).await?;
    copy.finish().await?;
    buf.clear();
    *pending = 0;
    Ok(())
}

fn encode_row(
    buf: &mut Vec<u8>,
    position: Position,
    lsn: &str,
    xid: u32,
    ts: &str,
    c: &Change,
    relation_id: Option<i32>,
) {
    use std::io::Write;
    let _ = write!(buf, "{position}\t{lsn}\t{xid}\t{ts}\t");
    encode_common(buf, c, relation_id);
}

fn encode_staged(
    buf: &mut Vec<u8>,
    xid: u32,
    subxid: u32,
    seq: i64,
    c: &Change,
    relation_id: Option<i32>,
) {
    use std::io::Write;
    let _ = write!(buf, "{xid}\t{subxid}\t{seq}\t");
    encode_common(buf, c, relation_id);
}

/// kind, entity, relation_id, key, new_record, old_record, changes, unchanged_toast + newline.
fn encode_common(buf: &mut Vec<u8>, c: &Change, relation_id: Option<i32>) {
    use std::io::Write;
    buf.extend_from_slice(c.kind.as_str().as_bytes());
    buf.push(b'\t');
    escape_into(buf, c.entity.as_bytes());
    buf.push(b'\t');
    match relation_id {
        Some(id) => {
            let _ = write!(buf, "{id}");
        }
        None => buf.extend_from_slice(b"\\N"),
    }
    buf.push(b'\t');
    json_into(buf, Some(&c.key));
    buf.push(b'\t');
    json_into(buf, c.new_record.as_ref());
    buf.push(b'\t');
    json_into(buf, c.old_record.as_ref());
    buf.push(b'\t');
    json_into(buf, c.changes.as_ref());
    buf.push(b'\t');
    if c.unchanged_toast.is_empty() {
        buf.extend_from_slice(b"\\N");
    } else {
        // An array literal of quoted names, then COPY-escaped.
        let mut lit = Vec::new();
        lit.push(b'{');
        for (i, name) in c.unchanged_toast.iter().enumerate() {
            if i > 0 {
                lit.push(b',');
            }
            lit.push(b'"');
            for &b in name.as_bytes() {
                if b == b'"' || b == b'\\' {
                    lit.push(b'\\');
                }
                lit.push(b);
            }
            lit.push(b'"');
        }
        lit.push(b'}');
        escape_into(buf, &lit);
    }
    buf.push(b'\n');
}

fn json_into(buf: &mut Vec<u8>, value: Option<&Value>) {
    match value {
        None => buf.extend_from_slice(b"\\N"),
        Some(v) => {
            let text = serde_json::to_vec(v).expect("JSON values always serialize");
            escape_into(buf, &text);
        }
    }
}

/// COPY text format: backslash, tab, newline and carriage return are escaped.
fn escape_into(buf: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        match b {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            _ => buf.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_escaping_keeps_json_intact() {
        let mut buf = Vec::new();
        escape_into(&mut buf, br#"{"a":"x\ty\\z"}"#);
        assert_eq!(buf, br#"{"a":"x\\ty\\\\z"}"#.to_vec());
        let mut buf = Vec::new();
        escape_into(&mut buf, b"a\tb\nc\rd");
        assert_eq!(buf, b"a\\tb\\nc\\rd".to_vec());
    }
}
