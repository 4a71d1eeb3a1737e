//! `cpuid` sites armed at boot and, once hot, replaced in copied code pages.
//!
//! On these hosts `cpuid` at CPL3 never reaches the VMM (it traps to the hypervisor below), so
//! the VMM finds its sites itself: at boot it decodes every function of the guest image (ELF
//! symbols) with `iced-x86` and **arms** each `cpuid` by writing `ud2` over it. An armed site
//! faults (#UD) into the exception stub; the VMM executes `cpuid` itself with the guest's
//! `eax`/`ecx` (the same answers the guest gets natively here) and counts the site.
//!
//! A site that turns hot is **replaced**: the VMM copies its 4 KiB code page into the table
//! pool, writes over the `ud2` and the instructions after it a `jmp rel32` to a per-site
//! trampoline in another pool page, and builds a page-table tree (the boot tree with the page
//! mapped to the copy, user read+execute, and the trampoline page user read+execute) that it
//! loads into CR3. The trampoline returns cached results for the leaf that was hot (if its
//! results do not depend on the CPU) and executes the real `cpuid` for anything else, then the
//! displaced instructions, then jumps back; it changes no flags and never touches the stack
//! (the guest's red zone).
//!
//! The original page stays **write-watched**: mapped to a read-only copy, a guest write to it
//! faults (#PF); the VMM drops the copy (a new tree without it), and the stub's `iretq` runs
//! the write again on the original. The site traps again (its `ud2` is still there), so
//! self-modifying code runs the new code, and the site may be replaced again later from the
//! new bytes.
//!
//! Copies, trampolines and trees are in guest memory and CR3 in the vCPU state: they come
//! back with a snapshot or rollback; [`ReplaceState`] (the `replaced` component) keeps which
//! sites are armed and which pages are copied. Pool pages come from the programs' pool
//! allocator, which never hands a page out twice in one process.
//!
//! With several vCPUs, a change (a copy made or dropped) runs with the other vCPUs out of the
//! guest: they are kicked and hold before entering again; each then switches to the new tree
//! before it runs, its RIP moved if it was inside a displaced range or a retired trampoline
//! ([`Replacer::sync`]). No other vCPU runs while a page is copied, so the copy cannot miss a
//! write, and none runs a dropped copy after the write that dropped it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction};
use kvm_ioctls::VcpuFd;
use rebound_abi::PAGE_SIZE;
use rebound_arch::paging::{Overlay, USER_EXEC_PAGE, overlay_tables};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory as GuestMemoryMmap;

use crate::vm::VmShared;

/// Most sites armed per VM.
pub const MAX_ARMED: usize = 4096;
/// Largest function decoded (bigger ones are not armed).
const MAX_FUNCTION: u64 = 1 << 20;
/// Bytes per trampoline slot; a trampoline page holds this many sites of one code page.
const SLOT: u64 = 128;
const SLOTS: usize = (PAGE_SIZE / SLOT) as usize;
/// `ud2`, what an armed `cpuid` becomes.
const UD2: [u8; 2] = [0x0f, 0x0b];
const JMP_REL32: usize = 5;

/// Leaves whose results depend on the CPU that runs them (APIC ids, topology, the OS's XSAVE
/// state): never cached.
const PER_CPU_LEAVES: [u32; 6] = [1, 4, 0xb, 0xd, 0x1f, 0x8000_001e];
/// Leaves that ignore `ecx`: their cached results match any subleaf.
const NO_SUBLEAF: [u32; 5] = [0, 2, 3, 5, 6];

/// An armed `cpuid`: its address and the function it is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Armed {
    /// The site (`ud2` in memory).
    pub rip: u64,
    /// The function holding it: start and end.
    pub func: (u64, u64),
}

/// Results a trampoline returns without `cpuid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cached {
    /// The leaf (`eax`).
    pub leaf: u32,
    /// The subleaf (`ecx`), if the leaf has subleaves.
    pub subleaf: Option<u32>,
    /// eax, ebx, ecx, edx.
    pub regs: [u32; 4],
}

/// A site replaced in a copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replaced {
    /// The site.
    pub rip: u64,
    /// One past the last displaced instruction (where the trampoline jumps back to).
    pub end: u64,
    /// The displaced instructions, as in the original.
    pub displaced: Vec<u8>,
    /// The cached leaf, if any.
    pub cached: Option<Cached>,
}

/// A code page mapped to a copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCopy {
    /// The original page (virtual = physical: guest memory is identity-mapped).
    pub page: u64,
    /// The copy, in the pool.
    pub copy: u64,
    /// Its trampolines, in the pool.
    pub tramp: u64,
    /// Its replaced sites (at most one trampoline page of them).
    pub sites: Vec<Replaced>,
}

/// What the `replaced` component saves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplaceState {
    /// Armed sites.
    pub armed: Vec<Armed>,
    /// Pages mapped to copies.
    pub copies: Vec<PageCopy>,
    /// The root of the tree mapping them (the boot tree's when there are none).
    pub root: u64,
}

