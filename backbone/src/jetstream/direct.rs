//! Reading stored messages without a consumer: JetStream's *direct get*
//! (`$JS.API.DIRECT.GET.<stream>`, nats-server ≥ 2.9, streams with `allow_direct`), on
//! meshgate's own client. A subscription of the instance feed that fell behind reads what it
//! missed this way ([`super::member`], decision 0080).
//!
//! The request body `{"seq":N,"next_by_subj":"<subject>"}` asks for the first message at or
//! after sequence `N` whose subject matches `<subject>` (wildcards allowed). The answer is the
//! stored message itself, with `Nats-Stream`, `Nats-Subject`, `Nats-Sequence` and
//! `Nats-Time-Stamp` added to its headers, or a status (`NATS/1.0 404 Message Not Found`: none;
//! `408 …`: a bad request; `503`: no stream answers, e.g. without `allow_direct`). Replies come
//! to one wildcard inbox, as for publishes ([`super::replies`]).
//!
//! A replicated stream (`backbone.jetstream.replicas` > 1) is read through its leader instead:
//! with `allow_direct` every replica answers direct gets, and one that lags the leader would
//! answer 404 for a message the feed already passed, so a member would go live past it and
//! skip it. `$JS.API.STREAM.MSG.GET.<stream>` takes the same request and only the leader
//! answers it, in JSON (`{"message":{"subject","seq","hdrs","data"}}` with the header block and
//! payload in base64, or `{"error":{"code":404,…}}`); nats-server 2.9 takes `next_by_subj`
//! there too (checked on 2.9.10).

use std::time::Duration;

use bytes::Bytes;

use super::replies::Replies;
use crate::nats::client::{Client, ClientError, Msg};
use crate::nats::wire::RawHeaderBlock;

/// Why a direct get did not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DirectError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("no answer to a JetStream direct get within {0:?}")]
    TimedOut(Duration),
    #[error("JetStream refused a direct get: {0}")]
    Refused(String),
    #[error("the NATS connection dropped before JetStream answered a direct get")]
    ConnectionLost,
}

/// A stored message: its stream sequence, and the message with its stored subject.
#[derive(Debug)]
pub(crate) struct Stored {
    pub seq: u64,
    pub msg: Msg,
}

#[derive(Debug)]
pub(crate) struct DirectGet {
    client: Client,
    /// `$JS.API.DIRECT.GET.<stream>`
    subject: String,
    replies: Replies<Result<Option<Stored>, DirectError>>,
    timeout: Duration,
    /// Requests in flight at most: after a NATS restart every subscription asks at once.
    in_flight: tokio::sync::Semaphore,
}

/// Direct gets in flight at most per instance.
const MAX_IN_FLIGHT: usize = 256;

