//! Guest memory: one memfd, mapped shared into the VMM and registered as KVM slot 0.
//!
//! Backing memory with a file descriptor (never plain anonymous memory) is what later lets a
//! checkpoint, a crash-surviving successor process, a clone or another VM reach the same pages.
//! The `AtomicBitmap` records pages the VMM itself writes: KVM's dirty log does not see those.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use rebound_snapshot::DirtySet;

use crate::{Error, Result};

/// Guest memory as the VMM sees it.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Creates `size` bytes of zeroed guest memory on a new memfd.
pub fn create(size: u64) -> Result<(GuestMemory, Backing)> {
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
    map_shared(file, size)
}

/// Creates `size` bytes of zeroed guest memory in a new file at `path` (a preserved region: the
/// memory outlives this process).
pub fn create_file(path: &std::path::Path, size: u64) -> Result<(GuestMemory, Backing)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            Error::Memory(format!(
                "cannot create guest memory {}: {e}",
                path.display()
            ))
        })?;
    file.set_len(size)
        .map_err(|e| Error::Memory(format!("cannot size guest memory to {size} bytes: {e}")))?;
    map_shared(file, size)
}

/// Maps an existing guest memory file (a preserved region taken over by a new process).
pub fn open_file(path: &std::path::Path, size: u64) -> Result<(GuestMemory, Backing)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::Memory(format!("cannot open guest memory {}: {e}", path.display())))?;
    let len = file
        .metadata()
        .map_err(|e| Error::Memory(e.to_string()))?
        .len();
    if len != size {
        return Err(Error::Memory(format!(
            "guest memory {} is {len} bytes; the VM has {size}",
            path.display()
        )));
    }
    map_shared(file, size)
}

/// Maps `size` bytes of `file` shared: guest writes land in the file.
fn map_shared(file: File, size: u64) -> Result<(GuestMemory, Backing)> {
    let backing = file
        .try_clone()
        .map_err(|e| Error::Memory(format!("cannot duplicate the memfd: {e}")))?;
    let mem = GuestMemory::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(backing, 0)),
    )])
    .map_err(|e| Error::Memory(format!("cannot map {size} bytes of guest memory: {e}")))?;
    if let Ok(addr) = mem.get_host_address(GuestAddress(0)) {
        // Huge pages where the host allows them for shared memory (shmem_enabled = advise),
        // as QEMU asks for guest RAM: fewer TLB misses, and memory freed 2 MiB at a time
        // (freeing a GiB of 4 KiB pages costs ~250 ms here, of 2 MiB pages ~4 ms).
        // SAFETY: advice on a range this function just mapped; it changes no contents.
        let _ = unsafe { libc::madvise(addr.cast(), size as usize, libc::MADV_HUGEPAGE) };
    }
    Ok((mem, Backing::Shared(file)))
}

/// Maps `size` bytes of `file` at `offset` as guest memory, copy-on-write (`MAP_PRIVATE`): guest
/// writes stay in this process; the file is never written. Pages are read in lazily on first
/// touch, so mapping costs the same for any size, and VMs mapping one file share its pages.
pub fn map_private(file: &File, offset: u64, size: u64) -> Result<(GuestMemory, Backing)> {
    let backing = file
        .try_clone()
        .map_err(|e| Error::Memory(format!("cannot duplicate the snapshot file: {e}")))?;
    let keep = file
        .try_clone()
        .map_err(|e| Error::Memory(format!("cannot duplicate the snapshot file: {e}")))?;
    let region =
        MmapRegionBuilder::new_with_bitmap(size as usize, AtomicBitmap::with_len(size as usize))
            .with_file_offset(FileOffset::new(backing, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| Error::Memory(format!("cannot map {size} bytes of the snapshot: {e}")))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| Error::Memory("guest memory region overflows".into()))?;
    let mem = GuestMemory::from_regions(vec![region]).map_err(|e| Error::Memory(e.to_string()))?;
    Ok((mem, Backing::Private { file: keep, offset }))
}

