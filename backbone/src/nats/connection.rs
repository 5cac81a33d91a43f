//! One established connection of the client: re-subscribing, the writer (one buffer swapped
//! out under the lock, events queued unencoded encoded in place), the reader (operations
//! parsed from the read buffer and handed to their subscriptions) and the keep-alive.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use meshgate_core::Envelope;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::client::{ClientError, Deliver, Frame, MAX_PENDING, Pong, Shared, Waiting};
use super::proto::{
    Info, MAX_INBOUND_MESSAGE, Op, ProtocolError, next_op, write_pub, write_sub, write_unsub,
};
use super::wire::HeaderError;

/// Keep-alive `PING` interval (as async-nats and the Go client).
pub(super) const PING_INTERVAL: Duration = Duration::from_secs(60);
/// Unanswered keep-alive `PING`s after which the connection is given up.
pub(super) const MAX_PINGS_OUTSTANDING: usize = 2;
/// A write to which the server takes no byte for this long ends the connection (a stopped
/// server: its kernel keeps the connection open with a zero window).
pub(super) const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Largest encoding buffer the writer keeps for the next event.
const MAX_KEPT_FRAME: usize = 1 << 20;

/// Read chunk; received messages are slices of it (no copy).
const READ_CHUNK: usize = 32 << 10;

/// Room above the server's `max_payload` (and its third, see `inbound_limit`) for a received
/// message (headers a server may add to a stored message); past it, a message is skipped
/// unread and counted
/// as `too_large` (review F15: was any size up to [`MAX_INBOUND_MESSAGE`]).
pub(super) const INBOUND_SLACK: usize = 64 << 10;

