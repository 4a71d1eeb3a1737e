//! One VM's controller.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rebound_checkpoint::engine::{CheckpointReport, StartOptions};
use rebound_checkpoint::sink::{Preserved, Sink, SnapshotDir};
use rebound_checkpoint::state_dir::{Claim, ConsoleLog, StateDir, show_unshown};
use rebound_checkpoint::{Engine, EngineConfig, EngineStats, OutputCommit, StrategyKind};
use rebound_snapshot::format::Verify;
use rebound_snapshot::{Kind, Snapshot};
use rebound_vmm::metrics::MetricsSnapshot;
use rebound_vmm::persist::SnapshotInfo;
use rebound_vmm::share::{CacheConfig, ShareConfig};
use rebound_vmm::vm::RestoreOptions;
use rebound_vmm::{ConfigError, DiskConfig, GuestImage, Vm, VmConfig, VmOutcome, VmState};
use serde::Serialize;

use crate::host_faults::{CpuFaultEvent, Placement, RecoveryAttribute};
use crate::{Error, Result};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// vCPUs and memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
        }
    }
}

/// How to load a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Run at once (else it stays paused until resumed).
    pub resume: bool,
    /// What the guest's `GENERATION` hypercall returns from now on (default: a new value, as for
    /// any restore).
    pub generation: Option<u64>,
    /// The disk to attach if the snapshot had a file-backed one (required then).
    pub disk: Option<PathBuf>,
    /// Recovery only: the same VM goes on from its very last state (a live update), so it
    /// keeps what it holds in shared regions.
    pub same_vm: bool,
}

/// How a VM is protected by the checkpoint engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Protection {
    /// Checkpoint period in milliseconds (5 to 10,000); None: only on request.
    pub interval_ms: Option<u64>,
    /// Capture strategy.
    pub strategy: StrategyKind,
    /// Write every checkpoint to this snapshot directory.
    pub snapshot_dir: Option<PathBuf>,
    /// Diffs kept before the directory's chain is merged into a new full snapshot.
    pub max_chain: usize,
}

/// Protection for a VM in a state directory when none is given: a checkpoint every 50 ms with
/// the pre-image strategy (the only one that can recover memory in place).
pub fn default_protection() -> Protection {
    Protection {
        interval_ms: Some(50),
        strategy: StrategyKind::PreImage,
        snapshot_dir: None,
        max_chain: 16,
    }
}

/// What a new VMM process needs to take a VM over in a live update. The VM is paused, its
/// last checkpoint committed in `state_dir`; memory stays where it is.
#[derive(Clone, Debug)]
pub struct Handover {
    /// The VM's state directory.
    pub state_dir: PathBuf,
    /// `CLOCK_MONOTONIC` when the guest was paused (the new process measures downtime).
    pub paused_at_ns: u64,
    /// The protection to go on with.
    pub protection: Protection,
    /// The checkpoint committed last.
    pub epoch: u64,
    /// Whether the guest should run once taken over (it was not paused by its user).
    pub resume: bool,
    /// The VM's disk image, if it has one outside the state directory.
    pub disk: Option<PathBuf>,
    /// The program to take over (None: the updater's default).
    pub binary: Option<PathBuf>,
    /// Where the vCPUs run and the recovery attribute.
    pub placement: Placement,
    /// Shared-region member slots whose locks stay held across the exec, for the new process
    /// (the value of `rebound_vmm::share::INHERITED_CLAIMS_ENV`; empty: none).
    pub share_claims: String,
}

/// Starts the new VMM program for a live update (e.g. with `exec`). It returns only if that
/// failed, with why; the VM then resumes here.
pub type Updater = Box<dyn Fn(&Handover) -> std::io::Error + Send + Sync>;

/// How this VM has survived so far (`GET /` reports it).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Survival {
    /// The state directory, if the VM lives in one.
    pub state_dir: Option<PathBuf>,
    /// The checkpoint this process took the VM over at (recovery or live update).
    pub resumed_from_epoch: Option<u64>,
    /// Pages written back from the undo journal at that takeover.
    pub undone_pages: Option<usize>,
    /// Guest paused to guest running in the live update that started this process, in
    /// microseconds.
    pub update_downtime_us: Option<f64>,
    /// Where the vCPUs run and the recovery attribute.
    pub placement: Placement,
    /// The host CPUs each vCPU may run on now.
    pub vcpu_cpus: Vec<Vec<usize>>,
    /// Host CPU faults the VM went through.
    pub cpu_faults: Vec<CpuFaultEvent>,
}

