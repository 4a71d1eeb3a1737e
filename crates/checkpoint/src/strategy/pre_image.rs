//! Pre-image (undo log): guest memory is write-protected with userfaultfd at each checkpoint;
//! the first write to a page in an epoch (by the guest through KVM, or by the VMM) stops until
//! a handler thread has saved the page's old contents and lifted the protection. A rollback
//! writes the saved pages back: no shadow copy of memory is kept. The pages that faulted are
//! also the epoch's dirty set, so KVM's dirty log is not needed.
//!
//! On this project's PVM hosts a write-protect fault costs 70-145 us (versus 21-25 us for the
//! first write after a dirty-log harvest), so this strategy pays per written page and wins when
//! few pages are written per epoch or memory is large. Pages written in an epoch stay writable
//! for the next ones ([`HotPages`]): their old contents are saved at the checkpoint instead (a
//! copy, no fault), so a guest writing the same pages every epoch faults rarely.
//!
//! **Durable** (with a state directory): each old page is also appended to the undo journal
//! file (and counted there) before the write is allowed, and the journal is reset to a
//! checkpoint only after its record is written; that reset commits it, and the head file then
//! names it too. After a crash, memory minus the journal is the checkpoint the journal names.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rebound_snapshot::{DirtySet, HotPages, PAGE_SIZE};
use rebound_vmm::vm::Frozen;

use super::{Strategy, StrategyKind, write_page};
use crate::state_dir::{StateDir, UndoJournal};
use crate::{CheckpointRef, Error, faults};
use rebound_vmm::swap::WriteWatch;

type UndoLog = HashMap<u64, Box<[u8]>>;

fn lock(m: &Mutex<UndoLog>) -> MutexGuard<'_, UndoLog> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Pre-image undo log.
pub struct PreImage {
    pages: u64,
    state_dir: Option<StateDir>,
    /// The committed checkpoint memory equals when protection starts (a VM just recovered).
    origin: Option<CheckpointRef>,
    running: Option<Running>,
}

/// The journal file shared with the fault handler, and the first error writing it.
#[derive(Default)]
struct Journal {
    file: Option<UndoJournal>,
    dir: Option<StateDir>,
    error: Option<String>,
}

impl Journal {
    /// The journal can no longer undo what the guest does: the state directory is marked
    /// unrecoverable *before* the write that could not be journaled is let through.
    fn fail(&mut self, what: &str, e: impl std::fmt::Display) -> String {
        let reason = format!("the undo journal could not be {what}: {e}");
        tracing::error!("{reason}");
        if let Some(dir) = &self.dir {
            dir.mark_lost(&reason);
        }
        self.error.get_or_insert_with(|| reason.clone());
        self.file = None;
        reason
    }
}

struct Running {
    uffd: Arc<WriteWatch>,
    base: u64,
    undo: Arc<Mutex<UndoLog>>,
    journal: Arc<Mutex<Journal>>,
    /// The committed checkpoint the undo log and journal are relative to.
    committed: Option<CheckpointRef>,
    /// Written pages left writable across checkpoints, their old contents saved ahead.
    hot: HotPages,
    busy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    handler: Option<JoinHandle<()>>,
}

fn lock_journal(m: &Mutex<Journal>) -> MutexGuard<'_, Journal> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PreImage {
    /// For `mem_size` bytes of memory.
    pub fn new(mem_size: u64) -> Self {
        Self {
            pages: mem_size / PAGE_SIZE,
            state_dir: None,
            origin: None,
            running: None,
        }
    }

    /// Also journals old pages to the state directory's undo file, for recovery after a crash.
    /// `origin`: the committed checkpoint memory equals now, if any (a VM recovered a moment
    /// ago); until the first checkpoint is committed, the journal stays based on it.
    pub fn durable(mem_size: u64, dir: StateDir, origin: Option<CheckpointRef>) -> Self {
        Self {
            pages: mem_size / PAGE_SIZE,
            state_dir: Some(dir),
            origin,
            running: None,
        }
    }

    fn running(&self) -> Result<&Running, Error> {
        self.running
            .as_ref()
            .ok_or_else(|| Error::Strategy("pre-image strategy not started".into()))
    }
}

/// Copies a write-protected page.
///
/// # Safety
/// `addr` must be the host address of a page of live guest memory that is write-protected, so
/// nothing writes it during the copy.
unsafe fn copy_protected_page(addr: u64) -> Box<[u8]> {
    // SAFETY: guaranteed by the caller: mapped, 4096 bytes, not written concurrently.
    unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE as usize) }.into()
}

fn handle_faults(
    uffd: Arc<WriteWatch>,
    base: u64,
    len: u64,
    undo: Arc<Mutex<UndoLog>>,
    journal: Arc<Mutex<Journal>>,
    busy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Acquire) {
        uffd.serve(50, |faults| {
            handle_batch(&uffd, base, len, &undo, &journal, &busy, faults)
        });
    }
}

