//! The NATS core client of the `nats` backbone: the hot path every event takes.
//!
//! Why not async-nats here (it stays for JetStream streams, consumers and KV; JetStream
//! publishes and acks use this client too, see [`crate::jetstream`]): measured in the bench
//! program, async-nats publishing the two headers every meshgate message carries delivers
//! 283k msg/s instead of 722k without them — each message becomes a `HeaderMap` (a `HashMap`
//! with a `String` per name and value) on both sides, plus a command through a channel to the
//! connection task.
//! This client writes `HPUB` lines straight into one buffer that a writer task sends in as few
//! writes as it can, and hands received messages over with their header block unparsed
//! ([`super::wire`] reads the few headers it needs from the bytes).
//!
//! Events can also be handed over unencoded ([`Client::publish_later`]): the writer task
//! encodes them, in order with everything else, as it fills its next write. The publisher's
//! task (an MQTT connection reading its socket) then only queues an `Arc`; the JSON and
//! Base64 work runs beside it, on the writer's task, into buffers reused for every message.
//!
//! What it does (the NATS client protocol, <https://docs.nats.io/reference/reference-protocols/nats-protocol>):
//! `CONNECT` with `headers`, `echo` as asked, user/password or token; `PING`/`PONG` both ways
//! (a keep-alive every [`super::connection::PING_INTERVAL`], the connection is dropped after
//! [`super::connection::MAX_PINGS_OUTSTANDING`] unanswered); `SUB`/`UNSUB` with optional queue groups, re-sent
//! after a reconnect; `MSG`/`HMSG`; `INFO` (`max_payload`, `tls_required`); `-ERR` logged.
//! `tls://` URLs (or a server requiring TLS) use rustls with the system's root certificates.
//! Reconnects forever, over the URLs in turn, with a backoff up to
//! [`super::connector::MAX_BACKOFF`].
//!
//! Guarantees: what is appended while connected is written in order; on a disconnect the
//! unwritten rest is dropped (NATS core is at most once; the backbone refuses publishes while
//! disconnected). An event queued with a [`Confirm`] is confirmed only once the server answered
//! the `PING` written after it (the server read it); events lost with a connection are counted
//! (`Options::discarded`), and their waiting publishers told. A subscription that falls `capacity` messages (or `subscription_bytes`)
//! behind loses messages (slow consumer), counted; a message over the server's `max_payload`
//! is skipped unread, counted. The connection task runs under a supervisor that restarts it
//! after a panic (counted).
//!
//! Where the parts are: this file has the API and the state it shares with the connection
//! task (the write buffer, the subscriptions) and the byte-bounded subscription queue;
//! [`super::connector`] connects, reconnects and supervises; [`super::connection`] runs one
//! connection (reader, writer, keep-alive); [`super::proto`] writes and parses the protocol
//! without I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use meshgate_core::Envelope;
use meshgate_core::metrics::Counter;
use meshgate_core::throttle::LogThrottle;
use tokio::sync::{Notify, oneshot};

use crate::queue::TrySendError;

use super::overlap::Overlap;
pub(crate) use super::proto::Msg;
use super::proto::{
    PUB_LINE_OVERHEAD, not_a_subject, pub_line_len, write_pub, write_sub, write_unsub,
};
use super::servers::ServerPool;
use super::wire::HeaderError;

/// At most one slow-consumer warning per this interval (every drop is counted).
pub(crate) const SLOW_CONSUMER_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Bytes appended and not yet written beyond which publishers wait for the writer.
pub(super) const MAX_PENDING: usize = 8 << 20;

/// How to reach the servers.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub urls: Vec<String>,
    pub name: String,
    pub echo: bool,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// A CA and a client certificate for TLS connections.
    pub tls: meshgate_config::NatsTlsConfig,
    /// NKey authentication: its file, read at each connection.
    pub nkey: Option<meshgate_config::NatsNkey>,
    pub connect_timeout: Duration,
    pub subscription_capacity: usize,
    /// Bytes (headers and payload) a subscription's queue holds at most, besides
    /// `subscription_capacity` messages; past it messages are dropped (slow consumer).
    pub subscription_bytes: usize,
    pub slow_consumer: Counter,
    /// Messages from the server over its own `max_payload` (+ [`super::connection::INBOUND_SLACK`]), skipped.
    pub too_large: Counter,
    /// The connection task ended by a panic (it is restarted).
    pub panicked: Counter,
    /// Counts each established connection that was lost (not the ones closed on purpose).
    pub disconnects: Counter,
    /// Events ([`Client::publish_later`]) lost with their connection: appended and not
    /// written, in a write that failed or was cut short, or written and not yet confirmed by the
    /// server when a publisher waits for that (`meshgate_backbone_dropped_total{reason="disconnected"}`).
    /// Events written without a confirmation asked for (MQTT QoS 0) are not known lost and not
    /// counted.
    pub discarded: Counter,
    /// How the writer encodes what [`Client::publish_later`] queued; needed only by it.
    pub later: Option<Arc<dyn EncodeLater>>,
    /// Longest protocol line (`PUB`/`HPUB`/`SUB` with subject, reply subject or queue group,
    /// and sizes) sent: the server's `max_control_line`, which INFO does not announce.
    /// nats-server answers a longer line with `-ERR 'Maximum Control Line Exceeded'` and closes
    /// the connection, which every client of this instance shares; so the line is refused here.
    pub max_control_line: usize,
}

