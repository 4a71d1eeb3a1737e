//! Memory classes (ABI 1.8): the heap is working memory; a [`PageCache`] holds contents the
//! guest can drop and refill; a [`SwapArea`] holds cold data the host may move out of RAM (to
//! a file) and brings back when it is touched. [`Classes`] tells the VMM which memory is which
//! and carries the host's requests: give up N pages, or take N back.
//!
//! A request arrives as a word in the class table; no interrupt is injected. The
//! [`Requests`] source makes the dispatcher see it (a blocked vCPU is woken for it) and calls
//! the guest's handler, which drops cache, moves cold data to swap and returns the freed pages
//! ([`give_back`]), and then answers. A guest that does not answer in time is not trusted: the
//! host moves its swap area out itself.
//!
//! ```no_run
//! use rebound_guest::memory::{Classes, PageCache, Pages, SwapArea};
//!
//! let cache = PageCache::new(Pages::alloc(256).unwrap());
//! let swap = SwapArea::new(Pages::alloc(256).unwrap());
//! let mut classes = Classes::new().unwrap();
//! classes.add(cache.pages(), rebound_guest::abi::memory::CACHE).unwrap();
//! classes.add(swap.pages(), rebound_guest::abi::memory::SWAP).unwrap();
//! classes.register().unwrap();
//! if let Some((seq, want)) = classes.request() {
//!     let given = if want > 0 { cache.shrink(want as u64) } else { 0 };
//!     classes.answer(seq, given as i64);
//! }
//! ```

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::cell::{Cell, RefCell};
use core::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use rebound_abi::memory::{MAX_RANGES, RETURN_MAX_PAGES, Range, Table};
use rebound_abi::{PAGE_SIZE, nr};

use crate::hypercall::{self, Errno};

const PAGE: usize = PAGE_SIZE as usize;
/// Pages in a 2 MiB huge page.
const HUGE: u64 = 512;

/// A page-aligned area of whole pages, taken from the heap for the VM's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pages {
    addr: u64,
    count: u64,
}

impl Pages {
    /// Allocates `count` pages (None if the heap cannot). Areas of 2 MiB or more start on a
    /// 2 MiB boundary, so the host can back them with huge pages and free them whole.
    pub fn alloc(count: u64) -> Option<Self> {
        let align = if count >= HUGE {
            HUGE as usize * PAGE
        } else {
            PAGE
        };
        let layout = Layout::from_size_align((count as usize).checked_mul(PAGE)?, align).ok()?;
        if count == 0 {
            return None;
        }
        // SAFETY: a non-zero size and a valid alignment.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        (!p.is_null()).then_some(Self {
            addr: p as u64,
            count,
        })
    }

    /// Guest address of the first page.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Number of pages.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Page `i` (`i < count`).
    fn page(&self, i: u64) -> *mut u8 {
        debug_assert!(i < self.count);
        (self.addr + i * PAGE_SIZE) as *mut u8
    }
}

/// Gives `count` pages at `addr` back to the host (in calls of at most 64 MiB). They read as
/// zero the next time they are touched. Returns the pages given.
pub fn give_back(addr: u64, count: u64) -> Result<u64, Errno> {
    let mut done = 0;
    while done < count {
        let n = (count - done).min(RETURN_MAX_PAGES);
        // The VMM may take fewer than asked (while a checkpoint strategy watches writes).
        let took = hypercall::call(nr::MEM_RETURN, &[addr + done * PAGE_SIZE, n])?;
        if took == 0 {
            break;
        }
        done += took.min(n);
    }
    Ok(done)
}

/// Gives back the pages of `area` listed in `pages` (ascending), one call per run.
fn give_back_runs(area: &Pages, pages: &[u64]) -> u64 {
    let mut given = 0;
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] == pages[j - 1] + 1 {
            j += 1;
        }
        let n = (j - i) as u64;
        if give_back(area.addr + pages[i] * PAGE_SIZE, n).is_ok() {
            given += n;
        }
        i = j;
    }
    given
}

