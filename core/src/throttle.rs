//! At most one log line per interval for events that can repeat per message (rejected AMQP
//! messages, NATS slow consumers): each occurrence is counted in a metric, the log says it once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    last: Mutex<Option<Instant>>,
}

impl LogThrottle {
    pub const fn new(interval: Duration) -> LogThrottle {
        LogThrottle {
            interval,
            last: Mutex::new(None),
        }
    }

    /// True for the first call and then at most once per interval.
    pub fn ready(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= self.interval) {
            *last = Some(Instant::now());
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_interval() {
        let t = LogThrottle::new(Duration::from_secs(3600));
        assert!(t.ready());
        assert!(!t.ready());
        let t = LogThrottle::new(Duration::ZERO);
        assert!(t.ready());
        assert!(t.ready());
    }
}
