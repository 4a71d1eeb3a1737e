//! What the VMM told this guest at boot.

use rebound_abi::{BOOT_INFO_ADDR, BootInfo};

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
