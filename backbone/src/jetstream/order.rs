//! Keeps one publishing connection's JetStream publishes in order while some of them are asked
//! again after "no responders".
//!
//! On a cluster, a stream answers "no responders" for a moment while it has no leader (its node
//! died or went lame duck and leadership moves; 4–9 s on nats-server 2.9 after a kill, well
//! under a second for a lame-duck move). A publish held and asked again beats one refused, but
//! publishes are pipelined: when one is refused, those written after it are already on their
//! way, and asking it again naively would store it after them. So:
//!
//! - every publish takes a ticket in call order, and is written only when every publish with a
//!   lower ticket has been written and no publish is waiting to be asked again; while all is
//!   well this holds at once (the write buffer is appended to in call order anyway);
//! - a publish answered "no responders" waits until it is the oldest publish not yet settled
//!   (everything before it stored, refused or given up) and every publish written after it has
//!   had its answer (a "no responders" comes at once, a PubAck only after the stream stored
//!   it: a newer publish still waiting may be stored yet), then is written again, alone: later
//!   ones wait behind it, so the retries go out in ticket order, one at a time, and pipelining
//!   resumes when the last of them is settled;
//! - if a publish written after it was stored meanwhile (the leader came back between the two),
//!   asking it again cannot keep the order: it is refused, as before, and the client's retry
//!   comes after.
//!
//! Waking is targeted: only the oldest unsettled publish and the next one to write can have
//! their turn come, so a settle wakes at most those two (no thundering herd behind a long
//! election).

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// The order of one publishing connection's publishes.
#[derive(Debug, Default)]
pub(crate) struct PublishOrder {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The ticket of `entries[0]`, the oldest publish not settled.
    base: u64,
    /// From `base` on, in ticket order; a settled entry stays until those before it are gone.
    entries: VecDeque<Entry>,
    /// Every ticket below this has been written (or given up before it was).
    written_below: u64,
    /// Publishes answered "no responders" and waiting to be asked again.
    retrying: usize,
    /// The highest ticket the stream stored.
    stored_max: Option<u64>,
    /// The latest answer on this connection was "no responders": the stream has no leader
    /// yet, so the next retry waits a little first.
    leaderless: bool,
}

#[derive(Debug, Default)]
struct Entry {
    settled: bool,
    /// Answered "no responders" (waiting to be asked again).
    refused: bool,
    /// The task waiting for this publish's turn (to be written, or to be asked again).
    waker: Option<Waker>,
}

impl State {
    fn entry(&mut self, ticket: u64) -> Option<&mut Entry> {
        let i = usize::try_from(ticket.checked_sub(self.base)?).ok()?;
        self.entries.get_mut(i)
    }

    /// Moves `written_below` past publishes given up before they were written.
    fn skip_settled(&mut self) {
        while self.entry(self.written_below).is_some_and(|e| e.settled) {
            self.written_below += 1;
        }
    }

    /// Every publish written after `ticket` has had its answer: settled, or refused and
    /// waiting behind it.
    fn newer_answered(&self, ticket: u64) -> bool {
        let from = usize::try_from(ticket.saturating_sub(self.base) + 1).unwrap_or(usize::MAX);
        let to = usize::try_from(self.written_below.saturating_sub(self.base)).unwrap_or(0);
        self.entries
            .range(from.min(to)..to.min(self.entries.len()))
            .all(|e| e.settled || e.refused)
    }

    fn take_waker(&mut self, ticket: u64) -> Option<Waker> {
        self.entry(ticket).and_then(|e| e.waker.take())
    }
}

/// What a publish waiting to be asked again finds when its turn comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryTurn {
    /// A publish written after this one was stored: asking again would break the order.
    pub later_stored: bool,
    /// The latest answer was "no responders" too: wait before asking.
    pub leaderless: bool,
}

