//! Lease arithmetic: how long a holder may release output after asking for a renewal, and how
//! long a voter must wait after seeing a lease request before it helps grant a newer generation.
//!
//! Clocks are never compared across hosts. Each node measures durations on its own monotonic
//! clock, whose rate is within `1 ± ρ` of real time (`ρ = max_drift_ppm / 10^6`):
//!
//! - the holder proposes a request at its local instant `s` and, once the request is applied,
//!   may release output until `s + L` (its clock): at most `L / (1 - ρ)` of real time after `s`;
//! - a voter receives the request at some real instant after `s` and refuses to append a grant
//!   of a newer generation until `W = L (1 + ρ) / (1 - ρ) + margin` has passed on its clock,
//!   which is at least `W / (1 + ρ) >= L / (1 - ρ)` of real time, plus the margin.
//!
//! So the voter's first acknowledgement of a newer grant comes after the holder's lease ended,
//! with `margin / (1 + ρ)` to spare for the release in flight when the lease ran out. See
//! `docs/failure-model.md` for the whole argument.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::state::VmId;

/// Errors of lease configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("lease: timeout must be positive")]
    ZeroTimeout,
    #[error("lease: renew interval {renew:?} must be shorter than the lease {lease:?}")]
    RenewTooSlow { renew: Duration, lease: Duration },
    #[error("lease: drift {ppm} ppm must be below 500000")]
    Drift { ppm: u32 },
    #[error("lease: the bound on a peer's lease {max:?} must be at least the lease {lease:?}")]
    ClaimBound { max: Duration, lease: Duration },
}

/// Lease timings. Every node of a group should use the same values; a voter honours the lease
/// each request carries, and uses its own `lease_timeout` when it must assume the worst (after a
/// restart, or when it installs a snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a confirmed renewal lets the holder release output (`L`).
    pub lease_timeout: Duration,
    /// How often the holder asks for a renewal. A few renewals fit in one lease, so one lost
    /// message does not stop the output.
    pub renew_interval: Duration,
    /// Bound on the rate difference between any node's monotonic clock and real time, in parts
    /// per million (`ρ`). 10,000 (1%) is far above what NTP-disciplined or free-running quartz
    /// clocks do; it costs `2ρL` of failover time.
    pub max_drift_ppm: u32,
    /// Extra wait on the voters' side: covers the output release that was checked just before
    /// the lease ran out and the scheduling delay between that check and the packet leaving.
    pub release_margin: Duration,
    /// The longest lease a peer's request may claim. A voter honours the lease each request
    /// carries (waits it out before it helps grant a newer generation), so a request read off
    /// the wire claiming more is refused whole: an absurd lease would otherwise block every
    /// failover for as long. At least `lease_timeout`; peers configured with a longer lease
    /// than this are refused until the bound is raised.
    pub max_claim_lease: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            lease_timeout: Duration::from_millis(50),
            renew_interval: Duration::from_millis(15),
            max_drift_ppm: 10_000,
            release_margin: Duration::from_millis(5),
            max_claim_lease: Duration::from_secs(1),
        }
    }
}

impl LeaseConfig {
    /// Checks the values are usable.
    pub fn validate(&self) -> Result<(), LeaseError> {
        if self.lease_timeout.is_zero() {
            return Err(LeaseError::ZeroTimeout);
        }
        if self.renew_interval >= self.lease_timeout || self.renew_interval.is_zero() {
            return Err(LeaseError::RenewTooSlow { renew: self.renew_interval, lease: self.lease_timeout });
        }
        if self.max_drift_ppm >= 500_000 {
            return Err(LeaseError::Drift { ppm: self.max_drift_ppm });
        }
        if self.max_claim_lease < self.lease_timeout {
            return Err(LeaseError::ClaimBound { max: self.max_claim_lease, lease: self.lease_timeout });
        }
        Ok(())
    }

    /// `W(lease) = lease (1 + ρ) / (1 - ρ) + margin`, rounded up to the nanosecond: how long a
    /// voter waits after seeing a request for `lease` before it accepts a newer grant.
    pub fn voter_wait(&self, lease: Duration) -> Duration {
        let ppm = u128::from(self.max_drift_ppm.min(499_999));
        let num = lease.as_nanos() * (1_000_000 + ppm);
        let den = 1_000_000 - ppm;
        let nanos = num.div_ceil(den);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)) + self.release_margin
    }
}

/// Proof that the holder may release output: valid for one VM, one generation, until an
/// instant of the holder's clock. By the lease argument no other copy can be granted before
/// `until`, so a permit may be cached by the output path and checked with [`OutputPermit::allows`]
/// before every release without asking the arbiter again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputPermit {
    pub vm: VmId,
    pub generation: u64,
    pub until: Instant,
}

impl OutputPermit {
    /// Whether output may be released at `now`.
    pub fn allows(&self, now: Instant) -> bool {
        now < self.until
    }
}

/// A voter's promises: per VM and generation, until when it refuses to help grant a newer
/// generation. Volatile on purpose: a restarted node raises the floor instead (it promises
/// everything for a full wait from its restart).
#[derive(Debug, Clone, Default)]
pub struct Promises {
    floor: Option<Instant>,
    by_vm: BTreeMap<VmId, BTreeMap<u64, Instant>>,
}

