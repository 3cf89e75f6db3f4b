//! Delivery on the consumer engine: a subscription whose sink is a Rust [`Handler`], a webhook
//! or NATS JetStream runs as a consumer — its emitters are the consumer's lanes, leased across
//! the processes that run it, with the engine's retries, halt / skip / park and fenced
//! checkpoints.
//!
//! ```text
//! SubscriptionCatalog (every supervisor tick): weir.subscriptions where sink = 'rust' and a
//!   handler of that name is registered here, or sink in (webhook, nats) when this process
//!   delivers sinks and can build the sink (its secrets are in the environment)
//!   ─► ConsumerSpec { lanes = pool_size, generation, group, linger }
//!   ─► lane: SQL filter (coarse selector) ─► Matcher ─► route by stream / key
//!   ─► handler: BEGIN; handler.handle(tx, event); checkpoint; COMMIT
//!      sink:    sink.deliver(group) (no transaction held); BEGIN; count it; checkpoint; COMMIT
//! ```
//!
//! The handler runs inside the checkpoint's transaction: its database writes land exactly once
//! with the delivery. Effects outside the database — a sink's deliveries among them — are at
//! least once (a crash between the effect and the commit repeats the event, with the same id).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use weir_consumer::{Catalog, ConsumerSpec, Operator, OperatorError, Selector};
use weir_core::{ConsumersConfig, Event, Ordering};

use crate::sink::Sink;
use crate::subscription::{Matcher, SubscriptionDef};
use crate::subscriptions;

/// Receives a subscription's events, one at a time per stream (or row key), in log order.
///
/// ```no_run
/// use weir_consumer::OperatorError;
///
/// struct Totals;
/// impl weir_streams::Handler for Totals {
///     async fn handle(
///         &self,
///         tx: &mut sqlx::PgConnection,
///         event: &weir_core::Event,
///     ) -> Result<(), OperatorError> {
///         let row = event.new_record.as_ref().ok_or_else(|| OperatorError::skip("no row"))?;
///         sqlx::query("insert into totals (stream, n) values ($1, 1)
///                      on conflict (stream) do update set n = totals.n + 1")
///             .bind(row["stream"].as_str())
///             .execute(tx)
///             .await?;
///         Ok(())
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Handles one event inside `tx` (do not commit it). Errors are retried with the
    /// subscription's retry settings; [`OperatorError`] can ask to skip or park instead.
    fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
    ) -> impl Future<Output = Result<(), OperatorError>> + Send;
}

/// [`Handler`] with its future boxed, so the catalog can hold any handler behind one `dyn`.
trait ErasedHandler: Send + Sync + 'static {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a Event,
    ) -> BoxFuture<'a, Result<(), OperatorError>>;
}

impl<H: Handler> ErasedHandler for H {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a Event,
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(Handler::handle(self, tx, event))
    }
}

/// Where an emitter delivers.
#[derive(Clone)]
enum Target {
    Handler(Arc<dyn ErasedHandler>),
    Sink(Arc<dyn weir_sinks::Delivery>),
}

/// A subscription as the engine sees it: an operator with the subscription's selector and
/// routing, delivering to the handler or the sink.
struct Emitter {
    def: SubscriptionDef,
    matcher: Matcher,
    target: Target,
}

impl Operator for Emitter {
    fn selector(&self) -> Selector {
        self.def.coarse_selector()
    }

    fn matches(&self, event: &Event) -> bool {
        self.matcher.matches(event)
    }

    fn partition_key(&self, event: &Event) -> Result<String, weir_core::BoxError> {
        Ok(self.def.partition_key(event)?)
    }

    async fn prepare(&self, events: &[&Event]) -> Result<(), OperatorError> {
        match &self.target {
            // Delivered before the transaction: none is held while the receiver answers.
            Target::Sink(sink) => sink.deliver(events).await,
            Target::Handler(_) => Ok(()),
        }
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Event) -> Result<(), OperatorError> {
        match &self.target {
            Target::Handler(h) => h.handle(tx, event).await,
            Target::Sink(_) => self.record(tx, &[event]).await,
        }
    }

    async fn handle_group(
        &self,
        tx: &mut PgConnection,
        events: &[&Event],
    ) -> Result<(), OperatorError> {
        match &self.target {
            Target::Handler(h) => {
                for event in events {
                    h.handle(tx, event).await?;
                }
                Ok(())
            }
            Target::Sink(_) => self.record(tx, events).await,
        }
    }
}

impl Emitter {
    /// Counts a sink's delivery of `events` (delivered by `prepare`) in the checkpoint's
    /// transaction, on the emitter's own row.
    async fn record(&self, tx: &mut PgConnection, events: &[&Event]) -> Result<(), OperatorError> {
        let (Some(first), Some(last)) = (events.first(), events.last()) else { return Ok(()) };
        let key = self.def.partition_key(first).unwrap_or_default();
        let lane = weir_consumer::lane_of(&key, self.def.pool_size as i32);
        subscriptions::record_delivery(tx, &self.def.name, lane, events.len(), last.position)
            .await
            .map_err(OperatorError::retry)
    }
}

