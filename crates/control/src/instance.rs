//! One VM's controller: a thin composition of parts, each owning its state and its lock.
//!
//! | part | module | owns |
//! | --- | --- | --- |
//! | [`Lifecycle`] | `lifecycle` | the phase (the transition table) and the built VM |
//! | [`Resources`] | `config` | machine, boot source, drive: what the VM is built from |
//! | [`Console`] | `console` | the user's console and the VM's output commit |
//! | [`Protector`] | `protection` | the checkpoint engine and its settings |
//! | [`SurvivalPart`] | `survival` | the state directory, takeovers, live update |
//! | [`PlacementPart`] | `placement` | where vCPUs run, what a host CPU fault does |
//! | [`Sharing`] | `sharing` | shared regions and the identity's persistent cache |
//! | [`NetPart`] | `rebound_net::part` | network interfaces and their host backends |
//!
//! Building the VM (boot, snapshot load, recovery) is in `builder`. Every request is checked
//! against the lifecycle table first; a subsystem adds a part, not fields here.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rebound_checkpoint::EngineStats;
use rebound_checkpoint::engine::CheckpointReport;
use rebound_checkpoint::state_dir::StateDir;
use rebound_snapshot::Kind;
use rebound_vmm::metrics::MetricsSnapshot;
use rebound_vmm::persist::SnapshotInfo;
use rebound_vmm::share::ShareConfig;
use rebound_vmm::{DiskConfig, GuestImage, Vm, VmOutcome};

use crate::config::{
    BootSource, BootSourceConfig, ConfigView, DriveConfig, MachineConfig, MachineConfigUpdate,
    Resources, regular_file,
};
use crate::console::Console;
use crate::host_faults::{CpuFaultEvent, Placement, RecoveryAttribute};
use crate::lifecycle::{Lifecycle, Phase, Request};
use crate::placement::PlacementPart;
use crate::protection::{Preservation, Protection, Protector};
use crate::sharing::{Identity, Sharing};
use crate::survival::{Survival, SurvivalPart, Updater};
use crate::{Error, Result};
use rebound_net::NetPart;
use rebound_net::part::InterfaceView;

/// How to load a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Run at once (else it stays paused until resumed).
    pub resume: bool,
    /// What the guest's `GENERATION` hypercall returns from now on (default: a new value, as for
    /// any restore).
    pub generation: Option<u64>,
    /// The disk to attach if the snapshot had a file-backed one (default: the path it had).
    pub disk: Option<PathBuf>,
    /// Recovery only: the disk's mirror, attached again and resynced from the disk.
    pub disk_mirror: Option<PathBuf>,
    /// Recovery only: the same VM goes on from its very last state (a live update), so it
    /// keeps what it holds in shared regions.
    pub same_vm: bool,
    /// Network interfaces to reattach to other host devices (interface id, host device):
    /// refused unless empty, as Rebound VMs have no network devices yet.
    pub network_overrides: Vec<(String, String)>,
    /// Whether a vsock override was given (refused: no vsock device).
    pub vsock_override: bool,
}

/// The instance's life, as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// Configured (or not yet), not started (a start in progress is not started yet).
    NotStarted,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Ended.
    Exited(VmOutcome),
}

impl InstanceState {
    /// Firecracker's names: "Not started", "Running", "Paused"; "Exited" is Rebound's.
    pub fn name(&self) -> &'static str {
        match self {
            InstanceState::NotStarted => "Not started",
            InstanceState::Running => "Running",
            InstanceState::Paused => "Paused",
            InstanceState::Exited(_) => "Exited",
        }
    }
}

/// One VM's controller.
pub struct Instance {
    id: String,
    pub(crate) lifecycle: Lifecycle,
    pub(crate) resources: Resources,
    pub(crate) console: Console,
    pub(crate) protector: Protector,
    pub(crate) survival: SurvivalPart,
    pub(crate) placement: PlacementPart,
    pub(crate) sharing: Sharing,
    pub(crate) net: NetPart,
    pub(crate) memory: rebound_memory::part::MemoryPart,
    pub(crate) capacity: rebound_capacity::part::CapacityPart,
}

