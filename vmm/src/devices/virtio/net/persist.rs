//! Save and restore of a virtio-net device with its transport.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::{DEFAULT_QUEUE_SIZE, Net, NetConfig, NetError, TxSink};
use crate::devices::tap::Tap;
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::VirtioMmio;
use crate::devices::virtio::persist::MmioState;
use crate::memory::GuestMemory;
use crate::persist::Persist;

/// The state of a virtio-net device and its virtio-mmio transport.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetState {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Whether the device offered VIRTIO_F_EVENT_IDX.
    pub event_idx: bool,
    /// Registers, negotiated features, interrupt status and queues.
    pub mmio: MmioState,
    /// Frames delivered to the guest up to this state ([`Net::rx_delivered`]): a promoted
    /// replica replays only the forwarded frames numbered above it (0 from an older build).
    pub rx_delivered: u64,
}

/// What restoring a net device needs besides its state: host resources.
pub struct NetRestoreArgs {
    /// The VM's guest memory, already holding the checkpoint's pages.
    pub mem: GuestMemory,
    /// The irqfd registered for the device's GSI.
    pub irq: EventFd,
    /// The TAP on this host.
    pub tap: Arc<Tap>,
    /// Where transmitted frames go.
    pub sink: Box<dyn TxSink>,
    /// Come back paused (as a restored `Vm` does): the worker starts parked and picks up
    /// pending work at the first `resume`.
    pub paused: bool,
}

impl Persist for VirtioMmio<Net> {
    type State = NetState;
    type ConstructorArgs = NetRestoreArgs;
    type Error = NetError;

    /// Captures the device. Call it with vCPUs and the device paused.
    fn save(&self) -> NetState {
        NetState {
            mac: self.device().mac(),
            event_idx: self.device().config().event_idx,
            mmio: self.save_transport(),
            rx_delivered: self.device().rx_delivered(),
        }
    }

    /// Rebuilds the device. If the driver had it live, the worker starts (parked if
    /// `args.paused`) and looks at both queues once, and a pending interrupt is raised again.
    fn restore(args: NetRestoreArgs, state: &NetState) -> Result<Self, NetError> {
        let queue_size = state.mmio.queues.first().map_or(DEFAULT_QUEUE_SIZE, |q| q.max_size);
        let config = NetConfig { mac: state.mac, queue_size, event_idx: state.event_idx };
        let mut net = Net::new(args.mem, args.tap, args.sink, config)?;
        net.set_rx_delivered(state.rx_delivered);
        if args.paused {
            net.pause();
        }
        Ok(VirtioMmio::restore_transport(net, args.irq, &state.mmio)?)
    }
}
