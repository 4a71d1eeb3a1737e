//! Page tables the VMM builds while a guest runs, in the table pool at the top of guest memory
//! (ABI 1.10): a program's protection table becomes a tree of its own, loaded into CR3 while
//! the program runs.
//!
//! A tree is written whole into fresh pool pages and never changed afterwards: KVM's shadow
//! MMU only notices page-table writes the guest makes, so a table the VMM rewrote in place
//! could keep its stale shadow. A changed protection table gets a new tree.

use std::collections::BTreeMap;

use rebound_abi::PAGE_SIZE;
use vm_memory::{Bytes as _, GuestMemory};

use crate::system::{
    PTE_A, PTE_D, PTE_P, PTE_PS, PTE_RW, PTE_US, TABLE, le_bytes, low_table, write_bytes,
};
use crate::{Error, Layout};

/// No-execute (needs `EFER.NXE`).
pub const PTE_NX: u64 = 1 << 63;
/// Most 2 MiB regions one tree maps (each costs a page table).
pub const MAX_REGIONS: usize = 64;

const REGION: u64 = 2 << 20;

/// A range a program may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First byte (page aligned, at or above 4 MiB).
    pub start: u64,
    /// Bytes (page aligned).
    pub len: u64,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
}

/// Builds the tables of a program: the system area for the CPL0 exception stubs as in the boot
/// tables (supervisor-only), `page` user read-write (the program's hypercall page, in the
/// pool), the `maps` with their access, and nothing else. Pages come from `alloc`; returns the
/// root (for CR3).
pub fn program_tables<M: GuestMemory>(
    mem: &M,
    layout: &Layout,
    page: u64,
    maps: &[Mapping],
    alloc: &mut dyn FnMut() -> Result<u64, Error>,
) -> Result<u64, Error> {
    let mut low = low_table();
    for e in low.iter_mut() {
        *e &= !PTE_US;
    }
    let mut regions: BTreeMap<u64, [u64; 512]> = BTreeMap::new();
    regions.insert(0, low);
    let pool = layout
        .pool()
        .filter(|p| p.contains(&page) && page.is_multiple_of(PAGE_SIZE))
        .ok_or_else(|| Error::Layout(format!("program page {page:#x} is not in the pool")))?;
    let base = pool.start & !(REGION - 1);
    regions.entry(base).or_insert([0; 512])[((page - base) / PAGE_SIZE) as usize] =
        page | PTE_P | PTE_US | PTE_A | PTE_RW | PTE_D | PTE_NX;
    for m in maps {
        let end = m
            .start
            .checked_add(m.len)
            .filter(|e| *e <= layout.heap_end());
        if m.start < rebound_abi::IMAGE_BASE
            || !m.start.is_multiple_of(PAGE_SIZE)
            || !m.len.is_multiple_of(PAGE_SIZE)
            || end.is_none()
        {
            return Err(Error::Layout(format!(
                "range {:#x}+{:#x} is not page-aligned user memory",
                m.start, m.len
            )));
        }
        let mut flags = PTE_P | PTE_US | PTE_A;
        if m.write {
            flags |= PTE_RW | PTE_D;
        }
        if !m.exec {
            flags |= PTE_NX;
        }
        let mut p = m.start;
        while p < m.start + m.len {
            let base = p & !(REGION - 1);
            if !regions.contains_key(&base) && regions.len() > MAX_REGIONS {
                return Err(Error::Layout(format!(
                    "the ranges span more than {MAX_REGIONS} 2 MiB regions"
                )));
            }
            let t = regions.entry(base).or_insert([0; 512]);
            t[((p - base) / PAGE_SIZE) as usize] = p | flags;
            p += PAGE_SIZE;
        }
    }

    let pml4 = alloc()?;
    let pdpt = alloc()?;
    let mut pml4_t = [0u64; 512];
    pml4_t[0] = pdpt | TABLE;
    let mut pdpt_t = [0u64; 512];
    let mut pds: BTreeMap<u64, (u64, [u64; 512])> = BTreeMap::new();
    for (base, table) in &regions {
        let gib = base >> 30;
        let pt = alloc()?;
        write_bytes(mem, pt, &le_bytes(table), "page table")?;
        let pd = match pds.get_mut(&gib) {
            Some(pd) => pd,
            None => {
                let at = alloc()?;
                pds.entry(gib).or_insert((at, [0; 512]))
            }
        };
        pd.1[((base >> 21) & 511) as usize] = pt | TABLE;
    }
    for (gib, (at, table)) in &pds {
        write_bytes(mem, *at, &le_bytes(table), "page directory")?;
        pdpt_t[*gib as usize] = *at | TABLE;
    }
    write_bytes(
        mem,
        pdpt,
        &le_bytes(&pdpt_t),
        "page directory pointer table",
    )?;
    write_bytes(mem, pml4, &le_bytes(&pml4_t), "PML4")?;
    Ok(pml4)
}

