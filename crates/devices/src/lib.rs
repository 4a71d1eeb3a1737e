//! Rebound's devices. They see guest memory through `vm-memory` (bounds-checked) and never call
//! KVM: the VMM wires their doorbells (ioeventfds) and tells them which vCPU to wake through
//! [`Notify`].
//!
//! - [`console`]: where guest console output goes.
//! - [`held_disk`]: disk writes bound to their epoch while output commit holds them.
//! - [`ioq`]: the asynchronous I/O queue: guest rings, completed through indicators in guest
//!   memory, never an interrupt.
//! - [`net`]: network devices: TX and RX rings of frames, completed the same way, frames
//!   going to a host [`net::Backend`].

pub mod console;
pub mod held_disk;
pub mod ioq;
pub mod net;
pub mod net_ack;

/// Wakes a vCPU blocked in the `BLOCK` hypercall because an event for it arrived.
pub trait Notify: Send + Sync {
    /// An event for `vcpu` is ready.
    fn notify(&self, vcpu: u32);
    /// Requester indicators (ABI 1.10): the requester with route slot `slot` (see
    /// `rebound_abi::indicator::slot`) has work: set its bit in the `pending` word of the vCPUs
    /// that routed it (`vcpu`: only that one's, for a vCPU's own I/O ring; None: every vCPU's).
    /// Called before the wake-up, so that a vCPU woken from `BLOCK` sees the bit.
    fn indicate(&self, _vcpu: Option<u32>, _slot: usize) {}
}

/// A device's output that output commit can hold: what the guest sends out during an epoch is
/// released only once the checkpoint that follows it is safe, and dropped if the VM goes back
/// to an earlier checkpoint (it will send it again). Driven by the checkpoint engine.
pub trait HeldOutput: Send + Sync {
    /// Starts holding (the VM runs protected from now on, from checkpoint `epoch`).
    fn hold(&self, epoch: u64);
    /// Stops holding: everything held goes out now.
    fn pass_through(&self) -> std::io::Result<()>;
    /// Checkpoint `epoch` was taken: what was sent since the previous one belongs to it.
    fn seal(&self, epoch: u64);
    /// Checkpoint `epoch` is safe: its output, and any earlier, goes out.
    fn release(&self, epoch: u64) -> std::io::Result<()>;
    /// The VM went back to checkpoint `epoch`: output sent after it is dropped.
    fn discard_after(&self, epoch: u64);
    /// Everything held is dropped (the VM goes back to a point before it); still holding.
    fn discard_held(&self);
    /// Sets (or clears) what to call when output starts waiting in an epoch: a checkpoint soon
    /// gets it out sooner.
    fn on_pending(&self, f: Option<Box<dyn Fn() + Send + Sync>>);
    /// Whether output is waiting for the next checkpoint.
    fn has_pending(&self) -> bool;
}
