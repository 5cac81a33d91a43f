//! MQTT over TLS: the listener's files as `meshgate_core::tls_server` reads and reloads them,
//! and the identity of a verified client certificate (mTLS).

use meshgate_config::{CertificateIdentity, ClientAuthMode, MqttTlsConfig};
pub(crate) use meshgate_core::tls_server::ReloadingAcceptor;
use meshgate_core::tls_server::{ClientAuth, ServerTlsError, ServerTlsFiles, certificate_identity};
use tokio_rustls::server::TlsStream;

/// Builds the acceptor; the error names the config key at fault and what to do.
pub(crate) fn acceptor(config: &MqttTlsConfig) -> Result<ReloadingAcceptor, ServerTlsError> {
    ReloadingAcceptor::new(files(config))
}

/// The files and settings of the MQTT over TLS listener's rustls configuration (also what a
/// configuration reload reads again).
pub fn files(config: &MqttTlsConfig) -> ServerTlsFiles {
    ServerTlsFiles {
        cert_file: config.cert_file.clone(),
        key_file: config.key_file.clone(),
        client_ca_file: config.client_ca_file.clone(),
        client_auth: match config.client_auth {
            ClientAuthMode::None => ClientAuth::None,
            ClientAuthMode::Optional => ClientAuth::Optional,
            ClientAuthMode::Required => ClientAuth::Required,
        },
        alpn: Vec::new(),
        key_prefix: "mqtt.tls",
    }
}

/// The user a verified client certificate names, when the client presented one. `Err` when it
/// presented one that names nobody (no CN / SAN of the configured kind).
pub(crate) fn identity<S>(
    stream: &TlsStream<S>,
    kind: CertificateIdentity,
) -> Result<Option<String>, ()> {
    let Some(leaf) = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    else {
        return Ok(None);
    };
    let san = kind == CertificateIdentity::SubjectAltName;
    certificate_identity(leaf, san).map(Some).ok_or(())
}
