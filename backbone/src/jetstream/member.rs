//! One subscription of the instance feed ([`super::feed`], decision 0080): what it was handed,
//! its queue, and how it catches up by itself when it fell behind.
//!
//! `next` is the first stream sequence the member has not been handed. *Live*, the feed pushes
//! every matching message with a sequence at or past `next` into the member's queue (bounded
//! in messages and bytes). When the queue is full the member goes *behind*: the feed no longer
//! pushes to it, and its stream, when its reader has taken what was queued, reads the stream
//! from `next` on with direct gets ([`super::direct`]), one message per round trip, at the
//! reader's pace. When nothing is left (every subject of the filter answers 404) and the feed
//! did not pass over a message of the member meanwhile (`missed`), the member is live again.
//! So a slow subscriber costs only itself and loses nothing the stream keeps.
//!
//! For a durable subscription the member also keeps the sequences handed out and not yet
//! acknowledged: its *floor* (everything up to it acknowledged) is the cursor that
//! [`super::cursors`] stores, and where a resumed session starts reading. A nack, or a
//! delivery dropped unsettled, leaves the floor where it is (the message comes again when the
//! session resumes).

use std::collections::{BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use futures_util::task::AtomicWaker;
use meshgate_core::backbone::Acknowledge;
use meshgate_core::backoff::Backoff;
use meshgate_core::metrics::Counter;
use meshgate_core::{BackboneError, BoxFuture, Delivery, Envelope, TopicFilter};

use super::direct::{DirectError, DirectGet, Stored};

/// Unacknowledged sequences a durable member keeps, at most, per message its queue holds:
/// past it the oldest is forgotten (the floor passes it; counted), so a client that never
/// acknowledges cannot grow the set without bound.
const OUTSTANDING_PER_QUEUED: usize = 2;

#[derive(Debug)]
struct State {
    next: u64,
    queue: VecDeque<(u64, Arc<Envelope>, usize)>,
    bytes: usize,
    behind: bool,
    /// While behind: the feed passed over a message of this member since the replay's last
    /// request began (or lost messages): the replay must ask again before going live.
    missed: bool,
    outstanding: BTreeSet<u64>,
    /// The feed ended (backbone closed): the stream ends once the queue is empty.
    ended: bool,
}

/// The shared part of one subscription: the feed pushes, the stream takes.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) id: u64,
    pub(crate) filter: TopicFilter,
    /// The filter's NATS subjects (replay asks each).
    subjects: Vec<String>,
    /// A durable subscription: deliveries carry an acknowledgement that moves the floor.
    durable: bool,
    capacity: usize,
    max_bytes: usize,
    state: Mutex<State>,
    waker: AtomicWaker,
    /// Unacknowledged sequences forgotten past the bound.
    forgotten: Counter,
}

/// Where a member starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// With the feed, from this sequence on (a new subscription).
    Live(u64),
    /// By reading the stream from this sequence on (a resumed durable subscription).
    Behind(u64),
}

/// What the feed learns when it offers a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    /// The member takes it (decode and push).
    Wanted,
    /// Not for this member (handed before, or the member is behind).
    Skip,
}

