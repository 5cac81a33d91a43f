//! MQTT over WebSocket (MQTT 5 §6, 3.1.1 §6): the `mqtt` subprotocol, MQTT packets in binary
//! frames. The frames are bridged to an in-memory byte stream and run through the very same
//! session code as TCP connections, so browser MQTT clients (MQTT.js, Paho JS) get the same
//! broker.

use meshgate_core::metrics::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Shared, SocketSlot, session};

/// The subprotocol MQTT over WebSocket requires.
pub const SUBPROTOCOL: &str = "mqtt";

pub(crate) fn router(path: &str, shared: Arc<Shared>) -> Router {
    Router::new().route(path, get(upgrade)).with_state(shared)
}

use meshgate_web::problem as refuse;

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Ok(ws) = ws else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "this endpoint only accepts WebSocket upgrades (subprotocol mqtt)",
        );
    };
    let offered =
        meshgate_web::offered_subprotocols(&headers).any(|p| p.eq_ignore_ascii_case(SUBPROTOCOL));
    if !offered {
        return refuse(
            StatusCode::BAD_REQUEST,
            "MQTT over WebSocket needs the `mqtt` subprotocol (Sec-WebSocket-Protocol: mqtt)",
        );
    }
    if shared.ctx.shutdown.is_cancelled() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down",
        );
    }
    // The same hard cap as the TCP accept loop (`mqtt.max_connections` and the few sockets
    // kept to answer "server busy"): MQTT over WebSocket counts against it too, so a flood of
    // upgrades cannot lock MQTT over TCP out (review F19).
    if shared.at_hard_cap() {
        shared.metrics.error(ErrorKind::TooManyConnections);
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "MQTT connection limit reached (mqtt.max_connections); retry later",
        );
    }
    // Per source address, when the web listener tells it (it is served with connect info).
    let peer = extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let ip_permit = match extensions.get::<ConnectInfo<SocketAddr>>() {
        None => None,
        Some(ConnectInfo(peer)) => match shared.ctx.limits.acquire_ip(peer.ip()) {
            Ok(p) => Some(p),
            Err(e) => {
                shared.metrics.error(e.metric_kind());
                return refuse(StatusCode::TOO_MANY_REQUESTS, &e.to_string());
            }
        },
    };
    shared.sockets.fetch_add(1, Ordering::AcqRel);
    let slot = SocketSlot(shared.clone());
    let tracker = shared.ctx.tracker.clone();
    // A frame and a message are both at most one MQTT packet (and the WebSocket framing):
    // tungstenite would otherwise buffer frames up to its 16 MiB default (review F19).
    // (A reload between this upgrade and CONNACK may announce another size: the frame
    // bound follows the section as it is now, the packet bound what CONNACK says.)
    let max = shared.config.read().max_packet_size + 8;
    ws.protocols([SUBPROTOCOL])
        .read_buffer_size(meshgate_core::limits::WEBSOCKET_READ_BUFFER)
        .write_buffer_size(meshgate_core::limits::WEBSOCKET_WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            tracker.track_future(async move {
                let (_slot, _ip_permit) = (slot, ip_permit);
                bridge(socket, shared, peer).await;
            })
        })
}

/// Runs a session over the WebSocket: binary frames in → session bytes, session bytes → binary
/// frames out.
async fn bridge(socket: WebSocket, shared: Arc<Shared>, peer: Option<SocketAddr>) {
    let (client_side, session_side) = tokio::io::duplex(64 * 1024);
    let (mut from_session, mut to_session) = tokio::io::split(client_side);
    let (mut ws_tx, mut ws_rx) = socket.split();
    let peer = session::Peer::new(peer, session::Transport::WebSocket);
    let session = tokio::spawn(session::run(session_side, shared, peer, None, ()));
    let inbound = async move {
        while let Some(Ok(msg)) = ws_rx.next().await {
            match msg {
                Message::Binary(b) => {
                    if to_session.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Message::Text(_) => break,
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
        // The session sees end-of-stream: an abnormal end, so the will is published.
        let _ = to_session.shutdown().await;
    };
    let outbound = async move {
        // Each read is sent as it is, without a copy, so the buffer is given away with it and
        // made again for the next read: small while the session writes little (an idle
        // connection waits with 256 bytes; 16 KiB reserved for each wait cost ~10 KiB of RSS
        // per idle connection, as the allocator hands out touched memory), 16 KiB once a read
        // filled what it had.
        let mut buf = BytesMut::new();
        let mut busy = false;
        loop {
            buf.reserve(if busy { 16 * 1024 } else { 256 });
            match from_session.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    busy = n >= 256;
                    let chunk = buf.split().freeze();
                    if ws_tx.send(Message::Binary(chunk)).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx
            .send(Message::Close(Some(CloseFrame {
                code: 1000,
                reason: "".into(),
            })))
            .await;
    };
    tokio::select! {
        _ = inbound => {}
        _ = outbound => {}
    }
    let _ = session.await;
}
