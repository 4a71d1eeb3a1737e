//! The snapshot-directory sink: every checkpoint as a snapshot file (a full one, then diffs,
//! merged into a new full file once the chain is long), restorable with `rebound restore --dir`.

use std::path::{Path, PathBuf};

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
}

impl SnapshotDir {
    /// A sink writing into `dir` (created if needed).
    pub fn new(dir: &Path, max_chain: usize) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Sink {
            sink: dir.display().to_string(),
            reason: format!("cannot create the directory: {e}"),
        })?;
        // Files a crash left half-written (they never got their final name) are garbage.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.contains(".snap.tmp-") {
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
        })
    }

    fn err(&self, reason: impl std::fmt::Display) -> Error {
        Error::Sink {
            sink: self.name(),
            reason: reason.to_string(),
        }
    }

    fn compact(&mut self) -> Result<(), Error> {
        let snaps = self
            .chain
            .iter()
            .map(|(p, _)| Snapshot::open(p, Verify::Metadata))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        self.seq += 1;
        let path = self.dir.join(format!("{:010}-full.snap", self.seq));
        let id = new_id();
        format::merge(&snaps, &path, id).map_err(|e| self.err(e))?;
        for (old, _) in std::mem::replace(&mut self.chain, vec![(path, id)]) {
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    }
}

impl Sink for SnapshotDir {
    fn name(&self) -> String {
        format!("snapshot-dir:{}", self.dir.display())
    }

    fn commit(&mut self, cp: &CheckpointData<'_>) -> Result<(), Error> {
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
            std::mem::take(&mut self.chain)
        } else {
            Vec::new()
        };
        self.chain.push((path, id));
        for (old, _) in old_chain {
            let _ = std::fs::remove_file(old);
        }
        if self.chain.len() > self.max_chain
            && let Err(e) = self.compact()
        {
            // The checkpoint itself is durable; only the housekeeping failed (it is retried at
            // the next commit).
            tracing::warn!("cannot compact {}: {e}", self.dir.display());
        }
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

/// Deletes the snapshot files written after `last` (by sequence): the timeline abandoned by a
/// rollback to `last`.
pub fn prune_after(dir: &Path, last: &Path) -> Result<(), Error> {
    let files = list(dir)?;
    let Some(at) = files.iter().position(|(_, p)| p == last) else {
        return Ok(());
    };
    for (_, p) in &files[at + 1..] {
        std::fs::remove_file(p).map_err(|e| Error::Sink {
            sink: dir.display().to_string(),
            reason: e.to_string(),
        })?;
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
