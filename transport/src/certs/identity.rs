//! Loading and checking this host's credentials.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, RootCertStore};

use super::{CA_CERT_FILE, CertsError, ROLE_URI_PREFIX, Role, Timestamp, cert_file_name, der, key_file_name};
use super::{read_key_text, read_text};

/// This host's credentials: the CA certificates to trust, its certificate chain and its key.
pub struct Identity {
    name: Option<String>,
    role: Result<Role, RoleProblem>,
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            name: self.name.clone(),
            role: self.role.clone(),
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// [`Identity::load_named`] failed: names the host and the directory.
#[derive(Debug, thiserror::Error)]
#[error("load certificates for {name} from {}", dir.display())]
pub struct LoadError {
    /// The host's certificate name.
    pub name: String,
    /// The directory.
    pub dir: PathBuf,
    /// Why.
    #[source]
    pub source: Box<CertsError>,
}

impl Identity {
    /// [`Identity::load`] with an error that names the host and the directory.
    pub fn load_named(dir: &Path, host: &str) -> Result<Self, LoadError> {
        Self::load(dir, host).map_err(|source| LoadError {
            name: host.to_string(),
            dir: dir.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// Loads `ca.pem`, `<host>.pem` and `<host>.key` from `dir` (as written by [`generate`](super::generate)),
    /// with every check of [`Identity::from_files`], and that the certificate is valid for
    /// `host` (the name peers connect to).
    pub fn load(dir: &Path, host: &str) -> Result<Self, CertsError> {
        let cert = dir.join(cert_file_name(host));
        let identity = Self::from_files(&dir.join(CA_CERT_FILE), &cert, &dir.join(key_file_name(host)))?;
        identity.check_host(host, &cert)?;
        Ok(identity)
    }

    /// Loads and checks a CA file, a certificate (chain) file and a key file: each present and
    /// PEM, certificates in date, the key matching the certificate and not readable by group
    /// or others, the certificate signed by the CA and carrying one known [`Role`].
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, CertsError> {
        let ca_pem = read_text(ca)?;
        let cert_pem = read_text(cert)?;
        let key_pem = read_key_text(key)?;
        Self::checked(ca_pem.as_bytes(), cert_pem.as_bytes(), key_pem.as_bytes(), [ca, cert, key])
    }

    /// [`Identity::from_files`] for PEM text in memory (no file-mode check).
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CertsError> {
        Self::checked(
            ca_pem.as_bytes(),
            cert_pem.as_bytes(),
            key_pem.as_bytes(),
            [Path::new("ca certificate"), Path::new("certificate"), Path::new("private key")],
        )
    }

    /// An identity without any check, so tests can show what a peer does with a bad one.
    pub fn from_pem_unchecked(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CertsError> {
        let chain = parse_certs(cert_pem.as_bytes(), Path::new("certificate"))?;
        Ok(Identity {
            name: der::summarize(&chain[0]).and_then(|s| s.common_name),
            role: certificate_role(&chain[0]),
            roots: parse_certs(ca_pem.as_bytes(), Path::new("ca certificate"))?,
            chain,
            key: parse_key(key_pem.as_bytes(), Path::new("private key"))?,
        })
    }

    fn checked(
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
        [ca_file, cert_file, key_file]: [&Path; 3],
    ) -> Result<Self, CertsError> {
        let now = now();
        let roots = parse_certs(ca_pem, ca_file)?;
        check_dates(&roots, ca_file, now)?;
        let chain = parse_certs(cert_pem, cert_file)?;
        let name = check_dates(&chain, cert_file, now)?;
        let key = parse_key(key_pem, key_file)?;
        let provider = crate::tls::provider();
        match rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider) {
            Ok(_) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(CertsError::KeyMismatch { cert: cert_file.to_owned(), key: key_file.to_owned() });
            }
            Err(source) => {
                return Err(CertsError::BadKey { file: key_file.to_owned(), source });
            }
        }
        verify_client(&roots, &chain, now).map_err(|source| match source {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
                CertsError::NotSignedByCa { cert: cert_file.to_owned(), ca: ca_file.to_owned() }
            }
            source => CertsError::Rejected { cert: cert_file.to_owned(), ca: ca_file.to_owned(), source },
        })?;
        let role = certificate_role(&chain[0]);
        let subject = || name.as_deref().map_or_else(|| "(no common name)".to_owned(), |cn| format!("{cn:?}"));
        let file = cert_file.to_owned();
        match &role {
            Ok(_) => {}
            Err(RoleProblem::Missing) => return Err(CertsError::NoRole { file, subject: subject() }),
            Err(RoleProblem::Unknown(role)) => {
                return Err(CertsError::UnknownRole { file, subject: subject(), role: role.clone() });
            }
            Err(RoleProblem::Several(roles)) => {
                return Err(CertsError::SeveralRoles { file, subject: subject(), roles: roles.clone() });
            }
            Err(RoleProblem::Unreadable) => return Err(CertsError::BadCertificate { file }),
        }
        Ok(Identity { name, role, roots, chain, key })
    }

    /// Checks that the certificate is valid for server name `host`.
    pub(super) fn check_host(&self, host: &str, cert_file: &Path) -> Result<(), CertsError> {
        let server_name =
            ServerName::try_from(host.to_owned()).map_err(|_| CertsError::BadHostName { name: host.to_owned() })?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(root_store(&self.roots)),
            crate::tls::provider(),
        )
        .build()
        .map_err(|e| CertsError::Verifier { source: rustls::Error::General(e.to_string()) })?;
        let result = verifier.verify_server_cert(&self.chain[0], &self.chain[1..], &server_name, &[], UnixTime::now());
        match result {
            Ok(_) => Ok(()),
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { presented, .. })) => {
                Err(CertsError::WrongHost {
                    cert: cert_file.to_owned(),
                    host: host.to_owned(),
                    presented: presented_names(&presented),
                })
            }
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)) => {
                Err(CertsError::WrongHost { cert: cert_file.to_owned(), host: host.to_owned(), presented: Vec::new() })
            }
            Err(source) => {
                Err(CertsError::Rejected { cert: cert_file.to_owned(), ca: PathBuf::from(CA_CERT_FILE), source })
            }
        }
    }

    /// The subject common name of this host's certificate (the host name for ours).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The role this host's certificate carries (always one for an identity that was checked).
    pub fn role(&self) -> Result<Role, RoleProblem> {
        self.role.clone()
    }

    /// The CA certificates peers must be signed by.
    pub fn ca_certificates(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// This host's certificate, then any intermediates.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// Why a certificate has no usable [`Role`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoleProblem {
    /// It carries none: made by an `understudy certs` from before roles.
    Missing,
    /// It carries a role this build does not know.
    Unknown(String),
    /// It carries more than one.
    Several(Vec<String>),
    /// It is not a readable certificate.
    Unreadable,
}

