//! The runner: builds a process's job tasks, starts them and stops them in order.
//!
//! ```text
//!   listener (LISTEN weir_jobs, weir_job_cancel) ──wake──┐      ┌── poll timer (lost NOTIFYs)
//!                                                       ▼      ▼
//!   producer per queue (producer.rs): claim up to the free slots ─► job tasks ─► outcomes
//!        │ successful runs ride along with the next claim, or:
//!        ▼
//!   completer (completer.rs): batched, fenced writes of the outcomes
//!
//!   heartbeat (heartbeat.rs): the process row, the heartbeat of all its running jobs
//!   maintenance (maintenance/, elected leader only): activate due jobs, rescue, periodic
//!   jobs, history retention
//! ```
//!
//! Every task holds an `Arc<Shared>` (shared.rs); the runner owns the tasks and their stop
//! tokens.
//!
//! Invariants:
//! - A job runs in at most one task at a time: a claim moves it to `running` under a row lock,
//!   and only the rescue (after the heartbeat of its process stopped) or an explicit cancel
//!   takes it back; both raise nothing but make the old run's outcome fail the fence.
//! - Stopping, in this order: producers stop claiming; running jobs get `grace` to finish;
//!   then they are cancelled and put back (available again, the attempt not counted); the
//!   completer flushes; the heartbeat, listener and maintenance end; the process resigns
//!   leadership and deregisters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};
use weir_core::ProcessId;

use crate::completer::Completer;
use crate::maintenance::{self, PeriodicJob};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::producer::Producer;
use crate::shared::Shared;
use crate::worker::{ErasedWorker, Worker, Workers};
use crate::{Config, Error, Result, heartbeat, store};

