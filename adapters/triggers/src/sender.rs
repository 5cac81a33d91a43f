//! One HTTP attempt: an event POSTed to a subscriber in the CloudEvents HTTP binding (binary or
//! structured), the answer read within the trigger's timeout and classified
//! ([`crate::policy`]). Connections to a subscriber are reused (HTTP/1.1 keep-alive) across
//! events and attempts: see [`client`].

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use meshgate_config::triggers::{ContentMode, Credentials};
use meshgate_core::Event;
use meshgate_core::backbone::Envelope;
use reqwest::header::{self, HeaderMap, HeaderValue};

use crate::policy::{self, Verdict};

/// The most of a reply body that is read: a larger reply is not published (the event still
/// counts as delivered; the reply is counted as dropped).
pub const MAX_REPLY_BYTES: usize = 1 << 20;
/// The most of a failed answer's body kept for `knativeerrordata`.
pub const MAX_ERROR_DATA: usize = 1024;

/// What one attempt came to.
#[derive(Debug)]
pub enum Attempt {
    Delivered {
        status: u16,
        /// The CloudEvent of the reply, when the answer carried one.
        reply: Option<Event>,
        /// The reply was not a readable CloudEvent or was too large.
        reply_refused: Option<String>,
    },
    Failed(Failure),
}

/// A failed attempt: the answer's status (none when there was no answer), what to do next, and
/// what the dead-letter sink is told.
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: Option<u16>,
    pub verdict: Verdict,
    pub retry_after: Option<Duration>,
    /// The answer's body (at most [`MAX_ERROR_DATA`]) or the connection error's text.
    pub data: Bytes,
}

impl Failure {
    fn no_answer(why: String) -> Self {
        Failure {
            status: None,
            verdict: Verdict::Retry,
            retry_after: None,
            data: Bytes::from(why),
        }
    }
}

/// Why a subscriber's client could not be made (bad CA file).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(pub String);

/// An HTTP client for a subscriber: one shared by every trigger without a CA file of its own
/// (its connection pool keeps connections per host, so triggers to one service reuse them, and
/// the system's root certificates are read once), or one of its own with `ca_file`.
pub fn client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, ClientError> {
    static SHARED: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    if ca_file.is_none() {
        if let Some(c) = SHARED.get() {
            return Ok(c.clone());
        }
        let c = build_client(None)?;
        return Ok(SHARED.get_or_init(|| c).clone());
    }
    build_client(ca_file)
}

fn build_client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, ClientError> {
    let pem = match ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            ClientError(format!(
                "subscriber.caFile: cannot read {}: {e}",
                path.display()
            ))
        })?),
        None => None,
    };
    let tls = meshgate_core::tls::client_config(pem.as_deref())
        .map_err(|e| ClientError(format!("subscriber.caFile: {e}")))?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        // Redirects are an error the contract does not retry (3xx), not something to follow.
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| ClientError(format!("cannot make the HTTP client: {e}")))
}

/// How the events of one trigger are written.
#[derive(Debug, Clone)]
pub struct Request {
    pub uri: String,
    pub mode: ContentMode,
    pub auth: Option<HeaderValue>,
    pub timeout: Duration,
    /// Ask for a reply (`Prefer: reply`): the trigger publishes replies.
    pub want_reply: bool,
}

/// The `Authorization` header value of `credentials` (marked sensitive: never in debug output).
pub fn authorization(credentials: &Credentials) -> Option<HeaderValue> {
    use base64::Engine;
    let text = match credentials {
        Credentials::Bearer(t) => format!("Bearer {t}"),
        Credentials::Basic { user, password } => format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        ),
    };
    let mut v = HeaderValue::try_from(text).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// Sends `envelope`'s event once.
pub async fn send(client: &reqwest::Client, req: &Request, envelope: &Envelope) -> Attempt {
    // Tracing on: one span per attempt (retries and dead letters are attempts too); the event
    // sent and the W3C `traceparent` header carry its context.
    let (mut hop, envelope) = match meshgate_core::trace::deliver_copy(
        "trigger deliver",
        meshgate_core::trace::SpanKind::Client,
        envelope,
    ) {
        Some((hop, copy)) => (Some(hop), std::borrow::Cow::Owned(copy)),
        None => (None, std::borrow::Cow::Borrowed(envelope)),
    };
    let (mut headers, body) = match req.mode {
        ContentMode::Binary => meshgate_http::binding::encode_binary(&envelope.event),
        ContentMode::Structured => {
            let mut h = HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/cloudevents+json; charset=utf-8"),
            );
            (h, envelope.json())
        }
    };
    if let Some(hop) = &hop {
        let w3c = hop.headers();
        if let Ok(v) = HeaderValue::try_from(w3c.traceparent) {
            headers.insert(meshgate_core::trace::TRACEPARENT, v);
        }
        if let Some(v) = w3c.tracestate.and_then(|s| HeaderValue::try_from(s).ok()) {
            headers.insert(meshgate_core::trace::TRACESTATE, v);
        }
    }
    let mut builder = client.post(&req.uri).headers(headers).body(body);
    if let Some(auth) = &req.auth {
        builder = builder.header(header::AUTHORIZATION, auth.clone());
    }
    if req.want_reply {
        builder = builder.header("prefer", "reply");
    }
    let attempt = exchange(builder, req).await;
    if let (Some(hop), Attempt::Failed(f)) = (hop.as_mut(), &attempt) {
        match f.status {
            Some(status) => hop.failed(&format_args!("HTTP status {status}")),
            None => hop.failed(&"no answer"),
        }
    }
    attempt
}

