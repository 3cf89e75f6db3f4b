//! `weir-bench process`: process status under load. A writer commits single-row inserts at a
//! steady rate, takes the LSN token right after each commit (`pg_current_wal_insert_lsn()`, as
//! an application would) and asks `GET /v1/process/wait?lsn=…` of a running `weir run`; how
//! long from the commit until the long-poll answers 200, while `--waiters` other long-polls
//! wait on the same server?
//!
//! Setup: a private cluster (`fsync=on`) unless `--url` names a server. Tables `posts(id int
//! primary key, n bigint)`, `post_copies(id int primary key, at timestamptz)` (the derived table)
//! and `unwatched(n bigint)` (the application's other traffic, not in the publication); `weir
//! init`, then per phase a fresh `weir run` as a **separate process** (this executable's
//! hidden `weir` command, as in `fanout`):
//!
//! - `log`: no operator. A token is processed once its commit is in the log;
//! - `operator`: one SQL operator (`per_key`, 8 lanes) copying each post into `post_copies`
//!   with `clock_timestamp()`. A token is processed once the operator has handled it.
//!
//! In each phase: `--waiters` (1,000) long-polls on a token no write reaches (each asked again
//! when it times out) stay open throughout, so the server's one watcher serves a thousand
//! waiters besides the measured ones. The writer (a thread of its own, clocks not delayed by
//! the clients) commits `--rate` (100) inserts/s for `--seconds` (10), and after each, on the
//! same connection, reads the token; a second connection writes `--noise-rate` (200) rows/s
//! into `unwatched`, so that — as in any application with more tables than weir watches —
//! tokens often land beyond the last commit weir logs (counted and printed: tokens beyond
//! their own commit's LSN). One long-poll per commit is sent at once; **latency = the 200's
//! arrival − the commit's return**.
//!
//! References measured in the same run, for the same commits: **commit → logged** (the
//! instant the append's `LISTEN weir_events` notification arrived, the floor any answer builds
//! on) and, in `operator`, **commit → derived row** (`post_copies.at`, written inside the
//! operator's transaction, just before its checkpoint commits). Printed: p50/p99 of each, the
//! watcher's queries per second (`weir_process_watch_queries_total` on `/metrics`), and the
//! target: commit → 200 within 10 ms of the reference at p99 (the token "resolves within
//! 10 ms" of being processed).
//!
//! Run: `cargo run --release -p weir-bench -- process` (`--seconds 5 --waiters 100` for a
//! quick run; `--phases log`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::fanout::{WeirProcess, raise_open_files};
use crate::percentile::Percentiles;
use crate::report::{Row, record, thousands, verdict};
use crate::server::{PgServer, ServerArgs};
use crate::thread::on_own_thread;

/// Commit → 200 at p99, beyond the reference's p99.
const TARGET_OVER_MS: f64 = 10.0;

/// Arguments of `weir-bench process`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Long-polls waiting throughout on a token no write reaches.
    #[arg(long, default_value_t = 1_000)]
    waiters: usize,
    /// Measured commits per second (one insert per transaction), each waited for.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Writes per second to a table weir does not watch (the application's other traffic).
    #[arg(long, default_value_t = 200)]
    noise_rate: u64,
    /// Measured seconds per phase (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Phases to run, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Phase::Log, Phase::Operator])]
    phases: Vec<Phase>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    /// No operator: processed once logged.
    Log,
    /// One SQL operator: processed once it has handled the write.
    Operator,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Log => "log only (no operator)",
            Phase::Operator => "one SQL operator",
        }
    }
}

const SCHEMA: &str = "
    create table posts (id int primary key, n bigint not null);
    create table post_copies (id int primary key, at timestamptz not null);
    create table unwatched (n bigint not null);";

const OPERATOR_TOML: &str = r#"
[[operators]]
name = "copies"
entities = ["posts"]
lanes = 8
sql = """
insert into post_copies (id, at) values ($1, clock_timestamp()) on conflict (id) do nothing
"""
"#;

