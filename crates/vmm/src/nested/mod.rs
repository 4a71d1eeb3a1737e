//! Nested guests (ABI 1.10): a guest that is itself a VMM runs SDK guests of its own.
//!
//! This host has no VMX, so no guest can run hardware nested virtualization. Instead the guest
//! VMM asks Rebound to run its guests: each nested VM is a plain KVM VM of this process whose
//! one memory slot is a range of the guest VMM's own memory, and each nested vCPU runs on the
//! calling vCPU's thread during `NESTED_RUN`. Rebound handles none of the nested guest's exits:
//! it writes each one into the nested vCPU's guest status area (registers and exit) and host
//! status area (counters) in the guest VMM's memory and returns to the guest VMM, which
//! emulates it and runs the vCPU again, as a VMM keeps a guest's state and reflects each exit
//! while the host updates the control structure it gives the hardware.
//!
//! What the guest VMM controls is hostile: every range is checked against its memory, handles
//! carry an epoch, a nested vCPU runs on one thread at a time, and counts are bounded; a bad
//! call gets a negative errno. A nested guest's fault is an exit like any other: it never ends
//! the outer VM.
//!
//! Nested VMs are not saved by checkpoints or snapshots: a rollback drops them (and bumps the
//! epoch, so old handles answer `ESTALE`), and a restored or cloned VM starts with none. What
//! the nested guests wrote into the guest VMM's memory is saved like any of its memory: their
//! writes bypass the outer VM's dirty log, so each nested VM logs its own slot and the pages it
//! dirtied are merged into guest memory's own bitmap whenever an outer vCPU parks (before any
//! checkpoint) and when the nested VM is destroyed.

mod posted;

use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Instant;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use rebound_abi::nested::{
    Areas, CREATE_SELF_IMAGE, Create, Exit, GuestStatus, HostStatus, MAX_VCPUS, MAX_VMS, MEM_ALIGN,
    MIN_MEM, Regs, exit,
};
use rebound_abi::nested::{RESUME_SEQ_OFFSET, WAITING_OFFSET};
use rebound_abi::{BOOT_ARGS_MAX, IMAGE_BASE, PAGE_SIZE, VcpuPage, errno, port};
use rebound_arch::Layout;
use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestRegionMmap};

use crate::memory::GuestMemory;
use crate::vm::VmShared;
use crate::wait::{Request, RunControl};

/// Largest image a guest VMM may pass (bytes it names are copied once, on create).
const MAX_IMAGE: u64 = 64 << 20;
const GUEST_REGS: u64 = offset_of!(Areas, guest) as u64 + offset_of!(GuestStatus, regs) as u64;
const REGS_SET: u64 = offset_of!(Areas, guest) as u64 + offset_of!(GuestStatus, regs_set) as u64;
const EXIT: u64 = offset_of!(Areas, guest) as u64 + offset_of!(GuestStatus, exit) as u64;
const HOST: u64 = offset_of!(Areas, host) as u64;
const EXIT_DATA: u64 = EXIT + offset_of!(Exit, data) as u64;
const PAGE_ARGS: u64 = offset_of!(VcpuPage, args) as u64;

/// The nested VMs of one VM.
pub(crate) struct Nested {
    table: Mutex<Table>,
    /// The VM's own fd, for the doorbells of started vCPUs (none in unit tests).
    vm_fd: Option<Arc<VmFd>>,
}

struct Table {
    /// Part of every handle: changes when the nested VMs are dropped behind the guest's back
    /// (a rollback), and differs between processes (a restore, a clone), so old handles are
    /// told apart from bad ones.
    epoch: u64,
    vms: [Option<Arc<NestedVm>>; MAX_VMS],
}

struct NestedVm {
    fd: VmFd,
    /// Where its memory is in the guest VMM's.
    mem_gpa: u64,
    layout: Layout,
    entry: u64,
    vcpus: Vec<Mutex<Option<NestedVcpu>>>,
    /// The host threads of its started vCPUs; `None` once the VM is being destroyed (a start
    /// racing the destroy must not add a thread nobody would stop).
    workers: Mutex<Option<Vec<Arc<posted::Worker>>>>,
}

impl NestedVm {
    /// Ends its started vCPUs' threads.
    fn stop_workers(&self) {
        let workers = lock(&self.workers).take().unwrap_or_default();
        for w in workers {
            w.stop();
        }
    }
}

