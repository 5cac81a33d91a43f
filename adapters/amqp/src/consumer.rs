//! The sources' AMQP 0.9.1 connection: a consumer on one channel, run inside the source's own
//! task, on amq-protocol's frame codec (the codec lapin uses).
//!
//! Why not lapin here: lapin runs every connection's I/O on its own thread and hands each
//! delivery to the runtime through a channel. Profiled at ~24k deliveries/s, that thread and
//! the wake-ups between it and the runtime were most of meshgate's CPU per message — more on
//! their own than the bridge's budget (a quarter of RabbitMQ's CPU per message). Here the
//! source's task reads the socket, cuts frames from its buffer, publishes and acknowledges, with
//! no hop in between. The sinks keep lapin: publishing with confirms is not where the time went.
//!
//! What it speaks: the connection handshake (PLAIN, `authentication_failure_close`, so a
//! refused login comes back as ACCESS_REFUSED rather than a dropped socket), channel 1,
//! `basic.qos`, queue declare/bind, `basic.consume`, deliveries (method, header and body frames,
//! bodies over many frames), `basic.ack`/`reject`/`nack`, heartbeats both ways, and the
//! broker's `connection.close`, `channel.close` and `basic.cancel` (`consumer_cancel_notify`),
//! which end the connection with the broker's reason. Everything written is appended to one
//! buffer and sent once per batch of frames read.
//!
//! Bounds: no frame may exceed the negotiated `frame_max`; a message whose body is announced
//! over `amqp.max_body_size`, or whose headers nest deeper or hold more values than scan.rs
//! allows, is refused before anything of it is buffered or parsed: the source rejects it
//! (requeue=false) and counts it, its body frames are skipped, and consuming goes on. Tables
//! in method frames are bounded the same way (scan.rs), so nothing the broker or a publisher
//! sends reaches amq-protocol's recursive table parser unchecked.

use std::time::Duration;

use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::frame::{AMQPFrame, ProtocolVersion, gen_frame};
use amq_protocol::protocol::{AMQPClass, BasicProperties, basic, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::error::AmqpError;

/// The one channel a consumer connection uses.
pub(crate) const CHANNEL: u16 = 1;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Type, channel and size before a frame's payload.
const FRAME_HEAD: usize = 7;

/// The largest frame meshgate accepts (RabbitMQ's default `frame_max`); before `connection.tune`
/// the same bound applies to the broker's first frames.
const FRAME_MAX: u32 = 131_072;

/// Bodies up to this size are copied out of the read buffer; larger ones are shared with it.
/// A copy keeps an event that waits in a slow subscriber's queue from holding a whole read
/// chunk; above this size the copy costs more than the chunk it would free.
const COPY_BODY_BELOW: usize = 4096;

/// How much the read buffer grows by when it is full.
const READ_CHUNK: usize = 64 * 1024;

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where and as whom to connect (built from the config by `link::Connector`; its TLS part
/// again at each connection).
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// `amqps`: the connector and the name the certificate must carry.
    pub(crate) tls: Option<(TlsConnector, ServerName<'static>)>,
    pub(crate) vhost: String,
    pub(crate) user: String,
    pub(crate) password: String,
    /// Proposed heartbeat interval (zero: none).
    pub(crate) heartbeat: Duration,
    /// `amqp.max_body_size`: larger messages are refused before their body is read.
    pub(crate) max_body: u64,
}

/// Class and method id of `basic.deliver` (60, 60).
const BASIC_DELIVER: [u8; 4] = [0, 60, 0, 60];

/// `basic.deliver`'s arguments after the ids: (delivery tag, routing key if UTF-8). Read here rather
/// than by amq-protocol's general parser, which allocates the consumer tag and exchange name
/// of every delivery; this is the one method that comes once per message.
fn parse_deliver(mut p: &[u8]) -> Option<(u64, Option<ShortString>)> {
    fn short<'a>(p: &mut &'a [u8]) -> Option<&'a [u8]> {
        let (&len, rest) = p.split_first()?;
        let (s, rest) = rest.split_at_checked(usize::from(len))?;
        *p = rest;
        Some(s)
    }
    short(&mut p)?; // consumer tag: meshgate's only consumer on this channel
    let (tag, rest) = p.split_first_chunk::<8>()?;
    let tag = u64::from_be_bytes(*tag);
    let (_redelivered, rest) = rest.split_first()?;
    p = rest;
    short(&mut p)?; // exchange
    let key = short(&mut p)?;
    if !p.is_empty() {
        return None;
    }
    // `None`: not UTF-8. The message is still delivered (and then rejected as having no
    // topic) rather than the connection failing on it at every redelivery.
    // At most 255 bytes (its length is one octet), so `try_new` cannot fail.
    let key = std::str::from_utf8(key)
        .ok()
        .and_then(|k| ShortString::try_new(k).ok());
    Some((tag, key))
}