impl Instance {
    /// An unconfigured instance whose guest console goes to `console` (through output commit).
    pub fn new(id: &str, console: Box<dyn Write + Send>) -> Self {
        Self {
            id: id.to_string(),
            lifecycle: Lifecycle::default(),
            resources: Resources::default(),
            console: Console::new(console),
            protector: Protector::default(),
            survival: SurvivalPart::default(),
            placement: PlacementPart::default(),
            sharing: Sharing::default(),
            net: NetPart::default(),
            memory: rebound_memory::part::MemoryPart::default(),
            capacity: rebound_capacity::part::CapacityPart::default(),
        }
    }

    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The phase in the lifecycle table.
    pub fn phase(&self) -> Phase {
        self.lifecycle.phase()
    }

    /// Current state.
    pub fn state(&self) -> InstanceState {
        match self.lifecycle.phase() {
            Phase::NotStarted | Phase::Starting => InstanceState::NotStarted,
            Phase::Running => InstanceState::Running,
            Phase::Paused => InstanceState::Paused,
            Phase::Exited => InstanceState::Exited(
                self.vm()
                    .and_then(|vm| vm.outcome())
                    .unwrap_or(VmOutcome::Stopped),
            ),
        }
    }

    /// The running VM, if started.
    pub fn vm(&self) -> Option<Arc<Vm>> {
        self.lifecycle.vm()
    }

    /// Blocks until the instance is started (by the API), then returns its VM.
    pub fn wait_started(&self) -> Arc<Vm> {
        self.lifecycle.wait_started()
    }

    fn configure<T>(&self, what: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.lifecycle.configure(Request::Configure(what), f)
    }

    // Configuration (before start).

    /// Sets vCPUs and memory (validated now, not at start).
    pub fn set_machine_config(&self, m: MachineConfig) -> Result<()> {
        self.configure("the machine configuration", || {
            self.resources.set_machine(m)
        })
    }

    /// Applies a partial machine configuration; returns the result.
    pub fn update_machine_config(&self, u: &MachineConfigUpdate) -> Result<MachineConfig> {
        self.configure("the machine configuration", || {
            self.resources.update_machine(u)
        })
    }

    /// The machine configuration.
    pub fn machine_config(&self) -> MachineConfig {
        self.resources.machine()
    }

    /// Sets the guest program and its command line (checked now: a program that is not a
    /// Rebound guest is refused here, not at start).
    pub fn set_boot_source(&self, image: GuestImage, boot_args: String) -> Result<()> {
        self.set_boot(BootSource::new(image, boot_args))
    }

    /// Sets the boot source as the API gives it (reads the image: blocking file I/O).
    pub fn set_boot_source_config(&self, config: &BootSourceConfig) -> Result<()> {
        // Checked before the image is read, so a refused request reads nothing.
        self.configure("the boot source", || Ok(()))?;
        let boot = config.load()?;
        self.set_boot(boot)
    }

    fn set_boot(&self, boot: BootSource) -> Result<()> {
        self.configure("the boot source", || self.resources.set_boot(boot))
    }

    /// Sets the disk (the CLI; `None`: no disk).
    pub fn set_disk(&self, disk: Option<DiskConfig>) -> Result<()> {
        self.configure("the drive", || {
            self.resources.set_disk(disk);
            Ok(())
        })
    }

    /// Sets the drive as the API gives it.
    pub fn set_drive(&self, drive: DriveConfig) -> Result<()> {
        self.configure("the drive", || self.resources.set_drive(drive))
    }

    /// The running VM's disk: each leg (the file, its mirror) and its health
    /// (`GET /drives/{id}`); `None` if the VM has no disk.
    pub fn drive_status(&self) -> Result<Option<Vec<rebound_block::LegStatus>>> {
        Ok(self.lifecycle.vm_for(Request::Observe)?.disk_status())
    }

    /// Attaches the file at `path` to the running VM's disk in place of its failed leg, or as
    /// its mirror, and copies the disk to it in the background (`PATCH /drives/{id}` with
    /// `mirror_path`). It serves reads once in sync.
    pub fn attach_drive_mirror(&self, path: &Path) -> Result<()> {
        let vm = self.lifecycle.vm_for(Request::Observe)?;
        if path.exists() {
            regular_file(path).map_err(|reason| Error::Invalid {
                field: "mirror_path",
                reason: format!("{}: {reason}", path.display()),
            })?;
        }
        Ok(vm.attach_disk_leg(path)?)
    }

