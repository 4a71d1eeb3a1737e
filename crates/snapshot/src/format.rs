//! The snapshot file.
//!
//! ```text
//! 0            header, 4096 bytes: magic "RBNDSNAP", format version, kind (full / diff), id,
//!              parent id, epoch, creation time, memory size and offset, the file's length,
//!              section table (kind, version, offset, length, CRC32C per section), CRC32C of
//!              the header in its last 4 bytes
//! 4096         sections: "vm", "vcpus", "devices" (postcard), back to back, each checked by
//!              its CRC32C
//! ...          zero padding up to the memory image
//! mem_offset   memory image (2 MiB aligned): guest page p at mem_offset + p * 4096. Sparse:
//!              only pages in the memory index are written, the rest are holes (zero)
//! after it     section "memory": the index of present pages as runs (first page, count,
//!              xxh3 of the run's bytes); the file ends with it, at the length in the header
//! ```
//!
//! Every byte is accounted for: the header and sections by their CRC32C, stored pages by their
//! run's xxh3, and everything else (padding, pages not stored) must be zero. A reader checks
//! the zeros by asking the file system where the file holds data (`SEEK_DATA`): holes read as
//! zero without being read, so checking costs nothing for a sparse file.
//!
//! A full snapshot lists every non-zero page (absent pages are zero); a diff lists every page
//! written since its parent (absent pages are the parent's). Files are written to a temporary
//! name, fsynced, renamed, and the directory fsynced: a reader sees a whole snapshot or none.
//! Opening validates everything (header, every section, every memory run, the zeros) before
//! returning, so nothing is loaded from a bad file. Restore maps the memory image
//! copy-on-write (`MAP_PRIVATE`): nothing is copied up front and clones of one snapshot share
//! its pages.
//!
//! Format versions read: 1 (sections 8-byte aligned, no length in the header: the file ends
//! with the memory index) and 2 (this one). Every version keeps the magic at 0, the version at
//! 8 and the header's CRC32C at 4092, so a newer file is told apart from a damaged one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::PAGE_SIZE;

/// First bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"RBNDSNAP";
/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
const HEADER_SIZE: u64 = 4096;
/// The header's CRC32C (of every byte before it), at the same place in every version.
const CRC_AT: usize = HEADER_SIZE as usize - 4;
/// Bytes 68..72: reserved, zero (version 2 on).
const RESERVED_AT: usize = 68;
/// Bytes 72..80: the file's length (version 2 on).
const LEN_AT: usize = 72;
const ENTRY_SIZE: usize = 32;
const MEM_ALIGN: u64 = 2 << 20;
/// Largest guest memory a snapshot may describe (the layout's maximum).
const MAX_MEM_SIZE: u64 = 64 << 30;
/// Most bytes of sections (other than the memory index) a snapshot may hold.
const MAX_METADATA: u64 = 64 << 20;
/// Where the memory image may start at the latest (after the most metadata and its padding).
const MAX_MEM_OFFSET: u64 = HEADER_SIZE + MAX_METADATA + 2 * MEM_ALIGN;
/// Pages per memory run: a corrupt byte is located to within 1 MiB.
const RUN_PAGES: u64 = 256;

/// What differs between the format versions this build reads.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// Where the section table starts in the header.
    table_at: usize,
    /// Each section other than the memory index starts at the end of the one before, rounded
    /// up to this (the bytes between are zero).
    section_align: u64,
    /// The header records the file's length (and has reserved bytes that must be zero).
    has_len: bool,
}

/// Version 1: sections 8-byte aligned, the file's length implied by the memory index's end.
const LAYOUT_V1: Layout = Layout {
    table_at: 72,
    section_align: 8,
    has_len: false,
};
/// Version 2: sections back to back, the file's length in the header.
const LAYOUT_V2: Layout = Layout {
    table_at: 80,
    section_align: 1,
    has_len: true,
};
/// The layout this build writes ([`FORMAT_VERSION`]).
const LAYOUT: Layout = LAYOUT_V2;

impl Layout {
    fn of(version: u32) -> Option<Self> {
        match version {
            1 => Some(LAYOUT_V1),
            2 => Some(LAYOUT_V2),
            _ => None,
        }
    }

    fn max_sections(&self) -> usize {
        (CRC_AT - self.table_at) / ENTRY_SIZE
    }
}

/// Section kinds. Unknown kinds are skipped by readers (additions within a format version).
pub mod section {
    /// The VM's description (memory size, vCPUs, layout, image).
    pub const VM: u32 = 1;
    /// Every vCPU's registers.
    pub const VCPUS: u32 = 2;
    /// Device state.
    pub const DEVICES: u32 = 3;
    /// The memory index.
    pub const MEMORY: u32 = 4;
    /// The output a checkpoint record releases (state directories).
    pub const OUTPUT: u32 = 5;
    /// Shared regions attached (files before `COMPONENTS`).
    pub const SHARED: u32 = 6;
    /// The checkpoint a record follows (state directories).
    pub const CHAIN: u32 = 7;
    /// Every component's state by id.
    pub const COMPONENTS: u32 = 8;
    /// The disk's contents are saved beside the snapshot (`<snapshot>.disk`).
    pub const DISK: u32 = 9;

    /// Name used in messages.
    pub fn name(kind: u32) -> &'static str {
        match kind {
            VM => "vm",
            VCPUS => "vcpus",
            DEVICES => "devices",
            MEMORY => "memory",
            OUTPUT => "output",
            SHARED => "shared",
            CHAIN => "chain",
            COMPONENTS => "components",
            DISK => "disk",
            _ => "unknown",
        }
    }
}

/// Full or incremental.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// Every non-zero page.
    Full,
    /// Pages written since the parent.
    Diff,
}

/// What a snapshot is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Unique id.
    pub id: u64,
    /// The snapshot this diff applies to (None for a full one).
    pub parent: Option<u64>,
    /// The checkpoint epoch it captures.
    pub epoch: u64,
    /// Full or diff.
    pub kind: Kind,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// When it was taken (ns since the Unix epoch).
    pub created_unix_ns: u64,
}

