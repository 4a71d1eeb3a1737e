//! A VM's disk: one or two backing stores ("legs") read and written at offsets.
//!
//! A disk has a primary leg and, optionally, a mirror: a second file, e.g. on another file
//! system. Every write goes to each live leg before it is acknowledged and a flush syncs each;
//! reads come from the first healthy leg. A leg that returns an error is marked failed and the
//! request is completed by the other, so the guest sees no failed request while one leg is
//! healthy. The mirror is written synchronously: it holds every write the guest has had
//! acknowledged, so what is replayed on it is only the request that failed, from the I/O
//! queue's buffer, which the queue keeps until the request completes. A flush that fails on one
//! leg (its data may never reach that device) succeeds if the other leg synced.
//!
//! A replacement leg comes back by a resync: a copy from the healthy leg, one chunk at a time
//! under the disk's lock (so no write lands between a chunk's read and its write), while new
//! writes go to both legs. It serves reads only once the copy is complete and synced.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rebound_abi::io::SECTOR_SIZE;
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::Error;

/// Bytes a resync copies per step (the disk's lock is held that long).
pub const RESYNC_CHUNK: u64 = 1 << 20;

/// Where a leg's bytes live.
enum Store {
    /// A host file or a memfd.
    File(File),
    /// A copy-on-write view of a disk image (a snapshot's): the image mapped private, so what
    /// the VM writes stays in this process and never reaches the image.
    View(GuestMemoryMmap<()>),
}

impl Store {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Self::File(f) => f.read_exact_at(buf, offset),
            Self::View(m) => m
                .read_slice(buf, GuestAddress(offset))
                .map_err(io::Error::other),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Self::File(f) => f.write_all_at(buf, offset),
            Self::View(m) => m
                .write_slice(buf, GuestAddress(offset))
                .map_err(io::Error::other),
        }
    }

    fn sync(&self) -> io::Result<()> {
        match self {
            Self::File(f) => f.sync_data(),
            Self::View(_) => Ok(()),
        }
    }
}

/// A leg's health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum LegState {
    /// In sync: read and written.
    Healthy,
    /// Being brought in sync: written, not read. `copied` bytes from the start are done.
    Syncing {
        /// Bytes copied so far.
        copied: u64,
    },
    /// Returned an error: neither read nor written until replaced.
    Failed {
        /// The error.
        error: String,
    },
}

/// One leg as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LegStatus {
    /// The file (or "scratch", "snapshot view").
    pub path: String,
    /// Its health.
    #[serde(flatten)]
    pub state: LegState,
}

struct Leg {
    name: String,
    store: Store,
    state: LegState,
}

impl Leg {
    fn fail(&mut self, op: &str, e: &io::Error) {
        tracing::error!(leg = %self.name, "disk {op} failed: {e}; the leg is marked failed");
        self.state = LegState::Failed {
            error: format!("{op}: {e}"),
        };
    }
}

/// What a disk was made from, for saving and restoring it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A host file.
    File(PathBuf),
    /// An anonymous scratch disk.
    Scratch,
    /// A copy-on-write view of a saved image.
    View,
}

/// A disk the I/O queue reads and writes.
pub struct Disk {
    size: u64,
    read_only: bool,
    origin: Origin,
    legs: Mutex<Vec<Leg>>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("size", &self.size)
            .field("origin", &self.origin)
            .field("legs", &self.status())
            .finish()
    }
}

fn open_file(path: &Path, read_only: bool) -> Result<(File, u64), Error> {
    let name = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| Error::Open {
            path: name.clone(),
            source,
        })?;
    lock_file(&file, &name, read_only)?;
    let size = file
        .metadata()
        .map_err(|source| Error::Open { path: name, source })?
        .len();
    Ok((file, size))
}

