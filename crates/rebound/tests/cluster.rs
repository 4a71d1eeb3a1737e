//! Replication to a standby (`rebound standby`, `run --standby`): a protected VM's checkpoints
//! reach another process over TCP, which stores each before acknowledging it; output is
//! released only after that. Real processes, real sockets, real `kill -9`.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{collect_lines, free_port, rebound, sigkill, wait_until};

/// More than the test waits for: the guest never ends by itself.
const TICKS: u64 = 1_000_000;

fn standby(addr: &str, dir: &Path) -> Child {
    let child = rebound()
        .args(["standby", "--listen", addr])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the standby to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    child
}

fn kill9(child: &mut Child) {
    sigkill(child);
    let _ = child.wait();
}

/// Collects a child's stdout lines as they come.
fn collect(child: &mut Child) -> Arc<Mutex<String>> {
    collect_lines(child.stdout.take().unwrap())
}

/// A primary (from `base`: `rebound` here or in a namespace) whose guest ticks every 5 ms,
/// protected every 20 ms and replicated to `addr`; its stdout collected.
fn primary(
    mut base: Command,
    addr: &str,
    extra: &[&str],
    stderr: Stdio,
) -> (Child, Arc<Mutex<String>>) {
    let mut child = base
        .args(["run", "--bundled", "testguest"])
        .args(["--args", &format!("ticks 5 {TICKS}")])
        .args(extra)
        .args(["--protect-ms", "20", "--standby", addr])
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let out = collect(&mut child);
    (child, out)
}

/// The tick numbers of `out`'s `tick N TIME` lines.
fn ticks(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn a_killed_primary_resumes_from_its_standby_and_nothing_it_released_is_ahead_of_it() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let dir = tmp.path().join("standby");
    let mut s = standby(&addr, &dir);
    let (mut primary, out) = primary(rebound(), &addr, &[], Stdio::null());
    let printed = || ticks(&out.lock().unwrap()).len();
    wait_until("the primary to tick", Duration::from_secs(60), || {
        printed() >= 30
    });
    // The standby dies: nothing more is acknowledged, so nothing more is released; a new one
    // over the same directory gets a full checkpoint and the VM's output flows again.
    kill9(&mut s);
    let before = printed();
    let mut s = standby(&addr, &dir);
    wait_until("output to flow again", Duration::from_secs(60), || {
        printed() >= before + 30
    });
    kill9(&mut primary);
    kill9(&mut s);
    let released = ticks(&out.lock().unwrap());
    assert!(
        released.windows(2).all(|w| w[1] == w[0] + 1),
        "{released:?}"
    );
    let last_released = *released.last().unwrap();

    let mut restored = rebound()
        .arg("restore")
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = collect(&mut restored);
    // Drained, so the VMM never blocks writing its log; shown if it does not tick.
    let err = collect_lines(restored.stderr.take().unwrap());
    let t0 = std::time::Instant::now();
    while ticks(&out.lock().unwrap()).len() < 20 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the restored VM did not tick: {}\n{}",
            out.lock().unwrap(),
            err.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    kill9(&mut restored);
    let resumed = ticks(&out.lock().unwrap());
    let first = resumed[0];
    // Nothing the primary released is ahead of the standby (it would be printed again), and
    // the restored VM goes on from there, every tick once.
    assert!(
        first > last_released,
        "tick {first} again after the primary released {last_released}"
    );
    assert!(resumed.windows(2).all(|w| w[1] == w[0] + 1), "{resumed:?}");
    // What the primary had not yet released when it died: the epochs the standby stored that
    // the primary had not yet released (a couple; bounded loosely for loaded machines).
    assert!(
        first - last_released <= 200,
        "{} ticks between the primary's last and the standby's first",
        first - last_released
    );
}

