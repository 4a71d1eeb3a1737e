//! Disk writes under output commit (issue 11): the rate at which a guest writes 512-byte
//! sectors one at a time (testguest `disk-scatter`, quiet, each write awaited), unprotected and
//! protected every 20 ms with each capture strategy (writes held until their checkpoint; with
//! a state directory, journaled there first). Real `rebound` processes, a disk file on tmpfs;
//! three interleaved rounds, medians.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::emit;
use crate::survive::{ShmDir, ran_seconds, rebound_bin};

pub fn writes(writes: u64) -> Result<()> {
    let bin = rebound_bin()?;
    let dir = ShmDir::new("disk");
    std::fs::create_dir_all(&dir.0)?;
    let modes: [(&str, &[&str]); 4] = [
        ("unprotected", &[]),
        (
            "double_buffered",
            &["--protect-ms", "20", "--strategy", "double_buffered"],
        ),
        (
            "post_image",
            &["--protect-ms", "20", "--strategy", "post_image"],
        ),
        (
            "pre_image_state_dir",
            &["--protect-ms", "20", "--state", "STATE"],
        ),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for _ in 0..3 {
        for (i, (_, args)) in modes.iter().enumerate() {
            let guest = format!("disk-scatter {writes} 8192 0 1");
            let (_, secs) = run_guest(&bin, &dir.0, &dir.0, &guest, args, Disk::Zeroed(4 << 20))?;
            times[i].push(secs);
        }
    }
    let mut base = None;
    for ((name, _), mut t) in modes.iter().zip(times) {
        t.sort_by(f64::total_cmp);
        let rate = writes as f64 / t[1];
        let of = *base.get_or_insert(rate);
        emit(&format!("disk_writes_{name}"), rate, "writes/s");
        eprintln!(
            "disk {name:20}: {rate:9.0} awaited 512-byte writes/s ({:.0}% of unprotected)",
            rate / of * 100.0
        );
    }
    Ok(())
}

/// The protection arguments of each mode the disk benchmarks compare.
const MODES: [(&str, &[&str]); 6] = [
    ("unprotected", &[]),
    (
        "double_buffered",
        &["--protect-ms", "20", "--strategy", "double_buffered"],
    ),
    (
        "post_image",
        &["--protect-ms", "20", "--strategy", "post_image"],
    ),
    (
        "pre_image",
        &["--protect-ms", "20", "--strategy", "pre_image"],
    ),
    (
        "block_state",
        &["--protect-ms", "20", "--strategy", "block_state"],
    ),
    (
        "pre_image_state_dir",
        &["--protect-ms", "20", "--state", "STATE"],
    ),
];

/// A disk file made afresh for each run.
enum Disk {
    /// Written with zeros (every block allocated).
    Zeroed(usize),
    /// Sparse.
    Sparse(u64),
}

/// Runs the test guest with `guest_args` on a disk file in `disk_dir` (the state directory, if
/// a mode has one, in `state_dir`); returns its stdout and run time.
fn run_guest(
    bin: &Path,
    disk_dir: &Path,
    state_dir: &Path,
    guest_args: &str,
    protect: &[&str],
    disk_file: Disk,
) -> Result<(String, f64)> {
    let disk = disk_dir.join("disk.img");
    let _ = std::fs::remove_file(&disk);
    match disk_file {
        Disk::Zeroed(n) => std::fs::write(&disk, vec![0u8; n])?,
        Disk::Sparse(n) => std::fs::File::create(&disk)?.set_len(n)?,
    }
    let state = state_dir.join("vm");
    let _ = std::fs::remove_dir_all(&state);
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--bundled", "testguest", "--mem-mib", "64"])
        .args(["--args", guest_args])
        .arg("--disk")
        .arg(&disk);
    for a in protect {
        if *a == "STATE" {
            cmd.arg(&state);
        } else {
            cmd.arg(a);
        }
    }
    let out = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{guest_args} failed: {err}");
    }
    let secs = ran_seconds(&err).with_context(|| format!("unexpected output: {err}"))?;
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), secs))
}

fn field(out: &str, key: &str) -> Result<f64> {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in {out:?}"))
}

