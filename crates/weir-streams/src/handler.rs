//! In-process delivery. (Being written.)

/// A handler.
pub trait Handler {}

/// The catalog.
#[derive(Debug)]
pub struct SubscriptionCatalog {}
