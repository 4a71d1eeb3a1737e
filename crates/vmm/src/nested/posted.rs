//! Posted exits (`NESTED_START`): a nested vCPU on a host thread of its own.
//!
//! With `NESTED_RUN` each nested exit costs the guest VMM an exit of its own (its hypercall
//! returns, and it makes another to run the vCPU again): two exits per nested hypercall where a
//! direct guest pays one. A started vCPU instead runs on a worker thread that posts each exit
//! into the status areas (registers and exit, then `exit_seq`), and waits for the guest VMM to
//! hand it back (`resume_seq = exit_seq`), which the guest VMM does at CPL3 without an exit.
//! Each side spins briefly before it sleeps (the guest VMM in `BLOCK`, which the worker wakes;
//! the worker on an eventfd, which the guest VMM's doorbell port writes through an ioeventfd),
//! so a quick handover costs no exit at all.
//!
//! The worker is part of the VM's run control without being one of its vCPUs: it stops
//! running the nested guest whenever the VM is not running (it is kicked out of `KVM_RUN` like
//! a vCPU), and the controller, once the vCPUs are parked, waits for every worker to be held
//! and harvests the nested VMs' dirty pages, so a checkpoint sees the nested guest stopped and
//! what it wrote. (A parked vCPU that stays parked across a short resume does not pass through
//! its park again, while a worker may have run in between: the controller's wait covers that.)
//! It ends on `NESTED_DESTROY`, a rollback, the VM's stop, or when the nested VMs are dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, VmFd};
use rebound_abi::nested::{
    EXIT_SEQ_OFFSET, Exit, HostStatus, RESUME_SEQ_OFFSET, SLEEPING_OFFSET, WAITING_OFFSET, exit,
};
use rebound_abi::{indicator, port};
use rebound_devices::Notify;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{EXIT, HOST, NestedVm, lock};
use crate::kick;
use crate::memory::GuestMemory;
use crate::wait::{Request, RunControl, Waiters};

/// How long the worker spins for the guest VMM's hand-back before it sleeps: longer than a
/// guest VMM takes to answer a hypercall, including one exit of its own (a console write).
const SPIN: Duration = Duration::from_micros(100);
/// A sleeping worker looks at the run control this often even if nobody rings (a stop it was
/// not told about directly).
const SLEEP_CHECK_MS: i32 = 100;

/// What the worker needs of the VM: no reference to the VM itself, so the VM can drop while
/// workers end.
pub(super) struct Ctx {
    pub(super) mem: GuestMemory,
    pub(super) control: Arc<RunControl>,
    pub(super) waiters: Arc<Waiters>,
}

#[derive(Default)]
struct State {
    /// Not running the nested guest nor writing guest memory until the VM runs again.
    held: bool,
    /// The thread ended.
    done: bool,
}

/// One started nested vCPU's worker.
pub(super) struct Worker {
    /// The value the guest VMM writes to the doorbell port for it (`slot << 8 | vcpu`).
    pub(super) key: u32,
    /// The outer vCPU that started it: the one woken and indicated on posted exits.
    owner: u32,
    stop: AtomicBool,
    /// Rung by the guest VMM's doorbell (an ioeventfd), and by whoever needs the worker back.
    wake: EventFd,
    /// The doorbell's ioeventfd is registered on this VM (taken when unregistered).
    doorbell: Mutex<Option<Arc<VmFd>>>,
    state: Mutex<State>,
    cv: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
    control: Arc<RunControl>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Normally done by `stop`; a registration must not outlive its eventfd.
        self.unregister();
    }
}

/// Where the worker stands with its hand-back wait.
enum Turn {
    Go,
    Hold,
    Stop,
}

/// An aligned word of the status areas, accessed atomically (the guest VMM reads and writes it
/// concurrently). The areas were checked guest-writable and 8-aligned when registered; a word
/// that cannot be read counts as "not handed back".
#[derive(Clone, Copy)]
struct Word<'a> {
    mem: &'a GuestMemory,
    gpa: u64,
}

