//! Medians over runs and the markdown table.

use super::{Config, Outcome, RunResult, Workload};
use crate::harness::stats::median;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Median, smallest and largest of some runs' values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// [`Stat`] of the finite values.
pub fn stat(values: &[f64]) -> Option<Stat> {
    let median = median(values)?;
    let finite = values.iter().copied().filter(|x| x.is_finite());
    Some(Stat {
        median,
        min: finite.clone().fold(f64::INFINITY, f64::min),
        max: finite.fold(f64::NEG_INFINITY, f64::max),
    })
}

/// One row of the table: one workload and configuration over its runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub workload: Workload,
    pub config: Config,
    /// Runs attempted (not skipped).
    pub runs: usize,
    pub completed: usize,
    pub not_converged: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Over the completed runs.
    pub total_ms: Option<Stat>,
    pub downtime_ms: Option<Stat>,
    pub bytes: Option<Stat>,
    pub wall_ms: Option<Stat>,
    pub paused_ms: Option<Stat>,
    /// Bytes sent before the cancel, over the runs that did not converge.
    pub bytes_not_converged: Option<Stat>,
    /// W3: over every run the client finished.
    pub outage_ms: Option<Stat>,
    pub baseline_gap_ms: Option<Stat>,
    pub lost_writes: Option<u64>,
    /// QEMU post-copy: runs that asked for it, runs where a post-copy phase ran, when it was asked.
    pub postcopy_requested: usize,
    pub postcopy_ran: usize,
    pub postcopy_at_ms: Option<Stat>,
    /// Post-copy's numbers over the completed runs that report them (issue 14).
    pub faults: Option<Stat>,
    pub fault_us_p50: Option<Stat>,
    pub fault_us_p99: Option<Stat>,
    pub pages_pushed: Option<Stat>,
    pub pages_demanded: Option<Stat>,
    pub vcpu_blocked_ms: Option<Stat>,
    pub switchover_round: Option<Stat>,
    /// Auto: each mode it chose, with its count.
    pub chosen: BTreeMap<String, usize>,
    /// Reverse checkpoints' numbers over the completed runs that logged them (issue 15).
    pub reverse: ReverseSummary,
    /// Completed runs whose guest did not go on correctly at the destination.
    pub guest_broken: usize,
    /// Our stop reasons, QEMU's remarks: each distinct note with its count.
    pub notes: BTreeMap<String, usize>,
}

/// Each of [`super::reverse::ReverseStats`]' numbers over some runs (the medians of the
/// runs' p50s, of their p99s, ...).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReverseSummary {
    /// Runs whose destination logged them (a post-copy phase ran with reverse checkpoints).
    pub runs: usize,
    pub epochs: Option<Stat>,
    pub pause_us_p50: Option<Stat>,
    pub pause_us_p99: Option<Stat>,
    pub dirty_pages_mean: Option<Stat>,
    pub dirty_pages_p99: Option<Stat>,
    pub ack_us_p50: Option<Stat>,
    pub ack_us_p99: Option<Stat>,
}

