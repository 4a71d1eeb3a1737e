//! The preserved region of a protected VM: a directory, on tmpfs, from which a new process takes
//! the VM over after the VMM crashed or for a live update.
//!
//! ```text
//! DIR/memory          guest memory, mapped shared by the VMM: it outlives the process
//! DIR/undo            undo journal: the old contents of every page written since the last
//!                     checkpoint, journaled before the write was allowed to happen
//! DIR/checkpoint-N    checkpoint N: VM, vCPU and device state and the output checkpoint N
//!                     releases, with its offset in the console log (snapshot file format, no
//!                     memory pages). It appears only once complete: its appearance is the commit
//! DIR/console.log     the guest's released output, each epoch's bytes at their offset
//! DIR/lost            present once protection was lost: the directory cannot be recovered
//! ```
//!
//! Recovery: take the newest checkpoint C; if the journal's base epoch is C, write its old page
//! contents back into `memory` (undoing what the guest did after C); rewrite C's output at its
//! offset (idempotent) and cut the log there; resume the VM from C's state.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rebound_snapshot::PAGE_SIZE;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::faults;

/// Section kind of the output a checkpoint record releases.
pub const OUTPUT_SECTION: u32 = 5;

/// What a checkpoint releases: `bytes` at `offset` of the console log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRecord {
    /// Where the bytes go in the console log.
    pub offset: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

const TMPFS_MAGIC: i64 = 0x0102_1994;

/// A state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDir {
    path: PathBuf,
}

fn err(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Sink {
        sink: format!("state directory {}", path.display()),
        reason: reason.to_string(),
    }
}

impl StateDir {
    /// Prepares a new state directory (created if needed; it must not hold a VM yet). It must
    /// be on tmpfs: guest memory lives there and userfaultfd write-protection needs shmem.
    pub fn create(path: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(path).map_err(|e| err(path, format!("cannot create it: {e}")))?;
        let dir = Self {
            path: path.to_path_buf(),
        };
        if dir.memory().exists() {
            return Err(err(
                path,
                "it already holds a VM: recover it (rebound recover --state) or remove it",
            ));
        }
        dir.check_tmpfs()?;
        // What an ended VM left behind.
        dir.purge_records();
        for f in [
            dir.undo(),
            dir.console_log(),
            dir.path.join("lost"),
            dir.path.join("ended"),
        ] {
            let _ = std::fs::remove_file(f);
        }
        Ok(dir)
    }

    /// Opens an existing state directory (to recover the VM in it, or learn how it ended: an
    /// ended VM's memory is freed, its end record kept).
    pub fn open(path: &Path) -> Result<Self, Error> {
        let dir = Self {
            path: path.to_path_buf(),
        };
        if !dir.memory().exists() && dir.ended().is_none() {
            return Err(err(path, "it holds no VM (no memory file)"));
        }
        Ok(dir)
    }

    /// Removes temporary files of writes a crash cut short (only by the directory's owner).
    pub fn remove_temporaries(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with('.') {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    fn check_tmpfs(&self) -> Result<(), Error> {
        let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes())
            .map_err(|_| err(&self.path, "the path contains a NUL byte"))?;
        // SAFETY: `statfs` reads a NUL-terminated path and fills the zeroed struct we own.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: see above; the result is checked.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            return Err(err(&self.path, io::Error::last_os_error()));
        }
        if st.f_type as i64 != TMPFS_MAGIC {
            return Err(err(
                &self.path,
                "it is not on tmpfs (use /dev/shm or $XDG_RUNTIME_DIR): guest memory must be shared memory",
            ));
        }
        Ok(())
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The guest memory file.
    pub fn memory(&self) -> PathBuf {
        self.path.join("memory")
    }

    /// A scratch disk kept with the VM.
    pub fn scratch_disk(&self) -> PathBuf {
        self.path.join("scratch-disk")
    }

    /// The undo journal.
    pub fn undo(&self) -> PathBuf {
        self.path.join("undo")
    }

    /// The released output.
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }

    /// Checkpoint `epoch`'s record.
    pub fn record(&self, epoch: u64) -> PathBuf {
        self.path.join(format!("checkpoint-{epoch:010}"))
    }

