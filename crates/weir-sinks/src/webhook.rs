//! The webhook sink (to be built): POST each event, or a batch, signed the Standard Webhooks way.

use futures::future::BoxFuture;
use weir_consumer::OperatorError;
use weir_core::Event;

use crate::{Delivery, Secrets, WebhookSink};

/// Posts a subscription's events to one URL.
#[derive(Debug)]
pub struct Webhook {
    subscription: String,
    sink: WebhookSink,
    secrets: Secrets,
}

impl Webhook {
    /// A webhook delivery of `subscription`; fails when the sink is invalid or its secret is
    /// not in this process's environment. Does no I/O.
    pub fn new(subscription: &str, sink: &WebhookSink) -> Result<Self, String> {
        sink.validate()?;
        let secrets = sink.secrets()?;
        Ok(Self { subscription: subscription.into(), sink: sink.clone(), secrets })
    }
}

impl Delivery for Webhook {
    fn deliver<'a>(&'a self, events: &'a [&'a Event]) -> BoxFuture<'a, Result<(), OperatorError>> {
        let _ = (&self.subscription, &self.sink, &self.secrets, events);
        Box::pin(async { Err(OperatorError::retry("the webhook sink is not built yet")) })
    }
}
