//! The memory manager: what a VM's memory should be and how it gets there.
//!
//! - [`part`]: one VM's memory target, the controller's part: it asks the guest to give pages
//!   up (or take them back) through its class table, waits for the answer for a bounded time,
//!   and moves the guest's swap class out of RAM itself when the guest does not answer or did
//!   not give enough.
//! - [`policy`]: how a host budget is spread across VMs (pure logic): reclaim in proportion to
//!   each VM's cache, never below its minimum; memory given back in proportion to what each
//!   gave up.
//! - [`pressure`]: the host's memory as the kernel reports it (`/proc/pressure/memory`,
//!   `/proc/meminfo`).
//! - [`manager`]: the host-wide loop that watches the budget and the pressure and sets each
//!   VM's target.
//!
//! See `docs/memory.md`.

pub mod manager;
pub mod part;
pub mod policy;
pub mod pressure;

/// Errors of the memory manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad request (a target, a budget).
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The VM refused (no class table, memory that cannot be moved out).
    #[error(transparent)]
    Vm(#[from] rebound_vmm::Error),
    /// A member of the manager could not be reached.
    #[error("{member}: {reason}")]
    Member {
        /// Which.
        member: String,
        /// Why.
        reason: String,
    },
    /// A host call failed.
    #[error("{what}: {source}")]
    Host {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Results of the memory manager.
pub type Result<T> = std::result::Result<T, Error>;

/// Pages per MiB.
pub const PAGES_PER_MIB: u64 = 256;
