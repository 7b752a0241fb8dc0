//! TLS for the public listener (optional): certificate and key from PEM
//! files, loaded once at start.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// TLS settings that cannot work; names the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct TlsSettingsError {
    pub field: String,
    pub problem: String,
}

fn wrong(field: &str, problem: String) -> TlsSettingsError {
    TlsSettingsError {
        field: field.to_owned(),
        problem,
    }
}

/// Builds the acceptor `config` describes; the error names the field.
pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsSettingsError> {
    let cert_file = format!("listen.tls.cert_file ({})", config.cert_file.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|err| wrong(&cert_file, err.to_string()))?;
    if certs.is_empty() {
        return Err(wrong(&cert_file, "no certificate in the file".to_owned()));
    }
    let key_file = format!("listen.tls.key_file ({})", config.key_file.display());
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|err| wrong(&key_file, err.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| wrong("listen.tls", err.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|err| {
            wrong(
                "listen.tls",
                format!("the key does not fit the certificate: {err}"),
            )
        })?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}
