//! `weir-bench fanout`: realtime channels under load. Many SSE clients listen while the source
//! writes at a steady rate; how long does a change take from its commit to each client, and
//! what does an idle client cost the server?
//!
//! Setup: a private cluster (`fsync=on`, TCP on 127.0.0.1) unless `--url` names a server
//! (superuser, `wal_level=logical`) where the benchmark creates and drops its own database. A
//! table `posts(id int primary key, n bigint, updated_at timestamptz)` with `--channels` rows
//! (100), `weir init`, then for each phase a fresh `weir run` as a **separate process** (this
//! executable as `weir-bench weir run`: the `weir` command of the weir-cli library, built from
//! the same source as the benchmark, so a stale binary cannot be measured), so that its memory (`VmRSS` from `/proc/<pid>/status`) and CPU are the
//! server's alone. The clients run in this process, on the same machine: they share its CPUs
//! with the server and PostgreSQL, and the figures include their own scheduling delays.
//!
//! Each phase (`--phases`, all three by default):
//!
//! - `one`: `--clients` (1,000) clients on the channel `posts` (every change goes to each);
//! - `entity`: `--clients` clients spread over the `--channels` (100) channels `posts/<id>`
//!   (10 on each), each receiving only the changes of its row;
//! - `both`: the two at once (2 × `--clients` connections).
//!
//! goes: start `weir run`; warm up with no client (one SSE request opened and closed, one
//! second of writes); read the server's RSS; connect the clients (`GET
//! /v1/channels/sse?channel=…`, at most `--connect-concurrency` connecting at once) and read
//! the RSS again with them connected and idle: (RSS with clients − RSS without) / clients is the
//! **memory per idle client** (user-space memory only; the kernel's socket buffers are not in
//! RSS). Then writers update the rows round-robin at `--rate` (1,000) changes/s, one update per
//! transaction, setting `n` to a unique sequence number, paced on a fixed schedule (`--writers`
//! connections share it: one commit is one WAL flush, and one connection alone cannot reach
//! 1,000/s if a flush takes over a millisecond); each records the instant its COMMIT returned.
//! The writers and the reference listener run on threads of their own, so the clients' tasks do
//! not delay their clocks. `--warmup-seconds` (2) of writes, then `--seconds` (10) measured.
//! Each client records the instant it received each message and finds `event.new_record.n` in
//! it with a small byte scan (checked against a full JSON parse on every `--verify-every`th
//! message); **latency = receipt − commit**, over every delivery of a measured change: p50,
//! p90, p99, max, deliveries expected vs received, and clients dropped (`event: close` with
//! `slow_client`) or ended otherwise.
//!
//! Reference measured in the same run, during each phase: **commit → logged**, the instant
//! the append that logged the change was announced (a `LISTEN weir_events` connection of this
//! process; the append commits its events and the NOTIFY together) minus the commit instant.
//! That is the moment the change becomes visible in `weir.events` to any client of the
//! database, the floor that delivery through a channel builds on (weir's hub is woken inside
//! its own process and can see an append slightly before an outside listener does). Printed:
//! the channel p99 / the floor p99, and each figure / its target.
//!
//! Run: `cargo run --release -p weir-bench -- fanout`
//! (`--clients 100 --seconds 5` for a quick run; `--phases one`). Needs about
//! 2 × clients + 100 open files in this process and in the server; the soft limit is raised to
//! the hard limit when lower (otherwise run `ulimit -n 65536` first).
//!
//! Targets (printed beside the figures; a miss does not fail the command): p99 ≤ 50 ms at
//! 1,000 changes/s, ≤ 64 KiB per idle client.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::cpu::{CpuReport, CpuSampler};
use crate::percentile::Percentiles;
use crate::procfs::status_kib;
use crate::report::{self, Row, ratio, thousands, verdict};
use crate::server::{PgServer, ServerArgs};
use crate::thread::on_own_thread;

const TARGET_P99_MS: f64 = 50.0;
const TARGET_IDLE_KIB: f64 = 64.0;

/// Arguments of `weir-bench fanout`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// SSE clients per phase (`both` connects this many on each side).
    #[arg(long, default_value_t = 1_000)]
    clients: usize,
    /// `posts/<id>` channels the `entity` phase spreads its clients over; also the rows of
    /// `posts`, updated round-robin.
    #[arg(long, default_value_t = 100)]
    channels: usize,
    /// Changes per second, one update per transaction.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Measured seconds of writes per phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds of writes before the measured ones in each phase (deliveries not counted).
    #[arg(long, default_value_t = 2)]
    warmup_seconds: u64,
    /// Writer connections sharing the write schedule.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Phases to run, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Phase::One, Phase::Entity, Phase::Both])]
    phases: Vec<Phase>,
    #[command(flatten)]
    server: ServerArgs,
    /// Clients connecting at once (keeps the server's accept backlog from overflowing).
    #[arg(long, default_value_t = 50)]
    connect_concurrency: usize,
    /// Check the quick scan for `"n":` against a full JSON parse on the first and every Nth
    /// change message of each client; 0 checks only the first.
    #[arg(long, default_value_t = 50)]
    verify_every: u64,
    /// The server's `[http] client_buffer` (messages queued per client before it is dropped
    /// as slow); default: weir's default.
    #[arg(long)]
    client_buffer: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    /// Every client on `posts`.
    One,
    /// Clients spread over `posts/<id>`.
    Entity,
    /// Both sets at once.
    Both,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::One => "one channel",
            Phase::Entity => "entity channels",
            Phase::Both => "both at once",
        }
    }
}

