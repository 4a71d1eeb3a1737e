//! Writes the VMM-owned system structures into guest memory: page tables, GDT, IDT, exception
//! stubs, per-vCPU TSS (with the I/O bitmap that lets CPL3 code reach hypercall ports) and the
//! boot information page.

use rebound_abi::{BOOT_ARGS_OFFSET, BOOT_INFO_ADDR, BootInfo, PAGE_SIZE, VcpuPage, port, share};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory};

use crate::layout::*;
use crate::{Error, Layout};

/// Kernel (CPL0) code segment selector, used only by the exception stubs.
pub const KERNEL_CS: u16 = 0x10;
/// Kernel data segment selector.
pub const KERNEL_DS: u16 = 0x18;
/// User 64-bit code segment selector (RPL 3), Linux's layout.
pub const USER_CS: u16 = 0x33;
/// User data segment selector (RPL 3).
pub const USER_DS: u16 = 0x2b;
/// vCPU `i`'s TSS selector is `TSS_SELECTOR_BASE + 16 * i`.
pub const TSS_SELECTOR_BASE: u16 = 0x40;

pub(crate) const PTE_P: u64 = 1;
pub(crate) const PTE_RW: u64 = 1 << 1;
pub(crate) const PTE_US: u64 = 1 << 2;
// Accessed and dirty are preset so the MMU never writes page tables: they stay out of the
// dirty log, and checkpoints of an idle guest stay empty.
pub(crate) const PTE_A: u64 = 1 << 5;
pub(crate) const PTE_D: u64 = 1 << 6;
pub(crate) const PTE_PS: u64 = 1 << 7;
pub(crate) const TABLE: u64 = PTE_P | PTE_RW | PTE_US | PTE_A;
pub(crate) const SUPERVISOR_PAGE: u64 = PTE_P | PTE_RW | PTE_A | PTE_D;
pub(crate) const USER_RO_PAGE: u64 = PTE_P | PTE_US | PTE_A;
pub(crate) const USER_PAGE: u64 = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D;

/// Vectors for which the CPU pushes an error code.
const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

fn write<T: ByteValued, M: GuestMemory>(
    mem: &M,
    addr: u64,
    val: T,
    what: &'static str,
) -> Result<(), Error> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| Error::GuestMemory { what, source })
}

pub(crate) fn write_bytes<M: GuestMemory>(
    mem: &M,
    addr: u64,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), Error> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| Error::GuestMemory { what, source })
}

pub(crate) fn le_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The 4 KiB page table for [0, 2 MiB): the system area supervisor-only (null page unmapped),
/// boot info and share table user read-only, vCPU pages and the rest user read-write.
pub(crate) fn low_table() -> [u64; 512] {
    let mut low = [0u64; 512];
    for (i, e) in low.iter_mut().enumerate() {
        let addr = i as u64 * PAGE_SIZE;
        *e = match addr {
            0 => 0,
            BOOT_INFO_ADDR | SHARE_TABLE => addr | USER_RO_PAGE,
            a if a < BOOT_INFO_ADDR => addr | SUPERVISOR_PAGE,
            _ => addr | USER_PAGE,
        };
    }
    low
}