/// The armed sites and copies of one VM.
pub(crate) struct Replacer {
    /// Per vCPU: between its check before `KVM_RUN` and the return.
    in_guest: Vec<AtomicBool>,
    /// Per vCPU: the supervisor tree it was last switched to.
    applied: Vec<AtomicU64>,
    /// Set while one vCPU changes the tree: the others hold before entering the guest.
    quiesce: AtomicBool,
    gate: Mutex<()>,
    released: Condvar,
    /// One change at a time.
    change: Mutex<()>,
    /// Copies dropped or superseded (a new copy of their page), so a vCPU switched while in
    /// one of their trampolines can be moved out. Their pages are never reused.
    retired: Mutex<Vec<PageCopy>>,
    s: Mutex<ReplaceState>,
    /// Sites found not replaceable (no safe displacement, no room): not tried again.
    refused: Mutex<HashSet<u64>>,
    /// Copies dropped per page in this process: a page the guest keeps writing is not copied
    /// again after [`MAX_DROPS`] (each copy spends pool pages).
    drops: Mutex<std::collections::HashMap<u64, u32>>,
}

/// Copies of one page dropped before its sites are no longer replaced.
const MAX_DROPS: u32 = 3;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decodes `[start, end)` of guest memory linearly.
fn decode(mem: &GuestMemoryMmap, start: u64, end: u64) -> Option<Vec<Instruction>> {
    let len = end
        .checked_sub(start)
        .filter(|l| *l > 0 && *l <= MAX_FUNCTION)?;
    let mut bytes = vec![0u8; len as usize];
    mem.read_slice(&mut bytes, GuestAddress(start)).ok()?;
    let mut d = Decoder::with_ip(64, &bytes, start, DecoderOptions::NONE);
    let mut out = Vec::new();
    while d.can_decode() {
        out.push(d.decode());
    }
    Some(out)
}

/// Finds the `cpuid`s in the functions `funcs` ((start, size)) and arms them: `ud2` over each.
/// Functions outside `[lo, hi)` are skipped.
pub(crate) fn arm(
    mem: &GuestMemoryMmap,
    funcs: impl Iterator<Item = (u64, u64)>,
    lo: u64,
    hi: u64,
) -> Vec<Armed> {
    let mut armed = Vec::new();
    for (start, size) in funcs {
        let Some(end) = start.checked_add(size) else {
            continue;
        };
        if start < lo || end > hi {
            continue;
        }
        let Some(insns) = decode(mem, start, end) else {
            continue;
        };
        for i in insns.iter().filter(|i| i.code() == Code::Cpuid) {
            if armed.len() >= MAX_ARMED {
                tracing::warn!(
                    "emulation: more than {MAX_ARMED} cpuid sites; the rest stay unarmed"
                );
                return armed;
            }
            if mem.write_slice(&UD2, GuestAddress(i.ip())).is_ok() {
                armed.push(Armed {
                    rip: i.ip(),
                    func: (start, end),
                });
            }
        }
    }
    tracing::debug!(sites = armed.len(), "emulation: cpuid sites armed");
    armed
}

/// Results of `cpuid` on this thread (the VMM's CPU, under the same hypervisor as the guest).
pub(crate) fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// What is cached for a hot `(leaf, subleaf)`: nothing for per-CPU leaves or results that
/// changed between two runs.
fn cacheable(leaf: u32, subleaf: u32) -> Option<Cached> {
    if PER_CPU_LEAVES.contains(&leaf) {
        return None;
    }
    let a = cpuid(leaf, subleaf);
    (a == cpuid(leaf, subleaf)).then_some(Cached {
        leaf,
        subleaf: (!NO_SUBLEAF.contains(&leaf)).then_some(subleaf),
        regs: a,
    })
}

/// The displaced instructions after the site `rip` in the function `func`: safe to run from a
/// trampoline (no branches, no RIP-relative operands), at least 3 bytes so a `jmp rel32` fits
/// over the site, all in its page, none a branch target in the function. Decoded from memory
/// now (the function may have changed since boot).
fn plan(mem: &GuestMemoryMmap, rip: u64, func: (u64, u64)) -> Result<(u64, Vec<u8>), &'static str> {
    let insns = decode(mem, func.0, func.1).ok_or("the function cannot be read")?;
    let at = insns
        .iter()
        .position(|i| i.ip() == rip && i.code() == Code::Ud2)
        .ok_or("the site is no longer an armed instruction")?;
    let mut end = rip + UD2.len() as u64;
    for i in &insns[at + 1..] {
        if end - rip >= JMP_REL32 as u64 {
            break;
        }
        if i.is_invalid()
            || i.flow_control() != FlowControl::Next
            || i.is_ip_rel_memory_operand()
            || matches!(i.code(), Code::Cpuid | Code::Ud2)
            || i.is_privileged()
            || is_port_io(i)
        {
            return Err("an instruction after the site cannot be moved");
        }
        end = i.next_ip();
    }
    if end - rip < JMP_REL32 as u64 {
        return Err("the function ends too soon after the site");
    }
    if (end - 1) & !(PAGE_SIZE - 1) != rip & !(PAGE_SIZE - 1) {
        return Err("the displaced instructions cross a page");
    }
    if insns.iter().any(|i| {
        let t = i.near_branch_target();
        t > rip && t < end
    }) {
        return Err("a branch targets a displaced instruction");
    }
    let mut displaced = vec![0u8; (end - rip) as usize - UD2.len()];
    mem.read_slice(&mut displaced, GuestAddress(rip + UD2.len() as u64))
        .map_err(|_| "the function cannot be read")?;
    Ok((end, displaced))
}

