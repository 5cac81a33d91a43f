//! One running trigger: a backbone subscription in the trigger's queue group, the filter, and
//! at most `maxConcurrency` deliveries at once, each with its retries and its dead-letter write.
//!
//! Two ways events wait for a delivery slot, by backbone:
//! - **JetStream** (deliveries need an acknowledgement): the reader takes a slot before it
//!   starts a delivery, so the consumer (whose `max_ack_pending` is `maxConcurrency`) holds the
//!   rest. The event is acknowledged only after a 2xx, a non-retryable failure without a sink,
//!   or a successful dead-letter write; while attempts and backoffs run, `+WPI` every
//!   [`HEARTBEAT`] keeps JetStream from giving it to another instance. Retries survive a
//!   restart: an unacknowledged event is delivered again (its attempts start over).
//! - **memory / NATS core** (nothing keeps events for us): the reader never waits, so neither
//!   publishers nor the bus wait on a slow subscriber; events wait in a queue bounded by
//!   `maxPendingBytes`, and what does not fit is dropped and counted (`outcome="overflow"`).
//!   Queued and retrying events are lost on restart (documented).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshgate_config::TriggerConfig;
use meshgate_config::triggers::DeadLetterSink;
use meshgate_core::backbone::{Delivery, Durable, Envelope, Origin, SubscribeOptions};
use meshgate_core::metrics::{self as m, Counter, Gauge, Histogram, Registry};
use meshgate_core::{Backbone, BackboneError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dead_letter::{self, Sink};
use crate::policy::{self, Verdict};
use crate::sender::{self, Attempt, Failure, Request};
use crate::webhook;

/// How often a JetStream delivery that is still being attempted says so; the trigger's
/// consumer has an `ack_wait` of six of these (30 s), whatever `backbone.jetstream.ack_wait`.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a trigger's JetStream consumer outlives the last instance that served it.
const CONSUMER_TTL: Duration = Duration::from_secs(7 * 86_400);

/// The backbone queue group of trigger `name`: `trigger:` and the name with `-` written `--`
/// and `_` written `-u`, so that it holds no `_`: JetStream consumer names join their parts
/// with `_` (`q_<group>_<subject>`), and `x_y` on `t` must not share `x`'s consumer on `y/t`.
fn queue_group(name: &str) -> String {
    let mut group = String::with_capacity(name.len() + 12);
    group.push_str("trigger:");
    for c in name.chars() {
        match c {
            '-' => group.push_str("--"),
            '_' => group.push_str("-u"),
            c => group.push(c),
        }
    }
    group
}

/// Per-trigger metrics (labels `trigger`, and `outcome` where there is one).
#[derive(Debug, Clone)]
struct Metrics {
    delivered: Counter,
    filtered: Counter,
    dead_lettered: Counter,
    failed: Counter,
    overflow: Counter,
    abandoned: Counter,
    retries: Counter,
    replies_published: Counter,
    replies_refused: Counter,
    replies_failed: Counter,
    in_flight: Gauge,
    pending_bytes: Gauge,
    latency: Histogram,
}

impl Metrics {
    fn new(r: &Registry, name: &str) -> Self {
        let events = |o: &str| r.counter(m::TRIGGER_EVENTS, &[("trigger", name), ("outcome", o)]);
        let replies = |o: &str| r.counter(m::TRIGGER_REPLIES, &[("trigger", name), ("outcome", o)]);
        Metrics {
            delivered: events("delivered"),
            filtered: events("filtered"),
            dead_lettered: events("dead_lettered"),
            failed: events("failed"),
            overflow: events("overflow"),
            abandoned: events("abandoned"),
            retries: r.counter(m::TRIGGER_RETRIES, &[("trigger", name)]),
            replies_published: replies("published"),
            replies_refused: replies("refused"),
            replies_failed: replies("publish_failed"),
            in_flight: r.gauge(m::TRIGGER_IN_FLIGHT, &[("trigger", name)]),
            pending_bytes: r.gauge(m::TRIGGER_PENDING_BYTES, &[("trigger", name)]),
            latency: r.histogram(m::TRIGGER_LATENCY, &[("trigger", name)]),
        }
    }
}

/// Events waiting for a slot (memory and NATS core backbones only).
#[derive(Debug, Default)]
struct Pending {
    queue: VecDeque<(Arc<Envelope>, Instant, usize)>,
    bytes: usize,
}

/// How one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Delivered,
    DeadLettered,
    /// Failed for good, and there is no sink (or writing to it failed on a backbone that cannot
    /// redeliver): counted as `failed`.
    Failed,
    /// The dead-letter write failed: JetStream delivers it again later.
    Redeliver,
    /// The trigger was deleted or the gateway stopped mid-delivery.
    Abandoned,
}

