//! Disk writes bound to their epoch. While a VM is protected, what the guest writes to its disk
//! is held, like its console and network output: a write of epoch e (made after checkpoint
//! e - 1 and before checkpoint e) reaches the disk file only once checkpoint e is safe, and is
//! dropped if the VM goes back to an earlier checkpoint, so the guest's re-executed writes are
//! the only ones the disk ever sees. The guest reads its own held writes.
//!
//! With a state directory every held write is first appended to a journal there (the guest's
//! `FLUSH` makes the journal durable), so the VMM that recovers the VM after a crash applies the
//! writes of the checkpoints it recovers to and drops the rest. Records are
//! `[epoch: u64][offset: u64][len: u32][crc32c: u32][data]`; a torn or damaged last record (a
//! kill mid-write) ends the journal.
//!
//! Held bytes are bounded: past [`SOFT_LIMIT`] a checkpoint is asked for at once, past
//! [`HARD_LIMIT`] writes fail with `EAGAIN` until one is released.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rebound_snapshot::{DirtySet, PAGE_SIZE};

use crate::HeldOutput;
use rebound_block::Disk;

/// Held bytes past which a checkpoint is wanted now.
pub const SOFT_LIMIT: u64 = 16 << 20;
/// Held bytes past which writes are refused (`EAGAIN`) until a checkpoint is released.
pub const HARD_LIMIT: u64 = 64 << 20;

const RECORD_HEADER: usize = 24;
/// Largest write one record holds (the I/O ring's largest transfer).
const RECORD_MAX: usize = rebound_abi::io::MAX_TRANSFER as usize;

/// Why a write was not taken.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Too much is held: retry after the next checkpoint.
    #[error("{HARD_LIMIT} bytes of disk writes wait for a checkpoint")]
    Full,
    /// The host failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

type Writes = Vec<(u64, Arc<[u8]>)>;

#[derive(Default)]
struct Held {
    holding: bool,
    /// The epoch new writes belong to (the last sealed checkpoint + 1).
    open: u64,
    /// Writes not yet applied, by epoch, each epoch's in the order they were made.
    epochs: BTreeMap<u64, Writes>,
    /// For each sector a held write covers, the newest such write and where the sector is in
    /// it: reads look sectors up instead of scanning every held write.
    index: BTreeMap<u64, (Arc<[u8]>, usize)>,
    bytes: u64,
    pending: Option<Box<dyn Fn() + Send + Sync>>,
    asked: bool,
}

/// The journal file of a VM in a state directory.
struct Journal {
    file: File,
    path: PathBuf,
}

/// A disk whose writes output commit holds while the VM is protected.
pub struct HeldDisk {
    disk: Disk,
    held: Mutex<Held>,
    journal: Mutex<Option<Journal>>,
    /// 4 KiB blocks the guest wrote since the disk's contents were last saved with a snapshot
    /// (held or not: a snapshot saves what the guest sees).
    written: Mutex<DirtySet>,
}

const SECTOR: u64 = rebound_abi::io::SECTOR_SIZE;

impl Held {
    fn index_write(&mut self, offset: u64, data: &Arc<[u8]>) {
        for i in 0..data.len() / SECTOR as usize {
            self.index.insert(
                offset / SECTOR + i as u64,
                (data.clone(), i * SECTOR as usize),
            );
        }
    }

