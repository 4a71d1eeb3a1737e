//! Taking over a VM from its state directory after the process that ran it ended (a crash, or
//! a live update): find the committed checkpoint, prove that memory, journal, records and log
//! belong to it, undo in place what the guest did after it, put back the output it released,
//! and hand its state to the VMM to resume.
//!
//! Why this yields the checkpoint and never a torn or foreign state (see `state_dir` for the
//! files; `docs/survival.md` for the whole argument):
//! - a record appears atomically (temp file, fsync, rename), only while the guest is frozen,
//!   and names the committed checkpoint it follows (epoch and random id);
//! - it is committed when the undo journal is reset to it (still frozen): the journal's header
//!   names its base checkpoint by epoch and id, and then the head file names it too;
//! - each page's old contents are appended to the journal and counted in its header before
//!   the guest may write the page. So with the journal based on C, memory is C plus the writes
//!   its committed entries undo; entries past the count were never let through (a torn append),
//!   and fewer complete entries than the count means damage: refuse;
//! - a crash after a record is written and before the journal names it leaves that record
//!   uncommitted: recovery goes to the checkpoint the journal names (memory minus the journal
//!   is that one) and removes the record, which must follow it;
//! - the head is either the journal's base or (a crash between the two writes) the checkpoint
//!   that base follows; anything else means an older journal or head was put back: refuse;
//! - output: record C holds every byte released up to C with its offset in the console log;
//!   the log must reach that offset, and writing the bytes again there and cutting the log
//!   after them is idempotent, so output seen before the crash is neither lost nor repeated.
//!
//! Everything is checked ([`check`]) before anything is written, so a refusal leaves the
//! directory as it was. Every step after that is idempotent: a crash during recovery is
//! recovered the same way.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use rebound_snapshot::format::Verify;
use rebound_snapshot::{PAGE_SIZE, Snapshot};
use rebound_vmm::persist::{DiskDescriptor, SavedState, read_chain};

use crate::state_dir::{
    CHAIN_SECTION, ChainRecord, OUTPUT_SECTION, OutputRecord, StateDir, UndoEntry, UndoJournal,
    replay_output,
};
use crate::{CheckpointRef, Error};

/// A VM ready to be resumed from its state directory.
#[derive(Debug)]
pub struct Prepared {
    /// The state to resume (memory is already back to it, in the directory's memory file).
    pub state: SavedState,
    /// The checkpoint it is.
    pub epoch: u64,
    /// Where the console log ends (output released up to the checkpoint).
    pub output_end: u64,
    /// Pages written back from the undo journal.
    pub undone_pages: usize,
}

/// What recovery found and will do: everything in the directory was checked, nothing written.
#[derive(Debug)]
pub struct Plan {
    /// The committed checkpoint the VM goes back to.
    pub committed: CheckpointRef,
    /// Its state.
    pub state: SavedState,
    /// The output it releases.
    pub output: OutputRecord,
    /// Journaled pages to write back (memory is the checkpoint plus the writes they undo).
    pub undo: Vec<UndoEntry>,
    /// Records written after it that a crash left uncommitted (removed).
    pub uncommitted: Vec<PathBuf>,
}

fn err(dir: &StateDir, reason: impl std::fmt::Display) -> Error {
    Error::Sink {
        sink: format!("state directory {}", dir.path().display()),
        reason: reason.to_string(),
    }
}

