//! The asynchronous I/O ring: disk reads and writes, flushes and timers, completed by the VMM
//! through a completion indicator in guest memory (no interrupt, no exit to wait).
//!
//! Submitting rings a doorbell port backed by an ioeventfd: the kernel absorbs it (~3 us)
//! without returning to the VMM's vCPU thread. A VMM I/O thread performs the request and
//! stores the result into the request's indicator.
//!
//! Each vCPU that does I/O sets up its own ring once ([`IoQueue::setup`]); its operations are
//! futures for [`Dispatcher`](crate::dispatch::Dispatcher) tasks. The disk is the one given to
//! `rebound run --disk PATH` (`--disk-read-only` refuses writes) or `--scratch-disk-mib N`;
//! its size is [`Cpu::disk_size`](crate::Cpu::disk_size). Without a disk, the ring still
//! works: reads, writes and flushes complete with `ENODEV`, timers as usual.
//!
//! Disk requests are in bytes but whole sectors
//! ([`SECTOR_SIZE`](rebound_abi::io::SECTOR_SIZE), 512): the offset and the buffer's length
//! are multiples of 512, the length is 512 bytes to
//! [`MAX_TRANSFER`](rebound_abi::io::MAX_TRANSFER) (1 MiB), and the range lies within the disk.
//!
//! | Operation | Resolves to | Errors |
//! |---|---|---|
//! | [`read`](IoQueue::read) | `Ok(len)`, the buffer filled | `ENODEV` no disk; `EINVAL` bad offset or length, past the end; `EIO` host read failed |
//! | [`write`](IoQueue::write) | `Ok(len)` | `ENODEV`; `EINVAL` as for read; `EROFS` read-only disk; `EIO` host write failed; `EAGAIN` too many writes wait for a checkpoint (protected VM) |
//! | [`flush`](IoQueue::flush) | `Ok(0)` | `ENODEV`; `EIO` host `fdatasync` failed |
//! | [`sleep`](IoQueue::sleep) | `Ok(0)` | `EBUSY`: the VMM already holds 65 536 pending timers |
//!
//! (`EFAULT`, for a buffer outside the guest's writable memory, cannot happen with the `Vec`s
//! the safe API takes.)
//!
//! ```no_run
//! use alloc::vec;
//! # extern crate alloc;
//! use rebound_guest::dispatch::Dispatcher;
//! use rebound_guest::io::IoQueue;
//! use rebound_guest::println;
//!
//! let q = IoQueue::setup(64).expect("I/O ring");
//! let mut d = Dispatcher::new();
//! d.spawn(async move {
//!     // Sector 8 (byte offset 4096), one 4 KiB block.
//!     let (r, buf) = q.read(8 * 512, vec![0u8; 4096]).await;
//!     match r {
//!         Ok(n) => println!("read {n} bytes, first {:#x}", buf[0]),
//!         Err(e) => println!("read failed: {e}"), // e.g. ENODEV (-19) without a disk
//!     }
//!     let (r, _) = q.sleep(10_000_000).await; // 10 ms
//!     assert_eq!(r, Ok(0));
//! });
//! d.run();
//! ```

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::arch::asm;
use core::future::Future;
use core::pin::Pin;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use core::task::{Context, Poll};

use rebound_abi::io::{self, IoRequest};
use rebound_abi::{completion, errno, nr, port};

use crate::dispatch::{Indicator, wait_for};
use crate::hypercall::{self, Errno};

/// One vCPU's I/O ring, registered with the VMM. Lives as long as the VM (the VMM keeps using
/// its memory), so it is handed out as `&'static`. It belongs to the vCPU that set it up: its
/// completions wake that vCPU (the type is neither `Send` nor `Sync`).
pub struct IoQueue {
    ring: NonNull<u8>,
    entries: u32,
    vcpu: u32,
}

