//! The Rebound guest SDK (`no_std`).
//!
//! A guest program is a static ELF that runs at CPL3 with the VMM as its kernel:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! use rebound_guest::{println, Cpu};
//!
//! fn main(cpu: Cpu) -> i32 {
//!     println!("hello from vCPU {}", cpu.id());
//!     0
//! }
//! rebound_guest::entry!(main);
//! ```
//!
//! Every vCPU enters `main`; when vCPU 0 returns, the VM exits with that status. Other vCPUs
//! that return park until then.
//!
//! - [`hypercall`]: the raw ABI (see `docs/abi.md`).
//! - [`console`]: `print!`/`println!`, one hypercall per line.
//! - [`time`]: monotonic and wall clocks.
//! - [`dispatch`]: a cooperative task dispatcher: tasks are futures; a task waiting on I/O is
//!   resumed when the VMM sets its completion indicator in memory, never by an interrupt.
//! - [`io`]: the asynchronous I/O ring (disk reads and writes, timers).
//! - [`net`]: network interfaces (ABI 1.4) and TCP/IP over them (smoltcp): async
//!   listeners and streams for dispatcher tasks.
//! - [`share`]: memory shared with other VMs: regions, wake-ups only for idle VMs,
//!   recoverable locks, message queues (ABI 1.2).
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod boot;
pub mod console;
pub mod dispatch;
pub mod hypercall;
pub mod io;
pub mod net;
pub mod share;
pub mod time;

#[cfg(all(feature = "rt", not(test)))]
mod rt;

pub use boot::Cpu;
pub use rebound_abi as abi;

/// Declares the guest's entry function: `fn(Cpu) -> i32`.
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
