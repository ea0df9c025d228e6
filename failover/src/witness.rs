//! The witness: the third voter of a group, on a host of its own. It runs no guest and never
//! asks for activity; its vote (and its promises) are what let a backup take over from a dead
//! primary, and what keep a backup that merely lost sight of a live primary from doing so.
//!
//! It is an [`Arbiter`] with persisted storage and nothing else. Raft leadership follows the
//! holder of the VM ([`ArbiterConfig::leader_follows_holder`]); the witness leads before any VM
//! exists and campaigns first when the holder's host dies.

use std::path::Path;
use std::time::Instant;

use crate::NodeId;
use crate::arbiter::{Arbiter, ArbiterConfig, ArbiterError, Event};
use crate::journal::MemDisk;

/// The witness. See the module documentation.
#[derive(Debug)]
pub struct Witness {
    arbiter: Arbiter,
}

impl Witness {
    /// The default witness configuration: it leads while no VM is known, and it campaigns
    /// last when a leader dies (8 ticks of silence; the agents 6-7): the survivor that matters
    /// is the backup taking over from a silent holder, which campaigns as soon as its faith in
    /// that leader lapses (4 ticks, [`ArbiterConfig::election_ticks`]); a witness campaigning
    /// at the same instant would split the two survivors' votes (seen: 60 ms lost to a second
    /// round).
    pub fn config(id: NodeId, voters: &[NodeId]) -> ArbiterConfig {
        ArbiterConfig {
            preferred_leader: Some(id),
            campaign_delay_ticks: 4,
            election_jitter_ticks: 1,
            ..ArbiterConfig::new(id, voters)
        }
    }

    /// Opens (or bootstraps) the witness whose raft state lives in `dir`.
    pub fn open_dir(config: ArbiterConfig, dir: &Path, now: Instant) -> Result<Self, ArbiterError> {
        Ok(Self { arbiter: Arbiter::open_dir(config, dir, now)? })
    }

    /// Opens (or bootstraps) a witness on an in-memory disk.
    pub fn open_mem(config: ArbiterConfig, disk: &MemDisk, now: Instant) -> Result<Self, ArbiterError> {
        Ok(Self { arbiter: Arbiter::open_mem(config, disk, now)? })
    }

    /// A raft message from `from`.
    pub fn step(&mut self, now: Instant, from: NodeId, bytes: &[u8]) -> Result<(), ArbiterError> {
        self.arbiter.step(now, from, bytes)
    }

    /// Advances time.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ArbiterError> {
        self.arbiter.handle_timeout(now)
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<(NodeId, Vec<u8>)> {
        self.arbiter.poll_transmit()
    }

    /// When to call [`Witness::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.arbiter.poll_timeout()
    }

    /// The next event (a witness only sees leader changes).
    pub fn poll_event(&mut self) -> Option<Event> {
        self.arbiter.poll_event()
    }

    /// The arbiter inside, to inspect the group's state.
    pub fn arbiter(&self) -> &Arbiter {
        &self.arbiter
    }
}
