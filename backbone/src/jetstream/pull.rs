//! JetStream pull consumers on meshgate's own NATS client ([`crate::nats::client`]): the egress
//! hot path of the `jetstream` backbone.
//!
//! Why not async-nats's `PullConsumer::messages` (still used to create the consumers): every
//! delivery became a `HeaderMap` and went through async-nats's connection task and a channel
//! of its pull stream; in a profile of the bench row MQTT → JetStream → MQTT that was about a
//! fifth of meshgate's CPU. Here deliveries are the client's raw messages (the header block
//! read in place by `crate::nats::wire`), and acknowledgements go out on the same connection.
//!
//! The protocol (JetStream's consumer API): a pull request is a publish to
//! `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` with reply subject `<inbox>` and the body
//! `{"batch":n,"expires":ns,"idle_heartbeat":ns}`. The server sends up to `n` messages to
//! `<inbox>`'s subscription; each keeps the subject it was stored under, and its reply subject
//! (`$JS.ACK.…`) is where its acknowledgement goes. Status messages come with the inbox as their
//! subject, no payload and a status in the header line (`NATS/1.0 408 Request Timeout`):
//! - `100` idle heartbeat: a request is waiting and the consumer has nothing to send;
//! - `408` the request expired, `409` it ended otherwise (consumer deleted, leadership change,
//!   server shutdown): `Nats-Pending-Messages` says how many of its messages will not come;
//!   `404` (no messages, for `no_wait` requests, which we do not send);
//! - `409 Exceeded Max…`: the request was refused as it came (over the consumer's `max_batch`
//!   or `max_expires`, or too many requests waiting), no headers;
//! - `503` no responders: no consumer (or no JetStream) answers that subject.
//!
//! Flow control ([`Window`]): at most [`BATCH`] messages (or the consumer's `max_batch`) are
//! asked for and not yet received; when half have come, the rest is asked for again, so the
//! server always has a request to serve. Requests are sent from `poll_next`, so a subscriber
//! that stops reading stops pulling: what waits in the subscription's queue stays bounded. The
//! window starts over, on a new inbox, when the connection was replaced (requests die with it)
//! and when nothing at all came for [`SILENCE`] (heartbeats stopped: requests lost some other
//! way); the new inbox keeps what requests from before still send out of the new count (the
//! consumer delivers those messages again after `ack_wait`). After a refusal (`409 Exceeded
//! Max…`, a `409` such as "Consumer Deleted", `503`) the next request waits [`RETRY`]; the first
//! refusal after a delivery is logged as a warning.
//!
//! A consumer that is gone (`409 Consumer Deleted`, or `503`: nobody serves its subject) is
//! repaired when the pull was given a [`Repair`] (the backbone gives one to consumers only it
//! uses, and to queue groups' shared ones; not to persistent sessions' durable consumers,
//! which meshgate itself deletes and re-creates when a session moves): looked up and, if it
//! really is gone (deleted by an operator, or removed by its `inactive_threshold` during a long
//! outage), created again from the stream sequence after the last message this pull received
//! (or, before the first, after the last the consumer had delivered when it was opened), so that
//! the subscription neither stops nor skips what was stored meanwhile. A pull with a
//! [`Repair`] also looks its consumer up after every reconnect before it asks again: nats-server
//! restarted without a memory-stored consumer (the instance feed's) answered its pull requests
//! with nothing at all, not `503` (seen in the NATS restart test). Deliveries not yet
//! acknowledged when it went are not delivered again: their consumer is gone. Failed repairs
//! are tried again after 1, 2, 4 … up to 32 s.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use meshgate_core::BoxFuture;
use meshgate_core::backoff::Backoff;
use tokio::time::{Instant, Interval};

use super::consumer::{ConsumerError, Repair};
use crate::nats::client::{Client, ClientError, Msg, SubStream};
use crate::nats::proto::not_a_subject;

