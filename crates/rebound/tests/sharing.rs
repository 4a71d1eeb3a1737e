//! Memory shared between VMs, each in its own VMM process: regions read-write or read-only,
//! messages and work queues with exact counts, locks under contention and after their holder is
//! killed, a cache read without locks, a persistent cache across VM runs, and a hostile guest.
//!
//! Each test has its own share directory (`REBOUND_SHARE_DIR`) under /dev/shm.

mod common;

use common::{http, text};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Start of the data area (after the region header).
const DATA: u64 = 0x4000;
/// The test guest's application words (data-area offset).
const APP: u64 = 1 << 21;

struct Share {
    dir: tempfile::TempDir,
}

impl Share {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir_in("/dev/shm").unwrap(),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_rebound"));
        c.env("REBOUND_SHARE_DIR", self.dir.path());
        common::die_with_test(&mut c);
        c
    }

    fn create(&self, name: &str, mib: u64) {
        let out = self
            .cmd()
            .args(["share", "create", name, "--size-mib"])
            .arg(mib.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    /// `rebound run --bundled testguest` with these guest args and options.
    fn guest(&self, args: &str, opts: &[&str]) -> Command {
        let mut c = self.cmd();
        c.args([
            "run",
            "--bundled",
            "testguest",
            "--mem-mib",
            "16",
            "--args",
            args,
        ])
        .args(opts);
        c
    }

    fn spawn(&self, args: &str, opts: &[&str]) -> Guest {
        let mut child = self
            .guest(args, opts)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Guest {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Runs a guest to its end: status, stdout, stderr.
    fn run(&self, args: &str, opts: &[&str]) -> (i32, String, String) {
        let g = self.spawn(args, opts);
        let (code, out) = g.finish();
        let (o, e) = out.split_once(STDERR).unwrap_or((&out, ""));
        (code, o.to_string(), e.to_string())
    }

    fn word(&self, region: &str, offset: u64) -> u64 {
        let f = std::fs::File::open(self.dir.path().join(region)).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, DATA + offset).unwrap();
        u64::from_le_bytes(b)
    }
}

/// How long any one VM of these tests may run.
const LIMIT: Duration = Duration::from_secs(150);
/// Separates stdout from stderr in `finish`'s text.
const STDERR: &str = "\n--- stderr ---\n";

struct Guest {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    /// Waits for a stdout line containing `what`.
    fn expect(&mut self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(what)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("no line with {what:?}; saw {:?}", self.seen),
            }
        }
    }

    /// Whether the VM has said `what` so far (without waiting).
    fn saw(&mut self, what: &str) -> bool {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        self.seen.iter().any(|l| l.contains(what))
    }

    fn finish(mut self) -> (i32, String) {
        // A hang fails the test (with what the guest said) instead of stalling the suite.
        let deadline = Instant::now() + LIMIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                while let Ok(l) = self.lines.try_recv() {
                    self.seen.push(l);
                }
                panic!(
                    "the VM did not end within {LIMIT:?}; it said {:?}",
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let seen = std::mem::take(&mut self.seen);
        (status.code().unwrap_or(-1), seen.join("\n") + STDERR + &err)
    }
}

fn num(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
fn regions_are_shared_between_processes_read_write_or_read_only() {
    let s = Share::new();
    s.create("r", 4);
    let (code, out, err) = s.run("share-write r 42", &["--share", "r"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wrote 42, read 42"), "{out}");
    assert_eq!(
        s.word("r", APP),
        42,
        "the host sees the guest's write in the region file"
    );
    // Another process, read-only: it reads the value; its write does not land.
    let (_, out, _) = s.run("share-read r", &["--share", "r:ro"]);
    assert!(out.contains("read 42"), "{out}");
    let (code, out, err) = s.run("share-write r 7", &["--share", "r:ro", "--metrics"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wrote 7, read 42"), "{out}");
    assert!(
        err.contains("\"bad_mmio_accesses\":1"),
        "the refused write is counted: {err}"
    );
    assert_eq!(s.word("r", APP), 42);
    // Clear errors for bad names and missing regions; nothing half-started.
    let (code, _, err) = s.run("share-read nope", &["--share", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no region nope"), "{err}");
    let (code, _, err) = s.run("share-read x", &["--share", "../etc"]);
    assert_eq!(code, 1);
    assert!(err.contains("letters, digits"), "{err}");
    let out = s
        .cmd()
        .args(["share", "create", "r", "--size-mib", "4"])
        .output()
        .unwrap();
    assert!(text(&out.stderr).contains("already exists"));
    let out = s
        .cmd()
        .args(["share", "create", "odd", "--size-mib", "3"])
        .output()
        .unwrap();
    assert!(text(&out.stderr).contains("multiple of 2"));
    // A damaged header is refused by name.
    std::fs::write(s.dir.path().join("bad"), vec![0u8; 4 << 20]).unwrap();
    let (code, _, err) = s.run("share-read bad", &["--share", "bad"]);
    assert_eq!(code, 1);
    assert!(err.contains("header is damaged"), "{err}");
}

#[test]
fn regions_attach_and_detach_while_the_vm_runs() {
    let s = Share::new();
    s.create("hot", 4);
    let sock = s.dir.path().join("api.sock");
    let mut vm = s.spawn("ticks 20", &["--api-sock", sock.to_str().unwrap()]);
    vm.expect("tick 1");
    let (code, e) = http(&sock, "PUT", "/shared/hot", r#"{"read_only": true}"#);
    assert_eq!(code, 204, "{e}");
    let (_, v) = http(&sock, "GET", "/shared", "");
    assert_eq!(v["regions"][0]["name"], "hot", "{v}");
    assert_eq!(v["regions"][0]["read_only"], true);
    let list = s.cmd().args(["share", "list"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list[0]["members"][0]["alive"], true, "{list}");
    assert_eq!(list[0]["members"][0]["writable"], false);
    let (code, _) = http(&sock, "PUT", "/shared/hot", "");
    assert_eq!(code, 400, "attached twice");
    let (code, e) = http(&sock, "DELETE", "/shared/hot", "");
    assert_eq!(code, 204, "{e}");
    let (_, v) = http(&sock, "GET", "/shared", "");
    assert_eq!(v["regions"], serde_json::json!([]), "{v}");
    let list = s.cmd().args(["share", "list"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(
        list[0]["members"],
        serde_json::json!([]),
        "the slot is free again: {list}"
    );
    vm.child.kill().unwrap();
}

#[test]
fn messages_arrive_exactly_once_in_ping_pong_and_many_to_one() {
    let s = Share::new();
    s.create("m", 4);
    let mut pong = s.spawn("pong m 500", &["--share", "m"]);
    pong.expect("pong ready");
    let (code, out, err) = s.run("ping m 500", &["--share", "m"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ping done 500"), "{out}");
    let (code, out) = pong.finish();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pong done 500"), "{out}");

    // Three senders to one receiver: per-sender sequences checked by the receiver.
    let mut sink = s.spawn("sink m 1500", &["--share", "m"]);
    sink.expect("sink ready");
    let sources: Vec<Guest> = (0..3)
        .map(|_| s.spawn("source m 500", &["--share", "m"]))
        .collect();
    let outs: Vec<(i32, String)> = sources.into_iter().map(Guest::finish).collect();
    if outs
        .iter()
        .any(|(code, out)| *code != 0 || !out.contains("source done 500"))
    {
        let _ = sink.child.kill();
        panic!("sources: {outs:#?}\nsink: {}", sink.finish().1);
    }
    let rings: u64 = outs
        .iter()
        .filter_map(|(_, out)| out.lines().find(|l| l.contains("source done 500")))
        .map(|line| num(line, "rings="))
        .sum();
    let (code, out) = sink.finish();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("sink done 1500 corrupt=0"), "{out}");
    // Senders rang only when the receiver was idle: never more than once per message.
    assert!(rings <= 1500, "{rings} wake-ups for 1500 messages");
}

#[test]
fn a_shared_work_queue_hands_each_item_to_exactly_one_taker() {
    let s = Share::new();
    s.create("w", 4);
    let takers: Vec<Guest> = (0..2)
        .map(|_| s.spawn("workq-take w", &["--share", "w"]))
        .collect();
    let (code, out, err) = s.run("workq-put w 2000 2", &["--share", "w"]);
    assert_eq!(code, 0, "{out}{err}");
    let (mut count, mut sum) = (0, 0);
    for t in takers {
        let (code, out) = t.finish();
        assert_eq!(code, 0, "{out}");
        let line = out
            .lines()
            .find(|l| l.contains("workq-take done"))
            .unwrap_or_else(|| panic!("{out}"));
        count += num(line, "count=");
        sum += num(line, "sum=");
    }
    assert_eq!(count, 2000);
    assert_eq!(sum, 2000 * 1999 / 2, "no item lost or taken twice");
}

#[test]
fn three_vms_contend_for_a_lock_without_losing_an_update() {
    let s = Share::new();
    s.create("l", 4);
    let vms: Vec<Guest> = (0..3)
        .map(|_| s.spawn("lockstress l 3000", &["--share", "l"]))
        .collect();
    for vm in vms {
        let (code, out) = vm.finish();
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("lockstress done 3000"), "{out}");
        assert!(out.contains("inconsistent=0"), "{out}");
    }
    assert_eq!(s.word("l", APP), 9000, "the counter");
    let per_vm: u64 = (0..64).map(|slot| s.word("l", APP + 64 + 8 * slot)).sum();
    assert_eq!(per_vm, 9000);
}

#[test]
fn a_shared_lock_guards_data_that_lives_in_one_vms_own_memory() {
    // The owner keeps a counter in its private memory and only answers GET and SET; two
    // clients add to it with GET then SET, under a lock in the region. A lost update would
    // show as a total below 2 x 400.
    let s = Share::new();
    s.create("o", 4);
    let mut owner = s.spawn("lockowner o 2", &["--share", "o"]);
    owner.expect("owner ready");
    let clients: Vec<Guest> = (0..2)
        .map(|_| s.spawn("lockclient o 400", &["--share", "o"]))
        .collect();
    for c in clients {
        let (code, out) = c.finish();
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("client done 400 inconsistent=0"), "{out}");
    }
    let (code, out) = owner.finish();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("owner value=800"), "{out}");
}

#[test]
fn a_live_update_keeps_the_vms_member_slot_and_its_locks() {
    let s = Share::new();
    s.create("u", 4);
    let state = tempfile::tempdir_in("/dev/shm").unwrap();
    let dir = state.path().join("vm");
    let sock = state.path().join("api.sock");
    let mut holder = s.spawn(
        "lockhold u 0",
        &[
            "--share",
            "u",
            "--state",
            dir.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    holder.expect("holding lock 0");
    // The waiter asks its VMM to recover dead members every few milliseconds, all through
    // the update: the holder must never look dead, not even between exec and re-attach.
    let mut waiter = s.spawn("lockwait u 0", &["--share", "u"]);
    waiter.expect("lock is held; waiting");
    let recoverer = s.spawn("recover-loop u 3000", &["--share", "u"]);
    std::thread::sleep(Duration::from_millis(300));
    let out = s
        .cmd()
        .arg("--api-sock")
        .arg(&sock)
        .arg("update")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (code, out) = recoverer.finish();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("recovered=0"), "nobody was recovered: {out}");
    assert!(
        !waiter.saw("acquired"),
        "the lock was taken from a VM that was only being updated: {:?}",
        waiter.seen
    );
    let list = s.cmd().args(["share", "list"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let members = list[0]["members"].as_array().unwrap();
    assert!(
        members
            .iter()
            .any(|m| m["slot"] == 0 && m["alive"] == true && m["pid"] == holder.child.id()),
        "the updated VMM holds its old slot: {list}"
    );
    let holder_pid = holder.child.id();
    assert_eq!(
        members.iter().filter(|m| m["pid"] == holder_pid).count(),
        1,
        "and no other: {list}"
    );
    // And when it really dies, the lock comes back.
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    let (code, out) = waiter.finish();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("acquired inconsistent"), "{out}");
}

#[test]
fn a_lock_held_by_a_killed_or_rolled_back_vm_is_recovered() {
    let s = Share::new();
    s.create("k", 4);
    let mut holder = s.spawn("lockhold k 0", &["--share", "k"]);
    holder.expect("holding lock 0");
    let mut waiter = s.spawn("lockwait k 0", &["--share", "k"]);
    waiter.expect("lock is held; waiting");
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    let (code, out) = waiter.finish();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("acquired inconsistent"),
        "the next holder is told: {out}"
    );

    // A protected holder rolled back to a checkpoint gives the lock up too.
    let sock = s.dir.path().join("hold.sock");
    let mut holder = s.spawn(
        "lockhold k 1",
        &[
            "--share",
            "k",
            "--protect-ms",
            "50",
            "--strategy",
            "post_image",
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    holder.expect("holding lock 1");
    let mut waiter = s.spawn("lockwait k 1", &["--share", "k"]);
    waiter.expect("lock is held; waiting");
    std::thread::sleep(Duration::from_millis(200));
    let (code, e) = http(&sock, "PUT", "/rollback", "");
    assert_eq!(code, 200, "{e}");
    let (code, out) = waiter.finish();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("acquired inconsistent"), "{out}");
    holder.child.kill().unwrap();
}

#[test]
fn a_shared_cache_stays_consistent_under_readers_and_a_writer() {
    let s = Share::new();
    s.create("c", 4);
    let readers: Vec<Guest> = (0..2)
        .map(|_| s.spawn("cache-reader c 20000", &["--share", "c:ro"]))
        .collect();
    let (code, out, err) = s.run("cache-writer c 3000", &["--share", "c"]);
    assert_eq!(code, 0, "{out}{err}");
    for r in readers {
        let (code, out) = r.finish();
        assert_eq!(code, 0, "a reader saw a torn block: {out}");
        let line = out
            .lines()
            .find(|l| l.contains("cache-reader done"))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(num(line, "reads=") + num(line, "empty=") >= 20000, "{line}");
    }
}

#[test]
fn a_persistent_cache_outlives_its_vm_and_refuses_strangers() {
    let s = Share::new();
    let opts = ["--identity", "web1", "--cache", "web1-cache:4"];
    let (code, out, err) = s.run("pcache", &opts);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("cache cold") && out.contains("cache now 1"),
        "{out}"
    );
    // The second run lives in a state directory, which records whose cache it had.
    let state = tempfile::tempdir_in("/dev/shm").unwrap();
    let state_dir = state.path().join("vm");
    let state_arg = state_dir.to_str().unwrap();
    let (code, out, err) = s.run("pcache", &[&opts[..], &["--state", state_arg]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("cache warm: 1 runs before") && out.contains("cache now 2"),
        "{out}"
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state_dir.join("identity")).unwrap())
            .unwrap();
    assert_eq!(record["identity"], "web1", "{record}");
    assert_eq!(record["cache"]["name"], "web1-cache", "{record}");
    assert_eq!(record["cache"]["size_mib"], 4, "{record}");
    // Another identity may not take it.
    let (code, _, err) = s.run("pcache", &["--identity", "web2", "--cache", "web1-cache:4"]);
    assert_eq!(code, 1);
    assert!(err.contains("foreign cache"), "{err}");
    // Nor may another guest image with the same identity: the cache is stale for it.
    let out = s
        .cmd()
        .args(["run", "--identity", "web1", "--cache", "web1-cache:4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("stale cache"),
        "{}",
        text(&out.stderr)
    );
    // And it is not a plain region anyone can attach.
    let (code, _, err) = s.run("share-read web1-cache", &["--share", "web1-cache"]);
    assert_eq!(code, 1);
    assert!(err.contains("persistent cache of"), "{err}");
}

#[test]
fn a_hostile_guest_hurts_only_what_it_may_write() {
    let s = Share::new();
    s.create("h", 4);
    let mut sink = s.spawn("sink h 2000 lossy", &["--share", "h"]);
    sink.expect("sink ready");
    // The source sends until the sink has gone (it notices when the inbox fills up).
    let source = s.spawn("source h 1000000000000", &["--share", "h"]);
    std::thread::sleep(Duration::from_millis(200));
    let (code, out, err) = s.run("share-hostile h", &["--share", "h"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out) = sink.finish();
    assert_eq!(code, 0, "the receiver survives: {out}");
    assert!(!out.contains("corrupt=0"), "the receiver noticed: {out}");
    let (code, out) = source.finish();
    assert_eq!(code, 0, "{out}");
    // The lock the hostile guest claimed for a member that does not exist comes back, marked.
    let (code, out, err) = s.run("locktake h 3", &["--share", "h"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("took lock 3 (Inconsistent)"), "{out}");
}
