//! `rebound`: run a guest, or serve the control API (Firecracker style) and run what it
//! configures.
//!
//! Guest console output goes to stdout; Rebound's own messages go to stderr. The exit code is
//! the guest's exit status, 101 if the guest panicked, 139 if it faulted, 75 if a host fault
//! stopped it, 1 if Rebound itself failed and 2 for bad arguments.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use rebound_checkpoint::StrategyKind;
use rebound_control::host_faults::{self, HostFaults, Placement, RecoveryAttribute};
use rebound_control::{Instance, MachineConfig, Protection};
use rebound_vmm::share::{ShareConfig, ShareDir};
use rebound_vmm::{DiskConfig, GuestImage};

mod api_sock;
mod capacity;
mod client;
mod cluster;
mod firecracker;
mod logging;
mod memory;
mod scaffold;
mod signals;
mod survive;

/// Rebound: a micro-VM monitor whose VMs survive failures.
///
/// With no arguments, runs the bundled demo guest. `rebound run GUEST.elf` runs a guest
/// program built with the Rebound guest SDK; `rebound --api-sock PATH` serves the control API
/// and waits to be configured, as Firecracker does.
#[derive(Parser, Debug)]
#[command(name = "rebound", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// The control API's Unix socket. With `run`, `restore`, `recover`: also serve the API
    /// there; alone (`rebound --api-sock PATH`): serve it and wait for PUT /actions
    /// InstanceStart. With `checkpoint`, `rollback`, `update`, `snapshot create`, `share
    /// attach|detach`: the socket of the running VMM to talk to.
    #[arg(long, value_name = "PATH", global = true)]
    api_sock: Option<PathBuf>,

    /// Instance id reported by GET /.
    #[arg(long, default_value = "rebound", global = true)]
    id: String,

    /// Log level for Rebound's own messages on stderr (error, warn, info, debug, trace);
    /// RUST_LOG overrides it.
    #[arg(long, default_value = "warn", global = true)]
    log_level: String,

    #[command(flatten)]
    fc: firecracker::FirecrackerArgs,
}

static HOOKS: std::sync::OnceLock<rebound_api::Hooks> = std::sync::OnceLock::new();

