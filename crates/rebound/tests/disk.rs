//! Disk writes bound to their epoch: a guest whose writes land where its clock says (testguest
//! `disk-scatter`) runs protected through rollbacks and `kill -9`s of its VMM; afterwards the
//! disk file holds exactly the writes of the execution its (committed) output tells of: no
//! write of an undone epoch, none lost, none twice. Real files, real processes, real KVM.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    collect_lines, http, output_within, rebound, shm, sigkill, text, wait_for_socket, wait_until,
};

const SLOTS: u64 = 2048;

/// The disk every slot must hold, from the guest's `rec SLOT STEP TIME` lines; also checks
/// that each step was told of once, in order.
fn expected(output: &str, steps: u64) -> BTreeMap<u64, (u64, u64)> {
    let mut want = BTreeMap::new();
    let mut next = 0;
    for line in output.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() != 4 || w[0] != "rec" {
            continue;
        }
        let (slot, step, t): (u64, u64, u64) = (
            w[1].parse().unwrap(),
            w[2].parse().unwrap(),
            w[3].parse().unwrap(),
        );
        assert_eq!(
            step, next,
            "steps are told of once each, in order:\n{output}"
        );
        next += 1;
        want.insert(slot, (step, t));
    }
    assert_eq!(next, steps, "every step was told of:\n{output}");
    assert!(output.contains(&format!("disk-scatter done {steps}")));
    want
}

fn check_disk(disk: &Path, want: &BTreeMap<u64, (u64, u64)>) {
    let bytes = std::fs::read(disk).unwrap();
    for slot in 0..SLOTS {
        let s = &bytes[(slot * 512) as usize..((slot + 1) * 512) as usize];
        match want.get(&slot) {
            None => assert!(
                s.iter().all(|b| *b == 0),
                "slot {slot} holds a write nothing told of: {:?}",
                &s[..24]
            ),
            Some((step, t)) => {
                let mut rec = vec![0u8; 512];
                rec[..8].copy_from_slice(b"SCATTER!");
                rec[8..16].copy_from_slice(&step.to_le_bytes());
                rec[16..24].copy_from_slice(&t.to_le_bytes());
                assert!(
                    s == rec.as_slice(),
                    "slot {slot} should hold step {step} at {t}, holds {:?}",
                    &s[..24]
                );
            }
        }
    }
}

fn new_disk(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    p
}

/// Collects a child's stdout lines as they come.
fn collect(child: &mut Child) -> Arc<Mutex<String>> {
    collect_lines(child.stdout.take().unwrap())
}

fn lines(out: &Mutex<String>) -> usize {
    out.lock().unwrap().lines().count()
}

#[test]
fn rollbacks_never_leave_an_undone_write_on_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = new_disk(tmp.path());
    let sock = tmp.path().join("api.sock");
    let steps = 4000;
    let mut child = rebound()
        .arg("--api-sock")
        .arg(&sock)
        .args(["run", "--bundled", "testguest", "--mem-mib", "32"])
        .args(["--args", &format!("disk-scatter {steps} {SLOTS} 500")])
        .arg("--disk")
        .arg(&disk)
        .args(["--protect-ms", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = collect(&mut child);
    wait_for_socket(&sock);
    let mut rollbacks = 0;
    while rollbacks < 60 {
        let before = lines(&out);
        wait_until("the guest to go on", Duration::from_secs(60), || {
            lines(&out) >= before + 2 || out.lock().unwrap().contains("done")
        });
        if out.lock().unwrap().contains("done") {
            break;
        }
        let (st, v) = http(&sock, "PUT", "/rollback", "");
        if st != 200 {
            // The guest may have just ended.
            assert!(out.lock().unwrap().contains("done"), "rollback: {st} {v}");
            break;
        }
        rollbacks += 1;
    }
    let o = output_within(child, "the scattering guest", Duration::from_secs(120));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        rollbacks >= 50,
        "only {rollbacks} rollbacks before the guest ended"
    );
    let output = out.lock().unwrap().clone();
    check_disk(&disk, &expected(&output, steps));
}

