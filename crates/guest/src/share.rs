//! Shared memory with other VMs (ABI 1.2): regions, wake-ups that interrupt a VM only when it
//! is idle, locks the VMM can recover, and message queues.
//!
//! Everything here is plain memory and atomic instructions: taking a free lock, sending a
//! message to a busy VM or receiving one costs no exit. Only waking an idle VM rings a doorbell
//! (an ioeventfd, ~3 us), and only waiting blocks in the VMM.
//!
//! Other VMs are not trusted: whatever this module reads from a region (queue positions,
//! sequence numbers, lengths, lock words) is checked, and a queue that makes no sense is
//! reported as [`Corrupt`] rather than followed.
//!
//! Regions are attached with `rebound run --share NAME` (read-write) or `--share NAME:ro`, or
//! through the API; see `docs/sharing.md`. A VM with none sees an empty [`regions`], [`find`]
//! returns None and [`vm_id`] is 0. Nothing here returns an [`Errno`](crate::hypercall::Errno):
//! the two hypercalls it makes (`SHARE_NOTIFY`, `SHARE_RECOVER`) fail only with `EINVAL` for a
//! region index that is not attached, which [`Region`]s from [`regions`] never have.
//!
//! ```no_run
//! use rebound_guest::share;
//!
//! if let Some(r) = share::find("jobs") {
//!     let (data, len) = r.data();
//!     rebound_guest::println!("region {} at {data:p}: {len} bytes of data", r.name());
//!     let counter = r.word(0).expect("the data area holds a word");
//!     let lock = r.lock(0);
//!     lock.lock(); // blocks this vCPU while another VM holds it
//!     counter.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
//!     lock.unlock();
//! }
//! ```

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use rebound_abi::share::{
    self, LOCK_HOLDER_MASK, LOCK_INCONSISTENT, LockEntry, Member, ShareEntry, ShareTable,
};
use rebound_abi::{nr, port};

use crate::hypercall;

/// Something in a region does not make sense (another VM wrote garbage there), or a queue
/// does not fit where it was asked to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Corrupt;

fn table() -> &'static ShareTable {
    // SAFETY: the VMM maps the share table page read-only at TABLE_ADDR in every VM (ABI 1.2)
    // and only the VMM writes it.
    unsafe { &*(share::TABLE_ADDR as *const ShareTable) }
}

/// This VM's id in member slots (0 if the VMM has no shared regions for it). A restored clone
/// gets a new one.
pub fn vm_id() -> u64 {
    let t = table();
    if t.magic == share::TABLE_MAGIC {
        t.vm_id
    } else {
        0
    }
}

/// Changes whenever a region is attached or detached while the VM runs: look at [`regions`]
/// again when it does.
pub fn generation() -> u32 {
    // SAFETY: see `table`; read volatile because the VMM changes it while the guest runs.
    unsafe {
        core::ptr::read_volatile(&raw const (*(share::TABLE_ADDR as *const ShareTable)).generation)
    }
}

/// The regions attached to this VM (none without `--share`).
pub fn regions() -> impl Iterator<Item = Region> {
    let t = table();
    let count = if t.magic == share::TABLE_MAGIC {
        (t.count as usize).min(share::MAX_REGIONS)
    } else {
        0
    };
    (0..count).filter_map(|i| {
        // SAFETY: as in `table`; volatile: a hot attach rewrites entries.
        let e: ShareEntry = unsafe { core::ptr::read_volatile(&raw const table().entries[i]) };
        (e.size != 0).then_some(Region { entry: e, index: i })
    })
}

/// The region named `name`, if attached.
pub fn find(name: &str) -> Option<Region> {
    regions().find(|r| r.name() == name)
}

/// Marks this VM busy (its dispatcher runs tasks) or idle (about to block) in every region:
/// others wake it only when idle. An [`Inbox`] in a dispatcher does this itself.
pub fn set_busy(busy: bool) {
    for r in regions() {
        r.member(r.slot())
            .busy()
            .store(busy as u32, Ordering::SeqCst);
    }
    fence(Ordering::SeqCst);
}

