//! Test PKI generated with rcgen 0.14 (EC P-256), written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};

/// The files of one test PKI.
pub struct Pki {
    /// The CA the broker trusts and the agent trusts the broker by.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate signed by `ca` (clientAuth, CN = the vehicle id).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A second, unrelated CA.
    pub other_ca: PathBuf,
    /// A client certificate signed by `other_ca`: the broker must refuse it.
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
}

fn base_params(cn: &str, sans: Vec<String>) -> CertificateParams {
    let mut p = CertificateParams::new(sans).expect("valid subject alt names");
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "redline-agent tests");
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2099, 12, 31);
    p
}

fn new_ca(cn: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = base_params(cn, Vec::new());
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    let key = KeyPair::generate().expect("generate CA key");
    let cert = params.self_signed(&key).expect("self-sign CA");
    (cert.pem(), Issuer::new(params, key))
}

/// Returns (certificate PEM, private key PEM).
fn new_leaf(
    cn: &str,
    sans: Vec<String>,
    eku: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'static, KeyPair>,
) -> (String, String) {
    let mut params = base_params(cn, sans);
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    let key = KeyPair::generate().expect("generate leaf key");
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

impl Pki {
    /// Generates the whole PKI into `dir`. `client_cn` is the client certificates' CN.
    pub fn generate(dir: &Path, client_cn: &str) -> Pki {
        let (ca_pem, ca) = new_ca("redline test CA");
        let (server_pem, server_key) = new_leaf(
            "localhost",
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
        );
        let (client_pem, client_key) = new_leaf(
            client_cn,
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            &ca,
        );
        let (other_ca_pem, other_ca) = new_ca("unrelated CA");
        let (other_client_pem, other_client_key) = new_leaf(
            client_cn,
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            &other_ca,
        );
        Pki {
            ca: write(dir, "ca.pem", &ca_pem),
            server_cert: write(dir, "server.pem", &server_pem),
            server_key: write(dir, "server.key", &server_key),
            client_cert: write(dir, "client.pem", &client_pem),
            client_key: write(dir, "client.key", &client_key),
            other_ca: write(dir, "other-ca.pem", &other_ca_pem),
            other_client_cert: write(dir, "other-client.pem", &other_client_pem),
            other_client_key: write(dir, "other-client.key", &other_client_key),
        }
    }
}
