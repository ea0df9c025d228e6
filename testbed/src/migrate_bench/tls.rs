//! Certificates for QEMU's `tls-creds-x509` (the TLS configurations): a CA, a server pair for
//! the destination and a client pair for the source, in one directory with the file names QEMU
//! looks for (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`). ECDSA P-256 keys, as our own links use.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::Path;

/// The files [`write_qemu_certs`] writes.
pub const QEMU_CERT_FILES: [&str; 5] =
    ["ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"];

fn named(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "understudy migrate-bench");
    dn
}

/// Writes a fresh CA and server/client pairs into `dir` (created). The server certificate
/// names `127.0.0.1` and `localhost`, where the destination listens.
pub fn write_qemu_certs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let ca_key = KeyPair::generate().context("generate the ca key")?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = named("migrate-bench ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).context("sign the ca certificate")?;
    let issuer = Issuer::new(ca, ca_key);
    let write = |name: &str, text: &str| -> Result<()> {
        std::fs::write(dir.join(name), text).with_context(|| format!("write {}", dir.join(name).display()))
    };
    write("ca-cert.pem", &ca_cert.pem())?;
    for (who, purpose) in
        [("server", ExtendedKeyUsagePurpose::ServerAuth), ("client", ExtendedKeyUsagePurpose::ClientAuth)]
    {
        let key = KeyPair::generate().with_context(|| format!("generate the {who} key"))?;
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .context("certificate names")?;
        p.distinguished_name = named(&format!("migrate-bench {who}"));
        // QEMU checks these when present (critical key usage must allow signing and key
        // encipherment, the purpose must match the endpoint).
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![purpose];
        let cert = p.signed_by(&key, &issuer).with_context(|| format!("sign the {who} certificate"))?;
        write(&format!("{who}-cert.pem"), &cert.pem())?;
        write(&format!("{who}-key.pem"), &key.serialize_pem())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_file_qemu_reads() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("qemu-tls");
        write_qemu_certs(&dir).unwrap();
        for f in QEMU_CERT_FILES {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            let want =
                if f.ends_with("key.pem") { "-----BEGIN PRIVATE KEY-----" } else { "-----BEGIN CERTIFICATE-----" };
            assert!(text.starts_with(want), "{f}: {text}");
        }
        let server = std::fs::read_to_string(dir.join("server-cert.pem")).unwrap();
        let client = std::fs::read_to_string(dir.join("client-cert.pem")).unwrap();
        assert_ne!(server, client);
    }
}