/// One region as this VM sees it: a copy of its share table entry (address, size, rights,
/// this VM's member slot).
#[derive(Clone, Copy, Debug)]
pub struct Region {
    entry: ShareEntry,
    index: usize,
}

/// One member slot's shared fields (see [`Region::member`]).
pub struct MemberRef {
    base: *mut u8,
}

impl MemberRef {
    fn u64(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: `base` is a member slot inside a mapped region (see `Region::member`);
        // offsets come from the `Member` layout and are 8-aligned.
        unsafe { AtomicU64::from_ptr(self.base.add(offset).cast()) }
    }

    fn u32(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: as above, 4-aligned.
        unsafe { AtomicU32::from_ptr(self.base.add(offset).cast()) }
    }

    /// The VM holding the slot (0: free).
    pub fn vm_id(&self) -> u64 {
        self.u64(core::mem::offset_of!(Member, vm_id))
            .load(Ordering::Acquire)
    }

    fn busy(&self) -> &AtomicU32 {
        self.u32(core::mem::offset_of!(Member, busy))
    }

    fn notify(&self) -> &AtomicU64 {
        self.u64(core::mem::offset_of!(Member, notify))
    }

    /// Whether the VM in the slot is running tasks (not idle).
    pub fn is_busy(&self) -> bool {
        self.busy().load(Ordering::SeqCst) != 0
    }

    /// Times the VM in the slot was woken.
    pub fn wakeups(&self) -> u64 {
        self.u64(core::mem::offset_of!(Member, wakeups))
            .load(Ordering::Relaxed)
    }
}

impl Region {
    /// The region's name.
    pub fn name(&self) -> &str {
        let n = self.entry.name.iter().position(|&b| b == 0).unwrap_or(32);
        core::str::from_utf8(&self.entry.name[..n]).unwrap_or("")
    }

    /// Its index in the share table (what the `SHARE_*` hypercalls take).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Its address in this VM (its header: the data area starts
    /// [`HEADER_SIZE`](rebound_abi::share::HEADER_SIZE) bytes in, see [`data`](Self::data)).
    pub fn base(&self) -> *mut u8 {
        self.entry.addr as *mut u8
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.entry.size
    }

    /// Whether this VM may write it (`--share NAME:ro`: no; its stores are then dropped by the
    /// VMM, and counted).
    pub fn writable(&self) -> bool {
        self.entry.flags & share::WRITABLE != 0
    }

    /// Whether it is this VM's persistent cache.
    pub fn is_cache(&self) -> bool {
        self.entry.flags & share::CACHE != 0
    }

    /// This VM's member slot.
    pub fn slot(&self) -> usize {
        (self.entry.slot as usize).min(share::MAX_MEMBERS - 1)
    }

    /// Member slot `slot` (clamped to the table).
    pub fn member(&self, slot: usize) -> MemberRef {
        let slot = slot.min(share::MAX_MEMBERS - 1);
        MemberRef {
            // SAFETY: member slots lie inside the region's header, which is mapped.
            base: unsafe { self.base().add(share::member_offset(slot) as usize) },
        }
    }

