//! A running VM: built from a validated config, driven by pause / resume / stop, observed
//! through its state, outcome and metrics.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use rebound_abi::port;
use rebound_arch::Layout;
use rebound_arch::layout::USER_START;
use rebound_devices::console::Console;
use rebound_devices::disk::Disk;
use rebound_devices::ioq::IoQueue;
use serde::Serialize;

use crate::config::{DiskConfig, VmConfig};
use crate::fault::FaultReport;
use crate::memory::{self, GuestMemory};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::wait::{Request, RunControl, Waiters};
use crate::{Error, Result, boot, kick, vcpu};

/// How long a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a VM ended.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VmOutcome {
    /// The guest called `EXIT`.
    Exited {
        /// Its status (0..=255).
        status: i32,
    },
    /// The guest panicked.
    Panicked {
        /// The vCPU that panicked.
        vcpu: u32,
        /// The panic message.
        message: String,
    },
    /// The guest faulted.
    Faulted(FaultReport),
    /// The VMM stopped it.
    Stopped,
    /// The VMM failed.
    Failed {
        /// What failed.
        error: String,
    },
}

impl VmOutcome {
    /// A process exit code for the outcome: the guest's status, 101 for a guest panic (as Rust
    /// programs), 139 for a guest fault (as a segfault), 0 when stopped, 1 on VMM failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmOutcome::Exited { status } => *status,
            VmOutcome::Panicked { .. } => 101,
            VmOutcome::Faulted(_) => 139,
            VmOutcome::Stopped => 0,
            VmOutcome::Failed { .. } => 1,
        }
    }
}

impl std::fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmOutcome::Exited { status } => write!(f, "guest exited with status {status}"),
            VmOutcome::Panicked { vcpu, message } => {
                write!(f, "guest panicked on vCPU {vcpu}: {message}")
            }
            VmOutcome::Faulted(r) => write!(f, "guest fault: {r}"),
            VmOutcome::Stopped => write!(f, "VM stopped"),
            VmOutcome::Failed { error } => write!(f, "VMM failure: {error}"),
        }
    }
}

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// vCPUs run the guest.
    Running,
    /// vCPUs are parked and the devices idle.
    Paused,
    /// The VM ended (see [`Vm::outcome`]).
    Exited,
}

/// What the vCPU threads, devices and controller of one VM share.
pub(crate) struct VmShared {
    pub(crate) mem: GuestMemory,
    pub(crate) layout: Layout,
    pub(crate) console: Console,
    pub(crate) ioq: Arc<IoQueue<GuestMemory>>,
    pub(crate) metrics: Metrics,
    pub(crate) control: RunControl,
    pub(crate) waiters: Arc<Waiters>,
    pub(crate) launched: Instant,
    outcome: Mutex<Option<VmOutcome>>,
    vcpu_threads: Mutex<Vec<JoinHandle<()>>>,
}

impl VmShared {
    /// Guest monotonic clock: nanoseconds since launch.
    pub(crate) fn clock_ns(&self) -> u64 {
        self.launched.elapsed().as_nanos() as u64
    }

    /// Records how the VM ended (the first reason wins) and stops everything.
    pub(crate) fn finish(&self, outcome: VmOutcome) {
        {
            let mut o = lock(&self.outcome);
            if o.is_none() {
                tracing::info!(%outcome, "VM finished");
                *o = Some(outcome);
            }
        }
        self.control.set(Request::Stop);
        self.waiters.interrupt_all();
        for t in lock(&self.vcpu_threads).iter() {
            kick::kick(t);
        }
        self.ioq.stop();
    }

    fn kick_all(&self) {
        self.waiters.interrupt_all();
        for t in lock(&self.vcpu_threads).iter() {
            kick::kick(t);
        }
    }
}