/// A standby that takes its VM over when the primary is lost, its stdout and stderr collected.
fn standby_taking_over(addr: &str, dir: &Path) -> (Child, Arc<Mutex<String>>, Arc<Mutex<String>>) {
    let mut child = rebound()
        .args(["--log-level", "info", "standby", "--listen", addr])
        .arg("--dir")
        .arg(dir)
        .args(["--takeover-ms", "3000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = collect(&mut child);
    let err = collect_lines(child.stderr.take().unwrap());
    wait_until("the standby to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    (child, out, err)
}

#[test]
fn a_standby_takes_over_a_primary_that_dies_not_one_that_ends() {
    let tmp = tempfile::tempdir().unwrap();
    // A primary whose VM ends says goodbye: its standby keeps waiting.
    let addr = format!("127.0.0.1:{}", free_port());
    let (mut s, _, err) = standby_taking_over(&addr, &tmp.path().join("a"));
    let o = rebound()
        .args(["run", "--bundled", "testguest", "--args", "ticks 5 40"])
        .args(["--protect-ms", "20", "--standby", &addr])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    wait_until("the goodbye", Duration::from_secs(30), || {
        err.lock().unwrap().contains("the primary ended it")
    });
    assert!(matches!(s.try_wait(), Ok(None)), "{}", err.lock().unwrap());
    assert!(!err.lock().unwrap().contains("taking the VM over"));
    kill9(&mut s);

    // A primary that dies: the standby builds the VM and it goes on there, after the last
    // tick the primary released.
    let addr = format!("127.0.0.1:{}", free_port());
    let (mut s, vm_out, err) = standby_taking_over(&addr, &tmp.path().join("b"));
    let (mut primary, out) = primary(rebound(), &addr, &[], Stdio::null());
    wait_until("the primary to tick", Duration::from_secs(60), || {
        ticks(&out.lock().unwrap()).len() >= 30
    });
    kill9(&mut primary);
    let released = ticks(&out.lock().unwrap());
    let last_released = *released.last().unwrap();
    wait_until("the standby's VM to tick", Duration::from_secs(60), || {
        ticks(&vm_out.lock().unwrap()).len() >= 20
    });
    kill9(&mut s);
    assert!(err.lock().unwrap().contains("taking the VM over"));
    let resumed = ticks(&vm_out.lock().unwrap());
    assert!(
        resumed[0] > last_released,
        "tick {} again after the primary released {last_released}",
        resumed[0]
    );
    assert!(resumed.windows(2).all(|w| w[1] == w[0] + 1), "{resumed:?}");
}

/// Two "hosts": namespaces joined by a veth pair, the primary's 10.79.0.1, the standby's
/// 10.79.0.2.
fn two_hosts() -> (rebound_net::lab::Netns, rebound_net::lab::Netns) {
    use rebound_net::lab::Netns;
    let a = Netns::new("ha").unwrap();
    let b = Netns::new("hb").unwrap();
    a.ip(&[
        "link", "add", "rva", "type", "veth", "peer", "name", "rvb", "netns", &b.0,
    ])
    .unwrap();
    a.ip(&["addr", "add", "10.79.0.1/24", "dev", "rva"])
        .unwrap();
    b.ip(&["addr", "add", "10.79.0.2/24", "dev", "rvb"])
        .unwrap();
    a.ip(&["link", "set", "rva", "up"]).unwrap();
    b.ip(&["link", "set", "rvb", "up"]).unwrap();
    (a, b)
}

#[test]
fn a_partitioned_primary_releases_nothing_once_its_standby_took_over() {
    if !rebound_net::lab::available() {
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let (a, b) = two_hosts();
    let tmp = tempfile::tempdir().unwrap();
    let addr = "10.79.0.2:7070";
    let mut s = b.command(env!("CARGO_BIN_EXE_rebound"));
    common::die_with_test(&mut s);
    let mut s = s
        .args(["standby", "--listen", addr])
        .arg("--dir")
        .arg(tmp.path().join("standby"))
        .args(["--takeover-ms", "1000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let vm_out = collect(&mut s);
    let mut p = a.command(env!("CARGO_BIN_EXE_rebound"));
    common::die_with_test(&mut p);
    // The primary may start before the standby listens: its first checkpoints are then not
    // acknowledged (and its output waits) until the standby is there.
    let (mut primary, out) = primary(p, addr, &[], Stdio::null());
    wait_until("the primary to tick", Duration::from_secs(60), || {
        ticks(&out.lock().unwrap()).len() >= 30
    });
    // The link between the hosts goes down; both ends live on.
    a.ip(&["link", "set", "rva", "down"]).unwrap();
    wait_until("the standby's VM to tick", Duration::from_secs(60), || {
        ticks(&vm_out.lock().unwrap()).len() >= 10
    });
    let first = ticks(&vm_out.lock().unwrap())[0];
    let old_at_takeover = ticks(&out.lock().unwrap());
    wait_until("the standby's VM to go on", Duration::from_secs(60), || {
        ticks(&vm_out.lock().unwrap()).len() >= 40
    });
    let old = ticks(&out.lock().unwrap());
    assert!(
        matches!(primary.try_wait(), Ok(None)),
        "the old primary lives on"
    );
    kill9(&mut primary);
    kill9(&mut s);
    assert!(
        old.last() < Some(&first),
        "the old primary released tick {:?}, the new one resumed at {first}",
        old.last()
    );
    assert_eq!(
        old, old_at_takeover,
        "the old primary released more after the takeover"
    );
    let resumed = ticks(&vm_out.lock().unwrap());
    assert!(resumed.windows(2).all(|w| w[1] == w[0] + 1), "{resumed:?}");
}

#[test]
fn a_failed_host_cpu_hands_the_vm_over_to_its_standby() {
    let tmp = tempfile::tempdir().unwrap();
    let host = tmp.path().join("host");
    let addr = format!("127.0.0.1:{}", free_port());
    let (mut s, vm_out, err) = standby_taking_over(&addr, &tmp.path().join("standby"));
    let mut base = rebound();
    base.env("REBOUND_HOST_DIR", &host);
    let (primary, out) = primary(
        base,
        &addr,
        &["--cpus", "1", "--recovery", "failover"],
        Stdio::piped(),
    );
    wait_until("the primary to tick", Duration::from_secs(60), || {
        ticks(&out.lock().unwrap()).len() >= 30
    });
    let o = rebound()
        .env("REBOUND_HOST_DIR", &host)
        .args(["fault", "cpu", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o.stderr));
    let o = common::output_within(primary, "the primary", Duration::from_secs(60));
    let stderr = common::text(&o.stderr);
    assert_eq!(o.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("handed over to the standby"), "{stderr}");
    wait_until("the standby's VM to tick", Duration::from_secs(60), || {
        ticks(&vm_out.lock().unwrap()).len() >= 20
    });
    kill9(&mut s);
    assert!(err.lock().unwrap().contains("taking the VM over"));
    let released = ticks(&out.lock().unwrap());
    let resumed = ticks(&vm_out.lock().unwrap());
    // Handed over at a checkpoint whose output was released: the standby goes on from the
    // very next tick, nothing lost, nothing twice.
    assert_eq!(
        resumed[0],
        released.last().unwrap() + 1,
        "released {released:?}, resumed {resumed:?}"
    );
    assert!(resumed.windows(2).all(|w| w[1] == w[0] + 1), "{resumed:?}");
}
