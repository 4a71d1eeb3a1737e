//! The host memory manager: every tick it reads each VM's memory and the host's, spreads the
//! budget across the VMs by [`policy`](crate::policy), and sets each VM's target.
//!
//! The budget it works to is the configured one, lowered to what the host really has
//! (`MemAvailable` less a reserve) and, while the kernel reports memory pressure
//! (`/proc/pressure/memory` `some avg10` above a threshold), a step below what the VMs hold,
//! so the host never swaps or runs out while the guests keep running.

use std::sync::Arc;

use rebound_vmm::Vm;
use serde::Serialize;

use crate::part::MemoryPart;
use crate::policy::{self, VmUse};
use crate::pressure::HostMemory;
use crate::{Error, PAGES_PER_MIB, Result};

/// One VM as the manager reaches it.
pub trait Member: Send {
    /// Its name (for reports).
    fn name(&self) -> String;
    /// Its memory now.
    fn report(&self) -> Result<MemberReport>;
    /// Sets its target, in pages.
    fn set_target(&self, pages: u64) -> Result<()>;
}

/// What the manager needs of a VM (pages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemberReport {
    /// Host memory it holds.
    pub resident: u64,
    /// Its cache class.
    pub cache: u64,
    /// What it gave up on request and may take back.
    pub given: u64,
    /// Its memory size.
    pub size: u64,
}

/// The manager's settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// The VMs together hold at most this much host memory (pages).
    pub budget_pages: u64,
    /// No VM is taken below this (pages).
    pub min_pages: u64,
    /// Host memory never planned for VMs (bytes of `MemAvailable` kept free).
    pub reserve_bytes: u64,
    /// `some avg10` (percent) above which the host is under pressure.
    pub pressure_avg10: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            budget_pages: u64::MAX,
            min_pages: 16 * PAGES_PER_MIB,
            reserve_bytes: 256 << 20,
            pressure_avg10: 10.0,
        }
    }
}

/// What one tick decided.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Tick {
    /// The budget worked to (pages).
    pub budget_pages: u64,
    /// What the VMs held (pages).
    pub resident_pages: u64,
    /// Each member: name, resident pages, new target (None: unreachable).
    pub members: Vec<(String, u64, Option<u64>)>,
}

/// The manager.
pub struct Manager {
    settings: Settings,
    members: Vec<Box<dyn Member>>,
}

impl Manager {
    /// A manager of `members`.
    pub fn new(settings: Settings, members: Vec<Box<dyn Member>>) -> Self {
        Self { settings, members }
    }

    /// Changes the budget (pages).
    pub fn set_budget(&mut self, pages: u64) {
        self.settings.budget_pages = pages;
    }

    /// The settings.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// The budget to work to now, given the host's state and what the VMs hold.
    pub fn effective_budget(&self, host: &HostMemory, resident: u64) -> u64 {
        let mut b = self.settings.budget_pages;
        if host.total > 0 {
            let spare = host.available.saturating_sub(self.settings.reserve_bytes) / 4096;
            b = b.min(resident + spare);
        }
        if host.some_avg10 > self.settings.pressure_avg10 {
            b = b.min(resident - resident / 20);
        }
        b
    }

    /// Reads every member, plans, and sets targets. Members that cannot be reached are left
    /// out of the plan (and reported).
    pub fn tick(&mut self, host: &HostMemory) -> Tick {
        let mut reached = Vec::new();
        let mut tick = Tick::default();
        for (i, m) in self.members.iter().enumerate() {
            match m.report() {
                Ok(r) => reached.push((i, r)),
                Err(e) => {
                    tracing::warn!(member = %m.name(), "memory manager: {e}");
                    tick.members.push((m.name(), 0, None));
                }
            }
        }
        let resident: u64 = reached.iter().map(|(_, r)| r.resident).sum();
        let budget = self.effective_budget(host, resident);
        let uses: Vec<VmUse> = reached
            .iter()
            .map(|(_, r)| VmUse {
                resident: r.resident,
                cache: r.cache,
                min: self.settings.min_pages.min(r.size),
                given: r.given,
            })
            .collect();
        let plans = policy::spread(&uses, budget);
        // Room nobody is owed is shared equally as headroom, so VMs may grow a little
        // without a request.
        let planned: u64 = plans.iter().map(|p| p.target).sum();
        let headroom = budget.saturating_sub(planned) / (plans.len().max(1) as u64);
        for ((i, r), plan) in reached.iter().zip(&plans) {
            let m = &self.members[*i];
            let target = if plan.delta > 0 {
                plan.target
            } else {
                (plan.target + headroom).min(r.size)
            }
            .max(PAGES_PER_MIB);
            if let Err(e) = m.set_target(target) {
                tracing::warn!(member = %m.name(), "memory manager: {e}");
            }
            tick.members.push((m.name(), r.resident, Some(target)));
        }
        tick.budget_pages = budget;
        tick.resident_pages = resident;
        tick
    }
}

/// A VM in this process, reached directly.
pub struct LocalMember {
    /// Its name.
    pub name: String,
    /// The VM.
    pub vm: Arc<Vm>,
    /// Its memory part.
    pub part: MemoryPart,
}

impl Member for LocalMember {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn report(&self) -> Result<MemberReport> {
        if self.vm.outcome().is_some() {
            return Err(Error::Member {
                member: self.name.clone(),
                reason: "the VM has ended".into(),
            });
        }
        let r = self.vm.memory_report();
        Ok(MemberReport {
            resident: r.resident_pages,
            cache: r.cache_pages,
            given: self.part.view(None).given_pages,
            size: r.mem_pages,
        })
    }

    fn set_target(&self, pages: u64) -> Result<()> {
        // Down to whole MiB: the targets the policy spread add up to the budget, and rounding
        // any of them up could put the VMs together above it.
        let mib = (pages / PAGES_PER_MIB).max(1);
        if self.part.target_pages() == Some(mib * PAGES_PER_MIB) {
            return Ok(());
        }
        self.part.set_target(&self.vm, mib, None)
    }
}
