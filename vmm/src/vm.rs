//! A KVM virtual machine: memory, in-kernel irqchip and PIT, vCPUs, devices.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError};
use crate::bus::{Bus, BusDevice, BusError};
use crate::devices::serial::{SerialDevice, SerialError, SerialOut};
use crate::devices::tap::Tap;
use crate::devices::virtio::mmio_cmdline_entry;
use crate::devices::virtio::net::{Net, NetConfig, NetRestoreArgs, TapSink, TxSink};
use crate::devices::virtio::{REG_QUEUE_NOTIFY, VirtioMmio};
use crate::dirty::{DirtyPages, HotPages, HotPagesConfig, or_into};
use crate::layout;
use crate::memory::{self, GuestMemory, MemoryError};
use crate::persist::{Persist, pod_bytes, pod_from_bytes};
use crate::state::{VmState, VmStateVersion};
use crate::vcpu::persist::{self as vcpu_persist, VcpuState, VcpuStateError};
use crate::vcpu::{StopReason, VcpuError, VcpuHandle, Vcpus};

/// Errors creating, running, capturing or restoring a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM VM ioctl failed.
    #[error("kvm: {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The configuration is unusable.
    #[error("bad vm config: {0}")]
    Config(String),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Booting the kernel failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A device range clashes.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// vCPU thread management failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// vCPU state capture or restore failed.
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    /// Serial state restore failed.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// The network device could not be set up.
    #[error("virtio-net: {0}")]
    Net(String),
    /// An eventfd could not be created.
    #[error("create eventfd")]
    EventFd(#[source] std::io::Error),
    /// The operation needs the VM paused.
    #[error("vm must be paused for {0}")]
    NotPaused(&'static str),
    /// Saved state does not fit this VM.
    #[error("vm state: {0}")]
    State(String),
}

/// What to boot.
pub struct VmConfig {
    /// ELF kernel with a PVH entry note.
    pub kernel: PathBuf,
    /// Kernel command line (device entries are appended by the VMM).
    pub cmdline: String,
    /// Guest memory in bytes (a multiple of 4 KiB).
    pub memory_bytes: u64,
    /// Number of vCPUs (1..=64).
    pub vcpus: u8,
    /// Where COM1's output goes.
    pub serial: SerialOut,
    /// A virtio-net device backed by a TAP, if any.
    pub net: Option<NetSpec>,
}

/// A virtio-net device to attach.
#[derive(Clone, Debug)]
pub struct NetSpec {
    /// Name of an existing TAP device on this host (or a pattern like `tap%d` to create one).
    pub tap: String,
    /// The guest's MAC address (default 02:55:44:00:00:01).
    pub mac: Option<[u8; 6]>,
}

/// Host resources a restored VM needs.
pub struct RestoreOptions {
    /// Where COM1's output goes.
    pub serial: SerialOut,
    /// The TAP for the saved virtio-net device, if it had one.
    pub tap: Option<String>,
    /// That TAP already open in this process (a backup holds its TAP open while it stands by:
    /// `backup::lan_copy`); when given, `tap` is not opened again.
    pub open_tap: Option<Arc<Tap>>,
}

/// The VM's virtio-net device.
pub type NetDevice = Arc<Mutex<VirtioMmio<Net>>>;

/// The host end of a restored virtio-net device.
enum NetHost {
    /// Open the TAP of this name, and send straight to it (a restore in a fresh process);
    /// none is an error if the saved VM has a net device.
    Named(Option<String>),
    /// A TAP this process holds open, and the sink for the guest's frames (a rebuild).
    Open(Arc<Tap>, Box<dyn TxSink>),
}

impl NetHost {
    fn resolve(self) -> Result<(Arc<Tap>, Box<dyn TxSink>), VmError> {
        match self {
            NetHost::Named(Some(name)) => {
                let tap = open_tap(&name)?;
                Ok((Arc::clone(&tap), Box::new(TapSink::new(tap))))
            }
            NetHost::Named(None) => {
                Err(VmError::Config("the saved vm has a virtio-net device: give a tap to restore it".into()))
            }
            NetHost::Open(tap, sink) => Ok((tap, sink)),
        }
    }
}

/// The sink of a net device that must send nothing: the new device of a [`Vm::rebuild`]
/// until the hand-over, the old one after it. It refuses every frame (counted as dropped).
struct NoSink;

impl TxSink for NoSink {
    fn send(&mut self, _frame: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("the device has no sink"))
    }
}

/// A running (or paused) VM.
pub struct Vm {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    memory: GuestMemory,
    vcpus: Vcpus,
    msr_list: Vec<u32>,
    serial: Arc<Mutex<SerialDevice>>,
    net: Option<NetDevice>,
    dirty_logging: bool,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is on: a harvest reads the log, then protects again
    /// only the pages [`Vm::harvest_dirty`] chooses (all of them without a [`HotPages`] rule).
    manual_protect: bool,
    hot: Option<Box<HotPages>>,
    paused: bool,
    cmdline: String,
    /// With [`Vm::set_capture_at_park`]: the state each vCPU thread captured as it parked,
    /// with the pause's number.
    parked_states: Option<Arc<ParkedStates>>,
}

/// Per vCPU: the state its thread captured as it parked, and for which pause.
type ParkedStates = Mutex<Vec<Option<(u64, Result<VcpuState, VcpuStateError>)>>>;

