//! `VmState`: everything but memory needed to bring a paused VM back, and its encoding.
//!
//! Encoded as a fixed header (magic, format version, body length, crc32 of the body) and a
//! CBOR body. CBOR is self-describing, so a newer build reads an older state (new fields are
//! `#[serde(default)]`) and an older build ignores fields it does not know.

use kvm_bindings::{kvm_clock_data, kvm_pit_state2};
use serde::{Deserialize, Serialize};

use crate::devices::serial::SerialState;
use crate::vcpu::persist::VcpuState;

/// Magic at the start of an encoded state.
pub const STATE_MAGIC: [u8; 8] = *b"USTVMST\0";
/// Largest body accepted (a VM with 64 vCPUs is well below 2 MiB).
pub const MAX_STATE_BYTES: u64 = 16 << 20;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4 + 4;

/// Version of the `VmState` layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmStateVersion(pub u32);

impl VmStateVersion {
    /// What this build writes.
    pub const CURRENT: Self = Self(1);
    /// The oldest this build reads.
    pub const OLDEST: Self = Self(1);
}

/// The state of a paused VM, memory excluded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmState {
    /// Layout version of this state.
    pub version: VmStateVersion,
    /// Guest memory layout as (guest-physical start, size) pairs.
    pub memory: Vec<(u64, u64)>,
    /// Every vCPU.
    pub vcpus: Vec<VcpuState>,
    /// The master 8259 (raw `kvm_irqchip`).
    #[serde(with = "serde_bytes")]
    pub pic_master: Vec<u8>,
    /// The slave 8259 (raw `kvm_irqchip`).
    #[serde(with = "serde_bytes")]
    pub pic_slave: Vec<u8>,
    /// The IOAPIC (raw `kvm_irqchip`).
    #[serde(with = "serde_bytes")]
    pub ioapic: Vec<u8>,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// COM1.
    pub serial: SerialState,
    /// The virtio-net device, if the VM has one.
    #[serde(default)]
    pub net: Option<crate::devices::virtio::net::NetState>,
    /// The kernel command line (informational).
    #[serde(default)]
    pub cmdline: String,
}

/// Errors decoding an encoded state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Fewer bytes than a header.
    #[error("vm state truncated: {got} bytes, header needs {need}")]
    TruncatedHeader {
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Wrong magic.
    #[error("not a vm state (magic {0:02x?})")]
    Magic([u8; 8]),
    /// A version this build cannot read.
    #[error("vm state version {found}; this build reads {oldest}..={current}")]
    Version {
        /// Version found.
        found: u32,
        /// Oldest readable.
        oldest: u32,
        /// Newest readable.
        current: u32,
    },
    /// The body is larger than the cap.
    #[error("vm state body of {0} bytes exceeds the {MAX_STATE_BYTES} byte cap")]
    TooLarge(u64),
    /// The body is shorter than the header says.
    #[error("vm state truncated: body has {got} of {expected} bytes")]
    TruncatedBody {
        /// Bytes present.
        got: usize,
        /// Bytes announced.
        expected: u64,
    },
    /// The header's own checksum is wrong.
    #[error("vm state header crc mismatch")]
    HeaderCrc,
    /// The body checksum is wrong.
    #[error("vm state body crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BodyCrc {
        /// crc in the header.
        stored: u32,
        /// crc of the bytes.
        computed: u32,
    },
    /// The body is not a valid CBOR `VmState`.
    #[error("vm state body does not decode: {0}")]
    Decode(String),
    /// Encoding failed.
    #[error("vm state does not encode: {0}")]
    Encode(String),
    /// The state decodes but no VM could be built from it over the given memory.
    #[error("vm state cannot be restored: {0}")]
    NotRestorable(String),
}

impl VmState {
    /// Checks what restoring needs before any VM is built: the memory layout equals `layout`,
    /// there are 1..=255 vCPUs with distinct ids, and the interrupt controllers have their
    /// exact sizes. A backup runs it on every checkpoint it commits, so a state that could not
    /// be promoted is refused at commit instead of being discovered at failover.
    pub fn check_restorable(&self, layout: &[(u64, u64)]) -> Result<(), StateError> {
        let bad = |m: String| Err(StateError::NotRestorable(m));
        if self.memory != layout {
            return bad(format!("memory layout {:x?} does not match this host's {:x?}", self.memory, layout));
        }
        if self.vcpus.is_empty() || self.vcpus.len() > usize::from(u8::MAX) {
            return bad(format!("{} vcpus saved; 1 to {} can be restored", self.vcpus.len(), u8::MAX));
        }
        let mut ids: Vec<u32> = self.vcpus.iter().map(|v| u32::from(v.id)).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.vcpus.len() {
            return bad("two saved vcpus have the same id".into());
        }
        let chip = std::mem::size_of::<kvm_bindings::kvm_irqchip>();
        for (what, bytes) in
            [("pic master", &self.pic_master), ("pic slave", &self.pic_slave), ("ioapic", &self.ioapic)]
        {
            if bytes.len() != chip {
                return bad(format!("{what} state is {} bytes, expected {chip}", bytes.len()));
            }
        }
        Ok(())
    }

