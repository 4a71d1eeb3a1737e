//! Network devices for SDK guests (ABI 1.4): per NIC, a TX and an RX ring of frame descriptors
//! in guest memory, served by one VMM thread, completed without an interrupt.
//!
//! The guest queues frames and rings a doorbell port bound to an ioeventfd (no exit); this
//! thread sends them through the NIC's [`Backend`] (a TAP device, a user-mode stack) and
//! advances the TX consumer index. Frames from the backend are copied into buffers the guest
//! posted and the RX consumer index advances; a guest that said it is idle is woken once per
//! batch through [`Notify`]. Everything read from the rings is hostile: addresses, lengths and
//! indices are checked, and a NIC whose rings are corrupt is marked broken and left alone.
//!
//! While the VM is protected, transmitted frames are held per epoch and sent only once the
//! checkpoint that follows them commits ([`HeldOutput`]): a rollback never un-sends a frame.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rebound_abi::net::{
    self as abi_net, FRAME_OVERHEAD, LINK_UP, MAX_ENTRIES, NetDesc, RING_BROKEN,
};
use rebound_abi::{errno, indicator};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::{HeldOutput, Notify};

/// A host path for one NIC's frames: a TAP device, a user-mode network stack, or several
/// paths with failover. Implemented in `rebound-net`.
pub trait Backend: Send {
    /// A descriptor that is readable when [`recv`](Self::recv) may return a frame.
    fn fd(&self) -> RawFd;
    /// Sends one frame without blocking; `WouldBlock` if the path cannot take it now.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Receives one frame into `buf` without blocking; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Whether a complete frame is already buffered in the backend (so [`recv`](Self::recv)
    /// returns one although [`fd`](Self::fd) is not readable).
    fn buffered(&self) -> bool;
    /// Called on every round of the device thread: lets a backend do its own work (probes,
    /// failover, reconnects). [`fd`](Self::fd) may change across calls.
    fn service(&mut self) -> io::Result<()>;
    /// Whether a working path exists.
    fn link_up(&self) -> bool;
    /// Times the NIC moved to another host path (0 for a single path).
    fn failovers(&self) -> u64;
    /// What it is, for logs and metrics ("tap tap0", "passt 127.0.0.1:6379->6379").
    fn describe(&self) -> String;
}

/// One NIC as configured.
pub struct NicSpec {
    /// Its MAC address.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u16,
    /// Where its frames go.
    pub backend: Box<dyn Backend>,
    /// How its host side was configured (the controller's, opaque here; saved with the VM).
    pub host: String,
}

/// Errors setting up or running the network device (guest errors are counted, not errors).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An eventfd or epoll call failed.
    #[error("network device event setup failed: {0}")]
    Event(#[source] io::Error),
    /// A NIC's configuration is invalid.
    #[error("network interface {index}: {reason}")]
    Config {
        /// The NIC.
        index: usize,
        /// Why.
        reason: String,
    },
}

/// Counters of one NIC.
#[derive(Default)]
pub struct NicStats {
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_no_buffer: AtomicU64,
    rx_too_big: AtomicU64,
    rx_runts: AtomicU64,
    ring_errors: AtomicU64,
    wakeups: AtomicU64,
    held_dropped: AtomicU64,
}

/// A copy of [`NicStats`] for reporting.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct NicStatsSnapshot {
    /// The backend.
    pub backend: String,
    /// Whether the backend has a working path.
    pub link_up: bool,
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// Bytes sent to the backend.
    pub tx_bytes: u64,
    /// Frames the backend could not take (or that failed).
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames dropped because the guest had posted no buffer.
    pub rx_no_buffer: u64,
    /// Frames dropped because they did not fit the guest's buffer or the MTU.
    pub rx_too_big: u64,
    /// Frames dropped because they were shorter than an Ethernet header.
    pub rx_runts: u64,
    /// Bad descriptors or indices from the guest (the NIC is then broken).
    pub ring_errors: u64,
    /// Times the guest was woken for received frames.
    pub wakeups: u64,
    /// Held frames dropped because too much was held.
    pub held_dropped: u64,
    /// Bytes of frames held by output commit now.
    pub held_bytes: u64,
    /// Times the NIC moved to another host path.
    pub failovers: u64,
}

/// A MAC address as `02:00:00:00:00:01`.
pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `02:00:00:00:00:01`; None if it is not a MAC address.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A NIC's rings as registered by `NET_SETUP`, with the VMM's own consumer indices (the copies
/// in guest memory are for the guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingState {
    /// Guest address of the ring area.
    pub gpa: u64,
    /// TX entries.
    pub tx_entries: u32,
    /// RX entries.
    pub rx_entries: u32,
    /// The vCPU woken for received frames.
    pub wake_vcpu: u32,
    /// TX frames taken.
    pub tx_consumer: u32,
    /// RX buffers filled.
    pub rx_consumer: u32,
    /// A bad descriptor or index was seen: the NIC is left alone until set up again.
    pub broken: bool,
}

/// One NIC's saved state: what it is (a restored VM gets the same NICs) and its rings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicState {
    /// Its MAC address.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u16,
    /// Its rings, once the guest set them up.
    pub ring: Option<RingState>,
    /// How its host side was configured (see [`NicSpec::host`]).
    pub host: String,
}

/// The network device's saved state, by NIC.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// By NIC.
    pub nics: Vec<NicState>,
}

/// Why a network state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum NetStateError {
    /// The state is for a different number of NICs.
    #[error("network state has {found} NICs, the VM has {expected}")]
    NicCount {
        /// NICs in the state.
        found: usize,
        /// NICs in the VM.
        expected: usize,
    },
    /// A NIC's MAC or MTU differs from the VM's.
    #[error("network interface {index} was saved as {saved}, the VM has {now}")]
    Nic {
        /// The NIC.
        index: usize,
        /// What the state says.
        saved: String,
        /// What the VM has.
        now: String,
    },
    /// A ring points outside guest-writable memory or has a bad size.
    #[error("network state names a ring outside the guest's writable memory or of a bad size")]
    BadRing,
}

struct Nic {
    mac: [u8; 6],
    mtu: u16,
    host: String,
    ring: Mutex<Option<RingState>>,
    backend: Mutex<Box<dyn Backend>>,
    stats: NicStats,
}

/// Frames held for output commit.
#[derive(Default)]
struct Held {
    holding: bool,
    open: Vec<(usize, Vec<u8>)>,
    sealed: BTreeMap<u64, Vec<(usize, Vec<u8>)>>,
    bytes: u64,
}

