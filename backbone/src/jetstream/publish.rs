//! JetStream publishes on meshgate's own NATS client ([`crate::nats::client`]): the ingress hot
//! path of the `jetstream` backbone.
//!
//! A JetStream publish is a NATS request: `HPUB <subject> <reply>` and the stream answers on
//! `<reply>` with a PubAck (`{"stream":…,"seq":…,"duplicate":true?}`) or an API error
//! (`{"error":{"code":…,"description":…}}`); with no stream on the subject, the server answers
//! "no responders" (an empty message with status `503` in its header line). Replies come to one
//! wildcard subscription, `_INBOX.<unique>.*`, handled on the connection's reader task; the last
//! token is the request's number, which finds the waiting publisher.
//!
//! Why not async-nats's `Context::publish` (kept for streams, consumers and KV): every publish
//! became a `HeaderMap`, a command through the client's channel and, to keep one connection's
//! publishes in order, a hop through a task of ours; measured in `bench` (`nats --only
//! "nobody subscribed"`), that path acknowledged 24k MQTT QoS 1 publishes/s where async-nats
//! itself, sending the same messages, gets 42k. Here a publish is appended to the write buffer
//! in call order, so order holds without a task.
//!
//! Every publish is answered within `backbone.jetstream.publish_timeout` (5 s by default): by
//! its PubAck, by the stream's refusal, at once when its connection drops (the hook of
//! [`Client::on_disconnect`] fails every publish still waiting on it: their replies would have
//! come on that connection; counted as `reason="disconnected"`), or by the timeout (a reply
//! lost; `reason="puback_timeout"`). Then the caller refuses the client's publish, the client
//! retries, and the `Nats-Msg-Id` deduplication stores the retry once if the first one was
//! stored after all.

use std::time::Duration;

use meshgate_core::metrics::Counter;

use super::order::PublishOrder;
use super::replies::{Replies, Waiter};
use crate::nats::client::{Client, ClientError};

/// The stream's answer to a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PubAck {
    /// Stored before, within the duplicate window: acknowledged, not stored again.
    pub duplicate: bool,
}

/// Why a publish was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PublishFailure {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("no JetStream stream answered for subject `{0}`; is the stream there?")]
    NoResponders(String),
    #[error("JetStream refused the publish: {description} (code {code})")]
    Refused { code: u16, description: String },
    #[error("no PubAck within {0:?} (backbone.jetstream.publish_timeout)")]
    TimedOut(Duration),
    /// The connection dropped before the answer came: the event may or may not be stored.
    #[error("the NATS connection dropped before JetStream answered; retry (stored once)")]
    ConnectionLost,
    #[error("unexpected reply to a JetStream publish: {0}")]
    BadReply(String),
}

#[derive(Debug)]
pub(crate) struct JsPublisher {
    client: Client,
    replies: Replies<Result<PubAck, PublishFailure>>,
    /// `backbone.jetstream.publish_timeout`
    timeout: Duration,
    /// Publishes refused for want of a PubAck within `timeout`.
    timed_out: Counter,
    /// The order of this connection's publishes across "no responders" retries.
    order: PublishOrder,
}

