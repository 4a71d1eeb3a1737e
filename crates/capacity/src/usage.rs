//! What the host measures of a VM: its vCPU threads' run time and the depth of the work queue
//! it takes jobs from.
//!
//! Both are read from outside the guest, so nothing the guest says about its own load counts.
//! A queue lives in guest-writable shared memory, though: its positions are clamped to its
//! capacity, and a damaged header reads as no queue.

use std::os::unix::fs::FileExt;
use std::path::Path;

use rebound_abi::share;

use crate::{Error, Result};

/// vCPU threads are named `rebound-vcpu<N>` (see `rebound_vmm::vm`).
const VCPU_THREAD: &str = "rebound-vcpu";

/// Run time of a process's vCPU threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuTime {
    /// Nanoseconds on a CPU, summed over the vCPU threads.
    pub ns: u64,
    /// vCPU threads found.
    pub vcpus: u32,
}

/// The vCPU run time of the process whose `/proc` directory is `proc_dir` (`/proc/self` or
/// `/proc/<pid>`): per thread, `schedstat`'s first field (nanoseconds), or `stat`'s user and
/// system time where schedstat is not built in.
pub fn vcpu_time(proc_dir: &Path) -> Result<VcpuTime> {
    let tasks = proc_dir.join("task");
    let dir = std::fs::read_dir(&tasks)
        .map_err(|e| Error::host(format!("reading {}", tasks.display()), e))?;
    let mut t = VcpuTime::default();
    for entry in dir.flatten() {
        let task = entry.path();
        // Threads come and go; one that ended between the listing and the read is skipped.
        let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        if !comm.trim_end().starts_with(VCPU_THREAD) {
            continue;
        }
        let ns = match std::fs::read_to_string(task.join("schedstat")) {
            Ok(s) => parse_schedstat(&s),
            Err(_) => std::fs::read_to_string(task.join("stat"))
                .ok()
                .and_then(|s| parse_stat_ticks(&s))
                .map(|ticks| ticks.saturating_mul(1_000_000_000 / clock_ticks())),
        };
        if let Some(ns) = ns {
            t.ns = t.ns.saturating_add(ns);
            t.vcpus += 1;
        }
    }
    Ok(t)
}

fn parse_schedstat(s: &str) -> Option<u64> {
    s.split_whitespace().next()?.parse().ok()
}

/// utime + stime from `/proc/.../stat` (fields 14 and 15; the name in parentheses may hold
/// spaces, so fields are counted from its closing parenthesis).
fn parse_stat_ticks(s: &str) -> Option<u64> {
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second for `/proc` times: Linux reports them in USER_HZ, 100 on every
/// architecture Rebound runs on.
fn clock_ticks() -> u64 {
    100
}

/// The number of jobs waiting in the queue at `queue_offset` of the data area of the shared
/// region in `region_file`; `None` if no queue is there (not made yet, or damaged).
pub fn queue_depth(region_file: &Path, queue_offset: u64) -> Result<Option<u64>> {
    let f = std::fs::File::open(region_file)
        .map_err(|e| Error::host(format!("opening {}", region_file.display()), e))?;
    let at = share::HEADER_SIZE
        .checked_add(queue_offset)
        .ok_or_else(|| Error::Invalid {
            field: "queue offset",
            reason: format!("{queue_offset} is past any region"),
        })?;
    let mut head = [0u8; (share::QUEUE_DEQ_OFFSET + 8) as usize];
    if f.read_exact_at(&mut head, at).is_err() {
        // Past the region's end: no queue there.
        return Ok(None);
    }
    Ok(depth_of(&head))
}

fn word(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The depth a queue header says it has, clamped to its capacity.
fn depth_of(head: &[u8]) -> Option<u64> {
    if word(head, 0) != share::QUEUE_MAGIC {
        return None;
    }
    let capacity = word(head, share::QUEUE_CAPACITY_OFFSET);
    if !capacity.is_power_of_two() || capacity > 1 << 20 {
        return None;
    }
    let enq = word(head, share::QUEUE_ENQ_OFFSET);
    let deq = word(head, share::QUEUE_DEQ_OFFSET);
    // Positions only grow, enqueue ahead of dequeue; anything else is a guest's scribble.
    let depth = enq.wrapping_sub(deq);
    Some(if depth > capacity { capacity } else { depth })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(magic: u64, cap: u64, enq: u64, deq: u64) -> Vec<u8> {
        let mut b = vec![0u8; (share::QUEUE_DEQ_OFFSET + 8) as usize];
        let mut put = |at: u64, v: u64| {
            b[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
        };
        put(0, magic);
        put(share::QUEUE_CAPACITY_OFFSET, cap);
        put(share::QUEUE_ENQ_OFFSET, enq);
        put(share::QUEUE_DEQ_OFFSET, deq);
        b
    }

    #[test]
    fn depth_is_clamped_and_damage_is_no_queue() {
        assert_eq!(depth_of(&head(share::QUEUE_MAGIC, 1024, 10, 3)), Some(7));
        assert_eq!(depth_of(&head(share::QUEUE_MAGIC, 1024, 5, 5)), Some(0));
        // Dequeue ahead of enqueue (wraps) or too far behind: at most the capacity.
        assert_eq!(depth_of(&head(share::QUEUE_MAGIC, 1024, 3, 10)), Some(1024));
        assert_eq!(
            depth_of(&head(share::QUEUE_MAGIC, 1024, u64::MAX, 0)),
            Some(1024)
        );
        assert_eq!(depth_of(&head(0, 1024, 10, 3)), None);
        assert_eq!(depth_of(&head(share::QUEUE_MAGIC, 1000, 10, 3)), None);
        assert_eq!(depth_of(&head(share::QUEUE_MAGIC, 1 << 40, 10, 3)), None);
    }

    #[test]
    fn queue_depth_reads_the_region_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("r");
        let mut bytes = vec![0u8; share::HEADER_SIZE as usize + 8192];
        let h = head(share::QUEUE_MAGIC, 64, 9, 4);
        bytes[share::HEADER_SIZE as usize + 4096..][..h.len()].copy_from_slice(&h);
        std::fs::write(&f, &bytes).unwrap();
        assert_eq!(queue_depth(&f, 4096).unwrap(), Some(5));
        assert_eq!(queue_depth(&f, 0).unwrap(), None);
        assert_eq!(queue_depth(&f, 1 << 30).unwrap(), None, "past the end");
        assert!(queue_depth(&dir.path().join("missing"), 0).is_err());
    }

    #[test]
    fn stat_fields_count_from_the_name() {
        let s = "42 (rebound vcpu0) R 1 2 3 4 5 6 7 8 9 10 250 50 0 0";
        assert_eq!(parse_stat_ticks(s), Some(300));
        assert_eq!(parse_schedstat("123456 789 10\n"), Some(123456));
    }

    #[test]
    fn this_process_has_no_vcpus() {
        let t = vcpu_time(Path::new("/proc/self")).unwrap();
        assert_eq!(t.vcpus, 0);
    }
}
