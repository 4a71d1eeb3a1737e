//! Taking over a VM from its state directory after the process that ran it ended (a crash, or
//! a live update): find the newest committed checkpoint, undo in place what the guest did after
//! it, put back the output it released, and hand its state to the VMM to resume.
//!
//! Why this yields the checkpoint and never a torn state (see `state_dir` for the files):
//! - a checkpoint record appears atomically (temp file, fsync, rename), and only while the
//!   guest is frozen;
//! - the undo journal's base is the newest record whenever the guest runs: it is reset to a
//!   checkpoint only after that checkpoint's record is committed, still frozen, and each page's
//!   old contents are journaled before the guest may write the page;
//! - so with newest record C: a journal based on C is undone (memory was C plus the journaled
//!   writes); a journal based elsewhere means the process died while the guest was frozen at
//!   C (after the record, before the reset; or protection restarting after a recovery), so
//!   memory is C as it is; no valid journal means protection was lost: refuse.
//! - output: record C holds every byte released up to C with its offset in the console log;
//!   writing them again at that offset and cutting the log there is idempotent, so output seen
//!   before the crash is neither lost nor repeated.
//!
//! Every step is idempotent: a crash during recovery is recovered the same way.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use rebound_snapshot::format::Verify;
use rebound_snapshot::{PAGE_SIZE, Snapshot};
use rebound_vmm::persist::{SavedState, read_chain};

use crate::Error;
use crate::state_dir::{OUTPUT_SECTION, OutputRecord, StateDir, UndoJournal, replay_output};

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

fn err(dir: &StateDir, reason: impl std::fmt::Display) -> Error {
    Error::Sink {
        sink: format!("state directory {}", dir.path().display()),
        reason: reason.to_string(),
    }
}

/// Puts the directory's memory and console log back to its newest committed checkpoint.
///
/// The caller must hold the directory's claim ([`StateDir::claim`]).
pub fn prepare(dir: &StateDir) -> Result<Prepared, Error> {
    dir.remove_temporaries();
    if let Some((reason, code, output)) = dir.ended() {
        // Its last output may not have reached the log before the process died.
        replay_output(&dir.console_log(), &output)
            .map_err(|e| err(dir, format!("cannot restore the console log: {e}")))?;
        return Err(Error::Ended { reason, code });
    }
    if let Some(reason) = dir.lost() {
        return Err(err(
            dir,
            format!("it cannot be recovered: {}", reason.trim()),
        ));
    }
    let (epoch, path) = dir
        .records()?
        .pop()
        .ok_or_else(|| err(dir, "it holds no committed checkpoint yet"))?;
    let snap = Snapshot::open(&path, Verify::Full).map_err(|e| err(dir, e))?;
    let state = read_chain(std::slice::from_ref(&snap)).map_err(|e| err(dir, e))?;
    let output: OutputRecord = snap.decode(OUTPUT_SECTION, 1).map_err(|e| err(dir, e))?;
    let mem_size = state.vm.mem_size;

    let journal = UndoJournal::read(&dir.undo())
        .map_err(|e| err(dir, format!("cannot read the undo journal: {e}")))?;
    let undone_pages = match journal {
        None => {
            return Err(err(
                dir,
                "its undo journal is missing or damaged: memory cannot be brought back to a checkpoint",
            ));
        }
        Some((base, entries)) if base == epoch => {
            let memory = OpenOptions::new()
                .write(true)
                .open(dir.memory())
                .map_err(|e| err(dir, format!("cannot open guest memory: {e}")))?;
            // The oldest contents win if a page was journaled twice (after a rollback).
            for (page, bytes) in entries.iter().rev() {
                if page.checked_mul(PAGE_SIZE).is_none_or(|a| a >= mem_size) {
                    return Err(err(
                        dir,
                        format!("the undo journal names page {page}, outside guest memory"),
                    ));
                }
                memory
                    .write_all_at(bytes, page * PAGE_SIZE)
                    .map_err(|e| err(dir, format!("cannot write guest memory back: {e}")))?;
            }
            entries.len()
        }
        // The process died while the guest was frozen at this checkpoint.
        Some(_) => 0,
    };
    let output_end = replay_output(&dir.console_log(), &output)
        .map_err(|e| err(dir, format!("cannot restore the console log: {e}")))?;
    Ok(Prepared {
        state,
        epoch,
        output_end,
        undone_pages,
    })
}
