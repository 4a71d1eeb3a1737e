//! Block-state: every page of guest memory has two homes, home A (the VM's own memfd) and home
//! B (a second memfd of the same size, sparse), and two bits of state: which home the guest maps
//! (the working copy) and which holds the page's checkpoint image. A clean page has both in one
//! home. Guest memory is write-protected with userfaultfd at each checkpoint; at the first write
//! to a page in an epoch (by the guest through KVM, or by the VMM) the handler thread copies the
//! page into its other home and maps that home's page at the guest address (`MAP_FIXED`; KVM
//! follows through its MMU notifier, the memory slot is not touched), so the write lands there
//! and the image stays where it was. Then:
//!
//! - **checkpoint**: the working copy of every written page becomes its image: a bit flip, no
//!   copy. The written pages are write-protected again. The images do not move while the guest
//!   runs (its writes go to the other home), so sinks read them after the VM resumed, from
//!   read-only views of both homes: no staging copy either.
//! - **rollback**: the written pages are mapped from their image's home again: no copy.
//!
//! Mappings: pages mapped from one home at their own offsets merge into one mapping (VMA), so
//! the kernel holds one per run of pages in a home. A checkpoint that finds more than
//! [`SOFT_RUNS`] runs moves every page back to home A (a copy of the pages in B, paused, rare);
//! a first write that would make more than [`HARD_RUNS`] moves the image instead of the mapping
//! (the old contents are copied to the other home, the guest writes in place), which needs no
//! new mapping. Pages written before either home is stale are never copied twice in an epoch.
//!
//! Memory: home B holds a page for every page written while protected (at most the guest's
//! size; pages holding nothing are never allocated). When protection stops, every page goes
//! back to home A and home B is freed, so the VM's memory is its memfd again.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rebound_snapshot::{DirtySet, PAGE_SIZE};
use rebound_vmm::vm::Frozen;

use super::{PageSource, Strategy, StrategyKind};
use crate::Error;
use rebound_vmm::userfault::Uffd;

/// Runs of pages in one home above which a checkpoint moves every page back to home A.
pub const SOFT_RUNS: u64 = 8192;
/// Runs a first write may make at most (`vm.max_map_count` is 65,530 by default, for the whole
/// process); past it the image moves instead of the mapping.
pub const HARD_RUNS: u64 = 24_576;

/// One bit per page.
struct Bits(Vec<u64>);

impl Bits {
    fn new(pages: u64) -> Self {
        Self(vec![0; pages.div_ceil(64) as usize])
    }

    fn get(&self, p: u64) -> bool {
        self.0
            .get((p / 64) as usize)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    fn set(&mut self, p: u64, on: bool) {
        if let Some(w) = self.0.get_mut((p / 64) as usize) {
            if on {
                *w |= 1 << (p % 64);
            } else {
                *w &= !(1 << (p % 64));
            }
        }
    }

    fn any(&self) -> bool {
        self.0.iter().any(|&w| w != 0)
    }
}

/// The block state of every page, shared with the fault handler.
struct State {
    pages: u64,
    /// The home each page is mapped from (false: A, true: B).
    working: Bits,
    /// The home holding each page's checkpoint image.
    image: Bits,
    /// Neighbouring pages mapped from different homes: the mappings are this plus one.
    boundaries: u64,
    /// Sinks are reading the last checkpoint's images (from capture to settle): images stay put.
    in_flight: bool,
    /// Why protection can no longer work, if it cannot.
    error: Option<String>,
    /// First writes that moved the mapping, first writes that moved the image, compactions.
    remapped: u64,
    moved: u64,
    compactions: u64,
}

impl State {
    fn new(pages: u64) -> Self {
        Self {
            pages,
            working: Bits::new(pages),
            image: Bits::new(pages),
            boundaries: 0,
            in_flight: false,
            error: None,
            remapped: 0,
            moved: 0,
            compactions: 0,
        }
    }

