//! The bare-metal runtime linked into guest programs (feature `rt`): entry point, heap, panic
//! handler and the memory functions the compiler calls.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use linked_list_allocator::LockedHeap;
use rebound_abi::{ABI_MAJOR, ABI_VERSION, BOOT_INFO_MAGIC, BootInfo, note};

use crate::{Cpu, hypercall};

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();
static HEAP_READY: AtomicBool = AtomicBool::new(false);

// Every vCPU enters here with its id in rdi and the boot info address in rsi.
core::arch::global_asm!(
    ".globl _start",
    "_start:",
    "and rsp, -16",
    "call {start}",
    "ud2",
    start = sym start,
);

unsafe extern "Rust" {
    fn __rebound_main(cpu: Cpu) -> i32;
}

/// An ELF note as the linker lays it out: sizes, type, then name and descriptor (each a multiple
/// of 4 bytes here, so no padding).
#[repr(C, align(4))]
struct AbiNote {
    namesz: u32,
    descsz: u32,
    kind: u32,
    name: [u8; 8],
    desc: [u32; 2],
}

/// The marker that makes this ELF a Rebound guest: the VMM refuses ELF files without it (a
/// program built for Linux would otherwise start and fault at its first system call).
#[used]
#[unsafe(link_section = ".note.rebound")]
static ABI_NOTE: AbiNote = AbiNote {
    namesz: note::NAME.len() as u32,
    descsz: note::DESC_SIZE,
    kind: note::TYPE_ABI,
    name: note::NAME,
    desc: [ABI_VERSION, 0],
};

extern "C" fn start(vcpu: u64, boot: *const BootInfo) -> ! {
    // Referenced, so that no linker drops the note as unused.
    // SAFETY: a valid, aligned static.
    let _ = unsafe { core::ptr::read_volatile(&raw const ABI_NOTE.kind) };
    // SAFETY: the VMM passes the boot info page's address, mapped read-only for the VM's life.
    let cpu = unsafe { Cpu::from_boot(vcpu as u32, boot) };
    if vcpu == 0 {
        let b = cpu.boot_info();
        if b.magic != BOOT_INFO_MAGIC || b.abi_version >> 16 != ABI_MAJOR {
            hypercall::panic_with(b"guest SDK and VMM disagree on the ABI major version");
        }
        let size = b.heap_end.saturating_sub(b.heap_start) as usize;
        // SAFETY: the VMM reserves [heap_start, heap_end) for the heap; nothing else uses it.
        unsafe { HEAP.lock().init(b.heap_start as *mut u8, size) };
        HEAP_READY.store(true, Ordering::Release);
    } else {
        while !HEAP_READY.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
    }
    // SAFETY: `entry!` defines this symbol with this signature.
    let status = unsafe { __rebound_main(cpu) };
    if vcpu == 0 {
        hypercall::exit(status)
    }
    loop {
        hypercall::block(u64::MAX);
    }
}

struct Buf<const N: usize> {
    b: [u8; N],
    len: usize,
}

impl<const N: usize> Write for Buf<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(N - self.len);
        self.b[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut buf = Buf::<512> {
        b: [0; 512],
        len: 0,
    };
    let _ = write!(buf, "{info}");
    hypercall::panic_with(&buf.b[..buf.len])
}

// The precompiled `alloc` library was built to unwind, so its code (e.g. `format!`) names the
// unwinder's symbols. Guests abort on panic and nothing ever unwinds: these only satisfy the
// linker, whatever the profile or LTO setting.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

#[unsafe(no_mangle)]
extern "C" fn _Unwind_Resume() -> ! {
    hypercall::panic_with(b"unwinding is not supported in Rebound guests (panic=abort)")
}

// The memory functions the compiler emits calls to. There is no libc, and writing them in Rust
// invites LLVM to turn the loops back into calls to themselves, so they are assembly. `rep movsb`
// and `rep stosb` are fast on every x86_64 CPU with ERMS.
core::arch::global_asm!(
    ".section .text.memcpy,\"ax\",@progbits",
    ".globl memcpy",
    "memcpy:",
    "mov rax, rdi",
    "mov rcx, rdx",
    "rep movsb",
    "ret",
    ".section .text.memmove,\"ax\",@progbits",
    ".globl memmove",
    "memmove:",
    "mov rax, rdi",
    "mov rcx, rdx",
    "cmp rdi, rsi",
    "jbe 2f",
    "lea r8, [rsi + rdx]",
    "cmp rdi, r8",
    "jae 2f",
    // Overlapping with the destination above the source: copy backwards.
    "lea rsi, [rsi + rdx - 1]",
    "lea rdi, [rdi + rdx - 1]",
    "std",
    "rep movsb",
    "cld",
    "ret",
    "2:",
    "rep movsb",
    "ret",
    ".section .text.memset,\"ax\",@progbits",
    ".globl memset",
    "memset:",
    "mov r9, rdi",
    "mov eax, esi",
    "mov rcx, rdx",
    "rep stosb",
    "mov rax, r9",
    "ret",
    ".section .text.memcmp,\"ax\",@progbits",
    ".globl memcmp",
    ".globl bcmp",
    "memcmp:",
    "bcmp:",
    "xor eax, eax",
    "xor ecx, ecx",
    "3:",
    "cmp rcx, rdx",
    "je 4f",
    "movzx eax, byte ptr [rdi + rcx]",
    "movzx r8d, byte ptr [rsi + rcx]",
    "inc rcx",
    "sub eax, r8d",
    "je 3b",
    "4:",
    "ret",
    ".text",
);