/// Locks a disk file for this VM (shared if read-only, exclusive else) so that no other VM,
/// in this process or another, writes it meanwhile: a clone restored next to its parent, a
/// second VMM started by mistake. The lock goes with the file (a crash or an exec frees it).
fn lock_file(file: &File, name: &str, read_only: bool) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let how = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a descriptor `file` owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(Error::InUse(name.into()));
    }
    Err(Error::Open {
        path: name.into(),
        source: e,
    })
}

fn check_size(path: &str, size: u64) -> Result<(), Error> {
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::BadSize {
            path: path.into(),
            size,
        });
    }
    Ok(())
}

impl Disk {
    fn one(size: u64, read_only: bool, origin: Origin, name: String, store: Store) -> Self {
        Self {
            size,
            read_only,
            origin,
            legs: Mutex::new(vec![Leg {
                name,
                store,
                state: LegState::Healthy,
            }]),
        }
    }

    /// Opens a disk image file.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, Error> {
        let (file, size) = open_file(path, read_only)?;
        let name = path.display().to_string();
        check_size(&name, size)?;
        Ok(Self::one(
            size,
            read_only,
            Origin::File(path.to_path_buf()),
            name,
            Store::File(file),
        ))
    }

    /// An anonymous, zero-filled disk of `size` bytes that vanishes with the VMM.
    pub fn scratch(size: u64) -> Result<Self, Error> {
        check_size("<scratch>", size)?;
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"rebound-scratch-disk".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Scratch(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(Error::Scratch)?;
        Ok(Self::one(
            size,
            false,
            Origin::Scratch,
            "scratch".into(),
            Store::File(file),
        ))
    }

    /// A disk over `mem`, a private mapping of a saved image (see [`crate::image`]).
    pub(crate) fn view(mem: GuestMemoryMmap<()>, size: u64, read_only: bool) -> Self {
        Self::one(
            size,
            read_only,
            Origin::View,
            "snapshot view".into(),
            Store::View(mem),
        )
    }

    /// Adds a mirror: the file at `path` (created if missing) becomes a second leg, brought in
    /// sync by [`resync_step`](Self::resync_step) before it serves reads.
    pub fn with_mirror(self, path: &Path) -> Result<Self, Error> {
        self.attach(path)?;
        Ok(self)
    }

    /// Attaches the file at `path` (created if missing, sized to the disk) in place of a failed
    /// leg, or as the mirror if there is none; it resyncs from the healthy leg.
    pub fn attach(&self, path: &Path) -> Result<(), Error> {
        let name = path.display().to_string();
        if self.read_only {
            return Err(Error::Mirror(format!(
                "{name}: a read-only disk is not mirrored"
            )));
        }
        if matches!(self.origin, Origin::View | Origin::Scratch) {
            return Err(Error::Mirror(format!(
                "{name}: only a disk backed by a file has a mirror"
            )));
        }
        // Checked before the file is created, so a refusal leaves nothing behind; checked
        // again when the leg goes in.
        check_room(&self.lock(), &name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| Error::Open {
                path: name.clone(),
                source,
            })?;
        lock_file(&file, &name, false)?;
        let len = file
            .metadata()
            .map_err(|source| Error::Open {
                path: name.clone(),
                source,
            })?
            .len();
        if len == 0 {
            file.set_len(self.size).map_err(|source| Error::Open {
                path: name.clone(),
                source,
            })?;
        } else if len != self.size {
            return Err(Error::Mirror(format!(
                "{name} is {len} bytes; the disk is {} bytes",
                self.size
            )));
        }
        let mut legs = self.lock();
        check_room(&legs, &name)?;
        let leg = Leg {
            name,
            store: Store::File(file),
            state: LegState::Syncing { copied: 0 },
        };
        match legs
            .iter()
            .position(|l| matches!(l.state, LegState::Failed { .. }))
        {
            Some(i) => legs[i] = leg,
            None => legs.push(leg),
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Leg>> {
        self.legs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// What the disk was made from.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Each leg's path and health.
    pub fn status(&self) -> Vec<LegStatus> {
        self.lock()
            .iter()
            .map(|l| LegStatus {
                path: l.name.clone(),
                state: l.state.clone(),
            })
            .collect()
    }

    /// Reads exactly `buf.len()` bytes at `offset` from the first healthy leg.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut legs = self.lock();
        let mut last = None;
        for leg in legs.iter_mut().filter(|l| l.state == LegState::Healthy) {
            match leg.store.read_at(buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    leg.fail("read", &e);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(no_leg))
    }

    /// Writes all of `buf` at `offset` to every live leg; succeeds if a healthy one took it.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.each_live("write", |s| s.write_at(buf, offset))
    }

    /// Makes written data durable on every live leg; succeeds if a healthy one synced.
    pub fn flush(&self) -> io::Result<()> {
        self.each_live("flush", Store::sync)
    }

    fn each_live(&self, op: &str, f: impl Fn(&Store) -> io::Result<()>) -> io::Result<()> {
        let mut legs = self.lock();
        let mut done = false;
        let mut last = None;
        for leg in legs.iter_mut() {
            let healthy = match leg.state {
                LegState::Healthy => true,
                LegState::Syncing { .. } => false,
                LegState::Failed { .. } => continue,
            };
            match f(&leg.store) {
                Ok(()) => done |= healthy,
                Err(e) => {
                    leg.fail(op, &e);
                    last = Some(e);
                }
            }
        }
        if done {
            Ok(())
        } else {
            Err(last.unwrap_or_else(no_leg))
        }
    }

    /// Copies the next chunk to a syncing leg. Returns `Ok(true)` while there is more to copy
    /// (call again), `Ok(false)` when no leg is syncing.
    pub fn resync_step(&self) -> Result<bool, Error> {
        let mut legs = self.lock();
        let Some(to) = legs
            .iter()
            .position(|l| matches!(l.state, LegState::Syncing { .. }))
        else {
            return Ok(false);
        };
        let Some(from) = legs.iter().position(|l| l.state == LegState::Healthy) else {
            let name = legs[to].name.clone();
            legs[to].state = LegState::Failed {
                error: "resync: no healthy leg left to copy from".into(),
            };
            return Err(Error::Mirror(format!(
                "{name}: no healthy leg left to copy from"
            )));
        };
        let LegState::Syncing { copied } = legs[to].state else {
            return Ok(false);
        };
        let len = RESYNC_CHUNK.min(self.size - copied);
        let mut buf = vec![0u8; len as usize];
        if let Err(e) = legs[from].store.read_at(&mut buf, copied) {
            legs[from].fail("read", &e);
            return Ok(true);
        }
        let step = legs[to].store.write_at(&buf, copied).and_then(|()| {
            if copied + len == self.size {
                legs[to].store.sync()
            } else {
                Ok(())
            }
        });
        match step {
            Err(e) => {
                let name = legs[to].name.clone();
                legs[to].fail("resync", &e);
                Err(Error::Mirror(format!("{name}: resync failed: {e}")))
            }
            Ok(()) if copied + len == self.size => {
                tracing::info!(leg = %legs[to].name, "disk leg in sync");
                legs[to].state = LegState::Healthy;
                Ok(true)
            }
            Ok(()) => {
                legs[to].state = LegState::Syncing {
                    copied: copied + len,
                };
                Ok(true)
            }
        }
    }

    /// Runs [`resync_step`](Self::resync_step) until no leg is syncing.
    pub fn resync(&self) -> Result<(), Error> {
        while self.resync_step()? {}
        Ok(())
    }
}

/// Whether a leg named `name` can be attached: not already one, a healthy leg to copy from,
/// and a failed leg to replace or room for a second.
fn check_room(legs: &[Leg], name: &str) -> Result<(), Error> {
    if legs.iter().any(|l| l.name == name) {
        return Err(Error::Mirror(format!(
            "{name} is already a leg of this disk"
        )));
    }
    if !legs.iter().any(|l| l.state == LegState::Healthy) {
        return Err(Error::Mirror(format!(
            "{name}: no healthy leg to copy the disk from"
        )));
    }
    if legs.len() >= 2
        && !legs
            .iter()
            .any(|l| matches!(l.state, LegState::Failed { .. }))
    {
        return Err(Error::Mirror(
            "the disk has two legs and neither has failed".into(),
        ));
    }
    Ok(())
}

fn no_leg() -> io::Error {
    io::Error::other("no healthy disk leg")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, fill: u8, len: usize) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![fill; len]).unwrap();
        p
    }

    #[test]
    fn a_disk_file_is_written_by_one_vm_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let p = file(tmp.path(), "d", 0, 4096);
        let d = Disk::open(&p, false).unwrap();
        assert!(matches!(Disk::open(&p, false), Err(Error::InUse(_))));
        assert!(matches!(Disk::open(&p, true), Err(Error::InUse(_))));
        drop(d);
        let r1 = Disk::open(&p, true).unwrap();
        let _r2 = Disk::open(&p, true).unwrap();
        assert!(matches!(Disk::open(&p, false), Err(Error::InUse(_))));
        drop(r1);
    }

    #[test]
    fn sizes_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let p = file(tmp.path(), "odd", 0, 1000);
        assert!(matches!(Disk::open(&p, false), Err(Error::BadSize { .. })));
        assert!(Disk::scratch(0).is_err());
        let d = Disk::scratch(4096).unwrap();
        assert!(
            d.attach(&tmp.path().join("m")).is_err(),
            "scratch disks have no mirror"
        );
    }

    #[test]
    fn a_mirror_resyncs_then_takes_every_write_and_serves_reads_when_the_primary_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let len = 3 * RESYNC_CHUNK as usize + 4096;
        let p = file(tmp.path(), "primary", 7, len);
        let m = tmp.path().join("mirror");
        let d = Disk::open(&p, false).unwrap().with_mirror(&m).unwrap();
        assert_eq!(std::fs::metadata(&m).unwrap().len(), len as u64);
        // A write before the resync reaches the mirror too, and the copy does not undo it.
        d.write_at(&[1; 512], 5 * 512).unwrap();
        assert!(matches!(
            d.status()[1].state,
            LegState::Syncing { copied: 0 }
        ));
        d.resync().unwrap();
        assert_eq!(d.status()[1].state, LegState::Healthy);
        d.write_at(&[2; 512], len as u64 - 512).unwrap();
        let (a, b) = (std::fs::read(&p).unwrap(), std::fs::read(&m).unwrap());
        assert!(a == b && a[5 * 512] == 1 && a[len - 1] == 2 && a[0] == 7);

        // The primary goes away: its store now fails (a read-only descriptor refuses writes).
        {
            let mut legs = d.lock();
            legs[0].store = Store::File(File::open(&p).unwrap());
        }
        d.write_at(&[3; 512], 0).unwrap();
        assert!(matches!(d.status()[0].state, LegState::Failed { .. }));
        let mut buf = [0u8; 512];
        d.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [3; 512], "reads come from the mirror");
        d.flush().unwrap();

        // A replacement takes the failed leg's place and resyncs from the mirror.
        let r = tmp.path().join("replacement");
        d.attach(&r).unwrap();
        assert!(d.attach(&tmp.path().join("third")).is_err());
        d.resync().unwrap();
        assert!(d.status().iter().all(|l| l.state == LegState::Healthy));
        assert_eq!(std::fs::read(&r).unwrap(), std::fs::read(&m).unwrap());
    }

    #[test]
    fn with_no_healthy_leg_requests_fail() {
        let tmp = tempfile::tempdir().unwrap();
        let p = file(tmp.path(), "primary", 0, 4096);
        let d = Disk::open(&p, false).unwrap();
        d.lock()[0].store = Store::File(File::open(&p).unwrap());
        assert!(d.write_at(&[1; 512], 0).is_err());
        assert!(d.read_at(&mut [0; 512], 0).is_err());
        assert!(
            d.attach(&tmp.path().join("m")).is_err(),
            "nothing to copy from"
        );
    }
}
