//! The guest's half of one NIC's rings (ABI 1.4), over memory it owns: pure index and
//! descriptor logic, no hypercalls, so it is tested on the host against a simulated VMM.
//!
//! Every RX slot has a fixed frame buffer of its own (`buf_size` bytes), so nothing the VMM
//! writes is ever used as an address: a filled RX descriptor only contributes its length,
//! which is checked against the buffer before any byte is read. TX buffers are a pool the
//! guest alone manages: a frame goes into the buffer freed last, so a burst of frames between
//! two checkpoints writes the same few pages again (a protected VM pays a fault for the first
//! write to each page in an epoch), not a new page every other frame.

use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering, fence};

use rebound_abi::net::{self as abi, NetDesc};

/// Shortest frame the VMM accepts (an Ethernet header): shorter TX frames would break the ring.
pub const MIN_FRAME: usize = 14;

/// Counters of one NIC, as the guest sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicStats {
    /// Frames queued for sending.
    pub tx_frames: u64,
    /// Frames dropped before reaching the ring (no free slot, or a length the VMM refuses).
    pub tx_dropped: u64,
    /// Doorbells rung (each covers every frame queued since the last one).
    pub doorbells: u64,
    /// Frames received and handed on.
    pub rx_frames: u64,
    /// Received frames shorter than an Ethernet header, dropped.
    pub rx_runts: u64,
    /// Filled RX descriptors whose length exceeds the buffer (a VMM bug), dropped.
    pub rx_bad_len: u64,
    /// Consumer indices the VMM wrote that are more than a ring ahead (a VMM bug), ignored.
    pub bad_index: u64,
}

/// Why a frame was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// No free TX slot: the VMM has not taken earlier frames yet.
    Full,
    /// Shorter than an Ethernet header or longer than MTU + [`abi::FRAME_OVERHEAD`].
    BadLength,
    /// The VMM stopped using the rings ([`abi::RING_BROKEN`]).
    Broken,
}

/// One NIC's rings: the area registered with `NET_SETUP` and the frame buffers.
pub(crate) struct Rings {
    area: NonNull<u8>,
    bufs: NonNull<u8>,
    tx_entries: u32,
    rx_entries: u32,
    buf_size: usize,
    max_frame: usize,
    /// Our TX producer (the copy in memory is what the VMM reads).
    tx_producer: Cell<u32>,
    /// `tx_producer` when the doorbell last rang.
    tx_rung: Cell<u32>,
    /// Next RX index to take.
    rx_next: Cell<u32>,
    /// Our RX producer.
    rx_producer: Cell<u32>,
    /// A received frame is lent out (its buffer is re-posted when it is returned).
    rx_lent: Cell<bool>,
    /// TX buffers not in flight, the most recently freed last (taken first).
    tx_free_bufs: RefCell<Vec<u32>>,
    /// The TX buffer each slot's frame is in.
    tx_slot_buf: RefCell<Vec<u32>>,
    /// TX frames whose buffers went back to the pool (follows the VMM's consumer).
    tx_reclaimed: Cell<u32>,
    stats: Cell<NicStats>,
}

impl Rings {
    /// Rings over `area` (at least `abi::area_size(tx, rx)` bytes, 8-aligned, zeroed) and
    /// `bufs` (`(tx + rx) * buf_size` bytes).
    ///
    /// # Safety
    /// Both ranges must be valid for reads and writes for as long as the `Rings` (and the VMM)
    /// use them, and not be accessed otherwise except by the VMM through the ABI.
    pub(crate) unsafe fn new(
        area: NonNull<u8>,
        bufs: NonNull<u8>,
        tx_entries: u32,
        rx_entries: u32,
        buf_size: usize,
        max_frame: usize,
    ) -> Self {
        debug_assert!(tx_entries.is_power_of_two() && rx_entries.is_power_of_two());
        debug_assert!(max_frame <= buf_size);
        Self {
            area,
            bufs,
            tx_entries,
            rx_entries,
            buf_size,
            max_frame,
            tx_producer: Cell::new(0),
            tx_rung: Cell::new(0),
            rx_next: Cell::new(0),
            rx_producer: Cell::new(0),
            rx_lent: Cell::new(false),
            tx_free_bufs: RefCell::new((0..tx_entries).rev().collect()),
            tx_slot_buf: RefCell::new(alloc::vec![0; tx_entries as usize]),
            tx_reclaimed: Cell::new(0),
            stats: Cell::new(NicStats::default()),
        }
    }

