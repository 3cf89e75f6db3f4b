//! `weir-bench streams`: the event store — how fast `weir.append` stores events, how fast a
//! subscription delivers them, and how long an event takes from its append to its handler.
//!
//! Each phase runs in a fresh database (a private cluster with `fsync=on` unless `--url` names a
//! server, where the benchmark creates and drops its own databases):
//!
//! 1. **Appends**: `--writers` (1 and 50) × `--batches` (1 and 100 events per append) — each
//!    writer on its own connection, appending to streams of its own with exact expected
//!    versions:
//!
//!    ```sql
//!    select * from weir.append($1::text, $2::text, $3::jsonb)   -- stream, expected, events
//!    -- expected: 'no_stream' for a new stream, then its last version as text
//!    -- events:   [{"type": "bench.appended", "data": {"n": 1}}, ...]
//!    ```
//!
//!    The **floor**, measured in the same run right after each variant: the same writers send
//!    the same JSON to a plain statement that inserts the same rows into `floor_events`, a table
//!    shaped like `weir.stream_events` (same columns, primary key and unique id, not in the
//!    publication), with no version check:
//!
//!    ```sql
//!    insert into floor_events (stream, version, id, type, data)
//!    select $1, $2 + o, gen_random_uuid(), e->>'type', e->'data'
//!    from jsonb_array_elements($3) with ordinality t(e, o)
//!    ```
//!
//!    Printed: events/s of each, the ratio append / floor (target ≥ 0.7×), and as context the
//!    published figures of Commanded's EventStore (8.6k events/s, 50 writers × 100 events) and
//!    Marten (60–80k events/s) — other machines, other runs: context, not a comparison. Without
//!    `weir.append` in the database (it is not merged yet), the floor alone is measured.
//! 2. **Delivery**: `--delivery-events` events over 1,000 streams appended (plain inserts into
//!    `weir.stream_events`, the rows `weir.append` writes) and logged by ingestion alone (not
//!    measured); then a subscription of a fresh name with 1 and with 8 emitters, from the
//!    beginning, with a handler that only counts, through
//!    `Weir::builder(config).without_ingestion().subscription(def, handler)`. The clock runs from
//!    `start()` until the subscription's checkpoint (its lowest emitter's) reaches the log head;
//!    the handler must have counted every event once. Target: ≥ 20,000 events/s with 8.
//! 3. **Latency** at `--rate` (1,000) appends of one event per second for `--latency-seconds`,
//!    with ingestion and a subscription of 8 emitters running: writers record the instant each
//!    append's commit returns, the handler the instant it is called with the event (one clock,
//!    this process's monotonic one). Latency = handler − commit. The first second is left out.
//!    Targets: p50 ≤ 10 ms, p99 ≤ 50 ms. Appends go through `weir.append` when the database has
//!    it, otherwise through the plain insert (the line says which).
//!
//! Run: `cargo run --release -p weir-bench -- streams` (`--only append|delivery|latency`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use weir::{Config, Event, Weir};
use weir_consumer::OperatorError;
use weir_core::Secret;
use weir_streams::{SubscriptionDef, SubscriptionKind};

use crate::percentile::Percentiles;
use crate::report::{self, Row, ratio, thousands, verdict};
use crate::server::{PgServer, ServerArgs};

const TARGET_FLOOR_RATIO: f64 = 0.7;
const TARGET_DELIVERY_RATE: f64 = 20_000.0;
const TARGET_P50_MS: f64 = 10.0;
const TARGET_P99_MS: f64 = 50.0;

const SCHEMA: &str = "
    create table unrelated (id int primary key);
    -- The floor: weir.stream_events' shape, not in the publication.
    create table floor_events (
        stream      text        not null,
        version     bigint      not null,
        id          uuid        not null unique,
        type        text        not null,
        data        jsonb       not null,
        metadata    jsonb       not null default '{}',
        tags        text[]      not null default '{}',
        recorded_at timestamptz not null default now(),
        primary key (stream, version));";

const APPEND_SQL: &str = "select * from weir.append($1::text, $2::text, $3::jsonb)";
const FLOOR_SQL: &str = "insert into floor_events (stream, version, id, type, data)
     select $1, $2 + o, gen_random_uuid(), e->>'type', e->'data'
     from jsonb_array_elements($3) with ordinality t(e, o)";
