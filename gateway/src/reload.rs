//! Reloading the configuration without a restart (issue 25 item 3, first part): `SIGHUP` or
//! `POST /reload` on the admin listener re-read the file the gateway started with (and the
//! `MESHGATE__…` environment), check it as `meshgate validate` does, and put what can change
//! in place into force.
//!
//! In place today: the whole `[auth]` section (users, passwords, tokens, anonymous access and
//! its rules, JWT keys and settings, certificate rules, failed-login limits). Logins from then
//! on use it; connected MQTT clients are re-resolved at their next packet or delivery and lose
//! the subscriptions their rules no longer grant. And `[[triggers]]`: new ones start, changed
//! ones are replaced, removed ones stop (`Triggers::reload_config`). And the connection caps
//! `gateway.max_connections_per_ip` / `max_connections_per_user` (`ConnectionLimits::set_caps`:
//! new connections count against the new caps; those over a lowered one stay). And the AMQP
//! bridge's sources and sinks (`AmqpLinks::reload`: added ones start, removed ones stop,
//! changed ones restart, the rest keep their connections). And the limits of `[http]`,
//! `[websocket]` and `[mqtt]` (`crate::listener_limits`). And the TLS listeners' certificates
//! (web `http.tls_*`, admin `admin.tls_*`, MQTT `mqtt.tls_*`): at every reload,
//! even of an unchanged file, each TLS listener's certificate chain, key and (MQTT) client CA
//! are read again, from the paths the file now gives, into a new rustls configuration; a
//! listener whose chain, client CA or settings differ from what it serves gets it for the
//! connections it accepts from then on (connections already made keep theirs), and is named in
//! the answer (`http.tls`, `admin.tls`, `mqtt.tls`). They are read before anything is put in
//! force: one that does not load refuses the whole reload with the message a start would give
//! (`mqtt.tls_key_file: ...`). So the certificate and key paths, `mqtt.tls_client_ca_file` and
//! `mqtt.tls_client_auth` change in place; turning TLS on or off, `mqtt.tls_listen` and
//! `mqtt.tls_identity` do not. Any other difference needs a restart: the reload is refused,
//! naming the sections, and the running configuration stays — as it does for a file that does
//! not load or validate (the same messages as `meshgate validate`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use meshgate_config::Config;
use meshgate_core::Authorizer;
use meshgate_core::metrics::Registry;
use meshgate_core::tls_server::{ReloadingAcceptor, ServerTls, ServerTlsFiles};
use serde_json::json;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no configuration file to reload: the gateway was started without -c")]
    NoFile,
    /// The file does not load or is not valid: every problem, `key: message`.
    #[error("invalid configuration, nothing changed:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    /// Sections that differ and cannot change while running.
    #[error(
        "these sections changed and need a restart, nothing changed: {}; only [auth], [[triggers]], amqp.sources/sinks, the gateway.max_connections_per_* caps, the limits (sizes, counts, timeouts) of [http], [websocket] and [mqtt] and the TLS listeners' certificate, key and client CA files reload in place",
        .0.join(", ")
    )]
    NeedsRestart(Vec<&'static str>),
    /// A trigger or an AMQP link of the file could not start ([auth], the connection caps and
    /// the TLS certificates, if they changed too, are in force; so are the triggers when an
    /// AMQP link failed).
    #[error("{0}")]
    Apply(String),
    /// The reload's task ended abnormally.
    #[error("the reload did not finish: {0}")]
    Failed(String),
}

/// What the blocking part of a reload did, and the triggers left to apply.
struct Staged {
    changed: Vec<&'static str>,
    triggers: Option<Vec<meshgate_config::TriggerConfig>>,
    /// The AMQP configuration whose sources and sinks are to be put in force.
    amqp: Option<meshgate_config::AmqpConfig>,
}

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Sections put into force (empty: the file says what runs already).
    pub changed: Vec<&'static str>,
}

/// A TLS listener whose certificate a reload reads again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsListener {
    /// The web listener (`http.tls_cert_file`, `tls_key_file`).
    Http,
    /// The admin listener (`admin.tls_cert_file`, `tls_key_file`).
    Admin,
    /// MQTT over TLS (`mqtt.tls_*`).
    #[cfg(feature = "mqtt")]
    Mqtt,
}

