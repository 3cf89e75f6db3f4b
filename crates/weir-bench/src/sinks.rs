//! `weir-bench sinks`: a subscription's events delivered out of the database — to a webhook
//! (Standard Webhooks signatures) and to NATS JetStream (`Nats-Msg-Id`, checkpoint after the
//! PubAck) — against **plain clients doing the same transport work**, measured in the same run.
//!
//! ```text
//!  this process                                              `weir run` (child process)
//!  ───────────────────────────────────────                   ─────────────────────────────
//!  backlog: plain inserts into weir.stream_events ──WAL──→   ingestion → weir.events
//!  subscriptions::create(sink) ─────── weir.subscriptions ─→ catalog (a supervisor tick)
//!                                                            → emitters → Delivery::deliver
//!  receiver (axum, own thread) ←── POST /hook ─────────────┘  (webhook, signed)
//!  nats-server -js (child) ←───── publish + PubAck ─────────┘  (NATS, Nats-Msg-Id)
//!  ceilings: reqwest / async-nats posting the same bodies ──→ the same receiver / stream
//! ```
//!
//! Why `weir run` is a child process: the webhook sink reads its signing secret from the
//! environment variable its `secret_env` names, and the workspace forbids `unsafe_code`, so this
//! process cannot set one for itself. The child is this executable's hidden `weir` command (as
//! `fanout` starts it), given `BENCH_WEBHOOK_SECRET` (a fresh `Secrets::generate()`) and a
//! `weir.toml` in a temp directory (database, slot, `[http] enabled = false`, a pool of
//! `--weir-pool-size`). The subscriptions are created from this process with
//! `weir_streams::subscriptions::create` (which validates the sink but does not look for the
//! secret here); the child's catalog picks each one up within a supervisor tick (500 ms).
//!
//! Setup, once per run: a fresh database (a private cluster with `fsync=on` unless `--url`),
//! `weir::setup::init`, a backlog of `--events` (20,000) events over 1,000 streams appended
//! with plain inserts into `weir.stream_events`, and `weir run` started; the backlog is logged
//! by its ingestion alone before anything is measured (the log head in `weir.source_state`
//! reaches the backlog's size). A private `nats-server -js` on a free port with its store in
//! the temp directory (`--nats-url` uses a server of yours instead; without either the NATS
//! phases are skipped, saying why), and the stream `WEIRBENCH` (subjects `bench.>`, file
//! storage, 2-minute duplicate window) created — dropped first if it exists.
//!
//! 1. **Throughput**, for each sink and each `--pool-sizes` (1 and 8): a subscription of a fresh
//!    name (`wh1`, `nt8`, …) of type `stream` over `d-*`, from the beginning, with the sink
//!    (webhook: `batch_size` `--batch-size`, default 1; NATS: subject
//!    `bench.{subscription}.{stream}`, `max_in_flight` 256). The clock runs from
//!    `subscriptions::create` (the child already running) until the subscription's watermark
//!    (`min(position)` of its checkpoints) reaches the log head; the receiver must have counted
//!    every event (webhook: unique envelope ids, duplicates reported; NATS: messages the stream
//!    stored). Then it is deleted. A run that stalls (`--stall-seconds` without progress) or
//!    overruns `--timeout-seconds` prints what it saw (watermark, received, the subscription's
//!    errors, the last lines of `weir run`'s log) and the benchmark goes on.
//!
//!    The **ceiling**, right after each weir measurement, with as many concurrent senders as
//!    the pool has emitters:
//!    - webhook: one reqwest client (keep-alive, `tcp_nodelay`) posting the same bodies —
//!      `weir_sinks::envelope` of the same logged events under a subscription name of the same
//!      length (`cw1`), serialised before the clock starts, signed and sent with the same
//!      `webhook-*` headers — to the same receiver, one request at a time per connection;
//!    - NATS: one async-nats connection publishing the same messages (same subject layout, the
//!      sink's headers — `Nats-Msg-Id`, `weir-subscription`, `weir-position`, `weir-type` — and
//!      the envelope as the body, under a name as long) to the same stream, a sliding window
//!      of up to 256 PubAcks awaited in flight per publisher.
//!
//!    Target: weir ≥ 0.7× the ceiling.
//! 2. **Latency**: a subscription of pool size 8 (type `stream` over `lw-*`, then `ln-*` for
//!    NATS), starting now; one probe event must reach the receiver first. Then `--rate` (1,000)
//!    appends of one event per second through `weir.append` for `--latency-seconds` (10) from
//!    `--writers` (10) connections on a thread of their own (a fixed schedule shared by the
//!    writers); each records the instant its commit returned. The receiver (webhook) or a
//!    JetStream ordered consumer of `bench.ntlat.>` in this process, on a thread of its own,
//!    records the instant each id first arrives. Latency = arrival − commit, one clock (this
//!    process's monotonic `Instant`), the first second left out. Target: p50 ≤ 15 ms. The
//!    **reference**, in the same phase: commit → logged, the instant the append that logged the
//!    event was announced (`LISTEN weir_events` on a thread of its own; the append commits its
//!    events and the NOTIFY together) — the floor any delivery from the log builds on.
//!
//! The receiver answers 200 at once; it counts each event of a body (`{"events": [...]}` is a
//! batch), deduplicates by the envelope `id`, and verifies the signature of the first 100
//! requests of every phase with `Secrets::verify`: a signature that does not verify makes the
//! command fail at the end, after every figure is printed. A missed target is printed, not an
//! error. Beside each phase, where the time went: the CPU of `weir run`, PostgreSQL,
//! nats-server and this process, and the write transactions PostgreSQL began (the next
//! transaction id before and after, read without taking one) per event.
//!
//! Run: `cargo run --release -p weir-bench -- sinks` (`--sinks webhook`, `--only throughput`,
//! `--events 5000` for a quick run).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use weir::{Config, Event, EventFilter, LogReader};
use weir_core::Secret;
use weir_sinks::{NatsSink, Secrets, WebhookSink};
use weir_streams::{Sink, StartAt, SubscriptionDef, SubscriptionKind, subscriptions};

use crate::cpu::{CpuReport, CpuSampler};
use crate::percentile::Percentiles;
use crate::report::{self, Row, ratio, thousands, verdict};
use crate::server::{PgServer, ServerArgs};
use crate::streams::{head, watermark};
use crate::thread::on_own_thread;

const TARGET_CEILING_RATIO: f64 = 0.7;
const TARGET_P50_MS: f64 = 15.0;
/// The environment variable of the child `weir run` holding the webhook's signing secret.
const SECRET_ENV: &str = "BENCH_WEBHOOK_SECRET";
/// Requests per phase whose signature the receiver verifies.
const VERIFY_SAMPLE: u64 = 100;
/// The JetStream stream every NATS phase publishes to.
const NATS_STREAM: &str = "WEIRBENCH";
/// The subject template of the NATS sink (and of the ceiling's messages).
const NATS_SUBJECT: &str = "bench.{subscription}.{stream}";
/// PubAcks a ceiling publisher awaits in flight (the sink's `max_in_flight` default).
const NATS_WINDOW: usize = 256;
/// Streams of the backlog (`d-0` … `d-999`).
const BACKLOG_STREAMS: u64 = 1000;

const APPEND_SQL: &str = "select * from weir.append($1::text, $2::text, $3::jsonb)";

