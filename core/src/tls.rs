//! The TLS client of meshgate's outbound links (NATS `tls://`, AMQP `amqps://`), written once:
//! rustls with the ring provider (the one the workspace builds, see `tokio-rustls` in the
//! workspace `Cargo.toml`), TLS 1.2 and 1.3, the system's root certificates, and an operator's
//! own CA when one is configured. Behind the `tls` feature, so crates without outbound TLS do
//! not build rustls.

use std::sync::Arc;

use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, crypto};

/// Why the TLS client cannot be set up. The caller names the setting (e.g. `amqp.ca_file`).
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The extra CA is not PEM.
    #[error("not a PEM certificate: {0}")]
    NotPem(#[source] rustls::pki_types::pem::Error),
    /// The extra CA is PEM, but not a certificate rustls can use as a root.
    #[error("unusable certificate: {0}")]
    Unusable(#[source] rustls::Error),
    /// The extra CA's PEM holds no certificate at all.
    #[error("the CA PEM holds no certificate")]
    NoCertificate,
    /// The provider cannot do the default protocol versions (not with ring).
    #[error("{0}")]
    Protocols(#[source] rustls::Error),
    /// The client certificate or its key cannot be read or do not fit together.
    #[error("the client certificate: {0}")]
    ClientIdentity(String),
}

/// The TLS client: the system's root certificates (those it cannot parse are skipped, as is a
/// system without a store: the handshake then says which certificate it could not verify),
/// plus every certificate of `extra_ca_pem` (the contents of a PEM file) when given.
pub fn connector(extra_ca_pem: Option<&[u8]>) -> Result<TlsConnector, TlsSetupError> {
    client_config(extra_ca_pem).map(|c| TlsConnector::from(Arc::new(c)))
}

/// The rustls client configuration [`connector`] uses, for clients that take one (the HTTP
/// client of triggers).
pub fn client_config(extra_ca_pem: Option<&[u8]>) -> Result<ClientConfig, TlsSetupError> {
    client_config_with(extra_ca_pem, None)
}

/// [`client_config`] that also presents a client certificate: `identity` is the PEM chain and
/// the PEM key (PKCS#8, PKCS#1 or SEC1), as file contents.
pub fn client_config_with(
    extra_ca_pem: Option<&[u8]>,
    identity: Option<(&[u8], &[u8])>,
) -> Result<ClientConfig, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(pem) = extra_ca_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            roots
                .add(cert.map_err(TlsSetupError::NotPem)?)
                .map_err(TlsSetupError::Unusable)?;
            added += 1;
        }
        if added == 0 {
            return Err(TlsSetupError::NoCertificate);
        }
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Protocols)?
        .with_root_certificates(roots);
    let Some((chain, key)) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let bad = |e: &dyn std::fmt::Display| TlsSetupError::ClientIdentity(e.to_string());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&e))?;
    if chain.is_empty() {
        return Err(TlsSetupError::ClientIdentity("no PEM certificate".into()));
    }
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key).map_err(|e| bad(&e))?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_roots_alone_and_a_bad_extra_ca() {
        assert!(connector(None).is_ok());
        assert!(matches!(
            connector(Some(b"no PEM here".as_slice())),
            Err(TlsSetupError::NoCertificate)
        ));
        assert!(matches!(
            connector(Some(
                b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".as_slice()
            )),
            Err(TlsSetupError::NotPem(_))
        ));
    }
}
