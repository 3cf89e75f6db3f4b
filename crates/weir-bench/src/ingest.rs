//! `weir-bench ingest`: how fast weir turns a replication slot into the durable log, measured
//! against `pg_recvlogical` draining the same WAL in the same run.
//!
//! Each phase uses a fresh database, on a private cluster (`fsync=on`, reached over TCP on
//! 127.0.0.1 as weir usually is; `--unix-socket` uses its Unix socket instead) unless `--url`
//! names a server (superuser, `wal_level=logical`) where the benchmark creates its databases.
//!
//! 1. **Huge transaction** (runs first, so the allocator holds nothing from other phases):
//!    while ingestion runs in this process, one `insert … select … from generate_series(1, N)`
//!    (N = `--changes`). This process's RSS is sampled every 50 ms (`VmRSS`; also `VmHWM`
//!    after resetting it through `/proc/self/clear_refs`, which misses memory returned with
//!    `madvise`). Prints the peak and its delta over the baseline, the time from the commit
//!    until every row is in the log, and checks positions 1..N are there without a gap.
//!    PostgreSQL streams a transaction only once it outgrows `logical_decoding_work_mem`
//!    (64 MB, ~250k rows of this shape); a smaller one arrives whole at its commit, so also try
//!    `--only huge --changes 250000` (and `--pg-setting logical_decoding_work_mem=16MB`).
//! 2. **Throughput**, for 1-row and 100-row transactions: a table `bench(id bigint primary key,
//!    payload text)` (~100-byte rows) is published, the slot `weir` is created by
//!    `weir::setup::init` and `recv_0` right after it (one more pair per `--repeat`, all before
//!    any data). `--changes` changes (60 % insert, 30 % update, 10 % delete; every update and
//!    delete hits exactly one row) are generated server-side (PL/pgSQL with `commit`,
//!    `synchronous_commit=off`, two connections; generation is not what is measured). Then,
//!    one after the other, never concurrently, each after a `checkpoint`:
//!    - the reference: `pg_recvlogical --start --no-loop -o proto_version=2
//!      -o publication_names=weir -f /dev/null --endpos <pg_current_wal_insert_lsn() after
//!      generation>`: a client that receives pgoutput and throws it away;
//!    - weir: `weir::ingest::run` in this process, timed from its start until
//!      `weir.source_state.position` reaches the number of changes (polled every 5 ms), i.e.
//!      until every change is decoded, turned into an event and committed durably to
//!      `weir.events`. A drain still running after `--max-drain-seconds` is stopped and its
//!      rate taken from what it drained (marked `*`). The log is then truncated for the next
//!      pair.
//!
//!    Prints changes/s for both, the ratio weir / pg_recvlogical (median of the per-pair
//!    ratios), where the CPU went during each drain (walsender, the appender's backend, this
//!    process, pg_recvlogical; from `/proc`, every 100 ms, when the server is local) and how far
//!    the slot's acknowledged LSN trailed the log's stored LSN (WAL the server keeps for
//!    nothing).
//! 3. **Live latency** at `--rate` (5,000) single-row insert transactions per second for
//!    `--latency-seconds`, ingestion running: `--writers` connections record the instant each
//!    commit returns; a `LISTEN weir_events` connection records the instant each NOTIFY sent by
//!    an append arrives (the append commits its events and the NOTIFY together). Writers and
//!    listener run on threads of their own so the ingestion's tasks cannot delay their clocks.
//!    Latency of a row = arrival of the first notification covering its position − its commit
//!    returned; the first second is left out as warm-up.
//!
//! Run: `cargo run --release -p weir-bench -- ingest`
//! (`--changes 100000` for a quick run; `--only huge|throughput|latency`; `--repeat 3`;
//! `--unix-socket` to take TCP out of the picture; `--pg-setting name=value` for the cluster).
//! The machine is shared and noisy: compare the ratio, which is taken in one run, and prefer
//! medians over several runs. Targets (printed beside the figures; a miss does not fail the
//! command): weir ≥ 0.8× pg_recvlogical, latency p50 ≤ 5 ms and p99 ≤ 50 ms, peak RSS ≤ 256 MB.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use weir::Config;
use weir_core::Secret;

use crate::cpu::{CpuReport, CpuSampler, auxiliary};
use crate::percentile::{Percentiles, median};
use crate::procfs::status_kib;
use crate::report::{self, Row, human_bytes, ratio, thousands, verdict};
use crate::server::{PgServer, ServerArgs};
use crate::thread::on_own_thread;

const TARGET_RATIO: f64 = 0.8;
const TARGET_P50_MS: f64 = 5.0;
const TARGET_P99_MS: f64 = 50.0;
const TARGET_RSS_MB: f64 = 256.0;

