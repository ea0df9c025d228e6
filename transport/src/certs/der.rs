//! Just enough DER to read a certificate's validity period, subject common name and the URIs
//! among its subject alternative names (where our role lives).
//!
//! webpki checks validity of end-entity certificates during the handshake, but not of trust
//! anchors, and it reports no times when loading files, nor does it expose URI names. Reading
//! three fields does not justify an X.509 parser dependency, so this walks the few TLVs in
//! front of them:
//!
//! ```text
//! Certificate  ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
//! TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber INTEGER,
//!                               signature SEQUENCE, issuer Name, validity Validity,
//!                               subject Name, subjectPublicKeyInfo SEQUENCE,
//!                               [1] issuerUniqueID OPTIONAL, [2] subjectUniqueID OPTIONAL,
//!                               [3] EXPLICIT Extensions OPTIONAL }
//! Validity ::= SEQUENCE { notBefore Time, notAfter Time }   Time ::= UTCTime | GeneralizedTime
//! Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }
//! SubjectAltName ::= SEQUENCE OF GeneralName   uniformResourceIdentifier [6] IMPLICIT IA5String
//! ```

use std::fmt;

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const OCTET_STRING: u8 = 0x04;
/// `[3]` constructed: the extensions of a v3 certificate.
const EXTENSIONS: u8 = 0xa3;
/// `[6]` primitive: a URI in a GeneralName.
const URI: u8 = 0x86;
/// id-at-commonName, 2.5.4.3, as DER content bytes.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// id-ce-subjectAltName, 2.5.29.17, as DER content bytes.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// The part of a certificate this module reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CertSummary {
    /// notBefore, seconds since the Unix epoch.
    pub not_before: i64,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// The subject's first common name, if it has one.
    pub common_name: Option<String>,
    /// The URIs among the subject alternative names, in order.
    pub uris: Vec<String>,
}

/// Reads validity and subject common name; `None` when the DER is not shaped like a certificate.
pub(crate) fn summarize(cert: &[u8]) -> Option<CertSummary> {
    let (tag, certificate, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    let (mut tag, mut _value, mut next) = tlv(rest)?;
    if tag == VERSION {
        rest = next;
        (tag, _value, next) = tlv(rest)?;
    }
    if tag != INTEGER {
        return None;
    }
    rest = next;
    for _ in 0..2 {
        // signature algorithm, issuer
        let (tag, _, next) = tlv(rest)?;
        if tag != SEQUENCE {
            return None;
        }
        rest = next;
    }
    let (tag, validity, next) = tlv(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, subject, after_subject) = tlv(next)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, not_before, after) = tlv(validity)?;
    let not_before = time(tag, not_before)?;
    let (tag, not_after, _) = tlv(after)?;
    let not_after = time(tag, not_after)?;
    Some(CertSummary { not_before, not_after, common_name: common_name(subject), uris: san_uris(after_subject)? })
}

/// The URIs of the subjectAltName extension, given what follows the subject in a TBSCertificate.
fn san_uris(mut rest: &[u8]) -> Option<Vec<String>> {
    let mut uris = Vec::new();
    while !rest.is_empty() {
        let (tag, value, next) = tlv(rest)?;
        rest = next;
        if tag != EXTENSIONS {
            continue; // subjectPublicKeyInfo, unique ids
        }
        let (tag, mut extensions, _) = tlv(value)?;
        if tag != SEQUENCE {
            return None;
        }
        while !extensions.is_empty() {
            let (tag, extension, next) = tlv(extensions)?;
            extensions = next;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, mut fields) = tlv(extension)?;
            if tag != OID || oid != SUBJECT_ALT_NAME {
                continue;
            }
            // Skip the optional `critical` BOOLEAN to the OCTET STRING.
            let value = loop {
                let (tag, value, next) = tlv(fields)?;
                if tag == OCTET_STRING {
                    break value;
                }
                fields = next;
            };
            let (tag, mut names, _) = tlv(value)?;
            if tag != SEQUENCE {
                return None;
            }
            while !names.is_empty() {
                let (tag, name, next) = tlv(names)?;
                names = next;
                if tag == URI {
                    uris.push(String::from_utf8(name.to_vec()).ok()?);
                }
            }
        }
    }
    Some(uris)
}

/// Splits one TLV off the front: (tag, value, rest). Single-byte tags only, as in certificates.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || input.len() < count {
            return None;
        }
        let mut len = 0usize;
        for &byte in &input[..count] {
            len = (len << 8) | usize::from(byte);
        }
        input = &input[count..];
        len
    };
    if input.len() < len {
        return None;
    }
    let (value, rest) = input.split_at(len);
    Some((tag, value, rest))
}

/// The first CN in a Name (SEQUENCE OF SET OF SEQUENCE { OID, value }).
fn common_name(mut name: &[u8]) -> Option<String> {
    while !name.is_empty() {
        let (tag, mut set, rest) = tlv(name)?;
        name = rest;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (_, attribute, rest) = tlv(set)?;
            set = rest;
            let (tag, oid, value) = tlv(attribute)?;
            if tag == OID && oid == COMMON_NAME {
                let (_, text, _) = tlv(value)?;
                return String::from_utf8(text.to_vec()).ok();
            }
        }
    }
    None
}

/// UTCTime `YYMMDDHHMMSSZ` (years 1950-2049) or GeneralizedTime `YYYYMMDDHHMMSSZ`.
fn time(tag: u8, text: &[u8]) -> Option<i64> {
    let (year, rest) = match tag {
        UTC_TIME if text.len() == 13 => {
            let yy = digits(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        GENERALIZED_TIME if text.len() == 15 => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let month = digits(&rest[0..2])?;
    let day = digits(&rest[2..4])?;
    let hour = digits(&rest[4..6])?;
    let minute = digits(&rest[6..8])?;
    let second = digits(&rest[8..10])?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

fn digits(text: &[u8]) -> Option<i64> {
    text.iter().try_fold(0i64, |acc, &c| c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0')))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// (year, month, day) of a day count since 1970-01-01; the inverse of [`days_from_civil`].
pub(crate) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Seconds since the Unix epoch, shown as `2031-04-05 06:07:08 UTC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (year, month, day) = civil_from_days(self.0.div_euclid(86_400));
        let second_of_day = self.0.rem_euclid(86_400);
        write!(
            f,
            "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
            second_of_day / 3600,
            second_of_day / 60 % 60,
            second_of_day % 60
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for days in [-800_000, -1, 0, 1, 59, 365, 10_957, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(Timestamp(951_782_400).to_string(), "2000-02-29 00:00:00 UTC");
        assert_eq!(Timestamp(-1).to_string(), "1969-12-31 23:59:59 UTC");
    }

    #[test]
    fn times() {
        assert_eq!(time(UTC_TIME, b"700101000000Z"), Some(0));
        assert_eq!(time(UTC_TIME, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(time(GENERALIZED_TIME, b"20500101000000Z"), Some(2_524_608_000));
        assert_eq!(time(UTC_TIME, b"700101000000+"), None);
        assert_eq!(time(UTC_TIME, b"70010100000Z"), None);
        assert_eq!(time(UTC_TIME, b"701301000000Z"), None);
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert_eq!(summarize(b""), None);
        assert_eq!(summarize(b"\x30\x03\x02\x01\x00"), None);
        assert_eq!(summarize(b"\x30\x84\xff\xff\xff\xff"), None);
        assert_eq!(summarize(&[0x30; 64]), None);
    }
}
