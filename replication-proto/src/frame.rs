//! Framing: every message travels in one frame with a 16-byte header.
//!
//! ```text
//! offset size field
//!  0     2    magic         "US" (0x55 0x53)
//!  2     1    kind          message kind (see MessageKind)
//!  3     1    flags         0 (reserved; non-zero is refused)
//!  4     4    length        payload length, u32 LE, at most the kind's limit
//!  8     4    payload_crc   crc32 (IEEE) of the payload
//! 12     4    header_crc    crc32 (IEEE) of bytes 0..12
//! 16     len  payload
//! ```
//!
//! The header has its own crc so a corrupted length is caught before it is trusted: a bad header
//! means the byte stream has lost its framing and the connection must be reset (a *fatal*
//! error); a bad payload under a good header drops that one frame and the stream goes on.

use crate::limits::{
    FRAME_HEADER_LEN, MAX_CONTROL_LEN, MAX_GOODBYE_LEN, MAX_HELLO_LEN, MAX_PAYLOAD_LEN, MAX_STATE_CHUNK,
};
use thiserror::Error;

/// The two magic bytes that open every frame.
pub const MAGIC: [u8; 2] = *b"US";

/// The kind of message a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    /// Session opening: version, role, VM identity, memory layout, resume point.
    Hello = 1,
    /// Start of an epoch's checkpoint.
    EpochBegin = 2,
    /// Encoded pages of an epoch.
    PageBatch = 3,
    /// A piece of an epoch's device/vCPU state blob.
    StateChunk = 4,
    /// End of an epoch's checkpoint, with counts and checksums.
    EpochEnd = 5,
    /// The backup committed every epoch up to this one.
    Ack = 6,
    /// Liveness, with progress numbers.
    Heartbeat = 7,
    /// The backup asks for every epoch from this one again.
    ResendRequest = 8,
    /// The backup asks for a full resend (a new baseline).
    ResyncRequest = 9,
    /// Orderly end of the session.
    Goodbye = 10,
    /// Post-copy: the destination asks for pages.
    PageRequest = 11,
    /// Post-copy: pages answering a request (or pushed unasked, id 0).
    PageResponse = 12,
    /// Migration: the source stopped the guest; the epoch named holds the final state.
    SwitchOver = 13,
    /// Migration: part of the map of pages the destination holds at the switch-over.
    PageMap = 14,
    /// Migration: the source gives up its copy of the guest for good.
    Handover = 15,
    /// Migration: the guest runs at the destination.
    Resumed = 16,
    /// Migration: every page is at the destination (post-copy is over).
    Complete = 17,
    /// Protection: a frame the primary delivered to the guest (to a backup keeping an inbound log).
    Inbound = 18,
    /// Protection: the primary's epoch whose inbound frames the backup's replica holds.
    InboundCommitted = 19,
    /// Protection: the output frames an epoch produced (to a backup keeping an output log).
    Output = 20,
}

impl MessageKind {
    /// Every kind, in code order.
    pub const ALL: [MessageKind; 20] = [
        Self::Hello,
        Self::EpochBegin,
        Self::PageBatch,
        Self::StateChunk,
        Self::EpochEnd,
        Self::Ack,
        Self::Heartbeat,
        Self::ResendRequest,
        Self::ResyncRequest,
        Self::Goodbye,
        Self::PageRequest,
        Self::PageResponse,
        Self::SwitchOver,
        Self::PageMap,
        Self::Handover,
        Self::Resumed,
        Self::Complete,
        Self::Inbound,
        Self::InboundCommitted,
        Self::Output,
    ];

