//! Automatic re-protection after a promotion (docs/failover.md, *Re-protection*): the standby
//! backups a promoted VM protects itself to without a command ([`ReprotectArgs`], flattened into
//! `understudy backup`), checked into a [`Plan`]; the progress `status` and `/metrics` show
//! ([`Progress`], [`ReprotectStatus`]); and the retry delays ([`Backoff`]). The node drives it
//! (`runtime/reprotect.rs`) through the same path as `understudy protect`.
//!
//! A standby is an ordinary `understudy backup` on another host of the group (usually the old
//! primary's host once it is back, with its node id and raft directory). The promoted node
//! probes each standby in turn; when one answers it protects to it, and the group records it as
//! the backup (`set_backup`) once its replica is consistent, as after a manual `protect`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use failover::NodeId;
use failover::net::PeerSpec;
use serde::Serialize;

use crate::protect::ProtectRequest;

/// What is wrong with the re-protection settings.
#[derive(Debug, thiserror::Error)]
pub enum ReprotectError {
    /// Standbys without arbitration.
    #[error("--reprotect-to needs arbitration (--arbiter-id): only the group can record the standby as the backup")]
    NoArbitration,
    /// A standby under this node's own id.
    #[error("--reprotect-to {spec}: node {node} is this process's own --arbiter-id")]
    OwnNode {
        /// The flag's value.
        spec: String,
        /// The id.
        node: NodeId,
    },
    /// A standby id that is no voter of the group.
    #[error("--reprotect-to {spec}: node {node} is not in --arbiter-peer (the group's voters are {voters})")]
    NotAVoter {
        /// The flag's value.
        spec: String,
        /// The id.
        node: NodeId,
        /// The voters, e.g. `1=primary, 3=witness`.
        voters: String,
    },
    /// A certificate name that is not the one the group knows for that node.
    #[error("--reprotect-to {spec}: unknown standby name {name:?}: node {node} is {expected:?} in --arbiter-peer")]
    UnknownName {
        /// The flag's value.
        spec: String,
        /// The name given.
        name: String,
        /// The id.
        node: NodeId,
        /// The name in `--arbiter-peer`.
        expected: String,
    },
    /// This host's own certificate name.
    #[error("--reprotect-to {spec}: {name:?} is this host's own certificate name (--name): a vm cannot back itself up")]
    OwnName {
        /// The flag's value.
        spec: String,
        /// The name.
        name: String,
    },
    /// This process's own address.
    #[error("--reprotect-to {spec}: {addr} is this process's own {flag} address: a vm cannot back itself up")]
    OwnAddress {
        /// The flag's value.
        spec: String,
        /// The address.
        addr: SocketAddr,
        /// `--listen` or `--arbiter-listen`.
        flag: &'static str,
    },
    /// The same standby twice.
    #[error("--reprotect-to {spec}: node {node} is given twice")]
    Twice {
        /// The flag's value.
        spec: String,
        /// The id.
        node: NodeId,
    },
    /// Retry delays that do not work together.
    #[error("--reprotect-retry-ms {first} is 0 or more than --reprotect-retry-max-ms {max}")]
    Retry {
        /// The first delay.
        first: u64,
        /// The longest.
        max: u64,
    },
}

/// Command-line settings of re-protection (`understudy backup`).
#[derive(Debug, Clone, clap::Args)]
pub struct ReprotectArgs {
    /// Once promoted, protect the VM to this standby backup (repeat for more; tried in turn):
    /// `ID=NAME@HOST:PORT`, its raft node id, certificate name and replication address (its
    /// `backup --listen`), e.g. the old primary's host `1=primary@10.0.0.1:7400`.
    #[arg(long = "reprotect-to", id = "reprotect_to", value_name = "ID=NAME@HOST:PORT", value_parser = standby_arg)]
    pub to: Vec<PeerSpec>,
    /// First delay between re-protection attempts, ms (doubles after each failed round of all
    /// standbys, up to --reprotect-retry-max-ms).
    #[arg(long = "reprotect-retry-ms", id = "reprotect_retry_ms", default_value_t = 500)]
    pub retry_ms: u64,
    /// Longest delay between re-protection attempts, ms.
    #[arg(long = "reprotect-retry-max-ms", id = "reprotect_retry_max_ms", default_value_t = 10_000)]
    pub retry_max_ms: u64,
    /// How long a standby that answered may take to hold a consistent replica before the
    /// attempt is given up (and the next standby tried), ms.
    #[arg(long = "reprotect-sync-timeout-ms", id = "reprotect_sync_timeout_ms", default_value_t = 60_000)]
    pub sync_timeout_ms: u64,
    /// Digest guest memory every N checkpoints of the re-protection, for `ctl verify-journal`
    /// (tests; 0 = off), as `protect --verify-every`.
    #[arg(long = "reprotect-verify-every", id = "reprotect_verify_every", default_value_t = 0)]
    pub verify_every: u64,
}

