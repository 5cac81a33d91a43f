//! The NATS core backbone: several gateway instances on one NATS server or cluster.
//!
//! Events travel on `<subject_prefix>.<topic>` (the core `Topic` mapping) in the wire format of
//! [`crate::nats::wire`]. An event published on this instance reaches this instance's own
//! subscribers in process (an in-memory backbone inside this one, sized by `backbone.memory`)
//! and every other instance through NATS: the publishing connection is opened with `no_echo`,
//! so the server never sends an instance its own events back, and each subscriber gets each
//! event once whichever instance published it. Other instances' events come through one NATS
//! subscription per distinct filter, shared by the subscribers with that filter
//! ([`crate::nats::fanout`]). Queue groups (shared subscriptions) are NATS
//! queue groups on a second connection, with echo: the server picks one member among all
//! instances, this one included. The origin (instance and connection) travels in a header,
//! for MQTT no-local. Events are handed to the publishing connection unencoded: its writer
//! task encodes them ([`client::Client::publish_later`]), not the publisher's task.
//!
//! Guarantee: at most once (NATS core). `publish` refuses (`Unavailable`) while the client is
//! not connected, so a client is told to retry rather than acknowledged. An acknowledged
//! publish (`qos` > 0: HTTP, WebSocket, AMQP, MQTT QoS 1/2) resolves only once nats-server
//! answered the `PING` the writer put after the write that held it, that is once the server read
//! the event and handed it to the subscriptions it had (decision 0050); if the connection ends
//! first it is refused (`Unavailable`: the client retries; the event may have reached
//! subscribers, so a retry can duplicate it) and counted as
//! `meshgate_backbone_dropped_total{backbone="nats",reason="disconnected"}`. An MQTT QoS 0
//! publish is done once queued for the writer (lost uncounted if the connection drops first). A subscriber that falls more
//! than `subscription_capacity` messages or `subscription_bytes` behind loses messages (NATS
//! "slow consumer"), counted as
//! `meshgate_backbone_dropped_total{backbone="nats",reason="slow_consumer"}`. Malformed
//! messages from other NATS programs (not an event, or a header block with a name that is not a
//! token or a value with control characters) are skipped and counted (`reason="malformed"`);
//! messages over the server's `max_payload` are skipped unread (`reason="too_large"`); an event
//! whose headers could not be written valid is not sent (`reason="unrepresentable"`). Local
//! deliveries follow `backbone.memory.full_policy` (counted with `backbone="nats-local"`).
//! A connection or fan-out task that panics is logged, counted
//! (`meshgate_errors_total{adapter="backbone",kind="task_panicked"}`) and restarted.
//!
//! The client ([`crate::nats::client`], not async-nats: see there why) reconnects on its own
//! (with backoff, forever) and re-subscribes.

use meshgate_core::metrics::{DropReason, ErrorKind};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::StreamExt;
use meshgate_config::{MemoryBackboneConfig, NatsBackboneConfig, NatsWireMode};
use meshgate_core::metrics::{self, Counter, Gauge, Registry};
use meshgate_core::{
    Backbone, BackboneError, BackboneSubscription, BoxFuture, Delivery, Envelope, SubscribeOptions,
    Subscription, TopicFilter, TryPublish,
};

use tokio::sync::oneshot;

use self::client::ClientError;
use self::fanout::Fanout;
use self::wire::{HeaderError, HeaderSource, RawHeaderBlock, RawHeaders};
use crate::error::BackboneStartError;
use crate::memory::MemoryBackbone;

pub(crate) mod client;
mod connection;
pub(crate) mod connector;
mod fanout;
pub(crate) mod nkey;
mod overlap;
pub(crate) mod proto;
mod servers;
#[cfg(test)]
pub(crate) mod testing;
pub(crate) mod wire;

const NAME: &str = "nats";