    /// The configuration as given (`GET /vm/config`).
    pub fn config_view(&self) -> ConfigView {
        self.resources.view()
    }

    /// Puts the VM in a preserved region (a new directory on tmpfs): its memory, committed
    /// checkpoints and released output live there, so it survives this process (crash
    /// recovery with [`recover`](Self::recover), live update). Protection with the pre-image
    /// strategy starts with the VM.
    pub fn set_state_dir(&self, path: &Path) -> Result<()> {
        self.configure("the state directory", || self.survival.set_dir(path))
    }

    /// The state directory, if the VM lives in one.
    pub fn state_dir(&self) -> Option<StateDir> {
        self.survival.dir()
    }

    /// Protection to start with the VM (instead of after it).
    pub fn set_start_protection(&self, p: Option<Protection>) -> Result<()> {
        self.configure("the protection to start with", || {
            self.protector.set_start_with(p)
        })
    }

    /// Sets the VM's identity and persistent cache (before start). The identity is recorded
    /// in the state directory, if any.
    pub fn set_identity(&self, identity: Option<Identity>) -> Result<()> {
        self.configure("the identity", || self.sharing.set_identity(identity))
    }

    // Networking.

    /// Adds a network interface, or replaces the one with its id (before start).
    pub fn set_network_interface(&self, iface: rebound_net::NetworkInterface) -> Result<()> {
        self.configure("the network interfaces", || Ok(self.net.set(iface)?))
    }

    /// The network interfaces, with their counters once the VM runs.
    pub fn network_interfaces(&self) -> Vec<InterfaceView> {
        let stats = self.vm().map(|vm| vm.nic_stats()).unwrap_or_default();
        self.net.view(stats)
    }

    // Sharing.

    /// Attaches shared region `config.name`: at start if not started, at once if running.
    pub fn attach_shared(&self, config: ShareConfig) -> Result<()> {
        rebound_vmm::share::check_name("region", &config.name)?;
        match self.lifecycle.phase() {
            Phase::NotStarted => self
                .lifecycle
                .configure(Request::Share, || self.sharing.add(config)),
            _ => Ok(self
                .lifecycle
                .vm_for(Request::Share)?
                .attach_shared(&config, None)?),
        }
    }

    /// Detaches shared region `name` (from the configuration if not started).
    pub fn detach_shared(&self, name: &str) -> Result<()> {
        match self.lifecycle.phase() {
            Phase::NotStarted => self
                .lifecycle
                .configure(Request::Share, || self.sharing.remove(name)),
            _ => Ok(self.lifecycle.vm_for(Request::Share)?.detach_shared(name)?),
        }
    }

    /// Shared regions: attached (running) or configured.
    pub fn shared(&self) -> serde_json::Value {
        self.sharing.view(self.vm().as_deref())
    }

    // Placement and host faults.

    /// Sets where the vCPUs run and the recovery attribute (applied at once if running).
    pub fn set_placement(&self, p: Placement) -> Result<()> {
        self.placement.set(p)?;
        if let Some(vm) = self.vm() {
            self.placement
                .place(&vm, &crate::host_faults::HostFaults::from_env().failed())?;
        }
        Ok(())
    }

