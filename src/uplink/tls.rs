//! The rustls client configuration for mutual TLS, from PEM files (ring provider only).

use crate::config::Mqtt;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// Builds the client config; an error names the config key at fault and what to do.
pub fn client_config(m: &Mqtt) -> Result<rustls::ClientConfig, (String, String)> {
    let err = |key: &str, msg: String| (key.to_string(), msg);
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&m.ca)
        .map_err(|e| err("mqtt.ca", format!("cannot read {}: {e}", m.ca.display())))?;
    for ca in cas {
        let ca = ca.map_err(|e| err("mqtt.ca", format!("bad PEM in {}: {e}", m.ca.display())))?;
        roots.add(ca).map_err(|e| {
            err(
                "mqtt.ca",
                format!("not a usable CA certificate in {}: {e}", m.ca.display()),
            )
        })?;
    }
    if roots.is_empty() {
        return Err(err(
            "mqtt.ca",
            format!(
                "no certificate in {} (expected PEM `BEGIN CERTIFICATE`, e.g. AmazonRootCA1.pem)",
                m.ca.display()
            ),
        ));
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&m.cert)
        .map_err(|e| {
            err(
                "mqtt.cert",
                format!("cannot read {}: {e}", m.cert.display()),
            )
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| err("mqtt.cert", format!("bad PEM in {}: {e}", m.cert.display())))?;
    if certs.is_empty() {
        return Err(err(
            "mqtt.cert",
            format!(
                "no certificate in {} (expected PEM `BEGIN CERTIFICATE`)",
                m.cert.display()
            ),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&m.key).map_err(|e| {
        err(
            "mqtt.key",
            format!(
                "no private key in {} ({e}); expected PEM PKCS#8, PKCS#1 (`BEGIN RSA PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`)",
                m.key.display()
            ),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("mqtt", format!("TLS set-up failed: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| {
            err(
                "mqtt.key",
                format!(
                    "the key in {} does not fit the certificate in {}: {e}",
                    m.key.display(),
                    m.cert.display()
                ),
            )
        })?;
    config.alpn_protocols = m.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}