#[test]
fn kill_9_and_recovery_never_lose_or_repeat_a_disk_write() {
    let tmp = shm();
    let disk = new_disk(tmp.path());
    let state = tmp.path().join("vm");
    let steps = 4000;
    let log = state.join("console.log");
    let log_lines = || {
        std::fs::read_to_string(&log)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let mut child = rebound()
        .args(["run", "--bundled", "testguest", "--mem-mib", "32"])
        .args(["--args", &format!("disk-scatter {steps} {SLOTS} 500")])
        .arg("--disk")
        .arg(&disk)
        .arg("--state")
        .arg(&state)
        .args(["--protect-ms", "10"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut kills = 0;
    loop {
        let before = log_lines();
        let mut ended = false;
        wait_until("the guest to go on", Duration::from_secs(60), || {
            ended = matches!(child.try_wait(), Ok(Some(_)));
            ended || log_lines() >= before + 3
        });
        if ended || kills == 60 {
            break;
        }
        sigkill(&child);
        let _ = child.wait();
        kills += 1;
        child = rebound()
            .arg("recover")
            .arg("--state")
            .arg(&state)
            .arg("--disk")
            .arg(&disk)
            .args(["--protect-ms", "10"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    }
    let o = output_within(child, "the scattering guest", Duration::from_secs(120));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(kills >= 50, "only {kills} kills before the guest ended");
    let output = std::fs::read_to_string(&log).unwrap();
    check_disk(&disk, &expected(&output, steps));
}

/// Runs `disk-scatter` with `disk_args`, snapshots it (full, then a diff) while it writes,
/// and lets it finish; returns the snapshot paths.
fn scatter_and_snapshot(
    dir: &Path,
    name: &str,
    disk_args: &[&std::ffi::OsStr],
    with_disk: bool,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let (full, diff) = (
        dir.join(format!("{name}-full")),
        dir.join(format!("{name}-diff")),
    );
    let mut child = rebound()
        .arg("--api-sock")
        .arg(&sock)
        .args(["run", "--bundled", "testguest", "--mem-mib", "32"])
        .args(["--args", "disk-scatter 2500 256 300"])
        .args(disk_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = collect(&mut child);
    wait_for_socket(&sock);
    for (path, kind, after) in [(&full, "Full", 300), (&diff, "Diff", 600)] {
        wait_until("the guest to write", Duration::from_secs(60), || {
            lines(&out) >= after
        });
        let body = serde_json::json!({
            "snapshot_path": path,
            "snapshot_type": kind,
            "include_disk": with_disk,
        });
        let (st, v) = http(&sock, "PUT", "/snapshot/create", &body.to_string());
        assert_eq!(st, 204, "snapshot: {v}");
    }
    let o = output_within(child, "the scattering guest", Duration::from_secs(120));
    let output = out.lock().unwrap().clone();
    assert_eq!(o.status.code(), Some(0), "{output}{}", text(&o.stderr));
    assert!(output.contains("disk-scatter verified 256"), "{output}");
    (full, diff)
}

fn image_kind(snapshot: &Path) -> rebound_snapshot::Kind {
    let p = rebound_block::image::path_of(snapshot);
    rebound_snapshot::Snapshot::open(&p, rebound_snapshot::format::Verify::Full)
        .unwrap()
        .meta()
        .kind
}

/// Restores `chain` in a new process; the guest finishes and checks its disk against what it
/// remembers writing (its memory came back with the snapshot): they must agree.
fn restore_verified(chain: &[&Path]) {
    let o = output_within(
        rebound()
            .arg("restore")
            .args(chain)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        "the restored guest",
        Duration::from_secs(120),
    );
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", text(&o.stderr));
    assert!(out.contains("disk-scatter verified 256"), "{out}");
}

#[test]
fn snapshots_carry_scratch_disks_with_diffs_of_written_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, diff) = scatter_and_snapshot(
        tmp.path(),
        "scratch",
        &["--scratch-disk-mib".as_ref(), "1".as_ref()],
        false,
    );
    assert_eq!(image_kind(&full), rebound_snapshot::Kind::Full);
    assert_eq!(image_kind(&diff), rebound_snapshot::Kind::Diff);
    restore_verified(&[&full]);
    restore_verified(&[&full, &diff]);
    // A merged chain carries the merged disk.
    let merged = tmp.path().join("merged");
    let o = rebound()
        .args(["snapshot", "merge", "--out"])
        .arg(&merged)
        .arg(&full)
        .arg(&diff)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    restore_verified(&[&merged]);
    // A disk image that is not the snapshot's own is refused, as is a damaged one.
    std::fs::copy(
        rebound_block::image::path_of(&full),
        rebound_block::image::path_of(&merged),
    )
    .unwrap();
    let o = rebound().arg("restore").arg(&merged).output().unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("belongs to snapshot"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn file_disks_are_saved_on_request_and_clones_never_write_the_parents_file() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = new_disk(tmp.path());
    let (full, diff) = scatter_and_snapshot(
        tmp.path(),
        "file",
        &["--disk".as_ref(), disk.as_os_str()],
        true,
    );
    let parent = std::fs::read(&disk).unwrap();
    // Two clones of the same chain, one after the other: each sees the disk as it was at the
    // snapshot, writes on, and finds its own writes; the parent's file never changes.
    restore_verified(&[&full, &diff]);
    restore_verified(&[&full, &diff]);
    assert!(
        std::fs::read(&disk).unwrap() == parent,
        "a clone wrote to the parent's disk"
    );
}

/// A tmpfs of `kib` KiB mounted at `dir` for the test's life: files on it fail with `ENOSPC`
/// once it is full, as a real device that runs out of space does.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &Path, kib: u64) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "mount: {}", text(&o.stderr));
        Self(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn leg_states(sock: &Path) -> Vec<String> {
    let (st, v) = http(sock, "GET", "/drives/rootfs", "");
    if st != 200 {
        // Still starting.
        assert!(v.to_string().contains("starting"), "{st} {v}");
        return Vec::new();
    }
    v["legs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["state"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_failing_disk_is_circumvented_by_its_mirror_and_a_replacement_resyncs() {
    let tmp = tempfile::tempdir().unwrap();
    // The primary is a 1 MiB sparse file on a 128 KiB file system: it fails (ENOSPC) once the
    // guest has written to ~32 of its 4 KiB blocks, early in a burst of writes all over it.
    let fs = SmallFs::mount(&tmp.path().join("small"), 128);
    let primary = fs.0.join("disk.img");
    std::fs::File::create(&primary)
        .unwrap()
        .set_len(SLOTS * 512)
        .unwrap();
    let mirror = tmp.path().join("mirror.img");
    let sock = tmp.path().join("api.sock");
    let steps = 3000;
    let mut child = rebound()
        .arg("--api-sock")
        .arg(&sock)
        .args(["run", "--bundled", "testguest", "--mem-mib", "32"])
        .args(["--args", &format!("disk-scatter {steps} {SLOTS} 300")])
        .arg("--disk")
        .arg(&primary)
        .arg("--disk-mirror")
        .arg(&mirror)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = collect(&mut child);
    wait_for_socket(&sock);
    wait_until("the primary to fail", Duration::from_secs(60), || {
        leg_states(&sock) == ["failed", "healthy"]
    });
    let failed_at = lines(&out);
    assert!(failed_at < steps as usize / 2, "the primary failed late");
    // A replacement takes the failed leg's place, is copied to while the guest writes on, and
    // serves once in sync.
    let replacement = tmp.path().join("replacement.img");
    let body = serde_json::json!({ "drive_id": "rootfs", "mirror_path": replacement });
    let (st, v) = http(&sock, "PATCH", "/drives/rootfs", &body.to_string());
    assert_eq!(st, 204, "{v}");
    wait_until(
        "the replacement to be in sync",
        Duration::from_secs(60),
        || leg_states(&sock) == ["healthy", "healthy"],
    );
    let o = output_within(child, "the scattering guest", Duration::from_secs(120));
    let output = out.lock().unwrap().clone();
    // The guest panics on a failed write and checks every slot at the end.
    assert_eq!(o.status.code(), Some(0), "{output}{}", text(&o.stderr));
    assert!(output.contains(&format!("disk-scatter verified {SLOTS}")));
    assert!(
        text(&o.stderr).contains("marked failed"),
        "{}",
        text(&o.stderr)
    );
    let want = expected(&output, steps);
    check_disk(&mirror, &want);
    check_disk(&replacement, &want);
}

/// Peak resident memory of a child that ended, in KiB (`wait4`'s rusage).
fn wait_peak_rss_kib(child: &Child) -> (i32, i64) {
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, which nothing else reaps; both pointers are valid.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(r, child.id() as i32);
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}

#[test]
fn a_flood_of_disk_writes_holds_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("big.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    // 384 MiB of writes, protected with checkpoints 10 s apart: without bounds the VMM would
    // hold them all until the first one. Reaped by wait4 below.
    #[allow(clippy::zombie_processes)]
    let child = rebound()
        .args(["run", "--bundled", "testguest", "--mem-mib", "32"])
        .args(["--args", "disk-flood 384 4"])
        .arg("--disk")
        .arg(&disk)
        .args(["--protect-ms", "10000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (code, peak_kib) = wait_peak_rss_kib(&child);
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.unwrap(), &mut out).unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("disk-flood done 384 MiB"), "{out}");
    let held_limit_kib = (rebound_devices::held_disk::HARD_LIMIT >> 10) as i64;
    assert!(
        peak_kib < 3 * held_limit_kib,
        "peak RSS {peak_kib} KiB for a held limit of {held_limit_kib} KiB"
    );
}

#[test]
fn a_recovered_vm_gets_its_mirror_back_in_sync() {
    let tmp = shm();
    let disk = new_disk(tmp.path());
    let mirror = tmp.path().join("mirror.img");
    let state = tmp.path().join("vm");
    let sock = tmp.path().join("api.sock");
    let steps = 2000;
    let mut child = rebound()
        .args(["run", "--bundled", "testguest", "--mem-mib", "32"])
        .args(["--args", &format!("disk-scatter {steps} {SLOTS} 500")])
        .arg("--disk")
        .arg(&disk)
        .arg("--disk-mirror")
        .arg(&mirror)
        .arg("--state")
        .arg(&state)
        .args(["--protect-ms", "10"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let log = state.join("console.log");
    wait_until("the guest to write", Duration::from_secs(60), || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.lines().count() > 100)
    });
    sigkill(&child);
    let _ = child.wait();
    let child = rebound()
        .arg("--api-sock")
        .arg(&sock)
        .arg("recover")
        .arg("--state")
        .arg(&state)
        .arg("--disk")
        .arg(&disk)
        .arg("--disk-mirror")
        .arg(&mirror)
        .args(["--protect-ms", "10"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&sock);
    wait_until("the mirror to be in sync", Duration::from_secs(60), || {
        leg_states(&sock) == ["healthy", "healthy"]
    });
    let o = output_within(child, "the recovered guest", Duration::from_secs(120));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let output = std::fs::read_to_string(&log).unwrap();
    let want = expected(&output, steps);
    check_disk(&disk, &want);
    check_disk(&mirror, &want);
}
