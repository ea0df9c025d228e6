//! The workload's progress over time through one migration (issue 14): the W3 checker client's
//! completed operations, or the pages the W1/W2 `dirty` guest wrote (its `dirty prog` lines,
//! `report_ms=10`, stamped as they arrived on the host: [`GuestLines`], [`pages_series`]),
//! counted in time buckets, from a little before the migration started to a little after it
//! ended, with the migration's moments (pause, resume, complete, ...) as markers. Every time is in ms since the migration started: QEMU's `migrate` command, our
//! source's `migration: idle -> connecting` (the `understudy migrate` process starts a little
//! earlier; its start is the `command` marker). One host wall clock throughout: the client's
//! `time.time()`, QEMU's QMP event timestamps, our tracing timestamps.

use crate::lines::parse_dirty_prog;
use serde_json::{Value, json};

/// Bucket width, ms.
pub const BUCKET_MS: f64 = 10.0;
/// The series starts this long before the migration started, ms.
pub const BEFORE_MS: f64 = 500.0;
/// And ends this long after it ended, ms.
pub const AFTER_MS: f64 = 500.0;

/// At most this many buckets (10 minutes of 10 ms).
pub const MAX_BUCKETS: usize = 60_000;

/// A moment of the migration, ms since it started.
#[derive(Clone, Debug, PartialEq)]
pub struct Marker {
    /// `command` (our CLI process started), `pause` (the guest stopped at the source), `resume`
    /// (it runs at the destination), `postcopy` (QEMU: `migrate-start-postcopy` sent),
    /// `complete` (every page at the destination; for pre-copy the same as `resume`).
    pub name: String,
    pub ms: f64,
}

impl Marker {
    pub fn new(name: &str, ms: f64) -> Self {
        Marker { name: name.to_string(), ms }
    }
}

/// Events per bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// What is counted.
    pub what: String,
    /// Start of the first bucket, ms since the migration started (negative: before it).
    pub from_ms: f64,
    pub bucket_ms: f64,
    /// Events in bucket i, [from_ms + i * bucket_ms, from_ms + (i + 1) * bucket_ms).
    pub counts: Vec<u64>,
}

impl Series {
    /// Counts `times` (ms since the migration started) into buckets of `bucket_ms` covering
    /// [from_ms, to_ms); times outside are left out.
    pub fn bucket(what: &str, times: &[f64], from_ms: f64, to_ms: f64, bucket_ms: f64) -> Self {
        let span = to_ms - from_ms;
        // At most MAX_BUCKETS: a clock gone wrong must not ask for gigabytes. A span a
        // rounding error past a whole bucket (times from Unix seconds) adds none.
        let n = if span > 0.0 && span.is_finite() && bucket_ms > 0.0 {
            ((span / bucket_ms - 1e-6).ceil() as usize).min(MAX_BUCKETS)
        } else {
            0
        };
        let mut counts = vec![0u64; n];
        for &t in times {
            if !t.is_finite() || t < from_ms {
                continue;
            }
            let i = ((t - from_ms) / bucket_ms) as usize;
            if let Some(c) = counts.get_mut(i) {
                *c += 1;
            }
        }
        Series { what: what.to_string(), from_ms, bucket_ms, counts }
    }

    /// Buckets of `bucket_ms` covering [from_ms, to_ms) from a cumulative count given at
    /// `knots` (time ascending, count non-decreasing) and linear between them; before the
    /// first knot nothing is counted, after the last nothing more.
    pub fn cumulative(what: &str, knots: &[(f64, f64)], from_ms: f64, to_ms: f64, bucket_ms: f64) -> Self {
        let mut s = Series::bucket(what, &[], from_ms, to_ms, bucket_ms);
        let mut k = 0;
        let mut at = |x: f64| -> f64 {
            // The last knot at or before x (the times asked for only grow).
            while k + 1 < knots.len() && knots[k + 1].0 <= x {
                k += 1;
            }
            match (knots.get(k), knots.get(k + 1)) {
                (None, _) => 0.0,
                (Some(&(t0, p0)), _) if x < t0 => p0,
                (Some(&(_, p0)), None) => p0,
                (Some(&(t0, p0)), Some(&(t1, p1))) if t1 > t0 => p0 + (p1 - p0) * (x - t0) / (t1 - t0),
                (Some(&(_, p0)), Some(_)) => p0,
            }
        };
        let mut prev = at(from_ms).round();
        for (i, c) in s.counts.iter_mut().enumerate() {
            let end = (from_ms + (i + 1) as f64 * bucket_ms).min(to_ms);
            let now = at(end).round();
            *c = (now - prev).max(0.0) as u64;
            prev = now;
        }
        s
    }