    /// The other VMs attached: their slots.
    pub fn peers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..share::MAX_MEMBERS).filter(move |&s| s != self.slot() && self.member(s).vm_id() != 0)
    }

    /// The data area (after the header): address and length.
    pub fn data(&self) -> (*mut u8, usize) {
        // SAFETY: regions are at least HEADER_SIZE long (the VMM checks).
        let p = unsafe { self.base().add(share::HEADER_SIZE as usize) };
        (p, (self.size() - share::HEADER_SIZE) as usize)
    }

    /// The `u64` at byte `offset` of the data area, if in bounds and aligned.
    pub fn word(&self, offset: usize) -> Option<&AtomicU64> {
        let (p, len) = self.data();
        if !offset.is_multiple_of(8) || offset.checked_add(8)? > len {
            return None;
        }
        // SAFETY: in bounds of the mapped data area and 8-aligned (checked above).
        Some(unsafe { AtomicU64::from_ptr(p.add(offset).cast()) })
    }

    /// Wakes the VM in `slot`, whether busy or not (a doorbell, or the `SHARE_NOTIFY`
    /// hypercall from a read-only member). A slot out of range is ignored.
    pub fn wake(&self, slot: usize) {
        if slot >= share::MAX_MEMBERS {
            return;
        }
        if self.writable() {
            self.member(self.slot())
                .notify()
                .fetch_or(1 << slot, Ordering::SeqCst);
            ring_doorbell();
        } else {
            hypercall::raw(nr::SHARE_NOTIFY, &[self.index as u64, 1 << slot]);
        }
    }

    /// Wakes the VM in `slot` only if it is idle; returns whether it rang. Call after making
    /// the work visible (e.g. after a queue push): a VM that is busy will find it when its
    /// dispatcher next looks.
    pub fn wake_if_idle(&self, slot: usize) -> bool {
        fence(Ordering::SeqCst);
        if self.member(slot).is_busy() {
            return false;
        }
        self.wake(slot);
        true
    }

    /// Has the VMM recover members whose VMMs died (their locks come back marked
    /// inconsistent); returns how many (0 also if the VMM refused the call). One hypercall;
    /// [`Lock::lock`] calls it itself while it waits.
    pub fn recover(&self) -> u64 {
        hypercall::raw(nr::SHARE_RECOVER, &[self.index as u64]).max(0) as u64
    }

    /// Lock `index` of the region's lock table (0 to 255; larger indices are clamped).
    pub fn lock(&self, index: usize) -> Lock {
        Lock {
            region: *self,
            index: index.min(share::MAX_LOCKS - 1),
        }
    }

    /// The queue at byte `offset` of the data area, as [`Queue::at`]: `Corrupt` if there is
    /// none (no queue header there) or it does not fit.
    pub fn queue(&self, offset: usize) -> Result<Queue, Corrupt> {
        Queue::at(self, offset)
    }
}

fn ring_doorbell() {
    // SAFETY: an `out` to the shared-region doorbell port, reachable from CPL3 through the TSS
    // I/O bitmap; it touches no memory.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port::SHARE_DOORBELL, in("eax") 0u32, options(nostack, preserves_flags));
    }
}

/// How a lock was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// As the last holder left it.
    Clean,
    /// A holder died or was rolled back while holding it: what it protects may be half-done.
    Inconsistent,
}

/// A lock in a region's lock table: exclusive, or shared-read / exclusive-write. The word
/// records which member holds it, so the VMM can release it if that member dies.
#[derive(Clone, Copy, Debug)]
pub struct Lock {
    region: Region,
    index: usize,
}

/// Spins before blocking on a contended lock.
const SPINS: u32 = 200;
/// Blocks (of [`WAIT_NS`]) before asking the VMM whether the holder is alive.
const WAITS_BEFORE_RECOVER: u32 = 5;
/// One wait on a contended lock.
const WAIT_NS: u64 = 2_000_000;

impl Lock {
    fn field(&self, offset: usize) -> &AtomicU64 {
        let at = share::lock_offset(self.index) as usize + offset;
        // SAFETY: the lock table lies in the region's mapped header; offsets are 8-aligned.
        unsafe { AtomicU64::from_ptr(self.region.base().add(at).cast()) }
    }

    fn word(&self) -> &AtomicU64 {
        self.field(core::mem::offset_of!(LockEntry, word))
    }

    fn readers(&self) -> &AtomicU64 {
        self.field(core::mem::offset_of!(LockEntry, readers))
    }

