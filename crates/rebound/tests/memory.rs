//! Swap with real processes: pages the host moved out of RAM come back with the right contents
//! across a checkpoint, a rollback, `kill -9` of the VMM with recovery from the state
//! directory, and a live update to another binary.
//!
//! The guest (`testguest memhold ... 0 8`) never answers requests and keeps 8 MiB of its
//! working data in its swap area; it checks every working page, wherever it is, over and over
//! (touching the swapped ones), and all of them once more when asked to shut down.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

fn memory(sock: &Path) -> serde_json::Value {
    let (st, v) = http(sock, "GET", "/memory", "");
    assert_eq!(st, 200, "{v}");
    v
}

/// Has the host move the swap class out (the guest does not answer) and waits until at least
/// half of the 8 MiB of data is out of RAM. The target stays: the host keeps moving out what
/// the guest touches back in.
fn squeeze(sock: &Path) {
    let (st, v) = http(
        sock,
        "PUT",
        "/memory",
        r#"{"target_mib": 16, "answer_ms": 10}"#,
    );
    assert_eq!(st, 204, "{v}");
    wait_until("pages out of RAM", Duration::from_secs(60), || {
        memory(sock)["vm"]["swap"]["swapped_pages"].as_u64() >= Some(1024)
    });
}

fn wait_running(sock: &Path) {
    wait_for_socket(sock);
    wait_until("the VM running", Duration::from_secs(30), || {
        try_http(sock, "GET", "/", "").is_some_and(|(_, v)| v["state"] == "Running")
    });
}

fn log_of(dir: &Path) -> String {
    std::fs::read(dir.join("console.log"))
        .map(|b| text(&b))
        .unwrap_or_default()
}

#[test]
fn swapped_pages_come_back_across_checkpoint_rollback_kill_9_and_live_update() {
    let tmp = shm();
    let dir = tmp.path().join("vm");
    let swap_dir = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("api.sock");
    let mut run = rebound();
    run.args([
        "run",
        "--bundled",
        "testguest",
        "--mem-mib",
        "128",
        "--args",
    ])
    .arg("memhold 8 4 16 0 8")
    .arg("--state")
    .arg(&dir)
    .args(["--protect-ms", "20", "--api-sock"])
    .arg(&sock)
    .env("REBOUND_SWAP_DIR", swap_dir.path())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let child = run.spawn().unwrap();
    wait_for_socket(&sock);
    wait_until("the guest", Duration::from_secs(30), || {
        log_of(&dir).contains("memhold ready")
    });

    // A checkpoint with pages out, then a rollback to it: the guest goes on checking.
    squeeze(&sock);
    let (st, v) = http(&sock, "PUT", "/checkpoint", "");
    assert_eq!(st, 200, "{v}");
    let (st, v) = http(&sock, "PUT", "/rollback", "");
    assert_eq!(st, 200, "{v}");
    assert!(dir.join("memory.swap").exists(), "the swap file's link");

    // kill -9 with pages out; the recovering VMM takes the swap file over.
    squeeze(&sock);
    sigkill(&child);
    let _ = output_within(child, "the killed VMM", Duration::from_secs(30));
    let sock2 = tmp.path().join("api2.sock");
    let mut recover = rebound();
    recover
        .arg("recover")
        .arg("--state")
        .arg(&dir)
        .arg("--api-sock")
        .arg(&sock2)
        .env("REBOUND_SWAP_DIR", swap_dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = recover.spawn().unwrap();
    wait_running(&sock2);
    // This process moved nothing out yet: pages out of RAM or brought back are its
    // predecessor's, found through the swap file's link.
    let swap = &memory(&sock2)["vm"]["swap"];
    assert!(
        swap["swapped_pages"].as_u64().unwrap() + swap["paged_in"].as_u64().unwrap() > 0,
        "{swap}"
    );
    assert_eq!(swap["paged_out"], 0, "{swap}");

    // A live update with pages out.
    squeeze(&sock2);
    let bin_dir = tempfile::tempdir().unwrap();
    let new_bin: PathBuf = bin_dir.path().join("rebound-next");
    std::fs::copy(env!("CARGO_BIN_EXE_rebound"), &new_bin).unwrap();
    let out = rebound()
        .arg("--api-sock")
        .arg(&sock2)
        .args(["update", "--binary"])
        .arg(&new_bin)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    wait_running(&sock2);

    // Every working page, in RAM or out, is checked once more.
    let (st, _) = http(
        &sock2,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(st, 204);
    let out = output_within(child, "the recovered VMM", Duration::from_secs(120));
    let stderr = text(&out.stderr);
    let log = log_of(&dir);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{log}");
    assert!(log.contains("memhold verified 2048 pages, 0 bad"), "{log}");
}

fn resident(sock: &Path) -> u64 {
    memory(sock)["vm"]["resident_pages"].as_u64().unwrap_or(0)
}

#[test]
fn the_memory_manager_keeps_two_vmms_under_a_budget_it_reads_live() {
    let tmp = tempfile::tempdir().unwrap();
    let socks: Vec<PathBuf> = (0..2)
        .map(|i| tmp.path().join(format!("vm{i}.sock")))
        .collect();
    let mut vms = Vec::new();
    for sock in &socks {
        let mut c = rebound();
        c.args([
            "run",
            "--bundled",
            "testguest",
            "--mem-mib",
            "128",
            "--args",
        ])
        .arg("memhold 8 24 8")
        .arg("--api-sock")
        .arg(sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        vms.push(c.spawn().unwrap());
    }
    for sock in &socks {
        wait_running(sock);
        wait_until("the guest's classes", Duration::from_secs(30), || {
            memory(sock)["vm"]["registered"] == true
        });
    }
    let total: u64 = socks.iter().map(|s| resident(s)).sum();
    let budget_file = tmp.path().join("budget");
    let budget_mib = total / 2 / 256;
    std::fs::write(&budget_file, format!("{budget_mib}\n")).unwrap();
    let mut manage = rebound();
    manage
        .args([
            "memory",
            "manage",
            "--interval-ms",
            "20",
            "--min-mib",
            "8",
            "--budget-file",
        ])
        .arg(&budget_file);
    for s in &socks {
        manage.arg("--vm").arg(s);
    }
    let manager = manage
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the VMs under the budget", Duration::from_secs(60), || {
        socks.iter().map(|s| resident(s)).sum::<u64>() <= budget_mib * 256
    });
    // The CLI shows a VM's memory.
    let out = rebound()
        .arg("--api-sock")
        .arg(&socks[0])
        .args(["memory", "show"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["stats"]["requests"].as_u64() >= Some(1), "{v}");
    // A raised budget gives the memory back.
    std::fs::write(&budget_file, format!("{}\n", budget_mib * 4)).unwrap();
    wait_until("memory given back", Duration::from_secs(60), || {
        socks.iter().all(|s| memory(s)["given_pages"] == 0)
    });
    for (sock, child) in socks.iter().zip(vms) {
        let (st, _) = http(
            sock,
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#,
        );
        assert_eq!(st, 204);
        let out = output_within(child, "a managed VM", Duration::from_secs(60));
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(stdout.contains(", 0 bad,"), "{stdout}");
    }
    let out = output_within(manager, "the memory manager", Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no VM left"));
    assert!(text(&out.stdout).contains("budget_pages"));
}
