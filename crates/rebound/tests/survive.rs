//! Survival, with real processes: `kill -9` of the VMM at random moments and at kill points in
//! the commit path, a failing state directory, the supervisor, live update to another binary,
//! and host CPU faults against VMs with each recovery attribute.
//!
//! The guest (`testguest seq N R`) computes a deterministic sequence and prints a numbered line
//! every R steps; the host computes the exact output an uninterrupted run prints. The released
//! output (the state directory's console log) must only ever grow, must always be a prefix of
//! that output (nothing repeated, nothing changed) and, once the guest ends, equal it.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rebound_guests::testguest::seq_output;

fn log_of(dir: &Path) -> String {
    std::fs::read(dir.join("console.log"))
        .map(|b| text(&b))
        .unwrap_or_default()
}

fn records(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
            .count()
    })
}

fn seq_args(n: u64, report: u64) -> String {
    format!("seq {n} {report}")
}

fn run_in(dir: &Path, n: u64, report: u64, extra: &[&str]) -> Command {
    let mut c = rebound();
    c.args(["run", "--bundled", "testguest", "--mem-mib", "32", "--args"])
        .arg(seq_args(n, report))
        .arg("--state")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn recover_in(dir: &Path, extra: &[&str]) -> Command {
    let mut c = rebound();
    c.arg("recover").arg("--state").arg(dir).args(extra);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Checks what the outside world saw: still everything it saw before, and only a prefix of
/// the uninterrupted output.
fn check_released(seen: &mut String, dir: &Path, expected: &str, when: &str) {
    let now = log_of(dir);
    assert!(
        now.starts_with(seen.as_str()),
        "{when}: released output was lost or changed\nbefore:\n{seen}\nnow:\n{now}"
    );
    assert!(
        expected.starts_with(&now),
        "{when}: released output is not a prefix of the uninterrupted output:\n{now}"
    );
    *seen = now;
}

fn finish(child: Child, what: &str) -> String {
    let out = output_within(child, what, Duration::from_secs(120));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{what}: {stderr}");
    stderr
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn kill_9_at_random_moments_loses_and_repeats_nothing() {
    const TRIALS: usize = 100;
    let (n, report) = (300_000_000, 1_000_000);
    let expected = seq_output(n, report);
    let seed = std::process::id() as u64 * 0x9e37_79b9 + 1;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    let t0 = Instant::now();
    let (mut trials, mut vms, mut grew) = (0, 0, 0);
    while trials < TRIALS {
        // One VM, killed again and again until its guest finishes.
        vms += 1;
        let tmp = shm();
        let dir = tmp.path().join("vm");
        let mut child = run_in(&dir, n, report, &["--protect-ms", "10"])
            .spawn()
            .unwrap();
        wait_until("the first checkpoint", Duration::from_secs(10), || {
            records(&dir) > 0
        });
        let mut seen = String::new();
        loop {
            assert!(t0.elapsed() < Duration::from_secs(240), "too slow");
            // Every other kill comes only after this process released new output, so the guest
            // goes on however slowly a loaded host starts each VMM; the rest land anywhere,
            // recovery itself included.
            if trials % 2 == 1 {
                wait_until("released output", Duration::from_secs(30), || {
                    log_of(&dir).len() > seen.len() || child.try_wait().unwrap().is_some()
                });
            }
            std::thread::sleep(Duration::from_millis(2 + rng.below(60)));
            if child.try_wait().unwrap().is_some() {
                break;
            }
            child.kill().unwrap();
            let status = child.wait().unwrap();
            if status.code() == Some(0) {
                break; // it finished just before the kill
            }
            trials += 1;
            let before = seen.len();
            check_released(&mut seen, &dir, &expected, &format!("kill {trials}"));
            grew += usize::from(seen.len() > before);
            child = recover_in(&dir, &["--protect-ms", "10"]).spawn().unwrap();
        }
        let stderr = finish(child, "the last run");
        check_released(&mut seen, &dir, &expected, "the end");
        assert_eq!(log_of(&dir), expected, "{stderr}");
        assert!(t0.elapsed() < Duration::from_secs(240), "too slow");
    }
    eprintln!(
        "{trials} kills over {vms} VMs in {:?}; released output grew between {grew} kills",
        t0.elapsed()
    );
    assert!(
        grew > TRIALS / 4,
        "the guest hardly went on: output grew between only {grew} kills"
    );
}

#[test]
fn kill_points_in_the_commit_path_recover_to_a_committed_checkpoint() {
    let (n, report) = (200_000_000, 2_000_000);
    let expected = seq_output(n, report);
    for fault in [
        "kill:before-record:4",
        "kill:after-record:4",
        "kill:after-journal-reset:4",
        "kill:journal-append:30",
    ] {
        let tmp = shm();
        let dir = tmp.path().join("vm");
        let out = run_in(&dir, n, report, &["--protect-ms", "10"])
            .env("REBOUND_FAULTS", fault)
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{fault}: {}",
            text(&out.stderr)
        );
        let mut seen = String::new();
        check_released(&mut seen, &dir, &expected, fault);
        let child = recover_in(&dir, &[]).spawn().unwrap();
        let stderr = finish(child, fault);
        assert!(
            stderr.contains("recovered the VM from checkpoint"),
            "{stderr}"
        );
        check_released(&mut seen, &dir, &expected, fault);
        assert_eq!(log_of(&dir), expected, "{fault}");
    }
}

#[test]
fn a_failing_state_directory_leaves_the_vm_running_unprotected_and_unrecoverable() {
    let (n, report) = (200_000_000, 2_000_000);
    let expected = seq_output(n, report);
    for errno in ["ENOSPC", "EIO"] {
        let tmp = shm();
        let dir = tmp.path().join("vm");
        let sock = tmp.path().join("api.sock");
        let mut child = run_in(&dir, n, report, &["--protect-ms", "10"])
            .arg("--api-sock")
            .arg(&sock)
            .env("REBOUND_FAULTS", format!("fail-write:{errno}:40"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_socket(&sock);
        let mut lost = String::new();
        wait_until("protection to be given up", Duration::from_secs(20), || {
            let (_, p) = http(&sock, "GET", "/protection", "");
            lost = p["stats"]["lost"].as_str().unwrap_or_default().to_string();
            !lost.is_empty()
        });
        assert!(lost.contains("os error"), "{lost}");
        let (_, info) = http(&sock, "GET", "/", "");
        assert_eq!(info["state"], "Running", "the VM must keep running: {info}");
        let marker = std::fs::read_to_string(dir.join("lost")).unwrap();
        assert!(marker.contains("os error"), "{marker}");
        if errno == "ENOSPC" {
            // A crash now cannot be recovered: recovery says so instead of resuming a torn VM.
            child.kill().unwrap();
            child.wait().unwrap();
            let out = recover_in(&dir, &[]).output().unwrap();
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert!(stderr.contains("cannot be recovered"), "{stderr}");
            assert!(stderr.contains("No space left on device"), "{stderr}");
            let mut seen = String::new();
            check_released(&mut seen, &dir, &expected, errno);
        } else {
            // Unprotected, the guest still finishes, and all its output comes out once.
            let out = output_within(child, errno, Duration::from_secs(120));
            assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
            assert!(
                text(&out.stderr).contains("protection given up"),
                "{}",
                text(&out.stderr)
            );
            assert_eq!(text(&out.stdout), expected);
            // The log may stop where its own write failed; it never shows anything else.
            let mut seen = String::new();
            check_released(&mut seen, &dir, &expected, errno);
        }
    }
}

/// Protection starts before the guest's first instruction: a guest that ends at once neither
/// races the start (CI once saw "the VM has exited; it cannot be frozen") nor loses its output.
#[test]
fn a_protected_guest_that_ends_at_once_ends_cleanly() {
    let expected = seq_output(1, 1);
    for round in 0..8 {
        let tmp = shm();
        let dir = tmp.path().join("vm");
        let (protect, strategy) = [("5", "pre_image"), ("5", "post_image")][round % 2];
        let mut run = if round < 4 {
            run_in(&dir, 1, 1, &[])
        } else {
            let mut c = rebound();
            c.args(["run", "--bundled", "testguest", "--mem-mib", "32"])
                .args(["--args", "seq 1 1", "--strategy", strategy])
                .stderr(Stdio::piped());
            c
        };
        let out = run
            .args(["--protect-ms", protect])
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "round {round}: {stderr}");
        assert_eq!(text(&out.stdout), expected, "round {round}: {stderr}");
        if round < 4 {
            assert_eq!(log_of(&dir), expected, "round {round}: the released log");
        }
    }
}

/// A VMM killed after its VM ended (memory already freed) leaves nothing to resume: recovery
/// says how the VM ended, with its exit code, and the log stays complete.
#[test]
fn recovering_an_ended_vm_reports_its_end() {
    let expected = seq_output(1, 1);
    let tmp = shm();
    let dir = tmp.path().join("vm");
    let out = run_in(&dir, 1, 1, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !dir.join("memory").exists(),
        "an ended VM's memory is freed"
    );
    let out = recover_in(&dir, &[]).output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("had already ended"), "{stderr}");
    assert_eq!(log_of(&dir), expected);
}

#[test]
fn recovery_refuses_what_it_cannot_trust() {
    let (n, report) = (2_000_000_000, 10_000_000);
    let tmp = shm();
    let dir = tmp.path().join("vm");
    let out = recover_in(&dir, &[]).output().unwrap();
    assert!(
        text(&out.stderr).contains("holds no VM"),
        "{}",
        text(&out.stderr)
    );

    let mut child = run_in(&dir, n, report, &[]).spawn().unwrap();
    wait_until("the first checkpoint", Duration::from_secs(10), || {
        records(&dir) > 0
    });
    // The VM's own process still runs it: a second one is refused.
    let out = recover_in(&dir, &[]).output().unwrap();
    let stderr = text(&out.stderr);
    assert!(stderr.contains("another Rebound process"), "{stderr}");
    assert!(stderr.contains(&child.id().to_string()), "{stderr}");
    // And a state directory that holds a VM is not reused.
    let out = run_in(&dir, n, report, &[]).output().unwrap();
    assert!(
        text(&out.stderr).contains("already holds a VM"),
        "{}",
        text(&out.stderr)
    );
    child.kill().unwrap();
    child.wait().unwrap();

    // A damaged newest checkpoint is refused, naming what is wrong; memory is left alone.
    let newest = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("checkpoint-")
        })
        .max()
        .unwrap();
    let memory_before = std::fs::read(dir.join("memory")).unwrap();
    let mut bytes = std::fs::read(&newest).unwrap();
    bytes[200] ^= 0x40;
    std::fs::write(&newest, &bytes).unwrap();
    let out = recover_in(&dir, &[]).output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("checkpoint-"), "{stderr}");
    assert!(
        std::fs::read(dir.join("memory")).unwrap() == memory_before,
        "memory was touched"
    );
}

