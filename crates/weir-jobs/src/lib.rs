//! weir's job queue, in the application's own PostgreSQL database.
//!
//! ```text
//! enqueue ─ Rust: enqueue(&mut *tx, &job) │ SQL: select weir.enqueue(...) │ CLI │ operator tx
//!    │ insert into weir.jobs; one NOTIFY weir_jobs per queue per statement (and transaction)
//!    ▼
//! weir.jobs (unfinished jobs only) ◄── sweeper (leader): scheduled/retryable → available,
//!    │                                  rescue of jobs whose process stopped heartbeating
//!    │ claim: one statement, FOR UPDATE SKIP LOCKED, limit = free slots of the queue here
//!    │        (a queue with [jobs.limits]: also what its global concurrency and rate leave,
//!    │        under a lock on its row in weir.job_queue_limits)
//!    ▼
//! producer ─► worker tasks ─► completer: one fenced statement per batch of completions
//!    │                          (or the worker's own transaction: ctx.complete(tx))
//!    ▼
//! weir.job_history (completed, discarded, cancelled) ─► trimmed by retention, in batches
//! ```
//!
//! The states and every edge between them are drawn in `docs/jobs.md`.
//!
//! Guarantees (each has a test in `tests/`):
//! - **Transactional enqueue**: a job enqueued in a transaction that rolls back never existed.
//! - **At most one run at a time**: claims lock rows with `SKIP LOCKED` and move them to
//!   `running` in the same statement.
//! - **Fenced outcomes**: every statement that finishes a run matches `(id, attempt, running)`;
//!   the attempt grows at each claim, so a rescued or cancelled run's late result is rejected.
//! - **Exactly-once effects in the database** for workers that complete in their own
//!   transaction.
//! - **No lost wake-ups matter**: producers poll, and the leader activates due jobs, so lost
//!   notifications (poolers, reconnects) only delay jobs by a poll interval.
//! - **Vacuum-friendly**: finished rows leave the claimed table in the statement that finishes
//!   them, so its size follows the backlog, not the history.
//!
//! Workers run in the application's weir, configured by `[jobs]` of `weir.toml` ([`Config`]):
//! `weir::Weir::builder(config).worker(Mailer).start()` migrates the job tables and starts the
//! runner with the process's other parts, and `stop()` stops it with them. [`JobRunner`] is
//! the same runner on its own (a process that only runs jobs, tests):
//!
//! ```no_run
//! use weir_jobs::{Config, Job, JobArgs, JobContext, JobError, JobRunner, Worker};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct SendWelcome { user_id: i64 }
//! impl JobArgs for SendWelcome { const KIND: &'static str = "send_welcome"; }
//!
//! struct Mailer;
//! impl Worker for Mailer {
//!     type Args = SendWelcome;
//!     async fn work(&self, _ctx: JobContext, args: SendWelcome) -> Result<(), JobError> {
//!         println!("welcome, user {}", args.user_id);
//!         Ok(())
//!     }
//! }
//!
//! # async fn demo(pool: sqlx::PgPool) -> weir_jobs::Result<()> {
//! weir_jobs::migrate(&pool).await?;
//! let mut tx = pool.begin().await?;
//! // ... the application's own writes ...
//! weir_jobs::enqueue(&mut tx, &Job::new(&SendWelcome { user_id: 42 })?).await?;
//! tx.commit().await?;
//!
//! // In an application: weir::Weir::builder(config).worker(Mailer).start().await?
//! let running = JobRunner::new(pool, Config::default()).register(Mailer).start().await?;
//! running.stop(std::time::Duration::from_secs(10)).await?;
//! # Ok(()) }
//! ```
//!
//! The runner's roles each have a module: `runner` (start and stop), `producer` (claims),
//! `completer`, `heartbeat` (and the LISTEN wake-ups), `maintenance` (the elected leader's
//! scheduler, rescuer, periodic jobs and cleaner), `shared` (the state they all hold); every
//! statement is in `store`.

pub mod admin;
mod completer;
mod cron;
mod declared;
mod heartbeat;
mod job;
mod maintenance;
pub mod metrics;
mod producer;
mod runner;
mod shared;
mod store;
mod worker;

