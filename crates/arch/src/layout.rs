//! Where everything lives in guest-physical memory (identity-mapped: virtual == physical).
//!
//! ```text
//! 0x00000000  null page (not mapped: a null dereference faults)
//! 0x00001000  PML4, PDPT, two 4 KiB page tables for [0, 4 MiB)   supervisor-only
//! 0x00005000  GDT, IDT, exception stubs                           supervisor-only
//! 0x00008000  page directories, one per GiB (up to 64)            supervisor-only
//! 0x00048000  per vCPU: TSS with I/O bitmap (3 pages) + exception stack (1 page)
//! 0x000E0000  page directories of the shared-region window (16)   supervisor-only
//! 0x00100000  BootInfo + command line                             user, read-only
//! 0x00101000  per vCPU: VcpuPage (hypercall block, gs base)       user, read-write
//! 0x001F0000  ShareTable: the VM's shared regions                 user, read-only
//! 0x00200000  per vCPU: 64 KiB stack slot, lowest page a guard    user, read-write
//! 0x00400000  guest image, then heap to the end of memory         user, read-write
//! top 2 MiB  table pool (ABI 1.10): page tables the VMM builds     supervisor-only
//! 64 GiB      shared-region window (16 GiB, 2 MiB pages)          user; read-only per slot
//! ```
//! The guest may never make the VMM write below [`USER_START`] (see [`Layout::is_guest_writable`]).

use rebound_abi::{BOOT_INFO_ADDR, IMAGE_BASE, PAGE_SIZE, share};

use crate::Error;

/// PML4 (one page).
pub const PML4: u64 = 0x1000;
/// PDPT (one page; 512 GiB reach, we use at most 64 entries).
pub const PDPT: u64 = 0x2000;
/// 4 KiB page table for [0, 2 MiB).
pub const PT_LOW: u64 = 0x3000;
/// 4 KiB page table for [2 MiB, 4 MiB).
pub const PT_STACKS: u64 = 0x4000;
/// Global descriptor table.
pub const GDT: u64 = 0x5000;
/// Interrupt descriptor table (256 gates of 16 bytes).
pub const IDT: u64 = 0x6000;
/// Exception stubs, [`STUB_SIZE`] bytes per vector.
pub const STUBS: u64 = 0x7000;
/// Bytes per exception stub.
pub const STUB_SIZE: u64 = 32;
/// First page directory; directory `i` maps GiB `i`.
pub const PDS: u64 = 0x8000;
/// Most GiB of guest memory the layout maps.
pub const MAX_GIB: u64 = 64;
/// Page directories mapping the shared-region window, one per GiB.
pub const SHARE_PDS: u64 = 0xE_0000;
/// GiB the shared-region window spans.
pub const SHARE_GIB: u64 = share::WINDOW_SIZE >> 30;
/// The guest's table of shared regions (read-only to it).
pub const SHARE_TABLE: u64 = share::TABLE_ADDR;
/// Per-vCPU TSS + exception stack areas.
pub const TSS_AREAS: u64 = PDS + MAX_GIB * PAGE_SIZE;
/// Bytes per vCPU in the TSS area: TSS + I/O bitmap (3 pages), exception stack (1 page).
pub const TSS_AREA_SIZE: u64 = 4 * PAGE_SIZE;
/// Size of the 64-bit TSS proper; the I/O bitmap starts right after it.
pub const TSS_SIZE: u64 = 0x68;
/// I/O bitmap: one bit per port, all zero (allowed), then the mandatory 0xFF byte.
pub const IOMAP_SIZE: u64 = 8192;
/// TR limit covering the TSS, the bitmap and its terminating byte.
pub const TSS_LIMIT: u32 = (TSS_SIZE + IOMAP_SIZE) as u32;
/// Everything at or above this may be written by the guest (and by the VMM on its behalf).
pub const USER_START: u64 = BOOT_INFO_ADDR + PAGE_SIZE;
/// First vCPU page.
pub const VCPU_PAGES: u64 = USER_START;
/// Per-vCPU stack slots.
pub const STACKS: u64 = 0x20_0000;
/// Bytes per stack slot (the lowest page of each is an unmapped guard).
pub const STACK_SLOT: u64 = 0x1_0000;
/// Most vCPUs the layout has room for.
pub const MAX_VCPUS: u32 = ((IMAGE_BASE - STACKS) / STACK_SLOT) as u32;
/// Smallest guest memory: the fixed area plus room for an image and a heap.
pub const MIN_MEM: u64 = 8 << 20;
/// Guest memory is mapped with 2 MiB pages above 4 MiB, so sizes are multiples of this.
pub const MEM_ALIGN: u64 = 2 << 20;
/// The table pool (ABI 1.10): the last 2 MiB of guest memory, where the VMM builds page tables
/// at run time (programs' protection tables). Supervisor-only, never the guest's to write, and
/// not part of its heap.
pub const POOL_SIZE: u64 = 2 << 20;

