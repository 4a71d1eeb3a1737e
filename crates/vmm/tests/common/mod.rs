//! Helpers for the VM integration tests (real KVM, bundled guests).
#![allow(dead_code)]

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