fn region_bitmap(region: &crate::memory::GuestRegion) -> &crate::memory::Bitmap {
    let mapping: &vm_memory::mmap::MmapRegion<crate::memory::Bitmap> = region;
    mapping.bitmap()
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn check_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(VmError::OpenKvm)
}

/// The parts every VM has, before vCPUs or devices are configured.
struct Skeleton {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    handles: Vec<VcpuHandle>,
    msr_list: Vec<u32>,
}

/// A KVM VM built ahead of time over memory that will later hold a guest's state, such as a
/// backup's replica or a paused VM's own memory ([`Vm::prepare_rebuild`]): the VM, its irqchip and PIT, the memory slots and the vCPUs with their
/// CPUID, everything [`Vm::restore`] builds before it loads any state. Building that took ~1 ms
/// on a quiet host but 7-10 ms at the moment of a failover here (measured: the part before the
/// vCPUs, i.e. the VM, irqchip, PIT and memory slots; why it is slower then is not pinned
/// down), most of a promotion; [`Vm::restore_prepared`] then only loads state. The price: a
/// process holding one takes ~15-20 ms longer to die (a probe: dropping a VM with an in-kernel
/// irqchip took 7-27 ms, without one 0.2 ms), so its peers see its death that much later. It
/// keeps a handle on the memory's mapping, so the slots never outlive it; it never runs or
/// writes the memory.
pub struct PreparedVm {
    sk: Skeleton,
    memory: GuestMemory,
}

impl std::fmt::Debug for PreparedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedVm")
            .field("vcpus", &self.sk.handles.len())
            .field("regions", &host_regions(&self.memory))
            .finish()
    }
}

impl PreparedVm {
    /// Builds a VM with `vcpus` vCPUs over `memory` (the same mapping later given to
    /// [`Vm::restore_prepared`]; the memory's contents may change meanwhile).
    pub(crate) fn new(memory: &GuestMemory, vcpus: u8) -> Result<Self, VmError> {
        Ok(Self { sk: build_skeleton(memory, vcpus)?, memory: memory.clone() })
    }

    /// The number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.sk.handles.len()
    }

    /// Whether it was built over this very mapping.
    pub fn fits(&self, memory: &GuestMemory) -> bool {
        host_regions(&self.memory) == host_regions(memory)
    }
}

/// A paused vCPU's state; its fixed parts are read at the first capture and reused.
fn capture_vcpu(
    id: u8,
    fd: &VcpuFd,
    msr_list: &[u32],
    fixed: &std::sync::OnceLock<vcpu_persist::Fixed>,
    synced: bool,
) -> Result<VcpuState, VcpuStateError> {
    let fixed = match fixed.get() {
        Some(f) => f,
        None => {
            let f = vcpu_persist::save_fixed(id, fd)?;
            fixed.get_or_init(|| f)
        }
    };
    vcpu_persist::save_synced(id, fd, msr_list, fixed, synced)
}

/// `(guest-physical start, length, host address)` of each region.
fn host_regions(memory: &GuestMemory) -> Vec<(u64, u64, u64)> {
    memory.iter().map(|r| (r.start_addr().raw_value(), r.len(), r.as_ptr() as u64)).collect()
}

fn build_skeleton(memory: &GuestMemory, vcpus: u8) -> Result<Skeleton, VmError> {
    if vcpus == 0 || vcpus > 64 {
        return Err(VmError::Config(format!("{vcpus} vcpus; use 1 to 64")));
    }
    let kvm = check_kvm()?;
    let vm_fd = kvm.create_vm().map_err(|e| VmError::Kvm("create vm", e))?;
    vm_fd.set_tss_address(layout::KVM_TSS_ADDRESS).map_err(|e| VmError::Kvm("set tss address", e))?;
    vm_fd
        .set_identity_map_address(layout::KVM_IDENTITY_MAP)
        .map_err(|e| VmError::Kvm("set identity map address", e))?;
    vm_fd.create_irq_chip().map_err(|e| VmError::Kvm("create irqchip", e))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm_fd.create_pit2(pit).map_err(|e| VmError::Kvm("create pit", e))?;
    set_memory_slots(&vm_fd, memory, false)?;
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmError::Kvm("get supported cpuid", e))?;
    let mut handles = Vec::new();
    let mut msr_list = Vec::new();
    for id in 0..vcpus {
        let fd = vm_fd.create_vcpu(u64::from(id)).map_err(|e| VmError::Kvm("create vcpu", e))?;
        let mut cpuid = supported.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
                0xb | 0x1f => e.edx = u32::from(id),
                _ => {}
            }
        }
        fd.set_cpuid2(&cpuid).map_err(|e| VmError::Kvm("set cpuid", e))?;
        if id == 0 {
            msr_list = vcpu_persist::readable_msrs(&kvm, &fd)?;
        }
        handles.push(VcpuHandle::new(id, fd));
    }
    Ok(Skeleton { kvm, vm_fd: Arc::new(vm_fd), handles, msr_list })
}