    /// Host CPUs in `failed` are out of service: if vCPUs of this VM run there, the VM is
    /// interrupted and treated as its recovery attribute says. Returns what was done, if the VM
    /// was touched.
    pub fn on_cpu_fault(&self, failed: &BTreeSet<usize>) -> Result<Option<CpuFaultEvent>> {
        let Some(vm) = self.vm() else { return Ok(None) };
        if vm.outcome().is_some() {
            return Ok(None);
        }
        let Some(plan) =
            self.placement
                .plan(&vm.vcpu_cpus()?, failed, self.protector.is_protected())
        else {
            return Ok(None);
        };
        let detail = match plan.action {
            RecoveryAttribute::Resume => {
                // The save area: the vCPUs' state, taken while they are stopped off the failed
                // CPU, loaded again once they are moved.
                let frozen = vm.freeze()?;
                let saved = frozen.state().clone();
                self.placement.place(&vm, failed)?;
                frozen.restore_state(&saved)?;
                frozen.thaw()?;
                format!("vCPUs moved to {:?}", vm.vcpu_cpus()?)
            }
            RecoveryAttribute::RestartFromCheckpoint => {
                self.placement.place(&vm, failed)?;
                let epoch = self.rollback()?;
                format!(
                    "vCPUs moved to {:?}, back to checkpoint {epoch}",
                    vm.vcpu_cpus()?
                )
            }
            RecoveryAttribute::Failover if self.protector.standby().is_some() => {
                match self.fail_over(&vm, &plan.cpus) {
                    Ok(detail) => detail,
                    Err(e) => {
                        tracing::error!("cannot hand the VM over to its standby: {e}");
                        self.stop_for_fault(&vm, &plan, &format!("handing over failed: {e}"))
                    }
                }
            }
            RecoveryAttribute::Failover => {
                self.stop_for_fault(&vm, &plan, "recovery attribute failover, no standby")
            }
            RecoveryAttribute::Stop => {
                let why = if plan.nowhere {
                    "no healthy CPU left"
                } else {
                    "recovery attribute stop"
                };
                self.stop_for_fault(&vm, &plan, why)
            }
        };
        let ev = CpuFaultEvent {
            cpus: plan.cpus,
            vcpus: plan.vcpus,
            action: plan.action.name().to_string(),
            detail,
        };
        self.survival.note_cpu_fault(ev.clone());
        Ok(Some(ev))
    }

    /// Hands the VM over to its standby (a checkpoint now, acknowledged) and stops it here
    /// (exit status 75): the standby takes it over from that checkpoint.
    fn fail_over(&self, vm: &Vm, cpus: &[usize]) -> Result<String> {
        let standby = self.protector.standby().unwrap_or_default();
        vm.pause()?;
        let epoch = match self.protector.hand_over() {
            Ok(e) => e,
            Err(e) => {
                let _ = vm.resume();
                return Err(e);
            }
        };
        let reason = format!(
            "host CPU {cpus:?} failed; handed over to the standby at {standby} from checkpoint {epoch}"
        );
        vm.stop_for_host_fault(reason.clone());
        Ok(reason)
    }

    /// Saves the VM to its save area (if it has one) and stops it (exit status 75).
    fn stop_for_fault(&self, vm: &Vm, plan: &crate::placement::FaultPlan, why: &str) -> String {
        let area = self
            .placement
            .get()
            .save_area
            .or_else(|| self.state_dir().map(|d| d.path().join("save-area.snap")));
        // Paused for good first: a snapshot thaws the VM afterwards, and whatever it ran (and
        // printed) between the capture and the stop would run again when the save area is
        // restored.
        if let Err(e) = vm.pause() {
            tracing::warn!("cannot pause the VM before saving it: {e}");
        }
        let saved = match &area {
            Some(path) => match vm.snapshot(path, Kind::Full) {
                Ok(_) => format!("state saved to {}", path.display()),
                Err(e) => format!("state could not be saved to {}: {e}", path.display()),
            },
            None => "no save area configured: state not saved".to_string(),
        };
        let reason = format!("host CPU {:?} failed ({why}); {saved}", plan.cpus);
        vm.stop_for_host_fault(reason.clone());
        reason
    }

    // Survival.

    /// How the VM has survived so far.
    pub fn survival(&self) -> Survival {
        let cpus = self
            .vm()
            .and_then(|vm| vm.vcpu_cpus().ok())
            .unwrap_or_default();
        self.survival.report(self.placement.get(), cpus)
    }

    /// Records that this process took the VM over in a live update whose old process paused
    /// the guest at `paused_at_ns` (`CLOCK_MONOTONIC`); returns the downtime.
    pub fn note_update(&self, paused_at_ns: u64) -> Duration {
        self.survival.note_update(paused_at_ns)
    }

    /// Sets how a live update starts the new VMM program.
    pub fn set_updater(&self, f: Updater) {
        self.survival.set_updater(f)
    }

