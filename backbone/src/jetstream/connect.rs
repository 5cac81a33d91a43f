//! The async-nats client of the `jetstream` backbone: JetStream's stream, consumer and KV
//! management, the sessions' release requests and the dead-letter advisories go through it
//! (publishes, pulls and acks go through meshgate's own client, [`crate::nats::client`]).

use meshgate_core::metrics::DropReason;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{ConnectOptions, ServerAddr};
use meshgate_config::NatsBackboneConfig;
use meshgate_core::metrics::{self, Registry};

use crate::error::BackboneStartError;
use crate::nats::client::SLOW_CONSUMER_LOG_INTERVAL;

/// Starts the async-nats client of the `jetstream` backbone. Waits up to `connect_timeout` for
/// the first connection; after that the client keeps trying.
pub(super) async fn connect_client(
    config: &NatsBackboneConfig,
    instance: &str,
    registry: &Registry,
    metric_backbone: &'static str,
) -> Result<(async_nats::Client, ForgetOnDrop), BackboneStartError> {
    let addrs = config
        .urls
        .iter()
        .map(|u| {
            ServerAddr::from_str(u).map_err(|source| BackboneStartError::ServerAddr {
                url: u.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let slow_consumer = registry.backbone_dropped(metric_backbone, DropReason::SlowConsumer);
    let disconnects = registry.counter(
        metrics::BACKBONE_DISCONNECTS,
        &[("backbone", metric_backbone)],
    );
    // The client reports every dropped message; log at most one line per interval.
    let warn_slow = Arc::new(meshgate_core::throttle::LogThrottle::new(
        SLOW_CONSUMER_LOG_INTERVAL,
    ));
    // Set once connected: the event callback needs it to leave a server in lame-duck mode.
    let this_client = ClientForEvents::default();
    let mut options = ConnectOptions::new()
        .name(format!("meshgate {instance}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        // As meshgate's own client: the first retry at once (async-nats tries the servers it
        // knows, configured and announced at connect, shuffled), then a pause that doubles up
        // to 4 s, at random in its upper half so instances that lost a node spread out.
        .reconnect_delay_callback(|attempts| {
            let exponent = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
            let pause = Duration::from_millis(50)
                .saturating_mul(2u32.saturating_pow(exponent.min(16)))
                .min(crate::nats::connector::MAX_BACKOFF);
            if attempts <= 1 {
                Duration::ZERO
            } else {
                meshgate_core::backoff::jittered(pause)
            }
        })
        .connection_timeout(config.connect_timeout)
        .subscription_capacity(config.subscription_capacity)
        .event_callback({
            let this_client = this_client.clone();
            move |event| {
            let slow_consumer = slow_consumer.clone();
            let warn_slow = warn_slow.clone();
            let disconnects = disconnects.clone();
            let this_client = this_client.clone();
            async move {
                match event {
                    // async-nats only reports it; leave the server before it closes us.
                    async_nats::Event::LameDuckMode => {
                        tracing::info!("nats: the JetStream management connection's server is in lame-duck mode; moving to another");
                        let client = this_client.get();
                        if let Some(client) = client {
                            let _ = client.force_reconnect().await;
                        }
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        slow_consumer.inc();
                        if warn_slow.ready() {
                            tracing::warn!(
                                sid,
                                "nats: a subscriber is too slow, messages dropped for it (counted in meshgate_backbone_dropped_total{{reason=\"slow_consumer\"}})"
                            );
                        }
                    }
                    async_nats::Event::Connected => tracing::info!("nats: connected"),
                    async_nats::Event::Disconnected => {
                        disconnects.inc();
                        tracing::warn!("nats: disconnected; reconnecting")
                    }
                    other => tracing::info!(event = %other, "nats"),
                }
            }
            }
        });
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if config.tls.ca_file.is_some() || config.tls.client.is_some() {
        options = options.require_tls(true);
    }
    if let Some(ca) = &config.tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &config.tls.client {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    match &config.nkey {
        None => {}
        Some(meshgate_config::NatsNkey::CredentialsFile(path)) => {
            options = options.credentials_file(path).await.map_err(|e| {
                BackboneStartError::Config(format!("backbone.nats.credentials_file: {e}"))
            })?;
        }
        Some(meshgate_config::NatsNkey::SeedFile(path)) => {
            let id = crate::nats::nkey::load(path, "backbone.nats.nkey_seed_file")
                .map_err(BackboneStartError::Config)?;
            let seed = id.key.seed().map_err(|e| {
                BackboneStartError::Config(format!("backbone.nats.nkey_seed_file: {e}"))
            })?;
            options = options.nkey(seed);
        }
    }
    let client = options
        .connect(addrs)
        .await
        .map_err(BackboneStartError::Connect)?;
    this_client.set(client.clone());
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    while client.connection_state() != State::Connected {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                urls = ?config.urls,
                "nats: not reachable yet; serving as not ready and retrying"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((client, ForgetOnDrop(this_client)))
}

/// The client, for its own event callback (which async-nats runs on the connection's task).
#[derive(Debug, Clone, Default)]
struct ClientForEvents(Arc<std::sync::Mutex<Option<async_nats::Client>>>);

/// Held by the backbone: lets the callback's client go when dropped (a clone kept by the
/// callback alone would keep the connection open, reconnecting, for good).
#[derive(Debug)]
pub(super) struct ForgetOnDrop(ClientForEvents);

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        self.0.forget();
    }
}

impl ClientForEvents {
    fn set(&self, client: async_nats::Client) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(client);
    }
    fn get(&self) -> Option<async_nats::Client> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn forget(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
