//! Capture strategies: how a checkpoint records memory, and how a rollback puts it back.
//!
//! | strategy | at a checkpoint (VM paused) | sinks committed | rollback from |
//! | --- | --- | --- | --- |
//! | [`full::Full`] | copy all memory to a shadow | while paused | the shadow (all pages) |
//! | [`post_image::PostImage`] | copy dirty pages to the shadow | while paused | the shadow (pages dirtied since) |
//! | [`double_buffered::DoubleBuffered`] | copy dirty pages to a staging buffer | after resuming, with the shadow updated then | the shadow |
//! | [`pre_image::PreImage`] | re-protect written pages (userfaultfd) | while paused | the undo log of old page contents |
//! | [`block_state::BlockState`] | flip written pages' image home to their working home, re-protect them (no copy) | after resuming, from each page's image home | each written page mapped from its image home again (no copy) |

pub mod block_state;
pub mod double_buffered;
pub mod full;
pub mod post_image;
pub mod pre_image;

use rebound_snapshot::{DirtySet, PAGE_SIZE};
use rebound_vmm::vm::Frozen;
use serde::{Deserialize, Serialize};

use crate::{CheckpointRef, Error};

/// The strategies, by name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// Copy all memory at every checkpoint (the baseline).
    Full,
    /// Copy the pages written since the last checkpoint.
    PostImage,
    /// Copy dirty pages to staging while paused; write the shadow and sinks while the guest runs.
    #[default]
    DoubleBuffered,
    /// Save a page's old contents before its first write in an epoch (userfaultfd write-protect).
    PreImage,
    /// Two homes per page: the first write in an epoch moves the page's mapping to its other
    /// home; a checkpoint flips which home holds the image, a rollback maps it back (no copies).
    BlockState,
}

impl StrategyKind {
    /// Every strategy.
    pub const ALL: [StrategyKind; 5] = [
        Self::Full,
        Self::PostImage,
        Self::DoubleBuffered,
        Self::PreImage,
        Self::BlockState,
    ];

    /// Builds the strategy for `mem_size` bytes of guest memory.
    pub fn build(self, mem_size: u64) -> Box<dyn Strategy> {
        match self {
            Self::Full => Box::new(full::Full::new(mem_size)),
            Self::PostImage => Box::new(post_image::PostImage::new(mem_size)),
            Self::DoubleBuffered => Box::new(double_buffered::DoubleBuffered::new(mem_size)),
            Self::PreImage => Box::new(pre_image::PreImage::new(mem_size)),
            Self::BlockState => Box::new(block_state::BlockState::new(mem_size)),
        }
    }

    /// The name used in the API.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::PostImage => "post_image",
            Self::DoubleBuffered => "double_buffered",
            Self::PreImage => "pre_image",
            Self::BlockState => "block_state",
        }
    }
}

/// Page contents as of the last checkpoint, for sinks.
pub trait PageSource: Sync {
    /// Page `p`'s bytes, if this source has them.
    fn page(&self, p: u64) -> Option<&[u8]>;
}

/// A capture strategy. The engine calls it with the VM frozen except for `settle`.
pub trait Strategy: Send {
    /// Which one.
    fn kind(&self) -> StrategyKind;

