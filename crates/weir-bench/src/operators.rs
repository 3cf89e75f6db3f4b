//! `weir-bench operators`: how fast the consumer engine runs a transactional SQL operator, with
//! `global` ordering (one lane: EventStreamex's head-of-line design) and with `per_key` ordering
//! over several lanes, and how long a change takes from its source commit to its derived row.
//!
//! What it measures (each phase in a fresh database; a private cluster with `fsync=on` unless
//! `--url` names a server, where the benchmark creates and drops its own databases — the
//! database part of that URL is not used):
//!
//! 1. **Throughput**: a source table `items(id bigint primary key, k int, v text)` and a derived
//!    table `counters(k int primary key, n bigint)`. `--events` inserts are generated
//!    (`insert … select generate_series` in transactions of 100,000 rows, `--keys` distinct
//!    `k`), and ingestion runs alone until `weir.source_state.position` reaches `--events` (not
//!    measured). Then, for `global` and for `per_key` over `--lanes` lanes, one after the other
//!    over the same log, a consumer with a fresh name (starting from the beginning) runs the
//!    operator
//!
//!    ```toml
//!    [[operators]]
//!    name = "counters_per_key"
//!    entities = ["items"]
//!    key = { items = "k" }
//!    ordering = "per_key"
//!    lanes = 8
//!    sql = "insert into counters (k, n) values ($1, 1) on conflict (k) do update set n = counters.n + 1"
//!    ```
//!
//!    through `weir::Weir::builder(config).pool(pool).without_ingestion().start()`. The clock
//!    runs from `start()` until `min(position)` over the consumer's lanes in `weir.checkpoints`
//!    reaches `--events` (polled every 20 ms); `sum(n)` in `counters` must then equal
//!    `--events` (exactly-once). Printed: events/s of each, the ratio per_key / global (the
//!    gain over a head-of-line design), where the CPU went (server backends vs this process),
//!    server transactions and WAL flushes per event, and what the engine's connections were
//!    doing (`pg_stat_activity` sampled every 50 ms).
//!
//!    Then a **floor**, to tell the engine's cost from the database's: the same per-event SQL
//!    as `Lane::attempt` (pool acquire — which pings an idle connection — `BEGIN`, the upsert,
//!    the fenced checkpoint `UPDATE`, `COMMIT`) run by plain loops on 1 and on `--lanes`
//!    connections, without the ping, and with `--floor-batch` events per transaction (one
//!    checkpoint update per batch, which keeps exactly-once); plus one read of the log in pages
//!    of 500 through `weir::LogReader` (every lane of a `per_key` consumer reads every page).
//! 2. **A slow key**: `--slow-events` logged events, every `--slow-every`th (20th) of one key
//!    whose handler sleeps 50 ms (`pg_sleep` in the statement), the others over `--keys`
//!    keys. Each ordering runs from the start of that backlog for `--slow-seconds` (5); the
//!    events handled in that window (`sum(n)`) per ordering, and their ratio: under `global`
//!    ordering every event waits behind the slow key's, under `per_key` only the keys that
//!    share its lane do (the EventStreamex design against weir's).
//! 3. **Latency** at `--rate` (5,000) single-row insert transactions per second for
//!    `--latency-seconds`, with ingestion and the `per_key` operator running
//!    (`Weir::builder(config).start()`): writers on their own connections insert rows with a
//!    unique `k` and record the wall-clock instant each commit returns. The operator's
//!    statement is the counter upsert plus `insert into seen (k)`, where `seen.at` defaults to
//!    `clock_timestamp()`: the instant the derived row was written, inside the derived
//!    transaction, which commits right after (its checkpoint update and commit flush, well
//!    under a millisecond at this load, are not included). Latency = `seen.at` − the writer's
//!    commit instant, both read from this machine's real-time clock. A `LISTEN weir_events`
//!    connection splits it into commit → logged and logged → derived. The first second is
//!    left out as warm-up.
//!
//! Run: `cargo run --release -p weir-bench -- operators`
//! (`--events 100000` for a quick run, `--only throughput|slow-key|latency`).
//!
//! Reference and targets (printed beside the figures; a miss does not fail the command): the
//! `global` consumer of this same run is the reference for the head-of-line design, and the
//! floor's batched lanes the reference for the engine's cost; targets on a 2-core machine:
//! ≥ 20,000 events/s with 8 lanes and ≥ 1.5× the floor's 8 batched lanes, ≥ 8× `global` with a
//! slow key, latency p50 ≤ 10 ms and p99 ≤ 50 ms at 5,000 changes/s. The machine is shared and noisy: compare ratios taken in one run, and
//! prefer medians over several runs.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use weir::Config;
use weir_core::Secret;

use crate::cpu::{CpuReport, CpuSampler, auxiliary};
use crate::percentile::Percentiles;
use crate::report::{Row, record, thousands, verdict};
use crate::server::{PgServer, ServerArgs};

const TARGET_PER_KEY_RATE: f64 = 20_000.0;
const TARGET_P50_MS: f64 = 10.0;
const TARGET_P99_MS: f64 = 50.0;
/// per_key over global in the slow-key phase.
const TARGET_SLOW_KEY_RATIO: f64 = 8.0;
/// per_key over the floor's batched lanes.
const TARGET_FLOOR_RATIO: f64 = 1.5;
/// The slow key's `k`, and how long its handler sleeps.
const SLOW_KEY: i64 = -1;
const SLOW_KEY_SQL: &str = "with s as (select pg_sleep(case when $1 = -1 then 0.05 else 0 end)) \
     insert into counters (k, n) select $1, 1 from s \
     on conflict (k) do update set n = counters.n + 1";

/// Rows per generating transaction.
const CHUNK: i64 = 100_000;
/// The page size of the engine (`PAGE` in weir-consumer's engine.rs).
const ENGINE_PAGE: i64 = 500;
/// The bench's own connections carry this name, so the activity sampler can leave them out.
const BENCH_APP: &str = "weir-bench";

const COUNTER_SQL: &str =
    "insert into counters (k, n) values ($1, 1) on conflict (k) do update set n = counters.n + 1";
const LATENCY_SQL: &str = "with s as (insert into seen (k) values ($1)) \
     insert into counters (k, n) values ($1, 1) on conflict (k) do update set n = counters.n + 1";