impl Member {
    /// A member; `(capacity, max_bytes)` bound its queue.
    pub(crate) fn new(
        id: u64,
        filter: TopicFilter,
        subjects: Vec<String>,
        durable: bool,
        start: Start,
        (capacity, max_bytes): (usize, usize),
        forgotten: Counter,
    ) -> Member {
        let (next, behind) = match start {
            Start::Live(next) => (next, false),
            Start::Behind(next) => (next, true),
        };
        Member {
            id,
            filter,
            subjects,
            durable,
            capacity: capacity.max(1),
            max_bytes: max_bytes.max(1),
            state: Mutex::new(State {
                next: next.max(1),
                queue: VecDeque::new(),
                bytes: 0,
                behind,
                missed: behind,
                outstanding: BTreeSet::new(),
                ended: false,
            }),
            waker: AtomicWaker::new(),
            forgotten,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Plain data updates only: usable after a panic elsewhere.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn full(&self, s: &State, size: usize) -> bool {
        s.queue.len() >= self.capacity || (s.bytes + size > self.max_bytes && !s.queue.is_empty())
    }

    /// Whether the member takes message `seq` of about `size` bytes (before it is decoded).
    /// A member that is behind, or whose queue is full (it goes behind), notes that it missed
    /// the message and reads it from the stream later.
    pub(crate) fn offer(&self, seq: u64, size: usize) -> Offer {
        let mut s = self.state();
        if seq < s.next {
            return Offer::Skip;
        }
        if s.behind || self.full(&s, size) {
            self.fall_behind(&mut s);
            return Offer::Skip;
        }
        Offer::Wanted
    }

    /// Hands message `seq` to the member (after [`Member::offer`] said it is wanted; the state
    /// is checked again).
    pub(crate) fn push(&self, seq: u64, envelope: &Arc<Envelope>, size: usize) {
        let mut s = self.state();
        if seq < s.next {
            return;
        }
        if s.behind || self.full(&s, size) {
            self.fall_behind(&mut s);
            return;
        }
        s.queue.push_back((seq, envelope.clone(), size));
        s.bytes += size;
        s.next = seq + 1;
        if self.durable {
            self.track(&mut s, seq);
        }
        drop(s);
        self.waker.wake();
    }

    fn fall_behind(&self, s: &mut State) {
        s.missed = true;
        if !s.behind {
            s.behind = true;
            self.waker.wake();
        }
    }

    /// Events queued, the queue's capacity, and whether the member is behind (for the
    /// backbone's listing).
    pub(crate) fn snapshot(&self) -> (usize, usize, bool) {
        let s = self.state();
        (s.queue.len(), self.capacity, s.behind)
    }

    /// The feed may have lost messages (a gap in its consumer sequence): read the stream.
    pub(crate) fn lost(&self) {
        let mut s = self.state();
        self.fall_behind(&mut s);
    }

    /// The feed ended: the stream ends after what is queued.
    pub(crate) fn end(&self) {
        self.state().ended = true;
        self.waker.wake();
    }

    fn track(&self, s: &mut State, seq: u64) {
        s.outstanding.insert(seq);
        let bound = self
            .capacity
            .saturating_mul(OUTSTANDING_PER_QUEUED)
            .max(1024);
        while s.outstanding.len() > bound {
            s.outstanding.pop_first();
            self.forgotten.inc();
        }
    }

    /// Everything up to this sequence was acknowledged (or never this member's).
    pub(crate) fn floor(&self) -> u64 {
        let s = self.state();
        s.outstanding.first().map_or(s.next - 1, |&first| first - 1)
    }

    fn settled(&self, seq: u64) {
        self.state().outstanding.remove(&seq);
    }

    fn delivery(self: &Arc<Self>, seq: u64, envelope: Arc<Envelope>) -> Delivery {
        let acker = self.durable.then(|| {
            Box::new(MemberAck {
                member: self.clone(),
                seq,
            }) as Box<dyn Acknowledge>
        });
        Delivery::new(envelope, acker)
    }
}

/// A durable member's delivery: its acknowledgement moves the floor.
#[derive(Debug)]
struct MemberAck {
    member: Arc<Member>,
    seq: u64,
}

impl Acknowledge for MemberAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BackboneError>> {
        self.member.settled(self.seq);
        Box::pin(std::future::ready(Ok(())))
    }

    fn nack(
        self: Box<Self>,
        _delay: Option<Duration>,
    ) -> BoxFuture<'static, Result<(), BackboneError>> {
        // Stays outstanding: delivered again when the session resumes.
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Turns a stored message into an event (`None`: malformed, counted).
pub(crate) type DecodeStored = Arc<dyn Fn(Stored) -> Option<Envelope> + Send + Sync>;

/// What a member's stream does when it is dropped (leave the feed, write the cursor).
pub(crate) type OnDrop = Box<dyn FnOnce(&Arc<Member>) + Send>;

/// One answer of the replay: the first message at or after `from` on any of the subjects.
enum Step {
    Found { from: u64, stored: Stored },
    Nothing { from: u64 },
    Failed(DirectError),
}

/// The subscription's stream of deliveries.
pub(crate) struct MemberStream {
    member: Arc<Member>,
    direct: Arc<DirectGet>,
    decode: DecodeStored,
    replay: Option<BoxFuture<'static, Step>>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    backoff: Backoff,
    /// Runs when the stream is dropped (leave the feed, write the cursor).
    on_drop: Option<OnDrop>,
}

impl std::fmt::Debug for MemberStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberStream")
            .field("member", &self.member.id)
            .finish()
    }
}