    /// Checks that a live update can be attempted now (before it is accepted).
    pub fn check_update(&self) -> Result<()> {
        self.survival.check_update(&self.protector)?;
        self.lifecycle.vm_for(Request::LiveUpdate)?;
        Ok(())
    }

    /// Live update: pauses the VM, commits a last checkpoint to its state directory and hands
    /// the VM to a new VMM program (the updater); memory is not copied, the new process maps
    /// it again. Returns only if the hand-over failed, after resuming the VM here.
    pub fn live_update(&self, binary: Option<PathBuf>) -> Result<()> {
        let vm = self.lifecycle.vm_for(Request::LiveUpdate)?;
        self.survival
            .live_update(&vm, &self.protector, self.placement.get(), binary)
    }

    // Running.

    /// Waits for the VM to end, then stops protection (held output is released: nothing can
    /// roll back any more).
    pub fn wait(&self) -> Result<VmOutcome> {
        let vm = self.lifecycle.vm_for(Request::Observe)?;
        let outcome = vm.wait();
        let dir = self.state_dir();
        if let (Some(dir), Ok(output)) = (&dir, self.console.output()) {
            // The end is recorded with the output it releases before any of it is released.
            let r = dir.write_ended(
                &outcome.to_string(),
                outcome.exit_code(),
                &output.unreleased_record(),
            );
            if let Err(e) = r {
                tracing::error!(
                    "cannot record the VM's end in {}: {e}",
                    dir.path().display()
                );
            }
        }
        self.protector.end();
        // Its network backends (a passt process) end with it.
        self.net.detach();
        if let Some(dir) = dir {
            dir.end(&format!("the VM ended: {outcome}"));
        }
        Ok(outcome)
    }

    /// The process is being stopped by a signal (SIGTERM, SIGINT, SIGHUP): what runs outside
    /// it for the VM ends, so that its host ports are free. Only an uncatchable kill (a crash)
    /// leaves passt running for a recovering VMM to attach to; a state directory stays
    /// recoverable either way (the recovered VMM starts a new passt).
    pub fn stopped_by_signal(&self) {
        self.net.detach();
    }

    /// Pauses the VM; returns how long the vCPUs took to stop.
    pub fn pause(&self) -> Result<Duration> {
        Ok(self.lifecycle.vm_for(Request::Pause)?.pause()?)
    }

    /// Resumes the VM.
    pub fn resume(&self) -> Result<()> {
        Ok(self.lifecycle.vm_for(Request::Resume)?.resume()?)
    }

    /// Writes a full or diff snapshot of the VM to `path`.
    pub fn snapshot(&self, path: &Path, kind: Kind) -> Result<SnapshotInfo> {
        self.snapshot_with_memory(path, kind, None, false)
    }

    /// [`snapshot`](Self::snapshot), also writing guest memory as a raw image to `mem_file`
    /// (Firecracker's `mem_file_path`): the memory size, each stored page at its guest-physical
    /// offset, holes elsewhere (a diff's file holds only its pages). The snapshot itself still
    /// holds memory, so loading needs only it; the image is for tools that read Firecracker's.
    pub fn snapshot_with_memory(
        &self,
        path: &Path,
        kind: Kind,
        mem_file: Option<&Path>,
        with_disk: bool,
    ) -> Result<SnapshotInfo> {
        let vm = self.lifecycle.vm_for(Request::Snapshot)?;
        for (field, p) in [("snapshot_path", Some(path)), ("mem_file_path", mem_file)] {
            let Some(p) = p else { continue };
            // Opening a FIFO (or a device) to write would block or write somewhere unexpected.
            if let Ok(m) = std::fs::metadata(p)
                && !m.is_file()
            {
                return Err(Error::Invalid {
                    field,
                    reason: format!(
                        "{} exists and is not a regular file (a pipe, socket, device or directory)",
                        p.display()
                    ),
                });
            }
        }
        if mem_file == Some(path) {
            return Err(Error::Invalid {
                field: "mem_file_path",
                reason: "must differ from snapshot_path".into(),
            });
        }
        let info = vm.snapshot_with(path, kind, with_disk)?;
        if let Some(mem_file) = mem_file {
            write_memory_image(path, mem_file)?;
        }
        Ok(info)
    }

