//! vCPU threads with a reliable pause and resume.
//!
//! Each vCPU runs `KVM_RUN` in its own thread. Pausing sets a shared flag and kicks every
//! thread ([`kick`]); a kicked thread completes any pending I/O (`KVM_RUN` with
//! `immediate_exit`), then parks on a condition variable. While all threads are parked the
//! owner may read and write vCPU state through [`VcpuHandle::with_fd`].

pub mod kick;
pub mod persist;

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

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
    /// Captures whose registers KVM stored at the kick's own exit (no extra `KVM_RUN`).
    regs_at_kick: AtomicU64,
    state: Mutex<CtlState>,
    cv: Condvar,
}

impl VcpuControl {
    fn new() -> Self {
        Self {
            pause: AtomicBool::new(false),
            sync_regs: AtomicBool::new(false),
            regs_at_kick: AtomicU64::new(0),
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
    /// The fd's `kvm_run` page (mapped for as long as the fd, which the handle owns, lives).
    run_page: RunPage,
    thread: Option<JoinHandle<()>>,
    /// The parts of its state that never change once it ran (read at the first capture, see
    /// [`persist::Fixed`]).
    pub(crate) fixed: Arc<std::sync::OnceLock<persist::Fixed>>,
}

impl VcpuHandle {
    /// Wraps a created vCPU fd.
    pub fn new(id: u8, mut fd: VcpuFd) -> Self {
        let run_page = RunPage(fd.get_kvm_run());
        Self { id, fd: Arc::new(Mutex::new(fd)), run_page, thread: None, fixed: Arc::default() }
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
            let run_page = h.run_page;
            let ctl = Arc::clone(&self.ctl);
            let (pio, mmio) = (pio.clone(), mmio.clone());
            let id = h.id;
            ctl.lock().running_threads += 1;
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_thread(id, fd, run_page, ctl, pio, mmio))
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

    /// How many park captures took the registers KVM stored at the kick's own exit (the others
    /// ran one more immediate-exit `KVM_RUN` for them).
    pub fn regs_at_kick(&self) -> u64 {
        self.ctl.regs_at_kick.load(Ordering::Relaxed)
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
        let sync_regs = self.ctl.sync_regs.load(Ordering::SeqCst);
        for h in &self.handles {
            if let Some(t) = &h.thread {
                if sync_regs {
                    // KVM stores the registers as the kick's KVM_RUN returns: the park work
                    // then needs no KVM_RUN of its own (see `regs_stored`).
                    h.run_page.valid_regs().store(SYNC_REGS_MASK, Ordering::SeqCst);
                }
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

fn vcpu_thread(id: u8, fd: Arc<Mutex<VcpuFd>>, run_page: RunPage, ctl: Arc<VcpuControl>, pio: Bus, mmio: Bus) {
    let mut guard = fd.lock().unwrap_or_else(|e| e.into_inner());
    poison_stored_regs(&mut guard);
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
                let eintr = e.errno() == libc::EINTR;
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
                        let synced = ctl.sync_regs.load(Ordering::Relaxed)
                            && if eintr && regs_stored(&mut guard) {
                                ctl.regs_at_kick.fetch_add(1, Ordering::Relaxed);
                                true
                            } else {
                                sync_regs_now(&mut guard, run_page)
                            };
                        work(id, pause, &mut guard, synced);
                        run_page.valid_regs().store(0, Ordering::SeqCst);
                        poison_stored_regs(&mut guard);
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
fn sync_regs_now(fd: &mut VcpuFd, run_page: RunPage) -> bool {
    run_page.valid_regs().store(SYNC_REGS_MASK, Ordering::SeqCst);
    fd.set_kvm_immediate_exit(1);
    let ok = matches!(fd.run(), Err(e) if e.errno() == libc::EINTR);
    fd.set_kvm_immediate_exit(0);
    run_page.valid_regs().store(0, Ordering::SeqCst);
    ok
}

/// `kvm_valid_regs` bits of the registers, special registers and events.
const SYNC_REGS_MASK: u64 =
    (kvm_bindings::KVM_SYNC_X86_REGS | kvm_bindings::KVM_SYNC_X86_SREGS | kvm_bindings::KVM_SYNC_X86_EVENTS) as u64;

/// A vCPU fd's `kvm_run` page, whose `kvm_valid_regs` the pausing thread sets before it kicks:
/// KVM reads that field as `KVM_RUN` returns and, when set, stores the registers, special
/// registers and events into the page, so the kick's own exit brings them (a `KVM_RUN` that
/// ends in `EINTR` has no I/O pending, so they are final).
#[derive(Clone, Copy)]
struct RunPage(*mut kvm_bindings::kvm_run);

// SAFETY: the page is mapped for as long as the vCPU fd lives, and the handle that owns the
// fd outlives its thread and every pause; across threads only `kvm_valid_regs` is touched, and
// only atomically (see `valid_regs`).
unsafe impl Send for RunPage {}
// SAFETY: as for Send: shared use touches only `kvm_valid_regs`, through an atomic.
unsafe impl Sync for RunPage {}

impl RunPage {
    /// The page's `kvm_valid_regs`, as an atomic: the pausing thread sets it, the vCPU thread
    /// clears it once its capture is done, and the kernel reads it.
    fn valid_regs(&self) -> &AtomicU64 {
        // SAFETY: the field is a naturally aligned u64 (offset 288 of the page) in a mapping
        // that outlives every use (see the Send/Sync note); the VMM accesses it only through
        // this atomic view.
        unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*self.0).kvm_valid_regs)) }
    }
}

/// Marks the stored registers in `kvm_run` as stale: an RFLAGS value with bit 1 clear, which no
/// store by KVM can produce (that bit always reads 1).
fn poison_stored_regs(fd: &mut VcpuFd) {
    fd.sync_regs_mut().regs.rflags = 0;
}

/// Whether KVM stored the registers since they were last poisoned: then it did so at every
/// exit since (the pausing thread set `kvm_valid_regs` before its kick, and only this thread
/// clears it, after its capture), the last one included, so they are this stop's.
fn regs_stored(fd: &mut VcpuFd) -> bool {
    fd.sync_regs_mut().regs.rflags & 0x2 != 0
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
            // The guest's device accesses on a timeline (`UNDERSTUDY_LOG=vmm::vcpu=trace`).
            tracing::trace!(vcpu = id, addr, wall_ns = crate::devices::virtio::net::wall_ns(), "mmio read");
            if !mmio.read(addr, data) {
                tracing::trace!(vcpu = id, "unhandled mmio read at {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            tracing::trace!(vcpu = id, addr, wall_ns = crate::devices::virtio::net::wall_ns(), "mmio write");
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