#[derive(Debug)]
pub struct NatsBackbone {
    /// Publishes, and subscribes for plain subscriptions; `no_echo`, so this instance's own
    /// events do not come back to it (they go to `local`).
    client: client::Client,
    /// Queue-group subscriptions, with echo: the group may pick a member on this instance for
    /// an event published here.
    group_client: client::Client,
    /// This instance's plain subscribers, for the events published here.
    local: Arc<MemoryBackbone>,
    /// This instance's plain subscribers, for other instances' events: one NATS subscription
    /// per distinct filter.
    fanout: Fanout,
    /// Queue size of a plain subscriber for other instances' events, unless it asks for one.
    subscription_capacity: usize,
    /// Byte budget of that queue.
    subscription_bytes: usize,
    prefix: String,
    closed: AtomicBool,
    malformed: Counter,
    subscriptions: Gauge,
    /// This instance's queue-group subscriptions, counted by filter and group (for
    /// [`Backbone::subscriptions`]).
    queue_groups: QueueGroups,
}

/// Queue-group subscriptions by filter and group: how many on this instance.
type QueueGroups = Arc<Mutex<HashMap<(TopicFilter, String), usize>>>;

/// Counts one queue-group subscription in [`QueueGroups`] while it lives.
struct InQueueGroup {
    groups: QueueGroups,
    key: (TopicFilter, String),
}

impl InQueueGroup {
    fn new(groups: &QueueGroups, filter: &TopicFilter, group: &str) -> InQueueGroup {
        let key = (filter.clone(), group.to_owned());
        *lock(groups).entry(key.clone()).or_default() += 1;
        InQueueGroup {
            groups: groups.clone(),
            key,
        }
    }
}

impl Drop for InQueueGroup {
    fn drop(&mut self) {
        let mut groups = lock(&self.groups);
        if let Some(n) = groups.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                groups.remove(&self.key);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counts only: usable after a panic elsewhere.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NatsBackbone {
    /// Starts the client. Waits up to `connect_timeout` for the first connection; after that
    /// the gateway serves anyway, not ready (`/readyz`) and refusing publishes, while the
    /// client keeps trying.
    pub async fn connect(
        config: &NatsBackboneConfig,
        local: &MemoryBackboneConfig,
        instance: &str,
        registry: &Registry,
    ) -> Result<Arc<NatsBackbone>, BackboneStartError> {
        for url in &config.urls {
            connector::parse_url(url).map_err(|e| BackboneStartError::Url {
                url: url.clone(),
                source: Box::new(e),
            })?;
        }
        // A bad NKey file is a start error naming its key, not a retry loop.
        if let Some(nkey) = &config.nkey {
            let (path, key) = nkey.file();
            nkey::load(path, key).map_err(BackboneStartError::Config)?;
        }
        // One counter for both connections and the fan-out queues.
        let slow_consumer = registry.backbone_dropped(NAME, DropReason::SlowConsumer);
        let options = |echo| client_options(config, instance, echo, registry, NAME);
        // Only the publishing connection encodes events (on its writer's task).
        let publishing = client::Options {
            later: Some(Arc::new(CoreWire {
                prefix: config.subject_prefix.clone(),
                wire: config.wire_mode,
                instance: (
                    instance.to_owned(),
                    meshgate_core::header::percent_encode_header(instance),
                ),
                unrepresentable: registry.backbone_dropped(NAME, DropReason::Unrepresentable),
            })),
            ..options(false)
        };
        let (client, group_client) = tokio::join!(
            client::Client::connect(publishing),
            client::Client::connect(options(true)),
        );
        if !(client.is_connected() && group_client.is_connected()) {
            tracing::warn!(
                urls = ?config.urls,
                "nats: not reachable yet; serving as not ready and retrying"
            );
        }
        Ok(Arc::new(NatsBackbone {
            client,
            group_client,
            local: MemoryBackbone::with_metrics_label(local.clone(), registry, "nats-local"),
            fanout: Fanout::new(slow_consumer, task_panicked(registry)),
            subscription_capacity: config.subscription_capacity,
            subscription_bytes: config.subscription_bytes,
            prefix: config.subject_prefix.clone(),
            closed: AtomicBool::new(false),
            malformed: registry.backbone_dropped(NAME, DropReason::Malformed),
            subscriptions: registry.gauge(metrics::BACKBONE_SUBSCRIPTIONS, &[("backbone", NAME)]),
            queue_groups: QueueGroups::default(),
        }))
    }

    fn connected(&self) -> bool {
        self.client.is_connected() && self.group_client.is_connected()
    }

    /// NATS subscriptions for `filter` on `client`, as one stream of deliveries.
    async fn nats_subscription(
        &self,
        client: &client::Client,
        filter: &TopicFilter,
        queue_group: Option<&str>,
    ) -> Result<futures_util::stream::BoxStream<'static, Delivery>, BackboneError> {
        nats_subscription(
            client,
            self.prefix.clone(),
            self.malformed.clone(),
            filter,
            queue_group,
        )
        .await
    }

    /// Queues the event for the client's writer, which encodes it; with `confirm`, told once
    /// nats-server read it ([`client::Confirm`]).
    fn send(
        &self,
        envelope: &Arc<Envelope>,
        confirm: Option<client::Confirm>,
    ) -> Result<(), ClientError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        self.client.publish_later(envelope, confirm)
    }