/// A connection's byte stream: TCP, or TLS over it.
pub(super) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Why an established connection ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Disconnect {
    /// The client was drained (closed on purpose).
    #[error("closed")]
    Closed,
    #[error("connection closed by the server")]
    ServerClosed,
    #[error("read: {0}")]
    Read(#[source] std::io::Error),
    #[error("write: {0}")]
    Write(#[source] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[source] ProtocolError),
    /// [`MAX_PINGS_OUTSTANDING`] keep-alive `PING`s went unanswered.
    #[error("the server stopped answering PINGs")]
    Unresponsive,
}

/// How a connection ended.
pub(super) enum Served {
    /// Lost or closed: [`super::connector::disconnected`] is due.
    Ended(Disconnect),
    /// Left for another server (the old one is in lame-duck mode) after it confirmed everything
    /// written on it: what was appended since waits in [`super::client::Out`] for `Replacement`.
    Moved(Replacement),
}

/// A connection that is up (handshake done, the subscriptions of `sids` made on it) and not
/// yet served.
pub(super) struct Replacement {
    pub(super) io: Box<dyn Io>,
    /// What the server sent after the handshake's `PONG`.
    pub(super) rest: BytesMut,
    pub(super) url: String,
    pub(super) sids: Vec<u64>,
}

/// How a connection to serve came to be.
pub(super) enum Start {
    /// After a loss, or the first: `disconnected` cleared everything; subscribe to all.
    Fresh {
        /// The server announced lame-duck mode already in the handshake.
        lame_duck: bool,
    },
    /// Moved from a lame-duck server: `subscribed` were made by `replacement`; the buffer holds
    /// what was appended since the old connection's last write.
    Moved { subscribed: Vec<u64> },
}

/// Runs the connection to `url` until it fails or `replacement` (which waits for lame-duck
/// mode, see [`super::connector`]) has another one ready: subscribes, then reads and writes.
pub(super) async fn serve(
    shared: &Arc<Shared>,
    io: Box<dyn Io>,
    rest: BytesMut,
    url: &str,
    start: Start,
    replacement: impl Future<Output = Replacement>,
) -> Served {
    // (A write cancelled by the last connection's end left it set.)
    shared.writing.store(false, Ordering::Release);
    let lame_duck = matches!(start, Start::Fresh { lame_duck: true });
    shared.lame_duck.store(lame_duck, Ordering::Release);
    if lame_duck {
        shared.lame_duck_told.notify_one();
    }
    {
        let mut out = shared.out();
        // The subscriptions first, then whatever was appended while a move to this server
        // was under way (nothing after a lost connection: `disconnected` cleared it, and
        // publishes are refused until this one is up).
        let mut buf = Vec::with_capacity(out.buf.len() + 64);
        match &start {
            Start::Fresh { .. } => {
                shared.overlap.end();
                write_subs(shared, &mut buf);
                // A new connection: server-side state of the last one (pending pull
                // requests) is gone. Not so after a move: the subscriptions were made here
                // before the old connection let go of them, so replies still find them.
                shared.connections.fetch_add(1, Ordering::Release);
            }
            Start::Moved { subscribed } => {
                // (What both connections delivered meanwhile is handed on once: `overlap`.)
                shared.overlap.filter();
                // Subscriptions made or ended after `replacement` subscribed here went to the
                // old connection only. Sorted, so that a move with thousands of subscriptions
                // is not quadratic.
                let mut subscribed = subscribed.clone();
                subscribed.sort_unstable();
                let subs = shared.subs();
                for (sid, sub) in subs.iter() {
                    if subscribed.binary_search(sid).is_err() {
                        write_sub(&mut buf, *sid, &sub.subject, sub.queue.as_deref());
                    }
                }
                for sid in &subscribed {
                    if !subs.contains_key(sid) {
                        write_unsub(&mut buf, *sid);
                    }
                }
            }
        }
        let shift = buf.len();
        buf.extend_from_slice(&out.buf);
        out.buf = buf;
        for (offset, _) in &mut out.later {
            *offset += shift;
        }
        out.in_write = 0;
        out.switch = None;
        out.connected = true;
    }
    shared.wake_writer.notify_one();
    let (reader, writer) = tokio::io::split(io);
    let closed = shared.close.notified();
    tokio::select! {
        r = read_loop(shared, reader, rest, url) => Served::Ended(r),
        r = write_loop(shared, writer) => Served::Ended(r),
        r = keep_alive(shared) => Served::Ended(r),
        r = replacement => Served::Moved(r),
        _ = closed => Served::Ended(Disconnect::Closed),
    }
}

/// `SUB` for every subscription; returns their sids.
pub(super) fn write_subs(shared: &Shared, buf: &mut Vec<u8>) -> Vec<u64> {
    let subs = shared.subs();
    for (sid, sub) in subs.iter() {
        write_sub(buf, *sid, &sub.subject, sub.queue.as_deref());
    }
    subs.keys().copied().collect()
}

/// The end of a connection being left: `UNSUB` for every subscription (the new connection has
/// them), then the `PING` whose `PONG` comes after every message the server will still send.
fn write_leaving(shared: &Shared, buf: &mut Vec<u8>) {
    for sid in shared.subs().keys() {
        write_unsub(buf, *sid);
    }
    buf.extend_from_slice(b"PING\r\n");
}

/// A `PING` every [`PING_INTERVAL`]; the connection is given up with
/// [`MAX_PINGS_OUTSTANDING`] of them unanswered. Skipped while a write is in progress: a PING
/// queued behind megabytes the server is slowly reading would look unanswered (a write the
/// server stops reading ends after [`WRITE_STALL_TIMEOUT`] without progress).
async fn keep_alive(shared: &Shared) -> Disconnect {
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
            let keep_alives = out
                .pongs
                .iter()
                .filter(|p| matches!(p, Pong::KeepAlive))
                .count();
            if keep_alives >= MAX_PINGS_OUTSTANDING {
                return Disconnect::Unresponsive;
            }
            out.buf.extend_from_slice(b"PING\r\n");
            out.pongs.push_back(Pong::KeepAlive);
        }
        shared.wake_writer.notify_one();
    }
}

