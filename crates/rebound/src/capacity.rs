//! `rebound capacity`: a VM's capacity figures and clone snapshots through its API socket, and
//! the capacity manager over several VMMs: saturated VMs cloned into new VMMs, the clones given
//! CPU share lent by idle VMs, retired when load falls.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rebound_capacity::cgroup::Hierarchy;
use rebound_capacity::manager::{Event, Fleet, Manager, MemberSpec, QueueRef, Spawned, Usage};
use rebound_capacity::policy::Policy;
use rebound_capacity::{Error as CapError, Result as CapResult};

use crate::client;

/// `rebound capacity ...`.
#[derive(Subcommand, Debug)]
pub enum CapacityCommand {
    /// Show a VM's capacity figures: its VMM's process id, vCPU run time, clone points and
    /// clone snapshots taken (through its API socket).
    Show,
    /// Write a snapshot at the guest's next clone point (ABI 1.9), to restore as a clone for
    /// capacity (`rebound restore PATH`, or `PUT /snapshot/load` in a new VMM).
    Clone {
        /// Where to write it.
        path: PathBuf,
        /// How long the guest has to reach its clone point, in milliseconds (default 1000).
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u64>,
    },
    /// Run the capacity manager over VMMs' API sockets: clone a saturated VM (busy vCPUs and
    /// a deep work queue) into a new VMM, lend the clone CPU share from idle VMs through
    /// cgroups, retire it once the queue stays empty, give the shares back. Prints one JSON
    /// event per line; SIGTERM or SIGINT retires the clones and removes the cgroups.
    Manage(ManageArgs),
}

/// `rebound capacity manage`.
#[derive(Args, Debug)]
pub struct ManageArgs {
    /// A VM to watch: NAME=SOCK (its API socket).
    #[arg(long = "vm", value_name = "NAME=SOCK", required = true)]
    vms: Vec<String>,
    /// The work queue a VM takes jobs from: NAME=REGION@OFFSET (a shared region's name in
    /// $REBOUND_SHARE_DIR, or its file's path, and the queue's offset in its data area). Only
    /// VMs with a queue are cloned.
    #[arg(long = "queue", value_name = "NAME=REGION@OFFSET")]
    queues: Vec<String>,
    /// Where clone snapshots, clone VMMs' sockets and their console logs go.
    #[arg(long, value_name = "DIR")]
    clone_dir: PathBuf,
    /// Time between ticks, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    interval_ms: u64,
    /// Stop after this many milliseconds (default: until SIGTERM or SIGINT).
    #[arg(long, value_name = "MS")]
    duration_ms: Option<u64>,
    /// The CPU share every VM starts with (cgroup v1 units; converted to cpu.weight on v2).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    shares: u64,
    /// vCPU run time per tick (0..1) at or above which a VM is busy.
    #[arg(long, default_value_t = Policy::default().busy_util)]
    busy_util: f64,
    /// Queue depth at or above which a VM is busy.
    #[arg(long, default_value_t = Policy::default().busy_depth)]
    busy_depth: u64,
    /// Busy ticks in a row before a VM is cloned.
    #[arg(long, default_value_t = Policy::default().busy_ticks)]
    busy_ticks: u32,
    /// vCPU run time at or below which a VM lends share.
    #[arg(long, default_value_t = Policy::default().idle_util)]
    idle_util: f64,
    /// Ticks with an empty queue before a clone retires.
    #[arg(long, default_value_t = Policy::default().calm_ticks)]
    calm_ticks: u32,
    /// Percent of its share an idle VM lends.
    #[arg(long, default_value_t = Policy::default().lend_percent)]
    lend_percent: u64,
    /// Share a lender keeps at least.
    #[arg(long, default_value_t = Policy::default().min_shares)]
    min_shares: u64,
    /// Clones per VM at once.
    #[arg(long, default_value_t = Policy::default().max_clones)]
    max_clones: usize,
    /// The manager's parent cgroup (default rebound-capacity-<pid>).
    #[arg(long, value_name = "NAME")]
    cgroup: Option<String>,
}

