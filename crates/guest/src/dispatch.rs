//! A small cooperative task dispatcher with interrupt-free I/O completion.
//!
//! Tasks are futures. A task that starts an I/O returns `Pending` after registering the I/O's
//! completion indicator (a `u64` in guest memory) with [`wait_for`]. The VMM completes the I/O
//! by storing into that indicator; no interrupt is injected. Each time the dispatcher picks a
//! task it checks the indicator of every waiting task and resumes those whose I/O is done.
//! When no task can run, the dispatcher blocks the vCPU in the VMM (`BLOCK` hypercall), which
//! returns as soon as an I/O of this vCPU completes.
//!
//! A dispatcher runs on the vCPU that calls [`Dispatcher::run`]; its tasks are not `Send` and
//! need not be. Tasks are cooperative: one that computes for a long time without awaiting holds
//! up the others (await [`yield_now`] now and then).
//!
//! ```no_run
//! use rebound_guest::dispatch::{Dispatcher, yield_now};
//! use rebound_guest::println;
//!
//! let mut d = Dispatcher::new();
//! for name in ["ping", "pong"] {
//!     d.spawn(async move {
//!         for i in 0..3 {
//!             println!("{name} {i}");
//!             yield_now().await; // let the other task run
//!         }
//!     });
//! }
//! let stats = d.run(); // returns once both tasks are done
//! println!("{} polls, {} blocks", stats.polls, stats.blocks);
//! ```

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::future::Future;
use core::pin::Pin;
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use core::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use rebound_abi::completion;

/// A completion indicator: a `u64` in guest memory the VMM stores into when a request
/// completes. Zero while pending, then [`completion::DONE`] with the result in the low 32
/// bits (see [`rebound_abi::completion`]).
pub type Indicator = AtomicU64;

/// Per-task scheduling state, shared with the task's wakers.
struct TaskState {
    /// Set by a waker: poll the task again.
    woken: AtomicBool,
    /// The indicator the task waits on: an `Arc<Indicator>` as a raw pointer, or null. Only the
    /// owning vCPU changes it; holding a strong reference keeps the indicator's memory valid
    /// for as long as the dispatcher may read it.
    waiting: AtomicPtr<Indicator>,
}

impl TaskState {
    fn new() -> Self {
        Self {
            woken: AtomicBool::new(true),
            waiting: AtomicPtr::new(ptr::null_mut()),
        }
    }

    fn set_waiting(&self, ind: Option<&Arc<Indicator>>) {
        let new = ind.map_or(ptr::null_mut(), |a| Arc::into_raw(Arc::clone(a)).cast_mut());
        let old = self.waiting.swap(new, Ordering::AcqRel);
        if !old.is_null() {
            // SAFETY: `old` came from `Arc::into_raw` above and is released exactly once here.
            drop(unsafe { Arc::from_raw(old) });
        }
    }

    /// `None` if the task waits on no indicator, else whether the indicator is complete.
    fn indicator_done(&self) -> Option<bool> {
        let p = self.waiting.load(Ordering::Acquire);
        if p.is_null() {
            return None;
        }
        // SAFETY: the pointer holds a strong reference (see `waiting`), so the indicator is alive.
        let word = unsafe { &*p }.load(Ordering::Acquire);
        Some(completion::decode(word).is_some())
    }
}

impl Drop for TaskState {
    fn drop(&mut self) {
        self.set_waiting(None);
    }
}

static VTABLE: RawWakerVTable =
    RawWakerVTable::new(waker_clone, waker_wake, waker_wake_by_ref, waker_drop);

fn raw_waker(state: &Arc<TaskState>) -> RawWaker {
    RawWaker::new(Arc::into_raw(Arc::clone(state)).cast(), &VTABLE)
}

unsafe fn waker_clone(data: *const ()) -> RawWaker {
    // SAFETY: `data` is a live `Arc<TaskState>` pointer owned by the waker being cloned.
    let state = unsafe { Arc::from_raw(data.cast::<TaskState>()) };
    let raw = raw_waker(&state);
    core::mem::forget(state);
    raw
}