impl IoQueue {
    /// Allocates a ring of `entries` requests (a power of two, 1 to
    /// [`MAX_ENTRIES`](rebound_abi::io::MAX_ENTRIES) = 4096) from the heap and registers it for
    /// this vCPU (`IO_SETUP`). `entries` bounds the requests in flight at once; more wait for
    /// room. The ring's memory (8 + 32 × `entries` bytes) is never freed.
    ///
    /// Errors: `EINVAL` for a bad `entries`; `E2BIG` if the heap has no room; `EBUSY` if this
    /// vCPU already has a ring (set up once per vCPU, keep the reference). It works without a
    /// disk: timers need none, disk requests then complete with `ENODEV`.
    pub fn setup(entries: u32) -> Result<&'static IoQueue, Errno> {
        if !entries.is_power_of_two() || entries > io::MAX_ENTRIES {
            return Err(Errno(errno::EINVAL));
        }
        let layout = Layout::from_size_align(io::ring_size(entries) as usize, 4096)
            .map_err(|_| Errno(errno::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ring = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })
            .ok_or(Errno(errno::E2BIG))?;
        if let Err(e) = hypercall::call(nr::IO_SETUP, &[ring.as_ptr() as u64, u64::from(entries)]) {
            // SAFETY: allocated above with this layout and never shared with the VMM.
            unsafe { alloc::alloc::dealloc(ring.as_ptr(), layout) };
            return Err(e);
        }
        // SAFETY: the VMM's page gives this vCPU's id.
        let vcpu = unsafe { (*hypercall::vcpu_page()).vcpu_id } as u32;
        Ok(alloc::boxed::Box::leak(alloc::boxed::Box::new(IoQueue {
            ring,
            entries,
            vcpu,
        })))
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: the ring starts with the 4-aligned header; the field is only written by us.
        unsafe { &*self.ring.as_ptr().cast::<AtomicU32>() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: second header word, written by the VMM, read atomically here.
        unsafe { &*self.ring.as_ptr().add(4).cast::<AtomicU32>() }
    }

    /// Puts `req` on the ring and rings the doorbell; `false` if the ring is full.
    fn try_submit(&self, req: IoRequest) -> bool {
        let p = self.producer().load(Ordering::Relaxed);
        if p.wrapping_sub(self.consumer().load(Ordering::Acquire)) >= self.entries {
            return false;
        }
        let slot = (p % self.entries) as usize;
        // SAFETY: `slot < entries`, so the request lies inside the ring allocation; the VMM
        // reads it only after seeing the new producer value (release below).
        unsafe {
            let at = self
                .ring
                .as_ptr()
                .add(io::HEADER_SIZE as usize)
                .cast::<IoRequest>()
                .add(slot);
            core::ptr::write_volatile(at, req);
        }
        self.producer().store(p.wrapping_add(1), Ordering::Release);
        self.doorbell();
        true
    }

    fn doorbell(&self) {
        // SAFETY: an `out` to the doorbell port; the kernel signals the VMM's eventfd.
        unsafe {
            asm!("out dx, eax", in("dx") port::DOORBELL, in("eax") self.vcpu, options(nostack, preserves_flags))
        };
    }

    fn op(&'static self, op: u32, offset: u64, buf: Vec<u8>) -> IoOp {
        IoOp {
            queue: self,
            req: IoRequest {
                op,
                len: buf.len() as u32,
                buf: buf.as_ptr() as u64,
                offset,
                completion: 0,
            },
            buf: Some(buf),
            indicator: Arc::new(AtomicU64::new(0)),
            submitted: false,
        }
    }

    /// Reads `buf.len()` bytes of the disk, starting `offset` bytes into it, into `buf`.
    ///
    /// Both are multiples of 512; the length is 512 to 1 MiB. Resolves to `(Ok(len), buf)`
    /// with the data, or to an error with `buf` unchanged: `ENODEV` (no disk), `EINVAL` (an
    /// offset or length that is not a multiple of 512, an empty or longer than 1 MiB buffer, a
    /// range past the end of the disk), `EIO` (the host's read failed).
    ///
    /// Nothing happens until the future is first polled (awaited).
    pub fn read(&'static self, offset: u64, buf: Vec<u8>) -> IoOp {
        self.op(io::OP_READ, offset, buf)
    }

