//! Replaced `cpuid` sites (emulation module) under the checkpoint engine: rollbacks land while
//! sites are armed and emulated, while one turns hot and is replaced, and while the guest runs
//! from the copy; the guest's checks of its results still pass, and the write watch of the copy
//! still works afterwards (self-modifying code runs the new code).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rebound_checkpoint::{Engine, EngineConfig, OutputCommit, StrategyKind};
use rebound_devices::console::SharedBuffer;
use rebound_vmm::{GuestImage, Vm, VmConfig, VmOutcome};

#[test]
fn replaced_pages_survive_rollbacks() {
    let config = VmConfig {
        vcpu_count: 1,
        mem_size_mib: 64,
        image: GuestImage::from_bytes("testguest", rebound_guests::TESTGUEST),
        boot_args: "emucpuid 1000 1".into(),
        disk: None,
        shared: Vec::new(),
        cache: None,
        nics: Vec::new(),
        net_journal: None,
        disk_journal: None,
    };
    let out = SharedBuffer::new();
    let oc = OutputCommit::new(Box::new(out.clone()));
    let vm = Arc::new(Vm::launch(&config, oc.writer()).expect("launch"));
    let engine = Engine::start(
        vm.clone(),
        oc,
        EngineConfig {
            interval: Some(Duration::from_millis(10)),
            strategy: StrategyKind::PostImage,
        },
        vec![],
    )
    .unwrap();
    // Rollbacks through boot, the emulated runs and the replacement, then while it spins.
    let mut rollbacks = 0;
    let t0 = Instant::now();
    while vm.outcome().is_none()
        && t0.elapsed() < Duration::from_secs(30)
        && (rollbacks < 12 || !out.text().contains("flag at"))
    {
        std::thread::sleep(Duration::from_millis(15));
        if engine.rollback().is_ok() {
            rollbacks += 1;
        }
    }
    engine.stop();
    let text = out.text();
    let flag = text
        .split("flag at 0x")
        .nth(1)
        .and_then(|s| u64::from_str_radix(s.split_whitespace().next()?, 16).ok())
        .unwrap_or_else(|| panic!("no flag address: {text}"));
    assert_eq!(
        vm.metrics().emulation.replaced,
        1,
        "{:?}",
        vm.metrics().emulation
    );
    vm_memory::Bytes::write_obj(vm.memory(), 1u64, vm_memory::GuestAddress(flag)).unwrap();
    assert_eq!(vm.wait(), VmOutcome::Exited { status: 0 }, "{}", out.text());
    assert!(engine.stats().rollbacks >= 1, "no rollback happened");
    eprintln!("{rollbacks} rollbacks; {:?}", vm.metrics().emulation);
    let text = out.text();
    assert_eq!(text.matches("emucpuid n=").count(), 1, "{text}");
    assert!(text.contains("results intact"), "{text}");
    assert!(text.contains("emusmc ok"), "{text}");
}

#[test]
fn replaced_pages_of_a_multi_vcpu_vm_survive_rollbacks() {
    let config = VmConfig {
        vcpu_count: 2,
        mem_size_mib: 64,
        image: GuestImage::from_bytes("testguest", rebound_guests::TESTGUEST),
        boot_args: "emumulti 200000".into(),
        disk: None,
        shared: Vec::new(),
        cache: None,
        nics: Vec::new(),
        net_journal: None,
        disk_journal: None,
    };
    let out = SharedBuffer::new();
    let oc = OutputCommit::new(Box::new(out.clone()));
    let vm = Arc::new(Vm::launch(&config, oc.writer()).expect("launch"));
    let engine = Engine::start(
        vm.clone(),
        oc,
        EngineConfig {
            interval: Some(Duration::from_millis(10)),
            strategy: StrategyKind::PostImage,
        },
        vec![],
    )
    .unwrap();
    // Rollbacks while both vCPUs run the site as it is replaced and the page is patched.
    let mut rollbacks = 0;
    while vm.outcome().is_none() && rollbacks < 8 {
        std::thread::sleep(Duration::from_millis(15));
        if engine.rollback().is_ok() {
            rollbacks += 1;
        }
    }
    assert_eq!(vm.wait(), VmOutcome::Exited { status: 0 }, "{}", out.text());
    engine.stop();
    eprintln!("{rollbacks} rollbacks; {:?}", vm.metrics().emulation);
    let text = out.text();
    assert_eq!(text.matches("emumulti ok").count(), 1, "{text}");
}
