//! The envelope of a raft message between arbiters: `magic | version | crc32 | protobuf`.
//!
//! The payload is raft-proto's `Message` encoded with protobuf (`write_to_bytes`,
//! `parse_from_bytes`). The crc32 makes a corrupted datagram a clean error instead of a
//! well-formed message with a flipped index; the version byte lets the format evolve (a node
//! accepts the current and the previous version).

use protobuf::Message as _;
use raft::eraftpb::Message;

/// Errors decoding a raft message envelope.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("raft message: {len} bytes is too short")]
    Short { len: usize },
    #[error("raft message: {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("raft message: bad magic {magic:#04x}")]
    Magic { magic: u8 },
    #[error("raft message: unknown version {version}")]
    Version { version: u8 },
    #[error("raft message: crc {got:#010x} does not match {expected:#010x}")]
    Crc { expected: u32, got: u32 },
    #[error("raft message: protobuf: {reason}")]
    Protobuf { reason: String },
}

const MAGIC: u8 = 0x52; // 'R'
const VERSION: u8 = 1;
const HEADER: usize = 6;
/// The largest envelope [`decode`] accepts: appends are limited to
/// `ArbiterConfig::max_msg_bytes` (32 KiB by default) and a snapshot of the state machine is
/// 32 bytes per VM, so anything near this is garbage or hostile and is refused before the
/// protobuf parser allocates for it.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Encodes a raft message in its envelope.
pub fn encode(msg: &Message) -> Vec<u8> {
    let payload = msg.write_to_bytes().unwrap_or_else(|e| {
        // Encoding a well-formed message into a Vec cannot fail; never send a half message.
        tracing::error!(error = %e, "raft message encoding failed");
        Vec::new()
    });
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.push(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes an envelope; arbitrary bytes give an error, never a panic.
pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
    if bytes.len() < HEADER {
        return Err(WireError::Short { len: bytes.len() });
    }
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge { len: bytes.len(), max: MAX_MESSAGE_BYTES });
    }
    if bytes[0] != MAGIC {
        return Err(WireError::Magic { magic: bytes[0] });
    }
    if bytes[1] != VERSION {
        return Err(WireError::Version { version: bytes[1] });
    }
    let expected = u32::from_le_bytes(bytes[2..6].try_into().expect("4 bytes"));
    let payload = &bytes[HEADER..];
    let got = crc32fast::hash(payload);
    if got != expected {
        return Err(WireError::Crc { expected, got });
    }
    Message::parse_from_bytes(payload).map_err(|e| WireError::Protobuf { reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use raft::eraftpb::{Entry, MessageType};

    use super::*;

    fn sample() -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 1;
        m.to = 3;
        m.term = 7;
        m.index = 41;
        m.log_term = 6;
        m.commit = 40;
        let e = Entry { index: 42, term: 7, data: b"grant".to_vec().into(), ..Default::default() };
        m.set_entries(vec![e].into());
        m
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(decode(&encode(&m)), Ok(m));
    }

    #[test]
    fn every_bit_flip_and_truncation_is_a_clean_error() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(decode(&b).is_err(), "flip of bit {bit} at {i} accepted");
            }
        }
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err());
        }
        assert_eq!(decode(&[0x52, 1]), Err(WireError::Short { len: 2 }));
        assert_eq!(decode(&[0x52, 9, 0, 0, 0, 0]).unwrap_err().to_string(), "raft message: unknown version 9");
    }

    #[test]
    fn oversized_messages_are_refused_before_parsing() {
        let mut m = sample();
        let big = Entry { index: 42, term: 7, data: vec![7; MAX_MESSAGE_BYTES].into(), ..Default::default() };
        m.set_entries(vec![big].into());
        let bytes = encode(&m);
        assert_eq!(decode(&bytes), Err(WireError::TooLarge { len: bytes.len(), max: MAX_MESSAGE_BYTES }));
    }

    #[test]
    fn garbage_with_a_valid_envelope_is_a_clean_error() {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut errors = 0;
        for len in 0..400 {
            let payload: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let mut bytes = vec![MAGIC, VERSION];
            bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            bytes.extend_from_slice(&payload);
            errors += usize::from(decode(&bytes).is_err());
        }
        assert!(errors > 300, "random protobuf mostly fails to parse ({errors})");
    }
}
