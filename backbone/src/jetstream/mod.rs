//! The JetStream backbone: at least once, end to end, across gateway instances and restarts.
//!
//! One stream (`backbone.jetstream.stream`, subjects `<subject_prefix>.>`) keeps every event,
//! in the wire format of [`crate::nats::wire`]. `publish` resolves only after the stream's
//! PubAck, so the client's acknowledgement (HTTP 202, MQTT PUBACK/PUBREC) means "stored".
//! Each event carries a `Nats-Msg-Id` made from its `source` and `id` ([`dedup_id`]), so the
//! same CloudEvent published twice within `duplicate_window` is stored once. Publishes go out on
//! `publish_connections` NATS connections, each client connection's always on the same one
//! (stored in its order; nats-server reads each connection on one goroutine).
//!
//! Each subscription is a durable pull consumer with `DeliverPolicy::New` on one subject (a
//! filter like `a/#` needs two: `p.a` and `p.a.>`, as NATS 2.9 has one filter per consumer).
//! Durable, so it survives a NATS restart; `inactive_threshold` removes it once nobody pulls
//! (a gateway that died), and dropping the subscription deletes it. A queue group is one
//! durable consumer named after the group and subject, which every instance pulls from, so
//! members share the events across instances. Deliveries carry an acker: the adapter acks after
//! the client acknowledged (MQTT QoS 1/2) or the write succeeded; otherwise JetStream delivers
//! again after `ack_wait` (or the `backoff` steps), at most `max_deliver` times. Then the
//! server's MAX_DELIVERIES advisory makes one instance (a queue subscription) republish the
//! event to `dead_letter_subject`, counted.
//!
//! The parts: `connect` (the async-nats client, for streams, consumers and KV), `publish`
//! and `pull` (publishes, pulls and acks on meshgate's own client), `consumer` (consumer
//! names, resuming and repairing consumers), `retained` and `sessions` (the MQTT stores in
//! KV buckets).

use meshgate_core::metrics::DropReason;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_nats::connection::State;
use async_nats::jetstream::{self, stream};
use futures_util::StreamExt;
use meshgate_config::{JetStreamConfig, JetStreamSubscriptions, NatsBackboneConfig, NatsWireMode};
use meshgate_core::backbone::Acknowledge;
use meshgate_core::header::percent_encode_header;
use meshgate_core::metrics::{self, Counter, Gauge, Registry};
use meshgate_core::{
    Backbone, BackboneError, BackboneSubscription, BoxFuture, Delivery, Envelope, SubscribeOptions,
    Subscription, TopicFilter,
};

use self::connect::connect_client;
use self::consumer::{consumer_name, durable_consumer, repair_consumer, resume_durable};
use self::publish::{JsPublisher, PublishFailure};
use self::pull::{Limits, Pull, PullState};
use crate::error::BackboneStartError;
use crate::nats::Counted;
use crate::nats::client::Client;
use crate::nats::wire::{self, HeaderSink, RawHeaders};

pub(crate) mod connect;
mod consumer;
mod cursors;
mod direct;
mod documents;
mod feed;
mod member;
mod order;
mod publish;
pub(crate) mod pull;
mod replies;
mod retained;
mod sessions;

const NAME: &str = "jetstream";

/// A consumer nobody pulls from for this long is removed by the server.
const INACTIVE_THRESHOLD: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Debug)]
pub struct JetStreamBackbone {
    client: async_nats::Client,
    /// What lets async-nats's event callback move the client off a lame-duck server.
    _client_for_events: connect::ForgetOnDrop,
    js: jetstream::Context,
    /// Publishes, on a connection of meshgate's own client (see there why).
    /// `backbone.jetstream.publish_connections` of them, never empty.
    publishers: Vec<JsPublisher>,
    /// Pull requests, deliveries and their acknowledgements, on a second connection of the own
    /// client: nats-server reads each connection on one goroutine, and with publishes and acks
    /// on one connection that goroutine was the serial stage of MQTT → JetStream → MQTT.
    consumer: Client,
    retained: retained::KvRetained,
    sessions: sessions::KvSessions,
    /// The admin API's triggers (`<stream>_TRIGGERS`).
    triggers: documents::KvDocuments,
    config: JetStreamConfig,
    instance: (String, String),
    prefix: String,
    wire: NatsWireMode,
    /// `backbone.nats.max_control_line`: see [`JetStreamBackbone::check_create_request`].
    max_control_line: usize,
    closed: AtomicBool,
    malformed: Counter,
    duplicates: Counter,
    /// Events refused because a header line could not be written valid.
    unrepresentable: Counter,
    subscriptions: Gauge,
    /// `backbone.jetstream.subscriptions = "instance_feed"` (decision 0080).
    feed: Option<FeedParts>,
    /// The subscriptions with consumers of their own (not the feed's members), for
    /// [`Backbone::subscriptions`].
    listed: Arc<Listed>,
}

