//! Connecting and reconnecting: the connection task and its supervisor, the handshake
//! (`INFO`, TLS, `CONNECT`, `PING`/`PONG`), and the server URLs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use meshgate_core::backoff::Backoff;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::client::{Client, Options, Shared};
use super::connection::{Disconnect, Io, Replacement, Served, Start, serve, write_subs};
use super::proto::{Info, MAX_CONTROL_LINE, ProtocolError, find_crlf};

/// Why a connection attempt failed. [`ConnectError::kind`] names the kind for the log, so that
/// a wrong password reads differently from a server that is down.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error(transparent)]
    Url(#[from] UrlError),
    /// Connecting, reading or writing failed (refused, unreachable, reset).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within the connect timeout")]
    Timeout,
    #[error("connection closed by the server")]
    ServerClosed,
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the server does not support headers (nats-server 2.2 or later is needed)")]
    NoHeaders,
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The server refused the credentials (`-ERR 'Authorization Violation'` and the like).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The server answered the `CONNECT` with another `-ERR`.
    #[error("the server refused the connection: {0}")]
    Refused(String),
    /// The NKey file cannot be read or used.
    #[error("{0}")]
    Nkey(String),
}

impl ConnectError {
    /// A short name of the kind of failure, for the log.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ConnectError::Url(_) => "url",
            ConnectError::Io(_) => "io",
            ConnectError::Timeout => "timeout",
            ConnectError::ServerClosed => "closed",
            ConnectError::Protocol(_) | ConnectError::NoHeaders => "protocol",
            ConnectError::Tls(_) => "tls",
            ConnectError::Auth(_) | ConnectError::Nkey(_) => "auth",
            ConnectError::Refused(_) => "refused",
        }
    }

    /// The error of a `-ERR` line (`-ERR 'Authorization Violation'`): an authentication
    /// failure when the server's text says so (nats-server's wording: "Authorization
    /// Violation", "Authentication Timeout", "User Authentication Expired", …).
    fn from_err_line(line: &str) -> ConnectError {
        let text = line
            .get(4..)
            .unwrap_or_default()
            .trim()
            .trim_matches('\'')
            .to_owned();
        let lower = text.to_ascii_lowercase();
        if lower.contains("authorization") || lower.contains("authentication") {
            ConnectError::Auth(text)
        } else {
            ConnectError::Refused(text)
        }
    }
}

/// Why a server URL is not one this client can connect to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UrlError {
    #[error(
        "`{url}`: credentials go in backbone.nats.user and backbone.nats.password (or token), not in the URL"
    )]
    Credentials { url: String },
    #[error("`{url}`: port `{port}` is not a number")]
    BadPort { url: String, port: String },
    #[error("`{url}`: no host")]
    NoHost { url: String },
}

