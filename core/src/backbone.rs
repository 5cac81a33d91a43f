//! The bus every adapter publishes to and subscribes from. Adapters only ever see
//! `Arc<dyn Backbone>`, so switching between the in-memory, NATS and JetStream backbones is a
//! config change.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;

use crate::event::Event;
use crate::topic::{Topic, TopicFilter};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where an event entered the mesh: the gateway instance and the connection on it. Carried in
/// backbone metadata, never as a CloudEvents attribute; used to avoid loops and for MQTT
/// no-local.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub instance: Arc<str>,
    /// Connection id, unique within the instance (0 for sources without connections).
    pub connection: u64,
}

/// An event on its way through the backbone. One envelope is shared (`Arc`) by every
/// subscriber it is delivered to.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub topic: Topic,
    pub event: Arc<Event>,
    pub origin: Origin,
    /// Delivery guarantee the publisher asked for, in MQTT terms (0, 1, 2); subscribers get at
    /// most this. Publishers without the notion (HTTP, WebSocket) use 1.
    pub qos: u8,
    /// Published as an MQTT retained message (MQTT 5 subscribers with Retain As Published see
    /// the flag). False for publishers without the notion.
    pub retain: bool,
    /// MQTT 5 request/response and expiry properties of the publish, forwarded to MQTT 5
    /// subscribers unaltered (they are not CloudEvents attributes).
    pub mqtt: Option<Arc<MqttProperties>>,
    /// Published over MQTT as a plain payload, not a CloudEvent: `event` is its wrapping, and
    /// MQTT subscribers may get the message as it was published (`mqtt.plain_messages`: the
    /// data as payload, with `mqtt`'s Content Type and User Properties). Here rather than in
    /// `mqtt`, which a plain 3.1.1 publish would then need allocated for every message.
    pub plain: bool,
    /// Who answers for this copy of the event: the publishing principal's name for a client's
    /// event, `dead-letter trigger:<name>` / `reply trigger:<name>` for a trigger's copies.
    /// Backbones that deduplicate by `source` + `id` (JetStream) do so within one scope and
    /// topic, so one principal cannot suppress another's event, and a dead letter is not taken
    /// for the event it copies. `None` (events from the bus, `$SYS`): `source` + `id` alone.
    pub dedup_scope: Option<Arc<str>>,
    /// The JSON format of `event` (UTF-8), encoded once on first use and shared by every
    /// subscriber that needs it (a WebSocket fan-out to 500 browsers encodes once, not 500
    /// times). `Bytes`, so that payloads and frames share it without a copy.
    json: std::sync::OnceLock<bytes::Bytes>,
}

impl Envelope {
    pub fn new(topic: Topic, event: Arc<Event>, origin: Origin) -> Self {
        Envelope {
            topic,
            event,
            origin,
            qos: 1,
            retain: false,
            mqtt: None,
            plain: false,
            dedup_scope: None,
            json: std::sync::OnceLock::new(),
        }
    }

    /// The same envelope with a deduplication scope (see [`Envelope::dedup_scope`]).
    pub fn with_dedup_scope(mut self, scope: impl Into<Arc<str>>) -> Self {
        self.dedup_scope = Some(scope.into());
        self
    }

    /// The same envelope with the publisher's QoS (MQTT).
    pub fn with_qos(mut self, qos: u8) -> Self {
        self.qos = qos.min(2);
        self
    }

    /// The same envelope, marked as a plain MQTT message (see [`Envelope::plain`]).
    pub fn with_plain(mut self, plain: bool) -> Self {
        self.plain = plain;
        self
    }

    /// The same envelope with MQTT 5 properties to forward.
    pub fn with_mqtt(mut self, mqtt: MqttProperties) -> Self {
        self.mqtt = (!mqtt.is_empty()).then(|| Arc::new(mqtt));
        self
    }

    /// The same envelope, marked as published with the MQTT RETAIN flag.
    pub fn with_retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    /// The same envelope with `json` as its JSON format, for [`Envelope::json`] to hand out
    /// instead of encoding. Only for bytes that are `event`'s JSON format: those it was decoded
    /// from, when another meshgate instance encoded them.
    pub fn with_json(self, json: bytes::Bytes) -> Self {
        let _ = self.json.set(json);
        self
    }

    /// Forgets the JSON format made so far: for the one who changed `event` (tracing sets its
    /// trace context at ingress).
    pub(crate) fn forget_json(&mut self) {
        self.json = std::sync::OnceLock::new();
    }

