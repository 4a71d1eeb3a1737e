//! A guest author's path: `rebound new` in a directory outside the repository, `cargo build`
//! in debug and release from another directory, the guests run; programs that are not guests
//! are refused with a reason. Real cargo, real KVM; traffic only to 127.0.0.0/8.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, have, http, output_within, rebound, text, wait_for_socket};

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // Nothing of this build's settings leaks into the guest's: it builds as its author's would.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO_") || k.starts_with("RUSTC") || k == "RUSTFLAGS" {
            c.env_remove(k);
        }
    }
    c
}

/// The repository's guests/Cargo.lock, so that the new crates resolve the SDK's dependencies
/// to the versions already fetched (no registry round trip in the test).
fn lockfile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests/Cargo.lock")
}

fn new_guest(dir: &Path, name: &str, template: &str) -> PathBuf {
    let path = dir.join(name);
    let out = rebound()
        .args(["new", name, "--template", template, "--path"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "rebound new: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cargo build --release --manifest-path"));
    std::fs::copy(lockfile(), path.join("Cargo.lock")).unwrap();
    path
}

/// Builds the guest at `path` from `cwd` with `--manifest-path`; returns the ELF.
fn build(path: &Path, cwd: &Path, target: &Path, release: bool) -> PathBuf {
    let mut c = cargo();
    c.current_dir(cwd)
        .arg("build")
        .arg("--manifest-path")
        .arg(path.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target);
    if release {
        c.arg("--release");
    }
    let out = output_within(
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        "cargo build",
        Duration::from_secs(600),
    );
    assert!(out.status.success(), "cargo build: {}", text(&out.stderr));
    let name = path.file_name().unwrap();
    target
        .join(if release { "release" } else { "debug" })
        .join(name)
}

#[test]
fn a_new_guest_builds_in_debug_and_release_from_anywhere_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    // Both guests share one target directory: the SDK is compiled once per profile.
    let target = tmp.path().join("target");
    let hello = new_guest(tmp.path(), "hello-guest", "hello");
    for release in [false, true] {
        let elf = build(&hello, elsewhere.path(), &target, release);
        let out = rebound()
            .arg("run")
            .arg(&elf)
            .args(["--args", "count=7", "--mem-mib", "16"])
            .output()
            .unwrap();
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
        assert!(
            stdout.contains("hello from hello-guest on vCPU 0"),
            "{stdout}"
        );
        assert!(stdout.contains("prime 17\n"), "{stdout}");
        assert!(!stdout.contains("prime 19"), "{stdout}");
        assert!(stdout.contains("hello-guest: 7 primes in"), "{stdout}");
    }
    // An existing, non-empty directory is never overwritten.
    let out = rebound()
        .args(["new", "again", "--path"])
        .arg(&hello)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("exists and is not empty"));
    let out = rebound().args(["new", "9lives"]).output().unwrap();
    assert!(text(&out.stderr).contains("not a usable crate name"));

    // A fault is reported with the function and, since release guests keep line tables, the
    // line; a panic's message is on lines of its own.
    let crash = new_guest(tmp.path(), "crash-guest", "hello");
    std::fs::write(
        crash.join("src/main.rs"),
        r#"#![no_std]
#![no_main]
use rebound_guest::Cpu;

#[inline(never)]
fn explode(how: &str) {
    if how == "panic" {
        panic!("as asked");
    }
    // SAFETY: ends the guest with #UD, which is the point.
    unsafe { core::arch::asm!("ud2") };
}

fn main(cpu: Cpu) -> i32 {
    explode(cpu.args());
    0
}
rebound_guest::entry!(main);
"#,
    )
    .unwrap();
    let elf = build(&crash, elsewhere.path(), &target, true);
    let out = rebound().arg("run").arg(&elf).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(139), "{err}");
    assert!(err.contains("invalid opcode (#UD)"), "{err}");
    assert!(err.contains(" in crash_guest::explode+0x"), "{err}");
    assert!(err.contains("src/main.rs:11)"), "{err}");
    let out = rebound()
        .arg("run")
        .arg(&elf)
        .args(["--args", "panic"])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(101), "{err}");
    assert!(
        err.contains(
            "guest panicked on vCPU 0:\npanicked at src/main.rs:8:9:\nas asked\nrebound: ran "
        ),
        "{err}"
    );

    let echo = new_guest(tmp.path(), "echo-guest", "echo");
    let elf = build(&echo, elsewhere.path(), &target, true);
    if !have("passt") {
        return;
    }
    let port = free_port();
    let sock = tmp.path().join("api.sock");
    let mut child = rebound()
        .arg("--api-sock")
        .arg(&sock)
        .arg("run")
        .arg(&elf)
        .args(["--publish", &format!("127.0.0.1:{port}:7")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("echo-guest: echo on port 7") {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            let o = output_within(child, "the echo guest", Duration::from_secs(30));
            panic!("the echo guest ended: {}", text(&o.stderr));
        }
    }
    let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(b"hello, guest").unwrap();
    let mut got = [0u8; 12];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello, guest");
    drop(c);
    wait_for_socket(&sock);
    let (st, _) = http(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(st, 204);
    let o = output_within(child, "the echo guest", Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("echo-guest: shut down after 1 connections"),
        "{rest}"
    );
}

#[test]
fn programs_that_are_not_guests_are_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("hello.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\nint main(void) { puts(\"hi\"); return 0; }\n",
    )
    .unwrap();
    let mut built = 0;
    for (name, flags) in [
        ("static", &["-static", "-no-pie"][..]),
        ("dynamic", &["-no-pie"][..]),
    ] {
        let exe = tmp.path().join(name);
        let ok = Command::new("cc")
            .args(flags)
            .arg("-o")
            .arg(&exe)
            .arg(&src)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped the {name} C program: cc cannot build it here");
            continue;
        }
        built += 1;
        let out = rebound().arg("run").arg(&exe).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("is not a Rebound guest"), "{err}");
        assert!(err.contains("rebound new NAME"), "{err}");
        let why = if name == "static" {
            "no Rebound ABI note"
        } else {
            "dynamically linked program"
        };
        assert!(err.contains(why), "{err}");
    }
    assert!(built > 0 || Command::new("cc").arg("--version").output().is_err());
}
