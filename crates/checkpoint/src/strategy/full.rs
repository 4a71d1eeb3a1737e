//! The baseline: copy every page of memory at every checkpoint. Needs no dirty tracking.

use rebound_snapshot::{DirtySet, PAGE_SIZE};
use rebound_vmm::vm::Frozen;

use super::{Shadow, Strategy, StrategyKind};
use crate::Error;

/// Full copy.
pub struct Full {
    shadow: Shadow,
}

impl Full {
    /// For `mem_size` bytes of memory.
    pub fn new(mem_size: u64) -> Self {
        Self {
            shadow: Shadow::new(mem_size),
        }
    }
}

impl Strategy for Full {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Full
    }

    fn start(&mut self, frozen: &Frozen<'_>, _epoch: u64) -> Result<(), Error> {
        self.shadow.copy_all(frozen);
        Ok(())
    }

    fn dirty(&mut self, frozen: &Frozen<'_>) -> Result<DirtySet, Error> {
        // No dirty tracking: every page that may hold data is taken as changed.
        Ok(frozen.data_pages())
    }

    fn capture(&mut self, frozen: &Frozen<'_>, dirty: &DirtySet) -> Result<(), Error> {
        self.shadow.copy_pages(frozen, dirty);
        Ok(())
    }

    fn memory_bytes(&self) -> u64 {
        self.shadow.resident_bytes()
    }

    fn rollback(&mut self, frozen: &Frozen<'_>, dirty: &DirtySet) -> Result<(), Error> {
        // `dirty` is every page that may hold data now: any of them may have changed, and a page
        // that holds none is zero now and was zero at the checkpoint.
        for (first, count) in dirty.runs(u64::MAX) {
            let r = (first * PAGE_SIZE) as usize..((first + count) * PAGE_SIZE) as usize;
            frozen
                .write_memory(first * PAGE_SIZE, &self.shadow.all()[r])
                .map_err(|e| Error::Vm(e.to_string()))?;
        }
        Ok(())
    }
}