    /// This envelope with `event` in place of its event (a delivery's own copy, see
    /// `trace::deliver`); the JSON format is made again for it when asked for.
    pub fn with_event(&self, event: Arc<Event>) -> Envelope {
        Envelope {
            topic: self.topic.clone(),
            event,
            origin: self.origin.clone(),
            qos: self.qos,
            retain: self.retain,
            mqtt: self.mqtt.clone(),
            plain: self.plain,
            dedup_scope: self.dedup_scope.clone(),
            json: std::sync::OnceLock::new(),
        }
    }

    /// The JSON format of `event` if something asked for it already ([`Envelope::json`]).
    pub fn json_if_encoded(&self) -> Option<&bytes::Bytes> {
        self.json.get()
    }

    /// The event in the JSON format (UTF-8 text), encoded at most once per envelope.
    pub fn json(&self) -> bytes::Bytes {
        self.json
            .get_or_init(|| bytes::Bytes::from(crate::json::encode(&self.event)))
            .clone()
    }
}

/// MQTT 5 PUBLISH properties a broker must forward unaltered (MQTT 5 §3.3.2.3): they travel
/// with the envelope, on NATS as `Meshgate-Mqtt-*` headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MqttProperties {
    pub response_topic: Option<String>,
    pub correlation_data: Option<bytes::Bytes>,
    /// Payload Format Indicator 1: the payload is UTF-8.
    pub payload_utf8: bool,
    /// Message Expiry Interval, as the time it ends (milliseconds since the Unix epoch), so
    /// that every hop forwards what remains of it.
    pub expires_at_ms: Option<u64>,
    /// A plain message's (see [`Envelope::plain`]) Content Type, as the client sent it (any UTF-8 string: MQTT does not
    /// require a media type; only a valid one also became the event's `datacontenttype`).
    pub content_type: Option<String>,
    /// A plain message's (see [`Envelope::plain`]) User Properties, all of them, in order, duplicates kept
    /// [MQTT-3.3.2-17], [MQTT-3.3.2-18].
    pub user_properties: Vec<(String, String)>,
}

impl MqttProperties {
    pub fn is_empty(&self) -> bool {
        self == &MqttProperties::default()
    }
}

/// Milliseconds since the Unix epoch (for [`MqttProperties::expires_at_ms`]).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Retained messages shared by the gateway instances on one backbone: the last retained event
/// per topic.
pub trait RetainedStore: Send + Sync {
    /// Stores `envelope` as its topic's retained message.
    fn set<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), BackboneError>>;
    /// Removes the topic's retained message.
    fn clear<'a>(&'a self, topic: &'a Topic) -> BoxFuture<'a, Result<(), BackboneError>>;
    /// Up to `limit` retained messages whose topic matches `filter`, together at most
    /// `max_bytes` (each counts its topic and its event's JSON encoding), and how many more
    /// match. Only those returned are read, plus at most one that did not fit: once a message
    /// read does not fit in what is left of `max_bytes`, no more are read, the rest are only
    /// counted (one SUBSCRIBE must not make the store read every match into memory).
    fn matching<'a>(
        &'a self,
        filter: &'a TopicFilter,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'a, Result<(Vec<Envelope>, u64), BackboneError>>;
}

/// Persistent MQTT sessions kept by the backbone for every instance (JetStream: a KV bucket
/// for the session records, durable consumers for the queued messages), so a device can
/// reconnect to another gateway instance and find its session.
///
/// Records are opaque here (the MQTT adapter owns their format). An instance holding a session
/// (its client connected there, or the session parked there waiting for it) is asked to let
/// go of it with [`SessionStore::release`] before another instance takes it.
pub trait SessionStore: Send + Sync {
    /// The stored record of `client_id` and its revision.
    fn load<'a>(
        &'a self,
        client_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredRecord>, BackboneError>>;
    /// Saves `record` if the stored one is still at `revision` (`None`: there is none), so two
    /// instances cannot both take a session: `Ok(Some(new revision))`, or `Ok(None)` when
    /// another writer came first.
    fn save<'a>(
        &'a self,
        client_id: &'a str,
        record: Vec<u8>,
        revision: Option<u64>,
    ) -> BoxFuture<'a, Result<Option<u64>, BackboneError>>;
    /// Removes the record if it is still at `revision`.
    fn remove<'a>(
        &'a self,
        client_id: &'a str,
        revision: u64,
    ) -> BoxFuture<'a, Result<(), BackboneError>>;
    /// Deletes a durable subscription ([`SubscribeOptions::durable`]) and what it kept.
    fn delete_durable<'a>(
        &'a self,
        name: &'a str,
        filter: &'a TopicFilter,
    ) -> BoxFuture<'a, Result<(), BackboneError>>;
    /// Asks gateway instance `instance` to let go of `client_id`'s session (close its
    /// connection, save the record, stop pulling). Resolves when it did, or at once when that
    /// instance is not there; `Err` when it did not answer within `within`.
    fn release<'a>(
        &'a self,
        instance: &'a str,
        client_id: &'a str,
        within: Duration,
    ) -> BoxFuture<'a, Result<(), BackboneError>>;
    /// Release requests addressed to this instance: a client id each, with the channel to
    /// answer on once the session is let go.
    fn release_requests(
        &self,
    ) -> BoxFuture<
        '_,
        Result<futures_util::stream::BoxStream<'static, ReleaseRequest>, BackboneError>,
    >;
}

