//! A source: one queue consumed into the mesh.
//!
//! Each delivery is decoded (binding.rs), published to the backbone, and only then
//! acknowledged with `basic.ack`. A message that can never become a valid event is rejected
//! with `requeue = false`, so the queue's dead-letter exchange (if any) receives it; a message
//! the backbone could not take right now is nacked with `requeue = true` after a pause. A
//! message that one of meshgate's sinks published (it carries [`binding::ORIGIN_HEADER`]) is
//! acknowledged and skipped: it is in the mesh already.
//!
//! Over backbones that acknowledge after a round trip (JetStream) up to `prefetch` publishes
//! are in flight at once and settled in arrival order; over the memory and NATS core backbones
//! each publish is awaited before the next, which keeps the order of the queue (as long as
//! the backbone takes every message: a requeued one comes back after later ones).

use meshgate_core::metrics::{DropReason, ErrorKind};
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, queue};
use amq_protocol::types::{FieldTable, ShortString};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use meshgate_config::{AmqpConfig, AmqpSourceConfig};
use meshgate_core::metrics::{AdapterMetrics, Counter};
use meshgate_core::throttle::LogThrottle;
use meshgate_core::wrap::Wrapper;
use meshgate_core::{AdapterContext, BoxFuture, Principal, PublishError, Published, Topic};
use tokio_util::sync::CancellationToken;

use crate::binding;
use crate::consumer::{Connection, Delivery, Incoming, Refusal};
use crate::error::AmqpError;
use crate::link::{Backoff, Connector, Ended, Link};

/// Pause in consuming after a message the backbone refused for now was handed back to
/// RabbitMQ, so that an unavailable backbone does not turn into a redelivery storm.
const REQUEUE_PAUSE: Duration = Duration::from_millis(200);

/// Acknowledgements are batched: one `basic.ack` with `multiple` covers up to a quarter of
/// the prefetch window of consecutive published messages, or whatever was published
/// [`ACK_DELAY`] after the first of them. One ack frame per message cost RabbitMQ and meshgate
/// a frame and a write each; a quarter of the window keeps RabbitMQ sending while the batch
/// fills.
fn ack_batch(prefetch: u16) -> usize {
    usize::from(prefetch / 4).max(1)
}

/// The longest a published message waits for its acknowledgement. Acking whatever was
/// published after each read cost a write per read, which at a few deliveries per read was a
/// large part of meshgate's CPU per message; the price of waiting is that a connection lost
/// in between has RabbitMQ deliver those messages again (at least once, as any failure).
const ACK_DELAY: Duration = Duration::from_millis(10);

/// Unprocessed bytes the source reads ahead while it pauses or its window is full (more than
/// one frame of RabbitMQ's default `frame_max`, so a large message's frames keep coming).
const READ_AHEAD: usize = 1 << 20;

/// Rejected messages are logged at most this often per source (each one is counted).
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// `meshgate-<instance>-<source>`, cut to the 255 bytes of an AMQP short string.
fn consumer_tag(instance: &str, name: &str) -> String {
    let mut tag = format!("meshgate-{instance}-{name}");
    if tag.len() > 255 {
        let mut end = 255;
        while !tag.is_char_boundary(end) {
            end -= 1;
        }
        tag.truncate(end);
    }
    tag
}

/// What to tell RabbitMQ about a delivery, now or later.
enum Handled<'a> {
    Now(Outcome),
    Later(BoxFuture<'a, Outcome>),
}

/// What a publish's result means for the delivery.
fn outcome(published: Result<(), PublishError>) -> Outcome {
    match published {
        Ok(()) => Outcome::Ack,
        Err(PublishError::Backbone(e)) if e.is_retryable() => Outcome::Requeue(e.to_string()),
        Err(e) => Outcome::Reject(e.to_string()),
    }
}

/// What to tell RabbitMQ about one delivery.
#[derive(Debug)]
enum Outcome {
    /// Published (or skipped on purpose): `basic.ack`.
    Ack,
    /// Never a valid event: `basic.reject` without requeue (dead-lettered where configured).
    Reject(String),
    /// Refused from its content header alone (headers over the scan.rs bounds, a body over
    /// `amqp.max_body_size`): `basic.reject` without requeue, counted under its own reason.
    Refuse(Refusal, String),
    /// The backbone could not take it now: `basic.nack` with requeue.
    Requeue(String),
}

