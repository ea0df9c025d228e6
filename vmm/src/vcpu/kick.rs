//! Kicking a vCPU thread out of `KVM_RUN`.
//!
//! A signal alone can be lost when it arrives just before the thread enters `KVM_RUN`, so the
//! handler also sets `immediate_exit` in the thread's own `kvm_run` page: the next `KVM_RUN`
//! then completes any pending I/O and returns `EINTR` at once (see shared/PLATFORM.md).

use std::cell::Cell;
use std::sync::Once;

use kvm_bindings::kvm_run;

/// The real-time signal used for kicks (offset from SIGRTMIN).
const KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    /// The calling vCPU thread's `kvm_run` page, or null on other threads.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal number used for kicks.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn handle_kick(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let ptr = KVM_RUN_PTR.with(|p| p.get());
    if !ptr.is_null() {
        // SAFETY: `ptr` was registered by this very thread through `register_run_page` and
        // points into the vCPU's mmap'd `kvm_run` page, which stays mapped until the thread
        // calls `unregister_run_page` before dropping its vCPU fd. The signal handler runs on
        // that thread, so there is no concurrent writer; a volatile byte store is
        // async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*ptr).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick signal handler (once per process).
pub fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting value; we fill in the handler and
        // flags before passing it to the kernel. The handler only does an async-signal-safe
        // volatile store (see `handle_kick`).
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = handle_kick as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            let rc = libc::sigaction(kick_signal(), &act, std::ptr::null_mut());
            assert_eq!(rc, 0, "sigaction for the vcpu kick signal failed");
        }
    });
}

/// Registers the calling thread's `kvm_run` page for the kick handler.
///
/// # Safety
/// - `ptr` must point to the `kvm_run` mapping of a vCPU fd owned by the calling thread and
///   must stay valid until [`unregister_run_page`] is called on this same thread.
pub unsafe fn register_run_page(ptr: *mut kvm_run) {
    KVM_RUN_PTR.with(|p| p.set(ptr));
}

/// Forgets the calling thread's `kvm_run` page; call before the vCPU fd is dropped.
pub fn unregister_run_page() {
    KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
}

/// Sends the kick signal to a thread.
pub fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: pthread_kill with a valid thread id and signal number has no memory-safety
    // preconditions; the caller keeps the target thread alive (it holds its JoinHandle).
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}
