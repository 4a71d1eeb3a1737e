//! The command line of the cluster: `rebound host serve` (the host agent), `rebound cluster
//! status`, and a VM joining its host's agent (`--host-root` on run, restore, recover).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rebound_cluster::agent::{Agent, AgentConfig, Hooks, Restart, Takeover};
use rebound_cluster::fence;
use rebound_cluster::host_root::{Failover, HostRoot, Member, Status};
use rebound_control::Instance;

use crate::Cli;

/// `rebound host ...`.
#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// Run this host's agent: heartbeats with its peers, the standbys of their VMs, takeovers.
    Serve(ServeArgs),
}

/// `rebound host serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// This host's name.
    #[arg(long)]
    name: String,
    /// Where to listen: heartbeats (UDP) and replication (TCP), host:port.
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// The host's cluster directory (on tmpfs: hot standbys keep guest memory there).
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// A peer host: NAME=HOST:PORT (repeat for each).
    #[arg(long = "peer", value_name = "NAME=HOST:PORT")]
    peers: Vec<String>,
    /// Heartbeat interval in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    heartbeat_ms: u64,
    /// A peer silent this long is dead (its VMs are taken over). Default: 5 heartbeats.
    #[arg(long, value_name = "MS")]
    dead_ms: Option<u64>,
    /// A guest whose heartbeat does not move this long (while it does not wait for work) is
    /// stalled: its VMM is killed and the VM fails over. Default: never.
    #[arg(long, value_name = "MS")]
    stall_ms: Option<u64>,
    /// Memory this host gives hot standbys, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    hot_budget_mib: u64,
    /// Where VM ownership locks are (every agent that may own a VM must see the same one),
    /// unless --etcd.
    #[arg(long, value_name = "DIR", default_value = "/dev/shm/rebound-owners")]
    lock_dir: PathBuf,
    /// Keep VM ownership in etcd (host:port or URL): leases instead of lock files; needed for
    /// hosts that share no filesystem.
    #[arg(long, value_name = "URL")]
    etcd: Option<String>,
    /// With --etcd: how long this host trusts its lease after sending the last keep-alive etcd
    /// answered; past that its VMs are stopped. A standby waits as long after revoking a dead
    /// host's lease. Default: --dead-ms.
    #[arg(long, value_name = "MS", requires = "etcd")]
    lease_grace_ms: Option<u64>,
    /// Checkpoint period of a VM taken over here.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    protect_ms: u64,
}

/// `rebound cluster ...`.
#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// The cluster as a host's agent sees it: hosts, VMs, owners, standbys, failovers (JSON).
    Status {
        /// The host's cluster directory.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// Prometheus text instead of JSON.
        #[arg(long)]
        metrics: bool,
    },
}

/// A VM joining its host's agent.
#[derive(Args, Debug, Default, Clone)]
pub struct MemberArgs {
    /// Join the host agent of this cluster directory: its liveness is watched, its standby
    /// placed on the host --standby names, and it is taken over there if this host fails.
    #[arg(long, value_name = "DIR")]
    pub host_root: Option<PathBuf>,
    /// With --host-root: how the VM survives its host (hot, cold or auto).
    #[arg(long, value_name = "METHOD", default_value = "auto", value_parser = parse_failover)]
    pub failover: Failover,
    /// With --host-root and --failover auto: the longest failover the VM accepts.
    #[arg(long, value_name = "MS")]
    pub max_failover_ms: Option<u64>,
    /// The host to place the standby on once the agent sees it alive (a VM taken over: its
    /// old host).
    #[arg(long, value_name = "HOST", hide = true)]
    pub standby_host: Option<String>,
}

fn parse_failover(s: &str) -> std::result::Result<Failover, String> {
    s.parse()
}

/// What joining gives the VMM before its VM starts: the ownership lock (held for the
/// process's life) and the standby's address and kind.
pub struct Joining {
    root: HostRoot,
    member: Member,
    heartbeat: Duration,
    _owner: Option<fence::Ownership>,
}

