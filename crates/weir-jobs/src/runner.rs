//! The runner: producers that claim, workers that run, a completer that writes outcomes.
//!
//! ```text
//!   listener (LISTEN weir_jobs, weir_job_cancel) ──wake──┐      ┌── poll timer (lost NOTIFYs)
//!                                                       ▼      ▼
//!   producer per queue: demand = concurrency − running (+ local queue room, if `prefetch`)
//!        │ claim: one statement, SKIP LOCKED — which also completes the runs that ended since
//!        │ the last claim (one commit for both); a freed slot refetches at once while there
//!        │ is a backlog
//!        ▼
//!   job task: worker.work(ctx, args) under timeout / cancel ─► outcome
//!        ▼
//!   completer: completions no claim picked up, batched into one fenced statement;
//!              retry / discard / snooze one by one
//!
//!   heartbeat: the process row (the heartbeat of all its running jobs)
//!   maintenance (elected leader only): activate due jobs, rescue, periodic jobs, retention
//! ```
//!
//! Invariants:
//! - A job runs in at most one task at a time: a claim moves it to `running` under a row lock,
//!   and only the rescue (after the heartbeat of its process stopped) or an explicit cancel
//!   takes it back; both raise nothing but make the old run's outcome fail the fence.
//! - Demand is remembered: a producer with free slots and no jobs fetches again on a wake-up,
//!   on its poll timer, and at once when a slot frees while the last claim was full.
//! - A successful run is written once: by the next claim of its producer when one follows at
//!   once (backlog), else by the completer; both use the same fenced statement.
//! - Stopping: producers stop claiming; running jobs get `grace` to finish; then they are
//!   cancelled and put back (available again, the attempt not counted); the completer flushes;
//!   the process deregisters and resigns leadership.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::job::JobId;
use crate::maintenance::{self, PeriodicJob};
use crate::metrics::{Metrics, MetricsSnapshot, QueueCounters};
use crate::store::{self, Claimed, Completions};
use crate::worker::{ErasedWorker, JobContext, JobErrorKind, Worker, Workers, chain};
use crate::{Error, Result};

/// Channel of the wake-ups; the payload is the queue.
pub const WAKE_CHANNEL: &str = "weir_jobs";
/// Channel of cancel requests for running jobs; the payload is the job id.
pub const CANCEL_CHANNEL: &str = "weir_job_cancel";
/// Channel of completion and discard events of jobs enqueued with `notify(true)`.
pub const EVENTS_CHANNEL: &str = "weir_job_events";

/// One queue this process works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// The queue name.
    pub name: String,
    /// Jobs of this queue running at once in this process.
    pub concurrency: u32,
}

impl QueueConfig {
    /// A queue with its concurrency.
    pub fn new(name: impl Into<String>, concurrency: u32) -> Self {
        Self { name: name.into(), concurrency }
    }
}

