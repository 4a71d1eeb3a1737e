//! The hypercall handler: one function per ABI call (see `docs/abi.md`).
//!
//! Arguments are copied out of the calling vCPU's `VcpuPage` once, then validated: every pointer
//! and length the guest passes is checked against guest memory before use, and a bad call gets
//! a negative errno (and is counted), never a VMM panic.

use std::mem::offset_of;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rebound_abi::{
    ABI_VERSION, BLOCK_TIMED_OUT, BLOCK_WOKEN, CONSOLE_WRITE_MAX, VCPU_PAGE_ROUTES_OFFSET,
    VcpuPage, errno, indicator, nr,
};
use vm_memory::{Bytes, GuestAddress};

use crate::vm::{VmOutcome, VmShared};
use crate::wait::Wake;

const ARGS: u64 = offset_of!(VcpuPage, args) as u64;
const RET: u64 = offset_of!(VcpuPage, ret) as u64;

/// What the vCPU does after the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Re-enter the guest.
    Continue,
    /// The VM is over.
    Stop,
    /// Switch to or from a program (the vCPU thread does it).
    Switch(crate::program::Switch),
}

/// Handles hypercall `nr` from `vcpu`.
pub(crate) fn handle(vm: &VmShared, vcpu: u32, nr: u32) -> Flow {
    vm.metrics.hypercall(nr);
    let in_program = vm.programs.in_program(vcpu);
    // A program calls through its own page (its gs base), not the supervisor's vCPU page.
    let page = match in_program {
        true => crate::program::Programs::page(vm, vcpu).unwrap_or(vm.layout.vcpu_page(vcpu)),
        false => vm.layout.vcpu_page(vcpu),
    };
    let args: [u64; 6] = vm.mem.read_obj(GuestAddress(page + ARGS)).unwrap_or([0; 6]);
    let (ret, flow) = match nr {
        _ if in_program && !crate::program::Programs::allowed(nr) => (errno::EPERM, Flow::Continue),
        nr::CONSOLE_WRITE if in_program && !vm.programs.readable(vcpu, args[0], args[1]) => {
            (errno::EFAULT, Flow::Continue)
        }
        nr::PROGRAM_SET => (
            vm.programs.set(vm, args[0], args[1], args[2]),
            Flow::Continue,
        ),
        nr::PROGRAM_RUN => match vm.programs.run(vm, vcpu, &args) {
            Ok(s) => (0, Flow::Switch(s)),
            Err(e) => (e, Flow::Continue),
        },
        nr::PROGRAM_EXIT => match vm.programs.exit(vcpu, args[0]) {
            Ok(s) => (0, Flow::Switch(s)),
            Err(e) => (e, Flow::Continue),
        },
        nr::ABI_VERSION => (i64::from(ABI_VERSION), Flow::Continue),
        nr::CONSOLE_WRITE => (console_write(vm, args[0], args[1]), Flow::Continue),
        nr::CLOCK_MONOTONIC => (vm.clock_ns() as i64, Flow::Continue),
        nr::CLOCK_REALTIME => (realtime_ns(), Flow::Continue),
        nr::BLOCK => (block(vm, vcpu, args[0]), Flow::Continue),
        nr::YIELD => {
            std::thread::yield_now();
            (0, Flow::Continue)
        }
        nr::EXIT => {
            // Exit statuses are taken modulo 256, as for a process.
            vm.finish(VmOutcome::Exited {
                status: (args[0] & 0xff) as i32,
            });
            (0, Flow::Stop)
        }
        nr::PANIC => {
            let message = match guest_bytes(vm, args[0], args[1].min(CONSOLE_WRITE_MAX)) {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(_) => format!(
                    "<panic message at {:#x} (+{}) is outside guest memory>",
                    args[0], args[1]
                ),
            };
            vm.finish(VmOutcome::Panicked { vcpu, message });
            (0, Flow::Stop)
        }
        nr::IO_SETUP => (vm.ioq.register(vcpu, args[0], args[1]), Flow::Continue),
        nr::NET_SETUP => (
            vm.nics.as_ref().map_or(rebound_abi::errno::ENODEV, |n| {
                n.register(args[0], args[1], args[2], args[3], args[4])
            }),
            Flow::Continue,
        ),
        nr::SHARE_NOTIFY => (
            vm.shares
                .notify(args[0], args[1])
                .map_or(errno::EINVAL, |n| n as i64),
            Flow::Continue,
        ),
        nr::SHARE_RECOVER => (
            vm.shares
                .recover(args[0])
                .map_or(errno::EINVAL, |n| n as i64),
            Flow::Continue,
        ),
        nr::MEM_SETUP => (vm.classes.setup(vm, vcpu, args[0]), Flow::Continue),
        nr::MEM_RETURN => (vm.classes.give_back(vm, args[0], args[1]), Flow::Continue),
        nr::CLONE_POINT => (vm.clone_gate.point(vm, vcpu), Flow::Continue),
        nr::NESTED_CREATE => (vm.nested.create(vm, args[0]), Flow::Continue),
        nr::NESTED_VCPU => (
            vm.nested.vcpu(vm, args[0], args[1], args[2]),
            Flow::Continue,
        ),
        nr::NESTED_RUN => (vm.nested.run(vm, args[0], args[1], args[2]), Flow::Continue),
        nr::NESTED_DESTROY => (vm.nested.destroy(vm, args[0]), Flow::Continue),
        nr::NESTED_START => (vm.nested.start(vm, vcpu, args[0], args[1]), Flow::Continue),
        nr::INDICATOR_SET => (
            indicator_set(vm, page, args[0], args[1], args[2]),
            Flow::Continue,
        ),
        nr::GENERATION => (
            vm.generation.load(std::sync::atomic::Ordering::Relaxed) as i64,
            Flow::Continue,
        ),
        _ => (errno::ENOSYS, Flow::Continue),
    };
    if ret < 0 {
        vm.metrics.hypercall_error(ret);
        tracing::debug!(vcpu, nr, ret, "hypercall refused");
    }
    // The page is inside guest memory by construction; a failure here cannot happen.
    let _ = vm.mem.write_obj(ret, GuestAddress(page + RET));
    flow
}

