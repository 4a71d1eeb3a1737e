//! Checkpoint engine and snapshot benchmarks (issue 3's figures).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rebound_checkpoint::sink::{Sink, SnapshotDir};
use rebound_checkpoint::{Engine, EngineConfig, OutputCommit, StrategyKind};
use rebound_devices::console::SharedBuffer;
use rebound_snapshot::format::Verify;
use rebound_snapshot::{Kind, Snapshot};
use rebound_vmm::Vm;
use rebound_vmm::vm::RestoreOptions;

use crate::{emit, median_p99, testguest};

const DIRTY_COUNTS: [u64; 4] = [1, 64, 1024, 16384];

/// A VM running the test guest with its console captured.
fn vm(args: &str, mem_mib: u64) -> Result<(Arc<Vm>, Arc<OutputCommit>, SharedBuffer)> {
    let out = SharedBuffer::new();
    let oc = OutputCommit::new(Box::new(out.clone()));
    let vm = Arc::new(Vm::launch(&testguest(args, 1, mem_mib), oc.writer())?);
    Ok((vm, oc, out))
}

fn wait_output(out: &SharedBuffer, what: &str, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    while !out.text().contains(what) {
        if t0.elapsed() > timeout {
            bail!("the guest never printed {what:?}: {}", out.text());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Plain memcpy bandwidth in bytes/s (best of 5 copies of 64 MiB), for comparison.
fn memcpy_bandwidth() -> f64 {
    let src = vec![7u8; 64 << 20];
    let mut dst = vec![0u8; 64 << 20];
    dst.copy_from_slice(&src);
    (0..5)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(&mut dst).copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            src.len() as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// Time for the guest to re-dirty K pages after a checkpoint (each first write faults).
fn cycle(strategy: StrategyKind, k: u64) -> Duration {
    let per_page_us = if matches!(strategy, StrategyKind::PreImage | StrategyKind::BlockState) {
        200
    } else {
        40
    };
    Duration::from_millis(5) + Duration::from_micros(per_page_us * k)
}

/// Pause per checkpoint against dirty pages, per strategy; capture throughput against memcpy;
/// and pause with a fsyncing sink, synchronous versus double-buffered.
pub fn pause_and_throughput() -> Result<()> {
    let memcpy = memcpy_bandwidth();
    emit("memcpy_bandwidth", memcpy / 1e9, "GB/s");
    let mut best_capture: Vec<(StrategyKind, f64)> = Vec::new();
    for strategy in StrategyKind::ALL {
        for k in DIRTY_COUNTS {
            let (vm, oc, _out) = vm(&format!("dirty {k}"), 256)?;
            let engine = Engine::start(
                vm.clone(),
                oc,
                EngineConfig {
                    interval: None,
                    strategy,
                },
                vec![],
            )?;
            std::thread::sleep(cycle(strategy, k));
            engine.checkpoint()?;
            let runs = if k >= 16384 { 8 } else { 25 };
            let (mut pauses, mut dirty, mut tput) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..runs {
                std::thread::sleep(cycle(strategy, k));
                let r = engine.checkpoint()?;
                pauses.push(r.pause_us);
                dirty.push(r.dirty_pages as f64);
                if r.capture_us > 0.0
                    && !matches!(strategy, StrategyKind::PreImage | StrategyKind::BlockState)
                {
                    tput.push(r.dirty_pages as f64 * 4096.0 / (r.capture_us / 1e6));
                }
            }
            let held = engine.strategy_memory_bytes();
            engine.stop();
            vm.stop();
            vm.wait();
            let name = strategy.name();
            emit(
                &format!("checkpoint_memory_{name}_{k}"),
                held as f64 / (1 << 20) as f64,
                "MiB",
            );
            let (m, p) = median_p99(pauses);
            let (d, _) = median_p99(dirty);
            emit(&format!("checkpoint_pause_{name}_{k}_median"), m, "us");
            emit(&format!("checkpoint_pause_{name}_{k}_p99"), p, "us");
            emit(&format!("checkpoint_dirty_{name}_{k}"), d, "pages");
            eprintln!(
                "checkpoint {name:>15} K={k:>5}: pause median {m:>8.0} us p99 {p:>8.0} us ({d:.0} pages captured; strategy holds {})",
                human(held)
            );
            if k == 16384 && !tput.is_empty() {
                let (t, _) = median_p99(tput);
                best_capture.push((strategy, t));
            }
        }
    }
    for (strategy, t) in best_capture {
        emit(
            &format!("capture_throughput_{}", strategy.name()),
            t / 1e9,
            "GB/s",
        );
        emit(
            &format!("capture_vs_memcpy_{}", strategy.name()),
            t / memcpy,
            "ratio",
        );
        eprintln!(
            "capture {:>15}: {:.2} GB/s = {:.0}% of memcpy ({:.2} GB/s)",
            strategy.name(),
            t / 1e9,
            100.0 * t / memcpy,
            memcpy / 1e9
        );
    }

    // The same checkpoints with a snapshot-directory sink (fsync per checkpoint): a synchronous
    // strategy pauses for the sink, the double-buffered one does not.
    let dir = tempfile::tempdir()?;
    for strategy in [
        StrategyKind::PostImage,
        StrategyKind::DoubleBuffered,
        StrategyKind::BlockState,
    ] {
        let k = 1024;
        let (vm, oc, _out) = vm(&format!("dirty {k}"), 256)?;
        let sink: Box<dyn Sink> =
            Box::new(SnapshotDir::new(&dir.path().join(strategy.name()), 64)?);
        let engine = Engine::start(
            vm.clone(),
            oc,
            EngineConfig {
                interval: None,
                strategy,
            },
            vec![sink],
        )?;
        let (mut pauses, mut commits) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            std::thread::sleep(cycle(strategy, k));
            let r = engine.checkpoint()?;
            pauses.push(r.pause_us);
            commits.push(r.commit_us);
        }
        engine.stop();
        vm.stop();
        vm.wait();
        let (m, p) = median_p99(pauses);
        let (c, _) = median_p99(commits);
        emit(
            &format!("checkpoint_pause_with_sink_{}_median", strategy.name()),
            m,
            "us",
        );
        emit(
            &format!("checkpoint_pause_with_sink_{}_p99", strategy.name()),
            p,
            "us",
        );
        emit(
            &format!("checkpoint_sink_commit_{}_median", strategy.name()),
            c,
            "us",
        );
        eprintln!(
            "with a fsyncing sink, K=1024: {:>15} pause median {m:.0} us (sink commit {c:.0} us)",
            strategy.name()
        );
    }
    Ok(())
}

/// Work a `rate PERMILLE SECS` guest reported.
fn work_of(text: &str) -> Result<f64> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("work="))
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("no work figure in {text:?}"))
}

