//! What every adapter gets from the gateway, and the trait for adapters that own a listener.

use crate::metrics::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authorizer;
use crate::backbone::{Backbone, BoxFuture, Envelope, Origin, TryPublish};
use crate::metrics::{AdapterMetrics, Registry};
use crate::topic::Topic;

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
    /// Per source address and per user connection caps, shared by every listener.
    pub limits: Arc<crate::limits::ConnectionLimits>,
    /// The live client connections, for the admin API.
    pub connections: crate::connections::Connections,
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
    /// A listener's address could not be bound; `key` is the config key that set it (so the
    /// gateway can tell the operator which one to change).
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        key: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Anything else that stops the adapter from starting, with its cause.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
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

/// A topic the ACL allows `principal` to publish to: made only by
/// [`AdapterContext::authorize`], so every publish is checked against the ACL exactly once —
/// early where an adapter wants to refuse before reading a body or decoding an event (HTTP,
/// MQTT), and the publish itself takes the proof instead of checking again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized(Topic, Arc<str>);

impl Authorized {
    pub fn topic(&self) -> &Topic {
        &self.0
    }

    /// The envelope to publish on this topic. Its deduplication scope is the principal's name
    /// (with the topic, on JetStream: `Envelope::dedup_scope`), so that one principal cannot
    /// suppress another's event by sending its `source` and `id` first (review F12).
    pub fn envelope(self, event: Arc<crate::event::Event>, origin: Origin) -> AuthorizedEnvelope {
        AuthorizedEnvelope(Envelope::new(self.0, event, origin).with_dedup_scope(self.1))
    }
}

/// An envelope on an [`Authorized`] topic; its topic cannot be changed, the rest can.
#[derive(Debug, Clone)]
pub struct AuthorizedEnvelope(Envelope);

impl AuthorizedEnvelope {
    pub fn with_qos(self, qos: u8) -> Self {
        AuthorizedEnvelope(self.0.with_qos(qos))
    }

    pub fn with_retain(self, retain: bool) -> Self {
        AuthorizedEnvelope(self.0.with_retain(retain))
    }

    /// Marked as a plain MQTT message (see [`crate::Envelope::plain`]).
    pub fn with_plain(self, plain: bool) -> Self {
        AuthorizedEnvelope(self.0.with_plain(plain))
    }

    /// MQTT properties forwarded with the event (`None`: none).
    pub fn with_mqtt_properties(
        mut self,
        mqtt: Option<Arc<crate::backbone::MqttProperties>>,
    ) -> Self {
        self.0.mqtt = mqtt;
        self
    }

    /// The envelope, to read (e.g. to store it as a retained message).
    pub fn envelope(&self) -> &Envelope {
        &self.0
    }
}

impl AdapterContext {
    /// The one place a publish is authorized: checks `topic` against `principal`'s ACL and
    /// counts a refusal (`meshgate_errors_total{kind="forbidden"}`).
    pub fn authorize(
        &self,
        metrics: &AdapterMetrics,
        principal: &crate::auth::Principal,
        topic: Topic,
    ) -> Result<Authorized, PublishError> {
        match self.authorizer.check_publish(principal, &topic) {
            Ok(()) => Ok(Authorized(topic, principal.shared_name())),
            Err(e) => {
                metrics.error(ErrorKind::Forbidden);
                Err(e.into())
            }
        }
    }

    /// The ingress path for an event as it is: authorize, publish, count. Returns once the
    /// backbone accepted the event, so the caller may then acknowledge its client.
    pub async fn publish(
        &self,
        metrics: &AdapterMetrics,
        principal: &crate::auth::Principal,
        topic: Topic,
        event: Arc<crate::event::Event>,
        origin: Origin,
    ) -> Result<(), PublishError> {
        let authorized = self.authorize(metrics, principal, topic)?;
        self.publish_envelope(metrics, authorized.envelope(event, origin))
            .await
    }

    /// Publishes a prepared envelope (e.g. with an MQTT QoS) on an authorized topic.
    pub async fn publish_envelope(
        &self,
        metrics: &AdapterMetrics,
        envelope: AuthorizedEnvelope,
    ) -> Result<(), PublishError> {
        match self.try_publish_envelope(metrics, envelope) {
            Published::Done(r) => r,
            Published::Pending(f) => f.await,
        }
    }

    /// [`AdapterContext::publish_envelope`] without a future when the backbone settles the
    /// publish at once ([`Backbone::try_publish`]), as the memory backbone does while its
    /// queues have room: the path of every MQTT publish in the single-process setup.
    pub fn try_publish_envelope<'a>(
        &'a self,
        metrics: &'a AdapterMetrics,
        envelope: AuthorizedEnvelope,
    ) -> Published<'a> {
        let mut envelope = envelope.0;
        // Tracing on: the ingress hop's spans, ended once the backbone answered.
        let mut hop = crate::trace::ingress(metrics.adapter(), &mut envelope);
        match self.backbone.try_publish(envelope) {
            // Settled without waiting: recorded as taking no time (the lowest latency bucket)
            // rather than reading the clock twice per message.
            TryPublish::Done(r) => {
                traced(hop.as_deref_mut(), &r);
                Published::Done(settled(metrics, r, None))
            }
            TryPublish::Pending(f) => {
                let started = std::time::Instant::now();
                Published::Pending(Box::pin(async move {
                    let r = f.await;
                    traced(hop.as_deref_mut(), &r);
                    settled(metrics, r, Some(started))
                }))
            }
        }
    }
}

/// The outcome of [`AdapterContext::try_publish_envelope`].
pub enum Published<'a> {
    /// Accepted (the client may be acknowledged) or refused.
    Done(Result<(), PublishError>),
    /// Waiting for the backbone.
    Pending(BoxFuture<'a, Result<(), PublishError>>),
}

impl std::fmt::Debug for Published<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Published::Done(r) => f.debug_tuple("Done").field(r).finish(),
            Published::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// Notes a refused publish on the hop's spans.
fn traced(hop: Option<&mut crate::trace::Ingress>, r: &Result<(), crate::backbone::BackboneError>) {
    if let (Some(hop), Err(e)) = (hop, r) {
        hop.failed(e);
    }
}

/// Counts a backbone's answer to a publish.
fn settled(
    metrics: &AdapterMetrics,
    r: Result<(), crate::backbone::BackboneError>,
    started: Option<std::time::Instant>,
) -> Result<(), PublishError> {
    match r {
        Ok(()) => {
            metrics.received.inc();
            metrics
                .publish_latency
                .observe(started.map_or(std::time::Duration::ZERO, |s| s.elapsed()));
            Ok(())
        }
        Err(e) => {
            metrics.error(ErrorKind::Backbone);
            Err(e.into())
        }
    }
}