    /// The index again, from the writes still held (after some were applied or dropped).
    fn reindex(&mut self) {
        self.index.clear();
        let epochs = std::mem::take(&mut self.epochs);
        for writes in epochs.values() {
            for (at, data) in writes {
                self.index_write(*at, data);
            }
        }
        self.epochs = epochs;
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn record(epoch: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_HEADER + data.len());
    r.extend_from_slice(&epoch.to_le_bytes());
    r.extend_from_slice(&offset.to_le_bytes());
    r.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let mut crc = crc32c::crc32c(&r);
    crc = crc32c::crc32c_append(crc, data);
    r.extend_from_slice(&crc.to_le_bytes());
    r.extend_from_slice(data);
    r
}

/// Every whole, intact record of a journal, in order.
fn read_records(bytes: &[u8]) -> Vec<(u64, u64, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + RECORD_HEADER <= bytes.len() {
        let word = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at + o..at + o + 8]);
            u64::from_le_bytes(b)
        };
        let half = |o: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at + o..at + o + 4]);
            u32::from_le_bytes(b)
        };
        let (epoch, offset, len, crc) = (word(0), word(8), half(16) as usize, half(20));
        if len > RECORD_MAX || at + RECORD_HEADER + len > bytes.len() {
            break;
        }
        let data = &bytes[at + RECORD_HEADER..at + RECORD_HEADER + len];
        let want = crc32c::crc32c_append(crc32c::crc32c(&bytes[at..at + 20]), data);
        if want != crc {
            break;
        }
        out.push((epoch, offset, data));
        at += RECORD_HEADER + len;
    }
    out
}

impl HeldDisk {
    /// `disk`, writing through until output commit holds it.
    pub fn new(disk: Disk) -> Self {
        let blocks = disk.size().div_ceil(PAGE_SIZE);
        Self {
            disk,
            held: Mutex::new(Held::default()),
            journal: Mutex::new(None),
            written: Mutex::new(DirtySet::new(blocks)),
        }
    }

    /// The storage below (its legs, mirror and resync).
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// The blocks written since the last call, for a snapshot's disk image; the set starts
    /// over.
    pub fn take_written(&self) -> DirtySet {
        let mut w = lock(&self.written);
        let blocks = w.capacity();
        std::mem::replace(&mut *w, DirtySet::new(blocks))
    }

    /// Puts back blocks [`take_written`](Self::take_written) returned that were not saved.
    pub fn return_written(&self, set: &DirtySet) {
        lock(&self.written).union(set);
    }

    fn mark_written(&self, offset: u64, len: usize) {
        if len == 0 {
            return;
        }
        let mut w = lock(&self.written);
        for b in offset / PAGE_SIZE..=(offset + len as u64 - 1) / PAGE_SIZE {
            w.insert(b);
        }
    }

