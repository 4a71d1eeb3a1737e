//! Privileged instructions a CPL3 guest faults on (#GP, #UD), decoded with a real x86 decoder
//! and emulated where the VMM can give the same answer the instruction would at CPL0.
//!
//! The fault stub saved the guest's `rax` and `rdx` in its frame and returns with `iretq`: the
//! VMM writes results there and moves the saved `rip` past the instruction, so no register
//! ioctl is needed to resume.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction};
use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;
use rebound_arch::system::{STUB_FRAME_WORDS, USER_CS};
use vm_memory::{Bytes, GuestAddress};

use crate::vm::VmShared;

/// Index of each saved word in the stub's frame.
const RDX: usize = 0;
const RAX: usize = 1;
const VECTOR: usize = 2;
const ERROR: usize = 3;
const RIP: usize = 4;
const CS: usize = 5;

/// `rdmsr` of these MSRs is emulated (KVM reads the vCPU's value): the time-stamp counter and
/// `TSC_AUX` (what `rdtscp` returns with it). Any other MSR stays a fault.
const READABLE_MSRS: [u32; 2] = [0x10, 0xc000_0103];

/// The stub's frame, read from the vCPU's exception stack.
pub(crate) struct Frame {
    at: u64,
    words: [u64; STUB_FRAME_WORDS],
}

impl Frame {
    pub(crate) fn read(fd: &VcpuFd, vm: &VmShared) -> Option<Frame> {
        let at = fd.get_regs().ok()?.rsp;
        let mut words = [0u64; STUB_FRAME_WORDS];
        for (i, w) in words.iter_mut().enumerate() {
            *w = vm
                .mem
                .read_obj(GuestAddress(at.checked_add(8 * i as u64)?))
                .ok()?;
        }
        Some(Frame { at, words })
    }

    pub(crate) fn rip(&self) -> u64 {
        self.words[RIP]
    }

    /// The vector, the error code, and whether the fault came from CPL3.
    pub(crate) fn vector(&self) -> u64 {
        self.words[VECTOR]
    }

    pub(crate) fn error(&self) -> u64 {
        self.words[ERROR]
    }

    pub(crate) fn at_cpl3(&self) -> bool {
        self.words[CS] & 3 == u64::from(USER_CS & 3)
    }

    /// The guest's saved `rax`.
    pub(crate) fn rax(&self) -> u64 {
        self.words[RAX]
    }

    /// Results in the saved `rax`/`rdx`, and the guest resumed `len` bytes on.
    pub(crate) fn complete(&mut self, rax: u64, rdx: u64, len: u64) {
        self.words[RAX] = rax;
        self.words[RDX] = rdx;
        self.words[RIP] = self.words[RIP].wrapping_add(len);
    }

    pub(crate) fn set_rip(&mut self, rip: u64) {
        self.words[RIP] = rip;
    }

    fn set(&mut self, i: usize, v: u64) {
        self.words[i] = v;
    }

    pub(crate) fn write(&self, vm: &VmShared) -> bool {
        vm.mem.write_obj(self.words, GuestAddress(self.at)).is_ok()
    }
}

/// What the emulator made of a faulting instruction.
pub(crate) enum Emulated {
    /// Done; the guest goes on after it. The mnemonic names the site.
    Done(&'static str),
    /// Not an instruction the VMM emulates: the fault stands.
    No,
}

/// Decodes the instruction at the frame's `rip` (guest memory is identity-mapped, so the
/// address is the physical one; code outside guest memory is not emulated).
fn decode(vm: &VmShared, rip: u64) -> Option<Instruction> {
    let mut bytes = [0u8; 15];
    let n = (vm.layout.mem_size().checked_sub(rip)?).min(15) as usize;
    if n == 0 || rip < rebound_abi::IMAGE_BASE {
        return None;
    }
    vm.mem.read_slice(&mut bytes[..n], GuestAddress(rip)).ok()?;
    let mut d = Decoder::with_ip(64, &bytes[..n], rip, DecoderOptions::NONE);
    let insn = d.decode();
    (!insn.is_invalid()).then_some(insn)
}

/// Emulates the instruction that faulted with `frame`, if the VMM can.
pub(crate) fn emulate(fd: &VcpuFd, vcpu: u32, vm: &VmShared, frame: &mut Frame) -> Emulated {
    // Only faults of CPL3 code with #GP or #UD; a fault inside a stub is never resumed.
    if frame.words[CS] & 3 != u64::from(USER_CS & 3) || !matches!(frame.words[VECTOR], 6 | 13) {
        return Emulated::No;
    }
    let Some(insn) = decode(vm, frame.rip()) else {
        return Emulated::No;
    };
    let name = match insn.code() {
        Code::Hlt => {
            // No interrupts reach SDK guests: `hlt` waits for what wakes `BLOCK` (an event,
            // a request from the host, a pause).
            let wake = vm.waiters.block(vcpu, None, &vm.control);
            vm.metrics.block(wake);
            "hlt"
        }
        Code::Rdmsr => {
            let rcx = match fd.get_regs() {
                Ok(r) => r.rcx as u32,
                Err(_) => return Emulated::No,
            };
            if !READABLE_MSRS.contains(&rcx) {
                return Emulated::No;
            }
            let Some(value) = read_msr(fd, rcx) else {
                return Emulated::No;
            };
            frame.set(RAX, value & 0xffff_ffff);
            frame.set(RDX, value >> 32);
            "rdmsr"
        }
        _ => return Emulated::No,
    };
    frame.set(RIP, frame.rip().wrapping_add(insn.len() as u64));
    if frame.write(vm) {
        Emulated::Done(name)
    } else {
        Emulated::No
    }
}

fn read_msr(fd: &VcpuFd, index: u32) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    (fd.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
}
