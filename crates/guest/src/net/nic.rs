//! A network interface (ABI 1.4): its rings and frame buffers allocated from the heap and
//! registered with `NET_SETUP`, frames sent in batches (one doorbell per batch) and received
//! without an interrupt.

use core::alloc::Layout;
use core::arch::asm;
use core::ops::Deref;
use core::ptr::NonNull;

use rebound_abi::net::{self as abi, FRAME_OVERHEAD, LINK_UP, MAX_ENTRIES, NicInfo};
use rebound_abi::{errno, nr, port};

use super::ring::{NicStats, Rings, SendError};
use crate::hypercall::{self, Errno};

/// One network interface, set up for this vCPU.
///
/// Its rings and buffers stay registered with the VMM, which may write them at any time:
/// they are never freed, even when the `Nic` is dropped. Set each NIC up once: a second
/// [`setup`](Self::setup) of the same index replaces the first one's rings in the VMM, which
/// then never moves a frame for the first `Nic` again.
///
/// Most guests hand it to a [`Stack`](super::Stack) and use TCP; the methods below are for
/// guests that move Ethernet frames themselves.
pub struct Nic {
    index: u32,
    info: NicInfo,
    rings: Rings,
}

/// The NICs the VMM described at boot (MAC address, MTU), indexed as [`Nic::setup`] takes
/// them. Empty when the VM has no network interface.
pub fn nics() -> &'static [NicInfo] {
    let b = crate::Cpu::current(0).boot_info();
    &b.nics[..(b.nic_count as usize).min(abi::MAX_NICS)]
}

/// Bytes of frame buffer per slot: room for the largest frame, a power of two up to a page
/// (so no frame straddles a page), whole pages above.
fn buffer_size(max_frame: usize) -> usize {
    if max_frame <= 4096 {
        max_frame.next_power_of_two().max(64)
    } else {
        max_frame.next_multiple_of(4096)
    }
}

fn alloc_zeroed(size: usize) -> Result<NonNull<u8>, Errno> {
    let layout = Layout::from_size_align(size, 4096).map_err(|_| Errno(errno::EINVAL))?;
    // SAFETY: the size is non-zero (callers pass ring and buffer sizes of at least a header).
    NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) }).ok_or(Errno(errno::E2BIG))
}

fn free(p: NonNull<u8>, size: usize) {
    if let Ok(layout) = Layout::from_size_align(size, 4096) {
        // SAFETY: allocated by `alloc_zeroed` with this layout and not shared with the VMM.
        unsafe { alloc::alloc::dealloc(p.as_ptr(), layout) };
    }
}

impl Nic {
    /// Sets up NIC `index` (0 for the first; see [`nics`]) with rings of `tx_entries` and
    /// `rx_entries` frames (powers of two, 1 to 4096): allocates the ring area (page-aligned)
    /// and one frame buffer per slot from the heap, registers them with `NET_SETUP` (this vCPU
    /// is the one woken for received frames), then posts every RX buffer.
    ///
    /// Memory: a buffer per slot of the largest frame rounded up to a power of two (2 KiB for
    /// the default MTU of 1500), so 256 + 256 entries take 1 MiB of heap, for good.
    ///
    /// Errors: `ENODEV` if the VM has no NIC `index` (no network interface configured);
    /// `EINVAL` for bad entry counts; `E2BIG` if the heap has no room. (The VMM's own `EINVAL`
    /// and `EFAULT`, for a misplaced ring area, cannot happen with the heap's memory.)
    pub fn setup(index: u32, tx_entries: u32, rx_entries: u32) -> Result<Nic, Errno> {
        let info = *nics().get(index as usize).ok_or(Errno(errno::ENODEV))?;
        let entries_ok = |e: u32| e.is_power_of_two() && e <= MAX_ENTRIES;
        if !entries_ok(tx_entries) || !entries_ok(rx_entries) {
            return Err(Errno(errno::EINVAL));
        }
        let max_frame = usize::from(info.mtu) + FRAME_OVERHEAD as usize;
        let buf_size = buffer_size(max_frame);
        let area_size = abi::area_size(tx_entries, rx_entries) as usize;
        let bufs_size = (tx_entries + rx_entries) as usize * buf_size;
        let area = alloc_zeroed(area_size)?;
        let bufs = match alloc_zeroed(bufs_size) {
            Ok(b) => b,
            Err(e) => {
                free(area, area_size);
                return Err(e);
            }
        };
        // SAFETY: both allocations are ours, sized as `Rings::new` needs, and never freed once
        // registered (the VMM keeps the right to write them).
        let rings = unsafe { Rings::new(area, bufs, tx_entries, rx_entries, buf_size, max_frame) };
        let nic = Nic { index, info, rings };
        if let Err(e) = nic.register() {
            // Not registered: the VMM never uses this memory.
            free(area, area_size);
            free(bufs, bufs_size);
            return Err(e);
        }
        Ok(nic)
    }

    fn register(&self) -> Result<(), Errno> {
        // SAFETY: the VMM's page gives this vCPU's id.
        let vcpu = unsafe { (*hypercall::vcpu_page()).vcpu_id };
        let (tx, rx) = self.rings.entries();
        hypercall::call(
            nr::NET_SETUP,
            &[
                u64::from(self.index),
                self.rings.area_addr(),
                u64::from(tx),
                u64::from(rx),
                vcpu,
            ],
        )?;
        // The VMM starts from the producers it found (zero): post the buffers now.
        self.rings.post_all();
        Ok(())
    }

