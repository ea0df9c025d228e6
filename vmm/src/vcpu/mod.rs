//! vCPU threads with a reliable pause and resume.
//!
//! Each vCPU runs `KVM_RUN` in its own thread. Pausing sets a shared flag and kicks every
//! thread ([`kick`]); a kicked thread completes any pending I/O (`KVM_RUN` with
//! `immediate_exit`), then parks on a condition variable. While all threads are parked the
//! owner may read and write vCPU state through [`VcpuHandle::with_fd`].

pub mod kick;
pub mod persist;

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};

use crate::bus::Bus;

/// Errors of vCPU management.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU thread could not be spawned.
    #[error("spawn vcpu {0} thread")]
    Spawn(u8, #[source] std::io::Error),
    /// Not every vCPU parked in time.
    #[error("{parked} of {total} vcpus parked within {timeout_ms} ms")]
    PauseTimeout {
        /// vCPUs that did park.
        parked: usize,
        /// vCPUs in the VM.
        total: usize,
        /// How long we waited.
        timeout_ms: u64,
    },
    /// The VM stopped: a vCPU hit an unrecoverable exit.
    #[error("vm stopped: {0}")]
    Stopped(String),
}

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The owner asked the vCPUs to exit.
    Requested,
    /// A vCPU stopped with an error (internal error, triple fault, failed entry, ...).
    Failed(String),
}

/// Work a vCPU thread does on its own fd as it parks ([`Vcpus::set_park_work`]): its id, the
/// pause's number ([`Vcpus::pause_number`]), the fd, and whether KVM copied the parked vCPU's
/// registers, special registers and events into the fd's `kvm_run` (`KVM_CAP_SYNC_REGS`:
/// `VcpuFd::sync_regs` then holds them, and three ioctls are saved).
pub type ParkWork = Arc<dyn Fn(u8, u64, &mut VcpuFd, bool) + Send + Sync>;

#[derive(Default)]
struct CtlState {
    parked: usize,
    running_threads: usize,
    stop: bool,
    stopped: Option<StopReason>,
    /// Pauses so far (the current one's number while paused).
    pauses: u64,
    park_work: Option<ParkWork>,
}

/// State shared between the owner and all vCPU threads of a VM.
pub struct VcpuControl {
    pause: AtomicBool,
    /// Before the park work, have KVM copy registers, special registers and events to
    /// `kvm_run` (set with park work, when KVM can).
    sync_regs: AtomicBool,
    state: Mutex<CtlState>,
    cv: Condvar,
}

impl VcpuControl {
    fn new() -> Self {
        Self {
            pause: AtomicBool::new(false),
            sync_regs: AtomicBool::new(false),
            state: Mutex::new(CtlState::default()),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_stop(&self, reason: StopReason) {
        let mut st = self.lock();
        if st.stopped.is_none() {
            st.stopped = Some(reason);
        }
        st.stop = true;
        self.pause.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }
}

/// One vCPU: its fd (shared with its thread, which holds the lock only while running) and
/// the thread once started.
pub struct VcpuHandle {
    /// vCPU index (also its APIC id).
    pub id: u8,
    fd: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
    /// The parts of its state that never change once it ran (read at the first capture, see
    /// [`persist::Fixed`]).
    pub(crate) fixed: Arc<std::sync::OnceLock<persist::Fixed>>,
}

impl VcpuHandle {
    /// Wraps a created vCPU fd.
    pub fn new(id: u8, fd: VcpuFd) -> Self {
        Self { id, fd: Arc::new(Mutex::new(fd)), thread: None, fixed: Arc::default() }
    }

    /// Runs `f` on the vCPU fd. Blocks while the vCPU thread runs the guest: call it only
    /// before start or while the VM is paused.
    pub fn with_fd<R>(&self, f: impl FnOnce(&mut VcpuFd) -> R) -> R {
        let mut fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut fd)
    }
}

/// All vCPUs of a VM and their threads.
pub struct Vcpus {
    handles: Vec<VcpuHandle>,
    ctl: Arc<VcpuControl>,
}

impl Vcpus {
    /// Takes ownership of created (and configured) vCPUs; none runs yet.
    pub fn new(handles: Vec<VcpuHandle>) -> Self {
        kick::install_handler();
        Self { handles, ctl: Arc::new(VcpuControl::new()) }
    }

    /// The vCPUs, for state access while paused.
    pub fn handles(&self) -> &[VcpuHandle] {
        &self.handles
    }

