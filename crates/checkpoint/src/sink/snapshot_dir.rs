//! The snapshot-directory sink: every checkpoint as a snapshot file (a full one, then diffs,
//! merged into a new full file once the chain is long), restorable with `rebound restore --dir`.
//!
//! Merging runs in the background: it reads the whole chain and writes a VM's worth of memory,
//! which on the commit path would hold every checkpoint (and, on a standby, every
//! acknowledgement) for that long. The merge writes a hidden file (no restore sees it); the
//! commit after it finished moves it into place under a sequence number reserved when the merge
//! started (between the chain it merges and the diffs written meanwhile), with the id of the
//! chain's last file, so those diffs follow it, and deletes the merged chain. Until then the
//! directory's newest chain is the unmerged one. A merge abandoned (a full snapshot written
//! meanwhile, or the directory retired) never becomes visible.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use rebound_snapshot::format::{self, Verify};
use rebound_snapshot::{Kind, PAGE_SIZE, Snapshot, SnapshotMeta};
use rebound_vmm::persist::new_id;

use super::{CheckpointData, Sink};
use crate::Error;

/// Writes each checkpoint as a snapshot file in a directory: a full one first, then diffs,
/// merged into a new full file (without touching the VM) once the chain is `max_chain` long.
/// `rebound restore --dir` restores its newest chain.
pub struct SnapshotDir {
    dir: PathBuf,
    max_chain: usize,
    chain: Vec<(PathBuf, u64)>,
    seq: u64,
    merging: Option<Merging>,
}

/// A merge running in the background.
struct Merging {
    /// The chain's first `upto` files are merged...
    upto: usize,
    /// ...into this hidden file, with the id of the last of them...
    hidden: PathBuf,
    /// ...which then takes this name.
    path: PathBuf,
    id: u64,
    /// A full snapshot was written since: the merge is of an abandoned chain.
    abandoned: bool,
    done: JoinHandle<Result<(), String>>,
}