/// Why a snapshot could not be written or read. Messages name the file and the bad section.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be read or written.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// No snapshot magic.
    #[error("{path} is not a Rebound snapshot (bad magic)")]
    NotASnapshot {
        /// The file.
        path: PathBuf,
    },
    /// Written by a newer Rebound.
    #[error(
        "snapshot {path} has format version {found}; this Rebound reads up to version {supported}"
    )]
    FutureVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// Ours.
        supported: u32,
    },
    /// The file ends before a section does.
    #[error("snapshot {path} is truncated: section \"{section}\" is incomplete")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The section cut short.
        section: &'static str,
    },
    /// A checksum does not match.
    #[error("snapshot {path} is corrupt: section \"{section}\" {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The bad section.
        section: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Bytes the format says are zero (padding, pages not stored) are not.
    #[error(
        "snapshot {path} is corrupt: {region} holds a non-zero byte at file offset {at:#x} (it must be zero)"
    )]
    NotZero {
        /// The file.
        path: PathBuf,
        /// Where: "the padding before the memory image", "memory page 0x3c0 (not stored)".
        region: String,
        /// The first non-zero byte's offset in the file.
        at: u64,
    },
    /// The file goes on after its last section.
    #[error(
        "snapshot {path} is corrupt: it is {found} bytes long but ends at byte {expected} \
         (data appended, or the file was extended)"
    )]
    TrailingData {
        /// The file.
        path: PathBuf,
        /// Its length by its header.
        expected: u64,
        /// Its length on disk.
        found: u64,
    },
    /// A section is newer than this build understands.
    #[error(
        "snapshot {path}: section \"{section}\" has version {found}; this Rebound reads up to {supported}"
    )]
    SectionVersion {
        /// The file.
        path: PathBuf,
        /// The section.
        section: &'static str,
        /// Its version.
        found: u32,
        /// Ours.
        supported: u32,
    },
    /// A required section is absent.
    #[error("snapshot {path} has no \"{section}\" section")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The section.
        section: &'static str,
    },
    /// A section's bytes do not decode.
    #[error("snapshot {path}: section \"{section}\" does not decode: {reason}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The section.
        section: &'static str,
        /// Why.
        reason: String,
    },
    /// Snapshots that do not form a chain (full, then diffs of each other, same memory size).
    #[error("snapshot chain: {0}")]
    Chain(String),
    /// A value to store does not encode.
    #[error("cannot encode section \"{section}\": {reason}")]
    Encode {
        /// The section.
        section: &'static str,
        /// Why.
        reason: String,
    },
}

type Result<T> = std::result::Result<T, SnapshotError>;

/// One section to write.
pub struct SectionData {
    /// Its kind ([`section`]).
    pub kind: u32,
    /// Its version (bumped when its encoding changes).
    pub version: u32,
    /// The encoded bytes.
    pub bytes: Vec<u8>,
}

impl SectionData {
    /// Encodes `value` with postcard.
    pub fn encode<T: Serialize>(kind: u32, version: u32, value: &T) -> Result<Self> {
        let bytes = postcard::to_stdvec(value).map_err(|e| SnapshotError::Encode {
            section: section::name(kind),
            reason: e.to_string(),
        })?;
        Ok(Self {
            kind,
            version,
            bytes,
        })
    }
}

/// A run of present pages in the memory image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Run {
    /// First page.
    pub first: u64,
    /// Number of pages.
    pub count: u64,
    /// xxh3-64 of the run's bytes.
    pub hash: u64,
}

/// What writing a snapshot did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Pages stored.
    pub pages: u64,
    /// Pages skipped because they were zero (full snapshots only).
    pub zero_pages_skipped: u64,
    /// Bytes of the file that hold data (not holes).
    pub bytes_written: u64,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn is_zero(page: &[u8]) -> bool {
    // Word-wise comparison; compiles to vector code.
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
}

/// A file written under a temporary name and renamed into place only when complete.
struct AtomicFile {
    tmp: PathBuf,
    path: PathBuf,
    file: File,
    done: bool,
}

impl AtomicFile {
    fn create(path: &Path) -> Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(
            ".{name}.tmp-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(path))?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
            file,
            done: false,
        })
    }

    fn commit(mut self) -> Result<()> {
        self.file.sync_all().map_err(io_err(&self.path))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        self.done = true;
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.path))?;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes a snapshot atomically. `pages` yields `(page number, 4096 bytes)` in ascending page
/// order; for a full snapshot zero pages are skipped (absent means zero).
pub fn write<'a>(
    path: &Path,
    meta: &SnapshotMeta,
    sections: &[SectionData],
    pages: impl Iterator<Item = (u64, &'a [u8])>,
) -> Result<WriteStats> {
    let mut w = Writer::create(path, meta, sections)?;
    for (p, bytes) in pages {
        w.page(p, bytes)?;
    }
    w.finish()
}

/// A snapshot being written, page by page (ascending), then committed atomically by
/// [`finish`](Self::finish); dropped unfinished, it leaves nothing behind.
pub struct Writer {
    out: AtomicFile,
    path: PathBuf,
    meta: SnapshotMeta,
    table: Vec<(u32, u32, u64, u64, u32)>,
    mem_offset: u64,
    runs: Vec<Run>,
    buf: Vec<u8>,
    run_first: u64,
    last: Option<u64>,
    stats: WriteStats,
}

impl Writer {
    /// Starts a snapshot file with its sections.
    pub fn create(path: &Path, meta: &SnapshotMeta, sections: &[SectionData]) -> Result<Self> {
        if sections.len() + 1 > LAYOUT.max_sections() {
            return Err(SnapshotError::Encode {
                section: "header",
                reason: "too many sections".into(),
            });
        }
        let out = AtomicFile::create(path)?;
        let mut stats = WriteStats::default();
        let mut table = Vec::new();
        let mut at = HEADER_SIZE;
        for s in sections {
            out.file.write_all_at(&s.bytes, at).map_err(io_err(path))?;
            table.push((
                s.kind,
                s.version,
                at,
                s.bytes.len() as u64,
                crc32c::crc32c(&s.bytes),
            ));
            at = (at + s.bytes.len() as u64).next_multiple_of(LAYOUT.section_align);
            stats.bytes_written += s.bytes.len() as u64;
        }
        Ok(Self {
            out,
            path: path.to_path_buf(),
            meta: meta.clone(),
            table,
            mem_offset: at.next_multiple_of(MEM_ALIGN),
            runs: Vec::new(),
            buf: Vec::with_capacity((RUN_PAGES * PAGE_SIZE) as usize),
            run_first: 0,
            last: None,
            stats,
        })
    }

