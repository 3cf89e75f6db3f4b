//! The library facade: `Weir::builder(config).operator(...).worker(...).start()` runs
//! ingestion, the consumer engine (with the declarative operators of the configuration and the
//! Rust operators added here) and, when workers are registered, the job runner (`[jobs]`) in
//! this process, until `stop()`.
//!
//! ```text
//! start: connect ─► check (schema migrated; publication and slot must exist) ─► prepare SQL
//!        operators (fail fast) ─► every routed column carried by its table's replica
//!        identity (replica_identity.rs; else refused, naming the fix)
//!        ─► ingest task (leader or standby) + consumer engine (lanes shared with other
//!           processes) + retention (one process at a time)
//!        ─► with workers: migrate the job tables, start the job runner (one ProcessId)
//! stop:  cancel ─► engine lanes finish their current event ─► ingestion stores what it
//!        received and acknowledges it ─► both joined
//!        ─► job runner: no more claims; running jobs get JOBS_GRACE (10 s) to finish, then
//!           are put back; outcomes flushed; the process deregisters ─► errors returned
//! ```

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_consumer::{ConsumerSpec, Engine, ErrorReporter, Operator, SqlOperator, TracingReporter};
use weir_core::{Config, PeriodicConfig, ProcessId};
use weir_jobs::{Job, JobRunner, PeriodicJob, RunningJobs, Worker};
use weir_streams::{Handler, Sink, SubscriptionCatalog, SubscriptionDef};

use crate::{Error, Result, db};

/// How long running jobs get to finish at stop before they are cancelled and put back.
pub(crate) const JOBS_GRACE: Duration = Duration::from_secs(10);

/// A worker registration, applied to the job runner once the pool is known.
type Register = Box<dyn FnOnce(JobRunner) -> JobRunner + Send>;

/// Builds a running weir.
pub struct WeirBuilder {
    config: Config,
    pool: Option<PgPool>,
    consumers: Vec<ConsumerSpec>,
    reporter: Arc<dyn ErrorReporter>,
    ingest: bool,
    workers: Vec<Register>,
    periodic: Vec<PeriodicJob>,
    subscriptions: Vec<SubscriptionDef>,
    catalog: SubscriptionCatalog,
}

impl std::fmt::Debug for WeirBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeirBuilder")
            .field("consumers", &self.consumers)
            .field("workers", &self.workers.len())
            .field("periodic", &self.periodic)
            .finish()
    }
}

/// Entry point of the library.
#[derive(Debug)]
pub struct Weir;

impl Weir {
    /// Starts building from a configuration.
    pub fn builder(config: Config) -> WeirBuilder {
        WeirBuilder {
            pool: None,
            consumers: Vec::new(),
            reporter: Arc::new(TracingReporter),
            ingest: true,
            workers: Vec::new(),
            periodic: Vec::new(),
            subscriptions: Vec::new(),
            catalog: SubscriptionCatalog::new(config.consumers.clone()).sinks(true),
            config,
        }
    }
}

impl WeirBuilder {
    /// Uses this pool instead of connecting from the configuration.
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Adds a Rust operator with the `[consumers]` defaults.
    pub fn operator(mut self, name: impl Into<String>, operator: impl Operator) -> Self {
        let spec = ConsumerSpec::new(name, Arc::new(operator), &self.config.consumers);
        self.consumers.push(spec);
        self
    }

    /// Adds a consumer with its own ordering, lanes, retry and failure policy.
    pub fn consumer(mut self, spec: ConsumerSpec) -> Self {
        self.consumers.push(spec);
        self
    }

    /// Adds a subscription delivered to `handler` in this process (and in every process that
    /// registers a handler under its name: the emitters are shared among them). `start`
    /// creates it, or brings the stored one to `def` (a changed pool size re-splits).
    pub fn subscription(mut self, mut def: SubscriptionDef, handler: impl Handler) -> Self {
        def.sink = Sink::Rust;
        self.catalog = self.catalog.handler(def.name.clone(), handler);
        self.subscriptions.push(def);
        self
    }

    /// Receives every retry and final failure (default: logs through tracing).
    pub fn error_reporter(mut self, reporter: impl ErrorReporter) -> Self {
        self.reporter = Arc::new(reporter);
        self
    }

