//! Bounds on AMQP field tables, checked on the raw bytes before amq-protocol parses them.
//!
//! amq-protocol-types 10.6.3 parses tables and arrays recursively with no depth limit
//! (`parsing.rs:246-290`: `parse_field_array` and `parse_field_table` call `parse_value`, which
//! calls them again through `parse_raw_value`, `parsing.rs:124,126`). One nesting level costs
//! 5 bytes on the wire (`A` + a 4-byte length), so a 128 KiB frame holds ~26,000 levels: far
//! more than a thread's stack. A stack overflow aborts the process (`catch_unwind` cannot stop
//! it), and the message, unacknowledged, comes back after every restart. The values parsed
//! are also dropped, printed and written recursively, by amq-protocol and by Rust's own drop
//! glue, so the depth must be bounded before a value exists at all.
//!
//! [`field_table`] walks a table with an explicit stack (no recursion, no allocation besides
//! the stack itself, which [`MAX_DEPTH`] bounds) and refuses it when it nests deeper than
//! [`MAX_DEPTH`] or holds more than [`MAX_VALUES`] values. What it admits parses with bounded
//! recursion and bounded memory. It checks only what those bounds need: the lengths and type
//! tags; everything else (UTF-8 of keys, say) is amq-protocol's to refuse.

/// How deep tables and arrays may nest in a message's headers (the headers table itself is
/// level 1). RabbitMQ's own headers (`x-death`: an array of tables of arrays) need 3; 32 leaves
/// room for any application, and keeps the recursion a few dozen frames deep.
pub const MAX_DEPTH: usize = 32;

/// How many values (entries of every table and array, at any depth) one table may hold. The
/// frame size bounds the bytes; this bounds what they expand to (a 1-byte `V` value becomes a
/// 32-byte `AMQPValue`, so a 128 KiB frame could otherwise become ~4 MiB of values).
pub const MAX_VALUES: usize = 8192;

/// Why a table was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// More than [`MAX_VALUES`] values.
    TooMany,
    /// A length runs past its container, or an unknown type tag.
    Malformed,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::TooDeep => write!(
                f,
                "its headers nest tables/arrays deeper than {MAX_DEPTH} levels"
            ),
            Refused::TooMany => write!(f, "its headers hold more than {MAX_VALUES} values"),
            Refused::Malformed => write!(f, "its headers are not a well-formed field table"),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    usize::try_from(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])).ok()
}

/// Size of a fixed-width value of type `tag` (amq-protocol's `AMQPType::from_id`, which
/// follows RabbitMQ: `s` is a short int, `l` and `L` are long long ints); `None` for the
/// variable-length and container types and for unknown tags.
fn fixed_size(tag: u8) -> Option<usize> {
    Some(match tag {
        b'V' => 0,
        b't' | b'b' | b'B' => 1,
        b's' | b'U' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'D' => 5,
        b'l' | b'L' | b'd' | b'T' => 8,
        _ => return None,
    })
}

/// Checks the field table at the start of `b` (its 4-byte length, then its entries). Returns
/// the table's size in bytes (length included) when it is within the bounds.
pub fn field_table(b: &[u8]) -> Result<usize, Refused> {
    let len = u32_at(b, 0).ok_or(Refused::Malformed)?;
    let end = len.checked_add(4).ok_or(Refused::Malformed)?;
    if end > b.len() {
        return Err(Refused::Malformed);
    }
    // One entry per open container: (where it ends, whether it is a table: keyed entries).
    let mut open: Vec<(usize, bool)> = Vec::with_capacity(8);
    open.push((end, true));
    let mut at = 4;
    let mut values = 0usize;
    while let Some(&(until, table)) = open.last() {
        if at == until {
            open.pop();
            continue;
        }
        if table {
            // The key: a short string.
            let n = usize::from(*b.get(at).ok_or(Refused::Malformed)?);
            at += 1 + n;
            if at >= until {
                // A key must be followed by at least its value's type tag.
                return Err(Refused::Malformed);
            }
        }
        let tag = *b.get(at).ok_or(Refused::Malformed)?;
        at += 1;
        values += 1;
        if values > MAX_VALUES {
            return Err(Refused::TooMany);
        }
        match tag {
            b'A' | b'F' => {
                let n = u32_at(b, at).ok_or(Refused::Malformed)?;
                let start = at + 4;
                let stop = start.checked_add(n).ok_or(Refused::Malformed)?;
                if stop > until {
                    return Err(Refused::Malformed);
                }
                if open.len() >= MAX_DEPTH {
                    return Err(Refused::TooDeep);
                }
                open.push((stop, tag == b'F'));
                at = start;
            }
            b'S' | b'x' => {
                let n = u32_at(b, at).ok_or(Refused::Malformed)?;
                at = (at + 4).checked_add(n).ok_or(Refused::Malformed)?;
            }
            other => at += fixed_size(other).ok_or(Refused::Malformed)?,
        }
        if at > until {
            return Err(Refused::Malformed);
        }
    }
    Ok(end)
}