impl ReverseSummary {
    fn of(runs: &[&RunResult]) -> Self {
        let all: Vec<&super::reverse::ReverseStats> = runs.iter().filter_map(|r| r.migrated.reverse.as_ref()).collect();
        let s = |f: &dyn Fn(&super::reverse::ReverseStats) -> Option<f64>| {
            stat(&all.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
        };
        ReverseSummary {
            runs: all.len(),
            epochs: s(&|r| Some(r.epochs as f64)),
            pause_us_p50: s(&|r| r.pause_us_p50),
            pause_us_p99: s(&|r| r.pause_us_p99),
            dirty_pages_mean: s(&|r| r.dirty_pages_mean),
            dirty_pages_p99: s(&|r| r.dirty_pages_p99),
            ack_us_p50: s(&|r| r.ack_us_p50),
            ack_us_p99: s(&|r| r.ack_us_p99),
        }
    }
}

/// Rows in the order of `workloads` × `configs`, each over the matching results.
pub fn summarize(results: &[RunResult], workloads: &[Workload], configs: &[Config]) -> Vec<Summary> {
    let mut rows = Vec::new();
    for &w in workloads {
        for c in configs {
            let runs: Vec<&RunResult> = results.iter().filter(|r| r.workload == w && &r.config == c).collect();
            if runs.is_empty() {
                continue;
            }
            let done: Vec<&RunResult> =
                runs.iter().copied().filter(|r| r.migrated.outcome == Outcome::Completed).collect();
            let vals = |rs: &[&RunResult], f: &dyn Fn(&RunResult) -> Option<f64>| -> Vec<f64> {
                rs.iter().filter_map(|r| f(r)).collect()
            };
            let count = |p: &dyn Fn(&Outcome) -> bool| runs.iter().filter(|r| p(&r.migrated.outcome)).count();
            let stuck: Vec<&RunResult> =
                runs.iter().copied().filter(|r| r.migrated.outcome == Outcome::DidNotConverge).collect();
            let mut notes = BTreeMap::new();
            for r in &runs {
                for n in &r.migrated.notes {
                    *notes.entry(n.clone()).or_insert(0) += 1;
                }
            }
            let skipped = count(&|o| matches!(o, Outcome::Skipped(_)));
            let lost: Vec<u64> = runs.iter().filter_map(|r| r.lost_writes).collect();
            let pc =
                |f: &dyn Fn(&super::PostcopyStats) -> Option<f64>| stat(&vals(&done, &|r| f(&r.migrated.postcopy)));
            let mut chosen = BTreeMap::new();
            for m in done.iter().filter_map(|r| r.migrated.postcopy.chosen_mode.clone()) {
                *chosen.entry(m).or_insert(0) += 1;
            }
            rows.push(Summary {
                workload: w,
                config: c.clone(),
                runs: runs.len() - skipped,
                completed: done.len(),
                not_converged: stuck.len(),
                failed: count(&|o| matches!(o, Outcome::Failed(_))),
                skipped,
                total_ms: stat(&vals(&done, &|r| r.migrated.total_ms)),
                downtime_ms: stat(&vals(&done, &|r| r.migrated.downtime_ms)),
                bytes: stat(&vals(&done, &|r| r.migrated.bytes.map(|b| b as f64))),
                wall_ms: stat(&vals(&done, &|r| r.migrated.wall_ms)),
                paused_ms: stat(&vals(&done, &|r| r.migrated.paused_ms)),
                bytes_not_converged: stat(&vals(&stuck, &|r| r.migrated.bytes.map(|b| b as f64))),
                outage_ms: stat(&vals(&runs, &|r| r.outage_ms)),
                baseline_gap_ms: stat(&vals(&runs, &|r| r.baseline_gap_ms)),
                postcopy_requested: runs.iter().filter(|r| r.migrated.postcopy_requested_ms.is_some()).count(),
                postcopy_ran: runs.iter().filter(|r| r.migrated.postcopy_ran == Some(true)).count(),
                postcopy_at_ms: stat(&vals(&runs, &|r| r.migrated.postcopy_requested_ms)),
                lost_writes: (!lost.is_empty()).then(|| lost.iter().sum()),
                faults: pc(&|p| p.faults.map(|x| x as f64)),
                fault_us_p50: pc(&|p| p.fault_us_p50),
                fault_us_p99: pc(&|p| p.fault_us_p99),
                pages_pushed: pc(&|p| p.pages_pushed.map(|x| x as f64)),
                pages_demanded: pc(&|p| p.pages_demanded.map(|x| x as f64)),
                vcpu_blocked_ms: pc(&|p| p.vcpu_blocked_ms),
                switchover_round: pc(&|p| p.switchover_round.map(f64::from)),
                chosen,
                reverse: ReverseSummary::of(&done),
                guest_broken: done.iter().filter(|r| r.guest_ok == Some(false)).count(),
                notes,
            });
        }
    }
    rows
}

/// Milliseconds: one decimal below 10, none above.
pub fn fmt_ms(x: f64) -> String {
    if x.abs() < 10.0 { format!("{x:.1}") } else { format!("{x:.0}") }
}

/// Bytes as MB (10^6): one decimal below 100 MB; GB (10^9) with one decimal from 1 GB.
pub fn fmt_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 100e6 {
        format!("{:.0} MB", b / 1e6)
    } else {
        format!("{:.1} MB", b / 1e6)
    }
}

