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

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Acker, Connection};
use meshgate_config::{AmqpConfig, AmqpSourceConfig};
use meshgate_core::metrics::{AdapterMetrics, Counter};
use meshgate_core::throttle::LogThrottle;
use meshgate_core::wrap::Wrapper;
use meshgate_core::{AdapterContext, BoxFuture, Envelope, Principal, PublishError, Topic};
use tokio_util::sync::CancellationToken;

use crate::binding;
use crate::link::{self, Backoff, Connector, Ended, Link};

/// Pause before a message the backbone refused for now is handed back to RabbitMQ, so that an
/// unavailable backbone does not turn into a redelivery storm.
const REQUEUE_PAUSE: Duration = Duration::from_millis(200);

/// Acknowledgements are batched: one `basic.ack` with `multiple` covers up to a quarter of
/// the prefetch window of consecutive published messages, or whatever was published when no
/// further delivery is waiting (so a quiet queue is acknowledged at once). One ack frame per
/// message cost RabbitMQ and meshgate a frame and a hop through lapin's I/O loop each; a
/// quarter of the window keeps RabbitMQ sending while the batch fills.
fn ack_batch(prefetch: u16) -> usize {
    usize::from(prefetch / 4).max(1)
}

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

/// What to tell RabbitMQ about one delivery.
#[derive(Debug)]
enum Outcome {
    /// Published (or skipped on purpose): `basic.ack`.
    Ack,
    /// Never a valid event: `basic.reject` without requeue (dead-lettered where configured).
    Reject(String),
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
    consumer_tag: String,
    /// Fires when the sources stop (before the backbone closes, at shutdown).
    stop: CancellationToken,
    reject_log: LogThrottle,
}

impl Source {
    pub(crate) fn new(
        config: AmqpSourceConfig,
        link: Arc<Link>,
        ctx: &AdapterContext,
        metrics: AdapterMetrics,
        stop: CancellationToken,
    ) -> Result<Source, String> {
        let wrapper = Wrapper::new(config.wrap_source.clone(), config.wrap_type.clone())
            .map_err(|e| format!("amqp source `{}`: {e}", config.name))?;
        let prefix = config
            .topic_prefix
            .as_deref()
            .map(Topic::from_mqtt)
            .transpose()
            .map_err(|e| format!("amqp source `{}`: topic_prefix: {e}", config.name))?;
        Ok(Source {
            principal: Principal::internal(format!("amqp-source:{}", config.name)),
            consumer_tag: consumer_tag(&ctx.instance, &config.name),
            stop,
            looped: metrics.dropped("loop"),
            rejected: metrics.dropped("rejected"),
            metrics,
            wrapper,
            prefix,
            link,
            config,
            reject_log: LogThrottle::new(REJECT_LOG_INTERVAL),
        })
    }

    /// The topic of a message: the prefix's levels, then the routing key's.
    fn topic(&self, routing_key: &str) -> Result<Topic, String> {
        let key = if routing_key.is_empty() {
            None
        } else {
            Some(Topic::from_amqp_routing_key(routing_key).map_err(|e| e.to_string())?)
        };
        match (&self.prefix, key) {
            (Some(p), Some(k)) => {
                Topic::from_levels(p.levels().chain(k.levels())).map_err(|e| e.to_string())
            }
            (Some(p), None) => Ok(p.clone()),
            (None, Some(k)) => Ok(k),
            (None, None) => Err(
                "the message has no routing key and the source no topic_prefix: it has no topic"
                    .to_owned(),
            ),
        }
    }