/// Documents every gateway instance on the backbone shares, by name (JetStream: a KV bucket):
/// the triggers made through the admin API, so that each instance runs the same set.
pub trait SharedDocuments: Send + Sync {
    /// Stores `document` under `name` (replacing what was there).
    fn put<'a>(
        &'a self,
        name: &'a str,
        document: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), BackboneError>>;
    /// Removes `name`'s document.
    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), BackboneError>>;
    /// Every stored document, then every change, as `(name, Some(document))` for a put and
    /// `(name, None)` for a delete. Ends when the backbone's connection is lost; watch again.
    fn watch(&self) -> BoxFuture<'_, Result<DocumentChanges, BackboneError>>;
}

/// What [`SharedDocuments::watch`] yields: a name, and its document (`None`: deleted).
pub type DocumentChanges = futures_util::stream::BoxStream<'static, (String, Option<Vec<u8>>)>;

/// A session record as stored, and its revision.
pub type StoredRecord = (Vec<u8>, u64);

/// Another instance asks this one to let go of a session ([`SessionStore::release_requests`]).
/// Dropping the request answers the requester: drop it once the session is let go (or when
/// there was nothing to let go).
pub struct ReleaseRequest {
    pub client_id: String,
    answer: Option<Box<dyn FnOnce() + Send>>,
}

impl ReleaseRequest {
    pub fn new(client_id: String, answer: Box<dyn FnOnce() + Send>) -> Self {
        ReleaseRequest {
            client_id,
            answer: Some(answer),
        }
    }
}

impl fmt::Debug for ReleaseRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseRequest")
            .field("client_id", &self.client_id)
            .finish()
    }
}

impl Drop for ReleaseRequest {
    fn drop(&mut self) {
        if let Some(answer) = self.answer.take() {
            answer();
        }
    }
}

/// A subscription that outlives its subscriber: the backbone keeps what matches for `name`
/// until a subscriber with the same name comes back (on any instance), for `ttl` after the
/// last one left, or until [`SessionStore::delete_durable`].
#[derive(Debug, Clone)]
pub struct Durable {
    pub name: String,
    pub ttl: Duration,
}

/// Why the backbone did not take or deliver an event.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackboneError {
    /// The backbone is full (a subscriber queue stayed full past the block timeout). The client
    /// should retry later.
    #[error("backbone saturated: {0}")]
    Saturated(String),
    /// The backbone cannot be reached right now (e.g. NATS disconnected). Retry later.
    #[error("backbone unavailable: {0}")]
    Unavailable(String),
    /// The backbone refused this event for good (e.g. too large). Do not retry.
    #[error("backbone rejected the event: {0}")]
    Rejected(String),
    /// The backbone cannot carry a topic, topic filter or shared-subscription group this long
    /// (on NATS: its protocol line would be over the server's `max_control_line`, and the
    /// server would close the connection every client shares). Do not retry; a shorter one
    /// may go.
    #[error("backbone refused the topic: {0}")]
    TopicTooLong(String),
    /// The backbone is shutting down.
    #[error("backbone is closed")]
    Closed,
}

impl BackboneError {
    /// Whether the same request may succeed if retried later (HTTP 503 / MQTT "server busy"
    /// rather than 4xx / "implementation specific error").
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            BackboneError::Rejected(_) | BackboneError::TopicTooLong(_)
        )
    }
}