unsafe fn waker_wake(data: *const ()) {
    // SAFETY: `data` is the waker's own `Arc<TaskState>`, consumed by `wake`.
    let state = unsafe { Arc::from_raw(data.cast::<TaskState>()) };
    state.woken.store(true, Ordering::Release);
}

unsafe fn waker_wake_by_ref(data: *const ()) {
    // SAFETY: `data` is a live `Arc<TaskState>` pointer owned by the waker.
    let state = unsafe { &*data.cast::<TaskState>() };
    state.woken.store(true, Ordering::Release);
}

unsafe fn waker_drop(data: *const ()) {
    // SAFETY: `data` is the waker's own `Arc<TaskState>`, released exactly once here.
    drop(unsafe { Arc::from_raw(data.cast::<TaskState>()) });
}

/// Registers `ind` as what the current task waits on; the dispatcher resumes the task once it is
/// complete. For futures of your own over a completion indicator: call it, then return
/// `Pending`. Under a foreign executor this falls back to waking at once (polling).
pub fn wait_for(cx: &mut Context<'_>, ind: &Arc<Indicator>) {
    let waker = cx.waker();
    if ptr::eq(waker.vtable(), &VTABLE) {
        // SAFETY: a waker with our vtable carries an `Arc<TaskState>` pointer as its data.
        let state = unsafe { &*waker.data().cast::<TaskState>() };
        state.set_waiting(Some(ind));
    } else {
        waker.wake_by_ref();
    }
}

/// Yields once to the other tasks: the task is polled again on the dispatcher's next round,
/// after every other task that can run.
pub async fn yield_now() {
    let mut yielded = false;
    core::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

struct Task {
    future: Pin<Box<dyn Future<Output = ()>>>,
    state: Arc<TaskState>,
}

/// Work that comes from outside the dispatcher's tasks (e.g. a queue in memory another VM
/// fills). The dispatcher polls every source added with [`Dispatcher::add_source`] on each
/// round, with no exit; one added with [`Dispatcher::add_source_with_bit`] only on the rounds
/// its requester indicator (ABI 1.10, see [`crate::indicator`]) is set, after it had work, and
/// after a block when it has a timer. A source with work wakes the tasks waiting on it. Sources
/// are also told when the dispatcher goes idle, so they can tell the outside (another VM
/// deciding whether to wake this one).
///
/// The SDK's sources are the network [`Stack`](crate::net::Stack) and the shared-memory
/// [`Inbox`](crate::share::Inbox); add them with [`Dispatcher::add_source`].
pub trait Source {
    /// Whether the source has work (it wakes its waiting tasks itself).
    fn poll(&self) -> bool;
    /// The dispatcher is about to block (`true`), or runs again (`false`).
    fn idle(&self, _idle: bool) {}
    /// Nanoseconds from now until the source must be polled even if nothing arrives (a timer
    /// of its own, e.g. a TCP retransmission), asked just before the dispatcher blocks: it
    /// blocks no longer than the smallest. `Some(0)`: poll again without blocking. None: no
    /// timer.
    fn next_timeout_ns(&self) -> Option<u64> {
        None
    }
}

/// Adds tasks to a running [`Dispatcher`] from inside its tasks (e.g. one per accepted
/// connection). Tasks spawned here start on the dispatcher's next round. Cheap to clone;
/// get one with [`Dispatcher::spawner`].
#[derive(Clone, Default)]
pub struct Spawner {
    queue: Rc<RefCell<Vec<Task>>>,
}

impl Spawner {
    /// Adds a task (a future with no output; it runs until it completes).
    pub fn spawn(&self, future: impl Future<Output = ()> + 'static) {
        self.queue.borrow_mut().push(Task {
            future: Box::pin(future),
            state: Arc::new(TaskState::new()),
        });
    }
}

/// What the dispatcher did, returned by [`Dispatcher::run`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Tasks polled.
    pub polls: u64,
    /// Times no task could run and the vCPU blocked in the VMM.
    pub blocks: u64,
    /// Times a task was resumed because its completion indicator was set.
    pub completions: u64,
    /// The run ended because the host asked for a shutdown (see [`Dispatcher::on_shutdown`]).
    pub shutdown: bool,
}

