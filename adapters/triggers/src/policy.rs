//! Knative's delivery contract, without I/O: which answers are retried, how long to wait before
//! the next attempt, and what `Retry-After` may add to it.
//!
//! From Knative's data-plane contract (`specs/eventing/data-plane.md`, "Derived reply events" and
//! "Retries"): 2xx is delivered; 404, 409, 429 and every 5xx are retried; 400 and the other 4xx
//! are not (the subscriber refused the event itself); 1xx and 3xx are errors that are not
//! retried (redirects are not followed); a code outside those ranges is retried. A connection
//! that fails or an attempt that times out is retried.

use std::time::{Duration, SystemTime};

use meshgate_config::triggers::BackoffPolicy;

/// What an answer means for the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Worth another attempt.
    Retry,
    /// Another attempt would get the same answer: dead-letter it now.
    Fail,
}

pub fn classify(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        404 | 409 | 429 | 500..=599 => Verdict::Retry,
        100..=199 | 300..=499 => Verdict::Fail,
        _ => Verdict::Retry,
    }
}

/// The longest a computed backoff may be.
const MAX_BACKOFF: Duration = Duration::from_secs(86_400);

/// The wait before retry number `retry` (1 for the first retry): `delay × retry` (linear) or
/// `delay × 2^retry` (exponential), as Knative's `DeliverySpec` documents, at most a day.
pub fn backoff(policy: BackoffPolicy, delay: Duration, retry: u32) -> Duration {
    let factor = match policy {
        BackoffPolicy::Linear => retry,
        BackoffPolicy::Exponential => 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX),
    };
    delay.saturating_mul(factor).min(MAX_BACKOFF)
}

/// What a `Retry-After` header asks for (RFC 9110 §10.2.3: delay-seconds or an HTTP-date),
/// measured from `now`; `None` when absent or unreadable (then only the backoff applies).
pub fn retry_after(value: Option<&str>, now: SystemTime) -> Option<Duration> {
    let v = value?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The wait before the next attempt: the backoff, or a longer `Retry-After` of a 429 or 503
/// answer cut to `retry_after_max` (Knative's `retryAfterMax`).
pub fn next_wait(
    backoff: Duration,
    status: Option<u16>,
    retry_after: Option<Duration>,
    retry_after_max: Duration,
) -> Duration {
    match (status, retry_after) {
        (Some(429 | 503), Some(asked)) => backoff.max(asked.min(retry_after_max)),
        _ => backoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_table_of_the_contract() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(classify(s), Verdict::Delivered, "{s}");
        }
        for s in [404, 409, 429, 500, 502, 503, 504, 599, 600, 99] {
            assert_eq!(classify(s), Verdict::Retry, "{s}");
        }
        for s in [
            100, 101, 301, 302, 307, 400, 401, 403, 405, 410, 413, 415, 422,
        ] {
            assert_eq!(classify(s), Verdict::Fail, "{s}");
        }
    }

    #[test]
    fn backoff_grows_as_knative_documents() {
        let d = Duration::from_millis(100);
        let lin: Vec<_> = (1..=4)
            .map(|k| backoff(BackoffPolicy::Linear, d, k).as_millis())
            .collect();
        assert_eq!(lin, [100, 200, 300, 400]);
        let exp: Vec<_> = (1..=4)
            .map(|k| backoff(BackoffPolicy::Exponential, d, k).as_millis())
            .collect();
        assert_eq!(exp, [200, 400, 800, 1600]);
        assert_eq!(backoff(BackoffPolicy::Exponential, d, 100), MAX_BACKOFF);
        assert_eq!(
            backoff(BackoffPolicy::Linear, Duration::MAX, 3),
            MAX_BACKOFF
        );
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after(Some("7"), now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            retry_after(Some(&later), now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(retry_after(Some(&earlier), now), Some(Duration::ZERO));
        assert_eq!(retry_after(Some("soon"), now), None);
        assert_eq!(retry_after(Some("-1"), now), None);
        assert_eq!(retry_after(None, now), None);
    }

    #[test]
    fn retry_after_counts_only_on_429_and_503_and_is_capped() {
        let b = Duration::from_secs(1);
        let cap = Duration::from_secs(10);
        let asked = Some(Duration::from_secs(5));
        assert_eq!(next_wait(b, Some(429), asked, cap), Duration::from_secs(5));
        assert_eq!(next_wait(b, Some(503), asked, cap), Duration::from_secs(5));
        assert_eq!(next_wait(b, Some(500), asked, cap), b);
        assert_eq!(next_wait(b, None, asked, cap), b);
        let long = Some(Duration::from_secs(3600));
        assert_eq!(next_wait(b, Some(429), long, cap), cap);
        assert_eq!(
            next_wait(Duration::from_secs(20), Some(429), asked, cap),
            Duration::from_secs(20)
        );
    }
}
