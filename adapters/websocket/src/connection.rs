//! One WebSocket connection after the upgrade.
//!
//! One task per connection (the upgraded connection's own) that polls, as one set: the
//! socket's reader, its writer, the connection's backbone subscriptions, the publish or
//! subscribe it is waiting for, the ping timer and the gateway's shutdown — as the MQTT
//! session does (no task or channel per subscription, [0041](../../../docs/decisions/0041-one-task-per-websocket-connection.md)):
//! - deliveries are taken from the subscriptions whenever they are ready, whatever the socket
//!   does, and queued for the client in the connection's outbound queue. When a delivery would
//!   take that queue past its byte budget (`websocket.outbound_queue_bytes`) the slow-consumer
//!   policy applies at once (disconnect with 1008, or drop and count), so the backbone queue
//!   behind a slow browser never fills and publishers never wait for it;
//! - the queue goes to the socket up to 64 frames per flush; deliveries are acknowledged to the
//!   backbone and counted as sent once the flush (or a close frame after them) went out;
//! - frames from the client are read one at a time: a publish or subscribe is awaited (as a
//!   boxed future polled with the rest) before the next frame is read, so a client that
//!   publishes faster than the backbone accepts is slowed by TCP, not buffered.

use meshgate_core::metrics::ErrorKind;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hyper_util::rt::TokioIo;
use meshgate_config::{PublishTopic, SlowConsumerPolicy};
use meshgate_core::filter::Filter as EventFilter;
use meshgate_core::metrics::AdapterMetrics;
use meshgate_core::{
    Delivery, Principal, PublishError, SubscribeGrant, SubscribeOptions, Subscription, Topic,
    TopicFilter,
};
use tokio::time::{Instant, Sleep};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, Utf8Bytes};

use crate::Shared;
use crate::binding::{self, FrameCode, FrameError, Inbound};
use crate::read_ahead::ReadAhead;
use meshgate_core::connections::{Registered, SubscriptionInfo};

/// The upgraded connection as the connection task sees it.
pub(crate) type WebSocket =
    tokio_tungstenite::WebSocketStream<ReadAhead<TokioIo<hyper::upgrade::Upgraded>>>;

/// The `io.meshgate.error` code for a backbone refusal: `unavailable` when the same frame may
/// go through later, `invalid_request` when sending it again won't help (too large, a topic
/// too long for the bus).
fn backbone_code(e: &meshgate_core::BackboneError) -> FrameCode {
    if e.is_retryable() {
        FrameCode::Unavailable
    } else {
        FrameCode::InvalidRequest
    }
}
/// How long a close frame may take to go out before the socket is simply dropped; at shutdown
/// also how long the subscriptions may take to hand over what they hold.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// RFC 6455 §7.4.1 close codes used here.
pub mod close_code {
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
}

enum Outbound {
    /// An event for the client, acknowledged to the backbone once written.
    Event(Utf8Bytes, Delivery),
    /// A gateway control or report event.
    Control(Utf8Bytes),
    /// Keep-alive ping (from the ping timer).
    Ping,
}

impl Outbound {
    /// What the message counts against `websocket.outbound_queue_bytes`: its text, which the
    /// connection may hold for as long as the client takes to read it, and its queue entry.
    /// (The JSON of an event is shared by every subscriber it goes to, so the budget is an
    /// upper bound on what one connection makes the process hold.)
    fn cost(&self) -> usize {
        match self {
            Outbound::Event(text, _) | Outbound::Control(text) => text.len() + ENTRY_COST,
            Outbound::Ping => 0,
        }
    }

    fn into_message(self) -> (Message, Option<Delivery>) {
        match self {
            Outbound::Event(text, delivery) => (Message::Text(text), Some(delivery)),
            Outbound::Control(text) => (Message::Text(text), None),
            Outbound::Ping => (Message::Ping(Default::default()), None),
        }
    }
}

/// What a queued message costs beside its text: its queue slot and the delivery it carries.
const ENTRY_COST: usize = std::mem::size_of::<Outbound>() + 32;

