//! The baseline: copy every page of memory at every checkpoint. Needs no dirty tracking.

use rebound_snapshot::{DirtySet, PAGE_SIZE};
use rebound_vmm::vm::Frozen;

use super::{Shadow, Strategy, StrategyKind};
use crate::Error;

/// Full copy.
pub struct Full {
    shadow: Shadow,
    pages: u64,
}

impl Full {
    /// For `mem_size` bytes of memory.
    pub fn new(mem_size: u64) -> Self {
        Self {
            shadow: Shadow::new(mem_size),
            pages: mem_size / PAGE_SIZE,
        }
    }
}

impl Strategy for Full {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Full
    }

    fn start(&mut self, frozen: &Frozen<'_>) -> Result<(), Error> {
        self.shadow.copy_all(frozen);
        Ok(())
    }

    fn dirty(&mut self, _frozen: &Frozen<'_>) -> Result<DirtySet, Error> {
        Ok(DirtySet::full(self.pages))
    }

    fn capture(&mut self, frozen: &Frozen<'_>, _dirty: &DirtySet) -> Result<(), Error> {
        self.shadow.copy_all(frozen);
        Ok(())
    }

    fn rollback(&mut self, frozen: &Frozen<'_>, _dirty: &DirtySet) -> Result<(), Error> {
        // Without dirty tracking every page may have changed.
        frozen
            .write_memory(0, self.shadow.all())
            .map_err(|e| Error::Vm(e.to_string()))
    }
}
