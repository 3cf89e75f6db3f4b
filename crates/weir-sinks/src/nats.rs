//! The NATS JetStream sink (to be built): publish each event with `Nats-Msg-Id`, checkpoint
//! after the PubAcks.

use futures::future::BoxFuture;
use weir_consumer::OperatorError;
use weir_core::Event;

use crate::{Delivery, NatsSink};

/// Publishes a subscription's events to JetStream.
#[derive(Debug)]
pub struct Nats {
    subscription: String,
    sink: NatsSink,
}

impl Nats {
    /// A NATS delivery of `subscription`; fails when the sink is invalid or its token is not in
    /// this process's environment. Does no I/O: it connects on the first delivery.
    pub fn new(subscription: &str, sink: &NatsSink) -> Result<Self, String> {
        sink.validate()?;
        Ok(Self { subscription: subscription.into(), sink: sink.clone() })
    }
}

impl Delivery for Nats {
    fn deliver<'a>(&'a self, events: &'a [&'a Event]) -> BoxFuture<'a, Result<(), OperatorError>> {
        let _ = (&self.subscription, &self.sink, events);
        Box::pin(async { Err(OperatorError::retry("the NATS sink is not built yet")) })
    }
}