/// This instance's subscriptions that pull consumers of their own (or their queue group's).
#[derive(Debug, Default)]
struct Listed {
    next_id: AtomicU64,
    subs: Mutex<HashMap<u64, ListedConsumers>>,
}

/// One subscription's consumers (one per NATS subject of its filter).
#[derive(Debug)]
struct ListedConsumers {
    filter: TopicFilter,
    group: Option<String>,
    names: Vec<String>,
    pulls: Vec<PullState>,
}

impl Listed {
    fn subs(&self) -> MutexGuard<'_, HashMap<u64, ListedConsumers>> {
        // Inserts and removals only: usable after a panic elsewhere.
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists `consumers` until the result is dropped.
    fn add(self: &Arc<Self>, consumers: ListedConsumers) -> Unlist {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.subs().insert(id, consumers);
        Unlist {
            listed: self.clone(),
            id,
        }
    }

    /// By filter and group (kind `consumer`): every consumer they pull (a queue group's
    /// members share theirs), with the worst of their pulls' states.
    fn list(&self) -> Vec<BackboneSubscription> {
        let mut by: HashMap<(&TopicFilter, Option<&str>), BackboneSubscription> = HashMap::new();
        let subs = self.subs();
        for sub in subs.values() {
            let entry = by
                .entry((&sub.filter, sub.group.as_deref()))
                .or_insert_with(|| {
                    BackboneSubscription::new(sub.filter.as_str(), sub.group.clone(), "consumer")
                });
            entry.subscribers += 1;
            for name in &sub.names {
                if !entry.names.contains(name) {
                    entry.names.push(name.clone());
                }
            }
            for pull in &sub.pulls {
                entry.worsen(pull.get());
            }
        }
        by.into_values().collect()
    }
}

/// Takes a subscription off [`Listed`] when its stream is dropped.
struct Unlist {
    listed: Arc<Listed>,
    id: u64,
}

impl Drop for Unlist {
    fn drop(&mut self) {
        self.listed.subs().remove(&self.id);
    }
}

/// The parts of the instance feed (decision 0080).
#[derive(Debug)]
struct FeedParts {
    feed: Arc<feed::Feed>,
    direct: Arc<direct::DirectGet>,
    cursors: Arc<cursors::Cursors>,
    /// A member's queue: `backbone.nats.subscription_capacity` messages and
    /// `subscription_bytes` bytes.
    queue: (usize, usize),
    /// Unacknowledged deliveries a durable member stopped tracking (its bound).
    forgotten: Counter,
}

fn unavailable(e: impl std::fmt::Display) -> BackboneError {
    BackboneError::Unavailable(format!("JetStream: {e}"))
}

impl JetStreamBackbone {
    /// Refuses a subscription whose consumer cannot be created without a protocol line over
    /// the server's `max_control_line`: async-nats puts the filter subject into the request's
    /// subject (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<subject>`, on the connection the KV
    /// stores and consumer management share), and nats-server would close that connection.
    fn check_create_request(&self, name: &str, subject: &str) -> Result<(), BackboneError> {
        // `PUB `, the API prefix, two dots, the reply inbox (`_INBOX.` and two 22-character
        // NUIDs), the body's size and CRLF: under 100 bytes.
        const OVERHEAD: usize = 128;
        let len = OVERHEAD + self.config.stream.len() + name.len() + subject.len();
        if len <= self.max_control_line {
            return Ok(());
        }
        Err(BackboneError::TopicTooLong(format!(
            "the topic filter is too long for JetStream: the request that creates its consumer \
             would be about {len} bytes, over the {} bytes nats-server accepts (max_control_line; \
             backbone.nats.max_control_line)",
            self.max_control_line
        )))
    }
}

fn publish_error(e: PublishFailure) -> BackboneError {
    match e {
        PublishFailure::Client(e) => crate::nats::client_error(e),
        // A bad request (such as over the stream's max_msg_size) fails the same way again.
        PublishFailure::Refused { code: 400, .. } => {
            BackboneError::Rejected(format!("JetStream: {e}"))
        }
        e => unavailable(e),
    }
}