/// Builds and starts a runner on its own. In an application, prefer registering workers on
/// the `weir` facade (`Weir::builder(config).worker(..)`), which runs this with `[jobs]`.
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
    declared: Vec<weir_core::WorkerConfig>,
    periodic: Vec<PeriodicJob>,
    process_id: Option<ProcessId>,
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
            declared: Vec::new(),
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

    /// Adds a worker declared in `weir.toml` (`[[workers]]`: `sql`, `http` or `command`). It is
    /// built when the runner starts, which refuses an entry that cannot work (a statement that
    /// does not prepare, a program that is not there), naming the entry and its line.
    pub fn declare(mut self, entry: weir_core::WorkerConfig) -> Self {
        self.declared.push(entry);
        self
    }

    /// Adds a periodic job (enqueued by the maintenance leader at each cron time).
    pub fn periodic(mut self, job: PeriodicJob) -> Self {
        self.periodic.push(job);
        self
    }

    /// Sets the process identity recorded in `attempted_by` and the heartbeat row (default:
    /// [`ProcessId::generate`]). The `weir` facade passes the one identity of the process.
    pub fn process_id(mut self, id: ProcessId) -> Self {
        self.process_id = Some(id);
        self
    }

    /// Validates, registers the process and starts every task.
    pub async fn start(self) -> Result<RunningJobs> {
        self.config.validate()?;
        if let Some(kind) = self.duplicates.first() {
            return Err(Error::Registration(format!("two workers registered for kind {kind:?}")));
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.periodic {
            p.job.validate()?;
            if !names.insert(p.name.as_str()) {
                return Err(Error::Registration(format!(
                    "periodic job {:?} is declared twice",
                    p.name
                )));
            }
        }
        let process = self.process_id.unwrap_or_else(ProcessId::generate);
        let mut workers = self.workers;
        // Rust workers run on every queue; a declared worker on its own queue, with slots of
        // its own when it sets `concurrency`.
        let mut rust_kinds: Vec<String> = workers.keys().cloned().collect();
        rust_kinds.sort();
        let mut lanes: Vec<(String, Vec<String>, u32)> = self
            .config
            .queues
            .iter()
            .map(|q| (q.name.clone(), rust_kinds.clone(), q.concurrency))
            .collect();
        for entry in &self.declared {
            if workers.contains_key(&entry.kind) {
                return Err(crate::declared::refused(
                    entry,
                    format!("kind {:?} already has a worker; one worker per kind", entry.kind),
                ));
            }
            if !self.config.queues.iter().any(|q| q.name == entry.queue) {
                return Err(crate::declared::refused(
                    entry,
                    format!("queue {:?} is not in [jobs.queues]", entry.queue),
                ));
            }
            let worker = crate::declared::build(entry, &self.config, &self.pool).await?;
            workers.insert(entry.kind.clone(), worker);
            match entry.concurrency {
                Some(c) => lanes.push((entry.queue.clone(), vec![entry.kind.clone()], c)),
                None => {
                    let lane = lanes.iter_mut().find(|l| l.0 == entry.queue).expect("queue lane");
                    lane.1.push(entry.kind.clone());
                    lane.1.sort();
                }
            }
        }
        // What `weir jobs workers` shows: each lane with the type of its declared kinds
        // (kinds without one are Rust workers).
        let types: serde_json::Map<String, serde_json::Value> =
            self.declared.iter().map(|e| (e.kind.clone(), e.worker_type.as_str().into())).collect();
        let served = serde_json::Value::Array(
            lanes
                .iter()
                .filter(|(_, kinds, _)| !kinds.is_empty())
                .map(|(queue, kinds, concurrency)| {
                    let types: serde_json::Map<String, serde_json::Value> = kinds
                        .iter()
                        .filter_map(|k| types.get(k).map(|t| (k.clone(), t.clone())))
                        .collect();
                    serde_json::json!({
                        "queue": queue, "kinds": kinds, "concurrency": concurrency, "types": types,
                    })
                })
                .collect(),
        );
        {
            let mut conn = self.pool.acquire().await?;
            store::register_process(&mut conn, process.as_str(), &served).await?;
        }
        info!(%process, queues = %served, "job runner starting");

        let shared = Arc::new(Shared {
            pool: self.pool.clone(),
            process,
            config: self.config.clone(),
            workers,
            metrics: Metrics::new(self.config.queues.iter().map(|q| q.name.clone())),
            running: Mutex::new(HashMap::new()),
            hard: CancellationToken::new(),
        });
        let stop = CancellationToken::new();
        // One wake-up per producer; a queue's notification wakes all of its producers.
        let mut wakes: HashMap<String, Vec<Arc<Notify>>> = HashMap::new();
        let (done_tx, done_rx) = mpsc::unbounded_channel();

        let producers = TaskTracker::new();
        for (queue, kinds, concurrency) in lanes {
            let producer = Producer {
                shared: shared.clone(),
                queue: queue.clone(),
                kinds,
                concurrency: concurrency as usize,
                wake: {
                    let wake = Arc::new(Notify::new());
                    wakes.entry(queue.clone()).or_default().push(wake.clone());
                    wake
                },
                stop: stop.clone(),
                done: done_tx.clone(),
            };
            producers.spawn(producer.run().instrument(info_span!("producer", %queue)));
        }
        producers.close();
        drop(done_tx);

        let services = TaskTracker::new();
        let completer = Completer { shared: shared.clone(), rx: done_rx };
        let completer = services.spawn(completer.run().instrument(info_span!("completer")));
        let heartbeat_stop = CancellationToken::new();
        services.spawn(
            heartbeat::heartbeat(shared.clone(), served, heartbeat_stop.clone())
                .instrument(info_span!("heartbeat")),
        );
        if self.config.listen {
            services.spawn(
                heartbeat::listen(shared.clone(), wakes.clone(), stop.clone())
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

/// A started runner. Dropping it stops everything at once; prefer [`RunningJobs::stop`].
#[derive(Debug)]
pub struct RunningJobs {
    shared: Arc<Shared>,
    stop: CancellationToken,
    heartbeat_stop: CancellationToken,
    producers: TaskTracker,
    services: TaskTracker,
    completer: Option<JoinHandle<()>>,
    wakes: HashMap<String, Vec<Arc<Notify>>>,
}

impl RunningJobs {
    /// This process's id (`attempted_by` of the jobs it runs).
    pub fn process_id(&self) -> &str {
        self.shared.process.as_str()
    }

    /// What this runner did so far.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.metrics.snapshot()
    }

    /// Makes the producers of every queue claim now (as a notification would).
    pub fn wake(&self) {
        for w in self.wakes.values().flatten() {
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
        store::resign(&mut conn, self.shared.process.as_str()).await?;
        store::deregister_process(&mut conn, self.shared.process.as_str()).await?;
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
