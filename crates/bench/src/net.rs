//! Network figures (issue 10), each run beside its reference in one run:
//! - `redis`: `redis-benchmark` (SET, GET; `-P 1` and `-P 16`) against the kv guest
//!   unprotected, protected (double-buffered; pre-image in a state directory) and Debian's
//!   `redis-server` on the host: requests/s, p50 and p99.
//! - `netstream`: TCP stream throughput each way (guest `net-discard`, `net-chargen`) through
//!   the user-mode backend and a TAP (when root may make namespaces), with exits and wake-ups
//!   per 1,000 frames. One way at a time: a two-way echo at full speed trips a bug in Debian 12's
//!   passt (see docs/network.md).
//! - `failover`: link loss to traffic flowing on the other path (two TAP paths in namespaces).
//! - `netrecovery`: `kill -9` of the VMM to the first reply served again on a live connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rebound_net::lab::{Netns, TwoPaths};

use crate::survive::{ShmDir, rebound_bin};
use crate::{emit, median_p99};

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

pub(crate) fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A VMM (or server) process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `rebound ARGS` and waits for `ready` on its console.
fn start(cmd: &mut Command, ready: &str) -> Result<Proc> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start rebound")?;
    let out = child.stdout.take().context("stdout")?;
    let mut proc = Proc(child);
    let mut lines = BufReader::new(out);
    let mut line = String::new();
    let t0 = Instant::now();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            let _ = proc.0.wait();
            bail!("rebound ended before {ready:?}");
        }
        if line.contains(ready) {
            std::thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = lines.read_to_end(&mut sink);
            });
            return Ok(proc);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("no {ready:?} within 60 s");
        }
    }
}

/// One redis-benchmark run: (op, requests/s, p50 ms, p99 ms) for SET and GET.
fn redis_benchmark(port: u16, n: u64, pipeline: u32) -> Result<Vec<(String, f64, f64, f64)>> {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-n", &n.to_string()])
        .args(["-c", "50", "-t", "set,get", "--csv"])
        .args(["-P", &pipeline.to_string()])
        .output()
        .context("redis-benchmark")?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<String> = line
            .split(',')
            .map(|c| c.trim_matches('"').to_string())
            .collect();
        if f.len() < 8 {
            continue;
        }
        let num = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
        // test, rps, avg, min, p50, p95, p99, max
        rows.push((f[0].clone(), num(1), num(4), num(6)));
    }
    if rows.len() < 2 {
        bail!("unexpected redis-benchmark output: {text}");
    }
    Ok(rows)
}

/// `redis-benchmark` against kv (unprotected and protected) and the host's redis-server.
pub fn redis(n: u64) -> Result<()> {
    if !have("redis-benchmark") || !have("passt") {
        bail!("redis needs redis-benchmark and passt (apt-get install redis-tools passt)");
    }
    let bin = rebound_bin()?;
    let mut targets: Vec<(&str, Vec<String>)> = vec![
        ("kv", vec![]),
        (
            "kv_double_buffered",
            ["--protect-ms", "20", "--strategy", "double_buffered"]
                .map(String::from)
                .to_vec(),
        ),
    ];
    let shm = ShmDir::new("kv");
    targets.push((
        "kv_pre_image",
        vec![
            "--state".into(),
            shm.0.join("vm").display().to_string(),
            "--protect-ms".into(),
            "20".into(),
        ],
    ));
    // Replicated: the same, every checkpoint also stored by a standby (another process over
    // loopback TCP) before its output is released.
    let standby_dir = ShmDir::new("kv-standby");
    let mut standbys = Vec::new();
    for (name, hot) in [("kv_replicated_cold", false), ("kv_replicated_hot", true)] {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new(&bin);
        cmd.args(["standby", "--listen", &addr])
            .arg("--dir")
            .arg(standby_dir.0.join(name))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if hot {
            cmd.arg("--hot");
        }
        standbys.push(Proc(cmd.spawn()?));
        targets.push((
            name,
            [
                "--protect-ms",
                "20",
                "--strategy",
                "double_buffered",
                "--standby",
                &addr,
            ]
            .map(String::from)
            .to_vec(),
        ));
    }
    let mut results: Vec<(String, u32, String, f64, f64, f64)> = Vec::new();
    if have("redis-server") {
        let port = free_port()?;
        let server = Proc(
            Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let t0 = Instant::now();
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("redis-server did not start");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in [1, 16] {
            for (op, rps, p50, p99) in redis_benchmark(port, n, p)? {
                results.push(("redis-server".into(), p, op, rps, p50, p99));
            }
        }
        drop(server);
    } else {
        eprintln!("redis: redis-server is not installed: no host reference");
    }
    for (name, extra) in &targets {
        let port = free_port()?;
        let mut cmd = Command::new(&bin);
        cmd.args(["run", "--bundled", "kv", "--mem-mib", "256"])
            .args(["--publish", &format!("127.0.0.1:{port}:6379")])
            .args(extra);
        let vm = start(&mut cmd, "kv: serving")?;
        for p in [1, 16] {
            for (op, rps, p50, p99) in redis_benchmark(port, n, p)? {
                results.push((name.to_string(), p, op, rps, p50, p99));
            }
        }
        drop(vm);
        // A VM in a state directory keeps its passt for a successor: none will come.
        rebound_net::passt::PasstProcess::at(&shm.0.join("vm"), 0).stop();
    }
    let reference = |p: u32, op: &str| {
        results
            .iter()
            .find(|r| r.0 == "redis-server" && r.1 == p && r.2 == op)
            .map(|r| r.3)
    };
    for (target, p, op, rps, p50, p99) in &results {
        let key = format!("redis_{target}_P{p}_{op}");
        emit(&format!("{key}_rps"), *rps, "requests/s");
        emit(&format!("{key}_p50"), *p50, "ms");
        emit(&format!("{key}_p99"), *p99, "ms");
        let vs = reference(*p, op).map(|r| rps / r);
        if let Some(v) = vs
            && target != "redis-server"
        {
            emit(&format!("{key}_vs_redis_server"), v, "ratio");
        }
        eprintln!(
            "redis -P {p:>2} {op:<4} {target:<20} {rps:>10.0} req/s  p50 {p50:.3} ms  p99 {p99:.3} ms{}",
            vs.map_or(String::new(), |v| format!(
                "  ({:.0}% of redis-server)",
                v * 100.0
            ))
        );
    }
    Ok(())
}

/// Host to guest: writes `total` bytes to a `net-discard` guest, half-closes, and waits for the
/// guest's close (it has read them all); bytes/s.
fn push(mut s: TcpStream, total: usize) -> Result<f64> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let chunk: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = (total - sent).min(chunk.len());
        s.write_all(&chunk[..n])?;
        sent += n;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    Ok(total as f64 / t0.elapsed().as_secs_f64())
}

