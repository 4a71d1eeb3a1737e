//! The preserved region of a protected VM: a directory, on tmpfs, from which a new process takes
//! the VM over after the VMM crashed or for a live update.
//!
//! ```text
//! DIR/memory          guest memory, mapped shared by the VMM: it outlives the process
//! DIR/undo            undo journal: the checkpoint it is based on (epoch and id), how many
//!                     entries are committed, and the old contents of every page written since
//!                     that checkpoint, each journaled before the write was allowed to happen.
//!                     Its header naming a checkpoint is the commit of that checkpoint
//! DIR/head            the newest committed checkpoint (epoch and id), written after the
//!                     journal: a second witness, so an older journal put back is refused
//! DIR/checkpoint-N    checkpoint N: VM, vCPU and device state, the output checkpoint N
//!                     releases with its offset in the console log, and the checkpoint it
//!                     follows (snapshot file format, no memory pages)
//! DIR/console.log     the guest's released output, each epoch's bytes at their offset
//! DIR/console.shown   how far the console log has been written to stdout
//! DIR/lost            present once protection was lost: the directory cannot be recovered
//! ```
//!
//! Recovery (`recovery`): the journal names the committed checkpoint C; its record, the head,
//! the journal's committed entries, the memory file and the console log must all agree with
//! it, or nothing is touched. Then the journaled pages go back into `memory` (undoing what the
//! guest did after C), C's output is rewritten at its offset (idempotent) and the log cut
//! there, and the VM resumes from C's state.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rebound_snapshot::PAGE_SIZE;
use serde::{Deserialize, Serialize};

use crate::faults;
use crate::{CheckpointRef, Error};

/// Section kind of the output a checkpoint record releases.
pub const OUTPUT_SECTION: u32 = rebound_snapshot::format::section::OUTPUT;
/// Section kind of the checkpoint a record follows ([`ChainRecord`]); 6 is the VM's shared
/// regions (`rebound_vmm::persist::SHARED_SECTION`).
pub const CHAIN_SECTION: u32 = rebound_snapshot::format::section::CHAIN;

/// Which committed checkpoint a record follows: the link that lets recovery tell a record
/// written just before a crash (it follows the committed one) from one that does not belong.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainRecord {
    /// The checkpoint committed when this one was taken (None: the first of its protection).
    pub follows: Option<CheckpointRef>,
}

/// What a checkpoint releases: `bytes` at `offset` of the console log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRecord {
    /// Where the bytes go in the console log.
    pub offset: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether `path` (which exists) is on tmpfs.
