//! Request and response bodies, named and shaped as Firecracker's.

pub use rebound_control::{
    BootSourceConfig, ConfigView, DriveConfig, HugePages, MachineConfig, MachineConfigUpdate,
};
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
    /// Asks the guest to shut down cleanly; it is stopped if it has not exited within
    /// `rebound_control::SHUTDOWN_GRACE`.
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

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where to write the snapshot (memory included: Rebound keeps one file).
    pub snapshot_path: String,
    /// "Full" (default) or "Diff" (pages written since this VM's previous snapshot).
    #[serde(default)]
    pub snapshot_type: Option<SnapshotType>,
    /// Also write guest memory here as a raw image, as Firecracker does (each stored page at
    /// its guest-physical offset, holes elsewhere). `snapshot_path` still holds memory too.
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// Accepted for Firecracker compatibility and ignored.
    #[serde(default)]
    pub version: Option<String>,
    /// Rebound: also save a file-backed disk's contents beside the snapshot
    /// (`<snapshot_path>.disk`; scratch disks are always saved). A restore then gets a
    /// copy-on-write view of them instead of reopening the file.
    #[serde(default)]
    pub include_disk: bool,
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

/// `PUT /snapshot/load`: Firecracker's body as clients send it, with Rebound's extensions.
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
    /// The disk to attach instead of the one the snapshot was taken with (Rebound extension;
    /// default: the saved path, reopened, as Firecracker does).
    #[serde(default)]
    pub disk_path: Option<String>,
    /// Drives to attach from other paths (at most one: Rebound VMs have one drive).
    #[serde(default)]
    pub drive_overrides: Vec<DriveOverride>,
    /// Network devices to attach to other host devices (refused unless empty: Rebound VMs
    /// have no network devices yet).
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// Refused if set: Rebound VMs have no vsock device.
    #[serde(default)]
    pub vsock_override: Option<serde_json::Value>,
    /// Accepted for Firecracker compatibility and ignored: memory is inside `snapshot_path`.
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// Accepted for Firecracker compatibility and ignored: memory is inside `snapshot_path`.
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    /// Accepted for Firecracker compatibility: dirty tracking is always on for the checkpoint
    /// engine, and a diff snapshot needs a full one first.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Accepted for Firecracker compatibility (as `enable_diff_snapshots`).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Accepted for Firecracker compatibility: the guest's clock continues from the snapshot.
    #[serde(default)]
    pub clock_realtime: bool,
}

/// A drive reattached from another host path at snapshot load.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    /// The drive.
    pub drive_id: String,
    /// Its new image on the host.
    pub path_on_host: String,
}

/// A network device reattached to another host device at snapshot load (Firecracker's).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// The host device (a TAP).
    pub host_dev_name: String,
}

/// `GET /version`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Version {
    /// The Firecracker API version whose requests Rebound follows.
    pub firecracker_version: String,
    /// Rebound's own version.
    pub rebound_version: String,
}

/// The Firecracker API version Rebound's compatible endpoints follow.
pub const FIRECRACKER_API_VERSION: &str = "1.10.0";

/// `PUT /logger` (Firecracker's).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// Where the log goes: a file (appended to) or a named pipe. Default: stderr.
    #[serde(default)]
    pub log_path: Option<String>,
    /// "Error", "Warning", "Info", "Debug", "Trace" or "Off" (any case).
    #[serde(default)]
    pub level: Option<String>,
    /// Print each line's level.
    #[serde(default)]
    pub show_level: Option<bool>,
    /// Print each line's origin (file and line).
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    /// Only messages from this module (e.g. `rebound_checkpoint`).
    #[serde(default)]
    pub module: Option<String>,
}

/// `PUT /metrics` (Firecracker's): where metrics are flushed as JSON lines.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A file (appended to) or a named pipe.
    pub metrics_path: String,
}

/// `PUT /protection`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProtectionConfig {
    /// Checkpoint period, 5 to 10,000 ms; absent: checkpoints only on `PUT /checkpoint`.
    #[serde(default)]
    pub interval_ms: Option<u64>,
    /// "full", "post_image", "double_buffered", "pre_image" or "block_state".
    pub strategy: rebound_checkpoint::StrategyKind,
    /// Also write every checkpoint to this snapshot directory.
    #[serde(default)]
    pub snapshot_dir: Option<String>,
    /// Diffs kept in the directory before merging (default 16).
    #[serde(default)]
    pub max_chain: Option<u32>,
    /// Replicate every checkpoint to the standby at host:port (`rebound standby`); output is
    /// released only once the standby stored its checkpoint.
    #[serde(default)]
    pub standby: Option<String>,
    /// Ask the standby to keep the VM hot (memory applied in place) rather than cold.
    #[serde(default)]
    pub standby_hot: bool,
}

/// `PATCH /protection`: move a replicated VM's standby while it runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProtectionUpdate {
    /// The new standby (host:port); null: none for now (the VM runs on, protected locally).
    pub standby: Option<String>,
    /// Ask it to keep the VM hot.
    #[serde(default)]
    pub standby_hot: bool,
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