    fn word(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset < abi::HEADER_SIZE as usize && offset.is_multiple_of(4));
        // SAFETY: `offset` is inside the header at the start of the area, which is 8-aligned and
        // valid for the life of `self` (see `new`); the VMM accesses these words atomically too.
        unsafe { &*self.area.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn tx_producer_word(&self) -> &AtomicU32 {
        self.word(0)
    }
    fn tx_consumer_word(&self) -> &AtomicU32 {
        self.word(4)
    }
    fn rx_producer_word(&self) -> &AtomicU32 {
        self.word(8)
    }
    fn rx_consumer_word(&self) -> &AtomicU32 {
        self.word(12)
    }
    fn rx_idle_word(&self) -> &AtomicU32 {
        self.word(16)
    }
    fn flags_word(&self) -> &AtomicU32 {
        self.word(20)
    }

    fn desc_ptr(&self, offset: u64) -> *mut NetDesc {
        // SAFETY: callers pass `tx_desc(slot)` / `rx_desc(.., slot)` with `slot` below the
        // entry count, so the descriptor lies inside the area (see `new`).
        unsafe { self.area.as_ptr().add(offset as usize).cast::<NetDesc>() }
    }

    /// TX buffer `slot` (`< tx_entries`) or the frame buffer of RX slot `slot` (`rx` set).
    fn buf_ptr(&self, rx: bool, slot: u32) -> *mut u8 {
        let index = if rx { self.tx_entries + slot } else { slot } as usize;
        debug_assert!(index < (self.tx_entries + self.rx_entries) as usize);
        // SAFETY: `index < tx_entries + rx_entries`, so the buffer lies inside `bufs`.
        unsafe { self.bufs.as_ptr().add(index * self.buf_size) }
    }

    /// The ring area's address (what `NET_SETUP` is given).
    pub(crate) fn area_addr(&self) -> u64 {
        self.area.as_ptr() as u64
    }

    pub(crate) fn entries(&self) -> (u32, u32) {
        (self.tx_entries, self.rx_entries)
    }

    pub(crate) fn max_frame(&self) -> usize {
        self.max_frame
    }

    pub(crate) fn stats(&self) -> NicStats {
        self.stats.get()
    }

    fn count(&self, f: impl FnOnce(&mut NicStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Zeroes the header and every index (before a `NET_SETUP`: the VMM starts from the
    /// producers it finds). Refused while a received frame is lent out.
    pub(crate) fn clear(&self) -> bool {
        if self.rx_lent.get() {
            return false;
        }
        for off in (0..abi::HEADER_SIZE as usize).step_by(4) {
            self.word(off).store(0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        self.tx_producer.set(0);
        self.tx_rung.set(0);
        self.rx_next.set(0);
        self.rx_producer.set(0);
        *self.tx_free_bufs.borrow_mut() = (0..self.tx_entries).rev().collect();
        self.tx_reclaimed.set(0);
        true
    }

    /// Takes back the buffers of frames the VMM has consumed (up to `consumer`). A consumer
    /// past our producer or behind what was taken back already (a VMM bug) is ignored.
    fn reclaim_tx(&self, consumer: u32) {
        let mut at = self.tx_reclaimed.get();
        let sent = self.tx_producer.get().wrapping_sub(at);
        if consumer.wrapping_sub(at) > sent {
            return;
        }
        let (mut free, map) = (self.tx_free_bufs.borrow_mut(), self.tx_slot_buf.borrow());
        while at != consumer {
            free.push(map[(at % self.tx_entries) as usize]);
            at = at.wrapping_add(1);
        }
        self.tx_reclaimed.set(at);
    }

    /// Posts every RX buffer (after `NET_SETUP`: buffers posted before it are not used).
    pub(crate) fn post_all(&self) {
        let missing = self
            .rx_entries
            .wrapping_sub(self.rx_producer.get().wrapping_sub(self.rx_next.get()));
        for _ in 0..missing {
            self.post_one();
        }
    }

    fn post_one(&self) {
        let index = self.rx_producer.get();
        let slot = index % self.rx_entries;
        let desc = NetDesc {
            addr: self.buf_ptr(true, slot) as u64,
            len: self.buf_size as u32,
            flags: 0,
        };
        // SAFETY: `slot < rx_entries`; the VMM reads this descriptor only after the release
        // store of the producer below.
        unsafe {
            core::ptr::write_volatile(self.desc_ptr(abi::rx_desc(self.tx_entries, slot)), desc)
        };
        let index = index.wrapping_add(1);
        self.rx_producer.set(index);
        self.rx_producer_word().store(index, Ordering::Release);
    }

    /// The VMM's flags ([`abi::RING_BROKEN`], [`abi::LINK_UP`]).
    pub(crate) fn flags(&self) -> u32 {
        self.flags_word().load(Ordering::Acquire)
    }

    pub(crate) fn broken(&self) -> bool {
        self.flags() & abi::RING_BROKEN != 0
    }

    /// TX slots free now (0 if the VMM's consumer index makes no sense).
    pub(crate) fn tx_free(&self) -> u32 {
        let consumer = self.tx_consumer_word().load(Ordering::Acquire);
        let in_flight = self.tx_producer.get().wrapping_sub(consumer);
        if in_flight > self.tx_entries {
            self.count(|s| s.bad_index += 1);
            return 0;
        }
        self.tx_entries - in_flight
    }

    /// Fills the next TX slot with `f` (given exactly `len` bytes) and queues it; without a
    /// free slot or with a length the VMM would refuse, `f` fills a scratch buffer and the
    /// frame is dropped (counted). Does not ring the doorbell.
    pub(crate) fn send_with<R>(
        &self,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> (Result<(), SendError>, R) {
        let check = if self.broken() {
            Err(SendError::Broken)
        } else if !(MIN_FRAME..=self.max_frame).contains(&len) {
            Err(SendError::BadLength)
        } else if self.tx_free() == 0 {
            Err(SendError::Full)
        } else {
            Ok(())
        };
        if let Err(e) = check {
            self.count(|s| s.tx_dropped += 1);
            let mut scratch = alloc::vec![0u8; len];
            return (Err(e), f(&mut scratch));
        }
        let index = self.tx_producer.get();
        let slot = index % self.tx_entries;
        self.reclaim_tx(self.tx_consumer_word().load(Ordering::Acquire));
        // A free slot means a free buffer: the pool holds every buffer not in flight.
        let Some(b) = self.tx_free_bufs.borrow_mut().pop() else {
            self.count(|s| s.tx_dropped += 1);
            let mut scratch = alloc::vec![0u8; len];
            return (Err(SendError::Full), f(&mut scratch));
        };
        self.tx_slot_buf.borrow_mut()[slot as usize] = b;
        let buf = self.buf_ptr(false, b);
        // SAFETY: buffer `b` is in no frame in flight (the VMM has taken every frame up to its
        // consumer, and the buffers of those frames are the only ones back in the pool),
        // `len <= max_frame <= buf_size`, and no other reference to it exists while `f` runs.
        let r = f(unsafe { core::slice::from_raw_parts_mut(buf, len) });
        let desc = NetDesc {
            addr: buf as u64,
            len: len as u32,
            flags: 0,
        };
        // SAFETY: `slot < tx_entries`; the VMM reads it after the release store below.
        unsafe { core::ptr::write_volatile(self.desc_ptr(abi::tx_desc(slot)), desc) };
        let index = index.wrapping_add(1);
        self.tx_producer.set(index);
        self.tx_producer_word().store(index, Ordering::Release);
        self.count(|s| s.tx_frames += 1);
        (Ok(()), r)
    }

    /// Whether frames were queued since the last doorbell; marks them rung.
    pub(crate) fn take_doorbell(&self) -> bool {
        let p = self.tx_producer.get();
        if p == self.tx_rung.get() {
            return false;
        }
        self.tx_rung.set(p);
        self.count(|s| s.doorbells += 1);
        true
    }

    /// Frames the VMM has delivered that were not taken yet (0 if its index makes no sense).
    fn rx_available(&self) -> u32 {
        let consumer = self.rx_consumer_word().load(Ordering::Acquire);
        let n = consumer.wrapping_sub(self.rx_next.get());
        // The VMM fills only posted buffers: never more than a ring's worth, never past our
        // producer.
        if n > self.rx_entries || n > self.rx_producer.get().wrapping_sub(self.rx_next.get()) {
            self.count(|s| s.bad_index += 1);
            return 0;
        }
        n
    }

    /// Whether a received frame is waiting.
    pub(crate) fn rx_ready(&self) -> bool {
        !self.rx_lent.get() && self.rx_available() > 0
    }

    /// Takes the next received frame: (slot, length). Frames with a bad length are dropped
    /// and their buffers re-posted. None if nothing waits or a frame is already lent out.
    pub(crate) fn take_rx(&self) -> Option<(u32, usize)> {
        if self.rx_lent.get() {
            return None;
        }
        while self.rx_available() > 0 {
            let index = self.rx_next.get();
            let slot = index % self.rx_entries;
            // SAFETY: `slot < rx_entries`; the VMM wrote the descriptor before its release
            // store of the consumer, which `rx_available` loaded with acquire.
            let desc = unsafe {
                core::ptr::read_volatile(self.desc_ptr(abi::rx_desc(self.tx_entries, slot)))
            };
            self.rx_next.set(index.wrapping_add(1));
            let len = desc.len as usize;
            if len > self.buf_size {
                self.count(|s| s.rx_bad_len += 1);
                self.post_one();
                continue;
            }
            if len < MIN_FRAME {
                self.count(|s| s.rx_runts += 1);
                self.post_one();
                continue;
            }
            self.rx_lent.set(true);
            self.count(|s| s.rx_frames += 1);
            return Some((slot, len));
        }
        None
    }

    /// The bytes of a frame [`take_rx`](Self::take_rx) returned.
    ///
    /// # Safety
    /// `(slot, len)` must come from `take_rx` and not have been returned with
    /// [`return_rx`](Self::return_rx) yet; the slice must be dropped before that.
    pub(crate) unsafe fn rx_bytes(&self, slot: u32, len: usize) -> &[u8] {
        debug_assert!(self.rx_lent.get() && slot < self.rx_entries && len <= self.buf_size);
        // SAFETY: the buffer is ours until re-posted (the caller's contract), `len` was checked
        // against the buffer size in `take_rx`.
        unsafe { core::slice::from_raw_parts(self.buf_ptr(true, slot), len) }
    }

    /// Gives a taken frame's buffer back to the VMM.
    pub(crate) fn return_rx(&self) {
        if self.rx_lent.replace(false) {
            self.post_one();
        }
    }

    /// Says whether this NIC's vCPU is about to block (1: wake it for received frames). The
    /// store is sequentially consistent, so a check of the RX ring that follows it cannot be
    /// ordered before it: a frame delivered in between is either seen or wakes the vCPU.
    pub(crate) fn set_idle(&self, idle: bool) {
        if idle {
            self.rx_idle_word().store(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
        } else {
            self.rx_idle_word().store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    /// Rings over host memory, and the VMM's half, simulated.
    pub(crate) struct Sim {
        pub(crate) rings: Rings,
        /// The memory the rings point into.
        _area: Vec<u64>,
        bufs: Vec<u64>,
        tx: u32,
        rx: u32,
        vmm_tx: u32,
        vmm_rx: u32,
    }

    impl Sim {
        pub(crate) fn new(tx: u32, rx: u32) -> Box<Sim> {
            let mut area = vec![0u64; abi::area_size(tx, rx) as usize / 8];
            let mut bufs = vec![0u64; (tx + rx) as usize * 2048 / 8];
            let a = NonNull::new(area.as_mut_ptr().cast::<u8>()).unwrap();
            let b = NonNull::new(bufs.as_mut_ptr().cast::<u8>()).unwrap();
            // SAFETY: the vectors live in the same box as the rings and are never resized.
            let rings = unsafe { Rings::new(a, b, tx, rx, 2048, 1518) };
            let s = Box::new(Sim {
                rings,
                _area: area,
                bufs,
                tx,
                rx,
                vmm_tx: 0,
                vmm_rx: 0,
            });
            s.rings.post_all();
            s
        }

        fn word(&self, off: usize) -> u32 {
            self.rings.word(off).load(Ordering::SeqCst)
        }

        fn set_word(&self, off: usize, v: u32) {
            self.rings.word(off).store(v, Ordering::SeqCst);
        }

        fn desc(&self, off: u64) -> NetDesc {
            // SAFETY: test helper over the simulated area.
            unsafe { core::ptr::read_volatile(self.rings.desc_ptr(off)) }
        }

        fn in_bufs(&self, addr: u64, len: usize) -> bool {
            let start = self.bufs.as_ptr() as u64;
            addr >= start && addr + len as u64 <= start + (self.bufs.len() * 8) as u64
        }

        /// The VMM takes every queued TX frame; returns them.
        pub(crate) fn vmm_take_tx(&mut self) -> Vec<Vec<u8>> {
            let p = self.word(0);
            let mut out = Vec::new();
            while self.vmm_tx != p {
                let d = self.desc(abi::tx_desc(self.vmm_tx % self.tx));
                assert!(
                    self.in_bufs(d.addr, d.len as usize),
                    "TX descriptor outside buffers"
                );
                // SAFETY: checked to lie inside the test's buffers.
                let f = unsafe { core::slice::from_raw_parts(d.addr as *const u8, d.len as usize) };
                out.push(f.to_vec());
                self.vmm_tx = self.vmm_tx.wrapping_add(1);
            }
            self.set_word(4, self.vmm_tx);
            out
        }

        /// The VMM delivers a frame (or a descriptor with `len` of its own choosing); false if
        /// no buffer is posted.
        pub(crate) fn vmm_deliver(&mut self, frame: &[u8], len_override: Option<u32>) -> bool {
            let p = self.word(8);
            if p == self.vmm_rx {
                return false;
            }
            let off = abi::rx_desc(self.tx, self.vmm_rx % self.rx);
            let mut d = self.desc(off);
            assert!(
                self.in_bufs(d.addr, d.len as usize),
                "RX descriptor outside buffers"
            );
            assert!(frame.len() <= d.len as usize);
            // SAFETY: checked to lie inside the test's buffers.
            unsafe {
                core::ptr::copy_nonoverlapping(frame.as_ptr(), d.addr as *mut u8, frame.len())
            };
            d.len = len_override.unwrap_or(frame.len() as u32);
            // SAFETY: inside the simulated area.
            unsafe { core::ptr::write_volatile(self.rings.desc_ptr(off), d) };
            self.vmm_rx = self.vmm_rx.wrapping_add(1);
            self.set_word(12, self.vmm_rx);
            true
        }

        pub(crate) fn rx_idle(&self) -> u32 {
            self.word(16)
        }

        pub(crate) fn set_flags(&self, f: u32) {
            self.set_word(20, f);
        }

        pub(crate) fn set_consumers(&self, tx: u32, rx: u32) {
            self.set_word(4, tx);
            self.set_word(12, rx);
        }
    }

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        vec![tag; len]
    }

    fn send(r: &Rings, f: &[u8]) -> Result<(), SendError> {
        r.send_with(f.len(), |b| b.copy_from_slice(f)).0
    }

    fn recv(r: &Rings) -> Option<Vec<u8>> {
        let (slot, len) = r.take_rx()?;
        // SAFETY: just taken, returned below.
        let v = unsafe { r.rx_bytes(slot, len) }.to_vec();
        r.return_rx();
        Some(v)
    }

    #[test]
    fn frames_round_trip_and_buffers_are_reused() {
        let mut s = Sim::new(4, 4);
        for round in 0..5u8 {
            for i in 0..4 {
                assert_eq!(
                    send(&s.rings, &frame(round * 10 + i, 60 + i as usize)),
                    Ok(())
                );
            }
            assert_eq!(send(&s.rings, &frame(99, 60)), Err(SendError::Full));
            assert!(s.rings.take_doorbell());
            assert!(!s.rings.take_doorbell(), "one doorbell per batch");
            let out = s.vmm_take_tx();
            assert_eq!(out.len(), 4);
            assert_eq!(out[3], frame(round * 10 + 3, 63));
            for i in 0..4 {
                assert!(s.vmm_deliver(&frame(i, 100 + i as usize), None));
            }
            assert!(
                !s.vmm_deliver(&frame(9, 64), None),
                "only posted buffers are filled"
            );
            for i in 0..4 {
                assert_eq!(recv(&s.rings), Some(frame(i, 100 + i as usize)));
            }
            assert_eq!(recv(&s.rings), None);
        }
        let st = s.rings.stats();
        assert_eq!((st.tx_frames, st.rx_frames, st.tx_dropped), (20, 20, 5));
    }

    #[test]
    fn frames_taken_at_once_reuse_one_tx_buffer_and_in_flight_ones_never_share() {
        let mut s = Sim::new(8, 4);
        let addr = |s: &Sim, slot: u32| s.desc(abi::tx_desc(slot)).addr;
        // The VMM takes each frame before the next is queued: every slot gets one buffer.
        let mut seen = Vec::new();
        for i in 0..20u8 {
            assert_eq!(send(&s.rings, &frame(i, 60)), Ok(()));
            seen.push(addr(&s, u32::from(i) % 8));
            assert_eq!(s.vmm_take_tx(), vec![frame(i, 60)]);
        }
        assert!(seen.iter().all(|a| *a == seen[0]), "{seen:x?}");
        // Frames in flight at once are in distinct buffers, and come out intact.
        for i in 0..8u8 {
            assert_eq!(send(&s.rings, &frame(100 + i, 70)), Ok(()));
        }
        let mut inflight: Vec<u64> = (0..8).map(|slot| addr(&s, slot)).collect();
        inflight.sort_unstable();
        inflight.dedup();
        assert_eq!(inflight.len(), 8);
        let out = s.vmm_take_tx();
        assert_eq!(
            out,
            (0..8u8).map(|i| frame(100 + i, 70)).collect::<Vec<_>>()
        );
        // A consumer the VMM moved past our producer takes nothing back.
        s.set_consumers(1000, 0);
        assert_eq!(send(&s.rings, &frame(1, 60)), Err(SendError::Full));
    }

    #[test]
    fn lengths_and_indices_from_the_vmm_are_checked() {
        let mut s = Sim::new(4, 4);
        // A length past the buffer and a runt are dropped, their buffers posted again.
        assert!(s.vmm_deliver(&frame(1, 64), Some(1 << 20)));
        assert!(s.vmm_deliver(&frame(2, 64), Some(3)));
        assert!(s.vmm_deliver(&frame(3, 64), None));
        assert_eq!(recv(&s.rings), Some(frame(3, 64)));
        let st = s.rings.stats();
        assert_eq!((st.rx_bad_len, st.rx_runts, st.rx_frames), (1, 1, 1));
        // Consumers far ahead are ignored, not followed.
        s.set_consumers(1000, 1000);
        assert_eq!(s.rings.tx_free(), 0);
        assert!(!s.rings.rx_ready());
        assert_eq!(recv(&s.rings), None);
        assert!(s.rings.stats().bad_index >= 2);
        s.set_consumers(0, 3);
        assert_eq!(s.rings.tx_free(), 4);
        // Lengths the VMM would refuse never reach the ring.
        assert_eq!(send(&s.rings, &frame(0, 13)), Err(SendError::BadLength));
        assert_eq!(send(&s.rings, &frame(0, 1519)), Err(SendError::BadLength));
        assert_eq!(send(&s.rings, &frame(0, 1518)), Ok(()));
        s.set_flags(abi::RING_BROKEN);
        assert!(s.rings.broken());
        assert_eq!(send(&s.rings, &frame(0, 60)), Err(SendError::Broken));
    }

    #[test]
    fn idle_flag_and_lent_frames() {
        let mut s = Sim::new(2, 2);
        s.rings.set_idle(true);
        assert_eq!(s.rx_idle(), 1);
        s.rings.set_idle(false);
        assert_eq!(s.rx_idle(), 0);
        assert!(s.vmm_deliver(&frame(1, 60), None));
        assert!(s.vmm_deliver(&frame(2, 60), None));
        let (slot, len) = s.rings.take_rx().unwrap();
        assert_eq!((slot, len), (0, 60));
        assert!(s.rings.take_rx().is_none(), "one frame lent at a time");
        assert!(!s.rings.clear(), "no reset while a frame is lent");
        s.rings.return_rx();
        assert_eq!(recv(&s.rings), Some(frame(2, 60)));
        assert!(s.rings.clear());
        s.rings.post_all();
        assert_eq!(s.word(8), 2);
    }
}