impl PublishOrder {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing under the lock can panic half-way through a change.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new publish's place in line (call order).
    pub(crate) fn enter(&self) -> Ticket<'_> {
        let mut st = self.lock();
        let ticket = st.base + st.entries.len() as u64;
        st.entries.push_back(Entry::default());
        Ticket {
            order: self,
            ticket,
            retrying: false,
        }
    }

    /// Publishes not settled yet (tests).
    #[cfg(test)]
    fn unsettled(&self) -> usize {
        self.lock().entries.iter().filter(|e| !e.settled).count()
    }
}

/// One publish's place in line; leaving it (drop) settles the publish, whatever its outcome.
#[derive(Debug)]
pub(crate) struct Ticket<'a> {
    order: &'a PublishOrder,
    ticket: u64,
    retrying: bool,
}

impl Ticket<'_> {
    /// Ready when this publish may be written: everything before it written, nothing waiting
    /// to be asked again.
    pub(crate) async fn turn_to_write(&self) {
        std::future::poll_fn(|cx| {
            let mut st = self.order.lock();
            if st.retrying == 0 && st.written_below == self.ticket {
                return Poll::Ready(());
            }
            park(&mut st, self.ticket, cx);
            Poll::Pending
        })
        .await
    }

    /// Written to the connection: the next publish's turn.
    pub(crate) fn written(&self) {
        let next = {
            let mut st = self.order.lock();
            st.written_below = st.written_below.max(self.ticket + 1);
            st.skip_settled();
            let next = st.written_below;
            st.take_waker(next)
        };
        if let Some(w) = next {
            w.wake();
        }
    }

    /// The stream stored this publish.
    pub(crate) fn stored(&self) {
        let mut st = self.order.lock();
        st.stored_max = Some(st.stored_max.map_or(self.ticket, |m| m.max(self.ticket)));
        st.leaderless = false;
    }

    /// Answered "no responders": from now on, publishes not yet written wait for this one.
    pub(crate) fn no_responders(&mut self) {
        let oldest = {
            let mut st = self.order.lock();
            st.leaderless = true;
            if !self.retrying {
                self.retrying = true;
                st.retrying += 1;
            }
            if let Some(e) = st.entry(self.ticket) {
                e.refused = true;
            }
            // The oldest may be waiting for this answer.
            let base = st.base;
            if base == self.ticket {
                None
            } else {
                st.take_waker(base)
            }
        };
        if let Some(w) = oldest {
            w.wake();
        }
    }

    /// Ready when this publish is the oldest not settled and every newer one written has had
    /// its answer, so it may be written again.
    pub(crate) async fn turn_to_retry(&self) -> RetryTurn {
        std::future::poll_fn(|cx| {
            let mut st = self.order.lock();
            if st.base == self.ticket && st.newer_answered(self.ticket) {
                return Poll::Ready(RetryTurn {
                    later_stored: st.stored_max.is_some_and(|m| m > self.ticket),
                    leaderless: st.leaderless,
                });
            }
            park(&mut st, self.ticket, cx);
            Poll::Pending
        })
        .await
    }

    /// A publish written after this one has been stored (checked again after a pause).
    pub(crate) fn later_stored(&self) -> bool {
        self.order
            .lock()
            .stored_max
            .is_some_and(|m| m > self.ticket)
    }
}

