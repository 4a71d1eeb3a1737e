//! Damaged snapshot files (issue 8): every byte of a snapshot is covered by a checksum or must
//! be zero, so damage anywhere is refused, by name, before anything is built, and no byte the
//! format does not cover reaches a restored guest.
//!
//! The corpus is a real full snapshot and a real diff of the test guest: a bit flipped in every
//! header byte, every byte of every section, and every 4 KiB of the rest (padding, stored pages,
//! pages not stored, the memory index); truncations; appended data; chains out of order or on
//! the wrong parent. Files are validated with what restore runs first (`Snapshot::open` with
//! `Verify::Full`, then `read_chain`); a few damaged files are restored into real VMs.

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rebound_devices::console::SharedBuffer;
use rebound_snapshot::format::{Run, Verify};
use rebound_snapshot::{Kind, Snapshot};
use rebound_vmm::vm::RestoreOptions;
use rebound_vmm::{Vm, VmOutcome};
use vm_memory::{Bytes, GuestAddress};

/// Small enough that a bit flipped in every 4 KiB of a file is a few thousand opens.
const MEM_MIB: u64 = 16;
/// ~0.4 s of guest work natively: both snapshots land mid-run even when a loaded host starves
/// the test thread (as in snapshot.rs).
const N: u64 = 1 << 27;
const PAGE: u64 = 4096;

/// A full snapshot and a diff of it, taken mid-run, and what the guest computes.
struct Fixture {
    dir: tempfile::TempDir,
    full: PathBuf,
    diff: PathBuf,
    want: u64,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&format!("seq {N} {}", N / 64), 1, None);
    cfg.mem_size_mib = MEM_MIB;
    let (vm, out) = launch(&cfg);
    // Each snapshot waits for a line: the guest surely ran (and wrote pages) before it.
    let ran_on = |seen: usize| {
        assert!(
            wait_for(&out, Duration::from_secs(30), |o| o.lines().count() > seen),
            "the guest made no progress: {}",
            out.text()
        );
    };
    let full = dir.path().join("full.snap");
    let diff = dir.path().join("diff.snap");
    ran_on(0);
    vm.snapshot(&full, Kind::Full).unwrap();
    ran_on(out.text().lines().count());
    vm.snapshot(&diff, Kind::Diff).unwrap();
    vm.stop();
    vm.wait();
    Fixture {
        dir,
        full,
        diff,
        want: seq_expected(N, &[]),
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A snapshot file's layout, read here from docs/checkpoint.md's description (format 2), not
/// through the reader under test.
struct Layout {
    /// (name, start, end) of every section, the memory index last.
    sections: Vec<(&'static str, u64, u64)>,
    meta_end: u64,
    mem_offset: u64,
    mem_size: u64,
    len: u64,
}

fn layout(b: &[u8]) -> Layout {
    assert_eq!(&b[0..8], b"RBNDSNAP");
    assert_eq!(le32(b, 8), 2, "format version");
    let count = le32(b, 64) as usize;
    let sections: Vec<_> = (0..count)
        .map(|i| {
            let e = 80 + 32 * i;
            let name = match le32(b, e) {
                1 => "vm",
                2 => "vcpus",
                3 => "devices",
                4 => "memory",
                8 => "components",
                k => panic!("section kind {k} in the test guest's snapshot"),
            };
            let (offset, len) = (le64(b, e + 8), le64(b, e + 16));
            (name, offset, offset + len)
        })
        .collect();
    let l = Layout {
        meta_end: sections[sections.len() - 2].2,
        mem_offset: le64(b, 56),
        mem_size: le64(b, 48),
        len: le64(b, 72),
        sections,
    };
    // Nothing unaccounted for: the header, sections back to back, zeros up to the memory
    // image, the image, the index, the end.
    assert_eq!(l.sections[0].1, 4096);
    for w in l.sections.windows(2).take(l.sections.len() - 2) {
        assert_eq!(w[0].2, w[1].1, "sections back to back");
    }
    assert_eq!(l.mem_offset, l.meta_end.next_multiple_of(2 << 20));
    assert_eq!(l.sections[count - 1].1, l.mem_offset + l.mem_size);
    assert_eq!(l.sections[count - 1].2, l.len);
    assert_eq!(l.len, b.len() as u64);
    l
}

/// What the refusal of a bit flipped at `at` must say.
fn flip_message(l: &Layout, runs: &[Run], at: u64) -> String {
    if at < 8 {
        return "is not a Rebound snapshot (bad magic)".into();
    }
    if at < 12 {
        return "section \"header\" fails its checksum (it says format version".into();
    }
    if at < 4096 {
        return "section \"header\" fails its checksum".into();
    }
    if let Some((name, _, _)) = l.sections.iter().find(|s| (s.1..s.2).contains(&at)) {
        return format!("section \"{name}\" fails its checksum");
    }
    if at < l.mem_offset {
        return format!(
            "the padding before the memory image holds a non-zero byte at file offset {at:#x}"
        );
    }
    let page = (at - l.mem_offset) / PAGE;
    match runs
        .iter()
        .find(|r| (r.first..r.first + r.count).contains(&page))
    {
        Some(r) => format!(
            "section \"memory\" pages {:#x}..{:#x} fail their checksum",
            r.first,
            r.first + r.count
        ),
        None => format!(
            "memory page {page:#x} (not stored) holds a non-zero byte at file offset {at:#x}"
        ),
    }
}

/// Writes `bytes` as a sparse file (zero blocks left as holes, as the writer leaves them).
fn sparse_copy(bytes: &[u8], path: &Path) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    for (i, block) in bytes.chunks(PAGE as usize).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, i as u64 * PAGE).unwrap();
        }
    }
    f
}

