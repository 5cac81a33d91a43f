//! The HTTP/1.1 server of the web and admin listeners: our own accept loop around hyper's
//! connection, because `axum::serve` cannot be given what a listener facing the internet needs.
//!
//! - **Connection cap, counted at accept** (`http.max_connections`, `admin.max_connections`).
//!   A socket holds its slot for its whole life, including after a WebSocket upgrade (the slot
//!   lives in the socket wrapper, which hyper hands to the upgraded connection). Past the cap
//!   the new socket gets a bare `503` (written only if the socket takes it at once) and is
//!   closed, counted as `meshgate_errors_total{adapter,kind="connection_limit"}`.
//! - **Header-read timeout and keep-alive idle timeout.** axum 0.8.9 (`src/serve/mod.rs:391`)
//!   builds hyper's connection without a timer, and hyper turns every default timeout off when
//!   there is none (hyper 1.12 `src/common/time.rs:73-79`). We give hyper a [`HeadTimer`]. Hyper
//!   starts its header-read timer whenever it begins waiting for a request head — at accept and
//!   again as soon as a keep-alive connection has sent its response (`src/proto/h1/conn.rs:224-
//!   240`, re-armed via `notify_read` at `:1156-1161`) — so on its own it could not tell "idle
//!   between requests" from "slow head". The timer's sleep watches the socket's read counter:
//!   for a connection's first request the head must be complete `header_read_timeout` after
//!   accept; on a keep-alive connection the next request's first byte must come within
//!   `idle_timeout`, and its head must be complete `header_read_timeout` after that byte.
//! - **Every refusal says why and is counted.** A path the listener does not serve gets a 404
//!   problem reply, a method its path does not take a 405 (with axum's `Allow`), counted as
//!   `not_found` / `method_not_allowed`. A request head hyper cannot read is answered by hyper
//!   itself (400, 414, 431: hyper 1.12 `src/proto/h1/role.rs:493-511`) with an empty body and
//!   no hook to give it one; [`Socket`] recognises that automatic head as it is written and
//!   sends a problem reply with the same status in its place (see [`automatic_reply`]).
//!   Counted as `bad_request`, `uri_too_long`, `header_too_large`.
//! - `TCP_NODELAY` on every accepted socket (responses and WebSocket frames are written whole;
//!   Nagle would only delay them).
//! - Graceful shutdown: stop accepting, let in-flight requests finish, serve a request whose
//!   bytes already reached a keep-alive connection (its reply closes the connection), close
//!   keep-alive connections once quiet for `SHUTDOWN_QUIET` (hyper's `graceful_shutdown`),
//!   return once every connection task ended. Upgraded WebSocket connections are not waited for here (they are tracked by the
//!   adapters and closed after the backbone drained).

use meshgate_core::metrics::ErrorKind;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use meshgate_core::metrics::{Counter, Gauge, Registry};
use meshgate_core::tls_server::ReloadingAcceptor;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::tls_stream::Stream;
use meshgate_core::live::{Live, Slot, Slots};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service as _;

/// At shutdown, how long a keep-alive connection must have read nothing before it is closed
/// (see `connection`): long enough for bytes already in the socket to be read, short
/// against `gateway.shutdown_grace`.
const SHUTDOWN_QUIET: Duration = Duration::from_millis(250);

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time for a request head to arrive completely (see the module documentation).
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection may wait for its next request's first byte.
    pub idle_timeout: Duration,
    /// Sockets held at once.
    pub max_connections: usize,
    /// The config key of `max_connections`, for the refusal's message.
    pub max_connections_key: &'static str,
    /// Largest request head, request line included (hyper's http1 `max_header_size`; without
    /// it hyper stops at its read buffer's ~408 KiB); a larger one gets 431.
    pub max_header_size: usize,
}

impl Limits {
    /// The `http` section's timeouts and head size (the admin listener uses them too), with
    /// this listener's own connection cap and its config key.
    pub fn of(
        http: &meshgate_config::HttpConfig,
        max_connections: usize,
        max_connections_key: &'static str,
    ) -> Limits {
        Limits {
            header_read_timeout: http.header_read_timeout,
            idle_timeout: http.idle_timeout,
            max_connections,
            max_connections_key,
            max_header_size: http.max_header_size,
        }
    }
}

