//! QEMU's snapshot (migrate to a file) and restore latency, to print beside Rebound's own.
//!
//! No guest code runs: this machine's KVM (PVM) cannot boot unmodified guests, so every QEMU is
//! started paused (`-S`) and guest memory is filled by QEMU's generic loader device instead of
//! by the guest. QEMU 7.2 has no `file:` migration URI, so the state goes through `exec:cat`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const QEMU: &str = "qemu-system-x86_64";
/// Guest-physical address of the filled region: 16 MiB, clear of the BIOS and option ROMs.
const FILL_ADDR: u64 = 0x100_0000;
/// Bound on any single wait, so a wedged QEMU fails the benchmark instead of hanging it.
const TIMEOUT: Duration = Duration::from_secs(120);
/// QEMU throttles migration to 32 MiB/s by default; lift that to measure the real cost.
const MAX_BANDWIDTH: u64 = 1 << 40;
/// `-cpu host` alone fails under PVM ("failed to set MSR 0x10a").
const KVM_ARGS: &[&str] = &["-enable-kvm", "-cpu", "host,-arch-capabilities"];
const TCG_ARGS: &[&str] = &["-accel", "tcg"];

/// One guest size's figures; all times are wall-clock milliseconds.
pub struct QemuResult {
    pub mem_mib: u64,
    /// `migrate` sent until `query-migrate` reports "completed".
    pub save_ms: f64,
    /// Process spawn until the incoming migration reports "completed".
    pub restore_ms: f64,
    /// Process spawn until the QMP greeting, without `-incoming`: the part of `restore_ms`
    /// that is only process start.
    pub startup_ms: f64,
    /// Size of the saved migration stream.
    pub file_bytes: u64,
    /// "kvm" or "tcg".
    pub accel: String,
}

/// Measures save and restore for each guest size with `filled_mib` MiB of guest memory filled
/// with pseudo-random bytes (QEMU sends zero pages as flags only, so zeros would cost nothing).
/// None if qemu-system-x86_64 is not installed; Err on failures.
pub fn snapshot_bench(mem_mibs: &[u64], filled_mib: u64) -> Result<Option<Vec<QemuResult>>> {
    match Command::new(QEMU).arg("--version").output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other.with_context(|| format!("running {QEMU} --version"))?,
    };
    let dir = std::env::temp_dir().join(format!("rebound-qemu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scratch = Scratch(dir);
    let blob = scratch.0.join("fill.bin");
    let head = write_blob(&blob, filled_mib)?;
    let loader = format!("loader,file={},addr={FILL_ADDR:#x}", blob.display());
    let mut accel: Option<(&str, &[&str])> = None;
    let mut results = Vec::new();
    for &mem_mib in mem_mibs {
        if FILL_ADDR + (filled_mib << 20) > mem_mib << 20 {
            bail!("{filled_mib} MiB at {FILL_ADDR:#x} does not fit a {mem_mib} MiB guest");
        }
        // Startup without -incoming; the first one also picks the accelerator.
        let (name, args) = match accel {
            Some(a) => a,
            None => match Qemu::start(&scratch.0, KVM_ARGS, mem_mib, &[]) {
                Ok(_) => ("kvm", KVM_ARGS),
                Err(e) => {
                    eprintln!("qemu: KVM unusable ({e:#}), falling back to TCG");
                    ("tcg", TCG_ARGS)
                }
            },
        };
        let t = Instant::now();
        Qemu::start(&scratch.0, args, mem_mib, &[])?;
        let startup_ms = ms_since(t);
        accel = Some((name, args));

        let mut src = Qemu::start(&scratch.0, args, mem_mib, &["-device", &loader])?;
        src.check_fill(head)
            .context("loader did not fill guest memory")?;
        src.cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": MAX_BANDWIDTH}),
        )?;
        let file = scratch.0.join(format!("guest-{mem_mib}.mig"));
        let t = Instant::now();
        let uri = format!("exec:cat > {}", file.display());
        src.cmd("migrate", json!({ "uri": uri }))?;
        src.wait_migrated()?;
        let save_ms = ms_since(t);
        let file_bytes = settled_len(&file)?;
        drop(src);

        let t = Instant::now();
        let incoming = format!("exec:cat {}", file.display());
        let mut dst = Qemu::start(&scratch.0, args, mem_mib, &["-incoming", &incoming])?;
        dst.wait_migrated()?;
        let restore_ms = ms_since(t);
        // The destination has no loader: the fill can only have come from the saved file.
        dst.check_fill(head).context("restored memory differs")?;
        drop(dst);
        std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
        results.push(QemuResult {
            mem_mib,
            save_ms,
            restore_ms,
            startup_ms,
            file_bytes,
            accel: name.into(),
        });
    }
    Ok(Some(results))
}

