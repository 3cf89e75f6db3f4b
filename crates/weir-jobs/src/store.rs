//! Every SQL statement of the job queue, in one place.
//!
//! The tables are in `migrations/0001_jobs.sql`; the limits of queues across processes
//! (`weir.job_queue_limits`, `weir.claim_limited`) in `migrations/0002_queue_limits.sql`. Each statement that finishes a run is fenced on
//! `(id, attempt, state = 'running')`: the attempt number grows by one at every claim, so a run
//! that was rescued, cancelled or timed out can never finish the job's newer attempt.
//!
//! Finishing a job moves its row from `weir.jobs` to `weir.job_history` in the same statement,
//! so the claimed table only ever holds unfinished jobs.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;

/// The select list that moves a job row between `weir.jobs` and `weir.job_history`: every
/// column the two tables share, in one order, with `state` and `errors` (and, when given,
/// `max_attempts` and `scheduled_at`) replaced by the given SQL. This is the one list of those
/// columns: every statement that moves a row (here and in `admin`) is written with it and
/// [`job_columns!`], so a schema change touches only this.
macro_rules! moved_columns {
    (state: $state:literal, errors: $errors:literal) => {
        $crate::store::moved_columns!(
            state: $state,
            max_attempts: "max_attempts",
            scheduled_at: "scheduled_at",
            errors: $errors
        )
    };
    (
        state: $state:literal,
        max_attempts: $max_attempts:literal,
        scheduled_at: $scheduled_at:literal,
        errors: $errors:literal
    ) => {
        concat!(
            "id, ",
            $state,
            ", queue, kind, priority, attempt, ",
            $max_attempts,
            ", ",
            $scheduled_at,
            ", created_at, attempted_at, attempted_by, timeout_ms, notify, unique_key, args, ",
            $errors
        )
    };
}

/// The shared columns by name, for the `insert into … (<columns>)` of a move.
macro_rules! job_columns {
    () => {
        $crate::store::moved_columns!(state: "state", errors: "errors")
    };
}

pub(crate) use {job_columns, moved_columns};

/// The completion of runs `(ids, attempts)` bound at `$ids`, `$attempts`, into history if
/// `$keep`: CTEs `done` (the deleted rows) and `kept`. Shared by [`complete`] and [`claim`].
macro_rules! complete_ctes {
    ($ids:literal, $attempts:literal, $keep:literal) => {
        concat!(
            "with fenced as (
                 -- The fence: only the attempt that runs the job may finish it. One primary-key
                 -- lookup per run, locked: joined to weir.jobs directly, the planner scans every
                 -- running row per run when the statistics say none run (after a bulk enqueue),
                 -- quadratic in the jobs in flight.
                 select j.id
                   from unnest(",
            $ids,
            "::bigint[], ",
            $attempts,
            "::int[]) as c(id, attempt)
                  cross join lateral (
                      select id from weir.jobs j
                       where j.id = c.id and j.attempt = c.attempt and j.state = 'running'
                         for update
                  ) j
             ), done as (
                 -- No other condition here: the rows are locked, and one would bring the
                 -- estimate of running rows (and the scan) back.
                 delete from weir.jobs j using fenced f where j.id = f.id
              returning j.*
             ), kept as (
                 insert into weir.job_history (",
            job_columns!(),
            ")
                 select ",
            moved_columns!(state: "'completed'", errors: "errors"),
            " from done where ",
            $keep,
            "
             )"
        )
    };
}

/// A job as a claim hands it to a worker.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    pub(crate) id: i64,
    pub(crate) queue: String,
    pub(crate) kind: String,
    pub(crate) args: Value,
    pub(crate) attempt: i32,
    pub(crate) max_attempts: i32,
    pub(crate) timeout_ms: Option<i32>,
    /// When it was enqueued.
    pub(crate) created_at: DateTime<Utc>,
    /// Microseconds between the moment it could run (`scheduled_at`) and the claim.
    pub(crate) wait_us: i64,
}

