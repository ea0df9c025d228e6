//! Who may be at the other end of a link: the certificate [`Role`]s the link needs and, on the
//! accepting side, the certificate names it expects.
//!
//! The CA decides who belongs to the group; the policy decides who may take part in *this*
//! link. It is checked inside the TLS handshake, right after the CA check, by both sides: a
//! refused peer's handshake fails with a TLS alert (`access_denied`), so not one byte of the
//! application protocol (no checkpoint, no raft message) is read from it, and the refusing side
//! reports a [`HandshakeError`](crate::HandshakeError) that names what it expected and what it
//! was shown.
//!
//! | link | roles (both ends) | names |
//! |---|---|---|
//! | replication ([`PeerPolicy::replication`]) | `host` | accepting side: the expected primary ([`PeerPolicy::accept_only`]); connecting side: the server name given to `connect` |
//! | arbitration ([`PeerPolicy::arbitration`]) | `host` or `witness` | the raft link checks names against its peer list after the handshake |
//!
//! A certificate without a role (made by an `understudy certs` from before roles) is refused
//! with a hint to issue it again: treating it as a host would let an old witness certificate
//! carry a replication session.

use std::fmt;

use rustls::pki_types::CertificateDer;

use crate::certs::{Identity, Role, RoleProblem, certificate_role, common_name};

/// Which peers an [`Endpoint`](crate::Endpoint) lets in. See the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPolicy {
    link: &'static str,
    roles: &'static [Role],
    /// `role host`, for messages.
    needed: &'static str,
    names: Option<Vec<String>>,
}

/// Errors of an endpoint's own certificate against its policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("our certificate {subject} has role {role}; a {link} link needs {needed}")]
    OwnRole { subject: String, role: Role, link: &'static str, needed: &'static str },
    #[error("our certificate {subject} carries no usable role ({problem}); a {link} link needs {needed}")]
    OwnRoleMissing { subject: String, problem: String, link: &'static str, needed: &'static str },
}

/// Why a policy refused a peer's certificate (turned into a `HandshakeError` with the peer's
/// address by `handshake::classify`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The certificate's name is not one the accepting side expects.
    Name { presented: Option<String>, expected: Vec<String> },
    /// The certificate's role does not fit the link.
    Role { subject: String, role: Result<Role, RoleProblem>, link: &'static str, needed: &'static str },
}

impl PeerPolicy {
    /// Replication (and migration) sessions: both ends must hold [`Role::Host`] certificates.
    /// Any name is accepted until [`PeerPolicy::accept_only`] narrows it; the connecting side
    /// always checks the server's name given to `connect`.
    pub fn replication() -> Self {
        PeerPolicy { link: "replication", roles: &[Role::Host], needed: "role host", names: None }
    }

    /// The arbitration (raft) link: hosts and witnesses.
    pub fn arbitration() -> Self {
        PeerPolicy {
            link: "arbitration",
            roles: &[Role::Host, Role::Witness],
            needed: "role host or witness",
            names: None,
        }
    }

    /// Accepts connections only from certificates whose name (subject common name, the host
    /// name given to `understudy certs`) is one of `names`.
    pub fn accept_only<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.names = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// The link's name in messages: `replication`, `arbitration`.
    pub fn link(&self) -> &'static str {
        self.link
    }

    /// The roles a peer may hold.
    pub fn roles(&self) -> &[Role] {
        self.roles
    }

    /// The names accepted connections must carry, if narrowed.
    pub fn accepted_names(&self) -> Option<&[String]> {
        self.names.as_deref()
    }

    /// Checks that our own certificate may serve this link, so that a misconfigured host says so
    /// when it starts rather than being refused by every peer.
    pub fn check_own(&self, identity: &Identity) -> Result<(), PolicyError> {
        let subject = quoted(identity.name());
        match identity.role() {
            Ok(role) if self.roles.contains(&role) => Ok(()),
            Ok(role) => Err(PolicyError::OwnRole { subject, role, link: self.link, needed: self.needed }),
            Err(problem) => Err(PolicyError::OwnRoleMissing {
                subject,
                problem: describe_problem(&problem),
                link: self.link,
                needed: self.needed,
            }),
        }
    }

    /// Checks a peer's certificate (already verified against the CA); `accepting`: it is a
    /// client of ours, so its name is checked too.
    pub(crate) fn check(&self, cert: &CertificateDer<'_>, accepting: bool) -> Result<(), Refusal> {
        let name = common_name(cert);
        if accepting
            && let Some(expected) = &self.names
            && !name.as_ref().is_some_and(|n| expected.contains(n))
        {
            return Err(Refusal::Name { presented: name, expected: expected.clone() });
        }
        match certificate_role(cert) {
            Ok(role) if self.roles.contains(&role) => Ok(()),
            role => Err(Refusal::Role { subject: quoted(name.as_deref()), role, link: self.link, needed: self.needed }),
        }
    }
}

