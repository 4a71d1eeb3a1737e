//! Programs (ABI 1.10) under the checkpoint engine: rollbacks land while programs run, between
//! runs and around table changes, and the guest's checks of its programs' isolation and counters
//! still all pass, with output neither repeated nor lost.

use std::sync::Arc;
use std::time::Duration;

use rebound_checkpoint::{Engine, EngineConfig, OutputCommit, StrategyKind};
use rebound_devices::console::SharedBuffer;
use rebound_vmm::{GuestImage, Vm, VmConfig, VmOutcome};

fn launch(args: &str) -> (Arc<Vm>, Arc<OutputCommit>, SharedBuffer) {
    let config = VmConfig {
        vcpu_count: 1,
        mem_size_mib: 64,
        image: GuestImage::from_bytes("testguest", rebound_guests::TESTGUEST),
        boot_args: args.into(),
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
    (vm, oc, out)
}

#[test]
fn programs_survive_rollbacks() {
    // Thousands of program switches (~0.1 ms each): rollbacks land in every phase.
    let args = "progs 4000";
    let (vm, oc, out) = launch(args);
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
    let mut rollbacks = 0;
    while vm.outcome().is_none() && rollbacks < 10 {
        std::thread::sleep(Duration::from_millis(20));
        if engine.rollback().is_ok() {
            rollbacks += 1;
        }
    }
    assert_eq!(vm.wait(), VmOutcome::Exited { status: 0 }, "{}", out.text());
    engine.stop();
    assert!(engine.stats().rollbacks >= 1, "no rollback happened");
    let text = out.text();
    assert!(text.contains("progs ok"), "{text}");
    // Each line once: nothing output twice across the rollbacks.
    assert_eq!(text.matches("progs ok").count(), 1, "{text}");
    assert_eq!(text.matches("counters intact").count(), 1, "{text}");
}
