//! Swap: guest pages the host moved out of RAM into a file, brought back on first touch.
//!
//! A page moved out is written to the swap file at its own offset (the file is sparse, as large
//! as guest memory) and then removed from guest memory (`MADV_REMOVE`: the memfd's page is
//! freed, so host memory really falls). Its range is registered with the VM's userfaultfd in
//! missing mode, so the next touch, by the guest through KVM or by any VMM thread, waits until
//! the fault thread has copied the page back (`UFFDIO_COPY`).
//!
//! The files are the truth, so a successor process (recovery after `kill -9`, live update) can
//! take the swap over: a page is swapped out exactly when the memory file has a hole there and
//! the swap file has data; a page brought back has its swap copy punched after it is mapped
//! again, and a page the guest returned has both punched.
//!
//! The VM has one userfaultfd for everything: a checkpoint strategy that write-protects memory
//! (pre-image) gets its write faults through a [`WriteWatch`] instead of a userfaultfd of its
//! own (a range can belong to one userfaultfd only). Missing-mode ranges are never unregistered
//! while the VM lives: a page swapped there could otherwise be touched and read as zero.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use rebound_snapshot::DirtySet;

use crate::userfault::{Fault, Uffd};

const PAGE: u64 = 4096;

/// Where a VM's swap file lives.
#[derive(Clone, Debug)]
pub struct SwapHome {
    /// The directory swap files are created in (a disk, not tmpfs: the point is to leave RAM).
    pub dir: PathBuf,
    /// For a VM in a state directory: a symbolic link naming its swap file, so the process that
    /// takes the VM over finds it. None: the file is unlinked at once (it dies with the VMM).
    pub link: Option<PathBuf>,
}

/// The default directory for swap files.
pub const DEFAULT_DIR: &str = "/var/tmp";

/// The directory swap files are created in: `REBOUND_SWAP_DIR`, else [`DEFAULT_DIR`].
pub fn default_dir() -> PathBuf {
    std::env::var_os("REBOUND_SWAP_DIR").map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from)
}

/// Counters of the swap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SwapStats {
    /// Pages out of RAM now.
    pub swapped_pages: u64,
    /// Pages the host moved out since the VM started in this process.
    pub paged_out: u64,
    /// Pages brought back on touch.
    pub paged_in: u64,
    /// Pages found all zero when moving out (freed without writing).
    pub zero_pages: u64,
}

struct State {
    swapped: DirtySet,
    /// Page runs registered in missing mode (merged, sorted).
    missing: Vec<(u64, u64)>,
    /// Whether a write watch is on (the whole range registered in write-protect mode).
    wp: bool,
    /// Pages the watch let go (writable until protected again): brought back, they stay
    /// writable, or the watch would see a second first write.
    released: DirtySet,
    file: Option<File>,
}

/// What the VM does when a page cannot be brought back (its contents are lost).
pub(crate) type FailHook = Box<dyn Fn(String) + Send + Sync>;