/// Rounds of polling the sources before a dispatcher with sources goes idle, by default (see
/// [`Dispatcher::set_poll_spins`]).
pub const DEFAULT_POLL_SPINS: u32 = 200;
/// `pause`s between two looks at the sources while polling.
const POLL_PAUSES: u32 = 16;

/// Bits of the pending word (ABI 1.10).
pub const INDICATOR_BITS: u32 = 64;

/// Runs tasks on one vCPU until all have finished, blocking the vCPU in the VMM when none can
/// run. See the [module documentation](self).
pub struct Dispatcher {
    tasks: Vec<Task>,
    spawned: Spawner,
    /// Sources polled on every round.
    sources: Vec<Rc<dyn Source>>,
    /// Sources polled when their indicator bit is set, by bit.
    indicated: Vec<Option<Rc<dyn Source>>>,
    /// Bits of `indicated` in use.
    indicated_mask: u64,
    /// Bits to poll on the next round even if not pending: sources that had work (they may
    /// have more) or a timer.
    carry: u64,
    stats: Stats,
    poll_spins: u32,
    /// What a shutdown request does; None: the run ends.
    on_shutdown: Option<Box<dyn FnOnce()>>,
    shutdown_seen: bool,
}

impl Default for Dispatcher {
    fn default() -> Self {
        Self {
            tasks: Vec::new(),
            spawned: Spawner::default(),
            sources: Vec::new(),
            indicated: (0..INDICATOR_BITS).map(|_| None).collect(),
            indicated_mask: 0,
            carry: 0,
            stats: Stats::default(),
            poll_spins: DEFAULT_POLL_SPINS,
            on_shutdown: None,
            shutdown_seen: false,
        }
    }
}

impl Dispatcher {
    /// An empty dispatcher.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many rounds to keep polling the sources (still marked busy) before going idle.
    /// Work that arrives within them costs no wake-up and no exit on either side; going idle
    /// and being woken costs a doorbell, host thread hand-offs and the return from `BLOCK`.
    /// The price is CPU time spent polling (a few tens of microseconds). 0: go idle at once.
    pub fn set_poll_spins(&mut self, rounds: u32) {
        self.poll_spins = rounds;
    }

    /// What to do when the host asks for a shutdown (ABI 1.3), called once on the
    /// dispatcher's vCPU: e.g. tell the tasks to finish and flush. Without a handler the run
    /// ends at the next round ([`Stats::shutdown`] is set) and the guest's `main` goes on
    /// from there, typically to return (exit).
    pub fn on_shutdown(&mut self, f: impl FnOnce() + 'static) {
        self.on_shutdown = Some(Box::new(f));
    }

    /// Adds a task (a future with no output; it runs until it completes). Tasks start when
    /// [`run`](Self::run) is called.
    pub fn spawn(&mut self, future: impl Future<Output = ()> + 'static) {
        self.tasks.push(Task {
            future: Box::pin(future),
            state: Arc::new(TaskState::new()),
        });
    }

    /// A handle that adds tasks while the dispatcher runs.
    pub fn spawner(&self) -> Spawner {
        self.spawned.clone()
    }

    /// Adds a source of outside work, polled on every round (e.g. `stack.clone()`, a network
    /// [`Stack`](crate::net::Stack): without it, no frame is sent or received).
    pub fn add_source(&mut self, source: Rc<dyn Source>) {
        self.sources.push(source);
    }

