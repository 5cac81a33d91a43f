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
//! - `TCP_NODELAY` on every accepted socket (responses and WebSocket frames are written whole;
//!   Nagle would only delay them).
//! - Graceful shutdown as before: stop accepting, let in-flight requests finish, close idle
//!   keep-alive connections (hyper's `graceful_shutdown`), return once every connection task
//!   ended. Upgraded WebSocket connections are not waited for here (they are tracked by the
//!   adapters and closed after the backbone drained).

use meshgate_core::metrics::ErrorKind;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use meshgate_core::metrics::{Counter, Gauge, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service as _;

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
    open: Gauge,
}

impl Counters {
    pub fn new(registry: &Registry, adapter: &'static str) -> Counters {
        let error = |kind| registry.error_counter(adapter, kind);
        Counters {
            refused: error(ErrorKind::ConnectionLimit),
            header_timeouts: error(ErrorKind::HeaderTimeout),
            headers_too_large: error(ErrorKind::HeaderTooLarge),
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

/// Serves `router` on `listener` until `stop` is cancelled, then waits for the connections'
/// in-flight requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    counters: Counters,
    stop: CancellationToken,
) -> io::Result<()> {
    // `Semaphore::new` panics above MAX_PERMITS (usize::MAX >> 3); a larger cap is no cap.
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let refused = refusal(limits.max_connections_key);
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            counters.refused.inc();
            let _ = stream.try_write(&refused);
            drop(stream);
            continue;
        };
        // Only a latency setting: a socket that refuses it is served anyway.
        let _ = stream.set_nodelay(true);
        let io = Socket::new(stream, slot, counters.open.clone());
        connections.spawn(connection(
            io,
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

async fn connection(
    io: Socket,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    counters: Counters,
    stop: CancellationToken,
) {
    let activity = io.activity.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        // The peer address for handlers (`ConnectInfo<SocketAddr>`): per-address caps.
        request.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        // `Router` is always ready (its `poll_ready` returns `Ready` without side effects).
        router.call(request)
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
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // A keep-alive connection closed for idleness is no error; a head too slow is.
        if e.is_timeout() && !activity.idle_closed.load(Ordering::Relaxed) {
            counters.header_timeouts.inc();
        } else if e.is_parse_too_large() {
            counters.headers_too_large.inc();
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
}

/// A listener's socket: counts the bytes read (for [`HeadTimer`]) and holds the listener slot
/// and the open-connections gauge until dropped — after an upgrade, when the WebSocket closes.
struct Socket {
    inner: TcpStream,
    activity: Arc<Activity>,
    _slot: OwnedSemaphorePermit,
    open: Gauge,
}

impl Socket {
    fn new(inner: TcpStream, slot: OwnedSemaphorePermit, open: Gauge) -> Socket {
        open.inc();
        Socket {
            inner,
            activity: Arc::default(),
            _slot: slot,
            open,
        }
    }
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
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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
