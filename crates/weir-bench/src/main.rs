//! `weir-bench`: weir's benchmarks, apart from the shipped `weir` command. Each one starts what
//! it needs (a private PostgreSQL with `fsync=on`, or databases of its own on the `--url`
//! server) and prints its figures beside a **reference measured in the same run**, on the same
//! machine, minutes apart at most: the machine is shared and noisy, so compare the ratios of
//! one run, never figures across runs.
//!
//! - `ingest`: replication slot → durable `weir.events`, changes/s with 1- and 100-row
//!   transactions, against **`pg_recvlogical`** draining the same WAL to `/dev/null` (slots made
//!   at the same point, drained one after the other); then commit → the append's NOTIFY at a
//!   steady rate, and the peak RSS of ingestion during one huge transaction.
//! - `operators`: a transactional SQL operator's events/s with `per_key` ordering over lanes,
//!   against the **same operator with `global` ordering** (one lane, a head-of-line design) and
//!   a floor of **plain SQL loops** doing the engine's per-event SQL; then source commit →
//!   derived row at a steady rate.
//! - `jobs`: enqueue and drain jobs/s of the job queue, against **graphile-worker** (npm) run
//!   on the same database right after each weir measurement; then enqueue → worker start at a
//!   steady rate, and jobs/s with the dead tuples left over rounds of enqueue-while-draining.
//! - `streams`: appends/s through `weir.append` with 1 and 50 writers, batches of 1 and 100,
//!   against **plain inserts of the same rows** into a table of the same shape; delivery through
//!   a subscription with 1 and 8 emitters; append → handler latency at a steady rate.
//! - `fanout`: SSE commit → client latency and memory per idle client of a `weir run` process,
//!   against **commit → the append's `LISTEN weir_events` notification** (the floor a channel
//!   builds on).
//! - `process`: process status, commit → `GET /v1/process/wait` answering 200 with a thousand
//!   other long-polls waiting, against **commit → logged** (the append's notification) and
//!   commit → derived row, in the same run.
//! - `http`: the HTTP API of a `weir run` process at a fixed request rate (open-loop, latency
//!   from each request's due instant): `GET /v1/process/check` and pages of `GET /v1/log`
//!   against **`GET /v1/health`** (no database work: the floor of the HTTP stack), then the
//!   check again beside 500 slowloris connections against itself without them.
//! - `sinks`: a subscription delivered by `weir run` to a webhook (a receiver in this process)
//!   and to NATS JetStream, events/s with pool sizes 1 and 8, against **plain clients** (reqwest
//!   posting the same signed bodies, async-nats publishing the same messages with 256 PubAcks in
//!   flight) right after each; then commit → receiver latency at a steady rate.
//! - `backfill`: a table's existing rows into the log as `read` events (chunks, DBLog
//!   watermarks) while live changes arrive, rows/s against **`copy (select * from t) to
//!   stdout`** of the same table read through one client; the peak RSS of the ingesting
//!   process, the rows dropped by windows, where the CPU went; a sweep of chunk sizes.
//! - `backlog`: `weir run`'s memory working through a backlog (10 million events): ingestion
//!   catching up on a WAL backlog, then an operator draining the log from its first position,
//!   RSS sampled throughout, against **the same process's RSS idle on an empty log**; again
//!   over a tenth of the backlog (does its size change the peak?).
//! - `all [--quick]`: the regression run — every benchmark above in sequence in this process,
//!   then **one table of every ratio and target** they recorded (benchmark, figure, measured,
//!   reference, ratio, target, verdict) and the time each took; a benchmark that fails is a
//!   row and the run goes on. `--quick` (small sizes, under 5 minutes on two cores) is the run
//!   to compare a change against (`docs/benchmarks.md` has its last table).
//!
//! ```text
//! main ── ingest / operators / jobs / fanout / process / streams / sinks / backfill / backlog / http  (one module per benchmark, its args and phases)
//!           │ server      PgServer: the --url server or a private cluster; create/drop databases
//!           │ cpu         CpuSampler: where the CPU went over a window (labels chosen by the caller)
//!           │ procfs      /proc readers: ticks, RSS, children, titles
//!           │ percentile  nearest-rank percentiles, medians
//!           │ report      thousands, ratios, verdicts beside targets; the rows for `all`
//!           └ thread      writers and listeners on threads of their own (clocks not delayed)
//! main ── all ── each benchmark above in turn, then report::table of the rows they recorded
//! ```
//!
//! Run: `cargo run --release -p weir-bench -- <benchmark> --help`. A missed target is printed,
//! not an error. `fanout` and `sinks` start `weir run` as a child process: this executable's
//! hidden `weir` command, which is the weir-cli library's, so the server measured is built from
//! the same source as the benchmark.

