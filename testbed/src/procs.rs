//! Child processes run to completion within a bound, and the machine's load for reports.

use crate::faults::check_interrupted;
use anyhow::{Context, Result, bail};
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` to completion (stdin closed, stdout and stderr captured), killing it after
/// `timeout` or when the harness is interrupted; returns its output and how long it ran.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<(Output, Duration)> {
    let t0 = Instant::now();
    let desc = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {desc}"))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t0.elapsed() > timeout || check_interrupted().is_err() {
            let _ = child.kill();
            let _ = child.wait();
            check_interrupted()?;
            bail!("{desc} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = t0.elapsed();
    Ok((Output { status, stdout: out_t.join().unwrap_or_default(), stderr: err_t.join().unwrap_or_default() }, took))
}

/// `/proc/loadavg`'s first three numbers.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_runs_return_output_or_fail_in_time() {
        let (out, took) =
            run_bounded(Command::new("sh").args(["-c", "echo hi; echo err >&2"]), Duration::from_secs(5)).unwrap();
        assert!(out.status.success());
        assert_eq!((out.stdout.as_slice(), out.stderr.as_slice()), (&b"hi\n"[..], &b"err\n"[..]));
        assert!(took < Duration::from_secs(5));
        let t0 = Instant::now();
        let e = run_bounded(Command::new("sleep").arg("10"), Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains("did not finish within 200ms"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(loadavg().split(' ').count(), 3);
    }
}