impl MemberArgs {
    /// Takes the VM's ownership lock and resolves its standby. `standby` is the --standby
    /// given (a host name of the cluster, or host:port); returns the address to replicate to
    /// now (None with a standby: none yet, the agent places it) and whether hot.
    pub fn join(
        &self,
        id: &str,
        standby: Option<&str>,
        api_sock: &Path,
        state_dir: Option<&Path>,
    ) -> Result<Option<(Joining, Option<String>, bool)>> {
        let Some(root) = &self.host_root else {
            return Ok(None);
        };
        let root = HostRoot::new(root)?;
        let config = root.config().with_context(|| {
            format!(
                "no host agent in {} (start `rebound host serve --root {}`)",
                root.path().display(),
                root.path().display()
            )
        })?;
        let owner = match &config.lock_dir {
            Some(dir) => Some(fence::own(dir, id)?),
            // Ownership is in etcd: the agent records it, and kills a VMM whose VM runs
            // elsewhere.
            None => None,
        };
        let host = self.standby_host.as_deref().or(standby);
        if let Some(h) = host
            && !config.peers.contains_key(h)
        {
            bail!(
                "--standby {h}: not a peer of host {} (peers: {})",
                config.name,
                config.peers.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        // The VM starts with no standby: the agent places one on `host` within a heartbeat
        // interval, hot or cold as planned (an initial checkpoint sent to a standby host that
        // is down or full would fail the start).
        let (addr, hot) = (None, false);
        let member = Member {
            name: id.to_string(),
            pid: std::process::id(),
            api_sock: Some(api_sock.to_path_buf()),
            standby: host.map(str::to_string),
            failover: self.failover,
            max_failover_ms: self.max_failover_ms,
            mem_size: 0,
            state_dir: state_dir.map(absolute),
        };
        Ok(Some((
            Joining {
                root,
                member,
                heartbeat: Duration::from_millis(config.heartbeat_ms.max(1)),
                _owner: owner,
            },
            addr,
            hot,
        )))
    }
}

/// `p` as an absolute path (the agent that uses it runs elsewhere).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The API socket a VM joining a host uses when none was given.
pub fn default_api_sock(root: &Path, id: &str) -> PathBuf {
    root.join("vms").join(format!("{id}.sock"))
}

impl MemberArgs {
    /// The VM's API socket: `given`, else its host's default if it joins one.
    pub fn api_sock(&self, id: &str, given: Option<&Path>) -> Option<PathBuf> {
        given
            .map(Path::to_path_buf)
            .or_else(|| self.host_root.as_ref().map(|r| default_api_sock(r, id)))
    }
}

/// Registers the started VM with the agent and keeps its status record current until it ends.
pub fn watch(joining: Joining, instance: &Arc<Instance>) -> Result<()> {
    let Joining {
        root,
        mut member,
        heartbeat,
        _owner,
    } = joining;
    let vm = instance.wait_started();
    let instance = Arc::clone(instance);
    member.mem_size = vm.descriptor().mem_size;
    let mut writer = root.join(&member)?;
    std::thread::Builder::new()
        .name("cluster-status".into())
        .spawn(move || {
            // The lock lives as long as this thread: the process's life.
            let _owner = _owner;
            loop {
                let p = vm.progress();
                // A VM stopped by a host fault (75) is handed over, not ended.
                let ended = vm.outcome().is_some_and(|o| o.exit_code() != 75);
                let (acked_epoch, held_bytes) = instance
                    .protection()
                    .map_or((0, 0), |(_, s)| (s.acked_epoch, s.output.held_bytes));
                let status = Status {
                    seq: 0,
                    beat: p.beat,
                    waiting: p.waiting,
                    ended,
                    acked_epoch,
                    held_bytes,
                };
                if let Err(e) = writer.write(status) {
                    tracing::warn!("cannot write the VM's status record: {e}");
                }
                if ended {
                    break;
                }
                std::thread::sleep(heartbeat);
            }
        })?;
    Ok(())
}

struct CliHooks {
    exe: PathBuf,
    root: PathBuf,
    log_level: String,
    protect_ms: u64,
}

impl CliHooks {
    /// Starts a VMM for VM `name` from `dir` (`how`: the subcommand and its directory flag),
    /// joined to this host, protected, its console into `out`.
    #[allow(clippy::too_many_arguments)]
    fn member_vmm(
        &self,
        name: &str,
        how: [&str; 2],
        dir: &Path,
        failover: Failover,
        standby_host: Option<&str>,
        max_failover_ms: Option<u64>,
        out: &Path,
    ) -> std::io::Result<Child> {
        let out = std::fs::File::create(out)?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--id")
            .arg(name)
            .arg("--log-level")
            .arg(&self.log_level)
            .arg("--api-sock")
            .arg(default_api_sock(&self.root, name))
            .args(how)
            .arg(dir)
            .arg("--protect-ms")
            .arg(self.protect_ms.to_string())
            .arg("--host-root")
            .arg(&self.root)
            .arg("--failover")
            .arg(failover.name());
        if let Some(h) = standby_host {
            cmd.arg("--standby-host").arg(h);
        }
        if let Some(ms) = max_failover_ms {
            cmd.arg("--max-failover-ms").arg(ms.to_string());
        }
        cmd.stdin(Stdio::null()).stdout(out).spawn()
    }
}

impl Hooks for CliHooks {
    fn take_over(&self, t: &Takeover) -> std::io::Result<Child> {
        let (verb, flag) = if t.hot {
            ("recover", "--state")
        } else {
            ("restore", "--dir")
        };
        self.member_vmm(
            &t.name,
            [verb, flag],
            &t.dir,
            t.failover,
            Some(&t.from),
            None,
            &t.out,
        )
    }

    fn restart(&self, r: &Restart) -> std::io::Result<Child> {
        self.member_vmm(
            &r.name,
            ["recover", "--state"],
            &r.state_dir,
            r.failover,
            r.standby.as_deref(),
            r.max_failover_ms,
            &r.out,
        )
    }

    fn move_standby(&self, api_sock: &Path, addr: Option<&str>, hot: bool) -> std::io::Result<()> {
        let body = serde_json::json!({"standby": addr, "standby_hot": hot});
        crate::client::call_within(
            api_sock,
            "PATCH",
            "/protection",
            Some(&body),
            Some(Duration::from_secs(1)),
        )
        .map(|_| ())
        .map_err(|e| std::io::Error::other(format!("{e:#}")))
    }
}

/// `rebound host serve`.
pub fn serve(cli: &Cli, a: ServeArgs) -> Result<i32> {
    let listen = std::net::ToSocketAddrs::to_socket_addrs(&a.listen)
        .with_context(|| format!("--listen {}", a.listen))?
        .next()
        .with_context(|| format!("--listen {} names no address", a.listen))?;
    let mut peers = BTreeMap::new();
    for p in &a.peers {
        let (n, addr) = p
            .split_once('=')
            .with_context(|| format!("--peer {p}: expected NAME=HOST:PORT"))?;
        if n == a.name {
            bail!("--peer {p}: that is this host");
        }
        peers.insert(n.to_string(), addr.to_string());
    }
    if a.heartbeat_ms == 0 {
        bail!("--heartbeat-ms must be at least 1");
    }
    let dead_ms = a.dead_ms.unwrap_or(5 * a.heartbeat_ms);
    if dead_ms <= a.heartbeat_ms {
        bail!(
            "--dead-ms ({dead_ms}) must exceed --heartbeat-ms ({})",
            a.heartbeat_ms
        );
    }
    let config = AgentConfig {
        name: a.name.clone(),
        listen,
        peers,
        heartbeat: Duration::from_millis(a.heartbeat_ms),
        dead_after: Duration::from_millis(dead_ms),
        stall_after: a.stall_ms.map(Duration::from_millis),
        hot_budget: a.hot_budget_mib << 20,
        root: a.root.clone(),
    };
    let fence: Box<dyn rebound_cluster::fence::Fence> = match &a.etcd {
        Some(url) => Box::new(
            rebound_cluster::lease::Etcd::connect(
                url,
                &a.name,
                Duration::from_millis(a.heartbeat_ms),
                Duration::from_millis(a.lease_grace_ms.unwrap_or(dead_ms)),
            )
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("--etcd {url}"))?,
        ),
        None => Box::new(rebound_cluster::fence::Locks::new(&a.lock_dir)),
    };
    let hooks = CliHooks {
        exe: std::env::current_exe()?,
        root: a.root.clone(),
        log_level: cli.log_level.clone(),
        protect_ms: a.protect_ms,
    };
    let agent = Agent::new(config, fence, Box::new(hooks))?;
    eprintln!(
        "rebound: host {} serving on {listen} (cluster directory {})",
        a.name,
        a.root.display()
    );
    agent.run()?;
    Ok(0)
}

/// `rebound cluster status`.
pub fn status(root: &Path, metrics: bool) -> Result<i32> {
    let sock = HostRoot::new(root)?.socket();
    let mut s = UnixStream::connect(&sock)
        .with_context(|| format!("no host agent answers at {}", sock.display()))?;
    s.write_all(if metrics { b"metrics\n" } else { b"status\n" })?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    print!("{out}");
    Ok(0)
}
