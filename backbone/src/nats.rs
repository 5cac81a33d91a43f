//! The NATS core backbone: several gateway instances on one NATS server or cluster.
//!
//! Events travel on `<subject_prefix>.<topic>` (the core `Topic` mapping) in the wire format of
//! [`crate::nats_wire`]. Every local subscriber gets its events from NATS, including those
//! published on this instance, so each subscriber gets each event once whichever instance
//! published it; the origin (instance and connection) travels in a header, for MQTT no-local.
//! Queue groups are NATS queue groups, so a shared subscription is shared across instances.
//!
//! Guarantee: at most once (NATS core). `publish` refuses (`Unavailable`) while the client is
//! not connected, so a client is told to retry rather than acknowledged; an event handed to
//! the NATS client just before a disconnect can still be lost. A subscriber that falls more
//! than `subscription_capacity` messages behind loses messages (NATS "slow consumer"), counted
//! as `meshgate_backbone_dropped_total{backbone="nats",reason="slow_consumer"}`. Malformed
//! messages from other NATS programs are skipped and counted (`reason="malformed"`).
//!
//! The async-nats client reconnects on its own (with backoff, forever) and re-subscribes.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{ConnectOptions, ServerAddr};
use futures_util::StreamExt;
use meshgate_config::{NatsBackboneConfig, NatsWireMode};
use meshgate_core::metrics::{self, Counter, Gauge, Registry};
use meshgate_core::{
    Backbone, BackboneError, BoxFuture, Delivery, Envelope, SubscribeOptions, Subscription,
    TopicFilter,
};

use crate::nats_wire;

const NAME: &str = "nats";

/// At most one slow-consumer warning per this interval (every drop is counted).
const SLOW_CONSUMER_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct NatsBackbone {
    client: async_nats::Client,
    /// This instance's id, and percent-encoded for the origin header.
    instance: (String, String),
    prefix: String,
    wire: NatsWireMode,
    closed: AtomicBool,
    malformed: Counter,
    subscriptions: Gauge,
}

/// Why the NATS backbone could not start.
#[derive(Debug, thiserror::Error)]
pub enum NatsStartError {
    #[error("backbone.nats.urls: `{url}` is not a NATS server address: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot start the NATS client: {0}")]
    Client(String),
}

impl NatsBackbone {
    /// Starts the client. Waits up to `connect_timeout` for the first connection; after that
    /// the gateway serves anyway, not ready (`/readyz`) and refusing publishes, while the
    /// client keeps trying.
    pub async fn connect(
        config: &NatsBackboneConfig,
        instance: &str,
        registry: &Registry,
    ) -> Result<Arc<NatsBackbone>, NatsStartError> {
        let client = connect_client(config, instance, registry, NAME).await?;
        let labels = |reason| [("backbone", NAME), ("reason", reason)];
        Ok(Arc::new(NatsBackbone {
            client,
            instance: (
                instance.to_owned(),
                meshgate_core::header::percent_encode_header(instance),
            ),
            prefix: config.subject_prefix.clone(),
            wire: config.wire_mode,
            closed: AtomicBool::new(false),
            malformed: registry.counter(metrics::BACKBONE_DROPPED, &labels("malformed")),
            subscriptions: registry.gauge(metrics::BACKBONE_SUBSCRIPTIONS, &[("backbone", NAME)]),
        }))
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }
}

