//! TLS (and mutual TLS) for both ports, with rustls: the same --tls-cert, --tls-key and
//! --tls-client-ca files the Python front end reads.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;

/// One port's TLS settings (the ALPN protocol differs: h2 for gRPC, http/1.1 for HTTP).
pub struct TlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
}

/// The PEM files, and the ALPN protocol to announce.
pub fn acceptor(cert: &str, key: &str, client_ca: Option<&str>, alpn: &[u8]) -> io::Result<TlsAcceptor> {
    let invalid = |what: &str, file: &str, error: &dyn std::fmt::Display| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{what} {file}: {error}"))
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| invalid("cannot read TLS certificate", cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("cannot read TLS certificate", cert, &e))?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid("cannot read TLS key", key, &e))?;
    // ring builds from crates.io alone (aws-lc-rs, rustls' default, needs cmake and NASM); its
    // provider lacks only the post-quantum key exchange, which the Python front end's TLS does
    // not offer either.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS", cert, &e))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(file) => {
            let mut roots = RootCertStore::empty();
            for certificate in CertificateDer::pem_file_iter(file).map_err(|e| invalid("cannot read TLS client CA", file, &e))? {
                let certificate = certificate.map_err(|e| invalid("cannot read TLS client CA", file, &e))?;
                roots.add(certificate).map_err(|e| invalid("invalid TLS client CA", file, &e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid("invalid TLS client CA", file, &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, private).map_err(|e| invalid("TLS certificate and key", cert, &e))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(TlsAcceptor { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)) })
}

/// The handshake, within the connection's header deadline.
pub async fn accept<I>(acceptor: &TlsAcceptor, io: I, timeout: Duration) -> io::Result<TlsStream<I>>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(timeout, acceptor.acceptor.accept(io)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
    }
}