impl JetStreamBackbone {
    /// Connects, creates or updates the stream, and starts the dead-letter handler. NATS must be
    /// reachable within `backbone.nats.connect_timeout` (the stream is set up at start).
    pub async fn connect(
        nats: &NatsBackboneConfig,
        config: &JetStreamConfig,
        instance: &str,
        registry: &Registry,
    ) -> Result<Arc<JetStreamBackbone>, BackboneStartError> {
        let (client, client_for_events) = connect_client(nats, instance, registry, NAME).await?;
        if client.connection_state() != State::Connected {
            return Err(BackboneStartError::NotReachable {
                urls: nats.urls.clone(),
            });
        }
        let js = jetstream::new(client.clone());
        let all = if nats.subject_prefix.is_empty() {
            ">".to_owned()
        } else {
            format!("{}.>", nats.subject_prefix)
        };
        let stream_config = stream::Config {
            name: config.stream.clone(),
            subjects: vec![all],
            max_age: config.max_age,
            max_bytes: i64::try_from(config.max_bytes).unwrap_or(i64::MAX),
            num_replicas: config.replicas,
            duplicate_window: config.duplicate_window,
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            // The instance feed's subscriptions read what they missed by direct get.
            allow_direct: config.subscriptions == JetStreamSubscriptions::InstanceFeed,
            ..Default::default()
        };
        js.create_or_update_stream(stream_config)
            .await
            .map_err(|source| BackboneStartError::Stream {
                stream: config.stream.clone(),
                source,
            })?;
        let retained = retained::KvRetained::open(&js, config, nats.max_control_line)
            .await
            .map_err(|e| BackboneStartError::RetainedBucket(Box::new(e)))?;
        let cursors = match config.subscriptions {
            JetStreamSubscriptions::ConsumerEach => None,
            JetStreamSubscriptions::InstanceFeed => {
                let limits = retained::BucketLimits {
                    max_bytes: config.sessions_max_bytes,
                    max_value_size: 64,
                };
                let bucket = format!("{}_CURSORS", config.stream);
                let kv = retained::open_bucket(&js, &bucket, config.replicas, limits)
                    .await
                    .map_err(|e| BackboneStartError::SessionBucket(Box::new(e)))?;
                Some(cursors::Cursors::new(kv))
            }
        };
        let triggers = {
            let limits = retained::BucketLimits {
                max_bytes: 64 << 20,
                max_value_size: 64 * 1024,
            };
            let bucket = format!("{}_TRIGGERS", config.stream);
            let kv = retained::open_bucket(&js, &bucket, config.replicas, limits)
                .await
                .map_err(|e| BackboneStartError::SessionBucket(Box::new(e)))?;
            documents::KvDocuments::new(kv)
        };
        let sessions = sessions::KvSessions::open(
            &client,
            &js,
            config,
            &nats.subject_prefix,
            instance,
            nats.max_control_line,
            cursors.clone(),
        )
        .await
        .map_err(|e| BackboneStartError::SessionBucket(Box::new(e)))?;
        let options = crate::nats::client_options(nats, instance, true, registry, NAME);
        // nats-server reads each connection on one goroutine: several let it store from
        // several cores (see `publish`).
        // (Connected at once, not one after another: with NATS down each waits connect_timeout.)
        let clients = futures_util::future::join_all(
            (0..config.publish_connections.max(1)).map(|_| Client::connect(options.clone())),
        )
        .await;
        let timed_out = registry.backbone_dropped(NAME, DropReason::PubackTimeout);
        let disconnected = registry.backbone_dropped(NAME, DropReason::Disconnected);
        let publishers = clients
            .into_iter()
            .map(|client| {
                JsPublisher::start(
                    client,
                    config.publish_timeout,
                    timed_out.clone(),
                    disconnected.clone(),
                )
                .map_err(|e| BackboneStartError::Publisher(Box::new(e)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let consumer = Client::connect(options).await;
        let malformed = registry.backbone_dropped(NAME, DropReason::Malformed);
        let feed = match cursors {
            None => None,
            Some(cursors) => {
                let stream = js
                    .get_stream(&config.stream)
                    .await
                    .map_err(|e| BackboneStartError::Feed(e.to_string()))?;
                let feed = feed::Feed::start(
                    &stream,
                    &consumer,
                    &config.stream,
                    &nats.subject_prefix,
                    instance,
                    malformed.clone(),
                )
                .await
                .map_err(BackboneStartError::Feed)?;
                let direct = direct::DirectGet::start(
                    &consumer,
                    &config.stream,
                    config.publish_timeout,
                    config.replicas > 1,
                )
                .map_err(|e| BackboneStartError::Feed(e.to_string()))?;
                Some(FeedParts {
                    feed,
                    direct: Arc::new(direct),
                    cursors,
                    queue: (nats.subscription_capacity, nats.subscription_bytes),
                    forgotten: registry.backbone_dropped(NAME, DropReason::Unacknowledged),
                })
            }
        };
        let backbone = Arc::new(JetStreamBackbone {
            client,
            _client_for_events: client_for_events,
            js,
            publishers,
            consumer,
            retained,
            sessions,
            triggers,
            config: config.clone(),
            instance: (instance.to_owned(), percent_encode_header(instance)),
            prefix: nats.subject_prefix.clone(),
            wire: nats.wire_mode,
            max_control_line: nats.max_control_line,
            closed: AtomicBool::new(false),
            malformed,
            duplicates: registry.backbone_dropped(NAME, DropReason::Duplicate),
            unrepresentable: registry.backbone_dropped(NAME, DropReason::Unrepresentable),
            subscriptions: registry.gauge(metrics::BACKBONE_SUBSCRIPTIONS, &[("backbone", NAME)]),
            feed,
            listed: Arc::default(),
        });
        let dead = registry.backbone_dropped(NAME, DropReason::MaxDeliveries);
        tokio::spawn(watch_dead_letters(
            backbone.clone(),
            dead,
            crate::nats::task_panicked(registry),
        ));
        Ok(backbone)
    }

    /// Whether the connections that take events are up: readiness follows them, not the
    /// management connection (async-nats, which reconnected some 2 s after the own client
    /// after a NATS restart, while publishes were already stored; issue 19 item 3).
    fn publishing(&self) -> bool {
        self.publishers.iter().all(|p| p.client().is_connected())
    }

    /// Consumer settings for one subject of a subscription; `ttl`: how long it outlives its
    /// last puller.
    fn consumer_config(
        &self,
        subject: String,
        durable: String,
        ttl: std::time::Duration,
    ) -> jetstream::consumer::pull::Config {
        jetstream::consumer::pull::Config {
            durable_name: Some(durable),
            deliver_policy: jetstream::consumer::DeliverPolicy::New,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            max_deliver: self.config.max_deliver,
            backoff: self.config.backoff.clone(),
            filter_subject: subject,
            inactive_threshold: ttl,
            ..Default::default()
        }
    }
}

/// Settles one JetStream delivery: a publish to the delivery's reply subject (`+ACK`, `-NAK`
/// with an optional delay, `+TERM`), appended to the write buffer of the consuming connection of
/// meshgate's own client rather than sent as a command through async-nats's connection task.
struct JsAck {
    reply: String,
    client: Client,
}

impl std::fmt::Debug for JsAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsAck")
    }
}

impl JsAck {
    async fn send(&self, body: &[u8]) -> Result<(), BackboneError> {
        self.client
            .publish_when_room(&self.reply, None, b"", body)
            .await
            .map_err(unavailable)
    }
}

impl JsAck {
    /// Settles without anyone waiting for it (a delivery that is skipped or never deliverable).
    fn send_later(self, body: &'static [u8]) {
        tokio::spawn(async move {
            let _ = self.send(body).await;
        });
    }
}

impl Acknowledge for JsAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BackboneError>> {
        Box::pin(async move { self.send(b"+ACK").await })
    }

    fn nack(
        self: Box<Self>,
        delay: Option<std::time::Duration>,
    ) -> BoxFuture<'static, Result<(), BackboneError>> {
        Box::pin(async move {
            match delay {
                None => self.send(b"-NAK").await,
                Some(d) => {
                    let body = format!("-NAK {{\"delay\":{}}}", d.as_nanos());
                    self.send(body.as_bytes()).await
                }
            }
        })
    }

