//! Programs (ABI 1.10) on real KVM: isolated from each other and from the supervisor, faults
//! reported to the supervisor while the VM goes on, page tables built once and reused until a
//! table changes, hostile calls refused, and a program running at a snapshot continues after
//! the restore.

mod common;
use std::time::{Duration, Instant};

use common::*;
use rebound_devices::console::SharedBuffer;
use rebound_snapshot::format::Verify;
use rebound_snapshot::{Kind, Snapshot};
use rebound_vmm::{Vm, VmOutcome};

const OK: VmOutcome = VmOutcome::Exited { status: 0 };

#[test]
fn programs_are_isolated_and_their_tables_reused() {
    let n = 3000;
    let (outcome, out, m) = run(&format!("progs {n}"), 1, None);
    assert_eq!(outcome, OK, "{out}");
    assert!(out.contains("progs ok"), "{out}");
    let p = &m.programs;
    // Two programs, then the widened table and the narrowed one: four builds for thousands
    // of runs.
    assert_eq!(p.builds, 4, "{p:?}");
    assert!(p.runs >= 2 * n, "{p:?}");
    assert_eq!(p.faults, 9, "{p:?}");
    assert_eq!(p.programs, 2);
    assert!(p.pool_pages > 0 && p.pool_pages < 512, "{p:?}");
}

/// The figure: 10^6 switches (250,000 runs of each of two programs, a switch in and
/// one out per run) with both programs' data checked after every run; about a minute here (a
/// switch is an exit, ~50 us on these hosts).
#[test]
fn a_million_switches_keep_every_programs_data() {
    let n = 250_000;
    let (outcome, out, m) = run(&format!("progs {n}"), 1, None);
    assert_eq!(outcome, OK, "{out}");
    assert!(
        out.contains(&format!("progs: {n} runs each, counters intact")),
        "{out}"
    );
    assert!(out.contains("progs ok"), "{out}");
    let p = &m.programs;
    assert!(2 * p.runs >= 1_000_000, "{p:?}");
    assert_eq!(p.builds, 4, "tables built once each, then reused: {p:?}");
}

#[test]
fn hostile_program_calls_are_refused() {
    let (outcome, out, m) = run("proghostile", 1, None);
    assert_eq!(outcome, OK, "{out}");
    assert!(out.contains("proghostile ok"), "{out}");
    for e in ["einval", "efault", "e2big"] {
        assert!(m.hypercall_errors.contains_key(e), "{e}: {m:?}");
    }
}

#[test]
fn a_program_running_at_a_snapshot_continues_after_restore() {
    let dir = tempfile::tempdir().unwrap();
    // The program waits for the host to write its data page's word 2.
    let (vm, out) = launch(&config("progspin", 1, None));
    assert!(wait_for(&out, Duration::from_secs(20), |o| o.contains("data at")));
    let t0 = Instant::now();
    while vm.metrics().programs.runs == 0 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::yield_now();
    }
    let text = out.text();
    let data = text
        .split("data at 0x")
        .nth(1)
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .expect("data address");
    let path = dir.path().join("prog.snap");
    vm.snapshot(&path, Kind::Full).expect("snapshot");
    vm.stop();
    let chain = [Snapshot::open(&path, Verify::Full).unwrap()];
    let restored_out = SharedBuffer::new();
    let restored = Vm::restore(&chain, Box::new(restored_out.clone()), 1).expect("restore");
    // The restored VM is inside the program (no new run): let it finish.
    assert_eq!(restored.metrics().programs.runs, 0);
    vm_memory::Bytes::write_obj(restored.memory(), 1u64, vm_memory::GuestAddress(data + 16))
        .unwrap();
    assert_eq!(restored.wait(), OK, "{}", restored_out.text());
    assert!(
        restored_out.text().contains("progspin ok"),
        "{}",
        restored_out.text()
    );
}
