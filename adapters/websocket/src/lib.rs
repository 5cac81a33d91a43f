//! meshgate-websocket: browsers and other WebSocket clients on the CloudEvents WebSocket binding.
//!
//! `GET {websocket.path}` upgrades to a WebSocket speaking `cloudevents.json`: one JSON-format
//! CloudEvent per text frame, both ways. Clients publish by sending events (the topic is the
//! event's `subject`, or a fixed topic from config) and subscribe with `?subscribe=<filter>` at
//! connect or `io.meshgate.subscribe` events later (see [`binding`]).
//!
//! The handshake is refused with an HTTP status before any upgrade: 403 for a browser page of
//! another origin (`allowed_origins`), 400 without the `cloudevents.json` subprotocol (unless
//! `require_subprotocol = false`) or with more than `max_filters` filters, 401/403 for
//! credentials and subscribe permissions, 503 at `max_connections`, at the per-address or
//! per-user cap (`gateway.max_connections_per_ip`/`_per_user`) or during shutdown.

pub mod binding;
mod connection;
mod read_ahead;

use meshgate_core::metrics::{DropReason, ErrorKind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use meshgate_config::WebSocketConfig;
use meshgate_core::live::Live;
use meshgate_core::metrics::{AdapterMetrics, Counter};
use meshgate_core::{AdapterContext, AuthError, Credentials, TopicFilter};
use meshgate_web::PeerAddr;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig as Limits};

pub use connection::close_code;

/// Adapter name in metrics and logs.
pub const ADAPTER: &str = "websocket";

/// State shared by every connection of this adapter.
struct Shared {
    /// The `[websocket]` section in force: a reload may change its limits (read where each
    /// is checked; a connection's frame size and ping interval at its upgrade).
    config: Arc<Live<WebSocketConfig>>,
    ctx: AdapterContext,
    metrics: AdapterMetrics,
    dropped_slow: Counter,
    disconnected_slow: Counter,
    connections: AtomicUsize,
}

/// The WebSocket endpoint, to be merged into the gateway's web listener.
pub fn router(config: Arc<Live<WebSocketConfig>>, ctx: &AdapterContext) -> Router {
    let metrics = ctx.metrics(ADAPTER);
    let path = config.read().path.clone();
    let shared = Arc::new(Shared {
        config,
        ctx: ctx.clone(),
        dropped_slow: metrics.dropped(DropReason::SlowConsumer).clone(),
        disconnected_slow: ctx
            .registry
            .error_counter(ADAPTER, ErrorKind::SlowConsumerDisconnected),
        metrics,
        connections: AtomicUsize::new(0),
    });
    Router::new()
        .route(&path, get(handshake))
        .with_state(shared)
}

fn problem(status: StatusCode, detail: impl AsRef<str>) -> Response {
    meshgate_web::problem(status, detail.as_ref())
}

fn unauthorized(detail: &str) -> Response {
    let mut r = problem(StatusCode::UNAUTHORIZED, detail);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static(r#"Bearer realm="meshgate""#),
    );
    r
}

/// Decrements the connection count when the connection (or a refused handshake) ends.
struct ConnectionSlot(Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.connections.dec();
    }
}

/// Why a request is not a WebSocket upgrade (RFC 6455 §4.2.1), as axum's `WebSocketUpgrade`
/// checks it; `Ok` is the `Sec-WebSocket-Key`.
fn upgrade_key(request: &Request) -> Result<&HeaderValue, &'static str> {
    let headers = request.headers();
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if request.method() != Method::GET {
        return Err("the method must be GET");
    }
    if !has(header::CONNECTION, "upgrade") {
        return Err("`Connection` must contain `upgrade`");
    }
    if !has(header::UPGRADE, "websocket") {
        return Err("`Upgrade` must be `websocket`");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err("`Sec-WebSocket-Version` must be 13");
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("`Sec-WebSocket-Key` is missing")
}

