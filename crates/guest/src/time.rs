//! Clocks, in nanoseconds. The monotonic clock is read from the TSC when the VMM describes it
//! in this vCPU's page (ABI 1.5): no exit, tens of nanoseconds instead of tens of
//! microseconds. Otherwise, and for the wall clock, a hypercall.
//!
//! To wait, do not spin on a clock: in a dispatcher task await
//! [`IoQueue::sleep`](crate::io::IoQueue::sleep); outside one, [`block`](crate::hypercall::block)
//! with a timeout.
//!
//! ```no_run
//! use rebound_guest::{println, time};
//!
//! let start = time::monotonic_ns();
//! // ... work ...
//! let us = (time::monotonic_ns() - start) / 1_000;
//! println!("took {us} us");
//! ```

use core::arch::asm;
use core::sync::atomic::{Ordering, compiler_fence};

use rebound_abi::{clock_flags, nr};

use crate::hypercall::vcpu_page;

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: `rdtsc` reads the time-stamp counter into edx:eax; no memory is touched.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Nanoseconds since the VM started: never goes back, the same on every vCPU, and continued
/// from the saved value after a restore (the time a snapshot spent on disk does not count).
/// Never fails.
pub fn monotonic_ns() -> u64 {
    let page = vcpu_page();
    loop {
        // SAFETY: this vCPU's own page, mapped for the guest; the VMM rewrites the clock only
        // while this vCPU is out of the guest, and bumps `seq` when it does (checked below).
        let (seq, clock) = unsafe {
            let seq = core::ptr::read_volatile(&raw const (*page).clock.seq);
            (seq, core::ptr::read_volatile(&raw const (*page).clock))
        };
        if clock.flags & clock_flags::TSC == 0 {
            return crate::hypercall::raw(nr::CLOCK_MONOTONIC, &[]) as u64;
        }
        let tsc = rdtsc();
        compiler_fence(Ordering::SeqCst);
        // SAFETY: as above.
        let again = unsafe { core::ptr::read_volatile(&raw const (*page).clock.seq) };
        if again == seq && clock.seq == seq {
            return clock.ns_at(tsc);
        }
    }
}

/// Nanoseconds since the Unix epoch: the host's wall clock, which can jump when the host's
/// clock is set (measure durations with [`monotonic_ns`]). One hypercall (an exit) per call.
/// Never fails (0 if the host's clock is before 1970).
pub fn realtime_ns() -> u64 {
    crate::hypercall::raw(nr::CLOCK_REALTIME, &[]) as u64
}