/// One source's fixed parts, shared by all its sessions.
pub(crate) struct Source {
    pub(crate) config: AmqpSourceConfig,
    pub(crate) link: Arc<Link>,
    pub(crate) wrapper: Wrapper,
    /// Levels put before the routing key's.
    prefix: Option<Topic>,
    principal: Principal,
    metrics: AdapterMetrics,
    looped: Counter,
    rejected: Counter,
    bad_message: Counter,
    too_large: Counter,
    consumer_tag: String,
    /// Fires when the sources stop (before the backbone closes, at shutdown).
    stop: CancellationToken,
    reject_log: LogThrottle,
}

/// Why a message names no topic.
#[derive(Debug, thiserror::Error)]
enum NoTopic {
    #[error(transparent)]
    Invalid(#[from] meshgate_core::TopicError),
    #[error("the message has no routing key and the source no topic_prefix: it has no topic")]
    Missing,
}

impl Source {
    pub(crate) fn new(
        config: AmqpSourceConfig,
        link: Arc<Link>,
        ctx: &AdapterContext,
        metrics: AdapterMetrics,
        stop: CancellationToken,
    ) -> Result<Source, AmqpError> {
        let wrapper = Wrapper::new(config.wrap_source.clone(), config.wrap_type.clone())
            .map_err(|e| AmqpError::Config(format!("amqp source `{}`: {e}", config.name)))?;
        let prefix = config
            .topic_prefix
            .as_deref()
            .map(Topic::from_mqtt)
            .transpose()
            .map_err(|e| {
                AmqpError::Config(format!("amqp source `{}`: topic_prefix: {e}", config.name))
            })?;
        // As its configured user (its ACL applies; review F20), or as the operator's own part
        // of the gateway, which may publish anywhere.
        let principal = match &config.user {
            Some(user) => ctx.authorizer.user(user).ok_or_else(|| {
                AmqpError::Config(format!(
                    "amqp source `{}`: user `{user}` is not one of [[auth.users]]",
                    config.name
                ))
            })?,
            None => Principal::internal(format!("amqp-source:{}", config.name)),
        };
        Ok(Source {
            principal,
            consumer_tag: consumer_tag(&ctx.instance, &config.name),
            stop,
            looped: metrics.dropped(DropReason::Loop).clone(),
            rejected: metrics.dropped(DropReason::Rejected).clone(),
            bad_message: metrics.dropped(Refusal::BadMessage.drop_reason()).clone(),
            too_large: metrics.dropped(Refusal::TooLarge.drop_reason()).clone(),
            metrics,
            wrapper,
            prefix,
            link,
            config,
            reject_log: LogThrottle::new(REJECT_LOG_INTERVAL),
        })
    }

    /// The topic of a message: the prefix's levels, then the routing key's.
    fn topic(&self, routing_key: &str) -> Result<Topic, NoTopic> {
        let key = if routing_key.is_empty() {
            None
        } else {
            Some(Topic::from_amqp_routing_key(routing_key)?)
        };
        match (&self.prefix, key) {
            (Some(p), Some(k)) => Ok(Topic::from_levels(p.levels().chain(k.levels()))?),
            (Some(p), None) => Ok(p.clone()),
            (None, Some(k)) => Ok(k),
            (None, None) => Err(NoTopic::Missing),
        }
    }