    /// An acknowledged publish (`qos` > 0): queued at once when there is room (so a
    /// connection's publishes are written in the order they were made), then resolves once
    /// nats-server confirmed it read the event; only then do this instance's subscribers get
    /// it, so a refused publish, which the client retries, was delivered nowhere here.
    fn publish_confirmed(&self, envelope: Arc<Envelope>) -> TryPublish<'_> {
        let (tx, rx) = oneshot::channel();
        match self.send(&envelope, Some(tx)) {
            Ok(()) => TryPublish::Pending(Box::pin(self.confirmed(envelope, rx))),
            Err(ClientError::Full) => TryPublish::Pending(Box::pin(async move {
                // Backpressure: wait for the writer, then the same again.
                let rx = loop {
                    self.client.room().await;
                    let (tx, rx) = oneshot::channel();
                    match self.send(&envelope, Some(tx)) {
                        Ok(()) => break rx,
                        Err(ClientError::Full) => continue,
                        Err(e) => return Err(client_error(e)),
                    }
                };
                self.confirmed(envelope, rx).await
            })),
            Err(e) => TryPublish::Done(Err(client_error(e))),
        }
    }

    /// Waits for nats-server to confirm `envelope` (`rx`), then delivers it to this instance's
    /// subscribers.
    async fn confirmed(
        &self,
        envelope: Arc<Envelope>,
        rx: oneshot::Receiver<Result<(), ClientError>>,
    ) -> Result<(), BackboneError> {
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(client_error(e)),
            // Counted in meshgate_backbone_dropped_total{reason="disconnected"}.
            Err(_) => {
                return Err(BackboneError::Unavailable(
                    "the NATS connection ended before nats-server confirmed it read the event \
                     (it may have reached subscribers); retry later"
                        .to_owned(),
                ));
            }
        }
        match self.local.try_publish_shared(envelope) {
            TryPublish::Done(r) => r,
            TryPublish::Pending(f) => f.await,
        }
    }
}

/// NATS subscriptions for `filter` on `client`, as one stream of deliveries (messages that
/// are not events of `filter` skipped, those not CloudEvents counted in `malformed`).
async fn nats_subscription(
    client: &client::Client,
    prefix: String,
    malformed: Counter,
    filter: &TopicFilter,
    queue_group: Option<&str>,
) -> Result<futures_util::stream::BoxStream<'static, Delivery>, BackboneError> {
    let messages = raw_subscription(client, &prefix, filter, queue_group).await?;
    let decode = decoder(prefix, malformed, filter);
    Ok(Box::pin(messages.filter_map(move |m| {
        futures_util::future::ready(decode(m))
    })))
}

