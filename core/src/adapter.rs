//! What every adapter gets from the gateway, and the trait for adapters that own a listener.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authorizer;
use crate::backbone::{Backbone, BoxFuture, Origin};
use crate::metrics::{AdapterMetrics, Registry};

/// Shared by all adapters of one gateway process.
#[derive(Debug, Clone)]
pub struct AdapterContext {
    /// This gateway instance's id (origin of the events it publishes).
    pub instance: Arc<str>,
    pub backbone: Arc<dyn Backbone>,
    pub authorizer: Arc<Authorizer>,
    /// Fires when the gateway shuts down: stop accepting, settle in-flight work, return.
    pub shutdown: CancellationToken,
    /// Connection tasks register here so that shutdown can wait for them.
    pub tracker: TaskTracker,
    pub registry: Registry,
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

impl AdapterContext {
    /// A fresh connection id, unique within this process.
    pub fn next_connection_id(&self) -> u64 {
        NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed)
    }

    pub fn origin(&self, connection: u64) -> Origin {
        Origin {
            instance: self.instance.clone(),
            connection,
        }
    }

    pub fn metrics(&self, adapter: &'static str) -> AdapterMetrics {
        AdapterMetrics::new(&self.registry, adapter)
    }
}

/// Why an adapter stopped.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// An adapter that runs its own listener or client loop (MQTT, AMQP). HTTP and WebSocket share
/// the gateway's web listener and contribute routes instead.
pub trait Adapter: Send {
    fn name(&self) -> &'static str;
    /// Runs until `ctx.shutdown` fires and in-flight work is settled.
    fn run(self: Box<Self>, ctx: AdapterContext) -> BoxFuture<'static, Result<(), AdapterError>>;
}

/// Why [`AdapterContext::publish`] did not publish.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Forbidden(#[from] crate::auth::AuthError),
    #[error(transparent)]
    Backbone(#[from] crate::backbone::BackboneError),
}

impl AdapterContext {
    /// The one ingress path every adapter uses: authorize, publish, count. Returns once the
    /// backbone accepted the event, so the caller may then acknowledge its client.
    pub async fn publish(
        &self,
        metrics: &AdapterMetrics,
        principal: &crate::auth::Principal,
        topic: crate::topic::Topic,
        event: Arc<crate::event::Event>,
        origin: Origin,
    ) -> Result<(), PublishError> {
        self.publish_envelope(
            metrics,
            principal,
            crate::backbone::Envelope::new(topic, event, origin),
        )
        .await
    }

    /// [`AdapterContext::publish`] for a prepared envelope (e.g. with an MQTT QoS).
    pub async fn publish_envelope(
        &self,
        metrics: &AdapterMetrics,
        principal: &crate::auth::Principal,
        envelope: crate::backbone::Envelope,
    ) -> Result<(), PublishError> {
        let started = std::time::Instant::now();
        if let Err(e) = self.authorizer.check_publish(principal, &envelope.topic) {
            metrics.error("forbidden");
            return Err(e.into());
        }
        match self.backbone.publish(envelope).await {
            Ok(()) => {
                metrics.received.inc();
                metrics.publish_latency.observe(started.elapsed());
                Ok(())
            }
            Err(e) => {
                metrics.error("backbone");
                Err(e.into())
            }
        }
    }
}
