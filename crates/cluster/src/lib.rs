//! Rebound across hosts. Today: replication, the checkpoint design's remote shadow.
//!
//! - [`wire`]: the replication stream's messages, framed and checked (CRC32C per frame).
//! - [`sink`]: the primary's side, a checkpoint sink that sends each epoch to the standby and
//!   returns (acknowledges it to the engine) only once the standby has it durably, so output
//!   commit releases an epoch's output only after the standby acknowledged it (Remus' rule).
//! - [`standby`]: the standby's side, which verifies each epoch (its frame's checksum, that it
//!   follows the last one it acknowledged) and keeps the chain in a snapshot directory, from
//!   which `rebound restore --dir` builds the VM (a cold standby).

pub mod agent;
pub mod beat;
pub mod cold;
pub mod fence;
pub mod host_root;
pub mod hot;
pub mod lease;
pub mod sink;
pub mod standby;
pub mod wire;

pub use sink::Remote;

use std::io;

/// Why replication failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection failed.
    #[error("replication: {0}")]
    Io(#[from] io::Error),
    /// A frame was damaged, too large, or not what the protocol allows at that point.
    #[error("replication stream: {0}")]
    Protocol(String),
    /// The standby refused an epoch.
    #[error("the standby refused the checkpoint: {0}")]
    Refused(String),
    /// Storing an epoch failed.
    #[error("standby: {0}")]
    Store(#[from] rebound_checkpoint::Error),
}