/// Default poll interval.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// Default time without heartbeat after which running jobs are rescued.
pub const DEFAULT_RESCUE_AFTER: Duration = Duration::from_secs(30);
/// Default maintenance interval.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// How a runner works. Plain data; [`Config::validate`] names the bad field.
#[derive(Debug, Clone)]
pub struct Config {
    /// The queues and their concurrency. Defaults to `default` with 10.
    pub queues: Vec<QueueConfig>,
    /// How often an idle producer claims even without a wake-up (covers lost notifications).
    /// Defaults to 1 s.
    pub poll_interval: Duration,
    /// How often the process heartbeats. Defaults to 2 s.
    pub heartbeat_interval: Duration,
    /// Running jobs of a process silent this long are rescued; at least 3 heartbeats.
    /// Defaults to 30 s.
    pub rescue_after: Duration,
    /// How often the leader activates due jobs and rescues. Defaults to 1 s.
    pub sweep_interval: Duration,
    /// Completed jobs are deleted from history after this long. Defaults to 1 day.
    pub completed_retention: Duration,
    /// Discarded and cancelled jobs are deleted from history after this long. Defaults to 7 days.
    pub discarded_retention: Duration,
    /// Keep completed jobs in history at all. Defaults to true.
    pub keep_completed: bool,
    /// LISTEN for wake-ups; turn off behind a transaction-mode pooler (the poll remains).
    /// Defaults to true.
    pub listen: bool,
    /// The timeout of an attempt when neither the job nor its worker sets one. Defaults to none.
    pub default_timeout: Option<Duration>,
    /// Most completions written by one statement. Defaults to 1000.
    pub completion_batch: usize,
    /// Whether this process takes part in the maintenance election. Defaults to true.
    pub maintenance: bool,
    /// Jobs a producer may claim beyond its free slots while its queue has a backlog, held in
    /// memory and started as slots free (a local queue, as graphile-worker's): fewer, larger
    /// claims for short jobs, at the price of jobs waiting here instead of in the table.
    /// 0 claims exactly the free slots. Defaults to 0.
    pub prefetch: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            queues: vec![QueueConfig::new(crate::job::DEFAULT_QUEUE, 10)],
            poll_interval: DEFAULT_POLL_INTERVAL,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            rescue_after: DEFAULT_RESCUE_AFTER,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            completed_retention: Duration::from_secs(86_400),
            discarded_retention: Duration::from_secs(7 * 86_400),
            keep_completed: true,
            listen: true,
            default_timeout: None,
            completion_batch: 1000,
            maintenance: true,
            prefetch: 0,
        }
    }
}

impl Config {
    /// Checks the configuration, naming the bad field.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &str, problem: String| Err(Error::Config { field: field.to_string(), problem });
        let mut names = std::collections::HashSet::new();
        for q in &self.queues {
            if q.name.is_empty() || q.name.chars().count() > 128 {
                return bad(
                    "queues.name",
                    format!("must be 1 to 128 characters, got {:?}", q.name),
                );
            }
            if !(1..=10_000).contains(&q.concurrency) {
                return bad(
                    "queues.concurrency",
                    format!("queue {:?}: must be 1 to 10000, got {}", q.name, q.concurrency),
                );
            }
            if !names.insert(&q.name) {
                return bad("queues", format!("queue {:?} is listed twice", q.name));
            }
        }
        for (field, d) in [
            ("poll_interval", self.poll_interval),
            ("heartbeat_interval", self.heartbeat_interval),
            ("sweep_interval", self.sweep_interval),
        ] {
            if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
                return bad(field, format!("must be 10 ms to 1 h, got {d:?}"));
            }
        }
        if self.rescue_after < self.heartbeat_interval * 3 {
            return bad(
                "rescue_after",
                format!(
                    "must be at least 3 heartbeat intervals ({:?}), got {:?}",
                    self.heartbeat_interval * 3,
                    self.rescue_after
                ),
            );
        }
        if let Some(t) = self.default_timeout
            && (t.is_zero() || t > crate::job::MAX_TIMEOUT)
        {
            return bad("default_timeout", format!("must be 1 ms to 24 h, got {t:?}"));
        }
        if self.prefetch > 10_000 {
            return bad("prefetch", format!("must be at most 10000, got {}", self.prefetch));
        }
        if !(1..=10_000).contains(&self.completion_batch) {
            return bad(
                "completion_batch",
                format!("must be 1 to 10000, got {}", self.completion_batch),
            );
        }
        Ok(())
    }
}

