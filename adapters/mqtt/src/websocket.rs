//! MQTT over WebSocket (MQTT 5 §6, 3.1.1 §6): the `mqtt` subprotocol, MQTT packets in binary
//! frames. The WebSocket is read and written as a byte stream ([`WsStream`]) by the very same
//! session code as TCP connections, in the upgraded connection's task, so browser MQTT clients
//! (MQTT.js, Paho JS) get the same broker.

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
use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{Shared, SocketSlot, session};

/// The subprotocol MQTT over WebSocket requires.
pub const SUBPROTOCOL: &str = "mqtt";

/// tungstenite's read buffer: made at the upgrade, zero-filled to this size at the first read
/// (tungstenite 0.29, `FrameCodec::read_in`), so it is resident in every connection that sent
/// CONNECT; and the most one read call takes. 1 KiB: an idle MQTT over WebSocket connection
/// cost 6.5 KiB with 4 KiB, 3.5 with 1 KiB (issue 23), for a read call per KiB of a larger
/// frame. (The CloudEvents WebSocket listener gives tungstenite 256 bytes over a read-ahead
/// buffer that exists only while bytes wait, `adapters/websocket/src/read_ahead.rs`; that
/// needs its own upgrade instead of axum's, not done here yet.)
const READ_BUFFER: usize = 1 << 10;

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
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(meshgate_core::limits::WEBSOCKET_WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let peer = session::Peer::new(peer, session::Transport::WebSocket);
            // Both held for the connection's life.
            let held = (slot, ip_permit);
            // A task of its own, so axum's upgrade task ends here: in it, the session would sit
            // beside the upgrade's state and a moved-from copy of the WebSocket for the
            // connection's life.
            tracker.spawn(session::run(
                WsStream::new(socket),
                shared,
                peer,
                None,
                held,
            ));
            std::future::ready(())
        })
}

/// A WebSocket as the session's byte stream: binary messages in, one binary message out per
/// write. Read and written in the connection's own task, as a TCP socket is: no second task,
/// no in-memory pipe between the two and no locks to share the socket (an idle MQTT over
/// WebSocket connection cost 9.5 KiB that way; issue 23).
pub(crate) struct WsStream {
    ws: WebSocket,
    /// What the session has not read yet of the last binary message.
    rest: Bytes,
    /// The client closed, sent text (not MQTT) or failed: end of stream for the session, an
    /// abnormal end (its will is published).
    ended: bool,
    /// A write's message was handed to the WebSocket and waits for its flush: the write is
    /// done once flushed (a retried write with the same bytes does not send them twice).
    flushing: bool,
    /// The close frame was handed to the WebSocket.
    close_sent: bool,
}

impl WsStream {
    pub(crate) fn new(ws: WebSocket) -> WsStream {
        WsStream {
            ws,
            rest: Bytes::new(),
            ended: false,
            flushing: false,
            close_sent: false,
        }
    }

    fn ws(&mut self) -> Pin<&mut WebSocket> {
        Pin::new(&mut self.ws)
    }
}

fn io_error(e: axum::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl AsyncRead for WsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        while this.rest.is_empty() && !this.ended {
            // (tungstenite answers pings itself, on this read or the next.)
            match ready!(this.ws().poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => this.rest = b,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_) | Message::Close(_))) | Some(Err(_)) | None => {
                    this.ended = true;
                }
            }
        }
        let n = this.rest.len().min(buf.remaining());
        buf.put_slice(&this.rest[..n]);
        this.rest.advance(n);
        if this.rest.is_empty() {
            // An empty slice still holds the frame's buffer (tungstenite's read buffer, shared).
            this.rest = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for WsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if !this.flushing {
            ready!(this.ws().poll_ready(cx)).map_err(io_error)?;
            this.ws()
                .start_send(Message::Binary(Bytes::copy_from_slice(data)))
                .map_err(io_error)?;
            this.flushing = true;
        }
        // Flushed before the write counts as done: the session writes a batch and then waits
        // for the client, not for another write that would push this one out.
        let flushed = ready!(this.ws().poll_flush(cx));
        this.flushing = false;
        flushed.map_err(io_error)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.ws().poll_flush(cx).map_err(io_error)
    }

    /// A close frame (1000, normal closure), flushed.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.close_sent {
            ready!(this.ws().poll_ready(cx)).map_err(io_error)?;
            this.ws()
                .start_send(Message::Close(Some(CloseFrame {
                    code: 1000,
                    reason: "".into(),
                })))
                .map_err(io_error)?;
            this.close_sent = true;
        }
        this.ws().poll_flush(cx).map_err(io_error)
    }
}
