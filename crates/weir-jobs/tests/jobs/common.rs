//! Shared fixtures: a database with the job tables, a scriptable worker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use weir_jobs::{Config, JobArgs, JobContext, JobError, QueueConfig, Worker};
use weir_testkit::TestDatabase;

/// Polls a condition with a deadline (the workspace's one helper).
pub(crate) use weir_testkit::eventually;

pub(crate) struct Env {
    pub(crate) pool: PgPool,
    pub(crate) db: TestDatabase<'static>,
}

pub(crate) async fn setup(prefix: &str) -> Env {
    let db = weir_testkit::shared().database(prefix).expect("test database");
    let pool = PgPoolOptions::new().max_connections(30).connect(&db.url()).await.expect("connect");
    weir_jobs::migrate(&pool).await.expect("migrate");
    sqlx::query("create table effects (job_id bigint primary key, attempt int not null)")
        .execute(&pool)
        .await
        .expect("effects table");
    Env { pool, db }
}

/// A runner configuration with short intervals, for tests.
pub(crate) fn fast_config(concurrency: u32) -> Config {
    Config {
        queues: vec![QueueConfig::new("default", concurrency)],
        poll_interval: Duration::from_millis(200),
        heartbeat_interval: Duration::from_millis(100),
        rescue_after: Duration::from_millis(600),
        sweep_interval: Duration::from_millis(100),
        ..Config::default()
    }
}

/// What the scripted worker does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
pub(crate) enum Task {
    Ok,
    Fail,
    /// Fails until `attempt` reaches `succeed_at`.
    FailUntil {
        succeed_at: u32,
    },
    Discard,
    Snooze {
        ms: u64,
    },
    Panic,
    Sleep {
        ms: u64,
    },
    /// Waits until released by the probe or cancelled.
    Block,
    /// Writes to `effects` and completes in the same transaction.
    Tx,
    /// Blocks until released, then writes and completes in its transaction.
    BlockThenTx,
}

impl JobArgs for Task {
    const KIND: &'static str = "task";
}

/// What tests observe of the scripted worker.
#[derive(Default)]
pub(crate) struct Probe {
    pub(crate) started: Mutex<Vec<(i64, u32)>>,
    pub(crate) results: Mutex<HashMap<i64, String>>,
    pub(crate) release: tokio::sync::Notify,
    pub(crate) cancelled: Mutex<Vec<i64>>,
}

impl Probe {
    pub(crate) fn starts(&self, id: i64) -> usize {
        self.started.lock().unwrap().iter().filter(|(j, _)| *j == id).count()
    }
}

#[derive(Clone)]
pub(crate) struct Scripted(pub(crate) Arc<Probe>);

impl Worker for Scripted {
    type Args = Task;

    async fn work(&self, ctx: JobContext, task: Task) -> Result<(), JobError> {
        let id = ctx.id().0;
        self.0.started.lock().unwrap().push((id, ctx.attempt()));
        match task {
            Task::Ok => Ok(()),
            Task::Fail => Err(JobError::retry_after(Duration::from_secs(3600), "scripted failure")),
            Task::FailUntil { succeed_at } if ctx.attempt() < succeed_at => {
                Err(JobError::retry_after(Duration::ZERO, "not yet"))
            }
            Task::FailUntil { .. } => Ok(()),
            Task::Discard => Err(JobError::discard("scripted discard")),
            Task::Snooze { ms } => Err(JobError::snooze(Duration::from_millis(ms))),
            Task::Panic => panic!("scripted panic"),
            Task::Sleep { ms } => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            }
            Task::Block => {
                // Records the attempt being stopped (its future dropped) before it was released.
                let mut guard = OnDrop { probe: self.0.clone(), id, armed: true };
                self.0.release.notified().await;
                guard.armed = false;
                Ok(())
            }
            Task::Tx | Task::BlockThenTx => {
                if matches!(task, Task::BlockThenTx) {
                    self.0.release.notified().await;
                }
                let mut tx = ctx.begin().await?;
                sqlx::query("insert into effects (job_id, attempt) values ($1, $2)")
                    .bind(id)
                    .bind(ctx.attempt() as i32)
                    .execute(&mut *tx)
                    .await?;
                let result = ctx.complete(tx).await;
                self.0.results.lock().unwrap().insert(id, format!("{result:?}"));
                result?;
                Ok(())
            }
        }
    }
}

struct OnDrop {
    probe: Arc<Probe>,
    id: i64,
    armed: bool,
}

impl Drop for OnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.probe.cancelled.lock().unwrap().push(self.id);
        }
    }
}

pub(crate) async fn state(pool: &PgPool, id: weir_jobs::JobId) -> String {
    sqlx::query_scalar("select state::text from weir.all_jobs where id = $1")
        .bind(id.0)
        .fetch_optional(pool)
        .await
        .unwrap()
        .unwrap_or_else(|| "missing".into())
}

pub(crate) async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

pub(crate) async fn enqueue(pool: &PgPool, job: weir_jobs::Job) -> weir_jobs::JobId {
    let mut conn = pool.acquire().await.unwrap();
    weir_jobs::enqueue(&mut conn, &job).await.unwrap().id
}

pub(crate) fn task(t: Task) -> weir_jobs::Job {
    weir_jobs::Job::new(&t).unwrap()
}