/// Builds the identity map of all guest memory. The first 4 MiB use 4 KiB pages so the system
/// area can be supervisor-only, boot info read-only and each stack slot get a guard page; the
/// rest uses 2 MiB pages.
fn page_tables(layout: &Layout) -> Vec<(u64, [u64; 512])> {
    let mut tables = Vec::new();
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPT | TABLE;
    tables.push((PML4, pml4));

    let mut pdpt = [0u64; 512];
    for (i, e) in pdpt
        .iter_mut()
        .enumerate()
        .take(layout.page_directories() as usize)
    {
        *e = (PDS + i as u64 * PAGE_SIZE) | TABLE;
    }
    // The shared-region window: mapped whole, user read-write; which parts hold memory, and
    // whether writes land, is up to the KVM memory slots of the regions attached.
    let first = (share::WINDOW_BASE >> 30) as usize;
    for g in 0..SHARE_GIB {
        pdpt[first + g as usize] = (SHARE_PDS + g * PAGE_SIZE) | TABLE;
        let mut pd = [0u64; 512];
        for (j, e) in pd.iter_mut().enumerate() {
            *e = (share::WINDOW_BASE + (g << 30) + ((j as u64) << 21)) | USER_PAGE | PTE_PS;
        }
        tables.push((SHARE_PDS + g * PAGE_SIZE, pd));
    }
    tables.push((PDPT, pdpt));

    for d in 0..layout.page_directories() {
        let mut pd = [0u64; 512];
        for (j, e) in pd.iter_mut().enumerate() {
            let addr = (d << 30) + ((j as u64) << 21);
            if addr >= layout.mem_size() {
                break;
            }
            *e = match addr {
                0 => PT_LOW | TABLE,
                0x20_0000 => PT_STACKS | TABLE,
                a if a >= layout.heap_end() => addr | SUPERVISOR_PAGE | PTE_PS,
                _ => addr | USER_PAGE | PTE_PS,
            };
        }
        tables.push((PDS + d * PAGE_SIZE, pd));
    }

    tables.push((PT_LOW, low_table()));

    let mut stacks = [0u64; 512];
    for (i, e) in stacks.iter_mut().enumerate() {
        let addr = STACKS + i as u64 * PAGE_SIZE;
        let guard = (addr - STACKS).is_multiple_of(STACK_SLOT);
        *e = if guard { 0 } else { addr | USER_PAGE };
    }
    tables.push((PT_STACKS, stacks));
    tables
}

fn segment_descriptor(access: u64, flags: u64) -> u64 {
    // Base 0, limit 0xfffff (ignored in long mode for code; flat for data).
    0xffff | (access << 40) | (0xf << 48) | (flags << 52)
}

fn gdt(layout: &Layout) -> Vec<u64> {
    let mut gdt = vec![0u64; (TSS_SELECTOR_BASE / 8) as usize];
    gdt[(KERNEL_CS / 8) as usize] = segment_descriptor(0x9b, 0xa); // P, DPL0, code; G, L
    gdt[(KERNEL_DS / 8) as usize] = segment_descriptor(0x93, 0xc); // P, DPL0, data; G, D/B
    gdt[4] = segment_descriptor(0xfb, 0xc); // user code32 (unused, keeps Linux's numbering)
    gdt[(USER_DS / 8) as usize] = segment_descriptor(0xf3, 0xc); // P, DPL3, data
    gdt[(USER_CS / 8) as usize] = segment_descriptor(0xfb, 0xa); // P, DPL3, code, L
    for id in 0..layout.vcpus() {
        let base = layout.tss(id);
        let limit = u64::from(TSS_LIMIT);
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x8b << 40) // present, busy 64-bit TSS
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        gdt.push(low);
        gdt.push(base >> 32);
    }
    gdt
}

/// Size in bytes of the GDT for `layout` (for the GDTR limit).
pub fn gdt_size(layout: &Layout) -> u64 {
    u64::from(TSS_SELECTOR_BASE) + 16 * u64::from(layout.vcpus())
}

/// Words the VMM finds at the stub's `rsp` when it reports: what the stub pushed (the guest's
/// `rdx` and `rax`, the vector, the error code or zero where the CPU pushes none), then the
/// CPU's frame: `[rdx, rax, vector, error code, rip, cs, rflags, rsp, ss]`.
pub const STUB_FRAME_WORDS: usize = 9;

/// The exception stubs: for each vector, push a zero error code where the CPU pushes none, the
/// vector and the guest's `rax` and `rdx` (the report needs them), and report on the fault port.
/// The VMM either ends the VM, or emulates the instruction (rewriting the saved `rax`, `rdx` and
/// `rip` in the frame) and lets the stub return to the guest with `iretq`.
fn stubs() -> Vec<u8> {
    let [lo, hi] = port::FAULT.to_le_bytes();
    let mut code = vec![0u8; (32 * STUB_SIZE) as usize];
    for v in 0u8..32 {
        let mut stub = Vec::with_capacity(STUB_SIZE as usize);
        if !has_error_code(v) {
            stub.extend_from_slice(&[0x6a, 0x00]); // push 0
        }
        stub.extend_from_slice(&[0x6a, v]); // push vector
        stub.push(0x50); // push rax
        stub.push(0x52); // push rdx
        stub.extend_from_slice(&[0x66, 0xba, lo, hi]); // mov dx, FAULT
        stub.push(0xee); // out dx, al
        stub.push(0x5a); // pop rdx
        stub.push(0x58); // pop rax
        stub.extend_from_slice(&[0x48, 0x83, 0xc4, 0x10]); // add rsp, 16
        stub.extend_from_slice(&[0x48, 0xcf]); // iretq
        let at = usize::from(v) * STUB_SIZE as usize;
        code[at..at + stub.len()].copy_from_slice(&stub);
    }
    code
}

