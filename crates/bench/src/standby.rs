//! Replication to a standby (issue 12): cold failover time (the primary `kill -9`ed, to the
//! first guest output of the VM the standby built), and what replicating costs a guest that
//! writes memory steadily. Real `rebound` processes over loopback TCP.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::survive::{ran_seconds, rebound_bin};
use crate::{emit, median_p99};

/// Kills a child for good however the benchmark ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_listening(addr: &str) -> Result<()> {
    let t0 = Instant::now();
    while TcpStream::connect(addr).is_err() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the standby never listened on {addr}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Reads `child`'s stdout until a line starting with `tick `; returns when it came.
fn first_tick(child: &mut Child) -> Result<Instant> {
    let out = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(out).lines() {
        if line?.starts_with("tick ") {
            return Ok(Instant::now());
        }
    }
    bail!("no tick before the output ended")
}

/// Cold failover: `runs` times, a primary ticking every 5 ms replicates to a standby with
/// `--takeover-ms 1000`, is `kill -9`ed once warm, and the time until the VM the standby built
/// prints its first tick is taken (takeover, restore from the standby's directory, first
/// guest output).
pub fn failover(runs: usize) -> Result<()> {
    let bin = rebound_bin()?;
    let mut times = Vec::new();
    for _ in 0..runs {
        let dir = tempfile::tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut standby = Killed(
            Command::new(&bin)
                .args(["standby", "--listen", &addr, "--takeover-ms", "1000"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?,
        );
        wait_listening(&addr)?;
        let mut primary = Killed(
            Command::new(&bin)
                .args(["run", "--bundled", "testguest", "--mem-mib", "64"])
                .args(["--args", "ticks 5 0"])
                .args(["--protect-ms", "20", "--standby", &addr])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?,
        );
        // Warm: a few epochs acknowledged (the first tick is released after one is).
        let out = primary.0.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(out).lines();
        for _ in 0..20 {
            lines.next().context("the primary ended")??;
        }
        let t0 = Instant::now();
        primary.0.kill()?;
        primary.0.wait()?;
        let t1 = first_tick(&mut standby.0)?;
        times.push((t1 - t0).as_secs_f64() * 1e3);
    }
    let (median, p99) = median_p99(times);
    emit("standby_cold_failover_median", median, "ms");
    emit("standby_cold_failover_p99", p99, "ms");
    eprintln!(
        "cold failover (kill -9 of the primary to the standby's first guest output, {runs} runs): median {median:.0} ms, p99 {p99:.0} ms"
    );
    Ok(())
}

/// A guest writing 10% of its 256 MiB per second for 3 s (`rate 100 3`; with `fill`, whole
/// pages of random bytes: `rate 100 3 1`), unprotected,
/// protected locally (double-buffered, 50 epochs/s) and replicated to a standby as well; its
/// work figure and run time. Medians of three.
pub fn cost(fill: bool) -> Result<()> {
    let (args, what) = if fill {
        ("rate 100 3 1", "random pages")
    } else {
        ("rate 100 3", "one byte per page")
    };
    let bin = rebound_bin()?;
    let modes: [(&str, bool, bool); 3] = [
        ("unprotected", false, false),
        ("protected", true, false),
        ("replicated", true, true),
    ];
    let mut work = vec![Vec::new(); modes.len()];
    let mut wire = Vec::new();
    for _ in 0..3 {
        for (i, &(_, protect, replicate)) in modes.iter().enumerate() {
            let dir = tempfile::tempdir()?;
            let addr = format!("127.0.0.1:{}", free_port()?);
            let _standby = if replicate {
                let s = Killed(
                    Command::new(&bin)
                        .args(["standby", "--listen", &addr])
                        .arg("--dir")
                        .arg(dir.path())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()?,
                );
                wait_listening(&addr)?;
                Some(s)
            } else {
                None
            };
            let mut cmd = Command::new(&bin);
            cmd.args(["--log-level", "info"])
                .args(["run", "--bundled", "testguest", "--mem-mib", "256"])
                .args(["--args", args]);
            if protect {
                cmd.args(["--protect-ms", "20", "--strategy", "double_buffered"]);
            }
            if replicate {
                cmd.args(["--standby", &addr]);
            }
            let o = cmd.output()?;
            let text = String::from_utf8_lossy(&o.stdout);
            let err = String::from_utf8_lossy(&o.stderr);
            if !o.status.success() || ran_seconds(&err).is_none() {
                bail!("rate failed: {err}");
            }
            let w: f64 = text
                .split_whitespace()
                .find_map(|w| w.strip_prefix("work="))
                .and_then(|w| w.parse().ok())
                .with_context(|| format!("no work figure in {text:?}"))?;
            work[i].push(w);
            if replicate {
                let num = |key: &str| -> Result<f64> {
                    err.split_whitespace()
                        .find_map(|w| w.strip_prefix(key))
                        .and_then(|v| v.parse().ok())
                        .with_context(|| format!("no {key} in {err}"))
                };
                wire.push((num("epochs=")?, num("page_bytes=")?, num("sent_bytes=")?));
            }
        }
    }
    wire.sort_by(|a, b| a.2.total_cmp(&b.2));
    let (epochs, raw, sent) = wire[wire.len() / 2];
    let tag = if fill { "random" } else { "sparse" };
    emit(
        &format!("standby_page_bytes_per_epoch_{tag}"),
        raw / epochs,
        "bytes",
    );
    emit(
        &format!("standby_sent_bytes_per_epoch_{tag}"),
        sent / epochs,
        "bytes",
    );
    eprintln!(
        "replicated ({what}): {epochs:.0} epochs, {:.0} KiB of pages per epoch, {:.0} KiB sent (LZ4 where it pays: {:.0}%)",
        raw / epochs / 1024.0,
        sent / epochs / 1024.0,
        sent / raw * 100.0
    );
    let mut base = None;
    for ((name, _, _), mut w) in modes.iter().zip(work) {
        w.sort_by(f64::total_cmp);
        let m = w[1];
        let of = *base.get_or_insert(m);
        let tag = if fill { "random" } else { "sparse" };
        emit(
            &format!("standby_cost_work_{tag}_{name}"),
            m / of * 100.0,
            "%",
        );
        eprintln!(
            "guest writing 10%/s of 256 MiB ({what}), {name:12}: {:.0}% of unprotected work",
            m / of * 100.0
        );
    }
    Ok(())
}
