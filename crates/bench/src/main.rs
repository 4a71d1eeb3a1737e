//! `rebound-bench [boot|hypercall|memory|pause|checkpoint|slowdown|snapshot|dirtylog|recovery|update|protected|sharing|redis|netstream|failover|netrecovery|disk|standby|resync|cluster|reclaim|capacity|emulation|programs|nested|indicators|all] [--runs N]`
//!
//! Every figure is printed as one JSON line `{"bench": NAME, "value": X, "unit": U}` so runs can
//! be compared; a human summary goes to stderr. Machines here are noisy: compare ratios taken
//! in one run (the hypercall benchmark measures its own floor alongside).

mod bare;
mod capacity;
mod checkpoint;
mod cluster;
mod dirty_log;
mod disk;
mod emulation;
mod floor;
mod indicators;
mod nested;
mod net;
mod qemu;
mod reclaim;
mod sharing;
mod standby;
mod survive;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rebound_devices::console::SharedBuffer;
use rebound_vmm::{GuestImage, Vm, VmConfig, VmOutcome};

pub(crate) fn emit(bench: &str, value: f64, unit: &str) {
    println!(
        "{}",
        serde_json::json!({"bench": bench, "value": value, "unit": unit})
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn median_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

pub(crate) fn testguest(args: &str, vcpus: u32, mem_mib: u64) -> VmConfig {
    VmConfig {
        vcpu_count: vcpus,
        mem_size_mib: mem_mib,
        image: GuestImage::from_bytes("testguest", rebound_guests::TESTGUEST),
        boot_args: args.into(),
        disk: None,
        shared: Vec::new(),
        cache: None,
        nics: Vec::new(),
        net_journal: None,
        disk_journal: None,
    }
}

/// VM creation to the guest's first exit, and to the guest's exit, for a 64 MiB guest.
fn boot(runs: usize) -> Result<()> {
    let config = testguest("exit 0", 1, 64);
    let (mut first, mut total) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t0 = Instant::now();
        let vm = Vm::launch(&config, Box::new(std::io::sink()))?;
        let outcome = vm.wait();
        let ended = t0.elapsed();
        if outcome != (VmOutcome::Exited { status: 0 }) {
            bail!("boot run ended with {outcome}");
        }
        first.push(vm.launch_to_first_exit_ns() as f64 / 1000.0);
        total.push(ended.as_secs_f64() * 1e6);
    }
    let (m, p) = median_p99(first);
    emit("boot_to_first_guest_exit_median", m, "us");
    emit("boot_to_first_guest_exit_p99", p, "us");
    let (tm, tp) = median_p99(total);
    emit("boot_to_guest_exit_median", tm, "us");
    emit("boot_to_guest_exit_p99", tp, "us");
    eprintln!(
        "boot (64 MiB, {runs} runs): first exit median {m:.0} us p99 {p:.0} us; guest exit median {tm:.0} us p99 {tp:.0} us"
    );
    Ok(())
}

/// Hypercall round trips through the whole VMM versus a bare KVM_RUN loop, interleaved.
fn hypercall(runs: usize) -> Result<()> {
    let n = 20_000u64;
    let (mut floor_rates, mut vmm_rates) = (Vec::new(), Vec::new());
    for _ in 0..runs.clamp(1, 10) {
        floor_rates.push(floor::exits_per_second(n)?);
        let out = SharedBuffer::new();
        let vm = Vm::launch(
            &testguest(&format!("hcbench {n}"), 1, 64),
            Box::new(out.clone()),
        )?;
        let outcome = vm.wait();
        if outcome != (VmOutcome::Exited { status: 0 }) {
            bail!("hcbench ended with {outcome}");
        }
        let text = out.text();
        let ns: f64 = text
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("unexpected hcbench output {text:?}"))?;
        vmm_rates.push(n as f64 / (ns / 1e9));
    }
    let (floor, _) = median_p99(floor_rates);
    let (vmm, _) = median_p99(vmm_rates);
    emit("hypercall_floor_rate", floor, "exits/s");
    emit("hypercall_vmm_rate", vmm, "calls/s");
    emit("hypercall_vmm_vs_floor", vmm / floor, "ratio");
    emit("hypercall_vmm_round_trip", 1e6 / vmm, "us");
    eprintln!(
        "hypercall: VMM {vmm:.0}/s ({:.1} us) vs bare KVM_RUN floor {floor:.0}/s: {:.1}% of the floor",
        1e6 / vmm,
        100.0 * vmm / floor
    );
    Ok(())
}