/// Options of one subscription.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// Members of the same queue group share the events: each goes to one of them.
    pub queue_group: Option<String>,
    /// Capacity of this subscriber's queue; `None` takes the backbone's default.
    pub capacity: Option<usize>,
    /// Keep the subscription for a persistent session; honoured by backbones with a
    /// [`Backbone::session_store`], ignored by the others. With a `queue_group` on JetStream:
    /// how long the group's consumer outlives its last member (`ttl`; the name is the group's).
    pub durable: Option<Durable>,
    /// Deliveries handed out and not yet settled, at most (JetStream: the consumer's
    /// `max_ack_pending`, shared by every member of a queue group); `None`: the backbone's.
    pub max_in_flight: Option<usize>,
    /// How long a delivery may stay unsettled before it is given again (JetStream's `ack_wait`,
    /// with no `backoff` steps); `None`: the backbone's. For subscribers that report progress
    /// ([`Delivery::in_progress`]) at a known interval.
    pub ack_wait: Option<Duration>,
}

/// Settles a delivery with the backbone. The in-memory backbone has nothing to settle.
pub trait Acknowledge: Send + Sync + fmt::Debug {
    /// The subscriber has handled the event (written it, or its client acknowledged it).
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BackboneError>>;
    /// The subscriber could not handle the event; redeliver after `delay` where supported.
    fn nack(
        self: Box<Self>,
        delay: Option<Duration>,
    ) -> BoxFuture<'static, Result<(), BackboneError>>;
    /// The subscriber is still working on the event: do not redeliver it yet (JetStream's
    /// `+WPI`, which restarts the consumer's `ack_wait`). Default: nothing to say.
    fn in_progress(&self) -> BoxFuture<'static, Result<(), BackboneError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// One event delivered to one subscription.
#[derive(Debug)]
pub struct Delivery {
    pub envelope: Arc<Envelope>,
    acker: Option<Box<dyn Acknowledge>>,
}

impl Delivery {
    pub fn new(envelope: Arc<Envelope>, acker: Option<Box<dyn Acknowledge>>) -> Self {
        Delivery { envelope, acker }
    }

    pub fn event(&self) -> &Arc<Event> {
        &self.envelope.event
    }

    pub fn topic(&self) -> &Topic {
        &self.envelope.topic
    }

    /// Whether the backbone waits for [`Delivery::ack`] (JetStream); false for the memory and
    /// NATS core backbones, so callers can skip the await.
    pub fn needs_ack(&self) -> bool {
        self.acker.is_some()
    }

    /// Acknowledges the delivery; a no-op where the backbone has no acknowledgements.
    pub async fn ack(self) -> Result<(), BackboneError> {
        match self.acker {
            Some(a) => a.ack().await,
            None => Ok(()),
        }
    }

    pub async fn nack(self, delay: Option<Duration>) -> Result<(), BackboneError> {
        match self.acker {
            Some(a) => a.nack(delay).await,
            None => Ok(()),
        }
    }

    /// Tells the backbone the event is still being worked on (see
    /// [`Acknowledge::in_progress`]); a no-op where the backbone has no acknowledgements.
    pub async fn in_progress(&self) -> Result<(), BackboneError> {
        match &self.acker {
            Some(a) => a.in_progress().await,
            None => Ok(()),
        }
    }
}

/// The stream of deliveries of one subscription. Dropping it unsubscribes.
pub struct Subscription {
    filter: TopicFilter,
    inner: Pin<Box<dyn Stream<Item = Delivery> + Send>>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("filter", &self.filter)
            .finish()
    }
}

impl Subscription {
    pub fn new(filter: TopicFilter, inner: Pin<Box<dyn Stream<Item = Delivery> + Send>>) -> Self {
        Subscription { filter, inner }
    }

    pub fn filter(&self) -> &TopicFilter {
        &self.filter
    }

    /// The next delivery; `None` once the backbone closed the subscription.
    pub async fn next(&mut self) -> Option<Delivery> {
        futures_util::StreamExt::next(&mut self.inner).await
    }
}