impl MemberStream {
    pub(crate) fn new(
        member: Arc<Member>,
        direct: Arc<DirectGet>,
        decode: DecodeStored,
        on_drop: OnDrop,
    ) -> MemberStream {
        MemberStream {
            member,
            direct,
            decode,
            replay: None,
            pause: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            on_drop: Some(on_drop),
        }
    }

    /// Asks every subject of the filter for its first message at or after `from`.
    ///
    /// With several subjects the answers are not one snapshot: a subject that answered 404
    /// may get a message stored after that answer and before another subject's message S
    /// (seen in review: `p.a` 404, then 103 on `p.a` and 105 on `p.a.>` stored, `p.a.>`
    /// answers 105; 103 would be skipped). So a message found with several subjects is
    /// confirmed by asking every subject again: everything below S was stored before S, so
    /// the second answers are exact.
    fn ask(&self, from: u64) -> BoxFuture<'static, Step> {
        let direct = self.direct.clone();
        let subjects = self.member.subjects.clone();
        Box::pin(async move {
            let lowest = |answers: Vec<Result<Option<Stored>, DirectError>>| {
                let mut first: Option<Stored> = None;
                for a in answers {
                    match a {
                        Ok(Some(s)) if first.as_ref().is_none_or(|f| s.seq < f.seq) => {
                            first = Some(s)
                        }
                        Ok(_) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(first)
            };
            let ask_all = || {
                futures_util::future::join_all(
                    subjects
                        .iter()
                        .map(|s| direct.next_by_subject(from, s.as_str())),
                )
            };
            let first = match lowest(ask_all().await) {
                Ok(first) => first,
                Err(e) => return Step::Failed(e),
            };
            let Some(found) = first else {
                return Step::Nothing { from };
            };
            if subjects.len() == 1 {
                return Step::Found {
                    from,
                    stored: found,
                };
            }
            match lowest(ask_all().await) {
                Ok(Some(lower)) if lower.seq < found.seq => Step::Found {
                    from,
                    stored: lower,
                },
                Ok(_) => Step::Found {
                    from,
                    stored: found,
                },
                Err(e) => Step::Failed(e),
            }
        })
    }
}

impl Stream for MemberStream {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let this = &mut *self;
        loop {
            if let Some(pause) = this.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.pause = None;
            }
            if this.replay.is_none() {
                this.member.waker.register(cx.waker());
                let mut s = this.member.state();
                if let Some((seq, envelope, size)) = s.queue.pop_front() {
                    s.bytes -= size;
                    drop(s);
                    return Poll::Ready(Some(this.member.delivery(seq, envelope)));
                }
                if s.ended {
                    return Poll::Ready(None);
                }
                if !s.behind {
                    return Poll::Pending;
                }
                // Behind and nothing queued: read from the stream.
                s.missed = false;
                let from = s.next;
                drop(s);
                this.replay = Some(this.ask(from));
            }
            let Some(replay) = this.replay.as_mut() else {
                continue;
            };
            let step = match replay.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(step) => step,
            };
            this.replay = None;
            match step {
                Step::Failed(e) => {
                    let pause = this.backoff.next_pause();
                    tracing::debug!(error = %e, ?pause, "jetstream: a subscription could not read what it missed; asking again");
                    this.pause = Some(Box::pin(tokio::time::sleep(pause)));
                }
                Step::Nothing { from } => {
                    this.backoff.reset();
                    let mut s = this.member.state();
                    if !s.missed && s.next == from {
                        s.behind = false;
                    }
                }
                Step::Found { from, stored } => {
                    this.backoff.reset();
                    let seq = stored.seq;
                    {
                        let mut s = this.member.state();
                        if s.next != from || seq < from {
                            // (Not expected: only the replay moves `next` while behind.)
                            continue;
                        }
                        s.next = seq + 1;
                        // Tracked with the move of `next`, under one lock: the floor is never
                        // above it while it is decoded (a cursor flushed then would skip it).
                        if this.member.durable {
                            this.member.track(&mut s, seq);
                        }
                    }
                    // NATS wildcards match `$` topics, MQTT's do not.
                    let envelope =
                        (this.decode)(stored).filter(|e| this.member.filter.matches(&e.topic));
                    let Some(envelope) = envelope else {
                        this.member.settled(seq);
                        continue;
                    };
                    return Poll::Ready(Some(this.member.delivery(seq, Arc::new(envelope))));
                }
            }
        }
    }
}