/// Held frame bytes past which new frames are dropped (TCP sends them again): a guest cannot
/// make the VMM buffer without bound while checkpoints are not acknowledged.
pub const HELD_LIMIT: u64 = 64 << 20;

/// Received frames kept for replay after a rollback, by epoch: those delivered after the
/// checkpoint the VM goes back to are delivered again, in order, so the guest does not wait for
/// its peers to notice they were lost (TCP's retransmission timeout).
#[derive(Default)]
struct RxLog {
    logging: bool,
    open: Vec<(usize, Vec<u8>)>,
    sealed: BTreeMap<u64, Vec<(usize, Vec<u8>)>>,
    bytes: u64,
    /// More than [`RX_LOG_LIMIT`] arrived since the last commit: this window is not replayed.
    overflowed: bool,
    /// Frames to deliver again before any new one.
    replay: Vec<(usize, Vec<u8>)>,
}

/// Received bytes kept for replay; past it a window goes unreplayed (TCP recovers it).
pub const RX_LOG_LIMIT: u64 = 16 << 20;

/// Received frames kept in a file (a VM in a state directory) for the VMM that takes the VM
/// over after this one dies: frames received after the checkpoint it recovers to are delivered
/// again. Records are `[nic: u32][len: u32][after: u64][frame]`, `after` the checkpoint the
/// frame came after; a torn last record (a kill mid-write) is ignored.
pub struct RxJournal {
    file: std::fs::File,
    path: std::path::PathBuf,
    /// The checkpoint new records come after.
    after: u64,
    /// Beside it, the last ACK of each connection that went out (see [`crate::net_ack`]).
    acks: std::path::PathBuf,
}

const JOURNAL_HEADER: usize = 16;

impl RxJournal {
    /// Opens the journal at `path`. With `replay_after = Some(c)` (the VM was recovered to
    /// checkpoint c), returns the frames recorded after c, in order, and the last ACK each
    /// connection sent out (to send again); the journal starts empty.
    #[allow(clippy::type_complexity)]
    pub fn open(
        path: &std::path::Path,
        replay_after: Option<u64>,
    ) -> io::Result<(Self, Vec<(usize, Vec<u8>)>, Vec<(usize, Vec<u8>)>)> {
        let mut acks_name = path.as_os_str().to_owned();
        acks_name.push(".acks");
        let acks = std::path::PathBuf::from(acks_name);
        let kicks = match replay_after {
            Some(_) => std::fs::read(&acks)
                .map(|b| crate::net_ack::LastAcks::decode(&b))
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let replay = match replay_after {
            Some(c) => Self::read(path)?
                .into_iter()
                .filter(|(_, after, _)| *after >= c)
                .map(|(nic, _, f)| (nic, f))
                .collect(),
            None => Vec::new(),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
                after: replay_after.unwrap_or(0),
                acks,
            },
            replay,
            kicks,
        ))
    }

    /// Records the last ACKs (written whole: a temporary file renamed into place).
    fn save_acks(&self, encoded: &[u8]) -> io::Result<()> {
        let mut tmp_name = self.acks.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp_name);
        std::fs::write(&tmp, encoded)?;
        std::fs::rename(&tmp, &self.acks)
    }

    /// Every whole record in `path` (none if it does not exist).
    fn read(path: &std::path::Path) -> io::Result<Vec<(usize, u64, Vec<u8>)>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        let mut at = 0;
        while at + JOURNAL_HEADER <= bytes.len() {
            let word = |o: usize, n: usize| {
                let mut b = [0u8; 8];
                b[..n].copy_from_slice(&bytes[at + o..at + o + n]);
                u64::from_le_bytes(b)
            };
            let (nic, len, after) = (word(0, 4) as usize, word(4, 4) as usize, word(8, 8));
            let end = at + JOURNAL_HEADER + len;
            if end > bytes.len() || nic >= abi_net::MAX_NICS || len > FRAME_MAX {
                break;
            }
            out.push((nic, after, bytes[at + JOURNAL_HEADER..end].to_vec()));
            at = end;
        }
        Ok(out)
    }

    fn append(&mut self, nic: usize, frame: &[u8]) -> io::Result<()> {
        use std::io::Write as _;
        let mut rec = Vec::with_capacity(JOURNAL_HEADER + frame.len());
        rec.extend_from_slice(&(nic as u32).to_le_bytes());
        rec.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        rec.extend_from_slice(&self.after.to_le_bytes());
        rec.extend_from_slice(frame);
        self.file.write_all(&rec)
    }

    /// Checkpoint `epoch` was taken: new records come after it.
    fn sealed(&mut self, epoch: u64) {
        self.after = epoch;
    }

    /// Checkpoint `epoch` committed: records from before it are in its memory.
    fn committed(&mut self, epoch: u64) -> io::Result<()> {
        use std::io::Write as _;
        let keep: Vec<_> = Self::read(&self.path)?
            .into_iter()
            .filter(|(_, after, _)| *after >= epoch)
            .collect();
        let mut tmp_name = self.path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp_name);
        let mut f = std::fs::File::create(&tmp)?;
        for (nic, after, frame) in keep {
            let mut rec = Vec::with_capacity(JOURNAL_HEADER + frame.len());
            rec.extend_from_slice(&(nic as u32).to_le_bytes());
            rec.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            rec.extend_from_slice(&after.to_le_bytes());
            rec.extend_from_slice(&frame);
            f.write_all(&rec)?;
        }
        std::fs::rename(&tmp, &self.path)?;
        self.file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        Ok(())
    }
}

#[derive(Default)]
struct Gate {
    pause_requested: bool,
    parked: bool,
    stopping: bool,
}

type Pending = Box<dyn Fn() + Send + Sync>;

