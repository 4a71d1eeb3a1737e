//! Requester indicators (ABI 1.10): which event sources have work, in one word.
//!
//! Each vCPU page has a `pending` word. The VMM ORs a requester's bit into it (before it wakes
//! the vCPU) when that requester has work: the vCPU's I/O ring completed a request, a NIC
//! received frames, another VM woke this one through a shared region, the host posted a
//! memory request. Which bit is the guest's choice: [`route`] (the `INDICATOR_SET`
//! hypercall). The guest takes the word with [`take`], one atomic swap to zero, and looks only
//! at the sources whose bits were set. Guest code can set a bit too ([`raise`]), for a source
//! it signals itself.
//!
//! The [`Dispatcher`](crate::dispatch::Dispatcher) does this for sources added with
//! [`add_source_with_bit`](crate::dispatch::Dispatcher::add_source_with_bit).
//!
//! ```no_run
//! use rebound_abi::indicator::KIND_SHARE;
//! use rebound_guest::indicator;
//!
//! // Wake-ups through shared region 0 set bit 5 of this vCPU's pending word.
//! indicator::route(KIND_SHARE, 0, 5).expect("ABI 1.10");
//! let pending = indicator::take();
//! if pending & (1 << 5) != 0 { /* look at the region's inbox */ }
//! ```

use core::sync::atomic::{AtomicU64, Ordering};

pub use rebound_abi::indicator::{KIND_IO, KIND_MEMORY, KIND_NESTED, KIND_NET, KIND_SHARE, NONE};
use rebound_abi::nr;

use crate::hypercall::{self, Errno};

/// Routes requester `index` of `kind` to bit `bit` (0..=63) of this vCPU's pending word, or
/// with [`NONE`] stops routing it here. Requesters: [`KIND_IO`] (index 0: this vCPU's own I/O
/// ring), [`KIND_NET`] (a NIC index), [`KIND_SHARE`] (a shared region's index in the share
/// table), [`KIND_MEMORY`] (index 0), [`KIND_NESTED`] (a nested VM handle's low byte: exits
/// of its started vCPUs). `EINVAL` for anything else or a bit above 63; `ENOSYS`
/// under a VMM older than ABI 1.10. One exit.
pub fn route(kind: u64, index: u64, bit: u64) -> Result<(), Errno> {
    hypercall::call(nr::INDICATOR_SET, &[kind, index, bit]).map(|_| ())
}

/// Whether the VMM sets indicators (ABI 1.10 or later). Read from the boot info: no exit.
#[cfg(not(test))]
pub fn available() -> bool {
    // SAFETY: inside a guest the boot info page is mapped read-only at BOOT_INFO_ADDR for the
    // life of the VM, and the VMM wrote it before the guest started.
    let info = unsafe { &*(rebound_abi::BOOT_INFO_ADDR as *const rebound_abi::BootInfo) };
    let v = info.abi_version;
    v >> 16 == rebound_abi::ABI_MAJOR && v & 0xffff >= 10
}

/// Host-side unit tests: as a 1.10 VMM.
#[cfg(test)]
pub fn available() -> bool {
    true
}

/// This vCPU's pending word.
#[cfg(not(test))]
fn word() -> &'static AtomicU64 {
    let page = hypercall::vcpu_page();
    // SAFETY: the vCPU page is mapped read-write for the guest for the VM's whole life and
    // `pending` is an aligned `u64` in it; the VMM changes it only with atomic operations.
    unsafe { AtomicU64::from_ptr(core::ptr::addr_of_mut!((*page).pending)) }
}

/// Host-side unit tests have no vCPU page: one word per test thread.
#[cfg(test)]
fn word() -> &'static AtomicU64 {
    std::thread_local! {
        static WORD: &'static AtomicU64 = std::boxed::Box::leak(std::boxed::Box::new(AtomicU64::new(0)));
    }
    WORD.with(|w| *w)
}

/// Takes this vCPU's pending bits: returns them and leaves zero (one atomic swap). Bits the
/// VMM sets after it are seen by the next call.
#[inline]
pub fn take() -> u64 {
    // Acquire: what the requester wrote before its bit (a completion, a ring index) is visible.
    word().swap(0, Ordering::AcqRel)
}

/// Looks at this vCPU's pending bits without taking them.
#[inline]
pub fn peek() -> u64 {
    word().load(Ordering::Acquire)
}

/// Sets `bits` in this vCPU's pending word, as the VMM does for its requesters: for sources
/// the guest signals itself (a task that queued work for another source of the same vCPU).
#[inline]
pub fn raise(bits: u64) {
    word().fetch_or(bits, Ordering::Release);
}
