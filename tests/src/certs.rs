//! Certificates for TLS tests, made with the openssl command: a private CA and a server
//! certificate for 127.0.0.1 it signed; and a rustls acceptor serving that certificate.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

/// Runs `openssl args` in `dir`; its standard output. Panics with openssl's message when it
/// fails.
pub fn openssl(args: &[&str], dir: &std::path::Path) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A private CA (`ca.pem`) and a server certificate for 127.0.0.1 it signed (`cert.pem`,
/// `key.pem`), made with openssl, each valid for a day. Returns (CA, certificate, key).
pub fn private_ca(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    private_ca_valid_for(dir, 1)
}

/// [`private_ca`] whose server certificate is valid for `days` days.
pub fn private_ca_valid_for(
    dir: &std::path::Path,
    days: u32,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let days = days.to_string();
    std::fs::create_dir_all(dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "1",
        "-subj",
        "/CN=meshgate test CA",
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    ca.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    ca.extend(["-addext", "keyUsage=critical,keyCertSign"]);
    openssl(&ca, dir);
    let mut csr = vec![
        "req",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "key.pem",
        "-out",
        "cert.csr",
    ];
    csr.extend(ec);
    openssl(&csr, dir);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "cert.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            &days,
            "-out",
            "cert.pem",
            "-extfile",
            "ext.cnf",
        ],
        dir,
    );
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

/// A TLS acceptor (rustls with ring) serving `cert` (PEM chain) with `key`; with `client_ca`,
/// it requires client certificates that CA signed.
fn acceptor_with(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> tokio_rustls::TlsAcceptor {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).unwrap();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

/// A TLS acceptor (rustls with ring) serving `cert` (PEM chain) with `key`.
pub fn acceptor(cert: &std::path::Path, key: &std::path::Path) -> tokio_rustls::TlsAcceptor {
    acceptor_with(cert, key, None)
}

/// A TLS front on a free loopback port for the plain TCP service at `backend` (as a
/// TLS-terminating proxy would be): returns its port.
pub async fn tls_front(cert: &std::path::Path, key: &std::path::Path, backend: &str) -> u16 {
    front(acceptor(cert, key), backend).await
}

/// [`tls_front`] that requires a client certificate signed by `client_ca` (PEM file), as a
/// broker with `verify_peer` and `fail_if_no_peer_cert` would.
pub async fn tls_front_verifying(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: &std::path::Path,
    backend: &str,
) -> u16 {
    front(acceptor_with(cert, key, Some(client_ca)), backend).await
}

/// Accepts TLS with `acceptor` on a free loopback port and relays each connection to
/// `backend`; returns the port.
async fn front(acceptor: tokio_rustls::TlsAcceptor, backend: &str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let backend = backend.to_owned();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let backend = backend.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(&backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

/// A client certificate for `cn` (with `email:<cn>@devices.test` as its alternative name)
/// signed by the CA that [`private_ca`] made in `ca_dir`, written as `<file>.pem` and
/// `<file>.key` in `ca_dir`. Returns (certificate, key).
pub fn client_cert(
    ca_dir: &std::path::Path,
    cn: &str,
    file: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (key, csr, cert, ext) = (
        format!("{file}.key"),
        format!("{file}.csr"),
        format!("{file}.pem"),
        format!("{file}.cnf"),
    );
    let subject = format!("/CN={cn}");
    openssl(
        &[
            "req",
            "-subj",
            &subject,
            "-keyout",
            &key,
            "-out",
            &csr,
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ],
        ca_dir,
    );
    std::fs::write(
        ca_dir.join(&ext),
        format!("subjectAltName=email:{cn}@devices.test\nextendedKeyUsage=clientAuth\n"),
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &cert,
            "-extfile",
            &ext,
        ],
        ca_dir,
    );
    (ca_dir.join(cert), ca_dir.join(key))
}