/// Replaces guest pages `[first, first + count)` of a snapshot mapping by anonymous zero pages,
/// so those bytes never come from the file (pages a snapshot does not store read as zero,
/// whatever the file holds there). Only for memory nothing else uses yet: before the VM is
/// built around it.
pub fn map_zero(mem: &GuestMemory, first: u64, count: u64) -> Result<()> {
    let len = count
        .checked_mul(PAGE)
        .ok_or_else(|| Error::Memory(format!("{count} pages overflow")))?;
    let slice = mem
        .get_slice(GuestAddress(first * PAGE), len as usize)
        .map_err(|e| Error::Memory(format!("pages {first:#x}+{count}: {e}")))?;
    let addr = slice.ptr_guard_mut().as_ptr();
    // SAFETY: `get_slice` checked that the range lies inside one region `mem` mapped (page
    // aligned: it starts and ends on page boundaries of a page-aligned mapping). MAP_FIXED
    // replaces exactly those pages by private zero pages with the same protection, so the
    // region stays one valid mapping of its size (unmapped with it). Nothing reads or writes
    // the memory meanwhile: the caller has not handed it to KVM, a vCPU or a device yet.
    let r = unsafe {
        libc::mmap(
            addr.cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(Error::Memory(format!(
            "cannot map zero pages over guest pages {first:#x}+{count}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The file behind guest memory.
pub enum Backing {
    /// A memfd or a preserved-region file, mapped shared: its data ranges are exactly the pages
    /// ever written.
    Shared(File),
    /// A snapshot's memory image mapped copy-on-write from `offset`.
    Private {
        /// The snapshot file.
        file: File,
        /// Where guest memory starts in it.
        offset: u64,
    },
}

/// The data (non-hole) ranges of `file` within `[start, start + len)`, relative to `start`.
pub(crate) fn file_data_ranges(file: &File, start: u64, len: u64) -> Vec<(u64, u64)> {
    data_ranges(file, start, len)
}

fn data_ranges(file: &File, start: u64, len: u64) -> Vec<(u64, u64)> {
    use vmm_sys_util::seek_hole::SeekHole;
    let Ok(mut f) = file.try_clone() else {
        return vec![(0, len)];
    };
    let end = start + len;
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let Ok(Some(data)) = f.seek_data(at) else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = match f.seek_hole(data) {
            Ok(Some(h)) => h.min(end),
            _ => end,
        };
        out.push((data - start, hole - data));
        at = hole;
    }
    out
}

/// Pages of the mapping that are present or swapped out (copy-on-write pages the guest wrote,
/// or file pages mapped in), from `/proc/self/pagemap`. Unlike `mincore`, this also sees
/// written pages the host swapped out. On any error every page is taken as holding data.
fn mapped_pages(mem: &GuestMemory, size: u64, set: &mut DirtySet) {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pages = size.div_ceil(PAGE);
    let all = |set: &mut DirtySet| (0..pages).for_each(|p| set.insert(p));
    let (Ok(host), Ok(map)) = (
        mem.get_host_address(GuestAddress(0)),
        File::open("/proc/self/pagemap"),
    ) else {
        return all(set);
    };
    let first = host as u64 / PAGE;
    let mut buf = vec![0u8; 8 * 4096];
    let mut p = 0;
    while p < pages {
        let n = (pages - p).min(4096);
        let chunk = &mut buf[..(n * 8) as usize];
        if map.read_exact_at(chunk, (first + p) * 8).is_err() {
            return all(set);
        }
        for (i, e) in chunk.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().unwrap_or_default());
            if entry & (PRESENT | SWAPPED) != 0 {
                set.insert(p + i as u64);
            }
        }
        p += n;
    }
}

const PAGE: u64 = 4096;

/// Pages that may hold data; every other page is certainly zero. Lets snapshots and shadows
/// skip untouched memory without reading it (reading a memfd hole would allocate it).
pub fn data_pages(mem: &GuestMemory, backing: &Backing, size: u64) -> DirtySet {
    let mut set = DirtySet::new(size / PAGE);
    let (file, offset) = match backing {
        Backing::Shared(f) => (f, 0),
        Backing::Private { file, offset } => {
            mapped_pages(mem, size, &mut set);
            (file, *offset)
        }
    };
    for (start, len) in data_ranges(file, offset, size) {
        for p in start / PAGE..(start + len).div_ceil(PAGE) {
            set.insert(p);
        }
    }
    set
}

/// Guest memory bytes as a plain slice, or None if the range is outside guest memory.
///
/// # Safety
/// Nothing may write the range while the slice lives: the VM must be paused (its vCPUs parked
/// and its I/O thread idle) for the whole borrow.
pub unsafe fn frozen_bytes(mem: &GuestMemory, addr: u64, len: u64) -> Option<&[u8]> {
    let slice = mem.get_slice(GuestAddress(addr), len as usize).ok()?;
    // SAFETY: `get_slice` checked that [addr, addr + len) is inside one mapped region that lives
    // as long as `mem`; the caller guarantees no concurrent writes.
    Some(unsafe { std::slice::from_raw_parts(slice.ptr_guard().as_ptr(), len as usize) })
}

/// Registers every region of `mem` with KVM, with KVM's dirty page log on if `log_dirty`
/// (registering again with the other flag switches it).
pub fn register(vm: &VmFd, mem: &GuestMemory, log_dirty: bool) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
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

vmm_sys_util::ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_bindings::kvm_clear_dirty_log
);

/// Asks KVM to leave write-protecting logged pages to [`clear_dirty_log`]
/// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`); whether it agreed.
pub fn manual_dirty_protect(vm: &VmFd) -> bool {
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [
            u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE),
            0,
            0,
            0,
        ],
        ..Default::default()
    };
    vm.enable_cap(&cap).is_ok()
}

/// Clears the logged bits in `bitmap` (one bit per page of memory slot 0, from its first page)
/// and write-protects those pages again, so their next write is logged.
pub fn clear_dirty_log(vm: &VmFd, pages: u64, bitmap: &mut [u64]) -> Result<()> {
    debug_assert!(bitmap.len() as u64 * 64 >= pages);
    let mut arg = kvm_bindings::kvm_clear_dirty_log {
        slot: 0,
        num_pages: u32::try_from(pages).map_err(|_| Error::Memory("memory too large".into()))?,
        first_page: 0,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `arg` names slot 0's pages [0, pages) and a bitmap of at least that many bits
    // that lives across the call; KVM only reads it.
    let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if r < 0 {
        return Err(Error::Kvm {
            op: "KVM_CLEAR_DIRTY_LOG",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}