impl Stream for Subscription {
    type Item = Delivery;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// The outcome of [`Backbone::try_publish`].
pub enum TryPublish<'a> {
    /// Accepted or refused already.
    Done(Result<(), BackboneError>),
    /// The rest of the publish (waiting for room, or for an acknowledgement).
    Pending(BoxFuture<'a, Result<(), BackboneError>>),
}

impl fmt::Debug for TryPublish<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryPublish::Done(r) => f.debug_tuple("Done").field(r).finish(),
            TryPublish::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// One subscription as the backbone holds it (`GET /backbone/subscriptions`): what it keeps once
/// for this instance's subscribers of one topic filter and queue group — a NATS subscription, a
/// JetStream consumer, the in-process queues of one filter. Counts and states are a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackboneSubscription {
    /// The topic filter, in MQTT syntax (`a/+/c`, `a/#`).
    pub filter: String,
    /// The queue group whose members share the events (MQTT shared subscriptions are
    /// `mqtt-share:<share name>`, AMQP sinks `amqp-sink:<name>`, triggers their own); `None`:
    /// every subscriber gets every event.
    pub group: Option<String>,
    /// What it is: `queue` (memory backbone: the subscribers' in-process queues), `nats` (a
    /// NATS core subscription, whose events one forwarding task hands to every local
    /// subscriber of the filter; for a queue group, each member's own), `nats-local` (NATS
    /// backbone: the in-process queues that carry this instance's own events to its
    /// subscribers), `consumer` (a JetStream pull consumer per subscription, or shared by a
    /// queue group across instances), `feed` (JetStream `instance_feed`: members of the
    /// instance's one consumer).
    pub kind: &'static str,
    /// Subscribers on this instance it serves (for `nats` without a group: sharing the one
    /// NATS subscription).
    pub subscribers: usize,
    /// Events waiting in the subscribers' queues, summed over them; `None` where the backbone
    /// keeps no queue of its own for them here (NATS queue groups, JetStream consumers).
    pub queued: Option<usize>,
    /// What those queues hold at most, in events, summed over them (`None`: as for `queued`).
    pub capacity: Option<usize>,
    /// The worst state among what it covers ([`subscription_state`]): `ok`, `full` (a queue
    /// holds its capacity), `stalled` (memory `block`: a subscriber skipped until its queue is
    /// half empty), `behind` (a feed member reads the stream itself), `refused` (JetStream
    /// refused the last pull request), `repairing` (its JetStream consumer is being looked up
    /// and made again if it is gone), `disconnected` (the NATS connection it lives on is down;
    /// made again when it is back).
    pub state: &'static str,
    /// What the NATS server knows it by: the subjects (`nats`), the consumers (`consumer`,
    /// `feed`: the instance's consumer); empty in process (`queue`, `nats-local`).
    pub names: Vec<String>,
}

/// The states of a [`BackboneSubscription`], best first.
pub mod subscription_state {
    pub const OK: &str = "ok";
    pub const BEHIND: &str = "behind";
    pub const FULL: &str = "full";
    pub const STALLED: &str = "stalled";
    pub const REFUSED: &str = "refused";
    pub const REPAIRING: &str = "repairing";
    pub const DISCONNECTED: &str = "disconnected";

    const ORDER: [&str; 7] = [OK, BEHIND, FULL, STALLED, REFUSED, REPAIRING, DISCONNECTED];

    /// The worse of two states (for a subscription covering several queues or pulls).
    pub fn worse(a: &'static str, b: &'static str) -> &'static str {
        let rank = |s: &str| ORDER.iter().position(|o| *o == s).unwrap_or(ORDER.len());
        if rank(b) > rank(a) { b } else { a }
    }
}

impl BackboneSubscription {
    /// An entry without subscribers or queues yet, `ok`.
    pub fn new(filter: impl Into<String>, group: Option<String>, kind: &'static str) -> Self {
        BackboneSubscription {
            filter: filter.into(),
            group,
            kind,
            subscribers: 0,
            queued: None,
            capacity: None,
            state: subscription_state::OK,
            names: Vec::new(),
        }
    }

    /// Adds one subscriber's queue (`queued` of `capacity` events) and its state.
    pub fn add_queue(&mut self, queued: usize, capacity: usize, state: &'static str) {
        self.subscribers += 1;
        self.queued = Some(self.queued.unwrap_or(0) + queued);
        self.capacity = Some(self.capacity.unwrap_or(0) + capacity);
        self.worsen(state);
    }

    /// Makes the state `state` if that is worse.
    pub fn worsen(&mut self, state: &'static str) {
        self.state = subscription_state::worse(self.state, state);
    }

    /// The listing's order: by filter, then group (none first), then kind.
    pub fn sort_key(&self) -> (&str, Option<&str>, &str) {
        (&self.filter, self.group.as_deref(), self.kind)
    }
}

/// The event bus.
pub trait Backbone: Send + Sync + fmt::Debug {
    /// Short name for logs and metrics (`memory`, `nats`, `jetstream`).
    fn name(&self) -> &'static str;