/// Why the TLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("`{host}` is not a valid TLS server name: {source}")]
    ServerName {
        host: String,
        #[source]
        source: tokio_rustls::rustls::pki_types::InvalidDnsNameError,
    },
    #[error("{0}")]
    Handshake(#[source] std::io::Error),
    #[error(transparent)]
    Setup(#[from] meshgate_core::tls::TlsSetupError),
    #[error("cannot read {key} {}: {source}", path.display())]
    File {
        key: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Longest pause between connection attempts (the pause doubles up to it).
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(4);

// The client's constructor is here, with the task it starts, so that `client.rs` does not
// depend on this file (one direction: connector → client).
impl Client {
    /// Starts connecting in the background; waits up to `connect_timeout` for the first
    /// connection, then returns either way (see [`Client::is_connected`]).
    pub async fn connect(options: Options) -> Client {
        let timeout = options.connect_timeout;
        let shared = Arc::new(Shared::new(options));
        tokio::spawn(supervise(shared.clone()));
        let client = Client { shared };
        let deadline = tokio::time::Instant::now() + timeout;
        while !client.is_connected() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        client
    }
}

/// Runs [`run`], again after a panic (a bug: the parser and handlers refuse bad input with
/// errors), so the client is never silently gone: the panic is logged and counted
/// (`meshgate_errors_total{adapter="backbone",kind="task_panicked"}`), the connection is
/// dropped as on a disconnect (the backbone is not ready meanwhile), and a new one is made
/// with every subscription.
async fn supervise(shared: Arc<Shared>) {
    use futures_util::FutureExt;
    let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
    loop {
        let run = std::panic::AssertUnwindSafe(run(shared.clone())).catch_unwind();
        match run.await {
            Ok(()) => return,
            Err(panic) => {
                disconnected(&shared);
                shared.options.panicked.inc();
                tracing::error!(
                    panic = panic_message(&*panic),
                    "nats: the connection task panicked; reconnecting (counted in meshgate_errors_total{{kind=\"task_panicked\"}})"
                );
                if shared.closed.load(Ordering::Acquire) {
                    return;
                }
                tokio::time::sleep(backoff.next_pause()).await;
            }
        }
    }
}

/// The text of a caught panic, for the log.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

/// Connects, reconnects, and runs each connection's reader and writer. The servers are
/// tried in turn ([`super::servers::ServerPool`]: the configured ones and those the cluster
/// announced), the one just lost last; after a round of failures, a pause that doubles up to
/// [`MAX_BACKOFF`], at random in its upper half (instances that lost the same node spread).
async fn run(shared: Arc<Shared>) {
    if shared.servers().len() == 0 {
        // (The config refuses an empty backbone.nats.urls.)
        tracing::error!("nats: no server URL to connect to (backbone.nats.urls)");
        return;
    }
    let mut backoff = Backoff::new(Duration::from_millis(50), MAX_BACKOFF);
    // Failed attempts since the last connection, and the server of the last one.
    let mut failures = 0usize;
    let mut last: Option<String> = None;
    let mut was_connected = false;
    while !shared.closed.load(Ordering::Acquire) {
        let Some(url) = shared.servers().next(last.as_deref()) else {
            break;
        };
        let attempt =
            tokio::time::timeout(shared.options.connect_timeout, handshake(&shared, &url));
        let closed = shared.close.notified();
        let result = tokio::select! {
            r = attempt => r.unwrap_or(Err(ConnectError::Timeout)),
            _ = closed => break,
        };
        match result {
            Ok(connected) => {
                tracing::info!(url = %url, "nats: connected");
                was_connected = true;
                failures = 0;
                let started = tokio::time::Instant::now();
                let (reason, url) = serve_moving(&shared, connected, url).await;
                disconnected(&shared);
                last = Some(url.clone());
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
                shared.options.disconnects.inc();
                tracing::warn!(url = %url, reason = %reason, "nats: disconnected; reconnecting");
                if started.elapsed() < Duration::from_secs(1) {
                    // Ended at once (refused after the handshake, say): no tight loop.
                    let closed = shared.close.notified();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_jittered_pause()) => {}
                        _ = closed => break,
                    }
                } else {
                    backoff.reset();
                }
            }
            Err(e) => {
                failures += 1;
                let rounds = shared.servers().len();
                let loud = was_connected || failures <= rounds;
                match &e {
                    ConnectError::Auth(_) if loud => {
                        tracing::warn!(url = %url, kind = e.kind(), error = %e, "nats: the server refused meshgate's credentials (backbone.nats.user/password or token); retrying")
                    }
                    ConnectError::Auth(_) => {
                        tracing::debug!(url = %url, kind = e.kind(), error = %e, "nats: the server refused meshgate's credentials; retrying")
                    }
                    _ if loud => {
                        tracing::warn!(url = %url, kind = e.kind(), error = %e, "nats: cannot connect; retrying")
                    }
                    _ => {
                        tracing::debug!(url = %url, kind = e.kind(), error = %e, "nats: cannot connect; retrying")
                    }
                }
                last = None;
                if failures.is_multiple_of(rounds) {
                    let closed = shared.close.notified();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_jittered_pause()) => {}
                        _ = closed => break,
                    }
                }
            }
        }
    }
    disconnected(&shared);
}