fn bearer_from_headers(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The upgrade is done here rather than by axum's `WebSocketUpgrade`, so that the socket under
/// tungstenite can be wrapped ([`read_ahead`]: no read buffer while idle).
async fn handshake(
    State(shared): State<Arc<Shared>>,
    PeerAddr(peer): PeerAddr,
    mut request: Request,
) -> Response {
    let accept = match upgrade_key(&request) {
        Ok(key) => tungstenite::handshake::derive_accept_key(key.as_bytes()),
        Err(why) => {
            shared.metrics.error(ErrorKind::BadHandshake);
            return problem(
                StatusCode::BAD_REQUEST,
                format!("this endpoint only accepts WebSocket upgrades: {why}"),
            );
        }
    };
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        shared.metrics.error(ErrorKind::BadHandshake);
        return problem(
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        );
    };
    let headers = request.headers();
    let uri = request.uri();
    // The section as it is now (a reload may replace it): one read for the whole handshake,
    // so that what a refusal names is what was enforced.
    let config = shared.config.get();
    if shared.ctx.shutdown.is_cancelled() {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down",
        );
    }
    // Cross-site WebSocket hijacking: a page of another origin must not use the visitor's
    // network position (or cookies) to subscribe.
    if let Err(refusal) = meshgate_web::origin::check(
        headers,
        &config.allowed_origins,
        "websocket.allowed_origins",
    ) {
        shared.metrics.error(ErrorKind::ForbiddenOrigin);
        return problem(StatusCode::FORBIDDEN, refusal.to_string());
    }
    // One address may not take every slot; held for the connection's life.
    let ip_permit = match peer.map(|p| shared.ctx.limits.acquire_ip(p.ip())) {
        None => None,
        Some(Ok(permit)) => Some(permit),
        Some(Err(e)) => {
            shared.metrics.error(e.metric_kind());
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; close another connection or retry later"),
            );
        }
    };
    let protocols = meshgate_web::offered_subprotocols(headers);
    let negotiated = match binding::negotiate(protocols, config.require_subprotocol) {
        Ok(n) => n,
        Err(refusal) => {
            shared.metrics.error(ErrorKind::BadHandshake);
            return problem(StatusCode::BAD_REQUEST, refusal.0);
        }
    };
    let params = match binding::parse_query(uri.query()) {
        Ok(p) => p,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let token = bearer_from_headers(headers).or(params.access_token.as_deref());
    let credentials = token.map_or(Credentials::None, Credentials::Token);
    let login = shared
        .ctx
        .authorizer
        .authenticate(credentials, peer.map(|p| p.ip()))
        .await;
    let principal = match login {
        Ok(p) => p,
        Err(e @ (AuthError::RateLimited { .. } | AuthError::Busy)) => {
            shared.metrics.error(ErrorKind::Unauthorized);
            let (status, retry_after) = match e {
                AuthError::RateLimited { retry_after } => {
                    (StatusCode::TOO_MANY_REQUESTS, retry_after.as_secs().max(1))
                }
                _ => (StatusCode::SERVICE_UNAVAILABLE, 1),
            };
            let mut r = problem(status, e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(retry_after));
            return r;
        }
        Err(AuthError::Required) => {
            shared.metrics.error(ErrorKind::Unauthorized);
            return unauthorized(
                "authentication required: send `Authorization: Bearer <token>` or `?access_token=<token>`",
            );
        }
        Err(AuthError::InvalidToken(why)) => {
            shared.metrics.error(ErrorKind::Unauthorized);
            return unauthorized(&format!("invalid token: {why}"));
        }
        Err(_) => {
            shared.metrics.error(ErrorKind::Unauthorized);
            return unauthorized("invalid token");
        }
    };
    let max_filters = config.max_filters;
    if params.subscribe.len() > max_filters {
        shared.metrics.error(ErrorKind::TooManyFilters);
        return problem(
            StatusCode::BAD_REQUEST,
            format!(
                "{} topic filters requested; at most {max_filters} per connection (websocket.max_filters)",
                params.subscribe.len()
            ),
        );
    }
    let user_permit = match shared.ctx.limits.acquire_user(&principal) {
        Ok(permit) => permit,
        Err(e) => {
            shared.metrics.error(e.metric_kind());
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; close another connection or retry later"),
            );
        }
    };
    let mut filters = Vec::new();
    for f in &params.subscribe {
        let filter = match TopicFilter::parse(f) {
            Ok(f) => f,
            Err(e) => return problem(StatusCode::BAD_REQUEST, format!("subscribe: {e}")),
        };
        // Refused here with 403; the connection checks again (and learns whether the
        // subscription is filtered) when it subscribes.
        if let Err(e) = shared.ctx.authorizer.check_subscribe(&principal, &filter) {
            shared.metrics.error(ErrorKind::Forbidden);
            return problem(StatusCode::FORBIDDEN, e.to_string());
        }
        filters.push(filter);
    }
    let previous = shared.connections.fetch_add(1, Ordering::AcqRel);
    shared.metrics.connections.inc();
    let slot = ConnectionSlot(shared.clone());
    if previous >= config.max_connections {
        shared.metrics.error(ErrorKind::TooManyConnections);
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "connection limit of {} reached; retry later",
                config.max_connections
            ),
        );
    }
    let limits = Limits::default()
        .read_buffer_size(read_ahead::TUNGSTENITE_READ)
        .write_buffer_size(meshgate_core::limits::WEBSOCKET_WRITE_BUFFER)
        .max_message_size(Some(config.max_message_size))
        .max_frame_size(Some(config.max_message_size));
    // Listed for the admin API (when it is on) from here; told to close through its waker
    // (`Connection::poll_closed`), so no token per connection.
    let listed = shared
        .ctx
        .connections
        .register_if_on(meshgate_core::connections::NewConnection {
            id: shared.ctx.next_connection_id(),
            protocol: "websocket",
            version: match negotiated {
                binding::Negotiated::CloudEventsJson => binding::SUBPROTOCOL,
                binding::Negotiated::CompatJson => "none",
            },
            principal: principal.clone(),
            client_id: None,
            peer,
        });
    let tracker = shared.ctx.tracker.clone();
    tokio::spawn(tracker.track_future(async move {
        let _slots = (slot, ip_permit, user_permit);
        // Fulfilled once hyper has written the 101 below; fails if the client left before.
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        // In a block, so the stream moved into `run` is not kept beside it in this task.
        let connection = {
            let io = read_ahead::ReadAhead::new(TokioIo::new(upgraded));
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(limits)).await;
            connection::run(socket, shared, principal, filters, listed)
        };
        connection.await;
    }));
    let mut response = (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static("websocket")),
        ],
    )
        .into_response();
    let h = response.headers_mut();
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if negotiated == binding::Negotiated::CloudEventsJson {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(binding::SUBPROTOCOL),
        );
    }
    response
}
