//! The `weir` command. The only place with anyhow, signal handling and the tracing subscriber.
//!
//! Where it sits: on top of everything. `init`, `run`, `status`, `tail` and `doctor` drive the
//! `weir` library against the configured database; `dev` and `demo` first start a private
//! PostgreSQL from the installed server binaries (weir-testkit).

mod bench_common;
mod bench_fanout;
mod bench_ingest;
mod bench_jobs;
mod bench_operators;
mod demo;
mod jobs;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use weir::{Config, EventFilter, Kind};

/// weir: ordered, reliable reactions to changes in PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about)]
struct Cli {
    /// The configuration file. Defaults to ./weir.toml when it exists.
    #[arg(long, short, global = true, env = "WEIR_CONFIG")]
    config: Option<PathBuf>,
    /// Database URL (overrides the file and DATABASE_URL).
    #[arg(long, global = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update the weir schema, the publication and the replication slot.
    Init,
    /// Stream changes into the log, run the operators and serve HTTP ([http] bind) until
    /// stopped (Ctrl-C); a second process waits as standby.
    Run,
    /// Show the source's slot lag, last position, rate and delay.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print events as JSON lines as they arrive.
    Tail {
        /// Only these entities (repeat or comma-separate).
        #[arg(long, short, value_delimiter = ',')]
        entity: Vec<String>,
        /// Only these kinds: insert, update, delete, truncate, message.
        #[arg(long, short, value_delimiter = ',')]
        kind: Vec<String>,
        /// Start after this position (default: only new events).
        #[arg(long)]
        from: Option<i64>,
        /// Stop after this many events.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Check the server and database for what weir needs; print the fix for each problem.
    Doctor,
    /// Restart a halted consumer (operator) at the event it halted on.
    Resume {
        /// The consumer's name.
        name: String,
    },
    /// Skip the event a halted consumer stopped on (recorded as skipped) and resume after it.
    Skip {
        /// The consumer's name.
        name: String,
    },
    /// The job queue: enqueue, list, show, retry, cancel, stats.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Events set aside by consumers with `on_exhausted = "park"`.
    #[command(subcommand)]
    Parked(ParkedCommand),
    /// Start a private PostgreSQL in ./.weir that survives restarts and print its URL.
    Dev {
        /// Directory for the cluster.
        #[arg(long, default_value = ".weir")]
        dir: PathBuf,
    },
    /// A demo on a private PostgreSQL: posts and comments change, events arrive in the log live.
    Demo {
        /// How long to write changes, in seconds.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
    },
    /// Benchmarks that print figures and a ratio against a reference measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Ingestion throughput vs pg_recvlogical, live latency, peak RSS on a huge transaction.
    Ingest(bench_ingest::IngestBenchArgs),
    /// Operators: events/s with global vs per-key lanes, end-to-end latency.
    Operators(bench_operators::OperatorsBenchArgs),
    /// The job queue against graphile-worker (npm), measured in one run.
    Jobs(bench_jobs::JobsBenchArgs),
    /// Realtime channels: SSE clients' latency from commit, memory per idle client.
    Fanout(bench_fanout::Args),
}

#[derive(Debug, Subcommand)]
enum ParkedCommand {
    /// List parked events.
    List {
        /// Only this consumer's.
        consumer: Option<String>,
    },
    /// Retry parked events of a consumer (all, or one position), in order per key.
    Retry {
        /// The consumer.
        consumer: String,
        /// Only this position.
        position: Option<i64>,
    },
    /// Discard parked events of a consumer (all, or one position).
    Discard {
        /// The consumer.
        consumer: String,
        /// Only this position.
        position: Option<i64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.command);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weir: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weir: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(command: &Command) {
    let default = match command {
        Command::Run | Command::Dev { .. } => "info,pg_walstream=warn,sqlx=warn",
        _ => "warn,pg_walstream=error,sqlx=error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

pub(crate) fn load_config(
    cli_config: Option<&PathBuf>,
    url: Option<&str>,
) -> anyhow::Result<Config> {
    let (path, required) = match cli_config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("weir.toml"), false),
    };
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    if let Some(url) = url {
        env.push(("WEIR_DATABASE_URL".into(), url.into()));
    }
    Ok(Config::load(Some(&path), required, env)?)
}

/// Cancels on Ctrl-C or SIGTERM.
pub(crate) fn shutdown_signal() -> CancellationToken {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down");
        c.cancel();
    });
    cancel
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo { seconds } => return demo::run(seconds).await.map(|_| ExitCode::SUCCESS),
        Command::Dev { dir } => return demo::dev(&dir).await.map(|_| ExitCode::SUCCESS),
        Command::Bench(BenchCommand::Jobs(args)) => {
            return bench_jobs::run(args).await.map(|_| ExitCode::SUCCESS);
        }
        Command::Bench(BenchCommand::Ingest(args)) => {
            return bench_ingest::run(args).await.map(|_| ExitCode::SUCCESS);
        }
        Command::Bench(BenchCommand::Operators(args)) => {
            return bench_operators::run(args).await.map(|_| ExitCode::SUCCESS);
        }
        Command::Bench(BenchCommand::Fanout(args)) => {
            return bench_fanout::run(args).await.map(|_| ExitCode::SUCCESS);
        }
        _ => {}
    }
    let config = load_config(cli.config.as_ref(), cli.database_url.as_deref())?;
    match cli.command {
        Command::Doctor => {
            let checks = weir::doctor::diagnose(&config).await;
            let mut failed = false;
            for c in &checks {
                println!("{c}");
                failed |= c.verdict == weir::doctor::Verdict::Fail;
            }
            return Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS });
        }
        Command::Init => {
            let pool = weir::db::connect(&config).await?;
            let report = weir::setup::init(&pool, &config).await?;
            println!(
                "publication `{}` {} ({} tables: {})",
                config.source.publication,
                if report.created_publication { "created" } else { "up to date" },
                report.tables.len(),
                report.tables.join(", ")
            );
            println!(
                "slot `{}` {}",
                config.source.slot,
                if report.created_slot { "created" } else { "exists" }
            );
        }
        Command::Run => {
            let http = config.http.clone();
            // Bind before starting anything: a taken port is a clear error, not a half start.
            let listener = if http.enabled {
                Some(tokio::net::TcpListener::bind(&http.bind).await.with_context(|| {
                    format!(
                        "cannot listen on {} (http.bind); another process may use it: \
                         set [http] bind or WEIR_HTTP_BIND, or [http] enabled = false",
                        http.bind
                    )
                })?)
            } else {
                None
            };
            let running = weir::Weir::builder(config.clone()).start().await?;
            let cancel = shutdown_signal();
            let stop = running.cancel_token();
            tokio::spawn(async move {
                cancel.cancelled().await;
                stop.cancel();
            });
            let server = match listener {
                Some(listener) => {
                    let server = weir_server::Server::start(
                        running.pool().clone(),
                        config,
                        running.wake(),
                        running.cancel_token(),
                    )
                    .await?;
                    tracing::info!(bind = %http.bind, "serving HTTP: /v1, /v1/channels, /metrics");
                    let cancel = running.cancel_token();
                    Some(tokio::spawn(async move { server.serve(listener, cancel).await }))
                }
                None => None,
            };
            let result = running.wait().await;
            if let Some(server) = server {
                match server.await {
                    Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server stopped with an error"),
                    Err(e) => tracing::warn!(error = %e, "HTTP server panicked"),
                    Ok(Ok(())) => {}
                }
            }
            result.context("weir stopped")?;
        }
        Command::Resume { name } => {
            let pool = weir::db::connect(&config).await?;
            weir::consumer_status::consumers(&pool).await.ok();
            weir_consumer_resume(&pool, &name).await?;
            println!("consumer `{name}` resumed at the event it halted on");
        }
        Command::Jobs(cmd) => {
            let pool = weir::db::connect(&config).await?;
            jobs::run(cmd, pool).await?;
        }
        Command::Skip { name } => {
            let pool = weir::db::connect(&config).await?;
            let position = weir::skip(&pool, &name).await?;
            println!("consumer `{name}` skipped position {position} and resumed after it");
        }
        Command::Parked(cmd) => {
            let pool = weir::db::connect(&config).await?;
            match cmd {
                ParkedCommand::List { consumer } => {
                    let parked = weir::consumer_status::parked(&pool, consumer.as_deref()).await?;
                    if parked.is_empty() {
                        println!("no parked events");
                    }
                    for p in parked {
                        println!(
                            "{} #{} {} key={} attempts={}{}: {}",
                            p.consumer,
                            p.position,
                            p.entity,
                            p.partition_key,
                            p.attempts,
                            if p.retry_requested { " (retry pending)" } else { "" },
                            p.error
                        );
                    }
                }
                ParkedCommand::Retry { consumer, position } => {
                    let n = weir::consumer_status::retry_parked(&pool, &consumer, position).await?;
                    println!("{n} parked events of `{consumer}` will be retried");
                }
                ParkedCommand::Discard { consumer, position } => {
                    let n =
                        weir::consumer_status::discard_parked(&pool, &consumer, position).await?;
                    println!("{n} parked events of `{consumer}` discarded");
                }
            }
        }
        Command::Status { json } => {
            let pool = weir::db::connect(&config).await?;
            let s = weir::status::source_status(&pool, &config).await?;
            let consumers = weir::consumer_status::consumers(&pool).await.unwrap_or_default();
            if json {
                let all = serde_json::json!({"source": s, "consumers": consumers});
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!(
                    "slot            {} ({})",
                    s.slot,
                    if s.slot_active { "active" } else { "inactive" }
                );
                println!(
                    "slot lag        {}",
                    s.slot_lag_bytes.map_or("-".into(), weir::doctor::human_bytes)
                );
                println!("log position    {} (commit LSN {})", s.position, s.lsn);
                println!("events/s        {:.1} (last 10 s)", s.events_per_second);
                println!("seconds behind  {:.3}", s.seconds_behind);
                match (&s.holder, s.heartbeat_age_seconds) {
                    (Some(h), Some(age)) => {
                        println!("held by         {h} (heartbeat {age:.1} s ago)")
                    }
                    _ => println!("held by         nobody has run this slot yet"),
                }
                for c in &consumers {
                    println!();
                    print!("consumer {} — {}", c.name, c.state);
                    if let Some(h) = &c.halted {
                        print!(
                            " at position {} (lane {}, attempt {}): {}",
                            h["position"],
                            h["lane"],
                            h["attempt"],
                            h["error"].as_str().unwrap_or("")
                        );
                    }
                    if c.parked > 0 {
                        print!(", {} parked", c.parked);
                    }
                    println!();
                    for l in &c.lanes {
                        println!(
                            "  lane {:<3} {:<8} position {:<10} lag {} events / {:.1} s{}{}",
                            l.lane,
                            l.state,
                            l.position,
                            l.lag_events,
                            l.lag_seconds,
                            l.current_position
                                .map(|p| format!(", at #{p} attempt {}", l.attempt))
                                .unwrap_or_default(),
                            l.last_error
                                .as_deref()
                                .map(|e| format!(", last error: {e}"))
                                .unwrap_or_default(),
                        );
                    }
                }
            }
        }
        Command::Tail { entity, kind, from, limit } => {
            let mut kinds = Vec::new();
            for k in &kind {
                kinds.push(Kind::parse(k).with_context(|| {
                    format!("unknown kind `{k}`; use insert, update, delete, truncate or message")
                })?);
            }
            let pool = weir::db::connect(&config).await?;
            tail(pool, EventFilter { entities: entity, kinds }, from, limit).await?;
        }
        Command::Demo { .. } | Command::Dev { .. } | Command::Bench(_) => {
            unreachable!("handled above")
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn weir_consumer_resume(pool: &sqlx::PgPool, name: &str) -> anyhow::Result<()> {
    let halted = weir::consumer_status::consumers(pool)
        .await?
        .into_iter()
        .find(|c| c.name == name)
        .with_context(|| format!("no consumer named `{name}`; `weir status` lists them"))?;
    if halted.state != weir::ConsumerState::Halted {
        anyhow::bail!("consumer `{name}` is not halted (it is {})", halted.state);
    }
    weir::resume(pool, name).await?;
    Ok(())
}

/// Prints events as JSON lines, waking on the log's notifications (with a polling fallback).
pub(crate) async fn tail(
    pool: sqlx::PgPool,
    filter: EventFilter,
    from: Option<i64>,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let reader = weir::LogReader::new(pool.clone()).await?;
    let mut after = match from {
        Some(p) => p,
        None => reader.head().await?,
    };
    let cancel = shutdown_signal();
    let (mut wake, _listener) = weir_log::listen_for_appends(pool, cancel.clone());
    let mut printed = 0u64;
    const PAGE: usize = 1000;
    while !cancel.is_cancelled() {
        // The head is read first: a short page then proves nothing matching lies at or below
        // it, so a filtered tail can skip ahead without missing an event appended meanwhile.
        let head = reader.head().await?;
        let events = reader.read(after, PAGE as i64, &filter).await?;
        {
            let mut out = std::io::stdout().lock();
            for e in &events {
                writeln!(out, "{}", serde_json::to_string(e)?)?;
                printed += 1;
                if limit.is_some_and(|l| printed >= l) {
                    return Ok(());
                }
            }
            out.flush()?;
        }
        let last = events.last().map_or(after, |e| e.position);
        if events.len() == PAGE {
            after = last;
            continue;
        }
        after = last.max(head);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = wake.wait_past(after, std::time::Duration::from_secs(1)) => {}
        }
    }
    Ok(())
}
