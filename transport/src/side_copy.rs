//! Side copies: an authenticated UDP datagram per frame the primary's guest receives, sent to
//! the backup's inbound log beside the replication session's own (reliable) copy.
//!
//! The session's copy of a delivered frame crosses a tokio queue, a task, the QUIC driver and
//! the backup's session task before the backup logs it (~140 µs mean here); a primary killed in
//! between loses the frame, and an ordinary client then waits for its retransmission timer. A
//! side copy is sealed and handed to the kernel by the virtio-net worker itself, before the
//! guest is even told of the frame: once `send` returns the datagram no longer depends on the
//! primary's process (docs/failover.md, "Input replay").
//!
//! **No unauthenticated mode.** Each QUIC connection yields a fresh key and key id from its TLS
//! session ([`SideKey::from_connection`], RFC 5705 exporter under [`KEY_LABEL`] and
//! [`ID_LABEL`]): only the two authenticated peers of that connection know the key. Each
//! datagram is sealed with ChaCha20-Poly1305 (`ring`), nonce = the sender's per-connection
//! counter (never reused under one key: the counter only grows, and a new connection has a new
//! key), AAD = the cleartext header. A forged, modified, truncated or wrong-key datagram fails
//! [`Opener::open`]; one of another connection (an older key id) is recognised by its key id
//! before any decryption.
//!
//! Datagram (little-endian, like the replication protocol):
//!
//! | field | bytes | |
//! |---|---:|---|
//! | version | 1 | [`VERSION`] |
//! | key id | 8 | the connection's [`SideKey::id`] |
//! | counter | 8 | the sender's count under this key, from 0: the nonce |
//! | epoch | 8 | the frame's epoch tag (as `Inbound`) |
//! | seq | 8 | the device's delivery count (as `Inbound`) |
//! | frame | n | the Ethernet frame, encrypted |
//! | tag | 16 | Poly1305 tag over the header (AAD) and the encrypted frame |
//!
//! ```
//! use transport::side_copy::{Opener, Sealer, SideKey};
//! let key = SideKey::from_secret(7, [9; 32]);
//! let sealer = Sealer::new(&key);
//! let mut datagram = Vec::new();
//! sealer.seal(3, 41, b"a frame", &mut datagram).unwrap();
//! let (header, frame) = Opener::new(&key).open(&mut datagram).unwrap();
//! assert_eq!((header.epoch, header.seq, frame), (3, 41, &b"a frame"[..]));
//! ```

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

use crate::Connection;

/// TLS exporter label of the key (context `understudy`, see [`Connection::keying_material`]).
pub const KEY_LABEL: &[u8] = b"EXPORTER-understudy-inbound-copy";
/// TLS exporter label of the key id (its first 8 bytes).
pub const ID_LABEL: &[u8] = b"EXPORTER-understudy-inbound-copy-id";
/// The datagram format's version.
pub const VERSION: u8 = 1;
/// Bytes of the cleartext header.
pub const HEADER_LEN: usize = 1 + 8 + 8 + 8 + 8;
/// Bytes of the authentication tag.
pub const TAG_LEN: usize = 16;
/// Largest UDP payload (IPv4).
const MAX_DATAGRAM: usize = 65_507;
/// Largest frame a side copy carries (larger ones go by the session only).
pub const MAX_FRAME: usize = MAX_DATAGRAM - HEADER_LEN - TAG_LEN;

/// Errors of side copies.
#[derive(Debug, thiserror::Error)]
pub enum SideCopyError {
    /// Shorter than a header and a tag.
    #[error("side copy of {len} bytes is shorter than a header and a tag")]
    Short {
        /// Its length.
        len: usize,
    },
    /// An unknown format version.
    #[error("side copy format version {0}, this build reads {VERSION}")]
    Version(u8),
    /// Sealed under another key id (another connection's, or garbage).
    #[error("side copy under key id {got:016x}, the current key is {want:016x}")]
    KeyId {
        /// The datagram's key id.
        got: u64,
        /// The current key's id.
        want: u64,
    },
    /// Authentication failed: forged, modified, truncated or sealed under another key.
    #[error("side copy {counter} (seq {seq}) fails authentication")]
    Auth {
        /// The datagram's counter.
        counter: u64,
        /// The seq its header claims.
        seq: u64,
    },
    /// The frame is too large for one datagram.
    #[error("frame of {len} bytes is too large for a side copy (at most {MAX_FRAME})")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// The connection exported no keying material (it is closed).
    #[error("no keying material for side copies: the connection is closed")]
    NoKey,
    /// A socket call failed.
    #[error("side copy socket: {what}")]
    Io {
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A connection's side-copy key and its id (both from its TLS session).
#[derive(Clone)]
pub struct SideKey {
    id: u64,
    secret: [u8; 32],
}

impl std::fmt::Debug for SideKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideKey").field("id", &format_args!("{:016x}", self.id)).finish_non_exhaustive()
    }
}