/// Completions that ride along with a claim: runs `(id, attempt)` of the same producer.
#[derive(Debug, Default)]
pub(crate) struct Completions {
    pub(crate) ids: Vec<i64>,
    pub(crate) attempts: Vec<i32>,
}

/// What a claim returns after its `claimed` CTE: the claimed jobs, then the completed ones
/// (with the completion notifications they asked for). Shared by both claims.
macro_rules! claim_result {
    () => {
        "
         select true as claimed, id, queue, kind, args, attempt, max_attempts, timeout_ms,
                created_at, wait_us
           from claimed
         union all
         select false, d.id, null::text, null::text, null::jsonb, null::int, null::int,
                null::int, null::timestamptz, null::bigint
           from done d
           -- The completion notification the job asked for (`notify`).
           left join lateral (
               select pg_notify('weir_job_events', json_build_object(
                   'id', d.id, 'queue', d.queue, 'kind', d.kind, 'state', 'completed',
                   'attempt', d.attempt)::text)
                where d.notify) n on true"
    };
}

/// Completes `done` (fenced, as [`complete`]) and claims up to `demand` available jobs of `queue`
/// whose kind this process can run, in one statement and one commit. Returns the claimed jobs
/// and the ids actually completed.
///
/// A queue with `limits` (`[jobs.limits.<queue>]`) claims through `weir.claim_limited`
/// (migration 0002): it locks the queue's row in `weir.job_queue_limits`, so the claims of that
/// queue are serialised across processes, and claims at most what its global concurrency and
/// rate leave. Other queues never touch that table.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn claim(
    conn: &mut PgConnection,
    queue: &str,
    kinds: &[String],
    demand: i64,
    process: &str,
    done: &Completions,
    keep_history: bool,
    limits: Option<&weir_core::QueueLimits>,
) -> sqlx::Result<(Vec<Claimed>, Vec<i64>)> {
    use sqlx::Row;
    let unlimited = concat!(
        complete_ctes!("$5", "$6", "$7"),
        ", next as (
             select id
               from weir.jobs
              where state = 'available' and queue = $1
                -- Kinds without a worker here stay for a process that has one.
                and kind = any($2)
              -- The order every claim agrees on; jobs_claim serves it.
              order by priority, scheduled_at, id
              limit $3
              -- Rows another claim holds are skipped, not waited for.
              for update skip locked
         ), claimed as (
             update weir.jobs j
                set state = 'running', attempt = j.attempt + 1, attempted_at = now(),
                    attempted_by = $4
               from next
              where j.id = next.id
          returning j.id, j.queue, j.kind, j.args, j.attempt, j.max_attempts, j.timeout_ms,
                    j.created_at, greatest(0, (extract(epoch from now() - j.scheduled_at) * 1000000))::bigint
                        as wait_us
         )",
        claim_result!()
    );
    let limited = concat!(
        complete_ctes!("$5", "$6", "$7"),
        ", claimed as (
             -- The last argument makes this statement's completions run first, so they no
             -- longer count as running against the global concurrency.
             select * from weir.claim_limited($1, $2, $3::int, $4, $8, $9, $10,
                                              (select count(*) from done))
         )",
        claim_result!()
    );
    let query = match limits {
        None => sqlx::query(unlimited),
        Some(_) => sqlx::query(limited),
    };
    let mut query = query
        .bind(queue)
        .bind(kinds)
        .bind(demand)
        .bind(process)
        .bind(&done.ids)
        .bind(&done.attempts)
        .bind(keep_history);
    if let Some(l) = limits {
        query = query
            .bind(l.global_concurrency.map(|n| n as i32))
            .bind(l.rate.map(|r| r.jobs as i32))
            .bind(l.rate.map(|r| r.per.as_secs_f64()));
    }
    let rows = query.fetch_all(conn).await?;
    let mut claimed = Vec::with_capacity(rows.len());
    let mut completed = Vec::new();
    for row in rows {
        if row.try_get::<bool, _>("claimed")? {
            claimed.push(Claimed {
                id: row.try_get("id")?,
                queue: row.try_get("queue")?,
                kind: row.try_get("kind")?,
                args: row.try_get("args")?,
                attempt: row.try_get("attempt")?,
                max_attempts: row.try_get("max_attempts")?,
                timeout_ms: row.try_get("timeout_ms")?,
                created_at: row.try_get("created_at")?,
                wait_us: row.try_get("wait_us")?,
            });
        } else {
            completed.push(row.try_get("id")?);
        }
    }
    Ok((claimed, completed))
}

