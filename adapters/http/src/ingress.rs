//! `POST {events_path}/{topic}`: CloudEvents (or plain bodies) into the backbone.
//!
//! Order of checks, cheapest first: in-flight limit (503) → browser origin (403) → credentials
//! (401) → publish
//! permission on the topic (403) → body size (413) → binding decode (400/415; a batch over
//! `max_batch_events` is 413 as soon as the decoder reaches its next element) → backbone publish (503 when saturated or unavailable). The 202 is sent only after
//! the backbone accepted every event of the request.

use meshgate_core::metrics::ErrorKind;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use meshgate_config::HttpConfig;
use meshgate_core::live::{Live, Slots};
use meshgate_core::metrics::AdapterMetrics;
use meshgate_core::wrap::{self, Wrap};
use meshgate_core::{
    AdapterContext, AuthError, BackboneError, Credentials, Event, Principal, PublishError, Topic,
};

use crate::binding::{self, Decoded};

/// Adapter name in metrics and logs.
pub const ADAPTER: &str = "http";

struct HttpState {
    /// The `[http]` section in force: a reload may change its limits (`max_body_size`,
    /// `max_batch_events`, `max_in_flight`, `retry_after`, `body_read_timeout`), each request
    /// reads them as it goes; the rest needs a restart (`events_path` is in the routes).
    config: Arc<Live<HttpConfig>>,
    events_path: String,
    ctx: AdapterContext,
    metrics: AdapterMetrics,
    /// Requests in flight, capped at the `max_in_flight` in force at each request.
    in_flight: Arc<Slots>,
}

/// The ingress routes, to be merged into the gateway's web listener; `config` is the `[http]`
/// section a reload may replace (its limits change in place).
pub fn router(config: Arc<Live<HttpConfig>>, ctx: &AdapterContext) -> Router {
    let now = config.get();
    let events_path = now.events_path.clone();
    let state = Arc::new(HttpState {
        in_flight: Slots::new(),
        events_path: events_path.clone(),
        config,
        ctx: ctx.clone(),
        metrics: ctx.metrics(ADAPTER),
    });
    Router::new()
        .route(
            &format!("{events_path}/{{*topic}}"),
            post(ingest).options(preflight),
        )
        .route(&events_path, post(missing_topic))
        .route(&format!("{events_path}/"), post(missing_topic))
        .with_state(state)
}

/// Why a request is refused; becomes an RFC 9457 problem response.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    detail: String,
    /// `Retry-After` in seconds, when not the listener's default.
    retry_after: Option<u64>,
}

impl Refusal {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Refusal {
            status,
            detail: detail.into(),
            retry_after: None,
        }
    }

    fn retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after = Some(after.as_secs().max(1));
        self
    }

    fn into_response(self, state: &HttpState) -> Response {
        let mut r = problem(self.status, self.detail);
        match self.status {
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                let secs = self
                    .retry_after
                    .unwrap_or_else(|| state.config.read().retry_after.as_secs().max(1));
                let value = HeaderValue::from(secs);
                r.headers_mut().insert(header::RETRY_AFTER, value);
            }
            StatusCode::UNAUTHORIZED => {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="meshgate", Basic realm="meshgate""#),
                );
            }
            _ => {}
        }
        r
    }
}

/// An RFC 9457 problem response.
fn problem(status: StatusCode, detail: impl AsRef<str>) -> Response {
    meshgate_web::problem(status, detail.as_ref())
}

async fn missing_topic(State(state): State<Arc<HttpState>>) -> Response {
    let path = &state.events_path;
    problem(
        StatusCode::BAD_REQUEST,
        format!("no topic in the path: POST to {path}/<topic>, e.g. {path}/sensors/42/temperature"),
    )
}

/// What the Authorization header presented.
enum Presented {
    Nothing,
    Password(String, Vec<u8>),
    Token(String),
}

fn presented(headers: &HeaderMap) -> Option<Presented> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Some(Presented::Nothing);
    };
    let (scheme, rest) = value.to_str().ok()?.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(Presented::Token(rest.trim().to_owned()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let colon = decoded.iter().position(|b| *b == b':')?;
        let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
        return Some(Presented::Password(user, decoded[colon + 1..].to_vec()));
    }
    None
}

