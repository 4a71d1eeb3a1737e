//! A hot standby's store: the VM's memory kept applied in place, in a state directory (the
//! same files the primary's local shadow keeps), so failover is `rebound recover --state`: the
//! memory file is mapped, not read or copied, and the VM resumes from the newest checkpoint.
//!
//! Each epoch is applied the way the primary's pre-image strategy keeps its own directory
//! recoverable: the old contents of every page about to change go to the undo journal first,
//! then the checkpoint's record, then the pages, and resetting the journal to the new
//! checkpoint commits it. A standby killed half-way leaves a directory that recovers to the
//! previous checkpoint, never a torn one.
//!
//! A full epoch (the first of a connection: a primary that reconnected) is built beside the
//! directory and swapped in only once complete, so the checkpoint the standby had stays usable
//! until the new one replaces it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rebound_checkpoint::sink::{CheckpointData, Preserved, Sink};
use rebound_checkpoint::state_dir::{StateDir, UndoJournal, mark_shown, replay_output};
use rebound_checkpoint::{CheckpointRef, Error};
use rebound_snapshot::PAGE_SIZE;

use crate::standby::Store;

/// Keeps one VM's memory and state applied in a state directory.
pub struct HotStore {
    path: PathBuf,
    open: Option<Open>,
}

struct Open {
    dir: StateDir,
    memory: File,
    journal: UndoJournal,
    mem_size: u64,
}

fn err(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Sink {
        sink: format!("hot standby {}", path.display()),
        reason: reason.to_string(),
    }
}

impl HotStore {
    /// A store at `path` (on tmpfs: it holds guest memory). What is there stays the newest
    /// usable checkpoint until a full epoch replaces it.
    pub fn new(path: &Path) -> Self {
        crate::cold::remove_retired(path);
        Self {
            path: path.to_path_buf(),
            open: None,
        }
    }

    /// Where the VM is kept (`rebound recover --state` takes it over).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Builds the directory for a full epoch beside the current one, then swaps it in.
    fn replace(&mut self, cp: &CheckpointData<'_>) -> Result<(), Error> {
        let next = self.path.with_extension("next");
        let _ = std::fs::remove_dir_all(&next);
        let dir = StateDir::create(&next)?;
        let memory = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.memory())
            .map_err(|e| err(&next, e))?;
        memory.set_len(cp.mem_size).map_err(|e| err(&next, e))?;
        let npages = cp.mem_size / PAGE_SIZE;
        let pages: Box<dyn Iterator<Item = u64>> = match cp.data {
            Some(d) => Box::new(d.iter()),
            None => Box::new(0..npages),
        };
        for p in pages {
            let bytes = cp
                .source
                .page(p)
                .ok_or_else(|| err(&next, format!("page {p} is missing")))?;
            if bytes.iter().any(|&b| b != 0) {
                memory
                    .write_all_at(bytes, p * PAGE_SIZE)
                    .map_err(|e| err(&next, e))?;
            }
        }
        Preserved::new(dir.clone()).commit(cp)?;
        let c = CheckpointRef {
            epoch: cp.epoch,
            id: cp.id,
        };
        replay_output(&dir.console_log(), cp.output).map_err(|e| err(&next, e))?;
        mark_shown(&dir.console_log(), end_of(cp)).map_err(|e| err(&next, e))?;
        let journal = UndoJournal::create(&dir.undo(), Some(c)).map_err(|e| err(&next, e))?;
        dir.write_head(Some(c)).map_err(|e| err(&next, e))?;
        // The swap: the old directory goes only now that the new one is complete.
        let _ = std::fs::remove_dir_all(&self.path);
        std::fs::rename(&next, &self.path).map_err(|e| err(&self.path, e))?;
        let dir = StateDir::open(&self.path)?;
        self.open = Some(Open {
            dir,
            memory,
            journal,
            mem_size: cp.mem_size,
        });
        Ok(())
    }

    /// Applies a diff in place, journaled so that a kill half-way recovers to the previous
    /// checkpoint.
    fn apply(&mut self, cp: &CheckpointData<'_>) -> Result<(), Error> {
        let path = self.path.clone();
        let o = self
            .open
            .as_mut()
            .ok_or_else(|| err(&path, "a diff before any full checkpoint"))?;
        if o.mem_size != cp.mem_size {
            return Err(err(&path, "the VM's memory size changed"));
        }
        let mut old = vec![0u8; PAGE_SIZE as usize];
        for p in cp.pages.iter() {
            o.memory
                .read_exact_at(&mut old, p * PAGE_SIZE)
                .map_err(|e| err(&path, e))?;
            o.journal.append(p, &old).map_err(|e| err(&path, e))?;
        }
        Preserved::new(o.dir.clone()).commit(cp)?;
        for p in cp.pages.iter() {
            let bytes = cp
                .source
                .page(p)
                .ok_or_else(|| err(&path, format!("page {p} is missing")))?;
            o.memory
                .write_all_at(bytes, p * PAGE_SIZE)
                .map_err(|e| err(&path, e))?;
        }
        replay_output(&o.dir.console_log(), cp.output).map_err(|e| err(&path, e))?;
        let c = CheckpointRef {
            epoch: cp.epoch,
            id: cp.id,
        };
        o.journal.reset(Some(c)).map_err(|e| err(&path, e))?;
        o.dir.write_head(Some(c)).map_err(|e| err(&path, e))?;
        mark_shown(&o.dir.console_log(), end_of(cp)).map_err(|e| err(&path, e))?;
        Ok(())
    }
}

/// Where the console stream ends after `cp`'s output: the primary showed it (or will have,
/// by the time a takeover shows anything), so the process taking over does not show it again.
fn end_of(cp: &CheckpointData<'_>) -> u64 {
    cp.output.offset + cp.output.bytes.len() as u64
}

impl Store for HotStore {
    fn invalidate(&mut self) -> Result<(), Error> {
        self.open = None;
        crate::cold::retire(&self.path)
    }
}

impl Sink for HotStore {
    fn name(&self) -> String {
        format!("hot-standby:{}", self.path.display())
    }

    fn commit(&mut self, cp: &CheckpointData<'_>) -> Result<(), Error> {
        if cp.full {
            self.replace(cp)
        } else {
            self.apply(cp)
        }
    }
}