/// One frame cut from the read buffer.
#[derive(Debug, PartialEq)]
pub(crate) enum Frame {
    /// `basic.deliver`: channel, delivery tag, routing key (`None`: not UTF-8).
    Deliver(u16, u64, Option<ShortString>),
    Method(u16, AMQPClass),
    /// A content header: the properties and the size of the body that follows.
    Header(u16, Box<BasicProperties>, u64),
    /// A content header meshgate refuses to parse (headers over scan.rs's bounds) or cannot
    /// (malformed): the size of the body that follows, and why. The message is rejected and
    /// its body skipped; the stream itself is intact (the frame's end octet was there).
    BadHeader(u16, u64, String),
    Body(u16, Bytes),
    Heartbeat,
}

/// (payload size, whole frame size) of the frame `buf` starts with, once its head is there.
fn frame_size(buf: &[u8]) -> Option<(u32, usize)> {
    let head = buf.get(..FRAME_HEAD)?;
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
    Some((size, FRAME_HEAD + size as usize + 1))
}

/// Cuts the next complete frame off the front of `buf`; `Ok(None)` when more bytes are needed.
/// An error means the stream cannot be read further (the connection must end).
pub(crate) fn next_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, AmqpError> {
    let Some((size, total)) = frame_size(buf) else {
        return Ok(None);
    };
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    // frame_max counts the whole frame: head, payload and end octet.
    if total as u64 > u64::from(frame_max) {
        return Err(AmqpError::Protocol(format!(
            "the broker sent a {size}-byte frame; the negotiated frame_max is {frame_max}"
        )));
    }
    if buf.len() < total {
        return Ok(None);
    }
    if buf[total - 1] != FRAME_END {
        return Err(AmqpError::Protocol(format!(
            "malformed frame: byte {total} is {:#04x}, not the frame end 0xce",
            buf[total - 1]
        )));
    }
    let payload = FRAME_HEAD..total - 1;
    let frame = match kind {
        FRAME_METHOD if buf[payload.clone()].starts_with(&BASIC_DELIVER) => {
            let (tag, routing_key) =
                parse_deliver(&buf[payload.start + BASIC_DELIVER.len()..payload.end])
                    .ok_or_else(|| protocol("malformed basic.deliver frame"))?;
            buf.advance(total);
            Frame::Deliver(channel, tag, routing_key)
        }
        FRAME_METHOD => {
            // Tables inside methods are bounded before amq-protocol recurses into them.
            if let Err(why) = crate::scan::method(&buf[payload.clone()]) {
                return Err(AmqpError::Protocol(format!(
                    "the broker sent a method frame meshgate refuses: {why}"
                )));
            }
            let class = match amq_protocol::protocol::parse_class(&buf[payload]) {
                Ok(([], class)) => class,
                _ => return Err(protocol("malformed method frame")),
            };
            buf.advance(total);
            Frame::Method(channel, class)
        }
        FRAME_HEADER => {
            let p = &buf[payload];
            // class-id (2), weight (2), body-size (8): without the size the body frames that
            // follow cannot be skipped, so the stream cannot go on.
            let size = p
                .get(4..12)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| protocol("malformed content header frame"))?;
            // The pre-scan first: amq-protocol's table parser recurses once per nesting level
            // with no limit (scan.rs), and a stack overflow aborts the process.
            let frame = match crate::scan::content_header(p) {
                Err(why) => Frame::BadHeader(channel, size, why.to_string()),
                Ok(()) => match parse_content_header(p) {
                    Ok(([], header)) => {
                        Frame::Header(channel, Box::new(header.properties), header.body_size)
                    }
                    _ => Frame::BadHeader(
                        channel,
                        size,
                        "its content header is malformed".to_owned(),
                    ),
                },
            };
            buf.advance(total);
            frame
        }
        FRAME_BODY => {
            let body = if size as usize <= COPY_BODY_BELOW {
                let body = Bytes::copy_from_slice(&buf[payload]);
                buf.advance(total);
                body
            } else {
                buf.split_to(total).freeze().slice(payload)
            };
            Frame::Body(channel, body)
        }
        FRAME_HEARTBEAT => {
            buf.advance(total);
            Frame::Heartbeat
        }
        other => return Err(AmqpError::Protocol(format!("unknown frame type {other}"))),
    };
    Ok(Some(frame))
}