pub use admin::{JobInfo, JobState, ListFilter, QueueStats, WorkerInfo};
pub use cron::{Cron, CronError, TimeZoneError};
pub use heartbeat::{CANCEL_CHANNEL, EVENTS_CHANNEL, WAKE_CHANNEL};
pub use job::{
    DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, Enqueued, Job, JobArgs, JobId, MAX_ATTEMPTS_LIMIT,
    MAX_PRIORITY, MAX_TIMEOUT, Unique, enqueue, enqueue_many,
};
pub use maintenance::PeriodicJob;
pub use metrics::{Histogram, MetricsSnapshot, QueueMetrics};
pub use runner::{JobRunner, RunningJobs};
/// `[jobs]` of `weir.toml`: the one runner configuration, defined (and validated) in
/// `weir-core` with the rest of the configuration.
pub use weir_core::JobsConfig as Config;
pub use weir_core::{
    ConfigError, DEFAULT_JOB_HEARTBEAT_INTERVAL as DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_JOB_POLL_INTERVAL as DEFAULT_POLL_INTERVAL,
    DEFAULT_JOB_RESCUE_AFTER as DEFAULT_RESCUE_AFTER,
    DEFAULT_JOB_SWEEP_INTERVAL as DEFAULT_SWEEP_INTERVAL, QueueConfig,
};
pub use worker::{BoxError, JobContext, JobError, Worker, default_backoff};

use weir_log::schema::{self, Migration};

/// What can go wrong in the job queue. A job's own failure is not here: it becomes data (an
/// error in the job's row, a retry, a discard).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database refused or the connection broke.
    #[error(transparent)]
    Database(sqlx::Error),
    /// Applying the job queue's migrations failed.
    #[error("job queue migration failed")]
    Migrate(#[source] weir_log::Error),
    /// A job field is out of range (checked in Rust and again by `weir.enqueue`).
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// Another unfinished job holds the unique key (when re-queueing by hand).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Job args did not serialize to JSON.
    #[error("job args do not serialize")]
    Args(#[source] serde_json::Error),
    /// A cron expression did not parse.
    #[error(transparent)]
    Cron(#[from] CronError),
    /// A time zone name is not in the IANA database.
    #[error(transparent)]
    TimeZone(#[from] TimeZoneError),
    /// A `[jobs]` setting is wrong (the error names the field).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The runner's workers or periodic jobs do not fit together (two workers for one kind, a
    /// periodic job declared twice or without a name).
    #[error("invalid job runner setup: {0}")]
    Registration(String),
    /// No job has this id.
    #[error("job {0} not found")]
    NotFound(JobId),
    /// The job's state does not allow the action.
    #[error("cannot {action} job {id}: it is {state}")]
    WrongState {
        /// The job.
        id: JobId,
        /// Its state.
        state: JobState,
        /// What was asked.
        action: &'static str,
    },
    /// This attempt no longer owns the job (it was rescued, cancelled or finished): its outcome
    /// was rejected and its transaction rolled back.
    #[error("job {id} attempt {attempt} no longer owns the job; its completion was rejected")]
    Fenced {
        /// The job.
        id: JobId,
        /// The stale attempt.
        attempt: u32,
    },
}

/// `Result` with the job queue [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Self::from_db(e)
    }
}

impl Error {
    /// Classifies a database error by SQLSTATE: bad job fields (22023, 23514) and unique
    /// violations (23505) are the caller's; the rest is infrastructure.
    pub(crate) fn from_db(e: sqlx::Error) -> Self {
        let code = e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned());
        match code.as_deref() {
            // 22023 is raised by `weir.enqueue` with a message written for people.
            Some("22023") => Self::InvalidJob(
                e.as_database_error().map(|d| d.message().to_string()).unwrap_or_default(),
            ),
            // The others carry the database's own wording: say it in ours, log theirs.
            Some("23514") => {
                tracing::debug!(error = %e, "job refused by a check constraint");
                Self::InvalidJob("a job field is out of range (see docs/jobs.md for limits)".into())
            }
            Some("23505") => {
                tracing::debug!(error = %e, "job refused by a unique key");
                Self::Conflict("another unfinished job holds the same unique key".into())
            }
            _ => Self::Database(e),
        }
    }

    /// Whether retrying the same call later may succeed (a connection or server problem).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Database(e) => weir_log::sqlstate::is_transient(e),
            _ => false,
        }
    }
}

/// The job queue's numbered migrations (component `jobs` in `weir.migrations`).
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "jobs", sql: include_str!("../migrations/0001_jobs.sql") },
    Migration {
        version: 2,
        name: "queue_limits",
        sql: include_str!("../migrations/0002_queue_limits.sql"),
    },
];

/// Creates or upgrades the job queue's tables and functions (idempotent).
pub async fn migrate(pool: &sqlx::PgPool) -> Result<()> {
    schema::migrate(pool, "jobs", MIGRATIONS).await.map_err(Error::Migrate)
}