    fn in_progress(&self) -> BoxFuture<'static, Result<(), BackboneError>> {
        let this = JsAck {
            reply: self.reply.clone(),
            client: self.client.clone(),
        };
        Box::pin(async move { this.send(b"+WPI").await })
    }
}

/// The `Nats-Msg-Id` of the event with `source` and `id`: the first 16 bytes of SHA-256 over
/// `<source> <id>` (a source holds no space, so the pair is unambiguous), in base64url without
/// padding — 22 characters whatever the attributes' lengths. Another program that publishes
/// the same CloudEvent to the stream with this id is deduplicated against meshgate's copy.
///
/// Short on purpose: nats-server keeps every id of the last `duplicate_window` in memory and
/// looks each publish up; with meshgate's former id, `<source> <id>` itself (about 100 bytes
/// for an MQTT publish), raw publishes of meshgate's messages were stored about 20% slower
/// than with 22-character ids (bench, eight interleaved pairs: 50–64k against 63–73k
/// PubAcks/s). 128 bits of SHA-256 keep ids of different events apart, also when somebody
/// chooses them on purpose.
pub fn dedup_id(source: &str, id: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(source.as_bytes())
        .chain_update(b" ")
        .chain_update(id.as_bytes())
        .finalize();
    retained::B64.encode(&digest[..16])
}