/// Arguments of `weir-bench ingest`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Changes generated per throughput run, and rows of the huge transaction.
    #[arg(long, default_value_t = 1_000_000)]
    changes: u64,
    /// Run only this phase.
    #[arg(long, value_enum)]
    only: Option<Phase>,
    #[command(flatten)]
    server: ServerArgs,
    /// Drains per transaction size (each a pg_recvlogical drain then a weir drain of the same
    /// WAL, from their own slots); medians are reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Transaction sizes of the throughput phase.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 100])]
    txn_sizes: Vec<u64>,
    /// Single-row transactions per second in the latency phase.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Length of the latency phase, in seconds.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Stop a weir drain after this many seconds and report the rate of what it drained so
    /// far (marked as partial): keeps a very slow configuration from running for hours.
    #[arg(long, default_value_t = 120)]
    max_drain_seconds: u64,
    /// Connect to the private cluster through its Unix socket instead of TCP on 127.0.0.1
    /// (shows what TCP costs, e.g. Nagle/delayed-ACK stalls of clients without TCP_NODELAY).
    #[arg(long)]
    unix_socket: bool,
    /// A server setting for the private cluster, `name=value` (repeatable), e.g.
    /// `logical_decoding_work_mem=16MB`.
    #[arg(long = "pg-setting", value_name = "NAME=VALUE")]
    pg_settings: Vec<String>,
    /// Writer connections in the latency phase.
    #[arg(long, default_value_t = 16)]
    writers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    Throughput,
    Latency,
    Huge,
}

/// `weir-bench ingest`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.changes < 10 || args.repeat == 0 {
        bail!("--changes must be at least 10 and --repeat at least 1");
    }
    if args.unix_socket && args.server.url.is_some() {
        bail!(
            "--unix-socket applies to the private cluster; put the socket directory in --url instead"
        );
    }
    let mut settings = Vec::new();
    for s in &args.pg_settings {
        let Some((name, value)) = s.split_once('=') else {
            bail!("--pg-setting takes name=value, not `{s}`");
        };
        settings.push((name.trim().to_string(), value.trim().to_string()));
    }
    if !settings.is_empty() && args.server.url.is_some() {
        bail!("--pg-setting applies to the private cluster; configure the --url server yourself");
    }
    let server = PgServer::start(args.server.url.clone(), args.unix_socket, settings, None).await?;
    server
        .print_header(
            "ingest",
            if server.postmaster.is_some() { "" } else { "; server not local: no CPU breakdown" },
        )
        .await?;
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
    if !args.pg_settings.is_empty() {
        println!("  settings {}", args.pg_settings.join(", "));
    }
    println!(
        "  changes  {} per run (60% insert, 30% update, 10% delete, ~100-byte rows)",
        thousands(args.changes as f64)
    );
    println!();

    let wants = |p: Phase| args.only.is_none_or(|o| o == p);
    let mut summary = Summary::default();
    // The huge transaction runs first: its peak RSS is this process's, and memory the
    // allocator kept from earlier phases would inflate it.
    if wants(Phase::Huge) {
        summary.huge = Some(huge(&server, &args).await.context("huge-transaction phase")?);
    }
    if wants(Phase::Throughput) {
        for &size in &args.txn_sizes {
            let r = throughput(&server, &args, size)
                .await
                .with_context(|| format!("throughput with {size}-row transactions"))?;
            summary.throughput.push(r);
        }
    }
    if wants(Phase::Latency) {
        summary.latency = Some(latency(&server, &args).await.context("latency phase")?);
    }
    summary.print(&args);
    summary.record(&args);
    server.admin.close().await;
    drop(server);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The server and its databases

/// `pg_recvlogical` of the private cluster's binaries, else the one on the PATH.
fn pg_recvlogical(server: &PgServer) -> PathBuf {
    server
        .cluster
        .as_ref()
        .map(|c| c.bin_dir().join("pg_recvlogical"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("pg_recvlogical"))
}

fn weir_config(url: &str, slot: &str) -> anyhow::Result<Config> {
    let mut config = Config::default();
    config.database.url = Some(Secret::new(url.to_string()));
    config.source.slot = slot.to_string();
    config.validate()?;
    Ok(config)
}

const TABLE: &str = "create table bench (id bigint primary key, payload text not null);
     -- Generated churn must not start autovacuum in the middle of a measured drain.
     alter table bench set (autovacuum_enabled = false);";

/// A database with the bench table, the weir schema, publication and slot `weir`.
async fn prepare(server: &PgServer, name: &str) -> anyhow::Result<(String, PgPool, Config)> {
    let url = server.create_db(name).await?;
    let pool = PgPoolOptions::new().max_connections(4).connect(&url).await?;
    sqlx::raw_sql(TABLE).execute(&pool).await?;
    let config = weir_config(&url, "weir")?;
    weir::setup::init(&pool, &config).await?;
    Ok((url, pool, config))
}

/// Runs `weir::ingest::run` in this process until the returned token is cancelled.
fn spawn_ingest(
    config: Config,
    pool: PgPool,
) -> (CancellationToken, tokio::task::JoinHandle<weir::Result<()>>) {
    let cancel = CancellationToken::new();
    let handle = tokio::spawn({
        let cancel = cancel.clone();
        async move { weir::ingest::run(&config, &pool, &weir::ProcessId::generate(), cancel).await }
    });
    (cancel, handle)
}

async fn stop_ingest(
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<weir::Result<()>>,
) -> anyhow::Result<()> {
    cancel.cancel();
    handle.await?.context("ingestion failed")?;
    Ok(())
}

async fn log_position(pool: &PgPool, slot: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "select coalesce(max(position), 0) from weir.source_state where slot = $1",
    )
    .bind(slot)
    .fetch_one(pool)
    .await?)
}

