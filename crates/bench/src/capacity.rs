//! Cloning for capacity, with real VMM processes: the time from the manager's decision to the
//! clone running (`rebound capacity manage`'s own measure, which covers the clone point, the
//! snapshot, and the restore in a VMM started ahead), and jobs per second of one worker VM
//! against the VM plus its clone, taking 200 us jobs from one shared queue.
//!
//! No peer clones for capacity, so there is no peer figure beside these.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::survive::{ShmDir, Vmm, http, rebound_bin, wait_for};
use crate::{emit, median_p99};

const LIMIT: Duration = Duration::from_secs(120);
const JOB_US: u64 = 200;

fn rebound(bin: &Path, share: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env("REBOUND_SHARE_DIR", share);
    c
}

fn guest(bin: &Path, share: &Path, args: &str, sock: Option<&Path>) -> Result<Vmm> {
    let mut c = rebound(bin, share);
    c.args([
        "run",
        "--bundled",
        "testguest",
        "--mem-mib",
        "16",
        "--args",
        args,
    ])
    .args(["--share", "jobs"])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if let Some(s) = sock {
        c.arg("--api-sock").arg(s);
    }
    let vmm = Vmm(c.spawn()?);
    if let Some(s) = sock {
        wait_for("a VM to start", LIMIT, || {
            http(s, "GET", "/capacity", "").is_ok_and(|v| !v["generation"].is_null())
        })?;
    }
    Ok(vmm)
}

/// Runs the feeder to its end; its `capfeed done` line.
fn feed(bin: &Path, share: &Path, args: &str) -> Result<String> {
    let out = rebound(bin, share)
        .args(["run", "--bundled", "testguest", "--mem-mib", "16", "--args"])
        .arg(format!("capfeed jobs {args}"))
        .args(["--share", "jobs"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("capfeed done"))
        .with_context(|| format!("the feeder failed: {text}"))?
        .to_string();
    if !line.contains("missing=0 twice=0") {
        bail!("jobs were lost or done twice: {line}");
    }
    Ok(line)
}

fn field(line: &str, name: &str) -> Result<f64> {
    line.split(&format!("{name}="))
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no {name} in {line:?}"))
}

fn setup(tag: &str) -> Result<(std::path::PathBuf, ShmDir)> {
    let bin = rebound_bin()?;
    let dir = ShmDir::new(tag);
    std::fs::create_dir_all(&dir.0)?;
    let st = rebound(&bin, &dir.0)
        .args(["share", "create", "jobs", "--size-mib", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("cannot create the shared region");
    }
    Ok((bin, dir))
}

fn next_event(rx: &Receiver<serde_json::Value>, name: &str) -> Result<serde_json::Value> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = rx
            .recv_timeout(left)
            .with_context(|| format!("no {name:?} event from the manager"))?;
        if v["event"] == name {
            return Ok(v);
        }
        if v["event"] == "clone_failed" {
            bail!("a clone failed: {v}");
        }
    }
}

