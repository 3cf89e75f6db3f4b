//! A worker process killed for real (SIGKILL): its jobs are rescued and run elsewhere.
//!
//! The child is this test binary again, running only `crash::child_process` with
//! `WEIR_JOBS_CHILD_URL` set; without that variable the child test does nothing.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use weir_jobs::{Config, JobContext, JobError, JobRunner, QueueConfig, Worker};

use crate::common::*;

const CHILD_URL: &str = "WEIR_JOBS_CHILD_URL";

/// Claims jobs and never finishes them.
struct Stuck;

impl Worker for Stuck {
    type Args = Task;
    async fn work(&self, _ctx: JobContext, _task: Task) -> Result<(), JobError> {
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[tokio::test]
async fn child_process() {
    let Ok(url) = std::env::var(CHILD_URL) else { return };
    let pool = sqlx::postgres::PgPoolOptions::new().connect(&url).await.unwrap();
    let _running = JobRunner::new(
        pool,
        Config {
            queues: vec![QueueConfig::new("default", 4)],
            heartbeat_interval: Duration::from_millis(100),
            rescue_after: Duration::from_millis(600),
            maintenance: false,
            ..Config::default()
        },
    )
    .process_id(weir_core::ProcessId::named("child"))
    .register(Stuck)
    .start()
    .await
    .unwrap();
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn a_killed_worker_processs_jobs_are_rescued() {
    let env = setup("jobs_crash").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(enqueue(&env.pool, task(Task::Tx)).await);
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash::child_process", "--exact", "--test-threads=1"])
        .env(CHILD_URL, env.db.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("the child claims the jobs", Duration::from_secs(30), || async {
        count(
            &env.pool,
            "select count(*) from weir.jobs where state = 'running' and attempted_by = 'child'",
        )
        .await
            == 3
    })
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let probe = Arc::new(Probe::default());
    let running = JobRunner::new(env.pool.clone(), fast_config(4))
        .register(Scripted(probe.clone()))
        .start()
        .await
        .unwrap();
    eventually("the rescued jobs complete", Duration::from_secs(15), || async {
        count(&env.pool, "select count(*) from weir.job_history where state = 'completed'").await
            == 3
    })
    .await;
    let effects: Vec<(i64, i32)> =
        sqlx::query_as("select job_id, attempt from effects order by job_id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(effects, ids.iter().map(|id| (id.0, 2)).collect::<Vec<_>>());
    running.stop(Duration::from_secs(5)).await.unwrap();
}
