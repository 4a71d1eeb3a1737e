//! The asynchronous I/O queue: one ring per vCPU in guest memory, served by one VMM thread.
//!
//! The guest writes requests and rings a doorbell port that the VMM bound to an ioeventfd, so
//! submitting does not exit to the VMM. This thread performs each request (disk read, write,
//! flush, or a timer) and completes it by storing the result into the request's completion
//! indicator in guest memory. No interrupt is ever injected: the guest's dispatcher sees the
//! indicator the next time it looks, and a vCPU blocked in `BLOCK` is woken through [`Notify`].
//!
//! Everything read from the ring is hostile: each request is validated (op, alignment, range,
//! buffer inside guest-writable memory) and a bad one completes with a negative errno or, if
//! even its indicator is unusable, is dropped and counted.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rebound_abi::io::{self as abi_io, IoRequest};
use rebound_abi::{completion, errno, indicator};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::Notify;
use crate::held_disk::{HeldDisk, WriteError};

/// Errors setting up or running the I/O queue (not guest errors: those become errno results).
#[derive(Debug, thiserror::Error)]
pub enum IoqError {
    /// An eventfd, timerfd or epoll call failed.
    #[error("I/O queue event setup failed: {0}")]
    Event(#[source] io::Error),
}

/// Counters of what the queue did, readable while it runs.
#[derive(Default)]
pub struct IoStats {
    doorbells: AtomicU64,
    requests: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    timers: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    ring_errors: AtomicU64,
}

/// A copy of [`IoStats`] for reporting.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct IoStatsSnapshot {
    /// Times the worker woke for a doorbell.
    pub doorbells: u64,
    /// Requests taken from rings.
    pub requests: u64,
    /// Disk reads completed.
    pub reads: u64,
    /// Disk writes completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Timers completed.
    pub timers: u64,
    /// Bytes read from disk into the guest.
    pub bytes_read: u64,
    /// Bytes written from the guest to disk.
    pub bytes_written: u64,
    /// Requests completed with a negative errno.
    pub errors: u64,
    /// Requests dropped because their completion indicator was unusable.
    pub dropped: u64,
    /// Times a ring's producer index was impossible (more pending than entries).
    pub ring_errors: u64,
}

impl IoStats {
    /// Current values.
    pub fn snapshot(&self) -> IoStatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IoStatsSnapshot {
            doorbells: g(&self.doorbells),
            requests: g(&self.requests),
            reads: g(&self.reads),
            writes: g(&self.writes),
            flushes: g(&self.flushes),
            timers: g(&self.timers),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            errors: g(&self.errors),
            dropped: g(&self.dropped),
            ring_errors: g(&self.ring_errors),
        }
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
struct Ring {
    gpa: u64,
    entries: u32,
    /// The VMM's own count of consumed requests; the copy in guest memory is only for the guest.
    consumer: u32,
}

/// The I/O queue's saved state: registered rings and pending timers. Taken while the worker is
/// paused, so every request it consumed is complete except timers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct IoqState {
    rings: Vec<Option<Ring>>,
    /// (vCPU, completion address, nanoseconds left).
    timers: Vec<(u32, u64, u64)>,
}

#[derive(Default)]
struct Gate {
    pause_requested: bool,
    parked: bool,
    stopping: bool,
}

/// Most timers a VM may have pending; more complete at once with `EBUSY`, so a guest cannot
/// grow the VMM's memory without bound.
pub const MAX_PENDING_TIMERS: usize = 65_536;

/// A pending timer: deadline, sequence (FIFO among equal deadlines), vCPU, indicator address.
type Timer = Reverse<(Instant, u64, u32, u64)>;

