//! Self-signed TLS material for a test deployment or a simulation run (rcgen): a CA and a
//! server certificate it signs, so agents pin the CA.

use std::path::Path;

use anyhow::Context;
use fedpersona_model::checkpoint::write_atomic;

/// PEM-encoded CA certificate, server certificate and server key.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    pub ca_cert_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

/// A fresh CA and a server certificate for `names` (DNS names or IP addresses).
pub fn generate(names: &[String]) -> anyhow::Result<TlsMaterial> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().context("CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fedpersona aggregator CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("self-signing the CA")?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().context("server key")?;
    let mut params = CertificateParams::new(names.to_vec()).context("server certificate names")?;
    params
        .distinguished_name
        .push(DnType::CommonName, "fedpersona aggregator");
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the server certificate")?;
    Ok(TlsMaterial {
        ca_cert_pem: ca_cert.pem(),
        server_cert_pem: cert.pem(),
        server_key_pem: key.serialize_pem(),
    })
}

/// Writes `ca.pem`, `server.pem` and `server.key` (mode 0600) into `dir`.
pub fn write(material: &TlsMaterial, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&dir.join("ca.pem"), material.ca_cert_pem.as_bytes())?;
    write_atomic(&dir.join("server.pem"), material.server_cert_pem.as_bytes())?;
    let key = dir.join("server.key");
    write_atomic(&key, material.server_key_pem.as_bytes())?;
    set_private(&key)?;
    Ok(())
}

/// Restricts a file to its owner (0600).
pub fn set_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", path.display()))
}