impl Word<'_> {
    fn load(&self) -> u64 {
        self.mem
            .load(GuestAddress(self.gpa), Ordering::SeqCst)
            .unwrap_or(u64::MAX)
    }

    /// (vm-memory's atomic store also marks the word dirty for checkpoints.)
    fn store(&self, v: u64) {
        let _ = self.mem.store(v, GuestAddress(self.gpa), Ordering::SeqCst);
    }

    fn store32(&self, v: u32) {
        let _ = self.mem.store(v, GuestAddress(self.gpa), Ordering::SeqCst);
    }
}

impl Worker {
    /// Starts the worker of vCPU `vcpu` of `n` (slot `slot`), already marked started.
    pub(super) fn start(
        n: Arc<NestedVm>,
        slot: usize,
        vcpu: u32,
        owner: u32,
        ctx: Ctx,
        vm_fd: Option<&Arc<VmFd>>,
    ) -> Result<Arc<Self>, String> {
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let key = (slot as u32) << 8 | vcpu;
        // Without the ioeventfd the doorbell is an exit that the vCPU loop forwards to `wake`.
        let doorbell = vm_fd.and_then(|fd| {
            match fd.register_ioevent(
                &wake,
                &IoEventAddress::Pio(port::NESTED_DOORBELL.into()),
                key,
            ) {
                Ok(()) => Some(fd.clone()),
                Err(e) => {
                    tracing::warn!(%e, "nested doorbell: no ioeventfd, the doorbell exits");
                    None
                }
            }
        });
        let w = Arc::new(Self {
            key,
            owner,
            stop: AtomicBool::new(false),
            wake,
            doorbell: Mutex::new(doorbell),
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            thread: Mutex::new(None),
            control: ctx.control.clone(),
        });
        let worker = w.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nested-{slot}.{vcpu}"))
            .spawn(move || {
                // Marks the worker done however the body ends (a panic too), so nothing waits
                // for it to hold.
                struct Done(Arc<Worker>);
                impl Drop for Done {
                    fn drop(&mut self) {
                        lock(&self.0.state).done = true;
                        self.0.cv.notify_all();
                    }
                }
                let done = Done(worker);
                done.0.body(&n, slot, vcpu, &ctx);
            })
            .map_err(|e| {
                w.unregister();
                format!("spawn: {e}")
            })?;
        *lock(&w.thread) = Some(thread);
        Ok(w)
    }

    fn unregister(&self) {
        let fd = lock(&self.doorbell).take();
        if let Some(fd) = fd {
            let _ = fd.unregister_ioevent(
                &self.wake,
                &IoEventAddress::Pio(port::NESTED_DOORBELL.into()),
                self.key,
            );
        }
    }

    /// The doorbell rang without the ioeventfd (another width, or none registered).
    pub(super) fn ring(&self) {
        let _ = self.wake.write(1);
    }

    /// Gets the worker out of `KVM_RUN` and out of its sleep, to look at the run control.
    pub(super) fn kick(&self) {
        let _ = self.wake.write(1);
        if let Some(t) = lock(&self.thread).as_ref() {
            kick::kick(t);
        }
    }

