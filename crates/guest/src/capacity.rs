//! Cloning for capacity (ABI 1.9): a busy VM is cloned by the host, and the clone takes work
//! from the same shared queue.
//!
//! The host never clones a guest at an arbitrary instruction: it asks
//! ([`clone_requested`], one load from the boot info, no exit), and the guest answers at the
//! next place where it holds nothing shared with other VMs — between two jobs of a shared
//! queue, no lock held — by calling [`clone_point`]. The call blocks in the VMM (not spinning)
//! while the host takes the snapshot the clone starts from, then returns in both copies:
//!
//! ```no_run
//! use rebound_guest::capacity::{self, Role};
//! # fn next_job() -> Option<u64> { None }
//! # fn run(_: u64) {}
//! loop {
//!     if let Some(Role::Clone) = capacity::clone_point() {
//!         // A new VM: new VM id, new member slot in its shared regions; private state as the
//!         // parent had it at this point.
//!     }
//!     let Some(job) = next_job() else { break };
//!     run(job);
//! }
//! ```
//!
//! A guest that never calls it is simply not cloned (the host's request times out).

use rebound_abi::{nr, request};

use crate::boot::host_requests;
use crate::hypercall::{generation, raw};

/// Which copy returned from a clone point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The VM that was cloned.
    Parent,
    /// The clone (its `GENERATION` changed across the point).
    Clone,
}

/// Whether the host asks for a clone point now (ABI 1.9; always false under an older VMM).
pub fn clone_requested() -> bool {
    host_requests() & request::CLONE != 0
}

/// Call where the guest holds nothing shared: if the host asked for a clone, reaches the clone
/// point and returns which copy this is; `None` (at the cost of one load) if nothing was asked
/// or the host gave up meanwhile.
pub fn clone_point() -> Option<Role> {
    if !clone_requested() {
        return None;
    }
    let before = generation();
    if raw(nr::CLONE_POINT, &[]) != 1 {
        return None;
    }
    Some(if generation() != before {
        Role::Clone
    } else {
        Role::Parent
    })
}
