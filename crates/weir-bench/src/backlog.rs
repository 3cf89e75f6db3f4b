//! `weir-bench backlog`: does `weir run`'s memory stay bounded when it has a backlog of
//! millions of events to work through? Two backlogs, each measured against the same process's
//! RSS idle on an empty log, in the same run.
//!
//! Setup: a private cluster (`fsync=on`) unless `--url` names a server; a fresh database with
//! `posts(id bigint primary key, n int, note text)` (the table [`WeirProcess`] watches) and
//! `post_copies` of the same shape (the derived table, not watched); `weir init` (the slot is
//! created there). Every `weir run` is a **separate process** (this executable's hidden `weir`
//! command, as in `fanout`), so that its `VmRSS` (`/proc/<pid>/status`) is the server's alone.
//!
//! ```text
//! reference  weir run, empty log: no operator ─ settled RSS ─ stop
//!            weir run, empty log: the operator (its consumer created, at position 0) ─ settled RSS ─ stop
//! writes     --events rows into posts, --rows-per-transaction per transaction (generate_series),
//!            no weir running: the slot holds them as a WAL backlog
//! catch-up   weir run, no operator ─ RSS when /v1/health first answers, then every 500 ms ─
//!            until weir.source_state.position = --events ─ RSS settled ─ stop
//! drain      [`analyze weir.events` with --analyze true]; weir run with the operator (`post_copies`,
//!            per_key, 8 lanes) ─ it reads the whole log from position 1 ─ RSS every 500 ms ─
//!            until its lowest lane checkpoint reaches the head or --drain-seconds pass ─ stop
//! tenth      the same four steps on a second database with --events / 10 (unless --no-tenth)
//! ```
//!
//! Per phase: the rate (changes/s logged, events/s handled: `count(*)` of `post_copies`), RSS
//! when the server first answered, the peak (`VmHWM`, the kernel's high-water mark of the
//! process, which the 500 ms samples cannot miss), at the end, and the sampled RSS at 10 %,
//! 50 % and 90 % of the phase with the change over its second half (from the sample at 50 %
//! to the last, past the first seconds' warm-up) beside the events done meanwhile — what would
//! show memory growing with the backlog. CPU over each phase (weir, PostgreSQL, other processes) says how
//! busy the shared machine was.
//!
//! The drain runs on the statistics weir itself gathers: the appender analyzes the partition it
//! fills each time its rows double (`crates/weir-log/src/append.rs`). Before it did, a
//! partition of `weir.events` never analyzed (autovacuum gets to a fresh one only after its
//! naptime) had the page read of `weir_log::LogReader::read` planned on a guess of a few rows —
//! a bitmap scan of `(entity, position)` over every later event and a top-N sort — so each page
//! of 500 read the whole rest of the backlog (725 ms per page at 180,000 events to go, 0.5 ms
//! once analyzed) and the drain crawled at ~240 events/s until autovacuum came round.
//! `--analyze true` runs `analyze weir.events` before the drain, the way this benchmark did
//! then, for comparison.
//!
//! Targets (printed beside the figures; a miss does not fail the command): the drain's peak ≤
//! [`TARGET_DRAIN_OVER_IDLE`] × the idle RSS with the operator; the catch-up's peak ≤
//! [`TARGET_CATCH_UP_MB`] MB (its queue is a fixed size of its own, see the constant; its
//! ratio to idle is printed too); and the backlog's size does not change either peak: the peak
//! over `--events` ≤ [`TARGET_PEAK_OVER_TENTH`] × the peak over a tenth of it.
//!
//! Run: `cargo run --release -p weir-bench -- backlog` (10,000,000 events, then 1,000,000: 10
//! to 15 minutes on two cores, and about 10 GB of disk at the peak for the WAL, the log and the
//! tables; `--events 200000 --drain-seconds 20 --no-tenth` for a quick run, as in `all
//! --quick`).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::cpu::{CpuReport, CpuSampler};
use crate::fanout::{RunningWeir, WeirProcess};
use crate::procfs::status_kib;
use crate::report::{self, Row, ratio, thousands, verdict};
use crate::server::{PgServer, ServerArgs};