const INSERT_ONE_SQL: &str = "insert into weir.stream_events (stream, version, id, type, data)
     values ($1, $2, gen_random_uuid(), 'bench.appended', '{}')";

/// Arguments of `weir-bench streams`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    server: ServerArgs,
    /// Run only this phase.
    #[arg(long, value_enum)]
    only: Option<Phase>,
    /// Events appended per append variant (split among the writers).
    #[arg(long, default_value_t = 20_000)]
    append_events: u64,
    /// Writer counts of the append phase.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 50])]
    writers: Vec<usize>,
    /// Events per append of the append phase.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 100])]
    batches: Vec<usize>,
    /// Events of the delivery phase's backlog.
    #[arg(long, default_value_t = 100_000)]
    delivery_events: u64,
    /// Appends of one event per second in the latency phase.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Length of the latency phase, in seconds.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Connections in weir's pool.
    #[arg(long, default_value_t = 16)]
    pool_size: u32,
    /// `analyze weir.events` after the delivery backlog is logged (`--analyze false` leaves it
    /// to autovacuum).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    analyze: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    Append,
    Delivery,
    Latency,
}

/// `weir-bench streams`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.append_events == 0 || args.writers.contains(&0) || args.batches.contains(&0) {
        bail!("--append-events, --writers and --batches must be at least 1");
    }
    let server = PgServer::start(args.server.url.clone(), false, Vec::new(), None).await?;
    server.print_header("streams", "").await?;
    println!();
    let wants = |p: Phase| args.only.is_none_or(|o| o == p);
    if wants(Phase::Append) {
        appends(&server, &args).await.context("append phase")?;
    }
    if wants(Phase::Delivery) {
        delivery(&server, &args).await.context("delivery phase")?;
    }
    if wants(Phase::Latency) {
        latency(&server, &args).await.context("latency phase")?;
    }
    server.admin.close().await;
    Ok(())
}

/// A fresh database with weir initialised (slot and publication) and the floor's table.
async fn fresh(server: &PgServer, phase: &str, args: &Args) -> anyhow::Result<(String, Config)> {
    let name = format!("weir_bench_streams_{phase}_{}", std::process::id());
    let url = server.create_db(&name).await?;
    let mut config = Config::default();
    config.database.url = Some(Secret::new(url.clone()));
    config.database.pool_size = args.pool_size;
    config.source.slot = name.clone();
    config.source.tables = vec!["unrelated".into()];
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    weir::setup::init(&pool, &config).await?;
    pool.close().await;
    Ok((name, config))
}

/// Whether the database has the event store's append function.
async fn has_append(pool: &PgPool) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar("select to_regprocedure('weir.append(text, text, jsonb)') is not null")
        .fetch_one(pool)
        .await?)
}

// ---------------------------------------------------------------------------------------------
// Phase 1: appends against plain inserts

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Append,
    Floor,
}