    /// Journals held writes at `path`. With `recovered_to = Some(c)` (the VM was recovered to
    /// checkpoint c after its VMM died), first applies the writes of checkpoints up to c that
    /// the journal holds, in order, and drops the later ones. Returns how many were applied.
    pub fn open_journal(&self, path: &Path, recovered_to: Option<u64>) -> io::Result<usize> {
        let mut applied = 0;
        if let Some(c) = recovered_to {
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e),
            };
            for (epoch, offset, data) in read_records(&bytes) {
                if epoch <= c && !self.disk.read_only() {
                    self.disk.write_at(data, offset)?;
                    applied += 1;
                }
            }
            if applied > 0 {
                self.disk.flush()?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        *lock(&self.journal) = Some(Journal {
            file,
            path: path.to_path_buf(),
        });
        Ok(applied)
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.disk.size()
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    /// Bytes of writes waiting for their checkpoint.
    pub fn held_bytes(&self) -> u64 {
        lock(&self.held).bytes
    }

    /// Reads `buf.len()` bytes at `offset`: the disk, with the held writes over it.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // The lock is held across the file read: a release applying writes meanwhile would
        // otherwise be seen neither in the file nor in what is held.
        let held = lock(&self.held);
        self.disk.read_at(buf, offset)?;
        if buf.is_empty() || held.index.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        for (sector, (data, at)) in held.index.range(offset / SECTOR..=(end - 1) / SECTOR) {
            let s0 = sector * SECTOR;
            let (lo, hi) = (s0.max(offset), (s0 + SECTOR).min(end));
            let from = at + (lo - s0) as usize;
            buf[(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&data[from..from + (hi - lo) as usize]);
        }
        Ok(())
    }

    /// Writes `data` at `offset`: to the disk, or held for the open epoch (journaled first).
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), WriteError> {
        let mut held = lock(&self.held);
        if !held.holding {
            drop(held);
            self.mark_written(offset, data.len());
            return Ok(self.disk.write_at(data, offset)?);
        }
        if held.bytes + data.len() as u64 > HARD_LIMIT {
            return Err(WriteError::Full);
        }
        if !offset.is_multiple_of(SECTOR) || !(data.len() as u64).is_multiple_of(SECTOR) {
            // The I/O queue passes whole sectors only; the index is by sector.
            return Err(WriteError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a held write must cover whole sectors",
            )));
        }
        self.mark_written(offset, data.len());
        let epoch = held.open;
        if let Some(j) = lock(&self.journal).as_mut() {
            j.file.write_all(&record(epoch, offset, data))?;
        }
        held.bytes += data.len() as u64;
        let data: Arc<[u8]> = data.into();
        held.index_write(offset, &data);
        held.epochs.entry(epoch).or_default().push((offset, data));
        if held.bytes > SOFT_LIMIT && !held.asked {
            held.asked = true;
            if let Some(f) = &held.pending {
                f();
            }
        }
        Ok(())
    }

    /// Makes written data durable: the journal while writes are held (the disk gets them,
    /// synced, when their checkpoint is released), else the disk.
    pub fn flush(&self) -> io::Result<()> {
        if lock(&self.held).holding {
            return match lock(&self.journal).as_mut() {
                Some(j) => j.file.sync_data(),
                None => Ok(()),
            };
        }
        self.disk.flush()
    }

    /// Applies the held writes of epochs up to `epoch`, in order, then syncs the disk.
    fn apply_through(&self, held: &mut Held, epoch: Option<u64>) -> io::Result<()> {
        let keep = match epoch {
            Some(e) => held.epochs.split_off(&(e + 1)),
            None => BTreeMap::new(),
        };
        let done = std::mem::replace(&mut held.epochs, keep);
        if done.is_empty() {
            return Ok(());
        }
        // Readers wait for the lock the caller holds until the writes are in the file.
        held.reindex();
        for writes in done.values() {
            for (at, data) in writes {
                self.disk.write_at(data, *at)?;
                held.bytes -= data.len() as u64;
            }
        }
        self.disk.flush()?;
        held.asked = false;
        self.rewrite_journal(held)
    }

    /// The journal keeps the writes still held, and nothing else.
    fn rewrite_journal(&self, held: &Held) -> io::Result<()> {
        let mut guard = lock(&self.journal);
        let Some(j) = guard.as_mut() else {
            return Ok(());
        };
        let mut tmp_name = j.path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut f = File::create(&tmp)?;
        for (epoch, writes) in &held.epochs {
            for (at, data) in writes {
                f.write_all(&record(*epoch, *at, data))?;
            }
        }
        std::fs::rename(&tmp, &j.path)?;
        j.file = std::fs::OpenOptions::new().append(true).open(&j.path)?;
        Ok(())
    }

    /// The journal's records (for tests and tools).
    pub fn journal_records(path: &Path) -> io::Result<Vec<(u64, u64, Vec<u8>)>> {
        let mut bytes = Vec::new();
        File::open(path)?.read_to_end(&mut bytes)?;
        Ok(read_records(&bytes)
            .into_iter()
            .map(|(e, o, d)| (e, o, d.to_vec()))
            .collect())
    }
}

impl HeldOutput for HeldDisk {
    fn hold(&self, epoch: u64) {
        let mut held = lock(&self.held);
        held.holding = true;
        held.open = epoch + 1;
    }

    fn pass_through(&self) -> io::Result<()> {
        let mut held = lock(&self.held);
        let r = self.apply_through(&mut held, None);
        held.holding = false;
        r
    }

    fn seal(&self, epoch: u64) {
        lock(&self.held).open = epoch + 1;
    }

    fn release(&self, epoch: u64) -> io::Result<()> {
        let mut held = lock(&self.held);
        self.apply_through(&mut held, Some(epoch))
    }

