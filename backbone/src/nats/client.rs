//! The NATS core client of the `nats` backbone: the hot path every event takes.
//!
//! Why not async-nats here (it stays for JetStream streams, consumers and KV; JetStream
//! publishes and acks use this client too, see `crate::jetstream::publish`): measured in the bench
//! program, async-nats publishing the two headers every meshgate message carries delivers
//! 283k msg/s instead of 722k without them — each message becomes a `HeaderMap` (a `HashMap`
//! with a `String` per name and value) on both sides, plus a command through a channel to the
//! connection task.
//! This client writes `HPUB` lines straight into one buffer that a writer task sends in as few
//! writes as it can, and hands received messages over with their header block unparsed
//! (`super::wire` reads the few headers it needs from the bytes).
//!
//! Events can also be handed over unencoded ([`Client::publish_later`]): the writer task
//! encodes them, in order with everything else, as it fills its next write. The publisher's
//! task (an MQTT connection reading its socket) then only queues an `Arc`; the JSON and
//! Base64 work runs beside it, on the writer's task, into buffers reused for every message.
//!
//! What it does (the NATS client protocol, <https://docs.nats.io/reference/reference-protocols/nats-protocol>):
//! `CONNECT` with `headers`, `echo` as asked, user/password or token; `PING`/`PONG` both ways
//! (a keep-alive every [`PING_INTERVAL`], the connection is dropped after
//! [`MAX_PINGS_OUTSTANDING`] unanswered); `SUB`/`UNSUB` with optional queue groups, re-sent
//! after a reconnect; `MSG`/`HMSG`; `INFO` (`max_payload`, `tls_required`); `-ERR` logged.
//! `tls://` URLs (or a server requiring TLS) use rustls with the system's root certificates.
//! Reconnects forever, over the URLs in turn, with a backoff up to [`MAX_BACKOFF`].
//!
//! Guarantees: what is appended while connected is written in order; on a disconnect the
//! unwritten rest is dropped (NATS core is at most once; the backbone refuses publishes while
//! disconnected). A subscription that falls `capacity` messages (or `subscription_bytes`)
//! behind loses messages (slow consumer), counted; a message over the server's `max_payload`
//! is skipped unread, counted. The connection task runs under a supervisor that restarts it
//! after a panic (counted).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use meshgate_core::Envelope;
use meshgate_core::metrics::Counter;
use meshgate_core::throttle::LogThrottle;

use crate::nats::SLOW_CONSUMER_LOG_INTERVAL;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};

/// Keep-alive `PING` interval (as async-nats and the Go client).
const PING_INTERVAL: Duration = Duration::from_secs(60);
const MAX_PINGS_OUTSTANDING: usize = 2;
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// Bytes appended and not yet written beyond which publishers wait for the writer.
const MAX_PENDING: usize = 8 << 20;
/// Largest encoding buffer the writer keeps for the next event.
const MAX_KEPT_FRAME: usize = 1 << 20;
/// Read chunk; received messages are slices of it (no copy).
const READ_CHUNK: usize = 32 << 10;
/// Largest message size a `MSG` line may announce at all (nats-server's own hard limit for
/// max_payload); a bigger size is a protocol error, not an allocation.
const MAX_INBOUND_MESSAGE: usize = 64 << 20;
/// Room above the server's `max_payload` for a received message (headers a server may add
/// to a stored message); past `max_payload` + this, a message is skipped unread and counted
/// as `too_large` (review F15: was any size up to [`MAX_INBOUND_MESSAGE`]).
const INBOUND_SLACK: usize = 64 << 10;
/// Longest control line accepted from the server (INFO can be long in a cluster).
const MAX_CONTROL_LINE: usize = 1 << 20;

/// A received message. `headers` is the raw header block (`NATS/1.0\r\n…\r\n\r\n`), if any.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Msg {
    pub subject: Bytes,
    /// The reply subject, if any (a JetStream delivery's is where its acknowledgement goes).
    pub reply: Option<Bytes>,
    pub headers: Option<Bytes>,
    pub payload: Bytes,
}

/// How to reach the servers.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub urls: Vec<String>,
    pub name: String,
    pub echo: bool,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub connect_timeout: Duration,
    pub subscription_capacity: usize,
    /// Bytes (headers and payload) a subscription's queue holds at most, besides
    /// `subscription_capacity` messages; past it messages are dropped (slow consumer).
    pub subscription_bytes: usize,
    pub slow_consumer: Counter,
    /// Messages from the server over its own `max_payload` (+ [`INBOUND_SLACK`]), skipped.
    pub too_large: Counter,
    /// The connection task ended by a panic (it is restarted).
    pub panicked: Counter,
    /// Counts each established connection that was lost (not the ones closed on purpose).
    pub disconnects: Counter,
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
    fn encode(&self, envelope: &Envelope, frame: &mut Frame) -> Result<(), String>;
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
    Unrepresentable(String),
}

#[derive(Debug)]
struct Sub {
    subject: String,
    queue: Option<String>,
    to: Deliver,
}

/// Where a subscription's messages go.
enum Deliver {
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

/// What the writer sends, and who waits for which `PONG`.
#[derive(Debug, Default)]
struct Out {
    connected: bool,
    buf: Vec<u8>,
    /// Events for the writer to encode ([`Client::publish_later`]), each with the length `buf`
    /// had when it was queued: where it goes among the bytes.
    later: Vec<(usize, Arc<Envelope>)>,
    /// The sum of `later`'s size bounds.
    later_bytes: usize,
    /// One entry per `PING` sent on this connection, in order: a flush waiting for its `PONG`,
    /// or `None` for a keep-alive.
    pongs: VecDeque<Option<oneshot::Sender<()>>>,
}

impl Out {
    fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.later.is_empty()
    }
    /// Bytes waiting for the writer (events queued unencoded counted by their bound).
    fn pending(&self) -> usize {
        self.buf.len() + self.later_bytes
    }
    /// Forgets what was not written (the connection is gone).
    fn clear(&mut self) {
        self.buf.clear();
        self.later.clear();
        self.later_bytes = 0;
    }
}

#[derive(Debug)]
struct Shared {
    options: Options,
    out: Mutex<Out>,
    subs: Mutex<HashMap<u64, Sub>>,
    next_sid: AtomicUsize,
    /// The writer has something to send.
    wake_writer: Notify,
    /// The writer took the buffer: publishers waiting for room may go on.
    room: Notify,
    /// A write is in progress (no keep-alive PING then).
    writing: AtomicBool,
    /// Stop reconnecting.
    closed: AtomicBool,
    close: Notify,
    max_payload: AtomicUsize,
    /// Connections made so far: a change tells subscribers that server-side state tied to the
    /// last connection (pending JetStream pull requests) is gone.
    connections: AtomicU64,
    warn_slow: LogThrottle,
}

impl Shared {
    fn new(options: Options) -> Shared {
        Shared {
            options,
            out: Mutex::new(Out::default()),
            subs: Mutex::new(HashMap::new()),
            next_sid: AtomicUsize::new(1),
            wake_writer: Notify::new(),
            room: Notify::new(),
            writing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            close: Notify::new(),
            // Until the server's INFO says otherwise (nats-server's default).
            max_payload: AtomicUsize::new(1 << 20),
            connections: AtomicU64::new(0),
            warn_slow: LogThrottle::new(SLOW_CONSUMER_LOG_INTERVAL),
        }
    }

    fn out(&self) -> MutexGuard<'_, Out> {
        // Only appends and swaps happen under the lock; a panic cannot leave it inconsistent.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn subs(&self) -> MutexGuard<'_, HashMap<u64, Sub>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A NATS connection (reconnecting) shared by the backbone's publishers and subscriptions.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    shared: Arc<Shared>,
}

