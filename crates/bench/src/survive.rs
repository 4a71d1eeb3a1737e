//! Survival: recovery time after `kill -9` of the VMM, live-update downtime, and the cost of
//! running protected. Recovery and live update need real VMM processes: these benchmarks run
//! the `rebound` binary built next to this one (`cargo build --release -p rebound`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{emit, median_p99};

/// MiB the guest touches (its working set), whatever its size.
const WORKING_SET_MIB: u64 = 128;
/// Pages it keeps writing once warm (each epoch's undo journal holds up to this many).
const HOT_PAGES: u64 = 64;

pub(crate) fn rebound_bin() -> Result<PathBuf> {
    // Another build to compare with (e.g. an older commit's).
    if let Some(bin) = std::env::var_os("REBOUND_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("rebound");
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p rebound)",
            bin.display()
        );
    }
    Ok(bin)
}

/// How long the guest ran, from `rebound run`'s report (`rebound: ran 2.73 s (...`).
pub(crate) fn ran_seconds(stderr: &str) -> Option<f64> {
    stderr
        .split("rebound: ran ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A state directory under /dev/shm, removed however the benchmark ends.
pub(crate) struct ShmDir(pub(crate) PathBuf);

impl ShmDir {
    pub(crate) fn new(tag: &str) -> Self {
        let p = PathBuf::from(format!(
            "/dev/shm/rebound-bench-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VMM process, killed on drop.
pub(crate) struct Vmm(pub(crate) Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > limit {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn start_warm(bin: &Path, dir: &Path, mem_mib: u64, sock: Option<&Path>) -> Result<Vmm> {
    let mut cmd = Command::new(bin);
    if let Some(s) = sock {
        cmd.arg("--api-sock").arg(s);
    }
    cmd.args(["run", "--bundled", "testguest", "--mem-mib"])
        .arg(mem_mib.to_string())
        .arg("--args")
        .arg(format!("warm {WORKING_SET_MIB} {HOT_PAGES}"))
        .arg("--state")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let vmm = Vmm(cmd.spawn().context("starting rebound")?);
    let log = dir.join("console.log");
    wait_for("the guest's working set", Duration::from_secs(300), || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("warm ready"))
    })?;
    // A few checkpoints with the guest warm.
    std::thread::sleep(Duration::from_millis(300));
    Ok(vmm)
}

/// Kill to guest running again, for each guest size: `kill -9` of the VMM, a new process
/// `rebound recover`, until it reports the VM resumed.
pub fn recovery(sizes: &[u64], runs: usize) -> Result<()> {
    let bin = rebound_bin()?;
    for &mem_mib in sizes {
        let dir = ShmDir::new(&format!("recover-{mem_mib}"));
        let mut vmm = start_warm(&bin, &dir.0, mem_mib, None)?;
        let (mut total, mut inside, mut undone) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let t0 = Instant::now();
            vmm.0.kill()?;
            vmm.0.wait()?;
            let mut child = Command::new(&bin)
                .args(["recover", "--state"])
                .arg(&dir.0)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            let stderr = child.stderr.take().context("no stderr")?;
            vmm = Vmm(child);
            let mut line = String::new();
            BufReader::new(stderr).read_line(&mut line)?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            // "recovered the VM from checkpoint N in X ms (P pages undone)"
            let words: Vec<&str> = line.split_whitespace().collect();
            let find = |after: &str| {
                words
                    .iter()
                    .position(|w| *w == after)
                    .and_then(|i| words.get(i + 1))
                    .and_then(|w| w.trim_start_matches('(').parse::<f64>().ok())
            };
            let (Some(x), Some(p)) = (find("in"), find("ms")) else {
                bail!("unexpected recovery output: {line:?}");
            };
            total.push(ms);
            inside.push(x);
            undone.push(p);
            // Let it checkpoint again before the next kill.
            std::thread::sleep(Duration::from_millis(200));
        }
        let (m, p99) = median_p99(total);
        let (im, _) = median_p99(inside);
        let (um, _) = median_p99(undone);
        emit(
            &format!("recovery_kill_to_running_{mem_mib}mib_median"),
            m,
            "ms",
        );
        emit(
            &format!("recovery_kill_to_running_{mem_mib}mib_p99"),
            p99,
            "ms",
        );
        emit(
            &format!("recovery_in_process_{mem_mib}mib_median"),
            im,
            "ms",
        );
        eprintln!(
            "recovery, {mem_mib} MiB guest ({WORKING_SET_MIB} MiB touched, {HOT_PAGES} pages hot), {runs} kills: kill to running median {m:.1} ms, p99 {p99:.1} ms; inside the new process {im:.1} ms; {um:.0} pages undone (median)"
        );
    }
    Ok(())
}

pub(crate) fn http(sock: &Path, method: &str, path: &str, body: &str) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(sock)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok(serde_json::from_str(body).unwrap_or_default())
}

/// Live-update downtime (guest paused in the old process to guest running in the new one,
/// measured on CLOCK_MONOTONIC across the exec), for each guest size.
pub fn update(sizes: &[u64], runs: usize) -> Result<()> {
    let bin = rebound_bin()?;
    for &mem_mib in sizes {
        let dir = ShmDir::new(&format!("update-{mem_mib}"));
        let sock = dir.0.with_extension("sock");
        let _vmm = start_warm(&bin, &dir.0, mem_mib, Some(&sock))?;
        let mut downtimes = Vec::new();
        for _ in 0..runs {
            let before = http(&sock, "GET", "/survival", "")?;
            let r = http(&sock, "PUT", "/update", "{}")?;
            if r["status"] != "updating" {
                bail!("update refused: {r}");
            }
            let mut now = serde_json::Value::Null;
            wait_for("the new VMM", Duration::from_secs(60), || {
                now = http(&sock, "GET", "/survival", "").unwrap_or_default();
                now["resumed_from_epoch"] != before["resumed_from_epoch"]
                    && now["update_downtime_us"].is_number()
            })?;
            downtimes.push(now["update_downtime_us"].as_f64().unwrap_or(0.0) / 1e3);
            std::thread::sleep(Duration::from_millis(200));
        }
        let (m, p99) = median_p99(downtimes);
        emit(
            &format!("live_update_downtime_{mem_mib}mib_median"),
            m,
            "ms",
        );
        emit(&format!("live_update_downtime_{mem_mib}mib_p99"), p99, "ms");
        eprintln!(
            "live update, {mem_mib} MiB guest, {runs} updates: guest paused median {m:.2} ms, p99 {p99:.2} ms (no memory copied)"
        );
        let _ = std::fs::remove_file(&sock);
    }
    Ok(())
}

/// QEMU's way to move a VM to a new QEMU without CPR (not in QEMU 7.2): migrate to a file,
/// quit, start the new QEMU with `-incoming` from it. The guest is stopped throughout.
pub fn qemu_update(sizes: &[u64]) -> Result<()> {
    match crate::qemu::snapshot_bench(sizes, WORKING_SET_MIB)? {
        None => eprintln!("qemu: qemu-system-x86_64 is not installed; skipped"),
        Some(results) => {
            for r in results {
                let total = r.save_ms + r.restore_ms;
                emit(
                    &format!("qemu_migrate_file_restore_{}mib", r.mem_mib),
                    total,
                    "ms",
                );
                eprintln!(
                    "qemu ({}), {} MiB guest with {WORKING_SET_MIB} MiB filled: migrate to file {:.0} ms + restore {:.0} ms = {total:.0} ms guest stopped",
                    r.accel, r.mem_mib, r.save_ms, r.restore_ms
                );
            }
        }
    }
    Ok(())
}

/// The demo guest's run time unprotected and protected at 20 checkpoints a second (in a state
/// directory, as crash recovery runs it), interleaved.
pub fn protected_overhead(runs: usize) -> Result<()> {
    let bin = rebound_bin()?;
    let demo = |state: Option<&Path>| -> Result<f64> {
        let mut cmd = Command::new(&bin);
        cmd.args([
            "run",
            "--args",
            "tasks=4 blocks=4096",
            "--scratch-disk-mib",
            "80",
        ]);
        if let Some(d) = state {
            cmd.arg("--state").arg(d).args(["--protect-ms", "50"]);
        }
        let out = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("demo failed: {err}");
        }
        ran_seconds(&err).with_context(|| format!("unexpected output: {err}"))
    };
    let (mut plain, mut protected) = (Vec::new(), Vec::new());
    for i in 0..runs {
        plain.push(demo(None)?);
        let dir = ShmDir::new(&format!("demo-{i}"));
        protected.push(demo(Some(&dir.0))?);
    }
    let (p, _) = median_p99(plain);
    let (q, _) = median_p99(protected);
    emit("demo_unprotected_s", p, "s");
    emit("demo_protected_20eps_s", q, "s");
    emit("demo_protected_20eps_overhead", (q / p - 1.0) * 100.0, "%");
    eprintln!(
        "demo (4 tasks x 4096 blocks), median of {runs}: unprotected {p:.2} s, protected at 20 checkpoints/s in a state directory {q:.2} s ({:+.1}%)",
        (q / p - 1.0) * 100.0
    );
    Ok(())
}