/// Copies `len` bytes of guest memory at `ptr`, or the errno to return.
fn guest_bytes(vm: &VmShared, ptr: u64, len: u64) -> Result<Vec<u8>, i64> {
    if len > CONSOLE_WRITE_MAX {
        return Err(errno::E2BIG);
    }
    if !vm.layout.is_guest_readable(ptr, len) {
        return Err(errno::EFAULT);
    }
    let mut buf = vec![0u8; len as usize];
    vm.mem
        .read_slice(&mut buf, GuestAddress(ptr))
        .map_err(|_| errno::EFAULT)?;
    Ok(buf)
}

fn console_write(vm: &VmShared, ptr: u64, len: u64) -> i64 {
    match guest_bytes(vm, ptr, len) {
        Ok(bytes) => match vm.console.write(&bytes) {
            Ok(()) => len as i64,
            Err(_) => errno::EIO,
        },
        Err(e) => e,
    }
}

/// `INDICATOR_SET` (ABI 1.10): writes the route byte of requester `(kind, index)` in the
/// calling vCPU's page (`page`): `bit + 1`, or 0 for [`indicator::NONE`].
fn indicator_set(vm: &VmShared, page: u64, kind: u64, index: u64, bit: u64) -> i64 {
    let Some(slot) = indicator::slot(kind, index) else {
        return errno::EINVAL;
    };
    let route = match bit {
        indicator::NONE => 0u8,
        0..=63 => bit as u8 + 1,
        _ => return errno::EINVAL,
    };
    let at = GuestAddress(page + VCPU_PAGE_ROUTES_OFFSET + slot as u64);
    match vm.mem.write_obj(route, at) {
        Ok(()) => 0,
        Err(_) => errno::EFAULT,
    }
}

fn realtime_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn block(vm: &VmShared, vcpu: u32, timeout_ns: u64) -> i64 {
    let timeout = (timeout_ns != u64::MAX).then(|| Duration::from_nanos(timeout_ns));
    let wake = vm.waiters.block(vcpu, timeout, &vm.control);
    vm.metrics.block(wake);
    if wake == Wake::Timeout {
        BLOCK_TIMED_OUT
    } else {
        BLOCK_WOKEN
    }
}