    fn waiters(&self) -> &AtomicU64 {
        self.field(core::mem::offset_of!(LockEntry, waiters))
    }

    fn me(&self) -> u64 {
        self.region.slot() as u64 + 1
    }

    /// Takes the lock if it is free (no exit).
    pub fn try_lock(&self) -> Option<Acquired> {
        let w = self.word().load(Ordering::Acquire);
        if w & LOCK_HOLDER_MASK != 0 {
            return None;
        }
        let new = (w & !LOCK_HOLDER_MASK & !LOCK_INCONSISTENT) | self.me();
        self.word()
            .compare_exchange(w, new, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| {
                if w & LOCK_INCONSISTENT != 0 {
                    Acquired::Inconsistent
                } else {
                    Acquired::Clean
                }
            })
    }

    /// Takes the lock exclusively, waiting (in the VMM, not spinning) while another VM holds
    /// it or reads under it. It blocks the vCPU, not just the task: a dispatcher's other tasks
    /// wait too. A holder that died is recovered (its lock comes back `Inconsistent`).
    pub fn lock(&self) -> Acquired {
        let got = self.wait_for(|| self.try_lock());
        // Readers that came in before us leave; no new ones enter while we hold the word.
        self.wait_for(|| {
            (self.readers().load(Ordering::SeqCst) & !self.my_bit() == 0).then_some(())
        });
        got
    }

    /// Releases an exclusive hold (what was inconsistent is consistent again).
    pub fn unlock(&self) {
        let mut w = self.word().load(Ordering::Acquire);
        while w & LOCK_HOLDER_MASK == self.me() {
            let new = w & !LOCK_HOLDER_MASK & !LOCK_INCONSISTENT;
            match self
                .word()
                .compare_exchange(w, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => w = now,
            }
        }
        self.wake_waiters();
    }

    /// Whether this VM holds the lock exclusively (false after the VMM released it for us).
    pub fn held(&self) -> bool {
        self.word().load(Ordering::Acquire) & LOCK_HOLDER_MASK == self.me()
    }

    fn my_bit(&self) -> u64 {
        1 << self.region.slot()
    }

    /// Takes the lock shared (readers exclude writers, not each other); blocks the vCPU as
    /// [`lock`](Self::lock) does.
    pub fn read_lock(&self) -> Acquired {
        self.wait_for(|| {
            self.readers().fetch_or(self.my_bit(), Ordering::SeqCst);
            let w = self.word().load(Ordering::SeqCst);
            if w & LOCK_HOLDER_MASK == 0 {
                Some(if w & LOCK_INCONSISTENT != 0 {
                    Acquired::Inconsistent
                } else {
                    Acquired::Clean
                })
            } else {
                self.readers().fetch_and(!self.my_bit(), Ordering::SeqCst);
                None
            }
        })
    }

    /// Releases a shared hold.
    pub fn read_unlock(&self) {
        self.readers().fetch_and(!self.my_bit(), Ordering::SeqCst);
        self.wake_waiters();
    }

    fn wake_waiters(&self) {
        let mask = self.waiters().load(Ordering::SeqCst) & !self.my_bit();
        if mask != 0 {
            if self.region.writable() {
                self.region
                    .member(self.region.slot())
                    .notify()
                    .fetch_or(mask, Ordering::SeqCst);
                ring_doorbell();
            } else {
                hypercall::raw(nr::SHARE_NOTIFY, &[self.region.index as u64, mask]);
            }
        }
    }

    /// Spins, then blocks in the VMM between tries; every few waits asks the VMM to recover
    /// dead members (a dead holder's lock comes back).
    fn wait_for<T>(&self, mut attempt: impl FnMut() -> Option<T>) -> T {
        for _ in 0..SPINS {
            if let Some(t) = attempt() {
                return t;
            }
            core::hint::spin_loop();
        }
        let mut waits = 0u32;
        loop {
            self.waiters().fetch_or(self.my_bit(), Ordering::SeqCst);
            if let Some(t) = attempt() {
                self.waiters().fetch_and(!self.my_bit(), Ordering::SeqCst);
                return t;
            }
            hypercall::block(WAIT_NS);
            waits += 1;
            if waits.is_multiple_of(WAITS_BEFORE_RECOVER) {
                self.region.recover();
            }
        }
    }
}

