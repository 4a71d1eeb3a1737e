//! The guest's monotonic clock (`CLOCK_MONOTONIC`), and how vCPUs read it without an exit.
//!
//! When the host keeps time with the TSC (its clocksource is `tsc`: invariant and synchronised
//! across CPUs) and KVM reports the vCPUs' TSC frequency, the clock *is* a linear function of
//! the TSC: `base_ns + (tsc - tsc0) * mul >> 32`. The VMM computes it from the host's TSC; each
//! vCPU gets the same function of its own TSC in its page ([`rebound_abi::VcpuClock`]), so a
//! guest reading the time costs an `rdtsc` instead of a 30 µs exit, and both readings agree.
//! Otherwise the clock runs on the host's `CLOCK_MONOTONIC` and guests use the hypercall.

use std::time::Instant;

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;
use rebound_abi::{VcpuClock, clock_flags};

const MSR_IA32_TSC: u32 = 0x10;

/// Set to `hypercall` to keep guests on the clock hypercall (for comparisons and as an escape
/// hatch on hosts whose TSC misbehaves under virtualization).
pub const CLOCK_ENV: &str = "REBOUND_GUEST_CLOCK";

fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` reads the time-stamp counter; it touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The TSC as the clock's time base.
#[derive(Clone, Copy, Debug)]
struct Tsc {
    /// The host's TSC at `base_ns`.
    tsc0: u64,
    /// Nanoseconds per tick, 32.32 fixed point.
    mul: u64,
}

/// A VM's monotonic clock.
#[derive(Debug)]
pub(crate) struct GuestClock {
    base_ns: u64,
    at: Instant,
    tsc: Option<Tsc>,
}

/// Whether the host's kernel keeps time with the TSC.
fn host_uses_tsc() -> bool {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .is_ok_and(|s| s.trim() == "tsc")
}

impl GuestClock {
    /// A clock reading `base_ns` now, on the TSC when `tsc_khz` (the vCPUs' TSC frequency) is
    /// known and the host trusts its TSC.
    pub(crate) fn new(base_ns: u64, tsc_khz: Option<u32>) -> Self {
        let wanted = std::env::var(CLOCK_ENV).map_or(true, |v| v != "hypercall");
        let tsc = match tsc_khz {
            Some(khz) if khz > 0 && wanted && host_uses_tsc() => Some(Tsc {
                tsc0: rdtsc(),
                mul: ((1_000_000u128 << 32) / u128::from(khz)) as u64,
            }),
            _ => None,
        };
        Self {
            base_ns,
            at: Instant::now(),
            tsc,
        }
    }

    /// Nanoseconds now.
    pub(crate) fn now_ns(&self) -> u64 {
        match self.tsc {
            Some(t) => self.function(t.tsc0).ns_at(rdtsc()),
            None => self.base_ns + self.at.elapsed().as_nanos() as u64,
        }
    }

    /// Whether vCPUs can read the clock from their TSC.
    pub(crate) fn on_tsc(&self) -> bool {
        self.tsc.is_some()
    }

    /// The clock as a function of a TSC whose value was `tsc_base` when the host's read `tsc0`.
    fn function(&self, tsc_base: u64) -> VcpuClock {
        VcpuClock {
            seq: 0,
            flags: clock_flags::TSC,
            tsc_base,
            ns_base: self.base_ns,
            mul: self.tsc.map_or(0, |t| t.mul),
        }
    }

    /// What vCPU `fd` finds in its page: the clock as a function of its own TSC, which KVM
    /// may offset from the host's (measured here), or the hypercall's flag when the clock is
    /// not on the TSC. Called on the vCPU's thread while it is out of the guest.
    pub(crate) fn for_vcpu(&self, fd: &VcpuFd) -> VcpuClock {
        let Some(t) = self.tsc else {
            return VcpuClock::default();
        };
        let mut msrs = match Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }]) {
            Ok(m) => m,
            Err(_) => return VcpuClock::default(),
        };
        let before = rdtsc();
        let read = fd.get_msrs(&mut msrs);
        let after = rdtsc();
        if read != Ok(1) {
            return VcpuClock::default();
        }
        let guest = msrs.as_slice()[0].data;
        let host = before + (after - before) / 2;
        let offset = guest.wrapping_sub(host);
        self.function(t.tsc0.wrapping_add(offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_tsc_frequency_the_clock_runs_on_the_host_clock() {
        let c = GuestClock::new(5_000, None);
        assert!(!c.on_tsc());
        let a = c.now_ns();
        let b = c.now_ns();
        assert!(a >= 5_000 && b >= a);
    }

    #[test]
    fn on_the_tsc_the_clock_advances_with_real_time() {
        if !host_uses_tsc() {
            return;
        }
        // The host's own frequency, from KVM.
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let khz = vcpu.get_tsc_khz().unwrap();
        let c = GuestClock::new(1_000_000, Some(khz));
        assert!(c.on_tsc());
        // Each clock reading is bracketed by real-time ones, so a preemption widens the
        // bounds instead of failing the test.
        let (r0, n0, r1) = (Instant::now(), c.now_ns(), Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (r2, n1, r3) = (Instant::now(), c.now_ns(), Instant::now());
        let clock = (n1 - n0) as f64;
        let shortest = (r2 - r1).as_nanos() as f64;
        let longest = (r3 - r0).as_nanos() as f64;
        assert!(
            clock >= shortest * 0.99 && clock <= longest * 1.01,
            "clock {clock} ns; real time between {shortest} and {longest} ns"
        );
        // The vCPU's page describes the same clock.
        let v = c.for_vcpu(&vcpu);
        assert_eq!(v.flags, clock_flags::TSC);
        assert_eq!(v.ns_base, 1_000_000);
    }
}