    /// Publishes an event. Resolves only once the backbone has accepted it (for the in-memory
    /// backbone: queued for every matching subscriber; for JetStream: after the PubAck), so the
    /// caller may then acknowledge its client.
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<(), BackboneError>>;

    /// [`Backbone::publish`], done at once where the backbone can (the memory backbone when
    /// every subscriber's queue has room): no future to allocate and poll on the path every
    /// message takes. The default hands everything to `publish`.
    fn try_publish(&self, envelope: Envelope) -> TryPublish<'_> {
        TryPublish::Pending(self.publish(envelope))
    }

    /// Subscribes to a topic filter.
    fn subscribe(
        &self,
        filter: TopicFilter,
        options: SubscribeOptions,
    ) -> BoxFuture<'_, Result<Subscription, BackboneError>>;

    /// Where MQTT retained messages live when the backbone keeps them for every instance
    /// (JetStream: a KV bucket). `None`: each adapter keeps its own in memory.
    fn retained_store(&self) -> Option<&dyn RetainedStore> {
        None
    }

    /// Where persistent MQTT sessions live when the backbone keeps them for every instance
    /// (JetStream). `None`: each adapter parks its own sessions in memory.
    fn session_store(&self) -> Option<&dyn SessionStore> {
        None
    }

    /// Where the triggers made through the admin API live when the backbone keeps them for
    /// every instance (JetStream: a KV bucket). `None`: each instance keeps its own in memory.
    fn trigger_store(&self) -> Option<&dyn SharedDocuments> {
        None
    }

    /// Whether `publish` waits for a remote acknowledgement (JetStream's PubAck): then adapters
    /// keep several publishes of one connection in flight instead of one at a time.
    fn publish_round_trips(&self) -> bool {
        false
    }

    /// Whether an unacknowledged publish (`qos` 0, MQTT QoS 0) waits for a remote answer as
    /// well: on JetStream every publish waits for its PubAck; NATS core waits for the server
    /// only with acknowledged ones (decision 0050) and settles QoS 0 once queued, so adapters
    /// that pipeline ([`Backbone::publish_round_trips`]) may still handle QoS 0 inline.
    fn qos0_round_trips(&self) -> bool {
        self.publish_round_trips()
    }

    /// Whether `publish` hands events to this process's subscribers directly (the memory
    /// backbone, and NATS core for the publishing instance's own subscribers), so a publish
    /// can make another connection runnable at once; over JetStream, deliveries come back
    /// through the server.
    fn delivers_in_process(&self) -> bool {
        false
    }

    /// Whether several gateway instances may share this backbone (NATS, JetStream), so that
    /// what one instance publishes about itself (`$SYS`) must not overwrite another's.
    fn spans_instances(&self) -> bool {
        true
    }

    /// This instance's subscriptions as the backbone holds them, in no particular order (the
    /// admin API's `GET /backbone/subscriptions`). Required, so that a backbone cannot forget
    /// it and answer with an empty list.
    fn subscriptions(&self) -> Vec<BackboneSubscription>;

    /// Whether the backbone can take events now (reported on `/readyz`).
    fn is_ready(&self) -> bool;

    /// Stops taking events and lets queued deliveries drain; subscriptions end after that.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// Releases what the connections still needed after [`Backbone::close`]: called once every
    /// connection has ended, so that MQTT sessions can save their state in the session store
    /// (JetStream KV) on their way out. Default: nothing to release.
    fn finish(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::subscription_state::*;
    use super::*;

    #[test]
    fn a_subscription_over_several_queues_sums_them_and_takes_the_worst_state() {
        let mut s = BackboneSubscription::new("a/#", None, "queue");
        assert_eq!((s.subscribers, s.queued, s.capacity), (0, None, None));
        s.add_queue(3, 10, OK);
        s.add_queue(10, 10, FULL);
        s.add_queue(0, 10, BEHIND);
        assert_eq!(
            (s.subscribers, s.queued, s.capacity),
            (3, Some(13), Some(30))
        );
        assert_eq!(s.state, FULL);
        s.worsen(DISCONNECTED);
        s.worsen(STALLED);
        assert_eq!(s.state, DISCONNECTED);
        assert_eq!(worse(REFUSED, REPAIRING), REPAIRING);
        assert_eq!(worse(STALLED, FULL), STALLED);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"filter": "a/#", "group": null, "kind": "queue", "subscribers": 3,
                "queued": 13, "capacity": 30, "state": "disconnected", "names": []})
        );
    }
}