    /// Encodes header + CBOR body.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let mut body = Vec::with_capacity(16 << 10);
        ciborium::into_writer(self, &mut body).map_err(|e| StateError::Encode(e.to_string()))?;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&VmStateVersion::CURRENT.0.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // flags
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        let header_crc = crc32fast::hash(&out);
        out.extend_from_slice(&header_crc.to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes and verifies an encoded state; never panics, whatever the input.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.len() < HEADER_LEN {
            return Err(StateError::TruncatedHeader { got: bytes.len(), need: HEADER_LEN });
        }
        let magic: [u8; 8] = bytes[0..8].try_into().expect("8 bytes");
        if magic != STATE_MAGIC {
            return Err(StateError::Magic(magic));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let version = u32_at(8);
        let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let body_crc = u32_at(24);
        if crc32fast::hash(&bytes[..28]) != u32_at(28) {
            return Err(StateError::HeaderCrc);
        }
        if version < VmStateVersion::OLDEST.0 || version > VmStateVersion::CURRENT.0 {
            return Err(StateError::Version {
                found: version,
                oldest: VmStateVersion::OLDEST.0,
                current: VmStateVersion::CURRENT.0,
            });
        }
        if len > MAX_STATE_BYTES {
            return Err(StateError::TooLarge(len));
        }
        let body = &bytes[HEADER_LEN..];
        if (body.len() as u64) < len {
            return Err(StateError::TruncatedBody { got: body.len(), expected: len });
        }
        let body = &body[..len as usize];
        let computed = crc32fast::hash(body);
        if computed != body_crc {
            return Err(StateError::BodyCrc { stored: body_crc, computed });
        }
        ciborium::from_reader(body).map_err(|e| StateError::Decode(e.to_string()))
    }
}

/// A small valid `VmState` for other crates' tests (not a real VM's state).
#[doc(hidden)]
pub mod tests_support {
    use super::*;

    /// One vCPU with a recognisable rip, everything else default.
    pub fn sample_state() -> VmState {
        super::tests::sample()
    }
}

pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> VmState {
        let regs = kvm_bindings::kvm_regs { rip: 0x1234, ..Default::default() };
        VmState {
            version: VmStateVersion::CURRENT,
            memory: vec![(0, 256 << 20)],
            vcpus: vec![VcpuState {
                id: 0,
                regs,
                sregs: Default::default(),
                fpu: vec![1, 2, 3],
                xsave: vec![0; 4096],
                xcrs: Default::default(),
                msrs: vec![(0x10, 99)],
                lapic: Default::default(),
                mp_state: Default::default(),
                events: Default::default(),
                debugregs: Default::default(),
                tsc_khz: Some(2_000_000),
                cpuid: vec![],
            }],
            pic_master: vec![0; std::mem::size_of::<kvm_bindings::kvm_irqchip>()],
            pic_slave: vec![0; std::mem::size_of::<kvm_bindings::kvm_irqchip>()],
            ioapic: vec![0; std::mem::size_of::<kvm_bindings::kvm_irqchip>()],
            pit: Default::default(),
            clock: Default::default(),
            serial: Default::default(),
            net: None,
            cmdline: "workload=counter".into(),
        }
    }

    #[cfg(test)]
    #[test]
    fn round_trip() {
        let s = sample();
        let bytes = s.encode().unwrap();
        assert_eq!(VmState::decode(&bytes).unwrap(), s);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_rejected() {
        let bytes = sample().encode().unwrap();
        for cut in 0..bytes.len() {
            assert!(VmState::decode(&bytes[..cut]).is_err(), "truncated at {cut} accepted");
        }
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(VmState::decode(&b).is_err(), "flip at {i} accepted");
        }
    }

