//! Fencing: a VM runs on one host at a time, provably. Ownership of VM `NAME` is an exclusive
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

/// A held ownership lock (released when dropped or when the process ends).
#[derive(Debug)]
pub struct Ownership {
    _file: File,
}

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