/// Arguments of `weir-bench sinks`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    server: ServerArgs,
    /// Run only these phases.
    #[arg(long, value_enum)]
    only: Option<Phase>,
    /// Sinks to measure, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [SinkKind::Webhook, SinkKind::Nats])]
    sinks: Vec<SinkKind>,
    /// Events of the throughput backlog (over 1,000 streams; rounded up to a multiple of 1,000).
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Pool sizes (emitters) of the throughput phases; the ceilings use as many senders.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8])]
    pool_sizes: Vec<u32>,
    /// The webhook sink's batch_size (events per request); the ceiling posts batches as large.
    #[arg(long, default_value_t = 1)]
    batch_size: u32,
    /// Appends of one event per second in the latency phases.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Length of each latency phase, in seconds (the first is left out).
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Writer connections of the latency phases, sharing the schedule.
    #[arg(long, default_value_t = 10)]
    writers: usize,
    /// Pool size of the latency phases' subscriptions.
    #[arg(long, default_value_t = 8)]
    latency_pool_size: u32,
    /// `[database] pool_size` of the `weir run` child.
    #[arg(long, default_value_t = 16)]
    weir_pool_size: u32,
    /// A NATS server (with JetStream) to use instead of starting one; the stream WEIRBENCH is
    /// dropped and created there.
    #[arg(long)]
    nats_url: Option<String>,
    /// The nats-server binary to start. Defaults to /usr/sbin/nats-server, then PATH.
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// Most seconds one weir throughput measurement may take.
    #[arg(long, default_value_t = 300)]
    timeout_seconds: u64,
    /// Seconds without progress after which a weir measurement is given up.
    #[arg(long, default_value_t = 30)]
    stall_seconds: u64,
    /// `analyze weir.events` after the backlog is logged.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    analyze: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    Throughput,
    Latency,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SinkKind {
    Webhook,
    Nats,
}

impl SinkKind {
    fn label(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Nats => "NATS",
        }
    }

    /// Subscription names: weir's and the ceiling's (as long, so bodies are as large).
    fn names(self, pool: u32) -> (String, String) {
        match self {
            Self::Webhook => (format!("wh{pool}"), format!("cw{pool}")),
            Self::Nats => (format!("nt{pool}"), format!("cn{pool}")),
        }
    }
}