/// `median [min-max]` (just the value for one run).
pub fn fmt_stat(s: Option<Stat>, f: fn(f64) -> String) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.min == s.max => f(s.median),
        Some(s) => format!("{} [{}-{}]", f(s.median), f(s.min), f(s.max)),
    }
}

/// A whole number (a count), no decimals.
pub fn fmt_count(x: f64) -> String {
    format!("{x:.0}")
}

/// A column shown only when some row has it: its header and its cell.
struct Optional {
    header: &'static str,
    cell: fn(&Summary) -> Option<String>,
}

/// Post-copy's columns (issue 14), each only where a row reports it.
const POSTCOPY_COLUMNS: [Optional; 6] = [
    Optional { header: "faults, median", cell: |r| r.faults.map(|s| fmt_count(s.median)) },
    Optional {
        header: "fault µs p50, median [min-max]",
        cell: |r| r.fault_us_p50.map(|s| fmt_stat(Some(s), fmt_count)),
    },
    Optional {
        header: "fault µs p99, median [min-max]",
        cell: |r| r.fault_us_p99.map(|s| fmt_stat(Some(s), fmt_count)),
    },
    Optional { header: "pages pushed / demanded, median", cell: |r| pair(r.pages_pushed, r.pages_demanded, fmt_count) },
    Optional {
        header: "vCPU blocked ms, median [min-max]",
        cell: |r| r.vcpu_blocked_ms.map(|s| fmt_stat(Some(s), fmt_ms)),
    },
    Optional {
        header: "switch-over round / chosen mode",
        cell: |r| {
            let round = r.switchover_round.map(|s| format!("round {}", fmt_stat(Some(s), fmt_count)));
            let chosen = (!r.chosen.is_empty())
                .then(|| r.chosen.iter().map(|(m, n)| format!("{m} ×{n}")).collect::<Vec<_>>().join(", "));
            match (round, chosen) {
                (None, None) => None,
                (a, b) => Some([a, b].into_iter().flatten().collect::<Vec<_>>().join("; ")),
            }
        },
    },
];

/// `a / b` of two medians, or None when neither is there.
pub fn pair(a: Option<Stat>, b: Option<Stat>, f: fn(f64) -> String) -> Option<String> {
    (a.is_some() || b.is_some()).then(|| {
        let m = |s: Option<Stat>| s.map_or("-".into(), |s| f(s.median));
        format!("{} / {}", m(a), m(b))
    })
}

/// Reverse checkpoints' columns (issue 15), each only where a row reports it.
const REVERSE_COLUMNS: [Optional; 4] = [
    Optional { header: "reverse epochs, median", cell: |r| r.reverse.epochs.map(|s| fmt_count(s.median)) },
    Optional {
        header: "reverse pause µs p50 / p99, median",
        cell: |r| pair(r.reverse.pause_us_p50, r.reverse.pause_us_p99, fmt_count),
    },
    Optional {
        header: "reverse dirty pages per epoch mean / p99, median",
        cell: |r| pair(r.reverse.dirty_pages_mean, r.reverse.dirty_pages_p99, fmt_count),
    },
    Optional {
        header: "reverse ack µs p50 / p99, median",
        cell: |r| pair(r.reverse.ack_us_p50, r.reverse.ack_us_p99, fmt_count),
    },
];