/// Makes `[at, at + len)` a hole again (it holds zeros in the pristine file).
fn punch(f: &File, at: u64, len: u64) {
    // SAFETY: fallocate on a descriptor this test owns; it changes only that file.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at as i64,
            len as i64,
        )
    };
    assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
}

fn refusal(path: &Path) -> String {
    match Snapshot::open(path, Verify::Full) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Flips one bit at every offset of `offsets` in a copy of `pristine` and checks each is
/// refused with the message its region calls for. Returns how many were tried.
fn flip_corpus(pristine: &[u8], work: &Path, offsets: &[u64]) -> usize {
    let l = layout(pristine);
    let f = sparse_copy(pristine, work);
    let runs = Snapshot::open(work, Verify::Full)
        .expect("the undamaged copy opens")
        .runs()
        .to_vec();
    let name = work.display().to_string();
    for &at in offsets {
        let original = pristine[at as usize];
        let bit = (at ^ (at >> 12)) % 8;
        f.write_all_at(&[original ^ (1 << bit)], at).unwrap();
        let e = refusal(work);
        let want = flip_message(&l, &runs, at);
        assert!(
            e.contains(&want) && e.contains(&name),
            "bit {bit} of byte {at:#x}: {e:?} should say {want:?}"
        );
        f.write_all_at(&[original], at).unwrap();
        // Keep the copy as sparse as the original, so checking stays as cheap as on a real file.
        let block = at / PAGE * PAGE;
        let end = (block + PAGE).min(pristine.len() as u64);
        if pristine[block as usize..end as usize]
            .iter()
            .all(|&b| b == 0)
        {
            punch(&f, block, end - block);
        }
    }
    Snapshot::open(work, Verify::Full).expect("the copy is whole again");
    offsets.len()
}

/// Every header byte, every section byte, the padding's and every memory run's first and last
/// bytes, and one byte in every 4 KiB of the file (at a varying place in the page).
fn corpus_offsets(pristine: &[u8]) -> Vec<u64> {
    let l = layout(pristine);
    let runs = runs_of(pristine);
    let mut at: Vec<u64> = (0..4096).collect();
    for &(_, start, end) in &l.sections {
        at.extend(start..end);
    }
    at.extend([l.meta_end, l.mem_offset - 1]);
    for r in &runs {
        let (a, b) = (
            l.mem_offset + r.first * PAGE,
            l.mem_offset + (r.first + r.count) * PAGE,
        );
        at.extend([a, b - 1]);
        // The pages on either side of a run are not stored (or start the next run).
        if r.first > 0 {
            at.push(a - 1);
        }
        if r.first + r.count < l.mem_size / PAGE {
            at.push(b);
        }
    }
    at.extend((0..l.len / PAGE).map(|k| k * PAGE + (k * 1031) % PAGE));
    at.retain(|&a| a < l.len);
    at.sort_unstable();
    at.dedup();
    at
}

fn runs_of(pristine: &[u8]) -> Vec<Run> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("runs.snap");
    sparse_copy(pristine, &p);
    Snapshot::open(&p, Verify::Full).unwrap().runs().to_vec()
}

