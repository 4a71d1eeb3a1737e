//! Saved state for Rebound.
//!
//! - [`Snapshottable`]: the one contract every stateful component (vCPU, device, shared region)
//!   implements: save a plain-data `State` while paused, restore it into a fresh component.
//! - [`state`]: the plain-data state of vCPUs.
//! - [`dirty`]: sets of guest pages (what changed in an epoch).
//! - [`format`]: the snapshot file: a header, checksummed sections and a sparse memory image
//!   that restore maps copy-on-write. See `docs/checkpoint.md` for the layout and version rules.

pub mod component;
pub mod dirty;
pub mod format;
pub mod state;

pub use dirty::{DirtySet, HotPages};
pub use format::{Kind, Snapshot, SnapshotError, SnapshotMeta};

/// Guest page size the snapshot machinery counts in.
pub const PAGE_SIZE: u64 = 4096;

/// A component whose state can be captured while the VM is paused and restored later (in the
/// same process, after a rollback, or in a new one). Every method is required: a component
/// says what it saves and what restoring means for it (see [`component::Registry`]).
pub trait Snapshottable {
    /// Plain data: no file descriptors, no pointers.
    type State: serde::Serialize + serde::de::DeserializeOwned;
    /// Why saving or restoring failed.
    type Error: std::error::Error;
    /// The version of `State`'s encoding: bumped on any change to it (a newer Rebound keeps
    /// reading older versions or refuses them by name).
    const VERSION: u32;

    /// Captures the state. The component is quiescent (the VM is paused).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Whether `state` could be restored (nothing changes). Saved state is input: a damaged or
    /// hostile one must be refused here, before anything is restored.
    fn check(&self, state: &Self::State) -> Result<(), Self::Error>;

    /// Puts the component back into `state` (checked first). The component is quiescent.
    fn restore(&self, state: Self::State) -> Result<(), Self::Error>;
}

/// A shared component is snapshotted as itself.
impl<T: Snapshottable> Snapshottable for std::sync::Arc<T> {
    type State = T::State;
    type Error = T::Error;
    const VERSION: u32 = T::VERSION;

    fn save(&self) -> Result<Self::State, Self::Error> {
        (**self).save()
    }

    fn check(&self, state: &Self::State) -> Result<(), Self::Error> {
        (**self).check(state)
    }

    fn restore(&self, state: Self::State) -> Result<(), Self::Error> {
        (**self).restore(state)
    }
}
