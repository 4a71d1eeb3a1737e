//! The VM's stateful components under the one contract (`rebound_snapshot::Snapshottable`),
//! registered with the VM's [`Registry`] at build: freeze saves them all, an in-place restore
//! (a rollback) checks and restores them all. A new device registers itself here.
//!
//! | id | component | restored in place |
//! | --- | --- | --- |
//! | `vcpus` | every vCPU's KVM state | yes: each vCPU applies it before it runs again |
//! | `ioq` | the I/O queue's rings and timers | yes |
//! | `clock` | the guest clock and generation | no: guest time stays monotonic across a rollback and the generation only changes on restore or clone; a restored VM continues from them |
//! | `shares` | the shared regions attached | no: shared memory is not rolled back (the controller releases what the VM held); a restored VM re-attaches them by name |
//! | `net` | each NIC's MAC, MTU and rings (VMs with NICs) | yes: the rings as at the checkpoint (frames in flight are dropped; TCP sends them again) |
//! | `memory` | where the guest's memory class table is (ABI 1.8) | yes: the table as registered at the checkpoint; request numbers never go back |
//! | `programs` | programs' tables, their page tables in the pool, the supervisor's context of each running program (ABI 1.10) | yes: pool pages handed out after the checkpoint are not reused |
//! | `replaced` | `cpuid` sites armed in the image, code pages mapped to copies and the tree mapping them (ABI 1.10; the copies themselves are in the pool) | yes |

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rebound_snapshot::Snapshottable;
use rebound_snapshot::component::{Registered, Registry};
use rebound_snapshot::state::VcpuState;
use serde::{Deserialize, Serialize};

use crate::share::{ShareRecord, Shares};
use crate::vm::VmShared;

/// Component ids, as saved state keys them.
pub mod ids {
    /// Every vCPU.
    pub const VCPUS: &str = "vcpus";
    /// The I/O queue.
    pub const IOQ: &str = "ioq";
    /// The guest clock and generation.
    pub const CLOCK: &str = "clock";
    /// The shared regions attached.
    pub const SHARES: &str = "shares";
    /// The network devices (only in VMs that have some).
    pub const NET: &str = "net";
    /// The memory class table's registration.
    pub const MEMORY: &str = "memory";
    /// Programs' protection tables, page tables and running programs (ABI 1.10).
    pub const PROGRAMS: &str = "programs";
    /// Armed `cpuid` sites and copied code pages (ABI 1.10).
    pub const REPLACED: &str = "replaced";
}

/// Why a component's state was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StateError(pub String);

/// The guest clock and generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    /// The guest clock (`CLOCK_MONOTONIC` hypercall) at capture.
    pub clock_ns: u64,
    /// What the guest's `GENERATION` returned.
    pub generation: u64,
}

/// Every vCPU: states are captured on the vCPU threads as they park for a freeze, and applied
/// by them before they run again.
pub(crate) struct Vcpus(pub(crate) Arc<VmShared>);

impl Snapshottable for Vcpus {
    type State = Vec<VcpuState>;
    type Error = StateError;
    const VERSION: u32 = 1;

    fn save(&self) -> Result<Vec<VcpuState>, StateError> {
        let mut out = Vec::new();
        for (id, slot) in self.0.vcpu_slots.iter().enumerate() {
            match slot.captured() {
                Some(Ok(s)) => out.push(s),
                Some(Err(e)) => return Err(StateError(e)),
                None => return Err(StateError(format!("vCPU {id} did not report its state"))),
            }
        }
        Ok(out)
    }

    fn check(&self, states: &Vec<VcpuState>) -> Result<(), StateError> {
        let n = self.0.vcpu_slots.len();
        let mut seen = vec![false; n];
        for s in states {
            match seen.get_mut(s.id as usize) {
                Some(seen) if !*seen => *seen = true,
                _ => {
                    return Err(StateError(format!(
                        "vCPU state {} is duplicated or out of range",
                        s.id
                    )));
                }
            }
        }
        if states.len() != n {
            return Err(StateError(format!(
                "{} vCPU states for {n} vCPUs",
                states.len()
            )));
        }
        Ok(())
    }

    fn restore(&self, states: Vec<VcpuState>) -> Result<(), StateError> {
        self.check(&states)?;
        for s in states {
            let slot = &self.0.vcpu_slots[s.id as usize];
            slot.set_restore(s);
        }
        // Wake every vCPU once after it resumes: its event flags belong to the abandoned future.
        for id in 0..self.0.layout.vcpus() {
            rebound_devices::Notify::notify(&*self.0.waiters, id);
        }
        Ok(())
    }
}

/// The guest clock and generation.
pub(crate) struct Clock(pub(crate) Arc<VmShared>);