/// Builds and starts a runner.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> weir_jobs::Result<()> {
/// # struct Mailer;
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Mail;
/// # impl weir_jobs::JobArgs for Mail { const KIND: &'static str = "mail"; }
/// # impl weir_jobs::Worker for Mailer { type Args = Mail;
/// #   async fn work(&self, _: weir_jobs::JobContext, _: Mail) -> Result<(), weir_jobs::JobError> { Ok(()) } }
/// use weir_jobs::{Config, JobRunner, QueueConfig};
/// let config = Config { queues: vec![QueueConfig::new("default", 20)], ..Config::default() };
/// let running = JobRunner::new(pool, config).register(Mailer).start().await?;
/// // ...
/// running.stop(std::time::Duration::from_secs(10)).await?;
/// # Ok(()) }
/// ```
pub struct JobRunner {
    pool: PgPool,
    config: Config,
    workers: Workers,
    duplicates: Vec<String>,
    periodic: Vec<PeriodicJob>,
    process_id: Option<String>,
}

impl std::fmt::Debug for JobRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kinds: Vec<&String> = self.workers.keys().collect();
        kinds.sort();
        f.debug_struct("JobRunner")
            .field("config", &self.config)
            .field("kinds", &kinds)
            .field("periodic", &self.periodic)
            .finish()
    }
}

impl JobRunner {
    /// A runner on `pool` with `config` and no workers yet.
    pub fn new(pool: PgPool, config: Config) -> Self {
        Self {
            pool,
            config,
            workers: Workers::new(),
            duplicates: Vec::new(),
            periodic: Vec::new(),
            process_id: None,
        }
    }

    /// Registers the worker of `W::Args::KIND`.
    pub fn register<W: Worker>(mut self, worker: W) -> Self {
        let kind = <W::Args as crate::JobArgs>::KIND.to_string();
        if self.workers.insert(kind.clone(), Arc::new(worker) as Arc<dyn ErasedWorker>).is_some() {
            self.duplicates.push(kind);
        }
        self
    }

    /// Adds a periodic job (enqueued by the maintenance leader at each cron time).
    pub fn periodic(mut self, job: PeriodicJob) -> Self {
        self.periodic.push(job);
        self
    }

    /// Sets the process id recorded in `attempted_by` (default: `host:pid:random`).
    pub fn process_id(mut self, id: impl Into<String>) -> Self {
        self.process_id = Some(id.into());
        self
    }

    /// Validates, registers the process and starts every task.
    pub async fn start(self) -> Result<RunningJobs> {
        self.config.validate()?;
        if let Some(kind) = self.duplicates.first() {
            return Err(Error::Config {
                field: "workers".into(),
                problem: format!("two workers registered for kind {kind:?}"),
            });
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.periodic {
            p.job.validate()?;
            if !names.insert(p.name.as_str()) {
                return Err(Error::Config {
                    field: "periodic".into(),
                    problem: format!("periodic job {:?} is declared twice", p.name),
                });
            }
        }
        let process = self.process_id.unwrap_or_else(default_process_id);
        let mut kinds: Vec<String> = self.workers.keys().cloned().collect();
        kinds.sort();
        let served = serde_json::Value::Array(
            self.config
                .queues
                .iter()
                .map(|q| {
                    serde_json::json!({"queue": q.name, "kinds": kinds, "concurrency": q.concurrency})
                })
                .collect(),
        );
        {
            let mut conn = self.pool.acquire().await?;
            store::register_process(&mut conn, &process, &served).await?;
        }
        info!(process, queues = %served, "job runner starting");

        let shared = Arc::new(Shared {
            pool: self.pool.clone(),
            process: process.clone(),
            config: self.config.clone(),
            workers: self.workers,
            kinds,
            metrics: Metrics::new(self.config.queues.iter().map(|q| q.name.clone())),
            running: Mutex::new(HashMap::new()),
            hard: CancellationToken::new(),
        });
        let stop = CancellationToken::new();
        let wakes: HashMap<String, Arc<Notify>> =
            self.config.queues.iter().map(|q| (q.name.clone(), Arc::new(Notify::new()))).collect();
        let (done_tx, done_rx) = mpsc::unbounded_channel();

        let producers = TaskTracker::new();
        for q in &self.config.queues {
            let producer = Producer {
                shared: shared.clone(),
                queue: q.name.clone(),
                concurrency: q.concurrency as usize,
                wake: wakes[&q.name].clone(),
                stop: stop.clone(),
                done: done_tx.clone(),
            };
            producers.spawn(producer.run().instrument(info_span!("producer", queue = %q.name)));
        }
        producers.close();
        drop(done_tx);

        let services = TaskTracker::new();
        let completer = Completer { shared: shared.clone(), rx: done_rx };
        let completer = services.spawn(completer.run().instrument(info_span!("completer")));
        let heartbeat_stop = CancellationToken::new();
        services.spawn(
            heartbeat(shared.clone(), served, heartbeat_stop.clone())
                .instrument(info_span!("heartbeat")),
        );
        if self.config.listen {
            services.spawn(
                listen(shared.clone(), wakes.clone(), stop.clone())
                    .instrument(info_span!("listener")),
            );
        }
        if self.config.maintenance {
            services.spawn(
                maintenance::run(shared.clone(), self.periodic, stop.clone())
                    .instrument(info_span!("maintenance")),
            );
        }
        services.close();
        Ok(RunningJobs {
            shared,
            stop,
            heartbeat_stop,
            producers,
            services,
            completer: Some(completer),
            wakes,
        })
    }
}

fn default_process_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let tag = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &tag[..8])
}

