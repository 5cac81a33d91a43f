//! Fuzz target `fuzz_http_binary_headers`: the HTTP binding's decoder (binary mode: `ce-`
//! headers, RFC 7230 quoted-string then percent-decoding, core/src/header.rs; structured and
//! batch modes by Content-Type) on random and mutated requests: no panic, every refusal a 4xx.
//! And the encoders: `decode_header_value(percent_encode_header(s)) == s` for any string,
//! `decode(encode_binary(e)) == e` for generated binary-mode events.
//!
//! An input is a request written as text: `name: value` lines, an empty line, the body.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use meshgate_core::event::{Data, Event, ExtensionValue};
use meshgate_fuzz::proptest::prelude::*;
use meshgate_http::binding::{self, Decoded, decode_header_value, percent_encode_header};

const SEEDS: &[&[u8]] = &[
    b"ce-specversion: 1.0\nce-id: A%C3%A9 1\nce-source: /s\nce-type: t\nce-subject: \"a\\\"b%2F\"\ncontent-type: text/plain\n\nbody",
    b"ce-specversion: 1.0\nce-id: 1\nce-source: /s\nce-type: t\nce-myext: %00%ZZ\nce-time: 2026-12-05T10:00:00Z\n\n",
    b"content-type: application/cloudevents+json; charset=utf-8\n\n{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\"}",
    b"content-type: application/cloudevents-batch+json\n\n[{},{\"specversion\":\"1.0\"}]",
    b"ce-specversion: 1.0\nce-datacontenttype: x\n\n",
];

fn request(input: &[u8]) -> (HeaderMap, Bytes) {
    let split = input
        .windows(2)
        .position(|w| w == b"\n\n")
        .map_or((input, &[][..]), |at| (&input[..at], &input[at + 2..]));
    let mut headers = HeaderMap::new();
    for line in split.0.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let value = line[colon + 1..]
            .strip_prefix(b" ")
            .unwrap_or(&line[colon + 1..]);
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    (headers, Bytes::copy_from_slice(split.1))
}

fn check(input: Vec<u8>) -> Result<(), String> {
    let (headers, body) = request(&input);
    if let Err(e) = binding::decode(&headers, body, 4) {
        let status = e.status();
        if !status.is_client_error() {
            return Err(format!("refusal {e} has status {status}"));
        }
    }
    // Each header value on its own, as the NATS binding uses the same decoder.
    for value in headers.values() {
        let _ = decode_header_value(value.as_bytes());
    }
    let _ = decode_header_value(&input);
    Ok(())
}

#[test]
fn fuzz_http_binary_headers() {
    meshgate_fuzz::run(
        "fuzz_http_binary_headers",
        meshgate_fuzz::bytes("fuzz_http_binary_headers", SEEDS, 256),
        |b| Some(b.to_vec()),
        check,
    );
}

#[test]
fn fuzz_http_header_value_round_trip() {
    meshgate_fuzz::run(
        "fuzz_http_header_value_round_trip",
        any::<String>(),
        |b| String::from_utf8(b.to_vec()).ok(),
        |s| {
            let encoded = percent_encode_header(&s);
            if HeaderValue::from_str(&encoded).is_err() {
                return Err(format!("{encoded:?} is not a valid header value"));
            }
            match decode_header_value(encoded.as_bytes()) {
                Ok(back) if back == s => Ok(()),
                other => Err(format!("{s:?} -> {encoded:?} -> {other:?}")),
            }
        },
    );
}

/// Events that binary mode carries exactly: string extensions, bytes as data with a type.
fn events() -> impl Strategy<Value = Event> {
    (
        (
            "[ -~é€😀\"%]{1,16}",
            "/[a-z0-9/._~%-]{0,15}",
            "[ -~é]{1,16}",
        ),
        proptest::option::of("[ -~é€😀\"%]{0,24}"),
        proptest::collection::btree_map("[a-z0-9]{1,12}", "[ -~é€\"%]{0,16}", 0..4),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 1..32)),
    )
        .prop_filter_map(
            "not a valid event",
            |((id, source, ty), subject, extensions, data)| {
                let mut e = Event::new(id, source, ty).ok()?;
                e.set_subject(subject).ok()?;
                for (name, value) in extensions {
                    e.set_extension(&name, ExtensionValue::String(value)).ok()?;
                }
                if let Some(bytes) = data {
                    e.set_datacontenttype(Some("application/octet-stream".into()))
                        .ok()?;
                    e.set_data(Some(Data::Binary(bytes.into())));
                }
                Some(e)
            },
        )
}

#[test]
fn fuzz_http_binary_round_trip() {
    meshgate_fuzz::run(
        "fuzz_http_binary_round_trip",
        events(),
        |_| None,
        |event| {
            let (headers, body) = binding::encode_binary(&event);
            match binding::decode(&headers, body, 1) {
                Ok(Decoded::Binary(back)) if back == event => Ok(()),
                other => Err(format!("{event:?} -> {headers:?} -> {other:?}")),
            }
        },
    );
}
