//! LAN copies: the frames that reach the backup's own TAP while it stands by, kept so that
//! promotion can replay the ones the dead primary never delivered (docs/failover.md, "LAN
//! copies").
//!
//! Side copies and the session's copies (the inbound log, [`crate::inbound`]) hold what the
//! primary *delivered*. A request that reaches the primary's host in the last fraction of a
//! millisecond before it dies, or after, is in neither: no live guest ever saw it, and its
//! sender resends it only on its retransmission timer (200 ms at least for an ordinary Linux
//! client). Where the LAN hands the guest's inbound frames to the backup's host too (a segment
//! that floods the guest's MAC address to both hosts: a bridge that does not learn it, an
//! overlay whose forwarding entry lists both hosts, a mirror port), the backup's TAP receives
//! the same frames as the primary's, in the same order. The backup holds its TAP open from the
//! start, drains it into a bounded ring (no thread wakes per frame: a reader wakes when frames
//! are queued and takes them in batches), and at promotion hands the open TAP to the VM.
//!
//! Which frames to replay is decided by content, since LAN frames carry no delivery count: the
//! inbound log remembers a digest of the newest frames the primary delivered (up to [`TAIL`]
//! consecutive ones, [`crate::inbound::InboundLog`]); promotion finds the newest of them that the
//! LAN carried among the copies ([`after_delivered`]) and replays, after the log's frames, the
//! copies behind it that are addressed to the guest. Nothing is replayed from the LAN unless one
//! is found and the newest delivered frame is not older than the replica's own delivery count:
//! a frame the replica already received is never replayed from here. On a LAN that does not
//! flood the guest's address, the ring holds only broadcasts, none is found (or only a
//! broadcast, with nothing for the guest behind it), and nothing changes.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use vmm::devices::tap::Tap;

/// Default bound on frames kept.
pub const DEFAULT_MAX_FRAMES: usize = 4096;
/// Default bound on bytes kept.
pub const DEFAULT_MAX_BYTES: usize = 8 << 20;
/// How many of the newest delivered frames promotion looks for among the LAN copies (a few
/// that never crossed the LAN, such as multicast a bridge forwards to one host, may come last).
pub const TAIL: usize = 8;
/// After frames are queued, the reader waits this long before taking them, so it wakes at most
/// this often (the TAP's queue, 1,000 frames, holds far more than comes in meanwhile).
const BATCH: Duration = Duration::from_millis(1);
/// How long the reader sleeps in `poll` before looking at its stop flag.
const POLL_MS: i32 = 100;
/// How long the reader waits after the TAP failed before it tries again.
const FAILED_BACKOFF: Duration = Duration::from_secs(1);
/// Largest frame read (no offloads: a frame is at most the MTU plus its header).
const FRAME_BUF: usize = 65_536;

/// What `understudy status` shows of LAN copies (in `backup.inbound_log`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LanCopyReport {
    /// Whether the standby's TAP is read (LAN copies are kept).
    pub lan_copy: bool,
    /// Frames read from it.
    pub lan_copy_frames_read: u64,
    /// Frames kept now.
    pub lan_copy_frames: usize,
    /// Frames let go to keep within the bounds (oldest first).
    pub lan_copy_overflow_frames: u64,
    /// Frames replayed into the promoted guest.
    pub lan_copy_replayed_frames: u64,
    /// Promotions that replayed nothing from here because the newest delivered frames were not
    /// found among the copies (the LAN does not flood the guest's address, or they were let
    /// go).
    pub lan_copy_unmatched: u64,
}

#[derive(Default)]
struct Ring {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Set by [`LanCopy::finish`]: the reader reads no more.
    finished: bool,
    report: LanCopyReport,
}