/// Serves the connection to `url`, and the next one each time the server goes into lame-duck
/// mode and another was reached ([`replacement`]); returns why the last one ended, and its
/// server.
async fn serve_moving(
    shared: &Arc<Shared>,
    connected: Handshake,
    mut url: String,
) -> (Disconnect, String) {
    let (mut io, mut rest) = (connected.io, connected.rest);
    let mut start = Start::Fresh {
        lame_duck: connected.lame_duck,
    };
    loop {
        match serve(shared, io, rest, &url, start, replacement(shared, &url)).await {
            Served::Ended(reason) => return (reason, url),
            Served::Moved(next) => {
                tracing::info!(from = %url, to = %next.url, "nats: left a server in lame-duck mode");
                start = Start::Moved {
                    subscribed: next.sids,
                };
                (io, rest, url) = (next.io, next.rest, next.url);
            }
        }
    }
}

/// How long both connections have the subscriptions before the old one lets go of them:
/// time for the new connection's interest to reach every node of the cluster over its routes.
const OVERLAP: Duration = Duration::from_millis(25);

/// Once the server of `current` announces lame-duck mode: connects to another that is not in
/// lame-duck mode too (each in turn, pausing after a round of failures) and makes every
/// subscription there; after [`OVERLAP`], has the writer send what it holds, `UNSUB` for every
/// subscription and a last `PING` on the old connection, and halt; returns the new connection
/// when that `PONG` came. By then the old server read everything written to it and sent every
/// message it will, so nothing is lost on either side and nothing is refused meanwhile (what
/// publishers append waits for the new connection); what both connections delivered during
/// the overlap is handed on once ([`super::overlap`]). If the old connection ends first,
/// `serve` returns that instead. With no other server known it stays, and says so.
async fn replacement(shared: &Shared, current: &str) -> Replacement {
    loop {
        let told = shared.lame_duck_told.notified();
        if shared.lame_duck.load(Ordering::Acquire) {
            break;
        }
        told.await;
    }
    let mut backoff = Backoff::new(Duration::from_millis(50), MAX_BACKOFF);
    let mut failures = 0usize;
    let (io, rest, url, sids) = loop {
        let next = shared.servers().next(Some(current));
        let Some(url) = next.filter(|u| u != current) else {
            tracing::warn!(
                url = current,
                "nats: the server is in lame-duck mode and no other server is known (backbone.nats.urls, or the cluster's connect_urls); staying until it closes the connection"
            );
            return std::future::pending().await;
        };
        let attempt = tokio::time::timeout(shared.options.connect_timeout, handshake(shared, &url));
        match attempt.await.unwrap_or(Err(ConnectError::Timeout)) {
            Ok(connected) if !connected.lame_duck => {
                let mut io = connected.io;
                let mut subscribe = Vec::new();
                shared.overlap.record();
                let sids = write_subs(shared, &mut subscribe);
                let written = tokio::time::timeout(shared.options.connect_timeout, async {
                    io.write_all(&subscribe).await?;
                    io.flush().await
                });
                match written.await {
                    Ok(Ok(())) => break (io, connected.rest, url, sids),
                    Ok(Err(e)) => {
                        tracing::debug!(url = %url, error = %e, "nats: cannot subscribe on the server that is to replace a lame-duck one; trying another")
                    }
                    Err(_) => {
                        tracing::debug!(url = %url, "nats: the server that is to replace a lame-duck one does not take the subscriptions; trying another")
                    }
                }
                shared.overlap.end();
            }
            Ok(_) => {
                tracing::debug!(url = %url, "nats: that server is in lame-duck mode too; trying another")
            }
            Err(e) => {
                tracing::debug!(url = %url, error = %e, "nats: cannot connect to leave a lame-duck server; trying another")
            }
        }
        failures += 1;
        if failures.is_multiple_of(shared.servers().len().max(1)) {
            tokio::time::sleep(backoff.next_jittered_pause()).await;
        }
    };
    tokio::time::sleep(OVERLAP).await;
    let (told, last_pong) = tokio::sync::oneshot::channel();
    shared.out().switch = Some(told);
    shared.wake_writer.notify_one();
    if last_pong.await.is_err() {
        // The old connection ended first (its end is what `serve` returns).
        std::future::pending::<()>().await;
    }
    Replacement {
        io,
        rest,
        url,
        sids,
    }
}