/// Checks the `headers` table of a content header frame's payload (class id, weight, body
/// size, property flags, property list). `Ok` when the payload has no headers, or headers
/// within the bounds; a payload too short to reach the table is left to amq-protocol to
/// refuse.
pub fn content_header(payload: &[u8]) -> Result<(), Refused> {
    // class-id (2), weight (2), body-size (8), then the first 16 property flags.
    let Some(flags) = payload.get(12..14) else {
        return Ok(());
    };
    let flags = u16::from_be_bytes([flags[0], flags[1]]);
    let mut at = 14;
    // content-type, content-encoding: short strings, before the headers (bit 13).
    for bit in [15, 14] {
        if flags & (1 << bit) != 0 {
            let Some(&n) = payload.get(at) else {
                return Ok(());
            };
            at += 1 + usize::from(n);
        }
    }
    if flags & (1 << 13) == 0 {
        return Ok(());
    }
    match payload.get(at..) {
        Some(table) => field_table(table).map(drop),
        None => Ok(()),
    }
}

/// Checks the tables of a method frame's payload (class id, method id, arguments) before
/// amq-protocol parses it. A broker sends a client only one method with a table:
/// `connection.start` (server properties); the methods that carry tables the other way
/// (`*.declare`, `*.bind`, `basic.consume`, `connection.start-ok`…) are refused outright,
/// since a client never receives them and their tables are as deep as the sender likes.
pub fn method(payload: &[u8]) -> Result<(), Refused> {
    let Some(ids) = payload.get(..4) else {
        return Ok(());
    };
    let class = u16::from_be_bytes([ids[0], ids[1]]);
    let id = u16::from_be_bytes([ids[2], ids[3]]);
    match (class, id) {
        // connection.start: version-major, version-minor, server-properties.
        (10, 10) => match payload.get(6..) {
            Some(table) => field_table(table).map(drop),
            None => Ok(()),
        },
        // connection.start-ok, exchange.declare/bind/unbind, queue.declare/bind/unbind,
        // basic.consume: client-to-server methods with a table.
        (10, 11) | (40, 10) | (40, 30) | (40, 40) | (50, 10) | (50, 20) | (50, 50) | (60, 20) => {
            Err(Refused::Malformed)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table holding `x` = an array nested `depth` deep.
    pub(crate) fn nested(depth: usize, tag: u8) -> Vec<u8> {
        let mut value = Vec::with_capacity(5 * depth);
        for level in 0..depth {
            value.push(tag);
            let inner = 5 * (depth - 1 - level);
            value.extend_from_slice(&u32::try_from(inner).unwrap().to_be_bytes());
        }
        if tag == b'F' && depth > 0 {
            // Tables hold keyed entries: rebuild with a key before every inner table.
            let mut value = Vec::new();
            for level in 0..depth {
                if level > 0 {
                    value.extend_from_slice(&[1, b'k']);
                }
                value.push(b'F');
                let inner = 7 * (depth - 1 - level);
                value.extend_from_slice(&u32::try_from(inner).unwrap().to_be_bytes());
            }
            return table(&[(b"x", &value)]);
        }
        table(&[(b"x", &value)])
    }

    pub(crate) fn table(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, v) in entries {
            body.push(u8::try_from(k.len()).unwrap());
            body.extend_from_slice(k);
            body.extend_from_slice(v);
        }
        let mut t = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        t.extend(body);
        t
    }

    fn parses(b: &[u8]) -> bool {
        amq_protocol::types::parsing::parse_field_table(b).is_ok()
    }

    #[test]
    fn depth_is_bounded_for_arrays_and_tables() {
        for tag in [b'A', b'F'] {
            // The headers table is level 1: MAX_DEPTH - 1 nested containers fit.
            let ok = nested(MAX_DEPTH - 1, tag);
            assert_eq!(field_table(&ok), Ok(ok.len()), "{}", tag as char);
            assert!(parses(&ok));
            let deep = nested(MAX_DEPTH, tag);
            assert!(parses(&deep), "amq-protocol takes it; we do not");
            assert_eq!(field_table(&deep), Err(Refused::TooDeep));
            // The review's message: 20,000 levels, refused without recursing.
            assert_eq!(field_table(&nested(20_000, tag)), Err(Refused::TooDeep));
        }
    }

    #[test]
    fn every_value_type_is_stepped_over_like_amq_protocol_reads_it() {
        use amq_protocol::types::generation::gen_field_table;
        use amq_protocol::types::*;
        let mut inner = FieldTable::default();
        inner.insert("n".into(), AMQPValue::LongLongInt(-1));
        let mut t = FieldTable::default();
        let values = [
            AMQPValue::Boolean(true),
            AMQPValue::ShortShortInt(-1),
            AMQPValue::ShortShortUInt(1),
            AMQPValue::ShortInt(-2),
            AMQPValue::ShortUInt(2),
            AMQPValue::LongInt(-3),
            AMQPValue::LongUInt(3),
            AMQPValue::LongLongInt(-4),
            AMQPValue::Float(1.5),
            AMQPValue::Double(2.5),
            AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 7 }),
            AMQPValue::LongString("hello".into()),
            AMQPValue::FieldArray(vec![AMQPValue::Void, AMQPValue::Boolean(false)].into()),
            AMQPValue::Timestamp(1_700_000_000),
            AMQPValue::FieldTable(inner),
            AMQPValue::ByteArray(vec![1u8, 2, 3].into()),
            AMQPValue::Void,
        ];
        for (i, v) in values.into_iter().enumerate() {
            t.insert(format!("k{i}").into(), v);
        }
        let bytes = gen_field_table(&t)(Vec::new().into())
            .unwrap()
            .into_inner()
            .0;
        assert_eq!(field_table(&bytes), Ok(bytes.len()));
        assert!(parses(&bytes));
        // Cut anywhere: never admitted as longer than it is, never a panic.
        for cut in 0..bytes.len() {
            let _ = field_table(&bytes[..cut]);
        }
    }

    #[test]
    fn value_count_is_bounded() {
        let many = vec![b'V'; MAX_VALUES];
        let mut arr = vec![b'A'];
        arr.extend_from_slice(&u32::try_from(many.len()).unwrap().to_be_bytes());
        arr.extend_from_slice(&many);
        // The array itself is one value too.
        assert_eq!(field_table(&table(&[(b"x", &arr)])), Err(Refused::TooMany));
        let mut arr = vec![b'A'];
        arr.extend_from_slice(&u32::try_from(MAX_VALUES - 1).unwrap().to_be_bytes());
        arr.extend_from_slice(&many[1..]);
        assert!(field_table(&table(&[(b"x", &arr)])).is_ok());
    }

    #[test]
    fn lengths_past_their_container_are_malformed() {
        // An inner array claiming more than its table holds.
        let mut v = vec![b'A'];
        v.extend_from_slice(&100u32.to_be_bytes());
        assert_eq!(field_table(&table(&[(b"x", &v)])), Err(Refused::Malformed));
        // A long string running past the end.
        let mut v = vec![b'S'];
        v.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(field_table(&table(&[(b"x", &v)])), Err(Refused::Malformed));
        // Unknown tag; a key without a value.
        assert_eq!(
            field_table(&table(&[(b"x", b"?")])),
            Err(Refused::Malformed)
        );
        assert_eq!(field_table(&table(&[(b"x", b"")])), Err(Refused::Malformed));
        assert_eq!(field_table(&[0, 0, 0, 9]), Err(Refused::Malformed));
        assert_eq!(field_table(&[0, 0]), Err(Refused::Malformed));
        assert_eq!(field_table(&[0, 0, 0, 0]), Ok(4));
    }

    #[test]
    fn the_headers_are_found_after_content_type_and_encoding() {
        let deep = nested(100, b'A');
        let mut p = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        p.extend_from_slice(&(0b1110_0000_0000_0000u16).to_be_bytes());
        p.extend_from_slice(&[4, b't', b'e', b'x', b't', 0]);
        let mut ok = p.clone();
        ok.extend(nested(3, b'A'));
        assert_eq!(content_header(&ok), Ok(()));
        p.extend(deep);
        assert_eq!(content_header(&p), Err(Refused::TooDeep));
        // No headers flag: nothing to check.
        assert_eq!(
            content_header(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]),
            Ok(())
        );
        assert_eq!(content_header(&[0, 60]), Ok(()));
    }

    #[test]
    fn methods_with_tables() {
        let mut start = vec![0, 10, 0, 10, 0, 9];
        start.extend(nested(2, b'F'));
        assert_eq!(method(&start), Ok(()));
        let mut start = vec![0, 10, 0, 10, 0, 9];
        start.extend(nested(5_000, b'F'));
        assert_eq!(method(&start), Err(Refused::TooDeep));
        assert_eq!(method(&[0, 50, 0, 10, 0, 0]), Err(Refused::Malformed));
        assert_eq!(method(&[0, 60, 0, 80]), Ok(()));
    }

    /// Runs amq-protocol's parsers on what the pre-scan admits (never on what it refuses: that
    /// may nest deep enough to overflow the stack, which is the point of the pre-scan).
    fn check(input: &[u8]) -> Result<(), String> {
        if let Ok(n) = field_table(input) {
            let table = &input[..n];
            match amq_protocol::types::parsing::parse_field_table(table) {
                // Admitted and parsed: all of it, nothing more.
                Ok((rest, _)) if !rest.is_empty() => {
                    return Err(format!(
                        "the scan admitted {n} bytes, the parser took fewer"
                    ));
                }
                // Keys that are not UTF-8 and the like: amq-protocol's to refuse.
                Ok(_) | Err(_) => {}
            }
        }
        // The same bytes as a content header's property list (flags: headers only).
        let mut header = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x20, 0];
        header.extend_from_slice(input);
        if content_header(&header).is_ok() {
            let _ = amq_protocol::frame::parsing::parse_content_header(&header[..]);
        }
        // And as connection.start's server properties.
        let mut start = vec![0, 10, 0, 10, 0, 9];
        start.extend_from_slice(input);
        if method(&start).is_ok() {
            let _ = amq_protocol::protocol::parse_class(&start[..]);
        }
        Ok(())
    }

    /// Fuzz target: the depth/size pre-scan, and amq-protocol's table parser on whatever the
    /// pre-scan admits: no panic, no stack overflow. The seeds include tables nested 20,000
    /// deep (arrays and tables) and just at and over the bound.
    #[test]
    fn fuzz_amqp_field_table() {
        let seeds = [
            nested(MAX_DEPTH - 1, b'A'),
            nested(MAX_DEPTH, b'A'),
            nested(MAX_DEPTH, b'F'),
            nested(20_000, b'A'),
            table(&[
                (b"a", b"S\0\0\0\x02hi"),
                (b"b", b"t\x01"),
                (b"c", b"l\0\0\0\0\0\0\0\x05"),
            ]),
        ];
        let seed_refs: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
        meshgate_fuzz::run(
            "fuzz_amqp_field_table",
            meshgate_fuzz::bytes("fuzz_amqp_field_table", &seed_refs, 256),
            |b| Some(b.to_vec()),
            |input| check(&input),
        );
    }

    /// Any table amq-protocol writes (nested up to the bound) is admitted, with its exact size.
    #[test]
    fn every_table_amq_protocol_writes_is_admitted() {
        use amq_protocol::types::generation::gen_field_table;
        use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};
        use meshgate_fuzz::proptest;
        use meshgate_fuzz::proptest::prelude::*;
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<u16>().prop_map(AMQPValue::ShortUInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            ".{0,8}".prop_map(|s: String| AMQPValue::LongString(LongString::from(s))),
            proptest::collection::vec(any::<u8>(), 0..8)
                .prop_map(|b| AMQPValue::ByteArray(b.into())),
            Just(AMQPValue::Void),
        ];
        let value = leaf.prop_recursive(6, 64, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
                proptest::collection::vec(("[a-z]{1,4}", inner), 0..4).prop_map(|kv| {
                    let mut t = FieldTable::default();
                    for (k, v) in kv {
                        t.insert(k.into(), v);
                    }
                    AMQPValue::FieldTable(t)
                }),
            ]
        });
        let tables = proptest::collection::vec(("[a-z]{1,6}", value), 0..6).prop_map(|kv| {
            let mut t = FieldTable::default();
            for (k, v) in kv {
                t.insert(k.into(), v);
            }
            t
        });
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(&tables, |t| {
                let bytes = gen_field_table(&t)(Vec::new().into())
                    .map_err(|e| TestCaseError::fail(format!("{e:?}")))?
                    .into_inner()
                    .0;
                prop_assert_eq!(field_table(&bytes), Ok(bytes.len()));
                Ok(())
            })
            .unwrap();
    }
}
