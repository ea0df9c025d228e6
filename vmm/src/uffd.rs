//! A minimal userfaultfd wrapper (missing mode only), on raw syscalls and ioctls.
//!
//! The `userfaultfd` crate needs `userfaultfd-sys`, which is not in this build's registry cache
//! (and its bindgen path needs clang), so the few calls post-copy needs are here. The ioctl
//! numbers follow `<linux/userfaultfd.h>`: `_IOC(dir, 0xAA, nr, size)` =
//! `dir << 30 | size << 16 | 0xAA << 8 | nr`, with `_IOWR` = dir 3 and `_IOR` = dir 2; they were
//! checked against the header on this machine with a C program printing the macros.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `UFFD_API`: the API version `UFFDIO_API` handshakes.
const UFFD_API: u64 = 0xAA;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`, 24 bytes.
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`, 32 bytes.
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`, 16 bytes.
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
/// `_IOR(0xAA, 0x02, struct uffdio_range)`, 16 bytes.
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`, 40 bytes.
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`, 32 bytes.
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
/// `USERFAULTFD_IOC_NEW` = `_IO(0xAA, 0x00)`: a new userfaultfd from `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const REGISTER_MODE_MISSING: u64 = 1;
/// `UFFD_EVENT_PAGEFAULT`.
const EVENT_PAGEFAULT: u8 = 0x12;
/// Bits of the `ioctls` answer of `UFFDIO_REGISTER`: `1 << _UFFDIO_WAKE | COPY | ZEROPAGE`.
const RANGE_IOCTLS_NEEDED: u64 = 1 << 0x02 | 1 << 0x03 | 1 << 0x04;

/// Errors of userfaultfd calls.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither the syscall nor `/dev/userfaultfd` gave a descriptor for kernel faults.
    #[error(
        "userfaultfd is not permitted (errno {errno}): post-copy needs root or CAP_SYS_PTRACE, or \
         sysctl vm.unprivileged_userfaultfd=1, or read-write access to /dev/userfaultfd"
    )]
    NotPermitted {
        /// The errno of the syscall.
        errno: i32,
    },
    /// The kernel has no userfaultfd.
    #[error("userfaultfd is not available in this kernel (CONFIG_USERFAULTFD)")]
    NotSupported,
    /// A call failed.
    #[error("{op} at {addr:#x} ({len} bytes)")]
    Call {
        /// The syscall or ioctl.
        op: &'static str,
        /// Host address it was given (0 if none).
        addr: u64,
        /// Length it was given (0 if none).
        len: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A registered range lacks an ioctl post-copy needs.
    #[error("UFFDIO_REGISTER at {addr:#x}: range ioctls {ioctls:#x} lack WAKE, COPY or ZEROPAGE")]
    MissingIoctls {
        /// The range.
        addr: u64,
        /// What the kernel offers there.
        ioctls: u64,
    },
}

fn call_err(op: &'static str, addr: u64, len: u64) -> UffdError {
    UffdError::Call { op, addr, len, source: io::Error::last_os_error() }
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (32 bytes): the event byte, then for a page fault `flags` at 8 and
/// `address` at 16.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    _flags: u64,
    address: u64,
    /// With `UFFD_FEATURE_THREAD_ID`: the faulting thread's id in the low 32 bits.
    feat: u64,
}

/// `UFFD_FEATURE_THREAD_ID`: page-fault messages carry the faulting thread's id.
const FEATURE_THREAD_ID: u64 = 1 << 8;

/// One page fault: the host address and the faulting thread (0 where the kernel does not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The faulting host address.
    pub address: u64,
    /// The faulting thread's id, or 0.
    pub thread: u32,
}

/// The outcome of a fill (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The whole range was filled (and its waiters woken).
    Done,
    /// Only the first bytes were filled (a page after them exists, or the mm changed): go on
    /// from there.
    Partial(u64),
    /// The first page of the range is present already: nothing was filled.
    Exists,
    /// Nothing was filled because the address space is changing (EAGAIN): try again.
    Again,
}

