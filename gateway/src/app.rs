//! Wiring: config → backbone, authorizer, adapters and listeners; and the ordered shutdown.

use meshgate_core::tls_server::{ClientAuth, ReloadingAcceptor, ServerTlsFiles};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meshgate_config::Config;
use meshgate_core::metrics::Registry;
use meshgate_core::{AdapterContext, Authorizer, Backbone, Permissions, UserSpec};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Readiness};
use crate::features::MissingFeatures;
use crate::{serve, web};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration enables an adapter or backbone this build does not contain.
    #[error(transparent)]
    MissingFeatures(MissingFeatures),
    #[error(
        "cannot listen on {addr} ({key}): {source}; choose another address with `{key}` in the config file or MESHGATE__{env}",
        env = env_name(key)
    )]
    Bind {
        addr: SocketAddr,
        key: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Anonymous clients could use a listener bound to a non-loopback address.
    #[error(
        "anonymous clients could publish or subscribe on {0}, which other machines can reach; \
         set auth.anonymous.enabled = false and configure [[auth.users]] (see examples/secured.toml), \
         or bind those listeners to 127.0.0.1, or set auth.allow_anonymous_on_public = true to accept it"
    )]
    AnonymousExposed(String),
    #[error("invalid auth configuration: {0}")]
    Auth(#[source] meshgate_core::AuthConfigError),
    #[error("{0}")]
    Tls(#[source] meshgate_core::tls_server::ServerTlsError),
    #[error("backbone failed to start: {0}")]
    Backbone(#[source] meshgate_backbone::BackboneStartError),
    #[error("adapter failed to start: {0}")]
    Adapter(#[source] meshgate_core::AdapterError),
    #[error("{0}")]
    Trigger(#[source] meshgate_triggers::TriggerError),
    #[error("{0}")]
    Tracing(#[source] crate::tracing_export::TracingStartError),
}

/// A started gateway. Call [`RunningGateway::shutdown`] to stop it in order.
#[derive(Debug)]
pub struct RunningGateway {
    /// Address of the web listener (HTTP ingress, WebSocket, browser page), if enabled.
    pub web_addr: Option<SocketAddr>,
    /// Address of the admin listener, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Address of the MQTT listener, if enabled.
    pub mqtt_addr: Option<SocketAddr>,
    /// MQTT over TLS, when `mqtt.tls_listen` is set.
    pub mqtt_tls_addr: Option<SocketAddr>,
    pub instance: Arc<str>,
    pub registry: Registry,
    /// The running triggers (config file and admin API).
    pub triggers: meshgate_triggers::Triggers,
    ctx: AdapterContext,
    readiness: Arc<Readiness>,
    ingress_stop: CancellationToken,
    admin_stop: CancellationToken,
    web_task: Option<JoinHandle<std::io::Result<()>>>,
    mqtt_task: Option<JoinHandle<()>>,
    amqp_task: Option<JoinHandle<()>>,
    #[cfg(feature = "amqp")]
    amqp_ingress: Option<meshgate_amqp::AmqpIngress>,
    /// The AMQP bridge's links, when enabled.
    #[cfg(feature = "amqp")]
    pub amqp: Option<meshgate_amqp::AmqpStatus>,
    admin_task: Option<JoinHandle<std::io::Result<()>>>,
    reloader: Arc<crate::reload::Reloader>,
    grace: Duration,
}

/// How shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Everything in flight was settled within the grace period.
    pub clean: bool,
}

pub(crate) fn authorizer(
    config: &Config,
    metrics: &meshgate_core::metrics::Registry,
) -> Result<Authorizer, StartError> {
    let users = config
        .auth
        .users
        .iter()
        .map(|u| UserSpec {
            name: u.name.clone(),
            password: u.password.clone(),
            tokens: u.tokens.clone(),
            permissions: permissions(&u.acl),
            certificate: u.certificate,
        })
        .collect();
    let anonymous = config
        .auth
        .anonymous
        .enabled
        .then(|| permissions(&config.auth.anonymous.acl));
    let policy = meshgate_core::LoginPolicy {
        max_failures: config.auth.max_failed_logins,
        window: config.auth.failed_login_window,
    };
    let mut authorizer = Authorizer::new(users, anonymous)
        .map_err(StartError::Auth)?
        .with_login_policy(policy)
        .with_metrics(metrics)
        .with_certificate_rules(permissions(&config.auth.certificates))
        .map_err(StartError::Auth)?;
    if config.auth.jwt.enabled {
        authorizer = authorizer
            .with_jwt(meshgate_config::jwt_spec(&config.auth.jwt))
            .map_err(StartError::Auth)?;
    }
    Ok(authorizer)
}

fn permissions(acl: &meshgate_config::AclConfig) -> Permissions {
    Permissions {
        publish: acl.publish.clone(),
        subscribe: acl.subscribe.clone(),
        deny_publish: acl.deny_publish.clone(),
        deny_subscribe: acl.deny_subscribe.clone(),
        client_id_prefixes: acl.client_id_prefixes.clone(),
    }
}

/// The environment variable that overrides a config key, without the `MESHGATE__` prefix:
/// `mqtt.tls_listen` -> `MQTT__TLS_LISTEN`.
fn env_name(key: &str) -> String {
    key.to_ascii_uppercase().replace('.', "__")
}

async fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, key, source })
}

/// The files and settings of a web or admin listener's rustls configuration; `prefix` names
/// its keys (`http.tls`, `admin.tls`). Also what a configuration reload reads again.
pub(crate) fn listener_tls_files(
    tls: &meshgate_config::ServerTlsConfig,
    prefix: &'static str,
) -> ServerTlsFiles {
    ServerTlsFiles {
        cert_file: tls.cert_file.clone(),
        key_file: tls.key_file.clone(),
        client_ca_file: None,
        client_auth: ClientAuth::None,
        alpn: vec![b"http/1.1".to_vec()],
        key_prefix: prefix,
    }
}

/// The TLS acceptor of a web or admin listener with `tls` set; `prefix` names its keys.
fn listener_tls(
    tls: Option<&meshgate_config::ServerTlsConfig>,
    prefix: &'static str,
) -> Result<Option<Arc<ReloadingAcceptor>>, StartError> {
    let Some(tls) = tls else {
        return Ok(None);
    };
    ReloadingAcceptor::new(listener_tls_files(tls, prefix))
        .map(|a| Some(Arc::new(a)))
        .map_err(StartError::Tls)
}

/// Starts every configured listener. Returns once they are bound and serving.
pub async fn start(config: Config) -> Result<RunningGateway, StartError> {
    crate::features::check(&config).map_err(StartError::MissingFeatures)?;
    // Certificates are read before anything starts: a bad file is a start error naming its key.
    let web_tls = listener_tls(config.http.tls.as_ref(), "http.tls")?;
    let admin_tls = listener_tls(config.admin.tls.as_ref(), "admin.tls")?;
    let exposed = web::anonymous_exposure(&config);
    if !exposed.is_empty() {
        if !config.auth.allow_anonymous_on_public {
            return Err(StartError::AnonymousExposed(exposed.join(", ")));
        }
        tracing::warn!(
            listeners = %exposed.join(", "),
            "anonymous clients may publish/subscribe on a non-loopback address (auth.allow_anonymous_on_public = true): \
             anyone who can reach it can use the gateway"
        );
    }
    match crate::fd_limit::raise_soft_limit() {
        Ok(crate::fd_limit::Raised::Raised { from, to }) => {
            tracing::info!(
                from,
                to,
                "raised the open-file soft limit to the hard limit"
            );
        }
        Ok(crate::fd_limit::Raised::Unchanged) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "cannot raise the open-file soft limit to the hard limit; it stays as it was"
        ),
    }
    warn_if_descriptors_short(&config);
    let registry = Registry::new();
    registry
        .gauge(
            meshgate_core::metrics::BUILD_INFO,
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("features", &crate::features::compiled()),
            ],
        )
        .set(1);
    let instance: Arc<str> = Arc::from(
        config
            .gateway
            .instance_id
            .clone()
            .unwrap_or_else(meshgate_core::wrap::new_id),
    );
    crate::tracing_export::start(&config.tracing, &instance, &registry)
        .map_err(StartError::Tracing)?;
    // Every listener is bound before anything connects out (backbone, AMQP): an outgoing
    // connection's ephemeral port could otherwise take a port configured here.
    let web_listener = match web::enabled(&config) {
        true => Some(bind(config.http.listen, "http.listen").await?),
        false => None,
    };
    let admin_listener = match config.admin.enabled {
        true => Some(bind(config.admin.listen, "admin.listen").await?),
        false => None,
    };
    #[cfg(feature = "mqtt")]
    let mqtt_listeners = match config.mqtt.enabled {
        true => Some(
            meshgate_mqtt::MqttListeners::bind(&config.mqtt)
                .await
                .map_err(|e| match e {
                    meshgate_core::AdapterError::Bind { key, addr, source } => {
                        StartError::Bind { addr, key, source }
                    }
                    other => StartError::Adapter(other),
                })?,
        ),
        false => None,
    };
    let backbone: Arc<dyn Backbone> =
        meshgate_backbone::build(&config.backbone, &instance, &registry)
            .await
            .map_err(StartError::Backbone)?;
    let authorizer = Arc::new(authorizer(&config, &registry)?);
    let limits = meshgate_core::ConnectionLimits::new(
        config.gateway.max_connections_per_ip,
        config.gateway.max_connections_per_user,
    );
    let listener_limits = crate::listener_limits::ListenerLimits::new(&config);
    let reloader = Arc::new(crate::reload::Reloader::new(
        config.clone(),
        authorizer.clone(),
        limits.clone(),
        listener_limits.clone(),
        registry.clone(),
    ));
    let ctx = AdapterContext {
        instance: instance.clone(),
        backbone: backbone.clone(),
        authorizer,
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
        registry: registry.clone(),
        limits,
        // Listed only where the admin API can show them (an entry costs a WebSocket
        // connection ~0.3 KiB).
        connections: meshgate_core::connections::Connections::new(
            config.admin.enabled && config.admin.api_token.is_some(),
        ),
    };
    let triggers =
        meshgate_triggers::Triggers::start(backbone.clone(), registry.clone(), &config.triggers)
            .await
            .map_err(StartError::Trigger)?;
    reloader.set_triggers(triggers.clone());
    // The TLS listeners that will serve: a reload reads their files again.
    let mut tls_listeners = Vec::new();
    if let (Some(_), Some(tls)) = (&web_listener, &web_tls) {
        tls_listeners.push((crate::reload::TlsListener::Http, tls.clone()));
    }
    if let (Some(_), Some(tls)) = (&admin_listener, &admin_tls) {
        tls_listeners.push((crate::reload::TlsListener::Admin, tls.clone()));
    }
    #[cfg(feature = "mqtt")]
    if let Some(tls) = mqtt_listeners.as_ref().and_then(|l| l.tls_acceptor()) {
        tls_listeners.push((crate::reload::TlsListener::Mqtt, tls));
    }
    reloader.set_tls(tls_listeners);
    #[cfg_attr(
        not(feature = "amqp"),
        expect(unused_mut, reason = "set by the AMQP bridge")
    )]
    let mut amqp_task = None;
    #[cfg(feature = "amqp")]
    let (mut amqp_status, mut amqp_ingress) = (None, None);
    #[cfg(feature = "amqp")]
    if config.amqp.enabled {
        let adapter =
            meshgate_amqp::AmqpAdapter::new(&config.amqp, &ctx).map_err(StartError::Adapter)?;
        amqp_status = Some(adapter.status());
        amqp_ingress = Some(adapter.ingress());
        reloader.set_amqp(adapter.links());
        let ctx = ctx.clone();
        amqp_task = Some(tokio::spawn(async move {
            if let Err(e) = meshgate_core::Adapter::run(Box::new(adapter), ctx).await {
                tracing::error!(error = %e, "amqp adapter stopped");
            }
        }));
    }
    let readiness = Arc::new(Readiness {
        backbone: backbone.clone(),
        serving: false.into(),
        #[cfg(feature = "amqp")]
        amqp: amqp_status.clone(),
    });
    let ingress_stop = CancellationToken::new();
    let admin_stop = CancellationToken::new();

    #[cfg_attr(
        not(feature = "mqtt"),
        expect(unused_mut, reason = "set by the MQTT adapter")
    )]
    let (mut mqtt_addr, mut mqtt_tls_addr, mut mqtt_task, mut mqtt_ws) = (None, None, None, None);
    #[cfg(feature = "mqtt")]
    let mut mqtt_admin = None;
    #[cfg(feature = "mqtt")]
    if let Some(listeners) = mqtt_listeners {
        let adapter = meshgate_mqtt::MqttAdapter::new(listeners, &config.mqtt, &ctx);
        mqtt_addr = adapter.local_addr();
        mqtt_tls_addr = adapter.tls_addr();
        mqtt_ws = adapter.websocket_router();
        mqtt_admin = Some(adapter.admin());
        let _ = listener_limits.mqtt.set(adapter.limits());
        let ctx = ctx.clone();
        mqtt_task = Some(tokio::spawn(async move {
            if let Err(e) = meshgate_core::Adapter::run(Box::new(adapter), ctx).await {
                tracing::error!(error = %e, "mqtt adapter stopped");
            }
        }));
    }
    let (mut web_addr, mut web_task) = (None, None);
    if let Some(listener) = web_listener {
        web_addr = listener.local_addr().ok();
        let mut router = web::router(&config, &listener_limits, &ctx);
        if let Some(mqtt_ws) = mqtt_ws {
            router = router.merge(web::origin_checked(mqtt_ws, &config, &registry));
        }
        let stop = ingress_stop.clone();
        let limits = listener_limits.web.clone();
        let counters = serve::Counters::new(&registry, "http");
        web_task = Some(tokio::spawn(serve::serve(
            listener, router, limits, counters, stop, web_tls,
        )));
    }
    let (mut admin_addr, mut admin_task) = (None, None);
    if let Some(listener) = admin_listener {
        admin_addr = listener.local_addr().ok();
        let router = admin::router(readiness.clone(), registry.clone())
            .merge(crate::triggers_api::router(
                triggers.clone(),
                config.admin.api_token.clone(),
            ))
            .merge(crate::reload::router(
                reloader.clone(),
                config.admin.api_token.clone(),
            ))
            .merge(crate::admin_api::router(crate::admin_api::AdminApi {
                connections: ctx.connections.clone(),
                backbone: ctx.backbone.clone(),
                #[cfg(feature = "mqtt")]
                mqtt: mqtt_admin,
                #[cfg(feature = "amqp")]
                amqp: amqp_status.clone(),
                token: config.admin.api_token.clone(),
            }));
        let stop = admin_stop.clone();
        let limits = listener_limits.admin.clone();
        let counters = serve::Counters::new(&registry, "admin");
        admin_task = Some(tokio::spawn(serve::serve(
            listener, router, limits, counters, stop, admin_tls,
        )));
    }
    readiness.serving.store(true, Ordering::Release);
    Ok(RunningGateway {
        web_addr,
        admin_addr,
        mqtt_addr,
        mqtt_tls_addr,
        instance,
        registry,
        triggers,
        ctx,
        readiness,
        ingress_stop,
        admin_stop,
        web_task,
        mqtt_task,
        amqp_task,
        #[cfg(feature = "amqp")]
        amqp_ingress,
        #[cfg(feature = "amqp")]
        amqp: amqp_status,
        admin_task,
        grace: config.gateway.shutdown_grace,
        reloader,
    })
}

