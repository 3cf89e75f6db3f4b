//! Looking at jobs and acting on them by hand: list, show, cancel, retry, stats.
//!
//! These are what `weir jobs …` and the HTTP API call. A listed job that waits says why
//! (`note`): no live process works its queue, or none has a worker for its kind.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;

use crate::job::JobId;
use crate::store::{job_columns, moved_columns};
use crate::{Error, Result};

/// A job's state; see `docs/jobs.md` for the machine.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waits for its time.
    Scheduled,
    /// Ready to be claimed.
    Available,
    /// Claimed by a process.
    Running,
    /// Failed; waits for its next attempt.
    Retryable,
    /// Done (in history).
    Completed,
    /// Failed for good or discarded by its worker (in history); can be retried by hand.
    Discarded,
    /// Cancelled by hand (in history); can be retried by hand.
    Cancelled,
}

impl JobState {
    /// Every state, in the order of the machine.
    pub const ALL: [JobState; 7] = [
        Self::Scheduled,
        Self::Available,
        Self::Running,
        Self::Retryable,
        Self::Completed,
        Self::Discarded,
        Self::Cancelled,
    ];

    /// The name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Available => "available",
            Self::Running => "running",
            Self::Retryable => "retryable",
            Self::Completed => "completed",
            Self::Discarded => "discarded",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the job has left `weir.jobs` for history.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Discarded | Self::Cancelled)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|s| s.as_str()).collect();
            Error::InvalidJob(format!("unknown state {s:?}; one of {}", names.join(", ")))
        })
    }
}

/// A job as stored, with a note on why it waits.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct JobInfo {
    /// Its id.
    pub id: JobId,
    /// Its state.
    pub state: JobState,
    /// Its queue.
    pub queue: String,
    /// Its kind.
    pub kind: String,
    /// 0 runs first.
    pub priority: i16,
    /// The attempt running or last run.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When it may run.
    pub scheduled_at: DateTime<Utc>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When the last attempt started.
    pub attempted_at: Option<DateTime<Utc>>,
    /// The process of the last attempt.
    pub attempted_by: Option<String>,
    /// Its timeout in milliseconds, if it sets one.
    pub timeout_ms: Option<i32>,
    /// Its unique key while active, if any.
    pub unique_key: Option<String>,
    /// Its arguments.
    pub args: Value,
    /// One object per failed attempt: `{attempt, at, error}`.
    pub errors: Value,
    /// When it finished, for finished jobs.
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it waits, or its last error.
    pub note: Option<String>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    state: String,
    queue: String,
    kind: String,
    priority: i16,
    attempt: i32,
    max_attempts: i32,
    scheduled_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    attempted_at: Option<DateTime<Utc>>,
    attempted_by: Option<String>,
    timeout_ms: Option<i32>,
    unique_key: Option<String>,
    args: Value,
    errors: Value,
    finished_at: Option<DateTime<Utc>>,
    note: Option<String>,
}

impl TryFrom<Row> for JobInfo {
    type Error = Error;
    fn try_from(r: Row) -> Result<Self> {
        Ok(Self {
            id: JobId(r.id),
            state: r.state.parse()?,
            queue: r.queue,
            kind: r.kind,
            priority: r.priority,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            scheduled_at: r.scheduled_at,
            created_at: r.created_at,
            attempted_at: r.attempted_at,
            attempted_by: r.attempted_by,
            timeout_ms: r.timeout_ms,
            unique_key: r.unique_key,
            args: r.args,
            errors: r.errors,
            finished_at: r.finished_at,
            note: r.note,
        })
    }
}

