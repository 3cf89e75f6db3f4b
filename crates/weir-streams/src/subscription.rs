//! What a subscription is. (Being written.)

/// A subscription's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionKind {}

/// A subscription's definition.
#[derive(Debug, Clone)]
pub struct SubscriptionDef {}
