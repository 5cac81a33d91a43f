//! Settings that a configuration reload replaces while the gateway runs (issue 25 item 3).
//!
//! [`Live`] holds one value and hands out `Arc`s of it: whoever reads it keeps what it read
//! for as long as it needs (a connection its bounds from the moment it was accepted, a request
//! its limits for the whole request), and the next reader sees the replacement. Reads on hot
//! paths (a check per delivered message) use [`Live::read`]: `arc-swap`'s `load`, which borrows
//! through a per-thread debt slot instead of touching the reference count, so readers do not
//! contend with each other (arc-swap 1.9 `src/docs/performance.rs`, `src/docs/internal.rs`),
//! where a lock or an `Arc` clone would make every core write the same cache line. [`Slots`] is a count with a cap the reload may move (a listener's
//! `max_connections`, HTTP's `max_in_flight`): lowering it refuses newcomers until enough
//! holders left, it never takes a slot back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;

/// A value a reload may replace as a whole (see the module documentation).
#[derive(Debug)]
pub struct Live<T> {
    current: ArcSwap<T>,
}

impl<T> Live<T> {
    pub fn new(value: T) -> Live<T> {
        Live {
            current: ArcSwap::from_pointee(value),
        }
    }

    /// The value in force now, to keep.
    pub fn get(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// The value in force now, for a short look (not to be held across many awaits: each
    /// thread has a few cheap guards, more fall back to an `Arc` clone).
    pub fn read(&self) -> arc_swap::Guard<Arc<T>> {
        self.current.load()
    }

    /// Puts `value` in force for every later read; earlier readers keep theirs.
    pub fn set(&self, value: T) {
        self.current.store(Arc::new(value));
    }
}

/// Places with a cap that can move while they are held (see the module documentation).
#[derive(Debug)]
pub struct Slots {
    held: AtomicUsize,
    cap: AtomicUsize,
}

impl Slots {
    pub fn new(cap: usize) -> Arc<Slots> {
        Arc::new(Slots {
            held: AtomicUsize::new(0),
            cap: AtomicUsize::new(cap),
        })
    }

    /// A slot, unless `cap` are held already; given back when the [`Slot`] drops.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let cap = self.cap.load(Ordering::Acquire);
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < cap).then_some(held + 1)
            })
            .ok()?;
        Some(Slot {
            slots: Arc::clone(self),
        })
    }

    /// The cap in force now.
    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Acquire)
    }

    /// Moves the cap: raised, newcomers fit at once; lowered, holders over it keep their slots
    /// and newcomers are refused until enough gave theirs back.
    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Ordering::Release);
    }

    /// Slots held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// One held place of [`Slots`].
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.held.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_keep_what_they_read() {
        let live = Live::new(1);
        let before = live.get();
        live.set(2);
        assert_eq!((*before, *live.get()), (1, 2));
    }

    #[test]
    fn slots_follow_a_moving_cap() {
        let slots = Slots::new(2);
        let a = slots.try_take().expect("first");
        let b = slots.try_take().expect("second");
        assert!(slots.try_take().is_none(), "at the cap");
        slots.set_cap(1);
        drop(a);
        assert!(slots.try_take().is_none(), "still one held, lowered cap 1");
        drop(b);
        let c = slots.try_take().expect("under the lowered cap");
        slots.set_cap(3);
        let _d = slots.try_take().expect("raised");
        assert_eq!(slots.held(), 2);
        drop(c);
        assert_eq!(slots.held(), 1);
    }
}