fn is_tmpfs(path: &Path) -> Result<bool, Error> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| err(path, "the path contains a NUL byte"))?;
    // SAFETY: `statfs` reads a NUL-terminated path and fills the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above; the result is checked.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(err(path, io::Error::last_os_error()));
    }
    Ok(st.f_type as i64 == TMPFS_MAGIC)
}

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
        // Checked before anything is created: a refused directory leaves no trace.
        let existing = path
            .ancestors()
            .find(|a| !a.as_os_str().is_empty() && a.exists())
            .unwrap_or(Path::new("."));
        if !is_tmpfs(existing)? {
            return Err(err(
                path,
                format!(
                    "cannot create it: {} is not on tmpfs (use /dev/shm or $XDG_RUNTIME_DIR): guest memory must be shared memory",
                    existing.display()
                ),
            ));
        }
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
            dir.head(),
            dir.console_log(),
            shown_path(&dir.console_log()),
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
        if !is_tmpfs(&self.path)? {
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

    /// The head file: the newest committed checkpoint.
    pub fn head(&self) -> PathBuf {
        self.path.join("head")
    }

    /// Records `head` as the newest committed checkpoint (None: none yet). One `pwrite` of 32
    /// bytes inside the file's first page, which a kill cannot tear on tmpfs.
    pub fn write_head(&self, head: Option<CheckpointRef>) -> io::Result<()> {
        faults::check_write("head")?;
        let mut h = [0u8; HEAD_SIZE];
        h[0..8].copy_from_slice(&HEAD_MAGIC);
        let (epoch, id) = head.map_or((0, 0), |c| (c.epoch, c.id));
        h[8..16].copy_from_slice(&epoch.to_le_bytes());
        h[16..24].copy_from_slice(&id.to_le_bytes());
        let crc = crc32c::crc32c(&h[..24]);
        h[24..28].copy_from_slice(&crc.to_le_bytes());
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.head())?;
        f.write_all_at(&h, 0)?;
        // Only ever this size (a no-op unless something grew it).
        f.set_len(HEAD_SIZE as u64)
    }

    /// The newest committed checkpoint the head file names (None: none yet). An error if the
    /// file is missing (`NotFound`) or damaged (`InvalidData`).
    pub fn read_head(&self) -> io::Result<Option<CheckpointRef>> {
        let b = std::fs::read(self.head())?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "the head file is damaged");
        if b.len() != HEAD_SIZE || b[0..8] != HEAD_MAGIC {
            return Err(bad());
        }
        if crc32c::crc32c(&b[..24]).to_le_bytes() != b[24..28] {
            return Err(bad());
        }
        let (epoch, id) = (word(&b, 8), word(&b, 16));
        Ok((epoch != 0).then_some(CheckpointRef { epoch, id }))
    }

    /// The committed checkpoint guest memory is known to equal right now, if the directory
    /// proves it: the head and an empty journal both name it and its record is there. That is
    /// a VM recovered a moment ago that has not run since; protection starting again continues
    /// from it (its first record follows it), so no crash in between leaves a directory
    /// without a committed checkpoint.
    pub fn resumable_head(&self) -> Option<CheckpointRef> {
        let head = self.read_head().ok()??;
        let j = UndoJournal::read(&self.undo()).ok()??;
        (j.version == UNDO_VERSION
            && j.base == Some(head)
            && j.entries.is_empty()
            && self.record(head.epoch).exists())
        .then_some(head)
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
        let claim = self.claim_quietly()?;
        claim.announce();
        Ok(claim)
    }

    /// [`claim`](Self::claim) without writing this process's pid into the `owner` file yet:
    /// recovery writes nothing before it has checked everything, so a refusal leaves every
    /// file as it was. [`Claim::announce`] writes the pid.
    pub fn claim_quietly(&self) -> Result<Claim, Error> {
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
        Ok(Claim { file })
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
        let _ = std::fs::remove_file(self.head());
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
    file: File,
}

impl Claim {
    /// Writes this process's pid into the `owner` file (what a refused second claimant names).
    pub fn announce(&self) {
        let _ = self.file.set_len(0);
        let _ = self
            .file
            .write_all_at(std::process::id().to_string().as_bytes(), 0);
    }
}

const HEAD_MAGIC: [u8; 8] = *b"RBNDHEAD";
const HEAD_SIZE: usize = 32;

/// A journaled page: its number and old contents.
pub type UndoEntry = (u64, Vec<u8>);

const ENDED_MAGIC: [u8; 8] = *b"RBNDEND1";
/// Format 1 (Rebound 0.1): base epoch only, no committed count. Still read.
const UNDO_MAGIC_V1: [u8; 8] = *b"RBNDUNDO";
const UNDO_HEADER_V1: u64 = 24;
const UNDO_MAGIC: [u8; 8] = *b"RBNDUND2";
/// The journal format this build writes.
pub const UNDO_VERSION: u32 = 2;
/// Size of the journal's header: entries start here.
pub const UNDO_HEADER: u64 = 64;
/// Size of one journal entry.
pub const UNDO_ENTRY: u64 = 16 + PAGE_SIZE;

/// The undo journal: old page contents, appended before the page may change.
///
/// ```text
/// 0    "RBNDUND2"
/// 8    base epoch: the committed checkpoint memory goes back to (0: none committed yet)
/// 16   base checkpoint id
/// 24   generation: new at every reset, so no entry of an earlier one can pass
/// 32   committed entries
/// 40   CRC32C of bytes 0..40
/// 64   entry i at 64 + i * 4112: page (u64), CRC32C (u32) of base epoch, id, generation, i,
///      page and contents, 4 zero bytes, the page's 4096 old bytes
/// ```
///
/// An entry is written first and counted (the header rewritten) second, and only then may the
/// guest write the page. So entries past the committed count are pages that were never
/// written (a kill tore or cut their append) and are ignored, while fewer complete entries
/// than the count means the journal was damaged: pages were written that cannot be undone.
/// The header is rewritten by one `pwrite` inside the file's first page, which a kill cannot
/// tear on tmpfs.
pub struct UndoJournal {
    file: File,
    path: PathBuf,
    base: Option<CheckpointRef>,
    generation: u64,
    committed: u64,
}