    fn discard_after(&self, epoch: u64) {
        let mut held = lock(&self.held);
        let dropped = held.epochs.split_off(&(epoch + 1));
        held.bytes -= dropped
            .values()
            .flatten()
            .map(|(_, d)| d.len() as u64)
            .sum::<u64>();
        held.reindex();
        held.open = epoch + 1;
        held.asked = false;
        if let Err(e) = self.rewrite_journal(&held) {
            tracing::warn!("cannot rewrite the disk journal after a rollback: {e}");
        }
    }

    fn discard_held(&self) {
        let mut held = lock(&self.held);
        held.epochs.clear();
        held.index.clear();
        held.bytes = 0;
        held.asked = false;
        if let Err(e) = self.rewrite_journal(&held) {
            tracing::warn!("cannot rewrite the disk journal: {e}");
        }
    }

    fn on_pending(&self, f: Option<Box<dyn Fn() + Send + Sync>>) {
        lock(&self.held).pending = f;
    }

    fn has_pending(&self) -> bool {
        // Held writes need no early checkpoint: the guest already has their completions.
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: usize = 512;

    fn disk(dir: &Path) -> (PathBuf, HeldDisk) {
        let p = dir.join("disk");
        std::fs::write(&p, vec![0u8; 64 * S]).unwrap();
        (p.clone(), HeldDisk::new(Disk::open(&p, false).unwrap()))
    }

    fn sector(d: &HeldDisk, i: u64) -> u8 {
        let mut b = [0u8; S];
        d.read_at(&mut b, i * S as u64).unwrap();
        b[0]
    }

    fn on_file(p: &Path, i: usize) -> u8 {
        std::fs::read(p).unwrap()[i * S]
    }

    #[test]
    fn held_writes_are_read_back_and_reach_the_file_only_when_released() {
        let tmp = tempfile::tempdir().unwrap();
        let (p, d) = disk(tmp.path());
        d.write_at(&[1; S], 0).unwrap();
        assert_eq!(on_file(&p, 0), 1, "unprotected: written through");
        d.hold(10);
        d.write_at(&[2; S], 0).unwrap();
        d.write_at(&[3; 2 * S], S as u64).unwrap();
        d.seal(11);
        d.write_at(&[4; S], S as u64).unwrap();
        assert_eq!((sector(&d, 0), sector(&d, 1), sector(&d, 2)), (2, 4, 3));
        assert_eq!(on_file(&p, 0), 1);
        d.release(11).unwrap();
        assert_eq!((on_file(&p, 0), on_file(&p, 1), on_file(&p, 2)), (2, 3, 3));
        assert_eq!(
            sector(&d, 1),
            4,
            "epoch 12's write is still held and read back"
        );
        assert_eq!(d.held_bytes(), S as u64);
        d.pass_through().unwrap();
        assert_eq!(on_file(&p, 1), 4);
        assert_eq!(d.held_bytes(), 0);
    }

    #[test]
    fn reads_see_the_newest_held_write_of_each_sector() {
        let tmp = tempfile::tempdir().unwrap();
        let (_p, d) = disk(tmp.path());
        d.write_at(&[9; 4 * S], 0).unwrap();
        d.hold(0);
        d.write_at(&[1; 3 * S], 0).unwrap();
        d.seal(1);
        d.write_at(&[2; S], S as u64).unwrap();
        let mut b = vec![0u8; 4 * S];
        d.read_at(&mut b, 0).unwrap();
        let firsts: Vec<u8> = b.chunks(S).map(|c| c[0]).collect();
        assert_eq!(firsts, [1, 2, 1, 9]);
        // A read that starts and ends inside sectors.
        let mut part = vec![0u8; S];
        d.read_at(&mut part, S as u64 / 2).unwrap();
        assert!(part[..S / 2].iter().all(|&x| x == 1) && part[S / 2..].iter().all(|&x| x == 2));
        d.discard_after(1);
        d.read_at(&mut b, 0).unwrap();
        let firsts: Vec<u8> = b.chunks(S).map(|c| c[0]).collect();
        assert_eq!(
            firsts,
            [1, 1, 1, 9],
            "the undone write is gone, the older one shows"
        );
        d.release(1).unwrap();
        d.read_at(&mut b, 0).unwrap();
        let firsts: Vec<u8> = b.chunks(S).map(|c| c[0]).collect();
        assert_eq!(firsts, [1, 1, 1, 9]);
        assert!(d.write_at(&[1; 100], 0).is_err(), "whole sectors only");
    }

    #[test]
    fn a_rollback_drops_the_undone_epochs_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let (p, d) = disk(tmp.path());
        d.hold(0);
        d.write_at(&[1; S], 0).unwrap();
        d.seal(1);
        d.write_at(&[2; S], 0).unwrap();
        d.write_at(&[2; S], 5 * S as u64).unwrap();
        d.discard_after(1);
        assert_eq!((sector(&d, 0), sector(&d, 5)), (1, 0));
        // Re-executed, differently.
        d.write_at(&[7; S], 6 * S as u64).unwrap();
        d.seal(2);
        d.release(2).unwrap();
        assert_eq!(
            (on_file(&p, 0), on_file(&p, 5), on_file(&p, 6)),
            (1, 0, 7),
            "only the re-executed writes reached the disk"
        );
    }

