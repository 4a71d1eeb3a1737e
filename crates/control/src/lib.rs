//! The VM controller: one [`Instance`] per VM, configured piece by piece (Firecracker style),
//! then started or restored from a snapshot, paused and resumed, snapshotted, protected by the
//! checkpoint engine and rolled back. The API server and the CLI drive VMs only through it.

pub mod host_faults;
pub mod instance;

pub use instance::{
    Handover, Identity, Instance, InstanceState, Load, MachineConfig, Protection, Survival,
    Updater, default_protection, monotonic_ns,
};

/// Errors of the controller: the VMM's or the checkpoint engine's, or a request that does not
/// fit the instance's state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the VMM.
    #[error(transparent)]
    Vmm(#[from] rebound_vmm::Error),
    /// From the checkpoint engine.
    #[error(transparent)]
    Checkpoint(#[from] rebound_checkpoint::Error),
    /// From a snapshot file.
    #[error(transparent)]
    Snapshot(#[from] rebound_snapshot::SnapshotError),
    /// The request does not fit the instance's state.
    #[error("{0}")]
    State(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