    /// Adds a source polled only when bit `bit` (0..=63) of this vCPU's pending word is set
    /// (ABI 1.10): the rounds that find no bit set touch none of these sources, so dozens of
    /// them cost what one does. Route whatever signals the source to the same bit: a VMM
    /// requester with [`indicator::route`](crate::indicator::route), guest code with
    /// [`indicator::raise`](crate::indicator::raise). A source is also polled on the round
    /// after it had work (it may have more) and after each block if it has a timer
    /// ([`Source::next_timeout_ns`]). Returns false (and adds nothing) if `bit` is above 63
    /// or taken. Under a VMM older than ABI 1.10 (no indicators), the source is polled on
    /// every round, as with [`add_source`](Self::add_source).
    pub fn add_source_with_bit(&mut self, source: Rc<dyn Source>, bit: u32) -> bool {
        if bit >= INDICATOR_BITS || self.indicated_mask & (1 << bit) != 0 {
            return false;
        }
        // The bit is taken either way, so the same calls fail the same way on any VMM.
        self.indicated_mask |= 1 << bit;
        if !crate::indicator::available() {
            self.sources.push(source);
            return true;
        }
        self.indicated[bit as usize] = Some(source);
        // Polled once at start: work that came before its route was set.
        self.carry |= 1 << bit;
        true
    }

    /// Like [`add_source_with_bit`](Self::add_source_with_bit) with the lowest free bit;
    /// returns it, None if all 64 are taken.
    pub fn add_indicated_source(&mut self, source: Rc<dyn Source>) -> Option<u32> {
        let bit = (!self.indicated_mask).trailing_zeros();
        (bit < INDICATOR_BITS && self.add_source_with_bit(source, bit)).then_some(bit)
    }

    /// One look at the sources: takes this vCPU's pending bits and polls the sources with a
    /// bit that is set (or carried over), then every source without a bit. Returns how many
    /// had work. [`run`](Self::run) calls it once per round; exposed for measurements.
    pub fn poll_sources(&mut self) -> u32 {
        let mut n = 0;
        if self.indicated_mask != 0 {
            let mut bits = (crate::indicator::take() | self.carry) & self.indicated_mask;
            self.carry = 0;
            while bits != 0 {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                if let Some(s) = &self.indicated[bit as usize]
                    && s.poll()
                {
                    self.carry |= 1 << bit;
                    n += 1;
                }
            }
        }
        for s in &self.sources {
            n += u32::from(s.poll());
        }
        n
    }

    /// Every source, with or without a bit.
    fn all_sources(&self) -> impl Iterator<Item = &Rc<dyn Source>> {
        self.sources.iter().chain(self.indicated.iter().flatten())
    }

    /// Whether the dispatcher has any source.
    fn has_sources(&self) -> bool {
        !self.sources.is_empty() || self.indicated_mask != 0
    }

    /// Runs every task to completion, blocking the vCPU in the VMM when none can run, and
    /// returns what it did.
    ///
    /// It also returns, with [`Stats::shutdown`] set and tasks left unfinished, when the host
    /// asks for a shutdown and no [`on_shutdown`](Self::on_shutdown) handler is registered.
    /// A dispatcher with a task that never ends (a server's accept loop) runs until then.
    ///
    /// Blocking: with tasks waiting on I/O only, until an I/O of this vCPU completes; with
    /// sources, at most 100 ms (less if a source's timer says so); otherwise 1 ms, so that
    /// tasks woken from elsewhere are seen.
    pub fn run(&mut self) -> Stats {
        let has_sources = self.has_sources();
        self.run_inner(move |waiting_on_io, timeout| {
            // With I/O outstanding the VMM wakes us when it completes, and a VM with sources
            // is woken by whoever gives it work; tasks parked on other wakers (e.g. from
            // another vCPU) are re-checked every millisecond. Sources' timers cut it shorter.
            let default = match (waiting_on_io, has_sources) {
                (_, true) => 100_000_000,
                (true, false) => u64::MAX,
                (false, false) => 1_000_000,
            };
            crate::hypercall::block(timeout.map_or(default, |t| t.min(default)))
        })
    }

    /// Like [`run`](Self::run) with a custom idle step, called with whether any task waits on a
    /// completion indicator.
    pub fn run_with(&mut self, mut idle: impl FnMut(bool)) -> Stats {
        self.run_inner(|waiting_on_io, _| {
            idle(waiting_on_io);
            false
        })
    }

