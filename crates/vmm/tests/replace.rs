//! `cpuid` sites armed at boot and replaced in copied code pages (emulation module) on real
//! KVM: the same results on every path, self-modifying code on a replaced page runs the new
//! code, and a VM snapshotted with replaced pages keeps running them after a restore.

mod common;
use std::time::Duration;

use common::*;
use rebound_devices::console::SharedBuffer;
use rebound_snapshot::format::Verify;
use rebound_snapshot::{Kind, Snapshot};
use rebound_vmm::{Vm, VmOutcome};

const OK: VmOutcome = VmOutcome::Exited { status: 0 };

fn number(text: &str, key: &str) -> Option<u64> {
    let v = text.split(key).nth(1)?.split_whitespace().next()?;
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

#[test]
fn replaced_cpuid_gives_the_same_results_and_runs_from_the_copy() {
    let (outcome, out, m) = run("emucpuid 20000", 1, None);
    eprintln!("{out}");
    assert_eq!(outcome, OK, "{out}");
    assert!(out.contains(" ok"), "{out}");
    let e = &m.emulation;
    assert!(e.armed >= 2, "leaf() and rb_smc at least: {e:?}");
    assert_eq!(e.replaced, 1, "{e:?}");
    let site = e
        .sites
        .iter()
        .find(|s| s.op == "cpuid")
        .expect("the cpuid site is listed");
    assert!(site.replaced && site.promoted, "{site:?}");
    // 30 + 2 emulated, hot at 64: the rest (20000 and more) ran from the copy, not trapping.
    assert!(site.count >= 64 && site.count < 200, "{site:?}");
    let replaced = number(&out, "ns_per_op=").unwrap();
    let emulated = number(&out, "emulated_ns=").unwrap();
    assert!(
        replaced * 10 < emulated,
        "replaced {replaced} ns vs emulated {emulated} ns"
    );
}

#[test]
fn self_modifying_code_on_a_replaced_page_runs_the_new_code() {
    let (outcome, out, m) = run("emusmc", 1, None);
    assert_eq!(outcome, OK, "{out}");
    assert!(out.contains("emusmc ok"), "{out}");
    let e = &m.emulation;
    // Two patches; then `rb_smc_store` (same page), whose displaced store writes the page from
    // its trampoline after each replacement: after 3 drops the page is no longer copied.
    assert!(e.copies_dropped >= 3, "{e:?}");
    assert!(
        e.promotions >= 4,
        "replaced, then again after each drop: {e:?}"
    );
    assert_eq!(e.replaced, 0, "the page kept being written: {e:?}");
    let store = e.sites.iter().find(|s| s.op == "cpuid" && s.count == 300);
    assert!(store.is_some(), "every store ran from the original: {e:?}");
}

#[test]
fn a_program_run_returns_to_the_copy() {
    let (outcome, out, m) = run("emuprog 5000", 1, None);
    assert_eq!(outcome, OK, "{out}");
    assert!(out.contains("emusmc ok"), "{out}");
    assert_eq!(m.programs.runs, 2, "{:?}", m.programs);
    // leaf()'s site: hot at 64 of the first 101 runs, none of the 5000 after the program
    // trapped (they ran from the copy on the supervisor's tree).
    let site = m
        .emulation
        .sites
        .iter()
        .find(|s| s.op == "cpuid" && s.replaced)
        .expect("leaf()'s site is replaced");
    assert!(site.count < 101, "{site:?}");
}

#[test]
fn multi_vcpu_vms_replace_with_every_vcpu_switched() {
    for vcpus in [2, 3] {
        let (outcome, out, m) = run("emumulti 20000", vcpus, None);
        assert_eq!(outcome, OK, "{out}");
        assert!(out.contains("emumulti ok"), "{out}");
        let e = &m.emulation;
        let site = e
            .sites
            .iter()
            .find(|s| s.op == "cpuid" && s.replaced)
            .unwrap_or_else(|| panic!("leaf()'s site is replaced: {e:?}"));
        // 20000 runs per vCPU: nearly all from the copy.
        assert!(site.count < 2000, "{site:?}");
        assert!(e.copies_dropped >= 3, "{e:?}");
    }
}

#[test]
fn an_unarmed_ud2_still_faults() {
    match run("fault-ud", 1, None).0 {
        VmOutcome::Faulted(r) => assert_eq!(r.vector, Some(6)),
        other => panic!("expected a fault, got {other:?}"),
    }
}

#[test]
fn a_vm_with_a_replaced_page_keeps_it_after_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, out) = launch(&config("emucpuid 1000 1", 1, None));
    assert!(
        wait_for(&out, Duration::from_secs(20), |o| o.contains("flag at")),
        "{}",
        out.text()
    );
    let flag = number(&out.text(), "flag at ").expect("flag address");
    assert_eq!(vm.metrics().emulation.replaced, 1);
    let path = dir.path().join("replaced.snap");
    vm.snapshot(&path, Kind::Full).expect("snapshot");
    vm.stop();
    let chain = [Snapshot::open(&path, Verify::Full).unwrap()];
    let restored_out = SharedBuffer::new();
    let restored = Vm::restore(&chain, Box::new(restored_out.clone()), 1).expect("restore");
    let m = restored.metrics().emulation;
    assert_eq!(m.replaced, 1, "{m:?}");
    assert!(m.armed >= 2, "{m:?}");
    // Let it spin on the copy a while (no trap: the site's count stays 0 in this process),
    // then end the spin; it checks its results and runs the self-modifying test, which needs
    // the write watch of the restored copy.
    std::thread::sleep(Duration::from_millis(100));
    vm_memory::Bytes::write_obj(restored.memory(), 1u64, vm_memory::GuestAddress(flag)).unwrap();
    assert_eq!(restored.wait(), OK, "{}", restored_out.text());
    let text = restored_out.text();
    assert!(text.contains("results intact"), "{text}");
    assert!(text.contains("emusmc ok"), "{text}");
    let m = restored.metrics().emulation;
    assert!(m.copies_dropped >= 2, "{m:?}");
    let site = m
        .sites
        .iter()
        .find(|s| s.op == "cpuid" && s.count == 0 && s.replaced);
    assert!(
        site.is_some(),
        "leaf()'s site ran from the copy all along: {m:?}"
    );
}
