//! `weir-bench jobs`: weir's job queue against graphile-worker, in one run, on one database.
//!
//! ```text
//! a fresh database on a private cluster (fsync on) or on the --url server
//!   drain    for each C and mode (defaults; tuned = a local queue of --prefetch jobs):
//!            weir: enqueue N no-op jobs (bulk), drain them with C workers             → jobs/s
//!            then graphile-worker (bench/graphile/run.sh) the same, same mode         → ratio
//!   declared the workers of weir.toml (`[[workers]]`), same C, same reference:
//!            sql:  --declared-jobs jobs, each inserting one row (effect and completion in one
//!                  transaction; graphile-worker's task inserts with its own query)
//!            http: --declared-jobs jobs, each POSTed to a receiver in this process (200 at
//!                  once); skipped with a note while the http type refuses to start
//!   latency  enqueue one job at a time at a steady rate, each in its own transaction
//!            → enqueue call to worker start, p50 / p99
//!   vacuum   rounds of enqueue + drain: jobs/s per round and the dead tuples left in weir.jobs
//! ```
//!
//! The machine is noisy: compare the ratios printed by one run, not figures across runs.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use weir_jobs::{
    Config, Histogram, Job, JobArgs, JobContext, JobError, JobRunner, QueueConfig, Worker,
};

use crate::report::{self, Row, thousands};
use crate::server::{PgServer, ServerArgs};

/// `weir-bench jobs` options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) server: ServerArgs,
    /// Jobs to drain per measurement.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) jobs: usize,
    /// Worker counts to drain with.
    #[arg(long, value_delimiter = ',', default_value = "10,50")]
    pub(crate) concurrency: Vec<u32>,
    /// Steady enqueue rate of the latency phase, jobs per second.
    #[arg(long, default_value_t = 1000)]
    pub(crate) rate: u32,
    /// Length of the latency phase.
    #[arg(long, default_value = "10s")]
    pub(crate) latency_duration: String,
    /// Rounds of the vacuum phase (each enqueues and drains `jobs / 5`); 0 skips it.
    #[arg(long, default_value_t = 5)]
    pub(crate) vacuum_rounds: usize,
    /// Local queue of the tuned weir runs (`Config::prefetch`); 0 skips them.
    #[arg(long, default_value_t = 500)]
    pub(crate) prefetch: u32,
    /// Jobs of each declared-worker phase (sql, http); 0 skips them.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) declared_jobs: usize,
    /// Do not run graphile-worker.
    #[arg(long)]
    pub(crate) skip_reference: bool,
    /// Where `run.sh` of the graphile-worker reference is (default: `bench/graphile` of the
    /// source tree, then of the current directory).
    #[arg(long)]
    pub(crate) graphile_dir: Option<PathBuf>,
}

const QUEUE: &str = "weir_bench";

#[derive(Serialize, Deserialize)]
struct Noop {
    /// Microseconds since the epoch when enqueue was called (latency phase).
    #[serde(default)]
    t: u64,
}

impl JobArgs for Noop {
    const KIND: &'static str = "weir_bench_noop";
}

#[derive(Default)]
struct Seen {
    runs: AtomicU64,
    latency: Mutex<Histogram>,
}

struct NoopWorker(Arc<Seen>);

