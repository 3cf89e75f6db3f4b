//! The engine: what a caller configures ([`ConsumerSpec`]), starts and stops ([`Engine`]).
//!
//! ```text
//! Engine::start: migrate ─► register each consumer (row + one checkpoint per lane)
//!                ─► spawn the supervisor (supervisor.rs), which leases lanes and runs one
//!                   lane task (lane.rs) per held lane
//! Engine::stop:  cancel ─► each lane finishes its current event ─► leases released
//! ```
//!
//! One process identity ([`ProcessId`]) names this engine in `weir.consumer_nodes` and as the
//! owner of its lanes; the caller passes the one it uses for ingestion and jobs too.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use weir_core::{ConsumersConfig, Event, OnExhausted, Ordering, ProcessId, RetryConfig, StartFrom};
use weir_log::{LogReader, Wake};

use crate::operator::ErasedOperator;
use crate::state::ConsumerKind;
use crate::{Error, Operator, Result, Selector, store, supervisor};

/// One consumer to run.
#[derive(Clone)]
pub struct ConsumerSpec {
    /// Unique name; its checkpoints are kept under it.
    pub name: String,
    /// The handler.
    pub(crate) operator: Arc<dyn ErasedOperator>,
    /// `global` (one lane) or `per_key`.
    pub ordering: Ordering,
    /// Lanes for `per_key`.
    pub lanes: u32,
    /// Retry policy.
    pub retry: RetryConfig,
    /// After the retries.
    pub on_exhausted: OnExhausted,
    /// Where a new consumer starts.
    pub start_from: StartFrom,
    /// Polling fallback when no wake-up arrives.
    pub poll_interval: Duration,
    /// For a consumer kept in the database (a subscription, from a [`Catalog`]): its
    /// `weir.consumers.generation`. When it changes (a re-split, a new selector) every process
    /// restarts the consumer's lanes with the new spec.
    pub generation: i64,
    /// Most consecutive events of one lane handled in one transaction (one
    /// [`Operator::handle_group`] call, one checkpoint). Default 50.
    pub group: usize,
    /// How long a lane holds a group that is not full, waiting for more events, before it
    /// handles it (a webhook sink's batch `linger`). Default zero: at once.
    pub linger: Duration,
}

impl std::fmt::Debug for ConsumerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerSpec")
            .field("name", &self.name)
            .field("lanes", &self.lanes)
            .finish()
    }
}

impl ConsumerSpec {
    /// A consumer with the `[consumers]` defaults.
    pub fn new<O: Operator>(
        name: impl Into<String>,
        operator: Arc<O>,
        defaults: &ConsumersConfig,
    ) -> Self {
        Self {
            name: name.into(),
            operator,
            ordering: defaults.ordering,
            lanes: defaults.lanes,
            retry: defaults.retry,
            on_exhausted: defaults.on_exhausted,
            start_from: defaults.start_from,
            poll_interval: defaults.poll_interval,
            generation: 0,
            group: 50,
            linger: Duration::ZERO,
        }
    }

    /// The columns its operator routes by, as `(entity, column)` ([`Operator::key_columns`]):
    /// what a watched table's replica identity must carry in deleted rows.
    pub fn key_columns(&self) -> Vec<(String, String)> {
        self.operator.key_columns()
    }

    /// What its operator listens to.
    pub fn selector(&self) -> crate::Selector {
        self.operator.selector()
    }

    pub(crate) fn lane_count(&self) -> i32 {
        match self.ordering {
            Ordering::Global => 1,
            Ordering::PerKey => self.lanes.max(1) as i32,
        }
    }
}

/// Consumers defined in the database (subscriptions), asked for every supervisor tick: a
/// consumer that appears starts, one that disappears stops, one whose
/// [`generation`](ConsumerSpec::generation) changed restarts. The catalog registers its consumers
/// itself (they exist before any process runs them).
pub trait Catalog: Send + Sync + 'static {
    /// The consumers this process should run now.
    fn specs<'a>(&'a self, pool: &'a sqlx::PgPool) -> BoxFuture<'a, Result<Vec<ConsumerSpec>>>;
}

/// Receives every retry and every final failure (EventStreamex's `ErrorLoggerAdapter`).
pub trait ErrorReporter: Send + Sync + 'static {
    /// A handler failed and will be retried after `delay`.
    fn retry(&self, consumer: &str, event: &Event, attempt: u32, error: &str, delay: Duration);
    /// Retries ran out (or the handler asked to skip or park); `outcome` is what happens now.
    fn exhausted(
        &self,
        consumer: &str,
        event: &Event,
        attempt: u32,
        error: &str,
        outcome: OnExhausted,
    );
}

/// The default reporter: logs through `tracing`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingReporter;

impl ErrorReporter for TracingReporter {
    fn retry(&self, consumer: &str, event: &Event, attempt: u32, error: &str, delay: Duration) {
        tracing::warn!(
            consumer,
            position = event.position,
            attempt,
            error,
            ?delay,
            "handler failed; retrying"
        );
    }
    fn exhausted(
        &self,
        consumer: &str,
        event: &Event,
        attempt: u32,
        error: &str,
        outcome: OnExhausted,
    ) {
        tracing::error!(
            consumer,
            position = event.position,
            attempt,
            error,
            ?outcome,
            "handler failed for good"
        );
    }
}