/// Messages asked for and not yet received, at most (less when the consumer's `max_batch` is).
pub(crate) const BATCH: usize = 512;
/// How long one pull request waits at the server (less when the consumer's `max_expires` is).
const EXPIRES: Duration = Duration::from_secs(30);
/// How often the server tells a waiting request it is still there (at most a third of expires).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Nothing for this long (not even a heartbeat): the requests are gone, ask again.
const SILENCE: Duration = Duration::from_secs(12);
/// Pause before asking again after the consumer could not serve.
const RETRY: Duration = Duration::from_secs(1);
/// Longest pause between repairs of a gone consumer (they start at [`RETRY`] and double).
const MAX_REPAIR_PAUSE: Duration = Duration::from_secs(32);
/// How often the pull checks for silence and a replaced connection.
const TICK: Duration = Duration::from_secs(1);

/// What one pull request may ask for: [`BATCH`] and [`EXPIRES`] within the consumer's own
/// `max_batch` / `max_expires` (a request over them is refused with `409 Exceeded
/// MaxRequest…`; nats-server's `jetstream.limits` set them on every consumer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub batch: usize,
    pub expires: Duration,
}

impl Limits {
    /// From the consumer's `max_batch` and `max_expires` (0 = no limit).
    pub(crate) fn of(max_batch: i64, max_expires: Duration) -> Limits {
        let batch = usize::try_from(max_batch)
            .ok()
            .filter(|&b| b > 0)
            .map_or(BATCH, |b| b.min(BATCH));
        let expires = if max_expires.is_zero() {
            EXPIRES
        } else {
            max_expires.min(EXPIRES)
        };
        Limits { batch, expires }
    }

    fn heartbeat(&self) -> Duration {
        HEARTBEAT.min(self.expires / 3)
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::of(0, Duration::ZERO)
    }
}

/// The stream sequence of a delivery, from its `$JS.ACK` reply subject:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ms>.<pending>`, or,
/// with a domain and account hash (ADR-15), `$JS.ACK.<domain>.<hash>.<stream>.<consumer>.…`
/// with one more token at the end.
pub(crate) fn stream_sequence(reply: &[u8]) -> Option<u64> {
    sequences(reply).map(|(stream, _)| stream)
}

/// The stream and consumer sequences of a delivery, from its `$JS.ACK` reply subject (see
/// [`stream_sequence`]). The consumer sequence counts deliveries of the consumer: a gap in
/// it means deliveries were lost on the way (the instance feed reads them again).
pub(crate) fn sequences(reply: &[u8]) -> Option<(u64, u64)> {
    // The first 9 tokens are enough; later ones (ADR-15 allows more) are only counted.
    let mut tokens = [&b""[..]; 9];
    let mut n = 0;
    for t in reply.split(|b| *b == b'.') {
        if let Some(slot) = tokens.get_mut(n) {
            *slot = t;
        }
        n += 1;
    }
    if tokens[0] != b"$JS" || tokens[1] != b"ACK" {
        return None;
    }
    let at = match n {
        9 => 5,
        n if n >= 11 => 7,
        _ => return None,
    };
    let number = |t: &[u8]| std::str::from_utf8(t).ok()?.parse::<u64>().ok();
    Some((number(tokens[at])?, number(tokens[at + 1])?))
}

/// What a status message means for the pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Still waiting (`100`).
    Heartbeat,
    /// A request ended with `pending` of its messages not sent (`None`: not said); ask again.
    Ended { pending: Option<usize> },
    /// The last request was refused as it came (`409 Exceeded Max…`: over the consumer's
    /// limits, or too many requests waiting): not counted; ask again after [`RETRY`].
    Rejected,
    /// The consumer cannot serve now (leadership change, server shutdown, …): ask again
    /// after [`RETRY`].
    Refused { pending: Option<usize> },
    /// The consumer is gone (`409 Consumer Deleted`) or nobody serves its subject (`503`: no
    /// such consumer, or JetStream not up yet): repair it, then ask again.
    Gone,
}

