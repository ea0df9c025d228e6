//! Saved state of the virtio-mmio transport and its queues.
//!
//! Plain serde types, every field defaulted, so that a newer VMM can read an older state.

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use super::VirtioError;

/// One split virtqueue, as the device sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueueState {
    /// The maximum size the device offers.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used (device) ring.
    pub used_ring: u64,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    /// Whether VIRTIO_F_EVENT_IDX suppression is in use on this queue.
    pub event_idx_enabled: bool,
}

impl QueueState {
    /// Captures `queue`. The device must be quiescent: every used entry it added has been
    /// followed by a notification decision, so nothing else of the queue's state is pending.
    pub fn from_queue(queue: &Queue) -> Self {
        let s = queue.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }

    /// Rebuilds the queue; `index` names it in errors.
    pub fn to_queue(&self, index: usize) -> Result<Queue, VirtioError> {
        let state = virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(|source| VirtioError::QueueState { index, source })
    }
}

/// The virtio-mmio register file of one device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MmioState {
    /// The virtio device type, checked on restore.
    pub device_type: u32,
    /// The features the device offered when saved.
    pub avail_features: u64,
    /// The features the driver acknowledged.
    pub acked_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// The device status register.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// SHMSel.
    pub shm_sel: u32,
    /// The queues, in device order.
    pub queues: Vec<QueueState>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    #[test]
    fn queue_round_trip_and_validation() {
        let mut q = Queue::new(256).unwrap();
        q.set_size(64);
        q.set_desc_table_address(Some(0x1000), None);
        q.set_avail_ring_address(Some(0x2000), Some(1));
        q.set_used_ring_address(Some(0x3000), None);
        q.set_ready(true);
        q.set_event_idx(true);
        q.set_next_avail(7);
        q.set_next_used(5);
        let s = QueueState::from_queue(&q);
        assert_eq!(s.avail_ring, 0x1_0000_2000);
        let back = s.to_queue(0).unwrap();
        assert_eq!(back, q);
        let bad = QueueState { size: 48, ..s.clone() };
        assert!(matches!(bad.to_queue(1), Err(VirtioError::QueueState { index: 1, .. })));
        let bad = QueueState { used_ring: 0x3002, ..s };
        assert!(bad.to_queue(0).is_err());
    }

    #[test]
    fn missing_fields_default() {
        // A state written by an older VMM that knew fewer fields still decodes.
        #[derive(Serialize)]
        struct Old {
            status: u32,
        }
        let mut buf = Vec::new();
        ciborium::into_writer(&Old { status: 15 }, &mut buf).unwrap();
        let s: MmioState = ciborium::from_reader(buf.as_slice()).unwrap();
        assert_eq!(s.status, 15);
        assert!(s.queues.is_empty());
    }
}
