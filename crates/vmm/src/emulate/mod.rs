//! The emulation module: one place for every guest operation that traps to the VMM without
//! being a hypercall (ports of emulated devices, privileged instructions the CPU faults on at
//! CPL3), with a frequency judgment per site and promotion of hot sites to a faster path.
//!
//! - [`sites`]: counts per site (instruction address and operation), bounded; judges hot/cold.
//! - `insn`: decodes the faulting instruction (`iced-x86`) and emulates `hlt` and `rdmsr` of
//!   the time-stamp MSRs; anything else stays a fault that ends the VM, as before.
//! - `post`: port 0x80; a hot write of one value is promoted to an ioeventfd and demoted when
//!   it goes cold.
//!
//! A cold site keeps the slow path and costs only its counter. What is promoted is not part of
//! snapshots: a restored VM starts cold and is judged again.

mod insn;
mod post;
pub mod sites;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::{VcpuFd, VmFd};
use serde::Serialize;

pub use post::{PORT as POST_PORT, PostSnapshot};
use sites::{Op, Policy, SiteSnapshot, Sites};

use crate::vm::VmShared;

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
    /// Something is promoted: exits check whether it went cold.
    any_promoted: AtomicBool,
    next_judgment_ns: AtomicU64,
}

impl Emulator {
    pub(crate) fn new(vm_fd: Arc<VmFd>) -> Self {
        Self::with_policy(vm_fd, Policy::default())
    }

    pub(crate) fn with_policy(vm_fd: Arc<VmFd>, policy: Policy) -> Self {
        Self {
            vm_fd,
            started: Instant::now(),
            sites: Mutex::new(Sites::new(policy)),
            post: post::PostPort::default(),
            emulated: AtomicU64::new(0),
            promotions: AtomicU64::new(0),
            demotions: AtomicU64::new(0),
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

    fn hit(&self, op: Op, rip: u64) {
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
    pub(crate) fn fault(&self, fd: &VcpuFd, vcpu: u32, vm: &VmShared) -> bool {
        let Some(mut frame) = insn::Frame::read(fd, vm) else {
            return false;
        };
        let rip = frame.rip();
        match insn::emulate(fd, vcpu, vm, &mut frame) {
            insn::Emulated::Done(name) => {
                self.hit(Op::Insn(name), rip);
                true
            }
            insn::Emulated::No => false,
        }
    }

    pub(crate) fn snapshot(&self) -> EmulationSnapshot {
        self.judge();
        let sites = self.sites();
        let list = sites.snapshot();
        EmulationSnapshot {
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