/// Encodes an event queued with [`Client::publish_later`] into one NATS message, on the
/// writer's task.
pub(crate) trait EncodeLater: Send + Sync + std::fmt::Debug {
    /// Fills `frame` (cleared before) with the message's subject, header block (empty for
    /// none) and payload; `Err` (why) when the event cannot be represented as a NATS message:
    /// nothing of it is written (the encoder counts it).
    fn encode(&self, envelope: &Envelope, frame: &mut Frame) -> Result<(), HeaderError>;
    /// At least the header block's and payload's length together: checked against the
    /// server's `max_payload` when queued (only a bound over it costs an encoding then) and,
    /// with [`EncodeLater::subject_bound`], counted against the write buffer's limit.
    fn size_bound(&self, envelope: &Envelope) -> usize;
    /// At least the subject's length.
    fn subject_bound(&self, envelope: &Envelope) -> usize;
}

/// One message as [`EncodeLater`] writes it; its buffers are reused from message to message.
#[derive(Debug, Default)]
pub(crate) struct Frame {
    pub subject: String,
    pub headers: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Frame {
    pub(crate) fn clear(&mut self) {
        self.subject.clear();
        self.headers.clear();
        self.payload.clear();
    }
}

/// Why a request to the client failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("NATS is not connected; retry later")]
    NotConnected,
    #[error("the NATS client is closed")]
    Closed,
    #[error("message of {size} bytes is over the server's max_payload of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("subject `{0}` is not a NATS subject")]
    BadSubject(String),
    /// The protocol line would be longer than [`Options::max_control_line`].
    #[error(
        "the subject is too long: its NATS protocol line would be {len} bytes, over the {max} \
         bytes nats-server accepts (its max_control_line; backbone.nats.max_control_line)"
    )]
    LineTooLong { len: usize, max: usize },
    /// [`MAX_PENDING`] bytes are waiting for the writer: wait with [`Client::room`], then retry.
    #[error("the NATS write buffer is full")]
    Full,
    /// The event cannot be written as a NATS message (a header that would break the block).
    #[error("the event cannot be sent over NATS: {0}")]
    Unrepresentable(#[source] HeaderError),
}

#[derive(Debug)]
pub(super) struct Sub {
    pub(super) subject: String,
    pub(super) queue: Option<String>,
    pub(super) to: Deliver,
}

/// Where a subscription's messages go.
pub(super) enum Deliver {
    /// A bounded queue read by a [`SubStream`]; a full queue drops (slow consumer).
    Queue(ByteQueueTx<Msg>),
    /// Called on the connection's reader task, for handlers that only hand a message on
    /// without waiting (one task wake-up less per message: request replies).
    Call(Arc<dyn Fn(Msg) + Send + Sync>),
}

impl std::fmt::Debug for Deliver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Deliver::Queue(_) => "Queue",
            Deliver::Call(_) => "Call",
        })
    }
}

/// Told once nats-server has read an event ([`Client::publish_later`] with a confirmation):
/// `Ok` at the `PONG` that answers the `PING` written after it; `Err` when the writer could
/// not encode it (nothing of it was sent); dropped (an error for the receiver) when the
/// connection ended first: the event may or may not have reached the server.
pub(crate) type Confirm = oneshot::Sender<Result<(), ClientError>>;

/// A publisher waiting for its event to be confirmed.
#[derive(Debug)]
pub(super) struct Waiting {
    /// The event's index in [`Out::later`] when it was queued unencoded (its encoding may
    /// still fail), `None` when it was encoded on append.
    pub(super) later: Option<usize>,
    pub(super) confirm: Confirm,
}

/// Who waits for one `PONG`.
#[derive(Debug)]
pub(super) enum Pong {
    /// A keep-alive.
    KeepAlive,
    /// [`Client::flush`].
    Flush(oneshot::Sender<()>),
    /// The publishers of the events of one write: the server read them when it answers the
    /// `PING` the writer put after them (one `PING` per write, whatever the number of events).
    Written(Vec<Confirm>),
    /// The last `PING` on a connection being left for another (lame-duck mode): the server
    /// read everything written on it. Entries after this one are for the next connection.
    Switch(oneshot::Sender<()>),
}