/// Completes runs `(id, attempt)`; returns the ids that were still theirs to complete. The others
/// were fenced off: rescued, cancelled or already finished.
pub(crate) async fn complete(
    conn: &mut PgConnection,
    ids: &[i64],
    attempts: &[i32],
    keep_history: bool,
) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(concat!(
        complete_ctes!("$1", "$2", "$3"),
        "
         select d.id
           from done d
           -- The completion notification the job asked for (`notify`).
           left join lateral (
               select pg_notify('weir_job_events', json_build_object(
                   'id', d.id, 'queue', d.queue, 'kind', d.kind, 'state', 'completed',
                   'attempt', d.attempt)::text)
                where d.notify) n on true"
    ))
    .bind(ids)
    .bind(attempts)
    .bind(keep_history)
    .fetch_all(conn)
    .await
}

/// Records a failed attempt and schedules the next one at `retry_at`; false if fenced off.
pub(crate) async fn retry(
    conn: &mut PgConnection,
    id: i64,
    attempt: i32,
    error: &str,
    retry_at: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let rows: Vec<i64> = sqlx::query_scalar(
        "with retried as (
             update weir.jobs j
                set state = case when $4 <= now() then 'available' else 'retryable' end
                                ::weir.job_state,
                    scheduled_at = greatest($4, now()),
                    errors = j.errors || jsonb_build_object(
                        'attempt', j.attempt, 'at', now(), 'error', $3::text)
              where j.id = $1 and j.attempt = $2 and j.state = 'running'
          returning j.id, j.queue, j.state
         )
         select r.id from retried r
           left join lateral (select pg_notify('weir_jobs', r.queue)
                               where r.state = 'available') n on true",
    )
    .bind(id)
    .bind(attempt)
    .bind(error)
    .bind(retry_at)
    .fetch_all(conn)
    .await?;
    Ok(!rows.is_empty())
}

/// Records a failed attempt and discards the job; false if fenced off.
pub(crate) async fn discard(
    conn: &mut PgConnection,
    id: i64,
    attempt: i32,
    error: &str,
) -> sqlx::Result<bool> {
    let rows: Vec<i64> = sqlx::query_scalar(concat!(
        "with done as (
             delete from weir.jobs j
              where j.id = $1 and j.attempt = $2 and j.state = 'running'
          returning j.*
         ), kept as (
             insert into weir.job_history (",
        job_columns!(),
        ")
             select ",
        moved_columns!(
            state: "'discarded'",
            errors: "errors || jsonb_build_object('attempt', attempt, 'at', now(), 'error', $3::text)"
        ),
        " from done
         )
         select d.id from done d
           left join lateral (
               select pg_notify('weir_job_events', json_build_object(
                   'id', d.id, 'queue', d.queue, 'kind', d.kind, 'state', 'discarded',
                   'attempt', d.attempt, 'error', $3::text)::text)
                where d.notify) n on true"
    ))
    .bind(id)
    .bind(attempt)
    .bind(error)
    .fetch_all(conn)
    .await?;
    Ok(!rows.is_empty())
}