/// Runs a `capacity` command.
pub fn command(sock: Option<&Path>, cmd: CapacityCommand) -> Result<i32> {
    match cmd {
        CapacityCommand::Show => {
            let sock = crate::need_sock(sock)?;
            println!("{}", client::call(sock, "GET", "/capacity", None)?);
            Ok(0)
        }
        CapacityCommand::Clone { path, timeout_ms } => {
            let sock = crate::need_sock(sock)?;
            let mut body = serde_json::json!({ "snapshot_path": path });
            if let Some(ms) = timeout_ms {
                body["timeout_ms"] = ms.into();
            }
            println!(
                "{}",
                client::call(sock, "PUT", "/capacity/clone", Some(&body))?
            );
            Ok(0)
        }
        CapacityCommand::Manage(args) => manage(&args),
    }
}

const TIMEOUT: Duration = Duration::from_secs(5);
/// A clone has this long to finish its job and exit once asked to shut down.
const RETIRE_GRACE: Duration = Duration::from_secs(10);

fn split_pair<'a>(s: &'a str, what: &str) -> Result<(&'a str, &'a str)> {
    s.split_once('=')
        .filter(|(n, v)| !n.is_empty() && !v.is_empty())
        .with_context(|| format!("{what} {s:?}: expected NAME=VALUE"))
}

/// `NAME=REGION@OFFSET` as a queue reference.
fn parse_queue(s: &str) -> Result<(String, QueueRef)> {
    let (name, rest) = split_pair(s, "--queue")?;
    let (region, offset) = rest
        .rsplit_once('@')
        .with_context(|| format!("--queue {s:?}: expected NAME=REGION@OFFSET"))?;
    let offset: u64 = offset
        .parse()
        .with_context(|| format!("--queue {s:?}: the offset is not a number"))?;
    let region_file = if region.contains('/') {
        PathBuf::from(region)
    } else {
        std::env::var_os("REBOUND_SHARE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/dev/shm/rebound-shared"))
            .join(region)
    };
    Ok((
        name.to_string(),
        QueueRef {
            region_file,
            offset,
        },
    ))
}

/// A VMM started for a clone: its process, socket, snapshot and console log.
struct CloneVmm {
    child: Child,
    sock: PathBuf,
    snapshot: Option<PathBuf>,
    log: PathBuf,
}

/// VMMs reached through their API sockets; clones run in VMMs this process starts (one is
/// kept started ahead, so a clone does not wait for a process to start).
struct ApiFleet {
    socks: HashMap<String, PathBuf>,
    clones: HashMap<String, CloneVmm>,
    spare: Option<CloneVmm>,
    dir: PathBuf,
    spares: u64,
}

fn member_err(member: &str, e: impl std::fmt::Display) -> CapError {
    CapError::Member {
        member: member.to_string(),
        reason: e.to_string(),
    }
}

impl ApiFleet {
    fn sock(&self, vm: &str) -> CapResult<&Path> {
        self.socks
            .get(vm)
            .or_else(|| self.clones.get(vm).map(|c| &c.sock))
            .map(PathBuf::as_path)
            .ok_or_else(|| member_err(vm, "no such VM"))
    }

    /// Starts a VMM that serves its API and waits for a snapshot to load.
    fn start_spare(&mut self) -> Result<CloneVmm> {
        self.spares += 1;
        let n = self.spares;
        let sock = self.dir.join(format!("spare{n}.sock"));
        let log = self.dir.join(format!("spare{n}.log"));
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let exe = std::env::current_exe().context("cannot find the rebound binary")?;
        let child = Command::new(exe)
            .arg("--id")
            .arg(format!("spare{n}"))
            .arg("--api-sock")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("cannot start a VMM for a clone")?;
        Ok(CloneVmm {
            child,
            sock,
            snapshot: None,
            log,
        })
    }

