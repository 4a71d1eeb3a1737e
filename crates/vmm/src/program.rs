//! Programs (ABI 1.10): a guest's supervisor code runs untrusted code as programs, each confined
//! by its own protection table.
//!
//! The VMM turns a program's table into page tables (`rebound_arch::paging`) in the table pool
//! the first time the program runs on a vCPU, and keeps them keyed by (program, vCPU) and the
//! table's version: a switch to a program whose table did not change only loads its root into
//! CR3. `PROGRAM_SET` with a different table bumps the version, so the next run builds anew.
//! Trees are never rewritten in place (KVM's shadow MMU would not notice) and pool pages are
//! never handed out twice in one process, even after a rollback gave them back.
//!
//! A switch is one exit each way: `PROGRAM_RUN` saves the supervisor's registers and CR3 and
//! starts the program with every other register zero; `PROGRAM_EXIT` or a fault puts them back.
//! While a program runs, its hypercalls are limited (`allowed`), and a fault is the program's:
//! it is written for the supervisor, whose `PROGRAM_RUN` returns `FAULTED`; the VM goes on.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use rebound_abi::program::{FAULTED, Fault, MAX_PROGRAMS, MAX_RANGES, Range, access};
use rebound_abi::{IMAGE_BASE, PAGE_SIZE, errno, nr};
use rebound_arch::paging::{Mapping, program_tables};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::vm::VmShared;

const EFER_NXE: u64 = 1 << 11;

/// A protection table as the guest set it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Table {
    /// (start, len, access) of each range, checked.
    ranges: Vec<(u64, u64, u64)>,
    /// Bumped each time the table changes; trees of older versions are not used.
    version: u64,
}

/// Built page tables of one program on one vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Tree {
    id: u32,
    vcpu: u32,
    version: u64,
    root: u64,
}

/// The supervisor's context while a program runs on a vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Saved {
    id: u32,
    /// rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8..r15, rip, rflags.
    regs: Vec<u64>,
    cr3: u64,
    fault_gpa: u64,
}

/// Everything about programs that a snapshot keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramsState {
    tables: Vec<Option<Table>>,
    trees: Vec<Tree>,
    saved: Vec<Option<Saved>>,
    /// Pool pages the trees use (from the pool's start).
    pool_used: u64,
    versions: u64,
}

#[derive(Default)]
struct Inner {
    s: ProgramsState,
    /// Pool pages ever handed out in this process: never again (a page that was a page table
    /// may still have a shadow in KVM). Not saved.
    high_water: u64,
}

/// What `/metrics` shows.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ProgramStats {
    /// Programs with a table.
    pub programs: u64,
    /// Switches into a program.
    pub runs: u64,
    /// Of those, with page tables built for the run (the rest reused them).
    pub builds: u64,
    /// Runs that ended in a fault.
    pub faults: u64,
    /// Pool pages in use.
    pub pool_pages: u64,
}

/// Switching to or from a program, done by the vCPU thread (it owns the vCPU's registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Switch {
    Enter {
        id: u32,
        root: u64,
        entry: u64,
        stack: u64,
        arg: u64,
        fault_gpa: u64,
    },
    Leave(i64),
}