async fn authenticate(
    state: &HttpState,
    headers: &HeaderMap,
    peer: Option<std::net::SocketAddr>,
) -> Result<Principal, Refusal> {
    let unauthorized = |detail: &str| {
        state.metrics.error(ErrorKind::Unauthorized);
        Refusal::new(StatusCode::UNAUTHORIZED, detail)
    };
    let presented = presented(headers).ok_or_else(|| {
        unauthorized(
            "the Authorization header must be `Bearer <token>` or `Basic <base64 user:password>`",
        )
    })?;
    let creds = match &presented {
        Presented::Nothing => Credentials::None,
        Presented::Password(user, password) => Credentials::Password {
            username: user,
            password,
        },
        Presented::Token(t) => Credentials::Token(t),
    };
    let result = state
        .ctx
        .authorizer
        .authenticate(creds, peer.map(|p| p.ip()))
        .await;
    result.map_err(|e| match e {
        AuthError::Required => unauthorized(
            "authentication required: send `Authorization: Bearer <token>` or Basic credentials",
        ),
        AuthError::RateLimited { retry_after } => {
            state.metrics.error(ErrorKind::Unauthorized);
            Refusal::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()).retry_after(retry_after)
        }
        AuthError::Busy => {
            state.metrics.error(ErrorKind::Unauthorized);
            Refusal::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        AuthError::InvalidToken(why) => unauthorized(&format!("invalid token: {why}")),
        _ => unauthorized("invalid credentials"),
    })
}

/// Reads the body, refusing (413) as soon as it grows past the limit.
async fn read_body(state: &HttpState, headers: &HeaderMap, body: Body) -> Result<Bytes, Refusal> {
    let limit = state.config.read().max_body_size;
    let too_large = || {
        state.metrics.error(ErrorKind::TooLarge);
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than the limit of {limit} bytes (http.max_body_size)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    let mut stream = body.into_data_stream();
    // A client that trickles its body (slowloris) holds one of the `max_in_flight` slots at
    // most this long.
    let within = state.config.read().body_read_timeout;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let Ok(next) = next else {
            state.metrics.error(ErrorKind::Timeout);
            return Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {within:?} (http.body_read_timeout)"
                ),
            ));
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| {
            state.metrics.error(ErrorKind::BadRequest);
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("could not read the request body: {e}"),
            )
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn topic_from_path(state: &HttpState, uri: &Uri) -> Result<Topic, Refusal> {
    // The raw (still percent-encoded) path, so that `%2F` inside a level is not a separator.
    let raw = uri
        .path()
        .strip_prefix(state.events_path.as_str())
        .and_then(|p| p.strip_prefix('/'))
        .unwrap_or("");
    Topic::from_url_path(raw).map_err(|e| {
        state.metrics.error(ErrorKind::BadTopic);
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("invalid topic in the path: {e}"),
        )
    })
}

fn decode(
    state: &HttpState,
    headers: &HeaderMap,
    topic: &Topic,
    body: Bytes,
) -> Result<Vec<Event>, Refusal> {
    let config = state.config.read();
    let decoded = binding::decode(headers, body.clone(), config.max_batch_events).map_err(|e| {
        let kind = match e.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorKind::UnsupportedMediaType,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorKind::TooLarge,
            _ => ErrorKind::BadEvent,
        };
        state.metrics.error(kind);
        tracing::debug!(error = %e, "http: invalid event");
        Refusal::new(e.status(), e.to_string())
    })?;
    let events = match decoded {
        Decoded::Binary(e) | Decoded::Structured(e) => vec![e],
        // At most `max_batch_events`: the decoder stops at the next one (413).
        Decoded::Batch(events) => events,
        Decoded::NotCloudEvent => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            let event = wrap::wrap(
                body,
                Wrap {
                    source: &config.wrap.source,
                    ty: &config.wrap.event_type,
                    subject: Some(topic.as_str()),
                    content_type,
                },
            )
            .map_err(|e| {
                state.metrics.error(ErrorKind::BadEvent);
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("cannot wrap the body: {e}"),
                )
            })?;
            vec![event]
        }
    };
    Ok(events)
}

