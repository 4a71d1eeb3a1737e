//! Survival from the command line: recovery of a VM from its state directory, the supervisor
//! that restarts a dead VMM, and live update by `exec` of a new binary.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rebound_control::host_faults::Placement;
use rebound_control::{Handover, Instance, Load};

use crate::{Cli, RecoverArgs, RunArgs, client, finish, new_instance, signals, start_api};

/// Restarts allowed before the supervisor gives up (a VMM that keeps dying is not helped by
/// more restarts).
const MAX_RESTARTS: u32 = 1000;

/// `rebound recover`: takes the VM over and runs it until it exits.
pub fn recover(cli: &Cli, args: RecoverArgs) -> Result<i32> {
    let instance = new_instance(&cli.id);
    args.placement.apply(&instance)?;
    allow_update(cli, &instance);
    let api_sock = args.member.api_sock(&cli.id, cli.api_sock.as_deref());
    let api_sock = api_sock.as_deref();
    let mut protect = crate::ProtectArgs::default();
    let joining = crate::join_host(
        &args.member,
        &cli.id,
        &mut protect,
        api_sock,
        Some(&args.state),
    )?;
    if let Some(sock) = api_sock {
        start_api(sock, instance.clone())?;
    }
    let t0 = Instant::now();
    let load = Load {
        resume: !args.paused,
        generation: None,
        disk: args.disk.clone(),
        disk_mirror: args.disk_mirror.clone(),
        // A live update hands over the very last state; a crash recovery goes back to a
        // checkpoint, so what the VM held in shared regions since then is released.
        same_vm: args.update_paused_at.is_some(),
        ..Load::default()
    };
    let mut protection = rebound_control::default_protection();
    protection.interval_ms = Some(args.protect_ms);
    protection.standby = protect.standby;
    protection.standby_hot = protect.hot_standby;
    let epoch = match instance.recover(&args.state, &load, Some(protection)) {
        Ok(epoch) => epoch,
        Err(rebound_control::Error::Checkpoint(rebound_checkpoint::Error::Ended {
            reason,
            code,
        })) => {
            // It ended before its VMM did: nothing to resume, and its output is complete.
            eprintln!(
                "rebound: the VM in {} had already ended: {reason}",
                args.state.display()
            );
            return Ok(code);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot recover the VM in {}", args.state.display()));
        }
    };
    match args.update_paused_at {
        Some(ns) => {
            let downtime = instance.note_update(ns);
            eprintln!(
                "rebound: live update: took the VM over at checkpoint {epoch}; guest paused {:.2} ms",
                downtime.as_secs_f64() * 1e3
            );
        }
        None => eprintln!(
            "rebound: recovered the VM from checkpoint {epoch} in {:.1} ms ({} pages undone)",
            t0.elapsed().as_secs_f64() * 1e3,
            instance.survival().undone_pages.unwrap_or(0)
        ),
    }
    if let Some(j) = joining {
        crate::cluster::watch(j, &instance)?;
    }
    finish(&instance, t0, args.metrics)
}

/// Lets a live update (`PUT /update`) replace this process with `rebound recover`.
pub fn allow_update(cli: &Cli, instance: &Instance) {
    let exe = std::env::current_exe().ok();
    let id = cli.id.clone();
    let log_level = cli.log_level.clone();
    let sock = cli.api_sock.clone();
    instance.set_updater(Box::new(move |h: &Handover| {
        let Some(binary) = h.binary.clone().or_else(|| exe.clone()) else {
            return std::io::Error::other("cannot tell which binary to run");
        };
        let mut cmd = Command::new(binary);
        cmd.arg("--id").arg(&id).arg("--log-level").arg(&log_level);
        if let Some(s) = &sock {
            cmd.arg("--api-sock").arg(s);
        }
        cmd.arg("recover")
            .arg("--state")
            .arg(&h.state_dir)
            .arg("--protect-ms")
            .arg(h.protection.interval_ms.unwrap_or(50).to_string())
            .arg("--update-paused-at")
            .arg(h.paused_at_ns.to_string());
        if !h.resume {
            cmd.arg("--paused");
        }
        if let Some(d) = &h.disk {
            cmd.arg("--disk").arg(d);
        }
        if let Some(m) = &h.disk_mirror {
            cmd.arg("--disk-mirror").arg(m);
        }
        placement_args(&mut cmd, &h.placement);
        if !h.share_claims.is_empty() {
            cmd.env(rebound_vmm::share::INHERITED_CLAIMS_ENV, &h.share_claims);
        }
        // What the guest printed is in the state directory's log; this is the mirror.
        let _ = std::io::stdout().flush();
        cmd.exec()
    }));
}