async fn write_loop(shared: &Shared, mut w: tokio::io::WriteHalf<Box<dyn Io>>) -> Disconnect {
    let mut spare = Vec::with_capacity(64 << 10);
    let mut later = Vec::new();
    // Where the bytes and the events encoded here are put together, and one event's encoding.
    let mut joined = Vec::with_capacity(64 << 10);
    let mut frame = Frame::default();
    // The publishers waiting for this write (swapped with `Out::waiting`), where each one's
    // event is in `later` (if queued unencoded), and the events the encoder refused.
    let mut waiting = Vec::new();
    let mut tags = Vec::new();
    let mut refused = Vec::new();
    loop {
        let (idle, confirm, switching) = {
            let mut out = shared.out();
            // (The last write is done.)
            out.in_write = 0;
            let switching = out.switch.take();
            let idle = out.is_empty();
            let mut confirm = false;
            if !idle {
                std::mem::swap(&mut out.buf, &mut spare);
                std::mem::swap(&mut out.later, &mut later);
                std::mem::swap(&mut out.waiting, &mut waiting);
                out.later_bytes = 0;
                let events = std::mem::take(&mut out.events);
                out.in_write = events - waiting.len();
                tags.clear();
                // Publishers wait for some of these events: a PING after them, whose PONG says
                // the server read them. Its place among the PONGs is taken now, under the lock,
                // after every PING already in this buffer and before any appended later.
                if !waiting.is_empty() {
                    tags.extend(waiting.iter().map(|w: &Waiting| w.later));
                    let confirms = waiting.drain(..).map(|w| w.confirm).collect();
                    out.pongs.push_back(Pong::Written(confirms));
                    confirm = true;
                }
            }
            // Leaving this server: this write's PINGs are the last it gets; the PONG of the
            // last says it read everything and sent every message it will (entries pushed
            // later are the next server's).
            let switching = match switching {
                Some(told) => {
                    out.pongs.push_back(Pong::Switch(told));
                    true
                }
                None => false,
            };
            (idle, confirm, switching)
        };
        if idle && !switching {
            shared.wake_writer.notified().await;
            continue;
        }
        shared.room.notify_waiters();
        let bytes = if later.is_empty() {
            if confirm {
                spare.extend_from_slice(b"PING\r\n");
            }
            if switching {
                write_leaving(shared, &mut spare);
            }
            &spare
        } else {
            join_later(
                shared,
                &spare,
                &mut later,
                &mut frame,
                &mut joined,
                &mut refused,
            );
            if !refused.is_empty() {
                refuse(shared, &tags, &mut refused);
            }
            if confirm {
                joined.extend_from_slice(b"PING\r\n");
            }
            if switching {
                write_leaving(shared, &mut joined);
            }
            &joined
        };
        shared.writing.store(true, Ordering::Release);
        let result = write_all(&mut w, bytes).await;
        shared.writing.store(false, Ordering::Release);
        if let Err(e) = result {
            // Some of it may have reached the server, none of it is known to have: its events
            // are counted as discarded by `disconnected` (`Out::in_write`, and `pongs` for those
            // whose publishers wait), which also tells those publishers.
            return Disconnect::Write(e);
        }
        for buf in [&mut spare, &mut joined] {
            buf.clear();
            if buf.capacity() > 4 * MAX_PENDING {
                *buf = Vec::with_capacity(64 << 10);
            }
        }
        if switching {
            // Nothing more goes to this server; the reader waits for the last PONG.
            return std::future::pending().await;
        }
    }
}