struct NestedVcpu {
    id: u32,
    fd: VcpuFd,
    /// The guest VMM's [`Areas`] for it.
    areas: u64,
    /// KVM copies the registers into the shared `kvm_run` page at each exit (`KVM_CAP_SYNC_REGS`):
    /// no `KVM_GET_REGS` call per exit.
    sync_regs: bool,
    /// The last exit was a port or MMIO access that KVM completes on the next entry: it must
    /// be completed before registers are replaced.
    access_pending: bool,
    /// The last exit was a read (port or MMIO): where KVM takes the value read from, in this
    /// vCPU's `kvm_run` mapping (address, length), filled from the guest status area's
    /// `exit.data` at the next run.
    pending_read: Option<(usize, usize)>,
    /// `NESTED_START` moved it to a host thread of its own: `NESTED_RUN` is refused.
    started: bool,
}

impl Nested {
    pub(crate) fn new(vm_fd: Arc<VmFd>) -> Self {
        Self::with_fd(Some(vm_fd))
    }

    fn with_fd(vm_fd: Option<Arc<VmFd>>) -> Self {
        // A new process (a restore, a clone, a live update) starts from another epoch.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Self {
            table: Mutex::new(Table {
                epoch: (seed ^ u64::from(std::process::id())) & 0xff_ffff | 1,
                vms: Default::default(),
            }),
            vm_fd,
        }
    }
}

impl Drop for Nested {
    fn drop(&mut self) {
        for n in lock(&self.table).vms.iter().flatten() {
            n.stop_workers();
        }
    }
}

