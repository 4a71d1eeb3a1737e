//! Post-image: at each checkpoint copy the pages written since the last one (KVM's dirty log
//! plus the VMM's own writes) into the shadow, and commit sinks before resuming.

use rebound_snapshot::DirtySet;
use rebound_vmm::vm::Frozen;

use super::{Shadow, Strategy, StrategyKind};
use crate::Error;

/// The consumer name under which the engine takes dirty pages from the VM.
pub(crate) const DIRTY_CONSUMER: &str = "checkpoint-engine";

/// Post-image with a dirty bitmap.
pub struct PostImage {
    shadow: Shadow,
}

impl PostImage {
    /// For `mem_size` bytes of memory.
    pub fn new(mem_size: u64) -> Self {
        Self {
            shadow: Shadow::new(mem_size),
        }
    }
}

/// Dirty pages from the VM's tracker (shared by the shadow-based strategies).
pub(crate) fn vm_dirty(frozen: &Frozen<'_>) -> Result<DirtySet, Error> {
    frozen
        .vm()
        .take_dirty(DIRTY_CONSUMER)
        .map_err(|e| Error::Vm(e.to_string()))
}

/// Starts dirty tracking and takes the baseline copy (shared by the shadow-based strategies).
pub(crate) fn start_shadow(shadow: &mut Shadow, frozen: &Frozen<'_>) -> Result<(), Error> {
    frozen
        .vm()
        .enable_dirty_tracking()
        .map_err(|e| Error::Vm(e.to_string()))?;
    // Reset the engine's account: from here on, the shadow is the reference.
    vm_dirty(frozen)?;
    shadow.copy_all(frozen);
    Ok(())
}

impl Strategy for PostImage {
    fn kind(&self) -> StrategyKind {
        StrategyKind::PostImage
    }

    fn start(&mut self, frozen: &Frozen<'_>, _epoch: u64) -> Result<(), Error> {
        start_shadow(&mut self.shadow, frozen)
    }

    fn dirty(&mut self, frozen: &Frozen<'_>) -> Result<DirtySet, Error> {
        vm_dirty(frozen)
    }

    fn capture(&mut self, frozen: &Frozen<'_>, dirty: &DirtySet) -> Result<(), Error> {
        self.shadow.copy_pages(frozen, dirty);
        Ok(())
    }

    fn memory_bytes(&self) -> u64 {
        self.shadow.resident_bytes()
    }

    fn rollback(&mut self, frozen: &Frozen<'_>, dirty: &DirtySet) -> Result<(), Error> {
        for p in dirty.iter() {
            self.shadow.restore_page(frozen, p)?;
        }
        Ok(())
    }
}