impl Worker for NoopWorker {
    type Args = Noop;
    async fn work(&self, _ctx: JobContext, args: Noop) -> Result<(), JobError> {
        if args.t > 0 {
            let lat = now_us().saturating_sub(args.t);
            self.0.latency.lock().expect("latency lock").record(Duration::from_micros(lat));
        }
        self.0.runs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Runs the benchmark and prints its figures.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.jobs == 0 || args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--jobs and every --concurrency must be positive");
    }
    let latency_for =
        weir_core::parse_duration(&args.latency_duration).context("--latency-duration")?;
    // The server (a private cluster lives as long as it) and a database of this run's own.
    let server = PgServer::start(args.server.url.clone(), false, Vec::new(), None).await?;
    let name = format!("weir_bench_jobs_{}", std::process::id());
    let url = server.create_db(&name).await?;
    let pool = PgPoolOptions::new().max_connections(32).connect(&url).await?;
    weir_jobs::migrate(&pool).await?;
    let version: String = sqlx::query_scalar("show server_version").fetch_one(&pool).await?;
    let fsync: String = sqlx::query_scalar("show fsync").fetch_one(&pool).await?;
    println!(
        "weir-bench jobs: {} no-op jobs; PostgreSQL {version}, fsync {fsync}; {} CPUs",
        args.jobs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // The reference, if it can run: checked once, then run right after each weir measurement
    // so that every ratio compares neighbours in time (the machine is noisy).
    let script = if args.skip_reference {
        println!("graphile-worker: skipped (--skip-reference)");
        record_skipped("--skip-reference");
        None
    } else if !has("node") || !has("npm") {
        println!("graphile-worker: skipped — node and npm are needed for the reference");
        record_skipped("node and npm are needed");
        None
    } else {
        let found = graphile_script(&args);
        if found.is_none() {
            println!(
                "graphile-worker: skipped — bench/graphile/run.sh not found (pass --graphile-dir)"
            );
            record_skipped("bench/graphile/run.sh not found (pass --graphile-dir)");
        }
        found
    };
    for &c in &args.concurrency {
        for (mode, prefetch) in [("defaults", 0), ("tuned", args.prefetch)] {
            if mode == "tuned" && prefetch == 0 {
                continue;
            }
            let (enq, drain) = drain_phase(&pool, args.jobs, c, prefetch).await?;
            println!(
                "weir     concurrency {c:>3} ({mode:<8}): enqueue {enq:>9.0} jobs/s   drain \
                 {drain:>9.0} jobs/s"
            );
            let Some(script) = &script else { continue };
            let g = graphile(script, &url, args.jobs, c, mode, "noop");
            match &g {
                Ok(g) => println!(
                    "graphile concurrency {c:>3} ({mode:<8}): enqueue {:>9.0} jobs/s   drain \
                     {:>9.0} jobs/s   weir / graphile = {:.1}×",
                    g.enqueue_per_sec,
                    g.jobs_per_sec,
                    drain / g.jobs_per_sec
                ),
                Err(e) => println!("graphile concurrency {c} ({mode}): failed: {e:#}"),
            }
            record_ratio(format!("drain, {c} workers, {mode}, jobs/s"), drain, &g);
        }
    }

    if args.declared_jobs > 0 {
        for &c in &args.concurrency {
            declared_phases(&pool, &url, script.as_ref(), args.declared_jobs, c).await?;
        }
    }

    let c = args.concurrency[0];
    let (p50, p99, n) = latency_phase(&pool, c, args.rate, latency_for).await?;
    println!(
        "weir     enqueue→start at {} jobs/s for {latency_for:?} ({n} jobs, concurrency {c}): \
         p50 {:.2} ms, p99 {:.2} ms",
        args.rate,
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );

    if args.vacuum_rounds > 0 {
        vacuum_phase(&pool, (args.jobs / 5).max(1), c, args.vacuum_rounds).await?;
    }

    pool.close().await;
    server.drop_db(&name).await?;
    server.admin.close().await;
    Ok(())
}

async fn clear(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("delete from weir.jobs where queue = $1").bind(QUEUE).execute(pool).await?;
    sqlx::query("delete from weir.job_history where queue = $1").bind(QUEUE).execute(pool).await?;
    sqlx::query("vacuum analyze weir.jobs").execute(pool).await?;
    sqlx::query("vacuum analyze weir.job_history").execute(pool).await?;
    Ok(())
}

async fn enqueue_bulk(pool: &PgPool, jobs: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut left = jobs;
    let mut conn = pool.acquire().await?;
    while left > 0 {
        let n = left.min(5000);
        let batch: Vec<Job> = (0..n)
            .map(|_| Job::new(&Noop { t: 0 }).map(|j| j.queue(QUEUE)))
            .collect::<Result<_, _>>()?;
        weir_jobs::enqueue_many(&mut conn, &batch).await?;
        left -= n;
    }
    Ok(jobs as f64 / start.elapsed().as_secs_f64())
}

fn runner_config(concurrency: u32, prefetch: u32) -> Config {
    Config { queues: vec![QueueConfig::new(QUEUE, concurrency)], prefetch, ..Config::default() }
}

/// Enqueues `jobs` in bulk, then drains them; returns (enqueue jobs/s, drain jobs/s).
async fn drain_phase(
    pool: &PgPool,
    jobs: usize,
    concurrency: u32,
    prefetch: u32,
) -> anyhow::Result<(f64, f64)> {
    clear(pool).await?;
    let enqueue_rate = enqueue_bulk(pool, jobs).await?;
    sqlx::query("analyze weir.jobs").execute(pool).await?;
    let seen = Arc::new(Seen::default());
    let start = Instant::now();
    let running = JobRunner::new(pool.clone(), runner_config(concurrency, prefetch))
        .register(NoopWorker(seen.clone()))
        .start()
        .await?;
    // Completions are persisted when the runner counts them.
    while running.metrics().queues[0].completed < jobs as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        if start.elapsed() > Duration::from_secs(600) {
            bail!("draining {jobs} jobs took more than 10 minutes");
        }
    }
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    let m = &running.metrics().queues[0];
    println!(
        "         ({} claims of {:.1} jobs on average; wait p50 {:.1} ms)",
        m.claims,
        m.claimed as f64 / m.claims.max(1) as f64,
        m.wait_p50.as_secs_f64() * 1e3,
    );
    running.stop(Duration::from_secs(10)).await?;
    Ok((enqueue_rate, rate))
}

