//! Host agents (issue 12): failover time from the dead host's last heartbeat to the VM's first
//! output on its standby host, hot and cold, and heartbeat traffic against the number of VMs.
//! Real `rebound host serve` agents on loopback, real `kill -9` of a host's agent and VMMs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::survive::rebound_bin;
use crate::{emit, median_p99};

const HEARTBEAT_MS: u64 = 20;

/// Kills a child for good however the benchmark ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Host {
    name: &'static str,
    addr: String,
    root: PathBuf,
    agent: Option<Killed>,
    vmms: Vec<Killed>,
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > limit {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn status(bin: &Path, root: &Path) -> Option<Value> {
    let out = Command::new(bin)
        .args(["cluster", "status", "--root"])
        .arg(root)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

impl Host {
    fn start(&mut self, bin: &Path, peer: &Host, locks: &Path) -> Result<()> {
        self.start_with(bin, peer, locks, None, &[])
    }

    fn start_with(
        &mut self,
        bin: &Path,
        peer: &Host,
        locks: &Path,
        etcd: Option<&str>,
        extra: &[&str],
    ) -> Result<()> {
        let mut cmd = Command::new(bin);
        cmd.args(["--log-level", "error", "host", "serve"]);
        if let Some(url) = etcd {
            cmd.args(["--etcd", url]);
        }
        cmd.args(extra);
        let child = cmd
            .args(["--name", self.name])
            .args(["--listen", &self.addr, "--root"])
            .arg(&self.root)
            .args(["--peer", &format!("{}={}", peer.name, peer.addr)])
            .args(["--heartbeat-ms", &HEARTBEAT_MS.to_string(), "--lock-dir"])
            .arg(locks)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.agent = Some(Killed(child));
        wait("an agent", Duration::from_secs(30), || {
            status(bin, &self.root).is_some()
        })
    }

    /// Every process of the host: its agent, the VMMs it started, and the VMs it took over.
    fn kill_all(&mut self, bin: &Path) {
        let mut vmms: Vec<i32> = self.vmms.iter().map(|k| k.0.id() as i32).collect();
        if let Some(s) = status(bin, &self.root)
            && let Some(events) = s["failovers"].as_array()
        {
            vmms.extend(
                events
                    .iter()
                    .filter_map(|e| e["pid"].as_i64())
                    .map(|p| p as i32),
            );
        }
        // Their passt processes too (a host's death takes its network backends with it).
        let passts: Vec<i32> = vmms.iter().flat_map(|&p| children_of(p)).collect();
        for pid in vmms.into_iter().chain(passts) {
            // SAFETY: kill(2) on a VMM this benchmark or its agent started, or its child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.agent = None;
        self.vmms.clear();
    }
}

/// The children of process `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// Sends `INCR` to the kv guest at `addr` until it answers; when it did.
fn first_reply(addr: &str, limit: Duration) -> Result<f64> {
    use std::io::{BufRead, BufReader, Write};
    let t0 = Instant::now();
    let addr: std::net::SocketAddr = addr.parse()?;
    while t0.elapsed() < limit {
        let Ok(conn) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100))
        else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        conn.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut w = conn.try_clone()?;
        if w.write_all(b"*2\r\n$4\r\nINCR\r\n$1\r\nc\r\n").is_err() {
            continue;
        }
        let mut line = String::new();
        if BufReader::new(conn).read_line(&mut line).is_ok() && line.starts_with(':') {
            return Ok(unix_ms());
        }
    }
    bail!("no reply from {addr} within {limit:?}")
}

/// SETs 100-byte values under 10,000 keys at `addr` for `dur`, 64 requests in flight; how many.
fn set_load(addr: &str, dur: Duration) -> Result<u64> {
    use std::io::{BufRead, BufReader, Write};
    const BATCH: u64 = 64;
    let conn = std::net::TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut w = std::io::BufWriter::new(conn.try_clone()?);
    let mut r = BufReader::new(conn);
    let t0 = Instant::now();
    let (mut n, mut line) = (0u64, String::new());
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    while t0.elapsed() < dur {
        for i in 0..BATCH {
            let value: String = (0..100)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from(b'a' + (x % 26) as u8)
                })
                .collect();
            let key = format!("k{}", (n + i) % 10_000);
            write!(
                w,
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$100\r\n{value}\r\n",
                key.len()
            )?;
        }
        w.flush()?;
        for _ in 0..BATCH {
            line.clear();
            r.read_line(&mut line)?;
            if !line.starts_with('+') {
                bail!("SET answered {line:?}");
            }
        }
        n += BATCH;
    }
    Ok(n)
}