/// This VM's class table.
pub struct Classes {
    table: *mut Table,
}

impl Classes {
    /// An empty table (in its own page of the heap).
    pub fn new() -> Option<Self> {
        let p = Pages::alloc(1)?;
        let table = p.addr as *mut Table;
        // SAFETY: a fresh, page-aligned page of our own, large enough for a table.
        unsafe { table.write(Table::default()) };
        Some(Self { table })
    }

    fn t(&self) -> *mut Table {
        self.table
    }

    /// Adds `pages` as `class` ([`rebound_abi::memory::WORKING`], `CACHE` or `SWAP`). Call
    /// [`register`](Self::register) after changes.
    pub fn add(&mut self, pages: &Pages, class: u32) -> Result<(), Errno> {
        let t = self.t();
        // SAFETY: fields of our own table, through raw pointers: the VMM writes the request
        // words concurrently, so no reference to the whole table is made.
        unsafe {
            let count = (&raw const (*t).count).read_volatile();
            let i = count as usize;
            if i >= MAX_RANGES {
                return Err(Errno(rebound_abi::errno::E2BIG));
            }
            (&raw mut (*t).ranges[i]).write_volatile(Range {
                gpa: pages.addr,
                pages: pages.count,
                class,
                reserved: 0,
            });
            (&raw mut (*t).count).write_volatile(count + 1);
        }
        Ok(())
    }

    /// Tells the VMM where the table is (again after changes); this vCPU is the one woken for
    /// requests.
    pub fn register(&self) -> Result<(), Errno> {
        hypercall::call(nr::MEM_SETUP, &[self.table as u64]).map(|_| ())
    }

    fn word(&self, offset: u64) -> &AtomicU64 {
        // SAFETY: an aligned u64 of our table, shared with the VMM, accessed atomically.
        unsafe { &*((self.table as u64 + offset) as *const AtomicU64) }
    }

    fn signed(&self, offset: u64) -> &AtomicI64 {
        // SAFETY: as for `word`.
        unsafe { &*((self.table as u64 + offset) as *const AtomicI64) }
    }

    /// The host's request not answered yet: its number and the pages it asks for (> 0: give
    /// up; < 0: may take back).
    pub fn request(&self) -> Option<(u64, i64)> {
        use rebound_abi::memory::{ANSWER_SEQ_OFFSET, REQUEST_PAGES_OFFSET, REQUEST_SEQ_OFFSET};
        loop {
            let seq = self.word(REQUEST_SEQ_OFFSET).load(Ordering::Acquire);
            if seq == self.word(ANSWER_SEQ_OFFSET).load(Ordering::Relaxed) {
                return None;
            }
            let pages = self.signed(REQUEST_PAGES_OFFSET).load(Ordering::Acquire);
            // The host stores the pages, then the number: the same number after the pages
            // means both belong to one request.
            if self.word(REQUEST_SEQ_OFFSET).load(Ordering::Acquire) == seq {
                return Some((seq, pages));
            }
        }
    }

    /// Answers request `seq`: `pages` given up (or taken back, < 0).
    pub fn answer(&self, seq: u64, pages: i64) {
        use rebound_abi::memory::{ANSWER_PAGES_OFFSET, ANSWER_SEQ_OFFSET};
        self.signed(ANSWER_PAGES_OFFSET)
            .store(pages, Ordering::Relaxed);
        self.word(ANSWER_SEQ_OFFSET).store(seq, Ordering::Release);
    }
}

/// A dispatcher source that answers the host's memory requests with `handler` (pages asked,
/// > 0 give up, < 0 may take back; returns what it did).
pub struct Requests<F: FnMut(i64) -> i64> {
    classes: Classes,
    handler: RefCell<F>,
    answered: Cell<u64>,
}

