//! Guest memory: one memfd, mapped shared into the VMM and registered as KVM slot 0.
//!
//! Backing memory with a file descriptor (never plain anonymous memory) is what later lets a
//! checkpoint, a crash-surviving successor process, a clone or another VM reach the same pages.
//! The `AtomicBitmap` records pages the VMM itself writes: KVM's dirty log does not see those.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{Error, Result};

/// Guest memory as the VMM sees it.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Creates `size` bytes of zeroed guest memory on a new memfd.
pub fn create(size: u64) -> Result<(GuestMemory, File)> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"rebound-guest-memory".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memory(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| Error::Memory(format!("cannot size guest memory to {size} bytes: {e}")))?;
    let backing = file
        .try_clone()
        .map_err(|e| Error::Memory(format!("cannot duplicate the memfd: {e}")))?;
    let mem = GuestMemory::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(backing, 0)),
    )])
    .map_err(|e| Error::Memory(format!("cannot map {size} bytes of guest memory: {e}")))?;
    Ok((mem, file))
}

/// Registers every region of `mem` with KVM.
pub fn register(vm: &VmFd, mem: &GuestMemory) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `region.len()` bytes owned by `mem`, which the
        // VM keeps for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| Error::Kvm {
            op: "KVM_SET_USER_MEMORY_REGION",
            source,
        })?;
    }
    Ok(())
}
