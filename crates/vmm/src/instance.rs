//! The instance controller: a VM configured piece by piece (Firecracker style: machine config,
//! boot source, drive), then started, paused, resumed and observed. The API server and the CLI
//! drive VMs only through this.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;

use crate::config::{DiskConfig, GuestImage, VmConfig};
use crate::metrics::MetricsSnapshot;
use crate::vm::{Vm, VmOutcome, VmState};
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
    console: Mutex<Option<Box<dyn Write + Send>>>,
    vm: Mutex<Option<Arc<Vm>>>,
    started: Condvar,
}

impl Instance {
    /// An unconfigured instance whose guest console will go to `console`.
    pub fn new(id: &str, console: Box<dyn Write + Send>) -> Self {
        Self {
            id: id.to_string(),
            pending: Mutex::new(Pending::default()),
            console: Mutex::new(Some(console)),
            vm: Mutex::new(None),
            started: Condvar::new(),
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
        probe.validate()?;
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
            return Err(crate::ConfigError::BootArgs {
                len: boot_args.len(),
                max: rebound_abi::BOOT_ARGS_MAX,
            }
            .into());
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

    /// Builds and starts the VM.
    pub fn start(&self) -> Result<Arc<Vm>> {
        let mut vm_slot = lock(&self.vm);
        if vm_slot.is_some() {
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
        let console = lock(&self.console)
            .take()
            .ok_or_else(|| Error::State("the instance was already started once".into()))?;
        let vm = Arc::new(Vm::launch(&config, console)?);
        *vm_slot = Some(vm.clone());
        self.started.notify_all();
        Ok(vm)
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

    fn started(&self) -> Result<Arc<Vm>> {
        self.vm()
            .ok_or_else(|| Error::State("the instance is not started".into()))
    }

    /// Pauses the VM; returns how long the vCPUs took to stop.
    pub fn pause(&self) -> Result<Duration> {
        self.started()?.pause()
    }

    /// Resumes the VM.
    pub fn resume(&self) -> Result<()> {
        self.started()?.resume()
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