/// The VM's userfaultfd, its fault thread and its swap file.
pub(crate) struct Swap {
    /// Opened on first use (a page moved out, a watch, a predecessor's pages): a VM that needs
    /// neither never depends on userfaultfd being allowed.
    uffd: OnceLock<Uffd>,
    base: u64,
    pages: u64,
    home: SwapHome,
    state: Mutex<State>,
    watch: Mutex<Option<Sender<u64>>>,
    /// The fault thread holds faults it read but has not handled or passed on.
    busy: AtomicBool,
    /// Write faults passed to the watch and not yet handled by it.
    queued: AtomicU64,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    fail: Mutex<Option<FailHook>>,
    paged_out: AtomicU64,
    paged_in: AtomicU64,
    zero_pages: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most separate missing-mode runs (each splits the mapping; a guest cannot make many).
const MAX_RUNS: usize = 64;

fn io_err(what: impl std::fmt::Display) -> io::Error {
    io::Error::other(what.to_string())
}

/// Merges `(first, count)` into sorted, non-overlapping `runs`.
fn merge_run(runs: &mut Vec<(u64, u64)>, first: u64, count: u64) {
    runs.push((first, count));
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for &(f, c) in runs.iter() {
        match out.last_mut() {
            Some(last) if f <= last.0 + last.1 => {
                let end = (last.0 + last.1).max(f + c);
                last.1 = end - last.0;
            }
            _ => out.push((f, c)),
        }
    }
    *runs = out;
}

/// The pages of `[0, pages)` not covered by `runs` (sorted, merged).
fn gaps(runs: &[(u64, u64)], pages: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(f, c) in runs {
        if f > at {
            out.push((at, f - at));
        }
        at = at.max(f + c);
    }
    if at < pages {
        out.push((at, pages - at));
    }
    out
}

/// The parts of `[start, start + len)` (bytes) where `file` has holes.
fn holes(file: &File, start: u64, len: u64) -> Vec<(u64, u64)> {
    let data: Vec<(u64, u64)> = crate::memory::file_data_ranges(file, start, len)
        .into_iter()
        .map(|(o, l)| (start + o, l))
        .collect();
    let mut out = Vec::new();
    let mut at = start;
    for (d, l) in data {
        if d > at {
            out.push((at, d - at));
        }
        at = at.max(d + l);
    }
    if at < start + len {
        out.push((at, start + len - at));
    }
    out
}

impl Swap {
    /// For guest memory at host address `base`, `pages` long. With `take_over` (a VM taken
    /// over from its state directory), pages the swap file named by `home.link` holds where
    /// `memory` has holes are swapped out: they are registered before this returns, so nothing
    /// can touch them unseen. Otherwise a link left there is stale: it and its file go.
    pub(crate) fn new(
        base: u64,
        pages: u64,
        home: SwapHome,
        memory: Option<&File>,
        take_over: bool,
    ) -> io::Result<Arc<Self>> {
        let swap = Arc::new(Self {
            uffd: OnceLock::new(),
            base,
            pages,
            home,
            state: Mutex::new(State {
                swapped: DirtySet::new(pages),
                missing: Vec::new(),
                wp: false,
                released: DirtySet::new(pages),
                file: None,
            }),
            watch: Mutex::new(None),
            busy: AtomicBool::new(false),
            queued: AtomicU64::new(0),
            stop: Arc::new(AtomicBool::new(false)),
            thread: Mutex::new(None),
            fail: Mutex::new(None),
            paged_out: AtomicU64::new(0),
            paged_in: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
        });
        if let Some(link) = swap.home.link.clone()
            && std::fs::symlink_metadata(&link).is_ok()
        {
            match (take_over, memory) {
                (true, Some(memory)) => swap.take_over(&link, memory)?,
                _ => {
                    if let Ok(target) = std::fs::read_link(&link) {
                        let _ = std::fs::remove_file(target);
                    }
                    let _ = std::fs::remove_file(&link);
                }
            }
        }
        Ok(swap)
    }

    /// What to do when a page cannot be brought back.
    pub(crate) fn set_fail_hook(&self, hook: FailHook) {
        *lock(&self.fail) = Some(hook);
    }

    fn failed(&self, why: String) {
        tracing::error!("swap: {why}");
        if let Some(h) = lock(&self.fail).as_ref() {
            h(why);
        }
    }

    fn uffd(&self) -> io::Result<&Uffd> {
        if let Some(u) = self.uffd.get() {
            return Ok(u);
        }
        let u = Uffd::open(self.base, self.pages * PAGE)?;
        let _ = self.uffd.set(u);
        self.uffd
            .get()
            .ok_or_else(|| io_err("userfaultfd not opened"))
    }

