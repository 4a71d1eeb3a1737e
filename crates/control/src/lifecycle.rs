//! The instance's life as a table: one [`Phase`], the [`Request`]s the API and CLI make, and
//! [`transition`], which says for every (phase, request) pair whether it is allowed and where
//! it leads. [`Lifecycle`] holds the phase (and the VM once built) behind one short lock.
//!
//! Starting (a boot, a snapshot load, a recovery) is a phase of its own, entered atomically
//! and left either with a VM or, on any failure, back at `NotStarted` with nothing consumed:
//! a refused start changes nothing, by construction ([`Starting`] undoes itself when dropped).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rebound_vmm::{Vm, VmState};

use crate::{Error, Result};

/// Where the instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Being configured; nothing built.
    NotStarted,
    /// A start, snapshot load or recovery is building the VM.
    Starting,
    /// The VM runs (a VM stopped for a moment by a checkpoint is still running).
    Running,
    /// Paused by its owner.
    Paused,
    /// The VM ended.
    Exited,
}

impl Phase {
    /// Every phase (for tables and tests).
    pub const ALL: [Phase; 5] = [
        Phase::NotStarted,
        Phase::Starting,
        Phase::Running,
        Phase::Paused,
        Phase::Exited,
    ];

    /// The phase's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Phase::NotStarted => "not started",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Exited => "exited",
        }
    }

    fn of(vm: &Vm) -> Phase {
        match vm.state() {
            VmState::Running => Phase::Running,
            VmState::Paused => Phase::Paused,
            VmState::Exited => Phase::Exited,
        }
    }
}

/// What can be asked of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Request {
    /// Change a piece of the configuration (named as in messages: "the boot source").
    Configure(&'static str),
    /// Build and boot the VM.
    Start,
    /// Build the VM from a snapshot.
    LoadSnapshot,
    /// Take a VM over from its state directory.
    Recover,
    /// Pause (the owner's pause).
    Pause,
    /// Resume.
    Resume,
    /// Write a snapshot.
    Snapshot,
    /// Start protection.
    Protect,
    /// Stop protection.
    Unprotect,
    /// Take a checkpoint now.
    Checkpoint,
    /// Roll back.
    Rollback,
    /// Hand the VM to a new VMM program.
    LiveUpdate,
    /// Attach or detach a shared region (configuration before start, live after).
    Share,
    /// Ask the guest to shut down (Firecracker's `SendCtrlAltDel`).
    Shutdown,
    /// Read what only a built VM has (metrics, waiting for its end).
    Observe,
    /// Change the VM's memory target.
    Memory,
}

impl Request {
    /// Every request kind (with one representative `Configure`).
    pub const ALL: [Request; 16] = [
        Request::Configure("the configuration"),
        Request::Start,
        Request::LoadSnapshot,
        Request::Recover,
        Request::Pause,
        Request::Resume,
        Request::Snapshot,
        Request::Protect,
        Request::Unprotect,
        Request::Checkpoint,
        Request::Rollback,
        Request::LiveUpdate,
        Request::Share,
        Request::Shutdown,
        Request::Observe,
        Request::Memory,
    ];

    /// The request in messages.
    pub fn describe(self) -> &'static str {
        match self {
            Request::Configure(what) => what,
            Request::Start => "start",
            Request::LoadSnapshot => "snapshot load",
            Request::Recover => "recovery",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Snapshot => "snapshot",
            Request::Protect => "protection",
            Request::Unprotect => "stopping protection",
            Request::Checkpoint => "checkpoint",
            Request::Rollback => "rollback",
            Request::LiveUpdate => "live update",
            Request::Share => "shared region change",
            Request::Shutdown => "shutdown",
            Request::Observe => "reading the VM's state",
            Request::Memory => "memory target",
        }
    }
}

/// The table: the phase `request` leads to from `phase`, or why it is refused. Requests that
/// build a VM lead to `Starting`; the build's end decides the next phase.
pub fn transition(phase: Phase, request: Request) -> Result<Phase> {
    use Phase::*;
    use Request::*;
    let refused = Err(Error::Transition { request, phase });
    match (phase, request) {
        (NotStarted, Configure(_) | Share) => Ok(NotStarted),
        (NotStarted, Start | LoadSnapshot | Recover) => Ok(Starting),
        (Running | Paused, Pause) => Ok(Paused),
        (Running | Paused, Resume) => Ok(Running),
        (
            Running | Paused,
            Snapshot | Protect | Unprotect | Checkpoint | Rollback | LiveUpdate | Share | Shutdown
            | Observe | Memory,
        ) => Ok(phase),
        // What an ended VM left (its metrics, its outcome) can still be read.
        (Exited, Observe) => Ok(Exited),
        _ => refused,
    }
}

enum Slot {
    Empty,
    Starting,
    Started(Arc<Vm>),
}

/// The instance's phase and, once built, its VM.
pub struct Lifecycle {
    slot: Mutex<Slot>,
    changed: Condvar,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            slot: Mutex::new(Slot::Empty),
            changed: Condvar::new(),
        }
    }
}

fn phase_of(slot: &Slot) -> Phase {
    match slot {
        Slot::Empty => Phase::NotStarted,
        Slot::Starting => Phase::Starting,
        Slot::Started(vm) => Phase::of(vm),
    }
}

