//! Nested guests (ABI 1.10): this guest as a VMM of its own guests.
//!
//! A [`NestedVm`] is an SDK guest that Rebound runs for this one: its memory is a 2 MiB-aligned
//! block of this guest's heap (guest-physical address 0 of the nested guest is the block's
//! first byte), its image is loaded there by the host, and its exits come back here. Each
//! [`NestedVcpu::run`] runs the nested vCPU until its next exit and returns it; this guest
//! emulates it (a nested guest's hypercall is this guest's to answer) and runs it again.
//! [`NestedVcpu::serve`] is that loop for the calls an SDK guest makes (console, clocks, exit,
//! panic), so running a nested SDK guest to completion is:
//!
//! ```ignore
//! use rebound_guest::nested::{Image, NestedVm, Outcome};
//!
//! let vm = NestedVm::create(16 << 20, 1, Image::Own, "hello")?;
//! let mut cpu = vm.vcpu(0)?;
//! match cpu.serve(|bytes| { let _ = rebound_guest::hypercall::console_write(bytes); })? {
//!     Outcome::Exited(status) => println!("it exited with {status}"),
//!     Outcome::Panicked(message) => println!("it panicked: {message}"),
//!     Outcome::Stopped(exit) => println!("it stopped: reason {}", exit.reason),
//! }
//! ```
//!
//! [`NestedVcpu::start`] moves a nested vCPU to a host thread of its own whose exits are
//! *posted* in the status areas: `run` (and so `serve`) then hands the vCPU back and waits for
//! its next exit without a hypercall while the two sides are quick (spinning for a short while,
//! then blocking in the VMM), so a nested hypercall costs one exit, the nested guest's own,
//! where plain `run` costs two.
//!
//! Nested VMs are not part of checkpoints: after a rollback, restore or clone, calls on an old
//! handle fail with `ESTALE` and the VM is created again. Dropping a [`NestedVm`] destroys it
//! and frees its memory.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use alloc::alloc::{Layout, alloc, dealloc};
use alloc::boxed::Box;
use alloc::string::String;

use rebound_abi::nested::{
    Areas, CREATE_SELF_IMAGE, Create, Exit, HostStatus, MAX_VCPUS, Regs, exit,
};
use rebound_abi::{
    BLOCK_WOKEN, BOOT_INFO_ADDR, BootInfo, CONSOLE_WRITE_MAX, VcpuPage, errno, nr, port,
};

use crate::hypercall::{Errno, call, raw};

/// The image a nested VM runs.
#[derive(Clone, Copy, Debug)]
pub enum Image<'a> {
    /// The ELF this guest booted from (a copy of itself, usually in another mode). `ENODEV`
    /// for a VM restored from a snapshot, whose host has no image.
    Own,
    /// An SDK guest's ELF file, in this guest's memory.
    Elf(&'a [u8]),
}

/// A nested VM; destroyed (and its memory freed) on drop.
pub struct NestedVm {
    handle: u64,
    mem: *mut u8,
    layout: Layout,
    /// Each vCPU's status areas, made on its first [`vcpu`](Self::vcpu) and freed after the
    /// VM is destroyed (a started vCPU's host thread writes them until then).
    areas: [core::cell::Cell<*mut Areas>; MAX_VCPUS as usize],
}

/// How a nested guest served by [`NestedVcpu::serve`] ended.
#[derive(Debug)]
pub enum Outcome {
    /// It called `EXIT` with this status.
    Exited(i32),
    /// It panicked with this message.
    Panicked(String),
    /// It stopped on an exit `serve` does not handle (a fault, a triple fault, a port this SDK
    /// does not use): the exit as the host reported it.
    Stopped(Exit),
}