/// NATS subscriptions for `filter` on `client`, as one stream of undecoded messages (see
/// [`decoder`]).
async fn raw_subscription(
    client: &client::Client,
    prefix: &str,
    filter: &TopicFilter,
    queue_group: Option<&str>,
) -> Result<futures_util::stream::BoxStream<'static, client::Msg>, BackboneError> {
    let queue = queue_group.map(queue_name);
    let mut subscribers = Vec::new();
    // `a/#` is two subjects (`a` and `a.>`); a message matches at most one of them.
    for subject in filter.to_nats_subjects(prefix) {
        subscribers.push(
            client
                .subscribe(&subject, queue.as_deref())
                .map_err(client_error)?,
        );
    }
    // Once the server answered the flush, it has the interest: events published from
    // now on (by any instance) reach this subscription.
    client.flush().await.map_err(client_error)?;
    Ok(Box::pin(futures_util::stream::select_all(subscribers)))
}

/// What turns a message of `filter`'s subscription into a delivery: `None` for a message
/// that is not a CloudEvent (counted in `malformed`) or not an event of `filter`. Subjects
/// match a little more than the filter: MQTT's `#` and `+` must not match topics starting
/// with `$` (MQTT 5 §4.7.2), NATS's `>` and `*` do.
fn decoder(
    prefix: String,
    malformed: Counter,
    filter: &TopicFilter,
) -> Arc<dyn Fn(client::Msg) -> Option<Delivery> + Send + Sync> {
    let matcher = filter.clone();
    Arc::new(move |m| {
        decode_message(&prefix, m, &malformed)
            .filter(|envelope| matcher.matches(&envelope.topic))
            .map(|envelope| Delivery::new(Arc::new(envelope), None))
    })
}

/// How the publishing connection's writer encodes this instance's events
/// ([`client::Client::publish_later`]).
#[derive(Debug)]
struct CoreWire {
    prefix: String,
    wire: NatsWireMode,
    /// This instance's id, and percent-encoded for the origin header.
    instance: (String, String),
    /// Events skipped because a header line could not be written valid.
    unrepresentable: Counter,
}

impl client::EncodeLater for CoreWire {
    fn encode(&self, envelope: &Envelope, frame: &mut client::Frame) -> Result<(), HeaderError> {
        envelope
            .topic
            .push_nats_subject(&self.prefix, &mut frame.subject);
        let mut headers = RawHeaders::reuse(std::mem::take(&mut frame.headers));
        wire::encode_headers(
            envelope,
            self.wire,
            (&self.instance.0, &self.instance.1),
            &mut headers,
        );
        frame.headers = match headers.finish() {
            Ok(block) => block,
            Err(reason) => {
                self.unrepresentable.inc();
                tracing::warn!(topic = %envelope.topic, reason = %reason, "nats: an event that cannot be sent as a NATS message was skipped (counted in meshgate_backbone_dropped_total{{reason=\"unrepresentable\"}})");
                frame.clear();
                return Err(reason);
            }
        };
        wire::write_payload(envelope, self.wire, &mut frame.payload);
        Ok(())
    }

    fn size_bound(&self, envelope: &Envelope) -> usize {
        wire::size_bound(envelope, self.wire)
    }

    fn subject_bound(&self, envelope: &Envelope) -> usize {
        // Each topic byte becomes itself, `.` or a `%XX` escape.
        self.prefix.len() + 1 + envelope.topic.as_str().len() * 3
    }
}

/// `meshgate_errors_total{adapter="backbone",kind="task_panicked"}`: a backbone task (a NATS
/// connection, a fan-out) that ended by a panic and was restarted.
pub(crate) fn task_panicked(registry: &Registry) -> Counter {
    registry.error_counter("backbone", ErrorKind::TaskPanicked)
}

