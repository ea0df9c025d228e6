//! The certificate authority: makes the CA and issues host certificates (rcgen).

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

use super::identity::{check_dates, now, parse_certs, parse_key, verify_client};
use super::{BACKDATE, CA_COMMON_NAME, CA_ORGANIZATION, CertsError, DAY, HostSpec, der};

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before this time.
    pub not_before: SystemTime,
    /// Not valid after this time.
    pub not_after: SystemTime,
}

impl Validity {
    /// From an hour ago (tolerates clock skew between hosts) to `days` days from now.
    pub fn days_from_now(days: u32) -> Self {
        let now = SystemTime::now();
        Validity { not_before: now - BACKDATE, not_after: now + DAY * days }
    }

    fn apply(&self, params: &mut CertificateParams) -> Result<(), CertsError> {
        if self.not_after <= self.not_before {
            return Err(CertsError::BadValidity);
        }
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + unix_seconds(self.not_before);
        params.not_after = epoch + unix_seconds(self.not_after);
        Ok(())
    }
}

/// Time since the Unix epoch (zero before it, which no certificate of ours uses).
fn unix_seconds(time: SystemTime) -> Duration {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    Duration::from_secs(since.as_secs())
}

/// How long what [`generate_with`](super::generate_with) issues stays valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertOptions {
    /// Days the CA is valid (when a new CA is made).
    pub ca_days: u32,
    /// Days a host certificate is valid.
    pub host_days: u32,
}

impl Default for CertOptions {
    /// CA ten years, hosts two years.
    fn default() -> Self {
        CertOptions { ca_days: 3650, host_days: 730 }
    }
}

/// A certificate authority held in memory: it issues host certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// The CA's subject: CN `understudy ca <id>` and O `understudy`. The id (from the public key)
/// tells CAs apart, so a peer from another of our CAs is reported as an unknown issuer rather
/// than as a bad signature from a same-named one.
fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

fn ca_common_name(key: &KeyPair) -> String {
    let raw = key.public_key_raw();
    let id: String = raw[raw.len().saturating_sub(4)..].iter().map(|b| format!("{b:02x}")).collect();
    format!("{CA_COMMON_NAME} {id}")
}

impl Authority {
    /// A new CA with a fresh ECDSA P-256 key.
    pub fn generate(validity: Validity) -> Result<Self, CertsError> {
        let key = KeyPair::generate().map_err(|source| CertsError::Generate { what: "ca key".into(), source })?;
        let mut params = ca_params(&ca_common_name(&key));
        validity.apply(&mut params)?;
        let cert = params
            .self_signed(&key)
            .map_err(|source| CertsError::Generate { what: "ca certificate".into(), source })?;
        Ok(Authority { cert_pem: cert.pem(), cert_der: cert.der().clone(), issuer: Issuer::new(params, key) })
    }

    /// A CA made earlier by [`Authority::generate`] (e.g. `ca.pem` and `ca.key`), checked by
    /// issuing a probe certificate and verifying it against the CA certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertsError> {
        Self::from_pem_labelled(cert_pem, key_pem, Path::new("ca certificate"), Path::new("ca key"))
    }

    pub(super) fn from_pem_labelled(
        cert_pem: &str,
        key_pem: &str,
        cert_file: &Path,
        key_file: &Path,
    ) -> Result<Self, CertsError> {
        let roots = parse_certs(cert_pem.as_bytes(), cert_file)?;
        check_dates(&roots, cert_file, now())?;
        // Parse with rustls first: its errors say more than rcgen's.
        parse_key(key_pem.as_bytes(), key_file)?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|source| CertsError::Generate { what: format!("key pair from {}", key_file.display()), source })?;
        let common_name = der::summarize(&roots[0])
            .and_then(|s| s.common_name)
            .filter(|cn| cn.starts_with(CA_COMMON_NAME))
            .ok_or_else(|| CertsError::ForeignCa { file: cert_file.to_owned() })?;
        let authority = Authority {
            issuer: Issuer::new(ca_params(&common_name), key),
            cert_pem: cert_pem.to_owned(),
            cert_der: roots[0].clone(),
        };
        let probe = authority.issue_der(&HostSpec::new("probe"), Validity::days_from_now(1), true)?;
        match verify_client(&roots, &[probe.0.der().clone()], now()) {
            Ok(()) => Ok(authority),
            Err(_) => Err(CertsError::ForeignCa { file: cert_file.to_owned() }),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA private key, PEM (PKCS#8). Keep it secret.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a host certificate with a fresh ECDSA P-256 key: CN and first SAN = host name,
    /// the host's role as a URI SAN (`urn:understudy:role:host`), both `serverAuth` and
    /// `clientAuth` usages.
    pub fn issue(&self, host: &HostSpec, validity: Validity) -> Result<IssuedCert, CertsError> {
        let (cert, key) = self.issue_der(host, validity, true)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Issues a host certificate without a role, as `understudy certs` did before roles (to
    /// show what peers do with one; nothing in Understudy accepts it).
    pub fn issue_without_role(&self, host: &HostSpec, validity: Validity) -> Result<IssuedCert, CertsError> {
        let (cert, key) = self.issue_der(host, validity, false)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    fn issue_der(
        &self,
        host: &HostSpec,
        validity: Validity,
        with_role: bool,
    ) -> Result<(rcgen::Certificate, KeyPair), CertsError> {
        host.validate()?;
        let generate = |what: &str| {
            let what = format!("{what} for host {}", host.name);
            move |source| CertsError::Generate { what, source }
        };
        let key = KeyPair::generate().map_err(generate("key"))?;
        let mut params = CertificateParams::new(host.alt_names()).map_err(generate("certificate"))?;
        if with_role {
            let role = rcgen::string::Ia5String::try_from(host.role().uri()).map_err(generate("role"))?;
            params.subject_alt_names.push(SanType::URI(role));
        }
        params.distinguished_name.push(DnType::CommonName, host.name.clone());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        validity.apply(&mut params)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(generate("certificate"))?;
        Ok((cert, key))
    }
}

/// A host certificate and its private key, PEM.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8). Keep it secret.
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}
