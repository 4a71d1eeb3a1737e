//! The checkpoint engine on real KVM: every strategy keeps the guest correct; rollbacks neither
//! repeat nor lose output; snapshot-directory sinks restore; 100 epochs/s for 30 s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rebound_checkpoint::sink::{SnapshotDir, newest_chain};
use rebound_checkpoint::{Engine, EngineConfig, OutputCommit, StrategyKind};
use rebound_devices::console::SharedBuffer;
use rebound_guests::testguest::{seq_expected, stress_round};
use rebound_snapshot::Snapshot;
use rebound_snapshot::format::Verify;
use rebound_vmm::{GuestImage, Vm, VmConfig, VmOutcome};

fn config(args: &str) -> VmConfig {
    VmConfig {
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
    }
}

/// A VM whose console goes through output commit into `out`.
fn launch(args: &str) -> (Arc<Vm>, Arc<OutputCommit>, SharedBuffer) {
    let out = SharedBuffer::new();
    let oc = OutputCommit::new(Box::new(out.clone()));
    let vm = Arc::new(Vm::launch(&config(args), oc.writer()).expect("launch"));
    (vm, oc, out)
}

fn jitter_ms(lo: u64, hi: u64) -> Duration {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(lo + t % (hi - lo))
}

fn seq_result(out: &str) -> Option<u64> {
    let line = out.lines().find(|l| l.starts_with("seq done"))?;
    u64::from_str_radix(line.rsplit_once("result=")?.1.trim(), 16).ok()
}

/// ~0.4 s of guest work natively: room for dozens of 10 ms epochs even on a loaded host.
const N: u64 = 1 << 27;

#[test]
fn every_strategy_keeps_the_guest_correct() {
    let want = seq_expected(N, &[]);
    for strategy in StrategyKind::ALL {
        let (vm, oc, out) = launch(&format!("seq {N}"));
        let engine = Engine::start(
            vm.clone(),
            oc,
            EngineConfig {
                interval: Some(Duration::from_millis(10)),
                strategy,
            },
            vec![],
        )
        .unwrap_or_else(|e| panic!("{strategy:?}: {e}"));
        assert_eq!(
            vm.wait(),
            VmOutcome::Exited { status: 0 },
            "{strategy:?}: {}",
            out.text()
        );
        let stats = engine.stats();
        engine.stop();
        assert!(
            stats.epochs >= 3,
            "{strategy:?}: only {} epochs",
            stats.epochs
        );
        assert_eq!(
            seq_result(&out.text()),
            Some(want),
            "{strategy:?}: {}",
            out.text()
        );
    }
}

/// The output of an uninterrupted run of the same guest.
fn reference(args: &str) -> String {
    let (vm, _oc, out) = launch(args);
    assert_eq!(vm.wait(), VmOutcome::Exited { status: 0 });
    out.text()
}

#[test]
fn rollback_neither_repeats_nor_loses_output() {
    let args = format!("seq {N} {}", N / 256);
    let want = reference(&args);
    assert_eq!(want.lines().count(), 257);
    for strategy in StrategyKind::ALL {
        let (vm, oc, out) = launch(&args);
        let engine = Engine::start(
            vm.clone(),
            oc,
            EngineConfig {
                interval: Some(Duration::from_millis(15)),
                strategy,
            },
            vec![],
        )
        .unwrap();
        let mut rollbacks = 0;
        while vm.outcome().is_none() && rollbacks < 8 {
            std::thread::sleep(jitter_ms(5, 40));
            if engine.rollback().is_ok() {
                rollbacks += 1;
            }
        }
        assert_eq!(vm.wait(), VmOutcome::Exited { status: 0 });
        engine.stop();
        let stats = engine.stats();
        assert!(stats.rollbacks >= 1, "{strategy:?}: no rollback happened");
        // What the outside world saw is exactly the uninterrupted run's output.
        assert_eq!(
            out.text(),
            want,
            "{strategy:?} after {} rollbacks (discarded {} bytes)",
            stats.rollbacks,
            stats.output.discarded_bytes
        );
    }
}

