//! One VM's controller.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rebound_checkpoint::engine::CheckpointReport;
use rebound_checkpoint::sink::{Sink, SnapshotDir};
use rebound_checkpoint::{Engine, EngineConfig, EngineStats, OutputCommit, StrategyKind};
use rebound_snapshot::format::Verify;
use rebound_snapshot::{Kind, Snapshot};
use rebound_vmm::metrics::MetricsSnapshot;
use rebound_vmm::persist::SnapshotInfo;
use rebound_vmm::vm::RestoreOptions;
use rebound_vmm::{ConfigError, DiskConfig, GuestImage, Vm, VmConfig, VmOutcome, VmState};
use serde::Serialize;

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
}

/// One VM's controller.
pub struct Instance {
    id: String,
    pending: Mutex<Pending>,
    output: Arc<OutputCommit>,
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
            output: OutputCommit::new(console),
            vm: Mutex::new(None),
            started: Condvar::new(),
            engine: Mutex::new(None),
        }
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

    /// Sets the disk.
    pub fn set_disk(&self, disk: Option<DiskConfig>) -> Result<()> {
        self.before_start("the drive")?;
        lock(&self.pending).disk = disk;
        Ok(())
    }

    fn install(&self, slot: &mut Option<Arc<Vm>>, vm: Vm) -> Arc<Vm> {
        let vm = Arc::new(vm);
        *slot = Some(vm.clone());
        self.started.notify_all();
        vm
    }

    /// Builds and starts the VM.
    pub fn start(&self) -> Result<Arc<Vm>> {
        let mut slot = lock(&self.vm);
        if slot.is_some() {
            return Err(Error::State("the instance is already started".into()));
        }
        let config = {
            let p = lock(&self.pending);
            let image = p
                .image
                .clone()
                .ok_or_else(|| Error::State("no boot source: PUT /boot-source first".into()))?;
            VmConfig {
                vcpu_count: p.machine.vcpu_count,
                mem_size_mib: p.machine.mem_size_mib,
                image,
                boot_args: p.boot_args.clone(),
                disk: p.disk.clone(),
            }
        };
        let vm = Vm::launch(&config, self.output.writer())?;
        Ok(self.install(&mut slot, vm))
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
        };
        let vm = Vm::restore_with(&snaps, self.output.writer(), options)?;
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
        if let Some((engine, _)) = lock(&self.engine).take() {
            engine.stop();
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
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        let mut first = 1;
        if let Some(dir) = &p.snapshot_dir {
            sinks.push(Box::new(SnapshotDir::new(dir, p.max_chain)?));
            // Protection resumed over an existing directory continues its epoch numbers.
            first = rebound_checkpoint::sink::newest_epoch(dir)? + 1;
        }
        *engine = Some((
            Engine::start_from(vm, self.output.clone(), config, sinks, first)?,
            p,
        ));
        Ok(())
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
        self.with_engine(Engine::rollback)
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
            self.output.discard_held();
            Ok(frozen.thaw()?)
        });
        if let Err(e) = rewound {
            let _ = self.output.pass_through();
            return Err(e);
        }
        if let Some(last) = chain.last() {
            rebound_checkpoint::sink::prune_after(&dir, last)?;
        }
        let config = EngineConfig {
            interval: protection.interval_ms.map(Duration::from_millis),
            strategy: protection.strategy,
        };
        let sinks: Vec<Box<dyn Sink>> =
            vec![Box::new(SnapshotDir::new(&dir, protection.max_chain)?)];
        let first = rebound_checkpoint::sink::newest_epoch(&dir)? + 1;
        let started = Engine::start_from(vm, self.output.clone(), config, sinks, first);
        match started {
            Ok(e) => *engine = Some((e, protection)),
            Err(e) => {
                let _ = self.output.pass_through();
                return Err(e.into());
            }
        }
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
