//! What our streams carry, byte by byte.
//!
//! Every stream is unidirectional and starts with an 8-byte header:
//!
//! ```text
//! magic "USTY" | kind: u8 (0 control, 1 bulk) | arg: u8 | reserved: u16 = 0
//! ```
//!
//! `arg` is, for the control stream, the number of bulk streams the sender opens, and for a
//! bulk stream its index. Then records follow, each a big-endian `u32` word and a payload:
//! - word < 2^31: an application frame of `word` bytes;
//! - word = 2^31 + n: a goodbye carrying an n-byte UTF-8 close reason (control stream only),
//!   the last record before the stream finishes.

use bytes::Bytes;

pub(crate) const HEADER_LEN: usize = 8;
const MAGIC: &[u8; 4] = b"USTY";
const KIND_CONTROL: u8 = 0;
const KIND_BULK: u8 = 1;
/// Marks a transport record rather than a frame in the length word.
pub(crate) const GOODBYE_FLAG: u32 = 1 << 31;
/// The largest frame the length word can describe.
pub(crate) const MAX_FRAME_LIMIT: u32 = GOODBYE_FLAG - 1;
/// Longest close reason sent; longer ones are cut (at a character boundary).
pub(crate) const MAX_REASON: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamKind {
    /// The ordered control stream; the peer will open this many bulk streams.
    Control { bulk_streams: u8 },
    /// Bulk stream number `index`.
    Bulk { index: u8 },
}

pub(crate) fn header(kind: StreamKind) -> [u8; HEADER_LEN] {
    let (kind, arg) = match kind {
        StreamKind::Control { bulk_streams } => (KIND_CONTROL, bulk_streams),
        StreamKind::Bulk { index } => (KIND_BULK, index),
    };
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], kind, arg, 0, 0]
}

/// Parses a stream header; the error says what was wrong.
pub(crate) fn parse_header(header: &[u8; HEADER_LEN]) -> Result<StreamKind, String> {
    if &header[..4] != MAGIC {
        return Err(format!("stream starts with {:02x?}, not \"USTY\"", &header[..4]));
    }
    match (header[4], header[5]) {
        (KIND_CONTROL, bulk_streams) => Ok(StreamKind::Control { bulk_streams }),
        (KIND_BULK, index) => Ok(StreamKind::Bulk { index }),
        (kind, _) => Err(format!("unknown stream kind {kind}")),
    }
}

/// The length word of a frame (the caller checked `len` against the limit).
pub(crate) fn frame_word(len: usize) -> Bytes {
    let word = u32::try_from(len).unwrap_or(MAX_FRAME_LIMIT);
    Bytes::copy_from_slice(&word.to_be_bytes())
}

/// `reason` cut to at most [`MAX_REASON`] bytes at a character boundary.
pub(crate) fn cut_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A goodbye record: length word with the flag, then the reason.
pub(crate) fn goodbye(reason: &str) -> Bytes {
    let reason = cut_reason(reason).as_bytes();
    let word = GOODBYE_FLAG | u32::try_from(reason.len()).unwrap_or(0);
    let mut record = Vec::with_capacity(4 + reason.len());
    record.extend_from_slice(&word.to_be_bytes());
    record.extend_from_slice(reason);
    Bytes::from(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        for kind in [StreamKind::Control { bulk_streams: 4 }, StreamKind::Bulk { index: 3 }] {
            assert_eq!(parse_header(&header(kind)), Ok(kind));
        }
        assert_eq!(parse_header(b"GET / HT"), Err("stream starts with [47, 45, 54, 20], not \"USTY\"".to_owned()));
        assert_eq!(parse_header(b"USTY\x07\0\0\0"), Err("unknown stream kind 7".to_owned()));
    }

    #[test]
    fn goodbye_is_flagged_and_cut() {
        let record = goodbye("bye");
        assert_eq!(&record[..], b"\x80\0\0\x03bye");
        let long = "é".repeat(MAX_REASON);
        let record = goodbye(&long);
        let len = u32::from_be_bytes(record[..4].try_into().unwrap()) & !GOODBYE_FLAG;
        assert_eq!(len as usize, MAX_REASON);
        assert!(std::str::from_utf8(&record[4..]).is_ok());
    }
}
