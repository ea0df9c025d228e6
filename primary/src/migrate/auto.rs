//! `--mode auto`: which way to move the guest, from what the source measured
//! (`docs/migration.md`, "The auto rule").
//!
//! Sans-IO: numbers in, a choice and its reason out. The source measures the link (bytes a
//! second the destination acknowledged), the guest's dirty rate (pages a second, from the dirty
//! log) and what is still to move (pages the destination does not hold), predicts the total time
//! and the downtime of finishing by pre-copy and of switching to post-copy now, and picks:
//!
//! - **pre-copy** when it converges (the dirty rate is under the link rate), its predicted
//!   downtime fits the target and its predicted total is at most [`PRECOPY_SLACK`] times that of
//!   post-copy: pre-copy never leaves the guest running on two hosts' memory (a destination
//!   death during post-copy loses it until reverse checkpoints exist) and the guest never waits
//!   for a page after the resume;
//! - **post-copy now** otherwise (called `postcopy` before round 0 ends, `hybrid` after).
//!
//! The same numbers decide again after each round: a pre-copy that stops converging (a round
//! dirtied at least [`STALL_SHARE`] of the previous round's pages, or the stopping rule gave up
//! for a reason other than "the downtime fits") switches to post-copy instead of stopping the
//! guest for a long copy.

/// Pre-copy is chosen while its predicted total is at most this times post-copy's.
pub const PRECOPY_SLACK: f64 = 1.5;

/// A round that dirtied at least this share of the previous round's pages does not converge.
pub const STALL_SHARE: f64 = 0.9;

/// What the source knows when it decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// The link: bytes a second the destination took (acknowledged), after encoding.
    pub link_bytes_s: f64,
    /// Pages the guest dirtied a second.
    pub dirty_pages_s: f64,
    /// Bytes a page costs on the link (after encoding).
    pub bytes_per_page: f64,
    /// Pages the destination does not hold now (the rest of round 0 and what was dirtied).
    pub pages_left: u64,
    /// Pages the guest keeps writing (the writable working set), if known: bounds what a round
    /// can dirty.
    pub working_set_pages: Option<u64>,
    /// The encoded `VmState`, bytes.
    pub state_bytes: u64,
    /// Round trip, seconds.
    pub rtt_s: f64,
    /// The downtime target, seconds.
    pub downtime_target_s: f64,
}

/// A predicted finish.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Predicted {
    /// From now to every page at the destination, ms.
    pub total_ms: f64,
    /// Guest paused, ms.
    pub downtime_ms: f64,
    /// Pre-copy only: whether its rounds shrink.
    pub converges: bool,
    /// Pre-copy only: rounds until the stop-and-copy.
    pub rounds: u32,
}

/// The choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Go on with pre-copy rounds (or stop and copy now if the downtime fits).
    Precopy,
    /// Pause and switch to post-copy now.
    PostcopyNow,
}

/// Most rounds a prediction counts (the stopping rule's default bound).
const MAX_ROUNDS: u32 = 30;

fn secs_for(m: &Measured, pages: f64) -> f64 {
    pages * m.bytes_per_page / m.link_bytes_s.max(1.0)
}

/// Finishing by pre-copy from here: rounds that each send what the previous one let the guest
/// dirty, until the stop-and-copy fits the target (or the rounds stop shrinking).
pub fn predict_precopy(m: &Measured) -> Predicted {
    let cap = m.working_set_pages.map_or(f64::INFINITY, |w| w as f64);
    let target_pages =
        ((m.downtime_target_s - 1.5 * m.rtt_s).max(0.0) * m.link_bytes_s / m.bytes_per_page.max(1.0)).max(0.0);
    let mut left = m.pages_left as f64;
    let mut total = 0.0;
    let mut rounds = 0;
    let mut converges = true;
    while left > target_pages && rounds < MAX_ROUNDS {
        let t = secs_for(m, left);
        total += t;
        let next = (m.dirty_pages_s * t).min(cap);
        rounds += 1;
        if next >= left * STALL_SHARE {
            converges = false;
            left = next;
            break;
        }
        left = next;
    }
    if left > target_pages {
        converges = false;
    }
    let downtime = secs_for(m, left) + m.state_bytes as f64 / m.link_bytes_s.max(1.0) + 1.5 * m.rtt_s;
    Predicted { total_ms: (total + downtime) * 1e3, downtime_ms: downtime * 1e3, converges, rounds }
}

/// Switching to post-copy now: the state goes while paused, then every missing page moves once
/// at the link's rate (the guest's faults take their pages out of turn, not more of them).
pub fn predict_postcopy(m: &Measured) -> Predicted {
    let downtime = m.state_bytes as f64 / m.link_bytes_s.max(1.0) + 1.5 * m.rtt_s;
    let total = downtime + secs_for(m, m.pages_left as f64);
    Predicted { total_ms: total * 1e3, downtime_ms: downtime * 1e3, converges: true, rounds: 0 }
}

