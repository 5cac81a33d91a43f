//! The NATS client protocol as bytes, without I/O: the lines the client writes (`PUB`/`HPUB`,
//! `SUB`, `UNSUB`) and the operations it reads from the server (`MSG`/`HMSG`, `PING`, `PONG`,
//! `+OK`, `-ERR`, `INFO`), parsed in place from the read buffer.

use bytes::{Buf, Bytes, BytesMut};

/// Largest message size a `MSG` line may announce at all (nats-server's own hard limit for
/// max_payload); a bigger size is a protocol error, not an allocation.
pub(super) const MAX_INBOUND_MESSAGE: usize = 64 << 20;

/// Longest control line accepted from the server (INFO can be long in a cluster).
pub(super) const MAX_CONTROL_LINE: usize = 1 << 20;

/// A received message. `headers` is the raw header block (`NATS/1.0\r\n…\r\n\r\n`), if any.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Msg {
    pub subject: Bytes,
    /// The reply subject, if any (a JetStream delivery's is where its acknowledgement goes).
    pub reply: Option<Bytes>,
    pub headers: Option<Bytes>,
    pub payload: Bytes,
}

/// What the server sent that is not the NATS protocol: the connection is out of step and is
/// dropped. The line is the offending control line (lossy UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProtocolError {
    #[error("control line too long")]
    LineTooLong,
    #[error("bad number in `{line}`")]
    BadNumber { line: String },
    #[error("bad `{line}`")]
    BadMessageLine { line: String },
    #[error("no CRLF after the {size} bytes of `{line}`")]
    NoCrlfAfterBody { size: usize, line: String },
    #[error("unknown operation `{line}`")]
    UnknownOperation { line: String },
    /// The handshake: the server's first line is not a valid `INFO` (at most 80 characters
    /// of it kept).
    #[error("the server did not start with INFO: {line}")]
    NoInfo { line: String },
    /// The handshake: a line the server may not send before its `PONG`.
    #[error("unexpected `{line}` before the server's PONG")]
    Unexpected { line: String },
}

/// At least what an `HPUB` line holds besides its subject: verb, spaces, two sizes, CRLF.
pub(super) const PUB_LINE_OVERHEAD: usize = 64;

/// The length of the `PUB`/`HPUB` line [`write_pub`] writes.
pub(super) fn pub_line_len(
    subject: &str,
    reply: Option<&str>,
    headers: usize,
    total: usize,
) -> usize {
    let digits = |n: usize| n.checked_ilog10().map_or(1, |d| d as usize + 1);
    let verb = if headers == 0 { 3 } else { 4 };
    let sizes = if headers == 0 {
        1 + digits(total)
    } else {
        1 + digits(headers) + 1 + digits(total)
    };
    verb + 1 + subject.len() + reply.map_or(0, |r| r.len() + 1) + sizes + 2
}

/// Empty, or with a byte the protocol line cannot carry (whitespace, control characters).
pub(crate) fn not_a_subject(s: &str) -> bool {
    s.is_empty() || s.bytes().any(|b| b <= b' ' || b == 0x7f)
}

/// Appends `PUB` (or `HPUB` with a header block) and the message.
pub(super) fn write_pub(
    buf: &mut Vec<u8>,
    subject: &str,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
) {
    let mut n = itoa::Buffer::new();
    buf.reserve(subject.len() + headers.len() + payload.len() + 32);
    buf.extend_from_slice(if headers.is_empty() {
        b"PUB "
    } else {
        b"HPUB "
    });
    buf.extend_from_slice(subject.as_bytes());
    if let Some(reply) = reply {
        buf.push(b' ');
        buf.extend_from_slice(reply.as_bytes());
    }
    if !headers.is_empty() {
        buf.push(b' ');
        buf.extend_from_slice(n.format(headers.len()).as_bytes());
    }
    buf.push(b' ');
    buf.extend_from_slice(n.format(headers.len() + payload.len()).as_bytes());
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(headers);
    buf.extend_from_slice(payload);
    buf.extend_from_slice(b"\r\n");
}