    /// Adds page `p` (pages must come in ascending order).
    pub fn page(&mut self, p: u64, bytes: &[u8]) -> Result<()> {
        if p >= self.meta.mem_size / PAGE_SIZE
            || bytes.len() as u64 != PAGE_SIZE
            || self.last.is_some_and(|l| p <= l)
        {
            return Err(SnapshotError::Encode {
                section: "memory",
                reason: format!("page {p} is out of order, out of range or not {PAGE_SIZE} bytes"),
            });
        }
        self.last = Some(p);
        if self.meta.kind == Kind::Full && is_zero(bytes) {
            self.stats.zero_pages_skipped += 1;
            return Ok(());
        }
        let contiguous =
            !self.buf.is_empty() && self.run_first + self.buf.len() as u64 / PAGE_SIZE == p;
        if !contiguous || self.buf.len() as u64 == RUN_PAGES * PAGE_SIZE {
            self.flush_run()?;
            self.run_first = p;
        }
        self.buf.extend_from_slice(bytes);
        self.stats.pages += 1;
        Ok(())
    }

    /// Coalesced pages go out as one write and one hash per run.
    fn flush_run(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.out
            .file
            .write_all_at(&self.buf, self.mem_offset + self.run_first * PAGE_SIZE)
            .map_err(io_err(&self.path))?;
        self.runs.push(Run {
            first: self.run_first,
            count: self.buf.len() as u64 / PAGE_SIZE,
            hash: xxhash_rust::xxh3::xxh3_64(&self.buf),
        });
        self.buf.clear();
        Ok(())
    }

    /// Writes the index and header, fsyncs and renames the file into place.
    pub fn finish(mut self) -> Result<WriteStats> {
        self.flush_run()?;
        let path = self.path.clone();
        let meta = &self.meta;
        self.stats.bytes_written += self.stats.pages * PAGE_SIZE;
        let index = SectionData::encode(section::MEMORY, 1, &self.runs)?;
        let index_at = self.mem_offset + meta.mem_size;
        let f = &self.out.file;
        f.write_all_at(&index.bytes, index_at)
            .map_err(io_err(&path))?;
        self.table.push((
            index.kind,
            index.version,
            index_at,
            index.bytes.len() as u64,
            crc32c::crc32c(&index.bytes),
        ));

        let mut h = vec![0u8; HEADER_SIZE as usize];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(meta.kind as u32).to_le_bytes());
        h[16..24].copy_from_slice(&meta.id.to_le_bytes());
        h[24..32].copy_from_slice(&meta.parent.unwrap_or(0).to_le_bytes());
        h[32..40].copy_from_slice(&meta.epoch.to_le_bytes());
        h[40..48].copy_from_slice(&meta.created_unix_ns.to_le_bytes());
        h[48..56].copy_from_slice(&meta.mem_size.to_le_bytes());
        h[56..64].copy_from_slice(&self.mem_offset.to_le_bytes());
        h[64..68].copy_from_slice(&(self.table.len() as u32).to_le_bytes());
        let file_len = index_at + index.bytes.len() as u64;
        h[LEN_AT..LEN_AT + 8].copy_from_slice(&file_len.to_le_bytes());
        for (i, (kind, version, offset, len, crc)) in self.table.iter().enumerate() {
            let e = LAYOUT.table_at + i * ENTRY_SIZE;
            h[e..e + 4].copy_from_slice(&kind.to_le_bytes());
            h[e + 4..e + 8].copy_from_slice(&version.to_le_bytes());
            h[e + 8..e + 16].copy_from_slice(&offset.to_le_bytes());
            h[e + 16..e + 24].copy_from_slice(&len.to_le_bytes());
            h[e + 24..e + 28].copy_from_slice(&crc.to_le_bytes());
        }
        let crc = crc32c::crc32c(&h[..CRC_AT]);
        h[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        f.write_all_at(&h, 0).map_err(io_err(&path))?;
        self.stats.bytes_written += HEADER_SIZE;
        f.set_len(file_len).map_err(io_err(&path))?;
        (&self.out.file).flush().map_err(io_err(&path))?;
        let stats = self.stats;
        self.out.commit()?;
        Ok(stats)
    }
}

/// How much of a snapshot to check when opening it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Every byte: the header, every section, the padding, every stored memory run against its
    /// hash and every page not stored against zero. Reads the data the file holds once (holes
    /// cost nothing).
    Full,
    /// Everything but the memory image's contents (a file verified before, e.g. for clones):
    /// stored runs are trusted; pages not stored for which the file holds data are recorded,
    /// so restore never maps them from the file ([`Snapshot::unchecked_hole_data`]).
    Metadata,
}

/// A validated snapshot file.
pub struct Snapshot {
    path: PathBuf,
    file: File,
    meta: SnapshotMeta,
    mem_offset: u64,
    sections: Vec<(u32, u32, Vec<u8>)>,
    runs: Vec<Run>,
    /// Page ranges (first, count) not stored, for which the file nonetheless holds data.
    hole_data: Vec<(u64, u64)>,
    /// `hole_data` was read and is zero.
    holes_checked: bool,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The index of the first non-zero byte of `b`.
fn first_nonzero(b: &[u8]) -> Option<usize> {
    let whole = b.len() / 16 * 16;
    if is_zero(&b[..whole]) && b[whole..].iter().all(|&x| x == 0) {
        return None;
    }
    b.iter().position(|&x| x != 0)
}

/// The parts of `[start, end)` the file holds data for, as the file system reports them
/// (`SEEK_DATA`, `SEEK_HOLE`); the rest are holes, which read as zero. A file system that cannot
/// tell reports everything as data, and so does any error here: that costs reading, no more.
fn data_extents(file: &File, start: u64, end: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let seek = |at: u64, whence: libc::c_int| -> std::result::Result<u64, io::Error> {
        let at = i64::try_from(at).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek on a descriptor `file` owns; it moves only the file offset, which
        // nothing uses (every read of a snapshot is positioned).
        let r = unsafe { libc::lseek(fd, at, whence) };
        u64::try_from(r).map_err(|_| io::Error::last_os_error())
    };
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let data = match seek(at, libc::SEEK_DATA) {
            Ok(d) => d,
            // No data at or after `at`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(_) => {
                out.push((at, end));
                break;
            }
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE).map_or(end, |h| h.min(end));
        if hole <= data.max(at) {
            // Not possible by the contract; never loop on a confused file system.
            out.push((data.max(at), end));
            break;
        }
        out.push((data.max(at), hole));
        at = hole;
    }
    out
}

