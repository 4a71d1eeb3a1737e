//! The VM controller: one [`Instance`] per VM, configured piece by piece (Firecracker style),
//! then started or restored from a snapshot, paused and resumed, snapshotted, protected by the
//! checkpoint engine and rolled back. The API server and the CLI drive VMs only through it.
//!
//! The instance is a composition of parts (see [`instance`]); what is allowed when is one
//! table ([`lifecycle::transition`]); errors are typed ([`Error`], [`ErrorKind`]).

pub mod builder;
pub mod config;
pub mod console;
mod error;
pub mod host_faults;
pub mod instance;
pub mod lifecycle;
pub mod placement;
pub mod protection;
pub mod sharing;
pub mod survival;

pub use config::{
    BootSourceConfig, ConfigView, DriveConfig, HugePages, MachineConfig, MachineConfigUpdate,
};
pub use error::{Error, ErrorKind, Result};
pub use instance::{Instance, InstanceState, Load};
pub use lifecycle::{Phase, Request};
pub use protection::{Protection, default_protection};
pub use sharing::Identity;
pub use survival::{Handover, Survival, Updater, monotonic_ns};

/// How long a guest asked to shut down has before it is stopped.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// An I/O error's reason for a message that already names the file.
pub(crate) fn io_reason(e: &std::io::Error) -> String {
    e.to_string()
}
