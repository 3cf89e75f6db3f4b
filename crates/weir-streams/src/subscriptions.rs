//! Subscriptions kept in the database: every surface (`weir.toml`, the CLI, HTTP, Rust) comes
//! here, so every process sees the same subscriptions.
//!
//! ```text
//! create ─► validate ─► one transaction: consumer row (kind subscription, pool_size lanes,
//!           checkpoints at the start position) + weir.subscriptions row
//! update ─► selector, options, sink: stored, generation + 1 (every process restarts the
//!           emitters with the new definition, from their checkpoints)
//!           pool_size: a re-split — the emitters drain to a common position, then the engine
//!           replaces them (weir_consumer::begin_resplit): nothing lost or repeated
//! stop / start ─► the consumer's state (checkpoints kept)
//! delete ─► the consumer with its checkpoints, failures and parked events
//! ```

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{Connection, PgPool};
use uuid::Uuid;
use weir_consumer::status::LaneStatus;
use weir_consumer::{ConsumerKind, ConsumerState};
use weir_log::LogReader;

use crate::sink::Sink;
use crate::subscription::{StartAt, SubscriptionDef, SubscriptionKind, SubscriptionOptions};
use crate::{Error, Result};

/// A subscription as every surface shows it (reckon_db's shape, plus its state and emitters).
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Subscription {
    /// Stable id.
    #[schema(value_type = String)]
    pub id: Uuid,
    /// What the selector selects.
    #[serde(rename = "type")]
    pub kind: SubscriptionKind,
    /// The selector.
    #[schema(schema_with = crate::subscription::selector_schema)]
    pub selector: Value,
    /// Its name.
    pub subscription_name: String,
    /// Emitters.
    pub pool_size: i32,
    /// While a re-split is in progress: the pool size it goes to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_pool_size: Option<i32>,
    /// Every selected event at or below it is delivered (the lowest emitter checkpoint).
    pub checkpoint: i64,
    /// Retries, failure policy, routing.
    pub options: SubscriptionOptions,
    /// `client` (SSE/WebSocket clients attached by name), `rust` (an in-process handler), or a
    /// webhook or NATS sink's settings (`{"type": "webhook", ...}`; secrets appear only as the
    /// names of the environment variables that hold them).
    pub sink: Sink,
    /// What a webhook or NATS sink delivered (`None` for client and rust sinks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<Deliveries>,
    /// Why the last process that tried could not deliver to the sink (a secret's environment
    /// variable not set there, say); cleared when one can.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink_error: Option<String>,
    /// Where it started.
    #[schema(schema_with = crate::subscription::start_from_schema)]
    pub start_from: Value,
    /// `running`, `halted` or `stopped`.
    pub state: ConsumerState,
    /// Where it halted: `{lane, position, attempt, error}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub halted: Option<Value>,
    /// Why it stopped, when its sink stopped it (a webhook receiver answered `410 Gone`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_reason: Option<String>,
    /// Parked events.
    pub parked: i64,
    /// Each emitter: position, lag (events and seconds), state, owner, last error.
    pub emitters: Vec<LaneStatus>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When its definition last changed.
    pub updated_at: DateTime<Utc>,
}

/// What a webhook or NATS sink has delivered, over all its emitters.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow, utoipa::ToSchema)]
pub struct Deliveries {
    /// Events delivered (acknowledged by the receiver and checkpointed).
    pub delivered: i64,
    /// The last delivered event's log position.
    pub last_position: Option<i64>,
    /// When the last delivery was checkpointed.
    pub last_delivered_at: Option<DateTime<Utc>>,
    /// Failed attempts that were retried.
    pub retries: i64,
    /// Events given up on (halted, skipped, parked or stopped on).
    pub failed: i64,
    /// The last failed attempt's error.
    pub last_error: Option<String>,
    /// When it failed.
    pub last_error_at: Option<DateTime<Utc>>,
}