// The fixed areas must not overlap; checked when compiling.
const _: () = assert!(PDS + MAX_GIB * PAGE_SIZE <= TSS_AREAS);
const _: () = assert!(TSS_SIZE + IOMAP_SIZE < 3 * PAGE_SIZE);
const _: () = assert!(STUBS + 32 * STUB_SIZE <= PDS);
const _: () = assert!(TSS_AREAS + MAX_VCPUS as u64 * TSS_AREA_SIZE <= SHARE_PDS);
const _: () = assert!(SHARE_PDS + SHARE_GIB * PAGE_SIZE <= BOOT_INFO_ADDR);
const _: () = assert!(VCPU_PAGES + MAX_VCPUS as u64 * PAGE_SIZE <= SHARE_TABLE);
const _: () = assert!(SHARE_TABLE + PAGE_SIZE <= STACKS);
const _: () = assert!(share::WINDOW_BASE >= MAX_GIB << 30);
const _: () = assert!(share::WINDOW_BASE.is_multiple_of(1 << 30));

/// The layout of one VM: a function of its memory size and vCPU count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    mem_size: u64,
    vcpus: u32,
    pool: bool,
}

impl Layout {
    /// Validates the memory size and vCPU count against what the layout can hold.
    pub fn new(mem_size: u64, vcpus: u32) -> Result<Self, Error> {
        if mem_size < MIN_MEM {
            return Err(Error::Layout(format!(
                "memory size {} MiB is below the minimum of {} MiB",
                mem_size >> 20,
                MIN_MEM >> 20
            )));
        }
        if mem_size > MAX_GIB << 30 {
            return Err(Error::Layout(format!(
                "memory size {} MiB is above the maximum of {} MiB",
                mem_size >> 20,
                MAX_GIB << 10
            )));
        }
        if !mem_size.is_multiple_of(MEM_ALIGN) {
            return Err(Error::Layout(format!(
                "memory size {} bytes is not a multiple of 2 MiB",
                mem_size
            )));
        }
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(Error::Layout(format!(
                "vCPU count {vcpus} is outside 1..={MAX_VCPUS}"
            )));
        }
        Ok(Self {
            mem_size,
            vcpus,
            pool: false,
        })
    }

    /// Guest memory size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The layout with the table pool at the top of memory (VMs booted with ABI 1.10 and
    /// later; older snapshots keep their whole memory as heap).
    pub fn with_pool(mut self) -> Self {
        self.pool = true;
        self
    }

    /// The table pool, if this layout has one.
    pub fn pool(&self) -> Option<std::ops::Range<u64>> {
        self.pool.then(|| self.mem_size - POOL_SIZE..self.mem_size)
    }

    /// One past the last byte the guest may use as its own (its heap's end).
    pub fn heap_end(&self) -> u64 {
        self.pool().map_or(self.mem_size, |p| p.start)
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Number of GiB-sized page directories needed.
    pub fn page_directories(&self) -> u64 {
        self.mem_size.div_ceil(1 << 30)
    }

    /// Guest address of vCPU `id`'s TSS.
    pub fn tss(&self, id: u32) -> u64 {
        TSS_AREAS + u64::from(id) * TSS_AREA_SIZE
    }

    /// Top of vCPU `id`'s exception stack (CPL0, used only by the fault stubs).
    pub fn exception_stack_top(&self, id: u32) -> u64 {
        self.tss(id) + TSS_AREA_SIZE
    }

    /// Guest address of vCPU `id`'s [`rebound_abi::VcpuPage`].
    pub fn vcpu_page(&self, id: u32) -> u64 {
        VCPU_PAGES + u64::from(id) * PAGE_SIZE
    }

    /// Lowest usable address of vCPU `id`'s stack (just above its guard page).
    pub fn stack_bottom(&self, id: u32) -> u64 {
        STACKS + u64::from(id) * STACK_SLOT + PAGE_SIZE
    }

    /// Initial stack pointer for vCPU `id`.
    pub fn stack_top(&self, id: u32) -> u64 {
        STACKS + u64::from(id + 1) * STACK_SLOT
    }

    /// Whether the guest may have the VMM write `len` bytes at `addr` (I/O buffers, completion
    /// indicators, rings): only user memory, never the VMM-owned system area, boot info or
    /// table pool.
    pub fn is_guest_writable(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        addr >= USER_START
            && end <= self.heap_end()
            && (end <= SHARE_TABLE || addr >= SHARE_TABLE + PAGE_SIZE)
    }

    /// Whether `len` bytes at `addr` lie inside guest memory (what the VMM may read for the guest).
    pub fn is_guest_readable(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len)
            .is_some_and(|end| end <= self.mem_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_areas_do_not_overlap() {
        let l = Layout::new(64 << 20, MAX_VCPUS).unwrap();
        assert!(l.exception_stack_top(MAX_VCPUS - 1) <= BOOT_INFO_ADDR);
        assert!(l.vcpu_page(MAX_VCPUS - 1) + PAGE_SIZE <= STACKS);
        assert_eq!(l.stack_top(MAX_VCPUS - 1), IMAGE_BASE);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(Layout::new(4 << 20, 1).is_err());
        assert!(Layout::new((64 << 20) + 4096, 1).is_err());
        assert!(Layout::new(65 << 30, 1).is_err());
        assert!(Layout::new(64 << 20, 0).is_err());
        assert!(Layout::new(64 << 20, MAX_VCPUS + 1).is_err());
        assert_eq!(Layout::new(64 << 30, 1).unwrap().page_directories(), 64);
    }

    #[test]
    fn writable_excludes_system_area_and_overflow() {
        let l = Layout::new(64 << 20, 1).unwrap();
        assert!(!l.is_guest_writable(PML4, 8));
        assert!(!l.is_guest_writable(BOOT_INFO_ADDR, 8));
        assert!(l.is_guest_writable(USER_START, 8));
        assert!(!l.is_guest_writable((64 << 20) - 4, 8));
        assert!(!l.is_guest_writable(u64::MAX - 2, 8));
        assert!(!l.is_guest_writable(SHARE_TABLE + 8, 8));
        assert!(!l.is_guest_writable(SHARE_TABLE - 8, 16));
        assert!(l.is_guest_writable(SHARE_TABLE + PAGE_SIZE, 8));
        assert!(l.is_guest_readable(0, 64 << 20));
        let p = l.with_pool();
        assert_eq!(p.pool(), Some((62 << 20)..(64 << 20)));
        assert!(!p.is_guest_writable((62 << 20) - 8, 16));
        assert!(p.is_guest_writable((62 << 20) - 8, 8));
        assert_eq!(l.heap_end(), 64 << 20);
        assert!(!l.is_guest_readable(1, 64 << 20));
    }
}
