//! Guests on TAP devices in network namespaces the tests create (root only; skipped
//! otherwise): the kv guest with real Redis clients, and a NIC failing over between two host
//! paths while a connection carries traffic — a link taken down, then a path that silently
//! drops frames (nftables). Traffic stays inside the test's namespaces.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{http, installed, output_within, text, try_http, wait_until};
use rebound_net::lab::{self, Netns, TwoPaths};

fn can_netns() -> bool {
    let ok = lab::available();
    if !ok {
        eprintln!("skipped: needs root, iproute2 and /dev/net/tun");
    }
    ok
}

#[test]
fn kv_on_a_tap_serves_redis_clients_in_a_namespace() {
    if !can_netns() || !installed("redis-cli") {
        return;
    }
    let ns = Netns::new("t").unwrap();
    ns.ip(&["tuntap", "add", "tap0", "mode", "tap"]).unwrap();
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "tap0"])
        .unwrap();
    ns.ip(&["link", "set", "tap0", "up"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut vmm = ns.command(env!("CARGO_BIN_EXE_rebound"));
    common::die_with_test(&mut vmm);
    let vmm = vmm
        .args(["--api-sock", sock.to_str().unwrap()])
        .args(["run", "--bundled", "kv", "--mem-mib", "64", "--tap", "tap0"])
        .args(["--args", "ip=10.77.0.2/24 gw=10.77.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cli = |args: &[&str]| {
        let out = ns
            .command("redis-cli")
            .args(["-h", "10.77.0.2"])
            .args(args)
            .output()
            .unwrap();
        text(&out.stdout).trim_end().to_string()
    };
    wait_until("kv on the TAP", Duration::from_secs(60), || {
        cli(&["PING"]) == "PONG"
    });
    assert_eq!(cli(&["SET", "where", "tap"]), "OK");
    assert_eq!(cli(&["GET", "where"]), "tap");
    if installed("redis-benchmark") {
        let out = ns
            .command("timeout")
            .args(["120", "redis-benchmark", "-h", "10.77.0.2"])
            .args(["-q", "-n", "5000", "-c", "10", "-t", "set,get", "-P", "16"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("requests per second"));
    }
    let (st, v) = http(&sock, "GET", "/network-interfaces", "");
    assert_eq!(st, 200);
    assert_eq!(v[0]["host_dev_name"], "tap0");
    assert!(
        v[0]["stats"]["backend"].as_str().unwrap().contains("tap0"),
        "{v}"
    );
    let (st, _) = http(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(st, 204);
    let out = output_within(vmm, "kv on a TAP", Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// A client in the peer's namespace echoing small messages as fast as it can; records the
/// longest round trip and how many completed. Any error ends it with the error.
fn echo_client(
    peer: &Netns,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    worst_us: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<(), String>> {
    peer.on_thread(move || {
        let t0 = Instant::now();
        let mut s = loop {
            match TcpStream::connect((Ipv4Addr::new(10, 78, 0, 2), 7)) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() < Duration::from_secs(60) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("connect: {e}")),
            }
        };
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let mut n = 0u64;
        while !stop.load(Ordering::Acquire) {
            let msg = n.to_le_bytes();
            let t = Instant::now();
            s.write_all(&msg).map_err(|e| format!("write {n}: {e}"))?;
            let mut got = [0u8; 8];
            s.read_exact(&mut got)
                .map_err(|e| format!("read {n}: {e}"))?;
            if got != msg {
                return Err(format!("echo {n} differs"));
            }
            worst_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::AcqRel);
            n += 1;
            done.store(n, Ordering::Release);
        }
        Ok(())
    })
}

#[test]
fn a_nic_fails_over_to_another_path_without_resetting_its_connection() {
    if !can_netns() {
        return;
    }
    let net = TwoPaths::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let config = dir.path().join("vm.json");
    let json = serde_json::json!({
        "boot-source": {"kernel_image_path": "bundled:testguest",
                        "boot_args": "net-echo 7 4 ip=10.78.0.2/24"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "network-interfaces": [TwoPaths::interface()],
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let mut vmm = net.vmm.command(env!("CARGO_BIN_EXE_rebound"));
    common::die_with_test(&mut vmm);
    let vmm = vmm
        .args(["--api-sock", sock.to_str().unwrap()])
        .args(["--config-file", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (stop, done, worst) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let client = echo_client(&net.peer, stop.clone(), done.clone(), worst.clone());
    let progress = |what: &str| {
        let from = done.load(Ordering::Acquire);
        wait_until(what, Duration::from_secs(60), || {
            done.load(Ordering::Acquire) >= from + 50 || client.is_finished()
        });
        assert!(!client.is_finished(), "the client stopped during {what}");
    };
    let active = || -> String {
        let (_, v) = try_http(&sock, "GET", "/network-interfaces", "").unwrap_or_default();
        v[0]["stats"]["backend"].as_str().unwrap_or("").to_string()
    };
    progress("traffic on path a");
    assert!(active().contains("tapa (active)"), "{}", active());
    // The active path's link goes down.
    worst.store(0, Ordering::Release);
    net.vmm.ip(&["link", "set", "vetha0", "down"]).unwrap();
    progress("traffic after path a's link went down");
    let b = active();
    assert!(
        b.contains("tapb (active)") && b.contains("1 failovers"),
        "{b}"
    );
    let gap = Duration::from_micros(worst.load(Ordering::Acquire));
    eprintln!("link down: longest round trip {gap:?}");
    assert!(gap < Duration::from_secs(5), "failover took {gap:?}");
    // Path a comes back; then path b silently drops every frame while its link stays up.
    net.vmm.ip(&["link", "set", "vetha0", "up"]).unwrap();
    wait_until("path a healthy again", Duration::from_secs(30), || {
        !active().contains("tapa (failed)")
    });
    if installed("nft") {
        let nft = |rule: &str| {
            let out = net.vmm.command("nft").arg(rule).output().unwrap();
            assert!(out.status.success(), "nft {rule}: {}", text(&out.stderr));
        };
        nft("add table bridge rbtest");
        nft("add chain bridge rbtest pathb { type filter hook forward priority 0; }");
        nft("add rule bridge rbtest pathb iifname vethb0 drop");
        nft("add rule bridge rbtest pathb oifname vethb0 drop");
        worst.store(0, Ordering::Release);
        progress("traffic after path b started dropping frames");
        let a = active();
        assert!(
            a.contains("tapa (active)") && a.contains("2 failovers"),
            "{a}"
        );
        eprintln!(
            "silent drops: longest round trip {:?}",
            Duration::from_micros(worst.load(Ordering::Acquire))
        );
    }
    stop.store(true, Ordering::Release);
    client
        .join()
        .unwrap()
        .expect("the connection was never reset");
    let (st, _) = http(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(st, 204);
    let out = output_within(vmm, "the failover VM", Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
