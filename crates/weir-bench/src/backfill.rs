//! `weir-bench backfill`: how fast weir loads a table's existing rows into the log as `read`
//! events (`weir::backfill`, DBLog watermarks) while live changes keep arriving, measured
//! against `copy (select * from t) to stdout` of the same table in the same run.
//!
//! One fresh database on a private cluster (`fsync=on`) unless `--url` names a server:
//!
//! 1. **Setup**: `t(id int8 primary key, name text ~50 bytes, qty int4, created_at timestamptz,
//!    price numeric(12,2), attrs jsonb ~40 bytes)` filled with `--rows` rows, vacuumed and
//!    checkpointed (an old table, before capture); then `weir::setup::init` and
//!    `weir::ingest::run` **in this process** (so this process's RSS is the ingesting
//!    process's, plus the benchmark's small share: the live writers and the samplers).
//! 2. **Live changes** at `--live-rate` (1,000) rows/s on `--writers` connections of a thread
//!    of their own, from before the first reference until after the last: single-row
//!    transactions, 90 % updates of a random row, 5 % inserts of new rows, 5 % deletes of a
//!    random row. Ingestion turns them into live events throughout.
//! 3. For each `--chunk-size` (a comma-separated list sweeps, e.g. `1000,5000,20000`):
//!    - **the ceiling**: `copy (select * from t) to stdout` (text format) read through sqlx's
//!      `copy_out_raw`, counting bytes and rows (newlines): rows/s of reading the whole table
//!      through one client;
//!    - **the chunk select alone**: the select the engine issues per chunk
//!      (`select array[col::text, …] … where id > $1 order by id limit <chunk>`, as in
//!      `weir::backfill`), looped over the table by key, rows fetched and dropped: the read
//!      part of a backfill without the watermarks, the casting and the append;
//!    - **the backfill**: `weir::backfill::request` of `t`, then `weir.backfills` polled every
//!      100 ms until `done`. Rows/s = rows_done / (finished_at − started_at) (the engine's own
//!      clock), and the wall clock from the request (which includes up to 1 s until the
//!      driver's next look for work). Rows dropped by windows = rows_done − rows_written (rows
//!      a live change touched while their chunk was read: the live event wins). This
//!      process's RSS is sampled every 100 ms (`VmRSS`; also `VmHWM` after resetting it), and
//!      where the CPU went (server processes by their titles, this process, the rest of the
//!      machine) over the backfill's window. The `read` events in the log are counted and
//!      checked against rows_written.
//! 4. The ceiling once more after the last backfill (the table has grown dead tuples since).
//!
//! Run: `cargo run --release -p weir-bench -- backfill` (`--rows 100000` for a quick run,
//! `--chunk-size 1000,5000,20000` to sweep). Targets (printed beside the figures; a miss does
//! not fail the command): backfill ≥ 0.5× the copy ceiling, peak RSS ≤ 256 MB.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::TryStreamExt;
use sqlx::postgres::{PgPoolCopyExt, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use weir::Config;
use weir_core::Secret;
use weir_log::backfill::BackfillState;

use crate::cpu::{CpuReport, CpuSampler, auxiliary};
use crate::procfs::status_kib;
use crate::report::{self, Row, human_bytes, ratio, thousands, verdict};
use crate::server::{PgServer, ServerArgs};
use crate::thread::on_own_thread;

const TARGET_RATIO: f64 = 0.5;
const TARGET_RSS_MB: f64 = 256.0;
/// A backfill whose rows_done does not move for this long is reported as stuck.
const STALL: Duration = Duration::from_secs(120);

/// Arguments of `weir-bench backfill`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Rows in the table before capture starts.
    #[arg(long, default_value_t = 1_000_000)]
    rows: i64,
    /// Rows per chunk; a comma-separated list runs one backfill per size, in that order, on
    /// the same table (e.g. `1000,5000,20000`).
    #[arg(long = "chunk-size", value_delimiter = ',', default_values_t = [weir::backfill::DEFAULT_CHUNK_SIZE])]
    chunk_sizes: Vec<i32>,
    /// Live changes per second to the same table throughout (single-row transactions).
    #[arg(long, default_value_t = 1_000)]
    live_rate: u64,
    /// Connections the live changes are spread over.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    #[command(flatten)]
    server: ServerArgs,
}

