//! The `weir` command as a library: its arguments ([`Cli`]), the configuration it loads and
//! one module per command. `main.rs` only parses, sets up tracing, calls [`run`] and turns an
//! error into one line and an exit code; the tests in `tests/` call [`run`] the same way.
//!
//! Where it sits: on top of everything. `init`, `run`, `status`, `tail`, `doctor`, `resume`,
//! `skip`, `backfill`, `parked`, `operators`, `jobs`, `streams` and `subscriptions` drive the
//! `weir` library against the
//! configured database; `dev` and `demo` first start a private PostgreSQL from the installed
//! server binaries (weir-testkit).
//!
//! ```text
//! Cli ──→ run(cli) ── demo / dev ────────────────────────→ their own private cluster
//!                  └─ load_config(--config, --database-url, env) ──→ init / run / status / tail
//!                                                                    doctor / resume / skip
//!                                                                    parked / operators / jobs /
//!                                                                    streams / subscriptions
//! ```
//!
//! anyhow lives here and in the binary only: this is the binary's library, and each command
//! adds the context a person at a terminal needs.

pub mod backfill;
mod demo;
mod dev;
mod doctor;
mod init;
pub mod jobs;
pub mod operators;
pub mod parked;
mod resume;
mod run;
mod skip;
mod status;
pub mod streams;
pub mod subscriptions;
mod tail;
pub mod webhooks;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use weir::Config;

/// weir: ordered, reliable reactions to changes in PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about)]
pub struct Cli {
    /// The configuration file. Defaults to ./weir.toml when it exists.
    #[arg(long, short, global = true, env = "WEIR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Database URL (overrides the file and DATABASE_URL).
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// The `weir` commands.
#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// Load the rows a table held before capture into the log as `read` events (chunk by chunk,
    /// no lock, capture goes on), and follow the progress; `--list`, `--cancel TABLE`.
    Backfill(backfill::BackfillArgs),
    /// The job queue: enqueue, list, show, retry, cancel, stats.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// The event store's streams: append, read, list, delete, truncate.
    #[command(subcommand)]
    Streams(streams::StreamsCommand),
    /// The [[operators]] of weir.toml: list, rebuild a target table.
    #[command(subcommand)]
    Operators(operators::OperatorsCommand),
    /// Events set aside by consumers with `on_exhausted = "park"`.
    #[command(subcommand)]
    Parked(parked::ParkedCommand),
    /// Subscriptions: create, list, show, update, stop, start, delete.
    #[command(subcommand)]
    Subscriptions(subscriptions::SubscriptionsCommand),
    /// Webhook signing secrets: make one, check a request's signature.
    #[command(subcommand)]
    Webhooks(webhooks::WebhooksCommand),
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
}

impl Command {
    /// The tracing filter when `WEIR_LOG` is not set: the long-running commands say what they
    /// do, the others speak only of trouble.
    pub fn default_log_filter(&self) -> &'static str {
        match self {
            Command::Run | Command::Dev { .. } => "info,sqlx=warn",
            _ => "warn,sqlx=error",
        }
    }
}

/// Runs the command; the exit code is a failure when `weir doctor` found a problem.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo { seconds } => return demo::run(seconds).await.map(|_| ExitCode::SUCCESS),
        Command::Dev { dir } => return dev::run(&dir).await.map(|_| ExitCode::SUCCESS),
        Command::Webhooks(cmd) => {
            return webhooks::run(cmd, &mut std::io::stdout(), std::io::stdin())
                .map(|_| ExitCode::SUCCESS);
        }
        _ => {}
    }
    let config = load_config(cli.config.as_ref(), cli.database_url.as_deref())?;
    match cli.command {
        Command::Doctor => return Ok(doctor::run(&config).await),
        Command::Init => init::run(&config).await?,
        Command::Run => run::run(config).await?,
        Command::Resume { name } => resume::run(&config, &name).await?,
        Command::Backfill(args) => backfill::run(&config, args).await?,
        Command::Skip { name } => skip::run(&config, &name).await?,
        Command::Jobs(cmd) => jobs::run(cmd, weir::db::connect(&config).await?).await?,
        Command::Parked(cmd) => parked::run(&config, cmd).await?,
        Command::Operators(cmd) => operators::run(&config, cmd).await?,
        Command::Streams(cmd) => {
            let pool = weir::db::connect(&config).await?;
            streams::run(cmd, pool, &mut std::io::stdout()).await?
        }
        Command::Subscriptions(cmd) => {
            subscriptions::run(cmd, weir::db::connect(&config).await?).await?
        }
        Command::Status { json } => status::run(&config, json).await?,
        Command::Tail { entity, kind, from, limit } => {
            tail::run(&config, entity, kind, from, limit).await?
        }
        Command::Demo { .. } | Command::Dev { .. } | Command::Webhooks(_) => {
            unreachable!("handled above")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The configuration: the file (`--config`, else ./weir.toml when it exists), then the
/// environment, then `--database-url`.
fn load_config(cli_config: Option<&PathBuf>, url: Option<&str>) -> anyhow::Result<Config> {
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
fn shutdown_signal() -> CancellationToken {
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
