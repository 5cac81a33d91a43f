//! A sink: mesh events matching a topic filter, published to an exchange.
//!
//! The sink subscribes to the backbone once, in the queue group `amqp-sink:<name>`, so that
//! with several gateway instances each event is published to RabbitMQ by one of them. Every
//! message goes out with publisher confirms; the backbone delivery is acknowledged only after
//! RabbitMQ confirmed it. Deliveries whose confirm failed with their connection are kept and
//! published again, in order, on the next connection (at least once: RabbitMQ may have stored
//! some of them); one whose confirm never came within `CONFIRM_DRAIN` is dropped and counted
//! (`reason="unconfirmed"`; over JetStream it is redelivered after `ack_wait`). A nacked
//! message is published again after a pause, on the same connection. On shutdown the sink
//! forwards everything its subscription still holds: it ends when the backbone closes the
//! subscription. A message published with the mandatory flag that no queue takes
//! comes back as a return: counted (`reason="unroutable"`), logged, and acknowledged, since
//! publishing it again would not route it either.

use meshgate_core::metrics::{DropReason, ErrorKind};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Confirmation, Connection, ExchangeKind};
use meshgate_config::{AmqpConfig, AmqpSinkConfig};
use meshgate_core::metrics::{AdapterMetrics, Counter};
use meshgate_core::throttle::LogThrottle;
use meshgate_core::{
    AdapterContext, BoxFuture, Delivery, SubscribeOptions, Subscription, TopicFilter,
};
use tokio_util::sync::CancellationToken;

use crate::binding;
use crate::error::AmqpError;
use crate::link::{Backoff, Connector, Ended, Link};

/// How long a failed connection's outstanding confirms are waited for before their deliveries
/// are queued for the next connection anyway.
const CONFIRM_DRAIN: Duration = Duration::from_secs(5);

