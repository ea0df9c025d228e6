//! One VM process: the VM, its admin API and its lifecycle (run, snapshot, restore, stop).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use vmm::vcpu::StopReason;
use vmm::vm::Vm;

use crate::api::{self, AfterSnapshot, Request, Response};

/// Where COM1's output goes, as given on the command line.
#[derive(Debug, Clone)]
pub enum SerialTarget {
    /// The process's stdout.
    Stdout,
    /// Nowhere.
    Null,
    /// Appended to a file.
    File(PathBuf),
}

impl std::str::FromStr for SerialTarget {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" | "-" => Self::Stdout,
            "none" | "null" => Self::Null,
            p => Self::File(PathBuf::from(p)),
        })
    }
}

impl SerialTarget {
    /// Opens the target.
    pub fn open(&self) -> Result<vmm::devices::serial::SerialOut> {
        Ok(match self {
            Self::Stdout => Box::new(std::io::stdout()),
            Self::Null => Box::new(std::io::sink()),
            Self::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("open serial output {}", p.display()))?,
            ),
        })
    }
}

/// How this VM came to be.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Origin {
    /// Booted from a kernel.
    Booted {
        /// The kernel.
        kernel: PathBuf,
    },
    /// Restored from a snapshot.
    Restored {
        /// The snapshot directory.
        from: PathBuf,
        /// Digest of guest memory when restored, before the guest ran.
        memory_digest: String,
        /// Milliseconds from process start to the VM resuming.
        restore_ms: f64,
    },
}

/// A running VM and what the API reports about it.
pub struct Runtime {
    vm: Mutex<Vm>,
    origin: Origin,
    started: Instant,
    memory_bytes: u64,
    exit: (Mutex<Option<String>>, Condvar),
}

#[derive(Serialize)]
struct Status<'a> {
    state: &'a str,
    uptime_s: f64,
    memory_bytes: u64,
    cmdline: &'a str,
    origin: &'a Origin,
    stopped_reason: Option<String>,
}

#[derive(Serialize)]
struct SnapshotReport {
    dir: PathBuf,
    memory_digest: String,
    memory_bytes: u64,
    state_bytes: u64,
    paused_ms: f64,
    then: AfterSnapshot,
}

