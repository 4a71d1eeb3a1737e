//! `rebound memory`: a VM's memory target through its API socket, and the host memory manager
//! over several VMMs' sockets.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rebound_memory::manager::{Manager, Member, MemberReport, Settings};
use rebound_memory::{Error as MemError, PAGES_PER_MIB};

use crate::client;

/// `rebound memory ...`.
#[derive(Subcommand, Debug)]
pub enum MemoryCommand {
    /// Show a VM's memory: target, classes, resident and swapped pages, requests and answers
    /// (through its API socket).
    Show,
    /// Set a VM's memory target: the guest is asked to give memory above it up (dropping
    /// cache, moving cold data to swap) or told it may take back what it gave; a guest that
    /// does not answer in time has its swap class moved out of RAM (through its API socket).
    Target {
        /// Resident host memory to bring the VM to, in MiB.
        mib: u64,
        /// How long the guest has to answer, in milliseconds (default 250).
        #[arg(long, value_name = "MS")]
        answer_ms: Option<u64>,
    },
    /// Run the host memory manager over VMMs' API sockets: keep their resident memory
    /// together under a budget (and the host's available memory, and out of memory
    /// pressure), reclaiming by policy and giving memory back when there is room.
    Manage(ManageArgs),
}

/// `rebound memory manage`.
#[derive(Args, Debug)]
pub struct ManageArgs {
    /// The VMMs' API sockets.
    #[arg(long = "vm", value_name = "SOCK", required = true)]
    vms: Vec<PathBuf>,
    /// The budget for all of them together, in MiB.
    #[arg(long, value_name = "MIB")]
    budget_mib: Option<u64>,
    /// A file holding the budget in MiB, read again every tick (a way to change it live).
    #[arg(long, value_name = "PATH")]
    budget_file: Option<PathBuf>,
    /// No VM is taken below this, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 16)]
    min_mib: u64,
    /// Host memory (MemAvailable) never planned for VMs, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    reserve_mib: u64,
    /// `/proc/pressure/memory` some avg10 (percent) above which the host is under pressure.
    #[arg(long, value_name = "PCT", default_value_t = 10.0)]
    pressure: f64,
    /// Time between ticks, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    interval_ms: u64,
}

/// A VMM reached through its API socket.
struct ApiMember {
    sock: PathBuf,
}

const TIMEOUT: Duration = Duration::from_secs(2);

impl Member for ApiMember {
    fn name(&self) -> String {
        self.sock.display().to_string()
    }

    fn report(&self) -> rebound_memory::Result<MemberReport> {
        let err = |e: anyhow::Error| MemError::Member {
            member: self.name(),
            reason: format!("{e:#}"),
        };
        let body =
            client::call_within(&self.sock, "GET", "/memory", None, Some(TIMEOUT)).map_err(err)?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| err(anyhow::anyhow!(e)))?;
        let vm = &v["vm"];
        let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
        if vm.is_null() {
            return Err(err(anyhow::anyhow!("the VM is not running")));
        }
        Ok(MemberReport {
            resident: n(&vm["resident_pages"]),
            cache: n(&vm["cache_pages"]),
            given: n(&v["given_pages"]),
            size: n(&vm["mem_pages"]),
        })
    }

    fn set_target(&self, pages: u64) -> rebound_memory::Result<()> {
        // Down to whole MiB: the targets the policy spread add up to the budget, and rounding
        // any of them up could put the VMs together above it.
        let mib = (pages / PAGES_PER_MIB).max(1);
        let body = serde_json::json!({ "target_mib": mib });
        client::call_within(&self.sock, "PUT", "/memory", Some(&body), Some(TIMEOUT))
            .map(|_| ())
            .map_err(|e| MemError::Member {
                member: self.name(),
                reason: format!("{e:#}"),
            })
    }
}

/// Runs a `memory` command.
pub fn command(sock: Option<&Path>, cmd: MemoryCommand) -> Result<i32> {
    match cmd {
        MemoryCommand::Show => {
            let sock = crate::need_sock(sock)?;
            println!("{}", client::call(sock, "GET", "/memory", None)?);
            Ok(0)
        }
        MemoryCommand::Target { mib, answer_ms } => {
            let sock = crate::need_sock(sock)?;
            let mut body = serde_json::json!({ "target_mib": mib });
            if let Some(ms) = answer_ms {
                body["answer_ms"] = ms.into();
            }
            client::call(sock, "PUT", "/memory", Some(&body))?;
            Ok(0)
        }
        MemoryCommand::Manage(args) => manage(&args),
    }
}

fn read_budget(args: &ManageArgs) -> Result<Option<u64>> {
    match &args.budget_file {
        None => Ok(args.budget_mib),
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => {
                Ok(Some(t.trim().parse().with_context(|| {
                    format!("{}: a budget in MiB", p.display())
                })?))
            }
            // Not written yet: the flag's budget, if any.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(args.budget_mib),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        },
    }
}

/// The manager loop: ends when no member can be reached any more.
fn manage(args: &ManageArgs) -> Result<i32> {
    let members: Vec<Box<dyn Member>> = args
        .vms
        .iter()
        .map(|s| Box::new(ApiMember { sock: s.clone() }) as Box<dyn Member>)
        .collect();
    let mut manager = Manager::new(
        Settings {
            budget_pages: u64::MAX,
            min_pages: args.min_mib * PAGES_PER_MIB,
            reserve_bytes: args.reserve_mib << 20,
            pressure_avg10: args.pressure,
        },
        members,
    );
    let mut last = None;
    loop {
        let budget = read_budget(args)?;
        manager.set_budget(budget.map_or(u64::MAX, |mib| mib * PAGES_PER_MIB));
        let tick = manager.tick(&rebound_memory::pressure::read());
        if tick.members.iter().all(|(_, _, target)| target.is_none()) {
            eprintln!("rebound: memory manager: no VM left");
            return Ok(0);
        }
        let targets: Vec<_> = tick.members.iter().map(|m| m.2).collect();
        if last.as_ref() != Some(&targets) {
            println!("{}", serde_json::to_string(&tick)?);
            last = Some(targets);
        }
        std::thread::sleep(Duration::from_millis(args.interval_ms.max(1)));
    }
}