/// Guest work rate at 10, 50 and 100 epochs/s against unprotected, for a guest writing 1% and
/// 10% of its memory per second (double-buffered); then every strategy at 50 epochs/s, with
/// the memory each holds at the end.
pub fn slowdown() -> Result<()> {
    let secs = 3;
    for permille in [10u64, 100] {
        let mut base = 0.0;
        for eps in [0u64, 10, 50, 100] {
            let (vm, oc, out) = vm(&format!("rate {permille} {secs}"), 256)?;
            let engine = match eps {
                0 => None,
                _ => Some(Engine::start(
                    vm.clone(),
                    oc,
                    EngineConfig {
                        interval: Some(Duration::from_millis(1000 / eps)),
                        strategy: StrategyKind::DoubleBuffered,
                    },
                    vec![],
                )?),
            };
            vm.wait();
            let stats = engine.as_ref().map(|e| e.stats());
            drop(engine);
            let work = work_of(&out.text())?;
            if eps == 0 {
                base = work;
                continue;
            }
            let slow = 100.0 * (1.0 - work / base);
            let pct = permille as f64 / 10.0;
            emit(&format!("slowdown_{pct}pct_{eps}eps"), slow, "%");
            eprintln!(
                "slowdown writing {pct}%/s at {eps:>3} epochs/s (double_buffered): {slow:5.1}% ({} epochs, pause median {:.0} us)",
                stats.as_ref().map_or(0, |s| s.epochs),
                stats.as_ref().map_or(0.0, |s| s.pause_us.median)
            );
        }
    }
    for permille in [10u64, 100] {
        let pct = permille as f64 / 10.0;
        let (plain, _oc, out) = vm(&format!("rate {permille} {secs}"), 256)?;
        plain.wait();
        let base = work_of(&out.text())?;
        for strategy in StrategyKind::ALL {
            let (vm, oc, out) = vm(&format!("rate {permille} {secs}"), 256)?;
            let engine = Engine::start(
                vm.clone(),
                oc,
                EngineConfig {
                    interval: Some(Duration::from_millis(20)),
                    strategy,
                },
                vec![],
            )?;
            vm.wait();
            let stats = engine.stats();
            let held = engine.strategy_memory_bytes();
            drop(engine);
            let slow = 100.0 * (1.0 - work_of(&out.text())? / base);
            let name = strategy.name();
            emit(&format!("slowdown_{pct}pct_50eps_{name}"), slow, "%");
            emit(
                &format!("slowdown_memory_{pct}pct_{name}"),
                held as f64 / (1 << 20) as f64,
                "MiB",
            );
            eprintln!(
                "slowdown writing {pct}%/s at 50 epochs/s, {name:>15}: {slow:5.1}% ({} epochs, pause median {:.0} us, strategy holds {})",
                stats.epochs,
                stats.pause_us.median,
                human(held)
            );
        }
    }
    Ok(())
}