/// Reads a status message's header block (`NATS/1.0 <code> <description>\r\n…`): its code,
/// description and meaning; `None` when it is not one.
pub(crate) fn read_status(headers: &[u8]) -> Option<(u16, &str, Status)> {
    let line_end = memchr::memchr(b'\n', headers).unwrap_or(headers.len());
    let line = std::str::from_utf8(&headers[..line_end]).ok()?.trim();
    let rest = line.strip_prefix("NATS/1.0")?.trim_start();
    let (code, description) = rest.split_once(' ').unwrap_or((rest, ""));
    let code: u16 = code.parse().ok()?;
    let description = description.trim();
    let pending = crate::nats::wire::RawHeaderBlock(headers)
        .get("Nats-Pending-Messages")
        .and_then(|v| v.parse().ok());
    let status = match code {
        100 => Status::Heartbeat,
        404 | 408 => Status::Ended { pending },
        // nats-server 2.9 refuses a request over max_batch / max_expires, or past max_waiting,
        // at once and without pending headers.
        409 if description.starts_with("Exceeded Max") => Status::Rejected,
        // A request with max_bytes ended on a message larger than that (not sent by us).
        409 if description.starts_with("Message Size Exceeds") => Status::Ended { pending },
        409 if description.starts_with("Consumer Deleted") => Status::Gone,
        503 => Status::Gone,
        _ => Status::Refused { pending },
    };
    Some((code, description, status))
}

/// How many messages are asked for and not yet received.
#[derive(Debug)]
pub(crate) struct Window {
    pending: usize,
    size: usize,
}

impl Window {
    pub(crate) fn new(size: usize) -> Window {
        Window {
            pending: 0,
            size: size.max(1),
        }
    }

    /// How many to ask for now, if any: up to the window's size once half of it has come.
    pub(crate) fn want(&self) -> Option<usize> {
        (self.pending <= self.size / 2).then_some(self.size - self.pending)
    }
    pub(crate) fn asked(&mut self, n: usize) {
        self.pending += n;
    }
    pub(crate) fn received(&mut self) {
        // A message of a request from before a reset: not counted in this window.
        self.pending = self.pending.saturating_sub(1);
    }
    /// A request ended with `pending` of its messages not coming (`None`: unknown, start over).
    pub(crate) fn ended(&mut self, pending: Option<usize>) {
        self.pending = match pending {
            Some(n) => self.pending.saturating_sub(n),
            None => 0,
        };
    }
    pub(crate) fn reset(&mut self) {
        self.pending = 0;
    }
}

/// What a pull last learnt about its consumer, shared with the backbone's listing
/// (`Backbone::subscriptions`): the server serves it (`ok`), refused the last request
/// (`refused`, asked again every second), or it is gone or unknown after a reconnect and being
/// looked up and made again (`repairing`).
#[derive(Debug, Clone, Default)]
pub(crate) struct PullState(Arc<AtomicU8>);

impl PullState {
    const OK: u8 = 0;
    const REFUSED: u8 = 1;
    const REPAIRING: u8 = 2;

    /// As a [`meshgate_core::BackboneSubscription`] state.
    pub(crate) fn get(&self) -> &'static str {
        use meshgate_core::backbone::subscription_state::{OK, REFUSED, REPAIRING};
        match self.0.load(Ordering::Relaxed) {
            Self::REFUSED => REFUSED,
            Self::REPAIRING => REPAIRING,
            _ => OK,
        }
    }
}

