//! Rebound's devices. They see guest memory through `vm-memory` (bounds-checked) and never call
//! KVM: the VMM wires their doorbells (ioeventfds) and tells them which vCPU to wake through
//! [`Notify`].
//!
//! - [`console`]: where guest console output goes.
//! - [`disk`]: a disk image backing the I/O queue.
//! - [`ioq`]: the asynchronous I/O queue: guest rings, completed through indicators in guest
//!   memory, never an interrupt.

pub mod console;
pub mod disk;
pub mod ioq;

/// Wakes a vCPU blocked in the `BLOCK` hypercall because an event for it arrived.
pub trait Notify: Send + Sync {
    /// An event for `vcpu` is ready.
    fn notify(&self, vcpu: u32);
}
