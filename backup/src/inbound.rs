//! The inbound log: the frames the primary delivered to its guest that the replica may not hold
//! yet, kept for replay at promotion (docs/failover.md, "Input replay").
//!
//! Each frame comes tagged with the primary's epoch (harvest sequence) whose checkpoint holds
//! its delivery, and with the device's delivery count `seq`. The log keeps them in `seq` order,
//! drops those whose epoch the primary reports committed (`InboundCommitted`), and is bounded in
//! frames and bytes: past either bound the oldest frame goes (counted as an overflow). At
//! promotion, [`InboundLog::take_replay`] hands out, in order, exactly the frames numbered above
//! the replica's own delivery count (saved with its virtio-net state): a frame the replica
//! already received is never delivered twice, whatever the log still holds.

use std::collections::VecDeque;
use std::sync::Mutex;

use replication_proto::InboundFrame;
use serde::Serialize;

/// Default bound on frames kept.
pub const DEFAULT_MAX_FRAMES: usize = 4096;
/// Default bound on bytes kept (frame payloads).
pub const DEFAULT_MAX_BYTES: usize = 8 << 20;

/// The log's bounds (`understudy backup --inbound-log-frames`, `--inbound-log-mib`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundLimits {
    /// Most frames kept (0: no log; the backup then does not announce one).
    pub max_frames: usize,
    /// Most frame bytes kept.
    pub max_bytes: usize,
}

impl Default for InboundLimits {
    fn default() -> Self {
        Self { max_frames: DEFAULT_MAX_FRAMES, max_bytes: DEFAULT_MAX_BYTES }
    }
}

impl InboundLimits {
    /// Whether a log is kept at all.
    pub fn enabled(&self) -> bool {
        self.max_frames > 0 && self.max_bytes > 0
    }
}

/// What `understudy status` shows of the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct InboundLogReport {
    /// Frames in the log now.
    pub frames: usize,
    /// Their bytes.
    pub bytes: usize,
    /// Frames received from the primary in all.
    pub received_frames: u64,
    /// Frames dropped because their epoch was committed (the replica holds them).
    pub pruned_frames: u64,
    /// Frames dropped to keep the log within its bounds (oldest first): they cannot be replayed.
    pub overflow_frames: u64,
    /// Frames replayed into the promoted guest.
    pub replayed_frames: u64,
    /// Frames in the log at promotion that the replica already held (not replayed).
    pub skipped_frames: u64,
    /// Side copies (datagrams beside the session: [`crate::side_copy`]).
    #[serde(flatten)]
    pub side_copy: crate::side_copy::SideCopyReport,
    /// LAN copies (frames read from the standby's own TAP: [`crate::lan_copy`]).
    #[serde(flatten)]
    pub lan_copy: crate::lan_copy::LanCopyReport,
}

/// What became of a frame offered to the log ([`InboundLog::push`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Logged.
    Logged,
    /// The log has it, or had it and let it go: ignored.
    Duplicate,
    /// Its epoch is committed (the replica holds it): not kept.
    Committed,
}

/// What promotion replays.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// The frames, in delivery order.
    pub frames: Vec<Vec<u8>>,
    /// Their delivery counts on the primary (ascending).
    pub seqs: Vec<u64>,
    /// Frames the log held that the replica already had.
    pub skipped: u64,
    /// Frames numbered above the replica's count missing from the log (dropped on the primary's
    /// queue, by the log's bound, or never forwarded): their senders must resend them.
    pub gaps: u64,
    /// The newest frames the primary delivered (consecutive delivery counts, ascending, at most
    /// [`crate::lan_copy::TAIL`]) with their digests, whether or not the log still holds them:
    /// where promotion places the LAN copies ([`crate::lan_copy::after_delivered`]).
    pub tail: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
struct Inner {
    frames: VecDeque<InboundFrame>,
    bytes: usize,
    /// The primary's highest epoch reported committed.
    committed: u64,
    /// The highest `seq` logged.
    last_seq: u64,
    /// The highest `seq` the log let go (pruned or pushed out): later copies are ignored.
    let_go: u64,
    /// The newest delivered frames seen, committed or not (see [`Replay::tail`]).
    tail: VecDeque<(u64, u64)>,
    report: InboundLogReport,
}