pub(super) fn disconnected(shared: &Shared) {
    let mut out = shared.out();
    out.connected = false;
    // Events appended and not written are lost with the connection: counted, and the
    // publishers waiting for them are told (their senders dropped).
    // (Dropping the senders of `pongs` tells every flush waiting for a PONG, and every publish
    // waiting for the server to have read its event, that it will not come.)
    let discarded = out.clear();
    shared.options.discarded.add(discarded as u64);
    drop(out);
    shared.room.notify_waiters();
    shared.run_disconnect_hooks();
}

/// Opens the connection: `INFO`, then `CONNECT` + `PING`, until `PONG`. Returns the stream
/// and whatever the server sent after the `PONG`.
/// An established connection, before it is served.
pub(super) struct Handshake {
    io: Box<dyn Io>,
    /// What the server sent after the `PONG`.
    rest: BytesMut,
    /// The server announced lame-duck mode in an `INFO` of the handshake.
    lame_duck: bool,
}

async fn handshake(shared: &Shared, url: &str) -> Result<Handshake, ConnectError> {
    let (tls_url, host, port) = parse_url(url)?;
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    let _ = tcp.set_nodelay(true);
    let mut tcp: Box<dyn Io> = Box::new(tcp);
    let mut buf = BytesMut::with_capacity(4096);
    let line = read_line(&mut tcp, &mut buf).await?;
    let info: Info = line
        .strip_prefix("INFO ")
        .and_then(|j| serde_json::from_str(j).ok())
        .ok_or_else(|| ProtocolError::NoInfo {
            line: line.chars().take(80).collect(),
        })?;
    if !info.headers {
        return Err(ConnectError::NoHeaders);
    }
    if info.max_payload > 0 {
        shared
            .max_payload
            .store(info.max_payload, Ordering::Relaxed);
    }
    shared.servers().learn(&info.urls(), url);
    let mut lame_duck = info.ldm;
    // TLS files configured: TLS even on a nats:// URL to a server that does not ask for it, so
    // that credentials never go in clear to a server meant to be reached over TLS.
    let files = &shared.options.tls;
    let want_tls =
        tls_url || info.tls_required || files.ca_file.is_some() || files.client.is_some();
    let mut io: Box<dyn Io> = if want_tls {
        Box::new(tls(tcp, &host, files).await?)
    } else {
        tcp
    };
    let o = &shared.options;
    let mut connect = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "tls_required": want_tls,
        "name": o.name,
        "lang": "rust-meshgate",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "echo": o.echo,
        "headers": true,
        "no_responders": true,
    });
    if let (Some(user), Some(pass)) = (&o.user, &o.password) {
        connect["user"] = user.as_str().into();
        connect["pass"] = pass.as_str().into();
    }
    if let Some(token) = &o.token {
        connect["auth_token"] = token.as_str().into();
    }
    if let (Some(nkey), Some(nonce)) = (&o.nkey, &info.nonce) {
        let (path, key) = nkey.file();
        super::nkey::load(path, key)
            .and_then(|id| id.sign(nonce, &mut connect))
            .map_err(ConnectError::Nkey)?;
    }
    let hello = format!("CONNECT {connect}\r\nPING\r\n");
    io.write_all(hello.as_bytes()).await?;
    buf.clear();
    loop {
        let line = read_line(&mut io, &mut buf).await?;
        match line.as_str() {
            "PONG" => break,
            "+OK" => {}
            "PING" => io.write_all(b"PONG\r\n").await?,
            l if l.starts_with("INFO ") => {
                if let Ok(info) = serde_json::from_str::<Info>(&l[5..]) {
                    shared.servers().learn(&info.urls(), url);
                    lame_duck |= info.ldm;
                }
            }
            l if l.get(..4).is_some_and(|v| v.eq_ignore_ascii_case("-ERR")) => {
                return Err(ConnectError::from_err_line(l));
            }
            l => {
                return Err(ProtocolError::Unexpected {
                    line: l.chars().take(80).collect(),
                }
                .into());
            }
        }
    }
    Ok(Handshake {
        io,
        rest: buf,
        lame_duck,
    })
}