impl NestedVm {
    /// Creates a nested VM with `mem_size` bytes of memory (a multiple of 2 MiB, at least
    /// 8 MiB, taken from this guest's heap) and `vcpus` vCPUs, running `image` with command
    /// line `args`.
    ///
    /// Errors: `E2BIG` no heap for its memory or a command line over 3.5 KiB; `EINVAL` a bad
    /// size or vCPU count; `ENOEXEC` the image is not an SDK guest; `ENODEV` no own image;
    /// `ENOSPC` too many nested VMs (4).
    pub fn create(mem_size: u64, vcpus: u32, image: Image<'_>, args: &str) -> Result<Self, Errno> {
        let layout =
            Layout::from_size_align(mem_size as usize, rebound_abi::nested::MEM_ALIGN as usize)
                .map_err(|_| Errno(errno::EINVAL))?;
        if mem_size == 0 {
            return Err(Errno(errno::EINVAL));
        }
        // SAFETY: a non-zero size; the block is freed in `drop` with the same layout. The host
        // zeroes it before loading the image.
        let mem = unsafe { alloc(layout) };
        if mem.is_null() {
            return Err(Errno(errno::E2BIG));
        }
        let (flags, image_gpa, image_len) = match image {
            Image::Own => (CREATE_SELF_IMAGE, 0, 0),
            Image::Elf(b) => (0, b.as_ptr() as u64, b.len() as u64),
        };
        let c = Create {
            mem_gpa: mem as u64,
            mem_size,
            vcpus,
            flags,
            image_gpa,
            image_len,
            args_gpa: args.as_ptr() as u64,
            args_len: args.len() as u64,
        };
        match call(nr::NESTED_CREATE, &[&raw const c as u64]) {
            Ok(handle) => Ok(Self {
                handle,
                mem,
                layout,
                areas: Default::default(),
            }),
            Err(e) => {
                // SAFETY: allocated above with `layout`, and the host refused it: unused.
                unsafe { dealloc(mem, layout) };
                Err(e)
            }
        }
    }

    /// The handle the hypercalls take.
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// Where the nested VM's memory starts in this guest's.
    pub fn mem_gpa(&self) -> u64 {
        self.mem as u64
    }

    /// Its memory size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.layout.size() as u64
    }

    /// `len` bytes of the nested guest's memory at its guest-physical `gpa`, if inside it.
    ///
    /// With [started](NestedVcpu::start) vCPUs other than the one whose exit is being handled,
    /// the nested guest runs meanwhile and may change these bytes while they are borrowed:
    /// copy what must not change.
    pub fn bytes(&self, gpa: u64, len: u64) -> Option<&[u8]> {
        let end = gpa.checked_add(len)?;
        if end > self.mem_size() {
            return None;
        }
        // SAFETY: inside the block this VM owns (checked above). The nested guest may change
        // those bytes only while one of its vCPUs runs, which it does only inside a
        // `NestedVcpu::run` of this guest's, never while the slice is borrowed by its caller
        // here on a single-threaded path.
        Some(unsafe { core::slice::from_raw_parts(self.mem.add(gpa as usize), len as usize) })
    }

    /// Writes a `u64` into the nested guest's memory at `gpa`; `false` if outside it.
    pub fn write_u64(&self, gpa: u64, value: u64) -> bool {
        if gpa.checked_add(8).is_none_or(|e| e > self.mem_size()) || !gpa.is_multiple_of(8) {
            return false;
        }
        // SAFETY: an aligned word inside the block this VM owns.
        unsafe { core::ptr::write_volatile(self.mem.add(gpa as usize).cast::<u64>(), value) };
        true
    }

    /// The nested guest's boot information (where its vCPU pages are, its memory size).
    pub fn boot_info(&self) -> BootInfo {
        let p = self
            .bytes(BOOT_INFO_ADDR, core::mem::size_of::<BootInfo>() as u64)
            .map_or(core::ptr::null(), <[u8]>::as_ptr);
        if p.is_null() {
            return BootInfo::default();
        }
        // SAFETY: in bounds (checked by `bytes`), page aligned; any bytes are a valid BootInfo.
        unsafe { core::ptr::read_volatile(p.cast::<BootInfo>()) }
    }

    /// Creates nested vCPU `id` (or, for one already created, moves its status areas here).
    ///
    /// Errors: `EINVAL` no such vCPU; `EBUSY` another vCPU of this guest runs it now.
    /// The areas are this VM's (one set per vCPU id): two `NestedVcpu`s of one id share them
    /// and must not be run at once. A [started](NestedVcpu::start) vCPU stays started: asked
    /// for again, it comes back as it was (its thread and areas unchanged).
    pub fn vcpu(&self, id: u32) -> Result<NestedVcpu<'_>, Errno> {
        let cell = self.areas.get(id as usize).ok_or(Errno(errno::EINVAL))?;
        if cell.get().is_null() {
            cell.set(Box::into_raw(Box::new(Areas::default())));
        }
        let areas = cell.get();
        let mut cpu = NestedVcpu {
            vm: self,
            id,
            areas,
            posted: Posted::No,
        };
        if cpu.host_status().started != 0 {
            // Whose turn it is, from the two sequences.
            let seq = cpu.exit_seq().load(Ordering::Acquire);
            cpu.posted = match cpu.resume_seq().load(Ordering::SeqCst) == seq {
                true => Posted::Host,
                false => Posted::Ours(seq),
            };
            return Ok(cpu);
        }
        call(nr::NESTED_VCPU, &[self.handle, u64::from(id), areas as u64])?;
        Ok(cpu)
    }
}

