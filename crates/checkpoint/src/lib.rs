//! Rebound's checkpoint engine.
//!
//! One engine per VM takes checkpoints in epochs (every N ms, or on request): pause the vCPUs,
//! take the pages written since the last checkpoint, capture vCPU and device state, hand memory
//! to the [`strategy`], resume, and commit to the [`sink`]s. [`output`] holds what the guest sends
//! out until the checkpoint after it is safe, so a [rollback](engine::Engine::rollback) never
//! repeats or loses output. See `docs/checkpoint.md`.

pub mod engine;
pub mod faults;
pub mod output;
pub mod recovery;
pub mod sink;
pub mod state_dir;
pub mod strategy;

pub use engine::{Engine, EngineConfig, EngineStats};
pub use output::OutputCommit;
pub use strategy::StrategyKind;

/// A checkpoint as the state directory names it: its epoch, and a random id that tells it
/// apart from any other checkpoint with that number (another VM's, or one a crash left
/// uncommitted and a later run numbered again).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointRef {
    /// Its epoch.
    pub epoch: u64,
    /// Its id (never 0).
    pub id: u64,
}

/// A fresh, non-zero checkpoint id from the kernel's random source (the clock and pid if that
/// fails: ids only need to differ, not to be secret).
pub fn random_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into the buffer we own; the result is
    // checked.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let id = if n == b.len() as isize {
        u64::from_le_bytes(b)
    } else {
        rebound_vmm::persist::new_id()
    };
    id.max(1)
}

/// A sink as users know it: "state directory X", "snapshot directory X" (its internal
/// `kind:path` name spelled out).
fn sink_name(sink: &str) -> String {
    match sink.split_once(':') {
        Some(("state-dir", path)) => format!("state directory {path}"),
        Some(("snapshot-dir", path)) => format!("snapshot directory {path}"),
        _ => sink.to_string(),
    }
}

/// Errors of the checkpoint engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VM refused an operation (pause, state capture, dirty log).
    #[error("VM: {0}")]
    Vm(String),
    /// The strategy failed.
    #[error("capture strategy: {0}")]
    Strategy(String),
    /// A sink failed to store a checkpoint.
    #[error("{}: {reason}", sink_name(sink))]
    Sink {
        /// Which sink.
        sink: String,
        /// Why.
        reason: String,
    },
    /// Protection can no longer guarantee recovery (a journal write failed): it must stop.
    #[error("protection lost: {0}")]
    Lost(String),
    /// The VM in a state directory had ended: there is nothing to recover.
    #[error("the VM already ended ({reason}); its output is complete in the console log")]
    Ended {
        /// How it ended.
        reason: String,
        /// Its exit code.
        code: i32,
    },
    /// There is no checkpoint to go back to.
    #[error("no checkpoint has been taken yet")]
    NoCheckpoint,
    /// A configuration value is out of range.
    #[error("{0}")]
    Config(String),
}
