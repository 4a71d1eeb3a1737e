//! Guests on the network through the real backends: the user-mode backend (passt) publishing a
//! guest port on the host's loopback, connections that outlive `kill -9` of the VMM, replies
//! held by output commit. Traffic goes only to 127.0.0.0/8.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, have, http, output_within, rebound, shm, sigkill, text, wait_until};

const GUEST_NET: &str = "ip=10.0.2.15/24 gw=10.0.2.2";

/// Starts `rebound` with `args`, its stdout piped; waits for `ready` on stdout.
fn start(args: &[&str], ready: &str) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = rebound()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rebound");
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("no stdout");
    };
    let mut out = BufReader::new(stdout);
    let t0 = Instant::now();
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap_or(0);
        if n == 0 {
            let _ = child.kill();
            let o = output_within(child, "rebound", Duration::from_secs(30));
            panic!("rebound ended before {ready:?}: {}", text(&o.stderr));
        }
        if line.contains(ready) {
            return (child, out);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no {ready:?} within 60 s");
        }
    }
}

/// Connects to the published port (passt listens at once; the guest answers when it runs).
fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect to the guest");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Sends `msg` and reads the echo; the round trip.
fn echo(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let t0 = Instant::now();
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).expect("the echo");
    assert_eq!(got, msg, "the echo differs");
    t0.elapsed()
}

fn passt_gone(pid_file: &Path) -> bool {
    match std::fs::read_to_string(pid_file) {
        Err(_) => true,
        Ok(p) => {
            let pid: i32 = p.trim().parse().unwrap_or(0);
            // A zombie (nobody reaps it here) has no command line.
            std::fs::read(format!("/proc/{pid}/cmdline")).map_or(true, |c| c.is_empty())
        }
    }
}