/// The drain's peak RSS at most this many times the idle RSS of the same configuration.
const TARGET_DRAIN_OVER_IDLE: f64 = 2.0;
/// The catch-up's peak RSS at most this, in MB (as `ingest`'s peak on a huge transaction): its
/// working set is the queue between the slot's reader and the log's writer, which holds up to
/// 2 × `batch_max_events` changes by design (plus the transaction being assembled and the two
/// appends in flight), a fixed size of its own rather than a multiple of the idle process.
const TARGET_CATCH_UP_MB: f64 = 256.0;
/// The peak over `--events` at most this many times the peak over a tenth of them.
const TARGET_PEAK_OVER_TENTH: f64 = 1.25;
/// How often the RSS is sampled during a phase.
const RSS_EVERY: Duration = Duration::from_millis(500);
/// How often the log head or the operator's checkpoint is read during a phase.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Catch-up fails when the log head has not moved for this long.
const STALL: Duration = Duration::from_secs(120);
/// How the CPU sampler reports the `weir run` process.
const WEIR_SERVER: &str = "weir server";

const SCHEMA: &str = "
    create table posts (id bigint primary key, n int not null, note text not null);
    create table post_copies (id bigint primary key, n int not null, note text not null);";

/// The consumer's name (and its default target table).
const OPERATOR: &str = "post_copies";

/// The operator of the drain, as in `weir.toml`: per_key ordering over the default 8 lanes,
/// `start_from` the default `beginning`.
const OPERATOR_TOML: &str = r#"
[[operators]]
name = "post_copies"
entities = ["posts"]
sql = """
insert into post_copies (id, n, note) select id, n, note from posts where id = $1
on conflict (id) do update set n = excluded.n, note = excluded.note
"""
"#;

/// Arguments of `weir-bench backlog`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Rows written (one change, one event each) while `weir run` is not running.
    #[arg(long, default_value_t = 10_000_000)]
    events: i64,
    /// Rows per transaction of those writes.
    #[arg(long, default_value_t = 10_000)]
    rows_per_transaction: i64,
    /// Longest the operator drains the log before the phase stops (it stops earlier once its
    /// checkpoint reaches the head).
    #[arg(long, default_value_t = 120)]
    drain_seconds: u64,
    /// Skip the second run over a tenth of `--events` (the peak against the backlog's size).
    #[arg(long)]
    no_tenth: bool,
    /// `analyze weir.events` before the drain (`--analyze true`). By default the drain runs on
    /// the statistics weir gathered itself while it logged the backlog (see the module
    /// documentation).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    analyze: bool,
    #[command(flatten)]
    server: ServerArgs,
}

/// `weir-bench backlog`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.events < 1 || args.rows_per_transaction < 1 || args.drain_seconds == 0 {
        bail!("--events, --rows-per-transaction and --drain-seconds must be at least 1");
    }
    let tenth = args.events / 10;
    if !args.no_tenth && tenth < 1 {
        bail!("--events / 10 is no event: use at least 10 events, or --no-tenth");
    }
    let pg = PgServer::start(args.server.url.clone(), false, Vec::new(), None).await?;
    let cpus = pg
        .print_header("backlog", "; `weir run` as a separate process (`weir-bench weir run`)")
        .await?;
    println!(
        "  backlog  {} rows into posts(id bigint, n int, note text 32 B) in transactions of {} \
         while weir does not run{}",
        thousands(args.events as f64),
        thousands(args.rows_per_transaction as f64),
        if args.no_tenth {
            String::new()
        } else {
            format!("; then again with {}", thousands(tenth as f64))
        }
    );
    println!(
        "  drain    one SQL operator (per_key, 8 lanes) copying each post, for at most {} s",
        args.drain_seconds
    );
    println!();

    let mut runs = vec![backlog(&pg, &args, args.events).await?];
    if !args.no_tenth {
        runs.push(backlog(&pg, &args, tenth).await?);
    }
    print_summary(&args, &runs, cpus);
    record_summary(&runs);
    pg.admin.close().await;
    Ok(())
}