fn handle_batch(
    uffd: &WriteWatch,
    base: u64,
    len: u64,
    undo: &Mutex<UndoLog>,
    journal: &Mutex<Journal>,
    busy: &AtomicBool,
    faults: &[u64],
) {
    {
        busy.store(true, Ordering::Release);
        for &addr in faults {
            let page_addr = addr & !(PAGE_SIZE - 1);
            if page_addr < base || page_addr >= base + len {
                continue;
            }
            let p = (page_addr - base) / PAGE_SIZE;
            let mut log = lock(undo);
            if let std::collections::hash_map::Entry::Vacant(slot) = log.entry(p) {
                // SAFETY: the page is inside guest memory and still write-protected: the writer
                // that faulted waits until the protection is lifted below.
                let old = unsafe { copy_protected_page(page_addr) };
                let mut j = lock_journal(journal);
                if let Some(file) = j.file.as_mut()
                    && let Err(e) = file.append(p, &old)
                {
                    // The guest must not wait forever: the write goes on unjournaled, and the
                    // engine gives protection up at the next checkpoint.
                    j.fail("written", e);
                }
                drop(j);
                faults::point("journal-append");
                slot.insert(old);
            }
            drop(log);
            if let Err(e) = uffd.protect(page_addr, PAGE_SIZE, false) {
                tracing::error!("cannot lift write protection at {page_addr:#x}: {e}");
            }
        }
        busy.store(false, Ordering::Release);
    }
}