/// The API's process-level hooks: the log and the metrics destination.
pub(crate) fn hooks() -> &'static rebound_api::Hooks {
    HOOKS.get_or_init(rebound_api::Hooks::default)
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a guest until it exits (default: the bundled demo).
    Run(Box<RunArgs>),
    /// Restore a VM from snapshots in this (new) process and run it until it exits.
    Restore(RestoreArgs),
    /// Snapshot tools: take a snapshot of a running VM, merge a chain.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Take a checkpoint of a protected VM now (through its API socket).
    Checkpoint,
    /// Roll a protected VM back to its last checkpoint, or to an earlier one kept in its
    /// snapshot directory (through its API socket).
    Rollback {
        /// The checkpoint (epoch) to go back to; default: the last.
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Take over a VM from its state directory after the process running it died (resumes
    /// it from its last committed checkpoint) and run it until it exits.
    Recover(RecoverArgs),
    /// Live update: hand a running VM (one with --state) to a new Rebound binary, without
    /// copying its memory (through its API socket).
    Update {
        /// The new binary (default: the one the running VMM was started from).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Fault injection for tests and operators.
    #[command(subcommand)]
    Fault(FaultCommand),
    /// A VM's memory target, and the host memory manager over several VMs.
    #[command(subcommand)]
    Memory(memory::MemoryCommand),
    /// Cloning for capacity: a VM's clone snapshots, and the manager that clones saturated VMs
    /// and lends their clones CPU share from idle ones.
    #[command(subcommand)]
    Capacity(capacity::CapacityCommand),
    /// Shared memory regions between VMs (in $REBOUND_SHARE_DIR, default
    /// /dev/shm/rebound-shared).
    #[command(subcommand)]
    Share(ShareCommand),
    /// List the guests bundled in this binary, with what their --args take.
    Guests,
    /// Create a guest crate (a program for Rebound VMs, on the guest SDK) from a template.
    New(scaffold::NewArgs),
    /// The host agent (one per host): heartbeats, standbys of its peers' VMs, takeovers.
    #[command(subcommand)]
    Host(cluster::HostCommand),
    /// The cluster as seen from a host's agent.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Be the standby of protected VMs (`run --standby`): receive their checkpoints, verify
    /// each, keep them in a snapshot directory (restore with `rebound restore --dir`).
    Standby {
        /// Address to listen on (host:port).
        #[arg(long, value_name = "HOST:PORT")]
        listen: String,
        /// Where the checkpoints are kept.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Take the VM over (build it from DIR and run it here) when its primary is lost: its
        /// connection ends without a goodbye, or nothing arrives for MS milliseconds (more
        /// than the primary's checkpoint interval).
        #[arg(long, value_name = "MS")]
        takeover_ms: Option<u64>,
        /// Keep the VM hot: its memory applied in place in DIR (a state directory, on tmpfs),
        /// taken over with `rebound recover --state DIR`.
        #[arg(long)]
        hot: bool,
        /// Once taken over, protect the VM (and replicate it on with --standby).
        #[command(flatten)]
        protect: ProtectArgs,
    },
}

#[derive(Subcommand, Debug)]
enum ShareCommand {
    /// Create a region.
    Create {
        /// Its name (letters, digits, '_', '.', '-').
        name: String,
        /// Size in MiB (a multiple of 2).
        #[arg(long, value_name = "MIB", default_value_t = 4)]
        size_mib: u64,
    },
    /// List regions and the VMs attached to them (JSON).
    List,
    /// Remove a region (refused while a live VM is attached, unless --force).
    Remove {
        /// The region.
        name: String,
        /// Remove it even if VMs are attached (they keep their mapping).
        #[arg(long)]
        force: bool,
    },
    /// Attach a region to a running VM (through its --api-sock).
    Attach {
        /// The region.
        name: String,
        /// The VM may only read it.
        #[arg(long)]
        read_only: bool,
    },
    /// Detach a region from a running VM (through its --api-sock).
    Detach {
        /// The region.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum FaultCommand {
    /// Mark a host CPU failed for every Rebound process on this host (their VMs on it are
    /// treated as their recovery attribute says), or repaired with --repair.
    Cpu {
        /// The host CPU.
        cpu: usize,
        /// Mark it healthy again.
        #[arg(long)]
        repair: bool,
    },
}

/// Where the vCPUs run and what happens when a host CPU under them fails.
#[derive(Args, Debug, Default, Clone)]
pub(crate) struct PlacementArgs {
    /// Host CPUs for the vCPUs (vCPU i on the i-th, round robin), e.g. 0,1. Default: anywhere.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    cpus: Vec<usize>,
    /// What to do when a host CPU under the VM fails: resume, restart_from_checkpoint, stop
    /// (failover is not available yet).
    #[arg(long, value_name = "ATTR", default_value = "resume", value_parser = parse_recovery)]
    recovery: RecoveryAttribute,
    /// Where `stop` saves the VM (a snapshot file; default: in the state directory).
    #[arg(long, value_name = "PATH")]
    save_area: Option<PathBuf>,
}

fn parse_recovery(s: &str) -> std::result::Result<RecoveryAttribute, String> {
    RecoveryAttribute::ALL
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| {
            format!(
                "unknown recovery attribute (choose: {})",
                RecoveryAttribute::ALL.map(|k| k.name()).join(", ")
            )
        })
}

impl PlacementArgs {
    pub(crate) fn placement(&self) -> Placement {
        Placement {
            cpus: self.cpus.clone(),
            recovery: self.recovery,
            save_area: self.save_area.clone(),
        }
    }

    /// Sets the placement and watches the host's CPU faults for `instance`.
    pub(crate) fn apply(&self, instance: &Arc<Instance>) -> Result<()> {
        instance.set_placement(self.placement())?;
        host_faults::watch(instance, HostFaults::from_env())?;
        Ok(())
    }
}

#[derive(Args, Debug)]
struct RecoverArgs {
    /// The VM's state directory.
    #[arg(long, value_name = "DIR")]
    state: PathBuf,
    /// The disk image to attach, if the VM had one outside its state directory.
    #[arg(long, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// The disk's mirror, if it had one: attached again and resynced from the disk.
    #[arg(long, value_name = "PATH", requires = "disk")]
    disk_mirror: Option<PathBuf>,
    /// Checkpoint period in milliseconds (5-10000) once recovered.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    protect_ms: u64,
    /// Keep the VM paused once recovered (resume it through the API).
    #[arg(long)]
    paused: bool,
    /// Print the VM's metrics as JSON on stderr when it ends.
    #[arg(long)]
    metrics: bool,
    /// Restart the VMM (recovering the VM) whenever it dies.
    #[arg(long)]
    supervise: bool,
    #[command(flatten)]
    placement: PlacementArgs,
    #[command(flatten)]
    member: cluster::MemberArgs,
    /// Live update hand-over: CLOCK_MONOTONIC (ns) when the old process paused the guest.
    #[arg(long, value_name = "NS", hide = true)]
    update_paused_at: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Snapshot a running VM through its API socket (--api-sock).
    Create {
        /// Snapshot file to write.
        #[arg(long, value_name = "PATH")]
        path: PathBuf,
        /// Only the pages written since this VM's previous snapshot.
        #[arg(long)]
        diff: bool,
        /// Also save a file-backed disk's contents (`PATH.disk`); scratch disks always are.
        #[arg(long)]
        with_disk: bool,
    },
    /// Merge a chain (a full snapshot, then its diffs in order) into one full snapshot.
    Merge {
        /// The merged snapshot to write.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
        /// The chain, oldest first.
        #[arg(required = true, value_name = "SNAPSHOT")]
        chain: Vec<PathBuf>,
    },
}

#[derive(Args, Debug)]
// One of the two is needed; a group so that the error for neither names both.
#[command(group(clap::ArgGroup::new("source").required(true).args(["chain", "dir"])))]
struct RestoreArgs {
    /// A full snapshot, then diffs of it in order.
    #[arg(value_name = "SNAPSHOT")]
    chain: Vec<PathBuf>,
    /// Restore the newest chain of a snapshot directory (written by --snapshot-dir).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The disk image to attach, if the VM had one (a snapshot does not choose host files).
    #[arg(long, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// What the guest's GENERATION hypercall returns (default: a new value).
    #[arg(long, value_name = "N")]
    generation: Option<u64>,
    /// Print the VM's metrics as JSON on stderr when it ends.
    #[arg(long)]
    metrics: bool,
    #[command(flatten)]
    protect: ProtectArgs,
    #[command(flatten)]
    placement: PlacementArgs,
    #[command(flatten)]
    member: cluster::MemberArgs,
}

#[derive(Args, Debug, Default)]
pub(crate) struct ProtectArgs {
    /// Run protected: take a checkpoint every this many milliseconds (5-10000).
    #[arg(long, value_name = "MS")]
    protect_ms: Option<u64>,
    /// Capture strategy when protected [default: double_buffered; pre_image with --state].
    #[arg(long, value_name = "STRATEGY", value_parser = parse_strategy)]
    strategy: Option<StrategyKind>,
    /// When protected, also write every checkpoint to this snapshot directory.
    #[arg(long, value_name = "DIR", requires = "protect_ms")]
    snapshot_dir: Option<PathBuf>,
    /// When protected, replicate every checkpoint to the standby at HOST:PORT (`rebound
    /// standby`); output is released only once the standby stored its checkpoint.
    #[arg(long, value_name = "HOST:PORT", requires = "protect_ms")]
    standby: Option<String>,
    /// Ask the standby to keep the VM hot (memory applied in place, failover resumes it)
    /// rather than cold (the checkpoint chain).
    #[arg(long, requires = "standby")]
    hot_standby: bool,
}

fn parse_strategy(s: &str) -> std::result::Result<StrategyKind, String> {
    StrategyKind::ALL
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| {
            format!(
                "unknown strategy (choose: {})",
                StrategyKind::ALL.map(|k| k.name()).join(", ")
            )
        })
}

impl ProtectArgs {
    fn protection(&self) -> Option<Protection> {
        self.protect_ms.map(|ms| Protection {
            interval_ms: Some(ms),
            strategy: self.strategy.unwrap_or(StrategyKind::DoubleBuffered),
            snapshot_dir: self.snapshot_dir.clone(),
            max_chain: 16,
            standby: self.standby.clone(),
            standby_hot: self.hot_standby,
        })
    }

    /// Protection for a VM in a state directory (pre-image, every 50 ms unless told).
    fn preserved(&self) -> Protection {
        let mut p = rebound_control::default_protection();
        if let Some(ms) = self.protect_ms {
            p.interval_ms = Some(ms);
        }
        if let Some(s) = self.strategy {
            p.strategy = s;
        }
        p.snapshot_dir = self.snapshot_dir.clone();
        p.standby = self.standby.clone();
        p.standby_hot = self.hot_standby;
        p
    }
}

#[derive(Args, Debug, Default)]
struct RunArgs {
    /// Guest ELF to run (built with the Rebound guest SDK). Default: the bundled demo.
    #[arg(value_name = "GUEST")]
    guest: Option<PathBuf>,

    /// Run a bundled guest instead of a file (see `rebound guests`).
    #[arg(long, value_name = "NAME", conflicts_with = "guest")]
    bundled: Option<String>,

    /// Guest memory in MiB (a multiple of 2, at least 8).
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    mem_mib: u64,

    /// Number of vCPUs (1-32).
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,

    /// The guest's command line.
    #[arg(
        long,
        value_name = "ARGS",
        default_value = "",
        allow_hyphen_values = true
    )]
    args: String,

    /// Disk image served through the guest's I/O ring.
    #[arg(long, value_name = "PATH", conflicts_with = "scratch_disk_mib")]
    disk: Option<PathBuf>,

    /// Refuse guest writes to --disk.
    #[arg(long, requires = "disk")]
    disk_read_only: bool,

    /// A mirror of --disk (e.g. on another file system; created if missing): every write goes
    /// to both, and if one fails the other serves the guest with no failed request.
    #[arg(
        long,
        value_name = "PATH",
        requires = "disk",
        conflicts_with = "disk_read_only"
    )]
    disk_mirror: Option<PathBuf>,

    /// An anonymous zero-filled disk of this size instead of --disk (the demo gets 16 MiB).
    #[arg(long, value_name = "MIB")]
    scratch_disk_mib: Option<u64>,

    /// Print the VM's metrics as JSON on stderr when it ends.
    #[arg(long)]
    metrics: bool,

    /// Keep the VM in this state directory (on tmpfs, e.g. under /dev/shm): it survives a
    /// crash of this process (`rebound recover --state DIR`) and can be live-updated. Runs
    /// protected (pre_image, every 50 ms unless --protect-ms says otherwise).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,

    /// With --state: restart the VMM (recovering the VM) whenever it dies.
    #[arg(long, requires = "state")]
    supervise: bool,

    /// Attach a shared region: NAME (read-write) or NAME:ro (read-only). Repeatable.
    #[arg(long = "share", value_name = "NAME[:ro]")]
    shares: Vec<String>,

    /// Give the guest a network interface (eth0) through the user-mode backend (passt) and
    /// make guest port GUEST_PORT reachable at ADDR:HOST_PORT on the host (ADDR defaults to
    /// 127.0.0.1, GUEST_PORT to HOST_PORT). Repeatable. The guest is 10.0.2.15/24, gateway
    /// 10.0.2.2 (the host's loopback, seen from the guest).
    #[arg(long = "publish", value_name = "[ADDR:]HOST_PORT[:GUEST_PORT]")]
    publish: Vec<String>,

    /// Give the guest a network interface (eth0) on this TAP device (created beforehand,
    /// e.g. `ip tuntap add tap0 mode tap`).
    #[arg(long, value_name = "NAME", conflicts_with = "publish")]
    tap: Option<String>,

    /// The network interface's MAC address (default 02:00:00:00:00:01).
    #[arg(long, value_name = "MAC")]
    mac: Option<String>,

    /// The VM's identity (what its persistent cache belongs to).
    #[arg(long, value_name = "ID")]
    identity: Option<String>,

    /// A persistent cache for the identity: NAME:MIB. Created on first use, kept when the VM
    /// ends, attached again when a VM with the same identity (and guest image) starts.
    #[arg(long, value_name = "NAME:MIB", requires = "identity")]
    cache: Option<String>,

    #[command(flatten)]
    protect: ProtectArgs,

    #[command(flatten)]
    placement: PlacementArgs,

    #[command(flatten)]
    member: cluster::MemberArgs,
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(0);
            }
            eprintln!("rebound: {} (see {} --help)", one_line(&e), command_named());
            std::process::exit(2);
        }
    };
    // Before any thread exists, so that every thread inherits the mask.
    signals::block();
    let logger = logging::init(&cli.log_level);
    let logger: rebound_api::LoggerHook = Arc::new(move |c| logger.apply(c));
    let _ = HOOKS.set(rebound_api::Hooks {
        logger: Some(logger),
        metrics: Some(Arc::default()),
    });
    let code = match signals::start()
        .context("cannot start the signal thread")
        .and_then(|()| cli.fc.apply(&cli.log_level))
        .and_then(|()| run(cli))
    {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rebound: error: {}", error_chain(&e));
            1
        }
    };
    stop_api();
    api_sock::remove();
    std::process::exit(code)
}