/// What a listener counts, under `meshgate_errors_total{adapter=<name>}` and
/// `meshgate_connections{adapter=<name>}`.
#[derive(Debug, Clone)]
pub struct Counters {
    refused: Counter,
    header_timeouts: Counter,
    headers_too_large: Counter,
    uris_too_long: Counter,
    bad_heads: Counter,
    not_found: Counter,
    method_not_allowed: Counter,
    tls_failed: Counter,
    tls_timeouts: Counter,
    open: Gauge,
}

impl Counters {
    pub fn new(registry: &Registry, adapter: &'static str) -> Counters {
        let error = |kind| registry.error_counter(adapter, kind);
        Counters {
            refused: error(ErrorKind::ConnectionLimit),
            header_timeouts: error(ErrorKind::HeaderTimeout),
            headers_too_large: error(ErrorKind::HeaderTooLarge),
            uris_too_long: error(ErrorKind::UriTooLong),
            bad_heads: error(ErrorKind::BadRequest),
            not_found: error(ErrorKind::NotFound),
            method_not_allowed: error(ErrorKind::MethodNotAllowed),
            tls_failed: error(ErrorKind::TlsHandshake),
            tls_timeouts: error(ErrorKind::TlsHandshakeTimeout),
            open: registry.gauge(meshgate_core::metrics::CONNECTIONS, &[("adapter", adapter)]),
        }
    }
}