/// A userfaultfd descriptor (non-blocking, close-on-exec).
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a userfaultfd that handles kernel faults too (KVM's accesses to guest memory), with
    /// the API handshake done, asking for the faulting thread's id in each message (a kernel
    /// without it gives a descriptor without it: [`Fault::thread`] is then 0).
    pub fn open() -> Result<Self, UffdError> {
        match Self::open_with(FEATURE_THREAD_ID) {
            Err(UffdError::Call { op: "UFFDIO_API", .. }) => Self::open_with(0),
            r => r,
        }
    }

    fn open_with(features: u64) -> Result<Self, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes one int of flags and returns a new descriptor
        // or -1; it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if fd >= 0 {
            fd as i32
        } else {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENOSYS) => return Err(UffdError::NotSupported),
                Some(errno @ libc::EPERM) => Self::open_dev(flags).ok_or(UffdError::NotPermitted { errno })?,
                _ => return Err(UffdError::Call { op: "userfaultfd", addr: 0, len: 0, source: err }),
            }
        };
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let uffd = Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } };
        let mut api = UffdioApi { api: UFFD_API, features, ..Default::default() };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `api` is (repr(C),
        // same layout), valid for the whole call.
        if unsafe { libc::ioctl(uffd.fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(call_err("UFFDIO_API", 0, 0));
        }
        Ok(uffd)
    }

    /// The `/dev/userfaultfd` route (allowed by the device's permissions, not by the sysctl).
    fn open_dev(flags: i32) -> Option<i32> {
        let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd").ok()?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags as an integer argument and returns a new
        // descriptor or -1; `dev` is an open descriptor for the whole call.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
        (fd >= 0).then_some(fd)
    }

    /// Registers `[addr, addr + len)` in missing mode: from now on an access to a page there
    /// that has no page table entry blocks until [`Uffd::copy`], [`Uffd::zeropage`] or
    /// [`Uffd::wake`] resolves it (or the range is unregistered, or this descriptor closed).
    ///
    /// # Safety
    /// - The range is a private anonymous mapping (page aligned) that stays mapped while
    ///   registered, and no Rust reference to its bytes assumes they stay as they are: only
    ///   volatile accesses (vm-memory, KVM) touch it, since fills change missing pages.
    /// - Some thread answers the faults, or accessors would block for good.
    pub unsafe fn register_missing(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut reg =
            UffdioRegister { range: UffdioRange { start: addr, len }, mode: REGISTER_MODE_MISSING, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register` (`reg`, same
        // layout); the caller vouches for the range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(call_err("UFFDIO_REGISTER", addr, len));
        }
        if reg.ioctls & RANGE_IOCTLS_NEEDED != RANGE_IOCTLS_NEEDED {
            return Err(UffdError::MissingIoctls { addr, ioctls: reg.ioctls });
        }
        Ok(())
    }

    /// Unregisters a range: accesses fault normally again, and threads waiting there wake (a
    /// missing page of anonymous memory then reads as zeros).
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.range_ioctl(UFFDIO_UNREGISTER, "UFFDIO_UNREGISTER", addr, len)
    }

    /// Wakes the threads waiting on faults in a range (they retry their access).
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.range_ioctl(UFFDIO_WAKE, "UFFDIO_WAKE", addr, len)
    }

    fn range_ioctl(&self, req: libc::c_ulong, op: &'static str, addr: u64, len: u64) -> Result<(), UffdError> {
        let range = UffdioRange { start: addr, len };
        // SAFETY: UNREGISTER and WAKE read one `struct uffdio_range` (`range`, same layout).
        // Neither writes memory: unregistering only lets faults proceed normally.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), req, &range) } != 0 {
            return Err(call_err(op, addr, len));
        }
        Ok(())
    }

    /// Copies `src` into the missing pages at `dst` (page aligned, `src.len()` a multiple of
    /// 4096) atomically per page, and wakes the threads waiting on them. The kernel fills only
    /// pages without an entry in a range registered with this descriptor: it never overwrites.
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<Fill, UffdError> {
        let len = src.len() as u64;
        let mut c = UffdioCopy { dst, src: src.as_ptr() as u64, len, mode: 0, copy: 0 };
        // SAFETY: UFFDIO_COPY reads `len` bytes at `src` (a live slice of that length) and reads
        // and writes `c` (same layout as `struct uffdio_copy`). It writes only missing pages of
        // ranges registered with this descriptor, whose registration contract covers it.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) };
        Self::fill_result(rc, c.copy, "UFFDIO_COPY", dst, len)
    }

    /// Maps the zero page at the missing pages `[dst, dst + len)` and wakes their waiters.
    pub fn zeropage(&self, dst: u64, len: u64) -> Result<Fill, UffdError> {
        let mut z = UffdioZeropage { range: UffdioRange { start: dst, len }, mode: 0, zeropage: 0 };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes `z` (same layout as `struct
        // uffdio_zeropage`); it maps zero pages only where registered pages are missing.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) };
        Self::fill_result(rc, z.zeropage, "UFFDIO_ZEROPAGE", dst, len)
    }

    fn fill_result(rc: i32, done: i64, op: &'static str, addr: u64, len: u64) -> Result<Fill, UffdError> {
        if rc == 0 {
            return Ok(Fill::Done);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // A partial fill reports EAGAIN with the bytes done in the answer field.
            Some(libc::EAGAIN) if done > 0 => Ok(Fill::Partial(done as u64)),
            Some(libc::EAGAIN) => Ok(Fill::Again),
            Some(libc::EEXIST) => Ok(Fill::Exists),
            _ => Err(UffdError::Call { op, addr, len, source: err }),
        }
    }

    /// Waits up to `timeout_ms` for a fault message; true when one can be read.
    pub fn poll(&self, timeout_ms: i32) -> Result<bool, UffdError> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll reads and writes one `pollfd` that lives for the whole call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                return Ok(false);
            }
            return Err(call_err("poll", 0, 0));
        }
        Ok(rc > 0 && pfd.revents & libc::POLLIN != 0)
    }

    /// Reads the pending page-fault messages (at most 64), appending the faults to `out`;
    /// returns how many messages were read (0: none pending). Other events (none are enabled)
    /// are skipped.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> Result<usize, UffdError> {
        let mut msgs = [UffdMsg::default(); 64];
        // SAFETY: read writes at most `size_of_val(&msgs)` bytes into `msgs`, an array of plain
        // integers for which any byte pattern is valid.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), std::mem::size_of_val(&msgs)) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(UffdError::Call { op: "read userfaultfd", addr: 0, len: 0, source: err }),
            };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        out.extend(
            msgs[..count]
                .iter()
                .filter(|m| m.event == EVENT_PAGEFAULT)
                .map(|m| Fault { address: m.address, thread: m.feat as u32 }),
        );
        Ok(count)
    }
}