    /// Events per second in each bucket.
    pub fn rates(&self) -> Vec<f64> {
        self.counts.iter().map(|&c| c as f64 * 1e3 / self.bucket_ms).collect()
    }

    pub fn to_json(&self) -> Value {
        json!({ "what": self.what, "from_ms": self.from_ms, "bucket_ms": self.bucket_ms, "counts": self.counts })
    }
}

/// One `dirty prog` line: when the host read it (Unix seconds), the guest's clock (ms) and the
/// pages it had written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    pub unix_s: f64,
    pub guest_ms: u64,
    pub pages: u64,
}

/// One guest's serial lines as they arrive with their times: every line is handed on once
/// ([`Self::take`]), the `dirty prog` ones are also kept as [`Progress`] points.
#[derive(Debug, Default)]
pub struct GuestLines {
    unread: Vec<String>,
    progress: Vec<Progress>,
}

impl GuestLines {
    /// Lines read at the given times (Unix seconds).
    pub fn add(&mut self, stamped: Vec<(f64, String)>) {
        for (unix_s, line) in stamped {
            if let Some((guest_ms, pages)) = parse_dirty_prog(&line) {
                self.progress.push(Progress { unix_s, guest_ms, pages });
            }
            self.unread.push(line);
        }
    }

    /// The lines added since the last call.
    pub fn take(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unread)
    }

    /// Every progress point so far.
    pub fn progress(&self) -> &[Progress] {
        &self.progress
    }
}

/// The pages a `dirty` guest wrote per [`BUCKET_MS`], from its progress points (source and
/// destination together: the destination's count goes on from the source's), from
/// [`BEFORE_MS`] before `zero_unix_s` to [`AFTER_MS`] after `end_ms` (ms since the zero), but
/// not past the last point. None with fewer than two points.
///
/// The pages of one line (its count minus the previous line's) were written some time between
/// the two lines' arrivals: they are spread evenly over that interval, except over `paused`
/// (ms since the zero: the pause and resume markers), when the guest wrote nothing. (The
/// guest's own clock cannot place them better: it loses ticks while the vCPU is stuck in slow
/// writes and leaps when a restored VM's missed ticks arrive.) A point whose count is below an
/// earlier one (a line cut at the switch-over and read as a shorter number) is left out. Each
/// bucket counts round(P(end)) - round(P(start)) of the cumulative count P, so no page is lost
/// or counted twice by rounding.
pub fn pages_series(points: &[Progress], zero_unix_s: f64, end_ms: f64, paused: Option<(f64, f64)>) -> Option<Series> {
    let mut pts: Vec<(f64, f64)> =
        points.iter().map(|p| ((p.unix_s - zero_unix_s) * 1e3, p.pages as f64)).filter(|p| p.0.is_finite()).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut kept: Vec<(f64, f64)> = Vec::with_capacity(pts.len());
    for p in pts {
        if kept.last().is_none_or(|l| p.1 >= l.1) {
            kept.push(p);
        }
    }
    if kept.len() < 2 {
        return None;
    }
    // Breakpoints of the cumulative count: flat across the part of an interval in the pause.
    let mut knots = vec![kept[0]];
    for w in kept.windows(2) {
        let ((t0, p0), (t1, p1)) = (w[0], w[1]);
        if let Some((ps, pr)) = paused {
            let (a, b) = (ps.clamp(t0, t1), pr.clamp(t0, t1));
            let active = (t1 - t0) - (b - a);
            if b > a && active > 0.0 {
                let at_pause = p0 + (p1 - p0) * (a - t0) / active;
                knots.extend([(a, at_pause), (b, at_pause)]);
            }
        }
        knots.push((t1, p1));
    }
    let last = knots[knots.len() - 1].0;
    let to_ms = (end_ms + AFTER_MS).min(last);
    Some(Series::cumulative("pages the guest wrote", &knots, -BEFORE_MS, to_ms, BUCKET_MS))
}

/// Markers as JSON: `[{"name": ..., "ms": ...}]`.
pub fn markers_json(markers: &[Marker]) -> Value {
    Value::Array(markers.iter().map(|m| json!({"name": m.name, "ms": m.ms})).collect())
}

