//! Sinks: where checkpoints go. A sink acknowledges a checkpoint by returning from
//! [`Sink::commit`] once it is durable (written and fsynced) or received.
//!
//! - [`snapshot_dir`]: snapshot files in a directory (restore, clone, named rollback).
//! - [`preserved`]: the VM's state directory (crash recovery and live update).
//! - The remote standby implements the same trait.

pub mod preserved;
pub mod snapshot_dir;

use rebound_snapshot::DirtySet;
use rebound_vmm::persist::SavedState;

pub use preserved::Preserved;
pub use snapshot_dir::{SnapshotDir, chain_to_epoch, newest_chain, newest_epoch, prune_after};

use crate::state_dir::OutputRecord;
use crate::strategy::PageSource;
use crate::{CheckpointRef, Error};

/// One checkpoint, as a sink sees it.
pub struct CheckpointData<'a> {
    /// Its epoch number.
    pub epoch: u64,
    /// Its id (random: tells it apart from any other checkpoint numbered `epoch`).
    pub id: u64,
    /// The committed checkpoint it follows (None: the first since protection started afresh).
    pub follows: Option<CheckpointRef>,
    /// vCPU, device and VM state.
    pub state: &'a SavedState,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Pages changed since this sink's previous commit (ignored when `full`).
    pub pages: &'a DirtySet,
    /// The sink has nothing yet (or asked for everything): send all of memory.
    pub full: bool,
    /// With `full`: the pages that may hold data (all others are zero).
    pub data: Option<&'a DirtySet>,
    /// Page contents as of the checkpoint.
    pub source: &'a dyn PageSource,
    /// The output this checkpoint releases, and where it goes in the output stream.
    pub output: &'a OutputRecord,
}

/// A checkpoint destination.
pub trait Sink: Send {
    /// A name for messages and metrics.
    fn name(&self) -> String;

    /// Stores or sends `cp`; returning `Ok` acknowledges it (durable or received).
    fn commit(&mut self, cp: &CheckpointData<'_>) -> Result<(), Error>;

    /// Whether the sink stores guest memory (a state directory does not: memory stays in
    /// place).
    fn stores_memory(&self) -> bool {
        true
    }

    /// Whether committing to this sink makes the checkpoint the one recovery resumes (a state
    /// directory's record): such a sink comes last and is skipped when another sink failed,
    /// so an unacknowledged checkpoint never becomes the recovery point.
    fn is_commit_point(&self) -> bool {
        false
    }

    /// Protection was given up (`reason`): what this sink holds can no longer be relied on.
    fn lost(&mut self, _reason: &str) {}

    /// The next commit must hold all of memory (a standby that has nothing yet).
    fn wants_full(&self) -> bool {
        false
    }

    /// The VM leaves this host for good from the last committed checkpoint: a sink whose
    /// other end can take it over lets it (a standby is left to take over, not told goodbye)
    /// and says so; false if it cannot.
    fn hand_over(&mut self) -> bool {
        false
    }

    /// Called after each checkpoint with the VM running again: a sink may do a bounded share
    /// of work here that must not pause the VM (a standby's full copy, read from `live`).
    fn between(&mut self, _live: &dyn LiveMemory) {}
}

/// Guest memory as it is now, with the VM running: a page copied may change during the copy,
/// so whoever copies this way must copy again every page reported dirty after it started.
pub trait LiveMemory {
    /// Copies page `p` into `buf` (one page long); false if `p` is outside memory.
    fn copy_page(&self, p: u64, buf: &mut [u8]) -> bool;
}