/// Most messages written with one flush.
const WRITE_BATCH: usize = 64;

/// Most deliveries taken from the subscriptions in one turn before the socket is served again.
const TAKE_BATCH: usize = 256;

fn close_frame(code: u16, reason: &str) -> CloseFrame {
    // Close reasons are limited to 123 bytes; ours are short ASCII.
    CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from(reason),
    }
}

/// One topic filter of the connection and its backbone subscription (`None` once the backbone
/// ended it, at shutdown).
struct Sub {
    filter: TopicFilter,
    stream: Option<Subscription>,
    /// Granted with a deny rule inside it ([`SubscribeGrant::Filtered`]): each delivery's
    /// topic is checked against the ACL.
    filtered: bool,
    /// The subscribe's `match`: only events that pass it are sent for this filter.
    matching: Option<Arc<EventFilter>>,
}

impl Sub {
    /// Whether this subscription wants `delivery`: its topic filter and its `match`.
    fn wants(&self, delivery: &Delivery) -> bool {
        self.filter.matches(delivery.topic())
            && self
                .matching
                .as_ref()
                .is_none_or(|m| m.matches(delivery.event()))
    }
}

/// A publish or subscribe the connection waits for before it reads the next frame.
type Op = Pin<Box<dyn Future<Output = OpDone> + Send>>;

enum OpDone {
    Published(Result<(), FrameError>),
    Subscribed(Vec<Result<Subscribed, FrameError>>),
}

/// A filter the backbone subscribed: the filter, whether the ACL filters it, the stream, and
/// the subscribe's `match`.
type Subscribed = (TopicFilter, bool, Subscription, Option<Arc<EventFilter>>);

/// What the connection's poll found to do.
enum Step {
    /// A frame from the client, the end of its stream, or a read error.
    Frame(Option<Result<Message, tungstenite::Error>>),
    /// The publish or subscribe finished.
    Op(OpDone),
    /// A flush went out: its deliveries are settled.
    Flushed,
    /// Deliveries not sent (another filter of this connection sends them, or dropped by the
    /// policy) wait for their acknowledgement.
    Ack,
    /// The ping timer fired (at shutdown: the drain's deadline).
    Timer,
    /// The gateway is shutting down.
    Shutdown,
    /// An operator closes the connection (admin API).
    Closed,
    /// The slow-consumer policy disconnects the client.
    Killed,
    /// The socket failed while writing.
    WriteFailed,
    /// Shutdown: every subscription ended and everything queued went out.
    Drained,
}

/// Per-connection state, owned by the connection's one task.
struct Conn {
    shared: Arc<Shared>,
    principal: Principal,
    id: u64,
    /// This connection in the admin API's registry, when that is on.
    listed: Option<Registered>,
    /// Filters in subscription order; an event matching several is delivered once, for the
    /// first matching filter.
    subs: Vec<Sub>,
    /// Where the next turn over the subscriptions starts (round-robin).
    next_sub: usize,
    /// Messages for the client not yet handed to the socket.
    queue: VecDeque<Outbound>,
    /// Bytes in `queue` (see [`Outbound::cost`]); at most `websocket.outbound_queue_bytes`,
    /// except that one message always fits into an empty queue.
    queued: usize,
    /// Frames were handed to the socket since its last flush.
    writing: bool,
    /// Deliveries handed to the socket since the last flush: acknowledged and counted as sent
    /// once a flush went out, or the close frame (which flushes everything before it).
    unflushed: Vec<Delivery>,
    /// Deliveries settled without being sent, to acknowledge (JetStream only).
    to_ack: Vec<Delivery>,
    /// The publish or subscribe being waited for; no frame is read meanwhile.
    op: Option<Op>,
    /// When the client last sent anything (frame or pong), for dead-peer detection.
    last_seen: Instant,
    /// Set by the slow-consumer policy: the close frame to send.
    killed: Option<CloseFrame>,
    /// Shutdown: no more frames are read; the subscriptions hand over what they hold.
    draining: bool,
}

impl Conn {
    fn budget(&self) -> usize {
        self.shared.config.read().outbound_queue_bytes
    }