/// Puts a running job back without counting the attempt against `max_attempts`: a snooze, or a
/// run interrupted by our own shutdown (`note` is then recorded as an error). False if fenced.
pub(crate) async fn put_back(
    conn: &mut PgConnection,
    id: i64,
    attempt: i32,
    at: DateTime<Utc>,
    note: Option<&str>,
) -> sqlx::Result<bool> {
    let rows: Vec<i64> = sqlx::query_scalar(
        "with back as (
             update weir.jobs j
                set state = case when $3 <= now() then 'available' else 'scheduled' end
                                ::weir.job_state,
                    scheduled_at = greatest($3, now()),
                    -- The next claim adds one to the attempt; this keeps the budget whole.
                    max_attempts = j.max_attempts + 1,
                    errors = case when $4::text is null then j.errors
                                  else j.errors || jsonb_build_object(
                                      'attempt', j.attempt, 'at', now(), 'error', $4::text) end
              where j.id = $1 and j.attempt = $2 and j.state = 'running'
          returning j.id, j.queue, j.state
         )
         select b.id from back b
           left join lateral (select pg_notify('weir_jobs', b.queue)
                               where b.state = 'available') n on true",
    )
    .bind(id)
    .bind(attempt)
    .bind(at)
    .bind(note)
    .fetch_all(conn)
    .await?;
    Ok(!rows.is_empty())
}

/// Makes due scheduled and retryable jobs available, at most `limit`; one notification per
/// queue. Returns how many it activated.
pub(crate) async fn activate_due(conn: &mut PgConnection, limit: i64) -> sqlx::Result<i64> {
    let counts: Vec<i64> = sqlx::query_scalar(
        "with due as (
             select id from weir.jobs
              where state in ('scheduled', 'retryable') and scheduled_at <= now()
              order by scheduled_at
              limit $1
              for update skip locked
         ), activated as (
             update weir.jobs j set state = 'available'
               from due where j.id = due.id
          returning j.queue
         )
         select n from (
             -- One wake-up per queue, however many jobs became available.
             select count(*) as n, pg_notify('weir_jobs', queue) from activated group by queue
         ) per_queue",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(counts.iter().sum())
}

/// Rescues running jobs whose process has not heartbeated for `stale_secs`: back to available
/// with an error recorded, or discarded when that was their last attempt. Returns the number.
pub(crate) async fn rescue(conn: &mut PgConnection, stale_secs: f64) -> sqlx::Result<i64> {
    let counts: Vec<i64> = sqlx::query_scalar(concat!(
        "with lost as (
             select j.id from weir.jobs j
              where j.state = 'running'
                and not exists (
                    select 1 from weir.job_processes p
                     where p.id = j.attempted_by
                       and p.heartbeat_at > now() - make_interval(secs => $1))
              for update skip locked
         ), done as (
             delete from weir.jobs j using lost
              where j.id = lost.id and j.attempt >= j.max_attempts
          returning j.*
         ), kept as (
             insert into weir.job_history (",
        job_columns!(),
        ")
             select ",
        moved_columns!(
            state: "'discarded'",
            errors: "errors || jsonb_build_object('attempt', attempt, 'at', now(), 'error', \
             'rescued: process ' || coalesce(attempted_by, '?') || ' stopped heartbeating')"
        ),
        " from done
         ), rescued as (
             update weir.jobs j
                set state = 'available', scheduled_at = now(),
                    errors = j.errors || jsonb_build_object('attempt', j.attempt, 'at', now(),
                        'error', 'rescued: process ' || coalesce(j.attempted_by, '?')
                                 || ' stopped heartbeating')
               from lost
              where j.id = lost.id and j.attempt < j.max_attempts
          returning j.queue
         )
         select count(*) from done
         union all
         select n from (
             select count(*) as n, pg_notify('weir_jobs', queue) from rescued group by queue
         ) per_queue"
    ))
    .bind(stale_secs)
    .fetch_all(conn)
    .await?;
    Ok(counts.iter().sum())
}

/// Registers (or refreshes) a process and the queues and kinds it serves.
pub(crate) async fn register_process(
    conn: &mut PgConnection,
    process: &str,
    queues: &Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "insert into weir.job_processes (id, queues) values ($1, $2)
         on conflict (id) do update set heartbeat_at = now(), queues = excluded.queues",
    )
    .bind(process)
    .bind(queues)
    .execute(conn)
    .await?;
    Ok(())
}

