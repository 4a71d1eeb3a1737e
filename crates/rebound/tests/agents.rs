//! Host agents (`rebound host serve`): "hosts" are network namespaces joined by a veth pair,
//! each with its own agent and cluster directory; the VMs' ownership locks are shared (one
//! machine). Real processes, real sockets, real `kill -9` of every process of a host.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::wait_until;
use rebound_net::lab::Netns;
use serde_json::Value;

const REBOUND: &str = env!("CARGO_BIN_EXE_rebound");

/// One test at a time: each runs two or three "hosts" whose agents must keep their heartbeat
/// interval; several at once on a 2-core machine starve them into seeing each other dead.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
/// Heartbeat interval and the silence after which a host is dead: generous, so a machine
/// loaded by other tests never declares a live host dead (and if it did, the fence would
/// refuse the takeover anyway).
const HEARTBEAT_MS: &str = "20";
const DEAD_MS: &str = "400";

struct Host {
    ns: Netns,
    name: &'static str,
    addr: String,
    root: PathBuf,
    agent: Option<Child>,
}

impl Host {
    fn agent(&mut self, peer: &Host, locks: &Path, extra: &[&str]) {
        let mut c = self.ns.command(REBOUND);
        common::die_with_test(&mut c);
        let child = c
            .args(["--log-level", "warn", "host", "serve", "--name", self.name])
            .args(["--listen", &self.addr])
            .arg("--root")
            .arg(&self.root)
            .args(["--peer", &format!("{}={}", peer.name, peer.addr)])
            .args(["--heartbeat-ms", HEARTBEAT_MS, "--dead-ms", DEAD_MS])
            .arg("--lock-dir")
            .arg(locks)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.agent = Some(child);
        let sock = self.root.join("agent.sock");
        wait_until("the agent to serve", Duration::from_secs(60), || {
            sock.exists() && status(&self.root).is_some()
        });
    }