    /// Queues `msg` if it fits into the byte budget; gives it back if not.
    fn push(&mut self, msg: Outbound) -> Result<(), Outbound> {
        let cost = msg.cost();
        if !self.queue.is_empty() && self.queued + cost > self.budget() {
            return Err(msg);
        }
        self.queued += cost;
        self.queue.push_back(msg);
        Ok(())
    }

    fn report(&mut self, err: &FrameError) {
        tracing::debug!(code = err.code.as_str(), message = %err.message, "websocket frame dropped");
        self.shared.metrics.error(err.code.kind());
        let text = Utf8Bytes::from(binding::error_event(err));
        // A client whose queue is full is being disconnected anyway; the report is not needed.
        let _ = self.push(Outbound::Control(text));
    }

    /// Tells the client (and the admin API) the filters the connection holds now.
    fn send_subscribed(&mut self) {
        let filters: Vec<TopicFilter> = self.subs.iter().map(|s| s.filter.clone()).collect();
        if let Some(listed) = &self.listed {
            listed.set_subscriptions(filters.iter().map(|f| SubscriptionInfo {
                filter: f.shared_str(),
                qos: None,
            }));
        }
        let text = Utf8Bytes::from(binding::subscribed_event(&filters));
        let _ = self.push(Outbound::Control(text));
    }

    /// Settles a delivery that is not sent: acknowledged if the backbone waits for that.
    fn settle_unsent(&mut self, delivery: Delivery) {
        if delivery.needs_ack() {
            self.to_ack.push(delivery);
        }
    }

    /// Routes one delivery of subscription `i`: queued for the client, settled (another
    /// filter sends it), or handed to the slow-consumer policy. False when the connection is
    /// to be disconnected.
    fn route(&mut self, i: usize, mut delivery: Delivery) -> bool {
        if self.subs[i].filtered
            && !self
                .shared
                .ctx
                .authorizer
                .may_receive(&self.principal, delivery.topic())
        {
            // A topic a deny rule keeps from this client: settled, not sent.
            self.settle_unsent(delivery);
            return true;
        }
        // The first subscription that wants it sends it: its topic filter and its `match`.
        let first = self.subs.iter().position(|s| s.wants(&delivery));
        if first != Some(i) {
            // Another of this connection's filters delivers it, its `match` leaves it out, or
            // it was just removed: this copy is settled (JetStream would otherwise deliver it
            // again).
            self.settle_unsent(delivery);
            return true;
        }
        // Tracing on: this delivery's span; the event sent carries its context.
        let _hop = meshgate_core::trace::deliver(
            "websocket deliver",
            meshgate_core::trace::SpanKind::Producer,
            &mut delivery.envelope,
        );
        // The JSON encoder writes UTF-8 only; checked anyway rather than trusted (no copy).
        let text = Utf8Bytes::try_from(delivery.envelope.json()).unwrap_or_default();
        match self.push(Outbound::Event(text, delivery)) {
            Ok(()) => true,
            Err(Outbound::Event(_, delivery)) => match self.shared.config.read().slow_consumer {
                SlowConsumerPolicy::Drop => {
                    self.shared.dropped_slow.inc();
                    self.settle_unsent(delivery);
                    true
                }
                SlowConsumerPolicy::Disconnect => {
                    self.shared.disconnected_slow.inc();
                    self.killed = Some(close_frame(
                        close_code::POLICY_VIOLATION,
                        "slow consumer: outbound queue full (websocket.outbound_queue_bytes)",
                    ));
                    false
                }
            },
            Err(_) => true,
        }
    }