/// The log (see the module doc).
#[derive(Debug, Default)]
pub struct InboundLog {
    limits: Mutex<InboundLimits>,
    inner: Mutex<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl InboundLog {
    /// An empty log within `limits`.
    pub fn new(limits: InboundLimits) -> Self {
        Self { limits: Mutex::new(limits), inner: Mutex::default() }
    }

    /// The bounds.
    pub fn limits(&self) -> InboundLimits {
        *lock(&self.limits)
    }

    /// Changes the bounds (frames beyond them go at the next push).
    pub fn set_limits(&self, limits: InboundLimits) {
        *lock(&self.limits) = limits;
    }

    /// A new primary instance connected: frames of the previous one mean nothing to it.
    pub fn reset(&self) {
        let mut g = lock(&self.inner);
        let report = g.report;
        *g = Inner { report, ..Inner::default() };
    }

    /// Logs a frame the primary delivered.
    ///
    /// Frames queued across a reconnect may come again, and out of order: the log keeps one
    /// copy of each, in `seq` order, and counts a frame once. A copy of a frame the log already let go (pruned or pushed out: always the lowest
    /// numbers) is ignored.
    pub fn push(&self, f: InboundFrame) -> Pushed {
        let limits = self.limits();
        let mut g = lock(&self.inner);
        if f.seq <= g.let_go {
            return Pushed::Duplicate;
        }
        let at = if f.seq > g.last_seq {
            g.frames.len()
        } else {
            match g.frames.binary_search_by_key(&f.seq, |x| x.seq) {
                Ok(_) => return Pushed::Duplicate,
                Err(at) => at,
            }
        };
        g.report.received_frames += 1;
        note_tail(&mut g.tail, &f);
        if g.committed > 0 && f.epoch <= g.committed {
            // Its epoch was committed before the frame arrived (the ack overtook it).
            g.report.pruned_frames += 1;
            if at == 0 {
                g.let_go = f.seq;
            }
            return Pushed::Committed;
        }
        g.last_seq = g.last_seq.max(f.seq);
        // The receive path's timing, comparable with the primary's `rx frame delivered`.
        tracing::debug!(
            seq = f.seq,
            epoch = f.epoch,
            wall_ns = vmm::devices::virtio::net::wall_ns(),
            "inbound frame logged"
        );
        g.bytes += f.frame.len();
        g.frames.insert(at, f);
        while g.frames.len() > limits.max_frames || g.bytes > limits.max_bytes {
            let Some(old) = g.frames.pop_front() else { break };
            g.bytes -= old.frame.len();
            g.let_go = old.seq;
            g.report.overflow_frames += 1;
        }
        Pushed::Logged
    }

    /// The primary's highest epoch reported committed (0: none).
    pub fn committed_epoch(&self) -> u64 {
        lock(&self.inner).committed
    }

    /// The primary's epoch `epoch` is committed: its frames and earlier ones are in the replica.
    pub fn committed(&self, epoch: u64) {
        let mut g = lock(&self.inner);
        g.committed = g.committed.max(epoch);
        while g.frames.front().is_some_and(|f| f.epoch <= epoch) {
            let old = g.frames.pop_front().expect("front exists");
            g.bytes -= old.frame.len();
            g.let_go = old.seq;
            g.report.pruned_frames += 1;
        }
    }

    /// Empties the log into what promotion replays: the frames numbered above `replica_seq` (the
    /// replica's own delivery count), in order.
    pub fn take_replay(&self, replica_seq: u64) -> Replay {
        let mut g = lock(&self.inner);
        let mut r = Replay::default();
        let mut next = replica_seq + 1;
        for f in std::mem::take(&mut g.frames) {
            if f.seq <= replica_seq {
                r.skipped += 1;
                continue;
            }
            r.gaps += f.seq - next;
            next = f.seq + 1;
            r.seqs.push(f.seq);
            r.frames.push(f.frame);
        }
        g.bytes = 0;
        r.tail = g.tail.iter().copied().collect();
        g.report.skipped_frames += r.skipped;
        g.report.replayed_frames += r.frames.len() as u64;
        r
    }

    /// The counters and the log's size now.
    pub fn report(&self) -> InboundLogReport {
        let g = lock(&self.inner);
        InboundLogReport { frames: g.frames.len(), bytes: g.bytes, ..g.report }
    }
}

/// Keeps `tail` the newest run of consecutive delivery counts (at most [`crate::lan_copy::TAIL`]),
/// with `f` in it if it is the newest frame seen.
fn note_tail(tail: &mut VecDeque<(u64, u64)>, f: &InboundFrame) {
    let newest = tail.back().map(|&(s, _)| s);
    if newest.is_some_and(|s| f.seq <= s) {
        return;
    }
    if newest != Some(f.seq.wrapping_sub(1)) {
        tail.clear();
    }
    tail.push_back((f.seq, crate::lan_copy::digest(&f.frame)));
    if tail.len() > crate::lan_copy::TAIL {
        tail.pop_front();
    }
}

/// How often the session tap drains the side-copy socket at most (its buffer, 8 MiB asked, holds
/// seconds of frames at any rate a guest's inbound traffic reaches here).
pub const SIDE_DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// The session tap that keeps the log: takes `Inbound` and `InboundCommitted` in the session's
/// own task, the moment the receiver decodes them, so a frame is logged without waiting behind
/// the commit of the checkpoint before it (the backup's event loop applies a checkpoint before
/// it takes the next event). It also sees `Connected` first, and clears the log when a new
/// primary instance connects (its frames' numbers mean nothing to the old one's), then passes
/// the event on. `log` and `origin` pick the log and the instance it holds frames of out of
/// `owner`.
///
/// With a side-copy socket (`side`), the tap also drains it into the log when it takes a frame
/// or a commit notice and the last drain is [`SIDE_DRAIN_EVERY`] old (the socket's buffer holds
/// what comes between; promotion drains it right before the replay, which is when the side
/// copies count), and on `Connected` takes what is left under the previous connection's key,
/// then installs `key`, this connection's. Draining at every event put a `recv` loop and a
/// decryption per frame on the session task that commits and acknowledges checkpoints.
pub fn log_tap<T: Send + Sync + 'static>(
    owner: std::sync::Arc<T>,
    log: fn(&T) -> &InboundLog,
    origin: fn(&T) -> &Mutex<Option<u64>>,
    side: Option<(std::sync::Arc<crate::side_copy::SideCopyReceiver>, Option<transport::side_copy::SideKey>)>,
) -> transport::session::Tap<replication_proto::Receiver> {
    use replication_proto::ReceiverEvent;
    let mut last_drain = std::time::Instant::now();
    let drained = side.as_ref().map(|(s, _)| std::sync::Arc::clone(s));
    let mut drain_if_due = move |log: &InboundLog| {
        if let Some(s) = &drained
            && last_drain.elapsed() >= SIDE_DRAIN_EVERY
        {
            s.drain(log);
            last_drain = std::time::Instant::now();
        }
    };
    Box::new(move |_receiver, event| match event {
        ReceiverEvent::Inbound(f) => {
            log(&owner).push(f);
            drain_if_due(log(&owner));
            None
        }
        ReceiverEvent::InboundCommitted { epoch } => {
            log(&owner).committed(epoch);
            drain_if_due(log(&owner));
            None
        }
        ReceiverEvent::Connected { peer } => {
            if let Some((s, _)) = &side {
                // The previous connection's copies, under its key, before a reset can clear them.
                s.drain(log(&owner));
            }
            let mut o = lock(origin(&owner));
            if o.is_some_and(|o| o != peer.instance) {
                tracing::info!("backup: a new primary instance: inbound log cleared");
                log(&owner).reset();
            }
            *o = Some(peer.instance);
            drop(o);
            if let Some((s, key)) = &side {
                s.install(key.as_ref(), log(&owner));
            }
            Some(ReceiverEvent::Connected { peer })
        }
        other => Some(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(epoch: u64, seq: u64, len: usize) -> InboundFrame {
        InboundFrame { epoch, seq, frame: vec![seq as u8; len] }
    }

    /// The tail names the newest consecutive frames seen, committed ones too (the replica holds
    /// them but the LAN copies are placed after them), and restarts at a gap.
    #[test]
    fn the_tail_is_the_newest_consecutive_frames_seen() {
        let log = InboundLog::new(InboundLimits::default());
        log.committed(6);
        for seq in 1..=5 {
            log.push(frame(5, seq, 60));
        }
        log.push(frame(7, 3, 60));
        let d = |seq: u64| crate::lan_copy::digest(&frame(5, seq, 60).frame);
        assert_eq!(log.take_replay(5).tail, (1..=5).map(|s| (s, d(s))).collect::<Vec<_>>());
        for seq in 6..=12 {
            log.push(frame(7, seq, 60));
        }
        let kept = log.take_replay(5).tail;
        assert_eq!(kept.len(), crate::lan_copy::TAIL);
        assert_eq!(kept.last(), Some(&(12, d(12))), "the newest, the oldest let go");
        log.push(frame(7, 14, 60));
        assert_eq!(log.take_replay(5).tail, vec![(14, d(14))], "a gap restarts the run");
        log.reset();
        assert!(log.take_replay(0).tail.is_empty(), "a new primary instance's numbers start afresh");
    }

    #[test]
    fn each_frame_is_kept_once_in_order_whichever_copy_comes_first() {
        // Frames sent again (across a reconnect) or out of order: 2 comes after 3, and 1 and 3
        // twice; all must be replayed once, in order.
        let log = InboundLog::new(InboundLimits::default());
        log.push(frame(5, 1, 60));
        log.push(frame(5, 1, 60));
        log.push(frame(5, 3, 60));
        log.push(frame(5, 2, 60));
        log.push(frame(5, 3, 60));
        assert_eq!(log.report().received_frames, 3);
        assert_eq!(log.report().frames, 3);
        // A late copy of a frame the log already pruned is not logged again.
        log.committed(5);
        log.push(frame(5, 2, 60));
        assert_eq!(log.report().frames, 0);
        log.push(frame(6, 4, 60));
        log.push(frame(6, 6, 60));
        log.push(frame(6, 5, 60));
        let r = log.take_replay(3);
        assert_eq!(r.seqs, vec![4, 5, 6]);
        assert_eq!(r.gaps, 0);
    }

    #[test]
    fn a_committed_epoch_prunes_its_frames_and_earlier_ones() {
        let log = InboundLog::new(InboundLimits::default());
        for (epoch, seq) in [(3, 1), (3, 2), (4, 3), (5, 4)] {
            log.push(frame(epoch, seq, 60));
        }
        log.committed(3);
        assert_eq!(log.report().frames, 2);
        assert_eq!(log.report().bytes, 120);
        log.committed(4);
        assert_eq!(log.report().frames, 1);
        // A frame of a committed epoch arriving late (the commit notice overtook it) is not kept.
        log.committed(5);
        log.push(frame(5, 5, 60));
        log.push(frame(6, 6, 60));
        let r = log.report();
        assert_eq!((r.frames, r.pruned_frames, r.received_frames), (1, 5, 6));
        let replay = log.take_replay(0);
        assert_eq!(replay.seqs, vec![6]);
    }

    #[test]
    fn the_log_keeps_within_its_bounds_by_dropping_the_oldest() {
        let log = InboundLog::new(InboundLimits { max_frames: 3, max_bytes: 1000 });
        for seq in 1..=5 {
            log.push(frame(1, seq, 100));
        }
        let r = log.report();
        assert_eq!((r.frames, r.bytes, r.overflow_frames), (3, 300, 2));
        // By bytes: a 900-byte frame pushes out the oldest until the log is back within 1000.
        log.push(frame(1, 6, 900));
        let r = log.report();
        assert_eq!((r.frames, r.bytes, r.overflow_frames), (2, 1000, 4));
        // What overflowed shows as a gap at replay.
        let replay = log.take_replay(0);
        assert_eq!((replay.seqs.clone(), replay.gaps), (vec![5, 6], 4));
    }

    #[test]
    fn replay_gives_exactly_the_frames_above_the_replica_in_order() {
        let log = InboundLog::new(InboundLimits::default());
        for seq in 1..=6 {
            log.push(frame(10 + seq / 3, seq, 64));
        }
        // Duplicates (a resumed session resends nothing, but be safe) are ignored.
        log.push(frame(12, 4, 64));
        // The replica delivered frames 1..=4 already.
        let replay = log.take_replay(4);
        assert_eq!(replay.seqs, vec![5, 6]);
        assert_eq!(replay.frames, vec![vec![5u8; 64], vec![6u8; 64]]);
        assert_eq!((replay.skipped, replay.gaps), (4, 0));
        let r = log.report();
        assert_eq!((r.frames, r.replayed_frames, r.skipped_frames), (0, 2, 4));
        // Taken once: a second promotion replays nothing.
        assert!(log.take_replay(4).frames.is_empty());
    }

    #[test]
    fn a_reset_forgets_the_previous_primary() {
        let log = InboundLog::new(InboundLimits::default());
        log.push(frame(5, 9, 64));
        log.committed(7);
        log.reset();
        // The new primary's numbering starts again.
        log.push(frame(1, 1, 64));
        assert_eq!(log.take_replay(0).seqs, vec![1]);
    }
}