    /// Registers the job worker of `W::Args::KIND`. With at least one worker, `start` migrates
    /// the job tables and runs the job runner with `[jobs]` (its queues and concurrency).
    pub fn worker<W: Worker>(mut self, worker: W) -> Self {
        self.workers.push(Box::new(move |runner: JobRunner| runner.register(worker)));
        self
    }

    /// Adds a periodic job, enqueued by the job runner's maintenance leader at each cron time
    /// (it runs only with at least one worker registered).
    pub fn periodic(mut self, job: PeriodicJob) -> Self {
        self.periodic.push(job);
        self
    }

    /// Whether this process delivers webhook and NATS subscriptions (default: yes; every
    /// process that does shares their emitters, and one without a sink's secrets in its
    /// environment leaves that sink to the others).
    pub fn deliver_sinks(mut self, deliver: bool) -> Self {
        self.catalog = self.catalog.sinks(deliver);
        self
    }

    /// Runs only the consumers, not the ingestion (another process ingests).
    pub fn without_ingestion(mut self) -> Self {
        self.ingest = false;
        self
    }

    /// Checks the database (never creating the slot or publication: that is `weir init`),
    /// validates every operator, and starts.
    pub async fn start(self) -> Result<Running> {
        let config = self.config;
        // `[[periodic]]` entries whose cron or time zone does not parse stop the start here,
        // before anything connects, naming the entry and its line.
        let mut periodic =
            config.periodic.iter().map(periodic_from_config).collect::<Result<Vec<_>>>()?;
        periodic.extend(self.periodic);
        let pool = match self.pool {
            Some(p) => p,
            None => db::connect(&config).await?,
        };
        if self.ingest {
            crate::setup::check(&pool, &config).await?;
        } else {
            weir_log::migrate(&pool).await?;
        }
        let mut consumers = self.consumers;
        for op in &config.operators {
            let prepared = SqlOperator::prepare(&pool, op).await?;
            if op.backfill && self.ingest {
                crate::backfill::for_new_operator(&pool, &config, op).await?;
            }
            let mut spec =
                ConsumerSpec::new(op.name.clone(), Arc::new(prepared), &config.consumers);
            spec.ordering = op.ordering.unwrap_or(spec.ordering);
            spec.lanes = op.lanes.unwrap_or(spec.lanes);
            spec.retry = op.retry.unwrap_or(spec.retry);
            spec.on_exhausted = op.on_exhausted.unwrap_or(spec.on_exhausted);
            consumers.push(spec);
        }
        // Subscriptions: `[[subscriptions]]` and the Rust ones, each refused here if wrong.
        weir_streams::migrate(&pool).await?;
        let mut subscriptions = Vec::new();
        for c in &config.subscriptions {
            let def = SubscriptionDef::from_config(c)?;
            // A sink this process cannot deliver (its secret not in the environment) is known
            // now, not at the first event.
            def.sink.check_environment().map_err(|e| {
                weir_streams::Error::InvalidSubscription(format!("subscription `{}`: {e}", c.name))
            })?;
            subscriptions.push(def);
        }
        subscriptions.extend(self.subscriptions);
        // An operator or subscription routing a table by a column its replica identity leaves
        // out of deleted rows would halt at the first delete: refused now.
        let mut routed: Vec<_> =
            consumers.iter().flat_map(crate::replica_identity::spec_columns).collect();
        routed.extend(subscriptions.iter().flat_map(crate::replica_identity::subscription_columns));
        let needs = crate::replica_identity::needs(&pool, &config, &routed).await?;
        if !needs.is_empty() {
            return Err(Error::ReplicaIdentity(needs));
        }
        for def in &subscriptions {
            weir_streams::subscriptions::ensure(&pool, def).await?;
        }
        // One name for this process in every table that records a holder.
        let identity = ProcessId::generate();
        let cancel = CancellationToken::new();
        let (wake, _listener) = weir_log::listen_for_appends(pool.clone(), cancel.clone());
        // Always: subscriptions may be created at any time, and any engine completes re-splits.
        let engine = Some(
            Engine::start_with_catalog(
                pool.clone(),
                consumers,
                Some(Arc::new(self.catalog)),
                wake.clone(),
                self.reporter,
                &identity,
                cancel.clone(),
            )
            .await?,
        );
        let ingest = self.ingest.then(|| {
            let (config, pool, cancel) = (config.clone(), pool.clone(), cancel.clone());
            let (identity, readers) = (identity.clone(), Some(wake.clone()));
            tokio::spawn(async move {
                crate::ingest::run_waking(&config, &pool, &identity, readers, cancel).await
            })
        });
        let retention =
            tokio::spawn(crate::retention::run(pool.clone(), config.clone(), cancel.clone()));
        let started = start_jobs(&pool, &config, self.workers, periodic, identity).await;
        let running = Running { cancel, pool, wake, ingest, engine, retention, jobs: None };
        match started {
            Ok(jobs) => Ok(Running { jobs, ..running }),
            Err(e) => {
                // Nothing may outlive a failed start: stop and join what already runs (the
                // ingest task may hold the slot's lease) before answering.
                if let Err(stopped) = running.stop().await {
                    tracing::warn!(error = %stopped, "stopping after a failed start");
                }
                Err(e)
            }
        }
    }
}