    /// After a config reload (the authorizer's generation moved; one atomic load otherwise):
    /// the principal under the new rules (a user removed keeps no rights), and the
    /// subscriptions checked again. Those no longer granted end (their backbone subscription
    /// with them) and the client gets a `forbidden` error event naming each, then the list it
    /// holds now; the others take their new grant.
    fn reauthorize(&mut self) {
        let authorizer = &self.shared.ctx.authorizer;
        if authorizer.is_current(&self.principal) {
            return;
        }
        let principal = authorizer
            .refresh(&self.principal, None)
            .unwrap_or_else(|| authorizer.without_rights(&self.principal));
        let mut ended = Vec::new();
        self.subs.retain_mut(
            |s| match authorizer.check_subscribe(&principal, &s.filter) {
                Ok(grant) => {
                    s.filtered = grant == meshgate_core::SubscribeGrant::Filtered;
                    true
                }
                Err(_) => {
                    ended.push(s.filter.clone());
                    false
                }
            },
        );
        self.principal = principal;
        if ended.is_empty() {
            return;
        }
        self.next_sub = 0;
        for filter in ended {
            self.report(&FrameError::new(
                FrameCode::Forbidden,
                format!("the subscription to `{filter}` ended: the reloaded configuration no longer grants it"),
                None,
            ));
        }
        self.send_subscribed();
    }

    /// Takes what the subscriptions hold now (at most [`TAKE_BATCH`]); true if it took any.
    /// Subscriptions the backbone ended are kept as filters without a stream.
    fn poll_subscriptions(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        self.reauthorize();
        let mut took = 0;
        let n = self.subs.len();
        let mut idle = 0;
        while idle < n && took < TAKE_BATCH {
            let i = self.next_sub % n;
            self.next_sub = i + 1;
            let Some(stream) = self.subs[i].stream.as_mut() else {
                idle += 1;
                continue;
            };
            match Pin::new(stream).poll_next(cx) {
                Poll::Ready(Some(delivery)) => {
                    idle = 0;
                    took += 1;
                    if !self.route(i, delivery) {
                        return Poll::Ready(true);
                    }
                }
                Poll::Ready(None) => {
                    self.subs[i].stream = None;
                    idle += 1;
                }
                Poll::Pending => idle += 1,
            }
        }
        Poll::Ready(took > 0)
    }