/// KVM_CLEAR_DIRTY_LOG over a whole slot of `pages` pages: clears (and write-protects again)
/// the pages whose bits are set in `bitmap`.
fn clear_dirty_log(vm_fd: &VmFd, slot: u32, pages: u64, bitmap: &mut [u64]) -> Result<(), VmError> {
    use std::os::fd::AsRawFd;
    const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xC018_AEC0;
    debug_assert!(bitmap.len() as u64 >= pages.div_ceil(64));
    let mut arg =
        kvm_bindings::kvm_clear_dirty_log { slot, num_pages: pages as u32, first_page: 0, ..Default::default() };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `arg` names a bitmap of at least `pages` bits that outlives the call; the kernel
    // only reads it.
    let rc = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &arg) };
    if rc != 0 {
        return Err(VmError::Kvm("clear dirty log", kvm_ioctls::Error::last()));
    }
    Ok(())
}

fn set_memory_slots(vm_fd: &VmFd, memory: &GuestMemory, log_dirty: bool) -> Result<(), VmError> {
    for (slot, region) in memory.iter().enumerate() {
        let host = region.as_ptr() as u64;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host,
            flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        };
        // SAFETY: the region's mapping lives as long as `memory`, which the Vm owns and keeps
        // until after the VM fd (and with it the memslots) is closed.
        unsafe { vm_fd.set_user_memory_region(r) }.map_err(|e| VmError::Kvm("set memory region", e))?;
    }
    Ok(())
}

fn build_buses(serial: Arc<Mutex<SerialDevice>>, net: Option<&NetDevice>) -> Result<(Bus, Bus), VmError> {
    let mut pio = Bus::new();
    pio.insert(serial, layout::COM1_PORT, 8)?;
    let mut mmio = Bus::new();
    if let Some(net) = net {
        mmio.insert(Arc::clone(net) as Arc<Mutex<dyn BusDevice>>, layout::VIRTIO_MMIO_BASE, layout::VIRTIO_MMIO_SIZE)?;
    }
    Ok((pio, mmio))
}

/// Hands the network device's doorbells to KVM: a QueueNotify write whose value is queue `i`
/// (datamatch, 4 bytes) signals that queue's eventfd in the kernel and the vCPU runs on, instead
/// of exiting to this process and re-entering KVM_RUN (~40-80 µs a doorbell on kvm-pvm, where
/// each re-entry reloads MSRs through the outer hypervisor). Every VMM does this for virtio;
/// the register's handler on the MMIO bus stays for writes that match no queue. A notify
/// before DRIVER_OK now reaches the eventfd too: the worker, started at activation, finds the
/// queues it names empty or not ready.
fn virtio_notify_ioevents(vm_fd: &VmFd, net: &NetDevice) -> Result<(), VmError> {
    let dev = lock(net);
    let addr = IoEventAddress::Mmio(layout::VIRTIO_MMIO_BASE + REG_QUEUE_NOTIFY);
    let mut i = 0u32;
    while let Some(evt) = dev.device().queue_evt(i as usize) {
        vm_fd.register_ioevent(evt, &addr, i).map_err(|e| VmError::Kvm("register virtio notify ioeventfd", e))?;
        i += 1;
    }
    Ok(())
}

fn virtio_irq(vm_fd: &VmFd, index: u32) -> Result<EventFd, VmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm_fd
        .register_irqfd(&evt, layout::VIRTIO_GSI_BASE + index)
        .map_err(|e| VmError::Kvm("register virtio irqfd", e))?;
    Ok(evt)
}

/// How long opening a TAP waits while another process still holds it (a dead VMM on this host
/// whose descriptors are not released yet).
const TAP_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens TAP `name` (waiting a little while another process still holds it) and brings it up.
pub fn open_tap(name: &str) -> Result<Arc<Tap>, VmError> {
    let tap = Tap::open_waiting(name, TAP_BUSY_WAIT).map_err(|e| {
        let why = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
        VmError::Net(format!("open tap {name}: {e}{why}"))
    })?;
    tap.set_up().map_err(|e| VmError::Net(format!("bring tap {name} up: {e}")))?;
    Ok(Arc::new(tap))
}

fn serial_irq(vm_fd: &VmFd) -> Result<EventFd, VmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm_fd.register_irqfd(&evt, layout::COM1_GSI).map_err(|e| VmError::Kvm("register serial irqfd", e))?;
    Ok(evt)
}