/// `runs` host failures under a `kv` guest (hot standby): from the dead host's last heartbeat
/// to the first reply a client gets from the VM on the other host, in ms.
fn kv_failovers(bin: &Path, runs: usize) -> Result<Vec<f64>> {
    let tmp = tempfile::tempdir_in("/dev/shm")?;
    let locks = tmp.path().join("owners");
    let (mut a, mut b) = two_hosts(tmp.path())?;
    a.start(bin, &b, &locks)?;
    b.start(bin, &a, &locks)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    a.vmms.push(Killed(
        Command::new(bin)
            .args(["--id", "kvb", "run", "--bundled", "kv", "--mem-mib", "64"])
            .args(["--args", "port=6379 maxmemory=16"])
            .args(["--publish", &format!("{addr}:6379"), "--protect-ms", "20"])
            .arg("--host-root")
            .arg(&a.root)
            .args(["--standby", "B", "--failover", "hot"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ));
    first_reply(&addr, Duration::from_secs(60))?;
    // What replication sends per epoch while a client writes: 100-byte values under 10,000
    // keys for 2 s, one request at a time.
    let base = standby_epochs(bin, &b.root, "kvb");
    wait("the standby to sync", Duration::from_secs(60), || {
        standby_epochs(bin, &b.root, "kvb") >= base.max(1) + 5
    })?;
    let counters = || -> Result<(f64, f64, f64)> {
        let s = status(bin, &b.root).context("no status")?;
        let k = s["standbys"]
            .as_array()
            .and_then(|v| v.iter().find(|x| x["vm"] == "kvb").cloned())
            .context("no standby")?;
        let f = |n: &str| k[n].as_f64().unwrap_or(0.0);
        Ok((f("all_epochs"), f("bytes"), f("wire_bytes")))
    };
    let (e0, r0, w0) = counters()?;
    let requests = set_load(&addr, Duration::from_secs(2))?;
    let (e1, r1, w1) = counters()?;
    let epochs = (e1 - e0).max(1.0);
    let (raw, wire) = ((r1 - r0) / epochs, (w1 - w0) / epochs);
    emit("cluster_kv_epoch_page_bytes", raw, "bytes");
    emit("cluster_kv_epoch_wire_bytes", wire, "bytes");
    eprintln!(
        "kv guest replicated while a client SETs ({requests} requests in 2 s, {epochs:.0} epochs): {:.1} KiB of pages per epoch, {:.1} KiB on the wire ({:.0}%, LZ4 where it pays)",
        raw / 1024.0,
        wire / 1024.0,
        if raw > 0.0 { wire / raw * 100.0 } else { 0.0 }
    );
    let mut times = Vec::new();
    let (mut primary, mut standby) = (&mut a, &mut b);
    for _ in 0..runs {
        let base = standby_epochs(bin, &standby.root, "kvb");
        wait("the standby to sync", Duration::from_secs(60), || {
            standby_epochs(bin, &standby.root, "kvb") >= base.max(1) + 5
        })?;
        let before = takeovers(&standby.root, "kvb").len();
        primary.kill_all(bin);
        let first = first_reply(&addr, Duration::from_secs(30))?;
        wait("the takeover record", Duration::from_secs(30), || {
            takeovers(&standby.root, "kvb").len() > before
        })?;
        let s = status(bin, &standby.root).context("no status")?;
        let e = s["failovers"]
            .as_array()
            .and_then(|v| v.last())
            .context("no failover recorded")?;
        let last_beat = e["at_ms"].as_f64().unwrap_or(0.0) - e["detect_ms"].as_f64().unwrap_or(0.0);
        times.push(first - last_beat);
        let peer = &*standby;
        primary.start(bin, peer, &locks)?;
        std::mem::swap(&mut primary, &mut standby);
    }
    standby.kill_all(bin);
    primary.kill_all(bin);
    Ok(times)
}

/// A throwaway etcd on loopback.
struct Etcd {
    url: String,
    _dir: tempfile::TempDir,
    _proc: Killed,
}

impl Etcd {
    fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = |_| -> Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (client, peer) = (port(())?, port(())?);
        let url = format!("http://127.0.0.1:{client}");
        let proc = Killed(
            Command::new("etcd")
                .arg("--data-dir")
                .arg(dir.path())
                .args([
                    "--listen-client-urls",
                    &url,
                    "--advertise-client-urls",
                    &url,
                ])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("etcd (apt-get install etcd-server)")?,
        );
        wait("etcd", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", client)).is_ok()
        })?;
        Ok(Self {
            url,
            _dir: dir,
            _proc: proc,
        })
    }
}