    /// Decodes and publishes one delivery: what to tell RabbitMQ, now or once the backbone
    /// answered.
    fn handle<'a>(&'a self, ctx: &'a AdapterContext, d: Delivery) -> Handled<'a> {
        if binding::from_mesh(&d.properties) {
            self.looped.inc();
            return Handled::Now(Outcome::Ack);
        }
        let Some(routing_key) = &d.routing_key else {
            return Handled::Now(Outcome::Reject(
                "the routing key is not UTF-8: it names no topic".to_owned(),
            ));
        };
        let topic = match self.topic(routing_key.as_str()) {
            Ok(t) => t,
            Err(e) => return Handled::Now(Outcome::Reject(e.to_string())),
        };
        // A decoder panic is this message's fault: it is rejected (dead-lettered) and counted
        // like any bad message, rather than ending the task and coming back after the restart.
        let event = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            binding::decode(binding::Inbound {
                routing_key: routing_key.as_str(),
                properties: &d.properties,
                body: d.body,
                wrapper: &self.wrapper,
            })
        }));
        let mut event = match event {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                return Handled::Now(Outcome::Reject(format!("not a valid CloudEvent: {e}")));
            }
            Err(_) => {
                return Handled::Now(Outcome::Refuse(
                    Refusal::BadMessage,
                    "decoding it panicked (a meshgate bug: please report it)".to_owned(),
                ));
            }
        };
        meshgate_core::trace::adopt(
            &mut event,
            binding::trace_header(&d.properties, meshgate_core::trace::TRACEPARENT),
            binding::trace_header(&d.properties, meshgate_core::trace::TRACESTATE),
        );
        let envelope = match ctx.authorize(&self.metrics, &self.principal, topic) {
            Ok(authorized) => authorized.envelope(Arc::new(event), ctx.origin(0)),
            Err(e) => return Handled::Now(outcome(Err(e))),
        };
        match ctx.try_publish_envelope(&self.metrics, envelope) {
            Published::Done(r) => Handled::Now(outcome(r)),
            Published::Pending(f) => Handled::Later(Box::pin(async move { outcome(f.await) })),
        }
    }

    /// Tells RabbitMQ what became of delivery `tag` (acknowledgements are batched, see
    /// [`Acks`]; the rest is queued at once). True when the message was requeued: the caller
    /// pauses consuming for [`REQUEUE_PAUSE`].
    fn settle(&self, conn: &mut Connection, acks: &mut Acks, tag: u64, outcome: Outcome) -> bool {
        if !matches!(outcome, Outcome::Ack) {
            // Acknowledge what came before first: `multiple` must not cover this one.
            acks.flush(conn);
        }
        match outcome {
            Outcome::Ack => {
                acks.ack(conn, tag);
                false
            }
            Outcome::Reject(reason) => {
                self.rejected.inc();
                self.metrics.error(ErrorKind::BadEvent);
                self.log_reject(&reason);
                conn.reject(tag);
                false
            }
            Outcome::Refuse(kind, reason) => {
                match kind {
                    Refusal::BadMessage => self.bad_message.inc(),
                    Refusal::TooLarge => self.too_large.inc(),
                }
                self.metrics.error(kind.error_kind());
                self.log_reject(&reason);
                conn.reject(tag);
                false
            }
            Outcome::Requeue(reason) => {
                tracing::debug!(source = %self.config.name, %reason, "backbone refused for now; requeueing");
                conn.requeue(tag);
                true
            }
        }
    }

    fn log_reject(&self, reason: &str) {
        if self.reject_log.ready() {
            tracing::warn!(source = %self.config.name, queue = %self.config.queue, %reason,
                "rejected a message (requeue=false; the queue's dead-letter exchange gets it if it has one); further rejections in the next 10s are only counted");
        }
    }

    /// Declares (or checks) the queue and its bindings and starts consuming.
    async fn setup(&self, conn: &mut Connection) -> Result<(), AmqpError> {
        let c = &self.config;
        // Every name is a short string; the config checked their lengths, and this checks
        // again rather than trusting it (lapin's `From<&str>` panics over 255 bytes).
        let short = |what: &str, v: &str| {
            ShortString::try_new(v).map_err(|e| AmqpError::Config(format!("{what} `{v}`: {e}")))
        };
        let queue_name = short("queue", &c.queue)?;
        conn.call(AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: c.prefetch,
            global: false,
        })))
        .await?;
        let declare = queue::Declare {
            queue: queue_name.clone(),
            // A queue meshgate declares survives a broker restart; an application's queue is
            // only checked (passive): it must exist, and nothing about it changes.
            passive: c.exchange.is_none(),
            durable: c.exchange.is_some(),
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        };
        conn.call(AMQPClass::Queue(queue::AMQPMethod::Declare(declare)))
            .await?;
        if let Some(exchange) = &c.exchange {
            for key in &c.binding_keys {
                conn.call(AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                    queue: queue_name.clone(),
                    exchange: short("exchange", exchange)?,
                    routing_key: short("binding key", key)?,
                    nowait: false,
                    arguments: FieldTable::default(),
                })))
                .await?;
            }
        }
        conn.call(AMQPClass::Basic(basic::AMQPMethod::Consume(
            basic::Consume {
                queue: queue_name,
                consumer_tag: short("consumer tag", &self.consumer_tag)?,
                no_local: false,
                no_ack: false,
                exclusive: false,
                nowait: false,
                arguments: FieldTable::default(),
            },
        )))
        .await?;
        Ok(())
    }

    /// One connection's worth of consuming.
    async fn session(&self, ctx: &AdapterContext, mut conn: Connection) -> Ended {
        if let Err(e) = self.setup(&mut conn).await {
            conn.abandon().await;
            return Ended::Failed(
                e.during(format!("cannot consume queue `{}`", self.config.queue)),
            );
        }
        self.link.set_up();
        tracing::info!(source = %self.config.name, queue = %self.config.queue, "AMQP source consuming");
        let pipelined = ctx.backbone.publish_round_trips();
        let window = usize::from(self.config.prefetch);
        let mut inflight: FuturesOrdered<BoxFuture<'_, (u64, Outcome)>> = FuturesOrdered::new();
        let mut acks = Acks::new(ack_batch(self.config.prefetch));
        let ack_timer = tokio::time::sleep(ACK_DELAY);
        tokio::pin!(ack_timer);
        // After a requeue, consuming pauses (deliveries wait in the buffer) so that an
        // unavailable backbone is not a redelivery storm; reading, heartbeats and settling go
        // on meanwhile.
        let resume = tokio::time::sleep(REQUEUE_PAUSE);
        tokio::pin!(resume);
        let mut paused = false;
        let mut ticks = conn.tick_every().map(|every| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let failed = loop {
            // What the buffer holds first: deliveries can arrive with consume-ok, and a pause
            // or a full window leaves some behind.
            let handled = if paused || inflight.len() >= window {
                Ok(false)
            } else {
                self.deliveries(ctx, &mut conn, &mut acks, &mut inflight, pipelined, window)
                    .await
            };
            match handled {
                Ok(true) => {
                    paused = true;
                    resume
                        .as_mut()
                        .reset(tokio::time::Instant::now() + REQUEUE_PAUSE);
                }
                Ok(false) => {}
                Err(e) => break Some(e),
            }
            // Everything queued (acks, rejects, nacks, a heartbeat) goes out before waiting.
            if let Err(e) = conn.flush().await {
                break Some(e);
            }
            let step = tokio::select! {
                biased;
                () = self.stop.cancelled() => break None,
                Some((tag, outcome)) = inflight.next(), if !inflight.is_empty() => {
                    if self.settle(&mut conn, &mut acks, tag, outcome) && !paused {
                        paused = true;
                        resume.as_mut().reset(tokio::time::Instant::now() + REQUEUE_PAUSE);
                    }
                    Ok(())
                }
                () = &mut resume, if paused => {
                    paused = false;
                    Ok(())
                }
                // Read on while paused or with a full window, so heartbeats are heard, up to
                // READ_AHEAD unprocessed bytes (RabbitMQ sends no more than prefetch anyway).
                read = conn.read_more(), if conn.buffered() < READ_AHEAD => read,
                () = &mut ack_timer, if acks.pending() => {
                    acks.flush(&mut conn);
                    Ok(())
                }
                _ = async { ticks.as_mut()?.tick().await; Some(()) }, if ticks.is_some() => conn.tick(),
            };
            if let Err(e) = step {
                break Some(e);
            }
            if acks.started() {
                ack_timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + ACK_DELAY);
            }
        };
        match failed {
            Some(error) => {
                // The connection is gone or going: what is in flight is requeued by RabbitMQ,
                // and settling it could only queue frames behind a close-ok.
                conn.abandon().await;
                Ended::Failed(error)
            }
            None => {
                // Settle what is in flight: acknowledged publishes are acked, the rest is
                // requeued by RabbitMQ when the connection closes.
                while let Some((tag, outcome)) = inflight.next().await {
                    self.settle(&mut conn, &mut acks, tag, outcome);
                }
                acks.flush(&mut conn);
                conn.close("meshgate shutting down").await;
                Ended::Shutdown
            }
        }
    }

    /// Handles the deliveries the read buffer holds, up to `window` in flight. Over a backbone
    /// that settles at once (memory, NATS core) each is published and settled in turn; over
    /// one with round trips (JetStream) they join `inflight`, which settles them in arrival
    /// order. True when a message was requeued: the rest wait for the pause to end.
    async fn deliveries<'a>(
        &'a self,
        ctx: &'a AdapterContext,
        conn: &mut Connection,
        acks: &mut Acks,
        inflight: &mut FuturesOrdered<BoxFuture<'a, (u64, Outcome)>>,
        pipelined: bool,
        window: usize,
    ) -> Result<bool, AmqpError> {
        while inflight.len() < window {
            let handled = match conn.next_delivery()? {
                None => break,
                Some(Incoming::Message(d)) => (d.tag, self.handle(ctx, d)),
                Some(Incoming::Refused { tag, kind, reason }) => {
                    (tag, Handled::Now(Outcome::Refuse(kind, reason)))
                }
            };
            let (tag, handled) = handled;
            let requeued = match handled {
                Handled::Now(outcome) if !pipelined || inflight.is_empty() => {
                    self.settle(conn, acks, tag, outcome)
                }
                Handled::Now(outcome) => {
                    inflight.push_back(Box::pin(std::future::ready((tag, outcome))));
                    false
                }
                Handled::Later(f) if pipelined => {
                    inflight.push_back(Box::pin(async move { (tag, f.await) }));
                    false
                }
                Handled::Later(f) => {
                    let outcome = f.await;
                    self.settle(conn, acks, tag, outcome)
                }
            };
            if requeued {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Stops this source alone (a reload removed or changed it): it settles what it has in
    /// flight, cancels its consumer and closes, as at shutdown.
    pub(crate) fn halt(&self) {
        self.stop.cancel();
    }

    /// Fires when this source is to stop (shutdown, or [`Source::halt`]).
    pub(crate) fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    pub(crate) async fn run(
        self: Arc<Self>,
        ctx: AdapterContext,
        connector: Connector,
        config: Arc<AmqpConfig>,
    ) {
        let mut backoff = Backoff::new(&config);
        while !self.stop.is_cancelled() {
            let ended = match connector.consumer(&self.link).await {
                Ok(connection) => self.session(&ctx, connection).await,
                Err(e) => Ended::Failed(e),
            };
            match ended {
                Ended::Shutdown => return,
                Ended::Failed(error) => {
                    if !backoff.failed(&self.link, error, &self.stop).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Published deliveries not acknowledged yet; see [`ack_batch`].
struct Acks {
    /// The latest one: acking it with `multiple` covers the others.
    last: Option<u64>,
    count: usize,
    batch: usize,
    /// A batch began since [`Acks::started`] was last asked (its timer must start).
    began: bool,
}

impl Acks {
    fn new(batch: usize) -> Acks {
        Acks {
            last: None,
            count: 0,
            batch,
            began: false,
        }
    }

    fn pending(&self) -> bool {
        self.last.is_some()
    }

    /// Whether a batch began since the last call: the caller starts its [`ACK_DELAY`] timer.
    fn started(&mut self) -> bool {
        std::mem::take(&mut self.began) && self.pending()
    }

    fn ack(&mut self, conn: &mut Connection, tag: u64) {
        self.began |= self.last.is_none();
        self.last = Some(tag);
        self.count += 1;
        if self.count >= self.batch {
            self.flush(conn);
        }
    }

    /// Queues one `basic.ack` with `multiple` for everything acknowledged so far.
    fn flush(&mut self, conn: &mut Connection) {
        self.count = 0;
        if let Some(tag) = self.last.take() {
            conn.ack(tag, true);
        }
    }
}