/// The select of [`JobInfo`] rows; a process counts as live if it heartbeated in the last minute.
macro_rules! select_info {
    ($where:literal) => {
        concat!(
            "select j.id, j.state::text as state, j.queue, j.kind, j.priority, j.attempt,
                    j.max_attempts, j.scheduled_at, j.created_at, j.attempted_at, j.attempted_by,
                    j.timeout_ms, j.unique_key, j.args, j.errors, j.finished_at,
                    case
                      when j.state = 'available' and not exists (
                          select 1 from weir.job_processes p
                           where p.heartbeat_at > now() - interval '1 minute'
                             and p.queues @> jsonb_build_array(jsonb_build_object('queue', j.queue)))
                        then 'waiting: no live process works queue ' || quote_literal(j.queue)
                      when j.state = 'available' and not exists (
                          select 1 from weir.job_processes p
                           where p.heartbeat_at > now() - interval '1 minute'
                             and p.queues @> jsonb_build_array(jsonb_build_object(
                                 'queue', j.queue, 'kinds', jsonb_build_array(j.kind))))
                        then 'waiting: no worker registered for kind ' || quote_literal(j.kind)
                             || ' on queue ' || quote_literal(j.queue)
                      when j.state = 'running' and not exists (
                          select 1 from weir.job_processes p
                           where p.id = j.attempted_by
                             and p.heartbeat_at > now() - interval '1 minute')
                        then 'its process ' || coalesce(j.attempted_by, '?')
                             || ' stopped heartbeating: it will be rescued'
                      when j.state in ('scheduled', 'retryable') and jsonb_array_length(j.errors) > 0
                        then 'next attempt at ' || to_char(j.scheduled_at at time zone 'UTC',
                             'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') || '; last error: '
                             || (j.errors -> -1 ->> 'error')
                      when j.state in ('scheduled', 'retryable')
                        then 'runs at ' || to_char(j.scheduled_at at time zone 'UTC',
                             'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                      when jsonb_array_length(j.errors) > 0
                        then 'last error: ' || (j.errors -> -1 ->> 'error')
                    end as note
               from weir.all_jobs j ",
            $where
        )
    };
}

/// Which jobs [`list`] returns; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this state.
    pub state: Option<JobState>,
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// At most this many, newest first. Defaults to 50 when zero.
    pub limit: i64,
}

/// Lists jobs, newest first, live and finished.
pub async fn list(conn: &mut PgConnection, filter: &ListFilter) -> Result<Vec<JobInfo>> {
    let rows: Vec<Row> = sqlx::query_as(select_info!(
        "where ($1::text is null or j.state::text = $1)
           and ($2::text is null or j.queue = $2)
           and ($3::text is null or j.kind = $3)
         order by j.id desc
         limit $4"
    ))
    .bind(filter.state.map(JobState::as_str))
    .bind(filter.queue.as_deref())
    .bind(filter.kind.as_deref())
    .bind(if filter.limit <= 0 { 50 } else { filter.limit })
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(JobInfo::try_from).collect()
}

/// One job, live or finished.
pub async fn show(conn: &mut PgConnection, id: JobId) -> Result<JobInfo> {
    let row: Option<Row> =
        sqlx::query_as(select_info!("where j.id = $1")).bind(id.0).fetch_optional(conn).await?;
    row.ok_or(Error::NotFound(id))?.try_into()
}

/// Cancels an unfinished job: it moves to history as `cancelled`; a running one is also told to
/// stop (its process cancels the attempt, and the fence rejects whatever it reports). Returns the
/// state it was in.
pub async fn cancel(conn: &mut PgConnection, id: JobId) -> Result<JobState> {
    let previous: Option<String> = sqlx::query_scalar(concat!(
        "with done as (
             delete from weir.jobs where id = $1 returning *
         ), kept as (
             insert into weir.job_history (",
        job_columns!(),
        ")
             select ",
        moved_columns!(state: "'cancelled'", errors: "errors"),
        " from done
         )
         select d.state::text from done d
           left join lateral (select pg_notify('weir_job_cancel', d.id::text)
                               where d.state = 'running') n on true"
    ))
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await?;
    match previous {
        Some(state) => state.parse(),
        None => Err(finished_or_missing(conn, id, "cancel").await),
    }
}