impl SideKey {
    /// The key both peers of `conn` derive (`None` once the connection is closed).
    pub fn from_connection(conn: &Connection) -> Option<Self> {
        let secret = conn.keying_material(KEY_LABEL)?;
        let id = conn.keying_material(ID_LABEL)?;
        Some(Self { id: u64::from_le_bytes(id[..8].try_into().expect("8 bytes")), secret })
    }

    /// A key from given material (tests).
    pub fn from_secret(id: u64, secret: [u8; 32]) -> Self {
        Self { id, secret }
    }

    /// The key id datagrams carry in clear.
    pub fn id(&self) -> u64 {
        self.id
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &self.secret).expect("a 32-byte chacha20 key"))
    }
}

/// A datagram's cleartext header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The key id.
    pub key_id: u64,
    /// The sender's counter (the nonce).
    pub counter: u64,
    /// The frame's epoch tag.
    pub epoch: u64,
    /// The frame's delivery count.
    pub seq: u64,
}

impl Header {
    /// Reads the cleartext header (nothing is authenticated yet: use it only to discard).
    pub fn parse(datagram: &[u8]) -> Result<Self, SideCopyError> {
        if datagram.len() < HEADER_LEN + TAG_LEN {
            return Err(SideCopyError::Short { len: datagram.len() });
        }
        if datagram[0] != VERSION {
            return Err(SideCopyError::Version(datagram[0]));
        }
        let u = |at: usize| u64::from_le_bytes(datagram[at..at + 8].try_into().expect("8 bytes"));
        Ok(Self { key_id: u(1), counter: u(9), epoch: u(17), seq: u(25) })
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        for v in [self.key_id, self.counter, self.epoch, self.seq] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// The sealing side (the primary): one per connection key; its counter is the nonce.
pub struct Sealer {
    id: u64,
    key: LessSafeKey,
    counter: AtomicU64,
}

impl Sealer {
    /// A sealer under `key`, counting from 0.
    pub fn new(key: &SideKey) -> Self {
        Self { id: key.id, key: key.aead(), counter: AtomicU64::new(0) }
    }

    /// Seals frame `seq` of epoch `epoch` into `out` (cleared first).
    pub fn seal(&self, epoch: u64, seq: u64, frame: &[u8], out: &mut Vec<u8>) -> Result<(), SideCopyError> {
        if frame.len() > MAX_FRAME {
            return Err(SideCopyError::TooLarge { len: frame.len() });
        }
        // Each call takes a counter no other call ever gets: a nonce is never reused under a key.
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        out.clear();
        Header { key_id: self.id, counter, epoch, seq }.write(out);
        out.extend_from_slice(frame);
        let (header, body) = out.split_at_mut(HEADER_LEN);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&*header), body)
            .expect("chacha20-poly1305 seals any frame below its limit");
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// The opening side (the backup): checks and decrypts datagrams of one connection key.
pub struct Opener {
    id: u64,
    key: LessSafeKey,
}

impl Opener {
    /// An opener for `key`.
    pub fn new(key: &SideKey) -> Self {
        Self { id: key.id, key: key.aead() }
    }

    /// The key id it opens.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Authenticates and decrypts `datagram` in place: its header and the frame.
    pub fn open<'a>(&self, datagram: &'a mut [u8]) -> Result<(Header, &'a [u8]), SideCopyError> {
        let h = Header::parse(datagram)?;
        if h.key_id != self.id {
            return Err(SideCopyError::KeyId { got: h.key_id, want: self.id });
        }
        let (header, body) = datagram.split_at_mut(HEADER_LEN);
        let frame = self
            .key
            .open_in_place(nonce(h.counter), Aad::from(&*header), body)
            .map_err(|_| SideCopyError::Auth { counter: h.counter, seq: h.seq })?;
        Ok((h, frame))
    }
}

/// The primary's side-copy socket: connected to the backup's side-copy address, non-blocking
/// (a full socket buffer drops the copy: the sender never waits).
pub struct SideSender {
    socket: UdpSocket,
    peer: SocketAddr,
    sealer: Sealer,
    buf: Mutex<Vec<u8>>,
}

impl std::fmt::Debug for SideSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideSender").field("peer", &self.peer).field("key_id", &self.sealer.id).finish()
    }
}

