//! `weir-bench http`: the HTTP API under a fixed request rate. How long do `GET
//! /v1/process/check` and a page of `GET /v1/log` take at 2,000 requests/s, how many fail, and
//! does a crowd of slowloris clients (request heads trickled a byte at a time) change that?
//!
//! Setup: a private cluster (`fsync=on`) unless `--url` names a server. A table `posts(id int
//! primary key, n bigint, updated_at timestamptz)`, `weir init`, one `weir run` as a
//! **separate process** (this executable's hidden `weir` command, as in `fanout`), then
//! `--events` (10,000) inserts logged, and the LSN of the last logged event as a process-status
//! token (already processed: `weir run` has no operator, so a write is processed once logged).
//!
//! The load generator (this process, on the same machine) is **open-loop**: request `i` is due
//! at `start + i / --rate`, whatever happened to the ones before. `--connections` (50) workers
//! each keep one HTTP/1.1 connection alive (reqwest, one pool each); a free worker takes the
//! next request and, if it is not yet due, waits until it is. **Latency = the response's last
//! byte − the instant the request was due**, not − the instant it was sent: when the server
//! (or the generator) falls behind, the requests that wait for a free connection count their
//! wait, so a stall is not hidden by the requests it kept from being sent (coordinated
//! omission). The due instants are kept by tokio's timer, to the millisecond: a figure
//! includes up to about 1 ms of the generator's own timer granularity, as the floor does.
//!
//! Phases, each `--warmup-seconds` (1) unmeasured then `--seconds` (10) measured at `--rate`:
//!
//! - `floor`: `GET /v1/health`, which does no database work: the floor of the HTTP stack
//!   (the generator, the loopback, hyper, axum and weir's layers), the **reference** of the
//!   others;
//! - `check`: `GET /v1/process/check?lsn=<token>`, one process-status query each;
//! - `log`: `GET /v1/log?after=<a>&limit=100`, a page of 100 events, `a` spread over the log;
//! - `slowloris`: `check` again while `--slowloris` (500) connections each send a request head
//!   one byte every 500 ms and connect again when the server closes them (at its
//!   `http.header_timeout`, 10 s by default): the p99 against `check`'s, without them.
//!
//! Printed per phase: the rate achieved, p50, p90, p99 and max latency, errors (answers other
//! than 2xx, and connection errors), p99 / the floor's p99, and where the CPU went (the `weir
//! run` process, PostgreSQL, this process: the generator shares the machine's CPUs with the
//! server and the database, so on a small machine its figures include their scheduling).
//!
//! Targets (printed beside the figures; a miss does not fail the command): p99 ≤ 50 ms at the
//! rate, the rate achieved, no error, in every phase.
//!
//! Run: `cargo run --release -p weir-bench -- http` (`--seconds 3 --events 2000 --slowloris
//! 200` for a quick run; `--phases floor,check`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::bail;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cpu::{CpuReport, CpuSampler};
use crate::fanout::{RunningWeir, WeirProcess, raise_open_files};
use crate::percentile::Percentiles;
use crate::report::{self, Row, ratio, thousands, verdict};
use crate::server::{PgServer, ServerArgs};

const TARGET_P99_MS: f64 = 50.0;
/// The page the log phase reads.
const PAGE: u64 = 100;
/// How often a slowloris connection sends its next byte.
const TRICKLE_EVERY: Duration = Duration::from_millis(500);
/// How the CPU sampler reports the `weir run` process.
const WEIR_SERVER: &str = "weir server";