/// `weir-bench fanout`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.clients == 0 || args.channels == 0 || args.rate == 0 || args.seconds == 0 {
        bail!("--clients, --channels, --rate and --seconds must be at least 1");
    }
    if args.phases.is_empty() {
        bail!("--phases needs at least one of one, entity, both");
    }
    let most_clients = if args.phases.contains(&Phase::Both) { 2 } else { 1 } * args.clients;
    let files = raise_open_files((most_clients + 200) as u64)?;

    let pg = PgServer::start(args.server.url.clone(), false, Vec::new(), None).await?;
    let version: String = sqlx::query_scalar("select version()").fetch_one(&pg.admin).await?;
    let fsync: String =
        sqlx::query_scalar("select current_setting('fsync')").fetch_one(&pg.admin).await?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("weir-bench fanout");
    println!("  machine  {cpus} CPUs ({}), {}", cpu_model(), memory_total());
    println!("  server   {}", version.split(',').next().unwrap_or(&version));
    println!(
        "  where    {} (fsync={fsync}); `weir run` as a separate process (`weir-bench weir run`), \
         HTTP on 127.0.0.1",
        if pg.cluster.is_some() { "private cluster started for this run" } else { "--url" },
    );
    println!(
        "  clients  SSE over HTTP/1.1 (reqwest), all in this process on the same machine: they \
         share the {cpus} CPUs with weir and PostgreSQL"
    );
    println!(
        "  load     {} changes/s (one update per transaction, {} writer connections), {} s \
         warm-up + {} s measured per phase; open files limit {files}",
        thousands(args.rate as f64),
        args.writers.max(1),
        args.warmup_seconds,
        args.seconds
    );
    println!();

    let name = format!("weir_bench_fanout_{}", std::process::id());
    let slot = name.clone();
    let db_url = pg.create_db(&name).await?;
    let pool = PgPoolOptions::new().max_connections(3).connect(&db_url).await?;
    sqlx::raw_sql(
        "create table posts (id int primary key, n bigint not null, updated_at timestamptz not null)",
    )
    .execute(&pool)
    .await?;
    sqlx::query("insert into posts select g, 0, now() from generate_series(1, $1) g")
        .bind(args.channels as i32)
        .execute(&pool)
        .await?;

    let dir = std::env::temp_dir().join(format!("weir-bench-fanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let weir = WeirProcess::init(&db_url, &slot, &dir, args.client_buffer)?;

    // The reference: every append's notification, with its arrival instant.
    let notes: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let stop_listen = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let listen_task = on_own_thread("bench-listener", {
        let (url, stop, notes) = (db_url.clone(), stop_listen.clone(), notes.clone());
        move || async move {
            let mut listener = PgListener::connect(&url).await?;
            listener.listen(weir_log::NOTIFY_CHANNEL).await?;
            let _ = ready_tx.send(());
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    n = listener.recv() => {
                        let at = Instant::now();
                        if let Ok(p) = n?.payload().parse::<i64>() {
                            notes.lock().expect("not poisoned").push((p, at));
                        }
                    }
                }
            }
            anyhow::Ok(())
        }
    });
    ready_rx.await.context("the reference listener did not start")?;

    let ctx = Ctx { args: &args, weir: &weir, pool: &pool, db_url: &db_url, notes, pg: &pg };
    let mut seq = 1i64;
    let mut results = Vec::new();
    for &phase in &args.phases {
        let r = run_phase(&ctx, phase, &mut seq)
            .await
            .with_context(|| format!("phase `{}`", phase.label()))?;
        results.push(r);
    }
    stop_listen.cancel();
    listen_task.await??;
    print_summary(&args, &results, cpus);
    record_summary(&args, &results);

    pool.close().await;
    pg.drop_db(&name).await?;
    pg.admin.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

struct Ctx<'a> {
    args: &'a Args,
    weir: &'a WeirProcess,
    pool: &'a PgPool,
    db_url: &'a str,
    notes: Arc<Mutex<Vec<(i64, Instant)>>>,
    pg: &'a PgServer,
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL and the `weir` processes

/// How to start `weir init` / `weir run` against the bench database: this executable's
/// `weir` command, which is weir-cli's. (`process` uses it too.)
pub(crate) struct WeirProcess {
    pub(crate) exe: PathBuf,
    pub(crate) db_url: String,
    pub(crate) slot: String,
    /// A directory of our own: the working directory (no stray weir.toml is read; a
    /// benchmark may write its own there) and the server's log.
    pub(crate) dir: PathBuf,
    pub(crate) client_buffer: Option<usize>,
}

