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

use meshgate_core::metrics::{DropReason, ErrorKind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;
use axum::routing::get;
use meshgate_config::WebSocketConfig;
use meshgate_core::metrics::{AdapterMetrics, Counter};
use meshgate_core::{AdapterContext, AuthError, Credentials, TopicFilter};
use meshgate_web::PeerAddr;

pub use connection::close_code;

/// Adapter name in metrics and logs.
pub const ADAPTER: &str = "websocket";

/// State shared by every connection of this adapter.
struct Shared {
    config: WebSocketConfig,
    ctx: AdapterContext,
    metrics: AdapterMetrics,
    dropped_slow: Counter,
    disconnected_slow: Counter,
    connections: AtomicUsize,
}

/// The WebSocket endpoint, to be merged into the gateway's web listener.
pub fn router(config: &WebSocketConfig, ctx: &AdapterContext) -> Router {
    let metrics = ctx.metrics(ADAPTER);
    let shared = Arc::new(Shared {
        config: config.clone(),
        ctx: ctx.clone(),
        dropped_slow: metrics.dropped(DropReason::SlowConsumer).clone(),
        disconnected_slow: ctx
            .registry
            .error_counter(ADAPTER, ErrorKind::SlowConsumerDisconnected),
        metrics,
        connections: AtomicUsize::new(0),
    });
    Router::new()
        .route(&config.path, get(handshake))
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

fn bearer_from_headers(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn handshake(
    State(shared): State<Arc<Shared>>,
    PeerAddr(peer): PeerAddr,
    headers: HeaderMap,
    uri: Uri,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => {
            shared.metrics.error(ErrorKind::BadHandshake);
            return problem(
                StatusCode::BAD_REQUEST,
                format!("this endpoint only accepts WebSocket upgrades: {rejection}"),
            );
        }
    };
    if shared.ctx.shutdown.is_cancelled() {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down",
        );
    }
    // Cross-site WebSocket hijacking: a page of another origin must not use the visitor's
    // network position (or cookies) to subscribe.
    if let Err(refusal) = meshgate_web::origin::check(
        &headers,
        &shared.config.allowed_origins,
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
    let protocols = meshgate_web::offered_subprotocols(&headers);
    let negotiated = match binding::negotiate(protocols, shared.config.require_subprotocol) {
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
    let token = bearer_from_headers(&headers).or(params.access_token.as_deref());
    let credentials = token.map_or(Credentials::None, Credentials::Token);
    let principal = match shared.ctx.authorizer.authenticate(credentials) {
        Ok(p) => p,
        Err(AuthError::Required) => {
            shared.metrics.error(ErrorKind::Unauthorized);
            return unauthorized(
                "authentication required: send `Authorization: Bearer <token>` or `?access_token=<token>`",
            );
        }
        Err(_) => {
            shared.metrics.error(ErrorKind::Unauthorized);
            return unauthorized("invalid token");
        }
    };
    let max_filters = shared.config.max_filters;
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
        let grant = match shared.ctx.authorizer.check_subscribe(&principal, &filter) {
            Ok(grant) => grant,
            Err(e) => {
                shared.metrics.error(ErrorKind::Forbidden);
                return problem(StatusCode::FORBIDDEN, e.to_string());
            }
        };
        filters.push((filter, grant));
    }
    let previous = shared.connections.fetch_add(1, Ordering::AcqRel);
    shared.metrics.connections.inc();
    let slot = ConnectionSlot(shared.clone());
    if previous >= shared.config.max_connections {
        shared.metrics.error(ErrorKind::TooManyConnections);
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "connection limit of {} reached; retry later",
                shared.config.max_connections
            ),
        );
    }
    let mut upgrade = upgrade
        .read_buffer_size(meshgate_core::limits::WEBSOCKET_READ_BUFFER)
        .write_buffer_size(meshgate_core::limits::WEBSOCKET_WRITE_BUFFER)
        .max_message_size(shared.config.max_message_size)
        .max_frame_size(shared.config.max_message_size);
    if negotiated == binding::Negotiated::CloudEventsJson {
        upgrade = upgrade.protocols([binding::SUBPROTOCOL]);
    }
    let tracker = shared.ctx.tracker.clone();
    upgrade.on_upgrade(move |socket| {
        tracker.track_future(async move {
            let _slots = (slot, ip_permit, user_permit);
            connection::run(socket, shared, principal, filters).await;
        })
    })
}