    /// Waits until a started VMM answers on its socket.
    fn wait_ready(c: &mut CloneVmm) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = c.child.try_wait()? {
                bail!("the clone's VMM exited ({status}); see {}", c.log.display());
            }
            if client::call_within(&c.sock, "GET", "/", None, Some(TIMEOUT)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the clone's VMM did not serve its API within {TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn take_spare(&mut self) -> Result<CloneVmm> {
        let mut c = match self.spare.take() {
            Some(c) => c,
            None => self.start_spare()?,
        };
        Self::wait_ready(&mut c)?;
        Ok(c)
    }

    fn stop(c: &mut CloneVmm) {
        let _ = c.child.kill();
        let _ = c.child.wait();
        let _ = std::fs::remove_file(&c.sock);
        if let Some(s) = &c.snapshot {
            let _ = std::fs::remove_file(s);
        }
    }
}

impl Drop for ApiFleet {
    fn drop(&mut self) {
        if let Some(mut s) = self.spare.take() {
            Self::stop(&mut s);
            let _ = std::fs::remove_file(&s.log);
        }
        for c in self.clones.values_mut() {
            Self::stop(c);
        }
    }
}

fn json_u64(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

impl Fleet for ApiFleet {
    fn usage(&mut self, vm: &str) -> CapResult<Usage> {
        let sock = self.sock(vm)?;
        let body = client::call_within(sock, "GET", "/capacity", None, Some(TIMEOUT))
            .map_err(|e| member_err(vm, format!("{e:#}")))?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| member_err(vm, e))?;
        let pid = json_u64(&v, "pid");
        if pid == 0 || pid > u64::from(u32::MAX) {
            return Err(member_err(vm, "its API gave no process id"));
        }
        Ok(Usage {
            pid: pid as u32,
            vcpu_time_ns: json_u64(&v, "vcpu_time_ns"),
            vcpus: json_u64(&v, "vcpus") as u32,
        })
    }

    fn clone_vm(&mut self, parent: &str, clone: &str) -> CapResult<Spawned> {
        let psock = self.sock(parent)?.to_path_buf();
        let snapshot = self.dir.join(format!("{clone}.snap"));
        let body = serde_json::json!({ "snapshot_path": snapshot });
        let info =
            client::call_within(&psock, "PUT", "/capacity/clone", Some(&body), Some(TIMEOUT))
                .map_err(|e| member_err(parent, format!("{e:#}")))?;
        let info: serde_json::Value =
            serde_json::from_str(&info).map_err(|e| member_err(parent, e))?;
        let mut c = self
            .take_spare()
            .map_err(|e| member_err(clone, format!("{e:#}")))?;
        c.snapshot = Some(snapshot.clone());
        let t0 = Instant::now();
        let load = serde_json::json!({ "snapshot_path": snapshot, "resume_vm": true });
        if let Err(e) =
            client::call_within(&c.sock, "PUT", "/snapshot/load", Some(&load), Some(TIMEOUT))
        {
            Self::stop(&mut c);
            return Err(member_err(clone, format!("{e:#}")));
        }
        let restore_us = t0.elapsed().as_micros() as u64;
        // The log is the clone's now (the process keeps writing to the renamed file).
        let log = self.dir.join(format!("{clone}.log"));
        if std::fs::rename(&c.log, &log).is_ok() {
            c.log = log;
        }
        let pid = c.child.id();
        self.clones.insert(clone.to_string(), c);
        // The next clone's VMM starts now, off the clone's critical path.
        match self.start_spare() {
            Ok(s) => self.spare = Some(s),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot start a spare VMM"),
        }
        Ok(Spawned {
            pid,
            reached_us: json_u64(&info, "reached_us"),
            snapshot_us: json_u64(&info, "total_us"),
            restore_us,
        })
    }

    fn retire(&mut self, clone: &str) -> CapResult<()> {
        let mut c = self
            .clones
            .remove(clone)
            .ok_or_else(|| member_err(clone, "no such clone"))?;
        let asked = client::call_within(
            &c.sock,
            "PUT",
            "/actions",
            Some(&serde_json::json!({ "action_type": "SendCtrlAltDel" })),
            Some(TIMEOUT),
        );
        let deadline = Instant::now() + RETIRE_GRACE;
        let exited = loop {
            match c.child.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) if Instant::now() < deadline && asked.is_ok() => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                _ => break false,
            }
        };
        Self::stop(&mut c);
        if exited {
            Ok(())
        } else {
            Err(member_err(
                clone,
                match asked {
                    Err(e) => format!("could not ask it to shut down ({e:#}); stopped"),
                    Ok(_) => format!("did not exit within {RETIRE_GRACE:?}; stopped"),
                },
            ))
        }
    }
}