/// The offset of the first non-zero byte of the file in `[start, end)`, reading only what the
/// file holds data for.
fn first_nonzero_in(file: &File, start: u64, end: u64) -> io::Result<Option<u64>> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = Vec::new();
    for (a, b) in data_extents(file, start, end) {
        let mut at = a;
        while at < b {
            let n = (b - at).min(CHUNK);
            buf.resize(n as usize, 0);
            file.read_exact_at(&mut buf, at)?;
            if let Some(i) = first_nonzero(&buf) {
                return Ok(Some(at + i as u64));
            }
            at += n;
        }
    }
    Ok(None)
}

/// One entry of the section table.
struct Entry {
    kind: u32,
    version: u32,
    offset: u64,
    len: u64,
    crc: u32,
}

/// A header checked against its layout (nothing after it read yet).
struct Header {
    meta: SnapshotMeta,
    mem_offset: u64,
    /// The section table; the memory index is the last entry.
    table: Vec<Entry>,
    /// Where the sections before the memory image end.
    meta_end: u64,
    /// The file's length by its header.
    file_len: u64,
}

impl Header {
    fn read(file: &File, path: &Path, len: u64) -> Result<Self> {
        let p = || path.to_path_buf();
        let corrupt = |section: &'static str, detail: String| SnapshotError::Corrupt {
            path: p(),
            section,
            detail,
        };
        let truncated = || SnapshotError::Truncated {
            path: p(),
            section: "header",
        };
        let mut h = vec![0u8; HEADER_SIZE as usize];
        let avail = len.min(HEADER_SIZE) as usize;
        file.read_exact_at(&mut h[..avail], 0)
            .map_err(io_err(path))?;
        if avail < 8 || h[0..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot { path: p() });
        }
        if avail < 12 {
            return Err(truncated());
        }
        let version = le32(&h, 8);
        let layout = Layout::of(version);
        let future = || SnapshotError::FutureVersion {
            path: p(),
            found: version,
            supported: FORMAT_VERSION,
        };
        if avail < HEADER_SIZE as usize {
            // No checksum to tell a newer file from a damaged one: say what it claims.
            return Err(if layout.is_none() && version > FORMAT_VERSION {
                future()
            } else {
                truncated()
            });
        }
        // Every version keeps the checksum here, so a damaged version field is not taken for
        // a newer Rebound's file.
        let crc_ok = crc32c::crc32c(&h[..CRC_AT]) == le32(&h, CRC_AT);
        let Some(layout) = layout else {
            return Err(match (crc_ok, version > FORMAT_VERSION) {
                (true, true) => future(),
                (true, false) => corrupt(
                    "header",
                    format!("has format version {version}, which no Rebound writes"),
                ),
                (false, _) => corrupt(
                    "header",
                    format!(
                        "fails its checksum (it says format version {version}; this Rebound \
                         reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})"
                    ),
                ),
            });
        };
        if !crc_ok {
            return Err(corrupt("header", "fails its checksum".into()));
        }
        let kind = match le32(&h, 12) {
            0 => Kind::Full,
            1 => Kind::Diff,
            k => return Err(corrupt("header", format!("has unknown kind {k}"))),
        };
        if layout.has_len && le32(&h, RESERVED_AT) != 0 {
            return Err(corrupt("header", "has non-zero reserved bytes".into()));
        }
        let parent = le64(&h, 24);
        let meta = SnapshotMeta {
            id: le64(&h, 16),
            parent: (parent != 0).then_some(parent),
            epoch: le64(&h, 32),
            kind,
            mem_size: le64(&h, 48),
            created_unix_ns: le64(&h, 40),
        };
        let mem_offset = le64(&h, 56);
        let count = le32(&h, 64) as usize;
        if count > layout.max_sections()
            || meta.mem_size > MAX_MEM_SIZE
            || !meta.mem_size.is_multiple_of(PAGE_SIZE)
            || !mem_offset.is_multiple_of(MEM_ALIGN)
            || !(HEADER_SIZE..=MAX_MEM_OFFSET).contains(&mem_offset)
        {
            return Err(corrupt("header", "has impossible sizes".into()));
        }
        // Where every section lies is fixed by the ones before it, so no byte of the file is
        // unaccounted for. It is checked before anything is read: a crafted table must not make
        // us allocate or read more than the layout allows.
        let index_at = mem_offset + meta.mem_size;
        let index_max = (meta.mem_size / PAGE_SIZE + 1) * 32;
        let mut table = Vec::with_capacity(count);
        let mut meta_end = HEADER_SIZE;
        let mut meta_total = 0u64;
        for i in 0..count {
            let e = layout.table_at + i * ENTRY_SIZE;
            let entry = Entry {
                kind: le32(&h, e),
                version: le32(&h, e + 4),
                offset: le64(&h, e + 8),
                len: le64(&h, e + 16),
                crc: le32(&h, e + 24),
            };
            let name = section::name(entry.kind);
            let Some(end) = entry.offset.checked_add(entry.len) else {
                return Err(corrupt(name, "has an impossible extent".into()));
            };
            let placed = if entry.kind == section::MEMORY {
                i + 1 == count && entry.offset == index_at && entry.len <= index_max
            } else {
                meta_total = meta_total.saturating_add(entry.len);
                let ok = entry.offset == meta_end.next_multiple_of(layout.section_align)
                    && end <= mem_offset
                    && meta_total <= MAX_METADATA;
                meta_end = end;
                ok
            };
            if !placed {
                return Err(corrupt(
                    name,
                    "is placed or sized outside the layout".into(),
                ));
            }
            table.push(entry);
        }
        let Some(index) = table.last().filter(|e| e.kind == section::MEMORY) else {
            return Err(SnapshotError::Missing {
                path: p(),
                section: "memory",
            });
        };
        if mem_offset != meta_end.next_multiple_of(MEM_ALIGN) {
            return Err(corrupt(
                "header",
                "places the memory image away from the end of the sections".into(),
            ));
        }
        let file_len = index.offset + index.len;
        if layout.has_len && le64(&h, LEN_AT) != file_len {
            return Err(corrupt(
                "header",
                format!(
                    "records a length of {} bytes but its sections end at {file_len}",
                    le64(&h, LEN_AT)
                ),
            ));
        }
        Ok(Self {
            meta,
            mem_offset,
            table,
            meta_end,
            file_len,
        })
    }

    /// The section the file's end falls in when it is `len` bytes long (shorter than its
    /// header says).
    fn cut_in(&self, len: u64) -> &'static str {
        self.table
            .iter()
            .find(|e| e.kind != section::MEMORY && e.offset + e.len > len)
            .map_or("memory", |e| section::name(e.kind))
    }
}

