//! Connections to RabbitMQ and the reconnect loop every source and sink runs in.
//!
//! Each source and sink owns one connection (named `meshgate <instance> <kind> <name>` in
//! `rabbitmqctl list_connections`), so a channel error on one — a missing queue, a refused
//! exchange — never takes the others down. Any failure ends the connection; the loop waits
//! (`reconnect_min`, doubling up to `reconnect_max`), connects again and re-declares the
//! topology. lapin's own recovery is not used: meshgate's loop re-runs the same setup code as
//! the first start, and RabbitMQ requeues whatever the old connection left unacknowledged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::consumer::{self, Target};
use crate::error::AmqpError;
use lapin::tcp::OwnedTLSConfig;
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Connection, ConnectionProperties};
use meshgate_config::AmqpConfig;
use meshgate_core::metrics::{self, Counter, Gauge, Registry};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;

/// The TLS files of amqps connections, read at each connection: a replaced CA or client
/// certificate is used from the next (re)connection on.
#[derive(Clone)]
struct TlsFiles {
    ca_file: Option<std::path::PathBuf>,
    client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// `amqps`: the name the broker's certificate must carry; `None` for `amqp`.
    server_name: Option<ServerName<'static>>,
}

/// The contents of the TLS files: the CA PEM and the client certificate chain and key.
type TlsContents = (Option<String>, Option<(Vec<u8>, Vec<u8>)>);

impl TlsFiles {
    /// The files as they are now.
    fn contents(&self) -> Result<TlsContents, AmqpError> {
        let read = |p: &std::path::Path, k: &str| {
            std::fs::read(p)
                .map_err(|e| AmqpError::Config(format!("{k}: cannot read `{}`: {e}", p.display())))
        };
        let ca_pem = match &self.ca_file {
            Some(path) => Some(String::from_utf8(read(path, "amqp.ca_file")?).map_err(|_| {
                AmqpError::Config(format!(
                    "amqp.ca_file: `{}` is not PEM text",
                    path.display()
                ))
            })?),
            None => None,
        };
        let identity = match &self.client_cert {
            None => None,
            Some((cert, key)) => Some((
                read(cert, "amqp.tls_cert_file")?,
                read(key, "amqp.tls_key_file")?,
            )),
        };
        Ok((ca_pem, identity))
    }

    /// lapin's TLS settings (its rustls side takes a PEM chain and a PEM key as `PKCS8`).
    fn lapin(&self) -> Result<OwnedTLSConfig, AmqpError> {
        let (ca_pem, identity) = self.contents()?;
        Ok(OwnedTLSConfig {
            identity: identity.map(|(pem, key)| lapin::tcp::OwnedIdentity::PKCS8 { pem, key }),
            cert_chain: ca_pem,
        })
    }

    /// The own consumer connection's connector (`amqps` only).
    fn consumer(&self) -> Result<Option<(TlsConnector, ServerName<'static>)>, AmqpError> {
        let Some(name) = &self.server_name else {
            return Ok(None);
        };
        let (ca_pem, identity) = self.contents()?;
        let connector = consumer::tls_connector(ca_pem.as_deref(), identity.as_ref())?;
        Ok(Some((connector, name.clone())))
    }
}

/// How to reach the broker: everything but the per-link connection name.
#[derive(Clone)]
pub(crate) struct Connector {
    uri: AMQPUri,
    tls: TlsFiles,
    /// The sources' own consumer connections (consumer.rs) go to the same place.
    target: Arc<Target>,
    connect_timeout: Duration,
    instance: Arc<str>,
    /// `host:port` for logs (never the credentials).
    pub(crate) endpoint: String,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("endpoint", &self.endpoint)
            .field("vhost", &self.uri.vhost)
            .finish_non_exhaustive()
    }
}

/// Splits `amqp://host:port` (validated by the config) into its parts. The AMQPUri is built
/// from them rather than parsed by amq-protocol-uri 10.6, whose parser takes the host from
/// `Url::domain()`: an IP address such as `10.0.0.5` is not a domain, and it silently falls
/// back to `localhost`.
fn split_url(url: &str) -> Result<(AMQPScheme, String, u16), AmqpError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| AmqpError::Config(format!("amqp.url `{url}` has no scheme")))?;
    let scheme = match scheme {
        "amqp" => AMQPScheme::AMQP,
        "amqps" => AMQPScheme::AMQPS,
        other => {
            return Err(AmqpError::Config(format!(
                "amqp.url: unknown scheme `{other}`"
            )));
        }
    };
    let default_port = if scheme == AMQPScheme::AMQPS {
        5671
    } else {
        5672
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !rest.ends_with(']') => (
            h,
            p.parse()
                .map_err(|_| AmqpError::Config(format!("amqp.url: `{p}` is not a port")))?,
        ),
        _ => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((scheme, host.to_owned(), port))
}

