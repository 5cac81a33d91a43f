//! One WebSocket connection after the upgrade.
//!
//! Three kinds of task per connection, so that nothing one client does can hold up another:
//! - the **reader** (this module's `run`): frames from the client → publish / (un)subscribe;
//! - the **writer**: drains the connection's bounded outbound queue into the socket, sends
//!   pings, acknowledges backbone deliveries once written;
//! - one **pump** per topic filter: backbone subscription → outbound queue. A pump never waits
//!   for the socket: when an event would take the outbound queue past its byte budget
//!   (`websocket.outbound_queue_bytes`) the slow-consumer policy applies at once (disconnect
//!   with 1008, or drop and count), so the backbone queue behind it never fills because of a
//!   slow browser.

use meshgate_core::metrics::ErrorKind;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use meshgate_config::{PublishTopic, SlowConsumerPolicy};
use meshgate_core::metrics::AdapterMetrics;
use meshgate_core::{
    Delivery, Principal, PublishError, SubscribeOptions, Subscription, Topic, TopicFilter,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::binding::{self, FrameCode, FrameError, Inbound};

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
/// How long a close frame may take to go out before the socket is simply dropped.
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
    /// Keep-alive ping (from the writer's own timer).
    Ping,
    /// Send this close frame after everything queued before it, then stop.
    Close(CloseFrame),
}

impl Outbound {
    /// What the message counts against `websocket.outbound_queue_bytes`: its text, which the
    /// connection may hold for as long as the client takes to read it, and its queue entry.
    /// (The JSON of an event is shared by every subscriber it goes to, so the budget is an
    /// upper bound on what one connection makes the process hold.)
    fn cost(&self) -> usize {
        match self {
            Outbound::Event(text, _) | Outbound::Control(text) => text.len() + ENTRY_COST,
            Outbound::Ping | Outbound::Close(_) => 0,
        }
    }
}

/// What a queued message costs beside its text: its queue slot and the delivery it carries.
const ENTRY_COST: usize = std::mem::size_of::<Outbound>() + 32;

fn close_frame(code: u16, reason: &str) -> CloseFrame {
    // Close reasons are limited to 123 bytes; ours are short ASCII.
    CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    }
}

/// Per-connection state shared between the reader and the pumps.
struct Conn {
    shared: Arc<Shared>,
    /// When the client last sent anything (frame or pong), for dead-peer detection.
    last_seen: Mutex<tokio::time::Instant>,
    out: mpsc::UnboundedSender<Outbound>,
    /// Bytes in `out` (see [`Outbound::cost`]); at most `websocket.outbound_queue_bytes`, except
    /// that one message always fits into an empty queue.
    queued: AtomicUsize,
    /// Fired by a pump when the slow-consumer policy disconnects the client.
    kill: CancellationToken,
    /// The close frame to send when `kill` fires.
    kill_frame: Mutex<Option<CloseFrame>>,
    /// The connection's filters in subscription order; an event matching several is delivered
    /// once, by the pump of the first matching filter.
    filters: RwLock<Vec<TopicFilter>>,
}

impl Conn {
    /// Queues `msg` if it fits into the byte budget; gives it back if not.
    fn push(&self, msg: Outbound) -> Result<(), Outbound> {
        let cost = msg.cost();
        let budget = self.shared.config.outbound_queue_bytes;
        let room = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q == 0 || q + cost <= budget).then_some(q + cost)
            });
        if room.is_err() {
            return Err(msg);
        }
        self.out.send(msg).map_err(|e| {
            self.queued.fetch_sub(cost, Ordering::AcqRel);
            e.0
        })
    }

    /// Gives back the budget of a message taken from the queue.
    fn taken(&self, msg: &Outbound) {
        self.queued.fetch_sub(msg.cost(), Ordering::AcqRel);
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_seen.lock() {
            *t = tokio::time::Instant::now();
        }
    }

    fn report(&self, err: &FrameError) {
        tracing::debug!(code = err.code.as_str(), message = %err.message, "websocket frame dropped");
        self.shared.metrics.error(err.code.kind());
        let text = Utf8Bytes::from(binding::error_event(err));
        // A client whose queue is full is being disconnected anyway; the report is not needed.
        let _ = self.push(Outbound::Control(text));
    }

    fn send_subscribed(&self) {
        let filters = self.filters.read().map(|f| f.clone()).unwrap_or_default();
        let text = Utf8Bytes::from(binding::subscribed_event(&filters));
        let _ = self.push(Outbound::Control(text));
    }

    /// The first filter (in subscription order) that matches `topic`.
    fn first_match(&self, topic: &Topic) -> Option<TopicFilter> {
        let filters = self.filters.read().ok()?;
        filters.iter().find(|f| f.matches(topic)).cloned()
    }

    fn disconnect_slow(&self) {
        if let Ok(mut frame) = self.kill_frame.lock() {
            frame.get_or_insert_with(|| {
                close_frame(
                    close_code::POLICY_VIOLATION,
                    "slow consumer: outbound queue full (websocket.outbound_queue_bytes)",
                )
            });
        }
        self.kill.cancel();
    }
}