/// The heartbeat of a process and so of every job it runs; false if its row is gone (pruned
/// while it was unreachable), in which case it must register again.
pub(crate) async fn heartbeat(conn: &mut PgConnection, process: &str) -> sqlx::Result<bool> {
    let r = sqlx::query("update weir.job_processes set heartbeat_at = now() where id = $1")
        .bind(process)
        .execute(conn)
        .await?;
    Ok(r.rows_affected() == 1)
}

pub(crate) async fn deregister_process(conn: &mut PgConnection, process: &str) -> sqlx::Result<()> {
    sqlx::query("delete from weir.job_processes where id = $1").bind(process).execute(conn).await?;
    Ok(())
}

/// Takes or renews the maintenance lease for `ttl_secs`; true if `process` is the leader.
pub(crate) async fn elect(
    conn: &mut PgConnection,
    process: &str,
    ttl_secs: f64,
) -> sqlx::Result<bool> {
    let leader: Option<String> = sqlx::query_scalar(
        "insert into weir.job_leader as l (id, leader, expires_at)
              values (1, $1, now() + make_interval(secs => $2))
         on conflict (id) do update
               set leader = excluded.leader, expires_at = excluded.expires_at,
                   elected_at = case when l.leader = excluded.leader then l.elected_at
                                     else now() end
             -- Renew our own lease, or take over one that expired.
             where l.leader = excluded.leader or l.expires_at < now()
         returning leader",
    )
    .bind(process)
    .bind(ttl_secs)
    .fetch_optional(conn)
    .await?;
    Ok(leader.is_some())
}

pub(crate) async fn resign(conn: &mut PgConnection, process: &str) -> sqlx::Result<()> {
    sqlx::query("delete from weir.job_leader where leader = $1")
        .bind(process)
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes up to `batch` history rows in `states` finished more than `older_than_secs` ago.
pub(crate) async fn trim_history(
    conn: &mut PgConnection,
    states: &[&str],
    older_than_secs: f64,
    batch: i64,
) -> sqlx::Result<u64> {
    let states: Vec<String> = states.iter().map(|s| s.to_string()).collect();
    let r = sqlx::query(
        "with old as (
             select id from weir.job_history
              where state::text = any($1) and finished_at < now() - make_interval(secs => $2)
              order by finished_at
              -- In batches, so no statement holds many row locks or makes a burst of WAL.
              limit $3
         )
         delete from weir.job_history h using old where h.id = old.id",
    )
    .bind(&states)
    .bind(older_than_secs)
    .bind(batch)
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// Drops expired unique-for-a-period keys and processes long gone that run nothing.
pub(crate) async fn prune(conn: &mut PgConnection, process_gone_secs: f64) -> sqlx::Result<()> {
    sqlx::query("delete from weir.job_uniques where expires_at < now()")
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "delete from weir.job_processes p
          where p.heartbeat_at < now() - make_interval(secs => $1)
            and not exists (select 1 from weir.jobs j
                             where j.state = 'running' and j.attempted_by = p.id)",
    )
    .bind(process_gone_secs)
    .execute(conn)
    .await?;
    Ok(())
}

/// The time a periodic job was last enqueued for.
pub(crate) async fn periodic_last(
    conn: &mut PgConnection,
    name: &str,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar("select last_at from weir.job_periodic where name = $1")
        .bind(name)
        .fetch_optional(conn)
        .await
}

/// Moves a periodic job's mark forward to `at`; false if another leader already did (the fence
/// that keeps two leaders from enqueueing the same run).
pub(crate) async fn periodic_advance(
    conn: &mut PgConnection,
    name: &str,
    at: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "insert into weir.job_periodic as p (name, last_at) values ($1, $2)
         on conflict (name) do update set last_at = excluded.last_at
          where p.last_at < excluded.last_at",
    )
    .bind(name)
    .bind(at)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Available jobs per queue among `queues` (queues without any are absent); the `queued`
/// gauge. `jobs_claim` serves it.
pub(crate) async fn available_by_queue(
    conn: &mut PgConnection,
    queues: &[String],
) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "select queue, count(*) from weir.jobs
          where state = 'available' and queue = any($1)
          group by queue",
    )
    .bind(queues)
    .fetch_all(conn)
    .await
}