/// What the writer sends, and who waits for which `PONG`.
#[derive(Debug, Default)]
pub(super) struct Out {
    pub(super) connected: bool,
    pub(super) buf: Vec<u8>,
    /// Events for the writer to encode ([`Client::publish_later`]), each with the length `buf`
    /// had when it was queued: where it goes among the bytes.
    pub(super) later: Vec<(usize, Arc<Envelope>)>,
    /// The sum of `later`'s size bounds.
    pub(super) later_bytes: usize,
    /// Events ([`Client::publish_later`]) in `buf` and `later`: counted as discarded
    /// (`Options::discarded`) if the connection drops before they are written.
    pub(super) events: usize,
    /// Events without a [`Waiting`] publisher in the write under way (set by the writer as it
    /// takes the buffer, back to 0 once the write is done): counted as discarded if the write
    /// fails or the connection ends during it. (Those with one are in `pongs`.)
    pub(super) in_write: usize,
    /// Publishers waiting for their event to be read by the server ([`Client::publish_later`]
    /// with a [`Confirm`]), in append order: the writer puts a `PING` after the write that holds
    /// them and moves them to `pongs`; they are told at its `PONG` (the server read everything
    /// before it), or their senders are dropped when the connection ends first.
    pub(super) waiting: Vec<Waiting>,
    /// One entry per `PING` sent on this connection, in order: who waits for its `PONG`.
    pub(super) pongs: VecDeque<Pong>,
    /// A move to another server is asked for: the writer writes what it holds and a last
    /// `PING` ([`Pong::Switch`]) on this connection, then stops; what is appended meanwhile
    /// waits here for the next connection.
    pub(super) switch: Option<oneshot::Sender<()>>,
}

impl Out {
    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.later.is_empty()
    }
    /// Bytes waiting for the writer (events queued unencoded counted by their bound).
    pub(super) fn pending(&self) -> usize {
        self.buf.len() + self.later_bytes
    }
    /// Forgets what was not written or not confirmed (the connection is gone), which tells
    /// every publisher and flush still waiting (their senders are dropped); returns how many
    /// events were lost: not written, in the write under way, or written and not confirmed.
    pub(super) fn clear(&mut self) -> usize {
        self.buf.clear();
        self.later.clear();
        self.later_bytes = 0;
        self.waiting.clear();
        let unconfirmed: usize = self
            .pongs
            .iter()
            .map(|p| match p {
                Pong::Written(w) => w.len(),
                Pong::KeepAlive | Pong::Flush(_) | Pong::Switch(_) => 0,
            })
            .sum();
        self.pongs.clear();
        self.switch = None;
        std::mem::take(&mut self.events) + std::mem::take(&mut self.in_write) + unconfirmed
    }
}

/// Callbacks run when a connection ends ([`Client::on_disconnect`]).
#[derive(Default)]
pub(super) struct Hooks(Mutex<Vec<Arc<dyn Fn() + Send + Sync>>>);

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooks")
    }
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) options: Options,
    pub(super) out: Mutex<Out>,
    pub(super) subs: Mutex<HashMap<u64, Sub>>,
    pub(super) next_sid: AtomicUsize,
    /// The writer has something to send.
    pub(super) wake_writer: Notify,
    /// The writer took the buffer: publishers waiting for room may go on.
    pub(super) room: Notify,
    /// A write is in progress (no keep-alive PING then).
    pub(super) writing: AtomicBool,
    /// Stop reconnecting.
    pub(super) closed: AtomicBool,
    /// No subscriptions any more ([`Client::end_subscriptions`]): the connection stays for
    /// publishes (JetStream acks) until [`Client::drain`].
    pub(super) subs_ended: AtomicBool,
    pub(super) close: Notify,
    pub(super) max_payload: AtomicUsize,
    /// Connections made so far: a change tells subscribers that server-side state tied to the
    /// last connection (pending JetStream pull requests) is gone.
    pub(super) connections: AtomicU64,
    pub(super) warn_slow: LogThrottle,
    /// Called whenever a connection ends (lost, or closed): see [`Client::on_disconnect`].
    pub(super) on_disconnect: Hooks,
    /// The configured servers and those the cluster announced.
    pub(super) servers: Mutex<ServerPool>,
    /// The server of this connection announced lame-duck mode (`"ldm": true`).
    pub(super) lame_duck: AtomicBool,
    pub(super) lame_duck_told: Notify,
    /// Copies delivered by both connections while leaving a lame-duck server, handed on once.
    pub(super) overlap: Overlap,
}