/// Parses a standby (`--reprotect-to`): `ID=NAME@HOST:PORT`.
pub fn standby_arg(spec: &str) -> Result<PeerSpec, String> {
    failover::net::parse_quic_peer(spec).map_err(|e| format!("{e}: give the standby as ID=NAME@HOST:PORT"))
}

/// This process's own settings that the standbys are checked against, and that the protection
/// to them takes over.
#[derive(Debug, Clone)]
pub struct Own {
    /// `--arbiter-id` (None without arbitration).
    pub node: Option<NodeId>,
    /// `--arbiter-peer`.
    pub peers: Vec<PeerSpec>,
    /// `--arbiter-listen`.
    pub arbiter_listen: Option<SocketAddr>,
    /// `--listen`.
    pub listen: SocketAddr,
    /// `--certs` (absolute).
    pub certs: PathBuf,
    /// `--name`.
    pub name: String,
    /// `--vm`.
    pub vm: String,
    /// `--heartbeat-ms`.
    pub heartbeat_ms: u64,
    /// `--detect-ms`.
    pub detect_ms: u64,
}

/// Re-protection, checked: who to protect to and how.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The standbys, in the order tried.
    pub standbys: Vec<PeerSpec>,
    /// Retry delays.
    pub backoff: Backoff,
    /// How long an attempt may take to sync.
    pub sync_timeout: Duration,
    own: Own,
    verify_every: u64,
}

fn same_address(a: SocketAddr, own: SocketAddr) -> bool {
    a == own || (own.ip().is_unspecified() && a.port() == own.port() && a.ip().is_loopback())
}

impl ReprotectArgs {
    /// The plan, or None when no standby is named; refuses standbys the group does not know by
    /// that id and name, this node itself, and this process's own addresses.
    pub fn plan(&self, own: Own) -> Result<Option<Plan>, ReprotectError> {
        if self.to.is_empty() {
            return Ok(None);
        }
        let me = own.node.ok_or(ReprotectError::NoArbitration)?;
        if self.retry_ms == 0 || self.retry_ms > self.retry_max_ms {
            return Err(ReprotectError::Retry { first: self.retry_ms, max: self.retry_max_ms });
        }
        for (i, s) in self.to.iter().enumerate() {
            let spec = format!("{}={}@{}", s.id, s.name, s.addr);
            if s.id == me {
                return Err(ReprotectError::OwnNode { spec, node: s.id });
            }
            let Some(peer) = own.peers.iter().find(|p| p.id == s.id) else {
                let voters = own.peers.iter().map(|p| format!("{}={}", p.id, p.name)).collect::<Vec<_>>().join(", ");
                return Err(ReprotectError::NotAVoter { spec, node: s.id, voters });
            };
            if s.name == own.name {
                return Err(ReprotectError::OwnName { spec, name: s.name.clone() });
            }
            if peer.name != s.name {
                return Err(ReprotectError::UnknownName {
                    spec,
                    name: s.name.clone(),
                    node: s.id,
                    expected: peer.name.clone(),
                });
            }
            for (addr, flag) in [(Some(own.listen), "--listen"), (own.arbiter_listen, "--arbiter-listen")] {
                if let Some(addr) = addr.filter(|a| same_address(s.addr, *a)) {
                    return Err(ReprotectError::OwnAddress { spec, addr, flag });
                }
            }
            if self.to[..i].iter().any(|t| t.id == s.id) {
                return Err(ReprotectError::Twice { spec, node: s.id });
            }
        }
        Ok(Some(Plan {
            standbys: self.to.clone(),
            backoff: Backoff::new(Duration::from_millis(self.retry_ms), Duration::from_millis(self.retry_max_ms)),
            sync_timeout: Duration::from_millis(self.sync_timeout_ms),
            own,
            verify_every: self.verify_every,
        }))
    }
}