/// What the supervisor and every lane task of one engine share.
#[derive(Clone)]
pub(crate) struct Shared {
    /// Consumers halted as seen by this process: set by the lane that halts (so the other
    /// lanes here stop before their next event), synced from the database every batch.
    pub(crate) halted: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    pub(crate) pool: sqlx::PgPool,
    pub(crate) reader: LogReader,
    /// Full pages of the log, read once for all the lanes of a consumer.
    pub(crate) pages: Arc<crate::pages::PageCache>,
    /// The consumers' rows, read once for all the lanes of a consumer (view.rs).
    pub(crate) view: Arc<crate::view::View>,
    /// Lanes' watermark moves, written together (marks.rs).
    pub(crate) marks: Arc<crate::marks::Marks>,
    pub(crate) wake: Wake,
    /// This process's identity: the owner of its leases.
    pub(crate) node: String,
    pub(crate) reporter: Arc<dyn ErrorReporter>,
}

/// Runs consumers until cancelled.
#[derive(Debug)]
pub struct Engine {
    task: tokio::task::JoinHandle<Result<()>>,
    cancel: CancellationToken,
}

impl Engine {
    /// Registers the consumers (creating their checkpoints) and starts running them as
    /// `process`. `wake` announces new log positions (in-process or from `NOTIFY`).
    pub async fn start(
        pool: sqlx::PgPool,
        specs: Vec<ConsumerSpec>,
        wake: Wake,
        reporter: Arc<dyn ErrorReporter>,
        process: &ProcessId,
        cancel: CancellationToken,
    ) -> Result<Self> {
        Self::start_with_catalog(pool, specs, None, wake, reporter, process, cancel).await
    }

    /// [`start`](Self::start), plus the consumers of `catalog`, looked up every tick.
    pub async fn start_with_catalog(
        pool: sqlx::PgPool,
        specs: Vec<ConsumerSpec>,
        catalog: Option<Arc<dyn Catalog>>,
        wake: Wake,
        reporter: Arc<dyn ErrorReporter>,
        process: &ProcessId,
        cancel: CancellationToken,
    ) -> Result<Self> {
        crate::migrate(&pool).await?;
        let reader = LogReader::new(pool.clone()).await?;
        for spec in &specs {
            register(&pool, &reader, spec).await?;
        }
        let shared = Shared {
            halted: Arc::default(),
            pool,
            reader,
            pages: Arc::default(),
            view: Arc::default(),
            marks: Arc::default(),
            wake,
            node: process.as_str().to_string(),
            reporter,
        };
        let task = tokio::spawn(supervisor::supervise(shared, specs, catalog, cancel.clone()));
        Ok(Self { task, cancel })
    }

    /// Stops (gracefully: each lane finishes its current event) and waits.
    pub async fn stop(self) -> Result<()> {
        self.cancel.cancel();
        self.wait().await
    }

    /// Stops at once without releasing anything, as if the process died: its lanes move to other
    /// processes only when their leases expire. For tests of that failure.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Waits until the engine stops (after its cancellation token fires).
    pub async fn wait(self) -> Result<()> {
        match self.task.await {
            Ok(r) => r,
            Err(e) if e.is_panic() => {
                Err(Error::SupervisorPanicked(weir_core::panic_message(e.into_panic().as_ref())))
            }
            // Cancelled: only `abort` does that, and it consumes the engine.
            Err(_) => Ok(()),
        }
    }
}

/// Creates an operator's row and checkpoints (idempotent), starting a new consumer at the
/// oldest logged event or at the head.
async fn register(pool: &sqlx::PgPool, reader: &LogReader, spec: &ConsumerSpec) -> Result<()> {
    let start = match spec.start_from {
        StartFrom::Beginning => reader.oldest().await?.map_or(reader.head().await?, |p| p - 1),
        StartFrom::Now => reader.head().await?,
    };
    let mut conn = pool.acquire().await?;
    register_consumer(
        &mut conn,
        &spec.name,
        ConsumerKind::Operator,
        spec.lane_count(),
        &spec.operator.selector(),
        start,
    )
    .await
}

/// Creates a consumer's row and its lanes' checkpoints at `start` (idempotent: an existing
/// consumer keeps its checkpoints and takes the new selector), in `conn`'s transaction when it
/// is in one. Refuses a name taken by the other kind, and a changed lane count of an operator.
pub async fn register_consumer(
    conn: &mut sqlx::PgConnection,
    name: &str,
    kind: ConsumerKind,
    lanes: i32,
    selector: &Selector,
    start: i64,
) -> Result<()> {
    let kinds: Vec<String> = selector.kinds.iter().map(|k| k.as_str().to_string()).collect();
    let ordering = if lanes == 1 { "global" } else { "per_key" };
    store::consumer::register(conn, name, kind, lanes, ordering, &selector.entities, &kinds, start)
        .await
}
