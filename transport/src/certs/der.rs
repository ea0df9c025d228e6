//! What the certificate checks read from a certificate: its validity period, subject common
//! name and the URIs among its subject alternative names (where our role lives), parsed with
//! `x509-parser` (rcgen's own certificate reader, already in the dependency tree).
//!
//! webpki checks validity of end-entity certificates during the handshake, but not of trust
//! anchors, and it reports no times when loading files, nor does it expose URI names: hence a
//! parser beside it.

use std::fmt;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The part of a certificate this module reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CertSummary {
    /// notBefore, seconds since the Unix epoch.
    pub not_before: i64,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// The subject's first common name, if it has one (and it is text).
    pub common_name: Option<String>,
    /// The URIs among the subject alternative names, in order.
    pub uris: Vec<String>,
}

/// Reads validity, subject common name and subject alternative URIs; `None` when the DER is
/// not a certificate (or its subjectAltName extension is malformed or repeated).
pub(crate) fn summarize(cert: &[u8]) -> Option<CertSummary> {
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let validity = cert.validity();
    let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned);
    let uris = match cert.subject_alternative_name().ok()? {
        Some(san) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some((*uri).to_owned()),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    Some(CertSummary {
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        common_name,
        uris,
    })
}

/// Seconds since the Unix epoch, shown as `2031-04-05 06:07:08 UTC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match time::OffsetDateTime::from_unix_timestamp(self.0) {
            Ok(t) => write!(
                f,
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            ),
            // Beyond years -9999..=9999 (a saturated "never").
            Err(_) => write!(f, "{} s since 1970-01-01 UTC", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_as_utc_dates() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01 00:00:00 UTC");
        assert_eq!(Timestamp(951_782_400).to_string(), "2000-02-29 00:00:00 UTC");
        assert_eq!(Timestamp(-1).to_string(), "1969-12-31 23:59:59 UTC");
        assert_eq!(Timestamp(2_524_607_999).to_string(), "2049-12-31 23:59:59 UTC");
        assert_eq!(Timestamp(i64::MAX).to_string(), format!("{} s since 1970-01-01 UTC", i64::MAX));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert_eq!(summarize(b""), None);
        assert_eq!(summarize(b"\x30\x03\x02\x01\x00"), None);
        assert_eq!(summarize(b"\x30\x84\xff\xff\xff\xff"), None);
        assert_eq!(summarize(&[0x30; 64]), None);
    }
}