impl Runtime {
    /// Wraps a VM.
    pub fn new(vm: Vm, origin: Origin, memory_bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            vm: Mutex::new(vm),
            origin,
            started: Instant::now(),
            memory_bytes,
            exit: (Mutex::new(None), Condvar::new()),
        })
    }

    fn vm(&self) -> std::sync::MutexGuard<'_, Vm> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request_exit(&self, why: String) {
        let mut e = self.exit.0.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            *e = Some(why);
        }
        self.exit.1.notify_all();
    }

    /// Handles one API request.
    pub fn handle(&self, req: Request) -> Response {
        let r = match req {
            Request::Status => self.status(),
            Request::Pause => self.vm().pause().map(|_| serde_json::json!({"state": "paused"})).map_err(Into::into),
            Request::Resume => {
                self.vm().resume();
                Ok(serde_json::json!({"state": "running"}))
            }
            Request::Snapshot { dir, then } => self.snapshot(&dir, then),
            Request::MemoryDigest => self.digest(),
            Request::Shutdown => {
                self.request_exit("shutdown requested through the api".into());
                Ok(serde_json::json!({"state": "stopping"}))
            }
        };
        match r {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(&e),
        }
    }

    fn status(&self) -> Result<serde_json::Value> {
        let vm = self.vm();
        let stopped = vm.stopped().map(|r| match r {
            StopReason::Requested => "stopped by request".to_string(),
            StopReason::Failed(why) => why,
        });
        let state = if stopped.is_some() {
            "stopped"
        } else if vm.is_paused() {
            "paused"
        } else {
            "running"
        };
        Ok(serde_json::to_value(Status {
            state,
            uptime_s: self.started.elapsed().as_secs_f64(),
            memory_bytes: self.memory_bytes,
            cmdline: vm.cmdline(),
            origin: &self.origin,
            stopped_reason: stopped,
        })?)
    }

    fn snapshot(&self, dir: &Path, then: AfterSnapshot) -> Result<serde_json::Value> {
        let mut vm = self.vm();
        let was_paused = vm.is_paused();
        let t0 = Instant::now();
        vm.pause()?;
        let result = (|| -> Result<vmm::snapshot::SnapshotInfo> {
            let state = vm.save_state()?;
            // SAFETY: the VM is paused: vCPUs are parked and nothing else writes guest memory.
            Ok(unsafe { vmm::snapshot::write(dir, vm.memory(), &state) }?)
        })();
        let paused_ms = t0.elapsed().as_secs_f64() * 1e3;
        let info = match result {
            Ok(info) => info,
            Err(e) => {
                if !was_paused {
                    vm.resume();
                }
                return Err(e.context(format!("snapshot into {}", dir.display())));
            }
        };
        match then {
            AfterSnapshot::Resume if !was_paused => vm.resume(),
            AfterSnapshot::Exit => self.request_exit(format!("exit after snapshot into {}", dir.display())),
            _ => {}
        }
        tracing::info!(
            dir = %dir.display(),
            digest = format_args!("{:016x}", info.memory_digest),
            paused_ms,
            "snapshot written"
        );
        Ok(serde_json::to_value(SnapshotReport {
            dir: dir.to_path_buf(),
            memory_digest: format!("{:016x}", info.memory_digest),
            memory_bytes: info.memory_bytes,
            state_bytes: info.state_bytes,
            paused_ms,
            then,
        })?)
    }

    fn digest(&self) -> Result<serde_json::Value> {
        let mut vm = self.vm();
        let was_paused = vm.is_paused();
        vm.pause()?;
        // SAFETY: paused: nothing writes guest memory.
        let d = unsafe { vmm::memory::digest(vm.memory()) };
        if !was_paused {
            vm.resume();
        }
        Ok(serde_json::json!({ "memory_digest": format!("{d:016x}") }))
    }

    /// Serves the API (if a socket is given) and blocks until the VM stops or an exit is
    /// requested (API, SIGINT, SIGTERM). Returns an error if the VM failed.
    pub fn run_until_exit(self: &Arc<Self>, api_socket: Option<&Path>) -> Result<()> {
        if let Some(path) = api_socket {
            let listener = api::bind(path)?;
            let rt = Arc::clone(self);
            std::thread::Builder::new()
                .name("api".into())
                .spawn(move || api::serve(listener, move |req| rt.handle(req)))
                .context("spawn api thread")?;
            tracing::info!(socket = %path.display(), "admin api listening");
        }
        let rt = Arc::clone(self);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = wait_for_termination_signal();
                rt.request_exit(format!("signal {sig}"));
            })
            .context("spawn signal thread")?;

        let outcome = loop {
            {
                let e = self.exit.0.lock().unwrap_or_else(|e| e.into_inner());
                let (e, _) = self.exit.1.wait_timeout(e, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner());
                if let Some(why) = e.clone() {
                    tracing::info!("stopping: {why}");
                    break Ok(());
                }
            }
            if let Some(reason) = self.vm().stopped() {
                break match reason {
                    StopReason::Requested => Ok(()),
                    StopReason::Failed(why) => Err(anyhow!("vm failed: {why}")),
                };
            }
        };
        self.vm().shutdown();
        if let Some(path) = api_socket {
            let _ = std::fs::remove_file(path);
        }
        outcome
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread and every thread it spawns afterwards;
/// call first thing in `main`.
pub fn block_termination_signals() {
    // SAFETY: plain sigset manipulation on a local set; pthread_sigmask on the current thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn wait_for_termination_signal() -> i32 {
    // SAFETY: sigwait on a local set of signals blocked in every thread (see
    // `block_termination_signals`).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        sig
    }
}
