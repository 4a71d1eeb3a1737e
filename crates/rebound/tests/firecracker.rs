//! Launching `rebound` the way Firecracker clients launch `firecracker`: its flags, its JSON
//! configuration file, its logger and metrics destinations.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{http, output_within, rebound, text, wait_for_socket, wait_until};

fn config(dir: &std::path::Path, boot_args: &str) -> std::path::PathBuf {
    let p = dir.join("vm.json");
    let json = serde_json::json!({
        "boot-source": {"kernel_image_path": "bundled:testguest", "boot_args": boot_args},
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32, "smt": false},
        "network-interfaces": [],
    });
    std::fs::write(&p, json.to_string()).unwrap();
    p
}

#[test]
fn a_config_file_starts_the_vm_at_once_without_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "exit 3");
    let metrics = dir.path().join("metrics.json");
    let log = dir.path().join("rebound.log");
    let out = rebound()
        .arg("--config-file")
        .arg(&cfg)
        .arg("--no-api")
        .args(["--id", "fc-vm", "--no-seccomp", "--boot-timer"])
        .args(["--start-time-us", "1", "--start-time-cpu-us", "1"])
        .arg("--metrics-path")
        .arg(&metrics)
        .arg("--log-path")
        .arg(&log)
        .args(["--level", "Info", "--show-level", "--show-log-origin"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    // The log went to the file, with levels and origins, not to stderr.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("VM finished"), "{logged}");
    assert!(
        logged.contains("INFO") && logged.contains(".rs:"),
        "{logged}"
    );
    assert!(!stderr.contains("VM finished"), "{stderr}");
    // Metrics were flushed when the VM ended.
    let m = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap()).unwrap();
    assert_eq!(last["instance"], "fc-vm");
    assert_eq!(last["state"], "Exited");
}

#[test]
fn a_config_file_with_the_api_and_put_logger() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "ticks 20");
    let sock = dir.path().join("api.sock");
    let child = rebound()
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&sock);
    let (st, v) = http(&sock, "GET", "/vm/config", "");
    assert_eq!(st, 200);
    assert_eq!(v["boot-source"]["boot_args"], "ticks 20");
    wait_until("the VM to run", Duration::from_secs(30), || {
        http(&sock, "GET", "/", "").1["state"] == "Running"
    });
    // Firecracker's logger: here at debug level into a named pipe nobody reads (it must not
    // block the VMM), then into a file.
    let fifo = dir.path().join("log.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let body = serde_json::json!({"log_path": fifo, "level": "Debug"}).to_string();
    assert_eq!(http(&sock, "PUT", "/logger", &body).0, 204);
    let log = dir.path().join("api.log");
    let body = serde_json::json!({"log_path": log, "level": "Info"}).to_string();
    assert_eq!(http(&sock, "PUT", "/logger", &body).0, 204);
    let (st, v) = http(&sock, "PUT", "/logger", r#"{"level": "Loud"}"#);
    assert_eq!(st, 400);
    assert!(
        v["fault_message"].as_str().unwrap().contains("level"),
        "{v}"
    );
    // A clean shutdown, as Firecracker clients stop a VM.
    let (st, _) = http(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(st, 204);
    let out = output_within(
        child,
        "rebound after SendCtrlAltDel",
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("shutdown requested"));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("VM finished"), "{logged}");
    assert!(!sock.exists(), "the socket goes with the VMM");
}

#[test]
fn refused_flags_and_configs_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let out = rebound()
        .args(["--seccomp-filter", "/x.bpf", "run", "--args", "exit 0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("seccomp"),
        "{}",
        text(&out.stderr)
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"boot-source": {"kernel_image_path": "bundled:testguest"}, "vsock": {"guest_cid": 3, "uds_path": "/v"}}"#,
    )
    .unwrap();
    let out = rebound()
        .arg("--config-file")
        .arg(&bad)
        .arg("--no-api")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("vsock"), "{}", text(&out.stderr));
    let out = rebound().args(["--no-api"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "--no-api needs --config-file");
}