struct Shared {
    tap: Arc<Tap>,
    max_frames: usize,
    max_bytes: usize,
    ring: Mutex<Ring>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Reads every queued frame into the ring (the caller holds the ring); false when the TAP
    /// failed with something else than "nothing queued" (logged).
    fn drain(&self, ring: &mut Ring, buf: &mut [u8]) -> bool {
        loop {
            match self.tap.read_frame(buf) {
                Ok(n) => {
                    ring.report.lan_copy_frames_read += 1;
                    ring.bytes += n;
                    ring.frames.push_back(buf[..n].to_vec());
                    while ring.frames.len() > self.max_frames || ring.bytes > self.max_bytes {
                        let Some(old) = ring.frames.pop_front() else { break };
                        ring.bytes -= old.len();
                        ring.report.lan_copy_overflow_frames += 1;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    tracing::warn!(tap = self.tap.name(), "lan copies: read: {e}");
                    return false;
                }
            }
        }
    }
}

/// The backup's TAP held open while it stands by, and the frames read from it (see the module
/// doc). Dropping it stops the reader (within [`POLL_MS`]).
pub struct LanCopy {
    shared: Arc<Shared>,
}

/// What [`LanCopy::finish`] hands to promotion.
pub struct LanTaken {
    /// The TAP, open: the promoted VM's net device takes it.
    pub tap: Arc<Tap>,
    /// The frames read, oldest first.
    pub frames: Vec<Vec<u8>>,
}

impl LanCopy {
    /// Starts reading `tap` (open) into a ring of at most `max_frames` frames and `max_bytes`
    /// bytes.
    pub fn start(tap: Arc<Tap>, max_frames: usize, max_bytes: usize) -> std::io::Result<Arc<Self>> {
        let ring = Ring { report: LanCopyReport { lan_copy: true, ..LanCopyReport::default() }, ..Ring::default() };
        let shared =
            Arc::new(Shared { tap, max_frames, max_bytes, ring: Mutex::new(ring), stop: AtomicBool::new(false) });
        let s = Arc::clone(&shared);
        std::thread::Builder::new().name("lan-copy".into()).spawn(move || read_loop(&s))?;
        tracing::info!(
            tap = shared.tap.name(),
            max_frames,
            max_bytes,
            "lan copies: reading the standby's tap (frames the lan hands this host for the guest)"
        );
        Ok(Arc::new(Self { shared }))
    }

    /// Stops the reader, takes what is queued on the TAP now, and hands the TAP and every frame
    /// kept to promotion. Once this returns nothing more is read from the TAP here, so no
    /// frame meant for the promoted VM is taken from it.
    pub fn finish(&self) -> LanTaken {
        let mut buf = vec![0u8; FRAME_BUF];
        let mut g = lock(&self.shared.ring);
        if !g.finished {
            let _ = self.shared.drain(&mut g, &mut buf);
            g.finished = true;
        }
        self.shared.stop.store(true, Ordering::Release);
        g.bytes = 0;
        let frames = std::mem::take(&mut g.frames).into();
        LanTaken { tap: Arc::clone(&self.shared.tap), frames }
    }

    /// Counts what promotion replayed from the copies (`None`: the newest delivered frames were
    /// not found among them).
    pub fn record_replay(&self, replayed: Option<u64>) {
        let mut g = lock(&self.shared.ring);
        match replayed {
            Some(n) => g.report.lan_copy_replayed_frames += n,
            None => g.report.lan_copy_unmatched += 1,
        }
    }

    /// The counters and the ring's size now.
    pub fn report(&self) -> LanCopyReport {
        let g = lock(&self.shared.ring);
        LanCopyReport { lan_copy_frames: g.frames.len(), ..g.report }
    }
}

impl Drop for LanCopy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
    }
}

fn read_loop(s: &Shared) {
    let mut buf = vec![0u8; FRAME_BUF];
    while !s.stop.load(Ordering::Acquire) {
        let mut p = libc::pollfd { fd: s.tap.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: `p` is one valid pollfd for the whole call; its descriptor is owned by
        // `s.tap`, alive as long as `s`.
        let n = unsafe { libc::poll(&mut p, 1, POLL_MS) };
        if n <= 0 {
            continue;
        }
        std::thread::sleep(BATCH);
        let mut g = lock(&s.ring);
        if g.finished {
            return;
        }
        if !s.drain(&mut g, &mut buf) {
            // A failing TAP (gone, down): try again later instead of spinning on its error.
            drop(g);
            std::thread::sleep(FAILED_BACKOFF);
        }
    }
}

/// A frame's digest for matching LAN copies against delivered frames: its CRC-32 and length.
pub fn digest(frame: &[u8]) -> u64 {
    (u64::from(crc32fast::hash(frame)) << 32) | (frame.len() as u64 & 0xffff_ffff)
}

/// Why nothing is replayed from the LAN copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// The inbound log knows no delivered frame.
    NoTail,
    /// The newest delivered frame the log knows is older than the replica's delivery count.
    TailBehindReplica,
    /// The newest delivered frames are not among the copies.
    NotFound,
}