/// `weir-bench process`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.rate == 0 || args.seconds == 0 {
        bail!("--rate and --seconds must be at least 1");
    }
    let files = raise_open_files((args.waiters + 300) as u64)?;
    let pg = PgServer::start(args.server.url.clone(), false, Vec::new(), None).await?;
    pg.print_header("process", "; `weir run` as a separate process, HTTP on 127.0.0.1").await?;
    println!(
        "  load     {} commits/s measured (+{} writes/s to an unwatched table), {} s per phase; \
         {} other long-polls waiting; open files limit {files}",
        thousands(args.rate as f64),
        thousands(args.noise_rate as f64),
        args.seconds,
        thousands(args.waiters as f64)
    );
    println!();

    let name = format!("weir_bench_process_{}", std::process::id());
    let db_url = pg.create_db(&name).await?;
    let pool = PgPoolOptions::new().max_connections(3).connect(&db_url).await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    let dir = std::env::temp_dir().join(format!("weir-bench-process-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let weir = WeirProcess::init(&db_url, &name, &dir, None)?;

    let mut results = Vec::new();
    let mut next_id = 1i32;
    for &phase in &args.phases {
        let toml = if phase == Phase::Operator { OPERATOR_TOML } else { "" };
        std::fs::write(dir.join("weir.toml"), toml)?;
        let r = run_phase(&args, &weir, &pool, &db_url, phase, &mut next_id)
            .await
            .with_context(|| format!("phase `{}`", phase.label()))?;
        results.push(r);
    }

    println!("== summary ==");
    for r in &results {
        let over = r.wait.p99 - r.reference.p99;
        record(Row {
            benchmark: "process",
            figure: format!("{}: commit → /v1/process/wait 200, p99", r.phase.label()),
            measured: format!("{:.2} ms", r.wait.p99),
            reference: format!("{:.2} ms ({} p99)", r.reference.p99, r.reference_name),
            ratio: (r.wait.p99 > 0.0).then(|| r.reference.p99 / r.wait.p99),
            target: Some(format!("≤ {TARGET_OVER_MS:.0} ms beyond the reference")),
            met: Some(over <= TARGET_OVER_MS),
        });
        println!(
            "  {:<24} commit → 200 p99 {:.2} ms, {} p99 {:.2} ms: {:.2} ms beyond (target ≤ {:.0} \
             ms) {}",
            r.phase.label(),
            r.wait.p99,
            r.reference_name,
            r.reference.p99,
            over,
            TARGET_OVER_MS,
            verdict(over <= TARGET_OVER_MS)
        );
    }
    pool.close().await;
    pg.drop_db(&name).await?;
    pg.admin.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

struct PhaseResult {
    phase: Phase,
    wait: Percentiles,
    reference_name: &'static str,
    reference: Percentiles,
}

/// One measured commit.
#[derive(Debug, Clone)]
struct Commit {
    id: i32,
    at: Instant,
    wall_us: i64,
    token: String,
}

fn wall_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

fn line(name: &str, p: &Percentiles) -> String {
    format!(
        "  {name:<22} p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        p.p50,
        p.p90,
        p.p99,
        p.max,
        thousands(p.count as f64)
    )
}

async fn run_phase(
    args: &Args,
    weir: &WeirProcess,
    pool: &PgPool,
    db_url: &str,
    phase: Phase,
    next_id: &mut i32,
) -> anyhow::Result<PhaseResult> {
    println!("== {} ==", phase.label());
    let http = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .build()?;
    // The previous phase's `weir run` must have let go of the slot.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        let active: bool = sqlx::query_scalar(
            "select coalesce(bool_or(active), false) from pg_replication_slots where slot_name = $1",
        )
        .bind(&weir.slot)
        .fetch_one(pool)
        .await?;
        if !active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let server = weir.start(&http).await?;

    // The append notifications (the floor), on a thread of their own.
    let stop = CancellationToken::new();
    let listen = crate::thread::append_notifications(db_url, stop.clone()).await?;

    // The other waiters: a token no write reaches, asked again whenever it times out.
    let idle = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut others = Vec::new();
    for _ in 0..args.waiters {
        let (http, base, stop, idle) =
            (http.clone(), server.base.clone(), stop.clone(), idle.clone());
        others.push(tokio::spawn(async move {
            let mut counted = false;
            while !stop.is_cancelled() {
                let ask = http
                    .get(format!("{base}/v1/process/wait?lsn=FFFFFFFF/0&timeout=10s"))
                    .send();
                if !counted {
                    counted = true;
                    idle.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    r = ask => if r.is_err() { tokio::time::sleep(Duration::from_millis(100)).await },
                }
            }
        }));
    }
    while idle.load(std::sync::atomic::Ordering::Relaxed) < args.waiters {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let queries_before = watcher_queries(&http, &server.base).await;
    let head_before = log_head(pool).await?;

    // The writer (and the unwatched traffic) on threads of their own; the long-poll of each
    // commit is sent from here as soon as its token arrives.
    let warm = args.rate as i64;
    let total = warm + (args.rate * args.seconds) as i64;
    let first_id = *next_id;
    *next_id += total as i32;
    let (tokens_tx, mut tokens_rx) = tokio::sync::mpsc::unbounded_channel::<Commit>();
    let writer = on_own_thread("bench-writer", {
        let (url, rate) = (db_url.to_string(), args.rate);
        move || async move {
            let mut conn = PgConnection::connect(&url).await?;
            let start = tokio::time::Instant::now() + Duration::from_millis(100);
            for i in 0..total {
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64))
                    .await;
                let id = first_id + i as i32;
                sqlx::query("insert into posts (id, n) values ($1, $1)")
                    .bind(id)
                    .execute(&mut conn)
                    .await?;
                let (at, wall) = (Instant::now(), wall_us());
                let token: String = sqlx::query_scalar("select pg_current_wal_insert_lsn()::text")
                    .fetch_one(&mut conn)
                    .await?;
                let _ = tokens_tx.send(Commit { id, at, wall_us: wall, token });
            }
            conn.close().await?;
            anyhow::Ok(())
        }
    });
    let noise = on_own_thread("bench-noise", {
        let (url, rate, stop) = (db_url.to_string(), args.noise_rate, stop.clone());
        move || async move {
            if rate == 0 {
                return anyhow::Ok(());
            }
            let mut conn = PgConnection::connect(&url).await?;
            let start = tokio::time::Instant::now();
            let mut i = 0u64;
            while !stop.is_cancelled() {
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64))
                    .await;
                sqlx::query("insert into unwatched values ($1)")
                    .bind(i as i64)
                    .execute(&mut conn)
                    .await?;
                i += 1;
            }
            conn.close().await?;
            anyhow::Ok(())
        }
    });
    let measure_from = Instant::now();
    let mut asks = Vec::new();
    let mut commits = Vec::new();
    while let Some(c) = tokens_rx.recv().await {
        let (http, base, token) = (http.clone(), server.base.clone(), c.token.clone());
        asks.push(tokio::spawn(async move {
            let r =
                http.get(format!("{base}/v1/process/wait?lsn={token}&timeout=20s")).send().await?;
            anyhow::Ok((r.status().as_u16(), Instant::now()))
        }));
        commits.push(c);
    }
    writer.await.context("the writer stopped")??;
    let mut answered = Vec::new();
    for a in asks {
        answered.push(a.await??);
    }
    let seconds = measure_from.elapsed().as_secs_f64();
    let queries =
        watcher_queries(&http, &server.base).await.zip(queries_before).map(|(a, b)| a - b);
    stop.cancel();
    noise.await.context("the noise writer stopped")??;
    for o in others {
        let _ = o.await;
    }
    let notes = listen.await.context("the listener stopped")??;

    // Where each commit landed in the log: its position (for the floor) and its LSN (was the
    // token beyond it?).
    let placed: Vec<(i32, i64, String)> = sqlx::query_as(
        "select (key->>'id')::int, position, lsn::text from weir.events
         where entity = 'posts' and position > $1 order by position",
    )
    .bind(head_before)
    .fetch_all(pool)
    .await?;
    let by_id: std::collections::HashMap<i32, (i64, weir_core::Lsn)> = placed
        .into_iter()
        .map(|(id, p, l)| (id, (p, l.parse().unwrap_or(weir_core::Lsn::ZERO))))
        .collect();
    let derived: std::collections::HashMap<i32, i64> = if phase == Phase::Operator {
        sqlx::query_as::<_, (i32, f64)>(
            "select id, (extract(epoch from at) * 1000000)::float8 from post_copies where id >= $1",
        )
        .bind(first_id)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(id, us)| (id, us as i64))
        .collect()
    } else {
        Default::default()
    };
    server.stop().await;

    let mut wait_ms = Vec::new();
    let mut floor_ms = Vec::new();
    let mut derived_ms = Vec::new();
    let (mut beyond, mut not_ok) = (0usize, 0usize);
    for (c, (status, at)) in commits.iter().zip(&answered).skip(warm as usize) {
        if *status != 200 {
            not_ok += 1;
            continue;
        }
        wait_ms.push(at.duration_since(c.at).as_secs_f64() * 1e3);
        if let Some((position, lsn)) = by_id.get(&c.id) {
            if c.token.parse::<weir_core::Lsn>().is_ok_and(|t| t > *lsn) {
                beyond += 1;
            }
            if let Some((_, n)) = notes.iter().find(|(p, _)| p >= position) {
                floor_ms.push(n.saturating_duration_since(c.at).as_secs_f64() * 1e3);
            }
        }
        if let Some(us) = derived.get(&c.id) {
            derived_ms.push((us - c.wall_us) as f64 / 1e3);
        }
    }
    let measured = commits.len().saturating_sub(warm as usize);
    let wait = Percentiles::of(wait_ms).context("no long-poll answered 200")?;
    let floor = Percentiles::of(floor_ms).context("no append notification matched")?;
    println!(
        "  {} commits measured; {} answered other than 200; tokens beyond their own commit's \
         LSN: {} ({:.0}%)",
        thousands(measured as f64),
        not_ok,
        thousands(beyond as f64),
        100.0 * beyond as f64 / measured.max(1) as f64
    );
    println!("{}", line("commit → 200", &wait));
    println!("{}", line("commit → logged", &floor));
    let (reference_name, reference) = match Percentiles::of(derived_ms) {
        Some(d) => {
            println!("{}", line("commit → derived row", &d));
            ("commit → derived row", d)
        }
        None => ("commit → logged", floor),
    };
    match queries {
        Some(q) => println!(
            "  watcher queries        {} in {:.1} s ({:.0}/s) for {} + {} waiters",
            thousands(q),
            seconds,
            q / seconds,
            thousands(args.waiters as f64),
            args.rate
        ),
        None => println!("  watcher queries        unknown (no weir_process_watch_queries_total)"),
    }
    println!();
    Ok(PhaseResult { phase, wait, reference_name, reference })
}

async fn log_head(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("select coalesce(max(position), 0) from weir.events")
        .fetch_one(pool)
        .await?)
}

/// `weir_process_watch_queries_total` from the server's `/metrics`.
async fn watcher_queries(http: &reqwest::Client, base: &str) -> Option<f64> {
    let text = http.get(format!("{base}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines()
        .filter(|l| l.starts_with("weir_process_watch_queries_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}