/// User read+execute, not writable: how an overlay maps a page a guest runs but must not write.
pub const USER_EXEC_PAGE: u64 = PTE_P | PTE_US | PTE_A;

const ADDR: u64 = 0x000f_ffff_ffff_f000;
const ADDR_2M: u64 = 0x000f_ffff_ffe0_0000;

/// A 4 KiB page an overlay tree maps differently from its base tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    /// The virtual page (aligned, below 512 GiB).
    pub va: u64,
    /// The physical page it maps to.
    pub gpa: u64,
    /// Its flags (`PTE_P` and the rest; no address bits).
    pub flags: u64,
}

fn read_table<M: GuestMemory>(mem: &M, at: u64) -> Result<[u64; 512], Error> {
    let mut b = [0u8; PAGE_SIZE as usize];
    mem.read_slice(&mut b, vm_memory::GuestAddress(at & ADDR))
        .map_err(|source| Error::GuestMemory {
            what: "page table",
            source,
        })?;
    let mut t = [0u64; 512];
    for (i, w) in t.iter_mut().enumerate() {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[i * 8..i * 8 + 8]);
        *w = u64::from_le_bytes(x);
    }
    Ok(t)
}

/// Builds a tree that is the tree at `base` except for the `overlays`: each 2 MiB region
/// holding an overlaid page gets a page table of its own (a 2 MiB page is split into 512
/// entries with its flags), and the tables above it are copied with the new entries. Tables
/// the overlays do not touch are shared with the base tree, which must never change (the boot
/// tables do not). Used for pages replaced by copies (`rebound-vmm`'s emulation module).
/// Pages come from `alloc`; returns the root (for CR3).
pub fn overlay_tables<M: GuestMemory>(
    mem: &M,
    base: u64,
    overlays: &[Overlay],
    alloc: &mut dyn FnMut() -> Result<u64, Error>,
) -> Result<u64, Error> {
    let pml4_base = read_table(mem, base)?;
    if pml4_base[0] & PTE_P == 0 {
        return Err(Error::Layout("the base tree maps nothing".into()));
    }
    let pdpt_base = read_table(mem, pml4_base[0])?;
    // Per 2 MiB region, its new page table; per GiB, its new page directory.
    let mut regions: BTreeMap<u64, [u64; 512]> = BTreeMap::new();
    let mut pds: BTreeMap<u64, [u64; 512]> = BTreeMap::new();
    for o in overlays {
        if o.va >= 1 << 39 || !o.va.is_multiple_of(PAGE_SIZE) || o.gpa & !ADDR != 0 {
            return Err(Error::Layout(format!(
                "overlay page {:#x} is not mappable",
                o.va
            )));
        }
        let gib = o.va >> 30;
        let region = o.va & !(REGION - 1);
        let pd = match pds.entry(gib) {
            std::collections::btree_map::Entry::Occupied(e) => *e.get(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let e = pdpt_base[gib as usize];
                if e & PTE_P == 0 || e & PTE_PS != 0 {
                    return Err(Error::Layout(format!("no page directory for {:#x}", o.va)));
                }
                *v.insert(read_table(mem, e)?)
            }
        };
        let table = match regions.entry(region) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let pde = pd[((region >> 21) & 511) as usize];
                let t = if pde & PTE_P == 0 {
                    return Err(Error::Layout(format!("{:#x} is not mapped", o.va)));
                } else if pde & PTE_PS != 0 {
                    // A 2 MiB page split into 512 pages with its flags (PAT is not used).
                    let flags = (pde & 0xfff & !PTE_PS) | (pde & PTE_NX);
                    let mut t = [0u64; 512];
                    for (i, e) in t.iter_mut().enumerate() {
                        *e = ((pde & ADDR_2M) + i as u64 * PAGE_SIZE) | flags;
                    }
                    t
                } else {
                    read_table(mem, pde)?
                };
                v.insert(t)
            }
        };
        table[((o.va >> 12) & 511) as usize] = o.gpa | o.flags;
    }
    for (region, table) in &regions {
        let at = alloc()?;
        write_bytes(mem, at, &le_bytes(table), "page table")?;
        if let Some(pd) = pds.get_mut(&(region >> 30)) {
            pd[((region >> 21) & 511) as usize] = at | TABLE;
        }
    }
    let mut pdpt = pdpt_base;
    for (gib, pd) in &pds {
        let at = alloc()?;
        write_bytes(mem, at, &le_bytes(pd), "page directory")?;
        pdpt[*gib as usize] = at | TABLE;
    }
    let pdpt_at = alloc()?;
    write_bytes(
        mem,
        pdpt_at,
        &le_bytes(&pdpt),
        "page directory pointer table",
    )?;
    let mut pml4 = pml4_base;
    pml4[0] = pdpt_at | (pml4_base[0] & 0xfff);
    let root = alloc()?;
    write_bytes(mem, root, &le_bytes(&pml4), "PML4")?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn walk(mem: &GuestMemoryMmap, root: u64, va: u64) -> Option<u64> {
        let mut table = root;
        let mut flags = !PTE_NX;
        let mut nx = 0;
        for shift in [39, 30, 21, 12] {
            let e: u64 = mem
                .read_obj(GuestAddress(table + ((va >> shift) & 511) * 8))
                .unwrap();
            if e & PTE_P == 0 {
                return None;
            }
            flags &= e;
            nx |= e & PTE_NX;
            table = e & 0x000f_ffff_ffff_f000;
        }
        assert_eq!(table, va & !0xfff, "identity");
        Some(flags & 0xfff | nx)
    }

    #[test]
    fn maps_only_the_ranges_with_their_access() {
        let layout = Layout::new(64 << 20, 2).unwrap().with_pool();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let pool = layout.pool().unwrap();
        let mut next = pool.start + PAGE_SIZE;
        let mut alloc = || {
            let p = next;
            next += PAGE_SIZE;
            Ok(p)
        };
        let maps = [
            Mapping {
                start: 0x50_0000,
                len: 0x2000,
                write: false,
                exec: true,
            },
            Mapping {
                start: 0x80_0000,
                len: 0x1000,
                write: true,
                exec: false,
            },
        ];
        let page = pool.start;
        let root = program_tables(&mem, &layout, page, &maps, &mut alloc).unwrap();
        assert!(root >= pool.start && next <= pool.end);
        let code = walk(&mem, root, 0x50_1000).unwrap();
        assert_eq!(code & (PTE_US | PTE_RW), PTE_US);
        assert_eq!(code & PTE_NX, 0);
        let data = walk(&mem, root, 0x80_0000).unwrap();
        assert_eq!(data & (PTE_US | PTE_RW), PTE_US | PTE_RW);
        assert_ne!(data & PTE_NX, 0);
        assert_eq!(walk(&mem, root, 0x50_2000), None, "past the range");
        assert_eq!(walk(&mem, root, 0x40_0000), None, "the supervisor's image");
        // The system area is there for the stubs, but not for CPL3, vCPU pages included; the
        // program's own page is.
        assert_eq!(walk(&mem, root, crate::layout::IDT).unwrap() & PTE_US, 0);
        assert_eq!(walk(&mem, root, layout.vcpu_page(1)).unwrap() & PTE_US, 0);
        assert_eq!(walk(&mem, root, layout.vcpu_page(0)).unwrap() & PTE_US, 0);
        let own = walk(&mem, root, page).unwrap();
        assert_eq!(own & (PTE_US | PTE_RW), PTE_US | PTE_RW);
        assert_eq!(
            walk(&mem, root, page + PAGE_SIZE),
            None,
            "the rest of the pool"
        );
        assert_eq!(
            walk(&mem, root, rebound_abi::BOOT_INFO_ADDR).unwrap() & PTE_US,
            0
        );
    }

    #[test]
    fn refuses_bad_ranges() {
        let layout = Layout::new(64 << 20, 1).unwrap().with_pool();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let page = layout.pool().unwrap().start;
        let mut alloc = || Ok(page + PAGE_SIZE);
        for (start, len) in [
            (0x1000, 0x1000),
            (0x50_0800, 0x1000),
            (0x50_0000, 0x800),
            ((62 << 20) - 0x1000, 0x2000),
            (u64::MAX - 0xfff, 0x1000),
        ] {
            let m = Mapping {
                start,
                len,
                write: true,
                exec: false,
            };
            assert!(program_tables(&mem, &layout, page, &[m], &mut alloc).is_err());
            assert!(program_tables(&mem, &layout, 0x50_0000, &[], &mut alloc).is_err());
        }
    }

    #[test]
    fn overlays_split_one_region_and_share_the_rest() {
        let layout = Layout::new(64 << 20, 1).unwrap().with_pool();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        crate::system::write_system(&mem, &layout, &rebound_abi::BootInfo::default(), b"x")
            .unwrap();
        let pool = layout.pool().unwrap();
        let mut next = pool.start;
        let mut alloc = || {
            let p = next;
            next += PAGE_SIZE;
            Ok(p)
        };
        let copy = pool.start + 0x10_0000;
        let o = [
            Overlay {
                va: 0x40_3000,
                gpa: copy,
                flags: USER_EXEC_PAGE,
            },
            Overlay {
                va: copy + PAGE_SIZE,
                gpa: copy + PAGE_SIZE,
                flags: USER_EXEC_PAGE,
            },
        ];
        let root = overlay_tables(&mem, crate::layout::PML4, &o, &mut alloc).unwrap();
        let pte = |va: u64| -> u64 {
            let mut t = root;
            for shift in [39, 30, 21, 12] {
                let e: u64 = mem
                    .read_obj(GuestAddress((t & ADDR) + ((va >> shift) & 511) * 8))
                    .unwrap();
                if shift == 12 || e & PTE_PS != 0 {
                    return e;
                }
                t = e;
            }
            unreachable!()
        };
        assert_eq!(pte(0x40_3000), copy | USER_EXEC_PAGE);
        // Its neighbours keep the 2 MiB page's address and flags.
        assert_eq!(pte(0x40_4000) & ADDR, 0x40_4000);
        assert_ne!(pte(0x40_4000) & PTE_RW, 0);
        assert_eq!(pte(copy + PAGE_SIZE) & (PTE_US | PTE_RW), PTE_US);
        assert_eq!(
            pte(copy) & PTE_US,
            0,
            "the rest of the pool stays supervisor-only"
        );
        // Regions without overlays are the base tree's own entries.
        assert_eq!(pte(0x80_0000) & PTE_PS, PTE_PS);
        assert_eq!(pte(crate::layout::IDT) & PTE_US, 0);
        assert!(
            overlay_tables(
                &mem,
                crate::layout::PML4,
                &[Overlay {
                    va: 0x40_0800,
                    gpa: 0,
                    flags: 0
                }],
                &mut alloc
            )
            .is_err()
        );
    }
}
