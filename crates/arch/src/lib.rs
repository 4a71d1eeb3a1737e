//! x86_64 machine setup for Rebound's SDK guests.
//!
//! Guests run in 64-bit long mode at CPL3 from their first instruction: on PVM hosts CPL0
//! code is instruction-emulated (~5000x slower), so the only CPL0 code is the VMM-provided
//! exception stubs, which run once, when a guest faults. This crate decides where everything
//! lives in guest-physical memory ([`layout`]), writes the system structures ([`system`]) and
//! computes the vCPU registers that start a guest ([`regs`]). It does not call KVM.

pub mod layout;
pub mod paging;
pub mod regs;
pub mod system;

pub use layout::Layout;

/// Errors from building a guest's machine state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The memory size or vCPU count does not fit the layout.
    #[error("{0}")]
    Layout(String),
    /// The table pool has no room for more page tables.
    #[error("the table pool is full ({0} pages in use)")]
    PoolFull(u64),
    /// Writing a system structure into guest memory failed.
    #[error("cannot write {what} into guest memory: {source}")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}