/// The W3 client's completion times (`CTL_DIR/completions`: one wall-clock second a line) as
/// ms since `zero_unix_s`; lines that are not numbers are skipped.
pub fn parse_completions(text: &str, zero_unix_s: f64) -> Vec<f64> {
    text.lines().filter_map(|l| l.trim().parse::<f64>().ok()).map(|t| (t - zero_unix_s) * 1e3).collect()
}

/// Seconds since the Unix epoch of an RFC 3339 UTC timestamp as `tracing` prints it
/// (`2026-12-06T13:53:13.487922Z`); None for anything else.
pub fn parse_utc(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, mi) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let s: f64 = t.next()?.parse().ok()?;
    if d.next().is_some() || !(1..=12).contains(&mo) || !(1..=31).contains(&da) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60) as f64 + s)
}

/// The wall-clock time (Unix seconds) of the first line of `log` (a `tracing` log) containing
/// `needle`.
pub fn log_time(log: &str, needle: &str) -> Option<f64> {
    log.lines().filter(|l| l.contains(needle)).find_map(|l| parse_utc(l.split_whitespace().next()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_fall_into_their_buckets() {
        // Buckets of 10 ms from -20 ms: [-20,-10) [-10,0) [0,10) [10,20) [20,30).
        let times = [-25.0, -20.0, -19.9, -0.1, 0.0, 9.99, 10.0, 29.9, 30.0, f64::NAN];
        let s = Series::bucket("ops", &times, -20.0, 30.0, 10.0);
        assert_eq!(s.counts, vec![2, 1, 2, 1, 1]);
        assert_eq!(s.rates(), vec![200.0, 100.0, 200.0, 100.0, 100.0]);
        assert_eq!(s.to_json(), json!({"what": "ops", "from_ms": -20.0, "bucket_ms": 10.0, "counts": [2, 1, 2, 1, 1]}));
        // A partial last bucket still counts.
        assert_eq!(Series::bucket("ops", &[24.0], 0.0, 25.0, 10.0).counts, vec![0, 0, 1]);
        assert!(Series::bucket("ops", &[1.0], 5.0, 5.0, 10.0).counts.is_empty());
        assert!(Series::bucket("ops", &[1.0], 0.0, f64::NAN, 10.0).counts.is_empty());
        assert_eq!(Series::bucket("ops", &[1.0], 0.0, 1e12, 10.0).counts.len(), MAX_BUCKETS);
    }

    fn prog(unix_s: f64, guest_ms: u64, pages: u64) -> Progress {
        Progress { unix_s, guest_ms, pages }
    }

    #[test]
    fn progress_lines_are_kept_with_their_times_and_handed_on() {
        let mut g = GuestLines::default();
        g.add(vec![
            (1.0, "ready".into()),
            (1.01, "dirty prog t=10 pages=200".into()),
            (1.02, "dirty gen=0 pages=400 errors=0".into()),
            (1.03, "dirty prog t=20 pages=4".into()),
        ]);
        assert_eq!(
            g.take(),
            ["ready", "dirty prog t=10 pages=200", "dirty gen=0 pages=400 errors=0", "dirty prog t=20 pages=4"]
        );
        assert!(g.take().is_empty());
        assert_eq!(g.progress(), [prog(1.01, 10, 200), prog(1.03, 20, 4)]);
    }

    #[test]
    fn cumulative_counts_conserve_the_total() {
        // 0 at 0 ms, 100 at 20 ms, flat to 40 ms, 130 at 50 ms.
        let knots = [(0.0, 0.0), (20.0, 100.0), (40.0, 100.0), (50.0, 130.0)];
        let s = Series::cumulative("p", &knots, -10.0, 60.0, 10.0);
        assert_eq!(s.counts, vec![0, 50, 50, 0, 0, 30, 0]);
        // A partial last bucket, and rounding that never loses a page.
        let s = Series::cumulative("p", &[(0.0, 0.0), (30.0, 10.0)], 0.0, 25.0, 10.0);
        assert_eq!(s.counts, vec![3, 4, 1]);
        assert_eq!(
            Series::cumulative("p", &[(0.0, 0.0), (30.0, 10.0)], 0.0, 30.0, 10.0).counts.iter().sum::<u64>(),
            10
        );
        assert_eq!(Series::cumulative("p", &[], 0.0, 20.0, 10.0).counts, vec![0, 0]);
    }

    #[test]
    fn dirty_pages_per_bucket_through_a_pause() {
        let zero = 1000.0;
        let mut pts = Vec::new();
        // 200 pages every 10 ms (20000/s) at the source from -600 ms to 0 ms ...
        for i in 0..=60u64 {
            pts.push(prog(zero - 0.6 + i as f64 * 0.01, 1000 + i * 10, i * 200));
        }
        // ... paused from 5 ms to 100 ms, then at the destination from 110 ms (the first line's
        // pages written in [0, 5) and [100, 110)), lines read out of order and one cut line
        // ("pages=1" of "pages=12..."), up to 700 ms.
        for i in 1..=60u64 {
            pts.push(prog(zero + 0.1 + i as f64 * 0.01, 1600 + i * 10, 12_000 + i * 200));
        }
        pts.swap(70, 71);
        pts.push(prog(zero + 0.2, 1700, 1));
        let s = pages_series(&pts, zero, 250.0, Some((5.0, 100.0))).unwrap();
        assert_eq!((s.from_ms, s.bucket_ms, s.what.as_str()), (-BEFORE_MS, BUCKET_MS, "pages the guest wrote"));
        // From -500 ms to the last point at 700 ms (before 250 + 500): 120 buckets.
        assert_eq!(s.counts.len(), 120);
        let rates = s.rates();
        assert!(rates[..50].iter().all(|&r| (r - 20_000.0).abs() < 1.0), "{:?}", &rates[..50]);
        // [0, 10): 5 ms before the pause; nothing in [10, 100); [100, 110): 10 ms after it.
        assert_eq!(s.counts[50..62], [67, 0, 0, 0, 0, 0, 0, 0, 0, 0, 133, 200], "{:?}", &s.counts[45..65]);
        assert!(s.counts[60..].iter().skip(1).all(|&c| c == 200), "{:?}", &s.counts[55..]);
        assert_eq!(s.counts.iter().sum::<u64>(), 12_000 + 60 * 200 - 10 * 200, "from -500 ms on");
        // Without the pause's markers the line's pages spread over its whole interval.
        let s = pages_series(&pts, zero, 250.0, None).unwrap();
        assert!(s.counts[50..61].iter().all(|&c| c == 18 || c == 19), "{:?}", &s.counts[45..65]);
        // The series ends at end + AFTER_MS when the points go on.
        assert_eq!(pages_series(&pts, zero, 0.0, None).unwrap().counts.len(), 100);
        // A pause covering a whole interval (a line read late): spread over the interval.
        let two = [prog(zero, 0, 0), prog(zero + 0.04, 10, 400)];
        assert_eq!(pages_series(&two, zero + 0.5, 0.0, Some((-600.0, 0.0))).unwrap().counts[..4], [100; 4]);
        assert!(pages_series(&pts[..1], zero, 0.0, None).is_none());
        assert!(pages_series(&[], zero, 0.0, None).is_none());
    }

    #[test]
    fn completion_times_are_relative_to_the_migration_start() {
        let t = parse_completions("1000.5\n1000.512\nnot a number\n\n999.9\n", 1000.5);
        assert_eq!(t.len(), 3);
        assert!((t[0] - 0.0).abs() < 1e-6 && (t[1] - 12.0).abs() < 1e-3 && (t[2] + 600.0).abs() < 1e-3, "{t:?}");
    }

    #[test]
    fn tracing_timestamps_parse_to_unix_seconds() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse_utc("2000-03-01T00:00:01.5Z"), Some(951_868_801.5));
        let t = parse_utc("2026-12-06T13:53:13.487922Z").unwrap();
        assert!((t - 1_796_565_193.487922).abs() < 1e-5, "{t}");
        assert_eq!(parse_utc("2026-13-06T13:53:13Z"), None);
        assert_eq!(parse_utc("13:53:13"), None);
        let log = "2026-12-06T13:53:13.487789Z  INFO node::runtime: role: booted -> migration-source\n\
                   2026-12-06T13:53:13.487922Z  INFO primary::migrate: migration: idle -> connecting\n";
        let t0 = log_time(log, "migration: idle -> connecting").unwrap();
        assert!((t0 - 1_796_565_193.487922).abs() < 1e-5);
        assert_eq!(log_time(log, "nothing"), None);
    }
}
