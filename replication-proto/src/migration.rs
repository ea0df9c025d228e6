//! The messages a migration session adds (protocol version 2), their payload layouts and
//! decoders. `docs/migration.md` tells the phases and who sends what; `docs/protocol.md` has the
//! bytes.
//!
//! A migration session pairs a `MigrationSource` with a `MigrationDestination`. Pre-copy rounds
//! are ordinary epochs (round 0 a baseline); then:
//!
//! - [`SwitchOver`] (source to destination): the guest is stopped at the source; epoch `epoch`
//!   (already sent) carries the final `VmState`; `mode` says whether the destination now holds
//!   every page ([`SwitchMode::Complete`]: pre-copy, stop-and-copy) or only those of the map that
//!   follows in `map_frames` [`PageMap`] frames ([`SwitchMode::PostCopy`]: post-copy, hybrid);
//! - [`Handover`] (source to destination): the source gives up its copy for good; only now may a
//!   pre-copy destination run the guest, and only now may a post-copy destination release the
//!   output it holds back for reverse checkpoints;
//! - [`Resumed`] (destination to source): the guest runs at the destination;
//! - [`Complete`] (destination to source): every page is at the destination (post-copy is over).
//!
//! Page requests and responses (`PageRequest`, `PageResponse`, kinds 11 and 12, in protocol
//! version 1 already) carry post-copy's demand paging; a `PageResponse` with id 0 carries pages the
//! source pushes unasked.

use crate::limits::{MAX_MAP_FRAMES, MAX_PAYLOAD_LEN};
use crate::wire::{Reader, WireError, put_u32, put_u64};

/// What the destination holds after a [`SwitchOver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SwitchMode {
    /// Pre-copy or stop-and-copy: the epochs up to the switch-over's hold every page and the
    /// state. The destination runs the guest once the source hands over ([`Handover`]).
    Complete = 1,
    /// Post-copy or hybrid: the destination holds the pages of the [`PageMap`] (their content as
    /// of the switch-over epoch) and the state; it resumes at once and gets every other page by
    /// request or push.
    PostCopy = 2,
    /// [`SwitchMode::PostCopy`] with reverse checkpoints: the destination also checkpoints the
    /// running guest back to the source (a reverse session it opens,
    /// [`reverse_start`]) and holds the guest's network output until the source acknowledged
    /// the epoch that produced it, until the source gives its copy up ([`Handover`]).
    PostCopyReverse = 3,
}

impl SwitchMode {
    /// The mode with wire code `code`.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Complete),
            2 => Some(Self::PostCopy),
            3 => Some(Self::PostCopyReverse),
            _ => None,
        }
    }

    /// Whether the destination resumes at once and fetches pages (post-copy, with or without
    /// reverse checkpoints).
    pub fn is_postcopy(self) -> bool {
        matches!(self, Self::PostCopy | Self::PostCopyReverse)
    }
}

/// The source stopped the guest: the switch-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchOver {
    /// The epoch that carries the final state (sent before this message).
    pub epoch: u64,
    /// Whether the destination holds everything or goes on in post-copy.
    pub mode: SwitchMode,
    /// [`PageMap`] frames that follow (0 for [`SwitchMode::Complete`]).
    pub map_frames: u32,
    /// Pages the map holds in all (a check on the frames put together).
    pub held_pages: u64,
}

/// A run of pages: `count` pages from `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PfnRange {
    /// First page frame number.
    pub first: u64,
    /// Pages in the run (at least 1).
    pub count: u32,
}

/// Part of the map of pages the destination holds at a post-copy switch-over: those the source
/// sent and the guest did not dirty since. Pages not in the map must be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageMap {
    /// The switch-over epoch.
    pub epoch: u64,
    /// Frame number within the map, from 0.
    pub seq: u32,
    /// Ascending, disjoint runs, each above every run of the frames before.
    pub held: Vec<PfnRange>,
}

