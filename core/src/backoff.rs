//! The pause between attempts that doubles after each failure, written once for every retry
//! loop (the NATS connection and its supervisor, JetStream consumer repair and advisory watch,
//! the NATS fan-out restart, AMQP links): the first retry comes quickly, a peer that stays
//! down is not asked in a tight loop, and `max` bounds how late a recovered peer is noticed.

use std::time::Duration;

/// `min`, then twice the last pause, up to `max`; [`Backoff::reset`] starts again at `min`.
/// When to reset is the caller's rule (e.g. after a connection that lasted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub const fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The pause [`Backoff::next_pause`] returns next.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The pause to wait now; the one after is twice as long, up to `max`.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        pause
    }

    /// [`Backoff::next_pause`] at a random point of its upper half: gateway instances that lost
    /// the same server at the same moment do not all come back to it at once.
    pub fn next_jittered_pause(&mut self) -> Duration {
        jittered(self.next_pause())
    }

    /// The next pause is `min` again.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// A random point of `pause`'s upper half (`pause` / 2 ..= `pause`).
pub fn jittered(pause: Duration) -> Duration {
    let half = pause / 2;
    half.checked_add(half.mul_f64(fastrand::f64()))
        .unwrap_or(pause)
        .min(pause)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(50), ms(300));
        let pauses: Vec<_> = (0..5).map(|_| b.next_pause()).collect();
        assert_eq!(pauses, [ms(50), ms(100), ms(200), ms(300), ms(300)]);
        assert_eq!(b.current(), ms(300));
        b.reset();
        assert_eq!(b.current(), ms(50));
        assert_eq!(b.next_pause(), ms(50));
        assert_eq!(b.next_pause(), ms(100));
        let mut jittered = Backoff::new(ms(100), ms(400));
        for expected in [ms(100), ms(200), ms(400), ms(400)] {
            let pause = jittered.next_jittered_pause();
            assert!(pause >= expected / 2 && pause <= expected, "{pause:?}");
        }
        let mut at_max = Backoff::new(Duration::MAX, Duration::MAX);
        assert!(at_max.clone().next_jittered_pause() >= Duration::MAX / 2);
        assert_eq!(at_max.next_pause(), Duration::MAX);
        assert_eq!(at_max.next_pause(), Duration::MAX);
    }
}
