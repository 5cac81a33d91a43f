//! Wrapping a payload that is not a CloudEvent (CE-BINDINGS.md §10, "as a producer").

use std::sync::Arc;

use bytes::Bytes;

use crate::event::{Data, Event, EventError};

/// A new event id: a UUIDv7, unique and time-ordered, from the same generator as
/// [`id_and_time`] (so ids made by either increase together).
pub fn new_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ms = now.as_secs() * 1000 + u64::from(now.subsec_millis());
    ID_STATE.with_borrow_mut(|st| st.id(ms))
}

/// The current time as an RFC 3339 timestamp in UTC with microseconds.
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339_from_unix(now.as_secs(), now.subsec_micros())
}

/// An RFC 3339 timestamp in UTC with microseconds, from seconds and microseconds since the Unix
/// epoch (AMQP 0.9.1 timestamps are seconds).
pub fn rfc3339_from_unix(secs: u64, micros: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm), valid for dates after 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(mo <= 2);
    // Digits written by hand: this runs for every wrapped message.
    let mut out = [0u8; 27];
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (0..width).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y);
    put(5, 2, mo);
    put(8, 2, d);
    put(11, 2, h);
    put(14, 2, m);
    put(17, 2, s);
    put(20, 6, u64::from(micros));
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ] {
        out[i] = c;
    }
    // Only ASCII digits and separators were written.
    String::from_utf8_lossy(&out).into_owned()
}

/// The last UUIDv7 timestamp and counter handed out, as `unix_ms << 12 | counter`: one atomic
/// step per id keeps ids increasing across the whole process (one connection's task moves
/// between threads), without the `uuid` crate's global context behind a mutex.
static LAST_V7: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Per-thread state of [`id_and_time`]: the random bits and the formatted time, on the path
/// every wrapped message takes (the `uuid` context behind a mutex, a fresh random draw per id
/// and two formatted strings were ~10% of the MQTT benchmark's profile).
struct IdState {
    /// xorshift64* state, seeded once per thread from the OS-seeded generator.
    rng: u64,
    /// `YYYY-MM-DDTHH:MM:SS.` of `second`, so a timestamp is formatted once per second.
    second: u64,
    prefix: [u8; 20],
}

impl IdState {
    fn new() -> IdState {
        // 74 random bits from the `uuid` crate's OS-seeded generator.
        let (a, b) = uuid::Uuid::now_v7().as_u64_pair();
        IdState {
            rng: (a.rotate_left(32) ^ b) | 1,
            second: u64::MAX,
            prefix: [0; 20],
        }
    }