/// A clap error as one line, not a usage screen: its first paragraph (which, for a missing
/// argument, lists the arguments on the lines after the first).
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = first.join(" ");
    let line = line.trim_start_matches("error: ");
    if line.is_empty() {
        "invalid arguments".to_string()
    } else {
        line.to_string()
    }
}

/// The (sub)command the arguments name, for a pointer to its help: `rebound restore`. (An
/// option's value that happens to be a subcommand's name can mislead it: it only picks which
/// help to point to.)
fn command_named() -> String {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut words = vec!["rebound".to_string()];
    for a in std::env::args_os().skip(1) {
        let Some(sub) = a.to_str().and_then(|a| cmd.find_subcommand(a)).cloned() else {
            continue;
        };
        words.push(sub.get_name().to_string());
        cmd = sub;
    }
    words.join(" ")
}

/// Colour in log lines only when stderr is a terminal and NO_COLOR (no-color.org) is not set.
/// An error and its causes, `outer: inner: ...`, leaving out a cause whose text the message
/// before it already ends with (an error that prints its source and also returns it as its
/// `source()` would otherwise show it twice).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run(mut cli: Cli) -> Result<i32> {
    match cli.command.take() {
        Some(Command::Fault(FaultCommand::Cpu { cpu, repair })) => {
            let faults = HostFaults::from_env();
            if repair {
                faults.repair_cpu(cpu)?;
                eprintln!("rebound: host CPU {cpu} marked healthy");
            } else {
                faults.fail_cpu(cpu)?;
                eprintln!("rebound: host CPU {cpu} marked failed");
            }
            Ok(0)
        }
        Some(Command::Share(cmd)) => share_command(cli.api_sock.as_deref(), cmd),
        Some(Command::Memory(cmd)) => memory::command(cli.api_sock.as_deref(), cmd),
        Some(Command::Capacity(cmd)) => capacity::command(cli.api_sock.as_deref(), cmd),
        Some(Command::Guests) => {
            print!("{}", guests_text());
            Ok(0)
        }
        Some(Command::Standby {
            listen,
            dir,
            takeover_ms,
            hot,
            protect,
        }) => {
            let listener = std::net::TcpListener::bind(&listen)
                .with_context(|| format!("cannot listen on {listen}"))?;
            eprintln!(
                "rebound: standby on {}, keeping checkpoints in {}",
                listener.local_addr()?,
                dir.display()
            );
            let takeover = takeover_ms.map(std::time::Duration::from_millis);
            let why = if hot {
                let mut store = rebound_cluster::hot::HotStore::new(&dir);
                rebound_cluster::standby::serve_into(&listener, &mut store, takeover)?
            } else {
                rebound_cluster::standby::serve(&listener, &dir, takeover)?
            };
            if hot {
                // A hot standby is taken over where it is: recover from the state directory.
                drop(listener);
                eprintln!("rebound: standby: the primary is lost ({why}); taking the VM over");
                let args = RecoverArgs {
                    state: dir,
                    disk: None,
                    disk_mirror: None,
                    protect_ms: protect.protect_ms.unwrap_or(50),
                    paused: false,
                    metrics: false,
                    supervise: false,
                    placement: PlacementArgs::default(),
                    member: cluster::MemberArgs::default(),
                    update_paused_at: None,
                };
                return survive::recover(&cli, args);
            }
            // The old primary must find nobody to acknowledge its checkpoints: without a
            // standby it releases no more output.
            drop(listener);
            eprintln!("rebound: standby: the primary is lost ({why}); taking the VM over");
            let args = RestoreArgs {
                chain: Vec::new(),
                dir: Some(dir),
                disk: None,
                generation: None,
                metrics: false,
                protect,
                placement: PlacementArgs::default(),
                member: cluster::MemberArgs::default(),
            };
            restore(&cli.id, cli.api_sock.as_deref(), args)
        }
        Some(Command::Host(cluster::HostCommand::Serve(args))) => cluster::serve(&cli, args),
        Some(Command::Cluster(cluster::ClusterCommand::Status { root, metrics })) => {
            cluster::status(&root, metrics)
        }
        Some(Command::New(args)) => {
            let (dir, run) = scaffold::create(&args)?;
            eprintln!(
                "rebound: created the guest crate {}; build and run it with:\n  \
                 cargo build --release --manifest-path {}\n  {run}",
                dir.display(),
                dir.join("Cargo.toml").display()
            );
            Ok(0)
        }
        Some(Command::Run(args)) if args.supervise => survive::supervise_run(&cli, &args),
        Some(Command::Run(args)) => run_guest(&cli, *args),
        Some(Command::Recover(args)) if args.supervise => survive::supervise_recover(&cli, &args),
        Some(Command::Recover(args)) => survive::recover(&cli, args),
        Some(Command::Update { binary }) => {
            let sock = need_sock(cli.api_sock.as_deref())?;
            survive::request_update(sock, binary)
        }
        Some(Command::Restore(args)) => restore(&cli.id, cli.api_sock.as_deref(), args),
        Some(Command::Snapshot(SnapshotCommand::Create {
            path,
            diff,
            with_disk,
        })) => {
            let sock = need_sock(cli.api_sock.as_deref())?;
            let path = std::path::absolute(&path)?;
            let body = serde_json::json!({
                "snapshot_path": path,
                "snapshot_type": if diff { "Diff" } else { "Full" },
                "include_disk": with_disk,
            });
            client::call(sock, "PUT", "/snapshot/create", Some(&body))?;
            eprintln!("rebound: snapshot written to {}", path.display());
            Ok(0)
        }
        Some(Command::Snapshot(SnapshotCommand::Merge { out, chain })) => {
            let snaps = chain
                .iter()
                .map(|p| {
                    rebound_snapshot::Snapshot::open(p, rebound_snapshot::format::Verify::Full)
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let id = rebound_vmm::persist::new_id();
            let disk = rebound_vmm::persist::merge_disk(&snaps, &out, id)?;
            let stats = rebound_snapshot::format::merge(&snaps, &out, id)?;
            if disk {
                eprintln!(
                    "rebound: merged the disk images into {}",
                    rebound_block::image::path_of(&out).display()
                );
            }
            eprintln!(
                "rebound: merged {} snapshots into {} ({} pages)",
                chain.len(),
                out.display(),
                stats.pages
            );
            Ok(0)
        }
        Some(Command::Checkpoint) => {
            let r = client::call(
                need_sock(cli.api_sock.as_deref())?,
                "PUT",
                "/checkpoint",
                None,
            )?;
            println!("{r}");
            Ok(0)
        }
        Some(Command::Rollback { epoch }) => {
            let body = epoch.map(|e| serde_json::json!({ "epoch": e }));
            let sock = need_sock(cli.api_sock.as_deref())?;
            let r = client::call(sock, "PUT", "/rollback", body.as_ref())?;
            println!("{r}");
            Ok(0)
        }
        None if cli.fc.config_file.is_some() => firecracker::run_config_file(&cli),
        None if cli.api_sock.is_some() => {
            serve_only(&cli.id, cli.api_sock.as_deref().unwrap_or(Path::new("")))
        }
        None => run_guest(
            &cli,
            RunArgs {
                mem_mib: 128,
                vcpus: 1,
                ..RunArgs::default()
            },
        ),
    }
}

/// What `rebound guests` prints: each bundled guest, what its command line (`--args`) takes and,
/// for a guest with modes, each mode with its arguments.
fn guests_text() -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for g in rebound_guests::GUESTS {
        let _ = writeln!(out, "{}: {}", g.name, g.summary);
        if g.modes.is_empty() {
            let _ = writeln!(out, "  --args \"{}\"", g.args);
        } else {
            let _ = writeln!(out, "  --args \"MODE ARGS...\", MODE one of:");
            let width = g
                .modes
                .iter()
                .map(|m| m.name.len() + 1 + m.args.len())
                .max()
                .unwrap_or(0);
            for m in g.modes {
                let usage = format!("{} {}", m.name, m.args);
                let _ = writeln!(out, "    {:width$}  {}", usage.trim_end(), m.summary);
            }
        }
        let _ = writeln!(
            out,
            "  e.g. rebound run --bundled {} --args \"{}\"",
            g.name, g.example
        );
    }
    out
}