#[test]
fn every_flipped_bit_is_refused_by_name() {
    let fx = fixture();
    for (what, path) in [("full", &fx.full), ("diff", &fx.diff)] {
        let pristine = std::fs::read(path).unwrap();
        let l = layout(&pristine);
        let runs = runs_of(&pristine);
        let stored: u64 = runs.iter().map(|r| r.count).sum();
        assert!(
            stored > 0 && stored < l.mem_size / PAGE / 2,
            "{what}: {stored} pages stored"
        );
        let offsets = corpus_offsets(&pristine);
        // Every region is hit: header, each section, padding, stored pages, holes, the index.
        let msgs: std::collections::HashSet<String> = offsets
            .iter()
            .map(|&a| {
                let m = flip_message(&l, &runs, a);
                m.split(" at file offset")
                    .next()
                    .unwrap()
                    .split(" pages 0x")
                    .next()
                    .unwrap()
                    .split(" page 0x")
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        for want in [
            "is not a Rebound snapshot (bad magic)",
            "section \"header\" fails its checksum (it says format version",
            "section \"header\" fails its checksum",
            "section \"vm\" fails its checksum",
            "section \"components\" fails its checksum",
            "the padding before the memory image holds a non-zero byte",
            "section \"memory\"",
            "memory",
            "section \"memory\" fails its checksum",
        ] {
            assert!(msgs.contains(want), "{what}: no flip in {want:?}: {msgs:?}");
        }
        let work = fx.dir.path().join(format!("{what}-flipped.snap"));
        let n = flip_corpus(&pristine, &work, &offsets);
        assert!(n > 4096 + (l.len / PAGE) as usize, "{what}: only {n} flips");
    }
}

/// A copy of `pristine` cut to `len` bytes, or with `extra` appended.
fn altered(pristine: &[u8], path: &Path, len: usize, extra: &[u8]) {
    let mut b = pristine[..len].to_vec();
    b.extend_from_slice(extra);
    sparse_copy(&b, path);
}

#[test]
fn truncated_and_extended_files_are_refused() {
    let fx = fixture();
    for path in [&fx.full, &fx.diff] {
        let pristine = std::fs::read(path).unwrap();
        let l = layout(&pristine);
        let bad = fx.dir.path().join("bad.snap");
        let index = l.sections[l.sections.len() - 1];
        let runs = runs_of(&pristine);
        let in_stored = l.mem_offset + runs[0].first * PAGE + 100;
        let name = |at: u64| {
            l.sections
                .iter()
                .find(|s| s.0 != "memory" && s.2 > at)
                .map_or("memory", |s| s.0)
        };
        for cut in [
            0,
            7,
            100,
            4095,
            4099,
            l.sections[1].1 + 1,
            l.meta_end - 1,
            l.meta_end,
            l.meta_end + 5000,
            l.mem_offset,
            in_stored,
            index.1 - 1,
            index.1,
            index.1 + 1,
            l.len - 1,
        ] {
            altered(&pristine, &bad, cut as usize, &[]);
            let want = match cut {
                0..8 => "is not a Rebound snapshot".to_string(),
                8..4096 => "is truncated: section \"header\" is incomplete".to_string(),
                _ => format!("is truncated: section \"{}\" is incomplete", name(cut)),
            };
            let e = refusal(&bad);
            assert!(e.contains(&want), "cut at {cut}: {e:?} should say {want:?}");
        }
        for extra in [&[0u8][..], &[0u8; 4096], b"garbage\n", &pristine] {
            altered(&pristine, &bad, pristine.len(), extra);
            let e = refusal(&bad);
            let want = format!(
                "is {} bytes long but ends at byte {}",
                pristine.len() + extra.len(),
                pristine.len()
            );
            assert!(e.contains(&want), "{} appended: {e:?}", extra.len());
        }
    }
}

fn open(paths: &[&Path], verify: Verify) -> Vec<Snapshot> {
    paths
        .iter()
        .map(|p| Snapshot::open(p, verify).unwrap())
        .collect()
}

fn chain_refusal(chain: &[&Path]) -> String {
    let snaps = open(chain, Verify::Full);
    let e = rebound_vmm::persist::read_chain(&snaps)
        .expect_err("refused")
        .to_string();
    // Restore itself refuses it too, before building anything.
    let r = Vm::restore(&snaps, Box::new(std::io::sink()), 0)
        .err()
        .expect("restore refused");
    assert_eq!(r.to_string(), e);
    // So does merging.
    let out = chain[0].with_file_name("merged.snap");
    let m = rebound_snapshot::format::merge(&snaps, &out, 1).expect_err("merge refused");
    assert!(e.contains(&m.to_string()), "{e:?} / {m:?}");
    assert!(!out.exists());
    e
}

#[test]
fn chains_on_the_wrong_parent_or_out_of_order_are_refused() {
    let a = fixture();
    let b = fixture();
    // A second chain of the same VM: restored from a's, a new full snapshot and a diff of it.
    let (r, rout) = {
        let out = SharedBuffer::new();
        let vm = Vm::restore(
            &open(&[&a.full, &a.diff], Verify::Full),
            Box::new(out.clone()),
            0,
        )
        .unwrap();
        (vm, out)
    };
    let a2 = a.dir.path().join("full-a2.snap");
    let a3 = a.dir.path().join("diff-a3.snap");
    assert!(
        wait_for(&rout, Duration::from_secs(30), |o| o.lines().count() > 0),
        "{}",
        rout.text()
    );
    r.snapshot(&a2, Kind::Full).unwrap();
    let seen = rout.text().lines().count();
    assert!(wait_for(&rout, Duration::from_secs(30), |o| o
        .lines()
        .count()
        > seen));
    r.snapshot(&a3, Kind::Diff).unwrap();
    r.stop();
    r.wait();
    for (chain, want) in [
        (vec![&*b.full, &*a.diff], "is not a diff of"),
        (vec![&*a.full, &*a3], "its parent is snapshot"),
        (
            vec![&*a2, &*a.diff],
            "a diff of another snapshot, or the chain is out of order",
        ),
        (vec![&*a.full, &*a.diff, &*a.full], "it is a full snapshot"),
        (vec![&*a.diff], "starts with a full snapshot"),
        (vec![&*a.diff, &*a.full], "starts with a full snapshot"),
        (vec![&*a2, &*a3, &*a3], "is not a diff of"),
    ] {
        let e = chain_refusal(&chain);
        assert!(e.contains(want), "{chain:?}: {e:?} should say {want:?}");
    }
    // The right chain restores to what the guest computes (a's is restored in the next test).
    let out = SharedBuffer::new();
    let vm = Vm::restore(&open(&[&a2, &a3], Verify::Full), Box::new(out.clone()), 0).unwrap();
    assert_eq!(vm.wait(), VmOutcome::Exited { status: 0 }, "{}", out.text());
    assert_eq!(seq_result(&out.text()), Some(a.want));
}

/// Writes `bytes` into the snapshot at `path` at guest page `page`, which it must not store.
fn write_hole(path: &Path, runs: &[Run], page: u64, bytes: &[u8]) {
    assert!(
        !runs
            .iter()
            .any(|r| (r.first..r.first + r.count).contains(&page)),
        "page {page:#x} is stored"
    );
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut h = [0u8; 64];
    f.read_exact_at(&mut h, 0).unwrap();
    f.write_all_at(bytes, le64(&h, 56) + page * PAGE).unwrap();
}

fn restore_paused(chain: &[Snapshot]) -> Result<(Vm, SharedBuffer), rebound_vmm::Error> {
    let out = SharedBuffer::new();
    let vm = Vm::restore_with(
        chain,
        Box::new(out.clone()),
        RestoreOptions {
            generation: 0,
            paused: true,
            disk: None,
            same_vm: false,
            nic_backends: Vec::new(),
            net_journal: None,
            disk_journal: None,
            disk_mirror: None,
        },
    )?;
    Ok((vm, out))
}

/// Pages the snapshot does not store are never mapped from the file: bytes written there (not
/// covered by any checksum) are refused by a full check, and a metadata-only open (clones)
/// maps zero pages over them; the restored guest is the one the snapshot holds.
#[test]
fn bytes_where_a_page_is_not_stored_never_reach_the_guest() {
    let fx = fixture();
    let pristine = std::fs::read(&fx.full).unwrap();
    let runs = runs_of(&pristine);
    let pages = MEM_MIB << 8;
    let holes: Vec<u64> = (0..pages)
        .filter(|p| {
            !runs
                .iter()
                .any(|r| (r.first..r.first + r.count).contains(p))
        })
        .collect();
    // One page in the middle of guest memory, well away from anything stored.
    let page = holes[holes.len() / 2];
    let mut garbage = vec![0u8; PAGE as usize];
    garbage[123..150].copy_from_slice(b"not covered by any checksum");
    write_hole(&fx.full, &runs, page, &garbage);
    let e = refusal(&fx.full);
    assert!(
        e.contains(&format!(
            "memory page {page:#x} (not stored) holds a non-zero byte"
        )),
        "{e}"
    );

    let chain = open(&[&fx.full, &fx.diff], Verify::Metadata);
    assert_eq!(chain[0].unchecked_hole_data(), &[(page, 1)]);
    let (vm, out) = restore_paused(&chain).unwrap();
    let mut buf = vec![0xffu8; PAGE as usize];
    vm.memory()
        .read_slice(&mut buf, GuestAddress(page * PAGE))
        .unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "the guest sees the file's bytes"
    );
    vm.resume().unwrap();
    assert_eq!(vm.wait(), VmOutcome::Exited { status: 0 }, "{}", out.text());
    assert_eq!(seq_result(&out.text()), Some(fx.want));

    // A file that holds zeros where pages are not stored (copied without its holes, say) is
    // fine; past a thousand separate ranges restore reads and checks them instead of mapping
    // zero pages over each, and still refuses any that is not zero.
    let spread: Vec<u64> = holes
        .iter()
        .copied()
        .filter(|&p| p % 2 == 1 && p != page)
        .collect();
    assert!(spread.len() > 1024, "{} hole pages", spread.len());
    for &p in &spread {
        write_hole(&fx.full, &runs, p, &[0u8; PAGE as usize]);
    }
    let chain = open(&[&fx.full, &fx.diff], Verify::Metadata);
    let e = restore_paused(&chain).err().expect("refused").to_string();
    assert!(
        e.contains(&format!(
            "memory page {page:#x} (not stored) holds a non-zero byte"
        )),
        "{e}"
    );
    write_hole(&fx.full, &runs, page, &[0u8; PAGE as usize]);
    Snapshot::open(&fx.full, Verify::Full).expect("zeros are zeros, stored or not");
    let chain = open(&[&fx.full, &fx.diff], Verify::Metadata);
    assert!(chain[0].unchecked_hole_data().len() > 1024);
    let (vm, out) = restore_paused(&chain).unwrap();
    vm.resume().unwrap();
    assert_eq!(vm.wait(), VmOutcome::Exited { status: 0 }, "{}", out.text());
    assert_eq!(seq_result(&out.text()), Some(fx.want));
}