/// A message RabbitMQ delivered.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) tag: u64,
    /// `None`: the broker's routing key was not UTF-8.
    pub(crate) routing_key: Option<ShortString>,
    pub(crate) properties: Box<BasicProperties>,
    pub(crate) body: Bytes,
}

/// Why a delivery was refused without being assembled (the metric's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Headers over scan.rs's bounds, or a content header amq-protocol cannot read.
    BadMessage,
    /// A body announced over `amqp.max_body_size`.
    TooLarge,
}

impl Refusal {
    pub(crate) fn drop_reason(self) -> meshgate_core::metrics::DropReason {
        use meshgate_core::metrics::DropReason;
        match self {
            Refusal::BadMessage => DropReason::BadMessage,
            Refusal::TooLarge => DropReason::TooLarge,
        }
    }

    pub(crate) fn error_kind(self) -> meshgate_core::metrics::ErrorKind {
        use meshgate_core::metrics::ErrorKind;
        match self {
            Refusal::BadMessage => ErrorKind::BadMessage,
            Refusal::TooLarge => ErrorKind::TooLarge,
        }
    }
}

/// What the broker delivered: a message, or one refused from its content header alone (its
/// body frames are skipped as they come; the source rejects it without requeue).
#[derive(Debug)]
pub(crate) enum Incoming {
    Message(Delivery),
    Refused {
        tag: u64,
        kind: Refusal,
        reason: String,
    },
}

/// A delivery whose header or body frames are still to come.
struct Assembling {
    tag: u64,
    routing_key: Option<ShortString>,
    /// Properties and announced body size, once the header frame arrived.
    header: Option<(Box<BasicProperties>, u64)>,
    /// Announced body size of a refused delivery: its body frames are counted, not kept.
    skipping: Option<u64>,
    /// The first body frame, kept as it came (most bodies have one frame).
    first: Option<Bytes>,
    /// Bodies of several frames, copied together as they come: memory follows the bytes
    /// received, not the number of frames (a broker sending 1-byte frames cannot make each
    /// byte cost an allocation).
    joined: BytesMut,
    received: u64,
}

impl Assembling {
    fn done(&mut self) -> Option<Delivery> {
        let (_, size) = self.header.as_ref()?;
        if self.received < *size {
            return None;
        }
        let (properties, _) = self.header.take()?;
        let body = match self.first.take() {
            Some(first) => first,
            None => std::mem::take(&mut self.joined).freeze(),
        };
        Some(Delivery {
            tag: self.tag,
            routing_key: self.routing_key.take(),
            properties,
            body,
        })
    }
}

fn protocol(what: &str) -> AmqpError {
    AmqpError::Protocol(what.to_owned())
}

/// A consumer connection with its channel open.
pub(crate) struct Connection {
    io: Box<dyn Io>,
    read: BytesMut,
    write: Vec<u8>,
    frame_max: u32,
    /// Negotiated heartbeat interval; zero: none.
    heartbeat: Duration,
    assembling: Option<Assembling>,
    /// Traffic since the last heartbeat tick, each way.
    heard: bool,
    spoke: bool,
    /// Heartbeat ticks (half an interval each) without anything from the broker.
    silent_ticks: u32,
    /// `amqp.max_body_size`.
    max_body: u64,
    /// `connection.open-ok` came: a refusal from here on is not about the login.
    logged_in: bool,
}

