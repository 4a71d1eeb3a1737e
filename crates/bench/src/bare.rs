//! A bare VM for floor measurements: the same CPL3 machine setup as a Rebound guest (page
//! tables, GDT, TSS with I/O bitmap) running a few bytes of machine code, with no VMM around it.

use anyhow::Result;
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, kvm_enable_cap, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use rebound_arch::{Layout, regs, system};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// A VM with one vCPU about to run `code` at the image base.
pub struct Bare {
    // Field order is drop order: the vCPU and VM go before the memory they point into.
    pub vcpu: VcpuFd,
    pub vm: VmFd,
    _mem: GuestMemoryMmap,
}

/// How the memory slot is tracked.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// No dirty logging.
    None,
    /// KVM's dirty bitmap.
    Bitmap,
    /// KVM's dirty ring with this many bytes per vCPU (enabled before the vCPU exists).
    Ring(u64),
}

const KVM_CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;

/// Builds the VM.
pub fn bare(size: u64, code: &[u8], tracking: Tracking) -> Result<Bare> {
    let layout = Layout::new(size, 1)?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])?;
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    if let Tracking::Ring(bytes) = tracking {
        let cap = kvm_enable_cap {
            cap: KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
            args: [bytes, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)?;
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: if tracking == Tracking::None {
            0
        } else {
            KVM_MEM_LOG_DIRTY_PAGES
        },
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: mem.get_host_address(GuestAddress(0))? as u64,
    };
    // SAFETY: `mem` maps `size` bytes and lives in `Bare` after the VM and vCPU (drop order).
    unsafe { vm.set_user_memory_region(region)? };
    system::write_system(&mem, &layout, &Default::default(), b"")?;
    mem.write_slice(code, GuestAddress(rebound_abi::IMAGE_BASE))?;
    let vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
    let mut sregs = vcpu.get_sregs()?;
    regs::configure_sregs(&mut sregs, &layout, 0);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&regs::initial_regs(&layout, 0, rebound_abi::IMAGE_BASE))?;
    vcpu.set_fpu(&regs::initial_fpu())?;
    Ok(Bare {
        vcpu,
        vm,
        _mem: mem,
    })
}