    /// A UUIDv7 for `unix_ms` (see [`next_v7_stamp`]), encoded directly rather than through
    /// `Display` (formatting machinery showed up in the MQTT benchmark's profile).
    fn id(&mut self, unix_ms: u64) -> String {
        let stamp = next_v7_stamp(unix_ms);
        let hi = ((stamp >> 12) << 16) | 0x7000 | (stamp & 0xfff);
        let lo = (0b10 << 62) | (self.next_random() >> 2);
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        uuid::Uuid::from_u64_pair(hi, lo)
            .hyphenated()
            .encode_lower(&mut buf)
            .to_owned()
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

thread_local! {
    static ID_STATE: std::cell::RefCell<IdState> = std::cell::RefCell::new(IdState::new());
}

/// The next `unix_ms << 12 | counter` (RFC 9562 §6.2 method 1, a 12-bit counter in `rand_a`):
/// the current millisecond with counter 0, or one past the last value when that is later (the
/// same millisecond, more than 4,096 ids in it, or a clock that stepped back).
fn next_v7_stamp(ms: u64) -> u64 {
    use std::sync::atomic::Ordering;
    let fresh = ms << 12;
    let mut last = LAST_V7.load(Ordering::Relaxed);
    loop {
        let next = fresh.max(last + 1);
        match LAST_V7.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// A new event id (UUIDv7) and the current time (RFC 3339, microseconds), from one reading of
/// the clock. Ids increase across the process (so one producer's events sort in the order they
/// were made) and carry 62 random bits.
pub fn id_and_time() -> (String, String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, micros) = (now.as_secs(), now.subsec_micros());
    ID_STATE.with_borrow_mut(|st| {
        let id = st.id(secs * 1000 + u64::from(micros / 1000));
        if secs != st.second {
            let full = rfc3339_from_unix(secs, 0);
            st.prefix.copy_from_slice(&full.as_bytes()[..20]);
            st.second = secs;
        }
        let mut time = String::with_capacity(27);
        // The prefix is ASCII written by `rfc3339_from_unix`.
        time.push_str(std::str::from_utf8(&st.prefix).unwrap_or("1970-01-01T00:00:00."));
        let mut digits = [0u8; 6];
        let mut v = micros;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
        time.push_str(std::str::from_utf8(&digits).unwrap_or("000000"));
        time.push('Z');
        (id, time)
    })
}

/// What a wrapped event is made of.
#[derive(Debug, Clone)]
pub struct Wrap<'a> {
    pub source: &'a str,
    pub ty: &'a str,
    pub subject: Option<&'a str>,
    pub content_type: Option<&'a str>,
}

/// Wraps `body` into a new event: generated id, the given source and type, the topic as subject,
/// the content type when known (never invented), `time` now.
pub fn wrap(body: Bytes, w: Wrap<'_>) -> Result<Event, EventError> {
    Wrapper::new(w.source, w.ty)?.wrap(body, w.subject, w.content_type)
}

/// Wraps the payloads of one producer (a connection, an HTTP route): `source` and `type` are
/// validated once here instead of for every message.
#[derive(Debug, Clone)]
pub struct Wrapper {
    source: Arc<str>,
    ty: Arc<str>,
}

impl Wrapper {
    /// A wrapper for `source`; `ty` may be an `Arc<str>` shared by many wrappers (one per MQTT
    /// connection: the configured type is not copied for each).
    pub fn new(source: impl Into<String>, ty: impl Into<Arc<str>>) -> Result<Wrapper, EventError> {
        let (source, ty) = (source.into(), ty.into());
        crate::validate::uri_reference("source", &source)?;
        crate::validate::non_empty_string("type", &ty)?;
        Ok(Wrapper {
            source: source.into(),
            ty,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// A new event around `body` (see [`wrap`]).
    pub fn wrap(
        &self,
        body: Bytes,
        subject: Option<&str>,
        content_type: Option<&str>,
    ) -> Result<Event, EventError> {
        self.wrap_shared(body, subject.map(Arc::from), content_type)
    }

    /// [`Wrapper::wrap`] with the subject as a shared string (a topic's text: no copy).
    pub fn wrap_shared(
        &self,
        body: Bytes,
        subject: Option<Arc<str>>,
        content_type: Option<&str>,
    ) -> Result<Event, EventError> {
        let (id, time) = id_and_time();
        let mut event = Event::from_trusted(id, self.source.clone(), self.ty.clone(), time);
        event.set_shared_subject(subject)?;
        event.set_datacontenttype(content_type.map(str::to_owned))?;
        if !body.is_empty() {
            // Bytes stay bytes: the JSON encoder writes JSON bodies as JSON and text as text.
            event.set_data(Some(Data::Binary(body)));
        }
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339_from_unix(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_from_unix(951_782_400, 5),
            "2000-02-29T00:00:00.000005Z"
        );
        assert_eq!(
            rfc3339_from_unix(1_795_359_845, 0),
            "2026-11-22T15:04:05.000000Z"
        );
        crate::validate::timestamp("time", &now_rfc3339()).unwrap();
        let (id, time) = id_and_time();
        crate::validate::timestamp("time", &time).unwrap();
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
        let (later, _) = id_and_time();
        assert!(later > id, "time-ordered ids");
        let mut last = later;
        for _ in 0..10_000 {
            let (next, time) = id_and_time();
            let u = uuid::Uuid::parse_str(&next).unwrap();
            assert_eq!(u.get_version_num(), 7);
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
            assert!(next > last, "{next} after {last}");
            crate::validate::timestamp("time", &time).unwrap();
            last = next;
        }
        // Across threads too: ids made one after another on different threads increase.
        let mut ids = vec![last];
        for _ in 0..4 {
            ids.push(std::thread::spawn(|| id_and_time().0).join().unwrap());
            ids.push(id_and_time().0);
        }
        ids.push(new_id());
        ids.push(id_and_time().0);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        // The id's timestamp is the event's time (same clock reading), to the millisecond.
        let (id, time) = id_and_time();
        let (secs, _) = uuid::Uuid::parse_str(&id)
            .unwrap()
            .get_timestamp()
            .unwrap()
            .to_unix();
        assert_eq!(rfc3339_from_unix(secs, 0)[..19], time[..19]);
    }

    #[test]
    fn wrapper_validates_once_and_produces_valid_events() {
        assert!(Wrapper::new("not a uri", "t").is_err());
        assert!(Wrapper::new("/ok", "").is_err());
        let w = Wrapper::new("/meshgate/mqtt/dev-1", "io.meshgate.t").unwrap();
        let e = w
            .wrap(Bytes::from_static(b"x"), Some("a/b"), Some("text/plain"))
            .unwrap();
        // Valid in every respect: the strict JSON reader takes it, and it reads back the same.
        let json = crate::json::encode(&e);
        assert_eq!(
            crate::json::encode(&crate::json::decode(&json).unwrap()),
            json
        );
        assert!(w.wrap(Bytes::new(), Some("bad\u{7}subject"), None).is_err());
    }

    #[test]
    fn wrap_keeps_bytes_and_never_invents_a_content_type() {
        let e = wrap(
            Bytes::from_static(b"\x00\x01"),
            Wrap {
                source: "/gw",
                ty: "io.meshgate.t",
                subject: Some("a/b"),
                content_type: None,
            },
        )
        .unwrap();
        assert_eq!(e.datacontenttype(), None);
        assert_eq!(e.subject(), Some("a/b"));
        assert_eq!(
            e.data(),
            Some(&Data::Binary(Bytes::from_static(b"\x00\x01")))
        );
    }
}