/// Bytes of message a queue cell carries.
pub const MESSAGE_MAX: usize = 48;
const QUEUE_MAGIC: u64 = share::QUEUE_MAGIC;
const CELL: usize = 64;
const QUEUE_HEADER: usize = 192;
/// Attempts before a queue whose positions keep moving nonsensically is declared corrupt.
const QUEUE_TRIES: u32 = 1000;

/// A bounded multi-producer multi-consumer queue of small messages in a region (cells with
/// sequence numbers, Vyukov's design): push and pop are a few atomic instructions, no exit.
///
/// Layout at its offset: magic, capacity (a power of two), a damaged flag, enqueue position,
/// dequeue position (each on its own cache line), then `capacity` cells of 64 bytes: sequence, length, payload.
#[derive(Clone, Copy, Debug)]
pub struct Queue {
    base: *mut u8,
    capacity: u64,
}

/// A message: up to [`MESSAGE_MAX`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    len: u8,
    bytes: [u8; MESSAGE_MAX],
}

impl Message {
    /// A message holding `bytes` (cut at [`MESSAGE_MAX`]).
    pub fn new(bytes: &[u8]) -> Self {
        let n = bytes.len().min(MESSAGE_MAX);
        let mut m = Message {
            len: n as u8,
            bytes: [0; MESSAGE_MAX],
        };
        m.bytes[..n].copy_from_slice(&bytes[..n]);
        m
    }

    /// A message of `words` little-endian `u64`s (up to 6).
    pub fn words(words: &[u64]) -> Self {
        let mut b = [0u8; MESSAGE_MAX];
        let n = words.len().min(MESSAGE_MAX / 8);
        for (i, w) in words.iter().take(n).enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        Message::new(&b[..n * 8])
    }

    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// Word `i` (0 if the message is shorter).
    pub fn word(&self, i: usize) -> u64 {
        let b = self.bytes();
        b.get(i * 8..i * 8 + 8).map_or(0, |w| {
            u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
        })
    }
}

impl Queue {
    /// Bytes a queue of `capacity` cells occupies.
    pub const fn bytes(capacity: u64) -> usize {
        QUEUE_HEADER + capacity as usize * CELL
    }

    fn u64(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: offsets below `bytes(capacity)`, inside the region (checked in `at`/`init`),
        // 8-aligned.
        unsafe { AtomicU64::from_ptr(self.base.add(offset).cast()) }
    }

    fn enq(&self) -> &AtomicU64 {
        self.u64(share::QUEUE_ENQ_OFFSET as usize)
    }

    fn deq(&self) -> &AtomicU64 {
        self.u64(share::QUEUE_DEQ_OFFSET as usize)
    }

    fn cell_seq(&self, pos: u64) -> &AtomicU64 {
        self.u64(QUEUE_HEADER + (pos & (self.capacity - 1)) as usize * CELL)
    }

    fn cell(&self, pos: u64) -> *mut u8 {
        // SAFETY: a cell inside the queue's bytes (masked index).
        unsafe {
            self.base
                .add(QUEUE_HEADER + (pos & (self.capacity - 1)) as usize * CELL)
        }
    }

    fn place(region: &Region, offset: usize, capacity: u64) -> Result<*mut u8, Corrupt> {
        let (p, len) = region.data();
        if !capacity.is_power_of_two() || capacity > 1 << 20 || !offset.is_multiple_of(64) {
            return Err(Corrupt);
        }
        if offset
            .checked_add(Self::bytes(capacity))
            .is_none_or(|end| end > len)
        {
            return Err(Corrupt);
        }
        // SAFETY: in bounds of the data area (checked above).
        Ok(unsafe { p.add(offset) })
    }