/// What every task of a runner shares.
pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    pub(crate) process: String,
    pub(crate) config: Config,
    workers: Workers,
    kinds: Vec<String>,
    pub(crate) metrics: Metrics,
    /// Running jobs' cancel tokens, for cancel requests.
    running: Mutex<HashMap<i64, CancellationToken>>,
    /// Cancelled when running jobs must stop now.
    hard: CancellationToken,
}

/// A started runner. Dropping it stops everything at once; prefer [`RunningJobs::stop`].
#[derive(Debug)]
pub struct RunningJobs {
    shared: Arc<Shared>,
    stop: CancellationToken,
    heartbeat_stop: CancellationToken,
    producers: TaskTracker,
    services: TaskTracker,
    completer: Option<JoinHandle<()>>,
    wakes: HashMap<String, Arc<Notify>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("process", &self.process).finish_non_exhaustive()
    }
}

impl RunningJobs {
    /// This process's id (`attempted_by` of the jobs it runs).
    pub fn process_id(&self) -> &str {
        &self.shared.process
    }

    /// What this runner did so far.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.metrics.snapshot()
    }

    /// Makes the producers of every queue claim now (as a notification would).
    pub fn wake(&self) {
        for w in self.wakes.values() {
            w.notify_one();
        }
    }

    /// Stops: no more claims; running jobs get `grace` to finish, then are cancelled and put
    /// back; outcomes are flushed; the process deregisters. Idempotent in effect (consumes the
    /// handle).
    pub async fn stop(mut self, grace: Duration) -> Result<()> {
        self.stop.cancel();
        if tokio::time::timeout(grace, self.producers.wait()).await.is_err() {
            warn!(?grace, "jobs still running after the grace period; cancelling them");
            self.shared.hard.cancel();
            self.producers.wait().await;
        }
        if let Some(completer) = self.completer.take() {
            // The producers held the only senders: the completer drains and ends.
            let _ = completer.await;
        }
        self.heartbeat_stop.cancel();
        self.services.wait().await;
        let mut conn = self.shared.pool.acquire().await?;
        store::resign(&mut conn, &self.shared.process).await?;
        store::deregister_process(&mut conn, &self.shared.process).await?;
        info!(process = %self.shared.process, "job runner stopped");
        Ok(())
    }
}

impl Drop for RunningJobs {
    fn drop(&mut self) {
        if self.completer.is_some() {
            self.stop.cancel();
            self.shared.hard.cancel();
            self.heartbeat_stop.cancel();
        }
    }
}

