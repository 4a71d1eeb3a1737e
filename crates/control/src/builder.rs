//! Building an instance's VM: from its configuration (a boot), from snapshots (a load), or
//! from a state directory (a recovery). Each build runs inside the lifecycle's `Starting`
//! phase and checks everything it can before it changes anything; what it must create before
//! the VM exists (files in a state directory) it removes again if the build fails, so a refused
//! start leaves the instance, and the disk, as they were.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rebound_checkpoint::OutputCommit;
use rebound_checkpoint::state_dir::{ConsoleLog, StateDir, show_unshown};
use rebound_snapshot::Snapshot;
use rebound_snapshot::format::Verify;
use rebound_vmm::vm::RestoreOptions;
use rebound_vmm::{DiskConfig, Vm};

use crate::config::regular_file;
use crate::lifecycle::{Request, Starting};
use crate::protection::{Protection, default_protection};
use crate::{Error, Instance, Load, Result};

/// The received-frame journal in a state directory (see `rebound_devices::net::RxJournal`).
const NET_JOURNAL: &str = "net-rx";
/// The disk writes held for their checkpoint, in the state directory.
const DISK_JOURNAL: &str = "disk-writes";

/// Files a build created, removed unless the build completes.
#[derive(Default)]
struct Created(Vec<PathBuf>);

impl Created {
    /// Records `path` as created by this build if it does not exist yet.
    fn will_create(&mut self, path: PathBuf) {
        if !path.exists() {
            self.0.push(path);
        }
    }

    fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Network backends a build started, ended unless the build completes.
struct NetAttached<'a> {
    net: &'a rebound_net::NetPart,
    kept: bool,
}

impl NetAttached<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for NetAttached<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.net.detach();
        }
    }
}