fn status_kib(pid: &str, field: &str) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field}"))?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("bad status line")?
        .parse()?;
    Ok(kib)
}

const TOUCH_MIB: u64 = 16;

/// What the VMM costs in resident memory beyond the guest memory the guest touched (guest
/// memory is a memfd, so it shows as RssShmem):
/// - per process: a `rebound run` process with one VM, as deployed (one VMM per VM);
/// - per extra VM: the growth for 8 more VMs in one fresh process (the re-executed bench).
fn memory() -> Result<()> {
    let exe = std::env::current_exe()?;
    let rebound = exe.with_file_name("rebound");
    if !rebound.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p rebound -p rebound-bench`",
            rebound.display()
        );
    }
    let mut child = std::process::Command::new(&rebound)
        .args(["run", "--bundled", "testguest", "--mem-mib", "64", "--args"])
        .arg(format!("touch {TOUCH_MIB}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut stdout = std::io::BufReader::new(child.stdout.take().context("child stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line)?;
    if !line.contains("touched") {
        let _ = child.kill();
        bail!("rebound did not report touching its memory: {line:?}");
    }
    let pid = child.id().to_string();
    let (rss, shm) = (status_kib(&pid, "VmRSS:")?, status_kib(&pid, "RssShmem:")?);
    let _ = child.kill();
    let _ = child.wait();
    emit("vmm_process_overhead", (rss - shm) / 1024.0, "MiB");
    emit("guest_memory_touched", shm / 1024.0, "MiB");
    eprintln!(
        "memory: one `rebound run` process: RSS {:.1} MiB = guest-touched {:.1} MiB + VMM {:.1} MiB",
        rss / 1024.0,
        shm / 1024.0,
        (rss - shm) / 1024.0
    );

    let out = std::process::Command::new(exe)
        .arg("memory-marginal")
        .output()?;
    if !out.status.success() {
        bail!(
            "marginal memory run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Run in a fresh process: RSS growth per VM beyond guest-touched memory, over 8 VMs.
fn memory_marginal() -> Result<()> {
    let vms = 8;
    let me = "self";
    // One VM first so one-time process costs (KVM handle, thread-local arenas) are not counted.
    let warm = Vm::launch(
        &testguest(&format!("touch {TOUCH_MIB}"), 1, 64),
        Box::new(std::io::sink()),
    )?;
    let (rss0, shm0) = (status_kib(me, "VmRSS:")?, status_kib(me, "RssShmem:")?);
    let mut running = Vec::new();
    for _ in 0..vms {
        let out = SharedBuffer::new();
        let vm = Vm::launch(
            &testguest(&format!("touch {TOUCH_MIB}"), 1, 64),
            Box::new(out.clone()),
        )?;
        let t0 = Instant::now();
        while !out.text().contains("touched") {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("guest did not touch its memory: {}", out.text());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        running.push(vm);
    }
    let (rss1, shm1) = (status_kib(me, "VmRSS:")?, status_kib(me, "RssShmem:")?);
    let overhead = ((rss1 - rss0) - (shm1 - shm0)) / vms as f64;
    for vm in running.iter().chain([&warm]) {
        vm.stop();
    }
    emit("vmm_overhead_per_extra_vm", overhead / 1024.0, "MiB");
    eprintln!(
        "memory: each further VM in one process adds {:.2} MiB beyond its guest memory",
        overhead / 1024.0
    );
    Ok(())
}

/// Time from a pause request until every vCPU is out of the guest, with 2 vCPUs computing at
/// CPL3 (they never exit on their own: the kick has to get them).
fn pause(runs: usize) -> Result<()> {
    let vm = Vm::launch(&testguest("spin", 2, 64), Box::new(std::io::sink()))?;
    std::thread::sleep(Duration::from_millis(50));
    let mut took = Vec::new();
    for _ in 0..runs {
        took.push(vm.pause()?.as_secs_f64() * 1e6);
        vm.resume()?;
        std::thread::sleep(Duration::from_millis(2));
    }
    vm.stop();
    let (m, p) = median_p99(took);
    emit("pause_latency_median", m, "us");
    emit("pause_latency_p99", p, "us");
    eprintln!("pause (2 spinning vCPUs, {runs} runs): median {m:.0} us, p99 {p:.0} us");
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut runs = 100;
    let mut which = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--runs" => {
                i += 1;
                runs = args
                    .get(i)
                    .context("--runs needs a number")?
                    .parse()
                    .context("--runs needs a number")?;
            }
            "-h" | "--help" => {
                println!(
                    "usage: rebound-bench [boot|hypercall|memory|pause|checkpoint|slowdown|snapshot|dirtylog|recovery|update|protected|sharing|redis|netstream|failover|netrecovery|disk|standby|resync|cluster|reclaim|capacity|emulation|programs|nested|indicators|all]... [--runs N]\n(recovery, update, protected and sharing run the rebound binary next to this one: cargo build --release -p rebound)"
                );
                return Ok(());
            }
            name => which.push(name.to_string()),
        }
        i += 1;
    }
    if which.is_empty() || which.iter().any(|w| w == "all") {
        which = [
            "boot",
            "hypercall",
            "memory",
            "pause",
            "checkpoint",
            "slowdown",
            "snapshot",
            "dirtylog",
            "recovery",
            "update",
            "protected",
            "sharing",
            "redis",
            "netstream",
            "failover",
            "netrecovery",
            "disk",
            "standby",
            "resync",
            "cluster",
            "reclaim",
            "capacity",
            "emulation",
            "programs",
            "nested",
            "indicators",
        ]
        .map(String::from)
        .to_vec();
    }
    for w in &which {
        match w.as_str() {
            "boot" => boot(runs)?,
            "indicators" => indicators::run(1_000_000)?,
            "hypercall" => hypercall(5)?,
            "nested" => nested::round_trip(5)?,
            "memory" => memory()?,
            "memory-marginal" => memory_marginal()?,
            "pause" => pause(runs)?,
            "checkpoint" => checkpoint::pause_and_throughput()?,
            "slowdown" => checkpoint::slowdown()?,
            "snapshot" => checkpoint::snapshots()?,
            "dirtylog" => checkpoint::dirty_log()?,
            "recovery" => survive::recovery(&[256, 4096], runs.min(10))?,
            "update" => {
                survive::update(&[256, 4096], runs.min(10))?;
                survive::qemu_update(&[256, 4096])?;
            }
            "protected" => survive::protected_overhead(runs.min(5))?,
            "sharing" => {
                sharing::messaging(20_000)?;
                sharing::lock(10_000_000)?;
            }
            "redis" => net::redis(100_000)?,
            "netstream" => net::stream(64 << 20)?,
            "failover" => net::failover(20)?,
            "netrecovery" => net::recovery(runs.clamp(5, 20))?,
            "cluster" => {
                cluster::failover(runs.clamp(5, 20))?;
                cluster::heartbeats()?;
            }
            "resync" => standby::resync()?,
            "standby" => {
                standby::failover(runs.clamp(5, 20))?;
                standby::cost(false)?;
                standby::cost(true)?;
            }
            "disk" => {
                disk::writes(50_000)?;
                disk::fsync_and_throughput()?;
                disk::held_pause()?;
                disk::mirror()?;
            }
            "reclaim" => {
                reclaim::across_vms(1)?;
                reclaim::across_vms(4)?;
                reclaim::work_lost()?;
            }
            "capacity" => {
                capacity::clone_latency(runs.clamp(5, 20))?;
                capacity::throughput(10_000)?;
            }
            "emulation" => emulation::trapping()?,
            "programs" => emulation::programs(500_000, 80)?,
            other => bail!("unknown benchmark {other:?} (see --help)"),
        }
    }
    Ok(())
}