/// Snapshot create and restore latency for 256 MiB, 1 GiB and 4 GiB guests that touched 64 MiB,
/// clone latency, and QEMU's migrate-to-file and restore beside them.
pub fn snapshots() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sizes = [256u64, 1024, 4096];
    for mib in sizes {
        let (vm, _oc, out) = vm("touch 64", mib)?;
        wait_output(&out, "touched", Duration::from_secs(60))?;
        let path = dir.path().join(format!("{mib}.snap"));
        let info = vm.snapshot(&path, Kind::Full)?;
        vm.stop();
        vm.wait();
        emit(
            &format!("snapshot_create_{mib}mib"),
            info.total_us as f64 / 1e3,
            "ms",
        );
        emit(
            &format!("snapshot_create_pause_{mib}mib"),
            info.pause_us as f64 / 1e3,
            "ms",
        );

        let t0 = Instant::now();
        let chain = vec![Snapshot::open(&path, Verify::Full)?];
        let restored = Vm::restore_with(
            &chain,
            Box::new(std::io::sink()),
            RestoreOptions {
                generation: 1,
                paused: false,
                disk: None,
                same_vm: false,
                nic_backends: Vec::new(),
                net_journal: None,
                disk_journal: None,
                disk_mirror: None,
            },
        )?;
        let restore = t0.elapsed();
        let t1 = Instant::now();
        while restored.launch_to_first_exit_ns() == 0 && t1.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_micros(100));
        }
        let first_exit = restored.launch_to_first_exit_ns() as f64 / 1e6;
        restored.stop();
        restored.wait();
        emit(
            &format!("snapshot_restore_{mib}mib"),
            restore.as_secs_f64() * 1e3,
            "ms",
        );
        emit(
            &format!("snapshot_restore_to_guest_running_{mib}mib"),
            first_exit,
            "ms",
        );

        let mut clones = Vec::new();
        for g in 0..10 {
            let t = Instant::now();
            let chain = vec![Snapshot::open(&path, Verify::Metadata)?];
            let c = Vm::restore_with(
                &chain,
                Box::new(std::io::sink()),
                RestoreOptions {
                    generation: 2 + g,
                    paused: false,
                    disk: None,
                    same_vm: false,
                    nic_backends: Vec::new(),
                    net_journal: None,
                    disk_journal: None,
                    disk_mirror: None,
                },
            )?;
            clones.push(t.elapsed().as_secs_f64() * 1e3);
            c.stop();
            c.wait();
        }
        let (cm, _) = median_p99(clones);
        emit(&format!("clone_{mib}mib_median"), cm, "ms");
        eprintln!(
            "snapshot {mib:>4} MiB (64 MiB touched): create {:.1} ms (paused {:.1} ms), {} data; restore {:.1} ms, guest running at {first_exit:.1} ms; clone {cm:.1} ms",
            info.total_us as f64 / 1e3,
            info.pause_us as f64 / 1e3,
            human(info.bytes),
            restore.as_secs_f64() * 1e3
        );
        let _ = std::fs::remove_file(&path);
    }
    match crate::qemu::snapshot_bench(&sizes, 64) {
        Ok(Some(results)) => {
            for r in results {
                emit(
                    &format!("qemu_snapshot_save_{}mib", r.mem_mib),
                    r.save_ms,
                    "ms",
                );
                emit(
                    &format!("qemu_snapshot_restore_{}mib", r.mem_mib),
                    r.restore_ms,
                    "ms",
                );
                eprintln!(
                    "qemu ({}) {:>4} MiB: migrate-to-file {:.1} ms ({}), restore {:.1} ms (process start alone {:.1} ms)",
                    r.accel,
                    r.mem_mib,
                    r.save_ms,
                    human(r.file_bytes),
                    r.restore_ms,
                    r.startup_ms
                );
            }
        }
        Ok(None) => eprintln!(
            "qemu: qemu-system-x86_64 is not installed; skipped (apt-get install qemu-system-x86)"
        ),
        Err(e) => eprintln!("qemu: comparison failed: {e:#}"),
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Harvest cost of KVM's dirty bitmap versus the dirty ring.
pub fn dirty_log() -> Result<()> {
    for mib in [256u64, 4096] {
        for k in DIRTY_COUNTS {
            let h = crate::dirty_log::measure(mib << 20, k as u32, 15)?;
            emit(
                &format!("dirty_harvest_bitmap_{mib}mib_{k}"),
                h.bitmap_us,
                "us",
            );
            emit(&format!("dirty_harvest_ring_{mib}mib_{k}"), h.ring_us, "us");
            eprintln!(
                "dirty harvest {mib:>4} MiB, K={k:>5}: bitmap {:>7.1} us ({} pages), ring {:>7.1} us ({} pages)",
                h.bitmap_us, h.bitmap_pages, h.ring_us, h.ring_pages
            );
        }
    }
    Ok(())
}