/// `writers` connections appending `events` in all, `batch` per statement, each writer to its
/// own stream; events/s.
async fn append_run(
    url: &str,
    target: Target,
    writers: usize,
    batch: usize,
    events: u64,
    tag: &str,
) -> anyhow::Result<f64> {
    let per_writer = (events as usize).div_ceil(writers).div_ceil(batch);
    let mut conns = Vec::with_capacity(writers);
    for _ in 0..writers {
        conns.push(PgConnection::connect(url).await?);
    }
    let payload: Vec<serde_json::Value> = (0..batch)
        .map(|n| json!({"type": "bench.appended", "data": {"n": n, "pad": "x".repeat(64)}}))
        .collect();
    let payload = serde_json::Value::Array(payload);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (w, mut conn) in conns.into_iter().enumerate() {
        let stream = format!("{tag}-w{w}");
        let payload = payload.clone();
        tasks.spawn(async move {
            let mut version: i64 = 0;
            for _ in 0..per_writer {
                match target {
                    Target::Append => {
                        let expected = if version == 0 {
                            "no_stream".to_string()
                        } else {
                            version.to_string()
                        };
                        let _: Vec<(uuid::Uuid, i64)> = sqlx::query_as(APPEND_SQL)
                            .bind(&stream)
                            .bind(expected)
                            .bind(&payload)
                            .fetch_all(&mut conn)
                            .await?;
                    }
                    Target::Floor => {
                        sqlx::query(FLOOR_SQL)
                            .bind(&stream)
                            .bind(version)
                            .bind(&payload)
                            .execute(&mut conn)
                            .await?;
                    }
                }
                version += batch as i64;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((per_writer * batch * writers) as f64 / seconds)
}

async fn appends(server: &PgServer, args: &Args) -> anyhow::Result<()> {
    println!("== appends: {} events per variant ==", thousands(args.append_events as f64));
    let (name, config) = fresh(server, "append", args).await?;
    let url = config.database.url.as_ref().expect("set above").expose().to_string();
    let pool = PgPool::connect(&url).await?;
    let with_append = has_append(&pool).await?;
    if !with_append {
        println!("  weir.append is not in this database (not merged yet): the floor alone");
        report::record(Row {
            benchmark: "streams",
            figure: "appends against plain inserts".into(),
            measured: "skipped: weir.append is not in the database".into(),
            reference: String::new(),
            ratio: None,
            target: None,
            met: None,
        });
    }
    let mut rows = Vec::new();
    for &writers in &args.writers {
        for &batch in &args.batches {
            let tag = format!("w{writers}b{batch}");
            let append = if with_append {
                Some(
                    append_run(&url, Target::Append, writers, batch, args.append_events, &tag)
                        .await?,
                )
            } else {
                None
            };
            let floor =
                append_run(&url, Target::Floor, writers, batch, args.append_events, &tag).await?;
            match append {
                Some(a) => println!(
                    "  {writers:>2} writers × {batch:>3} events: weir.append {:>8} events/s, \
                     plain insert {:>8} events/s, {}",
                    thousands(a),
                    thousands(floor),
                    ratio(a / floor)
                ),
                None => println!(
                    "  {writers:>2} writers × {batch:>3} events: plain insert {:>8} events/s",
                    thousands(floor)
                ),
            }
            rows.push((writers, batch, append, floor));
        }
    }
    println!();
    println!("  | writers × batch | weir.append | plain insert (floor) | ratio (target ≥ 0.7×) |");
    println!("  |---|---|---|---|");
    for (writers, batch, append, floor) in rows {
        let (a, r) = match append {
            Some(a) => (
                format!("{} ev/s", thousands(a)),
                format!("{} ({})", ratio(a / floor), verdict(a / floor >= TARGET_FLOOR_RATIO)),
            ),
            None => ("not measured".into(), "—".into()),
        };
        println!("  | {writers} × {batch} | {a} | {} ev/s | {r} |", thousands(floor));
        if let Some(a) = append {
            report::record(Row {
                benchmark: "streams",
                figure: format!("appends, {writers} writers × {batch} events, events/s"),
                measured: format!("{}/s", thousands(a)),
                reference: format!("{}/s (plain insert)", thousands(floor)),
                ratio: Some(a / floor),
                target: Some(format!("≥ {TARGET_FLOOR_RATIO:.2}x")),
                met: Some(a / floor >= TARGET_FLOOR_RATIO),
            });
        }
    }
    println!(
        "  context (published, other machines): Commanded EventStore 8.6k events/s \
         (50 writers × 100); Marten 60–80k events/s"
    );
    println!();
    pool.close().await;
    server.drop_db(&name).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Phase 2: delivery through a subscription

/// Counts what it is given; nothing else.
#[derive(Clone, Default)]
struct Count(Arc<AtomicU64>);

impl weir_streams::Handler for Count {
    async fn handle(&self, _tx: &mut PgConnection, _event: &Event) -> Result<(), OperatorError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The log head: the last position ingestion stored.
pub(crate) async fn head(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("select coalesce(max(position), 0) from weir.source_state")
        .fetch_one(pool)
        .await?)
}

/// Every selected event at or below it is handled: the lowest checkpoint of `consumer`.
pub(crate) async fn watermark(pool: &PgPool, consumer: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "select coalesce(min(position), 0) from weir.checkpoints where consumer = $1",
    )
    .bind(consumer)
    .fetch_one(pool)
    .await?)
}

async fn delivery(server: &PgServer, args: &Args) -> anyhow::Result<()> {
    let n = args.delivery_events as i64;
    println!("== delivery: a backlog of {} events over 1,000 streams ==", thousands(n as f64));
    let (name, config) = fresh(server, "delivery", args).await?;
    let pool = weir::db::connect(&config).await?;
    // The backlog: version v of every stream in one transaction per 50 versions.
    let versions = args.delivery_events.div_ceil(1000) as i64;
    let mut v = 0;
    while v < versions {
        let upto = (v + 50).min(versions);
        sqlx::query(
            "insert into weir.stream_events (stream, version, id, type, data)
             select 'd-' || s, g, gen_random_uuid(), 'bench.appended', jsonb_build_object('n', g)
             from generate_series($1::bigint, $2::bigint) g, generate_series(0, 999) s",
        )
        .bind(v + 1)
        .bind(upto)
        .execute(&pool)
        .await?;
        v = upto;
    }
    let total = versions * 1000;
    // Logged by ingestion alone, not measured.
    let cancel = CancellationToken::new();
    let ingest = tokio::spawn({
        let (cancel, config, pool) = (cancel.clone(), config.clone(), pool.clone());
        async move { weir::ingest::run(&config, &pool, &weir::ProcessId::generate(), cancel).await }
    });
    let t = Instant::now();
    while head(&pool).await? < total {
        if ingest.is_finished() || t.elapsed() > Duration::from_secs(600) {
            bail!("ingestion stopped at position {} of {total}", head(&pool).await?);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    ingest.await?.context("ingestion failed")?;
    println!("  logged in {:.1} s (not part of the figures)", t.elapsed().as_secs_f64());
    if args.analyze {
        // As `operators` does: the planner sees the backlog (autovacuum may not have yet).
        sqlx::raw_sql("analyze weir.events").execute(&pool).await?;
    }
    let last = head(&pool).await?;
    let mut rates = Vec::new();
    for emitters in [1u32, 8] {
        let sub = format!("deliver{emitters}");
        let count = Count::default();
        let def =
            SubscriptionDef::new(&sub, SubscriptionKind::Stream, json!("d-*")).pool_size(emitters);
        let started = Instant::now();
        let running = Weir::builder(config.clone())
            .pool(pool.clone())
            .without_ingestion()
            .subscription(def, count.clone())
            .start()
            .await?;
        while watermark(&pool, &sub).await? < last {
            if started.elapsed() > Duration::from_secs(900) {
                bail!("`{sub}` did not catch up in 900 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        running.stop().await?;
        let counted = count.0.load(Ordering::Relaxed) as i64;
        let rate = total as f64 / seconds;
        println!(
            "  {emitters} emitter(s): {} events/s ({} events in {seconds:.1} s; handler called {} times)",
            thousands(rate),
            thousands(total as f64),
            thousands(counted as f64)
        );
        if counted != total {
            println!("  WARNING: the handler counted {counted}, expected {total}");
        }
        rates.push(rate);
    }
    println!(
        "  8 emitters: {} events/s, target ≥ {} ({}); 8 / 1 = {}",
        thousands(rates[1]),
        thousands(TARGET_DELIVERY_RATE),
        verdict(rates[1] >= TARGET_DELIVERY_RATE),
        ratio(rates[1] / rates[0])
    );
    report::record(Row {
        benchmark: "streams",
        figure: "delivery, 8 emitters, events/s".into(),
        measured: format!("{}/s", thousands(rates[1])),
        reference: format!("{}/s (1 emitter)", thousands(rates[0])),
        ratio: Some(rates[1] / rates[0]),
        target: Some(format!("≥ {}/s", thousands(TARGET_DELIVERY_RATE))),
        met: Some(rates[1] >= TARGET_DELIVERY_RATE),
    });
    println!();
    pool.close().await;
    server.drop_db(&name).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Phase 3: append → handler latency

/// When each event's append committed (writers) and reached the handler, by (stream, version).
type Instants = Arc<Mutex<HashMap<(String, i64), Instant>>>;

/// Records the instant it is called with each event.
#[derive(Clone, Default)]
struct Stamp(Instants);

impl weir_streams::Handler for Stamp {
    async fn handle(&self, _tx: &mut PgConnection, event: &Event) -> Result<(), OperatorError> {
        let now = Instant::now();
        if let Some(row) = &event.new_record
            && let (Some(s), Some(v)) = (row["stream"].as_str(), row["version"].as_i64())
        {
            self.0.lock().expect("stamps").entry((s.to_string(), v)).or_insert(now);
        }
        Ok(())
    }
}

async fn latency(server: &PgServer, args: &Args) -> anyhow::Result<()> {
    println!(
        "== latency: {} appends/s for {} s, a subscription of 8 emitters ==",
        thousands(args.rate as f64),
        args.latency_seconds
    );
    let (name, config) = fresh(server, "latency", args).await?;
    let url = config.database.url.as_ref().expect("set above").expose().to_string();
    let pool = weir::db::connect(&config).await?;
    let with_append = has_append(&pool).await?;
    println!(
        "  appends through {}",
        if with_append {
            "weir.append"
        } else {
            "a plain insert into weir.stream_events (weir.append is not merged yet)"
        }
    );
    let stamps = Stamp::default();
    let def = SubscriptionDef::new("latency", SubscriptionKind::Stream, json!("l-*")).pool_size(8);
    let running = Weir::builder(config.clone())
        .pool(pool.clone())
        .subscription(def, stamps.clone())
        .start()
        .await?;
    // Writers: 10 of them, each its own stream, together `rate` appends per second.
    let writers = 10usize;
    let interval = Duration::from_secs_f64(writers as f64 / args.rate as f64);
    let until = Instant::now() + Duration::from_secs(args.latency_seconds);
    let warm = Instant::now() + Duration::from_secs(1);
    let commits: Instants = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let mut conn = PgConnection::connect(&url).await?;
        let commits = commits.clone();
        tasks.spawn(async move {
            let stream = format!("l-{w}");
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut version = 0i64;
            while Instant::now() < until {
                tick.tick().await;
                if with_append {
                    let expected =
                        if version == 0 { "no_stream".to_string() } else { version.to_string() };
                    let events = json!([{"type": "bench.appended", "data": {}}]);
                    let _: Vec<(uuid::Uuid, i64)> = sqlx::query_as(APPEND_SQL)
                        .bind(&stream)
                        .bind(expected)
                        .bind(events)
                        .fetch_all(&mut conn)
                        .await?;
                } else {
                    sqlx::query(INSERT_ONE_SQL)
                        .bind(&stream)
                        .bind(version + 1)
                        .execute(&mut conn)
                        .await?;
                }
                let at = Instant::now();
                version += 1;
                if at > warm {
                    commits.lock().expect("commits").insert((stream.clone(), version), at);
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let expected = commits.lock().expect("commits").len();
    let t = Instant::now();
    loop {
        let done = {
            let seen = stamps.0.lock().expect("stamps");
            commits.lock().expect("commits").keys().all(|k| seen.contains_key(k))
        };
        if done || t.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.stop().await?;
    let mut ms = Vec::with_capacity(expected);
    let mut missing = 0;
    {
        let seen = stamps.0.lock().expect("stamps");
        for (key, committed) in commits.lock().expect("commits").iter() {
            match seen.get(key) {
                Some(handled) => {
                    ms.push(handled.saturating_duration_since(*committed).as_secs_f64() * 1000.0)
                }
                None => missing += 1,
            }
        }
    }
    let Some(p) = Percentiles::of(ms) else { bail!("no event reached the handler") };
    println!(
        "  append commit → handler over {} events: p50 {:.2} ms ({}), p90 {:.2} ms, p99 {:.2} ms ({}), max {:.2} ms",
        thousands(p.count as f64),
        p.p50,
        verdict(p.p50 <= TARGET_P50_MS),
        p.p90,
        p.p99,
        verdict(p.p99 <= TARGET_P99_MS),
        p.max
    );
    if missing > 0 {
        println!("  WARNING: {missing} appended events never reached the handler");
    }
    for (what, ms, target) in [("p50", p.p50, TARGET_P50_MS), ("p99", p.p99, TARGET_P99_MS)] {
        report::record(Row {
            benchmark: "streams",
            figure: format!("append commit → handler {what} at {}/s", thousands(args.rate as f64)),
            measured: format!("{ms:.2} ms"),
            reference: String::new(),
            ratio: None,
            target: Some(format!("≤ {target} ms")),
            met: Some(ms <= target),
        });
    }
    println!();
    pool.close().await;
    server.drop_db(&name).await?;
    Ok(())
}
