//! Pre-image (undo log): guest memory is write-protected with userfaultfd at each checkpoint;
//! the first write to a page in an epoch (by the guest through KVM, or by the VMM) stops until
//! a handler thread has saved the page's old contents and lifted the protection. A rollback
//! writes the saved pages back: no shadow copy of memory is kept. The pages that faulted are
//! also the epoch's dirty set, so KVM's dirty log is not needed.
//!
//! On this project's PVM hosts a write-protect fault costs 70-145 us (versus 21-25 us for the
//! first write after a dirty-log harvest), so this strategy pays per written page and wins when
//! few pages are written per epoch or memory is large.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rebound_snapshot::{DirtySet, PAGE_SIZE};
use rebound_vmm::vm::Frozen;

use super::{Strategy, StrategyKind, write_page};
use crate::Error;
use crate::uffd::Uffd;

type UndoLog = HashMap<u64, Box<[u8]>>;

fn lock(m: &Mutex<UndoLog>) -> MutexGuard<'_, UndoLog> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Pre-image undo log.
pub struct PreImage {
    pages: u64,
    running: Option<Running>,
}

struct Running {
    uffd: Arc<Uffd>,
    base: u64,
    undo: Arc<Mutex<UndoLog>>,
    busy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    handler: Option<JoinHandle<()>>,
}

impl PreImage {
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
    uffd: Arc<Uffd>,
    base: u64,
    len: u64,
    undo: Arc<Mutex<UndoLog>>,
    busy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Acquire) {
        let faults = match uffd.read_faults(50) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("userfaultfd read failed: {e}");
                return;
            }
        };
        if faults.is_empty() {
            continue;
        }
        busy.store(true, Ordering::Release);
        for addr in faults {
            let page_addr = addr & !(PAGE_SIZE - 1);
            if page_addr < base || page_addr >= base + len {
                continue;
            }
            let p = (page_addr - base) / PAGE_SIZE;
            lock(&undo).entry(p).or_insert_with(|| {
                // SAFETY: the page is inside guest memory and still write-protected: the writer
                // that faulted waits until the protection is lifted just below.
                unsafe { copy_protected_page(page_addr) }
            });
            if let Err(e) = uffd.protect(page_addr, PAGE_SIZE, false) {
                tracing::error!("cannot lift write protection at {page_addr:#x}: {e}");
            }
        }
        busy.store(false, Ordering::Release);
    }
}

impl Running {
    /// Waits until every fault raised so far is handled (the VM is frozen, so no new ones come).
    fn drain(&self) {
        while self.busy.load(Ordering::Acquire) || self.uffd.pending() {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
        // The handler may have taken a message just before `busy` was set: wait for one poll
        // interval's worth of processing to be safe.
        while self.busy.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
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

    fn start(&mut self, frozen: &Frozen<'_>) -> Result<(), Error> {
        let (base, len) = frozen.vm().host_memory_range();
        let uffd = Arc::new(Uffd::register(base, len).map_err(|e| {
            Error::Strategy(format!("userfaultfd write-protect is unavailable: {e}"))
        })?);
        uffd.protect_all()
            .map_err(|e| Error::Strategy(format!("cannot write-protect guest memory: {e}")))?;
        let undo = Arc::new(Mutex::new(UndoLog::new()));
        let busy = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let handler = {
            let (u, un, b, s) = (uffd.clone(), undo.clone(), busy.clone(), stop.clone());
            std::thread::Builder::new()
                .name("rebound-uffd".into())
                .spawn(move || handle_faults(u, base, len, un, b, s))
                .map_err(|e| Error::Strategy(format!("cannot start the fault handler: {e}")))?
        };
        self.running = Some(Running {
            uffd,
            base,
            undo,
            busy,
            stop,
            handler: Some(handler),
        });
        Ok(())
    }

    fn dirty(&mut self, _frozen: &Frozen<'_>) -> Result<DirtySet, Error> {
        let r = self.running()?;
        r.drain();
        let mut set = DirtySet::new(self.pages);
        for &p in lock(&r.undo).keys() {
            set.insert(p);
        }
        Ok(set)
    }

    fn capture(&mut self, _frozen: &Frozen<'_>, dirty: &DirtySet) -> Result<(), Error> {
        let r = self.running()?;
        r.reprotect(dirty)?;
        lock(&r.undo).clear();
        Ok(())
    }

    fn rollback(&mut self, frozen: &Frozen<'_>, dirty: &DirtySet) -> Result<(), Error> {
        let r = self.running()?;
        r.drain();
        let undo = std::mem::take(&mut *lock(&r.undo));
        for (p, old) in &undo {
            // Pages in the undo log are unprotected, so these writes do not fault.
            write_page(frozen, *p, old)?;
        }
        r.reprotect(dirty)
    }
}

impl Drop for PreImage {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.take() {
            r.stop.store(true, Ordering::Release);
            if let Some(h) = r.handler.take() {
                let _ = h.join();
            }
            // Dropping the userfaultfd unregisters the range and releases any blocked writer.
        }
    }
}