impl PageMap {
    /// In the map of held pages a destination sends after a reconnect
    /// ([`crate::Receiver::send_held`]), whether this frame is the last: every frame but the
    /// last is full ([`MAP_RANGES_PER_FRAME`] runs), and the last is not (it is empty when the
    /// runs fill whole frames, or when the destination holds nothing). (The source's map at a
    /// switch-over needs no such rule: [`SwitchOver::map_frames`] counts its frames.)
    pub fn ends_held_map(&self) -> bool {
        self.held.len() < MAP_RANGES_PER_FRAME
    }
}

/// The source gives up its copy of the guest for good: from now on it never resumes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handover {
    /// Pre-copy: the switch-over epoch the destination acknowledged. Post-copy with reverse
    /// checkpoints: the last reverse checkpoint the source acknowledged (0 for none).
    pub epoch: u64,
}

/// The guest runs at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// The switch-over epoch whose state it resumed from.
    pub epoch: u64,
    /// CPU time the destination's process spent up to the resume, its vCPUs left out, µs (for
    /// the source's report; 0 if unknown).
    pub cpu_us: u64,
    /// The destination process's peak resident set at the resume, bytes (0 if unknown).
    pub peak_rss_bytes: u64,
}

/// Every page is at the destination: post-copy is over. With the destination's numbers of it,
/// for the source's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Complete {
    /// Pages the destination holds (the layout's page count: a check).
    pub pages: u64,
    /// Faults that needed a page from the source.
    pub faults: u64,
    /// Fault raised to page placed, median, µs.
    pub fault_us_p50: u32,
    /// The same, 99th percentile, µs.
    pub fault_us_p99: u32,
    /// Time threads waited on those faults, summed, µs.
    pub blocked_us: u64,
    /// Pages placed because they were asked for.
    pub demanded: u64,
    /// Pages placed from the source's pushes.
    pub pushed: u64,
}

pub(crate) fn put_complete(out: &mut Vec<u8>, c: &Complete) {
    put_u64(out, c.pages);
    put_u64(out, c.faults);
    put_u32(out, c.fault_us_p50);
    put_u32(out, c.fault_us_p99);
    put_u64(out, c.blocked_us);
    put_u64(out, c.demanded);
    put_u64(out, c.pushed);
}

pub(crate) fn get_complete(r: &mut Reader<'_>) -> Result<Complete, WireError> {
    Ok(Complete {
        pages: r.u64("pages")?,
        faults: r.u64("faults")?,
        fault_us_p50: r.u32("fault_us_p50")?,
        fault_us_p99: r.u32("fault_us_p99")?,
        blocked_us: r.u64("blocked_us")?,
        demanded: r.u64("demanded")?,
        pushed: r.u64("pushed")?,
    })
}

/// Most runs one [`PageMap`] frame can carry.
pub const MAP_RANGES_PER_FRAME: usize = (MAX_PAYLOAD_LEN - 16) / 12;

/// Why a migration message body does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BodyError {
    Wire(WireError),
    Invalid(&'static str, u64),
}

impl From<WireError> for BodyError {
    fn from(e: WireError) -> Self {
        Self::Wire(e)
    }
}

pub(crate) fn put_switch_over(out: &mut Vec<u8>, s: &SwitchOver) {
    put_u64(out, s.epoch);
    out.push(s.mode as u8);
    put_u32(out, s.map_frames);
    put_u64(out, s.held_pages);
}

pub(crate) fn get_switch_over(r: &mut Reader<'_>) -> Result<SwitchOver, BodyError> {
    let epoch = r.u64("epoch")?;
    if epoch == 0 {
        return Err(BodyError::Invalid("epoch", 0));
    }
    let mode = r.u8("mode")?;
    let mode = SwitchMode::from_code(mode).ok_or(BodyError::Invalid("mode", u64::from(mode)))?;
    let map_frames = r.u32("map_frames")?;
    let held_pages = r.u64("held_pages")?;
    if mode == SwitchMode::Complete && (map_frames != 0 || held_pages != 0) {
        return Err(BodyError::Invalid("map_frames", u64::from(map_frames)));
    }
    if map_frames > MAX_MAP_FRAMES {
        return Err(BodyError::Invalid("map_frames", u64::from(map_frames)));
    }
    Ok(SwitchOver { epoch, mode, map_frames, held_pages })
}

