//! The backup's side-copy socket: authenticated datagram copies of the frames the primary
//! delivered ([`transport::side_copy`]), taken into the inbound log beside the session's copies.
//!
//! No thread wakes per datagram: the kernel keeps them in the socket's buffer (made large,
//! `SO_RCVBUFFORCE` as root, else `SO_RCVBUF`), and [`SideCopyReceiver::drain`] reads the buffer
//! empty, without waiting, when the session's task handles an inbound frame or commit notice
//! (`inbound::log_tap`) and at promotion, right before the log is taken for replay: a primary
//! killed while the session's copy of a frame was still on its way has already handed the
//! datagram to the kernel, and it is there. A datagram whose epoch is already committed is
//! dropped without being decrypted; one of an earlier connection (its key id) is dropped
//! silently; one that does not authenticate under the current connection's key is rejected,
//! counted and logged (at most once a second) and never reaches the log. The log keeps one copy
//! of each frame, so a frame that comes by both paths is logged, and replayed, once.
//!
//! Setting the buffer size is the one `setsockopt` without a safe wrapper here, hence this
//! module's two `unsafe` blocks.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use replication_proto::InboundFrame;
use serde::Serialize;
use transport::side_copy::{Header, Opener, SideCopyError, SideKey};

use crate::inbound::{InboundLog, Pushed};

/// The receive buffer asked for (the kernel doubles it for its bookkeeping): room for thousands
/// of frames between two drains.
pub const RECV_BUFFER_BYTES: usize = 8 << 20;
/// Key ids of earlier connections remembered (their late datagrams are stale, not forgeries).
const OLD_KEYS: usize = 8;
/// At most one warning about rejected datagrams per this long.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// Errors of the side-copy socket.
#[derive(Debug, thiserror::Error)]
pub enum SideCopyRxError {
    /// The socket could not be bound.
    #[error("side-copy socket: bind udp {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket could not be set up.
    #[error("side-copy socket {addr}: {what}")]
    Setup {
        /// The address.
        addr: SocketAddr,
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What `understudy status` shows of side copies (in `backup.inbound_log`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SideCopyReport {
    /// The port side copies are taken at (`None`: no side-copy socket).
    pub side_copy_port: Option<u16>,
    /// Datagrams read from the socket.
    pub side_copy_received_frames: u64,
    /// Of those, frames logged (the session's copy had not come yet).
    pub side_copy_logged_frames: u64,
    /// Of those, not needed: their epoch was committed, the log had the frame already, or they
    /// belong to an earlier connection.
    pub side_copy_stale_frames: u64,
    /// Of those, refused: malformed, or failing authentication under the current key.
    pub side_copy_rejected_frames: u64,
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    logged: AtomicU64,
    stale: AtomicU64,
    rejected: AtomicU64,
}

struct State {
    /// The current connection's key (`None` before the first connection).
    opener: Option<Opener>,
    /// Key ids of earlier connections.
    old_ids: VecDeque<u64>,
    buf: Vec<u8>,
    last_warn: Option<Instant>,
    unwarned: u64,
}

/// The socket and the key of the current connection (see the module doc).
pub struct SideCopyReceiver {
    socket: UdpSocket,
    addr: SocketAddr,
    state: Mutex<State>,
    counters: Counters,
}

impl std::fmt::Debug for SideCopyReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideCopyReceiver").field("addr", &self.addr).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SideCopyReceiver {
    /// Binds the side-copy socket at `ip`, port `port` (0: any), non-blocking, with a large
    /// receive buffer.
    pub fn bind(ip: IpAddr, port: u16) -> Result<Self, SideCopyRxError> {
        let want = SocketAddr::new(ip, port);
        let socket = UdpSocket::bind(want).map_err(|source| SideCopyRxError::Bind { addr: want, source })?;
        let addr = socket.local_addr().map_err(|source| SideCopyRxError::Setup {
            addr: want,
            what: "local address",
            source,
        })?;
        socket.set_nonblocking(true).map_err(|source| SideCopyRxError::Setup { addr, what: "non-blocking", source })?;
        let forced = set_recv_buffer(&socket, libc::SO_RCVBUFFORCE, RECV_BUFFER_BYTES).is_ok();
        if !forced {
            // Not root: as much as net.core.rmem_max allows.
            let _ = set_recv_buffer(&socket, libc::SO_RCVBUF, RECV_BUFFER_BYTES);
        }
        tracing::info!(
            %addr,
            recv_buffer = recv_buffer(&socket).unwrap_or(0),
            forced,
            "backup: side-copy socket bound (authenticated datagram copies of inbound frames)"
        );
        Ok(Self {
            socket,
            addr,
            state: Mutex::new(State {
                opener: None,
                old_ids: VecDeque::new(),
                buf: vec![0; 1 << 16],
                last_warn: None,
                unwarned: 0,
            }),
            counters: Counters::default(),
        })
    }

    /// The socket's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A new connection: what is in the buffer is taken under the previous key first, then
    /// `key` (`None`: the connection exported none) replaces it.
    pub fn install(&self, key: Option<&SideKey>, log: &InboundLog) {
        let mut st = lock(&self.state);
        self.drain_locked(&mut st, log);
        if let Some(old) = st.opener.take() {
            st.old_ids.push_back(old.id());
            if st.old_ids.len() > OLD_KEYS {
                st.old_ids.pop_front();
            }
        }
        st.opener = key.map(Opener::new);
        tracing::info!(
            addr = %self.addr,
            key_id = ?key.map(|k| format!("{:016x}", k.id())),
            "backup: side copies: key of the new connection installed"
        );
    }

    /// Reads every datagram waiting into `log` (never waits); returns how many were read.
    pub fn drain(&self, log: &InboundLog) -> u64 {
        self.drain_locked(&mut lock(&self.state), log)
    }

    fn drain_locked(&self, st: &mut State, log: &InboundLog) -> u64 {
        let mut n = 0;
        let committed = log.committed_epoch();
        loop {
            let len = match self.socket.recv(&mut st.buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(addr = %self.addr, "backup: side-copy socket: recv: {e}");
                    break;
                }
            };
            n += 1;
            self.counters.received.fetch_add(1, Ordering::Relaxed);
            let State { opener, old_ids, buf, .. } = st;
            let outcome = take(opener.as_ref(), old_ids, committed, &mut buf[..len], log);
            match outcome {
                Ok(true) => self.counters.logged.fetch_add(1, Ordering::Relaxed),
                Ok(false) => self.counters.stale.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    self.warn(st, &e);
                    0
                }
            };
        }
        n
    }