mod all;
mod backfill;
mod backlog;
mod cpu;
mod fanout;
mod http;
mod ingest;
mod jobs;
mod operators;
mod percentile;
mod process;
mod procfs;
mod report;
mod server;
mod sinks;
mod streams;
mod subscriber;
mod thread;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The hidden command under which this executable is `weir` (see [`Command::Weir`]).
pub(crate) const WEIR_COMMAND: &str = "weir";

/// weir's benchmarks: each prints figures and a ratio against a reference measured in the same
/// run.
#[derive(Debug, Parser)]
#[command(name = "weir-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ingestion throughput vs pg_recvlogical, live latency, peak RSS on a huge transaction.
    Ingest(ingest::Args),
    /// Operators: events/s with global vs per-key lanes, end-to-end latency.
    Operators(operators::Args),
    /// The job queue against graphile-worker (npm), measured in one run.
    Jobs(jobs::Args),
    /// Realtime channels: SSE clients' latency from commit, memory per idle client.
    Fanout(fanout::Args),
    /// The event store: appends/s against plain inserts, delivery through subscriptions, latency.
    Streams(streams::Args),
    /// Process status: commit → long-poll 200 with many waiters, against commit → logged.
    Process(process::Args),
    /// The HTTP API at a fixed rate: process/check and the log against /v1/health, slowloris.
    Http(http::Args),
    /// Sinks: webhook and NATS JetStream delivery against plain clients, commit → receiver.
    Sinks(sinks::Args),
    /// Backfill: existing rows into the log during live changes, against COPY of the table.
    Backfill(backfill::Args),
    /// Memory with a backlog: WAL catch-up and an operator draining the log, against idle RSS.
    Backlog(backlog::Args),
    /// Every benchmark in sequence, then one table of every ratio and target (`--quick`: < 5 min).
    All(all::Args),
    /// A process that only delivers one subscription, for the crash tests that kill it.
    #[command(hide = true)]
    Subscriber(subscriber::Args),
    /// The `weir` command itself (weir-cli's), for the processes `fanout` and `sinks` start.
    #[command(hide = true)]
    Weir {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Weir { args } = cli.command {
        return weir(args);
    }
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weir-bench: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Ingest(args) => ingest::run(args).await,
            Command::Operators(args) => operators::run(args).await,
            Command::Jobs(args) => jobs::run(args).await,
            Command::Fanout(args) => fanout::run(args).await,
            Command::Streams(args) => streams::run(args).await,
            Command::Process(args) => process::run(args).await,
            Command::Http(args) => http::run(args).await,
            Command::Sinks(args) => sinks::run(args).await,
            Command::Backfill(args) => backfill::run(args).await,
            Command::Backlog(args) => backlog::run(args).await,
            Command::All(args) => all::run(args).await,
            Command::Subscriber(args) => subscriber::run(args).await,
            Command::Weir { .. } => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Benchmarks print their own figures; the libraries speak only of trouble (`WEIR_LOG`
/// overrides).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx=error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Runs `weir <args>` as the `weir` binary (weir-cli's `main.rs`) does.
fn weir(args: Vec<std::ffi::OsString>) -> ExitCode {
    let cli = weir_cli::Cli::parse_from(std::iter::once("weir".into()).chain(args));
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.command.default_log_filter()));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(weir_cli::run(cli)));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weir: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