/// Starts the NATS client (shared by the `nats` and `jetstream` backbones). Waits up to
/// `connect_timeout` for the first connection; after that the client keeps trying.
pub(crate) async fn connect_client(
    config: &NatsBackboneConfig,
    instance: &str,
    registry: &Registry,
    metric_backbone: &'static str,
) -> Result<async_nats::Client, NatsStartError> {
    let addrs = config
        .urls
        .iter()
        .map(|u| {
            ServerAddr::from_str(u).map_err(|e| NatsStartError::Url {
                url: u.clone(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let labels = |reason| [("backbone", metric_backbone), ("reason", reason)];
    let slow_consumer = registry.counter(metrics::BACKBONE_DROPPED, &labels("slow_consumer"));
    // The client reports every dropped message; log at most one line per interval.
    let warn_slow = Arc::new(meshgate_core::throttle::LogThrottle::new(
        SLOW_CONSUMER_LOG_INTERVAL,
    ));
    let mut options = ConnectOptions::new()
        .name(format!("meshgate {instance}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(config.connect_timeout)
        .subscription_capacity(config.subscription_capacity)
        .event_callback(move |event| {
            let slow_consumer = slow_consumer.clone();
            let warn_slow = warn_slow.clone();
            async move {
                match event {
                    async_nats::Event::SlowConsumer(sid) => {
                        slow_consumer.inc();
                        if warn_slow.ready() {
                            tracing::warn!(
                                sid,
                                "nats: a subscriber is too slow, messages dropped for it (counted in meshgate_backbone_dropped_total{{reason=\"slow_consumer\"}})"
                            );
                        }
                    }
                    async_nats::Event::Connected => tracing::info!("nats: connected"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("nats: disconnected; reconnecting")
                    }
                    other => tracing::info!(event = %other, "nats"),
                }
            }
        });
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    let client = options
        .connect(addrs)
        .await
        .map_err(|e| NatsStartError::Client(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    while client.connection_state() != State::Connected {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                urls = ?config.urls,
                "nats: not reachable yet; serving as not ready and retrying"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(client)
}

/// NATS queue group names are tokens without whitespace; MQTT share names may hold any
/// character but `/`, `+` and `#`, so others are percent-encoded.
pub(crate) fn queue_name(group: &str) -> String {
    let mut out = String::with_capacity(group.len());
    for c in group.chars() {
        if c.is_ascii_graphic() && c != '%' {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// Decrements the subscription gauge when the subscription's stream is dropped.
pub(crate) struct Counted(pub(crate) Gauge);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Backbone for NatsBackbone {
    fn name(&self) -> &'static str {
        NAME
    }

    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<(), BackboneError>> {
        Box::pin(async move {
            if self.closed.load(Ordering::Acquire) {
                return Err(BackboneError::Closed);
            }
            if !self.connected() {
                return Err(BackboneError::Unavailable(
                    "NATS is not connected; retry later".into(),
                ));
            }
            let subject = envelope.topic.to_nats_subject(&self.prefix);
            let (headers, payload) =
                nats_wire::encode(&envelope, self.wire, (&self.instance.0, &self.instance.1));
            self.client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| match e.kind() {
                    async_nats::client::PublishErrorKind::Send => {
                        BackboneError::Unavailable(e.to_string())
                    }
                    _ => BackboneError::Rejected(e.to_string()),
                })
        })
    }

    fn subscribe(
        &self,
        filter: TopicFilter,
        options: SubscribeOptions,
    ) -> BoxFuture<'_, Result<Subscription, BackboneError>> {
        Box::pin(async move {
            if self.closed.load(Ordering::Acquire) {
                return Err(BackboneError::Closed);
            }
            let mut subscribers = Vec::new();
            // `a/#` is two subjects (`a` and `a.>`); a message matches at most one of them.
            for subject in filter.to_nats_subjects(&self.prefix) {
                let sub = match &options.queue_group {
                    Some(g) => self.client.queue_subscribe(subject, queue_name(g)).await,
                    None => self.client.subscribe(subject).await,
                }
                .map_err(|e| BackboneError::Unavailable(e.to_string()))?;
                subscribers.push(sub);
            }
            // Once the server answered the flush, it has the interest: events published from
            // now on (by any instance) reach this subscription.
            self.client
                .flush()
                .await
                .map_err(|e| BackboneError::Unavailable(e.to_string()))?;
            self.subscriptions.inc();
            let counted = Counted(self.subscriptions.clone());
            let prefix = self.prefix.clone();
            let malformed = self.malformed.clone();
            // Subjects match a little more than the filter: MQTT's `#` and `+` must not match
            // topics starting with `$` (MQTT 5 §4.7.2), NATS's `>` and `*` do.
            let matcher = filter.clone();
            let stream = futures_util::stream::select_all(subscribers).filter_map(move |m| {
                let _alive = &counted;
                let delivery = nats_wire::decode_or_count(&prefix, m, &malformed)
                    .filter(|envelope| matcher.matches(&envelope.topic))
                    .map(|envelope| Delivery::new(Arc::new(envelope), None));
                futures_util::future::ready(delivery)
            });
            Ok(Subscription::new(filter, Box::pin(stream)))
        })
    }

    fn is_ready(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && self.connected()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.closed.swap(true, Ordering::AcqRel) {
                return;
            }
            // Flushes what was published and ends every subscription once its buffered
            // messages are consumed.
            if let Err(e) = self.client.drain().await {
                tracing::debug!(error = %e, "nats: drain");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_are_nats_tokens() {
        assert_eq!(queue_name("mqtt-share:g1"), "mqtt-share:g1");
        assert_eq!(queue_name("mqtt-share:a b%"), "mqtt-share:a%20b%25");
        assert_eq!(queue_name("é"), "%C3%A9");
    }
}
