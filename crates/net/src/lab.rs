//! Network namespaces for tests and benchmarks: a namespace deleted when dropped, commands and
//! threads inside it, and the two-path topology NIC failover is exercised on. Needs root and
//! iproute2; traffic stays inside the namespaces made here.

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// Runs `ip ARGS`; the error says what failed.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether this process may create network namespaces and TAP devices.
pub fn available() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::path::Path::new("/dev/net/tun").exists()
        && Command::new("ip")
            .args(["netns", "list"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// A network namespace, deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    /// A new namespace named after `tag` and this process (replacing a stale one).
    pub fn new(tag: &str) -> Result<Netns, String> {
        let name = format!("rb{tag}{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name])?;
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        let mut a = vec!["-n", &self.0];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    /// Runs `f` on a thread that lives in the namespace (its sockets are the namespace's).
    pub fn on_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("the namespace");
            // SAFETY: setns on a descriptor we own; it changes only this thread's namespace.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Two host paths from a VMM's namespace to a peer's: per path a TAP (`tapa`, `tapb`) in a
/// bridge with one end of a veth pair (`vetha0`, `vethb0`) whose other end is in the peer's
/// bridge; the peer is 10.78.0.1/24 and answers the paths' ARP probes.
pub struct TwoPaths {
    /// Where the VMM runs.
    pub vmm: Netns,
    /// The peer (clients, the probe target).
    pub peer: Netns,
}

/// The peer's address in [`TwoPaths`].
pub const PEER: [u8; 4] = [10, 78, 0, 1];

impl TwoPaths {
    /// Builds the topology.
    pub fn new() -> Result<TwoPaths, String> {
        let vmm = Netns::new("v")?;
        let peer = Netns::new("p")?;
        peer.ip(&["link", "add", "brp", "type", "bridge"])?;
        peer.ip(&["addr", "add", "10.78.0.1/24", "dev", "brp"])?;
        peer.ip(&["link", "set", "brp", "up"])?;
        for p in ["a", "b"] {
            let (tap, br, v0, v1) = (
                format!("tap{p}"),
                format!("br{p}"),
                format!("veth{p}0"),
                format!("veth{p}1"),
            );
            vmm.ip(&["link", "add", &br, "type", "bridge"])?;
            vmm.ip(&["link", "set", &br, "up"])?;
            vmm.ip(&["tuntap", "add", &tap, "mode", "tap"])?;
            vmm.ip(&["link", "set", &tap, "master", &br])?;
            vmm.ip(&["link", "set", &tap, "up"])?;
            vmm.ip(&[
                "link", "add", &v0, "type", "veth", "peer", "name", &v1, "netns", &peer.0,
            ])?;
            vmm.ip(&["link", "set", &v0, "master", &br])?;
            vmm.ip(&["link", "set", &v0, "up"])?;
            peer.ip(&["link", "set", &v1, "master", "brp"])?;
            peer.ip(&["link", "set", &v1, "up"])?;
        }
        Ok(TwoPaths { vmm, peer })
    }

    /// The network interface that uses both paths (JSON for the API or a config file).
    pub fn interface() -> serde_json::Value {
        serde_json::json!({"iface_id": "eth0", "paths": [
            {"host_dev_name": "tapa", "monitor_link": "vetha0", "probe_ip": "10.78.0.1"},
            {"host_dev_name": "tapb", "monitor_link": "vethb0", "probe_ip": "10.78.0.1"},
        ]})
    }
}
