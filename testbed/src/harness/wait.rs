//! Waiting within bounds: for a file's text to say something ([`wait_for`]), for a child to
//! exit ([`wait_with_timeout`]), for a condition ([`poll_until`]); and reading files that grow
//! ([`read_text`], [`FileLines`], [`StampedLines`]).

use super::interrupt::check_interrupted;
use super::proc::Proc;
use anyhow::Result;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The host's wall clock, seconds since the Unix epoch.
pub fn unix_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Reads a file as text (empty if missing; invalid UTF-8 replaced).
pub fn read_text(p: &Path) -> String {
    let mut s = Vec::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_end(&mut s);
    }
    String::from_utf8_lossy(&s).into_owned()
}

/// Polls `p` every 5 ms until `pred(text)` holds; returns how long it took. Panics with the
/// text and `proc`'s stderr when `proc` exits first or after `timeout`.
pub fn wait_for(p: &Path, timeout: Duration, proc: &mut Proc, what: &str, pred: impl Fn(&str) -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        let text = read_text(p);
        if pred(&text) {
            return t0.elapsed();
        }
        proc.assert_alive();
        if t0.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what} in {}:\n{text}\n--- {} stderr:\n{}",
                p.display(),
                proc.name,
                proc.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for a child (its stdout and stderr piped) and returns its output; kills it and panics
/// with its stderr after `timeout`.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("child timed out after {timeout:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `f` every 10 ms until it returns Some, the deadline passes (None) or the harness is
/// interrupted (an error).
pub fn poll_until<T>(deadline: Instant, mut f: impl FnMut() -> Option<T>) -> Result<Option<T>> {
    loop {
        check_interrupted()?;
        if let Some(v) = f() {
            return Ok(Some(v));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A file read as it grows (a serial log), complete lines only.
#[derive(Debug)]
pub struct FileLines {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl FileLines {
    pub fn new(path: PathBuf) -> Self {
        FileLines { path, offset: 0, partial: String::new() }
    }

    /// The complete lines written since the last call, trimmed.
    pub fn poll(&mut self) -> Vec<String> {
        let Ok(mut f) = std::fs::File::open(&self.path) else { return Vec::new() };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut out = Vec::new();
        while let Some(i) = self.partial.find('\n') {
            out.push(self.partial[..i].trim().to_string());
            self.partial.drain(..=i);
        }
        out
    }
}

/// A growing file's complete lines, each with the wall-clock time ([`unix_seconds`]) a thread
/// polling the file every `every` read it: when a line arrived, to within `every`, however
/// late the caller collects it. The thread ends when this is dropped.
pub struct StampedLines {
    lines: Receiver<(f64, String)>,
    stop: Arc<AtomicBool>,
}

impl StampedLines {
    pub fn follow(path: PathBuf, every: Duration) -> Self {
        let (tx, lines) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut file = FileLines::new(path);
            while !stopped.load(Ordering::Relaxed) {
                let new = file.poll();
                let now = unix_seconds();
                for l in new {
                    if tx.send((now, l)).is_err() {
                        return;
                    }
                }
                std::thread::sleep(every);
            }
        });
        StampedLines { lines, stop }
    }

    /// The lines read since the last call, with their times, without waiting.
    pub fn drain(&self) -> Vec<(f64, String)> {
        self.lines.try_iter().collect()
    }
}

impl Drop for StampedLines {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn files_are_read_as_they_grow() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let p = dir.join("serial.log");
        assert_eq!(read_text(&p), "", "a missing file reads empty");
        std::fs::write(&p, "ready\n").unwrap();
        let mut sleeper =
            Proc::start(Command::new("sleep").arg("30").stdout(Stdio::null()), "sleeper", dir.join("s.stderr"))
                .unwrap();
        let took = wait_for(&p, Duration::from_secs(5), &mut sleeper, "ready", |t| t.contains("ready"));
        assert!(took < Duration::from_secs(5));
        let n = poll_until(Instant::now() + Duration::from_secs(5), || Some(3)).unwrap();
        assert_eq!(n, Some(3));
        assert_eq!(poll_until(Instant::now(), || None::<()>).unwrap(), None);
        let child = Command::new("sh").args(["-c", "echo out"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
        let out = wait_with_timeout(child.unwrap(), Duration::from_secs(5));
        assert_eq!(out.stdout, b"out\n");
    }

    #[test]
    fn file_lines_returns_complete_lines_once() {
        let p = std::env::temp_dir().join(format!("us-mb-lines-{}", std::process::id()));
        std::fs::write(&p, "ready\r\ndirty gen=1").unwrap();
        let mut f = FileLines::new(p.clone());
        assert_eq!(f.poll(), ["ready"]);
        assert!(f.poll().is_empty());
        use std::io::Write;
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b" pages=1 errors=0\r\n").unwrap();
        assert_eq!(f.poll(), ["dirty gen=1 pages=1 errors=0"]);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn stamped_lines_carry_the_time_they_were_read() {
        let p = std::env::temp_dir().join(format!("us-mb-stamped-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let lines = StampedLines::follow(p.clone(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(20));
        assert!(lines.drain().is_empty(), "a missing file has no lines yet");
        let t0 = unix_seconds();
        std::fs::write(&p, "dirty prog t=10 pages=200\r\ndirty prog t=20").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // Collected 300 ms late, stamped when read: within a few ms of t0; the cut line waits.
        let got = lines.drain();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].1, "dirty prog t=10 pages=200");
        assert!(got[0].0 >= t0 && got[0].0 < t0 + 0.1, "read at {}, written at {t0}", got[0].0);
        let t1 = unix_seconds();
        use std::io::Write;
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b" pages=400\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let got = lines.drain();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].1, "dirty prog t=20 pages=400");
        assert!(got[0].0 >= t1 && got[0].0 < t1 + 0.05, "read at {}, completed at {t1}", got[0].0);
        drop(lines);
        std::fs::remove_file(&p).unwrap();
    }
}