impl Snapshot {
    /// Opens and validates a snapshot (see [`Verify`]).
    pub fn open(path: &Path, verify: Verify) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        let header = Header::read(&file, path, len)?;
        let p = || path.to_path_buf();
        if len < header.file_len {
            return Err(SnapshotError::Truncated {
                path: p(),
                section: header.cut_in(len),
            });
        }
        if len > header.file_len {
            return Err(SnapshotError::TrailingData {
                path: p(),
                expected: header.file_len,
                found: len,
            });
        }
        let mut snap = Snapshot {
            path: p(),
            file,
            meta: header.meta.clone(),
            mem_offset: header.mem_offset,
            sections: Vec::with_capacity(header.table.len()),
            runs: Vec::new(),
            hole_data: Vec::new(),
            holes_checked: false,
        };
        snap.read_sections(&header)?;
        let runs: Vec<Run> = snap.decode(section::MEMORY, 1)?;
        let npages = snap.meta.mem_size / PAGE_SIZE;
        let mut next = 0u64;
        for r in &runs {
            if r.count == 0
                || r.count > RUN_PAGES
                || r.first < next
                || r.first.checked_add(r.count).is_none_or(|e| e > npages)
            {
                return Err(SnapshotError::Corrupt {
                    path: p(),
                    section: "memory",
                    detail: "index lists impossible pages".into(),
                });
            }
            next = r.first + r.count;
        }
        snap.runs = runs;
        snap.hole_data = snap.find_hole_data();
        if verify == Verify::Full {
            snap.verify_memory()?;
            snap.holes_checked = true;
        }
        Ok(snap)
    }

    /// Reads and checks every section, and that the bytes between them and up to the memory
    /// image are zero.
    fn read_sections(&mut self, header: &Header) -> Result<()> {
        let mut prev = (HEADER_SIZE, "header");
        for e in &header.table {
            let name = section::name(e.kind);
            if e.kind != section::MEMORY {
                // Alignment padding (format version 1).
                self.check_zero(prev.0, e.offset, || {
                    format!("the padding after section \"{}\"", prev.1)
                })?;
            }
            let mut bytes = vec![0u8; e.len as usize];
            self.file
                .read_exact_at(&mut bytes, e.offset)
                .map_err(io_err(&self.path))?;
            if crc32c::crc32c(&bytes) != e.crc {
                return Err(SnapshotError::Corrupt {
                    path: self.path.clone(),
                    section: name,
                    detail: "fails its checksum".into(),
                });
            }
            self.sections.push((e.kind, e.version, bytes));
            prev = (e.offset + e.len, name);
        }
        self.check_zero(header.meta_end, header.mem_offset, || {
            "the padding before the memory image".into()
        })?;
        Ok(())
    }

    /// Refuses the file unless `[start, end)` reads as zero (reading only what it holds).
    fn check_zero(&self, start: u64, end: u64, region: impl FnOnce() -> String) -> Result<()> {
        match first_nonzero_in(&self.file, start, end).map_err(io_err(&self.path))? {
            None => Ok(()),
            Some(at) => Err(SnapshotError::NotZero {
                path: self.path.clone(),
                region: region(),
                at,
            }),
        }
    }

    /// Pages not stored (they must read as zero) for which the file holds data: none when the
    /// writer's holes are intact, so finding them costs a few `lseek`s and no reading.
    fn find_hole_data(&self) -> Vec<(u64, u64)> {
        let image_end = self.mem_offset + self.meta.mem_size;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |first: u64, end: u64| match out.last_mut() {
            Some((f, c)) if *f + *c == first => *c = end - *f,
            _ => out.push((first, end - first)),
        };
        let mut runs = self.runs.iter().peekable();
        let mut done = 0u64;
        for (a, b) in data_extents(&self.file, self.mem_offset, image_end) {
            let mut p = ((a - self.mem_offset) / PAGE_SIZE).max(done);
            let end = (b - self.mem_offset).div_ceil(PAGE_SIZE);
            while p < end {
                while runs.peek().is_some_and(|r| r.first + r.count <= p) {
                    runs.next();
                }
                match runs.peek() {
                    Some(r) if r.first <= p => p = r.first + r.count,
                    Some(r) if r.first < end => {
                        push(p, r.first);
                        p = r.first + r.count;
                    }
                    _ => {
                        push(p, end);
                        p = end;
                    }
                }
            }
            done = done.max(p);
        }
        out
    }

    /// Checks the memory image: every page not stored for which the file holds data against
    /// zero (first: it normally reads nothing), and every stored run against its hash.
    pub fn verify_memory(&self) -> Result<()> {
        self.verify_holes()?;
        let mut buf = vec![0u8; (RUN_PAGES * PAGE_SIZE) as usize];
        for r in &self.runs {
            let b = &mut buf[..(r.count * PAGE_SIZE) as usize];
            self.file
                .read_exact_at(b, self.mem_offset + r.first * PAGE_SIZE)
                .map_err(io_err(&self.path))?;
            if xxhash_rust::xxh3::xxh3_64(b) != r.hash {
                return Err(SnapshotError::Corrupt {
                    path: self.path.clone(),
                    section: "memory",
                    detail: format!(
                        "pages {:#x}..{:#x} fail their checksum",
                        r.first,
                        r.first + r.count
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks that the pages not stored read as zero (reading only what the file holds for
    /// them: nothing, normally).
    pub fn verify_holes(&self) -> Result<()> {
        for &(first, count) in &self.hole_data {
            let start = self.mem_offset + first * PAGE_SIZE;
            let found = first_nonzero_in(&self.file, start, start + count * PAGE_SIZE)
                .map_err(io_err(&self.path))?;
            if let Some(at) = found {
                return Err(SnapshotError::NotZero {
                    path: self.path.clone(),
                    region: format!(
                        "memory page {:#x} (not stored)",
                        (at - self.mem_offset) / PAGE_SIZE
                    ),
                    at,
                });
            }
        }
        Ok(())
    }

    /// Page ranges (first, count) the snapshot does not store (they read as zero) for which the
    /// file holds data that was not checked (opened with [`Verify::Metadata`]; empty after
    /// [`Verify::Full`]). Restore must not map them from the file.
    pub fn unchecked_hole_data(&self) -> &[(u64, u64)] {
        if self.holes_checked {
            &[]
        } else {
            &self.hole_data
        }
    }

    /// The header's description.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file has a section of `kind` (optional sections).
    pub fn has_section(&self, kind: u32) -> bool {
        self.sections.iter().any(|(k, _, _)| *k == kind)
    }

    /// Decodes section `kind`, refusing versions newer than `supported`.
    pub fn decode<T: DeserializeOwned>(&self, kind: u32, supported: u32) -> Result<T> {
        let name = section::name(kind);
        let (_, version, bytes) = self
            .sections
            .iter()
            .find(|(k, _, _)| *k == kind)
            .ok_or_else(|| SnapshotError::Missing {
                path: self.path.clone(),
                section: name,
            })?;
        if *version > supported {
            return Err(SnapshotError::SectionVersion {
                path: self.path.clone(),
                section: name,
                found: *version,
                supported,
            });
        }
        postcard::from_bytes(bytes).map_err(|e| SnapshotError::Decode {
            path: self.path.clone(),
            section: name,
            reason: e.to_string(),
        })
    }

    /// Runs of pages stored in the memory image.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Number of pages stored.
    pub fn stored_pages(&self) -> u64 {
        self.runs.iter().map(|r| r.count).sum()
    }

    /// The file and the offset of the memory image in it, for mapping.
    pub fn memory_file(&self) -> (&File, u64) {
        (&self.file, self.mem_offset)
    }

    /// Reads `buf.len()` bytes of the memory image at guest address `gpa`.
    pub fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, self.mem_offset + gpa)
            .map_err(io_err(&self.path))
    }
}

impl Snapshot {
    /// The sections other than the memory index, as stored (for merging).
    pub fn raw_sections(&self) -> Vec<SectionData> {
        self.sections
            .iter()
            .filter(|(k, _, _)| *k != section::MEMORY)
            .map(|(kind, version, bytes)| SectionData {
                kind: *kind,
                version: *version,
                bytes: bytes.clone(),
            })
            .collect()
    }
}

/// Writes one full snapshot equal to the chain's end state (the newest snapshot's sections, each
/// page from the newest snapshot that holds it): compaction without touching the VM.
pub fn merge(chain: &[Snapshot], path: &Path, id: u64) -> Result<WriteStats> {
    check_chain(chain)?;
    let last = chain
        .last()
        .ok_or_else(|| SnapshotError::Chain("no snapshot given".into()))?;
    let npages = last.meta.mem_size / PAGE_SIZE;
    // For each page, the index (+1) of the newest snapshot holding it.
    let mut owner = vec![0u8; npages as usize];
    if chain.len() > u8::MAX as usize {
        return Err(SnapshotError::Chain(
            "more than 255 snapshots in one chain".into(),
        ));
    }
    for (i, s) in chain.iter().enumerate() {
        for r in &s.runs {
            owner[r.first as usize..(r.first + r.count) as usize].fill(i as u8 + 1);
        }
    }
    let meta = SnapshotMeta {
        id,
        parent: None,
        kind: Kind::Full,
        ..last.meta.clone()
    };
    let mut w = Writer::create(path, &meta, &last.raw_sections())?;
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for p in 0..npages {
        let Some(i) = (owner[p as usize] as usize).checked_sub(1) else {
            continue;
        };
        chain[i].read_memory(p * PAGE_SIZE, &mut buf)?;
        w.page(p, &buf)?;
    }
    w.finish()
}

/// Checks that `snaps` form a restorable chain: a full snapshot, then diffs each of whose parent
/// is the one before, all of one memory size.
pub fn check_chain(snaps: &[Snapshot]) -> Result<()> {
    let Some(first) = snaps.first() else {
        return Err(SnapshotError::Chain("no snapshot given".into()));
    };
    if first.meta.kind != Kind::Full {
        return Err(SnapshotError::Chain(format!(
            "{} is a diff; a chain starts with a full snapshot",
            first.path.display()
        )));
    }
    for w in snaps.windows(2) {
        let (prev, next) = (&w[0], &w[1]);
        if next.meta.kind != Kind::Diff {
            return Err(SnapshotError::Chain(format!(
                "{} is not a diff of {}: it is a full snapshot (only the first of a chain is)",
                next.path.display(),
                prev.path.display()
            )));
        }
        if next.meta.parent != Some(prev.meta.id) {
            return Err(SnapshotError::Chain(format!(
                "{} is not a diff of {}: its parent is snapshot {:#x}, that one is {:#x} \
                 (a diff of another snapshot, or the chain is out of order)",
                next.path.display(),
                prev.path.display(),
                next.meta.parent.unwrap_or(0),
                prev.meta.id
            )));
        }
        if next.meta.mem_size != prev.meta.mem_size {
            return Err(SnapshotError::Chain(format!(
                "{} has a different memory size",
                next.path.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(kind: Kind, id: u64, parent: Option<u64>) -> SnapshotMeta {
        SnapshotMeta {
            id,
            parent,
            epoch: id,
            kind,
            mem_size: 64 * PAGE_SIZE,
            created_unix_ns: 1,
        }
    }

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE as usize]
    }

    fn write_test(
        path: &Path,
        kind: Kind,
        id: u64,
        parent: Option<u64>,
        pages: &[(u64, Vec<u8>)],
    ) -> WriteStats {
        let sections = [
            SectionData::encode(section::VM, 1, &("vm", 7u32)).unwrap(),
            SectionData::encode(section::VCPUS, 1, &vec![1u64, 2, 3]).unwrap(),
        ];
        write(
            path,
            &meta(kind, id, parent),
            &sections,
            pages.iter().map(|(p, b)| (*p, b.as_slice())),
        )
        .unwrap()
    }

    fn sample(dir: &Path) -> PathBuf {
        let path = dir.join("s.snap");
        let pages: Vec<(u64, Vec<u8>)> =
            vec![(0, page(1)), (1, page(2)), (5, page(0)), (63, page(9))];
        let st = write_test(&path, Kind::Full, 11, None, &pages);
        assert_eq!((st.pages, st.zero_pages_skipped), (3, 1));
        path
    }

    #[test]
    fn round_trip_with_holes_and_sections() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let s = Snapshot::open(&path, Verify::Full).unwrap();
        assert_eq!(s.meta(), &meta(Kind::Full, 11, None));
        let vm: (String, u32) = s.decode(section::VM, 1).unwrap();
        assert_eq!(vm, ("vm".to_string(), 7));
        assert_eq!(s.stored_pages(), 3);
        let mut b = page(0xff);
        s.read_memory(63 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, page(9));
        s.read_memory(5 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, page(0), "holes read as zero");
        assert!(matches!(
            s.decode::<u8>(section::DEVICES, 1),
            Err(SnapshotError::Missing {
                section: "devices",
                ..
            })
        ));
        assert!(matches!(
            s.decode::<u8>(section::VM, 0),
            Err(SnapshotError::SectionVersion { section: "vm", .. })
        ));
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    fn corrupt_at(path: &Path, at: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    }

    fn open_err(path: &Path) -> String {
        match Snapshot::open(path, Verify::Full) {
            Ok(_) => panic!("{} opened", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_corruption_names_its_section() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let s = Snapshot::open(&path, Verify::Full).unwrap();
        let mem_at = s.mem_offset;
        // Sections lie back to back.
        let vcpus_at = HEADER_SIZE + s.sections[0].2.len() as u64;
        let meta_end = vcpus_at + s.sections[1].2.len() as u64;
        drop(s);
        let good = std::fs::read(&path).unwrap();
        let cases: Vec<(u64, &str)> = vec![
            (100, "section \"header\" fails its checksum"),
            (LEN_AT as u64 + 1, "section \"header\" fails its checksum"),
            (HEADER_SIZE + 1, "section \"vm\" fails its checksum"),
            (vcpus_at, "section \"vcpus\" fails its checksum"),
            (
                meta_end,
                "the padding before the memory image holds a non-zero byte",
            ),
            (
                mem_at - 1,
                "the padding before the memory image holds a non-zero byte",
            ),
            (
                mem_at + 63 * PAGE_SIZE + 17,
                "section \"memory\" pages 0x3f..0x40 fail their checksum",
            ),
            (
                mem_at + 5 * PAGE_SIZE + 9,
                "memory page 0x5 (not stored) holds a non-zero byte",
            ),
            (
                good.len() as u64 - 2,
                "section \"memory\" fails its checksum",
            ),
        ];
        for (at, want) in cases {
            std::fs::write(&path, &good).unwrap();
            corrupt_at(&path, at);
            let e = open_err(&path);
            assert!(e.contains(want), "byte {at}: {e:?} should contain {want:?}");
        }
        // A corrupt memory page passes a metadata-only open but not a memory check.
        std::fs::write(&path, &good).unwrap();
        corrupt_at(&path, mem_at + 5);
        let s = Snapshot::open(&path, Verify::Metadata).unwrap();
        assert!(s.verify_memory().is_err());
    }

    #[test]
    fn truncation_and_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let good = std::fs::read(&path).unwrap();
        for (len, want) in [
            (0, "bad magic"),
            (4, "bad magic"),
            (10, "section \"header\" is incomplete"),
            (3000, "section \"header\" is incomplete"),
            (HEADER_SIZE as usize + 3, "section \"vm\" is incomplete"),
            (good.len() - 1, "section \"memory\" is incomplete"),
            (good.len() - 5000, "section \"memory\" is incomplete"),
        ] {
            std::fs::write(&path, &good[..len]).unwrap();
            let e = open_err(&path);
            assert!(
                e.contains(want),
                "length {len}: {e:?} should contain {want:?}"
            );
        }
        // A newer version is told apart from a damaged version field by the header checksum.
        let mut future = good.clone();
        future[8..12].copy_from_slice(&3u32.to_le_bytes());
        std::fs::write(&path, &future).unwrap();
        assert!(open_err(&path).contains(
            "section \"header\" fails its checksum (it says format version 3; this Rebound reads versions 1 to 2)"
        ));
        reseal(&mut future);
        std::fs::write(&path, &future).unwrap();
        assert!(open_err(&path).contains("format version 3; this Rebound reads up to version 2"));
        future[8..12].copy_from_slice(&0u32.to_le_bytes());
        reseal(&mut future);
        std::fs::write(&path, &future).unwrap();
        assert!(open_err(&path).contains("format version 0, which no Rebound writes"));
        std::fs::write(
            &path,
            b"not a snapshot at all, just some text that is long enough",
        )
        .unwrap();
        assert!(open_err(&path).contains("not a Rebound snapshot"));
    }

    #[test]
    fn every_byte_is_accounted_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let good = std::fs::read(&path).unwrap();
        // The writer leaves pages not stored as holes: nothing to read, nothing to hide.
        let s = Snapshot::open(&path, Verify::Metadata).unwrap();
        assert_eq!(s.unchecked_hole_data(), &[] as &[(u64, u64)]);
        let mem_at = s.mem_offset;
        drop(s);
        for extra in [&[0u8][..], &[0u8; 4096][..], b"garbage"] {
            let mut b = good.clone();
            b.extend_from_slice(extra);
            std::fs::write(&path, &b).unwrap();
            let e = open_err(&path);
            assert!(
                e.contains(&format!(
                    "is {} bytes long but ends at byte {}",
                    b.len(),
                    good.len()
                )),
                "{e}"
            );
        }
        // The length in the header must match the layout (a consistent, resealed header too).
        let mut b = good.clone();
        b[LEN_AT..LEN_AT + 8].copy_from_slice(&(good.len() as u64 + 1).to_le_bytes());
        b.push(0);
        reseal(&mut b);
        std::fs::write(&path, &b).unwrap();
        assert!(open_err(&path).contains("records a length of"));
        let mut b = good.clone();
        b[RESERVED_AT] = 1;
        reseal(&mut b);
        std::fs::write(&path, &b).unwrap();
        assert!(open_err(&path).contains("non-zero reserved bytes"));

        // Data where a page is not stored: refused by a full check; a metadata-only open
        // records it so restore does not map it, and a memory check finds it.
        let path = sample(dir.path());
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0x20], mem_at + 10 * PAGE_SIZE + 5)
            .unwrap();
        assert!(open_err(&path).contains(&format!(
            "memory page 0xa (not stored) holds a non-zero byte at file offset {:#x}",
            mem_at + 10 * PAGE_SIZE + 5
        )));
        let s = Snapshot::open(&path, Verify::Metadata).unwrap();
        assert_eq!(s.unchecked_hole_data(), &[(10, 1)]);
        assert!(s.verify_memory().is_err());
        // Zeros written where a hole was are accepted: what a page reads is what counts.
        f.write_all_at(&[0], mem_at + 10 * PAGE_SIZE + 5).unwrap();
        let s = Snapshot::open(&path, Verify::Full).unwrap();
        assert!(s.unchecked_hole_data().is_empty(), "checked");
    }

    /// The same snapshot in format version 1 (sections 8-byte aligned, the table at 72, no
    /// length in the header), as Rebound 0.1 wrote it.
    fn to_v1(v2: &[u8]) -> Vec<u8> {
        let count = le32(v2, 64) as usize;
        let mem_offset = le64(v2, 56) as usize;
        let mut out = vec![0u8; v2.len()];
        out[..RESERVED_AT].copy_from_slice(&v2[..RESERVED_AT]);
        out[8..12].copy_from_slice(&1u32.to_le_bytes());
        let mut at = HEADER_SIZE as usize;
        for i in 0..count {
            let (e2, e1) = (
                LAYOUT_V2.table_at + i * ENTRY_SIZE,
                LAYOUT_V1.table_at + i * ENTRY_SIZE,
            );
            out[e1..e1 + ENTRY_SIZE].copy_from_slice(&v2[e2..e2 + ENTRY_SIZE]);
            if le32(v2, e2) != section::MEMORY {
                let (off, len) = (le64(v2, e2 + 8) as usize, le64(v2, e2 + 16) as usize);
                out[at..at + len].copy_from_slice(&v2[off..off + len]);
                out[e1 + 8..e1 + 16].copy_from_slice(&(at as u64).to_le_bytes());
                at = (at + len).next_multiple_of(8);
            }
        }
        // The memory image stays 2 MiB in, the index right after it.
        out[mem_offset..].copy_from_slice(&v2[mem_offset..]);
        reseal(&mut out);
        out
    }

    #[test]
    fn format_version_1_is_read_as_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let v1 = to_v1(&std::fs::read(&path).unwrap());
        std::fs::write(&path, &v1).unwrap();
        let s = Snapshot::open(&path, Verify::Full).unwrap();
        assert_eq!(s.meta(), &meta(Kind::Full, 11, None));
        let vm: (String, u32) = s.decode(section::VM, 1).unwrap();
        assert_eq!(vm, ("vm".to_string(), 7));
        let mut b = page(0);
        s.read_memory(63 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, page(9));
        // The "vm" section is 4 bytes: 4 bytes of alignment padding follow it.
        let vm_len = s.sections[0].2.len();
        assert_eq!(vm_len, 4);
        drop(s);
        let mut bad = v1.clone();
        bad[HEADER_SIZE as usize + vm_len + 2] = 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(
            open_err(&path).contains("the padding after section \"vm\" holds a non-zero byte"),
            "{}",
            open_err(&path)
        );
        let mut bad = v1.clone();
        bad.push(7);
        std::fs::write(&path, &bad).unwrap();
        assert!(open_err(&path).contains("ends at byte"));
    }

    /// Fixes the header's checksum after an edit, as an attacker who knows the format would.
    fn reseal(b: &mut [u8]) {
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..HEADER_SIZE as usize].copy_from_slice(&crc.to_le_bytes());
    }

    /// Rewrites section `i`'s table entry (offset, length) and fixes the header CRC, as an
    /// attacker who knows the format would.
    fn craft(path: &Path, i: usize, offset: u64, len: u64) {
        let mut b = std::fs::read(path).unwrap();
        let e = LAYOUT.table_at + i * ENTRY_SIZE;
        b[e + 8..e + 16].copy_from_slice(&offset.to_le_bytes());
        b[e + 16..e + 24].copy_from_slice(&len.to_le_bytes());
        reseal(&mut b);
        std::fs::write(path, b).unwrap();
    }

    #[test]
    fn crafted_section_tables_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let good = std::fs::read(&path).unwrap();
        for (i, offset, len) in [
            (0, HEADER_SIZE, 1 << 30), // a huge section
            (1, HEADER_SIZE, 8),       // overlapping the one before
            (0, 100, 8),               // inside the header
            (2, HEADER_SIZE, 8),       // the memory index away from its place
            (0, u64::MAX - 3, 8),      // wrapping
        ] {
            std::fs::write(&path, &good).unwrap();
            craft(&path, i, offset, len);
            let e = open_err(&path);
            assert!(
                e.contains("outside the layout") || e.contains("impossible extent"),
                "{i} {offset} {len}: {e}"
            );
        }
    }

    #[test]
    fn chains_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let base = sample(dir.path());
        let d1 = dir.path().join("d1.snap");
        let st = write_test(&d1, Kind::Diff, 12, Some(11), &[(5, page(0)), (6, page(6))]);
        assert_eq!(
            (st.pages, st.zero_pages_skipped),
            (2, 0),
            "diffs keep zeroed pages"
        );
        let d2 = dir.path().join("d2.snap");
        write_test(&d2, Kind::Diff, 13, Some(12), &[(6, page(7))]);
        let open = |p: &Path| Snapshot::open(p, Verify::Full).unwrap();
        assert!(check_chain(&[open(&base), open(&d1), open(&d2)]).is_ok());
        assert!(
            check_chain(&[open(&base), open(&d2)])
                .unwrap_err()
                .to_string()
                .contains("is not a diff of")
        );
        assert!(
            check_chain(&[open(&d1)])
                .unwrap_err()
                .to_string()
                .contains("starts with a full snapshot")
        );
        assert!(check_chain(&[]).is_err());
    }

    #[test]
    fn merging_a_chain_gives_its_end_state() {
        let dir = tempfile::tempdir().unwrap();
        let base = sample(dir.path());
        let d1 = dir.path().join("d1.snap");
        write_test(&d1, Kind::Diff, 12, Some(11), &[(0, page(0)), (6, page(6))]);
        let open = |p: &Path| Snapshot::open(p, Verify::Full).unwrap();
        let merged = dir.path().join("m.snap");
        merge(&[open(&base), open(&d1)], &merged, 99).unwrap();
        let m = open(&merged);
        assert_eq!(
            (m.meta().kind, m.meta().id, m.meta().parent),
            (Kind::Full, 99, None)
        );
        let mut b = page(0xff);
        for (p, want) in [(0, 0u8), (1, 2), (5, 0), (6, 6), (63, 9), (7, 0)] {
            m.read_memory(p * PAGE_SIZE, &mut b).unwrap();
            assert_eq!(b, page(want), "page {p}");
        }
        assert_eq!(m.stored_pages(), 3, "zero pages are not stored");
    }

    #[test]
    fn bad_page_streams_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.snap");
        let pages = [(3u64, page(1)), (2, page(1))];
        let e = write(
            &path,
            &meta(Kind::Full, 1, None),
            &[],
            pages.iter().map(|(p, b)| (*p, b.as_slice())),
        );
        assert!(e.is_err());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no partial file"
        );
    }
}
