//! The placement part: where the VM's vCPUs run and, when a host CPU under them fails, what
//! its recovery attribute makes of that ([`PlacementPart::plan`], pure logic; the instance
//! carries the plan out).

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

use rebound_vmm::Vm;

use crate::host_faults::{Placement, RecoveryAttribute};
use crate::{Error, Result};

/// What to do about a host CPU fault under the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultPlan {
    /// The failed CPUs the VM ran on.
    pub cpus: Vec<usize>,
    /// Its vCPUs that ran there.
    pub vcpus: Vec<usize>,
    /// What to do.
    pub action: RecoveryAttribute,
    /// No healthy CPU is left for some vCPU (so the action is `Stop`).
    pub nowhere: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The placement part of an instance.
#[derive(Default)]
pub struct PlacementPart {
    placement: Mutex<Placement>,
}

impl PlacementPart {
    /// The placement.
    pub fn get(&self) -> Placement {
        lock(&self.placement).clone()
    }

    /// Sets the placement (validated).
    pub fn set(&self, p: Placement) -> Result<()> {
        p.validate().map_err(|reason| Error::Invalid {
            field: "placement",
            reason,
        })?;
        *lock(&self.placement) = p;
        Ok(())
    }

    /// Pins `vm`'s vCPUs as the placement says, avoiding `failed` CPUs.
    pub fn place(&self, vm: &Vm, failed: &BTreeSet<usize>) -> Result<()> {
        let p = self.get();
        if p.cpus.is_empty() && failed.is_empty() {
            return Ok(());
        }
        for i in 0..vm.descriptor().vcpus as usize {
            if let Some(cpus) = p.cpus_for(i, failed) {
                vm.pin_vcpu(i, &cpus)?;
            }
        }
        Ok(())
    }

    /// What to do when host CPUs `failed` are out of service and the vCPUs may run on `now`
    /// (by vCPU); None if none of them runs on a failed CPU. `protected`: whether there is a
    /// checkpoint to go back to.
    pub fn plan(
        &self,
        now: &[Vec<usize>],
        failed: &BTreeSet<usize>,
        protected: bool,
    ) -> Option<FaultPlan> {
        let vcpus: Vec<usize> = (0..now.len())
            .filter(|&i| now[i].iter().any(|c| failed.contains(c)))
            .collect();
        if vcpus.is_empty() {
            return None;
        }
        let cpus: Vec<usize> = now
            .iter()
            .flatten()
            .copied()
            .filter(|c| failed.contains(c))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let p = self.get();
        let nowhere = (0..now.len()).any(|i| p.cpus_for(i, failed).is_none());
        let mut action = if nowhere {
            RecoveryAttribute::Stop
        } else {
            p.recovery
        };
        if action == RecoveryAttribute::RestartFromCheckpoint && !protected {
            action = RecoveryAttribute::Stop;
        }
        Some(FaultPlan {
            cpus,
            vcpus,
            action,
            nowhere,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(recovery: RecoveryAttribute) -> PlacementPart {
        let p = PlacementPart::default();
        p.set(Placement {
            cpus: Vec::new(),
            recovery,
            save_area: None,
        })
        .unwrap();
        p
    }

    #[test]
    fn untouched_vms_get_no_plan() {
        let p = part(RecoveryAttribute::Resume);
        let failed = BTreeSet::from([5]);
        assert_eq!(p.plan(&[vec![0], vec![1]], &failed, true), None);
    }

    #[test]
    fn the_plan_follows_the_recovery_attribute() {
        let usable = rebound_vmm::affinity::usable();
        let Some(&cpu) = usable.first() else { return };
        let failed = BTreeSet::from([cpu]);
        let now = vec![vec![cpu]];
        let healthy_left = usable.len() > 1;
        let plan = part(RecoveryAttribute::Resume)
            .plan(&now, &failed, false)
            .unwrap();
        assert_eq!(
            (plan.cpus.clone(), plan.vcpus.clone()),
            (vec![cpu], vec![0])
        );
        if healthy_left {
            assert_eq!(plan.action, RecoveryAttribute::Resume);
            // Restart needs a checkpoint: without protection it stops.
            let p = part(RecoveryAttribute::RestartFromCheckpoint);
            assert_eq!(
                p.plan(&now, &failed, false).unwrap().action,
                RecoveryAttribute::Stop
            );
            assert_eq!(
                p.plan(&now, &failed, true).unwrap().action,
                RecoveryAttribute::RestartFromCheckpoint
            );
        } else {
            assert!(plan.nowhere);
            assert_eq!(plan.action, RecoveryAttribute::Stop);
        }
        // Every usable CPU failed: nowhere to go.
        let all: BTreeSet<usize> = usable.iter().copied().collect();
        let plan = part(RecoveryAttribute::Resume)
            .plan(&now, &all, true)
            .unwrap();
        assert!(plan.nowhere);
        assert_eq!(plan.action, RecoveryAttribute::Stop);
    }

    #[test]
    fn failover_is_accepted_and_a_bad_placement_changes_nothing() {
        let p = part(RecoveryAttribute::Stop);
        p.set(Placement {
            cpus: Vec::new(),
            recovery: RecoveryAttribute::Failover,
            save_area: None,
        })
        .unwrap();
        assert_eq!(p.get().recovery, RecoveryAttribute::Failover);
        let e = p
            .set(Placement {
                cpus: vec![usize::MAX],
                recovery: RecoveryAttribute::Resume,
                save_area: None,
            })
            .unwrap_err();
        assert!(e.to_string().contains("not usable"), "{e}");
        assert_eq!(p.get().recovery, RecoveryAttribute::Failover);
    }
}
