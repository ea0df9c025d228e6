//! The rate limit of refusal warnings: a misconfigured or hostile peer must not flood the log.
//! Used by the QUIC link (refused connections) and the arbiter (refused raft messages).

use std::time::{Duration, Instant};

/// At most this many refusals are logged at warn level per window (the rest at debug).
pub const REFUSAL_WARNINGS: u32 = 10;
/// The window of [`REFUSAL_WARNINGS`].
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// Counts refusals and says which ones to log at warn level.
#[derive(Debug, Clone)]
pub struct RefusalLog {
    window_start: Instant,
    warned: u32,
    suppressed: u64,
}

impl RefusalLog {
    pub fn new(now: Instant) -> Self {
        Self { window_start: now, warned: 0, suppressed: 0 }
    }

    /// Whether a refusal at `now` is logged at warn level; if so, with how many were not since.
    pub fn warn(&mut self, now: Instant) -> Option<u64> {
        if now.saturating_duration_since(self.window_start) >= REFUSAL_WINDOW {
            self.window_start = now;
            self.warned = 0;
        }
        if self.warned < REFUSAL_WARNINGS {
            self.warned += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_warnings_are_rate_limited() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new(t0);
        let warned: Vec<_> = (0..15).map(|_| log.warn(t0)).collect();
        assert_eq!(warned.iter().filter(|w| **w == Some(0)).count(), 10);
        assert_eq!(warned.iter().filter(|w| w.is_none()).count(), 5);
        assert_eq!(log.warn(t0 + REFUSAL_WINDOW - Duration::from_millis(1)), None);
        assert_eq!(log.warn(t0 + REFUSAL_WINDOW), Some(6), "the next warning counts the ones not logged");
        assert_eq!(log.warn(t0 + REFUSAL_WINDOW), Some(0));
    }
}
