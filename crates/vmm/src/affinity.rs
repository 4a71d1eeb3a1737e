//! Which host CPUs a thread may run on (vCPU placement).

use std::io;
use std::os::unix::thread::JoinHandleExt;
use std::thread::JoinHandle;

fn to_set(cpus: &[usize]) -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {c} is out of range"),
            ));
        }
        // SAFETY: `c` was checked against the set's size.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    Ok(set)
}

fn from_set(set: &libc::cpu_set_t) -> Vec<usize> {
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: every `c` is below the set's size.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, set) })
        .collect()
}

/// Lets `thread` run only on `cpus`.
pub fn set(thread: &JoinHandle<()>, cpus: &[usize]) -> io::Result<()> {
    let set = to_set(cpus)?;
    // SAFETY: the JoinHandle is not joined, so the pthread_t still names a valid thread
    // descriptor, and `set` is a valid cpu_set_t of the size passed. (A thread that has already
    // exited has no kernel id left: callers check `is_finished` first.)
    let r = unsafe {
        libc::pthread_setaffinity_np(
            thread.as_pthread_t(),
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// The CPUs `thread` may run on.
pub fn get(thread: &JoinHandle<()>) -> io::Result<Vec<usize>> {
    // SAFETY: as in `set`; the kernel fills the set we own.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let r = unsafe {
        libc::pthread_getaffinity_np(
            thread.as_pthread_t(),
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(from_set(&set))
}

/// The CPUs this process may use.
pub fn usable() -> Vec<usize> {
    // SAFETY: all-zero is a valid empty cpu_set_t, filled by the kernel below.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the set and its size are valid.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    }
    from_set(&set)
}