/// What an update changes; `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionUpdate {
    /// A new type (then a selector of that type too).
    #[serde(rename = "type")]
    pub kind: Option<SubscriptionKind>,
    /// A new selector.
    #[schema(schema_with = crate::subscription::nullable_selector_schema)]
    pub selector: Option<Value>,
    /// A new pool size: a re-split without loss or repetition.
    pub pool_size: Option<u32>,
    /// New options (replacing the old ones).
    pub options: Option<SubscriptionOptions>,
    /// A new sink, replacing the old one as a whole: `client`, `rust`, or a webhook's or NATS
    /// sink's table, as at creation.
    pub sink: Option<Sink>,
}

/// Creates a subscription; a name taken by a subscription or an operator is
/// [`Error::Duplicate`], and nothing is stored for an invalid definition.
pub async fn create(pool: &PgPool, def: &SubscriptionDef) -> Result<Subscription> {
    def.validate()?;
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    if let Some(kind) = existing_kind(&mut tx, &def.name).await? {
        return Err(duplicate(kind, &def.name));
    }
    let start = start_position(pool, &def.start_from).await?;
    weir_consumer::register_consumer(
        &mut tx,
        &def.name,
        ConsumerKind::Subscription,
        def.pool_size as i32,
        &def.coarse_selector(),
        start,
    )
    .await
    .map_err(|e| match e {
        // A concurrent create of an operator of that name won.
        weir_consumer::Error::Config { .. } => {
            Error::Duplicate { what: "operator", name: def.name.clone() }
        }
        e => e.into(),
    })?;
    let inserted = sqlx::query(
        "insert into weir.subscriptions (name, type, selector, options, sink, sink_config,
                                         start_from)
         values ($1, $2, $3, $4, $5, $6, $7)
         on conflict (name) do nothing",
    )
    .bind(&def.name)
    .bind(def.kind.as_str())
    .bind(&def.selector)
    .bind(sqlx::types::Json(&def.options))
    .bind(def.sink.kind().as_str())
    .bind(def.sink.settings())
    .bind(def.start_from.to_value())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(Error::Duplicate { what: "subscription", name: def.name.clone() });
    }
    tx.commit().await?;
    get(pool, &def.name).await
}

/// Creates the subscription, or brings an existing one to `def` (a changed pool size
/// re-splits); what `weir.toml` and `Weir::builder().subscription` do at every start. The
/// start position matters only when it is created.
pub async fn ensure(pool: &PgPool, def: &SubscriptionDef) -> Result<Subscription> {
    def.validate()?;
    let current = match load(pool, &def.name).await {
        Ok(current) => current,
        Err(Error::UnknownSubscription(_)) => {
            return match create(pool, def).await {
                // Another process created it first: bring it to this definition.
                Err(Error::Duplicate { what: "subscription", .. }) => {
                    Box::pin(ensure(pool, def)).await
                }
                r => r,
            };
        }
        Err(e) => return Err(e),
    };
    let update = SubscriptionUpdate {
        kind: (current.kind != def.kind).then_some(def.kind),
        selector: (current.selector != def.selector).then(|| def.selector.clone()),
        pool_size: (current.pool_size != def.pool_size).then_some(def.pool_size),
        options: (current.options != def.options).then(|| def.options.clone()),
        sink: (current.sink != def.sink).then(|| def.sink.clone()),
    };
    if update == SubscriptionUpdate::default() {
        return get(pool, &def.name).await;
    }
    self::update(pool, &def.name, update).await
}