/// FLUSH latency (a 4 KiB write then a flush, awaited: testguest `disk-fsync`) and the
/// throughput of 1 MiB writes from four tasks (`disk-flood`), unprotected and protected with
/// each strategy. The disk file is on the host's ext4 (real fdatasync); state directories are
/// on tmpfs, as they always are. Medians of three interleaved rounds.
pub fn fsync_and_throughput() -> Result<()> {
    let bin = rebound_bin()?;
    let shm = ShmDir::new("disk-fsync");
    std::fs::create_dir_all(&shm.0)?;
    let disk_dir = tempfile::tempdir()?;
    let mut p50 = vec![Vec::new(); MODES.len()];
    let mut p99 = vec![Vec::new(); MODES.len()];
    let mut mibs = vec![Vec::new(); MODES.len()];
    let flood_mib = 512.0;
    for _ in 0..3 {
        for (i, (_, args)) in MODES.iter().enumerate() {
            let (out, _) = run_guest(
                &bin,
                disk_dir.path(),
                &shm.0,
                "disk-fsync 1000",
                args,
                Disk::Sparse(64 << 20),
            )?;
            p50[i].push(field(&out, "p50_us=")?);
            p99[i].push(field(&out, "p99_us=")?);
            let (out, _) = run_guest(
                &bin,
                disk_dir.path(),
                &shm.0,
                &format!("disk-flood {flood_mib} 4"),
                args,
                Disk::Sparse(64 << 20),
            )?;
            mibs[i].push(flood_mib / (field(&out, "us=")? / 1e6));
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut base = None;
    for (i, (name, _)) in MODES.iter().enumerate() {
        let (a, b, c) = (med(&mut p50[i]), med(&mut p99[i]), med(&mut mibs[i]));
        let of = *base.get_or_insert(c);
        emit(&format!("disk_flush_p50_{name}"), a, "us");
        emit(&format!("disk_flush_p99_{name}"), b, "us");
        emit(&format!("disk_write_mib_s_{name}"), c, "MiB/s");
        eprintln!(
            "disk {name:20}: write+flush p50 {a:6.0} us p99 {b:6.0} us; 1 MiB writes {c:6.0} MiB/s ({:.0}% of unprotected)",
            c / of * 100.0
        );
    }
    Ok(())
}

/// The checkpoint pause, and the time until the epoch's disk writes are on the disk file
/// (applied and fdatasynced after the VM resumed), with 0, 1 and 64 MiB of disk writes held in
/// the epoch. In one process: a real VM with a disk file on ext4, protected with manual
/// checkpoints (double-buffered); the writes enter the VM's held disk as the I/O queue's do
/// (the early checkpoint a held write past 16 MiB asks for is turned off, so the epoch holds
/// all of it). Medians of five.
pub fn held_pause() -> Result<()> {
    use rebound_checkpoint::{Engine, EngineConfig, OutputCommit, StrategyKind};
    use rebound_devices::HeldOutput;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)?.set_len(128 << 20)?;
    let mut config = crate::testguest("ticks 1000", 1, 64);
    config.disk = Some(rebound_vmm::DiskConfig::File {
        path: path.clone(),
        read_only: false,
        mirror: None,
    });
    let oc = OutputCommit::new(Box::new(std::io::sink()));
    let vm = std::sync::Arc::new(rebound_vmm::Vm::launch(&config, oc.writer())?);
    let engine = Engine::start(
        vm.clone(),
        oc,
        EngineConfig {
            interval: None,
            strategy: StrategyKind::DoubleBuffered,
        },
        vec![],
    )?;
    let disk = vm.disk().context("the VM has no disk")?.clone();
    disk.on_pending(None);
    let chunk = vec![0x5au8; 1 << 20];
    for mib in [0u64, 1, 64] {
        let (mut pauses, mut released) = (Vec::new(), Vec::new());
        for round in 0..5u64 {
            for m in 0..mib {
                disk.write_at(&chunk, ((m + round * 7) % 128) << 20)
                    .map_err(|e| anyhow::anyhow!("held write: {e}"))?;
            }
            let held = disk.held_bytes();
            if held != mib << 20 {
                bail!("{held} bytes held, expected {mib} MiB");
            }
            let t = std::time::Instant::now();
            let r = engine.checkpoint()?;
            released.push(t.elapsed().as_secs_f64() * 1e6);
            pauses.push(r.pause_us);
            if disk.held_bytes() != 0 {
                bail!("the checkpoint left writes held");
            }
        }
        let (pause, _) = crate::median_p99(pauses);
        let (rel, _) = crate::median_p99(released);
        emit(
            &format!("checkpoint_pause_with_{mib}mib_disk_writes"),
            pause,
            "us",
        );
        emit(
            &format!("checkpoint_to_disk_with_{mib}mib_disk_writes"),
            rel,
            "us",
        );
        eprintln!(
            "checkpoint with {mib:2} MiB of disk writes held: pause {pause:7.0} us; on the disk (applied, fdatasync) {:8.1} ms after the checkpoint began",
            rel / 1e3
        );
    }
    drop(engine);
    vm.stop();
    vm.wait();
    Ok(())
}

/// A mirrored disk whose primary fails: the latency of the write that meets the failure (it
/// is completed on the mirror) beside a healthy mirrored write; then resyncing a replacement
/// of a 64 MiB disk full of data, beside QEMU's `drive-mirror` of the same file in the same run.
/// The primary is on a 1 MiB tmpfs (it fails with ENOSPC when full; needs root to mount); the
/// mirror and the replacement are on ext4.
pub fn mirror() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small)?;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1024k", "tmpfs"])
        .arg(&small)
        .status()?;
    if !mounted.success() {
        bail!("cannot mount a tmpfs (the mirror benchmark needs root)");
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&small);
    let primary = small.join("disk.img");
    std::fs::File::create(&primary)?.set_len(16 << 20)?;
    let disk =
        rebound_block::Disk::open(&primary, false)?.with_mirror(&dir.path().join("mirror.img"))?;
    disk.resync()?;
    let block = vec![0xa5u8; 4096];
    let (mut healthy, mut failover, mut after) = (Vec::new(), None, Vec::new());
    for b in 0..(16 << 20) / 4096u64 {
        let t = std::time::Instant::now();
        disk.write_at(&block, b * 4096)?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        let failed = disk.status()[0].state != rebound_block::LegState::Healthy;
        match (failed, failover) {
            (false, _) => healthy.push(us),
            (true, None) => failover = Some(us),
            (true, Some(_)) => after.push(us),
        }
        if after.len() == 200 {
            break;
        }
    }
    let failover = failover.context("the primary never failed")?;
    let (healthy, _) = crate::median_p99(healthy);
    let (after, _) = crate::median_p99(after);
    emit("disk_mirror_write_healthy", healthy, "us");
    emit("disk_mirror_failover_write", failover, "us");
    emit("disk_mirror_write_after_failover", after, "us");
    eprintln!(
        "mirror: 4 KiB write on two legs {healthy:.1} us; the write that met the failure {failover:.1} us; then {after:.1} us on the mirror alone"
    );

    // Resync: a 64 MiB disk of data to a fresh replacement.
    let src = dir.path().join("full.img");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..(64u64 << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&src, &data)?;
    drop(data);
    let replacement = dir.path().join("replacement.img");
    let d = rebound_block::Disk::open(&src, false)?;
    let t = std::time::Instant::now();
    d.attach(&replacement)?;
    d.resync()?;
    let ours = t.elapsed().as_secs_f64() * 1e3;
    drop(d);
    emit("disk_resync_64mib", ours, "ms");
    let qemu = crate::qemu::mirror_bench(&src, &dir.path().join("qemu-target.img"))?;
    match qemu {
        Some(q) => {
            emit("qemu_drive_mirror_64mib", q, "ms");
            eprintln!(
                "resync of 64 MiB: Rebound {ours:.0} ms; QEMU drive-mirror (to ready) {q:.0} ms"
            );
        }
        None => eprintln!("resync of 64 MiB: Rebound {ours:.0} ms; QEMU not installed"),
    }
    Ok(())
}
