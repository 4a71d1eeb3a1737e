//! Replication to a standby (`rebound standby`, `run --standby`): a protected VM's checkpoints
//! reach another process over TCP, which stores each before acknowledging it; output is
//! released only after that. Real processes, real sockets, real `kill -9`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{free_port, rebound, wait_until};

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
    // SAFETY: signals our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
    let _ = child.wait();
}

/// Collects a child's stdout lines as they come.
fn collect(child: &mut Child) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let stdout = child.stdout.take().unwrap();
    let o = out.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut s = o.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    out
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
    let mut primary = rebound()
        .args(["run", "--bundled", "testguest"])
        .args(["--args", &format!("ticks 5 {TICKS}")])
        .args(["--protect-ms", "20", "--standby", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = collect(&mut primary);
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
    wait_until("the restored VM to tick", Duration::from_secs(60), || {
        ticks(&out.lock().unwrap()).len() >= 20
    });
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
