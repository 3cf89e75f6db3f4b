//! Backfill: the rows a watched table held before capture, loaded into the log as `read`
//! events — in chunks by primary key, without locking the table and without pausing capture.
//!
//! Where it sits: inside the ingest session of the slot's leader, beside the reader and the
//! log writer (`ingest.rs`). The technique is DBLog's (Netflix, 2019): watermarks written into
//! the WAL around each chunk's `select` tell the log writer which live changes raced the read.
//!
//! ```text
//!  driver (this module)                    WAL ─► reader ─► log writer (ingest.rs)
//!  ─────────────────────                                    ──────────────────────────────
//!  register chunk N (in memory)
//!  emit message  low(N)     ───────────────────────────────► low(N): start the window —
//!  select … where key > last                                  note the key of every change
//!         order by key limit size                             of the table committed from
//!  hand the rows to the writer                                here on (streamed ones too)
//!  emit message  high(N)    ───────────────────────────────► high(N): drop the chunk's rows
//!                                                             whose key is in the window,
//!                                                             append the rest as `read`
//!                                                             events at high(N)'s place in
//!                                                             commit order, with the chunk's
//!  wait until stored  ◄──────────────────────────────────────── progress, in one transaction
//! ```
//!
//! Why this is right: a row changed inside the window has a live event after `low(N)` that is
//! at least as new as the row the select read, and it stays in the log after the chunk's place;
//! a row not changed inside the window was read as it is at `high(N)`. So no row's last state in
//! the log comes from a version older than its last live change.
//!
//! Crash safety: the chunk's progress (`weir.backfills.last_key`) commits with its events. After
//! a crash the slot replays from the log's last commit; watermarks of a chunk this session does
//! not know are ignored, and the driver reads the chunk again from the stored key.
//! Memory: one chunk of rows at a time, plus the keys changed during its window.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value, json};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use weir_core::{Change, Config, Kind, Source, Transaction};
use weir_log::Appender;
use weir_log::backfill::{self as store, Backfill, BackfillState, ChunkStored, Requested};
use weir_source::assemble::WATERMARK_PREFIX;
use weir_source::cast::TypeRegistry;

use crate::setup::split_table;
use crate::{Error, Result};

/// Rows per chunk unless a request says otherwise.
pub const DEFAULT_CHUNK_SIZE: i32 = 5_000;
/// How often the driver looks for a backfill to run while none is active.
const POLL: Duration = Duration::from_secs(1);
/// How long a chunk may take from its high watermark to being stored before the driver
/// gives up on this session (the writer is stuck or gone).
const STORE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait, after a low watermark, for transactions that were committing as it was
/// written to become visible (see [`settle`]).
const SETTLE: Duration = Duration::from_secs(2);

/// Asks for backfills of `tables` (`posts`, `sales.orders`). Every table is checked first —
/// it exists, weir watches it, it has a primary key, no backfill of it is active — and nothing
/// is created unless all pass. The ingesting `weir run` process starts them in order.
pub async fn request(
    pool: &PgPool,
    config: &Config,
    tables: &[String],
    requested_by: &str,
    chunk_size: Option<i32>,
) -> Result<Vec<Backfill>> {
    weir_log::migrate(pool).await?;
    let chunk_size = chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
    if chunk_size < 1 {
        return Err(Error::Backfill(format!(
            "the chunk size must be at least 1 row (it is {chunk_size})"
        )));
    }
    if tables.is_empty() {
        return Err(Error::Backfill("name at least one table to backfill".into()));
    }
    let mut checked = Vec::new();
    for table in tables {
        let entity = entity_of(table);
        let key = check(pool, config, &entity).await?;
        if let Some(b) = store::active(pool, &entity).await? {
            return Err(already_active(&b));
        }
        checked.push((entity, key));
    }
    let mut created = Vec::new();
    for (entity, key) in checked {
        match store::request(pool, &entity, &key, requested_by, chunk_size).await? {
            Requested::Created(b) => created.push(b),
            Requested::AlreadyActive(b) => return Err(already_active(&b)),
        }
    }
    Ok(created)
}