    /// Pages whose working copy is not their image: written since the checkpoint.
    fn written(&self) -> DirtySet {
        let words: Vec<u64> = self
            .working
            .0
            .iter()
            .zip(&self.image.0)
            .map(|(w, i)| w ^ i)
            .collect();
        let mut set = DirtySet::new(self.pages);
        set.union_words(&words);
        set
    }

    /// How the boundary count changes if page `p` is mapped from the other home.
    fn flip_delta(&self, p: u64) -> i64 {
        let home = self.working.get(p);
        let mut delta = 0;
        for n in [p.checked_sub(1), Some(p + 1)].into_iter().flatten() {
            if n < self.pages {
                delta += if self.working.get(n) == home { 1 } else { -1 };
            }
        }
        delta
    }

    fn count_boundaries(&self) -> u64 {
        (1..self.pages)
            .filter(|&p| self.working.get(p) != self.working.get(p - 1))
            .count() as u64
    }

    fn fail(&mut self, reason: String) {
        tracing::error!("block-state: {reason}");
        self.error.get_or_insert(reason);
    }
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when `in_flight` ends.
    settled: Condvar,
}

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Guest memory and the two homes.
struct Ctx {
    uffd: Uffd,
    base: u64,
    len: u64,
    /// Home A (the VM's memfd) and home B.
    homes: [File; 2],
}

/// Guest memory bytes at host address `addr`.
///
/// # Safety
/// `[addr, addr + len)` must lie inside guest memory, which must outlive the borrow, and nothing
/// may write it meanwhile (the VM frozen, or the range write-protected).
unsafe fn guest_bytes<'a>(addr: u64, len: u64) -> &'a [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) }
}

impl Ctx {
    fn home(&self, b: bool) -> &File {
        &self.homes[usize::from(b)]
    }

    fn page_addr(&self, p: u64) -> u64 {
        self.base + p * PAGE_SIZE
    }

