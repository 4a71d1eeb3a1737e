//! The emulation module: one place for every guest operation that traps to the VMM without
//! being a hypercall (ports of emulated devices, privileged instructions the CPU faults on at
//! CPL3), with a frequency judgment per site and promotion of hot sites to a faster path.
//!
//! - [`sites`]: counts per site (instruction address and operation), bounded; judges hot/cold.
//! - `insn`: decodes the faulting instruction (`iced-x86`) and emulates `hlt` and `rdmsr` of
//!   the time-stamp MSRs; anything else stays a fault that ends the VM, as before.
//! - `post`: port 0x80; a hot write of one value is promoted to an ioeventfd and demoted when
//!   it goes cold.
//! - [`replace`]: `cpuid` sites found by decoding the image and armed (`ud2`) at boot, emulated
//!   when they trap, and replaced in copied code pages when hot.
//!
//! A cold site keeps the slow path and costs only its counter. Port promotions are not part of
//! snapshots: a restored VM starts cold and is judged again. Armed sites and copied pages are
//! (the `replaced` component): they live in guest memory.

mod insn;
mod post;
pub mod replace;
pub mod sites;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::{VcpuFd, VmFd};
use serde::Serialize;

pub use post::{PORT as POST_PORT, PostSnapshot};
use sites::{Op, Policy, SiteSnapshot, Sites};

use crate::vm::VmShared;

/// An armed `cpuid` site.
const CPUID: Op = Op::Insn("cpuid");

/// What `/metrics` shows of the emulation module.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct EmulationSnapshot {
    /// Operations emulated in all (every trap counted at a site).
    pub emulated: u64,
    /// Promotions to a faster path so far.
    pub promotions: u64,
    /// Demotions back to the slow path so far.
    pub demotions: u64,
    /// Traps from sites the table had no room for.
    pub untracked: u64,
    /// Sites now on a promoted path.
    pub promoted: u64,
    /// `cpuid` sites armed (`ud2` in the image, emulated when they trap).
    pub armed: u64,
    /// Of those, sites replaced in copied pages now.
    pub replaced: u64,
    /// Copied pages dropped because the guest wrote the original.
    pub copies_dropped: u64,
    /// The tracked sites, hottest first.
    pub sites: Vec<SiteSnapshot>,
    /// Port 0x80.
    pub post: PostSnapshot,
}

/// The emulation module of one VM.
pub(crate) struct Emulator {
    vm_fd: Arc<VmFd>,
    started: Instant,
    sites: Mutex<Sites>,
    post: post::PostPort,
    emulated: AtomicU64,
    promotions: AtomicU64,
    demotions: AtomicU64,
    copies_dropped: AtomicU64,
    pub(crate) replacer: replace::Replacer,
    /// Something is promoted: exits check whether it went cold.
    any_promoted: AtomicBool,
    next_judgment_ns: AtomicU64,
}

impl Emulator {
    pub(crate) fn new(vm_fd: Arc<VmFd>, vcpus: u32) -> Self {
        Self::with_policy(vm_fd, vcpus, Policy::default())
    }

