//! Disk writes bound to their epoch: a guest whose writes land where its clock says (testguest
//! `disk-scatter`) runs protected through rollbacks and `kill -9`s of its VMM; afterwards the
//! disk file holds exactly the writes of the execution its (committed) output tells of: no
//! write of an undone epoch, none lost, none twice. Real files, real processes, real KVM.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{http, output_within, rebound, shm, text, wait_for_socket, wait_until};

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
    let out = Arc::new(Mutex::new(String::new()));
    let stdout = child.stdout.take().unwrap();
    let o = out.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut s = o.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    out
}

fn lines(out: &Mutex<String>) -> usize {
    out.lock().unwrap().lines().count()
}

#[test]
fn rollbacks_never_leave_an_undone_write_on_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = new_disk(tmp.path());
    let sock = tmp.path().join("api.sock");
    let steps = 1500;
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
    while rollbacks < 30 {
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
        rollbacks >= 20,
        "only {rollbacks} rollbacks before the guest ended"
    );
    let output = out.lock().unwrap().clone();
    check_disk(&disk, &expected(&output, steps));
}

fn sigkill(child: &Child) {
    // SAFETY: signals our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
}

#[test]
fn kill_9_and_recovery_never_lose_or_repeat_a_disk_write() {
    let tmp = shm();
    let disk = new_disk(tmp.path());
    let state = tmp.path().join("vm");
    let steps = 1500;
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
        if ended || kills == 25 {
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
    assert!(kills >= 20, "only {kills} kills before the guest ended");
    let output = std::fs::read_to_string(&log).unwrap();
    check_disk(&disk, &expected(&output, steps));
}
