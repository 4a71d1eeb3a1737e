//! The floor for hypercall cost: a bare KVM_RUN loop with no VMM logic. The same CPL3 machine
//! setup as a real guest (page tables, GDT, TSS I/O bitmap), a guest that does nothing but `out`
//! to the hypercall port, and a host loop that only re-enters.

use anyhow::{Result, bail};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use rebound_arch::{Layout, regs, system};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Runs `n` bare exits and returns exits per second.
pub fn exits_per_second(n: u64) -> Result<f64> {
    let size = 64u64 << 20;
    let layout = Layout::new(size, 1)?;
    // Declared before the VM so it is dropped after it.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])?;
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    let host = mem.get_host_address(GuestAddress(0))? as u64;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: `mem` maps `size` bytes at `host` and is dropped after the VM and its vCPU.
    unsafe { vm.set_user_memory_region(region)? };
    system::write_system(&mem, &layout, &Default::default(), b"")?;
    // mov ecx, n; mov dx, HYPERCALL; 1: out dx, eax; dec ecx; jnz 1b; mov dx, HYPERCALL+1; out dx, al
    let [lo, hi] = rebound_abi::port::HYPERCALL.to_le_bytes();
    let [elo, ehi] = (rebound_abi::port::HYPERCALL + 1).to_le_bytes();
    let mut code = vec![0xb9];
    code.extend_from_slice(&(n as u32).to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba, lo, hi, 0xef, 0xff, 0xc9, 0x75, 0xfb]);
    code.extend_from_slice(&[0x66, 0xba, elo, ehi, 0xee]);
    mem.write_slice(&code, GuestAddress(rebound_abi::IMAGE_BASE))?;
    let mut vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
    let mut sregs = vcpu.get_sregs()?;
    regs::configure_sregs(&mut sregs, &layout, 0);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&regs::initial_regs(&layout, 0, rebound_abi::IMAGE_BASE))?;
    vcpu.set_fpu(&regs::initial_fpu())?;
    let mut count = 0u64;
    let t0 = std::time::Instant::now();
    loop {
        match vcpu.run()? {
            VcpuExit::IoOut(p, _) if p == rebound_abi::port::HYPERCALL => count += 1,
            VcpuExit::IoOut(..) => break,
            other => bail!("floor loop: unexpected exit {other:?}"),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if count != n {
        bail!("floor loop made {count} exits, expected {n}");
    }
    Ok(count as f64 / secs)
}