impl Plan {
    /// The protect request for `standby`: as `understudy protect --backup ADDR --backup-name
    /// NAME --backup-node ID` would send it from this host, with this backup's certificates,
    /// VM name and link timing (the standby is started with the same), other settings default.
    pub fn request(&self, standby: &PeerSpec) -> ProtectRequest {
        ProtectRequest {
            backup: standby.addr,
            backup_name: standby.name.clone(),
            certs: self.own.certs.clone(),
            name: self.own.name.clone(),
            vm_name: self.own.vm.clone(),
            verify_every: self.verify_every,
            heartbeat_ms: self.own.heartbeat_ms,
            detect_ms: self.own.detect_ms,
            backup_node: Some(standby.id),
            ..ProtectRequest::defaults(standby.addr)
        }
    }
}

/// Delays between rounds of attempts: `first`, doubling up to `max`; reset by [`Backoff::reset`].
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `first`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { first, max, next: first }
    }

    /// The delay before the next round; the one after doubles (up to the maximum).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Where re-protection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No standby answered yet: waiting before the next probe.
    Waiting,
    /// Protecting to a standby that answered, until its replica is consistent and recorded.
    Syncing,
    /// The group recorded the standby as the backup: done.
    Protected,
    /// Stopped before it was done (the process stops, or an operator protected or unprotected
    /// the VM by hand).
    Stopped,
}

impl Phase {
    /// Every phase, for the metrics' state set.
    pub const ALL: [&'static str; 4] = ["waiting", "syncing", "protected", "stopped"];

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Syncing => "syncing",
            Self::Protected => "protected",
            Self::Stopped => "stopped",
        }
    }
}

/// Re-protection's progress, kept by the node while it runs and after.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Where it stands.
    pub phase: Phase,
    /// The standby of the current (or last) attempt: `ID=NAME@HOST:PORT`.
    pub target: Option<String>,
    /// Attempts started (probes sent).
    pub attempts: u64,
    /// Attempts that failed (the standby did not answer, refused, or did not sync in time).
    pub failures: u64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the promotion that started it happened.
    pub since: Instant,
    /// When the next attempt starts (while waiting).
    pub next_attempt: Option<Instant>,
    /// From the promotion to the group recording the standby.
    pub took: Option<Duration>,
    /// The node the group confirmed as the backup during the current attempt.
    pub recorded: Option<NodeId>,
}

impl Progress {
    /// Starting now, after a promotion.
    pub fn new(now: Instant) -> Self {
        Self {
            phase: Phase::Waiting,
            target: None,
            attempts: 0,
            failures: 0,
            last_error: None,
            since: now,
            next_attempt: Some(now),
            took: None,
            recorded: None,
        }
    }

    /// For `status`.
    pub fn status(&self, now: Instant) -> ReprotectStatus {
        ReprotectStatus {
            state: self.phase,
            target: self.target.clone(),
            attempts: self.attempts,
            failures: self.failures,
            last_error: self.last_error.clone(),
            since_promotion_s: now.saturating_duration_since(self.since).as_secs_f64(),
            next_attempt_in_s: self.next_attempt.map(|t| t.saturating_duration_since(now).as_secs_f64()),
            took_s: self.took.map(|d| d.as_secs_f64()),
        }
    }
}

/// Re-protection in `status` (`reprotect`, on a promoted VM whose backup names standbys).
#[derive(Debug, Clone, Serialize)]
pub struct ReprotectStatus {
    /// waiting, syncing, protected or stopped.
    pub state: Phase,
    /// The standby of the current (or last) attempt.
    pub target: Option<String>,
    /// Attempts started.
    pub attempts: u64,
    /// Attempts that failed.
    pub failures: u64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Seconds since the promotion.
    pub since_promotion_s: f64,
    /// Seconds until the next attempt (while waiting).
    pub next_attempt_in_s: Option<f64>,
    /// Seconds from the promotion to the group recording the standby, once it did.
    pub took_s: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> PeerSpec {
        standby_arg(s).unwrap()
    }

    fn own() -> Own {
        Own {
            node: Some(2),
            peers: vec![peer("1=primary@10.0.0.1:7501"), peer("3=witness@10.0.0.3:7503")],
            arbiter_listen: Some("10.0.0.2:7502".parse().unwrap()),
            listen: "0.0.0.0:7400".parse().unwrap(),
            certs: "/etc/understudy/certs".into(),
            name: "backup".into(),
            vm: "web1".into(),
            heartbeat_ms: 10,
            detect_ms: 150,
        }
    }

    fn args(to: &[&str]) -> ReprotectArgs {
        ReprotectArgs {
            to: to.iter().map(|s| peer(s)).collect(),
            retry_ms: 500,
            retry_max_ms: 10_000,
            sync_timeout_ms: 60_000,
            verify_every: 0,
        }
    }