impl Shared {
    pub(super) fn new(options: Options) -> Shared {
        let servers = Mutex::new(ServerPool::new(&options.urls));
        Shared {
            options,
            out: Mutex::new(Out::default()),
            subs: Mutex::new(HashMap::new()),
            next_sid: AtomicUsize::new(1),
            wake_writer: Notify::new(),
            room: Notify::new(),
            writing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            subs_ended: AtomicBool::new(false),
            close: Notify::new(),
            // Until the server's INFO says otherwise (nats-server's default).
            max_payload: AtomicUsize::new(1 << 20),
            connections: AtomicU64::new(0),
            warn_slow: LogThrottle::new(SLOW_CONSUMER_LOG_INTERVAL),
            on_disconnect: Hooks::default(),
            servers,
            lame_duck: AtomicBool::new(false),
            lame_duck_told: Notify::new(),
            overlap: Overlap::default(),
        }
    }

    pub(super) fn out(&self) -> MutexGuard<'_, Out> {
        // Only appends and swaps happen under the lock; a panic cannot leave it inconsistent.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub(super) fn subs(&self) -> MutexGuard<'_, HashMap<u64, Sub>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub(super) fn servers(&self) -> MutexGuard<'_, ServerPool> {
        self.servers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the [`Client::on_disconnect`] hooks (the connection is marked disconnected
    /// already, so nothing new is appended to what it discarded).
    pub(super) fn run_disconnect_hooks(&self) {
        let hooks = self
            .on_disconnect
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for hook in hooks {
            hook();
        }
    }
}

/// A NATS connection (reconnecting) shared by the backbone's publishers and subscriptions.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub(super) shared: Arc<Shared>,
}

impl Client {
    pub fn is_connected(&self) -> bool {
        self.shared.out().connected
    }

    /// How many connections were made so far (each reconnect adds one).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Appends `HPUB` (or `PUB` when `headers` is empty) for the writer. [`ClientError::Full`]
    /// while [`MAX_PENDING`] unwritten bytes wait: wait with [`Client::room`] and retry (checked
    /// under the buffer's lock, so the limit holds whatever the number of publishers).
    #[cfg(test)]
    pub fn publish(
        &self,
        subject: &str,
        headers: &[u8],
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.publish_with_reply(subject, None, headers, payload)
    }

    /// [`Client::publish`] with a reply subject, for requests (the caller subscribed to it).
    pub fn publish_with_reply(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: &[u8],
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.append(subject, reply, headers, payload, None)
    }

    /// Appends one message; `event`: it is an event ([`Client::publish_later`]), with the
    /// publisher waiting for the server to confirm it, if any.
    fn append(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: &[u8],
        payload: &[u8],
        event: Option<Option<Confirm>>,
    ) -> Result<(), ClientError> {
        if not_a_subject(subject) {
            return Err(ClientError::BadSubject(subject.to_owned()));
        }
        if reply.is_some_and(not_a_subject) {
            return Err(ClientError::BadSubject(format!("reply subject {reply:?}")));
        }
        let size = headers.len() + payload.len();
        self.check_line(pub_line_len(subject, reply, headers.len(), size))?;
        let mut out = self.shared.out();
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        // Before the size: until a server said its max_payload, the limit is a guess, and a
        // client told "not connected" retries where "too large" would give up.
        if !out.connected {
            return Err(ClientError::NotConnected);
        }
        let max = self.shared.max_payload.load(Ordering::Relaxed);
        if size > max {
            return Err(ClientError::TooLarge { size, max });
        }
        if out.pending() >= MAX_PENDING {
            return Err(ClientError::Full);
        }
        let was_empty = out.is_empty();
        write_pub(&mut out.buf, subject, reply, headers, payload);
        if let Some(confirm) = event {
            out.events += 1;
            if let Some(confirm) = confirm {
                out.waiting.push(Waiting {
                    later: None,
                    confirm,
                });
            }
        }
        drop(out);
        if was_empty {
            self.shared.wake_writer.notify_one();
        }
        Ok(())
    }

