//! What a backup does when its replication session reports on the primary (the session is the
//! failure detector: see docs/failover.md): the decision, without the I/O that carries it out.

use backup::server::{PrimaryLost, Verdict};

/// What to do about one report on the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossAction {
    /// The primary spoke again: withdraw a takeover request, if any (`report_primary_alive`).
    Withdraw,
    /// Ask the arbitration group for activity: `report_primary_gone` when its process is gone,
    /// else `report_primary_dead`; the grant (an agent event) promotes.
    AskGroup {
        /// The primary's process is gone (not merely silent).
        gone: bool,
        /// Only suspected (the session goes on).
        suspect: bool,
    },
    /// Nothing: without arbitration, a suspicion or a recovery is only logged (by the server);
    /// the end of the session decides.
    Nothing,
    /// The primary is lost and nothing rules out a second copy: leave it to the operator
    /// (`understudy promote`).
    LeaveToOperator,
    /// The primary is lost and auto-promotion is on: promote now.
    Promote,
}

/// Decides what to do about `lost`, with or without an arbitration agent.
pub fn on_primary_lost(lost: &PrimaryLost, arbitration: bool, auto_promote: bool) -> LossAction {
    match (lost.verdict, arbitration) {
        (Verdict::Heard, true) => LossAction::Withdraw,
        (verdict, true) => LossAction::AskGroup { gone: lost.process_gone, suspect: verdict == Verdict::Suspect },
        (Verdict::Heard | Verdict::Suspect, false) => LossAction::Nothing,
        (Verdict::Lost, false) if auto_promote => LossAction::Promote,
        (Verdict::Lost, false) => LossAction::LeaveToOperator,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn lost(verdict: Verdict, process_gone: bool) -> PrimaryLost {
        PrimaryLost {
            verdict,
            epoch: 9,
            reason: "test".into(),
            process_gone,
            last_commit: None,
            noticed: Instant::now(),
        }
    }

    #[test]
    fn with_arbitration_the_group_decides() {
        for auto in [false, true] {
            assert_eq!(on_primary_lost(&lost(Verdict::Heard, false), true, auto), LossAction::Withdraw);
            assert_eq!(
                on_primary_lost(&lost(Verdict::Suspect, false), true, auto),
                LossAction::AskGroup { gone: false, suspect: true }
            );
            assert_eq!(
                on_primary_lost(&lost(Verdict::Lost, true), true, auto),
                LossAction::AskGroup { gone: true, suspect: false }
            );
        }
    }

    #[test]
    fn without_arbitration_only_a_lost_primary_counts_and_only_auto_promote_promotes() {
        for auto in [false, true] {
            assert_eq!(on_primary_lost(&lost(Verdict::Heard, false), false, auto), LossAction::Nothing);
            assert_eq!(on_primary_lost(&lost(Verdict::Suspect, false), false, auto), LossAction::Nothing);
        }
        assert_eq!(on_primary_lost(&lost(Verdict::Lost, true), false, false), LossAction::LeaveToOperator);
        assert_eq!(on_primary_lost(&lost(Verdict::Lost, false), false, true), LossAction::Promote);
    }
}