fn name(path: &std::path::Path) -> String {
    path.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// Puts the directory's memory and console log back to its committed checkpoint.
///
/// The caller must hold the directory's claim ([`StateDir::claim`]).
pub fn prepare(dir: &StateDir) -> Result<Prepared, Error> {
    prepare_accepting(dir, |_| Ok(()))
}

/// [`prepare`], refusing before anything is written if `accept` refuses the state (what the
/// caller needs beyond the directory: the disk it must name, for one).
pub fn prepare_accepting(
    dir: &StateDir,
    accept: impl FnOnce(&SavedState) -> Result<(), String>,
) -> Result<Prepared, Error> {
    if let Some((reason, code, output)) = dir.ended() {
        // Its last output may not have reached the log before the process died.
        replay_output(&dir.console_log(), &output)
            .map_err(|e| err(dir, format!("cannot restore the console log: {e}")))?;
        return Err(Error::Ended { reason, code });
    }
    let plan = check(dir)?;
    accept(&plan.state).map_err(|e| err(dir, e))?;
    apply(dir, plan)
}

/// Checks that the directory's memory, undo journal, head, records and console log belong to
/// one committed checkpoint, and says how to go back to it. Reads only.
pub fn check(dir: &StateDir) -> Result<Plan, Error> {
    if let Some(reason) = dir.lost() {
        return Err(err(
            dir,
            format!("it cannot be recovered: {}", reason.trim()),
        ));
    }
    let journal = UndoJournal::read(&dir.undo())
        .map_err(|e| err(dir, format!("its undo journal is damaged: {e}")))?
        .ok_or_else(|| {
            err(
                dir,
                "its undo journal is missing or damaged: memory cannot be brought back to a checkpoint",
            )
        })?;
    let (committed, snap, undo, uncommitted) = if journal.version == 1 {
        check_v1(dir, journal)?
    } else {
        check_v2(dir, journal)?
    };
    let state = read_chain(std::slice::from_ref(&snap)).map_err(|e| err(dir, e))?;
    let output: OutputRecord = snap.decode(OUTPUT_SECTION, 1).map_err(|e| err(dir, e))?;
    let mem_size = state.vm.mem_size;
    if let Some((page, _)) = undo
        .iter()
        .find(|(p, _)| p.checked_mul(PAGE_SIZE).is_none_or(|a| a >= mem_size))
    {
        return Err(err(
            dir,
            format!("its undo journal names page {page}, outside guest memory"),
        ));
    }
    let memory_len = std::fs::metadata(dir.memory())
        .map_err(|e| err(dir, format!("cannot read its memory file: {e}")))?
        .len();
    if memory_len != mem_size {
        return Err(err(
            dir,
            format!(
                "its memory file is {memory_len} bytes, but checkpoint {} has {mem_size} bytes of guest memory: it was cut or grown",
                committed.epoch
            ),
        ));
    }
    // A disk kept in the directory (a scratch disk) is the VM's too.
    if let Some(DiskDescriptor::File { path, size, .. }) = &state.vm.disk
        && path.starts_with(dir.path())
    {
        let len = std::fs::metadata(path).map_or(0, |m| m.len());
        if len != *size {
            return Err(err(
                dir,
                format!(
                    "{} is {len} bytes, but the VM had a {size}-byte disk there",
                    name(path)
                ),
            ));
        }
    }
    let log_len = std::fs::metadata(dir.console_log()).map_or(0, |m| m.len());
    let end = output.offset.saturating_add(output.bytes.len() as u64);
    if log_len < output.offset {
        return Err(err(
            dir,
            format!(
                "console.log is {log_len} bytes, but output up to byte {} was released before checkpoint {}: released output is missing from it",
                output.offset, committed.epoch
            ),
        ));
    }
    if log_len > end {
        return Err(err(
            dir,
            format!(
                "console.log is {log_len} bytes, but checkpoint {} released output only up to byte {end}: it holds output no checkpoint released",
                committed.epoch
            ),
        ));
    }
    Ok(Plan {
        committed,
        state,
        output,
        undo,
        uncommitted,
    })
}

type Found = (CheckpointRef, Snapshot, Vec<UndoEntry>, Vec<PathBuf>);

fn open_record(dir: &StateDir, path: &std::path::Path) -> Result<(Snapshot, ChainRecord), Error> {
    let snap = Snapshot::open(path, Verify::Full).map_err(|e| err(dir, e))?;
    if !snap.has_section(CHAIN_SECTION) {
        return Err(err(
            dir,
            format!(
                "{} does not say which checkpoint it follows (no \"chain\" section)",
                name(path)
            ),
        ));
    }
    let chain = snap.decode(CHAIN_SECTION, 1).map_err(|e| err(dir, e))?;
    Ok((snap, chain))
}

/// Format 2: the journal names the committed checkpoint; everything else must agree.
fn check_v2(dir: &StateDir, journal: crate::state_dir::JournalContents) -> Result<Found, Error> {
    let c = journal
        .base
        .ok_or_else(|| err(dir, "it holds no committed checkpoint yet"))?;
    let path = dir.record(c.epoch);
    if !path.exists() {
        return Err(err(
            dir,
            format!(
                "its undo journal is based on checkpoint {}, but {} is missing",
                c.epoch,
                name(&path)
            ),
        ));
    }
    let (snap, chain) = open_record(dir, &path)?;
    if snap.meta().id != c.id || snap.meta().epoch != c.epoch {
        return Err(err(
            dir,
            format!(
                "{} is not the checkpoint its undo journal is based on (another VM's, or one from another time)",
                name(&path)
            ),
        ));
    }
    let head = dir.read_head().map_err(|e| {
        err(
            dir,
            if e.kind() == std::io::ErrorKind::NotFound {
                "its head file is missing".to_string()
            } else {
                format!("its head file: {e}")
            },
        )
    })?;
    // The head is written after the journal: it is the journal's base, or the checkpoint that
    // base follows (a crash between the two writes). Anything else was put back from
    // another time.
    if head != Some(c) && chain.follows != head {
        return Err(err(
            dir,
            format!(
                "its undo journal is based on checkpoint {} but its head file names {}: one of them is from another time",
                c.epoch,
                head.map_or_else(|| "none".to_string(), |h| format!("checkpoint {}", h.epoch))
            ),
        ));
    }
    // Newer records: only the one a crash left uncommitted, which follows the committed one.
    let mut uncommitted = Vec::new();
    for (epoch, path) in dir.records()? {
        if epoch <= c.epoch {
            continue;
        }
        let (newer, chain) = open_record(dir, &path)?;
        if chain.follows != Some(c) || newer.meta().epoch != epoch || !uncommitted.is_empty() {
            return Err(err(
                dir,
                format!(
                    "{} is newer than the committed checkpoint {} but does not follow it: it does not belong to this VM's history",
                    name(&path),
                    c.epoch
                ),
            ));
        }
        uncommitted.push(path);
    }
    Ok((c, snap, journal.entries, uncommitted))
}

/// Format 1 (Rebound 0.1): the newest record is committed; the journal undoes memory to it if
/// based on it, and otherwise the process died while the guest was frozen at it.
fn check_v1(dir: &StateDir, journal: crate::state_dir::JournalContents) -> Result<Found, Error> {
    let (epoch, path) = dir
        .records()?
        .pop()
        .ok_or_else(|| err(dir, "it holds no committed checkpoint yet"))?;
    let snap = Snapshot::open(&path, Verify::Full).map_err(|e| err(dir, e))?;
    let c = CheckpointRef {
        epoch,
        id: snap.meta().id,
    };
    // A format-1 journal belongs with format-1 records; the only head beside it is the one a
    // recovery converting the directory wrote just before it died (naming this record).
    let head = dir.read_head();
    if snap.has_section(CHAIN_SECTION)
        || head.as_ref().is_ok_and(|h| *h != Some(c))
        || head
            .as_ref()
            .is_err_and(|e| e.kind() != std::io::ErrorKind::NotFound)
    {
        return Err(err(
            dir,
            "its undo journal is in the format of Rebound 0.1 but the rest of the directory is not: it was put back from another time",
        ));
    }
    let undo = if journal.base.map(|b| b.epoch) == Some(epoch) {
        journal.entries
    } else {
        Vec::new()
    };
    Ok((c, snap, undo, Vec::new()))
}

/// Carries out a checked plan: memory, head, journal and console log back to the checkpoint.
fn apply(dir: &StateDir, plan: Plan) -> Result<Prepared, Error> {
    let Plan {
        committed,
        state,
        output,
        undo,
        uncommitted,
    } = plan;
    dir.remove_temporaries();
    for path in &uncommitted {
        std::fs::remove_file(path)
            .map_err(|e| err(dir, format!("cannot remove {}: {e}", name(path))))?;
    }
    if !undo.is_empty() {
        let memory = OpenOptions::new()
            .write(true)
            .open(dir.memory())
            .map_err(|e| err(dir, format!("cannot open guest memory: {e}")))?;
        // The oldest contents win if a page was journaled twice (after a rollback).
        for (page, bytes) in undo.iter().rev() {
            memory
                .write_all_at(bytes, page * PAGE_SIZE)
                .map_err(|e| err(dir, format!("cannot write guest memory back: {e}")))?;
        }
    }
    // Memory is the checkpoint now: the head and an empty journal say so (a format-1
    // directory becomes a format-2 one here).
    dir.write_head(Some(committed))
        .map_err(|e| err(dir, format!("cannot write the head file: {e}")))?;
    UndoJournal::create(&dir.undo(), Some(committed))
        .map_err(|e| err(dir, format!("cannot reset the undo journal: {e}")))?;
    let output_end = replay_output(&dir.console_log(), &output)
        .map_err(|e| err(dir, format!("cannot restore the console log: {e}")))?;
    Ok(Prepared {
        state,
        epoch: committed.epoch,
        output_end,
        undone_pages: undo.len(),
    })
}
