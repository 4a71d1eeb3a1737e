//! Kicking a vCPU thread out of `KVM_RUN`: a real-time signal whose handler sets the thread's
//! `kvm_run.immediate_exit`. The flag closes the race where the signal lands just before the
//! thread enters `KVM_RUN`: the entry then returns `EINTR` at once instead of running the guest.

use std::cell::Cell;
use std::ptr;
use std::sync::OnceLock;
use std::thread::JoinHandle;

use kvm_ioctls::VcpuFd;
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, while it runs a vCPU.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(ptr::null_mut()) };
}

extern "C" fn on_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: `arm` stored a pointer into this thread's live kvm_run mapping, and `disarm`
        // clears it before the VcpuFd is dropped. A volatile byte store is async-signal-safe.
        unsafe { ptr::write_volatile(p, 1) };
    }
}

/// The signal used for kicks.
pub fn signal() -> c_int {
    SIGRTMIN()
}

/// Installs the handler (once per process).
pub fn install() -> Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(signal(), on_kick)
                .map_err(|e| format!("cannot install the vCPU kick handler: {e}"))
        })
        .clone()
}

/// Makes kicks to the calling thread set `fd`'s immediate_exit.
pub fn arm(fd: &mut VcpuFd) {
    let p = &raw mut fd.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(p));
}

/// Points kicks to the calling thread at `fd` (a nested vCPU run on this thread for a while)
/// and returns what they pointed at before, for [`restore`].
pub(crate) fn arm_nested(fd: &mut VcpuFd) -> *mut u8 {
    let p = &raw mut fd.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.replace(p))
}

/// Points kicks back at what [`arm_nested`] returned, before the nested vCPU's fd is unlocked.
pub(crate) fn restore(prev: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(prev));
}

/// Stops kicks from touching the vCPU (before its fd is dropped).
pub fn disarm() {
    IMMEDIATE_EXIT.with(|c| c.set(ptr::null_mut()));
}

/// Kicks a vCPU thread. A thread that already finished is ignored.
pub fn kick<T>(thread: &JoinHandle<T>) {
    if !thread.is_finished() {
        let _ = thread.kill(signal());
    }
}