    /// Committed checkpoints, oldest first.
    pub fn records(&self) -> Result<Vec<(u64, PathBuf)>, Error> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.path)
            .map_err(|e| err(&self.path, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("checkpoint-")
                .and_then(|n| n.parse::<u64>().ok())
            {
                out.push((n, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Claims the directory for this process: a second VMM (a recovery started while the VM's
    /// process still runs) is refused. The claim ends with the process, however it ends, or
    /// at `exec` (the new program claims it again).
    pub fn claim(&self) -> Result<Claim, Error> {
        let path = self.path.join("owner");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| err(&self.path, format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: flock on a descriptor we own; the result is checked.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            let owner = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(err(
                &self.path,
                format!(
                    "another Rebound process (pid {}) runs this VM",
                    owner.trim()
                ),
            ));
        }
        let _ = file.set_len(0);
        let _ = file.write_all_at(std::process::id().to_string().as_bytes(), 0);
        Ok(Claim { _file: file })
    }

    /// Marks the directory unrecoverable (protection was lost, or stopped) with the reason.
    /// Any one of the three steps is enough for recovery to refuse, and the last two need no
    /// space, so this works on a full file system too.
    ///
    /// The first reason stays (later failures are usually consequences of it), and it is
    /// written atomically: a crash while marking never leaves a marker without its reason.
    pub fn mark_lost(&self, reason: &str) {
        let marker = self.path.join("lost");
        let recorded = std::fs::read_to_string(&marker).is_ok_and(|r| !r.trim().is_empty());
        if !recorded {
            let tmp = self.path.join(".lost.tmp");
            let written =
                std::fs::write(&tmp, reason).and_then(|()| std::fs::rename(&tmp, &marker));
            if written.is_err() {
                // No space even for the reason: an empty marker still refuses recovery.
                let _ = std::fs::remove_file(&tmp);
                let _ = OpenOptions::new().create(true).append(true).open(&marker);
            }
        }
        if let Ok(f) = OpenOptions::new().write(true).open(self.undo()) {
            let _ = f.set_len(0);
        }
        self.purge_records();
    }

    /// Removes every checkpoint record (protection starting afresh: old records no longer
    /// describe the VM).
    pub fn purge_records(&self) {
        if let Ok(records) = self.records() {
            for (_, path) in records {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Clears the lost marker (a new first checkpoint is committed).
    pub fn clear_lost(&self) {
        let _ = std::fs::remove_file(self.path.join("lost"));
    }

    /// Records that the VM ended (`reason`, exit `code`) and the output its end releases,
    /// atomically: from here on recovery only puts that output back. Written before the output
    /// is released, so a crash in between loses none of it and repeats none.
    pub fn write_ended(&self, reason: &str, code: i32, out: &OutputRecord) -> io::Result<()> {
        let mut b = Vec::with_capacity(40 + reason.len() + out.bytes.len());
        b.extend_from_slice(&ENDED_MAGIC);
        b.extend_from_slice(&code.to_le_bytes());
        b.extend_from_slice(&(reason.len() as u32).to_le_bytes());
        b.extend_from_slice(reason.as_bytes());
        b.extend_from_slice(&out.offset.to_le_bytes());
        b.extend_from_slice(&(out.bytes.len() as u64).to_le_bytes());
        b.extend_from_slice(&out.bytes);
        b.extend_from_slice(&crc32c::crc32c(&b).to_le_bytes());
        let tmp = self.path.join(".ended.tmp");
        std::fs::write(&tmp, &b)?;
        std::fs::rename(&tmp, self.path.join("ended"))
    }

    /// How the VM ended and what its end released, if it ended.
    pub fn ended(&self) -> Option<(String, i32, OutputRecord)> {
        let b = std::fs::read(self.path.join("ended")).ok()?;
        let (body, crc) = b.split_at_checked(b.len().checked_sub(4)?)?;
        if crc32c::crc32c(body).to_le_bytes() != crc || !body.starts_with(&ENDED_MAGIC) {
            return None;
        }
        let mut r = &body[ENDED_MAGIC.len()..];
        let mut take = |n: usize| -> Option<&[u8]> {
            let (a, rest) = r.split_at_checked(n)?;
            r = rest;
            Some(a)
        };
        let code = i32::from_le_bytes(take(4)?.try_into().ok()?);
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let reason = String::from_utf8_lossy(take(len)?).into_owned();
        let offset = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let n = u64::from_le_bytes(take(8)?.try_into().ok()?) as usize;
        let bytes = take(n)?.to_vec();
        Some((reason, code, OutputRecord { offset, bytes }))
    }

    /// The VM ended: nothing is left to recover. Frees its memory (tmpfs is RAM) and keeps the
    /// console log and the reason.
    pub fn end(&self, reason: &str) {
        self.mark_lost(reason);
        let _ = std::fs::remove_file(self.undo());
        let _ = std::fs::remove_file(self.scratch_disk());
        let _ = std::fs::remove_file(self.memory());
    }

    /// Records the VM's identity (what its persistent cache belongs to), atomically. Kept when
    /// the VM ends, like the console log: it says whose cache the VM had.
    pub fn write_identity(&self, record: &str) -> io::Result<()> {
        let tmp = self.path.join(".identity.tmp");
        std::fs::write(&tmp, record)?;
        std::fs::rename(&tmp, self.path.join("identity"))
    }

    /// The identity recorded by [`write_identity`](Self::write_identity), if any.
    pub fn identity(&self) -> Option<String> {
        std::fs::read_to_string(self.path.join("identity")).ok()
    }

    /// Why the directory cannot be recovered, if it cannot.
    pub fn lost(&self) -> Option<String> {
        let reason = std::fs::read_to_string(self.path.join("lost")).ok()?;
        Some(if reason.trim().is_empty() {
            "protection was lost (the reason could not be recorded)".into()
        } else {
            reason
        })
    }
}

/// This process's claim on a state directory (see [`StateDir::claim`]).
#[derive(Debug)]
pub struct Claim {
    _file: File,
}

/// A journaled page: its number and old contents.
pub type UndoEntry = (u64, Vec<u8>);

const ENDED_MAGIC: [u8; 8] = *b"RBNDEND1";
const UNDO_MAGIC: [u8; 8] = *b"RBNDUNDO";
const UNDO_HEADER: u64 = 24;
const UNDO_ENTRY: u64 = 16 + PAGE_SIZE;

/// The undo journal: old page contents, appended before the page may change.
pub struct UndoJournal {
    file: File,
    len: u64,
    base: u64,
    path: PathBuf,
}

/// An entry's checksum covers the base epoch too, so entries left from an older epoch never
/// pass as this one's.
fn entry_crc(base: u64, page: u64, bytes: &[u8]) -> u32 {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&base.to_le_bytes());
    key[8..].copy_from_slice(&page.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&key), bytes)
}

impl UndoJournal {
    /// Opens (creating) the journal and empties it for epoch `base`.
    pub fn create(path: &Path, base: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut j = Self {
            file,
            len: 0,
            base,
            path: path.to_path_buf(),
        };
        j.reset(base)?;
        Ok(j)
    }

    /// Empties the journal: its entries are now relative to checkpoint `base`.
    pub fn reset(&mut self, base: u64) -> io::Result<()> {
        faults::check_write("undo journal reset")?;
        let mut h = [0u8; UNDO_HEADER as usize];
        h[0..8].copy_from_slice(&UNDO_MAGIC);
        h[8..16].copy_from_slice(&base.to_le_bytes());
        let crc = crc32c::crc32c(&h[..16]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        // Cut first, then the new header: a crash in between leaves the old base with no
        // entries (and entries are checksummed with their base, so none can be mistaken).
        self.file.set_len(UNDO_HEADER)?;
        self.file.write_all_at(&h, 0)?;
        self.len = UNDO_HEADER;
        self.base = base;
        Ok(())
    }

    /// Journals page `page`'s old contents.
    pub fn append(&mut self, page: u64, bytes: &[u8]) -> io::Result<()> {
        faults::check_write("undo journal")?;
        let mut e = Vec::with_capacity(UNDO_ENTRY as usize);
        e.extend_from_slice(&page.to_le_bytes());
        e.extend_from_slice(&entry_crc(self.base, page, bytes).to_le_bytes());
        e.extend_from_slice(&[0; 4]);
        e.extend_from_slice(bytes);
        self.file.write_all_at(&e, self.len)?;
        self.len += UNDO_ENTRY;
        Ok(())
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads a journal: its base epoch and its complete entries (a torn last entry is dropped:
    /// its page had not been allowed to change yet). None if it has no valid header; an error
    /// if a complete entry is damaged.
    pub fn read(path: &Path) -> io::Result<Option<(u64, Vec<UndoEntry>)>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if bytes.len() < UNDO_HEADER as usize
            || bytes[0..8] != UNDO_MAGIC
            || crc32c::crc32c(&bytes[..16])
                != u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]])
        {
            return Ok(None);
        }
        let base = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
        let mut entries = Vec::new();
        for e in bytes[UNDO_HEADER as usize..].chunks_exact(UNDO_ENTRY as usize) {
            let page = u64::from_le_bytes(e[0..8].try_into().unwrap_or_default());
            let crc = u32::from_le_bytes(e[8..12].try_into().unwrap_or_default());
            let data = &e[16..];
            if entry_crc(base, page, data) != crc {
                // A crash leaves at most a short last entry (dropped above); a whole entry
                // that fails its checksum is damage, and undoing only part would be worse.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("entry {} is damaged", entries.len()),
                ));
            }
            entries.push((page, data.to_vec()));
        }
        Ok(Some((base, entries)))
    }
}

/// The console log: released output written at known offsets, so writing an epoch's output
/// again after a crash puts the same bytes in the same place.
pub struct ConsoleLog {
    file: File,
    offset: u64,
    /// Also shown here (best effort; not exactly-once).
    mirror: Option<Box<dyn Write + Send>>,
    /// The directory to mark lost if the log cannot be written.
    dir: Option<StateDir>,
    /// A write failed: the log no longer matches what was released; only the mirror gets more.
    broken: bool,
}

impl ConsoleLog {
    /// Opens (creating) the log and cuts it at `offset`, where writing continues.
    pub fn open(
        path: &Path,
        offset: u64,
        mirror: Option<Box<dyn Write + Send>>,
    ) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        file.set_len(offset)?;
        Ok(Self {
            file,
            offset,
            mirror,
            dir: None,
            broken: false,
        })
    }

    /// Marks `dir` unrecoverable if the log cannot be written (released output would be
    /// missing from it).
    pub fn guarding(mut self, dir: StateDir) -> Self {
        self.dir = Some(dir);
        self
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let logged = if self.broken {
            Ok(())
        } else {
            faults::check_write("console log")
                .and_then(|()| self.file.write_all_at(buf, self.offset))
        };
        if let Some(m) = &mut self.mirror {
            let _ = m.write_all(buf);
        }
        match logged {
            Ok(()) => {
                self.offset += buf.len() as u64;
                Ok(buf.len())
            }
            Err(e) => {
                // Reported once (the engine gives protection up); the mirror still shows
                // everything.
                self.broken = true;
                if let Some(d) = &self.dir {
                    d.mark_lost(&format!("the console log could not be written: {e}"));
                }
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(m) = &mut self.mirror {
            let _ = m.flush();
        }
        Ok(())
    }
}

/// Writes an output record's bytes at its offset and cuts the log after them (recovery). The
/// bytes go first, over the same bytes if they were already there, so the log never loses a
/// byte it showed, even if this is interrupted.
pub fn replay_output(path: &Path, out: &OutputRecord) -> io::Result<u64> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let end = out
        .offset
        .checked_add(out.bytes.len() as u64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "output offset out of range"))?;
    file.write_all_at(&out.bytes, out.offset)?;
    file.set_len(end)?;
    Ok(out.offset + out.bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_round_trips_and_drops_a_torn_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("undo");
        let mut j = UndoJournal::create(&path, 7).unwrap();
        j.append(3, &[1; 4096]).unwrap();
        j.append(9, &[2; 4096]).unwrap();
        let (base, entries) = UndoJournal::read(&path).unwrap().unwrap();
        assert_eq!(base, 7);
        assert_eq!(
            entries.iter().map(|(p, b)| (*p, b[0])).collect::<Vec<_>>(),
            vec![(3, 1), (9, 2)]
        );
        // A torn second entry.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(UNDO_HEADER + UNDO_ENTRY + 100).unwrap();
        assert_eq!(UndoJournal::read(&path).unwrap().unwrap().1.len(), 1);
        // A damaged complete entry is an error, not a shorter journal.
        f.set_len(UNDO_HEADER + UNDO_ENTRY).unwrap();
        f.write_all_at(&[0xff], UNDO_HEADER + 20).unwrap();
        assert!(
            UndoJournal::read(&path)
                .unwrap_err()
                .to_string()
                .contains("damaged")
        );
        j.reset(8).unwrap();
        assert_eq!(UndoJournal::read(&path).unwrap().unwrap(), (8, vec![]));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(UndoJournal::read(&path).unwrap().is_none());
    }

    #[test]
    fn console_log_rewrites_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = ConsoleLog::open(&path, 0, None).unwrap();
        log.write_all(b"abc").unwrap();
        log.write_all(b"def").unwrap();
        // Recovery from a checkpoint that released "de" at offset 3: the log becomes "abcde".
        let end = replay_output(
            &path,
            &OutputRecord {
                offset: 3,
                bytes: b"de".to_vec(),
            },
        )
        .unwrap();
        assert_eq!(end, 5);
        assert_eq!(std::fs::read(&path).unwrap(), b"abcde");
        let mut log = ConsoleLog::open(&path, end, None).unwrap();
        log.write_all(b"X").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abcdeX");
    }

    #[test]
    fn the_end_record_round_trips_and_a_damaged_one_is_ignored() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let d = StateDir::create(&shm.path().join("vm")).unwrap();
        assert!(d.ended().is_none());
        let out = OutputRecord {
            offset: 7,
            bytes: b"bye\n".to_vec(),
        };
        d.write_ended("guest exited with status 3", 3, &out)
            .unwrap();
        assert_eq!(
            d.ended(),
            Some(("guest exited with status 3".into(), 3, out))
        );
        let path = d.path().join("ended");
        let mut b = std::fs::read(&path).unwrap();
        b[12] ^= 1;
        std::fs::write(&path, &b).unwrap();
        assert!(d.ended().is_none());
        std::fs::write(&path, b"RBNDEND1").unwrap();
        assert!(d.ended().is_none());
    }

    #[test]
    fn an_ended_vm_can_be_opened_without_its_memory() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let d = StateDir::create(&shm.path().join("vm")).unwrap();
        std::fs::write(d.memory(), b"").unwrap();
        d.write_ended("guest exited with status 0", 0, &OutputRecord::default())
            .unwrap();
        d.end("the VM ended");
        assert!(!d.memory().exists());
        // Recovery opens it and finds the end (a kill between the end and the process exit).
        let d = StateDir::open(d.path()).unwrap();
        assert_eq!(d.ended().map(|e| e.1), Some(0));
        std::fs::remove_file(d.path().join("ended")).unwrap();
        let e = StateDir::open(d.path()).err().unwrap();
        assert!(e.to_string().contains("no memory file"), "{e}");
    }

    #[test]
    fn marking_lost_leaves_nothing_recovery_could_trust() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let d = StateDir::create(&shm.path().join("vm")).unwrap();
        let mut j = UndoJournal::create(&d.undo(), 4).unwrap();
        j.append(1, &[9; 4096]).unwrap();
        std::fs::write(d.record(4), b"x").unwrap();
        d.mark_lost("disk full");
        assert_eq!(d.lost().as_deref(), Some("disk full"));
        assert!(d.records().unwrap().is_empty());
        assert!(UndoJournal::read(&d.undo()).unwrap().is_none());
        // The first reason stays: what fails next is a consequence.
        d.mark_lost("the console log could not be written");
        assert_eq!(d.lost().as_deref(), Some("disk full"));
        d.clear_lost();
        assert!(d.lost().is_none());
        // A marker without its reason still refuses recovery, and says so.
        std::fs::write(d.path().join("lost"), b"").unwrap();
        assert!(d.lost().unwrap().contains("could not be recorded"));
        d.mark_lost("EIO");
        assert_eq!(d.lost().as_deref(), Some("EIO"));
    }

    #[test]
    fn a_state_directory_must_be_on_tmpfs_and_fresh() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let d = StateDir::create(&shm.path().join("vm")).unwrap();
        std::fs::write(d.memory(), b"").unwrap();
        assert!(
            StateDir::create(d.path())
                .unwrap_err()
                .to_string()
                .contains("already holds a VM")
        );
        assert!(StateDir::open(d.path()).is_ok());
        let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        assert!(
            StateDir::create(disk.path())
                .unwrap_err()
                .to_string()
                .contains("not on tmpfs")
        );
    }
}