/// Port I/O (hypercalls, devices): exits whose RIP the VMM reads or saves, never displaced.
fn is_port_io(i: &Instruction) -> bool {
    use iced_x86::Mnemonic::*;
    matches!(
        i.mnemonic(),
        In | Out | Insb | Insw | Insd | Outsb | Outsw | Outsd
    )
}

fn rel32(from_next: u64, to: u64) -> Option<[u8; 4]> {
    i32::try_from(to.wrapping_sub(from_next) as i64)
        .ok()
        .map(i32::to_le_bytes)
}

/// The trampoline of one site, placed at `at`. Flag-preserving and stack-free: the compares
/// are `lea` + `jrcxz`, with `edx` keeping the subleaf (cpuid writes it anyway).
fn trampoline(at: u64, site: &Replaced) -> Option<Vec<u8>> {
    let mut c = Vec::new();
    let mut miss_jumps = Vec::new();
    if let Some(k) = site.cached {
        // mov edx, ecx; lea ecx, [rax - leaf]; jrcxz +2; jmp short miss
        c.extend_from_slice(&[0x89, 0xca, 0x8d, 0x88]);
        c.extend_from_slice(&k.leaf.wrapping_neg().to_le_bytes());
        c.extend_from_slice(&[0xe3, 0x02, 0xeb, 0x00]);
        miss_jumps.push(c.len() - 1);
        if let Some(sub) = k.subleaf {
            // lea ecx, [rdx - subleaf]; jrcxz +2; jmp short miss
            c.extend_from_slice(&[0x8d, 0x8a]);
            c.extend_from_slice(&sub.wrapping_neg().to_le_bytes());
            c.extend_from_slice(&[0xe3, 0x02, 0xeb, 0x00]);
            miss_jumps.push(c.len() - 1);
        }
        for (op, v) in [0xb8u8, 0xbb, 0xb9, 0xba].into_iter().zip(k.regs) {
            c.push(op);
            c.extend_from_slice(&v.to_le_bytes());
        }
        c.extend_from_slice(&site.displaced);
        c.push(0xe9);
        c.extend_from_slice(&rel32(at + c.len() as u64 + 4, site.end)?);
        let miss = c.len();
        for j in miss_jumps {
            c[j] = u8::try_from(miss - (j + 1)).ok()?;
        }
        // mov ecx, edx: the subleaf back.
        c.extend_from_slice(&[0x89, 0xd1]);
    }
    c.extend_from_slice(&[0x0f, 0xa2]);
    c.extend_from_slice(&site.displaced);
    c.push(0xe9);
    c.extend_from_slice(&rel32(at + c.len() as u64 + 4, site.end)?);
    (c.len() as u64 <= SLOT).then_some(c)
}

/// Offsets in a site's trampoline where copies of its displaced instructions start (the hit
/// path's, if any, and the fallback's), from the code [`trampoline`] writes.
fn displaced_offsets(site: &Replaced) -> Vec<u64> {
    let l = layout(site);
    l.hit
        .map(|h| h + 20)
        .into_iter()
        .chain([l.displaced])
        .collect()
}

/// Writes the copy of `pc.page` and its trampolines (fresh pool pages).
fn write_copy(mem: &GuestMemoryMmap, pc: &PageCopy) -> Result<(), String> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    mem.read_slice(&mut page, GuestAddress(pc.page))
        .map_err(|e| e.to_string())?;
    let mut tramps = vec![0xccu8; PAGE_SIZE as usize];
    for (k, s) in pc.sites.iter().enumerate() {
        let at = pc.tramp + k as u64 * SLOT;
        let code = trampoline(at, s).ok_or("a trampoline is out of reach")?;
        let off = (k as u64 * SLOT) as usize;
        tramps[off..off + code.len()].copy_from_slice(&code);
        let o = (s.rip - pc.page) as usize;
        let e = (s.end - pc.page) as usize;
        page[o] = 0xe9;
        page[o + 1..o + JMP_REL32]
            .copy_from_slice(&rel32(s.rip + JMP_REL32 as u64, at).ok_or("out of reach")?);
        page[o + JMP_REL32..e].fill(0xcc);
    }
    mem.write_slice(&tramps, GuestAddress(pc.tramp))
        .map_err(|e| e.to_string())?;
    mem.write_slice(&page, GuestAddress(pc.copy))
        .map_err(|e| e.to_string())
}

/// The original address of the displaced instruction at `rip` in one of `pc`'s trampolines.
fn original_of(pc: &PageCopy, rip: u64) -> Option<u64> {
    let slot = rip.checked_sub(pc.tramp).filter(|o| *o < PAGE_SIZE)? / SLOT;
    let site = pc.sites.get(slot as usize)?;
    let off = rip - pc.tramp - slot * SLOT;
    displaced_offsets(site).into_iter().find_map(|start| {
        let d = off.checked_sub(start)?;
        (d < site.displaced.len() as u64).then_some(site.rip + UD2.len() as u64 + d)
    })
}

