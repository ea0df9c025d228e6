//! The output log: the frames each epoch's guest sent that the primary holds until the backup
//! acknowledges the epoch, kept so that a promoted replica sends them itself when the primary
//! died between the backup's commit and the release (docs/failover.md, "Output at promotion").
//!
//! The primary forwards an epoch's frames right after its checkpoint (`Output`, tagged with the
//! checkpoint's wire epoch and the primary's harvest sequence), and reports each release with
//! the notice the inbound log uses (`InboundCommitted`, a harvest sequence): the log drops the
//! epochs up to it. It is bounded in frames and bytes (past either bound the oldest epoch goes,
//! counted as an overflow). At promotion, [`OutputLog::take_for_promotion`] hands out, in order,
//! the frames of exactly the epochs the replica holds (epoch at most the replica's): output of
//! an epoch the replica does not hold is never written (output commit, DESIGN.md invariant 1),
//! it is counted as dropped. Output is at least once around a failover: an epoch the primary
//! released whose notice had not arrived yet is written again (TCP drops such duplicates).

use std::collections::BTreeMap;
use std::sync::Mutex;

use replication_proto::OutputFrames;
use serde::Serialize;
use vmm::devices::tap::Tap;

/// Default bound on frames kept (as the inbound log's).
pub const DEFAULT_MAX_FRAMES: usize = crate::inbound::DEFAULT_MAX_FRAMES;
/// Default bound on bytes kept (frame payloads).
pub const DEFAULT_MAX_BYTES: usize = crate::inbound::DEFAULT_MAX_BYTES;

/// The log's bounds (`understudy backup --output-log-frames`, `--output-log-bytes`; 0 frames:
/// no log, the backup then does not announce one): the same kind of bounds as the inbound log's.
pub type OutputLimits = crate::inbound::InboundLimits;

/// What `understudy status` shows of the log (`backup.output_log`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutputLogReport {
    /// Frames in the log now.
    pub frames: usize,
    /// Their bytes.
    pub bytes: usize,
    /// Epochs they belong to.
    pub epochs: usize,
    /// Frames received from the primary in all.
    pub received_frames: u64,
    /// Frames dropped because the primary reported their epoch released (including frames that
    /// arrived after the notice).
    pub released_frames: u64,
    /// Frames dropped to keep the log within its bounds (oldest epoch first).
    pub overflow_frames: u64,
    /// Frames written to the TAP at promotion (their epochs are in the replica).
    pub written_frames: u64,
    /// Frames in the log at promotion not written: their epochs are not in the replica, or the
    /// TAP refused them.
    pub dropped_frames: u64,
}

/// One epoch's frames.
#[derive(Debug)]
struct Epoch {
    harvest: u64,
    frames: Vec<Vec<u8>>,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// By wire epoch.
    epochs: BTreeMap<u64, Epoch>,
    frames: usize,
    bytes: usize,
    /// The primary's highest harvest reported released.
    released: u64,
    report: OutputLogReport,
}

impl Inner {
    fn drop_first(&mut self) -> Option<Epoch> {
        let (_, e) = self.epochs.pop_first()?;
        self.frames -= e.frames.len();
        self.bytes -= e.bytes;
        Some(e)
    }
}

/// What promotion writes ([`OutputLog::take_for_promotion`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputReplay {
    /// The frames, in the order the guest sent them.
    pub frames: Vec<Vec<u8>>,
    /// The wire epochs they belong to (ascending, each once).
    pub epochs: Vec<u64>,
    /// Frames of epochs the replica does not hold: never written.
    pub uncommitted: u64,
}

/// The log (see the module doc).
#[derive(Debug, Default)]
pub struct OutputLog {
    limits: Mutex<OutputLimits>,
    inner: Mutex<Inner>,
}

use crate::server::lock;

impl OutputLog {
    /// An empty log within `limits`.
    pub fn new(limits: OutputLimits) -> Self {
        Self { limits: Mutex::new(limits), inner: Mutex::default() }
    }

    /// The bounds.
    pub fn limits(&self) -> OutputLimits {
        *lock(&self.limits)
    }

    /// Changes the bounds (epochs beyond them go at the next push).
    pub fn set_limits(&self, limits: OutputLimits) {
        *lock(&self.limits) = limits;
    }

    /// A new primary instance connected: the previous one's harvest numbers mean nothing to it.
    pub fn reset(&self) {
        let mut g = lock(&self.inner);
        let report = g.report;
        *g = Inner { report, ..Inner::default() };
    }

