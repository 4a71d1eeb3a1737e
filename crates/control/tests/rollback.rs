//! Rolling a protected VM back to a named (earlier) checkpoint kept in its snapshot directory.

use std::time::{Duration, Instant};

use rebound_checkpoint::StrategyKind;
use rebound_control::{Instance, MachineConfig, Protection};
use rebound_devices::console::SharedBuffer;
use rebound_guests::testguest::seq_expected;
use rebound_vmm::{GuestImage, VmOutcome};

/// ~0.9 s of guest work: the guest must still run after the target checkpoint and four more.
const N: u64 = 1 << 28;

fn instance(out: &SharedBuffer) -> Instance {
    let i = Instance::new("t", Box::new(out.clone()));
    i.set_machine_config(MachineConfig {
        vcpu_count: 1,
        mem_size_mib: 64,
        ..Default::default()
    })
    .unwrap();
    i.set_boot_source(
        GuestImage::from_bytes("testguest", rebound_guests::TESTGUEST),
        format!("seq {N} {}", N / 64),
    )
    .unwrap();
    i
}

fn result(out: &str) -> Option<u64> {
    let line = out.lines().find(|l| l.starts_with("seq done"))?;
    u64::from_str_radix(line.rsplit_once("result=")?.1.trim(), 16).ok()
}

#[test]
fn rollback_to_an_earlier_checkpoint_by_epoch() {
    for strategy in [
        StrategyKind::PostImage,
        StrategyKind::PreImage,
        StrategyKind::BlockState,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = SharedBuffer::new();
        let i = instance(&out);
        i.start().unwrap();
        i.protect(Protection {
            interval_ms: None,
            strategy,
            snapshot_dir: Some(dir.path().into()),
            max_chain: 64,
            standby: None,
            standby_hot: false,
        })
        .unwrap();
        // The target checkpoint once some lines are out, then more while the guest goes on.
        let t0 = Instant::now();
        while out.text().lines().count() < 2 && t0.elapsed() < Duration::from_secs(10) {
            i.checkpoint().unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        let target = i.checkpoint().unwrap().epoch;
        let seen_at_target = out.text().lines().count();
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(15));
            i.checkpoint().unwrap();
        }
        assert!(
            i.rollback_to(999)
                .unwrap_err()
                .to_string()
                .contains("checkpoint 999 is not in the directory")
        );
        assert!(
            i.vm().unwrap().outcome().is_none(),
            "{strategy:?}: the guest ended before the rollback"
        );
        let back = i.rollback_to(target).unwrap();
        assert_eq!(back, target);
        let (_, stats) = i.protection().unwrap();
        assert_eq!(
            stats.epochs, 1,
            "{strategy:?}: protection restarted from the rolled-back state"
        );
        let t0 = Instant::now();
        while i.vm().unwrap().outcome().is_none() && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(i.wait().unwrap(), VmOutcome::Exited { status: 0 });
        let text = out.text();
        assert_eq!(
            result(&text),
            Some(seq_expected(N, &[])),
            "{strategy:?}: {text}"
        );
        // Lines released by the target checkpoint (visible when it returned) are never repeated;
        // those released after it are (the guest produced them again from the target).
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            seen_at_target > 0,
            "{strategy:?}: nothing was released by the target"
        );
        for l in &lines[..seen_at_target] {
            let n = lines.iter().filter(|x| *x == l).count();
            assert_eq!(
                n, 1,
                "{strategy:?}: {l:?} was released before the target and repeated"
            );
        }
    }
}
