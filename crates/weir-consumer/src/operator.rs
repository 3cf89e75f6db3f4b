//! What user code implements: an operator reacts to events inside a database transaction.
//!
//! Users write `async fn handle` and answer with control flow ([`OperatorError`]): retry
//! (after the consumer's backoff, or after a given wait), skip, or park. The engine keeps
//! operators as `Arc<dyn ErasedOperator>`, a boxed-future twin of the trait implemented for
//! every [`Operator`], so no user ever writes `Box::pin`.

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::PgConnection;
use weir_core::{Event, Kind};
use weir_log::EventFilter;

pub use weir_core::BoxError;

/// Which events a consumer receives. Empty lists match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// Entities (`posts`, `sales.orders`).
    pub entities: Vec<String>,
    /// Kinds.
    pub kinds: Vec<Kind>,
}

impl Selector {
    pub(crate) fn filter(&self) -> EventFilter {
        EventFilter { entities: self.entities.clone(), kinds: self.kinds.clone() }
    }
}

/// A transactional operator: its writes and its checkpoint commit in one transaction, so each
/// event's effect lands exactly once.
///
/// ```no_run
/// use std::time::Duration;
/// use weir_consumer::{Operator, OperatorError, Selector};
///
/// struct CountPosts;
/// impl Operator for CountPosts {
///     fn selector(&self) -> Selector {
///         Selector { entities: vec!["posts".into()], kinds: vec![weir_core::Kind::Insert] }
///     }
///     async fn handle(
///         &self,
///         tx: &mut sqlx::PgConnection,
///         event: &weir_core::Event,
///     ) -> Result<(), OperatorError> {
///         if event.new_record.is_none() {
///             return Err(OperatorError::skip("an insert without its row"));
///         }
///         sqlx::query("update stats set posts = posts + 1")
///             .execute(tx)
///             .await
///             .map_err(|e| OperatorError::retry_after(Duration::from_secs(1), e))?;
///         Ok(())
///     }
/// }
/// ```
pub trait Operator: Send + Sync + 'static {
    /// Which events it receives.
    fn selector(&self) -> Selector;

    /// Whether it receives `event`, beyond the [`selector`](Self::selector) (which the read
    /// applies in SQL). An event it does not match moves its lane's checkpoint like any event
    /// of another lane. Defaults to every event the selector returns.
    fn matches(&self, event: &Event) -> bool {
        let _ = event;
        true
    }

    /// The key whose events must stay in order (they go to one lane). Defaults to the event's
    /// primary key. An error fails the event (and goes through the retry policy).
    fn partition_key(&self, event: &Event) -> Result<String, BoxError> {
        Ok(event.key.to_string())
    }

    /// Every key `event` belongs to, in the order it is to be handled for them. Defaults to
    /// the one [`partition_key`](Self::partition_key). An update that moves a row from one key
    /// to another (a comment moved to another post) answers both, old first: the event goes to
    /// every lane one of its keys routes to, and each lane handles it through
    /// [`handle_keys`](Self::handle_keys) for the keys it owns, in this order. Duplicates are
    /// ignored; an empty list fails the event.
    fn partition_keys(&self, event: &Event) -> Result<Vec<String>, BoxError> {
        Ok(vec![self.partition_key(event)?])
    }

    /// The columns it routes by, as `(entity, column)` (`("comments", "post_id")`): a delete's
    /// old row must carry them, so `weir run` refuses to start when a watched table's replica
    /// identity does not (and `weir init` can set it to full). Defaults to none (routing by
    /// the primary key, which every identity but `nothing` carries).
    fn key_columns(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Handles one event inside `tx`. Do not commit or roll back `tx`. Any error (`?`) is
    /// retried with the consumer's backoff; [`OperatorError`] says otherwise.
    fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
    ) -> impl Future<Output = Result<(), OperatorError>> + Send;

    /// Handles an event with several [`partition_keys`](Self::partition_keys) on one lane,
    /// for `keys`: those of its keys this lane owns, in the order `partition_keys` gave them
    /// (all of them on a single lane, such as `ordering = "global"`). The engine calls it
    /// only for such events, each alone in its transaction; defaults to
    /// [`handle`](Self::handle), which suits an operator that never answers several keys.
    fn handle_keys(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        keys: &[String],
    ) -> impl Future<Output = Result<(), OperatorError>> + Send {
        let _ = keys;
        self.handle(tx, event)
    }

    /// Work outside the database for consecutive events of one lane, done before the
    /// transaction that handles them begins — so no transaction (nor its pooled connection)
    /// is held while it waits on the network. A sink delivers here, and its
    /// [`handle_group`](Self::handle_group) only records the delivery. An error fails the events
    /// as a handler's error does; on success the events are handled (in one transaction, with
    /// the checkpoint). If that transaction fails, `prepare` runs again for them: its effects
    /// are at least once. Defaults to nothing.
    fn prepare(&self, events: &[&Event]) -> impl Future<Output = Result<(), OperatorError>> + Send {
        let _ = events;
        async { Ok(()) }
    }

    /// Handles consecutive events of one lane (at most the spec's
    /// [`group`](crate::ConsumerSpec::group)) inside one `tx`, in order. Defaults to
    /// [`handle`](Self::handle) for each. An operator that can do better with several at once
    /// (a sink that sends them in one request, or publishes them with many acknowledgements in
    /// flight) overrides it; when it fails, the engine rolls the group back and handles its
    /// events one at a time through `handle` and the retry policy, to isolate the failing one.
    fn handle_group(
        &self,
        tx: &mut PgConnection,
        events: &[&Event],
    ) -> impl Future<Output = Result<(), OperatorError>> + Send {
        async move {
            for event in events {
                self.handle(tx, event).await?;
            }
            Ok(())
        }
    }
}