fn placement_args(cmd: &mut Command, p: &Placement) {
    if !p.cpus.is_empty() {
        let list: Vec<String> = p.cpus.iter().map(|c| c.to_string()).collect();
        cmd.arg("--cpus").arg(list.join(","));
    }
    cmd.arg("--recovery").arg(p.recovery.name());
    if let Some(s) = &p.save_area {
        cmd.arg("--save-area").arg(s);
    }
}

/// `rebound update`: asks the VMM behind `sock` to hand its VM to a new binary, then waits for
/// the new process to answer.
pub fn request_update(sock: &Path, binary: Option<PathBuf>) -> Result<i32> {
    let info = |s: String| serde_json::from_str::<serde_json::Value>(&s).unwrap_or_default();
    let before = info(client::call(sock, "GET", "/survival", None)?);
    let binary = binary.map(std::path::absolute).transpose()?;
    let body = serde_json::json!({ "binary": binary });
    client::call(sock, "PUT", "/update", Some(&body))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        if let Ok(now) = client::call(sock, "GET", "/survival", None).map(info)
            && now["resumed_from_epoch"] != before["resumed_from_epoch"]
            && now["update_downtime_us"].is_number()
        {
            println!("{now}");
            return Ok(0);
        }
        if Instant::now() > deadline {
            bail!(
                "the new VMM did not answer on {} within 60 s",
                sock.display()
            );
        }
    }
}

/// `rebound run --state DIR --supervise`.
pub fn supervise_run(cli: &Cli, args: &RunArgs) -> Result<i32> {
    let dir = args.state.clone().context("--supervise needs --state")?;
    let argv: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--supervise")
        .collect();
    let mut first = Command::new(std::env::current_exe()?);
    first.args(argv);
    let ms = args.protect.protect_ms.unwrap_or(50);
    let again = recover_command(
        cli,
        &dir,
        (args.disk.as_deref(), args.disk_mirror.as_deref()),
        ms,
        &args.placement.placement(),
    )?;
    supervise(first, again, &dir)
}

/// `rebound recover --state DIR --supervise`.
pub fn supervise_recover(cli: &Cli, args: &RecoverArgs) -> Result<i32> {
    let p = args.placement.placement();
    let disk = (args.disk.as_deref(), args.disk_mirror.as_deref());
    let first = recover_command(cli, &args.state, disk, args.protect_ms, &p)?;
    let again = recover_command(cli, &args.state, disk, args.protect_ms, &p)?;
    supervise(first, again, &args.state)
}

fn recover_command(
    cli: &Cli,
    dir: &Path,
    (disk, mirror): (Option<&Path>, Option<&Path>),
    ms: u64,
    placement: &Placement,
) -> Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--id")
        .arg(&cli.id)
        .arg("--log-level")
        .arg(&cli.log_level);
    if let Some(s) = &cli.api_sock {
        cmd.arg("--api-sock").arg(s);
    }
    cmd.arg("recover")
        .arg("--state")
        .arg(dir)
        .arg("--protect-ms")
        .arg(ms.to_string());
    if let Some(d) = disk {
        cmd.arg("--disk").arg(d);
    }
    if let Some(m) = mirror {
        cmd.arg("--disk-mirror").arg(m);
    }
    placement_args(&mut cmd, placement);
    Ok(cmd)
}

