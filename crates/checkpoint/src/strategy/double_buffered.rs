//! Double-buffered: while paused, only copy the dirty pages to a staging buffer (memory
//! bandwidth); the guest resumes at once, and the sinks and the shadow are written from the
//! staging buffer while it runs. The pause does not grow with sink latency.

use rebound_snapshot::DirtySet;
use rebound_vmm::vm::Frozen;

use super::post_image::{start_shadow, vm_dirty};
use super::{PageSource, Shadow, Staging, Strategy, StrategyKind};
use crate::Error;

/// Double-buffered post-image.
pub struct DoubleBuffered {
    shadow: Shadow,
    staging: Staging,
    settled: bool,
}

impl DoubleBuffered {
    /// For `mem_size` bytes of memory.
    pub fn new(mem_size: u64) -> Self {
        Self {
            shadow: Shadow::new(mem_size),
            staging: Staging::default(),
            settled: true,
        }
    }
}

impl Strategy for DoubleBuffered {
    fn kind(&self) -> StrategyKind {
        StrategyKind::DoubleBuffered
    }

    fn start(&mut self, frozen: &Frozen<'_>, _epoch: u64) -> Result<(), Error> {
        start_shadow(&mut self.shadow, frozen)
    }

    fn dirty(&mut self, frozen: &Frozen<'_>) -> Result<DirtySet, Error> {
        vm_dirty(frozen)
    }

    fn capture(&mut self, frozen: &Frozen<'_>, dirty: &DirtySet) -> Result<(), Error> {
        // The engine settles the previous epoch before the next freeze.
        debug_assert!(self.settled);
        self.staging.fill(frozen, dirty);
        self.settled = false;
        Ok(())
    }

    fn async_source(&self) -> Option<&dyn PageSource> {
        Some(self)
    }

    fn settle(&mut self) {
        for (p, bytes) in self.staging.iter() {
            self.shadow.store(p, bytes);
        }
        self.staging.clear();
        self.settled = true;
    }

    fn memory_bytes(&self) -> u64 {
        self.shadow.resident_bytes() + self.staging.capacity_bytes()
    }

    fn rollback(&mut self, frozen: &Frozen<'_>, dirty: &DirtySet) -> Result<(), Error> {
        if !self.settled {
            self.settle();
        }
        for p in dirty.iter() {
            self.shadow.restore_page(frozen, p)?;
        }
        Ok(())
    }
}

/// Memory at the last checkpoint: the staged pages over the shadow.
impl PageSource for DoubleBuffered {
    fn page(&self, p: u64) -> Option<&[u8]> {
        self.staging.page(p).or_else(|| self.shadow.page(p))
    }
}