    /// The loop; `idle` is called with whether a task waits on an indicator and the sources'
    /// smallest timeout, and returns whether it timed out (nothing woke it).
    fn run_inner(&mut self, mut idle: impl FnMut(bool, Option<u64>) -> bool) -> Stats {
        loop {
            crate::hypercall::beat();
            self.tasks.append(&mut self.spawned.queue.borrow_mut());
            if self.tasks.is_empty() {
                break;
            }
            if !self.shutdown_seen && crate::boot::shutdown_requested() {
                self.shutdown_seen = true;
                match self.on_shutdown.take() {
                    Some(f) => f(),
                    None => {
                        self.stats.shutdown = true;
                        break;
                    }
                }
            }
            self.poll_sources();
            let mut ran = false;
            let mut waiting_on_io = false;
            let mut i = 0;
            while i < self.tasks.len() {
                let state = Arc::clone(&self.tasks[i].state);
                let io_done = state.indicator_done();
                let woken = state.woken.swap(false, Ordering::AcqRel);
                if !woken && io_done != Some(true) {
                    waiting_on_io |= io_done.is_some();
                    i += 1;
                    continue;
                }
                if io_done == Some(true) {
                    self.stats.completions += 1;
                }
                state.set_waiting(None);
                // SAFETY: `raw_waker` returns a waker built on our vtable with a fresh strong
                // reference, which the `Waker` releases on drop.
                let waker = unsafe { Waker::from_raw(raw_waker(&state)) };
                let mut cx = Context::from_waker(&waker);
                self.stats.polls += 1;
                ran = true;
                if self.tasks[i].future.as_mut().poll(&mut cx).is_ready() {
                    self.tasks.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            if !ran && self.has_sources() && self.poll_briefly() {
                continue;
            }
            if !ran {
                // Idle: say so, then look once more (work that came just before we said so
                // would otherwise wait for the next wake-up that nobody sends). The pending
                // word is swapped after the sources said they are idle: a requester sets its
                // bit before it looks whether to wake us, so one of the two sees the other.
                for s in self.all_sources() {
                    s.idle(true);
                }
                let work = self.poll_sources() > 0;
                let mut timeout = None;
                let mut timed = 0u64;
                for s in &self.sources {
                    timeout = min_some(timeout, s.next_timeout_ns());
                }
                for (bit, s) in self.indicated.iter().enumerate() {
                    if let Some(t) = s.as_ref().and_then(|s| s.next_timeout_ns()) {
                        timeout = min_some(timeout, Some(t));
                        timed |= 1 << bit;
                    }
                }
                // A source with a timer is polled after the block, whatever woke it: its
                // timer may be due and nothing sets its bit for that.
                self.carry |= timed;
                // A task spawned by a source's waker, or a timer already due: no block.
                let spawned = !self.spawned.queue.borrow().is_empty();
                if !work && !spawned && timeout != Some(0) {
                    self.stats.blocks += 1;
                    if idle(waiting_on_io, timeout) {
                        // Nothing for a whole block: look at every source once. A safety net
                        // only (a bit set by a requester outside the ABI's, or lost with a
                        // host-side bug, costs at most one block's wait), cheap at this rate.
                        self.carry |= self.indicated_mask;
                    }
                }
                for s in self.all_sources() {
                    s.idle(false);
                }
            }
        }
        self.stats
    }

    /// Polls the sources for a while; whether one has work. Looks every few pauses only, so
    /// that polling does not keep stealing the cache lines a producer in another VM writes.
    fn poll_briefly(&mut self) -> bool {
        for _ in 0..self.poll_spins {
            if self.poll_sources() > 0 {
                return true;
            }
            for _ in 0..POLL_PAUSES {
                core::hint::spin_loop();
            }
        }
        false
    }

    /// Statistics so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }
}

/// The smaller of two optional timeouts (None: no timer).
fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::future::poll_fn;
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    /// A stand-in for an I/O: pending until its indicator is set.
    struct FakeIo(Arc<Indicator>);

    impl Future for FakeIo {
        type Output = i32;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
            match completion::decode(self.0.load(Ordering::Acquire)) {
                Some(r) => Poll::Ready(r),
                None => {
                    wait_for(cx, &self.0);
                    Poll::Pending
                }
            }
        }
    }