pub(crate) fn put_page_map(out: &mut Vec<u8>, m: &PageMap) {
    put_u64(out, m.epoch);
    put_u32(out, m.seq);
    put_u32(out, m.held.len() as u32);
    put_runs(out, &m.held);
}

/// Writes runs as `first_pfn u64, count u32` each (the layout of `PageMap` and `PageRequest`).
pub(crate) fn put_runs(out: &mut Vec<u8>, runs: &[PfnRange]) {
    for r in runs {
        put_u64(out, r.first);
        put_u32(out, r.count);
    }
}

/// Reads `count` runs that fill the rest of `r`: each of one page or more, ascending and
/// disjoint. The count is checked against the bytes there before anything is allocated.
pub(crate) fn get_runs(r: &mut Reader<'_>, count: usize) -> Result<Vec<PfnRange>, BodyError> {
    if count.checked_mul(12) != Some(r.remaining()) {
        return Err(BodyError::Invalid("range count", count as u64));
    }
    let mut runs = Vec::with_capacity(count);
    let mut next_free = 0u64;
    for i in 0..count {
        let first = r.u64("range first_pfn")?;
        let n = r.u32("range count")?;
        let end = first.checked_add(u64::from(n));
        if n == 0 || end.is_none() || (i > 0 && first < next_free) {
            return Err(BodyError::Invalid("range first_pfn", first));
        }
        next_free = end.unwrap_or(u64::MAX);
        runs.push(PfnRange { first, count: n });
    }
    Ok(runs)
}

pub(crate) fn get_page_map(r: &mut Reader<'_>) -> Result<PageMap, BodyError> {
    let epoch = r.u64("epoch")?;
    if epoch == 0 {
        return Err(BodyError::Invalid("epoch", 0));
    }
    let seq = r.u32("seq")?;
    let count = r.u32("range count")? as usize;
    if count > MAP_RANGES_PER_FRAME {
        return Err(BodyError::Invalid("range count", count as u64));
    }
    let held = get_runs(r, count)?;
    Ok(PageMap { epoch, seq, held })
}

/// Splits the runs of held pages into [`PageMap`] frames for a switch-over at `epoch` and
/// returns the [`SwitchOver`] that announces them with the frames. `held` must be ascending and
/// disjoint.
pub fn switch_over(epoch: u64, mode: SwitchMode, held: &[PfnRange]) -> (SwitchOver, Vec<PageMap>) {
    let maps: Vec<PageMap> = match mode {
        SwitchMode::Complete => Vec::new(),
        SwitchMode::PostCopy | SwitchMode::PostCopyReverse => held
            .chunks(MAP_RANGES_PER_FRAME)
            .enumerate()
            .map(|(seq, c)| PageMap { epoch, seq: seq as u32, held: c.to_vec() })
            .collect(),
    };
    let held_pages = maps.iter().flat_map(|m| &m.held).map(|r| u64::from(r.count)).sum();
    (SwitchOver { epoch, mode, map_frames: maps.len() as u32, held_pages }, maps)
}

/// Splits the runs of pages a destination holds into the [`PageMap`] frames it sends after a
/// reconnect (see [`PageMap::ends_held_map`]): full frames, then one that is not full (empty
/// if need be).
pub fn held_map(epoch: u64, held: &[PfnRange]) -> Vec<PageMap> {
    let mut maps: Vec<PageMap> = held
        .chunks(MAP_RANGES_PER_FRAME)
        .enumerate()
        .map(|(seq, c)| PageMap { epoch, seq: seq as u32, held: c.to_vec() })
        .collect();
    if maps.last().is_none_or(|m| !m.ends_held_map()) {
        maps.push(PageMap { epoch, seq: maps.len() as u32, held: Vec::new() });
    }
    maps
}