/// The contents of a TLS file, read at each connection (a replaced file is used from the next
/// reconnect on).
fn read_tls_file(path: &std::path::Path, key: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::File {
        key,
        path: path.to_owned(),
        source,
    })
}

async fn tls(
    tcp: Box<dyn Io>,
    host: &str,
    files: &meshgate_config::NatsTlsConfig,
) -> Result<tokio_rustls::client::TlsStream<Box<dyn Io>>, TlsError> {
    let ca = files
        .ca_file
        .as_deref()
        .map(|p| read_tls_file(p, "backbone.nats.ca_file"))
        .transpose()?;
    let identity = match &files.client {
        None => None,
        Some((cert, key)) => Some((
            read_tls_file(cert, "backbone.nats.tls_cert_file")?,
            read_tls_file(key, "backbone.nats.tls_key_file")?,
        )),
    };
    let config = meshgate_core::tls::client_config_with(
        ca.as_deref(),
        identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
    )?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(
        |source| TlsError::ServerName {
            host: host.to_owned(),
            source,
        },
    )?;
    connector
        .connect(name, tcp)
        .await
        .map_err(TlsError::Handshake)
}

/// `nats://host:port`, `tls://host:port`, `host:port` → (TLS, host, port); the port defaults
/// to 4222. Credentials in a URL are refused: the config has its own keys for them.
pub(crate) fn parse_url(url: &str) -> Result<(bool, String, u16), UrlError> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("tls://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("nats://") {
        (false, r)
    } else {
        (false, url)
    };
    if rest.contains('@') {
        return Err(UrlError::Credentials {
            url: url.to_owned(),
        });
    }
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>().map_err(|_| UrlError::BadPort {
                url: url.to_owned(),
                port: p.to_owned(),
            })?,
        ),
        _ => (rest, 4222),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(UrlError::NoHost {
            url: url.to_owned(),
        });
    }
    Ok((tls, host.to_owned(), port))
}