impl JsPublisher {
    /// Starts on `client` (a connection of its own: its inbox subscription is made here).
    /// A publish waits `timeout` at most for its PubAck (counted in `timed_out`); those still
    /// waiting when the connection drops are refused then (counted in `disconnected`).
    pub(crate) fn start(
        client: Client,
        timeout: Duration,
        timed_out: Counter,
        disconnected: Counter,
    ) -> Result<JsPublisher, ClientError> {
        let replies = Replies::start(
            &client,
            |m| parse_reply(m.headers.as_deref(), &m.payload),
            || Err(PublishFailure::ConnectionLost),
            move |n| {
                if n > 0 {
                    disconnected.add(n as u64);
                    tracing::warn!(
                        publishes = n,
                        "jetstream: the publishing connection dropped with publishes waiting for their PubAck; refused them (the clients retry; counted in meshgate_backbone_dropped_total{{reason=\"disconnected\"}})"
                    );
                }
            },
        )?;
        Ok(JsPublisher {
            client,
            replies,
            timeout,
            timed_out,
            order: PublishOrder::default(),
        })
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Publishes one message and waits for the stream's answer. Messages are written in the
    /// order of the calls.
    ///
    /// "No responders" is asked again until `timeout`: on a cluster it is what a stream
    /// answers while it has no leader (its node died or went lame duck and a new one is being
    /// elected), and a publish held is better than one refused. The retries keep the order of
    /// the calls ([`super::order`]): they go out oldest first, alone, while newer publishes
    /// wait; the first retry of a leaderless spell waits 50 ms, then twice as long each time
    /// (up to 1 s). A publish whose successor was stored meanwhile is refused (asked again it
    /// would be stored after it) and so is one on a subject no stream takes, after `timeout`.
    pub(crate) async fn publish(
        &self,
        subject: &str,
        headers: &[u8],
        payload: &[u8],
    ) -> Result<PubAck, PublishFailure> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut ticket = self.order.enter();
        if tokio::time::timeout_at(deadline, ticket.turn_to_write())
            .await
            .is_err()
        {
            // Held, never written, behind retries that took the whole publish timeout: the
            // stream had no leader all along.
            return Err(PublishFailure::NoResponders(subject.into()));
        }
        let mut waiter = self.write(subject, headers, payload).await?;
        ticket.written();
        let mut pause = Duration::from_millis(50);
        loop {
            let refused = match self.answer(&mut waiter, subject, deadline).await {
                Ok(ack) => {
                    ticket.stored();
                    return Ok(ack);
                }
                Err(e @ PublishFailure::NoResponders(_)) => e,
                Err(e) => return Err(e),
            };
            ticket.no_responders();
            let Ok(turn) = tokio::time::timeout_at(deadline, ticket.turn_to_retry()).await else {
                return Err(refused);
            };
            if turn.later_stored {
                return Err(refused);
            }
            if turn.leaderless {
                // Still no leader: wait before asking (newer publishes wait behind this one).
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(refused);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
                if ticket.later_stored() {
                    return Err(refused);
                }
            }
            tracing::debug!(
                subject,
                "jetstream: no responders (no stream leader?); asking again"
            );
            waiter = self.write(subject, headers, payload).await?;
        }
    }

    /// Appends the publish to the connection's write buffer (waiting for room).
    async fn write(
        &self,
        subject: &str,
        headers: &[u8],
        payload: &[u8],
    ) -> Result<Waiter<'_, Result<PubAck, PublishFailure>>, PublishFailure> {
        // The waiter forgets the request however this ends (error, timeout, the caller gave
        // up).
        let waiter = self.replies.waiter();
        self.client
            .publish_when_room(subject, Some(&waiter.reply), headers, payload)
            .await?;
        Ok(waiter)
    }

    /// The stream's answer to a written publish, by `deadline`.
    async fn answer(
        &self,
        waiter: &mut Waiter<'_, Result<PubAck, PublishFailure>>,
        subject: &str,
        deadline: tokio::time::Instant,
    ) -> Result<PubAck, PublishFailure> {
        match tokio::time::timeout_at(deadline, &mut waiter.answer).await {
            Ok(Ok(answer)) => answer.map_err(|e| match e {
                PublishFailure::NoResponders(_) => PublishFailure::NoResponders(subject.into()),
                e => e,
            }),
            Ok(Err(_)) => Err(ClientError::Closed.into()),
            Err(_) => {
                self.timed_out.inc();
                Err(PublishFailure::TimedOut(self.timeout))
            }
        }
    }

    /// Waits (at most `timeout`) for the answers to the publishes in flight, then closes the
    /// connection: a publish accepted before the backbone closed still gets its PubAck
    /// rather than a refusal for a connection closed under it.
    pub(crate) async fn drain(&self) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        while !self.replies.is_empty()
            && self.client.is_connected()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.client.drain().await;
    }
}

#[derive(serde::Deserialize)]
struct Reply {
    stream: Option<String>,
    #[serde(default)]
    duplicate: bool,
    error: Option<ApiError>,
}

#[derive(serde::Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    description: String,
}