impl Client {
    /// Starts connecting in the background; waits up to `connect_timeout` for the first
    /// connection, then returns either way (see [`Client::is_connected`]).
    pub async fn connect(options: Options) -> Client {
        let timeout = options.connect_timeout;
        let shared = Arc::new(Shared::new(options));
        tokio::spawn(supervise(shared.clone()));
        let client = Client { shared };
        let deadline = tokio::time::Instant::now() + timeout;
        while !client.is_connected() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        client
    }

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
    pub fn publish_later(&self, envelope: &Arc<Envelope>) -> Result<(), ClientError> {
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
            return self.publish(&frame.subject, &frame.headers, &frame.payload);
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
        out.later.push((at, envelope.clone()));
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
            out.pongs.push_back(Some(tx));
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
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(ClientError::Closed);
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
        if out.connected {
            write_sub(&mut out.buf, sid, &sub);
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
        self.shared.closed.store(true, Ordering::Release);
        self.shared.subs().clear();
        self.shared.close.notify_one();
        self.shared.room.notify_waiters();
    }
}

/// At least what an `HPUB` line holds besides its subject: verb, spaces, two sizes, CRLF.
const PUB_LINE_OVERHEAD: usize = 64;

/// The length of the `PUB`/`HPUB` line [`write_pub`] writes.
fn pub_line_len(subject: &str, reply: Option<&str>, headers: usize, total: usize) -> usize {
    let digits = |n: usize| n.checked_ilog10().map_or(1, |d| d as usize + 1);
    let verb = if headers == 0 { 3 } else { 4 };
    let sizes = if headers == 0 {
        1 + digits(total)
    } else {
        1 + digits(headers) + 1 + digits(total)
    };
    verb + 1 + subject.len() + reply.map_or(0, |r| r.len() + 1) + sizes + 2
}

/// Empty, or with a byte the protocol line cannot carry (whitespace, control characters).
pub(crate) fn not_a_subject(s: &str) -> bool {
    s.is_empty() || s.bytes().any(|b| b <= b' ' || b == 0x7f)
}

/// Appends `PUB` (or `HPUB` with a header block) and the message.
fn write_pub(
    buf: &mut Vec<u8>,
    subject: &str,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
) {
    let mut n = itoa::Buffer::new();
    buf.reserve(subject.len() + headers.len() + payload.len() + 32);
    buf.extend_from_slice(if headers.is_empty() {
        b"PUB "
    } else {
        b"HPUB "
    });
    buf.extend_from_slice(subject.as_bytes());
    if let Some(reply) = reply {
        buf.push(b' ');
        buf.extend_from_slice(reply.as_bytes());
    }
    if !headers.is_empty() {
        buf.push(b' ');
        buf.extend_from_slice(n.format(headers.len()).as_bytes());
    }
    buf.push(b' ');
    buf.extend_from_slice(n.format(headers.len() + payload.len()).as_bytes());
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(headers);
    buf.extend_from_slice(payload);
    buf.extend_from_slice(b"\r\n");
}

fn write_sub(buf: &mut Vec<u8>, sid: u64, sub: &Sub) {
    buf.extend_from_slice(b"SUB ");
    buf.extend_from_slice(sub.subject.as_bytes());
    if let Some(q) = &sub.queue {
        buf.push(b' ');
        buf.extend_from_slice(q.as_bytes());
    }
    buf.push(b' ');
    buf.extend_from_slice(itoa::Buffer::new().format(sid).as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// A queue bounded in messages (`capacity`) and in bytes (`max_bytes`, the sizes given to
/// [`ByteQueueTx::try_send`]): review F15, where 65,536 messages of up to 1 MiB each could be
/// held for one slow subscriber. An empty queue takes one message of any size (the server's
/// `max_payload` bounds it), so a budget below a message's size still lets it through.
pub(crate) fn byte_queue<T>(capacity: usize, max_bytes: usize) -> (ByteQueueTx<T>, ByteQueueRx<T>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
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
    tx: mpsc::Sender<(T, usize)>,
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
        self.tx.capacity() == 0 || self.bytes.load(Ordering::Acquire) >= self.max
    }

    /// Queues `item` of `size` bytes unless the queue is full in messages or bytes
    /// (`Full`), or its reader is gone (`Closed`).
    pub(crate) fn try_send(
        &self,
        item: T,
        size: usize,
    ) -> Result<(), mpsc::error::TrySendError<T>> {
        use mpsc::error::TrySendError;
        // Full in count: refused without touching the byte count (a flooded subscription
        // refuses most messages, on the reader's task).
        if self.tx.capacity() == 0 {
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
    rx: mpsc::Receiver<(T, usize)>,
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
            out.buf.extend_from_slice(b"UNSUB ");
            out.buf
                .extend_from_slice(itoa::Buffer::new().format(self.sid).as_bytes());
            out.buf.extend_from_slice(b"\r\n");
            drop(out);
            self.shared.wake_writer.notify_one();
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The server's `INFO`, the fields this client uses.
#[derive(Debug, Default, serde::Deserialize)]
struct Info {
    #[serde(default)]
    max_payload: usize,
    #[serde(default)]
    tls_required: bool,
    #[serde(default)]
    headers: bool,
}

/// Runs [`run`], again after a panic (a bug: the parser and handlers refuse bad input with
/// errors), so the client is never silently gone: the panic is logged and counted
/// (`meshgate_errors_total{adapter="backbone",kind="task_panicked"}`), the connection is
/// dropped as on a disconnect (the backbone is not ready meanwhile), and a new one is made
/// with every subscription.
async fn supervise(shared: Arc<Shared>) {
    use futures_util::FutureExt;
    let mut backoff = Duration::from_millis(100);
    loop {
        let run = std::panic::AssertUnwindSafe(run(shared.clone())).catch_unwind();
        match run.await {
            Ok(()) => return,
            Err(panic) => {
                disconnected(&shared);
                shared.options.panicked.inc();
                tracing::error!(
                    panic = panic_message(&*panic),
                    "nats: the connection task panicked; reconnecting (counted in meshgate_errors_total{{kind=\"task_panicked\"}})"
                );
                if shared.closed.load(Ordering::Acquire) {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// The text of a caught panic, for the log.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

/// Connects, reconnects, and runs each connection's reader and writer.
async fn run(shared: Arc<Shared>) {
    let urls = shared.options.urls.clone();
    if urls.is_empty() {
        // (The config refuses an empty backbone.nats.urls; this keeps the index below safe.)
        tracing::error!("nats: no server URL to connect to (backbone.nats.urls)");
        return;
    }
    let mut backoff = Duration::from_millis(50);
    let mut index = 0usize;
    let mut was_connected = false;
    while !shared.closed.load(Ordering::Acquire) {
        let url = &urls[index % urls.len()];
        index += 1;
        let attempt = tokio::time::timeout(shared.options.connect_timeout, handshake(&shared, url));
        let closed = shared.close.notified();
        let result = tokio::select! {
            r = attempt => r.unwrap_or_else(|_| Err(format!("{url}: no answer within the connect timeout"))),
            _ = closed => break,
        };
        match result {
            Ok((io, rest)) => {
                tracing::info!(url = %url, "nats: connected");
                was_connected = true;
                let started = tokio::time::Instant::now();
                let reason = serve(&shared, io, rest).await;
                disconnected(&shared);
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
                shared.options.disconnects.inc();
                tracing::warn!(url = %url, reason = %reason, "nats: disconnected; reconnecting");
                if started.elapsed() < Duration::from_secs(1) {
                    // Ended at once (refused after the handshake, say): no tight loop.
                    let closed = shared.close.notified();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = closed => break,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                } else {
                    backoff = Duration::from_millis(50);
                }
            }
            Err(e) => {
                if was_connected || index <= urls.len() {
                    tracing::warn!(error = %e, "nats: cannot connect; retrying");
                } else {
                    tracing::debug!(error = %e, "nats: cannot connect; retrying");
                }
                if index.is_multiple_of(urls.len()) {
                    let closed = shared.close.notified();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = closed => break,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
    disconnected(&shared);
}

fn disconnected(shared: &Shared) {
    let mut out = shared.out();
    out.connected = false;
    out.clear();
    // Dropping the senders tells every flush waiting for a PONG that it will not come.
    out.pongs.clear();
    drop(out);
    shared.room.notify_waiters();
}

/// Opens the connection: `INFO`, then `CONNECT` + `PING`, until `PONG`. Returns the stream
/// and whatever the server sent after the `PONG`.
async fn handshake(shared: &Shared, url: &str) -> Result<(Box<dyn Io>, BytesMut), String> {
    let (tls_url, host, port) = parse_url(url)?;
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut tcp: Box<dyn Io> = Box::new(tcp);
    let mut buf = BytesMut::with_capacity(4096);
    let line = read_line(&mut tcp, &mut buf)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let info: Info = line
        .strip_prefix("INFO ")
        .and_then(|j| serde_json::from_str(j).ok())
        .ok_or_else(|| format!("{url}: the server did not start with INFO: {line:.80}"))?;
    if !info.headers {
        return Err(format!(
            "{url}: the server does not support headers (nats-server 2.2 or later is needed)"
        ));
    }
    if info.max_payload > 0 {
        shared
            .max_payload
            .store(info.max_payload, Ordering::Relaxed);
    }
    let mut io: Box<dyn Io> = if tls_url || info.tls_required {
        Box::new(
            tls(tcp, &host)
                .await
                .map_err(|e| format!("{url}: TLS: {e}"))?,
        )
    } else {
        tcp
    };
    let o = &shared.options;
    let mut connect = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "tls_required": tls_url || info.tls_required,
        "name": o.name,
        "lang": "rust-meshgate",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "echo": o.echo,
        "headers": true,
        "no_responders": true,
    });
    if let (Some(user), Some(pass)) = (&o.user, &o.password) {
        connect["user"] = user.as_str().into();
        connect["pass"] = pass.as_str().into();
    }
    if let Some(token) = &o.token {
        connect["auth_token"] = token.as_str().into();
    }
    let hello = format!("CONNECT {connect}\r\nPING\r\n");
    io.write_all(hello.as_bytes())
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    buf.clear();
    loop {
        let line = read_line(&mut io, &mut buf)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        match line.as_str() {
            "PONG" => break,
            "+OK" => {}
            "PING" => io
                .write_all(b"PONG\r\n")
                .await
                .map_err(|e| format!("{url}: {e}"))?,
            l if l.starts_with("INFO ") => {}
            l => return Err(format!("{url}: the server refused the connection: {l}")),
        }
    }
    Ok((io, buf))
}

async fn tls(
    tcp: Box<dyn Io>,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<Box<dyn Io>>, String> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let config = tokio_rustls::rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

/// `nats://host:port`, `tls://host:port`, `host:port` → (TLS, host, port); the port defaults
/// to 4222. Credentials in a URL are refused: the config has its own keys for them.
pub(crate) fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("tls://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("nats://") {
        (false, r)
    } else {
        (false, url)
    };
    if rest.contains('@') {
        return Err(format!(
            "`{url}`: credentials go in backbone.nats.user and backbone.nats.password (or token), not in the URL"
        ));
    }
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("`{url}`: port `{p}` is not a number"))?,
        ),
        _ => (rest, 4222),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("`{url}`: no host"));
    }
    Ok((tls, host.to_owned(), port))
}

/// One control line (without CRLF), reading more as needed; consumes it from `buf`.
async fn read_line(io: &mut Box<dyn Io>, buf: &mut BytesMut) -> Result<String, String> {
    loop {
        if let Some(end) = find_crlf(buf) {
            let line = buf.split_to(end + 2);
            return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
        }
        if buf.len() > MAX_CONTROL_LINE {
            return Err("control line too long".into());
        }
        buf.reserve(4096);
        if io.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("connection closed by the server".into());
        }
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    memchr::memmem::find(b, b"\r\n")
}

/// Runs a connection until it fails: re-subscribes, then reads and writes. Returns why it ended.
async fn serve(shared: &Arc<Shared>, io: Box<dyn Io>, rest: BytesMut) -> String {
    // (A write cancelled by the last connection's end left it set.)
    shared.writing.store(false, Ordering::Release);
    {
        let mut out = shared.out();
        out.clear();
        out.pongs.clear();
        let subs = shared.subs();
        for (sid, sub) in subs.iter() {
            write_sub(&mut out.buf, *sid, sub);
        }
        drop(subs);
        out.connected = true;
        shared.connections.fetch_add(1, Ordering::Release);
    }
    shared.wake_writer.notify_one();
    let (reader, writer) = tokio::io::split(io);
    let closed = shared.close.notified();
    tokio::select! {
        r = read_loop(shared, reader, rest) => r,
        r = write_loop(shared, writer) => r,
        r = keep_alive(shared) => r,
        _ = closed => "closed".into(),
    }
}

/// A `PING` every [`PING_INTERVAL`]; the connection is given up with
/// [`MAX_PINGS_OUTSTANDING`] of them unanswered. Skipped while a write is in progress: a PING
/// queued behind megabytes the server is slowly reading would look unanswered (a connection
/// that dies mid-write is left to TCP's retransmission timeout).
async fn keep_alive(shared: &Shared) -> String {
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    // After a stall, one tick, not a burst that would find its own PINGs unanswered.
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ping.tick().await;
        if shared.writing.load(Ordering::Acquire) {
            continue;
        }
        {
            let mut out = shared.out();
            if out.pongs.iter().filter(|p| p.is_none()).count() >= MAX_PINGS_OUTSTANDING {
                return "the server stopped answering PINGs".into();
            }
            out.buf.extend_from_slice(b"PING\r\n");
            out.pongs.push_back(None);
        }
        shared.wake_writer.notify_one();
    }
}

async fn write_loop(shared: &Shared, mut w: tokio::io::WriteHalf<Box<dyn Io>>) -> String {
    let mut spare = Vec::with_capacity(64 << 10);
    let mut later = Vec::new();
    // Where the bytes and the events encoded here are put together, and one event's encoding.
    let mut joined = Vec::with_capacity(64 << 10);
    let mut frame = Frame::default();
    loop {
        let idle = {
            let mut out = shared.out();
            let idle = out.is_empty();
            if !idle {
                std::mem::swap(&mut out.buf, &mut spare);
                std::mem::swap(&mut out.later, &mut later);
                out.later_bytes = 0;
            }
            idle
        };
        if idle {
            shared.wake_writer.notified().await;
            continue;
        }
        shared.room.notify_waiters();
        let bytes = if later.is_empty() {
            &spare
        } else {
            join_later(shared, &spare, &mut later, &mut frame, &mut joined);
            &joined
        };
        shared.writing.store(true, Ordering::Release);
        let written = async {
            w.write_all(bytes).await?;
            w.flush().await
        }
        .await;
        shared.writing.store(false, Ordering::Release);
        if let Err(e) = written {
            return format!("write: {e}");
        }
        for buf in [&mut spare, &mut joined] {
            buf.clear();
            if buf.capacity() > 4 * MAX_PENDING {
                *buf = Vec::with_capacity(64 << 10);
            }
        }
    }
}

/// Puts `bytes` and the events queued among them together in `joined`, encoding each event
/// where it was queued.
fn join_later(
    shared: &Shared,
    bytes: &[u8],
    later: &mut Vec<(usize, Arc<Envelope>)>,
    frame: &mut Frame,
    joined: &mut Vec<u8>,
) {
    let Some(encoder) = shared.options.later.as_ref() else {
        // Nothing is queued without an encoder (`publish_later` checks).
        later.clear();
        joined.extend_from_slice(bytes);
        return;
    };
    let mut at = 0;
    for (offset, envelope) in later.drain(..) {
        joined.extend_from_slice(&bytes[at..offset]);
        at = offset;
        frame.clear();
        // An event that cannot be represented is skipped (the encoder counted it): a
        // malformed message would end the connection every client shares, or be misread.
        if encoder.encode(&envelope, frame).is_ok() {
            write_pub(joined, &frame.subject, None, &frame.headers, &frame.payload);
        }
    }
    joined.extend_from_slice(&bytes[at..]);
    if frame.payload.capacity() > MAX_KEPT_FRAME {
        // (One big event should not keep its buffer for good.)
        *frame = Frame::default();
    }
}

async fn read_loop(
    shared: &Shared,
    mut r: tokio::io::ReadHalf<Box<dyn Io>>,
    mut buf: BytesMut,
) -> String {
    // Bytes of a too-large message still to be skipped.
    let mut skip = 0usize;
    loop {
        loop {
            match next_op(&mut buf, &mut skip, inbound_limit(shared)) {
                Ok(Some(Op::TooLarge { sid, size, .. })) => {
                    shared.options.too_large.inc();
                    tracing::warn!(
                        sid,
                        size,
                        "nats: the server sent a message over its own max_payload; skipped (counted in meshgate_backbone_dropped_total{{reason=\"too_large\"}})"
                    );
                }
                Ok(Some(op)) => handle(shared, op),
                Ok(None) => break,
                Err(e) => return format!("protocol error: {e}"),
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        match r.read_buf(&mut buf).await {
            Ok(0) => return "connection closed by the server".into(),
            Ok(_) => {}
            Err(e) => return format!("read: {e}"),
        }
    }
}

/// The largest message accepted from the server: its `max_payload` and some room.
fn inbound_limit(shared: &Shared) -> usize {
    (shared.max_payload.load(Ordering::Relaxed) + INBOUND_SLACK).min(MAX_INBOUND_MESSAGE)
}

/// One operation from the server.
#[derive(Debug, PartialEq)]
enum Op {
    Msg {
        sid: u64,
        msg: Msg,
    },
    /// A well-formed `MSG`/`HMSG` of `size` bytes over the limit: its line was consumed; the
    /// next `skip` bytes (body and CRLF) are to be skipped, not buffered.
    TooLarge {
        sid: u64,
        size: usize,
        skip: usize,
    },
    Ping,
    Pong,
    Ok,
    Err(String),
    Info(String),
}

/// [`parse_op`] after skipping what is left of a too-large message (`skip` bytes, kept
/// across reads): the reader's one step, also what the fuzz target drives.
fn next_op(buf: &mut BytesMut, skip: &mut usize, limit: usize) -> Result<Option<Op>, String> {
    if *skip > 0 {
        let n = (*skip).min(buf.len());
        buf.advance(n);
        *skip -= n;
        if *skip > 0 {
            return Ok(None);
        }
    }
    let op = parse_op(buf, limit)?;
    if let Some(Op::TooLarge { skip: s, .. }) = &op {
        *skip = *s;
    }
    Ok(op)
}

/// The next complete operation in `buf` (consumed), `None` when more bytes are needed.
/// A message over `limit` bytes is [`Op::TooLarge`] (never buffered).
fn parse_op(buf: &mut BytesMut, limit: usize) -> Result<Option<Op>, String> {
    let Some(end) = find_crlf(buf) else {
        if buf.len() > MAX_CONTROL_LINE {
            return Err("control line too long".into());
        }
        return Ok(None);
    };
    let line = &buf[..end];
    let (verb, args) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &b""[..]),
    };
    let simple = |buf: &mut BytesMut, op| {
        buf.advance(end + 2);
        Ok(Some(op))
    };
    if verb.eq_ignore_ascii_case(b"MSG") || verb.eq_ignore_ascii_case(b"HMSG") {
        let headers = verb.len() == 4;
        // At most 5 arguments; a sixth makes the count wrong (refused below). No allocation:
        // this runs for every message.
        let mut parts: [&[u8]; 6] = [&[]; 6];
        let mut count = 0;
        for p in args
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|p| !p.is_empty())
        {
            if count == parts.len() {
                break;
            }
            parts[count] = p;
            count += 1;
        }
        let parts = &parts[..count];
        let num = |p: &[u8]| -> Result<usize, String> {
            std::str::from_utf8(p)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad number in `{}`", String::from_utf8_lossy(line)))
        };
        // MSG subject sid [reply] size; HMSG subject sid [reply] hdr_size total_size
        let ok = if headers {
            parts.len() == 4 || parts.len() == 5
        } else {
            parts.len() == 3 || parts.len() == 4
        };
        if !ok {
            return Err(format!("bad `{}`", String::from_utf8_lossy(line)));
        }
        let sid = num(parts[1])? as u64;
        let total = num(parts[parts.len() - 1])?;
        let hdr = if headers {
            num(parts[parts.len() - 2])?
        } else {
            0
        };
        if hdr > total || total > MAX_INBOUND_MESSAGE {
            return Err(format!("bad `{}`", String::from_utf8_lossy(line)));
        }
        if total > limit {
            buf.advance(end + 2);
            return Ok(Some(Op::TooLarge {
                sid,
                size: total,
                skip: total + 2,
            }));
        }
        let at = |p: &[u8]| (p.as_ptr() as usize - buf.as_ptr() as usize, p.len());
        let subject_at = at(parts[0]);
        let reply_at = (parts.len() == if headers { 5 } else { 4 }).then(|| at(parts[2]));
        if buf.len() < end + 2 + total + 2 {
            buf.reserve(end + 2 + total + 2 - buf.len());
            return Ok(None);
        }
        if &buf[end + 2 + total..end + 2 + total + 2] != b"\r\n" {
            return Err(format!(
                "no CRLF after the {total} bytes of `{}`",
                String::from_utf8_lossy(line)
            ));
        }
        let head = buf.split_to(end + 2).freeze();
        let subject = head.slice(subject_at.0..subject_at.0 + subject_at.1);
        let reply = reply_at.map(|(i, n)| head.slice(i..i + n));
        let mut body = buf.split_to(total + 2).freeze();
        body.truncate(total);
        let headers = headers.then(|| body.split_to(hdr));
        return Ok(Some(Op::Msg {
            sid,
            msg: Msg {
                subject,
                reply,
                headers,
                payload: body,
            },
        }));
    }
    if verb.eq_ignore_ascii_case(b"PING") {
        return simple(buf, Op::Ping);
    }
    if verb.eq_ignore_ascii_case(b"PONG") {
        return simple(buf, Op::Pong);
    }
    if verb.eq_ignore_ascii_case(b"+OK") {
        return simple(buf, Op::Ok);
    }
    if verb.eq_ignore_ascii_case(b"-ERR") {
        // At most 256 characters are kept for the log (a line may be up to 1 MiB).
        let text = String::from_utf8_lossy(args)
            .trim()
            .chars()
            .take(256)
            .collect();
        return simple(buf, Op::Err(text));
    }
    if verb.eq_ignore_ascii_case(b"INFO") {
        let text = String::from_utf8_lossy(args).into_owned();
        return simple(buf, Op::Info(text));
    }
    Err(format!(
        "unknown operation `{}`",
        String::from_utf8_lossy(line)
    ))
}

fn handle(shared: &Shared, op: Op) {
    match op {
        Op::Msg { sid, msg } => {
            let subs = shared.subs();
            let Some(sub) = subs.get(&sid) else {
                return;
            };
            let tx = match &sub.to {
                Deliver::Queue(tx) => tx,
                Deliver::Call(handler) => {
                    let handler = handler.clone();
                    drop(subs);
                    handler(msg);
                    return;
                }
            };
            let size = msg.headers.as_ref().map_or(0, Bytes::len) + msg.payload.len();
            if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(msg, size) {
                shared.options.slow_consumer.inc();
                if shared.warn_slow.ready() {
                    tracing::warn!(
                        sid,
                        subject = %sub.subject,
                        "nats: a subscriber is too slow, messages dropped for it (counted in meshgate_backbone_dropped_total{{reason=\"slow_consumer\"}})"
                    );
                }
            }
        }
        Op::Ping => {
            shared.out().buf.extend_from_slice(b"PONG\r\n");
            shared.wake_writer.notify_one();
        }
        Op::Pong => {
            if let Some(Some(waiter)) = shared.out().pongs.pop_front() {
                let _ = waiter.send(());
            }
        }
        // (Skipped and counted by the reader.)
        Op::Ok | Op::TooLarge { .. } => {}
        Op::Err(text) => {
            // The server closes the connection after the errors that end it (and the reader
            // then sees the end); others (permissions, subscription limits) leave it open, and
            // dropping it here would reconnect, resubscribe and meet the same error in a loop.
            tracing::warn!(error = %text, "nats: the server reported an error");
        }
        Op::Info(json) => {
            if let Ok(info) = serde_json::from_str::<Info>(&json)
                && info.max_payload > 0
            {
                shared
                    .max_payload
                    .store(info.max_payload, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ops(input: &[u8]) -> (Vec<Op>, usize) {
        let mut buf = BytesMut::from(input);
        let mut v = Vec::new();
        while let Some(op) = parse_op(&mut buf, MAX_INBOUND_MESSAGE).unwrap() {
            v.push(op);
        }
        (v, buf.len())
    }

    #[test]
    fn parses_every_server_operation() {
        let (v, rest) = ops(
            b"INFO {\"max_payload\":1024}\r\nPING\r\n+OK\r\nPONG\r\nMSG a.b 7 5\r\nhello\r\n\
              HMSG a.c 8 reply.x 12 14\r\nNATS/1.0\r\n\r\nhi\r\n-ERR 'Stale Connection'\r\nMSG a 9 3\r\nab",
        );
        assert_eq!(
            rest,
            b"MSG a 9 3\r\nab".len(),
            "the incomplete message waits"
        );
        assert_eq!(v[0], Op::Info("{\"max_payload\":1024}".into()));
        assert_eq!(v[1], Op::Ping);
        assert_eq!(v[2], Op::Ok);
        assert_eq!(v[3], Op::Pong);
        let Op::Msg { sid, msg } = &v[4] else {
            panic!()
        };
        assert_eq!(
            (*sid, &msg.subject[..], &msg.payload[..]),
            (7, &b"a.b"[..], &b"hello"[..])
        );
        assert!(msg.headers.is_none());
        let Op::Msg { sid, msg } = &v[5] else {
            panic!()
        };
        assert_eq!((*sid, &msg.subject[..]), (8, &b"a.c"[..]));
        assert_eq!(msg.headers.as_deref(), Some(&b"NATS/1.0\r\n\r\n"[..]));
        assert_eq!(&msg.payload[..], b"hi");
        assert_eq!(v[6], Op::Err("'Stale Connection'".into()));
    }

    #[test]
    fn messages_split_anywhere_parse_the_same() {
        let input: &[u8] = b"HMSG s.x 3 20 25\r\nNATS/1.0\r\nA: b c\r\n\r\nhello\r\nPING\r\n";
        for cut in 0..input.len() {
            let mut buf = BytesMut::from(&input[..cut]);
            let mut got = Vec::new();
            while let Some(op) = parse_op(&mut buf, MAX_INBOUND_MESSAGE).unwrap() {
                got.push(op);
            }
            buf.extend_from_slice(&input[cut..]);
            while let Some(op) = parse_op(&mut buf, MAX_INBOUND_MESSAGE).unwrap() {
                got.push(op);
            }
            assert_eq!(got.len(), 2, "cut at {cut}");
            let Op::Msg { msg, .. } = &got[0] else {
                panic!()
            };
            assert_eq!(&msg.payload[..], b"hello");
            assert_eq!(
                msg.headers.as_deref(),
                Some(&b"NATS/1.0\r\nA: b c\r\n\r\n"[..])
            );
            assert_eq!(got[1], Op::Ping);
        }
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        for bad in [
            &b"MSG a x 3\r\nabc\r\n"[..],
            b"HMSG a 1 9 3\r\nabc\r\n",
            b"WHAT\r\n",
            // Sizes a server must never send: no overflow, no allocation, an error.
            b"MSG a 1 18446744073709551613\r\n",
            b"MSG a 1 1000000000000\r\n",
            b"HMSG a 1 2 18446744073709551615\r\n",
            // The body is not followed by CRLF: out of step.
            b"MSG a 1 3\r\nabcde\r\n",
        ] {
            assert!(
                parse_op(&mut BytesMut::from(bad), MAX_INBOUND_MESSAGE).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

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

    /// Encodes an event as `PUB ev.<topic>` with its id as the payload; says it may be
    /// `bound` bytes long.
    #[derive(Debug)]
    struct IdOnly {
        bound: usize,
    }

    impl EncodeLater for IdOnly {
        fn encode(&self, envelope: &Envelope, frame: &mut Frame) -> Result<(), String> {
            envelope.topic.push_nats_subject("ev", &mut frame.subject);
            frame
                .payload
                .extend_from_slice(envelope.event.id().as_bytes());
            Ok(())
        }
        fn size_bound(&self, _: &Envelope) -> usize {
            self.bound
        }
        fn subject_bound(&self, _: &Envelope) -> usize {
            0
        }
    }

    fn event(id: &str) -> Arc<Envelope> {
        let event = meshgate_core::Event::new(id, "/s", "t").unwrap();
        let origin = meshgate_core::Origin {
            instance: Arc::from("i"),
            connection: 1,
        };
        let topic = meshgate_core::Topic::from_mqtt("t").unwrap();
        Arc::new(Envelope::new(topic, Arc::new(event), origin))
    }

    #[tokio::test]
    async fn events_encoded_by_the_writer_keep_their_place_among_other_messages() {
        let encoder = Arc::new(IdOnly { bound: 64 });
        let (client, _serving, mut server) = serving_with(64 << 10, Some(encoder)).await;
        client.publish("a", b"", b"1").unwrap();
        client.publish_later(&event("x")).unwrap();
        client.publish_later(&event("y")).unwrap();
        client.publish("b", b"", b"2").unwrap();
        client.publish_later(&event("z")).unwrap();
        let flushed = tokio::spawn({
            let client = client.clone();
            async move { client.flush().await }
        });
        let mut seen = Vec::new();
        while !seen.ends_with(b"PING\r\n") {
            let mut chunk = [0u8; 4096];
            let n = server.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the client closed");
            seen.extend_from_slice(&chunk[..n]);
        }
        let expected = "PUB a 1\r\n1\r\nPUB ev.t 1\r\nx\r\nPUB ev.t 1\r\ny\r\n\
                        PUB b 1\r\n2\r\nPUB ev.t 1\r\nz\r\nPING\r\n";
        assert_eq!(String::from_utf8_lossy(&seen), expected);
        server.write_all(b"PONG\r\n").await.unwrap();
        flushed.await.unwrap().unwrap();
    }

    #[test]
    fn events_queued_unencoded_count_their_bound_and_big_ones_are_checked_at_once() {
        let client = Client {
            shared: unconnected_with(Some(Arc::new(IdOnly { bound: 1 << 19 }))),
        };
        client.shared.out().connected = true;
        let mut queued = 0;
        let full = loop {
            match client.publish_later(&event("x")) {
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
        assert_eq!(client.publish_later(&event("abcd")), Ok(()));
        assert_eq!(client.shared.out().buf, b"PUB ev.t 4\r\nabcd\r\n");
        assert!(client.shared.out().later.is_empty());
        assert_eq!(
            client.publish_later(&event("abcde")),
            Err(ClientError::TooLarge { size: 5, max: 4 })
        );
    }

    /// Subject `ev.<topic>`, its bound counting every topic byte as escaped (as the real
    /// encoder's does).
    #[derive(Debug)]
    struct ByTopic;

    impl EncodeLater for ByTopic {
        fn encode(&self, envelope: &Envelope, frame: &mut Frame) -> Result<(), String> {
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
        assert_eq!(client.publish_later(&event_on(&topic)), Ok(()));
        assert!(client.shared.out().later.is_empty());
        assert_eq!(client.shared.out().buf.len(), before + MAX + 3);
        // Really over: refused with the real line length.
        let topic = "d".repeat(MAX - 3 - 7);
        assert_eq!(client.publish_later(&event_on(&topic)), too_long(MAX + 1));
        // Short ones are queued for the writer as before.
        assert_eq!(client.publish_later(&event_on("short")), Ok(()));
        assert_eq!(client.shared.out().later.len(), 1);
    }

    /// A client's shared state as [`Client::connect`] makes it, without connecting.
    fn unconnected() -> Arc<Shared> {
        unconnected_with(None)
    }

    fn unconnected_with(later: Option<Arc<dyn EncodeLater>>) -> Arc<Shared> {
        Arc::new(Shared::new(Options {
            urls: vec!["127.0.0.1:4222".into()],
            name: "test".into(),
            echo: false,
            user: None,
            password: None,
            token: None,
            connect_timeout: Duration::from_secs(1),
            subscription_capacity: 16,
            subscription_bytes: 1 << 20,
            slow_consumer: Counter::default(),
            too_large: Counter::default(),
            panicked: Counter::default(),
            disconnects: Counter::default(),
            later,
            max_control_line: 4096,
        }))
    }

    /// Runs [`serve`] on one end of an in-memory pipe (`capacity` bytes), once connected; the
    /// other end is the server's.
    async fn serving(
        capacity: usize,
    ) -> (
        Client,
        tokio::task::JoinHandle<String>,
        tokio::io::DuplexStream,
    ) {
        serving_with(capacity, None).await
    }

    async fn serving_with(
        capacity: usize,
        later: Option<Arc<dyn EncodeLater>>,
    ) -> (
        Client,
        tokio::task::JoinHandle<String>,
        tokio::io::DuplexStream,
    ) {
        let shared = unconnected_with(later);
        let (io, server) = tokio::io::duplex(capacity);
        let serving = tokio::spawn({
            let shared = shared.clone();
            async move { serve(&shared, Box::new(io), BytesMut::new()).await }
        });
        let client = Client { shared };
        while !client.is_connected() {
            tokio::task::yield_now().await;
        }
        (client, serving, server)
    }

    /// Reads from the client until a whole line starting with `verb` came; returns that line.
    async fn line_of(r: &mut (impl AsyncRead + Unpin), seen: &mut Vec<u8>, verb: &str) -> String {
        loop {
            if let Some(at) = memchr::memmem::find(seen, verb.as_bytes())
                && let Some(end) = memchr::memmem::find(&seen[at..], b"\r\n")
            {
                let line = String::from_utf8_lossy(&seen[at..at + end]).into_owned();
                seen.drain(..at + end + 2);
                return line;
            }
            let mut chunk = [0u8; 4096];
            let n = r.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the client closed");
            seen.extend_from_slice(&chunk[..n]);
        }
    }

    /// Review F15: a message over the server's own max_payload (+ slack) is skipped unread
    /// and counted, the connection and the next messages go on; a subscription's queue is
    /// bounded in bytes as well as messages (an empty one takes any one message).
    #[tokio::test]
    async fn messages_over_max_payload_are_skipped_and_queues_are_bounded_in_bytes() {
        use futures_util::StreamExt;
        let (client, serving, server) = serving(1 << 20).await;
        client.shared.max_payload.store(1000, Ordering::Relaxed);
        let mut sub = client.subscribe("s", None).unwrap();
        let (mut r, mut w) = tokio::io::split(server);
        let mut seen = Vec::new();
        let line = line_of(&mut r, &mut seen, "SUB ").await;
        assert_eq!(line, "SUB s 1");
        let big = 1000 + INBOUND_SLACK + 1;
        let mut input = format!("MSG s 1 {big}\r\n").into_bytes();
        input.extend(std::iter::repeat_n(b'x', big));
        input.extend_from_slice(b"\r\nMSG s 1 2\r\nok\r\n");
        // The per-subscription byte budget (1 MiB in `unconnected_with`): the first of
        // these fills it, the second is over it and dropped.
        let near = 1000 + INBOUND_SLACK;
        for _ in 0..20 {
            input.extend_from_slice(format!("MSG s 1 {near}\r\n").as_bytes());
            input.extend(std::iter::repeat_n(b'y', near));
            input.extend_from_slice(b"\r\n");
        }
        w.write_all(&input).await.unwrap();
        let first = sub.next().await.unwrap();
        assert_eq!(&first.payload[..], b"ok");
        assert_eq!(client.shared.options.too_large.get(), 1);
        // Wait for the reader to have handed on (or dropped) all twenty.
        while client.shared.options.slow_consumer.get()
            + ((sub.rx.bytes.load(Ordering::Relaxed) / near) as u64)
            < 20
        {
            tokio::task::yield_now().await;
        }
        let queued = sub.rx.bytes.load(Ordering::Relaxed);
        assert!(queued <= 1 << 20, "{queued}");
        assert_eq!(queued / near, (1 << 20) / near);
        assert!(client.shared.options.slow_consumer.get() > 0);
        assert!(!serving.is_finished(), "the connection is still served");
    }

    #[tokio::test]
    async fn a_jetstream_publish_is_a_request_whose_reply_settles_it() {
        use crate::jetstream::publish::{JsPublisher, PubAck, PublishFailure};
        let (client, _serving, server) = serving(64 << 10).await;
        let publisher = JsPublisher::start(client).unwrap();
        let (mut r, mut w) = tokio::io::split(server);
        let mut seen = Vec::new();
        let sub = line_of(&mut r, &mut seen, "SUB ").await;
        assert!(
            sub.starts_with("SUB _INBOX.") && sub.ends_with(".* 1"),
            "{sub}"
        );

        let first = tokio::spawn(async move {
            let a = publisher
                .publish("p.a", b"NATS/1.0\r\nX: y\r\n\r\n", b"hi")
                .await;
            let b = publisher.publish("p.b", b"", b"yo").await;
            (a, b)
        });
        // HPUB <subject> <reply> <header size> <total size>, then the reply to it.
        let hpub = line_of(&mut r, &mut seen, "HPUB ").await;
        let parts: Vec<&str> = hpub.split(' ').collect();
        assert_eq!(
            (parts[1], parts[3], parts[4]),
            ("p.a", "18", "20"),
            "{hpub}"
        );
        let ack = r#"{"stream":"S","seq":1,"duplicate":true}"#;
        let reply = format!("MSG {} 1 {}\r\n{ack}\r\n", parts[2], ack.len());
        w.write_all(reply.as_bytes()).await.unwrap();
        // PUB <subject> <reply> <size>: nobody takes it, the server says so (status 503).
        let publ = line_of(&mut r, &mut seen, "PUB p.b").await;
        let inbox = publ.split(' ').nth(2).unwrap().to_owned();
        let status = "NATS/1.0 503\r\n\r\n";
        let reply = format!(
            "HMSG {inbox} 1 {} {}\r\n{status}\r\n",
            status.len(),
            status.len()
        );
        w.write_all(reply.as_bytes()).await.unwrap();

        let (a, b) = first.await.unwrap();
        assert_eq!(a, Ok(PubAck { duplicate: true }));
        assert_eq!(b, Err(PublishFailure::NoResponders("p.b".into())));
    }

    /// Polls `pull` on a task of its own; what it yields, in order.
    fn forward(mut pull: crate::jetstream::pull::Pull) -> mpsc::UnboundedReceiver<Msg> {
        use futures_util::StreamExt;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = pull.next().await {
                let _ = tx.send(m);
            }
        });
        rx
    }

    #[tokio::test]
    async fn a_jetstream_pull_asks_again_at_half_and_after_a_request_ended() {
        use crate::jetstream::pull::{BATCH, Pull};
        let (client, _serving, server) = serving(64 << 10).await;
        let mut got = forward(Pull::start(&client, "S", "C", Default::default()).unwrap());
        let (mut r, mut w) = tokio::io::split(server);
        let mut seen = Vec::new();
        let sub = line_of(&mut r, &mut seen, "SUB ").await;
        let inbox = sub.split(' ').nth(1).unwrap().to_owned();
        // PUB $JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer> <inbox> <size>, then the request.
        let mut request = async |seen: &mut Vec<u8>| {
            let publ = line_of(&mut r, seen, "PUB ").await;
            let parts: Vec<&str> = publ.split(' ').collect();
            assert_eq!(
                (parts[1], parts[2]),
                ("$JS.API.CONSUMER.MSG.NEXT.S.C", inbox.as_str())
            );
            let body: serde_json::Value =
                serde_json::from_str(&line_of(&mut r, seen, "{").await).unwrap();
            assert!(
                body["expires"].as_u64().unwrap() > body["idle_heartbeat"].as_u64().unwrap() * 2
            );
            body["batch"].as_u64().unwrap() as usize
        };
        assert_eq!(
            request(&mut seen).await,
            BATCH,
            "the first request fills the window"
        );

        let mut send = String::new();
        for n in 1..=BATCH / 2 {
            send.push_str(&format!("MSG p.x 1 $JS.ACK.S.C.1.{n}.{n}.0.0 2\r\nhi\r\n"));
        }
        w.write_all(send.as_bytes()).await.unwrap();
        for n in 1..=BATCH / 2 {
            let m = got.recv().await.unwrap();
            assert_eq!(&m.subject[..], b"p.x");
            let ack = format!("$JS.ACK.S.C.1.{n}.{n}.0.0");
            assert_eq!(m.reply.as_deref(), Some(ack.as_bytes()));
        }
        assert_eq!(
            request(&mut seen).await,
            BATCH / 2,
            "half came: that half again"
        );

        // Statuses are not deliveries. The first request expired with the other half unsent:
        // that half is asked for again.
        let status =
            |text: &str| format!("HMSG {inbox} 1 {} {}\r\n{text}\r\n", text.len(), text.len());
        let heartbeat = status("NATS/1.0 100 Idle Heartbeat\r\n\r\n");
        let expired = status(
            "NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 256\r\nNats-Pending-Bytes: 0\r\n\r\n",
        );
        w.write_all(format!("{heartbeat}{expired}").as_bytes())
            .await
            .unwrap();
        assert_eq!(request(&mut seen).await, BATCH / 2);
        // Deleted: everything asked for again, after a pause.
        let started = std::time::Instant::now();
        w.write_all(status("NATS/1.0 409 Consumer Deleted\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(request(&mut seen).await, BATCH);
        assert!(started.elapsed() >= Duration::from_millis(900));
        // That request refused as it came (too many waiting): asked again after a pause, not
        // in a tight loop.
        let started = std::time::Instant::now();
        w.write_all(status("NATS/1.0 409 Exceeded MaxWaiting\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(request(&mut seen).await, BATCH);
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert!(got.try_recv().is_err(), "no status was delivered");
    }

    #[tokio::test]
    async fn a_consumer_that_is_gone_is_repaired_from_after_the_last_message() {
        use crate::jetstream::pull::{BATCH, Pull, Repair};
        let (client, _serving, server) = serving(64 << 10).await;
        let starts = Arc::new(Mutex::new(Vec::new()));
        let repair: Repair = Arc::new({
            let starts = starts.clone();
            move |start| {
                starts.lock().unwrap().push(start);
                Box::pin(async { Ok(true) })
            }
        });
        let pull = Pull::start(&client, "S", "C", Default::default())
            .unwrap()
            .with_repair(repair, 7);
        let mut got = forward(pull);
        let (mut r, mut w) = tokio::io::split(server);
        let mut seen = Vec::new();
        let first = line_of(&mut r, &mut seen, "SUB ").await;
        let inbox = first.split(' ').nth(1).unwrap().to_owned();
        line_of(&mut r, &mut seen, "PUB $JS.API.CONSUMER.MSG.NEXT.S.C").await;
        // Two deliveries (the second with a domain and account hash in its reply subject),
        // then the server says nobody serves the consumer's subject.
        let gone = "NATS/1.0 503\r\n\r\n";
        // (And a redelivery of an older one, which does not move the start back.)
        let send = format!(
            "MSG p.x 1 $JS.ACK.S.C.1.41.1.0.0 2\r\nhi\r\n\
             MSG p.x 1 $JS.ACK.dom.hash.S.C.1.42.2.0.0.tok 2\r\nhi\r\n\
             MSG p.x 1 $JS.ACK.S.C.2.10.3.0.0 2\r\nhi\r\n\
             HMSG {inbox} 1 {} {}\r\n{gone}\r\n",
            gone.len(),
            gone.len()
        );
        let started = std::time::Instant::now();
        w.write_all(send.as_bytes()).await.unwrap();
        for _ in 0..3 {
            got.recv().await.unwrap();
        }
        // After a pause: repaired from sequence 43, and pulled again on a new inbox.
        let second = line_of(&mut r, &mut seen, "SUB ").await;
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert_eq!(*starts.lock().unwrap(), vec![Some(43)]);
        let inbox2 = second.split(' ').nth(1).unwrap().to_owned();
        assert_ne!(inbox2, inbox);
        let publ = line_of(&mut r, &mut seen, "PUB $JS.API.CONSUMER.MSG.NEXT.S.C").await;
        assert_eq!(publ.split(' ').nth(2), Some(inbox2.as_str()));
        let body: serde_json::Value =
            serde_json::from_str(&line_of(&mut r, &mut seen, "{").await).unwrap();
        assert_eq!(body["batch"].as_u64(), Some(BATCH as u64));
        assert!(got.try_recv().is_err(), "no status was delivered");
    }

    /// A server that reads slowly (3 KiB every 100 ms) and answers each `PING` as soon as it has
    /// read it (`answer`), or never.
    async fn slow_server(io: tokio::io::DuplexStream, answer: bool) {
        let (mut r, mut w) = tokio::io::split(io);
        let mut tail = Vec::new();
        let mut chunk = vec![0u8; 3 << 10];
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let n = match r.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            tail.extend_from_slice(&chunk[..n]);
            let pings = memchr::memmem::find_iter(&tail, b"PING\r\n").count();
            // Keep what could be the start of a PING cut by this read.
            tail.drain(..tail.len() - tail.len().min(5));
            for _ in 0..pings {
                if answer && w.write_all(b"PONG\r\n").await.is_err() {
                    return;
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_servers_pings_are_answered_and_a_server_answering_none_is_dropped() {
        let (_client, serving, server) = serving(16 << 10).await;
        let (mut r, mut w) = tokio::io::split(server);
        w.write_all(b"PING\r\n").await.unwrap();
        let mut pong = [0u8; 6];
        r.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"PONG\r\n");
        // Keep-alives from now on, none answered: dropped at the third interval, with two
        // PINGs outstanding.
        let start = tokio::time::Instant::now();
        tokio::spawn(slow_server(r.unsplit(w), false));
        let reason = tokio::time::timeout(4 * PING_INTERVAL, serving)
            .await
            .expect("the connection ends")
            .unwrap();
        assert_eq!(reason, "the server stopped answering PINGs");
        let after = start.elapsed();
        assert!(
            after >= 2 * PING_INTERVAL && after <= 3 * PING_INTERVAL + Duration::from_secs(1),
            "dropped after {after:?}"
        );
    }

    /// A write that takes over three keep-alive intervals to a server that reads slowly and
    /// answers every PING: the connection is kept (no PING is counted as unanswered while it
    /// waits behind the data, nor fired in a burst after it).
    #[tokio::test(start_paused = true)]
    async fn a_long_busy_write_does_not_make_a_live_server_look_dead() {
        let (client, serving, server) = serving(16 << 10).await;
        tokio::spawn(slow_server(server, true));
        // About 7 MB, which this server takes some 235 s to read: the writer is busy through
        // three keep-alive intervals while the server answers every PING it gets.
        let payload = vec![b'x'; 1024];
        for _ in 0..7000 {
            client.publish("s", b"", &payload).unwrap();
        }
        let ended = tokio::time::timeout(4 * PING_INTERVAL + PING_INTERVAL / 2, serving).await;
        assert!(ended.is_err(), "the connection ended: {ended:?}");
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("nats://127.0.0.1:4333").unwrap(),
            (false, "127.0.0.1".into(), 4333)
        );
        assert_eq!(
            parse_url("tls://nats.example:4443").unwrap(),
            (true, "nats.example".into(), 4443)
        );
        assert_eq!(
            parse_url("localhost").unwrap(),
            (false, "localhost".into(), 4222)
        );
        assert_eq!(
            parse_url("nats://[::1]:4222").unwrap(),
            (false, "::1".into(), 4222)
        );
        assert!(parse_url("nats://h:x").is_err());
        let err = parse_url("nats://mg:secret@h:4222").unwrap_err();
        assert!(err.contains("backbone.nats.user"), "{err}");
    }

    /// Drives [`next_op`] over `chunks` as [`read_loop`] does (too-large messages skipped):
    /// the operations up to the first error, and whether there was one.
    fn drive(chunks: &[&[u8]], limit: usize) -> (Vec<Op>, bool) {
        let mut buf = BytesMut::new();
        let mut ops = Vec::new();
        let mut skip = 0usize;
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match next_op(&mut buf, &mut skip, limit) {
                    Ok(Some(op)) => ops.push(op),
                    Ok(None) => {
                        // Bounded memory: waiting for more never holds more than a control
                        // line and one message within the limit.
                        assert!(buf.len() <= MAX_CONTROL_LINE + limit + 4, "{}", buf.len());
                        break;
                    }
                    Err(_) => return (ops, true),
                }
            }
        }
        (ops, false)
    }

    /// Fuzz target `nats_protocol`: any bytes from the server, whole or cut anywhere, give
    /// the same operations (or the same protocol error), never a panic; messages over the
    /// limit are skipped, never buffered.
    #[test]
    fn fuzz_nats_protocol() {
        use meshgate_fuzz::proptest;
        use meshgate_fuzz::proptest::prelude::*;
        const LIMIT: usize = 64;
        let seeds: [&[u8]; 4] = [
            b"INFO {\"max_payload\":1024,\"headers\":true}\r\nPING\r\nPONG\r\n+OK\r\n-ERR 'Permissions Violation'\r\n",
            b"MSG a.b 1 5\r\nhello\r\nMSG a.b 1 r.x 2\r\nhi\r\n",
            b"HMSG a.b 2 r.x 22 24\r\nNATS/1.0\r\nabc: 1\r\n\r\nhi\r\nHMSG s 3 16 16\r\nNATS/1.0 100 Idle\r\n\r\n\r\n",
            b"MSG big 1 100\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\nPING\r\n",
        ];
        let inputs = (
            meshgate_fuzz::bytes("nats_protocol", &seeds, 512),
            proptest::collection::vec(any::<usize>(), 0..6),
        );
        meshgate_fuzz::run(
            "nats_protocol",
            inputs,
            |b| Some((b.to_vec(), vec![1, 7, 30])),
            |(input, cuts)| {
                let whole = drive(&[input.as_slice()], LIMIT);
                let mut at: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
                at.sort_unstable();
                let mut chunks: Vec<&[u8]> = Vec::new();
                let mut from = 0;
                for a in at {
                    chunks.push(&input[from..a]);
                    from = a;
                }
                chunks.push(&input[from..]);
                let cut = drive(&chunks, LIMIT);
                if whole != cut {
                    return Err(format!("whole {whole:?} != cut at {chunks:?}: {cut:?}"));
                }
                for op in &whole.0 {
                    if let Op::Msg { msg, .. } = op {
                        let size = msg.headers.as_ref().map_or(0, Bytes::len) + msg.payload.len();
                        if size > LIMIT {
                            return Err(format!(
                                "a message of {size} bytes over the limit was kept"
                            ));
                        }
                    }
                }
                Ok(())
            },
        );
    }

    /// An encoder with a bug: it panics on the event with id `boom`.
    #[derive(Debug)]
    struct Buggy;

    impl EncodeLater for Buggy {
        fn encode(&self, envelope: &Envelope, frame: &mut Frame) -> Result<(), String> {
            assert_ne!(envelope.event.id(), "boom", "a bug in the encoder");
            frame.subject.push_str("ev");
            frame.payload.push(b'x');
            Ok(())
        }
        fn size_bound(&self, _: &Envelope) -> usize {
            1
        }
        fn subject_bound(&self, _: &Envelope) -> usize {
            2
        }
    }

    /// A connection task that panics is not silently gone: counted, the client shows as
    /// disconnected, and it connects again (with its subscriptions) and serves on.
    #[tokio::test]
    async fn a_panicking_connection_task_is_counted_and_restarted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conn_tx, mut conns) = mpsc::unbounded_channel();
        // A minimal server: INFO, then PONG to the handshake's PING; reports each SUB seen.
        tokio::spawn(async move {
            for n in 1.. {
                let (tcp, _) = listener.accept().await.unwrap();
                let conn_tx = conn_tx.clone();
                tokio::spawn(async move {
                    let (r, mut w) = tokio::io::split(tcp);
                    w.write_all(b"INFO {\"headers\":true,\"max_payload\":1048576}\r\n")
                        .await
                        .unwrap();
                    let mut lines = tokio::io::BufReader::new(r).lines();
                    use tokio::io::AsyncBufReadExt;
                    while let Ok(Some(line)) = lines.next_line().await {
                        if line == "PING" {
                            let _ = w.write_all(b"PONG\r\n").await;
                        }
                        let _ = conn_tx.send((n, line));
                    }
                });
            }
        });
        let panicked = Counter::default();
        let mut options = Arc::into_inner(unconnected_with(Some(Arc::new(Buggy))))
            .unwrap()
            .options;
        options.urls = vec![addr.to_string()];
        options.panicked = panicked.clone();
        let client = Client::connect(options).await;
        assert!(client.is_connected());
        let _sub = client.subscribe("s", None).unwrap();
        client.publish_later(&event("fine")).unwrap();
        client.publish_later(&event("boom")).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while client.connections() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "not reconnected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(panicked.get(), 1);
        // Subscribed again on the new connection.
        loop {
            let (n, line) = tokio::time::timeout(Duration::from_secs(5), conns.recv())
                .await
                .unwrap()
                .unwrap();
            if n == 2 && line == "SUB s 1" {
                break;
            }
        }
        while !client.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        client.publish_later(&event("after")).unwrap();
    }
}