/// One control line (without CRLF), reading more as needed; consumes it from `buf`.
async fn read_line(io: &mut Box<dyn Io>, buf: &mut BytesMut) -> Result<String, ConnectError> {
    loop {
        if let Some(end) = find_crlf(buf) {
            let line = buf.split_to(end + 2);
            return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
        }
        if buf.len() > MAX_CONTROL_LINE {
            return Err(ProtocolError::LineTooLong.into());
        }
        buf.reserve(4096);
        if io.read_buf(buf).await? == 0 {
            return Err(ConnectError::ServerClosed);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::nats::client::{EncodeLater, Frame};
    use crate::nats::testing::{event, unconnected_with};
    use crate::nats::wire::HeaderError;
    use meshgate_core::Envelope;
    use meshgate_core::metrics::Counter;
    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;

    /// A server that sends its INFO, then answers the CONNECT with `answer`.
    async fn answering(answer: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tcp.write_all(b"INFO {\"headers\":true,\"max_payload\":1048576}\r\n")
                .await
                .unwrap();
            let mut hello = [0u8; 512];
            let _ = tcp.read(&mut hello).await;
            let _ = tcp.write_all(answer.as_bytes()).await;
        });
        addr
    }

    /// A wrong password reads differently from other refusals and from a server that is down.
    #[tokio::test]
    async fn handshake_failures_are_told_apart() {
        let shared = unconnected_with(None);
        let addr = answering("-ERR 'Authorization Violation'\r\n").await;
        let e = handshake(&shared, &addr).await.err().unwrap();
        assert!(
            matches!(&e, ConnectError::Auth(text) if text == "Authorization Violation"),
            "{e:?}"
        );
        assert_eq!(e.kind(), "auth");
        let addr = answering("-ERR 'maximum connections exceeded'\r\n").await;
        let e = handshake(&shared, &addr).await.err().unwrap();
        assert!(
            matches!(&e, ConnectError::Refused(text) if text == "maximum connections exceeded"),
            "{e:?}"
        );
        let addr = answering("MSG a 1 2\r\nhi\r\n").await;
        let e = handshake(&shared, &addr).await.err().unwrap();
        assert!(matches!(&e, ConnectError::Protocol(_)), "{e:?}");
        // Nobody listens there any more: refused by the OS.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let e = handshake(&shared, &addr).await.err().unwrap();
        assert!(matches!(&e, ConnectError::Io(_)), "{e:?}");
        assert_eq!(e.kind(), "io");
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("nats://127.0.0.1:4333").unwrap(),
            (false, "127.0.0.1".into(), 4333)
        );
        assert_eq!(
            parse_url("tls://nats.example:4443").unwrap(),
            (true, "nats.example".into(), 4443)
        );
        assert_eq!(
            parse_url("localhost").unwrap(),
            (false, "localhost".into(), 4222)
        );
        assert_eq!(
            parse_url("nats://[::1]:4222").unwrap(),
            (false, "::1".into(), 4222)
        );
        assert!(parse_url("nats://h:x").is_err());
        let err = parse_url("nats://mg:secret@h:4222").unwrap_err();
        assert!(err.to_string().contains("backbone.nats.user"), "{err}");
    }

    /// An encoder with a bug: it panics on the event with id `boom`.
    #[derive(Debug)]
    struct Buggy;

    impl EncodeLater for Buggy {
        fn encode(&self, envelope: &Envelope, frame: &mut Frame) -> Result<(), HeaderError> {
            assert_ne!(envelope.event.id(), "boom", "a bug in the encoder");
            frame.subject.push_str("ev");
            frame.payload.push(b'x');
            Ok(())
        }
        fn size_bound(&self, _: &Envelope) -> usize {
            1
        }
        fn subject_bound(&self, _: &Envelope) -> usize {
            2
        }
    }

    /// A connection task that panics is not silently gone: counted, the client shows as
    /// disconnected, and it connects again (with its subscriptions) and serves on.
    #[tokio::test]
    async fn a_panicking_connection_task_is_counted_and_restarted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conn_tx, mut conns) = mpsc::unbounded_channel();
        // A minimal server: INFO, then PONG to the handshake's PING; reports each SUB seen.
        tokio::spawn(async move {
            for n in 1.. {
                let (tcp, _) = listener.accept().await.unwrap();
                let conn_tx = conn_tx.clone();
                tokio::spawn(async move {
                    let (r, mut w) = tokio::io::split(tcp);
                    w.write_all(b"INFO {\"headers\":true,\"max_payload\":1048576}\r\n")
                        .await
                        .unwrap();
                    let mut lines = tokio::io::BufReader::new(r).lines();
                    use tokio::io::AsyncBufReadExt;
                    while let Ok(Some(line)) = lines.next_line().await {
                        if line == "PING" {
                            let _ = w.write_all(b"PONG\r\n").await;
                        }
                        let _ = conn_tx.send((n, line));
                    }
                });
            }
        });
        let panicked = Counter::default();
        let mut options = Arc::into_inner(unconnected_with(Some(Arc::new(Buggy))))
            .unwrap()
            .options;
        options.urls = vec![addr.to_string()];
        options.panicked = panicked.clone();
        let client = Client::connect(options).await;
        assert!(client.is_connected());
        let _sub = client.subscribe("s", None).unwrap();
        client.publish_later(&event("fine"), None).unwrap();
        client.publish_later(&event("boom"), None).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while client.connections() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "not reconnected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(panicked.get(), 1);
        // Subscribed again on the new connection.
        loop {
            let (n, line) = tokio::time::timeout(Duration::from_secs(5), conns.recv())
                .await
                .unwrap()
                .unwrap();
            if n == 2 && line == "SUB s 1" {
                break;
            }
        }
        while !client.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        client.publish_later(&event("after"), None).unwrap();
    }
}
