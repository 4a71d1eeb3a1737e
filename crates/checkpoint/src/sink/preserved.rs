//! The preserved-region sink: writes each checkpoint to the VM's state directory as a record
//! (VM, vCPU and device state, the output it releases and the checkpoint it follows, in the
//! snapshot file format without memory pages: memory stays in place and the pre-image
//! strategy's journal undoes it). The record appears atomically; it is committed once the
//! undo journal is reset to it (see `recovery`), which the engine does right after this sink
//! acknowledged it.

use rebound_snapshot::format::{self, SectionData};
use rebound_snapshot::{Kind, SnapshotMeta};

use super::{CheckpointData, Sink};
use crate::state_dir::{CHAIN_SECTION, ChainRecord, OUTPUT_SECTION, StateDir};
use crate::{Error, faults};

/// Commits checkpoints to a state directory, keeping the newest two records.
pub struct Preserved {
    dir: StateDir,
}

impl Preserved {
    /// A sink for `dir`.
    pub fn new(dir: StateDir) -> Self {
        Self { dir }
    }

    /// A state directory that cannot be written cannot protect the VM at all: the error
    /// ends protection (the engine lets the VM run on unprotected and says why).
    fn err(&self, reason: impl std::fmt::Display) -> Error {
        Error::Lost(format!("{}: {reason}", self.name()))
    }
}

impl Sink for Preserved {
    fn name(&self) -> String {
        format!("state-dir:{}", self.dir.path().display())
    }

    fn commit(&mut self, cp: &CheckpointData<'_>) -> Result<(), Error> {
        faults::point("before-record");
        faults::check_write("checkpoint record").map_err(|e| self.err(e))?;
        let mut sections = cp.state.sections().map_err(|e| self.err(e))?;
        sections.push(SectionData::encode(OUTPUT_SECTION, 1, cp.output).map_err(|e| self.err(e))?);
        let chain = ChainRecord {
            follows: cp.follows,
        };
        sections.push(SectionData::encode(CHAIN_SECTION, 1, &chain).map_err(|e| self.err(e))?);
        let meta = SnapshotMeta {
            id: cp.id,
            parent: None,
            epoch: cp.epoch,
            kind: Kind::Full,
            mem_size: cp.state.vm.mem_size,
            created_unix_ns: rebound_vmm::persist::unix_ns(),
        };
        let path = self.dir.record(cp.epoch);
        format::Writer::create(&path, &meta, &sections)
            .and_then(format::Writer::finish)
            .map_err(|e| self.err(e))?;
        faults::point("after-record");
        // The directory describes the VM again (protection started afresh after a loss).
        self.dir.clear_lost();
        // Recovery needs only the committed record, which is this one or (until the journal
        // names this one) the one before; the pruned ones are older.
        match self.dir.records() {
            Ok(records) if records.len() > 2 => {
                for (_, old) in &records[..records.len() - 2] {
                    let _ = std::fs::remove_file(old);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot prune old checkpoint records: {e}"),
        }
        Ok(())
    }

    fn stores_memory(&self) -> bool {
        false
    }

    fn is_commit_point(&self) -> bool {
        true
    }

    fn lost(&mut self, reason: &str) {
        self.dir.mark_lost(reason);
    }
}
