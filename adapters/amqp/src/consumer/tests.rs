use amq_protocol::frame::AMQPContentHeader;
use amq_protocol::protocol::queue;

use super::*;

/// `amqp.max_body_size` in these tests.
const MAX_BODY: u64 = 1 << 20;

/// The next complete message, failing the test on a refusal.
fn message(c: &mut Connection) -> Option<Delivery> {
    match c.next_delivery().unwrap()? {
        Incoming::Message(d) => Some(d),
        Incoming::Refused { tag, reason, .. } => panic!("delivery {tag} refused: {reason}"),
    }
}

fn encode(frames: &[AMQPFrame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out = gen_frame(f)(out.into()).unwrap().into_inner().0;
    }
    out
}

fn deliver(tag: u64, key: &str) -> AMQPFrame {
    AMQPFrame::Method(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "c".into(),
            delivery_tag: tag,
            redelivered: false,
            exchange: "ex".into(),
            routing_key: key.into(),
        })),
    )
}

fn header(size: u64) -> AMQPFrame {
    AMQPFrame::Header(
        CHANNEL,
        AMQPContentHeader {
            class_id: 60,
            body_size: size,
            properties: BasicProperties::default().with_content_type("text/plain".into()),
        },
    )
}

fn body(data: &[u8]) -> AMQPFrame {
    AMQPFrame::Body(CHANNEL, data.to_vec())
}

/// A connection over an in-memory pipe; the other end is returned to play the broker.
fn connection() -> (Connection, tokio::io::DuplexStream) {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let c = Connection {
        io: Box::new(ours),
        read: BytesMut::new(),
        write: Vec::new(),
        frame_max: FRAME_MAX,
        heartbeat: Duration::from_secs(10),
        assembling: None,
        heard: false,
        spoke: false,
        silent_ticks: 0,
        max_body: MAX_BODY,
        logged_in: true,
    };
    (c, theirs)
}

/// Every delivery in `bytes`, fed to the connection `step` bytes at a time.
fn deliveries_fed_in_steps(bytes: &[u8], step: usize) -> Vec<Delivery> {
    let (mut c, _peer) = connection();
    let mut out = Vec::new();
    for chunk in bytes.chunks(step) {
        c.read.extend_from_slice(chunk);
        while let Some(d) = message(&mut c) {
            out.push(d);
        }
    }
    assert!(c.read.is_empty(), "every byte consumed");
    out
}