/// Runs a job again now: a scheduled or retryable job becomes available; a discarded or cancelled
/// one comes back from history (with one more attempt if it had used them all). Returns the state
/// it was in.
pub async fn retry(conn: &mut PgConnection, id: JobId) -> Result<JobState> {
    let live: Option<String> = sqlx::query_scalar(
        "with old as (
             select id, state from weir.jobs where id = $1 for update
         ), woken as (
             update weir.jobs j set state = 'available', scheduled_at = now()
               from old
              where j.id = old.id and old.state in ('scheduled', 'retryable')
          returning j.queue
         )
         select old.state::text from old
           left join lateral (select pg_notify('weir_jobs', w.queue) from woken w) n on true",
    )
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(state) = live {
        let state: JobState = state.parse()?;
        return match state {
            JobState::Running => Err(Error::WrongState { id, state, action: "retry" }),
            other => Ok(other),
        };
    }
    let back: Option<String> = sqlx::query_scalar(concat!(
        "with back as (
             delete from weir.job_history
              where id = $1 and state in ('discarded', 'cancelled')
          returning *
         ), requeued as (
             -- The insert trigger sends the wake-up.
             insert into weir.jobs (",
        job_columns!(),
        ")
             select ",
        moved_columns!(
            state: "'available'",
            max_attempts: "greatest(max_attempts, attempt + 1)",
            scheduled_at: "now()",
            errors: "errors"
        ),
        "
               from back
         )
         select state::text from back"
    ))
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await
    .map_err(Error::from_db)?;
    match back {
        Some(state) => state.parse(),
        None => Err(finished_or_missing(conn, id, "retry").await),
    }
}

async fn finished_or_missing(conn: &mut PgConnection, id: JobId, action: &'static str) -> Error {
    let state: sqlx::Result<Option<String>> =
        sqlx::query_scalar("select state::text from weir.all_jobs where id = $1")
            .bind(id.0)
            .fetch_optional(conn)
            .await;
    match state {
        Err(e) => e.into(),
        Ok(None) => Error::NotFound(id),
        Ok(Some(s)) => match s.parse() {
            Ok(state) => Error::WrongState { id, state, action },
            Err(e) => e,
        },
    }
}

/// A worker as the live processes serve it: one row per kind and type, every process
/// together (`weir jobs workers`, `GET /v1/jobs/workers`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct WorkerInfo {
    /// The job kind it runs.
    pub kind: String,
    /// `rust` (registered in code), `sql`, `http` or `command` (declared in `weir.toml`).
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub worker_type: String,
    /// The queue it claims from.
    pub queue: String,
    /// Slots its jobs may use, summed over the processes (shared with the queue's other kinds
    /// unless the worker has slots of its own).
    pub concurrency: i64,
    /// Live processes that serve it.
    pub processes: i64,
    /// Its jobs running now.
    pub running: i64,
    /// The last error of one of its jobs (unfinished, or finished in the last day).
    pub last_error: Option<String>,
    /// When that error happened.
    pub last_error_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The job it happened to.
    pub last_error_job: Option<i64>,
}

/// The workers of every live process (heartbeat in the last minute), by kind.
pub async fn workers(conn: &mut PgConnection) -> Result<Vec<WorkerInfo>> {
    Ok(sqlx::query_as(
        "with lanes as (
             select p.id as process, l->>'queue' as queue, (l->>'concurrency')::bigint as slots,
                    k.kind, coalesce(l->'types'->>k.kind, 'rust') as type
               from weir.job_processes p,
                    jsonb_array_elements(p.queues) l,
                    jsonb_array_elements_text(l->'kinds') k(kind)
              where p.heartbeat_at > now() - interval '1 minute'
         ), running as (
             select kind, count(*) as n from weir.jobs where state = 'running' group by kind
         ), failures as (
             select distinct on (kind) kind, id, e->>'error' as error,
                    (e->>'at')::timestamptz as at
               from (select kind, id, errors->-1 as e from weir.jobs
                      where jsonb_array_length(errors) > 0
                     union all
                     select kind, id, errors->-1 from weir.job_history
                      where finished_at > now() - interval '1 day'
                        and jsonb_array_length(errors) > 0) f
              order by kind, (e->>'at')::timestamptz desc
         )
         select l.kind, l.type, l.queue, sum(l.slots)::bigint as concurrency,
                count(distinct l.process) as processes, coalesce(max(r.n), 0) as running,
                max(f.error) as last_error, max(f.at) as last_error_at,
                max(f.id) as last_error_job
           from lanes l
           left join running r on r.kind = l.kind
           left join failures f on f.kind = l.kind
          group by l.kind, l.type, l.queue
          order by l.kind, l.queue",
    )
    .fetch_all(conn)
    .await?)
}