impl Drop for NestedVm {
    fn drop(&mut self) {
        // After DESTROY no nested vCPU runs; the memory is this guest's again. A stale handle
        // (after a rollback) has no VM behind it: the memory is free either way.
        raw(nr::NESTED_DESTROY, &[self.handle]);
        // SAFETY: allocated in `create` with this layout and no longer used by a nested VM.
        unsafe { dealloc(self.mem, self.layout) };
        for cell in &self.areas {
            let a = cell.replace(core::ptr::null_mut());
            if !a.is_null() {
                // SAFETY: made by `Box::into_raw` in `vcpu`; no host thread writes it after
                // DESTROY, and the `NestedVcpu`s that pointed at it borrowed `self`.
                drop(unsafe { Box::from_raw(a) });
            }
        }
    }
}

/// A nested vCPU, with its guest and host status areas in this guest's heap.
pub struct NestedVcpu<'a> {
    vm: &'a NestedVm,
    id: u32,
    /// Owned by `vm`, which outlives this.
    areas: *mut Areas,
    posted: Posted,
}

/// Whose turn it is with a started vCPU.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Posted {
    /// Not started: runs only inside `NESTED_RUN`.
    No,
    /// Started, and the host runs it.
    Host,
    /// Started, and it stopped on the posted exit with this sequence number: ours to answer.
    Ours(u64),
}

/// How long [`NestedVcpu::run`] spins for a posted exit before it blocks in the VMM: about
/// two host exits, longer than the nested guest takes to make its next call.
const SPIN_NS: u64 = 200_000;
/// How long one `BLOCK` lasts while waiting for a posted exit (the host wakes it earlier).
const BLOCK_NS: u64 = 100_000_000;