#[test]
fn deliveries_are_assembled_however_the_bytes_arrive() {
    let big = vec![7u8; COPY_BODY_BELOW + 100];
    let bytes = encode(&[
        deliver(1, "a.b"),
        header(5),
        body(b"hello"),
        AMQPFrame::Heartbeat,
        // An empty body has no body frame.
        deliver(2, "empty"),
        header(0),
        // A body over three frames, one of them shared with the read buffer.
        deliver(3, "multi"),
        header(6 + big.len() as u64),
        body(b"abc"),
        body(&big),
        body(b"def"),
        deliver(4, "big"),
        header(big.len() as u64),
        body(&big),
    ]);
    for step in [1, 2, 3, 7, 8, 13, 100, bytes.len()] {
        let got = deliveries_fed_in_steps(&bytes, step);
        let summary: Vec<(u64, &str, usize)> = got
            .iter()
            .map(|d| {
                (
                    d.tag,
                    d.routing_key.as_ref().unwrap().as_str(),
                    d.body.len(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (1, "a.b", 5),
                (2, "empty", 0),
                (3, "multi", 6 + big.len()),
                (4, "big", big.len())
            ],
            "fed {step} bytes at a time"
        );
        assert_eq!(&got[0].body[..], b"hello");
        assert_eq!(
            got[0]
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.as_str()),
            Some("text/plain")
        );
        assert_eq!(&got[2].body[..3], b"abc");
        assert_eq!(&got[2].body[3 + big.len()..], b"def");
        assert_eq!(&got[3].body[..], &big[..]);
    }
}

#[test]
fn broken_frames_end_the_connection_with_a_reason() {
    let (mut c, _peer) = connection();
    // Larger than frame_max.
    c.read.extend_from_slice(&[FRAME_BODY, 0, 1, 0, 0x10, 0, 0]);
    let e = c.next_delivery().unwrap_err();
    assert!(e.to_string().contains("frame_max"), "{e}");
    assert_eq!(e.kind(), "protocol");

    let (mut c, _peer) = connection();
    let mut bytes = encode(&[deliver(1, "k")]);
    *bytes.last_mut().unwrap() = 0;
    c.read.extend_from_slice(&bytes);
    assert!(
        c.next_delivery()
            .unwrap_err()
            .to_string()
            .contains("frame end")
    );

    let (mut c, _peer) = connection();
    c.read.extend_from_slice(&[9, 0, 0, 0, 0, 0, 0, FRAME_END]);
    assert!(
        c.next_delivery()
            .unwrap_err()
            .to_string()
            .contains("unknown frame type 9")
    );

    // A method frame whose payload is not a method.
    let (mut c, _peer) = connection();
    c.read
        .extend_from_slice(&[FRAME_METHOD, 0, 1, 0, 0, 0, 2, 0xff, 0xff, FRAME_END]);
    assert!(
        c.next_delivery()
            .unwrap_err()
            .to_string()
            .contains("malformed method")
    );

    // More body than the header announced.
    let (mut c, _peer) = connection();
    c.read
        .extend_from_slice(&encode(&[deliver(1, "k"), header(2), body(b"abc")]));
    assert!(
        c.next_delivery()
            .unwrap_err()
            .to_string()
            .contains("longer")
    );

    // A header before any delivery.
    let (mut c, _peer) = connection();
    c.read.extend_from_slice(&encode(&[header(1)]));
    assert!(
        c.next_delivery()
            .unwrap_err()
            .to_string()
            .contains("unexpected frame")
    );
}

#[test]
fn the_brokers_close_is_answered_and_reported() {
    let (mut c, _peer) = connection();
    c.read.extend_from_slice(&encode(&[AMQPFrame::Method(
        CHANNEL,
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 404,
            reply_text: "NOT_FOUND - no queue 'q' in vhost '/'".into(),
            class_id: 50,
            method_id: 10,
        })),
    )]));
    let e = c.next_delivery().unwrap_err();
    assert!(e.to_string().contains("NOT_FOUND - no queue 'q'"), "{e}");
    assert!(e.to_string().contains("reply code 404"), "{e}");
    assert_eq!(
        e.kind(),
        "refused",
        "a missing queue is a refusal, not a login failure"
    );
    let close_ok = encode(&[AMQPFrame::Method(
        CHANNEL,
        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
    )]);
    assert_eq!(c.write, close_ok, "channel.close-ok queued");

    let (mut c, _peer) = connection();
    c.read.extend_from_slice(&encode(&[AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 320,
            reply_text: "CONNECTION_FORCED - Closed via management plugin".into(),
            class_id: 0,
            method_id: 0,
        })),
    )]));
    let e = c.next_delivery().unwrap_err();
    assert!(e.to_string().contains("CONNECTION_FORCED"), "{e}");
    let close_ok = encode(&[AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
    )]);
    assert_eq!(c.write, close_ok, "connection.close-ok queued");

    // The broker cancels the consumer (its queue was deleted).
    let (mut c, _peer) = connection();
    c.read.extend_from_slice(&encode(&[AMQPFrame::Method(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: "c".into(),
            nowait: true,
        })),
    )]));
    assert!(
        c.next_delivery()
            .unwrap_err()
            .to_string()
            .contains("cancelled")
    );
}