/// Migrates the job tables and starts the runner, when there are workers.
async fn start_jobs(
    pool: &PgPool,
    config: &Config,
    workers: Vec<Register>,
    periodic: Vec<PeriodicJob>,
    process: ProcessId,
) -> Result<Option<RunningJobs>> {
    if workers.is_empty() && config.workers.is_empty() && periodic.is_empty() {
        return Ok(None);
    }
    weir_jobs::migrate(pool).await?;
    let mut runner = JobRunner::new(pool.clone(), config.jobs.clone()).process_id(process);
    for register in workers {
        runner = register(runner);
    }
    for entry in &config.workers {
        runner = runner.declare(entry.clone());
    }
    for job in periodic {
        runner = runner.periodic(job);
    }
    Ok(Some(runner.start().await?))
}

/// A `[[periodic]]` entry as the job runner's periodic job: its kind, args, queue and attempts,
/// its cron expression read in its time zone (UTC by default).
fn periodic_from_config(entry: &PeriodicConfig) -> Result<PeriodicJob> {
    let mut job = Job::raw(&entry.kind, entry.args.clone()).queue(&entry.queue);
    if let Some(n) = entry.max_attempts {
        job = job.max_attempts(n);
    }
    let named = |source| Error::Periodic { entry: entry.entry(), source };
    let periodic = PeriodicJob::new(entry.name(), &entry.cron, job).map_err(named)?;
    match &entry.timezone {
        Some(tz) => periodic.timezone(tz).map_err(named),
        None => Ok(periodic),
    }
}

/// A running weir.
#[derive(Debug)]
pub struct Running {
    cancel: CancellationToken,
    pool: PgPool,
    wake: weir_log::Wake,
    ingest: Option<JoinHandle<Result<()>>>,
    engine: Option<Engine>,
    retention: JoinHandle<()>,
    jobs: Option<RunningJobs>,
}

impl Running {
    /// The pool weir uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Wakes on every append to the log (from any process: `NOTIFY weir_events`).
    pub fn wake(&self) -> weir_log::Wake {
        self.wake.clone()
    }

    /// The job runner, when workers are registered (its process id, its figures).
    pub fn jobs(&self) -> Option<&RunningJobs> {
        self.jobs.as_ref()
    }

    /// A token that stops everything when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops gracefully and waits; returns the first error any part ended with.
    pub async fn stop(self) -> Result<()> {
        self.cancel.cancel();
        self.wait().await
    }

    /// Waits until every part ends: ingestion ends by itself only on an error it cannot
    /// recover from (a dropped slot, a missing publication), which then stops the rest. The
    /// job runner stops after the engine, giving running jobs `JOBS_GRACE` (10 s).
    pub async fn wait(mut self) -> Result<()> {
        let mut first = Ok(());
        if let Some(ingest) = self.ingest.take() {
            let r = match ingest.await {
                Ok(r) => r,
                Err(e) => Err(Error::Panicked { part: "ingestion", message: e.to_string() }),
            };
            self.cancel.cancel();
            first = r;
        } else {
            self.cancel.cancelled().await;
        }
        if let Some(engine) = self.engine.take() {
            let r = engine.wait().await.map_err(Error::from);
            if first.is_ok() {
                first = r;
            }
        }
        if let Some(jobs) = self.jobs.take() {
            let r = jobs.stop(JOBS_GRACE).await.map_err(Error::from);
            if first.is_ok() {
                first = r;
            }
        }
        let _ = self.retention.await;
        first
    }
}