impl Running {
    /// Waits until every fault raised so far is handled (the VM is frozen, so no new ones come).
    /// A fault still unhandled after 10 s ends protection rather than the wait.
    fn drain(&self) -> Result<(), Error> {
        let t0 = std::time::Instant::now();
        // The watch counts a fault from the moment it is read until the handler is done with
        // it; the handler's own flag covers its batch.
        while self.uffd.pending() || self.busy.load(Ordering::Acquire) {
            if t0.elapsed() > std::time::Duration::from_secs(10) {
                return Err(Error::Lost(
                    "write faults on guest memory were not handled within 10 s".into(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
        Ok(())
    }

    /// Protects the pages that were written (one ioctl per run), or everything if they are many.
    fn reprotect(&self, pages: &DirtySet) -> Result<(), Error> {
        let runs = pages.runs(u64::MAX);
        let r = if runs.len() > 64 {
            self.uffd.protect_all()
        } else {
            runs.iter().try_for_each(|&(first, count)| {
                self.uffd
                    .protect(self.base + first * PAGE_SIZE, count * PAGE_SIZE, true)
            })
        };
        r.map_err(|e| Error::Strategy(format!("cannot write-protect guest memory: {e}")))
    }
}

impl Strategy for PreImage {
    fn kind(&self) -> StrategyKind {
        StrategyKind::PreImage
    }

    fn start(&mut self, frozen: &Frozen<'_>, _epoch: u64) -> Result<(), Error> {
        let (base, len) = frozen.vm().host_memory_range();
        let journal = Arc::new(Mutex::new(Journal::default()));
        if let Some(dir) = &self.state_dir {
            let path = dir.undo();
            let lost = |e: std::io::Error| {
                Error::Lost(format!(
                    "cannot create the undo journal {}: {e}",
                    path.display()
                ))
            };
            // Protection starting afresh: nothing is committed until its first checkpoint (the
            // head says so too, so no older head can pass for this VM's).
            if self.origin.is_none() {
                dir.write_head(None).map_err(lost)?;
            }
            let j = UndoJournal::create(&path, self.origin).map_err(lost)?;
            let mut g = lock_journal(&journal);
            g.file = Some(j);
            g.dir = Some(dir.clone());
        }
        let uffd = Arc::new(frozen.vm().write_watch().map_err(|e| {
            Error::Strategy(format!("userfaultfd write-protect is unavailable: {e}"))
        })?);
        uffd.protect_all()
            .map_err(|e| Error::Strategy(format!("cannot write-protect guest memory: {e}")))?;
        let undo = Arc::new(Mutex::new(UndoLog::new()));
        let busy = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let handler = {
            let (u, un, j, b, s) = (
                uffd.clone(),
                undo.clone(),
                journal.clone(),
                busy.clone(),
                stop.clone(),
            );
            std::thread::Builder::new()
                .name("rebound-uffd".into())
                .spawn(move || handle_faults(u, base, len, un, j, b, s))
                .map_err(|e| Error::Strategy(format!("cannot start the fault handler: {e}")))?
        };
        self.running = Some(Running {
            uffd,
            base,
            undo,
            journal,
            committed: self.origin,
            hot: HotPages::new(self.pages),
            busy,
            stop,
            handler: Some(handler),
        });
        Ok(())
    }

    fn dirty(&mut self, _frozen: &Frozen<'_>) -> Result<DirtySet, Error> {
        let r = self.running()?;
        r.drain()?;
        if let Some(e) = &lock_journal(&r.journal).error {
            return Err(Error::Lost(e.clone()));
        }
        let mut set = DirtySet::new(self.pages);
        for &p in lock(&r.undo).keys() {
            set.insert(p);
        }
        Ok(set)
    }

    fn capture(&mut self, _frozen: &Frozen<'_>, _dirty: &DirtySet) -> Result<(), Error> {
        // Nothing to copy: memory stays in place. The undo log moves on in `committed`.
        Ok(())
    }

    fn moves_on_commit(&self) -> bool {
        true
    }

    fn give_up(&mut self) {
        if let Some(mut r) = self.running.take() {
            r.stop.store(true, Ordering::Release);
            if let Some(h) = r.handler.take() {
                let _ = h.join();
            }
            // Dropping the userfaultfd unregisters the range and releases any blocked writer.
        }
    }

    fn committed(&mut self, cp: CheckpointRef, dirty: &DirtySet) -> Result<(), Error> {
        let r = self
            .running
            .as_mut()
            .ok_or_else(|| Error::Strategy("pre-image strategy not started".into()))?;
        // The journal is reset only now that the checkpoint's record is written, and that
        // reset commits it: a crash before this point recovers the previous checkpoint with
        // the journal, a crash after it this one. The head follows as a second witness.
        {
            let mut j = lock_journal(&r.journal);
            if let Some(file) = j.file.as_mut()
                && let Err(e) = file.reset(Some(cp))
            {
                return Err(Error::Lost(j.fail("reset", e)));
            }
            drop(j);
            faults::point("after-journal-reset");
            let mut j = lock_journal(&r.journal);
            if let (Some(_), Some(dir)) = (&j.file, &j.dir)
                && let Err(e) = dir.write_head(Some(cp))
            {
                return Err(Error::Lost(j.fail("confirmed in the head file", e)));
            }
        }
        r.committed = Some(cp);
        let mut undo = lock(&r.undo);
        undo.clear();
        // Pages to keep writable get their old contents (memory now: the VM is frozen, nothing
        // writes it) saved and journaled ahead, as a fault would have; the rest are protected.
        let mut protect = DirtySet::new(self.pages);
        for p in dirty.iter() {
            if !r.hot.keep(p) {
                protect.insert(p);
                continue;
            }
            // SAFETY: a page of live guest memory; the VM is frozen, so nothing writes it.
            let old = unsafe { copy_protected_page(r.base + p * PAGE_SIZE) };
            let mut j = lock_journal(&r.journal);
            if let Some(file) = j.file.as_mut()
                && let Err(e) = file.append(p, &old)
            {
                return Err(Error::Lost(j.fail("written", e)));
            }
            drop(j);
            faults::point("journal-append");
            undo.insert(p, old);
        }
        drop(undo);
        // Pages left writable would change unjournaled: that ends protection.
        r.reprotect(&protect).map_err(|e| {
            Error::Lost(lock_journal(&r.journal).fail("kept (write protection failed)", e))
        })
    }

    fn memory_bytes(&self) -> u64 {
        self.running
            .as_ref()
            .map_or(0, |r| lock(&r.undo).len() as u64 * PAGE_SIZE)
    }

    fn rollback(&mut self, frozen: &Frozen<'_>, dirty: &DirtySet) -> Result<(), Error> {
        let r = self.running()?;
        r.drain()?;
        let undo = std::mem::take(&mut *lock(&r.undo));
        for (p, old) in &undo {
            // Pages in the undo log are unprotected, so these writes do not fault.
            write_page(frozen, *p, old)?;
        }
        // Memory is the committed checkpoint again: the journal can start over from it.
        let mut j = lock_journal(&r.journal);
        if let Some(file) = j.file.as_mut()
            && let Err(e) = file.reset(r.committed)
        {
            return Err(Error::Lost(j.fail("reset", e)));
        }
        drop(j);
        // Every page written since the checkpoint, kept writable ones included, is protected
        // again: memory is the checkpoint, and no old contents are saved ahead any more.
        let mut all = dirty.clone();
        for &p in undo.keys() {
            all.insert(p);
        }
        let r = self
            .running
            .as_mut()
            .ok_or_else(|| Error::Strategy("pre-image strategy not started".into()))?;
        r.hot.reset();
        r.reprotect(&all).map_err(|e| {
            Error::Lost(lock_journal(&r.journal).fail("kept (write protection failed)", e))
        })
    }
}

impl Drop for PreImage {
    fn drop(&mut self) {
        self.give_up();
    }
}