impl WeirProcess {
    /// This executable's `weir` on `db_url` with `slot`, working in `dir`, after `weir init`
    /// there succeeded.
    pub(crate) fn init(
        db_url: &str,
        slot: &str,
        dir: &std::path::Path,
        client_buffer: Option<usize>,
    ) -> anyhow::Result<Self> {
        let weir = WeirProcess {
            exe: std::env::current_exe().context("finding this executable")?,
            db_url: db_url.to_string(),
            slot: slot.to_string(),
            dir: dir.to_path_buf(),
            client_buffer,
        };
        let out = weir.command(&["init"]).output().context("running `weir init`")?;
        if !out.status.success() {
            bail!(
                "`weir init` failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(weir)
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg(crate::WEIR_COMMAND).args(args).current_dir(&self.dir).env_remove("DATABASE_URL");
        // Only this benchmark's settings: no token, no stray file, no fault injection.
        for (k, _) in std::env::vars() {
            if k.starts_with("WEIR_") && k != "WEIR_PG_BIN" {
                cmd.env_remove(k);
            }
        }
        cmd.env("WEIR_DATABASE_URL", &self.db_url)
            .env("WEIR_SOURCE_SLOT", &self.slot)
            .env("WEIR_SOURCE_TABLES", "[\"posts\"]");
        if let Some(b) = self.client_buffer {
            cmd.env("WEIR_HTTP_CLIENT_BUFFER", b.to_string());
        }
        cmd
    }

    /// Starts `weir run` on a free port and waits until `/v1/health` answers 200. (Not
    /// `/v1/ready`: it checks `weir.checkpoints`, which a `weir run` without operators never
    /// creates; that ingestion streams is checked by the warm-up writes.)
    pub(crate) async fn start(&self, http: &reqwest::Client) -> anyhow::Result<RunningWeir> {
        // A free port: bind port 0, read it, let it go.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = self.dir.join("weir-run.log");
        let file = std::fs::File::create(&log)?;
        let child = self
            .command(&["run"])
            .env("WEIR_HTTP_BIND", format!("127.0.0.1:{port}"))
            .env("WEIR_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting `weir run`")?;
        let mut w =
            RunningWeir { pid: child.id(), child, base: format!("http://127.0.0.1:{port}"), log };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last;
        loop {
            if let Some(status) = w.child.try_wait()? {
                bail!("`weir run` exited ({status}) before it was ready: {}", w.log_tail());
            }
            match http.get(format!("{}/v1/health", w.base)).send().await {
                Ok(r) if r.status().is_success() => return Ok(w),
                Ok(r) => {
                    last = format!("HTTP {}: {}", r.status(), r.text().await.unwrap_or_default())
                }
                Err(e) => last = error_chain(&e),
            }
            if Instant::now() > deadline {
                bail!(
                    "`weir run` was not ready within 60 s (last: {last}); its log: {}",
                    w.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A `weir run` process, killed when dropped.
pub(crate) struct RunningWeir {
    child: Child,
    pub(crate) pid: u32,
    pub(crate) base: String,
    log: PathBuf,
}

impl RunningWeir {
    pub(crate) fn rss_kib(&self) -> Option<u64> {
        status_kib(self.pid, "VmRSS")
    }

    /// The RSS once it has settled: the median of five readings 200 ms apart.
    pub(crate) async fn settled_rss_kib(&self) -> anyhow::Result<u64> {
        let mut v = Vec::new();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            v.push(self.rss_kib().context("cannot read the server's VmRSS")?);
        }
        v.sort_unstable();
        Ok(v[v.len() / 2])
    }

    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub(crate) async fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("  note: `weir run` did not stop within 10 s of SIGTERM; killed");
    }
}

impl Drop for RunningWeir {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One phase

#[derive(Debug, Default)]
struct PhaseResult {
    phase: Option<Phase>,
    asked: usize,
    connected: usize,
    connect_errors: BTreeMap<String, usize>,
    /// Server RSS with no client, with the clients connected and idle, peak under load (KiB).
    rss_base: u64,
    rss_idle: u64,
    rss_peak: u64,
    achieved_rate: f64,
    late_writes: usize,
    window_writes: usize,
    expected: u64,
    received: u64,
    duplicates: u64,
    /// Reason → clients (`event: close`), plus "ended without close" and "error: …".
    dropped: BTreeMap<String, usize>,
    latency: Option<Percentiles>,
    floor: Option<Percentiles>,
    verified: u64,
    mismatches: u64,
    unparsed: u64,
    cpu: Cpu,
}

impl PhaseResult {
    fn per_client_kib(&self) -> f64 {
        (self.rss_idle as f64 - self.rss_base as f64) / self.connected.max(1) as f64
    }

    fn dropped_total(&self) -> usize {
        self.dropped.values().sum()
    }

    fn slow(&self) -> usize {
        self.dropped.get("slow_client").copied().unwrap_or(0)
    }
}

/// The distribution of latencies in microseconds, in milliseconds.
fn of_us(us: Vec<i32>) -> Option<Percentiles> {
    Percentiles::of(us.into_iter().map(|x| f64::from(x) / 1e3).collect())
}

fn line(p: &Percentiles) -> String {
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (min {:.2} ms, {} samples)",
        p.p50,
        p.p90,
        p.p99,
        p.max,
        p.min,
        thousands(p.count as f64)
    )
}

/// The subscriptions of each client in a phase.
fn subscriptions(phase: Phase, clients: usize, channels: usize) -> Vec<Vec<String>> {
    let entity = |i: usize| vec![format!("posts/{}", i % channels + 1)];
    match phase {
        Phase::One => (0..clients).map(|_| vec!["posts".to_string()]).collect(),
        Phase::Entity => (0..clients).map(entity).collect(),
        Phase::Both => (0..clients)
            .map(|_| vec!["posts".to_string()])
            .chain((0..clients).map(entity))
            .collect(),
    }
}

/// The row a sequence number updates.
fn row_of(seq: i64, rows: usize) -> usize {
    (seq.rem_euclid(rows as i64)) as usize + 1
}

async fn run_phase(ctx: &Ctx<'_>, phase: Phase, seq: &mut i64) -> anyhow::Result<PhaseResult> {
    let args = ctx.args;
    let subs = subscriptions(phase, args.clients, args.channels);
    println!(
        "== {}: {} ==",
        phase.label(),
        match phase {
            Phase::One => format!("{} clients on `posts`", thousands(subs.len() as f64)),
            Phase::Entity => format!(
                "{} clients over {} channels `posts/<id>` (~{} each)",
                thousands(subs.len() as f64),
                args.channels,
                args.clients.div_ceil(args.channels)
            ),
            Phase::Both => format!(
                "{} on `posts` and {} over {} `posts/<id>`, {} connections",
                thousands(args.clients as f64),
                thousands(args.clients as f64),
                args.channels,
                thousands(subs.len() as f64)
            ),
        }
    );
    let mut r = PhaseResult { phase: Some(phase), asked: subs.len(), ..PhaseResult::default() };
    let http = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    // The previous phase's `weir run` must have let go of the slot, or the new one would wait
    // as a standby.
    let t = Instant::now();
    loop {
        let active: bool = sqlx::query_scalar(
            "select coalesce(bool_or(active), false) from pg_replication_slots where slot_name = $1",
        )
        .bind(&ctx.weir.slot)
        .fetch_one(ctx.pool)
        .await?;
        if !active || t.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let server = ctx.weir.start(&http).await?;

    // Warm-up with no client: the SSE path once (an endpoint that is not there stops here),
    // and a second of writes through the hub.
    let probe = http
        .get(format!("{}/v1/channels/sse?channel=posts", server.base))
        .header("accept", "text/event-stream")
        .send()
        .await
        .context("the first SSE request")?;
    if !probe.status().is_success() {
        bail!(
            "GET /v1/channels/sse?channel=posts answered {}: this weir build does not serve \
             realtime channels (yet)",
            probe.status()
        );
    }
    drop(probe);
    let warm =
        write_changes(ctx.db_url, *seq, args.rate as i64, args.rate, args.writers, args.channels)
            .await?;
    *seq += warm.commits.len() as i64;
    // Ingestion streams: the warm-up writes are in the log.
    let t = Instant::now();
    while log_n(ctx.pool).await? < *seq - 1 {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the warm-up writes were not logged within 60 s: {}", server.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.rss_base = server.settled_rss_kib().await?;

    // Connect the clients.
    let first_seq = *seq;
    let epoch = Instant::now();
    let stop = CancellationToken::new();
    let connected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let counters: Arc<Vec<Slot>> = Arc::new((0..subs.len()).map(|_| Slot::default()).collect());
    let gate = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(subs.len());
    for (i, channels) in subs.iter().enumerate() {
        let query: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
        let spec = ClientSpec {
            http: http.clone(),
            url: format!("{}/v1/channels/sse?{}", server.base, query.join("&")),
            channels: channels.clone(),
            epoch,
            first_seq,
            stop: stop.clone(),
            gate: gate.clone(),
            connected: connected.clone(),
            failed: failed.clone(),
            counters: counters.clone(),
            index: i,
            verify_every: args.verify_every,
        };
        tasks.push(tokio::spawn(client(spec)));
    }
    let t = Instant::now();
    loop {
        let done = connected.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
        if done >= subs.len() {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            println!(
                "  note: {} of {} clients still connecting after 120 s",
                subs.len() - done,
                subs.len()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_seconds = t.elapsed().as_secs_f64();
    r.connected = connected.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.rss_idle = server.settled_rss_kib().await?;
    println!(
        "  {} of {} clients connected in {:.1} s; server RSS {} KiB with none, {} KiB with them \
         idle: {:.1} KiB per idle client",
        thousands(r.connected as f64),
        thousands(subs.len() as f64),
        connect_seconds,
        thousands(r.rss_base as f64),
        thousands(r.rss_idle as f64),
        r.per_client_kib()
    );

    // Writes: warm-up, then the measured window. CPU is sampled over the window.
    let head_before = log_head(ctx.pool).await?;
    let warm_n = (args.rate * args.warmup_seconds) as i64;
    let measured_n = (args.rate * args.seconds) as i64;
    let total_n = warm_n + measured_n;
    let (started_rx, writes) =
        spawn_writes(ctx.db_url, first_seq, total_n, args.rate, args.writers, args.channels);
    let started = started_rx.await.context("the writers did not start")?;
    let window_start = started + Duration::from_secs(args.warmup_seconds);
    let window_end = window_start + Duration::from_secs(args.seconds);
    let peak = Arc::new(AtomicU64::new(0));
    let stop_rss = CancellationToken::new();
    let rss_task = tokio::spawn({
        let (peak, stop, pid) = (peak.clone(), stop_rss.clone(), server.pid);
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Some(kib) = status_kib(pid, "VmRSS") {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
            }
        }
    });
    tokio::time::sleep_until(window_start.into()).await;
    let cpu = CpuSampler::start(ctx.pg.postmaster, |_| "PostgreSQL".into())
        .watch(WEIR_SERVER, server.pid);
    tokio::time::sleep_until(window_end.into()).await;
    r.cpu = Cpu::of(&cpu.stop());
    let writes = writes.await.context("the writers stopped")??;
    *seq = first_seq + total_n;

    // Drain: until every client has every message, or nothing arrives for 3 s.
    let mut per_row = vec![0u64; args.channels + 1];
    for ch in &subs {
        for c in ch {
            if c == "posts" {
                for x in per_row.iter_mut().skip(1) {
                    *x += 1;
                }
            } else if let Some(id) = c.strip_prefix("posts/").and_then(|s| s.parse::<usize>().ok())
                && id < per_row.len()
            {
                per_row[id] += 1;
            }
        }
    }
    // Per row, only the clients that connected could receive anything: the drain waits for
    // what the connected ones should get (the exact figure is computed from the outcomes).
    let connected_share = r.connected as f64 / subs.len().max(1) as f64;
    let expected_all: u64 =
        writes.commits.iter().map(|(s, _)| per_row[row_of(*s, args.channels)]).sum::<u64>();
    let expected_all = (expected_all as f64 * connected_share) as u64;
    let mut last = (0u64, Instant::now());
    let drain_start = Instant::now();
    loop {
        let got: u64 = counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
        if got >= expected_all {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        if drain_start.elapsed() > Duration::from_secs(60) {
            println!("  note: clients still receiving 60 s after the last write; stopped");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_rss.cancel();
    let _ = rss_task.await;
    r.rss_peak = peak.load(Ordering::Relaxed);
    stop.cancel();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await?);
    }
    server.stop().await;

    // Writes.
    r.late_writes = writes.late;
    let commits = &writes.commits;
    if let (Some(a), Some(b)) =
        (commits.iter().map(|c| c.1).min(), commits.iter().map(|c| c.1).max())
    {
        r.achieved_rate = commits.len() as f64 / (b - a).as_secs_f64().max(1e-9);
    }
    // Commit instant of each sequence number, µs since the epoch; the measured window is the
    // sequence numbers after the warm-up ones.
    let mut commit_us: Vec<Option<i64>> = vec![None; total_n as usize];
    for (s, at) in commits {
        let i = (s - first_seq) as usize;
        if i < commit_us.len() {
            commit_us[i] = Some(at.saturating_duration_since(epoch).as_micros() as i64);
        }
    }
    let in_window = |i: usize| i >= warm_n as usize && i < total_n as usize;
    r.window_writes =
        (warm_n as usize..total_n as usize).filter(|&i| commit_us[i].is_some()).count();

    // Deliveries.
    let mut latencies: Vec<i32> = Vec::new();
    for (k, o) in outcomes.iter_mut().enumerate() {
        r.verified += o.verified;
        r.mismatches += o.mismatches;
        r.unparsed += o.unparsed;
        match &o.end {
            End::ConnectFailed(e) => {
                *r.connect_errors.entry(e.clone()).or_default() += 1;
                continue;
            }
            End::Stopped => {}
            End::Closed(reason) => *r.dropped.entry(reason.clone()).or_default() += 1,
            End::Ended => *r.dropped.entry("ended without close".into()).or_default() += 1,
            End::Error(e) => *r.dropped.entry(format!("error: {e}")).or_default() += 1,
        }
        // Expected: every measured change of a row this client listens to.
        let mut rows = vec![false; args.channels + 1];
        for c in &subs[k] {
            if c == "posts" {
                rows.iter_mut().for_each(|x| *x = true);
            } else if let Some(id) = c.strip_prefix("posts/").and_then(|s| s.parse::<usize>().ok())
                && id < rows.len()
            {
                rows[id] = true;
            }
        }
        r.expected += (warm_n as usize..total_n as usize)
            .filter(|&i| {
                commit_us[i].is_some() && rows[row_of(first_seq + i as i64, args.channels)]
            })
            .count() as u64;
        o.got.sort_unstable();
        let mut prev: Option<u32> = None;
        for &(i, at) in &o.got {
            if prev == Some(i) {
                r.duplicates += 1;
                continue;
            }
            prev = Some(i);
            let i = i as usize;
            if !in_window(i) {
                continue;
            }
            let Some(c) = commit_us[i] else { continue };
            r.received += 1;
            latencies
                .push((i64::from(at) - c).clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32);
        }
        o.got = Vec::new();
    }
    r.latency = of_us(latencies);

    // The reference: commit → the notification of the append that logged it.
    let t = Instant::now();
    while log_head(ctx.pool).await? < head_before + total_n && t.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logged: Vec<(i64, i64)> = sqlx::query_as(
        "select position, (new_record->>'n')::bigint from weir.events
         where position > $1 and new_record ? 'n' order by position",
    )
    .bind(head_before)
    .fetch_all(ctx.pool)
    .await?;
    let mut notes: Vec<(i64, Instant)> = ctx.notes.lock().expect("not poisoned").clone();
    notes.sort_by_key(|(p, at)| (*p, *at));
    // The earliest notification whose head covers a position: a suffix minimum.
    let mut suffix_min: Vec<Instant> = notes.iter().map(|n| n.1).collect();
    for i in (0..suffix_min.len().saturating_sub(1)).rev() {
        suffix_min[i] = suffix_min[i].min(suffix_min[i + 1]);
    }
    let mut floor = Vec::new();
    for (position, n) in &logged {
        let i = n - first_seq;
        if i < 0 || !in_window(i as usize) {
            continue;
        }
        let Some(c) = commit_us[i as usize] else { continue };
        let k = notes.partition_point(|(p, _)| p < position);
        let Some(at) = suffix_min.get(k) else { continue };
        let at = at.saturating_duration_since(epoch).as_micros() as i64;
        floor.push((at - c).clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32);
    }
    r.floor = of_us(floor);

    print_phase(&r, args);
    Ok(r)
}

fn print_phase(r: &PhaseResult, args: &Args) {
    let behind = r.achieved_rate < 0.95 * args.rate as f64;
    println!(
        "  writes: {} measured at {} changes/s achieved (target {}){}; {} started >10 ms late",
        thousands(r.window_writes as f64),
        thousands(r.achieved_rate),
        thousands(args.rate as f64),
        if behind { " — WRITES FELL BEHIND the schedule" } else { "" },
        thousands(r.late_writes as f64)
    );
    println!(
        "  deliveries: {} expected, {} received ({} missing), {} duplicates",
        thousands(r.expected as f64),
        thousands(r.received as f64),
        thousands(r.expected.saturating_sub(r.received) as f64),
        thousands(r.duplicates as f64)
    );
    if !r.connect_errors.is_empty() {
        let parts: Vec<String> =
            r.connect_errors.iter().map(|(e, n)| format!("{n} × {e}")).collect();
        println!("  clients that could not connect: {}", parts.join("; "));
    }
    if r.dropped.is_empty() {
        println!("  clients dropped: none");
    } else {
        let parts: Vec<String> = r.dropped.iter().map(|(e, n)| format!("{n} × {e}")).collect();
        println!("  clients dropped: {}", parts.join("; "));
    }
    match &r.latency {
        Some(p) => println!("  commit → client receipt:     {}", line(p)),
        None => println!("  commit → client receipt:     no deliveries"),
    }
    match &r.floor {
        Some(p) => println!("  commit → logged (reference): {}", line(p)),
        None => println!("  commit → logged (reference): no notifications"),
    }
    println!(
        "  scan of `\"n\":` checked against a full JSON parse on {} messages: {} mismatches{}",
        thousands(r.verified as f64),
        r.mismatches,
        if r.unparsed > 0 {
            format!(", {} change messages without n", r.unparsed)
        } else {
            String::new()
        }
    );
    println!("  cpu over the measured window: {}", r.cpu.describe());
    println!("  server RSS peak under load: {} KiB", thousands(r.rss_peak as f64));
    println!();
}

// ---------------------------------------------------------------------------------------------
// The clients

/// A per-client counter on a cache line of its own (clients on different threads bump theirs
/// for every message).
#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot(AtomicU64);

struct ClientSpec {
    http: reqwest::Client,
    url: String,
    channels: Vec<String>,
    epoch: Instant,
    first_seq: i64,
    stop: CancellationToken,
    gate: Arc<tokio::sync::Semaphore>,
    connected: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    counters: Arc<Vec<Slot>>,
    index: usize,
    verify_every: u64,
}

#[derive(Debug, Default)]
enum End {
    /// Stopped by the benchmark at the end of the phase (the normal end).
    #[default]
    Stopped,
    /// `event: close` with this reason.
    Closed(String),
    /// The stream ended without `event: close`.
    Ended,
    Error(String),
    ConnectFailed(String),
}

#[derive(Debug, Default)]
struct Outcome {
    /// (sequence number − the phase's first, receipt in µs since the phase's epoch).
    got: Vec<(u32, u32)>,
    verified: u64,
    mismatches: u64,
    unparsed: u64,
    end: End,
}

async fn client(spec: ClientSpec) -> Outcome {
    let mut out = Outcome::default();
    let permit = spec.gate.acquire().await;
    let response = tokio::select! {
        _ = spec.stop.cancelled() => {
            out.end = End::ConnectFailed("stopped before connecting".into());
            spec.failed.fetch_add(1, Ordering::Relaxed);
            return out;
        }
        r = spec.http.get(&spec.url).header("accept", "text/event-stream").send() => r,
    };
    drop(permit);
    let mut response = match response {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            out.end = End::ConnectFailed(format!("HTTP {}", r.status()));
            spec.failed.fetch_add(1, Ordering::Relaxed);
            return out;
        }
        Err(e) => {
            out.end = End::ConnectFailed(error_chain(&e));
            spec.failed.fetch_add(1, Ordering::Relaxed);
            return out;
        }
    };
    let is_sse = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !is_sse {
        out.end = End::ConnectFailed("not text/event-stream".into());
        spec.failed.fetch_add(1, Ordering::Relaxed);
        return out;
    }
    spec.connected.fetch_add(1, Ordering::Relaxed);
    let counter = &spec.counters[spec.index].0;
    let mut sse = SseBuf::default();
    let mut changes = 0u64;
    let mut count = 0u64;
    loop {
        let chunk = tokio::select! {
            _ = spec.stop.cancelled() => break,
            c = response.chunk() => c,
        };
        let bytes = match chunk {
            Ok(Some(b)) => b,
            Ok(None) => {
                out.end = End::Ended;
                break;
            }
            Err(e) => {
                out.end = End::Error(error_chain(&e));
                break;
            }
        };
        let at = spec.epoch.elapsed().as_micros() as u32;
        let mut closed = None;
        sse.feed(&bytes, |event, data| match event {
            b"change" | b"" => {
                let Some(n) = scan_n(data) else {
                    out.unparsed += 1;
                    return true;
                };
                // The first, then every Nth (`is_multiple_of(0)` holds for 0 only).
                if changes.is_multiple_of(spec.verify_every) {
                    out.verified += 1;
                    if !verify(data, n, &spec.channels) {
                        out.mismatches += 1;
                    }
                }
                changes += 1;
                if n >= spec.first_seq {
                    out.got.push(((n - spec.first_seq) as u32, at));
                    count += 1;
                }
                true
            }
            b"close" => {
                let reason = serde_json::from_slice::<serde_json::Value>(data)
                    .ok()
                    .and_then(|v| v["reason"].as_str().map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(data).into_owned());
                closed = Some(reason);
                false
            }
            _ => true,
        });
        counter.store(count, Ordering::Relaxed);
        if let Some(reason) = closed {
            out.end = End::Closed(reason);
            break;
        }
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// A full parse: `event.new_record.n` is `n` and `channel` is one the client asked for.
fn verify(data: &[u8], n: i64, channels: &[String]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return false };
    v["event"]["new_record"]["n"].as_i64() == Some(n)
        && v["channel"].as_str().is_some_and(|c| channels.iter().any(|x| x == c))
}

/// `new_record.n` of a change message, found without parsing the JSON: the first `"n":` after
/// `"new_record":` (the table has no text column, so the key cannot hide in a string).
fn scan_n(data: &[u8]) -> Option<i64> {
    let start = memchr::memmem::find(data, b"\"new_record\":")? + b"\"new_record\":".len();
    let rest = &data[start..];
    let at = memchr::memmem::find(rest, b"\"n\":")? + b"\"n\":".len();
    let mut digits = rest[at..].iter().skip_while(|b| b.is_ascii_whitespace()).peekable();
    let negative = digits.next_if_eq(&&b'-').is_some();
    let mut n: i64 = 0;
    let mut any = false;
    for &b in digits {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
        any = true;
    }
    any.then_some(if negative { -n } else { n })
}

/// Bytes of an event stream, split into events (`event` and `data` fields; comments skipped).
#[derive(Debug, Default)]
struct SseBuf {
    buf: Vec<u8>,
}

impl SseBuf {
    /// Appends `bytes` and calls `f(event, data)` for each complete event (an empty `event`
    /// when none was given); stops early when `f` returns false.
    fn feed(&mut self, bytes: &[u8], mut f: impl FnMut(&[u8], &[u8]) -> bool) {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        let mut scratch = Vec::new();
        while let Some((len, sep)) = block_end(&self.buf[start..]) {
            let block = &self.buf[start..start + len];
            start += len + sep;
            let mut event: &[u8] = b"";
            let mut data: Option<&[u8]> = None;
            let mut multi = false;
            for line in block.split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.is_empty() || line[0] == b':' {
                    continue;
                }
                let (field, value) = match memchr::memchr(b':', line) {
                    Some(i) => {
                        let v = &line[i + 1..];
                        (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
                    }
                    None => (line, &b""[..]),
                };
                match field {
                    b"event" => event = value,
                    b"data" => match data {
                        None => data = Some(value),
                        Some(first) => {
                            if !multi {
                                scratch.clear();
                                scratch.extend_from_slice(first);
                                multi = true;
                            }
                            scratch.push(b'\n');
                            scratch.extend_from_slice(value);
                        }
                    },
                    _ => {}
                }
            }
            let Some(data) = data else { continue };
            let data = if multi { &scratch[..] } else { data };
            if !f(event, data) {
                break;
            }
        }
        self.buf.drain(..start);
    }
}

/// Where the first event of `buf` ends: (its length, the length of the blank-line separator).
fn block_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let i = from + i;
        match (buf.get(i + 1), buf.get(i + 2)) {
            (Some(b'\n'), _) => return Some((i, 2)),
            (Some(b'\r'), Some(b'\n')) => return Some((i, 3)),
            _ => from = i + 1,
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The writers

#[derive(Debug)]
struct Writes {
    /// (sequence number, instant its COMMIT returned).
    commits: Vec<(i64, Instant)>,
    /// Writes started more than 10 ms after their slot in the schedule.
    late: usize,
}

/// Writes `count` changes from sequence number `first` at `rate`, and waits for them.
async fn write_changes(
    url: &str,
    first: i64,
    count: i64,
    rate: u64,
    writers: usize,
    rows: usize,
) -> anyhow::Result<Writes> {
    let (_, done) = spawn_writes(url, first, count, rate, writers, rows);
    done.await.context("the writers stopped")?
}

/// Starts the writers on a thread of their own: `update posts set n = <seq> … where id = <row
/// of seq>`, one statement (one transaction) per change, change i due at start + i / rate,
/// `writers` connections taking the changes in turn. Returns the instant the schedule starts
/// (once every writer is connected) and the outcome.
fn spawn_writes(
    url: &str,
    first: i64,
    count: i64,
    rate: u64,
    writers: usize,
    rows: usize,
) -> (tokio::sync::oneshot::Receiver<Instant>, tokio::sync::oneshot::Receiver<anyhow::Result<Writes>>)
{
    let (start_tx, start_rx) = tokio::sync::oneshot::channel();
    let url = url.to_string();
    let done = on_own_thread("bench-writers", move || async move {
        let writers = writers.max(1);
        let mut conns = Vec::new();
        for _ in 0..writers {
            conns.push(PgConnection::connect(&url).await?);
        }
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let _ = start_tx.send(start.into_std());
        let rate = rate.max(1) as f64;
        let mut tasks = Vec::new();
        for (w, mut conn) in conns.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let mut done = Vec::with_capacity(count as usize / writers + 1);
                let mut late = 0usize;
                let mut i = w as i64;
                while i < count {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    let now = tokio::time::Instant::now();
                    if now < due {
                        tokio::time::sleep_until(due).await;
                    } else if now - due > Duration::from_millis(10) {
                        late += 1;
                    }
                    let seq = first + i;
                    sqlx::query("update posts set n = $1, updated_at = now() where id = $2")
                        .bind(seq)
                        .bind(row_of(seq, rows) as i32)
                        .execute(&mut conn)
                        .await?;
                    done.push((seq, Instant::now()));
                    i += writers as i64;
                }
                conn.close().await?;
                anyhow::Ok((done, late))
            }));
        }
        let mut commits = Vec::with_capacity(count as usize);
        let mut late = 0;
        for t in tasks {
            let (done, l) = t.await??;
            commits.extend(done);
            late += l;
        }
        Ok(Writes { commits, late })
    });
    (start_rx, done)
}

async fn log_head(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("select coalesce(max(position), 0) from weir.events")
        .fetch_one(pool)
        .await?)
}

/// The highest sequence number in the log. Not the last event's: the writers commit on
/// several connections, so the last change logged may carry a lower number than one before it
/// (waiting for the last event's number to reach the last one written then never ended).
async fn log_n(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "select coalesce(max((new_record->>'n')::bigint), 0) from weir.events
         where new_record ? 'n'",
    )
    .fetch_one(pool)
    .await?)
}

// ---------------------------------------------------------------------------------------------
// CPU, memory and open files, from /proc

/// How the CPU sampler reports the `weir run` process.
const WEIR_SERVER: &str = "weir server";

/// CPU used over a window, in % of one core.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    server: f64,
    postgres: f64,
    clients: f64,
    /// Every process on the machine (`/proc/stat`), including the three above.
    machine: f64,
    /// Whether PostgreSQL runs on this machine (its CPU is known).
    local_pg: bool,
}

impl Cpu {
    fn of(report: &CpuReport) -> Self {
        let pct = |s: f64| 100.0 * s / report.wall.max(1e-9);
        Self {
            server: pct(report.watched(WEIR_SERVER)),
            postgres: pct(report.server_total()),
            clients: pct(report.this_process),
            machine: pct(report.machine),
            local_pg: report.local,
        }
    }

    fn describe(&self) -> String {
        let pg = if self.local_pg {
            format!("PostgreSQL {:.0}%", self.postgres)
        } else {
            "PostgreSQL not local".into()
        };
        format!(
            "weir server {:.0}%, {pg}, this process (clients, writers, listener) {:.0}% — total \
             {:.0}% of one core; other processes on the machine {:.0}%",
            self.server,
            self.clients,
            self.ours(),
            self.others()
        )
    }

    fn ours(&self) -> f64 {
        self.server + self.postgres + self.clients
    }

    /// What processes other than the benchmark's used meanwhile (other builds on a shared
    /// machine).
    fn others(&self) -> f64 {
        (self.machine - self.ours()).max(0.0)
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string())
            })
        })
        .unwrap_or_else(|| "unknown model".into())
}