impl Drop for MemberStream {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f(&self.member);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use meshgate_core::{Event, Origin, Topic};

    fn member(durable: bool, capacity: usize) -> Member {
        Member::new(
            1,
            TopicFilter::parse("a/#").unwrap(),
            vec!["p.a".into(), "p.a.>".into()],
            durable,
            Start::Live(10),
            (capacity, 1 << 20),
            Counter::default(),
        )
    }

    fn envelope() -> Arc<Envelope> {
        Arc::new(Envelope::new(
            Topic::from_mqtt("a/b").unwrap(),
            Arc::new(Event::new("1", "/s", "t").unwrap()),
            Origin {
                instance: Arc::from("other"),
                connection: 1,
            },
        ))
    }

    #[test]
    fn the_feed_hands_each_sequence_once_and_a_full_queue_falls_behind() {
        let m = member(false, 2);
        assert_eq!(m.offer(9, 10), Offer::Skip, "before next");
        assert_eq!(m.offer(10, 10), Offer::Wanted);
        m.push(10, &envelope(), 10);
        assert_eq!(m.offer(10, 10), Offer::Skip, "handed already");
        m.push(11, &envelope(), 10);
        // Full: behind, and the message is missed (read from the stream later).
        assert_eq!(m.offer(12, 10), Offer::Skip);
        let s = m.state();
        assert!(s.behind && s.missed);
        assert_eq!(s.next, 12);
        assert_eq!(s.queue.len(), 2);
    }

    #[test]
    fn the_floor_is_below_the_first_unacknowledged() {
        let m = Arc::new(member(true, 8));
        assert_eq!(m.floor(), 9);
        for seq in [10, 12, 15] {
            m.push(seq, &envelope(), 10);
        }
        assert_eq!(m.floor(), 9);
        m.settled(10);
        assert_eq!(m.floor(), 11);
        m.settled(15);
        assert_eq!(m.floor(), 11);
        m.settled(12);
        assert_eq!(m.floor(), 15);
    }

    #[test]
    fn unacknowledged_sequences_are_bounded_and_counted() {
        let forgotten = Counter::default();
        let m = Member::new(
            1,
            TopicFilter::parse("a").unwrap(),
            vec!["p.a".into()],
            true,
            Start::Live(1),
            (1, 1 << 20),
            forgotten.clone(),
        );
        let mut s = m.state();
        for seq in 1..=2000 {
            m.track(&mut s, seq);
        }
        assert_eq!(s.outstanding.len(), 1024);
        assert_eq!(forgotten.get(), 2000 - 1024);
    }
}