/// A VM with its vCPU threads and I/O thread running.
pub struct Vm {
    // Fields drop in order: the VM fd goes before the guest memory mapping it points into.
    _vm_fd: VmFd,
    shared: Arc<VmShared>,
    io_thread: Mutex<Option<JoinHandle<()>>>,
    pause_lock: Mutex<()>,
    /// The memfd behind guest memory, kept for the VM's life.
    _mem_file: File,
}

/// The KVM system handle and the CPUID it supports, opened once per process: the CPUID query
/// is the most expensive call of VM creation and its answer never changes.
fn kvm() -> Result<&'static (Kvm, CpuId)> {
    static KVM: OnceLock<(Kvm, CpuId)> = OnceLock::new();
    if let Some(k) = KVM.get() {
        return Ok(k);
    }
    let kvm = Kvm::new().map_err(Error::KvmUnavailable)?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(KVM.get_or_init(|| (kvm, cpuid)))
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

fn spawn<F: FnOnce() + Send + 'static>(name: String, f: F) -> Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(|source| Error::Thread { name, source })
}

impl Vm {
    /// Builds the VM described by `config` and starts it; guest console output goes to `console`.
    pub fn launch(config: &VmConfig, console: Box<dyn Write + Send>) -> Result<Vm> {
        let launched = Instant::now();
        let layout = config.validate()?;
        kick::install().map_err(Error::State)?;
        let (kvm, cpuid) = kvm()?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let (mem, mem_file) = memory::create(layout.mem_size())?;
        memory::register(&vm_fd, &mem)?;

        let disk = match &config.disk {
            None => None,
            Some(DiskConfig::File { path, read_only }) => Some(Disk::open(path, *read_only)?),
            Some(DiskConfig::Scratch { size_mib }) => Some(Disk::scratch(size_mib << 20)?),
        };
        let disk_size = disk.as_ref().map_or(0, Disk::size);
        let entry = boot::load(
            &mem,
            &layout,
            &config.image.name,
            &config.image.bytes,
            &config.boot_args,
            disk_size,
        )?;

        let waiters = Arc::new(Waiters::new(layout.vcpus()));
        let ioq = Arc::new(IoQueue::new(
            mem.clone(),
            USER_START..layout.mem_size(),
            layout.vcpus(),
            disk,
            waiters.clone(),
        )?);
        vm_fd
            .register_ioevent(
                ioq.doorbell(),
                &IoEventAddress::Pio(u64::from(port::DOORBELL)),
                NoDatamatch,
            )
            .map_err(kvm_err("KVM_IOEVENTFD"))?;

        let mut vcpus: Vec<VcpuFd> = Vec::new();
        for id in 0..layout.vcpus() {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            rebound_arch::regs::configure_sregs(&mut sregs, &layout, id);
            fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            fd.set_regs(&rebound_arch::regs::initial_regs(&layout, id, entry))
                .map_err(kvm_err("KVM_SET_REGS"))?;
            fd.set_fpu(&rebound_arch::regs::initial_fpu())
                .map_err(kvm_err("KVM_SET_FPU"))?;
            vcpus.push(fd);
        }

        let shared = Arc::new(VmShared {
            mem,
            layout,
            console: Console::new(console),
            ioq,
            metrics: Metrics::default(),
            control: RunControl::new(layout.vcpus()),
            waiters,
            launched,
            outcome: Mutex::new(None),
            vcpu_threads: Mutex::new(Vec::new()),
        });
        let vm = Vm {
            shared: shared.clone(),
            io_thread: Mutex::new(None),
            pause_lock: Mutex::new(()),
            _vm_fd: vm_fd,
            _mem_file: mem_file,
        };

        let io = shared.clone();
        *lock(&vm.io_thread) = Some(spawn("rebound-io".into(), move || {
            if let Err(e) = io.ioq.run() {
                io.finish(VmOutcome::Failed {
                    error: e.to_string(),
                });
            }
        })?);
        for (id, fd) in vcpus.into_iter().enumerate() {
            let s = shared.clone();
            match spawn(format!("rebound-vcpu{id}"), move || {
                vcpu::run(fd, id as u32, s)
            }) {
                Ok(t) => lock(&shared.vcpu_threads).push(t),
                Err(e) => {
                    // The threads already started must not run on alone.
                    shared.finish(VmOutcome::Failed {
                        error: e.to_string(),
                    });
                    for _ in id..shared.layout.vcpus() as usize {
                        shared.control.exited();
                    }
                    vm.wait();
                    return Err(e);
                }
            }
        }
        tracing::info!(
            vcpus = layout.vcpus(),
            mem_mib = layout.mem_size() >> 20,
            image = %config.image.name,
            "VM started"
        );
        Ok(vm)
    }