/// Where the parts of a site's trampoline start (offsets in its slot).
struct Layout {
    /// The cached path: the four `mov r32, imm32`, then the displaced instructions.
    hit: Option<u64>,
    /// The fallback's `cpuid`.
    cpuid: u64,
    /// The fallback's displaced instructions.
    displaced: u64,
}

fn layout(site: &Replaced) -> Layout {
    let d = site.displaced.len() as u64;
    match site.cached {
        Some(k) => {
            let hit = 12 + if k.subleaf.is_some() { 10 } else { 0 };
            // After the cached path's `jmp` back, `mov ecx, edx` (the subleaf back), `cpuid`.
            let restore = hit + 20 + d + 5;
            Layout {
                hit: Some(hit),
                cpuid: restore + 2,
                displaced: restore + 4,
            }
        }
        None => Layout {
            hit: None,
            cpuid: 0,
            displaced: 2,
        },
    }
}

/// A user-mode instruction pointer and the registers a move may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct At {
    rip: u64,
    rax: u64,
    rcx: u64,
    rdx: u64,
}

/// Moves a vCPU that ran on an older tree to the same point on the current one: out of a
/// retired trampoline (back to the original, redoing the `cpuid` where the lookup had
/// started: `ecx` restored from `edx`, `eax` from the cached leaf), and from the middle of a
/// site's displaced instructions in the original onto its trampoline's copy of them.
fn relocate(mut at: At, retired: &[PageCopy], current: &[PageCopy]) -> At {
    for pc in retired {
        let Some(off) = at.rip.checked_sub(pc.tramp).filter(|o| *o < PAGE_SIZE) else {
            continue;
        };
        let Some(site) = pc.sites.get((off / SLOT) as usize) else {
            break;
        };
        let off = off % SLOT;
        let l = layout(site);
        let d = site.displaced.len() as u64;
        let disp_starts = [l.hit.map(|h| h + 20), Some(l.displaced)];
        if let Some(o) = original_of(pc, at.rip) {
            at.rip = o;
        } else if disp_starts.iter().flatten().any(|s| off == s + d) {
            // At the `jmp` back.
            at.rip = site.end;
        } else if let (Some(hit), Some(k)) = (l.hit, site.cached)
            && off >= hit
            && off < hit + 20
        {
            // In the cached results: eax and ecx already overwritten.
            at.rax = u64::from(k.leaf);
            at.rcx = at.rdx & 0xffff_ffff;
            at.rip = site.rip;
        } else if off == l.cpuid || off == 0 {
            at.rip = site.rip;
        } else {
            // The lookup or `mov ecx, edx`: edx holds the subleaf.
            at.rcx = at.rdx & 0xffff_ffff;
            at.rip = site.rip;
        }
        break;
    }
    for pc in current {
        for (k, site) in pc.sites.iter().enumerate() {
            if at.rip > site.rip && at.rip < site.end {
                at.rip = pc.tramp
                    + k as u64 * SLOT
                    + layout(site).displaced
                    + (at.rip - site.rip - UD2.len() as u64);
                return at;
            }
        }
    }
    at
}

impl Replacer {
    pub(crate) fn new(vcpus: u32) -> Self {
        Self {
            in_guest: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            applied: (0..vcpus)
                .map(|_| AtomicU64::new(rebound_arch::layout::PML4))
                .collect(),
            quiesce: AtomicBool::new(false),
            gate: Mutex::new(()),
            released: Condvar::new(),
            change: Mutex::new(()),
            retired: Mutex::new(Vec::new()),
            s: Default::default(),
            refused: Default::default(),
            drops: Default::default(),
        }
    }

    pub(crate) fn set_state(&self, s: ReplaceState) {
        // The vCPUs' state came with it (a restore or rollback): each runs on its root.
        let root = if s.copies.is_empty() {
            rebound_arch::layout::PML4
        } else {
            s.root
        };
        for a in &self.applied {
            a.store(root, Ordering::SeqCst);
        }
        *lock(&self.s) = s;
        lock(&self.refused).clear();
    }