/// Appends `SUB <subject> [<queue>] <sid>`.
pub(super) fn write_sub(buf: &mut Vec<u8>, sid: u64, subject: &str, queue: Option<&str>) {
    buf.extend_from_slice(b"SUB ");
    buf.extend_from_slice(subject.as_bytes());
    if let Some(q) = queue {
        buf.push(b' ');
        buf.extend_from_slice(q.as_bytes());
    }
    buf.push(b' ');
    buf.extend_from_slice(itoa::Buffer::new().format(sid).as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// Appends `UNSUB <sid>`.
pub(super) fn write_unsub(buf: &mut Vec<u8>, sid: u64) {
    buf.extend_from_slice(b"UNSUB ");
    buf.extend_from_slice(itoa::Buffer::new().format(sid).as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// The server's `INFO`, the fields this client uses.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct Info {
    #[serde(default)]
    pub(super) max_payload: usize,
    #[serde(default)]
    pub(super) tls_required: bool,
    #[serde(default)]
    pub(super) headers: bool,
    /// What an NKey client signs (servers with NKey or JWT authentication).
    #[serde(default)]
    pub(super) nonce: Option<String>,
    /// The client listeners of the cluster's servers (`host:port`), announced at connect and
    /// again when the cluster changes ([`super::servers::ServerPool::learn`]).
    /// (Values, not strings: one entry of another type must not make the whole `INFO`
    /// unreadable; see [`Info::urls`].)
    #[serde(default)]
    pub(super) connect_urls: Vec<serde_json::Value>,
    /// Lame-duck mode: the server is about to close its clients and exit; leave it.
    #[serde(default)]
    pub(super) ldm: bool,
}

impl Info {
    /// The announced servers that are strings (others are skipped).
    pub(super) fn urls(&self) -> Vec<String> {
        self.connect_urls
            .iter()
            .filter_map(|u| u.as_str().map(str::to_owned))
            .collect()
    }
}

pub(super) fn find_crlf(b: &[u8]) -> Option<usize> {
    memchr::memmem::find(b, b"\r\n")
}

/// One operation from the server.
#[derive(Debug, PartialEq)]
pub(super) enum Op {
    Msg {
        sid: u64,
        msg: Msg,
    },
    /// A well-formed `MSG`/`HMSG` of `size` bytes over the limit: its line was consumed; the
    /// next `skip` bytes (body and CRLF) are to be skipped, not buffered.
    TooLarge {
        sid: u64,
        size: usize,
        skip: usize,
    },
    Ping,
    Pong,
    Ok,
    Err(String),
    Info(String),
}

/// [`parse_op`] after skipping what is left of a too-large message (`skip` bytes, kept
/// across reads): the reader's one step, also what the fuzz target drives.
pub(super) fn next_op(
    buf: &mut BytesMut,
    skip: &mut usize,
    limit: usize,
) -> Result<Option<Op>, ProtocolError> {
    if *skip > 0 {
        let n = (*skip).min(buf.len());
        buf.advance(n);
        *skip -= n;
        if *skip > 0 {
            return Ok(None);
        }
    }
    let op = parse_op(buf, limit)?;
    if let Some(Op::TooLarge { skip: s, .. }) = &op {
        *skip = *s;
    }
    Ok(op)
}

/// The next complete operation in `buf` (consumed), `None` when more bytes are needed.
/// A message over `limit` bytes is [`Op::TooLarge`] (never buffered).
fn parse_op(buf: &mut BytesMut, limit: usize) -> Result<Option<Op>, ProtocolError> {
    let Some(end) = find_crlf(buf) else {
        if buf.len() > MAX_CONTROL_LINE {
            return Err(ProtocolError::LineTooLong);
        }
        return Ok(None);
    };
    let line = &buf[..end];
    let (verb, args) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &b""[..]),
    };
    let simple = |buf: &mut BytesMut, op| {
        buf.advance(end + 2);
        Ok(Some(op))
    };
    if verb.eq_ignore_ascii_case(b"MSG") || verb.eq_ignore_ascii_case(b"HMSG") {
        let headers = verb.len() == 4;
        // At most 5 arguments; a sixth makes the count wrong (refused below). No allocation:
        // this runs for every message.
        let mut parts: [&[u8]; 6] = [&[]; 6];
        let mut count = 0;
        for p in args
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|p| !p.is_empty())
        {
            if count == parts.len() {
                break;
            }
            parts[count] = p;
            count += 1;
        }
        let parts = &parts[..count];
        let num = |p: &[u8]| -> Result<usize, ProtocolError> {
            std::str::from_utf8(p)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ProtocolError::BadNumber {
                    line: String::from_utf8_lossy(line).into_owned(),
                })
        };
        let bad = || ProtocolError::BadMessageLine {
            line: String::from_utf8_lossy(line).into_owned(),
        };
        // MSG subject sid [reply] size; HMSG subject sid [reply] hdr_size total_size
        let ok = if headers {
            parts.len() == 4 || parts.len() == 5
        } else {
            parts.len() == 3 || parts.len() == 4
        };
        if !ok {
            return Err(bad());
        }
        let sid = num(parts[1])? as u64;
        let total = num(parts[parts.len() - 1])?;
        let hdr = if headers {
            num(parts[parts.len() - 2])?
        } else {
            0
        };
        if hdr > total || total > MAX_INBOUND_MESSAGE {
            return Err(bad());
        }
        if total > limit {
            buf.advance(end + 2);
            return Ok(Some(Op::TooLarge {
                sid,
                size: total,
                skip: total + 2,
            }));
        }
        let at = |p: &[u8]| (p.as_ptr() as usize - buf.as_ptr() as usize, p.len());
        let subject_at = at(parts[0]);
        let reply_at = (parts.len() == if headers { 5 } else { 4 }).then(|| at(parts[2]));
        if buf.len() < end + 2 + total + 2 {
            buf.reserve(end + 2 + total + 2 - buf.len());
            return Ok(None);
        }
        if &buf[end + 2 + total..end + 2 + total + 2] != b"\r\n" {
            return Err(ProtocolError::NoCrlfAfterBody {
                size: total,
                line: String::from_utf8_lossy(line).into_owned(),
            });
        }
        let head = buf.split_to(end + 2).freeze();
        let subject = head.slice(subject_at.0..subject_at.0 + subject_at.1);
        let reply = reply_at.map(|(i, n)| head.slice(i..i + n));
        let mut body = buf.split_to(total + 2).freeze();
        body.truncate(total);
        let headers = headers.then(|| body.split_to(hdr));
        return Ok(Some(Op::Msg {
            sid,
            msg: Msg {
                subject,
                reply,
                headers,
                payload: body,
            },
        }));
    }
    if verb.eq_ignore_ascii_case(b"PING") {
        return simple(buf, Op::Ping);
    }
    if verb.eq_ignore_ascii_case(b"PONG") {
        return simple(buf, Op::Pong);
    }
    if verb.eq_ignore_ascii_case(b"+OK") {
        return simple(buf, Op::Ok);
    }
    if verb.eq_ignore_ascii_case(b"-ERR") {
        // At most 256 characters are kept for the log (a line may be up to 1 MiB).
        let text = String::from_utf8_lossy(args)
            .trim()
            .chars()
            .take(256)
            .collect();
        return simple(buf, Op::Err(text));
    }
    if verb.eq_ignore_ascii_case(b"INFO") {
        let text = String::from_utf8_lossy(args).into_owned();
        return simple(buf, Op::Info(text));
    }
    Err(ProtocolError::UnknownOperation {
        line: String::from_utf8_lossy(line).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ops(input: &[u8]) -> (Vec<Op>, usize) {
        let mut buf = BytesMut::from(input);
        let mut v = Vec::new();
        while let Some(op) = parse_op(&mut buf, MAX_INBOUND_MESSAGE).unwrap() {
            v.push(op);
        }
        (v, buf.len())
    }

    /// A cluster's `INFO`: the announced servers (an entry that is not a string skipped, not
    /// the whole `INFO`) and lame-duck mode.
    #[test]
    fn info_announces_servers_and_lame_duck_mode() {
        let info: Info = serde_json::from_str(
            r#"{"max_payload":1024,"headers":true,"connect_urls":["a:1",7,null,"b:2"],"ldm":true}"#,
        )
        .unwrap();
        assert_eq!(info.urls(), ["a:1", "b:2"]);
        assert!(info.ldm);
        let plain: Info = serde_json::from_str(r#"{"headers":true}"#).unwrap();
        assert!(plain.urls().is_empty() && !plain.ldm);
    }

    #[test]
    fn parses_every_server_operation() {
        let (v, rest) = ops(
            b"INFO {\"max_payload\":1024}\r\nPING\r\n+OK\r\nPONG\r\nMSG a.b 7 5\r\nhello\r\n\
              HMSG a.c 8 reply.x 12 14\r\nNATS/1.0\r\n\r\nhi\r\n-ERR 'Stale Connection'\r\nMSG a 9 3\r\nab",
        );
        assert_eq!(
            rest,
            b"MSG a 9 3\r\nab".len(),
            "the incomplete message waits"
        );
        assert_eq!(v[0], Op::Info("{\"max_payload\":1024}".into()));
        assert_eq!(v[1], Op::Ping);
        assert_eq!(v[2], Op::Ok);
        assert_eq!(v[3], Op::Pong);
        let Op::Msg { sid, msg } = &v[4] else {
            panic!()
        };
        assert_eq!(
            (*sid, &msg.subject[..], &msg.payload[..]),
            (7, &b"a.b"[..], &b"hello"[..])
        );
        assert!(msg.headers.is_none());
        let Op::Msg { sid, msg } = &v[5] else {
            panic!()
        };
        assert_eq!((*sid, &msg.subject[..]), (8, &b"a.c"[..]));
        assert_eq!(msg.headers.as_deref(), Some(&b"NATS/1.0\r\n\r\n"[..]));
        assert_eq!(&msg.payload[..], b"hi");
        assert_eq!(v[6], Op::Err("'Stale Connection'".into()));
    }

    #[test]
    fn messages_split_anywhere_parse_the_same() {
        let input: &[u8] = b"HMSG s.x 3 20 25\r\nNATS/1.0\r\nA: b c\r\n\r\nhello\r\nPING\r\n";
        for cut in 0..input.len() {
            let mut buf = BytesMut::from(&input[..cut]);
            let mut got = Vec::new();
            while let Some(op) = parse_op(&mut buf, MAX_INBOUND_MESSAGE).unwrap() {
                got.push(op);
            }
            buf.extend_from_slice(&input[cut..]);
            while let Some(op) = parse_op(&mut buf, MAX_INBOUND_MESSAGE).unwrap() {
                got.push(op);
            }
            assert_eq!(got.len(), 2, "cut at {cut}");
            let Op::Msg { msg, .. } = &got[0] else {
                panic!()
            };
            assert_eq!(&msg.payload[..], b"hello");
            assert_eq!(
                msg.headers.as_deref(),
                Some(&b"NATS/1.0\r\nA: b c\r\n\r\n"[..])
            );
            assert_eq!(got[1], Op::Ping);
        }
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        for bad in [
            &b"MSG a x 3\r\nabc\r\n"[..],
            b"HMSG a 1 9 3\r\nabc\r\n",
            b"WHAT\r\n",
            // Sizes a server must never send: no overflow, no allocation, an error.
            b"MSG a 1 18446744073709551613\r\n",
            b"MSG a 1 1000000000000\r\n",
            b"HMSG a 1 2 18446744073709551615\r\n",
            // The body is not followed by CRLF: out of step.
            b"MSG a 1 3\r\nabcde\r\n",
        ] {
            assert!(
                parse_op(&mut BytesMut::from(bad), MAX_INBOUND_MESSAGE).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Drives [`next_op`] over `chunks` as the connection's read loop does (too-large messages skipped):
    /// the operations up to the first error, and whether there was one.
    fn drive(chunks: &[&[u8]], limit: usize) -> (Vec<Op>, bool) {
        let mut buf = BytesMut::new();
        let mut ops = Vec::new();
        let mut skip = 0usize;
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match next_op(&mut buf, &mut skip, limit) {
                    Ok(Some(op)) => ops.push(op),
                    Ok(None) => {
                        // Bounded memory: waiting for more never holds more than a control
                        // line and one message within the limit.
                        assert!(buf.len() <= MAX_CONTROL_LINE + limit + 4, "{}", buf.len());
                        break;
                    }
                    Err(_) => return (ops, true),
                }
            }
        }
        (ops, false)
    }

    /// Fuzz target `nats_protocol`: any bytes from the server, whole or cut anywhere, give
    /// the same operations (or the same protocol error), never a panic; messages over the
    /// limit are skipped, never buffered.
    #[test]
    fn fuzz_nats_protocol() {
        use meshgate_fuzz::proptest;
        use meshgate_fuzz::proptest::prelude::*;
        const LIMIT: usize = 64;
        let seeds: [&[u8]; 4] = [
            b"INFO {\"max_payload\":1024,\"headers\":true}\r\nPING\r\nPONG\r\n+OK\r\n-ERR 'Permissions Violation'\r\n",
            b"MSG a.b 1 5\r\nhello\r\nMSG a.b 1 r.x 2\r\nhi\r\n",
            b"HMSG a.b 2 r.x 22 24\r\nNATS/1.0\r\nabc: 1\r\n\r\nhi\r\nHMSG s 3 16 16\r\nNATS/1.0 100 Idle\r\n\r\n\r\n",
            b"MSG big 1 100\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\nPING\r\n",
        ];
        let inputs = (
            meshgate_fuzz::bytes("nats_protocol", &seeds, 512),
            proptest::collection::vec(any::<usize>(), 0..6),
        );
        meshgate_fuzz::run(
            "nats_protocol",
            inputs,
            |b| Some((b.to_vec(), vec![1, 7, 30])),
            |(input, cuts)| {
                let whole = drive(&[input.as_slice()], LIMIT);
                let mut at: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
                at.sort_unstable();
                let mut chunks: Vec<&[u8]> = Vec::new();
                let mut from = 0;
                for a in at {
                    chunks.push(&input[from..a]);
                    from = a;
                }
                chunks.push(&input[from..]);
                let cut = drive(&chunks, LIMIT);
                if whole != cut {
                    return Err(format!("whole {whole:?} != cut at {chunks:?}: {cut:?}"));
                }
                for op in &whole.0 {
                    if let Op::Msg { msg, .. } = op {
                        let size = msg.headers.as_ref().map_or(0, Bytes::len) + msg.payload.len();
                        if size > LIMIT {
                            return Err(format!(
                                "a message of {size} bytes over the limit was kept"
                            ));
                        }
                    }
                }
                Ok(())
            },
        );
    }
}
