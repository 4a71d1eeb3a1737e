//! Faulting and hostile guests: each ends (or carries on) with a clear report, never a VMM panic.

mod common;
use common::*;
use rebound_vmm::{FaultReport, VmOutcome};

fn fault(mode: &str) -> FaultReport {
    match run(mode, 1, None).0 {
        VmOutcome::Faulted(r) => r,
        other => panic!("{mode}: expected a fault, got {other:?}"),
    }
}

#[test]
fn null_write_is_a_page_fault_with_address() {
    let r = fault("fault-pf");
    assert_eq!(r.vector, Some(14));
    assert_eq!(r.address, Some(0x10));
    assert!(
        r.reason.contains("writing 0x10 (page not mapped)"),
        "{}",
        r.reason
    );
    assert!(r.rip >= rebound_abi::IMAGE_BASE, "{r}");
    assert_eq!(r.vcpu, 0);
}

#[test]
fn privileged_instruction_is_a_general_protection_fault() {
    let r = fault("fault-gp");
    assert_eq!(r.vector, Some(13));
    assert!(
        r.to_string().starts_with("vCPU 0 faulted at RIP 0x4"),
        "{r}"
    );
}

#[test]
fn invalid_opcode_is_reported() {
    assert_eq!(fault("fault-ud").vector, Some(6));
}

#[test]
fn guest_cannot_forge_a_fault_report() {
    // The fault port is closed to CPL3 in the I/O bitmap: the attempt itself is a #GP.
    assert_eq!(fault("fault-port").vector, Some(13));
}

#[test]
fn page_tables_are_not_writable_by_the_guest() {
    let r = fault("fault-write-pagetable");
    assert_eq!(r.vector, Some(14));
    assert!(r.reason.contains("protection violation"), "{}", r.reason);
}

#[test]
fn stack_overflow_hits_the_guard_page() {
    let r = fault("fault-stack");
    assert_eq!(r.vector, Some(14));
    let guard = rebound_arch::layout::STACKS;
    assert!(
        r.address
            .is_some_and(|a| (guard..guard + 4096).contains(&a)),
        "{r:?}"
    );
}

#[test]
fn hostile_hypercall_arguments_get_errors_and_the_vm_survives() {
    let disk = rebound_vmm::DiskConfig::Scratch { size_mib: 1 };
    let (outcome, out, m) = run("hostile", 1, Some(disk));
    assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "output:\n{out}");
    assert!(out.contains("hostile: all"), "{out}");
    // Every refusal is counted.
    assert!(
        m.hypercall_errors["efault"] >= 5,
        "{:?}",
        m.hypercall_errors
    );
    assert_eq!(m.hypercall_errors["enosys"], 2);
    assert!(m.hypercall_errors["einval"] >= 3);
    assert!(m.io.errors >= 4, "{:?}", m.io);
}