impl<F: FnMut(i64) -> i64> Requests<F> {
    /// Serves `classes` (registered) with `handler`.
    pub fn new(classes: Classes, handler: F) -> Self {
        Self {
            classes,
            handler: RefCell::new(handler),
            answered: Cell::new(0),
        }
    }

    /// Requests answered.
    pub fn answered(&self) -> u64 {
        self.answered.get()
    }

    /// The table.
    pub fn classes(&self) -> &Classes {
        &self.classes
    }
}

impl<F: FnMut(i64) -> i64> crate::dispatch::Source for Requests<F> {
    fn poll(&self) -> bool {
        let Some((seq, want)) = self.classes.request() else {
            return false;
        };
        let done = (self.handler.borrow_mut())(want);
        self.classes.answer(seq, done);
        self.answered.set(self.answered.get() + 1);
        true
    }
}

struct CacheSlot {
    key: u64,
    len: u32,
    stamp: u64,
}

/// Pages whose contents the guest can drop and refill (e.g. a page cache): least recently used
/// entries are dropped first, and pages dropped on the host's request are given back.
pub struct PageCache {
    area: Pages,
    slots: RefCell<Vec<Option<CacheSlot>>>,
    /// Empty slots below the limit.
    free: RefCell<Vec<u32>>,
    index: RefCell<BTreeMap<u64, u32>>,
    clock: Cell<u64>,
    /// Slots usable now (the host may have asked for some back).
    limit: Cell<u64>,
}

impl PageCache {
    /// A cache of `area`'s pages, one entry per page.
    pub fn new(area: Pages) -> Self {
        let mut slots = Vec::new();
        slots.resize_with(area.count as usize, || None);
        Self {
            area,
            slots: RefCell::new(slots),
            free: RefCell::new((0..area.count as u32).rev().collect()),
            index: RefCell::new(BTreeMap::new()),
            clock: Cell::new(0),
            limit: Cell::new(area.count),
        }
    }

    /// Its pages (to add to the class table).
    pub fn pages(&self) -> &Pages {
        &self.area
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.index.borrow().len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pages it may use now.
    pub fn limit(&self) -> u64 {
        self.limit.get()
    }

    fn tick(&self) -> u64 {
        let t = self.clock.get() + 1;
        self.clock.set(t);
        t
    }

    /// Stores `data` (at most a page) under `key`, dropping the least recently used entry if
    /// full. False if the cache may hold nothing now.
    pub fn insert(&self, key: u64, data: &[u8]) -> bool {
        let data = &data[..data.len().min(PAGE)];
        let stamp = self.tick();
        let slot = {
            let index = self.index.borrow();
            index.get(&key).copied()
        };
        let slot = match slot {
            Some(s) => s,
            None => {
                let limit = self.limit.get() as usize;
                let mut slots = self.slots.borrow_mut();
                let free = self.free.borrow_mut().pop();
                let s = match free {
                    Some(s) => s as usize,
                    None => {
                        let Some((victim, _)) = slots[..limit]
                            .iter()
                            .enumerate()
                            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s.stamp)))
                            .min_by_key(|&(_, st)| st)
                        else {
                            return false;
                        };
                        if let Some(old) = slots[victim].take() {
                            self.index.borrow_mut().remove(&old.key);
                        }
                        victim
                    }
                };
                slots[s] = Some(CacheSlot { key, len: 0, stamp });
                self.index.borrow_mut().insert(key, s as u32);
                s as u32
            }
        };
        // SAFETY: a page of our area; `data` is at most a page.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), self.area.page(slot.into()), data.len())
        };
        if let Some(s) = self.slots.borrow_mut()[slot as usize].as_mut() {
            s.len = data.len() as u32;
            s.stamp = stamp;
        }
        true
    }

    /// The entry under `key`, copied into `out` (returns its length), if held.
    pub fn get(&self, key: u64, out: &mut [u8]) -> Option<usize> {
        let slot = *self.index.borrow().get(&key)?;
        let stamp = self.tick();
        let mut slots = self.slots.borrow_mut();
        let s = slots[slot as usize].as_mut()?;
        s.stamp = stamp;
        let n = (s.len as usize).min(out.len());
        // SAFETY: a page of our area, at least `n` bytes.
        unsafe { core::ptr::copy_nonoverlapping(self.area.page(slot.into()), out.as_mut_ptr(), n) };
        Some(n)
    }

    /// Gives up to `pages` pages back to the host, dropping the entries in the pages given
    /// (the cache then uses fewer pages). Returns the pages given.
    pub fn shrink(&self, pages: u64) -> u64 {
        let limit = self.limit.get();
        let mut new = limit.saturating_sub(pages);
        // Whole huge pages where the area has them: freeing part of one frees nothing on a
        // host that backs the area with huge pages (small remainders stay partial, so a small
        // request never empties the cache).
        if self.area.addr.is_multiple_of(HUGE * PAGE_SIZE) && new >= HUGE {
            new -= new % HUGE;
        }
        let mut slots = self.slots.borrow_mut();
        let mut index = self.index.borrow_mut();
        for s in slots[new as usize..limit as usize].iter_mut() {
            if let Some(old) = s.take() {
                index.remove(&old.key);
            }
        }
        drop((slots, index));
        self.free.borrow_mut().retain(|&s| u64::from(s) < new);
        self.limit.set(new);
        let list: Vec<u64> = (new..limit).collect();
        give_back_runs(&self.area, &list)
    }

    /// Lets the cache use up to `pages` more pages again. Returns the pages it may now use
    /// beyond before.
    pub fn grow(&self, pages: u64) -> u64 {
        let limit = self.limit.get();
        let new = (limit + pages).min(self.area.count);
        self.limit.set(new);
        self.free
            .borrow_mut()
            .extend((limit as u32..new as u32).rev());
        new - limit
    }
}