    /// Takes the baseline when protection starts; `epoch` is the first checkpoint's.
    fn start(&mut self, frozen: &Frozen<'_>, epoch: u64) -> Result<(), Error>;

    /// The pages written since the last checkpoint (or since `start`).
    fn dirty(&mut self, frozen: &Frozen<'_>) -> Result<DirtySet, Error>;

    /// Records the checkpoint. `dirty` is what [`dirty`](Self::dirty) returned.
    fn capture(&mut self, frozen: &Frozen<'_>, dirty: &DirtySet) -> Result<(), Error>;

    /// For strategies whose sinks are committed after the VM resumes: memory as of the last
    /// checkpoint. Synchronous strategies return None: their sinks read the paused VM.
    fn async_source(&self) -> Option<&dyn PageSource> {
        None
    }

    /// After an asynchronous commit: fold what was captured into the rollback image.
    fn settle(&mut self) {}

    /// Whether the rollback point moves only once the sinks acknowledged a checkpoint (the
    /// strategy keeps state relative to the last acknowledged one: the pre-image undo log).
    fn moves_on_commit(&self) -> bool {
        false
    }

    /// Every sink acknowledged checkpoint `cp` (`dirty` = its pages); called while paused.
    fn committed(&mut self, _cp: CheckpointRef, _dirty: &DirtySet) -> Result<(), Error> {
        Ok(())
    }

    /// Makes memory equal to the last checkpoint's. `dirty` = pages written since it.
    /// Protection is given up: free what the strategy holds (shadow, write protection) now.
    fn give_up(&mut self) {}

    /// Memory the strategy holds besides guest memory, in bytes (resident shadow pages, the
    /// undo log, a second home).
    fn memory_bytes(&self) -> u64 {
        0
    }

    fn rollback(&mut self, frozen: &Frozen<'_>, dirty: &DirtySet) -> Result<(), Error>;
}

/// A full copy of guest memory as of the last checkpoint.
pub struct Shadow {
    bytes: Vec<u8>,
}

impl Shadow {
    /// An all-zero shadow (pages are allocated by the OS on first write).
    pub fn new(mem_size: u64) -> Self {
        Self {
            bytes: vec![0; mem_size as usize],
        }
    }

    fn range(p: u64) -> std::ops::Range<usize> {
        (p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize
    }

    /// Copies the pages of `set` from frozen guest memory, one bulk copy per run of pages.
    pub fn copy_pages(&mut self, frozen: &Frozen<'_>, set: &DirtySet) {
        let Some(src) = frozen.all_memory() else {
            return;
        };
        if src.len() != self.bytes.len() {
            return;
        }
        for (first, count) in set.runs(u64::MAX) {
            let r = (first * PAGE_SIZE) as usize..((first + count) * PAGE_SIZE) as usize;
            self.bytes[r.clone()].copy_from_slice(&src[r]);
        }
    }

    /// Copies all of frozen guest memory that may hold data (one bulk copy per run: untouched
    /// memory is neither read nor allocated).
    pub fn copy_all(&mut self, frozen: &Frozen<'_>) {
        self.copy_pages(frozen, &frozen.data_pages());
    }

    /// Bytes of the shadow in RAM (pages never copied to are not allocated).
    pub fn resident_bytes(&self) -> u64 {
        resident_bytes(&self.bytes)
    }

    /// All of it.
    pub fn all(&self) -> &[u8] {
        &self.bytes
    }

    /// Overwrites page `p` with `bytes`.
    pub fn store(&mut self, p: u64, bytes: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(Self::range(p)) {
            dst.copy_from_slice(bytes);
        }
    }

    /// Writes the shadow's page `p` back into guest memory.
    pub fn restore_page(&self, frozen: &Frozen<'_>, p: u64) -> Result<(), Error> {
        match self.bytes.get(Self::range(p)) {
            Some(b) => write_page(frozen, p, b),
            None => Ok(()),
        }
    }
}

impl PageSource for Shadow {
    fn page(&self, p: u64) -> Option<&[u8]> {
        self.bytes.get(Self::range(p))
    }
}

/// Pages copied at a checkpoint, in ascending page order.
#[derive(Default)]
pub struct Staging {
    pages: Vec<u64>,
    data: Vec<u8>,
}

impl Staging {
    /// Replaces the contents with the pages of `set` copied from frozen memory (one bulk copy
    /// per run of pages).
    pub fn fill(&mut self, frozen: &Frozen<'_>, set: &DirtySet) {
        self.pages.clear();
        self.data.clear();
        let Some(src) = frozen.all_memory() else {
            return;
        };
        for (first, count) in set.runs(u64::MAX) {
            let r = (first * PAGE_SIZE) as usize..((first + count) * PAGE_SIZE) as usize;
            if let Some(bytes) = src.get(r) {
                self.pages.extend(first..first + count);
                self.data.extend_from_slice(bytes);
            }
        }
    }

    /// The staged pages and their bytes.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.pages
            .iter()
            .copied()
            .zip(self.data.chunks_exact(PAGE_SIZE as usize))
    }

    /// Bytes allocated for staged pages.
    pub fn capacity_bytes(&self) -> u64 {
        (self.data.capacity() + self.pages.capacity() * 8) as u64
    }

    /// Empties it (keeping the allocation).
    pub fn clear(&mut self) {
        self.pages.clear();
        self.data.clear();
    }
}

impl PageSource for Staging {
    fn page(&self, p: u64) -> Option<&[u8]> {
        let i = self.pages.binary_search(&p).ok()?;
        self.data
            .get(i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize)
    }
}

/// Bytes of `buf` in RAM, from `mincore` (0 if it fails).
fn resident_bytes(buf: &[u8]) -> u64 {
    let page = PAGE_SIZE as usize;
    let start = buf.as_ptr() as usize & !(page - 1);
    let end = (buf.as_ptr() as usize + buf.len()).div_ceil(page) * page;
    if end <= start {
        return 0;
    }
    let mut vec = vec![0u8; (end - start) / page];
    // SAFETY: [start, end) covers `buf`'s pages, all mapped by the allocator for as long as `buf`
    // lives; `vec` has one byte per page, which is all the kernel writes.
    let r = unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
    if r < 0 {
        return 0;
    }
    vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE
}

/// Writes page `p` of guest memory (a rollback).
pub(crate) fn write_page(frozen: &Frozen<'_>, p: u64, bytes: &[u8]) -> Result<(), Error> {
    frozen
        .write_memory(p * PAGE_SIZE, bytes)
        .map_err(|e| Error::Vm(e.to_string()))
}

/// The paused VM's memory, for synchronous commits.
pub struct FrozenSource<'a, 'b>(pub &'a Frozen<'b>);

impl PageSource for FrozenSource<'_, '_> {
    fn page(&self, p: u64) -> Option<&[u8]> {
        self.0.page(p)
    }
}