impl NestedVcpu<'_> {
    /// Moves the vCPU to a host thread of its own (`NESTED_START`): from now on the host runs
    /// it and posts its exits, and [`run`](Self::run) hands it back and waits for the next one
    /// without hypercalls of its own while both sides are quick. It cannot be stopped short of
    /// destroying the VM. Errors: `EBUSY` already started or running; `EINVAL` no such vCPU.
    pub fn start(&mut self) -> Result<(), Errno> {
        call(nr::NESTED_START, &[self.vm.handle, u64::from(self.id)])?;
        self.posted = Posted::Host;
        Ok(())
    }

    fn exit_seq(&self) -> &AtomicU64 {
        // SAFETY: an aligned u64 of our areas, which the VM keeps as long as `self` borrows it;
        // the host writes it concurrently, hence the atomic.
        unsafe { AtomicU64::from_ptr((&raw const (*self.areas).host.exit_seq).cast_mut()) }
    }

    fn resume_seq(&self) -> &AtomicU64 {
        // SAFETY: as in `exit_seq`; the host reads it concurrently.
        unsafe { AtomicU64::from_ptr(&raw mut (*self.areas).guest.resume_seq) }
    }

    fn waiting(&self) -> &AtomicU64 {
        // SAFETY: as in `resume_seq`.
        unsafe { AtomicU64::from_ptr(&raw mut (*self.areas).guest.waiting) }
    }

    /// Hands a started vCPU back to the host (after its exit was answered).
    fn hand_back(&mut self, seq: u64) {
        self.resume_seq().store(seq, Ordering::SeqCst);
        // SAFETY: an aligned u32 of our boxed host status area, written by the host.
        let sleeping =
            unsafe { AtomicU32::from_ptr((&raw const (*self.areas).host.sleeping).cast_mut()) };
        // Store, full fence, load (the host does the mirror image before it sleeps): if it is
        // asleep, ring.
        fence(Ordering::SeqCst);
        if sleeping.load(Ordering::SeqCst) != 0 {
            let key = ((self.vm.handle & 0xff) as u32) << 8 | self.id;
            // SAFETY: a port write the TSS lets CPL3 make; it has no effect on this guest's
            // memory or registers.
            unsafe {
                core::arch::asm!("out dx, eax", in("dx") port::NESTED_DOORBELL, in("eax") key,
                    options(nostack, preserves_flags));
            }
        }
        self.posted = Posted::Host;
    }

    /// Waits for the host to post the next exit of a started vCPU; returns its sequence.
    /// `ESTALE` (`EBADF`) if the nested VM was lost (a rollback or restore): no exit comes.
    fn wait_posted(&mut self, last: u64) -> Result<u64, Errno> {
        let posted = |s: &Self| {
            let seq = s.exit_seq().load(Ordering::Acquire);
            (seq != last).then_some(seq)
        };
        let until = crate::time::monotonic_ns().saturating_add(SPIN_NS);
        let mut spins = 0u32;
        loop {
            if let Some(seq) = posted(self) {
                return Ok(seq);
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || crate::time::monotonic_ns() < until {
                core::hint::spin_loop();
                continue;
            }
            let waiting = self.waiting();
            waiting.store(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if let Some(seq) = posted(self) {
                waiting.store(0, Ordering::SeqCst);
                return Ok(seq);
            }
            crate::hypercall::block(BLOCK_NS);
            waiting.store(0, Ordering::SeqCst);
            if posted(self).is_none() {
                // Woken without an exit (or the nested guest computes): is the VM still there?
                // A started vCPU answers `NESTED_RUN` with EBUSY while its thread lives.
                let r = raw(nr::NESTED_RUN, &[self.vm.handle, u64::from(self.id), 0]);
                if r != errno::EBUSY {
                    return Err(Errno(if r < 0 { r } else { errno::EIO }));
                }
            }
        }
    }

    /// Runs the vCPU until its next exit; returns the reason, one of
    /// [`rebound_abi::nested::exit`] ([`exit::INTERRUPTED`] when this VM was being paused:
    /// just run again). Errors: `ESTALE` the nested VM was lost in a rollback or restore;
    /// `EBUSY` another vCPU runs it.
    ///
    /// For a [started](Self::start) vCPU: hands it back (if its last exit was returned) and
    /// waits for its next exit, with no hypercall while the host is quick.
    pub fn run(&mut self) -> Result<u32, Errno> {
        let last = match self.posted {
            Posted::No => return self.run_for(0),
            Posted::Ours(seq) => {
                self.hand_back(seq);
                seq
            }
            Posted::Host => self.resume_seq().load(Ordering::SeqCst),
        };
        let seq = self.wait_posted(last)?;
        self.posted = Posted::Ours(seq);
        let host = self.host_status();
        if host.error != 0 {
            return Err(Errno(i64::from(host.error)));
        }
        Ok(self.exit().reason)
    }

    /// [`run`](Self::run) for at most `slice_ns` nanoseconds (0: no limit): a nested guest
    /// that computes without exits comes back with [`exit::TIMEOUT`] when its slice ends, so
    /// one vCPU of this guest can run several nested vCPUs in turn.
    ///
    /// `EBUSY` for a started vCPU.
    pub fn run_for(&mut self, slice_ns: u64) -> Result<u32, Errno> {
        call(
            nr::NESTED_RUN,
            &[self.vm.handle, u64::from(self.id), slice_ns],
        )
        .map(|r| r as u32)
    }

    /// The last exit, as the host wrote it.
    pub fn exit(&self) -> Exit {
        // SAFETY: our own area (kept by the VM); the host writes it only during our hypercalls or, for a
        // started vCPU, while it is the host's turn (not between `run` returning and the next).
        unsafe { core::ptr::read_volatile(&raw const (*self.areas).guest.exit) }
    }

    /// The vCPU's registers after its last exit.
    pub fn regs(&self) -> Regs {
        // SAFETY: as in `exit`.
        unsafe { core::ptr::read_volatile(&raw const (*self.areas).guest.regs) }
    }

    /// Sets the vCPU's registers (applied at the next [`run`](Self::run)).
    pub fn set_regs(&mut self, regs: Regs) {
        // SAFETY: our own area (kept by the VM); volatile so the host, which reads it during the next
        // hypercall, sees it.
        unsafe {
            core::ptr::write_volatile(&raw mut (*self.areas).guest.regs, regs);
            core::ptr::write_volatile(&raw mut (*self.areas).guest.regs_set, 1);
        }
    }

    /// What the host keeps about this vCPU: runs, exits, time in the guest, last error.
    pub fn host_status(&self) -> HostStatus {
        // SAFETY: as in `exit`.
        unsafe { core::ptr::read_volatile(&raw const (*self.areas).host) }
    }

    /// Answers the nested guest's pending port or MMIO read ([`exit::IO_IN`],
    /// [`exit::MMIO_READ`]) with `value` (its low `size` bytes): it reads it when run again.
    pub fn answer_read(&mut self, value: u64) {
        // SAFETY: our own area (kept by the VM); volatile so the host sees it at the next run.
        unsafe { core::ptr::write_volatile(&raw mut (*self.areas).guest.exit.data, value) };
    }

    /// Answers the nested guest's pending hypercall with `ret` (stored in its vCPU page).
    pub fn answer(&self, ret: i64) {
        let page = self.vm.boot_info().vcpu_pages + u64::from(self.id) * rebound_abi::PAGE_SIZE;
        let at = page + core::mem::offset_of!(VcpuPage, ret) as u64;
        self.vm.write_u64(at, ret as u64);
    }

    /// Runs the nested SDK guest until it exits, panics or stops on an exit this does not
    /// emulate, answering its hypercalls as Rebound would: its console writes go to
    /// `console`, clocks are this guest's, `BLOCK` and `YIELD` return at once, calls this
    /// does not know get `ENOSYS`.
    pub fn serve(&mut self, mut console: impl FnMut(&[u8])) -> Result<Outcome, Errno> {
        loop {
            let reason = self.run()?;
            match reason {
                exit::INTERRUPTED | exit::TIMEOUT => continue,
                exit::HYPERCALL => {}
                _ => return Ok(Outcome::Stopped(self.exit())),
            }
            let e = self.exit();
            let [a0, a1, ..] = e.args;
            let ret = match e.nr as u32 {
                nr::ABI_VERSION => i64::from(rebound_abi::ABI_VERSION),
                nr::CONSOLE_WRITE => match self.vm.bytes(a0, a1) {
                    Some(_) if a1 > CONSOLE_WRITE_MAX => errno::E2BIG,
                    Some(b) => {
                        console(b);
                        a1 as i64
                    }
                    None => errno::EFAULT,
                },
                nr::CLOCK_MONOTONIC => crate::time::monotonic_ns() as i64,
                nr::CLOCK_REALTIME => crate::time::realtime_ns() as i64,
                nr::BLOCK | nr::YIELD => BLOCK_WOKEN,
                nr::GENERATION => 0,
                nr::EXIT => return Ok(Outcome::Exited((a0 & 0xff) as i32)),
                nr::PANIC => {
                    let b = self.vm.bytes(a0, a1.min(CONSOLE_WRITE_MAX)).unwrap_or(b"?");
                    return Ok(Outcome::Panicked(String::from_utf8_lossy(b).into()));
                }
                _ => errno::ENOSYS,
            };
            self.answer(ret);
        }
    }
}
