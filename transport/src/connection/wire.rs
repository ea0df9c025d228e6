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

impl StreamKind {
    /// `control` or `bulk`, for errors.
    pub(crate) fn name(self) -> &'static str {
        match self {
            StreamKind::Control { .. } => "control",
            StreamKind::Bulk { .. } => "bulk",
        }
    }
}

/// What a record's length word announces: the body that follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    /// An application frame of this many bytes.
    Frame(usize),
    /// A goodbye whose close reason has this many bytes.
    Goodbye(usize),
}

/// Reads a record's length word on a stream of `kind` whose frames may be up to `max_frame`
/// bytes; the error says what was wrong.
pub(crate) fn parse_word(word: [u8; 4], kind: StreamKind, max_frame: u32) -> Result<Record, String> {
    let word = u32::from_be_bytes(word);
    let name = kind.name();
    if word & GOODBYE_FLAG != 0 {
        let len = (word & !GOODBYE_FLAG) as usize;
        if !matches!(kind, StreamKind::Control { .. }) || len > MAX_REASON {
            return Err(format!("bad goodbye record on the {name} stream"));
        }
        return Ok(Record::Goodbye(len));
    }
    if word > max_frame {
        return Err(format!("{name} frame of {word} bytes exceeds the limit of {max_frame}"));
    }
    Ok(Record::Frame(word as usize))
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
    fn length_words() {
        let control = StreamKind::Control { bulk_streams: 2 };
        let bulk = StreamKind::Bulk { index: 1 };
        let word = |len: usize| <[u8; 4]>::try_from(&frame_word(len)[..]).unwrap();
        assert_eq!(parse_word(word(0), bulk, 10), Ok(Record::Frame(0)));
        assert_eq!(parse_word(word(10), control, 10), Ok(Record::Frame(10)));
        assert_eq!(parse_word(word(11), bulk, 10), Err("bulk frame of 11 bytes exceeds the limit of 10".to_owned()));
        let bye = <[u8; 4]>::try_from(&goodbye("so long")[..4]).unwrap();
        assert_eq!(parse_word(bye, control, 0), Ok(Record::Goodbye(7)));
        assert_eq!(parse_word(bye, bulk, 0), Err("bad goodbye record on the bulk stream".to_owned()));
        let long = (GOODBYE_FLAG | (MAX_REASON as u32 + 1)).to_be_bytes();
        assert_eq!(parse_word(long, control, 0), Err("bad goodbye record on the control stream".to_owned()));
    }

    /// Whatever is written (a header, frames of any length up to the limit, a goodbye with any
    /// reason) reads back as written, record by record.
    #[test]
    fn random_streams_round_trip() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for round in 0..2_000 {
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let kind = if round % 2 == 0 {
                StreamKind::Control { bulk_streams: next() as u8 }
            } else {
                StreamKind::Bulk { index: next() as u8 }
            };
            let max_frame = (next() % 5000) as u32;
            let mut written = Vec::new();
            let mut stream = header(kind).to_vec();
            for _ in 0..next() % 6 {
                let len = (next() % (u64::from(max_frame) + 1)) as usize;
                let body: Vec<u8> = (0..len).map(|i| i as u8 ^ round as u8).collect();
                stream.extend_from_slice(&frame_word(len));
                stream.extend_from_slice(&body);
                written.push((Record::Frame(len), body));
            }
            if matches!(kind, StreamKind::Control { .. }) && next() % 2 == 0 {
                let reason: String = (0..next() % 1500).map(|i| ['a', 'é', '€'][(i % 3) as usize]).collect();
                let cut = cut_reason(&reason).as_bytes().to_vec();
                stream.extend_from_slice(&goodbye(&reason));
                written.push((Record::Goodbye(cut.len()), cut));
            }
            assert_eq!(parse_header(stream[..HEADER_LEN].try_into().unwrap()), Ok(kind));
            let mut at = HEADER_LEN;
            for (record, body) in &written {
                let word = stream[at..at + 4].try_into().unwrap();
                assert_eq!(parse_word(word, kind, max_frame).as_ref(), Ok(record), "round {round}");
                assert_eq!(&stream[at + 4..at + 4 + body.len()], &body[..]);
                at += 4 + body.len();
            }
            assert_eq!(at, stream.len());
        }
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
