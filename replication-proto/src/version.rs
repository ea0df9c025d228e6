//! The versioning rule: a build speaks [`PROTOCOL_VERSION`] and accepts it and the version
//! before it ([`oldest_accepted`]), so primary and backup can be upgraded one at a time. Each
//! `Hello` carries the speaker's version and the oldest it accepts; the session runs at the lower
//! of the two versions if both sides accept it, and is refused otherwise. Version 1 is the first,
//! so today the accepted range is `1..=1`.

use thiserror::Error;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;

/// Something a protocol version may or may not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feature {
    /// Migration sessions, their messages (`SwitchOver`, `PageMap`, `Handover`, `Resumed`,
    /// `Complete`), the `Hello` flags byte (which side sends checkpoints) and reverse checkpoints.
    Migration,
    /// The content-hash dedup page encoding (a page sent as a reference to an earlier page).
    Dedup,
}

impl Feature {
    /// The first protocol version that has this feature.
    pub const fn since(self) -> u16 {
        match self {
            Self::Migration | Self::Dedup => 2,
        }
    }

    /// Whether a session running at `version` has this feature.
    pub const fn in_version(self, version: u16) -> bool {
        version >= self.since()
    }
}

/// The oldest version a build speaking `current` accepts: the previous one (never below 1).
pub const fn oldest_accepted(current: u16) -> u16 {
    if current > 1 { current - 1 } else { 1 }
}

/// A peer whose version range does not meet ours.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VersionError {
    /// No version is accepted by both sides.
    #[error("peer speaks protocol version {peer}; this build speaks {current} and accepts {oldest}..={current}")]
    Unsupported {
        /// The peer's version.
        peer: u16,
        /// This build's version.
        current: u16,
        /// The oldest version this build accepts.
        oldest: u16,
    },
}

/// The version a session with a peer speaking `peer` (and accepting `peer_oldest..=peer`) runs
/// at, for this build.
pub fn negotiate(peer: u16, peer_oldest: u16) -> Result<u16, VersionError> {
    negotiate_with(PROTOCOL_VERSION, peer, peer_oldest)
}

/// The rule for a build speaking `current`: the session runs at `min(current, peer)` when that
/// version is accepted by both sides (so a build accepts its own and the previous version, and a
/// newer peer that accepts ours speaks ours).
pub fn negotiate_with(current: u16, peer: u16, peer_oldest: u16) -> Result<u16, VersionError> {
    let oldest = oldest_accepted(current);
    let session = current.min(peer);
    if session >= oldest && session >= peer_oldest && peer_oldest <= peer {
        Ok(session)
    } else {
        Err(VersionError::Unsupported { peer, current, oldest })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_and_previous_are_accepted() {
        // A build speaking 2 talks to 2 and to 1.
        assert_eq!(negotiate_with(2, 2, 1), Ok(2));
        assert_eq!(negotiate_with(2, 1, 1), Ok(1));
        // A build speaking 1 talks to a newer peer that still accepts 1 (rolling upgrade).
        assert_eq!(negotiate_with(1, 2, 1), Ok(1));
        // Two versions apart: refused from both ends.
        assert!(negotiate_with(3, 1, 1).is_err());
        assert!(negotiate_with(1, 3, 2).is_err());
        assert!(negotiate_with(2, 0, 0).is_err());
        let ours = oldest_accepted(PROTOCOL_VERSION);
        assert_eq!(negotiate(PROTOCOL_VERSION, ours), Ok(PROTOCOL_VERSION));
    }

    #[test]
    fn version_2_adds_migration_and_dedup_and_still_accepts_1() {
        assert_eq!(PROTOCOL_VERSION, 2);
        assert_eq!(oldest_accepted(PROTOCOL_VERSION), 1);
        for f in [Feature::Migration, Feature::Dedup] {
            assert!(!f.in_version(1));
            assert!(f.in_version(2));
            assert!(f.in_version(PROTOCOL_VERSION));
        }
        // A build of today meets a build of version 1: the session runs at 1.
        assert_eq!(negotiate(1, 1), Ok(1));
    }

    #[test]
    fn refusal_names_both_versions() {
        let err = negotiate_with(2, 7, 6).unwrap_err();
        assert_eq!(err.to_string(), "peer speaks protocol version 7; this build speaks 2 and accepts 1..=2");
    }
}
