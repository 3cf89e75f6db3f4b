//! The `Worker` trait, its control-flow errors and the context a job runs with.
//!
//! A worker returns `Ok(())` to complete its job, or a [`JobError`]: retry (after the worker's
//! backoff or a given delay), discard, or snooze (run again later without spending an attempt).
//! Any `std::error::Error` converts into a retry with `?`.
//!
//! Exactly-once database effects: a worker that writes to the database does so in
//! [`JobContext::begin`]'s transaction and finishes with [`JobContext::complete`], which completes
//! the job in that same transaction, fenced on its attempt, and commits. If the job was rescued
//! or cancelled meanwhile, the fence rejects it and the worker's writes roll back with it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use weir_core::Chain;

use crate::job::{JobArgs, JobId};
use crate::{Error, Result, store};

pub use weir_core::BoxError;

/// Runs jobs of one kind.
///
/// ```
/// use weir_jobs::{JobArgs, JobContext, JobError, Worker};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Resize { image: String }
/// impl JobArgs for Resize { const KIND: &'static str = "resize"; }
///
/// struct Resizer;
/// impl Worker for Resizer {
///     type Args = Resize;
///     async fn work(&self, ctx: JobContext, args: Resize) -> Result<(), JobError> {
///         if args.image.is_empty() {
///             return Err(JobError::discard("no image given"));
///         }
///         let mut tx = ctx.begin().await?;
///         sqlx::query("select 1").execute(&mut *tx).await?;
///         ctx.complete(tx).await?; // the job completes with the worker's writes
///         Ok(())
///     }
/// }
/// ```
pub trait Worker: Send + Sync + 'static {
    /// The job arguments, which name the kind.
    type Args: JobArgs;

    /// Runs one attempt.
    fn work(
        &self,
        ctx: JobContext,
        args: Self::Args,
    ) -> impl Future<Output = std::result::Result<(), JobError>> + Send;

    /// The timeout of an attempt when the job sets none. Defaults to the runner's.
    fn timeout(&self) -> Option<Duration> {
        None
    }

    /// The delay before retrying after failed attempt `attempt` (from 1). Defaults to
    /// [`default_backoff`].
    fn backoff(&self, attempt: u32) -> Duration {
        default_backoff(attempt)
    }
}

/// `attempt⁴` seconds with ±10% jitter (1 s, 16 s, 81 s, 4 min, 10 min, …), at most a day.
pub fn default_backoff(attempt: u32) -> Duration {
    let base = (u64::from(attempt.max(1))).saturating_pow(4).min(86_400) as f64;
    let jitter = 1.0 + (rand::random::<f64>() - 0.5) * 0.2;
    Duration::from_secs_f64(base * jitter)
}

/// How an attempt ended other than by completing.
#[derive(Debug)]
pub struct JobError {
    pub(crate) kind: JobErrorKind,
}

#[derive(Debug)]
pub(crate) enum JobErrorKind {
    Retry { error: BoxError, after: Option<Duration> },
    Discard(BoxError),
    Snooze(Duration),
}

impl JobError {
    /// The attempt failed; retry after the worker's backoff (or discard if it was the last).
    pub fn retry(error: impl Into<BoxError>) -> Self {
        Self { kind: JobErrorKind::Retry { error: error.into(), after: None } }
    }

    /// The attempt failed; retry after `after` (or discard if it was the last).
    pub fn retry_after(after: Duration, error: impl Into<BoxError>) -> Self {
        Self { kind: JobErrorKind::Retry { error: error.into(), after: Some(after) } }
    }

    /// The job can never succeed: discard it now, whatever attempts are left.
    pub fn discard(error: impl Into<BoxError>) -> Self {
        Self { kind: JobErrorKind::Discard(error.into()) }
    }