/// [`dedup_id`] within a scope (`Envelope::dedup_scope`: the publishing principal, or a
/// trigger's dead letters or replies) and a topic: the digest over `<source> <id>`, a NUL, the
/// scope, a NUL and the topic (NUL is in none of them, so the parts are unambiguous). A
/// principal's retry is deduplicated; another principal's event with the same `source` and
/// `id` is not (review F12), nor a trigger's dead letter against the event it copies.
pub fn scoped_dedup_id(source: &str, id: &str, scope: &str, topic: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(source.as_bytes())
        .chain_update(b" ")
        .chain_update(id.as_bytes())
        .chain_update(b"\0")
        .chain_update(scope.as_bytes())
        .chain_update(b"\0")
        .chain_update(topic.as_bytes())
        .finalize();
    retained::B64.encode(&digest[..16])
}

/// Deletes a subscription's consumers once its stream is dropped (unsubscribe).
struct DeleteOnDrop {
    js: jetstream::Context,
    stream: String,
    names: Vec<String>,
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let (js, stream, names) = (
            self.js.clone(),
            self.stream.clone(),
            std::mem::take(&mut self.names),
        );
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Ok(s) = js.get_stream(&stream).await {
                    for n in names {
                        let _ = s.delete_consumer(&n).await;
                    }
                }
            });
        }
    }
}

impl JetStreamBackbone {
    /// A subscription of the instance feed (decision 0080): a member of the feed; a durable
    /// one resumes from its stored cursor.
    async fn subscribe_feed(
        &self,
        parts: &FeedParts,
        filter: TopicFilter,
        options: SubscribeOptions,
    ) -> Result<Subscription, BackboneError> {
        let subjects = filter.to_nats_subjects(&self.prefix);
        use member::Start;
        let (start, cursor) = match &options.durable {
            None => (Start::Live(parts.feed.position() + 1), None),
            Some(d) => {
                let key = cursors::cursor_key(&d.name);
                match parts.cursors.read(&key).await? {
                    // Resumed with nothing stored since (a restart storm without traffic): live
                    // at once, no request to the stream.
                    Some(floor) if floor >= parts.feed.position() => {
                        (Start::Live(floor + 1), Some((key, floor)))
                    }
                    // Resumed: read what came since.
                    Some(floor) => (Start::Behind(floor + 1), Some((key, floor))),
                    // New: stored at once, so that what comes while the client is away waits.
                    None => {
                        let position = parts.feed.position();
                        parts.cursors.write(&key, position).await?;
                        (Start::Live(position + 1), Some((key, position)))
                    }
                }
            }
        };
        let capacity = options.capacity.unwrap_or(parts.queue.0);
        let member = Arc::new(member::Member::new(
            parts.feed.new_id(),
            filter.clone(),
            subjects,
            cursor.is_some(),
            start,
            (capacity, parts.queue.1),
            parts.forgotten.clone(),
        ));
        let first = match start {
            Start::Live(next) | Start::Behind(next) => next,
        };
        parts.feed.join(member.clone());
        // The feed may have passed `first` between reading its position and the join (the
        // index did not hold the member yet): then the member reads it from the stream. The
        // feed moves its position before it reads the index, so this sees any such message.
        if parts.feed.position() >= first {
            member.lost();
        }
        if let Some((key, written)) = &cursor {
            parts.cursors.track(key.clone(), &member, *written);
        }
        self.subscriptions.inc();
        let counted = Counted(self.subscriptions.clone());
        let (feed, cursors) = (parts.feed.clone(), parts.cursors.clone());
        let on_drop = Box::new(move |m: &Arc<member::Member>| {
            feed.leave(m);
            if let Some((key, _)) = cursor {
                cursors.end(key, m);
            }
            drop(counted);
        });
        let (prefix, malformed) = (self.prefix.clone(), self.malformed.clone());
        let decode: member::DecodeStored = Arc::new(move |stored: direct::Stored| {
            crate::nats::decode_message(&prefix, stored.msg, &malformed)
        });
        let stream = member::MemberStream::new(member, parts.direct.clone(), decode, on_drop);
        Ok(Subscription::new(filter, Box::pin(stream)))
    }
}

