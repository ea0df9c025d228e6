//! vCPU state: capture and restore of everything KVM keeps for a vCPU.

use kvm_bindings::{
    CpuId, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::persist::{PodSizeError, pod_bytes, pod_from_bytes};

/// MSR numbers with ordering constraints on restore.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Errors capturing or restoring vCPU state; each names the ioctl that failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM vCPU ioctl failed.
    #[error("vcpu {vcpu}: {what}")]
    Ioctl {
        /// vCPU index.
        vcpu: u8,
        /// The operation, e.g. `get sregs`.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only part of the MSRs.
    #[error("vcpu {vcpu}: kvm set {set} of {total} msrs, stopped at msr {msr:#x}")]
    MsrsPartial {
        /// vCPU index.
        vcpu: u8,
        /// How many were set.
        set: usize,
        /// How many were given.
        total: usize,
        /// The first MSR KVM refused.
        msr: u32,
    },
    /// A FAM structure could not be built.
    #[error("vcpu {vcpu}: {what}: too many entries")]
    Fam {
        /// vCPU index.
        vcpu: u8,
        /// Which list.
        what: &'static str,
    },
    /// A saved raw structure has the wrong size.
    #[error("vcpu {vcpu}")]
    Size {
        /// vCPU index.
        vcpu: u8,
        /// What is wrong.
        #[source]
        source: PodSizeError,
    },
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u8,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU state as raw bytes (superseded by `xsave` on restore, kept for inspection).
    #[serde(with = "serde_bytes")]
    pub fpu: Vec<u8>,
    /// Extended state (FPU, SSE, AVX, ...): the raw 4 KiB `kvm_xsave` area.
    #[serde(with = "serde_bytes")]
    pub xsave: Vec<u8>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Every MSR KVM lists that can be read, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Multiprocessing state (runnable, halted, ...).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// TSC frequency in kHz, when KVM reports one.
    pub tsc_khz: Option<u32>,
    /// The CPUID table given to the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

/// The MSRs of `fd` that can be read, out of those KVM lists. KVM_GET_MSRS stops at the first
/// MSR it cannot read; we drop that one and go on.
pub fn readable_msrs(kvm: &Kvm, fd: &VcpuFd) -> Result<Vec<u32>, VcpuStateError> {
    let listed = kvm.get_msr_index_list().map_err(|source| VcpuStateError::Ioctl {
        vcpu: 0,
        what: "get msr index list",
        source,
    })?;
    let mut candidates: Vec<u32> = listed.as_slice().to_vec();
    let mut good = Vec::with_capacity(candidates.len());
    while !candidates.is_empty() {
        let entries: Vec<kvm_msr_entry> =
            candidates.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Fam { vcpu: 0, what: "msrs" })?;
        let n = fd.get_msrs(&mut msrs).map_err(|source| VcpuStateError::Ioctl { vcpu: 0, what: "get msrs", source })?;
        good.extend_from_slice(&candidates[..n]);
        if n < candidates.len() {
            tracing::debug!("msr {:#x} is listed but not readable; left out of vcpu state", candidates[n]);
            candidates.drain(..=n);
        } else {
            break;
        }
    }
    Ok(good)
}

/// The parts of a vCPU's state that the VMM sets before it first runs and that never change
/// afterwards: its CPUID (KVM refuses a different one once the vCPU ran) and its TSC frequency
/// (only KVM_SET_TSC_KHZ changes it, which this VMM calls only on a vCPU it is restoring).
/// Read once per vCPU and reused by every later capture, they save two ioctls (~20 µs here)
/// per checkpoint pause.
#[derive(Debug, Clone)]
pub struct Fixed {
    /// CPUID entries.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// TSC frequency, when KVM reports one.
    pub tsc_khz: Option<u32>,
}

/// Reads a vCPU's [`Fixed`] parts.
pub fn save_fixed(id: u8, fd: &VcpuFd) -> Result<Fixed, VcpuStateError> {
    let cpuid = fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(|source| VcpuStateError::Ioctl {
        vcpu: id,
        what: "get cpuid",
        source,
    })?;
    Ok(Fixed { cpuid: cpuid.as_slice().to_vec(), tsc_khz: fd.get_tsc_khz().ok() })
}

/// Captures the state of a paused vCPU.
pub fn save(id: u8, fd: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, VcpuStateError> {
    save_synced(id, fd, msr_list, &save_fixed(id, fd)?, false)
}

/// Captures the state of a paused vCPU whose [`Fixed`] parts were read before. With `synced`,
/// the registers, special registers and events are taken from the fd's `kvm_run` (copied there
/// by KVM, `KVM_CAP_SYNC_REGS`) instead of three ioctls. The FPU part is always taken from the XSAVE
/// area's legacy region (what KVM_GET_FPU reads), one ioctl less.
pub fn save_synced(
    id: u8,
    fd: &VcpuFd,
    msr_list: &[u32],
    fixed: &Fixed,
    synced: bool,
) -> Result<VcpuState, VcpuStateError> {
    let io = |what: &'static str| move |source| VcpuStateError::Ioctl { vcpu: id, what, source };
    let entries: Vec<kvm_msr_entry> =
        msr_list.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Fam { vcpu: id, what: "msrs" })?;
    let n = fd.get_msrs(&mut msrs).map_err(io("get msrs"))?;
    if n < entries.len() {
        return Err(VcpuStateError::MsrsPartial { vcpu: id, set: n, total: entries.len(), msr: entries[n].index });
    }
    let (regs, sregs, events) = if synced {
        let r = fd.sync_regs();
        (r.regs, r.sregs, r.events)
    } else {
        (
            fd.get_regs().map_err(io("get regs"))?,
            fd.get_sregs().map_err(io("get sregs"))?,
            fd.get_vcpu_events().map_err(io("get vcpu events"))?,
        )
    };
    let xsave = fd.get_xsave().map_err(io("get xsave"))?;
    Ok(VcpuState {
        id,
        regs,
        sregs,
        fpu: pod_bytes(&fpu_of_xsave(&xsave)),
        xsave: pod_bytes(&xsave),
        xcrs: fd.get_xcrs().map_err(io("get xcrs"))?,
        msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
        lapic: fd.get_lapic().map_err(io("get lapic"))?,
        mp_state: fd.get_mp_state().map_err(io("get mp state"))?,
        events,
        debugregs: fd.get_debug_regs().map_err(io("get debug regs"))?,
        tsc_khz: fixed.tsc_khz,
        cpuid: fixed.cpuid.clone(),
    })
}

/// What KVM_GET_FPU returns, read from an XSAVE area's legacy (FXSAVE) region: control,
/// status and abridged tag words, last opcode, instruction and data pointers, MXCSR, the x87
/// registers (offset 32) and the XMM registers (offset 160). A restore sets the XSAVE area
/// after the FPU, so the XSAVE area is what the restored vCPU holds either way.
pub fn fpu_of_xsave(xsave: &kvm_xsave) -> kvm_fpu {
    let mut legacy = [0u8; 512];
    for (chunk, word) in legacy.chunks_exact_mut(4).zip(xsave.region.iter()) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    let u16_at = |o: usize| u16::from_le_bytes([legacy[o], legacy[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(legacy[o..o + 8].try_into().expect("8 bytes"));
    let mut fpu = kvm_fpu {
        fcw: u16_at(0),
        fsw: u16_at(2),
        ftwx: legacy[4],
        last_opcode: u16_at(6),
        last_ip: u64_at(8),
        last_dp: u64_at(16),
        mxcsr: u32::from_le_bytes(legacy[24..28].try_into().expect("4 bytes")),
        ..Default::default()
    };
    for (i, r) in fpu.fpr.iter_mut().enumerate() {
        r.copy_from_slice(&legacy[32 + 16 * i..48 + 16 * i]);
    }
    for (i, r) in fpu.xmm.iter_mut().enumerate() {
        r.copy_from_slice(&legacy[160 + 16 * i..176 + 16 * i]);
    }
    fpu
}

/// Restores a vCPU's state into a freshly created vCPU fd, in an order KVM accepts: CPUID
/// and TSC frequency first, the TSC before the TSC deadline, the LAPIC before MSRs that
/// depend on its mode, events last.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    let id = state.id;
    let io = |what: &'static str| move |source| VcpuStateError::Ioctl { vcpu: id, what, source };
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuStateError::Fam { vcpu: id, what: "cpuid" })?;
    fd.set_cpuid2(&cpuid).map_err(io("set cpuid"))?;
    if let Some(khz) = state.tsc_khz {
        match fd.get_tsc_khz() {
            Ok(cur) if cur == khz => {}
            _ => fd.set_tsc_khz(khz).map_err(io("set tsc khz"))?,
        }
    }
    fd.set_sregs(&state.sregs).map_err(io("set sregs"))?;
    fd.set_regs(&state.regs).map_err(io("set regs"))?;
    let size = |source| VcpuStateError::Size { vcpu: id, source };
    let fpu: kvm_fpu = pod_from_bytes("fpu", &state.fpu).map_err(size)?;
    fd.set_fpu(&fpu).map_err(io("set fpu"))?;
    let xsave: kvm_xsave = pod_from_bytes("xsave", &state.xsave).map_err(size)?;
    // SAFETY: `xsave` is a whole legacy 4 KiB kvm_xsave (size checked by pod_from_bytes);
    // KVM_SET_XSAVE reads exactly that much.
    unsafe { fd.set_xsave(&xsave) }.map_err(io("set xsave"))?;
    fd.set_xcrs(&state.xcrs).map_err(io("set xcrs"))?;
    fd.set_debug_regs(&state.debugregs).map_err(io("set debug regs"))?;
    fd.set_lapic(&state.lapic).map_err(io("set lapic"))?;
    let mut ordered: Vec<(u32, u64)> = state.msrs.clone();
    ordered.sort_by_key(|&(i, _)| match i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    let entries: Vec<kvm_msr_entry> =
        ordered.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Fam { vcpu: id, what: "msrs" })?;
    let n = fd.set_msrs(&msrs).map_err(io("set msrs"))?;
    if n < entries.len() {
        return Err(VcpuStateError::MsrsPartial { vcpu: id, set: n, total: entries.len(), msr: entries[n].index });
    }
    fd.set_mp_state(state.mp_state).map_err(io("set mp state"))?;
    fd.set_vcpu_events(&state.events).map_err(io("set vcpu events"))?;
    Ok(())
}