fn memory_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<u64>().ok()
            })
        })
        .map_or_else(
            || "memory unknown".into(),
            |kib| format!("{:.1} GiB RAM", kib as f64 / 1048576.0),
        )
}

/// Raises the soft limit of open files to at least `needed` (up to the hard limit); `weir
/// run` inherits it. Returns the limit in force.
pub(crate) fn raise_open_files(needed: u64) -> anyhow::Result<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= needed {
        return Ok(current);
    }
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if hard < needed {
        bail!(
            "this run needs about {needed} open files and the hard limit is {hard}: \
             run `ulimit -n {needed}` as a user allowed to, or use fewer --clients"
        );
    }
    setrlimit(
        Resource::Nofile,
        Rlimit { current: Some(hard.min(1 << 20)), maximum: limit.maximum },
    )
    .context("raising the open-files limit (try `ulimit -n 65536`)")?;
    Ok(hard.min(1 << 20))
}

// ---------------------------------------------------------------------------------------------
// Summary

/// The summary's targets and its ratio to the reference, for `weir-bench all`'s table: per
/// phase, idle memory per client, the writes achieved, and commit → client p99 against commit →
/// logged p99 (ratio reference / measured: higher is better).
fn record_summary(args: &Args, results: &[PhaseResult]) {
    for r in results {
        let phase = r.phase.map_or("", Phase::label);
        let row = |figure: String, measured: String| Row {
            benchmark: "fanout",
            figure: format!("{phase}, {} clients: {figure}", thousands(r.asked as f64)),
            measured,
            reference: String::new(),
            ratio: None,
            target: None,
            met: None,
        };
        report::record(Row {
            target: Some(format!("≤ {TARGET_IDLE_KIB} KiB")),
            met: Some(r.per_client_kib() <= TARGET_IDLE_KIB),
            ..row("idle memory per client".into(), format!("{:.1} KiB", r.per_client_kib()))
        });
        report::record(Row {
            target: Some(format!("≥ 95% of {}/s", thousands(args.rate as f64))),
            met: Some(r.achieved_rate >= 0.95 * args.rate as f64),
            ..row("writes achieved".into(), format!("{}/s", thousands(r.achieved_rate)))
        });
        let p99 = row(
            "commit → client p99".into(),
            r.latency.map_or("no deliveries".into(), |p| format!("{:.2} ms", p.p99)),
        );
        report::record(Row {
            reference: r
                .floor
                .map_or(String::new(), |f| format!("{:.2} ms (commit → logged p99)", f.p99)),
            ratio: match (r.latency, r.floor) {
                (Some(l), Some(f)) if l.p99 > 0.0 => Some(f.p99 / l.p99),
                _ => None,
            },
            target: Some(format!("≤ {TARGET_P99_MS} ms")),
            met: r.latency.map(|p| p.p99 <= TARGET_P99_MS),
            ..p99
        });
    }
}

