//! Termination signals (SIGTERM, SIGINT, SIGHUP). They are blocked in every thread and taken
//! by one thread with `sigwait`, which runs the process's action for them: by default, remove
//! the API socket and die of the signal as before; a supervisor passes them on to its VMM.
//!
//! Blocked rather than caught with a handler so that the action is ordinary code (locks,
//! allocation, file removal) instead of async-signal-safe code. Child processes and `exec`
//! start with an empty mask (std resets it), so the VMMs a supervisor starts and the binary a
//! live update runs see these signals as usual.

use std::sync::{Arc, Mutex, Weak};

use rebound_control::Instance;

/// The signals taken here.
pub const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

type Action = Box<dyn Fn(libc::c_int) + Send>;

/// What to do with a signal; None: the default (clean up, die of it).
static ACTION: Mutex<Option<Action>> = Mutex::new(None);

/// What the default action ends before the process dies: this process's instances.
static INSTANCES: Mutex<Vec<Weak<Instance>>> = Mutex::new(Vec::new());

fn set_of(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: a sigset_t is plain data; sigemptyset initialises it and sigaddset adds valid
    // signal numbers to the initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the signals in this thread and every thread started after: call it first in `main`,
/// before any thread exists, then [`start`].
pub fn block() {
    let set = set_of(&SIGNALS);
    // SAFETY: `set` is an initialised signal set; the old mask is not wanted (null).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Starts the thread that takes the signals and runs the action.
pub fn start() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("rebound-signals".into())
        .spawn(|| {
            let set = set_of(&SIGNALS);
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is initialised and blocked in every thread (see `block`); `sig`
                // is a valid place for the signal number.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                tracing::debug!(signal = sig, "termination signal");
                let action = ACTION.lock().unwrap_or_else(|e| e.into_inner());
                match action.as_ref() {
                    Some(f) => f(sig),
                    None => {
                        let instances = std::mem::take(
                            &mut *INSTANCES.lock().unwrap_or_else(|e| e.into_inner()),
                        );
                        for i in instances.iter().filter_map(Weak::upgrade) {
                            i.stopped_by_signal();
                        }
                        crate::api_sock::remove();
                        die_of(sig);
                    }
                }
            }
        })?;
    Ok(())
}

/// The default action stops `instance`'s host-side helpers before the process dies.
pub fn end_with_process(instance: &Arc<Instance>) {
    INSTANCES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Arc::downgrade(instance));
}

/// Replaces the default action (for the rest of the process's life).
pub fn set_action(f: impl Fn(libc::c_int) + Send + 'static) {
    *ACTION.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
}

/// Ends the process as signal `sig` would have if nothing caught it, so whoever waits for it
/// sees the same status.
pub fn die_of(sig: libc::c_int) -> ! {
    let _ = std::io::Write::flush(&mut std::io::stderr());
    let one = set_of(&[sig]);
    // SAFETY: restores the default disposition of a valid signal, then unblocks it in this
    // thread only and sends it to this thread: it is delivered here, at once.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
        libc::raise(sig);
    }
    // A signal whose default is not to terminate: end with the shell's convention instead.
    std::process::exit(128 + sig)
}