    /// The kind with wire code `code`.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code).wrapping_sub(1)).copied()
    }

    /// The wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_payload(self) -> usize {
        match self {
            Self::Hello => MAX_HELLO_LEN,
            Self::PageBatch | Self::PageResponse | Self::PageMap => MAX_PAYLOAD_LEN,
            Self::StateChunk => MAX_STATE_CHUNK + 32,
            Self::Goodbye => MAX_GOODBYE_LEN,
            Self::Inbound => 16 + crate::limits::MAX_INBOUND_FRAME,
            Self::Output => crate::limits::MAX_OUTPUT_LEN,
            Self::PageRequest => 16 + 12 * crate::limits::MAX_REQUEST_PAGES,
            Self::EpochBegin
            | Self::EpochEnd
            | Self::Ack
            | Self::Heartbeat
            | Self::ResendRequest
            | Self::ResyncRequest
            | Self::SwitchOver
            | Self::Handover
            | Self::Resumed
            | Self::Complete
            | Self::InboundCommitted => MAX_CONTROL_LEN,
        }
    }

    /// The first protocol version that has this kind (a peer sending it in a session of an older
    /// version breaks the protocol).
    pub fn since_version(self) -> u16 {
        match self {
            // The inbound and output logs are capabilities of the version 2 `Hello` flags byte.
            Self::SwitchOver
            | Self::PageMap
            | Self::Handover
            | Self::Resumed
            | Self::Complete
            | Self::Inbound
            | Self::InboundCommitted
            | Self::Output => crate::version::Feature::Migration.since(),
            _ => 1,
        }
    }
}

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The header does not start with the magic bytes.
    #[error("frame header: bad magic {found:#06x}")]
    BadMagic {
        /// The two bytes found, as a little-endian u16.
        found: u16,
    },
    /// The header crc does not match.
    #[error("frame header: crc {found:#010x}, expected {expected:#010x}")]
    HeaderCrc {
        /// The crc the header carries.
        found: u32,
        /// The crc of the header bytes.
        expected: u32,
    },
    /// The kind code is unknown.
    #[error("frame header: unknown message kind {code}")]
    UnknownKind {
        /// The code found.
        code: u8,
    },
    /// Reserved flags are set.
    #[error("frame header: reserved flags {flags:#04x} set")]
    Flags {
        /// The flags byte.
        flags: u8,
    },
    /// The declared length is over the kind's limit.
    #[error("{kind:?} frame: length {len} over the limit of {max}")]
    TooLong {
        /// The frame's kind.
        kind: MessageKind,
        /// The declared length.
        len: usize,
        /// The kind's limit.
        max: usize,
    },
    /// The payload crc does not match: this frame is dropped, the stream goes on.
    #[error("{kind:?} frame of {len} bytes: payload crc mismatch")]
    PayloadCrc {
        /// The frame's kind.
        kind: MessageKind,
        /// The payload length.
        len: usize,
    },
    /// A datagram held more or less than one whole frame.
    #[error("datagram of {len} bytes is not one whole frame")]
    NotOneFrame {
        /// The datagram's length.
        len: usize,
    },
    /// The decoder already failed: the stream must be reset.
    #[error("frame stream is broken")]
    Broken,
}

impl FrameError {
    /// Whether the byte stream lost its framing (the connection must be reset). Only
    /// [`FrameError::PayloadCrc`] leaves the stream usable.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::PayloadCrc { .. })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The message kind.
    pub kind: MessageKind,
    /// The payload (crc verified).
    pub payload: Vec<u8>,
}

/// Starts a frame of `kind` in `out`; write the payload after it and call [`finish_frame`].
/// Returns the offset of the frame start.
pub fn begin_frame(out: &mut Vec<u8>, kind: MessageKind) -> usize {
    let at = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(kind.code());
    out.push(0);
    out.extend_from_slice(&[0u8; 12]);
    at
}

/// Completes the frame started at `at` by [`begin_frame`]: fills length and both crcs.
pub fn finish_frame(out: &mut [u8], at: usize) {
    let len = out.len() - at - FRAME_HEADER_LEN;
    let payload_crc = crc32fast::hash(&out[at + FRAME_HEADER_LEN..]);
    let len = u32::try_from(len).expect("frame payload fits u32 (limits are far below)");
    out[at + 4..at + 8].copy_from_slice(&len.to_le_bytes());
    out[at + 8..at + 12].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&out[at..at + 12]);
    out[at + 12..at + 16].copy_from_slice(&header_crc.to_le_bytes());
}

/// Appends a whole frame of `kind` carrying `payload` to `out`.
pub fn encode_frame(kind: MessageKind, payload: &[u8], out: &mut Vec<u8>) {
    let at = begin_frame(out, kind);
    out.extend_from_slice(payload);
    finish_frame(out, at);
}

struct Header {
    kind: MessageKind,
    len: usize,
    payload_crc: u32,
}

fn parse_header(h: &[u8]) -> Result<Header, FrameError> {
    let le32 = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    if h[0..2] != MAGIC {
        return Err(FrameError::BadMagic { found: u16::from_le_bytes([h[0], h[1]]) });
    }
    let expected = crc32fast::hash(&h[0..12]);
    let found = le32(12);
    if expected != found {
        return Err(FrameError::HeaderCrc { found, expected });
    }
    let kind = MessageKind::from_code(h[2]).ok_or(FrameError::UnknownKind { code: h[2] })?;
    if h[3] != 0 {
        return Err(FrameError::Flags { flags: h[3] });
    }
    let len = le32(4) as usize;
    let max = kind.max_payload();
    if len > max {
        return Err(FrameError::TooLong { kind, len, max });
    }
    Ok(Header { kind, len, payload_crc: le32(8) })
}