impl Snapshottable for Clock {
    type State = ClockState;
    type Error = StateError;
    const VERSION: u32 = 1;

    fn save(&self) -> Result<ClockState, StateError> {
        Ok(ClockState {
            clock_ns: self.0.clock_ns(),
            generation: self.0.generation.load(Ordering::Relaxed),
        })
    }

    fn check(&self, _: &ClockState) -> Result<(), StateError> {
        // Any clock value is a valid past.
        Ok(())
    }

    fn restore(&self, _: ClockState) -> Result<(), StateError> {
        // In place, time goes on: a guest rolled back sees its clock keep rising, and keeps
        // its generation (it is the same VM). A restored VM starts from the saved values.
        Ok(())
    }
}

/// The shared regions attached.
pub(crate) struct SharedRegions(pub(crate) Arc<Shares>);

impl Snapshottable for SharedRegions {
    type State = Vec<ShareRecord>;
    type Error = StateError;
    const VERSION: u32 = 1;

    fn save(&self) -> Result<Vec<ShareRecord>, StateError> {
        Ok(self.0.records())
    }

    fn check(&self, records: &Vec<ShareRecord>) -> Result<(), StateError> {
        for r in records {
            crate::share::check_name("region", &r.config.name)
                .map_err(|e| StateError(e.to_string()))?;
        }
        Ok(())
    }

    fn restore(&self, records: Vec<ShareRecord>) -> Result<(), StateError> {
        // Shared memory is other VMs' too and is not rolled back; the attachments stay as they
        // are (the controller releases what the rolled-back VM held there).
        self.check(&records)
    }
}

/// The memory class table's registration.
pub(crate) struct MemoryClasses(pub(crate) Arc<VmShared>);

impl Snapshottable for MemoryClasses {
    type State = crate::reclaim::TableState;
    type Error = StateError;
    const VERSION: u32 = 1;

    fn save(&self) -> Result<crate::reclaim::TableState, StateError> {
        Ok(self.0.classes.state())
    }

    fn check(&self, _: &crate::reclaim::TableState) -> Result<(), StateError> {
        // Any address: the table is checked each time it is read.
        Ok(())
    }

    fn restore(&self, s: crate::reclaim::TableState) -> Result<(), StateError> {
        self.0.classes.set_state(s);
        Ok(())
    }
}

/// Programs (ABI 1.10).
pub(crate) struct Programs(pub(crate) Arc<VmShared>);

impl Snapshottable for Programs {
    type State = crate::program::ProgramsState;
    type Error = StateError;
    const VERSION: u32 = 1;

    fn save(&self) -> Result<Self::State, StateError> {
        Ok(self.0.programs.state())
    }

    fn check(&self, s: &Self::State) -> Result<(), StateError> {
        self.0.programs.check(s, &self.0).map_err(StateError)
    }

    fn restore(&self, s: Self::State) -> Result<(), StateError> {
        self.check(&s)?;
        self.0.programs.set_state(s);
        Ok(())
    }
}

/// Armed sites and copied code pages (ABI 1.10).
pub(crate) struct Replaced(pub(crate) Arc<VmShared>);

impl Snapshottable for Replaced {
    type State = crate::emulate::replace::ReplaceState;
    type Error = StateError;
    const VERSION: u32 = 1;

    fn save(&self) -> Result<Self::State, StateError> {
        Ok(self.0.emulator.replacer.state())
    }

    fn check(&self, s: &Self::State) -> Result<(), StateError> {
        self.0
            .emulator
            .replacer
            .check(s, &self.0)
            .map_err(StateError)
    }

    fn restore(&self, s: Self::State) -> Result<(), StateError> {
        self.check(&s)?;
        self.0.emulator.set_replace_state(s);
        Ok(())
    }
}

/// The registry of a VM built around `shared`.
pub(crate) fn registry(shared: &Arc<VmShared>) -> Registry {
    let mut r = Registry::default();
    r.register(Box::new(Registered::new(ids::VCPUS, Vcpus(shared.clone()))));
    r.register(Box::new(Registered::new(ids::IOQ, shared.ioq.clone())));
    r.register(Box::new(Registered::new(ids::CLOCK, Clock(shared.clone()))));
    r.register(Box::new(Registered::new(
        ids::SHARES,
        SharedRegions(shared.shares.clone()),
    )));
    if let Some(n) = &shared.nics {
        r.register(Box::new(Registered::new(ids::NET, n.clone())));
    }
    r.register(Box::new(Registered::new(
        ids::MEMORY,
        MemoryClasses(shared.clone()),
    )));
    r.register(Box::new(Registered::new(
        ids::PROGRAMS,
        Programs(shared.clone()),
    )));
    r.register(Box::new(Registered::new(
        ids::REPLACED,
        Replaced(shared.clone()),
    )));
    r
}