/// Decision to clone running, over `rounds` load bursts (each cloned, then retired).
pub fn clone_latency(rounds: usize) -> Result<()> {
    let (bin, dir) = setup("capacity-clone")?;
    let share = dir.0.as_path();
    let wsock = share.join("w.sock");
    let isock = share.join("i.sock");
    let _worker = guest(
        &bin,
        share,
        &format!("capworker jobs {JOB_US}"),
        Some(&wsock),
    )?;
    let _idle = guest(&bin, share, "capidle", Some(&isock))?;
    let mut manager = Vmm(rebound(&bin, share)
        .args([
            "capacity",
            "manage",
            "--interval-ms",
            "20",
            "--busy-ticks",
            "3",
        ])
        .args(["--calm-ticks", "3", "--busy-util", "0.3"])
        .arg("--vm")
        .arg(format!("w={}", wsock.display()))
        .arg("--vm")
        .arg(format!("i={}", isock.display()))
        .args(["--queue", "w=jobs@0", "--clone-dir"])
        .arg(share.join("clones"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?);
    let stdout = manager.0.stdout.take().context("the manager's output")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let v = serde_json::from_str(&line).unwrap_or_default();
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    next_event(&rx, "started")?;
    let (mut total, mut reached, mut snap, mut restore) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        feed(&bin, share, "500 100 100000")?;
        let c = next_event(&rx, "cloned")?;
        next_event(&rx, "retired")?;
        let us = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        total.push(us(&c["decision_to_running_us"]));
        reached.push(us(&c["timing"]["reached_us"]));
        snap.push(us(&c["timing"]["snapshot_us"]));
        restore.push(us(&c["timing"]["restore_us"]));
    }
    // The manager retires its clones, stops the VMM it keeps ahead and removes its cgroups on
    // SIGTERM (a SIGKILL would leave them behind).
    // SAFETY: signals our own child, not yet reaped.
    unsafe { libc::kill(manager.0.id() as i32, libc::SIGTERM) };
    next_event(&rx, "stopped")?;
    let _ = manager.0.wait();
    let (m, p) = median_p99(total);
    let (rm, _) = median_p99(reached);
    let (sm, _) = median_p99(snap);
    let (lm, _) = median_p99(restore);
    emit("capacity_decision_to_clone_running_median", m, "us");
    emit("capacity_decision_to_clone_running_p99", p, "us");
    emit("capacity_clone_point_reached_median", rm, "us");
    emit("capacity_clone_snapshot_median", sm, "us");
    emit("capacity_clone_restore_median", lm, "us");
    eprintln!(
        "capacity: decision to clone running, {rounds} clones of a 16 MiB worker: median {:.2} ms, p99 {:.2} ms (goal < 5 ms); clone point reached {:.2} ms, snapshot written {:.2} ms (from the request), restored in a warm VMM {:.2} ms",
        m / 1e3,
        p / 1e3,
        rm / 1e3,
        sm / 1e3,
        lm / 1e3
    );
    Ok(())
}

/// Jobs per second of one worker VM, then of the VM plus a clone (a spare core).
pub fn throughput(jobs: u64) -> Result<()> {
    let (bin, dir) = setup("capacity-jobs")?;
    let share = dir.0.as_path();
    let wsock = share.join("w.sock");
    let _worker = guest(
        &bin,
        share,
        &format!("capworker jobs {JOB_US}"),
        Some(&wsock),
    )?;
    let alone = feed(&bin, share, &jobs.to_string())?;
    let alone = jobs as f64 / (field(&alone, "elapsed_us")? / 1e6);

    let snap = share.join("clone.snap");
    let r = http(
        &wsock,
        "PUT",
        "/capacity/clone",
        &serde_json::json!({ "snapshot_path": snap }).to_string(),
    )?;
    if r["total_us"].is_null() {
        bail!("clone refused: {r}");
    }
    let csock = share.join("c.sock");
    let _clone = Vmm(rebound(&bin, share)
        .arg("--api-sock")
        .arg(&csock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?);
    wait_for("the clone's VMM", LIMIT, || {
        http(&csock, "GET", "/", "").is_ok()
    })?;
    http(
        &csock,
        "PUT",
        "/snapshot/load",
        &serde_json::json!({ "snapshot_path": snap, "resume_vm": true }).to_string(),
    )?;
    let both = feed(&bin, share, &jobs.to_string())?;
    let slots = both
        .split("slots=")
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .count();
    if slots != 2 {
        bail!("expected the VM and its clone to take jobs: {both}");
    }
    let both = jobs as f64 / (field(&both, "elapsed_us")? / 1e6);
    emit("capacity_jobs_per_s_vm", alone, "jobs/s");
    emit("capacity_jobs_per_s_vm_and_clone", both, "jobs/s");
    emit("capacity_jobs_speedup", both / alone, "x");
    eprintln!(
        "capacity: {jobs} jobs of {JOB_US} us from one shared queue: one VM {alone:.0} jobs/s, VM + clone {both:.0} jobs/s ({:.2}x)",
        both / alone
    );
    Ok(())
}