/// The I/O queue device of one VM.
pub struct IoQueue<M> {
    mem: M,
    writable: Range<u64>,
    disk: Option<Arc<HeldDisk>>,
    rings: Mutex<Vec<Option<Ring>>>,
    doorbell: EventFd,
    notify: Arc<dyn Notify>,
    stats: IoStats,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    running: AtomicBool,
    /// Timers the worker holds, published when it parks (for `save`) and installed from a
    /// restore (taken by the worker when it next runs).
    timer_state: Mutex<Vec<(u32, u64, u64)>>,
    timers_restored: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<M: GuestMemory + Send + Sync + 'static> IoQueue<M> {
    /// A queue for `vcpus` rings over `mem`. The VMM only ever writes guest memory inside
    /// `writable` on the guest's behalf.
    pub fn new(
        mem: M,
        writable: Range<u64>,
        vcpus: u32,
        disk: Option<Arc<HeldDisk>>,
        notify: Arc<dyn Notify>,
    ) -> Result<Self, IoqError> {
        Ok(Self {
            mem,
            writable,
            disk,
            rings: Mutex::new(vec![None; vcpus as usize]),
            doorbell: EventFd::new(libc::EFD_NONBLOCK).map_err(IoqError::Event)?,
            notify,
            stats: IoStats::default(),
            gate: Mutex::new(Gate::default()),
            gate_cv: Condvar::new(),
            running: AtomicBool::new(false),
            timer_state: Mutex::new(Vec::new()),
            timers_restored: AtomicBool::new(false),
        })
    }

    /// The doorbell the VMM binds to the guest's doorbell port (as an ioeventfd).
    pub fn doorbell(&self) -> &EventFd {
        &self.doorbell
    }

    /// Counters.
    pub fn stats(&self) -> &IoStats {
        &self.stats
    }

    /// Size of the disk, 0 if none.
    pub fn disk_size(&self) -> u64 {
        self.disk.as_ref().map_or(0, |d| d.size())
    }

