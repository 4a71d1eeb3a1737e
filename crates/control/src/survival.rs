//! The survival part: the state directory a VM lives in (so it outlives this process), what
//! this process knows of the VM's survival so far, and the live update that hands the VM to a
//! new VMM program.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rebound_checkpoint::state_dir::{Claim, StateDir};
use rebound_vmm::{Vm, VmState};
use serde::Serialize;

use crate::host_faults::{CpuFaultEvent, Placement};
use crate::protection::{Protection, Protector};
use crate::{Error, Result};

/// What a new VMM process needs to take a VM over in a live update. The VM is paused, its
/// last checkpoint committed in `state_dir`; memory stays where it is.
#[derive(Clone, Debug)]
pub struct Handover {
    /// The VM's state directory.
    pub state_dir: PathBuf,
    /// `CLOCK_MONOTONIC` when the guest was paused (the new process measures downtime).
    pub paused_at_ns: u64,
    /// The protection to go on with.
    pub protection: Protection,
    /// The checkpoint committed last.
    pub epoch: u64,
    /// Whether the guest should run once taken over (it was not paused by its user).
    pub resume: bool,
    /// The VM's disk image, if it has one outside the state directory.
    pub disk: Option<PathBuf>,
    /// Its mirror, if it has one that has not failed (the new VMM resyncs it).
    pub disk_mirror: Option<PathBuf>,
    /// The program to take over (None: the updater's default).
    pub binary: Option<PathBuf>,
    /// Where the vCPUs run and the recovery attribute.
    pub placement: Placement,
    /// Shared-region member slots whose locks stay held across the exec, for the new process
    /// (the value of `rebound_vmm::share::INHERITED_CLAIMS_ENV`; empty: none).
    pub share_claims: String,
}

/// Starts the new VMM program for a live update (e.g. with `exec`). It returns only if that
/// failed, with why; the VM then resumes here.
pub type Updater = Box<dyn Fn(&Handover) -> std::io::Error + Send + Sync>;

/// How this VM has survived so far (`GET /survival` reports it).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Survival {
    /// The state directory, if the VM lives in one.
    pub state_dir: Option<PathBuf>,
    /// The checkpoint this process took the VM over at (recovery or live update).
    pub resumed_from_epoch: Option<u64>,
    /// Pages written back from the undo journal at that takeover.
    pub undone_pages: Option<usize>,
    /// Guest paused to guest running in the live update that started this process, in
    /// microseconds.
    pub update_downtime_us: Option<f64>,
    /// Where the vCPUs run and the recovery attribute.
    pub placement: Placement,
    /// The host CPUs each vCPU may run on now.
    pub vcpu_cpus: Vec<Vec<usize>>,
    /// Host CPU faults the VM went through.
    pub cpu_faults: Vec<CpuFaultEvent>,
}

/// `CLOCK_MONOTONIC` in nanoseconds: comparable across an `exec` on the same host, unlike
/// `Instant`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The survival part of an instance.
#[derive(Default)]
pub struct SurvivalPart {
    /// The preserved region, if the VM lives in one, and this process's claim on it.
    dir: Mutex<Option<(StateDir, Claim)>>,
    /// The VM was just recovered at this epoch: its records still describe it.
    recovered: Mutex<Option<u64>>,
    report: Mutex<Survival>,
    updater: Mutex<Option<Updater>>,
}

impl SurvivalPart {
    /// The state directory, if the VM lives in one.
    pub fn dir(&self) -> Option<StateDir> {
        lock(&self.dir).as_ref().map(|(d, _)| d.clone())
    }

    /// Puts the VM (to be built) in a new state directory at `path`, claimed by this process.
    /// The path must be absolute; nothing is created unless it is accepted.
    pub fn set_dir(&self, path: &Path) -> Result<()> {
        if !path.is_absolute() {
            return Err(Error::Invalid {
                field: "path",
                reason: format!(
                    "{}: give an absolute path (a state directory must not depend on the VMM's working directory)",
                    path.display()
                ),
            });
        }
        let dir = StateDir::create(path)?;
        let claim = dir.claim()?;
        *lock(&self.dir) = Some((dir, claim));
        Ok(())
    }

    /// Records a VM taken over from `dir` at checkpoint `epoch` with `undone_pages` undone.
    pub fn adopted(&self, dir: StateDir, claim: Claim, epoch: u64, undone_pages: usize) {
        {
            let mut r = lock(&self.report);
            r.resumed_from_epoch = Some(epoch);
            r.undone_pages = Some(undone_pages);
        }
        *lock(&self.dir) = Some((dir, claim));
        *lock(&self.recovered) = Some(epoch);
    }

    /// The epoch of a recovery that no protection has started from yet (taken: asked once).
    pub fn take_recovered(&self) -> Option<u64> {
        lock(&self.recovered).take()
    }

    /// Records a host CPU fault the VM went through.
    pub fn note_cpu_fault(&self, ev: CpuFaultEvent) {
        lock(&self.report).cpu_faults.push(ev);
    }