    /// Hands queued messages to the socket and flushes them. `Ready(Some(step))` when there is
    /// something to do about it, `Ready(None)` when it made progress, `Pending` when it waits
    /// for the socket or has nothing to write.
    fn poll_write(&mut self, ws: &mut WebSocket, cx: &mut Context<'_>) -> Poll<Option<Step>> {
        if !self.writing {
            if self.queue.is_empty() {
                return Poll::Pending;
            }
            let mut fed = 0;
            while fed < WRITE_BATCH && !self.queue.is_empty() {
                match Pin::new(&mut *ws).poll_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(Some(Step::WriteFailed)),
                    Poll::Pending if fed == 0 => return Poll::Pending,
                    Poll::Pending => break,
                }
                let Some(msg) = self.queue.pop_front() else {
                    break;
                };
                self.queued -= msg.cost();
                let (message, delivery) = msg.into_message();
                if Pin::new(&mut *ws).start_send(message).is_err() {
                    return Poll::Ready(Some(Step::WriteFailed));
                }
                self.unflushed.extend(delivery);
                fed += 1;
            }
            self.writing = true;
        }
        match Pin::new(&mut *ws).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.writing = false;
                // An idle connection keeps no queue: the first few messages' block (4 entries,
                // 256 bytes: the subscription's confirmation, a ping) is given back once they
                // are written, as in every idle subscriber it stayed (issue 23); a queue grown by
                // a burst is kept.
                if self.queue.is_empty() && self.queue.capacity() <= 4 {
                    self.queue = VecDeque::new();
                }
                if self.unflushed.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Step::Flushed))
                }
            }
            Poll::Ready(Err(_)) => Poll::Ready(Some(Step::WriteFailed)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Waits for the next thing to do. `shutdown` and `timer` are the task's own futures.
    fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut WebSocket,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
        mut timer: Pin<&mut Sleep>,
    ) -> Poll<Step> {
        if !self.draining && shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Step::Shutdown);
        }
        if self
            .listed
            .as_ref()
            .is_some_and(|l| l.poll_closed(cx).is_ready())
        {
            return Poll::Ready(Step::Closed);
        }
        for round in 0.. {
            if round == 4 {
                // Still busy: the task comes back after the others had their turn.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.killed.is_some() {
                return Poll::Ready(Step::Killed);
            }
            if !self.to_ack.is_empty() {
                return Poll::Ready(Step::Ack);
            }
            // The socket first: what is queued goes out before more is taken.
            let wrote = match self.poll_write(ws, cx) {
                Poll::Ready(Some(step)) => return Poll::Ready(step),
                Poll::Ready(None) => true,
                Poll::Pending => false,
            };
            // Always taken, whether the socket keeps up or not: the policy applies here.
            let Poll::Ready(took) = self.poll_subscriptions(cx) else {
                unreachable!("poll_subscriptions is always ready")
            };
            if !wrote && !took {
                break;
            }
        }
        if let Some(op) = self.op.as_mut()
            && let Poll::Ready(done) = op.as_mut().poll(cx)
        {
            self.op = None;
            return Poll::Ready(Step::Op(done));
        }
        if self.draining {
            let ended = self.subs.iter().all(|s| s.stream.is_none());
            if ended && self.queue.is_empty() && !self.writing {
                return Poll::Ready(Step::Drained);
            }
        } else if self.op.is_none()
            && let Poll::Ready(frame) = Pin::new(&mut *ws).poll_next(cx)
        {
            return Poll::Ready(Step::Frame(frame));
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Step::Timer);
        }
        Poll::Pending
    }

    /// Counts the deliveries that went out with a flush as sent and acknowledges them.
    async fn settle_sent(&mut self) {
        self.shared.metrics.sent.add(self.unflushed.len() as u64);
        for d in self.unflushed.drain(..) {
            if d.needs_ack() {
                let _ = d.ack().await;
            }
        }
    }

    async fn ack_unsent(&mut self) {
        for d in std::mem::take(&mut self.to_ack) {
            let _ = d.ack().await;
        }
    }

    /// Starts what a text frame asks for: a publish or subscribe becomes `self.op`.
    fn handle_text(&mut self, text: &str) {
        self.reauthorize();
        match binding::decode_frame(text) {
            Err(e) => self.report(&e),
            Ok(Inbound::Publish(event)) => {
                let shared = &self.shared;
                let topic = match &shared.config.read().publish_topic {
                    PublishTopic::Fixed(t) => Topic::from_mqtt(t),
                    PublishTopic::Subject => match event.subject() {
                        Some(s) => Topic::from_mqtt(s),
                        None => {
                            self.report(&FrameError::new(
                                FrameCode::NoTopic,
                                "the event has no `subject`; set it to the topic to publish to",
                                Some(event.id()),
                            ));
                            return;
                        }
                    },
                };
                let topic = match topic {
                    Ok(t) => t,
                    Err(e) => {
                        self.report(&FrameError::new(
                            FrameCode::NoTopic,
                            e.to_string(),
                            Some(event.id()),
                        ));
                        return;
                    }
                };
                let shared = shared.clone();
                let principal = self.principal.clone();
                let origin = shared.ctx.origin(self.id);
                self.op = Some(Box::pin(async move {
                    let id = event.id().to_owned();
                    let published = shared
                        .ctx
                        .publish(&shared.metrics, &principal, topic, Arc::from(event), origin)
                        .await;
                    OpDone::Published(published.map_err(|e| {
                        let code = match &e {
                            PublishError::Forbidden(_) => FrameCode::Forbidden,
                            PublishError::Backbone(b) => backbone_code(b),
                        };
                        FrameError::new(code, e.to_string(), Some(&id))
                    }))
                }));
            }
            Ok(Inbound::Subscribe(filters, matching)) => self.subscribe(filters, matching),
            Ok(Inbound::Unsubscribe(filters)) => {
                for filter in &filters {
                    // Dropping the stream ends the backbone subscription.
                    self.subs.retain(|s| &s.filter != filter);
                }
                self.send_subscribed();
            }
        }
    }

    /// Starts subscribing to `filters` (checked against the ACL and `websocket.max_filters`
    /// here, subscribed by the backbone in `self.op`); answered with `io.meshgate.subscribed`.
    fn subscribe(&mut self, filters: Vec<TopicFilter>, matching: Option<Arc<EventFilter>>) {
        let shared = self.shared.clone();
        let max = shared.config.read().max_filters;
        let mut held = self.subs.len();
        let mut wanted = Vec::with_capacity(filters.len());
        let mut refused = Vec::new();
        for filter in filters {
            if let Some(sub) = self.subs.iter_mut().find(|s| s.filter == filter) {
                // Subscribed already: its `match` is replaced.
                sub.matching = matching.clone();
                continue;
            }
            if wanted.iter().any(|(f, _)| *f == filter) {
                continue;
            }
            let filtered = match shared
                .ctx
                .authorizer
                .check_subscribe(&self.principal, &filter)
            {
                Ok(grant) => grant == SubscribeGrant::Filtered,
                Err(e) => {
                    refused.push(FrameError::new(FrameCode::Forbidden, e.to_string(), None));
                    continue;
                }
            };
            // Each filter is a backbone subscription (on JetStream a consumer on the server):
            // a client may not subscribe without end.
            if held >= max {
                shared.metrics.error(ErrorKind::TooManyFilters);
                refused.push(FrameError::new(
                    FrameCode::InvalidRequest,
                    format!(
                        "`{filter}` refused: at most {max} topic filters per connection (websocket.max_filters)"
                    ),
                    None,
                ));
                continue;
            }
            held += 1;
            wanted.push((filter, filtered));
        }
        for e in &refused {
            self.report(e);
        }
        let connection = self.id;
        self.op = Some(Box::pin(async move {
            let matching = matching;
            let mut done = Vec::with_capacity(wanted.len());
            for (filter, filtered) in wanted {
                let sub = shared
                    .ctx
                    .backbone
                    .subscribe(filter.clone(), SubscribeOptions::default())
                    .await
                    .map_err(|e| FrameError::new(backbone_code(&e), e.to_string(), None));
                if sub.is_ok() {
                    tracing::debug!(connection, %filter, "websocket subscribed");
                }
                done.push(sub.map(|s| (filter, filtered, s, matching.clone())));
            }
            OpDone::Subscribed(done)
        }));
    }

    fn finish_op(&mut self, done: OpDone) {
        match done {
            OpDone::Published(Ok(())) => {}
            OpDone::Published(Err(e)) => self.report(&e),
            OpDone::Subscribed(results) => {
                for r in results {
                    match r {
                        Ok((filter, filtered, stream, matching)) => {
                            // Most connections hold one filter: room for one, not four.
                            if self.subs.capacity() == 0 {
                                self.subs.reserve_exact(1);
                            }
                            self.subs.push(Sub {
                                filter,
                                stream: Some(stream),
                                filtered,
                                matching,
                            });
                        }
                        Err(e) => self.report(&e),
                    }
                }
                self.send_subscribed();
            }
        }
    }

    /// Writes what is queued and flushes it, within `within`; false if that failed or took
    /// longer. Subscriptions are not polled meanwhile.
    async fn flush_queue(&mut self, ws: &mut WebSocket, within: Duration) -> bool {
        let flushed = tokio::time::timeout(within, async {
            loop {
                let step = std::future::poll_fn(|cx| match self.poll_write(ws, cx) {
                    Poll::Ready(step) => Poll::Ready(step),
                    Poll::Pending if self.queue.is_empty() && !self.writing => {
                        Poll::Ready(Some(Step::Drained))
                    }
                    Poll::Pending => Poll::Pending,
                })
                .await;
                match step {
                    Some(Step::Flushed) => self.settle_sent().await,
                    Some(Step::Drained) => return true,
                    Some(_) => return false,
                    None => {}
                }
            }
        })
        .await;
        matches!(flushed, Ok(true))
    }

    /// Sends `frame` after whatever was handed to the socket already; what went out before it
    /// is counted as sent.
    async fn send_close(&mut self, ws: &mut WebSocket, frame: CloseFrame) {
        let closed =
            tokio::time::timeout(CLOSE_TIMEOUT, ws.send(Message::Close(Some(frame)))).await;
        if matches!(closed, Ok(Ok(()))) {
            self.settle_sent().await;
        }
    }
}

