//! Pause and resume: the guest's progress stops while paused and continues after.

mod common;
use std::time::Duration;

use common::*;
use rebound_vmm::{VmOutcome, VmState};

fn ticks(out: &str) -> usize {
    out.lines().filter(|l| l.starts_with("tick ")).count()
}

#[test]
fn pause_stops_progress_and_resume_continues_it() {
    let (vm, out) = launch(&config("ticks 5", 1, None));
    assert!(
        wait_for(&out, Duration::from_secs(10), |o| ticks(o) >= 5),
        "guest never ticked"
    );
    let took = vm.pause().expect("pause");
    assert_eq!(vm.state(), VmState::Paused);
    assert!(took < Duration::from_secs(1), "pause took {took:?}");
    let frozen = ticks(&out.text());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ticks(&out.text()),
        frozen,
        "guest made progress while paused"
    );
    vm.resume().expect("resume");
    assert_eq!(vm.state(), VmState::Running);
    assert!(
        wait_for(&out, Duration::from_secs(10), |o| ticks(o) >= frozen + 5),
        "guest did not continue after resume"
    );
    let m = vm.metrics();
    assert_eq!(m.pause.count, 1);
    vm.stop();
    assert_eq!(vm.wait(), VmOutcome::Stopped);
    assert_eq!(vm.state(), VmState::Exited);
    assert!(vm.pause().is_err(), "an exited VM cannot be paused");
}

#[test]
fn pause_catches_vcpus_inside_the_guest() {
    // Two vCPUs spinning at CPL3 (never exiting on their own) must still be stopped by a kick.
    let (vm, out) = launch(&config("multi", 2, None));
    assert!(wait_for(&out, Duration::from_secs(10), |o| !o.is_empty()) || vm.outcome().is_some());
    for _ in 0..20 {
        if vm.outcome().is_some() {
            break;
        }
        let took = vm.pause().expect("pause");
        assert!(took < Duration::from_secs(1));
        vm.resume().expect("resume");
    }
    assert_eq!(vm.wait(), VmOutcome::Exited { status: 0 }, "{}", out.text());
}

#[test]
fn repeated_pause_resume_keeps_the_guest_correct() {
    let disk = rebound_vmm::DiskConfig::Scratch { size_mib: 4 };
    let (vm, out) = launch(&config("io 8 16", 1, Some(disk)));
    let mut pauses = 0;
    while vm.outcome().is_none() && pauses < 200 {
        vm.pause().expect("pause");
        vm.resume().expect("resume");
        pauses += 1;
    }
    assert_eq!(vm.wait(), VmOutcome::Exited { status: 0 }, "{}", out.text());
    assert!(out.text().contains("0 bad"), "{}", out.text());
}

#[test]
fn freezes_take_turns_and_respect_the_owners_pause() {
    let (vm, out) = launch(&config("ticks 5", 1, None));
    assert!(wait_for(&out, Duration::from_secs(10), |o| ticks(o) >= 3));
    let frozen = vm.freeze().expect("freeze");
    // A checkpoint's freeze is not the owner's pause: a live update taken now must not leave
    // the VM paused in its new process.
    assert_eq!(vm.state(), VmState::Running, "a freeze looks like a pause");
    let n = ticks(&out.text());
    // The owner's resume does not run a frozen VM.
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ticks(&out.text()), n, "ran while frozen");
    let thawing = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let second = s.spawn(|| {
            let f = vm.freeze().expect("second freeze");
            // Only the first freeze's thaw lets the second one in.
            let after_thaw = thawing.load(std::sync::atomic::Ordering::SeqCst);
            f.thaw().unwrap();
            after_thaw
        });
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            !second.is_finished(),
            "a second freeze did not wait for the first"
        );
        thawing.store(true, std::sync::atomic::Ordering::SeqCst);
        frozen.thaw().unwrap();
        assert!(
            second.join().unwrap(),
            "the second freeze returned before the first thawed"
        );
    });
    assert!(
        wait_for(&out, Duration::from_secs(10), |o| ticks(o) >= n + 3),
        "did not run after the thaws"
    );
    // The owner's pause outlasts a freeze and thaw.
    vm.pause().unwrap();
    let f = vm.freeze().unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    f.thaw().unwrap();
    let m = ticks(&out.text());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ticks(&out.text()), m, "a thaw undid the owner's pause");
    vm.resume().unwrap();
    assert!(wait_for(&out, Duration::from_secs(10), |o| ticks(o) >= m + 3));
    vm.stop();
    vm.wait();
}
