//! Clocks, read through hypercalls.

use rebound_abi::nr;

/// Nanoseconds since the VM started (monotonic).
pub fn monotonic_ns() -> u64 {
    crate::hypercall::raw(nr::CLOCK_MONOTONIC, &[]) as u64
}

/// Nanoseconds since the Unix epoch (wall clock).
pub fn realtime_ns() -> u64 {
    crate::hypercall::raw(nr::CLOCK_REALTIME, &[]) as u64
}
