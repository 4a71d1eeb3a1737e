//! Raw hypercalls: arguments go into this vCPU's `VcpuPage` (found at `gs:0`), the number is
//! written to the hypercall port, the result is read back from the page.

use core::arch::asm;

use rebound_abi::{VcpuPage, errno, nr, port};

/// A hypercall failed with a negative errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i64);

impl Errno {
    /// A short name for the error.
    pub fn name(self) -> &'static str {
        match self.0 {
            errno::EIO => "EIO",
            errno::E2BIG => "E2BIG",
            errno::EFAULT => "EFAULT",
            errno::EBUSY => "EBUSY",
            errno::ENODEV => "ENODEV",
            errno::EINVAL => "EINVAL",
            errno::ENOSYS => "ENOSYS",
            _ => "unknown error",
        }
    }
}

impl core::fmt::Display for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// This vCPU's page: the VMM put its address at `gs:0`.
#[inline(always)]
pub fn vcpu_page() -> *mut VcpuPage {
    let page: *mut VcpuPage;
    // SAFETY: reads one word through the gs segment the VMM set up for this vCPU; no memory
    // is written.
    unsafe { asm!("mov {}, gs:[0]", out(reg) page, options(nostack, readonly, preserves_flags)) };
    page
}

/// Issues hypercall `nr` with up to six arguments and returns the raw result.
///
/// Only meaningful inside a Rebound guest (it executes `out` on the hypercall port).
#[inline]
pub fn raw(nr: u32, args: &[u64]) -> i64 {
    let page = vcpu_page();
    // SAFETY: the page is this vCPU's own, mapped read-write for the guest and used by no other
    // vCPU; the VMM reads the arguments and writes `ret` during the `out`, which the asm block
    // declares by clobbering memory (no `nomem`).
    unsafe {
        for (i, a) in args.iter().take(6).enumerate() {
            core::ptr::write_volatile(&raw mut (*page).args[i], *a);
        }
        asm!("out dx, eax", in("dx") port::HYPERCALL, in("eax") nr, options(nostack, preserves_flags));
        core::ptr::read_volatile(&raw const (*page).ret)
    }
}

/// [`raw`], with negative results as [`Errno`].
#[inline]
pub fn call(nr: u32, args: &[u64]) -> Result<u64, Errno> {
    let r = raw(nr, args);
    if r < 0 { Err(Errno(r)) } else { Ok(r as u64) }
}

/// The VMM's ABI version (`major << 16 | minor`).
pub fn abi_version() -> u32 {
    raw(nr::ABI_VERSION, &[]) as u32
}

/// 0 after a fresh boot; a new value after each restore or clone (ABI 1.1).
pub fn generation() -> u64 {
    raw(nr::GENERATION, &[]) as u64
}

/// Writes bytes to the VM console.
pub fn console_write(bytes: &[u8]) -> Result<u64, Errno> {
    call(
        nr::CONSOLE_WRITE,
        &[bytes.as_ptr() as u64, bytes.len() as u64],
    )
}

/// Blocks this vCPU in the VMM until an event for it or until `timeout_ns` passes
/// (`u64::MAX`: no timeout). Returns `true` if it timed out.
pub fn block(timeout_ns: u64) -> bool {
    raw(nr::BLOCK, &[timeout_ns]) == rebound_abi::BLOCK_TIMED_OUT
}

/// Gives the host CPU away briefly.
pub fn yield_now() {
    raw(nr::YIELD, &[]);
}

/// Ends the VM with `status`.
pub fn exit(status: i32) -> ! {
    raw(nr::EXIT, &[status as u32 as u64]);
    // The VMM never resumes a vCPU after EXIT; if it did, stay put without burning CPU.
    loop {
        block(u64::MAX);
    }
}

/// Reports a panic message and ends the VM.
pub fn panic_with(msg: &[u8]) -> ! {
    raw(nr::PANIC, &[msg.as_ptr() as u64, msg.len() as u64]);
    loop {
        block(u64::MAX);
    }
}