fn park(st: &mut State, ticket: u64, cx: &mut Context<'_>) {
    if let Some(e) = st.entry(ticket) {
        match &e.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => e.waker = Some(cx.waker().clone()),
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let (oldest, next) = {
            let mut st = self.order.lock();
            if let Some(e) = st.entry(self.ticket) {
                e.settled = true;
                e.waker = None;
            }
            if self.retrying {
                st.retrying -= 1;
            }
            // Given up before it was written: the next one may go.
            st.skip_settled();
            while st.entries.front().is_some_and(|e| e.settled) {
                st.entries.pop_front();
                st.base += 1;
            }
            st.written_below = st.written_below.max(st.base);
            let (base, next) = (st.base, st.written_below);
            // Only these two can have their turn come now.
            let oldest = st.take_waker(base);
            let next = if st.retrying == 0 {
                st.take_waker(next)
            } else {
                None
            };
            (oldest, next)
        };
        for w in [oldest, next].into_iter().flatten() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::Context;

    fn ready<F: Future>(f: F) -> Option<F::Output> {
        let mut f = pin!(f);
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    #[test]
    fn publishes_are_written_in_ticket_order_and_settle_in_any() {
        let order = PublishOrder::default();
        let a = order.enter();
        let b = order.enter();
        assert_eq!(ready(b.turn_to_write()), None, "b before a was written");
        assert_eq!(ready(a.turn_to_write()), Some(()));
        a.written();
        assert_eq!(ready(b.turn_to_write()), Some(()));
        b.written();
        b.stored();
        drop(b);
        drop(a);
        assert_eq!(order.unsettled(), 0);
        let c = order.enter();
        assert_eq!(ready(c.turn_to_write()), Some(()));
    }

    #[test]
    fn a_publish_given_up_before_its_write_lets_the_next_one_go() {
        let order = PublishOrder::default();
        let a = order.enter();
        let b = order.enter();
        let c = order.enter();
        drop(a);
        assert_eq!(ready(c.turn_to_write()), None);
        drop(b);
        assert_eq!(ready(c.turn_to_write()), Some(()));
    }

    #[test]
    fn retries_go_one_at_a_time_in_order_and_hold_new_publishes() {
        let order = PublishOrder::default();
        let (mut a, mut b) = (order.enter(), order.enter());
        a.written();
        b.written();
        // Both answered "no responders"; a newer publish waits behind them.
        b.no_responders();
        a.no_responders();
        let c = order.enter();
        assert_eq!(ready(c.turn_to_write()), None);
        assert_eq!(ready(b.turn_to_retry()), None, "a is older");
        assert_eq!(
            ready(a.turn_to_retry()),
            Some(RetryTurn {
                later_stored: false,
                leaderless: true
            })
        );
        a.stored();
        drop(a);
        assert_eq!(ready(c.turn_to_write()), None, "b still waits");
        assert_eq!(
            ready(b.turn_to_retry()),
            Some(RetryTurn {
                later_stored: false,
                leaderless: false
            }),
            "a's retry was stored: b goes at once"
        );
        b.stored();
        drop(b);
        assert_eq!(ready(c.turn_to_write()), Some(()));
    }

    #[test]
    fn a_retry_waits_for_the_answer_of_a_newer_publish_already_written() {
        let order = PublishOrder::default();
        let (mut a, b) = (order.enter(), order.enter());
        a.written();
        b.written();
        a.no_responders();
        assert_eq!(ready(a.turn_to_retry()), None, "b may be stored yet");
        b.stored();
        drop(b);
        assert_eq!(ready(a.turn_to_retry()).map(|t| t.later_stored), Some(true));
    }

    #[test]
    fn a_retry_after_a_later_publish_was_stored_would_break_the_order() {
        let order = PublishOrder::default();
        let (mut a, b) = (order.enter(), order.enter());
        a.written();
        b.written();
        a.no_responders();
        b.stored();
        drop(b);
        assert_eq!(ready(a.turn_to_retry()).map(|t| t.later_stored), Some(true));
        assert!(a.later_stored());
    }

    #[test]
    fn the_task_waiting_its_turn_is_woken() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        struct Flag(AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let order = PublishOrder::default();
        let mut a = order.enter();
        a.written();
        a.no_responders();
        let b = order.enter();
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut turn = pin!(b.turn_to_write());
        assert!(
            turn.as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        drop(a);
        assert!(flag.0.load(Ordering::SeqCst), "b woken when a settled");
        assert!(
            turn.as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_ready()
        );
    }
}