/// How a run ended, as the completer records it.
#[derive(Debug)]
enum Outcome {
    Completed,
    /// Completed by the worker in its own transaction.
    CompletedInTx,
    Failed {
        error: String,
        retry_in: Duration,
    },
    Discard(String),
    Snooze(Duration),
    /// Stopped by our own hard stop: put back without counting the attempt.
    Interrupted,
    /// Cancelled by request: the row already left.
    Cancelled,
    /// Prefetched but never started (the runner stopped): put back as it was.
    Unstarted,
}

#[derive(Debug)]
struct Finished {
    id: i64,
    attempt: i32,
    max_attempts: i32,
    queue: String,
    outcome: Outcome,
}

struct Producer {
    shared: Arc<Shared>,
    queue: String,
    concurrency: usize,
    wake: Arc<Notify>,
    stop: CancellationToken,
    done: mpsc::UnboundedSender<Finished>,
}

impl Producer {
    async fn run(self) {
        let counters = self.shared.metrics.queue(&self.queue).expect("queue has counters");
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let mut runs: HashMap<tokio::task::Id, Claimed> = HashMap::new();
        // Successful runs not yet written: they ride along with the next claim, or go to the
        // completer when no claim follows at once.
        let mut done = Completions::default();
        let mut poll = tokio::time::interval(self.shared.config.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut want = true;
        let mut backlog = false;
        // Prefetched jobs waiting for a slot (only with `prefetch`).
        let mut buffer: std::collections::VecDeque<(Claimed, CancellationToken)> =
            std::collections::VecDeque::new();
        let prefetch = self.shared.config.prefetch as usize;
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            while tasks.len() < self.concurrency
                && let Some((job, cancel)) = buffer.pop_front()
            {
                let handle = tasks.spawn(self.run_job(job.clone(), cancel));
                runs.insert(handle.id(), job);
            }
            let free = self.concurrency - tasks.len();
            // Demand: the free slots; with a local queue and a backlog, also refill the local
            // queue once it is half empty (not at every freed slot: claims stay large).
            let room = if backlog && prefetch > 0 && buffer.len() <= prefetch / 2 {
                free + prefetch - buffer.len()
            } else {
                free
            };
            if want && room > 0 && !self.shared.kinds.is_empty() {
                want = false;
                let riding = std::mem::take(&mut done);
                match self.claim(room, &riding).await {
                    Ok((jobs, completed)) => {
                        self.count_completions(&riding, &completed, counters);
                        // A full claim means more may be waiting: refill as soon as a slot frees.
                        backlog = jobs.len() == room;
                        QueueCounters::add(&counters.claims, 1);
                        QueueCounters::add(&counters.claimed, jobs.len() as u64);
                        QueueCounters::add(&counters.running, jobs.len() as u64);
                        for job in jobs {
                            counters
                                .wait
                                .lock()
                                .expect("histogram lock")
                                .record(Duration::from_micros(job.wait_us.max(0) as u64));
                            // Registered at once, so a cancel reaches a job still in the local queue.
                            let cancel = self.shared.hard.child_token();
                            self.shared
                                .running
                                .lock()
                                .expect("running lock")
                                .insert(job.id, cancel.clone());
                            if tasks.len() < self.concurrency {
                                let handle = tasks.spawn(self.run_job(job.clone(), cancel));
                                runs.insert(handle.id(), job);
                            } else {
                                buffer.push_back((job, cancel));
                            }
                        }
                        if backlog && prefetch > 0 {
                            // Keep the local queue topped up while the slots work.
                            want = true;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "claim failed; retrying after the poll interval");
                        backlog = false;
                        done = riding;
                    }
                }
            }
            if !done.ids.is_empty() {
                self.hand_over(&mut done);
            }
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                Some(res) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    self.finished(res, &mut runs, &mut done, counters);
                    // Let runs that are about to end do so, then collect every run that ended,
                    // so that one claim refills all their slots.
                    tokio::task::yield_now().await;
                    while let Some(res) = tasks.try_join_next_with_id() {
                        self.finished(res, &mut runs, &mut done, counters);
                    }
                    if backlog {
                        want = true;
                    }
                }
                _ = self.wake.notified() => want = true,
                _ = poll.tick() => want = true,
            }
        }
        for (job, _) in buffer {
            self.shared.running.lock().expect("running lock").remove(&job.id);
            counters.running.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            let _ = self.done.send(Finished {
                id: job.id,
                attempt: job.attempt,
                max_attempts: job.max_attempts,
                queue: job.queue,
                outcome: Outcome::Unstarted,
            });
        }
        while let Some(res) = tasks.join_next_with_id().await {
            self.finished(res, &mut runs, &mut done, counters);
        }
        self.hand_over(&mut done);
    }

    async fn claim(
        &self,
        free: usize,
        done: &Completions,
    ) -> sqlx::Result<(Vec<Claimed>, Vec<i64>)> {
        let mut conn = self.shared.pool.acquire().await?;
        store::claim(
            &mut conn,
            &self.queue,
            &self.shared.kinds,
            free as i64,
            &self.shared.process,
            done,
            self.shared.config.keep_completed,
        )
        .await
    }

    fn count_completions(&self, riding: &Completions, completed: &[i64], c: &QueueCounters) {
        QueueCounters::add(&c.completed, completed.len() as u64);
        if completed.len() < riding.ids.len() {
            let completed: std::collections::HashSet<&i64> = completed.iter().collect();
            for (id, attempt) in riding.ids.iter().zip(&riding.attempts) {
                if !completed.contains(id) {
                    QueueCounters::add(&c.fenced, 1);
                    warn!(id, attempt, "completion rejected: the job was rescued or cancelled");
                }
            }
        }
    }

    /// Sends unwritten completions to the completer.
    fn hand_over(&self, done: &mut Completions) {
        for (id, attempt) in done.ids.drain(..).zip(done.attempts.drain(..)) {
            let _ = self.done.send(Finished {
                id,
                attempt,
                max_attempts: 0,
                queue: self.queue.clone(),
                outcome: Outcome::Completed,
            });
        }
    }

    fn run_job(
        &self,
        job: Claimed,
        cancel: CancellationToken,
    ) -> impl std::future::Future<Output = Outcome> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            let worker = shared.workers[&job.kind].clone();
            let ctx = JobContext::new(
                JobId(job.id),
                job.queue.clone(),
                job.kind.clone(),
                job.attempt as u32,
                job.max_attempts as u32,
                shared.pool.clone(),
                cancel.clone(),
                shared.config.keep_completed,
            );
            let timeout = job
                .timeout_ms
                .map(|ms| Duration::from_millis(ms as u64))
                .or_else(|| worker.timeout())
                .or(shared.config.default_timeout);
            let work = worker.run(ctx.clone(), job.args);
            let result = tokio::select! {
                biased;
                _ = cancel.cancelled() => None,
                r = async {
                    match timeout {
                        Some(t) => tokio::time::timeout(t, work).await.map_err(|_| t),
                        None => Ok(work.await),
                    }
                } => Some(r),
            };
            shared.running.lock().expect("running lock").remove(&job.id);
            if ctx.completed() {
                return Outcome::CompletedInTx;
            }
            let attempt = job.attempt as u32;
            match result {
                None if shared.hard.is_cancelled() => Outcome::Interrupted,
                None => Outcome::Cancelled,
                Some(Err(t)) => {
                    cancel.cancel();
                    Outcome::Failed {
                        error: format!("timed out after {t:?}"),
                        retry_in: worker.backoff(attempt),
                    }
                }
                Some(Ok(Ok(()))) => Outcome::Completed,
                Some(Ok(Err(e))) => match e.kind {
                    JobErrorKind::Retry { error, after } => Outcome::Failed {
                        error: chain(error.as_ref()),
                        retry_in: after.unwrap_or_else(|| worker.backoff(attempt)),
                    },
                    JobErrorKind::Discard(error) => Outcome::Discard(chain(error.as_ref())),
                    JobErrorKind::Snooze(d) => Outcome::Snooze(d),
                },
            }
        }
    }

    fn finished(
        &self,
        res: std::result::Result<(tokio::task::Id, Outcome), tokio::task::JoinError>,
        runs: &mut HashMap<tokio::task::Id, Claimed>,
        done: &mut Completions,
        counters: &QueueCounters,
    ) {
        let (task, outcome) = match res {
            Ok((task, outcome)) => (task, outcome),
            Err(e) => {
                let task = e.id();
                let outcome = if e.is_panic() {
                    let panic = e.into_panic();
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic".into());
                    let attempt = runs.get(&task).map_or(1, |j| j.attempt as u32);
                    let backoff = runs
                        .get(&task)
                        .and_then(|j| self.shared.workers.get(&j.kind))
                        .map_or(Duration::from_secs(1), |w| w.backoff(attempt));
                    Outcome::Failed { error: format!("worker panicked: {msg}"), retry_in: backoff }
                } else {
                    Outcome::Interrupted
                };
                (task, outcome)
            }
        };
        counters.running.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let Some(job) = runs.remove(&task) else { return };
        if matches!(outcome, Outcome::Interrupted | Outcome::Cancelled | Outcome::Failed { .. })
            && let Some(t) = self.shared.running.lock().expect("running lock").remove(&job.id)
        {
            t.cancel();
        }
        if matches!(outcome, Outcome::Completed) {
            done.ids.push(job.id);
            done.attempts.push(job.attempt);
            return;
        }
        let _ = self.done.send(Finished {
            id: job.id,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            queue: job.queue,
            outcome,
        });
    }
}