/// `"primary"`, or `(no common name)`.
pub(crate) fn quoted(name: Option<&str>) -> String {
    name.map_or_else(|| "(no common name)".to_owned(), |n| format!("{n:?}"))
}

/// `"primary"` or `one of "a", "b"`.
pub(crate) fn one_of(names: &[String]) -> String {
    match names {
        [one] => format!("{one:?}"),
        _ => format!("one of {}", names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")),
    }
}

pub(crate) fn describe_problem(problem: &RoleProblem) -> String {
    match problem {
        RoleProblem::Missing => "none: made by an older `understudy certs`; issue it again".to_owned(),
        RoleProblem::Unknown(role) => format!("unknown role {role:?}"),
        RoleProblem::Several(roles) => format!("several roles {roles:?}"),
        RoleProblem::Unreadable => "unreadable certificate".to_owned(),
    }
}

impl fmt::Display for PeerPolicy {
    /// `replication link (role host, from "primary")`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} link ({}", self.link, self.needed)?;
        if let Some(names) = &self.names {
            write!(f, ", from {}", one_of(names))?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{Authority, HostSpec, Validity};

    fn cert(ca: &Authority, spec: &HostSpec) -> CertificateDer<'static> {
        let issued = ca.issue(spec, Validity::days_from_now(1)).unwrap();
        let identity = Identity::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap();
        identity.cert_chain()[0].clone()
    }

    #[test]
    fn roles_and_names() {
        let ca = Authority::generate(Validity::days_from_now(1)).unwrap();
        let primary = cert(&ca, &HostSpec::new("primary"));
        let witness = cert(&ca, &HostSpec::witness("witness"));
        let replication = PeerPolicy::replication().accept_only(["primary"]);
        replication.check(&primary, true).unwrap();
        let refusal = replication.check(&witness, true).unwrap_err();
        assert_eq!(refusal, Refusal::Name { presented: Some("witness".into()), expected: vec!["primary".into()] });
        // Connecting: no name check, the role alone refuses it.
        match replication.check(&witness, false).unwrap_err() {
            Refusal::Role { role, link, needed, .. } => {
                assert_eq!((role, link, needed), (Ok(Role::Witness), "replication", "role host"));
            }
            other => panic!("{other:?}"),
        }
        let arbitration = PeerPolicy::arbitration();
        arbitration.check(&primary, true).unwrap();
        arbitration.check(&witness, true).unwrap();
        assert_eq!(replication.to_string(), "replication link (role host, from \"primary\")");
        assert_eq!(one_of(&["a".into(), "b".into()]), "one of \"a\", \"b\"");
    }

    #[test]
    fn own_role_is_checked() {
        let ca = Authority::generate(Validity::days_from_now(1)).unwrap();
        let issued = ca.issue(&HostSpec::witness("witness"), Validity::days_from_now(1)).unwrap();
        let identity = Identity::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap();
        PeerPolicy::arbitration().check_own(&identity).unwrap();
        let error = PeerPolicy::replication().check_own(&identity).unwrap_err();
        assert_eq!(
            error.to_string(),
            "our certificate \"witness\" has role witness; a replication link needs role host"
        );
    }
}
