//! Rebound's host networking: the backends a virtual NIC's frames go through, and the
//! network part of the VM controller.
//!
//! - [`tap`]: a TAP device, for real deployments.
//! - [`passt`]: the user-mode backend (passt): guest ports published on the host's loopback,
//!   no TAP, no root; it outlives the VMM so connections survive a crash.
//! - [`paths`]: several TAPs on different host paths, with monitoring and failover.
//! - [`config`]: interface configuration (Firecracker's fields and Rebound's).
//! - [`part`]: the controller's network part.
//! - [`lab`]: network namespaces and a two-path topology, for tests and benchmarks.

pub mod config;
pub mod lab;
pub mod part;
pub mod passt;
pub mod paths;
pub mod tap;

pub use config::{NetworkInterface, PathConfig, Publish};
pub use part::NetPart;

/// Errors of host networking.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid.
    #[error("{field}: {reason}")]
    Config {
        /// The field at fault.
        field: String,
        /// Why.
        reason: String,
    },
    /// A backend could not be set up.
    #[error("{what}: {reason}")]
    Backend {
        /// Which.
        what: String,
        /// Why.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
