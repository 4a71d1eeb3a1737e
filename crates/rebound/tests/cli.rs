//! The `rebound` binary as users run it: real processes, real sockets, real KVM.

mod common;

use common::{http_raw, rebound, text};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> Output {
    rebound().args(args).output().expect("spawn rebound")
}

#[test]
fn no_arguments_runs_the_bundled_demo() {
    let out = run(&[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("verified 512/512 blocks"), "{stdout}");
    assert!(stdout.contains("demo OK"), "{stdout}");
    assert!(stderr.contains("guest exited with status 0"), "{stderr}");
    assert!(stderr.contains("0 interrupts injected"), "{stderr}");
}

#[test]
fn guest_exit_status_becomes_the_process_exit_code() {
    let out = run(&[
        "run",
        "--bundled",
        "testguest",
        "--args",
        "exit 7",
        "--mem-mib",
        "16",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    let out = run(&["run", "--bundled", "testguest", "--args", "fault-ud"]);
    assert_eq!(out.status.code(), Some(139));
    assert!(
        text(&out.stderr).contains("invalid opcode (#UD)"),
        "{}",
        text(&out.stderr)
    );
    // Bundled guests keep their line tables: the report says where.
    assert!(
        text(&out.stderr).contains("guests/testguest/src/main.rs:"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["run", "--bundled", "testguest", "--args", "panic 1"]);
    assert_eq!(out.status.code(), Some(101));
    assert!(text(&out.stderr).contains("boom at step 1"));
}

#[test]
fn a_guest_elf_file_runs_with_vcpus_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let elf = dir.path().join("guest.elf");
    std::fs::write(&elf, rebound_guests_bytes()).unwrap();
    let out = run(&[
        "run",
        elf.to_str().unwrap(),
        "--vcpus",
        "2",
        "--mem-mib",
        "32",
        "--args",
        "multi",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("all 2 vCPUs ran concurrently"));
}

fn rebound_guests_bytes() -> Vec<u8> {
    rebound_guests::TESTGUEST.to_vec()
}

/// Exit code 2 and one line on stderr for bad arguments; 1 and one line for a refused config.
#[test]
fn bad_arguments_give_one_clear_line() {
    for (args, code, want) in [
        (vec!["run", "--vcpus", "x"], 2, "invalid value 'x'"),
        (vec!["bogus"], 2, "unrecognized subcommand"),
        (vec!["run", "--mem-mib"], 2, "value is required"),
        (
            vec!["run", "--vcpus", "0"],
            1,
            "vcpu_count: 0 is outside 1..=32",
        ),
        (vec!["run", "--mem-mib", "99999999"], 1, "mem_size_mib"),
        (vec!["run", "--mem-mib", "63"], 1, "multiple of 2 MiB"),
        (
            vec!["run", "/nonexistent.elf"],
            1,
            "cannot read guest image /nonexistent.elf",
        ),
        (
            vec!["run", "--bundled", "nope"],
            1,
            "no bundled guest named \"nope\"",
        ),
        (
            vec!["run", "--disk", "/nonexistent.img"],
            1,
            "cannot open disk image /nonexistent.img",
        ),
        // A missing argument is named, with the help to read.
        (
            vec!["restore"],
            2,
            "not provided: <SNAPSHOT|--dir <DIR>> (see rebound restore --help)",
        ),
        (vec!["recover"], 2, "not provided: --state <DIR>"),
        (vec!["run", "--supervise"], 2, "not provided: --state <DIR>"),
        (
            vec!["run", "--cache", "bad"],
            2,
            "not provided: --identity <ID>",
        ),
        (
            vec!["snapshot", "merge"],
            2,
            "not provided: --out <PATH> <SNAPSHOT>... (see rebound snapshot merge --help)",
        ),
        (vec!["run", "--vcpus", "x"], 2, "(see rebound run --help)"),
        (
            vec!["run", "--identity", "a", "--cache", "bad"],
            1,
            "--cache bad: use NAME:MIB",
        ),
    ] {
        let out = run(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?} printed more than one line:\n{stderr}"
        );
        assert!(
            stderr.contains(want),
            "{args:?}: {stderr:?} should mention {want:?}"
        );
    }
}

#[test]
fn corrupt_and_foreign_elf_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = rebound_guests_bytes();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("text", b"hello, world\n".repeat(10), "bad magic"),
        (
            "truncated",
            good[..8192].to_vec(),
            "past the end of the file",
        ),
        ("empty", Vec::new(), "shorter than an ELF header"),
        (
            "host-binary",
            std::fs::read("/bin/true").unwrap(),
            "not an executable",
        ),
    ];
    for (name, bytes, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let out = run(&["run", p.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains(want),
            "{name}: {stderr:?} should mention {want:?}"
        );
    }
}

#[test]
fn help_is_complete() {
    let out = run(&["run", "--help"]);
    let help = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    for flag in [
        "--mem-mib",
        "--vcpus",
        "--args",
        "--disk",
        "--bundled",
        "--api-sock",
        "--metrics",
        "--scratch-disk-mib",
    ] {
        assert!(help.contains(flag), "run --help lacks {flag}");
    }
    assert!(text(&run(&["--help"]).stdout).contains("--api-sock"));
}

fn wait_for_socket(sock: &Path, child: &mut Child) {
    let t0 = Instant::now();
    while UnixStream::connect(sock).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "rebound exited before serving the API"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the API socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn api_socket_mode_is_driven_like_firecracker() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut child = rebound()
        .args(["--api-sock", sock.to_str().unwrap(), "--id", "vm-7"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&sock, &mut child);
    let (st, body) = http_raw(&sock, "GET", "/", "");
    assert_eq!(st, 200);
    assert!(
        body.contains("\"id\":\"vm-7\"") && body.contains("Not started"),
        "{body}"
    );
    assert_eq!(
        http_raw(
            &sock,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 32}"#
        )
        .0,
        204
    );
    assert_eq!(
        http_raw(&sock, "PUT", "/machine-config", r#"{"vcpu_count": 1, "#).0,
        400
    );
    let boot = r#"{"kernel_image_path": "bundled:testguest", "boot_args": "ticks 20 40"}"#;
    assert_eq!(http_raw(&sock, "PUT", "/boot-source", boot).0, 204);
    assert_eq!(
        http_raw(
            &sock,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#
        )
        .0,
        204
    );
    assert_eq!(
        http_raw(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#).0,
        204
    );
    assert!(http_raw(&sock, "GET", "/", "").1.contains("\"Paused\""));
    assert_eq!(
        http_raw(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#).0,
        204
    );
    let (st, metrics) = http_raw(&sock, "GET", "/metrics", "");
    assert_eq!(st, 200);
    assert!(metrics.contains("\"interrupts_injected\":0"), "{metrics}");
    // The guest ends after 40 ticks; the process exits with its status.
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "rebound did not exit after the guest ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("tick ")).count(),
        40,
        "{stdout}"
    );
}

#[test]
fn a_second_server_on_the_same_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut first = rebound()
        .args(["--api-sock", sock.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&sock, &mut first);
    let out = run(&["--api-sock", sock.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("another process is serving"),
        "{}",
        text(&out.stderr)
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // A stale socket left by a killed server is replaced.
    let mut second = rebound()
        .args(["--api-sock", sock.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&sock, &mut second);
    assert_eq!(http_raw(&sock, "GET", "/", "").0, 200);
    second.kill().unwrap();
    second.wait().unwrap();
}

fn seq_result(out: &str) -> Option<String> {
    out.lines()
        .find(|l| l.starts_with("seq done"))
        .map(str::to_string)
}

#[test]
fn a_snapshot_taken_through_the_api_restores_in_a_new_process() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let snap = dir.path().join("vm.snap");
    // ~1.7 s of guest work: it must outlive a 170 ms sleep and a debug CLI process on a loaded host.
    let n = 1u64 << 29;
    let mut vm = rebound()
        .args([
            "run",
            "--bundled",
            "testguest",
            "--mem-mib",
            "64",
            "--api-sock",
            sock.to_str().unwrap(),
        ])
        .args(["--args", &format!("seq {n}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&sock, &mut vm);
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    std::thread::sleep(Duration::from_millis(20 + u64::from(ns % 150)));
    let out = run(&[
        "snapshot",
        "create",
        "--api-sock",
        sock.to_str().unwrap(),
        "--path",
        snap.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let original = vm.wait_with_output().unwrap();
    assert_eq!(original.status.code(), Some(0));
    let want = seq_result(&text(&original.stdout)).expect("the original finished");
    // A new process, the same generation: the restored guest must finish identically.
    let restored = run(&["restore", snap.to_str().unwrap(), "--generation", "0"]);
    assert_eq!(
        restored.status.code(),
        Some(0),
        "{}",
        text(&restored.stderr)
    );
    assert_eq!(seq_result(&text(&restored.stdout)), Some(want));
    assert!(text(&restored.stderr).contains("restored from 1 snapshot"));
    // A corrupt copy is refused by name, before anything runs.
    let mut bytes = std::fs::read(&snap).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x10;
    let bad = dir.path().join("bad.snap");
    std::fs::write(&bad, bytes).unwrap();
    let out = run(&["restore", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("section \"memory\""),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).is_empty(), "nothing ran");
}

#[test]
fn a_protected_run_restores_from_its_snapshot_directory() {
    let dir = tempfile::tempdir().unwrap();
    let snaps = dir.path().join("snaps");
    let args = format!("seq {} {}", 1u64 << 25, 1u64 << 23);
    let out = run(&[
        "run",
        "--bundled",
        "testguest",
        "--mem-mib",
        "64",
        "--args",
        &args,
        "--protect-ms",
        "20",
        "--snapshot-dir",
        snaps.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(seq_result(&text(&out.stdout)).is_some());
    assert_eq!(
        text(&out.stdout).lines().count(),
        5,
        "output released exactly once: {}",
        text(&out.stdout)
    );
    let restored = run(&[
        "restore",
        "--dir",
        snaps.to_str().unwrap(),
        "--generation",
        "0",
    ]);
    assert_eq!(
        restored.status.code(),
        Some(0),
        "{}",
        text(&restored.stderr)
    );
    // The restored VM continues from the last checkpoint: it prints exactly what the original
    // printed after that point (possibly nothing, if the checkpoint came after the result).
    let (orig, rest) = (text(&out.stdout), text(&restored.stdout));
    assert!(
        orig.ends_with(&rest),
        "restored output is not a suffix of the original:\n{rest}\n--\n{orig}"
    );
}

/// A console that keeps what the guest printed (to wait for progress).
#[derive(Clone, Default)]
struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn count(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    /// Waits until the guest printed more than `seen` lines.
    fn wait_past(&self, seen: usize) {
        common::wait_until("the guest prints a line", Duration::from_secs(30), || {
            self.count() > seen
        });
    }
}

/// Damaged snapshot files are refused by `rebound restore` and `rebound snapshot merge` with a
/// message naming the file and what is wrong, before anything runs (the whole damage corpus is
/// in crates/vmm/tests/damaged_snapshots.rs).
#[test]
fn damaged_snapshots_are_refused_by_restore_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let (n, report) = (1u64 << 26, 1u64 << 20);
    let full = dir.path().join("full.snap");
    let diff = dir.path().join("diff.snap");
    {
        let console = Lines::default();
        let config = rebound_vmm::VmConfig {
            vcpu_count: 1,
            mem_size_mib: 16,
            image: rebound_vmm::GuestImage::from_bytes("testguest", rebound_guests::TESTGUEST),
            boot_args: format!("seq {n} {report}"),
            disk: None,
            shared: Vec::new(),
            cache: None,
            nics: Vec::new(),
            net_journal: None,
            disk_journal: None,
        };
        let vm = rebound_vmm::Vm::launch(&config, Box::new(console.clone())).unwrap();
        console.wait_past(0);
        vm.snapshot(&full, rebound_snapshot::Kind::Full).unwrap();
        console.wait_past(console.count());
        vm.snapshot(&diff, rebound_snapshot::Kind::Diff).unwrap();
        vm.stop();
        vm.wait();
    }
    let want = rebound_guests::testguest::seq_output(n, report);
    let want = want.lines().last().unwrap();
    let pristine = std::fs::read(&full).unwrap();
    let mem_offset = u64::from_le_bytes(pristine[56..64].try_into().unwrap());
    // A page in the middle of guest memory that the snapshot does not store.
    let runs = rebound_snapshot::Snapshot::open(&full, rebound_snapshot::format::Verify::Full)
        .unwrap()
        .runs()
        .to_vec();
    let page = (0..4096u64)
        .rev()
        .skip(2048)
        .find(|p| {
            !runs
                .iter()
                .any(|r| (r.first..r.first + r.count).contains(p))
        })
        .unwrap();
    let hole = mem_offset + page * 4096 + 100;
    let bad = dir.path().join("bad.snap");
    let damaged = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = pristine.clone();
        edit(&mut b);
        std::fs::write(&bad, &b).unwrap();
        bad.to_str().unwrap().to_string()
    };
    let refused = |args: &[&str], want: &str| {
        let out = run(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err:?} should say {want:?}");
        assert!(text(&out.stdout).is_empty(), "{args:?}: nothing ran");
    };
    let (full_s, diff_s) = (full.to_str().unwrap(), diff.to_str().unwrap());
    let merged = dir.path().join("merged.snap");
    let merged_s = merged.to_str().unwrap();

    let b = damaged(&|b| b[hole as usize] ^= 0x04);
    refused(
        &["restore", &b],
        &format!(
            "snapshot {b} is corrupt: memory page {page:#x} (not stored) holds a non-zero byte at file offset {hole:#x}"
        ),
    );
    refused(
        &["snapshot", "merge", "--out", merged_s, &b, diff_s],
        &format!("memory page {page:#x} (not stored)"),
    );
    let b = damaged(&|b| b.extend_from_slice(b"appended"));
    refused(
        &["restore", &b, diff_s],
        &format!(
            "snapshot {b} is corrupt: it is {} bytes long but ends at byte {}",
            pristine.len() + 8,
            pristine.len()
        ),
    );
    let b = damaged(&|b| b.truncate(b.len() - 1));
    refused(
        &["restore", &b],
        &format!("snapshot {b} is truncated: section \"memory\" is incomplete"),
    );
    // The padding between the sections and the memory image.
    let b = damaged(&|b| b[(mem_offset - 1) as usize] = 1);
    refused(
        &["snapshot", "merge", "--out", merged_s, &b],
        "the padding before the memory image holds a non-zero byte",
    );
    refused(&["restore", diff_s, full_s], "starts with a full snapshot");
    refused(
        &[
            "snapshot", "merge", "--out", merged_s, full_s, diff_s, diff_s,
        ],
        "is not a diff of",
    );
    assert!(!merged.exists(), "no merged file from a refused chain");

    // The undamaged chain merges, and the merged file restores to what the guest computes.
    let out = run(&["snapshot", "merge", "--out", merged_s, full_s, diff_s]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = run(&["restore", merged_s, "--generation", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        seq_result(&text(&out.stdout)).as_deref(),
        Some(want),
        "{}",
        text(&out.stdout)
    );
}

/// An OS error that its message already states is not repeated as its cause; internal names
/// stay out of messages.
#[test]
fn error_messages_say_each_thing_once_in_the_users_words() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.snap");
    let out = run(&["restore", missing.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.matches("(os error 2)").count(),
        1,
        "the OS error is said twice: {stderr}"
    );
    let out = run(&["run", "--disk", dir.path().to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches("is a directory").count(), 1, "{stderr}");
    // A state directory with no VM in it: named as users know it, not as a "sink".
    let empty = common::shm();
    let out = run(&["recover", "--state", empty.path().to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("state directory"), "{stderr}");
    assert!(!stderr.contains("sink"), "{stderr}");
    let out = run(&["restore", "--dir", dir.path().to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("snapshot directory {}", dir.path().display())),
        "{stderr}"
    );
    assert!(!stderr.contains("sink"), "{stderr}");
}

/// Colour codes only on a terminal: stderr here is a pipe, as when it goes to a file.
#[test]
fn no_colour_codes_when_stderr_is_not_a_terminal() {
    let out = rebound()
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .args(["--log-level", "info", "run", "--bundled", "testguest"])
        .args(["--mem-mib", "16", "--args", "exit 0"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("INFO"), "no log line to check: {stderr}");
    assert!(!stderr.contains('\x1b'), "colour codes in {stderr:?}");
    let out = rebound()
        .env_remove("NO_COLOR")
        .args(["run", "--vcpus", "x"])
        .output()
        .unwrap();
    assert!(
        !text(&out.stderr).contains('\x1b'),
        "{:?}",
        text(&out.stderr)
    );
}

/// `--api-sock` is where a VMM serves its API, and where the client commands find it: the help
/// says which.
#[test]
fn api_sock_help_says_serving_and_talking_to() {
    for cmd in [
        vec!["checkpoint", "--help"],
        vec!["snapshot", "create", "--help"],
        vec!["run", "--help"],
    ] {
        let help = text(&run(&cmd).stdout);
        let line = help
            .lines()
            .skip_while(|l| !l.contains("--api-sock"))
            .take_while(|l| !l.trim_start().starts_with("--id"))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(line.contains("serve"), "{cmd:?}: {line}");
        assert!(line.contains("running VMM to talk to"), "{cmd:?}: {line}");
    }
}

#[test]
fn guests_lists_each_guests_modes_and_arguments() {
    let out = run(&["guests"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    for want in [
        "demo: ",
        "[blocks=N] [tasks=T]",
        "testguest: ",
        "seq [N] [REPORT]",
        "ticks [MS] [COUNT]",
        "pong REGION [COUNT] [always|idle] [nopoll]",
        "e.g. rebound run --bundled testguest --args",
    ] {
        assert!(stdout.contains(want), "{want:?} missing from:\n{stdout}");
    }
    // Every mode of the table is shown.
    let testguest = rebound_guests::GUESTS
        .iter()
        .find(|g| g.name == "testguest")
        .unwrap();
    for m in testguest.modes {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(m.name)),
            "mode {} missing",
            m.name
        );
    }
}

#[test]
fn fault_cpu_refuses_a_cpu_the_host_does_not_have() {
    // A private record: marking CPUs failed in the default one would reach every Rebound
    // process on the host, other tests' included.
    let host = common::shm();
    let fault = |args: &[&str]| {
        rebound()
            .env("REBOUND_HOST_DIR", host.path())
            .args(["fault", "cpu"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = fault(&["1000"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("host CPU 1000 does not exist"), "{stderr}");
    assert!(!stderr.contains("marked failed"), "{stderr}");
    assert!(!host.path().join("cpu-1000").exists());
    let out = fault(&["1000", "--repair"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    // CPU 0 exists everywhere.
    let out = fault(&["0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(host.path().join("cpu-0").exists());
    let out = fault(&["0", "--repair"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!host.path().join("cpu-0").exists());
}

#[test]
fn api_sock_never_replaces_what_is_not_a_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("precious.txt");
    std::fs::write(&file, "do not delete\n").unwrap();
    // (Had it replaced the file, it would now serve the API there until killed.)
    let child = rebound()
        .args(["--api-sock", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::output_within(child, "rebound --api-sock FILE", Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "do not delete\n",
        "the file was replaced"
    );
    let out = run(&[
        "run",
        "--bundled",
        "testguest",
        "--api-sock",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(dir.path().is_dir());
}

#[test]
fn the_api_socket_is_removed_when_the_vmm_ends() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    // The guest ends.
    let out = run(&[
        "run",
        "--bundled",
        "testguest",
        "--mem-mib",
        "16",
        "--args",
        "exit 3",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        !sock.exists(),
        "the socket outlived a VMM whose guest ended"
    );
    // SIGTERM and SIGINT: the socket goes, and the process still dies of the signal.
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut child = rebound()
            .args(["--api-sock", sock.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_socket(&sock, &mut child);
        // SAFETY: signals our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let out = common::output_within(child, "rebound after a signal", Duration::from_secs(30));
        assert_eq!(out.status.signal(), Some(sig), "{}", text(&out.stderr));
        assert!(
            !sock.exists(),
            "the socket outlived a VMM killed by signal {sig}"
        );
    }
}
