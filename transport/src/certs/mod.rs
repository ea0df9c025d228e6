//! Certificates: a CA the admin controls and one certificate per host, signed by it.
//!
//! Every peer is both a TLS server (it accepts) and a TLS client (it connects), so host
//! certificates carry both the `serverAuth` and `clientAuth` extended key usages, and every
//! connection checks both ends against the CA (mutual TLS).
//!
//! Every host certificate carries a [`Role`] as a subject alternative name URI
//! (`urn:understudy:role:host` or `urn:understudy:role:witness`): a replication session needs
//! the `host` role at both ends, so a witness's certificate can never carry one
//! ([`crate::PeerPolicy`]).
//!
//! [`generate`] writes these files into the host directory (created with mode 0700 if missing):
//!
//! | file | what | mode |
//! |---|---|---|
//! | `ca.pem` | the CA certificate; every host needs a copy | 0644 |
//! | `<host>.pem` | the host's certificate, subject CN and a DNS SAN = host name, role URI | 0644 |
//! | `<host>.key` | the host's private key (PKCS#8, ECDSA P-256) | 0600 |
//!
//! The CA private key never goes there: [`CaKey`] says whether it is kept, in a directory of
//! its own (`ca.key` 0600 and a copy of `ca.pem`), to issue more hosts later, or discarded.
//! Running it again with more hosts and the same CA directory reuses that CA and never
//! overwrites a file. [`Identity::load`] reads `ca.pem`, `<host>.pem` and `<host>.key` back and
//! checks them (present, PEM, in date, key matches, signed by the CA, valid for the host name,
//! carries a role, key not readable by others) so that a bad file is reported when the process
//! starts, not as a handshake failure later.

mod authority;
mod der;
mod identity;

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rustls::pki_types::ServerName;

pub use authority::{Authority, CertOptions, IssuedCert, Validity};
pub use der::Timestamp;
pub use identity::{Identity, LoadError, RoleProblem, certificate_role, common_name};
pub(crate) use identity::{presented_names, root_store};

/// The CA certificate's file name.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key's file name.
pub const CA_KEY_FILE: &str = "ca.key";
/// The prefix of the subject alternative name URI that carries a certificate's [`Role`].
pub const ROLE_URI_PREFIX: &str = "urn:understudy:role:";
/// Subject common name prefix of CAs made by [`generate`]; [`Authority::from_pem`] needs it.
const CA_COMMON_NAME: &str = "understudy ca";
const CA_ORGANIZATION: &str = "understudy";
/// Certificates start an hour in the past so that hosts with slightly skewed clocks agree.
const BACKDATE: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// `<host>.pem`, the file name of a host's certificate.
pub fn cert_file_name(host: &str) -> String {
    format!("{host}.pem")
}

/// `<host>.key`, the file name of a host's private key.
pub fn key_file_name(host: &str) -> String {
    format!("{host}.key")
}

