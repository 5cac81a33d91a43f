//! The TLS server side of meshgate's listeners (web, admin, MQTT), written once: rustls with
//! the ring provider, TLS 1.2 and 1.3, a certificate chain and key from PEM files, and
//! optionally client certificates verified against a CA file (mTLS, optional or required).
//!
//! **Reload without dropping connections**: [`ReloadingAcceptor::acceptor`] is asked for the
//! acceptor at every accepted connection; at most once a second it looks at the files' sizes
//! and modification times and, when one changed, builds a new rustls configuration from them.
//! New handshakes use it; established connections keep the session they negotiated. A file
//! that no longer loads (half written, wrong key) keeps the previous configuration and says so
//! in the log, once per change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::file_watch::FileWatch;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig, crypto};

/// Whether clients present certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// Not asked for.
    #[default]
    None,
    /// Asked for and verified when presented; clients without one are served too.
    Optional,
    /// Every client must present one the CA signed.
    Required,
}

/// The files of one TLS listener, and the config keys that name them (for errors).
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA that signs client certificates (with [`ClientAuth::Optional`] / `Required`).
    pub client_ca_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// ALPN protocols offered (`http/1.1` on the web listener; none for MQTT).
    pub alpn: Vec<Vec<u8>>,
    /// The config key prefix, e.g. `http.tls` or `mqtt.tls`: errors name `<prefix>_cert_file`.
    pub key_prefix: &'static str,
}

/// Why a TLS listener cannot be set up; the text names the config key and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("{key}: cannot read certificates from {}: {source}", path.display())]
    ReadCertificates {
        key: String,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{key}: no PEM certificate in {}", path.display())]
    NoCertificate { key: String, path: PathBuf },
    #[error(
        "{key}: no usable private key in {} ({source}); PKCS#8, PKCS#1 and SEC1 PEM keys work",
        path.display()
    )]
    Key {
        key: String,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{key}: {source}")]
    ClientCa {
        key: String,
        #[source]
        source: rustls::Error,
    },
    #[error("{key}: the client CA cannot verify certificates: {source}")]
    Verifier {
        key: String,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("{0}")]
    Protocols(#[source] rustls::Error),
    #[error("{key}: the key does not fit the certificate chain: {source}")]
    KeyMismatch {
        key: String,
        #[source]
        source: rustls::Error,
    },
}

fn certificates(path: &Path, key: String) -> Result<Vec<CertificateDer<'static>>, ServerTlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|source| ServerTlsError::ReadCertificates {
            key: key.clone(),
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(ServerTlsError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The rustls server configuration of `files`, read now.
pub fn server_config(files: &ServerTlsFiles) -> Result<ServerConfig, ServerTlsError> {
    let prefix = files.key_prefix;
    let certs = certificates(&files.cert_file, format!("{prefix}_cert_file"))?;
    let key =
        PrivateKeyDer::from_pem_file(&files.key_file).map_err(|source| ServerTlsError::Key {
            key: format!("{prefix}_key_file"),
            path: files.key_file.clone(),
            source,
        })?;
    let provider = Arc::new(crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(ServerTlsError::Protocols)?;
    let builder = match (files.client_auth, &files.client_ca_file) {
        (ClientAuth::None, _) | (_, None) => builder.with_no_client_auth(),
        (auth, Some(ca)) => {
            let ca_key = format!("{prefix}_client_ca_file");
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, ca_key.clone())? {
                roots.add(cert).map_err(|source| ServerTlsError::ClientCa {
                    key: ca_key.clone(),
                    source,
                })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = if auth == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|source| ServerTlsError::Verifier {
                    key: ca_key,
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder
            .with_single_cert(certs, key)
            .map_err(|source| ServerTlsError::KeyMismatch {
                key: format!("{prefix}_key_file"),
                source,
            })?;
    config.alpn_protocols = files.alpn.clone();
    Ok(config)
}

/// A TLS acceptor that follows its files (see the module documentation).
pub struct ReloadingAcceptor {
    files: ServerTlsFiles,
    current: RwLock<TlsAcceptor>,
    watch: FileWatch,
}

impl std::fmt::Debug for ReloadingAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingAcceptor")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadingAcceptor {
    /// Reads the files; the error names the config key at fault.
    pub fn new(files: ServerTlsFiles) -> Result<Self, ServerTlsError> {
        let config = server_config(&files)?;
        let watch = FileWatch::new(
            [
                Some(&files.cert_file),
                Some(&files.key_file),
                files.client_ca_file.as_ref(),
            ]
            .into_iter()
            .flatten()
            .cloned(),
        );
        Ok(ReloadingAcceptor {
            files,
            current: RwLock::new(TlsAcceptor::from(Arc::new(config))),
            watch,
        })
    }

    /// The acceptor for a new connection: the current configuration, rebuilt first when a
    /// file changed (looked at no more than once a second).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.reload_if_changed();
        match self.current.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn reload_if_changed(&self) {
        if !self.watch.changed() {
            return;
        }
        match server_config(&self.files) {
            Ok(config) => {
                if let Ok(mut current) = self.current.write() {
                    *current = TlsAcceptor::from(Arc::new(config));
                }
                tracing::info!(
                    "{}: certificate files changed; new connections use them",
                    self.files.key_prefix
                );
            }
            Err(e) => tracing::warn!(
                "{}: certificate files changed but cannot be used ({e}); keeping the previous ones",
                self.files.key_prefix
            ),
        }
    }
}

/// The identity of a verified client certificate: its subject's common name, or (with
/// `san = true`) its first DNS, e-mail or URI subject alternative name. `None` when it has no
/// such name or cannot be read.
pub fn certificate_identity(cert: &CertificateDer<'_>, san: bool) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if san {
        let names = parsed.subject_alternative_name().ok()??;
        return names.value.general_names.iter().find_map(|n| match n {
            GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                Some((*s).to_owned())
            }
            _ => None,
        });
    }
    parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &[u8] =
        include_bytes!("../../fuzz/corpus/certificate_identity/seed-ec-cn-and-san.der");

    /// A client certificate is verified by rustls before its name is read, but the reader is
    /// x509-parser on bytes a client sent: any bytes give a name or none, never a panic.
    #[test]
    fn fuzz_certificate_identity() {
        // A minimal DER SEQUENCE and a truncated one, besides random bytes and the corpus
        // (fuzz/corpus/certificate_identity: a real certificate with a CN and two SANs, which
        // the mutations start from).
        let seeds: [&[u8]; 3] = [b"\x30\x03\x02\x01\x01", b"\x30\x82\x01", b""];
        meshgate_fuzz::run(
            "certificate_identity",
            meshgate_fuzz::bytes("certificate_identity", &seeds, 1024),
            |b| Some(b.to_vec()),
            |bytes| {
                let cert = CertificateDer::from(bytes.clone());
                let cn = certificate_identity(&cert, false);
                let san = certificate_identity(&cert, true);
                // The checked-in certificate itself reads as it was made.
                if bytes == SEED
                    && (cn.as_deref() != Some("sensor-7")
                        || san.as_deref() != Some("sensor-7@devices.test"))
                {
                    return Err(format!("seed read as {cn:?} / {san:?}"));
                }
                Ok(())
            },
        );
    }
}