#[test]
fn output_is_held_until_its_checkpoint() {
    let (vm, oc, out) = launch("ticks 2");
    let engine = Engine::start(
        vm.clone(),
        oc,
        EngineConfig {
            interval: None,
            strategy: StrategyKind::PostImage,
        },
        vec![],
    )
    .unwrap();
    // A tick line is at most 33 bytes: 200 held bytes are at least 6 lines.
    let held = |bytes: u64| {
        let t0 = Instant::now();
        while engine.stats().output.held_bytes < bytes {
            assert!(t0.elapsed() < Duration::from_secs(20), "nothing is held");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    held(200);
    let before = out.text().lines().count();
    engine.checkpoint().unwrap();
    let after = out.text().lines().count();
    assert!(
        after > before + 5,
        "the checkpoint released the held ticks ({before} -> {after})"
    );
    // A rollback drops what was printed since the checkpoint: it was never shown.
    held(1);
    let shown = out.text();
    engine.rollback().unwrap();
    assert_eq!(out.text(), shown, "rollback showed nothing");
    assert!(engine.stats().output.discarded_bytes > 0);
    vm.stop();
    vm.wait();
}

#[test]
fn snapshot_directory_sink_restores_and_compacts() {
    let dir = tempfile::tempdir().unwrap();
    // Twice N: the guest must outlive 12 epochs however slowly the host lets them come.
    const LONG: u64 = N << 1;
    let (vm, oc, out) = launch(&format!("seq {LONG}"));
    let sink = SnapshotDir::new(dir.path(), 4).unwrap();
    let engine = Engine::start(
        vm.clone(),
        oc,
        EngineConfig {
            interval: Some(Duration::from_millis(10)),
            strategy: StrategyKind::DoubleBuffered,
        },
        vec![Box::new(sink)],
    )
    .unwrap();
    let t0 = Instant::now();
    while engine.stats().epochs < 12 && t0.elapsed() < Duration::from_secs(20) {
        assert!(
            vm.outcome().is_none(),
            "the guest ended before 12 epochs: {:?}",
            engine.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    engine.stop();
    let stats = engine.stats();
    assert!(stats.epochs >= 12 && stats.sink_errors == 0, "{stats:?}");
    // Dropping the sink waits for a merge still running in the background.
    drop(engine);
    let chain = newest_chain(dir.path()).unwrap();
    assert!(
        (1..=5).contains(&chain.len()),
        "compaction keeps the chain short: {chain:?}"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().count() <= 5,
        "old chains are deleted"
    );
    vm.stop();
    vm.wait();
    drop(out);
    let snaps: Vec<Snapshot> = chain
        .iter()
        .map(|p| Snapshot::open(p, Verify::Full).unwrap())
        .collect();
    let rout = SharedBuffer::new();
    let restored = Vm::restore(&snaps, Box::new(rout.clone()), 0).unwrap();
    assert_eq!(restored.wait(), VmOutcome::Exited { status: 0 });
    assert_eq!(seq_result(&rout.text()), Some(seq_expected(LONG, &[])));
}

#[test]
fn interval_is_validated() {
    let (vm, oc, _out) = launch("exit 0");
    for ms in [0, 4, 10_001] {
        let e = Engine::start(
            vm.clone(),
            oc.clone(),
            EngineConfig {
                interval: Some(Duration::from_millis(ms)),
                strategy: StrategyKind::Full,
            },
            vec![],
        );
        assert!(e.err().unwrap().to_string().contains("interval_ms"));
    }
}

/// The endurance figure: 100 checkpoints a second for 30 seconds (3000 epochs at a 10 ms
/// interval; a loaded host may take longer to get there, the epoch rate is the benchmark's
/// business), with the guest checking its own memory every round and the host recomputing
/// sampled rounds.
#[test]
fn hundred_epochs_per_second_for_thirty_seconds() {
    const MIB: u64 = 4;
    let (vm, oc, out) = launch(&format!("stress {MIB}"));
    let engine = Engine::start(
        vm.clone(),
        oc,
        EngineConfig {
            interval: Some(Duration::from_millis(10)),
            strategy: StrategyKind::DoubleBuffered,
        },
        vec![],
    )
    .unwrap();
    let t0 = Instant::now();
    let mut rollbacks = 0;
    while engine.stats().epochs < 3000 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "only {:?} after 120 s",
            engine.stats()
        );
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            vm.outcome().is_none(),
            "the guest ended: {:?}\n{}",
            vm.outcome(),
            out.text()
        );
        engine.rollback().unwrap();
        rollbacks += 1;
    }
    let stats = engine.stats();
    engine.stop();
    vm.stop();
    vm.wait();
    assert_eq!(stats.rollbacks, rollbacks);
    let text = out.text();
    assert!(!text.contains("MISMATCH"), "{text}");
    let rounds: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("stress round ")?;
            let (r, sum) = rest.split_once(" sum=")?;
            Some((r.parse().ok()?, u64::from_str_radix(sum, 16).ok()?))
        })
        .collect();
    assert!(
        rounds.len() >= 10,
        "too little progress: {} rounds",
        rounds.len()
    );
    for (i, (r, _)) in rounds.iter().enumerate() {
        assert_eq!(*r, i as u64, "rounds are released exactly once, in order");
    }
    let words = (MIB << 20) / 8;
    for &(r, sum) in [rounds.first(), rounds.get(rounds.len() / 2), rounds.last()]
        .into_iter()
        .flatten()
    {
        assert_eq!(sum, stress_round(r, words), "round {r}");
    }
}