/// The markdown table of `rows`; the W3 columns only when a W3 row is there, each post-copy
/// and reverse-checkpoint column only when a row has a value for it.
pub fn markdown_table(rows: &[Summary]) -> String {
    let kv = rows.iter().any(|r| r.workload.kv());
    let extra: Vec<&Optional> = POSTCOPY_COLUMNS
        .iter()
        .chain(&REVERSE_COLUMNS)
        .filter(|c| rows.iter().any(|r| (c.cell)(r).is_some()))
        .collect();
    let mut s = String::new();
    s.push_str(
        "| workload | configuration | converged | total ms, median [min-max] | downtime ms, median [min-max] \
         | paused ms (STOP→RESUME), median [min-max] | migrate → running at destination ms, median | sent, median |",
    );
    if kv {
        s.push_str(" client outage during the migration ms, median [min-max] | longest reply otherwise ms, median | lost writes |");
    }
    for c in &extra {
        let _ = write!(s, " {} |", c.header);
    }
    s.push_str(" notes |\n|---|---|---|---|---|---|---|---|");
    if kv {
        s.push_str("---|---|---|");
    }
    s.push_str(&"---|".repeat(extra.len()));
    s.push_str("---|\n");
    for r in rows {
        let mut notes: Vec<String> = Vec::new();
        if r.skipped > 0 {
            notes.push(format!("{} skipped", r.skipped));
        }
        if r.not_converged > 0 {
            notes.push(format!(
                "{} did not converge (cancelled at the time bound; median {} sent by then)",
                r.not_converged,
                r.bytes_not_converged.map_or("-".into(), |b| fmt_bytes(b.median))
            ));
        }
        if r.failed > 0 {
            notes.push(format!("{} failed", r.failed));
        }
        if r.guest_broken > 0 {
            notes.push(format!("**guest broken after {} run(s)**", r.guest_broken));
        }
        if r.postcopy_requested > 0 {
            notes.push(format!(
                "post-copy requested in {}/{} (median at {} ms), a post-copy phase ran in {}",
                r.postcopy_requested,
                r.runs,
                r.postcopy_at_ms.map_or("-".into(), |s| fmt_ms(s.median)),
                r.postcopy_ran
            ));
        }
        for (n, count) in &r.notes {
            notes.push(if *count > 1 { format!("{n} ×{count}") } else { n.clone() });
        }
        let _ = write!(
            s,
            "| {} | {} | {}/{} | {} | {} | {} | {} | {} |",
            r.workload.name(),
            r.config,
            r.completed,
            r.runs,
            fmt_stat(r.total_ms, fmt_ms),
            fmt_stat(r.downtime_ms, fmt_ms),
            fmt_stat(r.paused_ms, fmt_ms),
            r.wall_ms.map_or("-".into(), |w| fmt_ms(w.median)),
            r.bytes.map_or("-".into(), |b| fmt_bytes(b.median)),
        );
        if kv {
            let _ = write!(
                s,
                " {} | {} | {} |",
                if r.workload.kv() { fmt_stat(r.outage_ms, fmt_ms) } else { String::new() },
                r.baseline_gap_ms.map_or(String::new(), |b| fmt_ms(b.median)),
                r.lost_writes.map_or(String::new(), |l| l.to_string()),
            );
        }
        for c in &extra {
            let _ = write!(s, " {} |", (c.cell)(r).unwrap_or_default());
        }
        let _ = writeln!(s, " {} |", notes.join("; "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::{Migrated, PostcopyStats, QemuConfig};
    use super::*;
    use serde_json::Value;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[1.0, f64::NAN, 9.0, 5.0]), Some(5.0));
        assert_eq!(stat(&[58.0, 52.0, 55.0]), Some(Stat { median: 55.0, min: 52.0, max: 58.0 }));
        assert_eq!(stat(&[]), None);
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_ms(2.345), "2.3");
        assert_eq!(fmt_ms(52.6), "53");
        assert_eq!(fmt_bytes(30_123_456.0), "30.1 MB");
        assert_eq!(fmt_bytes(210_397_801.0), "210 MB");
        assert_eq!(fmt_bytes(7.2e9), "7.2 GB");
        assert_eq!(fmt_bytes(17.31e9), "17.3 GB");
        assert_eq!(fmt_bytes(999e6), "999 MB");
        assert_eq!(fmt_stat(Some(Stat { median: 55.0, min: 52.0, max: 58.0 }), fmt_ms), "55 [52-58]");
        assert_eq!(fmt_stat(Some(Stat { median: 3.0, min: 3.0, max: 3.0 }), fmt_ms), "3.0");
        assert_eq!(fmt_stat(None, fmt_ms), "-");
    }

    fn result(w: Workload, c: &Config, run: usize, outcome: Outcome, total: f64, down: f64, bytes: u64) -> RunResult {
        let mut r = RunResult::new(
            w,
            c,
            run,
            Migrated {
                outcome,
                total_ms: Some(total),
                downtime_ms: Some(down),
                bytes: Some(bytes),
                wall_ms: Some(total + 2.0),
                paused_ms: Some(down + 1.0),
                postcopy_requested_ms: None,
                postcopy_ran: None,
                notes: Vec::new(),
                postcopy: PostcopyStats::default(),
                started_unix_s: None,
                markers: Vec::new(),
                reverse: None,
                detail: Value::Null,
            },
        );
        r.guest_ok = Some(true);
        r
    }

    #[test]
    fn summaries_take_medians_of_completed_runs_and_count_the_rest() {
        let best = Config::Qemu(QemuConfig::Best);
        let default = Config::Qemu(QemuConfig::Default);
        let ours = Config::Ours("precopy".into());
        let mut results = vec![
            result(Workload::W1, &best, 1, Outcome::Completed, 58.0, 3.0, 30_000_000),
            result(Workload::W1, &default, 1, Outcome::DidNotConverge, 30_000.0, 0.0, 4_000_000_000),
            result(Workload::W1, &best, 2, Outcome::Completed, 52.0, 2.0, 32_000_000),
            result(Workload::W1, &default, 2, Outcome::Completed, 700.0, 14.0, 126_000_000),
            result(Workload::W1, &best, 3, Outcome::Failed("x".into()), 1.0, 1.0, 1),
            result(Workload::W1, &default, 3, Outcome::DidNotConverge, 30_000.0, 0.0, 5_000_000_000),
        ];
        results[2].guest_ok = Some(false);
        results[3].migrated.notes = vec!["a note".into()];
        results[3].migrated.postcopy_requested_ms = Some(400.0);
        results[3].migrated.postcopy_ran = Some(true);
        let mut kv = result(Workload::W3, &ours, 1, Outcome::Completed, 20.0, 1.5, 5_000_000);
        kv.outage_ms = Some(12.5);
        kv.baseline_gap_ms = Some(3.0);
        kv.lost_writes = Some(0);
        kv.migrated.notes = vec!["stop: downtime fits".into()];
        let mut kv2 = kv.clone();
        kv2.run = 2;
        kv2.outage_ms = Some(20.5);
        results.extend([kv, kv2]);
        let rows = summarize(&results, &[Workload::W1, Workload::W3], &[default.clone(), best.clone(), ours.clone()]);
        assert_eq!(rows.len(), 3, "no row for W3 qemu and W1 ours: they have no results");
        let (d, b, o) = (&rows[0], &rows[1], &rows[2]);
        assert_eq!((d.config.clone(), b.config.clone(), o.config.clone()), (default, best, ours));
        assert_eq!((d.runs, d.completed, d.not_converged, d.failed), (3, 1, 2, 0));
        assert_eq!(d.total_ms, Some(Stat { median: 700.0, min: 700.0, max: 700.0 }));
        assert_eq!(d.bytes_not_converged.map(|s| s.median), Some(4.5e9));
        assert_eq!((b.runs, b.completed, b.failed, b.guest_broken), (3, 2, 1, 1));
        assert_eq!(b.total_ms, Some(Stat { median: 55.0, min: 52.0, max: 58.0 }));
        assert_eq!(b.downtime_ms.map(|s| s.median), Some(2.5));
        assert_eq!(b.wall_ms.map(|s| s.median), Some(57.0));
        assert_eq!(o.outage_ms, Some(Stat { median: 16.5, min: 12.5, max: 20.5 }));
        assert_eq!(o.lost_writes, Some(0));

        let t = markdown_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(
            lines[0].contains("client outage during the migration ms")
                && lines[1].matches('|').count() == lines[0].matches('|').count()
        );
        assert_eq!(
            lines[2],
            "| W1 | qemu-default | 1/3 | 700 | 14 | 15 | 702 | 126 MB |  |  |  | 2 did not converge (cancelled at the time bound; median 4.5 GB sent by then); post-copy requested in 1/3 (median at 400 ms), a post-copy phase ran in 1; a note |"
        );
        assert_eq!(
            lines[3],
            "| W1 | qemu-best | 2/3 | 55 [52-58] | 2.5 [2.0-3.0] | 3.5 [3.0-4.0] | 57 | 31.0 MB |  |  |  | 1 failed; **guest broken after 1 run(s)** |"
        );
        assert_eq!(
            lines[4],
            "| W3 | understudy precopy | 2/2 | 20 | 1.5 | 2.5 | 22 | 5.0 MB | 16 [12-20] | 3.0 | 0 | stop: downtime fits ×2 |"
        );
        let no_kv = markdown_table(&rows[..2]);
        assert!(!no_kv.contains("outage") && no_kv.lines().nth(2).unwrap().ends_with("ran in 1; a note |"));
    }

    #[test]
    fn postcopy_columns_only_where_a_row_has_them() {
        let ours = |m: &str| Config::Ours(m.into());
        let mut pc = result(Workload::W2, &ours("postcopy"), 1, Outcome::Completed, 500.0, 2.0, 600_000_000);
        pc.migrated.postcopy = PostcopyStats {
            faults: Some(900),
            fault_us_p50: Some(95.4),
            fault_us_p99: Some(640.0),
            pages_pushed: Some(130_000),
            pages_demanded: Some(900),
            vcpu_blocked_ms: Some(120.0),
            postcopy_ms: Some(450.0),
            ..PostcopyStats::default()
        };
        let mut pc2 = pc.clone();
        pc2.run = 2;
        pc2.migrated.postcopy.fault_us_p50 = Some(105.0);
        pc2.migrated.postcopy.faults = Some(1100);
        let mut auto = result(Workload::W2, &ours("auto"), 1, Outcome::Completed, 480.0, 2.0, 600_000_000);
        auto.migrated.postcopy =
            PostcopyStats { chosen_mode: Some("hybrid".into()), switchover_round: Some(1), ..PostcopyStats::default() };
        let pre = result(Workload::W2, &ours("precopy"), 1, Outcome::Completed, 900.0, 4.0, 900_000_000);
        let rows =
            summarize(&[pc, pc2, auto, pre], &[Workload::W2], &[ours("postcopy"), ours("auto"), ours("precopy")]);
        assert_eq!(rows[0].faults.map(|s| s.median), Some(1000.0));
        assert_eq!(rows[1].chosen.get("hybrid"), Some(&1));
        let t = markdown_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].ends_with(
                "| sent, median | faults, median | fault µs p50, median [min-max] | fault µs p99, median [min-max] \
                 | pages pushed / demanded, median | vCPU blocked ms, median [min-max] | switch-over round / chosen mode | notes |"
            ),
            "{}",
            lines[0]
        );
        assert_eq!(lines[1].matches('|').count(), lines[0].matches('|').count());
        assert_eq!(
            lines[2],
            "| W2 | understudy postcopy | 2/2 | 500 | 2.0 | 3.0 | 502 | 600 MB | 1000 | 100 [95-105] | 640 | 130000 / 900 | 120 |  |  |"
        );
        assert_eq!(
            lines[3],
            "| W2 | understudy auto | 1/1 | 480 | 2.0 | 3.0 | 482 | 600 MB |  |  |  |  |  | round 1; hybrid ×1 |  |"
        );
        assert_eq!(lines[4], "| W2 | understudy precopy | 1/1 | 900 | 4.0 | 5.0 | 902 | 900 MB |  |  |  |  |  |  |  |");
        // Only auto's column when only auto reports anything.
        let t = markdown_table(&rows[1..]);
        assert!(
            t.lines().next().unwrap().ends_with("| sent, median | switch-over round / chosen mode | notes |"),
            "{t}"
        );
    }

    fn reverse(epochs: u64, pause_p99: f64, dirty_mean: f64) -> super::super::reverse::ReverseStats {
        super::super::reverse::ReverseStats {
            epochs,
            last_acked: epochs + 3,
            pause_us_p50: Some(pause_p99 / 4.0),
            pause_us_p99: Some(pause_p99),
            dirty_pages_mean: Some(dirty_mean),
            dirty_pages_p99: Some(dirty_mean * 2.0),
            ack_us_p50: Some(500.0),
            ack_us_p99: Some(1500.0),
        }
    }

    #[test]
    fn reverse_columns_and_the_cost_beside_the_noreverse_twin() {
        use super::super::reverse::{cost_rows, cost_table};
        let ours = |m: &str| Config::Ours(m.into());
        let run = |w: Workload, c: &str, n: usize, total: f64| {
            result(w, &ours(c), n, Outcome::Completed, total, 3.0, 100_000_000)
        };
        let mut results = Vec::new();
        // W1 postcopy: 3 runs with (300, 310, 290 ms), 3 without (280, 270, 275): 300/275.
        for (n, (t, p, d)) in
            [(300.0, 800.0, 1000.0), (310.0, 1200.0, 1100.0), (290.0, 700.0, 900.0)].into_iter().enumerate()
        {
            let mut r = run(Workload::W1, "postcopy", n + 1, t);
            r.migrated.reverse = Some(reverse(20 + n as u64, p, d));
            results.push(r);
        }
        for (n, t) in [280.0, 270.0, 275.0].into_iter().enumerate() {
            results.push(run(Workload::W1, "postcopy-noreverse", n + 1, t));
        }
        // W2 hybrid: 1 of 2 runs with completed (600 ms; no epochs: its post-copy was too short),
        // 500 without: 1.2x.
        let mut h = run(Workload::W2, "hybrid", 1, 600.0);
        h.migrated.reverse = Some(super::super::reverse::ReverseStats {
            pause_us_p50: None,
            pause_us_p99: None,
            dirty_pages_mean: None,
            dirty_pages_p99: None,
            ack_us_p50: None,
            ack_us_p99: None,
            ..reverse(0, 0.0, 0.0)
        });
        let mut failed = run(Workload::W2, "hybrid", 2, 1.0);
        failed.migrated.outcome = Outcome::Failed("x".into());
        failed.migrated.reverse = Some(reverse(99, 99_999.0, 9.0));
        results.extend([h, failed, run(Workload::W2, "hybrid-noreverse", 1, 500.0)]);
        // W2 auto has no twin in this bench: no cost row. Precopy never has one.
        let mut auto = run(Workload::W2, "auto", 1, 480.0);
        auto.migrated.reverse = Some(reverse(30, 400.0, 1500.0));
        results.extend([auto, run(Workload::W2, "precopy", 1, 900.0)]);
        // W3 auto: post-copy (with reverse checkpoints) in 1 of 2 runs; W1 auto in none.
        let mut auto = run(Workload::W3, "auto", 1, 60.0);
        auto.migrated.reverse = Some(reverse(5, 900.0, 25.0));
        results.extend([auto, run(Workload::W3, "auto", 2, 40.0), run(Workload::W3, "auto-noreverse", 1, 45.0)]);
        results.extend([run(Workload::W1, "auto", 1, 40.0), run(Workload::W1, "auto-noreverse", 1, 45.0)]);
        let configs: Vec<Config> =
            ["postcopy", "postcopy-noreverse", "hybrid", "hybrid-noreverse", "auto", "precopy", "auto-noreverse"]
                .map(ours)
                .to_vec();
        let rows = summarize(&results, &[Workload::W1, Workload::W2, Workload::W3], &configs);
        assert_eq!(rows.len(), 10);
        let pc = &rows[0].reverse;
        assert_eq!((pc.runs, pc.epochs), (3, Some(Stat { median: 21.0, min: 20.0, max: 22.0 })));
        assert_eq!(pc.pause_us_p99, Some(Stat { median: 800.0, min: 700.0, max: 1200.0 }));
        assert_eq!(
            (pc.dirty_pages_mean.map(|s| s.median), pc.ack_us_p99.map(|s| s.median)),
            (Some(1000.0), Some(1500.0))
        );
        assert_eq!(rows[1].reverse, ReverseSummary::default(), "no reverse checkpoints without them");
        let hybrid = &rows[4];
        assert_eq!(hybrid.config, ours("hybrid"));
        assert_eq!(hybrid.reverse.epochs.map(|s| s.median), Some(0.0), "the failed run's numbers are left out");
        assert_eq!((hybrid.reverse.runs, hybrid.reverse.pause_us_p99), (1, None));

        // W1 and W2 (W3 adds the client's columns).
        let t = markdown_table(&rows[..8]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].ends_with(
                "| sent, median | reverse epochs, median | reverse pause µs p50 / p99, median \
                 | reverse dirty pages per epoch mean / p99, median | reverse ack µs p50 / p99, median | notes |"
            ),
            "{}",
            lines[0]
        );
        assert_eq!(lines[1].matches('|').count(), lines[0].matches('|').count());
        assert_eq!(
            lines[2],
            "| W1 | understudy postcopy | 3/3 | 300 [290-310] | 3.0 | 4.0 | 302 | 100 MB | 21 | 200 / 800 | 1000 / 2000 | 500 / 1500 |  |"
        );
        assert_eq!(
            lines[3],
            "| W1 | understudy postcopy-noreverse | 3/3 | 275 [270-280] | 3.0 | 4.0 | 277 | 100 MB |  |  |  |  |  |"
        );
        assert_eq!(
            lines[6],
            "| W2 | understudy hybrid | 1/2 | 600 | 3.0 | 4.0 | 602 | 100 MB | 0 |  |  |  | 1 failed |"
        );

        let cost = cost_rows(&rows);
        assert_eq!(cost.len(), 4, "{cost:?}");
        assert_eq!((cost[0].workload, cost[0].config.clone()), (Workload::W1, ours("postcopy")));
        assert!((cost[0].ratio().unwrap() - 300.0 / 275.0).abs() < 1e-9);
        assert_eq!((cost[2].runs_with, cost[2].runs_without, cost[2].ratio()), ((1, 2), (1, 1), Some(1.2)));
        let t = cost_table(&cost);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 6, "{t}");
        assert!(lines[0].starts_with("| workload | mode | total ms with reverse checkpoints / without, median |"));
        assert_eq!(lines[1].matches('|').count(), lines[0].matches('|').count());
        assert_eq!(lines[2], "| W1 | postcopy | 300 / 275 | 1.09x: met | 21 | 800 [700-1200]: met | 1000 / 2000 |");
        assert_eq!(
            lines[3],
            "| W1 | auto | 40 / 45 | 0.89x: no post-copy with reverse checkpoints ran | - | - (no reverse epochs) | - |"
        );
        assert_eq!(
            lines[4],
            "| W2 | hybrid | 600 (1/2 completed) / 500 | 1.20x: **not met** | 0 | - (no reverse epochs) | - |"
        );
        assert_eq!(lines[5], "| W3 | auto | 50 / 45 | 1.11x: **not met** | 5 (in 1 of 2 runs) | 900: met | 25 / 50 |");
        assert_eq!(cost[2].to_json()["ratio"], 1.2);
        assert_eq!((cost[1].reverse_runs, cost[3].reverse_runs), (0, 1));
        assert_eq!(cost[0].to_json()["pause_us_p99"]["max"], 1200.0);
        assert!(cost_table(&[]).is_empty());
    }
}