fn takeovers(root: &Path, vm: &str) -> Vec<PathBuf> {
    (1..)
        .map(|n| root.join("out").join(format!("{vm}.{n}")))
        .take_while(|p| p.exists())
        .collect()
}

fn standby_epochs(bin: &Path, root: &Path, vm: &str) -> u64 {
    status(bin, root)
        .and_then(|s| {
            s["standbys"]
                .as_array()?
                .iter()
                .find(|x| x["vm"] == vm && x["connected"] == true)
                .and_then(|x| x["epochs"].as_u64())
        })
        .unwrap_or(0)
}

fn two_hosts(tmp: &Path) -> Result<(Host, Host)> {
    let port = |_| -> Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let host = |name, p: u16| Host {
        name,
        addr: format!("127.0.0.1:{p}"),
        root: tmp.join(name),
        agent: None,
        vmms: Vec::new(),
    };
    Ok((host("A", port(())?), host("B", port(())?)))
}

/// `runs` host failures for a VM with `failover` (hot or cold), alternating between two
/// hosts fenced by ownership locks or (`etcd`) etcd leases, their agents started with `extra`:
/// from the dead host's last heartbeat to the VM's first tick on the other, in ms.
fn failovers(
    bin: &Path,
    failover: &str,
    runs: usize,
    etcd: Option<&str>,
    extra: &[&str],
) -> Result<Vec<f64>> {
    let tmp = tempfile::tempdir_in("/dev/shm")?;
    let locks = tmp.path().join("owners");
    let (mut a, mut b) = two_hosts(tmp.path())?;
    a.start_with(bin, &b, &locks, etcd, extra)?;
    b.start_with(bin, &a, &locks, etcd, extra)?;
    let vm = format!("{failover}-vm");
    a.vmms.push(Killed(
        Command::new(bin)
            .args([
                "--id",
                &vm,
                "run",
                "--bundled",
                "testguest",
                "--mem-mib",
                "128",
            ])
            .args(["--args", "ticks 5 0", "--protect-ms", "20", "--host-root"])
            .arg(&a.root)
            .args(["--standby", "B", "--failover", failover])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ));
    let mut times = Vec::new();
    let (mut primary, mut standby) = (&mut a, &mut b);
    for _ in 0..runs {
        let base = standby_epochs(bin, &standby.root, &vm);
        wait("the standby to sync", Duration::from_secs(60), || {
            standby_epochs(bin, &standby.root, &vm) >= base.max(1) + 5
        })?;
        let before = takeovers(&standby.root, &vm).len();
        primary.kill_all(bin);
        wait("the takeover", Duration::from_secs(30), || {
            takeovers(&standby.root, &vm).len() > before
        })?;
        let out = takeovers(&standby.root, &vm)
            .pop()
            .context("no takeover output")?;
        wait("the first tick", Duration::from_secs(30), || {
            std::fs::read_to_string(&out).is_ok_and(|s| s.contains("tick "))
        })?;
        let first = unix_ms();
        let s = status(bin, &standby.root).context("no status")?;
        let e = s["failovers"]
            .as_array()
            .and_then(|v| v.last())
            .context("no failover recorded")?;
        let last_beat = e["at_ms"].as_f64().unwrap_or(0.0) - e["detect_ms"].as_f64().unwrap_or(0.0);
        times.push(first - last_beat);
        let peer = &*standby;
        primary.start_with(bin, peer, &locks, etcd, extra)?;
        std::mem::swap(&mut primary, &mut standby);
    }
    // The VM taken over last runs under the standby's agent.
    standby.kill_all(bin);
    primary.kill_all(bin);
    Ok(times)
}

