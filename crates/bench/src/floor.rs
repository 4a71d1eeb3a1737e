//! The floor for hypercall cost: a bare KVM_RUN loop with no VMM logic. The same CPL3 machine
//! setup as a real guest (page tables, GDT, TSS I/O bitmap), a guest that does nothing but `out`
//! to the hypercall port, and a host loop that only re-enters.

use anyhow::{Result, bail};
use kvm_ioctls::VcpuExit;

use crate::bare::{Tracking, bare};

/// Runs `n` bare exits and returns exits per second.
pub fn exits_per_second(n: u64) -> Result<f64> {
    // mov ecx, n; mov dx, HYPERCALL; 1: out dx, eax; dec ecx; jnz 1b; mov dx, HYPERCALL+1; out dx, al
    let [lo, hi] = rebound_abi::port::HYPERCALL.to_le_bytes();
    let [elo, ehi] = (rebound_abi::port::HYPERCALL + 1).to_le_bytes();
    let mut code = vec![0xb9];
    code.extend_from_slice(&(n as u32).to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba, lo, hi, 0xef, 0xff, 0xc9, 0x75, 0xfb]);
    code.extend_from_slice(&[0x66, 0xba, elo, ehi, 0xee]);
    let mut b = bare(64 << 20, &code, Tracking::None)?;
    let mut count = 0u64;
    let t0 = std::time::Instant::now();
    loop {
        match b.vcpu.run()? {
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