/// For an operator with `backfill = true` that has never run (no consumer of its name yet):
/// asks for backfills of its entities, so it computes the rows they already hold. A table with
/// an active backfill already is left to it. An entity that cannot be backfilled refuses the
/// start, naming it.
pub(crate) async fn for_new_operator(
    pool: &PgPool,
    config: &Config,
    op: &weir_core::OperatorConfig,
) -> Result<()> {
    weir_log::migrate(pool).await?;
    let known: bool = sqlx::query_scalar(
        "select to_regclass('weir.consumers') is not null
            and exists (select 1 from weir.consumers where name = $1)",
    )
    .bind(&op.name)
    .fetch_one(pool)
    .await
    .unwrap_or(false);
    if known {
        return Ok(());
    }
    for entity in &op.entities {
        let entity = entity_of(entity);
        let key = check(pool, config, &entity).await.map_err(|e| {
            Error::Backfill(format!("operator `{}` has `backfill = true`: {e}", op.name))
        })?;
        let by = format!("operator {}", op.name);
        if let Requested::Created(b) =
            store::request(pool, &entity, &key, &by, DEFAULT_CHUNK_SIZE).await?
        {
            tracing::info!(operator = %op.name, table = %entity, backfill = b.id, "backfill asked for: the operator is new");
        }
    }
    Ok(())
}

/// Cancels the active backfill of `table`; returns it, or `None` when none was active. Chunks
/// already stored stay in the log.
pub async fn cancel(pool: &PgPool, table: &str) -> Result<Option<Backfill>> {
    let entity = entity_of(table);
    let Some(b) = store::active(pool, &entity).await? else { return Ok(None) };
    store::finish(pool, b.id, BackfillState::Cancelled, None).await?;
    Ok(store::get(pool, b.id).await?)
}

fn already_active(b: &Backfill) -> Error {
    Error::BackfillActive(format!(
        "a backfill of `{}` is already {} (id {}, {} of {} rows); wait for it (`weir backfill \
         --status`) or cancel it (`weir backfill --cancel {}`)",
        b.entity,
        b.state.as_str(),
        b.id,
        b.rows_done,
        b.rows_total.map_or("?".to_string(), |n| n.to_string()),
        b.entity
    ))
}

/// How fast a backfill goes and when it should end, from its stored progress.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Progress {
    /// Rows read per second since it started (null before the first chunk).
    pub rows_per_second: Option<f64>,
    /// Seconds left at that rate (null when not running or not known).
    pub seconds_left: Option<f64>,
    /// Share of `rows_total` read, 0 to 1 (capped: live inserts can add rows).
    pub fraction: Option<f64>,
}

impl Progress {
    /// The progress of `b` as of its last stored chunk.
    pub fn of(b: &Backfill) -> Self {
        let fraction = b.rows_total.map(|total| {
            if total > 0 { (b.rows_done as f64 / total as f64).min(1.0) } else { 1.0 }
        });
        let elapsed = b
            .started_at
            .map(|s| (b.finished_at.unwrap_or(b.updated_at) - s).num_milliseconds() as f64 / 1e3);
        let rows_per_second =
            elapsed.filter(|s| *s > 0.0 && b.rows_done > 0).map(|s| b.rows_done as f64 / s);
        let seconds_left = match (b.state, rows_per_second, b.rows_total) {
            (BackfillState::Running, Some(rate), Some(total)) => {
                Some(((total - b.rows_done).max(0) as f64) / rate)
            }
            _ => None,
        };
        Self { rows_per_second, seconds_left, fraction }
    }
}

/// `posts` and `public.posts` are one entity: `posts`.
fn entity_of(table: &str) -> String {
    let (schema, name) = split_table(table);
    weir_core::Event::entity_name(schema, name)
}

/// Checks that `entity` can be backfilled; returns the key columns it walks.
async fn check(pool: &PgPool, config: &Config, entity: &str) -> Result<Vec<String>> {
    let (schema, table) = split_table(entity);
    let exists: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace
                        where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p'))",
    )
    .bind(schema)
    .bind(table)
    .fetch_one(pool)
    .await?;
    if !exists {
        return Err(Error::Backfill(format!("there is no table `{schema}.{table}` to backfill")));
    }
    let watched: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_publication_tables
                        where pubname = $1 and schemaname = $2 and tablename = $3)",
    )
    .bind(&config.source.publication)
    .bind(schema)
    .bind(table)
    .fetch_one(pool)
    .await?;
    if !watched {
        return Err(Error::Backfill(format!(
            "`{entity}` is not watched (it is not in publication `{}`): add it to `[source] \
             tables` (or its schema to `schemas`) and run `weir init`, then backfill it",
            config.source.publication
        )));
    }
    let key = key_columns(pool, schema, table).await?;
    if key.is_empty() {
        return Err(Error::Backfill(format!(
            "`{entity}` has no primary key, and a backfill reads a table in key order: give it \
             one (`alter table {schema}.{table} add primary key (column)`), or name a unique \
             index over not-null columns as its identity (`alter table {schema}.{table} replica \
             identity using index <index>`)"
        )));
    }
    Ok(key)
}