/// Guest to host: reads what a `net-chargen` guest sends until it closes, checking every byte
/// and that `total` came; bytes/s.
fn pull(mut s: TcpStream, total: usize) -> Result<f64> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let pattern = |i: usize| (i as u8).wrapping_mul(31) ^ (i >> 8) as u8;
    let expect: Vec<u8> = (0..16384).map(pattern).collect();
    let mut buf = vec![0u8; 1 << 16];
    let t0 = Instant::now();
    // Debian 12's passt completes a handshake towards the guest only when the client sends:
    // one byte (which chargen ignores) lets the guest accept.
    s.write_all(b"\n")?;
    let mut got = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            if *b != expect[(got + i) % expect.len()] {
                bail!("byte {} differs", got + i);
            }
        }
        got += n;
    }
    let secs = t0.elapsed().as_secs_f64();
    if got != total {
        bail!("{got} of {total} bytes came");
    }
    Ok(total as f64 / secs)
}

fn metrics(sock: &Path) -> Result<serde_json::Value> {
    let mut s = std::os::unix::net::UnixStream::connect(sock)?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(serde_json::from_str(body)?)
}

/// Exits (all kinds) and wake-ups per 1,000 frames, from the VM's counters.
fn per_frame(m: &serde_json::Value) -> (f64, f64) {
    let nic = &m["nics"][0];
    let frames =
        nic["tx_frames"].as_f64().unwrap_or(0.0) + nic["rx_frames"].as_f64().unwrap_or(0.0);
    let exits: f64 = m["exits"]
        .as_object()
        .map(|o| o.values().filter_map(|v| v.as_f64()).sum())
        .unwrap_or(0.0);
    let wakeups = nic["wakeups"].as_f64().unwrap_or(0.0);
    let k = frames.max(1.0) / 1000.0;
    (exits / k, wakeups / k)
}

/// One direction through one backend: `rebound` started by `vm` with the guest `mode`, the
/// client run by `client`; prints and emits bytes/s and exits and wake-ups per 1,000 frames.
fn one_way(
    name: &str,
    vm: &mut dyn FnMut(&str) -> Result<(Proc, std::path::PathBuf)>,
    client: &mut dyn FnMut(&str) -> Result<f64>,
) -> Result<()> {
    for (dir, mode) in [
        ("host_to_guest", "net-discard"),
        ("guest_to_host", "net-chargen"),
    ] {
        let (proc, sock) = vm(mode)?;
        let bps = client(mode)?;
        let (exits, wakeups) = per_frame(&metrics(&sock)?);
        drop(proc);
        emit(&format!("net_{name}_{dir}_throughput"), bps / 1e6, "MB/s");
        emit(
            &format!("net_{name}_{dir}_exits_per_1000_frames"),
            exits,
            "exits",
        );
        emit(
            &format!("net_{name}_{dir}_wakeups_per_1000_frames"),
            wakeups,
            "wake-ups",
        );
        eprintln!(
            "netstream {name:5} {dir:13}: {:7.1} MB/s; {exits:5.0} exits and {wakeups:5.0} wake-ups per 1000 frames",
            bps / 1e6
        );
    }
    Ok(())
}