impl SnapshotDir {
    /// A sink writing into `dir` (created if needed).
    pub fn new(dir: &Path, max_chain: usize) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Sink {
            sink: dir.display().to_string(),
            reason: format!("cannot create the directory: {e}"),
        })?;
        // Files a crash left half-written (they never got their final name), and merges never
        // moved into place, are garbage.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.')
                    && (name.contains(".snap.tmp-") || name.ends_with("-merged.snap"))
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let seq = list(dir)?.last().map_or(0, |(s, _)| *s);
        Ok(Self {
            dir: dir.to_path_buf(),
            max_chain: max_chain.max(1),
            chain: Vec::new(),
            seq,
            merging: None,
        })
    }

    fn err(&self, reason: impl std::fmt::Display) -> Error {
        Error::Sink {
            sink: self.name(),
            reason: reason.to_string(),
        }
    }

    /// Starts merging the chain in the background if it is long and no merge runs.
    fn start_merge(&mut self) {
        if self.merging.is_some() || self.chain.len() <= self.max_chain {
            return;
        }
        let Some(&(_, id)) = self.chain.last() else {
            return;
        };
        let files: Vec<PathBuf> = self.chain.iter().map(|(p, _)| p.clone()).collect();
        self.seq += 1;
        let path = self.dir.join(format!("{:010}-full.snap", self.seq));
        let hidden = self.dir.join(format!(".{:010}-merged.snap", self.seq));
        let out = hidden.clone();
        let spawned = std::thread::Builder::new()
            .name("snapshot-merge".into())
            .spawn(move || {
                let snaps = files
                    .iter()
                    .map(|p| Snapshot::open(p, Verify::Metadata))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                format::merge(&snaps, &out, id)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        match spawned {
            Ok(done) => {
                self.merging = Some(Merging {
                    upto: self.chain.len(),
                    hidden,
                    path,
                    id,
                    abandoned: false,
                    done,
                });
            }
            Err(e) => tracing::warn!("cannot merge {}: {e}", self.dir.display()),
        }
    }

    /// Takes a finished merge's result (or waits for it, with `wait`): the merged file replaces
    /// the files it merged.
    fn finish_merge(&mut self, wait: bool) {
        if self
            .merging
            .as_ref()
            .is_none_or(|m| !wait && !m.done.is_finished())
        {
            return;
        }
        let Some(m) = self.merging.take() else {
            return;
        };
        let result = m
            .done
            .join()
            .unwrap_or_else(|_| Err("the merge panicked".into()));
        match result {
            // Its chain was replaced by a full snapshot (and may have been deleted under it).
            _ if m.abandoned => {
                let _ = std::fs::remove_file(m.hidden);
            }
            Ok(()) => match publish(&self.dir, &m.hidden, &m.path) {
                Ok(()) => {
                    let merged: Vec<_> = self.chain.drain(..m.upto).collect();
                    self.chain.insert(0, (m.path, m.id));
                    for (old, _) in merged {
                        let _ = std::fs::remove_file(old);
                    }
                }
                Err(e) => {
                    let _ = std::fs::remove_file(m.hidden);
                    tracing::warn!("cannot merge {}: {e}", self.dir.display());
                }
            },
            // The chain stays as it is; the merge is tried again at the next commit.
            Err(e) => tracing::warn!("cannot merge {}: {e}", self.dir.display()),
        }
    }

    /// Gives up a merge running in the background without waiting for it (the directory is
    /// about to be retired): what it writes is deleted, never shown.
    pub fn abandon_merge(&mut self) {
        if let Some(m) = self.merging.take() {
            let _ = std::thread::Builder::new()
                .name("snapshot-merge-reap".into())
                .spawn(move || {
                    let _ = m.done.join();
                    let _ = std::fs::remove_file(m.hidden);
                });
        }
    }
}

/// Moves a merged file into place, durably.
fn publish(dir: &Path, hidden: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::rename(hidden, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl Drop for SnapshotDir {
    fn drop(&mut self) {
        self.finish_merge(true);
    }
}

impl Sink for SnapshotDir {
    fn name(&self) -> String {
        format!("snapshot-dir:{}", self.dir.display())
    }

    fn commit(&mut self, cp: &CheckpointData<'_>) -> Result<(), Error> {
        self.finish_merge(false);
        let full = cp.full || self.chain.is_empty();
        let kind = if full { Kind::Full } else { Kind::Diff };
        let id = new_id();
        let meta = SnapshotMeta {
            id,
            parent: (!full)
                .then(|| self.chain.last().map(|(_, id)| *id))
                .flatten(),
            epoch: cp.epoch,
            kind,
            mem_size: cp.mem_size,
            created_unix_ns: rebound_vmm::persist::unix_ns(),
        };
        let sections = cp.state.sections().map_err(|e| self.err(e))?;
        self.seq += 1;
        let path = self.dir.join(format!(
            "{:010}-{}.snap",
            self.seq,
            if full { "full" } else { "diff" }
        ));
        let mut w = format::Writer::create(&path, &meta, &sections).map_err(|e| self.err(e))?;
        let npages = cp.mem_size / PAGE_SIZE;
        // A full commit reads only pages that may hold data: reading untouched guest memory
        // would allocate it.
        let pages: Box<dyn Iterator<Item = u64>> = match (full, cp.data) {
            (true, Some(data)) => Box::new(data.iter()),
            (true, None) => Box::new(0..npages),
            (false, _) => Box::new(cp.pages.iter()),
        };
        for p in pages {
            let bytes = cp
                .source
                .page(p)
                .ok_or_else(|| self.err(format!("page {p} is not available")))?;
            w.page(p, bytes).map_err(|e| self.err(e))?;
        }
        w.finish().map_err(|e| self.err(e))?;
        let old_chain = if full {
            if let Some(m) = &mut self.merging {
                m.abandoned = true;
            }
            std::mem::take(&mut self.chain)
        } else {
            Vec::new()
        };
        self.chain.push((path, id));
        for (old, _) in old_chain {
            let _ = std::fs::remove_file(old);
        }
        self.start_merge();
        Ok(())
    }
}

/// The snapshot files in `dir`, by sequence number.
fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Sink {
        sink: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((seq, rest)) = name.split_once('-')
            && rest.ends_with(".snap")
            && let Ok(seq) = seq.parse::<u64>()
        {
            out.push((seq, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest restorable chain in a snapshot directory: the last full snapshot and the diffs
/// after it that extend it (a diff left half-written by a crash is not in the directory:
/// files appear only once complete).
pub fn newest_chain(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let files = list(dir)?;
    let start = files
        .iter()
        .rposition(|(_, p)| p.to_string_lossy().ends_with("-full.snap"))
        .ok_or_else(|| Error::Sink {
            sink: dir.display().to_string(),
            reason: "no full snapshot in the directory".into(),
        })?;
    Ok(files[start..].iter().map(|(_, p)| p.clone()).collect())
}

/// The newest checkpoint epoch in a snapshot directory (0 if none).
pub fn newest_epoch(dir: &Path) -> Result<u64, Error> {
    let mut newest = 0;
    for (_, path) in list(dir)? {
        let s = Snapshot::open(&path, Verify::Metadata).map_err(|e| Error::Sink {
            sink: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        newest = newest.max(s.meta().epoch);
    }
    Ok(newest)
}

/// Deletes the snapshot files of checkpoints after `epoch`: the timeline abandoned by a
/// rollback to `epoch`. By epoch, not by file: a merge finishing meanwhile may have replaced
/// the files of the chain (its merged file, newer than `epoch`, goes too).
pub fn prune_after(dir: &Path, epoch: u64) -> Result<(), Error> {
    let err = |e: String| Error::Sink {
        sink: dir.display().to_string(),
        reason: e,
    };
    for (_, p) in list(dir)? {
        let newer = Snapshot::open(&p, Verify::Metadata)
            .map(|s| s.meta().epoch > epoch)
            // A file that cannot be read is no restore point either.
            .unwrap_or(true);
        if newer {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(e.to_string())),
            }
        }
    }
    Ok(())
}

/// The chain in a snapshot directory that ends at checkpoint `epoch`: the last full snapshot at
/// or before it and the diffs up to the one of that epoch.
pub fn chain_to_epoch(dir: &Path, epoch: u64) -> Result<Vec<PathBuf>, Error> {
    let err = |reason: String| Error::Sink {
        sink: dir.display().to_string(),
        reason,
    };
    let mut files = Vec::new();
    for (_, path) in list(dir)? {
        let meta = Snapshot::open(&path, Verify::Metadata)
            .map_err(|e| err(e.to_string()))?
            .meta()
            .clone();
        files.push((path, meta));
    }
    let end = files
        .iter()
        .position(|(_, m)| m.epoch == epoch)
        .ok_or_else(|| {
            let have: Vec<String> = files.iter().map(|(_, m)| m.epoch.to_string()).collect();
            err(format!(
                "checkpoint {epoch} is not in the directory (it has: {})",
                have.join(", ")
            ))
        })?;
    let start = files[..=end]
        .iter()
        .rposition(|(_, m)| m.kind == Kind::Full)
        .ok_or_else(|| err(format!("no full snapshot before checkpoint {epoch}")))?;
    Ok(files[start..=end].iter().map(|(p, _)| p.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_dir::OutputRecord;
    use crate::strategy::PageSource;
    use rebound_snapshot::DirtySet;
    use rebound_vmm::persist::{SavedState, VmDescriptor};

    struct Pages(Vec<u8>);

    impl PageSource for Pages {
        fn page(&self, p: u64) -> Option<&[u8]> {
            self.0
                .get((p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize)
        }
    }

    /// The memory the directory's newest chain restores.
    fn restored(dir: &Path, npages: u64) -> Vec<u8> {
        let snaps: Vec<Snapshot> = newest_chain(dir)
            .unwrap()
            .iter()
            .map(|p| Snapshot::open(p, Verify::Metadata).unwrap())
            .collect();
        format::check_chain(&snaps).unwrap();
        let out = dir.join("check.merged");
        format::merge(&snaps, &out, 1).unwrap();
        let m = Snapshot::open(&out, Verify::Metadata).unwrap();
        let mut mem = vec![0u8; (npages * PAGE_SIZE) as usize];
        m.read_memory(0, &mut mem).unwrap();
        std::fs::remove_file(out).unwrap();
        mem
    }

    #[test]
    fn merging_in_the_background_keeps_the_newest_chain_restorable_at_every_step() {
        let tmp = tempfile::tempdir().unwrap();
        let npages = 8;
        let mut sink = SnapshotDir::new(tmp.path(), 2).unwrap();
        let state = SavedState {
            vm: VmDescriptor {
                mem_size: npages * PAGE_SIZE,
                vcpus: 1,
                image: "x".into(),
                boot_args: String::new(),
                disk: None,
                abi_version: 0,
            },
            components: Default::default(),
        };
        let mut mem = vec![0u8; (npages * PAGE_SIZE) as usize];
        for epoch in 1..=60u64 {
            let p = epoch % npages;
            mem[(p * PAGE_SIZE) as usize..][..8].copy_from_slice(&epoch.to_le_bytes());
            let mut dirty = DirtySet::new(npages);
            dirty.insert(p);
            // Now and then a full one, abandoning a merge that may be running.
            let full = epoch == 1 || epoch % 17 == 0;
            let all = DirtySet::full(npages);
            let source = Pages(mem.clone());
            sink.commit(&CheckpointData {
                epoch,
                id: epoch,
                follows: None,
                state: &state,
                mem_size: npages * PAGE_SIZE,
                pages: &dirty,
                full,
                data: full.then_some(&all),
                source: &source,
                output: &OutputRecord::default(),
            })
            .unwrap();
            assert_eq!(restored(tmp.path(), npages), mem, "after epoch {epoch}");
            assert!(
                newest_epoch(tmp.path()).unwrap() == epoch,
                "epoch {epoch} is the newest"
            );
        }
        drop(sink);
        let files = std::fs::read_dir(tmp.path()).unwrap().count();
        assert!(files <= 4, "merged chains are deleted: {files} files left");
    }
}