/// `CLOCK_MONOTONIC` in nanoseconds: comparable across an `exec` on the same host, unlike
/// `Instant`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The instance's life, as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// Configured (or not yet), not started.
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

#[derive(Default)]
struct Pending {
    machine: MachineConfig,
    image: Option<GuestImage>,
    boot_args: String,
    disk: Option<DiskConfig>,
    shared: Vec<ShareConfig>,
    identity: Option<Identity>,
}

/// A VM identity, and the persistent cache that goes with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// The identity (a name).
    pub name: String,
    /// Its persistent cache: region name and size in MiB.
    pub cache: Option<(String, u64)>,
}

impl Identity {
    /// What the state directory records of it (JSON).
    fn record(&self, image_hash: u64) -> String {
        serde_json::json!({
            "identity": self.name,
            "cache": self.cache.as_ref().map(|(name, size_mib)| {
                serde_json::json!({ "name": name, "size_mib": size_mib })
            }),
            "image_hash": format!("{image_hash:016x}"),
        })
        .to_string()
    }
}

/// One VM's controller.
pub struct Instance {
    id: String,
    pending: Mutex<Pending>,
    /// The user's console, until the VM is built and output commit wraps it.
    console: Mutex<Option<Box<dyn Write + Send>>>,
    output: Mutex<Option<Arc<OutputCommit>>>,
    /// The preserved region, if the VM lives in one, and this process's claim on it.
    state_dir: Mutex<Option<(StateDir, Claim)>>,
    /// The VM was just recovered at this epoch: its records still describe it.
    recovered: Mutex<Option<u64>>,
    survival: Mutex<Survival>,
    updater: Mutex<Option<Updater>>,
    placement: Mutex<Placement>,
    /// Protection to start with the VM.
    start_protection: Mutex<Option<Protection>>,
    vm: Mutex<Option<Arc<Vm>>>,
    started: Condvar,
    engine: Mutex<Option<(Engine, Protection)>>,
}

impl Instance {
    /// An unconfigured instance whose guest console goes to `console` (through output commit).
    pub fn new(id: &str, console: Box<dyn Write + Send>) -> Self {
        Self {
            id: id.to_string(),
            pending: Mutex::new(Pending::default()),
            console: Mutex::new(Some(console)),
            output: Mutex::new(None),
            state_dir: Mutex::new(None),
            recovered: Mutex::new(None),
            survival: Mutex::new(Survival::default()),
            updater: Mutex::new(None),
            placement: Mutex::new(Placement::default()),
            start_protection: Mutex::new(None),
            vm: Mutex::new(None),
            started: Condvar::new(),
            engine: Mutex::new(None),
        }
    }

    fn output(&self) -> Result<Arc<OutputCommit>> {
        lock(&self.output)
            .clone()
            .ok_or_else(|| Error::State("the instance is not started".into()))
    }

    fn take_console(&self) -> Result<Box<dyn Write + Send>> {
        lock(&self.console)
            .take()
            .ok_or_else(|| Error::State("the instance was already started once".into()))
    }

    /// Puts the VM in a preserved region (a new directory on tmpfs): its memory, committed
    /// checkpoints and released output live there, so it survives this process (crash
    /// recovery with [`recover`](Self::recover), live update). Protection with the pre-image
    /// strategy starts with the VM.
    pub fn set_state_dir(&self, path: &Path) -> Result<()> {
        self.before_start("the state directory")?;
        let dir = StateDir::create(path)?;
        let claim = dir.claim()?;
        *lock(&self.state_dir) = Some((dir, claim));
        Ok(())
    }

    /// Protection to start with the VM (instead of after it).
    pub fn set_start_protection(&self, p: Option<Protection>) -> Result<()> {
        self.before_start("the protection to start with")?;
        *lock(&self.start_protection) = p;
        Ok(())
    }

    /// The state directory, if the VM lives in one.
    pub fn state_dir(&self) -> Option<StateDir> {
        lock(&self.state_dir).as_ref().map(|(d, _)| d.clone())
    }

    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn before_start(&self, what: &str) -> Result<()> {
        if lock(&self.vm).is_some() {
            return Err(Error::State(format!(
                "{what} cannot be changed after the instance started"
            )));
        }
        Ok(())
    }