impl Default for Nested {
    fn default() -> Self {
        Self::with_fd(None)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn handle(epoch: u64, slot: usize) -> i64 {
    ((epoch << 8) | slot as u64) as i64
}

fn ranges_overlap(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

impl Nested {
    fn lookup(&self, h: u64) -> Result<Arc<NestedVm>, i64> {
        let t = lock(&self.table);
        if h >> 8 != t.epoch {
            return Err(errno::ESTALE);
        }
        t.vms
            .get((h & 0xff) as usize)
            .and_then(Clone::clone)
            .ok_or(errno::EBADF)
    }

    /// `NESTED_CREATE`.
    pub(crate) fn create(&self, vm: &VmShared, create_gpa: u64) -> i64 {
        self.try_create(vm, create_gpa).unwrap_or_else(|e| e)
    }

    fn try_create(&self, vm: &VmShared, create_gpa: u64) -> Result<i64, i64> {
        if !create_gpa.is_multiple_of(8)
            || !vm
                .layout
                .is_guest_readable(create_gpa, size_of::<Create>() as u64)
        {
            return Err(errno::EFAULT);
        }
        let c: Create = vm
            .mem
            .read_obj(GuestAddress(create_gpa))
            .map_err(|_| errno::EFAULT)?;
        if c.vcpus == 0 || c.vcpus > MAX_VCPUS || c.flags & !CREATE_SELF_IMAGE != 0 {
            return Err(errno::EINVAL);
        }
        if !c.mem_gpa.is_multiple_of(MEM_ALIGN)
            || !c.mem_size.is_multiple_of(MEM_ALIGN)
            || c.mem_size < MIN_MEM
            || c.mem_gpa < IMAGE_BASE
        {
            return Err(errno::EINVAL);
        }
        if !vm.layout.is_guest_writable(c.mem_gpa, c.mem_size) {
            return Err(errno::EFAULT);
        }
        let layout = Layout::new(c.mem_size, c.vcpus).map_err(|_| errno::EINVAL)?;
        if c.args_len > BOOT_ARGS_MAX {
            return Err(errno::E2BIG);
        }
        let args = read(vm, c.args_gpa, c.args_len)?;
        let args = String::from_utf8(args).map_err(|_| errno::EINVAL)?;
        let image: Arc<[u8]> = if c.flags & CREATE_SELF_IMAGE != 0 {
            vm.image.clone().ok_or(errno::ENODEV)?
        } else {
            if c.image_len > MAX_IMAGE {
                return Err(errno::E2BIG);
            }
            read(vm, c.image_gpa, c.image_len)?.into()
        };

        let mut t = lock(&self.table);
        let slot = t
            .vms
            .iter()
            .position(Option::is_none)
            .ok_or(errno::ENOSPC)?;
        if t.vms
            .iter()
            .flatten()
            .any(|n| ranges_overlap(c.mem_gpa, c.mem_size, n.mem_gpa, n.layout.mem_size()))
        {
            return Err(errno::EBUSY);
        }
        let nested = build(vm, &c, layout, &image, &args)?;
        t.vms[slot] = Some(Arc::new(nested));
        tracing::debug!(
            slot,
            mem_gpa = c.mem_gpa,
            mem_size = c.mem_size,
            "nested VM created"
        );
        Ok(handle(t.epoch, slot))
    }

    /// `NESTED_VCPU`.
    pub(crate) fn vcpu(&self, vm: &VmShared, h: u64, id: u64, areas: u64) -> i64 {
        let n = match self.lookup(h) {
            Ok(n) => n,
            Err(e) => return e,
        };
        let Some(slot) = usize::try_from(id).ok().and_then(|i| n.vcpus.get(i)) else {
            return errno::EINVAL;
        };
        if !areas.is_multiple_of(8)
            || !vm
                .layout
                .is_guest_writable(areas, size_of::<Areas>() as u64)
        {
            return errno::EFAULT;
        }
        // The areas are the guest VMM's, not its guests': a nested guest must not write its own
        // exit reports.
        if lock(&self.table).vms.iter().flatten().any(|o| {
            ranges_overlap(
                areas,
                size_of::<Areas>() as u64,
                o.mem_gpa,
                o.layout.mem_size(),
            )
        }) {
            return errno::EINVAL;
        }
        let mut v = match slot.try_lock() {
            Ok(v) => v,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return errno::EBUSY,
        };
        let regs = match v.as_mut() {
            Some(v) if v.started => return errno::EBUSY,
            Some(v) => {
                v.areas = areas;
                v.fd.get_regs().unwrap_or_default()
            }
            None => match n.new_vcpu(id as u32) {
                Ok((fd, sync_regs)) => {
                    let regs = rebound_arch::regs::initial_regs(&n.layout, id as u32, n.entry);
                    *v = Some(NestedVcpu {
                        id: id as u32,
                        fd,
                        areas,
                        sync_regs,
                        access_pending: false,
                        pending_read: None,
                        started: false,
                    });
                    regs
                }
                Err(e) => {
                    tracing::warn!(vcpu = id, "cannot create a nested vCPU: {e}");
                    return errno::EIO;
                }
            },
        };
        let a = Areas {
            guest: GuestStatus {
                regs: to_abi(&regs),
                ..Default::default()
            },
            host: HostStatus::default(),
        };
        match vm.mem.write_obj(a, GuestAddress(areas)) {
            Ok(()) => 0,
            Err(_) => errno::EFAULT,
        }
    }

    /// `NESTED_RUN`: runs the nested vCPU until its next exit, on this (the calling vCPU's)
    /// thread, and reports the exit. Returns the exit reason or a negative errno.
    pub(crate) fn run(&self, vm: &VmShared, h: u64, id: u64, slice_ns: u64) -> i64 {
        let n = match self.lookup(h) {
            Ok(n) => n,
            Err(e) => return e,
        };
        let Some(slot) = usize::try_from(id).ok().and_then(|i| n.vcpus.get(i)) else {
            return errno::EINVAL;
        };
        let mut guard = match slot.try_lock() {
            Ok(v) => v,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            // Another vCPU of the guest VMM runs it: one thread per nested vCPU at a time.
            Err(TryLockError::WouldBlock) => return errno::EBUSY,
        };
        let Some(v) = guard.as_mut() else {
            return errno::EINVAL;
        };
        if v.started {
            // Its own thread runs it.
            return errno::EBUSY;
        }
        let r = n.run_vcpu(&vm.mem, &vm.control, v, slice_ns, None);
        // Destroyed by another vCPU while it ran: what it wrote after the destroy's harvest
        // belongs in the next checkpoint too.
        if !lock(&self.table)
            .vms
            .iter()
            .flatten()
            .any(|o| Arc::ptr_eq(o, &n))
        {
            n.harvest_dirty(vm);
        }
        // The counters are in the guest VMM's memory: whatever it wrote there, they wrap.
        let mut host: HostStatus = vm
            .mem
            .read_obj(GuestAddress(v.areas + HOST))
            .unwrap_or_default();
        match r {
            Ok((reason, ns)) => {
                host.runs = host.runs.wrapping_add(1);
                if reason != exit::INTERRUPTED {
                    host.exits = host.exits.wrapping_add(1);
                }
                host.guest_ns = host.guest_ns.wrapping_add(ns);
                host.last_exit = reason;
                host.error = 0;
            }
            Err(e) => host.error = e as i32,
        }
        // The areas were checked writable when registered; a write cannot fail.
        let _ = vm.mem.write_obj(host, GuestAddress(v.areas + HOST));
        r.map_or_else(|e| e, |(reason, _)| i64::from(reason))
    }

    /// `NESTED_DESTROY`.
    pub(crate) fn destroy(&self, vm: &VmShared, h: u64) -> i64 {
        let n = {
            let mut t = lock(&self.table);
            if h >> 8 != t.epoch {
                return errno::ESTALE;
            }
            match t.vms.get_mut((h & 0xff) as usize).and_then(Option::take) {
                Some(n) => n,
                None => return errno::EBADF,
            }
        };
        n.stop_workers();
        // What it wrote since the last park belongs in the next checkpoint.
        n.harvest_dirty(vm);
        0
    }

    /// `NESTED_START`: moves nested vCPU `id` to a host thread of its own, which posts its
    /// exits (see [`posted`]). `vcpu` (the caller) is the outer vCPU woken by them.
    pub(crate) fn start(&self, vm: &VmShared, vcpu: u32, h: u64, id: u64) -> i64 {
        let n = match self.lookup(h) {
            Ok(n) => n,
            Err(e) => return e,
        };
        let Some(cell) = usize::try_from(id).ok().and_then(|i| n.vcpus.get(i)) else {
            return errno::EINVAL;
        };
        let mut guard = match cell.try_lock() {
            Ok(v) => v,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return errno::EBUSY,
        };
        let Some(v) = guard.as_mut() else {
            return errno::EINVAL;
        };
        if v.started {
            return errno::EBUSY;
        }
        // The handover words start equal: the host's turn.
        let mut host: HostStatus = vm
            .mem
            .read_obj(GuestAddress(v.areas + HOST))
            .unwrap_or_default();
        host.exit_seq = 0;
        host.sleeping = 0;
        host.started = 1;
        let written = vm.mem.write_obj(host, GuestAddress(v.areas + HOST)).is_ok()
            && vm
                .mem
                .write_obj([0u64; 2], GuestAddress(v.areas + RESUME_SEQ_OFFSET))
                .is_ok();
        const _: () = assert!(WAITING_OFFSET == RESUME_SEQ_OFFSET + 8);
        if !written {
            return errno::EFAULT;
        }
        v.started = true;
        drop(guard);
        let ctx = posted::Ctx {
            mem: vm.mem.clone(),
            control: vm.control.clone(),
            waiters: vm.waiters.clone(),
        };
        let slot = (h & 0xff) as usize;
        match posted::Worker::start(n.clone(), slot, id as u32, vcpu, ctx, self.vm_fd.as_ref()) {
            Ok(w) => {
                let mut workers = lock(&n.workers);
                match workers.as_mut() {
                    Some(list) => {
                        list.push(w);
                        0
                    }
                    None => {
                        // Destroyed meanwhile (another vCPU, a rollback): its thread goes too.
                        drop(workers);
                        w.stop();
                        errno::EBADF
                    }
                }
            }
            Err(e) => {
                tracing::warn!(slot, vcpu = id, "cannot start a nested vCPU's thread: {e}");
                if let Some(v) = lock(cell).as_mut() {
                    v.started = false;
                }
                errno::EIO
            }
        }
    }

    /// The nested doorbell port exited (no ioeventfd took it): wakes the worker named.
    pub(crate) fn doorbell(&self, key: u32) {
        let vms: Vec<_> = lock(&self.table).vms.iter().flatten().cloned().collect();
        for n in vms {
            for w in lock(&n.workers).iter().flatten().filter(|w| w.key == key) {
                w.ring();
            }
        }
    }

    /// Called by the controller once the vCPUs are parked: returns once no worker runs a
    /// nested guest or writes guest memory.
    /// False if a worker did not hold within `limit`.
    pub(crate) fn quiesce(&self, limit: std::time::Duration) -> bool {
        let deadline = Instant::now() + limit;
        self.workers()
            .iter()
            .all(|w| w.quiesce(deadline.saturating_duration_since(Instant::now())))
    }

    /// Kicks every worker out of `KVM_RUN` and its sleep (the VM pauses or stops).
    pub(crate) fn kick_workers(&self) {
        for w in self.workers() {
            w.kick();
        }
    }

    fn workers(&self) -> Vec<Arc<posted::Worker>> {
        let vms: Vec<_> = lock(&self.table).vms.iter().flatten().cloned().collect();
        vms.iter()
            .flat_map(|n| lock(&n.workers).clone().unwrap_or_default())
            .collect()
    }

    /// Merges the pages every nested VM dirtied into guest memory's bitmap: called by an outer
    /// vCPU as it parks, so a checkpoint taken once all have parked has them.
    pub(crate) fn harvest_dirty(&self, vm: &VmShared) {
        let vms: Vec<_> = lock(&self.table).vms.iter().flatten().cloned().collect();
        for n in vms {
            n.harvest_dirty(vm);
        }
    }

    /// Drops every nested VM (a rollback put the guest VMM's memory back to a time they did
    /// not exist as they are) and changes the epoch so their handles answer `ESTALE`.
    pub(crate) fn reset(&self) {
        let vms = {
            let mut t = lock(&self.table);
            t.epoch = (t.epoch + 1) & 0xff_ffff | 1;
            std::mem::take(&mut t.vms)
        };
        for n in vms.iter().flatten() {
            n.stop_workers();
        }
    }
}

/// Copies `len` bytes of guest memory at `gpa`.
fn read(vm: &VmShared, gpa: u64, len: u64) -> Result<Vec<u8>, i64> {
    if !vm.layout.is_guest_readable(gpa, len) {
        return Err(errno::EFAULT);
    }
    let mut buf = vec![0u8; len as usize];
    vm.mem
        .read_slice(&mut buf, GuestAddress(gpa))
        .map_err(|_| errno::EFAULT)?;
    Ok(buf)
}

/// Builds a nested VM: its range zeroed, a KVM VM whose slot 0 is that range, the image loaded
/// into it with the loader Rebound boots its own guests with.
fn build(
    vm: &VmShared,
    c: &Create,
    layout: Layout,
    image: &[u8],
    args: &str,
) -> Result<NestedVm, i64> {
    // The loader expects fresh (zeroed) memory: .bss, the TSS I/O bitmaps. Written through
    // guest memory, so the whole range is also marked dirty for checkpoints.
    let zero = vec![0u8; 1 << 20];
    let mut at = c.mem_gpa;
    while at < c.mem_gpa + c.mem_size {
        let n = (c.mem_gpa + c.mem_size - at).min(zero.len() as u64);
        vm.mem
            .write_slice(&zero[..n as usize], GuestAddress(at))
            .map_err(|_| errno::EFAULT)?;
        at += n;
    }
    let host = vm
        .mem
        .get_slice(GuestAddress(c.mem_gpa), c.mem_size as usize)
        .map_err(|_| errno::EFAULT)?
        .ptr_guard_mut()
        .as_ptr();
    let view = view(host, c.mem_size).map_err(|e| {
        tracing::warn!("nested VM: cannot view its memory: {e}");
        errno::EIO
    })?;
    let entry =
        crate::boot::load(&view, &layout, "nested guest", image, args, 0, &[]).map_err(|e| {
            tracing::debug!("nested VM: image refused: {e}");
            errno::ENOEXEC
        })?;
    let kvm_err = |op: &'static str| {
        move |e: kvm_ioctls::Error| {
            tracing::warn!("nested VM: KVM {op} failed: {e}");
            errno::EIO
        }
    };
    let (kvm, _) = crate::vm::kvm().map_err(|e| {
        tracing::warn!("nested VM: {e}");
        errno::EIO
    })?;
    let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: c.mem_size,
        userspace_addr: host as u64,
    };
    // SAFETY: `host` is `mem_size` bytes of guest memory, mapped for as long as the VM
    // (`VmShared::mem`) lives, which outlives its nested VMs (they are dropped with it or
    // before). The range lies inside the guest's memory, so a nested guest reaches nothing of
    // the VMM's.
    unsafe { fd.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    Ok(NestedVm {
        fd,
        mem_gpa: c.mem_gpa,
        layout,
        entry,
        vcpus: (0..c.vcpus).map(|_| Mutex::new(None)).collect(),
        workers: Mutex::new(Some(Vec::new())),
    })
}

/// A guest memory object over `size` bytes at `host` (not owned: never unmapped by it), for the
/// loader to write a nested guest's image at its own guest-physical addresses.
fn view(host: *mut u8, size: u64) -> Result<GuestMemory, String> {
    // SAFETY: `host` is `size` bytes of this process's guest memory mapping, which outlives this
    // short-lived view; `with_raw_mmap_pointer` makes a region that does not unmap it on drop.
    let region = unsafe {
        MmapRegionBuilder::new_with_bitmap(size as usize, AtomicBitmap::with_len(size as usize))
            .with_raw_mmap_pointer(host)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
    }
    .map_err(|e| e.to_string())?;
    let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or("region overflows")?;
    GuestMemory::from_regions(vec![region]).map_err(|e| e.to_string())
}

impl NestedVm {
    fn new_vcpu(&self, id: u32) -> Result<(VcpuFd, bool), String> {
        let (kvm, cpuid) = crate::vm::kvm().map_err(|e| e.to_string())?;
        let e = |op: &'static str| move |err: kvm_ioctls::Error| format!("{op}: {err}");
        let mut fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(e("KVM_CREATE_VCPU"))?;
        let sync_regs = kvm.check_extension(kvm_ioctls::Cap::SyncRegs);
        if sync_regs {
            fd.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        }
        fd.set_cpuid2(cpuid).map_err(e("KVM_SET_CPUID2"))?;
        let mut sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
        rebound_arch::regs::configure_sregs(&mut sregs, &self.layout, id);
        fd.set_sregs(&sregs).map_err(e("KVM_SET_SREGS"))?;
        fd.set_regs(&rebound_arch::regs::initial_regs(
            &self.layout,
            id,
            self.entry,
        ))
        .map_err(e("KVM_SET_REGS"))?;
        fd.set_fpu(&rebound_arch::regs::initial_fpu())
            .map_err(e("KVM_SET_FPU"))?;
        Ok((fd, sync_regs))
    }

    /// Reads `T` at nested guest-physical `gpa` (inside its memory) from the guest VMM's.
    fn read_nested<T: vm_memory::ByteValued>(&self, mem: &GuestMemory, gpa: u64) -> Option<T> {
        let end = gpa.checked_add(size_of::<T>() as u64)?;
        if end > self.layout.mem_size() {
            return None;
        }
        mem.read_obj(GuestAddress(self.mem_gpa + gpa)).ok()
    }

    /// Runs `v` until an exit to report; returns the reason and the nanoseconds spent in the
    /// guest. `INTERRUPTED` when the VM does not run or `stop` is set.
    fn run_vcpu(
        &self,
        mem: &GuestMemory,
        control: &RunControl,
        v: &mut NestedVcpu,
        slice_ns: u64,
        stop: Option<&AtomicBool>,
    ) -> Result<(u32, u64), i64> {
        if let Some((ptr, len)) = v.pending_read.take() {
            // The guest VMM's answer to the read (all ones unless it wrote another value).
            let value: u64 = mem
                .read_obj(GuestAddress(v.areas + EXIT_DATA))
                .map_err(|_| errno::EFAULT)?;
            let bytes = value.to_le_bytes();
            // SAFETY: (ptr, len) is the data buffer KVM named in this vCPU's `kvm_run` mapping
            // for the read exit (kvm-ioctls' slice at that exit); the mapping lives as long as
            // `v.fd`, and nothing else refers to it between exits. At most 8 bytes are written,
            // never more than the buffer's length.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr as *mut u8, len.min(8)) };
        }
        let regs_set: u64 = mem
            .read_obj(GuestAddress(v.areas + REGS_SET))
            .map_err(|_| errno::EFAULT)?;
        if regs_set != 0 {
            let regs: Regs = mem
                .read_obj(GuestAddress(v.areas + GUEST_REGS))
                .map_err(|_| errno::EFAULT)?;
            if v.access_pending {
                // KVM finishes a port access on the next entry, from the registers it has:
                // do it now, without running guest code, so the new registers stay as set.
                v.fd.set_kvm_immediate_exit(1);
                let _ = v.fd.run();
                v.fd.set_kvm_immediate_exit(0);
                v.access_pending = false;
            }
            v.fd.set_regs(&from_abi(&regs)).map_err(|_| errno::EINVAL)?;
            let _ = mem.write_obj(0u64, GuestAddress(v.areas + REGS_SET));
        }

        let prev = crate::kick::arm_nested(&mut v.fd);
        let started = Instant::now();
        // The time slice: a timer kicks this thread (as a pause does) when it ends. An
        // overflowing slice is no limit.
        let deadline = (slice_ns > 0)
            .then(|| started.checked_add(std::time::Duration::from_nanos(slice_ns)))
            .flatten();
        let timed = deadline.is_some() && slice::arm(slice_ns);
        let mut exit = Exit::default();
        let outcome = loop {
            // A pause or stop of the outer VM wins: its vCPU must get back to its run loop.
            // The controller sets the request before it kicks, and kicks now land on this
            // vCPU's immediate_exit, so a kick after this check still stops the run below.
            if control.current() != Request::Run || stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                break Ok(exit::INTERRUPTED);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break Ok(exit::TIMEOUT);
            }
            match v.fd.run() {
                Ok(e) => break Ok(self.on_exit(mem, v.id, e, &mut exit, &mut v.pending_read)),
                Err(e) if e.errno() == libc::EINTR => {
                    v.fd.set_kvm_immediate_exit(0);
                }
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    tracing::warn!("nested vCPU: KVM_RUN failed: {e}");
                    break Err(errno::EIO);
                }
            }
        };
        if timed {
            // A tick that fires after this lands on the nested vCPU's immediate_exit (its next
            // entry returns at once and is retried) or, once restored, the outer vCPU's (same).
            slice::disarm();
        }
        crate::kick::restore(prev);
        let ns = started.elapsed().as_nanos() as u64;
        let reason = outcome?;
        if reason == exit::INTERRUPTED || reason == exit::TIMEOUT {
            exit.reason = reason;
            let _ = mem.write_obj(exit, GuestAddress(v.areas + EXIT));
            return Ok((reason, ns));
        }
        v.access_pending = matches!(
            reason,
            exit::HYPERCALL | exit::IO_OUT | exit::IO_IN | exit::MMIO_READ | exit::MMIO_WRITE
        );
        let regs = if v.sync_regs {
            v.fd.sync_regs().regs
        } else {
            v.fd.get_regs().unwrap_or_default()
        };
        if reason == exit::FAULT {
            self.fault_frame(mem, v, &regs, &mut exit);
        }
        let _ = mem.write_obj(to_abi(&regs), GuestAddress(v.areas + GUEST_REGS));
        let _ = mem.write_obj(exit, GuestAddress(v.areas + EXIT));
        Ok((reason, ns))
    }