/// A slot of the swap area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SwapSlot(u32);

/// An area cold data is paged into, a page per slot. The host may move its pages out of RAM
/// at any time; touching them brings them back. A freed slot's page is given back.
pub struct SwapArea {
    area: Pages,
    free: RefCell<Vec<u32>>,
}

impl SwapArea {
    /// A swap area of `area`'s pages.
    pub fn new(area: Pages) -> Self {
        Self {
            area,
            free: RefCell::new((0..area.count as u32).rev().collect()),
        }
    }

    /// Its pages (to add to the class table).
    pub fn pages(&self) -> &Pages {
        &self.area
    }

    /// Free slots.
    pub fn free_slots(&self) -> usize {
        self.free.borrow().len()
    }

    /// Stores a page of data; None if the area is full.
    pub fn put(&self, data: &[u8; PAGE]) -> Option<SwapSlot> {
        let s = self.free.borrow_mut().pop()?;
        // SAFETY: a page of our area.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), self.area.page(s.into()), PAGE) };
        Some(SwapSlot(s))
    }

    /// Reads slot `s` into `out`.
    pub fn read(&self, s: SwapSlot, out: &mut [u8; PAGE]) {
        // SAFETY: a page of our area (slots come from `put`).
        unsafe {
            core::ptr::copy_nonoverlapping(self.area.page(s.0.into()), out.as_mut_ptr(), PAGE)
        };
    }

    /// Frees slot `s`, giving its page back.
    pub fn free(&self, s: SwapSlot) {
        self.free_many(&mut [s]);
    }

    /// Frees `slots`, giving their pages back in as few calls as runs allow (sorts `slots`).
    pub fn free_many(&self, slots: &mut [SwapSlot]) {
        slots.sort_unstable();
        let pages: Vec<u64> = slots.iter().map(|s| u64::from(s.0)).collect();
        give_back_runs(&self.area, &pages);
        self.free.borrow_mut().extend(slots.iter().map(|s| s.0));
    }
}
