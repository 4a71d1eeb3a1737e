//! The Rebound VMM core.
//!
//! Data flows one way: a validated [`config::VmConfig`] is built into a running [`vm::Vm`]
//! (guest memory on a memfd, vCPU threads, devices), which the controller (`rebound-control`)
//! drives for the API and CLI. Every vCPU exit is handled in one place, [`vcpu`]'s run loop, which
//! dispatches hypercalls to [`hypercall`] and guest faults to [`fault`].

pub mod affinity;
pub mod boot;
mod clock;
pub mod clone_point;
pub mod components;
pub mod config;
pub mod emulate;
pub mod fault;
pub mod hypercall;
mod kick;
pub mod memory;
pub mod metrics;
mod nested;
pub mod persist;
pub mod program;
pub mod reclaim;
pub mod share;
pub mod swap;
pub mod symbols;
pub mod userfault;
mod vcpu;
pub mod vm;
mod vstate;
mod wait;

pub use config::{ConfigError, DiskConfig, GuestImage, VmConfig};
pub use fault::FaultReport;
pub use vm::{Progress, Vm, VmOutcome, VmState};

/// Errors building or driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The guest image could not be loaded.
    #[error(transparent)]
    Image(#[from] boot::ImageError),
    /// `/dev/kvm` is missing or not accessible.
    #[error("cannot open /dev/kvm ({0}): is KVM available, and may this user use it?")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// The error from KVM.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created or mapped.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Shared regions: a bad name, a missing or damaged region, no free slot.
    #[error("shared memory: {0}")]
    Share(String),
    /// vCPU placement on host CPUs failed.
    #[error("vCPU placement: {0}")]
    Affinity(String),
    /// Writing machine state into guest memory failed.
    #[error(transparent)]
    Arch(#[from] rebound_arch::Error),
    /// The disk could not be opened.
    #[error(transparent)]
    Disk(#[from] rebound_block::Error),
    /// The I/O queue could not be set up.
    #[error(transparent)]
    Ioq(#[from] rebound_devices::ioq::IoqError),
    /// A thread could not be started.
    #[error("cannot start thread {name}: {source}")]
    Thread {
        /// The thread's name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The request does not fit the VM's current state.
    #[error("{0}")]
    State(String),
    /// A snapshot could not be written or read.
    #[error(transparent)]
    Snapshot(#[from] rebound_snapshot::SnapshotError),
    /// A component's saved state was refused, or could not be saved.
    #[error("saved state: {0}")]
    Component(#[from] rebound_snapshot::component::ComponentError),
    /// A snapshot's contents do not make a VM.
    #[error("cannot restore: {0}")]
    Restore(String),
    /// The vCPUs did not all stop in time.
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(std::time::Duration),
    /// A clone for capacity could not be taken at a clone point.
    #[error("clone point: {0}")]
    ClonePoint(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