/// The interfaces a saved VM had (their host configuration is saved with their NIC), with
/// Firecracker's `network_overrides` (interface id, host device) applied.
fn saved_interfaces(
    state: &rebound_vmm::persist::SavedState,
    overrides: &[(String, String)],
) -> Result<Vec<rebound_net::NetworkInterface>> {
    let Some(net) = state.net()? else {
        if let Some((iface, _)) = overrides.first() {
            return Err(Error::Invalid {
                field: "network_overrides",
                reason: format!("the snapshot has no network interface {iface:?}"),
            });
        }
        return Ok(Vec::new());
    };
    let mut ifaces = net
        .nics
        .iter()
        .enumerate()
        .map(|(i, n)| {
            serde_json::from_str::<rebound_net::NetworkInterface>(&n.host).map_err(|e| {
                Error::Invalid {
                    field: "snapshot_path",
                    reason: format!(
                        "network interface {i}: its saved configuration is unreadable: {e}"
                    ),
                }
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for (id, dev) in overrides {
        let f = ifaces
            .iter_mut()
            .find(|f| &f.iface_id == id)
            .ok_or_else(|| Error::Invalid {
                field: "network_overrides",
                reason: format!("the snapshot has no network interface {id:?}"),
            })?;
        f.host_dev_name = Some(dev.clone());
        f.publish.clear();
        f.paths.clear();
    }
    Ok(ifaces)
}

impl Instance {
    /// Builds the backends of the interfaces configured (or `saved`), their files in `dir`.
    fn attach_net(
        &self,
        saved: Option<Vec<rebound_net::NetworkInterface>>,
        dir: Option<&Path>,
    ) -> Result<(Vec<rebound_vmm::config::NicConfig>, NetAttached<'_>)> {
        if let Some(ifaces) = saved {
            self.net.restore(ifaces)?;
        }
        let guard = NetAttached {
            net: &self.net,
            kept: false,
        };
        if self.net.list().is_empty() {
            return Ok((Vec::new(), guard));
        }
        let durable = dir.is_some();
        let private;
        let dir = match dir {
            Some(d) => d,
            None => {
                private = rebound_net::part::private_runtime_dir()?;
                &private
            }
        };
        Ok((self.net.attach(dir, durable)?, guard))
    }

    /// The VM is built: it is placed, its output recorded, and the instance has started.
    fn install(&self, starting: Starting<'_>, vm: Vm, output: Arc<OutputCommit>) -> Arc<Vm> {
        let vm = Arc::new(vm);
        if let Err(e) = self.placement.place(&vm, &Default::default()) {
            tracing::warn!("cannot place the vCPUs: {e}");
        }
        self.console.attach(output);
        starting.complete(vm.clone());
        vm
    }

    /// Protection starts before the guest runs an instruction, then the guest runs (unless it
    /// is to stay paused). A VM that cannot be protected does not run unprotected.
    fn protect_then_run(&self, vm: &Arc<Vm>, p: Protection, resume: bool) -> Result<()> {
        if let Err(e) = self.protect(p) {
            vm.stop();
            return Err(e);
        }
        if resume {
            vm.resume()?;
        }
        Ok(())
    }

    /// Builds and starts the VM.
    pub fn start(&self) -> Result<Arc<Vm>> {
        let starting = self.lifecycle.begin(Request::Start)?;
        let mut config = self.resources.vm_config()?;
        self.sharing.configure(&mut config);
        config.validate().map_err(rebound_vmm::Error::from)?;
        let dir = self.survival.dir();
        let protection = self
            .protector
            .start_with()
            .or_else(|| dir.as_ref().map(|_| default_protection()));
        let mut created = Created::default();
        let output = match &dir {
            None => OutputCommit::new(self.console.user()),
            Some(dir) => {
                if let Some(DiskConfig::Scratch { size_mib }) = &config.disk {
                    // A scratch disk must outlive the process with the VM: it becomes a file in
                    // the state directory (not rolled back with memory: see docs/survival.md).
                    let path = dir.scratch_disk();
                    created.will_create(path.clone());
                    std::fs::File::create(&path)
                        .and_then(|f| f.set_len(size_mib << 20))
                        .map_err(|e| Error::host(format!("cannot create {}", path.display()), e))?;
                    config.disk = Some(DiskConfig::File {
                        path,
                        read_only: false,
                        mirror: None,
                    });
                }
                if let Some(id) = self.sharing.identity() {
                    created.will_create(dir.path().join("identity"));
                    dir.write_identity(&id.record(config.image.hash()))
                        .map_err(|e| {
                            Error::host(
                                format!("cannot record the identity in {}", dir.path().display()),
                                e,
                            )
                        })?;
                }
                created.will_create(dir.memory());
                created.will_create(dir.console_log());
                // Released output goes to the directory's console log (written at known
                // offsets, so recovery neither loses nor repeats any), mirrored to the console.
                let log = ConsoleLog::open(&dir.console_log(), 0, Some(self.console.user()))
                    .map_err(|e| {
                        Error::host(format!("cannot open {}", dir.console_log().display()), e)
                    })?
                    .guarding(dir.clone());
                OutputCommit::new(Box::new(log))
            }
        };
        let (nics, net) = self.attach_net(None, dir.as_ref().map(|d| d.path()))?;
        config.nics = nics;
        config.net_journal = dir.as_ref().map(|d| d.path().join(NET_JOURNAL));
        config.disk_journal = dir.as_ref().map(|d| d.path().join(DISK_JOURNAL));
        // A protected VM starts parked and runs once protection has started: no guest
        // instruction runs unprotected, and a guest that ends at once cannot race the start.
        let vm = Vm::launch_with(
            &config,
            output.writer(),
            dir.as_ref().map(|d| d.memory()).as_deref(),
            protection.is_some(),
        )?;
        created.keep();
        net.keep();
        let vm = self.install(starting, vm, output);
        if let Some(p) = protection {
            self.protect_then_run(&vm, p, true)?;
        }
        Ok(vm)
    }

    /// Restores the VM from a snapshot chain (a full snapshot, then its diffs in order), every
    /// file validated first (see [`Load`]).
    pub fn restore(&self, chain: &[PathBuf], load: &Load) -> Result<Arc<Vm>> {
        let starting = self.lifecycle.begin(Request::LoadSnapshot)?;
        if load.vsock_override {
            return Err(Error::Invalid {
                field: "vsock_override",
                reason: "the snapshot has no vsock device (Rebound has none)".into(),
            });
        }
        let snaps = chain
            .iter()
            .map(|p| open_snapshot(p))
            .collect::<Result<Vec<_>>>()?;
        // A named drive is used as it is (Firecracker's drive override); else the disk the
        // snapshot saved comes back as a private copy-on-write view; else the drive is
        // reopened at its saved path (Firecracker's behaviour).
        let disk = match &load.disk {
            Some(d) => Some(d.clone()),
            None if rebound_vmm::persist::carries_disk(&snaps) => None,
            None => match rebound_vmm::persist::read_chain(&snaps)?.vm.disk {
                Some(rebound_vmm::persist::DiskDescriptor::File { path, .. }) => Some(path),
                _ => None,
            },
        };
        if let Some(disk) = &disk {
            regular_file(disk).map_err(|reason| Error::Invalid {
                field: "disk",
                reason: format!("{}: {reason}", disk.display()),
            })?;
        }
        let saved = rebound_vmm::persist::read_chain(&snaps)?;
        let ifaces = saved_interfaces(&saved, &load.network_overrides)?;
        let (nics, net) = self.attach_net(Some(ifaces), None)?;
        let options = RestoreOptions {
            generation: load.generation.unwrap_or_else(rebound_vmm::persist::new_id),
            paused: !load.resume,
            disk,
            same_vm: false,
            nic_backends: nics.iter().map(|n| n.backend.clone()).collect(),
            net_journal: None,
            disk_journal: None,
            disk_mirror: None,
        };
        let output = OutputCommit::new(self.console.user());
        let vm = Vm::restore_with(&snaps, output.writer(), options)?;
        net.keep();
        Ok(self.install(starting, vm, output))
    }

    /// Takes over the VM preserved in `path` after the process that ran it ended (a crash, or
    /// a live update): undoes what the guest did after its last committed checkpoint, puts back
    /// the output that checkpoint released, and resumes it there, protected again. Returns the
    /// epoch it resumed from.
    pub fn recover(&self, path: &Path, load: &Load, protection: Option<Protection>) -> Result<u64> {
        let starting = self.lifecycle.begin(Request::Recover)?;
        let dir = StateDir::open(path)?;
        // The pid goes into `owner` only once recovery goes ahead: a refusal changes nothing.
        let claim = dir.claim_quietly()?;
        // The disk comes back from its saved path unless another is named, or from the
        // directory (a scratch disk kept there); it must be there before anything is written.
        let disk_of = |s: &rebound_vmm::persist::SavedState| match &s.vm.disk {
            Some(rebound_vmm::persist::DiskDescriptor::File { path, .. }) => {
                Some(load.disk.clone().unwrap_or_else(|| path.clone()))
            }
            _ => None,
        };
        let disk_there = |s: &rebound_vmm::persist::SavedState| match disk_of(s) {
            Some(d) => regular_file(&d).map_err(|reason| format!("disk {}: {reason}", d.display())),
            None => Ok(()),
        };
        let prepared = match rebound_checkpoint::recovery::prepare_accepting(&dir, disk_there) {
            Ok(p) => p,
            Err(e @ rebound_checkpoint::Error::Ended { .. }) => {
                // Its last output may have reached the log but not the console.
                let _ = show_unshown(&dir.console_log(), &mut self.console.user());
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        claim.announce();
        let log = ConsoleLog::open(
            &dir.console_log(),
            prepared.output_end,
            Some(self.console.user()),
        )
        .map_err(|e| Error::host(format!("cannot open {}", dir.console_log().display()), e))?
        .guarding(dir.clone());
        let output = OutputCommit::new_at(Box::new(log), prepared.output_end);
        let disk = disk_of(&prepared.state);
        let ifaces = saved_interfaces(&prepared.state, &[])?;
        let (nics, net) = self.attach_net(Some(ifaces), Some(dir.path()))?;
        let options = RestoreOptions {
            generation: prepared.state.generation()?,
            paused: true,
            disk,
            same_vm: load.same_vm,
            nic_backends: nics.iter().map(|n| n.backend.clone()).collect(),
            // Frames its predecessor received after the checkpoint are delivered again.
            net_journal: Some((dir.path().join(NET_JOURNAL), Some(prepared.epoch))),
            // Held disk writes of checkpoints up to the one recovered reach the disk; later
            // ones were undone with memory.
            disk_journal: Some((dir.path().join(DISK_JOURNAL), Some(prepared.epoch))),
            disk_mirror: load.disk_mirror.clone(),
        };
        let vm = Vm::adopt(&dir.memory(), prepared.state, output.writer(), options)?;
        net.keep();
        self.survival
            .adopted(dir, claim, prepared.epoch, prepared.undone_pages);
        let vm = self.install(starting, vm, output);
        // Protected again before the guest runs a single instruction. If that fails (the state
        // directory cannot be written), the VM goes on unprotected, as it would have in the
        // old process, and the directory says it cannot be recovered again.
        if let Err(e) = self.protect(protection.unwrap_or_else(default_protection)) {
            if let Some(dir) = self.survival.dir() {
                dir.mark_lost(&format!(
                    "protection could not start again after recovery: {e}"
                ));
            }
            tracing::error!("the recovered VM runs unprotected: {e}");
        }
        if load.resume {
            vm.resume()?;
        }
        tracing::info!(
            epoch = prepared.epoch,
            undone_pages = prepared.undone_pages,
            "VM recovered"
        );
        Ok(prepared.epoch)
    }
}

/// Opens and fully verifies a snapshot file, refusing anything but a regular file first (a
/// FIFO would block the opener until a writer came).
fn open_snapshot(path: &Path) -> Result<Snapshot> {
    regular_file(path).map_err(|reason| Error::Invalid {
        field: "snapshot_path",
        reason: format!("{}: {reason}", path.display()),
    })?;
    Ok(Snapshot::open(path, Verify::Full)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_files_go_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&b, b"there before").unwrap();
        {
            let mut c = Created::default();
            c.will_create(a.clone());
            c.will_create(b.clone());
            std::fs::write(&a, b"new").unwrap();
        }
        assert!(!a.exists(), "a file the build made is removed");
        assert!(b.exists(), "a file that was there is kept");
        let mut c = Created::default();
        c.will_create(a.clone());
        std::fs::write(&a, b"new").unwrap();
        c.keep();
        assert!(a.exists());
    }
}