/// Enqueues at a steady `rate`, one job per transaction, for `length`; returns the p50 and p99
/// of enqueue call → worker start, and the number of jobs.
async fn latency_phase(
    pool: &PgPool,
    concurrency: u32,
    rate: u32,
    length: Duration,
) -> anyhow::Result<(Duration, Duration, u64)> {
    clear(pool).await?;
    let seen = Arc::new(Seen::default());
    let running = JobRunner::new(pool.clone(), runner_config(concurrency, 0))
        .register(NoopWorker(seen.clone()))
        .start()
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total = (length.as_secs_f64() * f64::from(rate)).round() as u64;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..total {
        tick.tick().await;
        let pool = pool.clone();
        tasks.spawn(async move {
            let job = Job::new(&Noop { t: now_us() })?.queue(QUEUE);
            let mut conn = pool.acquire().await?;
            weir_jobs::enqueue(&mut conn, &job).await?;
            anyhow::Ok(())
        });
        while let Some(r) = tasks.try_join_next() {
            r??;
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.runs.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let m = &running.metrics().queues[0];
    println!(
        "         (of which commit → claim: p50 {:.2} ms, p99 {:.2} ms, as the runner sees it)",
        m.wait_p50.as_secs_f64() * 1e3,
        m.wait_p99.as_secs_f64() * 1e3
    );
    running.stop(Duration::from_secs(10)).await?;
    let h = seen.latency.lock().expect("latency lock");
    Ok((h.quantile(0.5), h.quantile(0.99), h.len()))
}

/// Rounds of enqueue + drain with autovacuum as configured: throughput per round and the dead
/// tuples of the hot table, to show that a long run does not degrade.
async fn vacuum_phase(
    pool: &PgPool,
    jobs: usize,
    concurrency: u32,
    rounds: usize,
) -> anyhow::Result<()> {
    clear(pool).await?;
    let seen = Arc::new(Seen::default());
    let running = JobRunner::new(pool.clone(), runner_config(concurrency, 0))
        .register(NoopWorker(seen.clone()))
        .start()
        .await?;
    let mut rates = Vec::new();
    for round in 1..=rounds {
        let before = running.metrics().queues[0].completed;
        let start = Instant::now();
        // Enqueue while the runner drains: the steady state of a busy queue.
        let mut conn = pool.acquire().await?;
        let mut left = jobs;
        while left > 0 {
            let n = left.min(1000);
            let batch: Vec<Job> = (0..n)
                .map(|_| Job::new(&Noop { t: 0 }).map(|j| j.queue(QUEUE)))
                .collect::<Result<_, _>>()?;
            weir_jobs::enqueue_many(&mut conn, &batch).await?;
            left -= n;
        }
        drop(conn);
        while running.metrics().queues[0].completed < before + jobs as u64 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let rate = jobs as f64 / start.elapsed().as_secs_f64();
        let (live, dead): (i64, i64) = sqlx::query_as(
            "select n_live_tup, n_dead_tup from pg_stat_user_tables
              where schemaname = 'weir' and relname = 'jobs'",
        )
        .fetch_one(pool)
        .await?;
        let size: i64 = sqlx::query_scalar("select pg_total_relation_size('weir.jobs')")
            .fetch_one(pool)
            .await?;
        println!(
            "weir     vacuum round {round}/{rounds}: {jobs} jobs enqueued while draining, \
             {rate:>8.0} jobs/s; weir.jobs live {live}, dead {dead}, {} kB",
            size / 1024
        );
        rates.push(rate);
    }
    running.stop(Duration::from_secs(10)).await?;
    if let (Some(first), Some(last)) = (rates.first(), rates.last()) {
        println!("weir     vacuum: last round / first round = {:.2}", last / first);
        report::record(Row {
            benchmark: "jobs",
            figure: format!("vacuum rounds ({rounds} × {jobs} jobs), jobs/s: last / first"),
            measured: format!("{}/s", thousands(*last)),
            reference: format!("{}/s (first round)", thousands(*first)),
            ratio: Some(last / first),
            target: None,
            met: None,
        });
    }
    Ok(())
}

/// The declared workers, each against graphile-worker doing the same from a JavaScript task.
async fn declared_phases(
    pool: &PgPool,
    url: &str,
    script: Option<&PathBuf>,
    jobs: usize,
    concurrency: u32,
) -> anyhow::Result<()> {
    // sql: each job inserts a row; the effect commits with the completion.
    sqlx::query("create table if not exists bench_out (job_id bigint not null)")
        .execute(pool)
        .await?;
    sqlx::query("truncate bench_out").execute(pool).await?;
    let mut sql = weir_core::WorkerConfig::new(SQL_KIND, weir_core::WorkerType::Sql);
    sql.queue = QUEUE.to_string();
    sql.sql = Some("insert into bench_out (job_id) select ($1->>'n')::bigint".to_string());
    if let Some(drain) = declared_drain(pool, jobs, concurrency, sql).await? {
        let rows: i64 =
            sqlx::query_scalar("select count(*) from bench_out").fetch_one(pool).await?;
        if rows != jobs as i64 {
            bail!("the sql worker inserted {rows} rows for {jobs} jobs");
        }
        println!(
            "weir     concurrency {c:>3} (sql     ): {rows} rows inserted          drain {drain:>9.0} jobs/s",
            c = concurrency
        );
        if let Some(script) = script {
            sqlx::query("truncate bench_out").execute(pool).await?;
            reference_line(
                graphile(script, url, jobs, concurrency, "defaults", "sql"),
                concurrency,
                "sql",
                drain,
            );
        }
    }

    // http: each job is POSTed to a receiver here that answers 200 at once.
    let received = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(n): axum::extract::State<Arc<AtomicU64>>| async move {
                    n.fetch_add(1, Ordering::Relaxed);
                    axum::http::StatusCode::OK
                },
            ),
        )
        .with_state(received.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut http = weir_core::WorkerConfig::new(HTTP_KIND, weir_core::WorkerType::Http);
    http.queue = QUEUE.to_string();
    http.url = Some(hook.clone());
    if let Some(drain) = declared_drain(pool, jobs, concurrency, http).await? {
        println!(
            "weir     concurrency {concurrency:>3} (http    ): {} requests received       drain {drain:>9.0} jobs/s",
            received.load(Ordering::Relaxed)
        );
        if let Some(script) = script {
            reference_line(
                graphile(script, url, jobs, concurrency, "defaults", &hook),
                concurrency,
                "http",
                drain,
            );
        }
    }
    server.abort();
    Ok(())
}

const SQL_KIND: &str = "weir_bench_sql";
const HTTP_KIND: &str = "weir_bench_http";

/// Enqueues `jobs` of the entry's kind (args `{"n": i}`), drains them with the entry declared;
/// `None` (and a printed note) when the runner refuses the entry's type as not built yet.
async fn declared_drain(
    pool: &PgPool,
    jobs: usize,
    concurrency: u32,
    entry: weir_core::WorkerConfig,
) -> anyhow::Result<Option<f64>> {
    clear(pool).await?;
    let kind = entry.kind.clone();
    let worker_type = entry.worker_type.as_str();
    let mut conn = pool.acquire().await?;
    for from in (0..jobs).step_by(5000) {
        let batch: Vec<Job> = (from..jobs.min(from + 5000))
            .map(|n| Job::raw(kind.clone(), serde_json::json!({ "n": n })).queue(QUEUE))
            .collect();
        weir_jobs::enqueue_many(&mut conn, &batch).await?;
    }
    drop(conn);
    sqlx::query("analyze weir.jobs").execute(pool).await?;
    let start = Instant::now();
    let running = match JobRunner::new(pool.clone(), runner_config(concurrency, 0))
        .declare(entry)
        .start()
        .await
    {
        Ok(running) => running,
        Err(e @ weir_jobs::Error::Registration(_)) if e.to_string().contains("not built yet") => {
            println!("weir     concurrency {concurrency:>3} ({worker_type:<8}): skipped — {e}");
            report::record(Row {
                benchmark: "jobs",
                figure: format!("drain, {concurrency} workers, `{worker_type}` worker"),
                measured: format!("skipped: {e}"),
                reference: String::new(),
                ratio: None,
                target: None,
                met: None,
            });
            clear(pool).await?;
            return Ok(None);
        }
        Err(e) => return Err(e).context(format!("starting the {worker_type} worker")),
    };
    while running.metrics().queues[0].completed < jobs as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        if start.elapsed() > Duration::from_secs(600) {
            bail!("draining {jobs} {worker_type} jobs took more than 10 minutes");
        }
    }
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    running.stop(Duration::from_secs(10)).await?;
    Ok(Some(rate))
}

