//! TLS configurations from PEM files (rustls, ring provider): the HTTP intake's server side
//! (optionally requiring client certificates) and the clients of callbacks and etcd (system-
//! independent web PKI roots, or a configured CA; optionally a client certificate). Sync code;
//! the tokio side of the intake lives in `scheduler/http/transport.rs`.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// TLS material that cannot be read or used; the message names the file or the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// Back to its message, for callers that still carry errors as text.
impl From<TlsError> for String {
    fn from(e: TlsError) -> String {
        e.0
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM file's bytes, bounded (`crate::read_bounded`).
fn pem_bytes(path: &str, what: &str) -> Result<Vec<u8>, String> {
    crate::read_bounded(
        std::path::Path::new(path),
        crate::MAX_SMALL_FILE_BYTES,
        true,
    )
    .map_err(|e| format!("{what} {path}: {e}"))
}

fn certs(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = pem_bytes(path, what)?;
    let list = CertificateDer::pem_slice_iter(&bytes)
        .map(|c| c.map(|c| c.into_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {path}: {e}"))?;
    if list.is_empty() {
        return Err(format!("{what} {path}: no PEM certificate in it"));
    }
    Ok(list)
}

fn key(path: &str, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(&pem_bytes(path, what)?)
        .map(|k| k.clone_key())
        .map_err(|e| format!("{what} {path}: {e}"))
}

fn roots(ca: &str, what: &str) -> Result<rustls::RootCertStore, String> {
    let mut r = rustls::RootCertStore::empty();
    for c in certs(ca, what)? {
        r.add(c).map_err(|e| format!("{what} {ca}: {e}"))?;
    }
    Ok(r)
}

/// The intake's TLS: `cert` chain and `key`; with `client_ca`, every client must present a
/// certificate that chains to it (mutual TLS).
///
/// # Errors
/// A file cannot be read or holds no usable certificate or key; they do not match.
pub fn server_config(
    cert: &str,
    key_file: &str,
    client_ca: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_inner(cert, key_file, client_ca).map_err(TlsError)
}

fn server_config_inner(
    cert: &str,
    key_file: &str,
    client_ca: &str,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let b = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let b = if client_ca.is_empty() {
        b.with_no_client_auth()
    } else {
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(client_ca, "server.tls_client_ca")?),
            provider(),
        )
        .build()
        .map_err(|e| format!("server.tls_client_ca {client_ca}: {e}"))?;
        b.with_client_cert_verifier(v)
    };
    let mut c = b
        .with_single_cert(
            certs(cert, "server.tls_cert")?,
            key(key_file, "server.tls_key")?,
        )
        .map_err(|e| format!("server.tls_cert/tls_key: {e}"))?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// A client config: roots from `ca` (empty = the web PKI roots built in), and a client
/// certificate when `cert` and `key` are given. `what` names the config keys in errors.
///
/// # Errors
/// A file cannot be read or holds nothing usable.
pub fn client_config(
    ca: &str,
    cert: &str,
    key_file: &str,
    what: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_inner(ca, cert, key_file, what).map_err(TlsError)
}

fn client_config_inner(
    ca: &str,
    cert: &str,
    key_file: &str,
    what: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = if ca.is_empty() {
        rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }
    } else {
        roots(ca, what)?
    };
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    let c = match (cert.is_empty(), key_file.is_empty()) {
        (true, true) => b.with_no_client_auth(),
        (false, false) => b
            .with_client_auth_cert(certs(cert, what)?, key(key_file, what)?)
            .map_err(|e| format!("{what}: {e}"))?,
        _ => {
            return Err(format!(
                "{what}: a client certificate needs both cert and key"
            ))
        }
    };
    Ok(Arc::new(c))
}