/// Writes outcomes: completions in batches, the rest one by one.
struct Completer {
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Finished>,
}

impl Completer {
    async fn run(mut self) {
        let max = self.shared.config.completion_batch;
        let mut batch = Vec::with_capacity(max);
        while self.rx.recv_many(&mut batch, max).await > 0 {
            let mut tries = 0u32;
            loop {
                match self.write(&batch).await {
                    Ok(()) => break,
                    Err(e) if tries < 10 => {
                        tries += 1;
                        let wait = Duration::from_millis(100 * 2u64.pow(tries.min(5)));
                        warn!(error = %e, ?wait, "writing job outcomes failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => {
                        // The jobs stay `running`; they are rescued once our heartbeat stops.
                        warn!(error = %e, jobs = batch.len(), "giving up writing job outcomes");
                        break;
                    }
                }
            }
            batch.clear();
        }
    }

    async fn write(&self, batch: &[Finished]) -> sqlx::Result<()> {
        let mut conn = self.shared.pool.acquire().await?;
        let metrics = &self.shared.metrics;
        let counters = |q: &str| metrics.queue(q).expect("queue has counters");
        let done: Vec<&Finished> =
            batch.iter().filter(|f| matches!(f.outcome, Outcome::Completed)).collect();
        if !done.is_empty() {
            let ids: Vec<i64> = done.iter().map(|f| f.id).collect();
            let attempts: Vec<i32> = done.iter().map(|f| f.attempt).collect();
            let completed =
                store::complete(&mut conn, &ids, &attempts, self.shared.config.keep_completed)
                    .await?;
            QueueCounters::add(&counters(&done[0].queue).completion_writes, 1);
            for f in &done {
                if completed.contains(&f.id) {
                    QueueCounters::add(&counters(&f.queue).completed, 1);
                } else {
                    self.fenced(f);
                }
            }
        }
        for f in batch {
            let c = counters(&f.queue);
            let now = Utc::now();
            let ok = match &f.outcome {
                Outcome::Completed => continue,
                Outcome::CompletedInTx => {
                    QueueCounters::add(&c.completed, 1);
                    continue;
                }
                Outcome::Cancelled => {
                    debug!(id = f.id, "job cancelled while running");
                    continue;
                }
                Outcome::Failed { error, .. } if f.attempt >= f.max_attempts => {
                    QueueCounters::add(&c.discarded, 1);
                    store::discard(&mut conn, f.id, f.attempt, error).await?
                }
                Outcome::Failed { error, retry_in } => {
                    QueueCounters::add(&c.retried, 1);
                    debug!(id = f.id, attempt = f.attempt, error, "job attempt failed");
                    store::retry(
                        &mut conn,
                        f.id,
                        f.attempt,
                        error,
                        now + chrono_duration(*retry_in),
                    )
                    .await?
                }
                Outcome::Discard(error) => {
                    QueueCounters::add(&c.discarded, 1);
                    store::discard(&mut conn, f.id, f.attempt, error).await?
                }
                Outcome::Snooze(d) => {
                    QueueCounters::add(&c.snoozed, 1);
                    store::put_back(&mut conn, f.id, f.attempt, now + chrono_duration(*d), None)
                        .await?
                }
                Outcome::Unstarted => {
                    store::put_back(&mut conn, f.id, f.attempt, now, None).await?
                }
                Outcome::Interrupted => {
                    store::put_back(
                        &mut conn,
                        f.id,
                        f.attempt,
                        now,
                        Some("interrupted: runner stopped"),
                    )
                    .await?
                }
            };
            if !ok {
                self.fenced(f);
            }
        }
        Ok(())
    }

    fn fenced(&self, f: &Finished) {
        let c = self.shared.metrics.queue(&f.queue).expect("queue has counters");
        QueueCounters::add(&c.fenced, 1);
        warn!(
            id = f.id,
            attempt = f.attempt,
            "outcome rejected: the job was rescued, cancelled or finished by a newer attempt"
        );
    }
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(365 * 100))
}