/// Changes a subscription. Selector, options and sink apply from each emitter's checkpoint
/// on; a new pool size re-splits the emitters at a common position (the answer shows
/// `pending_pool_size` until that is done).
pub async fn update(pool: &PgPool, name: &str, update: SubscriptionUpdate) -> Result<Subscription> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    // The row lock orders concurrent updates.
    let locked: Option<String> =
        sqlx::query_scalar("select name from weir.subscriptions where name = $1 for update")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    if locked.is_none() {
        return Err(Error::UnknownSubscription(name.to_string()));
    }
    let current = load_in(&mut tx, name).await?;
    let mut next = current.clone();
    if let Some(kind) = update.kind {
        if update.selector.is_none() {
            return Err(Error::InvalidSubscription(format!(
                "subscription `{name}`: a new type needs a selector of that type too"
            )));
        }
        next.kind = kind;
    }
    if let Some(selector) = update.selector {
        next.selector = selector;
    }
    if let Some(pool_size) = update.pool_size {
        next.pool_size = pool_size;
    }
    if let Some(options) = update.options {
        next.options = options;
    }
    if let Some(sink) = update.sink {
        next.sink = sink;
    }
    next.validate()?;
    let definition_changed = next.kind != current.kind
        || next.selector != current.selector
        || next.options != current.options
        || next.sink != current.sink;
    if definition_changed {
        sqlx::query(
            "update weir.subscriptions
             set type = $2, selector = $3, options = $4, sink = $5, sink_config = $6,
                 sink_error = null, sink_error_at = null, updated_at = now()
             where name = $1",
        )
        .bind(name)
        .bind(next.kind.as_str())
        .bind(&next.selector)
        .bind(sqlx::types::Json(&next.options))
        .bind(next.sink.kind().as_str())
        .bind(next.sink.settings())
        .execute(&mut *tx)
        .await?;
        let coarse = next.coarse_selector();
        let kinds: Vec<&str> = coarse.kinds.iter().map(|k| k.as_str()).collect();
        // Every process restarts the emitters with the new definition.
        sqlx::query(
            "update weir.consumers set entities = $2, kinds = $3, generation = generation + 1
             where name = $1",
        )
        .bind(name)
        .bind(&coarse.entities)
        .bind(&kinds)
        .execute(&mut *tx)
        .await?;
    }
    if next.pool_size != current.pool_size {
        weir_consumer::begin_resplit(&mut tx, name, next.pool_size as i32).await?;
        sqlx::query("update weir.subscriptions set updated_at = now() where name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    get(pool, name).await
}

/// Stops a subscription: its emitters finish what they are delivering and wait; the
/// checkpoints stay.
pub async fn stop(pool: &PgPool, name: &str) -> Result<Subscription> {
    require(pool, name).await?;
    weir_consumer::stop(pool, name).await?;
    get(pool, name).await
}

/// Starts a stopped subscription from its checkpoints.
pub async fn start(pool: &PgPool, name: &str) -> Result<Subscription> {
    require(pool, name).await?;
    weir_consumer::start(pool, name).await?;
    get(pool, name).await
}

/// Deletes a subscription with its checkpoints, failures and parked events.
pub async fn delete(pool: &PgPool, name: &str) -> Result<()> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let exists: Option<String> =
        sqlx::query_scalar("select name from weir.subscriptions where name = $1 for update")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    if exists.is_none() {
        return Err(Error::UnknownSubscription(name.to_string()));
    }
    weir_consumer::delete(&mut tx, name).await?;
    tx.commit().await?;
    Ok(())
}

/// One subscription with its state and emitters.
pub async fn get(pool: &PgPool, name: &str) -> Result<Subscription> {
    let row: Option<Row> =
        sqlx::query_as(SELECT_ROWS_BY_NAME).bind(name).fetch_optional(pool).await?;
    let row = row.ok_or_else(|| Error::UnknownSubscription(name.to_string()))?;
    assemble(pool, row).await
}

/// Every subscription, by name.
pub async fn list(pool: &PgPool) -> Result<Vec<Subscription>> {
    let rows: Vec<Row> = sqlx::query_as(SELECT_ROWS).fetch_all(pool).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(assemble(pool, row).await?);
    }
    Ok(out)
}

/// The stored definition (with the current pool size).
pub async fn load(pool: &PgPool, name: &str) -> Result<SubscriptionDef> {
    let mut conn = pool.acquire().await?;
    load_in(&mut conn, name).await
}