    /// Logs a rejection, at most once per [`WARN_EVERY`] (with how many were not logged).
    fn warn(&self, st: &mut State, e: &SideCopyError) {
        let now = Instant::now();
        if st.last_warn.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            st.unwarned += 1;
            return;
        }
        tracing::warn!(addr = %self.addr, also_rejected = st.unwarned, "backup: side copy rejected: {e}");
        st.last_warn = Some(now);
        st.unwarned = 0;
    }

    /// The counters.
    pub fn report(&self) -> SideCopyReport {
        let c = &self.counters;
        SideCopyReport {
            side_copy_port: Some(self.port()),
            side_copy_received_frames: c.received.load(Ordering::Relaxed),
            side_copy_logged_frames: c.logged.load(Ordering::Relaxed),
            side_copy_stale_frames: c.stale.load(Ordering::Relaxed),
            side_copy_rejected_frames: c.rejected.load(Ordering::Relaxed),
        }
    }
}

/// One datagram: `Ok(true)` logged, `Ok(false)` stale (committed epoch, earlier connection,
/// already in the log), `Err` rejected.
fn take(
    opener: Option<&Opener>,
    old_ids: &VecDeque<u64>,
    committed: u64,
    datagram: &mut [u8],
    log: &InboundLog,
) -> Result<bool, SideCopyError> {
    let h = Header::parse(datagram)?;
    let Some(opener) = opener else {
        return Err(SideCopyError::KeyId { got: h.key_id, want: 0 });
    };
    if h.key_id != opener.id() {
        return if old_ids.contains(&h.key_id) {
            Ok(false)
        } else {
            Err(SideCopyError::KeyId { got: h.key_id, want: opener.id() })
        };
    }
    if committed > 0 && h.epoch <= committed {
        // In the replica already: not worth decrypting.
        return Ok(false);
    }
    let (h, frame) = opener.open(datagram)?;
    if frame.is_empty() || h.seq == 0 {
        // Authentic, yet not a frame the session could have carried: refused like a bad one.
        return Err(SideCopyError::Short { len: frame.len() });
    }
    let pushed = log.push(InboundFrame { epoch: h.epoch, seq: h.seq, frame: frame.to_vec() });
    Ok(pushed == Pushed::Logged)
}