/// One backlog's figures.
struct BacklogRun {
    events: i64,
    /// Settled RSS on an empty log, without and with the operator (KiB).
    idle_ingest: u64,
    idle_operator: u64,
    writes_seconds: f64,
    catch_up: Phase,
    drain: Phase,
}

impl BacklogRun {
    fn catch_up_over_idle(&self) -> f64 {
        self.catch_up.rss_peak as f64 / self.idle_ingest.max(1) as f64
    }

    fn catch_up_met(&self) -> bool {
        self.catch_up.rss_peak as f64 / 1024.0 <= TARGET_CATCH_UP_MB
    }

    fn drain_over_idle(&self) -> f64 {
        self.drain.rss_peak as f64 / self.idle_operator.max(1) as f64
    }
}

/// A phase of `weir run` working through the backlog.
#[derive(Debug)]
struct Phase {
    /// Changes logged (catch-up) or events handled (drain) when the clock stopped.
    done: i64,
    /// From starting `weir run` to the end of the phase.
    seconds: f64,
    /// Whether it reached the head (the drain may stop at `--drain-seconds` first).
    complete: bool,
    /// RSS when `/v1/health` first answered, and how far the work was then.
    rss_start: u64,
    done_at_start: i64,
    /// `VmHWM` at the end of the phase: the process's peak since it started.
    rss_peak: u64,
    /// The last sample (at the end of the phase) and, for the catch-up, the settled RSS after.
    rss_end: u64,
    rss_after: Option<u64>,
    /// (seconds since start, RSS KiB, progress) every [`RSS_EVERY`].
    samples: Vec<(f64, u64, i64)>,
    cpu: CpuReport,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.done as f64 / self.seconds.max(1e-9)
    }

    /// The sample nearest `share` of the phase's duration.
    fn at(&self, share: f64) -> Option<(f64, u64, i64)> {
        let t = share * self.seconds;
        self.samples.iter().copied().min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
    }

    /// RSS growth over the second half of the phase (from the sample at 50 % to the last one,
    /// past the warm-up of the first seconds): MB, and the events done meanwhile. (Not per
    /// event: over a short phase the samples' own wobble of a MB or two would read as a slope.)
    fn second_half(&self) -> Option<(f64, i64)> {
        let (a, b) = (self.at(0.5)?, *self.samples.last()?);
        (b.0 > a.0).then(|| ((b.1 as f64 - a.1 as f64) / 1024.0, b.2 - a.2))
    }

    /// The growth over the second half, in words.
    fn growth(&self) -> String {
        self.second_half().map_or("RSS over the second half: -".into(), |(g, n)| {
            format!(
                "RSS over the second half {g:+.1} MB while {} more were done",
                thousands(n as f64)
            )
        })
    }

    fn cpu_line(&self) -> String {
        let pct = |s: f64| 100.0 * s / self.cpu.wall.max(1e-9);
        let weir = pct(self.cpu.watched(WEIR_SERVER));
        let postgres = pct(self.cpu.server_total());
        let here = pct(self.cpu.this_process);
        let others = (pct(self.cpu.machine) - weir - postgres - here).max(0.0);
        let pg = if self.cpu.local {
            format!("PostgreSQL {postgres:.0}%")
        } else {
            "PostgreSQL not local".into()
        };
        format!(
            "cpu: weir {weir:.0}%, {pg}, this process {here:.0}%, other processes {others:.0}% \
             (% of one core)"
        )
    }
}

fn mb(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 / 1024.0)
}