    /// Decodes and publishes one delivery; the future resolves to what to tell RabbitMQ.
    fn handle<'a>(
        &'a self,
        ctx: &'a AdapterContext,
        routing_key: &str,
        properties: &lapin::BasicProperties,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Outcome> {
        if binding::from_mesh(properties) {
            self.looped.inc();
            return Box::pin(async { Outcome::Ack });
        }
        let topic = match self.topic(routing_key) {
            Ok(t) => t,
            Err(e) => return Box::pin(async move { Outcome::Reject(e) }),
        };
        let event = binding::decode(binding::Inbound {
            routing_key,
            properties,
            body: Bytes::from(body),
            wrapper: &self.wrapper,
        });
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                let reason = format!("not a valid CloudEvent: {e}");
                return Box::pin(async move { Outcome::Reject(reason) });
            }
        };
        let envelope = Envelope::new(topic, Arc::new(event), ctx.origin(0));
        Box::pin(async move {
            match ctx
                .publish_envelope(&self.metrics, &self.principal, envelope)
                .await
            {
                Ok(()) => Outcome::Ack,
                Err(PublishError::Backbone(e)) if e.is_retryable() => {
                    Outcome::Requeue(e.to_string())
                }
                Err(e) => Outcome::Reject(e.to_string()),
            }
        })
    }

    async fn settle(
        &self,
        acks: &mut Acks,
        acker: Acker,
        outcome: Outcome,
    ) -> Result<(), lapin::Error> {
        if !matches!(outcome, Outcome::Ack) {
            // Acknowledge what came before first: `multiple` must not cover this one.
            acks.flush().await?;
        }
        match outcome {
            Outcome::Ack => acks.ack(acker).await,
            Outcome::Reject(reason) => {
                self.rejected.inc();
                self.metrics.error("bad_event");
                self.log_reject(&reason);
                acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await
                    .map(drop)
            }
            Outcome::Requeue(reason) => {
                tracing::debug!(source = %self.config.name, %reason, "backbone refused for now; requeueing");
                if !self.stop.is_cancelled() {
                    tokio::time::sleep(REQUEUE_PAUSE).await;
                }
                acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await
                    .map(drop)
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
    async fn setup(
        &self,
        connection: &Connection,
    ) -> Result<(lapin::Channel, lapin::Consumer), lapin::Error> {
        let c = &self.config;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(c.prefetch, BasicQosOptions::default())
            .await?;
        let queue = ShortString::from(c.queue.as_str());
        match &c.exchange {
            Some(exchange) => {
                channel
                    .queue_declare(
                        queue.clone(),
                        QueueDeclareOptions {
                            durable: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                for key in &c.binding_keys {
                    channel
                        .queue_bind(
                            queue.clone(),
                            exchange.as_str().into(),
                            key.as_str().into(),
                            QueueBindOptions::default(),
                            FieldTable::default(),
                        )
                        .await?;
                }
            }
            None => {
                // The queue belongs to the application: check that it exists, change nothing.
                channel
                    .queue_declare(
                        queue.clone(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        let consumer = channel
            .basic_consume(
                queue,
                self.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, consumer))
    }

    /// One connection's worth of consuming.
    async fn session(&self, ctx: &AdapterContext, connection: Connection) -> Ended {
        let (channel, mut consumer) = match self.setup(&connection).await {
            Ok(x) => x,
            Err(e) => {
                let _ = connection.close(200, "setup failed".into()).await;
                return Ended::Failed(format!(
                    "cannot consume queue `{}`: {}",
                    self.config.queue,
                    link::describe(&e)
                ));
            }
        };
        self.link.set_up();
        tracing::info!(source = %self.config.name, queue = %self.config.queue, "AMQP source consuming");
        let pipelined = ctx.backbone.publish_round_trips();
        let window = usize::from(self.config.prefetch);
        let mut inflight: FuturesOrdered<BoxFuture<'_, (Acker, Outcome)>> = FuturesOrdered::new();
        let mut acks = Acks::new(ack_batch(self.config.prefetch));
        let failed = loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break None,
                Some((acker, outcome)) = inflight.next(), if !inflight.is_empty() => {
                    if let Err(e) = self.settle(&mut acks, acker, outcome).await {
                        break Some(format!("cannot acknowledge: {}", link::describe(&e)));
                    }
                }
                next = consumer.next(), if inflight.len() < window => match next {
                    Some(Ok(d)) => {
                        let outcome = self.handle(ctx, d.routing_key.as_str(), &d.properties, d.data);
                        if pipelined {
                            let acker = d.acker;
                            inflight.push_back(Box::pin(async move { (acker, outcome.await) }));
                        } else if let Err(e) = self.settle(&mut acks, d.acker, outcome.await).await {
                            break Some(format!("cannot acknowledge: {}", link::describe(&e)));
                        }
                    }
                    Some(Err(e)) => break Some(link::describe(&e)),
                    None => break Some("the broker cancelled the consumer (queue deleted?)".to_owned()),
                },
                // Nothing else is ready: acknowledge what has been published.
                () = std::future::ready(()), if acks.pending() => {
                    if let Err(e) = acks.flush().await {
                        break Some(format!("cannot acknowledge: {}", link::describe(&e)));
                    }
                }
            }
        };
        // Settle what is in flight: acknowledged publishes are acked, the rest is requeued by
        // RabbitMQ when the channel closes.
        while let Some((acker, outcome)) = inflight.next().await {
            if self.settle(&mut acks, acker, outcome).await.is_err() {
                break;
            }
        }
        let _ = acks.flush().await;
        match failed {
            Some(error) => {
                let _ = connection.close(200, "reconnecting".into()).await;
                Ended::Failed(error)
            }
            None => {
                let _ = channel
                    .basic_cancel(
                        self.consumer_tag.as_str().into(),
                        BasicCancelOptions::default(),
                    )
                    .await;
                let _ = connection.close(200, "meshgate shutting down".into()).await;
                Ended::Shutdown
            }
        }
    }

    pub(crate) async fn run(
        self: Arc<Self>,
        ctx: AdapterContext,
        connector: Connector,
        config: Arc<AmqpConfig>,
    ) {
        let mut backoff = Backoff::new(&config);
        while !self.stop.is_cancelled() {
            let ended = match connector.connect(&self.link).await {
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
    last: Option<Acker>,
    count: usize,
    batch: usize,
}

impl Acks {
    fn new(batch: usize) -> Acks {
        Acks {
            last: None,
            count: 0,
            batch,
        }
    }

    fn pending(&self) -> bool {
        self.last.is_some()
    }

    async fn ack(&mut self, acker: Acker) -> Result<(), lapin::Error> {
        self.last = Some(acker);
        self.count += 1;
        if self.count >= self.batch {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), lapin::Error> {
        self.count = 0;
        match self.last.take() {
            Some(a) => a.ack(BasicAckOptions { multiple: true }).await.map(drop),
            None => Ok(()),
        }
    }
}