fn set_recv_buffer(socket: &UdpSocket, option: libc::c_int, bytes: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is the open socket `socket` owns for the whole call; the option value is a
    // c_int that lives across the call and its exact size is passed.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn recv_buffer(socket: &UdpSocket) -> io::Result<usize> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the fd is the open socket `socket` owns for the whole call; `v` and `len` are live
    // out-parameters and `len` holds `v`'s size.
    let r = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, (&raw mut v).cast(), &raw mut len)
    };
    if r == 0 { Ok(usize::try_from(v).unwrap_or(0)) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::InboundLimits;
    use transport::side_copy::SideSender;

    fn receiver() -> SideCopyReceiver {
        SideCopyReceiver::bind("127.0.0.1".parse().unwrap(), 0).unwrap()
    }

    fn to(rx: &SideCopyReceiver) -> SocketAddr {
        SocketAddr::new("127.0.0.1".parse().unwrap(), rx.port())
    }

    /// Sends a raw datagram to the receiver.
    fn raw(rx: &SideCopyReceiver, d: &[u8]) {
        UdpSocket::bind("127.0.0.1:0").unwrap().send_to(d, to(rx)).unwrap();
    }

    fn sealed(key: &SideKey, epoch: u64, seq: u64, frame: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        transport::side_copy::Sealer::new(key).seal(epoch, seq, frame, &mut d).unwrap();
        d
    }

    #[test]
    fn only_authentic_copies_of_the_current_connection_reach_the_log() {
        let rx = receiver();
        let log = InboundLog::new(InboundLimits::default());
        let (old, cur) = (SideKey::from_secret(1, [1; 32]), SideKey::from_secret(2, [2; 32]));
        rx.install(Some(&old), &log);
        // A copy of the old connection still in the buffer at the switch is taken under its key.
        SideSender::connect(to(&rx), &old).unwrap().send(5, 1, b"old connection, in time").unwrap();
        rx.install(Some(&cur), &log);
        assert_eq!(log.report().frames, 1);
        let good = sealed(&cur, 5, 2, b"request");
        let mut modified = good.clone();
        *modified.last_mut().unwrap() ^= 1;
        let truncated = good[..good.len() - 3].to_vec();
        let wrong_key = sealed(&SideKey::from_secret(2, [9; 32]), 5, 3, b"forged");
        let replayed_old = sealed(&old, 5, 4, b"an old connection's copy, late");
        let unknown_id = sealed(&SideKey::from_secret(77, [2; 32]), 5, 5, b"nobody's");
        for d in [&modified, &truncated, &wrong_key, &replayed_old, &unknown_id, &good, &good, &vec![1u8; 10]] {
            raw(&rx, d);
        }
        assert_eq!(rx.drain(&log), 8);
        let r = rx.report();
        assert_eq!(r.side_copy_received_frames, 9);
        assert_eq!(r.side_copy_logged_frames, 2, "the old connection's in-time copy and the good one");
        // The replayed old-key copy and the second copy of the good one.
        assert_eq!(r.side_copy_stale_frames, 2);
        // Modified, truncated, wrong key, unknown key id, too short.
        assert_eq!(r.side_copy_rejected_frames, 5);
        let replay = log.take_replay(0);
        assert_eq!(replay.seqs, vec![1, 2]);
        assert_eq!(replay.frames[1], b"request");
    }

    #[test]
    fn copies_of_committed_epochs_are_dropped_unread() {
        let rx = receiver();
        let log = InboundLog::new(InboundLimits::default());
        let key = SideKey::from_secret(3, [3; 32]);
        rx.install(Some(&key), &log);
        log.committed(6);
        // Its epoch is committed: dropped before decryption (so even a forged body is only stale).
        let mut d = sealed(&key, 6, 1, b"in the replica");
        *d.last_mut().unwrap() ^= 1;
        raw(&rx, &d);
        raw(&rx, &sealed(&key, 7, 2, b"not yet"));
        rx.drain(&log);
        let r = rx.report();
        assert_eq!((r.side_copy_stale_frames, r.side_copy_logged_frames, r.side_copy_rejected_frames), (1, 1, 0));
        assert_eq!(log.take_replay(0).seqs, vec![2]);
    }

    #[test]
    fn before_any_connection_nothing_is_taken() {
        let rx = receiver();
        let log = InboundLog::new(InboundLimits::default());
        raw(&rx, &sealed(&SideKey::from_secret(3, [3; 32]), 1, 1, b"x"));
        rx.drain(&log);
        assert_eq!(rx.report().side_copy_rejected_frames, 1);
        assert_eq!(log.report().frames, 0);
    }

    /// A frame whose session copy never came is logged from its side copy and replayed; one
    /// that came both ways is logged and replayed once, whichever came first.
    #[test]
    fn side_copies_fill_the_gaps_of_the_session_and_each_frame_is_replayed_once() {
        let rx = receiver();
        let log = InboundLog::new(InboundLimits::default());
        let key = SideKey::from_secret(5, [5; 32]);
        rx.install(Some(&key), &log);
        let side = SideSender::connect(to(&rx), &key).unwrap();
        let frame = |seq: u64| InboundFrame { epoch: 9, seq, frame: vec![seq as u8; 60] };
        // 1 and 2 by the session; 2 and 3 by side copies (3's session copy was lost with the
        // primary); 2's side copy is read after its session copy, 3's before.
        log.push(frame(1));
        log.push(frame(2));
        for seq in [2, 3] {
            side.send(9, seq, &[seq as u8; 60]).unwrap();
        }
        rx.drain(&log);
        assert_eq!(log.push(frame(3)), Pushed::Duplicate);
        // At promotion the replica holds frame 1.
        let replay = log.take_replay(1);
        assert_eq!(replay.seqs, vec![2, 3]);
        assert_eq!(replay.frames, vec![vec![2u8; 60], vec![3u8; 60]]);
        assert_eq!(replay.gaps, 0);
        let r = rx.report();
        assert_eq!((r.side_copy_logged_frames, r.side_copy_stale_frames), (1, 1));
    }
}
