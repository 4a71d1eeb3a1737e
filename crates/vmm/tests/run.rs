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

#[test]
fn two_vcpus_run_at_once() {
    let (outcome, out, _) = run("multi", 2, None);
    assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "output: {out}");
    assert!(out.contains("all 2 vCPUs ran concurrently"), "{out}");
    assert!(out.contains("vCPU 1 done"), "{out}");
}

#[test]
fn four_vcpus_run_at_once() {
    let (outcome, out, _) = run("multi", 4, None);
    assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "output: {out}");
    assert!(out.contains("all 4 vCPUs ran concurrently"), "{out}");
}

/// Whether the host keeps time with its TSC (then guests read the clock from theirs).
fn host_on_tsc() -> bool {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .is_ok_and(|s| s.trim() == "tsc")
}

#[test]
fn the_guest_clock_agrees_with_the_vmm_and_costs_no_exit() {
    let n = 2000;
    let (outcome, out, m) = run(&format!("clock {n}"), 1, None);
    assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "output: {out}");
    assert!(out.contains("clock ok"), "{out}");
    if host_on_tsc() {
        assert!(out.contains("clock ok tsc=1"), "{out}");
        // Two bracketing hypercalls per checked reading, one per timed hypercall read, three
        // more: none for the 2n readings from the TSC.
        assert_eq!(m.hypercalls["clock_monotonic"], 3 * n + 3, "{out}");
    }
}

#[test]
fn guest_panic_is_reported_with_its_message() {
    let (outcome, _, _) = run("panic 7", 1, None);
    match outcome {
        VmOutcome::Panicked { vcpu, message } => {
            assert_eq!(vcpu, 0);
            assert!(message.contains("boom at step 7"), "{message}");
            assert!(message.contains("main.rs"), "location missing: {message}");
        }
        other => panic!("expected a panic, got {other:?}"),
    }
}

#[test]
fn interrupt_free_io_completes_through_indicators() {
    let disk = rebound_vmm::DiskConfig::Scratch { size_mib: 4 };
    let (outcome, out, m) = run("io 8 8", 1, Some(disk));
    assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "output: {out}");
    assert!(out.contains("8 tasks x 8 blocks, 0 bad"), "{out}");
    assert!(out.contains("timer done: Ok(0)"), "{out}");
    assert_eq!(m.interrupts_injected, 0);
    assert_eq!(m.io.writes, 64);
    assert_eq!(m.io.reads, 64);
    assert_eq!(m.io.timers, 1);
    // The guest waited for completions by blocking in the VMM and was woken by them.
    assert!(m.block.woken_by_event > 0, "{m:?}");
    // Doorbells are absorbed by the ioeventfd: every port-write exit was a hypercall (how
    // many depends on how the I/O thread and the vCPU interleave), none a doorbell.
    let hypercalls: u64 = m.hypercalls.values().sum();
    assert_eq!(
        m.exits.io_out, hypercalls,
        "{:?} vs {:?} ({} requests)",
        m.exits, m.hypercalls, m.io.requests
    );
}

#[test]
fn demo_guest_verifies_its_hash_chain_on_disk() {
    let config = rebound_vmm::VmConfig {
        image: rebound_vmm::GuestImage::from_bytes("demo", rebound_guests::DEMO),
        boot_args: "blocks=64 tasks=4".into(),
        disk: Some(rebound_vmm::DiskConfig::Scratch { size_mib: 16 }),
        ..config("", 1, None)
    };
    let (vm, out) = launch(&config);
    assert_eq!(vm.wait(), VmOutcome::Exited { status: 0 }, "{}", out.text());
    let text = out.text();
    assert!(text.contains("verified 256/256 blocks"), "{text}");
    assert!(text.contains("demo OK"), "{text}");
    let m = vm.metrics();
    assert_eq!(m.interrupts_injected, 0);
    assert_eq!(m.io.writes, 256);
    assert_eq!(m.io.reads, 256);
}

#[test]
fn demo_guest_without_disk_says_what_it_needs() {
    let config = rebound_vmm::VmConfig {
        image: rebound_vmm::GuestImage::from_bytes("demo", rebound_guests::DEMO),
        ..config("", 1, None)
    };
    let (vm, out) = launch(&config);
    assert_eq!(vm.wait(), VmOutcome::Exited { status: 1 });
    assert!(out.text().contains("demo needs a disk"), "{}", out.text());
}
