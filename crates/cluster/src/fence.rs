//! Fencing: a VM runs on one host at a time, provably. Two ways ([`Fence`]): ownership locks
//! on one machine or a shared filesystem ([`Locks`], the default), and etcd leases across
//! machines (`crate::lease::Etcd`).
//!
//! With locks, ownership of VM `NAME` is an exclusive
//! `flock` on `LOCK_DIR/NAME.owner`, held by the VMM process that runs it for as long as it
//! lives; the kernel drops it when that process dies, however it dies. A standby takes a VM
//! over only once it could take that lock (the old VMM is gone), and the new VMM holds it from
//! then on. Every agent that may own the VM must see the same lock directory: the agents of
//! one machine (the default, to try a cluster out), or a shared filesystem with working
//! `flock`. A primary that is alive but cut off keeps its lock: it is never taken over, so a
//! partition cannot make two owners (it makes no failover either; etcd leases, which fence a
//! primary that loses its lease, are not built yet).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A held ownership lock (released when dropped or when the process ends).
#[derive(Debug)]
pub struct Ownership {
    _file: File,
}

/// What a VM's lock file holds while it runs without a standby.
const DEGRADED: &[u8] = b"running without a standby\n";

/// Where `vm`'s ownership lock is.
pub fn lock_path(lock_dir: &Path, vm: &str) -> PathBuf {
    lock_dir.join(format!("{vm}.owner"))
}

fn try_lock(lock_dir: &Path, vm: &str) -> io::Result<Option<File>> {
    std::fs::create_dir_all(lock_dir)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock_path(lock_dir, vm))?;
    // SAFETY: flock on a descriptor we own; the result is checked.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(Some(file));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Takes ownership of `vm` for this process (a VMM about to run it). Refused while another
/// process owns it.
pub fn own(lock_dir: &Path, vm: &str) -> io::Result<Ownership> {
    match try_lock(lock_dir, vm)? {
        Some(f) => Ok(Ownership { _file: f }),
        None => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("VM {vm} runs elsewhere (another process holds its ownership lock)"),
        )),
    }
}

/// Whether `vm`'s owner is provably gone (nobody holds its lock). The lock is not kept: the
/// process that takes the VM over takes it.
pub fn owner_gone(lock_dir: &Path, vm: &str) -> io::Result<bool> {
    Ok(try_lock(lock_dir, vm)?.is_some())
}

/// What a host may do with its VMs now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// It owns them: run.
    Owner,
    /// It cannot prove it still owns them (its lease could not be renewed in time): its VMs
    /// must stop at once (paused: they may go on if the lease is renewed after all).
    Unsure,
    /// It lost them (its lease was revoked or expired: another host may run them now): its
    /// VMs must end.
    Lost,
}

/// A host's standing as it is now, read without waiting on anything: the thread that stops
/// this host's VMMs must act at once, whatever else waits on the fence (an etcd call).
#[derive(Clone, Default)]
pub struct Watch(Option<Arc<dyn Fn() -> Standing + Send + Sync>>);

impl Watch {
    /// Standing as `f` tells it (it must not block).
    pub fn new(f: impl Fn() -> Standing + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    /// The standing now (the owner, for fences that have no other).
    pub fn standing(&self) -> Standing {
        self.0.as_ref().map_or(Standing::Owner, |f| f())
    }
}

/// How a host proves it owns its VMs and takes over another host's.
pub trait Fence: Send {
    /// Called every heartbeat interval: renews what must be renewed; what this host may do.
    fn standing(&mut self) -> Standing;
    /// The standing, read without waiting (see [`Watch`]).
    fn watch(&self) -> Watch {
        Watch::default()
    }
    /// Records this host as the owner of VM `vm`, which runs here: `Ok(true)` once recorded,
    /// `Ok(false)` if that cannot be done now (try again), `Err` (why) if another host owns it:
    /// it must not run here.
    fn claim(&mut self, vm: &str) -> Result<bool, String>;
    /// Gives up VM `vm`, which died here, so its standby host can take it over.
    fn release(&mut self, _vm: &str) {}
    /// Records that VM `vm` runs on without a standby from now on, so that no standby takes
    /// it over from an older copy: `Ok(true)` once recorded (only then may it release output
    /// no standby has), `Ok(false)` if not (its ownership is being taken).
    fn degrade(&mut self, vm: &str) -> Result<bool, String>;
    /// Records that VM `vm` has a standby again.
    fn replicated(&mut self, _vm: &str) {}
    /// Takes VM `vm` (owned by host `from`, which is alive or, `from_dead`, not) over if its
    /// owner is provably gone: `Ok(true)` once this host owns it, `Ok(false)` while not (yet).
    fn take(&mut self, vm: &str, from: &str, from_dead: bool) -> Result<bool, String>;
    /// The lock directory VMMs of this host must hold their VM's lock in (locks only).
    fn lock_dir(&self) -> Option<&Path> {
        None
    }
    /// What to show in the status.
    fn describe(&self) -> String;
}

/// Ownership locks in a directory every agent that may own a VM sees.
pub struct Locks {
    dir: PathBuf,
}

impl Locks {
    /// Locks in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }
}

impl Fence for Locks {
    fn standing(&mut self) -> Standing {
        // A VMM holds its own lock: while it lives it owns its VM, whatever its agent does.
        Standing::Owner
    }

    fn claim(&mut self, _vm: &str) -> Result<bool, String> {
        // The VMM took the lock before it started the VM.
        Ok(true)
    }

    fn take(&mut self, vm: &str, _from: &str, _from_dead: bool) -> Result<bool, String> {
        let gone = owner_gone(&self.dir, vm)
            .map_err(|e| format!("cannot check {vm}'s ownership lock: {e}"))?;
        if gone && std::fs::read(lock_path(&self.dir, vm)).is_ok_and(|b| b == DEGRADED) {
            return Err(format!(
                "VM {vm} ran on without a standby before it died: the standby's copy is older than what it released (not taken over)"
            ));
        }
        Ok(gone)
    }

    fn degrade(&mut self, vm: &str) -> Result<bool, String> {
        // The lock file's contents say so; its VMM holds the lock (the agent only writes).
        std::fs::write(lock_path(&self.dir, vm), DEGRADED)
            .map(|()| true)
            .map_err(|e| format!("cannot mark {vm} as running without a standby: {e}"))
    }

    fn replicated(&mut self, vm: &str) {
        if let Err(e) = std::fs::write(lock_path(&self.dir, vm), b"") {
            tracing::warn!(vm, "cannot mark the VM as replicated again: {e}");
        }
    }

    fn lock_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }

    fn describe(&self) -> String {
        format!("ownership locks in {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_owner_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let o = own(d.path(), "vm1").unwrap();
        assert!(own(d.path(), "vm1").is_err());
        assert!(!owner_gone(d.path(), "vm1").unwrap());
        assert!(owner_gone(d.path(), "vm2").unwrap());
        drop(o);
        assert!(owner_gone(d.path(), "vm1").unwrap());
        let _again = own(d.path(), "vm1").unwrap();
    }
}