/// Runs `first` (a VMM keeping its VM in `dir`), and whenever the VMM dies of a signal,
/// recovers the VM in a new one. The guest's output is shown from the state directory's
/// console log, which holds exactly the released output: nothing seen twice, nothing lost.
///
/// SIGTERM, SIGINT and SIGHUP sent to the supervisor are passed on to the VMM; once it ends
/// the supervisor ends the same way (its exit code, or dying of the same signal) instead of
/// restarting it.
fn supervise(mut first: Command, mut again: Command, dir: &Path) -> Result<i32> {
    let done = Arc::new(AtomicBool::new(false));
    let tail = {
        let (log, done) = (dir.join("console.log"), done.clone());
        std::thread::spawn(move || tail(&log, &done))
    };
    // The VMM's pid while it is not yet reaped (a zombie keeps its pid, so a signal sent to
    // it can never reach a process that reused the pid), and the signal that stops it all.
    let vmm: Arc<Mutex<Option<i32>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicI32::new(0));
    {
        let (vmm, stop) = (vmm.clone(), stop.clone());
        signals::set_action(move |sig| {
            stop.store(sig, Ordering::SeqCst);
            if let Some(pid) = *vmm.lock().unwrap_or_else(|e| e.into_inner()) {
                eprintln!("rebound: supervisor: passing signal {sig} on to the VMM ({pid})");
                send(pid, sig);
            }
        });
    }
    let mut child = first
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the VMM")?;
    let mut restarts = 0u32;
    let end = loop {
        let pid = child.id() as i32;
        *vmm.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid);
        // A signal that came before the pid was known was not passed on: pass it now.
        if let sig @ 1.. = stop.load(Ordering::SeqCst) {
            send(pid, sig);
        }
        wait_exited(pid)?;
        *vmm.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let status = child.wait()?;
        if let Some(code) = status.code() {
            break Ok(code);
        }
        let sig = status.signal().unwrap_or(libc::SIGKILL);
        if stop.load(Ordering::SeqCst) != 0 {
            break Err(sig);
        }
        restarts += 1;
        eprintln!(
            "rebound: supervisor: the VMM died (signal {sig}); recovering the VM (restart {restarts})"
        );
        if restarts > MAX_RESTARTS {
            bail!("the VMM died {restarts} times: giving up");
        }
        child = again
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start the VMM")?;
    };
    done.store(true, Ordering::Release);
    let _ = tail.join();
    match end {
        Ok(code) => Ok(code),
        Err(sig) if signals::SIGNALS.contains(&sig) => signals::die_of(sig),
        Err(sig) => Ok(128 + sig),
    }
}

fn send(pid: i32, sig: libc::c_int) {
    // SAFETY: `pid` is our child, not yet reaped (see `wait_exited`): it cannot be another
    // process.
    unsafe { libc::kill(pid, sig) };
}

/// Waits until child `pid` has ended, without reaping it.
fn wait_exited(pid: i32) -> Result<()> {
    loop {
        // SAFETY: an all-zero siginfo_t is valid; waitid fills it for our own child `pid`, and
        // WNOWAIT leaves the child to be reaped by `Child::wait`.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("cannot wait for the VMM");
        }
    }
}

/// Copies the console log to stdout as it grows, until `done` (then to its end).
fn tail(log: &Path, done: &AtomicBool) {
    let mut shown = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    let mut out = std::io::stdout();
    loop {
        let finished = done.load(Ordering::Acquire);
        // Reopened each round: a new VM in the directory starts a new log.
        if let Ok(mut f) = std::fs::File::open(log)
            && f.seek(SeekFrom::Start(shown)).is_ok()
        {
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = out.write_all(&buf[..n]);
                shown += n as u64;
            }
            let _ = out.flush();
        }
        if finished {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