/// Forwards one subscription into the outbound queue.
async fn pump(conn: Arc<Conn>, filter: TopicFilter, mut sub: Subscription) {
    while let Some(delivery) = sub.next().await {
        if conn.first_match(delivery.topic()).as_ref() != Some(&filter) {
            // Another of this connection's filters delivers it (or it was just removed): this
            // copy is settled (JetStream would otherwise deliver it again).
            let _ = delivery.ack().await;
            continue;
        }
        // The JSON encoder writes UTF-8 only; checked anyway rather than trusted (no copy).
        let text = Utf8Bytes::try_from(delivery.envelope.json()).unwrap_or_default();
        match conn.push(Outbound::Event(text, delivery)) {
            Ok(()) => {}
            Err(Outbound::Event(_, delivery)) => {
                if conn.out.is_closed() {
                    return;
                }
                match conn.shared.config.slow_consumer {
                    SlowConsumerPolicy::Drop => {
                        conn.shared.dropped_slow.inc();
                        let _ = delivery.ack().await;
                    }
                    SlowConsumerPolicy::Disconnect => {
                        conn.shared.disconnected_slow.inc();
                        conn.disconnect_slow();
                        return;
                    }
                }
            }
            Err(_) => return,
        }
    }
}

/// The connection's pumps, aborted when the connection ends.
struct Pumps {
    handles: HashMap<TopicFilter, JoinHandle<()>>,
}

impl Drop for Pumps {
    fn drop(&mut self) {
        for h in self.handles.values() {
            h.abort();
        }
    }
}

impl Pumps {
    async fn add(
        &mut self,
        conn: &Arc<Conn>,
        filter: TopicFilter,
        connection: u64,
    ) -> Result<(), FrameError> {
        if self.handles.contains_key(&filter) {
            return Ok(());
        }
        // Each filter is a backbone subscription and a pump task (on JetStream a consumer on
        // the server): a client may not subscribe without end.
        let max = conn.shared.config.max_filters;
        if self.handles.len() >= max {
            conn.shared.metrics.error(ErrorKind::TooManyFilters);
            return Err(FrameError::new(
                FrameCode::InvalidRequest,
                format!(
                    "`{filter}` refused: at most {max} topic filters per connection (websocket.max_filters)"
                ),
                None,
            ));
        }
        let sub = conn
            .shared
            .ctx
            .backbone
            .subscribe(filter.clone(), SubscribeOptions::default())
            .await
            .map_err(|e| FrameError::new(backbone_code(&e), e.to_string(), None))?;
        if let Ok(mut filters) = conn.filters.write() {
            filters.push(filter.clone());
        }
        let task = tokio::spawn(pump(conn.clone(), filter.clone(), sub));
        tracing::debug!(connection, %filter, "websocket subscribed");
        self.handles.insert(filter, task);
        Ok(())
    }

    /// Lets every pump forward what its subscription still holds. At shutdown the backbone is
    /// closed first, so each subscription ends after its queue is empty and its pump returns.
    async fn drain(mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        for (_, handle) in self.handles.drain() {
            let abort = handle.abort_handle();
            if tokio::time::timeout_at(deadline, handle).await.is_err() {
                abort.abort();
            }
        }
    }

    fn remove(&mut self, conn: &Conn, filter: &TopicFilter) {
        if let Some(h) = self.handles.remove(filter) {
            h.abort();
        }
        if let Ok(mut filters) = conn.filters.write() {
            filters.retain(|f| f != filter);
        }
    }
}

/// Most messages written with one flush.
const WRITE_BATCH: usize = 64;

