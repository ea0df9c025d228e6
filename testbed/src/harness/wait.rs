//! Waiting within bounds: for a file's text to say something ([`wait_for`]), for a child to
//! exit ([`wait_with_timeout`]), for a condition ([`poll_until`]); and reading files that grow
//! ([`read_text`], [`FileLines`]).

use super::interrupt::check_interrupted;
use super::proc::Proc;
use anyhow::Result;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn files_are_read_as_they_grow() {
        let dir = std::env::temp_dir().join(format!("testbed-wait-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
        let _ = std::fs::remove_dir_all(&dir);
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
}