    /// Maps `count` pages from `first` from home `b` at their own offsets, and registers them
    /// for write-protect faults (left writable).
    fn map_home(&self, first: u64, count: u64, b: bool) -> std::io::Result<()> {
        let (addr, len) = (self.page_addr(first), count * PAGE_SIZE);
        if first + count > self.len / PAGE_SIZE {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: [addr, addr + len) is page aligned and inside guest memory, a shared mapping the
        // VM owns for its whole life (and unmaps whole). MAP_FIXED replaces exactly those pages,
        // atomically for other threads (under the mm's lock), by the same pages of a home file of
        // guest memory's size, with the same protection and flags, so the region stays one valid
        // mapping of its size. The caller made sure the home holds the bytes the guest must see
        // there. KVM drops what it mapped of the old pages through its MMU notifier.
        let r = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE | libc::MAP_FIXED,
                self.home(b).as_raw_fd(),
                (first * PAGE_SIZE) as libc::off_t,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // The same advice as the rest of guest memory (`rebound_vmm::memory`), or neighbouring
        // mappings of one home could not merge again.
        // SAFETY: advice on the range just mapped; it changes no contents.
        let _ =
            unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_HUGEPAGE) };
        self.uffd.register_range(addr, len)
    }

    /// Lets the writer(s) of page `p` go on.
    fn release(&self, p: u64) {
        if let Err(e) = self.uffd.protect(self.page_addr(p), PAGE_SIZE, false) {
            tracing::error!("block-state: cannot release page {p:#x}: {e}");
        }
    }

    /// Write-protects the pages of `set` (one ioctl per run, or all memory if they are many).
    fn protect(&self, set: &DirtySet) -> std::io::Result<()> {
        let runs = set.runs(u64::MAX);
        if runs.len() > 64 {
            return self.uffd.protect_all();
        }
        runs.iter().try_for_each(|&(first, count)| {
            self.uffd
                .protect(self.page_addr(first), count * PAGE_SIZE, true)
        })
    }

    /// The first write to page `p` since the checkpoint (a write-protect fault): the page goes to
    /// its other home, by moving the mapping or, past [`HARD_RUNS`], the image.
    fn first_write<'a>(
        &self,
        shared: &'a Shared,
        mut st: MutexGuard<'a, State>,
        p: u64,
    ) -> MutexGuard<'a, State> {
        let home = st.working.get(p);
        if home != st.image.get(p) || st.error.is_some() {
            // Already moved (a second fault on it, from another thread), or protection is lost.
            self.release(p);
            return st;
        }
        let other = !home;
        // SAFETY: page `p` is inside guest memory and write-protected: every writer waits for
        // the release below.
        let bytes = unsafe { guest_bytes(self.page_addr(p), PAGE_SIZE) };
        if let Err(e) = self.home(other).write_all_at(bytes, p * PAGE_SIZE) {
            // The image cannot be kept apart from the write: protection ends at the next
            // checkpoint; the writer must not wait forever.
            st.fail(format!("cannot copy page {p:#x} to its other home: {e}"));
            self.release(p);
            return st;
        }
        let delta = st.flip_delta(p);
        let within = st.boundaries.saturating_add_signed(delta) < HARD_RUNS;
        if within {
            match self.map_home(p, 1, other) {
                Ok(()) => {
                    st.working.set(p, other);
                    st.boundaries = st.boundaries.saturating_add_signed(delta);
                    st.remapped += 1;
                    self.release(p);
                    return st;
                }
                Err(e) => {
                    tracing::warn!("block-state: page {p:#x} stays mapped where it is: {e}");
                    // A fresh mapping that could not be registered would let writes through
                    // unseen: map the old home back (its bytes are the image).
                    if let Err(e) = self.map_home(p, 1, home) {
                        st.fail(format!("cannot map page {p:#x} back: {e}"));
                        self.release(p);
                        return st;
                    }
                }
            }
        }
        // The image moves instead (its copy is in the other home already): sinks reading the
        // last checkpoint must be done with it first.
        while st.in_flight {
            st = shared.settled.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.image.set(p, other);
        st.moved += 1;
        self.release(p);
        st
    }

    /// Handles the faults waiting to be read.
    fn handle_pending<'a>(
        &self,
        shared: &'a Shared,
        mut st: MutexGuard<'a, State>,
    ) -> MutexGuard<'a, State> {
        let faults = match self.uffd.read_faults(0) {
            Ok(f) => f,
            Err(e) => {
                st.fail(format!("userfaultfd read failed: {e}"));
                return st;
            }
        };
        for addr in faults {
            let page_addr = addr & !(PAGE_SIZE - 1);
            if page_addr < self.base || page_addr >= self.base + self.len {
                continue;
            }
            st = self.first_write(shared, st, (page_addr - self.base) / PAGE_SIZE);
        }
        st
    }

    /// Moves every page mapped from home B back to home A (copying it there) and frees home B.
    /// No page may be written meanwhile: the VM is frozen or all memory is write-protected.
    /// Leaves all memory write-protected.
    fn compact(&self, st: &mut State) -> std::io::Result<()> {
        let mut in_b = DirtySet::new(st.pages);
        in_b.union_words(&st.working.0);
        for (first, count) in in_b.runs(u64::MAX) {
            // SAFETY: the runs are inside guest memory and nothing writes it (see above).
            let bytes = unsafe { guest_bytes(self.page_addr(first), count * PAGE_SIZE) };
            self.homes[0].write_all_at(bytes, first * PAGE_SIZE)?;
        }
        self.map_home(0, st.pages, false)?;
        self.uffd.protect_all()?;
        st.working = Bits::new(st.pages);
        st.image = Bits::new(st.pages);
        st.boundaries = 0;
        st.compactions += 1;
        punch_all(&self.homes[1], self.len);
        Ok(())
    }
}

