//! Child processes: a guard that kills its child on drop ([`Proc`]), children that die with
//! the harness ([`die_with_parent`]), commands run to completion within a bound
//! ([`run_bounded`], [`sh`]) and the machine's load for reports ([`loadavg`]).

use super::interrupt::check_interrupted;
use super::wait::read_text;
use anyhow::{Context, Result, bail};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// A child process with a name and a stderr file, killed (and reaped) on drop.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub stderr_path: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stderr to `stderr_path` (created); stdout is left as
    /// `cmd` sets it.
    pub fn start(cmd: &mut Command, name: &str, stderr_path: PathBuf) -> Result<Self> {
        let stderr =
            std::fs::File::create(&stderr_path).with_context(|| format!("create {}", stderr_path.display()))?;
        let child = cmd.stdin(Stdio::null()).stderr(stderr).spawn().with_context(|| format!("start {name}"))?;
        Ok(Self { child, name: name.into(), stderr_path })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        read_text(&self.stderr_path)
    }

    /// The last `n` lines of its stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        tail(&self.stderr(), n)
    }

    /// Panics with its stderr if it has exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early ({status}):\n{}", self.name, self.stderr());
        }
    }

    /// Waits for exit up to `timeout`; returns the status (None when it is still running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILLs and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Makes the kernel SIGKILL the child `cmd` starts when the thread that started it dies (a
/// killed harness leaves no VM behind).
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `args[0]` with the rest as arguments to completion; an error with its stderr when it
/// fails (`ip -n x link add ...: RTNETLINK answers: File exists`).
pub fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).stdin(Stdio::null()).output().context(args[0].to_string())?;
    if !out.status.success() {
        bail!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `cmd` to completion (stdin closed, stdout and stderr captured), killing it after
/// `timeout` or when the harness is interrupted; returns its output and how long it ran.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<(Output, Duration)> {
    let t0 = Instant::now();
    let desc = format!("{cmd:?}");
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

    #[test]
    fn procs_are_killed_on_drop_and_report_their_stderr() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut p = Proc::start(
            Command::new("sh").args(["-c", "echo one >&2; echo two >&2; exec sleep 30"]),
            "sleeper",
            dir.join("sleeper.stderr"),
        )
        .unwrap();
        let pid = p.pid();
        assert!(p.alive());
        p.assert_alive();
        let t0 = Instant::now();
        while p.stderr_tail(1) != "two" {
            assert!(t0.elapsed() < Duration::from_secs(5), "stderr: {:?}", p.stderr());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(p.stderr(), "one\ntwo\n");
        assert_eq!(p.wait_exit(Duration::from_millis(50)), None, "still running");
        drop(p);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "killed and reaped on drop");

        let mut q = Proc::start(&mut Command::new("true"), "quick", dir.join("quick.stderr")).unwrap();
        assert!(q.wait_exit(Duration::from_secs(5)).is_some_and(|s| s.success()));
        assert!(!q.alive());
    }

    #[test]
    fn sh_names_the_failed_command() {
        sh(&["true"]).unwrap();
        let e = sh(&["sh", "-c", "echo nope >&2; exit 3"]).unwrap_err().to_string();
        assert_eq!(e, "sh -c echo nope >&2; exit 3: nope");
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