    fn writable(&self, addr: u64, len: u64) -> bool {
        addr >= self.writable.start
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= self.writable.end)
    }

    /// The `IO_SETUP` hypercall: registers `vcpu`'s ring. Returns 0 or a negative errno.
    pub fn register(&self, vcpu: u32, gpa: u64, entries: u64) -> i64 {
        if entries == 0 || entries > u64::from(abi_io::MAX_ENTRIES) || !entries.is_power_of_two() {
            return errno::EINVAL;
        }
        let entries = entries as u32;
        if !gpa.is_multiple_of(8) {
            return errno::EINVAL;
        }
        if !self.writable(gpa, abi_io::ring_size(entries)) {
            return errno::EFAULT;
        }
        let mut rings = lock(&self.rings);
        let Some(slot) = rings.get_mut(vcpu as usize) else {
            return errno::EINVAL;
        };
        if slot.is_some() {
            return errno::EBUSY;
        }
        // Start from the guest's current producer so stale memory is not replayed.
        let producer: u32 = self
            .mem
            .load(GuestAddress(gpa), Ordering::Acquire)
            .unwrap_or(0);
        if self
            .mem
            .store(producer, GuestAddress(gpa + 4), Ordering::Release)
            .is_err()
        {
            return errno::EFAULT;
        }
        *slot = Some(Ring {
            gpa,
            entries,
            consumer: producer,
        });
        0
    }

    /// Stops serving rings until [`resume`](Self::resume); returns once the worker is idle, so
    /// guest memory is no longer touched by this device.
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

    /// Serves rings again.
    pub fn resume(&self) {
        lock(&self.gate).pause_requested = false;
        self.gate_cv.notify_all();
    }

    /// Records the timers the worker holds while it is not running (a queue restored before its
    /// worker starts). Used by `restore`.
    fn install_timers(&self, timers: Vec<(u32, u64, u64)>) {
        *lock(&self.timer_state) = timers;
        self.timers_restored.store(true, Ordering::Release);
        // Wake the worker so it picks them up (and arms its timerfd) even if the guest is idle.
        let _ = self.doorbell.write(1);
    }

    /// Asks the worker to exit (the owner joins its thread).
    pub fn stop(&self) {
        let mut g = lock(&self.gate);
        g.stopping = true;
        g.pause_requested = false;
        drop(g);
        self.gate_cv.notify_all();
        let _ = self.doorbell.write(1);
    }

    /// The worker loop: run it on a thread of its own until [`stop`](Self::stop).
    pub fn run(&self) -> Result<(), IoqError> {
        const DOORBELL: u64 = 1;
        const TIMER: u64 = 2;
        let epoll = Epoll::new().map_err(IoqError::Event)?;
        let mut timerfd = TimerFd::new().map_err(|e| IoqError::Event(e.into()))?;
        epoll
            .ctl(
                ControlOperation::Add,
                self.doorbell.as_raw_fd(),
                EpollEvent::new(EventSet::IN, DOORBELL),
            )
            .map_err(IoqError::Event)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timerfd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER),
            )
            .map_err(IoqError::Event)?;
        self.running.store(true, Ordering::Release);
        let mut timers: BinaryHeap<Timer> = BinaryHeap::new();
        let mut seq = 0u64;
        let mut events = [EpollEvent::default(); 2];
        loop {
            match epoll.wait(-1, &mut events) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(IoqError::Event(e)),
            }
            if let Ok(n) = self.doorbell.read() {
                bump(&self.stats.doorbells, n);
            }
            {
                let mut g = lock(&self.gate);
                // Timers restored before this worker started (or while it was running) come first,
                // or parking would publish (and save) the old list in their place.
                self.adopt_restored_timers(&mut timers, &mut seq);
                if g.pause_requested && !g.stopping {
                    let now = Instant::now();
                    *lock(&self.timer_state) = timers
                        .iter()
                        .map(|Reverse((d, _, v, ind))| {
                            (*v, *ind, d.saturating_duration_since(now).as_nanos() as u64)
                        })
                        .collect();
                    g.parked = true;
                    self.gate_cv.notify_all();
                    while g.pause_requested && !g.stopping {
                        g = self.gate_cv.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    g.parked = false;
                }
                // A restore while parked (a rollback) replaces the list.
                self.adopt_restored_timers(&mut timers, &mut seq);
                if g.stopping {
                    self.gate_cv.notify_all();
                    return Ok(());
                }
            }
            let vcpus = lock(&self.rings).len() as u32;
            for vcpu in 0..vcpus {
                self.serve_ring(vcpu, &mut timers, &mut seq);
            }
            let now = Instant::now();
            let mut woken = Vec::new();
            while let Some(Reverse((deadline, _, vcpu, ind))) = timers.peek().copied() {
                if deadline > now {
                    break;
                }
                timers.pop();
                bump(&self.stats.timers, 1);
                self.complete(ind, 0);
                woken.push(vcpu);
            }
            woken.dedup();
            for v in woken {
                self.indicate(v);
                self.notify.notify(v);
            }
            match timers.peek() {
                Some(Reverse((deadline, ..))) => {
                    // A zero duration disarms a timerfd; never ask for less than 1 ns.
                    let d = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_nanos(1));
                    timerfd
                        .reset(d, None)
                        .map_err(|e| IoqError::Event(e.into()))?;
                }
                None => timerfd.clear().map_err(|e| IoqError::Event(e.into()))?,
            }
        }
    }

    fn adopt_restored_timers(&self, timers: &mut BinaryHeap<Timer>, seq: &mut u64) {
        if self.timers_restored.swap(false, Ordering::AcqRel) {
            let now = Instant::now();
            timers.clear();
            for &(v, ind, left) in lock(&self.timer_state).iter() {
                *seq += 1;
                timers.push(Reverse((now + Duration::from_nanos(left), *seq, v, ind)));
            }
        }
    }

    fn serve_ring(&self, vcpu: u32, timers: &mut BinaryHeap<Timer>, seq: &mut u64) {
        let Some(ring) = lock(&self.rings)[vcpu as usize] else {
            return;
        };
        let Ok(producer) = self
            .mem
            .load::<u32>(GuestAddress(ring.gpa), Ordering::Acquire)
        else {
            return;
        };
        let pending = producer.wrapping_sub(ring.consumer);
        if pending == 0 {
            return;
        }
        let mut completed = 0;
        if pending > ring.entries {
            // An impossible producer: replaying old slots would redo I/O, so skip to it.
            bump(&self.stats.ring_errors, 1);
            tracing::warn!(
                vcpu,
                producer,
                consumer = ring.consumer,
                "I/O ring producer index is corrupt"
            );
        } else {
            for i in 0..pending {
                let slot = ring.consumer.wrapping_add(i) % ring.entries;
                let at = ring.gpa + abi_io::HEADER_SIZE + u64::from(slot) * abi_io::REQUEST_SIZE;
                let Ok(req) = self.mem.read_obj::<IoRequest>(GuestAddress(at)) else {
                    bump(&self.stats.dropped, 1);
                    continue;
                };
                bump(&self.stats.requests, 1);
                if req.completion % 8 != 0 || !self.writable(req.completion, 8) {
                    bump(&self.stats.dropped, 1);
                    continue;
                }
                if req.op == abi_io::OP_TIMER {
                    if timers.len() >= MAX_PENDING_TIMERS {
                        bump(&self.stats.errors, 1);
                        self.complete(req.completion, errno::EBUSY as i32);
                        completed += 1;
                        continue;
                    }
                    *seq += 1;
                    let deadline = Instant::now()
                        .checked_add(Duration::from_nanos(req.offset))
                        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
                    timers.push(Reverse((deadline, *seq, vcpu, req.completion)));
                    continue;
                }
                let result = self.execute(&req);
                if result < 0 {
                    bump(&self.stats.errors, 1);
                }
                self.complete(req.completion, result);
                completed += 1;
            }
        }
        let consumer = producer;
        if let Some(Some(r)) = lock(&self.rings).get_mut(vcpu as usize) {
            r.consumer = consumer;
        }
        let _ = self
            .mem
            .store(consumer, GuestAddress(ring.gpa + 4), Ordering::Release);
        if completed > 0 {
            self.indicate(vcpu);
            self.notify.notify(vcpu);
        }
    }

    /// Sets vCPU `vcpu`'s ring indicator (ABI 1.10), if it routed its ring to a bit.
    fn indicate(&self, vcpu: u32) {
        if let Some(slot) = indicator::slot(indicator::KIND_IO, 0) {
            self.notify.indicate(Some(vcpu), slot);
        }
    }

    fn complete(&self, indicator: u64, result: i32) {
        // Checked writable and aligned when the request was taken.
        let _ = self.mem.store(
            completion::encode(result),
            GuestAddress(indicator),
            Ordering::Release,
        );
    }

    /// Performs a disk request; returns bytes transferred or a negative errno.
    fn execute(&self, req: &IoRequest) -> i32 {
        let Some(disk) = &self.disk else {
            return errno::ENODEV as i32;
        };
        let len = u64::from(req.len);
        if req.op == abi_io::OP_FLUSH {
            bump(&self.stats.flushes, 1);
            return match disk.flush() {
                Ok(()) => 0,
                Err(_) => errno::EIO as i32,
            };
        }
        if len == 0
            || len > u64::from(abi_io::MAX_TRANSFER)
            || len % abi_io::SECTOR_SIZE != 0
            || !req.offset.is_multiple_of(abi_io::SECTOR_SIZE)
            || req
                .offset
                .checked_add(len)
                .is_none_or(|end| end > disk.size())
        {
            return errno::EINVAL as i32;
        }
        let mut buf = vec![0u8; len as usize];
        match req.op {
            abi_io::OP_READ => {
                if !self.writable(req.buf, len) {
                    return errno::EFAULT as i32;
                }
                if disk.read_at(&mut buf, req.offset).is_err() {
                    return errno::EIO as i32;
                }
                if self.mem.write_slice(&buf, GuestAddress(req.buf)).is_err() {
                    return errno::EFAULT as i32;
                }
                bump(&self.stats.reads, 1);
                bump(&self.stats.bytes_read, len);
            }
            abi_io::OP_WRITE => {
                if disk.read_only() {
                    return errno::EROFS as i32;
                }
                // The data comes from memory the guest owns, never from what the VMM keeps
                // below it (page tables, descriptor tables, the boot info).
                if !self.writable(req.buf, len)
                    || self
                        .mem
                        .read_slice(&mut buf, GuestAddress(req.buf))
                        .is_err()
                {
                    return errno::EFAULT as i32;
                }
                match disk.write_at(&buf, req.offset) {
                    Ok(()) => {}
                    Err(WriteError::Full) => return errno::EAGAIN as i32,
                    Err(WriteError::Io(_)) => return errno::EIO as i32,
                }
                bump(&self.stats.writes, 1);
                bump(&self.stats.bytes_written, len);
            }
            _ => return errno::EINVAL as i32,
        }
        req.len as i32
    }
}