    #[test]
    fn io_tasks_resume_only_when_their_indicator_is_set() {
        let inds: Vec<Arc<Indicator>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut d = Dispatcher::new();
        for (n, ind) in inds.iter().enumerate() {
            let (ind, log) = (Arc::clone(ind), Rc::clone(&log));
            d.spawn(async move {
                let r = FakeIo(ind).await;
                log.borrow_mut().push((n, r));
            });
        }
        // Complete the I/Os in reverse order, one per idle step, like the VMM would.
        let mut next = 3;
        let stats = d.run_with(|waiting| {
            assert!(waiting, "idle while tasks wait on I/O");
            next -= 1;
            inds[next].store(completion::encode(next as i32 * 10), Ordering::Release);
        });
        assert_eq!(*log.borrow(), vec![(2, 20), (1, 10), (0, 0)]);
        assert_eq!(stats.completions, 3);
        assert_eq!(stats.blocks, 3);
        assert_eq!(
            stats.polls, 6,
            "each task polled once to start and once on completion"
        );
    }

    #[test]
    fn yield_interleaves_and_parked_tasks_are_not_polled() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut d = Dispatcher::new();
        for n in 0..2 {
            let log = Rc::clone(&log);
            d.spawn(async move {
                for i in 0..3 {
                    log.borrow_mut().push((n, i));
                    yield_now().await;
                }
            });
        }
        let stats = d.run_with(|_| panic!("never idle: tasks only yield"));
        assert_eq!(log.borrow().len(), 6);
        assert_eq!(log.borrow()[..2], [(0, 0), (1, 0)]);
        assert_eq!(stats.blocks, 0);
    }

    #[test]
    fn dropped_task_releases_its_indicator() {
        let ind = Arc::new(AtomicU64::new(0));
        {
            let mut d = Dispatcher::new();
            d.spawn(FakeIo(Arc::clone(&ind)).then_unit());
            let mut idles = 0;
            // Run one round, then give up (drop the dispatcher with the task still waiting).
            d.run_with(|_| {
                idles += 1;
                if idles == 2 {
                    ind.store(completion::encode(0), Ordering::Release);
                }
            });
        }
        assert_eq!(Arc::strong_count(&ind), 1);
    }

    #[test]
    fn spawned_tasks_run_in_the_same_dispatcher() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut d = Dispatcher::new();
        let spawner = d.spawner();
        let l = Rc::clone(&log);
        d.spawn(async move {
            for n in 0..3 {
                let l = Rc::clone(&l);
                spawner.spawn(async move {
                    yield_now().await;
                    l.borrow_mut().push(n);
                });
            }
        });
        let stats = d.run_with(|_| panic!("never idle"));
        // Finished tasks are swap-removed: the order among siblings is not kept.
        log.borrow_mut().sort();
        assert_eq!(*log.borrow(), vec![0, 1, 2]);
        assert_eq!(stats.polls, 7, "the spawner, then each child twice");
    }

    /// A source that never has work, with a scripted sequence of timers.
    struct Timer {
        timeouts: RefCell<Vec<Option<u64>>>,
        polls: Cell<u32>,
        idle: Cell<bool>,
    }

    impl Source for Timer {
        fn poll(&self) -> bool {
            self.polls.set(self.polls.get() + 1);
            false
        }
        fn idle(&self, idle: bool) {
            self.idle.set(idle);
        }
        fn next_timeout_ns(&self) -> Option<u64> {
            assert!(self.idle.get(), "asked only when about to block");
            self.timeouts.borrow_mut().pop().flatten()
        }
    }

    #[test]
    fn sources_timers_bound_the_block_and_zero_means_no_block() {
        // Popped from the end: no timer, 0 (poll again at once), 5 ms, 2 ms.
        let timer = Rc::new(Timer {
            timeouts: RefCell::new(vec![Some(2_000_000), Some(5_000_000), Some(0), None]),
            polls: Cell::new(0),
            idle: Cell::new(false),
        });
        let mut d = Dispatcher::new();
        d.set_poll_spins(0);
        d.add_source(timer.clone());
        let waker: Rc<RefCell<Option<Waker>>> = Rc::default();
        let w = Rc::clone(&waker);
        d.spawn(poll_fn(move |cx| {
            if w.borrow().is_some() {
                return Poll::Ready(());
            }
            *w.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }));
        let mut seen = Vec::new();
        let stats = d.run_inner(|_, timeout| {
            seen.push(timeout);
            assert!(seen.len() <= 3, "{seen:?}");
            if seen.len() == 3 {
                waker.borrow().as_ref().unwrap().wake_by_ref();
            }
            false
        });
        assert_eq!(seen, vec![None, Some(5_000_000), Some(2_000_000)]);
        assert_eq!(stats.blocks, 3, "the zero timeout did not block");
        assert!(!timer.idle.get(), "told it runs again");
    }

    /// Counts its polls; has work while `work` is set.
    #[derive(Default)]
    struct Counted {
        polls: Cell<u32>,
        work: Cell<bool>,
    }

    impl Source for Counted {
        fn poll(&self) -> bool {
            self.polls.set(self.polls.get() + 1);
            self.work.replace(false)
        }
    }

    #[test]
    fn with_64_indicated_sources_and_one_pending_one_is_polled() {
        let mut d = Dispatcher::new();
        let sources: Vec<Rc<Counted>> = (0..64).map(|_| Rc::new(Counted::default())).collect();
        for s in &sources {
            assert!(d.add_indicated_source(s.clone()).is_some());
        }
        assert_eq!(d.add_indicated_source(Rc::new(Counted::default())), None);
        assert!(
            !d.add_source_with_bit(Rc::new(Counted::default()), 3),
            "taken"
        );
        assert!(
            !d.add_source_with_bit(Rc::new(Counted::default()), 64),
            "no such bit"
        );
        // The first look polls everything once (work from before the routes were set).
        d.poll_sources();
        let polls = || sources.iter().map(|s| s.polls.get()).collect::<Vec<_>>();
        assert!(polls().iter().all(|&p| p == 1));
        // Nothing pending: nothing touched.
        d.poll_sources();
        assert!(polls().iter().all(|&p| p == 1));
        sources[41].work.set(true);
        crate::indicator::raise(1 << 41);
        assert_eq!(d.poll_sources(), 1);
        let p = polls();
        assert_eq!(p[41], 2);
        assert_eq!(p.iter().sum::<u32>(), 65, "one source touched");
        // It had work: polled once more, then left alone.
        assert_eq!(d.poll_sources(), 0);
        d.poll_sources();
        assert_eq!(polls().iter().sum::<u32>(), 66);
    }

    #[test]
    fn indicated_sources_with_a_timer_are_polled_after_a_block() {
        let timer = Rc::new(Timer {
            timeouts: RefCell::new(vec![Some(1_000_000), Some(1_000_000)]),
            polls: Cell::new(0),
            idle: Cell::new(false),
        });
        let mut d = Dispatcher::new();
        d.set_poll_spins(0);
        assert!(d.add_source_with_bit(timer.clone(), 9));
        let waker: Rc<RefCell<Option<Waker>>> = Rc::default();
        let w = Rc::clone(&waker);
        d.spawn(poll_fn(move |cx| {
            if w.borrow().is_some() {
                return Poll::Ready(());
            }
            *w.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }));
        let mut blocks = 0;
        let t = timer.clone();
        d.run_inner(|_, timeout| {
            blocks += 1;
            assert_eq!(timeout, Some(1_000_000));
            if blocks == 2 {
                // Polled after the first block with no bit set: its timer may be due.
                assert_eq!(t.polls.get(), 2, "at start and after the first block");
                waker.borrow().as_ref().unwrap().wake_by_ref();
            }
            false
        });
        assert_eq!(blocks, 2);
    }

    trait ThenUnit: Future + Sized {
        fn then_unit(self) -> impl Future<Output = ()> {
            async move {
                self.await;
            }
        }
    }
    impl<F: Future> ThenUnit for F {}
}