    /// Not now: run again after `after` without counting this attempt.
    pub fn snooze(after: Duration) -> Self {
        Self { kind: JobErrorKind::Snooze(after) }
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            JobErrorKind::Retry { error, .. } => write!(f, "{}", Chain(error.as_ref())),
            JobErrorKind::Discard(error) => write!(f, "discarded: {}", Chain(error.as_ref())),
            JobErrorKind::Snooze(d) => write!(f, "snoozed for {d:?}"),
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for JobError {
    fn from(error: E) -> Self {
        Self::retry(error)
    }
}

/// What a running job knows and can do.
#[derive(Debug, Clone)]
pub struct JobContext {
    inner: Arc<ContextInner>,
}

#[derive(Debug)]
struct ContextInner {
    id: JobId,
    queue: String,
    kind: String,
    attempt: u32,
    max_attempts: u32,
    enqueued_at: chrono::DateTime<chrono::Utc>,
    pool: PgPool,
    cancel: CancellationToken,
    keep_history: bool,
    completed: AtomicBool,
}

impl JobContext {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: JobId,
        queue: String,
        kind: String,
        attempt: u32,
        max_attempts: u32,
        enqueued_at: chrono::DateTime<chrono::Utc>,
        pool: PgPool,
        cancel: CancellationToken,
        keep_history: bool,
    ) -> Self {
        Self {
            inner: Arc::new(ContextInner {
                id,
                queue,
                kind,
                attempt,
                max_attempts,
                enqueued_at,
                pool,
                cancel,
                keep_history,
                completed: AtomicBool::new(false),
            }),
        }
    }

    /// The job's id.
    pub fn id(&self) -> JobId {
        self.inner.id
    }

    /// Its queue.
    pub fn queue(&self) -> &str {
        &self.inner.queue
    }

    /// Its kind.
    pub fn kind(&self) -> &str {
        &self.inner.kind
    }

    /// This attempt, from 1.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// The attempts it may have (grows by one at each snooze).
    pub fn max_attempts(&self) -> u32 {
        self.inner.max_attempts
    }

    /// When the job was enqueued.
    pub fn enqueued_at(&self) -> chrono::DateTime<chrono::Utc> {
        self.inner.enqueued_at
    }

    /// The runner's pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Resolves when the attempt should stop: the job was cancelled, timed out, or the runner is
    /// stopping hard. The attempt's future is dropped soon after anyway.
    pub async fn cancelled(&self) {
        self.inner.cancel.cancelled().await
    }

    /// Whether [`cancelled`](Self::cancelled) has resolved.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Begins a transaction for the worker's writes; finish it with [`complete`](Self::complete).
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>> {
        Ok(self.inner.pool.begin().await?)
    }

    /// Completes the job in `tx`, together with the worker's writes, and commits. Fails with
    /// [`Error::Fenced`] (rolling everything back) if this attempt no longer owns the job.
    pub async fn complete(&self, mut tx: Transaction<'static, Postgres>) -> Result<()> {
        let done = store::complete(
            &mut tx,
            &[self.inner.id.0],
            &[self.inner.attempt as i32],
            self.inner.keep_history,
        )
        .await?;
        if done.is_empty() {
            return Err(Error::Fenced { id: self.inner.id, attempt: self.inner.attempt });
        }
        tx.commit().await?;
        self.inner.completed.store(true, Ordering::Release);
        Ok(())
    }

    pub(crate) fn completed(&self) -> bool {
        self.inner.completed.load(Ordering::Acquire)
    }
}

/// A worker with its args type erased, as the runner holds it.
pub(crate) trait ErasedWorker: Send + Sync {
    fn run(&self, ctx: JobContext, args: Value)
    -> BoxFuture<'_, std::result::Result<(), JobError>>;
    fn timeout(&self) -> Option<Duration>;
    fn backoff(&self, attempt: u32) -> Duration;
    /// The most attempts a job of this kind may have, whatever it was enqueued with.
    fn max_attempts(&self) -> Option<u32> {
        None
    }
}

impl<W: Worker> ErasedWorker for W {
    fn run(
        &self,
        ctx: JobContext,
        args: Value,
    ) -> BoxFuture<'_, std::result::Result<(), JobError>> {
        Box::pin(async move {
            // Bad args fail the attempt with the reason; they never reach the worker. Through
            // weir_core::json: numbers written as jsonb keeps them (`1.50`) still reach args
            // types that buffer (`#[serde(tag = …)]`, `untagged`, `flatten`).
            let args: W::Args = weir_core::json::from_value(args).map_err(|e| {
                JobError::retry(format!(
                    "args do not deserialize for kind `{}`: {e}",
                    <W::Args as JobArgs>::KIND
                ))
            })?;
            self.work(ctx, args).await
        })
    }

    fn timeout(&self) -> Option<Duration> {
        Worker::timeout(self)
    }

    fn backoff(&self, attempt: u32) -> Duration {
        Worker::backoff(self, attempt)
    }
}

/// The registered workers by kind.
pub(crate) type Workers = std::collections::HashMap<String, Arc<dyn ErasedWorker>>;
