//! Snapshots on real KVM: taken at arbitrary moments, restored (results identical), diff
//! chains, clones that diverge, and bad files refused before anything is built.

mod common;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rebound_devices::console::SharedBuffer;
use rebound_snapshot::format::Verify;
use rebound_snapshot::{Kind, Snapshot};
use rebound_vmm::{Vm, VmOutcome};

/// ~0.4 s of guest work natively: every snapshot below (taken within 60 ms of launch) lands
/// mid-run even when a loaded host starves the test thread.
const N: u64 = 1 << 27;

fn open(paths: &[&Path]) -> Vec<Snapshot> {
    paths
        .iter()
        .map(|p| Snapshot::open(p, Verify::Full).unwrap())
        .collect()
}

fn restore(paths: &[&Path], generation: u64) -> (Vm, SharedBuffer) {
    let out = SharedBuffer::new();
    let vm = Vm::restore(&open(paths), Box::new(out.clone()), generation).expect("restore");
    (vm, out)
}

fn finish(vm: &Vm, out: &SharedBuffer) -> u64 {
    assert_eq!(vm.wait(), VmOutcome::Exited { status: 0 }, "{}", out.text());
    seq_result(&out.text()).unwrap_or_else(|| panic!("no result in {}", out.text()))
}

/// A pseudo-random delay in [lo, hi) ms, different per call.
fn jitter(lo: u64, hi: u64) -> Duration {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(lo + t % (hi - lo))
}

fn snap_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[test]
fn snapshots_at_random_moments_restore_to_the_same_result() {
    let want = seq_expected(N, &[]);
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let (vm, out) = launch(&config(&format!("seq {N}"), 1, None));
        std::thread::sleep(jitter(5, 60));
        let path = snap_path(dir.path(), &format!("s{round}.snap"));
        let info = vm.snapshot(&path, Kind::Full).expect("snapshot");
        assert!(info.pages > 0);
        // The original is not disturbed by the snapshot.
        assert_eq!(finish(&vm, &out), want, "original, round {round}");
        // The restored copy (same generation: it must not notice) computes the same result.
        let (r, rout) = restore(&[&path], 0);
        assert_eq!(finish(&r, &rout), want, "restored, round {round}");
    }
}

#[test]
fn the_guest_clock_continues_across_a_restore() {
    // The guest checks every reading against the VMM's clock and the one before it; the
    // restored copy runs in a VM with new vCPUs (new TSC offsets) and must agree all the same.
    let dir = tempfile::tempdir().unwrap();
    let (vm, out) = launch(&config("clock 20000", 1, None));
    assert!(wait_for(&out, Duration::from_secs(30), |o| o
        .contains("clock started")));
    std::thread::sleep(jitter(5, 30));
    let path = snap_path(dir.path(), "clock.snap");
    vm.snapshot(&path, Kind::Full).expect("snapshot");
    vm.stop();
    let (r, rout) = restore(&[&path], 1);
    assert_eq!(r.wait(), VmOutcome::Exited { status: 0 }, "{}", rout.text());
    assert!(rout.text().contains("clock ok"), "{}", rout.text());
}

#[test]
fn a_diff_chain_restores() {
    let want = seq_expected(N, &[]);
    let dir = tempfile::tempdir().unwrap();
    // A line every N/64 steps: each diff below waits for one, so the guest surely ran (and
    // wrote pages) since the previous snapshot, however starved its vCPU thread is.
    let (vm, out) = launch(&config(&format!("seq {N} {}", N / 64), 1, None));
    let lines = || out.text().lines().count();
    let ran_on = |seen: usize| {
        assert!(
            wait_for(&out, Duration::from_secs(30), |o| o.lines().count() > seen),
            "the guest made no progress"
        );
    };
    let full = snap_path(dir.path(), "full.snap");
    let d1 = snap_path(dir.path(), "d1.snap");
    let d2 = snap_path(dir.path(), "d2.snap");
    assert!(
        vm.snapshot(&d1, Kind::Diff).is_err(),
        "a diff needs a full snapshot first"
    );
    std::thread::sleep(jitter(2, 15));
    vm.snapshot(&full, Kind::Full).unwrap();
    ran_on(lines());
    std::thread::sleep(jitter(2, 15));
    let i1 = vm.snapshot(&d1, Kind::Diff).unwrap();
    ran_on(lines());
    std::thread::sleep(jitter(2, 15));
    let i2 = vm.snapshot(&d2, Kind::Diff).unwrap();
    assert_eq!(finish(&vm, &out), want);
    assert!(i1.pages > 0 && i2.pages > 0);
    let full_pages = Snapshot::open(&full, Verify::Full).unwrap().stored_pages();
    assert!(
        i2.pages < full_pages,
        "a diff holds only what changed ({} vs {full_pages})",
        i2.pages
    );

    for chain in [vec![&*full, &*d1, &*d2], vec![&*full, &*d1], vec![&*full]] {
        let (r, rout) = restore(&chain, 0);
        assert_eq!(finish(&r, &rout), want, "chain of {}", chain.len());
    }
    let e = Vm::restore(&open(&[&full, &d2]), Box::new(std::io::sink()), 0)
        .err()
        .unwrap();
    assert!(e.to_string().contains("is not a diff of"), "{e}");
    let e = Vm::restore(&open(&[&d1]), Box::new(std::io::sink()), 0)
        .err()
        .unwrap();
    assert!(e.to_string().contains("starts with a full snapshot"), "{e}");
}