    /// Before a vCPU thread looks at its run request: holds while another vCPU changes the
    /// tree, then switches this vCPU to the current tree if it is on an older one (never
    /// inside a program: its exit returns to the current tree). On a KVM error the vCPU's
    /// state is unknown: the caller ends the VM.
    pub(crate) fn sync(
        &self,
        fd: &mut VcpuFd,
        vcpu: u32,
        vm: &VmShared,
    ) -> Result<(), kvm_ioctls::Error> {
        if self.quiesce.load(Ordering::SeqCst) {
            let mut g = lock(&self.gate);
            while self.quiesce.load(Ordering::SeqCst) {
                g = self
                    .released
                    .wait_timeout(g, Duration::from_millis(10))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        }
        let want = self.supervisor_root();
        let i = vcpu as usize;
        if self.applied[i].load(Ordering::SeqCst) == want || vm.programs.in_program(vcpu) {
            return Ok(());
        }
        crate::program::complete_pending(fd);
        let mut regs = fd.get_regs()?;
        let mut sregs = fd.get_sregs()?;
        let (copies, retired) = (lock(&self.s).copies.clone(), lock(&self.retired).clone());
        if sregs.cs.selector & 3 == 3 {
            let at = At {
                rip: regs.rip,
                rax: regs.rax,
                rcx: regs.rcx,
                rdx: regs.rdx,
            };
            let moved = relocate(at, &retired, &copies);
            if moved != at {
                (regs.rip, regs.rax, regs.rcx) = (moved.rip, moved.rax, moved.rcx);
                fd.set_regs(&regs)?;
            }
        } else if let Some(slot) =
            rebound_arch::system::stub_frame_rip(regs.rip).and_then(|o| regs.rsp.checked_add(o))
        {
            // In a fault stub (anywhere in it: a kick may stop it before or after its report):
            // only the return address can be in a moved range (a fault comes from a displaced
            // instruction, never from the lookup).
            if let Ok(rip) = vm.mem.read_obj::<u64>(GuestAddress(slot)) {
                let at = At {
                    rip,
                    rax: u64::MAX,
                    rcx: u64::MAX,
                    rdx: u64::MAX,
                };
                let moved = relocate(at, &retired, &copies);
                if moved.rip != rip {
                    let _ = vm.mem.write_obj(moved.rip, GuestAddress(slot));
                }
            }
        }
        sregs.cr3 = want;
        fd.set_sregs(&sregs)?;
        self.applied[i].store(want, Ordering::SeqCst);
        Ok(())
    }

    /// Right before `KVM_RUN`: false if a change began meanwhile (the caller goes round its
    /// loop, holding in [`Replacer::sync`]).
    pub(crate) fn enter(&self, vcpu: u32) -> bool {
        self.in_guest[vcpu as usize].store(true, Ordering::SeqCst);
        if self.quiesce.load(Ordering::SeqCst) {
            self.in_guest[vcpu as usize].store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// `KVM_RUN` returned.
    pub(crate) fn left(&self, vcpu: u32) {
        self.in_guest[vcpu as usize].store(false, Ordering::SeqCst);
    }

    /// Runs `f` with every other vCPU out of the guest (kicked, and holding before it enters
    /// again). Err if they did not all leave within a second (nothing changed).
    fn exclusive<T>(
        &self,
        vm: &VmShared,
        me: u32,
        f: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        let _one = lock(&self.change);
        struct Release<'a>(&'a Replacer);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                let _g = lock(&self.0.gate);
                self.0.quiesce.store(false, Ordering::SeqCst);
                self.0.released.notify_all();
            }
        }
        self.quiesce.store(true, Ordering::SeqCst);
        let _release = Release(self);
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let busy: Vec<usize> = (0..self.in_guest.len())
                .filter(|i| *i != me as usize && self.in_guest[*i].load(Ordering::SeqCst))
                .collect();
            if busy.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err("other vCPUs did not leave the guest".into());
            }
            {
                let threads = lock(&vm.vcpu_threads);
                for i in busy {
                    if let Some(t) = threads.get(i).filter(|t| !t.is_finished()) {
                        crate::kick::kick(t);
                    }
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        f()
    }

    fn retire(&self, pc: PageCopy) {
        lock(&self.retired).push(pc);
    }

    pub(crate) fn state(&self) -> ReplaceState {
        lock(&self.s).clone()
    }

    /// Checks a saved state against this VM: every page it names is in the pool or the image.
    pub(crate) fn check(&self, s: &ReplaceState, vm: &VmShared) -> Result<(), String> {
        let pool = vm.layout.pool().unwrap_or(0..0);
        let user = rebound_abi::IMAGE_BASE..vm.layout.heap_end();
        let root_ok = s.root == 0 || s.root == rebound_arch::layout::PML4 || pool.contains(&s.root);
        let copies_ok = s.copies.iter().all(|c| {
            pool.contains(&c.copy)
                && pool.contains(&c.tramp)
                && user.contains(&c.page)
                && c.sites.len() <= SLOTS
                && c.page.is_multiple_of(PAGE_SIZE)
                && c.sites.iter().all(|x| {
                    x.rip >= c.page
                        && x.end >= x.rip + JMP_REL32 as u64
                        && x.end <= c.page + PAGE_SIZE
                        && x.displaced.len() as u64 == x.end - x.rip - UD2.len() as u64
                })
        });
        let armed_ok = s.armed.len() <= MAX_ARMED && s.armed.iter().all(|a| user.contains(&a.rip));
        if root_ok && copies_ok && armed_ok && (s.copies.is_empty() || s.root != 0) {
            Ok(())
        } else {
            Err("replaced-page state does not fit this VM".into())
        }
    }

    /// The tree the guest's own code (not a program) runs on: the boot tree, or the one
    /// mapping the copies.
    pub(crate) fn supervisor_root(&self) -> u64 {
        let g = lock(&self.s);
        if g.copies.is_empty() {
            rebound_arch::layout::PML4
        } else {
            g.root
        }
    }

    /// Where a vCPU at `rip` (user mode) resumes on the current tree, if somewhere else.
    pub(crate) fn relocation(&self, rip: u64) -> Option<u64> {
        let at = At {
            rip,
            rax: u64::MAX,
            rcx: u64::MAX,
            rdx: u64::MAX,
        };
        let copies = lock(&self.s).copies.clone();
        let moved = relocate(at, &lock(&self.retired), &copies);
        // Only moves that keep the registers (a fault never comes from the lookup).
        (moved.rip != rip && moved.rax == u64::MAX && moved.rcx == u64::MAX).then_some(moved.rip)
    }

    /// Whether `rip` is a site running from a copy now.
    pub(crate) fn is_replaced(&self, rip: u64) -> bool {
        lock(&self.s)
            .copies
            .iter()
            .any(|c| c.sites.iter().any(|s| s.rip == rip))
    }

    pub(crate) fn is_refused(&self, rip: u64) -> bool {
        lock(&self.refused).contains(&rip)
    }

    pub(crate) fn is_armed(&self, rip: u64) -> bool {
        lock(&self.s).armed.iter().any(|a| a.rip == rip)
    }

    /// Sites now running from copies.
    pub(crate) fn replaced_sites(&self) -> Vec<u64> {
        lock(&self.s)
            .copies
            .iter()
            .flat_map(|c| c.sites.iter().map(|s| s.rip))
            .collect()
    }

    pub(crate) fn armed_count(&self) -> u64 {
        lock(&self.s).armed.len() as u64
    }

    /// Builds the tree for `copies` (the boot tree if none) and loads it on the vCPU.
    fn switch(vm: &VmShared, fd: &mut VcpuFd, copies: &[PageCopy]) -> Result<u64, String> {
        let root = if copies.is_empty() {
            rebound_arch::layout::PML4
        } else {
            let overlays: Vec<Overlay> = copies
                .iter()
                .flat_map(|c| {
                    [
                        Overlay {
                            va: c.page,
                            gpa: c.copy,
                            flags: USER_EXEC_PAGE,
                        },
                        Overlay {
                            va: c.tramp,
                            gpa: c.tramp,
                            flags: USER_EXEC_PAGE,
                        },
                    ]
                })
                .collect();
            vm.programs
                .with_pool(vm, |alloc| {
                    overlay_tables(&vm.mem, rebound_arch::layout::PML4, &overlays, alloc)
                })
                .map_err(|e| e.to_string())?
        };
        crate::program::complete_pending(fd);
        let mut sregs = fd.get_sregs().map_err(|e| e.to_string())?;
        sregs.cr3 = root;
        fd.set_sregs(&sregs).map_err(|e| e.to_string())?;
        Ok(root)
    }

    /// Replaces the hot armed site `rip` (the vCPU is in the #UD stub for it, CR3 `cr3`).
    /// `(leaf, subleaf)` is what it was asked. On success the vCPU runs the copy: the stub
    /// returns to `rip`, which now jumps to the trampoline.
    pub(crate) fn replace(
        &self,
        fd: &mut VcpuFd,
        vm: &VmShared,
        vcpu: u32,
        rip: u64,
        cr3: u64,
        (leaf, subleaf): (u32, u32),
    ) -> Result<(), String> {
        if lock(&self.refused).contains(&rip) {
            return Err("refused before".into());
        }
        // A site hot inside a program (another tree in CR3) may be replaced later, when it
        // is hot in the supervisor; any other refusal stands until its page changes.
        if cr3 & !0xfff != self.supervisor_root() {
            return Err("the vCPU runs on another tree (a program)".into());
        }
        // Not while a pause is pending: a parked vCPU's saved CR3 must match the saved tree.
        if vm.control.current() != crate::wait::Request::Run {
            return Err("a pause is pending".into());
        }
        let r = self.exclusive(vm, vcpu, || {
            self.try_replace(fd, vm, vcpu, rip, leaf, subleaf)
        });
        if matches!(&r, Err(e) if e == "other vCPUs did not leave the guest") {
            return r;
        }
        if let Err(e) = &r {
            tracing::debug!(rip, "emulation: cpuid site not replaced: {e}");
            lock(&self.refused).insert(rip);
        }
        r
    }

    fn try_replace(
        &self,
        fd: &mut VcpuFd,
        vm: &VmShared,
        vcpu: u32,
        rip: u64,
        leaf: u32,
        subleaf: u32,
    ) -> Result<(), String> {
        let mut g = lock(&self.s);
        if g.copies
            .iter()
            .any(|c| c.sites.iter().any(|s| s.rip == rip))
        {
            // Another vCPU replaced it meanwhile.
            return Ok(());
        }
        let func = g
            .armed
            .iter()
            .find(|a| a.rip == rip)
            .map(|a| a.func)
            .ok_or("not armed")?;
        let (end, displaced) = plan(&vm.mem, rip, func)?;
        let site = Replaced {
            rip,
            end,
            displaced,
            cached: cacheable(leaf, subleaf),
        };
        let page = rip & !(PAGE_SIZE - 1);
        let mut copies = g.copies.clone();
        let mut pc = match copies.iter().position(|c| c.page == page) {
            Some(i) => {
                let old = copies.remove(i);
                self.retire(old.clone());
                old
            }
            None => PageCopy {
                page,
                copy: 0,
                tramp: 0,
                sites: Vec::new(),
            },
        };
        if pc.sites.len() >= SLOTS {
            return Err("the page has no trampoline slot left".into());
        }
        pc.sites.push(site);
        // Fresh pages: the old copy may still be in a TLB of this vCPU until CR3 changes.
        let (copy, tramp) = vm
            .programs
            .with_pool(vm, |alloc| {
                Ok::<_, rebound_arch::Error>((alloc()?, alloc()?))
            })
            .map_err(|e| e.to_string())?;
        pc.copy = copy;
        pc.tramp = tramp;
        write_copy(&vm.mem, &pc)?;
        copies.push(pc);
        let root = Self::switch(vm, fd, &copies)?;
        g.copies = copies;
        g.root = root;
        self.applied[vcpu as usize].store(root, Ordering::SeqCst);
        tracing::debug!(
            rip,
            page,
            root,
            "emulation: cpuid site replaced in a copied page"
        );
        Ok(())
    }

    /// A write fault at `cr2` by the instruction at `*rip`: if it hit a copied page, drops the
    /// copy (the vCPU switches to a tree without it) and returns the sites that ran from it;
    /// the stub then runs the write again on the original. A write made by a displaced
    /// instruction in the dropped copy's trampoline moves `*rip` to that instruction in the
    /// original (the trampoline page is no longer mapped). None: not a copied page. Never
    /// called for a vCPU running a program (its faults are its supervisor's, and switching
    /// its CR3 would free it).
    pub(crate) fn write_watch(
        &self,
        fd: &mut VcpuFd,
        vm: &VmShared,
        vcpu: u32,
        cr2: u64,
        cr3: u64,
        rip: &mut u64,
    ) -> Option<Result<Vec<u64>, String>> {
        let page = cr2 & !(PAGE_SIZE - 1);
        if !lock(&self.s).copies.iter().any(|c| c.page == page) {
            // A write that faulted on an older tree (another vCPU changed it while this one
            // was handling the fault): it runs again on the current tree.
            let stale = cr3 & !0xfff != self.supervisor_root()
                && lock(&self.retired).iter().any(|c| c.page == page);
            return stale.then(|| Ok(Vec::new()));
        }
        // While a pause is pending, or the other vCPUs do not stop: nothing changes and the
        // write faults again when the stub returns (after the pause, or a moment later).
        if vm.control.current() != crate::wait::Request::Run {
            return Some(Ok(Vec::new()));
        }
        let r = self.exclusive(vm, vcpu, || self.drop_copy(fd, vm, vcpu, page, rip));
        Some(match r {
            Err(e) if e == "other vCPUs did not leave the guest" => Ok(Vec::new()),
            r => r,
        })
    }

    fn drop_copy(
        &self,
        fd: &mut VcpuFd,
        vm: &VmShared,
        vcpu: u32,
        page: u64,
        rip: &mut u64,
    ) -> Result<Vec<u64>, String> {
        let mut g = lock(&self.s);
        let Some(i) = g.copies.iter().position(|c| c.page == page) else {
            return Ok(Vec::new());
        };
        let mut copies = g.copies.clone();
        let dropped = copies.remove(i);
        if let Some(orig) = original_of(&dropped, *rip) {
            *rip = orig;
        }
        Self::switch(vm, fd, &copies).map(|root| {
            g.copies = copies;
            g.root = root;
            self.applied[vcpu as usize].store(root, Ordering::SeqCst);
            self.retire(dropped.clone());
            let sites: Vec<u64> = dropped.sites.iter().map(|s| s.rip).collect();
            drop(g);
            let again = {
                let mut d = lock(&self.drops);
                let n = d.entry(page).or_insert(0);
                *n += 1;
                *n < MAX_DROPS
            };
            let mut refused = lock(&self.refused);
            for s in &sites {
                if again {
                    refused.remove(s);
                } else {
                    refused.insert(*s);
                }
            }
            tracing::debug!(page, "emulation: copied page written; copy dropped");
            sites
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(at: u64, code: &[u8]) -> Vec<Instruction> {
        let mut d = Decoder::with_ip(64, code, at, DecoderOptions::NONE);
        let mut v = Vec::new();
        while d.can_decode() {
            v.push(d.decode());
        }
        v
    }

    #[test]
    fn trampoline_decodes_to_the_lookup_and_the_fallback() {
        let site = Replaced {
            rip: 0x40_1000,
            end: 0x40_1007,
            // mov eax, 7
            displaced: vec![0xb8, 7, 0, 0, 0],
            cached: Some(Cached {
                leaf: 0x8000_0002,
                subleaf: Some(3),
                regs: [1, 2, 3, 4],
            }),
        };
        let at = 0x3e0_0080;
        let code = trampoline(at, &site).unwrap();
        let insns = decode_all(at, &code);
        let codes: Vec<Code> = insns.iter().map(|i| i.code()).collect();
        use Code::*;
        assert_eq!(
            codes,
            [
                Mov_rm32_r32,
                Lea_r32_m,
                Jrcxz_rel8_64,
                Jmp_rel8_64,
                Lea_r32_m,
                Jrcxz_rel8_64,
                Jmp_rel8_64,
                Mov_r32_imm32,
                Mov_r32_imm32,
                Mov_r32_imm32,
                Mov_r32_imm32,
                Mov_r32_imm32,
                Jmp_rel32_64,
                Mov_rm32_r32,
                Cpuid,
                Mov_r32_imm32,
                Jmp_rel32_64
            ]
        );
        assert_eq!(
            insns[1].memory_displacement32(),
            0x8000_0002u32.wrapping_neg()
        );
        assert_eq!(insns[1].op0_register(), iced_x86::Register::ECX);
        assert_eq!(insns[4].memory_base(), iced_x86::Register::RDX);
        // Both misses land on `mov ecx, edx` before the real cpuid.
        assert_eq!(insns[3].near_branch_target(), insns[13].ip());
        assert_eq!(insns[6].near_branch_target(), insns[13].ip());
        assert_eq!(insns[2].near_branch_target(), insns[4].ip());
        assert_eq!(insns[5].near_branch_target(), insns[7].ip());
        assert_eq!(insns[12].near_branch_target(), site.end);
        assert_eq!(insns[16].near_branch_target(), site.end);
        // Nothing touches flags or the stack.
        for i in &insns {
            assert!(i.rflags_modified() == 0, "{:?}", i.code());
            assert!(!i.is_stack_instruction(), "{:?}", i.code());
        }
        // Without a cached leaf: the real cpuid only.
        let plain = Replaced {
            cached: None,
            ..site
        };
        let codes: Vec<Code> = decode_all(at, &trampoline(at, &plain).unwrap())
            .iter()
            .map(|i| i.code())
            .collect();
        assert_eq!(codes, [Cpuid, Mov_r32_imm32, Jmp_rel32_64]);
    }

    #[test]
    fn displaced_instructions_map_back_to_the_original() {
        for cached in [
            None,
            Some(Cached {
                leaf: 0,
                subleaf: None,
                regs: [1, 2, 3, 4],
            }),
            Some(Cached {
                leaf: 7,
                subleaf: Some(0),
                regs: [1, 2, 3, 4],
            }),
        ] {
            let site = Replaced {
                rip: 0x40_1010,
                end: 0x40_1017,
                displaced: vec![0xb8, 7, 0, 0, 0],
                cached,
            };
            let pc = PageCopy {
                page: 0x40_1000,
                copy: 0x3e0_0000,
                tramp: 0x3e0_1000,
                sites: vec![site.clone()],
            };
            let code = trampoline(pc.tramp, &site).unwrap();
            let movs: Vec<u64> = decode_all(pc.tramp, &code)
                .iter()
                .filter(|i| i.code() == Code::Mov_r32_imm32 && i.immediate32() == 7)
                .map(|i| i.ip())
                .collect();
            assert_eq!(movs.len(), if cached.is_some() { 2 } else { 1 });
            for m in movs {
                assert_eq!(original_of(&pc, m), Some(0x40_1012));
            }
            assert_eq!(original_of(&pc, pc.tramp), None);
        }
    }

    #[test]
    fn vcpus_are_moved_out_of_retired_trampolines_and_displaced_ranges() {
        let site = Replaced {
            rip: 0x40_1010,
            end: 0x40_1017,
            displaced: vec![0xb8, 7, 0, 0, 0],
            cached: Some(Cached {
                leaf: 0x8000_0002,
                subleaf: Some(3),
                regs: [1, 2, 3, 4],
            }),
        };
        let old = PageCopy {
            page: 0x40_1000,
            copy: 0x3e0_0000,
            tramp: 0x3e0_1000,
            sites: vec![site.clone()],
        };
        let new = PageCopy {
            copy: 0x3e0_2000,
            tramp: 0x3e0_3000,
            ..old.clone()
        };
        let insns = decode_all(old.tramp, &trampoline(old.tramp, &site).unwrap());
        let at = |rip| At {
            rip,
            rax: 0x8000_0002,
            rcx: 0,
            rdx: 3,
        };
        // In the lookup (after `mov edx, ecx`): back to the site with the subleaf in ecx.
        let r = relocate(at(insns[2].ip()), std::slice::from_ref(&old), &[]);
        assert_eq!((r.rip, r.rcx), (site.rip, 3));
        // In the cached results: eax is the leaf again.
        let r = relocate(
            At {
                rax: 1,
                ..at(insns[9].ip())
            },
            std::slice::from_ref(&old),
            &[],
        );
        assert_eq!((r.rip, r.rax, r.rcx), (site.rip, 0x8000_0002, 3));
        // The displaced `mov` of either path: the original's, and with the page copied again,
        // the new trampoline's fallback copy of it.
        for i in [11, 15] {
            let r = relocate(at(insns[i].ip()), std::slice::from_ref(&old), &[]);
            assert_eq!(r.rip, site.rip + 2);
            let r = relocate(
                at(insns[i].ip()),
                std::slice::from_ref(&old),
                std::slice::from_ref(&new),
            );
            let newer = decode_all(new.tramp, &trampoline(new.tramp, &site).unwrap());
            assert_eq!(r.rip, newer[15].ip());
        }
        // At a `jmp` back: the end of the site.
        let r = relocate(at(insns[12].ip()), std::slice::from_ref(&old), &[]);
        assert_eq!(r.rip, site.end);
        // Elsewhere: unchanged.
        assert_eq!(relocate(at(0x40_2000), &[old], &[new]), at(0x40_2000));
    }

    #[test]
    fn per_cpu_leaves_are_not_cached() {
        assert!(cacheable(1, 0).is_none());
        assert!(cacheable(0xb, 0).is_none());
        let c = cacheable(0, 5).expect("leaf 0 is the same on every CPU");
        assert_eq!(c.subleaf, None);
        assert_eq!(c.regs, cpuid(0, 0));
    }
}
