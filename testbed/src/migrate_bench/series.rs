//! The workload's progress over time through one migration (issue 14): the W3 checker client's
//! completed operations counted in time buckets, from a little before the migration started to
//! a little after it ended, with the migration's moments (pause, resume, complete, ...) as
//! markers. Every time is in ms since the migration started: QEMU's `migrate` command, our
//! source's `migration: idle -> connecting` (the `understudy migrate` process starts a little
//! earlier; its start is the `command` marker). One host wall clock throughout: the client's
//! `time.time()`, QEMU's QMP event timestamps, our tracing timestamps.

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
        // At most MAX_BUCKETS: a clock gone wrong must not ask for gigabytes.
        let n = if span > 0.0 && span.is_finite() && bucket_ms > 0.0 {
            ((span / bucket_ms).ceil() as usize).min(MAX_BUCKETS)
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

    /// Events per second in each bucket.
    pub fn rates(&self) -> Vec<f64> {
        self.counts.iter().map(|&c| c as f64 * 1e3 / self.bucket_ms).collect()
    }

    pub fn to_json(&self) -> Value {
        json!({ "what": self.what, "from_ms": self.from_ms, "bucket_ms": self.bucket_ms, "counts": self.counts })
    }
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
