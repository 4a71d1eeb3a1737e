//! The vCPU thread: the one place where every VM exit is handled.
//!
//! Port map (all reachable from CPL3 through the TSS I/O bitmap, see `rebound-arch`):
//! - `0x510` hypercall: `hypercall::handle`
//! - `0x514` I/O doorbell: normally absorbed by an ioeventfd in the kernel; an access that
//!   still exits (another width) is forwarded to the same eventfd
//! - `0x518` fault report from the CPL0 exception stubs: the emulation module
//!   (`emulate::Emulator::fault`) resumes the guest after instructions it emulates; any other
//!   fault ends the VM with `fault::from_stub`
//! - `0x80` (POST code), and any other emulated device port: `emulate::Emulator`
//! - anything else: counted as a bad access, reads return all ones.

use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};
use rebound_abi::port;

use crate::hypercall::{self, Flow};
use crate::kick;
use crate::metrics::ExitKind;
use crate::vm::{VmOutcome, VmShared};
use crate::wait::Request;
use crate::{fault, vstate};

/// What to do after an exit, decided while the exit still borrows the vCPU.
enum Next {
    Continue,
    Stop,
    /// The guest faulted; build the report from the vCPU's registers.
    Fault(FaultSource),
    /// An emulated device handled the access; count its site.
    Emulated(crate::emulate::sites::Op),
    /// Switch to or from a program.
    Switch(crate::program::Switch),
}

enum FaultSource {
    Stub,
    Exit(String),
}