/// What a journal holds.
#[derive(Debug, PartialEq, Eq)]
pub struct JournalContents {
    /// Its format (1: Rebound 0.1, whose base has no id: `id` is 0).
    pub version: u32,
    /// The committed checkpoint it is based on (None: none committed yet).
    pub base: Option<CheckpointRef>,
    /// Its committed entries, oldest first.
    pub entries: Vec<UndoEntry>,
}

/// A format-1 entry's checksum covers the base epoch too, so entries left from an older epoch
/// never pass as this one's.
fn entry_crc_v1(base: u64, page: u64, bytes: &[u8]) -> u32 {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&base.to_le_bytes());
    key[8..].copy_from_slice(&page.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&key), bytes)
}

/// An entry's checksum binds it to its journal (base, generation) and its place in it.
fn entry_crc(
    base: Option<CheckpointRef>,
    generation: u64,
    index: u64,
    page: u64,
    bytes: &[u8],
) -> u32 {
    let (epoch, id) = base.map_or((0, 0), |b| (b.epoch, b.id));
    let mut key = [0u8; 40];
    for (i, v) in [epoch, id, generation, index, page].into_iter().enumerate() {
        key[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    crc32c::crc32c_append(crc32c::crc32c(&key), bytes)
}

fn invalid(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

fn word(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

impl UndoJournal {
    /// Opens (creating) the journal and empties it, based on `base` (None: no checkpoint is
    /// committed yet).
    pub fn create(path: &Path, base: Option<CheckpointRef>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut j = Self {
            file,
            path: path.to_path_buf(),
            base,
            generation: crate::random_id(),
            committed: 0,
        };
        j.reset(base)?;
        Ok(j)
    }

    fn write_header(&self) -> io::Result<()> {
        let mut h = [0u8; UNDO_HEADER as usize];
        h[0..8].copy_from_slice(&UNDO_MAGIC);
        let (epoch, id) = self.base.map_or((0, 0), |b| (b.epoch, b.id));
        for (i, v) in [epoch, id, self.generation, self.committed]
            .into_iter()
            .enumerate()
        {
            h[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&h[..40]);
        h[40..44].copy_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(&h, 0)
    }

    /// Empties the journal: its entries are now relative to checkpoint `base`. Naming a newly
    /// written record here is what commits it.
    pub fn reset(&mut self, base: Option<CheckpointRef>) -> io::Result<()> {
        faults::check_write("undo journal reset")?;
        self.base = base;
        self.generation = self.generation.wrapping_add(1);
        self.committed = 0;
        // The new header first: the old entries behind it are past its (zero) count and of
        // another generation, so a crash before the cut leaves a valid empty journal.
        self.write_header()?;
        self.file.set_len(UNDO_HEADER)
    }

    /// Journals page `page`'s old contents: the entry, then the count that commits it.
    pub fn append(&mut self, page: u64, bytes: &[u8]) -> io::Result<()> {
        faults::check_write("undo journal")?;
        let index = self.committed;
        let mut e = Vec::with_capacity(UNDO_ENTRY as usize);
        e.extend_from_slice(&page.to_le_bytes());
        e.extend_from_slice(
            &entry_crc(self.base, self.generation, index, page, bytes).to_le_bytes(),
        );
        e.extend_from_slice(&[0; 4]);
        e.extend_from_slice(bytes);
        self.file
            .write_all_at(&e, UNDO_HEADER + index * UNDO_ENTRY)?;
        self.committed += 1;
        if let Err(err) = self.write_header() {
            self.committed -= 1;
            return Err(err);
        }
        Ok(())
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads a journal. None if it has no valid header (missing, emptied by a loss, or
    /// damaged there); an error naming what is wrong if a committed entry is missing or
    /// damaged.
    pub fn read(path: &Path) -> io::Result<Option<JournalContents>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if bytes.starts_with(&UNDO_MAGIC_V1) {
            return Self::read_v1(&bytes);
        }
        if bytes.len() < UNDO_HEADER as usize
            || bytes[0..8] != UNDO_MAGIC
            || crc32c::crc32c(&bytes[..40]).to_le_bytes() != bytes[40..44]
        {
            return Ok(None);
        }
        let (epoch, id, generation, committed) = (
            word(&bytes, 8),
            word(&bytes, 16),
            word(&bytes, 24),
            word(&bytes, 32),
        );
        let base = (epoch != 0).then_some(CheckpointRef { epoch, id });
        let complete = (bytes.len() as u64 - UNDO_HEADER) / UNDO_ENTRY;
        if complete < committed {
            return Err(invalid(format!(
                "{committed} entries were committed but only {complete} are complete: it was cut short, and pages the guest wrote can no longer be undone"
            )));
        }
        let mut entries = Vec::with_capacity(committed as usize);
        for (i, e) in bytes[UNDO_HEADER as usize..]
            .chunks_exact(UNDO_ENTRY as usize)
            .take(committed as usize)
            .enumerate()
        {
            let page = word(e, 0);
            let crc = u32::from_le_bytes(e[8..12].try_into().unwrap_or_default());
            let data = &e[16..];
            if entry_crc(base, generation, i as u64, page, data) != crc {
                return Err(invalid(format!(
                    "entry {i} of its {committed} committed entries fails its checksum"
                )));
            }
            entries.push((page, data.to_vec()));
        }
        Ok(Some(JournalContents {
            version: UNDO_VERSION,
            base,
            entries,
        }))
    }

    /// Format 1: complete entries are committed; a torn last one is dropped (its page had not
    /// been allowed to change yet).
    fn read_v1(bytes: &[u8]) -> io::Result<Option<JournalContents>> {
        if bytes.len() < UNDO_HEADER_V1 as usize
            || crc32c::crc32c(&bytes[..16]).to_le_bytes() != bytes[16..20]
        {
            return Ok(None);
        }
        let base = word(bytes, 8);
        let mut entries = Vec::new();
        for e in bytes[UNDO_HEADER_V1 as usize..].chunks_exact(UNDO_ENTRY as usize) {
            let page = word(e, 0);
            let crc = u32::from_le_bytes(e[8..12].try_into().unwrap_or_default());
            let data = &e[16..];
            if entry_crc_v1(base, page, data) != crc {
                // A crash leaves at most a short last entry (dropped above); a whole entry
                // that fails its checksum is damage, and undoing only part would be worse.
                return Err(invalid(format!("entry {} is damaged", entries.len())));
            }
            entries.push((page, data.to_vec()));
        }
        Ok(Some(JournalContents {
            version: 1,
            base: Some(CheckpointRef { epoch: base, id: 0 }),
            entries,
        }))
    }
}

/// The console log: released output written at known offsets, so writing an epoch's output
/// again after a crash puts the same bytes in the same place.
///
/// It is mirrored to the console (stdout), and how far the mirror got is recorded in
/// `console.shown` after each flushed write. A process that opens the log again (recovery)
/// first shows what the log holds beyond that: output the previous process released but may
/// not have shown before it died. So stdout misses nothing the log has; it repeats at most the
/// last write shown before a kill that came before its record.
pub struct ConsoleLog {
    file: File,
    offset: u64,
    /// Also shown here.
    mirror: Option<Box<dyn Write + Send>>,
    /// Where how far the mirror got is recorded.
    shown: Option<File>,
    /// The last write reached the mirror (only then is it recorded as shown).
    mirrored: bool,
    /// The directory to mark lost if the log cannot be written.
    dir: Option<StateDir>,
    /// A write failed: the log no longer matches what was released; only the mirror gets more.
    broken: bool,
}

const SHOWN_MAGIC: [u8; 8] = *b"RBNDSHOW";
const SHOWN_SIZE: usize = 24;

/// Where a console log records how far it was shown.
fn shown_path(log: &Path) -> PathBuf {
    log.with_extension("shown")
}

fn read_shown(f: &File) -> Option<u64> {
    let mut b = [0u8; SHOWN_SIZE];
    f.read_exact_at(&mut b, 0).ok()?;
    (b[0..8] == SHOWN_MAGIC && crc32c::crc32c(&b[..16]).to_le_bytes() == b[16..20])
        .then(|| word(&b, 8))
}

/// One `pwrite` inside the file's first page: a kill cannot tear it on tmpfs.
fn write_shown(f: &File, offset: u64) -> io::Result<()> {
    let mut b = [0u8; SHOWN_SIZE];
    b[0..8].copy_from_slice(&SHOWN_MAGIC);
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    let crc = crc32c::crc32c(&b[..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&b, 0)
}

fn open_shown(log: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(shown_path(log))
}

/// Shows `mirror` what the log at `path` holds from where its shown record stops up to `end`,
/// then records `end` as shown. With no shown record (a directory from Rebound 0.1, or one
/// that lost it) the log is taken as shown: nothing is repeated, and what may be missing is
/// still in the log.
fn catch_up(log: &File, shown: &File, end: u64, mirror: &mut dyn Write) -> io::Result<()> {
    let mut at = read_shown(shown).unwrap_or(end).min(end);
    let mut buf = vec![0u8; (end - at).min(1 << 20) as usize];
    while at < end {
        let n = buf.len().min((end - at) as usize);
        log.read_exact_at(&mut buf[..n], at)?;
        mirror.write_all(&buf[..n])?;
        at += n as u64;
    }
    mirror.flush()?;
    write_shown(shown, end)
}

/// Records the console log at `path` as shown up to `offset` (a standby that keeps a VM's log:
/// its primary showed that output, a process taking the VM over must not show it again).
pub fn mark_shown(path: &Path, offset: u64) -> io::Result<()> {
    write_shown(&open_shown(path)?, offset)
}

/// Shows `mirror` the end of the log at `path` it may not have shown yet (recovery of a VM that
/// ended: its last output may have reached the log but not stdout).
pub fn show_unshown(path: &Path, mirror: &mut dyn Write) -> io::Result<()> {
    let log = File::open(path)?;
    let end = log.metadata()?.len();
    catch_up(&log, &open_shown(path)?, end, mirror)
}

impl ConsoleLog {
    /// Opens (creating) the log and cuts it at `offset`, where writing continues. With a
    /// mirror, first shows it what the log holds up to `offset` that it was not shown.
    pub fn open(
        path: &Path,
        offset: u64,
        mut mirror: Option<Box<dyn Write + Send>>,
    ) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        file.set_len(offset)?;
        let shown = match &mut mirror {
            Some(m) => {
                let shown = open_shown(path)?;
                if let Err(e) = catch_up(&file, &shown, offset, m.as_mut()) {
                    tracing::warn!("cannot show the console log's unshown end: {e}");
                }
                Some(shown)
            }
            None => None,
        };
        Ok(Self {
            file,
            offset,
            mirror,
            shown,
            mirrored: true,
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
            self.mirrored = m.write_all(buf).is_ok();
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
        if let Some(m) = &mut self.mirror
            && m.flush().is_ok()
            && self.mirrored
            && !self.broken
            && let Some(shown) = &self.shown
            && let Err(e) = write_shown(shown, self.offset)
        {
            // Only stdout's hand-off suffers: a recovery may show the log's end again.
            tracing::warn!("cannot record how far the console was shown: {e}");
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

    fn cp(epoch: u64) -> Option<CheckpointRef> {
        Some(CheckpointRef {
            epoch,
            id: 1000 + epoch,
        })
    }

    fn pages(j: &JournalContents) -> Vec<(u64, u8)> {
        j.entries.iter().map(|(p, b)| (*p, b[0])).collect()
    }

    #[test]
    fn journal_round_trips_and_ignores_only_uncommitted_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("undo");
        let mut j = UndoJournal::create(&path, cp(7)).unwrap();
        j.append(3, &[1; 4096]).unwrap();
        j.append(9, &[2; 4096]).unwrap();
        let c = UndoJournal::read(&path).unwrap().unwrap();
        assert_eq!((c.version, c.base), (2, cp(7)));
        assert_eq!(pages(&c), vec![(3, 1), (9, 2)]);
        let good = std::fs::read(&path).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        // An append a kill tore (or cut before its count): its page was never written.
        f.set_len(UNDO_HEADER + 2 * UNDO_ENTRY + 100).unwrap();
        assert_eq!(pages(&UndoJournal::read(&path).unwrap().unwrap()).len(), 2);
        f.set_len(UNDO_HEADER + 3 * UNDO_ENTRY).unwrap();
        assert_eq!(pages(&UndoJournal::read(&path).unwrap().unwrap()).len(), 2);
        // A committed entry cut short, or all of them: refused, not a shorter journal.
        for len in [UNDO_HEADER + UNDO_ENTRY + 100, UNDO_HEADER] {
            f.set_len(len).unwrap();
            let e = UndoJournal::read(&path).unwrap_err().to_string();
            assert!(e.contains("2 entries were committed"), "{e}");
        }
        // A damaged committed entry.
        f.write_all_at(&good, 0).unwrap();
        j.append(5, &[3; 4096]).unwrap();
        f.write_all_at(&[0xff], UNDO_HEADER + UNDO_ENTRY + 20)
            .unwrap();
        let e = UndoJournal::read(&path).unwrap_err().to_string();
        assert!(e.contains("entry 1 of its 3"), "{e}");
        // A reset commits a new base; its old entries can never pass as the new ones.
        j.reset(cp(8)).unwrap();
        let c = UndoJournal::read(&path).unwrap().unwrap();
        assert_eq!((c.base, c.entries.len()), (cp(8), 0));
        UndoJournal::create(&path, None).unwrap();
        assert_eq!(UndoJournal::read(&path).unwrap().unwrap().base, None);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(UndoJournal::read(&path).unwrap().is_none());
    }

    #[test]
    fn an_entry_from_another_journal_does_not_pass() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut ja = UndoJournal::create(&a, cp(7)).unwrap();
        let mut jb = UndoJournal::create(&b, cp(7)).unwrap();
        ja.append(3, &[1; 4096]).unwrap();
        jb.append(3, &[2; 4096]).unwrap();
        // Same base and place, another generation: b's entry copied into a fails.
        let mut bytes = std::fs::read(&a).unwrap();
        let other = std::fs::read(&b).unwrap();
        bytes[UNDO_HEADER as usize..].copy_from_slice(&other[UNDO_HEADER as usize..]);
        std::fs::write(&a, &bytes).unwrap();
        assert!(UndoJournal::read(&a).is_err());
    }

    #[test]
    fn a_format_1_journal_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("undo");
        let mut b = Vec::new();
        b.extend_from_slice(&UNDO_MAGIC_V1);
        b.extend_from_slice(&25u64.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&3u64.to_le_bytes());
        b.extend_from_slice(&entry_crc_v1(25, 3, &[7; 4096]).to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&[7; 4096]);
        b.extend_from_slice(&[1; 100]); // a torn last entry
        std::fs::write(&path, &b).unwrap();
        let c = UndoJournal::read(&path).unwrap().unwrap();
        assert_eq!(
            (c.version, c.base),
            (1, Some(CheckpointRef { epoch: 25, id: 0 }))
        );
        assert_eq!(pages(&c), vec![(3, 7)]);
    }

    #[test]
    fn the_head_round_trips_and_a_damaged_one_is_an_error() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let d = StateDir::create(&shm.path().join("vm")).unwrap();
        assert_eq!(d.read_head().unwrap_err().kind(), io::ErrorKind::NotFound);
        d.write_head(None).unwrap();
        assert_eq!(d.read_head().unwrap(), None);
        d.write_head(cp(12)).unwrap();
        assert_eq!(d.read_head().unwrap(), cp(12));
        let mut b = std::fs::read(d.head()).unwrap();
        b[9] ^= 1;
        std::fs::write(d.head(), &b).unwrap();
        assert_eq!(
            d.read_head().unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        // Resumable only when an empty journal and the record agree with the head.
        d.write_head(cp(12)).unwrap();
        let mut j = UndoJournal::create(&d.undo(), cp(12)).unwrap();
        assert_eq!(d.resumable_head(), None, "no record");
        std::fs::write(d.record(12), b"x").unwrap();
        assert_eq!(d.resumable_head(), cp(12));
        j.append(1, &[0; 4096]).unwrap();
        assert_eq!(d.resumable_head(), None, "the guest ran since");
        d.mark_lost("gone");
        assert_eq!(d.resumable_head(), None);
        assert!(!d.head().exists());
    }

    #[test]
    fn a_reopened_console_log_shows_what_stdout_missed() {
        #[derive(Clone, Default)]
        struct Out(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Out {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let first = Out::default();
        let mut log = ConsoleLog::open(&path, 0, Some(Box::new(first.clone()))).unwrap();
        log.write_all(b"abc").unwrap();
        log.flush().unwrap();
        // Released to the log, then the process died before it reached stdout.
        log.mirror = None;
        log.write_all(b"def").unwrap();
        drop(log);
        // Recovery puts back "dex" (what the committed checkpoint released) and reopens.
        let end = replay_output(
            &path,
            &OutputRecord {
                offset: 3,
                bytes: b"dex".to_vec(),
            },
        )
        .unwrap();
        let second = Out::default();
        let mut log = ConsoleLog::open(&path, end, Some(Box::new(second.clone()))).unwrap();
        log.write_all(b"g").unwrap();
        log.flush().unwrap();
        let all = [
            first.0.lock().unwrap().clone(),
            second.0.lock().unwrap().clone(),
        ]
        .concat();
        assert_eq!(all, b"abcdexg");
        // Nothing unshown is left: a VM that ended shows nothing again.
        let third = Out::default();
        show_unshown(&path, &mut third.clone()).unwrap();
        assert!(third.0.lock().unwrap().is_empty());
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
        let mut j = UndoJournal::create(&d.undo(), cp(4)).unwrap();
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