fn manage(args: &ManageArgs) -> Result<i32> {
    let mut socks = HashMap::new();
    let mut specs = Vec::new();
    let mut queues: HashMap<String, QueueRef> = HashMap::new();
    for q in &args.queues {
        let (name, q) = parse_queue(q)?;
        queues.insert(name, q);
    }
    for v in &args.vms {
        let (name, sock) = split_pair(v, "--vm")?;
        if socks
            .insert(name.to_string(), PathBuf::from(sock))
            .is_some()
        {
            bail!("--vm {name}: given twice");
        }
        specs.push(MemberSpec {
            name: name.to_string(),
            queue: queues.remove(name),
        });
    }
    if let Some(name) = queues.keys().next() {
        bail!("--queue {name}: no --vm of that name");
    }
    std::fs::create_dir_all(&args.clone_dir)
        .with_context(|| format!("cannot create {}", args.clone_dir.display()))?;
    let policy = Policy {
        busy_util: args.busy_util,
        busy_depth: args.busy_depth,
        busy_ticks: args.busy_ticks,
        idle_util: args.idle_util,
        calm_ticks: args.calm_ticks,
        lend_percent: args.lend_percent,
        min_shares: args.min_shares,
        max_clones: args.max_clones,
    };
    let mut fleet = ApiFleet {
        socks,
        clones: HashMap::new(),
        spare: None,
        dir: args.clone_dir.clone(),
        spares: 0,
    };
    fleet.spare = Some(fleet.start_spare()?);
    let cgroups = Hierarchy::detect()?;
    let group = args
        .cgroup
        .clone()
        .unwrap_or_else(|| format!("rebound-capacity-{}", std::process::id()));
    let mut print = |e: &Event| {
        if let Ok(line) = serde_json::to_string(e) {
            println!("{line}");
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        crate::signals::set_action(move |_| stop.store(true, Ordering::SeqCst));
    }
    let mut manager = Manager::new(
        fleet,
        policy,
        specs,
        cgroups,
        &group,
        args.shares,
        &mut print,
    )?;
    let t0 = Instant::now();
    let until = args.duration_ms.map(Duration::from_millis);
    manager.run(
        Duration::from_millis(args.interval_ms.max(1)),
        || stop.load(Ordering::SeqCst) || until.is_some_and(|d| t0.elapsed() >= d),
        &mut print,
    );
    manager.finish(&mut print)?;
    println!("{}", serde_json::json!({ "event": "stopped" }));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_parse_names_paths_and_offsets() {
        let (n, q) = parse_queue("w=/dev/shm/x/jobs@4096").unwrap();
        assert_eq!(n, "w");
        assert_eq!(q.region_file, PathBuf::from("/dev/shm/x/jobs"));
        assert_eq!(q.offset, 4096);
        assert!(parse_queue("w=jobs").is_err());
        assert!(parse_queue("w=jobs@x").is_err());
        assert!(parse_queue("=jobs@1").is_err());
    }
}