#[test]
fn the_supervisor_recovers_a_killed_vmm_by_itself() {
    let (n, report) = (400_000_000, 2_000_000);
    let expected = seq_output(n, report);
    let tmp = shm();
    let dir = tmp.path().join("vm");
    let sup = run_in(&dir, n, report, &["--supervise", "--protect-ms", "20"])
        .process_group(0) // the watchdog in output_within kills its VMMs with it
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let owner = || {
        std::fs::read_to_string(dir.join("owner"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    };
    let mut killed = Vec::new();
    for _ in 0..3 {
        let mut pid = 0;
        wait_until("a VMM that owns the VM", Duration::from_secs(10), || {
            pid = owner().unwrap_or(0);
            pid != 0 && !killed.contains(&pid) && records(&dir) > 0
        });
        assert_ne!(
            pid as u32,
            sup.id(),
            "the supervisor must not run the VM itself"
        );
        // Kill once this VMM has run the guest on (released a new line), not after a fixed
        // sleep: the guest must not finish before the third kill however slow the host is.
        let shown = log_of(&dir).len();
        wait_until(
            "the new VMM to release output",
            Duration::from_secs(30),
            || log_of(&dir).len() > shown,
        );
        // SAFETY: signals a process of ours; its pid came from the owner file it wrote.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        killed.push(pid);
    }
    let out = output_within(sup, "the supervisor", Duration::from_secs(120));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("recovering the VM (restart 3)"), "{stderr}");
    assert_eq!(stdout, expected, "what the supervisor showed");
}

#[test]
fn sigterm_to_the_supervisor_stops_its_vmm_too() {
    let tmp = shm();
    let dir = tmp.path().join("vm");
    let sock = tmp.path().join("api.sock");
    let sup = rebound()
        .args(["run", "--bundled", "testguest", "--mem-mib", "16"])
        .args(["--args", "ticks 20 0", "--supervise", "--state"])
        .arg(&dir)
        .arg("--api-sock")
        .arg(&sock)
        .process_group(0) // the watchdog in output_within kills its VMM with it
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Running: the VMM owns the directory, has released output and serves its API.
    let mut vmm = 0;
    wait_until("the VMM to run the VM", Duration::from_secs(30), || {
        vmm = std::fs::read_to_string(dir.join("owner"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .unwrap_or(0);
        vmm != 0 && log_of(&dir).starts_with("tick 0 ")
    });
    wait_for_socket(&sock);
    assert_ne!(vmm as u32, sup.id());
    // SAFETY: signals our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(sup.id() as i32, libc::SIGTERM) }, 0);
    let out = output_within(sup, "the supervisor after SIGTERM", Duration::from_secs(60));
    let stderr = text(&out.stderr);
    // The supervisor reaped its VMM before it ended: no such process, not even a zombie.
    let alive = Path::new(&format!("/proc/{vmm}")).exists();
    if alive {
        // SAFETY: the VMM left running by a supervisor that did not stop it; its pid came
        // from the owner file it wrote.
        unsafe { libc::kill(vmm, libc::SIGKILL) };
    }
    assert!(!alive, "the VMM {vmm} outlived its supervisor: {stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{stderr}");
    assert!(
        !stderr.contains("recovering the VM"),
        "it restarted: {stderr}"
    );
    assert!(!sock.exists(), "the VMM left its API socket");
    // It showed the released output to its end.
    assert_eq!(text(&out.stdout), log_of(&dir));
}

#[test]
fn live_update_hands_the_vm_to_another_binary_without_copying_memory() {
    let (n, report) = (500_000_000, 2_000_000);
    let expected = seq_output(n, report);
    let tmp = shm();
    let dir = tmp.path().join("vm");
    let sock = tmp.path().join("api.sock");
    // "The new version": another executable file.
    let bin_dir = tempfile::tempdir().unwrap();
    let new_bin: PathBuf = bin_dir.path().join("rebound-next");
    std::fs::copy(env!("CARGO_BIN_EXE_rebound"), &new_bin).unwrap();
    let child = run_in(&dir, n, report, &["--protect-ms", "20"])
        .arg("--api-sock")
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_for_socket(&sock);
    wait_until("some output", Duration::from_secs(10), || {
        log_of(&dir).lines().count() > 5
    });
    let inode = std::fs::metadata(dir.join("memory")).unwrap().ino();
    let out = rebound()
        .arg("--api-sock")
        .arg(&sock)
        .args(["update", "--binary"])
        .arg(&new_bin)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let survival: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        survival["update_downtime_us"].as_f64().unwrap() > 0.0,
        "{survival}"
    );
    // The same process (exec), now running the new binary, over the same memory file.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, new_bin);
    assert_eq!(std::fs::metadata(dir.join("memory")).unwrap().ino(), inode);
    let lines_at_update = log_of(&dir).lines().count();
    let out = output_within(child, "the updated VMM", Duration::from_secs(120));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("live update: took the VM over"), "{stderr}");
    assert!(
        lines_at_update < expected.lines().count(),
        "the update came too late to test anything"
    );
    // Progress went on with continuous counters: exactly the uninterrupted output.
    assert_eq!(text(&out.stdout), expected);
}

/// The host CPUs vCPU 0's thread may run on (waiting for the thread: the API socket is up
/// before the VM has started).
fn vcpu_cpus_from_proc(pid: u32) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == "rebound-vcpu0" {
                let status = std::fs::read_to_string(t.path().join("status")).unwrap();
                return status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                    .unwrap()
                    .trim()
                    .to_string();
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no vCPU thread in {pid}");
}

#[test]
fn a_failed_host_cpu_is_handled_per_recovery_attribute_and_spares_other_vms() {
    if rebound_vmm_cpus() < 2 {
        eprintln!("skipped: needs 2 host CPUs");
        return;
    }
    let (n, report) = (400_000_000, 4_000_000);
    let expected = seq_output(n, report);
    // The bystander has a CPU to itself: it needs a longer run to still be there when its
    // neighbours' CPU fails, however slowly a loaded host starts the other three.
    let n_by = 1_200_000_000;
    let expected_by = seq_output(n_by, report);
    let tmp = shm();
    let host = tmp.path().join("host");
    let save_area = tmp.path().join("save-area.snap");
    let start = |name: &str, n: u64, args: &[&str]| -> (Child, PathBuf) {
        let sock = tmp.path().join(format!("{name}.sock"));
        let child = rebound()
            .env("REBOUND_HOST_DIR", &host)
            .arg("--api-sock")
            .arg(&sock)
            .args(["run", "--bundled", "testguest", "--mem-mib", "32", "--args"])
            .arg(seq_args(n, report))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_socket(&sock);
        (child, sock)
    };
    let (bystander, s_by) = start("bystander", n_by, &["--cpus", "0", "--recovery", "resume"]);
    let (resume, s_resume) = start("resume", n, &["--cpus", "1", "--recovery", "resume"]);
    let (restart, s_restart) = start(
        "restart",
        n,
        &[
            "--cpus",
            "1",
            "--recovery",
            "restart_from_checkpoint",
            "--protect-ms",
            "20",
            "--strategy",
            "post_image",
        ],
    );
    let save = save_area.to_str().unwrap();
    let (stop, s_stop) = start(
        "stop",
        n,
        &["--cpus", "1", "--recovery", "stop", "--save-area", save],
    );
    assert_eq!(vcpu_cpus_from_proc(resume.id()), "1");
    assert_eq!(vcpu_cpus_from_proc(bystander.id()), "0");
    std::thread::sleep(Duration::from_millis(300));

    let out = rebound()
        .env("REBOUND_HOST_DIR", &host)
        .args(["fault", "cpu", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let fault_of = |sock: &Path| {
        let mut ev = serde_json::Value::Null;
        wait_until("the fault to be handled", Duration::from_secs(10), || {
            let (_, s) = http(sock, "GET", "/survival", "");
            ev = s["cpu_faults"][0].clone();
            !ev.is_null()
        });
        ev
    };
    assert_eq!(fault_of(&s_resume)["action"], "resume");
    assert_eq!(vcpu_cpus_from_proc(resume.id()), "0");
    assert_eq!(fault_of(&s_restart)["action"], "restart_from_checkpoint");
    assert_eq!(vcpu_cpus_from_proc(restart.id()), "0");
    let (_, p) = http(&s_restart, "GET", "/protection", "");
    assert_eq!(p["stats"]["rollbacks"], 1, "{p}");
    // The VM on the healthy CPU was not touched.
    let (_, s) = http(&s_by, "GET", "/survival", "");
    assert_eq!(s["cpu_faults"], serde_json::json!([]), "{s}");
    assert_eq!(vcpu_cpus_from_proc(bystander.id()), "0");
    let _ = s_stop;

    let stop_out = output_within(stop, "stop", Duration::from_secs(120));
    let stderr = text(&stop_out.stderr);
    assert_eq!(stop_out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("stopped by a host fault"), "{stderr}");
    for (child, what, expected) in [
        (bystander, "bystander", &expected_by),
        (resume, "resume", &expected),
        (restart, "restart", &expected),
    ] {
        let out = output_within(child, what, Duration::from_secs(120));
        assert_eq!(out.status.code(), Some(0), "{what}: {}", text(&out.stderr));
        // Output commit: even the VM sent back to a checkpoint printed each line once.
        assert_eq!(&text(&out.stdout), expected, "{what}");
    }
    // The stopped VM goes on from its save area, on a healthy CPU.
    let restored = rebound()
        .env("REBOUND_HOST_DIR", &host)
        .arg("restore")
        .arg(&save_area)
        .args(["--generation", "0", "--cpus", "0"])
        .output()
        .unwrap();
    assert_eq!(
        restored.status.code(),
        Some(0),
        "{}",
        text(&restored.stderr)
    );
    let whole = text(&stop_out.stdout) + &text(&restored.stdout);
    assert_eq!(whole, expected);
}

fn rebound_vmm_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// State written by an older Rebound loads in this one (docs/survival.md, "Version rules"):
/// a state directory left by Rebound 0.1 (`seq 200000000 2000000` in 8 MiB, killed with
/// SIGKILL mid-run) recovers, and the guest finishes with exactly the uninterrupted output.
#[test]
fn a_state_directory_from_rebound_0_1_recovers() {
    let tmp = shm();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/state-v0.1.tar.gz"
    );
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(fixture)
        .arg("-C")
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(st.success());
    let dir = tmp.path().join("state");
    let expected = seq_output(200_000_000, 2_000_000);
    let mut seen = String::new();
    check_released(&mut seen, &dir, &expected, "the fixture");
    assert!(!seen.is_empty() && seen.len() < expected.len());
    let stderr = finish(
        recover_in(&dir, &[]).spawn().unwrap(),
        "recovery of the 0.1 state",
    );
    assert!(
        stderr.contains("recovered the VM from checkpoint 25"),
        "{stderr}"
    );
    assert_eq!(log_of(&dir), expected);
}

/// `kill -9` of a protected VMM whose guest runs a `cpuid` replaced in a copied page (ABI
/// 1.10): the recovered VM keeps running the copy from the pool, with the same results, and
/// its write watch still drops the copy when the guest rewrites its code.
#[test]
fn a_vm_with_a_replaced_page_is_recovered_after_kill_9() {
    let tmp = shm();
    let dir = tmp.path().join("vm");
    let mut c = rebound();
    c.args(["run", "--bundled", "testguest", "--mem-mib", "32", "--args"])
        .arg("emucpuid 1000 1")
        .arg("--state")
        .arg(&dir)
        .args(["--protect-ms", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    // Released output is checkpointed: the checkpoint holding this line has the copy.
    wait_until(
        "the guest to spin on the copy",
        Duration::from_secs(60),
        || log_of(&dir).contains("flag at"),
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let flag = log_of(&dir)
        .split("flag at 0x")
        .nth(1)
        .and_then(|s| u64::from_str_radix(s.split_whitespace().next()?, 16).ok())
        .expect("flag address");
    let mut recovered = recover_in(&dir, &[]).spawn().unwrap();
    let err = collect_lines(recovered.stderr.take().unwrap());
    // After this line the VM runs: pages written after the checkpoint were put back already.
    wait_until("the VM to be recovered", Duration::from_secs(60), || {
        let e = err.lock().unwrap();
        assert!(!e.contains("error"), "recovery failed: {e}");
        e.contains("recovered the VM")
    });
    // The recovered VMM runs the guest over the state directory's memory file, shared: end
    // the spin by writing the flag there.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &1u64.to_le_bytes(), flag).unwrap();
    let out = output_within(recovered, "the recovered VMM", Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", err.lock().unwrap());
    let log = log_of(&dir);
    assert!(log.contains("spin done, results intact"), "{log}");
    assert!(log.contains("emusmc ok"), "{log}");
    assert_eq!(log.matches("flag at").count(), 1, "output repeated: {log}");
}
