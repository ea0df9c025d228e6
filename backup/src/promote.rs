//! Promotion: the replica's consistent checkpoint becomes the running VM (DESIGN.md: promotion
//! lives in `backup`). The caller takes the replica and the VM prepared ahead of time from the
//! [`BackupNode`](crate::server::BackupNode) and stops the server; this builds the VM, announces
//! its MAC address and resumes it.

use std::time::Instant;

use serde::Serialize;
use vmm::vm::{PreparedVm, RestoreOptions, Vm, VmError};

use crate::replica::{Replica, ReplicaError};

/// How to build the promoted VM.
pub struct PromoteOptions {
    /// When promotion was requested: `take_ms` and `promote_ms` count from here.
    pub requested: Instant,
    /// Where the VM's serial output goes.
    pub serial: vmm::devices::serial::SerialOut,
    /// TAP for the VM's net device.
    pub tap: Option<String>,
    /// Digest the replica first (verification; costs time on the critical path).
    pub digest: bool,
    /// The inbound log to replay: the frames the primary delivered after the replica's
    /// checkpoint go to the guest, in order, before it resumes (`None`: nothing is replayed).
    pub replay: Option<std::sync::Arc<crate::server::BackupNode>>,
}

/// What a promotion did: the epoch the replica held, its digest and where the time went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Promoted {
    /// The epoch the replica held.
    pub epoch: u64,
    /// Digest of the replica memory (`"not computed"` unless asked for).
    pub memory_digest: String,
    /// Milliseconds from the request to the guest running.
    pub promote_ms: f64,
    /// Milliseconds from the request to the replica being in hand.
    pub take_ms: f64,
    /// Milliseconds building the VM from the replica.
    pub restore_ms: f64,
    /// Milliseconds announcing the MAC address.
    pub announce_ms: f64,
    /// Frames of the inbound log replayed into the guest (delivered by the primary after the
    /// replica's checkpoint).
    pub replayed_frames: u64,
    /// Frames of the inbound log the replica already held (not replayed).
    pub replay_skipped_frames: u64,
    /// Frames after the replica's checkpoint missing from the log (dropped on the way or by its
    /// bound): their senders resend them.
    pub replay_gap_frames: u64,
    /// Of `replayed_frames`, LAN copies: frames the primary never delivered.
    pub replay_lan_frames: u64,
    /// Output frames of the replica's epochs that the primary had not reported released,
    /// written to the TAP right after the announce ([`crate::output_log`]).
    pub output_written_frames: u64,
    /// Output frames in the log not written: of epochs the replica does not hold, or refused by
    /// the TAP.
    pub output_dropped_frames: u64,
}

/// Errors of promotion.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// The replica could not give up its memory and state.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// The VM could not be built from the replica.
    #[error("build the vm from the replica")]
    Build(#[source] VmError),
}

/// Builds the VM from `replica` (over `prepared` if the server built one), announces it on the
/// network and resumes it: from now on it is the active copy.
pub fn promote(
    replica: Replica,
    prepared: Option<PreparedVm>,
    opts: PromoteOptions,
) -> Result<(Vm, Promoted), PromoteError> {
    let (mut vm, restored) = restore(replica, prepared, opts)?;
    let promoted = activate(&mut vm, restored);
    Ok((vm, promoted))
}

/// A VM built from a replica, paused: it has not run and has not announced itself. Only
/// [`activate`] makes it the active copy (a migration destination builds it while the source
/// still decides, and drops it if the source does not hand over).
#[derive(Debug, Clone)]
pub struct Restored {
    requested: std::time::Instant,
    epoch: u64,
    memory_digest: String,
    take_ms: f64,
    restore_ms: f64,
    replay: Replayed,
    /// The output log's frames of the replica's epochs, written by [`activate`].
    output: Option<crate::output_log::AtPromotion>,
}

/// What a promotion replayed (counts; the frames went to the device).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Frames queued into the guest's receive path.
    pub frames: u64,
    /// Frames of the log the replica already held.
    pub skipped: u64,
    /// Frames after the replica's count missing from the log.
    pub gaps: u64,
    /// Of `frames`, LAN copies (the primary never delivered them).
    pub lan: u64,
}

