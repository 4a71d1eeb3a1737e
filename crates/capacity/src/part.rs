//! One VM's side of cloning for capacity, the controller's part: a snapshot taken at the
//! guest's clone point (a new VMM restores it as the clone), and what the host measures of the
//! VM (its vCPU run time) for the manager.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rebound_vmm::Vm;
use rebound_vmm::vm::ClonePointInfo;
use serde::Serialize;

use crate::usage;
use crate::{Error, Result};

/// How long the guest has to reach its clone point when no timeout is given.
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
/// The longest wait for a clone point that may be asked for.
pub const MAX_TIMEOUT_MS: u64 = 60_000;

/// What the part did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CloneStats {
    /// Clone snapshots taken.
    pub clones: u64,
    /// Requests that failed (no clone point reached, the VM could not be frozen).
    pub failed: u64,
    /// The last clone snapshot taken.
    pub last: Option<ClonePointInfo>,
}

/// `GET /capacity`.
#[derive(Clone, Debug, Serialize)]
pub struct CapacityView {
    /// The VMM's process id (cgroups take processes).
    pub pid: u32,
    /// vCPU threads running.
    pub vcpus: u32,
    /// Nanoseconds the vCPU threads have run.
    pub vcpu_time_ns: u64,
    /// `CLONE_POINT` calls, and those that held the guest for a clone.
    pub clone_point_calls: u64,
    /// See [`CapacityView::clone_point_calls`].
    pub clone_points_held: u64,
    /// The guest's generation (it changes in a clone).
    pub generation: Option<u64>,
    /// What the part did.
    pub stats: CloneStats,
}

/// The controller's capacity part.
#[derive(Default)]
pub struct CapacityPart {
    stats: Mutex<CloneStats>,
}

impl CapacityPart {
    /// Writes a snapshot of `vm` at its guest's next clone point to `path` (`PUT
    /// /capacity/clone`), waiting up to `timeout_ms` for the guest to reach it.
    pub fn clone_snapshot(
        &self,
        vm: &Vm,
        path: &Path,
        timeout_ms: Option<u64>,
    ) -> Result<ClonePointInfo> {
        let timeout_ms = timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
            return Err(Error::Invalid {
                field: "timeout_ms",
                reason: format!("{timeout_ms} is not in 1..={MAX_TIMEOUT_MS}"),
            });
        }
        if path.as_os_str().is_empty() {
            return Err(Error::Invalid {
                field: "snapshot_path",
                reason: "is empty".into(),
            });
        }
        // Opening a FIFO (or a device) to write would block or write somewhere unexpected.
        if let Ok(m) = std::fs::symlink_metadata(path)
            && !m.is_file()
        {
            return Err(Error::Invalid {
                field: "snapshot_path",
                reason: format!("{} exists and is not a regular file", path.display()),
            });
        }
        let r = vm.snapshot_at_clone_point(path, Duration::from_millis(timeout_ms));
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Ok(info) => {
                s.clones += 1;
                s.last = Some(info.clone());
                tracing::info!(?info, "clone snapshot taken at the guest's clone point");
                Ok(info)
            }
            Err(e) => {
                s.failed += 1;
                Err(e.into())
            }
        }
    }

    /// The VM's capacity figures (`GET /capacity`).
    pub fn view(&self, vm: Option<&Vm>) -> CapacityView {
        let t = usage::vcpu_time(Path::new("/proc/self")).unwrap_or_default();
        let (calls, held) = vm.map_or((0, 0), Vm::clone_point_counts);
        CapacityView {
            pid: std::process::id(),
            vcpus: t.vcpus,
            vcpu_time_ns: t.ns,
            clone_point_calls: calls,
            clone_points_held: held,
            generation: vm.map(Vm::generation),
            stats: self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}
