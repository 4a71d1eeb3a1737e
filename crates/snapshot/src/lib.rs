//! Saved state for Rebound.
//!
//! - [`Snapshottable`]: the one contract every stateful component (vCPU, device, shared region)
//!   implements: save a plain-data `State` while paused, restore it into a fresh component.
//! - [`state`]: the plain-data state of vCPUs.
//! - [`dirty`]: sets of guest pages (what changed in an epoch).
//! - [`format`]: the snapshot file: a header, checksummed sections and a sparse memory image
//!   that restore maps copy-on-write. See `docs/checkpoint.md` for the layout and version rules.

pub mod dirty;
pub mod format;
pub mod state;

pub use dirty::DirtySet;
pub use format::{Kind, Snapshot, SnapshotError, SnapshotMeta};

/// Guest page size the snapshot machinery counts in.
pub const PAGE_SIZE: u64 = 4096;

/// A component whose state can be captured while the VM is paused and restored later (in the
/// same process, after a rollback, or in a new one).
pub trait Snapshottable {
    /// Plain data: no file descriptors, no pointers; versioned by the section it is stored in.
    type State: serde::Serialize + serde::de::DeserializeOwned;
    /// Why saving or restoring failed.
    type Error: std::error::Error;

    /// Captures the state. The component is quiescent (the VM is paused).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Puts the component back into `state`. The component is quiescent.
    fn restore(&self, state: Self::State) -> Result<(), Self::Error>;
}