fn print_summary(args: &Args, results: &[PhaseResult], cpus: usize) {
    println!(
        "== summary: SSE fan-out at {} changes/s, {} s measured per phase ({cpus} CPUs shared by \
         weir, PostgreSQL and the clients) ==",
        thousands(args.rate as f64),
        args.seconds
    );
    let w = 17;
    let mut header = format!("  {:<40}", "");
    for r in results {
        header.push_str(&format!("{:>w$}", r.phase.map_or("", Phase::label)));
    }
    println!("{header}");
    let row = |label: &str, cell: &dyn Fn(&PhaseResult) -> String| {
        let mut line = format!("  {label:<40}");
        for r in results {
            line.push_str(&format!("{:>w$}", cell(r)));
        }
        println!("{line}");
    };
    let ms = |p: Option<Percentiles>, f: fn(&Percentiles) -> f64| {
        p.map_or("-".into(), |p| format!("{:.2} ms", f(&p)))
    };
    row("clients connected", &|r| {
        format!("{}/{}", thousands(r.connected as f64), thousands(r.asked as f64))
    });
    row("idle memory per client", &|r| format!("{:.1} KiB", r.per_client_kib()));
    row(&format!("  / target {TARGET_IDLE_KIB} KiB"), &|r| {
        format!(
            "{} {}",
            ratio(r.per_client_kib() / TARGET_IDLE_KIB),
            verdict(r.per_client_kib() <= TARGET_IDLE_KIB)
        )
    });
    row("server RSS: none / idle / peak (MiB)", &|r| {
        format!(
            "{:.0}/{:.0}/{:.0}",
            r.rss_base as f64 / 1024.0,
            r.rss_idle as f64 / 1024.0,
            r.rss_peak as f64 / 1024.0
        )
    });
    row(&format!("writes/s achieved (target {})", thousands(args.rate as f64)), &|r| {
        format!(
            "{}{}",
            thousands(r.achieved_rate),
            if r.achieved_rate < 0.95 * args.rate as f64 { " BEHIND" } else { "" }
        )
    });
    row("deliveries expected", &|r| thousands(r.expected as f64));
    row("deliveries received", &|r| thousands(r.received as f64));
    row("clients dropped: slow_client / other", &|r| {
        format!("{}/{}", r.slow(), r.dropped_total() - r.slow())
    });
    row("commit → client p50", &|r| ms(r.latency, |p| p.p50));
    row("commit → client p90", &|r| ms(r.latency, |p| p.p90));
    row("commit → client p99", &|r| ms(r.latency, |p| p.p99));
    row(&format!("  / target {TARGET_P99_MS} ms"), &|r| {
        r.latency.map_or("-".into(), |p| {
            format!("{} {}", ratio(p.p99 / TARGET_P99_MS), verdict(p.p99 <= TARGET_P99_MS))
        })
    });
    row("commit → client max", &|r| ms(r.latency, |p| p.max));
    row("reference commit → logged p50", &|r| ms(r.floor, |p| p.p50));
    row("reference commit → logged p99", &|r| ms(r.floor, |p| p.p99));
    row("channel p99 / reference p99", &|r| match (r.latency, r.floor) {
        (Some(l), Some(f)) if f.p99 > 0.0 => ratio(l.p99 / f.p99),
        _ => "-".into(),
    });
    let per_delivery = |pct: f64, r: &PhaseResult| {
        let us = pct / 100.0 * args.seconds as f64 * 1e6 / r.received.max(1) as f64;
        format!("{us:.2} µs")
    };
    row("cpu per delivery: weir server", &|r| per_delivery(r.cpu.server, r));
    row("                  clients", &|r| per_delivery(r.cpu.clients, r));
    row("cpu % of one core: weir server", &|r| format!("{:.0}%", r.cpu.server));
    row("                   PostgreSQL", &|r| {
        if r.cpu.local_pg { format!("{:.0}%", r.cpu.postgres) } else { "-".into() }
    });
    row("                   clients (this proc.)", &|r| format!("{:.0}%", r.cpu.clients));
    row("                   other processes", &|r| format!("{:.0}%", r.cpu.others()));
    println!(
        "  (memory: user-space RSS of `weir run`, kernel socket buffers not included; latency: \
         receipt by a client task in this process − the writer's COMMIT returning, both on this \
         machine's monotonic clock, so a negative minimum means the writer's thread recorded its \
         commit late, waiting for a CPU too; the reference is the LISTEN weir_events notification \
         of the append; cpu per delivery: over the measured window, per delivery received; \
         the weir server process also runs ingestion, WAL → log, a fixed cost per change that \
         dominates when few clients get each change)"
    );
    let capacity = 100.0 * cpus as f64;
    for r in results {
        let total = r.cpu.ours();
        if r.cpu.others() >= 0.1 * capacity {
            println!(
                "  note: other processes used {:.0}% CPU during `{}`: the machine was shared \
                 (figures are pessimistic; rerun on a quiet machine)",
                r.cpu.others(),
                r.phase.map_or("", Phase::label)
            );
        }
        if cpus > 0 && total + r.cpu.others() >= 0.9 * capacity {
            println!(
                "  note: `{}` saturated the machine: {:.0}% of {capacity:.0}% CPU busy \
                 (weir server {:.0}%, clients {:.0}%); its latency is bounded by CPU, and the \
                 clients' share would be another machine's in a real deployment",
                r.phase.map_or("", Phase::label),
                total + r.cpu.others(),
                r.cpu.server,
                r.cpu.clients
            );
        }
    }
    if results.iter().any(|r| r.achieved_rate < 0.95 * args.rate as f64) {
        println!(
            "  note: the writers fell behind {} changes/s in at least one phase (see `writes` \
             above): this machine could not sustain the load; try --writers or a lower --rate",
            thousands(args.rate as f64)
        );
    }
    if results.iter().any(|r| r.mismatches > 0) {
        println!(
            "  WARNING: the quick scan disagreed with the JSON parse: the figures are suspect"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHANGE: &str = r#"{"channel":"posts/42","position":123,"event":{"position":123,"lsn":"0/16B3748","commit_ts":"2024-01-01T00:00:00Z","kind":"update","entity":"posts","key":{"id":42},"new_record":{"id":42,"n":9876,"updated_at":"2024-01-01T00:00:00+00:00"},"old_record":null}}"#;

    #[test]
    fn scans_n_like_a_parse_does() {
        assert_eq!(scan_n(CHANGE.as_bytes()), Some(9876));
        assert!(verify(CHANGE.as_bytes(), 9876, &["posts/42".to_string()]));
        assert!(!verify(CHANGE.as_bytes(), 9876, &["posts".to_string()]));
        assert_eq!(scan_n(br#"{"new_record": {"id":1, "n": -5}}"#), Some(-5));
        assert_eq!(scan_n(br#"{"new_record":{"id":1}}"#), None);
        assert_eq!(scan_n(br#"{"n":1}"#), None);
    }

    #[test]
    fn splits_an_event_stream_across_chunks() {
        let stream = format!(
            ": hello\n\nid: 123\nevent: change\ndata: {CHANGE}\n\nid: 124\r\nevent: change\r\ndata: {CHANGE}\r\n\r\n: ping\n\nevent: close\ndata: {{\"reason\":\"slow_client\"}}\n\nevent: change\ndata: {CHANGE}\n\n"
        );
        for split in [1usize, 7, 50, 300, stream.len()] {
            let mut sse = SseBuf::default();
            let mut seen = Vec::new();
            for chunk in stream.as_bytes().chunks(split) {
                sse.feed(chunk, |event, data| {
                    seen.push((String::from_utf8_lossy(event).into_owned(), data.len()));
                    event != b"close"
                });
                if seen.iter().any(|(e, _)| e == "close") {
                    break;
                }
            }
            assert_eq!(seen.len(), 3, "split {split}: {seen:?}");
            assert_eq!(seen[0], ("change".into(), CHANGE.len()));
            assert_eq!(seen[1], ("change".into(), CHANGE.len()));
            assert_eq!(seen[2].0, "close");
        }
        let mut sse = SseBuf::default();
        let mut data = Vec::new();
        sse.feed(b"data: a\ndata: b\n\n", |_, d| {
            data.push(d.to_vec());
            true
        });
        assert_eq!(data, vec![b"a\nb".to_vec()]);
    }

    #[test]
    fn subscriptions_and_rows() {
        let s = subscriptions(Phase::Entity, 1000, 100);
        assert_eq!(s.len(), 1000);
        assert_eq!(s.iter().filter(|c| c[0] == "posts/42").count(), 10);
        assert_eq!(subscriptions(Phase::Both, 10, 100).len(), 20);
        assert_eq!(row_of(100, 100), 1);
        assert_eq!(row_of(141, 100), 42);
    }
}
