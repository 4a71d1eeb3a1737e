//! Memory classes: the guest's class table (working, cache, swap), the host's requests to give
//! memory up or take it back, and pages the guest returns (ABI 1.8, `rebound_abi::memory`).
//!
//! Nothing the guest writes is trusted. The table is read afresh, checked, each time the host
//! uses it (a guest may change it at any time); its ranges only say where the host may look
//! for swap pages, and moving any guest page out is safe anyway (it comes back on touch). A
//! returned page is the guest's loss if it still used it: it reads as zero.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rebound_abi::memory::{self as abi, Range, Table};
use rebound_abi::{IMAGE_BASE, PAGE_SIZE, errno};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::vm::VmShared;

/// Where the guest's table is: what the `memory` component saves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableState {
    /// Guest-physical address of the table (0: none registered).
    pub gpa: u64,
    /// The vCPU woken for requests.
    pub vcpu: u32,
    /// The last request's sequence number.
    pub seq: u64,
}

/// A memory class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Kept by the guest.
    Working,
    /// Contents the guest can drop.
    Cache,
    /// Cold data the host may move out of RAM.
    Swap,
}

/// A checked range of the table, in pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassRange {
    /// First guest page.
    pub first: u64,
    /// Pages.
    pub pages: u64,
    /// Its class.
    pub class: Class,
}

/// Why a table was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TableError {
    /// Not in guest-writable memory, or misaligned.
    Fault,
    /// A bad magic, count, range or class.
    Invalid,
}

impl TableError {
    fn errno(&self) -> i64 {
        match self {
            Self::Fault => errno::EFAULT,
            Self::Invalid => errno::EINVAL,
        }
    }
}

/// Checks a table's ranges against guest memory of `mem_size` bytes: page aligned, above the
/// image base, inside memory, not overlapping, known classes.
pub(crate) fn check_table(t: &Table, mem_size: u64) -> Result<Vec<ClassRange>, TableError> {
    if t.magic != abi::TABLE_MAGIC || t.count as usize > abi::MAX_RANGES {
        return Err(TableError::Invalid);
    }
    let mut out: Vec<ClassRange> = Vec::with_capacity(t.count as usize);
    for r in &t.ranges[..t.count as usize] {
        out.push(check_range(r, mem_size)?);
    }
    out.sort_by_key(|r| r.first);
    if out.windows(2).any(|w| w[0].first + w[0].pages > w[1].first) {
        return Err(TableError::Invalid);
    }
    Ok(out)
}

fn check_range(r: &Range, mem_size: u64) -> Result<ClassRange, TableError> {
    let class = match r.class {
        abi::WORKING => Class::Working,
        abi::CACHE => Class::Cache,
        abi::SWAP => Class::Swap,
        _ => return Err(TableError::Invalid),
    };
    let end = r
        .pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| r.gpa.checked_add(len))
        .ok_or(TableError::Invalid)?;
    if !r.gpa.is_multiple_of(PAGE_SIZE) || r.pages == 0 || r.gpa < IMAGE_BASE || end > mem_size {
        return Err(TableError::Invalid);
    }
    Ok(ClassRange {
        first: r.gpa / PAGE_SIZE,
        pages: r.pages,
        class,
    })
}

/// Counters of requests and returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCounters {
    /// Requests posted.
    pub requests: u64,
    /// Pages returned by the guest (`MEM_RETURN`).
    pub returned_pages: u64,
    /// `MEM_RETURN` calls.
    pub returns: u64,
}

/// The VM's class table registration and counters.
#[derive(Default)]
pub(crate) struct Classes {
    table: Mutex<TableState>,
    requests: AtomicU64,
    returned_pages: AtomicU64,
    returns: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const TABLE_LEN: u64 = std::mem::size_of::<Table>() as u64;

/// Most pages one `MEM_RETURN` gives back while a checkpoint strategy watches writes.
const WATCHED_RETURN_MAX: u64 = 1024;

impl Classes {
    /// The registration (for the `memory` component).
    pub(crate) fn state(&self) -> TableState {
        *lock(&self.table)
    }

    /// Puts a saved registration back (a restored VM, a rollback).
    pub(crate) fn set_state(&self, s: TableState) {
        let mut t = lock(&self.table);
        // Sequence numbers never go back: a guest that answered a later request must not be
        // taken to answer an earlier one.
        let seq = t.seq.max(s.seq);
        *t = TableState { seq, ..s };
    }