    pub(crate) fn with_policy(vm_fd: Arc<VmFd>, vcpus: u32, policy: Policy) -> Self {
        Self {
            vm_fd,
            started: Instant::now(),
            sites: Mutex::new(Sites::new(policy)),
            post: post::PostPort::default(),
            emulated: AtomicU64::new(0),
            promotions: AtomicU64::new(0),
            demotions: AtomicU64::new(0),
            copies_dropped: AtomicU64::new(0),
            replacer: replace::Replacer::new(vcpus),
            any_promoted: AtomicBool::new(false),
            next_judgment_ns: AtomicU64::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn sites(&self) -> std::sync::MutexGuard<'_, Sites> {
        self.sites.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A byte written to an emulated port (the write is done; `count` records the site).
    pub(crate) fn port_out(&self, port: u16, value: u8) -> Option<Op> {
        (port == POST_PORT).then(|| {
            self.post.write(value);
            Op::Out { port, value }
        })
    }

    /// A read of an emulated port: the value, and the site to count.
    pub(crate) fn port_in(&self, port: u16) -> Option<(u8, Op)> {
        (port == POST_PORT).then(|| (self.post.read(), Op::In { port }))
    }

    /// Counts `op` at the vCPU's current instruction, and promotes the site if it became hot.
    pub(crate) fn count(&self, fd: &VcpuFd, op: Op) {
        // The exit left RIP at the port instruction (KVM moves past it on the next entry).
        let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
        self.hit(op, rip);
    }

    /// Counts one trap of `op` at `rip`; true if the site just became hot.
    fn hit(&self, op: Op, rip: u64) -> bool {
        self.emulated.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ns();
        let hot = self.sites().hit(op, rip, now);
        if hot && let Op::Out { port, value } = op {
            debug_assert_eq!(port, POST_PORT);
            if self.post.promote(&self.vm_fd, value, now) {
                let mut sites = self.sites();
                // Another value promoted before is demoted by the new promotion.
                sites.set_promoted_where(
                    |o| {
                        matches!(
                            o,
                            Op::Out {
                                port: POST_PORT,
                                ..
                            }
                        )
                    },
                    false,
                );
                sites.set_promoted(op, true);
                self.promotions.fetch_add(1, Ordering::Relaxed);
                self.any_promoted.store(true, Ordering::Release);
                tracing::debug!(%op, rip, "emulation: site promoted to an ioeventfd");
            }
        }
        hot
    }

    /// Demotes promoted paths that went cold. Cheap unless a judgment is due: called after
    /// exits.
    pub(crate) fn judge(&self) {
        if !self.any_promoted.load(Ordering::Acquire) {
            return;
        }
        let now = self.now_ns();
        if now < self.next_judgment_ns.load(Ordering::Relaxed) {
            return;
        }
        let window = self.sites().window_ns();
        self.next_judgment_ns
            .store(now + window / 4, Ordering::Relaxed);
        let demoted = {
            let sites = self.sites();
            self.post.judge(&self.vm_fd, now, window, |used, elapsed| {
                sites.cold(used, elapsed)
            })
        };
        if let Some(value) = demoted {
            self.sites().set_promoted(
                Op::Out {
                    port: POST_PORT,
                    value,
                },
                false,
            );
            self.demotions.fetch_add(1, Ordering::Relaxed);
            self.any_promoted.store(false, Ordering::Release);
            tracing::debug!(value, "emulation: port 0x80 demoted");
        }
    }

    /// A fault the stub reported: emulates the instruction if the VMM can. True: the guest
    /// goes on (the stub returns to it).
    pub(crate) fn fault(&self, fd: &mut VcpuFd, vcpu: u32, vm: &VmShared) -> bool {
        let Some(mut frame) = insn::Frame::read(fd, vm) else {
            return false;
        };
        let rip = frame.rip();
        // With several vCPUs, a vCPU may fault on code of a tree another vCPU has changed since
        // (kicked inside its fault stub, where its return address could not be seen): from a
        // retired trampoline, or at a site or displaced instruction that now runs from a copy.
        // It resumes at the same point of the current tree, which it is on before it runs.
        if frame.at_cpl3() && !vm.programs.in_program(vcpu) {
            if let Some(to) = self.replacer.relocation(rip) {
                frame.set_rip(to);
                return frame.write(vm);
            }
            if frame.vector() == 6 && self.replacer.is_replaced(rip) {
                return true;
            }
        }
        // A write (present, write, user) to a page mapped to a copy: drop the copy.
        if frame.at_cpl3()
            && frame.vector() == 14
            && frame.error() & 7 == 7
            && !vm.programs.in_program(vcpu)
        {
            let Ok(sregs) = fd.get_sregs() else {
                return false;
            };
            let mut at = rip;
            match self
                .replacer
                .write_watch(fd, vm, vcpu, sregs.cr2, sregs.cr3, &mut at)
            {
                Some(Ok(sites)) => {
                    if at != rip {
                        frame.set_rip(at);
                        if !frame.write(vm) {
                            return false;
                        }
                    }
                    self.copies_dropped.fetch_add(1, Ordering::Relaxed);
                    let mut t = self.sites();
                    for s in sites {
                        t.set_promoted_at(CPUID, s, false);
                    }
                    return true;
                }
                Some(Err(e)) => {
                    tracing::warn!("emulation: dropping a copied page failed: {e}");
                    return false;
                }
                None => {}
            }
        }
        if frame.at_cpl3() && frame.vector() == 6 && self.replacer.is_armed(rip) {
            return self.armed_cpuid(fd, vcpu, vm, frame);
        }
        match insn::emulate(fd, vcpu, vm, &mut frame) {
            insn::Emulated::Done(name) => {
                self.hit(Op::Insn(name), rip);
                true
            }
            insn::Emulated::No => false,
        }
    }

    /// An armed `cpuid` trapped: replaced if hot (the stub then returns to the site, which
    /// runs from the copy now), else executed here and its results given to the guest.
    fn armed_cpuid(
        &self,
        fd: &mut VcpuFd,
        vcpu: u32,
        vm: &VmShared,
        mut frame: insn::Frame,
    ) -> bool {
        let rip = frame.rip();
        let Ok(regs) = fd.get_regs() else {
            return false;
        };
        let (leaf, subleaf) = (frame.rax() as u32, regs.rcx as u32);
        if self.hit(CPUID, rip) && !self.replacer.is_refused(rip) {
            let cr3 = fd.get_sregs().map(|s| s.cr3).unwrap_or(0);
            if self
                .replacer
                .replace(fd, vm, vcpu, rip, cr3, (leaf, subleaf))
                .is_ok()
            {
                self.sites().set_promoted_at(CPUID, rip, true);
                self.promotions.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        let r = replace::cpuid(leaf, subleaf);
        frame.complete(u64::from(r[0]), u64::from(r[3]), 2);
        if !frame.write(vm) {
            return false;
        }
        // rbx and rcx are not in the stub's frame: set them once the stub's `out` is done.
        crate::program::complete_pending(fd);
        let Ok(mut regs) = fd.get_regs() else {
            return false;
        };
        regs.rbx = u64::from(r[1]);
        regs.rcx = u64::from(r[2]);
        fd.set_regs(&regs).is_ok()
    }

    /// Takes the `replaced` component's state (boot, restore, rollback).
    pub(crate) fn set_replace_state(&self, s: replace::ReplaceState) {
        let replaced: Vec<u64> = s
            .copies
            .iter()
            .flat_map(|c| c.sites.iter().map(|x| x.rip))
            .collect();
        self.replacer.set_state(s);
        let mut t = self.sites();
        t.set_promoted_where(|o| o == CPUID, false);
        for rip in replaced {
            t.set_promoted_at(CPUID, rip, true);
        }
    }

    pub(crate) fn snapshot(&self) -> EmulationSnapshot {
        self.judge();
        let sites = self.sites();
        let mut list = sites.snapshot();
        let replaced = self.replacer.replaced_sites();
        for s in list.iter_mut() {
            s.replaced = s.op == "cpuid" && replaced.contains(&s.rip);
        }
        // Sites replaced before a restore, not counted in this process.
        for rip in &replaced {
            if !list.iter().any(|s| s.op == "cpuid" && s.rip == *rip) {
                list.push(SiteSnapshot {
                    rip: *rip,
                    op: "cpuid".into(),
                    count: 0,
                    promoted: true,
                    replaced: true,
                });
            }
        }
        EmulationSnapshot {
            armed: self.replacer.armed_count(),
            replaced: replaced.len() as u64,
            copies_dropped: self.copies_dropped.load(Ordering::Relaxed),
            emulated: self.emulated.load(Ordering::Relaxed),
            promotions: self.promotions.load(Ordering::Relaxed),
            demotions: self.demotions.load(Ordering::Relaxed),
            untracked: sites.untracked(),
            promoted: list.iter().filter(|s| s.promoted).count() as u64,
            sites: list,
            post: self.post.snapshot(),
        }
    }
}
