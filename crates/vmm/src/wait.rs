//! Where vCPUs wait: the run control (running / paused / stopping) shared by all vCPUs of a VM,
//! and the per-vCPU waiters behind the `BLOCK` hypercall.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rebound_abi::{PAGE_SIZE, VCPU_PAGE_PENDING_OFFSET, VCPU_PAGE_ROUTES_OFFSET, indicator};
use rebound_devices::Notify;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, VolatileMemory};

use crate::memory::GuestMemory;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the vCPUs are asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Request {
    /// Run the guest.
    Run = 0,
    /// Park outside KVM_RUN until resumed.
    Pause = 1,
    /// Leave the run loop for good.
    Stop = 2,
}

#[derive(Default)]
struct Counts {
    parked: u32,
    exited: u32,
}

/// Run control of one VM.
pub struct RunControl {
    /// Fast-path copy of the request, checked by vCPUs on every loop turn.
    request: AtomicU8,
    counts: Mutex<Counts>,
    cv: Condvar,
    vcpus: u32,
}

impl RunControl {
    pub fn new(vcpus: u32) -> Self {
        Self {
            request: AtomicU8::new(Request::Run as u8),
            counts: Mutex::new(Counts::default()),
            cv: Condvar::new(),
            vcpus,
        }
    }

    pub fn current(&self) -> Request {
        match self.request.load(Ordering::Acquire) {
            0 => Request::Run,
            1 => Request::Pause,
            _ => Request::Stop,
        }
    }

    /// Sets the request. Stop is final: later requests do not undo it.
    pub fn set(&self, r: Request) {
        let _g = lock(&self.counts);
        if self.current() != Request::Stop {
            self.request.store(r as u8, Ordering::Release);
        }
        self.cv.notify_all();
    }