const SCHEMA: &str = "
    create table items (id bigint primary key, k int not null, v text);
    -- The operators route by `k`: deleted rows must carry it (weir refuses to start otherwise).
    alter table items replica identity full;
    create table counters (k int primary key, n bigint not null);
    create table seen (k int primary key, at timestamptz not null default clock_timestamp());
    -- The floor's copies of the derived table and of weir.checkpoints.
    create table floor_counters (k int primary key, n bigint not null);
    create table floor_checkpoints (
        consumer text not null, lane int not null, position bigint not null,
        attempt int not null default 0, last_error text, current_position bigint,
        owner text, fence bigint not null default 0, updated_at timestamptz not null default now(),
        primary key (consumer, lane));";

/// Arguments of `weir-bench operators`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    server: ServerArgs,
    /// Events logged and then drained by each consumer in the throughput phase.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Run only this phase.
    #[arg(long, value_enum)]
    only: Option<Phase>,
    /// Lanes of the per_key consumer.
    #[arg(long, default_value_t = 8)]
    lanes: u32,
    /// Distinct keys (`k`) in the throughput phase.
    #[arg(long, default_value_t = 10_000)]
    keys: u32,
    /// Connections in weir's pool (the engine takes one per lane while handling an event).
    #[arg(long, default_value_t = 16)]
    pool_size: u32,
    /// Stop a drain after this many seconds and report the rate of what it handled so far
    /// (marked as partial).
    #[arg(long, default_value_t = 1800)]
    max_drain_seconds: u64,
    /// Events per variant of the floor (plain SQL loops without the engine); 0 skips it.
    #[arg(long, default_value_t = 20_000)]
    floor_events: u64,
    /// Events per transaction in the batched floor variant.
    #[arg(long, default_value_t = 50)]
    floor_batch: u64,
    /// Single-row insert transactions per second in the latency phase.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Length of the latency phase, in seconds.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Writer connections in the latency phase.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Events in the slow-key phase's backlog.
    #[arg(long, default_value_t = 100_000)]
    slow_events: u64,
    /// In the slow-key phase, every n-th event is of the slow key (its handler sleeps 50 ms).
    #[arg(long, default_value_t = 20)]
    slow_every: u64,
    /// How long each ordering runs in the slow-key phase, in seconds.
    #[arg(long, default_value_t = 5)]
    slow_seconds: u64,
    /// Connect to the private cluster through its Unix socket instead of TCP on 127.0.0.1
    /// (sqlx does not set TCP_NODELAY: shows what Nagle/delayed-ACK stalls cost).
    #[arg(long)]
    unix_socket: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    Throughput,
    SlowKey,
    Latency,
}

/// `weir-bench operators`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.events < 10 || args.lanes == 0 || args.keys == 0 || args.pool_size < 4 {
        bail!(
            "--events must be at least 10, --lanes and --keys at least 1, --pool-size at least 4"
        );
    }
    if u64::from(args.lanes) + 2 > u64::from(args.pool_size) {
        println!(
            "note: --pool-size {} is small for {} lanes; lanes will wait for connections",
            args.pool_size, args.lanes
        );
    }
    let url = args.server.url.clone();
    if args.unix_socket && url.is_some() {
        bail!(
            "--unix-socket applies to the private cluster; put the socket directory in --url instead"
        );
    }
    let server = PgServer::start(url, args.unix_socket, Vec::new(), Some(BENCH_APP)).await?;
    server.print_header("operators", "").await?;
    println!(
        "  via      {}",
        if args.unix_socket {
            "the cluster's Unix socket (--unix-socket)"
        } else if server.cluster.is_some() {
            "TCP to 127.0.0.1 (as weir is usually deployed)"
        } else {
            "the given URL"
        }
    );
    println!("  weir     pool of {} connections, engine pages of {ENGINE_PAGE}", args.pool_size);
    println!();

    let wants = |p: Phase| args.only.is_none_or(|o| o == p);
    let mut summary = Summary::default();
    if wants(Phase::Throughput) {
        summary.throughput = Some(throughput(&server, &args).await.context("throughput phase")?);
    }
    if wants(Phase::SlowKey) {
        summary.slow_key = Some(slow_key(&server, &args).await.context("slow-key phase")?);
    }
    if wants(Phase::Latency) {
        summary.latency = Some(latency(&server, &args).await.context("latency phase")?);
    }
    summary.print(&args);
    server.admin.close().await;
    drop(server);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The server and its databases

/// A pool for the benchmark's own queries, marked so the activity sampler leaves it out.
async fn bench_pool(url: &str, size: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)?.application_name(BENCH_APP);
    Ok(PgPoolOptions::new().max_connections(size).connect_with(options).await?)
}

/// A consumer to configure: (name, ordering, lanes, sql).
struct OperatorSpec<'a> {
    name: &'a str,
    ordering: &'a str,
    lanes: u32,
    sql: &'a str,
}

/// The configuration: watch `items` only (the derived tables are not captured), and the
/// operator written as it would be in `weir.toml`.
fn weir_config(url: &str, args: &Args, op: Option<&OperatorSpec<'_>>) -> anyhow::Result<Config> {
    let mut toml = String::from("[source]\ntables = [\"items\"]\n");
    if let Some(op) = op {
        toml.push_str(&format!(
            "\n[[operators]]\nname = \"{}\"\nentities = [\"items\"]\nkey = {{ items = \"k\" }}\n\
             ordering = \"{}\"\nlanes = {}\nsql = \"\"\"\n{}\n\"\"\"\n",
            op.name, op.ordering, op.lanes, op.sql
        ));
    }
    let mut config = Config::from_toml(&toml, "weir-bench operators", [])?;
    config.database.url = Some(Secret::new(url.to_string()));
    config.database.pool_size = args.pool_size;
    config.validate()?;
    Ok(config)
}

async fn log_position(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("select coalesce(max(position), 0) from weir.source_state")
        .fetch_one(pool)
        .await?)
}

/// The consumer's watermark: every event at or below it is handled.
async fn watermark(pool: &PgPool, consumer: &str) -> anyhow::Result<Option<i64>> {
    Ok(sqlx::query_scalar("select min(position) from weir.checkpoints where consumer = $1")
        .bind(consumer)
        .fetch_one(pool)
        .await?)
}

async fn consumer_state(pool: &PgPool, consumer: &str) -> anyhow::Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "select state || coalesce(' at position ' || halted_position || ': ' || halted_error, '')
         from weir.consumers where name = $1",
    )
    .bind(consumer)
    .fetch_optional(pool)
    .await?)
}