/// Returns and encoding failures are logged at most this often per sink (each one is counted).
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Pause before a message RabbitMQ nacked is published again (a full queue stays full for a
/// while; this throttles the sink instead of spinning).
const NACK_PAUSE: Duration = Duration::from_millis(200);

/// What became of one published message.
enum Settled {
    /// Confirmed (or returned as unroutable, counted): the backbone delivery is acknowledged.
    Done,
    /// Nacked by RabbitMQ: publish it again.
    Again(Delivery),
    /// The connection failed before the confirm: publish it again on the next one.
    Failed(Delivery, AmqpError),
}

type Confirming = BoxFuture<'static, (Delivery, Result<Confirmation, lapin::Error>)>;

pub(crate) struct Sink {
    pub(crate) config: AmqpSinkConfig,
    pub(crate) link: Arc<Link>,
    filter: TopicFilter,
    instance: Arc<str>,
    metrics: AdapterMetrics,
    unroutable: Counter,
    unencodable: Counter,
    unreachable: Counter,
    /// `exchange` as a short string (config checked it holds at most 255 bytes).
    exchange: lapin::types::ShortString,
    warn_log: LogThrottle,
    /// Fires when a reload removed or changed this sink: it stops taking events, waits for its
    /// outstanding confirms and closes. Not at shutdown, when the sink keeps taking what the
    /// backbone still hands over until the subscription ends.
    removed: CancellationToken,
    /// Fires at shutdown and when removed: ends the reconnect loop and its pauses.
    halt: CancellationToken,
}

/// The deliveries a sink holds across connections.
struct State {
    subscription: Subscription,
    /// Not yet confirmed by RabbitMQ; published first on the next connection, in order.
    retry: VecDeque<Delivery>,
    /// The subscription ended (shutdown) while the sink was not connected: it is not polled
    /// again.
    closed: bool,
    /// The backbone redelivers what is not acknowledged (JetStream): while RabbitMQ cannot be
    /// reached, a full `retry` stops the sink from reading instead of dropping (see `hold`).
    redelivers: bool,
}

impl Sink {
    pub(crate) fn new(
        config: AmqpSinkConfig,
        link: Arc<Link>,
        ctx: &AdapterContext,
        metrics: AdapterMetrics,
    ) -> Result<Sink, AmqpError> {
        let filter = TopicFilter::parse(&config.filter)
            .map_err(|e| AmqpError::Config(format!("amqp sink `{}`: filter: {e}", config.name)))?;
        let exchange =
            lapin::types::ShortString::try_new(config.exchange.as_str()).map_err(|e| {
                AmqpError::Config(format!("amqp sink `{}`: exchange: {e}", config.name))
            })?;
        Ok(Sink {
            unroutable: metrics.dropped(DropReason::Unroutable).clone(),
            unencodable: metrics.dropped(DropReason::Unencodable).clone(),
            unreachable: metrics.dropped(DropReason::Unreachable).clone(),
            exchange,
            metrics,
            instance: ctx.instance.clone(),
            filter,
            link,
            config,
            warn_log: LogThrottle::new(WARN_INTERVAL),
            removed: CancellationToken::new(),
            halt: ctx.shutdown.child_token(),
        })
    }

    /// Stops this sink alone (a reload removed or changed it): see [`Sink::removed`]. What it
    /// holds unconfirmed comes again on JetStream (to the sink's queue group) and is counted
    /// as dropped on the other backbones.
    pub(crate) fn halt(&self) {
        self.removed.cancel();
        self.halt.cancel();
    }

    /// Fires at shutdown and on [`Sink::halt`].
    pub(crate) fn halt_token(&self) -> CancellationToken {
        self.halt.clone()
    }

    fn warn(&self, what: &str, detail: &str) {
        if self.warn_log.ready() {
            tracing::warn!(sink = %self.config.name, exchange = %self.config.exchange, %detail,
                "{what}; further ones in the next 10s are only counted");
        }
    }

    /// Encodes and publishes one delivery; the future resolves with RabbitMQ's confirm. `Err`
    /// hands the delivery back when the channel failed before the message was sent.
    async fn publish(
        &self,
        channel: &lapin::Channel,
        frame_max: u32,
        mut delivery: Delivery,
    ) -> Result<Option<Confirming>, (Delivery, lapin::Error)> {
        // Tracing on: this delivery's span, and its context on the message.
        let _hop = meshgate_core::trace::deliver(
            "amqp publish",
            meshgate_core::trace::SpanKind::Producer,
            &mut delivery.envelope,
        );
        let envelope = delivery.envelope.clone();
        // Everything written is checked first (short strings, the header frame against
        // frame_max): an event AMQP cannot carry is skipped for this sink and counted, never
        // truncated, and never sent to make RabbitMQ close the connection.
        // A panic in the encoder is this event's fault: skipped and counted like an event
        // AMQP cannot carry, rather than ending the sink's task.
        let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            binding::routing_key(&self.config.routing_key, &envelope.topic, &envelope.event)
                .and_then(|key| {
                    let m = binding::encode(
                        &envelope.event,
                        || envelope.json(),
                        self.config.mode,
                        self.config.persistent,
                        &self.instance,
                    )?;
                    m.fits(frame_max)?;
                    Ok((key, m))
                })
                .map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|_| {
            Err("encoding it panicked (a meshgate bug: please report it)".to_owned())
        });
        let (routing_key, message) = match encoded {
            Ok(x) => x,
            Err(e) => {
                self.unencodable.inc();
                self.metrics.error(ErrorKind::Unencodable);
                self.warn("an event cannot be written as an AMQP message; dropped", &e);
                let _ = delivery.ack().await;
                return Ok(None);
            }
        };
        let sent = channel
            .basic_publish(
                self.exchange.clone(),
                routing_key,
                BasicPublishOptions {
                    mandatory: self.config.mandatory,
                    immediate: false,
                },
                &message.body,
                message.properties,
            )
            .await;
        match sent {
            Ok(confirm) => Ok(Some(Box::pin(async move { (delivery, confirm.await) }))),
            Err(e) => Err((delivery, e)),
        }
    }

    /// Acts on RabbitMQ's answer for one message. `Err`: the connection failed; the delivery
    /// is handed back to be published again.
    async fn confirmed(
        &self,
        delivery: Delivery,
        confirm: Result<Confirmation, lapin::Error>,
    ) -> Settled {
        match confirm {
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => {
                self.metrics.sent.inc();
                let _ = delivery.ack().await;
                Settled::Done
            }
            Ok(Confirmation::Ack(Some(returned))) => {
                self.unroutable.inc();
                let reply = returned.reply_text.to_string();
                self.warn(
                    "RabbitMQ returned a message no queue is bound for (mandatory flag)",
                    &format!("routing key `{}`: {reply}", returned.delivery.routing_key),
                );
                let _ = delivery.ack().await;
                Settled::Done
            }
            Ok(Confirmation::Nack(_)) => {
                // The broker did not take it (a full queue with `x-overflow = reject-publish`,
                // an internal error): publish it again after a pause, on the same connection.
                self.metrics.error(ErrorKind::BrokerNack);
                self.warn("RabbitMQ nacked a message; publishing it again", "");
                Settled::Again(delivery)
            }
            Err(e) => Settled::Failed(delivery, e.into()),
        }
    }

    async fn setup(&self, connection: &Connection) -> Result<lapin::Channel, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        if !self.config.exchange.is_empty() {
            // The exchange belongs to the application: check that it exists, change nothing.
            channel
                .exchange_declare(
                    self.exchange.clone(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(channel)
    }

    async fn session(&self, connection: Connection, state: &mut State) -> Ended {
        let mut events = connection.events_listener();
        let channel = match self.setup(&connection).await {
            Ok(c) => c,
            Err(e) => {
                let _ = connection.close(200, "setup failed".into()).await;
                return Ended::Failed(AmqpError::from(e).during(format!(
                    "cannot publish to exchange `{}`",
                    self.config.exchange
                )));
            }
        };
        self.link.set_up();
        tracing::info!(sink = %self.config.name, exchange = %self.config.exchange, filter = %self.filter, "AMQP sink publishing");
        let frame_max = connection.configuration().frame_max();
        let mut inflight: FuturesOrdered<Confirming> = FuturesOrdered::new();
        // Deliveries to publish again on the next connection, oldest first: those whose
        // confirm failed, then the one whose publish failed.
        let mut handed_back: Vec<Delivery> = Vec::new();
        let mut unsent: Option<Delivery> = None;
        let window = self.config.max_in_flight;
        let outcome = loop {
            if state.closed && state.retry.is_empty() {
                // The subscription closed while RabbitMQ was unreachable: nothing more comes.
                break None;
            }
            // Deliveries held from the last connection go first.
            if inflight.len() < window
                && let Some(d) = state.retry.pop_front()
            {
                match self.publish(&channel, frame_max, d).await {
                    Ok(Some(c)) => inflight.push_back(c),
                    Ok(None) => {}
                    Err((d, e)) => {
                        unsent = Some(d);
                        break Some(AmqpError::from(e));
                    }
                }
                continue;
            }
            tokio::select! {
                biased;
                Some((d, confirm)) = inflight.next(), if !inflight.is_empty() => {
                    match self.confirmed(d, confirm).await {
                        Settled::Done => {}
                        Settled::Again(d) => {
                            tokio::time::sleep(NACK_PAUSE).await;
                            state.retry.push_front(d);
                        }
                        Settled::Failed(d, e) => {
                            handed_back.push(d);
                            break Some(e);
                        }
                    }
                }
                // Removed by a reload: no more events; the confirms outstanding are awaited below.
                () = self.removed.cancelled() => break None,
                event = events.next() => match event {
                    Some(lapin::Event::Error(e)) => break Some(AmqpError::from(e)),
                    // A resource alarm (memory, disk): RabbitMQ stops reading what we publish.
                    Some(lapin::Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(sink = %self.config.name, %reason, "RabbitMQ blocked the connection");
                        self.link.set_blocked(format!("RabbitMQ blocked the connection: {reason}"));
                    }
                    Some(lapin::Event::ConnectionUnblocked) => self.link.set_up(),
                    Some(_) => {}
                    None => break Some(AmqpError::Closed),
                },
                next = state.subscription.next(), if inflight.len() < window && !state.closed => match next {
                    Some(d) => match self.publish(&channel, frame_max, d).await {
                        Ok(Some(c)) => inflight.push_back(c),
                        Ok(None) => {}
                        Err((d, e)) => {
                            unsent = Some(d);
                            break Some(AmqpError::from(e));
                        }
                    },
                    // The backbone closed the subscription (shutdown) after handing over all
                    // it held: finish what is in flight below.
                    None => break None,
                },
            }
        };
        // Wait for the outstanding confirms; on a failed connection they resolve with errors
        // (or not at all: bounded by CONFIRM_DRAIN) and their deliveries are kept for the next.
        let drain = async {
            while let Some((d, confirm)) = inflight.next().await {
                match self.confirmed(d, confirm).await {
                    Settled::Done => {}
                    Settled::Again(d) | Settled::Failed(d, _) => handed_back.push(d),
                }
            }
        };
        let _ = tokio::time::timeout(CONFIRM_DRAIN, drain).await;
        // Deliveries whose confirm never came are dropped with `inflight`; over JetStream they
        // are redelivered after ack_wait, over the memory and NATS core backbones they are lost
        // and counted.
        let unconfirmed = inflight.len();
        if unconfirmed > 0 {
            self.metrics
                .dropped(DropReason::Unconfirmed)
                .add(unconfirmed as u64);
        }
        handed_back.extend(unsent);
        for d in handed_back.into_iter().rev() {
            state.retry.push_front(d);
        }
        match outcome {
            Some(error) => {
                let _ = connection.close(200, "reconnecting".into()).await;
                Ended::Failed(error)
            }
            None => {
                let _ = connection.close(200, "meshgate shutting down".into()).await;
                Ended::Shutdown
            }
        }
    }

    /// Runs `work` (a connection attempt, the pause before the next) while taking deliveries
    /// off the subscription, so that the backbone never waits on a sink that cannot publish.
    async fn draining<T>(&self, state: &mut State, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        loop {
            // A backbone that redelivers keeps what the sink does not read, and its publishers
            // do not wait on this subscription: with `retry` full the sink stops reading.
            let room = !state.redelivers || state.retry.len() < self.config.max_in_flight;
            tokio::select! {
                biased;
                out = &mut work => return out,
                next = state.subscription.next(), if !state.closed && room => match next {
                    Some(d) => self.hold(state, d),
                    None => state.closed = true,
                },
            }
        }
    }

    /// A delivery that arrived while RabbitMQ cannot be reached: kept for the next connection
    /// (published first, in order) up to `max_in_flight`. Past that, on a backbone that
    /// redelivers (JetStream) it is kept too and the sink stops reading (`draining`): the
    /// stream keeps the rest, nothing is lost, nobody waits. On the others (memory, NATS core)
    /// it is dropped and counted as `reason="unreachable"`: reading on is what keeps the
    /// memory backbone's publishers from waiting on this subscription (`block` policy).
    fn hold(&self, state: &mut State, d: Delivery) {
        if d.needs_ack() {
            state.redelivers = true;
        }
        if state.retry.len() < self.config.max_in_flight || d.needs_ack() {
            state.retry.push_back(d);
            return;
        }
        self.unreachable.inc();
        self.warn(
            "RabbitMQ cannot be reached and the sink holds max_in_flight events; dropping",
            "",
        );
    }

    pub(crate) async fn run(
        self: Arc<Self>,
        ctx: AdapterContext,
        connector: Connector,
        config: Arc<AmqpConfig>,
    ) {
        let mut backoff = Backoff::new(&config);
        let options = SubscribeOptions {
            queue_group: Some(format!("amqp-sink:{}", self.config.name)),
            capacity: None,
            durable: None,
            max_in_flight: None,
            ack_wait: None,
        };
        let subscription = loop {
            match ctx
                .backbone
                .subscribe(self.filter.clone(), options.clone())
                .await
            {
                Ok(s) => break s,
                Err(source) => {
                    let error = AmqpError::Subscribe {
                        filter: self.filter.to_string(),
                        source,
                    };
                    if !backoff.failed(&self.link, error, &self.halt).await {
                        return;
                    }
                }
            }
        };
        let mut state = State {
            subscription,
            retry: VecDeque::new(),
            closed: false,
            redelivers: false,
        };
        while !self.halt.is_cancelled() {
            // While it connects (up to amqp.connect_timeout) and between attempts, the sink
            // keeps taking deliveries (see `hold`): a sink that cannot reach RabbitMQ must not
            // fill its backbone queue and make publishers wait on it (review F3).
            let connected = self
                .draining(&mut state, connector.connect(&self.link))
                .await;
            let ended = match connected {
                Ok(connection) => self.session(connection, &mut state).await,
                Err(e) => Ended::Failed(e),
            };
            match ended {
                Ended::Shutdown => break,
                Ended::Failed(error) => {
                    let wait = backoff.failed(&self.link, error, &self.halt);
                    if !self.draining(&mut state, wait).await {
                        break;
                    }
                }
            }
        }
        // Shutdown while RabbitMQ could not be reached: what the sink still holds is lost
        // (over JetStream: redelivered to another instance after ack_wait), and counted.
        if !state.retry.is_empty() {
            self.metrics
                .dropped(DropReason::Shutdown)
                .add(state.retry.len() as u64);
        }
    }
}