impl TlsListener {
    /// The `listener` label of `meshgate_tls_certificate_expiry_timestamp_seconds`.
    fn label(self) -> &'static str {
        match self {
            TlsListener::Http => "http",
            TlsListener::Admin => "admin",
            #[cfg(feature = "mqtt")]
            TlsListener::Mqtt => "mqtt",
        }
    }

    /// Its files and settings in `config`; `None` where TLS is off.
    fn files(self, config: &Config) -> Option<ServerTlsFiles> {
        match self {
            TlsListener::Http => config
                .http
                .tls
                .as_ref()
                .map(|t| crate::app::listener_tls_files(t, "http.tls")),
            TlsListener::Admin => config
                .admin
                .tls
                .as_ref()
                .map(|t| crate::app::listener_tls_files(t, "admin.tls")),
            #[cfg(feature = "mqtt")]
            TlsListener::Mqtt => config.mqtt.tls.as_ref().map(meshgate_mqtt::tls_files),
        }
    }
}

/// The running configuration and what a reload changes in it.
#[derive(Debug)]
pub struct Reloader {
    running: Mutex<Config>,
    authorizer: Arc<Authorizer>,
    /// The per-address and per-user connection caps every listener counts against.
    limits: Arc<meshgate_core::ConnectionLimits>,
    /// Where the listeners read the limits of `[http]`, `[websocket]` and `[mqtt]`.
    listeners: Arc<crate::listener_limits::ListenerLimits>,
    registry: Registry,
    /// The AMQP bridge's sources and sinks (set once the bridge is made, when enabled).
    #[cfg(feature = "amqp")]
    amqp: OnceLock<meshgate_amqp::AmqpLinks>,
    /// The file given with `-c` (set by `main`; tests in-process have none).
    source: OnceLock<PathBuf>,
    /// The running triggers (set once they started).
    triggers: OnceLock<meshgate_triggers::Triggers>,
    /// The TLS listeners that serve (set once they are made).
    tls: OnceLock<Vec<(TlsListener, Arc<ReloadingAcceptor>)>>,
}

impl Reloader {
    pub(crate) fn new(
        running: Config,
        authorizer: Arc<Authorizer>,
        limits: Arc<meshgate_core::ConnectionLimits>,
        listeners: Arc<crate::listener_limits::ListenerLimits>,
        registry: Registry,
    ) -> Self {
        Reloader {
            running: Mutex::new(running),
            authorizer,
            limits,
            listeners,
            registry,
            source: OnceLock::new(),
            triggers: OnceLock::new(),
            tls: OnceLock::new(),
            #[cfg(feature = "amqp")]
            amqp: OnceLock::new(),
        }
    }

    /// The AMQP sources and sinks a reload of `amqp.sources` / `amqp.sinks` changes.
    #[cfg(feature = "amqp")]
    pub(crate) fn set_amqp(&self, links: meshgate_amqp::AmqpLinks) {
        let _ = self.amqp.set(links);
    }

    /// The triggers a reload of `[[triggers]]` changes.
    pub(crate) fn set_triggers(&self, triggers: meshgate_triggers::Triggers) {
        let _ = self.triggers.set(triggers);
    }

    /// The TLS listeners whose files a reload reads again; each one's certificate expiry
    /// becomes `meshgate_tls_certificate_expiry_timestamp_seconds{listener}`.
    pub(crate) fn set_tls(&self, listeners: Vec<(TlsListener, Arc<ReloadingAcceptor>)>) {
        for (listener, acceptor) in &listeners {
            acceptor.set_expiry_gauge(self.registry.gauge(
                meshgate_core::metrics::TLS_CERTIFICATE_EXPIRY,
                &[("listener", listener.label())],
            ));
        }
        let _ = self.tls.set(listeners);
    }

    /// Every TLS listener's files as `next` gives them, read now; every one that does not
    /// load, with the message a start gives.
    fn read_tls(
        &self,
        next: &Config,
    ) -> Result<Vec<(Arc<ReloadingAcceptor>, ServerTls)>, ReloadError> {
        let (mut read, mut errors) = (Vec::new(), Vec::new());
        for (listener, acceptor) in self.tls.get().into_iter().flatten() {
            // (None: TLS turned off, which `needs_restart` refused.)
            let Some(files) = listener.files(next) else {
                continue;
            };
            match ServerTls::read(files) {
                Ok(tls) => read.push((acceptor.clone(), tls)),
                Err(e) => errors.push(e.to_string()),
            }
        }
        match errors.is_empty() {
            true => Ok(read),
            false => Err(ReloadError::Invalid(errors)),
        }
    }

