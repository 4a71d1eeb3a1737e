//! Programs (ABI 1.10): run untrusted code on this vCPU, confined to the memory its protection
//! table names, with faults reported to you instead of ending the VM.
//!
//! The supervisor (your guest's own code) puts a program's code and data in memory of its own,
//! page-aligned, describes what the program may touch with [`Range`]s, and runs it. The VMM
//! builds the program's page tables once and reuses them for every later run on the same vCPU
//! until the table changes, so a switch costs one exit each way. A program sees only its ranges
//! and its vCPU's page (for hypercalls); it may call only `ABI_VERSION`, the clocks, `YIELD`,
//! `CONSOLE_WRITE` of memory it may read, and [`exit`] (others return `EPERM`). Its code must be
//! position-independent or built for where it is put: it cannot call into the supervisor.
//!
//! ```no_run
//! use rebound_guest::program::{Outcome, Program, Range, access};
//! # let (code, data, stack_top) = (0x80_0000u64, 0x80_1000u64, 0x80_3000u64);
//! let p = Program::set(0, &[
//!     Range { start: code, len: 0x1000, access: access::READ | access::EXEC },
//!     Range { start: data, len: 0x2000, access: access::READ | access::WRITE },
//! ])
//! .expect("table accepted");
//! match p.run(code, stack_top, data) {
//!     Outcome::Exited(v) => rebound_guest::println!("program said {v}"),
//!     Outcome::Faulted(f) => rebound_guest::println!("program faulted at {:#x}", f.rip),
//!     Outcome::Refused(e) => rebound_guest::println!("not run: {e}"),
//! }
//! ```

use core::arch::asm;

pub use rebound_abi::program::{FAULTED, Fault, MAX_PROGRAMS, MAX_RANGES, Range, access};
use rebound_abi::{nr, port};

use crate::hypercall::{Errno, call, raw, vcpu_page};

/// A program with a protection table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program {
    id: u64,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The program called [`exit`] with this value.
    Exited(u64),
    /// The program faulted (an access outside its table, a privileged instruction, ...).
    Faulted(Fault),
    /// The run was refused (bad id, no table, no room for its page tables: `ENOMEM`).
    Refused(Errno),
}

impl Program {
    /// Gives program `id` (`0..MAX_PROGRAMS`) the table `ranges`. Setting the same table again
    /// keeps its page tables; a different one takes effect at the next run.
    pub fn set(id: u64, ranges: &[Range]) -> Result<Program, Errno> {
        call(
            nr::PROGRAM_SET,
            &[id, ranges.as_ptr() as u64, ranges.len() as u64],
        )?;
        Ok(Program { id })
    }

    /// Removes the program's table.
    pub fn remove(self) -> Result<(), Errno> {
        call(nr::PROGRAM_SET, &[self.id, 0, 0]).map(|_| ())
    }

    /// The program's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Runs the program on this vCPU from `entry` with its stack at `stack_top` and `arg` in
    /// `rdi`, until it exits or faults.
    pub fn run(&self, entry: u64, stack_top: u64, arg: u64) -> Outcome {
        let mut fault = Fault::default();
        let r = raw(
            nr::PROGRAM_RUN,
            &[self.id, entry, stack_top, arg, &raw mut fault as u64],
        );
        match r {
            FAULTED => Outcome::Faulted(fault),
            r if r < 0 => Outcome::Refused(Errno(r)),
            r => Outcome::Exited(r as u64),
        }
    }
}

/// Ends the program's run (call it from program code): the supervisor's [`Program::run`]
/// returns `Exited(value & i64::MAX)`.
pub fn exit(value: u64) -> ! {
    let page = vcpu_page();
    // SAFETY: the vCPU page is mapped for programs; the VMM switches away during the `out`
    // and never returns here.
    unsafe {
        core::ptr::write_volatile(&raw mut (*page).args[0], value);
        asm!("out dx, eax", in("dx") port::HYPERCALL, in("eax") nr::PROGRAM_EXIT, options(nostack, noreturn));
    }
}
