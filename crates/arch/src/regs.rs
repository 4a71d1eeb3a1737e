//! Initial vCPU registers: 64-bit long mode at CPL3, entering the guest image directly.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use rebound_abi::BOOT_INFO_ADDR;

use crate::Layout;
use crate::layout::{GDT, IDT, PML4, TSS_LIMIT};
use crate::system::{TSS_SELECTOR_BASE, USER_CS, USER_DS, gdt_size};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// IOPL 3 plus the always-one bit. Interrupts stay disabled: SDK guests take none.
pub const RFLAGS: u64 = 0x3002;

/// General registers for vCPU `id`: entry point, its stack, its id in `rdi` and the boot info
/// address in `rsi`.
pub fn initial_regs(layout: &Layout, id: u32, entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: layout.stack_top(id),
        rflags: RFLAGS,
        rdi: u64::from(id),
        rsi: BOOT_INFO_ADDR,
        ..Default::default()
    }
}

fn user_data(base: u64) -> kvm_segment {
    kvm_segment {
        base,
        limit: 0xffff_ffff,
        selector: USER_DS,
        type_: 3,
        present: 1,
        dpl: 3,
        db: 1,
        s: 1,
        g: 1,
        ..Default::default()
    }
}

/// Sets the system registers of vCPU `id` in `sregs` (as read from KVM, so fields this does not
/// know keep their values): paging on, long mode, CPL3 segments, GDT/IDT/TR.
pub fn configure_sregs(sregs: &mut kvm_sregs, layout: &Layout, id: u32) {
    sregs.cs = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: USER_CS,
        type_: 11,
        present: 1,
        dpl: 3,
        l: 1,
        s: 1,
        g: 1,
        ..Default::default()
    };
    sregs.ss = user_data(0);
    sregs.ds = user_data(0);
    sregs.es = user_data(0);
    sregs.fs = user_data(0);
    // gs:0 holds the vCPU page's own address: the guest finds its hypercall block in one load.
    sregs.gs = user_data(layout.vcpu_page(id));
    sregs.tr = kvm_segment {
        base: layout.tss(id),
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR_BASE + 16 * id as u16,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        type_: 2,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt_size(layout) - 1) as u16;
    sregs.idt.base = IDT;
    sregs.idt.limit = 16 * 256 - 1;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// FPU/SSE state as after `fninit` with the default MXCSR, so Rust code using SSE runs.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}