    /// Finds the pages a predecessor swapped out and registers them; swap data under pages
    /// the memory file holds is stale (a crash between steps) and is punched.
    fn take_over(self: &Arc<Self>, link: &Path, memory: &File) -> io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(link)
            .map_err(|e| io_err(format!("cannot open the swap file {}: {e}", link.display())))?;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut swapped = DirtySet::new(self.pages);
        let size = self.pages * PAGE;
        for (start, len) in crate::memory::file_data_ranges(&file, 0, size) {
            let len = len.min(size.saturating_sub(start));
            let hs = holes(memory, start, len);
            let mut at = start;
            for &(h, l) in &hs {
                if h > at {
                    punch(&file, at, h - at)?;
                }
                let (first, end) = (h / PAGE, (h + l).div_ceil(PAGE));
                for p in first..end {
                    swapped.insert(p);
                }
                // Pages arrive in order: extend the last run or start one.
                match runs.last_mut() {
                    Some(last) if last.0 + last.1 >= first => {
                        last.1 = end.max(last.0 + last.1) - last.0
                    }
                    _ => runs.push((first, end - first)),
                }
                at = h + l;
            }
            if at < start + len {
                punch(&file, at, start + len - at)?;
            }
        }
        let n = swapped.count();
        if runs.len() > MAX_RUNS {
            let (first, last) = (runs[0].0, runs[runs.len() - 1]);
            runs = vec![(first, last.0 + last.1 - first)];
        }
        {
            let mut st = lock(&self.state);
            st.swapped = swapped;
            st.file = Some(file);
            if n > 0 {
                let uffd = self.uffd()?;
                for &(f, c) in &runs {
                    uffd.register_missing(self.base + f * PAGE, c * PAGE, false)?;
                    merge_run(&mut st.missing, f, c);
                }
            }
        }
        if n > 0 {
            self.start_thread()?;
            tracing::info!(pages = n, "swap: pages out of RAM taken over");
        }
        Ok(())
    }