/// Writes `bytes` and flushes; an error when the server takes no byte for
/// [`WRITE_STALL_TIMEOUT`] (a stopped or wedged server whose kernel still holds the
/// connection open: without this, publishers waiting for their events to be confirmed would
/// wait for as long, and the keep-alive is skipped while a write is under way).
async fn write_all(w: &mut tokio::io::WriteHalf<Box<dyn Io>>, bytes: &[u8]) -> std::io::Result<()> {
    let stalled = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the server took no byte for {} s",
                WRITE_STALL_TIMEOUT.as_secs()
            ),
        )
    };
    let mut at = 0;
    while at < bytes.len() {
        // (The timer is armed only when the write has to wait.)
        match tokio::time::timeout(WRITE_STALL_TIMEOUT, w.write(&bytes[at..])).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => at += n,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(stalled()),
        }
    }
    tokio::time::timeout(WRITE_STALL_TIMEOUT, w.flush())
        .await
        .map_err(|_| stalled())?
}

/// Tells the publishers waiting for the events the encoder refused (`refused`: their indices
/// in the write's `later`, with why) that nothing of them was sent; those without one are no
/// longer in the write (`Out::in_write`).
fn refuse(shared: &Shared, tags: &[Option<usize>], refused: &mut Vec<(usize, HeaderError)>) {
    let mut guard = shared.out();
    let out = &mut *guard;
    // This write's entry: the last `Written` one (its PING is not written yet, so no PONG
    // took it; entries after it are keep-alives and flushes).
    let mut confirms = out.pongs.iter_mut().rev().find_map(|p| match p {
        Pong::Written(c) => Some(c),
        Pong::KeepAlive | Pong::Flush(_) | Pong::Switch(_) => None,
    });
    // Last first: removing a publisher leaves the positions of those before it as they were.
    for (index, error) in refused.drain(..).rev() {
        match tags.iter().rposition(|t| *t == Some(index)) {
            Some(position) => {
                if let Some(c) = confirms.as_mut()
                    && position < c.len()
                {
                    let _ = c
                        .remove(position)
                        .send(Err(ClientError::Unrepresentable(error)));
                }
            }
            None => out.in_write = out.in_write.saturating_sub(1),
        }
    }
}