/// A trigger's state shared by its reader and its deliveries.
#[derive(Debug)]
pub(crate) struct Trigger {
    pub config: TriggerConfig,
    client: reqwest::Client,
    request: Request,
    dead_letter: Option<Sink>,
    backbone: Arc<dyn Backbone>,
    origin: Origin,
    metrics: Metrics,
    slots: Arc<Semaphore>,
    pending: Mutex<Pending>,
    /// The webhook handshake succeeded (or is not asked for).
    validated: tokio::sync::Mutex<bool>,
    /// Stops taking new events (replace, delete, shutdown).
    pub reading: CancellationToken,
    /// Stops deliveries under way (replace, delete, the end of the shutdown grace period).
    pub abandon: CancellationToken,
    /// The trigger that replaced this one: gets what this one abandons (memory, NATS core;
    /// on JetStream the consumer gives abandoned events to it again).
    pub successor: Mutex<Option<Arc<Trigger>>>,
    pub tasks: TaskTracker,
    /// True once the backbone subscription is made (events published from then on reach it).
    pub subscribed: tokio::sync::watch::Sender<bool>,
}

impl Trigger {
    pub fn new(
        config: TriggerConfig,
        backbone: Arc<dyn Backbone>,
        origin: Origin,
        registry: &Registry,
    ) -> Result<Arc<Trigger>, sender::ClientError> {
        let client = sender::client(config.subscriber.ca_file.as_deref())?;
        let request = Request {
            uri: config.subscriber.uri.clone(),
            mode: config.subscriber.content_mode,
            auth: config
                .subscriber
                .auth
                .as_ref()
                .and_then(sender::authorization),
            timeout: config.delivery.timeout,
            want_reply: config.reply_topic.is_some(),
        };
        let dead_letter = config.delivery.dead_letter_sink.as_ref().map(|d| match d {
            DeadLetterSink::Topic(t) => Sink::Topic(t.clone()),
            DeadLetterSink::Uri(u) => Sink::Http(Request {
                uri: u.clone(),
                auth: None,
                want_reply: false,
                ..request.clone()
            }),
        });
        Ok(Arc::new(Trigger {
            metrics: Metrics::new(registry, &config.name),
            slots: Arc::new(Semaphore::new(config.subscriber.max_concurrency)),
            validated: tokio::sync::Mutex::new(!config.subscriber.webhook_validation),
            config,
            client,
            request,
            dead_letter,
            backbone,
            origin,
            pending: Mutex::default(),
            reading: CancellationToken::new(),
            abandon: CancellationToken::new(),
            successor: Mutex::new(None),
            tasks: TaskTracker::new(),
            subscribed: tokio::sync::watch::Sender::new(false),
        }))
    }

