//! Request and response bodies, named and shaped as Firecracker's.

use serde::{Deserialize, Serialize};

/// `GET /`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InstanceInfo {
    /// Always "rebound".
    pub app_name: String,
    /// The instance id (`--id`).
    pub id: String,
    /// "Not started", "Running", "Paused" or "Exited".
    pub state: String,
    /// Rebound's version.
    pub vmm_version: String,
    /// How the VM ended, once it has (Rebound extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<serde_json::Value>,
}

/// `PUT /machine-config`, `GET /machine-config`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// Number of vCPUs (1-32).
    pub vcpu_count: u32,
    /// Guest memory in MiB (a multiple of 2, at least 8).
    pub mem_size_mib: u64,
    /// Simultaneous multithreading: Rebound guests have none; only `false` is accepted.
    #[serde(default)]
    pub smt: bool,
    /// Accepted for compatibility; dirty tracking is always available to the checkpoint engine.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Only "None" (no huge pages) is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

/// `PATCH /machine-config`: any subset of the fields.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigurationUpdate {
    /// Number of vCPUs.
    pub vcpu_count: Option<u32>,
    /// Guest memory in MiB.
    pub mem_size_mib: Option<u64>,
    /// Must be false.
    pub smt: Option<bool>,
    /// Accepted for compatibility.
    pub track_dirty_pages: Option<bool>,
    /// Must be "None".
    pub huge_pages: Option<String>,
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Path of the guest ELF on the host, or `bundled:NAME` for a guest built into Rebound.
    pub kernel_image_path: String,
    /// The guest command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Not supported for SDK guests; refused if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Must equal the id in the path.
    pub drive_id: String,
    /// The disk image on the host.
    pub path_on_host: String,
    /// Accepted for compatibility (Rebound VMs have one disk).
    pub is_root_device: bool,
    /// Refuse guest writes.
    #[serde(default)]
    pub is_read_only: bool,
    /// Accepted for compatibility, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// "Unsafe" or "Writeback"; Rebound always honours flushes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// "Sync" or "Async"; Rebound serves the disk from its I/O thread either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
}

/// `PUT /actions`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// What to do.
    pub action_type: ActionType,
}

/// Actions.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ActionType {
    /// Build and start the VM.
    InstanceStart,
    /// Firecracker flushes metrics to a file; Rebound serves `GET /metrics`, so this is a no-op.
    FlushMetrics,
    /// Refused: SDK guests have no keyboard controller.
    SendCtrlAltDel,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmStateRequest {
    /// The state to reach.
    pub state: VmStateName,
}

/// States `PATCH /vm` accepts.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum VmStateName {
    /// Pause every vCPU and the devices.
    Paused,
    /// Resume.
    Resumed,
}

/// Every error response.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Error {
    /// What went wrong and, where it helps, what to do.
    pub fault_message: String,
}

/// `GET /vm/config`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FullVmConfiguration {
    /// The machine configuration.
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfiguration,
    /// The boot source, once set.
    #[serde(rename = "boot-source", skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSource>,
    /// The drives.
    pub drives: Vec<Drive>,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where to write the snapshot (memory included: Rebound keeps one file).
    pub snapshot_path: String,
    /// "Full" (default) or "Diff" (pages written since this VM's previous snapshot).
    #[serde(default)]
    pub snapshot_type: Option<SnapshotType>,
    /// Accepted for Firecracker compatibility and ignored: memory is inside `snapshot_path`.
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// Accepted for Firecracker compatibility and ignored.
    #[serde(default)]
    pub version: Option<String>,
}

/// Snapshot kinds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum SnapshotType {
    /// Everything.
    Full,
    /// Pages written since the previous snapshot.
    Diff,
}

/// Firecracker's memory backend description (accepted, not needed).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// "File" or "Uffd".
    pub backend_type: String,
    /// Path.
    pub backend_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The snapshot (a full one; diffs go in `diff_snapshot_paths`).
    pub snapshot_path: String,
    /// Diffs to apply over it, oldest first (Rebound extension).
    #[serde(default)]
    pub diff_snapshot_paths: Vec<String>,
    /// Run at once instead of staying paused.
    #[serde(default)]
    pub resume_vm: bool,
    /// What the guest's GENERATION hypercall returns from now on (Rebound extension; default
    /// a new value).
    #[serde(default)]
    pub generation: Option<u64>,
    /// The disk to attach, required if the snapshot had a file-backed one (Rebound extension:
    /// a snapshot file is not trusted to choose host files).
    #[serde(default)]
    pub disk_path: Option<String>,
    /// Accepted for Firecracker compatibility and ignored.
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// Accepted for Firecracker compatibility and ignored.
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    /// Accepted for Firecracker compatibility: dirty tracking starts with the next full snapshot.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Accepted for Firecracker compatibility.
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// `PUT /protection`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProtectionConfig {
    /// Checkpoint period, 5 to 10,000 ms; absent: checkpoints only on `PUT /checkpoint`.
    #[serde(default)]
    pub interval_ms: Option<u64>,
    /// "full", "post_image", "double_buffered" or "pre_image".
    pub strategy: rebound_checkpoint::StrategyKind,
    /// Also write every checkpoint to this snapshot directory.
    #[serde(default)]
    pub snapshot_dir: Option<String>,
    /// Diffs kept in the directory before merging (default 16).
    #[serde(default)]
    pub max_chain: Option<u32>,
}

/// `PUT /rollback` (optional body).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RollbackParams {
    /// A checkpoint kept in the protection's snapshot directory.
    pub epoch: u64,
}

/// `PUT /state-dir` (Rebound extension, before `InstanceStart`): keep the VM in a state
/// directory so it survives this process (crash recovery, live update).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StateDirConfig {
    /// A new directory on tmpfs (e.g. under /dev/shm).
    pub path: String,
}

/// `PUT /update` (Rebound extension): hand the VM to a new VMM binary.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpdateParams {
    /// The new binary (default: this one's path).
    #[serde(default)]
    pub binary: Option<String>,
}

/// `PUT /faults` (Rebound extension): host fault injection for tests and operators.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FaultParams {
    /// A host CPU.
    pub cpu: usize,
    /// true: mark it failed (for every Rebound process on the host); false: repaired.
    pub failed: bool,
}

/// `PUT /shared/{name}` (Rebound extension): attach a shared region.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SharedAttach {
    /// The VM may only read it.
    #[serde(default)]
    pub read_only: bool,
}

/// `PUT /identity` (Rebound extension, before start): the VM's identity and persistent cache.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The identity.
    pub identity: String,
    /// Its persistent cache.
    #[serde(default)]
    pub cache: Option<CacheParams>,
}

/// A persistent cache.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CacheParams {
    /// Region name.
    pub name: String,
    /// Size in MiB (used when it is created).
    pub size_mib: u64,
}