    fn start_thread(self: &Arc<Self>) -> io::Result<()> {
        let mut t = lock(&self.thread);
        if t.is_none() {
            let me = Arc::downgrade(self);
            let stop = self.stop.clone();
            *t = Some(
                std::thread::Builder::new()
                    .name("rebound-faults".into())
                    .spawn(move || {
                        while !stop.load(Ordering::Acquire) {
                            let Some(s) = me.upgrade() else { return };
                            if let Err(e) = s.serve(50) {
                                tracing::error!("userfaultfd: {e}");
                                return;
                            }
                        }
                    })?,
            );
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` for faults and handles them.
    fn serve(&self, timeout_ms: i32) -> io::Result<()> {
        let uffd = self.uffd()?;
        if !uffd.wait_readable(timeout_ms)? {
            return Ok(());
        }
        // Busy before the read: a fault taken off the descriptor is never invisible to
        // `WriteWatch::pending`.
        self.busy.store(true, Ordering::Release);
        for f in uffd.read_ready() {
            match f {
                Fault::Missing(addr) => self.page_in(uffd, addr),
                Fault::Write(addr) => {
                    let page = addr & !(PAGE - 1);
                    let sent = lock(&self.watch).as_ref().is_some_and(|w| {
                        self.queued.fetch_add(1, Ordering::AcqRel);
                        let ok = w.send(page).is_ok();
                        if !ok {
                            self.queued.fetch_sub(1, Ordering::AcqRel);
                        }
                        ok
                    });
                    if !sent {
                        // Nobody watches any more: let the writer go on.
                        let _ = uffd.protect(page, PAGE, false);
                    }
                }
            }
        }
        self.busy.store(false, Ordering::Release);
        Ok(())
    }

    /// Brings the page at host address `addr` back. All under the state lock, so a page-out,
    /// a return or a watch starting or ending never sees it half done (the copy's source is
    /// this thread's buffer: it cannot fault).
    fn page_in(&self, uffd: &Uffd, addr: u64) {
        let host = addr & !(PAGE - 1);
        let Some(p) = host
            .checked_sub(self.base)
            .map(|o| o / PAGE)
            .filter(|&p| p < self.pages)
        else {
            let _ = uffd.wake(host, PAGE);
            return;
        };
        let mut buf = vec![0u8; PAGE as usize];
        let mut st = lock(&self.state);
        let had = st.swapped.contains(p);
        if had {
            let read = match &st.file {
                Some(f) => f.read_exact_at(&mut buf, p * PAGE),
                None => Err(io_err("no swap file")),
            };
            if let Err(e) = read {
                drop(st);
                // Mapping zeros would hand the guest wrong data: the VM ends instead.
                self.failed(format!("cannot read guest page {p:#x} back: {e}"));
                let _ = uffd.wake(host, PAGE);
                return;
            }
        }
        // A page never swapped (returned, or never touched) in a missing-mode range is zero.
        let wp = st.wp && !st.released.contains(p);
        if let Err(e) = uffd.copy(host, &buf, wp) {
            tracing::error!(page = p, "swap: cannot map a page back: {e}");
            // The toucher faults again and is served again.
            let _ = uffd.wake(host, PAGE);
            return;
        }
        if had {
            st.swapped.remove(p);
            if let Some(f) = &st.file {
                let _ = punch(f, p * PAGE, PAGE);
            }
            self.paged_in.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Opens (creating it if needed) the swap file.
    fn file<'a>(&self, st: &'a mut State) -> io::Result<&'a File> {
        if st.file.is_none() {
            std::fs::create_dir_all(&self.home.dir)?;
            let name = format!(
                "rebound-swap-{}-{:x}",
                std::process::id(),
                self.base ^ rand_word()
            );
            let path = self.home.dir.join(name);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| io_err(format!("cannot create {}: {e}", path.display())))?;
            f.set_len(self.pages * PAGE)?;
            match &self.home.link {
                Some(link) => {
                    let _ = std::fs::remove_file(link);
                    std::os::unix::fs::symlink(&path, link)
                        .map_err(|e| io_err(format!("cannot link {}: {e}", link.display())))?;
                }
                None => std::fs::remove_file(&path)?,
            }
            st.file = Some(f);
        }
        st.file.as_ref().ok_or_else(|| io_err("no swap file"))
    }

    /// Registers page run `(first, count)` in missing mode (if not yet).
    fn cover(self: &Arc<Self>, st: &mut State, first: u64, count: u64) -> io::Result<()> {
        let covered = st
            .missing
            .iter()
            .any(|&(f, c)| f <= first && first + count <= f + c);
        if covered {
            return Ok(());
        }
        let mut runs = st.missing.clone();
        merge_run(&mut runs, first, count);
        if runs.len() > MAX_RUNS {
            return Err(io_err("too many separate swap ranges"));
        }
        self.uffd()?
            .register_missing(self.base + first * PAGE, count * PAGE, st.wp)?;
        st.missing = runs;
        self.start_thread()
    }

    /// Moves the resident pages of `runs` (guest page runs) out of RAM, at most `limit` of
    /// them. The caller holds the VM frozen: nothing writes guest memory meanwhile. `resident`
    /// says which pages hold data in the memory file, `memory` is that file.
    pub(crate) fn page_out(
        self: &Arc<Self>,
        mem: &crate::memory::GuestMemory,
        memory: &File,
        runs: &[(u64, u64)],
        resident: &DirtySet,
        limit: u64,
    ) -> io::Result<u64> {
        use vmm_sys_util::seek_hole::SeekHole;
        let mut moved = 0;
        let mut buf = vec![0u8; PAGE as usize];
        let mut probe = memory.try_clone()?;
        for &(first, count) in runs {
            if moved >= limit {
                break;
            }
            {
                let mut st = lock(&self.state);
                self.cover(&mut st, first, count)?;
                self.file(&mut st)?;
            }
            for p in first..first + count {
                if moved >= limit {
                    break;
                }
                if !resident.contains(p) {
                    continue;
                }
                // Resident: reading it cannot fault.
                vm_memory::Bytes::read_slice(mem, &mut buf, vm_memory::GuestAddress(p * PAGE))
                    .map_err(io_err)?;
                let zero = buf.iter().all(|b| *b == 0);
                {
                    let mut st = lock(&self.state);
                    let f = self.file(&mut st)?;
                    if zero {
                        // No copy needed; an old one (a crash between steps) must not return.
                        punch(f, p * PAGE, PAGE)?;
                    } else {
                        f.write_all_at(&buf, p * PAGE)?;
                        st.swapped.insert(p);
                    }
                }
                remove(self.base + p * PAGE, PAGE)?;
                // Part of a huge page the kernel could not split is zeroed, not freed: the
                // page is still there and no fault would bring it back. Put it back as it was.
                if matches!(probe.seek_data(p * PAGE), Ok(Some(d)) if d == p * PAGE) {
                    vm_memory::Bytes::write_slice(mem, &buf, vm_memory::GuestAddress(p * PAGE))
                        .map_err(io_err)?;
                    let mut st = lock(&self.state);
                    st.swapped.remove(p);
                    if let Some(f) = &st.file {
                        punch(f, p * PAGE, PAGE)?;
                    }
                    continue;
                }
                if zero {
                    self.zero_pages.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.paged_out.fetch_add(1, Ordering::Relaxed);
                }
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Pages the guest is giving back: their swap copies go first (they read as zero), so
    /// neither a crash nor a page-in in flight can bring old contents back.
    pub(crate) fn returned(&self, first: u64, count: u64) {
        let mut st = lock(&self.state);
        for p in first..(first + count).min(self.pages) {
            st.swapped.remove(p);
        }
        if let Some(f) = &st.file {
            let _ = punch(f, first * PAGE, count * PAGE);
        }
    }

    /// Pages out of RAM now.
    pub(crate) fn swapped(&self) -> DirtySet {
        lock(&self.state).swapped.clone()
    }

    /// Counters.
    pub(crate) fn stats(&self) -> SwapStats {
        SwapStats {
            swapped_pages: lock(&self.state).swapped.count(),
            paged_out: self.paged_out.load(Ordering::Relaxed),
            paged_in: self.paged_in.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
        }
    }

    /// Whether a write watch is on.
    pub(crate) fn watching(&self) -> bool {
        lock(&self.state).wp
    }

    /// Starts watching writes to guest memory (write-protect mode over all of it). One watch at
    /// a time.
    pub(crate) fn watch(self: &Arc<Self>) -> io::Result<WriteWatch> {
        let (tx, rx) = channel();
        {
            let mut st = lock(&self.state);
            if st.wp {
                return Err(io_err("guest memory is already write-watched"));
            }
            let uffd = self.uffd()?;
            // Missing-mode runs get write-protect mode added; the rest is registered for it.
            for (f, c) in gaps(&st.missing, self.pages) {
                uffd.register_range(self.base + f * PAGE, c * PAGE)?;
            }
            for &(f, c) in &st.missing {
                uffd.register_missing(self.base + f * PAGE, c * PAGE, true)?;
            }
            st.wp = true;
            st.released = DirtySet::full(self.pages);
            self.queued.store(0, Ordering::Release);
            *lock(&self.watch) = Some(tx);
        }
        self.start_thread()?;
        Ok(WriteWatch {
            swap: self.clone(),
            rx: Mutex::new(rx),
        })
    }

    fn unwatch(&self) {
        let mut st = lock(&self.state);
        *lock(&self.watch) = None;
        // What was passed on and not handled is dropped with the channel.
        self.queued.store(0, Ordering::Release);
        if !st.wp {
            return;
        }
        st.wp = false;
        let Some(uffd) = self.uffd.get() else { return };
        // Lifting protection releases blocked writers; missing mode stays where it was.
        let _ = uffd.protect(self.base, self.pages * PAGE, false);
        for (f, c) in gaps(&st.missing, self.pages) {
            let _ = uffd.unregister(self.base + f * PAGE, c * PAGE);
        }
        for &(f, c) in &st.missing {
            let _ = uffd.register_missing(self.base + f * PAGE, c * PAGE, false);
        }
    }

    /// Records pages the watch protects (`on`) or lets go, for pages brought back later.
    fn note_protection(&self, start: u64, len: u64, on: bool) {
        let mut st = lock(&self.state);
        let first = start.saturating_sub(self.base) / PAGE;
        let end = (start.saturating_sub(self.base) + len)
            .div_ceil(PAGE)
            .min(self.pages);
        for p in first..end {
            if on {
                st.released.remove(p);
            } else {
                st.released.insert(p);
            }
        }
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // A named swap file holding no page is removed with its link; one still holding pages
        // stays for whoever takes the VM over (a process killed or replaced never gets here).
        let st = lock(&self.state);
        if st.swapped.is_empty()
            && let Some(link) = &self.home.link
            && let Ok(target) = std::fs::read_link(link)
        {
            let _ = std::fs::remove_file(&target);
            let _ = std::fs::remove_file(link);
        }
    }
}

/// Write faults on guest memory, for a checkpoint strategy that write-protects it.
pub struct WriteWatch {
    swap: Arc<Swap>,
    rx: Mutex<Receiver<u64>>,
}

impl WriteWatch {
    fn uffd(&self) -> io::Result<&Uffd> {
        self.swap
            .uffd
            .get()
            .ok_or_else(|| io_err("userfaultfd not opened"))
    }

    /// Write-protects (`true`) or releases (`false`, letting a blocked writer go on) the host
    /// range `[start, start + len)`.
    pub fn protect(&self, start: u64, len: u64, on: bool) -> io::Result<()> {
        self.swap.note_protection(start, len, on);
        self.uffd()?.protect(start, len, on)
    }

    /// Write-protects all of guest memory.
    pub fn protect_all(&self) -> io::Result<()> {
        lock(&self.swap.state).released.clear();
        self.uffd()?
            .protect(self.swap.base, self.swap.pages * PAGE, true)
    }

    /// Waits up to `timeout_ms` for write faults and has `handle` deal with them (page
    /// addresses, host); they count as [`pending`](Self::pending) until it returns.
    pub fn serve(&self, timeout_ms: u64, handle: impl FnOnce(&[u64])) {
        let mut batch = Vec::new();
        {
            let rx = lock(&self.rx);
            if let Ok(a) = rx.recv_timeout(std::time::Duration::from_millis(timeout_ms)) {
                batch.push(a);
                batch.extend(rx.try_iter());
            }
        }
        if batch.is_empty() {
            return;
        }
        handle(&batch);
        let n = batch.len() as u64;
        let _ = self
            .swap
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(n))
            });
    }

    /// Whether a write fault may be waiting: not read yet, read and not passed on, or passed
    /// on and not handled (checked in that order, the order a fault moves in).
    pub fn pending(&self) -> bool {
        self.swap.uffd.get().is_some_and(Uffd::pending)
            || self.swap.busy.load(Ordering::Acquire)
            || self.swap.queued.load(Ordering::Acquire) > 0
    }
}

impl Drop for WriteWatch {
    fn drop(&mut self) {
        self.swap.unwatch();
    }
}

/// Frees the file pages behind host range `[addr, addr + len)` of a shared mapping.
pub(crate) fn remove(addr: u64, len: u64) -> io::Result<()> {
    // SAFETY: the caller passes a page-aligned range of guest memory, a shared file mapping
    // the VM owns for its life; MADV_REMOVE frees the file's pages there (they read as zero,
    // or fault into the userfaultfd in missing mode). No Rust reference covers guest memory.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_REMOVE) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Drops the private pages of host range `[addr, addr + len)` of a copy-on-write mapping (they
/// read as the file underneath again).
pub(crate) fn discard(addr: u64, len: u64) -> io::Result<()> {
    // SAFETY: as for `remove`, on a private mapping: MADV_DONTNEED drops this process's copies.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn punch(f: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: a plain syscall on a file we own; the result is checked.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn rand_word() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ u64::from(std::process::id()).rotate_left(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_gaps_complement_them() {
        let mut r = Vec::new();
        merge_run(&mut r, 10, 5);
        merge_run(&mut r, 0, 2);
        merge_run(&mut r, 14, 4);
        merge_run(&mut r, 2, 1);
        assert_eq!(r, vec![(0, 3), (10, 8)]);
        assert_eq!(gaps(&r, 20), vec![(3, 7), (18, 2)]);
        assert_eq!(gaps(&[], 4), vec![(0, 4)]);
        assert_eq!(gaps(&[(0, 4)], 4), vec![]);
    }
}