    /// Sets the rings up again from scratch (after the VMM marked them broken): queued and
    /// received frames are lost. `EBUSY` while a received frame ([`RxFrame`]) is lent out;
    /// otherwise the errors of `NET_SETUP` (none expected).
    pub fn reset(&self) -> Result<(), Errno> {
        if !self.rings.clear() {
            return Err(Errno(errno::EBUSY));
        }
        self.register()
    }

    /// Guest address of the ring area registered with the VMM (for diagnostics and tests
    /// that damage it on purpose).
    pub fn ring_area(&self) -> u64 {
        self.rings.area_addr()
    }

    /// Its index among the VM's NICs.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Its MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.info.mac
    }

    /// Its MTU (bytes of IP packet per frame).
    pub fn mtu(&self) -> u16 {
        self.info.mtu
    }

    /// Largest frame it carries (MTU plus Ethernet header and a VLAN tag).
    pub fn max_frame(&self) -> usize {
        self.rings.max_frame()
    }

    /// Whether the VMM found the rings corrupt and stopped using them (`RING_BROKEN`): no
    /// frame moves until [`reset`](Self::reset).
    pub fn broken(&self) -> bool {
        self.rings.broken()
    }

    /// Whether the host side has a working path.
    pub fn link_up(&self) -> bool {
        self.rings.flags() & LINK_UP != 0
    }

    /// Counters of frames sent, received and dropped on the guest's side.
    pub fn stats(&self) -> NicStats {
        self.rings.stats()
    }

    /// TX slots free now.
    pub fn tx_free(&self) -> u32 {
        self.rings.tx_free()
    }

    /// Queues a copy of `frame`, a whole Ethernet frame (not sent until
    /// [`flush`](Self::flush)). Errors ([`SendError`], the frame is dropped and counted):
    /// `Full` (no free TX slot), `BadLength` (shorter than 14 bytes or longer than
    /// [`max_frame`](Self::max_frame)), `Broken` (the VMM stopped using the rings).
    pub fn send(&self, frame: &[u8]) -> Result<(), SendError> {
        self.rings
            .send_with(frame.len(), |b| b.copy_from_slice(frame))
            .0
    }

    /// Queues a frame of `len` bytes that `f` writes in place (no copy); without room (or with
    /// a bad length) `f` writes a scratch buffer and the frame is dropped. Returns whether it
    /// was queued (the errors of [`send`](Self::send)) and what `f` returned.
    pub fn send_with<R>(
        &self,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> (Result<(), SendError>, R) {
        self.rings.send_with(len, f)
    }

    /// Rings the doorbell if frames were queued since the last time: one doorbell (an
    /// ioeventfd, no exit) per batch.
    pub fn flush(&self) {
        if self.rings.take_doorbell() {
            // SAFETY: an `out` to the NIC doorbell port; the kernel signals the VMM's eventfd.
            unsafe {
                asm!("out dx, eax", in("dx") port::NET_DOORBELL, in("eax") self.index,
                     options(nostack, preserves_flags))
            };
        }
    }

    /// Frames queued that the VMM has not taken yet.
    pub fn tx_in_flight(&self) -> u32 {
        self.rings.entries().0 - self.rings.tx_free()
    }

    /// Rings the doorbell and waits up to `timeout_ns` nanoseconds until the VMM has taken
    /// every queued frame (it does not wake the vCPU for that: this blocks in 50 us steps).
    /// Call it before exiting: frames still queued when the VM ends are never sent. Returns
    /// whether all were taken (`false` on timeout or broken rings).
    pub fn drain_tx(&self, timeout_ns: u64) -> bool {
        self.flush();
        let start = crate::time::monotonic_ns();
        while self.tx_in_flight() > 0 && !self.broken() {
            if crate::time::monotonic_ns().saturating_sub(start) >= timeout_ns {
                return false;
            }
            hypercall::block(50_000);
        }
        self.tx_in_flight() == 0
    }

    /// Whether a received frame is waiting.
    pub fn rx_ready(&self) -> bool {
        self.rings.rx_ready()
    }

    /// The next received frame (a whole Ethernet frame); its buffer goes back to the VMM when
    /// it is dropped. None when nothing has arrived, and while another frame is held (one at a
    /// time).
    pub fn recv(&self) -> Option<RxFrame<'_>> {
        let (slot, len) = self.rings.take_rx()?;
        Some(RxFrame {
            rings: &self.rings,
            slot,
            len,
        })
    }

    /// Before blocking (`true`): ask the VMM for a wake-up when frames arrive, then look at
    /// [`rx_ready`](Self::rx_ready) once more. After (`false`).
    pub fn set_idle(&self, idle: bool) {
        self.rings.set_idle(idle);
    }
}

/// A received frame, lent by its [`Nic`]: derefs to the frame's bytes. Drop it soon: its
/// buffer is posted to the VMM again only then, and the NIC lends one frame at a time.
pub struct RxFrame<'a> {
    rings: &'a Rings,
    slot: u32,
    len: usize,
}

impl Deref for RxFrame<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: taken from the rings and not returned before this frame is dropped; the
        // slice borrows `self`, so it cannot outlive the frame.
        unsafe { self.rings.rx_bytes(self.slot, self.len) }
    }
}

impl Drop for RxFrame<'_> {
    fn drop(&mut self) {
        self.rings.return_rx();
    }
}

#[cfg(test)]
mod tests {
    use super::buffer_size;

    #[test]
    fn buffers_fit_the_largest_frame_without_straddling_pages() {
        assert_eq!(buffer_size(1518), 2048);
        assert_eq!(buffer_size(86), 128);
        assert_eq!(buffer_size(4096), 4096);
        assert_eq!(buffer_size(9018), 12288);
    }
}
