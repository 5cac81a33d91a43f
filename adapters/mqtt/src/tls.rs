//! MQTT over TLS: the server certificate and key from PEM files, served with rustls (ring
//! provider, TLS 1.2 and 1.3). Client certificates are not requested.

use std::path::PathBuf;
use std::sync::Arc;

use meshgate_config::MqttTlsConfig;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::rustls::{self, ServerConfig};

/// Why the TLS listener cannot be set up; the text names the config key at fault and what
/// to do.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsSetupError {
    #[error("mqtt.tls_cert_file: cannot read certificates from {}: {source}", path.display())]
    ReadCertificates {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("mqtt.tls_cert_file: no PEM certificate in {}", .0.display())]
    NoCertificate(PathBuf),
    #[error(
        "mqtt.tls_key_file: no usable private key in {} ({source}); PKCS#8, PKCS#1 and SEC1 PEM keys work",
        path.display()
    )]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("mqtt.tls_listen: {0}")]
    Protocols(#[source] rustls::Error),
    #[error("mqtt.tls_key_file: the key does not fit the certificate chain: {0}")]
    KeyMismatch(#[source] rustls::Error),
}

/// Builds the acceptor; the error names the config key at fault and what to do.
pub(crate) fn acceptor(config: &MqttTlsConfig) -> Result<TlsAcceptor, TlsSetupError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|source| TlsSetupError::ReadCertificates {
            path: config.cert_file.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate(config.cert_file.clone()));
    }
    let key =
        PrivateKeyDer::from_pem_file(&config.key_file).map_err(|source| TlsSetupError::Key {
            path: config.key_file.clone(),
            source,
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Protocols)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsSetupError::KeyMismatch)?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}