    /// Queues `envelope` for the writer, which encodes it with [`Options::later`] when it
    /// sends it, in order with everything appended before and after. The same errors as
    /// [`Client::publish`]; the subject is the encoder's, which must make valid ones.
    ///
    /// Panics if the client was made without [`Options::later`] (a programming error: only
    /// the backbone that sets it calls this).
    ///
    /// With `confirm`, the writer puts a `PING` after the write holding the event, and
    /// `confirm` is told at its `PONG` (nats-server has read the event); see [`Confirm`]. Without,
    /// the event is fire and forget (lost unnoticed if the connection drops before the
    /// server read it).
    pub fn publish_later(
        &self,
        envelope: &Arc<Envelope>,
        confirm: Option<Confirm>,
    ) -> Result<(), ClientError> {
        let encoder = self
            .shared
            .options
            .later
            .as_ref()
            .expect("publish_later needs Options::later");
        let bound = encoder.size_bound(envelope);
        let subject_bound = encoder.subject_bound(envelope);
        let max = self.shared.max_payload.load(Ordering::Relaxed);
        if bound > max || subject_bound + PUB_LINE_OVERHEAD > self.shared.options.max_control_line {
            // Maybe too large, or its line too long: only an encoding tells (for events of
            // some hundred KiB of text, whose bound counts every byte as an escape;
            // max_payload is 1 MiB by default; a topic's bound counts every byte as escaped).
            // Encoded here, and published as bytes, which checks both exactly.
            let mut frame = Frame::default();
            encoder
                .encode(envelope, &mut frame)
                .map_err(ClientError::Unrepresentable)?;
            return self.append(
                &frame.subject,
                None,
                &frame.headers,
                &frame.payload,
                Some(confirm),
            );
        }
        let mut out = self.shared.out();
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        if !out.connected {
            return Err(ClientError::NotConnected);
        }
        if out.pending() >= MAX_PENDING {
            return Err(ClientError::Full);
        }
        let was_empty = out.is_empty();
        let at = out.buf.len();
        if let Some(confirm) = confirm {
            let later = Some(out.later.len());
            out.waiting.push(Waiting { later, confirm });
        }
        out.later.push((at, envelope.clone()));
        out.events += 1;
        // The whole `HPUB` as the writer will append it: the line (verb, sizes, CRLFs) is
        // under 64 bytes.
        out.later_bytes += bound + subject_bound + PUB_LINE_OVERHEAD;
        drop(out);
        if was_empty {
            self.shared.wake_writer.notify_one();
        }
        Ok(())
    }

    /// [`Client::publish_with_reply`], waiting for the writer while the buffer is full instead
    /// of failing with [`ClientError::Full`]. Appended at once when there is room, so calls
    /// made one after another are written in that order.
    pub async fn publish_when_room(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: &[u8],
        payload: &[u8],
    ) -> Result<(), ClientError> {
        loop {
            match self.publish_with_reply(subject, reply, headers, payload) {
                Err(ClientError::Full) => self.room().await,
                done => return done,
            }
        }
    }