    /// Random states of every shape (random registers and raw structures, any number of vCPUs,
    /// MSRs, CPUID entries, memory ranges, with and without a net device) round-trip, and their
    /// encoding is stable: decode(encode(s)) == s and encode(decode(encode(s))) == encode(s).
    #[test]
    fn random_states_round_trip() {
        use crate::devices::virtio::net::NetState;
        use crate::devices::virtio::persist::{MmioState, QueueState};

        // The fuzz smoke tests' generator (a dev-dependency).
        use replication_proto::fuzzing::smoke::Rng;

        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..300 {
            let mut s = sample();
            s.memory = (0..round % 5).map(|i| (i << 32, 4096 * (i + 1))).collect();
            s.pic_master = rng.bytes(600);
            s.pic_slave = rng.bytes(600);
            s.ioapic = rng.bytes(600);
            s.serial.line_control = round as u8;
            s.serial.in_buffer = rng.bytes(80);
            s.cmdline = String::from_utf8_lossy(&rng.bytes(200)).into_owned();
            s.clock.clock = rng.next_u64();
            s.pit.flags = rng.next_u64() as u32;
            let v0 = s.vcpus[0].clone();
            s.vcpus = (0..round % 4)
                .map(|id| {
                    let mut v = v0.clone();
                    v.id = id as u8;
                    v.regs.rip = rng.next_u64();
                    v.regs.rsp = rng.next_u64();
                    v.sregs.cr3 = rng.next_u64();
                    v.fpu = rng.bytes(600);
                    v.xsave = rng.bytes(5000);
                    v.lapic.regs.iter_mut().for_each(|r| *r = rng.next_u64() as _);
                    v.msrs = (0..rng.next_u64() % 40).map(|_| (rng.next_u64() as u32, rng.next_u64())).collect();
                    v.cpuid = (0..rng.next_u64() % 8)
                        .map(|_| kvm_bindings::kvm_cpuid_entry2 {
                            function: rng.next_u64() as u32,
                            eax: rng.next_u64() as u32,
                            ..Default::default()
                        })
                        .collect();
                    v.tsc_khz = rng.next_u64().is_multiple_of(2).then(|| rng.next_u64() as u32);
                    v
                })
                .collect();
            s.net = (round % 3 != 0).then(|| NetState {
                mac: [round as u8, 1, 2, 3, 4, 5],
                event_idx: round % 2 == 0,
                rx_delivered: rng.next_u64(),
                mmio: MmioState {
                    status: rng.next_u64() as u32,
                    acked_features: rng.next_u64(),
                    queues: (0..round % 3)
                        .map(|_| QueueState {
                            size: rng.next_u64() as u16,
                            desc_table: rng.next_u64(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            });
            let encoded = s.encode().unwrap();
            let decoded = VmState::decode(&encoded).unwrap();
            assert_eq!(decoded, s, "round {round}");
            assert_eq!(decoded.encode().unwrap(), encoded, "round {round}: encoding not stable");
        }
    }

    #[test]
    fn a_state_that_cannot_be_restored_is_named() {
        let s = sample();
        assert!(s.check_restorable(&[(0, 256 << 20)]).is_ok());
        let e = s.check_restorable(&[(0, 128 << 20)]).unwrap_err().to_string();
        assert!(e.contains("memory layout"), "{e}");
        let mut no_vcpus = sample();
        no_vcpus.vcpus.clear();
        assert!(no_vcpus.check_restorable(&[(0, 256 << 20)]).unwrap_err().to_string().contains("0 vcpus"));
        let mut twins = sample();
        twins.vcpus.push(twins.vcpus[0].clone());
        assert!(twins.check_restorable(&[(0, 256 << 20)]).unwrap_err().to_string().contains("same id"));
        let mut chip = sample();
        chip.ioapic.truncate(3);
        assert!(chip.check_restorable(&[(0, 256 << 20)]).unwrap_err().to_string().contains("ioapic state is 3 bytes"));
    }

    #[test]
    fn errors_name_the_problem() {
        let mut bytes = sample().encode().unwrap();
        bytes[8] = 9;
        let h = crc32fast::hash(&bytes[..28]);
        bytes[28..32].copy_from_slice(&h.to_le_bytes());
        assert_eq!(VmState::decode(&bytes).unwrap_err().to_string(), "vm state version 9; this build reads 1..=1");
        assert!(
            VmState::decode(b"garbage garbage garbage garbage!").unwrap_err().to_string().contains("not a vm state")
        );
    }
}