/// Every phase on a fresh database with `events` rows of backlog.
async fn backlog(pg: &PgServer, args: &Args, events: i64) -> anyhow::Result<BacklogRun> {
    println!("######## a backlog of {} events ########", thousands(events as f64));
    let name = format!("weir_bench_backlog_{}_{events}", std::process::id());
    let db_url = pg.create_db(&name).await?;
    let dir = std::env::temp_dir().join(format!("weir-bench-backlog-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = async {
        let pool = PgPoolOptions::new().max_connections(2).connect(&db_url).await?;
        let r = phases(args, pg.postmaster, &pool, &db_url, &name, &dir, events).await;
        pool.close().await;
        r
    }
    .await;
    pg.drop_db(&name).await?;
    let _ = std::fs::remove_dir_all(&dir);
    println!();
    result
}

async fn phases(
    args: &Args,
    postmaster: Option<u32>,
    pool: &PgPool,
    db_url: &str,
    name: &str,
    dir: &std::path::Path,
    events: i64,
) -> anyhow::Result<BacklogRun> {
    sqlx::raw_sql(SCHEMA).execute(pool).await?;
    let weir = WeirProcess::init(db_url, name, dir, None)?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let toml = dir.join("weir.toml");

    println!("== reference: `weir run` idle on an empty log ==");
    std::fs::write(&toml, "")?;
    let idle_ingest = idle_rss(&weir, &http, pool, None).await.context("idle, no operator")?;
    std::fs::write(&toml, OPERATOR_TOML)?;
    let idle_operator =
        idle_rss(&weir, &http, pool, Some(OPERATOR)).await.context("idle, with the operator")?;
    println!(
        "  settled RSS: {} without an operator, {} with the operator `{OPERATOR}` (its consumer \
         now exists, at position 0)",
        mb(idle_ingest),
        mb(idle_operator)
    );

    println!("== writes: {} rows while weir does not run ==", thousands(events as f64));
    let t = Instant::now();
    write_rows(pool, events, args.rows_per_transaction).await?;
    let writes_seconds = t.elapsed().as_secs_f64();
    let wal: String = sqlx::query_scalar(
        "select pg_size_pretty(pg_current_wal_lsn() - restart_lsn)
         from pg_replication_slots where slot_name = $1",
    )
    .bind(name)
    .fetch_one(pool)
    .await?;
    println!(
        "  {} rows in {writes_seconds:.1} s ({}/s); the slot holds {wal} of WAL",
        thousands(events as f64),
        thousands(events as f64 / writes_seconds.max(1e-9))
    );

    println!("== catch-up: `weir run` (no operator) logs the WAL backlog ==");
    std::fs::write(&toml, "")?;
    let catch_up =
        catch_up(&weir, &http, pool, postmaster, events).await.context("the catch-up")?;
    print_phase(&catch_up, "changes logged");
    println!("  {}", catch_up.cpu_line());
    print_log_warnings(dir);

    println!(
        "== drain: `weir run` with the operator reads the log from position 1 (at most {} s) ==",
        args.drain_seconds
    );
    if args.analyze {
        let t = Instant::now();
        sqlx::raw_sql("analyze weir.events").execute(pool).await?;
        println!(
            "  `analyze weir.events` first, in {:.1} s (not in the figures)",
            t.elapsed().as_secs_f64()
        );
    } else {
        println!("  on the statistics weir gathered while logging (no `analyze` of its own)");
    }
    std::fs::write(&toml, OPERATOR_TOML)?;
    let limit = Duration::from_secs(args.drain_seconds);
    let drain = drain(&weir, &http, pool, postmaster, events, limit).await.context("the drain")?;
    print_phase(&drain, "events handled");
    println!("  {}", drain.cpu_line());
    print_log_warnings(dir);
    Ok(BacklogRun { events, idle_ingest, idle_operator, writes_seconds, catch_up, drain })
}

/// Starts `weir run` once the previous one has let go of the slot (or a new one would wait as
/// a standby).
async fn start(
    weir: &WeirProcess,
    http: &reqwest::Client,
    pool: &PgPool,
) -> anyhow::Result<RunningWeir> {
    let t = Instant::now();
    loop {
        let active: bool = sqlx::query_scalar(
            "select coalesce(bool_or(active), false) from pg_replication_slots where slot_name = $1",
        )
        .bind(&weir.slot)
        .fetch_one(pool)
        .await?;
        if !active {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the slot {} was still active 30 s after `weir run` stopped", weir.slot);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    weir.start(http).await
}

/// The settled RSS of `weir run` on the empty log; with `consumer`, once its lanes are
/// registered (its checkpoints exist).
async fn idle_rss(
    weir: &WeirProcess,
    http: &reqwest::Client,
    pool: &PgPool,
    consumer: Option<&str>,
) -> anyhow::Result<u64> {
    let server = start(weir, http, pool).await?;
    if let Some(consumer) = consumer {
        let t = Instant::now();
        while watermark(pool, consumer).await?.is_none() {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the operator's lanes did not start within 60 s: {}", server.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = server.settled_rss_kib().await?;
    server.stop().await;
    Ok(rss)
}

/// `events` rows into `posts`, `per_transaction` per transaction.
async fn write_rows(pool: &PgPool, events: i64, per_transaction: i64) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut printed = Instant::now();
    let mut first = 1i64;
    while first <= events {
        let last = (first + per_transaction - 1).min(events);
        sqlx::query(
            "insert into posts (id, n, note)
             select g, (g % 1000)::int, md5(g::text) from generate_series($1::bigint, $2::bigint) g",
        )
        .bind(first)
        .bind(last)
        .execute(pool)
        .await?;
        first = last + 1;
        if printed.elapsed() > Duration::from_secs(30) {
            printed = Instant::now();
            println!(
                "  {:>6.1} s: {} rows written",
                started.elapsed().as_secs_f64(),
                thousands(last as f64)
            );
        }
    }
    Ok(())
}

/// The last position logged.
async fn log_head(pool: &PgPool, slot: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "select coalesce(max(position), 0) from weir.source_state where slot = $1",
    )
    .bind(slot)
    .fetch_one(pool)
    .await?)
}

/// The consumer's watermark (every event at or below it is handled); `None` before its lanes
/// exist.
async fn watermark(pool: &PgPool, consumer: &str) -> anyhow::Result<Option<i64>> {
    Ok(sqlx::query_scalar("select min(position) from weir.checkpoints where consumer = $1")
        .bind(consumer)
        .fetch_one(pool)
        .await?)
}

/// The state of a phase while it runs: the samples and the clock.
struct Watch {
    started: Instant,
    samples: Vec<(f64, u64, i64)>,
    last_sample: Instant,
    last_print: Instant,
}

impl Watch {
    fn new(started: Instant) -> Self {
        Self { started, samples: Vec::new(), last_sample: started, last_print: Instant::now() }
    }

    /// Samples the RSS every [`RSS_EVERY`]; prints a line every 30 s (long runs).
    fn tick(&mut self, server: &RunningWeir, progress: i64, what: &str) -> anyhow::Result<()> {
        if self.last_sample.elapsed() >= RSS_EVERY {
            self.last_sample = Instant::now();
            let rss = server.rss_kib().context("cannot read the server's VmRSS")?;
            self.samples.push((self.started.elapsed().as_secs_f64(), rss, progress));
            if self.last_print.elapsed() >= Duration::from_secs(30) {
                self.last_print = Instant::now();
                println!(
                    "  {:>6.1} s: {} {what}, RSS {}",
                    self.started.elapsed().as_secs_f64(),
                    thousands(progress as f64),
                    mb(rss)
                );
            }
        }
        Ok(())
    }
}

/// `weir run` without an operator until the log holds all `events`.
async fn catch_up(
    weir: &WeirProcess,
    http: &reqwest::Client,
    pool: &PgPool,
    postmaster: Option<u32>,
    events: i64,
) -> anyhow::Result<Phase> {
    let started = Instant::now();
    let server = start(weir, http, pool).await?;
    let rss_start = server.rss_kib().context("cannot read the server's VmRSS")?;
    let done_at_start = log_head(pool, &weir.slot).await?;
    let cpu = CpuSampler::start(postmaster, |_| "PostgreSQL".into()).watch(WEIR_SERVER, server.pid);
    let mut watch = Watch::new(started);
    let mut moved = (done_at_start, Instant::now());
    let head = loop {
        let head = log_head(pool, &weir.slot).await?;
        watch.tick(&server, head, "changes logged")?;
        if head >= events {
            break head;
        }
        if head != moved.0 {
            moved = (head, Instant::now());
        } else if moved.1.elapsed() > STALL {
            bail!(
                "the log head stayed at {} of {} for {} s: {}",
                thousands(head as f64),
                thousands(events as f64),
                STALL.as_secs(),
                server.log_tail()
            );
        }
        tokio::time::sleep(PROGRESS_EVERY).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    let rss_end = server.rss_kib().context("cannot read the server's VmRSS")?;
    watch.samples.push((seconds, rss_end, head));
    let rss_peak = status_kib(server.pid, "VmHWM").context("cannot read the server's VmHWM")?;
    let rss_after = server.settled_rss_kib().await?;
    server.stop().await;
    Ok(Phase {
        done: head,
        seconds,
        complete: true,
        rss_start,
        done_at_start,
        rss_peak,
        rss_end,
        rss_after: Some(rss_after),
        samples: watch.samples,
        cpu,
    })
}

/// `weir run` with the operator until its watermark reaches `events` or `limit` passes.
async fn drain(
    weir: &WeirProcess,
    http: &reqwest::Client,
    pool: &PgPool,
    postmaster: Option<u32>,
    events: i64,
    limit: Duration,
) -> anyhow::Result<Phase> {
    let started = Instant::now();
    let server = start(weir, http, pool).await?;
    let rss_start = server.rss_kib().context("cannot read the server's VmRSS")?;
    let done_at_start = watermark(pool, OPERATOR).await?.unwrap_or(0);
    let cpu = CpuSampler::start(postmaster, |_| "PostgreSQL".into()).watch(WEIR_SERVER, server.pid);
    let mut watch = Watch::new(started);
    let complete = loop {
        let mark = watermark(pool, OPERATOR).await?.unwrap_or(0);
        watch.tick(&server, mark, "events handled (watermark)")?;
        if mark >= events {
            break true;
        }
        if started.elapsed() >= limit {
            break false;
        }
        tokio::time::sleep(PROGRESS_EVERY).await;
    };
    // Events handled: the derived rows (one per event, each a new id), counted at once.
    let done: i64 = sqlx::query_scalar("select count(*) from post_copies").fetch_one(pool).await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    let rss_end = server.rss_kib().context("cannot read the server's VmRSS")?;
    let mark = watermark(pool, OPERATOR).await?.unwrap_or(0);
    watch.samples.push((seconds, rss_end, mark));
    let rss_peak = status_kib(server.pid, "VmHWM").context("cannot read the server's VmHWM")?;
    server.stop().await;
    if complete && done != events {
        bail!(
            "the operator's checkpoint reached the head but post_copies holds {} rows of {}",
            thousands(done as f64),
            thousands(events as f64)
        );
    }
    Ok(Phase {
        done,
        seconds,
        complete,
        rss_start,
        done_at_start,
        rss_peak,
        rss_end,
        rss_after: None,
        samples: watch.samples,
        cpu,
    })
}

fn print_phase(p: &Phase, what: &str) {
    println!(
        "  {} {what} in {:.1} s{}: {}/s (from starting `weir run`)",
        thousands(p.done as f64),
        p.seconds,
        if p.complete { "" } else { ", stopped at the time limit" },
        thousands(p.rate())
    );
    println!(
        "  RSS: {} when it first answered ({} done), peak {} (VmHWM), {} at the end{}",
        mb(p.rss_start),
        thousands(p.done_at_start as f64),
        mb(p.rss_peak),
        mb(p.rss_end),
        p.rss_after.map_or(String::new(), |a| format!(", {} settled after", mb(a)))
    );
    let at = |share: f64| {
        p.at(share).map_or("-".into(), |(t, rss, done)| {
            format!("{} at {t:.0} s ({})", mb(rss), thousands(done as f64))
        })
    };
    println!(
        "  RSS over the phase: 10% {}, 50% {}, 90% {}; {}",
        at(0.1),
        at(0.5),
        at(0.9),
        p.growth()
    );
    println!("  RSS samples every 0.5 s, evenly picked (s: MB): {}", series(&p.samples, 12));
}

/// The warnings and errors in the log of the `weir run` that just stopped (`weir-run.log` in
/// its directory, rewritten by each start), when there are any: a stall in the figures often
/// has its reason there.
fn print_log_warnings(dir: &std::path::Path) {
    let text = std::fs::read_to_string(dir.join("weir-run.log")).unwrap_or_default();
    let lines: Vec<String> = text
        .lines()
        .map(strip_escapes)
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    if lines.is_empty() {
        return;
    }
    println!("  `weir run` logged {} warnings or errors; the first:", lines.len());
    for l in lines.iter().take(3) {
        let cut: String = l.chars().take(300).collect();
        println!("    {cut}");
    }
}

/// A log line without its terminal colour codes (ESC `[` … letter).
fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// At most `n` samples evenly picked, the first and the last included.
fn series(samples: &[(f64, u64, i64)], n: usize) -> String {
    if samples.is_empty() {
        return "-".into();
    }
    let picks = n.min(samples.len()).max(1);
    (0..picks)
        .map(|i| {
            let k = if picks == 1 { 0 } else { i * (samples.len() - 1) / (picks - 1) };
            let (t, rss, _) = samples[k];
            format!("{t:.0}: {:.0}", rss as f64 / 1024.0)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_summary(args: &Args, runs: &[BacklogRun], cpus: usize) {
    println!(
        "== summary: `weir run`'s memory with a backlog ({cpus} CPUs shared by weir and \
         PostgreSQL) =="
    );
    for r in runs {
        let n = thousands(r.events as f64);
        let c = &r.catch_up;
        let d = &r.drain;
        println!(
            "  backlog of {n}: writes {:.1} s; idle RSS {} (no operator), {} (the operator)",
            r.writes_seconds,
            mb(r.idle_ingest),
            mb(r.idle_operator)
        );
        println!(
            "    catch-up {}/s in {:.1} s; peak {} (target ≤ {TARGET_CATCH_UP_MB:.0} MB) {}, {} \
             idle; {}",
            thousands(c.rate()),
            c.seconds,
            mb(c.rss_peak),
            verdict(r.catch_up_met()),
            ratio(r.catch_up_over_idle()),
            c.growth()
        );
        println!(
            "    drain {}/s, {} of {n} handled in {:.1} s{}; peak {} = {} idle (target ≤ {}) {}; \
             {}",
            thousands(d.rate()),
            thousands(d.done as f64),
            d.seconds,
            if d.complete { "" } else { " (time limit)" },
            mb(d.rss_peak),
            ratio(r.drain_over_idle()),
            ratio(TARGET_DRAIN_OVER_IDLE),
            verdict(r.drain_over_idle() <= TARGET_DRAIN_OVER_IDLE),
            d.growth()
        );
    }
    if let [full, tenth] = runs {
        for (label, a, b) in [
            ("catch-up", full.catch_up.rss_peak, tenth.catch_up.rss_peak),
            ("drain", full.drain.rss_peak, tenth.drain.rss_peak),
        ] {
            let x = a as f64 / b.max(1) as f64;
            println!(
                "  {label} peak, {} backlog / {} backlog: {} / {} = {} (target ≤ {}) {}",
                thousands(full.events as f64),
                thousands(tenth.events as f64),
                mb(a),
                mb(b),
                ratio(x),
                ratio(TARGET_PEAK_OVER_TENTH),
                verdict(x <= TARGET_PEAK_OVER_TENTH)
            );
        }
    }
    println!(
        "  (RSS: VmRSS of the `weir run` process; peak: its VmHWM, the kernel's high-water mark; \
         idle: settled on an empty log, same configuration; rates from starting `weir run`, \
         so they include its start-up; the drain stops after {} s)",
        args.drain_seconds
    );
}

/// The summary's targets, for `weir-bench all`'s table. For memory, lower is better: the
/// ratio is idle / peak (reference / measured), as for a latency.
fn record_summary(runs: &[BacklogRun]) {
    let row = |figure: String, measured: String| Row {
        benchmark: "backlog",
        figure,
        measured,
        reference: String::new(),
        ratio: None,
        target: None,
        met: None,
    };
    for r in runs {
        let n = thousands(r.events as f64);
        let (c, d) = (&r.catch_up, &r.drain);
        report::record(row(
            format!("catch-up of {n} changes, changes/s"),
            format!("{}/s", thousands(c.rate())),
        ));
        report::record(Row {
            reference: format!("{} (idle, empty log, no operator)", mb(r.idle_ingest)),
            ratio: Some(1.0 / r.catch_up_over_idle().max(1e-9)),
            target: Some(format!("≤ {TARGET_CATCH_UP_MB:.0} MB")),
            met: Some(r.catch_up_met()),
            ..row(
                format!("catch-up of {n}: peak RSS (ratio idle / peak)"),
                format!("{} ({:.2}× idle)", mb(c.rss_peak), r.catch_up_over_idle()),
            )
        });
        report::record(Row {
            reference: format!("{} (idle, empty log, the operator)", mb(r.idle_operator)),
            ratio: Some(1.0 / r.drain_over_idle().max(1e-9)),
            target: Some(format!("≤ {TARGET_DRAIN_OVER_IDLE:.0}× idle")),
            met: Some(r.drain_over_idle() <= TARGET_DRAIN_OVER_IDLE),
            ..row(
                format!("drain of {n}: peak RSS (ratio idle / peak)"),
                format!("{} ({:.2}× idle)", mb(d.rss_peak), r.drain_over_idle()),
            )
        });
        report::record(row(
            format!("drain of {n}: events/s{}", if d.complete { "" } else { " (time limit)" }),
            format!("{}/s", thousands(d.rate())),
        ));
        if let Some((g, done)) = d.second_half() {
            report::record(row(
                format!("drain of {n}: RSS growth over the second half"),
                format!("{g:+.1} MB over {} events", thousands(done as f64)),
            ));
        }
    }
    if let [full, tenth] = runs {
        for (phase, a, b) in [
            ("catch-up", full.catch_up.rss_peak, tenth.catch_up.rss_peak),
            ("drain", full.drain.rss_peak, tenth.drain.rss_peak),
        ] {
            let x = a as f64 / b.max(1) as f64;
            report::record(Row {
                reference: format!("{} ({} backlog)", mb(b), thousands(tenth.events as f64)),
                ratio: Some(1.0 / x.max(1e-9)),
                target: Some(format!("≤ {TARGET_PEAK_OVER_TENTH}×")),
                met: Some(x <= TARGET_PEAK_OVER_TENTH),
                ..row(
                    format!(
                        "{phase} peak RSS, {} backlog / a tenth",
                        thousands(full.events as f64)
                    ),
                    format!("{} ({x:.2}×)", mb(a)),
                )
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(samples: Vec<(f64, u64, i64)>, seconds: f64) -> Phase {
        Phase {
            done: 0,
            seconds,
            complete: true,
            rss_start: 0,
            done_at_start: 0,
            rss_peak: 0,
            rss_end: 0,
            rss_after: None,
            samples,
            cpu: CpuReport::default(),
        }
    }

    #[test]
    fn samples_at_shares_of_the_phase_and_growth() {
        let samples: Vec<(f64, u64, i64)> =
            (0..=100).map(|i| (i as f64, 20_480 + 1024 * i as u64 / 10, i * 10_000)).collect();
        let p = phase(samples, 100.0);
        assert_eq!(p.at(0.1).unwrap().0, 10.0);
        assert_eq!(p.at(0.9).unwrap().0, 90.0);
        // From 50 s to 100 s: 5 MB, 500,000 events.
        let (g, n) = p.second_half().unwrap();
        assert!((g - 5.0).abs() < 1e-9, "{g}");
        assert_eq!(n, 500_000);
        assert_eq!(series(&p.samples, 3), "0: 20, 50: 25, 100: 30");
        assert_eq!(series(&[], 3), "-");
        assert!(phase(Vec::new(), 1.0).second_half().is_none());
    }

    #[test]
    fn log_lines_lose_their_colours() {
        let line =
            "\x1b[2m2026-12-03T15:33:18Z\x1b[0m \x1b[33m WARN\x1b[0m \x1b[2mweir_log\x1b[0m: x";
        assert_eq!(strip_escapes(line), "2026-12-03T15:33:18Z  WARN weir_log: x");
    }
}
