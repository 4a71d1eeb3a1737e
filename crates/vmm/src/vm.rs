//! A running VM: built from a validated config, driven by pause / resume / stop, observed
//! through its state, outcome and metrics.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use rebound_abi::port;
use rebound_arch::Layout;
use rebound_arch::layout::USER_START;
use rebound_block::Disk;
use rebound_devices::Notify;
use rebound_devices::console::Console;
use rebound_devices::held_disk::HeldDisk;
use rebound_devices::ioq::IoQueue;
use rebound_devices::net::{NetState, NicSpec, Nics};
use rebound_snapshot::state::VcpuState;
use rebound_snapshot::{DirtySet, PAGE_SIZE, Snapshottable};
use serde::Serialize;

use crate::config::{DiskConfig, VmConfig};
use crate::fault::FaultReport;
use crate::memory::{self, GuestMemory};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::persist::{DiskDescriptor, SavedState, VmDescriptor};
use crate::share::{
    AttachmentInfo, CacheConfig, Rejoin, ShareConfig, ShareCounters, ShareDir, ShareRecord, Shares,
};
use crate::wait::{Request, RunControl, Waiters};
use crate::{Error, Result, boot, kick, vcpu, vstate};

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
    /// Stopped because host resources it ran on failed (recovery attribute `stop`).
    HostFault {
        /// What failed, and where the VM's state was saved.
        reason: String,
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
            // EX_TEMPFAIL: the VM can be started again from its saved state.
            VmOutcome::HostFault { .. } => 75,
        }
    }
}

impl std::fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmOutcome::Exited { status } => write!(f, "guest exited with status {status}"),
            // The message on lines of its own: it is the guest's, often several lines long.
            VmOutcome::Panicked { vcpu, message } => {
                write!(f, "guest panicked on vCPU {vcpu}:\n{}", message.trim_end())
            }
            VmOutcome::Faulted(r) => write!(f, "guest fault: {r}"),
            VmOutcome::Stopped => write!(f, "VM stopped"),
            VmOutcome::Failed { error } => write!(f, "VMM failure: {error}"),
            VmOutcome::HostFault { reason } => write!(f, "VM stopped by a host fault: {reason}"),
        }
    }
}

/// A snapshot taken at a clone point ([`Vm::snapshot_at_clone_point`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClonePointInfo {
    /// The snapshot's id.
    pub id: u64,
    /// Pages stored.
    pub pages: u64,
    /// Bytes written.
    pub bytes: u64,
    /// From the request to the guest reaching its clone point, in microseconds.
    pub reached_us: u64,
    /// How long the VM was paused, in microseconds.
    pub pause_us: u64,
    /// From the request to the snapshot written and the VM running again, in microseconds.
    pub total_us: u64,
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
    pub(crate) control: Arc<RunControl>,
    pub(crate) waiters: Arc<Waiters>,
    pub(crate) launched: Instant,
    /// The guest's monotonic clock (it continues across restores).
    pub(crate) clock: crate::clock::GuestClock,
    /// What `GENERATION` returns: 0 at first boot, a new value after each restore or clone.
    pub(crate) generation: AtomicU64,
    pub(crate) vcpu_slots: Vec<VcpuSlot>,
    outcome: Mutex<Option<VmOutcome>>,
    pub(crate) vcpu_threads: Mutex<Vec<JoinHandle<()>>>,
    /// Shared regions attached.
    pub(crate) shares: Arc<Shares>,
    /// Network interfaces, if any.
    pub(crate) nics: Option<Arc<Nics<GuestMemory>>>,
    /// The disk, whose writes output commit holds while the VM is protected.
    pub(crate) disk: Option<Arc<HeldDisk>>,
    /// Names for guest code addresses in fault reports.
    pub(crate) symbols: Option<Arc<crate::symbols::Symbols>>,
    /// The VM's userfaultfd and swap file.
    pub(crate) swap: Arc<crate::swap::Swap>,
    /// The guest's memory class table and requests.
    pub(crate) classes: crate::reclaim::Classes,
    /// Guest memory is a copy-on-write mapping of a snapshot (no pages to free in a file).
    pub(crate) private_memory: bool,
    /// Pages may not be given back now (a checkpoint strategy that remaps guest memory).
    pub(crate) returns_held: std::sync::atomic::AtomicBool,
    /// The clone point (ABI 1.9).
    pub(crate) clone_gate: crate::clone_point::Gate,
    /// Serializes the host's changes to the boot info's request bits.
    requests: Mutex<()>,
    /// Trapping operations: emulated devices and instructions, and their promotion.
    pub(crate) emulator: crate::emulate::Emulator,
    /// Programs and their protection tables (ABI 1.10).
    pub(crate) programs: crate::program::Programs,
    /// The guest's nested VMs (ABI 1.10).
    pub(crate) nested: crate::nested::Nested,
    /// The ELF image the VM booted from, for `NESTED_CREATE` with `CREATE_SELF_IMAGE` (none for
    /// a restored or adopted VM).
    pub(crate) image: Option<Arc<[u8]>>,
}

impl VmShared {
    /// Parks the devices (nothing but the controller touches guest memory after this).
    pub(crate) fn pause_devices(&self) {
        self.ioq.pause();
        if let Some(n) = &self.nics {
            n.pause();
        }
    }

    /// Lets the devices run again.
    pub(crate) fn resume_devices(&self) {
        if let Some(n) = &self.nics {
            n.resume();
        }
        self.ioq.resume();
    }

    /// Stops the device threads.
    pub(crate) fn stop_devices(&self) {
        self.ioq.stop();
        if let Some(n) = &self.nics {
            n.stop();
        }
    }
}

/// What a vCPU thread exchanges with the controller while parked: it publishes its captured
/// state on parking and applies a state to restore before running again.
#[derive(Default)]
pub(crate) struct VcpuSlot {
    pub(crate) captured: Mutex<Option<std::result::Result<VcpuState, String>>>,
    pub(crate) restore: Mutex<Option<VcpuState>>,
}

impl VcpuSlot {
    /// What the vCPU published when it last parked.
    pub(crate) fn captured(&self) -> Option<std::result::Result<VcpuState, String>> {
        lock(&self.captured).clone()
    }

    /// Has the vCPU apply `s` before it runs again.
    pub(crate) fn set_restore(&self, s: VcpuState) {
        *lock(&self.restore) = Some(s.clone());
        // The state is the vCPU's from now on. A freeze that comes before the vCPU thread has
        // woken and applied it must see it, not the registers it had before the rollback.
        *lock(&self.captured) = Some(Ok(s));
    }
}

impl VmShared {
    /// Sets and clears bits of the boot info's request word (the guest only reads it).
    pub(crate) fn update_requests(&self, set: u64, clear: u64) -> Result<()> {
        use vm_memory::Bytes;
        let _turn = lock(&self.requests);
        let at = vm_memory::GuestAddress(
            rebound_abi::BOOT_INFO_ADDR + rebound_abi::BOOT_INFO_REQUESTS_OFFSET,
        );
        let err = |e: vm_memory::GuestMemoryError| Error::Memory(e.to_string());
        let now: u64 = self.mem.read_obj(at).map_err(err)?;
        self.mem.write_obj((now | set) & !clear, at).map_err(err)
    }

    /// Guest monotonic clock: nanoseconds since the VM first launched.
    pub(crate) fn clock_ns(&self) -> u64 {
        self.clock.now_ns()
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
        self.kick_all();
        self.stop_devices();
    }

    /// Started nested vCPUs run on threads of their own, which a vCPU that stayed parked
    /// across a short resume never waited for: hold them all, then take what they wrote.
    fn quiesce_nested(&self) -> bool {
        if !self.nested.quiesce(PAUSE_TIMEOUT) {
            return false;
        }
        self.nested.harvest_dirty(self);
        true
    }

    fn kick_all(&self) {
        self.waiters.interrupt_all();
        for t in lock(&self.vcpu_threads).iter() {
            kick::kick(t);
        }
        // Started nested vCPUs run guest code on threads of their own.
        self.nested.kick_workers();
    }
}