    /// Sets vCPUs and memory (validated now, not at start).
    pub fn set_machine_config(&self, m: MachineConfig) -> Result<()> {
        self.before_start("the machine configuration")?;
        let probe = VmConfig {
            vcpu_count: m.vcpu_count,
            mem_size_mib: m.mem_size_mib,
            image: GuestImage::from_bytes("", b""),
            boot_args: String::new(),
            disk: None,
            shared: Vec::new(),
            cache: None,
        };
        probe.validate().map_err(rebound_vmm::Error::from)?;
        lock(&self.pending).machine = m;
        Ok(())
    }

    /// The machine configuration.
    pub fn machine_config(&self) -> MachineConfig {
        lock(&self.pending).machine
    }

    /// Sets the guest program and its command line.
    pub fn set_boot_source(&self, image: GuestImage, boot_args: String) -> Result<()> {
        self.before_start("the boot source")?;
        if boot_args.len() as u64 > rebound_abi::BOOT_ARGS_MAX {
            let e = ConfigError::BootArgs {
                len: boot_args.len(),
                max: rebound_abi::BOOT_ARGS_MAX,
            };
            return Err(rebound_vmm::Error::from(e).into());
        }
        let mut p = lock(&self.pending);
        p.image = Some(image);
        p.boot_args = boot_args;
        Ok(())
    }

    /// Attaches shared region `config.name`: at start if not started, at once if running.
    pub fn attach_shared(&self, config: ShareConfig) -> Result<()> {
        rebound_vmm::share::check_name("region", &config.name)?;
        if let Some(vm) = self.vm() {
            return Ok(vm.attach_shared(&config, None)?);
        }
        let mut p = lock(&self.pending);
        if p.shared.iter().any(|s| s.name == config.name) {
            return Err(Error::State(format!(
                "region {} is already attached",
                config.name
            )));
        }
        p.shared.push(config);
        Ok(())
    }

    /// Detaches shared region `name` (from the configuration if not started).
    pub fn detach_shared(&self, name: &str) -> Result<()> {
        if let Some(vm) = self.vm() {
            return Ok(vm.detach_shared(name)?);
        }
        let mut p = lock(&self.pending);
        let before = p.shared.len();
        p.shared.retain(|s| s.name != name);
        if p.shared.len() == before {
            return Err(Error::State(format!("region {name} is not attached")));
        }
        Ok(())
    }

    /// Shared regions: attached (running) or configured.
    pub fn shared(&self) -> serde_json::Value {
        match self.vm() {
            Some(vm) => {
                let c = vm.share_counters();
                let ld =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                serde_json::json!({
                    "regions": vm.shared_regions(),
                    "doorbells": ld(&c.doorbells),
                    "wakeups_sent": ld(&c.wakeups_sent),
                    "wakeups_received": ld(&c.wakeups_received),
                    "recoveries": ld(&c.recoveries),
                })
            }
            None => serde_json::json!({ "configured": lock(&self.pending).shared }),
        }
    }

    /// Sets the VM's identity and persistent cache (before start). The identity is recorded
    /// in the state directory, if any.
    pub fn set_identity(&self, identity: Option<Identity>) -> Result<()> {
        self.before_start("the identity")?;
        if let Some(id) = &identity {
            let check = |what, n: &str| rebound_vmm::share::check_name(what, n);
            check("identity", &id.name)?;
            if let Some((name, size)) = &id.cache {
                check("cache", name)?;
                if *size == 0 || size % 2 != 0 {
                    return Err(Error::State(format!(
                        "cache {name}: size {size} MiB must be a non-zero multiple of 2"
                    )));
                }
            }
        }
        lock(&self.pending).identity = identity;
        Ok(())
    }

    /// Sets the disk.
    pub fn set_disk(&self, disk: Option<DiskConfig>) -> Result<()> {
        self.before_start("the drive")?;
        lock(&self.pending).disk = disk;
        Ok(())
    }

    fn install(&self, slot: &mut Option<Arc<Vm>>, vm: Vm) -> Arc<Vm> {
        let vm = Arc::new(vm);
        if let Err(e) = self.place(&vm, &BTreeSet::new()) {
            tracing::warn!("cannot place the vCPUs: {e}");
        }
        *slot = Some(vm.clone());
        self.started.notify_all();
        vm
    }

    /// Pins the vCPUs as the placement says, avoiding `failed` CPUs.
    fn place(&self, vm: &Vm, failed: &BTreeSet<usize>) -> Result<()> {
        let p = lock(&self.placement).clone();
        if p.cpus.is_empty() && failed.is_empty() {
            return Ok(());
        }
        for i in 0..vm.descriptor().vcpus as usize {
            if let Some(cpus) = p.cpus_for(i, failed) {
                vm.pin_vcpu(i, &cpus)?;
            }
        }
        Ok(())
    }