/// The programs of one VM.
pub(crate) struct Programs {
    inner: Mutex<Inner>,
    running: Vec<AtomicBool>,
    /// Per vCPU, the supervisor's system registers (CPL3 segments, CR0/CR4/EFER), read at the
    /// first switch: each switch then costs one `KVM_SET_SREGS` and no `KVM_GET_SREGS` (every
    /// register ioctl costs ~6 us on these hosts). Dropped when a rollback or restore sets
    /// the vCPUs' state.
    templates: Vec<Mutex<Option<kvm_sregs>>>,
    runs: AtomicU64,
    builds: AtomicU64,
    faults: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn regs_to_vec(r: &kvm_regs) -> Vec<u64> {
    vec![
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ]
}

fn regs_from(v: &[u64]) -> kvm_regs {
    let g = |i: usize| v.get(i).copied().unwrap_or(0);
    kvm_regs {
        rax: g(0),
        rbx: g(1),
        rcx: g(2),
        rdx: g(3),
        rsi: g(4),
        rdi: g(5),
        rsp: g(6),
        rbp: g(7),
        r8: g(8),
        r9: g(9),
        r10: g(10),
        r11: g(11),
        r12: g(12),
        r13: g(13),
        r14: g(14),
        r15: g(15),
        rip: g(16),
        rflags: g(17),
    }
}

/// Lets KVM finish the port access the vCPU exited on (so it is not finished later, at
/// whatever RIP the switch sets).
pub(crate) fn complete_pending(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
}

impl Programs {
    pub(crate) fn new(vcpus: u32) -> Self {
        Self {
            inner: Mutex::new(Inner {
                s: ProgramsState {
                    tables: vec![None; MAX_PROGRAMS as usize],
                    saved: vec![None; vcpus as usize],
                    // The pool's first pages are the vCPUs' program pages.
                    pool_used: u64::from(vcpus),
                    ..Default::default()
                },
                high_water: 0,
            }),
            running: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            templates: (0..vcpus).map(|_| Mutex::new(None)).collect(),
            runs: AtomicU64::new(0),
            builds: AtomicU64::new(0),
            faults: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a program runs on `vcpu` now.
    pub(crate) fn in_program(&self, vcpu: u32) -> bool {
        self.running
            .get(vcpu as usize)
            .is_some_and(|r| r.load(Ordering::Acquire))
    }

    /// The page a program on `vcpu` makes hypercalls with (its `gs` base): the pool's `vcpu`th
    /// page, never the supervisor's vCPU page, so a program cannot see the supervisor's last
    /// hypercall or its indicators, nor change them.
    pub(crate) fn page(vm: &VmShared, vcpu: u32) -> Option<u64> {
        vm.layout
            .pool()
            .map(|p| p.start + u64::from(vcpu) * PAGE_SIZE)
    }

    /// Whether a program may make hypercall `n`.
    pub(crate) fn allowed(n: u32) -> bool {
        matches!(
            n,
            nr::ABI_VERSION
                | nr::CLOCK_MONOTONIC
                | nr::CLOCK_REALTIME
                | nr::YIELD
                | nr::CONSOLE_WRITE
                | nr::PROGRAM_EXIT
        )
    }

    /// Whether the program running on `vcpu` may read `[ptr, ptr + len)`.
    pub(crate) fn readable(&self, vcpu: u32, ptr: u64, len: u64) -> bool {
        let Some(end) = ptr.checked_add(len) else {
            return false;
        };
        let g = self.lock();
        let Some(Some(saved)) = g.s.saved.get(vcpu as usize) else {
            return false;
        };
        let Some(Some(t)) = g.s.tables.get(saved.id as usize) else {
            return false;
        };
        len == 0
            || t.ranges
                .iter()
                .any(|&(s, l, _)| ptr >= s && end <= s.saturating_add(l))
    }

    /// `PROGRAM_SET`.
    pub(crate) fn set(&self, vm: &VmShared, id: u64, gpa: u64, count: u64) -> i64 {
        if id >= MAX_PROGRAMS {
            return errno::EINVAL;
        }
        if count > MAX_RANGES {
            return errno::E2BIG;
        }
        let size = count * std::mem::size_of::<Range>() as u64;
        if count > 0 && !vm.layout.is_guest_readable(gpa, size) {
            return errno::EFAULT;
        }
        let mut ranges = Vec::new();
        for i in 0..count {
            let Ok(r) = vm.mem.read_obj::<Range>(GuestAddress(gpa + i * 24)) else {
                return errno::EFAULT;
            };
            let end = r.start.checked_add(r.len);
            let known = access::READ | access::WRITE | access::EXEC;
            if r.start < IMAGE_BASE
                || !r.start.is_multiple_of(PAGE_SIZE)
                || r.len == 0
                || !r.len.is_multiple_of(PAGE_SIZE)
                || end.is_none_or(|e| e > vm.layout.heap_end())
                || r.access & access::READ == 0
                || r.access & !known != 0
            {
                return errno::EINVAL;
            }
            ranges.push((r.start, r.len, r.access));
        }
        let mut g = self.lock();
        let slot = &mut g.s.tables[id as usize];
        match slot {
            _ if count == 0 => *slot = None,
            // The same table: its trees stay valid (this is what makes a re-set free).
            Some(t) if t.ranges == ranges => {}
            _ => {
                g.s.versions += 1;
                let version = g.s.versions;
                g.s.tables[id as usize] = Some(Table { ranges, version });
            }
        }
        0
    }

    /// `PROGRAM_RUN`: checks it and finds or builds the tree; the vCPU thread switches.
    pub(crate) fn run(&self, vm: &VmShared, vcpu: u32, args: &[u64; 6]) -> Result<Switch, i64> {
        let [id, entry, stack, arg, fault_gpa, _] = *args;
        if id >= MAX_PROGRAMS {
            return Err(errno::EINVAL);
        }
        let fault_size = std::mem::size_of::<Fault>() as u64;
        if fault_gpa != 0 && !vm.layout.is_guest_writable(fault_gpa, fault_size) {
            return Err(errno::EFAULT);
        }
        let mut g = self.lock();
        let Some(table) = g.s.tables[id as usize].clone() else {
            return Err(errno::EINVAL);
        };
        let id = id as u32;
        let found =
            g.s.trees
                .iter()
                .find(|t| t.id == id && t.vcpu == vcpu && t.version == table.version)
                .map(|t| t.root);
        let root = match found {
            Some(root) => root,
            None => {
                let root = self.build(vm, &mut g, vcpu, &table)?;
                g.s.trees.retain(|t| !(t.id == id && t.vcpu == vcpu));
                g.s.trees.push(Tree {
                    id,
                    vcpu,
                    version: table.version,
                    root,
                });
                self.builds.fetch_add(1, Ordering::Relaxed);
                root
            }
        };
        Ok(Switch::Enter {
            id,
            root,
            entry,
            stack,
            arg,
            fault_gpa,
        })
    }

    fn build(&self, vm: &VmShared, g: &mut Inner, vcpu: u32, t: &Table) -> Result<u64, i64> {
        let Some(pool) = vm.layout.pool() else {
            // A VM restored from a snapshot of a VMM before ABI 1.10 has no pool.
            return Err(errno::ENOMEM);
        };
        let maps: Vec<Mapping> = t
            .ranges
            .iter()
            .map(|&(start, len, a)| Mapping {
                start,
                len,
                write: a & access::WRITE != 0,
                exec: a & access::EXEC != 0,
            })
            .collect();
        let pages = (pool.end - pool.start) / PAGE_SIZE;
        let mut next = g.s.pool_used.max(g.high_water);
        let mut alloc = || {
            if next >= pages {
                return Err(rebound_arch::Error::PoolFull(pages));
            }
            next += 1;
            Ok(pool.start + (next - 1) * PAGE_SIZE)
        };
        let page = pool.start + u64::from(vcpu) * PAGE_SIZE;
        let built = program_tables(&vm.mem, &vm.layout, page, &maps, &mut alloc);
        // Pages taken are spent even if the build failed half-way.
        g.s.pool_used = next;
        g.high_water = next;
        built.map_err(|e| {
            tracing::debug!(%e, "program tables not built");
            match e {
                rebound_arch::Error::PoolFull(_) => errno::ENOMEM,
                rebound_arch::Error::Layout(_) => errno::E2BIG,
                rebound_arch::Error::GuestMemory { .. } => errno::EFAULT,
            }
        })
    }

    /// Hands pool pages to `f` (through `alloc`), from the same never-reused sequence as the
    /// programs' trees: the emulation module's copied pages and their trees use it too.
    pub(crate) fn with_pool<T>(
        &self,
        vm: &VmShared,
        f: impl FnOnce(
            &mut dyn FnMut() -> Result<u64, rebound_arch::Error>,
        ) -> Result<T, rebound_arch::Error>,
    ) -> Result<T, rebound_arch::Error> {
        let Some(pool) = vm.layout.pool() else {
            return Err(rebound_arch::Error::PoolFull(0));
        };
        let mut g = self.lock();
        let pages = (pool.end - pool.start) / PAGE_SIZE;
        let mut next = g.s.pool_used.max(g.high_water);
        let mut alloc = || {
            if next >= pages {
                return Err(rebound_arch::Error::PoolFull(pages));
            }
            next += 1;
            Ok(pool.start + (next - 1) * PAGE_SIZE)
        };
        let r = f(&mut alloc);
        // Pages taken are spent even if `f` failed half-way.
        g.s.pool_used = next;
        g.high_water = next;
        r
    }

    /// `PROGRAM_EXIT`.
    pub(crate) fn exit(&self, vcpu: u32, value: u64) -> Result<Switch, i64> {
        if self.in_program(vcpu) {
            Ok(Switch::Leave((value & i64::MAX as u64) as i64))
        } else {
            Err(errno::EINVAL)
        }
    }

    /// Carries out a switch on the vCPU thread. On failure (a KVM error) the vCPU's state is
    /// unknown: the caller ends the VM.
    pub(crate) fn switch(
        &self,
        fd: &mut VcpuFd,
        vcpu: u32,
        vm: &VmShared,
        s: Switch,
    ) -> Result<(), kvm_ioctls::Error> {
        complete_pending(fd);
        match s {
            Switch::Enter {
                id,
                root,
                entry,
                stack,
                arg,
                fault_gpa,
            } => {
                let regs = fd.get_regs()?;
                let mut sregs = self.template(fd, vcpu)?;
                let saved = Saved {
                    id,
                    regs: regs_to_vec(&regs),
                    // Not the template's CR3: the supervisor's tree changes when the emulation
                    // module maps code pages to copies or drops them.
                    cr3: vm.emulator.replacer.supervisor_root(),
                    fault_gpa,
                };
                fd.set_regs(&kvm_regs {
                    rip: entry,
                    rsp: stack,
                    rdi: arg,
                    rflags: rebound_arch::regs::RFLAGS,
                    ..Default::default()
                })?;
                // A fresh hypercall page for the program: nothing of earlier runs is left in it.
                if let Some(page) = Self::page(vm, vcpu) {
                    let fresh = rebound_abi::VcpuPage {
                        self_addr: page,
                        vcpu_id: u64::from(vcpu),
                        ..Default::default()
                    };
                    let _ = vm.mem.write_obj(fresh, GuestAddress(page));
                    sregs.gs.base = page;
                }
                sregs.cr3 = root;
                sregs.efer |= EFER_NXE;
                fd.set_sregs(&sregs)?;
                self.lock().s.saved[vcpu as usize] = Some(saved);
                self.running[vcpu as usize].store(true, Ordering::Release);
                self.runs.fetch_add(1, Ordering::Relaxed);
            }
            Switch::Leave(result) => self.leave(fd, vcpu, vm, result)?,
        }
        Ok(())
    }

    fn leave(
        &self,
        fd: &VcpuFd,
        vcpu: u32,
        vm: &VmShared,
        result: i64,
    ) -> Result<(), kvm_ioctls::Error> {
        let Some(saved) = self.lock().s.saved[vcpu as usize].take() else {
            return Ok(());
        };
        self.running[vcpu as usize].store(false, Ordering::Release);
        fd.set_regs(&regs_from(&saved.regs))?;
        // The vCPU may be in a CPL0 stub (a fault): put back the supervisor's CPL3 segments.
        let mut sregs = match *lock(&self.templates[vcpu as usize]) {
            Some(t) => t,
            None => {
                let mut s = fd.get_sregs()?;
                rebound_arch::regs::configure_sregs(&mut s, &vm.layout, vcpu);
                s
            }
        };
        sregs.cr3 = saved.cr3;
        sregs.efer |= EFER_NXE;
        fd.set_sregs(&sregs)?;
        let ret =
            vm.layout.vcpu_page(vcpu) + std::mem::offset_of!(rebound_abi::VcpuPage, ret) as u64;
        let _ = vm.mem.write_obj(result, GuestAddress(ret));
        Ok(())
    }

    /// The supervisor's system registers on `vcpu` (it is at CPL3 in a hypercall now).
    fn template(&self, fd: &VcpuFd, vcpu: u32) -> Result<kvm_sregs, kvm_ioctls::Error> {
        let mut t = lock(&self.templates[vcpu as usize]);
        if let Some(s) = t.as_ref() {
            return Ok(*s);
        }
        let s = fd.get_sregs()?;
        *t = Some(s);
        Ok(s)
    }

    /// A fault of the program running on `vcpu`: reports it to the supervisor and switches
    /// back. False if no program runs there (the fault is the VM's).
    pub(crate) fn fault(
        &self,
        fd: &mut VcpuFd,
        vcpu: u32,
        vm: &VmShared,
        report: &crate::FaultReport,
    ) -> Result<bool, kvm_ioctls::Error> {
        if !self.in_program(vcpu) {
            return Ok(false);
        }
        let fault_gpa = self.lock().s.saved[vcpu as usize]
            .as_ref()
            .map_or(0, |s| s.fault_gpa);
        if fault_gpa != 0 {
            let f = Fault {
                vector: report.vector.map_or(0, u64::from),
                error_code: report.error_code.unwrap_or(0),
                rip: report.rip,
                address: report.address.unwrap_or(0),
            };
            // Checked guest-writable at PROGRAM_RUN.
            let _ = vm.mem.write_obj(f, GuestAddress(fault_gpa));
        }
        self.faults.fetch_add(1, Ordering::Relaxed);
        complete_pending(fd);
        self.leave(fd, vcpu, vm, FAULTED)?;
        Ok(true)
    }

    pub(crate) fn stats(&self) -> ProgramStats {
        let g = self.lock();
        ProgramStats {
            programs: g.s.tables.iter().filter(|t| t.is_some()).count() as u64,
            runs: self.runs.load(Ordering::Relaxed),
            builds: self.builds.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
            pool_pages: g.s.pool_used,
        }
    }

    pub(crate) fn state(&self) -> ProgramsState {
        self.lock().s.clone()
    }

    /// Checks a saved state against this VM.
    pub(crate) fn check(&self, s: &ProgramsState, vm: &VmShared) -> Result<(), String> {
        if s.tables.len() != MAX_PROGRAMS as usize || s.saved.len() != self.running.len() {
            return Err("program state for another VM shape".into());
        }
        let pool = vm.layout.pool().unwrap_or(0..0);
        for t in &s.trees {
            if !pool.contains(&t.root) || t.vcpu as usize >= self.running.len() {
                return Err(format!("program tree at {:#x} is outside the pool", t.root));
            }
        }
        Ok(())
    }

    /// Takes a saved state (a rollback, or a restore in a new process).
    pub(crate) fn set_state(&self, s: ProgramsState) {
        for t in &self.templates {
            *lock(t) = None;
        }
        let mut g = self.lock();
        for (i, r) in self.running.iter().enumerate() {
            r.store(
                s.saved.get(i).is_some_and(|x| x.is_some()),
                Ordering::Release,
            );
        }
        g.high_water = g.high_water.max(g.s.pool_used);
        g.s = s;
    }
}
