//! In-process delivery: a subscription whose sink is a Rust [`Handler`] runs on the consumer
//! engine — its emitters are the consumer's lanes, leased across the processes that register
//! the handler, with the engine's retries, halt / skip / park and fenced checkpoints.
//!
//! ```text
//! SubscriptionCatalog (every supervisor tick): weir.subscriptions where sink = 'rust' and a
//!   handler of that name is registered here ─► ConsumerSpec { lanes = pool_size,
//!   generation } ─► lane: SQL filter (coarse selector) ─► Matcher ─► route by stream / key
//!   ─► BEGIN; handler.handle(tx, event); checkpoint; COMMIT
//! ```
//!
//! The handler runs inside the checkpoint's transaction: its database writes land exactly once
//! with the delivery. Effects outside the database are at least once (a crash between the
//! effect and the commit repeats the event).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use weir_consumer::{Catalog, ConsumerSpec, Operator, OperatorError, Selector};
use weir_core::{ConsumersConfig, Event, Ordering};

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

/// A subscription as the engine sees it: an operator with the subscription's selector and
/// routing, delivering to the handler.
struct Emitter {
    def: SubscriptionDef,
    matcher: Matcher,
    handler: Arc<dyn ErasedHandler>,
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

    async fn handle(&self, tx: &mut PgConnection, event: &Event) -> Result<(), OperatorError> {
        self.handler.handle(tx, event).await
    }
}

/// The subscriptions this process delivers to Rust handlers, looked up in the database every
/// supervisor tick (so an update, a stop or a re-split made anywhere reaches every process).
pub struct SubscriptionCatalog {
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    defaults: ConsumersConfig,
}

impl std::fmt::Debug for SubscriptionCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionCatalog").field("handlers", &self.handlers.keys()).finish()
    }
}

impl SubscriptionCatalog {
    /// An empty catalog; retries and failure policy default to `defaults`.
    pub fn new(defaults: ConsumersConfig) -> Self {
        Self { handlers: HashMap::new(), defaults }
    }

    /// Delivers subscription `name` (whose sink is `rust`) to `handler` in this process.
    pub fn handler(mut self, name: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(name.into(), Arc::new(handler));
        self
    }

    /// Whether no handler is registered.
    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }

    async fn current(&self, pool: &PgPool) -> crate::Result<Vec<ConsumerSpec>> {
        if self.handlers.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = self.handlers.keys().cloned().collect();
        let mut specs = Vec::new();
        for row in subscriptions::rust_rows(pool, &names).await? {
            let def = match row.definition().and_then(|d| d.matcher().map(|m| (d, m))) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(subscription = %row.name, error = %e, "cannot run the subscription");
                    continue;
                }
            };
            let (def, matcher) = def;
            let handler = self.handlers[&row.name].clone();
            let retry = def.options.retry.unwrap_or(self.defaults.retry);
            let on_exhausted = def.options.on_exhausted.unwrap_or(self.defaults.on_exhausted);
            let name = def.name.clone();
            let emitter = Arc::new(Emitter { def, matcher, handler });
            let mut spec = ConsumerSpec::new(name, emitter, &self.defaults);
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