impl Connection {
    /// Connects, logs in, opens the virtual host and channel 1. `name` is the connection name
    /// RabbitMQ shows (`rabbitmqctl list_connections name`).
    pub(crate) async fn open(target: &Target, name: &str) -> Result<Connection, AmqpError> {
        let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(AmqpError::io("cannot connect"))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &target.tls {
            None => Box::new(tcp),
            Some((connector, server_name)) => Box::new(
                connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(AmqpError::Tls)?,
            ),
        };
        let mut c = Connection {
            io,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: Vec::with_capacity(4096),
            frame_max: FRAME_MAX,
            heartbeat: Duration::ZERO,
            assembling: None,
            heard: false,
            spoke: false,
            silent_ticks: 0,
            max_body: target.max_body,
            logged_in: false,
        };
        c.handshake(target, name).await?;
        Ok(c)
    }

    async fn handshake(&mut self, target: &Target, name: &str) -> Result<(), AmqpError> {
        self.push(&AMQPFrame::ProtocolHeader(ProtocolVersion::amqp_0_9_1()));
        self.flush().await?;
        let start = match self.expect(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::Start(s)) => s,
            other => {
                return Err(AmqpError::Protocol(format!(
                    "expected connection.start, got {other:?}"
                )));
            }
        };
        let mechanisms = String::from_utf8_lossy(start.mechanisms.as_bytes()).into_owned();
        if !mechanisms.split(' ').any(|m| m == "PLAIN") {
            return Err(AmqpError::Protocol(format!(
                "the broker offers no PLAIN login (it offers `{mechanisms}`); meshgate logs in with amqp.user and amqp.password"
            )));
        }
        let mut response = Vec::with_capacity(2 + target.user.len() + target.password.len());
        response.push(0);
        response.extend_from_slice(target.user.as_bytes());
        response.push(0);
        response.extend_from_slice(target.password.as_bytes());
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: client_properties(name),
                mechanism: "PLAIN".into(),
                response: LongString::from(response),
                locale: "en_US".into(),
            })),
        );
        self.flush().await?;
        let tune = match self.expect(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => t,
            other => {
                return Err(AmqpError::Protocol(format!(
                    "expected connection.tune, got {other:?}"
                )));
            }
        };
        // 0 from the broker means "no limit".
        let frame_max = match tune.frame_max {
            0 => FRAME_MAX,
            n => n.min(FRAME_MAX),
        };
        // Whole seconds on the wire: a configured fraction rounds up, never down to "none".
        let ours = u16::try_from(target.heartbeat.as_millis().div_ceil(1000)).unwrap_or(u16::MAX);
        let heartbeat = match (ours, tune.heartbeat) {
            (0, _) => 0,
            (h, 0) => h,
            (h, theirs) => h.min(theirs),
        };
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max,
                heartbeat,
            })),
        );
        self.frame_max = frame_max;
        self.heartbeat = Duration::from_secs(u64::from(heartbeat));
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: ShortString::try_new(target.vhost.as_str()).map_err(|_| {
                    AmqpError::Config("amqp.vhost is longer than 255 bytes".to_owned())
                })?,
            })),
        );
        self.flush().await?;
        match self.expect(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) => self.logged_in = true,
            other => {
                return Err(AmqpError::Protocol(format!(
                    "expected connection.open-ok, got {other:?}"
                )));
            }
        }
        self.call(AMQPClass::Channel(channel::AMQPMethod::Open(
            channel::Open {},
        )))
        .await
        .map(drop)
    }

    /// Appends a frame to the write buffer.
    fn push(&mut self, frame: &AMQPFrame) {
        let written = gen_frame(frame)(std::mem::take(&mut self.write).into());
        match written {
            Ok(ctx) => self.write = ctx.into_inner().0,
            // Writing into a Vec cannot run out of room; the frames meshgate builds are valid.
            Err(e) => unreachable!("serializing an AMQP frame into a Vec failed: {e:?}"),
        }
    }

    fn method(&mut self, channel: u16, class: AMQPClass) {
        self.push(&AMQPFrame::Method(channel, class));
    }

    /// Sends what the write buffer holds.
    pub(crate) async fn flush(&mut self) -> Result<(), AmqpError> {
        if self.write.is_empty() {
            return Ok(());
        }
        self.spoke = true;
        let r = self.io.write_all(&self.write).await;
        self.write.clear();
        r.map_err(AmqpError::io("cannot write to the broker"))?;
        self.io
            .flush()
            .await
            .map_err(AmqpError::io("cannot write to the broker"))
    }

    /// Reads more bytes from the broker. Cancel-safe: bytes read are kept in the buffer.
    pub(crate) async fn read_more(&mut self) -> Result<(), AmqpError> {
        if self.read.capacity() - self.read.len() < FRAME_HEAD {
            self.read.reserve(READ_CHUNK);
        }
        match self.io.read_buf(&mut self.read).await {
            Ok(0) => Err(AmqpError::Closed),
            Ok(_) => {
                self.heard = true;
                Ok(())
            }
            Err(e) => Err(AmqpError::io("cannot read from the broker")(e)),
        }
    }

    /// Bytes read and not yet processed.
    pub(crate) fn buffered(&self) -> usize {
        self.read.len()
    }

    /// The next frame the buffer holds, growing the buffer to fit one that is cut short.
    fn frame(&mut self) -> Result<Option<Frame>, AmqpError> {
        let frame = next_frame(&mut self.read, self.frame_max)?;
        if frame.is_none()
            && let Some((_, total)) = frame_size(&self.read)
        {
            self.read.reserve(total.saturating_sub(self.read.len()));
        }
        Ok(frame)
    }

    /// Handles the frames every state must answer: the broker closing the connection or the
    /// channel (answered, then an error with its reason) and heartbeats (nothing to do).
    /// Returns the frame when it is something else.
    fn common(&mut self, frame: Frame) -> Result<Option<Frame>, AmqpError> {
        match frame {
            Frame::Heartbeat => Ok(None),
            Frame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                self.method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                Err(AmqpError::from_reply(
                    c.reply_code,
                    c.reply_text.as_str(),
                    !self.logged_in,
                ))
            }
            Frame::Method(ch, AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
                self.method(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                Err(AmqpError::from_reply(
                    c.reply_code,
                    c.reply_text.as_str(),
                    !self.logged_in,
                ))
            }
            Frame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Blocked(_)))
            | Frame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Unblocked(_))) => {
                // Blocking stops publishers; a consumer connection goes on.
                Ok(None)
            }
            other => Ok(Some(other)),
        }
    }

    /// Waits for the next method on `channel` (during the handshake and setup).
    async fn expect(&mut self, channel: u16) -> Result<AMQPClass, AmqpError> {
        loop {
            while let Some(frame) = self.frame()? {
                match self.common(frame) {
                    Ok(Some(Frame::Method(ch, class))) if ch == channel => return Ok(class),
                    Ok(_) => {}
                    Err(e) => {
                        // Answer the close before giving up, as the protocol asks.
                        let _ = self.flush().await;
                        return Err(e);
                    }
                }
            }
            self.read_more().await?;
        }
    }

    /// Sends a synchronous method on the channel and waits for its reply.
    pub(crate) async fn call(&mut self, class: AMQPClass) -> Result<AMQPClass, AmqpError> {
        self.method(CHANNEL, class);
        self.flush().await?;
        self.expect(CHANNEL).await
    }

    /// The next delivery the read buffer holds, if one is complete. Errors end the connection:
    /// the broker closed it, cancelled the consumer, or sent what a consumer cannot accept.
    pub(crate) fn next_delivery(&mut self) -> Result<Option<Incoming>, AmqpError> {
        while let Some(frame) = self.frame()? {
            let Some(frame) = self.common(frame)? else {
                continue;
            };
            let mut refused = None;
            match (frame, &mut self.assembling) {
                (Frame::Deliver(CHANNEL, tag, routing_key), None) => {
                    self.assembling = Some(Assembling {
                        tag,
                        routing_key,
                        header: None,
                        skipping: None,
                        first: None,
                        joined: BytesMut::new(),
                        received: 0,
                    });
                }
                (Frame::Method(CHANNEL, AMQPClass::Basic(basic::AMQPMethod::Cancel(_))), _) => {
                    return Err(AmqpError::Refused {
                        code: 0,
                        text: "the broker cancelled the consumer (queue deleted?)".to_owned(),
                    });
                }
                (Frame::Header(CHANNEL, properties, size), Some(a))
                    if a.header.is_none() && a.skipping.is_none() =>
                {
                    // Checked against the announced size, before any of the body is read.
                    if size > self.max_body {
                        a.skipping = Some(size);
                        refused = Some(Incoming::Refused {
                            tag: a.tag,
                            kind: Refusal::TooLarge,
                            reason: format!(
                                "its body of {size} bytes is over amqp.max_body_size ({} bytes)",
                                self.max_body
                            ),
                        });
                    } else {
                        a.header = Some((properties, size));
                    }
                }
                (Frame::BadHeader(CHANNEL, size, reason), Some(a))
                    if a.header.is_none() && a.skipping.is_none() =>
                {
                    a.skipping = Some(size);
                    refused = Some(Incoming::Refused {
                        tag: a.tag,
                        kind: Refusal::BadMessage,
                        reason,
                    });
                }
                (Frame::Body(CHANNEL, body), Some(a)) if a.skipping.is_some() => {
                    // A refused message's body: counted, never kept.
                    a.received += body.len() as u64;
                    if a.skipping.is_some_and(|size| a.received > size) {
                        return Err(protocol("a message body was longer than its header said"));
                    }
                }
                (Frame::Body(CHANNEL, body), Some(a)) if a.header.is_some() => {
                    a.received += body.len() as u64;
                    if a.header
                        .as_ref()
                        .is_some_and(|(_, size)| a.received > *size)
                    {
                        return Err(protocol("a message body was longer than its header said"));
                    }
                    if a.first.is_none() && a.joined.is_empty() {
                        a.first = Some(body);
                    } else {
                        if let Some(first) = a.first.take() {
                            a.joined.extend_from_slice(&first);
                        }
                        a.joined.extend_from_slice(&body);
                    }
                }
                (Frame::Method(_, class), _) => {
                    // Replies to nothing meshgate asked (acks need none): ignored.
                    tracing::debug!(?class, "AMQP source: unexpected method ignored");
                    continue;
                }
                (other, _) => {
                    return Err(AmqpError::Protocol(format!(
                        "unexpected frame while consuming: {other:?}"
                    )));
                }
            }
            if let Some(a) = &mut self.assembling {
                if a.skipping.is_some_and(|size| a.received >= size) {
                    // A refused message's body is all there: the next delivery may begin.
                    self.assembling = None;
                } else if let Some(d) = a.done() {
                    self.assembling = None;
                    return Ok(Some(Incoming::Message(d)));
                }
            }
            if refused.is_some() {
                return Ok(refused);
            }
        }
        Ok(None)
    }

    /// `basic.ack` (up to and including `tag` when `multiple`).
    pub(crate) fn ack(&mut self, tag: u64, multiple: bool) {
        self.method(
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: tag,
                multiple,
            })),
        );
    }

    /// `basic.reject` without requeue: dead-lettered where the queue has a dead-letter exchange.
    pub(crate) fn reject(&mut self, tag: u64) {
        self.method(
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
                delivery_tag: tag,
                requeue: false,
            })),
        );
    }

    /// `basic.nack` with requeue: RabbitMQ delivers the message again.
    pub(crate) fn requeue(&mut self, tag: u64) {
        self.method(
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: tag,
                multiple: false,
                requeue: true,
            })),
        );
    }

    /// How often [`Connection::tick`] must run: half the heartbeat interval, `None` without
    /// heartbeats.
    pub(crate) fn tick_every(&self) -> Option<Duration> {
        (!self.heartbeat.is_zero()).then(|| self.heartbeat / 2)
    }

    /// Heartbeat bookkeeping, every half interval: queues a heartbeat when nothing else was
    /// sent; an error when the broker has been silent for two intervals (the spec's limit).
    pub(crate) fn tick(&mut self) -> Result<(), AmqpError> {
        if !std::mem::take(&mut self.spoke) {
            self.push(&AMQPFrame::Heartbeat);
        }
        if std::mem::take(&mut self.heard) {
            self.silent_ticks = 0;
        } else {
            self.silent_ticks += 1;
            if self.silent_ticks >= 4 {
                return Err(AmqpError::Io {
                    doing: "heartbeat",
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "nothing from the broker for two heartbeat intervals ({}s)",
                            self.heartbeat.as_secs() * 2
                        ),
                    ),
                });
            }
        }
        Ok(())
    }

    /// Closes the connection politely: `connection.close`, then waits (briefly) for the
    /// broker's close-ok. Deliveries still arriving are not acknowledged: RabbitMQ requeues
    /// them.
    pub(crate) async fn close(mut self, reason: &str) {
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                // A fixed text of meshgate's; should one ever be too long, close without it.
                reply_text: ShortString::try_new(reason).unwrap_or_default(),
                class_id: 0,
                method_id: 0,
            })),
        );
        // Bounded as a whole: a peer that stopped reading must not hold up the shutdown.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.closing().await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }

    /// Sends the queued `connection.close` and waits for the broker's close-ok.
    async fn closing(&mut self) -> Result<(), AmqpError> {
        self.flush().await?;
        loop {
            while let Some(frame) = self.frame()? {
                match frame {
                    Frame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {
                        return Ok(());
                    }
                    // The broker closed at the same time: answer it, and that is the end.
                    Frame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(_))) => {
                        self.method(
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                connection::CloseOk {},
                            )),
                        );
                        return self.flush().await;
                    }
                    _ => {}
                }
            }
            self.read_more().await?;
        }
    }

    /// Sends what is queued (a close-ok, say) before the connection is dropped after an
    /// error, without waiting long for a peer that may be gone.
    pub(crate) async fn abandon(mut self) {
        let _ = tokio::time::timeout(Duration::from_millis(500), self.flush()).await;
    }
}

