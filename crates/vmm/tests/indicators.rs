//! Requester indicators (ABI 1.10) on real VMs: the VMM sets the bit a guest routed a
//! requester to, and the SDK dispatcher polls only the source behind it; hostile routes and
//! arguments are refused or ignored, never fatal.

mod common;

use common::*;
use rebound_vmm::VmOutcome;
use rebound_vmm::share::{ShareConfig, ShareDir};

/// Runs `config` to its end (at most 20 s); its outcome, output and the indicator bits the
/// VMM set.
fn run_bounded(config: &rebound_vmm::VmConfig) -> (VmOutcome, String, u64) {
    let (vm, buf) = launch(config);
    let outcome = vm.wait_timeout(std::time::Duration::from_secs(20));
    let out = buf.text();
    vm.stop();
    let indicated = vm.metrics().indicators_set;
    (
        outcome.unwrap_or_else(|| panic!("the guest did not finish:\n{out}")),
        out,
        indicated,
    )
}

fn exited_ok(outcome: &VmOutcome, out: &str) {
    assert!(
        matches!(outcome, VmOutcome::Exited { status: 0 }),
        "{outcome:?}\n{out}"
    );
}

#[test]
fn with_64_sources_and_one_pending_the_dispatcher_touches_one_source() {
    // The requester: this vCPU's I/O ring (a timer), routed to bit 17.
    let (outcome, out, indicated) = run_bounded(&config("indicators io", 1, None));
    exited_ok(&outcome, &out);
    assert!(indicated >= 1, "the VMM set the bit");
    assert!(
        out.contains("indicators via=io sources=64 bit=17 touched=1"),
        "{out}"
    );

    // The requester: a shared region's wake-up, seen by the VMM's watcher, routed to bit 42.
    let dir = ShareDir::from_env();
    let name = format!("ind{}", std::process::id());
    let _ = dir.remove(&name, true);
    dir.create(&name, 2).expect("create the region");
    let mut config = config(&format!("indicators share {name}"), 1, None);
    config.shared.push(ShareConfig {
        name: name.clone(),
        read_only: false,
    });
    let (outcome, out, indicated) = run_bounded(&config);
    let _ = dir.remove(&name, true);
    exited_ok(&outcome, &out);
    assert!(indicated >= 1, "the VMM set the bit");
    assert!(
        out.contains("indicators via=share sources=64 bit=42 touched=1"),
        "{out}"
    );
}

#[test]
fn indicator_routes_refuse_hostile_arguments_and_ignore_garbage() {
    let (outcome, out, m) = run("indhostile", 1, None);
    // Its timers set bits through the routes it wrote itself (bit 63), none through garbage.
    exited_ok(&outcome, &out);
    assert!(out.contains("indhostile ok refused=13"), "{out}");
    assert_eq!(m.hypercall_errors["einval"], 13, "{:?}", m.hypercall_errors);
    assert_eq!(m.indicators_set, 1, "only the valid route set a bit");
}

#[test]
fn routes_and_pending_timers_survive_a_restore() {
    // The route lives in guest memory: a restored VM's VMM (a new one, with no state of its
    // own about it) sets the bit when the timer armed before the snapshot fires.
    use rebound_snapshot::format::Verify;
    use rebound_snapshot::{Kind, Snapshot};
    let dir = tempfile::tempdir().unwrap();
    let (vm, out) = launch(&config("indicators io 1000", 1, None));
    assert!(
        wait_for(&out, std::time::Duration::from_secs(20), |o| o
            .contains("indicators armed")),
        "{}",
        out.text()
    );
    let path = dir.path().join("ind.snap");
    vm.snapshot(&path, Kind::Full).expect("snapshot");
    vm.stop();
    assert!(
        !out.text().contains("touched="),
        "the timer fired before the snapshot: {}",
        out.text()
    );
    let buf = rebound_devices::console::SharedBuffer::new();
    let snap = Snapshot::open(&path, Verify::Full).expect("open");
    let r = rebound_vmm::Vm::restore(&[snap], Box::new(buf.clone()), 1).expect("restore");
    let outcome = r.wait_timeout(std::time::Duration::from_secs(20));
    let text = buf.text();
    r.stop();
    let outcome = outcome.unwrap_or_else(|| panic!("the restored guest did not finish:\n{text}"));
    exited_ok(&outcome, &text);
    assert!(text.contains("sources=64 bit=17 touched=1"), "{text}");
    assert!(r.metrics().indicators_set >= 1, "the new VMM set the bit");
}