/// The first run of `runs` that is empty, outside the layout `index` describes (its first or last
/// page), or not above the run before it; `None` when they make a valid map.
pub(crate) fn bad_run(index: &crate::message::PageIndex, runs: &[PfnRange]) -> Option<PfnRange> {
    let mut next_free = 0u64;
    for (i, r) in runs.iter().enumerate() {
        let last = r.first.checked_add(u64::from(r.count).saturating_sub(1));
        let inside = r.count > 0 && index.index(r.first).is_some() && last.is_some_and(|l| index.index(l).is_some());
        if !inside || (i > 0 && r.first < next_free) {
            return Some(*r);
        }
        next_free = r.first + u64::from(r.count);
    }
    None
}

/// The position a reverse session's series starts at, for a post-copy switch-over at
/// `switch_over` (the forward session's lineage and the switch-over epoch N: the source's sender
/// has it as its lineage and the epoch it switched over at, the destination's receiver as the
/// position of the switch-over checkpoint it committed). Both sides compute it alone, and get the
/// same, without a round trip: the lineage's origin is the XXH64 (seed 0) of the 32 bytes
/// `"reverse\0"`, forward origin, forward baseline, N (u64 little-endian each), its baseline is
/// N, and the position's epoch is N. So the reverse series' first epoch is N + 1 (a delta on the
/// guest as it was at N, which the source holds), and its numbers never meet the forward
/// session's lineage.
///
/// Hand the result to [`crate::Sender::start_at`] (destination) and [`crate::Receiver::start_at`]
/// (source) before their first connect.
pub fn reverse_start(switch_over: crate::message::Position) -> crate::message::Position {
    use crate::message::{Lineage, Position};
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(b"reverse\0");
    b[8..16].copy_from_slice(&switch_over.lineage.origin.to_le_bytes());
    b[16..24].copy_from_slice(&switch_over.lineage.baseline.to_le_bytes());
    b[24..].copy_from_slice(&switch_over.epoch.to_le_bytes());
    let n = switch_over.epoch;
    Position { lineage: Lineage { origin: crate::hash::xxh64(&b), baseline: n }, epoch: n }
}

/// A starting position ([`crate::Sender::start_at`], [`crate::Receiver::start_at`]) that cannot be
/// taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// Only a reverse session starts at an agreed position: the destination sends, the source
    /// receives.
    #[error(
        "a {role} {side} does not start at an agreed position (only a reverse session does: a migration destination sends, its source receives)"
    )]
    Role {
        /// Our role.
        role: crate::message::Role,
        /// `"sending checkpoints"` or `"receiving checkpoints"`.
        side: &'static str,
    },
    /// The series is under way (connected, or a checkpoint submitted or handed over): a start is
    /// set before the first connect.
    #[error("starting position given after the series began ({what})")]
    Begun {
        /// What happened already.
        what: &'static str,
    },
    /// The position's epoch is 0, beyond the epoch limit a `Hello` may announce, or below its
    /// lineage's baseline.
    #[error(
        "starting position at epoch {epoch} (lineage baseline {baseline}) is not within 1..={limit} and at or above its baseline"
    )]
    Epoch {
        /// The epoch.
        epoch: u64,
        /// The lineage's baseline.
        baseline: u64,
        /// [`crate::limits::MAX_ANNOUNCED_EPOCH`].
        limit: u64,
    },
}

/// Checks a starting position's numbers (see [`StartError::Epoch`]).
pub(crate) fn check_start(p: &crate::message::Position) -> Result<(), StartError> {
    let limit = crate::limits::MAX_ANNOUNCED_EPOCH;
    if p.epoch == 0 || p.epoch > limit || p.lineage.baseline > p.epoch {
        return Err(StartError::Epoch { epoch: p.epoch, baseline: p.lineage.baseline, limit });
    }
    Ok(())
}

