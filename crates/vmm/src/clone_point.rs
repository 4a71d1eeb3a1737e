//! Clone points (ABI 1.9): a VM cloned where its guest says it is safe to be.
//!
//! A VM snapshotted at an arbitrary instruction may be in the middle of a job it took from a
//! queue it shares with other VMs, or inside a shared lock; its clone would finish that job a
//! second time. So the host asks first ([`rebound_abi::request::CLONE`] in the boot info, the
//! vCPUs woken), the guest calls `CLONE_POINT` where it holds nothing shared, and the call keeps
//! its vCPU in the VMM (blocked, not spinning) until the controller has frozen the VM. The
//! snapshot then holds the vCPU just past the call: the VM and every VM restored from the file
//! return from the same call, and `GENERATION` tells them apart.
//!
//! The guest is trusted with nothing: a point nobody asked for returns at once, a second vCPU
//! reaching it meanwhile returns at once, a guest that never calls it makes the request time
//! out, and a vCPU is held at most [`HOLD`]. Before writing the snapshot the controller checks,
//! inside the freeze, that the vCPU parked from the point in this very pause (not in an
//! earlier pause after which it ran on).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::vm::VmShared;
use crate::wait::{Request, Wake};

/// Longest a vCPU is held at a clone point waiting for the freeze.
pub const HOLD: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No clone asked for.
    Idle,
    /// Asked; the guest has not reached a point yet.
    Armed,
    /// A vCPU is held at the point.
    Reached { vcpu: u32 },
    /// The held vCPU left the point to park, in pause number `pause`.
    Parked { pause: u64 },
    /// The vCPU was released without parking (the hold ran out).
    Left,
}

/// The VM's clone point: the controller's request and the held vCPU.
pub(crate) struct Gate {
    state: Mutex<State>,
    cv: Condvar,
    /// Pauses begun (the controller counts each before asking vCPUs to stop).
    pauses: AtomicU64,
    /// `CLONE_POINT` calls, and the ones that held a vCPU for a clone.
    calls: AtomicU64,
    held: AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::Idle),
            cv: Condvar::new(),
            pauses: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }
}

/// Whether a clone is being taken.
fn busy(s: State) -> bool {
    matches!(
        s,
        State::Armed | State::Reached { .. } | State::Parked { .. }
    )
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Gate {
    /// A pause begins (before the vCPUs are asked to stop).
    pub(crate) fn note_pause(&self) {
        self.pauses.fetch_add(1, Ordering::SeqCst);
    }

    /// Asks `vm`'s guest for a clone point (the request bit is set with the state, under its
    /// lock); false if one is already being taken.
    pub(crate) fn arm(&self, vm: &VmShared) -> crate::Result<bool> {
        let mut s = lock(&self.state);
        if busy(*s) {
            return Ok(false);
        }
        vm.update_requests(rebound_abi::request::CLONE, 0)?;
        *s = State::Armed;
        Ok(true)
    }

    /// Ends the request (taken, or given up): the bit is cleared and a vCPU still held is
    /// released.
    pub(crate) fn disarm(&self, vm: &VmShared) {
        let mut s = lock(&self.state);
        let _ = vm.update_requests(0, rebound_abi::request::CLONE);
        *s = State::Idle;
        self.cv.notify_all();
    }

    /// Waits up to `timeout` for a vCPU to reach the point.
    pub(crate) fn wait_reached(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.state);
        loop {
            match *s {
                State::Reached { .. } => return true,
                State::Armed => {}
                _ => return false,
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether the held vCPU parked from the point in the current pause (call while frozen).
    pub(crate) fn parked_now(&self) -> bool {
        *lock(&self.state)
            == State::Parked {
                pause: self.pauses.load(Ordering::SeqCst),
            }
    }

    /// Counters: calls, and calls that held a vCPU for a clone.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.held.load(Ordering::Relaxed),
        )
    }

    /// `CLONE_POINT` from `vcpu`: holds it while a requested clone is taken.
    pub(crate) fn point(&self, vm: &VmShared, vcpu: u32) -> i64 {
        self.calls.fetch_add(1, Ordering::Relaxed);
        {
            let mut s = lock(&self.state);
            if *s != State::Armed {
                // Nothing asked: a bit the guest still sees is stale (memory rolled back, or
                // restored from before the request was answered). Cleared under the state's
                // lock, so never a new request's; else the guest would come back after every
                // job.
                let _ = vm.update_requests(0, rebound_abi::request::CLONE);
                return 0;
            }
            *s = State::Reached { vcpu };
            self.cv.notify_all();
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        // The request is answered: the snapshot must not show it pending to the clone.
        let _ = vm.update_requests(0, rebound_abi::request::CLONE);
        let deadline = Instant::now() + HOLD;
        let mut event = false;
        loop {
            if vm.control.current() != Request::Run {
                let mut s = lock(&self.state);
                if *s == (State::Reached { vcpu }) {
                    *s = State::Parked {
                        pause: self.pauses.load(Ordering::SeqCst),
                    };
                }
                break;
            }
            if *lock(&self.state) != (State::Reached { vcpu }) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let mut s = lock(&self.state);
                if *s == (State::Reached { vcpu }) {
                    *s = State::Left;
                }
                break;
            }
            // The controller's disarm or freeze wakes the vCPU (both notify or interrupt it).
            if vm
                .waiters
                .block(vcpu, Some((deadline - now).min(HOLD)), &vm.control)
                == Wake::Event
            {
                event = true;
            }
        }
        if event {
            // An event for the guest arrived while it was held: it must still see it.
            vm.waiters.notify_all();
        }
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_clone_at_a_time() {
        assert!(!busy(State::Idle));
        assert!(!busy(State::Left), "a point given up is no obstacle");
        assert!(busy(State::Armed));
        assert!(busy(State::Reached { vcpu: 1 }));
        assert!(busy(State::Parked { pause: 3 }));
    }

    #[test]
    fn parked_counts_only_in_the_pause_it_parked_in() {
        let g = Gate::default();
        *lock(&g.state) = State::Reached { vcpu: 0 };
        g.note_pause();
        *lock(&g.state) = State::Parked {
            pause: g.pauses.load(Ordering::SeqCst),
        };
        assert!(g.parked_now());
        // It ran on after that pause, and a later one froze it elsewhere.
        g.note_pause();
        assert!(!g.parked_now());
    }

    #[test]
    fn nothing_reached_times_out() {
        let g = Gate::default();
        *lock(&g.state) = State::Armed;
        assert!(!g.wait_reached(Duration::from_millis(5)));
    }
}