/// The envelope of a received message, or `None` (counted in `malformed`) when it is not a
/// valid event. A panic in the decoder (a bug: it refuses bad input with errors) costs that one
/// message, counted and logged, not the task reading the subscription (review F8: a fan-out
/// task, an MQTT session, an AMQP sink). The decoder only reads `m`: nothing is left half-done.
pub(crate) fn decode_message(
    prefix: &str,
    m: client::Msg,
    malformed: &Counter,
) -> Option<Envelope> {
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_message_unguarded(prefix, m, malformed)
    }));
    decoded.unwrap_or_else(|panic| {
        malformed.inc();
        tracing::error!(
            panic = connector::panic_message(&*panic),
            "nats: decoding a received message panicked; the message was skipped (counted as malformed)"
        );
        None
    })
}

fn decode_message_unguarded(prefix: &str, m: client::Msg, malformed: &Counter) -> Option<Envelope> {
    let Ok(subject) = std::str::from_utf8(&m.subject) else {
        malformed.inc();
        return None;
    };
    let block = m.headers.as_deref().map(RawHeaderBlock);
    wire::decode_or_count(
        prefix,
        subject,
        block.as_ref().map(|b| b as &dyn HeaderSource),
        m.payload,
        malformed,
    )
}

/// Options of meshgate's own NATS client for `config`; its counters labelled
/// `backbone="<backbone>"`.
pub(crate) fn client_options(
    config: &NatsBackboneConfig,
    instance: &str,
    echo: bool,
    registry: &Registry,
    backbone: &'static str,
) -> client::Options {
    let dropped = |reason| registry.backbone_dropped(backbone, reason);
    client::Options {
        urls: config.urls.clone(),
        name: format!("meshgate {instance}"),
        echo,
        user: config.user.clone().filter(|_| config.password.is_some()),
        password: config.password.clone().filter(|_| config.user.is_some()),
        token: config.token.clone(),
        tls: config.tls.clone(),
        nkey: config.nkey.clone(),
        connect_timeout: config.connect_timeout,
        subscription_capacity: config.subscription_capacity,
        subscription_bytes: config.subscription_bytes,
        slow_consumer: dropped(DropReason::SlowConsumer),
        too_large: dropped(DropReason::TooLarge),
        panicked: task_panicked(registry),
        disconnects: registry.counter(metrics::BACKBONE_DISCONNECTS, &[("backbone", backbone)]),
        discarded: dropped(DropReason::Disconnected),
        later: None,
        max_control_line: config.max_control_line,
    }
}