fn le_u32(data: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    let n = data.len().min(4);
    w[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(w)
}

fn on_exit(exit: VcpuExit<'_>, id: u32, vm: &VmShared) -> Next {
    match exit {
        VcpuExit::IoOut(p, data) => {
            vm.metrics.exit(ExitKind::IoOut);
            match p {
                port::HYPERCALL => match hypercall::handle(vm, id, le_u32(data)) {
                    Flow::Continue => Next::Continue,
                    Flow::Stop => Next::Stop,
                    Flow::Switch(s) => Next::Switch(s),
                },
                port::FAULT => Next::Fault(FaultSource::Stub),
                port::DOORBELL => {
                    let _ = vm.ioq.doorbell().write(1);
                    Next::Continue
                }
                port::NESTED_DOORBELL => {
                    vm.nested.doorbell(le_u32(data));
                    Next::Continue
                }
                _ => match data.first().and_then(|v| vm.emulator.port_out(p, *v)) {
                    Some(op) => Next::Emulated(op),
                    None => {
                        vm.metrics.bad_port();
                        Next::Continue
                    }
                },
            }
        }
        VcpuExit::IoIn(p, data) => {
            vm.metrics.exit(ExitKind::IoIn);
            match vm.emulator.port_in(p) {
                Some((value, op)) => {
                    // Wider reads see the register in the low byte, ones above.
                    data.fill(0xff);
                    if let Some(b) = data.first_mut() {
                        *b = value;
                    }
                    Next::Emulated(op)
                }
                None => {
                    vm.metrics.bad_port();
                    data.fill(0xff);
                    Next::Continue
                }
            }
        }
        VcpuExit::MmioRead(_, data) => {
            vm.metrics.exit(ExitKind::Mmio);
            vm.metrics.bad_mmio();
            data.fill(0xff);
            Next::Continue
        }
        VcpuExit::MmioWrite(..) => {
            vm.metrics.exit(ExitKind::Mmio);
            vm.metrics.bad_mmio();
            Next::Continue
        }
        VcpuExit::Hlt => {
            vm.metrics.exit(ExitKind::Hlt);
            Next::Fault(FaultSource::Exit("halted: hlt reached the VMM".into()))
        }
        VcpuExit::Shutdown => {
            vm.metrics.exit(ExitKind::Shutdown);
            Next::Fault(FaultSource::Exit(
                "triple fault (the CPU could not deliver an exception)".into(),
            ))
        }
        VcpuExit::FailEntry(reason, _) => {
            vm.metrics.exit(ExitKind::Failure);
            Next::Fault(FaultSource::Exit(format!(
                "KVM could not enter the guest (hardware reason {reason:#x})"
            )))
        }
        VcpuExit::InternalError => {
            vm.metrics.exit(ExitKind::Failure);
            Next::Fault(FaultSource::Exit(
                "KVM internal error: an instruction this host cannot emulate".into(),
            ))
        }
        other => {
            vm.metrics.exit(ExitKind::Other);
            Next::Fault(FaultSource::Exit(format!("unexpected VM exit {other:?}")))
        }
    }
}

/// Parks the vCPU while the VM is paused, with any half-done port access completed first so
/// its saved state is clean.
/// While parked, the vCPU's state is published for checkpoints, and a state put in its slot
/// (a rollback) is applied before it runs again.
fn park(fd: &mut VcpuFd, id: u32, vm: &VmShared) {
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
    let slot = &vm.vcpu_slots[id as usize];
    // Nested guests' writes bypass this VM's dirty log: merged before any checkpoint (the
    // controller does it again for started nested vCPUs, which run on threads of their own).
    vm.nested.harvest_dirty(vm);
    *lock(&slot.captured) = Some(vstate::capture(fd, id).map_err(|e| e.to_string()));
    vm.control.park();
    if let Some(state) = lock(&slot.restore).take() {
        match vstate::apply(fd, &state) {
            // Its TSC may have been set back with the rest of its state.
            Ok(()) => publish_clock(fd, id, vm),
            Err(e) => vm.finish(VmOutcome::Failed {
                error: e.to_string(),
            }),
        }
    }
    vm.waiters.clear_interrupt(id);
}

/// Writes how this vCPU reads the clock from its TSC into its page (ABI 1.5). Only while the
/// vCPU is out of the guest, so it never sees the fields half-written; `seq` changes so a read
/// that an exit interrupted starts again.
fn publish_clock(fd: &VcpuFd, id: u32, vm: &VmShared) {
    use vm_memory::Bytes;
    let mut clock = vm.clock.for_vcpu(fd);
    let at = vm_memory::GuestAddress(vm.layout.vcpu_page(id) + rebound_abi::VCPU_PAGE_CLOCK_OFFSET);
    let seq: u32 = vm.mem.read_obj(at).unwrap_or(0);
    clock.seq = seq.wrapping_add(1);
    if let Err(e) = vm.mem.write_obj(clock, at) {
        tracing::warn!(vcpu = id, "cannot publish the clock: {e}");
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The vCPU thread body: runs until the VM stops.
pub(crate) fn run(mut fd: VcpuFd, id: u32, vm: Arc<VmShared>) {
    kick::arm(&mut fd);
    publish_clock(&fd, id, &vm);
    loop {
        // Onto the current page-table tree first, so a parked vCPU's saved state matches it.
        if let Err(e) = vm.emulator.replacer.sync(&mut fd, id, &vm) {
            vm.finish(VmOutcome::Failed {
                error: format!("vCPU {id}: switching to replaced pages failed: {e}"),
            });
            break;
        }
        match vm.control.current() {
            Request::Run => {}
            Request::Pause => {
                park(&mut fd, id, &vm);
                continue;
            }
            Request::Stop => break,
        }
        if !vm.emulator.replacer.enter(id) {
            continue;
        }
        let run = fd.run();
        vm.emulator.replacer.left(id);
        let next = match run {
            Ok(exit) => {
                if vm.metrics.first_exit_ns() == 0 {
                    vm.metrics
                        .first_exit(vm.launched.elapsed().as_nanos() as u64);
                }
                on_exit(exit, id, &vm)
            }
            Err(e) if e.errno() == libc::EINTR => {
                fd.set_kvm_immediate_exit(0);
                vm.metrics.exit(ExitKind::Kick);
                Next::Continue
            }
            Err(e) if e.errno() == libc::EAGAIN => Next::Continue,
            Err(e) => {
                vm.finish(VmOutcome::Failed {
                    error: format!("vCPU {id}: KVM_RUN failed: {e}"),
                });
                Next::Stop
            }
        };
        vm.emulator.judge();
        match next {
            Next::Continue => {}
            Next::Stop => break,
            Next::Emulated(op) => vm.emulator.count(&fd, op),
            Next::Switch(s) => {
                if let Err(e) = vm.programs.switch(&mut fd, id, &vm, s) {
                    vm.finish(VmOutcome::Failed {
                        error: format!("vCPU {id}: switching programs failed: {e}"),
                    });
                    break;
                }
            }
            Next::Fault(FaultSource::Stub) if vm.emulator.fault(&mut fd, id, &vm) => {}
            Next::Fault(src) => {
                let mut report = match src {
                    FaultSource::Stub => fault::from_stub(&fd, &vm.mem, id),
                    FaultSource::Exit(reason) => fault::from_exit(&fd, id, reason),
                };
                // A program's fault is its supervisor's to handle; the VM goes on.
                match vm.programs.fault(&mut fd, id, &vm, &report) {
                    Ok(true) => {
                        tracing::debug!(%report, "program fault reported to the supervisor");
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        vm.finish(VmOutcome::Failed {
                            error: format!("vCPU {id}: leaving a faulted program failed: {e}"),
                        });
                        break;
                    }
                }
                report.location = vm.symbols.as_ref().and_then(|s| s.describe(report.rip));
                tracing::info!(%report, "guest fault");
                vm.finish(VmOutcome::Faulted(report));
                break;
            }
        }
    }
    kick::disarm();
    vm.control.exited();
}