    /// Keeps the frames of one `Output` message (an epoch's output may come in several).
    pub fn push(&self, o: OutputFrames) {
        let limits = self.limits();
        let mut g = lock(&self.inner);
        let n = o.frames.len();
        g.report.received_frames += n as u64;
        if o.harvest <= g.released {
            // Released before its copy arrived (the notice overtook it): already on the wire.
            g.report.released_frames += n as u64;
            return;
        }
        let bytes: usize = o.frames.iter().map(Vec::len).sum();
        tracing::debug!(epoch = o.epoch, harvest = o.harvest, frames = n, bytes, "output logged");
        let e = g.epochs.entry(o.epoch).or_insert(Epoch { harvest: o.harvest, frames: Vec::new(), bytes: 0 });
        e.frames.extend(o.frames);
        e.bytes += bytes;
        g.frames += n;
        g.bytes += bytes;
        while g.frames > limits.max_frames || g.bytes > limits.max_bytes {
            let Some(old) = g.drop_first() else { break };
            g.report.overflow_frames += old.frames.len() as u64;
        }
    }

    /// The primary released the output of its harvest `harvest` and the earlier ones.
    pub fn released(&self, harvest: u64) {
        let mut g = lock(&self.inner);
        g.released = g.released.max(harvest);
        // Harvest and wire epoch grow together: the released epochs are the first ones.
        while g.epochs.first_key_value().is_some_and(|(_, e)| e.harvest <= harvest) {
            let old = g.drop_first().expect("first exists");
            g.report.released_frames += old.frames.len() as u64;
        }
    }

    /// Empties the log into what promotion writes: the frames of the epochs up to
    /// `replica_epoch` (those the replica holds), in order. The others are counted as dropped.
    pub fn take_for_promotion(&self, replica_epoch: u64) -> OutputReplay {
        let mut g = lock(&self.inner);
        let mut r = OutputReplay::default();
        for (epoch, e) in std::mem::take(&mut g.epochs) {
            if epoch <= replica_epoch {
                r.epochs.push(epoch);
                r.frames.extend(e.frames);
            } else {
                r.uncommitted += e.frames.len() as u64;
            }
        }
        g.frames = 0;
        g.bytes = 0;
        g.report.dropped_frames += r.uncommitted;
        r
    }

    /// Counts what promotion did with [`OutputLog::take_for_promotion`]'s frames.
    pub fn promoted(&self, written: u64, failed: u64) {
        let mut g = lock(&self.inner);
        g.report.written_frames += written;
        g.report.dropped_frames += failed;
    }

    /// The counters and the log's size now.
    pub fn report(&self) -> OutputLogReport {
        let g = lock(&self.inner);
        OutputLogReport { frames: g.frames, bytes: g.bytes, epochs: g.epochs.len(), ..g.report }
    }
}

/// What promotion writes, taken from a node's log when the replica is restored.
#[derive(Clone)]
pub struct AtPromotion {
    node: std::sync::Arc<crate::server::BackupNode>,
    replay: OutputReplay,
}

impl std::fmt::Debug for AtPromotion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtPromotion").field("replay", &self.replay).finish_non_exhaustive()
    }
}

impl AtPromotion {
    /// Takes `node`'s output log for a replica of epoch `replica_epoch`.
    pub fn take(node: std::sync::Arc<crate::server::BackupNode>, replica_epoch: u64) -> Self {
        let replay = node.output().take_for_promotion(replica_epoch);
        Self { node, replay }
    }

    /// `(written, dropped)` if nothing is written (no net device).
    pub fn unwritten(&self) -> (u64, u64) {
        (0, self.replay.uncommitted + self.replay.frames.len() as u64)
    }

    /// Writes the frames to `tap` (right after the MAC announce, before the guest resumes) and
    /// counts them in the log: `(written, dropped)`, dropped being the frames of epochs the
    /// replica does not hold and those the TAP refused.
    pub fn write(&self, tap: &Tap) -> (u64, u64) {
        let (written, failed) = write(tap, &self.replay);
        self.node.output().promoted(written, failed);
        (written, self.replay.uncommitted + failed)
    }
}

/// Writes promotion's output frames to `tap`, in order; returns how many were written and how
/// many the TAP refused. Call right after the MAC announce, before the guest resumes.
pub fn write(tap: &Tap, replay: &OutputReplay) -> (u64, u64) {
    let (mut written, mut failed) = (0u64, 0u64);
    for f in &replay.frames {
        match tap.write_frame(f) {
            Ok(_) => written += 1,
            Err(e) => {
                failed += 1;
                tracing::warn!(len = f.len(), "output log: a frame could not be written at promotion: {e}");
            }
        }
    }
    tracing::info!(
        written,
        failed,
        epochs = ?replay.epochs,
        uncommitted = replay.uncommitted,
        wall_ns = vmm::devices::virtio::net::wall_ns(),
        "output log: output of the replica's epochs that the primary had not released written to the tap"
    );
    (written, failed)
}

