//! The emulation module on real KVM: a hot emulated port is promoted to an ioeventfd and
//! demoted when it goes cold, with the same results throughout; privileged instructions the
//! VMM emulates (`rdmsr` of the TSC MSRs, `hlt`) resume the guest; others still end it.

mod common;
use std::time::{Duration, Instant};

use common::*;
use rebound_vmm::VmOutcome;

const OK: VmOutcome = VmOutcome::Exited { status: 0 };

#[test]
fn hot_port_is_promoted_then_demoted_with_the_same_results() {
    let (outcome, out, m) = run("emupost 50 66 4 600", 1, None);
    assert_eq!(outcome, OK, "{out}");
    assert!(out.contains("emupost ok"), "{out}");
    let e = &m.emulation;
    assert!(e.promotions >= 1, "{e:?}");
    assert!(
        e.demotions >= 1,
        "the port went quiet for two windows: {e:?}"
    );
    // 200 writes of 0x42 from one site: most absorbed by the ioeventfd, none lost.
    assert!(e.post.absorbed >= 50, "{e:?}");
    assert_eq!(e.post.writes, 200 + 4, "{e:?}");
    assert_eq!(e.post.last, 0x42);
    let site = e
        .sites
        .iter()
        .find(|s| s.op == "out 0x80, 0x42")
        .expect("the hot site is listed");
    assert!(site.count >= 64 && site.count < 200, "{site:?}");
    assert!(m.exits.io_out < 200, "{:?}", m.exits);
}

#[test]
fn rdmsr_of_the_tsc_msrs_is_emulated() {
    let (outcome, out, m) = run("emurdmsr 300", 1, None);
    assert_eq!(outcome, OK, "{out}");
    assert!(out.contains("aux=0 ok"), "{out}");
    let site = m.emulation.sites.iter().find(|s| s.op == "rdmsr");
    assert!(site.is_some_and(|s| s.count >= 300), "{:?}", m.emulation);
}

#[test]
fn hlt_waits_in_the_vmm_until_woken() {
    let (vm, out) = launch(&config("emuhlt", 1, None));
    assert!(wait_for(&out, Duration::from_secs(10), |o| o.contains("halting")));
    // A pause ends the wait (as it ends BLOCK); the guest may not have reached `hlt` yet, so
    // repeat until it says it woke.
    let t0 = Instant::now();
    while !out.text().contains("woke") && t0.elapsed() < Duration::from_secs(20) {
        vm.pause().expect("pause");
        vm.resume().expect("resume");
        wait_for(&out, Duration::from_millis(50), |o| o.contains("woke"));
    }
    assert_eq!(vm.wait(), OK, "{}", out.text());
    let m = vm.metrics();
    assert!(m.emulation.sites.iter().any(|s| s.op == "hlt"), "{m:?}");
}

#[test]
fn instructions_not_emulated_still_fault() {
    // `wrmsr` is never emulated: the VM ends with a #GP report, as before.
    match run("fault-gp", 1, None).0 {
        VmOutcome::Faulted(r) => assert_eq!(r.vector, Some(13)),
        other => panic!("expected a fault, got {other:?}"),
    }
}