    /// Describes one exit in `exit` and returns its reason. A read gets all ones (as Rebound
    /// answers its own guests' stray reads) unless the guest VMM puts another value in
    /// `exit.data` before it runs the vCPU again: `read` says where it goes.
    fn on_exit(
        &self,
        mem: &GuestMemory,
        id: u32,
        e: VcpuExit<'_>,
        exit: &mut Exit,
        read: &mut Option<(usize, usize)>,
    ) -> u32 {
        fn le(data: &[u8]) -> u64 {
            let mut w = [0u8; 8];
            let n = data.len().min(8);
            w[..n].copy_from_slice(&data[..n]);
            u64::from_le_bytes(w)
        }
        exit.reason = match e {
            VcpuExit::IoOut(p, data) => {
                exit.port = u64::from(p);
                exit.size = data.len() as u32;
                exit.data = le(data);
                match p {
                    port::HYPERCALL if data.len() == 4 => {
                        exit.nr = exit.data;
                        // Its vCPU page is where the nested layout puts it; gs cannot be moved
                        // at CPL3 without FSGSBASE, which the nested guest does not have.
                        exit.args = self
                            .read_nested(mem, self.layout.vcpu_page(id) + PAGE_ARGS)
                            .unwrap_or_default();
                        exit::HYPERCALL
                    }
                    port::FAULT => exit::FAULT,
                    _ => exit::IO_OUT,
                }
            }
            VcpuExit::IoIn(p, data) => {
                exit.port = u64::from(p);
                exit.size = data.len() as u32;
                data.fill(0xff);
                exit.data = le(data);
                *read = Some((data.as_mut_ptr() as usize, data.len()));
                exit::IO_IN
            }
            VcpuExit::MmioWrite(addr, data) => {
                exit.port = addr;
                exit.size = data.len() as u32;
                exit.data = le(data);
                exit::MMIO_WRITE
            }
            VcpuExit::MmioRead(addr, data) => {
                exit.port = addr;
                exit.size = data.len() as u32;
                data.fill(0xff);
                exit.data = le(data);
                *read = Some((data.as_mut_ptr() as usize, data.len()));
                exit::MMIO_READ
            }
            VcpuExit::Hlt => exit::HLT,
            VcpuExit::Shutdown => exit::SHUTDOWN,
            VcpuExit::FailEntry(reason, _) => {
                exit.data = reason;
                exit::FAILED
            }
            _ => exit::FAILED,
        };
        exit.reason
    }