/// Errors of certificate generation and loading. `file` names a path, or for in-memory PEM
/// the role of the text (`ca certificate`, `certificate`, `private key`).
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{file}: file not found")]
    NotFound { file: PathBuf },
    #[error("{file}: cannot read")]
    Read {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{file}: cannot write")]
    Write {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{file}: already exists; remove it first to issue a new one")]
    Exists { file: PathBuf },
    #[error("{file}: found but {missing} is missing")]
    CaIncomplete { file: PathBuf, missing: PathBuf },
    #[error("{file}: not valid pem")]
    NotPem {
        file: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{file}: no pem data (expected a '-----BEGIN ...' line)")]
    NoPem { file: PathBuf },
    #[error("{file}: no certificate in the pem data")]
    NoCertificate { file: PathBuf },
    #[error("{file}: no private key in the pem data")]
    NoKey { file: PathBuf },
    #[error("{file}: key file mode {mode:o} lets other users read it; chmod 600 it")]
    KeyTooOpen { file: PathBuf, mode: u32 },
    #[error("{file}: not a readable x.509 certificate")]
    BadCertificate { file: PathBuf },
    #[error("{file}: certificate {subject} is not valid before {not_before} (now {now})")]
    NotYetValid { file: PathBuf, subject: String, not_before: Timestamp, now: Timestamp },
    #[error("{file}: certificate {subject} expired at {not_after} (now {now})")]
    Expired { file: PathBuf, subject: String, not_after: Timestamp, now: Timestamp },
    #[error("{file}: unusable private key")]
    BadKey {
        file: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{cert}: certificate does not belong to private key {key}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{cert}: certificate is not signed by the ca in {ca}")]
    NotSignedByCa { cert: PathBuf, ca: PathBuf },
    #[error("{cert}: certificate rejected by the ca in {ca}")]
    Rejected {
        cert: PathBuf,
        ca: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{cert}: certificate is for {presented:?}, not for host {host:?}")]
    WrongHost { cert: PathBuf, host: String, presented: Vec<String> },
    #[error(
        "{file}: certificate {subject} carries no understudy role (made by an older `understudy certs`); \
         issue it again with `understudy certs --host NAME` or `--witness NAME`"
    )]
    NoRole { file: PathBuf, subject: String },
    #[error("{file}: certificate {subject} has an unknown role {role:?} (known: host, witness)")]
    UnknownRole { file: PathBuf, subject: String, role: String },
    #[error("{file}: certificate {subject} carries several roles {roles:?}")]
    SeveralRoles { file: PathBuf, subject: String, roles: Vec<String> },
    #[error(
        "{file}: the ca key lies beside the host keys (layout of an older `understudy certs`); \
         move ca.key (and a copy of ca.pem) to a directory of its own and pass it as --ca-dir"
    )]
    CaKeyBesideHosts { file: PathBuf },
    #[error("{file}: a ca certificate is here but no ca key was given; pass --ca-dir with the ca that made it")]
    CaWithoutKey { file: PathBuf },
    #[error("{file}: holds another ca than {ca_dir}")]
    OtherCa { file: PathBuf, ca_dir: PathBuf },
    #[error("the ca directory {ca_dir} is the host directory; keep the ca key apart from host keys")]
    CaDirIsHostDir { ca_dir: PathBuf },
    #[error("{file}: the ca was not made by `understudy certs` and cannot sign here")]
    ForeignCa { file: PathBuf },
    #[error("no hosts given")]
    NoHosts,
    #[error("host {name:?} given twice")]
    DuplicateHost { name: String },
    #[error("host name {name:?} is not a dns name (letters, digits, '-' and '.')")]
    BadHostName { name: String },
    #[error("subject alternative name {name:?} of host {host:?} is neither a dns name nor an ip address")]
    BadAltName { host: String, name: String },
    #[error("validity period ends before it starts")]
    BadValidity,
    #[error("cannot generate the {what}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot check certificates")]
    Verifier {
        #[source]
        source: rustls::Error,
    },
}

/// What a certificate's holder may do in the group: carried in the certificate as the subject
/// alternative name URI `urn:understudy:role:<role>` and checked by every handshake
/// ([`crate::PeerPolicy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A VM host: either end of a replication (or migration) session, and an arbitration
    /// agent. `understudy certs --host`.
    Host,
    /// A witness: the third voter of arbitration, nothing else; never a replication session.
    /// `understudy certs --witness`.
    Witness,
}

