//! Jobs and enqueueing them inside the caller's transaction.
//!
//! ```text
//! Job::new(&args)? ─► enqueue(&mut *tx, &job) ─► select weir.enqueue_job(...)
//!                                                  │ insert into weir.jobs (+ unique key)
//!                                                  │ statement trigger: pg_notify per queue
//!                                                  ▼
//!                         commit: the job exists and producers wake │ rollback: no job, no wake
//! ```
//!
//! `enqueue` takes a `&mut PgConnection`, so it works with a plain connection, a
//! `sqlx::Transaction` (`&mut *tx`) and an operator's transaction alike. From any other
//! language, `select weir.enqueue('queue', 'kind', '{...}'::jsonb)` does the same.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::PgConnection;

use crate::{Error, Result};

/// The queue jobs go to unless told otherwise.
pub const DEFAULT_QUEUE: &str = weir_core::DEFAULT_JOB_QUEUE;
/// Attempts before a failing job is discarded, unless told otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// The largest `max_attempts`.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;
/// The largest (last-running) priority; 0 runs first.
pub const MAX_PRIORITY: u8 = 9;
/// The longest job timeout.
pub const MAX_TIMEOUT: Duration = weir_core::MAX_JOB_TIMEOUT;

/// A job's id.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(transparent)]
pub struct JobId(pub i64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The arguments of one kind of job: a serde type that names its kind.
///
/// ```
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct SendWelcome { user_id: i64 }
/// impl weir_jobs::JobArgs for SendWelcome {
///     const KIND: &'static str = "send_welcome";
/// }
/// ```
pub trait JobArgs: Serialize + DeserializeOwned + Send + 'static {
    /// The kind stored with the job; the worker registered for it runs it.
    const KIND: &'static str;
}

/// How a job is unique.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unique {
    /// At most one unfinished job (scheduled, available, running or retryable) holds the key.
    WhileActive(String),
    /// At most one job per key is enqueued within `period` of the first, whatever became of it.
    For {
        /// The key.
        key: String,
        /// How long the key stays taken.
        period: Duration,
    },
}

impl Unique {
    /// Unique while not finished.
    pub fn while_active(key: impl Into<String>) -> Self {
        Self::WhileActive(key.into())
    }

    /// Unique for a period after the first enqueue.
    pub fn for_period(key: impl Into<String>, period: Duration) -> Self {
        Self::For { key: key.into(), period }
    }
}

/// A job to enqueue: built with [`Job::new`] (typed) or [`Job::raw`], then refined.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub(crate) queue: String,
    pub(crate) kind: String,
    pub(crate) args: Value,
    pub(crate) priority: u8,
    pub(crate) scheduled_at: Option<DateTime<Utc>>,
    pub(crate) max_attempts: u32,
    pub(crate) unique: Option<Unique>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) notify: bool,
}

impl Job {
    /// A job of `A::KIND` with `args`, on the default queue.
    pub fn new<A: JobArgs>(args: &A) -> Result<Self> {
        Ok(Self::raw(A::KIND, serde_json::to_value(args).map_err(Error::Args)?))
    }

    /// A job of any kind with JSON args (the CLI, HTTP, other languages' kinds).
    pub fn raw(kind: impl Into<String>, args: Value) -> Self {
        Self {
            queue: DEFAULT_QUEUE.to_string(),
            kind: kind.into(),
            args,
            priority: 0,
            scheduled_at: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            unique: None,
            timeout: None,
            notify: false,
        }
    }

    /// The queue. Defaults to `default`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// 0 (runs first) to 9 (last). Defaults to 0.
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Not before `at`. Defaults to now.
    pub fn scheduled_at(mut self, at: DateTime<Utc>) -> Self {
        self.scheduled_at = Some(at);
        self
    }

    /// Not before `delay` from now.
    pub fn run_in(self, delay: Duration) -> Self {
        let at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        self.scheduled_at(at)
    }

    /// Attempts before the job is discarded, 1 to 1000. Defaults to 5.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Makes the job unique; enqueueing a duplicate returns the existing job's id.
    pub fn unique(mut self, unique: Unique) -> Self {
        self.unique = Some(unique);
        self
    }

    /// Fails an attempt that runs longer, 1 ms to 24 h. Defaults to the worker's timeout, then
    /// the runner's.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends `NOTIFY weir_job_events` with `{id, queue, kind, state, attempt}` when the job is
    /// completed or discarded (the EctoJob `notify`). Defaults to false.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// The kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Checks every field, naming the bad one. `enqueue` calls it; the SQL function checks the
    /// same for other languages.
    pub fn validate(&self) -> Result<()> {
        let bad = |problem: String| Err(Error::InvalidJob(problem));
        if self.queue.is_empty() || self.queue.chars().count() > 128 {
            return bad(format!("queue must be 1 to 128 characters, got {:?}", self.queue));
        }
        if self.kind.is_empty() || self.kind.chars().count() > 128 {
            return bad(format!("kind must be 1 to 128 characters, got {:?}", self.kind));
        }
        if self.priority > MAX_PRIORITY {
            return bad(format!(
                "priority must be between 0 (first) and {MAX_PRIORITY} (last), got {}",
                self.priority
            ));
        }
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.max_attempts) {
            return bad(format!(
                "max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {}",
                self.max_attempts
            ));
        }
        if let Some(t) = self.timeout
            && (t < Duration::from_millis(1) || t > MAX_TIMEOUT)
        {
            return bad(format!("timeout must be between 1 ms and 24 hours, got {t:?}"));
        }
        match &self.unique {
            Some(Unique::WhileActive(key)) | Some(Unique::For { key, .. }) if key.is_empty() => {
                return bad("unique key must not be empty".into());
            }
            Some(Unique::For { period, .. }) if period.is_zero() => {
                return bad("unique period must be positive".into());
            }
            _ => {}
        }
        Ok(())
    }
}