/// The deliveries of one pull consumer, as the client's raw messages (subject, `$JS.ACK` reply,
/// header block, payload). Ends when the client is closed; unsubscribes when dropped.
pub(crate) struct Pull {
    client: Client,
    messages: SubStream,
    /// This window's inbox: a new one each time the window starts over, so that messages and
    /// statuses of requests from before are not counted in it (they go to an inbox nobody
    /// reads, and the consumer delivers those messages again after `ack_wait`).
    inbox: String,
    /// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`
    next: String,
    limits: Limits,
    window: Window,
    /// What the last request asked for (undone when it is rejected on arrival).
    last_asked: usize,
    /// The client's connection count when the window was last started.
    connection: u64,
    last_heard: Instant,
    not_before: Instant,
    /// A refusal was logged at warn level and nothing was delivered since.
    warned: bool,
    tick: Interval,
    consumer: String,
    repair: Option<Repair>,
    /// The consumer is gone: repair it before asking again.
    gone: bool,
    repairing: Option<BoxFuture<'static, Result<bool, ConsumerError>>>,
    /// The stream sequence of the last message received (where a repaired consumer goes on).
    last_sequence: Option<u64>,
    /// The pause after a failed repair: longer after each in a row, reset by a repair.
    repair_backoff: Backoff,
    /// What the listing reads, and the value last stored in it (compared on every delivery:
    /// the shared one is written only when it changes).
    state: PullState,
    reported: u8,
}

impl std::fmt::Debug for Pull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pull")
            .field("consumer", &self.consumer)
            .finish()
    }
}

/// A new inbox and its subscription, with room for a whole window and its statuses (the
/// client drops what does not fit; JetStream delivers it again after `ack_wait`).
fn subscribe_inbox(client: &Client, limits: Limits) -> Result<(String, SubStream), ClientError> {
    let inbox = format!("_INBOX.{}", meshgate_core::wrap::new_id());
    let messages = client.subscribe_bounded(&inbox, None, limits.batch + 64)?;
    Ok((inbox, messages))
}