    /// Reads the trigger's subscription until `reading` is cancelled or the backbone closes.
    pub async fn run(self: Arc<Self>) {
        let name = self.config.name.clone();
        let mut pause = meshgate_core::backoff::Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
        );
        loop {
            let group = queue_group(&name);
            let options = SubscribeOptions {
                // Every instance's copy of the trigger is one member: each event goes to one.
                queue_group: Some(group.clone()),
                capacity: None,
                durable: Some(Durable {
                    name: group,
                    ttl: CONSUMER_TTL,
                }),
                max_in_flight: Some(self.config.subscriber.max_concurrency),
                // Several heartbeats long, whatever backbone.jetstream.ack_wait says.
                ack_wait: Some(HEARTBEAT * 6),
            };
            let subscribed = tokio::select! {
                () = self.reading.cancelled() => return,
                s = self.backbone.subscribe(self.config.topic.clone(), options) => s,
            };
            let mut subscription = match subscribed {
                Ok(s) => s,
                Err(BackboneError::Closed) => return,
                Err(e) => {
                    tracing::warn!(trigger = %name, error = %e, "trigger cannot subscribe; retrying");
                    tokio::select! {
                        () = self.reading.cancelled() => return,
                        () = tokio::time::sleep(pause.next_pause()) => continue,
                    }
                }
            };
            pause.reset();
            self.subscribed.send_replace(true);
            loop {
                let delivery = tokio::select! {
                    () = self.reading.cancelled() => return,
                    d = subscription.next() => d,
                };
                let Some(delivery) = delivery else { break };
                self.take(delivery).await;
            }
            // The subscription ended: the backbone closed (then subscribing again says so).
        }
    }

    /// Whether the trigger takes `envelope`: not its own reply, and through its filter.
    fn passes(&self, envelope: &Envelope) -> bool {
        // A trigger does not see the replies it published itself (no loop through one trigger
        // whose reply topic it also matches).
        envelope.origin != self.origin
            && self
                .config
                .filter
                .as_ref()
                .is_none_or(|f| f.matches(&envelope.event))
    }

    /// One event from the trigger's own subscription: filtered out, or on its way to a
    /// delivery slot.
    async fn take(self: &Arc<Self>, delivery: Delivery) {
        if !delivery.needs_ack() {
            self.offer(delivery.envelope);
            return;
        }
        if !self.passes(&delivery.envelope) {
            self.metrics.filtered.inc();
            let _ = delivery.ack().await;
            return;
        }
        let permit = tokio::select! {
            () = self.reading.cancelled() => {
                let _ = delivery.nack(None).await;
                return;
            }
            p = self.slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let this = self.clone();
        self.tasks
            .spawn(async move { this.deliver_acked(delivery, permit).await });
    }

    /// An event this trigger will not deliver after all (replaced, deleted, or the gateway
    /// stops) on a backbone that keeps nothing for us: to the trigger that replaced this one,
    /// or counted as abandoned.
    fn hand_over(&self, envelope: Arc<Envelope>) {
        let successor = self
            .successor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match successor {
            Some(next) => next.offer(envelope),
            None => self.metrics.abandoned.inc(),
        }
    }

    /// An event of a backbone that keeps nothing for us (memory, NATS core): filtered, then
    /// queued for a slot without waiting (see the module's comment). Also called by the
    /// memory backbone's dispatcher (`dispatch.rs`) for the triggers its index picks.
    pub(crate) fn offer(self: &Arc<Self>, envelope: Arc<Envelope>) {
        if self.reading.is_cancelled() {
            // Replaced or deleted while the event was on its way here.
            self.hand_over(envelope);
            return;
        }
        if !self.passes(&envelope) {
            self.metrics.filtered.inc();
            return;
        }
        let received = Instant::now();
        let size = meshgate_core::json::encoded_len_bound(&envelope.event) + 64;
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.bytes + size > self.config.delivery.max_pending_bytes {
                drop(pending);
                self.metrics.overflow.inc();
                tracing::debug!(trigger = %self.config.name, "trigger queue full (delivery.maxPendingBytes): event dropped");
                return;
            }
            pending.bytes += size;
            pending.queue.push_back((envelope, received, size));
            self.metrics
                .pending_bytes
                .set(i64::try_from(pending.bytes).unwrap_or(i64::MAX));
        }
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            let this = self.clone();
            self.tasks.spawn(async move { this.drain(permit).await });
        }
    }

    fn pop(&self) -> Option<(Arc<Envelope>, Instant)> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (envelope, received, size) = pending.queue.pop_front()?;
        pending.bytes -= size;
        self.metrics
            .pending_bytes
            .set(i64::try_from(pending.bytes).unwrap_or(i64::MAX));
        Some((envelope, received))
    }

    /// Delivers queued events while it holds a slot (memory and NATS core backbones).
    async fn drain(self: Arc<Self>, mut permit: OwnedSemaphorePermit) {
        loop {
            while let Some((envelope, received)) = self.pop() {
                if self.abandon.is_cancelled() {
                    self.hand_over(envelope);
                    continue;
                }
                self.metrics.in_flight.inc();
                let settled = match self.deliver(&envelope, received).await {
                    // Nothing would deliver it again: a failed dead-letter write is a failure.
                    Settled::Redeliver => Settled::Failed,
                    s => s,
                };
                self.metrics.in_flight.dec();
                if settled == Settled::Abandoned {
                    self.hand_over(envelope);
                } else {
                    self.count(settled);
                }
            }
            drop(permit);
            // An event queued after the last pop, while this task still held its slot, found
            // no free slot: look again now that there is one.
            if self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue
                .is_empty()
            {
                return;
            }
            match self.slots.clone().try_acquire_owned() {
                Ok(p) => permit = p,
                Err(_) => return,
            }
        }
    }

    /// One JetStream delivery, holding a slot: attempts with `+WPI` heartbeats, then settled.
    async fn deliver_acked(self: Arc<Self>, delivery: Delivery, _permit: OwnedSemaphorePermit) {
        let received = Instant::now();
        self.metrics.in_flight.inc();
        let settled = {
            let work = self.deliver(&delivery.envelope, received);
            tokio::pin!(work);
            let mut beat =
                tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
            loop {
                tokio::select! {
                    s = &mut work => break s,
                    _ = beat.tick() => { let _ = delivery.in_progress().await; }
                }
            }
        };
        self.metrics.in_flight.dec();
        self.count(settled);
        let _ = match settled {
            Settled::Delivered | Settled::DeadLettered | Settled::Failed => delivery.ack().await,
            Settled::Redeliver => {
                delivery
                    .nack(Some(
                        self.config
                            .delivery
                            .backoff_delay
                            .max(Duration::from_secs(1)),
                    ))
                    .await
            }
            Settled::Abandoned => delivery.nack(None).await,
        };
    }

    fn count(&self, settled: Settled) {
        match settled {
            Settled::Delivered => self.metrics.delivered.inc(),
            Settled::DeadLettered => self.metrics.dead_lettered.inc(),
            Settled::Failed => self.metrics.failed.inc(),
            Settled::Redeliver => {}
            Settled::Abandoned => self.metrics.abandoned.inc(),
        }
    }

    /// Attempts, retries and, after the last, the dead-letter write.
    async fn deliver(&self, envelope: &Arc<Envelope>, received: Instant) -> Settled {
        let delivery = &self.config.delivery;
        let mut attempt = 0u32;
        let failure = loop {
            let result = tokio::select! {
                () = self.abandon.cancelled() => return Settled::Abandoned,
                r = self.attempt(envelope) => r,
            };
            let failure = match result {
                Attempt::Delivered {
                    reply,
                    reply_refused,
                    ..
                } => {
                    self.metrics.latency.observe(received.elapsed());
                    self.reply(reply, reply_refused).await;
                    return Settled::Delivered;
                }
                Attempt::Failed(f) => f,
            };
            if failure.verdict == Verdict::Fail || attempt >= delivery.retry {
                break failure;
            }
            attempt += 1;
            self.metrics.retries.inc();
            let wait = policy::next_wait(
                policy::backoff(delivery.backoff_policy, delivery.backoff_delay, attempt),
                failure.status,
                failure.retry_after,
                delivery.retry_after_max,
            );
            tokio::select! {
                () = self.abandon.cancelled() => return Settled::Abandoned,
                () = tokio::time::sleep(wait) => {}
            }
        };
        self.give_up(envelope, &failure).await
    }

    async fn attempt(&self, envelope: &Envelope) -> Attempt {
        if let Err(why) = self.validate().await {
            return Attempt::Failed(Failure {
                status: None,
                verdict: Verdict::Retry,
                retry_after: None,
                data: why.into(),
            });
        }
        sender::send(&self.client, &self.request, envelope).await
    }

    /// The webhook handshake, once per trigger (and again after a refusal).
    async fn validate(&self) -> Result<(), String> {
        let mut done = self.validated.lock().await;
        if *done {
            return Ok(());
        }
        match webhook::handshake(
            &self.client,
            &self.request.uri,
            self.request.auth.as_ref(),
            self.request.timeout,
        )
        .await
        {
            Ok(rate) => {
                tracing::info!(trigger = %self.config.name, allowed_rate = ?rate, "webhook validation accepted");
                *done = true;
                Ok(())
            }
            Err(why) => {
                tracing::warn!(trigger = %self.config.name, %why, "webhook validation failed");
                Err(why)
            }
        }
    }

    async fn reply(&self, reply: Option<meshgate_core::Event>, refused: Option<String>) {
        if let Some(why) = refused {
            self.metrics.replies_refused.inc();
            tracing::debug!(trigger = %self.config.name, %why, "reply not published");
            return;
        }
        let (Some(event), Some(topic)) = (reply, &self.config.reply_topic) else {
            return;
        };
        let envelope = Envelope::new(topic.clone(), Arc::new(event), self.origin.clone())
            .with_dedup_scope(format!("reply {}", self.origin.instance));
        match self.backbone.publish(envelope).await {
            Ok(()) => self.metrics.replies_published.inc(),
            Err(e) => {
                self.metrics.replies_failed.inc();
                tracing::warn!(trigger = %self.config.name, error = %e, "reply not published");
            }
        }
    }

    async fn give_up(&self, envelope: &Envelope, failure: &Failure) -> Settled {
        let Some(sink) = &self.dead_letter else {
            tracing::warn!(
                trigger = %self.config.name,
                id = envelope.event.id(),
                status = ?failure.status,
                "event not delivered after its last attempt, and the trigger has no deadLetterSink"
            );
            return Settled::Failed;
        };
        let event = dead_letter::annotate(&envelope.event, &self.request.uri, failure);
        match dead_letter::write(sink, &self.client, &self.backbone, &self.origin, event).await {
            Ok(()) => Settled::DeadLettered,
            Err(why) => {
                tracing::warn!(trigger = %self.config.name, id = envelope.event.id(), %why, "dead-letter write failed");
                Settled::Redeliver
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::queue_group;

    #[test]
    fn queue_groups_hold_no_underscore_and_do_not_collide() {
        assert_eq!(queue_group("orders"), "trigger:orders");
        assert_eq!(queue_group("a_b-c"), "trigger:a-ub--c");
        let names = ["a_b", "a-ub", "a--b", "a-b", "a__b", "a-_b", "a_-b"];
        let groups: std::collections::BTreeSet<_> = names.iter().map(|n| queue_group(n)).collect();
        assert_eq!(groups.len(), names.len());
        assert!(groups.iter().all(|g| !g.contains('_')));
    }
}