#[test]
fn rolling_back_one_vm_leaves_another_alone() {
    let args = format!("seq {} {}", 4 * N, N / 64);
    let want = reference(&args);
    let (a, a_oc, a_out) = launch(&args);
    let (b, b_oc, b_out) = launch(&args);
    let cfg = EngineConfig {
        interval: Some(Duration::from_millis(15)),
        strategy: StrategyKind::PostImage,
    };
    let ea = Engine::start(a.clone(), a_oc, cfg, vec![]).unwrap();
    let eb = Engine::start(b.clone(), b_oc, cfg, vec![]).unwrap();
    while a.outcome().is_none() {
        std::thread::sleep(jitter_ms(5, 30));
        let _ = ea.rollback();
    }
    assert_eq!(b.wait(), VmOutcome::Exited { status: 0 });
    assert_eq!(a.wait(), VmOutcome::Exited { status: 0 });
    ea.stop();
    eb.stop();
    assert!(ea.stats().rollbacks > 0);
    assert_eq!(eb.stats().rollbacks, 0);
    assert_eq!(eb.stats().output.discarded_bytes, 0, "B lost nothing");
    assert_eq!(a_out.text(), want);
    assert_eq!(b_out.text(), want);
}

/// A sink that fails while told to.
struct Flaky(Arc<std::sync::atomic::AtomicBool>);

impl rebound_checkpoint::sink::Sink for Flaky {
    fn name(&self) -> String {
        "flaky".into()
    }
    fn commit(
        &mut self,
        _: &rebound_checkpoint::sink::CheckpointData<'_>,
    ) -> Result<(), rebound_checkpoint::Error> {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(rebound_checkpoint::Error::Sink {
                sink: "flaky".into(),
                reason: "told to fail".into(),
            });
        }
        Ok(())
    }
}

/// A commit point that records the epochs it was given.
struct Point(Arc<std::sync::Mutex<Vec<u64>>>);

impl rebound_checkpoint::sink::Sink for Point {
    fn name(&self) -> String {
        "point".into()
    }
    fn commit(
        &mut self,
        cp: &rebound_checkpoint::sink::CheckpointData<'_>,
    ) -> Result<(), rebound_checkpoint::Error> {
        self.0.lock().unwrap().push(cp.epoch);
        Ok(())
    }
    fn is_commit_point(&self) -> bool {
        true
    }
}

#[test]
fn an_unacknowledged_checkpoint_never_reaches_the_commit_point() {
    let (vm, oc, _out) = launch("ticks 2");
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Given first, committed last.
    let sinks: Vec<Box<dyn rebound_checkpoint::sink::Sink>> =
        vec![Box::new(Point(seen.clone())), Box::new(Flaky(fail.clone()))];
    let config = EngineConfig {
        interval: None,
        strategy: StrategyKind::PostImage,
    };
    let engine = Engine::start(vm.clone(), oc, config, sinks).unwrap();
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = engine.checkpoint().unwrap();
    assert!(!r.acked);
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let r2 = engine.checkpoint().unwrap();
    assert!(r2.acked);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![1, r2.epoch],
        "epoch {} must be skipped",
        r.epoch
    );
    vm.stop();
    vm.wait();
    engine.stop();
}
