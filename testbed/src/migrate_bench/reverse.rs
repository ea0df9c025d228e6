//! Reverse checkpoints (issue 15): during post-copy the destination checkpoints the guest back
//! to the source in epochs. The destination logs their numbers once, when post-copy completes
//! (`reverse checkpoints stopped (WHY): ... epochs=N last_acked=N pause_us_p50=X ...`);
//! [`ReverseStats`] reads that line. Our post-copy modes run with them unless `--no-reverse`
//! (the `-noreverse` configurations); [`cost_rows`] sets each mode beside its `-noreverse`
//! twin: the cost goals (total time ≤ 1.1x without; pause p99 ≤ 1 ms at ~1,000 dirty
//! pages per epoch).

use super::table::{Stat, Summary, fmt_count, fmt_ms, fmt_stat, pair};
use super::{Config, Workload};
use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::fmt::Write as _;

/// The destination's line, logged when post-copy completed and the source gave its copy up.
pub const DEST_LINE: &str = "reverse checkpoints stopped (";

/// The cost goal: total migration time with reverse checkpoints at most this many times the
/// time without.
pub const GOAL_RATIO: f64 = 1.1;
/// The pause goal: reverse-checkpoint pause p99 at most this, µs (at ~1,000 dirty pages).
pub const GOAL_PAUSE_US: f64 = 1000.0;

/// The destination's reverse checkpoints of one migration.
#[derive(Clone, Debug, PartialEq)]
pub struct ReverseStats {
    /// Epochs checkpointed back to the source.
    pub epochs: u64,
    /// The last epoch the source acked.
    pub last_acked: u64,
    /// The guest's pause per epoch, µs (None without epochs: the destination reports 0).
    pub pause_us_p50: Option<f64>,
    pub pause_us_p99: Option<f64>,
    /// Pages the guest dirtied per epoch.
    pub dirty_pages_mean: Option<f64>,
    pub dirty_pages_p99: Option<f64>,
    /// Epoch shipped to the source's ack, µs.
    pub ack_us_p50: Option<f64>,
    pub ack_us_p99: Option<f64>,
}

/// `text` without its terminal escape sequences (ESC, then up to the first letter: tracing's
/// colours when the log was written to a terminal or without NO_COLOR).
fn without_escapes(text: &str) -> String {
    let mut parts = text.split('\x1b');
    let mut out = parts.next().unwrap_or_default().to_string();
    for p in parts {
        let end = p.find(|c: char| c.is_ascii_alphabetic()).map_or(p.len(), |i| i + 1);
        out.push_str(&p[end..]);
    }
    out
}

/// The value of `key=value` among `line`'s words.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

impl ReverseStats {
    /// The numbers of one `reverse checkpoints stopped (` line (escape sequences allowed).
    pub fn parse_line(line: &str) -> Result<Self> {
        let line = without_escapes(line);
        let int = |k: &str| -> Result<u64> {
            let v = field(&line, k).with_context(|| format!("no {k}= in the reverse checkpoints' line {line:?}"))?;
            v.parse().with_context(|| format!("{k}={v:?} is not a count in {line:?}"))
        };
        let epochs = int("epochs")?;
        let num = |k: &str| -> Result<Option<f64>> {
            let v = field(&line, k).with_context(|| format!("no {k}= in the reverse checkpoints' line {line:?}"))?;
            let x: f64 = v.parse().with_context(|| format!("{k}={v:?} is not a number in {line:?}"))?;
            // Without epochs the destination reports 0 for every quantile: no measurement.
            Ok((epochs > 0 && x.is_finite()).then_some(x))
        };
        Ok(ReverseStats {
            epochs,
            last_acked: int("last_acked")?,
            pause_us_p50: num("pause_us_p50")?,
            pause_us_p99: num("pause_us_p99")?,
            dirty_pages_mean: num("dirty_pages_mean")?,
            dirty_pages_p99: num("dirty_pages_p99")?,
            ack_us_p50: num("ack_us_p50")?,
            ack_us_p99: num("ack_us_p99")?,
        })
    }

    /// The last such line of a destination's log; None when there is none.
    pub fn from_log(log: &str) -> Result<Option<Self>> {
        log.lines().rev().find(|l| l.contains(DEST_LINE)).map(Self::parse_line).transpose()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "epochs": self.epochs, "last_acked": self.last_acked,
            "pause_us_p50": self.pause_us_p50, "pause_us_p99": self.pause_us_p99,
            "dirty_pages_mean": self.dirty_pages_mean, "dirty_pages_p99": self.dirty_pages_p99,
            "ack_us_p50": self.ack_us_p50, "ack_us_p99": self.ack_us_p99,
        })
    }

    /// For a run's line.
    pub fn describe(&self) -> String {
        let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.0}"));
        format!(
            "{} reverse epochs (last acked {}), pause p50 {} / p99 {} µs, dirty pages per epoch mean {} / p99 {}, \
             ack p50 {} / p99 {} µs",
            self.epochs,
            self.last_acked,
            f(self.pause_us_p50),
            f(self.pause_us_p99),
            f(self.dirty_pages_mean),
            f(self.dirty_pages_p99),
            f(self.ack_us_p50),
            f(self.ack_us_p99),
        )
    }
}