impl Backbone for JetStreamBackbone {
    fn name(&self) -> &'static str {
        NAME
    }

    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<(), BackboneError>> {
        Box::pin(async move {
            if self.closed.load(Ordering::Acquire) {
                return Err(BackboneError::Closed);
            }
            let subject = envelope.topic.to_nats_subject(&self.prefix);
            let mut headers = RawHeaders::new();
            let payload = wire::encode(
                &envelope,
                self.wire,
                (&self.instance.0, &self.instance.1),
                &mut headers,
            );
            headers.put(
                "Nats-Msg-Id",
                &[&match &envelope.dedup_scope {
                    None => dedup_id(envelope.event.source(), envelope.event.id()),
                    Some(scope) => scoped_dedup_id(
                        envelope.event.source(),
                        envelope.event.id(),
                        scope,
                        envelope.topic.as_str(),
                    ),
                }],
            );
            // One client connection's events always on the same NATS connection: stored in
            // the order it published them.
            let shard = (envelope.origin.connection % self.publishers.len() as u64) as usize;
            // A header line that would break the block: refused and counted, never sent.
            let headers = headers.finish().map_err(|reason| {
                self.unrepresentable.inc();
                BackboneError::Rejected(format!("the event cannot be sent over NATS: {reason}"))
            })?;
            let ack = self.publishers[shard]
                .publish(&subject, &headers, &payload)
                .await
                .map_err(publish_error)?;
            if ack.duplicate {
                // Stored before within the duplicate window: acknowledged, not stored again.
                self.duplicates.inc();
            }
            Ok(())
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
            if let Some(parts) = &self.feed
                && options.queue_group.is_none()
            {
                return self.subscribe_feed(parts, filter, options).await;
            }
            let stream = self
                .js
                .get_stream(&self.config.stream)
                .await
                .map_err(unavailable)?;
            let unique = meshgate_core::wrap::new_id();
            let mut pulls = Vec::new();
            let mut owned = Vec::new();
            let mut names = Vec::new();
            for subject in filter.to_nats_subjects(&self.prefix) {
                let (name, ttl) = match (&options.queue_group, &options.durable) {
                    // Shared by every instance: one consumer per group and subject.
                    (Some(g), d) => (
                        consumer_name(&["q", g, &subject]),
                        d.as_ref()
                            .map_or(INACTIVE_THRESHOLD, |d| d.ttl.max(INACTIVE_THRESHOLD)),
                    ),
                    // A persistent session's: kept while its client is away, on any instance.
                    (None, Some(d)) => (
                        durable_consumer(&d.name, &subject),
                        d.ttl.max(INACTIVE_THRESHOLD),
                    ),
                    (None, None) => {
                        let n = consumer_name(&["s", &self.instance.0, &unique, &subject]);
                        owned.push(n.clone());
                        (n, INACTIVE_THRESHOLD)
                    }
                };
                self.check_create_request(&name, &subject)?;
                let mut config = self.consumer_config(subject, name.clone(), ttl);
                if let Some(n) = options.max_in_flight {
                    config.max_ack_pending = i64::try_from(n).unwrap_or(i64::MAX);
                }
                if let Some(wait) = options.ack_wait {
                    config.ack_wait = wait;
                    config.backoff = Vec::new();
                }
                // Not for a persistent session's durable consumer: meshgate deletes and
                // re-creates those itself when the session moves or ends, and a repair by the
                // instance that held it would take it back.
                let session = options.durable.is_some() && options.queue_group.is_none();
                let repair = (!session)
                    .then(|| repair_consumer(stream.clone(), name.clone(), config.clone()));
                // Created (or checked) through async-nats; pulled on meshgate's own client,
                // within the consumer's request limits (an existing one may have its own).
                let consumer: jetstream::consumer::PullConsumer = if session {
                    resume_durable(&stream, &name, config)
                        .await
                        .map_err(unavailable)?
                } else {
                    let wanted = (config.max_ack_pending, config.ack_wait);
                    let mut consumer: jetstream::consumer::PullConsumer = stream
                        .get_or_create_consumer(&name, config.clone())
                        .await
                        .map_err(unavailable)?;
                    // A queue group's consumer outlives its members: a member that asks for
                    // other limits (a trigger's new maxConcurrency) updates it, or the old
                    // ones would hold (get_or_create returns the consumer as it is).
                    let held = consumer.cached_info().config.clone();
                    if (options.max_in_flight.is_some() || options.ack_wait.is_some())
                        && (held.max_ack_pending, held.ack_wait) != wanted
                    {
                        match stream.create_consumer(config).await {
                            Ok(updated) => consumer = updated,
                            Err(e) => tracing::warn!(
                                consumer = %name,
                                error = %e,
                                "jetstream: cannot update the consumer's max_ack_pending/ack_wait; it keeps its own"
                            ),
                        }
                    }
                    consumer
                };
                let info = consumer.cached_info();
                let limits = Limits::of(info.config.max_batch, info.config.max_expires);
                let mut pull = Pull::start(&self.consumer, &self.config.stream, &name, limits)
                    .map_err(crate::nats::client_error)?;
                if let Some(repair) = repair {
                    pull = pull.with_repair(repair, info.delivered.stream_sequence);
                }
                names.push(name);
                pulls.push(pull);
            }
            let listed = self.listed.add(ListedConsumers {
                filter: filter.clone(),
                group: options.queue_group.clone(),
                names,
                pulls: pulls.iter().map(Pull::state).collect(),
            });
            self.subscriptions.inc();
            let counted = Counted(self.subscriptions.clone());
            let cleanup = DeleteOnDrop {
                js: self.js.clone(),
                stream: self.config.stream.clone(),
                names: owned,
            };
            let prefix = self.prefix.clone();
            let malformed = self.malformed.clone();
            let client = self.consumer.clone();
            // As for NATS core: `$` topics are not matched by MQTT wildcards, subjects are.
            let matcher = filter.clone();
            let merged = futures_util::stream::select_all(pulls).filter_map(move |mut m| {
                let _alive = (&counted, &cleanup, &listed);
                // Copied out (~60 bytes): a slice would keep the whole read buffer it came in
                // alive until the delivery is settled.
                let acker = m.reply.take().and_then(|reply| {
                    Some(JsAck {
                        reply: String::from_utf8(reply.to_vec()).ok()?,
                        client: client.clone(),
                    })
                });
                let delivery = match crate::nats::decode_message(&prefix, m, &malformed) {
                    Some(envelope) if !matcher.matches(&envelope.topic) => {
                        if let Some(a) = acker {
                            a.send_later(b"+ACK");
                        }
                        None
                    }
                    Some(envelope) => Some(Delivery::new(
                        Arc::new(envelope),
                        acker.map(|a| Box::new(a) as Box<dyn Acknowledge>),
                    )),
                    None => {
                        // Never deliverable: terminate instead of redelivering.
                        if let Some(a) = acker {
                            a.send_later(b"+TERM");
                        }
                        None
                    }
                };
                futures_util::future::ready(delivery)
            });
            Ok(Subscription::new(filter, Box::pin(merged)))
        })
    }

    fn publish_round_trips(&self) -> bool {
        true
    }

    fn retained_store(&self) -> Option<&dyn meshgate_core::RetainedStore> {
        Some(&self.retained)
    }

    fn session_store(&self) -> Option<&dyn meshgate_core::SessionStore> {
        Some(&self.sessions)
    }

    fn trigger_store(&self) -> Option<&dyn meshgate_core::SharedDocuments> {
        Some(&self.triggers)
    }

    fn subscriptions(&self) -> Vec<BackboneSubscription> {
        let mut out = self.listed.list();
        if let Some(parts) = &self.feed {
            out.extend(parts.feed.list());
        }
        // Pulls, deliveries and acknowledgements all go over this connection.
        if !self.consumer.is_connected() {
            for entry in &mut out {
                entry.worsen(meshgate_core::backbone::subscription_state::DISCONNECTED);
            }
        }
        out
    }

    fn is_ready(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && self.publishing()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.closed.swap(true, Ordering::AcqRel) {
                return;
            }
            // Each waits for its publishes in flight to be answered, then closes.
            futures_util::future::join_all(self.publishers.iter().map(JsPublisher::drain)).await;
            // Every pull subscription ends once it delivered what it fetched; the consuming
            // connection stays until `finish`, so that the acknowledgements of those last
            // deliveries (clients acknowledge them during the connections' shutdown drain) still
            // reach JetStream instead of being redelivered after ack_wait.
            self.consumer.end_subscriptions();
            // The management connection (KV stores of sessions and retained messages) stays
            // open too: MQTT sessions save their state on their way out, after this (`finish`).
        })
    }

    fn finish(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Writes the last acknowledgements and waits for the server to have them.
            self.consumer.drain().await;
            if self.client.connection_state() != State::Connected {
                // Nothing can be written: async-nats's flush and drain would wait for a
                // reconnect until the gateway's bound (2 s) ran out (issue 19 item 4).
                return;
            }
            if let Err(e) = self.client.flush().await {
                tracing::debug!(error = %e, "jetstream: flush");
            }
            if let Err(e) = self.client.drain().await {
                tracing::debug!(error = %e, "jetstream: drain");
            }
        })
    }
}

