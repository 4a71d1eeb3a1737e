//! A cold standby's store: the checkpoint chain as snapshot files, from which `rebound restore
//! --dir` builds the VM.

use std::path::{Path, PathBuf};

use rebound_checkpoint::Error;
use rebound_checkpoint::sink::{CheckpointData, Sink, SnapshotDir};

use crate::standby::Store;

/// Keeps one VM's checkpoint chain in a snapshot directory.
pub struct ColdStore {
    dir: PathBuf,
    max_chain: usize,
    snaps: SnapshotDir,
}

impl ColdStore {
    /// A store at `dir` (created if needed), merging its chain once it is `max_chain` long.
    pub fn new(dir: &Path, max_chain: usize) -> Result<Self, Error> {
        remove_retired(dir);
        Ok(Self {
            dir: dir.to_path_buf(),
            max_chain,
            snaps: SnapshotDir::new(dir, max_chain)?,
        })
    }
}

impl Sink for ColdStore {
    fn name(&self) -> String {
        format!("cold-standby:{}", self.dir.display())
    }

    fn commit(&mut self, cp: &CheckpointData<'_>) -> Result<(), Error> {
        self.snaps.commit(cp)
    }
}

impl Store for ColdStore {
    fn hold_still(&mut self) {
        // A merge finishing would publish its file and delete the diffs it merged while the
        // takeover's restore reads the chain; the unmerged chain restores the same VM.
        self.snaps.abandon_merge();
    }

    fn invalidate(&mut self) -> Result<(), Error> {
        // A merge of the old chain must not finish into the new directory.
        self.snaps.abandon_merge();
        retire(&self.dir)?;
        self.snaps = SnapshotDir::new(&self.dir, self.max_chain)?;
        Ok(())
    }
}

/// Makes the directory `path` unusable at once and for good: it is renamed aside (one atomic
/// step, made durable), then deleted in the background. A crash half-way through a plain
/// recursive delete could leave an older but valid-looking copy.
pub(crate) fn retire(path: &Path) -> Result<(), Error> {
    let err = |e: std::io::Error| Error::Sink {
        sink: path.display().to_string(),
        reason: format!("cannot retire the old copy: {e}"),
    };
    if !path.exists() {
        return Ok(());
    }
    let aside = retired_name(path, rebound_vmm::persist::unix_ns());
    std::fs::rename(path, &aside).map_err(err)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    let _ = std::thread::Builder::new()
        .name("standby-retire".into())
        .spawn(move || {
            let _ = std::fs::remove_dir_all(aside);
        });
    Ok(())
}

fn retired_name(path: &Path, n: u64) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".retired-{n}"));
    path.with_file_name(name)
}

/// Deletes what [`retire`] left behind when its process died before the background delete.
pub(crate) fn remove_retired(path: &Path) {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let prefix = format!("{}.retired-", name.to_string_lossy());
    if let Ok(entries) = std::fs::read_dir(parent) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_copy_is_gone_at_once_and_its_leftovers_later() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vm");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("0000000001-full.snap"), b"x").unwrap();
        retire(&dir).unwrap();
        assert!(!dir.exists());
        // A leftover of a process that died before deleting it.
        let left = retired_name(&dir, 7);
        std::fs::create_dir(&left).unwrap();
        let other = tmp.path().join("vm2.retired-1");
        std::fs::create_dir(&other).unwrap();
        let store = ColdStore::new(&dir, 4).unwrap();
        assert!(!left.exists() && other.exists() && dir.exists());
        drop(store);
        retire(&tmp.path().join("absent")).unwrap();
    }
}