/// A VM with its vCPU threads and I/O thread running.
pub struct Vm {
    // Fields drop in order: the VM fd goes before the guest memory mapping it points into.
    vm_fd: Arc<VmFd>,
    shared: Arc<VmShared>,
    io_thread: Mutex<Option<JoinHandle<()>>>,
    net_thread: Mutex<Option<JoinHandle<()>>>,
    /// Who holds the vCPUs stopped: the owner (`pause`) and a freeze. They run only when neither.
    holds: Mutex<Holds>,
    /// Held by a [`Frozen`] for its whole life: freezes (checkpoints, snapshots, rollbacks) take
    /// turns, so none sees the VM resumed under it.
    freeze_lock: Mutex<()>,
    descriptor: VmDescriptor,
    dirty: Mutex<DirtyTracking>,
    last_snapshot: Mutex<Option<u64>>,
    /// The last snapshot saved the disk's contents (the next one's can be a diff).
    last_disk_image: std::sync::atomic::AtomicBool,
    /// The file behind guest memory (a memfd, or the snapshot a restored VM maps), kept for the
    /// VM's life.
    backing: memory::Backing,
    /// Every stateful component, saved by a freeze and restored in place by a rollback.
    components: rebound_snapshot::component::Registry,
}

/// Dirty-page tracking: KVM's log plus the VMM's own writes, accumulated per consumer (the
/// snapshot API, the checkpoint engine) so one harvesting does not hide pages from another.
#[derive(Default)]
struct DirtyTracking {
    enabled: bool,
    consumers: HashMap<String, DirtySet>,
    /// KVM leaves write-protecting logged pages to us (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
    manual: bool,
    /// With `manual`: which logged pages stay writable (reported again at each harvest).
    hot: Option<rebound_snapshot::HotPages>,
}

/// Why the vCPUs are stopped.
#[derive(Default)]
struct Holds {
    /// The owner paused the VM.
    user: bool,
    /// A [`Frozen`] exists.
    frozen: bool,
}

/// How a VM's vCPUs start.
enum Start {
    /// At the image's entry point.
    Boot { entry: u64 },
    /// In saved states (a restore).
    Restore { vcpus: Vec<VcpuState> },
}

/// Everything `Vm::build` needs besides KVM.
struct Parts {
    layout: Layout,
    mem: GuestMemory,
    mem_file: memory::Backing,
    disk: Option<Disk>,
    descriptor: VmDescriptor,
    start: Start,
    clock_base_ns: u64,
    generation: u64,
    ioq_state: Option<rebound_devices::ioq::IoqState>,
    /// Start with the vCPUs parked (resume to run).
    paused: bool,
    /// Shared regions to attach before the guest runs.
    shared: Vec<ShareRecord>,
    /// Keep the VM's id and what it holds in shared regions (a live update: the same VM goes
    /// on); otherwise a new id, and what the old one held is released.
    same_vm: bool,
    /// Network interfaces, with their backends.
    nics: Vec<NicSpec>,
    /// Their saved state, for a restore.
    net_state: Option<NetState>,
    /// The received-frame journal (see [`RestoreOptions::net_journal`]).
    net_journal: Option<(std::path::PathBuf, Option<u64>)>,
    /// The held disk writes' journal (see [`RestoreOptions::disk_journal`]).
    disk_journal: Option<(std::path::PathBuf, Option<u64>)>,
    /// Names for the image's code addresses (a booted image; a restored VM has no image).
    symbols: Option<Arc<crate::symbols::Symbols>>,
    image: Option<Arc<[u8]>>,
    /// The class table registration to restore.
    memory_table: Option<crate::reclaim::TableState>,
    programs: Option<crate::program::ProgramsState>,
    replaced: Option<crate::emulate::replace::ReplaceState>,
    /// Where the swap file lives (and, for a preserved region, its link).
    swap_link: Option<std::path::PathBuf>,
    /// The VM is taken over: a swap file named by the link holds its pages out of RAM.
    swap_take_over: bool,
}

/// What [`Vm::progress`] sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The sum of the vCPUs' heartbeat words: it changes while the guest makes progress.
    pub beat: u64,
    /// Every vCPU waits in `BLOCK`.
    pub waiting: bool,
}

/// How to restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// What `GENERATION` returns from now on.
    pub generation: u64,
    /// Start paused.
    pub paused: bool,
    /// The disk to attach, if the snapshot had a file-backed one (required then: the snapshot
    /// is not trusted to choose a host file).
    pub disk: Option<std::path::PathBuf>,
    /// The same VM goes on (live update): it keeps its id and what it holds in shared regions.
    pub same_vm: bool,
    /// The host side of each network interface the VM was saved with, in order.
    pub nic_backends: Vec<crate::config::BackendSlot>,
    /// Where received frames are recorded while protected, and, for a VM recovered to
    /// checkpoint c, `Some(c)`: frames its predecessor recorded after c are delivered again.
    pub net_journal: Option<(std::path::PathBuf, Option<u64>)>,
    /// Where disk writes held for their checkpoint are journaled while protected, and, for a
    /// VM recovered to checkpoint c, `Some(c)`: the journaled writes of checkpoints up to c are
    /// applied to the disk before the guest runs, later ones dropped.
    pub disk_journal: Option<(std::path::PathBuf, Option<u64>)>,
    /// A mirror to attach to the disk (resynced from it before it serves reads).
    pub disk_mirror: Option<std::path::PathBuf>,
}

/// The link naming the swap file of a VM whose memory is the file at `memory` (a preserved
/// region), beside it.
fn swap_link(memory: &std::path::Path) -> std::path::PathBuf {
    memory.with_extension("swap")
}

/// The NICs (MAC, MTU, host side) a saved network state describes.
fn saved_nics(state: Option<&NetState>) -> Vec<([u8; 6], u16, String)> {
    state.map_or_else(Vec::new, |s| {
        s.nics
            .iter()
            .map(|n| (n.mac, n.mtu, n.host.clone()))
            .collect()
    })
}

/// The backends in `slots` as NIC specs for `nics` (MAC, MTU, host side), each taken once.
fn nic_specs(
    nics: &[([u8; 6], u16, String)],
    slots: &[crate::config::BackendSlot],
) -> Result<Vec<NicSpec>> {
    if nics.len() != slots.len() {
        return Err(Error::Restore(format!(
            "the VM has {} network interfaces; {} backends were given",
            nics.len(),
            slots.len()
        )));
    }
    nics.iter()
        .zip(slots)
        .enumerate()
        .map(|(i, ((mac, mtu, host), slot))| {
            let backend = slot.take().ok_or_else(|| {
                Error::State(format!(
                    "network interface {i}: its backend is already used by another VM"
                ))
            })?;
            Ok(NicSpec {
                mac: *mac,
                mtu: *mtu,
                backend,
                host: host.clone(),
            })
        })
        .collect()
}

/// The layout of a VM saved as `vm`: with the table pool if it was booted with ABI 1.10 or later.
fn restored_layout(vm: &VmDescriptor) -> Result<Layout> {
    let layout = Layout::new(vm.mem_size, vm.vcpus).map_err(|e| Error::Restore(e.to_string()))?;
    Ok(if vm.abi_version >= POOL_ABI {
        layout.with_pool()
    } else {
        layout
    })
}

/// The ABI version that brought the table pool.
const POOL_ABI: u32 = (1 << 16) | 10;

/// Opens KVM and asks for its CPUID now, so that the first VM this process builds does not
/// wait for it (a VMM started ahead to restore a clone into: about 1 ms on these hosts).
pub fn warm_up() -> Result<()> {
    kick::install().map_err(Error::State)?;
    kvm().map(|_| ())
}

/// The KVM system handle and the CPUID it supports, opened once per process: the CPUID query
/// is the most expensive call of VM creation and its answer never changes.
pub(crate) fn kvm() -> Result<&'static (Kvm, CpuId)> {
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

/// The disk a saved VM had, for a restored or adopted one: a file-backed disk only at a path
/// the caller names (saved state is input and must not get to open host files), with the size
/// it had; a scratch disk comes back empty.
fn reopen_disk(
    saved: Option<&DiskDescriptor>,
    chosen: Option<std::path::PathBuf>,
) -> Result<Option<Disk>> {
    match saved {
        None => Ok(None),
        Some(DiskDescriptor::File {
            path,
            read_only,
            size,
        }) => {
            let chosen = chosen.ok_or_else(|| {
                Error::Restore(format!(
                    "the VM was saved with disk {}: name the disk to attach explicitly \
                     (--disk, or disk_path in PUT /snapshot/load)",
                    path.display()
                ))
            })?;
            let d = Disk::open(&chosen, *read_only)?;
            if d.size() != *size {
                return Err(Error::Restore(format!(
                    "disk {} is {} bytes; the VM was saved with {} bytes",
                    chosen.display(),
                    d.size(),
                    size
                )));
            }
            Ok(Some(d))
        }
        Some(DiskDescriptor::Scratch { size }) => match chosen {
            Some(chosen) => {
                let d = Disk::open(&chosen, false)?;
                if d.size() != *size {
                    return Err(Error::Restore(format!(
                        "disk {} is {} bytes; the VM was saved with {size} bytes",
                        chosen.display(),
                        d.size(),
                    )));
                }
                Ok(Some(d))
            }
            None => {
                tracing::warn!(
                    "the snapshot did not save the scratch disk: the restored VM gets an empty one"
                );
                Ok(Some(Disk::scratch(*size)?))
            }
        },
    }
}