    /// Makes an empty queue of `capacity` cells (a power of two, at most 2^20) at `offset` of
    /// the data area (a multiple of 64); it takes [`Queue::bytes`]`(capacity)` bytes. Only
    /// while no other VM uses it (its owner, at start). `Corrupt` if the arguments are bad or
    /// the queue does not fit in the data area.
    pub fn init(region: &Region, offset: usize, capacity: u64) -> Result<Queue, Corrupt> {
        Self::init_owned(region, offset, capacity, 0)
    }

    /// Like [`init`](Self::init), for an inbox owned by VM `owner`.
    fn init_owned(
        region: &Region,
        offset: usize,
        capacity: u64,
        owner: u64,
    ) -> Result<Queue, Corrupt> {
        let base = Self::place(region, offset, capacity)?;
        let q = Queue { base, capacity };
        q.format(owner);
        Ok(q)
    }

    /// Writes an empty queue owned by VM `owner` over whatever is there.
    fn format(&self, owner: u64) {
        self.owner().store(owner, Ordering::Relaxed);
        self.u64(share::QUEUE_CAPACITY_OFFSET as usize)
            .store(self.capacity, Ordering::Relaxed);
        self.enq().store(0, Ordering::Relaxed);
        self.deq().store(0, Ordering::Relaxed);
        for i in 0..self.capacity {
            self.cell_seq(i).store(i, Ordering::Relaxed);
        }
        self.damaged().store(0, Ordering::Relaxed);
        self.u64(0).store(QUEUE_MAGIC, Ordering::Release);
    }

    /// The queue at `offset`, as its header describes it: `Corrupt` if there is no queue
    /// there or its header does not fit the region.
    pub fn at(region: &Region, offset: usize) -> Result<Queue, Corrupt> {
        let head = Self::place(region, offset, 1)?;
        // SAFETY: the first words of a placed queue are in bounds (checked by `place`).
        let (magic, capacity) = unsafe {
            (
                AtomicU64::from_ptr(head.cast()).load(Ordering::Acquire),
                AtomicU64::from_ptr(head.add(8).cast()).load(Ordering::Acquire),
            )
        };
        if magic != QUEUE_MAGIC {
            return Err(Corrupt);
        }
        let base = Self::place(region, offset, capacity)?;
        Ok(Queue { base, capacity })
    }

    /// Set by a sender that found the queue corrupt (0: not damaged).
    fn damaged(&self) -> &AtomicU64 {
        self.u64(16)
    }

    /// The VM id of an inbox's owner (0: a queue no one VM owns).
    fn owner(&self) -> &AtomicU64 {
        self.u64(24)
    }

    /// Whether the header still describes this queue (another VM may have written over it,
    /// or a sender found it damaged beyond what its owner can see).
    fn header_ok(&self) -> bool {
        self.u64(0).load(Ordering::Acquire) == QUEUE_MAGIC
            && self.u64(8).load(Ordering::Acquire) == self.capacity
            && self.damaged().load(Ordering::Acquire) == 0
    }

    /// Appends a message; `Ok(false)` if full. A queue found corrupt is flagged damaged, so
    /// that its owner (who may see nothing wrong from its end) resets it.
    pub fn push(&self, m: &Message) -> Result<bool, Corrupt> {
        let r = self.try_push(m);
        if r.is_err() {
            self.damaged().store(1, Ordering::Release);
        }
        r
    }