    /// Waits until the unwritten bytes are below [`MAX_PENDING`] (or the connection is gone).
    pub async fn room(&self) {
        loop {
            let notified = self.shared.room.notified();
            {
                let out = self.shared.out();
                if out.pending() < MAX_PENDING || !out.connected {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Resolves once the server has processed everything appended before (a `PING`/`PONG`
    /// round trip): after a `subscribe`, the server has the interest.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut out = self.shared.out();
            if !out.connected {
                return Err(ClientError::NotConnected);
            }
            out.buf.extend_from_slice(b"PING\r\n");
            out.pongs.push_back(Pong::Flush(tx));
        }
        self.shared.wake_writer.notify_one();
        rx.await.map_err(|_| ClientError::NotConnected)
    }

    /// Subscribes (in a queue group when `queue` is given). The subscription is re-made after
    /// every reconnect; it ends when the stream is dropped. Call [`Client::flush`] to know the
    /// server has it.
    pub fn subscribe(&self, subject: &str, queue: Option<&str>) -> Result<SubStream, ClientError> {
        self.subscribe_bounded(subject, queue, self.shared.options.subscription_capacity)
    }

    /// [`Client::subscribe`] with its own queue size instead of `subscription_capacity`.
    pub fn subscribe_bounded(
        &self,
        subject: &str,
        queue: Option<&str>,
        capacity: usize,
    ) -> Result<SubStream, ClientError> {
        let (tx, rx) = byte_queue(capacity, self.shared.options.subscription_bytes);
        let sid = self.add_sub(subject, queue, Deliver::Queue(tx))?;
        Ok(SubStream {
            rx,
            _sub: Unsubscribe {
                sid,
                shared: self.shared.clone(),
            },
        })
    }

    /// Subscribes with `handler` called for each message on the connection's reader task:
    /// it must not block (hand the message on, no I/O). Ends when the result is dropped.
    pub fn subscribe_with(
        &self,
        subject: &str,
        handler: impl Fn(Msg) + Send + Sync + 'static,
    ) -> Result<Unsubscribe, ClientError> {
        let sid = self.add_sub(subject, None, Deliver::Call(Arc::new(handler)))?;
        Ok(Unsubscribe {
            sid,
            shared: self.shared.clone(),
        })
    }

    fn add_sub(&self, subject: &str, queue: Option<&str>, to: Deliver) -> Result<u64, ClientError> {
        if not_a_subject(subject) {
            return Err(ClientError::BadSubject(subject.to_owned()));
        }
        if queue.is_some_and(not_a_subject) {
            return Err(ClientError::BadSubject(format!("queue group {queue:?}")));
        }
        // `SUB <subject> [<queue>] <sid>\r\n`, the sid at most 20 digits.
        self.check_line(4 + subject.len() + queue.map_or(0, |q| q.len() + 1) + 1 + 20 + 2)?;
        let sid = self.shared.next_sid.fetch_add(1, Ordering::Relaxed) as u64;
        let sub = Sub {
            subject: subject.to_owned(),
            queue: queue.map(str::to_owned),
            to,
        };
        // Lock order out → subs, as on (re)connect, so a SUB is written exactly once.
        let mut out = self.shared.out();
        // Checked under the lock `drain` and `end_subscriptions` take: a subscription made
        // while they run is refused, never kept (its stream would never end).
        if self.shared.closed.load(Ordering::Acquire)
            || self.shared.subs_ended.load(Ordering::Acquire)
        {
            return Err(ClientError::Closed);
        }
        if out.connected {
            write_sub(&mut out.buf, sid, &sub.subject, sub.queue.as_deref());
        }
        self.shared.subs().insert(sid, sub);
        drop(out);
        self.shared.wake_writer.notify_one();
        Ok(sid)
    }

    /// Refuses a protocol line over the server's `max_control_line`.
    fn check_line(&self, len: usize) -> Result<(), ClientError> {
        let max = self.shared.options.max_control_line;
        if len > max {
            return Err(ClientError::LineTooLong { len, max });
        }
        Ok(())
    }

    /// Writes what was published, waits for the server to have it, ends every subscription
    /// (each stream ends after the messages it buffered) and stops the connection.
    pub async fn drain(&self) {
        if self.is_connected() {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.flush()).await;
        }
        {
            let _out = self.shared.out();
            self.shared.closed.store(true, Ordering::Release);
            self.shared.subs().clear();
        }
        self.shared.close.notify_one();
        self.shared.room.notify_waiters();
    }

    /// Ends every subscription (each stream ends after the messages it buffered; the server is
    /// told with `UNSUB`) and refuses new ones, while the connection stays for publishes: the
    /// acknowledgements of what those streams still deliver. [`Client::drain`] closes it.
    pub fn end_subscriptions(&self) {
        let mut out = self.shared.out();
        self.shared.subs_ended.store(true, Ordering::Release);
        let ended: Vec<u64> = self.shared.subs().drain().map(|(sid, _)| sid).collect();
        if out.connected && !ended.is_empty() {
            for sid in ended {
                write_unsub(&mut out.buf, sid);
            }
            drop(out);
            self.shared.wake_writer.notify_one();
        }
    }

    /// Calls `hook` on the connection's task each time a connection ends, lost or closed, after
    /// what was not written was discarded: replies to requests sent on it will not come (a
    /// JetStream publish waiting for its PubAck is refused then, not after its timeout). It
    /// must not block.
    pub fn on_disconnect(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.shared
            .on_disconnect
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(hook));
    }

    /// Whether [`Client::drain`] or [`Client::end_subscriptions`] ran: no subscription
    /// delivers any more.
    pub fn subscriptions_ended(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire) || self.shared.subs_ended.load(Ordering::Acquire)
    }
}

/// A queue bounded in messages (`capacity`) and in bytes (`max_bytes`, the sizes given to
/// [`ByteQueueTx::try_send`]): review F15, where 65,536 messages of up to 1 MiB each could be
/// held for one slow subscriber. An empty queue takes one message of any size (the server's
/// `max_payload` bounds it), so a budget below a message's size still lets it through.
pub(crate) fn byte_queue<T>(capacity: usize, max_bytes: usize) -> (ByteQueueTx<T>, ByteQueueRx<T>) {
    let (tx, rx) = crate::queue::bounded(capacity.max(1));
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        ByteQueueTx {
            tx,
            bytes: bytes.clone(),
            max: max_bytes,
        },
        ByteQueueRx {
            rx,
            bytes,
            unreleased: 0,
            release_at: (max_bytes / 16).clamp(1, MAX_UNRELEASED),
        },
    )
}

/// The most bytes a [`ByteQueueRx`] takes off the shared count at once (see there).
const MAX_UNRELEASED: usize = 64 << 10;

/// The sending side of [`byte_queue`].
pub(crate) struct ByteQueueTx<T> {
    tx: crate::queue::Sender<(T, usize)>,
    bytes: Arc<AtomicUsize>,
    max: usize,
}

impl<T> Clone for ByteQueueTx<T> {
    fn clone(&self) -> Self {
        ByteQueueTx {
            tx: self.tx.clone(),
            bytes: self.bytes.clone(),
            max: self.max,
        }
    }
}

impl<T> std::fmt::Debug for ByteQueueTx<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteQueueTx")
            .field("bytes", &self.bytes.load(Ordering::Relaxed))
            .field("max", &self.max)
            .finish()
    }
}

