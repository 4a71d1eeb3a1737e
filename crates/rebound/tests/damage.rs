//! Damaged state directories (issue 8: no silent wrong state from damaged files).
//!
//! A real state directory is made by running the bundled testguest protected and killing its
//! VMM at a kill point; then, for every kind of damage, a copy of it is damaged and recovered.
//! Recovery must either refuse clearly (non-zero exit, a message naming what is wrong) and
//! leave every file byte-identical, or, for damage it is designed to tolerate, resume to
//! exactly the output of an uninterrupted run. The guest's output depends on its memory (a
//! table of 4096 earlier values), so resuming from wrong memory shows in the output.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rebound_checkpoint::recovery::{Plan, check};
use rebound_checkpoint::state_dir::{StateDir, UNDO_ENTRY, UNDO_HEADER};
use rebound_guests::testguest::seq_output;

const N: u64 = 300_000_000;
const REPORT: u64 = 1_000_000;

fn run_cmd(dir: &Path, fault: &str) -> Command {
    let mut c = rebound();
    c.args(["run", "--bundled", "testguest", "--mem-mib", "32", "--args"])
        .arg(format!("seq {N} {REPORT}"))
        .arg("--state")
        .arg(dir)
        .args(["--protect-ms", "20"])
        .env("REBOUND_FAULTS", fault)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn recover_cmd(dir: &Path) -> Command {
    let mut c = rebound();
    c.arg("recover")
        .arg("--state")
        .arg(dir)
        .args(["--protect-ms", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn killed(c: &mut Command, what: &str) -> Output {
    let out = output_within(c.spawn().unwrap(), what, Duration::from_secs(120));
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{what}: the kill point was not reached: {}",
        text(&out.stderr)
    );
    out
}

/// Every file in `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn record(epoch: u64) -> String {
    format!("checkpoint-{epoch:010}")
}

fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
}

fn set_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn append(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

fn plan(dir: &Path) -> Plan {
    check(&StateDir::open(dir).unwrap()).unwrap()
}

/// A directory killed in the middle of an epoch: its journal has committed entries, its
/// committed checkpoint has a predecessor record, and output was released before it (what
/// each damage below needs). The kill point is deterministic, but how far the guest got by
/// then depends on the host, so a run that got too little is done again, later.
fn base_directory(root: &Path) -> (std::path::PathBuf, Plan) {
    for kill_at in [100, 200, 400] {
        let dir = root.join(format!("base-{kill_at}"));
        killed(
            &mut run_cmd(&dir, &format!("kill:journal-append:{kill_at}")),
            "the base run",
        );
        let p = plan(&dir);
        if !p.undo.is_empty()
            && p.output.offset > 0
            && dir.join(record(p.committed.epoch - 1)).exists()
        {
            return (dir, p);
        }
        eprintln!(
            "kill at append {kill_at}: checkpoint {}, {} journaled pages, output offset {}: too early, again",
            p.committed.epoch,
            p.undo.len(),
            p.output.offset
        );
    }
    panic!("no run got far enough to damage");
}

enum Expect {
    /// Refused, naming this.
    Refused(&'static str),
    /// Recovered to exactly the uninterrupted output.
    Tolerated,
}

#[test]
fn a_damaged_state_directory_is_refused_untouched_or_recovers_exactly() {
    let expected = seq_output(N, REPORT);
    let tmp = shm();
    let root = tmp.path();
    let (base, p) = base_directory(root);
    let c = p.committed.epoch;
    eprintln!(
        "base: committed checkpoint {c}, {} journaled pages, output {}..{}",
        p.undo.len(),
        p.output.offset,
        p.output.offset + p.output.bytes.len() as u64
    );
    // Another VM, killed just after a checkpoint: its records are well-formed but not ours.
    let other = root.join("other");
    killed(
        &mut run_cmd(&other, "kill:after-journal-reset:4"),
        "the other VM",
    );
    let other_record = std::fs::read_dir(&other)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("checkpoint-")
        })
        .max()
        .unwrap();
    // The same VM one checkpoint later (recovered, then killed at its first journal append):
    // base's journal and head are from the time before.
    let later = root.join("later");
    copy_dir(&base, &later);
    killed(
        recover_cmd(&later).env("REBOUND_FAULTS", "kill:journal-append:1"),
        "the later run",
    );
    assert_eq!(plan(&later).committed.epoch, c + 1);

    // A journal in the format of Rebound 0.1 (from the fixture of survive.rs).
    let fixture = root.join("fixture");
    std::fs::create_dir(&fixture).unwrap();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/state-v0.1.tar.gz"
        ))
        .arg("-C")
        .arg(&fixture)
        .status()
        .unwrap();
    assert!(st.success());
    let old_journal = fixture.join("state/undo");

    type Damage = Box<dyn Fn(&Path)>;
    let b = base.clone();
    let cases: Vec<(&str, &Path, Damage, Expect)> = vec![
        (
            "journal truncated to its header",
            &base,
            Box::new(|d| set_len(&d.join("undo"), UNDO_HEADER)),
            Expect::Refused("entries were committed"),
        ),
        (
            "journal cut inside a committed entry",
            &base,
            Box::new(|d| set_len(&d.join("undo"), UNDO_HEADER + UNDO_ENTRY / 2)),
            Expect::Refused("entries were committed"),
        ),
        (
            "a bit flipped in a journaled page",
            &base,
            Box::new(|d| flip(&d.join("undo"), UNDO_HEADER + 100)),
            Expect::Refused("fails its checksum"),
        ),
        (
            "a bit flipped in the journal's header",
            &base,
            Box::new(|d| flip(&d.join("undo"), 33)),
            Expect::Refused("undo journal is missing or damaged"),
        ),
        (
            "journal deleted",
            &base,
            Box::new(|d| std::fs::remove_file(d.join("undo")).unwrap()),
            Expect::Refused("undo journal is missing"),
        ),
        (
            "a journal of Rebound 0.1 swapped in",
            &base,
            Box::new(move |d| {
                std::fs::copy(&old_journal, d.join("undo"))
                    .map(drop)
                    .unwrap()
            }),
            Expect::Refused("format of Rebound 0.1"),
        ),
        (
            "a torn append after the committed entries",
            &base,
            Box::new(|d| append(&d.join("undo"), &[0x5a; 3000])),
            Expect::Tolerated,
        ),
        (
            "newest record deleted",
            &base,
            Box::new(move |d| std::fs::remove_file(d.join(record(c))).unwrap()),
            Expect::Refused("is missing"),
        ),
        (
            "a byte flipped in the newest record",
            &base,
            Box::new(move |d| flip(&d.join(record(c)), 4096 + 40)),
            Expect::Refused("checkpoint-"),
        ),
        (
            "a byte flipped in the record before it (not needed)",
            &base,
            Box::new(move |d| flip(&d.join(record(c - 1)), 4096 + 40)),
            Expect::Tolerated,
        ),
        (
            "the record before copied over the newest",
            &base,
            Box::new(move |d| {
                std::fs::copy(d.join(record(c - 1)), d.join(record(c)))
                    .map(drop)
                    .unwrap()
            }),
            Expect::Refused("is not the checkpoint its undo journal is based on"),
        ),
        (
            "another VM's record copied over the newest",
            &base,
            Box::new({
                let o = other_record.clone();
                move |d| std::fs::copy(&o, d.join(record(c))).map(drop).unwrap()
            }),
            Expect::Refused("is not the checkpoint its undo journal is based on"),
        ),
        (
            "another VM's record copied in as a newer one",
            &base,
            Box::new({
                let o = other_record.clone();
                move |d| std::fs::copy(&o, d.join(record(c + 3))).map(drop).unwrap()
            }),
            Expect::Refused("does not follow it"),
        ),
        (
            "memory file truncated",
            &base,
            Box::new(|d| set_len(&d.join("memory"), 16 << 20)),
            Expect::Refused("memory file"),
        ),
        (
            "memory file grown",
            &base,
            Box::new(|d| set_len(&d.join("memory"), 48 << 20)),
            Expect::Refused("memory file"),
        ),
        (
            "console.log cut before the released output",
            &base,
            Box::new(move |d| set_len(&d.join("console.log"), p.output.offset - 1)),
            Expect::Refused("console.log"),
        ),
        (
            "console.log with bytes no checkpoint released",
            &base,
            // Past the end of what the committed checkpoint releases (inside it, recovery
            // writes the released bytes over whatever is there).
            Box::new(|d| append(&d.join("console.log"), &[b'x'; 64 << 10])),
            Expect::Refused("console.log"),
        ),
        (
            "head deleted",
            &base,
            Box::new(|d| std::fs::remove_file(d.join("head")).unwrap()),
            Expect::Refused("head file is missing"),
        ),
        (
            "a bit flipped in the head",
            &base,
            Box::new(|d| flip(&d.join("head"), 10)),
            Expect::Refused("head file"),
        ),
        (
            "stdout progress deleted (only stdout's hand-off needs it)",
            &base,
            Box::new(|d| std::fs::remove_file(d.join("console.shown")).unwrap()),
            Expect::Tolerated,
        ),
        (
            "the journal of the epoch before swapped in",
            &later,
            Box::new(move |d| {
                std::fs::copy(b.join("undo"), d.join("undo"))
                    .map(drop)
                    .unwrap()
            }),
            Expect::Refused("from another time"),
        ),
        (
            "the head of the epoch before (as a crash between journal and head leaves it)",
            &later,
            Box::new({
                let b = base.clone();
                move |d| {
                    std::fs::copy(b.join("head"), d.join("head"))
                        .map(drop)
                        .unwrap()
                }
            }),
            Expect::Tolerated,
        ),
    ];
    for (i, (what, from, damage, expect)) in cases.into_iter().enumerate() {
        let dir = root.join(format!("case-{i}"));
        copy_dir(from, &dir);
        damage(&dir);
        let before = files(&dir);
        let out = output_within(
            recover_cmd(&dir).spawn().unwrap(),
            what,
            Duration::from_secs(120),
        );
        let stderr = text(&out.stderr);
        match expect {
            Expect::Refused(phrase) => {
                assert_eq!(out.status.code(), Some(1), "{what}: not refused: {stderr}");
                assert!(stderr.contains(phrase), "{what}: {stderr}");
                let after = files(&dir);
                assert_eq!(
                    before.keys().collect::<Vec<_>>(),
                    after.keys().collect::<Vec<_>>(),
                    "{what}: the refusal added or removed files"
                );
                for (name, bytes) in &before {
                    assert!(after[name] == *bytes, "{what}: the refusal changed {name}");
                }
                eprintln!("{what}: refused: {}", stderr.trim());
            }
            Expect::Tolerated => {
                assert_eq!(out.status.code(), Some(0), "{what}: {stderr}");
                let log = text(&std::fs::read(dir.join("console.log")).unwrap());
                assert!(
                    log == expected,
                    "{what}: the output differs from an uninterrupted run"
                );
                eprintln!("{what}: recovered exactly");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// How much of `second` repeats the end of `first`, if `first` then the rest of `second` is
/// exactly `expected`: the one repeat docs/survival.md allows (what stdout got after the last
/// record of how far it got, before the kill).
fn repeated(first: &str, second: &str, expected: &str) -> Option<usize> {
    let (a, b, want) = (first.as_bytes(), second.as_bytes(), expected.as_bytes());
    (0..=a.len().min(b.len()))
        .find(|&k| a.ends_with(&b[..k]) && want.strip_prefix(a) == Some(&b[k..]))
}

/// Item 5 of issue 8: a user reads stdout, so what a committed checkpoint released must reach
/// it even when the VMM is killed before showing it. The stdout of the killed run and of the
/// recovery, one after the other, is the uninterrupted output: nothing missing, and nothing
/// repeated when the kill came in the checkpoint thread (which also releases output). A kill
/// in the fault handler may land while output is being shown: then the recovery may show
/// again what stdout got after its last progress record, and nothing else.
#[test]
fn stdout_of_a_killed_run_and_its_recovery_is_the_uninterrupted_output() {
    let expected = seq_output(N, REPORT);
    for (fault, may_repeat) in [
        ("kill:after-record:10", false),
        ("kill:after-journal-reset:8", false),
        ("kill:before-record:6", false),
        ("kill:journal-append:60", true),
    ] {
        let tmp = shm();
        let dir = tmp.path().join("vm");
        let first = killed(&mut run_cmd(&dir, fault), fault);
        let second = output_within(
            recover_cmd(&dir).spawn().unwrap(),
            fault,
            Duration::from_secs(120),
        );
        assert_eq!(
            second.status.code(),
            Some(0),
            "{fault}: {}",
            text(&second.stderr)
        );
        let (first, second) = (text(&first.stdout), text(&second.stdout));
        match repeated(&first, &second, &expected) {
            Some(0) => {}
            Some(k) if may_repeat => eprintln!("{fault}: {k} bytes shown again"),
            found => {
                let stdout = first.clone() + &second;
                let (got, want): (Vec<_>, Vec<_>) =
                    (stdout.lines().collect(), expected.lines().collect());
                let at = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
                panic!(
                    "{fault}: stdout is not the uninterrupted output ({found:?} bytes repeated): at line {at} got {:?}, want {:?} ({} lines before the kill)",
                    got.get(at),
                    want.get(at),
                    first.lines().count()
                );
            }
        }
    }
}