    /// Where the VM is in its life.
    pub fn state(&self) -> VmState {
        if lock(&self.shared.outcome).is_some() || self.shared.control.all_exited() {
            return VmState::Exited;
        }
        match self.shared.control.current() {
            Request::Run => VmState::Running,
            Request::Pause => VmState::Paused,
            Request::Stop => VmState::Exited,
        }
    }

    /// Stops every vCPU outside the guest and idles the devices; returns how long it took.
    pub fn pause(&self) -> Result<Duration> {
        let _g = lock(&self.pause_lock);
        match self.state() {
            VmState::Running => {}
            VmState::Paused => return Ok(Duration::ZERO),
            VmState::Exited => {
                return Err(Error::State(
                    "the VM has exited; it cannot be paused".into(),
                ));
            }
        }
        let t0 = Instant::now();
        self.shared.control.set(Request::Pause);
        self.shared.kick_all();
        if !self.shared.control.wait_quiet(PAUSE_TIMEOUT) {
            self.shared.control.set(Request::Run);
            return Err(Error::PauseTimeout(PAUSE_TIMEOUT));
        }
        self.shared.ioq.pause();
        let took = t0.elapsed();
        self.shared.metrics.pause(took.as_nanos() as u64);
        tracing::debug!(?took, "VM paused");
        Ok(took)
    }

    /// Lets a paused VM run again.
    pub fn resume(&self) -> Result<()> {
        let _g = lock(&self.pause_lock);
        match self.state() {
            VmState::Paused => {
                self.shared.ioq.resume();
                self.shared.control.set(Request::Run);
                Ok(())
            }
            VmState::Running => Ok(()),
            VmState::Exited => Err(Error::State(
                "the VM has exited; it cannot be resumed".into(),
            )),
        }
    }

    /// Stops the VM (outcome `Stopped` unless it already ended).
    pub fn stop(&self) {
        self.shared.finish(VmOutcome::Stopped);
    }

    /// Waits for the VM to end and returns how it ended.
    pub fn wait(&self) -> VmOutcome {
        self.shared.control.wait_exited();
        for t in std::mem::take(&mut *lock(&self.shared.vcpu_threads)) {
            let _ = t.join();
        }
        self.shared.ioq.stop();
        if let Some(t) = lock(&self.io_thread).take() {
            let _ = t.join();
        }
        lock(&self.shared.outcome)
            .clone()
            .unwrap_or(VmOutcome::Stopped)
    }

    /// How the VM ended, if it has.
    pub fn outcome(&self) -> Option<VmOutcome> {
        lock(&self.shared.outcome).clone()
    }

    /// Current counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let s = &self.shared;
        s.metrics.snapshot(
            s.console.bytes(),
            s.ioq.stats().snapshot(),
            s.launched.elapsed().as_millis() as u64,
        )
    }

    /// Nanoseconds from the start of `launch` to the guest's first exit (0: none yet).
    pub fn launch_to_first_exit_ns(&self) -> u64 {
        self.shared.metrics.first_exit_ns()
    }

    /// Guest memory (for inspection by tests and tools).
    pub fn memory(&self) -> &GuestMemory {
        &self.shared.mem
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if lock(&self.shared.outcome).is_none() {
            self.stop();
        }
        self.wait();
    }
}
