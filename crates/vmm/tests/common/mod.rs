//! Helpers for the VM integration tests (real KVM, bundled guests).
#![allow(dead_code, unused_imports)]

use std::time::{Duration, Instant};

use rebound_devices::console::SharedBuffer;
use rebound_vmm::metrics::MetricsSnapshot;
use rebound_vmm::{DiskConfig, GuestImage, Vm, VmConfig, VmOutcome};

pub fn config(args: &str, vcpus: u32, disk: Option<DiskConfig>) -> VmConfig {
    VmConfig {
        vcpu_count: vcpus,
        mem_size_mib: 64,
        image: GuestImage::from_bytes("testguest", rebound_guests::TESTGUEST),
        boot_args: args.to_string(),
        disk,
        shared: Vec::new(),
        cache: None,
        nics: Vec::new(),
        net_journal: None,
        disk_journal: None,
    }
}

pub fn launch(config: &VmConfig) -> (Vm, SharedBuffer) {
    let out = SharedBuffer::new();
    let vm = Vm::launch(config, Box::new(out.clone())).expect("launch");
    (vm, out)
}

/// Runs the test guest to the end.
pub fn run(
    args: &str,
    vcpus: u32,
    disk: Option<DiskConfig>,
) -> (VmOutcome, String, MetricsSnapshot) {
    let (vm, out) = launch(&config(args, vcpus, disk));
    let outcome = vm.wait();
    let m = vm.metrics();
    (outcome, out.text(), m)
}

/// Waits until `f(output)` holds, up to `timeout`.
pub fn wait_for(out: &SharedBuffer, timeout: Duration, f: impl Fn(&str) -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f(&out.text()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

pub use rebound_guests::testguest::seq_expected;

/// The `result=` of a `seq done` line.
pub fn seq_result(out: &str) -> Option<u64> {
    let line = out.lines().find(|l| l.starts_with("seq done"))?;
    u64::from_str_radix(line.rsplit_once("result=")?.1.trim(), 16).ok()
}

/// The (generation, step) pairs a `seq` guest reported.
pub fn seq_gens(out: &str) -> Vec<(u64, u64)> {
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("seq gen ")?;
            let (g, at) = rest.split_once(" at ")?;
            Some((g.parse().ok()?, at.parse().ok()?))
        })
        .collect()
}