impl<T> ByteQueueTx<T> {
    /// No room for one more message: its count is reached, or its bytes are (a message
    /// of any size is refused then). A snapshot: the reader may make room right after.
    pub(crate) fn is_full(&self) -> bool {
        self.tx.is_full() || self.bytes.load(Ordering::Acquire) >= self.max
    }

    /// Messages queued (a snapshot).
    pub(crate) fn len(&self) -> usize {
        self.tx.len()
    }

    /// The most messages it holds.
    pub(crate) fn capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// Queues `item` of `size` bytes unless the queue is full in messages or bytes
    /// (`Full`), or its reader is gone (`Closed`).
    pub(crate) fn try_send(&self, item: T, size: usize) -> Result<(), TrySendError<T>> {
        // Full in count: refused without touching the byte count (a flooded subscription
        // refuses most messages, on the reader's task).
        if self.tx.is_full() {
            return Err(TrySendError::Full(item));
        }
        let before = self.bytes.fetch_add(size, Ordering::AcqRel);
        if before > 0 && before.saturating_add(size) > self.max {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            return Err(TrySendError::Full(item));
        }
        self.tx.try_send((item, size)).map_err(|e| {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            match e {
                TrySendError::Full((item, _)) => TrySendError::Full(item),
                TrySendError::Closed((item, _)) => TrySendError::Closed(item),
            }
        })
    }
}

/// The receiving side of [`byte_queue`].
///
/// It gives the bytes of what it took back to the shared count in batches (at most 1/16 of
/// the budget or 64 KiB, and all of them whenever the queue is empty), not per message, so
/// that the count's cache line does not move between the reader's and the writer's cores on
/// every message. The budget is thereby at most that much tighter while the reader is busy.
pub(crate) struct ByteQueueRx<T> {
    rx: crate::queue::Receiver<(T, usize)>,
    bytes: Arc<AtomicUsize>,
    /// Bytes taken off the queue but not yet off `bytes`.
    unreleased: usize,
    release_at: usize,
}

impl<T> std::fmt::Debug for ByteQueueRx<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteQueueRx")
            .field("bytes", &self.bytes.load(Ordering::Relaxed))
            .finish()
    }
}

impl<T> ByteQueueRx<T> {
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let polled = self.rx.poll_recv(cx);
        match &polled {
            Poll::Ready(Some((_, size))) => {
                self.unreleased += size;
                if self.unreleased >= self.release_at {
                    self.release();
                }
            }
            // Empty (or closed): everything taken is given back before waiting.
            _ => self.release(),
        }
        polled.map(|item| item.map(|(item, _)| item))
    }

    fn release(&mut self) {
        if self.unreleased > 0 {
            self.bytes.fetch_sub(self.unreleased, Ordering::AcqRel);
            self.unreleased = 0;
        }
    }
}

/// The messages of one subscription; unsubscribes when dropped.
#[derive(Debug)]
pub(crate) struct SubStream {
    rx: ByteQueueRx<Msg>,
    _sub: Unsubscribe,
}

#[cfg(test)]
impl SubStream {
    /// The bytes its queue holds, as counted against `subscription_bytes`.
    pub(super) fn queued_bytes(&self) -> usize {
        self.rx.bytes.load(Ordering::Relaxed)
    }
}

impl Stream for SubStream {
    type Item = Msg;
    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Msg>> {
        self.rx.poll_recv(cx)
    }
}