/// For a vCPU stopped at `rip` inside an exception stub (at an instruction boundary), where
/// the interrupted guest's RIP is, in bytes above its `rsp`: the stub moves `rsp` as it
/// pushes and pops around its report. None outside the stubs.
pub fn stub_frame_rip(rip: u64) -> Option<u64> {
    let off = rip.checked_sub(STUBS).filter(|o| *o < 32 * STUB_SIZE)?;
    let (v, off) = (off / STUB_SIZE, off % STUB_SIZE);
    let b = if has_error_code(v as u8) { 0 } else { 2 };
    if b == 2 && off == 0 {
        return Some(0); // before `push 0`
    }
    match off.checked_sub(b)? {
        0 => Some(8),          // push vector
        2 => Some(16),         // push rax
        3 => Some(24),         // push rdx
        4 | 8 | 9 => Some(32), // mov dx; out; pop rdx
        10 => Some(24),        // pop rax
        11 => Some(16),        // add rsp, 16
        15 => Some(0),         // iretq
        _ => None,
    }
}

/// Rewrites the exception stubs (and the IDT pointing at them) in `mem`: after a restore, so a
/// snapshot written by an older VMM gets stubs whose faults the VMM can resume.
pub fn write_stubs<M: GuestMemory>(mem: &M) -> Result<(), Error> {
    write_bytes(mem, IDT, &le_bytes(&idt()), "IDT")?;
    write_bytes(mem, STUBS, &stubs(), "exception stubs")
}