/// `_IOC(dir, 0xAA, nr, size)`.
const fn ioc(dir: u64, nr: u64, size: usize) -> libc::c_ulong {
    (dir << 30 | (size as u64) << 16 | 0xAA << 8 | nr) as libc::c_ulong
}

// The numbers above, derived from the structs' sizes (3 = _IOWR, 2 = _IOR, 0 = _IO).
const _: () = assert!(UFFDIO_API == ioc(3, 0x3F, std::mem::size_of::<UffdioApi>()));
const _: () = assert!(UFFDIO_REGISTER == ioc(3, 0x00, std::mem::size_of::<UffdioRegister>()));
const _: () = assert!(UFFDIO_UNREGISTER == ioc(2, 0x01, std::mem::size_of::<UffdioRange>()));
const _: () = assert!(UFFDIO_WAKE == ioc(2, 0x02, std::mem::size_of::<UffdioRange>()));
const _: () = assert!(UFFDIO_COPY == ioc(3, 0x03, std::mem::size_of::<UffdioCopy>()));
const _: () = assert!(UFFDIO_ZEROPAGE == ioc(3, 0x04, std::mem::size_of::<UffdioZeropage>()));
const _: () = assert!(USERFAULTFD_IOC_NEW == ioc(0, 0x00, 0));
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);