impl Pull {
    /// Subscribes to a new inbox for consumer `consumer` of stream `stream`; the first request
    /// goes out on the first poll.
    pub(crate) fn start(
        client: &Client,
        stream: &str,
        consumer: &str,
        limits: Limits,
    ) -> Result<Pull, ClientError> {
        let next = format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}");
        if not_a_subject(&next) {
            return Err(ClientError::BadSubject(next));
        }
        let (inbox, messages) = subscribe_inbox(client, limits)?;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let now = Instant::now();
        Ok(Pull {
            client: client.clone(),
            messages,
            inbox,
            next,
            limits,
            window: Window::new(limits.batch),
            last_asked: 0,
            connection: client.connections(),
            last_heard: now,
            not_before: now,
            warned: false,
            tick,
            consumer: consumer.to_owned(),
            repair: None,
            gone: false,
            repairing: None,
            last_sequence: None,
            repair_backoff: Backoff::new(RETRY, MAX_REPAIR_PAUSE),
            state: PullState::default(),
            reported: PullState::OK,
        })
    }

    /// Repairs the consumer when it is gone ([`Repair`]); `delivered` is the stream sequence
    /// it had delivered up to when it was opened (from its info), where a repaired one goes
    /// on until this pull has received something.
    pub(crate) fn with_repair(mut self, repair: Repair, delivered: u64) -> Pull {
        self.repair = Some(repair);
        self.last_sequence = Some(delivered);
        self
    }

    /// What the listing reads about this pull.
    pub(crate) fn state(&self) -> PullState {
        self.state.clone()
    }

    fn report(&mut self, state: u8) {
        if self.reported != state {
            self.reported = state;
            self.state.0.store(state, Ordering::Relaxed);
        }
    }

    /// Asks for more when the window has room (and the last refusal is long enough ago).
    fn request(&mut self) {
        let Some(n) = self.window.want() else {
            return;
        };
        if Instant::now() < self.not_before || self.gone {
            return;
        }
        let body = format!(
            "{{\"batch\":{n},\"expires\":{},\"idle_heartbeat\":{}}}",
            self.limits.expires.as_nanos(),
            self.limits.heartbeat().as_nanos()
        );
        match self
            .client
            .publish_with_reply(&self.next, Some(&self.inbox), b"", body.as_bytes())
        {
            Ok(()) => {
                self.window.asked(n);
                self.last_asked = n;
            }
            // Not connected or the write buffer full: the next tick asks again.
            Err(e) => {
                tracing::debug!(consumer = %self.consumer, error = %e, "jetstream: pull request not sent")
            }
        }
    }

    fn on_status(&mut self, headers: Option<&[u8]>) {
        let Some((code, description, status)) = headers.and_then(read_status) else {
            return;
        };
        let refused = |this: &mut Pull| {
            this.not_before = Instant::now() + RETRY;
            if !this.warned {
                this.warned = true;
                tracing::warn!(consumer = %this.consumer, code, description, "jetstream: the consumer refused a pull request; asking again every second");
            }
        };
        match status {
            // A request the consumer took.
            Status::Heartbeat => self.report(PullState::OK),
            Status::Ended { pending } => {
                self.window.ended(pending);
                self.report(PullState::OK);
            }
            Status::Rejected => {
                self.window.ended(Some(self.last_asked));
                refused(self);
                self.report(PullState::REFUSED);
            }
            Status::Refused { pending } => {
                self.window.ended(pending);
                refused(self);
                self.report(PullState::REFUSED);
            }
            Status::Gone => {
                // What the consumer owed will not come; a repaired one starts a new window.
                self.window.reset();
                self.gone = self.repair.is_some();
                refused(self);
                self.report(if self.gone {
                    PullState::REPAIRING
                } else {
                    PullState::REFUSED
                });
            }
        }
    }

    /// Drives the repair of a consumer that is gone; `Pending` while it runs.
    fn poll_repair(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.gone || Instant::now() < self.not_before {
            return Poll::Ready(());
        }
        let Some(repair) = &self.repair else {
            self.gone = false;
            return Poll::Ready(());
        };
        let start = self.last_sequence.map(|s| s + 1);
        let running = self.repairing.get_or_insert_with(|| repair(start));
        let Poll::Ready(done) = running.as_mut().poll(cx) else {
            return Poll::Pending;
        };
        self.repairing = None;
        match done {
            Ok(created) => {
                self.repair_backoff.reset();
                if created {
                    tracing::warn!(consumer = %self.consumer, start_sequence = ?start, "jetstream: the consumer was gone and is created again");
                }
                self.gone = false;
                self.report(PullState::OK);
                self.not_before = Instant::now();
                // Old requests died with the consumer: a new window on a new inbox.
                self.start_over();
            }
            Err(e) => {
                // Every subscription repairs its own consumers: back off, so that a JetStream
                // that is down is not asked by each of them every second.
                let wait = self.repair_backoff.next_pause();
                // The shortest pause: the first failure in a row.
                if wait == RETRY {
                    tracing::warn!(consumer = %self.consumer, error = %e, "jetstream: the consumer is gone and cannot be created again yet; trying again with a growing pause (up to 32 s)");
                } else {
                    tracing::debug!(consumer = %self.consumer, error = %e, ?wait, "jetstream: consumer not repaired yet");
                }
                self.not_before = Instant::now() + wait;
            }
        }
        Poll::Ready(())
    }

    /// On a tick: start over when the connection was replaced or the server went silent.
    fn check(&mut self) {
        let connection = self.client.connections();
        if connection == self.connection && self.last_heard.elapsed() < SILENCE {
            return;
        }
        if connection != self.connection && self.repair.is_some() {
            // A new connection may be to a server that restarted and lost the consumer (one
            // with memory storage, such as the instance feed's): look before asking; the
            // repair starts the window over.
            self.connection = connection;
            self.window.reset();
            self.gone = true;
            self.report(PullState::REPAIRING);
            return;
        }
        self.start_over();
    }

    /// A new window on a new inbox: what requests from before still send goes nowhere.
    fn start_over(&mut self) {
        match subscribe_inbox(&self.client, self.limits) {
            Ok((inbox, messages)) => {
                // The old subscription ends here (UNSUB).
                (self.inbox, self.messages) = (inbox, messages);
                self.connection = self.client.connections();
                self.last_heard = Instant::now();
                self.window.reset();
            }
            // Closed: the old subscription ends too, and with it this stream.
            Err(e) => {
                tracing::debug!(consumer = %self.consumer, error = %e, "jetstream: no new pull inbox")
            }
        }
    }
}

