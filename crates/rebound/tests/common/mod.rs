//! What the `rebound` binary's integration tests share: starting the binary, talking HTTP to its
//! API socket, waiting for things to happen.
#![allow(dead_code)] // each test file uses its own subset

#[path = "../../src/client.rs"]
mod client;

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test, without fault injection inherited from the environment.
pub fn rebound() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rebound"));
    c.env_remove("REBOUND_FAULTS");
    die_with_test(&mut c);
    c
}

/// A VMM a test started dies with the test's thread, so a failed assertion (which unwinds past
/// the `Child` without killing it) leaves no VM running behind the suite.
pub fn die_with_test(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the calling (forked) process.
    unsafe {
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A directory on tmpfs (state directories and share directories must be on one).
pub fn shm() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").expect("a directory on /dev/shm")
}

/// One HTTP/1.1 request over the API socket (the CLI's own client): the status and the raw
/// body.
pub fn http_raw(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    client::request(sock, method, path, body, None).expect("an HTTP exchange over the API socket")
}

/// One request; the body parsed as JSON (null when empty or not JSON).
pub fn http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, body) = http_raw(sock, method, path, body);
    (status, serde_json::from_str(&body).unwrap_or_default())
}

/// One request that may fail (a VMM replacing itself, or gone): None then.
pub fn try_http(
    sock: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, serde_json::Value)> {
    let (status, body) = client::request(sock, method, path, body, None).ok()?;
    (status != 0).then(|| (status, serde_json::from_str(&body).unwrap_or_default()))
}

/// Polls `f` every 5 ms until it holds; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for the API socket to accept connections.
pub fn wait_for_socket(sock: &Path) {
    wait_until("the API socket", Duration::from_secs(10), || {
        UnixStream::connect(sock).is_ok()
    });
}

/// `child.wait_with_output()`, but a VMM that hangs is killed after `limit` and the test fails
/// naming `what`, with what it printed, instead of stalling the suite.
pub fn output_within(
    child: std::process::Child,
    what: &str,
    limit: Duration,
) -> std::process::Output {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let pid = child.id() as i32;
    let done = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (done, killed) = (done.clone(), killed.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while !done.load(Ordering::Acquire) {
                if t0.elapsed() > limit {
                    killed.store(true, Ordering::Release);
                    // SAFETY: signals our own child, not yet reaped (`done` is still false),
                    // and the process group it leads if it was started in its own (a
                    // supervisor's VMMs would otherwise keep its output pipe open).
                    unsafe {
                        libc::kill(-pid, libc::SIGKILL);
                        libc::kill(pid, libc::SIGKILL);
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::Release);
    let _ = watchdog.join();
    assert!(
        !killed.load(Ordering::Acquire),
        "{what} did not end within {limit:?}; it printed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Whether `program` runs (`program --version`).
pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// [`installed`], saying that the test is skipped when not (`.ci/run` installs what the
/// tests use).
pub fn have(program: &str) -> bool {
    let ok = installed(program);
    if !ok {
        eprintln!("skipped: {program} is not installed (.ci/run installs it)");
    }
    ok
}

/// A port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Sends SIGKILL to a child not yet reaped.
pub fn sigkill(child: &Child) {
    // SAFETY: signals our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
}

/// Collects the lines `r` yields (a child's stdout or stderr) as they come.
pub fn collect_lines(r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let o = out.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let mut s = o.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    out
}