/// A subscription; dropping it unsubscribes.
#[derive(Debug)]
pub(crate) struct Unsubscribe {
    sid: u64,
    shared: Arc<Shared>,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let mut out = self.shared.out();
        let removed = self.shared.subs().remove(&self.sid).is_some();
        if removed && out.connected {
            write_unsub(&mut out.buf, self.sid);
            drop(out);
            self.shared.wake_writer.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::nats::testing::{IdOnly, event, unconnected, unconnected_with};
    use crate::nats::wire::HeaderError;

    #[test]
    fn publishers_wait_once_the_write_buffer_is_full() {
        let client = Client {
            shared: unconnected(),
        };
        client.shared.out().connected = true;
        let payload = vec![b'x'; 1 << 19];
        let mut appended = 0;
        let full = loop {
            match client.publish("s", b"", &payload) {
                Ok(()) => appended += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(full, ClientError::Full);
        // Never past the limit by more than the last message.
        let pending = client.shared.out().buf.len();
        assert!(pending >= MAX_PENDING && pending < MAX_PENDING + payload.len() + 64);
        assert_eq!(appended, MAX_PENDING.div_ceil(payload.len() + 16));
    }

    #[test]
    fn events_queued_unencoded_count_their_bound_and_big_ones_are_checked_at_once() {
        let client = Client {
            shared: unconnected_with(Some(Arc::new(IdOnly { bound: 1 << 19 }))),
        };
        client.shared.out().connected = true;
        let mut queued = 0;
        let full = loop {
            match client.publish_later(&event("x"), None) {
                Ok(()) => queued += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(full, ClientError::Full);
        // Each counted with its line (64 bytes).
        assert_eq!(queued, MAX_PENDING / (1 << 19));
        assert!(client.shared.out().buf.is_empty());
        assert_eq!(client.shared.out().later_bytes, queued * ((1 << 19) + 64));

        // Over the server's max_payload by the bound: encoded at once, and only refused if
        // the encoding is over it too.
        let client = Client {
            shared: unconnected_with(Some(Arc::new(IdOnly { bound: 100 }))),
        };
        client.shared.out().connected = true;
        client.shared.max_payload.store(4, Ordering::Relaxed);
        assert_eq!(client.publish_later(&event("abcd"), None), Ok(()));
        assert_eq!(client.shared.out().buf, b"PUB ev.t 4\r\nabcd\r\n");
        assert!(client.shared.out().later.is_empty());
        assert_eq!(
            client.publish_later(&event("abcde"), None),
            Err(ClientError::TooLarge { size: 5, max: 4 })
        );
    }

    /// Subject `ev.<topic>`, its bound counting every topic byte as escaped (as the real
    /// encoder's does).
    #[derive(Debug)]
    struct ByTopic;

    impl EncodeLater for ByTopic {
        fn encode(&self, envelope: &Envelope, frame: &mut Frame) -> Result<(), HeaderError> {
            envelope.topic.push_nats_subject("ev", &mut frame.subject);
            frame.payload.push(b'x');
            Ok(())
        }
        fn size_bound(&self, _: &Envelope) -> usize {
            1
        }
        fn subject_bound(&self, envelope: &Envelope) -> usize {
            3 + 3 * envelope.topic.as_str().len()
        }
    }

    fn event_on(topic: &str) -> Arc<Envelope> {
        let origin = meshgate_core::Origin {
            instance: Arc::from("i"),
            connection: 1,
        };
        let event = meshgate_core::Event::new("1", "/s", "t").unwrap();
        let topic = meshgate_core::Topic::from_mqtt(topic).unwrap();
        Arc::new(Envelope::new(topic, Arc::new(event), origin))
    }

    #[test]
    fn protocol_lines_over_max_control_line_are_refused_and_nothing_is_written() {
        const MAX: usize = 4096;
        let client = Client {
            shared: unconnected_with(Some(Arc::new(ByTopic))),
        };
        client.shared.out().connected = true;
        let too_long = |len| Err(ClientError::LineTooLong { len, max: MAX });
        // `PUB <subject> 1\r\n` is the subject and 8 bytes.
        let fits = "a".repeat(MAX - 8);
        assert_eq!(client.publish(&fits, b"", b"x"), Ok(()));
        let written = client.shared.out().buf.len();
        assert_eq!(written, MAX + 3, "the line and `x\r\n`");
        let over = "a".repeat(MAX - 7);
        assert_eq!(client.publish(&over, b"", b"x"), too_long(MAX + 1));
        // `HPUB <subject> <reply> 12 13\r\n`: the subject and 4 + 1 + 6 + 6 + 2 bytes.
        let headers = b"NATS/1.0\r\n\r\n";
        assert_eq!(headers.len(), 12);
        let subject = "b".repeat(MAX - 19);
        assert_eq!(
            client.publish_with_reply(&subject, Some("reply"), headers, b"x"),
            Ok(())
        );
        let subject = "b".repeat(MAX - 18);
        assert_eq!(
            client.publish_with_reply(&subject, Some("reply"), headers, b"x"),
            too_long(MAX + 1)
        );
        // A subscription: `SUB <subject> <queue> <sid>\r\n`, the sid counted as 20 digits.
        assert!(client.subscribe(&"c".repeat(MAX - 27), None).is_ok());
        assert_eq!(
            client.subscribe(&"c".repeat(MAX - 28), Some("q")).err(),
            Some(ClientError::LineTooLong {
                len: MAX + 1,
                max: MAX
            })
        );
        // An event whose subject bound is over (every byte escaped) but whose subject is not:
        // encoded at once and sent.
        let before = client.shared.out().buf.len();
        let topic = "d".repeat(MAX - 3 - 8);
        assert_eq!(client.publish_later(&event_on(&topic), None), Ok(()));
        assert!(client.shared.out().later.is_empty());
        assert_eq!(client.shared.out().buf.len(), before + MAX + 3);
        // Really over: refused with the real line length.
        let topic = "d".repeat(MAX - 3 - 7);
        assert_eq!(
            client.publish_later(&event_on(&topic), None),
            too_long(MAX + 1)
        );
        // Short ones are queued for the writer as before.
        assert_eq!(client.publish_later(&event_on("short"), None), Ok(()));
        assert_eq!(client.shared.out().later.len(), 1);
    }
}