    fn try_push(&self, m: &Message) -> Result<bool, Corrupt> {
        if !self.header_ok() {
            return Err(Corrupt);
        }
        let mut pos = self.enq().load(Ordering::Relaxed);
        for _ in 0..QUEUE_TRIES {
            let seq = self.cell_seq(pos).load(Ordering::Acquire);
            let dif = seq.wrapping_sub(pos) as i64;
            if dif == 0 {
                match self.enq().compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        let c = self.cell(pos);
                        // SAFETY: the cell is ours until we publish its sequence below; the
                        // payload lies inside it.
                        unsafe {
                            core::ptr::write_volatile(c.add(8), m.len);
                            core::ptr::copy_nonoverlapping(
                                m.bytes.as_ptr(),
                                c.add(16),
                                MESSAGE_MAX,
                            );
                        }
                        self.cell_seq(pos)
                            .store(pos.wrapping_add(1), Ordering::Release);
                        return Ok(true);
                    }
                    Err(now) => pos = now,
                }
            } else if dif < 0 {
                // Full: the cell still holds (or is being given) the message from one lap
                // ago. Any other sequence is not one this protocol writes.
                let lap = pos.wrapping_sub(self.capacity);
                if seq != lap && seq != lap.wrapping_add(1) {
                    return Err(Corrupt);
                }
                return Ok(false);
            } else {
                pos = self.enq().load(Ordering::Relaxed);
            }
        }
        Err(Corrupt)
    }

    /// Takes the oldest message, if any; `Corrupt` if the queue makes no sense.
    pub fn pop(&self) -> Result<Option<Message>, Corrupt> {
        if !self.header_ok() {
            return Err(Corrupt);
        }
        let mut pos = self.deq().load(Ordering::Relaxed);
        for _ in 0..QUEUE_TRIES {
            let seq = self.cell_seq(pos).load(Ordering::Acquire);
            let dif = seq.wrapping_sub(pos.wrapping_add(1)) as i64;
            if dif == 0 {
                match self.deq().compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        let c = self.cell(pos);
                        let mut m = Message {
                            len: 0,
                            bytes: [0; MESSAGE_MAX],
                        };
                        // SAFETY: the cell is ours until we hand it back below.
                        unsafe {
                            m.len = core::ptr::read_volatile(c.add(8));
                            core::ptr::copy_nonoverlapping(
                                c.add(16),
                                m.bytes.as_mut_ptr(),
                                MESSAGE_MAX,
                            );
                        }
                        self.cell_seq(pos)
                            .store(pos.wrapping_add(self.capacity), Ordering::Release);
                        if m.len as usize > MESSAGE_MAX {
                            return Err(Corrupt);
                        }
                        return Ok(Some(m));
                    }
                    Err(now) => pos = now,
                }
            } else if dif < 0 {
                // Empty: the cell is free for this lap, or a taker of the last lap has not
                // handed it back yet. Anything else was written by someone not following the
                // protocol.
                let taken = pos.wrapping_sub(self.capacity).wrapping_add(1);
                if seq != pos && seq != taken {
                    return Err(Corrupt);
                }
                return Ok(None);
            } else {
                pos = self.deq().load(Ordering::Relaxed);
            }
        }
        Err(Corrupt)
    }

    /// Whether a message is waiting (a cheap check for dispatchers).
    pub fn has_message(&self) -> bool {
        let pos = self.deq().load(Ordering::Relaxed);
        self.cell_seq(pos).load(Ordering::Acquire) == pos.wrapping_add(1)
    }
}

/// A VM's own inbox: a [`Queue`] in a region that other VMs push to and only this VM pops,
/// as a dispatcher [`Source`](crate::dispatch::Source): tasks `recv` from it, and while the
/// dispatcher is idle the VM is marked idle so senders wake it (and only then).
pub struct Inbox {
    queue: Queue,
    wakers: core::cell::RefCell<alloc::vec::Vec<core::task::Waker>>,
    corrupt: core::cell::Cell<u64>,
}

impl Inbox {
    /// The inbox of member `slot` when each member's inbox is `stride` bytes from `offset`.
    pub fn offset_of(offset: usize, stride: usize, slot: usize) -> usize {
        offset + stride * slot
    }