impl Drop for Pull {
    /// Deliveries already in the inbox's queue were never handed out: they are given back at
    /// once (`-NAK`) rather than left to come back after `ack_wait` (a trigger replaced or
    /// deleted, a subscription ended, shutdown). Those still on the wire when the subscription
    /// goes are not seen here, and do wait for `ack_wait`.
    fn drop(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        while let Poll::Ready(Some(m)) = Pin::new(&mut self.messages).poll_next(&mut cx) {
            if m.subject == self.inbox {
                continue;
            }
            if let Some(reply) = m.reply.as_deref().and_then(|r| std::str::from_utf8(r).ok()) {
                // Not waited for: a full write buffer or a closed client loses only the speed-up.
                let _ = self.client.publish_with_reply(reply, None, b"", b"-NAK");
            }
        }
    }
}

impl Stream for Pull {
    type Item = Msg;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Msg>> {
        let this = &mut *self;
        loop {
            if this.client.subscriptions_ended() {
                // The backbone closed: no repair, no request; the inbox's stream yields what it
                // holds, then ends, and so does this one.
                this.repairing = None;
                this.gone = false;
                match Pin::new(&mut this.messages).poll_next(cx) {
                    Poll::Ready(Some(m)) if m.subject == this.inbox => continue,
                    polled => return polled,
                }
            }
            if this.poll_repair(cx).is_pending() {
                // (Its future wakes this task; messages still queued wait for it.)
                return Poll::Pending;
            }
            this.request();
            match Pin::new(&mut this.messages).poll_next(cx) {
                Poll::Ready(Some(m)) => {
                    this.last_heard = Instant::now();
                    if m.subject == this.inbox {
                        this.on_status(m.headers.as_deref());
                        continue;
                    }
                    this.window.received();
                    this.warned = false;
                    this.report(PullState::OK);
                    // Only a pull that repairs needs it. (A redelivery of an older message does
                    // not move it back.)
                    if this.repair.is_some()
                        && let Some(seq) = m.reply.as_deref().and_then(stream_sequence)
                    {
                        this.last_sequence = Some(this.last_sequence.map_or(seq, |l| l.max(seq)));
                    }
                    return Poll::Ready(Some(m));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            match this.tick.poll_tick(cx) {
                Poll::Ready(_) => this.check(),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::{Arc, Mutex};

    use crate::nats::testing::{line_of, serving};
    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;

    #[test]
    fn statuses_are_told_apart() {
        assert_eq!(
            read_status(b"NATS/1.0 100 Idle Heartbeat\r\n\r\n"),
            Some((100, "Idle Heartbeat", Status::Heartbeat))
        );
        assert_eq!(
            read_status(
                b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 7\r\nNats-Pending-Bytes: 0\r\n\r\n"
            ),
            Some((408, "Request Timeout", Status::Ended { pending: Some(7) }))
        );
        assert_eq!(
            read_status(b"NATS/1.0 409 Exceeded MaxWaiting\r\n\r\n"),
            Some((409, "Exceeded MaxWaiting", Status::Rejected))
        );
        assert_eq!(
            read_status(b"NATS/1.0 409 Exceeded MaxRequestBatch of 100\r\n\r\n"),
            Some((409, "Exceeded MaxRequestBatch of 100", Status::Rejected))
        );
        assert_eq!(
            read_status(b"NATS/1.0 409 Consumer Deleted\r\n\r\n"),
            Some((409, "Consumer Deleted", Status::Gone))
        );
        assert_eq!(
            read_status(b"NATS/1.0 503\r\n\r\n"),
            Some((503, "", Status::Gone))
        );
        assert_eq!(
            read_status(b"NATS/1.0 409 Leadership Change\r\n\r\n"),
            Some((409, "Leadership Change", Status::Refused { pending: None }))
        );
        assert_eq!(read_status(b"NATS/1.0\r\nA: b\r\n\r\n"), None);
        assert_eq!(read_status(b"HTTP/1.1 200 OK\r\n\r\n"), None);
    }

    #[test]
    fn the_stream_sequence_is_read_from_the_ack_subject() {
        assert_eq!(
            stream_sequence(b"$JS.ACK.S.C.1.41.7.1700000000.3"),
            Some(41)
        );
        assert_eq!(
            stream_sequence(b"$JS.ACK.dom.ACCHASH.S.C.2.42.8.1700000000.3.tok"),
            Some(42)
        );
        assert_eq!(
            stream_sequence(b"$JS.ACK.dom.ACCHASH.S.C.2.43.8.1700000000.3"),
            Some(43)
        );
        // Tokens added after those (ADR-15 says to expect them).
        assert_eq!(
            stream_sequence(b"$JS.ACK.dom.ACCHASH.S.C.2.44.8.1700000000.3.tok.more.more"),
            Some(44)
        );
        assert_eq!(sequences(b"$JS.ACK.S.C.1.41.7.1700000000.3"), Some((41, 7)));
        assert_eq!(
            sequences(b"$JS.ACK.dom.ACCHASH.S.C.2.42.8.1700000000.3.tok"),
            Some((42, 8))
        );
        for bad in [
            &b"$JS.ACK.S.C.1.x.7.1.3"[..],
            b"$JS.ACK.S.C.1.41",
            b"_INBOX.a.b.c.d.e.f.g.h",
            b"",
            b"$JS.ACK.a.b.c.d.e.f.g.h.i.j.k.l.m",
        ] {
            assert_eq!(
                stream_sequence(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn requests_stay_within_the_consumers_limits() {
        assert_eq!(
            Limits::default(),
            Limits {
                batch: BATCH,
                expires: EXPIRES
            }
        );
        let l = Limits::of(100, Duration::from_secs(3));
        assert_eq!(
            l,
            Limits {
                batch: 100,
                expires: Duration::from_secs(3)
            }
        );
        assert_eq!(l.heartbeat(), Duration::from_secs(1));
        assert_eq!(
            Limits::of(10_000, Duration::from_secs(600)),
            Limits::default()
        );
        assert_eq!(Limits::of(-1, Duration::ZERO), Limits::default());
    }

    #[test]
    fn the_window_asks_again_at_half_and_starts_over_when_told() {
        let mut w = Window::new(BATCH);
        assert_eq!(w.want(), Some(BATCH));
        w.asked(BATCH);
        assert_eq!(w.want(), None, "a full window asks for nothing");
        for _ in 0..BATCH / 2 - 1 {
            w.received();
        }
        assert_eq!(w.want(), None);
        w.received();
        assert_eq!(
            w.want(),
            Some(BATCH / 2),
            "half came: ask for that half again"
        );
        w.asked(BATCH / 2);
        // The first request expired with 10 of its messages not sent.
        w.ended(Some(10));
        assert_eq!(w.want(), None);
        w.ended(None);
        assert_eq!(w.want(), Some(BATCH), "unknown: start over");
        w.received();
        assert_eq!(
            w.want(),
            Some(BATCH),
            "a message of an old request is not counted"
        );
        w.asked(BATCH);
        w.reset();
        assert_eq!(w.want(), Some(BATCH));
    }

    /// Fuzz target `jetstream_status`: any reply subject or status header block is read
    /// without a panic; well-formed ack subjects give their stream sequence back.
    #[test]
    fn fuzz_jetstream_status() {
        use meshgate_fuzz::proptest::prelude::*;
        let seeds: [&[u8]; 4] = [
            b"$JS.ACK.S.C.1.42.7.1700000000000000000.3",
            b"$JS.ACK.dom.hash.S.C.1.42.7.1700000000000000000.3.rand",
            b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 5\r\nNats-Pending-Bytes: 0\r\n\r\n",
            b"NATS/1.0 409 Consumer Deleted\r\n\r\n",
        ];
        let inputs = prop_oneof![
            meshgate_fuzz::bytes("jetstream_status", &seeds, 256).prop_map(|b| (
                b,
                0u64,
                String::new()
            )),
            (any::<u64>(), "[A-Za-z0-9_-]{1,12}").prop_map(|(seq, name)| (Vec::new(), seq, name)),
        ];
        meshgate_fuzz::run(
            "jetstream_status",
            inputs,
            |b| Some((b.to_vec(), 0, String::new())),
            |(bytes, seq, name)| {
                let _ = stream_sequence(&bytes);
                let _ = read_status(&bytes);
                if !name.is_empty() {
                    let plain = format!("$JS.ACK.{name}.{name}.1.{seq}.9.1700000000.0");
                    let domain = format!("$JS.ACK.d.h.{name}.{name}.1.{seq}.9.1700000000.0.r");
                    for subject in [plain, domain] {
                        if stream_sequence(subject.as_bytes()) != Some(seq) {
                            return Err(format!("{subject}: not {seq}"));
                        }
                    }
                }
                Ok(())
            },
        );
    }

    /// Polls `pull` on a task of its own; what it yields, in order.
    fn forward(mut pull: Pull) -> mpsc::UnboundedReceiver<Msg> {
        use futures_util::StreamExt;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = pull.next().await {
                let _ = tx.send(m);
            }
        });
        rx
    }

    /// Deliveries that reached the inbox but were never taken are given back (`-NAK`) when the
    /// pull is dropped, instead of waiting out `ack_wait`.
    #[tokio::test]
    async fn a_dropped_pull_gives_back_what_it_held() {
        use futures_util::StreamExt;
        let (client, _serving, server) = serving(64 << 10).await;
        let mut pull = Pull::start(&client, "S", "C", Default::default()).unwrap();
        // One poll: it subscribes and asks.
        let _ = tokio::time::timeout(Duration::from_millis(50), pull.next()).await;
        let (mut r, mut w) = tokio::io::split(server);
        let mut seen = Vec::new();
        let sub = line_of(&mut r, &mut seen, "SUB ").await;
        let inbox = sub.split(' ').nth(1).unwrap().to_owned();
        line_of(&mut r, &mut seen, "PUB $JS.API.CONSUMER.MSG.NEXT").await;
        let mut send = String::new();
        for n in 1..=3 {
            send.push_str(&format!("MSG p.x 1 $JS.ACK.S.C.1.{n}.{n}.0.0 2\r\nhi\r\n"));
        }
        w.write_all(send.as_bytes()).await.unwrap();
        // Queued in the inbox, never polled out.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(pull);
        let naks = async {
            for n in 1..=3 {
                let line = line_of(&mut r, &mut seen, "PUB $JS.ACK").await;
                assert!(
                    line.starts_with(&format!("PUB $JS.ACK.S.C.1.{n}.{n}.0.0 4")),
                    "{line} ({inbox})"
                );
                assert_eq!(line_of(&mut r, &mut seen, "-NAK").await, "-NAK");
            }
        };
        tokio::time::timeout(Duration::from_secs(5), naks)
            .await
            .expect("the three deliveries given back within 5 s");
    }

    #[tokio::test]
    async fn a_jetstream_pull_asks_again_at_half_and_after_a_request_ended() {
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
        let state = pull.state();
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
        // Listed as repairing meanwhile.
        let d = std::time::Instant::now();
        while state.get() != "repairing" {
            assert!(d.elapsed() < Duration::from_secs(5), "{}", state.get());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // After a pause: repaired from sequence 43, and pulled again on a new inbox.
        let second = line_of(&mut r, &mut seen, "SUB ").await;
        assert_eq!(state.get(), "ok");
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
}