    /// Reads the frame the nested system area's fault stub left on the exception stack (the
    /// guest's rdx and rax, the vector, the error code, then the CPU's RIP, CS, RFLAGS, RSP,
    /// SS: `rebound_arch::system::STUB_FRAME_WORDS`).
    fn fault_frame(&self, mem: &GuestMemory, v: &NestedVcpu, regs: &kvm_regs, exit: &mut Exit) {
        let frame: [u64; 5] = self.read_nested(mem, regs.rsp).unwrap_or_default();
        let frame = [frame[2], frame[3], frame[4]];
        exit.vector = frame[0];
        exit.error_code = frame[1];
        exit.fault_rip = frame[2];
        if frame[0] == 14 {
            exit.cr2 = v.fd.get_sregs().map(|s| s.cr2).unwrap_or_default();
        }
    }

    /// Merges the pages this nested VM dirtied since the last call into guest memory's bitmap.
    fn harvest_dirty(&self, vm: &VmShared) {
        let size = self.layout.mem_size();
        let bits = match self.fd.get_dirty_log(0, size as usize) {
            Ok(b) => b,
            Err(e) => {
                // Then everything it may have written counts as dirty.
                tracing::warn!("nested VM: KVM_GET_DIRTY_LOG failed: {e}");
                vec![u64::MAX; (size / PAGE_SIZE).div_ceil(64) as usize]
            }
        };
        let Some((region, base)) = vm.mem.to_region_addr(GuestAddress(self.mem_gpa)) else {
            return;
        };
        for (w, word) in bits.iter().enumerate() {
            let mut word = *word;
            while word != 0 {
                let bit = word.trailing_zeros() as u64;
                word &= word - 1;
                let page = w as u64 * 64 + bit;
                if page * PAGE_SIZE < size {
                    region
                        .bitmap()
                        .mark_dirty((base.0 + page * PAGE_SIZE) as usize, PAGE_SIZE as usize);
                }
            }
        }
    }
}