impl RunningGateway {
    pub fn backbone(&self) -> Arc<dyn Backbone> {
        self.ctx.backbone.clone()
    }

    /// What reloads the configuration (`SIGHUP`, `POST /reload`).
    pub fn reloader(&self) -> Arc<crate::reload::Reloader> {
        self.reloader.clone()
    }

    /// Stops in the order that loses nothing that was acknowledged:
    /// 1. `/readyz` turns 503 and the web listener stops accepting; in-flight HTTP requests
    ///    finish (each gets its reply after the backbone accepted its events);
    ///    AMQP sources stop consuming and settle their in-flight publishes;
    /// 2. the backbone stops taking events, and its subscriptions end once drained (AMQP sinks
    ///    publish what theirs held);
    /// 3. WebSocket connections forward what they were given, flush, and close with 1001;
    /// 4. the admin listener stops.
    ///
    /// Everything shares one deadline, `gateway.shutdown_grace`.
    pub async fn shutdown(self) -> ShutdownReport {
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut clean = true;
        self.readiness.serving.store(false, Ordering::Release);
        self.ingress_stop.cancel();
        if let Some(task) = self.web_task {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!("shutdown grace period ended with HTTP requests still in flight");
                abort.abort();
                clean = false;
            }
        }
        // AMQP sources are ingress too: they settle their in-flight publishes (and acknowledge
        // them to RabbitMQ) while the backbone still takes events.
        #[cfg(feature = "amqp")]
        if let Some(ingress) = &self.amqp_ingress
            && tokio::time::timeout_at(deadline, ingress.stop())
                .await
                .is_err()
        {
            tracing::warn!("shutdown grace period ended with AMQP sources still settling");
            clean = false;
        }
        // Triggers stop taking events and finish (or, at the deadline, give back) the deliveries
        // under way, while the backbone still takes their replies and dead letters.
        if !self.triggers.shutdown(deadline).await {
            tracing::warn!("shutdown grace period ended with trigger deliveries under way");
            clean = false;
        }
        // The backbone stops taking events; subscriptions end once their queues are empty, so
        // connections can forward everything that was accepted before they close.
        let _ = tokio::time::timeout_at(deadline, self.ctx.backbone.close()).await;
        self.ctx.shutdown.cancel();
        if let Some(task) = self.mqtt_task {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
        if let Some(task) = self.amqp_task {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!("shutdown grace period ended with AMQP links still settling");
                abort.abort();
                clean = false;
            }
        }
        self.ctx.tracker.close();
        if tokio::time::timeout_at(deadline, self.ctx.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.ctx.tracker.len(),
                "shutdown grace period ended with connections still open"
            );
            clean = false;
        }
        // Every connection has ended (and saved its session): what they needed of the backbone
        // after `close` goes now.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ctx.backbone.finish()).await;
        self.admin_stop.cancel();
        if let Some(task) = self.admin_task {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(1), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        ShutdownReport { clean }
    }
}

/// Warns when the listeners' connection caps exceed the open-file limit (at start, and after a
/// reload that changed them).
pub(crate) fn warn_if_descriptors_short(config: &Config) {
    if let Some((caps, limit)) = web::descriptors_short(config, crate::fd_limit::soft_limit()) {
        tracing::warn!(
            caps,
            limit,
            "the connection caps (http.max_connections + admin.max_connections + mqtt.max_connections) \
             exceed the process's open-file limit: past it accepts fail for every listener and \
             backbone reconnects; raise the limit (ulimit -n, LimitNOFILE=) or lower the caps"
        );
    }
}
