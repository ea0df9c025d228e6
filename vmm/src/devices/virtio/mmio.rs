//! The virtio-mmio register file, modern layout (version 2), virtio 1.x section 4.2.2.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::persist::{MmioState, QueueState};
use super::{Activation, Interrupt, Queues, VirtioDevice, VirtioError, features, lock, status};
use crate::bus::BusDevice;

/// Size of a device's MMIO window: registers at 0x000..0x100, configuration space after.
pub const MMIO_WINDOW_SIZE: u64 = 0x200;
/// "virt" in little-endian ASCII.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern transport.
const MMIO_VERSION: u32 = 2;
/// VendorID we report: "UNDS" ("Understudy").
pub const VENDOR_ID: u32 = 0x554e_4453;

// Register offsets (virtio 1.x, table 4.1).
pub(crate) const REG_MAGIC_VALUE: u64 = 0x000;
pub(crate) const REG_VERSION: u64 = 0x004;
pub(crate) const REG_DEVICE_ID: u64 = 0x008;
pub(crate) const REG_VENDOR_ID: u64 = 0x00c;
pub(crate) const REG_DEVICE_FEATURES: u64 = 0x010;
pub(crate) const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub(crate) const REG_DRIVER_FEATURES: u64 = 0x020;
pub(crate) const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub(crate) const REG_QUEUE_SEL: u64 = 0x030;
pub(crate) const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub(crate) const REG_QUEUE_NUM: u64 = 0x038;
pub(crate) const REG_QUEUE_READY: u64 = 0x044;
pub(crate) const REG_QUEUE_NOTIFY: u64 = 0x050;
pub(crate) const REG_INTERRUPT_STATUS: u64 = 0x060;
pub(crate) const REG_INTERRUPT_ACK: u64 = 0x064;
pub(crate) const REG_STATUS: u64 = 0x070;
pub(crate) const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub(crate) const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub(crate) const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub(crate) const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub(crate) const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub(crate) const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub(crate) const REG_SHM_SEL: u64 = 0x0ac;
pub(crate) const REG_SHM_LEN_LOW: u64 = 0x0b0;
pub(crate) const REG_SHM_LEN_HIGH: u64 = 0x0b4;
pub(crate) const REG_SHM_BASE_LOW: u64 = 0x0b8;
pub(crate) const REG_SHM_BASE_HIGH: u64 = 0x0bc;
pub(crate) const REG_QUEUE_RESET: u64 = 0x0c0;
pub(crate) const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// The kernel command-line entry that makes a Linux guest probe a virtio-mmio device at
/// `base` raising `gsi`: `virtio_mmio.device=512@0xd0000000:5`.
pub fn mmio_cmdline_entry(base: u64, gsi: u32) -> String {
    format!("virtio_mmio.device={MMIO_WINDOW_SIZE}@{base:#x}:{gsi}")
}

