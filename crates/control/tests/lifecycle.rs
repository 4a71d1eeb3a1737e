//! The instance's lifecycle against real VMs: a clean shutdown request (Firecracker's
//! `SendCtrlAltDel`) that a guest honours or ignores, and refused starts that leave the
//! instance as it was.

use std::time::{Duration, Instant};

use rebound_control::{Instance, MachineConfig, Phase};
use rebound_devices::console::SharedBuffer;
use rebound_vmm::{GuestImage, VmOutcome};

fn instance(out: &SharedBuffer, args: &str) -> Instance {
    let i = Instance::new("t", Box::new(out.clone()));
    i.set_machine_config(MachineConfig {
        vcpu_count: 1,
        mem_size_mib: 32,
        ..Default::default()
    })
    .unwrap();
    i.set_boot_source(
        GuestImage::from_bytes("testguest", rebound_guests::TESTGUEST),
        args.into(),
    )
    .unwrap();
    i
}

fn wait_for(out: &SharedBuffer, what: &str) {
    let t0 = Instant::now();
    while !out.text().contains(what) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no {what:?} in {}",
            out.text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_guest_that_honours_shutdown_exits_cleanly() {
    let out = SharedBuffer::new();
    // Ticks for ever, 10 ms apart, blocked in the VMM between ticks.
    let i = instance(&out, "ticks 10");
    i.start().unwrap();
    wait_for(&out, "tick 2 ");
    let t0 = Instant::now();
    // A grace longer than any test: the guest must end by itself.
    i.shutdown(Duration::from_secs(600)).unwrap();
    assert_eq!(i.wait().unwrap(), VmOutcome::Exited { status: 0 });
    assert!(
        out.text().contains("shutdown requested after"),
        "{}",
        out.text()
    );
    assert!(t0.elapsed() < Duration::from_secs(60));
    assert_eq!(i.phase(), Phase::Exited);
    assert!(i.shutdown(Duration::from_secs(1)).is_err(), "it has ended");
}

#[test]
fn a_guest_that_ignores_shutdown_is_stopped_after_the_grace_period() {
    let out = SharedBuffer::new();
    let i = instance(&out, "spin");
    let vm = i.start().unwrap();
    let grace = Duration::from_millis(300);
    let t0 = Instant::now();
    i.shutdown(grace).unwrap();
    assert_eq!(i.wait().unwrap(), VmOutcome::Stopped);
    assert!(t0.elapsed() >= grace, "stopped only after the grace period");
    assert!(vm.outcome().is_some());
}

#[test]
fn a_start_refused_for_a_missing_disk_leaves_the_instance_startable() {
    let dir = tempfile::tempdir().unwrap();
    let out = SharedBuffer::new();
    let i = instance(&out, "exit 7");
    let disk = dir.path().join("gone.img");
    i.set_disk(Some(rebound_vmm::DiskConfig::File {
        path: disk.clone(),
        read_only: false,
        mirror: None,
    }))
    .unwrap();
    let Err(e) = i.start() else {
        panic!("started without its disk")
    };
    assert!(e.to_string().contains("gone.img"), "{e}");
    assert_eq!(i.phase(), Phase::NotStarted);
    i.set_disk(None).unwrap();
    i.start().unwrap();
    assert_eq!(i.wait().unwrap(), VmOutcome::Exited { status: 7 });
}