fn idt() -> Vec<u64> {
    let mut idt = vec![0u64; 512];
    for v in 0..32u64 {
        let handler = STUBS + v * STUB_SIZE;
        idt[(2 * v) as usize] = (handler & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (0x8e << 40) // present, DPL0, 64-bit interrupt gate
            | (((handler >> 16) & 0xffff) << 48);
        idt[(2 * v + 1) as usize] = handler >> 32;
    }
    idt
}

/// Writes every VMM-owned structure for `layout` into `mem`, and the boot information page.
/// Memory is expected to be zeroed (a fresh memfd).
pub fn write_system<M: GuestMemory>(
    mem: &M,
    layout: &Layout,
    boot: &BootInfo,
    args: &[u8],
) -> Result<(), Error> {
    for (addr, table) in page_tables(layout) {
        write_bytes(mem, addr, &le_bytes(&table), "page table")?;
    }
    write_bytes(mem, GDT, &le_bytes(&gdt(layout)), "GDT")?;
    write_stubs(mem)?;

    for id in 0..layout.vcpus() {
        let tss = layout.tss(id);
        // RSP0 at offset 4: the stack the CPU switches to when a CPL3 fault enters a stub.
        write(mem, tss + 4, layout.exception_stack_top(id), "TSS")?;
        // I/O map base at offset 0x66; the bitmap itself is the zeroed memory that follows.
        write(mem, tss + 0x66, TSS_SIZE as u16, "TSS")?;
        write(mem, tss + TSS_SIZE + IOMAP_SIZE, 0xffu8, "TSS")?;
        // The fault port is for the CPL0 stubs only: a CPL3 `out` to it raises #GP instead of
        // faking a fault report.
        let fault_byte = tss + TSS_SIZE + u64::from(port::FAULT / 8);
        write(mem, fault_byte, 1u8 << (port::FAULT % 8), "TSS")?;

        let page = VcpuPage {
            self_addr: layout.vcpu_page(id),
            vcpu_id: u64::from(id),
            ..Default::default()
        };
        write(mem, layout.vcpu_page(id), page, "vCPU page")?;
    }

    if args.len() as u64 > rebound_abi::BOOT_ARGS_MAX {
        return Err(Error::Layout(format!(
            "guest command line is {} bytes, more than the {} allowed",
            args.len(),
            rebound_abi::BOOT_ARGS_MAX
        )));
    }
    write(mem, BOOT_INFO_ADDR, *boot, "boot info")?;
    write_bytes(mem, BOOT_INFO_ADDR + BOOT_ARGS_OFFSET, args, "command line")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    fn translate(mem: &GuestMemoryMmap, va: u64) -> Option<(u64, u64)> {
        let mut table = PML4;
        let mut flags = !0u64;
        for (level, shift) in [(4, 39), (3, 30), (2, 21), (1, 12)] {
            let e: u64 = mem
                .read_obj(GuestAddress(table + ((va >> shift) & 511) * 8))
                .unwrap();
            if e & PTE_P == 0 {
                return None;
            }
            flags &= e;
            if level == 2 && e & PTE_PS != 0 {
                return Some((
                    (e & !0x1f_ffff & 0xf_ffff_ffff_f000) | (va & 0x1f_ffff),
                    flags,
                ));
            }
            table = e & 0xf_ffff_ffff_f000;
        }
        Some((table | (va & 0xfff), flags))
    }

    #[test]
    fn identity_map_with_protections() {
        let layout = Layout::new(3 << 30, 2).unwrap();
        let m = mem(3 << 30);
        write_system(&m, &layout, &BootInfo::default(), b"x").unwrap();
        assert_eq!(translate(&m, 0), None, "null page must fault");
        let (pa, f) = translate(&m, PML4).unwrap();
        assert_eq!(pa, PML4);
        assert_eq!(f & PTE_US, 0, "page tables are supervisor-only");
        let (_, f) = translate(&m, BOOT_INFO_ADDR).unwrap();
        assert_eq!(f & (PTE_US | PTE_RW), PTE_US, "boot info is user read-only");
        assert_eq!(translate(&m, STACKS), None, "stack guard");
        assert!(translate(&m, layout.stack_top(0) - 8).unwrap().1 & PTE_US != 0);
        for va in [rebound_abi::IMAGE_BASE, 0x4000_1234, (3 << 30) - 8] {
            let (pa, f) = translate(&m, va).unwrap();
            assert_eq!(pa, va);
            assert_eq!(f & (PTE_US | PTE_RW), PTE_US | PTE_RW);
        }
        assert_eq!(translate(&m, 3 << 30), None);
    }

    #[test]
    fn the_interrupted_rip_is_found_at_every_stub_instruction() {
        let code = stubs();
        for v in 0u8..32 {
            let s = &code[usize::from(v) * STUB_SIZE as usize..][..STUB_SIZE as usize];
            // Walk the stub as the CPU would, tracking how far rsp is below the CPU's RIP.
            let mut depth: u64 = if has_error_code(v) { 8 } else { 0 };
            let mut at = 0usize;
            while at < s.len() {
                let rip = STUBS + u64::from(v) * STUB_SIZE + at as u64;
                assert_eq!(stub_frame_rip(rip), Some(depth), "vector {v} offset {at}");
                let (len, change): (usize, i64) = match s[at] {
                    0x6a => (2, 8),
                    0x50 | 0x52 => (1, 8),
                    0x66 => (4, 0),
                    0xee => (1, 0),
                    0x5a | 0x58 => (1, -8),
                    0x48 if s[at + 1] == 0x83 => (4, -16),
                    0x48 => break,
                    b => panic!("unexpected byte {b:#x}"),
                };
                depth = (depth as i64 + change) as u64;
                at += len;
            }
            assert_eq!(depth, 0);
        }
        assert_eq!(stub_frame_rip(0x40_0000), None);
    }

    #[test]
    fn stubs_fit_and_push_error_codes_evenly() {
        let code = stubs();
        for v in 0u8..32 {
            let s = &code[usize::from(v) * STUB_SIZE as usize..][..STUB_SIZE as usize];
            let at = if has_error_code(v) { 0 } else { 2 };
            assert_eq!(&s[at..at + 2], &[0x6a, v]);
            // Ends in `iretq`, inside its slot.
            let end = at + 2 + 2 + 4 + 1 + 2 + 4 + 2;
            assert_eq!(&s[end - 2..end], &[0x48, 0xcf]);
        }
    }
}