/// The columns a backfill walks: the primary key in index order, else the replica identity
/// index's (the columns live events carry as their key).
async fn key_columns(pool: &PgPool, schema: &str, table: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "select a.attname::text
         from pg_index i
         join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace
         join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
         where n.nspname = $1 and c.relname = $2
           and i.indexrelid = coalesce(
                 (select indexrelid from pg_index where indrelid = c.oid and indisprimary),
                 (select indexrelid from pg_index where indrelid = c.oid and indisreplident))
         order by array_position(i.indkey::int2[], a.attnum)",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(pool)
    .await?)
}

/// A chunk between its watermarks, shared by the driver and the log writer.
#[derive(Debug)]
struct Pending {
    entity: String,
    /// Open from the low watermark: canonical keys of the table's changes since.
    window: Option<Window>,
    /// The chunk, once read.
    chunk: Option<Chunk>,
}

#[derive(Debug, Default)]
struct Window {
    keys: HashSet<String>,
    /// The table was truncated inside the window: the chunk's rows are all stale.
    truncated: bool,
}

#[derive(Debug)]
struct Chunk {
    rows: Vec<Change>,
    stored: ChunkStored,
    done: oneshot::Sender<()>,
}

/// The chunks of this ingest session that are between their watermarks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Chunks(Arc<Mutex<HashMap<String, Pending>>>);

/// What the log writer appends for a committed transaction.
pub(crate) enum Observed {
    /// The transaction itself.
    Append(Transaction),
    /// A watermark: nothing to append (its LSN may be confirmed).
    Mark,
    /// A high watermark: the chunk's surviving rows, its progress and who waits for it.
    Chunk(Transaction, ChunkStored, oneshot::Sender<()>),
}

impl Chunks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Called by the log writer for every committed transaction, in commit order, before it is
    /// appended.
    pub(crate) async fn observe(
        &self,
        t: Transaction,
        appender: &mut Appender,
    ) -> Result<Observed> {
        if let Some(mark) = watermark(&t) {
            return Ok(self.on_mark(&t, mark));
        }
        let open: Vec<String> = {
            let pending = self.lock();
            if pending.is_empty() {
                return Ok(Observed::Append(t));
            }
            pending.values().filter(|p| p.window.is_some()).map(|p| p.entity.clone()).collect()
        };
        if open.is_empty() {
            return Ok(Observed::Append(t));
        }
        // A streamed transaction's changes wait in weir.staged_changes until the append.
        let mut staged: HashMap<String, Vec<Value>> = HashMap::new();
        if t.staged {
            for entity in &open {
                if !staged.contains_key(entity) {
                    staged.insert(entity.clone(), appender.staged_keys(t.xid, entity).await?);
                }
            }
        }
        let mut pending = self.lock();
        for p in pending.values_mut() {
            let Some(window) = p.window.as_mut() else { continue };
            for c in t.changes.iter().filter(|c| c.entity == p.entity) {
                if c.kind == Kind::Truncate {
                    window.truncated = true;
                } else {
                    window.keys.insert(canonical(&c.key));
                }
            }
            for key in staged.get(&p.entity).into_iter().flatten() {
                window.keys.insert(canonical(key));
            }
        }
        Ok(Observed::Append(t))
    }

    fn on_mark(&self, t: &Transaction, (nonce, low): (String, bool)) -> Observed {
        let mut pending = self.lock();
        if low {
            if let Some(p) = pending.get_mut(&nonce) {
                p.window = Some(Window::default());
            }
            return Observed::Mark;
        }
        // A high watermark of a chunk this session does not hold (a replay after a
        // reconnect, a driver that gave up): the driver reads it again.
        let Some(p) = pending.remove(&nonce) else { return Observed::Mark };
        let (Some(window), Some(chunk)) = (p.window, p.chunk) else { return Observed::Mark };
        let read = chunk.stored.rows_read;
        let rows: Vec<Change> = if window.truncated {
            Vec::new()
        } else {
            chunk.rows.into_iter().filter(|c| !window.keys.contains(&canonical(&c.key))).collect()
        };
        let stored =
            ChunkStored { rows_written: rows.len() as i64, rows_read: read, ..chunk.stored };
        let txn = Transaction {
            xid: t.xid,
            commit_lsn: t.commit_lsn,
            commit_ts: t.commit_ts,
            changes: rows,
            staged: false,
        };
        Observed::Chunk(txn, stored, chunk.done)
    }

    fn forget(&self, nonce: &str) {
        self.lock().remove(nonce);
    }
}