/// The network devices of one VM.
pub struct Nics<M> {
    mem: M,
    writable: Range<u64>,
    vcpus: u32,
    nics: Vec<Nic>,
    doorbell: EventFd,
    notify: Arc<dyn Notify>,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    running: AtomicBool,
    held: Mutex<Held>,
    pending: Mutex<Option<Pending>>,
    rx_log: Mutex<RxLog>,
    journal: Mutex<Option<RxJournal>>,
    /// The last ACK of each connection that went out, and whether it changed since it was
    /// last recorded.
    last_acks: Mutex<(crate::net_ack::LastAcks, bool)>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Largest frame the device carries.
const FRAME_MAX: usize = 65_536;
/// Frames taken from one backend per round, so one busy NIC cannot starve the others.
const RX_BATCH: usize = 256;

impl<M: GuestMemory + Send + Sync + 'static> Nics<M> {
    /// NICs as `specs` say, over `mem`; the device only touches guest memory inside `writable`.
    pub fn new(
        mem: M,
        writable: Range<u64>,
        vcpus: u32,
        specs: Vec<NicSpec>,
        notify: Arc<dyn Notify>,
    ) -> Result<Self, NetError> {
        if specs.len() > abi_net::MAX_NICS {
            return Err(NetError::Config {
                index: specs.len() - 1,
                reason: format!("at most {} NICs", abi_net::MAX_NICS),
            });
        }
        let mut nics = Vec::new();
        for (index, s) in specs.into_iter().enumerate() {
            if s.mtu < 68 || s.mtu > abi_net::MAX_MTU {
                return Err(NetError::Config {
                    index,
                    reason: format!("MTU {} is outside 68..={}", s.mtu, abi_net::MAX_MTU),
                });
            }
            nics.push(Nic {
                mac: s.mac,
                mtu: s.mtu,
                host: s.host,
                ring: Mutex::new(None),
                backend: Mutex::new(s.backend),
                stats: NicStats::default(),
            });
        }
        Ok(Self {
            mem,
            writable,
            vcpus,
            nics,
            doorbell: EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::Event)?,
            notify,
            gate: Mutex::new(Gate::default()),
            gate_cv: Condvar::new(),
            running: AtomicBool::new(false),
            held: Mutex::new(Held::default()),
            pending: Mutex::new(None),
            rx_log: Mutex::new(RxLog::default()),
            journal: Mutex::new(None),
            last_acks: Mutex::new(Default::default()),
        })
    }

    /// Keeps received frames in `journal` while protected (see [`RxJournal`]); `replay`
    /// (frames a predecessor received after the checkpoint this VM was recovered to) is
    /// delivered first once the VM runs.
    /// `kicks` are the last ACKs the predecessor's connections sent out: sent again now, so
    /// that peers retransmit at once what they sent while no VMM was there.
    pub fn set_journal(
        &self,
        journal: RxJournal,
        replay: Vec<(usize, Vec<u8>)>,
        kicks: Vec<(usize, Vec<u8>)>,
    ) {
        *lock(&self.journal) = Some(journal);
        lock(&self.rx_log).replay = replay;
        {
            // Also sent again if the backend reattaches (see `run`).
            let mut a = lock(&self.last_acks);
            for (i, f) in &kicks {
                a.0.note(*i, f);
            }
        }
        for (i, f) in kicks {
            if let Some(n) = self.nics.get(i) {
                let _ = lock(&n.backend).send(&f);
            }
        }
        let _ = self.doorbell.write(1);
    }

    /// The doorbell the VMM binds to the guest's NIC doorbell port (as an ioeventfd).
    pub fn doorbell(&self) -> &EventFd {
        &self.doorbell
    }

    /// How many NICs.
    pub fn len(&self) -> usize {
        self.nics.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.nics.is_empty()
    }

    /// NIC `i`'s MAC and MTU (for the boot info).
    pub fn info(&self, i: usize) -> Option<([u8; 6], u16)> {
        self.nics.get(i).map(|n| (n.mac, n.mtu))
    }

    /// Counters, by NIC.
    pub fn stats(&self) -> Vec<NicStatsSnapshot> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut held = vec![0u64; self.nics.len()];
        {
            let h = lock(&self.held);
            for (i, f) in h.sealed.values().flatten().chain(h.open.iter()) {
                if let Some(b) = held.get_mut(*i) {
                    *b += f.len() as u64;
                }
            }
        }
        self.nics
            .iter()
            .zip(held)
            .map(|(n, held_bytes)| {
                let b = lock(&n.backend);
                NicStatsSnapshot {
                    backend: b.describe(),
                    link_up: b.link_up(),
                    tx_frames: g(&n.stats.tx_frames),
                    tx_bytes: g(&n.stats.tx_bytes),
                    tx_dropped: g(&n.stats.tx_dropped),
                    rx_frames: g(&n.stats.rx_frames),
                    rx_bytes: g(&n.stats.rx_bytes),
                    rx_no_buffer: g(&n.stats.rx_no_buffer),
                    rx_too_big: g(&n.stats.rx_too_big),
                    rx_runts: g(&n.stats.rx_runts),
                    ring_errors: g(&n.stats.ring_errors),
                    wakeups: g(&n.stats.wakeups),
                    held_dropped: g(&n.stats.held_dropped),
                    held_bytes,
                    failovers: b.failovers(),
                }
            })
            .collect()
    }

    /// Bytes of frames held now.
    pub fn held_bytes(&self) -> u64 {
        lock(&self.held).bytes
    }

    fn writable(&self, addr: u64, len: u64) -> bool {
        addr >= self.writable.start
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= self.writable.end)
    }

    fn ring_ok(&self, r: &RingState) -> bool {
        let entries_ok = |e: u32| e.is_power_of_two() && e <= MAX_ENTRIES;
        entries_ok(r.tx_entries)
            && entries_ok(r.rx_entries)
            && r.gpa.is_multiple_of(8)
            && r.wake_vcpu < self.vcpus
            && self.writable(r.gpa, abi_net::area_size(r.tx_entries, r.rx_entries))
    }

    /// The `NET_SETUP` hypercall. Returns 0 or a negative errno.
    pub fn register(&self, nic: u64, gpa: u64, tx: u64, rx: u64, wake_vcpu: u64) -> i64 {
        let Some(n) = usize::try_from(nic).ok().and_then(|i| self.nics.get(i)) else {
            return errno::ENODEV;
        };
        let (Ok(tx), Ok(rx), Ok(wake)) = (
            u32::try_from(tx),
            u32::try_from(rx),
            u32::try_from(wake_vcpu),
        ) else {
            return errno::EINVAL;
        };
        // Start from the guest's current producers: stale memory is not replayed.
        let hdr = GuestAddress(gpa);
        let load = |off: u64| -> Option<u32> {
            self.mem
                .load::<u32>(hdr.unchecked_add(off), Ordering::Acquire)
                .ok()
        };
        let mut r = RingState {
            gpa,
            tx_entries: tx,
            rx_entries: rx,
            wake_vcpu: wake,
            tx_consumer: 0,
            rx_consumer: 0,
            broken: false,
        };
        if !self.ring_ok(&r) {
            return if tx.is_power_of_two()
                && rx.is_power_of_two()
                && tx <= MAX_ENTRIES
                && rx <= MAX_ENTRIES
                && gpa.is_multiple_of(8)
                && wake < self.vcpus
            {
                errno::EFAULT
            } else {
                errno::EINVAL
            };
        }
        let (Some(txp), Some(rxp)) = (load(0), load(8)) else {
            return errno::EFAULT;
        };
        r.tx_consumer = txp;
        r.rx_consumer = rxp;
        let link = if lock(&n.backend).link_up() {
            LINK_UP
        } else {
            0
        };
        let stores = [(4u64, txp), (12, rxp), (16, 0), (20, link)];
        for (off, v) in stores {
            if self
                .mem
                .store(v, hdr.unchecked_add(off), Ordering::Release)
                .is_err()
            {
                return errno::EFAULT;
            }
        }
        *lock(&n.ring) = Some(r);
        // Frames may already wait for it.
        let _ = self.doorbell.write(1);
        0
    }

    /// Stops serving the NICs until [`resume`](Self::resume); returns once the device thread
    /// is idle, so guest memory is no longer touched by this device.
    pub fn pause(&self) {
        let mut g = lock(&self.gate);
        g.pause_requested = true;
        if !self.running.load(Ordering::Acquire) {
            return;
        }
        let _ = self.doorbell.write(1);
        while !g.parked && !g.stopping {
            g = self.gate_cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Serves the NICs again.
    pub fn resume(&self) {
        lock(&self.gate).pause_requested = false;
        self.gate_cv.notify_all();
    }

    /// Asks the device thread to exit (the owner joins it).
    pub fn stop(&self) {
        let mut g = lock(&self.gate);
        g.stopping = true;
        g.pause_requested = false;
        drop(g);
        self.gate_cv.notify_all();
        let _ = self.doorbell.write(1);
    }

    /// The device loop: run it on a thread of its own until [`stop`](Self::stop).
    pub fn run(&self) -> Result<(), NetError> {
        const DOORBELL: u64 = u64::MAX;
        let epoll = Epoll::new().map_err(NetError::Event)?;
        epoll
            .ctl(
                ControlOperation::Add,
                self.doorbell.as_raw_fd(),
                EpollEvent::new(EventSet::IN, DOORBELL),
            )
            .map_err(NetError::Event)?;
        let mut fds: Vec<RawFd> = Vec::new();
        for (i, n) in self.nics.iter().enumerate() {
            let fd = lock(&n.backend).fd();
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(NetError::Event)?;
            fds.push(fd);
        }
        self.running.store(true, Ordering::Release);
        let mut events = vec![EpollEvent::default(); self.nics.len() + 1];
        let mut buf = vec![0u8; FRAME_MAX];
        let mut buffered = vec![false; self.nics.len()];
        let mut link: Vec<bool> = self
            .nics
            .iter()
            .map(|n| lock(&n.backend).link_up())
            .collect();
        loop {
            // Backends with their own timers (probes, reconnects) get a turn every 10 ms;
            // frames a backend already holds are served at once.
            let timeout = if buffered.iter().any(|b| *b) { 0 } else { 10 };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NetError::Event(e)),
            };
            let _ = self.doorbell.read();
            {
                let mut g = lock(&self.gate);
                if g.pause_requested && !g.stopping {
                    g.parked = true;
                    self.gate_cv.notify_all();
                    while g.pause_requested && !g.stopping {
                        g = self.gate_cv.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    g.parked = false;
                }
                if g.stopping {
                    drop(g);
                    // What the guest queued before it ended still goes out.
                    for i in 0..self.nics.len() {
                        self.serve_tx(i);
                    }
                    self.gate_cv.notify_all();
                    return Ok(());
                }
            }
            for i in 0..self.nics.len() {
                self.serve_tx(i);
            }
            self.replay();
            let mut readable = buffered.clone();
            for ev in &events[..n] {
                if let Some(r) = readable.get_mut(ev.data() as usize) {
                    *r = true;
                }
            }
            for (i, r) in readable.into_iter().enumerate() {
                if r {
                    self.serve_rx(i, &mut buf);
                }
                let mut b = lock(&self.nics[i].backend);
                if let Err(e) = b.service() {
                    tracing::warn!(nic = i, "network backend: {e}");
                }
                buffered[i] = b.buffered();
                let up = b.link_up();
                if up != link[i] {
                    link[i] = up;
                    self.set_link(i, up);
                }
                // A backend that reconnected or failed over has a new descriptor.
                let fd = b.fd();
                if fd != fds[i] {
                    let _ = epoll.ctl(
                        ControlOperation::Delete,
                        fds[i],
                        EpollEvent::new(EventSet::IN, i as u64),
                    );
                    if let Err(e) = epoll.ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, i as u64),
                    ) {
                        tracing::warn!(nic = i, "cannot watch the new backend descriptor: {e}");
                    }
                    fds[i] = fd;
                    // Frames sent into the old path may be lost (a passt that closed a
                    // connection it could not take yet, a link that failed): each
                    // connection's last ACK again makes peers retransmit at once.
                    let acks = lock(&self.last_acks).0.for_nic(i);
                    for f in acks {
                        let _ = b.send(&f);
                    }
                }
            }
        }
    }

    /// Tells the guest whether NIC `i` has a working host path.
    fn set_link(&self, i: usize, up: bool) {
        let Some(r) = *lock(&self.nics[i].ring) else {
            return;
        };
        let flags = GuestAddress(r.gpa + 20);
        let now = self.mem.load::<u32>(flags, Ordering::Acquire).unwrap_or(0);
        let next = if up { now | LINK_UP } else { now & !LINK_UP };
        let _ = self.mem.store(next, flags, Ordering::Release);
    }

    fn mark_broken(&self, i: usize, r: &mut RingState, why: &str) {
        let n = &self.nics[i];
        bump(&n.stats.ring_errors, 1);
        r.broken = true;
        tracing::warn!(
            nic = i,
            "guest network ring is corrupt ({why}): NIC stopped"
        );
        let flags = GuestAddress(r.gpa + 20);
        let link = self.mem.load::<u32>(flags, Ordering::Acquire).unwrap_or(0) & LINK_UP;
        let _ = self.mem.store(RING_BROKEN | link, flags, Ordering::Release);
    }

    fn serve_tx(&self, i: usize) {
        let n = &self.nics[i];
        let mut guard = lock(&n.ring);
        let Some(r) = guard.as_mut().filter(|r| !r.broken) else {
            return;
        };
        let Ok(producer) = self.mem.load::<u32>(GuestAddress(r.gpa), Ordering::Acquire) else {
            return;
        };
        let pending = producer.wrapping_sub(r.tx_consumer);
        if pending == 0 {
            return;
        }
        if pending > r.tx_entries {
            self.mark_broken(i, r, "TX producer more than a ring ahead");
            return;
        }
        let max = u32::from(n.mtu) + FRAME_OVERHEAD;
        for k in 0..pending {
            let slot = r.tx_consumer.wrapping_add(k) % r.tx_entries;
            let at = GuestAddress(r.gpa + abi_net::tx_desc(slot));
            let Ok(d) = self.mem.read_obj::<NetDesc>(at) else {
                self.mark_broken(i, r, "unreadable TX descriptor");
                return;
            };
            if d.len < 14 || d.len > max || !self.writable(d.addr, u64::from(d.len)) {
                self.mark_broken(i, r, "bad TX descriptor");
                return;
            }
            let mut frame = vec![0u8; d.len as usize];
            if self
                .mem
                .read_slice(&mut frame, GuestAddress(d.addr))
                .is_err()
            {
                self.mark_broken(i, r, "unreadable TX buffer");
                return;
            }
            self.emit(i, frame);
        }
        r.tx_consumer = producer;
        let _ = self
            .mem
            .store(producer, GuestAddress(r.gpa + 4), Ordering::Release);
        // A guest that filled its TX ring may be blocked waiting for room.
        if pending == r.tx_entries {
            drop(guard);
            self.wake(i);
        }
    }

    /// A frame the guest sent: held for its checkpoint, or out now.
    fn emit(&self, i: usize, frame: Vec<u8>) {
        let mut h = lock(&self.held);
        if h.holding {
            if h.bytes + frame.len() as u64 > HELD_LIMIT {
                bump(&self.nics[i].stats.held_dropped, 1);
                return;
            }
            let first = h.open.is_empty();
            h.bytes += frame.len() as u64;
            h.open.push((i, frame));
            drop(h);
            if first && let Some(f) = lock(&self.pending).as_ref() {
                f();
            }
            return;
        }
        drop(h);
        self.send_now(i, &frame);
    }

    /// Sends a frame output commit does not hold, noting its ACK for a successor.
    fn send_now(&self, i: usize, frame: &[u8]) {
        if self.send(i, frame) && lock(&self.journal).is_some() {
            let mut a = lock(&self.last_acks);
            a.0.note(i, frame);
            a.1 = true;
        }
    }

    /// Hands a frame to NIC `i`'s backend; whether it took it.
    fn send(&self, i: usize, frame: &[u8]) -> bool {
        let n = &self.nics[i];
        match lock(&n.backend).send(frame) {
            Ok(()) => {
                bump(&n.stats.tx_frames, 1);
                bump(&n.stats.tx_bytes, frame.len() as u64);
                true
            }
            Err(_) => {
                bump(&n.stats.tx_dropped, 1);
                false
            }
        }
    }

    /// Delivers the frames a rollback asked to deliver again.
    fn replay(&self) {
        let frames = std::mem::take(&mut lock(&self.rx_log).replay);
        if frames.is_empty() {
            return;
        }
        let mut woken = vec![false; self.nics.len()];
        for (i, f) in frames {
            if self.deliver(i, &f) {
                woken[i] = true;
            }
        }
        for (i, w) in woken.into_iter().enumerate() {
            if w {
                self.wake(i);
            }
        }
    }

    fn serve_rx(&self, i: usize, buf: &mut [u8]) {
        let n = &self.nics[i];
        let mut delivered = 0u32;
        for _ in 0..RX_BATCH {
            let len = match lock(&n.backend).recv(buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(nic = i, "network backend receive: {e}");
                    break;
                }
            };
            if self.deliver(i, &buf[..len]) {
                delivered += 1;
            }
        }
        if delivered > 0 {
            self.wake(i);
        }
    }

    /// Copies one received frame into the next posted buffer; whether it was delivered.
    fn deliver(&self, i: usize, frame: &[u8]) -> bool {
        let n = &self.nics[i];
        let mut guard = lock(&n.ring);
        let Some(r) = guard.as_mut().filter(|r| !r.broken) else {
            bump(&n.stats.rx_no_buffer, 1);
            return false;
        };
        if frame.len() > (u32::from(n.mtu) + FRAME_OVERHEAD) as usize {
            bump(&n.stats.rx_too_big, 1);
            return false;
        }
        if frame.len() < 14 {
            // Not even an Ethernet header: nothing a guest could use.
            bump(&n.stats.rx_runts, 1);
            return false;
        }
        let Ok(producer) = self
            .mem
            .load::<u32>(GuestAddress(r.gpa + 8), Ordering::Acquire)
        else {
            return false;
        };
        let posted = producer.wrapping_sub(r.rx_consumer);
        if posted > r.rx_entries {
            self.mark_broken(i, r, "RX producer more than a ring ahead");
            return false;
        }
        if posted == 0 {
            bump(&n.stats.rx_no_buffer, 1);
            return false;
        }
        let slot = r.rx_consumer % r.rx_entries;
        let at = GuestAddress(r.gpa + abi_net::rx_desc(r.tx_entries, slot));
        let Ok(d) = self.mem.read_obj::<NetDesc>(at) else {
            self.mark_broken(i, r, "unreadable RX descriptor");
            return false;
        };
        if !self.writable(d.addr, u64::from(d.len)) {
            self.mark_broken(i, r, "bad RX descriptor");
            return false;
        }
        if frame.len() > d.len as usize {
            bump(&n.stats.rx_too_big, 1);
            return false;
        }
        // Recorded before the guest can see it: a successor replays what this VMM delivered
        // after the checkpoint it recovers to.
        if lock(&self.rx_log).logging
            && let Some(j) = lock(&self.journal).as_mut()
            && let Err(e) = j.append(i, frame)
        {
            tracing::warn!("cannot record a received frame: {e}");
        }
        if self.mem.write_slice(frame, GuestAddress(d.addr)).is_err() {
            return false;
        }
        let filled = NetDesc {
            addr: d.addr,
            len: frame.len() as u32,
            flags: 0,
        };
        if self.mem.write_obj(filled, at).is_err() {
            return false;
        }
        r.rx_consumer = r.rx_consumer.wrapping_add(1);
        let _ = self
            .mem
            .store(r.rx_consumer, GuestAddress(r.gpa + 12), Ordering::Release);
        drop(guard);
        let mut log = lock(&self.rx_log);
        if log.logging && !log.overflowed {
            if log.bytes + frame.len() as u64 > RX_LOG_LIMIT {
                log.overflowed = true;
            } else {
                log.bytes += frame.len() as u64;
                log.open.push((i, frame.to_vec()));
            }
        }
        bump(&n.stats.rx_frames, 1);
        bump(&n.stats.rx_bytes, frame.len() as u64);
        true
    }

    /// Wakes NIC `i`'s vCPU if the guest said it is idle (one wake-up per batch). The NIC's
    /// indicator (ABI 1.10) is set first, busy or idle: a guest that dispatches on indicators
    /// looks at the NIC only when its bit is set.
    fn wake(&self, i: usize) {
        let n = &self.nics[i];
        let Some(r) = *lock(&n.ring) else { return };
        if let Some(slot) = indicator::slot(indicator::KIND_NET, i as u64) {
            self.notify.indicate(None, slot);
        }
        let idle = GuestAddress(r.gpa + 16);
        if self.mem.load::<u32>(idle, Ordering::Acquire).unwrap_or(0) != 0 {
            let _ = self.mem.store(0u32, idle, Ordering::Release);
            bump(&n.stats.wakeups, 1);
            self.notify.notify(r.wake_vcpu);
        }
    }
}

