//! Property: under many workers in several processes and random failures, no job runs twice
//! at once, and every job completes exactly once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use weir_jobs::{Job, JobArgs, JobContext, JobError, JobRunner, Worker};

use crate::common::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Chaos {
    /// Attempts that fail before one succeeds.
    fail_first: u32,
    /// Complete in the worker's own transaction, with a write.
    in_tx: bool,
    /// Microseconds of work.
    work_us: u64,
}

impl JobArgs for Chaos {
    const KIND: &'static str = "chaos";
}

#[derive(Default)]
struct Seen {
    running: Mutex<HashSet<i64>>,
    overlaps: Mutex<Vec<i64>>,
    successes: Mutex<HashMap<i64, u32>>,
}

struct ChaosWorker(Arc<Seen>);

impl Worker for ChaosWorker {
    type Args = Chaos;

    async fn work(&self, ctx: JobContext, args: Chaos) -> Result<(), JobError> {
        let id = ctx.id().0;
        if !self.0.running.lock().unwrap().insert(id) {
            self.0.overlaps.lock().unwrap().push(id);
        }
        tokio::time::sleep(Duration::from_micros(args.work_us)).await;
        let result = if ctx.attempt() <= args.fail_first {
            Err(JobError::retry_after(Duration::ZERO, "chaos"))
        } else if args.in_tx {
            async {
                let mut tx = ctx.begin().await?;
                sqlx::query("insert into effects (job_id, attempt) values ($1, $2)")
                    .bind(id)
                    .bind(ctx.attempt() as i32)
                    .execute(&mut *tx)
                    .await?;
                ctx.complete(tx).await?;
                Ok::<(), JobError>(())
            }
            .await
        } else {
            Ok(())
        };
        self.0.running.lock().unwrap().remove(&id);
        if result.is_ok() {
            *self.0.successes.lock().unwrap().entry(id).or_default() += 1;
        }
        result
    }
}

fn chaos() -> impl Strategy<Value = Chaos> {
    (prop::sample::select(vec![0u32, 0, 0, 1, 2, 3]), any::<bool>(), 0u64..2_000)
        .prop_map(|(fail_first, in_tx, work_us)| Chaos { fail_first, in_tx, work_us })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

    #[test]
    fn every_job_completes_exactly_once(
        jobs in prop::collection::vec(chaos(), 20..150),
        processes in 1usize..=3,
        concurrency in 1u32..=8,
        prefetch in prop::sample::select(vec![0u32, 0, 7]),
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let env = setup("jobs_prop").await;
            let seen = Arc::new(Seen::default());
            let mut runners = Vec::new();
            for _ in 0..processes {
                runners.push(
                    JobRunner::new(
                        env.pool.clone(),
                        weir_jobs::Config { prefetch, ..fast_config(concurrency) },
                    )
                        .register(ChaosWorker(seen.clone()))
                        .start()
                        .await
                        .unwrap(),
                );
            }
            let batch: Vec<Job> =
                jobs.iter().map(|c| Job::new(c).unwrap().max_attempts(5)).collect();
            let mut conn = env.pool.acquire().await.unwrap();
            let ids = weir_jobs::enqueue_many(&mut conn, &batch).await.unwrap();
            eventually("every job completes", Duration::from_secs(30), || async {
                count(&env.pool, "select count(*) from weir.job_history where state = 'completed'")
                    .await
                    == jobs.len() as i64
            })
            .await;
            for r in runners {
                r.stop(Duration::from_secs(5)).await.unwrap();
            }
            assert!(seen.overlaps.lock().unwrap().is_empty(), "ran concurrently: {:?}", seen.overlaps);
            let successes = seen.successes.lock().unwrap().clone();
            for (id, job) in ids.iter().zip(&jobs) {
                assert_eq!(successes.get(&id.0), Some(&1), "job {id} succeeded once");
                let attempt: i32 = sqlx::query_scalar(
                    "select attempt from weir.job_history where id = $1 and state = 'completed'",
                )
                .bind(id.0)
                .fetch_one(&env.pool)
                .await
                .unwrap();
                assert_eq!(attempt as u32, job.fail_first + 1);
            }
            let in_tx = jobs.iter().filter(|j| j.in_tx).count() as i64;
            assert_eq!(count(&env.pool, "select count(*) from effects").await, in_tx);
            assert_eq!(count(&env.pool, "select count(*) from weir.jobs").await, 0);
        });
    }
}