    /// Called by a vCPU thread: parks while the request is Pause.
    pub fn park(&self) {
        let mut c = lock(&self.counts);
        c.parked += 1;
        self.cv.notify_all();
        while self.current() == Request::Pause {
            c = self.cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        c.parked -= 1;
    }

    /// Called by a thread that runs guest code without being one of the vCPUs (a nested
    /// vCPU's): waits, uncounted, while the request is Pause and `stop` is clear. True if the
    /// VM runs again, false if it stops or `stop` was set.
    pub fn wait_while_paused(&self, stop: &std::sync::atomic::AtomicBool) -> bool {
        let mut c = lock(&self.counts);
        while self.current() == Request::Pause && !stop.load(Ordering::SeqCst) {
            c = self.cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        self.current() == Request::Run && !stop.load(Ordering::SeqCst)
    }

    /// Wakes [`wait_while_paused`](Self::wait_while_paused) callers to look at their `stop`.
    pub fn poke(&self) {
        let _g = lock(&self.counts);
        self.cv.notify_all();
    }

    /// Called by a vCPU thread as it leaves its run loop.
    pub fn exited(&self) {
        lock(&self.counts).exited += 1;
        self.cv.notify_all();
    }

    /// Waits until every vCPU is parked or gone; false on timeout.
    pub fn wait_quiet(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut c = lock(&self.counts);
        while c.parked + c.exited < self.vcpus {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            c = self
                .cv
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Waits until every vCPU thread has left its loop.
    pub fn wait_exited(&self) {
        let mut c = lock(&self.counts);
        while c.exited < self.vcpus {
            c = self.cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Like [`wait_exited`](Self::wait_exited), for at most `timeout`; false if it passed.
    pub fn wait_exited_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut c = lock(&self.counts);
        while c.exited < self.vcpus {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            c = self
                .cv
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    pub fn all_exited(&self) -> bool {
        lock(&self.counts).exited == self.vcpus
    }
}

#[derive(Default)]
struct Flags {
    /// An event for this vCPU arrived since it last blocked.
    pending: bool,
    /// The controller wants the vCPU back (pause, stop).
    interrupted: bool,
}

#[derive(Default)]
struct Waiter {
    flags: Mutex<Flags>,
    cv: Condvar,
}

/// How a `BLOCK` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// An event for the vCPU arrived.
    Event,
    /// The timeout passed.
    Timeout,
    /// The controller needs the vCPU (pause or stop).
    Interrupted,
}

/// The `BLOCK` waiters of all vCPUs of a VM. Devices wake them through [`Notify`].
pub struct Waiters {
    slots: Vec<Waiter>,
    /// vCPUs in `BLOCK` now (a guest that waits, not one that stopped making progress).
    blocked: std::sync::atomic::AtomicU32,
    /// Guest memory and vCPU 0's page address: where requester indicators (ABI 1.10) go.
    pages: Option<(GuestMemory, u64)>,
    /// Indicator bits set (diagnostic).
    indicated: std::sync::atomic::AtomicU64,
}

/// Counts a vCPU as blocked while it lives.
struct Blocked<'a>(&'a std::sync::atomic::AtomicU32);

impl Drop for Blocked<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Waiters {
    pub fn new(vcpus: u32) -> Self {
        Self {
            slots: (0..vcpus).map(|_| Waiter::default()).collect(),
            blocked: std::sync::atomic::AtomicU32::new(0),
            pages: None,
            indicated: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Sets requester indicators (ABI 1.10) in the vCPU pages of `mem`, vCPU `i`'s at
    /// `first_page + i * PAGE_SIZE`.
    pub fn with_pages(mut self, mem: GuestMemory, first_page: u64) -> Self {
        self.pages = Some((mem, first_page));
        self
    }

    /// Indicator bits set so far.
    pub fn indicated(&self) -> u64 {
        self.indicated.load(Ordering::Relaxed)
    }

    /// ORs the bit vCPU `vcpu` routed route slot `slot` to into its `pending` word, if it
    /// routed it. The route byte is the guest's: a bad value is no route.
    fn set_pending(&self, mem: &GuestMemory, first_page: u64, vcpu: u32, slot: usize) {
        let page = first_page + u64::from(vcpu) * PAGE_SIZE;
        let route = GuestAddress(page + VCPU_PAGE_ROUTES_OFFSET + slot as u64);
        let Some(bit) = mem.read_obj::<u8>(route).ok().and_then(indicator::bit_of) else {
            return;
        };
        let Ok(word) = mem.get_slice(GuestAddress(page + VCPU_PAGE_PENDING_OFFSET), 8) else {
            return;
        };
        let Ok(atomic) = word.get_atomic_ref::<std::sync::atomic::AtomicU64>(0) else {
            return;
        };
        // SeqCst (a locked OR on x86): ordered before the wake-up that follows, and before
        // any "is the guest idle?" load a requester makes after it (the guest does the mirror
        // image: it says it is idle, then swaps the word).
        atomic.fetch_or(1u64 << bit, Ordering::SeqCst);
        // A write behind KVM's dirty log: record it for checkpoints.
        word.bitmap().mark_dirty(0, 8);
        self.indicated.fetch_add(1, Ordering::Relaxed);
    }

    /// How many vCPUs are in `BLOCK` now.
    pub fn blocked(&self) -> u32 {
        self.blocked.load(Ordering::Acquire)
    }

    /// Cuts every current and next `BLOCK` short (the controller needs the vCPUs).
    pub fn interrupt_all(&self) {
        for w in &self.slots {
            lock(&w.flags).interrupted = true;
            w.cv.notify_all();
        }
    }

    /// Blocks vCPU `vcpu` until an event, the timeout (`None`: none), or an interruption.
    pub fn block(&self, vcpu: u32, timeout: Option<Duration>, control: &RunControl) -> Wake {
        let Some(w) = self.slots.get(vcpu as usize) else {
            return Wake::Interrupted;
        };
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        self.blocked.fetch_add(1, Ordering::AcqRel);
        let _blocked = Blocked(&self.blocked);
        let mut f = lock(&w.flags);
        loop {
            if f.pending {
                f.pending = false;
                return Wake::Event;
            }
            if f.interrupted {
                f.interrupted = false;
                return Wake::Interrupted;
            }
            if control.current() != Request::Run {
                return Wake::Interrupted;
            }
            match deadline {
                None => f = w.cv.wait(f).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Wake::Timeout;
                    }
                    f =
                        w.cv.wait_timeout(f, d - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                }
            }
        }
    }

    /// Forgets a stale interruption (after the vCPU came back from a pause).
    pub fn clear_interrupt(&self, vcpu: u32) {
        if let Some(w) = self.slots.get(vcpu as usize) {
            lock(&w.flags).interrupted = false;
        }
    }
}

impl Waiters {
    /// Wakes every vCPU (an event for the whole VM, e.g. a message from another VM).
    pub fn notify_all(&self) {
        for id in 0..self.slots.len() {
            self.notify(id as u32);
        }
    }
}

impl Notify for Waiters {
    fn notify(&self, vcpu: u32) {
        if let Some(w) = self.slots.get(vcpu as usize) {
            lock(&w.flags).pending = true;
            w.cv.notify_all();
        }
    }

    fn indicate(&self, vcpu: Option<u32>, slot: usize) {
        let Some((mem, first_page)) = &self.pages else {
            return;
        };
        if slot >= indicator::ROUTES {
            return;
        }
        let vcpus = self.slots.len() as u32;
        match vcpu {
            Some(v) if v < vcpus => self.set_pending(mem, *first_page, v, slot),
            Some(_) => {}
            None => {
                for v in 0..vcpus {
                    self.set_pending(mem, *first_page, v, slot);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn indicators_set_routed_bits_only_and_ignore_bad_routes() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let page = |v: u64| 0x1000 + v * PAGE_SIZE;
        let route = |v: u64, slot: u64, b: u8| {
            mem.write_obj(b, GuestAddress(page(v) + VCPU_PAGE_ROUTES_OFFSET + slot))
                .unwrap()
        };
        let pending = |v: u64| {
            mem.read_obj::<u64>(GuestAddress(page(v) + VCPU_PAGE_PENDING_OFFSET))
                .unwrap()
        };
        let w = Waiters::new(2).with_pages(mem.clone(), page(0));
        route(0, 0, 18); // vCPU 0's ring: bit 17
        route(1, 0, 200); // garbage: no route
        route(0, 9, 1); // shared region 0: bit 0 on vCPU 0 ...
        route(1, 9, 64); // ... and bit 63 on vCPU 1
        w.indicate(Some(0), 0);
        w.indicate(Some(1), 0);
        w.indicate(Some(7), 0); // no such vCPU
        w.indicate(None, 99); // no such slot
        assert_eq!(pending(0), 1 << 17);
        assert_eq!(pending(1), 0);
        w.indicate(None, 9);
        assert_eq!(pending(0), 1 << 17 | 1);
        assert_eq!(pending(1), 1 << 63);
        assert_eq!(w.indicated(), 3);
        // vCPU pages past the end of memory: nothing happens, nothing panics.
        let w = Waiters::new(8).with_pages(mem.clone(), page(2));
        w.indicate(None, 9);
        assert_eq!(w.indicated(), 0);
    }

    #[test]
    fn event_before_block_is_not_lost() {
        let w = Waiters::new(1);
        let c = RunControl::new(1);
        w.notify(0);
        assert_eq!(w.block(0, None, &c), Wake::Event);
        assert_eq!(
            w.block(0, Some(Duration::from_millis(1)), &c),
            Wake::Timeout
        );
    }

    #[test]
    fn interrupt_and_notify_wake_a_blocked_vcpu() {
        let w = Arc::new(Waiters::new(2));
        let c = Arc::new(RunControl::new(2));
        let t = {
            let (w, c) = (w.clone(), c.clone());
            thread::spawn(move || w.block(1, None, &c))
        };
        thread::sleep(Duration::from_millis(10));
        w.notify(1);
        assert_eq!(t.join().unwrap(), Wake::Event);
        let t = {
            let (w, c) = (w.clone(), c.clone());
            thread::spawn(move || w.block(0, None, &c))
        };
        thread::sleep(Duration::from_millis(10));
        w.interrupt_all();
        assert_eq!(t.join().unwrap(), Wake::Interrupted);
        assert_eq!(w.block(5, None, &c), Wake::Interrupted, "no such vCPU");
    }

    #[test]
    fn stop_is_final() {
        let c = RunControl::new(1);
        c.set(Request::Stop);
        c.set(Request::Run);
        assert_eq!(c.current(), Request::Stop);
    }
}