/// What [`enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The new job, or the one already holding the unique key.
    pub id: JobId,
    /// True when the job was not inserted because another holds its unique key.
    pub duplicate: bool,
}

/// Enqueues `job` on `conn` — in the caller's transaction when `conn` is one (`&mut *tx`): if
/// that transaction rolls back, there is no job and no wake-up.
pub async fn enqueue(conn: &mut PgConnection, job: &Job) -> Result<Enqueued> {
    job.validate()?;
    let (unique_key, unique_for) = match &job.unique {
        None => (None, None),
        Some(Unique::WhileActive(key)) => (Some(key.as_str()), None),
        Some(Unique::For { key, period }) => (Some(key.as_str()), Some(period.as_secs_f64())),
    };
    let (id, duplicate): (i64, bool) = sqlx::query_as(
        "select id, duplicate from weir.enqueue_job($1, $2, $3, $4, $5, $6, $7,
             make_interval(secs => $8), make_interval(secs => $9), $10)",
    )
    .bind(&job.queue)
    .bind(&job.kind)
    .bind(&job.args)
    .bind(i32::from(job.priority))
    .bind(job.scheduled_at)
    .bind(job.max_attempts as i32)
    .bind(unique_key)
    .bind(unique_for)
    .bind(job.timeout.map(|t| t.as_secs_f64()))
    .bind(job.notify)
    .fetch_one(conn)
    .await
    .map_err(Error::from_db)?;
    Ok(Enqueued { id: JobId(id), duplicate })
}

/// Enqueues many jobs in one statement (one notification per queue). Jobs with a unique key
/// are enqueued one by one, after the others. Returns the ids in the order of `jobs`;
/// a duplicate's id is the existing job's.
pub async fn enqueue_many(conn: &mut PgConnection, jobs: &[Job]) -> Result<Vec<JobId>> {
    for job in jobs {
        job.validate()?;
    }
    let plain: Vec<usize> = (0..jobs.len()).filter(|&i| jobs[i].unique.is_none()).collect();
    let mut ids = vec![JobId(0); jobs.len()];
    if !plain.is_empty() {
        let queues: Vec<String> = plain.iter().map(|&i| jobs[i].queue.clone()).collect();
        let kinds: Vec<String> = plain.iter().map(|&i| jobs[i].kind.clone()).collect();
        let args: Vec<Value> = plain.iter().map(|&i| jobs[i].args.clone()).collect();
        let priorities: Vec<i16> = plain.iter().map(|&i| i16::from(jobs[i].priority)).collect();
        let at: Vec<Option<DateTime<Utc>>> = plain.iter().map(|&i| jobs[i].scheduled_at).collect();
        let max: Vec<i32> = plain.iter().map(|&i| jobs[i].max_attempts as i32).collect();
        let timeouts: Vec<Option<i32>> =
            plain.iter().map(|&i| jobs[i].timeout.map(|t| t.as_millis().max(1) as i32)).collect();
        let notify: Vec<bool> = plain.iter().map(|&i| jobs[i].notify).collect();
        let inserted: Vec<i64> = sqlx::query_scalar(
            "insert into weir.jobs (state, queue, kind, args, priority, scheduled_at,
                                    max_attempts, timeout_ms, notify)
             select case when coalesce(u.at, now()) > now() then 'scheduled'
                         else 'available' end::weir.job_state,
                    u.queue, u.kind, u.args, u.priority, coalesce(u.at, now()), u.max, u.timeout,
                    u.notify
               from unnest($1::text[], $2::text[], $3::jsonb[], $4::smallint[],
                           $5::timestamptz[], $6::int[], $7::int[], $8::boolean[])
                    with ordinality as u(queue, kind, args, priority, at, max, timeout, notify, n)
              order by u.n
          returning id",
        )
        .bind(&queues)
        .bind(&kinds)
        .bind(&args)
        .bind(&priorities)
        .bind(&at)
        .bind(&max)
        .bind(&timeouts)
        .bind(&notify)
        .fetch_all(&mut *conn)
        .await
        .map_err(Error::from_db)?;
        // Identity values are drawn in insertion order, which follows `order by u.n`.
        let mut inserted = inserted;
        inserted.sort_unstable();
        for (&i, id) in plain.iter().zip(inserted) {
            ids[i] = JobId(id);
        }
    }
    for (i, job) in jobs.iter().enumerate() {
        if job.unique.is_some() {
            ids[i] = enqueue(&mut *conn, job).await?.id;
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let ok = Job::raw("k", Value::Null);
        assert!(ok.validate().is_ok());
        let msg = |j: Job| j.validate().unwrap_err().to_string();
        assert!(msg(ok.clone().priority(12)).contains("priority must be between 0"));
        assert!(msg(ok.clone().max_attempts(0)).contains("max_attempts"));
        assert!(msg(ok.clone().timeout(Duration::from_secs(90_000))).contains("timeout"));
        assert!(msg(ok.clone().timeout(Duration::ZERO)).contains("timeout"));
        assert!(msg(ok.clone().queue("")).contains("queue"));
        assert!(msg(Job::raw("", Value::Null)).contains("kind"));
        assert!(msg(ok.clone().unique(Unique::while_active(""))).contains("unique key"));
        assert!(msg(ok.unique(Unique::for_period("k", Duration::ZERO))).contains("period"));
    }
}
