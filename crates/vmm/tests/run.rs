//! Running guests on real KVM: start, console output, exit status, several vCPUs at once.

mod common;
use common::*;
use rebound_vmm::VmOutcome;

#[test]
fn hello_prints_and_exits_zero() {
    let (outcome, out, m) = run("hello", 1, None);
    assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "output: {out}");
    assert_eq!(out, "hello from vCPU 0 of 1\n");
    assert!(m.hypercalls["console_write"] >= 1);
    assert!(m.launch_to_first_exit_us > 0);
}

#[test]
fn exit_status_reaches_the_vmm() {
    let (outcome, _, _) = run("exit 42", 1, None);
    assert_eq!(outcome, VmOutcome::Exited { status: 42 });
    assert_eq!(outcome.exit_code(), 42);
}