/// Waits until the log holds `n` events from `slot`, polling every `every`. Fails when the
/// ingestion stops or the position does not move for 20 s.
async fn wait_for_position(
    pool: &PgPool,
    slot: &str,
    n: i64,
    every: Duration,
    ingest: &tokio::task::JoinHandle<weir::Result<()>>,
) -> anyhow::Result<Instant> {
    wait_for_position_until(pool, slot, n, every, ingest, None).await.map(|(at, _)| at)
}

/// [`wait_for_position`], but returns early with the position reached when `limit` passes.
async fn wait_for_position_until(
    pool: &PgPool,
    slot: &str,
    n: i64,
    every: Duration,
    ingest: &tokio::task::JoinHandle<weir::Result<()>>,
    limit: Option<Duration>,
) -> anyhow::Result<(Instant, i64)> {
    let started = Instant::now();
    let mut last = (-1i64, Instant::now());
    loop {
        let p = log_position(pool, slot).await?;
        if p >= n || limit.is_some_and(|l| started.elapsed() >= l) {
            return Ok((Instant::now(), p));
        }
        if p != last.0 {
            last = (p, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(20) {
            bail!("the log stopped at position {p} of {n} for 20 s");
        }
        if ingest.is_finished() {
            bail!("ingestion stopped at position {p} of {n}");
        }
        tokio::time::sleep(every).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 1: throughput against pg_recvlogical

#[derive(Debug)]
struct Drain {
    seconds: f64,
    /// Changes drained: all of them, unless the drain was stopped at `--max-drain-seconds`.
    changes: u64,
    cpu: CpuReport,
    /// weir only: the most the slot's acknowledged LSN trailed the log's stored LSN, in bytes.
    max_ack_lag: i64,
}

impl Drain {
    fn rate(&self) -> f64 {
        self.changes as f64 / self.seconds
    }
}

#[derive(Debug)]
struct ThroughputResult {
    txn_size: u64,
    changes: u64,
    generate_seconds: f64,
    wal_bytes: i64,
    recv: Vec<Drain>,
    weir: Vec<Drain>,
}

impl ThroughputResult {
    fn recv_rate(&self) -> f64 {
        median(self.recv.iter().map(Drain::rate).collect())
    }
    fn weir_rate(&self) -> f64 {
        median(self.weir.iter().map(Drain::rate).collect())
    }
    /// Median of the per-pair ratios (each pair drained the same WAL one after the other).
    fn ratio(&self) -> f64 {
        median(self.recv.iter().zip(&self.weir).map(|(r, w)| w.rate() / r.rate()).collect())
    }
    fn partial(&self) -> bool {
        self.weir.iter().any(|d| d.changes < self.changes)
    }
}

async fn throughput(
    server: &PgServer,
    args: &Args,
    txn_size: u64,
) -> anyhow::Result<ThroughputResult> {
    let n = args.changes;
    println!("== throughput, {txn_size}-row transactions ==");
    let name = format!("weir_bench_tp{txn_size}_{}", std::process::id());
    let (url, pool, config) = prepare(server, &name).await?;
    // Slot pairs at the same starting point: `weir` (made by init) + `recv_0`, then `weir_r`
    // + `recv_r` for each further repeat. Nothing is written between them and the data.
    let mut pairs = Vec::new();
    for r in 0..args.repeat {
        let weir_slot = if r == 0 { config.source.slot.clone() } else { format!("weir_{r}") };
        if r > 0 {
            sqlx::query("select pg_create_logical_replication_slot($1, 'pgoutput')")
                .bind(&weir_slot)
                .execute(&pool)
                .await?;
        }
        let recv_slot = format!("recv_{r}");
        sqlx::query("select pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(&recv_slot)
            .execute(&pool)
            .await?;
        pairs.push((recv_slot, weir_slot));
    }
    let start_lsn: String =
        sqlx::query_scalar("select pg_current_wal_lsn()::text").fetch_one(&pool).await?;

    let t = Instant::now();
    generate(&url, n, txn_size, 2).await?;
    let generate_seconds = t.elapsed().as_secs_f64();
    // The insert position: with synchronous_commit=off the write position can still be
    // behind the last commit.
    let end_lsn: String =
        sqlx::query_scalar("select pg_current_wal_insert_lsn()::text").fetch_one(&pool).await?;
    let wal_bytes: i64 =
        sqlx::query_scalar("select (pg_current_wal_insert_lsn() - $1::pg_lsn)::bigint")
            .bind(&start_lsn)
            .fetch_one(&pool)
            .await?;
    let counted: i64 = sqlx::query_scalar("select count(*) from bench").fetch_one(&pool).await?;
    println!(
        "  generated {} changes in {:.1} s ({} changes/s, {} of WAL, {} rows left in bench)",
        thousands(n as f64),
        generate_seconds,
        thousands(n as f64 / generate_seconds),
        human_bytes(wal_bytes),
        thousands(counted as f64)
    );

    let mut result = ThroughputResult {
        txn_size,
        changes: n,
        generate_seconds,
        wal_bytes,
        recv: Vec::new(),
        weir: Vec::new(),
    };
    for (r, (recv_slot, weir_slot)) in pairs.iter().enumerate() {
        // Start each drain from the same state: no checkpoint left over from the previous one.
        sqlx::query("checkpoint").execute(&pool).await?;
        let recv = drain_recvlogical(server, &url, recv_slot, &end_lsn, n).await?;
        sqlx::raw_sql(
            "truncate weir.events, weir.staged_changes; delete from weir.source_state; checkpoint",
        )
        .execute(&pool)
        .await?;
        let limit = Duration::from_secs(args.max_drain_seconds);
        let weir = drain_weir(server, &url, &pool, weir_slot, n as i64, limit).await?;
        let (count, lo, hi): (i64, Option<i64>, Option<i64>) =
            sqlx::query_as("select count(*), min(position), max(position) from weir.events")
                .fetch_one(&pool)
                .await?;
        // A stopped drain may have appended a little more while shutting down gracefully.
        let full = weir.changes >= n;
        let gap_free = count > 0 && lo == Some(1) && hi == Some(count);
        if !gap_free || (full && count != n as i64) {
            println!(
                "  warning: the log holds {count} events, positions {lo:?}..{hi:?}, expected 1..{n}"
            );
        }
        println!(
            "  run {}: pg_recvlogical {:>9} changes/s ({:.2} s)   weir {:>9} changes/s ({:.2} s{})   ratio {}",
            r + 1,
            thousands(recv.rate()),
            recv.seconds,
            thousands(weir.rate()),
            weir.seconds,
            if full {
                String::new()
            } else {
                format!(
                    ", stopped at {} of {} changes",
                    thousands(weir.changes as f64),
                    thousands(n as f64)
                )
            },
            ratio(weir.rate() / recv.rate())
        );
        println!("         cpu during pg_recvlogical: {}", describe(&recv.cpu, recv.seconds));
        println!("         cpu during weir:           {}", describe(&weir.cpu, weir.seconds));
        println!(
            "         slot acknowledgement trailed the stored log by up to {} of WAL",
            human_bytes(weir.max_ack_lag)
        );
        result.recv.push(recv);
        result.weir.push(weir);
    }
    println!(
        "  median: pg_recvlogical {} changes/s, weir {} changes/s, ratio {}",
        thousands(result.recv_rate()),
        thousands(result.weir_rate()),
        ratio(result.ratio())
    );
    println!();
    pool.close().await;
    server.drop_db(&name).await?;
    Ok(result)
}

/// Generates `n` changes (60 % insert, 30 % update, 10 % delete) in transactions of
/// `txn_size` rows, server-side, split over `workers` connections on disjoint key ranges.
/// Updates and deletes always hit exactly one live row, so the change count is exact.
async fn generate(url: &str, n: u64, txn_size: u64, workers: u64) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for w in 0..workers {
        let count = n / workers + if w < n % workers { 1 } else { 0 };
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await?;
            sqlx::raw_sql("set synchronous_commit = off").execute(&mut conn).await?;
            let base = w * 1_000_000_000_000 + 1;
            // The live rows are always ids [del_id, next_id): inserts append, deletes take the
            // oldest, updates pick one at random in between.
            let sql = format!(
                "do $$
                 declare
                   next_id bigint := {base};
                   del_id  bigint := {base};
                   i       bigint;
                   target  bigint;
                 begin
                   for i in 0..{last} loop
                     if i % 10 < 6 then
                       insert into bench values (next_id, rpad(next_id::text || ':', 90, 'abcdefghijklmnopqrstuvwxyz'));
                       next_id := next_id + 1;
                     elsif i % 10 < 9 then
                       -- In a variable: random() in the WHERE clause would be evaluated per row.
                       target := del_id + floor(random() * (next_id - del_id))::bigint;
                       update bench set payload = rpad(i::text || ':u', 90, 'zyxwvutsrqponmlkjihgfedcba')
                       where id = target;
                     else
                       delete from bench where id = del_id;
                       del_id := del_id + 1;
                     end if;
                     if (i + 1) % {txn_size} = 0 then
                       commit;
                     end if;
                   end loop;
                 end $$",
                last = count as i64 - 1,
            );
            sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await?;
            conn.close().await?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn drain_recvlogical(
    server: &PgServer,
    url: &str,
    slot: &str,
    end_lsn: &str,
    n: u64,
) -> anyhow::Result<Drain> {
    let sampler = CpuSampler::start(server.postmaster, process_label);
    let started = Instant::now();
    let out = tokio::process::Command::new(pg_recvlogical(server))
        .args(["-d", url, "--slot", slot, "--start", "--no-loop"])
        .args(["-o", "proto_version=2", "-o", "publication_names=weir", "-f", "/dev/null"])
        .args(["--endpos", end_lsn])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running pg_recvlogical")?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = sampler.stop();
    if !out.status.success() {
        bail!("pg_recvlogical failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(Drain { seconds, changes: n, cpu, max_ack_lag: 0 })
}

async fn drain_weir(
    server: &PgServer,
    url: &str,
    pool: &PgPool,
    slot: &str,
    n: i64,
    limit: Duration,
) -> anyhow::Result<Drain> {
    let config = weir_config(url, slot)?;
    let weir_pool = weir::db::connect(&config).await?;
    let sampler = CpuSampler::start(server.postmaster, process_label);
    let started = Instant::now();
    let (cancel, handle) = spawn_ingest(config, weir_pool.clone());
    // How far the slot's acknowledged position trails what the log has stored (WAL the server
    // must keep although weir has it): sampled every 500 ms.
    let stop_lag = CancellationToken::new();
    let lag_task = tokio::spawn({
        let (pool, slot, stop) = (pool.clone(), slot.to_string(), stop_lag.clone());
        async move {
            let mut max = 0i64;
            while !stop.is_cancelled() {
                let lag: Option<i64> = sqlx::query_scalar(
                    "select greatest((s.lsn - r.confirmed_flush_lsn)::bigint, 0)
                     from weir.source_state s join pg_replication_slots r on r.slot_name = s.slot
                     where s.slot = $1",
                )
                .bind(&slot)
                .fetch_optional(&pool)
                .await
                .ok()
                .flatten();
                max = max.max(lag.unwrap_or(0));
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            max
        }
    });
    let waited =
        wait_for_position_until(pool, slot, n, Duration::from_millis(5), &handle, Some(limit))
            .await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = sampler.stop();
    stop_lag.cancel();
    let max_ack_lag = lag_task.await.unwrap_or(0);
    let reached = match &waited {
        Ok((_, p)) => *p as u64,
        Err(_) => 0,
    };
    if let Err(e) = waited {
        println!("  diagnostics: {}", diagnostics(pool, slot).await);
        cancel.cancel();
        let stopped = handle.await;
        return Err(e.context(format!("ingestion ended with {stopped:?}")));
    }
    stop_ingest(cancel, handle).await?;
    weir_pool.close().await;
    Ok(Drain { seconds, changes: reached, cpu, max_ack_lag })
}

/// What the server says about the slot and the log, for a stalled drain.
async fn diagnostics(pool: &PgPool, slot: &str) -> String {
    let slot_row: Result<(Option<String>, Option<String>, bool), _> = sqlx::query_as(
        "select confirmed_flush_lsn::text, restart_lsn::text, active from pg_replication_slots where slot_name = $1",
    )
    .bind(slot)
    .fetch_one(pool)
    .await;
    let state: Result<(String, i64, Option<String>), _> = sqlx::query_as(
        "select lsn::text, position, received_lsn::text from weir.source_state where slot = $1",
    )
    .bind(slot)
    .fetch_one(pool)
    .await;
    let wal: Result<(String, String), _> =
        sqlx::query_as("select pg_current_wal_lsn()::text, pg_current_wal_flush_lsn()::text")
            .fetch_one(pool)
            .await;
    let repl: Result<Vec<(String,)>, _> = sqlx::query_as(
        "select format('%s sent %s flushed %s %s', application_name, sent_lsn, flush_lsn, state)
         from pg_stat_replication",
    )
    .fetch_all(pool)
    .await;
    format!(
        "slot (confirmed, restart, active) {slot_row:?}; source_state (lsn, position, received) {state:?}; \
         wal (current, flush) {wal:?}; walsenders (app, sent, flush, state) {repl:?}"
    )
}

// ---------------------------------------------------------------------------------------------
// Phase 2: live latency

#[derive(Debug)]
struct LatencyResult {
    target_rate: u64,
    achieved_rate: f64,
    rows: usize,
    measured: usize,
    late_writes: usize,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    min: f64,
}

async fn latency(server: &PgServer, args: &Args) -> anyhow::Result<LatencyResult> {
    println!(
        "== live latency, {} single-row insert transactions/s for {} s ==",
        args.rate, args.latency_seconds
    );
    let name = format!("weir_bench_lat_{}", std::process::id());
    let (url, pool, config) = prepare(server, &name).await?;
    let weir_pool = weir::db::connect(&config).await?;
    let (cancel, ingest) = spawn_ingest(config, weir_pool.clone());

    // The listener and the writers run on threads of their own (each a current-thread
    // runtime), so the instants they record are not delayed by the ingestion's tasks on the
    // main runtime; only the OS scheduler sits between them.
    // Every notification with its arrival instant (the payload is the appended head position).
    let stop_listen = CancellationToken::new();
    let listen_task = crate::thread::append_notifications(&url, stop_listen.clone()).await?;
    // Let the ingestion reach streaming before the clock starts.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let writers = args.writers.max(1);
    let rate = args.rate.max(1) as f64;
    let total = (rate * args.latency_seconds as f64) as i64;
    let write_task = on_own_thread("bench-writers", {
        let url = url.clone();
        move || async move {
            // Connect everyone first, then start the clock.
            let mut conns = Vec::new();
            for _ in 0..writers {
                conns.push(PgConnection::connect(&url).await?);
            }
            let start = tokio::time::Instant::now() + Duration::from_millis(100);
            let mut tasks = Vec::new();
            for (w, mut conn) in conns.into_iter().enumerate() {
                tasks.push(tokio::spawn(async move {
                    let payload = "p".repeat(90);
                    let mut done: Vec<(i64, Instant)> = Vec::new();
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
                        sqlx::query("insert into bench values ($1, $2)")
                            .bind(id)
                            .bind(&payload)
                            .execute(&mut conn)
                            .await?;
                        done.push((id, Instant::now()));
                        id += writers as i64;
                    }
                    conn.close().await?;
                    anyhow::Ok((done, late))
                }));
            }
            let mut committed: Vec<(i64, Instant)> = Vec::with_capacity(total as usize);
            let mut late_writes = 0;
            for t in tasks {
                let (done, late) = t.await??;
                committed.extend(done);
                late_writes += late;
            }
            anyhow::Ok((committed, late_writes))
        }
    });
    let (mut committed, late_writes) = write_task.await??;
    committed.sort_by_key(|(id, _)| *id);
    let first = committed.iter().map(|c| c.1).min().context("no row was written")?;
    let last = committed.iter().map(|c| c.1).max().context("no row was written")?;
    let achieved_rate = committed.len() as f64 / (last - first).as_secs_f64().max(1e-9);

    wait_for_position(&pool, "weir", committed.len() as i64, Duration::from_millis(20), &ingest)
        .await?;
    // The last notification is on its way; give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_listen.cancel();
    let mut seen = listen_task.await??;
    stop_ingest(cancel, ingest).await?;
    seen.sort_by_key(|(p, at)| (*p, *at));

    // Position → row id, then each row's time = first notification whose head covers it.
    let ids: Vec<(i64, i64)> =
        sqlx::query_as("select position, (key->>'id')::bigint from weir.events order by position")
            .fetch_all(&pool)
            .await?;
    let seen_at = |position: i64| -> Option<Instant> {
        let i = seen.partition_point(|(p, _)| *p < position);
        seen[i..].iter().map(|(_, at)| *at).min()
    };
    let commit_of: HashMap<i64, Instant> = committed.iter().copied().collect();
    let warmup = first + Duration::from_secs(1);
    let mut delays = Vec::new();
    for (position, id) in &ids {
        let (Some(done), Some(at)) = (commit_of.get(id), seen_at(*position)) else { continue };
        if *done < warmup {
            continue;
        }
        let ms = if at >= *done {
            (at - *done).as_secs_f64() * 1e3
        } else {
            -((*done - at).as_secs_f64() * 1e3)
        };
        delays.push(ms);
    }
    let measured = delays.len();
    let Some(p) = Percentiles::of(delays) else {
        bail!("no latency samples (notifications lost?)");
    };
    let result = LatencyResult {
        target_rate: args.rate,
        achieved_rate,
        rows: committed.len(),
        measured,
        late_writes,
        p50: p.p50,
        p99: p.p99,
        p999: p.p999,
        max: p.max,
        min: p.min,
    };
    println!(
        "  {} rows at {} rows/s achieved ({} writers, {} writes started >10 ms late); {} measured after a 1 s warm-up",
        thousands(result.rows as f64),
        thousands(result.achieved_rate),
        writers,
        result.late_writes,
        thousands(result.measured as f64)
    );
    println!(
        "  commit returned → append committed (NOTIFY received): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms (min {:.2} ms)",
        result.p50, result.p99, result.p999, result.max, result.min
    );
    println!();
    pool.close().await;
    weir_pool.close().await;
    server.drop_db(&name).await?;
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// Phase 3: a huge transaction

#[derive(Debug)]
struct HugeResult {
    rows: u64,
    baseline_mb: f64,
    peak_mb: f64,
    peak_source: &'static str,
    insert_seconds: f64,
    after_commit_seconds: f64,
    gap_free: bool,
    count: i64,
}

async fn huge(server: &PgServer, args: &Args) -> anyhow::Result<HugeResult> {
    let n = args.changes;
    println!("== one transaction of {} rows ==", thousands(n as f64));
    let name = format!("weir_bench_huge_{}", std::process::id());
    let (_url, pool, config) = prepare(server, &name).await?;
    let weir_pool = weir::db::connect(&config).await?;
    let (cancel, ingest) = spawn_ingest(config, weir_pool.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    let baseline_kb = status_kib(std::process::id(), "VmRSS").unwrap_or(0);
    // Writing 5 resets VmHWM (the peak) to the current RSS.
    let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut peak = 0u64;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(status_kib(std::process::id(), "VmRSS").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        }
    });

    let started = Instant::now();
    sqlx::query(AssertSqlSafe(format!(
        "insert into bench select g, repeat('x', 90) from generate_series(1, {n}) g"
    )))
    .execute(&pool)
    .await?;
    let committed = Instant::now();
    let waited =
        wait_for_position(&pool, "weir", n as i64, Duration::from_millis(20), &ingest).await;
    let done = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let sampled_kb = sampler.join().unwrap_or(0);
    let hwm_kb = if hwm_reset { status_kib(std::process::id(), "VmHWM") } else { None };
    waited?;
    stop_ingest(cancel, ingest).await?;

    let (count, lo, hi): (i64, Option<i64>, Option<i64>) =
        sqlx::query_as("select count(*), min(position), max(position) from weir.events")
            .fetch_one(&pool)
            .await?;
    let gap_free = count == n as i64 && lo == Some(1) && hi == Some(n as i64);
    let (peak_kb, peak_source) = match hwm_kb {
        Some(h) if h >= sampled_kb => (h, "VmHWM"),
        _ => (sampled_kb, "VmRSS sampled every 50 ms"),
    };
    let result = HugeResult {
        rows: n,
        baseline_mb: baseline_kb as f64 / 1024.0,
        peak_mb: peak_kb as f64 / 1024.0,
        peak_source,
        insert_seconds: (committed - started).as_secs_f64(),
        after_commit_seconds: (done - committed).as_secs_f64(),
        gap_free,
        count,
    };
    println!(
        "  insert committed after {:.1} s; every row in the log {:.1} s after the commit ({:.1} s from the start)",
        result.insert_seconds,
        result.after_commit_seconds,
        (done - started).as_secs_f64()
    );
    println!(
        "  peak RSS of this process {:.0} MB ({}), baseline before the insert {:.0} MB, delta {:.0} MB",
        result.peak_mb,
        result.peak_source,
        result.baseline_mb,
        result.peak_mb - result.baseline_mb
    );
    println!(
        "  log: {} events, positions {}..{} {}",
        thousands(count as f64),
        lo.unwrap_or(0),
        hi.unwrap_or(0),
        if gap_free { "without a gap" } else { "WRONG (expected 1..N, gap-free)" }
    );
    let work_mem: String =
        sqlx::query_scalar("select current_setting('logical_decoding_work_mem')")
            .fetch_one(&pool)
            .await?;
    println!(
        "  (the server streams a transaction to weir only once it outgrows logical_decoding_work_mem = {work_mem} \
         of decoded changes; a smaller one arrives whole at its commit)"
    );
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
    throughput: Vec<ThroughputResult>,
    latency: Option<LatencyResult>,
    huge: Option<HugeResult>,
}

impl Summary {
    fn print(&self, args: &Args) {
        println!(
            "== summary (medians of {} drain pairs per size; noisy shared machine) ==",
            args.repeat
        );
        println!("{:<44} {:>14} {:>16} {:>8}", "figure", "value", "target", "");
        for t in &self.throughput {
            println!(
                "{:<44} {:>14} {:>16} {:>8}",
                format!("pg_recvlogical, {}-row txns (changes/s)", t.txn_size),
                thousands(t.recv_rate()),
                "reference",
                ""
            );
            println!(
                "{:<44} {:>14} {:>16} {:>8}",
                format!(
                    "weir into the log, {}-row txns (changes/s){}",
                    t.txn_size,
                    if t.partial() { "*" } else { "" }
                ),
                thousands(t.weir_rate()),
                format!("≥ {}", thousands(t.recv_rate() * TARGET_RATIO)),
                ""
            );
            println!(
                "{:<44} {:>14} {:>16} {:>8}",
                format!("ratio, {}-row txns", t.txn_size),
                ratio(t.ratio()),
                format!("≥ {TARGET_RATIO:.2}x"),
                verdict(t.ratio() >= TARGET_RATIO)
            );
        }
        if let Some(l) = &self.latency {
            println!(
                "{:<44} {:>14} {:>16} {:>8}",
                "latency rate achieved (rows/s)",
                thousands(l.achieved_rate),
                thousands(l.target_rate as f64),
                verdict(l.achieved_rate >= l.target_rate as f64 * 0.95)
            );
            println!(
                "{:<44} {:>14} {:>16} {:>8}",
                "latency p50 (ms)",
                format!("{:.2}", l.p50),
                format!("≤ {TARGET_P50_MS}"),
                verdict(l.p50 <= TARGET_P50_MS)
            );
            println!(
                "{:<44} {:>14} {:>16} {:>8}",
                "latency p99 (ms)",
                format!("{:.2}", l.p99),
                format!("≤ {TARGET_P99_MS}"),
                verdict(l.p99 <= TARGET_P99_MS)
            );
            println!(
                "{:<44} {:>14} {:>16} {:>8}",
                "latency max (ms)",
                format!("{:.2}", l.max),
                "",
                ""
            );
        }
        if let Some(h) = &self.huge {
            println!(
                "{:<44} {:>14} {:>16} {:>8}",
                format!("peak RSS, {}-row txn (MB)", thousands(h.rows as f64)),
                format!("{:.0}", h.peak_mb),
                format!("≤ {TARGET_RSS_MB:.0}"),
                verdict(h.peak_mb <= TARGET_RSS_MB)
            );
            println!(
                "{:<44} {:>14} {:>16} {:>8}",
                "  of which over the baseline (MB)",
                format!("{:.0}", h.peak_mb - h.baseline_mb),
                "",
                ""
            );
            println!(
                "{:<44} {:>14} {:>16} {:>8}",
                "huge txn: commit → all in the log (s)",
                format!("{:.1}", h.after_commit_seconds),
                "",
                ""
            );
            println!(
                "{:<44} {:>14} {:>16} {:>8}",
                "huge txn: log complete and gap-free",
                if h.gap_free { "yes".to_string() } else { format!("NO ({})", h.count) },
                "yes",
                verdict(h.gap_free)
            );
        }
        for t in &self.throughput {
            println!("ratio {}-row txns: weir / pg_recvlogical: {}", t.txn_size, ratio(t.ratio()));
        }
        if !self.throughput.is_empty() {
            self.print_throughput_notes(args);
        }
    }

    /// The summary's ratios and targets, for `weir-bench all`'s table.
    fn record(&self, args: &Args) {
        let row = |figure: String, measured: String, target: String, met: bool| Row {
            benchmark: "ingest",
            figure,
            measured,
            reference: String::new(),
            ratio: None,
            target: Some(target),
            met: Some(met),
        };
        for t in &self.throughput {
            report::record(Row {
                benchmark: "ingest",
                figure: format!(
                    "{}-row transactions, changes/s{}",
                    t.txn_size,
                    if t.partial() { " (partial drain)" } else { "" }
                ),
                measured: format!("{}/s", thousands(t.weir_rate())),
                reference: format!("{}/s (pg_recvlogical)", thousands(t.recv_rate())),
                ratio: Some(t.ratio()),
                target: Some(format!("≥ {TARGET_RATIO:.2}x")),
                met: Some(t.ratio() >= TARGET_RATIO),
            });
        }
        if let Some(l) = &self.latency {
            report::record(row(
                "latency phase, rows/s achieved".into(),
                format!("{}/s", thousands(l.achieved_rate)),
                format!("{}/s", thousands(args.rate as f64)),
                l.achieved_rate >= l.target_rate as f64 * 0.95,
            ));
            report::record(row(
                format!("commit → logged p50 at {}/s", thousands(args.rate as f64)),
                format!("{:.2} ms", l.p50),
                format!("≤ {TARGET_P50_MS} ms"),
                l.p50 <= TARGET_P50_MS,
            ));
            report::record(row(
                format!("commit → logged p99 at {}/s", thousands(args.rate as f64)),
                format!("{:.2} ms", l.p99),
                format!("≤ {TARGET_P99_MS} ms"),
                l.p99 <= TARGET_P99_MS,
            ));
        }
        if let Some(h) = &self.huge {
            report::record(row(
                format!("peak RSS, {}-row transaction", thousands(h.rows as f64)),
                format!("{:.0} MB", h.peak_mb),
                format!("≤ {TARGET_RSS_MB:.0} MB"),
                h.peak_mb <= TARGET_RSS_MB,
            ));
            report::record(row(
                "huge transaction: log complete and gap-free".into(),
                if h.gap_free { "yes".into() } else { format!("no ({} events)", h.count) },
                "yes".into(),
                h.gap_free,
            ));
        }
    }

    fn print_throughput_notes(&self, args: &Args) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        println!();
        println!("Notes on throughput:");
        println!(
            "- pg_recvlogical only receives pgoutput and discards it. weir decodes every change into"
        );
        println!(
            "  JSON, inserts it into weir.events and commits (fsync) before the slot may be acknowledged;"
        );
        println!("  its own backend and this process share the cores with the walsender.");
        if self.throughput.iter().any(ThroughputResult::partial) {
            println!(
                "- * a weir drain was stopped after --max-drain-seconds ({} s); its rate is what it drained",
                args.max_drain_seconds
            );
            println!(
                "  in that time, which is the steady-state rate of a drain that would take much longer."
            );
        }
        let lag = self.throughput.iter().flat_map(|t| &t.weir).map(|d| d.max_ack_lag).max();
        if let Some(lag) = lag.filter(|l| *l > 64 << 20) {
            println!(
                "- While weir drained, the slot's acknowledged position trailed what the log had stored by"
            );
            println!(
                "  up to {}: standby status updates were not sent while replication data kept arriving,",
                human_bytes(lag)
            );
            println!(
                "  so the server kept that WAL (and a walsender waits wal_sender_timeout for a reply)."
            );
        }
        for t in &self.throughput {
            let busy = median(t.weir.iter().map(|d| total(&d.cpu) / d.seconds).collect());
            let local = t.weir.iter().all(|d| d.cpu.local);
            println!(
                "- {}-row txns: {} of WAL for {} changes (generated in {:.1} s){}",
                t.txn_size,
                human_bytes(t.wal_bytes),
                thousands(t.changes as f64),
                t.generate_seconds,
                if local {
                    format!(
                        "; during weir's drains the machine was {:.0}% busy ({} cores){}",
                        100.0 * busy / cores,
                        cores,
                        if busy / cores < 0.6 {
                            ": weir mostly waits rather than computes"
                        } else {
                            ""
                        }
                    )
                } else {
                    String::new()
                }
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CPU accounting

/// A server process by its titles: the auxiliary ones by name; a backend seen running COPY or
/// INSERT during a drain is the log appender's.
fn process_label(titles: &[String]) -> String {
    if let Some(aux) = titles.iter().find_map(|t| auxiliary(t)) {
        return aux;
    }
    let rest = |t: &String| t.strip_prefix("postgres: ").unwrap_or(t).to_string();
    if titles.iter().map(rest).any(|r| r.contains("COPY") || r.contains("INSERT")) {
        "appender backend".into()
    } else {
        "backend".into()
    }
}

/// CPU seconds of everything measured: the server, this process, pg_recvlogical.
fn total(cpu: &CpuReport) -> f64 {
    cpu.server_total() + cpu.this_process + cpu.children
}

/// Where the CPU went during a drain of `wall` seconds, in % of one core.
fn describe(cpu: &CpuReport, wall: f64) -> String {
    if !cpu.local {
        return format!(
            "this process {:.0}%, pg_recvlogical {:.0}%",
            100.0 * cpu.this_process / wall,
            100.0 * cpu.children / wall
        );
    }
    let mut parts: Vec<String> = cpu
        .server
        .iter()
        .filter(|(_, s)| *s / wall >= 0.02)
        .map(|(l, s)| format!("{l} {:.0}%", 100.0 * s / wall))
        .collect();
    if cpu.this_process / wall >= 0.02 {
        parts.push(format!("weir+bench process {:.0}%", 100.0 * cpu.this_process / wall));
    }
    if cpu.children / wall >= 0.02 {
        parts.push(format!("pg_recvlogical {:.0}%", 100.0 * cpu.children / wall));
    }
    format!("{} (total {:.0}% of one core)", parts.join(", "), 100.0 * total(cpu) / wall)
}