/// Frees every page of `file` (its size stays).
fn punch_all(file: &File, len: u64) {
    // SAFETY: a plain syscall on a descriptor we own; the result is checked.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            len as libc::off_t,
        )
    };
    if r < 0 {
        tracing::warn!(
            "block-state: cannot free home B: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A read-only view of one home, for sinks.
struct View {
    addr: usize,
    len: usize,
}

impl View {
    fn map(file: &File, len: u64) -> std::io::Result<Self> {
        // SAFETY: a new read-only shared mapping of `len` bytes of `file` at an address the
        // kernel picks; nothing else refers to it. The result is checked.
        let r = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            addr: r as usize,
            len: len as usize,
        })
    }

    fn page(&self, p: u64) -> Option<&[u8]> {
        let start = usize::try_from(p.checked_mul(PAGE_SIZE)?).ok()?;
        if start.checked_add(PAGE_SIZE as usize)? > self.len {
            return None;
        }
        // SAFETY: inside the view, which lives as long as `self`. Sinks read a page only from
        // its image's home, which nothing writes until the engine settles the checkpoint (guest
        // writes go to the other home; an image moves only once sinks are done).
        Some(unsafe {
            std::slice::from_raw_parts((self.addr + start) as *const u8, PAGE_SIZE as usize)
        })
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` made; no borrow of it outlives `self`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

struct Running {
    ctx: Arc<Ctx>,
    shared: Arc<Shared>,
    views: [View; 2],
    /// An eventfd that tells the handler to stop.
    stop: Arc<File>,
    handler: Option<JoinHandle<()>>,
}

/// Block-state memory.
pub struct BlockState {
    pages: u64,
    running: Option<Running>,
}

/// What the strategy has done so far (for tests and benchmarks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStateStats {
    /// Runs of pages mapped from one home (the kernel's mappings of guest memory).
    pub runs: u64,
    /// First writes that moved the page's mapping.
    pub remapped: u64,
    /// First writes that moved the page's image instead (past [`HARD_RUNS`]).
    pub moved: u64,
    /// Times every page was moved back to home A (past [`SOFT_RUNS`]).
    pub compactions: u64,
    /// Bytes home B holds.
    pub home_b_bytes: u64,
}

fn memfd(name: &std::ffi::CStr, len: u64) -> std::io::Result<File> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len)?;
    Ok(f)
}

fn eventfd() -> std::io::Result<File> {
    // SAFETY: a plain syscall with flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn handle_faults(ctx: Arc<Ctx>, shared: Arc<Shared>, stop: Arc<File>) {
    loop {
        match ctx.uffd.wait(&*stop) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                lock(&shared).fail(format!("userfaultfd poll failed: {e}"));
                return;
            }
        }
        // Faults are read only with the state locked, so a checkpoint (which also handles
        // what is waiting) never sees a fault's page half moved.
        let st = lock(&shared);
        drop(ctx.handle_pending(&shared, st));
    }
}

impl BlockState {
    /// For `mem_size` bytes of memory.
    pub fn new(mem_size: u64) -> Self {
        Self {
            pages: mem_size / PAGE_SIZE,
            running: None,
        }
    }

    fn running(&self) -> Result<&Running, Error> {
        self.running
            .as_ref()
            .ok_or_else(|| Error::Strategy("block-state strategy not started".into()))
    }

    /// Counters.
    pub fn stats(&self) -> BlockStateStats {
        let Some(r) = &self.running else {
            return BlockStateStats::default();
        };
        let st = lock(&r.shared);
        let home_b_bytes = r.ctx.homes[1]
            .metadata()
            .map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
        BlockStateStats {
            runs: st.boundaries + 1,
            remapped: st.remapped,
            moved: st.moved,
            compactions: st.compactions,
            home_b_bytes,
        }
    }
}

impl Strategy for BlockState {
    fn kind(&self) -> StrategyKind {
        StrategyKind::BlockState
    }

    fn start(&mut self, frozen: &Frozen<'_>, _epoch: u64) -> Result<(), Error> {
        // Guest memory is remapped between two homes while this runs: pages given back
        // would be freed in the wrong one.
        frozen.vm().hold_memory_returns(true);
        self.give_up();
        let (base, len) = frozen.vm().host_memory_range();
        if len != self.pages * PAGE_SIZE || base == 0 {
            return Err(Error::Strategy(format!(
                "guest memory is {len} bytes; the strategy was built for {}",
                self.pages * PAGE_SIZE
            )));
        }
        let a = frozen
            .vm()
            .memory_file()
            .ok_or_else(|| {
                Error::Strategy(
                    "block_state needs guest memory mapped shared from its memfd; this VM maps a snapshot copy-on-write (use pre_image or double_buffered)".into(),
                )
            })?
            .try_clone()
            .map_err(|e| Error::Strategy(format!("cannot duplicate the memory file: {e}")))?;
        let b = memfd(c"rebound-guest-memory-home-b", len)
            .map_err(|e| Error::Strategy(format!("cannot create home B ({len} bytes): {e}")))?;
        let uffd = Uffd::register(base, len).map_err(|e| {
            Error::Strategy(format!("userfaultfd write-protect is unavailable: {e}"))
        })?;
        uffd.protect_all()
            .map_err(|e| Error::Strategy(format!("cannot write-protect guest memory: {e}")))?;
        let view = |f: &File| {
            View::map(f, len)
                .map_err(|e| Error::Strategy(format!("cannot map a home for sinks: {e}")))
        };
        let views = [view(&a)?, view(&b)?];
        let ctx = Arc::new(Ctx {
            uffd,
            base,
            len,
            homes: [a, b],
        });
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(self.pages)),
            settled: Condvar::new(),
        });
        let stop = Arc::new(
            eventfd().map_err(|e| Error::Strategy(format!("cannot create an eventfd: {e}")))?,
        );
        let handler = {
            let (c, s, st) = (ctx.clone(), shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("rebound-blockstate".into())
                .spawn(move || handle_faults(c, s, st))
                .map_err(|e| Error::Strategy(format!("cannot start the fault handler: {e}")))?
        };
        self.running = Some(Running {
            ctx,
            shared,
            views,
            stop,
            handler: Some(handler),
        });
        Ok(())
    }

    fn dirty(&mut self, _frozen: &Frozen<'_>) -> Result<DirtySet, Error> {
        let r = self.running()?;
        let mut st = lock(&r.shared);
        // The engine settled the last checkpoint before this freeze: nobody reads images.
        st.in_flight = false;
        r.shared.settled.notify_all();
        // Every writer is parked, so its fault was handled; what waits is a second fault on a
        // page already moved, or a write by a thread that does not park.
        let st = r.ctx.handle_pending(&r.shared, st);
        if let Some(e) = &st.error {
            return Err(Error::Lost(e.clone()));
        }
        Ok(st.written())
    }

    fn capture(&mut self, _frozen: &Frozen<'_>, dirty: &DirtySet) -> Result<(), Error> {
        let r = self.running()?;
        let mut st = lock(&r.shared);
        // The checkpoint: every working copy is its page's image now. No copy.
        let State { working, image, .. } = &mut *st;
        image.0.copy_from_slice(&working.0);
        if let Err(e) = r.ctx.protect(dirty) {
            // Their next writes would go unseen: protection ends at the next checkpoint.
            st.fail(format!("cannot write-protect written pages: {e}"));
        }
        if st.boundaries > SOFT_RUNS
            && let Err(e) = r.ctx.compact(&mut st)
        {
            st.fail(format!("cannot move pages back to home A: {e}"));
        }
        st.in_flight = true;
        Ok(())
    }

    fn async_source(&self) -> Option<&dyn PageSource> {
        Some(self)
    }

    fn settle(&mut self) {
        if let Some(r) = &self.running {
            lock(&r.shared).in_flight = false;
            r.shared.settled.notify_all();
        }
    }

    fn give_up(&mut self) {
        let Some(mut r) = self.running.take() else {
            return;
        };
        if let Err(e) = (&*r.stop).write_all(&1u64.to_ne_bytes()) {
            tracing::error!("block-state: cannot stop the fault handler: {e}");
        }
        lock(&r.shared).in_flight = false;
        r.shared.settled.notify_all();
        if let Some(h) = r.handler.take() {
            let _ = h.join();
        }
        // Memory goes back to the VM's memfd: writers wait (write-protected, nobody reads their
        // faults) while pages in home B are copied home and mapped from there; dropping the
        // userfaultfd then lets them go on, into home A.
        let mut st = lock(&r.shared);
        if st.working.any() {
            let moved = r
                .ctx
                .uffd
                .protect_all()
                .and_then(|()| r.ctx.compact(&mut st));
            if let Err(e) = moved {
                tracing::error!(
                    "block-state: guest memory stays partly in home B (snapshots may miss pages written there): {e}"
                );
            }
        }
        // Dropping `r` unregisters guest memory and releases any blocked writer.
    }

    fn memory_bytes(&self) -> u64 {
        self.stats().home_b_bytes
    }

    fn rollback(&mut self, _frozen: &Frozen<'_>, _dirty: &DirtySet) -> Result<(), Error> {
        let r = self.running()?;
        let mut st = lock(&r.shared);
        st.in_flight = false;
        r.shared.settled.notify_all();
        let mut st = r.ctx.handle_pending(&r.shared, st);
        if let Some(e) = &st.error {
            return Err(Error::Lost(e.clone()));
        }
        // Every written page is mapped from its image's home again: no copy. Runs split where
        // the image's home changes.
        let written = st.written();
        for (first, count) in written.runs(u64::MAX) {
            let mut at = first;
            while at < first + count {
                let home = st.image.get(at);
                let mut end = at + 1;
                while end < first + count && st.image.get(end) == home {
                    end += 1;
                }
                r.ctx
                    .map_home(at, end - at, home)
                    .map_err(|e| Error::Strategy(format!("cannot map pages back: {e}")))?;
                for p in at..end {
                    st.working.set(p, home);
                }
                at = end;
            }
        }
        st.boundaries = st.count_boundaries();
        r.ctx
            .protect(&written)
            .map_err(|e| Error::Lost(format!("cannot write-protect guest memory: {e}")))?;
        if st.boundaries > SOFT_RUNS {
            r.ctx
                .compact(&mut st)
                .map_err(|e| Error::Lost(format!("cannot move pages back to home A: {e}")))?;
        }
        Ok(())
    }
}

/// The last checkpoint's memory: each page from its image's home.
impl PageSource for BlockState {
    fn page(&self, p: u64) -> Option<&[u8]> {
        let r = self.running.as_ref()?;
        let home = lock(&r.shared).image.get(p);
        r.views[usize::from(home)].page(p)
    }
}

impl Drop for BlockState {
    fn drop(&mut self) {
        self.give_up();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_follow_flips_and_written_pages_are_where_homes_differ() {
        let mut st = State::new(130);
        for p in [0, 5, 6, 64, 129, 7, 6] {
            let delta = st.flip_delta(p);
            let home = st.working.get(p);
            st.working.set(p, !home);
            st.boundaries = st.boundaries.saturating_add_signed(delta);
            assert_eq!(st.boundaries, st.count_boundaries(), "after flipping {p}");
        }
        // Pages 0, 5, 7, 64 and 129 are mapped from home B (6 went there and back).
        assert_eq!(
            st.written().iter().collect::<Vec<_>>(),
            vec![0, 5, 7, 64, 129]
        );
        // A checkpoint makes the working homes the images': nothing is written any more.
        let State { working, image, .. } = &mut st;
        image.0.copy_from_slice(&working.0);
        assert_eq!(st.written().count(), 0);
    }
}
