//! What the VMM told this guest at boot: the vCPU, the VM's size, its command line and
//! devices ([`Cpu`]), and requests the host makes while the guest runs
//! ([`shutdown_requested`]).
//!
//! The boot info page is mapped read-only at [`rebound_abi::BOOT_INFO_ADDR`] for the life of
//! the VM; reading it costs no exit.

use core::sync::atomic::{AtomicU64, Ordering};

use rebound_abi::{BOOT_INFO_ADDR, BOOT_INFO_REQUESTS_OFFSET, BootInfo, request};

/// The vCPU a guest's `main` runs on, and the VM it belongs to: what `main` receives.
///
/// ```
/// use rebound_guest::{Cpu, println};
///
/// fn guest_main(cpu: Cpu) -> i32 {
///     // `rebound run GUEST --vcpus 2 --args "count=5"`: every vCPU enters here.
///     println!("vCPU {} of {}, args {:?}", cpu.id(), cpu.count(), cpu.args());
///     if cpu.disk_size() == 0 {
///         println!("no disk: disk requests would complete with ENODEV");
///     }
///     0
/// }
/// rebound_guest::entry!(guest_main);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    id: u32,
    boot: &'static BootInfo,
}

impl Cpu {
    /// Made by the runtime at entry, for `main`; a guest has no need to call it.
    ///
    /// # Safety
    /// `boot` must point at the VMM's boot info page, which stays mapped (read-only) for the
    /// life of the VM.
    pub unsafe fn from_boot(id: u32, boot: *const BootInfo) -> Self {
        // SAFETY: guaranteed by the caller.
        let boot = unsafe { &*boot };
        Self { id, boot }
    }

    /// A `Cpu` for vCPU `id` (not checked) over the boot info at its fixed address, for code
    /// that does not have `main`'s at hand. Only valid inside a Rebound guest (on the host the
    /// address is not mapped).
    pub fn current(id: u32) -> Self {
        // SAFETY: inside a guest the boot info page is always mapped at BOOT_INFO_ADDR.
        unsafe { Self::from_boot(id, BOOT_INFO_ADDR as *const BootInfo) }
    }

    /// This vCPU's id, `0..count()`. vCPU 0's `main` decides when the VM ends.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Number of vCPUs in the VM (`rebound run --vcpus N`, 1 by default).
    pub fn count(&self) -> u32 {
        self.boot.vcpu_count
    }

    /// Everything the VMM reported: memory and heap bounds, ABI version, NICs (see
    /// [`BootInfo`]).
    pub fn boot_info(&self) -> &'static BootInfo {
        self.boot
    }

    /// The guest command line (`rebound run --args "..."`, at most
    /// [`BOOT_ARGS_MAX`](rebound_abi::BOOT_ARGS_MAX) bytes), or `""` if there is none or it is
    /// not valid UTF-8. Parse it yourself, e.g. `args().split_whitespace()`.
    pub fn args(&self) -> &'static str {
        let b = self.boot;
        if b.args_len == 0 {
            return "";
        }
        // SAFETY: the VMM wrote `args_len` bytes at `args_addr` inside the boot info page,
        // which is mapped read-only for the life of the VM.
        let bytes =
            unsafe { core::slice::from_raw_parts(b.args_addr as *const u8, b.args_len as usize) };
        core::str::from_utf8(bytes).unwrap_or("")
    }

    /// Size of the VM's disk in bytes (`rebound run --disk PATH` or `--scratch-disk-mib N`);
    /// 0 if it has none, in which case every disk request of [`crate::io`] completes with
    /// `ENODEV` (timers still work).
    pub fn disk_size(&self) -> u64 {
        self.boot.disk_size
    }
}

/// Requests from the host (ABI 1.3): bits of [`rebound_abi::request`], set by the VMM while the
/// guest runs (only [`request::CLONE`] is ever cleared). 0 under an older VMM. Read from memory: no exit.
#[cfg(not(test))]
pub fn host_requests() -> u64 {
    // SAFETY: inside a guest the boot info page is mapped read-only at BOOT_INFO_ADDR for the
    // life of the VM; the word is 8-byte aligned and the VMM writes it while the guest runs,
    // so it is read atomically.
    let word = unsafe { &*((BOOT_INFO_ADDR + BOOT_INFO_REQUESTS_OFFSET) as *const AtomicU64) };
    word.load(Ordering::Acquire)
}

/// Host-side unit tests have no boot info page.
#[cfg(test)]
pub fn host_requests() -> u64 {
    let _ = (
        Ordering::Acquire,
        core::mem::size_of::<AtomicU64>(),
        BOOT_INFO_REQUESTS_OFFSET,
    );
    0
}

/// Whether the host asked the guest to shut down cleanly (the API's `SendCtrlAltDel`, as in
/// Firecracker; ABI 1.3): finish, flush, exit. A guest that has not exited within the host's
/// grace period (10 s) is stopped. The [`Dispatcher`](crate::dispatch::Dispatcher) checks this
/// on every round; a vCPU blocked in the VMM is woken when the request arrives.
pub fn shutdown_requested() -> bool {
    host_requests() & request::SHUTDOWN != 0
}