/// The request and its answer, all within `req.timeout`: once a 2xx status is in, the event
/// counts as delivered whatever happens to the body (a reply body that does not arrive in time
/// is only a lost reply, never a retry that would deliver the event twice).
async fn exchange(builder: reqwest::RequestBuilder, req: &Request) -> Attempt {
    let deadline = tokio::time::Instant::now() + req.timeout;
    let mut response = match tokio::time::timeout_at(deadline, builder.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Attempt::Failed(Failure::no_answer(error_chain(&e))),
        Err(_) => {
            return Attempt::Failed(Failure::no_answer(format!(
                "no answer within the trigger's timeout of {:?}",
                req.timeout
            )));
        }
    };
    let status = response.status().as_u16();
    let verdict = policy::classify(status);
    let headers = response.headers().clone();
    if verdict != Verdict::Delivered {
        let body = match tokio::time::timeout_at(deadline, read_body(&mut response, MAX_ERROR_DATA))
            .await
        {
            Ok(Ok((body, _))) => body,
            _ => Bytes::new(),
        };
        let retry_after = policy::retry_after(
            headers
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            SystemTime::now(),
        );
        return Attempt::Failed(Failure {
            status: Some(status),
            verdict,
            retry_after,
            data: body,
        });
    }
    // Knative's contract: a 202 is never processed as a reply; without a reply topic there is
    // nothing to read it for. Read and dropped all the same (within the deadline), so that the
    // connection goes back to the pool.
    if !req.want_reply || status == 202 {
        let _ = tokio::time::timeout_at(deadline, read_body(&mut response, MAX_REPLY_BYTES)).await;
        return Attempt::Delivered {
            status,
            reply: None,
            reply_refused: None,
        };
    }
    let body =
        match tokio::time::timeout_at(deadline, read_body(&mut response, MAX_REPLY_BYTES)).await {
            Ok(Ok((body, true))) => Ok(body),
            Ok(Ok((_, false))) => Err(format!("the reply is larger than {MAX_REPLY_BYTES} bytes")),
            Ok(Err(e)) => Err(format!("reading the reply failed: {}", error_chain(&e))),
            Err(_) => Err(format!(
                "the reply did not arrive within the trigger's timeout of {:?}",
                req.timeout
            )),
        };
    match body.and_then(|body| reply_event(&headers, body)) {
        Ok(reply) => Attempt::Delivered {
            status,
            reply,
            reply_refused: None,
        },
        Err(why) => Attempt::Delivered {
            status,
            reply: None,
            reply_refused: Some(why),
        },
    }
}

/// At most `limit` bytes of the body, and whether that was all of it.
async fn read_body(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<(Bytes, bool), reqwest::Error> {
    let mut out = BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - out.len();
        if chunk.len() > room {
            out.extend_from_slice(&chunk[..room]);
            return Ok((out.freeze(), false));
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out.freeze(), true))
}

/// The reply's CloudEvent: binary or structured mode; `None` for an answer that is not a
/// CloudEvent (an empty body, plain JSON, text).
fn reply_event(headers: &HeaderMap, body: Bytes) -> Result<Option<Event>, String> {
    use meshgate_http::binding::{Decoded, decode};
    let looks_like_event = headers.contains_key("ce-specversion")
        || headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/cloudevents")
            });
    if !looks_like_event {
        return Ok(None);
    }
    match decode(headers, body, 1) {
        Ok(Decoded::Binary(e) | Decoded::Structured(e)) => Ok(Some(e)),
        Ok(_) => Err("the reply is a batch; only a single CloudEvent is published".into()),
        Err(e) => Err(format!("the reply is not a valid CloudEvent: {e}")),
    }
}

/// An error with its causes (reqwest's own text is often only "error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscriber's answer is hostile input: any `Retry-After` and any reply (headers and
    /// body) is read or refused, never a panic.
    #[test]
    fn fuzz_subscriber_answer() {
        let seeds: [&[u8]; 3] = [
            b"ce-specversion: 1.0\nce-id: r\nce-source: /s\nce-type: t\n\nbody",
            b"content-type: application/cloudevents+json\n\n{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\"}",
            b"retry-after: Sun, 06 Nov 1994 08:49:37 GMT\n\n",
        ];
        meshgate_fuzz::run(
            "subscriber_answer",
            meshgate_fuzz::bytes("subscriber_answer", &seeds, 512),
            |b| Some(b.to_vec()),
            |bytes| {
                let text = String::from_utf8_lossy(&bytes);
                let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
                let mut headers = HeaderMap::new();
                for line in head.lines() {
                    if let Some((n, v)) = line.split_once(": ")
                        && let (Ok(n), Ok(v)) = (
                            reqwest::header::HeaderName::try_from(n),
                            HeaderValue::try_from(v),
                        )
                    {
                        headers.append(n, v);
                    }
                }
                let _ = policy::retry_after(
                    headers
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok()),
                    SystemTime::now(),
                );
                let _ = reply_event(&headers, Bytes::from(body.as_bytes().to_vec()));
                Ok(())
            },
        );
    }
}
