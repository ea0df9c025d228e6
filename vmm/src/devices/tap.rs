//! TAP network interfaces: the host end of a virtio-net device.
//!
//! A [`Tap`] is a non-blocking file descriptor that carries whole Ethernet frames, one per
//! `read`/`write`, without packet information or virtio-net headers (`IFF_TAP | IFF_NO_PI`,
//! no `IFF_VNET_HDR`: the device offers no offloads, so it adds and strips the header itself).
//! [`Tap::from_fd`] wraps any descriptor with the same datagram semantics, such as one end of
//! a `SOCK_SEQPACKET` socket pair, which is how the unit tests run without root.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Errors from [`Tap`].
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or contains a NUL byte.
    #[error("tap name {0:?} is not a valid interface name")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// The kernel refused to create or attach the interface.
    #[error("tap {name}: TUNSETIFF")]
    SetIff {
        /// The requested interface name.
        name: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The descriptor could not be switched to non-blocking mode.
    #[error("tap {name}: set non-blocking")]
    NonBlocking {
        /// The interface name.
        name: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A socket ioctl on the interface failed.
    #[error("tap {name}: interface ioctl {request:#x}")]
    Ioctl {
        /// The interface name.
        name: String,
        /// The ioctl request number.
        request: libc::c_ulong,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// A TAP interface (or any descriptor that reads and writes whole frames), non-blocking.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

/// Builds an `ifreq` carrying `name`, or fails if the name cannot be an interface name.
fn ifreq_for(name: &str) -> Result<libc::ifreq, TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(TapError::InvalidName(name.to_string()));
    }
    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers, arrays and
    // pointers) for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

impl Tap {
    /// Creates (or attaches to a persistent) TAP interface called `name`; a name with `%d`
    /// lets the kernel pick the number. The interface is not brought up: see
    /// [`Tap::set_up`].
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let mut req = ifreq_for(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: `file` is an open /dev/net/tun descriptor and `req` a valid, initialised
        // `ifreq` that outlives the call; TUNSETIFF reads it and writes the chosen name back
        // into it, within its size.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(TapError::SetIff { name: name.to_string(), source: io::Error::last_os_error() });
        }
        // SAFETY: the kernel wrote a NUL-terminated name of at most IFNAMSIZ bytes into
        // `ifr_name`, which was zeroed beforehand, so a terminator is within the array.
        let actual = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }.to_string_lossy().into_owned();
        tracing::debug!(tap = %actual, "tap opened");
        Ok(Tap { fd: file.into(), name: actual })
    }

    /// [`Tap::open`], waiting up to `wait` while the interface is busy (`EBUSY`: still attached
    /// to another process, such as a killed VMM on this host whose descriptors the kernel has
    /// not released yet: a backup promoted on the same host as its dead primary).
    pub fn open_waiting(name: &str, wait: std::time::Duration) -> Result<Tap, TapError> {
        let t0 = std::time::Instant::now();
        let mut warned = false;
        loop {
            match Tap::open(name) {
                Err(TapError::SetIff { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && t0.elapsed() < wait =>
                {
                    if !warned {
                        tracing::warn!(tap = name, "tap busy (still attached to another process): waiting for it");
                        warned = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Ok(tap) => {
                    if warned {
                        tracing::info!(
                            tap = name,
                            waited_ms = t0.elapsed().as_millis() as u64,
                            "tap free again: opened"
                        );
                    }
                    return Ok(tap);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Wraps a descriptor that already carries whole frames (a TAP opened elsewhere, or one
    /// end of a `SOCK_SEQPACKET`/`SOCK_DGRAM` socket pair) and makes it non-blocking.
    pub fn from_fd(fd: OwnedFd, name: &str) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let nonblocking = || -> io::Result<()> {
            // SAFETY: F_GETFL on a descriptor we own has no memory effects.
            let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
            if flags < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: F_SETFL on a descriptor we own only changes its status flags.
            if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        nonblocking().map_err(|source| TapError::NonBlocking { name: name.to_string(), source })?;
        Ok(Tap { fd, name: name.to_string() })
    }

    /// The interface name (as the kernel chose it, for names with `%d`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `buf`; `WouldBlock` when none is queued. A frame longer than
    /// `buf` is truncated by the kernel.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call and the
        // descriptor is owned by `self`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame; `WouldBlock` if the kernel queue is full.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes for the whole call and the
        // descriptor is owned by `self`.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Brings the interface up (`IFF_UP`), as `ip link set <name> up` would. Needs
    /// CAP_NET_ADMIN and a real interface (not a socket pair).
    pub fn set_up(&self) -> Result<(), TapError> {
        let ioctl_err = |request: libc::c_ulong, source| TapError::Ioctl { name: self.name.clone(), request, source };
        // SAFETY: socket() has no memory effects; the result is checked below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(ioctl_err(libc::SIOCGIFFLAGS, io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = ifreq_for(&self.name)?;
        // SAFETY: `req` is a valid `ifreq` naming the interface; SIOCGIFFLAGS fills its flags
        // field and writes nothing beyond the struct.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(ioctl_err(libc::SIOCGIFFLAGS, io::Error::last_os_error()));
        }
        // SAFETY: SIOCGIFFLAGS succeeded, so the union holds the flags member.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        // SAFETY: as above; SIOCSIFFLAGS only reads the struct.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) } < 0 {
            return Err(ioctl_err(libc::SIOCSIFFLAGS, io::Error::last_os_error()));
        }
        tracing::debug!(tap = %self.name, "tap up");
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A connected `SOCK_SEQPACKET` pair: (the device's "tap", the network's end).
    pub(crate) fn tap_pair() -> (Tap, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        let rc =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        (Tap::from_fd(a, "pair0").unwrap(), b)
    }

    /// A TAP held by someone else is waited for (EBUSY), up to the bound; needs root and
    /// /dev/net/tun (fails loudly without them).
    #[test]
    fn a_busy_tap_is_waited_for_until_its_holder_lets_go() {
        let held = Tap::open("ustb%d").expect("needs root and /dev/net/tun to create a TAP");
        let name = held.name().to_string();
        // Still held: a short wait ends in EBUSY, named.
        let e = Tap::open_waiting(&name, std::time::Duration::from_millis(30)).unwrap_err();
        assert!(matches!(&e, TapError::SetIff { source, .. } if source.raw_os_error() == Some(libc::EBUSY)), "{e:?}");
        // Let go after 150 ms: the wait ends then, with the TAP.
        let t0 = std::time::Instant::now();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(150));
            drop(held);
        });
        let tap = Tap::open_waiting(&name, std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(tap.name(), name);
        assert!(t0.elapsed() >= std::time::Duration::from_millis(100), "{:?}", t0.elapsed());
        holder.join().unwrap();
    }

    #[test]
    fn names_are_checked() {
        assert!(matches!(ifreq_for(""), Err(TapError::InvalidName(_))));
        assert!(matches!(ifreq_for("a-name-that-is-far-too-long"), Err(TapError::InvalidName(_))));
        assert!(matches!(ifreq_for("a\0b"), Err(TapError::InvalidName(_))));
        let req = ifreq_for("tap0").unwrap();
        assert_eq!(req.ifr_name[3], b'0' as libc::c_char);
        assert_eq!(req.ifr_name[4], 0);
    }

    #[test]
    fn pair_moves_frames_and_does_not_block() {
        let (tap, peer) = tap_pair();
        let mut buf = [0u8; 64];
        let err = tap.read_frame(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        tap.write_frame(b"hello").unwrap();
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(&buf[..n as usize], b"hello");
    }
}
