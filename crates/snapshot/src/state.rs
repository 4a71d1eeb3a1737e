//! Plain-data state of a vCPU, as KVM reports it.

use kvm_bindings::{kvm_debugregs, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs};
use serde::{Deserialize, Serialize};

/// Everything KVM holds for one vCPU that a restore needs.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index.
    pub id: u32,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state: the 4 KiB legacy XSAVE area (`kvm_xsave::region`).
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Pending exceptions, interrupts, NMIs and the interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Model-specific registers: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Runnable / halted.
    pub mp_state: kvm_mp_state,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}
