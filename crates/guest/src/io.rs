//! The asynchronous I/O ring: disk reads and writes, flushes and timers, completed by the VMM
//! through a completion indicator in guest memory (no interrupt, no exit to wait).
//!
//! Submitting rings a doorbell port backed by an ioeventfd: the kernel absorbs it (~3 us)
//! without returning to the VMM's vCPU thread. A VMM I/O thread performs the request and
//! stores the result into the request's indicator.

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
/// its memory), so it is handed out as `&'static`.
pub struct IoQueue {
    ring: NonNull<u8>,
    entries: u32,
    vcpu: u32,
}

impl IoQueue {
    /// Allocates a ring of `entries` requests (a power of two) and registers it for this vCPU.
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

    /// Reads `buf.len()` bytes of the disk at `offset` into `buf`.
    pub fn read(&'static self, offset: u64, buf: Vec<u8>) -> IoOp {
        self.op(io::OP_READ, offset, buf)
    }

    /// Writes `buf` to the disk at `offset`.
    pub fn write(&'static self, offset: u64, buf: Vec<u8>) -> IoOp {
        self.op(io::OP_WRITE, offset, buf)
    }

    /// Makes earlier writes durable.
    pub fn flush(&'static self) -> IoOp {
        self.op(io::OP_FLUSH, 0, Vec::new())
    }

    /// Completes after `ns` nanoseconds: a sleep with no exit and no interrupt.
    pub fn sleep(&'static self, ns: u64) -> IoOp {
        self.op(io::OP_TIMER, ns, Vec::new())
    }
}

/// Submits a request exactly as given, spinning until the ring has room. For tests that need
/// requests the safe API cannot express (bad ops, buffers the guest does not own); the caller
/// keeps the completion indicator alive and valid.
pub fn submit_raw(queue: &IoQueue, req: IoRequest) {
    while !queue.try_submit(req) {
        core::hint::spin_loop();
    }
}

/// An I/O in flight. Resolves to the result (bytes transferred) and the buffer.
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