impl Connector {
    pub(crate) fn new(config: &AmqpConfig, instance: Arc<str>) -> Result<Connector, AmqpError> {
        let (scheme, host, port) = split_url(&config.url)?;
        let server_name = match scheme {
            AMQPScheme::AMQPS => Some(ServerName::try_from(host.clone()).map_err(|e| {
                AmqpError::Config(format!("amqp.url: `{host}` is not a host name: {e}"))
            })?),
            AMQPScheme::AMQP => None,
        };
        let files = TlsFiles {
            ca_file: config.ca_file.clone(),
            client_cert: config.client_cert.clone(),
            server_name,
        };
        // Read now so that a bad file is a start error; read again at each connection.
        files.contents()?;
        let target_tls = files.consumer()?;
        let target = Arc::new(Target {
            host: host.clone(),
            port,
            tls: target_tls,
            vhost: config.vhost.clone(),
            user: config.user.clone(),
            password: config.password.clone(),
            heartbeat: config.heartbeat,
            max_body: config.max_body_size as u64,
        });
        let endpoint = format!("{host}:{port}");
        let uri = AMQPUri {
            scheme,
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo {
                    username: config.user.clone(),
                    password: config.password.clone(),
                },
                host,
                port,
            },
            vhost: config.vhost.clone(),
            query: AMQPQueryString {
                heartbeat: Some(u16::try_from(config.heartbeat.as_secs()).unwrap_or(u16::MAX)),
                ..AMQPQueryString::default()
            },
        };
        Ok(Connector {
            uri,
            tls: files,
            target,
            connect_timeout: config.connect_timeout,
            instance,
            endpoint,
        })
    }

    /// One connection attempt, bounded by `amqp.connect_timeout`.
    pub(crate) async fn connect(&self, link: &Link) -> Result<Connection, AmqpError> {
        let properties = ConnectionProperties::default().with_connection_name(
            format!("meshgate {} {} {}", self.instance, link.kind, link.name).into(),
        );
        let runtime = lapin::runtime::default_runtime()?;
        let tls = self.tls.lapin()?;
        let attempt =
            Connection::connect_uri_with_config(self.uri.clone(), properties, tls, runtime);
        let attempt = async { attempt.await.map_err(AmqpError::from) };
        self.bounded(attempt).await
    }

    /// A source's consumer connection (consumer.rs), bounded by `amqp.connect_timeout`.
    pub(crate) async fn consumer(&self, link: &Link) -> Result<consumer::Connection, AmqpError> {
        let name = format!("meshgate {} {} {}", self.instance, link.kind, link.name);
        let tls = self.tls.consumer()?;
        let target = Target {
            tls,
            ..(*self.target).clone()
        };
        self.bounded(consumer::Connection::open(&target, &name))
            .await
    }

    /// A connection attempt within `amqp.connect_timeout`, its failure said the same way for
    /// both kinds of connection.
    async fn bounded<T>(
        &self,
        attempt: impl Future<Output = Result<T, AmqpError>>,
    ) -> Result<T, AmqpError> {
        let what = || {
            format!(
                "cannot connect to {} (vhost `{}`)",
                self.endpoint, self.uri.vhost
            )
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.during(what())),
            Err(_) => Err(AmqpError::Timeout(self.connect_timeout).during(what())),
        }
    }
}

/// The state of one source or sink, shared with `/readyz` and the metrics.
#[derive(Debug)]
pub struct Link {
    /// `source` or `sink`.
    pub kind: &'static str,
    pub name: String,
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
    up_gauge: Gauge,
    reconnects: Counter,
}

impl Link {
    pub(crate) fn new(registry: &Registry, kind: &'static str, name: &str) -> Arc<Link> {
        let labels = [("kind", kind), ("link", name)];
        Arc::new(Link {
            kind,
            name: name.to_owned(),
            up: AtomicBool::new(false),
            last_error: Mutex::new(None),
            up_gauge: registry.gauge(metrics::AMQP_LINK_UP, &labels),
            reconnects: registry.counter(metrics::AMQP_RECONNECTS, &labels),
        })
    }

    /// Times the link connected again after losing its connection.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.get()
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Why the link is down, if it failed (`None` while still connecting for the first time).
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    pub(crate) fn set_up(&self) {
        self.up.store(true, Ordering::Release);
        self.up_gauge.set(1);
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
    }

    /// Connected but unable to work (RabbitMQ blocked the connection): not ready, not a
    /// reconnect.
    /// A reload removed or replaced it: no longer up, without counting a reconnect.
    pub(crate) fn set_stopped(&self) {
        self.up.store(false, Ordering::Release);
        self.up_gauge.set(0);
    }

    pub(crate) fn set_blocked(&self, why: String) {
        self.up.store(false, Ordering::Release);
        self.up_gauge.set(0);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(why);
        }
    }

    pub(crate) fn set_down(&self, error: &AmqpError) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.reconnects.inc();
        }
        self.up_gauge.set(0);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(format!("{}: {error}", error.kind()));
        }
    }
}

/// How one session of a link ended.
pub(crate) enum Ended {
    /// Shutdown: stop.
    Shutdown,
    /// The connection or channel failed, or setup was refused: reconnect after a pause.
    Failed(AmqpError),
}

/// The pause between connection attempts: `reconnect_min`, doubled after each failure up to
/// `reconnect_max`, back to `reconnect_min` once a session had got as far as `set_up`.
#[derive(Debug)]
pub(crate) struct Backoff {
    pauses: meshgate_core::backoff::Backoff,
}

impl Backoff {
    pub(crate) fn new(config: &AmqpConfig) -> Backoff {
        Backoff {
            pauses: meshgate_core::backoff::Backoff::new(
                config.reconnect_min,
                config.reconnect_max,
            ),
        }
    }

    /// Marks the link down with `error` and waits before the next attempt. False: shutdown
    /// came first.
    pub(crate) async fn failed(
        &mut self,
        link: &Link,
        error: AmqpError,
        shutdown: &CancellationToken,
    ) -> bool {
        if link.is_up() {
            // The link had been working: start the backoff afresh.
            self.pauses.reset();
        }
        tracing::warn!(
            kind = link.kind,
            link = %link.name,
            failure = error.kind(),
            %error,
            retry_in = ?self.pauses.current(),
            "AMQP link down"
        );
        link.set_down(&error);
        let pause = self.pauses.next_pause();
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(pause) => true,
        }
    }
}