/// How handling an event failed, and what to do about it. Any `std::error::Error` converts
/// into a plain retry with `?`.
///
/// | constructor | what happens |
/// |---|---|
/// | [`retry`](Self::retry) (or `?`) | tried again after the consumer's backoff; after `max_retries` the consumer's `on_exhausted` applies |
/// | [`retry_after`](Self::retry_after) | the same, after the given wait instead of the backoff (still counts against `max_retries`) |
/// | [`skip`](Self::skip) | recorded as skipped; the consumer moves on at once |
/// | [`park`](Self::park) | parked at once; the key's later events wait behind it (whatever `on_exhausted` says) until it is retried or discarded |
/// | [`stop`](Self::stop) | the consumer stops with the error as its reason (a receiver that said it is gone); `start` tries the event again |
#[derive(Debug)]
pub struct OperatorError {
    pub(crate) error: BoxError,
    pub(crate) action: Action,
}

/// What an [`OperatorError`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Retry { after: Option<Duration> },
    Skip,
    Park,
    Stop,
}

impl OperatorError {
    /// The attempt failed: retry after the consumer's backoff.
    pub fn retry(error: impl Into<BoxError>) -> Self {
        Self { error: error.into(), action: Action::Retry { after: None } }
    }

    /// The attempt failed: retry after `after` instead of the backoff.
    pub fn retry_after(after: Duration, error: impl Into<BoxError>) -> Self {
        Self { error: error.into(), action: Action::Retry { after: Some(after) } }
    }

    /// The event can never succeed and may be dropped: record it as skipped and move on.
    pub fn skip(error: impl Into<BoxError>) -> Self {
        Self { error: error.into(), action: Action::Skip }
    }

    /// The event cannot succeed now: park it, and its key's later events behind it.
    pub fn park(error: impl Into<BoxError>) -> Self {
        Self { error: error.into(), action: Action::Park }
    }

    /// Nothing of this consumer can succeed until someone acts (a webhook receiver answered
    /// `410 Gone`): stop the consumer with the error as the reason. The event stays unhandled;
    /// starting the consumer again tries it again.
    pub fn stop(error: impl Into<BoxError>) -> Self {
        Self { error: error.into(), action: Action::Stop }
    }
}

impl std::fmt::Display for OperatorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for OperatorError {
    fn from(error: E) -> Self {
        Self::retry(error)
    }
}

/// [`Operator`] with its future boxed, so the engine can hold any operator behind one `dyn`.
pub(crate) trait ErasedOperator: Send + Sync + 'static {
    fn selector(&self) -> Selector;
    fn matches(&self, event: &Event) -> bool;
    fn partition_keys(&self, event: &Event) -> Result<Vec<String>, BoxError>;
    fn key_columns(&self) -> Vec<(String, String)>;
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a Event,
    ) -> BoxFuture<'a, Result<(), OperatorError>>;
    fn handle_keys<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a Event,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<(), OperatorError>>;
    fn handle_group<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [&'a Event],
    ) -> BoxFuture<'a, Result<(), OperatorError>>;
    fn prepare<'a>(&'a self, events: &'a [&'a Event]) -> BoxFuture<'a, Result<(), OperatorError>>;
}

impl<O: Operator> ErasedOperator for O {
    fn selector(&self) -> Selector {
        Operator::selector(self)
    }
    fn matches(&self, event: &Event) -> bool {
        Operator::matches(self, event)
    }
    fn partition_keys(&self, event: &Event) -> Result<Vec<String>, BoxError> {
        Operator::partition_keys(self, event)
    }
    fn key_columns(&self) -> Vec<(String, String)> {
        Operator::key_columns(self)
    }
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a Event,
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(Operator::handle(self, tx, event))
    }
    fn handle_keys<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a Event,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(Operator::handle_keys(self, tx, event, keys))
    }
    fn handle_group<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [&'a Event],
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(Operator::handle_group(self, tx, events))
    }
    fn prepare<'a>(&'a self, events: &'a [&'a Event]) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(Operator::prepare(self, events))
    }
}