    /// Records that this process took the VM over in a live update whose old process paused
    /// the guest at `paused_at_ns` (`CLOCK_MONOTONIC`); returns the downtime.
    pub fn note_update(&self, paused_at_ns: u64) -> Duration {
        let downtime = Duration::from_nanos(monotonic_ns().saturating_sub(paused_at_ns));
        lock(&self.report).update_downtime_us = Some(downtime.as_secs_f64() * 1e6);
        tracing::info!(?downtime, "live update complete");
        downtime
    }

    /// The report, completed with where the VM runs now.
    pub fn report(&self, placement: Placement, vcpu_cpus: Vec<Vec<usize>>) -> Survival {
        let mut s = lock(&self.report).clone();
        s.state_dir = self.dir().map(|d| d.path().to_path_buf());
        s.placement = placement;
        s.vcpu_cpus = vcpu_cpus;
        s
    }

    /// Sets how a live update starts the new VMM program.
    pub fn set_updater(&self, f: Updater) {
        *lock(&self.updater) = Some(f);
    }

    /// Checks what a live update needs, before anything is touched.
    pub fn check_update(&self, protector: &Protector) -> Result<StateDir> {
        let dir = self.dir().ok_or(Error::Unsupported(
            "live update needs the VM in a state directory (--state, or PUT /state-dir before starting)"
                .into(),
        ))?;
        if !protector.is_protected() {
            return Err(Error::Unsupported(
                "live update needs the VM protected".into(),
            ));
        }
        if lock(&self.updater).is_none() {
            return Err(Error::Unsupported(
                "this process cannot start a new VMM program".into(),
            ));
        }
        Ok(dir)
    }

    /// Live update: pauses `vm`, commits a last checkpoint to its state directory and hands
    /// the VM to a new VMM program (the updater); memory is not copied, the new process maps
    /// it again. Returns only if the hand-over failed, after resuming the VM here.
    pub fn live_update(
        &self,
        vm: &Vm,
        protector: &Protector,
        placement: Placement,
        binary: Option<PathBuf>,
    ) -> Result<()> {
        let dir = self.check_update(protector)?;
        if vm.outcome().is_some() {
            return Err(Error::Update("the VM has ended".into()));
        }
        let updater = lock(&self.updater);
        let updater = updater.as_ref().ok_or(Error::Unsupported(
            "this process cannot start a new VMM program".into(),
        ))?;
        let was_paused = vm.state() == VmState::Paused;
        protector.with_engine(|engine, protection| {
            vm.pause()?;
            let paused_at_ns = monotonic_ns();
            // The checkpoint the new process resumes from: everything up to here is committed
            // and its output released, and the paused guest makes no more.
            let report = match engine.checkpoint() {
                Ok(r) if r.acked => r,
                other => {
                    if !was_paused {
                        let _ = vm.resume();
                    }
                    return Err(match other {
                        Err(e) => e.into(),
                        Ok(_) => Error::Update("the last checkpoint was not committed".into()),
                    });
                }
            };
            let handover = Handover {
                state_dir: dir.path().to_path_buf(),
                paused_at_ns,
                protection: protection.clone(),
                epoch: report.epoch,
                resume: !was_paused,
                disk: match &vm.descriptor().disk {
                    Some(rebound_vmm::persist::DiskDescriptor::File { path, .. })
                        if !path.starts_with(dir.path()) =>
                    {
                        Some(path.clone())
                    }
                    _ => None,
                },
                disk_mirror: vm.disk_status().and_then(|legs| {
                    legs.into_iter()
                        .skip(1)
                        .find(|l| !matches!(l.state, rebound_block::LegState::Failed { .. }))
                        .map(|l| PathBuf::from(l.path))
                }),
                binary,
                placement,
                share_claims: vm.hand_over_share_claims(),
            };
            tracing::info!(epoch = report.epoch, "live update: handing the VM over");
            let e = updater(&handover);
            vm.keep_share_claims();
            tracing::error!("live update failed, the VM resumes here: {e}");
            if !was_paused {
                vm.resume()?;
            }
            Err(Error::Update(format!("cannot start the new VMM: {e}")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_state_directory_is_refused_and_not_created() {
        let s = SurvivalPart::default();
        let name = format!("rebound-relative-{}", std::process::id());
        let e = s.set_dir(Path::new(&name)).unwrap_err();
        assert!(e.to_string().starts_with("path:"), "{e}");
        assert!(!Path::new(&name).exists());
        assert!(s.dir().is_none());
    }

    #[test]
    fn live_update_says_what_is_missing() {
        let s = SurvivalPart::default();
        let p = Protector::default();
        let e = s.check_update(&p).unwrap_err();
        assert!(e.to_string().contains("state directory"), "{e}");
    }

    #[test]
    fn the_report_has_the_takeover_and_faults() {
        let s = SurvivalPart::default();
        s.note_cpu_fault(CpuFaultEvent {
            cpus: vec![1],
            vcpus: vec![0],
            action: "resume".into(),
            detail: "moved".into(),
        });
        let d = s.note_update(monotonic_ns());
        assert!(d < Duration::from_secs(5));
        let r = s.report(Placement::default(), vec![vec![0]]);
        assert_eq!(r.cpu_faults.len(), 1);
        assert_eq!(r.vcpu_cpus, vec![vec![0]]);
        assert!(r.update_downtime_us.is_some());
        assert_eq!(s.take_recovered(), None);
    }
}