/// `weir-bench backfill`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.rows < 1 {
        bail!("--rows must be at least 1");
    }
    if let Some(bad) = args.chunk_sizes.iter().find(|c| **c < 1) {
        bail!("--chunk-size must be at least 1 row (it is {bad})");
    }
    if args.writers == 0 {
        bail!("--writers must be at least 1 (use --live-rate 0 for no live changes)");
    }
    let server = PgServer::start(args.server.url.clone(), false, Vec::new(), None).await?;
    server
        .print_header(
            "backfill",
            if server.postmaster.is_some() { "" } else { "; server not local: no CPU breakdown" },
        )
        .await?;
    println!(
        "  table    {} rows of (int8 key, text ~50 B, int4, timestamptz, numeric, jsonb ~40 B)",
        thousands(args.rows as f64)
    );
    println!(
        "  live     {} changes/s on {} connections (90% update, 5% insert, 5% delete, 1 row each)",
        thousands(args.live_rate as f64),
        args.writers
    );
    println!(
        "  ingest   weir::ingest::run in this process (its RSS is this process's); chunk sizes {}",
        args.chunk_sizes.iter().map(|c| thousands(*c as f64)).collect::<Vec<_>>().join(", ")
    );
    println!();

    let name = format!("weir_bench_backfill_{}", std::process::id());
    let url = server.create_db(&name).await?;
    let result = measure(&server, &args, &url).await;
    server.drop_db(&name).await?;
    let summary = result?;
    summary.print();
    summary.record();
    server.admin.close().await;
    Ok(())
}

async fn measure(server: &PgServer, args: &Args, url: &str) -> anyhow::Result<Summary> {
    let pool = PgPoolOptions::new().max_connections(4).connect(url).await?;
    println!("== setup ==");
    let t = Instant::now();
    fill(&pool, args.rows).await?;
    let size: i64 = sqlx::query_scalar("select pg_table_size('t')").fetch_one(&pool).await?;
    println!(
        "  {} rows written, vacuumed and checkpointed in {:.1} s ({} on disk)",
        thousands(args.rows as f64),
        t.elapsed().as_secs_f64(),
        human_bytes(size)
    );
    let mut config = Config::default();
    config.database.url = Some(Secret::new(url.to_string()));
    config.source.slot = "weir".into();
    config.validate()?;
    weir::setup::init(&pool, &config).await?;
    let weir_pool = weir::db::connect(&config).await?;
    let cancel = CancellationToken::new();
    let ingest = tokio::spawn({
        let (config, pool, cancel) = (config.clone(), weir_pool.clone(), cancel.clone());
        async move { weir::ingest::run(&config, &pool, &weir::ProcessId::generate(), cancel).await }
    });
    let stop_live = CancellationToken::new();
    let live = spawn_live(url, args, stop_live.clone());
    // Let ingestion start and the live changes settle into their pace.
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!();

    let mut summary = Summary::default();
    let outcome = async {
        for &chunk_size in &args.chunk_sizes {
            println!("== chunk size {} ==", thousands(chunk_size as f64));
            let copy = copy_ceiling(&pool).await.context("the copy ceiling")?;
            copy.print("copy (select * from t) to stdout");
            let select = select_alone(&pool, chunk_size).await.context("the chunk select alone")?;
            select.print(&format!("chunk select alone ({chunk_size} rows)"));
            let b = backfill(server, &pool, &config, chunk_size, &ingest)
                .await
                .with_context(|| format!("the backfill with chunks of {chunk_size} rows"))?;
            b.print(&copy);
            println!();
            summary.rounds.push(Round { chunk_size, copy, select, backfill: b });
        }
        println!("== after the last backfill ==");
        let after = copy_ceiling(&pool).await.context("the copy ceiling after")?;
        after.print("copy (select * from t) to stdout");
        println!();
        summary.copy_after = Some(after);
        anyhow::Ok(())
    }
    .await;
    stop_live.cancel();
    let live = live.await.context("the live writers stopped")?;
    cancel.cancel();
    let ingested = ingest.await.context("ingestion panicked")?;
    outcome?;
    ingested.context("ingestion failed")?;
    summary.live = Some(live?);
    weir_pool.close().await;
    pool.close().await;
    Ok(summary)
}