    /// Writes `buf` to the disk, starting `offset` bytes into it; the buffer comes back.
    ///
    /// Same sizes as [`read`](Self::read). Resolves to `(Ok(len), buf)` once the host wrote
    /// the data to the disk file (durable after a [`flush`](Self::flush)), or to an error:
    /// `ENODEV` (no disk), `EINVAL` (as for `read`), `EROFS` (a disk given with
    /// `--disk-read-only`), `EIO` (the host's write failed), `EAGAIN` (ABI 1.6: the VM runs
    /// protected and 64 MiB of its writes already wait for their checkpoint; try again after
    /// the next one, a few milliseconds later).
    ///
    /// While the VM runs protected, a write is held (and journaled, with a state directory)
    /// until the checkpoint after it is safe: reads see it at once, the disk file gets it then,
    /// and a rollback drops it, so the disk never holds a write the VM's memory has undone.
    ///
    /// Nothing happens until the future is first polled (awaited). Requests of one ring are
    /// performed in order.
    pub fn write(&'static self, offset: u64, buf: Vec<u8>) -> IoOp {
        self.op(io::OP_WRITE, offset, buf)
    }

    /// Makes the writes completed before it durable on the host (`fdatasync` of the disk
    /// file). Resolves to `(Ok(0), empty Vec)`, or `ENODEV` (no disk), `EIO` (the sync
    /// failed).
    pub fn flush(&'static self) -> IoOp {
        self.op(io::OP_FLUSH, 0, Vec::new())
    }

    /// Completes after at least `ns` nanoseconds: a sleep with no exit and no interrupt (the
    /// dispatcher blocks the vCPU meanwhile if nothing else can run). Needs no disk. Resolves
    /// to `(Ok(0), empty Vec)`, or `EBUSY` if the VMM already holds 65 536 pending timers (all
    /// vCPUs together). A pending timer survives a snapshot with the time it had left.
    pub fn sleep(&'static self, ns: u64) -> IoOp {
        self.op(io::OP_TIMER, ns, Vec::new())
    }
}

/// Submits a request exactly as given, spinning until the ring has room. For tests that need
/// requests the safe API cannot express (bad ops, buffers the guest does not own); the caller
/// keeps the completion indicator alive and valid. The VMM completes a request with an unknown
/// `op` with `EINVAL` (`ENODEV` without a disk); one whose indicator is not 8-byte aligned
/// guest-writable memory is dropped (never completed).
pub fn submit_raw(queue: &IoQueue, req: IoRequest) {
    while !queue.try_submit(req) {
        core::hint::spin_loop();
    }
}

/// An I/O request, made by [`IoQueue`]'s methods. Put on the ring when first polled; resolves
/// to `(Result<u32, Errno>, Vec<u8>)`: the bytes transferred (0 for flushes and timers) or the
/// error, and the buffer the request was given (empty for flushes and timers).
///
/// Dropping an unfinished `IoOp` leaks its buffer and indicator: the VMM may still write them.
pub struct IoOp {
    queue: &'static IoQueue,
    req: IoRequest,
    buf: Option<Vec<u8>>,
    indicator: Arc<Indicator>,
    submitted: bool,
}

impl Future for IoOp {
    type Output = (Result<u32, Errno>, Vec<u8>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.submitted {
            let req = IoRequest {
                completion: Arc::as_ptr(&self.indicator) as u64,
                ..self.req
            };
            if !self.queue.try_submit(req) {
                // Ring full: the VMM drains it quickly; try again on the next pass.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.submitted = true;
        }
        match completion::decode(self.indicator.load(Ordering::Acquire)) {
            Some(r) => {
                let buf = self.buf.take().unwrap_or_default();
                let result = if r < 0 {
                    Err(Errno(i64::from(r)))
                } else {
                    Ok(r as u32)
                };
                Poll::Ready((result, buf))
            }
            None => {
                wait_for(cx, &self.indicator);
                Poll::Pending
            }
        }
    }
}

impl Drop for IoOp {
    fn drop(&mut self) {
        let done = completion::decode(self.indicator.load(Ordering::Acquire)).is_some();
        if self.submitted && !done {
            core::mem::forget(self.buf.take());
            core::mem::forget(Arc::clone(&self.indicator));
        }
    }
}