/// One workload's mode with reverse checkpoints beside the same mode without (`-noreverse`).
#[derive(Clone, Debug, PartialEq)]
pub struct CostRow {
    pub workload: Workload,
    /// The configuration with reverse checkpoints (`understudy postcopy`).
    pub config: Config,
    /// Completed / attempted runs, with and without.
    pub runs_with: (usize, usize),
    pub runs_without: (usize, usize),
    /// Total migration time over the completed runs, with and without.
    pub total_with: Option<Stat>,
    pub total_without: Option<Stat>,
    /// Completed runs with whose destination logged reverse checkpoints (a post-copy phase
    /// ran: `auto` may choose pre-copy, then its total says nothing of their cost).
    pub reverse_runs: usize,
    /// Per-run numbers of the runs with, over the runs that logged them.
    pub epochs: Option<Stat>,
    pub pause_us_p99: Option<Stat>,
    pub dirty_pages_mean: Option<Stat>,
    pub dirty_pages_p99: Option<Stat>,
}

impl CostRow {
    /// Median total with / median total without.
    pub fn ratio(&self) -> Option<f64> {
        let (w, wo) = (self.total_with?.median, self.total_without?.median);
        (wo > 0.0).then(|| w / wo)
    }

    pub fn to_json(&self) -> Value {
        let s = |x: Option<Stat>| x.map(|s| json!({"median": s.median, "min": s.min, "max": s.max}));
        json!({
            "workload": self.workload.name(), "config": self.config.to_string(),
            "completed_with": self.runs_with.0, "runs_with": self.runs_with.1,
            "completed_without": self.runs_without.0, "runs_without": self.runs_without.1,
            "total_ms_with": s(self.total_with), "total_ms_without": s(self.total_without),
            "ratio": self.ratio(), "ratio_goal": GOAL_RATIO, "reverse_runs": self.reverse_runs,
            "epochs": s(self.epochs), "pause_us_p99": s(self.pause_us_p99), "pause_us_goal": GOAL_PAUSE_US,
            "dirty_pages_mean": s(self.dirty_pages_mean), "dirty_pages_p99": s(self.dirty_pages_p99),
        })
    }
}

/// A row for every workload and configuration with reverse checkpoints whose `-noreverse`
/// twin has a row too, in the order of `rows`.
pub fn cost_rows(rows: &[Summary]) -> Vec<CostRow> {
    rows.iter()
        .filter_map(|with| {
            let twin = with.config.without_reverse()?;
            let without = rows.iter().find(|r| r.workload == with.workload && r.config == twin)?;
            Some(CostRow {
                workload: with.workload,
                config: with.config.clone(),
                runs_with: (with.completed, with.runs),
                runs_without: (without.completed, without.runs),
                total_with: with.total_ms,
                total_without: without.total_ms,
                reverse_runs: with.reverse.runs,
                epochs: with.reverse.epochs,
                pause_us_p99: with.reverse.pause_us_p99,
                dirty_pages_mean: with.reverse.dirty_pages_mean,
                dirty_pages_p99: with.reverse.dirty_pages_p99,
            })
        })
        .collect()
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**not met**" }
}