/// Why an I/O queue state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum IoqStateError {
    /// The state is for a different number of vCPUs.
    #[error("I/O queue state has {found} rings, the VM has {expected} vCPUs")]
    VcpuCount {
        /// Rings in the state.
        found: usize,
        /// vCPUs in the VM.
        expected: usize,
    },
    /// A ring or timer points outside guest-writable memory.
    #[error("I/O queue state names memory outside the guest's writable range")]
    BadAddress,
}

impl<M: GuestMemory + Send + Sync + 'static> rebound_snapshot::Snapshottable for IoQueue<M> {
    type State = IoqState;
    type Error = IoqStateError;
    const VERSION: u32 = 1;

    /// Call with the queue paused (or its worker not started).
    fn save(&self) -> Result<IoqState, IoqStateError> {
        Ok(IoqState {
            rings: lock(&self.rings).clone(),
            timers: lock(&self.timer_state).clone(),
        })
    }

    /// Call with the queue paused (or its worker not started). The state is checked first: a
    /// snapshot file is input, and a bad one must not make the VMM write outside the guest.
    fn check(&self, state: &IoqState) -> Result<(), IoqStateError> {
        IoQueue::check(self, state)
    }

    fn restore(&self, state: IoqState) -> Result<(), IoqStateError> {
        IoQueue::check(self, &state)?;
        *lock(&self.rings) = state.rings;
        self.install_timers(state.timers);
        Ok(())
    }
}

