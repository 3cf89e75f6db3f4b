//! Every edge of the state machine in docs/jobs.md.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use weir_jobs::admin::{cancel, retry, show};
use weir_jobs::{Error, JobRunner, JobState};

use crate::common::*;

/// Generous: 20 tests share this binary's two cores with PostgreSQL; a wait costs only when
/// it fails.
const WAIT: Duration = Duration::from_secs(20);

/// [`fast_config`] for the tests here that do not test the rescue: with `rescue_after` at
/// 600 ms, a loaded machine that starves this test's runtime for that long makes the process
/// rescue its own running jobs (its heartbeat looks stale) and run them again — seen in CI:
/// `failing` rescued at attempt 1, then discarded at attempt 2, never `retryable`.
fn steady_config(concurrency: u32) -> weir_jobs::Config {
    weir_jobs::Config { rescue_after: Duration::from_secs(60), ..fast_config(concurrency) }
}

/// Waits for the job to be in `want`; on a timeout, says which states it went through and
/// where it stands, so a failure under load can be told from a stuck job.
async fn until_state(env: &Env, id: weir_jobs::JobId, want: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen: Vec<String> = Vec::new();
    loop {
        let now = state(&env.pool, id).await;
        if now == want {
            return;
        }
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        if std::time::Instant::now() >= deadline {
            let mut conn = env.pool.acquire().await.unwrap();
            let info = show(&mut conn, id).await;
            panic!(
                "timed out after {WAIT:?} waiting for job {id} to be {want}; \
                 states seen: {seen:?}; the job now: {info:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_edge_of_the_state_machine() {
    let env = setup("jobs_edges").await;
    let probe = Arc::new(Probe::default());
    let mut conn = env.pool.acquire().await.unwrap();

    // enqueue → scheduled (future), enqueue → available (now).
    let later = enqueue(&env.pool, task(Task::Ok).run_in(Duration::from_millis(700))).await;
    assert_eq!(state(&env.pool, later).await, "scheduled");
    // scheduled → cancelled → (retry) available.
    let sched = enqueue(&env.pool, task(Task::Ok).run_in(Duration::from_secs(3600))).await;
    assert_eq!(cancel(&mut conn, sched).await.unwrap(), JobState::Scheduled);
    assert_eq!(state(&env.pool, sched).await, "cancelled");
    // cancelled → available (re-queued by hand) — runs once the runner starts.
    assert_eq!(retry(&mut conn, sched).await.unwrap(), JobState::Cancelled);
    assert_eq!(state(&env.pool, sched).await, "available");
    // available → cancelled.
    let avail = enqueue(&env.pool, task(Task::Ok)).await;
    assert_eq!(cancel(&mut conn, avail).await.unwrap(), JobState::Available);
    // retryable → available by hand: a job failed before (simulated by its row).
    let manual = enqueue(&env.pool, task(Task::Ok).run_in(Duration::from_secs(3600))).await;
    sqlx::query("update weir.jobs set state = 'retryable' where id = $1")
        .bind(manual.0)
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_eq!(retry(&mut conn, manual).await.unwrap(), JobState::Retryable);

    let ok = enqueue(&env.pool, task(Task::Ok)).await;
    let failing = enqueue(&env.pool, task(Task::Fail).max_attempts(2)).await;
    let flaky = enqueue(&env.pool, task(Task::FailUntil { succeed_at: 2 })).await;
    let discard = enqueue(&env.pool, task(Task::Discard)).await;
    let snooze = enqueue(&env.pool, task(Task::Snooze { ms: 300 }).max_attempts(1)).await;
    let panics = enqueue(&env.pool, task(Task::Panic).max_attempts(1)).await;
    let slow =
        enqueue(&env.pool, task(Task::Sleep { ms: 5_000 }).timeout(Duration::from_millis(100)))
            .await;
    let blocked = enqueue(&env.pool, task(Task::Block)).await;

    let running = JobRunner::new(env.pool.clone(), steady_config(20))
        .register(Scripted(probe.clone()))
        .start()
        .await
        .unwrap();

    // available → running → completed.
    until_state(&env, ok, "completed").await;
    until_state(&env, sched, "completed").await;
    until_state(&env, manual, "completed").await;
    // scheduled → available (sweeper) → running → completed.
    until_state(&env, later, "completed").await;
    let info = show(&mut conn, later).await.unwrap();
    assert!(info.attempted_at.unwrap() >= info.scheduled_at);

    // running → retryable (attempts left), with the error and a backoff.
    until_state(&env, failing, "retryable").await;
    let info = show(&mut conn, failing).await.unwrap();
    assert_eq!(info.errors[0]["error"], "scripted failure");
    assert_eq!(info.errors[0]["attempt"], 1);
    assert!(info.scheduled_at > Utc::now() + chrono::Duration::minutes(30));
    // retryable → available (by hand) → running → discarded (last attempt).
    retry(&mut conn, failing).await.unwrap();
    until_state(&env, failing, "discarded").await;
    let info = show(&mut conn, failing).await.unwrap();
    assert_eq!(info.attempt, 2);
    assert_eq!(info.errors.as_array().unwrap().len(), 2);
    // discarded → available (re-queued by hand): one more attempt is granted, which fails.
    assert_eq!(retry(&mut conn, failing).await.unwrap(), JobState::Discarded);
    eventually("the re-queued job ran its extra attempt", WAIT, || async {
        probe.starts(failing.0) == 3 && state(&env.pool, failing).await == "discarded"
    })
    .await;
    let info = show(&mut conn, failing).await.unwrap();
    assert_eq!((info.attempt, info.max_attempts), (3, 3));

    // retryable → available (sweeper, zero backoff) → completed at attempt 2.
    until_state(&env, flaky, "completed").await;
    assert_eq!(show(&mut conn, flaky).await.unwrap().attempt, 2);

    // running → discarded by the worker, attempts left or not.
    until_state(&env, discard, "discarded").await;
    let info = show(&mut conn, discard).await.unwrap();
    assert_eq!(info.attempt, 1);
    assert_eq!(info.errors[0]["error"], "scripted discard");

    // running → scheduled (snooze, attempt not counted) → ... it snoozes again and again
    // without being discarded although max_attempts was 1.
    eventually("the job snoozed three times", WAIT, || async { probe.starts(snooze.0) >= 3 }).await;
    let info = show(&mut conn, snooze).await.unwrap();
    assert!(matches!(info.state, JobState::Scheduled | JobState::Available | JobState::Running));
    assert!(info.max_attempts >= 3, "{info:?}");
    assert_eq!(info.errors.as_array().unwrap().len(), 0);
    cancel(&mut conn, snooze).await.unwrap();

    // running → discarded after a panic on the last attempt.
    until_state(&env, panics, "discarded").await;
    let err = show(&mut conn, panics).await.unwrap().errors[0]["error"].clone();
    assert_eq!(err, "worker panicked: scripted panic");

    // running → retryable on timeout.
    until_state(&env, slow, "retryable").await;
    let err = show(&mut conn, slow).await.unwrap().errors[0]["error"].clone();
    assert_eq!(err, "timed out after 100ms");

    // running → cancelled: the attempt is told to stop, and its outcome goes nowhere.
    until_state(&env, blocked, "running").await;
    eventually("the blocked job started", WAIT, || async { probe.starts(blocked.0) == 1 }).await;
    assert_eq!(cancel(&mut conn, blocked).await.unwrap(), JobState::Running);
    eventually("the running job saw its cancel", WAIT, || async {
        probe.cancelled.lock().unwrap().contains(&blocked.0)
    })
    .await;
    assert_eq!(state(&env.pool, blocked).await, "cancelled");

    // Refused edges.
    assert!(matches!(
        retry(&mut conn, ok).await.unwrap_err(),
        Error::WrongState { state: JobState::Completed, .. }
    ));
    assert!(matches!(
        cancel(&mut conn, ok).await.unwrap_err(),
        Error::WrongState { state: JobState::Completed, .. }
    ));
    assert!(matches!(
        cancel(&mut conn, weir_jobs::JobId(999_999)).await.unwrap_err(),
        Error::NotFound(_)
    ));
    running.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn rescue_of_a_silent_process_and_graceful_stop() {
    let env = setup("jobs_rescue").await;
    let probe = Arc::new(Probe::default());
    // Two jobs left `running` by a process that no longer exists: one with attempts left
    // (running → available → completed), one on its last attempt (running → discarded).
    let again = enqueue(&env.pool, task(Task::Ok)).await;
    let last = enqueue(&env.pool, task(Task::Ok).max_attempts(1)).await;
    sqlx::query(
        "update weir.jobs set state = 'running', attempt = 1, attempted_at = now(),
                              attempted_by = 'ghost:1:dead'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let running = JobRunner::new(env.pool.clone(), fast_config(2))
        .register(Scripted(probe.clone()))
        .start()
        .await
        .unwrap();
    until_state(&env, again, "completed").await;
    until_state(&env, last, "discarded").await;
    let mut conn = env.pool.acquire().await.unwrap();
    let info = show(&mut conn, again).await.unwrap();
    assert_eq!(info.attempt, 2);
    assert!(
        info.errors[0]["error"].as_str().unwrap().contains("ghost:1:dead stopped heartbeating")
    );

    // Graceful stop past its grace: the running job is put back without spending an attempt.
    let blocked = enqueue(&env.pool, task(Task::Block).max_attempts(1)).await;
    until_state(&env, blocked, "running").await;
    eventually("the blocked job started", WAIT, || async { probe.starts(blocked.0) == 1 }).await;
    running.stop(Duration::from_millis(100)).await.unwrap();
    let info = show(&mut conn, blocked).await.unwrap();
    assert_eq!(info.state, JobState::Available);
    assert_eq!(info.max_attempts, 2);
    assert!(info.errors[0]["error"].as_str().unwrap().contains("interrupted"));
    // The process deregistered.
    assert_eq!(count(&env.pool, "select count(*) from weir.job_processes").await, 0);
}

#[tokio::test]
async fn a_local_queue_is_handed_back_at_stop() {
    let env = setup("jobs_prefetch").await;
    let probe = Arc::new(Probe::default());
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(enqueue(&env.pool, task(Task::Block)).await);
    }
    let config = weir_jobs::Config { prefetch: 4, ..steady_config(1) };
    let running = JobRunner::new(env.pool.clone(), config)
        .register(Scripted(probe.clone()))
        .start()
        .await
        .unwrap();
    // One runs, and the local queue holds more, all `running` in the table.
    eventually("a job runs and more are held", WAIT, || async {
        probe.started.lock().unwrap().len() == 1
            && count(&env.pool, "select count(*) from weir.jobs where state = 'running'").await > 1
    })
    .await;
    running.stop(Duration::from_millis(100)).await.unwrap();
    // Every job is available again; the unstarted ones lost nothing, the interrupted one says so.
    assert_eq!(
        count(&env.pool, "select count(*) from weir.jobs where state = 'available'").await,
        8
    );
    let with_errors =
        count(&env.pool, "select count(*) from weir.jobs where jsonb_array_length(errors) > 0")
            .await;
    assert_eq!(with_errors, 1);
    let spent =
        count(&env.pool, "select count(*) from weir.jobs where attempt >= max_attempts").await;
    assert_eq!(spent, 0);
}

#[tokio::test]
async fn a_job_cancelled_in_the_local_queue_stays_cancelled() {
    let env = setup("jobs_prefetch_cancel").await;
    let probe = Arc::new(Probe::default());
    let first = enqueue(&env.pool, task(Task::Block)).await;
    let mut rest = Vec::new();
    for _ in 0..4 {
        rest.push(enqueue(&env.pool, task(Task::Ok)).await);
    }
    let config = weir_jobs::Config { prefetch: 4, ..steady_config(1) };
    let running = JobRunner::new(env.pool.clone(), config)
        .register(Scripted(probe.clone()))
        .start()
        .await
        .unwrap();
    eventually("the first runs and the rest wait in the local queue", WAIT, || async {
        probe.starts(first.0) == 1
            && count(&env.pool, "select count(*) from weir.jobs where state = 'running'").await == 5
    })
    .await;
    let mut conn = env.pool.acquire().await.unwrap();
    assert_eq!(cancel(&mut conn, rest[1]).await.unwrap(), JobState::Running);
    probe.release.notify_waiters();
    eventually("the others complete", WAIT, || async {
        count(&env.pool, "select count(*) from weir.job_history where state = 'completed'").await
            == 4
    })
    .await;
    // Its cancel token is set before it leaves the local queue, so it is normally skipped; if the
    // notification came late and it ran, the fence kept its completion out.
    assert!(probe.starts(rest[1].0) <= 1);
    assert_eq!(state(&env.pool, rest[1]).await, "cancelled");
    running.stop(Duration::from_secs(5)).await.unwrap();
}
