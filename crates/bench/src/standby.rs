//! Replication to a standby (issue 12): cold failover time (the primary `kill -9`ed, to the
//! first guest output of the VM the standby built), and what replicating costs a guest that
//! writes memory steadily. Real `rebound` processes over loopback TCP.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
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

/// Collects a child's output lines with the moment each arrived.
fn lines_of(r: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<(Instant, String)>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            l.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((Instant::now(), line));
        }
    });
    lines
}

fn count(lines: &Mutex<Vec<(Instant, String)>>, f: impl Fn(&str) -> bool) -> usize {
    lines
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(_, l)| f(l))
        .count()
}

/// `key=VALUE` of a log line.
fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Resync without pausing the primary: a VM holding 256 MiB of incompressible data ticks every
/// 5 ms (guest clock in each line), replicated to a standby; the standby is `kill -9`ed and a
/// new one started. Reported: how long the new standby took to get in sync, how many pages
/// the copy moved while the VM ran and how many the full epoch ending it carried, and the
/// longest gap between two ticks over the whole run (a pause shows there) against the
/// median.
pub fn resync() -> Result<()> {
    let bin = rebound_bin()?;
    // The standby's copy on tmpfs: what is measured is the primary, not the standby's disk
    // (whose fsyncs a checkpoint waiting for acknowledgements also waits for).
    let tmp = tempfile::tempdir_in("/dev/shm")?;
    let addr = format!("127.0.0.1:{}", free_port()?);
    let standby = |dir: &str| -> Result<Killed> {
        let s = Killed(
            Command::new(&bin)
                .args(["standby", "--listen", &addr])
                .arg("--dir")
                .arg(tmp.path().join(dir))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        wait_listening(&addr)?;
        Ok(s)
    };
    let first = standby("a")?;
    let mut primary = Killed(
        Command::new(&bin)
            .args(["--log-level", "info", "run", "--bundled", "testguest"])
            .args(["--mem-mib", "512", "--args", "ticks 5 0 256"])
            // The strategy of a VM with a state directory (what host agents run): it copies
            // nothing at a checkpoint, so a full copy made inside one would pause the VM.
            .args(["--protect-ms", "20", "--strategy", "pre_image"])
            .args(["--standby", &addr])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let out = lines_of(primary.0.stdout.take().context("no stdout")?);
    let err = lines_of(primary.0.stderr.take().context("no stderr")?);
    let ticks = |out: &Mutex<Vec<(Instant, String)>>| count(out, |l| l.starts_with("tick "));
    let wait = |what: &str, f: &dyn Fn() -> bool| -> Result<()> {
        let t0 = Instant::now();
        while !f() {
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    };
    wait("a second of ticks", &|| ticks(&out) >= 200)?;
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    let t_restart = Instant::now();
    let _second = standby("b")?;
    // Output flows again once the resync started; two seconds of it (an older build that
    // copies inside a checkpoint shows its pause here too).
    let after = ticks(&out);
    wait("two seconds of ticks after", &|| ticks(&out) >= after + 400)?;
    drop(primary);
    let err = err.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let synced = err
        .iter()
        .filter(|(_, l)| l.contains("in sync"))
        .nth(1)
        .map(|(t, _)| *t);
    let last_of = |what: &str, key: &str| -> Option<f64> {
        err.iter()
            .rev()
            .find(|(_, l)| l.contains(what))
            .and_then(|(_, l)| field(l, key))
    };
    let copied = last_of("copying memory while the VM runs", "pages").unwrap_or(0.0);
    let ending = last_of("the copy is complete", "pages").unwrap_or(0.0);
    let times: Vec<f64> = out
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("tick "))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .collect();
    let mut gaps: Vec<f64> = times.windows(2).map(|w| (w[1] - w[0]) / 1e6).collect();
    gaps.sort_by(f64::total_cmp);
    let (median, p99) = median_p99(gaps.clone());
    let longest = gaps.last().copied().unwrap_or(0.0);
    let resync_ms = synced.map_or(0.0, |t| (t - t_restart).as_secs_f64() * 1e3);
    emit("resync_time", resync_ms, "ms");
    emit("resync_copied_pages", copied, "pages");
    emit("resync_final_epoch_pages", ending, "pages");
    emit("resync_tick_gap_max", longest, "ms");
    emit("resync_tick_gap_median", median, "ms");
    eprintln!(
        "resync of a VM holding 256 MiB: in sync {resync_ms:.0} ms after the new standby started; \
         {copied:.0} pages ({:.0} MiB) copied while the VM ran, {ending:.0} in the full epoch ending the copy",
        copied * 4096.0 / (1 << 20) as f64
    );
    eprintln!(
        "ticks every 5 ms across the run: gap median {median:.1} ms, p99 {p99:.1} ms, longest {longest:.1} ms"
    );
    Ok(())
}