/// Arguments of `weir-bench http`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Requests per second, due on a fixed schedule.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds at the rate before the measured ones in each phase (not counted).
    #[arg(long, default_value_t = 1)]
    warmup_seconds: u64,
    /// Kept-alive connections of the generator (one request in flight on each).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Events in the log the `log` phase pages through.
    #[arg(long, default_value_t = 10_000)]
    events: u64,
    /// Slowloris connections open during the `slowloris` phase.
    #[arg(long, default_value_t = 500)]
    slowloris: usize,
    /// Phases to run, in this order.
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [Phase::Floor, Phase::Check, Phase::Log, Phase::Slowloris])]
    phases: Vec<Phase>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    /// `GET /v1/health`: no database work, the reference.
    Floor,
    /// `GET /v1/process/check` with a processed token.
    Check,
    /// `GET /v1/log`, pages of 100 events.
    Log,
    /// `check` beside slowloris connections.
    Slowloris,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Floor => "GET /v1/health (floor)",
            Phase::Check => "GET /v1/process/check",
            Phase::Log => "GET /v1/log, 100 events",
            Phase::Slowloris => "process/check + slowloris",
        }
    }
}

/// `weir-bench http`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.rate == 0 || args.seconds == 0 || args.connections == 0 {
        bail!("--rate, --seconds and --connections must be at least 1");
    }
    if args.phases.is_empty() {
        bail!("--phases needs at least one of floor, check, log, slowloris");
    }
    if args.phases.contains(&Phase::Log) && args.events <= PAGE {
        bail!("--events must be more than {PAGE} for the log phase");
    }
    let slowloris = if args.phases.contains(&Phase::Slowloris) { args.slowloris } else { 0 };
    let files = raise_open_files((args.connections + slowloris + 300) as u64)?;
    let pg = PgServer::start(args.server.url.clone(), false, Vec::new(), None).await?;
    let cpus =
        pg.print_header("http", "; `weir run` as a separate process, HTTP on 127.0.0.1").await?;
    println!(
        "  load     {} requests/s open-loop over {} kept-alive HTTP/1.1 connections (reqwest, in \
         this process, sharing the {cpus} CPUs with weir and PostgreSQL); {} s warm-up + {} s \
         measured per phase; open files limit {files}",
        thousands(args.rate as f64),
        args.connections,
        args.warmup_seconds,
        args.seconds
    );
    println!();

    let name = format!("weir_bench_http_{}", std::process::id());
    let db_url = pg.create_db(&name).await?;
    let pool = PgPoolOptions::new().max_connections(2).connect(&db_url).await?;
    sqlx::raw_sql(
        "create table posts (id int primary key, n bigint not null,
                             updated_at timestamptz not null default now())",
    )
    .execute(&pool)
    .await?;
    let dir = std::env::temp_dir().join(format!("weir-bench-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let weir = WeirProcess::init(&db_url, &name, &dir, None)?;
    let probe = reqwest::Client::builder().no_proxy().build()?;
    let server = weir.start(&probe).await?;
    let result = measure(&args, &pg, &pool, &server, &probe).await;
    server.stop().await;
    pool.close().await;
    pg.drop_db(&name).await?;
    pg.admin.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(
    args: &Args,
    pg: &PgServer,
    pool: &PgPool,
    server: &RunningWeir,
    probe: &reqwest::Client,
) -> anyhow::Result<()> {
    // The log to read, and a token it has processed.
    let t = std::time::Instant::now();
    sqlx::query("insert into posts (id, n) select g, g from generate_series(1, $1) g")
        .bind(args.events as i32)
        .execute(pool)
        .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let (head, token) = loop {
        let last: Option<(i64, String)> = sqlx::query_as(
            "select position, lsn::text from weir.events order by position desc limit 1",
        )
        .fetch_optional(pool)
        .await?;
        if let Some((head, lsn)) = last.filter(|(p, _)| *p as u64 >= args.events) {
            break (head, lsn);
        }
        if std::time::Instant::now() > deadline {
            bail!("{} inserts were not logged within 120 s: {}", args.events, server.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let check = format!("{}/v1/process/check?lsn={token}", server.base);
    let status = probe.get(&check).send().await?.status();
    if status != 200 {
        bail!("GET /v1/process/check?lsn={token} (the last logged event's) answered {status}");
    }
    println!(
        "  log      {} events logged in {:.1} s; token {token} (processed)",
        thousands(head as f64),
        t.elapsed().as_secs_f64()
    );
    println!();

    let mut results: Vec<PhaseResult> = Vec::new();
    for &phase in &args.phases {
        let base = server.base.clone();
        let token = token.clone();
        let spread = (head as u64).saturating_sub(PAGE).max(1);
        let url: Arc<dyn Fn(u64) -> String + Send + Sync> = match phase {
            Phase::Floor => Arc::new(move |_| format!("{base}/v1/health")),
            Phase::Check | Phase::Slowloris => {
                Arc::new(move |_| format!("{base}/v1/process/check?lsn={token}"))
            }
            // Pages spread over the log (7919 is prime: every start in turn, not in order).
            Phase::Log => Arc::new(move |i| {
                format!("{base}/v1/log?after={}&limit={PAGE}", (i * 7919) % spread)
            }),
        };
        println!("== {} ==", phase.label());
        let crowd = if phase == Phase::Slowloris {
            let addr = server.base.trim_start_matches("http://").parse()?;
            let crowd = Crowd::start(addr, args.slowloris).await?;
            println!(
                "  {} slowloris connections open, each trickling its request head a byte every \
                 {} ms",
                thousands(args.slowloris as f64),
                TRICKLE_EVERY.as_millis()
            );
            Some(crowd)
        } else {
            None
        };
        let cpu = CpuSampler::start(pg.postmaster, |_| "PostgreSQL".into())
            .watch(WEIR_SERVER, server.pid);
        let mut r = generate(args, url).await?;
        r.phase = Some(phase);
        r.cpu = cpu.stop();
        if let Some(crowd) = crowd {
            r.crowd = Some(crowd.stop().await);
        }
        print_phase(args, &r);
        results.push(r);
    }
    print_summary(args, &results);
    record_summary(args, &results);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The open-loop generator

/// What one measured request came to.
#[derive(Debug, Default)]
struct PhaseResult {
    phase: Option<Phase>,
    /// Latencies of the 2xx answers, from the due instant, in milliseconds.
    latency: Option<Percentiles>,
    measured: usize,
    /// Measured requests answered per second: from the first one due to the last answer.
    achieved_rate: f64,
    /// Answers other than 2xx, by status.
    statuses: std::collections::BTreeMap<u16, usize>,
    /// Requests that got no answer (connection refused, reset, timed out).
    failed: usize,
    first_failure: Option<String>,
    cpu: CpuReport,
    crowd: Option<CrowdReport>,
}

impl PhaseResult {
    fn errors(&self) -> usize {
        self.statuses.values().sum::<usize>() + self.failed
    }

    fn p99(&self) -> Option<f64> {
        self.latency.map(|p| p.p99)
    }

    fn met(&self, rate: u64) -> bool {
        self.p99().is_some_and(|p| p <= TARGET_P99_MS)
            && self.errors() == 0
            && self.achieved_rate >= 0.95 * rate as f64
    }
}

enum Outcome {
    Ok,
    Status(u16),
    Failed(String),
}

/// `rate × (warm-up + seconds)` requests due on a fixed schedule, `url(i)` the i-th, over
/// `--connections` workers; the warm-up's are not counted.
async fn generate(
    args: &Args,
    url: Arc<dyn Fn(u64) -> String + Send + Sync>,
) -> anyhow::Result<PhaseResult> {
    let rate = args.rate;
    let warm = rate * args.warmup_seconds;
    let total = warm + rate * args.seconds;
    let due = move |start: Instant, i: u64| start + Duration::from_nanos(i * 1_000_000_000 / rate);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(100);
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        // A client of its own: its pool is this worker's one connection.
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(1)
            .timeout(Duration::from_secs(10))
            .build()?;
        let (next, url) = (next.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let at = due(start, i);
                tokio::time::sleep_until(at).await;
                let outcome = match client.get(url(i)).send().await {
                    Ok(r) => {
                        let status = r.status();
                        match r.bytes().await {
                            Ok(_) if status.is_success() => Outcome::Ok,
                            Ok(_) => Outcome::Status(status.as_u16()),
                            Err(e) => Outcome::Failed(format!("{:#}", anyhow::Error::from(e))),
                        }
                    }
                    Err(e) => Outcome::Failed(format!("{:#}", anyhow::Error::from(e))),
                };
                let done = Instant::now();
                if i >= warm {
                    seen.push((done - at, done, outcome));
                }
            }
            seen
        }));
    }
    let mut r = PhaseResult::default();
    let mut ms = Vec::new();
    let mut last = due(start, warm);
    for w in workers {
        for (latency, done, outcome) in w.await? {
            r.measured += 1;
            last = last.max(done);
            match outcome {
                Outcome::Ok => ms.push(latency.as_secs_f64() * 1e3),
                Outcome::Status(s) => *r.statuses.entry(s).or_default() += 1,
                Outcome::Failed(e) => {
                    r.failed += 1;
                    r.first_failure.get_or_insert(e);
                }
            }
        }
    }
    let window = (last - due(start, warm)).as_secs_f64().max(args.seconds as f64);
    r.achieved_rate = r.measured as f64 / window;
    r.latency = Percentiles::of(ms);
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Slowloris

/// Connections that trickle a request head that never ends, each connecting again when the
/// server closes it.
struct Crowd {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>,
    connected: Arc<AtomicUsize>,
    failed_connects: Arc<AtomicUsize>,
}

/// What the crowd met: how long the server held each connection it closed.
#[derive(Debug, Default)]
struct CrowdReport {
    connections: usize,
    closed: Vec<Duration>,
    failed_connects: usize,
}

impl Crowd {
    /// Opens `n` trickling connections; returns once each has sent its first byte.
    async fn start(addr: std::net::SocketAddr, n: usize) -> anyhow::Result<Crowd> {
        let stop = CancellationToken::new();
        let connected = Arc::new(AtomicUsize::new(0));
        let failed_connects = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (stop, connected, failed) =
                (stop.clone(), connected.clone(), failed_connects.clone());
            tasks.push(tokio::spawn(async move {
                let mut held = Vec::new();
                let mut counted = false;
                while !stop.is_cancelled() {
                    match trickle(addr, &stop, &connected, &mut counted).await {
                        Some(Ok(d)) => held.push(d),
                        Some(Err(_)) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        None => {}
                    }
                }
                held
            }));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while connected.load(Ordering::Relaxed) < n {
            if std::time::Instant::now() > deadline {
                bail!(
                    "only {} of {n} slowloris connections connected within 30 s",
                    connected.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Crowd { stop, tasks, connected, failed_connects })
    }

    async fn stop(self) -> CrowdReport {
        self.stop.cancel();
        let mut closed = Vec::new();
        for t in self.tasks {
            closed.extend(t.await.unwrap_or_default());
        }
        CrowdReport {
            connections: self.connected.load(Ordering::Relaxed),
            closed,
            failed_connects: self.failed_connects.load(Ordering::Relaxed),
        }
    }
}

/// One slowloris connection until the server closes it (how long it was held) or `stop` (None);
/// counts itself in `connected` once its first byte is sent, unless already `counted`.
async fn trickle(
    addr: std::net::SocketAddr,
    stop: &CancellationToken,
    connected: &AtomicUsize,
    counted: &mut bool,
) -> Option<std::io::Result<Duration>> {
    const HEAD: &[u8] = b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
    let mut stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Some(Err(e)),
    };
    let opened = Instant::now();
    let mut sent = 0usize;
    let mut tick = tokio::time::interval(TRICKLE_EVERY);
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            // Closed (0 or a reset) or answered: either way the server let go.
            _ = stream.read(&mut buf) => return Some(Ok(opened.elapsed())),
            _ = tick.tick() => {
                let byte = HEAD.get(sent).copied().unwrap_or(b'a');
                if stream.write_all(&[byte]).await.is_err() {
                    return Some(Ok(opened.elapsed()));
                }
                sent += 1;
                if !*counted {
                    *counted = true;
                    connected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Printing and the rows for `all`

fn print_phase(args: &Args, r: &PhaseResult) {
    match r.latency {
        Some(p) => println!(
            "  latency  p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} answers 2xx)",
            p.p50,
            p.p90,
            p.p99,
            p.max,
            thousands(p.count as f64)
        ),
        None => println!("  latency  no answer 2xx"),
    }
    println!(
        "  rate     {}/s achieved of {}/s ({} measured requests); errors {} (non-2xx {:?}, no \
         answer {})",
        thousands(r.achieved_rate),
        thousands(args.rate as f64),
        thousands(r.measured as f64),
        r.errors(),
        r.statuses,
        r.failed
    );
    if let Some(e) = &r.first_failure {
        println!("  first    {e}");
    }
    println!("  cpu      {}", cpu_line(&r.cpu));
    if let Some(c) = &r.crowd {
        let mut held = c.closed.clone();
        held.sort();
        let median = held.get(held.len() / 2).map_or("-".into(), |d| format!("{d:.1?}"));
        println!(
            "  crowd    {} connections; {} closed by the server meanwhile (held {median} at the \
             median: its http.header_timeout) and opened again; {} connects failed",
            thousands(c.connections as f64),
            thousands(c.closed.len() as f64),
            c.failed_connects
        );
    }
    println!();
}

/// CPU over a phase in % of one core: the `weir run` process, PostgreSQL, this process, and
/// every other process on the machine.
fn cpu_shares(c: &CpuReport) -> (f64, f64, f64, f64) {
    let pct = |s: f64| 100.0 * s / c.wall.max(1e-9);
    let (server, pg, ours) =
        (pct(c.watched(WEIR_SERVER)), pct(c.server_total()), pct(c.this_process));
    (server, pg, ours, (pct(c.machine) - server - pg - ours).max(0.0))
}

fn cpu_line(c: &CpuReport) -> String {
    let (server, pg, ours, others) = cpu_shares(c);
    format!(
        "weir server {server:.0}%, {}, generator (this process) {ours:.0}%, other processes \
         {others:.0}% (of one core)",
        if c.local { format!("PostgreSQL {pg:.0}%") } else { "PostgreSQL not local".into() }
    )
}

fn floor_p99(results: &[PhaseResult]) -> Option<f64> {
    results.iter().find(|r| r.phase == Some(Phase::Floor)).and_then(PhaseResult::p99)
}

fn check_p99(results: &[PhaseResult]) -> Option<f64> {
    results.iter().find(|r| r.phase == Some(Phase::Check)).and_then(PhaseResult::p99)
}

fn print_summary(args: &Args, results: &[PhaseResult]) {
    println!(
        "== summary: {} requests/s open-loop, {} connections, {} s measured per phase ==",
        thousands(args.rate as f64),
        args.connections,
        args.seconds
    );
    println!(
        "  {:<28}{:>12}{:>10}{:>10}{:>10}{:>8}{:>14}  verdict (p99 ≤ {TARGET_P99_MS} ms, 0 errors)",
        "", "achieved/s", "p50 ms", "p99 ms", "max ms", "errors", "p99 / floor"
    );
    let floor = floor_p99(results);
    for r in results {
        let p =
            |f: fn(&Percentiles) -> f64| r.latency.map_or("-".into(), |p| format!("{:.2}", f(&p)));
        let over_floor = match (r.p99(), floor) {
            (Some(m), Some(f)) if f > 0.0 => ratio(m / f),
            _ => "-".into(),
        };
        println!(
            "  {:<28}{:>12}{:>10}{:>10}{:>10}{:>8}{:>14}  {}",
            r.phase.map_or("", Phase::label),
            thousands(r.achieved_rate),
            p(|p| p.p50),
            p(|p| p.p99),
            p(|p| p.max),
            r.errors(),
            over_floor,
            verdict(r.met(args.rate))
        );
    }
    if let (Some(with), Some(without)) = (
        results.iter().find(|r| r.phase == Some(Phase::Slowloris)).and_then(PhaseResult::p99),
        check_p99(results),
    ) {
        println!(
            "  process/check p99 with {} slowloris connections {with:.2} ms, without {without:.2} \
             ms (with / without: {})",
            thousands(args.slowloris as f64),
            ratio(with / without.max(1e-9))
        );
    }
    println!(
        "  (latency from the instant each request was due, to its answer's last byte; the \
         generator runs in this process on the same machine)"
    );
    let capacity = 100.0 * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    for r in results {
        let others = cpu_shares(&r.cpu).3;
        if others >= 0.1 * capacity {
            println!(
                "  note: other processes used {others:.0}% CPU during `{}`: the machine was \
                 shared (they also take what a phase leaves idle; figures are pessimistic)",
                r.phase.map_or("", Phase::label)
            );
        }
    }
    if results.iter().any(|r| r.achieved_rate < 0.95 * args.rate as f64) {
        println!(
            "  note: a phase fell behind {}/s: its latencies are queueing behind the saturated \
             part (see its CPU line); --rate lower shows the latency below saturation",
            thousands(args.rate as f64)
        );
    }
    println!();
}

/// Per phase: the p99 against the floor's (ratio reference / measured: higher is better; for
/// `slowloris`, against `check`'s without the crowd), the target p99 ≤ 50 ms with the rate
/// achieved and no error.
fn record_summary(args: &Args, results: &[PhaseResult]) {
    let floor = floor_p99(results);
    let check = check_p99(results);
    for r in results {
        let Some(phase) = r.phase else { continue };
        let (reference, against) = match phase {
            Phase::Floor => (None, ""),
            Phase::Slowloris => (check, "process/check p99 without them"),
            Phase::Check | Phase::Log => (floor, "GET /v1/health p99"),
        };
        let figure = match phase {
            Phase::Slowloris => format!(
                "GET /v1/process/check beside {} slowloris connections, p99",
                thousands(args.slowloris as f64)
            ),
            _ => format!("{}, p99", phase.label()),
        };
        report::record(Row {
            benchmark: "http",
            figure: format!("{figure} at {}/s", thousands(args.rate as f64)),
            measured: r.p99().map_or("no answer 2xx".into(), |p| {
                format!(
                    "{p:.2} ms ({}/s, {} errors)",
                    thousands(r.achieved_rate),
                    thousands(r.errors() as f64)
                )
            }),
            reference: reference.map_or(String::new(), |f| format!("{f:.2} ms ({against})")),
            ratio: match (reference, r.p99()) {
                (Some(f), Some(m)) if m > 0.0 => Some(f / m),
                _ => None,
            },
            target: Some(format!("≤ {TARGET_P99_MS} ms, 0 errors")),
            met: Some(r.met(args.rate)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_meets_its_target_only_with_no_error_and_the_rate() {
        let mut r = PhaseResult {
            latency: Percentiles::of(vec![1.0, 2.0, 40.0]),
            achieved_rate: 1990.0,
            ..PhaseResult::default()
        };
        assert!(r.met(2000));
        r.failed = 1;
        assert!(!r.met(2000), "an error misses it");
        r.failed = 0;
        r.achieved_rate = 1500.0;
        assert!(!r.met(2000), "falling behind misses it");
        r.achieved_rate = 2000.0;
        r.latency = Percentiles::of(vec![1.0, 60.0]);
        assert!(!r.met(2000), "a p99 over 50 ms misses it");
    }
}