/// Runs of `pfns` (ascending, distinct), for a [`PageMap`].
pub fn runs(pfns: impl IntoIterator<Item = u64>) -> Vec<PfnRange> {
    let mut out: Vec<PfnRange> = Vec::new();
    for pfn in pfns {
        match out.last_mut() {
            Some(r) if r.first + u64::from(r.count) == pfn && r.count < u32::MAX => r.count += 1,
            _ => out.push(PfnRange { first: pfn, count: 1 }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_over_splits_a_large_map_into_frames() {
        // Every other page of a big guest: the worst case for runs.
        let n = MAP_RANGES_PER_FRAME + 10;
        let held = runs((0..n as u64).map(|i| 2 * i));
        assert_eq!(held.len(), n);
        let (s, maps) = switch_over(9, SwitchMode::PostCopy, &held);
        assert_eq!(s.map_frames, 2);
        assert_eq!(s.held_pages, n as u64);
        assert_eq!(maps[0].held.len(), MAP_RANGES_PER_FRAME);
        assert_eq!(maps[1].seq, 1);
        let mut out = Vec::new();
        put_page_map(&mut out, &maps[0]);
        assert!(out.len() <= MAX_PAYLOAD_LEN, "a full map frame fits a frame: {}", out.len());
        let (s, maps) = switch_over(9, SwitchMode::Complete, &held);
        assert_eq!((s.map_frames, s.held_pages, maps.len()), (0, 0, 0));
    }

    #[test]
    fn a_held_map_ends_with_a_frame_that_is_not_full() {
        let full = runs((0..MAP_RANGES_PER_FRAME as u64).map(|i| 2 * i));
        let maps = held_map(4, &full);
        assert_eq!(maps.len(), 2);
        assert!(!maps[0].ends_held_map() && maps[1].ends_held_map() && maps[1].held.is_empty());
        assert_eq!((maps[1].seq, maps[1].epoch), (1, 4));
        let maps = held_map(4, &full[..3]);
        assert_eq!(maps.len(), 1);
        assert!(maps[0].ends_held_map() && maps[0].held.len() == 3);
        let maps = held_map(4, &[]);
        assert_eq!(maps, [PageMap { epoch: 4, seq: 0, held: Vec::new() }]);
    }

    #[test]
    fn runs_merge_neighbours() {
        assert_eq!(
            runs([1, 2, 3, 7, 9, 10]),
            [PfnRange { first: 1, count: 3 }, PfnRange { first: 7, count: 1 }, PfnRange { first: 9, count: 2 }]
        );
        assert!(runs([]).is_empty());
    }

    #[test]
    fn bad_bodies_are_refused() {
        let mut out = Vec::new();
        put_switch_over(&mut out, &SwitchOver { epoch: 3, mode: SwitchMode::Complete, map_frames: 1, held_pages: 0 });
        assert!(matches!(get_switch_over(&mut Reader::new(&out)), Err(BodyError::Invalid("map_frames", 1))));
        let mut out = Vec::new();
        put_page_map(
            &mut out,
            &PageMap { epoch: 3, seq: 0, held: vec![PfnRange { first: 5, count: 2 }, PfnRange { first: 6, count: 1 }] },
        );
        assert!(matches!(get_page_map(&mut Reader::new(&out)), Err(BodyError::Invalid("range first_pfn", 6))));
        // A count that the payload does not hold is refused before allocating.
        let mut out = Vec::new();
        put_u64(&mut out, 3);
        put_u32(&mut out, 0);
        put_u32(&mut out, u32::MAX);
        assert!(matches!(get_page_map(&mut Reader::new(&out)), Err(BodyError::Invalid("range count", _))));
    }
}
