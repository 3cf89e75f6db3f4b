//! Wake-ups: notifications, and the poll and sweeper when notifications are lost; periodic
//! jobs; completion notifications; a narrow hot table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_jobs::{Config, JobRunner, PeriodicJob};

use crate::common::*;

#[tokio::test]
async fn notifications_wake_an_idle_producer_at_once() {
    let env = setup("jobs_notify").await;
    let probe = Arc::new(Probe::default());
    // A poll interval far longer than the deadline: only the notification can be in time.
    let config = Config { poll_interval: Duration::from_secs(60), ..fast_config(2) };
    let running = JobRunner::new(env.pool.clone(), config)
        .register(Scripted(probe.clone()))
        .start()
        .await
        .unwrap();
    // Let the first claims run empty.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let id = enqueue(&env.pool, task(Task::Ok)).await;
    eventually("the job starts", Duration::from_secs(5), || async { probe.starts(id.0) == 1 })
        .await;
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    running.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn lost_notifications_are_covered_by_the_poll_and_the_sweeper() {
    let env = setup("jobs_lost").await;
    let probe = Arc::new(Probe::default());
    // No LISTEN at all (as behind a transaction-mode pooler).
    let config = Config { listen: false, ..fast_config(2) };
    let running = JobRunner::new(env.pool.clone(), config)
        .register(Scripted(probe.clone()))
        .start()
        .await
        .unwrap();
    let now = enqueue(&env.pool, task(Task::Ok)).await;
    let later = enqueue(&env.pool, task(Task::Ok).run_in(Duration::from_millis(300))).await;
    eventually("both jobs complete without notifications", Duration::from_secs(10), || async {
        state(&env.pool, now).await == "completed" && state(&env.pool, later).await == "completed"
    })
    .await;
    running.stop(Duration::from_secs(5)).await.unwrap();

    // With LISTEN, but the listening connection is killed: the job still runs.
    let config = Config { poll_interval: Duration::from_millis(300), ..fast_config(2) };
    let running = JobRunner::new(env.pool.clone(), config)
        .register(Scripted(probe.clone()))
        .start()
        .await
        .unwrap();
    eventually("the listener is connected", Duration::from_secs(10), || async {
        count(&env.pool, "select count(*) from pg_stat_activity where query ilike 'listen%'").await
            > 0
    })
    .await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "select pg_terminate_backend(pid) from pg_stat_activity where query ilike 'listen%'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(!killed.is_empty());
    let id = enqueue(&env.pool, task(Task::Ok)).await;
    eventually("the job completes after the listener died", Duration::from_secs(10), || async {
        state(&env.pool, id).await == "completed"
    })
    .await;
    running.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn periodic_jobs_run_once_per_time_across_leaders() {
    let env = setup("jobs_periodic").await;
    let probe = Arc::new(Probe::default());
    let every_second = || PeriodicJob::new("tick", "* * * * * *", task(Task::Ok)).unwrap();
    // Two processes both declare it; only the leader enqueues, and the mark fences the rest.
    let started = Instant::now();
    let a = JobRunner::new(env.pool.clone(), fast_config(2))
        .register(Scripted(probe.clone()))
        .periodic(every_second())
        .start()
        .await
        .unwrap();
    let b = JobRunner::new(env.pool.clone(), fast_config(2))
        .register(Scripted(probe.clone()))
        .periodic(every_second())
        .start()
        .await
        .unwrap();
    eventually("three periodic runs", Duration::from_secs(10), || async {
        count(&env.pool, "select count(*) from weir.job_history where state = 'completed'").await
            >= 3
    })
    .await;
    a.stop(Duration::from_secs(5)).await.unwrap();
    b.stop(Duration::from_secs(5)).await.unwrap();
    // At most one job per second that passed (two enqueueing leaders would double it).
    let jobs = count(&env.pool, "select count(*) from weir.all_jobs").await;
    let seconds = started.elapsed().as_secs() as i64 + 1;
    assert!(jobs <= seconds, "{jobs} jobs in {seconds} s");
}

#[tokio::test]
async fn completion_notifications_and_a_narrow_hot_table() {
    let env = setup("jobs_events").await;
    let probe = Arc::new(Probe::default());
    let mut listener = sqlx::postgres::PgListener::connect(&env.db.url()).await.unwrap();
    listener.listen(weir_jobs::EVENTS_CHANNEL).await.unwrap();
    let running = JobRunner::new(env.pool.clone(), fast_config(10))
        .register(Scripted(probe.clone()))
        .start()
        .await
        .unwrap();
    let watched = enqueue(&env.pool, task(Task::Ok).notify(true)).await;
    let n = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await.unwrap().unwrap();
    let event: serde_json::Value = serde_json::from_str(n.payload()).unwrap();
    assert_eq!(event["id"], watched.0);
    assert_eq!(event["state"], "completed");
    let failed = enqueue(&env.pool, task(Task::Discard).notify(true)).await;
    let n = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await.unwrap().unwrap();
    let event: serde_json::Value = serde_json::from_str(n.payload()).unwrap();
    assert_eq!(event["id"], failed.0);
    assert_eq!(event["state"], "discarded");
    assert_eq!(event["error"], "scripted discard");

    // Finished jobs leave weir.jobs in the statement that finishes them.
    let jobs: Vec<weir_jobs::Job> = (0..500).map(|_| task(Task::Ok)).collect();
    let mut conn = env.pool.acquire().await.unwrap();
    weir_jobs::enqueue_many(&mut conn, &jobs).await.unwrap();
    eventually("500 jobs complete", Duration::from_secs(20), || async {
        count(&env.pool, "select count(*) from weir.job_history where state = 'completed'").await
            == 501
    })
    .await;
    assert_eq!(count(&env.pool, "select count(*) from weir.jobs").await, 0);
    running.stop(Duration::from_secs(5)).await.unwrap();

    // Retention trims history in batches at the leader's first maintenance round.
    sqlx::query("update weir.job_history set finished_at = now() - interval '2 days'")
        .execute(&env.pool)
        .await
        .unwrap();
    let running = JobRunner::new(env.pool.clone(), fast_config(1))
        .register(Scripted(probe.clone()))
        .start()
        .await
        .unwrap();
    eventually("completed history past retention is trimmed", Duration::from_secs(10), || async {
        count(&env.pool, "select count(*) from weir.job_history where state = 'completed'").await
            == 0
    })
    .await;
    // Discarded jobs are kept longer (7 days by default).
    assert_eq!(count(&env.pool, "select count(*) from weir.job_history").await, 1);
    running.stop(Duration::from_secs(5)).await.unwrap();
}