/// QEMU's `drive-mirror` (sync=full) of the raw disk `disk` to `target`, from the command to
/// the job reporting ready (every block copied), in milliseconds; QEMU paused, as in Rebound's
/// figure the copy is the only work. None if QEMU is not installed.
pub fn mirror_bench(disk: &Path, target: &Path) -> Result<Option<f64>> {
    match Command::new(QEMU).arg("--version").output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other.with_context(|| format!("running {QEMU} --version"))?,
    };
    let dir = disk.parent().context("the disk has no directory")?;
    let drive = format!("file={},format=raw,if=none,id=d0", disk.display());
    let mut q = match Qemu::start(dir, KVM_ARGS, 128, &["-drive", &drive]) {
        Ok(q) => q,
        Err(_) => Qemu::start(dir, TCG_ARGS, 128, &["-drive", &drive])?,
    };
    let t = Instant::now();
    q.cmd(
        "drive-mirror",
        json!({"device": "d0", "target": target, "sync": "full", "format": "raw", "mode": "absolute-paths"}),
    )?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let jobs = q.cmd("query-block-jobs", Value::Null)?;
        let ready = jobs
            .as_array()
            .and_then(|j| j.first())
            .is_some_and(|j| j["ready"].as_bool() == Some(true));
        if ready {
            break;
        }
        if Instant::now() > deadline {
            bail!("drive-mirror never became ready: {jobs}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(Some(ms_since(t)))
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Writes `mib` MiB of xorshift output (incompressible, never a zero page) and returns its
/// first four little-endian words, to check guest memory against.
fn write_blob(path: &Path, mib: u64) -> Result<[u64; 4]> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut bytes = Vec::with_capacity((mib << 20) as usize);
    for _ in 0..(mib << 17) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    let mut head = [0u64; 4];
    for (i, chunk) in bytes.chunks_exact(8).take(4).enumerate() {
        head[i] = u64::from_le_bytes(chunk.try_into()?);
    }
    Ok(head)
}

/// The source's "completed" can precede `cat` closing the file: wait until its size settles.
fn settled_len(path: &Path) -> Result<u64> {
    let deadline = Instant::now() + TIMEOUT;
    let mut last = u64::MAX;
    loop {
        let len = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        if len == last && len > 0 {
            return Ok(len);
        }
        if Instant::now() > deadline {
            bail!("{} never settled", path.display());
        }
        last = len;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes the scratch directory (blob, migration files, sockets) however the benchmark ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A paused QEMU with a QMP connection; killed and reaped on drop so no error path leaks one.
struct Qemu {
    child: Child,
    reader: Option<BufReader<UnixStream>>,
}

impl Qemu {
    /// Spawns QEMU and returns once QMP is greeted and in command mode.
    fn start(dir: &Path, accel: &[&str], mem_mib: u64, extra: &[&str]) -> Result<Qemu> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let sock = dir.join(format!("qmp-{n}.sock"));
        let child = Command::new(QEMU)
            .args(accel)
            .arg("-m")
            .arg(mem_mib.to_string())
            .args(["-nographic", "-nodefaults", "-S", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {QEMU}"))?;
        let mut qemu = Qemu {
            child,
            reader: None,
        };
        if let Err(e) = qemu.connect(&sock) {
            // QMP failing usually means QEMU is exiting: give it a moment, then say why.
            for _ in 0..100 {
                if let Some(why) = qemu.exited()? {
                    bail!("{QEMU} exited with {why}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            return Err(e);
        }
        Ok(qemu)
    }

    /// Connects to QMP, reads the greeting and enters command mode.
    fn connect(&mut self, sock: &Path) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        let stream = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline && self.child.try_wait()?.is_none() => {
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => return Err(e).context("connecting to QMP"),
            }
        };
        stream.set_read_timeout(Some(TIMEOUT))?;
        self.reader = Some(BufReader::new(stream));
        let greeting = self.read_msg()?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting {greeting}");
        }
        self.cmd("qmp_capabilities", Value::Null)?;
        Ok(())
    }

    /// If QEMU has exited, its status and stderr (which says why).
    fn exited(&mut self) -> Result<Option<String>> {
        let Some(status) = self.child.try_wait()? else {
            return Ok(None);
        };
        let mut err = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            pipe.read_to_string(&mut err)?;
        }
        Ok(Some(format!("{status}: {}", err.trim())))
    }

    fn reader(&mut self) -> Result<&mut BufReader<UnixStream>> {
        self.reader.as_mut().context("QMP not connected")
    }

    fn read_msg(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader()?.read_line(&mut line)? == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP message {line:?}"))
    }

    /// Sends a command and returns its "return", skipping asynchronous events.
    fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value> {
        let mut msg = json!({ "execute": execute });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        writeln!(self.reader()?.get_mut(), "{msg}")?;
        loop {
            let reply = self.read_msg()?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                bail!("QMP {execute} failed: {e}");
            }
        }
    }

    /// Polls `query-migrate` every millisecond until the migration (either side) completes.
    fn wait_migrated(&mut self) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let info = self.cmd("query-migrate", Value::Null)?;
            match info["status"].as_str() {
                Some("completed") => return Ok(()),
                Some(s @ ("failed" | "cancelled")) => bail!("migration {s}: {info}"),
                _ if Instant::now() > deadline => bail!("migration timed out: {info}"),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Checks the first four words at FILL_ADDR, read through the human monitor's `xp`.
    fn check_fill(&mut self, expected: [u64; 4]) -> Result<()> {
        let line = format!("xp /4gx {FILL_ADDR:#x}");
        let out = self.cmd("human-monitor-command", json!({ "command-line": line }))?;
        let text = out.as_str().context("xp output is not a string")?;
        let words: Vec<u64> = text
            .lines()
            .flat_map(|l| l.split_whitespace().skip(1))
            .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
            .collect();
        if words != expected {
            bail!("xp read {text:?}, expected {expected:x?}");
        }
        Ok(())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
