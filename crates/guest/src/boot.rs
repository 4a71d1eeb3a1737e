//! What the VMM told this guest at boot.

use core::sync::atomic::{AtomicU64, Ordering};

use rebound_abi::{BOOT_INFO_ADDR, BOOT_INFO_REQUESTS_OFFSET, BootInfo, request};

/// The vCPU a guest's `main` runs on, and the VM it belongs to.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    id: u32,
    boot: &'static BootInfo,
}

impl Cpu {
    /// Made by the runtime at entry.
    ///
    /// # Safety
    /// `boot` must point at the VMM's boot info page, which stays mapped (read-only) for the
    /// life of the VM.
    pub unsafe fn from_boot(id: u32, boot: *const BootInfo) -> Self {
        // SAFETY: guaranteed by the caller.
        let boot = unsafe { &*boot };
        Self { id, boot }
    }

    /// Boot info at its fixed address. Only valid inside a Rebound guest.
    pub fn current(id: u32) -> Self {
        // SAFETY: inside a guest the boot info page is always mapped at BOOT_INFO_ADDR.
        unsafe { Self::from_boot(id, BOOT_INFO_ADDR as *const BootInfo) }
    }

    /// This vCPU's id (0-based).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Number of vCPUs in the VM.
    pub fn count(&self) -> u32 {
        self.boot.vcpu_count
    }

    /// Everything the VMM reported.
    pub fn boot_info(&self) -> &'static BootInfo {
        self.boot
    }

    /// The guest command line (`boot_args`), or "" if it is not valid UTF-8.
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

    /// Size of the VM's disk in bytes (0: none).
    pub fn disk_size(&self) -> u64 {
        self.boot.disk_size
    }
}

/// Requests from the host (ABI 1.3): bits of [`rebound_abi::request`], set by the VMM while the
/// guest runs. 0 under an older VMM.
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

/// Whether the host asked the guest to shut down (Firecracker's `SendCtrlAltDel`). A guest
/// that does not exit within the host's grace period is stopped. The [`crate::dispatch`]
/// dispatcher checks this on every round.
pub fn shutdown_requested() -> bool {
    host_requests() & request::SHUTDOWN != 0
}