#[test]
fn heartbeats_are_sent_when_quiet_and_a_silent_broker_is_given_up() {
    let (mut c, _peer) = connection();
    assert_eq!(c.tick_every(), Some(Duration::from_secs(5)));
    // Nothing sent since the last tick: a heartbeat is queued.
    c.tick().unwrap();
    assert_eq!(c.write, encode(&[AMQPFrame::Heartbeat]));
    c.write.clear();
    // Something sent: no heartbeat needed.
    c.spoke = true;
    c.heard = true;
    c.tick().unwrap();
    assert!(c.write.is_empty());
    // Silence from the broker: three ticks are tolerated, the fourth (two intervals) is not.
    for _ in 0..3 {
        c.tick().unwrap();
    }
    let e = c.tick().unwrap_err();
    assert!(e.to_string().contains("two heartbeat intervals"), "{e}");
    // Hearing anything resets the count.
    let (mut c, _peer) = connection();
    for _ in 0..3 {
        c.tick().unwrap();
    }
    c.heard = true;
    c.tick().unwrap();
    for _ in 0..3 {
        c.tick().unwrap();
    }
}

#[tokio::test]
async fn a_call_returns_the_reply_and_leaves_later_deliveries_in_the_buffer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut c, mut peer) = connection();
    let broker = tokio::spawn(async move {
        let mut request = [0u8; 256];
        let n = peer.read(&mut request).await.unwrap();
        // A client-to-server method: parsed here as the broker would (next_frame refuses
        // methods a client never receives).
        let (_, frame) = amq_protocol::frame::parsing::parse_frame(&request[..n]).unwrap();
        assert!(matches!(
            frame,
            AMQPFrame::Method(
                CHANNEL,
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    passive: true,
                    ..
                }))
            )
        ));
        // The reply and a delivery in one write.
        let reply = encode(&[
            AMQPFrame::Heartbeat,
            AMQPFrame::Method(
                CHANNEL,
                AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                    queue: "q".into(),
                    message_count: 1,
                    consumer_count: 0,
                })),
            ),
            deliver(9, "k"),
            header(1),
            body(b"x"),
        ]);
        peer.write_all(&reply).await.unwrap();
        peer
    });
    let reply = c
        .call(AMQPClass::Queue(queue::AMQPMethod::Declare(
            queue::Declare {
                queue: "q".into(),
                passive: true,
                durable: false,
                exclusive: false,
                auto_delete: false,
                nowait: false,
                arguments: FieldTable::default(),
            },
        )))
        .await
        .unwrap();
    assert!(matches!(
        reply,
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))
    ));
    let d = message(&mut c).expect("the delivery stayed buffered");
    assert_eq!((d.tag, &d.body[..]), (9, &b"x"[..]));
    drop(broker.await.unwrap());
}

#[test]
fn deliver_frames_are_read_by_hand_like_amq_protocol_writes_them() {
    for key in ["", "a", "orders.eu.created", &"k".repeat(255)] {
        let mut buf = BytesMut::from(&encode(&[deliver(u64::MAX - 3, key)])[..]);
        assert_eq!(
            next_frame(&mut buf, FRAME_MAX).unwrap(),
            Some(Frame::Deliver(CHANNEL, u64::MAX - 3, Some(key.into())))
        );
    }
    // Cut short or with bytes left over: refused, never a panic.
    let payload = &encode(&[deliver(7, "key")])[FRAME_HEAD..];
    let args = &payload[4..payload.len() - 1];
    for end in 0..args.len() {
        assert_eq!(parse_deliver(&args[..end]), None, "cut at {end}");
    }
    let mut longer = args.to_vec();
    longer.push(0);
    assert_eq!(parse_deliver(&longer), None);
    // A routing key that is not UTF-8: the delivery is read (the source rejects it).
    let mut bad = vec![1, b'c'];
    bad.extend_from_slice(&7u64.to_be_bytes());
    bad.extend_from_slice(&[0, 0, 255]);
    bad.extend_from_slice(&[0xff; 255]);
    assert_eq!(parse_deliver(&bad), Some((7, None)));
}

#[test]
fn a_body_of_many_tiny_frames_is_joined_in_one_buffer() {
    let mut frames = vec![deliver(1, "k"), header(1000)];
    frames.extend((0..1000).map(|i| body(&[(i % 251) as u8])));
    let got = deliveries_fed_in_steps(&encode(&frames), 4096);
    assert_eq!(got.len(), 1);
    let want: Vec<u8> = (0..1000).map(|i| (i % 251) as u8).collect();
    assert_eq!(&got[0].body[..], &want[..]);
}