fn share_command(sock: Option<&Path>, cmd: ShareCommand) -> Result<i32> {
    let dir = ShareDir::from_env();
    match cmd {
        ShareCommand::Create { name, size_mib } => {
            dir.create(&name, size_mib)?;
            eprintln!(
                "rebound: region {name} ({size_mib} MiB) created in {}",
                dir.path().display()
            );
        }
        ShareCommand::List => println!("{}", serde_json::to_string_pretty(&dir.list()?)?),
        ShareCommand::Remove { name, force } => {
            dir.remove(&name, force)?;
            eprintln!("rebound: region {name} removed");
        }
        ShareCommand::Attach { name, read_only } => {
            let body = serde_json::json!({ "read_only": read_only });
            client::call(
                need_sock(sock)?,
                "PUT",
                &format!("/shared/{name}"),
                Some(&body),
            )?;
        }
        ShareCommand::Detach { name } => {
            client::call(need_sock(sock)?, "DELETE", &format!("/shared/{name}"), None)?;
        }
    }
    Ok(0)
}

pub(crate) fn need_sock(sock: Option<&Path>) -> Result<&Path> {
    sock.context("this command talks to a running Rebound: give its --api-sock")
}

/// Restores a VM in this process (optionally protected and with the API) and runs it.
fn restore(id: &str, api_sock: Option<&Path>, mut args: RestoreArgs) -> Result<i32> {
    let chain = match &args.dir {
        Some(dir) => rebound_checkpoint::sink::newest_chain(dir).map_err(|e| match e {
            rebound_checkpoint::Error::Sink { reason, .. } => {
                anyhow::anyhow!("snapshot directory {}: {reason}", dir.display())
            }
            e => e.into(),
        })?,
        None => args.chain.clone(),
    };
    let instance = new_instance(id);
    args.placement.apply(&instance)?;
    let api_sock = args.member.api_sock(id, api_sock);
    let api_sock = api_sock.as_deref();
    let joining = join_host(&args.member, id, &mut args.protect, api_sock, None)?;
    if let Some(sock) = api_sock {
        start_api(sock, instance.clone())?;
    }
    let t0 = Instant::now();
    let protection = args.protect.protection();
    let load = rebound_control::Load {
        // A protected VM stays paused until protection has started (no race with a guest
        // that ends at once).
        resume: protection.is_none(),
        generation: args.generation,
        disk: args.disk.clone(),
        ..rebound_control::Load::default()
    };
    instance.restore(&chain, &load)?;
    eprintln!(
        "rebound: restored from {} snapshot(s) in {:.1} ms",
        chain.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    if let Some(p) = protection {
        instance.protect(p)?;
        instance.resume()?;
    }
    if let Some(j) = joining {
        cluster::watch(j, &instance)?;
    }
    finish(&instance, t0, args.metrics)
}

pub(crate) fn console() -> Box<dyn Write + Send> {
    Box::new(std::io::stdout())
}

/// Runs a guest from the command line (optionally with the API alongside) until it ends.
fn run_guest(cli: &Cli, mut args: RunArgs) -> Result<i32> {
    let (id, api_sock) = (cli.id.as_str(), cli.api_sock.as_deref());
    let api_sock = args.member.api_sock(id, api_sock);
    let api_sock = api_sock.as_deref();
    if args.member.host_root.is_some() && args.protect.protect_ms.is_none() && args.state.is_none()
    {
        bail!("--host-root needs a protected VM (--protect-ms or --state)");
    }
    let joining = join_host(
        &args.member,
        id,
        &mut args.protect,
        api_sock,
        args.state.as_deref(),
    )?;
    let (image, is_demo) = match (&args.guest, &args.bundled) {
        (Some(path), _) => (GuestImage::from_path(path)?, false),
        (None, Some(name)) => {
            let bytes = rebound_guests::by_name(name).with_context(|| {
                format!(
                    "no bundled guest named {name:?} (have: {})",
                    rebound_guests::NAMES.join(", ")
                )
            })?;
            (GuestImage::from_bytes(name, bytes), name == "demo")
        }
        (None, None) => (GuestImage::from_bytes("demo", rebound_guests::DEMO), true),
    };
    let disk = match (&args.disk, args.scratch_disk_mib) {
        (Some(path), _) => Some(DiskConfig::File {
            path: path.clone(),
            read_only: args.disk_read_only,
            mirror: args.disk_mirror.clone(),
        }),
        (None, Some(size_mib)) => Some(DiskConfig::Scratch { size_mib }),
        (None, None) if is_demo => Some(DiskConfig::Scratch { size_mib: 16 }),
        (None, None) => None,
    };
    let instance = new_instance(id);
    instance.set_machine_config(MachineConfig {
        vcpu_count: args.vcpus,
        mem_size_mib: args.mem_mib,
        ..Default::default()
    })?;
    instance.set_boot_source(image, args.args.clone())?;
    instance.set_disk(disk)?;
    for s in &args.shares {
        let (name, read_only) = match s.split_once(':') {
            Some((n, "ro")) => (n, true),
            Some((n, "rw")) => (n, false),
            Some(_) => bail!("--share {s}: use NAME or NAME:ro"),
            None => (s.as_str(), false),
        };
        instance.attach_shared(ShareConfig {
            name: name.to_string(),
            read_only,
        })?;
    }
    if let Some(id) = &args.identity {
        let cache = match &args.cache {
            None => None,
            Some(c) => {
                let (name, mib) = c
                    .split_once(':')
                    .and_then(|(n, m)| Some((n.to_string(), m.parse::<u64>().ok()?)))
                    .with_context(|| format!("--cache {c}: use NAME:MIB"))?;
                Some((name, mib))
            }
        };
        instance.set_identity(Some(rebound_control::Identity {
            name: id.clone(),
            cache,
        }))?;
    }
    if !args.publish.is_empty() || args.tap.is_some() || args.mac.is_some() {
        instance.set_network_interface(rebound_net::NetworkInterface {
            iface_id: "eth0".into(),
            guest_mac: args.mac.clone(),
            host_dev_name: args.tap.clone(),
            mtu: None,
            publish: args.publish.clone(),
            paths: Vec::new(),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        })?;
    }
    args.placement.apply(&instance)?;
    if let Some(dir) = &args.state {
        instance.set_state_dir(dir)?;
        instance.set_start_protection(Some(args.protect.preserved()))?;
        survive::allow_update(cli, &instance);
    }
    if let Some(sock) = api_sock {
        start_api(sock, instance.clone())?;
    }
    if args.state.is_none() {
        // Protection starts before the guest's first instruction: a guest that ends at once
        // cannot race it.
        instance.set_start_protection(args.protect.protection())?;
    }
    let t0 = Instant::now();
    instance.start()?;
    if let Some(j) = joining {
        cluster::watch(j, &instance)?;
    }
    finish(&instance, t0, args.metrics)
}

/// Joins the host agent of `member.host_root`, if given: the VM's ownership lock, and its
/// standby resolved into `protect` (none yet if the agent is to place it). A VM with a state
/// directory is recovered from it by the agent if its VMM dies.
pub(crate) fn join_host(
    member: &cluster::MemberArgs,
    id: &str,
    protect: &mut ProtectArgs,
    api_sock: Option<&Path>,
    state_dir: Option<&Path>,
) -> Result<Option<cluster::Joining>> {
    let Some(sock) = api_sock else {
        return Ok(None);
    };
    let Some((joining, addr, hot)) =
        member.join(id, protect.standby.as_deref(), sock, state_dir)?
    else {
        return Ok(None);
    };
    if protect.standby.is_some() || member.standby_host.is_some() {
        protect.standby = Some(addr.unwrap_or_default());
        protect.hot_standby = hot;
    }
    Ok(Some(joining))
}

/// Serves the API and runs whatever it starts, Firecracker style.
fn serve_only(id: &str, sock: &Path) -> Result<i32> {
    let instance = new_instance(id);
    host_faults::watch(&instance, HostFaults::from_env())?;
    // What every VM needs is ready before the first request (a clone restored here waits less);
    // a failure shows again, with its cause, when a VM is built.
    if let Err(e) = rebound_vmm::vm::warm_up() {
        tracing::debug!(error = %e, "KVM is not ready yet");
    }
    start_api(sock, instance.clone())?;
    eprintln!(
        "rebound: API on {}; configure, then PUT /actions InstanceStart",
        sock.display()
    );
    instance.wait_started();
    finish(&instance, Instant::now(), false)
}

pub(crate) fn finish(instance: &Instance, t0: Instant, print_metrics: bool) -> Result<i32> {
    let outcome = instance.wait()?;
    let m = instance.metrics().context("the VM has no metrics")?;
    let _ = std::io::stdout().flush();
    let exits = m.exits.io_out
        + m.exits.io_in
        + m.exits.mmio
        + m.exits.hlt
        + m.exits.shutdown
        + m.exits.failure
        + m.exits.other;
    eprintln!("rebound: {outcome}");
    eprintln!(
        "rebound: ran {:.2} s ({exits} VM exits, {} I/O requests, {} interrupts injected)",
        t0.elapsed().as_secs_f64(),
        m.io.requests,
        m.interrupts_injected,
    );
    if print_metrics {
        eprintln!("{}", serde_json::to_string(&m)?);
    }
    Ok(outcome.exit_code())
}

/// Binds the API socket (replacing a stale one) and serves it on a thread of its own.
/// The API server's thread and how to stop it.
type ApiThread = (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
);

static API: std::sync::Mutex<Option<ApiThread>> = std::sync::Mutex::new(None);

/// Stops the API server, once requests in progress are answered (the VM ended: a client whose
/// request ended it still gets its answer).
fn stop_api() {
    let api = API.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some((stop, thread)) = api {
        let _ = stop.send(());
        let _ = thread.join();
    }
}

/// A new instance whose host-side helpers end with this process on a termination signal.
pub(crate) fn new_instance(id: &str) -> Arc<Instance> {
    let instance = Arc::new(Instance::new(id, console()));
    signals::end_with_process(&instance);
    instance
}

pub(crate) fn start_api(sock: &Path, instance: Arc<Instance>) -> Result<()> {
    let listener = api_sock::bind(sock)?;
    listener.set_nonblocking(true)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("rebound-api".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot start the API runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                match tokio::net::UnixListener::from_std(listener) {
                    Ok(l) => {
                        let serve = rebound_api::serve_with(l, instance, hooks().clone(), async {
                            let _ = stopped.await;
                        });
                        if let Err(e) = serve.await {
                            tracing::error!("API server failed: {e}");
                        }
                    }
                    Err(e) => tracing::error!("cannot use the API socket: {e}"),
                }
            });
        })?;
    *API.lock().unwrap_or_else(|e| e.into_inner()) = Some((stop, thread));
    Ok(())
}