/// Heartbeats the process until `stop`; registers again if the row was pruned.
async fn heartbeat(shared: Arc<Shared>, served: serde_json::Value, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let beat = async {
            let mut conn = shared.pool.acquire().await?;
            if !store::heartbeat(&mut conn, &shared.process).await? {
                warn!(process = %shared.process, "process row was gone; registering again");
                store::register_process(&mut conn, &shared.process, &served).await?;
            }
            Ok::<(), sqlx::Error>(())
        };
        if let Err(e) = beat.await {
            warn!(error = %e, "heartbeat failed");
        }
    }
}

/// LISTENs for wake-ups and cancel requests; after any reconnect, wakes every producer since
/// notifications may have been lost meanwhile.
async fn listen(shared: Arc<Shared>, wakes: HashMap<String, Arc<Notify>>, stop: CancellationToken) {
    let wake_all = || wakes.values().for_each(|w| w.notify_one());
    'connect: loop {
        let mut listener = match PgListener::connect_with(&shared.pool).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "LISTEN connection failed; polling meanwhile");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'connect,
                }
            }
        };
        if let Err(e) = listener.listen_all([WAKE_CHANNEL, CANCEL_CHANNEL]).await {
            warn!(error = %e, "LISTEN failed; polling meanwhile");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'connect,
            }
        }
        wake_all();
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) if n.channel() == WAKE_CHANNEL => {
                    if let Some(w) = wakes.get(n.payload()) {
                        w.notify_one();
                    }
                }
                Ok(Some(n)) => {
                    if let Ok(id) = n.payload().parse::<i64>()
                        && let Some(t) = shared.running.lock().expect("running lock").get(&id)
                    {
                        info!(id, "cancel requested for a running job");
                        t.cancel();
                    }
                }
                Ok(None) => {
                    // The connection was lost and will be re-established by the next call:
                    // anything sent meanwhile is gone, so claim now.
                    warn!("LISTEN connection lost; reconnecting");
                    wake_all();
                }
                Err(e) => {
                    warn!(error = %e, "LISTEN failed; reconnecting");
                    continue 'connect;
                }
            }
        }
    }
}