impl Promises {
    /// Refuses every grant until `until`.
    pub fn raise_floor(&mut self, until: Instant) {
        self.floor = Some(self.floor.map_or(until, |f| f.max(until)));
    }

    /// A lease request for `vm` under `generation` was seen: refuse grants of newer generations
    /// until `until`.
    pub fn record(&mut self, vm: VmId, generation: u64, until: Instant) {
        let slot = self.by_vm.entry(vm).or_default().entry(generation).or_insert(until);
        *slot = (*slot).max(until);
    }

    /// `Some(t)` while a grant of `generation` for `vm` must still be refused, `t` being when
    /// that ends; `None` once it may be accepted. Requests of the same or a newer generation do
    /// not block: competing grants of one generation are sorted out by the state machine.
    pub fn grant_blocked_until(&self, now: Instant, vm: VmId, generation: u64) -> Option<Instant> {
        let older = self.by_vm.get(&vm).into_iter().flat_map(|m| m.range(..generation).map(|(_, t)| *t));
        let until = older.chain(self.floor).max()?;
        (until > now).then_some(until)
    }

    /// Forgets promises that ended.
    pub fn prune(&mut self, now: Instant) {
        for m in self.by_vm.values_mut() {
            m.retain(|_, t| *t > now);
        }
        self.by_vm.retain(|_, m| !m.is_empty());
        if self.floor.is_some_and(|f| f <= now) {
            self.floor = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn voter_wait_covers_the_lease_under_worst_drift() {
        let c = LeaseConfig::default();
        assert_eq!(c.validate(), Ok(()));
        // 50 ms * 1.01 / 0.99 = 51.0101... ms, plus 5 ms.
        assert_eq!(c.voter_wait(ms(50)), Duration::from_nanos(51_010_102) + ms(5));
        let exact = LeaseConfig { max_drift_ppm: 0, release_margin: Duration::ZERO, ..c };
        assert_eq!(exact.voter_wait(ms(50)), ms(50));
        // The claim of the module docs: the voter's wait in real time, with its clock running
        // fast, is at least the holder's lease in real time, with its clock running slow.
        for ppm in [0u32, 1, 100, 10_000, 250_000] {
            let c = LeaseConfig { max_drift_ppm: ppm, release_margin: Duration::ZERO, ..c };
            let rho = f64::from(ppm) / 1e6;
            for lease in [ms(1), ms(50), ms(1000)] {
                let voter_real = c.voter_wait(lease).as_secs_f64() / (1.0 + rho);
                let holder_real = lease.as_secs_f64() / (1.0 - rho);
                assert!(voter_real >= holder_real * (1.0 - 1e-12), "ppm {ppm} lease {lease:?}");
            }
        }
    }

    #[test]
    fn validation() {
        let c = LeaseConfig::default();
        assert_eq!(LeaseConfig { lease_timeout: Duration::ZERO, ..c }.validate(), Err(LeaseError::ZeroTimeout));
        assert!(matches!(LeaseConfig { renew_interval: ms(50), ..c }.validate(), Err(LeaseError::RenewTooSlow { .. })));
        assert_eq!(
            LeaseConfig { max_drift_ppm: 600_000, ..c }.validate().unwrap_err().to_string(),
            "lease: drift 600000 ppm must be below 500000"
        );
        assert_eq!(
            LeaseConfig { lease_timeout: Duration::from_secs(2), renew_interval: ms(10), ..c }.validate(),
            Err(LeaseError::ClaimBound { max: Duration::from_secs(1), lease: Duration::from_secs(2) })
        );
    }

    #[test]
    fn promises_block_only_newer_generations() {
        let t0 = Instant::now();
        let vm = VmId(1);
        let mut p = Promises::default();
        assert_eq!(p.grant_blocked_until(t0, vm, 2), None);
        p.record(vm, 1, t0 + ms(50));
        assert_eq!(p.grant_blocked_until(t0, vm, 2), Some(t0 + ms(50)));
        assert_eq!(p.grant_blocked_until(t0, vm, 1), None, "a competing grant of the same generation");
        assert_eq!(p.grant_blocked_until(t0, VmId(2), 2), None, "another vm");
        assert_eq!(p.grant_blocked_until(t0 + ms(50), vm, 2), None);
        p.record(vm, 1, t0 + ms(40)); // an earlier end never shortens a promise
        assert_eq!(p.grant_blocked_until(t0, vm, 2), Some(t0 + ms(50)));
        p.record(vm, 2, t0 + ms(90));
        assert_eq!(p.grant_blocked_until(t0, vm, 2), Some(t0 + ms(50)));
        assert_eq!(p.grant_blocked_until(t0, vm, 3), Some(t0 + ms(90)));
        p.raise_floor(t0 + ms(100));
        assert_eq!(p.grant_blocked_until(t0, VmId(9), 1), Some(t0 + ms(100)));
        p.prune(t0 + ms(95));
        assert_eq!(p.grant_blocked_until(t0 + ms(95), vm, 3), Some(t0 + ms(100)));
        p.prune(t0 + ms(100));
        assert_eq!(p.grant_blocked_until(t0 + ms(100), vm, 3), None);
        assert!(p.by_vm.is_empty());
    }

    #[test]
    fn permit() {
        let t0 = Instant::now();
        let p = OutputPermit { vm: VmId(1), generation: 3, until: t0 + ms(10) };
        assert!(p.allows(t0));
        assert!(!p.allows(t0 + ms(10)));
    }
}