/// `weir-bench sinks`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.events == 0 || args.pool_sizes.contains(&0) || args.rate == 0 || args.writers == 0 {
        bail!("--events, --pool-sizes, --rate and --writers must be at least 1");
    }
    if args.sinks.is_empty() {
        bail!("--sinks needs at least one of webhook, nats");
    }
    let pg = PgServer::start(args.server.url.clone(), false, Vec::new(), None).await?;
    let cpus = pg
        .print_header(
            "sinks",
            ", shared by weir run, PostgreSQL, nats-server, the receiver and the ceilings' clients",
        )
        .await?;

    let name = format!("weir_bench_sinks_{}", std::process::id());
    let db_url = pg.create_db(&name).await?;
    let dir = std::env::temp_dir().join(format!("weir-bench-sinks-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&args, &pg, &name, &db_url, &dir, cpus).await;
    pg.drop_db(&name).await?;
    pg.admin.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    args: &Args,
    pg: &PgServer,
    name: &str,
    db_url: &str,
    dir: &Path,
    cpus: usize,
) -> anyhow::Result<()> {
    let mut config = Config::default();
    config.database.url = Some(Secret::new(db_url.to_string()));
    config.source.slot = name.to_string();
    config.source.tables = vec!["unrelated".into()];
    let pool = PgPoolOptions::new().max_connections(4).connect(db_url).await?;
    sqlx::raw_sql("create table unrelated (id int primary key)").execute(&pool).await?;
    weir::setup::init(&pool, &config).await?;

    let secret = Secrets::generate();
    let secrets = Secrets::parse(&secret).map_err(anyhow::Error::msg)?;
    let receiver = Receiver::start(secrets.clone()).context("starting the webhook receiver")?;
    println!("  receiver {} (axum, a thread of its own, answers 200 at once)", receiver.url);
    let nats = if args.sinks.contains(&SinkKind::Nats) {
        match NatsServer::start(args, dir).await {
            Ok(n) => {
                println!(
                    "  nats     nats-server {} at {} ({}), stream {NATS_STREAM}: file storage, \
                     the server's default sync (PubAck does not wait for fsync)",
                    n.version,
                    n.url,
                    if n.child.is_some() { "started for this run" } else { "--nats-url" }
                );
                Some(n)
            }
            Err(e) => {
                println!("  nats     none: {e:#}; the NATS phases are skipped");
                report::record(Row {
                    benchmark: "sinks",
                    figure: "NATS throughput and latency".into(),
                    measured: format!("skipped: {e:#}"),
                    reference: String::new(),
                    ratio: None,
                    target: None,
                    met: None,
                });
                None
            }
        }
    } else {
        None
    };

    // The backlog, logged by the child's ingestion alone.
    let total = backlog(&pool, args.events).await?;
    let weir = WeirChild::start(dir, db_url, name, args.weir_pool_size, &secret)?;
    let t = Instant::now();
    let mut last = (0, Instant::now());
    loop {
        let h = head(&pool).await?;
        if h >= total {
            break;
        }
        if h != last.0 {
            last = (h, Instant::now());
        }
        if let Some(status) = weir.exited() {
            bail!("`weir run` exited ({status}) while logging the backlog: {}", weir.log_tail(15));
        }
        if last.1.elapsed() > Duration::from_secs(60) || t.elapsed() > Duration::from_secs(900) {
            bail!(
                "the backlog was not logged: the head is at {h} of {total}; `weir run`'s log: {}",
                weir.log_tail(15)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "  backlog  {} events over {} streams, plain inserts, logged by `weir run` in {:.1} s \
         (not part of the figures)",
        thousands(total as f64),
        thousands(BACKLOG_STREAMS as f64),
        t.elapsed().as_secs_f64()
    );
    if args.analyze {
        sqlx::raw_sql("analyze weir.events").execute(&pool).await?;
    }
    let events = logged_events(&pool, total).await?;
    let body = serde_json::to_vec(&weir_sinks::envelope("wh1", &events[0]))?.len();
    println!(
        "  bodies   one event's envelope ≈ {body} bytes; webhook batch_size {}; NATS subject \
         {NATS_SUBJECT}, max_in_flight {NATS_WINDOW}",
        args.batch_size
    );
    println!();

    let bench = Bench {
        args,
        pool: &pool,
        pg,
        db_url,
        weir: &weir,
        receiver: &receiver,
        secrets: &secrets,
        nats: nats.as_ref(),
        events: &events,
        head: total,
    };
    let mut report = Report::default();
    let wants = |p: Phase| args.only.is_none_or(|o| o == p);
    if wants(Phase::Throughput) {
        for &sink in &args.sinks {
            if sink == SinkKind::Nats && nats.is_none() {
                continue;
            }
            println!("== {} throughput: {} events ==", sink.label(), thousands(total as f64));
            for &p in &args.pool_sizes {
                let row = throughput(&bench, sink, p, &mut report.problems)
                    .await
                    .with_context(|| format!("{} throughput, pool size {p}", sink.label()))?;
                report.throughput.push(row);
            }
            println!();
        }
    }
    if wants(Phase::Latency) {
        for &sink in &args.sinks {
            if sink == SinkKind::Nats && nats.is_none() {
                continue;
            }
            let l = latency(&bench, sink, &mut report.problems)
                .await
                .with_context(|| format!("{} latency", sink.label()))?;
            report.latency.push((sink, l));
        }
    }
    report.print(args, cpus);
    report.record(args);

    weir.stop().await;
    receiver.stop().await;
    drop(nats);
    pool.close().await;
    if !report.problems.is_empty() {
        bail!("{}", report.problems.join("; "));
    }
    Ok(())
}

/// What every phase needs.
struct Bench<'a> {
    args: &'a Args,
    pool: &'a PgPool,
    pg: &'a PgServer,
    db_url: &'a str,
    weir: &'a WeirChild,
    receiver: &'a Receiver,
    secrets: &'a Secrets,
    nats: Option<&'a NatsServer>,
    /// The backlog's events as logged, in log order.
    events: &'a [Event],
    /// The log head once the backlog is logged.
    head: i64,
}

// ---------------------------------------------------------------------------------------------
// The database: backlog, head, watermark

/// Appends the backlog — version v of every stream, 50 versions per transaction — and returns
/// how many events it holds.
async fn backlog(pool: &PgPool, events: u64) -> anyhow::Result<i64> {
    let versions = events.div_ceil(BACKLOG_STREAMS) as i64;
    let mut v = 0;
    while v < versions {
        let upto = (v + 50).min(versions);
        sqlx::query(
            "insert into weir.stream_events (stream, version, id, type, data)
             select 'd-' || s, g, gen_random_uuid(), 'bench.appended',
                    jsonb_build_object('n', g, 'pad', repeat('x', 64))
             from generate_series($1::bigint, $2::bigint) g, generate_series(0, $3 - 1) s",
        )
        .bind(v + 1)
        .bind(upto)
        .bind(BACKLOG_STREAMS as i64)
        .execute(pool)
        .await?;
        v = upto;
    }
    Ok(versions * BACKLOG_STREAMS as i64)
}

/// The backlog's events as the log holds them (the ceilings' bodies are made of them).
async fn logged_events(pool: &PgPool, total: i64) -> anyhow::Result<Vec<Event>> {
    let reader = LogReader::new(pool.clone()).await?;
    let filter =
        EventFilter { entities: vec![Event::STREAM_EVENTS.into()], ..EventFilter::default() };
    let mut events = Vec::with_capacity(total as usize);
    let mut after = 0;
    loop {
        let page = reader.read(after, 5000, &filter).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        events.extend(page);
    }
    if events.len() as i64 != total {
        bail!("the log holds {} stream events, expected {total}", events.len());
    }
    Ok(events)
}

/// An appended event's stream (`d-42`), from the row the log holds.
fn stream_of(event: &Event) -> &str {
    event.new_record.as_ref().and_then(|r| r["stream"].as_str()).unwrap_or("unknown")
}

// ---------------------------------------------------------------------------------------------
// Phase 1: throughput against the ceilings

/// One events/s measurement, weir's or a ceiling's.
#[derive(Debug, Default)]
struct Rate {
    /// Events/s, `None` when it did not finish.
    per_second: Option<f64>,
    seconds: f64,
    /// Distinct events the receiver got (webhook) or the stream stored (NATS).
    received: u64,
    duplicates: u64,
    /// From the start of the clock to the first arrival (weir: the catalog's pickup).
    first_after: Option<f64>,
    /// Why it did not finish.
    failed: Option<String>,
    cpu: String,
}

impl Rate {
    fn line(&self, what: &str, expected: i64) -> String {
        let mut s = match self.per_second {
            Some(r) => format!(
                "{what:<34} {:>8} events/s ({} events in {:.2} s",
                thousands(r),
                thousands(expected as f64),
                self.seconds
            ),
            None => format!("{what:<34} did not finish ({:.1} s", self.seconds),
        };
        if let Some(f) = self.first_after {
            s.push_str(&format!("; the first arrived after {:.0} ms", f * 1000.0));
            if self.per_second.is_some() && self.seconds > f {
                s.push_str(&format!(
                    ", {} events/s from then",
                    thousands(expected as f64 / (self.seconds - f))
                ));
            }
        }
        s.push(')');
        if self.received as i64 != expected || self.duplicates > 0 {
            s.push_str(&format!(
                "\n    received {} distinct of {}, {} duplicates",
                thousands(self.received as f64),
                thousands(expected as f64),
                thousands(self.duplicates as f64)
            ));
        }
        if let Some(why) = &self.failed {
            s.push_str(&format!("\n    {why}"));
        }
        s.push_str(&format!("\n    cpu: {}", self.cpu));
        s
    }
}

/// A row of the summary.
#[derive(Debug)]
struct ThroughputRow {
    sink: SinkKind,
    pool: u32,
    weir: Rate,
    ceiling: Rate,
}

async fn throughput(
    b: &Bench<'_>,
    sink: SinkKind,
    pool_size: u32,
    problems: &mut Vec<String>,
) -> anyhow::Result<ThroughputRow> {
    let (sub, ceiling_name) = sink.names(pool_size);
    let weir = match sink {
        SinkKind::Webhook => weir_webhook(b, &sub, pool_size, problems).await?,
        SinkKind::Nats => weir_nats(b, &sub, pool_size).await?,
    };
    println!("  {}", weir.line(&format!("weir, pool size {pool_size}:"), b.head));
    let ceiling = match sink {
        SinkKind::Webhook => webhook_ceiling(b, &ceiling_name, pool_size as usize, problems)
            .await
            .context("the webhook ceiling")?,
        SinkKind::Nats => {
            nats_ceiling(b, &ceiling_name, pool_size as usize).await.context("the NATS ceiling")?
        }
    };
    let what = match sink {
        SinkKind::Webhook => format!("ceiling, reqwest × {pool_size} conn.:"),
        SinkKind::Nats => format!("ceiling, async-nats × {pool_size} pub.:"),
    };
    println!("  {}", ceiling.line(&what, b.head));
    if let (Some(w), Some(c)) = (weir.per_second, ceiling.per_second) {
        println!(
            "  weir / ceiling = {} (target ≥ {TARGET_CEILING_RATIO}×: {})",
            ratio(w / c),
            verdict(w / c >= TARGET_CEILING_RATIO)
        );
    }
    Ok(ThroughputRow { sink, pool: pool_size, weir, ceiling })
}

/// A phase's window: the CPU of PostgreSQL, this process, `weir run` and nats-server, and the
/// write transactions PostgreSQL began (the next transaction id, read without taking one).
struct Window {
    cpu: CpuSampler,
    xid: i64,
}

impl Window {
    async fn start(b: &Bench<'_>) -> anyhow::Result<Self> {
        let mut cpu =
            CpuSampler::start(b.pg.postmaster, |_| String::new()).watch("weir", b.weir.pid);
        if let Some(pid) = b.nats.and_then(NatsServer::pid) {
            cpu = cpu.watch("nats", pid);
        }
        Ok(Self { cpu, xid: next_xid(b.pool).await? })
    }

    /// The window's CPU line, with the write transactions per event of `events`.
    async fn stop(self, b: &Bench<'_>, events: i64) -> anyhow::Result<String> {
        let cpu = cpu_line(&self.cpu.stop());
        let xacts = next_xid(b.pool).await? - self.xid;
        Ok(format!(
            "{cpu}\n    PostgreSQL: {} write transactions ({:.2} per event)",
            thousands(xacts as f64),
            xacts as f64 / events.max(1) as f64
        ))
    }
}

/// The next transaction id the cluster will assign (`xmax` of a snapshot: takes none).
async fn next_xid(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("select pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        .fetch_one(pool)
        .await?)
}

fn cpu_line(r: &CpuReport) -> String {
    let pct = |s: f64| 100.0 * s / r.wall.max(1e-9);
    let pg = if r.local { format!("{:.0}%", pct(r.server_total())) } else { "not local".into() };
    let ours = r.watched("weir") + r.server_total() + r.watched("nats") + r.this_process;
    format!(
        "weir run {:.0}%, PostgreSQL {pg}, nats-server {:.0}%, this process (receiver, \
         clients) {:.0}% of one core; other processes {:.0}%",
        pct(r.watched("weir")),
        pct(r.watched("nats")),
        pct(r.this_process),
        pct((r.machine - ours).max(0.0))
    )
}

async fn weir_webhook(
    b: &Bench<'_>,
    sub: &str,
    pool_size: u32,
    problems: &mut Vec<String>,
) -> anyhow::Result<Rate> {
    let sink = WebhookSink {
        batch_size: b.args.batch_size,
        ..WebhookSink::new(&b.receiver.url, SECRET_ENV)
    };
    let def = SubscriptionDef::new(sub, SubscriptionKind::Stream, json!("d-*"))
        .pool_size(pool_size)
        .sink(Sink::Webhook(sink));
    b.receiver.take();
    let cpu = Window::start(b).await?;
    let started = Instant::now();
    subscriptions::create(b.pool, &def).await?;
    let outcome = caught_up(b, sub, started, &|| b.receiver.distinct()).await?;
    let cpu = cpu.stop(b, b.head).await?;
    let got = b.receiver.take();
    subscriptions::delete(b.pool, sub).await?;
    got.check_signatures(&format!("weir's webhook `{sub}`"), problems);
    Ok(Rate {
        per_second: outcome.as_ref().ok().map(|s| b.head as f64 / s),
        seconds: *outcome.as_ref().unwrap_or(&started.elapsed().as_secs_f64()),
        received: got.arrivals.len() as u64,
        duplicates: got.duplicates,
        first_after: got.first.map(|f| f.saturating_duration_since(started).as_secs_f64()),
        failed: outcome.err(),
        cpu,
    })
}

async fn weir_nats(b: &Bench<'_>, sub: &str, pool_size: u32) -> anyhow::Result<Rate> {
    let nats = b.nats.expect("NATS phases run with a server");
    let sink = NatsSink {
        url: nats.url.clone(),
        subject: NATS_SUBJECT.into(),
        stream: NATS_STREAM.into(),
        max_in_flight: NATS_WINDOW as u32,
        ..NatsSink::new()
    };
    let def = SubscriptionDef::new(sub, SubscriptionKind::Stream, json!("d-*"))
        .pool_size(pool_size)
        .sink(Sink::Nats(sink));
    let before = nats.stored().await?;
    let cpu = Window::start(b).await?;
    let started = Instant::now();
    subscriptions::create(b.pool, &def).await?;
    let outcome = caught_up(b, sub, started, &|| 0).await?;
    let cpu = cpu.stop(b, b.head).await?;
    subscriptions::delete(b.pool, sub).await?;
    let stored = nats.stored().await? - before;
    Ok(Rate {
        per_second: outcome.as_ref().ok().map(|s| b.head as f64 / s),
        seconds: *outcome.as_ref().unwrap_or(&started.elapsed().as_secs_f64()),
        received: stored,
        duplicates: 0,
        first_after: None,
        failed: outcome.err(),
        cpu,
    })
}

/// Waits until `sub`'s watermark reaches the head: the seconds since `started`, or why not
/// (a deadline, a stall, the child gone) with what was seen.
async fn caught_up(
    b: &Bench<'_>,
    sub: &str,
    started: Instant,
    received: &dyn Fn() -> u64,
) -> anyhow::Result<Result<f64, String>> {
    let deadline = started + Duration::from_secs(b.args.timeout_seconds);
    let stall = Duration::from_secs(b.args.stall_seconds);
    let mut seen = (-1, 0);
    let mut moved = Instant::now();
    loop {
        let w = watermark(b.pool, sub).await?;
        if w >= b.head {
            return Ok(Ok(started.elapsed().as_secs_f64()));
        }
        let r = received();
        if (w, r) != seen {
            seen = (w, r);
            moved = Instant::now();
        }
        let reason = if let Some(status) = b.weir.exited() {
            Some(format!("`weir run` exited ({status})"))
        } else if Instant::now() > deadline {
            Some(format!("not done within {} s", b.args.timeout_seconds))
        } else if moved.elapsed() > stall {
            Some(format!("no progress for {} s", b.args.stall_seconds))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Ok(Err(stuck(b, sub, &reason, (w, b.head), r).await));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a stuck subscription shows: its watermark, what arrived, its errors, the child's log.
async fn stuck(
    b: &Bench<'_>,
    sub: &str,
    reason: &str,
    (watermark, target): (i64, i64),
    received: u64,
) -> String {
    let mut s = format!(
        "gave up — {reason}: watermark {} of {}, {} received",
        thousands(watermark as f64),
        thousands(target as f64),
        thousands(received as f64)
    );
    match subscriptions::get(b.pool, sub).await {
        Ok(st) => {
            s.push_str(&format!("; state {:?}", st.state));
            if let Some(e) = &st.sink_error {
                s.push_str(&format!("; sink_error: {e}"));
            }
            if let Some(d) = &st.deliveries {
                s.push_str(&format!("; delivered {}, retries {}", d.delivered, d.retries));
                if let Some(e) = &d.last_error {
                    s.push_str(&format!(", last error: {e}"));
                }
            }
            if let Some(h) = &st.halted {
                s.push_str(&format!("; halted: {h}"));
            }
            if let Some(e) = st.emitters.iter().find_map(|e| e.last_error.as_ref()) {
                s.push_str(&format!("; an emitter's last error: {e}"));
            }
        }
        Err(e) => s.push_str(&format!("; its status: {e}")),
    }
    s.push_str(&format!("\n    `weir run`'s log ends: {}", b.weir.log_tail(5)));
    s
}

/// A ceiling's bodies: the backlog's events enveloped under `name`, `batch` per body, as the
/// webhook sink makes them (one envelope with its id, or `{"subscription", "events"}` with the
/// id `<name>:<first>-<last>`).
fn bodies(events: &[Event], name: &str, batch: usize) -> anyhow::Result<Vec<(String, Bytes)>> {
    events
        .chunks(batch.max(1))
        .map(|chunk| {
            let (id, body) = if batch <= 1 {
                let e = &chunk[0];
                (weir_sinks::message_id(name, e.position), weir_sinks::envelope(name, e))
            } else {
                let (first, last) = (chunk[0].position, chunk[chunk.len() - 1].position);
                let events: Vec<_> = chunk.iter().map(|e| weir_sinks::envelope(name, e)).collect();
                (format!("{name}:{first}-{last}"), json!({"subscription": name, "events": events}))
            };
            Ok((id, Bytes::from(serde_json::to_vec(&body)?)))
        })
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

async fn webhook_ceiling(
    b: &Bench<'_>,
    name: &str,
    connections: usize,
    problems: &mut Vec<String>,
) -> anyhow::Result<Rate> {
    let bodies = Arc::new(bodies(b.events, name, b.args.batch_size as usize)?);
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(15))
        .build()?;
    b.receiver.take();
    let next = Arc::new(AtomicUsize::new(0));
    let cpu = Window::start(b).await?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (client, bodies, next, secrets) =
            (client.clone(), bodies.clone(), next.clone(), b.secrets.clone());
        let url = b.receiver.url.clone();
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((id, body)) = bodies.get(i) else { break };
                let ts = unix_now();
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("webhook-id", id)
                    .header("webhook-timestamp", ts.to_string())
                    .header("webhook-signature", secrets.sign(id, ts, body))
                    .body(body.clone())
                    .send()
                    .await?;
                let status = response.status();
                response.bytes().await?;
                if !status.is_success() {
                    bail!("the receiver answered {status}");
                }
            }
            anyhow::Ok(())
        });
    }
    let mut failed = None;
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.map_err(anyhow::Error::from).and_then(|r| r) {
            failed.get_or_insert(format!("a sender failed: {e:#}"));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu.stop(b, b.head).await?;
    let got = b.receiver.take();
    got.check_signatures(&format!("the ceiling `{name}`"), problems);
    Ok(Rate {
        per_second: failed.is_none().then(|| b.head as f64 / seconds),
        seconds,
        received: got.arrivals.len() as u64,
        duplicates: got.duplicates,
        first_after: None,
        failed,
        cpu,
    })
}

async fn nats_ceiling(b: &Bench<'_>, name: &str, publishers: usize) -> anyhow::Result<Rate> {
    let nats = b.nats.expect("NATS phases run with a server");
    // The sink's messages: its subject layout, its headers, the envelope as the body.
    let messages: Arc<Vec<(String, async_nats::HeaderMap, Bytes)>> = Arc::new(
        b.events
            .iter()
            .map(|e| {
                let subject = format!("bench.{name}.{}", stream_of(e));
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", weir_sinks::message_id(name, e.position));
                headers.insert("weir-subscription", name);
                headers.insert("weir-position", e.position.to_string());
                headers.insert("weir-type", weir_sinks::event_type(e));
                let body = serde_json::to_vec(&weir_sinks::envelope(name, e))?;
                Ok((subject, headers, Bytes::from(body)))
            })
            .collect::<anyhow::Result<_>>()?,
    );
    let client = async_nats::connect(&nats.url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let before = nats.stored().await?;
    let next = Arc::new(AtomicUsize::new(0));
    let cpu = Window::start(b).await?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..publishers {
        let (js, messages, next) = (js.clone(), messages.clone(), next.clone());
        tasks.spawn(async move {
            let mut in_flight = std::collections::VecDeque::with_capacity(NATS_WINDOW);
            let mut duplicates = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((subject, headers, body)) = messages.get(i) else { break };
                in_flight.push_back(
                    js.publish_with_headers(subject.clone(), headers.clone(), body.clone()).await?,
                );
                if in_flight.len() >= NATS_WINDOW {
                    let ack = in_flight.pop_front().expect("full").await?;
                    duplicates += u64::from(ack.duplicate);
                }
            }
            for ack in in_flight {
                duplicates += u64::from(ack.await?.duplicate);
            }
            anyhow::Ok(duplicates)
        });
    }
    let mut failed = None;
    let mut duplicates = 0;
    while let Some(r) = tasks.join_next().await {
        match r.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(d) => duplicates += d,
            Err(e) => {
                failed.get_or_insert(format!("a publisher failed: {e:#}"));
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu.stop(b, b.head).await?;
    client.flush().await?;
    let stored = nats.stored().await? - before;
    Ok(Rate {
        per_second: failed.is_none().then(|| b.head as f64 / seconds),
        seconds,
        received: stored,
        duplicates,
        first_after: None,
        failed,
        cpu,
    })
}

// ---------------------------------------------------------------------------------------------
// Phase 2: commit → receiver latency

/// When each id first arrived (the receiver's or the NATS consumer's clock).
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

#[derive(Debug)]
struct Latency {
    /// Arrival − commit, when events arrived.
    p: Option<Percentiles>,
    /// The reference: the append's `NOTIFY weir_events` − commit (the event is in the log).
    logged: Option<Percentiles>,
    expected: usize,
    missing: usize,
    achieved_rate: f64,
    late_writes: usize,
    failed: Option<String>,
    cpu: String,
}

async fn latency(
    b: &Bench<'_>,
    sink: SinkKind,
    problems: &mut Vec<String>,
) -> anyhow::Result<Latency> {
    let args = b.args;
    let (sub, prefix) = match sink {
        SinkKind::Webhook => ("whlat", "lw-"),
        SinkKind::Nats => ("ntlat", "ln-"),
    };
    println!(
        "== {} latency: {} appends/s for {} s, a subscription of pool size {} ==",
        sink.label(),
        thousands(args.rate as f64),
        args.latency_seconds,
        args.latency_pool_size
    );
    // Where arrivals are stamped: the receiver, or a JetStream consumer on a thread of its own.
    let mut consumer = None;
    let sink_def = match sink {
        SinkKind::Webhook => {
            b.receiver.take();
            Sink::Webhook(WebhookSink {
                batch_size: args.batch_size,
                ..WebhookSink::new(&b.receiver.url, SECRET_ENV)
            })
        }
        SinkKind::Nats => {
            let nats = b.nats.expect("NATS phases run with a server");
            consumer = Some(NatsStamps::start(&nats.url, &format!("bench.{sub}.>")).await?);
            Sink::Nats(NatsSink {
                url: nats.url.clone(),
                subject: NATS_SUBJECT.into(),
                stream: NATS_STREAM.into(),
                max_in_flight: NATS_WINDOW as u32,
                ..NatsSink::new()
            })
        }
    };
    let arrived = |id: &str| -> Option<Instant> {
        match &consumer {
            Some(c) => c.arrivals.lock().expect("arrivals").get(id).copied(),
            None => b.receiver.arrival(id),
        }
    };
    let count = || -> usize {
        match &consumer {
            Some(c) => c.arrivals.lock().expect("arrivals").len(),
            None => b.receiver.distinct() as usize,
        }
    };
    let def = SubscriptionDef::new(sub, SubscriptionKind::Stream, json!(format!("{prefix}*")))
        .pool_size(args.latency_pool_size)
        .start_from(StartAt::Now)
        .sink(sink_def);
    subscriptions::create(b.pool, &def).await?;

    // A probe: the child has picked the subscription up and the path works.
    let mut conn = PgConnection::connect(b.db_url).await?;
    let _: Vec<(uuid::Uuid, i64)> = sqlx::query_as(APPEND_SQL)
        .bind(format!("{prefix}probe"))
        .bind("no_stream")
        .bind(json!([{"type": "bench.probe", "data": {}}]))
        .fetch_all(&mut conn)
        .await?;
    conn.close().await?;
    let t = Instant::now();
    while count() == 0 {
        if t.elapsed() > Duration::from_secs(b.args.stall_seconds) {
            let w = watermark(b.pool, sub).await?;
            let why =
                stuck(b, sub, "the probe event never arrived", (w, head(b.pool).await?), 0).await;
            println!("  {why}");
            println!();
            subscriptions::delete(b.pool, sub).await?;
            if let Some(c) = consumer {
                c.stop().await;
            }
            return Ok(Latency {
                p: None,
                logged: None,
                expected: 0,
                missing: 0,
                achieved_rate: 0.0,
                late_writes: 0,
                failed: Some(why),
                cpu: String::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("  probe arrived {:.0} ms after its commit", t.elapsed().as_secs_f64() * 1000.0);

    let listener = Logged::start(b.db_url).await?;
    let cpu = Window::start(b).await?;
    let writes = appends(b.db_url, prefix, args.rate, args.latency_seconds, args.writers)
        .await
        .context("the writers stopped")??;
    let cpu = cpu.stop(b, (args.rate * args.latency_seconds) as i64).await?;
    let last = head(b.pool).await?;
    let t = Instant::now();
    let mut failed = None;
    while watermark(b.pool, sub).await? < last {
        if t.elapsed() > Duration::from_secs(b.args.stall_seconds) {
            let w = watermark(b.pool, sub).await?;
            failed = Some(stuck(b, sub, "not all delivered", (w, last), count() as u64).await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Positions of the appended events, for their ids.
    let positions: Vec<(i64, String, i64)> = sqlx::query_as(
        "select position, new_record->>'stream', (new_record->>'version')::bigint
         from weir.events where entity = $1 and new_record->>'stream' like $2",
    )
    .bind(Event::STREAM_EVENTS)
    .bind(format!("{prefix}%"))
    .fetch_all(b.pool)
    .await?;
    let position: HashMap<(String, i64), i64> =
        positions.into_iter().map(|(p, s, v)| ((s, v), p)).collect();
    let notes = listener.stop().await?;
    let mut ms = Vec::with_capacity(writes.commits.len());
    let mut logged_ms = Vec::with_capacity(writes.commits.len());
    let mut missing = 0;
    for (key, committed) in &writes.commits {
        let Some(&p) = position.get(key) else {
            missing += 1;
            continue;
        };
        match arrived(&weir_sinks::message_id(sub, p)) {
            Some(at) => ms.push(signed_ms(at, *committed)),
            None => missing += 1,
        }
        if let Some(at) = logged_at(&notes, p) {
            logged_ms.push(signed_ms(at, *committed));
        }
    }
    subscriptions::delete(b.pool, sub).await?;
    if let Some(c) = consumer {
        c.stop().await;
    } else {
        b.receiver.take().check_signatures(&format!("weir's webhook `{sub}`"), problems);
    }
    let l = Latency {
        p: Percentiles::of(ms),
        logged: Percentiles::of(logged_ms),
        expected: writes.commits.len(),
        missing,
        achieved_rate: writes.achieved_rate,
        late_writes: writes.late,
        failed,
        cpu,
    };
    match &l.p {
        Some(p) => println!(
            "  commit → {} over {} events: p50 {:.2} ms ({}), p90 {:.2} ms, p99 {:.2} ms, max \
             {:.2} ms (min {:.2} ms)",
            match sink {
                SinkKind::Webhook => "receiver",
                SinkKind::Nats => "JetStream consumer",
            },
            thousands(p.count as f64),
            p.p50,
            verdict(p.p50 <= TARGET_P50_MS),
            p.p90,
            p.p99,
            p.max,
            p.min
        ),
        None => println!("  no event arrived"),
    }
    if let Some(p) = &l.logged {
        println!(
            "  reference commit → logged (the append's NOTIFY weir_events): p50 {:.2} ms, p90 \
             {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            p.p50, p.p90, p.p99, p.max
        );
    }
    println!(
        "  writes: {} appends/s achieved ({} late by over 10 ms); {} of {} events never arrived",
        thousands(l.achieved_rate),
        thousands(l.late_writes as f64),
        thousands(l.missing as f64),
        thousands(l.expected as f64)
    );
    if let Some(why) = &l.failed {
        println!("  {why}");
    }
    println!("  cpu: {}", l.cpu);
    println!();
    Ok(l)
}

/// `at − committed` in milliseconds, negative when the arrival was stamped first (the
/// writer's thread waited for a CPU before it recorded its commit).
fn signed_ms(at: Instant, committed: Instant) -> f64 {
    match at.checked_duration_since(committed) {
        Some(d) => d.as_secs_f64() * 1000.0,
        None => -(committed.duration_since(at).as_secs_f64() * 1000.0),
    }
}

/// The latency phase's writes: the commit instant of each (stream, version) after the first
/// second.
#[derive(Debug)]
struct Writes {
    commits: Vec<((String, i64), Instant)>,
    achieved_rate: f64,
    late: usize,
}

/// `rate` appends of one event per second for `seconds` through `writers` connections on a
/// thread of their own: append i is due at start + i / rate, writer w takes i ≡ w (mod
/// writers), each to its own stream `<prefix><w>` with exact expected versions.
fn appends(
    url: &str,
    prefix: &str,
    rate: u64,
    seconds: u64,
    writers: usize,
) -> tokio::sync::oneshot::Receiver<anyhow::Result<Writes>> {
    let (url, prefix) = (url.to_string(), prefix.to_string());
    on_own_thread("bench-writers", move || async move {
        let mut conns = Vec::new();
        for _ in 0..writers {
            conns.push(PgConnection::connect(&url).await?);
        }
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let warm = start.into_std() + Duration::from_secs(1);
        let count = (rate * seconds) as usize;
        let mut tasks = Vec::new();
        for (w, mut conn) in conns.into_iter().enumerate() {
            let stream = format!("{prefix}{w}");
            tasks.push(tokio::spawn(async move {
                let mut done = Vec::with_capacity(count / writers + 1);
                let (mut late, mut version) = (0usize, 0i64);
                let mut i = w;
                while i < count {
                    let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    let now = tokio::time::Instant::now();
                    if now < due {
                        tokio::time::sleep_until(due).await;
                    } else if now - due > Duration::from_millis(10) {
                        late += 1;
                    }
                    let expected =
                        if version == 0 { "no_stream".to_string() } else { version.to_string() };
                    let _: Vec<(uuid::Uuid, i64)> = sqlx::query_as(APPEND_SQL)
                        .bind(&stream)
                        .bind(expected)
                        .bind(json!([{"type": "bench.appended", "data": {"n": i}}]))
                        .fetch_all(&mut conn)
                        .await?;
                    let at = Instant::now();
                    version += 1;
                    if at > warm {
                        done.push(((stream.clone(), version), at));
                    }
                    i += writers;
                }
                conn.close().await?;
                anyhow::Ok((done, late))
            }));
        }
        let mut commits = Vec::with_capacity(count);
        let mut late = 0;
        for t in tasks {
            let (done, l) = t.await??;
            commits.extend(done);
            late += l;
        }
        let elapsed = start.elapsed().as_secs_f64();
        Ok(Writes { commits, achieved_rate: count as f64 / elapsed.max(1e-9), late })
    })
}

/// The reference of the latency phases: every append's `NOTIFY weir_events` (its payload the
/// append's last position) with the instant it arrived, on a thread of its own — when an event
/// became visible in the log, the floor any delivery builds on.
#[derive(Debug)]
struct Logged {
    cancel: CancellationToken,
    done: tokio::sync::oneshot::Receiver<anyhow::Result<Vec<(i64, Instant)>>>,
}

impl Logged {
    async fn start(url: &str) -> anyhow::Result<Self> {
        let cancel = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let done = on_own_thread("bench-listener", {
            let (url, cancel) = (url.to_string(), cancel.clone());
            move || async move {
                let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
                listener.listen(weir_log::NOTIFY_CHANNEL).await?;
                let _ = ready_tx.send(());
                let mut notes = Vec::new();
                loop {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => break,
                        n = listener.recv() => {
                            let at = Instant::now();
                            if let Ok(p) = n?.payload().parse::<i64>() {
                                notes.push((p, at));
                            }
                        }
                    }
                }
                Ok(notes)
            }
        });
        ready_rx.await.context("the LISTEN weir_events connection did not start")?;
        Ok(Self { cancel, done })
    }

    /// The notifications, in the order they arrived.
    async fn stop(self) -> anyhow::Result<Vec<(i64, Instant)>> {
        self.cancel.cancel();
        self.done.await.context("the listener's thread ended")?
    }
}

/// When the event at `position` was logged: the first notification at or past it.
fn logged_at(notes: &[(i64, Instant)], position: i64) -> Option<Instant> {
    let i = notes.partition_point(|(p, _)| *p < position);
    notes.get(i).map(|(_, at)| *at)
}

// ---------------------------------------------------------------------------------------------
// The webhook receiver

/// What the receiver saw since it was last taken.
#[derive(Debug, Default)]
struct Received {
    requests: u64,
    /// Events of the bodies (duplicates included).
    events: u64,
    duplicates: u64,
    /// Bodies that were neither an envelope nor `{"events": [...]}`.
    unparsed: u64,
    first: Option<Instant>,
    /// Each envelope id, with when it first arrived.
    arrivals: HashMap<String, Instant>,
    verified: u64,
    /// Signatures that did not verify, and the first reason.
    bad_signatures: u64,
    first_bad: Option<String>,
}

impl Received {
    /// Records a problem when a signature did not verify or a body was not understood.
    fn check_signatures(&self, whose: &str, problems: &mut Vec<String>) {
        if self.bad_signatures > 0 {
            let p = format!(
                "{whose}: {} of {} sampled signatures did not verify ({})",
                self.bad_signatures,
                self.bad_signatures + self.verified,
                self.first_bad.as_deref().unwrap_or("?")
            );
            println!("  WARNING: {p}");
            problems.push(p);
        }
        if self.unparsed > 0 {
            let p = format!("{whose}: {} request bodies were not envelopes", self.unparsed);
            println!("  WARNING: {p}");
            problems.push(p);
        }
    }
}

/// An HTTP server on 127.0.0.1 on a thread of its own (its clock not delayed by this
/// process's other work).
#[derive(Debug)]
struct Receiver {
    url: String,
    state: Arc<Mutex<Received>>,
    cancel: CancellationToken,
    done: tokio::sync::oneshot::Receiver<anyhow::Result<()>>,
}

#[derive(Debug)]
struct ReceiverShared {
    state: Arc<Mutex<Received>>,
    secrets: Secrets,
}

impl Receiver {
    fn start(secrets: Secrets) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let state = Arc::new(Mutex::new(Received::default()));
        let cancel = CancellationToken::new();
        let shared = Arc::new(ReceiverShared { state: state.clone(), secrets });
        let done = on_own_thread("bench-receiver", {
            let cancel = cancel.clone();
            move || async move {
                use axum::serve::ListenerExt;
                let listener = tokio::net::TcpListener::from_std(listener)?.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                let app = axum::Router::new()
                    .route("/hook", axum::routing::post(receive))
                    .with_state(shared);
                tokio::select! {
                    r = axum::serve(listener, app).into_future() => r?,
                    _ = cancel.cancelled() => {}
                }
                Ok(())
            }
        });
        Ok(Self { url, state, cancel, done })
    }

    /// What it saw since the last take, and a fresh start.
    fn take(&self) -> Received {
        std::mem::take(&mut *self.state.lock().expect("receiver state"))
    }

    fn distinct(&self) -> u64 {
        self.state.lock().expect("receiver state").arrivals.len() as u64
    }

    fn arrival(&self, id: &str) -> Option<Instant> {
        self.state.lock().expect("receiver state").arrivals.get(id).copied()
    }

    async fn stop(self) {
        self.cancel.cancel();
        if let Ok(Err(e)) = self.done.await {
            println!("  note: the receiver stopped with an error: {e:#}");
        }
    }
}

async fn receive(
    axum::extract::State(shared): axum::extract::State<Arc<ReceiverShared>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::http::StatusCode {
    let at = Instant::now();
    let ids = ids_of(&body);
    let verify = {
        let mut s = shared.state.lock().expect("receiver state");
        s.requests += 1;
        s.first.get_or_insert(at);
        match ids {
            Some(ids) => {
                for id in ids {
                    s.events += 1;
                    match s.arrivals.entry(id) {
                        Entry::Occupied(_) => s.duplicates += 1,
                        Entry::Vacant(v) => {
                            v.insert(at);
                        }
                    }
                }
            }
            None => s.unparsed += 1,
        }
        s.verified + s.bad_signatures < VERIFY_SAMPLE
    };
    if verify {
        let checked = check_signature(&shared.secrets, &headers, &body);
        let mut s = shared.state.lock().expect("receiver state");
        match checked {
            Ok(()) => s.verified += 1,
            Err(e) => {
                s.bad_signatures += 1;
                s.first_bad.get_or_insert(e);
            }
        }
    }
    axum::http::StatusCode::OK
}

/// A request's Standard Webhooks signature, checked as a receiver does.
fn check_signature(
    secrets: &Secrets,
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    let header = |name: &str| {
        headers.get(name).and_then(|v| v.to_str().ok()).ok_or_else(|| format!("no {name} header"))
    };
    let id = header("webhook-id")?;
    let ts = header("webhook-timestamp")?;
    let ts: i64 = ts.parse().map_err(|_| format!("webhook-timestamp `{ts}` is not a number"))?;
    let signature = header("webhook-signature")?;
    secrets.verify(id, ts, body, signature, unix_now()).map(drop).map_err(|e| e.to_string())
}

/// The envelope ids of a body: one envelope, or a batch `{"events": [envelope, ...]}`.
fn ids_of(body: &[u8]) -> Option<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Body {
        id: Option<String>,
        events: Option<Vec<Item>>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        id: String,
    }
    let b: Body = serde_json::from_slice(body).ok()?;
    match (b.events, b.id) {
        (Some(events), _) => Some(events.into_iter().map(|i| i.id).collect()),
        (None, Some(id)) => Some(vec![id]),
        (None, None) => None,
    }
}

// ---------------------------------------------------------------------------------------------
// NATS: the server, the stream, a consumer stamping arrivals

/// The NATS server of the run: started here (killed when dropped) or `--nats-url`'s.
#[derive(Debug)]
struct NatsServer {
    url: String,
    version: String,
    child: Option<Child>,
    js: async_nats::jetstream::Context,
}

impl NatsServer {
    /// Starts (or reaches) the server and creates the stream afresh.
    async fn start(args: &Args, dir: &Path) -> anyhow::Result<Self> {
        let (url, mut child) = match &args.nats_url {
            Some(url) => (url.clone(), None),
            None => {
                let bin = nats_binary(args.nats_server.as_deref())?;
                let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
                let store = dir.join("nats");
                let log = std::fs::File::create(dir.join("nats-server.log"))?;
                let child = Command::new(&bin)
                    .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
                    .arg(&store)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .with_context(|| format!("starting {}", bin.display()))?;
                (format!("nats://127.0.0.1:{port}"), Some(child))
            }
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        let client = loop {
            if let Some(c) = child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                let log = std::fs::read_to_string(dir.join("nats-server.log")).unwrap_or_default();
                bail!("nats-server exited ({status}): {}", log.trim());
            }
            match async_nats::connect(&url).await {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => {
                    bail!("cannot connect to {url} within 15 s: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let version = client.server_info().version;
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(NATS_STREAM).await;
        js.create_stream(async_nats::jetstream::stream::Config {
            name: NATS_STREAM.into(),
            subjects: vec!["bench.>".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the JetStream stream {NATS_STREAM} at {url}"))?;
        Ok(Self { url, version, child, js })
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Messages the stream holds.
    async fn stored(&self) -> anyhow::Result<u64> {
        let mut stream = self.js.get_stream(NATS_STREAM).await?;
        Ok(stream.info().await?.state.messages)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `--nats-server`, else /usr/sbin/nats-server, else `nats-server` on PATH.
fn nats_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let mut candidates = vec![PathBuf::from("/usr/sbin/nats-server")];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow::anyhow!(
            "no nats-server binary (not at /usr/sbin/nats-server nor on PATH); install it, or \
             pass --nats-server <binary> or --nats-url nats://host:4222"
        )
    })
}

/// A JetStream ordered consumer of one filter on a thread of its own, stamping when each
/// `Nats-Msg-Id` first arrives.
#[derive(Debug)]
struct NatsStamps {
    arrivals: Arrivals,
    cancel: CancellationToken,
    done: tokio::sync::oneshot::Receiver<anyhow::Result<()>>,
}

impl NatsStamps {
    async fn start(url: &str, filter: &str) -> anyhow::Result<Self> {
        use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        let arrivals: Arrivals = Arc::default();
        let cancel = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let done = on_own_thread("bench-nats-consumer", {
            let (url, filter) = (url.to_string(), filter.to_string());
            let (arrivals, cancel) = (arrivals.clone(), cancel.clone());
            move || async move {
                let client = async_nats::connect(&url).await?;
                let js = async_nats::jetstream::new(client);
                let stream = js.get_stream(NATS_STREAM).await?;
                let consumer = stream
                    .create_consumer(OrderedConfig {
                        filter_subject: filter,
                        deliver_policy: DeliverPolicy::New,
                        ..Default::default()
                    })
                    .await?;
                let mut messages = consumer.messages().await?;
                let _ = ready_tx.send(());
                loop {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => break,
                        m = messages.next() => {
                            let at = Instant::now();
                            let Some(m) = m else { break };
                            let m = m?;
                            if let Some(id) = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
                                arrivals
                                    .lock()
                                    .expect("arrivals")
                                    .entry(id.as_str().to_string())
                                    .or_insert(at);
                            }
                        }
                    }
                }
                anyhow::Ok(())
            }
        });
        if ready_rx.await.is_err() {
            let why = match done.await {
                Ok(Err(e)) => format!("{e:#}"),
                _ => "it stopped".into(),
            };
            bail!("the JetStream consumer did not start: {why}");
        }
        Ok(Self { arrivals, cancel, done })
    }

    async fn stop(self) {
        self.cancel.cancel();
        if let Ok(Err(e)) = self.done.await {
            println!("  note: the JetStream consumer stopped with an error: {e:#}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The `weir run` child

/// `weir run` as this executable's hidden `weir` command, with the webhook secret in its
/// environment and a `weir.toml` of its own; killed when dropped.
#[derive(Debug)]
struct WeirChild {
    child: Mutex<Child>,
    pid: u32,
    log: PathBuf,
}

impl WeirChild {
    fn start(
        dir: &Path,
        db_url: &str,
        slot: &str,
        pool_size: u32,
        secret: &str,
    ) -> anyhow::Result<Self> {
        let toml = dir.join("weir.toml");
        // JSON strings are TOML basic strings.
        let q = |s: &str| serde_json::to_string(s).expect("a string");
        std::fs::write(
            &toml,
            format!(
                "[database]\nurl = {}\npool_size = {pool_size}\n\n[source]\nslot = {}\n\
                 tables = [\"unrelated\"]\n\n[http]\nenabled = false\n",
                q(db_url),
                q(slot)
            ),
        )?;
        let log = dir.join("weir-run.log");
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(std::env::current_exe().context("finding this executable")?);
        cmd.arg(crate::WEIR_COMMAND)
            .arg("--config")
            .arg(&toml)
            .arg("run")
            .current_dir(dir)
            .env_remove("DATABASE_URL");
        // Only this benchmark's settings: no stray file, token or fault injection.
        for (k, _) in std::env::vars() {
            if k.starts_with("WEIR_") && k != "WEIR_PG_BIN" {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .env(SECRET_ENV, secret)
            .env("WEIR_LOG", "info,sqlx=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting `weir run`")?;
        Ok(Self { pid: child.id(), child: Mutex::new(child), log })
    }

    /// Its exit status, once it has exited.
    fn exited(&self) -> Option<ExitStatus> {
        self.child.lock().expect("child").try_wait().ok().flatten()
    }

    /// Its log's last `lines` lines, each cut at 240 characters.
    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<String> = text.lines().map(|l| l.chars().take(240).collect()).collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n      ");
        if tail.is_empty() { "(empty)".into() } else { format!("\n      {tail}") }
    }

    /// SIGTERM, then SIGKILL after 10 s.
    async fn stop(self) {
        let _ = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("  note: `weir run` did not stop within 10 s of SIGTERM; killed");
    }
}

impl Drop for WeirChild {
    fn drop(&mut self) {
        let child = self.child.get_mut().expect("child");
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Summary

#[derive(Debug, Default)]
struct Report {
    throughput: Vec<ThroughputRow>,
    latency: Vec<(SinkKind, Latency)>,
    /// Broken signatures, bodies not understood: the command fails after printing.
    problems: Vec<String>,
}

impl Report {
    fn print(&self, args: &Args, cpus: usize) {
        println!(
            "== summary ({cpus} CPUs shared by weir run, PostgreSQL, nats-server and this process) =="
        );
        if !self.throughput.is_empty() {
            println!(
                "  | sink | pool size | weir | ceiling (plain client) | weir / ceiling (target ≥ 0.7×) |"
            );
            println!("  |---|---|---|---|---|");
            let rate = |r: &Rate| {
                r.per_second.map_or("did not finish".into(), |x| format!("{} ev/s", thousands(x)))
            };
            for row in &self.throughput {
                let r = match (row.weir.per_second, row.ceiling.per_second) {
                    (Some(w), Some(c)) => {
                        format!("{} ({})", ratio(w / c), verdict(w / c >= TARGET_CEILING_RATIO))
                    }
                    _ => "—".into(),
                };
                println!(
                    "  | {} | {} | {} | {} | {r} |",
                    row.sink.label(),
                    row.pool,
                    rate(&row.weir),
                    rate(&row.ceiling)
                );
            }
        }
        if !self.latency.is_empty() {
            println!();
            println!(
                "  | commit → receiver at {} events/s | p50 (target ≤ {TARGET_P50_MS} ms) | p90 | \
                 p99 | max | reference commit → logged p50 / p99 |",
                thousands(args.rate as f64)
            );
            println!("  |---|---|---|---|---|---|");
            for (sink, l) in &self.latency {
                match &l.p {
                    Some(p) => println!(
                        "  | {}, pool size {} | {:.2} ms ({}) | {:.2} ms | {:.2} ms | {:.2} ms | {} |",
                        sink.label(),
                        args.latency_pool_size,
                        p.p50,
                        verdict(p.p50 <= TARGET_P50_MS),
                        p.p90,
                        p.p99,
                        p.max,
                        l.logged
                            .map_or("—".into(), |r| format!("{:.2} / {:.2} ms", r.p50, r.p99))
                    ),
                    None => println!(
                        "  | {}, pool size {} | not measured | — | — | — | — |",
                        sink.label(),
                        args.latency_pool_size
                    ),
                }
            }
        }
        for p in &self.problems {
            println!("  FAILED: {p}");
        }
        println!();
    }

    /// The summary's ratios and targets, for `weir-bench all`'s table. A latency's ratio is
    /// the reference's p50 / weir's (higher is better).
    fn record(&self, args: &Args) {
        for row in &self.throughput {
            let rate = |r: &Rate| r.per_second.map(|x| format!("{}/s", thousands(x)));
            let client = match row.sink {
                SinkKind::Webhook => format!("reqwest × {}", row.pool),
                SinkKind::Nats => format!("async-nats × {}", row.pool),
            };
            let ratio = row.weir.per_second.zip(row.ceiling.per_second).map(|(w, c)| w / c);
            report::record(Row {
                benchmark: "sinks",
                figure: format!("{}, pool size {}, events/s", row.sink.label(), row.pool),
                measured: rate(&row.weir).unwrap_or_else(|| "did not finish".into()),
                reference: format!(
                    "{} ({client})",
                    rate(&row.ceiling).unwrap_or_else(|| "did not finish".into())
                ),
                ratio,
                target: Some(format!("≥ {TARGET_CEILING_RATIO:.2}x")),
                met: match row.weir.per_second {
                    None => Some(false),
                    Some(_) => ratio.map(|x| x >= TARGET_CEILING_RATIO),
                },
            });
        }
        for (sink, l) in &self.latency {
            report::record(Row {
                benchmark: "sinks",
                figure: format!(
                    "{}, pool size {}: commit → receiver p50 at {}/s",
                    sink.label(),
                    args.latency_pool_size,
                    thousands(args.rate as f64)
                ),
                measured: l.p.map_or("not measured".into(), |p| format!("{:.2} ms", p.p50)),
                reference: l
                    .logged
                    .map_or(String::new(), |r| format!("{:.2} ms (commit → logged p50)", r.p50)),
                ratio: l.p.zip(l.logged).filter(|(p, _)| p.p50 > 0.0).map(|(p, r)| r.p50 / p.p50),
                target: Some(format!("≤ {TARGET_P50_MS} ms")),
                met: Some(l.p.is_some_and(|p| p.p50 <= TARGET_P50_MS)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_single_and_batch_bodies() {
        assert_eq!(
            ids_of(br#"{"id":"s:1","subscription":"s","event":{"id":"x"}}"#),
            Some(vec!["s:1".to_string()])
        );
        assert_eq!(
            ids_of(br#"{"events":[{"id":"s:1","position":1},{"id":"s:2"}]}"#),
            Some(vec!["s:1".to_string(), "s:2".to_string()])
        );
        assert_eq!(ids_of(b"not json"), None);
        assert_eq!(ids_of(br#"{"other":1}"#), None);
    }

    #[test]
    fn checks_signatures_as_a_receiver() {
        let secrets = Secrets::parse(&Secrets::generate()).unwrap();
        let body = br#"{"id":"s:1"}"#;
        let ts = unix_now();
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("webhook-id", "s:1".parse().unwrap());
        headers.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        headers.insert("webhook-signature", secrets.sign("s:1", ts, body).parse().unwrap());
        assert_eq!(check_signature(&secrets, &headers, body), Ok(()));
        assert!(check_signature(&secrets, &headers, b"{}").is_err());
        headers.remove("webhook-signature");
        assert!(
            check_signature(&secrets, &headers, body).unwrap_err().contains("no webhook-signature")
        );
    }

    #[test]
    fn an_event_is_logged_by_the_first_notification_past_it() {
        let t = Instant::now();
        let notes: Vec<(i64, Instant)> =
            (1..=3u64).map(|i| (i as i64 * 10, t + Duration::from_millis(i))).collect();
        assert_eq!(logged_at(&notes, 5), Some(notes[0].1));
        assert_eq!(logged_at(&notes, 10), Some(notes[0].1));
        assert_eq!(logged_at(&notes, 11), Some(notes[1].1));
        assert_eq!(logged_at(&notes, 31), None);
    }

    #[test]
    fn signed_latencies() {
        let a = Instant::now();
        let b = a + Duration::from_millis(3);
        assert!((signed_ms(b, a) - 3.0).abs() < 1e-9);
        assert!((signed_ms(a, b) + 3.0).abs() < 1e-9);
    }
}