    /// Asks the guest to shut down cleanly (Firecracker's `SendCtrlAltDel`; the SDK guest sees
    /// it in its boot info and its dispatcher's run ends); if the VM has not ended `grace`
    /// later, it is stopped. Returns at once.
    pub fn shutdown(&self, grace: Duration) -> Result<()> {
        let vm = self.lifecycle.vm_for(Request::Shutdown)?;
        vm.request_shutdown()?;
        tracing::info!(?grace, "shutdown requested");
        std::thread::Builder::new()
            .name("rebound-shutdown".into())
            .spawn(move || {
                if vm.wait_timeout(grace).is_none() {
                    tracing::warn!(
                        ?grace,
                        "the guest did not shut down within its grace period: stopping it"
                    );
                    vm.stop();
                }
            })
            .map_err(|e| Error::host("cannot start the shutdown watchdog", e))?;
        Ok(())
    }

    /// Sets the VM's memory target (`PUT /memory`): the guest is asked to give memory up (or
    /// may take it back), and its swap class is moved out if it does not answer in time.
    pub fn set_memory_target(&self, target_mib: u64, answer_ms: Option<u64>) -> Result<()> {
        let vm = self.lifecycle.vm_for(Request::Memory)?;
        Ok(self.memory.set_target(&vm, target_mib, answer_ms)?)
    }

    /// The VM's memory: target, classes, swap, what the memory part did (`GET /memory`).
    pub fn memory(&self) -> rebound_memory::part::MemoryView {
        self.memory.view(self.vm().as_deref())
    }

    /// Writes a snapshot at the guest's next clone point (`PUT /capacity/clone`): what a new
    /// VMM restores as a clone for capacity.
    pub fn clone_for_capacity(
        &self,
        path: &Path,
        timeout_ms: Option<u64>,
    ) -> Result<rebound_vmm::vm::ClonePointInfo> {
        let vm = self.lifecycle.vm_for(Request::Snapshot)?;
        Ok(self.capacity.clone_snapshot(&vm, path, timeout_ms)?)
    }

    /// The VM's process, vCPU run time and clone points (`GET /capacity`).
    pub fn capacity(&self) -> rebound_capacity::part::CapacityView {
        self.capacity.view(self.vm().as_deref())
    }

    /// Counters, once started.
    pub fn metrics(&self) -> Option<MetricsSnapshot> {
        self.vm().map(|vm| vm.metrics())
    }

    // Protection.

    /// Starts protecting the VM with the checkpoint engine.
    pub fn protect(&self, p: Protection) -> Result<()> {
        let vm = self.lifecycle.vm_for(Request::Protect)?;
        let dir = self.survival.dir();
        let preserved = dir.as_ref().map(|dir| Preservation {
            dir,
            recovered: self.survival.take_recovered(),
        });
        self.protector
            .start(vm, &self.id, self.console.output()?, p, preserved)
    }

    /// Moves a replicated VM's standby (see [`Protector::move_standby`]).
    pub fn move_standby(&self, addr: Option<String>, hot: bool) -> Result<()> {
        self.lifecycle.vm_for(Request::Protect)?;
        self.protector.move_standby(addr, hot)
    }

    /// Stops protecting the VM (held output is released).
    pub fn unprotect(&self) -> Result<()> {
        self.lifecycle.vm_for(Request::Unprotect)?;
        self.protector.stop()
    }

    /// The protection settings and counters, if protected.
    pub fn protection(&self) -> Option<(Protection, EngineStats)> {
        self.protector.settings()
    }

    /// Takes a checkpoint now.
    pub fn checkpoint(&self) -> Result<CheckpointReport> {
        self.lifecycle.vm_for(Request::Checkpoint)?;
        self.protector.checkpoint()
    }

    /// Rolls the VM back to its last checkpoint; returns that checkpoint's epoch.
    pub fn rollback(&self) -> Result<u64> {
        self.lifecycle.vm_for(Request::Rollback)?;
        let epoch = self.protector.rollback()?;
        self.after_rollback();
        Ok(epoch)
    }