// ---------------------------------------------------------------------------------------------
// Phase 1: throughput, global vs per_key

#[derive(Debug)]
struct Drain {
    label: String,
    lanes: u32,
    seconds: f64,
    /// Events handled when the clock stopped: all of them unless stopped at the time limit.
    events: i64,
    partial: bool,
    /// `start()` returned after this long (prepare, register), included in `seconds`.
    start_seconds: f64,
    /// `sum(n)` in counters after the stop, and what it must be.
    counted: i64,
    expected_count: i64,
    cpu: CpuReport,
    stats: StatsDelta,
    activity: Activity,
}

impl Drain {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

#[derive(Debug)]
struct FloorRun {
    label: String,
    events: u64,
    seconds: f64,
}

impl FloorRun {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

#[derive(Debug)]
struct ThroughputResult {
    events: u64,
    drains: Vec<Drain>,
    floor: Vec<FloorRun>,
}

impl ThroughputResult {
    fn rate_of(&self, label: &str) -> Option<f64> {
        self.drains.iter().find(|d| d.label == label).map(Drain::rate)
    }
}

async fn throughput(server: &PgServer, args: &Args) -> anyhow::Result<ThroughputResult> {
    let n = args.events as i64;
    println!(
        "== throughput: {} events through a counter upsert over {} keys ==",
        thousands(n as f64),
        thousands(f64::from(args.keys))
    );
    let name = format!("weir_bench_ops_tp_{}", std::process::id());
    let url = server.create_db(&name).await?;
    let pool = bench_pool(&url, 3).await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    let base = weir_config(&url, args, None)?;
    weir::setup::init(&pool, &base).await?;

    // Generate the changes, in transactions of CHUNK rows.
    let t = Instant::now();
    let mut done = 0i64;
    while done < n {
        let upto = (done + CHUNK).min(n);
        sqlx::query(
            "insert into items (id, k, v)
             select g, (g % $3)::int, 'value ' || g from generate_series($1::bigint, $2::bigint) g",
        )
        .bind(done + 1)
        .bind(upto)
        .bind(i64::from(args.keys))
        .execute(&pool)
        .await?;
        done = upto;
    }
    let generated = t.elapsed().as_secs_f64();

    // Ingest them alone (not measured: the drains start from an already-logged backlog).
    let ingested = log_backlog(&base, &pool, n).await?;
    println!(
        "  generated in {generated:.1} s, logged by weir in {ingested:.1} s ({} events/s; not part of the figures)",
        thousands(n as f64 / ingested)
    );
    sqlx::raw_sql("vacuum analyze items").execute(&pool).await?;
    sqlx::raw_sql("analyze weir.events").execute(&pool).await?;

    let mut drains = Vec::new();
    for (label, ordering, lanes) in [("global", "global", 1u32), ("per_key", "per_key", args.lanes)]
    {
        let d = drain(server, &url, &pool, args, label, ordering, lanes, n)
            .await
            .with_context(|| format!("the {label} drain"))?;
        drains.push(d);
    }

    let mut floor = Vec::new();
    if args.floor_events > 0 {
        floor = floor_runs(&url, &pool, args, server.postmaster).await.context("the floor")?;
    }
    pool.close().await;
    server.drop_db(&name).await?;
    println!();
    Ok(ThroughputResult { events: args.events, drains, floor })
}

/// Runs ingestion alone until the log holds `n` events; returns the seconds it took.
async fn log_backlog(base: &Config, pool: &PgPool, n: i64) -> anyhow::Result<f64> {
    let t = Instant::now();
    let weir_pool = weir::db::connect(base).await?;
    let cancel = CancellationToken::new();
    let ingest = tokio::spawn({
        let (cancel, config, pool) = (cancel.clone(), base.clone(), weir_pool.clone());
        async move { weir::ingest::run(&config, &pool, &weir::ProcessId::generate(), cancel).await }
    });
    let mut last = (0i64, Instant::now());
    loop {
        let p = log_position(pool).await?;
        if p >= n {
            break;
        }
        if ingest.is_finished() {
            bail!("ingestion stopped at position {p} of {n}");
        }
        if p != last.0 {
            last = (p, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            bail!("the log stopped at position {p} of {n} for 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ingested = t.elapsed().as_secs_f64();
    cancel.cancel();
    ingest.await?.context("ingestion failed")?;
    weir_pool.close().await;
    Ok(ingested)
}

// ---------------------------------------------------------------------------------------------
// Phase 2: a slow key among fast ones

#[derive(Debug)]
struct SlowKeyResult {
    every: u64,
    seconds: u64,
    lanes: u32,
    /// Events handled in the window by each ordering.
    global: i64,
    per_key: i64,
}

/// One key whose handler sleeps 50 ms (every `--slow-every`th event) among `--keys` fast ones:
/// the events each ordering handles in `--slow-seconds` from the same logged backlog. Under
/// `global` ordering every event waits behind the slow key's; under `per_key` only the keys
/// sharing its lane do.
async fn slow_key(server: &PgServer, args: &Args) -> anyhow::Result<SlowKeyResult> {
    let n = args.slow_events.max(10) as i64;
    let every = args.slow_every.max(1) as i64;
    println!(
        "== a slow key: {} events, every {every}th of key {SLOW_KEY} whose handler sleeps 50 ms, the rest over {} keys ==",
        thousands(n as f64),
        thousands(f64::from(args.keys))
    );
    let name = format!("weir_bench_ops_slow_{}", std::process::id());
    let url = server.create_db(&name).await?;
    let pool = bench_pool(&url, 3).await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    let base = weir_config(&url, args, None)?;
    weir::setup::init(&pool, &base).await?;
    sqlx::query(
        "insert into items (id, k, v)
         select g, case when g % $2 = 0 then $3 else (g % $4)::int end, 'value ' || g
         from generate_series(1, $1::bigint) g",
    )
    .bind(n)
    .bind(every)
    .bind(SLOW_KEY as i32)
    .bind(i64::from(args.keys))
    .execute(&pool)
    .await?;
    let ingested = log_backlog(&base, &pool, n).await?;
    println!("  logged by weir in {ingested:.1} s (not part of the figures)");
    let mut handled = Vec::new();
    for (label, ordering, lanes) in [("global", "global", 1u32), ("per_key", "per_key", args.lanes)]
    {
        sqlx::raw_sql("truncate counters; checkpoint").execute(&pool).await?;
        let consumer = format!("slow_{label}");
        let op = OperatorSpec { name: &consumer, ordering, lanes, sql: SLOW_KEY_SQL };
        let config = weir_config(&url, args, Some(&op))?;
        let weir_pool = weir::db::connect(&config).await?;
        let running = weir::Weir::builder(config)
            .pool(weir_pool.clone())
            .without_ingestion()
            .start()
            .await
            .context("starting the consumer")?;
        tokio::time::sleep(Duration::from_secs(args.slow_seconds)).await;
        let (count, slow): (i64, i64) = sqlx::query_as(
            "select coalesce(sum(n), 0)::bigint, coalesce(sum(n) filter (where k = $1), 0)::bigint
             from counters",
        )
        .bind(SLOW_KEY as i32)
        .fetch_one(&pool)
        .await?;
        running.stop().await.context("the consumer stopped with an error")?;
        weir_pool.close().await;
        println!(
            "  {label:<8} {lanes:>2} lane{} {:>9} events handled in {} s = {:>7} events/s ({} of the slow key)",
            if lanes == 1 { " " } else { "s" },
            thousands(count as f64),
            args.slow_seconds,
            thousands(count as f64 / args.slow_seconds as f64),
            thousands(slow as f64)
        );
        handled.push(count);
    }
    pool.close().await;
    server.drop_db(&name).await?;
    println!();
    Ok(SlowKeyResult {
        every: every as u64,
        seconds: args.slow_seconds,
        lanes: args.lanes,
        global: handled[0],
        per_key: handled[1],
    })
}

#[allow(clippy::too_many_arguments)]
async fn drain(
    server: &PgServer,
    url: &str,
    pool: &PgPool,
    args: &Args,
    label: &str,
    ordering: &str,
    lanes: u32,
    n: i64,
) -> anyhow::Result<Drain> {
    sqlx::raw_sql("truncate counters; checkpoint").execute(pool).await?;
    let consumer = format!("counters_{label}");
    let op = OperatorSpec { name: &consumer, ordering, lanes, sql: COUNTER_SQL };
    let config = weir_config(url, args, Some(&op))?;
    let live: i64 = sqlx::query_scalar(
        "select count(*) from weir.consumer_nodes where heartbeat_at > now() - interval '10 seconds'",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(0);
    if live > 0 {
        println!(
            "  warning: {live} consumer processes still look alive; lanes will be shared with them"
        );
    }
    let weir_pool = weir::db::connect(&config).await?;
    // Open the pool's connections before the clock starts, as a running weir would have them.
    {
        let mut held = Vec::new();
        for _ in 0..args.pool_size {
            held.push(weir_pool.acquire().await?);
        }
    }
    let stats_before = Stats::take(pool).await?;
    let sampler = ActivitySampler::start(url).await?;
    let cpu = CpuSampler::start(server.postmaster, process_label);
    let limit = Duration::from_secs(args.max_drain_seconds);

    let t0 = Instant::now();
    let running = weir::Weir::builder(config)
        .pool(weir_pool.clone())
        .without_ingestion()
        .start()
        .await
        .context("starting the consumer")?;
    let start_seconds = t0.elapsed().as_secs_f64();
    let mut last = (-1i64, Instant::now());
    let mut checked_state = Instant::now();
    let (reached, partial) = loop {
        let w = watermark(pool, &consumer).await?.unwrap_or(0);
        if w >= n {
            break (w, false);
        }
        if t0.elapsed() >= limit {
            break (w, true);
        }
        if w != last.0 {
            last = (w, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            bail!("the consumer's watermark stayed at {w} of {n} for 60 s");
        }
        if checked_state.elapsed() > Duration::from_secs(1) {
            checked_state = Instant::now();
            if let Some(s) = consumer_state(pool, &consumer).await?
                && s.starts_with("halted")
            {
                bail!("the consumer halted: {s}");
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    let activity = sampler.stop().await;
    let stats = Stats::take(pool).await?.since(&stats_before);
    running.stop().await.context("the consumer stopped with an error")?;
    weir_pool.close().await;

    // Exactly-once: every handled event counted once. After a graceful stop, a lane's checkpoint
    // covers exactly what it handled; the global lane handles every event up to its checkpoint.
    let counted: i64 = sqlx::query_scalar("select coalesce(sum(n), 0)::bigint from counters")
        .fetch_one(pool)
        .await?;
    let final_mark = watermark(pool, &consumer).await?.unwrap_or(0);
    let expected_count = if partial && lanes == 1 { final_mark } else { n };
    let d = Drain {
        label: label.to_string(),
        lanes,
        seconds,
        events: reached.min(n),
        partial,
        start_seconds,
        counted,
        expected_count,
        cpu,
        stats,
        activity,
    };
    println!(
        "  {:<8} {:>2} lane{} {:>9} events in {:>7.2} s = {:>7} events/s{}; sum(n) = {} ({})",
        d.label,
        d.lanes,
        if d.lanes == 1 { " " } else { "s" },
        thousands(d.events as f64),
        d.seconds,
        thousands(d.rate()),
        if d.partial { " (PARTIAL: stopped at --max-drain-seconds)" } else { "" },
        thousands(d.counted as f64),
        if d.partial && lanes > 1 {
            "not checked on a partial per_key drain".to_string()
        } else if d.counted == d.expected_count {
            "exactly once".to_string()
        } else {
            format!("EXPECTED {} — a bug", thousands(d.expected_count as f64))
        }
    );
    println!(
        "           start() took {:.0} ms (operator prepared, consumer registered; included)",
        d.start_seconds * 1e3
    );
    println!("           cpu: {}", describe(&d.cpu, d.seconds));
    println!("           per event: {}", per_event(&d.cpu, d.events));
    println!("           per event: {}", d.stats.describe(d.events));
    println!("           engine connections: {}", d.activity.describe());
    Ok(d)
}

// ---------------------------------------------------------------------------------------------
// The floor: the engine's per-event SQL without the engine

async fn floor_runs(
    url: &str,
    pool: &PgPool,
    args: &Args,
    postmaster: Option<u32>,
) -> anyhow::Result<Vec<FloorRun>> {
    let events = args.floor_events;
    let lanes = args.lanes as usize;
    let batch = args.floor_batch.max(1);
    println!(
        "  floor (plain SQL loops, no engine; {} events each; the engine's SQL per event: pool \
         acquire, BEGIN, upsert, fenced checkpoint UPDATE, COMMIT):",
        thousands(events as f64)
    );
    let size = args.pool_size;
    // (label, tasks, pool size, events per transaction, ping on acquire)
    let variants: Vec<(String, usize, u32, u64, bool)> = vec![
        (format!("1 lane, pool of {size}, as the engine"), 1, size, 1, true),
        ("1 lane, pool of 1".into(), 1, 1, 1, true),
        (format!("{lanes} lanes, pool of {size}, as the engine"), lanes, size, 1, true),
        (format!("{lanes} lanes, pool of {size}, no acquire ping"), lanes, size, 1, false),
        (format!("1 lane, {batch} events per transaction"), 1, size, batch, false),
        (format!("{lanes} lanes, {batch} events per transaction"), lanes, size, batch, false),
    ];
    let mut runs = Vec::new();
    for (label, conns, pool_size, batch, ping) in variants {
        sqlx::raw_sql("truncate floor_counters, floor_checkpoints; checkpoint")
            .execute(pool)
            .await?;
        let cpu = CpuSampler::start(postmaster, process_label);
        let seconds = floor_run(url, args.keys, events, conns, pool_size, batch, ping).await?;
        let cpu = cpu.stop();
        let counted: i64 =
            sqlx::query_scalar("select coalesce(sum(n), 0)::bigint from floor_counters")
                .fetch_one(pool)
                .await?;
        if counted != events as i64 {
            bail!("floor `{label}`: counted {counted} of {events}");
        }
        let r = FloorRun { label, events, seconds };
        println!(
            "    {:<52} {:>7} events/s   {}",
            r.label,
            thousands(r.rate()),
            per_event(&cpu, events as i64)
        );
        runs.push(r);
    }
    // Reading: every lane of a per_key consumer reads every page and skips the other lanes'
    // events.
    let reader = weir::LogReader::new(pool.clone()).await?;
    let filter = weir::EventFilter { entities: vec!["items".into()], kinds: Vec::new() };
    let to_read = (events * 10).min(args.events) as i64;
    let cpu = CpuSampler::start(postmaster, process_label);
    let t = Instant::now();
    let mut after = 0i64;
    let mut read = 0i64;
    while read < to_read {
        let page = reader.read(after, ENGINE_PAGE, &filter).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        read += page.len() as i64;
    }
    let seconds = t.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    let r = FloorRun {
        label: format!("reading the log, pages of {ENGINE_PAGE}"),
        events: read as u64,
        seconds,
    };
    println!(
        "    {:<52} {:>7} events/s   {} (a per_key consumer reads each event {} times)",
        r.label,
        thousands(r.rate()),
        per_event(&cpu, read),
        args.lanes
    );
    runs.push(r);
    Ok(runs)
}

/// Handles `events` counter events in `conns` tasks (event i in task i % conns) sharing a pool
/// of `pool_size` connections (acquired per transaction, as the engine does), `batch` per
/// transaction, each transaction ending with the fenced checkpoint update.
async fn floor_run(
    url: &str,
    keys: u32,
    events: u64,
    conns: usize,
    pool_size: u32,
    batch: u64,
    ping: bool,
) -> anyhow::Result<f64> {
    let options = PgConnectOptions::from_str(url)?.application_name(BENCH_APP);
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(ping)
        .connect_with(options)
        .await?;
    for lane in 0..conns {
        sqlx::query(
            "insert into floor_checkpoints (consumer, lane, position, owner, fence)
             values ('floor', $1, 0, 'me', 1)",
        )
        .bind(lane as i32)
        .execute(&pool)
        .await?;
    }
    {
        let mut held = Vec::new();
        for _ in 0..pool_size {
            held.push(pool.acquire().await?);
        }
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for lane in 0..conns {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mine: Vec<i64> =
                (1..=events as i64).filter(|i| (i % conns as i64) as usize == lane).collect();
            for chunk in mine.chunks(batch as usize) {
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin().await?;
                for &i in chunk {
                    sqlx::query(
                        "insert into floor_counters (k, n) values ($1, 1)
                         on conflict (k) do update set n = floor_counters.n + 1",
                    )
                    .bind((i % i64::from(keys)) as i32)
                    .execute(&mut *tx)
                    .await?;
                }
                let last = *chunk.last().expect("chunks are not empty");
                let updated = sqlx::query(
                    "update floor_checkpoints
                     set position = greatest(position, $5), attempt = 0, last_error = null,
                         current_position = null, updated_at = now()
                     where consumer = $1 and lane = $2 and owner = $3 and fence = $4",
                )
                .bind("floor")
                .bind(lane as i32)
                .bind("me")
                .bind(1i64)
                .bind(last)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                anyhow::ensure!(updated == 1, "the floor's checkpoint row is missing");
                tx.commit().await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let seconds = t.elapsed().as_secs_f64();
    pool.close().await;
    Ok(seconds)
}

// ---------------------------------------------------------------------------------------------
// Phase 3: latency from the source commit to the derived row

#[derive(Debug)]
struct LatencyResult {
    target_rate: u64,
    achieved_rate: f64,
    rows: usize,
    measured: usize,
    late_writes: usize,
    /// Source commit → derived row written, ms.
    total: Percentiles,
    /// Source commit → append committed (NOTIFY received), ms.
    logged: Option<Percentiles>,
    /// Append committed → derived row written, ms.
    derived: Option<Percentiles>,
    lanes: u32,
}

fn wall_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

async fn latency(server: &PgServer, args: &Args) -> anyhow::Result<LatencyResult> {
    println!(
        "== latency: {} single-row insert transactions/s for {} s, per_key operator over {} lanes ==",
        thousands(args.rate as f64),
        args.latency_seconds,
        args.lanes
    );
    let name = format!("weir_bench_ops_lat_{}", std::process::id());
    let url = server.create_db(&name).await?;
    let pool = bench_pool(&url, 3).await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    let consumer = "counters_live";
    let op =
        OperatorSpec { name: consumer, ordering: "per_key", lanes: args.lanes, sql: LATENCY_SQL };
    let config = weir_config(&url, args, Some(&op))?;
    weir::setup::init(&pool, &config).await?;
    let weir_pool = weir::db::connect(&config).await?;
    let running = weir::Weir::builder(config)
        .pool(weir_pool.clone())
        .start()
        .await
        .context("starting weir")?;

    // Every notification of an append, with its wall-clock arrival (payload: the new head).
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(weir_log::NOTIFY_CHANNEL).await?;
    let stop_listen = CancellationToken::new();
    let listen_task = tokio::spawn({
        let stop = stop_listen.clone();
        async move {
            let mut seen: Vec<(i64, i64)> = Vec::new();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    n = listener.recv() => {
                        let at = wall_us();
                        if let Ok(p) = n?.payload().parse::<i64>() {
                            seen.push((p, at));
                        }
                    }
                }
            }
            anyhow::Ok(seen)
        }
    });
    // Let ingestion reach streaming and the lanes start before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let writers = args.writers.max(1);
    let rate = args.rate.max(1) as f64;
    let total = (rate * args.latency_seconds as f64) as i64;
    if total > i64::from(i32::MAX) {
        bail!("--rate × --latency-seconds must fit an int key");
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await?;
            let mut done: Vec<(i32, i64)> = Vec::new();
            let mut late = 0usize;
            let mut id = w as i64 + 1;
            while id <= total {
                let due = start + Duration::from_secs_f64((id - 1) as f64 / rate);
                let now = tokio::time::Instant::now();
                if now < due {
                    tokio::time::sleep_until(due).await;
                } else if now - due > Duration::from_millis(10) {
                    late += 1;
                }
                sqlx::query("insert into items (id, k, v) values ($1, $2, 'live')")
                    .bind(id)
                    .bind(id as i32)
                    .execute(&mut conn)
                    .await?;
                done.push((id as i32, wall_us()));
                id += writers as i64;
            }
            conn.close().await?;
            anyhow::Ok((done, late))
        }));
    }
    let mut committed: Vec<(i32, i64)> = Vec::with_capacity(total as usize);
    let mut late_writes = 0;
    for t in tasks {
        let (done, late) = t.await??;
        committed.extend(done);
        late_writes += late;
    }
    let first = committed.iter().map(|c| c.1).min().context("no row was written")?;
    let last = committed.iter().map(|c| c.1).max().context("no row was written")?;
    let achieved_rate = committed.len() as f64 / ((last - first) as f64 / 1e6).max(1e-9);

    // Wait until everything is logged and handled (however long a backlog takes to drain, as
    // long as it moves).
    let mut last = ((-1i64, -1i64), Instant::now());
    loop {
        let head = log_position(&pool).await?;
        let mark = watermark(&pool, consumer).await?.unwrap_or(0);
        if head >= committed.len() as i64 && mark >= head {
            break;
        }
        if (head, mark) != last.0 {
            last = ((head, mark), Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            bail!(
                "nothing moved for 60 s: {head} of {} changes logged, the operator's watermark at {mark}",
                committed.len()
            );
        }
        if let Some(s) = consumer_state(&pool, consumer).await?
            && s.starts_with("halted")
        {
            bail!("the operator halted: {s}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_listen.cancel();
    let mut notified = listen_task.await??;
    running.stop().await.context("weir stopped with an error")?;
    notified.sort_unstable();

    let seen: Vec<(i32, i64)> =
        sqlx::query_as("select k, (extract(epoch from at) * 1000000)::bigint from seen")
            .fetch_all(&pool)
            .await?;
    let positions: Vec<(i64, i32)> = sqlx::query_as(
        "select position, (new_record->>'k')::int from weir.events order by position",
    )
    .fetch_all(&pool)
    .await?;
    let counted: i64 = sqlx::query_scalar("select coalesce(sum(n), 0)::bigint from counters")
        .fetch_one(&pool)
        .await?;
    if seen.len() != committed.len() || counted != committed.len() as i64 {
        println!(
            "  warning: {} rows written, {} seen, counters sum to {counted} (expected all equal)",
            committed.len(),
            seen.len()
        );
    }
    let logged_at: HashMap<i32, i64> = positions
        .iter()
        .filter_map(|(p, k)| {
            let i = notified.partition_point(|(h, _)| *h < *p);
            notified[i..].iter().map(|(_, at)| *at).min().map(|at| (*k, at))
        })
        .collect();
    let seen_at: HashMap<i32, i64> = seen.into_iter().collect();
    let warmup = first + 1_000_000;
    let (mut totals, mut logged, mut derived) = (Vec::new(), Vec::new(), Vec::new());
    for (k, commit) in &committed {
        if *commit < warmup {
            continue;
        }
        let Some(at) = seen_at.get(k) else { continue };
        totals.push((at - commit) as f64 / 1e3);
        if let Some(l) = logged_at.get(k) {
            logged.push((l - commit) as f64 / 1e3);
            derived.push((at - l) as f64 / 1e3);
        }
    }
    let measured = totals.len();
    let total_p = Percentiles::of(totals).context("no latency samples")?;
    let result = LatencyResult {
        target_rate: args.rate,
        achieved_rate,
        rows: committed.len(),
        measured,
        late_writes,
        total: total_p,
        logged: Percentiles::of(logged),
        derived: Percentiles::of(derived),
        lanes: args.lanes,
    };
    println!(
        "  {} rows at {} rows/s achieved ({writers} writers, {} writes started >10 ms late); {} measured after a 1 s warm-up",
        thousands(result.rows as f64),
        thousands(result.achieved_rate),
        result.late_writes,
        thousands(result.measured as f64)
    );
    let show =
        |p: &Percentiles| format!("p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms", p.p50, p.p99, p.max);
    println!("  source commit → derived row written:  {}", show(&result.total));
    if let (Some(l), Some(d)) = (&result.logged, &result.derived) {
        println!("    commit → logged (NOTIFY received): {}", show(l));
        println!("    logged → derived row written:      {}", show(d));
    }
    println!();
    pool.close().await;
    weir_pool.close().await;
    server.drop_db(&name).await?;
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// Summary

#[derive(Debug, Default)]
struct Summary {
    throughput: Option<ThroughputResult>,
    slow_key: Option<SlowKeyResult>,
    latency: Option<LatencyResult>,
}

impl Summary {
    fn print(&self, args: &Args) {
        println!("== summary (targets for this 2-core machine; a miss is reported, not fatal) ==");
        println!("  {:<44} {:>14}   target", "", "measured");
        if let Some(t) = &self.throughput {
            println!(
                "  throughput, {} logged events, counter upsert over {} keys:",
                thousands(t.events as f64),
                thousands(f64::from(args.keys))
            );
            let global = t.rate_of("global");
            let per_key = t.rate_of("per_key");
            for d in &t.drains {
                let name = format!(
                    "    {} ({} lane{}){}",
                    d.label,
                    d.lanes,
                    if d.lanes == 1 { "" } else { "s" },
                    if d.partial { " partial" } else { "" }
                );
                if d.label == "per_key" {
                    println!(
                        "  {:<44} {:>9} ev/s   ≥ {:<14} {}",
                        name,
                        thousands(d.rate()),
                        thousands(TARGET_PER_KEY_RATE),
                        verdict(d.rate() >= TARGET_PER_KEY_RATE)
                    );
                } else {
                    println!(
                        "  {:<44} {:>9} ev/s   (reference: head-of-line)",
                        name,
                        thousands(d.rate())
                    );
                }
            }
            if let (Some(g), Some(p)) = (global, per_key) {
                record(Row {
                    benchmark: "operators",
                    figure: format!("drain, per_key ({} lanes) / global, events/s", args.lanes),
                    measured: format!("{}/s", thousands(p)),
                    reference: format!("{}/s (global)", thousands(g)),
                    ratio: Some(p / g),
                    target: None,
                    met: None,
                });
                println!(
                    "  {:<44} {:>14}   (gain over EventStreamex's global head-of-line design)",
                    format!("    ratio per_key / global"),
                    format!("{:.2}x", p / g)
                );
            }
            if let Some(f) = t
                .floor
                .iter()
                .find(|f| f.label.contains("events per transaction") && !f.label.starts_with("1 "))
            {
                println!(
                    "  {:<44} {:>9} ev/s   (plain SQL, no engine: the reference)",
                    format!("    floor, {}", f.label),
                    thousands(f.rate())
                );
                if let Some(p) = per_key {
                    let r = p / f.rate();
                    record(Row {
                        benchmark: "operators",
                        figure: format!("drain, per_key ({} lanes) / plain-SQL floor", args.lanes),
                        measured: format!("{}/s", thousands(p)),
                        reference: format!("{}/s ({})", thousands(f.rate()), f.label),
                        ratio: Some(r),
                        target: Some(format!("≥ {TARGET_FLOOR_RATIO}x")),
                        met: Some(r >= TARGET_FLOOR_RATIO),
                    });
                    println!(
                        "  {:<44} {:>14}   ≥ {:<14} {}",
                        "    ratio per_key / floor",
                        crate::report::ratio(r),
                        format!("{TARGET_FLOOR_RATIO}x"),
                        verdict(r >= TARGET_FLOOR_RATIO)
                    );
                }
            }
        }
        if let Some(k) = &self.slow_key {
            println!(
                "  a slow key (50 ms, every {}th event) among {} fast keys, handled in {} s:",
                k.every,
                thousands(f64::from(args.keys)),
                k.seconds
            );
            for (label, lanes, handled) in
                [("global", 1, k.global), ("per_key", k.lanes, k.per_key)]
            {
                println!(
                    "  {:<44} {:>9} ev/s",
                    format!("    {label} ({lanes} lane{})", if lanes == 1 { "" } else { "s" }),
                    thousands(handled as f64 / k.seconds as f64)
                );
            }
            let ratio = k.per_key as f64 / k.global.max(1) as f64;
            record(Row {
                benchmark: "operators",
                figure: format!("slow key, per_key ({} lanes) / global, events/s", k.lanes),
                measured: format!("{}/s", thousands(k.per_key as f64 / k.seconds as f64)),
                reference: format!("{}/s (global)", thousands(k.global as f64 / k.seconds as f64)),
                ratio: Some(ratio),
                target: Some(format!("≥ {TARGET_SLOW_KEY_RATIO}x")),
                met: Some(ratio >= TARGET_SLOW_KEY_RATIO),
            });
            println!(
                "  {:<44} {:>14}   ≥ {:<14} {}",
                "    ratio per_key / global",
                crate::report::ratio(ratio),
                format!("{TARGET_SLOW_KEY_RATIO}x"),
                verdict(ratio >= TARGET_SLOW_KEY_RATIO)
            );
        }
        if let Some(l) = &self.latency {
            println!(
                "  latency, source commit → derived row, at {} rows/s achieved (target {}), per_key over {} lanes:",
                thousands(l.achieved_rate),
                thousands(l.target_rate as f64),
                l.lanes
            );
            println!(
                "  {:<44} {:>11.2} ms   ≤ {:<14} {}",
                "    p50",
                l.total.p50,
                format!("{TARGET_P50_MS} ms"),
                verdict(l.total.p50 <= TARGET_P50_MS)
            );
            println!(
                "  {:<44} {:>11.2} ms   ≤ {:<14} {}",
                "    p99",
                l.total.p99,
                format!("{TARGET_P99_MS} ms"),
                verdict(l.total.p99 <= TARGET_P99_MS)
            );
            println!("  {:<44} {:>11.2} ms", "    max", l.total.max);
            let logged = l.logged.as_ref().map(|a| format!("{:.2} ms (commit → logged)", a.p99));
            for (what, ms, target) in
                [("p50", l.total.p50, TARGET_P50_MS), ("p99", l.total.p99, TARGET_P99_MS)]
            {
                record(Row {
                    benchmark: "operators",
                    figure: format!(
                        "commit → derived row {what} at {} rows/s",
                        thousands(l.achieved_rate)
                    ),
                    measured: format!("{ms:.2} ms"),
                    reference: if what == "p99" {
                        logged.clone().unwrap_or_default()
                    } else {
                        String::new()
                    },
                    ratio: None,
                    target: Some(format!("≤ {target} ms")),
                    met: Some(ms <= target),
                });
            }
            if let (Some(a), Some(b)) = (&l.logged, &l.derived) {
                println!(
                    "  {:<44} {:>11.2} ms   p99 {:.2} ms",
                    "    of which commit → logged, p50", a.p50, a.p99
                );
                println!(
                    "  {:<44} {:>11.2} ms   p99 {:.2} ms",
                    "    of which logged → derived row, p50", b.p50, b.p99
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Where the time goes: server statistics, connection activity, CPU

#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    xact_commit: i64,
    wal_records: i64,
    wal_sync: i64,
    wal_bytes: i64,
    tup_returned: i64,
}

#[derive(Debug, Clone, Copy, Default)]
struct StatsDelta(Stats);

impl Stats {
    async fn take(pool: &PgPool) -> anyhow::Result<Self> {
        // Backends report their counters when idle for a moment; give them that moment.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (xact_commit, tup_returned, wal_records, wal_sync, wal_bytes): (
            i64,
            i64,
            i64,
            i64,
            i64,
        ) = sqlx::query_as(
            "select d.xact_commit, d.tup_returned, w.wal_records, w.wal_sync, w.wal_bytes::bigint
                 from pg_stat_database d, pg_stat_wal w where d.datname = current_database()",
        )
        .fetch_one(pool)
        .await?;
        Ok(Self { xact_commit, wal_records, wal_sync, wal_bytes, tup_returned })
    }

    fn since(&self, before: &Stats) -> StatsDelta {
        StatsDelta(Stats {
            xact_commit: self.xact_commit - before.xact_commit,
            wal_records: self.wal_records - before.wal_records,
            wal_sync: self.wal_sync - before.wal_sync,
            wal_bytes: self.wal_bytes - before.wal_bytes,
            tup_returned: self.tup_returned - before.tup_returned,
        })
    }
}

impl StatsDelta {
    fn describe(&self, events: i64) -> String {
        let e = events.max(1) as f64;
        let s = &self.0;
        format!(
            "{:.2} server transactions, {:.2} WAL flushes (fsync), {:.1} WAL records, {:.0} WAL bytes, {:.1} rows read",
            s.xact_commit as f64 / e,
            s.wal_sync as f64 / e,
            s.wal_records as f64 / e,
            s.wal_bytes as f64 / e,
            s.tup_returned as f64 / e
        )
    }
}

/// What weir's connections were doing, sampled from `pg_stat_activity` every 50 ms.
#[derive(Debug, Default)]
struct Activity {
    samples: u64,
    /// "state (wait event)" → backend-samples.
    counts: BTreeMap<String, u64>,
}

impl Activity {
    fn describe(&self) -> String {
        if self.samples == 0 {
            return "no samples".into();
        }
        let mut v: Vec<(&String, &u64)> = self.counts.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        let parts: Vec<String> = v
            .iter()
            .filter(|(_, c)| **c as f64 / self.samples as f64 >= 0.05)
            .map(|(k, c)| format!("{k} {:.1}", **c as f64 / self.samples as f64))
            .collect();
        format!("{} (average number of backends in each state)", parts.join(", "))
    }
}

struct ActivitySampler {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Activity>,
}

impl ActivitySampler {
    async fn start(url: &str) -> anyhow::Result<Self> {
        let options = PgConnectOptions::from_str(url)?.application_name(BENCH_APP);
        let mut conn = PgConnection::connect_with(&options).await?;
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut a = Activity::default();
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let rows: Result<Vec<(String,)>, _> = sqlx::query_as(
                        "select state || coalesce(' (' || wait_event_type || ':' || wait_event || ')', ' (cpu)')
                         from pg_stat_activity
                         where datname = current_database() and backend_type = 'client backend'
                           and application_name <> $1 and pid <> pg_backend_pid()
                           and state is not null",
                    )
                    .bind(BENCH_APP)
                    .fetch_all(&mut conn)
                    .await;
                    let Ok(rows) = rows else { break };
                    a.samples += 1;
                    for (s,) in rows {
                        *a.counts.entry(s).or_default() += 1;
                    }
                }
                let _ = conn.close().await;
                a
            }
        });
        Ok(Self { stop, task })
    }

    async fn stop(self) -> Activity {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

/// A server process by its titles: the auxiliary ones by name, client backends together.
fn process_label(titles: &[String]) -> String {
    titles.iter().find_map(|t| auxiliary(t)).unwrap_or_else(|| "backends".into())
}

/// CPU time per event: the server's backends and this process.
fn per_event(cpu: &CpuReport, events: i64) -> String {
    let us = |s: f64| s * 1e6 / events.max(1) as f64;
    if cpu.local {
        format!(
            "cpu/event: server {:.0} µs, this process {:.0} µs",
            us(cpu.server_total()),
            us(cpu.this_process)
        )
    } else {
        format!("cpu/event: this process {:.0} µs", us(cpu.this_process))
    }
}

/// Where the CPU went during a drain of `wall` seconds, in % of one core.
fn describe(cpu: &CpuReport, wall: f64) -> String {
    let pct = |s: f64| 100.0 * s / wall;
    if !cpu.local {
        return format!(
            "this process {:.0}% of one core (server not local)",
            pct(cpu.this_process)
        );
    }
    let mut parts: Vec<String> = cpu
        .server
        .iter()
        .filter(|(_, s)| pct(*s) >= 2.0)
        .map(|(l, s)| format!("{l} {:.0}%", pct(*s)))
        .collect();
    parts.push(format!("weir+bench process {:.0}%", pct(cpu.this_process)));
    let total = cpu.server_total() + cpu.this_process;
    format!("{} (total {:.0}% of one core)", parts.join(", "), pct(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_config_parses() {
        let args = <crate::Cli as clap::Parser>::try_parse_from(["weir-bench", "operators"]);
        assert!(args.is_ok());
        let a = Args {
            server: ServerArgs { url: None },
            events: 10,
            only: None,
            lanes: 8,
            keys: 10,
            pool_size: 16,
            max_drain_seconds: 1,
            floor_events: 0,
            floor_batch: 50,
            rate: 1,
            latency_seconds: 1,
            writers: 1,
            slow_events: 10,
            slow_every: 20,
            slow_seconds: 1,
            unix_socket: false,
        };
        for sql in [LATENCY_SQL, SLOW_KEY_SQL] {
            let op = OperatorSpec { name: "c", ordering: "per_key", lanes: 8, sql };
            let c = weir_config("postgres://localhost/x", &a, Some(&op)).unwrap();
            assert!(c.operators[0].sql.contains("$1"));
        }
        let op = OperatorSpec { name: "c", ordering: "per_key", lanes: 8, sql: LATENCY_SQL };
        let c = weir_config("postgres://localhost/x", &a, Some(&op)).unwrap();
        assert_eq!(c.operators[0].lanes, Some(8));
        assert_eq!(c.source.tables, vec!["items".to_string()]);
    }
}