impl<M: GuestMemory + Send + Sync + 'static> HeldOutput for Nics<M> {
    fn hold(&self, epoch: u64) {
        lock(&self.held).holding = true;
        lock(&self.rx_log).logging = true;
        if let Some(j) = lock(&self.journal).as_mut() {
            j.sealed(epoch);
        }
    }

    fn pass_through(&self) -> io::Result<()> {
        // Nothing can roll back any more: received frames need not be kept.
        *lock(&self.rx_log) = RxLog::default();
        let frames = {
            let mut h = lock(&self.held);
            h.holding = false;
            h.bytes = 0;
            let sealed = std::mem::take(&mut h.sealed);
            let open = std::mem::take(&mut h.open);
            sealed
                .into_values()
                .flatten()
                .chain(open)
                .collect::<Vec<_>>()
        };
        for (i, f) in frames {
            self.send_now(i, &f);
        }
        Ok(())
    }

    fn seal(&self, epoch: u64) {
        let mut h = lock(&self.held);
        let open = std::mem::take(&mut h.open);
        if !open.is_empty() {
            h.sealed.entry(epoch).or_default().extend(open);
        }
        drop(h);
        if let Some(j) = lock(&self.journal).as_mut() {
            j.sealed(epoch);
        }
        // Frames received before checkpoint `epoch` are in its memory: kept until it commits.
        let mut log = lock(&self.rx_log);
        let open = std::mem::take(&mut log.open);
        if !open.is_empty() {
            log.sealed.entry(epoch).or_default().extend(open);
        }
    }

    fn release(&self, epoch: u64) -> io::Result<()> {
        let ready = {
            let mut h = lock(&self.held);
            let later = h.sealed.split_off(&(epoch + 1));
            let ready = std::mem::replace(&mut h.sealed, later);
            let bytes: u64 = ready.values().flatten().map(|(_, f)| f.len() as u64).sum();
            h.bytes -= bytes;
            ready
        };
        let ready: Vec<(usize, Vec<u8>)> = ready.into_values().flatten().collect();
        // Write-ahead: the connections' last ACKs are on disk before the frames that carry
        // them leave, so a VMM killed right after sending kicks with current numbers (a
        // stale ACK makes the peer wait for its retransmission timeout instead).
        if let Some(j) = lock(&self.journal).as_mut() {
            let mut a = lock(&self.last_acks);
            for (i, f) in &ready {
                a.0.note(*i, f);
            }
            if (!ready.is_empty() || a.1)
                && let Err(e) = j.save_acks(&a.0.encode())
            {
                tracing::warn!("cannot record the connections' last ACKs: {e}");
            }
            a.1 = false;
        }
        for (i, f) in ready {
            self.send(i, &f);
        }
        let mut log = lock(&self.rx_log);
        let later = log.sealed.split_off(&(epoch + 1));
        let done = std::mem::replace(&mut log.sealed, later);
        let freed: u64 = done.values().flatten().map(|(_, f)| f.len() as u64).sum();
        log.bytes = log.bytes.saturating_sub(freed);
        if log.sealed.is_empty() && log.open.is_empty() {
            log.bytes = 0;
            log.overflowed = false;
        }
        drop(log);
        if let Some(j) = lock(&self.journal).as_mut()
            && let Err(e) = j.committed(epoch)
        {
            tracing::warn!("cannot compact the received-frame journal: {e}");
        }
        Ok(())
    }

    fn discard_after(&self, epoch: u64) {
        let mut h = lock(&self.held);
        let later = h.sealed.split_off(&(epoch + 1));
        let open = std::mem::take(&mut h.open);
        let dropped: u64 = later
            .values()
            .flatten()
            .chain(open.iter())
            .map(|(_, f)| f.len() as u64)
            .sum();
        h.bytes -= dropped;
        drop(h);
        // What arrived after checkpoint `epoch` arrives again (the rolled-back guest lost it).
        let mut log = lock(&self.rx_log);
        let later = log.sealed.split_off(&(epoch + 1));
        let open = std::mem::take(&mut log.open);
        let overflowed = std::mem::take(&mut log.overflowed);
        log.bytes = log
            .sealed
            .values()
            .flatten()
            .map(|(_, f)| f.len() as u64)
            .sum();
        if !overflowed {
            log.replay = later.into_values().flatten().chain(open).collect();
        }
        drop(log);
        // The device thread delivers them as soon as the VM runs again.
        let _ = self.doorbell.write(1);
    }

    fn discard_held(&self) {
        let mut h = lock(&self.held);
        h.sealed.clear();
        h.open.clear();
        h.bytes = 0;
        // Going back to a point before anything held (an earlier snapshot): what arrived
        // since cannot be told apart, so nothing is replayed.
        let logging = lock(&self.rx_log).logging;
        *lock(&self.rx_log) = RxLog {
            logging,
            ..RxLog::default()
        };
    }

    fn on_pending(&self, f: Option<Box<dyn Fn() + Send + Sync>>) {
        *lock(&self.pending) = f;
    }

    fn has_pending(&self) -> bool {
        let h = lock(&self.held);
        !h.open.is_empty()
    }
}