impl Lifecycle {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        phase_of(&self.lock())
    }

    /// The VM, once built.
    pub fn vm(&self) -> Option<Arc<Vm>> {
        match &*self.lock() {
            Slot::Started(vm) => Some(vm.clone()),
            _ => None,
        }
    }

    /// Checks `request` against the table; returns the VM it applies to.
    pub fn vm_for(&self, request: Request) -> Result<Arc<Vm>> {
        let slot = self.lock();
        transition(phase_of(&slot), request)?;
        match &*slot {
            Slot::Started(vm) => Ok(vm.clone()),
            // The table allows no VM request before start; this is the same refusal.
            _ => Err(Error::Transition {
                request,
                phase: phase_of(&slot),
            }),
        }
    }

    /// Runs `f` (a configuration change) only if the table allows `request` now, with the
    /// phase held: no start can begin while it runs, so a change is either in the VM or
    /// refused, never lost in between.
    pub fn configure<T>(&self, request: Request, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let slot = self.lock();
        transition(phase_of(&slot), request)?;
        let r = f();
        drop(slot);
        r
    }

    /// Enters `Starting` for `request` (a start, load or recovery).
    pub fn begin(&self, request: Request) -> Result<Starting<'_>> {
        let mut slot = self.lock();
        let next = transition(phase_of(&slot), request)?;
        debug_assert_eq!(next, Phase::Starting);
        *slot = Slot::Starting;
        Ok(Starting {
            lifecycle: self,
            done: false,
        })
    }

    /// Blocks until a VM is built (e.g. by the API), then returns it.
    pub fn wait_started(&self) -> Arc<Vm> {
        let mut slot = self.lock();
        loop {
            if let Slot::Started(vm) = &*slot {
                return vm.clone();
            }
            slot = self.changed.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A start in progress: [`complete`](Self::complete) it with the VM, or drop it to go back to
/// `NotStarted` as if nothing had been asked.
pub struct Starting<'a> {
    lifecycle: &'a Lifecycle,
    done: bool,
}

impl Starting<'_> {
    /// The VM is built: the instance has started.
    pub fn complete(mut self, vm: Arc<Vm>) {
        *self.lifecycle.lock() = Slot::Started(vm);
        self.done = true;
        self.lifecycle.changed.notify_all();
    }
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        if !self.done {
            *self.lifecycle.lock() = Slot::Empty;
            self.lifecycle.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole table, written out: every (phase, request) pair and what it gives. A change to
    /// `transition` that is not also made here fails.
    #[test]
    fn every_pair_is_as_the_table_says() {
        use Phase::*;
        let expected = |phase: Phase, request: Request| -> Option<Phase> {
            let started = matches!(phase, Running | Paused);
            match request {
                Request::Configure(_) => (phase == NotStarted).then_some(NotStarted),
                Request::Start | Request::LoadSnapshot | Request::Recover => {
                    (phase == NotStarted).then_some(Starting)
                }
                Request::Pause => started.then_some(Paused),
                Request::Resume => started.then_some(Running),
                Request::Share => (phase == NotStarted || started).then_some(phase),
                Request::Observe => matches!(phase, Running | Paused | Exited).then_some(phase),
                Request::Snapshot
                | Request::Protect
                | Request::Unprotect
                | Request::Checkpoint
                | Request::Rollback
                | Request::LiveUpdate
                | Request::Shutdown
                | Request::Memory => started.then_some(phase),
            }
        };
        let mut pairs = 0;
        for phase in Phase::ALL {
            for request in Request::ALL {
                let got = transition(phase, request).ok();
                assert_eq!(got, expected(phase, request), "{phase:?} + {request:?}");
                pairs += 1;
            }
        }
        assert_eq!(pairs, Phase::ALL.len() * Request::ALL.len());
    }

    #[test]
    fn refusals_name_the_request_and_the_phase() {
        let e = transition(Phase::NotStarted, Request::Pause).unwrap_err();
        assert_eq!(e.to_string(), "pause: the instance is not started");
        let e = transition(Phase::Running, Request::Configure("the boot source")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the boot source cannot be changed after the instance started"
        );
        let e = transition(Phase::Paused, Request::Start).unwrap_err();
        assert!(e.to_string().contains("already started"), "{e}");
        let e = transition(Phase::Starting, Request::Configure("the drive")).unwrap_err();
        assert!(e.to_string().contains("starting"), "{e}");
        let e = transition(Phase::Exited, Request::Resume).unwrap_err();
        assert!(e.to_string().contains("ended"), "{e}");
        assert_eq!(e.kind(), crate::ErrorKind::Conflict);
    }

    #[test]
    fn a_dropped_start_goes_back_to_not_started() {
        let l = Lifecycle::default();
        assert_eq!(l.phase(), Phase::NotStarted);
        {
            let _s = l.begin(Request::Start).unwrap();
            assert_eq!(l.phase(), Phase::Starting);
            // Nothing else may start, and configuration waits for the outcome.
            assert!(l.begin(Request::LoadSnapshot).is_err());
            assert!(
                l.configure(Request::Configure("the drive"), || Ok(()))
                    .is_err()
            );
            assert!(l.vm_for(Request::Pause).is_err());
        }
        assert_eq!(l.phase(), Phase::NotStarted);
        assert!(
            l.configure(Request::Configure("the drive"), || Ok(()))
                .is_ok()
        );
        assert!(l.begin(Request::Recover).is_ok());
    }

    #[test]
    fn configure_runs_only_when_allowed() {
        let l = Lifecycle::default();
        let mut ran = false;
        l.configure(Request::Configure("x"), || {
            ran = true;
            Ok(())
        })
        .unwrap();
        assert!(ran);
        let _s = l.begin(Request::Start).unwrap();
        let mut ran = false;
        let r = l.configure(Request::Configure("x"), || {
            ran = true;
            Ok(())
        });
        assert!(r.is_err() && !ran);
    }
}