    fn refused(to: &[&str], own: Own) -> String {
        args(to).plan(own).unwrap_err().to_string()
    }

    #[test]
    fn a_standby_of_the_group_makes_a_protect_request_as_the_manual_one() {
        assert!(args(&[]).plan(own()).unwrap().is_none());
        let plan = args(&["1=primary@10.0.0.1:7400"]).plan(own()).unwrap().unwrap();
        let r = plan.request(&plan.standbys[0]);
        assert_eq!(r.backup, "10.0.0.1:7400".parse().unwrap());
        assert_eq!((r.backup_name.as_str(), r.name.as_str(), r.vm_name.as_str()), ("primary", "backup", "web1"));
        assert_eq!((r.backup_node, r.heartbeat_ms, r.detect_ms), (Some(1), 10, 150));
        assert_eq!(r.certs, PathBuf::from("/etc/understudy/certs"));
        let d = ProtectRequest::defaults(r.backup);
        assert_eq!(
            (r.epoch_min_ms, r.epoch_max_ms, r.degrade_after_ms),
            (d.epoch_min_ms, d.epoch_max_ms, d.degrade_after_ms)
        );
        crate::protect::validate(&r).unwrap();
    }

    #[test]
    fn bad_standbys_are_refused_naming_the_problem() {
        let e = refused(&["1=primry@10.0.0.1:7400"], own());
        assert_eq!(
            e,
            "--reprotect-to 1=primry@10.0.0.1:7400: unknown standby name \"primry\": node 1 is \"primary\" in \
             --arbiter-peer"
        );
        let e = refused(&["4=spare@10.0.0.4:7400"], own());
        assert!(e.contains("node 4 is not in --arbiter-peer (the group's voters are 1=primary, 3=witness)"), "{e}");
        let e = refused(&["2=backup@10.0.0.1:7400"], own());
        assert!(e.ends_with("node 2 is this process's own --arbiter-id"), "{e}");
        let e = refused(&["1=primary@127.0.0.1:7400"], own());
        assert!(e.contains("0.0.0.0:7400 is this process's own --listen address"), "{e}");
        let e = refused(&["1=primary@10.0.0.2:7502"], own());
        assert!(e.contains("10.0.0.2:7502 is this process's own --arbiter-listen address"), "{e}");
        let named_like_me =
            Own { peers: vec![peer("1=backup@10.0.0.1:7501"), peer("3=witness@10.0.0.3:7503")], ..own() };
        let e = refused(&["1=backup@10.0.0.1:7400"], named_like_me);
        assert!(e.contains("\"backup\" is this host's own certificate name"), "{e}");
        let e = refused(&["1=primary@10.0.0.1:7400", "1=primary@10.0.0.5:7400"], own());
        assert!(e.ends_with("node 1 is given twice"), "{e}");
        let e = refused(&["1=primary@10.0.0.1:7400"], Own { node: None, ..own() });
        assert!(e.starts_with("--reprotect-to needs arbitration"), "{e}");
        let slow = ReprotectArgs { retry_ms: 20_000, ..args(&["1=primary@10.0.0.1:7400"]) };
        assert!(slow.plan(own()).unwrap_err().to_string().contains("more than --reprotect-retry-max-ms"));
        assert!(standby_arg("1=10.0.0.1:7400").unwrap_err().contains("ID=NAME@HOST:PORT"));
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(500), ms(3000));
        let got: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(got, [ms(500), ms(1000), ms(2000), ms(3000), ms(3000)]);
        b.reset();
        assert_eq!(b.next_delay(), ms(500));
    }

    #[test]
    fn progress_reports_its_phase_and_timing() {
        let t0 = Instant::now();
        let mut p = Progress::new(t0);
        p.attempts = 2;
        p.failures = 1;
        p.next_attempt = Some(t0 + Duration::from_secs(2));
        let s = serde_json::to_value(p.status(t0 + Duration::from_secs(1))).unwrap();
        assert_eq!(s["state"], "waiting");
        assert_eq!((s["attempts"].as_u64(), s["failures"].as_u64()), (Some(2), Some(1)));
        assert_eq!(s["next_attempt_in_s"].as_f64(), Some(1.0));
        assert_eq!(s["since_promotion_s"].as_f64(), Some(1.0));
        assert!(s["took_s"].is_null());
        assert_eq!(Phase::ALL, [Phase::Waiting, Phase::Syncing, Phase::Protected, Phase::Stopped].map(Phase::name));
    }
}