async fn load_in(conn: &mut sqlx::PgConnection, name: &str) -> Result<SubscriptionDef> {
    let row: Option<Row> =
        sqlx::query_as(SELECT_ROWS_BY_NAME).bind(name).fetch_optional(conn).await?;
    row.ok_or_else(|| Error::UnknownSubscription(name.to_string()))?.definition()
}

/// The one select of subscription rows (with their consumer's pool and generation), ending in
/// a `where`/`order by` of each caller's.
macro_rules! select_rows {
    ($rest:literal) => {
        concat!(
            "select s.id, s.name, s.type, s.selector, s.options, s.sink, s.sink_config,
                    s.sink_error, s.start_from, s.created_at, s.updated_at, k.lanes,
                    k.next_lanes, k.generation
             from weir.subscriptions s join weir.consumers k on k.name = s.name ",
            $rest
        )
    };
}

const SELECT_ROWS: &str = select_rows!("order by s.name");

const SELECT_ROWS_BY_NAME: &str = select_rows!("where s.name = $1");

/// A `weir.subscriptions` row joined with its consumer's pool.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct Row {
    id: Uuid,
    pub(crate) name: String,
    #[sqlx(rename = "type")]
    kind: String,
    selector: Value,
    options: Value,
    sink: String,
    sink_config: Option<Value>,
    sink_error: Option<String>,
    start_from: Value,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    pub(crate) lanes: i32,
    next_lanes: Option<i32>,
    /// The consumer's generation (see `weir_consumer::ConsumerSpec::generation`).
    pub(crate) generation: i64,
}

impl Row {
    pub(crate) fn definition(&self) -> Result<SubscriptionDef> {
        Ok(SubscriptionDef {
            name: self.name.clone(),
            kind: self.kind.parse()?,
            selector: self.selector.clone(),
            pool_size: self.lanes as u32,
            start_from: StartAt::from_value(&self.start_from)?,
            options: serde_json::from_value(self.options.clone()).map_err(|e| {
                Error::InvalidSubscription(format!(
                    "subscription `{}`: stored options: {e}",
                    self.name
                ))
            })?,
            sink: self.sink()?,
        })
    }

    fn sink(&self) -> Result<Sink> {
        Sink::from_parts(&self.sink, self.sink_config.as_ref()).map_err(|e| {
            Error::InvalidSubscription(format!("subscription `{}`: stored sink: {e}", self.name))
        })
    }
}

/// Rows of the subscriptions the catalog runs: delivered by a Rust handler of one of
/// `handlers`, and (with `sinks`) every webhook and NATS subscription.
pub(crate) async fn engine_rows(
    pool: &PgPool,
    handlers: &[String],
    sinks: bool,
) -> Result<Vec<Row>> {
    Ok(sqlx::query_as(select_rows!(
        "where (s.sink = 'rust' and s.name = any($1))
            or ($2 and s.sink in ('webhook', 'nats'))"
    ))
    .bind(handlers)
    .bind(sinks)
    .fetch_all(pool)
    .await?)
}

/// Records why this process cannot deliver to `name`'s sink (`None`: it can), unless the
/// definition changed since (`generation`).
pub(crate) async fn record_sink_error(
    pool: &PgPool,
    name: &str,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "update weir.subscriptions
         set sink_error = $2, sink_error_at = case when $2::text is null then null else now() end
         where name = $1 and sink_error is distinct from $2",
    )
    .bind(name)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Counts a delivery of `delivered` events up to `position` by emitter `lane`, in the
/// transaction that moves its checkpoint.
pub(crate) async fn record_delivery(
    conn: &mut sqlx::PgConnection,
    name: &str,
    lane: i32,
    delivered: usize,
    position: i64,
) -> Result<()> {
    sqlx::query(
        "insert into weir.sink_deliveries
             (subscription, lane, delivered, last_position, last_delivered_at)
         values ($1, $2, $3, $4, now())
         on conflict (subscription, lane) do update
         set delivered = weir.sink_deliveries.delivered + excluded.delivered,
             last_position = greatest(weir.sink_deliveries.last_position, excluded.last_position),
             last_delivered_at = excluded.last_delivered_at",
    )
    .bind(name)
    .bind(lane)
    .bind(delivered as i64)
    .bind(position)
    .execute(conn)
    .await?;
    Ok(())
}

