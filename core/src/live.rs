//! Settings that a configuration reload replaces while the gateway runs (issue 25 item 3).
//!
//! [`Live`] holds one value and hands out `Arc`s of it: whoever reads it keeps what it read
//! for as long as it needs (a connection its bounds from the moment it was accepted, a request
//! its limits for the whole request), and the next reader sees the replacement. Reads on hot
//! paths (a check per delivered message) use [`Live::read`]: `arc-swap`'s `load`, which borrows
//! through a per-thread debt slot instead of touching the reference count, so readers do not
//! contend with each other (arc-swap 1.9 `src/docs/performance.rs`, `src/docs/internal.rs`),
//! where a lock or an `Arc` clone would make every core write the same cache line.
//!
//! [`Slots`] counts holders against a cap the caller reads from its `Live` section at each
//! take (a listener's `max_connections`, HTTP's `max_in_flight`): a lowered cap refuses
//! newcomers until enough holders left, it never takes a slot back.

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

/// Places held against a cap given at each take, which may move while they are held (see the
/// module documentation).
#[derive(Debug, Default)]
pub struct Slots {
    held: AtomicUsize,
}

impl Slots {
    pub fn new() -> Arc<Slots> {
        Arc::default()
    }

    /// A slot, unless `cap` (the cap in force now) or more are held already; given back when
    /// the [`Slot`] drops. Raised, newcomers fit at once; lowered, holders over it keep their
    /// slots and newcomers are refused until enough gave theirs back.
    pub fn try_take(self: &Arc<Self>, cap: usize) -> Option<Slot> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < cap).then_some(held + 1)
            })
            .ok()?;
        Some(Slot {
            slots: Arc::clone(self),
        })
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
        let slots = Slots::new();
        let a = slots.try_take(2).expect("first");
        let b = slots.try_take(2).expect("second");
        assert!(slots.try_take(2).is_none(), "at the cap");
        drop(a);
        assert!(slots.try_take(1).is_none(), "still one held, lowered cap 1");
        drop(b);
        let c = slots.try_take(1).expect("under the lowered cap");
        let _d = slots.try_take(3).expect("raised");
        assert_eq!(slots.held(), 2);
        drop(c);
        assert_eq!(slots.held(), 1);
    }
}