/// TCP stream throughput each way through the user-mode backend (and a TAP when root may make
/// namespaces), with exits and wake-ups per 1,000 frames.
pub fn stream(total: usize) -> Result<()> {
    if !have("passt") {
        bail!("netstream needs passt (apt-get install passt)");
    }
    let bin = rebound_bin()?;
    let tmp = ShmDir::new("stream");
    std::fs::create_dir_all(&tmp.0)?;
    let args = |mode: &str, ip: &str| format!("{mode} 9 4 {total} ip={ip}");
    // A port each: the first VM's passt may still hold its port while the second starts.
    let ports = [free_port()?, free_port()?];
    let port_for = |mode: &str| ports[usize::from(mode == "net-chargen")];
    let mut passt_vm = |mode: &str| -> Result<(Proc, std::path::PathBuf)> {
        let port = port_for(mode);
        let sock = tmp.0.join(format!("{mode}.sock"));
        let mut cmd = Command::new(&bin);
        cmd.args(["--api-sock", &sock.display().to_string()])
            .args(["run", "--bundled", "testguest", "--mem-mib", "128"])
            .args(["--args", &args(mode, "10.0.2.15/24 gw=10.0.2.2")])
            .args(["--publish", &format!("127.0.0.1:{port}:9")]);
        Ok((start(&mut cmd, "listening")?, sock))
    };
    let mut passt_client = |mode: &str| -> Result<f64> {
        let s = TcpStream::connect((Ipv4Addr::LOCALHOST, port_for(mode)))?;
        if mode == "net-discard" {
            push(s, total)
        } else {
            pull(s, total)
        }
    };
    one_way("passt", &mut passt_vm, &mut passt_client)?;
    if !rebound_net::lab::available() {
        eprintln!("netstream tap: skipped (needs root for a network namespace)");
        return Ok(());
    }
    let ns = Arc::new(Netns::new("s").map_err(anyhow::Error::msg)?);
    ns.ip(&["tuntap", "add", "tap0", "mode", "tap"])
        .map_err(anyhow::Error::msg)?;
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "tap0"])
        .map_err(anyhow::Error::msg)?;
    ns.ip(&["link", "set", "tap0", "up"])
        .map_err(anyhow::Error::msg)?;
    let mut tap_vm = |mode: &str| -> Result<(Proc, std::path::PathBuf)> {
        let sock = tmp.0.join(format!("tap-{mode}.sock"));
        let mut cmd = ns.command(&bin.display().to_string());
        cmd.args(["--api-sock", &sock.display().to_string()])
            .args(["run", "--bundled", "testguest", "--mem-mib", "128"])
            .args(["--tap", "tap0"])
            .args(["--args", &args(mode, "10.77.0.2/24")]);
        Ok((start(&mut cmd, "listening")?, sock))
    };
    let ns2 = ns.clone();
    let mut tap_client = |mode: &str| -> Result<f64> {
        let discard = mode == "net-discard";
        ns2.on_thread(move || -> Result<f64> {
            let t0 = Instant::now();
            let s = loop {
                match TcpStream::connect((Ipv4Addr::new(10, 77, 0, 2), 9)) {
                    Ok(s) => break s,
                    Err(_) if t0.elapsed() < Duration::from_secs(30) => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            if discard {
                push(s, total)
            } else {
                pull(s, total)
            }
        })
        .join()
        .map_err(|_| anyhow::anyhow!("client thread"))?
    };
    one_way("tap", &mut tap_vm, &mut tap_client)
}

/// Echo round trips on one connection from `peer`, recording when each completed, until
/// stopped.
fn ticking_client(
    peer: &Netns,
    stop: Arc<AtomicBool>,
    last_ns: Arc<AtomicU64>,
    epoch: Instant,
) -> std::thread::JoinHandle<Result<()>> {
    peer.on_thread(move || -> Result<()> {
        let t0 = Instant::now();
        let mut s = loop {
            match TcpStream::connect((Ipv4Addr::new(10, 78, 0, 2), 7)) {
                Ok(s) => break s,
                Err(_) if t0.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut b = [0u8; 8];
        while !stop.load(Ordering::Acquire) {
            s.write_all(&[1; 8])?;
            s.read_exact(&mut b)?;
            last_ns.store(epoch.elapsed().as_nanos() as u64, Ordering::Release);
        }
        Ok(())
    })
}

/// NIC failover: link loss to the first echo on the other path, `trials` times (alternating).
pub fn failover(trials: usize) -> Result<()> {
    if !rebound_net::lab::available() {
        bail!("failover needs root (network namespaces, TAPs)");
    }
    let bin = rebound_bin()?;
    let net = TwoPaths::new().map_err(anyhow::Error::msg)?;
    let tmp = ShmDir::new("failover");
    std::fs::create_dir_all(&tmp.0)?;
    let config = tmp.0.join("vm.json");
    let json = serde_json::json!({
        "boot-source": {"kernel_image_path": "bundled:testguest",
                        "boot_args": "net-echo 7 4 ip=10.78.0.2/24"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "network-interfaces": [TwoPaths::interface()],
    });
    std::fs::write(&config, json.to_string())?;
    let mut cmd = net.vmm.command(&bin.display().to_string());
    cmd.args(["--config-file", &config.display().to_string(), "--no-api"]);
    let vm = start(&mut cmd, "net-echo listening")?;
    let epoch = Instant::now();
    let (stop, last) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let client = ticking_client(&net.peer, stop.clone(), last.clone(), epoch);
    let wait_ticks = |after: u64| -> Result<u64> {
        let t0 = Instant::now();
        loop {
            let l = last.load(Ordering::Acquire);
            if l > after {
                return Ok(l);
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("no echo for 30 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    wait_ticks(0)?;
    let mut times = Vec::new();
    let paths = ["vetha0", "vethb0"];
    for t in 0..trials {
        let (down, up) = (paths[t % 2], paths[(t + 1) % 2]);
        net.vmm
            .ip(&["link", "set", up, "up"])
            .map_err(anyhow::Error::msg)?;
        // Let the other path be seen healthy again before cutting this one.
        std::thread::sleep(Duration::from_millis(200));
        let cut = epoch.elapsed().as_nanos() as u64;
        net.vmm
            .ip(&["link", "set", down, "down"])
            .map_err(anyhow::Error::msg)?;
        let first = wait_ticks(cut)?;
        times.push((first - cut) as f64 / 1e6);
    }
    stop.store(true, Ordering::Release);
    let _ = client.join();
    drop(vm);
    let (m, p) = median_p99(times);
    emit("failover_link_down_median", m, "ms");
    emit("failover_link_down_p99", p, "ms");
    eprintln!(
        "failover ({trials} trials): link down to traffic on the other path median {m:.1} ms, p99 {p:.1} ms"
    );
    Ok(())
}

/// `kill -9` of a protected kv-like echo VM to the first reply served again on a live
/// connection, `trials` times.
pub fn recovery(trials: usize) -> Result<()> {
    if !have("passt") {
        bail!("netrecovery needs passt");
    }
    let bin = rebound_bin()?;
    let shm = ShmDir::new("netrecovery");
    let state = shm.0.join("vm");
    let port = free_port()?;
    let mut cmd = Command::new(&bin);
    cmd.args(["run", "--bundled", "testguest", "--mem-mib", "64"])
        .args(["--args", "net-echo 7 4 ip=10.0.2.15/24 gw=10.0.2.2"])
        .args(["--publish", &format!("127.0.0.1:{port}:7")])
        .args([
            "--state",
            &state.display().to_string(),
            "--protect-ms",
            "20",
        ]);
    let mut vm = start(&mut cmd, "net-echo listening")?;
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut b = [0u8; 8];
    s.write_all(&[0; 8])?;
    s.read_exact(&mut b)?;
    let mut times = Vec::new();
    for _ in 0..trials {
        let t0 = Instant::now();
        // SAFETY: signals our own child.
        unsafe { libc::kill(vm.0.id() as i32, libc::SIGKILL) };
        let _ = vm.0.wait();
        s.write_all(&[2; 8])?;
        vm = Proc(
            Command::new(&bin)
                .args(["recover", "--state", &state.display().to_string()])
                .args(["--protect-ms", "20"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        s.read_exact(&mut b)?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        if std::env::var_os("REBOUND_BENCH_VERBOSE").is_some() {
            eprintln!("  kill {}: {:.1} ms", times.len(), times[times.len() - 1]);
        }
        // A few ordinary round trips before the next kill.
        for _ in 0..5 {
            s.write_all(&[3; 8])?;
            s.read_exact(&mut b)?;
        }
    }
    drop(vm);
    rebound_net::passt::PasstProcess::at(&state, 0).stop();
    let (m, p) = median_p99(times);
    emit("net_kill_to_first_reply_median", m, "ms");
    emit("net_kill_to_first_reply_p99", p, "ms");
    eprintln!(
        "netrecovery ({trials} kills): kill -9 to the first reply served again median {m:.1} ms, p99 {p:.1} ms (a new VMM process recovers the VM; passt keeps the connection)"
    );
    Ok(())
}