    /// Sets where the vCPUs run and the recovery attribute (applied at once if running).
    pub fn set_placement(&self, p: Placement) -> Result<()> {
        p.validate().map_err(Error::State)?;
        *lock(&self.placement) = p;
        if let Some(vm) = self.vm() {
            self.place(&vm, &crate::host_faults::HostFaults::from_env().failed())?;
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
        let now = vm.vcpu_cpus()?;
        let vcpus: Vec<usize> = (0..now.len())
            .filter(|&i| now[i].iter().any(|c| failed.contains(c)))
            .collect();
        if vcpus.is_empty() {
            return Ok(None);
        }
        let cpus: Vec<usize> = now
            .iter()
            .flatten()
            .copied()
            .filter(|c| failed.contains(c))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let p = lock(&self.placement).clone();
        let nowhere = (0..now.len()).any(|i| p.cpus_for(i, failed).is_none());
        let mut action = if nowhere {
            RecoveryAttribute::Stop
        } else {
            p.recovery
        };
        if action == RecoveryAttribute::RestartFromCheckpoint && lock(&self.engine).is_none() {
            action = RecoveryAttribute::Stop;
        }
        let detail = match action {
            RecoveryAttribute::Resume | RecoveryAttribute::Failover => {
                // The save area: the vCPUs' state, taken while they are stopped off the failed
                // CPU, loaded again once they are moved.
                let frozen = vm.freeze()?;
                let saved = frozen.state().clone();
                self.place(&vm, failed)?;
                frozen.restore_state(&saved)?;
                frozen.thaw()?;
                format!("vCPUs moved to {:?}", vm.vcpu_cpus()?)
            }
            RecoveryAttribute::RestartFromCheckpoint => {
                self.place(&vm, failed)?;
                let epoch = self.rollback()?;
                format!(
                    "vCPUs moved to {:?}, back to checkpoint {epoch}",
                    vm.vcpu_cpus()?
                )
            }
            RecoveryAttribute::Stop => {
                let area = p
                    .save_area
                    .clone()
                    .or_else(|| self.state_dir().map(|d| d.path().join("save-area.snap")));
                // Paused for good first: a snapshot thaws the VM afterwards, and whatever it
                // ran (and printed) between the capture and the stop would run again when the
                // save area is restored.
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
                let why = if nowhere {
                    "no healthy CPU left"
                } else {
                    "recovery attribute stop"
                };
                let reason = format!("host CPU {cpus:?} failed ({why}); {saved}");
                vm.stop_for_host_fault(reason.clone());
                reason
            }
        };
        let ev = CpuFaultEvent {
            cpus,
            vcpus,
            action: action.name().to_string(),
            detail,
        };
        lock(&self.survival).cpu_faults.push(ev.clone());
        Ok(Some(ev))
    }

    /// Builds and starts the VM.
    pub fn start(&self) -> Result<Arc<Vm>> {
        let mut slot = lock(&self.vm);
        if slot.is_some() {
            return Err(Error::State("the instance is already started".into()));
        }
        let identity = lock(&self.pending).identity.clone();
        let config = {
            let p = lock(&self.pending);
            let image = p
                .image
                .clone()
                .ok_or_else(|| Error::State("no boot source: PUT /boot-source first".into()))?;
            let image_hash = image.hash();
            VmConfig {
                vcpu_count: p.machine.vcpu_count,
                mem_size_mib: p.machine.mem_size_mib,
                image,
                boot_args: p.boot_args.clone(),
                disk: p.disk.clone(),
                shared: p.shared.clone(),
                cache: p.identity.as_ref().and_then(|id| {
                    id.cache.as_ref().map(|(name, size_mib)| CacheConfig {
                        name: name.clone(),
                        size_mib: *size_mib,
                        identity: id.name.clone(),
                        image_hash,
                    })
                }),
            }
        };
        let dir = self.state_dir();
        let mut config = config;
        if let (Some(dir), Some(DiskConfig::Scratch { size_mib })) = (&dir, &config.disk) {
            // A scratch disk must outlive the process with the VM: it becomes a file in the
            // state directory (not rolled back with memory: see docs/survival.md).
            let path = dir.scratch_disk();
            let f = std::fs::File::create(&path)
                .and_then(|f| f.set_len(size_mib << 20))
                .map_err(|e| Error::State(format!("cannot create {}: {e}", path.display())));
            f?;
            config.disk = Some(DiskConfig::File {
                path,
                read_only: false,
            });
        }
        if let (Some(dir), Some(id)) = (&dir, &identity) {
            let hash = config
                .cache
                .as_ref()
                .map_or_else(|| config.image.hash(), |c| c.image_hash);
            dir.write_identity(&id.record(hash)).map_err(|e| {
                Error::State(format!(
                    "cannot record the identity in {}: {e}",
                    dir.path().display()
                ))
            })?;
        }
        let console = self.take_console()?;
        let protection = lock(&self.start_protection)
            .take()
            .or_else(|| dir.as_ref().map(|_| default_protection()));
        // A protected VM starts parked and runs once protection has started: no guest
        // instruction runs unprotected, and a guest that ends at once cannot race the start.
        let paused = protection.is_some();
        let vm = match &dir {
            None => {
                let output = OutputCommit::new(console);
                let vm = Vm::launch_with(&config, output.writer(), None, paused)?;
                *lock(&self.output) = Some(output);
                vm
            }
            Some(dir) => {
                // Released output goes to the directory's console log (written at known
                // offsets, so recovery neither loses nor repeats any), mirrored to the console.
                let log = ConsoleLog::open(&dir.console_log(), 0, Some(console))
                    .map_err(|e| {
                        Error::State(format!("cannot open {}: {e}", dir.console_log().display()))
                    })?
                    .guarding(dir.clone());
                let output = OutputCommit::new(Box::new(log));
                let vm = Vm::launch_with(&config, output.writer(), Some(&dir.memory()), paused)?;
                *lock(&self.output) = Some(output);
                vm
            }
        };
        let vm = self.install(&mut slot, vm);
        drop(slot);
        if let Some(p) = protection {
            if let Err(e) = self.protect(p) {
                // It never ran; it must not run unprotected.
                vm.stop();
                return Err(e);
            }
            vm.resume()?;
        }
        Ok(vm)
    }

    /// Takes over the VM preserved in `path` after the process that ran it ended (a crash, or
    /// a live update): undoes what the guest did after its last committed checkpoint, puts back
    /// the output that checkpoint released, and resumes it there, protected again. Returns the
    /// epoch it resumed from.
    pub fn recover(&self, path: &Path, load: &Load, protection: Option<Protection>) -> Result<u64> {
        let mut slot = lock(&self.vm);
        if slot.is_some() {
            return Err(Error::State(
                "a VM can only be recovered into an instance that has not started".into(),
            ));
        }
        let dir = StateDir::open(path)?;
        // The pid goes into `owner` only once recovery goes ahead: a refusal changes nothing.
        let claim = dir.claim_quietly()?;
        // A disk outside the directory must be named: refused before anything is written.
        let disk_named = |s: &rebound_vmm::persist::SavedState| match &s.vm.disk {
            Some(rebound_vmm::persist::DiskDescriptor::File { path, .. })
                if load.disk.is_none() && !path.starts_with(dir.path()) =>
            {
                Err(format!(
                    "the VM had disk {}: name the disk to attach (--disk)",
                    path.display()
                ))
            }
            _ => Ok(()),
        };
        let prepared = match rebound_checkpoint::recovery::prepare_accepting(&dir, disk_named) {
            Ok(p) => p,
            Err(e @ rebound_checkpoint::Error::Ended { .. }) => {
                // Its last output may have reached the log but not the console.
                if let Ok(mut console) = self.take_console() {
                    let _ = show_unshown(&dir.console_log(), &mut console);
                }
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        claim.announce();
        let console = self.take_console()?;
        let log = ConsoleLog::open(&dir.console_log(), prepared.output_end, Some(console))
            .map_err(|e| Error::State(format!("cannot open {}: {e}", dir.console_log().display())))?
            .guarding(dir.clone());
        let output = OutputCommit::new_at(Box::new(log), prepared.output_end);
        // A disk kept in the state directory (a scratch disk) is taken from there.
        let disk = load.disk.clone().or_else(|| match &prepared.state.vm.disk {
            Some(rebound_vmm::persist::DiskDescriptor::File { path, .. })
                if path.starts_with(dir.path()) =>
            {
                Some(path.clone())
            }
            _ => None,
        });
        let options = RestoreOptions {
            generation: prepared.state.devices.generation,
            paused: true,
            disk,
            same_vm: load.same_vm,
        };
        let vm = Vm::adopt(&dir.memory(), prepared.state, output.writer(), options)?;
        *lock(&self.output) = Some(output);
        {
            let mut s = lock(&self.survival);
            s.resumed_from_epoch = Some(prepared.epoch);
            s.undone_pages = Some(prepared.undone_pages);
        }
        *lock(&self.state_dir) = Some((dir, claim));
        *lock(&self.recovered) = Some(prepared.epoch);
        let vm = self.install(&mut slot, vm);
        drop(slot);
        // Protected again before the guest runs a single instruction. If that fails (the state
        // directory cannot be written), the VM goes on unprotected, as it would have in the
        // old process, and the directory says it cannot be recovered again.
        if let Err(e) = self.protect(protection.unwrap_or_else(default_protection)) {
            if let Some(dir) = self.state_dir() {
                dir.mark_lost(&format!(
                    "protection could not start again after recovery: {e}"
                ));
            }
            tracing::error!("the recovered VM runs unprotected: {e}");
        }
        if load.resume {
            vm.resume()?;
        }
        tracing::info!(
            epoch = prepared.epoch,
            undone_pages = prepared.undone_pages,
            "VM recovered"
        );
        Ok(prepared.epoch)
    }

    /// How the VM has survived so far.
    pub fn survival(&self) -> Survival {
        let mut s = lock(&self.survival).clone();
        s.state_dir = self.state_dir().map(|d| d.path().to_path_buf());
        s.placement = lock(&self.placement).clone();
        s.vcpu_cpus = self
            .vm()
            .and_then(|vm| vm.vcpu_cpus().ok())
            .unwrap_or_default();
        s
    }

    /// Records that this process took the VM over in a live update whose old process paused
    /// the guest at `paused_at_ns` (`CLOCK_MONOTONIC`); returns the downtime.
    pub fn note_update(&self, paused_at_ns: u64) -> Duration {
        let downtime = Duration::from_nanos(monotonic_ns().saturating_sub(paused_at_ns));
        lock(&self.survival).update_downtime_us = Some(downtime.as_secs_f64() * 1e6);
        tracing::info!(?downtime, "live update complete");
        downtime
    }

    /// Sets how a live update starts the new VMM program.
    pub fn set_updater(&self, f: Updater) {
        *lock(&self.updater) = Some(f);
    }

    /// Live update: pauses the VM, commits a last checkpoint to its state directory and hands
    /// the VM to a new VMM program (the updater); memory is not copied, the new process maps
    /// it again. Returns only if the hand-over failed, after resuming the VM here.
    pub fn live_update(&self, binary: Option<PathBuf>) -> Result<()> {
        let dir = self.state_dir().ok_or_else(|| {
            Error::State("live update needs the VM in a state directory (--state)".into())
        })?;
        let vm = self.started_vm()?;
        if vm.outcome().is_some() {
            return Err(Error::State("the VM has ended".into()));
        }
        let updater = lock(&self.updater);
        let updater = updater
            .as_ref()
            .ok_or_else(|| Error::State("this process cannot start a new VMM program".into()))?;
        let was_paused = vm.state() == VmState::Paused;
        let engine = lock(&self.engine);
        let (engine, protection) = engine
            .as_ref()
            .ok_or_else(|| Error::State("live update needs the VM protected".into()))?;
        vm.pause()?;
        let paused_at_ns = monotonic_ns();
        // The checkpoint the new process resumes from: everything up to here is committed and
        // its output released, and the paused guest makes no more.
        let report = match engine.checkpoint() {
            Ok(r) if r.acked => r,
            other => {
                if !was_paused {
                    let _ = vm.resume();
                }
                return Err(match other {
                    Err(e) => e.into(),
                    Ok(_) => Error::State("the last checkpoint was not committed".into()),
                });
            }
        };
        let handover = Handover {
            state_dir: dir.path().to_path_buf(),
            paused_at_ns,
            protection: protection.clone(),
            epoch: report.epoch,
            resume: !was_paused,
            disk: match &vm.descriptor().disk {
                Some(rebound_vmm::persist::DiskDescriptor::File { path, .. })
                    if !path.starts_with(dir.path()) =>
                {
                    Some(path.clone())
                }
                _ => None,
            },
            binary,
            placement: lock(&self.placement).clone(),
            share_claims: vm.hand_over_share_claims(),
        };
        tracing::info!(epoch = report.epoch, "live update: handing the VM over");
        let e = updater(&handover);
        vm.keep_share_claims();
        tracing::error!("live update failed, the VM resumes here: {e}");
        if !was_paused {
            vm.resume()?;
        }
        Err(Error::State(format!("cannot start the new VMM: {e}")))
    }

    /// Restores the VM from a snapshot chain (a full snapshot, then its diffs in order), every
    /// file validated first (see [`Load`]).
    pub fn restore(&self, chain: &[PathBuf], load: &Load) -> Result<Arc<Vm>> {
        let mut slot = lock(&self.vm);
        if slot.is_some() {
            return Err(Error::State(
                "a snapshot can only be loaded into an instance that has not started".into(),
            ));
        }
        let snaps = chain
            .iter()
            .map(|p| Snapshot::open(p, Verify::Full))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let options = RestoreOptions {
            generation: load.generation.unwrap_or_else(rebound_vmm::persist::new_id),
            paused: !load.resume,
            disk: load.disk.clone(),
            same_vm: false,
        };
        let output = OutputCommit::new(self.take_console()?);
        let vm = Vm::restore_with(&snaps, output.writer(), options)?;
        *lock(&self.output) = Some(output);
        Ok(self.install(&mut slot, vm))
    }

    /// The running VM, if started.
    pub fn vm(&self) -> Option<Arc<Vm>> {
        lock(&self.vm).clone()
    }

    /// Blocks until the instance is started (by the API), then returns its VM.
    pub fn wait_started(&self) -> Arc<Vm> {
        let mut slot = lock(&self.vm);
        loop {
            if let Some(vm) = slot.as_ref() {
                return vm.clone();
            }
            slot = self.started.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn started_vm(&self) -> Result<Arc<Vm>> {
        self.vm()
            .ok_or_else(|| Error::State("the instance is not started".into()))
    }

    /// Waits for the VM to end, then stops protection (held output is released: nothing can
    /// roll back any more).
    pub fn wait(&self) -> Result<VmOutcome> {
        let vm = self.started_vm()?;
        let outcome = vm.wait();
        let dir = self.state_dir();
        if let (Some(dir), Ok(output)) = (&dir, self.output()) {
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
        if let Some((engine, _)) = lock(&self.engine).take() {
            engine.stop();
        }
        if let Some(dir) = dir {
            dir.end(&format!("the VM ended: {outcome}"));
        }
        Ok(outcome)
    }

    /// Pauses the VM; returns how long the vCPUs took to stop.
    pub fn pause(&self) -> Result<Duration> {
        Ok(self.started_vm()?.pause()?)
    }

    /// Resumes the VM.
    pub fn resume(&self) -> Result<()> {
        Ok(self.started_vm()?.resume()?)
    }

    /// Writes a full or diff snapshot of the VM to `path`.
    pub fn snapshot(&self, path: &Path, kind: Kind) -> Result<SnapshotInfo> {
        Ok(self.started_vm()?.snapshot(path, kind)?)
    }

    /// Starts protecting the VM with the checkpoint engine.
    pub fn protect(&self, p: Protection) -> Result<()> {
        let vm = self.started_vm()?;
        let mut engine = lock(&self.engine);
        if engine.is_some() {
            return Err(Error::State(
                "the VM is already protected: DELETE /protection first".into(),
            ));
        }
        let config = EngineConfig {
            interval: p.interval_ms.map(Duration::from_millis),
            strategy: p.strategy,
        };
        config.validate()?;
        let (sinks, opts) = self.sinks(&p)?;
        *engine = Some((
            Engine::start_from(vm, self.output()?, config, sinks, opts)?,
            p,
        ));
        Ok(())
    }

    /// The sinks protection `p` commits to, and where its epochs start.
    fn sinks(&self, p: &Protection) -> Result<(Vec<Box<dyn Sink>>, StartOptions)> {
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        let mut opts = StartOptions {
            first_epoch: 1,
            state_dir: None,
        };
        if let Some(dir) = &p.snapshot_dir {
            sinks.push(Box::new(SnapshotDir::new(dir, p.max_chain)?));
            // Protection resumed over an existing directory continues its epoch numbers.
            opts.first_epoch = rebound_checkpoint::sink::newest_epoch(dir)? + 1;
        }
        if let Some(dir) = self.state_dir() {
            if p.strategy != StrategyKind::PreImage {
                return Err(Error::State(format!(
                    "a VM in a state directory is protected with the pre_image strategy (its memory stays in place and is undone from a journal), not {}",
                    p.strategy.name()
                )));
            }
            let newest = dir.records()?.last().map_or(0, |(e, _)| *e);
            // Only a VM recovered a moment ago (still paused) is what its newest record says;
            // otherwise the records are stale and go before protection starts afresh.
            if lock(&self.recovered).take() != Some(newest) {
                dir.purge_records();
            }
            opts.first_epoch = opts.first_epoch.max(newest + 1);
            opts.state_dir = Some(dir.clone());
            sinks.push(Box::new(Preserved::new(dir)));
        }
        Ok((sinks, opts))
    }

    /// Stops protecting the VM (held output is released).
    pub fn unprotect(&self) -> Result<()> {
        match lock(&self.engine).take() {
            Some((engine, _)) => {
                engine.stop();
                Ok(())
            }
            None => Err(Error::State("the VM is not protected".into())),
        }
    }

    /// The protection settings and counters, if protected.
    pub fn protection(&self) -> Option<(Protection, EngineStats)> {
        lock(&self.engine)
            .as_ref()
            .map(|(e, p)| (p.clone(), e.stats()))
    }

    fn with_engine<T>(
        &self,
        f: impl FnOnce(&Engine) -> rebound_checkpoint::engine::Result<T>,
    ) -> Result<T> {
        let g = lock(&self.engine);
        let (engine, _) = g
            .as_ref()
            .ok_or_else(|| Error::State("the VM is not protected: PUT /protection first".into()))?;
        Ok(f(engine)?)
    }

    /// Takes a checkpoint now.
    pub fn checkpoint(&self) -> Result<CheckpointReport> {
        self.with_engine(Engine::checkpoint)
    }

    /// Rolls the VM back to its last checkpoint; returns that checkpoint's epoch.
    pub fn rollback(&self) -> Result<u64> {
        let epoch = self.with_engine(Engine::rollback)?;
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

    /// Rolls the VM back, in place, to an earlier checkpoint `epoch` kept in the protection's
    /// snapshot directory. Held output is dropped; output released after that checkpoint was
    /// already seen and will be produced again. Protection restarts from the rolled-back state.
    pub fn rollback_to(&self, epoch: u64) -> Result<u64> {
        let vm = self.started_vm()?;
        let mut engine = lock(&self.engine);
        let (_, protection) = engine
            .as_ref()
            .ok_or_else(|| Error::State("the VM is not protected: PUT /protection first".into()))?;
        let dir = protection.snapshot_dir.clone().ok_or_else(|| {
            Error::State(
                "rollback to a named checkpoint needs protection with a snapshot_dir".into(),
            )
        })?;
        let protection = protection.clone();
        let chain = rebound_checkpoint::sink::chain_to_epoch(&dir, epoch)?;
        let snaps = chain
            .iter()
            .map(|p| Snapshot::open(p, Verify::Full))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // Everything that can be checked is, before protection or the VM is touched.
        rebound_vmm::persist::check_rewind(&vm, &snaps)?;
        if let Some((old, _)) = engine.take() {
            // Stops checkpoints (a checkpoint of the abandoned timeline must not run into the
            // freeze below) and drops held output; new output stays held.
            old.abandon();
        }
        let rewound = vm.freeze().map_err(Error::from).and_then(|frozen| {
            frozen.rewind(&snaps)?;
            // What the guest wrote between the abandon and the freeze is the abandoned timeline's.
            self.output()?.discard_held();
            Ok(frozen.thaw()?)
        });
        if let Err(e) = rewound {
            if let Ok(o) = self.output() {
                let _ = o.pass_through();
            }
            return Err(e);
        }
        if let Some(last) = chain.last() {
            rebound_checkpoint::sink::prune_after(&dir, last)?;
        }
        let config = EngineConfig {
            interval: protection.interval_ms.map(Duration::from_millis),
            strategy: protection.strategy,
        };
        let started = self.sinks(&protection).and_then(|(sinks, opts)| {
            Ok(Engine::start_from(vm, self.output()?, config, sinks, opts)?)
        });
        match started {
            Ok(e) => *engine = Some((e, protection)),
            Err(e) => {
                if let Ok(o) = self.output() {
                    let _ = o.pass_through();
                }
                return Err(e);
            }
        }
        self.after_rollback();
        tracing::info!(epoch, "VM rolled back to a named checkpoint");
        Ok(epoch)
    }

    /// Current state.
    pub fn state(&self) -> InstanceState {
        match self.vm() {
            None => InstanceState::NotStarted,
            Some(vm) => match vm.state() {
                VmState::Running => InstanceState::Running,
                VmState::Paused => InstanceState::Paused,
                VmState::Exited => {
                    InstanceState::Exited(vm.outcome().unwrap_or(VmOutcome::Stopped))
                }
            },
        }
    }

    /// Counters, once started.
    pub fn metrics(&self) -> Option<MetricsSnapshot> {
        self.vm().map(|vm| vm.metrics())
    }
}
