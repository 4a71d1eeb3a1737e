//! Per-VM counters, updated lock-free on the exit path and read as a JSON-ready snapshot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use rebound_abi::{errno, nr};
use rebound_devices::ioq::IoStatsSnapshot;
use serde::Serialize;

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Exit reasons counted separately.
#[derive(Clone, Copy, Debug)]
pub enum ExitKind {
    /// `out` (hypercalls, the fault port).
    IoOut,
    /// `in`.
    IoIn,
    /// Access to guest-physical memory with no slot.
    Mmio,
    /// `hlt` reached KVM.
    Hlt,
    /// Triple fault.
    Shutdown,
    /// `KVM_RUN` cut short by a kick (pause, stop).
    Kick,
    /// Entry failure or KVM internal error.
    Failure,
    /// Anything else.
    Other,
}

/// Live counters of one VM.
#[derive(Default)]
pub struct Metrics {
    exits: [AtomicU64; 8],
    hypercalls: [AtomicU64; nr::COUNT + 1],
    errors: [AtomicU64; ERRNOS.len() + 1],
    bad_ports: AtomicU64,
    bad_mmio: AtomicU64,
    interrupts_injected: AtomicU64,
    block_events: AtomicU64,
    block_timeouts: AtomicU64,
    block_interrupted: AtomicU64,
    pauses: AtomicU64,
    pause_last_ns: AtomicU64,
    pause_max_ns: AtomicU64,
    first_exit_ns: AtomicU64,
}

const ERRNOS: [(i64, &str); 14] = [
    (errno::EPERM, "eperm"),
    (errno::ENOMEM, "enomem"),
    (errno::EIO, "eio"),
    (errno::E2BIG, "e2big"),
    (errno::EFAULT, "efault"),
    (errno::EBUSY, "ebusy"),
    (errno::ENODEV, "enodev"),
    (errno::EINVAL, "einval"),
    (errno::EROFS, "erofs"),
    (errno::ENOSYS, "enosys"),
    (errno::ENOEXEC, "enoexec"),
    (errno::EBADF, "ebadf"),
    (errno::ENOSPC, "enospc"),
    (errno::ESTALE, "estale"),
];

impl Metrics {
    pub(crate) fn exit(&self, kind: ExitKind) {
        bump(&self.exits[kind as usize]);
    }

    /// Records the first guest exit of the VM, `ns` after launch began.
    pub(crate) fn first_exit(&self, ns: u64) {
        let _ =
            self.first_exit_ns
                .compare_exchange(0, ns.max(1), Ordering::Relaxed, Ordering::Relaxed);
    }

    pub(crate) fn hypercall(&self, nr: u32) {
        bump(&self.hypercalls[(nr as usize).min(nr::COUNT)]);
    }

    pub(crate) fn hypercall_error(&self, err: i64) {
        let i = ERRNOS
            .iter()
            .position(|(e, _)| *e == err)
            .unwrap_or(ERRNOS.len());
        bump(&self.errors[i]);
    }

    pub(crate) fn bad_port(&self) {
        bump(&self.bad_ports);
    }

    pub(crate) fn bad_mmio(&self) {
        bump(&self.bad_mmio);
    }

    pub(crate) fn block(&self, wake: crate::wait::Wake) {
        use crate::wait::Wake;
        bump(match wake {
            Wake::Event => &self.block_events,
            Wake::Timeout => &self.block_timeouts,
            Wake::Interrupted => &self.block_interrupted,
        });
    }