    /// Reads the file again and applies it: the reading, checking and `[auth]` on the blocking
    /// pool (password hashes may be measured), then the triggers.
    pub async fn reload(self: Arc<Self>) -> Result<Reloaded, ReloadError> {
        let me = self.clone();
        let staged = tokio::task::spawn_blocking(move || me.stage_file())
            .await
            .map_err(|e| ReloadError::Failed(e.to_string()))??;
        self.finish(staged).await
    }

    /// Puts `next` into force where it differs from what runs, or changes nothing and says why.
    pub async fn apply(&self, next: Config) -> Result<Reloaded, ReloadError> {
        let staged = self.stage(next)?;
        self.finish(staged).await
    }

    async fn finish(&self, staged: Staged) -> Result<Reloaded, ReloadError> {
        let mut changed = staged.changed;
        if let Some(configs) = staged.triggers {
            if let Some(triggers) = self.triggers.get() {
                triggers
                    .reload_config(&configs)
                    .await
                    .map_err(|e| ReloadError::Apply(format!("triggers: {e}")))?;
            }
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .triggers = configs;
            changed.push("triggers");
        }
        if let Some(amqp) = staged.amqp {
            #[cfg(feature = "amqp")]
            if let Some(links) = self.amqp.get() {
                let lines = links.reload(&amqp).await.map_err(|e| {
                    ReloadError::Apply(format!("amqp: {e} (nothing of amqp changed)"))
                })?;
                for line in &lines {
                    tracing::info!("reload: {line}");
                }
            }
            self.running.lock().unwrap_or_else(|e| e.into_inner()).amqp = amqp;
            changed.push("amqp");
        }
        Ok(Reloaded { changed })
    }

    /// The file [`Reloader::reload_file`] reads.
    pub fn set_source(&self, path: PathBuf) {
        let _ = self.source.set(path);
    }

    /// Reads the file again (and the `MESHGATE__…` environment) and applies what can be
    /// applied without waiting.
    fn stage_file(&self) -> Result<Staged, ReloadError> {
        let path = self.source.get().ok_or(ReloadError::NoFile)?;
        let next = meshgate_config::load(Some(path), env_overrides()).map_err(|errors| {
            ReloadError::Invalid(
                errors
                    .0
                    .iter()
                    .map(|e| format!("{}: {}", e.path, e.message))
                    .collect(),
            )
        })?;
        self.stage(next)
    }

    /// Checks `next`, puts `[auth]`, the connection caps and the TLS certificates into force,
    /// and leaves the triggers and AMQP links to [`Reloader::finish`].
    fn stage(&self, mut next: Config) -> Result<Staged, ReloadError> {
        crate::features::check(&next).map_err(|missing| {
            ReloadError::Invalid(missing.0.iter().map(ToString::to_string).collect())
        })?;
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let restart = needs_restart(&running, &next);
        if !restart.is_empty() {
            return Err(ReloadError::NeedsRestart(restart));
        }
        // Read before anything is put in force: a certificate or key that does not load
        // refuses the whole reload.
        let tls = self.read_tls(&next)?;
        let mut changed = Vec::new();
        if next.auth != running.auth {
            let exposed = crate::web::anonymous_exposure(&next);
            if !exposed.is_empty() && !next.auth.allow_anonymous_on_public {
                return Err(ReloadError::Invalid(vec![format!(
                    "auth.allow_anonymous_on_public: {}",
                    crate::StartError::AnonymousExposed(exposed.join(", "))
                )]));
            }
            let authorizer = crate::app::authorizer(&next, &self.registry)
                .map_err(|e| ReloadError::Invalid(vec![format!("auth: {e}")]))?;
            self.authorizer.reload(authorizer);
            changed.push("auth");
        }
        let caps = |g: &meshgate_config::GatewayConfig| {
            (g.max_connections_per_ip, g.max_connections_per_user)
        };
        if caps(&next.gateway) != caps(&running.gateway) {
            let (per_ip, per_user) = caps(&next.gateway);
            self.limits.set_caps(per_ip, per_user);
            changed.push("gateway.max_connections_per_ip/per_user");
        }
        let limits = self.listeners.apply(&running, &next);
        // Raised connection caps may now exceed the open-file limit: said as at start.
        if !limits.is_empty() {
            crate::app::warn_if_descriptors_short(&next);
        }
        changed.extend(limits);
        for (acceptor, tls) in tls {
            if acceptor.differs(&tls) {
                changed.push(tls.key_prefix());
                acceptor.replace(tls);
            }
        }
        // The running config keeps its triggers and AMQP links until they are in force.
        let triggers = (next.triggers != running.triggers)
            .then(|| std::mem::replace(&mut next.triggers, running.triggers.clone()));
        let amqp = (next.amqp != running.amqp)
            .then(|| std::mem::replace(&mut next.amqp, running.amqp.clone()));
        *running = next;
        Ok(Staged {
            changed,
            triggers,
            amqp,
        })
    }
}