/// The cost goals' table: a line per workload and mode (empty without rows).
pub fn cost_table(rows: &[CostRow]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "| workload | mode | total ms with reverse checkpoints / without, median | with / without (goal ≤ 1.1x) \
         | reverse epochs, median | reverse pause p99 µs, median [min-max] (goal ≤ 1 ms) \
         | dirty pages per epoch, mean / p99, median |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let total = |t: Option<Stat>, (done, runs): (usize, usize)| {
            let m = t.map_or("-".to_string(), |t| fmt_ms(t.median));
            if done < runs { format!("{m} ({done}/{runs} completed)") } else { m }
        };
        let ratio = match r.ratio() {
            None => "-".into(),
            Some(x) if r.reverse_runs == 0 => format!("{x:.2}x: no post-copy with reverse checkpoints ran"),
            Some(x) => format!("{x:.2}x: {}", verdict(x <= GOAL_RATIO)),
        };
        let epochs = match r.epochs {
            None => "-".into(),
            Some(e) if r.reverse_runs < r.runs_with.0 => {
                format!("{} (in {} of {} runs)", fmt_count(e.median), r.reverse_runs, r.runs_with.0)
            }
            Some(e) => fmt_count(e.median),
        };
        let pause = match r.pause_us_p99 {
            None => "- (no reverse epochs)".into(),
            Some(p) => format!("{}: {}", fmt_stat(Some(p), fmt_count), verdict(p.median <= GOAL_PAUSE_US)),
        };
        let dirty = pair(r.dirty_pages_mean, r.dirty_pages_p99, fmt_count).unwrap_or_else(|| "-".into());
        let mode = r.config.our_mode().unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} | {mode} | {} / {} | {ratio} | {epochs} | {pause} | {dirty} |",
            r.workload.name(),
            total(r.total_with, r.runs_with),
            total(r.total_without, r.runs_without),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "2026-12-06T16:50:01.123456Z  INFO node::runtime: reverse checkpoints stopped (the source \
        gave its copy up at epoch 31): held output released, output flows straight again frames=3 bytes=420 \
        epochs=24 last_acked=31 pause_us_p50=212.5 pause_us_p99=871.0 dirty_pages_mean=1012.25 \
        dirty_pages_p99=1830.0 ack_us_p50=640.0 ack_us_p99=2210.0";

    #[test]
    fn the_destinations_line_is_read_with_or_without_colours() {
        let want = ReverseStats {
            epochs: 24,
            last_acked: 31,
            pause_us_p50: Some(212.5),
            pause_us_p99: Some(871.0),
            dirty_pages_mean: Some(1012.25),
            dirty_pages_p99: Some(1830.0),
            ack_us_p50: Some(640.0),
            ack_us_p99: Some(2210.0),
        };
        assert_eq!(ReverseStats::parse_line(LINE).unwrap(), want);
        // tracing's colours: the level, the target dimmed, each field name italic, `=` dimmed.
        let coloured = "\x1b[2m2026-12-06T16:50:01.123456Z\x1b[0m \x1b[32m INFO\x1b[0m \x1b[2mnode::runtime\x1b[0m\x1b[2m:\x1b[0m \
            reverse checkpoints stopped (the source gave its copy up at epoch 31): held output released \
            \x1b[3mframes\x1b[0m\x1b[2m=\x1b[0m3 \x1b[3mepochs\x1b[0m\x1b[2m=\x1b[0m24 \x1b[3mlast_acked\x1b[0m\x1b[2m=\x1b[0m31 \
            \x1b[3mpause_us_p50\x1b[0m\x1b[2m=\x1b[0m212.5 \x1b[3mpause_us_p99\x1b[0m\x1b[2m=\x1b[0m871.0 \
            \x1b[3mdirty_pages_mean\x1b[0m\x1b[2m=\x1b[0m1012.25 \x1b[3mdirty_pages_p99\x1b[0m\x1b[2m=\x1b[0m1830.0 \
            \x1b[3mack_us_p50\x1b[0m\x1b[2m=\x1b[0m640.0 \x1b[3mack_us_p99\x1b[0m\x1b[2m=\x1b[0m2210.0";
        assert_eq!(ReverseStats::parse_line(coloured).unwrap(), want);
        let log = format!("a INFO migration: idle -> connecting\n{LINE}\nb INFO MIGRATED\n");
        assert_eq!(ReverseStats::from_log(&log).unwrap(), Some(want.clone()));
        assert_eq!(ReverseStats::from_log("x INFO reverse checkpoints starting source=1").unwrap(), None);
        assert_eq!(
            want.describe(),
            "24 reverse epochs (last acked 31), pause p50 212 / p99 871 µs, dirty pages per epoch mean 1012 / p99 \
             1830, ack p50 640 / p99 2210 µs"
        );
        assert_eq!(want.to_json()["dirty_pages_p99"], 1830.0);
    }

    #[test]
    fn a_line_without_epochs_has_no_quantiles_and_a_bad_line_is_an_error() {
        let none = "t INFO reverse checkpoints stopped (x): held frames=0 bytes=0 epochs=0 last_acked=5 \
            pause_us_p50=0.0 pause_us_p99=0.0 dirty_pages_mean=0.0 dirty_pages_p99=0.0 ack_us_p50=0.0 ack_us_p99=0.0";
        let s = ReverseStats::parse_line(none).unwrap();
        assert_eq!((s.epochs, s.last_acked, s.pause_us_p99, s.ack_us_p50), (0, 5, None, None));
        assert_eq!(s.to_json()["pause_us_p99"], Value::Null);
        let e = ReverseStats::parse_line(&LINE.replace("pause_us_p99", "pause_p99")).unwrap_err().to_string();
        assert!(e.starts_with("no pause_us_p99= in the reverse checkpoints' line"), "{e}");
        let e = ReverseStats::from_log(&LINE.replace("epochs=24", "epochs=many")).unwrap_err().to_string();
        assert!(e.starts_with("epochs=\"many\" is not a count"), "{e}");
        // A word that merely ends in a key is not the key.
        assert_eq!(field("xepochs=3 epochs=4", "epochs"), Some("4"));
    }
}