    /// Rolls the VM back, in place, to an earlier checkpoint `epoch` kept in the protection's
    /// snapshot directory (see [`Protector::rollback_to`]).
    pub fn rollback_to(&self, epoch: u64) -> Result<u64> {
        let vm = self.lifecycle.vm_for(Request::Rollback)?;
        let epoch = self
            .protector
            .rollback_to(vm, self.console.output()?, epoch, || {
                self.survival
                    .dir()
                    .map(|d| (d, self.survival.take_recovered()))
            })?;
        self.after_rollback();
        Ok(epoch)
    }

    /// Shared memory is not rolled back: what the VM held there since is released (its locks
    /// come back marked inconsistent for the next holder).
    fn after_rollback(&self) {
        if let Some(vm) = self.vm() {
            let n = vm.release_shared_holdings();
            if n > 0 {
                tracing::info!(
                    locks = n,
                    "released shared locks held by the rolled-back VM"
                );
            }
        }
    }
}

/// Writes the memory `snapshot` stores to `out` as a raw image (see
/// [`Instance::snapshot_with_memory`]), through a temporary file renamed into place.
fn write_memory_image(snapshot: &Path, out: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let fail = |e: &dyn std::fmt::Display| {
        Error::host(
            format!("cannot write the memory image {}", out.display()),
            e,
        )
    };
    let snap = rebound_snapshot::Snapshot::open(snapshot, rebound_snapshot::format::Verify::Full)?;
    let mut tmp_name = out.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let f = std::fs::File::create(&tmp).map_err(|e| fail(&e))?;
    let page = rebound_snapshot::PAGE_SIZE;
    let written = (|| -> Result<()> {
        f.set_len(snap.meta().mem_size).map_err(|e| fail(&e))?;
        let mut buf = Vec::new();
        for run in snap.runs() {
            buf.resize((run.count * page) as usize, 0);
            snap.read_memory(run.first * page, &mut buf)?;
            f.write_all_at(&buf, run.first * page)
                .map_err(|e| fail(&e))?;
        }
        f.sync_all().map_err(|e| fail(&e))?;
        std::fs::rename(&tmp, out).map_err(|e| fail(&e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        Instance::new("t", Box::new(std::io::sink()))
    }

    /// Every VM request on an instance that never started is refused by the table, with a
    /// message naming the request, and changes nothing.
    #[test]
    fn requests_before_start_are_refused_by_the_table() {
        let i = instance();
        let not_started = |r: Result<()>| match r {
            Err(Error::Transition {
                phase: Phase::NotStarted,
                ..
            }) => {}
            other => panic!("expected a refusal before start, got {other:?}"),
        };
        not_started(i.pause().map(|_| ()));
        not_started(i.resume());
        not_started(
            i.snapshot(Path::new("/nonexistent"), Kind::Full)
                .map(|_| ()),
        );
        not_started(i.protect(crate::default_protection()));
        not_started(i.unprotect());
        not_started(i.checkpoint().map(|_| ()));
        not_started(i.rollback().map(|_| ()));
        not_started(i.rollback_to(1).map(|_| ()));
        not_started(i.live_update(None));
        not_started(i.wait().map(|_| ()));
        assert_eq!(i.state(), InstanceState::NotStarted);
        assert!(i.metrics().is_none());
    }

    #[test]
    fn a_refused_start_changes_nothing_and_can_be_retried() {
        let i = instance();
        // No boot source: refused, still not started.
        assert!(matches!(i.start().map(|_| ()), Err(Error::Missing(_))));
        assert_eq!(i.phase(), Phase::NotStarted);
        // Configuration is still accepted.
        i.set_machine_config(MachineConfig {
            mem_size_mib: 64,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(i.machine_config().mem_size_mib, 64);
        // A refused snapshot load (no such file) changes nothing either.
        let Err(e) = i.restore(&[PathBuf::from("/nonexistent/vm.snap")], &Load::default()) else {
            panic!("a missing snapshot was loaded");
        };
        assert!(e.to_string().starts_with("snapshot_path:"), "{e}");
        assert_eq!(i.phase(), Phase::NotStarted);
    }
}