    #[test]
    fn recovery_applies_the_journal_up_to_its_checkpoint_only() {
        let tmp = tempfile::tempdir().unwrap();
        let (p, d) = disk(tmp.path());
        let j = tmp.path().join("journal");
        d.open_journal(&j, None).unwrap();
        d.hold(0);
        d.write_at(&[1; S], 0).unwrap();
        d.seal(1);
        d.write_at(&[2; S], S as u64).unwrap();
        d.seal(2);
        d.write_at(&[3; S], 2 * S as u64).unwrap();
        // The VMM dies before releasing anything; a torn record follows.
        drop(d);
        let mut f = std::fs::OpenOptions::new().append(true).open(&j).unwrap();
        f.write_all(&record(3, 0, &[9; S])[..100]).unwrap();
        drop(f);
        assert_eq!(HeldDisk::journal_records(&j).unwrap().len(), 3);
        let d = HeldDisk::new(Disk::open(&p, false).unwrap());
        assert_eq!(d.open_journal(&j, Some(2)).unwrap(), 2);
        assert_eq!((on_file(&p, 0), on_file(&p, 1), on_file(&p, 2)), (1, 2, 0));
        assert!(HeldDisk::journal_records(&j).unwrap().is_empty());
        // A damaged record ends the journal: what follows it is not applied.
        let mut bytes = record(1, 3 * S as u64, &[5; S]);
        bytes.extend(record(1, 4 * S as u64, &[6; S]));
        bytes[RECORD_HEADER + 7] ^= 1;
        std::fs::write(&j, &bytes).unwrap();
        drop(d);
        let d = HeldDisk::new(Disk::open(&p, false).unwrap());
        assert_eq!(d.open_journal(&j, Some(5)).unwrap(), 0);
        assert_eq!((on_file(&p, 3), on_file(&p, 4)), (0, 0));
    }

    #[test]
    fn held_bytes_are_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("disk");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(HARD_LIMIT + (1 << 20))
            .unwrap();
        let d = HeldDisk::new(Disk::open(&p, false).unwrap());
        let asked = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let a = asked.clone();
        d.on_pending(Some(Box::new(move || {
            a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })));
        d.hold(0);
        let chunk = vec![1u8; RECORD_MAX];
        let mut at = 0;
        while d.write_at(&chunk, at).is_ok() {
            at += chunk.len() as u64;
        }
        assert!(matches!(d.write_at(&chunk, at), Err(WriteError::Full)));
        assert_eq!(d.held_bytes(), HARD_LIMIT);
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        d.seal(1);
        d.release(1).unwrap();
        d.write_at(&chunk, at).unwrap();
    }
}