    /// Starts a VM here, its console into `out`.
    fn run_vm(&self, name: &str, failover: &str, standby: &str, out: &Path) -> Child {
        let mut c = self.ns.command(REBOUND);
        common::die_with_test(&mut c);
        c.args(["--id", name, "run", "--bundled", "testguest"])
            .args([
                "--args",
                "ticks 5 0",
                "--mem-mib",
                "32",
                "--protect-ms",
                "20",
            ])
            .arg("--host-root")
            .arg(&self.root)
            .args(["--standby", standby, "--failover", failover])
            .stdout(std::fs::File::create(out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// `kill -9` of every process of the host: its agent and its VMMs. Killed again until none
    /// is left: an agent killed after one of its VMMs may have started a new VMM meanwhile.
    fn kill_all(&mut self) {
        let kill = |ns: &str| {
            let out = std::process::Command::new("ip")
                .args(["netns", "pids", ns])
                .output();
            let pids = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let pids = pids.unwrap_or_default();
            for pid in pids.split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2) on processes of the namespace this test created.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            pids.trim().is_empty()
        };
        kill(&self.ns.0);
        if let Some(mut a) = self.agent.take() {
            let _ = a.wait();
        }
        wait_until(
            "the host's processes to die",
            Duration::from_secs(30),
            || kill(&self.ns.0),
        );
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Two hosts: A at 10.80.0.1, B at 10.80.0.2, cluster directories on tmpfs; `tag` tells
/// the namespaces of tests running at once apart.
fn two_hosts(tmp: &Path, tag: &str) -> (Host, Host) {
    let a = Netns::new(&format!("{tag}a")).unwrap();
    let b = Netns::new(&format!("{tag}b")).unwrap();
    a.ip(&[
        "link", "add", "rxa", "type", "veth", "peer", "name", "rxb", "netns", &b.0,
    ])
    .unwrap();
    a.ip(&["addr", "add", "10.80.0.1/24", "dev", "rxa"])
        .unwrap();
    b.ip(&["addr", "add", "10.80.0.2/24", "dev", "rxb"])
        .unwrap();
    a.ip(&["link", "set", "rxa", "up"]).unwrap();
    b.ip(&["link", "set", "rxb", "up"]).unwrap();
    let host = |ns, name, ip: &str| Host {
        ns,
        name,
        addr: format!("{ip}:7400"),
        root: tmp.join(name),
        agent: None,
    };
    (host(a, "A", "10.80.0.1"), host(b, "B", "10.80.0.2"))
}

/// The agent's view (what `rebound cluster status` prints), read from its status socket
/// (tests poll it: a process per poll would load the machine), None if it does not answer.
fn status(root: &Path) -> Option<Value> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(root.join("agent.sock")).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"status\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    serde_json::from_str(&out).ok()
}

/// The same through the command line.
fn status_cli(root: &Path) -> Option<Value> {
    let out = std::process::Command::new(REBOUND)
        .args(["cluster", "status", "--root"])
        .arg(root)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// The standby `host` keeps of `vm`: acknowledged epochs on the current connection.
fn standby_epochs(root: &Path, vm: &str) -> u64 {
    status(root)
        .and_then(|s| {
            s["standbys"]
                .as_array()?
                .iter()
                .find(|x| x["vm"] == vm && x["connected"] == true)
                .and_then(|x| x["epochs"].as_u64())
        })
        .unwrap_or(0)
}

/// Whether `host`'s agent runs `vm`, Running.
fn runs(root: &Path, vm: &str) -> bool {
    status(root).is_some_and(|s| {
        s["vms"]
            .as_array()
            .is_some_and(|v| v.iter().any(|x| x["name"] == vm && x["state"] == "Running"))
    })
}

/// The tick numbers in a console file.
fn ticks_in(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The console files of `vm` taken over on `host`, in order.
fn takeover_outputs(root: &Path, vm: &str) -> Vec<PathBuf> {
    (1..)
        .map(|n| root.join("out").join(format!("{vm}.{n}")))
        .take_while(|p| p.exists())
        .collect()
}

#[test]
fn fifty_host_failures_alternating_hot_and_cold_lose_and_repeat_nothing() {
    if !rebound_net::lab::available() {
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let _serial = serial();
    let tmp = common::shm();
    let locks = tmp.path().join("owners");
    let (mut a, mut b) = two_hosts(tmp.path(), "fo");
    a.agent(&b, &locks, &[]);
    b.agent(&a, &locks, &[]);
    let vms = ["hot", "cold"];
    let first: Vec<PathBuf> = vms
        .iter()
        .map(|v| tmp.path().join(format!("{v}.first")))
        .collect();
    let _vmms: Vec<Child> = vms
        .iter()
        .zip(&first)
        .map(|(v, out)| a.run_vm(v, v, "B", out))
        .collect();
    // Each VM's console files in the order the VM ran in them.
    let mut order: Vec<Vec<PathBuf>> = first.iter().map(|f| vec![f.clone()]).collect();
    let (mut primary, mut standby) = (&mut a, &mut b);
    const ROUNDS: usize = 25;
    for round in 0..ROUNDS {
        // The standby host has the VMs in sync.
        for v in vms {
            let base = standby_epochs(&standby.root, v);
            wait_until(
                &format!("round {round}: {v}'s standby on {} to sync", standby.name),
                Duration::from_secs(60),
                || standby_epochs(&standby.root, v) >= base.max(1) + 3,
            );
        }
        if round == 0 {
            // The primary's view of its VMs' replication: where the standby is, how far behind.
            let s = status(&primary.root).unwrap();
            let v = s["vms"]
                .as_array()
                .and_then(|v| v.iter().find(|x| x["name"] == "hot").cloned())
                .unwrap();
            assert_eq!(v["standby"], "B", "{v}");
            assert_eq!(v["method"], "hot", "{v}");
            assert!(
                v["replication"]["standby_epoch"].as_u64().unwrap() > 0,
                "{v}"
            );
        }
        primary.kill_all();
        let before: Vec<usize> = vms
            .iter()
            .map(|v| takeover_outputs(&standby.root, v).len())
            .collect();
        for (i, v) in vms.iter().enumerate() {
            wait_until(
                &format!("round {round}: {} to take {v} over", standby.name),
                Duration::from_secs(60),
                || runs(&standby.root, v) && takeover_outputs(&standby.root, v).len() > before[i],
            );
            let out = takeover_outputs(&standby.root, v).pop().unwrap();
            wait_until(
                &format!("round {round}: {v} to tick on {}", standby.name),
                Duration::from_secs(60),
                || !ticks_in(&out).is_empty(),
            );
            order[i].push(out);
        }
        let peer = &*standby;
        primary.agent(peer, &locks, &[]);
        std::mem::swap(&mut primary, &mut standby);
    }
    for (i, v) in vms.iter().enumerate() {
        let mut all = Vec::new();
        for f in &order[i] {
            let t = ticks_in(f);
            assert!(!t.is_empty(), "{v}: no ticks in {}", f.display());
            all.push(t);
        }
        let flat: Vec<u64> = all.concat();
        // Nothing repeated: every tick once, in order, across 2 x ROUNDS failovers.
        assert!(
            flat.windows(2).all(|w| w[1] > w[0]),
            "{v}: a tick was repeated or went back across a failover: {:?}",
            all.iter()
                .map(|t| (t.first(), t.last()))
                .collect::<Vec<_>>()
        );
        let gaps = flat.windows(2).filter(|w| w[1] != w[0] + 1).count();
        eprintln!(
            "{v}: {} failovers, {} ticks, {gaps} gaps",
            order[i].len() - 1,
            flat.len()
        );
    }
}

#[test]
fn partitions_never_make_two_owners() {
    if !rebound_net::lab::available() {
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let _serial = serial();
    let tmp = common::shm();
    let locks = tmp.path().join("owners");
    let (mut a, mut b) = two_hosts(tmp.path(), "pa");
    a.agent(&b, &locks, &[]);
    b.agent(&a, &locks, &[]);
    let out = tmp.path().join("vm.out");
    let mut vm = a.run_vm("p", "hot", "B", &out);
    for round in 0..20 {
        let base = standby_epochs(&b.root, "p");
        wait_until(
            &format!("round {round}: the standby to sync"),
            Duration::from_secs(60),
            || standby_epochs(&b.root, "p") >= base.max(1) + 3,
        );
        let fenced = |s: &Value| s["heartbeats"]["takeovers_fenced"].as_u64().unwrap_or(0);
        let before = status(&b.root).map_or(0, |s| fenced(&s));
        a.ns.ip(&["link", "set", "rxa", "down"]).unwrap();
        // Both hosts see the other gone; B would take the VM over but its owner lives.
        wait_until(
            &format!("round {round}: B to find A's VM still owned"),
            Duration::from_secs(60),
            || status(&b.root).is_some_and(|s| fenced(&s) > before),
        );
        a.ns.ip(&["link", "set", "rxa", "up"]).unwrap();
    }
    let s = status(&b.root).unwrap();
    assert_eq!(s["failovers"], serde_json::json!([]), "{s}");
    assert!(matches!(vm.try_wait(), Ok(None)), "the VM runs on its host");
    assert!(!runs(&b.root, "p"), "B runs no copy of the VM");
    let t = ticks_in(&out);
    assert!(t.len() > 100, "the VM went on ticking: {}", t.len());
    assert!(
        t.windows(2).all(|w| w[1] == w[0] + 1),
        "every tick once, in order"
    );
    common::sigkill(&vm);
    let _ = vm.wait();
}

#[test]
fn one_heartbeat_per_interval_whatever_the_number_of_vms() {
    if !rebound_net::lab::available() {
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let _serial = serial();
    let tmp = common::shm();
    let locks = tmp.path().join("owners");
    let (mut a, mut b) = two_hosts(tmp.path(), "hb");
    a.agent(&b, &locks, &["--hot-budget-mib", "16"]);
    b.agent(&a, &locks, &["--hot-budget-mib", "16"]);
    let mut vmms = Vec::new();
    let mut per_interval = Vec::new();
    for n in [1usize, 8, 64] {
        while vmms.len() < n {
            let name = format!("v{}", vmms.len());
            let mut c = a.ns.command(REBOUND);
            common::die_with_test(&mut c);
            // Idle guests, checkpointed once a second, standby wanted on B and hot: a 32 MiB
            // VM does not fit B's 16 MiB hot budget, so each says why it has none.
            let child = c
                .args(["--id", &name, "run", "--bundled", "testguest"])
                .args(["--args", "ticks 1000 0", "--mem-mib", "32"])
                .args(["--protect-ms", "1000", "--host-root"])
                .arg(&a.root)
                .args(["--standby", "B", "--failover", "hot"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            vmms.push(child);
        }
        // B hears about every VM of A in A's heartbeats.
        wait_until(
            &format!("B to see A's {n} VMs"),
            Duration::from_secs(120),
            || {
                status(&b.root).is_some_and(|s| {
                    s["peers"][0]["vms"]
                        .as_array()
                        .is_some_and(|v| v.len() == n && v.iter().all(|x| x["state"] == "Running"))
                })
            },
        );
        let s = status_cli(&a.root).unwrap();
        let hb = &s["heartbeats"];
        let (intervals, sent) = (
            hb["intervals"].as_u64().unwrap(),
            hb["beats_sent"].as_u64().unwrap(),
        );
        // One datagram per interval to the one peer, however many VMs.
        assert!(
            sent == intervals || sent + 1 == intervals,
            "{n} VMs: {sent} heartbeats in {intervals} intervals"
        );
        per_interval.push((n, sent, intervals));
        let vm = &s["vms"][0];
        assert!(
            vm["unprotected_because"]
                .as_str()
                .is_some_and(|r| r.contains("hot standby refused")),
            "{vm}"
        );
    }
    eprintln!("(VMs, heartbeats sent, intervals): {per_interval:?}");
    for c in &mut vmms {
        common::sigkill(c);
        let _ = c.wait();
    }
}

/// etcd in its own namespace, E (10.81.0.3), bridged to hosts A (10.81.0.1) and B (10.81.0.2):
/// a host whose link goes down is cut from both the other host and etcd.
struct EtcdLab {
    e: Netns,
    data: PathBuf,
    etcd: Option<Child>,
}

impl EtcdLab {
    const URL: &'static str = "http://10.81.0.3:2379";

    fn start_etcd(&mut self) {
        let mut c = self.e.command("etcd");
        common::die_with_test(&mut c);
        let child = c
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--listen-client-urls", Self::URL])
            .args(["--advertise-client-urls", Self::URL])
            .args(["--listen-peer-urls", "http://10.81.0.3:2380"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.etcd = Some(child);
        let e = self.e.0.clone();
        wait_until("etcd to serve", Duration::from_secs(60), || {
            std::process::Command::new("ip")
                .args(["netns", "exec", &e, "bash", "-c"])
                .arg("exec 3<>/dev/tcp/10.81.0.3/2379")
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    fn kill_etcd(&mut self) {
        if let Some(c) = self.etcd.take() {
            common::sigkill(&c);
            let mut c = c;
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdLab {
    fn drop(&mut self) {
        self.kill_etcd();
    }
}

fn etcd_hosts(tmp: &Path, tag: &str) -> (Host, Host, EtcdLab) {
    let (a, b, mut lab) = bridged_hosts(tmp, tag);
    lab.start_etcd();
    (a, b, lab)
}

/// Hosts A and B and a third namespace E bridging them (where etcd or a client runs).
fn bridged_hosts(tmp: &Path, tag: &str) -> (Host, Host, EtcdLab) {
    let e = Netns::new(&format!("{tag}e")).unwrap();
    e.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    e.ip(&["addr", "add", "10.81.0.3/24", "dev", "br0"])
        .unwrap();
    e.ip(&["link", "set", "br0", "up"]).unwrap();
    let mut hosts = Vec::new();
    for (i, name) in [(1, "A"), (2, "B")] {
        let ns = Netns::new(&format!("{tag}{}", name.to_lowercase())).unwrap();
        let (inner, outer) = (format!("h{i}"), format!("h{i}e"));
        ns.ip(&[
            "link", "add", &inner, "type", "veth", "peer", "name", &outer, "netns", &e.0,
        ])
        .unwrap();
        ns.ip(&["addr", "add", &format!("10.81.0.{i}/24"), "dev", &inner])
            .unwrap();
        ns.ip(&["link", "set", &inner, "up"]).unwrap();
        // passt wants a routable interface: everything goes through E.
        ns.ip(&["route", "add", "default", "via", "10.81.0.3"])
            .unwrap();
        e.ip(&["link", "set", &outer, "master", "br0"]).unwrap();
        e.ip(&["link", "set", &outer, "up"]).unwrap();
        hosts.push(Host {
            ns,
            name,
            addr: format!("10.81.0.{i}:7400"),
            root: tmp.join(name),
            agent: None,
        });
    }
    let b = hosts.pop().unwrap();
    let a = hosts.pop().unwrap();
    let lab = EtcdLab {
        e,
        data: tmp.join("etcd"),
        etcd: None,
    };
    (a, b, lab)
}

/// The host's link to the others (and etcd).
fn link(h: &Host, up: bool) {
    let dev = if h.name == "A" { "h1" } else { "h2" };
    h.ns.ip(&["link", "set", dev, if up { "up" } else { "down" }])
        .unwrap();
}

#[test]
fn partitioned_primaries_fence_themselves_and_their_standby_takes_over() {
    if !rebound_net::lab::available() || !common::have("etcd") {
        eprintln!("skipped: needs root, iproute2 and etcd (apt-get install etcd-server)");
        return;
    }
    let _serial = serial();
    let tmp = common::shm();
    let locks = tmp.path().join("unused");
    let (mut a, mut b, _etcd) = etcd_hosts(tmp.path(), "ep");
    let etcd = ["--etcd", EtcdLab::URL];
    a.agent(&b, &locks, &etcd);
    b.agent(&a, &locks, &etcd);
    let first = tmp.path().join("vm.first");
    let mut vm = a.run_vm("e", "hot", "B", &first);
    let mut order = vec![first];
    let (mut primary, mut standby) = (&a, &b);
    const PARTITIONS: usize = 20;
    for round in 0..PARTITIONS {
        let base = standby_epochs(&standby.root, "e");
        wait_until(
            &format!("round {round}: the standby on {} to sync", standby.name),
            Duration::from_secs(60),
            || standby_epochs(&standby.root, "e") >= base.max(1) + 3,
        );
        let before = takeover_outputs(&standby.root, "e").len();
        let old_out = order.last().unwrap().clone();
        // The primary host is cut off, alive: it must stop its VM itself, and its standby
        // take it over only once it has.
        link(primary, false);
        wait_until(
            &format!("round {round}: {} to take the VM over", standby.name),
            Duration::from_secs(60),
            || runs(&standby.root, "e") && takeover_outputs(&standby.root, "e").len() > before,
        );
        let out = takeover_outputs(&standby.root, "e").pop().unwrap();
        wait_until(
            &format!("round {round}: the VM to tick on {}", standby.name),
            Duration::from_secs(60),
            || !ticks_in(&out).is_empty(),
        );
        let old_at_takeover = ticks_in(&old_out);
        let new_first = ticks_in(&out)[0];
        assert!(
            old_at_takeover.last() < Some(&new_first),
            "round {round}: the old primary released tick {:?}, the new one started at {new_first}",
            old_at_takeover.last()
        );
        link(primary, true);
        // Back on the network, the old primary learns its lease is gone and ends its VMM.
        wait_until(
            &format!("round {round}: {} to end its copy of the VM", primary.name),
            Duration::from_secs(60),
            || !runs(&primary.root, "e"),
        );
        assert_eq!(
            ticks_in(&old_out),
            old_at_takeover,
            "round {round}: the old primary released more after the takeover"
        );
        order.push(out);
        std::mem::swap(&mut primary, &mut standby);
    }
    let all: Vec<u64> = order.iter().flat_map(|f| ticks_in(f)).collect();
    assert!(
        all.windows(2).all(|w| w[1] > w[0]),
        "a tick was repeated or went back across a failover"
    );
    let gaps = all.windows(2).filter(|w| w[1] != w[0] + 1).count();
    eprintln!("{PARTITIONS} partitions, {} ticks, {gaps} gaps", all.len());
    a.kill_all();
    b.kill_all();
    let _ = vm.wait();
}

#[test]
fn an_etcd_restart_or_an_agent_restart_moves_nothing_and_loses_nothing() {
    if !rebound_net::lab::available() || !common::have("etcd") {
        eprintln!("skipped: needs root, iproute2 and etcd (apt-get install etcd-server)");
        return;
    }
    let _serial = serial();
    let tmp = common::shm();
    let locks = tmp.path().join("unused");
    let (mut a, mut b, mut etcd) = etcd_hosts(tmp.path(), "er");
    let args = ["--etcd", EtcdLab::URL];
    a.agent(&b, &locks, &args);
    b.agent(&a, &locks, &args);
    let out = tmp.path().join("vm.out");
    let mut vm = a.run_vm("r", "cold", "B", &out);
    let sync = |what: &str| {
        let base = standby_epochs(&b.root, "r");
        wait_until(what, Duration::from_secs(60), || {
            standby_epochs(&b.root, "r") >= base.max(1) + 3
        });
    };
    sync("the standby to sync");
    // etcd goes away and comes back: every host stops its VMs meanwhile (none can prove it
    // owns them), then they go on; nobody takes anything over.
    etcd.kill_etcd();
    wait_until("A to stop its VM", Duration::from_secs(60), || {
        status(&a.root).is_some_and(|s| s["self_fenced"] == true)
    });
    etcd.start_etcd();
    wait_until("A to resume its VM", Duration::from_secs(60), || {
        status(&a.root).is_some_and(|s| s["self_fenced"] == false)
    });
    let t = ticks_in(&out).len();
    wait_until("the VM to tick on", Duration::from_secs(60), || {
        ticks_in(&out).len() > t + 20
    });
    // A's agent restarts (its VMMs live on).
    let agent = a.agent.take().unwrap();
    common::sigkill(&agent);
    let mut agent = agent;
    let _ = agent.wait();
    a.agent(&b, &locks, &args);
    sync("the standby to sync after the agent restart");
    let t = ticks_in(&out).len();
    wait_until("the VM to tick on", Duration::from_secs(60), || {
        ticks_in(&out).len() > t + 20
    });
    assert!(matches!(vm.try_wait(), Ok(None)), "the VM ran on");
    let s = status(&b.root).unwrap();
    assert_eq!(s["failovers"], serde_json::json!([]), "{s}");
    let ticks = ticks_in(&out);
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "every tick once, in order"
    );
    common::sigkill(&vm);
    let _ = vm.wait();
    a.kill_all();
    b.kill_all();
}

/// Sends `INCR counter` until `stop` to whichever host serves the kv guest on `port`; returns
/// the value of every acknowledged increment, in order. A connection that fails or stays
/// silent for 2 s is given up and the other host tried. Bounded: at most 10 minutes and a
/// million requests.
fn incr_client(port: u16, stop: Arc<AtomicBool>) -> Vec<i64> {
    use std::io::{BufRead, BufReader, Write};
    let hosts = [format!("10.81.0.1:{port}"), format!("10.81.0.2:{port}")];
    let mut acked = Vec::new();
    let t0 = std::time::Instant::now();
    let mut at = 0;
    let mut sent = 0u64;
    while !stop.load(Ordering::Acquire)
        && t0.elapsed() < Duration::from_secs(600)
        && sent < 1_000_000
    {
        let addr: std::net::SocketAddr = hosts[at % 2].parse().unwrap();
        let Ok(conn) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        else {
            at += 1;
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut w = conn.try_clone().unwrap();
        let mut r = BufReader::new(conn);
        let mut line = String::new();
        while !stop.load(Ordering::Acquire) && sent < 1_000_000 {
            sent += 1;
            if w.write_all(b"*2\r\n$4\r\nINCR\r\n$7\r\ncounter\r\n")
                .is_err()
            {
                break;
            }
            line.clear();
            match r.read_line(&mut line) {
                Ok(n) if n > 0 => match line.trim_end().strip_prefix(':') {
                    Some(v) => acked.push(v.parse::<i64>().unwrap()),
                    None => break,
                },
                _ => break,
            }
        }
        at += 1;
    }
    acked
}

#[test]
fn kv_guests_under_checking_clients_lose_and_repeat_nothing_across_host_failures() {
    if !rebound_net::lab::available() || !common::have("passt") {
        eprintln!("skipped: needs root, iproute2 and passt");
        return;
    }
    let _serial = serial();
    let tmp = common::shm();
    let locks = tmp.path().join("owners");
    let (mut a, mut b, lab) = bridged_hosts(tmp.path(), "kv");
    a.agent(&b, &locks, &[]);
    b.agent(&a, &locks, &[]);
    // Two kv guests, one with a hot standby and one with a cold one, each under its client.
    let guests = [("kvhot", "hot", 6379u16), ("kvcold", "cold", 6380)];
    let mut vmms = Vec::new();
    for (name, method, port) in guests {
        let mut c = a.ns.command(REBOUND);
        common::die_with_test(&mut c);
        vmms.push(
            c.args(["--id", name, "run", "--bundled", "kv", "--mem-mib", "64"])
                .args(["--args", &format!("port={port} maxmemory=16")])
                .args(["--publish", &format!("0.0.0.0:{port}:{port}")])
                .args(["--protect-ms", "20", "--host-root"])
                .arg(&a.root)
                .args(["--standby", "B", "--failover", method])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = guests
        .iter()
        .map(|&(_, _, port)| {
            let stop = stop.clone();
            lab.e.on_thread(move || incr_client(port, stop))
        })
        .collect();
    let (mut primary, mut standby) = (&mut a, &mut b);
    const ROUNDS: usize = 26;
    for round in 0..ROUNDS {
        for (name, ..) in guests {
            let base = standby_epochs(&standby.root, name);
            wait_until(
                &format!(
                    "round {round}: {name}'s standby on {} to sync",
                    standby.name
                ),
                Duration::from_secs(120),
                || standby_epochs(&standby.root, name) >= base.max(1) + 5,
            );
        }
        primary.kill_all();
        for (name, ..) in guests {
            wait_until(
                &format!("round {round}: {} to take {name} over", standby.name),
                Duration::from_secs(120),
                || runs(&standby.root, name),
            );
        }
        let peer = &*standby;
        primary.agent(peer, &locks, &[]);
        std::mem::swap(&mut primary, &mut standby);
    }
    // Let the clients get replies from the last primary too.
    for (name, ..) in guests {
        let base = standby_epochs(&standby.root, name);
        wait_until(
            "the last primary to serve",
            Duration::from_secs(120),
            || standby_epochs(&standby.root, name) >= base + 10,
        );
    }
    stop.store(true, Ordering::Release);
    for ((name, ..), client) in guests.iter().zip(clients) {
        let acked = client.join().unwrap();
        assert!(
            acked.len() > 50,
            "{name}: the client got {} replies",
            acked.len()
        );
        // No acknowledged increment was undone: every reply is larger than the one before
        // (a rollback past an acknowledged one would hand its value out again).
        assert!(
            acked.windows(2).all(|w| w[1] > w[0]),
            "{name}: an acknowledged increment was lost (a value came back): {:?}",
            acked.windows(2).find(|w| w[1] <= w[0])
        );
        let gaps = acked.windows(2).filter(|w| w[1] != w[0] + 1).count();
        eprintln!(
            "{name}: {ROUNDS} failovers, {} acknowledged increments, last {}, {gaps} gaps (a reply lost with its connection)",
            acked.len(),
            acked.last().unwrap()
        );
    }
    a.kill_all();
    b.kill_all();
    for mut v in vmms {
        let _ = v.wait();
    }
}

#[test]
fn a_guest_that_stops_making_progress_is_killed_and_a_waiting_one_is_not() {
    if !rebound_net::lab::available() {
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let _serial = serial();
    let tmp = common::shm();
    let locks = tmp.path().join("owners");
    let (mut a, b) = two_hosts(tmp.path(), "st");
    a.agent(&b, &locks, &["--stall-ms", "1000"]);
    let start = |name: &str, args: &str| {
        let mut c = a.ns.command(REBOUND);
        common::die_with_test(&mut c);
        c.args([
            "--id",
            name,
            "run",
            "--bundled",
            "testguest",
            "--mem-mib",
            "32",
        ])
        .args(["--args", args, "--protect-ms", "50", "--host-root"])
        .arg(&a.root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
    };
    // One computes forever without passing through its dispatcher (its heartbeat word never
    // moves); one ticks every 2 s (it waits in BLOCK between ticks: idle, not stuck).
    let mut stuck = start("stuck", "spin");
    let mut idle = start("idle", "ticks 2000 0");
    wait_until("both VMs to join", Duration::from_secs(60), || {
        runs(&a.root, "stuck") && runs(&a.root, "idle")
    });
    wait_until("the stuck VM to be killed", Duration::from_secs(60), || {
        matches!(stuck.try_wait(), Ok(Some(_)))
    });
    // The idle one lives on through several stall periods.
    let t0 = std::time::Instant::now();
    wait_until("three stall periods", Duration::from_secs(60), || {
        t0.elapsed() > Duration::from_secs(3)
    });
    assert!(
        matches!(idle.try_wait(), Ok(None)),
        "the idle VM was killed"
    );
    assert!(runs(&a.root, "idle"));
    common::sigkill(&idle);
    let _ = idle.wait();
    a.kill_all();
}

/// The pid and state of VM `vm` as its host's agent reports it.
fn vm_on(root: &Path, vm: &str) -> Option<(u64, String)> {
    let s = status(root)?;
    let v = s["vms"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == vm)?
        .clone();
    Some((v["pid"].as_u64()?, v["state"].as_str()?.to_string()))
}

#[test]
fn a_vm_whose_vmm_dies_is_recovered_on_its_host_and_one_that_keeps_failing_is_not() {
    if !rebound_net::lab::available() {
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let _serial = serial();
    let tmp = common::shm();
    let locks = tmp.path().join("owners");
    let (mut a, b) = two_hosts(tmp.path(), "rs");
    a.agent(&b, &locks, &["--stall-ms", "1000"]);
    let start = |name: &str, args: &str, out: Stdio| {
        let mut c = a.ns.command(REBOUND);
        common::die_with_test(&mut c);
        c.args([
            "--id",
            name,
            "run",
            "--bundled",
            "testguest",
            "--mem-mib",
            "32",
        ])
        .args(["--args", args, "--protect-ms", "20", "--state"])
        .arg(tmp.path().join(format!("{name}.state")))
        .arg("--host-root")
        .arg(&a.root)
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
    };
    let first = tmp.path().join("crashy.out");
    let mut crashy = start(
        "crashy",
        "ticks 5 0",
        Stdio::from(std::fs::File::create(&first).unwrap()),
    );
    wait_until("the VM to join and tick", Duration::from_secs(60), || {
        runs(&a.root, "crashy") && ticks_in(&first).len() >= 20
    });
    let (pid, _) = vm_on(&a.root, "crashy").unwrap();
    assert_eq!(pid, u64::from(crashy.id()));
    common::sigkill(&crashy);
    let _ = crashy.wait();
    // Recovered here from its state directory, by a new VMM, its console in ROOT/out.
    let again = a.root.join("out").join("crashy.1");
    wait_until("the VM recovered here", Duration::from_secs(60), || {
        vm_on(&a.root, "crashy").is_some_and(|(p, s)| p != pid && s == "Running")
            && ticks_in(&again).len() >= 20
    });
    let (before, after) = (ticks_in(&first), ticks_in(&again));
    let all: Vec<u64> = before.iter().chain(&after).copied().collect();
    assert!(
        all.windows(2).all(|w| w[1] > w[0]),
        "a tick shown twice or out of order: {before:?} then {after:?}"
    );

    // A guest that stalls again after every recovery: recovered MAX_RESTARTS (3) times, then
    // left dead.
    let mut stuck = start("stuck", "spin", Stdio::null());
    wait_until(
        "the stuck VM dead for good",
        Duration::from_secs(120),
        || vm_on(&a.root, "stuck").is_some_and(|(_, s)| s == "Dead"),
    );
    let _ = stuck.wait();
    let s = status(&a.root).unwrap();
    let v = s["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "stuck")
        .unwrap()
        .clone();
    assert_eq!(v["restarts"], 3, "{v}");
    assert_eq!(s["heartbeats"]["restarts"], 4, "{s}");
    a.kill_all();
}