/// The `MESHGATE__…` environment variables (config overrides).
pub fn env_overrides() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("MESHGATE__"))
        .collect()
}

/// The sections of `next` that differ from `running` and cannot change in place.
fn needs_restart(running: &Config, next: &Config) -> Vec<&'static str> {
    // The TLS listeners' certificate files change in place.
    let (running, next) = (&without_tls_files(running), &without_tls_files(next));
    let mut sections = Vec::new();
    let mut differs = |name, same: bool| {
        if !same {
            sections.push(name);
        }
    };
    // The per-address and per-user connection caps change in place; the rest of [gateway]
    // needs a restart.
    let without_caps = |g: &meshgate_config::GatewayConfig| meshgate_config::GatewayConfig {
        max_connections_per_ip: 0,
        max_connections_per_user: 0,
        ..g.clone()
    };
    differs(
        "gateway",
        without_caps(&running.gateway) == without_caps(&next.gateway),
    );
    differs("log", running.log == next.log);
    differs("admin", running.admin == next.admin);
    differs("backbone", running.backbone == next.backbone);
    // Their limits change in place (`crate::listener_limits`); the rest needs a restart.
    use crate::listener_limits::{http_limits_of, mqtt_limits_of, websocket_limits_of};
    differs(
        "http",
        http_limits_of(&next.http, &running.http) == running.http,
    );
    differs(
        "websocket",
        websocket_limits_of(&next.websocket, &running.websocket) == running.websocket,
    );
    differs(
        "mqtt",
        mqtt_limits_of(&next.mqtt, &running.mqtt) == running.mqtt,
    );
    // Sources and sinks change in place; the connection settings need a restart.
    let without_links = |a: &meshgate_config::AmqpConfig| meshgate_config::AmqpConfig {
        sources: Vec::new(),
        sinks: Vec::new(),
        ..a.clone()
    };
    differs(
        "amqp",
        without_links(&running.amqp) == without_links(&next.amqp),
    );
    differs("tracing", running.tracing == next.tracing);
    // (Every section but `auth` and `triggers`: a field added to `Config` must be listed here
    // or in place.)
    let Config {
        gateway: _,
        log: _,
        admin: _,
        backbone: _,
        http: _,
        websocket: _,
        mqtt: _,
        amqp: _,
        auth: _,
        tracing: _,
        triggers: _,
    } = next;
    sections
}

/// `config` without what a reload puts in force through the TLS listeners' rustls
/// configurations: the certificate and key files of the web, admin and MQTT listeners, MQTT's
/// client CA file and whether it asks for client certificates. Whether TLS is on,
/// `mqtt.tls_listen` and `mqtt.tls_identity` stay (they need a restart).
fn without_tls_files(config: &Config) -> Config {
    let mut c = config.clone();
    for tls in [c.http.tls.as_mut(), c.admin.tls.as_mut()]
        .into_iter()
        .flatten()
    {
        *tls = meshgate_config::ServerTlsConfig {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
        };
    }
    if let Some(tls) = c.mqtt.tls.as_mut() {
        *tls = meshgate_config::MqttTlsConfig {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            client_ca_file: None,
            client_auth: meshgate_config::ClientAuthMode::None,
            ..tls.clone()
        };
    }
    c
}