/// The MAX_DELIVERIES advisory, as far as we read it.
#[derive(serde::Deserialize)]
struct MaxDeliveries {
    stream: String,
    consumer: String,
    stream_seq: u64,
}

/// Republishes events that reached `max_deliver` to the dead-letter subject (one instance
/// handles each advisory: a queue subscription), or counts them as dropped.
/// Runs [`dead_letters`] until the backbone closes: again when it ends early (it could not
/// subscribe, or its subscription ended) or panics (logged and counted in
/// `meshgate_errors_total{adapter="backbone",kind="task_panicked"}`), so dead letters are never
/// silently no longer counted or forwarded.
async fn watch_dead_letters(backbone: Arc<JetStreamBackbone>, counter: Counter, panicked: Counter) {
    use futures_util::FutureExt;
    let mut backoff = meshgate_core::backoff::Backoff::new(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(5),
    );
    loop {
        let run = std::panic::AssertUnwindSafe(dead_letters(backbone.clone(), counter.clone()))
            .catch_unwind()
            .await;
        if backbone.closed.load(Ordering::Acquire) {
            return;
        }
        match run {
            Ok(()) => {
                tracing::warn!("jetstream: the max-deliveries advisory watch ended; watching again")
            }
            Err(panic) => {
                panicked.inc();
                tracing::error!(
                    panic = crate::nats::connector::panic_message(&*panic),
                    "jetstream: the max-deliveries advisory task panicked; watching again (counted in meshgate_errors_total{{kind=\"task_panicked\"}})"
                );
            }
        }
        tokio::time::sleep(backoff.next_pause()).await;
    }
}