/// Why the connection stopped reading.
enum End {
    /// The client closed or vanished (or the socket failed).
    Client,
    /// Close the connection with this frame, after what is already queued.
    Close(CloseFrame),
    /// Shutdown: the subscriptions handed over what they hold; queued events, then 1001.
    Shutdown,
    /// The slow-consumer policy or the ping check fired: send this close frame after what the
    /// socket has already, and drop the queue.
    Killed(CloseFrame),
}

/// The close a read error calls for; counted in `meshgate_errors_total` (`bad_frame`,
/// `too_large`, `protocol`) like every other refusal of client input.
fn classify_error(err: tungstenite::Error, max: usize, metrics: &AdapterMetrics) -> End {
    match err {
        tungstenite::Error::Utf8(_) => {
            metrics.error(ErrorKind::BadFrame);
            End::Close(close_frame(
                close_code::INVALID_PAYLOAD,
                "text frame is not valid UTF-8",
            ))
        }
        tungstenite::Error::Capacity(_) => {
            metrics.error(ErrorKind::TooLarge);
            End::Close(close_frame(
                close_code::MESSAGE_TOO_BIG,
                &format!("message larger than {max} bytes"),
            ))
        }
        tungstenite::Error::Protocol(p) => {
            tracing::debug!(error = %p, "websocket protocol error");
            metrics.error(ErrorKind::Protocol);
            End::Close(close_frame(close_code::PROTOCOL_ERROR, "protocol error"))
        }
        _ => End::Client,
    }
}