impl Restored {
    /// The epoch the replica held.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Builds the VM from `replica` (over `prepared` if the server built one), paused.
pub fn restore(
    replica: Replica,
    prepared: Option<PreparedVm>,
    opts: PromoteOptions,
) -> Result<(Vm, Restored), PromoteError> {
    let t0 = opts.requested;
    let take_ms = t0.elapsed().as_secs_f64() * 1e3;
    let memory_digest = if opts.digest { format!("{:016x}", replica.digest()) } else { "not computed".into() };
    let (mem, state, epoch) = replica.into_parts()?;
    let t1 = Instant::now();
    // The LAN copies stop here: the TAP they were read from goes to the VM.
    let lan = opts.replay.as_ref().and_then(|n| n.lan_copy()).map(|l| {
        let taken = l.finish();
        (l, taken)
    });
    let open_tap = lan.as_ref().map(|(_, t)| std::sync::Arc::clone(&t.tap));
    let ropts = RestoreOptions { serial: opts.serial, tap: opts.tap, open_tap };
    let vm = Vm::restore_prepared(prepared, mem, &state, ropts).map_err(PromoteError::Build)?;
    let restore_ms = t1.elapsed().as_secs_f64() * 1e3;
    let replay = match &opts.replay {
        Some(node) => replay_inbound(&vm, node, lan.map(|(l, t)| (l, t.frames))),
        None => Replayed::default(),
    };
    let output = opts.replay.map(|node| crate::output_log::AtPromotion::take(node, epoch));
    Ok((vm, Restored { requested: t0, epoch, memory_digest, take_ms, restore_ms, replay, output }))
}

/// Queues the inbound log's frames that the replica does not hold into the restored (paused)
/// VM's net device, ahead of the TAP: the guest receives them first once it resumes. Which ones
/// is decided by the device's delivery count saved in the replica's state (see
/// [`crate::inbound`]). Without a net device nothing is replayed (and the log is left alone).
/// The side copies waiting in the node's socket are taken into the log first, right before the
/// log is taken: the dead primary's last copies are there.
///
/// With LAN copies (`lan`: the copies' counters and the frames read from the standby's TAP,
/// oldest first), the frames behind the newest delivered ones, for the guest, follow the log's:
/// those the primary never delivered ([`crate::lan_copy`]).
pub fn replay_inbound(
    vm: &Vm,
    node: &crate::server::BackupNode,
    lan: Option<(std::sync::Arc<crate::lan_copy::LanCopy>, Vec<Vec<u8>>)>,
) -> Replayed {
    let Some(net) = vm.net() else {
        return Replayed::default();
    };
    let dev = net.lock().unwrap_or_else(|e| e.into_inner());
    let replica_seq = dev.device().rx_delivered();
    node.drain_side_copies();
    let replay = node.inbound().take_replay(replica_seq);
    let (first, last) = (replay.seqs.first().copied(), replay.seqs.last().copied());
    let mut done = Replayed { frames: replay.frames.len() as u64, skipped: replay.skipped, gaps: replay.gaps, lan: 0 };
    let mut frames = replay.frames;
    if let Some((copies, lan)) = lan {
        let mac = dev.device().mac();
        match crate::lan_copy::after_delivered(&lan, &replay.tail, replica_seq) {
            Ok(at) => {
                let behind = lan.len() - at;
                let before = frames.len();
                frames.extend(lan.into_iter().skip(at).filter(|f| crate::lan_copy::for_guest(f, mac)));
                done.lan = (frames.len() - before) as u64;
                copies.record_replay(Some(done.lan));
                tracing::info!(
                    behind,
                    replayed = done.lan,
                    newest_delivered = ?replay.tail.last().map(|t| t.0),
                    "lan copies: frames the primary never delivered replayed after the inbound log's"
                );
            }
            Err(why) => {
                copies.record_replay(None);
                let newest: Vec<(usize, u64)> =
                    lan.iter().rev().take(6).map(|f| (f.len(), crate::lan_copy::digest(f))).collect();
                tracing::info!(
                    ?why,
                    copies = lan.len(),
                    newest_delivered = ?replay.tail.last().map(|t| t.0),
                    tail = ?replay.tail,
                    newest_copies = ?newest,
                    "lan copies: nothing replayed (the newest delivered frames are not among them)"
                );
            }
        }
    }
    done.frames += done.lan;
    dev.device().replay_rx(frames);
    tracing::info!(
        replica_delivered = replica_seq,
        replayed = done.frames,
        lan = done.lan,
        first = ?first,
        last = ?last,
        skipped = replay.skipped,
        gaps = replay.gaps,
        "inbound log: frames the primary delivered after the replica's checkpoint replayed ahead of the tap"
    );
    done
}

/// Announces the restored VM on the network and resumes it: from now on it is the active copy.
pub fn activate(vm: &mut Vm, r: Restored) -> Promoted {
    let t2 = Instant::now();
    let mut output = r.output.as_ref().map_or((0, 0), |o| o.unwritten());
    if let Some(net) = vm.net() {
        let dev = net.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = dev.device().announce() {
            tracing::warn!("announce after promotion: {e}");
        }
        if let Some(o) = &r.output {
            output = o.write(dev.device().tap());
        }
    }
    let announce_ms = t2.elapsed().as_secs_f64() * 1e3;
    vm.resume();
    let promote_ms = r.requested.elapsed().as_secs_f64() * 1e3;
    let (output_written_frames, output_dropped_frames) = output;
    let Restored { epoch, memory_digest, take_ms, restore_ms, replay, .. } = r;
    let replayed_frames = replay.frames;
    tracing::info!(
        epoch,
        replayed_frames,
        output_written_frames,
        digest = %memory_digest,
        promote_ms,
        take_ms,
        restore_ms,
        announce_ms,
        "PROMOTED: the replica runs as the active vm"
    );
    Promoted {
        epoch,
        memory_digest,
        promote_ms,
        take_ms,
        restore_ms,
        announce_ms,
        replayed_frames,
        replay_skipped_frames: replay.skipped,
        replay_gap_frames: replay.gaps,
        replay_lan_frames: replay.lan,
        output_written_frames,
        output_dropped_frames,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The promote answer's field names are part of the admin API (testbed's fault runs read
    /// them).
    #[test]
    fn promoted_report_keeps_its_field_names() {
        let p = Promoted {
            epoch: 7,
            memory_digest: "not computed".into(),
            promote_ms: 1.0,
            take_ms: 0.1,
            restore_ms: 0.5,
            announce_ms: 0.2,
            replayed_frames: 2,
            replay_skipped_frames: 1,
            replay_gap_frames: 0,
            replay_lan_frames: 0,
            output_written_frames: 3,
            output_dropped_frames: 1,
        };
        let v = serde_json::to_value(&p).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "announce_ms",
                "epoch",
                "memory_digest",
                "output_dropped_frames",
                "output_written_frames",
                "promote_ms",
                "replay_gap_frames",
                "replay_lan_frames",
                "replay_skipped_frames",
                "replayed_frames",
                "restore_ms",
                "take_ms"
            ]
        );
        assert_eq!(v["epoch"], 7);
    }
}
