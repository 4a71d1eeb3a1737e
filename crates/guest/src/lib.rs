//! The Rebound guest SDK (`no_std`).
//!
//! A guest program is a static ELF that runs at CPL3 with the VMM as its kernel: no operating
//! system, no system calls. It talks to the VMM through hypercalls (port I/O) and through rings
//! in its own memory that the VMM completes without interrupts. This crate is everything such
//! a program needs: the entry point and heap (feature `rt`), console, clocks, a task
//! dispatcher, disk I/O, networking and memory shared with other VMs.
//!
//! A complete guest (`src/main.rs`; it builds only as a guest, with the `Cargo.toml` and
//! `build.rs` that `rebound new NAME` writes, see `docs/guest-sdk.md`):
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! use rebound_guest::{println, Cpu};
//!
//! fn main(cpu: Cpu) -> i32 {
//!     println!("hello from vCPU {} of {}: {}", cpu.id(), cpu.count(), cpu.args());
//!     0
//! }
//! rebound_guest::entry!(main);
//! ```
//!
//! Every vCPU enters `main`; when vCPU 0 returns, the VM exits with that status. Other vCPUs
//! that return park until then. A panic on any vCPU ends the VM and is reported with its
//! location and message.
//!
//! # Modules
//!
//! - [`boot`]: [`Cpu`], what `main` receives: vCPU id and count, command line, disk size;
//!   whether the host asked for a shutdown.
//! - [`console`]: `print!`/`println!`, one hypercall per line.
//! - [`time`]: monotonic and wall clocks, in nanoseconds.
//! - [`dispatch`]: a cooperative task dispatcher: tasks are futures; a task waiting on I/O is
//!   resumed when the VMM sets its completion indicator in memory, never by an interrupt.
//! - [`io`]: the asynchronous I/O ring (disk reads and writes, flushes, timers).
//! - [`net`]: network interfaces (ABI 1.4) and TCP/IP over them (smoltcp): async
//!   listeners and streams for dispatcher tasks.
//! - [`share`]: memory shared with other VMs: regions, wake-ups only for idle VMs,
//!   recoverable locks, message queues (ABI 1.2).
//! - [`nested`]: this guest as a VMM: nested SDK guests run by the host for it (ABI 1.10).
//! - [`capacity`]: clone points, where the host may clone a busy VM for capacity (ABI 1.9).
//! - [`hypercall`]: the raw ABI (see `docs/abi.md`) and [`Errno`](hypercall::Errno).
//!
//! # Errors
//!
//! Calls into the VMM fail with an [`Errno`](hypercall::Errno), a negated Linux errno from
//! [`abi::errno`]; its `Debug` and `Display` print the name, `ENODEV (-19)`. What each call
//! returns, as the VMM (and the SDK before it) checks:
//!
//! | Call | Errors |
//! |---|---|
//! | [`IoQueue::setup`](io::IoQueue::setup) | `EINVAL` entries not a power of two in 1..=4096; `E2BIG` no heap for the ring; `EBUSY` this vCPU already has a ring |
//! | [`IoQueue::read`](io::IoQueue::read) | `ENODEV` no disk; `EINVAL` offset or length not a multiple of 512, length 0 or over 1 MiB, past the end of the disk; `EIO` host read failed |
//! | [`IoQueue::write`](io::IoQueue::write) | as `read`, plus `EROFS` disk given with `--disk-read-only`, `EAGAIN` too many writes wait for a checkpoint (protected VM) |
//! | [`IoQueue::flush`](io::IoQueue::flush) | `ENODEV` no disk; `EIO` host sync failed |
//! | [`IoQueue::sleep`](io::IoQueue::sleep) | `EBUSY` 65 536 timers already pending in the VMM |
//! | [`Nic::setup`](net::Nic::setup) | `ENODEV` no such NIC (none without `--publish`/`--tap`); `EINVAL` entries not a power of two in 1..=4096; `E2BIG` no heap |
//! | [`Nic::reset`](net::Nic::reset), [`Stack::reset`](net::Stack::reset) | `EBUSY` a received frame is still held |
//! | [`console_write`](hypercall::console_write) | `E2BIG` over 64 KiB; `EFAULT` not in guest memory; `EIO` host console failed |
//! | [`hypercall::call`] | any of the above for its call; `ENOSYS` for a number the VMM does not know |
//!
//! The disk's errors arrive as the result of the operation's future, not from the call that
//! makes it. The clocks, [`block`](hypercall::block), [`exit`](hypercall::exit) and the rest of
//! [`hypercall`] never fail. TCP calls return [`net::Error`] (refused, reset, timed out, ...);
//! shared-memory queues return [`share::Corrupt`] for what another VM damaged.
//!
//! # Without a device
//!
//! Nothing fails at boot for a missing device: [`Cpu::disk_size`] is 0 without a disk, and
//! [`net::nics`] is empty without a network interface. An I/O ring still sets up and its timers
//! work; its disk requests complete with `ENODEV`. [`Nic::setup`](net::Nic::setup) returns
//! `ENODEV`. Without shared regions, [`share::regions`] is empty.
//!
//! # Reference
//!
//! `cargo doc -p rebound-guest --open` (in the Rebound repository, or in a guest crate made by
//! `rebound new`) builds this documentation; `docs/guest-sdk.md` is the guide.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

extern crate alloc;

pub mod boot;
pub mod capacity;
pub mod console;
pub mod dispatch;
pub mod hypercall;
pub mod indicator;
pub mod io;
pub mod memory;
pub mod nested;
pub mod net;
pub mod program;
pub mod share;
pub mod time;

#[cfg(all(feature = "rt", not(test)))]
mod rt;

pub use boot::Cpu;
/// The ABI shared with the VMM: hypercall numbers, errno values, memory layouts.
pub use rebound_abi as abi;

/// Declares the guest's entry function, a `fn(Cpu) -> i32` of any name: the runtime (feature
/// `rt`) calls it on every vCPU once the heap is ready.
///
/// What it returns on vCPU 0 is the VM's exit status (its low 8 bits: `rebound run` exits with
/// it); what other vCPUs return is ignored, and they wait until the VM ends. Use it once, in
/// the binary's crate root, which also has `#![no_std]` and `#![no_main]`.
///
/// ```
/// use rebound_guest::{Cpu, println};
///
/// fn start(cpu: Cpu) -> i32 {
///     if cpu.id() != 0 {
///         return 0; // this guest works on vCPU 0 only
///     }
///     println!("hello");
///     0
/// }
/// rebound_guest::entry!(start);
/// ```
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(no_mangle)]
        pub fn __rebound_main(cpu: $crate::Cpu) -> i32 {
            let main: fn($crate::Cpu) -> i32 = $main;
            main(cpu)
        }
    };
}