/// Decides, and says why with the numbers behind it.
pub fn choose(m: &Measured) -> (Choice, String) {
    let pre = predict_precopy(m);
    let post = predict_postcopy(m);
    let dirty_mb_s = m.dirty_pages_s * m.bytes_per_page / 1e6;
    let link_mb_s = m.link_bytes_s / 1e6;
    let numbers = format!(
        "dirty {dirty_mb_s:.0} MB/s ({:.0} pages/s) against a link of {link_mb_s:.0} MB/s, {} pages to move; \
         pre-copy: {} in {} more rounds, total ~{:.0} ms, downtime ~{:.1} ms; post-copy now: total ~{:.0} ms, downtime ~{:.1} ms",
        m.dirty_pages_s,
        m.pages_left,
        if pre.converges { "converges" } else { "does not converge" },
        pre.rounds,
        pre.total_ms,
        pre.downtime_ms,
        post.total_ms,
        post.downtime_ms,
    );
    let target_ms = m.downtime_target_s * 1e3;
    if !pre.converges {
        return (Choice::PostcopyNow, format!("post-copy: pre-copy would not converge; {numbers}"));
    }
    if pre.downtime_ms > target_ms.max(post.downtime_ms) {
        return (
            Choice::PostcopyNow,
            format!("post-copy: pre-copy's downtime would exceed the {target_ms:.0} ms target; {numbers}"),
        );
    }
    if pre.total_ms > PRECOPY_SLACK * post.total_ms {
        return (
            Choice::PostcopyNow,
            format!("post-copy: pre-copy would take over {PRECOPY_SLACK}x as long; {numbers}"),
        );
    }
    (Choice::Precopy, format!("pre-copy: it converges within the {target_ms:.0} ms target; {numbers}"))
}

/// Whether a round that dirtied `now` pages after one that dirtied `before` still converges.
pub fn still_converging(before: u64, now: u64) -> bool {
    (now as f64) < before as f64 * STALL_SHARE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(link_mb_s: f64, dirty_pages_s: f64, left: u64) -> Measured {
        Measured {
            link_bytes_s: link_mb_s * 1e6,
            dirty_pages_s,
            bytes_per_page: 4100.0,
            pages_left: left,
            working_set_pages: None,
            state_bytes: 20_000,
            rtt_s: 0.000_2,
            downtime_target_s: 0.005,
        }
    }

    /// A guest that dirties a sixth of the link converges: pre-copy, with a downtime
    /// under the target and rounds that shrink geometrically.
    #[test]
    fn a_slow_writer_migrates_by_precopy() {
        let x = m(250.0, 10_000.0, 60_000);
        let p = predict_precopy(&x);
        assert!(p.converges && p.downtime_ms <= 5.0 && p.rounds >= 2, "{p:?}");
        let (c, why) = choose(&x);
        assert_eq!(c, Choice::Precopy, "{why}");
        assert!(why.starts_with("pre-copy:") && why.contains("pages/s"), "{why}");
    }

    /// A guest dirtying more than the link carries never converges: post-copy now, and the
    /// reason names the rates.
    #[test]
    fn a_writer_faster_than_the_link_goes_postcopy() {
        let x = m(250.0, 200_000.0, 131_072);
        assert!(!predict_precopy(&x).converges);
        let (c, why) = choose(&x);
        assert_eq!(c, Choice::PostcopyNow);
        assert!(why.contains("would not converge") && why.contains("820 MB/s"), "{why}");
        let post = predict_postcopy(&x);
        assert!(post.downtime_ms < 1.0 && post.total_ms > 2_000.0, "{post:?}");
    }

    /// Converging but slowly (dirty rate near the link): the rounds add up to far more than
    /// moving the rest once, so post-copy wins on time.
    #[test]
    fn slow_convergence_loses_to_postcopy_on_time() {
        let x = m(250.0, 52_000.0, 40_000);
        let pre = predict_precopy(&x);
        let post = predict_postcopy(&x);
        assert!(pre.total_ms > PRECOPY_SLACK * post.total_ms, "{pre:?} {post:?}");
        assert_eq!(choose(&x).0, Choice::PostcopyNow);
    }

    /// A working set bounds what a round can dirty: an idle-ish guest with a tiny working set
    /// converges even at a high dirty rate.
    #[test]
    fn a_small_working_set_converges_despite_the_rate() {
        let mut x = m(250.0, 500_000.0, 10_000);
        x.working_set_pages = Some(200);
        let p = predict_precopy(&x);
        assert!(p.converges && p.downtime_ms <= 5.0, "{p:?}");
        assert_eq!(choose(&x).0, Choice::Precopy);
    }

    /// Nothing left and no rate: no division by zero, pre-copy (a stop-and-copy of the state).
    #[test]
    fn degenerate_numbers_stay_finite() {
        let mut x = m(0.0, 0.0, 0);
        x.link_bytes_s = 0.0;
        let p = predict_precopy(&x);
        assert!(p.total_ms.is_finite() && p.downtime_ms.is_finite());
        assert!(still_converging(100, 50) && !still_converging(100, 95));
    }
}