/// Copies the disk to its syncing leg on a thread of its own, one chunk per step, until done
/// (or the disk is gone with its VM).
fn start_resync(disk: &Arc<HeldDisk>) -> Result<()> {
    let weak = Arc::downgrade(disk);
    spawn("disk-resync".into(), move || {
        let t0 = Instant::now();
        loop {
            let Some(disk) = weak.upgrade() else { return };
            match disk.disk().resync_step() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::error!("disk resync stopped: {e}");
                    return;
                }
            }
        }
        tracing::info!(ms = t0.elapsed().as_millis() as u64, "disk resync done");
    })
    .map(|_| ())
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
        Self::launch_with(config, console, None, false)
    }

    /// [`launch`](Self::launch) with guest memory in a new file at `memory_path` if given (a
    /// preserved region a later process can take over with [`adopt`](Self::adopt)), and
    /// with the vCPUs parked before the first guest instruction if `paused` (the owner's pause:
    /// [`resume`](Self::resume) runs it), so that e.g. protection starts before the guest runs.
    pub fn launch_with(
        config: &VmConfig,
        console: Box<dyn Write + Send>,
        memory_path: Option<&std::path::Path>,
        paused: bool,
    ) -> Result<Vm> {
        let launched = Instant::now();
        let layout = config.validate()?;
        let (mem, mem_file) = match memory_path {
            None => memory::create(layout.mem_size())?,
            Some(p) => memory::create_file(p, layout.mem_size())?,
        };
        let (disk, disk_desc) = match &config.disk {
            None => (None, None),
            Some(DiskConfig::File {
                path,
                read_only,
                mirror,
            }) => {
                let mut d = Disk::open(path, *read_only)?;
                if let Some(m) = mirror {
                    d = d.with_mirror(m)?;
                }
                let desc = DiskDescriptor::File {
                    path: path.clone(),
                    read_only: *read_only,
                    size: d.size(),
                };
                (Some(d), Some(desc))
            }
            Some(DiskConfig::Scratch { size_mib }) => (
                Some(Disk::scratch(size_mib << 20)?),
                Some(DiskDescriptor::Scratch {
                    size: size_mib << 20,
                }),
            ),
        };
        let disk_size = disk.as_ref().map_or(0, Disk::size);
        let nic_ids: Vec<([u8; 6], u16)> = config.nics.iter().map(|n| (n.mac, n.mtu)).collect();
        let entry = boot::load(
            &mem,
            &layout,
            &config.image.name,
            &config.image.bytes,
            &config.boot_args,
            disk_size,
            &nic_ids,
        )?;
        // The image's `cpuid`s are armed before it first runs (emulate::replace).
        let symbols = crate::symbols::Symbols::parse(&config.image.bytes).map(Arc::new);
        let replaced = crate::emulate::replace::ReplaceState {
            armed: symbols.as_ref().map_or_else(Vec::new, |s| {
                crate::emulate::replace::arm(
                    &mem,
                    s.functions(),
                    rebound_abi::IMAGE_BASE,
                    layout.heap_end(),
                )
            }),
            ..Default::default()
        };
        let slots: Vec<_> = config.nics.iter().map(|n| n.backend.clone()).collect();
        let described: Vec<_> = config
            .nics
            .iter()
            .map(|n| (n.mac, n.mtu, n.host.clone()))
            .collect();
        let nics = nic_specs(&described, &slots)?;
        let descriptor = VmDescriptor {
            mem_size: layout.mem_size(),
            vcpus: layout.vcpus(),
            image: config.image.name.clone(),
            boot_args: config.boot_args.clone(),
            disk: disk_desc,
            abi_version: rebound_abi::ABI_VERSION,
        };
        let parts = Parts {
            layout,
            mem,
            mem_file,
            disk,
            descriptor,
            start: Start::Boot { entry },
            clock_base_ns: 0,
            generation: 0,
            ioq_state: None,
            paused,
            shared: config
                .shared
                .iter()
                .map(|c| ShareRecord {
                    config: c.clone(),
                    slot: u32::MAX,
                    cache: None,
                    vm_id: 0,
                })
                .chain(config.cache.iter().map(|c| ShareRecord {
                    config: ShareConfig {
                        name: c.name.clone(),
                        read_only: false,
                    },
                    slot: u32::MAX,
                    cache: Some(c.clone()),
                    vm_id: 0,
                }))
                .collect(),
            same_vm: false,
            nics,
            net_state: None,
            net_journal: config.net_journal.clone().map(|p| (p, None)),
            disk_journal: config.disk_journal.clone().map(|p| (p, None)),
            symbols,
            image: Some(config.image.bytes.clone()),
            memory_table: None,
            programs: None,
            replaced: Some(replaced),
            swap_link: memory_path.map(swap_link),
            swap_take_over: false,
        };
        Self::build(parts, console, launched)
    }

    /// Restores a VM from a snapshot chain (a full snapshot, then diffs of it in order), every
    /// file validated before anything is built. Memory is the full snapshot's image mapped
    /// copy-on-write (nothing copied up front; clones share pages) with the diffs' pages
    /// written over it. `generation` is what the guest's `GENERATION` hypercall returns from now
    /// on (it tells clones apart).
    pub fn restore(
        chain: &[rebound_snapshot::Snapshot],
        console: Box<dyn Write + Send>,
        generation: u64,
    ) -> Result<Vm> {
        Self::restore_with(
            chain,
            console,
            RestoreOptions {
                generation,
                ..RestoreOptions::default()
            },
        )
    }

    /// [`restore`](Self::restore) with options (e.g. start paused, as Firecracker's snapshot
    /// load does unless told to resume).
    pub fn restore_with(
        chain: &[rebound_snapshot::Snapshot],
        console: Box<dyn Write + Send>,
        options: RestoreOptions,
    ) -> Result<Vm> {
        let RestoreOptions {
            generation,
            paused,
            disk: disk_path,
            same_vm,
            nic_backends,
            net_journal,
            disk_journal,
            disk_mirror,
        } = options;
        let launched = Instant::now();
        let state = crate::persist::read_chain(chain)?;
        let layout = restored_layout(&state.vm)?;
        let (mem, mem_file) = crate::persist::map_chain(chain, state.vm.mem_size)?;
        // A disk named here is used as it is (Firecracker's drive override); else the disk
        // the snapshot saved, as a copy-on-write view; else the file it had.
        let disk = match disk_path {
            Some(p) => reopen_disk(state.vm.disk.as_ref(), Some(p))?,
            None => {
                let read_only = matches!(
                    state.vm.disk,
                    Some(DiskDescriptor::File {
                        read_only: true,
                        ..
                    })
                );
                match crate::persist::load_disk(chain, read_only)? {
                    Some(d) => Some(d),
                    None => reopen_disk(state.vm.disk.as_ref(), None)?,
                }
            }
        };
        let disk = match (disk, disk_mirror) {
            (Some(d), Some(m)) => Some(d.with_mirror(&m)?),
            (None, Some(_)) => return Err(Error::Restore("a mirror was given for no disk".into())),
            (d, None) => d,
        };
        let net_state = state.net()?;
        let nics = nic_specs(&saved_nics(net_state.as_ref()), &nic_backends)?;
        let parts = Parts {
            layout,
            mem,
            mem_file,
            disk,
            start: Start::Restore {
                vcpus: state.vcpus()?,
            },
            clock_base_ns: state.clock()?.clock_ns,
            generation,
            ioq_state: Some(state.ioq()?),
            paused,
            shared: state.shared()?,
            same_vm,
            nics,
            net_state,
            net_journal,
            disk_journal,
            memory_table: state.memory_table()?,
            programs: state.programs()?,
            replaced: state.replaced()?,
            descriptor: state.vm,
            symbols: None,
            image: None,
            swap_link: None,
            swap_take_over: false,
        };
        Self::build(parts, console, launched)
    }

    /// Takes over a VM from a preserved region: its memory file at `memory` (mapped shared, not
    /// copied) and its saved state. The guest continues where the state was saved, with the same
    /// generation (it is the same VM).
    pub fn adopt(
        memory: &std::path::Path,
        state: SavedState,
        console: Box<dyn Write + Send>,
        options: RestoreOptions,
    ) -> Result<Vm> {
        let launched = Instant::now();
        let layout = restored_layout(&state.vm)?;
        let vcpu_states = state.vcpus()?.len();
        if vcpu_states != state.vm.vcpus as usize {
            return Err(Error::Restore(format!(
                "{} vCPU states for {} vCPUs",
                vcpu_states, state.vm.vcpus
            )));
        }
        let (mem, mem_file) = memory::open_file(memory, state.vm.mem_size)?;
        let mut disk = reopen_disk(state.vm.disk.as_ref(), options.disk)?;
        if let Some(m) = &options.disk_mirror {
            disk = match disk {
                Some(d) => Some(d.with_mirror(m)?),
                None => return Err(Error::Restore("a mirror was given for no disk".into())),
            };
        }
        let net_state = state.net()?;
        let nics = nic_specs(&saved_nics(net_state.as_ref()), &options.nic_backends)?;
        let parts = Parts {
            layout,
            mem,
            mem_file,
            disk,
            start: Start::Restore {
                vcpus: state.vcpus()?,
            },
            clock_base_ns: state.clock()?.clock_ns,
            generation: state.generation()?,
            ioq_state: Some(state.ioq()?),
            paused: options.paused,
            shared: state.shared()?,
            same_vm: options.same_vm,
            nics,
            net_state,
            net_journal: options.net_journal,
            disk_journal: options.disk_journal,
            memory_table: state.memory_table()?,
            programs: state.programs()?,
            replaced: state.replaced()?,
            descriptor: state.vm,
            symbols: None,
            image: None,
            swap_link: Some(swap_link(memory)),
            swap_take_over: true,
        };
        Self::build(parts, console, launched)
    }

    fn build(parts: Parts, console: Box<dyn Write + Send>, launched: Instant) -> Result<Vm> {
        let Parts {
            layout,
            mem,
            mem_file,
            disk,
            descriptor,
            start,
            clock_base_ns,
            generation,
            ioq_state,
            paused,
            shared: share_records,
            same_vm,
            nics: nic_specs_built,
            net_state,
            net_journal,
            disk_journal,
            symbols,
            image,
            memory_table,
            programs: program_state,
            replaced: replaced_state,
            swap_link,
            swap_take_over,
        } = parts;
        kick::install().map_err(Error::State)?;
        let (kvm, cpuid) = kvm()?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        memory::register(&vm_fd, &mem, false)?;
        if matches!(start, Start::Restore { .. }) {
            // A snapshot of an older VMM may hold stubs whose faults cannot be resumed.
            rebound_arch::system::write_stubs(&mem).map_err(|e| Error::Restore(e.to_string()))?;
        }
        // Before anything touches guest memory: pages a predecessor moved out are registered.
        let private_memory = matches!(mem_file, memory::Backing::Private { .. });
        let swap = {
            let base =
                vm_memory::GuestMemoryBackend::get_host_address(&mem, vm_memory::GuestAddress(0))
                    .map_err(|e| Error::Memory(e.to_string()))? as u64;
            let file = match &mem_file {
                memory::Backing::Shared(f) => Some(f),
                memory::Backing::Private { .. } => None,
            };
            let home = crate::swap::SwapHome {
                dir: crate::swap::default_dir(),
                link: swap_link,
            };
            crate::swap::Swap::new(
                base,
                layout.mem_size() / PAGE_SIZE,
                home,
                file,
                swap_take_over,
            )
            .map_err(|e| Error::Memory(format!("swap: {e}")))?
        };
        let classes = crate::reclaim::Classes::default();
        if let Some(t) = memory_table {
            classes.set_state(t);
        }

        let waiters =
            Arc::new(Waiters::new(layout.vcpus()).with_pages(mem.clone(), layout.vcpu_page(0)));
        let disk = disk.map(|d| Arc::new(HeldDisk::new(d)));
        if let Some(d) = &disk
            && d.disk()
                .status()
                .iter()
                .any(|l| matches!(l.state, rebound_block::LegState::Syncing { .. }))
        {
            start_resync(d)?;
        }
        if let (Some(d), Some((path, recovered_to))) = (&disk, &disk_journal) {
            let applied = d
                .open_journal(path, *recovered_to)
                .map_err(|e| Error::State(format!("cannot open {}: {e}", path.display())))?;
            if recovered_to.is_some() {
                tracing::info!(
                    writes = applied,
                    "disk: journaled writes of the checkpoint applied"
                );
            }
        }
        let ioq = Arc::new(IoQueue::new(
            mem.clone(),
            USER_START..layout.heap_end(),
            layout.vcpus(),
            disk.clone(),
            waiters.clone(),
        )?);
        if let Some(state) = ioq_state {
            ioq.restore(state)
                .map_err(|e| Error::Restore(e.to_string()))?;
        }
        vm_fd
            .register_ioevent(
                ioq.doorbell(),
                &IoEventAddress::Pio(u64::from(port::DOORBELL)),
                NoDatamatch,
            )
            .map_err(kvm_err("KVM_IOEVENTFD"))?;
        let nics = if nic_specs_built.is_empty() {
            None
        } else {
            let n = Nics::new(
                mem.clone(),
                USER_START..layout.heap_end(),
                layout.vcpus(),
                nic_specs_built,
                waiters.clone(),
            )
            .map_err(|e| Error::State(e.to_string()))?;
            if let Some(state) = net_state {
                n.restore(state)
                    .map_err(|e| Error::Restore(e.to_string()))?;
            }
            if let Some((path, after)) = &net_journal {
                let (journal, replay, kicks) = rebound_devices::net::RxJournal::open(path, *after)
                    .map_err(|e| Error::State(format!("cannot open {}: {e}", path.display())))?;
                if after.is_some() {
                    tracing::info!(
                        frames = replay.len(),
                        connections = kicks.len(),
                        "network: delivering received frames again, acknowledging again"
                    );
                }
                n.set_journal(journal, replay, kicks);
            }
            vm_fd
                .register_ioevent(
                    n.doorbell(),
                    &IoEventAddress::Pio(u64::from(port::NET_DOORBELL)),
                    NoDatamatch,
                )
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
            Some(Arc::new(n))
        };
        let vm_id = share_records
            .iter()
            .map(|r| r.vm_id)
            .find(|&id| same_vm && id != 0)
            .unwrap_or_else(crate::persist::new_id);
        let shares = Arc::new(Shares::new(ShareDir::from_env(), vm_id)?);
        vm_fd
            .register_ioevent(
                shares.doorbell(),
                &IoEventAddress::Pio(u64::from(port::SHARE_DOORBELL)),
                NoDatamatch,
            )
            .map_err(kvm_err("KVM_IOEVENTFD"))?;

        let mut vcpus: Vec<VcpuFd> = Vec::new();
        for id in 0..layout.vcpus() {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            match &start {
                Start::Boot { entry } => {
                    let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                    rebound_arch::regs::configure_sregs(&mut sregs, &layout, id);
                    fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                    fd.set_regs(&rebound_arch::regs::initial_regs(&layout, id, *entry))
                        .map_err(kvm_err("KVM_SET_REGS"))?;
                    fd.set_fpu(&rebound_arch::regs::initial_fpu())
                        .map_err(kvm_err("KVM_SET_FPU"))?;
                }
                Start::Restore { vcpus: states } => {
                    let s = states.iter().find(|s| s.id == id).ok_or_else(|| {
                        Error::Restore(format!("the snapshot has no state for vCPU {id}"))
                    })?;
                    vstate::apply(&fd, s).map_err(|e| Error::Restore(e.to_string()))?;
                }
            }
            vcpus.push(fd);
        }
        // The clock continues from `clock_base_ns` at launch; vCPUs read it from their TSC
        // when KVM tells its frequency.
        let clock = crate::clock::GuestClock::new(
            clock_base_ns + launched.elapsed().as_nanos() as u64,
            vcpus.first().and_then(|v| v.get_tsc_khz().ok()),
        );
        tracing::debug!(tsc = clock.on_tsc(), "guest clock");
        if matches!(start, Start::Restore { .. }) {
            // A completion may have landed just before the snapshot while its vCPU was about to
            // block: wake every vCPU once (BLOCK may return early by contract).
            for id in 0..layout.vcpus() {
                waiters.notify(id);
            }
        }

        let shared = Arc::new(VmShared {
            mem,
            layout,
            console: Console::new(console),
            ioq,
            metrics: Metrics::default(),
            control: Arc::new(RunControl::new(layout.vcpus())),
            waiters,
            launched,
            clock,
            generation: AtomicU64::new(generation),
            vcpu_slots: (0..layout.vcpus()).map(|_| VcpuSlot::default()).collect(),
            outcome: Mutex::new(None),
            vcpu_threads: Mutex::new(Vec::new()),
            shares,
            nics,
            disk,
            symbols,
            swap,
            classes,
            private_memory,
            returns_held: std::sync::atomic::AtomicBool::new(false),
            clone_gate: Default::default(),
            requests: Mutex::new(()),
            emulator: crate::emulate::Emulator::new(vm_fd.clone(), layout.vcpus()),
            programs: crate::program::Programs::new(layout.vcpus()),
            nested: crate::nested::Nested::new(vm_fd.clone()),
            image,
        });
        if let Some(p) = program_state {
            shared.programs.check(&p, &shared).map_err(Error::Restore)?;
            shared.programs.set_state(p);
        }
        if let Some(r) = replaced_state {
            shared
                .emulator
                .replacer
                .check(&r, &shared)
                .map_err(Error::Restore)?;
            shared.emulator.set_replace_state(r);
        }
        {
            // A page that cannot be brought back is lost: the VM cannot go on.
            let weak = Arc::downgrade(&shared);
            shared.swap.set_fail_hook(Box::new(move |error: String| {
                if let Some(s) = weak.upgrade() {
                    s.finish(VmOutcome::Failed { error });
                }
            }));
        }
        // Shared regions are in place (and the guest's table written) before it runs. A
        // failure here drops everything built so far; no vCPU thread exists yet.
        shared.shares.rewrite_table(&shared.mem)?;
        for r in &share_records {
            let prefer = (r.slot != u32::MAX).then_some(r.slot as usize);
            let keep = same_vm && r.vm_id == shared.shares.vm_id();
            shared.shares.attach(
                &vm_fd,
                &shared.mem,
                &shared.waiters,
                &r.config,
                r.cache.as_ref(),
                Rejoin {
                    slot: prefer,
                    keep_holdings: keep,
                },
            )?;
        }
        if same_vm {
            shared.shares.drop_inherited_claims();
        }
        let vm = Vm {
            vm_fd,
            shared: shared.clone(),
            io_thread: Mutex::new(None),
            net_thread: Mutex::new(None),
            holds: Mutex::new(Holds::default()),
            freeze_lock: Mutex::new(()),
            descriptor,
            dirty: Mutex::new(DirtyTracking::default()),
            last_snapshot: Mutex::new(None),
            last_disk_image: std::sync::atomic::AtomicBool::new(false),
            backing: mem_file,
            components: crate::components::registry(&shared),
        };

        if paused {
            // The owner's pause: checkpoints and snapshots of it thaw back to paused.
            shared.control.set(Request::Pause);
            shared.pause_devices();
        }
        lock(&vm.holds).user = paused;
        let io = shared.clone();
        *lock(&vm.io_thread) = Some(spawn("rebound-io".into(), move || {
            if let Err(e) = io.ioq.run() {
                io.finish(VmOutcome::Failed {
                    error: e.to_string(),
                });
            }
        })?);
        if let Some(n) = shared.nics.clone() {
            let net = shared.clone();
            *lock(&vm.net_thread) = Some(spawn("rebound-net".into(), move || {
                if let Err(e) = n.run() {
                    net.finish(VmOutcome::Failed {
                        error: e.to_string(),
                    });
                }
            })?);
        }
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
            image = %vm.descriptor.image,
            "VM started"
        );
        Ok(vm)
    }

    /// Where the VM is in its life, as its owner sees it: `Paused` only by the owner's
    /// [`pause`](Self::pause); a VM briefly stopped for a checkpoint or snapshot is `Running`.
    pub fn state(&self) -> VmState {
        let h = lock(&self.holds);
        match self.vcpu_state() {
            VmState::Exited => VmState::Exited,
            _ if h.user => VmState::Paused,
            _ => VmState::Running,
        }
    }

    /// Where the vCPUs are: `Paused` whenever they are stopped (the owner's pause or a freeze).
    fn vcpu_state(&self) -> VmState {
        if lock(&self.shared.outcome).is_some() || self.shared.control.all_exited() {
            return VmState::Exited;
        }
        match self.shared.control.current() {
            Request::Run => VmState::Running,
            Request::Pause => VmState::Paused,
            Request::Stop => VmState::Exited,
        }
    }

    /// Stops every vCPU outside the guest and idles the devices (the owner's pause: it lasts
    /// until [`resume`](Self::resume), across freezes); returns how long it took.
    pub fn pause(&self) -> Result<Duration> {
        let mut h = lock(&self.holds);
        let took = self.stop_vcpus("paused")?;
        h.user = true;
        Ok(took)
    }

    /// Lets a paused VM run again (once no freeze holds it).
    pub fn resume(&self) -> Result<()> {
        let mut h = lock(&self.holds);
        if self.vcpu_state() == VmState::Exited {
            return Err(Error::State(
                "the VM has exited; it cannot be resumed".into(),
            ));
        }
        h.user = false;
        if !h.frozen {
            self.start_vcpus();
        }
        Ok(())
    }

    /// Gets every vCPU out of the guest and parks the I/O thread. Call with `holds` locked.
    fn stop_vcpus(&self, what: &str) -> Result<Duration> {
        match self.vcpu_state() {
            VmState::Running => {}
            VmState::Paused => {
                // Already stopped; make sure every vCPU got there (a VM restored paused).
                if !self.shared.control.wait_quiet(PAUSE_TIMEOUT) {
                    return Err(Error::PauseTimeout(PAUSE_TIMEOUT));
                }
                if !self.shared.quiesce_nested() {
                    return Err(Error::PauseTimeout(PAUSE_TIMEOUT));
                }
                return Ok(Duration::ZERO);
            }
            VmState::Exited => {
                return Err(Error::State(format!(
                    "the VM has exited; it cannot be {what}"
                )));
            }
        }
        let t0 = Instant::now();
        self.shared.clone_gate.note_pause();
        self.shared.control.set(Request::Pause);
        self.shared.kick_all();
        if !self.shared.control.wait_quiet(PAUSE_TIMEOUT) {
            self.shared.control.set(Request::Run);
            return Err(Error::PauseTimeout(PAUSE_TIMEOUT));
        }
        if !self.shared.quiesce_nested() {
            self.shared.control.set(Request::Run);
            return Err(Error::PauseTimeout(PAUSE_TIMEOUT));
        }
        self.shared.pause_devices();
        let took = t0.elapsed();
        self.shared.metrics.pause(took.as_nanos() as u64);
        tracing::debug!(?took, "VM paused");
        Ok(took)
    }

    /// Lets the vCPUs and the I/O thread run. Call with `holds` locked.
    fn start_vcpus(&self) {
        if self.vcpu_state() == VmState::Paused {
            self.shared.resume_devices();
            self.shared.control.set(Request::Run);
        }
    }

    /// A freeze ended: run again unless the owner paused the VM.
    fn release_freeze(&self) {
        let mut h = lock(&self.holds);
        h.frozen = false;
        if !h.user && self.vcpu_state() != VmState::Exited {
            self.start_vcpus();
        }
    }

    /// Pauses the VM and captures its state: every vCPU's registers and the devices'. Memory is
    /// readable through the returned [`Frozen`] until it is thawed or dropped. A second freeze
    /// waits for the first to end; the owner's `resume` does not run the VM while frozen.
    pub fn freeze(&self) -> Result<Frozen<'_>> {
        let guard = lock(&self.freeze_lock);
        let took = {
            let mut h = lock(&self.holds);
            let took = self.stop_vcpus("frozen")?;
            h.frozen = true;
            took
        };
        let captured = self
            .components
            .save_all()
            .map(|components| SavedState {
                vm: self.descriptor.clone(),
                components,
            })
            .map_err(Error::from);
        match captured {
            Ok(state) => Ok(Frozen {
                vm: self,
                state,
                pause: took,
                released: false,
                _turn: guard,
            }),
            Err(e) => {
                self.release_freeze();
                Err(e)
            }
        }
    }

    /// Starts recording which pages change (KVM's dirty log on guest memory plus the VMM's own
    /// writes). Idempotent.
    pub fn enable_dirty_tracking(&self) -> Result<()> {
        let mut d = lock(&self.dirty);
        if !d.enabled {
            d.manual = memory::manual_dirty_protect(&self.vm_fd);
            d.hot = Some(rebound_snapshot::HotPages::new(
                self.shared.layout.mem_size() / PAGE_SIZE,
            ));
            memory::register(&self.vm_fd, &self.shared.mem, true)?;
            d.enabled = true;
            // Start every consumer from a clean slate: pages written before now are unknown.
            let _ = self.harvest_locked(&mut d);
            d.consumers.clear();
        }
        Ok(())
    }

    /// Whether dirty tracking is on.
    pub fn dirty_tracking(&self) -> bool {
        lock(&self.dirty).enabled
    }

    fn harvest_locked(&self, d: &mut DirtyTracking) -> Result<DirtySet> {
        let pages = self.shared.layout.mem_size() / PAGE_SIZE;
        let mut set = DirtySet::new(pages);
        if d.enabled {
            let log = self
                .vm_fd
                .get_dirty_log(0, self.shared.layout.mem_size() as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            set.union_words(&log);
            // Write protection comes back only while frozen: a write between reading the log
            // and clearing it would otherwise be lost. Unfrozen, pages stay logged (reported
            // again next time, which is safe).
            if d.manual && lock(&self.holds).frozen {
                self.reprotect_cold(d, &log)?;
            }
        }
        for region in vm_memory::GuestMemoryBackend::iter(&self.shared.mem) {
            set.union_words(&vm_memory::mmap::MmapRegion::bitmap(&**region).get_and_reset());
        }
        for acc in d.consumers.values_mut() {
            acc.union(&set);
        }
        Ok(set)
    }

    /// Write-protects again the logged pages that are not to stay writable (see
    /// [`rebound_snapshot::HotPages`]).
    fn reprotect_cold(&self, d: &mut DirtyTracking, log: &[u64]) -> Result<()> {
        let Some(hot) = d.hot.as_mut() else {
            return Ok(());
        };
        let mut clear = vec![0u64; log.len()];
        let mut any = false;
        for (w, &word) in log.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if !hot.keep((w * 64 + b) as u64) {
                    clear[w] |= 1 << b;
                    any = true;
                }
            }
        }
        if any {
            memory::clear_dirty_log(
                &self.vm_fd,
                self.shared.layout.mem_size() / PAGE_SIZE,
                &mut clear,
            )?;
        }
        Ok(())
    }

    /// Pages written since `consumer` last asked (or since tracking began, for a new consumer),
    /// and resets its account. Call while frozen for an exact answer.
    pub fn take_dirty(&self, consumer: &str) -> Result<DirtySet> {
        let mut d = lock(&self.dirty);
        if !d.enabled {
            return Err(Error::State(
                "dirty page tracking is off (enable track_dirty_pages)".into(),
            ));
        }
        self.harvest_locked(&mut d)?;
        let pages = self.shared.layout.mem_size() / PAGE_SIZE;
        let set = d
            .consumers
            .insert(consumer.to_string(), DirtySet::new(pages));
        Ok(set.unwrap_or_else(|| DirtySet::new(pages)))
    }

    /// Gives pages back to `consumer`'s account (a consumer that failed to store them).
    pub fn return_dirty(&self, consumer: &str, pages: &DirtySet) {
        if let Some(acc) = lock(&self.dirty).consumers.get_mut(consumer) {
            acc.union(pages);
        }
    }

    pub(crate) fn last_snapshot_id(&self) -> Option<u64> {
        *lock(&self.last_snapshot)
    }

    pub(crate) fn set_last_snapshot_id(&self, id: u64) {
        *lock(&self.last_snapshot) = Some(id);
    }

    pub(crate) fn last_disk_image(&self) -> bool {
        self.last_disk_image.load(Ordering::SeqCst)
    }

    pub(crate) fn set_last_disk_image(&self, saved: bool) {
        self.last_disk_image.store(saved, Ordering::SeqCst);
    }

    /// The disk, if the VM has one.
    pub fn disk(&self) -> Option<&Arc<HeldDisk>> {
        self.shared.disk.as_ref()
    }

    /// The disk's legs and their health.
    pub fn disk_status(&self) -> Option<Vec<rebound_block::LegStatus>> {
        self.disk().map(|d| d.disk().status())
    }

    /// Attaches the file at `path` to the disk in place of its failed leg, or as its mirror,
    /// and starts copying the disk to it (see [`rebound_block::disk`]).
    pub fn attach_disk_leg(&self, path: &std::path::Path) -> Result<()> {
        let disk = self
            .disk()
            .ok_or_else(|| Error::State("the VM has no disk".into()))?;
        disk.disk().attach(path)?;
        start_resync(disk)
    }

    /// Forgets a consumer's account.
    pub fn drop_dirty_consumer(&self, consumer: &str) {
        lock(&self.dirty).consumers.remove(consumer);
    }

    /// Whether `consumer` has an account (it took dirty pages before).
    pub fn has_dirty_consumer(&self, consumer: &str) -> bool {
        lock(&self.dirty).consumers.contains_key(consumer)
    }

    /// Whether `state` could be put into this VM (one state per vCPU, device state that fits):
    /// checked before anything is changed, so a bad state changes nothing.
    pub fn check_state(&self, state: &SavedState) -> Result<()> {
        Ok(self.components.check_all(&state.components)?)
    }

    /// Ends the VM with a failure (state that can no longer be trusted).
    pub fn fail(&self, error: String) {
        self.shared.finish(VmOutcome::Failed { error });
    }

    /// Host address and length of guest memory (for write-protecting it).
    pub fn host_memory_range(&self) -> (u64, u64) {
        let base = vm_memory::GuestMemoryBackend::get_host_address(
            &self.shared.mem,
            vm_memory::GuestAddress(0),
        )
        .map_or(0, |p| p as u64);
        (base, self.shared.layout.mem_size())
    }

    /// The file guest memory is mapped from, shared (a memfd, or a preserved region's file):
    /// None for a VM restored copy-on-write from a snapshot. The block-state strategy maps its
    /// pages as one of two homes.
    pub fn memory_file(&self) -> Option<&std::fs::File> {
        match &self.backing {
            memory::Backing::Shared(f) => Some(f),
            memory::Backing::Private { .. } => None,
        }
    }

    /// The VM's description as snapshots record it.
    pub fn descriptor(&self) -> &VmDescriptor {
        &self.descriptor
    }

    /// Stops the VM (outcome `Stopped` unless it already ended).
    pub fn stop(&self) {
        self.shared.finish(VmOutcome::Stopped);
    }

    /// Attaches a shared region (or, with `cache`, this VM's persistent cache) while the VM
    /// runs; the guest sees it in its share table.
    pub fn attach_shared(&self, config: &ShareConfig, cache: Option<&CacheConfig>) -> Result<()> {
        if self.outcome().is_some() {
            return Err(Error::State("the VM has ended".into()));
        }
        self.shared.shares.attach(
            &self.vm_fd,
            &self.shared.mem,
            &self.shared.waiters,
            config,
            cache,
            Rejoin::default(),
        )?;
        Ok(())
    }

    /// Detaches shared region `name`.
    pub fn detach_shared(&self, name: &str) -> Result<()> {
        self.shared
            .shares
            .detach(&self.vm_fd, &self.shared.mem, name)
    }

    /// The shared regions attached.
    pub fn shared_regions(&self) -> Vec<AttachmentInfo> {
        self.shared.shares.list()
    }

    /// Sharing counters: doorbells, wake-ups sent and received, members recovered.
    pub fn share_counters(&self) -> &ShareCounters {
        self.shared.shares.counters()
    }

    /// A live update is about to `exec`: the member-slot claims are made to survive it (see
    /// [`Shares::hand_over_claims`]); the value goes in `share::INHERITED_CLAIMS_ENV`.
    pub fn hand_over_share_claims(&self) -> String {
        self.shared.shares.hand_over_claims()
    }

    /// The live update did not happen: the claims handed over are this process's alone again.
    pub fn keep_share_claims(&self) {
        self.shared.shares.keep_claims()
    }

    /// The VM went back in time: what it held in shared regions (locks) is released, marked
    /// inconsistent for the next holder. Returns how many locks.
    pub fn release_shared_holdings(&self) -> usize {
        self.shared.shares.release_own_holdings()
    }

    /// Asks the guest to shut down cleanly (ABI 1.3 `request::SHUTDOWN` in its boot info),
    /// waking its vCPUs blocked in `BLOCK` so it sees the request at once. The guest decides
    /// what to do; see [`Vm::wait_timeout`] for the grace period.
    pub fn request_shutdown(&self) -> Result<()> {
        if self.outcome().is_some() {
            return Err(Error::State("the VM has ended".into()));
        }
        self.shared
            .update_requests(rebound_abi::request::SHUTDOWN, 0)?;
        self.shared.waiters.notify_all();
        Ok(())
    }

    /// Writes a full snapshot of the VM to `path` at a clone point (ABI 1.9): asks the guest
    /// for one, waits up to `timeout` for a vCPU to reach it, and freezes the VM with that vCPU
    /// held there, so that a VM restored from the file holds nothing the VM holds (see
    /// [`crate::clone_point`]). Dirty tracking and the parent of the next diff are left as they
    /// were. A VM with a disk is refused: its clone would need its own copy of the disk.
    pub fn snapshot_at_clone_point(
        &self,
        path: &std::path::Path,
        timeout: Duration,
    ) -> Result<ClonePointInfo> {
        if self.outcome().is_some() {
            return Err(Error::State("the VM has ended".into()));
        }
        if self.shared.disk.is_some() {
            return Err(Error::ClonePoint(
                "a VM with a disk cannot be cloned for capacity (its clone would need its own copy of the disk)"
                    .into(),
            ));
        }
        let gate = &self.shared.clone_gate;
        let t0 = Instant::now();
        if !gate.arm(&self.shared)? {
            return Err(Error::ClonePoint(
                "a clone of this VM is already being taken".into(),
            ));
        }
        let taken = (|| {
            self.shared.waiters.notify_all();
            if !gate.wait_reached(timeout) {
                return Err(Error::ClonePoint(format!(
                    "the guest did not reach a clone point within {timeout:?} (it calls CLONE_POINT, ABI 1.9, when it sees request::CLONE)"
                )));
            }
            let reached = t0.elapsed();
            let frozen = self.freeze()?;
            if !gate.parked_now() {
                return Err(Error::ClonePoint(
                    "the guest left its clone point before the VM was frozen (another pause came between); try again"
                        .into(),
                ));
            }
            let meta = rebound_snapshot::SnapshotMeta {
                id: crate::persist::new_id(),
                parent: None,
                epoch: 0,
                kind: rebound_snapshot::Kind::Full,
                mem_size: frozen.mem_size(),
                created_unix_ns: crate::persist::unix_ns(),
            };
            let stats = crate::persist::write_snapshot(&frozen, path, &meta, None, Vec::new())?;
            let paused = frozen.pause_time();
            frozen.thaw()?;
            Ok(ClonePointInfo {
                id: meta.id,
                pages: stats.pages,
                bytes: stats.bytes_written,
                reached_us: reached.as_micros() as u64,
                pause_us: paused.as_micros() as u64,
                total_us: t0.elapsed().as_micros() as u64,
            })
        })();
        gate.disarm(&self.shared);
        taken
    }

    /// `CLONE_POINT` calls, and those that held a vCPU for a clone.
    pub fn clone_point_counts(&self) -> (u64, u64) {
        self.shared.clone_gate.counts()
    }

    /// What the guest's `GENERATION` returns now (0 at first boot; new after a restore).
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` for the VM to end; how it ended, if it did.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmOutcome> {
        if self.shared.control.wait_exited_timeout(timeout) {
            self.outcome().or(Some(VmOutcome::Stopped))
        } else {
            None
        }
    }

    /// Device outputs that output commit holds besides the console: the disk's writes first
    /// (an epoch's writes reach the disk before any of its output leaves), then the NICs'
    /// frames.
    pub fn held_outputs(&self) -> Vec<Arc<dyn rebound_devices::HeldOutput>> {
        let mut out: Vec<Arc<dyn rebound_devices::HeldOutput>> = Vec::new();
        if let Some(d) = &self.shared.disk {
            out.push(d.clone());
        }
        if let Some(n) = &self.shared.nics {
            out.push(n.clone());
        }
        out
    }

    /// Each network interface's counters.
    pub fn nic_stats(&self) -> Vec<rebound_devices::net::NicStatsSnapshot> {
        self.shared
            .nics
            .as_ref()
            .map_or_else(Vec::new, |n| n.stats())
    }

    /// Stops the VM because host resources it ran on failed.
    pub fn stop_for_host_fault(&self, reason: String) {
        self.shared.finish(VmOutcome::HostFault { reason });
    }

    /// The host CPUs each vCPU's thread may run on, by vCPU (empty once the VM has ended).
    pub fn vcpu_cpus(&self) -> Result<Vec<Vec<usize>>> {
        lock(&self.shared.vcpu_threads)
            .iter()
            // A finished thread's handle no longer names it (glibc reuses the id).
            .map(|t| match t.is_finished() {
                true => Ok(Vec::new()),
                false => crate::affinity::get(t).map_err(|e| Error::Affinity(e.to_string())),
            })
            .collect()
    }

    /// Lets vCPU `id` run only on host CPUs `cpus`.
    pub fn pin_vcpu(&self, id: usize, cpus: &[usize]) -> Result<()> {
        let threads = lock(&self.shared.vcpu_threads);
        let t = threads
            .get(id)
            .filter(|t| !t.is_finished())
            .ok_or_else(|| Error::Affinity(format!("no running vCPU {id}")))?;
        crate::affinity::set(t, cpus)
            .map_err(|e| Error::Affinity(format!("vCPU {id} to CPUs {cpus:?}: {e}")))
    }

    /// Waits for the VM to end and returns how it ended.
    pub fn wait(&self) -> VmOutcome {
        self.shared.control.wait_exited();
        for t in std::mem::take(&mut *lock(&self.shared.vcpu_threads)) {
            let _ = t.join();
        }
        self.shared.stop_devices();
        if let Some(t) = lock(&self.io_thread).take() {
            let _ = t.join();
        }
        if let Some(t) = lock(&self.net_thread).take() {
            let _ = t.join();
        }
        self.shared.shares.shutdown();
        lock(&self.shared.outcome)
            .clone()
            .unwrap_or(VmOutcome::Stopped)
    }

    /// How the VM ended, if it has.
    pub fn outcome(&self) -> Option<VmOutcome> {
        lock(&self.shared.outcome).clone()
    }

    /// Whether the guest makes progress, read without stopping it: the sum of its vCPUs'
    /// heartbeat words (ABI 1.7; the SDK dispatcher bumps its vCPU's word every pass) and
    /// whether every vCPU waits in `BLOCK` (a guest with nothing to do, not a stuck one).
    pub fn progress(&self) -> Progress {
        use vm_memory::Bytes;
        let s = &self.shared;
        let vcpus = s.layout.vcpus();
        let beat = (0..vcpus)
            .map(|id| {
                let at = vm_memory::GuestAddress(
                    s.layout.vcpu_page(id) + rebound_abi::VCPU_PAGE_BEAT_OFFSET,
                );
                s.mem.read_obj::<u64>(at).unwrap_or(0)
            })
            .fold(0u64, u64::wrapping_add);
        Progress {
            beat,
            waiting: s.waiters.blocked() >= vcpus,
        }
    }

    /// Current counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let s = &self.shared;
        let mut m = s.metrics.snapshot(
            s.console.bytes(),
            s.ioq.stats().snapshot(),
            s.launched.elapsed().as_millis() as u64,
        );
        m.nics = self.nic_stats();
        m.memory = self.memory_report();
        m.emulation = s.emulator.snapshot();
        m.programs = s.programs.stats();
        m.indicators_set = s.waiters.indicated();
        m
    }

    /// Nanoseconds from the start of `launch` to the guest's first exit (0: none yet).
    pub fn launch_to_first_exit_ns(&self) -> u64 {
        self.shared.metrics.first_exit_ns()
    }

    /// Guest memory (for inspection by tests and tools).
    pub fn memory(&self) -> &GuestMemory {
        &self.shared.mem
    }

    /// The guest's memory classes, requests and the swap (`GET /memory`).
    pub fn memory_report(&self) -> MemoryReport {
        let s = &self.shared;
        let ranges = s.classes.ranges(s).unwrap_or_default();
        let class_pages = |c: crate::reclaim::Class| {
            ranges
                .iter()
                .filter(|r| r.class == c)
                .map(|r| r.pages)
                .sum::<u64>()
        };
        let table = s.classes.state();
        let (answer_seq, answer_pages) = s.classes.answer(s).unwrap_or((0, 0));
        MemoryReport {
            mem_pages: s.layout.mem_size() / PAGE_SIZE,
            resident_pages: self.resident_pages(),
            registered: table.gpa != 0,
            working_pages: class_pages(crate::reclaim::Class::Working),
            cache_pages: class_pages(crate::reclaim::Class::Cache),
            swap_pages: class_pages(crate::reclaim::Class::Swap),
            request_seq: table.seq,
            answer_seq,
            answer_pages,
            counters: s.classes.counters(),
            swap: s.swap.stats(),
        }
    }

    /// Host memory the guest's pages hold now, in pages (the memory file's allocated blocks;
    /// for a copy-on-write snapshot mapping, the pages written or mapped in).
    pub fn resident_pages(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        match &self.backing {
            memory::Backing::Shared(f) => f.metadata().map_or(0, |m| m.blocks() * 512 / PAGE_SIZE),
            memory::Backing::Private { .. } => memory::data_pages(
                &self.shared.mem,
                &self.backing,
                self.shared.layout.mem_size(),
            )
            .count(),
        }
    }

    /// Asks the guest to give up `pages` pages (> 0) or tells it it may take `-pages` back.
    /// Returns the request's sequence number; the guest's answer names it
    /// ([`memory_answer`](Self::memory_answer)). An error if the guest has no class table.
    pub fn request_memory(&self, pages: i64) -> Result<u64> {
        self.shared
            .classes
            .request(&self.shared, pages)
            .ok_or_else(|| Error::Memory("the guest registered no memory class table".into()))
    }

    /// The guest's last answer: the request it answered and the pages it says it moved (a
    /// claim: the host measures what it got).
    pub fn memory_answer(&self) -> Option<(u64, i64)> {
        self.shared.classes.answer(&self.shared)
    }

    /// Moves up to `limit` resident pages of the guest's swap class out of RAM (to the swap
    /// file), holding the VM frozen for each chunk. Returns the pages moved.
    pub fn page_out_swap(&self, limit: u64) -> Result<u64> {
        const CHUNK: u64 = 8192;
        let memory::Backing::Shared(file) = &self.backing else {
            return Err(Error::Memory(
                "a VM mapping a snapshot copy-on-write has no memory file to move pages out of"
                    .into(),
            ));
        };
        let runs: Vec<(u64, u64)> = self
            .shared
            .classes
            .ranges(&self.shared)
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.class == crate::reclaim::Class::Swap)
            .map(|r| (r.first, r.pages))
            .collect();
        let resident_in_runs = || {
            let resident = memory::data_pages(
                &self.shared.mem,
                &self.backing,
                self.shared.layout.mem_size(),
            );
            let any = runs
                .iter()
                .any(|&(f, c)| (f..f + c).any(|p| resident.contains(p)));
            (resident, any)
        };
        let mut moved = 0;
        while moved < limit {
            // Nothing to move: no freeze.
            if !resident_in_runs().1 {
                break;
            }
            let frozen = self.freeze()?;
            let (resident, _) = resident_in_runs();
            let n = self
                .shared
                .swap
                .page_out(
                    &self.shared.mem,
                    file,
                    &runs,
                    &resident,
                    CHUNK.min(limit - moved),
                )
                .map_err(|e| Error::Memory(format!("moving pages out: {e}")));
            frozen.thaw()?;
            let n = n?;
            moved += n;
            if n == 0 {
                break;
            }
        }
        Ok(moved)
    }

    /// Holds (`true`) or lets go pages the guest gives back: a checkpoint strategy that remaps
    /// guest memory holds them while it runs (`MEM_RETURN` answers `EBUSY`).
    pub fn hold_memory_returns(&self, hold: bool) {
        self.shared
            .returns_held
            .store(hold, std::sync::atomic::Ordering::Release);
    }

    /// Watches writes to guest memory (write-protect faults), for a checkpoint strategy. One
    /// at a time; dropping the watch ends it.
    pub fn write_watch(&self) -> Result<crate::swap::WriteWatch> {
        self.shared
            .swap
            .watch()
            .map_err(|e| Error::Memory(format!("userfaultfd write-protect: {e}")))
    }

    /// Copies guest page `page` as it is now, with the VM running. The page may change during
    /// the copy: whoever copies this way copies it again once it is reported dirty.
    pub fn copy_page(&self, page: u64, buf: &mut [u8]) -> Result<()> {
        vm_memory::Bytes::read_slice(
            &self.shared.mem,
            buf,
            vm_memory::GuestAddress(page * PAGE_SIZE),
        )
        .map_err(|e| Error::Memory(e.to_string()))
    }
}

/// A VM's memory classes and swap, as `GET /memory` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryReport {
    /// Guest memory, in pages.
    pub mem_pages: u64,
    /// Pages holding host memory now.
    pub resident_pages: u64,
    /// Whether the guest registered a class table.
    pub registered: bool,
    /// Pages its table calls working memory.
    pub working_pages: u64,
    /// Pages its table calls cache.
    pub cache_pages: u64,
    /// Pages its table calls swap.
    pub swap_pages: u64,
    /// The last request posted.
    pub request_seq: u64,
    /// The last request the guest answered.
    pub answer_seq: u64,
    /// What it says it moved for it.
    pub answer_pages: i64,
    /// Requests and returns.
    pub counters: crate::reclaim::ClassCounters,
    /// The swap.
    pub swap: crate::swap::SwapStats,
}

/// A paused VM whose state was captured. Guest memory does not change while this exists: the
/// vCPUs are parked and the I/O thread is idle.
pub struct Frozen<'a> {
    vm: &'a Vm,
    state: SavedState,
    pause: Duration,
    released: bool,
    /// This freeze's turn (see `Vm::freeze_lock`); dropped after the freeze is released.
    _turn: MutexGuard<'a, ()>,
}

impl Frozen<'_> {
    /// The captured state.
    pub fn state(&self) -> &SavedState {
        &self.state
    }

    /// How long pausing took.
    pub fn pause_time(&self) -> Duration {
        self.pause
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.vm.shared.mem
    }

    /// Guest memory size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.vm.shared.layout.mem_size()
    }

    /// The bytes of guest page `page`.
    pub fn page(&self, page: u64) -> Option<&[u8]> {
        // SAFETY: while `self` exists the VM is paused: vCPU threads are parked and the I/O
        // thread is idle, so nothing writes guest memory during the borrow.
        unsafe { memory::frozen_bytes(&self.vm.shared.mem, page * PAGE_SIZE, PAGE_SIZE) }
    }

    /// Pages that may hold data (every other page is zero): in memory, or moved out to swap.
    pub fn data_pages(&self) -> DirtySet {
        // Swapped pages first: one brought back meanwhile is then in the file when it is read.
        let swapped = self.vm.shared.swap.swapped();
        let mut set = memory::data_pages(&self.vm.shared.mem, &self.vm.backing, self.mem_size());
        set.union(&swapped);
        set
    }

    /// All of guest memory as one slice.
    pub fn all_memory(&self) -> Option<&[u8]> {
        // SAFETY: while `self` exists the VM is paused (see `page`).
        unsafe { memory::frozen_bytes(&self.vm.shared.mem, 0, self.mem_size()) }
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        self.vm
    }

    /// Writes guest memory (a rollback putting pages back).
    pub fn write_memory(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        vm_memory::Bytes::write_slice(&self.vm.shared.mem, bytes, vm_memory::GuestAddress(addr))
            .map_err(|e| Error::Memory(e.to_string()))
    }

    /// Puts the VM back into `state` (vCPUs apply it as they resume; devices now). Memory is the
    /// caller's to restore.
    pub fn restore_state(&self, state: &SavedState) -> Result<()> {
        // Every component is checked before any is restored.
        self.vm.components.restore_all(&state.components)?;
        // Nested VMs are not saved: the guest VMM, back in the past, creates them again.
        self.vm.shared.nested.reset();
        Ok(())
    }

    /// Lets the VM run again (unless its owner paused it).
    pub fn thaw(mut self) -> Result<()> {
        self.released = true;
        self.vm.release_freeze();
        Ok(())
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if !self.released {
            self.vm.release_freeze();
        }
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