async fn deliveries(pool: &PgPool, name: &str) -> Result<Deliveries> {
    Ok(sqlx::query_as(
        "select coalesce((select sum(delivered) from weir.sink_deliveries
                          where subscription = $1), 0)::bigint as delivered,
                (select max(last_position) from weir.sink_deliveries
                 where subscription = $1) as last_position,
                (select max(last_delivered_at) from weir.sink_deliveries
                 where subscription = $1) as last_delivered_at,
                (select count(*) from weir.consumer_failures
                 where consumer = $1 and outcome = 'retry') as retries,
                (select count(*) from weir.consumer_failures
                 where consumer = $1 and outcome <> 'retry') as failed,
                f.error as last_error, f.at as last_error_at
         from (select 1) one
         left join lateral (select error, at from weir.consumer_failures
                            where consumer = $1 order by at desc limit 1) f on true",
    )
    .bind(name)
    .fetch_one(pool)
    .await?)
}

async fn assemble(pool: &PgPool, row: Row) -> Result<Subscription> {
    let status = weir_consumer::status::consumer(pool, &row.name)
        .await?
        .ok_or_else(|| Error::UnknownSubscription(row.name.clone()))?;
    let checkpoint = status.lanes.iter().map(|l| l.position).min().unwrap_or(0);
    let sink = row.sink()?;
    let deliveries = match sink {
        Sink::Webhook(_) | Sink::Nats(_) => Some(deliveries(pool, &row.name).await?),
        Sink::Client | Sink::Rust => None,
    };
    Ok(Subscription {
        id: row.id,
        kind: row.kind.parse()?,
        selector: row.selector,
        subscription_name: row.name,
        pool_size: row.lanes,
        pending_pool_size: row.next_lanes,
        checkpoint,
        options: serde_json::from_value(row.options).unwrap_or_default(),
        sink,
        deliveries,
        sink_error: row.sink_error,
        start_from: row.start_from,
        state: status.state,
        halted: status.halted,
        stopped_reason: status.stopped_reason,
        parked: status.parked,
        emitters: status.lanes,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

async fn require(pool: &PgPool, name: &str) -> Result<()> {
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from weir.subscriptions where name = $1)")
            .bind(name)
            .fetch_one(pool)
            .await?;
    if exists { Ok(()) } else { Err(Error::UnknownSubscription(name.to_string())) }
}

async fn existing_kind(conn: &mut sqlx::PgConnection, name: &str) -> Result<Option<ConsumerKind>> {
    Ok(sqlx::query_scalar("select kind from weir.consumers where name = $1")
        .bind(name)
        .fetch_optional(conn)
        .await?)
}

fn duplicate(kind: ConsumerKind, name: &str) -> Error {
    Error::Duplicate { what: kind.as_str(), name: name.to_string() }
}

/// The log position after which a new subscription starts.
async fn start_position(pool: &PgPool, start: &StartAt) -> Result<i64> {
    let reader = LogReader::new(pool.clone()).await?;
    let head = reader.head().await?;
    let oldest = reader.oldest().await?;
    Ok(match start {
        StartAt::Beginning => oldest.map_or(head, |p| p - 1),
        StartAt::Now => head,
        StartAt::After(p) => {
            if let Some(o) = oldest
                && *p < o - 1
            {
                return Err(Error::InvalidSubscription(format!(
                    "start_from {p}: the log holds events from position {o} on (older ones were \
                     dropped by retention); start at {} or later",
                    o - 1
                )));
            }
            *p
        }
        StartAt::Time(t) => {
            let first: Option<i64> =
                sqlx::query_scalar("select min(position) from weir.events where commit_ts >= $1")
                    .bind(t)
                    .fetch_one(pool)
                    .await?;
            first.map_or(head, |p| p - 1)
        }
    })
}
