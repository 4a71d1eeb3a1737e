//! Host CPU faults: where a VM's vCPUs run, what to do when a host CPU under them fails (the
//! VM's recovery attribute), and the host-wide record of failed CPUs that every Rebound process
//! on the host watches.
//!
//! The record is a directory (`$REBOUND_HOST_DIR`, default `/dev/shm/rebound-host`) holding
//! `cpu-N` for each failed CPU: failing a CPU (`rebound fault cpu N`, `PUT /faults`, or a
//! machine-check handler of the operator's) is creating that file, and each VMM reacts for its
//! own VM within one poll period. VMs whose vCPUs do not run on the failed CPU are not touched.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Instance;

/// How often each VMM looks at the host's failed CPUs.
pub const POLL: Duration = Duration::from_millis(20);

/// What to do with a VM when host resources it runs on fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryAttribute {
    /// Save the vCPUs' state, move them to a healthy CPU, load it there and continue.
    #[default]
    Resume,
    /// Move to a healthy CPU and go back to the last checkpoint (the VM must be protected;
    /// otherwise it is stopped).
    RestartFromCheckpoint,
    /// Save the VM's state to its save area and stop it.
    Stop,
    /// Hand the VM to its standby host (protection with a standby): a checkpoint now, then the
    /// VM stops here and the standby takes it over. Without a standby it is stopped as `stop`
    /// does.
    Failover,
}

impl RecoveryAttribute {
    /// The attribute's name in the API and CLI.
    pub fn name(self) -> &'static str {
        match self {
            RecoveryAttribute::Resume => "resume",
            RecoveryAttribute::RestartFromCheckpoint => "restart_from_checkpoint",
            RecoveryAttribute::Stop => "stop",
            RecoveryAttribute::Failover => "failover",
        }
    }

    /// All attributes.
    pub const ALL: [RecoveryAttribute; 4] = [
        RecoveryAttribute::Resume,
        RecoveryAttribute::RestartFromCheckpoint,
        RecoveryAttribute::Stop,
        RecoveryAttribute::Failover,
    ];
}

/// Where a VM's vCPUs run and what happens when that fails.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Host CPUs for the vCPUs: vCPU i runs on `cpus[i % len]`. Empty: anywhere.
    #[serde(default)]
    pub cpus: Vec<usize>,
    /// What to do when a host CPU under the VM fails.
    #[serde(default)]
    pub recovery: RecoveryAttribute,
    /// Where `stop` saves the VM (a snapshot file). Default: `save-area.snap` in the VM's
    /// state directory, if it has one.
    #[serde(default)]
    pub save_area: Option<PathBuf>,
}

impl Placement {
    /// Checks the CPUs exist for this process and the attribute is available.
    pub fn validate(&self) -> Result<(), String> {
        let usable = rebound_vmm::affinity::usable();
        if let Some(c) = self.cpus.iter().find(|c| !usable.contains(c)) {
            return Err(format!(
                "cpus: host CPU {c} is not usable here (usable: {usable:?})"
            ));
        }
        Ok(())
    }

    /// The CPUs vCPU `i` may run on, avoiding `failed`; None: anywhere healthy.
    pub fn cpus_for(&self, i: usize, failed: &BTreeSet<usize>) -> Option<Vec<usize>> {
        let healthy: Vec<usize> = self
            .cpus
            .iter()
            .copied()
            .filter(|c| !failed.contains(c))
            .collect();
        if !healthy.is_empty() {
            return Some(vec![healthy[i % healthy.len()]]);
        }
        let survivors: Vec<usize> = rebound_vmm::affinity::usable()
            .into_iter()
            .filter(|c| !failed.contains(c))
            .collect();
        if survivors.is_empty() {
            return None;
        }
        if self.cpus.is_empty() {
            // Unpinned: anywhere healthy.
            Some(survivors)
        } else {
            // Every chosen CPU failed: one healthy CPU each, spread.
            Some(vec![survivors[i % survivors.len()]])
        }
    }
}

/// One host CPU fault as a VM lived it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpuFaultEvent {
    /// The failed CPUs that touched the VM.
    pub cpus: Vec<usize>,
    /// Its vCPUs that ran there.
    pub vcpus: Vec<usize>,
    /// What was done (the recovery attribute, or `stop` when it could not apply).
    pub action: String,
    /// Details: where the vCPUs went, the checkpoint returned to, where the state was saved.
    pub detail: String,
}

/// The host's record of failed CPUs.
#[derive(Clone, Debug)]
pub struct HostFaults {
    dir: PathBuf,
}