impl<M: GuestMemory + Send + Sync + 'static> rebound_snapshot::Snapshottable for Nics<M> {
    type State = NetState;
    type Error = NetStateError;
    const VERSION: u32 = 1;

    /// Call with the device paused.
    fn save(&self) -> Result<NetState, NetStateError> {
        Ok(NetState {
            nics: self
                .nics
                .iter()
                .map(|n| NicState {
                    mac: n.mac,
                    mtu: n.mtu,
                    ring: *lock(&n.ring),
                    host: n.host.clone(),
                })
                .collect(),
        })
    }

    fn check(&self, state: &NetState) -> Result<(), NetStateError> {
        if state.nics.len() != self.nics.len() {
            return Err(NetStateError::NicCount {
                found: state.nics.len(),
                expected: self.nics.len(),
            });
        }
        for (index, (s, n)) in state.nics.iter().zip(&self.nics).enumerate() {
            if (s.mac, s.mtu) != (n.mac, n.mtu) {
                return Err(NetStateError::Nic {
                    index,
                    saved: format!("{} mtu {}", mac_string(s.mac), s.mtu),
                    now: format!("{} mtu {}", mac_string(n.mac), n.mtu),
                });
            }
        }
        if state
            .nics
            .iter()
            .filter_map(|n| n.ring.as_ref())
            .any(|r| !self.ring_ok(r))
        {
            return Err(NetStateError::BadRing);
        }
        Ok(())
    }

    /// Call with the device paused.
    fn restore(&self, state: NetState) -> Result<(), NetStateError> {
        self.check(&state)?;
        for (n, s) in self.nics.iter().zip(state.nics) {
            *lock(&n.ring) = s.ring;
        }
        Ok(())
    }
}