impl Role {
    /// `host` or `witness`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Witness => "witness",
        }
    }

    /// The subject alternative name URI that carries it: `urn:understudy:role:host`.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }

    pub(crate) fn from_name(name: &str) -> Option<Role> {
        match name {
            "host" => Some(Role::Host),
            "witness" => Some(Role::Witness),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host to issue a certificate for: its name (the certificate's CN and first SAN, and the
/// name peers use to connect to it), its [`Role`] and further subject alternative names (DNS
/// names or IP addresses).
///
/// Parses from `name` or `name=san,san,...`, e.g. `backup=backup.lan,10.0.0.2`, with the
/// [`Role::Host`] role; [`HostSpec::with_role`] makes it a witness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSpec {
    name: String,
    role: Role,
    alt_names: Vec<String>,
}

impl HostSpec {
    /// A host known by one name, with the [`Role::Host`] role.
    pub fn new(name: impl Into<String>) -> Self {
        HostSpec { name: name.into(), role: Role::Host, alt_names: Vec::new() }
    }

    /// A witness known by one name ([`Role::Witness`]).
    pub fn witness(name: impl Into<String>) -> Self {
        HostSpec::new(name).with_role(Role::Witness)
    }

    /// Sets the role.
    pub fn with_role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }

    /// The role its certificate carries.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Adds a subject alternative name (a DNS name or an IP address).
    pub fn with_alt_name(mut self, name: impl Into<String>) -> Self {
        self.alt_names.push(name.into());
        self
    }

    /// The host name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// All subject alternative names: the host name first, then the extra ones, no repeats.
    pub fn alt_names(&self) -> Vec<String> {
        let mut names = vec![self.name.clone()];
        for name in &self.alt_names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }

    fn validate(&self) -> Result<(), CertsError> {
        if !is_dns_name(&self.name) {
            return Err(CertsError::BadHostName { name: self.name.clone() });
        }
        for name in &self.alt_names {
            if name.parse::<std::net::IpAddr>().is_err() && !is_dns_name(name) {
                return Err(CertsError::BadAltName { host: self.name.clone(), name: name.clone() });
            }
        }
        Ok(())
    }
}

impl FromStr for HostSpec {
    type Err = CertsError;

    fn from_str(text: &str) -> Result<Self, CertsError> {
        let (name, alt) = text.split_once('=').unwrap_or((text, ""));
        let spec = HostSpec {
            name: name.trim().to_owned(),
            role: Role::Host,
            alt_names: alt.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl fmt::Display for HostSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.alt_names.is_empty() {
            write!(f, "={}", self.alt_names.join(","))?;
        }
        Ok(())
    }
}

/// A DNS name usable as a file name too: labels of ASCII letters, digits and inner '-'.
fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        && name.parse::<std::net::IpAddr>().is_err()
        && ServerName::try_from(name).is_ok()
}

/// Where [`generate`] keeps the CA's private key. Never beside the host keys: whoever copies a
/// host directory to a host must not copy the power to mint more hosts with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaKey {
    /// Not at all: a new CA signs these hosts and its key is dropped. More hosts later need a
    /// new set (a new CA for every host).
    Discard,
    /// In this directory (`ca.key` 0600 and a copy of `ca.pem`; created with mode 0700), apart
    /// from the host files. A CA already there signs the new hosts; otherwise one is made.
    Keep(PathBuf),
}

/// Paths [`generate`] used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    /// `ca.pem` in the host directory.
    pub ca_cert: PathBuf,
    /// `ca.key` in the CA directory; `None` when the key was discarded.
    pub ca_key: Option<PathBuf>,
    /// Whether the CA was made now (false: an existing one signed the hosts).
    pub ca_created: bool,
    /// One entry per host, in the order given.
    pub hosts: Vec<HostFiles>,
}

/// A host's two files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFiles {
    /// The host name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// `<host>.pem`.
    pub cert: PathBuf,
    /// `<host>.key`.
    pub key: PathBuf,
}

/// Writes a certificate and key per host and `ca.pem` into `dir`, with the file names and
/// modes in the [module docs](self); the CA's key goes where `ca` says, never into `dir`.
/// Never overwrites a file.
pub fn generate(dir: &Path, hosts: &[HostSpec], ca: &CaKey) -> Result<Generated, CertsError> {
    generate_with(dir, hosts, ca, &CertOptions::default())
}

