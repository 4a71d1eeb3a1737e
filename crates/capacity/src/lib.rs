//! Cloning for capacity: a VM that needs more CPU than its share gets a clone, and the clone
//! gets a share lent by VMs that are idle.
//!
//! - [`part`]: the controller's part: a snapshot taken at the guest's clone point (ABI 1.9),
//!   which a new VMM restores as the clone, and the VM's vCPU time.
//! - [`usage`]: what the host measures: vCPU run time of a VMM process, the depth of a work
//!   queue in a shared region.
//! - [`cgroup`]: CPU shares per VMM process, cgroup v1 `cpu.shares` or v2 `cpu.weight`.
//! - [`policy`]: when a VM is saturated, who lends, when a clone retires (pure logic).
//! - [`manager`]: the loop that watches, clones, lends shares, retires and gives them back.
//!
//! See `docs/memory.md` (capacity).

pub mod cgroup;
pub mod manager;
pub mod part;
pub mod policy;
pub mod usage;

/// Errors of the capacity manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad request or setting.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The VM refused (no clone point reached, a VM that cannot be cloned).
    #[error(transparent)]
    Vm(#[from] rebound_vmm::Error),
    /// A member could not be reached, cloned or retired.
    #[error("{member}: {reason}")]
    Member {
        /// Which.
        member: String,
        /// Why.
        reason: String,
    },
    /// No usable cgroup CPU controller.
    #[error("cgroups: {0}")]
    Cgroup(String),
    /// A host call failed.
    #[error("{what}: {source}")]
    Host {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn host(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Host {
            what: what.into(),
            source,
        }
    }
}

/// Results of the capacity manager.
pub type Result<T> = std::result::Result<T, Error>;