    /// Starts one thread per vCPU. If `paused`, the threads park before entering the guest.
    pub fn start(&mut self, pio: Bus, mmio: Bus, paused: bool) -> Result<(), VcpuError> {
        self.ctl.pause.store(paused, Ordering::SeqCst);
        for h in &mut self.handles {
            let fd = Arc::clone(&h.fd);
            let ctl = Arc::clone(&self.ctl);
            let (pio, mmio) = (pio.clone(), mmio.clone());
            let id = h.id;
            ctl.lock().running_threads += 1;
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_thread(id, fd, ctl, pio, mmio))
                .map_err(|e| VcpuError::Spawn(id, e))?;
            h.thread = Some(thread);
        }
        if paused {
            self.wait_parked(Duration::from_secs(5))?;
        }
        Ok(())
    }

    fn wait_parked(&self, timeout: Duration) -> Result<(), VcpuError> {
        let deadline = Instant::now() + timeout;
        let total = self.handles.len();
        let mut st = self.ctl.lock();
        loop {
            if let Some(StopReason::Failed(why)) = &st.stopped {
                return Err(VcpuError::Stopped(why.clone()));
            }
            if st.parked == st.running_threads {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuError::PauseTimeout {
                    parked: st.parked,
                    total,
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            st = self.ctl.cv.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Has every vCPU thread run `work` on its own fd each time it parks for a pause, after it
    /// counts as parked (so the owner's work overlaps it) and before it lets go of the fd (so
    /// [`VcpuHandle::with_fd`] waits for it); `None` stops it. A vCPU captures its own state
    /// this way beside the owner's harvest, with no ioctl crossing to another thread's core.
    /// With `sync_regs` (ask only when KVM has `KVM_CAP_SYNC_REGS`), the thread first has KVM
    /// copy its registers, special registers and events to `kvm_run` ([`sync_regs_now`]).
    pub fn set_park_work(&self, work: Option<ParkWork>, sync_regs: bool) {
        let mut st = self.ctl.lock();
        self.ctl.sync_regs.store(sync_regs && work.is_some(), Ordering::SeqCst);
        st.park_work = work;
    }

    /// The number of the current pause (while paused) or of the last one; a vCPU's park work
    /// is told the pause's number.
    pub fn pause_number(&self) -> u64 {
        self.ctl.lock().pauses
    }

    /// Stops every vCPU at an instruction boundary with all I/O completed; returns once all
    /// are parked.
    pub fn pause(&self) -> Result<(), VcpuError> {
        {
            let mut st = self.ctl.lock();
            st.pauses += 1;
            self.ctl.pause.store(true, Ordering::SeqCst);
        }
        for h in &self.handles {
            if let Some(t) = &h.thread {
                kick::kick_thread(t.as_pthread_t());
            }
        }
        let r = self.wait_parked(Duration::from_secs(5));
        if r.is_err() {
            // Do not leave the guest half paused: the caller sees the error, the guest runs on.
            self.resume();
        }
        r
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let _st = self.ctl.lock();
        self.ctl.pause.store(false, Ordering::SeqCst);
        self.ctl.cv.notify_all();
    }

    /// Whether the VM has stopped, and why.
    pub fn stopped(&self) -> Option<StopReason> {
        self.ctl.lock().stopped.clone()
    }

    /// Blocks until the VM stops (or `timeout` passes) and returns why.
    pub fn wait_stopped(&self, timeout: Option<Duration>) -> Option<StopReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.ctl.lock();
        loop {
            if let Some(r) = &st.stopped {
                return Some(r.clone());
            }
            match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    st = self.ctl.cv.wait_timeout(st, d - now).unwrap_or_else(|e| e.into_inner()).0;
                }
                None => st = self.ctl.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }

    /// Stops and joins every vCPU thread.
    pub fn shutdown(&mut self) {
        self.ctl.record_stop(StopReason::Requested);
        for h in &self.handles {
            if let Some(t) = &h.thread {
                kick::kick_thread(t.as_pthread_t());
            }
        }
        for h in &mut self.handles {
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn vcpu_thread(id: u8, fd: Arc<Mutex<VcpuFd>>, ctl: Arc<VcpuControl>, pio: Bus, mmio: Bus) {
    let mut guard = fd.lock().unwrap_or_else(|e| e.into_inner());
    let run_ptr: *mut kvm_bindings::kvm_run = guard.get_kvm_run();
    // SAFETY: the kvm_run page belongs to the vCPU fd behind `fd`, which outlives this thread
    // (the handle keeps an Arc); we unregister before returning.
    unsafe { kick::register_run_page(run_ptr) };
    // A kick may have been sent before registration: honour a pending pause now.
    if ctl.pause.load(Ordering::SeqCst) {
        guard.set_kvm_immediate_exit(1);
    }
    tracing::debug!(vcpu = id, "vcpu thread started");
    let reason = loop {
        match guard.run() {
            Ok(exit) => {
                if let Some(reason) = handle_exit(id, exit, &pio, &mmio) {
                    break annotate_failure(reason, &mut guard);
                }
                if ctl.pause.load(Ordering::SeqCst) || ctl.lock().stop {
                    // Complete the exit's I/O in the kernel, then come back with EINTR.
                    guard.set_kvm_immediate_exit(1);
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                guard.set_kvm_immediate_exit(0);
                let mut st = ctl.lock();
                if st.stop {
                    break StopReason::Requested;
                }
                if ctl.pause.load(Ordering::SeqCst) {
                    st.parked += 1;
                    ctl.cv.notify_all();
                    if let Some(work) = st.park_work.clone() {
                        let pause = st.pauses;
                        drop(st);
                        let synced = ctl.sync_regs.load(Ordering::Relaxed) && sync_regs_now(&mut guard);
                        work(id, pause, &mut guard, synced);
                        st = ctl.lock();
                    }
                    drop(guard);
                    while ctl.pause.load(Ordering::SeqCst) && !st.stop {
                        st = ctl.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    st.parked -= 1;
                    let stop = st.stop;
                    drop(st);
                    guard = fd.lock().unwrap_or_else(|e| e.into_inner());
                    if stop {
                        break StopReason::Requested;
                    }
                }
            }
            Err(e) => break StopReason::Failed(format!("vcpu {id}: KVM_RUN failed: {e}")),
        }
    };
    kick::unregister_run_page();
    drop(guard);
    match &reason {
        StopReason::Requested => tracing::debug!(vcpu = id, "vcpu thread exits"),
        StopReason::Failed(why) => tracing::error!(vcpu = id, "{why}"),
    }
    ctl.record_stop(reason);
    let mut st = ctl.lock();
    st.running_threads -= 1;
    ctl.cv.notify_all();
}

/// Has KVM copy the stopped vCPU's registers, special registers and events into `kvm_run`:
/// one `KVM_RUN` that returns at once (`immediate_exit`) with `KVM_CAP_SYNC_REGS` asked for,
/// instead of three ioctls. True if they are there.
fn sync_regs_now(fd: &mut VcpuFd) -> bool {
    const REGS: [SyncReg; 3] = [SyncReg::Register, SyncReg::SystemRegister, SyncReg::VcpuEvents];
    for r in REGS {
        fd.set_sync_valid_reg(r);
    }
    fd.set_kvm_immediate_exit(1);
    let ok = matches!(fd.run(), Err(e) if e.errno() == libc::EINTR);
    fd.set_kvm_immediate_exit(0);
    for r in REGS {
        fd.clear_sync_valid_reg(r);
    }
    ok
}

/// Adds the guest's instruction pointer (and KVM's suberror) to a failure.
fn annotate_failure(reason: StopReason, fd: &mut VcpuFd) -> StopReason {
    let StopReason::Failed(mut why) = reason else { return reason };
    let run = fd.get_kvm_run();
    if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: exit_reason says the `internal` member of the union is the valid one.
        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
        why.push_str(&format!(" (suberror {suberror})"));
    }
    if let Ok(regs) = fd.get_regs() {
        why.push_str(&format!(" at rip {:#x}", regs.rip));
    }
    StopReason::Failed(why)
}

/// Handles one exit; returns a reason to stop the thread, if any.
fn handle_exit(id: u8, exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus) -> Option<StopReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                tracing::trace!(vcpu = id, "unhandled mmio read at {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                tracing::trace!(vcpu = id, "unhandled mmio write at {addr:#x}");
            }
        }
        VcpuExit::Hlt => return Some(StopReason::Failed(format!("vcpu {id}: halted with interrupts off"))),
        VcpuExit::Shutdown => {
            return Some(StopReason::Failed(format!("vcpu {id}: guest shutdown (triple fault)")));
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(StopReason::Failed(format!(
                "vcpu {id}: entry failed, hardware reason {reason:#x} on cpu {cpu}"
            )));
        }
        VcpuExit::InternalError => {
            return Some(StopReason::Failed(format!("vcpu {id}: kvm internal error")));
        }
        VcpuExit::SystemEvent(kind, _) => {
            return Some(StopReason::Failed(format!("vcpu {id}: system event {kind}")));
        }
        VcpuExit::IoapicEoi(_) | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        other => {
            return Some(StopReason::Failed(format!("vcpu {id}: unexpected exit {other:?}")));
        }
    }
    None
}