/// Creates and fills `t` before capture starts, then vacuums (visibility map, hint bits: an
/// old table) and checkpoints.
async fn fill(pool: &PgPool, rows: i64) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "create table t (
           id         int8 primary key,
           name       text not null,
           qty        int4 not null,
           created_at timestamptz not null,
           price      numeric(12, 2) not null,
           attrs      jsonb not null
         )",
    )
    .execute(pool)
    .await?;
    // int8 arithmetic: the spreads below overflow int4 from a few thousand rows on.
    sqlx::query(AssertSqlSafe(format!(
        "insert into t
         select g,
                rpad('customer ' || g || ' ', 50, 'abcdefghijklmnopqrstuvwxyz'),
                (g * 7919) % 1000,
                timestamptz '2024-01-01' + g * interval '1 second',
                ((g * 104729) % 100000) / 100.0,
                jsonb_build_object('tier', g % 4, 'flags', jsonb_build_array(g % 2 = 0, g % 3 = 0))
         from generate_series(1::int8, {rows}) g"
    )))
    .execute(pool)
    .await?;
    // One statement each: vacuum refuses to run in the implicit transaction of a multi-statement
    // query.
    sqlx::raw_sql("vacuum (analyze) t").execute(pool).await?;
    sqlx::query("checkpoint").execute(pool).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Live changes

#[derive(Debug)]
struct Live {
    changes: u64,
    seconds: f64,
    late: u64,
}

/// Client ports of the live writers' connections, so the CPU breakdown can tell their
/// backends (`… 127.0.0.1(port) UPDATE`) from weir's own.
static WRITER_PORTS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();

fn writer_ports() -> &'static Mutex<Vec<String>> {
    WRITER_PORTS.get_or_init(Mutex::default)
}

