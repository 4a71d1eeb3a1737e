//! Sharing between VMs: message latency and rate between two VMs (each in its own VMM
//! process) with wake-ups only for idle receivers vs. a doorbell on every message, wake-ups per
//! message, beside the same exchanges over a host Unix socket (the transport a virtio-vsock
//! device ends in on the host); and the uncontended cost of a cross-VM lock in the guest.
//!
//! Runs the `rebound` binary built next to this one (`cargo build --release -p rebound`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::survive::{ShmDir, rebound_bin};
use crate::{emit, median_p99};

/// Bytes of one message: what a queue cell carries (`rebound_guest::share::MESSAGE_MAX`).
const MESSAGE: usize = 48;
/// Runs of the one-way stream per mode (the median rate is reported).
const STREAM_RUNS: u64 = 3;

/// A share directory of its own (removed however the benchmark ends) holding region `bench`.
fn share_dir_with_region(bin: &Path) -> Result<ShmDir> {
    let dir = ShmDir::new("share");
    let out = Command::new(bin)
        .env("REBOUND_SHARE_DIR", &dir.0)
        .args(["share", "create", "bench", "--size-mib", "4"])
        .output()?;
    if !out.status.success() {
        bail!(
            "cannot create the region: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dir)
}

/// A VMM process running the test guest, its stdout lines on a channel; killed on drop.
struct Guest {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Guest {
    fn start(bin: &Path, dir: &Path, args: &str) -> Result<Self> {
        let mut child = Command::new(bin)
            .env("REBOUND_SHARE_DIR", dir)
            .args(["run", "--bundled", "testguest", "--mem-mib", "16"])
            .args(["--share", "bench", "--args", args])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting rebound")?;
        let out = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Ok(Self { child, lines })
    }

    /// The first line containing `what`.
    fn line(&self, what: &str) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(what) => return Ok(l),
                Ok(l) if l.contains("ERROR") => bail!("guest: {l}"),
                Ok(_) => {}
                Err(_) => bail!("the guest never said {what:?}"),
            }
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=<number>` in a guest's report line.
fn field(line: &str, key: &str) -> Result<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in {line:?}"))
}

/// One mode's figures.
struct Figures {
    rtt_us: f64,
    rtt_wakeups: f64,
    rtt_doorbells: f64,
    rate: f64,
    stream_wakeups: f64,
    stream_doorbells: f64,
}

fn between_vms(bin: &Path, dir: &Path, count: u64, always: bool, poll: bool) -> Result<Figures> {
    let how = format!(
        "{} {}",
        if always { "always" } else { "idle" },
        if poll { "poll" } else { "nopoll" }
    );
    // Round trips: ping sends, pong answers; each waits for the other's message.
    let pong = Guest::start(bin, dir, &format!("pong bench {count} {how}"))?;
    pong.line("pong ready")?;
    let ping = Guest::start(bin, dir, &format!("ping bench {count} {how}"))?;
    let p = ping.line("ping done")?;
    let q = pong.line("pong done")?;
    let messages = 2.0 * count as f64;
    let rtt_us = field(&p, "ns")? / count as f64 / 1e3;
    let rtt_wakeups = (field(&p, "woken")? + field(&q, "woken")?) / messages;
    let rtt_doorbells = (field(&p, "rings")? + field(&q, "rings")?) / messages;
    drop((ping, pong));

    // One way: a source streams to a sink that dispatches as messages come, timed by the
    // sink from the first message to the last. Scheduling on a small host moves this a lot:
    // the median of a few runs of ten times as many messages.
    let polling = if poll { "poll" } else { "nopoll" };
    let n = count * 10;
    let (mut rates, mut wakeups, mut doorbells) = (Vec::new(), 0.0, 0.0);
    for _ in 0..STREAM_RUNS {
        let sink = Guest::start(bin, dir, &format!("sink bench {n} exact {polling}"))?;
        sink.line("sink ready")?;
        let source = Guest::start(bin, dir, &format!("source bench {n} {how}"))?;
        let s = source.line("source done")?;
        let k = sink.line("sink done")?;
        rates.push(n as f64 / (field(&k, "ns")? / 1e9));
        wakeups += field(&k, "woken")?;
        doorbells += field(&s, "rings")?;
    }
    let runs = (STREAM_RUNS * n) as f64;
    Ok(Figures {
        rtt_us,
        rtt_wakeups,
        rtt_doorbells,
        rate: median_p99(rates).0,
        stream_wakeups: wakeups / runs,
        stream_doorbells: doorbells / runs,
    })
}

/// The same exchanges between two host processes' worth of endpoints over a Unix socket
/// (the host side of a virtio-vsock connection, without the guest notifications around it).
/// Returns round trip (us) and one-way rate (messages/s).
fn unix_socket(count: u64, stream: u64) -> Result<(f64, f64)> {
    let (mut a, mut b) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut m = [0u8; MESSAGE];
        for _ in 0..count {
            b.read_exact(&mut m)?;
            b.write_all(&m)?;
        }
        // Then the stream: read everything.
        for _ in 0..stream {
            b.read_exact(&mut m)?;
        }
        b.write_all(&[1])?;
        Ok(())
    });
    let mut m = [7u8; MESSAGE];
    let t0 = Instant::now();
    for i in 0..count {
        m[..8].copy_from_slice(&i.to_le_bytes());
        a.write_all(&m)?;
        a.read_exact(&mut m)?;
    }
    let rtt_us = t0.elapsed().as_secs_f64() * 1e6 / count as f64;
    let t0 = Instant::now();
    for i in 0..stream {
        m[..8].copy_from_slice(&i.to_le_bytes());
        a.write_all(&m)?;
    }
    let mut done = [0u8];
    a.read_exact(&mut done)?;
    let rate = stream as f64 / t0.elapsed().as_secs_f64();
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    Ok((rtt_us, rate))
}

/// Message latency, rate and wake-ups between two VMs, both modes, beside a Unix socket.
pub fn messaging(count: u64) -> Result<()> {
    let bin = rebound_bin()?;
    let dir = share_dir_with_region(&bin)?;
    let idle = between_vms(&bin, &dir.0, count, false, true)?;
    let always = between_vms(&bin, &dir.0, count, true, true)?;
    let idle_nopoll = between_vms(&bin, &dir.0, count, false, false)?;
    let always_nopoll = between_vms(&bin, &dir.0, count, true, false)?;
    let (sock_rtt, sock_rate) = unix_socket(count, count * 10)?;
    let modes = [
        ("idle_only", "wake only idle (default)", &idle),
        ("always_wake", "wake on every message", &always),
        (
            "idle_only_nopoll",
            "wake only idle, no polling",
            &idle_nopoll,
        ),
        (
            "always_wake_nopoll",
            "every message, no polling",
            &always_nopoll,
        ),
    ];
    for (tag, _, f) in modes {
        emit(&format!("share_rtt_{tag}"), f.rtt_us, "us");
        emit(&format!("share_one_way_{tag}"), f.rtt_us / 2.0, "us");
        emit(
            &format!("share_rtt_wakeups_per_msg_{tag}"),
            f.rtt_wakeups,
            "wakeups",
        );
        emit(
            &format!("share_rtt_doorbells_per_msg_{tag}"),
            f.rtt_doorbells,
            "doorbells",
        );
        emit(&format!("share_stream_rate_{tag}"), f.rate, "msg/s");
        emit(
            &format!("share_stream_wakeups_per_msg_{tag}"),
            f.stream_wakeups,
            "wakeups",
        );
        emit(
            &format!("share_stream_doorbells_per_msg_{tag}"),
            f.stream_doorbells,
            "doorbells",
        );
    }
    emit("unix_socket_rtt", sock_rtt, "us");
    emit("unix_socket_one_way", sock_rtt / 2.0, "us");
    emit("unix_socket_stream_rate", sock_rate, "msg/s");
    eprintln!(
        "messages between two VMs ({MESSAGE}-byte messages; {count} round trips, median of {STREAM_RUNS} streams of {}):",
        count * 10
    );
    eprintln!(
        "  {:<28} {:>8} {:>10} {:>14} {:>14} {:>14} {:>15}",
        "",
        "RTT us",
        "one-way us",
        "wakeups/msg RT",
        "stream msg/s",
        "wakeups/msg st",
        "doorbells/msg st"
    );
    for (_, name, f) in modes {
        eprintln!(
            "  {:<28} {:>8.1} {:>10.1} {:>14.2} {:>14.0} {:>14.3} {:>15.3}",
            name,
            f.rtt_us,
            f.rtt_us / 2.0,
            f.rtt_wakeups,
            f.rate,
            f.stream_wakeups,
            f.stream_doorbells
        );
    }
    eprintln!(
        "  {:<28} {:>8.1} {:>10.1} {:>14} {:>14.0} {:>14} {:>15}",
        "host Unix socket (baseline)",
        sock_rtt,
        sock_rtt / 2.0,
        "-",
        sock_rate,
        "-",
        "-"
    );
    Ok(())
}

/// Exits the VM made in all: the `--metrics` summary line on stderr.
fn exits_of(bin: &Path, dir: &Path, args: &str) -> Result<(u64, String)> {
    let out = Command::new(bin)
        .env("REBOUND_SHARE_DIR", dir)
        .args(["run", "--bundled", "testguest", "--mem-mib", "16"])
        .args(["--share", "bench", "--args", args])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("lockbench failed: {stdout}{stderr}");
    }
    // "rebound: ran 0.01 s (N VM exits, ...)"
    let exits = stderr
        .split("rebound: ran ")
        .nth(1)
        .unwrap_or_default()
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no exit count in {stderr:?}"))?;
    Ok((exits, stdout))
}

/// Uncontended lock then unlock in the guest, and the exits it costs (two runs of different
/// lengths: any exit per operation would show as a difference).
pub fn lock(ops: u64) -> Result<()> {
    let bin = rebound_bin()?;
    let dir = share_dir_with_region(&bin)?;
    let (short_exits, _) = exits_of(&bin, &dir.0, &format!("lockbench bench {}", ops / 10))?;
    let (long_exits, out) = exits_of(&bin, &dir.0, &format!("lockbench bench {ops}"))?;
    // "lockbench N NS"
    let ns = out
        .lines()
        .find_map(|l| l.strip_prefix("lockbench "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<f64>().ok())
        .with_context(|| format!("no lockbench line in {out:?}"))?;
    let per_op = ns / ops as f64;
    let extra_exits = long_exits.saturating_sub(short_exits) as f64 / (ops - ops / 10) as f64;
    emit("share_lock_uncontended", per_op, "ns");
    emit("share_lock_exits_per_op", extra_exits, "exits");
    eprintln!(
        "uncontended cross-VM lock: {per_op:.1} ns per lock+unlock ({ops} ops), {extra_exits} exits per op ({short_exits} vs {long_exits} exits for {} vs {ops} ops)",
        ops / 10
    );
    Ok(())
}