/// A content header frame with `properties` given raw (flags and property list).
fn raw_header(size: u64, properties: &[u8]) -> Vec<u8> {
    let mut p = 60u16.to_be_bytes().to_vec();
    p.extend_from_slice(&0u16.to_be_bytes());
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(properties);
    let mut f = vec![FRAME_HEADER, 0, 1];
    f.extend_from_slice(&u32::try_from(p.len()).unwrap().to_be_bytes());
    f.extend(p);
    f.push(FRAME_END);
    f
}

/// Properties with only `headers`, holding `x` = an array nested `depth` deep.
pub(crate) fn nested_headers(depth: usize) -> Vec<u8> {
    let mut value = Vec::with_capacity(5 * depth);
    for level in 0..depth {
        value.push(b'A');
        value.extend_from_slice(
            &u32::try_from(5 * (depth - 1 - level))
                .unwrap()
                .to_be_bytes(),
        );
    }
    let mut p = (1u16 << 13).to_be_bytes().to_vec();
    p.extend_from_slice(&u32::try_from(value.len() + 2).unwrap().to_be_bytes());
    p.extend_from_slice(&[1, b'x']);
    p.extend(value);
    p
}

#[test]
fn deeply_nested_headers_are_refused_their_body_skipped_and_the_next_message_read() {
    for step in [1, 7, 4096, usize::MAX] {
        let (mut c, _peer) = connection();
        let mut bytes = encode(&[deliver(1, "k")]);
        // The review's message: 20,000 levels (a stack overflow in amq-protocol's parser).
        bytes.extend(raw_header(5, &nested_headers(20_000)));
        bytes.extend(encode(&[body(b"ab"), body(b"cde")]));
        // Malformed: a table length past the frame. Refused as well, not a connection error.
        bytes.extend(encode(&[deliver(2, "k")]));
        bytes.extend(raw_header(0, &[0x20, 0, 0, 0, 0, 9]));
        bytes.extend(encode(&[deliver(3, "k"), header(3), body(b"xyz")]));
        let mut got = Vec::new();
        for chunk in bytes.chunks(step.min(bytes.len())) {
            c.read.extend_from_slice(chunk);
            while let Some(i) = c.next_delivery().unwrap() {
                got.push(match i {
                    Incoming::Message(d) => format!("{} {:?}", d.tag, d.body),
                    Incoming::Refused { tag, kind, reason } => {
                        format!("{tag} {} {reason}", kind.drop_reason())
                    }
                });
            }
        }
        assert_eq!(
            got,
            [
                "1 bad_message its headers nest tables/arrays deeper than 32 levels",
                "2 bad_message its headers are not a well-formed field table",
                "3 b\"xyz\"",
            ],
            "step {step}"
        );
        assert!(c.read.is_empty() && c.assembling.is_none());
    }
}

