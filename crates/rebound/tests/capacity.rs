//! Cloning for capacity, with real VMMs, a real shared queue and real cgroups: a saturated
//! worker VM is cloned into a new VMM at its clone point, the clone is lent CPU share by an idle
//! VM and takes jobs from the same queue; every job is done exactly once; when the load stops
//! the clone finishes and is retired and the shares are given back.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::{http, output_within, text, wait_for_socket};

const LIMIT: Duration = Duration::from_secs(120);

fn rebound(share_dir: &Path) -> Command {
    let mut c = common::rebound();
    c.env("REBOUND_SHARE_DIR", share_dir);
    c
}

fn guest(share_dir: &Path, args: &str, opts: &[&str]) -> Command {
    let mut c = rebound(share_dir);
    c.args([
        "run",
        "--bundled",
        "testguest",
        "--mem-mib",
        "16",
        "--args",
        args,
    ])
    .args(opts);
    c
}

/// A VMM serving its API, its output collected.
struct Vmm {
    child: Option<Child>,
    sock: PathBuf,
}

impl Vmm {
    fn start(share_dir: &Path, sock: PathBuf, args: &str, opts: &[&str]) -> Self {
        let child = guest(share_dir, args, opts)
            .arg("--api-sock")
            .arg(&sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_socket(&sock);
        common::wait_until("the VM to start", LIMIT, || {
            !http(&sock, "GET", "/capacity", "").1["generation"].is_null()
        });
        Self {
            child: Some(child),
            sock,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Asks the guest to shut down; its exit status and stdout.
    fn shut_down(mut self) -> (i32, String) {
        let (status, _) = http(
            &self.sock,
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#,
        );
        assert_eq!(status, 204);
        let out = output_within(self.child.take().unwrap(), "a VM asked to shut down", LIMIT);
        (
            out.status.code().unwrap_or(-1),
            text(&out.stdout) + &text(&out.stderr),
        )
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The manager's events, one JSON object per line, as they come.
struct Events {
    rx: Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl Events {
    fn of(child: &mut Child) -> Self {
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(serde_json::json!({ "raw": line }));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for the next event named `name`.
    fn wait(&mut self, name: &str) -> serde_json::Value {
        let deadline = Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if v["event"] == name {
                        return v;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {name:?} event within {LIMIT:?}; saw {:#?}", self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "the manager ended before a {name:?} event; saw {:#?}",
                        self.seen
                    )
                }
            }
        }
    }
}

fn cpu_cgroup_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in mounts.lines() {
        let (left, right) = line.split_once(" - ").unwrap();
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap();
        let options = r.nth(1).unwrap_or("");
        if fstype == "cgroup" && options.split(',').any(|o| o == "cpu") {
            return PathBuf::from(left.split_whitespace().nth(4).unwrap());
        }
    }
    let root = PathBuf::from("/sys/fs/cgroup");
    assert!(
        std::fs::read_to_string(root.join("cgroup.controllers"))
            .unwrap_or_default()
            .contains("cpu"),
        "this host has no cgroup CPU controller"
    );
    root
}

/// A group's share in v1 units.
fn shares(dir: &Path) -> u64 {
    if let Ok(s) = std::fs::read_to_string(dir.join("cpu.shares")) {
        return s.trim().parse().unwrap();
    }
    let w: u64 = std::fs::read_to_string(dir.join("cpu.weight"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    2 + ((w - 1) * 262_142).div_ceil(9999)
}

fn in_group(pid: u32, group: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .contains(group)
}

#[test]
fn a_saturated_worker_is_cloned_and_every_job_is_done_once() {
    let dir = common::shm();
    let share = dir.path();
    let out = rebound(share)
        .args(["share", "create", "jobs", "--size-mib", "4"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    let worker = Vmm::start(
        share,
        dir.path().join("w.sock"),
        "capworker jobs 200",
        &["--share", "jobs"],
    );
    let idle = Vmm::start(share, dir.path().join("i.sock"), "capidle", &[]);
    let group = format!("rebound-capacity-test-{}", std::process::id());
    let clones = dir.path().join("clones");
    let mut manager = rebound(share)
        .args([
            "capacity",
            "manage",
            "--interval-ms",
            "50",
            "--busy-ticks",
            "3",
        ])
        .args([
            "--calm-ticks",
            "4",
            "--busy-util",
            "0.3",
            "--cgroup",
            &group,
        ])
        .arg("--vm")
        .arg(format!("w={}", worker.sock.display()))
        .arg("--vm")
        .arg(format!("i={}", idle.sock.display()))
        .args(["--queue", "w=jobs@0", "--clone-dir"])
        .arg(&clones)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut events = Events::of(&mut manager);
    let started = events.wait("started");
    let root = cpu_cgroup_root();
    let gdir = root.join(&group);
    assert_eq!(started["cgroup"], gdir.display().to_string());
    assert_eq!(shares(&gdir.join("w")), 1024);
    assert_eq!(shares(&gdir.join("i")), 1024);
    assert!(in_group(worker.pid(), &group) && in_group(idle.pid(), &group));

    // The feeder keeps the queue full until a second worker (the clone) has done 200 jobs,
    // then waits for every job and checks each was done exactly once.
    let feeder = guest(share, "capfeed jobs 3000 200 200000", &["--share", "jobs"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let cloned = events.wait("cloned");
    assert_eq!(cloned["parent"], "w");
    let clone = cloned["clone"].as_str().unwrap().to_string();
    assert_eq!(cloned["loans"], serde_json::json!([["i", 512]]));
    assert_eq!(cloned["shares"], 512);
    // The clone runs in its own group with the lent share; the lender has less.
    assert_eq!(shares(&gdir.join(&clone)), 512);
    assert_eq!(shares(&gdir.join("i")), 512);
    assert_eq!(shares(&gdir.join("w")), 1024);
    let clone_pid = cloned["pid"].as_u64().unwrap() as u32;
    assert!(in_group(clone_pid, &format!("{group}/{clone}")));

    let out = output_within(feeder, "the feeder", LIMIT);
    let fed = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{fed}\n{}", text(&out.stderr));
    let done = fed
        .lines()
        .find(|l| l.starts_with("capfeed done"))
        .unwrap_or_else(|| panic!("{fed}"));
    assert!(done.contains("missing=0 twice=0"), "{done}");
    // Two workers did jobs: the VM and its clone.
    let slots: Vec<u64> = done
        .split("slots=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(|s| s.split_once(':').unwrap().1.parse().unwrap())
        .collect();
    assert_eq!(slots.len(), 2, "{done}");
    assert!(slots.iter().all(|&c| c >= 1), "{done}");

    // The load stopped: the clone finishes and is retired, and the share goes back.
    let retired = events.wait("retired");
    assert_eq!(retired["clone"], clone.as_str());
    assert_eq!(retired["restored"], serde_json::json!([["i", 1024]]));
    assert_eq!(shares(&gdir.join("i")), 1024);
    assert!(!gdir.join(&clone).exists(), "the clone's group is removed");
    let log = std::fs::read_to_string(clones.join(format!("{clone}.log"))).unwrap();
    let line = log
        .lines()
        .find(|l| l.starts_with("capworker done role=clone"))
        .unwrap_or_else(|| panic!("the clone did not finish cleanly:\n{log}"));
    let count: u64 = line
        .split("count=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        slots.contains(&count),
        "the clone's count {count} is one of {slots:?}"
    );
    assert!(log.contains("guest exited with status 0"), "{log}");

    // Stopping the manager puts the VMMs back where they were and removes its groups.
    // SAFETY: signals our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(manager.id() as i32, libc::SIGTERM) }, 0);
    events.wait("stopped");
    let out = output_within(manager, "the manager", LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!gdir.exists(), "{} is left behind", gdir.display());
    assert!(!in_group(worker.pid(), &group));

    let (code, out) = worker.shut_down();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("capworker done role=parent"), "{out}");
    let (code, out) = idle.shut_down();
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_guest_without_clone_points_is_not_cloned_and_keeps_running() {
    let dir = common::shm();
    let idle = Vmm::start(dir.path(), dir.path().join("i.sock"), "capidle", &[]);
    let snap = dir.path().join("clone.snap");
    let body = format!(
        r#"{{"snapshot_path": "{}", "timeout_ms": 50}}"#,
        snap.display()
    );
    let (status, v) = http(&idle.sock, "PUT", "/capacity/clone", &body);
    assert_eq!(status, 400, "{v}");
    let msg = v["fault_message"].as_str().unwrap();
    assert!(msg.contains("did not reach a clone point"), "{msg}");
    assert!(!snap.exists());
    // Bad requests are refused by name.
    for (body, field) in [
        (
            r#"{"snapshot_path": "/tmp/x", "timeout_ms": 0}"#.to_string(),
            "timeout_ms",
        ),
        (
            format!(r#"{{"snapshot_path": "{}"}}"#, dir.path().display()),
            "snapshot_path",
        ),
        (r#"{"snapshot_path": ""}"#.to_string(), "snapshot_path"),
    ] {
        let (status, v) = http(&idle.sock, "PUT", "/capacity/clone", &body);
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v["fault_message"].as_str().unwrap().contains(field), "{v}");
    }
    let (status, v) = http(&idle.sock, "GET", "/capacity", "");
    assert_eq!(status, 200);
    assert_eq!(v["pid"], idle.pid());
    assert_eq!(v["vcpus"], 1);
    assert_eq!(v["stats"]["failed"], 1);
    assert_eq!(v["clone_points_held"], 0);
    // The VM lost nothing: it still answers its shutdown request.
    let (code, out) = idle.shut_down();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("capidle done"), "{out}");

    // A guest calling CLONE_POINT with nothing asked gets 0 each time and nothing happens.
    let out = output_within(
        guest(dir.path(), "caphostile", &[])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        "caphostile",
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("caphostile ok"));
}