/// What meshgate tells the broker about itself.
fn client_properties(name: &str) -> FieldTable {
    let mut capabilities = FieldTable::default();
    for c in [
        "authentication_failure_close",
        "consumer_cancel_notify",
        "connection.blocked",
        "basic.nack",
    ] {
        capabilities.insert(c.into(), AMQPValue::Boolean(true));
    }
    let mut p = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(s.into());
    p.insert("product".into(), text("meshgate"));
    p.insert("version".into(), text(env!("CARGO_PKG_VERSION")));
    p.insert("platform".into(), text("Rust"));
    p.insert("connection_name".into(), text(name));
    p.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    p
}

/// The TLS client for `amqps`: the system's root certificates, and the CA file's when one is
/// configured (`ca_pem`: its contents). The errors name `amqp.ca_file`.
pub(crate) fn tls_connector(
    ca_pem: Option<&str>,
    identity: Option<&(Vec<u8>, Vec<u8>)>,
) -> Result<TlsConnector, AmqpError> {
    use meshgate_core::tls::TlsSetupError;
    meshgate_core::tls::client_config_with(
        ca_pem.map(str::as_bytes),
        identity.map(|(c, k)| (c.as_slice(), k.as_slice())),
    )
    .map(|c| TlsConnector::from(std::sync::Arc::new(c)))
    .map_err(|e| {
        AmqpError::Config(match e {
            TlsSetupError::NoCertificate => "amqp.ca_file holds no certificate".to_owned(),
            TlsSetupError::Protocols(e) => format!("TLS for amqps: {e}"),
            e @ TlsSetupError::ClientIdentity(_) => format!("amqp.tls_cert_file: {e}"),
            e @ (TlsSetupError::NotPem(_) | TlsSetupError::Unusable(_)) => {
                format!("amqp.ca_file: {e}")
            }
        })
    })
}

#[cfg(test)]
mod tests;