async fn dead_letters(backbone: Arc<JetStreamBackbone>, counter: Counter) {
    let subject = format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
        backbone.config.stream
    );
    let Ok(mut advisories) = backbone
        .client
        .queue_subscribe(subject, "meshgate-dead-letter".to_owned())
        .await
    else {
        tracing::warn!("jetstream: cannot watch max-deliveries advisories");
        return;
    };
    while let Some(m) = advisories.next().await {
        let Ok(a) = serde_json::from_slice::<MaxDeliveries>(&m.payload) else {
            continue;
        };
        counter.inc();
        let Some(target) = backbone.config.dead_letter_subject.clone() else {
            tracing::warn!(
                seq = a.stream_seq,
                consumer = a.consumer,
                "jetstream: event dropped after max_deliver attempts"
            );
            continue;
        };
        let Ok(stream) = backbone.js.get_stream(&a.stream).await else {
            continue;
        };
        match stream.get_raw_message(a.stream_seq).await {
            Ok(raw) => {
                let mut headers = raw.headers.clone();
                headers.insert("Meshgate-Dead-Stream", a.stream.as_str());
                headers.insert("Meshgate-Dead-Sequence", a.stream_seq.to_string());
                headers.insert("Meshgate-Dead-Consumer", percent_encode_header(&a.consumer));
                headers.insert("Meshgate-Dead-Subject", raw.subject.as_str());
                if let Err(e) = backbone
                    .client
                    .publish_with_headers(target, headers, raw.payload)
                    .await
                {
                    tracing::warn!(error = %e, "jetstream: dead-letter publish failed");
                } else {
                    tracing::info!(
                        seq = a.stream_seq,
                        consumer = a.consumer,
                        "jetstream: event dead-lettered after max_deliver attempts"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "jetstream: dead-lettered event not found"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_ids_are_22_characters_of_the_digest_of_source_and_id() {
        let id = dedup_id(
            "/meshgate/mqtt/meshgate-01a2430e",
            "01a2430e-9d79-7000-850c-7e6d64ecd49b",
        );
        assert_eq!(id.len(), 22);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{id}"
        );
        // SHA-256("/s 1") begins bc79b02b90c56c54191f10043a917a2f (Python's hashlib).
        assert_eq!(dedup_id("/s", "1"), "vHmwK5DFbFQZHxAEOpF6Lw");
        assert_ne!(dedup_id("/s", "1"), dedup_id("/s", "2"));
        assert_ne!(dedup_id("/s", "1"), dedup_id("/t", "1"));
        assert_ne!(
            dedup_id("/s", "1"),
            scoped_dedup_id("/s", "1", "dead-letter trigger:t", "d")
        );
        assert_ne!(
            scoped_dedup_id("/s", "1", "dead-letter trigger:t", "d"),
            scoped_dedup_id("/s", "1", "reply trigger:t", "d")
        );
        assert_ne!(
            scoped_dedup_id("/s", "1", "alice", "a/1"),
            scoped_dedup_id("/s", "1", "bob", "a/1")
        );
        assert_ne!(
            scoped_dedup_id("/s", "1", "alice", "a/1"),
            scoped_dedup_id("/s", "1", "alice", "a/2")
        );
        assert_eq!(scoped_dedup_id("/s", "1", "alice", "a/1").len(), 22);
        // However long the attributes.
        assert_eq!(dedup_id(&"s".repeat(10_000), &"i".repeat(10_000)).len(), 22);
    }
}