/// `POST /reload` (same token): re-reads the configuration file (`crate::reload`). 200 with
/// the sections put into force, 409 when the gateway has no file or the changes need a
/// restart, 422 for an invalid file or a certificate that does not load (nothing changes
/// then); 422 too when a trigger or an AMQP link of the file could not start, after what
/// comes before them (`[auth]`, caps, limits, certificates) was put in force.
pub fn router(reloader: std::sync::Arc<crate::reload::Reloader>, token: Option<String>) -> Router {
    Router::new().route(
        "/reload",
        axum::routing::post(move |headers: HeaderMap| async move {
            if let Some(r) = crate::triggers_api::refusal_for(token.as_deref(), &headers) {
                return r;
            }
            match reloader.reload().await {
                Ok(done) => {
                    tracing::info!(changed = ?done.changed, "configuration reloaded (POST /reload)");
                    (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/json")],
                        json!({ "changed": done.changed }).to_string(),
                    )
                        .into_response()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "configuration reload refused (POST /reload)");
                    let status = match e {
                        ReloadError::Invalid(_) | ReloadError::Apply(_) => {
                            StatusCode::UNPROCESSABLE_ENTITY
                        }
                        ReloadError::NoFile | ReloadError::NeedsRestart(_) => StatusCode::CONFLICT,
                        ReloadError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
                    };
                    crate::triggers_api::problem(status, &e.to_string(), None)
                }
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_needs_a_restart() {
        let running = Config::default();
        let mut next = running.clone();
        next.auth.anonymous.acl.publish = vec!["a/#".into()];
        next.gateway.max_connections_per_ip = 7;
        next.gateway.max_connections_per_user = 3;
        assert!(needs_restart(&running, &next).is_empty());
        next.gateway.shutdown_grace = std::time::Duration::from_secs(99);
        assert_eq!(needs_restart(&running, &next), ["gateway"]);
        next.gateway.shutdown_grace = running.gateway.shutdown_grace;
        next.mqtt.enabled = !next.mqtt.enabled;
        next.http.listen = "127.0.0.1:1".parse().expect("an address");
        assert_eq!(needs_restart(&running, &next), ["http", "mqtt"]);
    }

    #[test]
    fn tls_files_reload_in_place_and_turning_tls_on_or_off_does_not() {
        let server = |dir: &str| meshgate_config::ServerTlsConfig {
            cert_file: PathBuf::from(format!("/{dir}/cert.pem")),
            key_file: PathBuf::from(format!("/{dir}/key.pem")),
        };
        let mqtt = |dir: &str| meshgate_config::MqttTlsConfig {
            listen: "127.0.0.1:8883".parse().expect("an address"),
            cert_file: PathBuf::from(format!("/{dir}/cert.pem")),
            key_file: PathBuf::from(format!("/{dir}/key.pem")),
            client_ca_file: None,
            client_auth: meshgate_config::ClientAuthMode::None,
            identity: meshgate_config::CertificateIdentity::CommonName,
        };
        let mut running = Config::default();
        running.http.tls = Some(server("a"));
        running.admin.tls = Some(server("a"));
        running.mqtt.tls = Some(mqtt("a"));
        let mut next = running.clone();
        next.http.tls = Some(server("b"));
        next.admin.tls = Some(server("b"));
        let mut tls = mqtt("b");
        tls.client_ca_file = Some(PathBuf::from("/b/ca.pem"));
        tls.client_auth = meshgate_config::ClientAuthMode::Required;
        next.mqtt.tls = Some(tls);
        assert!(needs_restart(&running, &next).is_empty());
        // The TLS address and the identity a client certificate gives are the adapter's.
        let mut moved = next.clone();
        if let Some(t) = moved.mqtt.tls.as_mut() {
            t.listen = "127.0.0.1:8884".parse().expect("an address");
        }
        assert_eq!(needs_restart(&running, &moved), ["mqtt"]);
        let mut san = next.clone();
        if let Some(t) = san.mqtt.tls.as_mut() {
            t.identity = meshgate_config::CertificateIdentity::SubjectAltName;
        }
        assert_eq!(needs_restart(&running, &san), ["mqtt"]);
        // TLS on or off.
        next.http.tls = None;
        next.admin.tls = None;
        next.mqtt.tls = None;
        assert_eq!(needs_restart(&running, &next), ["admin", "http", "mqtt"]);
        assert_eq!(
            needs_restart(&Config::default(), &running),
            ["admin", "http", "mqtt"]
        );
    }
}
