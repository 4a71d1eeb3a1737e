//! Raw hypercalls and their thin wrappers.
//!
//! A hypercall puts its arguments into this vCPU's [`VcpuPage`] (found at `gs:0`), writes the
//! call number to the hypercall port ([`rebound_abi::port::HYPERCALL`]) and reads the result
//! back from the page. Each one is a VM exit (tens of microseconds), which is why the rest of
//! the SDK avoids them where it can: the clock is read from the TSC, I/O and network requests
//! go through rings in memory, and waiting is done once for many requests.
//!
//! Results are `i64`: non-negative on success, a negated Linux errno on failure, which
//! [`call`] turns into an [`Errno`]. The numbers and their arguments are in
//! [`rebound_abi::nr`] and `docs/abi.md`.
//!
//! Every function here executes `out` (or reads `gs:0`): it only works inside a Rebound guest.
//! On the host it crashes the process.

use core::arch::asm;

use rebound_abi::{VcpuPage, errno, nr, port};

/// A call failed: the negative errno value the VMM (or the SDK) returned, one of
/// [`rebound_abi::errno`].
///
/// `Debug` and `Display` both print the name and the number, `ENODEV (-19)`, so that
/// `{:?}` of a `Result` reads `Err(ENODEV (-19))`. Match on the value with the constants:
///
/// ```
/// use rebound_guest::abi::errno;
/// use rebound_guest::hypercall::Errno;
///
/// fn explain(e: Errno) -> &'static str {
///     match e {
///         Errno(errno::ENODEV) => "no disk: run with --disk or --scratch-disk-mib",
///         Errno(errno::EROFS) => "the disk is read-only",
///         _ => e.name(),
///     }
/// }
/// assert_eq!(explain(Errno(errno::ENODEV)), "no disk: run with --disk or --scratch-disk-mib");
/// assert_eq!(format!("{:?}", Err::<(), _>(Errno(-19))), "Err(ENODEV (-19))");
/// assert_eq!(Errno(-30).to_string(), "EROFS (-30)");
/// ```
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i64);

impl Errno {
    /// The errno's symbolic name (`"ENODEV"`), or `"unknown error"` for a value that is not
    /// one of [`rebound_abi::errno`].
    pub fn name(self) -> &'static str {
        match self.0 {
            errno::EIO => "EIO",
            errno::EAGAIN => "EAGAIN",
            errno::E2BIG => "E2BIG",
            errno::EFAULT => "EFAULT",
            errno::EBUSY => "EBUSY",
            errno::ENODEV => "ENODEV",
            errno::EINVAL => "EINVAL",
            errno::EROFS => "EROFS",
            errno::ENOSYS => "ENOSYS",
            errno::EPERM => "EPERM",
            errno::ENOMEM => "ENOMEM",
            errno::ENOEXEC => "ENOEXEC",
            errno::EBADF => "EBADF",
            errno::ENOSPC => "ENOSPC",
            errno::ESTALE => "ESTALE",
            _ => "unknown error",
        }
    }
}

impl core::fmt::Display for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// The name, not `Errno(-19)`: a guest's `{:?}` of a failed call should say what failed.
impl core::fmt::Debug for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(self, f)
    }
}

/// This vCPU's page (arguments, result, clock): the VMM put its address at `gs:0`.
#[inline(always)]
pub fn vcpu_page() -> *mut VcpuPage {
    let page: *mut VcpuPage;
    // SAFETY: reads one word through the gs segment the VMM set up for this vCPU; no memory
    // is written.
    unsafe { asm!("mov {}, gs:[0]", out(reg) page, options(nostack, readonly, preserves_flags)) };
    page
}

/// Bumps this vCPU's heartbeat word (ABI 1.7): progress, seen by the host without an exit.
#[cfg(not(test))]
#[inline]
pub fn beat() {
    let page = vcpu_page();
    // SAFETY: `page` is this vCPU's own page, mapped read-write for the guest; only this
    // vCPU writes its `beat` word (the VMM reads it).
    unsafe {
        let b = core::ptr::addr_of_mut!((*page).beat);
        b.write_volatile(b.read_volatile().wrapping_add(1));
    }
}

/// Host-side unit tests have no vCPU page.
#[cfg(test)]
pub fn beat() {}

/// Issues hypercall `nr` with up to six arguments (more are ignored) and returns the raw
/// result: non-negative on success, a negative [`rebound_abi::errno`] value on failure
/// (`ENOSYS` for a number the VMM does not know).
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

/// [`raw`], with a negative result as `Err(Errno)` and a non-negative one as `Ok`.
#[inline]
pub fn call(nr: u32, args: &[u64]) -> Result<u64, Errno> {
    let r = raw(nr, args);
    if r < 0 { Err(Errno(r)) } else { Ok(r as u64) }
}