/// [`generate`] with chosen validity periods.
pub fn generate_with(
    dir: &Path,
    hosts: &[HostSpec],
    ca: &CaKey,
    options: &CertOptions,
) -> Result<Generated, CertsError> {
    if hosts.is_empty() {
        return Err(CertsError::NoHosts);
    }
    let mut files = Vec::with_capacity(hosts.len());
    for (i, host) in hosts.iter().enumerate() {
        host.validate()?;
        if hosts[..i].iter().any(|h| h.name == host.name) {
            return Err(CertsError::DuplicateHost { name: host.name.clone() });
        }
        let entry = HostFiles {
            name: host.name.clone(),
            role: host.role,
            cert: dir.join(cert_file_name(&host.name)),
            key: dir.join(key_file_name(&host.name)),
        };
        for file in [&entry.cert, &entry.key] {
            if file.exists() {
                return Err(CertsError::Exists { file: file.clone() });
            }
        }
        files.push(entry);
    }
    // The layout of older versions kept the CA key here: refuse to go on issuing from it.
    if dir.join(CA_KEY_FILE).exists() {
        return Err(CertsError::CaKeyBesideHosts { file: dir.join(CA_KEY_FILE) });
    }
    let host_ca = dir.join(CA_CERT_FILE);
    let (authority, ca_created, ca_key) = match ca {
        CaKey::Discard => {
            if host_ca.exists() {
                return Err(CertsError::CaWithoutKey { file: host_ca });
            }
            (Authority::generate(Validity::days_from_now(options.ca_days))?, true, None)
        }
        CaKey::Keep(ca_dir) => {
            if same_dir(ca_dir, dir) {
                return Err(CertsError::CaDirIsHostDir { ca_dir: ca_dir.clone() });
            }
            let (authority, created) = open_or_make_ca(ca_dir, options)?;
            if host_ca.exists() && read_text(&host_ca)? != authority.cert_pem() {
                return Err(CertsError::OtherCa { file: host_ca, ca_dir: ca_dir.clone() });
            }
            (authority, created, Some(ca_dir.join(CA_KEY_FILE)))
        }
    };
    make_dir(dir)?;
    if !host_ca.exists() {
        write_new(&host_ca, authority.cert_pem(), 0o644)?;
    }
    for (host, entry) in hosts.iter().zip(&files) {
        let issued = authority.issue(host, Validity::days_from_now(options.host_days))?;
        write_new(&entry.key, &issued.key_pem, 0o600)?;
        write_new(&entry.cert, &issued.cert_pem, 0o644)?;
    }
    Ok(Generated { ca_cert: host_ca, ca_key, ca_created, hosts: files })
}

/// The CA kept in `ca_dir`, or a new one written there.
fn open_or_make_ca(ca_dir: &Path, options: &CertOptions) -> Result<(Authority, bool), CertsError> {
    let ca_cert = ca_dir.join(CA_CERT_FILE);
    let ca_key = ca_dir.join(CA_KEY_FILE);
    match (ca_cert.exists(), ca_key.exists()) {
        (true, true) => {
            let cert_pem = read_text(&ca_cert)?;
            let key_pem = read_key_text(&ca_key)?;
            Ok((Authority::from_pem_labelled(&cert_pem, &key_pem, &ca_cert, &ca_key)?, false))
        }
        (true, false) | (false, true) => {
            let (file, missing) = if ca_cert.exists() { (ca_cert, ca_key) } else { (ca_key, ca_cert) };
            Err(CertsError::CaIncomplete { file, missing })
        }
        (false, false) => {
            let authority = Authority::generate(Validity::days_from_now(options.ca_days))?;
            make_dir(ca_dir)?;
            write_new(&ca_key, &authority.key_pem(), 0o600)?;
            write_new(&ca_cert, authority.cert_pem(), 0o644)?;
            Ok((authority, true))
        }
    }
}

fn make_dir(dir: &Path) -> Result<(), CertsError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertsError::Write { file: dir.to_owned(), source })
}

/// Whether two paths name one directory (the same path, or the same inode once both exist).
fn same_dir(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if std::path::absolute(a).ok() == std::path::absolute(b).ok() {
        return true;
    }
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn write_new(file: &Path, text: &str, mode: u32) -> Result<(), CertsError> {
    use io::Write;
    let mut out = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(file).map_err(|source| {
        match source.kind() {
            io::ErrorKind::AlreadyExists => CertsError::Exists { file: file.to_owned() },
            _ => CertsError::Write { file: file.to_owned(), source },
        }
    })?;
    out.write_all(text.as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(|source| CertsError::Write { file: file.to_owned(), source })
}

fn read_text(file: &Path) -> Result<String, CertsError> {
    fs::read_to_string(file).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CertsError::NotFound { file: file.to_owned() },
        _ => CertsError::Read { file: file.to_owned(), source },
    })
}

/// Reads a private key file, refusing one that group or others may read.
fn read_key_text(file: &Path) -> Result<String, CertsError> {
    let text = read_text(file)?;
    let mode =
        fs::metadata(file).map_err(|source| CertsError::Read { file: file.to_owned(), source })?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(CertsError::KeyTooOpen { file: file.to_owned(), mode: mode & 0o777 });
    }
    Ok(text)
}

#[cfg(test)]
mod tests;