    /// Waits until the worker runs no guest code and writes no guest memory (the VM is
    /// pausing or stopping), or the VM runs again; false if that took longer than `limit`.
    pub(super) fn quiesce(&self, limit: Duration) -> bool {
        self.kick();
        let deadline = Instant::now() + limit;
        let mut s = lock(&self.state);
        // A stopping VM's worker ends (done): wait for that too, so nothing reads memory while
        // it posts.
        while !s.held && !s.done && self.control.current() != Request::Run {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // The worker notifies when it holds or ends; a resume in between is seen by the
            // timeout (the run control's own wake-up does not reach this condvar).
            s = self
                .cv
                .wait_timeout(s, (deadline - now).min(Duration::from_millis(10)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Ends the worker and waits for its thread.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
        self.control.poke();
        let t = lock(&self.thread).take();
        if let Some(t) = t
            && t.join().is_err()
        {
            tracing::warn!(key = self.key, "nested worker panicked");
        }
        self.unregister();
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Holds while the VM is paused; false if the worker must end.
    fn hold(&self) -> bool {
        {
            let mut s = lock(&self.state);
            s.held = true;
            self.cv.notify_all();
        }
        let go_on = self.control.wait_while_paused(&self.stop);
        lock(&self.state).held = false;
        go_on && !self.stopping()
    }

    fn body(&self, n: &NestedVm, slot: usize, vcpu: u32, ctx: &Ctx) {
        let Some(cell) = n.vcpus.get(vcpu as usize) else {
            return;
        };
        let mut guard = lock(cell);
        let Some(v) = guard.as_mut() else {
            return;
        };
        let areas = v.areas;
        let word = |off| Word {
            mem: &ctx.mem,
            gpa: areas + off,
        };
        let (resume, exit_seq, waiting, sleeping) = (
            word(RESUME_SEQ_OFFSET),
            word(EXIT_SEQ_OFFSET),
            word(WAITING_OFFSET),
            word(SLEEPING_OFFSET),
        );
        kick::arm(&mut v.fd);
        let route = indicator::slot(indicator::KIND_NESTED, slot as u64);
        let mut host: HostStatus = ctx
            .mem
            .read_obj(GuestAddress(areas + HOST))
            .unwrap_or_default();
        // NESTED_START set both sequences to 0; the host's own copy is what counts (the guest
        // VMM may write anything into the areas, and the counters wrap).
        let mut seq = 0u64;
        loop {
            match self.wait_turn(ctx, resume, sleeping, seq) {
                Turn::Go => {}
                Turn::Hold if self.hold() => continue,
                Turn::Hold | Turn::Stop => break,
            }
            let reason = match n.run_vcpu(&ctx.mem, &ctx.control, v, 0, Some(&self.stop)) {
                // Nothing happened to the nested guest: the VM pauses or the worker ends.
                Ok((exit::INTERRUPTED, _)) => continue,
                Ok((reason, ns)) => {
                    host.runs = host.runs.wrapping_add(1);
                    host.exits = host.exits.wrapping_add(1);
                    host.guest_ns = host.guest_ns.wrapping_add(ns);
                    host.last_exit = reason;
                    host.error = 0;
                    reason
                }
                Err(e) => {
                    host.error = e as i32;
                    host.last_exit = exit::FAILED;
                    let failed = Exit {
                        reason: exit::FAILED,
                        ..Default::default()
                    };
                    let _ = ctx.mem.write_obj(failed, GuestAddress(areas + EXIT));
                    exit::FAILED
                }
            };
            // Counters first, then the sequence that hands the exit over.
            host.exit_seq = seq;
            host.sleeping = 0;
            host.started = 1;
            let _ = ctx.mem.write_obj(host, GuestAddress(areas + HOST));
            seq = seq.wrapping_add(1);
            exit_seq.store(seq);
            // Read after the store (both SeqCst): a guest VMM that said it waits after this
            // load sees the new sequence before it blocks.
            if waiting.load() != 0 {
                if let Some(r) = route {
                    ctx.waiters.indicate(Some(self.owner), r);
                }
                ctx.waiters.notify(self.owner);
            }
            tracing::trace!(slot, vcpu, reason, seq, "nested exit posted");
        }
        kick::disarm();
    }

    /// Waits until the guest VMM hands the vCPU back (`resume_seq == seq`), spinning for a while
    /// and then sleeping on the doorbell.
    fn wait_turn(&self, ctx: &Ctx, resume: Word<'_>, sleeping: Word<'_>, seq: u64) -> Turn {
        let mut until = Instant::now() + SPIN;
        let mut spins = 0u32;
        loop {
            if self.stopping() {
                return Turn::Stop;
            }
            match ctx.control.current() {
                Request::Run => {}
                Request::Pause => return Turn::Hold,
                Request::Stop => return Turn::Stop,
            }
            if resume.load() == seq {
                return Turn::Go;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || Instant::now() < until {
                std::hint::spin_loop();
                continue;
            }
            // Say it sleeps, then look once more (the guest VMM stores `resume_seq`, then
            // reads `sleeping`): one of the two sees the other's store.
            sleeping.store32(1);
            if resume.load() == seq {
                sleeping.store32(0);
                return Turn::Go;
            }
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.wake),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the call.
            unsafe { libc::poll(&mut pfd, 1, SLEEP_CHECK_MS) };
            let _ = self.wake.read();
            sleeping.store32(0);
            until = Instant::now() + SPIN;
        }
    }
}