/// Reads the stream's answer: a PubAck, an API error, or a "no responders" status.
fn parse_reply(headers: Option<&[u8]>, payload: &[u8]) -> Result<PubAck, PublishFailure> {
    if let Some(h) = headers {
        // `NATS/1.0 503\r\n…`: nobody subscribed to the subject (no stream takes it).
        let status = h.split(|&b| b == b'\r').next().unwrap_or_default();
        if status.starts_with(b"NATS/1.0 503") {
            return Err(PublishFailure::NoResponders(String::new()));
        }
    }
    let reply: Reply = serde_json::from_slice(payload).map_err(|e| {
        PublishFailure::BadReply(format!(
            "{e}: {}",
            String::from_utf8_lossy(&payload[..payload.len().min(200)])
        ))
    })?;
    match (reply.error, reply.stream) {
        (Some(e), _) => Err(PublishFailure::Refused {
            code: e.code,
            description: e.description,
        }),
        (None, Some(_)) => Ok(PubAck {
            duplicate: reply.duplicate,
        }),
        (None, None) => Err(PublishFailure::BadReply(
            String::from_utf8_lossy(&payload[..payload.len().min(200)]).into_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::nats::testing::{line_of, serving};
    use tokio::io::AsyncWriteExt;

    #[test]
    fn pubacks_errors_and_no_responders_are_told_apart() {
        assert_eq!(
            parse_reply(None, br#"{"stream":"S","seq":7}"#),
            Ok(PubAck { duplicate: false })
        );
        assert_eq!(
            parse_reply(None, br#"{"stream":"S","seq":7,"duplicate":true}"#),
            Ok(PubAck { duplicate: true })
        );
        assert_eq!(
            parse_reply(
                None,
                br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#
            ),
            Err(PublishFailure::Refused {
                code: 503,
                description: "maximum messages exceeded".into()
            })
        );
        assert_eq!(
            parse_reply(Some(b"NATS/1.0 503\r\n\r\n"), b""),
            Err(PublishFailure::NoResponders(String::new()))
        );
        assert!(matches!(
            parse_reply(None, b"not json"),
            Err(PublishFailure::BadReply(_))
        ));
        assert!(matches!(
            parse_reply(None, b"{}"),
            Err(PublishFailure::BadReply(_))
        ));
    }

    #[tokio::test]
    async fn a_jetstream_publish_is_a_request_whose_reply_settles_it() {
        let (client, _serving, server) = serving(64 << 10).await;
        let publisher = JsPublisher::start(
            client,
            Duration::from_millis(400),
            Counter::default(),
            Counter::default(),
        )
        .unwrap();
        let (mut r, mut w) = tokio::io::split(server);
        let mut seen = Vec::new();
        let sub = line_of(&mut r, &mut seen, "SUB ").await;
        assert!(
            sub.starts_with("SUB _INBOX.") && sub.ends_with(".* 1"),
            "{sub}"
        );

        let first = tokio::spawn(async move {
            let a = publisher
                .publish("p.a", b"NATS/1.0\r\nX: y\r\n\r\n", b"hi")
                .await;
            let b = publisher.publish("p.b", b"", b"yo").await;
            let started = tokio::time::Instant::now();
            let c = publisher.publish("p.c", b"", b"no").await;
            (a, b, c, started.elapsed())
        });
        // HPUB <subject> <reply> <header size> <total size>, then the reply to it.
        let hpub = line_of(&mut r, &mut seen, "HPUB ").await;
        let parts: Vec<&str> = hpub.split(' ').collect();
        assert_eq!(
            (parts[1], parts[3], parts[4]),
            ("p.a", "18", "20"),
            "{hpub}"
        );
        let ack = r#"{"stream":"S","seq":1,"duplicate":true}"#;
        let reply = format!("MSG {} 1 {}\r\n{ack}\r\n", parts[2], ack.len());
        w.write_all(reply.as_bytes()).await.unwrap();
        // PUB <subject> <reply> <size>: nobody takes it, the server says so (status 503), as
        // while a stream elects a leader; asked again, it is stored.
        let publ = line_of(&mut r, &mut seen, "PUB p.b").await;
        w.write_all(no_responders(&inbox_of(&publ)).as_bytes())
            .await
            .unwrap();
        let again = line_of(&mut r, &mut seen, "PUB p.b").await;
        w.write_all(puback(&inbox_of(&again), 2).as_bytes())
            .await
            .unwrap();
        // Nobody ever: refused as "no responders" within the publish timeout.
        let answer_all = tokio::spawn(async move {
            loop {
                let publ = line_of(&mut r, &mut seen, "PUB p.c").await;
                w.write_all(no_responders(&inbox_of(&publ)).as_bytes())
                    .await
                    .unwrap();
            }
        });

        let (a, b, c, took) = first.await.unwrap();
        answer_all.abort();
        assert_eq!(a, Ok(PubAck { duplicate: true }));
        assert_eq!(b, Ok(PubAck { duplicate: false }));
        assert_eq!(c, Err(PublishFailure::NoResponders("p.c".into())));
        assert!(took <= Duration::from_millis(400), "{took:?}");
    }

    fn no_responders(inbox: &str) -> String {
        let status = "NATS/1.0 503\r\n\r\n";
        format!(
            "HMSG {inbox} 1 {} {}\r\n{status}\r\n",
            status.len(),
            status.len()
        )
    }

    fn puback(inbox: &str, seq: u64) -> String {
        let ack = format!(r#"{{"stream":"S","seq":{seq}}}"#);
        format!("MSG {inbox} 1 {}\r\n{ack}\r\n", ack.len())
    }

    /// A publisher with a 5 s publish timeout, for several tasks of a test.
    fn shared_publisher(client: Client) -> std::sync::Arc<JsPublisher> {
        std::sync::Arc::new(
            JsPublisher::start(
                client,
                Duration::from_secs(5),
                Counter::default(),
                Counter::default(),
            )
            .unwrap(),
        )
    }

    fn inbox_of(line: &str) -> String {
        line.split(' ').nth(2).unwrap().to_owned()
    }

    /// Three publishes pipelined on one connection, the first two answered "no responders"
    /// (a stream between leaders): both are asked again, oldest first and one at a time, and
    /// the third, newer one waits behind them; all three are stored in call order.
    #[tokio::test]
    async fn pipelined_no_responders_are_asked_again_in_call_order() {
        let (client, _serving, server) = serving(64 << 10).await;
        let publisher = shared_publisher(client);
        let (mut r, mut w) = tokio::io::split(server);
        let mut seen = Vec::new();
        line_of(&mut r, &mut seen, "SUB ").await;
        let (p1, p2, p3) = (publisher.clone(), publisher.clone(), publisher.clone());
        let first = tokio::spawn(async move { p1.publish("p.x", b"", b"1").await });
        let x = line_of(&mut r, &mut seen, "PUB p.x").await;
        let second = tokio::spawn(async move { p2.publish("p.y", b"", b"2").await });
        let y = line_of(&mut r, &mut seen, "PUB p.y").await;
        w.write_all(no_responders(&inbox_of(&x)).as_bytes())
            .await
            .unwrap();
        w.write_all(no_responders(&inbox_of(&y)).as_bytes())
            .await
            .unwrap();
        // x is asked again first (after a pause: no leader yet); z, newer, waits.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let third = tokio::spawn(async move { p3.publish("p.z", b"", b"3").await });
        let x = line_of(&mut r, &mut seen, "PUB ").await;
        assert!(x.starts_with("PUB p.x "), "{x}");
        w.write_all(puback(&inbox_of(&x), 1).as_bytes())
            .await
            .unwrap();
        let y = line_of(&mut r, &mut seen, "PUB ").await;
        assert!(y.starts_with("PUB p.y "), "{y}");
        w.write_all(puback(&inbox_of(&y), 2).as_bytes())
            .await
            .unwrap();
        let z = line_of(&mut r, &mut seen, "PUB ").await;
        assert!(z.starts_with("PUB p.z "), "{z}");
        w.write_all(puback(&inbox_of(&z), 3).as_bytes())
            .await
            .unwrap();
        for p in [first, second, third] {
            assert_eq!(p.await.unwrap(), Ok(PubAck { duplicate: false }));
        }
    }

    /// A publish answered "no responders" after a newer one was stored: asked again it would
    /// be stored after that one, so it is refused at once.
    #[tokio::test]
    async fn no_responders_is_refused_when_a_newer_publish_was_stored() {
        let (client, _serving, server) = serving(64 << 10).await;
        let publisher = shared_publisher(client);
        let (mut r, mut w) = tokio::io::split(server);
        let mut seen = Vec::new();
        line_of(&mut r, &mut seen, "SUB ").await;
        let (p1, p2) = (publisher.clone(), publisher.clone());
        let first = tokio::spawn(async move { p1.publish("p.x", b"", b"1").await });
        let x = line_of(&mut r, &mut seen, "PUB p.x").await;
        let second = tokio::spawn(async move { p2.publish("p.y", b"", b"2").await });
        let y = line_of(&mut r, &mut seen, "PUB p.y").await;
        w.write_all(puback(&inbox_of(&y), 1).as_bytes())
            .await
            .unwrap();
        assert_eq!(second.await.unwrap(), Ok(PubAck { duplicate: false }));
        let started = tokio::time::Instant::now();
        w.write_all(no_responders(&inbox_of(&x)).as_bytes())
            .await
            .unwrap();
        assert_eq!(
            first.await.unwrap(),
            Err(PublishFailure::NoResponders("p.x".into()))
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