impl<M: GuestMemory + Send + Sync + 'static> IoQueue<M> {
    /// Whether `state` could be restored into this queue (nothing is changed).
    pub fn check(&self, state: &IoqState) -> Result<(), IoqStateError> {
        let vcpus = lock(&self.rings).len();
        if state.rings.len() != vcpus {
            return Err(IoqStateError::VcpuCount {
                found: state.rings.len(),
                expected: vcpus,
            });
        }
        let rings_ok = state.rings.iter().flatten().all(|r| {
            r.entries.is_power_of_two()
                && r.entries <= abi_io::MAX_ENTRIES
                && self.writable(r.gpa, abi_io::ring_size(r.entries))
        });
        let timers_ok = state.timers.len() <= MAX_PENDING_TIMERS
            && state
                .timers
                .iter()
                .all(|&(v, ind, _)| (v as usize) < vcpus && ind % 8 == 0 && self.writable(ind, 8));
        if !rings_ok || !timers_ok {
            return Err(IoqStateError::BadAddress);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::thread;
    use vm_memory::GuestMemoryMmap;

    #[derive(Default)]
    struct Counter(AtomicU32);
    impl Notify for Counter {
        fn notify(&self, _vcpu: u32) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    const RING: u64 = 0x1000;
    const BUF: u64 = 0x8000;

    use rebound_block::Disk;

    fn setup(disk: Option<Disk>) -> (Arc<IoQueue<GuestMemoryMmap>>, Arc<Counter>, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let n = Arc::new(Counter::default());
        let disk = disk.map(|d| Arc::new(HeldDisk::new(d)));
        let q = IoQueue::new(mem.clone(), 0x1000..1 << 20, 1, disk, n.clone()).unwrap();
        (Arc::new(q), n, mem)
    }

    fn submit(mem: &GuestMemoryMmap, idx: u32, req: IoRequest) {
        let at = RING + abi_io::HEADER_SIZE + u64::from(idx % 8) * abi_io::REQUEST_SIZE;
        mem.write_obj(req, GuestAddress(at)).unwrap();
        mem.store(idx + 1, GuestAddress(RING), Ordering::Release)
            .unwrap();
    }

    fn wait_done(mem: &GuestMemoryMmap, ind: u64) -> i32 {
        for _ in 0..5000 {
            if let Some(r) =
                completion::decode(mem.load(GuestAddress(ind), Ordering::Acquire).unwrap())
            {
                return r;
            }
            thread::sleep(Duration::from_millis(1));
        }
        panic!("request at {ind:#x} never completed");
    }

    #[test]
    fn register_validates_arguments() {
        let (q, _, _) = setup(None);
        assert_eq!(q.register(0, RING, 3), errno::EINVAL);
        assert_eq!(q.register(0, RING + 4, 8), errno::EINVAL);
        assert_eq!(q.register(0, 0, 8), errno::EFAULT);
        assert_eq!(q.register(0, (1 << 20) - 16, 8), errno::EFAULT);
        assert_eq!(q.register(1, RING, 8), errno::EINVAL);
        assert_eq!(q.register(0, RING, 8), 0);
        assert_eq!(q.register(0, RING, 8), errno::EBUSY);
    }

    #[test]
    fn serves_disk_requests_and_rejects_bad_ones() {
        let (q, notified, mem) = setup(Some(Disk::scratch(64 * 1024).unwrap()));
        assert_eq!(q.register(0, RING, 8), 0);
        let worker = {
            let q = Arc::clone(&q);
            thread::spawn(move || q.run())
        };
        mem.write_slice(&[0xab; 512], GuestAddress(BUF)).unwrap();
        let reqs = [
            (abi_io::OP_WRITE, 512, BUF, 1024, 512),
            (abi_io::OP_READ, 512, BUF + 4096, 1024, 512),
            (abi_io::OP_READ, 512, 0x10, 0, errno::EFAULT as i32), // below the writable range
            (abi_io::OP_WRITE, 512, 0x10, 0, errno::EFAULT as i32), // from the VMM's memory
            (abi_io::OP_READ, 100, BUF, 0, errno::EINVAL as i32),  // not a sector multiple
            (abi_io::OP_READ, 512, BUF, 64 * 1024, errno::EINVAL as i32), // past the end
            (99, 512, BUF, 0, errno::EINVAL as i32),
            (abi_io::OP_TIMER, 0, 0, 2_000_000, 0),
        ];
        for (i, &(op, len, buf, offset, expect)) in reqs.iter().enumerate() {
            let ind = 0xc000 + 8 * i as u64;
            submit(
                &mem,
                i as u32,
                IoRequest {
                    op,
                    len,
                    buf,
                    offset,
                    completion: ind,
                },
            );
            q.doorbell().write(1).unwrap();
            assert_eq!(wait_done(&mem, ind), expect, "request {i}");
        }
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(BUF + 4096)).unwrap();
        assert_eq!(back, [0xab; 512]);
        // A request whose indicator is outside writable memory is dropped, not executed.
        submit(
            &mem,
            reqs.len() as u32,
            IoRequest {
                op: abi_io::OP_FLUSH,
                completion: 0x10,
                ..Default::default()
            },
        );
        q.doorbell().write(1).unwrap();
        for _ in 0..1000 {
            if q.stats().snapshot().dropped == 1 {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        let s = q.stats().snapshot();
        assert_eq!(
            (s.dropped, s.writes, s.reads, s.timers, s.errors),
            (1, 1, 1, 1, 5)
        );
        assert!(notified.0.load(Ordering::SeqCst) >= 7);
        q.stop();
        worker.join().unwrap().unwrap();
    }

    #[test]
    fn corrupt_producer_is_skipped_not_replayed() {
        let (q, _, mem) = setup(Some(Disk::scratch(4096).unwrap()));
        assert_eq!(q.register(0, RING, 8), 0);
        mem.store(1000u32, GuestAddress(RING), Ordering::Release)
            .unwrap();
        let mut timers = BinaryHeap::new();
        q.serve_ring(0, &mut timers, &mut 0);
        let s = q.stats().snapshot();
        assert_eq!((s.ring_errors, s.requests), (1, 0));
        let consumer: u32 = mem.load(GuestAddress(RING + 4), Ordering::Acquire).unwrap();
        assert_eq!(consumer, 1000);
    }

    #[test]
    fn pending_timers_are_capped() {
        let (q, _, mem) = setup(None);
        assert_eq!(q.register(0, RING, 8), 0);
        let mut timers = BinaryHeap::new();
        for i in 0..MAX_PENDING_TIMERS as u64 {
            timers.push(Reverse((
                Instant::now() + Duration::from_secs(3600),
                i,
                0,
                0xc000,
            )));
        }
        let ind = 0xc008;
        submit(
            &mem,
            0,
            IoRequest {
                op: abi_io::OP_TIMER,
                offset: u64::MAX,
                completion: ind,
                ..Default::default()
            },
        );
        q.serve_ring(0, &mut timers, &mut 0);
        assert_eq!(timers.len(), MAX_PENDING_TIMERS);
        let word: u64 = mem.load(GuestAddress(ind), Ordering::Acquire).unwrap();
        assert_eq!(completion::decode(word), Some(errno::EBUSY as i32));
    }

    #[test]
    fn timers_restored_into_a_paused_queue_survive_until_resume() {
        use rebound_snapshot::Snapshottable;
        let (q, _, mem) = setup(None);
        let state = IoqState {
            rings: vec![None],
            timers: vec![(0, 0xc000, 1_000_000)],
        };
        q.restore(state).unwrap();
        q.pause();
        let worker = {
            let q = Arc::clone(&q);
            thread::spawn(move || q.run())
        };
        // Parking must not publish the worker's (empty) list over the restored one.
        q.pause();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(
            q.save().unwrap().timers.len(),
            1,
            "restored timer lost while paused"
        );
        assert_eq!(
            mem.load::<u64>(GuestAddress(0xc000), Ordering::Acquire)
                .unwrap(),
            0
        );
        q.resume();
        assert_eq!(wait_done(&mem, 0xc000), 0);
        q.stop();
        worker.join().unwrap().unwrap();
        let too_many = IoqState {
            rings: vec![None],
            timers: vec![(0, 0xc000, 1); MAX_PENDING_TIMERS + 1],
        };
        assert!(q.restore(too_many).is_err());
    }

    #[test]
    fn pause_parks_the_worker() {
        let (q, _, mem) = setup(Some(Disk::scratch(4096).unwrap()));
        assert_eq!(q.register(0, RING, 8), 0);
        let worker = {
            let q = Arc::clone(&q);
            thread::spawn(move || q.run())
        };
        while !q.running.load(Ordering::Acquire) {
            thread::yield_now();
        }
        q.pause();
        submit(
            &mem,
            0,
            IoRequest {
                op: abi_io::OP_FLUSH,
                completion: 0x9000,
                ..Default::default()
            },
        );
        q.doorbell().write(1).unwrap();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(
            mem.load::<u64>(GuestAddress(0x9000), Ordering::Acquire)
                .unwrap(),
            0,
            "paused"
        );
        q.resume();
        q.doorbell().write(1).unwrap();
        assert_eq!(wait_done(&mem, 0x9000), 0);
        q.stop();
        worker.join().unwrap().unwrap();
    }
}
