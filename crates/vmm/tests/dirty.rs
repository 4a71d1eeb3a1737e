//! Dirty-page tracking on real KVM: a copy of memory kept up to date from the dirty pages alone
//! must equal memory at every freeze, whatever KVM write-protects again and what it leaves
//! writable between harvests (pages written often stay writable for a while; see
//! `HOT_HARVESTS` and `HOT_BUDGET` in `vm.rs`).

mod common;

use std::time::Duration;

use common::*;

fn check(k: u64) {
    // Checked from launch on: whenever the guest gets going, the copy must keep up.
    let (vm, _out) = launch(&config(&format!("dirty {k}"), 1, None));
    vm.enable_dirty_tracking().unwrap();
    let f = vm.freeze().unwrap();
    let mut copy = f.all_memory().unwrap().to_vec();
    vm.take_dirty("test").unwrap();
    f.thaw().unwrap();
    for round in 0..80 {
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
            "dirty {k}, round {round}: {} pages changed unreported, first {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(8)]
        );
        f.thaw().unwrap();
    }
    vm.stop();
    assert!(vm.outcome().is_some() || vm.wait_timeout(Duration::from_secs(10)).is_some());
}

#[test]
fn a_copy_kept_from_dirty_pages_alone_equals_memory_when_all_fit_writable() {
    check(64);
}

#[test]
fn a_copy_kept_from_dirty_pages_alone_equals_memory_past_the_writable_budget() {
    check(2048);
}