impl SideSender {
    /// A socket sending side copies sealed under `key` to `peer`.
    pub fn connect(peer: SocketAddr, key: &SideKey) -> Result<Self, SideCopyError> {
        let any: SocketAddr = match peer {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let io = |what| move |source| SideCopyError::Io { what, source };
        let socket = UdpSocket::bind(any).map_err(io("bind"))?;
        socket.connect(peer).map_err(io("connect"))?;
        socket.set_nonblocking(true).map_err(io("set non-blocking"))?;
        Ok(Self { socket, peer, sealer: Sealer::new(key), buf: Mutex::new(Vec::with_capacity(2048)) })
    }

    /// Where copies go.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Seals frame `seq` of epoch `epoch` and hands it to the kernel without waiting
    /// (`EAGAIN`, `ENOBUFS`, a refused port... come back as errors: the copy is lost).
    pub fn send(&self, epoch: u64, seq: u64, frame: &[u8]) -> Result<(), SideCopyError> {
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        self.sealer.seal(epoch, seq, frame, &mut buf)?;
        self.socket.send(&buf).map_err(|source| SideCopyError::Io { what: "send", source })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(sealer: &Sealer, epoch: u64, seq: u64, frame: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        sealer.seal(epoch, seq, frame, &mut out).unwrap();
        out
    }

    #[test]
    fn a_sealed_frame_opens_and_nothing_altered_does() {
        let key = SideKey::from_secret(0x1122, [5; 32]);
        let (sealer, opener) = (Sealer::new(&key), Opener::new(&key));
        let d = sealed(&sealer, 4, 17, b"GET /x");
        assert_eq!(d.len(), HEADER_LEN + 6 + TAG_LEN);
        let mut ok = d.clone();
        let (h, frame) = opener.open(&mut ok).unwrap();
        assert_eq!((h.key_id, h.counter, h.epoch, h.seq, frame), (0x1122, 0, 4, 17, &b"GET /x"[..]));
        // The counter grows: the next datagram has another nonce.
        let mut next = sealed(&sealer, 4, 18, b"GET /y");
        assert_eq!(opener.open(&mut next).unwrap().0.counter, 1);
        // Any byte changed (header fields are the AAD, so the epoch or seq too), or the datagram
        // truncated: refused.
        for at in 9..d.len() {
            let mut bad = d.clone();
            bad[at] ^= 0x40;
            assert!(matches!(opener.open(&mut bad), Err(SideCopyError::Auth { .. })), "byte {at}");
        }
        let mut cut = d[..d.len() - 1].to_vec();
        assert!(matches!(opener.open(&mut cut), Err(SideCopyError::Auth { .. })));
        let mut tiny = d[..HEADER_LEN + TAG_LEN - 1].to_vec();
        assert!(matches!(opener.open(&mut tiny), Err(SideCopyError::Short { .. })));
        let mut version = d.clone();
        version[0] = 2;
        assert!(matches!(opener.open(&mut version), Err(SideCopyError::Version(2))));
    }

    #[test]
    fn another_connections_key_does_not_open() {
        let (a, b) = (SideKey::from_secret(1, [1; 32]), SideKey::from_secret(2, [2; 32]));
        let d = sealed(&Sealer::new(&a), 1, 1, b"frame");
        // Its key id says whose it is: refused without decrypting.
        assert!(matches!(Opener::new(&b).open(&mut d.clone()), Err(SideCopyError::KeyId { got: 1, want: 2 })));
        // A forger who copies the current key id still lacks the key.
        let forged_key = SideKey::from_secret(2, [1; 32]);
        let mut forged = sealed(&Sealer::new(&forged_key), 1, 1, b"frame");
        assert!(matches!(Opener::new(&b).open(&mut forged), Err(SideCopyError::Auth { .. })));
    }

    #[test]
    fn a_frame_above_the_datagram_limit_is_refused() {
        let key = SideKey::from_secret(1, [1; 32]);
        let mut out = Vec::new();
        assert!(matches!(
            Sealer::new(&key).seal(1, 1, &vec![0; MAX_FRAME + 1], &mut out),
            Err(SideCopyError::TooLarge { .. })
        ));
        Sealer::new(&key).seal(1, 1, &vec![0; MAX_FRAME], &mut out).unwrap();
        assert_eq!(out.len(), MAX_DATAGRAM);
    }

    #[test]
    fn a_side_sender_reaches_a_socket_without_waiting() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let key = SideKey::from_secret(9, [3; 32]);
        let tx = SideSender::connect(rx.local_addr().unwrap(), &key).unwrap();
        tx.send(2, 5, b"hello").unwrap();
        let mut buf = [0u8; 2048];
        let n = rx.recv(&mut buf).unwrap();
        let (h, frame) = Opener::new(&key).open(&mut buf[..n]).unwrap();
        assert_eq!((h.epoch, h.seq, frame), (2, 5, &b"hello"[..]));
    }
}