/// Frames as datagrams over a Unix socket: one end is the NIC's backend, the other a host
/// program that speaks Ethernet frames (tests, tools). Non-blocking.
pub struct DatagramBackend {
    sock: std::os::unix::net::UnixDatagram,
    name: String,
}

impl DatagramBackend {
    /// A backend over `sock` (made non-blocking), described as `name`.
    pub fn new(sock: std::os::unix::net::UnixDatagram, name: &str) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(Self {
            sock,
            name: name.to_string(),
        })
    }
}

impl Backend for DatagramBackend {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sock.send(frame).map(|_| ())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }

    fn buffered(&self) -> bool {
        false
    }

    fn service(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn link_up(&self) -> bool {
        true
    }

    fn failovers(&self) -> u64 {
        0
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::AtomicU32;
    use std::thread;
    use std::time::Duration;

    use rebound_abi::net::NetRingHeader;
    use vm_memory::GuestMemoryMmap;

    use super::*;

    #[derive(Default)]
    struct Counter(AtomicU32);
    impl Notify for Counter {
        fn notify(&self, _vcpu: u32) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    const AREA: u64 = 0x1000;
    const TX: u32 = 8;
    const RX: u32 = 8;
    const BUFS: u64 = 0x10_000;

    struct Rig {
        nics: Arc<Nics<GuestMemoryMmap>>,
        mem: GuestMemoryMmap,
        peer: UnixDatagram,
        woken: Arc<Counter>,
        thread: Option<thread::JoinHandle<()>>,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            self.nics.stop();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn rig() -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (a, peer) = UnixDatagram::pair().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let woken = Arc::new(Counter::default());
        let spec = NicSpec {
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            backend: Box::new(DatagramBackend::new(a, "test").unwrap()),
            host: String::new(),
        };
        let nics = Arc::new(
            Nics::new(mem.clone(), 0x1000..1 << 20, 1, vec![spec], woken.clone()).unwrap(),
        );
        assert_eq!(nics.register(0, AREA, TX.into(), RX.into(), 0), 0);
        let n = nics.clone();
        let thread = Some(thread::spawn(move || n.run().unwrap()));
        Rig {
            nics,
            mem,
            peer,
            woken,
            thread,
        }
    }

    fn header(mem: &GuestMemoryMmap) -> NetRingHeader {
        mem.read_obj(GuestAddress(AREA)).unwrap()
    }

    fn send_frame(r: &Rig, idx: u32, frame: &[u8]) {
        let buf = BUFS + u64::from(idx % TX) * 2048;
        r.mem.write_slice(frame, GuestAddress(buf)).unwrap();
        let d = NetDesc {
            addr: buf,
            len: frame.len() as u32,
            flags: 0,
        };
        r.mem
            .write_obj(d, GuestAddress(AREA + abi_net::tx_desc(idx % TX)))
            .unwrap();
        r.mem
            .store(idx + 1, GuestAddress(AREA), Ordering::Release)
            .unwrap();
    }

    fn post_buffers(r: &Rig, from: u32, n: u32) {
        for idx in from..from + n {
            let d = NetDesc {
                addr: BUFS + 0x8000 + u64::from(idx % RX) * 2048,
                len: 2048,
                flags: 0,
            };
            r.mem
                .write_obj(d, GuestAddress(AREA + abi_net::rx_desc(TX, idx % RX)))
                .unwrap();
        }
        r.mem
            .store(from + n, GuestAddress(AREA + 8), Ordering::Release)
            .unwrap();
    }

    fn wait(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if f() {
                return;
            }
            thread::sleep(Duration::from_millis(1));
        }
        panic!("timed out waiting for {what}");
    }

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        let mut f = vec![tag; len];
        f[..6].copy_from_slice(&[0xff; 6]);
        f
    }

    #[test]
    fn frames_go_out_and_come_in_through_the_rings() {
        let r = rig();
        for i in 0..3 {
            send_frame(&r, i, &frame(i as u8 + 1, 60 + i as usize));
        }
        r.nics.doorbell().write(1).unwrap();
        let mut got = [0u8; 2048];
        for i in 0..3 {
            let n = r.peer.recv(&mut got).unwrap();
            assert_eq!(&got[..n], &frame(i + 1, 60 + i as usize)[..]);
        }
        wait("the TX consumer", || header(&r.mem).tx_consumer == 3);
        // Nothing posted: a frame that arrives is dropped and counted.
        r.peer.send(&frame(9, 64)).unwrap();
        wait("the drop", || r.nics.stats()[0].rx_no_buffer == 1);
        // Posted, and the guest said it is idle: delivered, one wake-up for the batch.
        post_buffers(&r, 0, 4);
        r.mem
            .store(1u32, GuestAddress(AREA + 16), Ordering::Release)
            .unwrap();
        for i in 0..2 {
            r.peer.send(&frame(20 + i, 100)).unwrap();
        }
        wait("delivery", || header(&r.mem).rx_consumer == 2);
        let d: NetDesc = r
            .mem
            .read_obj(GuestAddress(AREA + abi_net::rx_desc(TX, 0)))
            .unwrap();
        assert_eq!(d.len, 100);
        let mut b = vec![0u8; 100];
        r.mem.read_slice(&mut b, GuestAddress(d.addr)).unwrap();
        assert_eq!(b, frame(20, 100));
        wait("the wake-up", || r.woken.0.load(Ordering::SeqCst) >= 1);
        assert_eq!(header(&r.mem).rx_idle, 0, "cleared by the wake-up");
        let s = &r.nics.stats()[0];
        assert_eq!((s.tx_frames, s.rx_frames, s.ring_errors), (3, 2, 0));
    }

    #[test]
    fn hostile_descriptors_break_only_that_nic() {
        let r = rig();
        // A buffer in memory the guest may not name.
        r.mem
            .write_obj(
                NetDesc {
                    addr: 0x10,
                    len: 64,
                    flags: 0,
                },
                GuestAddress(AREA + abi_net::tx_desc(0)),
            )
            .unwrap();
        r.mem
            .store(1u32, GuestAddress(AREA), Ordering::Release)
            .unwrap();
        r.nics.doorbell().write(1).unwrap();
        wait("the ring error", || r.nics.stats()[0].ring_errors == 1);
        assert_eq!(header(&r.mem).flags & RING_BROKEN, RING_BROKEN);
        // A broken NIC is left alone; setting it up again revives it.
        send_frame(&r, 1, &frame(1, 64));
        r.nics.doorbell().write(1).unwrap();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(r.nics.stats()[0].tx_frames, 0);
        assert_eq!(r.nics.register(0, AREA, TX.into(), RX.into(), 0), 0);
        send_frame(&r, 2, &frame(2, 64));
        r.nics.doorbell().write(1).unwrap();
        let mut got = [0u8; 128];
        assert_eq!(r.peer.recv(&mut got).unwrap(), 64);
        // A producer more than a ring ahead.
        r.mem
            .store(1000u32, GuestAddress(AREA), Ordering::Release)
            .unwrap();
        r.nics.doorbell().write(1).unwrap();
        wait("the second ring error", || {
            r.nics.stats()[0].ring_errors == 2
        });
        // Bad setups are refused.
        assert_eq!(r.nics.register(1, AREA, 8, 8, 0), errno::ENODEV);
        assert_eq!(r.nics.register(0, AREA, 6, 8, 0), errno::EINVAL);
        assert_eq!(r.nics.register(0, AREA, 8, 8, 5), errno::EINVAL);
        assert_eq!(r.nics.register(0, 0x10, 8, 8, 0), errno::EFAULT);
        assert_eq!(r.nics.register(0, (1 << 20) - 64, 8, 8, 0), errno::EFAULT);
    }

    #[test]
    fn a_rollback_delivers_again_what_arrived_after_its_checkpoint() {
        use rebound_snapshot::Snapshottable;
        let r = rig();
        r.nics.hold(0);
        post_buffers(&r, 0, 8);
        r.peer.send(&frame(1, 80)).unwrap();
        wait("the first frame", || header(&r.mem).rx_consumer == 1);
        // Checkpoint 1: the device's state as the VM's memory has it.
        r.nics.pause();
        let saved = r.nics.save().unwrap();
        r.nics.seal(1);
        r.nics.resume();
        r.peer.send(&frame(2, 90)).unwrap();
        wait("the second frame", || header(&r.mem).rx_consumer == 2);
        // Back to checkpoint 1: the guest's ring is as it was (memory rolled back).
        r.nics.pause();
        r.mem
            .store(1u32, GuestAddress(AREA + 12), Ordering::Release)
            .unwrap();
        r.nics.restore(saved).unwrap();
        r.nics.discard_after(1);
        r.nics.resume();
        wait("the frame delivered again", || {
            header(&r.mem).rx_consumer == 2
        });
        let d: NetDesc = r
            .mem
            .read_obj(GuestAddress(AREA + abi_net::rx_desc(TX, 1)))
            .unwrap();
        let mut b = vec![0u8; d.len as usize];
        r.mem.read_slice(&mut b, GuestAddress(d.addr)).unwrap();
        assert_eq!(b, frame(2, 90));
        assert_eq!(r.nics.stats()[0].rx_frames, 3, "the second frame twice");
        // Once checkpoint 1 commits, frame 1 is no longer kept; frame 2 (after it) is.
        r.nics.release(1).unwrap();
    }

    #[test]
    fn held_frames_wait_for_their_checkpoint() {
        let r = rig();
        let asked = Arc::new(AtomicU32::new(0));
        let a = asked.clone();
        r.nics.on_pending(Some(Box::new(move || {
            a.fetch_add(1, Ordering::SeqCst);
        })));
        r.nics.hold(0);
        send_frame(&r, 0, &frame(1, 64));
        r.nics.doorbell().write(1).unwrap();
        wait("the frame to be held", || r.nics.has_pending());
        assert_eq!(asked.load(Ordering::SeqCst), 1, "a checkpoint is asked for");
        r.nics.seal(1);
        send_frame(&r, 1, &frame(2, 64));
        r.nics.doorbell().write(1).unwrap();
        wait("the second frame", || r.nics.held_bytes() == 128);
        r.nics.seal(2);
        r.peer.set_nonblocking(true).unwrap();
        let mut got = [0u8; 128];
        assert!(
            r.peer.recv(&mut got).is_err(),
            "nothing out before a commit"
        );
        // Epoch 2 is rolled back; epoch 1 commits.
        r.nics.discard_after(1);
        r.nics.release(1).unwrap();
        r.peer.set_nonblocking(false).unwrap();
        assert_eq!(r.peer.recv(&mut got).unwrap(), 64);
        assert_eq!(got[6], 1);
        r.peer.set_nonblocking(true).unwrap();
        assert!(
            r.peer.recv(&mut got).is_err(),
            "the rolled-back frame never goes out"
        );
        assert_eq!(r.nics.held_bytes(), 0);
        // Without holding, frames go out at once.
        r.nics.pass_through().unwrap();
        send_frame(&r, 2, &frame(3, 64));
        r.nics.doorbell().write(1).unwrap();
        r.peer.set_nonblocking(false).unwrap();
        assert_eq!(r.peer.recv(&mut got).unwrap(), 64);
    }
}