    pub(crate) fn pause(&self, ns: u64) {
        bump(&self.pauses);
        self.pause_last_ns.store(ns, Ordering::Relaxed);
        self.pause_max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// Nanoseconds from launch to the first guest exit (0: none yet).
    pub fn first_exit_ns(&self) -> u64 {
        get(&self.first_exit_ns)
    }

    /// Total hypercalls so far.
    pub fn hypercalls_total(&self) -> u64 {
        self.hypercalls.iter().map(get).sum()
    }

    pub(crate) fn snapshot(
        &self,
        console_bytes: u64,
        io: IoStatsSnapshot,
        uptime_ms: u64,
    ) -> MetricsSnapshot {
        let e = |k: ExitKind| get(&self.exits[k as usize]);
        let mut hypercalls = BTreeMap::new();
        for n in 0..=nr::COUNT as u32 {
            let v = get(&self.hypercalls[n as usize]);
            if v > 0 {
                // Unassigned numbers below COUNT and the overflow bucket share "unknown".
                *hypercalls.entry(nr::name(n)).or_insert(0) += v;
            }
        }
        let mut hypercall_errors = BTreeMap::new();
        for (i, c) in self.errors.iter().enumerate() {
            let v = get(c);
            if v > 0 {
                hypercall_errors.insert(ERRNOS.get(i).map_or("other", |(_, n)| *n), v);
            }
        }
        MetricsSnapshot {
            uptime_ms,
            launch_to_first_exit_us: get(&self.first_exit_ns) / 1000,
            exits: ExitCounts {
                io_out: e(ExitKind::IoOut),
                io_in: e(ExitKind::IoIn),
                mmio: e(ExitKind::Mmio),
                hlt: e(ExitKind::Hlt),
                shutdown: e(ExitKind::Shutdown),
                kick: e(ExitKind::Kick),
                failure: e(ExitKind::Failure),
                other: e(ExitKind::Other),
            },
            hypercalls,
            hypercall_errors,
            bad_port_accesses: get(&self.bad_ports),
            bad_mmio_accesses: get(&self.bad_mmio),
            interrupts_injected: get(&self.interrupts_injected),
            // Counted by the waiters; filled in by `Vm::metrics`.
            indicators_set: 0,
            block: BlockCounts {
                woken_by_event: get(&self.block_events),
                timed_out: get(&self.block_timeouts),
                interrupted: get(&self.block_interrupted),
            },
            pause: PauseCounts {
                count: get(&self.pauses),
                last_us: get(&self.pause_last_ns) as f64 / 1000.0,
                max_us: get(&self.pause_max_ns) as f64 / 1000.0,
            },
            console_bytes,
            io,
            nics: Vec::new(),
            memory: Default::default(),
            emulation: Default::default(),
            programs: Default::default(),
        }
    }
}

/// Exits by reason.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port writes (hypercalls, fault reports).
    pub io_out: u64,
    /// Port reads.
    pub io_in: u64,
    /// MMIO accesses.
    pub mmio: u64,
    /// `hlt` exits.
    pub hlt: u64,
    /// Triple faults.
    pub shutdown: u64,
    /// Kicks (pause/stop).
    pub kick: u64,
    /// Entry failures and KVM internal errors.
    pub failure: u64,
    /// Anything else.
    pub other: u64,
}

/// How `BLOCK` hypercalls ended.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BlockCounts {
    /// Woken by an event (I/O completion).
    pub woken_by_event: u64,
    /// Timed out.
    pub timed_out: u64,
    /// Cut short by the controller.
    pub interrupted: u64,
}

/// Pause statistics (time from request until every vCPU is out of the guest).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PauseCounts {
    /// Pauses so far.
    pub count: u64,
    /// Last pause latency in microseconds.
    pub last_us: f64,
    /// Worst pause latency in microseconds.
    pub max_us: f64,
}

/// Everything `GET /metrics` reports for a VM.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MetricsSnapshot {
    /// Milliseconds since launch.
    pub uptime_ms: u64,
    /// Microseconds from the start of VM creation to the guest's first exit.
    pub launch_to_first_exit_us: u64,
    /// Exits by reason.
    pub exits: ExitCounts,
    /// Hypercalls by name.
    pub hypercalls: BTreeMap<&'static str, u64>,
    /// Hypercall errors returned to the guest, by errno.
    pub hypercall_errors: BTreeMap<&'static str, u64>,
    /// Accesses to ports with no device.
    pub bad_port_accesses: u64,
    /// Accesses to guest-physical addresses with no memory or device.
    pub bad_mmio_accesses: u64,
    /// Interrupts injected into the guest (SDK guests: always 0).
    pub interrupts_injected: u64,
    /// Requester indicator bits the VMM set in vCPU pages (ABI 1.10).
    pub indicators_set: u64,
    /// `BLOCK` outcomes.
    pub block: BlockCounts,
    /// Pause latency.
    pub pause: PauseCounts,
    /// Console bytes written by the guest.
    pub console_bytes: u64,
    /// The I/O queue.
    pub io: IoStatsSnapshot,
    /// Each network interface.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<rebound_devices::net::NicStatsSnapshot>,
    /// Memory classes, requests, pages returned and the swap (ABI 1.8).
    pub memory: crate::vm::MemoryReport,
    /// Trapping operations: sites, counts, what is promoted.
    pub emulation: crate::emulate::EmulationSnapshot,
    /// Programs (ABI 1.10): runs, page-table builds and reuse, faults.
    pub programs: crate::program::ProgramStats,
}