/// Starts the live writers on a thread of their own until `stop`: change i is due at
/// start + i / rate, the `writers` connections taking the changes in turn.
fn spawn_live(
    url: &str,
    args: &Args,
    stop: CancellationToken,
) -> tokio::sync::oneshot::Receiver<anyhow::Result<Live>> {
    let (url, rate, writers, rows) = (url.to_string(), args.live_rate, args.writers, args.rows);
    on_own_thread("bench-live-writers", move || async move {
        let mut conns = Vec::new();
        for _ in 0..writers {
            let mut conn = PgConnection::connect(&url).await?;
            let port: Option<i32> =
                sqlx::query_scalar("select inet_client_port()").fetch_one(&mut conn).await?;
            if let Some(p) = port {
                writer_ports().lock().unwrap_or_else(|e| e.into_inner()).push(format!("({p})"));
            }
            conns.push(conn);
        }
        if rate == 0 {
            stop.cancelled().await;
            return Ok(Live { changes: 0, seconds: 0.0, late: 0 });
        }
        let start = tokio::time::Instant::now();
        let done = Arc::new(AtomicU64::new(0));
        let late = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for (w, mut conn) in conns.into_iter().enumerate() {
            let (stop, done, late) = (stop.clone(), done.clone(), late.clone());
            tasks.push(tokio::spawn(async move {
                let mut random = SplitMix(w as u64 + 1);
                let mut i = w as u64;
                let mut next_new = rows + 1 + w as i64;
                while !stop.is_cancelled() {
                    let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    let now = tokio::time::Instant::now();
                    if now < due {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep_until(due) => {}
                        }
                    } else if now - due > Duration::from_millis(10) {
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                    let row = 1 + (random.next() % rows as u64) as i64;
                    let q = match random.next() % 20 {
                        0 => {
                            next_new += writers as i64;
                            sqlx::query(
                                "insert into t values ($1, 'live ' || $1, 1, now(), 1.00,
                                                       '{\"tier\": 0, \"flags\": []}')",
                            )
                            .bind(next_new)
                        }
                        1 => sqlx::query("delete from t where id = $1").bind(row),
                        _ => sqlx::query(
                            "update t set qty = qty + 1, price = price + 0.01 where id = $1",
                        )
                        .bind(row),
                    };
                    q.execute(&mut conn).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += writers as u64;
                }
                conn.close().await?;
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(Live {
            changes: done.load(Ordering::Relaxed),
            seconds: start.elapsed().as_secs_f64(),
            late: late.load(Ordering::Relaxed),
        })
    })
}

/// SplitMix64: the live writers' random rows (no need for a crate).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

// ---------------------------------------------------------------------------------------------
// References

/// A read of the whole table through one client.
#[derive(Debug)]
struct Scan {
    rows: u64,
    bytes: u64,
    seconds: f64,
}

impl Scan {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.seconds
    }

    fn print(&self, what: &str) {
        println!(
            "  {what:<44} {:>10} rows/s  ({} rows, {} in {:.2} s, {:.0} MB/s)",
            thousands(self.rate()),
            thousands(self.rows as f64),
            human_bytes(self.bytes as i64),
            self.seconds,
            self.bytes as f64 / self.seconds / (1024.0 * 1024.0)
        );
    }
}

/// `copy (select * from t) to stdout`, every byte read by this process; rows are newlines
/// (the text format escapes those inside values).
async fn copy_ceiling(pool: &PgPool) -> anyhow::Result<Scan> {
    let started = Instant::now();
    let mut stream = pool.copy_out_raw("copy (select * from t) to stdout").await?;
    let (mut rows, mut bytes) = (0u64, 0u64);
    while let Some(chunk) = stream.try_next().await? {
        bytes += chunk.len() as u64;
        rows += memchr::memchr_iter(b'\n', &chunk).count() as u64;
    }
    Ok(Scan { rows, bytes, seconds: started.elapsed().as_secs_f64() })
}

/// The engine's chunk select (`weir::backfill`'s `Shape::select` for this table), looped over
/// the table in key order with nothing else: no watermarks, no casting, no append.
async fn select_alone(pool: &PgPool, chunk_size: i32) -> anyhow::Result<Scan> {
    const COLUMNS: &str = "array[\"id\"::text, \"name\"::text, \"qty\"::text, \
                           \"created_at\"::text, \"price\"::text, \"attrs\"::text]";
    let first = format!("select {COLUMNS} from \"public\".\"t\" order by \"id\" limit $1");
    let next = format!(
        "select {COLUMNS} from \"public\".\"t\" where (\"id\") > ($1::text::bigint) \
         order by \"id\" limit $2"
    );
    let started = Instant::now();
    let (mut rows, mut bytes) = (0u64, 0u64);
    let mut last: Option<String> = None;
    loop {
        let chunk: Vec<Vec<Option<String>>> = match &last {
            None => {
                sqlx::query_scalar(AssertSqlSafe(first.clone()))
                    .bind(i64::from(chunk_size))
                    .fetch_all(pool)
                    .await?
            }
            Some(key) => {
                sqlx::query_scalar(AssertSqlSafe(next.clone()))
                    .bind(key)
                    .bind(i64::from(chunk_size))
                    .fetch_all(pool)
                    .await?
            }
        };
        rows += chunk.len() as u64;
        bytes += chunk.iter().flatten().flatten().map(|v| v.len() as u64).sum::<u64>();
        let Some(row) = chunk.last() else { break };
        last = row[0].clone();
        if chunk.len() < chunk_size as usize {
            break;
        }
    }
    Ok(Scan { rows, bytes, seconds: started.elapsed().as_secs_f64() })
}

// ---------------------------------------------------------------------------------------------
// The backfill

#[derive(Debug)]
struct Backfilled {
    rows_done: i64,
    rows_written: i64,
    rows_total: i64,
    /// finished_at − started_at, as stored.
    engine_seconds: f64,
    /// From the request until it was seen done.
    wall_seconds: f64,
    chunks: i64,
    baseline_mb: f64,
    peak_mb: f64,
    peak_source: &'static str,
    /// `read` events of this backfill in the log.
    read_events: i64,
    cpu: CpuReport,
}

impl Backfilled {
    fn rate(&self) -> f64 {
        self.rows_done as f64 / self.engine_seconds
    }

    fn print(&self, copy: &Scan) {
        println!(
            "  {:<44} {:>10} rows/s  ({} rows in {:.2} s by finished_at − started_at; {:.2} s from the request)",
            "backfill",
            thousands(self.rate()),
            thousands(self.rows_done as f64),
            self.engine_seconds,
            self.wall_seconds
        );
        println!(
            "  ratio backfill / copy ceiling {}   (target ≥ {TARGET_RATIO:.2}x: {})",
            ratio(self.rate() / copy.rate()),
            verdict(self.rate() / copy.rate() >= TARGET_RATIO)
        );
        println!(
            "  {} chunks, {:.1} ms each; rows read {}, written {}, dropped by windows {} (table had {} at the start)",
            thousands(self.chunks as f64),
            1e3 * self.engine_seconds / self.chunks.max(1) as f64,
            thousands(self.rows_done as f64),
            thousands(self.rows_written as f64),
            thousands((self.rows_done - self.rows_written) as f64),
            thousands(self.rows_total as f64)
        );
        println!(
            "  read events in the log {} {}",
            thousands(self.read_events as f64),
            if self.read_events == self.rows_written {
                "(= rows written)"
            } else {
                "WRONG (≠ rows written)"
            }
        );
        println!(
            "  RSS of this process: {:.0} MB before, peak {:.0} MB during ({})",
            self.baseline_mb, self.peak_mb, self.peak_source
        );
        println!("  cpu during the backfill: {}", describe(&self.cpu));
    }
}

async fn backfill(
    server: &PgServer,
    pool: &PgPool,
    config: &Config,
    chunk_size: i32,
    ingest: &tokio::task::JoinHandle<weir::Result<()>>,
) -> anyhow::Result<Backfilled> {
    let me = std::process::id();
    let read_before = read_events(pool).await?;
    let baseline_kb = status_kib(me, "VmRSS").unwrap_or(0);
    // Writing 5 resets VmHWM (the peak) to the current RSS.
    let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let stop = Arc::new(AtomicBool::new(false));
    let rss = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut peak = 0u64;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(status_kib(me, "VmRSS").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        }
    });
    let cpu = CpuSampler::start(server.postmaster, process_label);
    let requested = Instant::now();
    let waited = async {
        let created =
            weir::backfill::request(pool, config, &["t".into()], "weir-bench", Some(chunk_size))
                .await?;
        let id = created.first().context("the request created no backfill")?.id;
        let mut last = (-1i64, Instant::now());
        loop {
            let b = weir_log::backfill::get(pool, id).await?.context("the backfill vanished")?;
            match b.state {
                BackfillState::Done => return anyhow::Ok((b, Instant::now())),
                BackfillState::Failed | BackfillState::Cancelled => {
                    bail!(
                        "the backfill ended {}: {}",
                        b.state.as_str(),
                        b.error.unwrap_or_default()
                    )
                }
                _ => {}
            }
            if ingest.is_finished() {
                bail!("ingestion stopped at {} rows of the backfill", b.rows_done);
            }
            if b.rows_done != last.0 {
                last = (b.rows_done, Instant::now());
            } else if last.1.elapsed() > STALL {
                bail!("the backfill stopped at {} rows for {} s", b.rows_done, STALL.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    .await;
    let cpu = cpu.stop();
    stop.store(true, Ordering::Relaxed);
    let sampled_kb = rss.join().unwrap_or(0);
    let hwm_kb = if hwm_reset { status_kib(me, "VmHWM") } else { None };
    let (b, seen_done) = waited?;
    let (peak_kb, peak_source) = match hwm_kb {
        Some(h) if h >= sampled_kb => (h, "VmHWM"),
        _ => (sampled_kb, "VmRSS sampled every 100 ms"),
    };
    let (Some(started), Some(finished)) = (b.started_at, b.finished_at) else {
        bail!("the backfill is done but has no started_at/finished_at");
    };
    // The last chunk's events are stored with its progress, so they are in the log now.
    let read_events = read_events(pool).await? - read_before;
    Ok(Backfilled {
        rows_done: b.rows_done,
        rows_written: b.rows_written,
        rows_total: b.rows_total.unwrap_or(0),
        engine_seconds: (finished - started).as_seconds_f64(),
        wall_seconds: (seen_done - requested).as_secs_f64(),
        chunks: (b.rows_done + i64::from(chunk_size) - 1) / i64::from(chunk_size),
        baseline_mb: baseline_kb as f64 / 1024.0,
        peak_mb: peak_kb as f64 / 1024.0,
        peak_source,
        read_events,
        cpu,
    })
}

async fn read_events(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("select count(*) from weir.events where kind = 'read'")
        .fetch_one(pool)
        .await?)
}

// ---------------------------------------------------------------------------------------------
// CPU accounting

/// A server process by its titles: the auxiliary ones by name, the live writers' backends by
/// their client port, a backend seen inserting as the log appender's, one seen selecting as
/// weir's pool (the chunk selects, the watermarks, the progress polls).
fn process_label(titles: &[String]) -> String {
    if let Some(aux) = titles.iter().find_map(|t| auxiliary(t)) {
        return aux;
    }
    let ports = writer_ports().lock().unwrap_or_else(|e| e.into_inner()).clone();
    if titles.iter().any(|t| ports.iter().any(|p| t.contains(p.as_str()))) {
        return "live writers' backends".into();
    }
    let rest = |t: &String| t.strip_prefix("postgres: ").unwrap_or(t).to_string();
    if titles.iter().map(rest).any(|r| r.contains("INSERT")) {
        "appender backend".into()
    } else if titles.iter().map(rest).any(|r| r.contains("SELECT")) {
        "weir pool backends (chunk selects, watermarks)".into()
    } else {
        "other backends".into()
    }
}

/// Where the CPU went, in % of one core over the backfill's window.
fn describe(cpu: &CpuReport) -> String {
    let wall = cpu.wall.max(1e-9);
    let mut parts: Vec<String> = cpu
        .server
        .iter()
        .filter(|(_, s)| *s / wall >= 0.02)
        .map(|(l, s)| format!("{l} {:.0}%", 100.0 * s / wall))
        .collect();
    parts.push(format!(
        "this process (ingestion, backfill driver) {:.0}%",
        100.0 * cpu.this_process / wall
    ));
    let ours = cpu.server_total() + cpu.this_process;
    let rest = (cpu.machine - ours).max(0.0);
    format!(
        "{}; total {:.0}% of one core; the rest of the machine (other work) {:.0}%",
        parts.join(", "),
        100.0 * ours / wall,
        100.0 * rest / wall
    )
}

// ---------------------------------------------------------------------------------------------
// Summary

#[derive(Debug)]
struct Round {
    chunk_size: i32,
    copy: Scan,
    select: Scan,
    backfill: Backfilled,
}

#[derive(Debug, Default)]
struct Summary {
    rounds: Vec<Round>,
    copy_after: Option<Scan>,
    live: Option<Live>,
}

impl Summary {
    /// The summary's ratios and targets, for `weir-bench all`'s table: per chunk size, rows/s
    /// against the copy ceiling and the peak RSS.
    fn record(&self) {
        for r in &self.rounds {
            let b = &r.backfill;
            let c = thousands(r.chunk_size as f64);
            let x = b.rate() / r.copy.rate();
            report::record(Row {
                benchmark: "backfill",
                figure: format!("chunks of {c}, rows/s"),
                measured: format!("{}/s", thousands(b.rate())),
                reference: format!("{}/s (copy to stdout)", thousands(r.copy.rate())),
                ratio: Some(x),
                target: Some(format!("≥ {TARGET_RATIO:.2}x")),
                met: Some(x >= TARGET_RATIO),
            });
            report::record(Row {
                benchmark: "backfill",
                figure: format!("chunks of {c}, peak RSS ({:.0} MB before)", b.baseline_mb),
                measured: format!("{:.0} MB", b.peak_mb),
                reference: String::new(),
                ratio: None,
                target: Some(format!("≤ {TARGET_RSS_MB:.0} MB")),
                met: Some(b.peak_mb <= TARGET_RSS_MB),
            });
        }
    }

    fn print(&self) {
        println!("== summary (one run; the machine is shared: compare ratios within it) ==");
        println!("{:<48} {:>14} {:>16} {:>8}", "figure", "value", "target", "");
        for r in &self.rounds {
            let b = &r.backfill;
            let c = thousands(r.chunk_size as f64);
            let row = |figure: String, value: String, target: String, v: &str| {
                println!("{figure:<48} {value:>14} {target:>16} {v:>8}");
            };
            row(
                format!("copy ceiling before, chunk {c} round (rows/s)"),
                thousands(r.copy.rate()),
                "reference".into(),
                "",
            );
            row(
                format!("chunk select alone, chunks of {c} (rows/s)"),
                thousands(r.select.rate()),
                "".into(),
                "",
            );
            row(
                format!("backfill, chunks of {c} (rows/s)"),
                thousands(b.rate()),
                format!("≥ {}", thousands(r.copy.rate() * TARGET_RATIO)),
                "",
            );
            let x = b.rate() / r.copy.rate();
            row(
                "  ratio to the copy ceiling".into(),
                ratio(x),
                format!("≥ {TARGET_RATIO:.2}x"),
                verdict(x >= TARGET_RATIO),
            );
            row(
                "  wall clock request → done (s)".into(),
                format!("{:.1}", b.wall_seconds),
                "".into(),
                "",
            );
            row(
                format!("  peak RSS (MB; {:.0} before)", b.baseline_mb),
                format!("{:.0}", b.peak_mb),
                format!("≤ {TARGET_RSS_MB:.0}"),
                verdict(b.peak_mb <= TARGET_RSS_MB),
            );
            row(
                "  rows dropped by windows".into(),
                thousands((b.rows_done - b.rows_written) as f64),
                "".into(),
                "",
            );
        }
        if let Some(a) = &self.copy_after {
            println!(
                "{:<48} {:>14} {:>16} {:>8}",
                "copy ceiling after the last backfill (rows/s)",
                thousands(a.rate()),
                "",
                ""
            );
        }
        if let Some(l) = &self.live {
            println!(
                "{:<48} {:>14} {:>16} {:>8}",
                "live changes achieved (changes/s)",
                thousands(l.changes as f64 / l.seconds.max(1e-9)),
                "",
                ""
            );
            if l.late > 0 {
                println!(
                    "  ({} live changes started more than 10 ms late)",
                    thousands(l.late as f64)
                );
            }
        }
    }
}
