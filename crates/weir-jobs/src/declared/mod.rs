//! Workers declared in `weir.toml` (`[[workers]]`): jobs run by `weir run` for applications
//! written in any language, with no Rust code.
//!
//! ```text
//! [[workers]] entry ──build (at start-up: prepare, resolve, parse)──► Declared worker
//!   type = "sql"      sql.rs      the statement with args as $1, in the completing transaction
//!   type = "http"     http.rs     POST the job to the application, signed (Standard Webhooks)
//!   type = "command"  command.rs  a child process, the job as JSON on stdin
//! ```
//!
//! Each type is an [`ErasedWorker`]: the runner claims, times out, retries and fences its
//! jobs exactly as it does a Rust worker's. What can be known before the first job is checked
//! by `build`, so a typo fails `weir run` at start-up, naming the entry and its line.

mod command;
mod http;
mod sql;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use sqlx::PgPool;
use weir_core::{JobBackoffConfig, WorkerConfig, WorkerType};

use crate::worker::{ErasedWorker, JobContext, JobError, default_backoff};
use crate::{Config, Error, Result};

/// The timeout of an `http` or `command` attempt when neither the job, the entry nor
/// `[jobs] default_timeout` sets one: a program or a receiver that hangs must not hold a slot
/// for ever.
pub(crate) const DEFAULT_EXTERNAL_TIMEOUT: Duration = Duration::from_secs(300);

/// Builds the worker of an entry, checking what can be checked before the first job.
pub(crate) async fn build(
    entry: &WorkerConfig,
    jobs: &Config,
    pool: &PgPool,
) -> Result<Arc<dyn ErasedWorker>> {
    let common = Common::new(entry, jobs);
    match entry.worker_type {
        WorkerType::Sql => sql::build(entry, common, pool).await,
        WorkerType::Http => http::build(entry, common).await,
        WorkerType::Command => command::build(entry, common).await,
    }
}

/// A start-up error that names the entry.
pub(crate) fn refused(entry: &WorkerConfig, problem: impl std::fmt::Display) -> Error {
    Error::Registration(format!("{}: {problem}", entry.entry()))
}

/// What differs between the declared types: how an attempt runs. [`Declared`] makes one an
/// [`ErasedWorker`], answering the runner's other questions from its [`Common`] part.
pub(crate) trait DeclaredType: Send + Sync + 'static {
    /// Runs one attempt.
    fn attempt(&self, ctx: JobContext, args: Value) -> BoxFuture<'_, Result<(), JobError>>;
    /// Its timeout, backoff and attempts.
    fn common(&self) -> &Common;
}

/// A declared type as the runner holds it.
pub(crate) struct Declared<T>(pub(crate) T);

impl<T: DeclaredType> ErasedWorker for Declared<T> {
    fn run(&self, ctx: JobContext, args: Value) -> BoxFuture<'_, Result<(), JobError>> {
        self.0.attempt(ctx, args)
    }

    fn timeout(&self) -> Option<Duration> {
        self.0.common().timeout
    }

    fn backoff(&self, attempt: u32) -> Duration {
        self.0.common().backoff(attempt)
    }

    fn max_attempts(&self) -> Option<u32> {
        self.0.common().max_attempts
    }
}

/// What every declared worker answers the runner the same way: timeout, backoff, attempts.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    pub(crate) timeout: Option<Duration>,
    backoff: Option<JobBackoffConfig>,
    pub(crate) max_attempts: Option<u32>,
}

impl Common {
    fn new(entry: &WorkerConfig, jobs: &Config) -> Self {
        let external = matches!(entry.worker_type, WorkerType::Http | WorkerType::Command);
        let timeout =
            entry.timeout.or(jobs.default_timeout).or(external.then_some(DEFAULT_EXTERNAL_TIMEOUT));
        Self { timeout, backoff: entry.backoff, max_attempts: entry.max_attempts }
    }

    /// The wait before retrying after failed attempt `attempt`: the entry's `backoff` with
    /// ±10% jitter, else the runner's default.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        match self.backoff {
            Some(b) => {
                let jitter = 1.0 + (rand::random::<f64>() - 0.5) * 0.2;
                b.backoff().delay(attempt).mul_f64(jitter)
            }
            None => default_backoff(attempt),
        }
    }
}

/// The job as `http` and `command` workers hand it to the application.
pub(crate) fn job_document(job: &crate::worker::JobContext, args: &serde_json::Value) -> String {
    serde_json::json!({
        "id": job.id().0,
        "kind": job.kind(),
        "queue": job.queue(),
        "args": args,
        "attempt": job.attempt(),
        "max_attempts": job.max_attempts(),
        "enqueued_at": job.enqueued_at(),
    })
    .to_string()
}