fn reference_line(g: anyhow::Result<GraphileResult>, c: u32, what: &str, drain: f64) {
    record_ratio(format!("drain, {c} workers, `{what}` worker, jobs/s"), drain, &g);
    match g {
        Ok(g) => println!(
            "graphile concurrency {c:>3} ({what:<8}): enqueue {:>9.0} jobs/s   drain {:>9.0} \
             jobs/s   weir / graphile = {:.1}×",
            g.enqueue_per_sec,
            g.jobs_per_sec,
            drain / g.jobs_per_sec
        ),
        Err(e) => println!("graphile concurrency {c} ({what}): failed: {e:#}"),
    }
}

/// A drain's row for `weir-bench all`: weir's jobs/s against graphile-worker's, or why there
/// is no ratio.
fn record_ratio(figure: String, drain: f64, g: &anyhow::Result<GraphileResult>) {
    let (reference, ratio) = match g {
        Ok(g) => (
            format!("{}/s (graphile-worker)", thousands(g.jobs_per_sec)),
            Some(drain / g.jobs_per_sec),
        ),
        Err(e) => (format!("graphile-worker failed: {e:#}"), None),
    };
    report::record(Row {
        benchmark: "jobs",
        figure,
        measured: format!("{}/s", thousands(drain)),
        reference,
        ratio,
        target: None,
        met: None,
    });
}