/// `(nonce, is_low)` of a transaction that is one of our watermarks.
fn watermark(t: &Transaction) -> Option<(String, bool)> {
    let [c] = t.changes.as_slice() else { return None };
    if c.kind != Kind::Message || c.entity != WATERMARK_PREFIX {
        return None;
    }
    let content = c.new_record.as_ref()?.get("content")?.as_str()?;
    let mark: Value = serde_json::from_str(content).ok()?;
    let nonce = mark.get("nonce")?.as_str()?.to_string();
    Some((nonce, mark.get("mark")?.as_str()? == "low"))
}

/// A key as a string that is equal for equal keys whatever the order of its columns.
fn canonical(key: &Value) -> String {
    match key {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            serde_json::to_string(&entries).unwrap_or_default()
        }
        other => other.to_string(),
    }
}

/// Runs the active backfills one after another, chunk by chunk, until `cancel` fires. Part of
/// the ingest session: it ends with it, and the next session's driver resumes from what is
/// stored.
pub(crate) async fn drive(
    pool: PgPool,
    chunks: Chunks,
    db: String,
    cancel: CancellationToken,
) -> Result<()> {
    loop {
        let next = match store::next_active(&pool).await {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(error = %weir_core::Chain(&e), "looking for backfills failed");
                None
            }
        };
        match next {
            Some(b) => {
                if let Err(e) = run(&pool, &chunks, &db, &b, &cancel).await {
                    if e.is_transient() {
                        tracing::warn!(backfill = b.id, table = %b.entity, error = %weir_core::Chain(&e), "backfill interrupted; resuming from its last chunk");
                    } else {
                        tracing::error!(backfill = b.id, table = %b.entity, error = %weir_core::Chain(&e), "backfill failed");
                        let message = weir_core::Chain(&e).to_string();
                        let _ =
                            store::finish(&pool, b.id, BackfillState::Failed, Some(&message)).await;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(POLL) => {}
                    }
                }
            }
            None => {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        }
        if cancel.is_cancelled() {
            return Ok(());
        }
    }
}

/// A table's columns as a chunk reads them.
struct Shape {
    source: Arc<Source>,
    names: Vec<String>,
    oids: Vec<u32>,
    types: TypeRegistry,
    /// Indexes of the key columns in `names`, in key order.
    key_idx: Vec<usize>,
    /// `format_type` of each key column, to cast the stored key text back.
    key_types: Vec<String>,
}

impl Shape {
    async fn load(pool: &PgPool, db: &str, b: &Backfill) -> Result<Self> {
        let (schema, table) = split_table(&b.entity);
        // The columns pgoutput publishes: not dropped, not generated.
        let cols: Vec<(String, i64, String, String, String)> = sqlx::query_as(
            "select a.attname::text, a.atttypid::int8, t.typname::text, tn.nspname::text,
                    format_type(a.atttypid, a.atttypmod)
             from pg_attribute a
             join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
             join pg_type t on t.oid = a.atttypid join pg_namespace tn on tn.oid = t.typnamespace
             where n.nspname = $1 and c.relname = $2 and a.attnum > 0 and not a.attisdropped
               and a.attgenerated = ''
             order by a.attnum",
        )
        .bind(schema)
        .bind(table)
        .fetch_all(pool)
        .await?;
        if cols.is_empty() {
            return Err(Error::Backfill(format!("the table `{}` no longer exists", b.entity)));
        }
        let mut types = TypeRegistry::new();
        let mut columns = Map::new();
        for (name, oid, typname, nspname, _) in &cols {
            let oid = *oid as u32;
            if nspname != "pg_catalog" {
                types.learn(oid, nspname, typname);
            }
            columns.insert(name.clone(), Value::String(types.type_name(oid)));
        }
        let names: Vec<String> = cols.iter().map(|c| c.0.clone()).collect();
        let mut key_idx = Vec::new();
        let mut key_types = Vec::new();
        for k in &b.key_columns {
            let Some(i) = names.iter().position(|n| n == k) else {
                return Err(Error::Backfill(format!(
                    "the key column `{k}` of `{}` is gone; cancel this backfill and start a new one",
                    b.entity
                )));
            };
            key_idx.push(i);
            key_types.push(cols[i].4.clone());
        }
        Ok(Self {
            source: Arc::new(Source {
                db: db.to_string(),
                schema: schema.to_string(),
                table: table.to_string(),
                columns,
            }),
            oids: cols.iter().map(|c| c.1 as u32).collect(),
            names,
            types,
            key_idx,
            key_types,
        })
    }