/// The ABI version of the VMM running this guest, `major << 16 | minor` (`0x0001_0005` for
/// 1.5). The runtime already refused to start under another major version; compare the minor
/// with a feature's "ABI 1.x" to know whether this VMM has it. Never fails.
pub fn abi_version() -> u32 {
    raw(nr::ABI_VERSION, &[]) as u32
}

/// 0 after a fresh boot; a new value after each restore from a snapshot or clone (ABI 1.1),
/// so a guest can tell that it was restored and clones can tell each other apart. A rollback
/// does not change it. Never fails.
pub fn generation() -> u64 {
    raw(nr::GENERATION, &[]) as u64
}

/// Writes `bytes` to the VM console as they are (no newline added); prefer
/// [`print!`](crate::print) and [`println!`](crate::println).
///
/// Returns the number of bytes written (`bytes.len()`). Errors: `E2BIG` for more than
/// [`CONSOLE_WRITE_MAX`](rebound_abi::CONSOLE_WRITE_MAX) (64 KiB), `EFAULT` if the bytes are
/// not in guest memory, `EIO` if the host could not write its console.
pub fn console_write(bytes: &[u8]) -> Result<u64, Errno> {
    call(
        nr::CONSOLE_WRITE,
        &[bytes.as_ptr() as u64, bytes.len() as u64],
    )
}

/// Blocks this vCPU in the VMM (no CPU used) until an event for it arrives or `timeout_ns`
/// nanoseconds pass; `u64::MAX` waits without a timeout. Returns `true` if it timed out.
///
/// Events: a request of this vCPU's I/O ring completed, frames arrived on a NIC it set idle,
/// another VM woke it through a shared region, the host asked for a shutdown. The VMM may also
/// return early (`false`) with no event, e.g. around a snapshot: callers re-check what they
/// wait for. The [`Dispatcher`](crate::dispatch::Dispatcher) calls this when no task can run.
pub fn block(timeout_ns: u64) -> bool {
    raw(nr::BLOCK, &[timeout_ns]) == rebound_abi::BLOCK_TIMED_OUT
}

/// Gives the host CPU away briefly (the vCPU's thread yields), then returns.
pub fn yield_now() {
    raw(nr::YIELD, &[]);
}

/// Ends the whole VM at once, from any vCPU, with `status` (its low 8 bits, as for a
/// process: `rebound run` exits with it). Does not return.
///
/// Nothing is waited for: frames still queued on a NIC are never sent (call
/// [`Nic::drain_tx`](crate::net::Nic::drain_tx) first), and I/O requests that have not
/// completed may never be performed. Returning from `main` on vCPU 0 calls this.
pub fn exit(status: i32) -> ! {
    raw(nr::EXIT, &[status as u32 as u64]);
    // The VMM never resumes a vCPU after EXIT; if it did, stay put without burning CPU.
    loop {
        block(u64::MAX);
    }
}

/// Ends the VM as panicked with `msg` (at most 64 KiB are read; UTF-8 expected, other bytes
/// are replaced). `rebound run` reports it and exits with status 101. Does not return.
///
/// The runtime's panic handler calls this with the panic's location and message; call it
/// yourself only to fail without the formatting machinery.
pub fn panic_with(msg: &[u8]) -> ! {
    raw(nr::PANIC, &[msg.as_ptr() as u64, msg.len() as u64]);
    loop {
        block(u64::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every errno the ABI defines, with the name the SDK must give it.
    const ALL: [(i64, &str); 9] = [
        (errno::EIO, "EIO"),
        (errno::EAGAIN, "EAGAIN"),
        (errno::E2BIG, "E2BIG"),
        (errno::EFAULT, "EFAULT"),
        (errno::EBUSY, "EBUSY"),
        (errno::ENODEV, "ENODEV"),
        (errno::EINVAL, "EINVAL"),
        (errno::EROFS, "EROFS"),
        (errno::ENOSYS, "ENOSYS"),
    ];

    #[test]
    fn every_errno_has_its_name_in_debug_and_display() {
        for (value, name) in ALL {
            let e = Errno(value);
            assert_eq!(e.name(), name);
            let expected = format!("{name} ({value})");
            assert_eq!(format!("{e:?}"), expected);
            assert_eq!(e.to_string(), expected);
        }
        assert_eq!(
            format!("{:?}", Err::<u32, _>(Errno(-19))),
            "Err(ENODEV (-19))"
        );
        assert_eq!(format!("{:?}", Errno(-99)), "unknown error (-99)");
    }

    #[test]
    fn errno_values_are_the_linux_ones() {
        let linux = [-5, -11, -7, -14, -16, -19, -22, -30, -38];
        assert_eq!(ALL.map(|(v, _)| v), linux);
    }
}
