//! The fence: a rescued attempt's late completion cannot overwrite the newer attempt.

use std::sync::Arc;
use std::time::Duration;

use weir_jobs::{Config, JobRunner, QueueConfig};

use crate::common::*;

#[tokio::test]
async fn a_rescued_attempts_late_completion_is_rejected() {
    let env = setup("jobs_fence").await;
    let old_probe = Arc::new(Probe::default());
    let new_probe = Arc::new(Probe::default());
    // The old process: one slot, slow heartbeat, no maintenance.
    let old = JobRunner::new(
        env.pool.clone(),
        Config {
            queues: vec![QueueConfig::new("default", 2)],
            heartbeat_interval: Duration::from_secs(60),
            rescue_after: Duration::from_secs(180),
            maintenance: false,
            ..Config::default()
        },
    )
    .process_id(weir_core::ProcessId::named("old"))
    .register(Scripted(old_probe.clone()))
    .start()
    .await
    .unwrap();
    let in_tx = enqueue(&env.pool, task(Task::BlockThenTx)).await;
    let plain = enqueue(&env.pool, task(Task::Block)).await;
    eventually("both jobs run on the old process", Duration::from_secs(10), || async {
        old_probe.starts(in_tx.0) == 1 && old_probe.starts(plain.0) == 1
    })
    .await;

    // The old process goes silent (as if paused); the new process rescues and reruns its jobs.
    sqlx::query(
        "update weir.job_processes set heartbeat_at = now() - interval '1 hour' where id = 'old'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let new = JobRunner::new(env.pool.clone(), fast_config(2))
        .process_id(weir_core::ProcessId::named("new"))
        .register(Scripted(new_probe.clone()))
        .start()
        .await
        .unwrap();
    eventually("the new process runs both jobs", Duration::from_secs(10), || async {
        new_probe.starts(in_tx.0) == 1 && new_probe.starts(plain.0) == 1
    })
    .await;

    // The old attempts finish late: both outcomes are fenced off.
    old_probe.release.notify_waiters();
    eventually("the old attempts reported", Duration::from_secs(10), || async {
        old_probe.results.lock().unwrap().contains_key(&in_tx.0)
            && old.metrics().queues[0].fenced >= 1
    })
    .await;
    let old_result = old_probe.results.lock().unwrap()[&in_tx.0].clone();
    assert!(old_result.contains("Fenced"), "{old_result}");
    // Its write rolled back with the rejected completion.
    assert_eq!(count(&env.pool, "select count(*) from effects").await, 0);
    // The new attempts still own the jobs.
    for id in [in_tx, plain] {
        assert_eq!(state(&env.pool, id).await, "running");
        let attempt: i32 = sqlx::query_scalar("select attempt from weir.jobs where id = $1")
            .bind(id.0)
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(attempt, 2);
    }
    // The new attempts complete.
    new_probe.release.notify_waiters();
    eventually("the new attempts complete", Duration::from_secs(10), || async {
        state(&env.pool, in_tx).await == "completed" && state(&env.pool, plain).await == "completed"
    })
    .await;
    let effects: Vec<(i64, i32)> =
        sqlx::query_as("select job_id, attempt from effects").fetch_all(&env.pool).await.unwrap();
    assert_eq!(effects, vec![(in_tx.0, 2)]);
    old.stop(Duration::from_secs(5)).await.unwrap();
    new.stop(Duration::from_secs(5)).await.unwrap();
}
