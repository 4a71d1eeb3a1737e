//! Capturing and applying a vCPU's KVM state. Called only on the vCPU's own thread (it owns the
//! fd), while the VM is paused.

use kvm_bindings::{Msrs, kvm_msr_entry, kvm_xsave};
use kvm_ioctls::VcpuFd;
use rebound_snapshot::state::VcpuState;

/// MSRs saved with a vCPU: those an SDK guest can depend on (EFER, FS/GS bases live in sregs).
const MSRS: &[u32] = &[
    0x10,        // TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// What failed, for the error message.
#[derive(Debug, thiserror::Error)]
#[error("vCPU {vcpu}: {op} failed: {source}")]
pub struct VstateError {
    vcpu: u32,
    op: &'static str,
    #[source]
    source: kvm_ioctls::Error,
}

fn err(vcpu: u32, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VstateError {
    move |source| VstateError { vcpu, op, source }
}

/// Reads everything KVM holds for the vCPU.
pub fn capture(fd: &VcpuFd, id: u32) -> Result<VcpuState, VstateError> {
    let entries: Vec<kvm_msr_entry> = MSRS
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries)
        .map_err(|_| err(id, "building the MSR list")(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let n = fd.get_msrs(&mut msrs).map_err(err(id, "KVM_GET_MSRS"))?;
    let msrs = msrs.as_slice()[..n]
        .iter()
        .map(|e| (e.index, e.data))
        .collect();
    Ok(VcpuState {
        id,
        regs: fd.get_regs().map_err(err(id, "KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(err(id, "KVM_GET_SREGS"))?,
        xsave: fd
            .get_xsave()
            .map_err(err(id, "KVM_GET_XSAVE"))?
            .region
            .to_vec(),
        xcrs: fd.get_xcrs().map_err(err(id, "KVM_GET_XCRS"))?,
        events: fd
            .get_vcpu_events()
            .map_err(err(id, "KVM_GET_VCPU_EVENTS"))?,
        debugregs: fd.get_debug_regs().map_err(err(id, "KVM_GET_DEBUGREGS"))?,
        msrs,
        mp_state: fd.get_mp_state().map_err(err(id, "KVM_GET_MP_STATE"))?,
    })
}

/// Puts a captured state back (Firecracker's order: MSRs, registers, FPU, events last).
pub fn apply(fd: &VcpuFd, s: &VcpuState) -> Result<(), VstateError> {
    let id = s.id;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|_| err(id, "building the MSR list")(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let n = fd.set_msrs(&msrs).map_err(err(id, "KVM_SET_MSRS"))?;
    if n != entries.len() {
        return Err(err(id, "KVM_SET_MSRS")(kvm_ioctls::Error::new(
            libc::EINVAL,
        )));
    }
    fd.set_sregs(&s.sregs).map_err(err(id, "KVM_SET_SREGS"))?;
    fd.set_regs(&s.regs).map_err(err(id, "KVM_SET_REGS"))?;
    let mut xsave = kvm_xsave::default();
    let words = s.xsave.len().min(xsave.region.len());
    xsave.region[..words].copy_from_slice(&s.xsave[..words]);
    // SAFETY: Rebound never requests extended guest FPU permissions (ARCH_REQ_XCOMP_GUEST_PERM),
    // so the guest FPU's user ABI size is at most the 4096 bytes of `kvm_xsave` and KVM reads
    // no further.
    unsafe { fd.set_xsave(&xsave) }.map_err(err(id, "KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(err(id, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(err(id, "KVM_SET_DEBUGREGS"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(err(id, "KVM_SET_MP_STATE"))?;
    fd.set_vcpu_events(&s.events)
        .map_err(err(id, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