/// The reply written to a socket refused at the cap, if its send buffer takes it at once (a
/// fresh socket's does); never waited for.
fn refusal(key: &str) -> Vec<u8> {
    let body = format!("connection limit reached ({key}); retry later\n");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `router` with problem replies for a path it does not serve (404) and a method a path does
/// not take (405), each counted. Added here, after every adapter's routes were merged:
/// axum applies the 405 fallback to the method routers registered before it.
fn with_refusals(router: Router, counters: &Counters) -> Router {
    let (not_found, not_allowed) = (
        counters.not_found.clone(),
        counters.method_not_allowed.clone(),
    );
    router
        .fallback(move |uri: axum::http::Uri| {
            not_found.inc();
            let detail = format!("nothing is served at {}", uri.path());
            std::future::ready(meshgate_web::problem(StatusCode::NOT_FOUND, &detail))
        })
        .method_not_allowed_fallback(move |method: axum::http::Method| {
            not_allowed.inc();
            let detail = format!("{method} is not allowed here; the Allow header lists what is");
            std::future::ready(meshgate_web::problem(
                StatusCode::METHOD_NOT_ALLOWED,
                &detail,
            ))
        })
}

/// Serves `router` on `listener` until `stop` is cancelled, then waits for the connections'
/// in-flight requests. With `tls`, each connection's TLS handshake comes first (within
/// `header_read_timeout`), with the acceptor's files as they are at that moment.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Arc<Live<Limits>>,
    counters: Counters,
    stop: CancellationToken,
    tls: Option<Arc<ReloadingAcceptor>>,
) -> io::Result<()> {
    let slots = Slots::new();
    let refused = refusal(limits.get().max_connections_key);
    let router = with_refusals(router, &counters);
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors (EMFILE/ENFILE) and the like: wait for some to be
                // given back instead of spinning (what axum and hyper 0.14 do too).
                tracing::error!(error = %e, "web listener: accept failed; retrying in 1 s");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // The bounds in force now (a reload may have changed them): this connection keeps them.
        let limits = **limits.read();
        let Some(slot) = slots.try_take(limits.max_connections) else {
            counters.refused.inc();
            // Plain HTTP only: on a TLS listener those bytes would be noise to the client.
            if tls.is_none() {
                let _ = stream.try_write(&refused);
            }
            drop(stream);
            continue;
        };
        // Only a latency setting: a socket that refuses it is served anyway.
        let _ = stream.set_nodelay(true);
        connections.spawn(connection(
            stream,
            slot,
            tls.as_ref().map(|t| t.acceptor()),
            peer,
            router.clone(),
            limits,
            counters.clone(),
            stop.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[allow(clippy::too_many_arguments)] // one connection's whole context, passed once
async fn connection(
    stream: TcpStream,
    slot: Slot,
    tls: Option<tokio_rustls::TlsAcceptor>,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    counters: Counters,
    stop: CancellationToken,
) {
    let stream = match tls {
        None => Stream::Plain(stream),
        Some(acceptor) => {
            let handshake = acceptor.accept(stream);
            match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                Ok(Err(e)) => {
                    counters.tls_failed.inc();
                    tracing::debug!(%peer, error = %e, "web listener: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    counters.tls_timeouts.inc();
                    return;
                }
            }
        }
    };
    let io = Socket::new(stream, slot, counters.open.clone(), limits.max_header_size);
    let activity = io.activity.clone();
    let closing = activity.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        // The peer address for handlers (`ConnectInfo<SocketAddr>`): per-address caps.
        request.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        let closing = closing.clone();
        // `Router` is always ready (its `poll_ready` returns `Ready` without side effects).
        let reply = router.call(request);
        async move {
            let mut response = reply.await?;
            // Shutting down: this reply is the connection's last (hyper closes after a
            // `connection: close` reply, 1.12 `src/proto/h1/role.rs:847-850`).
            if closing.closing.load(Ordering::Relaxed) {
                response.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(HeadTimer {
            activity: activity.clone(),
            header: limits.header_read_timeout,
            idle: limits.idle_timeout,
            heads: AtomicBool::new(false),
        })
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_size);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stop.cancelled() => {
            activity.closing.store(true, Ordering::Relaxed);
            // A request that reached the socket before the stop is served, never answered
            // with a closed socket: hyper's `graceful_shutdown` closes a connection at once
            // when it is between requests, even with the next request's bytes already in the
            // socket (unread, which makes the close a reset). So the connection runs on until
            // it has been quiet (no byte read) for `SHUTDOWN_QUIET`; a reply given meanwhile
            // carries `connection: close` and ends it.
            loop {
                let reads = activity.reads.load(Ordering::Relaxed);
                match tokio::time::timeout(SHUTDOWN_QUIET, conn.as_mut()).await {
                    Ok(result) => break result,
                    Err(_) if activity.reads.load(Ordering::Relaxed) == reads => {
                        conn.as_mut().graceful_shutdown();
                        break conn.await;
                    }
                    Err(_) => {}
                }
            }
        }
    };
    if let Err(e) = result {
        // A keep-alive connection closed for idleness is no error; a head too slow is.
        if e.is_timeout() && !activity.idle_closed.load(Ordering::Relaxed) {
            counters.header_timeouts.inc();
        } else if e.is_parse_too_large() {
            // hyper's one predicate covers both; the reply written tells them apart.
            match activity.automatic_reply.load(Ordering::Relaxed) {
                414 => counters.uris_too_long.inc(),
                _ => counters.headers_too_large.inc(),
            }
        } else if e.is_parse() {
            counters.bad_heads.inc();
        }
        tracing::trace!(%peer, error = %e, "web connection ended with an error");
    }
}

/// What the socket and its [`HeadTimer`] share.
#[derive(Debug, Default)]
struct Activity {
    /// Bytes read from the socket so far.
    reads: AtomicU64,
    /// The timer fired while a keep-alive connection waited for its next request.
    idle_closed: AtomicBool,
    /// The status of hyper's automatic reply to a head it could not read, once written.
    automatic_reply: AtomicU16,
    /// The listener is stopping: replies end their connection.
    closing: AtomicBool,
}

/// A listener's socket: counts the bytes read (for [`HeadTimer`]) and holds the listener slot
/// and the open-connections gauge until dropped — after an upgrade, when the WebSocket closes.
struct Socket {
    inner: Stream,
    activity: Arc<Activity>,
    _slot: Slot,
    open: Gauge,
    /// For the 431 reply's detail.
    max_header_size: usize,
    /// A problem reply being written in place of hyper's automatic one: the bytes, how many
    /// went out, and the length of hyper's head to report as written once they all did.
    replacing: Option<(Vec<u8>, usize, usize)>,
}

impl Socket {
    fn new(inner: Stream, slot: Slot, open: Gauge, max_header_size: usize) -> Socket {
        open.inc();
        Socket {
            inner,
            activity: Arc::default(),
            _slot: slot,
            open,
            max_header_size,
            replacing: None,
        }
    }

    /// Writes the replacement of an automatic reply; `Ready(Ok(n))` with hyper's length once
    /// it is all out.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some((bytes, sent, reported)) = &mut self.replacing {
            if *sent == bytes.len() {
                let reported = *reported;
                self.replacing = None;
                return Poll::Ready(Ok(reported));
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *sent += n,
                other => return other,
            }
        }
        Poll::Ready(Ok(0))
    }

    /// Starts replacing `head` when it is hyper's automatic reply.
    fn replace_if_automatic(&mut self, head: &[u8]) -> bool {
        let Some(status) = automatic_reply(head) else {
            return false;
        };
        self.activity
            .automatic_reply
            .store(status.as_u16(), Ordering::Relaxed);
        let reply = problem_reply(status, self.max_header_size);
        self.replacing = Some((reply, 0, head.len()));
        true
    }
}

/// The status of `head` when it is hyper's own reply to a request head it could not read:
/// the whole of a bodyless 400, 414 or 431 head (`content-length: 0`). The handlers behind
/// the router never send those bodyless.
fn automatic_reply(head: &[u8]) -> Option<StatusCode> {
    let status = match head.get(..13)? {
        b"HTTP/1.1 400 " => StatusCode::BAD_REQUEST,
        b"HTTP/1.1 414 " => StatusCode::URI_TOO_LONG,
        b"HTTP/1.1 431 " => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        _ => return None,
    };
    let bodyless = head.ends_with(b"\r\n\r\n")
        && head
            .windows(21)
            .any(|w| w.eq_ignore_ascii_case(b"\r\ncontent-length: 0\r\n"));
    bodyless.then_some(status)
}

/// The problem reply sent instead of hyper's bodyless one; the connection closes after it
/// (hyper stops reading after a head it could not parse).
fn problem_reply(status: StatusCode, max_header_size: usize) -> Vec<u8> {
    let detail = match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => format!(
            "the request line and headers are over {max_header_size} bytes \
             (http.max_header_size); send fewer or shorter headers"
        ),
        StatusCode::URI_TOO_LONG => {
            "the request target is over 65,534 bytes; shorten the path and query".to_owned()
        }
        _ => "the request line or a header is not valid HTTP/1.1".to_owned(),
    };
    let reason = status.canonical_reason().unwrap_or("");
    let body = meshgate_core::problem::body(status.as_u16(), reason, &detail);
    format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        status.as_u16(),
        meshgate_core::problem::CONTENT_TYPE,
        body.len()
    )
    .into_bytes()
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.activity
                .reads
                .fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.replacing.is_some() || self.replace_if_automatic(buf) {
            return self.poll_replacement(cx);
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // hyper's automatic reply is a head alone, the first (and only) slice.
        if self.replacing.is_some() || self.replace_if_automatic(bufs.first().map_or(&[], |b| b)) {
            return self.poll_replacement(cx);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper's timer for one connection. hyper uses it only for the header-read timeout
/// (http1 server, no HTTP/2 here): one sleep per request head, created when hyper starts
/// waiting for that head.
struct HeadTimer {
    activity: Arc<Activity>,
    header: Duration,
    idle: Duration,
    /// Whether a head was waited for before (then the connection is a keep-alive one).
    heads: AtomicBool,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, _deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let now = tokio::time::Instant::now();
        let keep_alive = self.heads.swap(true, Ordering::Relaxed);
        // A fresh connection's first head is due `header` after accept; a keep-alive
        // connection may first wait up to `idle` for the next request to begin.
        let first_wait = if keep_alive { self.idle } else { self.header };
        Box::pin(HeadSleep {
            reads_at_start: self.activity.reads.load(Ordering::Relaxed),
            activity: self.activity.clone(),
            header: self.header,
            waiting_for_first_byte: keep_alive,
            sleep: Box::pin(tokio::time::sleep_until(now + first_wait)),
        })
    }
}

/// The deadline of one request head (see [`HeadTimer`]).
struct HeadSleep {
    activity: Arc<Activity>,
    reads_at_start: u64,
    header: Duration,
    /// Keep-alive wait: the deadline moves to `first byte + header` once a byte arrives.
    waiting_for_first_byte: bool,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls this each time its head parse is still incomplete, i.e. after every read
        // of a partial head: a byte read since the wait began starts the head's own clock.
        if self.waiting_for_first_byte
            && self.activity.reads.load(Ordering::Relaxed) != self.reads_at_start
        {
            self.waiting_for_first_byte = false;
            let head_due = tokio::time::Instant::now() + self.header;
            let idle_due = self.sleep.deadline();
            self.sleep.as_mut().reset(head_due.min(idle_due));
        }
        let fired = self.sleep.as_mut().poll(cx);
        if fired.is_ready() && self.waiting_for_first_byte {
            self.activity.idle_closed.store(true, Ordering::Relaxed);
        }
        fired
    }
}

impl hyper::rt::Sleep for HeadSleep {}