/// A virtio device on the MMIO bus: the transport's registers around a [`VirtioDevice`].
///
/// Guest accesses arrive through [`BusDevice`] from vCPU threads. The VMM keeps an
/// `Arc<Mutex<VirtioMmio<D>>>` (a clone of the one on the bus) to pause, resume and save.
pub struct VirtioMmio<D: VirtioDevice> {
    device: D,
    interrupt: Arc<Interrupt>,
    queues: Queues,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    shm_sel: u32,
    active: bool,
    /// QueueNotify writes that reached this register file through the MMIO bus (each a vCPU
    /// exit to the VMM): none once the VMM hands the doorbells to KVM as ioeventfds.
    bus_notifies: u64,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// Puts `device` behind a fresh register file (status 0). `irq` is the `EventFd` the VMM
    /// registered as a KVM irqfd for the device's GSI.
    pub fn new(device: D, irq: EventFd) -> Result<Self, VirtioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &max)| Queue::new(max).map_err(|source| VirtioError::QueueState { index, source }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            interrupt: Arc::new(Interrupt::new(irq)),
            queues: Arc::new(std::sync::Mutex::new(queues)),
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            shm_sel: 0,
            active: false,
            bus_notifies: 0,
        })
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device behind the transport, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// QueueNotify writes that came through the MMIO bus, each a vCPU exit to the VMM (0 when
    /// the doorbells are KVM ioeventfds, as `Vm::boot` and `Vm::restore` register them).
    pub fn bus_notifies(&self) -> u64 {
        self.bus_notifies
    }

    /// The interrupt line (InterruptStatus and the irqfd).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver set DRIVER_OK and the device is processing its queues.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Parks the device's workers; returns once they are parked. Call with vCPUs paused.
    pub fn pause(&mut self) {
        self.device.pause();
    }

    /// Lets the device's workers run again.
    pub fn resume(&mut self) {
        self.device.resume();
    }

    /// Tells the driver the configuration space changed (bumps ConfigGeneration and raises
    /// a configuration-change interrupt).
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
    }

    /// Captures the register file and queues. The device must be paused (or inactive).
    pub fn save_transport(&self) -> MmioState {
        MmioState {
            device_type: self.device.device_type(),
            avail_features: self.device.avail_features(),
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            shm_sel: self.shm_sel,
            queues: lock(&self.queues).iter().map(QueueState::from_queue).collect(),
        }
    }

    /// Rebuilds the transport around `device` from `state`. A device that was live is
    /// activated again and kicked on every queue, so work the guest queued before the
    /// checkpoint is picked up; a pending interrupt is raised again.
    pub fn restore_transport(device: D, irq: EventFd, state: &MmioState) -> Result<Self, VirtioError> {
        let mut t = Self::new(device, irq)?;
        let expected = t.device.device_type();
        if state.device_type != expected {
            return Err(VirtioError::DeviceType { expected, found: state.device_type });
        }
        let expected = t.device.queue_max_sizes().len();
        if state.queues.len() != expected {
            return Err(VirtioError::QueueCount { expected, found: state.queues.len() });
        }
        let unknown = state.acked_features & !t.device.avail_features();
        if unknown != 0 {
            return Err(VirtioError::Features(unknown));
        }
        let queues = state.queues.iter().enumerate().map(|(i, q)| q.to_queue(i)).collect::<Result<Vec<_>, _>>()?;
        *lock(&t.queues) = queues;
        t.acked_features = state.acked_features;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        t.status = state.status;
        t.config_generation = state.config_generation;
        t.shm_sel = state.shm_sel;
        t.interrupt.set_status(state.interrupt_status);
        let live = status::DRIVER_OK | status::FEATURES_OK;
        if t.status & live == live && t.status & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0 {
            t.device.activate(Activation {
                queues: t.queues.clone(),
                acked_features: t.acked_features,
                interrupt: t.interrupt.clone(),
            })?;
            t.active = true;
            for i in 0..expected {
                t.device.queue_notify(i as u32);
            }
        }
        t.interrupt.resend_pending();
        tracing::info!(
            device_type = expected,
            status = format_args!("{:#x}", t.status),
            active = t.active,
            "virtio-mmio device restored"
        );
        Ok(t)
    }

    fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Back to the state after power-on: the device stops, queues and negotiation are
    /// forgotten. Nothing of the device touches guest memory after this returns.
    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in lock(&self.queues).iter_mut() {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        self.status = 0;
        self.interrupt.set_status(0);
        tracing::info!(device_type = self.device_type(), "virtio device reset");
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET belongs to the device: sticky until reset, never set by the driver.
        let new = (new & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if old & !new != 0 {
            tracing::warn!(
                old = format_args!("{old:#x}"),
                new = format_args!("{new:#x}"),
                "virtio driver cleared status bits without a reset; ignored"
            );
            return;
        }
        let mut new = new;
        let added = new & !old;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.avail_features();
            let unknown = self.acked_features & !offered;
            let version_1 = self.acked_features & (1 << features::VERSION_1) != 0;
            if unknown != 0 || !version_1 {
                tracing::warn!(
                    acked = format_args!("{:#x}", self.acked_features),
                    offered = format_args!("{offered:#x}"),
                    "virtio features rejected"
                );
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                tracing::warn!("virtio DRIVER_OK without FEATURES_OK; ignored");
                new &= !status::DRIVER_OK;
            } else if let Err(e) = self.activate() {
                tracing::error!(error = %e, "virtio device activation failed");
                new |= status::DEVICE_NEEDS_RESET;
                self.status = new;
                self.notify_config_change();
                return;
            }
        }
        if added & status::FAILED != 0 {
            tracing::warn!(device_type = self.device_type(), "virtio driver failed the device");
        }
        tracing::debug!(
            device_type = self.device_type(),
            old = format_args!("{old:#x}"),
            new = format_args!("{new:#x}"),
            "virtio status"
        );
        self.status = new;
    }

    fn activate(&mut self) -> Result<(), VirtioError> {
        let event_idx = self.acked_features & (1 << features::RING_EVENT_IDX) != 0;
        for q in lock(&self.queues).iter_mut() {
            q.set_event_idx(event_idx);
        }
        self.device.activate(Activation {
            queues: self.queues.clone(),
            acked_features: self.acked_features,
            interrupt: self.interrupt.clone(),
        })?;
        self.active = true;
        tracing::info!(
            device_type = self.device_type(),
            features = format_args!("{:#x}", self.acked_features),
            "virtio device activated"
        );
        Ok(())
    }

    fn with_queue<R>(&self, f: impl FnOnce(&mut Queue) -> R) -> Option<R> {
        let mut queues = lock(&self.queues);
        queues.get_mut(self.queue_sel as usize).map(f)
    }

    /// Runs `f` on the selected queue if the driver may still configure it.
    fn configure_queue(&mut self, what: &str, f: impl FnOnce(&mut Queue)) {
        // Queues are set up between FEATURES_OK and DRIVER_OK; like QEMU, only a live device
        // (or a ready queue) refuses changes, so a driver that is early still works.
        let allowed = self.status & status::DRIVER_OK == 0;
        let sel = self.queue_sel;
        let done = self.with_queue(|q| {
            if q.ready() || !allowed {
                false
            } else {
                f(q);
                true
            }
        });
        if done != Some(true) {
            tracing::warn!(queue = sel, register = what, "virtio queue write ignored");
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.with_queue(|q| q.max_size().into()).unwrap_or(0),
            REG_QUEUE_READY => self.with_queue(|q| q.ready().into()).unwrap_or(0),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: a length of all ones means "not present".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_QUEUE_RESET => 0,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::warn!(offset = format_args!("{offset:#x}"), "virtio-mmio read of unknown register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                if self.status & (status::FEATURES_OK | status::FAILED) != 0 {
                    tracing::warn!(
                        value = format_args!("{v:#x}"),
                        "virtio DriverFeatures write out of sequence; ignored"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
                    sel if v != 0 => {
                        tracing::warn!(
                            sel,
                            value = format_args!("{v:#x}"),
                            "virtio driver acked features beyond bit 63"
                        );
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                let size = u16::try_from(v).unwrap_or(0);
                self.configure_queue("QueueNum", |q| q.set_size(size));
            }
            REG_QUEUE_READY => match v {
                1 => self.configure_queue("QueueReady", |q| q.set_ready(true)),
                0 => {
                    let _ = self.with_queue(|q| q.set_ready(false));
                }
                _ => tracing::warn!(value = v, "virtio QueueReady write of a value other than 0 or 1"),
            },
            REG_QUEUE_NOTIFY => {
                self.bus_notifies += 1;
                // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index.
                if self.active {
                    self.device.queue_notify(v & 0xffff);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            REG_QUEUE_DESC_LOW => self.configure_queue("QueueDescLow", |q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH => self.configure_queue("QueueDescHigh", |q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_DRIVER_LOW => self.configure_queue("QueueDriverLow", |q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_DRIVER_HIGH => {
                self.configure_queue("QueueDriverHigh", |q| q.set_avail_ring_address(None, Some(v)))
            }
            REG_QUEUE_DEVICE_LOW => self.configure_queue("QueueDeviceLow", |q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_DEVICE_HIGH => {
                self.configure_queue("QueueDeviceHigh", |q| q.set_used_ring_address(None, Some(v)))
            }
            REG_SHM_SEL => self.shm_sel = v,
            _ => {
                tracing::warn!(
                    offset = format_args!("{offset:#x}"),
                    value = format_args!("{v:#x}"),
                    "virtio-mmio write of unknown register"
                );
            }
        }
    }
}

impl<D: VirtioDevice> BusDevice for VirtioMmio<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::warn!(
                offset = format_args!("{offset:#x}"),
                len = data.len(),
                "virtio-mmio register read not 32-bit aligned"
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                offset = format_args!("{offset:#x}"),
                len = data.len(),
                "virtio-mmio register write not 32-bit"
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            tracing::warn!(offset = format_args!("{offset:#x}"), "virtio-mmio register write not aligned");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

impl<D: VirtioDevice> Drop for VirtioMmio<D> {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::{INT_CONFIG, INT_USED_RING};

    /// A device that records what the transport asks of it.
    struct Dummy {
        log: Arc<Mutex<Vec<String>>>,
        sizes: Vec<u16>,
        fail_activate: bool,
        config: [u8; 8],
    }

    impl Dummy {
        fn new() -> (Self, Arc<Mutex<Vec<String>>>) {
            let log = Arc::new(Mutex::new(Vec::new()));
            let d =
                Dummy { log: log.clone(), sizes: vec![16, 8], fail_activate: false, config: [1, 2, 3, 4, 5, 6, 7, 8] };
            (d, log)
        }
        fn note(&self, s: String) {
            self.log.lock().unwrap().push(s);
        }
    }

    const DUMMY_FEATURES: u64 = (1 << features::VERSION_1) | (1 << features::RING_EVENT_IDX) | 1;

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn avail_features(&self) -> u64 {
            DUMMY_FEATURES
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.note(format!("config {offset} {data:?}"));
        }
        fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
            let q = lock(&a.queues);
            self.note(format!(
                "activate {:#x} event_idx={} sizes={},{}",
                a.acked_features,
                q[0].event_idx_enabled(),
                q[0].size(),
                q[1].size()
            ));
            if self.fail_activate {
                return Err(VirtioError::QueueInvalid(0));
            }
            Ok(())
        }
        fn reset(&mut self) {
            self.note("reset".into());
        }
        fn queue_notify(&self, index: u32) {
            self.note(format!("notify {index}"));
        }
        fn pause(&mut self) {
            self.note("pause".into());
        }
        fn resume(&mut self) {
            self.note("resume".into());
        }
    }

    fn transport() -> (VirtioMmio<Dummy>, Arc<Mutex<Vec<String>>>, EventFd) {
        let (d, log) = Dummy::new();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = VirtioMmio::new(d, irq.try_clone().unwrap()).unwrap();
        (t, log, irq)
    }

    fn last(log: &Arc<Mutex<Vec<String>>>) -> String {
        log.lock().unwrap().last().cloned().unwrap_or_default()
    }

    #[test]
    fn identity_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(rd(&mut t, 0x000), 0x7472_6976);
        assert_eq!(rd(&mut t, 0x004), 2);
        assert_eq!(rd(&mut t, 0x008), 42);
        assert_eq!(rd(&mut t, 0x00c), VENDOR_ID);
        assert_eq!(rd(&mut t, REG_CONFIG_GENERATION), 0);
        // Shared memory regions: none.
        assert_eq!(rd(&mut t, 0x0b0), u32::MAX);
        // Sub-word register reads return zeros; config space is byte-addressable.
        let mut b = [0xffu8; 2];
        t.read(0x000, &mut b);
        assert_eq!(b, [0, 0]);
        t.read(0x102, &mut b);
        assert_eq!(b, [3, 4]);
        let mut b = [0u8; 8];
        t.read(0x100, &mut b);
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        t.read(0x106, &mut b[..4]);
        assert_eq!(&b[..4], &[7, 8, 0, 0]);
        t.write(0x104, &[9]);
        t.write(0x001, &[1, 2, 3, 4]); // unaligned: ignored
        assert_eq!(rd(&mut t, 0x000), 0x7472_6976);
    }

    #[test]
    fn cmdline_entry_format() {
        assert_eq!(mmio_cmdline_entry(0xd000_0000, 5), "virtio_mmio.device=512@0xd0000000:5");
        assert_eq!(MMIO_WINDOW_SIZE, 512);
    }

    #[test]
    fn feature_negotiation() {
        let (mut t, log, _) = transport();
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), (1 << 29) | 1);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 0);

        // Without VERSION_1 the modern transport refuses FEATURES_OK.
        let s = negotiate(&mut t, 1);
        assert_eq!(s & status::FEATURES_OK, 0);
        // Features the device does not offer are refused too (write them by hand).
        wr(&mut t, REG_STATUS, 0);
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 1 | 2);
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(rd(&mut t, REG_STATUS) & status::FEATURES_OK, 0);

        let s = negotiate(&mut t, u64::MAX);
        assert_ne!(s & status::FEATURES_OK, 0);
        // After FEATURES_OK the driver cannot change its mind.
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, REG_DRIVER_FEATURES, 0);
        assert_eq!(t.save_transport().acked_features, DUMMY_FEATURES);

        // DRIVER_OK activates with the acked features and event index on the queues.
        DriverQueue::new(0x10000, 16).setup(&mut t, 0);
        DriverQueue::new(0x20000, 8).setup(&mut t, 1);
        let s = driver_ok(&mut t);
        assert_ne!(s & status::DRIVER_OK, 0);
        assert!(t.is_active());
        assert_eq!(last(&log), format!("activate {DUMMY_FEATURES:#x} event_idx=true sizes=16,8"));
    }

    #[test]
    fn queue_setup_rules() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, u64::MAX);
        wr(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 8);
        wr(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0, "no queue 2");
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        wr(&mut t, REG_QUEUE_NUM, 4); // ignored, no such queue

        let q = DriverQueue::new(0x1_0000_0000, 4);
        q.setup(&mut t, 0);
        // A ready queue keeps its configuration.
        wr(&mut t, REG_QUEUE_NUM, 2);
        wr(&mut t, REG_QUEUE_DESC_LOW, 0x5000);
        let s = t.save_transport();
        assert_eq!(s.queues[0].size, 4);
        assert_eq!(s.queues[0].desc_table, 0x1_0000_0000);
        assert_eq!(s.queues[0].avail_ring, 0x1_0000_1000);
        assert_eq!(s.queues[0].used_ring, 0x1_0000_2000);
        assert!(s.queues[0].ready);
        // Invalid sizes are refused (not a power of two, above the maximum).
        wr(&mut t, REG_QUEUE_SEL, 1);
        wr(&mut t, REG_QUEUE_NUM, 6);
        wr(&mut t, REG_QUEUE_NUM, 16);
        assert_eq!(t.save_transport().queues[1].size, 8);
        // Unready again and reconfigurable.
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        wr(&mut t, REG_QUEUE_NUM, 2);
        assert_eq!(t.save_transport().queues[0].size, 2);
    }

    #[test]
    fn notify_interrupt_and_reset() {
        let (mut t, log, irq) = transport();
        negotiate(&mut t, u64::MAX);
        // Notifications before DRIVER_OK go nowhere.
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert!(!last(&log).starts_with("notify"));
        DriverQueue::new(0x10000, 16).setup(&mut t, 0);
        DriverQueue::new(0x20000, 8).setup(&mut t, 1);
        driver_ok(&mut t);
        wr(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(last(&log), "notify 1");

        t.interrupt().signal_used_queue();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING);
        t.notify_config_change();
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING | INT_CONFIG);
        assert_eq!(rd(&mut t, REG_CONFIG_GENERATION), 1);
        wr(&mut t, REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG);

        // Clearing status bits other than by writing 0 is ignored.
        let s = rd(&mut t, REG_STATUS);
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        assert_eq!(rd(&mut t, REG_STATUS), s);

        // Reset: the device stops, everything the driver set is forgotten.
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(last(&log), "reset");
        assert!(!t.is_active());
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
        let s = t.save_transport();
        assert_eq!(s.acked_features, 0);
        assert!(s.queues.iter().all(|q| !q.ready && q.desc_table == 0));
        assert_eq!(s.queues[0].size, 16);
        wr(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn failed_activation_needs_reset() {
        let (mut t, _, irq) = transport();
        t.device_mut().fail_activate = true;
        negotiate(&mut t, u64::MAX);
        let s = driver_ok(&mut t);
        assert_ne!(s & status::DEVICE_NEEDS_RESET, 0);
        assert!(!t.is_active());
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG);
        // The driver can still mark the device FAILED; NEEDS_RESET stays until a reset.
        let s = rd(&mut t, REG_STATUS);
        wr(&mut t, REG_STATUS, (s & !status::DEVICE_NEEDS_RESET) | status::FAILED);
        assert_eq!(rd(&mut t, REG_STATUS), s | status::FAILED, "FAILED added, NEEDS_RESET kept");
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        // DRIVER_OK without FEATURES_OK is refused.
        let (mut t, log, _) = transport();
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
        assert_eq!(rd(&mut t, REG_STATUS), status::ACKNOWLEDGE | status::DRIVER);
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn save_restore_transport() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, u64::MAX);
        DriverQueue::new(0x10000, 16).setup(&mut t, 0);
        DriverQueue::new(0x20000, 8).setup(&mut t, 1);
        driver_ok(&mut t);
        t.interrupt().signal_used_queue();
        wr(&mut t, REG_QUEUE_SEL, 1);
        let saved = t.save_transport();

        let (d, log) = Dummy::new();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut r = VirtioMmio::restore_transport(d, irq.try_clone().unwrap(), &saved).unwrap();
        assert_eq!(r.save_transport(), saved);
        assert!(r.is_active());
        let log = log.lock().unwrap().clone();
        assert_eq!(log[0], format!("activate {DUMMY_FEATURES:#x} event_idx=true sizes=16,8"));
        assert_eq!(&log[1..], ["notify 0", "notify 1"]);
        // The pending used-ring interrupt is raised again.
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rd(&mut r, REG_INTERRUPT_STATUS), INT_USED_RING);
        assert_eq!(rd(&mut r, REG_QUEUE_NUM_MAX), 8);

        // States for another device or from a device with other features are refused.
        let (d, _) = Dummy::new();
        let wrong = MmioState { device_type: 1, ..saved.clone() };
        let irq2 = || EventFd::new(EFD_NONBLOCK).unwrap();
        assert!(matches!(VirtioMmio::restore_transport(d, irq2(), &wrong), Err(VirtioError::DeviceType { .. })));
        let (d, _) = Dummy::new();
        let wrong = MmioState { acked_features: saved.acked_features | 1 << 40, ..saved.clone() };
        assert!(matches!(VirtioMmio::restore_transport(d, irq2(), &wrong), Err(VirtioError::Features(_))));
        let (d, _) = Dummy::new();
        let mut wrong = saved.clone();
        wrong.queues.pop();
        assert!(matches!(VirtioMmio::restore_transport(d, irq2(), &wrong), Err(VirtioError::QueueCount { .. })));
        // An inactive device restores inactive.
        let (d, log) = Dummy::new();
        let idle = MmioState { status: status::ACKNOWLEDGE, ..saved };
        let r = VirtioMmio::restore_transport(d, irq2(), &idle).unwrap();
        assert!(!r.is_active());
        assert!(log.lock().unwrap().is_empty());
    }
}
