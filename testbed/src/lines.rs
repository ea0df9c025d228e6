//! Parsers for the guest's output lines (formats in docs/guest.md).

use guest_kv::checksum::{COUNTER_SUM_INIT, counter_step};

/// `seq=<n> sum=<16 hex>` → (n, sum).
pub fn parse_counter(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("seq=")?;
    let (n, sum) = rest.split_once(" sum=")?;
    if sum.len() != 16 {
        return None;
    }
    Some((n.parse().ok()?, u64::from_str_radix(sum, 16).ok()?))
}

/// The complete lines of `text`: up to its last newline (the guest may be printing the last).
pub fn whole_lines(text: &str) -> &str {
    &text[..text.rfind('\n').map_or(0, |i| i + 1)]
}

/// The `seq=<n> sum=<hex>` lines of a counter guest's output (whole lines only), in order.
pub fn counter_lines(text: &str) -> Vec<(u64, u64)> {
    whole_lines(text).lines().filter_map(|l| parse_counter(l.trim())).collect()
}

/// The last sequence number a counter guest printed (0 before the first).
pub fn last_seq(text: &str) -> u64 {
    counter_lines(text).last().map_or(0, |l| l.0)
}

/// `dirty gen=<g> pages=<p> errors=<e>` → (g, p, e).
pub fn parse_dirty_progress(line: &str) -> Option<(u64, u64, u64)> {
    let mut it = line.strip_prefix("dirty ")?.split(' ');
    let mut field = |name: &str| it.next()?.strip_prefix(name)?.strip_prefix('=')?.parse().ok();
    Some((field("gen")?, field("pages")?, field("errors")?))
}

/// `dirty prog t=<guest ms> pages=<total written>` (the `dirty` workload's `report_ms=`
/// lines) → (t, pages); anything else, a cut line included, → None.
pub fn parse_dirty_prog(line: &str) -> Option<(u64, u64)> {
    let (t, pages) = line.strip_prefix("dirty prog t=")?.split_once(" pages=")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(t) || !digits(pages) {
        return None;
    }
    Some((t.parse().ok()?, pages.parse().ok()?))
}

/// Checks consecutive counter lines: numbers strictly consecutive from `first`'s, each sum
/// the fold of every number up to it. Returns the last (n, sum).
#[derive(Debug, Default)]
pub struct CounterChecker {
    last: Option<(u64, u64)>,
}

impl CounterChecker {
    /// A checker expecting the sequence to start at 1.
    pub fn new() -> Self {
        CounterChecker::default()
    }

    /// Feeds one `seq=` line; an error names the first inconsistency.
    pub fn check(&mut self, line: &str) -> Result<(u64, u64), String> {
        let (n, sum) = parse_counter(line).ok_or_else(|| format!("not a counter line: {line:?}"))?;
        let (prev_n, prev_sum) = self.last.unwrap_or((0, COUNTER_SUM_INIT));
        if n != prev_n + 1 {
            return Err(format!("seq={n} follows seq={prev_n}: gap or repeat"));
        }
        let want = counter_step(prev_sum, n);
        if sum != want {
            return Err(format!("seq={n}: sum {sum:016x}, expected {want:016x}"));
        }
        self.last = Some((n, sum));
        Ok((n, sum))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_kv::checksum::counter_sum;

    #[test]
    fn counter_lines() {
        let l1 = format!("seq=1 sum={:016x}", counter_sum(1));
        let l2 = format!("seq=2 sum={:016x}", counter_sum(2));
        assert_eq!(parse_counter(&l1), Some((1, counter_sum(1))));
        assert_eq!(parse_counter("seq=1 sum=12"), None);
        assert_eq!(parse_counter("ready"), None);
        let mut c = CounterChecker::new();
        assert!(c.check(&l1).is_ok());
        assert!(c.check(&l1).unwrap_err().contains("repeat"));
        assert!(c.check(&l2).is_ok());
        let mut c = CounterChecker::new();
        assert!(c.check(&l2).is_err(), "must start at 1");
        let mut c = CounterChecker::new();
        c.check(&l1).unwrap();
        assert!(c.check("seq=2 sum=0000000000000000").unwrap_err().contains("expected"));
    }

    #[test]
    fn counter_output() {
        let text =
            format!("ready\r\nseq=1 sum={:016x}\r\nseq=2 sum={:016x}\nseq=3 sum=00", counter_sum(1), counter_sum(2));
        assert_eq!(
            super::counter_lines(&text),
            [(1, counter_sum(1)), (2, counter_sum(2))],
            "the cut last line is left out"
        );
        assert_eq!(last_seq(&text), 2);
        assert_eq!(last_seq("ready\n"), 0);
        assert_eq!(whole_lines("a\nb"), "a\n");
        assert_eq!(whole_lines("a"), "");
    }

    #[test]
    fn dirty_lines() {
        assert_eq!(parse_dirty_progress("dirty gen=3 pages=1200 errors=0"), Some((3, 1200, 0)));
        assert_eq!(parse_dirty_progress("dirty error page=5"), None);
        assert_eq!(parse_dirty_progress("dirty gen=x pages=1 errors=0"), None);
        // The fine progress lines are not mistaken for the once-a-second ones, nor back.
        assert_eq!(parse_dirty_progress("dirty prog t=10 pages=200"), None);
        assert_eq!(parse_dirty_prog("dirty gen=3 pages=1200 errors=0"), None);
        assert_eq!(parse_dirty_prog("dirty prog t=10 pages=200"), Some((10, 200)));
        assert_eq!(parse_dirty_prog("dirty prog t=123456 pages=98765432"), Some((123_456, 98_765_432)));
        // Cut or garbled (a line split across a migration's two serial outputs).
        for bad in [
            "dirty prog t=10 pages=",
            "dirty prog t=10",
            "prog t=10 pages=200",
            "dirty prog t= pages=1",
            "dirty prog t=1 pages=2 x",
            "dirty prog t=-1 pages=2",
            "dirty prog t=1 pages=+2",
        ] {
            assert_eq!(parse_dirty_prog(bad), None, "{bad:?}");
        }
    }
}