/// The session tap that keeps the log: takes `Output` in the session's own task, applies each
/// release notice (`InboundCommitted`) and passes it on (the inbound log takes it too), and
/// clears the log when a new primary instance connects. `log` and `origin` pick the log and the
/// instance it holds frames of out of `owner`.
pub fn log_tap<T: Send + Sync + 'static>(
    owner: std::sync::Arc<T>,
    log: fn(&T) -> &OutputLog,
    origin: fn(&T) -> &Mutex<Option<u64>>,
) -> transport::session::Tap<replication_proto::Receiver> {
    use replication_proto::ReceiverEvent;
    Box::new(move |_receiver, event| match event {
        ReceiverEvent::Output(o) => {
            log(&owner).push(o);
            None
        }
        ReceiverEvent::InboundCommitted { epoch } => {
            log(&owner).released(epoch);
            Some(ReceiverEvent::InboundCommitted { epoch })
        }
        ReceiverEvent::Connected { peer } => {
            let mut o = lock(origin(&owner));
            if o.is_some_and(|o| o != peer.instance) {
                tracing::info!("backup: a new primary instance: output log cleared");
                log(&owner).reset();
            }
            *o = Some(peer.instance);
            Some(ReceiverEvent::Connected { peer })
        }
        other => Some(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(epoch: u64, harvest: u64, frames: &[&[u8]]) -> OutputFrames {
        OutputFrames { epoch, harvest, frames: frames.iter().map(|f| f.to_vec()).collect() }
    }

    #[test]
    fn frames_of_an_epoch_above_the_replica_are_never_written() {
        let log = OutputLog::new(OutputLimits::default());
        log.push(output(4, 14, &[b"four-a", b"four-b"]));
        log.push(output(5, 15, &[b"five"]));
        // An epoch's output in two messages.
        log.push(output(6, 16, &[b"six-a"]));
        log.push(output(6, 16, &[b"six-b"]));
        log.push(output(7, 17, &[b"seven"]));
        // The replica holds epoch 5: epochs 6 and 7 were shipped, never committed here.
        let r = log.take_for_promotion(5);
        assert_eq!(r.frames, vec![b"four-a".to_vec(), b"four-b".to_vec(), b"five".to_vec()]);
        assert_eq!(r.epochs, vec![4, 5]);
        assert_eq!(r.uncommitted, 3);
        let rep = log.report();
        assert_eq!((rep.frames, rep.bytes, rep.epochs, rep.dropped_frames), (0, 0, 0, 3));
        // Taken once: a second promotion writes nothing.
        assert!(log.take_for_promotion(u64::MAX).frames.is_empty());
    }

    #[test]
    fn a_release_notice_drops_its_epoch_and_earlier_ones() {
        let log = OutputLog::new(OutputLimits::default());
        log.push(output(4, 14, &[b"a"]));
        log.push(output(5, 15, &[b"b", b"c"]));
        log.push(output(6, 16, &[b"d"]));
        log.released(15);
        assert_eq!(log.report().frames, 1);
        // A copy that arrives after its release notice (the notice overtook it) is not kept.
        log.push(output(5, 15, &[b"late"]));
        let rep = log.report();
        assert_eq!((rep.frames, rep.received_frames, rep.released_frames), (1, 5, 4));
        assert_eq!(log.take_for_promotion(6).frames, vec![b"d".to_vec()]);
    }

    #[test]
    fn the_log_keeps_within_its_bounds_by_dropping_the_oldest_epochs() {
        let log = OutputLog::new(OutputLimits { max_frames: 3, max_bytes: 1000 });
        for e in 1..=4 {
            log.push(output(e, e, &[&[e as u8; 100]]));
        }
        let rep = log.report();
        assert_eq!((rep.frames, rep.bytes, rep.overflow_frames), (3, 300, 1));
        // By bytes: a 900-byte frame pushes the oldest epochs out until the log is within 1000.
        log.push(output(5, 5, &[&[5; 900]]));
        let rep = log.report();
        assert_eq!((rep.frames, rep.bytes, rep.overflow_frames), (2, 1000, 3));
        assert_eq!(log.take_for_promotion(5).epochs, vec![4, 5]);
    }

    #[test]
    fn a_reset_forgets_the_previous_primary() {
        let log = OutputLog::new(OutputLimits::default());
        log.push(output(9, 40, &[b"old"]));
        log.released(41);
        log.reset();
        // The new instance's harvests start again at 1; its wire epochs go on above the old.
        log.push(output(12, 2, &[b"new"]));
        assert_eq!(log.take_for_promotion(12).frames, vec![b"new".to_vec()]);
    }

    #[test]
    fn promotion_writes_the_frames_in_order_to_the_tap() {
        use std::os::fd::{FromRawFd, OwnedFd};
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two new descriptors into `fds`, which we then own.
        let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let tap = Tap::from_fd(a, "pair").unwrap();
        let peer = Tap::from_fd(b, "peer").unwrap();
        let log = OutputLog::new(OutputLimits::default());
        log.push(output(3, 3, &[b"one", b"two"]));
        log.push(output(4, 4, &[b"three"]));
        log.push(output(5, 5, &[b"not committed"]));
        let r = log.take_for_promotion(4);
        assert_eq!(write(&tap, &r), (3, 0));
        log.promoted(3, 0);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = peer.read_frame(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
        let rep = log.report();
        assert_eq!((rep.written_frames, rep.dropped_frames), (3, 1));
    }
}
