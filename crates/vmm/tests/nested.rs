//! Nested guests (ABI 1.10): a test guest acting as a guest VMM runs copies of itself through
//! the nested hypercalls, on real KVM (the nested VMs are KVM VMs of the VMM process).

mod common;
use std::time::Duration;

use common::*;
use rebound_vmm::VmOutcome;

fn run_mem(args: &str, mem_mib: u64) -> (VmOutcome, String, rebound_vmm::metrics::MetricsSnapshot) {
    let mut c = config(args, 1, None);
    c.mem_size_mib = mem_mib;
    let (vm, out) = launch(&c);
    let outcome = vm.wait();
    (outcome, out.text(), vm.metrics())
}

/// The nested run's output without the guest VMM's own lines.
fn nested_part(out: &str) -> String {
    out.lines()
        .filter(|l| !l.starts_with("nestvmm:"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn a_nested_guest_prints_what_it_prints_directly() {
    for mode in ["hello", "chatter 40", "exit 7"] {
        let (direct, direct_out, _) = run_mem(mode, 64);
        let (nested, nested_out, m) = run_mem(&format!("nestvmm {mode}"), 64);
        assert_eq!(nested, direct, "{mode}: {nested_out}");
        assert_eq!(nested_part(&nested_out), direct_out, "{mode}");
        assert!(
            nested_out.contains("nestvmm: nested guest exited with status"),
            "{nested_out}"
        );
        assert!(m.hypercalls["nested_run"] >= 1, "{m:?}");
        assert_eq!(m.hypercalls["nested_create"], 1);
    }
}

#[test]
fn a_nested_fault_is_an_exit_for_the_guest_vmm_and_the_vm_goes_on() {
    for (mode, vector, cr2) in [("fault-pf", 14, "cr2 0x10"), ("fault-gp", 13, "cr2 0x0")] {
        let (outcome, out, _) = run_mem(&format!("nestfault {mode}"), 64);
        assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "{mode}: {out}");
        assert!(
            out.contains(&format!("exit 6 vector {vector} ")) && out.contains(cr2),
            "{mode}: {out}"
        );
        assert!(out.contains("hello from vCPU 0 of 1"), "{out}");
        assert!(out.contains("the guest VMM went on"), "{out}");
    }
    // A nested guest that panics is reported to the guest VMM too.
    let (outcome, out, _) = run_mem("nestvmm panic 5", 64);
    assert_eq!(outcome, VmOutcome::Exited { status: 99 }, "{out}");
    assert!(
        out.contains("nested guest panicked") && out.contains("boom at step 5"),
        "{out}"
    );
}

#[test]
fn a_hostile_guest_vmm_gets_errno_for_every_nested_call() {
    let (outcome, out, m) = run_mem("nesthostile", 128);
    assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "{out}");
    assert!(out.contains("nesthostile ok"), "{out}");
    for name in [
        "efault", "einval", "e2big", "enoexec", "enospc", "ebusy", "ebadf", "estale",
    ] {
        assert!(
            m.hypercall_errors.get(name).is_some_and(|n| *n > 0),
            "{name} not counted: {m:?}"
        );
    }
    for call in [
        "nested_create",
        "nested_vcpu",
        "nested_run",
        "nested_destroy",
        "nested_start",
    ] {
        assert!(m.hypercalls[call] > 0, "{call}: {m:?}");
    }
}

/// A started nested vCPU (ABI 1.10, posted exits) runs on a host thread of its own: the same
/// output as directly and as under `NESTED_RUN`, with the guest VMM making no hypercall to run
/// it (`rebound-bench nested` measures what that saves).
#[test]
fn a_started_nested_vcpu_runs_to_the_same_output_on_its_own_thread() {
    for mode in ["hello", "chatter 40", "exit 7"] {
        let (direct, direct_out, _) = run_mem(mode, 64);
        let (posted, out, m) = run_mem(&format!("nestpost {mode}"), 64);
        assert_eq!(posted, direct, "{mode}: {out}");
        assert_eq!(nested_part(&out), direct_out, "{mode}");
        assert!(
            out.contains("nestvmm: nested guest exited with status"),
            "{out}"
        );
        assert_eq!(m.hypercalls["nested_start"], 1, "{m:?}");
    }
    // A fault and a panic come back as posted exits too.
    let (outcome, out, _) = run_mem("nestpost panic 5", 64);
    assert_eq!(outcome, VmOutcome::Exited { status: 99 }, "{out}");
    assert!(out.contains("boom at step 5"), "{out}");
    let (outcome, out, _) = run_mem("nestpost fault-pf", 64);
    assert_eq!(outcome, VmOutcome::Exited { status: 99 }, "{out}");
    assert!(
        out.contains("nestvmm: nested guest stopped: exit 6 vector 14") && out.contains("cr2 0x10"),
        "{out}"
    );
}

/// A started nested vCPU computing without exits runs on its own thread: a pause still stops
/// it (the parking vCPU waits for it), and a stop ends it.
#[test]
fn a_started_nested_vcpu_stops_with_the_vm() {
    let mut c = config("nestpost spin", 1, None);
    c.mem_size_mib = 64;
    let (vm, _out) = launch(&c);
    let t0 = std::time::Instant::now();
    while vm
        .metrics()
        .hypercalls
        .get("nested_start")
        .is_none_or(|n| *n == 0)
    {
        assert!(t0.elapsed() < Duration::from_secs(15), "never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    for _ in 0..3 {
        vm.pause()
            .expect("a VM with a spinning started nested vCPU pauses");
        vm.resume().unwrap();
    }
    vm.stop();
    assert_eq!(vm.wait(), VmOutcome::Stopped);
}

#[test]
fn a_vm_running_a_nested_guest_still_pauses_and_stops() {
    // The nested guest yields round and round: its vCPU is inside NESTED_RUN most of the time.
    let mut c = config("nestvmm warm 1 4", 1, None);
    c.mem_size_mib = 64;
    let (vm, out) = launch(&c);
    assert!(
        wait_for(&out, Duration::from_secs(15), |t| t.contains("warm ready")),
        "{}",
        out.text()
    );
    for _ in 0..3 {
        vm.pause().expect("a VM in NESTED_RUN pauses");
        let runs = vm.metrics().hypercalls["nested_run"];
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            vm.metrics().hypercalls["nested_run"],
            runs,
            "nothing runs while paused"
        );
        vm.resume().unwrap();
    }
    // A nested guest computing without exits is stopped by the kick as well.
    vm.stop();
    assert_eq!(vm.wait(), VmOutcome::Stopped);

    let mut c = config("nestvmm spin", 1, None);
    c.mem_size_mib = 64;
    let (vm, _out) = launch(&c);
    let t0 = std::time::Instant::now();
    while vm
        .metrics()
        .hypercalls
        .get("nested_run")
        .is_none_or(|n| *n == 0)
    {
        assert!(t0.elapsed() < Duration::from_secs(15), "never ran nested");
        std::thread::sleep(Duration::from_millis(5));
    }
    vm.pause().expect("a spinning nested guest is kicked out");
    vm.resume().unwrap();
    vm.stop();
    assert_eq!(vm.wait(), VmOutcome::Stopped);
}

/// What a nested guest writes into its guest VMM's memory bypasses the VM's dirty log; it must
/// still be in the dirty pages a checkpoint takes: a copy kept from dirty pages alone equals
/// memory at every freeze.
#[test]
fn a_nested_guests_writes_are_in_the_dirty_pages() {
    nested_writes_are_in_the_dirty_pages("nestvmm");
}

/// The same with the nested vCPU on a thread of its own: it must be stopped at every freeze
/// (memory would change under the copy) and its writes harvested.
#[test]
fn a_started_nested_vcpus_writes_are_in_the_dirty_pages() {
    nested_writes_are_in_the_dirty_pages("nestpost");
}

fn nested_writes_are_in_the_dirty_pages(vmm: &str) {
    let (vm, _out) = launch(&config(&format!("{vmm} dirty 64"), 1, None));
    vm.enable_dirty_tracking().unwrap();
    let f = vm.freeze().unwrap();
    let mut copy = f.all_memory().unwrap().to_vec();
    vm.take_dirty("test").unwrap();
    f.thaw().unwrap();
    let mut nested_pages = 0;
    for round in 0..40 {
        // Let the nested guest write between freezes (no timing is asserted).
        std::thread::sleep(Duration::from_millis(1 + round % 4));
        let f = vm.freeze().unwrap();
        let dirty = vm.take_dirty("test").unwrap();
        for p in dirty.iter() {
            let at = (p * 4096) as usize;
            copy[at..at + 4096].copy_from_slice(f.page(p).unwrap());
        }
        let mem = f.all_memory().unwrap();
        let wrong: Vec<usize> = (0..mem.len() / 4096)
            .filter(|p| copy[p * 4096..(p + 1) * 4096] != mem[p * 4096..(p + 1) * 4096])
            .collect();
        assert!(
            wrong.is_empty(),
            "round {round}: {} pages changed unreported, first {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(8)]
        );
        nested_pages = nested_pages.max(dirty.iter().count());
        f.thaw().unwrap();
    }
    assert!(
        nested_pages >= 64,
        "the nested guest's pages never showed: {nested_pages}"
    );
    vm.stop();
    assert_eq!(vm.wait(), VmOutcome::Stopped);
}

/// Nested VMs are not part of saved state: after a rollback the guest VMM's handle answers
/// ESTALE, and it creates the nested VM again.
#[test]
fn after_a_rollback_the_guest_vmm_creates_its_nested_vm_again() {
    after_a_rollback("nestvmm", "nested_run");
}

/// A started vCPU's thread ends in the rollback; the guest VMM, waiting for a posted exit that
/// never comes, learns the VM is gone and creates it again.
#[test]
fn after_a_rollback_a_started_nested_vcpu_is_created_again() {
    after_a_rollback("nestpost", "nested_start");
}

fn after_a_rollback(vmm: &str, call: &str) {
    let (vm, out) = launch(&config(&format!("{vmm} dirty 16"), 1, None));
    let t0 = std::time::Instant::now();
    while vm.metrics().hypercalls.get(call).is_none_or(|n| *n == 0) {
        assert!(t0.elapsed() < Duration::from_secs(15), "never ran nested");
        std::thread::sleep(Duration::from_millis(5));
    }
    let f = vm.freeze().unwrap();
    let saved = f.state().clone();
    let memory = f.all_memory().unwrap().to_vec();
    f.thaw().unwrap();
    let f = vm.freeze().unwrap();
    f.write_memory(0, &memory).unwrap();
    f.restore_state(&saved).unwrap();
    f.thaw().unwrap();
    assert!(
        wait_for(&out, Duration::from_secs(15), |t| t.contains(
            "nestvmm: the nested VM was lost (ESTALE (-116)): creating it again"
        )),
        "{}",
        out.text()
    );
    let t0 = std::time::Instant::now();
    while vm.metrics().hypercalls["nested_create"] < 2 {
        assert!(t0.elapsed() < Duration::from_secs(15), "not created again");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(vm.outcome().is_none(), "{:?}", vm.outcome());
    vm.stop();
    assert_eq!(vm.wait(), VmOutcome::Stopped);
}

#[test]
fn a_nested_guests_port_read_is_answered_by_the_guest_vmm() {
    let (outcome, out, _) = run_mem("portread", 64);
    assert_eq!(outcome, VmOutcome::Exited { status: 0 });
    assert_eq!(out, "portread 0xffffffff\n");
    let (outcome, out, _) = run_mem("nestio", 64);
    assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "{out}");
    assert!(
        out.contains("nestio: exit Ok(3) port 0x600 size 4 data 0xffffffff"),
        "{out}"
    );
    assert!(out.contains("portread 0x12345678"), "{out}");
}

#[test]
fn time_slices_let_one_vcpu_run_several_nested_vcpus() {
    let (outcome, out, _) = run_mem("nestslice", 64);
    assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "{out}");
    assert!(out.contains("hello from vCPU 0 of 2"), "{out}");
    assert!(out.contains("nestslice: vCPU 0 ran to the end"), "{out}");
}