/// Failover time, hot and cold, fenced by ownership locks and (if etcd is installed) by etcd
/// leases.
pub fn failover(runs: usize) -> Result<()> {
    let bin = rebound_bin()?;
    for method in ["hot", "cold"] {
        let (median, p99) = median_p99(failovers(&bin, method, runs, None, &[])?);
        emit(&format!("cluster_{method}_failover_median"), median, "ms");
        emit(&format!("cluster_{method}_failover_p99"), p99, "ms");
        eprintln!(
            "{method} failover, ownership locks (last heartbeat of the killed host to the VM's first output on its standby host, heartbeat {HEARTBEAT_MS} ms, {runs} runs): median {median:.0} ms, p99 {p99:.0} ms"
        );
    }
    if crate::net::have("passt") {
        let (median, p99) = median_p99(kv_failovers(&bin, runs)?);
        emit("cluster_kv_failover_first_reply_median", median, "ms");
        emit("cluster_kv_failover_first_reply_p99", p99, "ms");
        eprintln!(
            "hot failover of a kv guest, ownership locks (last heartbeat of the killed host to the first reply a client gets from the VM on its standby host, {runs} runs): median {median:.0} ms, p99 {p99:.0} ms"
        );
    }
    match Etcd::start() {
        Ok(etcd) => {
            for method in ["hot", "cold"] {
                let (median, p99) =
                    median_p99(failovers(&bin, method, runs, Some(&etcd.url), &[])?);
                emit(
                    &format!("cluster_{method}_failover_etcd_median"),
                    median,
                    "ms",
                );
                emit(&format!("cluster_{method}_failover_etcd_p99"), p99, "ms");
                eprintln!(
                    "{method} failover, etcd leases (grace = dead time, {runs} runs): median {median:.0} ms, p99 {p99:.0} ms"
                );
            }
            // Tighter: a host dead after 3 missed heartbeats, a lease trusted for 3 intervals
            // after its last answered keep-alive (shorter etcd stalls stop VMs briefly).
            let tight = ["--dead-ms", "60", "--lease-grace-ms", "60"];
            let (median, p99) = median_p99(failovers(&bin, "hot", runs, Some(&etcd.url), &tight)?);
            emit("cluster_hot_failover_etcd_tight_median", median, "ms");
            emit("cluster_hot_failover_etcd_tight_p99", p99, "ms");
            eprintln!(
                "hot failover, etcd leases, --dead-ms 60 --lease-grace-ms 60 ({runs} runs): median {median:.0} ms, p99 {p99:.0} ms"
            );
        }
        Err(e) => eprintln!("etcd failover not measured: {e}"),
    }
    eprintln!(
        "  peers: Remus reports seconds of downtime; Cloud Hypervisor's live-migration downtime target is 300 ms (a planned move)"
    );
    Ok(())
}

/// Heartbeat messages and bytes per second between two hosts, with 1, 8 and 64 VMs on one.
pub fn heartbeats() -> Result<()> {
    let bin = rebound_bin()?;
    let tmp = tempfile::tempdir_in("/dev/shm")?;
    let locks = tmp.path().join("owners");
    let (mut a, mut b) = two_hosts(tmp.path())?;
    a.start(&bin, &b, &locks)?;
    b.start(&bin, &a, &locks)?;
    let counters = |root: &Path| -> Result<(f64, f64, Instant)> {
        let s = status(&bin, root).context("no status")?;
        let hb = &s["heartbeats"];
        Ok((
            hb["beats_sent"].as_f64().unwrap_or(0.0),
            hb["beat_bytes_sent"].as_f64().unwrap_or(0.0),
            Instant::now(),
        ))
    };
    for n in [1usize, 8, 64] {
        while a.vmms.len() < n {
            let name = format!("v{}", a.vmms.len());
            a.vmms.push(Killed(
                Command::new(&bin)
                    .args(["--id", &name, "run", "--bundled", "testguest"])
                    .args(["--args", "ticks 1000 0", "--mem-mib", "32"])
                    .args(["--protect-ms", "1000", "--host-root"])
                    .arg(&a.root)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            ));
        }
        wait("the VMs to join", Duration::from_secs(120), || {
            status(&bin, &b.root).is_some_and(|s| {
                s["peers"][0]["vms"]
                    .as_array()
                    .is_some_and(|v| v.len() == n)
            })
        })?;
        let (m0, b0, t0) = counters(&a.root)?;
        std::thread::sleep(Duration::from_secs(2));
        let (m1, b1, t1) = counters(&a.root)?;
        let secs = (t1 - t0).as_secs_f64();
        let (msgs, bytes) = ((m1 - m0) / secs, (b1 - b0) / secs);
        emit(
            &format!("cluster_heartbeat_msgs_per_s_{n}_vms"),
            msgs,
            "messages/s",
        );
        emit(
            &format!("cluster_heartbeat_bytes_per_s_{n}_vms"),
            bytes,
            "bytes/s",
        );
        eprintln!(
            "heartbeats from a host with {n:>2} VMs to its one peer: {msgs:.1} messages/s, {bytes:.0} bytes/s"
        );
    }
    Ok(())
}
