//! The TLS server side of meshgate's listeners (web, admin, MQTT), written once: rustls with
//! the ring provider, TLS 1.2 and 1.3, a certificate chain and key from PEM files, and
//! optionally client certificates verified against a CA file (mTLS, optional or required).
//!
//! **Reload without dropping connections**: a listener asks its [`ReloadingAcceptor`] for the
//! acceptor at every accepted connection and gets the rustls configuration in force at that
//! moment (an `Arc<ServerConfig>` behind an `RwLock`); handshakes started before keep the one
//! they were given, established connections the session they negotiated. Two things replace it:
//! - a configuration reload (`SIGHUP`, `POST /reload`, gateway/src/reload.rs): every TLS
//!   listener's files are read into a [`ServerTls`] first, and only when all of them (and the
//!   rest of the reload) are good is each put in force with [`ReloadingAcceptor::replace`],
//!   with the file paths of the new configuration;
//! - the files changing on disk: at most once a second, at an accepted connection, their sizes
//!   and modification times are looked at and, when one changed, they are read again. A file
//!   that no longer loads (half written, wrong key) keeps the previous configuration and says
//!   so in the log, once per change.
//!
//! Either way the certificate now in force is logged (subject, notAfter, file), and
//! `meshgate_tls_certificate_expiry_timestamp_seconds{listener}` holds its notAfter once the gateway
//! registered the gauge ([`ReloadingAcceptor::set_expiry_gauge`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use crate::file_watch::FileWatch;
use crate::metrics::Gauge;

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
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// The configuration of `files`, with the certificate chain and client CAs it was made of.
type Read = (
    ServerConfig,
    Vec<CertificateDer<'static>>,
    Vec<CertificateDer<'static>>,
);