/// Decodes exactly one frame from `datagram` (for heartbeats sent as QUIC datagrams).
pub fn decode_datagram(datagram: &[u8]) -> Result<Frame, FrameError> {
    if datagram.len() < FRAME_HEADER_LEN {
        return Err(FrameError::NotOneFrame { len: datagram.len() });
    }
    let h = parse_header(&datagram[..FRAME_HEADER_LEN])?;
    if datagram.len() != FRAME_HEADER_LEN + h.len {
        return Err(FrameError::NotOneFrame { len: datagram.len() });
    }
    let payload = &datagram[FRAME_HEADER_LEN..];
    if crc32fast::hash(payload) != h.payload_crc {
        return Err(FrameError::PayloadCrc { kind: h.kind, len: h.len });
    }
    Ok(Frame { kind: h.kind, payload: payload.to_vec() })
}

/// Splits a byte stream, fed in arbitrary pieces, into frames.
///
/// Buffers at most one partial frame plus the piece being fed, and never more than
/// [`MAX_PAYLOAD_LEN`] plus a header for a frame whose header it has verified.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    broken: bool,
}

impl FrameDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes; call [`FrameDecoder::next_frame`] until it returns `Ok(None)`.
    pub fn push(&mut self, data: &[u8]) {
        if self.broken {
            return;
        }
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > (64 << 10) && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether a fatal error has broken the stream.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed. A
    /// [`FrameError::PayloadCrc`] skips one frame and decoding can go on; any other error is
    /// fatal and repeats as [`FrameError::Broken`].
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.broken {
            return Err(FrameError::Broken);
        }
        let avail = &self.buf[self.start..];
        if avail.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let h = match parse_header(&avail[..FRAME_HEADER_LEN]) {
            Ok(h) => h,
            Err(e) => {
                self.broken = true;
                self.buf = Vec::new();
                self.start = 0;
                return Err(e);
            }
        };
        if avail.len() < FRAME_HEADER_LEN + h.len {
            return Ok(None);
        }
        let payload = &avail[FRAME_HEADER_LEN..FRAME_HEADER_LEN + h.len];
        let ok = crc32fast::hash(payload) == h.payload_crc;
        let frame = ok.then(|| Frame { kind: h.kind, payload: payload.to_vec() });
        self.start += FRAME_HEADER_LEN + h.len;
        frame.map(Some).ok_or(FrameError::PayloadCrc { kind: h.kind, len: h.len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_split() {
        let mut stream = Vec::new();
        encode_frame(MessageKind::Ack, &[1, 2, 3, 4, 5, 6, 7, 8], &mut stream);
        encode_frame(MessageKind::Heartbeat, &[], &mut stream);
        encode_frame(MessageKind::PageBatch, &[9u8; 1000], &mut stream);
        for step in [1, 2, 7, 16, 17, 1000, stream.len()] {
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            for piece in stream.chunks(step) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got.len(), 3, "step {step}");
            assert_eq!(got[2].payload.len(), 1000);
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn payload_corruption_skips_one_frame_header_corruption_is_fatal() {
        let mut stream = Vec::new();
        encode_frame(MessageKind::Ack, &[1; 8], &mut stream);
        encode_frame(MessageKind::Ack, &[2; 8], &mut stream);
        let mut bad = stream.clone();
        bad[FRAME_HEADER_LEN + 3] ^= 0x10;
        let mut d = FrameDecoder::new();
        d.push(&bad);
        let e = d.next_frame().unwrap_err();
        assert!(!e.is_fatal());
        assert_eq!(d.next_frame().unwrap().unwrap().payload, vec![2; 8]);

        let mut bad = stream.clone();
        bad[5] ^= 0x01; // length
        let mut d = FrameDecoder::new();
        d.push(&bad);
        assert!(d.next_frame().unwrap_err().is_fatal());
        assert_eq!(d.next_frame(), Err(FrameError::Broken));
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut h = Vec::new();
        let at = begin_frame(&mut h, MessageKind::Ack);
        h.extend_from_slice(&[0u8; 100]);
        finish_frame(&mut h, at);
        let mut d = FrameDecoder::new();
        d.push(&h[..FRAME_HEADER_LEN]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLong { len: 100, .. })));
    }

    #[test]
    fn datagram_must_be_one_frame() {
        let mut f = Vec::new();
        encode_frame(MessageKind::Heartbeat, &[0; 16], &mut f);
        assert!(decode_datagram(&f).is_ok());
        assert!(decode_datagram(&f[..f.len() - 1]).is_err());
        f.push(0);
        assert!(decode_datagram(&f).is_err());
    }
}