impl DirectGet {
    /// Reads `stream` by direct get, or through its leader when `replicated` (see above).
    pub(crate) fn start(
        client: &Client,
        stream: &str,
        timeout: Duration,
        replicated: bool,
    ) -> Result<DirectGet, ClientError> {
        let read = if replicated {
            read_leader_answer
        } else {
            read_answer
        };
        let replies = Replies::start(client, read, || Err(DirectError::ConnectionLost), |_| {})?;
        let api = if replicated {
            "STREAM.MSG.GET"
        } else {
            "DIRECT.GET"
        };
        Ok(DirectGet {
            client: client.clone(),
            subject: format!("$JS.API.{api}.{stream}"),
            replies,
            timeout,
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    /// The first message at or after `seq` on `subject` (a NATS subject, wildcards allowed);
    /// `None` when there is none.
    pub(crate) async fn next_by_subject(
        &self,
        seq: u64,
        subject: &str,
    ) -> Result<Option<Stored>, DirectError> {
        let Ok(_permit) = self.in_flight.acquire().await else {
            return Err(ClientError::Closed.into());
        };
        let body = serde_json::json!({ "seq": seq.max(1), "next_by_subj": subject }).to_string();
        let mut waiter = self.replies.waiter();
        self.client
            .publish_when_room(&self.subject, Some(&waiter.reply), b"", body.as_bytes())
            .await?;
        match tokio::time::timeout(self.timeout, &mut waiter.answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(ClientError::Closed.into()),
            Err(_) => Err(DirectError::TimedOut(self.timeout)),
        }
    }
}

/// Reads a direct get's answer: the stored message (its subject put back from `Nats-Subject`),
/// `None` for `404`, or why not.
fn read_answer(mut m: Msg) -> Result<Option<Stored>, DirectError> {
    let Some(headers) = m.headers.as_deref() else {
        return Err(DirectError::Refused("an answer without headers".into()));
    };
    let first = headers.split(|&b| b == b'\r').next().unwrap_or_default();
    let status = first
        .strip_prefix(b"NATS/1.0")
        .unwrap_or_default()
        .trim_ascii();
    if status.starts_with(b"404") {
        return Ok(None);
    }
    if !status.is_empty() {
        return Err(DirectError::Refused(
            String::from_utf8_lossy(status).into_owned(),
        ));
    }
    let block = RawHeaderBlock(headers);
    let seq = block
        .get("Nats-Sequence")
        .and_then(|s| s.trim().parse::<u64>().ok());
    let subject = block
        .get("Nats-Subject")
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let (Some(seq), Some(subject)) = (seq, subject) else {
        return Err(DirectError::Refused(
            "an answer without Nats-Sequence or Nats-Subject".into(),
        ));
    };
    m.subject = Bytes::from(subject);
    m.reply = None;
    Ok(Some(Stored { seq, msg: m }))
}

/// The leader's answer (`$JS.API.STREAM.MSG.GET`), in JSON.
#[derive(serde::Deserialize)]
struct LeaderAnswer {
    message: Option<LeaderStored>,
    error: Option<LeaderError>,
}

#[derive(serde::Deserialize)]
struct LeaderStored {
    subject: String,
    seq: u64,
    /// The header block, base64 (absent without headers).
    #[serde(default)]
    hdrs: Option<String>,
    /// The payload, base64 (absent when empty).
    #[serde(default)]
    data: Option<String>,
}

#[derive(serde::Deserialize)]
struct LeaderError {
    code: u16,
    /// JetStream's error number: 10037 "no message found" (10059 "stream not found" is a 404
    /// too, and an error).
    #[serde(default)]
    err_code: u32,
    #[serde(default)]
    description: String,
}

/// Reads a leader's answer: the stored message, `None` for 404, or why not.
fn read_leader_answer(m: Msg) -> Result<Option<Stored>, DirectError> {
    use base64::Engine;
    let refused = |why: &str| DirectError::Refused(why.to_owned());
    let answer: LeaderAnswer = serde_json::from_slice(&m.payload)
        .map_err(|e| refused(&format!("an answer that is not JetStream's JSON: {e}")))?;
    if let Some(e) = answer.error {
        if e.code == 404 && e.err_code == 10037 {
            return Ok(None);
        }
        return Err(refused(&format!("{} {}", e.code, e.description)));
    }
    let stored = answer
        .message
        .ok_or_else(|| refused("an answer without a message or an error"))?;
    if stored.subject.is_empty() {
        return Err(refused("a stored message without a subject"));
    }
    let decode = |field: Option<String>, what: &str| {
        field
            .map(|b| base64::engine::general_purpose::STANDARD.decode(b))
            .transpose()
            .map_err(|e| refused(&format!("{what} is not base64: {e}")))
    };
    let headers = decode(stored.hdrs, "hdrs")?.filter(|h| !h.is_empty());
    let payload = decode(stored.data, "data")?.unwrap_or_default();
    Ok(Some(Stored {
        seq: stored.seq,
        msg: Msg {
            subject: Bytes::from(stored.subject),
            reply: None,
            headers: headers.map(Bytes::from),
            payload: Bytes::from(payload),
        },
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn msg(headers: &str, payload: &str) -> Msg {
        Msg {
            subject: Bytes::from_static(b"_INBOX.x.1"),
            reply: None,
            headers: Some(Bytes::from(headers.to_owned())),
            payload: Bytes::from(payload.to_owned()),
        }
    }

    #[test]
    fn a_stored_message_gets_its_subject_back_and_404_is_none() {
        let m = msg(
            "NATS/1.0\r\nNats-Stream: S\r\nNats-Subject: p.a.b\r\nNats-Sequence: 42\r\nNats-Time-Stamp: 2026-12-05T00:00:00Z\r\n\r\n",
            "hi",
        );
        let s = read_answer(m).unwrap().unwrap();
        assert_eq!(s.seq, 42);
        assert_eq!(&s.msg.subject[..], b"p.a.b");
        assert_eq!(&s.msg.payload[..], b"hi");
        assert!(
            read_answer(msg("NATS/1.0 404 Message Not Found\r\n\r\n", ""))
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            read_answer(msg("NATS/1.0 408 Bad Request\r\n\r\n", "")),
            Err(DirectError::Refused(_))
        ));
        assert!(matches!(
            read_answer(msg("NATS/1.0\r\nNats-Subject: p.a\r\n\r\n", "")),
            Err(DirectError::Refused(_))
        ));
    }

    /// Direct get answers come from the bus: any header block and payload is a message, a
    /// `None` or a refusal, never a panic.
    #[test]
    fn fuzz_direct_get_answer() {
        let seeds: [&[u8]; 3] = [
            b"NATS/1.0\r\nNats-Stream: S\r\nNats-Subject: p.a\r\nNats-Sequence: 42\r\n\r\n",
            b"NATS/1.0 404 Message Not Found\r\n\r\n",
            b"NATS/1.0 408 Bad Request\r\n\r\n",
        ];
        meshgate_fuzz::run(
            "direct_get_answer",
            meshgate_fuzz::bytes("direct_get_answer", &seeds, 256),
            |b| Some(b.to_vec()),
            |bytes| {
                let m = Msg {
                    subject: Bytes::from_static(b"_INBOX.x.1"),
                    reply: None,
                    headers: Some(Bytes::from(bytes)),
                    payload: Bytes::new(),
                };
                if let Ok(Some(s)) = read_answer(m)
                    && s.msg.subject.is_empty()
                {
                    return Err("a stored message without a subject".into());
                }
                Ok(())
            },
        );
    }

    #[test]
    fn a_leaders_answer_gives_the_stored_message_and_404_is_none() {
        let answer = |json: &str| Msg {
            subject: Bytes::from_static(b"_INBOX.x.1"),
            reply: None,
            headers: None,
            payload: Bytes::from(json.to_owned()),
        };
        // As nats-server 2.9.10 answered (the header block "NATS/1.0\r\nA: b\r\n\r\n").
        let s = read_leader_answer(answer(
            r#"{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":"p.a","seq":2,"hdrs":"TkFUUy8xLjANCkE6IGINCg0K","data":"aG8=","time":"2026-12-06T07:22:45.905485135Z"}}"#,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(s.seq, 2);
        assert_eq!(&s.msg.subject[..], b"p.a");
        assert_eq!(
            s.msg.headers.as_deref(),
            Some(&b"NATS/1.0\r\nA: b\r\n\r\n"[..])
        );
        assert_eq!(&s.msg.payload[..], b"ho");
        assert!(
            read_leader_answer(answer(
                r#"{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","error":{"code":404,"err_code":10037,"description":"no message found"}}"#
            ))
            .unwrap()
            .is_none()
        );
        for bad in [
            r#"{"error":{"code":503,"description":"JetStream system temporarily unavailable"}}"#,
            r#"{"error":{"code":404,"err_code":10059,"description":"stream not found"}}"#,
            r#"{"message":{"subject":"","seq":1}}"#,
            r#"{"message":{"subject":"p.a","seq":1,"data":"%%"}}"#,
            r#"{}"#,
            "not json",
        ] {
            assert!(
                matches!(
                    read_leader_answer(answer(bad)),
                    Err(DirectError::Refused(_))
                ),
                "{bad}"
            );
        }
    }

    /// The leader's answers come from the bus too: any payload is a message, a `None` or a
    /// refusal, never a panic.
    #[test]
    fn fuzz_leader_get_answer() {
        let seeds: [&[u8]; 3] = [
            br#"{"message":{"subject":"p.a","seq":2,"hdrs":"TkFUUy8xLjANCg0K","data":"aG8="}}"#,
            br#"{"error":{"code":404,"err_code":10037,"description":"no message found"}}"#,
            br#"{"error":{"code":503}}"#,
        ];
        meshgate_fuzz::run(
            "leader_get_answer",
            meshgate_fuzz::bytes("leader_get_answer", &seeds, 256),
            |b| Some(b.to_vec()),
            |bytes| {
                let m = Msg {
                    subject: Bytes::from_static(b"_INBOX.x.1"),
                    reply: None,
                    headers: None,
                    payload: Bytes::from(bytes),
                };
                if let Ok(Some(s)) = read_leader_answer(m)
                    && s.msg.subject.is_empty()
                {
                    return Err("a stored message without a subject".into());
                }
                Ok(())
            },
        );
    }
}