pub(crate) fn client_error(e: ClientError) -> BackboneError {
    match e {
        ClientError::NotConnected => BackboneError::Unavailable(e.to_string()),
        ClientError::Closed => BackboneError::Closed,
        ClientError::TooLarge { .. }
        | ClientError::BadSubject(_)
        | ClientError::Unrepresentable(_) => BackboneError::Rejected(e.to_string()),
        ClientError::LineTooLong { .. } => BackboneError::TopicTooLong(e.to_string()),
        ClientError::Full => BackboneError::Saturated(e.to_string()),
    }
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
        match self.try_publish(envelope) {
            TryPublish::Done(r) => Box::pin(std::future::ready(r)),
            TryPublish::Pending(f) => f,
        }
    }

    fn try_publish(&self, envelope: Envelope) -> TryPublish<'_> {
        // Shared by the NATS writer, which encodes it, and this instance's subscribers.
        let envelope = Arc::new(envelope);
        if envelope.qos > 0 {
            // Acknowledged to the client (HTTP 202, MQTT PUBACK/PUBREC, WebSocket, AMQP
            // basic.ack): only once nats-server read it (issue 19 item 2, decision 0050).
            return self.publish_confirmed(envelope);
        }
        // MQTT QoS 0: at most once, no acknowledgement; done once appended. To NATS first: a
        // refused publish, which the client retries, was delivered nowhere.
        match self.send(&envelope, None) {
            Ok(()) => {}
            Err(ClientError::Full) => {
                // Backpressure: wait for the writer, then the same again.
                return TryPublish::Pending(Box::pin(async move {
                    loop {
                        self.client.room().await;
                        match self.send(&envelope, None) {
                            Ok(()) => break,
                            Err(ClientError::Full) => continue,
                            Err(e) => return Err(client_error(e)),
                        }
                    }
                    match self.local.try_publish_shared(envelope) {
                        TryPublish::Done(r) => r,
                        TryPublish::Pending(f) => f.await,
                    }
                }));
            }
            Err(e) => return TryPublish::Done(Err(client_error(e))),
        }
        // Other instances have it (as far as NATS core goes); now this one's subscribers.
        self.local.try_publish_shared(envelope)
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
            let mut listed = None;
            let stream = match options.queue_group.as_deref() {
                // Shared across instances: NATS picks the member, this instance's included.
                Some(group) => {
                    let stream = self
                        .nats_subscription(&self.group_client, &filter, Some(group))
                        .await?;
                    listed = Some(InQueueGroup::new(&self.queue_groups, &filter, group));
                    stream
                }
                None => {
                    let capacity = options.capacity.unwrap_or(self.subscription_capacity);
                    // Made again by the fan-out should its task end by a panic.
                    let (client, prefix, malformed) = (
                        self.client.clone(),
                        self.prefix.clone(),
                        self.malformed.clone(),
                    );
                    let decode = decoder(prefix.clone(), malformed, &filter);
                    let subscribe = move |filter: TopicFilter| {
                        let (client, prefix) = (client.clone(), prefix.clone());
                        Box::pin(
                            async move { raw_subscription(&client, &prefix, &filter, None).await },
                        ) as BoxFuture<'static, _>
                    };
                    let remote = self
                        .fanout
                        .join(
                            &filter,
                            (capacity, self.subscription_bytes),
                            subscribe,
                            decode,
                        )
                        .await?;
                    let local = self
                        .local
                        .subscribe(
                            filter.clone(),
                            SubscribeOptions {
                                capacity: options.capacity,
                                ..SubscribeOptions::default()
                            },
                        )
                        .await?;
                    Box::pin(futures_util::stream::select(local, remote))
                }
            };
            self.subscriptions.inc();
            let counted = Counted(self.subscriptions.clone());
            let stream = stream.map(move |d| {
                let _alive = (&counted, &listed);
                d
            });
            Ok(Subscription::new(filter, Box::pin(stream)))
        })
    }

    fn publish_round_trips(&self) -> bool {
        // An acknowledged publish waits for nats-server's PONG: MQTT and AMQP keep several in
        // flight per connection (as over JetStream), so that one PING covers many of them.
        true
    }

    fn qos0_round_trips(&self) -> bool {
        // MQTT QoS 0 is settled once queued for the writer.
        false
    }

    fn delivers_in_process(&self) -> bool {
        // This instance's own subscribers get its events from the in-memory part.
        true
    }

    fn subscriptions(&self) -> Vec<BackboneSubscription> {
        use meshgate_core::backbone::subscription_state::DISCONNECTED;
        // Other instances' events: one NATS subscription per filter, on `client`.
        let mut out = self.fanout.list(&self.prefix);
        if !self.client.is_connected() {
            out.iter_mut().for_each(|s| s.worsen(DISCONNECTED));
        }
        // Queue groups: each member its own NATS subscription, on `group_client`.
        let group_connected = self.group_client.is_connected();
        for ((filter, group), n) in lock(&self.queue_groups).iter() {
            let mut entry = BackboneSubscription::new(filter.as_str(), Some(group.clone()), NAME);
            entry.subscribers = *n;
            entry.names = filter.to_nats_subjects(&self.prefix);
            if !group_connected {
                entry.worsen(DISCONNECTED);
            }
            out.push(entry);
        }
        // This instance's own events, in process.
        out.extend(self.local.subscriptions_as("nats-local"));
        out
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
            tokio::join!(self.client.drain(), self.group_client.drain());
            self.local.close().await;
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