/// The role a certificate carries in its `urn:understudy:role:<role>` subject alternative name.
pub fn certificate_role(cert: &CertificateDer<'_>) -> Result<Role, RoleProblem> {
    let summary = der::summarize(cert).ok_or(RoleProblem::Unreadable)?;
    let mut roles: Vec<String> =
        summary.uris.iter().filter_map(|uri| uri.strip_prefix(ROLE_URI_PREFIX)).map(str::to_owned).collect();
    roles.dedup();
    match roles.as_slice() {
        [] => Err(RoleProblem::Missing),
        [one] => Role::from_name(one).ok_or_else(|| RoleProblem::Unknown(one.clone())),
        _ => Err(RoleProblem::Several(roles)),
    }
}

/// The names webpki says a certificate presents, shown plainly; the role URI is not a name.
pub(crate) fn presented_names(presented: &[String]) -> Vec<String> {
    presented.iter().filter(|name| !name.starts_with("UniformResourceIdentifier(")).map(|n| plain_name(n)).collect()
}

/// webpki's `DnsName("backup")` as `backup`, `IpAddress(10.0.0.2)` as `10.0.0.2`.
fn plain_name(name: &str) -> String {
    let inner = name
        .strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| name.strip_prefix("IpAddress(").and_then(|n| n.strip_suffix(')')));
    inner.unwrap_or(name).to_owned()
}

/// The subject common name of a DER certificate, e.g. a peer's.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    der::summarize(cert).and_then(|s| s.common_name)
}

pub(crate) fn root_store(roots: &[CertificateDer<'static>]) -> RootCertStore {
    let mut store = RootCertStore::empty();
    // Unparseable roots are skipped here and reported by the verifier as an unknown issuer.
    let _ = store.add_parsable_certificates(roots.iter().cloned());
    store
}

/// Verifies a chain as a client certificate (chain to a root, dates, `clientAuth` usage).
pub(super) fn verify_client(
    roots: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(roots)),
        crate::tls::provider(),
    )
    .build()
    .map_err(|e| rustls::Error::General(e.to_string()))?;
    verifier.verify_client_cert(&chain[0], &chain[1..], now).map(|_| ())
}

pub(super) fn now() -> UnixTime {
    UnixTime::now()
}

/// All certificates in PEM text; at least one.
pub(super) fn parse_certs(pem: &[u8], file: &Path) -> Result<Vec<CertificateDer<'static>>, CertsError> {
    if !contains(pem, b"-----BEGIN ") {
        return Err(CertsError::NoPem { file: file.to_owned() });
    }
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertsError::NotPem { file: file.to_owned(), source })?;
    if certs.is_empty() {
        return Err(CertsError::NoCertificate { file: file.to_owned() });
    }
    Ok(certs)
}

pub(super) fn parse_key(pem: &[u8], file: &Path) -> Result<PrivateKeyDer<'static>, CertsError> {
    if !contains(pem, b"-----BEGIN ") {
        return Err(CertsError::NoPem { file: file.to_owned() });
    }
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => CertsError::NoKey { file: file.to_owned() },
        source => CertsError::NotPem { file: file.to_owned(), source },
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Checks each certificate is readable and in date; returns the first one's common name.
pub(super) fn check_dates(
    certs: &[CertificateDer<'static>],
    file: &Path,
    now: UnixTime,
) -> Result<Option<String>, CertsError> {
    let now = Timestamp(i64::try_from(now.as_secs()).unwrap_or(i64::MAX));
    let mut first_name = None;
    for (i, cert) in certs.iter().enumerate() {
        let summary = der::summarize(cert).ok_or_else(|| CertsError::BadCertificate { file: file.to_owned() })?;
        let subject = summary.common_name.clone().map_or_else(|| format!("#{}", i + 1), |cn| format!("{cn:?}"));
        if now.0 < summary.not_before {
            return Err(CertsError::NotYetValid {
                file: file.to_owned(),
                subject,
                not_before: Timestamp(summary.not_before),
                now,
            });
        }
        if now.0 > summary.not_after {
            return Err(CertsError::Expired {
                file: file.to_owned(),
                subject,
                not_after: Timestamp(summary.not_after),
                now,
            });
        }
        if i == 0 {
            first_name = summary.common_name;
        }
    }
    Ok(first_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names() {
        assert_eq!(plain_name("DnsName(\"backup\")"), "backup");
        assert_eq!(plain_name("IpAddress(10.0.0.2)"), "10.0.0.2");
        assert_eq!(plain_name("other"), "other");
    }
}
