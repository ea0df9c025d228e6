//! virtio-mmio transport and virtio devices.
//!
//! [`VirtioMmio`] is the register file of a modern (version 2) virtio-mmio device, virtio
//! 1.x section 4.2: a 512-byte window on the MMIO bus ([`MMIO_WINDOW_SIZE`]) that the guest
//! learns from a `virtio_mmio.device=512@<base>:<gsi>` kernel command-line entry
//! ([`mmio_cmdline_entry`]). It wraps a [`VirtioDevice`] (today [`net::Net`]), owns the
//! virtqueues' configuration and the interrupt status, and hands the queues to the device
//! when the driver sets DRIVER_OK.
//!
//! Wiring a net device (the VMM owns the KVM side):
//!
//! ```no_run
//! # use std::sync::{Arc, Mutex};
//! # use vmm::devices::tap::Tap;
//! # use vmm::devices::virtio::{mmio_cmdline_entry, VirtioMmio, MMIO_WINDOW_SIZE};
//! # use vmm::devices::virtio::net::{Net, NetConfig, TapSink};
//! # use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//! # fn f(mem: vmm::memory::GuestMemory, bus: &mut vmm::bus::Bus) -> Result<(), Box<dyn std::error::Error>> {
//! let (base, gsi) = (0xd000_0000u64, 5u32);
//! let tap = Arc::new(Tap::open("ustap0")?);
//! let net = Net::new(mem, tap.clone(), Box::new(TapSink::new(tap)), NetConfig::default())?;
//! let irq = EventFd::new(EFD_NONBLOCK)?;
//! // vm_fd.register_irqfd(&irq, gsi)?;  (edge-triggered through the IOAPIC)
//! let dev = Arc::new(Mutex::new(VirtioMmio::new(net, irq)?));
//! bus.insert(dev.clone(), base, MMIO_WINDOW_SIZE)?;
//! let cmdline_entry = mmio_cmdline_entry(base, gsi); // "virtio_mmio.device=512@0xd0000000:5"
//! // at a checkpoint, vCPUs paused:
//! dev.lock().unwrap().pause();
//! // ... harvest, save ...
//! dev.lock().unwrap().resume();
//! # Ok(()) }
//! ```

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

mod mmio;
pub mod net;
pub mod persist;
#[cfg(test)]
pub(crate) mod test_utils;

pub(crate) use mmio::REG_QUEUE_NOTIFY;
pub use mmio::{MMIO_WINDOW_SIZE, VENDOR_ID, VirtioMmio, mmio_cmdline_entry};

/// virtio device type of a network card.
pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;

/// Feature bits common to all devices.
pub mod features {
    /// The device follows virtio 1.x (required by the modern MMIO transport).
    pub const VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    /// Descriptors may point to indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
    /// `used_event` / `avail_event` notification suppression.
    pub const RING_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
}

/// Device status bits (virtio 1.x section 2.1).
pub mod status {
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The guest gave up on the device.
    pub const FAILED: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FAILED;
}

/// Interrupt status bit: the device used buffers in a queue.
pub const INT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the device configuration changed.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Errors of the virtio transport and of device activation.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A queue the device needs is not ready or lies outside guest memory.
    #[error("queue {0} is not ready or not in guest memory")]
    QueueInvalid(usize),
    /// A saved queue state is inconsistent (size, alignment).
    #[error("queue {index} state rejected: {source}")]
    QueueState {
        /// Index of the queue.
        index: usize,
        /// What virtio-queue rejected.
        source: virtio_queue::Error,
    },
    /// A saved state is for another kind of device.
    #[error("state is for device type {found}, not {expected}")]
    DeviceType {
        /// The device type being restored.
        expected: u32,
        /// The device type in the state.
        found: u32,
    },
    /// A saved state has the wrong number of queues.
    #[error("state has {found} queues, device has {expected}")]
    QueueCount {
        /// Queues of the device being restored.
        expected: usize,
        /// Queues in the state.
        found: usize,
    },
    /// The guest acked features this device does not offer (state from a newer device).
    #[error("acked features {0:#x} are not offered by this device")]
    Features(u64),
    /// An eventfd, epoll set or thread of the device could not be created.
    #[error("device resource: {what}")]
    Resource {
        /// What was being created.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A virtqueue set shared by the transport (configuration registers, save) and the device
/// worker (processing). The worker holds the lock for one batch at a time.
pub type Queues = Arc<Mutex<Vec<Queue>>>;

/// Locks `m` even if a thread panicked while holding it: the protected data is plain state
/// that stays meaningful.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The interrupt line of one virtio-mmio device: the InterruptStatus register plus the
/// `EventFd` the VMM registered as a KVM irqfd for the device's GSI.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
    raised: AtomicU64,
}

impl Interrupt {
    /// An interrupt line that signals `irq`.
    pub fn new(irq: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irq, raised: AtomicU64::new(0) }
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.raised.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(error = %e, "virtio irqfd write failed");
        }
    }

    /// Used-buffer notification: the device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    /// Configuration-change notification.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Re-raises the line if a status bit is pending (after a restore, where an edge in
    /// flight at the checkpoint may not have reached the interrupt controller).
    fn resend_pending(&self) {
        if self.status() != 0 {
            self.raised.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.irq.write(1) {
                tracing::warn!(error = %e, "virtio irqfd write failed");
            }
        }
    }

    /// How many times the interrupt was raised (a counter for tests and metrics).
    pub fn raised_count(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// The queues, configured by the driver (event index already set per the features).
    pub queues: Queues,
    /// The features the driver acknowledged.
    pub acked_features: u64,
    /// The device's interrupt line.
    pub interrupt: Arc<Interrupt>,
}

/// A virtio device behind a [`VirtioMmio`] transport.
pub trait VirtioDevice: Send {
    /// The virtio device type (1 = network card).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the slice's length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers.
    fn avail_features(&self) -> u64;
    /// A guest read of the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A guest write to the device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts processing the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError>;
    /// Stops processing; on return the device no longer touches the queues or guest memory.
    fn reset(&mut self);
    /// The driver notified queue `index` (a QueueNotify write).
    fn queue_notify(&self, index: u32);
    /// Parks the device's workers; on return they touch neither guest memory nor the queues
    /// until [`VirtioDevice::resume`].
    fn pause(&mut self);
    /// Lets paused workers run again.
    fn resume(&mut self);
}