    /// `select array[col::text, …] from t [where (key) > ($1, …)] order by key limit $n`.
    fn select(&self, after: bool) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        let cols: Vec<String> = self.names.iter().map(|n| format!("{}::text", q(n))).collect();
        let key: Vec<String> = self.key_idx.iter().map(|&i| q(&self.names[i])).collect();
        let n = self.key_idx.len();
        let filter = if after {
            let params: Vec<String> =
                (0..n).map(|i| format!("${}::text::{}", i + 1, self.key_types[i])).collect();
            format!("where ({}) > ({})", key.join(", "), params.join(", "))
        } else {
            String::new()
        };
        format!(
            "select array[{}] from {}.{} {filter} order by {} limit ${}",
            cols.join(", "),
            q(&self.source.schema),
            q(&self.source.table),
            key.join(", "),
            if after { n + 1 } else { 1 }
        )
    }

    fn change(&self, entity: &str, row: &[Option<String>]) -> Change {
        let mut record = Map::new();
        for (i, name) in self.names.iter().enumerate() {
            let value = match row.get(i).and_then(|v| v.as_deref()) {
                Some(text) => self.types.cast(self.oids[i], text),
                None => Value::Null,
            };
            record.insert(name.clone(), value);
        }
        let key: Map<String, Value> = self
            .key_idx
            .iter()
            .map(|&i| (self.names[i].clone(), record[&self.names[i]].clone()))
            .collect();
        Change {
            kind: Kind::Read,
            entity: entity.to_string(),
            relation: Some(self.source.clone()),
            key: Value::Object(key),
            new_record: Some(Value::Object(record)),
            old_record: None,
            changes: None,
            unchanged_toast: Vec::new(),
        }
    }
}

/// Runs one backfill from its stored key to the table's end, or until it is cancelled.
async fn run(
    pool: &PgPool,
    chunks: &Chunks,
    db: &str,
    b: &Backfill,
    cancel: &CancellationToken,
) -> Result<()> {
    let shape = Shape::load(pool, db, b).await?;
    let (schema, table) = split_table(&b.entity);
    if b.rows_total.is_none() {
        let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select count(*) from \"{}\".\"{}\"",
            schema.replace('"', "\"\""),
            table.replace('"', "\"\"")
        )))
        .fetch_one(pool)
        .await?;
        store::start(pool, b.id, total).await?;
        tracing::info!(backfill = b.id, table = %b.entity, rows = total, "backfill started");
    } else {
        store::start(pool, b.id, 0).await?;
        tracing::info!(backfill = b.id, table = %b.entity, after = ?b.last_key, "backfill resumed");
    }
    let mut last_key: Option<Vec<String>> =
        b.last_key.as_ref().and_then(|v| serde_json::from_value(v.clone()).ok());
    let first = shape.select(false);
    let next = shape.select(true);
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        match store::get(pool, b.id).await?.map(|b| b.state) {
            Some(BackfillState::Running) => {}
            _ => return Ok(()), // cancelled (or deleted) meanwhile
        }
        let nonce = uuid::Uuid::new_v4().to_string();
        chunks
            .lock()
            .insert(nonce.clone(), Pending { entity: b.entity.clone(), window: None, chunk: None });
        let result =
            chunk(pool, chunks, &shape, b, &nonce, &first, &next, &mut last_key, cancel).await;
        chunks.forget(&nonce);
        match result? {
            Step::More => {}
            Step::Done | Step::Stopped => return Ok(()),
        }
    }
}

enum Step {
    More,
    Done,
    Stopped,
}