/// Puts `bytes` and the events queued among them together in `joined`, encoding each event
/// where it was queued; those the encoder refuses are skipped and listed in `refused` (their
/// index in `later`, with why).
fn join_later(
    shared: &Shared,
    bytes: &[u8],
    later: &mut Vec<(usize, Arc<Envelope>)>,
    frame: &mut Frame,
    joined: &mut Vec<u8>,
    refused: &mut Vec<(usize, HeaderError)>,
) {
    let Some(encoder) = shared.options.later.as_ref() else {
        // Nothing is queued without an encoder (`publish_later` checks).
        later.clear();
        joined.extend_from_slice(bytes);
        return;
    };
    let mut at = 0;
    for (index, (offset, envelope)) in later.drain(..).enumerate() {
        joined.extend_from_slice(&bytes[at..offset]);
        at = offset;
        frame.clear();
        // An event that cannot be represented is skipped (the encoder counted it): a
        // malformed message would end the connection every client shares, or be misread.
        match encoder.encode(&envelope, frame) {
            Ok(()) => write_pub(joined, &frame.subject, None, &frame.headers, &frame.payload),
            Err(e) => refused.push((index, e)),
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
    url: &str,
) -> Disconnect {
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
                Ok(Some(op)) => handle(shared, op, url),
                Ok(None) => break,
                Err(e) => return Disconnect::Protocol(e),
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        match r.read_buf(&mut buf).await {
            Ok(0) => return Disconnect::ServerClosed,
            Ok(_) => {}
            Err(e) => return Disconnect::Read(e),
        }
    }
}

/// The largest message accepted from the server: its `max_payload` and some room, times 4/3:
/// a JetStream answer that carries a stored message in base64 (the leader's
/// `STREAM.MSG.GET`, `jetstream/direct.rs`) is that much larger than the message.
fn inbound_limit(shared: &Shared) -> usize {
    let max = shared.max_payload.load(Ordering::Relaxed);
    (max.saturating_add(max / 3) + INBOUND_SLACK).min(MAX_INBOUND_MESSAGE)
}

fn handle(shared: &Shared, op: Op, url: &str) {
    match op {
        Op::Msg { sid, msg } => {
            if !shared.overlap.admit(sid, &msg) {
                return;
            }
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
            if let Err(crate::queue::TrySendError::Full(_)) = tx.try_send(msg, size) {
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
            let pong = shared.out().pongs.pop_front();
            match pong {
                Some(Pong::Flush(waiter)) => {
                    let _ = waiter.send(());
                }
                Some(Pong::Written(confirms)) => {
                    for c in confirms {
                        let _ = c.send(Ok(()));
                    }
                }
                Some(Pong::Switch(told)) => {
                    let _ = told.send(());
                }
                Some(Pong::KeepAlive) | None => {}
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
            let Ok(info) = serde_json::from_str::<Info>(&json) else {
                return;
            };
            if info.max_payload > 0 {
                shared
                    .max_payload
                    .store(info.max_payload, Ordering::Relaxed);
            }
            let added = shared.servers().learn(&info.urls(), url);
            if added > 0 {
                tracing::info!(added, servers = ?shared.servers().urls(), "nats: the cluster announced servers");
            }
            if info.ldm && !shared.lame_duck.swap(true, Ordering::AcqRel) {
                tracing::info!(
                    url,
                    "nats: the server is in lame-duck mode; moving to another"
                );
                shared.lame_duck_told.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::nats::testing::{IdOnly, event, line_of, serving, serving_with};

    #[tokio::test]
    async fn events_encoded_by_the_writer_keep_their_place_among_other_messages() {
        let encoder = Arc::new(IdOnly { bound: 64 });
        let (client, _serving, mut server) = serving_with(64 << 10, Some(encoder)).await;
        client.publish("a", b"", b"1").unwrap();
        client.publish_later(&event("x"), None).unwrap();
        client.publish_later(&event("y"), None).unwrap();
        client.publish("b", b"", b"2").unwrap();
        client.publish_later(&event("z"), None).unwrap();
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

    /// Reads what the client writes until it ends with a `PING`.
    async fn until_ping(server: &mut tokio::io::DuplexStream) -> String {
        let mut seen = Vec::new();
        while !seen.ends_with(b"PING\r\n") {
            let mut chunk = [0u8; 4096];
            let n = server.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the client closed");
            seen.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    }

    /// Issue 19 item 2: a publisher waiting for a confirmation is told at the PONG that answers
    /// the one PING written after its write (one PING for every event of the write), not when
    /// the event was appended or written; an event the writer cannot encode is refused to its
    /// publisher, not confirmed.
    #[tokio::test]
    async fn confirmations_come_with_the_pong_after_the_write() {
        let encoder = Arc::new(IdOnly { bound: 64 });
        let (client, _serving, mut server) = serving_with(64 << 10, Some(encoder)).await;
        let (tx1, mut rx1) = tokio::sync::oneshot::channel();
        let (tx2, mut rx2) = tokio::sync::oneshot::channel();
        let (tx3, mut rx3) = tokio::sync::oneshot::channel();
        // (One write: the writer task runs once this test's task waits.)
        client.publish_later(&event("x"), Some(tx1)).unwrap();
        client.publish_later(&event("y"), None).unwrap();
        client.publish_later(&event("bad"), Some(tx2)).unwrap();
        client.publish_later(&event("z"), Some(tx3)).unwrap();
        let seen = until_ping(&mut server).await;
        assert_eq!(
            seen,
            "PUB ev.t 1\r\nx\r\nPUB ev.t 1\r\ny\r\nPUB ev.t 1\r\nz\r\nPING\r\n"
        );
        // Refused at once, without waiting for the PONG.
        let refused = rx2.try_recv().unwrap();
        assert!(
            matches!(refused, Err(ClientError::Unrepresentable(_))),
            "{refused:?}"
        );
        tokio::task::yield_now().await;
        assert!(rx1.try_recv().is_err(), "confirmed before the PONG");
        assert!(rx3.try_recv().is_err(), "confirmed before the PONG");
        server.write_all(b"PONG\r\n").await.unwrap();
        assert_eq!(rx1.await.unwrap(), Ok(()));
        assert_eq!(rx3.await.unwrap(), Ok(()));
        assert_eq!(client.shared.options.discarded.get(), 0);
    }

    /// Issue 19 item 2: when the connection ends, the events written and not confirmed and those
    /// not written are counted as discarded, and their publishers are told (no one waits on).
    #[tokio::test]
    async fn unconfirmed_events_are_counted_and_their_publishers_told_on_a_disconnect() {
        let encoder = Arc::new(IdOnly { bound: 64 });
        let (client, serving, mut server) = serving_with(64 << 10, Some(encoder)).await;
        let (tx1, rx1) = tokio::sync::oneshot::channel();
        client.publish_later(&event("x"), Some(tx1)).unwrap();
        until_ping(&mut server).await;
        // Written, PING sent, no PONG: the server goes away.
        drop(server);
        let reason = serving.await.unwrap();
        assert!(
            matches!(reason, Disconnect::ServerClosed | Disconnect::Write(_)),
            "{reason}"
        );
        super::super::connector::disconnected(&client.shared);
        assert!(rx1.await.is_err(), "the publisher is told");
        assert_eq!(client.shared.options.discarded.get(), 1);
        assert!(client.shared.out().pongs.is_empty());
        assert!(
            client.publish_later(&event("y"), None) == Err(ClientError::NotConnected),
            "refused while disconnected"
        );
    }

    /// A server that stops reading (SIGSTOP: its kernel keeps the connection open) does not
    /// keep the publishers waiting for a confirmation forever: the write that makes no progress
    /// for [`WRITE_STALL_TIMEOUT`] ends the connection.
    #[tokio::test(start_paused = true)]
    async fn a_write_the_server_stops_taking_ends_the_connection() {
        let (client, serving, _server) = serving(16 << 10).await;
        let payload = vec![b'x'; 1024];
        for _ in 0..64 {
            client.publish("s", b"", &payload).unwrap();
        }
        let start = tokio::time::Instant::now();
        let reason = tokio::time::timeout(2 * WRITE_STALL_TIMEOUT, serving)
            .await
            .expect("the connection ends")
            .unwrap();
        assert!(
            matches!(&reason, Disconnect::Write(e) if e.kind() == std::io::ErrorKind::TimedOut),
            "{reason}"
        );
        assert!(start.elapsed() >= WRITE_STALL_TIMEOUT);
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
        // The limit: max_payload and a third (base64 answers), and the slack.
        let limit = 1000 + 1000 / 3 + INBOUND_SLACK;
        let big = limit + 1;
        let mut input = format!("MSG s 1 {big}\r\n").into_bytes();
        input.extend(std::iter::repeat_n(b'x', big));
        input.extend_from_slice(b"\r\nMSG s 1 2\r\nok\r\n");
        // The per-subscription byte budget (1 MiB in `unconnected_with`): the first of
        // these fills it, the second is over it and dropped.
        let near = limit;
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
        while client.shared.options.slow_consumer.get() + ((sub.queued_bytes() / near) as u64) < 20
        {
            tokio::task::yield_now().await;
        }
        let queued = sub.queued_bytes();
        assert!(queued <= 1 << 20, "{queued}");
        assert_eq!(queued / near, (1 << 20) / near);
        assert!(client.shared.options.slow_consumer.get() > 0);
        assert!(!serving.is_finished(), "the connection is still served");
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
        assert!(matches!(reason, Disconnect::Unresponsive), "{reason}");
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
}
