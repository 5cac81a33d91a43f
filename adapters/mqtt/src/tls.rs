//! MQTT over TLS: the server certificate and key from PEM files, served with rustls (ring
//! provider, TLS 1.2 and 1.3). Client certificates are not requested.

use std::sync::Arc;

use meshgate_config::MqttTlsConfig;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::rustls::{self, ServerConfig};

/// Builds the acceptor; the error names the config key at fault and what to do.
pub(crate) fn acceptor(config: &MqttTlsConfig) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|e| {
            format!(
                "mqtt.tls_cert_file: cannot read certificates from {}: {e}",
                config.cert_file.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "mqtt.tls_cert_file: no PEM certificate in {}",
            config.cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key_file).map_err(|e| {
        format!(
            "mqtt.tls_key_file: no usable private key in {} ({e}); PKCS#8, PKCS#1 and SEC1 PEM keys work",
            config.key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("mqtt.tls_listen: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!("mqtt.tls_key_file: the key does not fit the certificate chain: {e}")
        })?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}