    /// Reads and checks the table at `gpa`.
    fn read(vm: &VmShared, gpa: u64) -> Result<(Table, Vec<ClassRange>), TableError> {
        if !gpa.is_multiple_of(8)
            || !vm.layout.is_guest_writable(gpa, TABLE_LEN)
            || gpa / PAGE_SIZE != (gpa + TABLE_LEN - 1) / PAGE_SIZE
        {
            return Err(TableError::Fault);
        }
        let t: Table = vm
            .mem
            .read_obj(GuestAddress(gpa))
            .map_err(|_| TableError::Fault)?;
        let ranges = check_table(&t, vm.layout.heap_end())?;
        Ok((t, ranges))
    }

    /// `MEM_SETUP`.
    pub(crate) fn setup(&self, vm: &VmShared, vcpu: u32, gpa: u64) -> i64 {
        match Self::read(vm, gpa) {
            Ok(_) => {
                let mut t = lock(&self.table);
                t.gpa = gpa;
                t.vcpu = vcpu;
                0
            }
            Err(e) => e.errno(),
        }
    }

    /// The table's checked ranges now (None: no table, or the guest broke it).
    pub(crate) fn ranges(&self, vm: &VmShared) -> Option<Vec<ClassRange>> {
        let gpa = lock(&self.table).gpa;
        if gpa == 0 {
            return None;
        }
        Self::read(vm, gpa).ok().map(|(_, r)| r)
    }

    /// Posts a request: give up `pages` (> 0) or take back `-pages`. Returns its sequence
    /// number, or None without a table.
    pub(crate) fn request(&self, vm: &VmShared, pages: i64) -> Option<u64> {
        let (gpa, vcpu, seq) = {
            let mut t = lock(&self.table);
            if t.gpa == 0 {
                return None;
            }
            t.seq += 1;
            (t.gpa, t.vcpu, t.seq)
        };
        let at = |off: u64| GuestAddress(gpa + off);
        vm.mem
            .store(pages, at(abi::REQUEST_PAGES_OFFSET), Ordering::Release)
            .ok()?;
        vm.mem
            .store(seq, at(abi::REQUEST_SEQ_OFFSET), Ordering::Release)
            .ok()?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(route) = rebound_abi::indicator::slot(rebound_abi::indicator::KIND_MEMORY, 0) {
            rebound_devices::Notify::indicate(&*vm.waiters, None, route);
        }
        rebound_devices::Notify::notify(&*vm.waiters, vcpu.min(vm.layout.vcpus() - 1));
        Some(seq)
    }

    /// The guest's answer: the request it answered and the pages it says it moved.
    pub(crate) fn answer(&self, vm: &VmShared) -> Option<(u64, i64)> {
        let gpa = lock(&self.table).gpa;
        if gpa == 0 {
            return None;
        }
        let at = |off: u64| GuestAddress(gpa + off);
        // The guest stores the pages, then the number: read the number before and after the
        // pages, so both belong to one answer.
        for _ in 0..100 {
            let seq: u64 = vm
                .mem
                .load(at(abi::ANSWER_SEQ_OFFSET), Ordering::Acquire)
                .ok()?;
            let pages: i64 = vm
                .mem
                .load(at(abi::ANSWER_PAGES_OFFSET), Ordering::Acquire)
                .ok()?;
            let again: u64 = vm
                .mem
                .load(at(abi::ANSWER_SEQ_OFFSET), Ordering::Acquire)
                .ok()?;
            if seq == again {
                return Some((seq, pages));
            }
        }
        // A guest that rewrites its answer without end gets none read.
        None
    }

    /// Counters.
    pub(crate) fn counters(&self) -> ClassCounters {
        ClassCounters {
            requests: self.requests.load(Ordering::Relaxed),
            returned_pages: self.returned_pages.load(Ordering::Relaxed),
            returns: self.returns.load(Ordering::Relaxed),
        }
    }