/// Where, in `lan` (oldest first), the frames the primary never delivered begin: right after the
/// newest copy of the newest frame of `tail` (the newest delivered frames, consecutive delivery
/// counts, ascending) that the LAN carried. Frames the primary delivered that never crossed the
/// LAN (multicast a bridge forwards to one port only, say) are skipped: every frame delivered
/// after the one found is in `tail` and not on the LAN, so none of the copies behind it was
/// delivered. `replica_seq` is the replica's own delivery count: a tail older than it cannot
/// place the replica's frames, so nothing is replayed.
pub fn after_delivered(lan: &[Vec<u8>], tail: &[(u64, u64)], replica_seq: u64) -> Result<usize, Unmatched> {
    let Some(&(newest, _)) = tail.last() else { return Err(Unmatched::NoTail) };
    if newest < replica_seq {
        return Err(Unmatched::TailBehindReplica);
    }
    let digests: Vec<u64> = lan.iter().map(|f| digest(f)).collect();
    tail.iter()
        .rev()
        .find_map(|&(_, d)| digests.iter().rposition(|&x| x == d))
        .map(|i| i + 1)
        .ok_or(Unmatched::NotFound)
}

/// Whether a LAN frame is one the guest (`mac`) would receive: addressed to it or to a group,
/// and not sent by it.
pub fn for_guest(frame: &[u8], mac: [u8; 6]) -> bool {
    frame.len() >= 14 && (frame[..6] == mac || frame[0] & 1 == 1) && frame[6..12] != mac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&GUEST);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
        f[20] = tag;
        f
    }

    const GUEST: [u8; 6] = [2, 0x55, 0x44, 0, 0, 1];

    fn tail(seqs_tags: &[(u64, u8)]) -> Vec<(u64, u64)> {
        seqs_tags.iter().map(|&(s, t)| (s, digest(&frame(t)))).collect()
    }

    /// The frames behind the newest delivered one are the ones to replay.
    #[test]
    fn the_frames_behind_the_newest_delivered_one_are_found() {
        let lan: Vec<Vec<u8>> = (1..=8).map(frame).collect();
        assert_eq!(after_delivered(&lan, &tail(&[(10, 4), (11, 5), (12, 6)]), 12), Ok(6));
        assert_eq!(after_delivered(&lan, &tail(&[(12, 8)]), 3), Ok(8), "all delivered: nothing to replay");
    }

    /// Delivered frames the LAN never carried (the newest ones here) do not hide the newest one
    /// it did carry; a repeated frame is placed at its newest copy (which replays less, never
    /// more).
    #[test]
    fn frames_the_lan_never_carried_are_skipped_and_the_newest_copy_wins() {
        let lan: Vec<Vec<u8>> = [1u8, 2, 3, 7].iter().map(|&t| frame(t)).collect();
        assert_eq!(after_delivered(&lan, &tail(&[(5, 2), (6, 40), (7, 41)]), 7), Ok(2));
        let lan: Vec<Vec<u8>> = [1u8, 2, 3, 2, 9].iter().map(|&t| frame(t)).collect();
        assert_eq!(after_delivered(&lan, &tail(&[(5, 1), (6, 2)]), 6), Ok(4));
    }

    /// Nothing is replayed from the LAN when the delivered frames are not there, when the log
    /// knows none, or when the newest it knows is older than the replica's count (the replica
    /// received frames the log cannot place).
    #[test]
    fn no_match_replays_nothing() {
        let lan: Vec<Vec<u8>> = (1..=4).map(frame).collect();
        assert_eq!(after_delivered(&lan, &tail(&[(9, 42)]), 9), Err(Unmatched::NotFound));
        assert_eq!(after_delivered(&lan, &[], 0), Err(Unmatched::NoTail));
        assert_eq!(after_delivered(&lan, &tail(&[(9, 2)]), 10), Err(Unmatched::TailBehindReplica));
        assert_eq!(after_delivered(&[], &tail(&[(9, 2)]), 9), Err(Unmatched::NotFound));
    }

    /// Only frames for the guest (to its address or a group, not from it) are replayed.
    #[test]
    fn only_frames_for_the_guest_count() {
        let mut to_guest = frame(1);
        assert!(for_guest(&to_guest, GUEST));
        to_guest[..6].copy_from_slice(&[0xff; 6]);
        assert!(for_guest(&to_guest, GUEST), "broadcast");
        let mut other = frame(1);
        other[..6].copy_from_slice(&[2, 0, 0, 0, 0, 7]);
        assert!(!for_guest(&other, GUEST), "another host's unicast");
        let mut own = frame(1);
        own[..6].copy_from_slice(&[0xff; 6]);
        own[6..12].copy_from_slice(&GUEST);
        assert!(!for_guest(&own, GUEST), "the guest's own broadcast");
        assert!(!for_guest(&[0u8; 10], GUEST), "runt");
    }
}