/// Writes queued messages; returns when told to close, when the socket fails or is killed.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    conn: Arc<Conn>,
) {
    let mut ping = tokio::time::interval(conn.shared.config.ping_interval);
    ping.tick().await;
    // Deliveries handed to the socket since the last flush: acknowledged and counted as sent
    // once a flush went out, or the close frame (which flushes everything before it). A slow
    // consumer killed in the middle of a batch still gets the events already handed over,
    // then the close frame, so they are counted then, not lost from `events_sent_total`.
    let mut unflushed: Vec<Delivery> = Vec::new();
    loop {
        let next = tokio::select! {
            biased;
            _ = conn.kill.cancelled() => None,
            msg = rx.recv() => {
                if let Some(m) = &msg {
                    conn.taken(m);
                }
                msg
            }
            _ = ping.tick() => {
                // A peer that answered nothing for two ping intervals is gone (half-open TCP,
                // suspended laptop): close instead of holding its resources forever.
                let silent = conn.last_seen.lock().map(|t| t.elapsed()).unwrap_or_default();
                if silent > conn.shared.config.ping_interval * 2 {
                    conn.shared.metrics.error(ErrorKind::PingTimeout);
                    if let Ok(mut frame) = conn.kill_frame.lock() {
                        frame.get_or_insert_with(|| close_frame(close_code::GOING_AWAY, "no answer to pings"));
                    }
                    conn.kill.cancel();
                    None
                } else {
                    Some(Outbound::Ping)
                }
            }
        };
        let Some(first) = next else { break };
        // The first message and whatever else is queued already go out with one flush: a
        // `send` per event cost a write system call each, most of the gateway's CPU per event
        // when events arrive a few at a time.
        let mut close = None;
        let written = async {
            let mut next = Some(first);
            let mut fed = 0;
            while let Some(msg) = next.take() {
                let (message, delivery) = match msg {
                    Outbound::Event(text, delivery) => (Message::Text(text), Some(delivery)),
                    Outbound::Ping => (Message::Ping(Default::default()), None),
                    Outbound::Control(text) => (Message::Text(text), None),
                    Outbound::Close(frame) => {
                        close = Some(frame);
                        break;
                    }
                };
                // Cancelled before `feed` completes, the message was not handed over.
                sink.feed(message).await?;
                unflushed.extend(delivery);
                fed += 1;
                if fed < WRITE_BATCH {
                    next = rx.try_recv().ok();
                    if let Some(m) = &next {
                        conn.taken(m);
                    }
                }
            }
            sink.flush().await
        };
        let sent = tokio::select! {
            biased;
            _ = conn.kill.cancelled() => break,
            r = written => r.is_ok(),
        };
        if !sent {
            return;
        }
        settle(&conn, &mut unflushed).await;
        if let Some(frame) = close {
            let _ =
                tokio::time::timeout(CLOSE_TIMEOUT, sink.send(Message::Close(Some(frame)))).await;
            return;
        }
    }
    // Killed (slow consumer): try to say why, but never wait long for a client that does not read.
    let frame = conn.kill_frame.lock().ok().and_then(|mut f| f.take());
    if let Some(frame) = frame {
        let closed =
            tokio::time::timeout(CLOSE_TIMEOUT, sink.send(Message::Close(Some(frame)))).await;
        if matches!(closed, Ok(Ok(()))) {
            settle(&conn, &mut unflushed).await;
        }
    }
}

/// Counts the deliveries that went out with a flush as sent and acknowledges them.
async fn settle(conn: &Conn, unflushed: &mut Vec<Delivery>) {
    conn.shared.metrics.sent.add(unflushed.len() as u64);
    for d in unflushed.drain(..) {
        let _ = d.ack().await;
    }
}

/// Why the reader stopped.
enum End {
    /// The client closed or vanished.
    Client,
    /// Close the connection with this frame, after what is already queued.
    Close(CloseFrame),
    /// The slow-consumer policy fired; the writer sends the close frame.
    Killed,
}

/// The close a read error calls for; counted in `meshgate_errors_total` (`bad_frame`,
/// `too_large`, `protocol`) like every other refusal of client input.
fn classify_error(err: axum::Error, max: usize, metrics: &AdapterMetrics) -> End {
    let inner = err.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Utf8(_)) => {
            metrics.error(ErrorKind::BadFrame);
            End::Close(close_frame(
                close_code::INVALID_PAYLOAD,
                "text frame is not valid UTF-8",
            ))
        }
        Some(tungstenite::Error::Capacity(_)) => {
            metrics.error(ErrorKind::TooLarge);
            End::Close(close_frame(
                close_code::MESSAGE_TOO_BIG,
                &format!("message larger than {max} bytes"),
            ))
        }
        Some(tungstenite::Error::Protocol(p)) => {
            tracing::debug!(error = %p, "websocket protocol error");
            metrics.error(ErrorKind::Protocol);
            End::Close(close_frame(close_code::PROTOCOL_ERROR, "protocol error"))
        }
        _ => End::Client,
    }
}