#[test]
fn a_published_guest_port_serves_many_connections() {
    if !have("passt") {
        return;
    }
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:7");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let args = format!("net-echo 7 16 {GUEST_NET}");
    let (child, _out) = start(
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "run",
            "--bundled",
            "testguest",
            "--mem-mib",
            "64",
            "--args",
            &args,
            "--publish",
            &publish,
        ],
        "net-echo listening",
    );
    let mut conns: Vec<TcpStream> = (0..8).map(|_| connect(port)).collect();
    for round in 0..20u8 {
        for (i, c) in conns.iter_mut().enumerate() {
            let msg = vec![round ^ i as u8; 100 + 37 * i];
            echo(c, &msg);
        }
    }
    // A large transfer on one of them, in 64 KiB rounds: at most 64 KiB in flight, so the
    // guest's 128 KiB windows never close. (Both ways at full speed, Debian 12's passt can
    // overrun a window that closed and stall; see docs/network.md.)
    let big: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i * 7 + (i >> 9)) as u8)
        .collect();
    let mut got = vec![0u8; big.len()];
    for (out, back) in big.chunks(64 << 10).zip(got.chunks_mut(64 << 10)) {
        conns[0].write_all(out).unwrap();
        conns[0].read_exact(back).unwrap();
    }
    assert!(got == big, "1 MiB came back intact");
    // The interface and its counters through the API.
    let (st, v) = http(&sock, "GET", "/network-interfaces", "");
    assert_eq!(st, 200);
    assert_eq!(v[0]["iface_id"], "eth0");
    assert!(v[0]["stats"]["rx_frames"].as_u64().unwrap() > 100, "{v}");
    assert_eq!(v[0]["stats"]["ring_errors"], 0);
    drop(conns);
    // A clean stop, as Firecracker clients do it.
    let (st, _) = http(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(st, 204);
    let pid = child.id();
    let out = output_within(
        child,
        "rebound after SendCtrlAltDel",
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let run_dir = base.join(format!("rebound-net-{pid}"));
    assert!(
        !run_dir.exists(),
        "the VMM's network directory goes with it"
    );
}

#[test]
fn replies_wait_for_their_checkpoint_but_not_for_the_interval() {
    if !have("passt") {
        return;
    }
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:7");
    let args = format!("net-echo 7 4 {GUEST_NET}");
    // Checkpoints every 5 s: a reply that waited for the interval would take seconds.
    let (mut child, _out) = start(
        &[
            "run",
            "--bundled",
            "testguest",
            "--mem-mib",
            "64",
            "--args",
            &args,
            "--publish",
            &publish,
            "--protect-ms",
            "5000",
        ],
        "net-echo listening",
    );
    let mut c = connect(port);
    let mut worst = Duration::ZERO;
    for i in 0..30u8 {
        worst = worst.max(echo(&mut c, &[i; 64]));
    }
    assert!(
        worst < Duration::from_secs(2),
        "a pending reply asks for a checkpoint at once (worst round trip {worst:?})"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_connection_outlives_kill_9_of_the_vmm() {
    if !have("passt") {
        return;
    }
    let tmp = shm();
    let state = tmp.path().join("vm");
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:7");
    let args = format!("net-echo 7 4 {GUEST_NET}");
    let (mut child, _out) = start(
        &[
            "run",
            "--bundled",
            "testguest",
            "--mem-mib",
            "64",
            "--args",
            &args,
            "--publish",
            &publish,
            "--state",
            state.to_str().unwrap(),
            "--protect-ms",
            "20",
        ],
        "net-echo listening",
    );
    let mut c = connect(port);
    echo(&mut c, b"before any kill");
    for round in 0..3u8 {
        sigkill(&child);
        let _ = child.wait();
        // Sent while no VMM runs: passt keeps the connection and delivers it later.
        c.write_all(&[b'w', round]).unwrap();
        let mut recover = rebound()
            .args(["recover", "--state", state.to_str().unwrap()])
            .args(["--protect-ms", "20"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut got = [0u8; 2];
        c.read_exact(&mut got)
            .expect("the echo of what was sent meanwhile");
        assert_eq!(got, [b'w', round]);
        for i in 0..5u8 {
            echo(&mut c, &[round, i, 0xaa]);
        }
        std::mem::swap(&mut child, &mut recover);
        let _ = recover.wait();
    }
    sigkill(&child);
    let _ = child.wait();
    // The last VMM is gone: nothing will take the VM over now that its state directory is
    // removed, so its passt must not linger.
    let pid_file = state.join("passt-0.pid");
    let out = rebound()
        .args(["recover", "--state", state.to_str().unwrap(), "--paused"])
        .arg("--api-sock")
        .arg(tmp.path().join("s.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let api = tmp.path().join("s.sock");
    wait_until("the VM recovered, paused", Duration::from_secs(60), || {
        common::try_http(&api, "GET", "/", "").is_some_and(|(_, v)| v["state"] == "Paused")
    });
    let (st, _) = http(
        &tmp.path().join("s.sock"),
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(st, 204);
    let (st, _) = http(
        &tmp.path().join("s.sock"),
        "PATCH",
        "/vm",
        r#"{"state": "Resumed"}"#,
    );
    assert_eq!(st, 204);
    let o = output_within(out, "the last VMM", Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(0));
    wait_until("passt to end with the VM", Duration::from_secs(10), || {
        passt_gone(&pid_file)
    });
}

#[test]
fn sigterm_to_a_protected_vmm_frees_its_published_port() {
    if !have("passt") {
        return;
    }
    let tmp = shm();
    let state = tmp.path().join("vm");
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:7");
    let args = format!("net-echo 7 4 {GUEST_NET}");
    let (child, _out) = start(
        &[
            "run",
            "--bundled",
            "testguest",
            "--mem-mib",
            "64",
            "--args",
            &args,
            "--publish",
            &publish,
            "--state",
            state.to_str().unwrap(),
            "--protect-ms",
            "20",
        ],
        "net-echo listening",
    );
    let mut c = connect(port);
    echo(&mut c, b"served");
    let pid_file = state.join("passt-0.pid");
    assert!(!passt_gone(&pid_file), "passt serves the port");
    // SAFETY: signals our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let o = output_within(child, "rebound after SIGTERM", Duration::from_secs(30));
    assert_eq!(o.status.code(), None, "it dies of the signal");
    // Unlike a crash, a stop asked for ends passt: nobody would free the port otherwise.
    wait_until("passt to end with the VMM", Duration::from_secs(10), || {
        passt_gone(&pid_file)
    });
    wait_until("the port to be free", Duration::from_secs(10), || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
    });
}
