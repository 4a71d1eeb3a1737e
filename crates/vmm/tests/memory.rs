//! Memory classes and swap on real KVM: the guest gives memory up on request (cache dropped,
//! cold working data moved to swap, pages returned), the host moves the swap class out of RAM
//! to a file, and everything the guest held comes back intact when touched.

mod common;

use std::time::{Duration, Instant};

use common::{config, launch, wait_for};
use rebound_vmm::{Vm, VmOutcome};

const PAGES_PER_MIB: u64 = 256;

fn mem_config(args: &str) -> rebound_vmm::VmConfig {
    let mut c = config(args, 1, None);
    c.mem_size_mib = 128;
    c
}

/// Waits until the guest answered request `seq`; returns what it says it moved.
fn answered(vm: &Vm, seq: u64) -> i64 {
    let t0 = Instant::now();
    loop {
        if let Some((s, pages)) = vm.memory_answer()
            && s == seq
        {
            return pages;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no answer to request {seq}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn finish(vm: &Vm, out: &rebound_devices::console::SharedBuffer) -> String {
    vm.request_shutdown().expect("shutdown request");
    let outcome = vm
        .wait_timeout(Duration::from_secs(30))
        .expect("guest ends");
    let text = out.text();
    assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "{text}");
    text
}

#[test]
fn a_guest_gives_memory_up_on_request_and_takes_it_back_with_its_data_intact() {
    let (vm, out) = launch(&mem_config("memhold 16 16 24"));
    assert!(wait_for(&out, Duration::from_secs(20), |t| t
        .contains("memhold ready")));
    let before = vm.memory_report();
    assert!(before.registered);
    assert_eq!(before.working_pages, 16 * PAGES_PER_MIB);
    assert_eq!(before.cache_pages, 16 * PAGES_PER_MIB);
    assert_eq!(before.swap_pages, 24 * PAGES_PER_MIB);

    // 24 MiB: the 16 MiB of cache, then 8 MiB of working data moved into swap.
    let want = 24 * PAGES_PER_MIB as i64;
    let seq = vm.request_memory(want).expect("request");
    assert_eq!(answered(&vm, seq), want);
    let after = vm.memory_report();
    assert!(
        after.resident_pages + 16 * PAGES_PER_MIB <= before.resident_pages,
        "resident {} -> {}",
        before.resident_pages,
        after.resident_pages
    );
    assert_eq!(after.counters.returned_pages, want as u64);

    // The host moves the swap class out: resident memory falls by what it held.
    let moved = vm.page_out_swap(u64::MAX).expect("page out");
    // All 24 MiB of the swap class: 8 MiB of data written out, 16 MiB of zeros just freed.
    assert_eq!(moved, 24 * PAGES_PER_MIB, "{:?}", vm.memory_report());
    let out_of_ram = vm.memory_report();
    assert_eq!(out_of_ram.swap.swapped_pages, 8 * PAGES_PER_MIB);
    assert_eq!(out_of_ram.swap.zero_pages, 16 * PAGES_PER_MIB);
    assert!(out_of_ram.resident_pages + moved <= after.resident_pages + 16);

    // Taking memory back brings the working data home from swap (touching it).
    let seq = vm
        .request_memory(-(8 * PAGES_PER_MIB as i64))
        .expect("request");
    assert_eq!(answered(&vm, seq), -(8 * PAGES_PER_MIB as i64));
    let back = vm.memory_report();
    assert_eq!(back.swap.swapped_pages, 0, "{back:?}");
    assert_eq!(back.swap.paged_in, 8 * PAGES_PER_MIB);
    let text = finish(&vm, &out);
    assert!(text.contains(", 0 bad, 0 in swap"), "{text}");
}

#[test]
fn a_guest_that_ignores_requests_still_loses_its_swap_class_and_runs_correctly() {
    // Mode 0: registers its classes and never answers; it paged 4 MiB of its working data
    // into swap itself at start (the rest of the swap area holds zeros).
    let (vm, out) = launch(&mem_config("memhold 16 4 8 0 4"));
    assert!(wait_for(&out, Duration::from_secs(20), |t| t
        .contains("memhold ready")));
    let seq = vm.request_memory(1024).expect("request");
    assert_ne!(vm.memory_answer().map(|a| a.0), Some(seq));
    let before = vm.memory_report();
    let moved = vm.page_out_swap(u64::MAX).expect("page out");
    let after = vm.memory_report();
    assert_eq!(moved, 8 * PAGES_PER_MIB);
    assert_eq!(after.swap.swapped_pages, 4 * PAGES_PER_MIB, "{after:?}");
    assert_eq!(after.swap.zero_pages, 4 * PAGES_PER_MIB, "{after:?}");
    assert!(
        after.resident_pages + moved <= before.resident_pages + 16,
        "{before:?} {after:?}"
    );
    // Verifying reads every swapped page back through the userfaultfd.
    let text = finish(&vm, &out);
    assert!(text.contains(", 0 bad, 1024 in swap"), "{text}");
    assert_eq!(vm.memory_report().swap.paged_in, 4 * PAGES_PER_MIB);
}

#[test]
fn hostile_memory_calls_are_refused_and_hurt_only_the_caller() {
    let (vm, out) = launch(&mem_config("memhostile"));
    let outcome = vm.wait_timeout(Duration::from_secs(60)).expect("ends");
    let text = out.text();
    assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "{text}");
    assert!(text.contains("memhostile done, 0 failures"), "{text}");
}