async fn handle_text(
    conn: &Arc<Conn>,
    pumps: &mut Pumps,
    principal: &Principal,
    connection: u64,
    text: &str,
) {
    let shared = &conn.shared;
    match binding::decode_frame(text) {
        Err(e) => conn.report(&e),
        Ok(Inbound::Publish(event)) => {
            let topic = match &shared.config.publish_topic {
                PublishTopic::Fixed(t) => Topic::from_mqtt(t),
                PublishTopic::Subject => match event.subject() {
                    Some(s) => Topic::from_mqtt(s),
                    None => {
                        conn.report(&FrameError::new(
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
                    conn.report(&FrameError::new(
                        FrameCode::NoTopic,
                        e.to_string(),
                        Some(event.id()),
                    ));
                    return;
                }
            };
            let id = event.id().to_owned();
            let origin = shared.ctx.origin(connection);
            if let Err(e) = shared
                .ctx
                .publish(&shared.metrics, principal, topic, Arc::from(event), origin)
                .await
            {
                let code = match &e {
                    PublishError::Forbidden(_) => FrameCode::Forbidden,
                    PublishError::Backbone(b) => backbone_code(b),
                };
                conn.report(&FrameError::new(code, e.to_string(), Some(&id)));
            }
        }
        Ok(Inbound::Subscribe(filters)) => {
            for filter in filters {
                if let Err(e) = shared.ctx.authorizer.check_subscribe(principal, &filter) {
                    conn.report(&FrameError::new(FrameCode::Forbidden, e.to_string(), None));
                    continue;
                }
                if let Err(e) = pumps.add(conn, filter, connection).await {
                    conn.report(&e);
                }
            }
            conn.send_subscribed();
        }
        Ok(Inbound::Unsubscribe(filters)) => {
            for filter in &filters {
                pumps.remove(conn, filter);
            }
            conn.send_subscribed();
        }
    }
}

/// Runs a connection until the client leaves, a protocol rule closes it, the slow-consumer
/// policy disconnects it, or the gateway shuts down (close 1001 after flushing the queue).
pub(crate) async fn run(
    socket: WebSocket,
    shared: Arc<Shared>,
    principal: Principal,
    initial: Vec<TopicFilter>,
) {
    let connection = shared.ctx.next_connection_id();
    let (sink, mut stream): (SplitSink<WebSocket, Message>, SplitStream<WebSocket>) =
        socket.split();
    let (out, rx) = mpsc::unbounded_channel();
    let conn = Arc::new(Conn {
        shared: shared.clone(),
        out,
        queued: AtomicUsize::new(0),
        kill: CancellationToken::new(),
        kill_frame: Mutex::new(None),
        last_seen: Mutex::new(tokio::time::Instant::now()),
        filters: RwLock::new(Vec::new()),
    });
    let writer = tokio::spawn(write_loop(sink, rx, conn.clone()));
    let mut pumps = Pumps {
        handles: HashMap::new(),
    };
    for filter in initial {
        if let Err(e) = pumps.add(&conn, filter, connection).await {
            conn.report(&e);
        }
    }
    conn.send_subscribed();
    tracing::debug!(
        connection,
        principal = principal.name(),
        "websocket connected"
    );

    let max = shared.config.max_message_size;
    let end = loop {
        tokio::select! {
            biased;
            _ = shared.ctx.shutdown.cancelled() => {
                break End::Close(close_frame(close_code::GOING_AWAY, "server shutting down"));
            }
            _ = conn.kill.cancelled() => break End::Killed,
            frame = stream.next() => {
                conn.touch();
                match frame {
                None => break End::Client,
                Some(Err(e)) => break classify_error(e, max, &shared.metrics),
                Some(Ok(Message::Text(text))) => {
                    handle_text(&conn, &mut pumps, &principal, connection, text.as_str()).await;
                }
                Some(Ok(Message::Binary(_))) => break End::Close(close_frame(
                    close_code::UNSUPPORTED_DATA,
                    "binary frames are not supported on cloudevents.json; send JSON text frames",
                )),
                // Pings are answered by the protocol layer; a close frame is answered there too
                // and the stream then ends.
                Some(Ok(_)) => {}
                }
            }
        }
    };
    match end {
        End::Close(frame) => {
            if frame.code == close_code::GOING_AWAY {
                // Shutdown: what the backbone already holds for this client goes out first.
                pumps.drain(CLOSE_TIMEOUT).await;
            } else {
                drop(pumps);
            }
            tracing::debug!(connection, code = frame.code, reason = %frame.reason, "closing websocket");
            // Queued events go out first, then the close frame.
            if conn.out.send(Outbound::Close(frame)).is_err() {
                conn.kill.cancel();
            }
            let _ = tokio::time::timeout(CLOSE_TIMEOUT * 2, writer).await;
            // Let the client answer the close handshake.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                while stream.next().await.is_some() {}
            })
            .await;
        }
        End::Killed => {
            drop(pumps);
            tracing::info!(
                connection,
                "websocket closed by policy (slow consumer or no pong)"
            );
            let _ = tokio::time::timeout(CLOSE_TIMEOUT * 2, writer).await;
        }
        End::Client => {
            drop(pumps);
            conn.kill.cancel();
            writer.abort();
        }
    }
    tracing::debug!(connection, "websocket disconnected");
}