fn read_files(files: &ServerTlsFiles) -> Result<Read, ServerTlsError> {
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
    let mut client_cas = Vec::new();
    let builder = match (files.client_auth, &files.client_ca_file) {
        (ClientAuth::None, _) | (_, None) => builder.with_no_client_auth(),
        (auth, Some(ca)) => {
            let ca_key = format!("{prefix}_client_ca_file");
            let mut roots = RootCertStore::empty();
            client_cas = certificates(ca, ca_key.clone())?;
            for cert in &client_cas {
                roots
                    .add(cert.clone())
                    .map_err(|source| ServerTlsError::ClientCa {
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
    let mut config = builder
        .with_single_cert(certs.clone(), key)
        .map_err(|source| ServerTlsError::KeyMismatch {
            key: format!("{prefix}_key_file"),
            source,
        })?;
    config.alpn_protocols = files.alpn.clone();
    Ok((config, certs, client_cas))
}

/// What the log and the expiry gauge say of a leaf certificate.
#[derive(Debug, Clone)]
struct Leaf {
    subject: String,
    /// notAfter as x509-parser prints it, and as Unix seconds.
    not_after: String,
    expires: i64,
}

impl Leaf {
    /// `None` when x509-parser cannot read it: the log then names the file only, and the
    /// expiry gauge keeps its value.
    fn of(cert: &CertificateDer<'_>) -> Option<Leaf> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let not_after = &parsed.validity().not_after;
        Some(Leaf {
            subject: parsed.subject().to_string(),
            not_after: not_after.to_string(),
            expires: not_after.timestamp(),
        })
    }
}

/// One TLS listener's configuration read from its files: not in force until
/// [`ReloadingAcceptor::replace`] is given it.
pub struct ServerTls {
    files: ServerTlsFiles,
    config: Arc<ServerConfig>,
    /// The certificate chain and the client CAs as read (DER): what tells a new certificate
    /// from the same one read again.
    chain: Vec<CertificateDer<'static>>,
    client_cas: Vec<CertificateDer<'static>>,
    leaf: Option<Leaf>,
    /// The files as they were just before they were read: a change written while they were
    /// being read is noticed at a later look.
    watch: FileWatch,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .field("leaf", &self.leaf)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads `files` now; the error names the config key at fault.
    pub fn read(files: ServerTlsFiles) -> Result<ServerTls, ServerTlsError> {
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
        let (config, chain, client_cas) = read_files(&files)?;
        let leaf = chain.first().and_then(Leaf::of);
        Ok(ServerTls {
            files,
            config: Arc::new(config),
            chain,
            client_cas,
            leaf,
            watch,
        })
    }

    /// The config key prefix of its listener, e.g. `mqtt.tls`.
    pub fn key_prefix(&self) -> &'static str {
        self.files.key_prefix
    }

    /// Logs the certificate as now in force.
    fn log_in_force(&self, why: &str) {
        let file = self.files.cert_file.display();
        match &self.leaf {
            Some(leaf) => tracing::info!(
                listener = self.files.key_prefix,
                subject = %leaf.subject,
                not_after = %leaf.not_after,
                file = %file,
                "{}: {why}; new connections get the certificate of {} (valid until {})",
                self.files.key_prefix,
                leaf.subject,
                leaf.not_after,
            ),
            None => tracing::info!(
                listener = self.files.key_prefix,
                file = %file,
                "{}: {why}; new connections get the certificate of {file}",
                self.files.key_prefix
            ),
        }
    }
}

/// What a listener serves now, and a count of the replacements (so that the file watch does
/// not put back files a reload replaced while it was reading them).
struct Current {
    tls: ServerTls,
    generation: u64,
}

/// A TLS acceptor whose configuration can be replaced (see the module documentation).
pub struct ReloadingAcceptor {
    current: RwLock<Current>,
    /// `meshgate_tls_certificate_expiry_timestamp_seconds{listener}`, once registered.
    expiry: OnceLock<Gauge>,
}

impl std::fmt::Debug for ReloadingAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingAcceptor")
            .field("tls", &self.current().tls)
            .finish_non_exhaustive()
    }
}

impl ReloadingAcceptor {
    /// Reads the files; the error names the config key at fault.
    pub fn new(files: ServerTlsFiles) -> Result<Self, ServerTlsError> {
        Ok(ReloadingAcceptor {
            current: RwLock::new(Current {
                tls: ServerTls::read(files)?,
                generation: 0,
            }),
            expiry: OnceLock::new(),
        })
    }

    fn current(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The acceptor for a new connection: the configuration in force, rebuilt first when a
    /// file changed (looked at no more than once a second).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.reload_if_changed();
        TlsAcceptor::from(self.current().tls.config.clone())
    }

    /// Whether `next` would serve anything else than what is in force: another certificate
    /// chain or client CA, or other files or settings.
    pub fn differs(&self, next: &ServerTls) -> bool {
        let current = self.current();
        let now = &current.tls;
        now.files != next.files || now.chain != next.chain || now.client_cas != next.client_cas
    }

    /// Puts `next` in force: connections accepted from now on use it (and the file watch
    /// follows its files).
    pub fn replace(&self, next: ServerTls) {
        self.install(next, None, "reloaded");
    }

    /// Sets `gauge` to the notAfter (Unix seconds) of the leaf certificate in force, now and
    /// at every replacement. Once; later calls change nothing.
    pub fn set_expiry_gauge(&self, gauge: Gauge) {
        if let Some(leaf) = &self.current().tls.leaf {
            gauge.set(leaf.expires);
        }
        let _ = self.expiry.set(gauge);
    }

    /// Puts `next` in force, unless `only_at` is given and something else replaced the
    /// configuration since that generation. Whether it did.
    fn install(&self, next: ServerTls, only_at: Option<u64>, why: &str) -> bool {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if only_at.is_some_and(|g| g != current.generation) {
            return false;
        }
        next.log_in_force(why);
        if let (Some(gauge), Some(leaf)) = (self.expiry.get(), &next.leaf) {
            gauge.set(leaf.expires);
        }
        current.tls = next;
        current.generation += 1;
        true
    }

    fn reload_if_changed(&self) {
        let (files, generation) = {
            let current = self.current();
            if !current.tls.watch.changed() {
                return;
            }
            (current.tls.files.clone(), current.generation)
        };
        let prefix = files.key_prefix;
        match ServerTls::read(files) {
            Ok(next) => {
                self.install(next, Some(generation), "certificate files changed");
            }
            Err(e) => tracing::warn!(
                "{prefix}: certificate files changed but cannot be used ({e}); keeping the previous ones"
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