/// Each periodic job's mark: the last time (slot) it was enqueued for, by name.
pub async fn periodic_marks(conn: &mut PgConnection) -> Result<Vec<(String, DateTime<Utc>)>> {
    Ok(sqlx::query_as("select name, last_at from weir.job_periodic order by name")
        .fetch_all(conn)
        .await?)
}

/// Database-wide figures of one queue.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct QueueStats {
    /// The queue.
    pub queue: String,
    /// Jobs ready to run.
    pub available: i64,
    /// Jobs waiting for their time.
    pub scheduled: i64,
    /// Jobs waiting for a retry.
    pub retryable: i64,
    /// Jobs running.
    pub running: i64,
    /// Completed in the last minute, per second.
    pub completed_per_sec: f64,
    /// Discarded in the last hour.
    pub discarded_last_hour: i64,
    /// Seconds the oldest available job has been waiting.
    pub oldest_available_secs: Option<f64>,
    /// Attempts started in the last minute, per second.
    pub started_per_sec: f64,
    /// Median wait, in seconds, from the time an attempt could run (`scheduled_at`) to its
    /// start, over the attempts started in the last minute; none when none started.
    pub wait_p50_secs: Option<f64>,
    /// The 95th percentile of the same waits.
    pub wait_p95_secs: Option<f64>,
}

/// Figures per queue, from the tables (every process together).
pub async fn stats(conn: &mut PgConnection) -> Result<Vec<QueueStats>> {
    Ok(sqlx::query_as(
        "with live as (
             select queue,
                    count(*) filter (where state = 'available') as available,
                    count(*) filter (where state = 'scheduled') as scheduled,
                    count(*) filter (where state = 'retryable') as retryable,
                    count(*) filter (where state = 'running') as running,
                    extract(epoch from now() - min(scheduled_at) filter (where state = 'available'))
                        ::float8 as oldest
               from weir.jobs group by queue
         ), done as (
             select queue,
                    count(*) filter (where state = 'completed'
                                       and finished_at > now() - interval '1 minute') as completed,
                    count(*) filter (where state = 'discarded') as discarded
               from weir.job_history
              where finished_at > now() - interval '1 hour'
              group by queue
         ), starts as (
             -- Attempts started in the last minute, whatever became of them since: those
             -- still in weir.jobs (running, or waiting again after a failure) and those that
             -- finished. A job that waits again had its scheduled_at moved for the retry, so
             -- its wait is unknown (null; the percentiles skip it) but it counts as started.
             select queue,
                    case when state = 'running' then attempted_at - scheduled_at end as wait
               from weir.jobs
              where attempted_at > now() - interval '1 minute'
             union all
             select queue, attempted_at - scheduled_at
               from weir.job_history
              where finished_at > now() - interval '1 minute'
                and attempted_at > now() - interval '1 minute'
         ), waits as (
             select queue, count(*) as started,
                    percentile_cont(0.5) within group (
                        order by greatest(extract(epoch from wait), 0)) as p50,
                    percentile_cont(0.95) within group (
                        order by greatest(extract(epoch from wait), 0)) as p95
               from starts group by queue
         )
         select coalesce(l.queue, d.queue, w.queue) as queue,
                coalesce(l.available, 0) as available, coalesce(l.scheduled, 0) as scheduled,
                coalesce(l.retryable, 0) as retryable, coalesce(l.running, 0) as running,
                coalesce(d.completed, 0)::float8 / 60 as completed_per_sec,
                coalesce(d.discarded, 0) as discarded_last_hour,
                l.oldest as oldest_available_secs,
                coalesce(w.started, 0)::float8 / 60 as started_per_sec,
                w.p50::float8 as wait_p50_secs, w.p95::float8 as wait_p95_secs
           from live l
           full join done d on d.queue = l.queue
           full join waits w on w.queue = coalesce(l.queue, d.queue)
          order by 1",
    )
    .fetch_all(conn)
    .await?)
}