#[allow(clippy::too_many_arguments)]
async fn chunk(
    pool: &PgPool,
    chunks: &Chunks,
    shape: &Shape,
    b: &Backfill,
    nonce: &str,
    first: &str,
    next: &str,
    last_key: &mut Option<Vec<String>>,
    cancel: &CancellationToken,
) -> Result<Step> {
    emit(pool, nonce, "low").await?;
    settle(pool).await?;
    let rows: Vec<Vec<Option<String>>> = match last_key.as_ref() {
        None => {
            sqlx::query_scalar(sqlx::AssertSqlSafe(first.to_string()))
                .bind(i64::from(b.chunk_size))
                .fetch_all(pool)
                .await?
        }
        Some(key) => {
            let mut q = sqlx::query_scalar(sqlx::AssertSqlSafe(next.to_string()));
            for k in key {
                q = q.bind(k.clone());
            }
            q.bind(i64::from(b.chunk_size)).fetch_all(pool).await?
        }
    };
    let Some(last_row) = rows.last() else {
        store::finish(pool, b.id, BackfillState::Done, None).await?;
        tracing::info!(backfill = b.id, table = %b.entity, "backfill done");
        return Ok(Step::Done);
    };
    let key: Vec<String> =
        shape.key_idx.iter().map(|&i| last_row[i].clone().unwrap_or_default()).collect();
    let last = rows.len() < b.chunk_size as usize;
    let changes: Vec<Change> = rows.iter().map(|r| shape.change(&b.entity, r)).collect();
    let (done_tx, done_rx) = oneshot::channel();
    {
        let mut pending = chunks.lock();
        let Some(p) = pending.get_mut(nonce) else { return Ok(Step::Stopped) };
        p.chunk = Some(Chunk {
            stored: ChunkStored {
                backfill: b.id,
                last_key: key.clone(),
                rows_read: changes.len() as i64,
                rows_written: 0,
                last,
            },
            rows: changes,
            done: done_tx,
        });
    }
    emit(pool, nonce, "high").await?;
    tokio::select! {
        _ = cancel.cancelled() => return Ok(Step::Stopped),
        stored = tokio::time::timeout(STORE_TIMEOUT, done_rx) => match stored {
            Ok(Ok(())) => {}
            // The writer dropped the chunk (its session ended) or never got to it.
            Ok(Err(_)) => return Ok(Step::Stopped),
            Err(_) => {
                tracing::warn!(backfill = b.id, table = %b.entity, "the log writer did not store a chunk within {}s; reading it again", STORE_TIMEOUT.as_secs());
                return Ok(Step::Stopped);
            }
        },
    }
    *last_key = Some(key);
    if last {
        tracing::info!(backfill = b.id, table = %b.entity, "backfill done");
        Ok(Step::Done)
    } else {
        Ok(Step::More)
    }
}

/// Waits until the transactions running when the low watermark was committed are visible (or
/// `SETTLE` passed), before the chunk's select takes its snapshot.
///
/// A transaction's commit record reaches the WAL before the transaction becomes visible (it
/// waits for the flush in between). One whose commit record precedes the low watermark is
/// outside the chunk's window, yet a select run at once may not see it yet: the chunk would
/// then carry the row as it was before, appended after the change — an older row overwriting a
/// newer one in the log. Such a transaction becomes visible within a flush; one still running
/// after `SETTLE` has not written its commit record, so its changes fall inside the window and
/// drop the rows they touch.
async fn settle(pool: &PgPool) -> Result<()> {
    let running: Vec<String> =
        sqlx::query_scalar("select x::text from pg_snapshot_xip(pg_current_snapshot()) x")
            .fetch_all(pool)
            .await?;
    if running.is_empty() {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let still: i64 = sqlx::query_scalar(
            "select count(*) from unnest($1::text[]) x
              where not pg_visible_in_snapshot(x::xid8, pg_current_snapshot())",
        )
        .bind(&running)
        .fetch_one(pool)
        .await?;
        if still == 0 || tokio::time::Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Writes a watermark into the WAL: a transactional logical message, committed at once.
async fn emit(pool: &PgPool, nonce: &str, mark: &str) -> Result<()> {
    sqlx::query("select pg_logical_emit_message(true, $1, $2)")
        .bind(WATERMARK_PREFIX)
        .bind(json!({"nonce": nonce, "mark": mark}).to_string())
        .execute(pool)
        .await?;
    Ok(())
}
