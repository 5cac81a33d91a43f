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
    pub(crate) fn start(
        client: &Client,
        stream: &str,
        timeout: Duration,
    ) -> Result<DirectGet, ClientError> {
        let replies = Replies::start(
            client,
            read_answer,
            || Err(DirectError::ConnectionLost),
            |_| {},
        )?;
        Ok(DirectGet {
            client: client.clone(),
            subject: format!("$JS.API.DIRECT.GET.{stream}"),
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
}