impl HostFaults {
    /// The record at `$REBOUND_HOST_DIR`, default `/dev/shm/rebound-host`.
    pub fn from_env() -> Self {
        let dir = std::env::var_os("REBOUND_HOST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/dev/shm/rebound-host"));
        Self { dir }
    }

    /// The record in `dir`.
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn file(&self, cpu: usize) -> PathBuf {
        self.dir.join(format!("cpu-{cpu}"))
    }

    /// Marks host CPU `cpu` failed, for every Rebound process on the host. A CPU the host does
    /// not have is refused.
    pub fn fail_cpu(&self, cpu: usize) -> io::Result<()> {
        exists(cpu)?;
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(self.file(cpu), b"failed\n")
    }

    /// Marks host CPU `cpu` healthy again (VMs already moved stay where they are). A CPU the
    /// host does not have is refused, unless the record names it.
    pub fn repair_cpu(&self, cpu: usize) -> io::Result<()> {
        if !self.file(cpu).exists() {
            exists(cpu)?;
        }
        match std::fs::remove_file(self.file(cpu)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The failed CPUs.
    pub fn failed(&self) -> BTreeSet<usize> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return BTreeSet::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("cpu-")?.parse().ok())
            .collect()
    }
}

/// Where the kernel lists the CPUs this host has or can have (hot-plug included).
const POSSIBLE_CPUS: &str = "/sys/devices/system/cpu/possible";

/// Refuses a CPU the host does not have: a fault recorded for it would be reported as handled
/// while no VM could ever run there.
fn exists(cpu: usize) -> io::Result<()> {
    let (cpus, list) = match std::fs::read_to_string(POSSIBLE_CPUS)
        .ok()
        .and_then(|s| Some((parse_cpu_list(&s)?, s.trim().to_string())))
    {
        Some(found) => found,
        // No sysfs: the CPUs this process may use are the ones known to exist.
        None => {
            let usable = rebound_vmm::affinity::usable();
            (usable.iter().copied().collect(), format!("{usable:?}"))
        }
    };
    if cpus.contains(&cpu) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("host CPU {cpu} does not exist (this host's CPUs: {list})"),
        ))
    }
}

/// Parses a kernel CPU list (`0-3,6,8-9`); None if it is not one. Numbers stop at
/// `CPU_SETSIZE`, the most a CPU set can name.
fn parse_cpu_list(s: &str) -> Option<BTreeSet<usize>> {
    let max = libc::CPU_SETSIZE as usize;
    let mut cpus = BTreeSet::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse::<usize>().ok()?, hi.parse::<usize>().ok()?),
            None => {
                let c = part.parse::<usize>().ok()?;
                (c, c)
            }
        };
        if lo > hi || hi >= max {
            return None;
        }
        cpus.extend(lo..=hi);
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// Watches `faults` for `instance`'s VM until the instance is dropped or its VM ends.
pub fn watch(instance: &Arc<Instance>, faults: HostFaults) -> io::Result<()> {
    let weak: Weak<Instance> = Arc::downgrade(instance);
    std::thread::Builder::new()
        .name("rebound-hostfaults".into())
        .spawn(move || {
            let mut handled = BTreeSet::new();
            loop {
                std::thread::sleep(POLL);
                let Some(instance) = weak.upgrade() else {
                    return;
                };
                let Some(vm) = instance.vm() else { continue };
                if vm.outcome().is_some() {
                    return;
                }
                let failed = faults.failed();
                if failed.difference(&handled).next().is_some() {
                    match instance.on_cpu_fault(&failed) {
                        Ok(Some(ev)) => tracing::warn!(?ev, "host CPU fault handled"),
                        Ok(None) => {}
                        Err(e) => tracing::error!("cannot handle the host CPU fault: {e}"),
                    }
                }
                handled = failed;
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_cpu_lists_parse() {
        let set = |v: &[usize]| v.iter().copied().collect::<BTreeSet<_>>();
        assert_eq!(parse_cpu_list("0-1\n"), Some(set(&[0, 1])));
        assert_eq!(parse_cpu_list("0"), Some(set(&[0])));
        assert_eq!(parse_cpu_list("0-2,5,7-8"), Some(set(&[0, 1, 2, 5, 7, 8])));
        for bad in ["", "x", "3-1", "0-99999999", "1,,-"] {
            assert_eq!(parse_cpu_list(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_cpu_the_host_does_not_have_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let faults = HostFaults::at(dir.path());
        let e = faults.fail_cpu(libc::CPU_SETSIZE as usize - 1).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = faults.repair_cpu(100_000).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(faults.failed().is_empty());
        // CPU 0 always exists.
        faults.fail_cpu(0).unwrap();
        assert_eq!(faults.failed(), BTreeSet::from([0]));
        faults.repair_cpu(0).unwrap();
        assert!(faults.failed().is_empty());
    }
}
