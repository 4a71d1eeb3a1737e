//! Reports of guest faults: which vCPU, where, and why, in words.

use kvm_ioctls::VcpuFd;
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// A fault that ended a guest.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FaultReport {
    /// The vCPU that faulted.
    pub vcpu: u32,
    /// Guest instruction pointer at the fault.
    pub rip: u64,
    /// Guest stack pointer at the fault.
    pub rsp: u64,
    /// What happened, in words.
    pub reason: String,
    /// Exception vector, for CPU exceptions.
    pub vector: Option<u8>,
    /// Error code the CPU pushed, if any.
    pub error_code: Option<u64>,
    /// Faulting address (CR2), for page faults.
    pub address: Option<u64>,
    /// Where RIP is in the guest's code: `function+offset (file:line)`, as much as the image's
    /// symbols and line tables tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

impl std::fmt::Display for FaultReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vCPU {} faulted at RIP {:#x}", self.vcpu, self.rip)?;
        if let Some(l) = &self.location {
            write!(f, " in {l}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

fn vector_name(v: u64) -> &'static str {
    match v {
        0 => "divide error (#DE)",
        1 => "debug exception (#DB)",
        2 => "non-maskable interrupt",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range exceeded (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack-segment fault (#SS)",
        13 => "general protection fault (#GP): privileged instruction or forbidden port/segment",
        14 => "page fault (#PF)",
        16 => "x87 floating-point error (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating-point exception (#XM)",
        21 => "control protection (#CP)",
        _ => "CPU exception",
    }
}

fn page_fault_detail(err: u64, cr2: u64) -> String {
    let access = if err & 0x10 != 0 {
        "executing"
    } else if err & 2 != 0 {
        "writing"
    } else {
        "reading"
    };
    let why = if err & 1 != 0 {
        "protection violation"
    } else {
        "page not mapped"
    };
    format!("{access} {cr2:#x} ({why})")
}

/// Builds the report after a fault stub wrote to the fault port: its frame (the guest's rdx and rax,
/// the vector, the error code, then the CPU's RIP, CS, RFLAGS, RSP, SS) is on the vCPU's exception
/// stack.
pub fn from_stub(fd: &VcpuFd, mem: &GuestMemory, vcpu: u32) -> FaultReport {
    let regs = fd.get_regs().unwrap_or_default();
    let cr2 = fd.get_sregs().map(|s| s.cr2).unwrap_or_default();
    let mut frame = [0u64; rebound_arch::system::STUB_FRAME_WORDS];
    for (i, w) in frame.iter_mut().enumerate() {
        *w = mem
            .read_obj(GuestAddress(regs.rsp.wrapping_add(8 * i as u64)))
            .unwrap_or(0);
    }
    let [_rdx, _rax, vector, error_code, rip, _cs, _rflags, rsp, _ss] = frame;
    let mut reason = vector_name(vector).to_string();
    let address = (vector == 14).then_some(cr2);
    if vector == 14 {
        reason = format!("{reason} {}", page_fault_detail(error_code, cr2));
    }
    if vector == 13 && error_code != 0 {
        reason = format!("{reason} (selector error code {error_code:#x})");
    }
    FaultReport {
        vcpu,
        rip,
        rsp,
        reason,
        vector: u8::try_from(vector).ok(),
        error_code: Some(error_code),
        address,
        location: None,
    }
}

/// Builds the report for an exit that ended the guest without a stub (triple fault, entry
/// failure, emulation failure).
pub fn from_exit(fd: &VcpuFd, vcpu: u32, reason: String) -> FaultReport {
    let regs = fd.get_regs().unwrap_or_default();
    FaultReport {
        vcpu,
        rip: regs.rip,
        rsp: regs.rsp,
        reason,
        vector: None,
        error_code: None,
        address: None,
        location: None,
    }
}