#[test]
fn ten_clones_share_a_snapshot_and_diverge() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, out) = launch(&config(&format!("seq {N}"), 1, None));
    std::thread::sleep(jitter(10, 40));
    let path = snap_path(dir.path(), "base.snap");
    vm.snapshot(&path, Kind::Full).unwrap();
    vm.stop();
    vm.wait();
    drop(out);
    let clones: Vec<(Vm, SharedBuffer)> = (0..10).map(|k| restore(&[&path], 1000 + k)).collect();
    let mut results = std::collections::HashSet::new();
    for (k, (c, cout)) in clones.iter().enumerate() {
        let r = finish(c, cout);
        let text = cout.text();
        let gens = seq_gens(&text);
        assert_eq!(gens.len(), 1, "clone {k} saw its generation once: {text}");
        assert_eq!(gens[0].0, 1000 + k as u64);
        assert_eq!(r, seq_expected(N, &gens), "clone {k} computed wrongly");
        results.insert(r);
    }
    assert_eq!(results.len(), 10, "each clone diverged into its own result");
}

#[test]
fn bad_snapshots_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, out) = launch(&config(&format!("seq {N}"), 2, None));
    std::thread::sleep(Duration::from_millis(20));
    let path = snap_path(dir.path(), "s.snap");
    vm.snapshot(&path, Kind::Full).unwrap();
    vm.stop();
    vm.wait();
    drop(out);
    let good = std::fs::read(&path).unwrap();
    let bad = snap_path(dir.path(), "bad.snap");
    let mut cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..good.len() / 2].to_vec(), "truncated"),
        (good[..100].to_vec(), "section \"header\" is incomplete"),
    ];
    let mut flipped = good.clone();
    flipped[4096 + 3] ^= 1;
    cases.push((flipped, "section \"vm\" fails its checksum"));
    let mut future = good.clone();
    future[8] = 9;
    cases.push((future, "format version 9"));
    for (bytes, want) in cases {
        std::fs::write(&bad, bytes).unwrap();
        let e = Snapshot::open(&bad, Verify::Full)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains(want), "{e:?} should mention {want:?}");
    }
}

#[test]
fn a_snapshot_does_not_choose_the_host_disk() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let disk = rebound_vmm::DiskConfig::File {
        path: img.clone(),
        read_only: false,
        mirror: None,
    };
    let (vm, _out) = launch(&config("ticks 5", 1, Some(disk)));
    std::thread::sleep(Duration::from_millis(30));
    let path = snap_path(dir.path(), "d.snap");
    vm.snapshot(&path, Kind::Full).unwrap();
    vm.stop();
    vm.wait();
    // It holds its disk file (locked) until it is gone.
    drop(vm);
    let options = |disk| rebound_vmm::vm::RestoreOptions {
        generation: 0,
        paused: false,
        disk,
        same_vm: false,
        nic_backends: Vec::new(),
        net_journal: None,
        disk_journal: None,
        disk_mirror: None,
    };
    let e = Vm::restore_with(&open(&[&path]), Box::new(std::io::sink()), options(None))
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("name the disk to attach explicitly"),
        "{e}"
    );
    let small = dir.path().join("small.img");
    std::fs::write(&small, vec![0u8; 4096]).unwrap();
    let e = Vm::restore_with(
        &open(&[&path]),
        Box::new(std::io::sink()),
        options(Some(small)),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("the VM was saved with"), "{e}");
    let r = Vm::restore_with(
        &open(&[&path]),
        Box::new(std::io::sink()),
        options(Some(img)),
    )
    .unwrap();
    r.stop();
    r.wait();
}

#[test]
fn a_restored_vm_snapshots_the_pages_it_wrote_over_holes() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, _out) = launch(&config("ticks 5", 1, None));
    std::thread::sleep(Duration::from_millis(30));
    let a = snap_path(dir.path(), "a.snap");
    vm.snapshot(&a, Kind::Full).unwrap();
    vm.stop();
    vm.wait();
    let (r, _rout) = restore(&[&a], 0);
    // A page that is a hole in the snapshot (high in guest memory), written after the restore.
    let page = (60u64 << 20) / 4096;
    let stored = |s: &Snapshot| {
        s.runs()
            .iter()
            .any(|run| (run.first..run.first + run.count).contains(&page))
    };
    assert!(
        !stored(&Snapshot::open(&a, Verify::Full).unwrap()),
        "the page must be a hole in the first snapshot"
    );
    {
        let f = r.freeze().unwrap();
        f.write_memory(page * 4096, &[0x5a; 4096]).unwrap();
        assert!(
            f.data_pages().contains(page),
            "a written page counts as holding data"
        );
        f.thaw().unwrap();
    }
    let b = snap_path(dir.path(), "b.snap");
    r.snapshot(&b, Kind::Full).unwrap();
    r.stop();
    r.wait();
    let s = Snapshot::open(&b, Verify::Full).unwrap();
    let mut buf = vec![0u8; 4096];
    s.read_memory(page * 4096, &mut buf).unwrap();
    assert_eq!(buf, vec![0x5a; 4096]);
    assert!(stored(&s), "the written page is stored");
}
