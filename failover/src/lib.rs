//! Failure detection, arbitration and fencing for Understudy: who may run a protected VM and
//! release its output (DESIGN.md invariant 3: at most one active copy, granted by a raft
//! quorum of the primary's agent, the backup's agent and a witness).
//!
//! Three node ids form a raft group (raft-rs `RawNode`). Its replicated state machine records,
//! per VM, the holder, a monotonically increasing *generation* (the fencing token) and the
//! synchronised backup. A holder releases output only under a lease that a quorum confirmed;
//! a backup is granted the next generation only once that lease has certainly run out on every
//! clock; a holder that sees a newer generation is fenced. The argument, with the lease
//! arithmetic and every partition case, is in `docs/failure-model.md`; how to drive the crate
//! is in `docs/failover.md`.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use failover::journal::MemDisk;
//! use failover::{Arbiter, ArbiterConfig, Event, VmId};
//!
//! // Three arbiters (primary's agent 1, backup's agent 2, witness 3) on in-memory disks.
//! let voters = [1, 2, 3];
//! let t0 = Instant::now();
//! let disks = [MemDisk::new(), MemDisk::new(), MemDisk::new()];
//! let mut nodes = Vec::new();
//! for (id, disk) in voters.iter().zip(&disks) {
//!     let config = ArbiterConfig { preferred_leader: Some(3), ..ArbiterConfig::new(*id, &voters) };
//!     nodes.push(Arbiter::open_mem(config, disk, t0)?);
//! }
//!
//! // The primary asks for the VM; a perfect network delivers every message within 1 ms.
//! let vm = VmId(1);
//! nodes[0].request_activity(t0, vm)?;
//! let (mut now, mut granted) = (t0, None);
//! while granted.is_none() {
//!     now += Duration::from_millis(1);
//!     let mut flight = Vec::new();
//!     for node in nodes.iter_mut() {
//!         node.handle_timeout(now)?;
//!         while let Some((to, bytes)) = node.poll_transmit() {
//!             flight.push((node.id(), to, bytes));
//!         }
//!     }
//!     for (from, to, bytes) in flight {
//!         nodes[to as usize - 1].step(now, from, &bytes)?;
//!     }
//!     while let Some(event) = nodes[0].poll_event() {
//!         if let Event::Granted { generation, .. } = event {
//!             granted = Some(generation);
//!         }
//!     }
//! }
//! assert_eq!(granted, Some(1));
//! // The output-commit buffer asks before every release; only the holder may.
//! assert!(nodes[0].may_release_output(now, vm));
//! assert!(!nodes[1].may_release_output(now, vm));
//! # Ok::<(), failover::ArbiterError>(())
//! ```
//!
//! Modules:
//! - [`arbiter`]: the raft voter, the lease and the fencing events; [`witness`]: the third voter;
//! - [`state`]: the replicated state machine and its commands; [`lease`]: the lease arithmetic;
//! - [`journal`], [`storage`]: the persisted raft state; [`wire`]: the raft message envelope;
//! - [`net`] (feature `net`): the tokio driver, the QUIC link (and a UDP one for tests), the
//!   witness runners and the transport seam; [`net::agent`]: the arbitration agent of a VM
//!   process (primary or backup); [`fuzzing`]: the fuzz targets' entry points.
#![forbid(unsafe_code)]

pub mod arbiter;
pub mod failpoint;
#[doc(hidden)]
pub mod fuzzing;
pub mod journal;
pub mod lease;
pub mod logger;
#[cfg(feature = "net")]
pub mod net;
pub(crate) mod ratelimit;
pub mod state;
pub mod storage;
pub mod wire;
pub mod witness;

/// A raft node id: one per voter (primary's agent, backup's agent, witness). Never 0.
pub type NodeId = u64;

pub use arbiter::{Arbiter, ArbiterConfig, ArbiterError, Event};
pub use lease::{LeaseConfig, OutputPermit};
pub use state::{VmId, VmRecord};
pub use witness::Witness;

/// `error: source: source ...`: an error with its chain of sources on one line, for logs (the
/// top level of a program prints the chain itself).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
