//! What user code implements: an operator reacts to events inside a database transaction.

use futures::future::BoxFuture;
use sqlx::PgConnection;
use weir_core::{Event, Kind};
use weir_log::EventFilter;

/// A handler's failure: any error. It is retried, then halted, skipped or parked.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

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
/// use futures::future::BoxFuture;
/// use weir_consumer::{HandlerError, Operator, Selector};
///
/// struct CountPosts;
/// impl Operator for CountPosts {
///     fn selector(&self) -> Selector {
///         Selector { entities: vec!["posts".into()], kinds: vec![weir_core::Kind::Insert] }
///     }
///     fn handle<'a>(&'a self, tx: &'a mut sqlx::PgConnection, _e: &'a weir_core::Event)
///         -> BoxFuture<'a, Result<(), HandlerError>> {
///         Box::pin(async move {
///             sqlx::query("update stats set posts = posts + 1").execute(tx).await?;
///             Ok(())
///         })
///     }
/// }
/// ```
pub trait Operator: Send + Sync + 'static {
    /// Which events it receives.
    fn selector(&self) -> Selector;

    /// The key whose events must stay in order (they go to one lane). Defaults to the event's
    /// primary key. An error fails the event (and goes through the retry policy).
    fn partition_key(&self, event: &Event) -> Result<String, HandlerError> {
        Ok(event.key.to_string())
    }

    /// Handles one event inside `tx`. Do not commit or roll back `tx`.
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a Event,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}