/// The row saying that no drain has a ratio, and why.
fn record_skipped(why: &str) {
    report::record(Row {
        benchmark: "jobs",
        figure: "graphile-worker reference".into(),
        measured: format!("skipped: {why}"),
        reference: String::new(),
        ratio: None,
        target: None,
        met: None,
    });
}

#[derive(Deserialize)]
struct GraphileResult {
    enqueue_per_sec: f64,
    jobs_per_sec: f64,
}

fn graphile_script(args: &Args) -> Option<PathBuf> {
    let candidates = [
        args.graphile_dir.clone(),
        std::env::var_os("WEIR_BENCH_GRAPHILE_DIR").map(PathBuf::from),
        Some(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/graphile"))),
        Some(PathBuf::from("bench/graphile")),
    ];
    candidates.into_iter().flatten().map(|d| d.join("run.sh")).find(|p| p.is_file())
}

fn has(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

fn graphile(
    script: &PathBuf,
    url: &str,
    jobs: usize,
    concurrency: u32,
    mode: &str,
    task: &str,
) -> anyhow::Result<GraphileResult> {
    let out = Command::new("bash")
        .arg(script)
        .args([url, &jobs.to_string(), &concurrency.to_string(), mode, task])
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).context("no result line")?;
    Ok(serde_json::from_str(line)?)
}