impl Vm {
    /// Creates a VM, loads the kernel and starts the vCPUs.
    pub fn boot(config: VmConfig) -> Result<Self, VmError> {
        if config.memory_bytes < (16 << 20) || !config.memory_bytes.is_multiple_of(memory::PAGE_SIZE as u64) {
            return Err(VmError::Config(format!(
                "memory of {} bytes; use at least 16 MiB, a multiple of 4 KiB",
                config.memory_bytes
            )));
        }
        let memory = memory::create_anonymous(config.memory_bytes)?;
        let sk = build_skeleton(&memory, config.vcpus)?;
        let mut cmdline = config.cmdline.clone();
        let net = match &config.net {
            Some(spec) => {
                let tap = open_tap(&spec.tap)?;
                let mut cfg = NetConfig::default();
                if let Some(mac) = spec.mac {
                    cfg.mac = mac;
                }
                let dev = Net::new(memory.clone(), Arc::clone(&tap), Box::new(TapSink::new(tap)), cfg)
                    .map_err(|e| VmError::Net(e.to_string()))?;
                let mmio = VirtioMmio::new(dev, virtio_irq(&sk.vm_fd, 0)?).map_err(|e| VmError::Net(e.to_string()))?;
                let entry = mmio_cmdline_entry(layout::VIRTIO_MMIO_BASE, layout::VIRTIO_GSI_BASE);
                cmdline = if cmdline.is_empty() { entry } else { format!("{cmdline} {entry}") };
                let net = Arc::new(Mutex::new(mmio));
                virtio_notify_ioevents(&sk.vm_fd, &net)?;
                Some(net)
            }
            None => None,
        };
        let entry = boot::load_pvh(&memory, &config.kernel, &cmdline)?;
        for h in &sk.handles {
            h.with_fd(|fd| -> Result<(), VmError> {
                let sregs = fd.get_sregs().map_err(|e| VmError::Kvm("get sregs", e))?;
                fd.set_sregs(&boot::entry_sregs(sregs)).map_err(|e| VmError::Kvm("set sregs", e))?;
                fd.set_regs(&boot::entry_regs(&entry)).map_err(|e| VmError::Kvm("set regs", e))?;
                Ok(())
            })?;
        }
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq(&sk.vm_fd)?, config.serial)));
        let (pio, mmio) = build_buses(Arc::clone(&serial), net.as_ref())?;
        let mut vcpus = Vcpus::new(sk.handles);
        vcpus.start(pio, mmio, false)?;
        tracing::info!(
            memory_mib = config.memory_bytes >> 20,
            vcpus = config.vcpus,
            entry = format_args!("{:#x}", entry.entry.raw_value()),
            "vm booted"
        );
        Ok(Self {
            kvm: sk.kvm,
            vm_fd: sk.vm_fd,
            memory,
            vcpus,
            msr_list: sk.msr_list,
            serial,
            net,
            dirty_logging: false,
            manual_protect: false,
            hot: None,
            paused: false,
            cmdline,
            parked_states: None,
        })
    }

    /// Builds a VM over `memory` (already holding the guest's pages) from saved state and
    /// leaves it paused: call [`Vm::resume`] to run it.
    pub fn restore(memory: GuestMemory, state: &VmState, opts: RestoreOptions) -> Result<Self, VmError> {
        Self::restore_prepared(None, memory, state, opts)
    }

    /// [`Vm::restore`] on a VM built ahead of time over `memory` ([`PreparedVm`]); one built
    /// over other memory or with another vCPU count is dropped and a VM is built afresh.
    pub fn restore_prepared(
        prepared: Option<PreparedVm>,
        memory: GuestMemory,
        state: &VmState,
        opts: RestoreOptions,
    ) -> Result<Self, VmError> {
        let net = match opts.open_tap {
            Some(tap) => NetHost::Open(Arc::clone(&tap), Box::new(TapSink::new(tap))),
            None => NetHost::Named(opts.tap),
        };
        Self::load(prepared, memory, state, opts.serial, net, "vm restored (paused)")
    }

    /// Builds a paused VM over `memory` from `state`, its console writing to `serial` and its
    /// virtio-net device (if the state has one) on `net`, and logs `what` with the time each
    /// part took: what [`Vm::restore_prepared`] and [`Vm::rebuild`] share.
    fn load(
        prepared: Option<PreparedVm>,
        memory: GuestMemory,
        state: &VmState,
        serial: SerialOut,
        net: NetHost,
        what: &'static str,
    ) -> Result<Self, VmError> {
        let layout_now: Vec<(u64, u64)> = memory.iter().map(|r| (r.start_addr().raw_value(), r.len())).collect();
        state.check_restorable(&layout_now).map_err(|e| VmError::State(e.to_string()))?;
        let t0 = std::time::Instant::now();
        let prepared = prepared.filter(|p| {
            let fits = p.fits(&memory) && p.vcpus() == state.vcpus.len();
            if !fits {
                tracing::warn!(
                    ?p,
                    vcpus = state.vcpus.len(),
                    "prepared vm does not fit the saved state: building anew"
                );
            }
            fits
        });
        let was_prepared = prepared.is_some();
        let sk = match prepared {
            Some(p) => p.sk,
            None => build_skeleton(&memory, state.vcpus.len() as u8)?,
        };
        let skeleton_ms = t0.elapsed().as_secs_f64() * 1e3;
        let vm_fd = &sk.vm_fd;
        vm_fd.set_pit2(&state.pit).map_err(|e| VmError::Kvm("set pit", e))?;
        let mut clock = state.clock;
        clock.flags = 0;
        vm_fd.set_clock(&clock).map_err(|e| VmError::Kvm("set clock", e))?;
        for (what, bytes) in
            [("pic master", &state.pic_master), ("pic slave", &state.pic_slave), ("ioapic", &state.ioapic)]
        {
            let chip: kvm_irqchip = pod_from_bytes(what, bytes).map_err(|e| VmError::State(e.to_string()))?;
            vm_fd.set_irqchip(&chip).map_err(|e| VmError::Kvm("set irqchip", e))?;
        }
        let t1 = std::time::Instant::now();
        for (h, vs) in sk.handles.iter().zip(&state.vcpus) {
            h.with_fd(|fd| vcpu_persist::restore(fd, vs))?;
        }
        let vcpu_state_ms = t1.elapsed().as_secs_f64() * 1e3;
        let t2 = std::time::Instant::now();
        let serial = SerialDevice::restore((serial_irq(vm_fd)?, serial), &state.serial)?;
        let serial = Arc::new(Mutex::new(serial));
        let net = match &state.net {
            Some(ns) => {
                let (tap, sink) = net.resolve()?;
                let args = NetRestoreArgs { mem: memory.clone(), irq: virtio_irq(vm_fd, 0)?, tap, sink, paused: true };
                let dev = VirtioMmio::<Net>::restore(args, ns).map_err(|e| VmError::Net(e.to_string()))?;
                let net = Arc::new(Mutex::new(dev));
                virtio_notify_ioevents(vm_fd, &net)?;
                Some(net)
            }
            None => None,
        };
        let (pio, mmio) = build_buses(Arc::clone(&serial), net.as_ref())?;
        let devices_ms = t2.elapsed().as_secs_f64() * 1e3;
        let t3 = std::time::Instant::now();
        let mut vcpus = Vcpus::new(sk.handles);
        vcpus.start(pio, mmio, true)?;
        let start_ms = t3.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            vcpus = state.vcpus.len(),
            prepared = was_prepared,
            skeleton_ms,
            vcpu_state_ms,
            devices_ms,
            start_ms,
            "{what}"
        );
        Ok(Self {
            kvm: sk.kvm,
            vm_fd: sk.vm_fd,
            memory,
            vcpus,
            msr_list: sk.msr_list,
            serial,
            net,
            dirty_logging: false,
            manual_protect: false,
            hot: None,
            paused: true,
            cmdline: state.cmdline.clone(),
            parked_states: None,
        })
    }

    /// Builds a KVM VM ahead of time over this VM's memory, with its vCPU count, for a later
    /// [`Vm::rebuild`] (as [`PreparedVm`] does for a backup's promotion). Works while the VM
    /// runs or is paused and never touches guest memory. Holding one has the price described
    /// at [`PreparedVm`].
    pub fn prepare_rebuild(&self) -> Result<PreparedVm, VmError> {
        let t0 = std::time::Instant::now();
        let vcpus = self.vcpus.handles().len();
        let vcpus = u8::try_from(vcpus).map_err(|_| VmError::Config(format!("{vcpus} vcpus; use 1 to 64")))?;
        let prepared = PreparedVm::new(&self.memory, vcpus)?;
        tracing::info!(vcpus, ms = t0.elapsed().as_secs_f64() * 1e3, "vm prepared for a rebuild");
        Ok(prepared)
    }

    /// Replaces this paused VM by one built from `state` over the same guest memory (this
    /// very mapping, whose contents the caller has brought to `state`'s instant): vCPUs,
    /// irqchips, PIT, clock, serial port and virtio-net device as [`Vm::restore_prepared`]
    /// restores them, on `prepared` when it fits (else on a VM built now). The new VM keeps
    /// this one's host ends: its console output, its TAP (the same open descriptor: a TAP
    /// cannot be opened again by name while it is open) and its net device's transmit sink,
    /// whatever the caller installed there. How a migration's source takes its guest back
    /// from a reverse checkpoint when the destination died.
    ///
    /// Every step that can fail comes first; on an error `self` is unchanged: the same VM,
    /// paused, with its console, sink and workers, ready to resume or to try again. Once the
    /// new VM is built, the old one's vCPU threads are ended and its net worker stopped for
    /// good (so only the new device ever reads the TAP or writes guest memory), and the two
    /// swap: afterwards `self` is the new VM, **paused** (announce and resume it), with dirty
    /// logging off whatever the old one had ([`Vm::enable_dirty_log`] turns it on again), and
    /// a fresh net device (re-fetch [`Vm::net`]; its counters start at zero). The returned
    /// `Vm` is the old shell: nothing runs in it any more, it keeps the old KVM VM alive until
    /// dropped, and dropping it takes 7-27 ms (a VM with an in-kernel irqchip), so drop it off
    /// the critical path.
    pub fn rebuild(&mut self, prepared: Option<PreparedVm>, state: &VmState) -> Result<Vm, VmError> {
        if !self.paused {
            tracing::warn!("rebuild refused: the vm runs");
            return Err(VmError::NotPaused("rebuild"));
        }
        let t0 = std::time::Instant::now();
        // The new device gets the TAP now and the sink at the hand-over: until then nothing of
        // this VM is taken, so an error leaves it whole.
        let net = match (&state.net, &self.net) {
            (Some(_), Some(old)) => NetHost::Open(Arc::clone(lock(old).device().tap()), Box::new(NoSink)),
            (None, None) => NetHost::Named(None),
            (Some(_), None) => {
                return Err(VmError::State("the saved vm has a virtio-net device and this one has none".into()));
            }
            (None, Some(_)) => {
                return Err(VmError::State("this vm has a virtio-net device and the saved one has none".into()));
            }
        };
        let what = "vm state loaded for a rebuild (paused)";
        let new = Self::load(prepared, self.memory.clone(), state, Box::new(std::io::sink()), net, what)
            .inspect_err(|e| tracing::warn!(error = %e, "rebuild failed: the vm is unchanged (paused)"))?;
        // Nothing below can fail. Hand over the console and the sink; retire the old VM.
        let t1 = std::time::Instant::now();
        let out = lock(&self.serial).replace_output(Box::new(std::io::sink()));
        lock(&new.serial).replace_output(out);
        if let (Some(old), Some(dev)) = (&self.net, &new.net) {
            let sink = lock(old).device().set_tx_sink(Box::new(NoSink));
            lock(dev).device().set_tx_sink(sink);
        }
        self.vcpus.shutdown();
        if let Some(old) = &self.net {
            lock(old).device_mut().retire();
        }
        let handover_ms = t1.elapsed().as_secs_f64() * 1e3;
        let old = std::mem::replace(self, new);
        tracing::info!(
            handover_ms,
            total_ms = t0.elapsed().as_secs_f64() * 1e3,
            net = self.net.is_some(),
            "vm rebuilt over the same memory (paused; the old vm is retired, dirty logging off)"
        );
        Ok(old)
    }

    /// The virtio-net device, if any (for swapping its transmit sink).
    pub fn net(&self) -> Option<&NetDevice> {
        self.net.as_ref()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The KVM VM fd (for device wiring: irqfds, ioeventfds).
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// The kernel command line the VM booted with.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Whether the vCPUs are parked.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops all vCPUs at an instruction boundary and quiesces devices.
    pub fn pause(&mut self) -> Result<(), VmError> {
        if !self.paused {
            self.vcpus.pause()?;
            // Closes the device worker's gate: no wake-up, it waits only for a batch in hand.
            if let Some(net) = &self.net {
                lock(net).pause();
            }
            self.paused = true;
        }
        Ok(())
    }

    /// Lets the guest run again.
    pub fn resume(&mut self) {
        if self.paused {
            if let Some(net) = &self.net {
                lock(net).resume();
            }
            self.vcpus.resume();
            self.paused = false;
        }
    }

    /// Has each vCPU thread capture its own state as it parks for a pause, beside whatever
    /// the pausing thread does meanwhile (the harvest, the page copy); [`Vm::save_state`] then
    /// takes those states instead of reading them itself, and every vCPU ioctl is made by the
    /// thread that last ran the vCPU. Off again with `false`.
    pub fn set_capture_at_park(&mut self, on: bool) {
        if !on {
            self.vcpus.set_park_work(None, false);
            self.parked_states = None;
            return;
        }
        let n = self.vcpus.handles().len();
        let states: Arc<ParkedStates> = Arc::new(Mutex::new((0..n).map(|_| None).collect()));
        let fixed: Vec<_> = self.vcpus.handles().iter().map(|h| Arc::clone(&h.fixed)).collect();
        let msr_list = Arc::new(self.msr_list.clone());
        let out = Arc::clone(&states);
        let sync_regs = self.kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_SYNC_REGS)) as u32
            & kvm_bindings::KVM_SYNC_X86_VALID_FIELDS
            == kvm_bindings::KVM_SYNC_X86_VALID_FIELDS;
        self.vcpus.set_park_work(
            Some(Arc::new(move |id: u8, pause: u64, fd: &mut VcpuFd, synced: bool| {
                let i = usize::from(id);
                let state = capture_vcpu(id, fd, &msr_list, &fixed[i], synced);
                lock(&out)[i] = Some((pause, state));
            })),
            sync_regs,
        );
        self.parked_states = Some(states);
    }

    /// Captures the whole VM state; the VM must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        if !self.paused {
            return Err(VmError::NotPaused("state capture"));
        }
        let pause = self.parked_states.as_ref().map(|_| self.vcpus.pause_number());
        let mut vcpus = Vec::new();
        for (i, h) in self.vcpus.handles().iter().enumerate() {
            // Holding the fd: a vCPU thread that captures as it parks has finished.
            let state = h.with_fd(|fd| {
                let parked =
                    self.parked_states.as_ref().and_then(|s| lock(s)[i].take()).filter(|(at, _)| Some(*at) == pause);
                match parked {
                    Some((_, state)) => state,
                    // No capture at park, or the thread parked before this pause was numbered
                    // (resumed and paused again before it went to sleep): read it here.
                    None => capture_vcpu(h.id, fd, &self.msr_list, &h.fixed, false),
                }
            })?;
            vcpus.push(state);
        }
        let chip = |chip_id: u32| -> Result<Vec<u8>, VmError> {
            let mut c = kvm_irqchip { chip_id, ..Default::default() };
            self.vm_fd.get_irqchip(&mut c).map_err(|e| VmError::Kvm("get irqchip", e))?;
            Ok(pod_bytes(&c))
        };
        self.serial.lock().unwrap_or_else(|e| e.into_inner()).flush();
        Ok(VmState {
            version: VmStateVersion::CURRENT,
            memory: self.memory.iter().map(|r| (r.start_addr().raw_value(), r.len())).collect(),
            vcpus,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.vm_fd.get_pit2().map_err(|e| VmError::Kvm("get pit", e))?,
            clock: self.vm_fd.get_clock().map_err(|e| VmError::Kvm("get clock", e))?,
            serial: self.serial.lock().unwrap_or_else(|e| e.into_inner()).save(),
            net: self.net.as_ref().map(|n| lock(n).save()),
            cmdline: self.cmdline.clone(),
        })
    }

    /// The digest of all guest memory ([`memory::digest`]); the VM must be paused.
    pub fn memory_digest(&self) -> Result<u64, VmError> {
        if !self.paused {
            return Err(VmError::NotPaused("memory digest"));
        }
        // SAFETY: the vCPUs and devices are paused (checked above): nothing writes guest memory.
        Ok(unsafe { memory::digest(&self.memory) })
    }

    /// Turns KVM dirty logging on for all guest memory and clears both dirty sources, so the
    /// next [`Vm::harvest_dirty`] returns what was written from now on. Every dirty page is
    /// protected again at each harvest until [`Vm::set_hot_pages`] says otherwise.
    pub fn enable_dirty_log(&mut self) -> Result<(), VmError> {
        if !self.manual_protect {
            // Without INITIALLY_SET: enabling the log still protects every page and starts
            // with an empty bitmap, as the classic log does.
            const MANUAL_PROTECT2: u32 = 168;
            if self.kvm.check_extension_raw(MANUAL_PROTECT2.into()) & 1 != 0 {
                let mut cap = kvm_bindings::kvm_enable_cap { cap: MANUAL_PROTECT2, ..Default::default() };
                cap.args[0] = 1;
                match self.vm_fd.enable_cap(&cap) {
                    Ok(()) => self.manual_protect = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "manual dirty-log protection refused: every dirty page is protected again at each harvest")
                    }
                }
            } else {
                tracing::warn!(
                    "KVM has no manual dirty-log protection: every dirty page is protected again at each harvest"
                );
            }
        }
        set_memory_slots(&self.vm_fd, &self.memory, true)?;
        self.dirty_logging = true;
        self.hot = None;
        for r in self.memory.iter() {
            region_bitmap(r).reset();
        }
        tracing::info!(manual_protect = self.manual_protect, "dirty logging on");
        Ok(())
    }

    /// From the next harvest on, keeps the pages the guest rewrites every epoch writable
    /// instead of protecting them again ([`HotPagesConfig`]; `max_epochs` 0 turns it off).
    /// Needs dirty logging on; returns whether the rule is in force (not without KVM's manual
    /// dirty-log protection). [`Vm::enable_dirty_log`] turns it off again.
    pub fn set_hot_pages(&mut self, config: HotPagesConfig) -> Result<bool, VmError> {
        if !self.dirty_logging {
            return Err(VmError::Config("dirty logging is off".into()));
        }
        if config.max_epochs == 0 || !self.manual_protect {
            self.hot = None;
            return Ok(false);
        }
        let slots: Vec<u64> = self.memory.iter().map(|r| r.len() / memory::PAGE_SIZE as u64).collect();
        self.hot = Some(Box::new(HotPages::new(config, &slots)));
        tracing::info!(
            max_epochs = config.max_epochs,
            max_pages = config.max_pages,
            "hot pages stay writable between harvests"
        );
        Ok(true)
    }

    /// Pages kept writable by the hot-page rule after the last harvest (0 without it).
    pub fn hot_pages(&self) -> u64 {
        self.hot.as_ref().map_or(0, |h| h.hot_pages())
    }

    /// Fetches the pages dirtied since the last harvest: the KVM dirty log OR the VMM's own
    /// writes, and clears both, except the hot pages [`Vm::set_hot_pages`] keeps writable
    /// (those are in this harvest and stay in the next ones). Call while paused for a
    /// consistent checkpoint.
    pub fn harvest_dirty(&mut self) -> Result<DirtyPages, VmError> {
        self.harvest(false)
    }

    /// [`Vm::harvest_dirty`] without the hot pages kept writable: for a copy taken while the
    /// guest runs (in-epoch pre-copy) that the pause's harvest completes. A kept page's bit
    /// stays set, so the next harvest returns it whether the guest writes it again or not;
    /// copying it now would be work done twice, and it would look re-dirtied.
    pub fn harvest_dirty_leaving_kept(&mut self) -> Result<DirtyPages, VmError> {
        self.harvest(true)
    }

    fn harvest(&mut self, leave_kept: bool) -> Result<DirtyPages, VmError> {
        if !self.dirty_logging {
            return Err(VmError::Config("dirty logging is off".into()));
        }
        let mut out = DirtyPages::default();
        if let Some(h) = self.hot.as_mut() {
            h.begin();
        }
        let mut protect = Vec::new();
        for (slot, region) in self.memory.iter().enumerate() {
            let mut words = self
                .vm_fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|e| VmError::Kvm("get dirty log", e))?;
            // Pages kept writable (in this harvest and, their bits left set, in the next).
            let mut kept = Vec::new();
            if self.manual_protect {
                // Protect again what the hot-page rule gives back, or everything (the kernel only
                // reads the bitmap).
                let again = match self.hot.as_mut() {
                    Some(h) => {
                        h.decide(slot, &words, &mut protect);
                        if leave_kept {
                            kept = words.iter().zip(&protect).map(|(w, p)| w & !p).collect();
                        }
                        &mut protect
                    }
                    None => &mut words,
                };
                if again.iter().any(|&w| w != 0) {
                    clear_dirty_log(&self.vm_fd, slot as u32, region.len() / memory::PAGE_SIZE as u64, again)?;
                }
            }
            or_into(&mut words, &region_bitmap(region).get_and_reset());
            for (w, k) in words.iter_mut().zip(&kept) {
                *w &= !k;
            }
            let base = region.start_addr().raw_value() / memory::PAGE_SIZE as u64;
            out.add_bitmap(base, &words, region.len() / memory::PAGE_SIZE as u64);
        }
        Ok(out)
    }

    /// Blocks until the VM stops by itself (or `timeout`); returns why.
    pub fn wait_stopped(&self, timeout: Option<Duration>) -> Option<StopReason> {
        self.vcpus.wait_stopped(timeout)
    }

    /// Why the VM stopped, if it did.
    pub fn stopped(&self) -> Option<StopReason> {
        self.vcpus.stopped()
    }

    /// Stops every vCPU thread and releases the VM.
    pub fn shutdown(&mut self) {
        self.vcpus.shutdown();
        self.net = None;
        self.serial.lock().unwrap_or_else(|e| e.into_inner()).flush();
        tracing::info!("vm shut down");
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The guest address of the first RAM byte past the boot structures (for tests).
    pub fn himem_start() -> GuestAddress {
        GuestAddress(layout::HIMEM_START)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The capture that reuses each vCPU's CPUID and TSC frequency ([`vcpu_persist::Fixed`])
    /// gives what a full read gives, pause after pause. Needs /dev/kvm and the fixture guest
    /// (`make guest`): fails, loudly, without them.
    fn boot_dirty_guest() -> Vm {
        let kernel = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest/understudy-guest");
        assert!(kernel.exists(), "{} missing: run `make guest`", kernel.display());
        Vm::boot(VmConfig {
            kernel,
            cmdline: "workload=dirty wss=1 rate=20000".into(),
            memory_bytes: 64 << 20,
            vcpus: 2,
            serial: Box::new(std::io::sink()),
            net: None,
        })
        .expect("boot (this test needs /dev/kvm)")
    }

    #[test]
    fn reused_fixed_vcpu_parts_capture_what_a_full_read_does() {
        let mut vm = boot_dirty_guest();
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(20));
            vm.pause().unwrap();
            let captured = vm.save_state().unwrap();
            for (h, got) in vm.vcpus.handles().iter().zip(&captured.vcpus) {
                assert!(h.fixed.get().is_some(), "the fixed parts are kept after the first capture");
                let full = h.with_fd(|fd| vcpu_persist::save(h.id, fd, &vm.msr_list)).unwrap();
                assert!(!full.cpuid.is_empty());
                // The reused parts, and what a paused vCPU cannot change (the TSC and the LAPIC
                // timer's count run on between the two reads).
                assert_eq!(got.cpuid, full.cpuid, "vcpu {}", h.id);
                assert_eq!(got.tsc_khz, full.tsc_khz, "vcpu {}", h.id);
                assert_eq!((got.regs, got.sregs, &got.xsave), (full.regs, full.sregs, &full.xsave), "vcpu {}", h.id);
            }
            vm.resume();
        }
    }

    /// With capture at park, each vCPU thread's own capture is what `save_state` returns, and
    /// it is the state of this pause: equal to a full read made afterwards while still paused.
    /// A capture left from an earlier pause is never used. Needs /dev/kvm and the fixture
    /// guest (`make guest`): fails, loudly, without them.
    #[test]
    fn a_state_captured_at_park_is_this_pauses_state() {
        let mut vm = boot_dirty_guest();
        vm.set_capture_at_park(true);
        for round in 0..6 {
            std::thread::sleep(Duration::from_millis(15));
            vm.pause().unwrap();
            let states = Arc::clone(vm.parked_states.as_ref().unwrap());
            let pause = vm.vcpus.pause_number();
            if round % 2 == 1 {
                // A capture said to be from the previous pause (as if a thread parked before
                // this pause was numbered): save_state must read the vCPU itself instead.
                for h in vm.vcpus.handles() {
                    h.with_fd(|_| ());
                    let mut g = lock(&states);
                    let slot = g[usize::from(h.id)].as_mut().expect("captured at park");
                    assert_eq!(slot.0, pause, "the capture names this pause");
                    slot.0 = pause - 1;
                    if let Ok(st) = slot.1.as_mut() {
                        st.regs.rip ^= 1;
                    }
                }
            }
            let captured = vm.save_state().unwrap();
            for (h, got) in vm.vcpus.handles().iter().zip(&captured.vcpus) {
                let full = h.with_fd(|fd| vcpu_persist::save(h.id, fd, &vm.msr_list)).unwrap();
                assert_eq!((got.regs, got.sregs, &got.xsave), (full.regs, full.sregs, &full.xsave), "vcpu {}", h.id);
                assert_eq!((got.mp_state, &got.xcrs), (full.mp_state, &full.xcrs), "vcpu {}", h.id);
                assert_eq!(got.events, full.events, "vcpu {}", h.id);
                // The FPU part comes from the XSAVE area: what KVM_GET_FPU reads, but for
                // MXCSR, which KVM_GET_FPU returns as 0 on this host (offset 408).
                let fpu = pod_bytes(&h.with_fd(|fd| fd.get_fpu()).unwrap());
                assert_eq!(got.fpu[..408], fpu[..408], "vcpu {}: fpu", h.id);
                assert!(lock(&states)[usize::from(h.id)].is_none(), "a capture is used once");
            }
            vm.resume();
        }
        // The registers came with the kick's own exit (KVM stored them as KVM_RUN returned),
        // not from one more KVM_RUN per capture, and were this pause's (compared above).
        let captures = 6 * vm.vcpus.handles().len() as u64;
        assert!(vm.vcpus.regs_at_kick() * 2 >= captures, "{} of {captures} at the kick", vm.vcpus.regs_at_kick());
        vm.set_capture_at_park(false);
        vm.pause().unwrap();
        assert!(vm.parked_states.is_none());
        vm.save_state().unwrap();
        vm.resume();
    }
}