#[test]
fn bodies_over_max_body_size_are_refused_before_they_are_read() {
    let (mut c, _peer) = connection();
    c.max_body = 4;
    let mut bytes = encode(&[deliver(1, "k"), header(5)]);
    c.read.extend_from_slice(&bytes);
    // Refused on the header alone: nothing of the body has arrived.
    match c.next_delivery().unwrap() {
        Some(Incoming::Refused {
            tag: 1,
            kind: Refusal::TooLarge,
            reason,
        }) => {
            assert!(reason.contains("amqp.max_body_size"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    bytes.clear();
    bytes.extend(encode(&[
        body(b"abcd"),
        body(b"e"),
        deliver(2, "k"),
        header(4),
        body(b"wxyz"),
    ]));
    c.read.extend_from_slice(&bytes);
    let d = message(&mut c).unwrap();
    assert_eq!((d.tag, &d.body[..]), (2, &b"wxyz"[..]));
    // A refused body longer than announced still ends the connection.
    let (mut c, _peer) = connection();
    c.max_body = 1;
    c.read
        .extend_from_slice(&encode(&[deliver(1, "k"), header(2), body(b"abc")]));
    assert!(matches!(
        c.next_delivery(),
        Ok(Some(Incoming::Refused { .. }))
    ));
    assert!(
        c.next_delivery()
            .unwrap_err()
            .to_string()
            .contains("longer")
    );
    // A refused empty message: the next one follows at once.
    let (mut c, _peer) = connection();
    c.read.extend_from_slice(&encode(&[deliver(1, "k")]));
    c.read.extend(raw_header(0, &nested_headers(100)));
    c.read
        .extend_from_slice(&encode(&[deliver(2, "k"), header(1), body(b"z")]));
    assert!(matches!(
        c.next_delivery(),
        Ok(Some(Incoming::Refused { tag: 1, .. }))
    ));
    assert_eq!(message(&mut c).unwrap().tag, 2);
}

#[test]
fn methods_with_deep_tables_end_the_connection_without_recursing() {
    let mut payload = vec![0, 10, 0, 10, 0, 9];
    let deep = nested_headers(20_000);
    payload.extend_from_slice(&deep[2..]); // the table alone, without the flags
    let mut f = vec![FRAME_METHOD, 0, 0];
    f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    f.extend(payload);
    f.push(FRAME_END);
    let mut buf = BytesMut::from(&f[..]);
    let e = next_frame(&mut buf, FRAME_MAX).unwrap_err();
    assert!(e.to_string().contains("deeper than 32"), "{e}");
}

/// Seeds for the frame cutter: a delivery in three frames, one with a nested header, a
/// refused oversize one, a heartbeat, connection.start with a table, a broker close.
fn frame_seeds() -> Vec<Vec<u8>> {
    let mut delivery = encode(&[
        deliver(7, "orders.eu"),
        header(5),
        body(b"ab"),
        body(b"cde"),
    ]);
    delivery.extend(encode(&[AMQPFrame::Heartbeat]));
    let mut nested = encode(&[deliver(8, "k")]);
    nested.extend(raw_header(1, &nested_headers(40)));
    nested.extend(encode(&[body(b"z")]));
    let big = encode(&[deliver(9, "k"), header(MAX_BODY + 1), body(b"x")]);
    let mut start = vec![0, 10, 0, 10, 0, 9];
    start.extend_from_slice(&nested_headers(3)[2..]);
    let mut start_frame = vec![FRAME_METHOD, 0, 0];
    start_frame.extend_from_slice(&u32::try_from(start.len()).unwrap().to_be_bytes());
    start_frame.extend(start);
    start_frame.push(FRAME_END);
    let close = encode(&[AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 320,
            reply_text: "CONNECTION_FORCED".into(),
            class_id: 0,
            method_id: 0,
        })),
    )]);
    vec![delivery, nested, big, start_frame, close]
}

/// Fuzz target: the frame cutter and delivery assembly (`next_frame`, `parse_deliver`, the
/// header pre-scan, body skipping) on arbitrary and mutated frame streams, fed whole and in
/// small pieces. No input may panic or overflow the stack; every error is a clean `Err`.
#[test]
fn fuzz_amqp_frames() {
    let seeds = frame_seeds();
    let seed_refs: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    meshgate_fuzz::run(
        "fuzz_amqp_frames",
        meshgate_fuzz::bytes("fuzz_amqp_frames", &seed_refs, 512),
        |b| Some(b.to_vec()),
        |input| {
            for step in [input.len().max(1), 3] {
                let (mut c, _peer) = connection();
                c.max_body = 4;
                'feed: for chunk in input.chunks(step) {
                    c.read.extend_from_slice(chunk);
                    loop {
                        match c.next_delivery() {
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            // The connection would end here.
                            Err(_) => break 'feed,
                        }
                    }
                }
            }
            let mut buf = BytesMut::from(&input[..]);
            while let Ok(Some(_)) = next_frame(&mut buf, FRAME_MAX) {}
            if let Some(args) = input.get(4..) {
                let _ = parse_deliver(args);
            }
            Ok(())
        },
    );
}