    /// `MEM_RETURN`: frees `pages` guest pages at `gpa`.
    pub(crate) fn give_back(&self, vm: &VmShared, gpa: u64, pages: u64) -> i64 {
        let Some(len) = pages.checked_mul(PAGE_SIZE) else {
            return errno::EINVAL;
        };
        if !gpa.is_multiple_of(PAGE_SIZE) || pages == 0 {
            return errno::EINVAL;
        }
        if pages > abi::RETURN_MAX_PAGES {
            return errno::E2BIG;
        }
        if gpa < IMAGE_BASE || !vm.layout.is_guest_writable(gpa, len) {
            return errno::EFAULT;
        }
        if vm.returns_held.load(Ordering::Acquire) {
            return errno::EBUSY;
        }
        let watching = vm.swap.watching();
        // Under a write watch each page is written first (a fault each): fewer per call, so
        // one call never holds the vCPU long. The guest calls again for the rest.
        let pages = if watching {
            pages.min(WATCHED_RETURN_MAX)
        } else {
            pages
        };
        let len = pages * PAGE_SIZE;
        let Ok(host) = vm.mem.get_host_address(GuestAddress(gpa)) else {
            return errno::EFAULT;
        };
        if watching {
            // A write-protecting checkpoint strategy must see each page change before it is
            // freed (its undo log saves the old contents on the write fault).
            for p in 0..pages {
                let a = GuestAddress(gpa + p * PAGE_SIZE);
                let Ok(b) = vm.mem.read_obj::<u8>(a) else {
                    return errno::EFAULT;
                };
                let _ = vm.mem.write_obj(b, a);
            }
        }
        // Their swap copies go next (after the watch saw the real old contents), so nothing
        // brings old contents back once the pages are freed.
        vm.swap.returned(gpa / PAGE_SIZE, pages);
        let r = if vm.private_memory {
            crate::swap::discard(host as u64, len)
        } else {
            crate::swap::remove(host as u64, len)
        };
        if let Err(e) = r {
            tracing::warn!(gpa, pages, "cannot free returned pages: {e}");
            return errno::EIO;
        }
        // The pages changed (to zero) behind KVM's dirty log: record it for checkpoints.
        if let Some((region, offset)) = vm.mem.to_region_addr(GuestAddress(gpa)) {
            vm_memory::bitmap::Bitmap::mark_dirty(region.bitmap(), offset.0 as usize, len as usize);
        }
        self.returns.fetch_add(1, Ordering::Relaxed);
        self.returned_pages.fetch_add(pages, Ordering::Relaxed);
        pages as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ranges: &[(u64, u64, u32)]) -> Table {
        let mut t = Table {
            count: ranges.len() as u32,
            ..Table::default()
        };
        for (i, &(gpa, pages, class)) in ranges.iter().enumerate() {
            t.ranges[i] = Range {
                gpa,
                pages,
                class,
                reserved: 0,
            };
        }
        t
    }

    const MEM: u64 = 64 << 20;

    #[test]
    fn a_good_table_is_read_in_page_order() {
        let t = table(&[
            (0x80_0000, 16, abi::SWAP),
            (0x40_0000, 4, abi::WORKING),
            (0x50_0000, 8, abi::CACHE),
        ]);
        let r = check_table(&t, MEM).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].first, r[0].class), (0x400, Class::Working));
        assert_eq!(
            (r[2].first, r[2].pages, r[2].class),
            (0x800, 16, Class::Swap)
        );
    }

    #[test]
    fn hostile_tables_are_refused() {
        let bad = [
            table(&[(0x40_0001, 1, abi::SWAP)]),            // misaligned
            table(&[(0x1000, 1, abi::SWAP)]),               // system area
            table(&[(MEM - 4096, 2, abi::SWAP)]),           // past the end
            table(&[(0x40_0000, u64::MAX / 2, abi::SWAP)]), // overflow
            table(&[(0x40_0000, 0, abi::SWAP)]),            // empty
            table(&[(0x40_0000, 1, 7)]),                    // unknown class
            table(&[(0x40_0000, 4, abi::SWAP), (0x40_2000, 4, abi::CACHE)]), // overlap
        ];
        for t in &bad {
            assert_eq!(check_table(t, MEM), Err(TableError::Invalid), "{t:?}");
        }
        let mut t = table(&[]);
        t.count = abi::MAX_RANGES as u32 + 1;
        assert_eq!(check_table(&t, MEM), Err(TableError::Invalid));
        let mut t = table(&[]);
        t.magic = 0;
        assert_eq!(check_table(&t, MEM), Err(TableError::Invalid));
    }
}
