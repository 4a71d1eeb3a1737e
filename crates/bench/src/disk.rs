//! Disk writes under output commit (issue 11): the rate at which a guest writes 512-byte
//! sectors one at a time (testguest `disk-scatter`, quiet, each write awaited), unprotected and
//! protected every 20 ms with each capture strategy (writes held until their checkpoint; with
//! a state directory, journaled there first). Real `rebound` processes, a disk file on tmpfs;
//! three interleaved rounds, medians.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::emit;
use crate::survive::{ShmDir, ran_seconds, rebound_bin};

/// Runs `writes` awaited writes; returns the guest's run time in seconds.
fn run(bin: &Path, dir: &Path, writes: u64, protect: &[&str]) -> Result<f64> {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20])?;
    let state = dir.join("vm");
    let _ = std::fs::remove_dir_all(&state);
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--bundled", "testguest", "--mem-mib", "64"])
        .args(["--args", &format!("disk-scatter {writes} 8192 0 1")])
        .arg("--disk")
        .arg(&disk);
    for a in protect {
        if *a == "STATE" {
            cmd.arg(&state);
        } else {
            cmd.arg(a);
        }
    }
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("disk-scatter failed: {err}");
    }
    ran_seconds(&err).with_context(|| format!("unexpected output: {err}"))
}

pub fn writes(writes: u64) -> Result<()> {
    let bin = rebound_bin()?;
    let dir = ShmDir::new("disk");
    std::fs::create_dir_all(&dir.0)?;
    let modes: [(&str, &[&str]); 4] = [
        ("unprotected", &[]),
        (
            "double_buffered",
            &["--protect-ms", "20", "--strategy", "double_buffered"],
        ),
        (
            "post_image",
            &["--protect-ms", "20", "--strategy", "post_image"],
        ),
        (
            "pre_image_state_dir",
            &["--protect-ms", "20", "--state", "STATE"],
        ),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for _ in 0..3 {
        for (i, (_, args)) in modes.iter().enumerate() {
            times[i].push(run(&bin, &dir.0, writes, args)?);
        }
    }
    let mut base = None;
    for ((name, _), mut t) in modes.iter().zip(times) {
        t.sort_by(f64::total_cmp);
        let rate = writes as f64 / t[1];
        let of = *base.get_or_insert(rate);
        emit(&format!("disk_writes_{name}"), rate, "writes/s");
        eprintln!(
            "disk {name:20}: {rate:9.0} awaited 512-byte writes/s ({:.0}% of unprotected)",
            rate / of * 100.0
        );
    }
    Ok(())
}
