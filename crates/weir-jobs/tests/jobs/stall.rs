//! Throughput without stalls: a backlog drains at the speed of the workers, whatever the poll
//! interval, with and without a local queue (`prefetch`).
//!
//! The jobs are enqueued in bulk and the table analyzed before the runner starts, as
//! autovacuum does after a bulk enqueue: the statistics then say that no job runs, which once
//! made every completion scan all the running rows (quadratic in the jobs in flight, minutes
//! for 30,000 jobs with a local queue). The poll interval of 10 s makes a producer that forgets
//! its demand obvious too: one wait for the poll costs more than the whole drain is allowed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use weir_jobs::{Config, Job, JobArgs, JobContext, JobError, JobRunner, QueueConfig, Worker};

use crate::common::*;

#[derive(serde::Serialize, serde::Deserialize)]
struct Noop {}

impl JobArgs for Noop {
    const KIND: &'static str = "noop";
}

struct NoopWorker(Arc<AtomicU64>);

impl Worker for NoopWorker {
    type Args = Noop;
    async fn work(&self, _ctx: JobContext, _args: Noop) -> Result<(), JobError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

const JOBS: usize = 20_000;
const POLL: Duration = Duration::from_secs(10);
/// Several times what the drain takes (a few seconds in a debug build on a loaded machine),
/// less than one wait for the poll.
const BOUND: Duration = Duration::from_secs(9);

/// Drains `JOBS` no-op jobs with 10 workers and `prefetch`; asserts it takes less than `BOUND`.
async fn drains_without_stalling(prefix: &str, prefetch: u32) {
    let env = setup(prefix).await;
    let runs = Arc::new(AtomicU64::new(0));
    {
        let jobs: Vec<Job> = (0..JOBS).map(|_| Job::new(&Noop {}).unwrap()).collect();
        let mut conn = env.pool.acquire().await.unwrap();
        for chunk in jobs.chunks(5000) {
            weir_jobs::enqueue_many(&mut conn, chunk).await.unwrap();
        }
    }
    sqlx::query("analyze weir.jobs").execute(&env.pool).await.unwrap();
    let config = Config {
        queues: vec![QueueConfig::new("default", 10)],
        poll_interval: POLL,
        prefetch,
        ..Config::default()
    };
    let start = Instant::now();
    let running = JobRunner::new(env.pool.clone(), config)
        .register(NoopWorker(runs.clone()))
        .start()
        .await
        .unwrap();
    // Waits past the bound, so that a failure says how long it took.
    eventually("every job is completed", BOUND + POLL * 6, || async {
        running.metrics().queues[0].completed >= JOBS as u64
    })
    .await;
    let took = start.elapsed();
    let m = running.metrics().queues[0].clone();
    running.stop(Duration::from_secs(5)).await.unwrap();
    assert_eq!(runs.load(Ordering::Relaxed), JOBS as u64);
    assert_eq!(count(&env.pool, "select count(*) from weir.jobs").await, 0);
    assert!(
        took < BOUND,
        "{JOBS} jobs took {took:?} with prefetch {prefetch} ({} claims of {:.1} jobs on \
         average, {} completion statements)",
        m.claims,
        m.claimed as f64 / m.claims.max(1) as f64,
        m.completion_writes
    );
}

#[tokio::test]
async fn a_backlog_drains_without_stalling() {
    drains_without_stalling("jobs_stall_plain", 0).await;
}

#[tokio::test]
async fn a_backlog_drains_through_the_local_queue_without_stalling() {
    drains_without_stalling("jobs_stall_prefetch", 500).await;
}