/// Runs a connection until the client leaves, a protocol rule closes it, the slow-consumer
/// policy disconnects it, or the gateway shuts down (what its subscriptions hold and the queue
/// go out first, then close 1001).
///
/// A plain function returning an `async move` block rather than an `async fn`: rustc keeps an
/// async fn's arguments as upvars and again as locals, so the 360-byte WebSocket stream and
/// the principal took their space twice in every idle connection's task (the MQTT session's
/// loop is written the same way, decision 0020).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in its future (see above)"
)]
pub(crate) fn run(
    mut ws: WebSocket,
    shared: Arc<Shared>,
    principal: Principal,
    initial: Vec<TopicFilter>,
    listed: Option<Registered>,
) -> impl Future<Output = ()> + Send {
    async move {
        let id = listed
            .as_ref()
            .map_or_else(|| shared.ctx.next_connection_id(), |l| l.id());
        let ping_interval = shared.config.read().ping_interval;
        let max = shared.config.read().max_message_size;
        tracing::debug!(
            connection = id,
            principal = principal.name(),
            "websocket connected"
        );
        let shutdown = shared.ctx.shutdown.clone();
        let shutdown = shutdown.cancelled();
        tokio::pin!(shutdown);
        let timer = tokio::time::sleep(ping_interval);
        tokio::pin!(timer);
        let mut conn = Conn {
            shared,
            principal,
            id,
            listed,
            subs: Vec::new(),
            next_sub: 0,
            queue: VecDeque::new(),
            queued: 0,
            writing: false,
            unflushed: Vec::new(),
            to_ack: Vec::new(),
            op: None,
            last_seen: Instant::now(),
            killed: None,
            draining: false,
        };
        // Answered with the greeting `io.meshgate.subscribed` (also without filters), so a client
        // knows when it is subscribed.
        conn.subscribe(initial, None);

        let end = loop {
            // What the admin API shows of this connection's load.
            if let Some(listed) = &conn.listed {
                listed.set_load(conn.queue.len(), conn.unflushed.len());
            }
            let step = std::future::poll_fn(|cx| {
                conn.poll_step(cx, &mut ws, shutdown.as_mut(), timer.as_mut())
            })
            .await;
            match step {
                Step::Frame(frame) => {
                    conn.last_seen = Instant::now();
                    match frame {
                        None => break End::Client,
                        Some(Err(e)) => break classify_error(e, max, &conn.shared.metrics),
                        Some(Ok(Message::Text(text))) => conn.handle_text(text.as_str()),
                        Some(Ok(Message::Binary(_))) => {
                            break End::Close(close_frame(
                                close_code::UNSUPPORTED_DATA,
                                "binary frames are not supported on cloudevents.json; send JSON text frames",
                            ));
                        }
                        // Pings are answered by the protocol layer; a close frame is answered there
                        // too and the stream then ends.
                        Some(Ok(_)) => {}
                    }
                }
                Step::Op(done) => conn.finish_op(done),
                Step::Flushed => conn.settle_sent().await,
                Step::Ack => conn.ack_unsent().await,
                Step::Timer if conn.draining => break End::Shutdown,
                Step::Timer => {
                    timer.as_mut().reset(Instant::now() + ping_interval);
                    // A peer that answered nothing for two ping intervals is gone (half-open TCP,
                    // suspended laptop): close instead of holding its resources forever.
                    if conn.last_seen.elapsed() > ping_interval * 2 {
                        conn.shared.metrics.error(ErrorKind::PingTimeout);
                        break End::Killed(close_frame(
                            close_code::GOING_AWAY,
                            "no answer to pings",
                        ));
                    }
                    conn.queue.push_back(Outbound::Ping);
                }
                Step::Closed => {
                    tracing::info!(
                        connection = id,
                        "websocket closed by an operator (admin API)"
                    );
                    break End::Close(close_frame(
                        close_code::POLICY_VIOLATION,
                        "closed by an operator",
                    ));
                }
                Step::Shutdown => {
                    // The backbone was closed first: each subscription ends once it handed over
                    // what it holds. The timer becomes the deadline for that.
                    conn.draining = true;
                    timer.as_mut().reset(Instant::now() + CLOSE_TIMEOUT);
                }
                Step::Drained => break End::Shutdown,
                Step::Killed => {
                    let frame = conn.killed.take().unwrap_or_else(|| {
                        close_frame(close_code::POLICY_VIOLATION, "slow consumer")
                    });
                    break End::Killed(frame);
                }
                Step::WriteFailed => break End::Client,
            }
        };
        // The subscriptions end here (except at shutdown, where they ended already).
        conn.subs.clear();
        match end {
            End::Shutdown => {
                let frame = close_frame(close_code::GOING_AWAY, "server shutting down");
                close(&mut conn, &mut ws, frame).await;
            }
            End::Close(frame) => close(&mut conn, &mut ws, frame).await,
            End::Killed(frame) => {
                tracing::info!(
                    connection = id,
                    "websocket closed by policy (slow consumer or no pong)"
                );
                // Never wait long for a client that does not read: what the socket has already,
                // then the close frame, and no waiting for its answer.
                conn.queue.clear();
                conn.send_close(&mut ws, frame).await;
            }
            End::Client => {}
        }
        conn.ack_unsent().await;
        tracing::debug!(connection = id, "websocket disconnected");
    }
}

/// Closes with `frame` after what is queued, then waits for the client's answer.
async fn close(conn: &mut Conn, ws: &mut WebSocket, frame: CloseFrame) {
    tracing::debug!(connection = conn.id, code = u16::from(frame.code), reason = %frame.reason, "closing websocket");
    if !conn.flush_queue(ws, CLOSE_TIMEOUT * 2).await {
        return;
    }
    conn.send_close(ws, frame).await;
    // Let the client answer the close handshake.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async { while ws.next().await.is_some() {} }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<F, Fut>(_: &F) -> usize
    where
        F: Fn(WebSocket, Arc<Shared>, Principal, Vec<TopicFilter>, Option<Registered>) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// An idle connection's memory is mostly its task, whose size is this future's: 1,632
    /// bytes with the admin API's registry handle (an `Option`, 16 bytes). rustc adds to it
    /// silently; raise the bound only knowingly (`ws-idle` measures what it costs).
    #[test]
    fn an_idle_connections_future_stays_small() {
        let size = returned_size(&run);
        assert!(size <= 1_664, "connection::run's future is {size} bytes");
    }
}