/// The subscriptions this process delivers — to Rust handlers, and (with
/// [`sinks`](Self::sinks)) to webhooks and NATS — looked up in the database every supervisor
/// tick (so an update, a stop or a re-split made anywhere reaches every process).
pub struct SubscriptionCatalog {
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    defaults: ConsumersConfig,
    sinks: bool,
    /// Sinks built, by subscription and generation: one HTTP client or NATS connection per
    /// definition, kept across ticks.
    built: Mutex<HashMap<String, (i64, Built)>>,
}

/// A sink built for one generation of a subscription, or why this process cannot build it.
type Built = Result<Arc<dyn weir_sinks::Delivery>, String>;

impl std::fmt::Debug for SubscriptionCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionCatalog")
            .field("handlers", &self.handlers.keys())
            .field("sinks", &self.sinks)
            .finish()
    }
}

impl SubscriptionCatalog {
    /// An empty catalog; retries and failure policy default to `defaults`.
    pub fn new(defaults: ConsumersConfig) -> Self {
        Self { handlers: HashMap::new(), defaults, sinks: false, built: Mutex::default() }
    }

    /// Whether this process delivers webhook and NATS subscriptions too (every process that
    /// does shares their emitters).
    pub fn sinks(mut self, deliver: bool) -> Self {
        self.sinks = deliver;
        self
    }

    /// Delivers subscription `name` (whose sink is `rust`) to `handler` in this process.
    pub fn handler(mut self, name: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(name.into(), Arc::new(handler));
        self
    }

    /// Whether it runs nothing: no handler, and no sinks.
    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty() && !self.sinks
    }

    /// The sink of `def`, built once per generation; the error says why this process cannot
    /// deliver it (recorded on the subscription, and logged once).
    async fn sink(
        &self,
        pool: &PgPool,
        def: &SubscriptionDef,
        generation: i64,
    ) -> crate::Result<Option<Arc<dyn weir_sinks::Delivery>>> {
        let cached = self
            .built
            .lock()
            .expect("built sinks")
            .get(&def.name)
            .and_then(|(g, b)| (*g == generation).then(|| b.clone()));
        let built = match cached {
            Some(b) => b,
            None => {
                let built: Built = match &def.sink {
                    Sink::Webhook(w) => weir_sinks::webhook::Webhook::new(&def.name, w)
                        .map(|d| Arc::new(d) as Arc<dyn weir_sinks::Delivery>),
                    Sink::Nats(n) => weir_sinks::nats::Nats::new(&def.name, n)
                        .map(|d| Arc::new(d) as Arc<dyn weir_sinks::Delivery>),
                    Sink::Client | Sink::Rust => return Ok(None),
                };
                if let Err(e) = &built {
                    tracing::error!(subscription = %def.name, error = %e, "cannot deliver to the subscription's sink from this process; another process may");
                }
                subscriptions::record_sink_error(
                    pool,
                    &def.name,
                    built.as_ref().err().map(String::as_str),
                )
                .await?;
                self.built
                    .lock()
                    .expect("built sinks")
                    .insert(def.name.clone(), (generation, built.clone()));
                built
            }
        };
        Ok(built.ok())
    }

    async fn current(&self, pool: &PgPool) -> crate::Result<Vec<ConsumerSpec>> {
        if self.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = self.handlers.keys().cloned().collect();
        let mut specs = Vec::new();
        for row in subscriptions::engine_rows(pool, &names, self.sinks).await? {
            let def = match row.definition().and_then(|d| d.matcher().map(|m| (d, m))) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(subscription = %row.name, error = %e, "cannot run the subscription");
                    continue;
                }
            };
            let (def, matcher) = def;
            let target = match &def.sink {
                Sink::Rust => match self.handlers.get(&row.name) {
                    Some(h) => Target::Handler(h.clone()),
                    None => continue,
                },
                Sink::Webhook(_) | Sink::Nats(_) => {
                    match self.sink(pool, &def, row.generation).await? {
                        Some(sink) => Target::Sink(sink),
                        None => continue,
                    }
                }
                Sink::Client => continue,
            };
            let retry = def.options.retry.unwrap_or(self.defaults.retry);
            let on_exhausted = def.options.on_exhausted.unwrap_or(self.defaults.on_exhausted);
            let name = def.name.clone();
            let (group, linger) = (def.sink.group(), def.sink.linger());
            let emitter = Arc::new(Emitter { def, matcher, target });
            let mut spec = ConsumerSpec::new(name, emitter, &self.defaults);
            spec.group = group;
            spec.linger = linger;
            spec.ordering = Ordering::PerKey;
            spec.lanes = row.lanes as u32;
            spec.retry = retry;
            spec.on_exhausted = on_exhausted;
            spec.generation = row.generation;
            specs.push(spec);
        }
        Ok(specs)
    }
}

impl Catalog for SubscriptionCatalog {
    fn specs<'a>(
        &'a self,
        pool: &'a PgPool,
    ) -> BoxFuture<'a, weir_consumer::Result<Vec<ConsumerSpec>>> {
        Box::pin(async move {
            self.current(pool).await.map_err(|e| match e {
                crate::Error::Database(e) => weir_consumer::Error::Database(e),
                crate::Error::Consumer(e) => e,
                other => weir_consumer::Error::Config {
                    consumer: "subscriptions".into(),
                    problem: other.to_string(),
                },
            })
        })
    }
}