    /// This VM's inbox at `offset` of the region's data area, made empty (at start, before
    /// others send).
    pub fn create(
        region: &Region,
        offset: usize,
        capacity: u64,
    ) -> Result<alloc::rc::Rc<Inbox>, Corrupt> {
        let queue = Queue::init_owned(region, offset, capacity, vm_id())?;
        Ok(alloc::rc::Rc::new(Inbox {
            queue,
            wakers: core::cell::RefCell::new(alloc::vec::Vec::new()),
            corrupt: core::cell::Cell::new(0),
        }))
    }

    /// Times the queue was found corrupt (and reset).
    pub fn corruptions(&self) -> u64 {
        self.corrupt.get()
    }

    /// Takes a message now, if one is waiting. A queue another VM made nonsense of is reset
    /// (its messages are lost, this VM goes on) and counted.
    pub fn try_recv(&self) -> Option<Message> {
        // Someone wrote over the owner (senders would no longer deliver), or this VM is a
        // restored clone with a new id: make the inbox this VM's again.
        if self.queue.owner().load(Ordering::Acquire) != vm_id() {
            self.corrupt.set(self.corrupt.get() + 1);
            self.reset();
            return None;
        }
        match self.queue.pop() {
            Ok(m) => m,
            Err(Corrupt) => {
                self.corrupt.set(self.corrupt.get() + 1);
                self.reset();
                None
            }
        }
    }

    fn reset(&self) {
        self.queue.format(vm_id());
    }

    /// Waits for the next message (a future for a dispatcher task; the inbox must be one of the
    /// dispatcher's sources, or nothing wakes the task).
    pub fn recv(self: &alloc::rc::Rc<Self>) -> impl core::future::Future<Output = Message> + '_ {
        core::future::poll_fn(move |cx| match self.try_recv() {
            Some(m) => core::task::Poll::Ready(m),
            None => {
                self.wakers.borrow_mut().push(cx.waker().clone());
                core::task::Poll::Pending
            }
        })
    }
}

impl crate::dispatch::Source for Inbox {
    fn poll(&self) -> bool {
        // A header someone wrote over counts as ready: `try_recv` finds it and resets it.
        let ready = self.queue.has_message()
            || !self.queue.header_ok()
            || self.queue.owner().load(Ordering::Acquire) != vm_id();
        if ready {
            for w in self.wakers.borrow_mut().drain(..) {
                w.wake();
            }
        }
        ready
    }

    fn idle(&self, idle: bool) {
        set_busy(!idle);
    }
}

/// The inbox of member `slot` at `inbox_offset`, if that member made it: a queue left there by
/// a VM that held the slot before does not count.
pub fn inbox_of(region: &Region, inbox_offset: usize, slot: usize) -> Option<Queue> {
    let q = Queue::at(region, inbox_offset).ok()?;
    let owner = region.member(slot).vm_id();
    (owner != 0 && q.owner().load(Ordering::Acquire) == owner).then_some(q)
}

/// Sends `m` to the inbox of member `slot` (at `offset`), waking that VM only if it is idle.
/// Returns whether the message was queued (`false`: the inbox is full) and whether a wake-up
/// was rung.
pub fn send(
    region: &Region,
    inbox_offset: usize,
    slot: usize,
    m: &Message,
) -> Result<(bool, bool), Corrupt> {
    // No inbox of this member's (yet): nothing to push to, nobody to wake.
    let Some(q) = inbox_of(region, inbox_offset, slot) else {
        return Err(Corrupt);
    };
    // A damaged inbox is its owner's to reset: make sure it looks.
    match q.push(m) {
        Err(Corrupt) => {
            region.wake(slot);
            Err(Corrupt)
        }
        Ok(false) => Ok((false, false)),
        Ok(true) => Ok((true, region.wake_if_idle(slot))),
    }
}
