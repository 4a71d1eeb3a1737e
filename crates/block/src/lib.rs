//! Rebound's disk storage, below the I/O queue.
//!
//! - [`disk`]: a disk and its legs: a host file, a scratch memfd or a copy-on-write view of a
//!   saved image, with an optional mirror that takes over when the primary fails, and resync.
//! - [`image`]: a disk's contents saved beside a snapshot (full, or the blocks written since
//!   the last one) and brought back as a copy-on-write view.
//!
//! Output commit (holding a protected VM's writes until their checkpoint) is above this, in
//! `rebound_devices::held_disk`.

pub mod disk;
pub mod image;

pub use disk::{Disk, LegState, LegStatus, Origin};

use std::io;

/// Why a disk could not be opened, mirrored, saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The path given.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The size is not usable.
    #[error(
        "disk image {path} is {size} bytes: it must be a non-zero multiple of {}",
        rebound_abi::io::SECTOR_SIZE
    )]
    BadSize {
        /// The path given.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Another VM has the file open for writing (or this one wants to write a file others
    /// read).
    #[error(
        "disk image {0} is in use by another VM (it is locked); a clone gets a copy-on-write \
         view of its parent's disk when the snapshot saves the disk (include_disk)"
    )]
    InUse(String),
    /// Creating a scratch disk failed.
    #[error("cannot create a scratch disk: {0}")]
    Scratch(#[source] io::Error),
    /// A mirror cannot be attached or resynced.
    #[error("disk mirror: {0}")]
    Mirror(String),
    /// A saved disk image is unusable.
    #[error("disk image: {0}")]
    Image(String),
    /// Reading or writing a saved image failed.
    #[error(transparent)]
    Snapshot(#[from] rebound_snapshot::SnapshotError),
    /// The host failed.
    #[error("disk: {0}")]
    Io(#[from] io::Error),
}