async fn ingest(
    State(state): State<Arc<HttpState>>,
    meshgate_web::PeerAddr(peer): meshgate_web::PeerAddr,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut response = match handle(&state, peer, &uri, &headers, body).await {
        Ok(ids) => {
            let body = serde_json::json!({ "accepted": ids.len(), "ids": ids });
            (
                StatusCode::ACCEPTED,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
        Err(refusal) => refusal.into_response(&state),
    };
    cors(&state, &headers, response.headers_mut());
    response
}

/// CORS (Fetch standard): a page of an origin that `http.allowed_origins` lists (or the
/// gateway's own) may read the answer; the `Origin` check in `handle` already refused the
/// others, whose answers get no CORS headers (the browser hides them).
fn cors(state: &HttpState, request: &HeaderMap, response: &mut HeaderMap) {
    let Some(origin) = request.get(header::ORIGIN) else {
        return;
    };
    if meshgate_web::origin::check(
        request,
        &state.config.read().allowed_origins,
        "http.allowed_origins",
    )
    .is_ok()
    {
        response.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    }
    response.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// The CORS preflight of a `POST {events_path}/{topic}` that a browser sends before a
/// cross-origin request with CloudEvents headers (`ce-*`, `Content-Type:
/// application/cloudevents+json`, `Authorization`): 204 with what may be sent for an allowed
/// origin, 403 otherwise.
async fn preflight(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    if let Err(why) = meshgate_web::origin::check(
        &headers,
        &state.config.read().allowed_origins,
        "http.allowed_origins",
    ) {
        state.metrics.error(ErrorKind::ForbiddenOrigin);
        return problem(StatusCode::FORBIDDEN, why.to_string());
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    if let Some(origin) = headers.get(header::ORIGIN) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST"),
        );
        // Binary mode's attributes are headers of any name (`ce-<extension>`): echo what the
        // page asks for (the Fetch standard's way to allow them).
        if let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
        }
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    r
}

/// Runs the checks and publishes; the ids of the accepted events.
async fn handle(
    state: &HttpState,
    peer: Option<std::net::SocketAddr>,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<String>, Refusal> {
    // The cap in force now: a reload may have moved it (requests in flight over a lowered cap
    // finish).
    let cap = state.config.read().max_in_flight;
    let Some(_permit) = state.in_flight.try_take(cap) else {
        state.metrics.error(ErrorKind::Saturated);
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{cap} requests are already in flight (http.max_in_flight); retry later"),
        ));
    };
    // A page of another origin may not publish through the visitor's browser (a text/plain
    // "simple request" needs no CORS preflight).
    if let Err(why) = meshgate_web::origin::check(
        headers,
        &state.config.read().allowed_origins,
        "http.allowed_origins",
    ) {
        state.metrics.error(ErrorKind::ForbiddenOrigin);
        return Err(Refusal::new(StatusCode::FORBIDDEN, why.to_string()));
    }
    let topic = topic_from_path(state, uri)?;
    let principal = authenticate(state, headers, peer).await?;
    // Authorized before the body is read: a client without the right is refused at once.
    let authorized = state
        .ctx
        .authorize(&state.metrics, &principal, topic)
        .map_err(|e| Refusal::new(StatusCode::FORBIDDEN, e.to_string()))?;
    let body = read_body(state, headers, body).await?;
    let events = decode(state, headers, authorized.topic(), body)?;
    let mut ids = Vec::with_capacity(events.len());
    // W3C Trace Context: the request's `traceparent` header is the parent of this hop (with
    // tracing on; `ce-traceparent`, the event's own, otherwise).
    let header_str = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let carried = (
        header_str(meshgate_core::trace::TRACEPARENT),
        header_str(meshgate_core::trace::TRACESTATE),
    );
    for mut event in events {
        meshgate_core::trace::adopt(&mut event, carried.0, carried.1);
        let id = event.id().to_owned();
        let origin = state.ctx.origin(0);
        let result = state
            .ctx
            .publish_envelope(
                &state.metrics,
                authorized.clone().envelope(Arc::new(event), origin),
            )
            .await;
        match result {
            Ok(()) => ids.push(id),
            Err(PublishError::Forbidden(e)) => {
                return Err(Refusal::new(StatusCode::FORBIDDEN, e.to_string()));
            }
            Err(PublishError::Backbone(e)) => {
                tracing::debug!(error = %e, "http: backbone refused an event");
                let detail = format!(
                    "{e}; {} event(s) of this request were accepted before it: {ids:?}",
                    ids.len()
                );
                let status = match e {
                    BackboneError::Rejected(_) | BackboneError::TopicTooLong(_) => {
                        StatusCode::UNPROCESSABLE_ENTITY
                    }
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                return Err(Refusal::new(status, detail));
            }
        }
    }
    Ok(ids)
}