fn to_abi(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn from_abi(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

/// Time slices of nested vCPUs: a one-shot POSIX timer per vCPU thread that sends the thread
/// the kick signal, so a nested vCPU that computes without exits leaves `KVM_RUN` when its slice
/// ends, as a VMX preemption timer would make it.
mod slice {
    use std::cell::Cell;

    thread_local! {
        /// This thread's timer, created on first use and kept for the thread's life (vCPU
        /// threads are few and long-lived).
        static TIMER: Cell<Option<libc::timer_t>> = const { Cell::new(None) };
    }

    fn set(t: libc::timer_t, ns: u64) -> bool {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `t` is a timer this thread created; `spec` is a valid itimerspec; the old
        // value is not asked for.
        unsafe { libc::timer_settime(t, 0, &spec, std::ptr::null_mut()) == 0 }
    }

    /// Arms this thread's timer to kick it in `ns` nanoseconds (> 0). `false` if no timer could
    /// be made: the slice is then checked at exits only.
    pub(super) fn arm(ns: u64) -> bool {
        let t = match TIMER.with(Cell::get) {
            Some(t) => t,
            None => {
                // SAFETY: a zeroed sigevent is valid; the fields set below are the ones
                // SIGEV_THREAD_ID reads.
                let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
                ev.sigev_notify = libc::SIGEV_THREAD_ID;
                ev.sigev_signo = crate::kick::signal();
                // SAFETY: gettid has no preconditions.
                ev.sigev_notify_thread_id = unsafe { libc::gettid() };
                let mut t: libc::timer_t = std::ptr::null_mut();
                // SAFETY: `ev` and `t` are valid for the call; the timer is owned by this
                // thread's slot from here on.
                if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut t) } != 0 {
                    tracing::warn!(
                        "nested time slices: timer_create: {}",
                        std::io::Error::last_os_error()
                    );
                    return false;
                }
                TIMER.with(|c| c.set(Some(t)));
                t
            }
        };
        set(t, ns.max(1))
    }

    /// Stops this thread's timer.
    pub(super) fn disarm() {
        if let Some(t) = TIMER.with(Cell::get) {
            set(t, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_overlap_only_when_they_share_a_byte() {
        assert!(ranges_overlap(0, 10, 9, 10));
        assert!(!ranges_overlap(0, 10, 10, 10));
        assert!(ranges_overlap(5, 1, 0, 10));
        assert!(!ranges_overlap(u64::MAX - 1, 10, 0, 10), "no wrap-around");
        assert!(ranges_overlap(u64::MAX - 1, 10, u64::MAX - 5, 10));
    }

    #[test]
    fn handles_carry_the_epoch_and_a_reset_makes_them_stale() {
        let n = Nested::default();
        let epoch = lock(&n.table).epoch;
        assert_eq!(epoch & 1, 1);
        let h = handle(epoch, 2) as u64;
        assert_eq!(n.lookup(h).err(), Some(errno::EBADF), "empty slot");
        assert_eq!(n.lookup(h ^ (1 << 8)).err(), Some(errno::ESTALE));
        assert_eq!(n.lookup(u64::MAX).err(), Some(errno::ESTALE));
        n.reset();
        assert_ne!(lock(&n.table).epoch, epoch);
        assert_eq!(
            n.lookup(h).err(),
            Some(errno::ESTALE),
            "old handle after a reset"
        );
        assert!(
            handle(0xff_ffff, MAX_VMS - 1) > 0,
            "handles are positive results"
        );
    }
}
