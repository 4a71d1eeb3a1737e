//! Cloning for capacity: a worker taking jobs from a shared queue (cloned by the host when it is
//! saturated), a feeder that posts jobs and checks each was done exactly once, and an idle VM.
//!
//! Region data area: the job queue at 0, counters at `WORDS`, one done-count per job at `DONE`.

use core::sync::atomic::{AtomicU64, Ordering};

use rebound_guest::abi::share::MAX_MEMBERS;
use rebound_guest::capacity::{self, Role};
use rebound_guest::share::{self, Message, Queue, Region};
use rebound_guest::{Cpu, boot, hypercall, println, time};

const QUEUE: usize = 0;
const QUEUE_CAPACITY: u64 = 2048;
const WORDS: usize = 256 << 10;
/// Jobs done, all workers.
const W_DONE: usize = 1;
/// Jobs done by member slot `s`: word `W_SLOT + s`.
const W_SLOT: usize = 8;
const DONE: usize = 512 << 10;

pub fn run(mode: &str, cpu: &Cpu, arg: impl Fn(usize, u64) -> u64) -> Option<i32> {
    match mode {
        "capworker" => Some(worker(cpu, arg(2, 200))),
        "capfeed" => Some(feed(cpu, arg(2, 10_000), arg(3, 0), arg(4, 0))),
        "capidle" => Some(idle()),
        "caphostile" => Some(hostile()),
        _ => None,
    }
}

fn name(cpu: &Cpu) -> &str {
    cpu.args().split_whitespace().nth(1).unwrap_or("")
}

fn region(name: &str) -> Option<Region> {
    let r = share::find(name);
    if r.is_none() {
        println!("no shared region {name:?}");
    }
    r
}

fn word(r: &Region, i: usize) -> Option<&AtomicU64> {
    r.word(WORDS + i * 8)
}

/// Most jobs the done array holds in region `r`.
fn max_jobs(r: &Region) -> u64 {
    (r.data().1.saturating_sub(DONE) / 8) as u64
}

/// Busy work for `us` microseconds (the guest clock is read without an exit).
fn work(us: u64) -> u64 {
    let end = time::monotonic_ns() + us * 1000;
    let mut x = 1u64;
    while time::monotonic_ns() < end {
        for _ in 0..64 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        }
    }
    x
}

/// Takes jobs until the host asks for a shutdown; reaches a clone point between jobs.
fn worker(cpu: &Cpu, work_us: u64) -> i32 {
    let name = name(cpu);
    let Some(mut r) = region(name) else { return 2 };
    let mut role = "parent";
    let mut q = loop {
        // Nothing is held while waiting for the queue either.
        if capacity::clone_point() == Some(Role::Clone) {
            role = "clone";
            let Some(again) = region(name) else { return 2 };
            r = again;
        }
        if let Ok(q) = Queue::at(&r, QUEUE) {
            break q;
        }
        if boot::shutdown_requested() {
            println!("capworker done role={role} count=0");
            return 0;
        }
        hypercall::block(1_000_000);
    };
    let jobs = max_jobs(&r);
    let (mut count, mut sink) = (0u64, 0u64);
    println!("capworker ready slot={}", r.slot());
    loop {
        // Between jobs: nothing taken, nothing shared held.
        if capacity::clone_point() == Some(Role::Clone) {
            role = "clone";
            count = 0;
            // A clone is a new member of the region: find its entry (and slot) again.
            let Some(again) = region(name) else { return 2 };
            r = again;
            let Ok(again) = Queue::at(&r, QUEUE) else {
                println!("capworker: the queue is gone");
                return 3;
            };
            q = again;
            println!("capworker clone slot={}", r.slot());
        }
        if boot::shutdown_requested() {
            break;
        }
        match q.pop() {
            Ok(Some(m)) => {
                let job = m.word(0);
                sink ^= work(work_us);
                if job < jobs
                    && let Some(d) = r.word(DONE + job as usize * 8)
                {
                    d.fetch_add(1, Ordering::SeqCst);
                }
                if let Some(w) = word(&r, W_SLOT + r.slot()) {
                    w.fetch_add(1, Ordering::SeqCst);
                }
                if let Some(w) = word(&r, W_DONE) {
                    w.fetch_add(1, Ordering::SeqCst);
                }
                count += 1;
            }
            Ok(None) => {
                // Idle: the feeder wakes idle members when it posts; the host wakes us for a
                // clone or a shutdown.
                share::set_busy(false);
                if !q.has_message() && !capacity::clone_requested() && !boot::shutdown_requested() {
                    hypercall::block(100_000_000);
                }
                share::set_busy(true);
            }
            Err(_) => {
                println!("capworker: the queue is corrupt");
                return 3;
            }
        }
    }
    println!("capworker done role={role} count={count} ({})", sink & 1);
    0
}

/// Jobs done by members other than the busiest one (a clone's share of the work).
fn done_by_others(r: &Region) -> u64 {
    let counts =
        (0..MAX_MEMBERS).map(|s| word(r, W_SLOT + s).map_or(0, |w| w.load(Ordering::SeqCst)));
    let (sum, max) = counts.fold((0, 0), |(sum, max), c| (sum + c, core::cmp::max(max, c)));
    sum - max
}

/// Posts `n` jobs, waits for all to be done, and checks each was done exactly once. With
/// `workers` > 1, keeps posting past `n` (up to `max` jobs) until more than one worker has
/// done `until_others` jobs: the load lasts until a clone has joined, however long that takes.
fn feed(cpu: &Cpu, n: u64, until_others: u64, max: u64) -> i32 {
    let Some(r) = region(name(cpu)) else { return 2 };
    let max = max.max(n);
    if max > max_jobs(&r) {
        println!("capfeed: {max} jobs do not fit (at most {})", max_jobs(&r));
        return 2;
    }
    for i in 0..max {
        if let Some(d) = r.word(DONE + i as usize * 8) {
            d.store(0, Ordering::SeqCst);
        }
    }
    for i in 0..(W_SLOT + MAX_MEMBERS) {
        if let Some(w) = word(&r, i) {
            w.store(0, Ordering::SeqCst);
        }
    }
    let Ok(q) = Queue::init(&r, QUEUE, QUEUE_CAPACITY) else {
        println!("capfeed: no room for the queue");
        return 2;
    };
    let wake = |r: &Region| {
        for p in r.peers() {
            r.wake_if_idle(p);
        }
    };
    let t0 = time::monotonic_ns();
    let mut posted = 0;
    while posted < n || (until_others > 0 && posted < max && done_by_others(&r) < until_others) {
        let i = posted;
        let m = Message::words(&[i]);
        loop {
            match q.push(&m) {
                Ok(true) => break,
                Ok(false) => {
                    wake(&r);
                    hypercall::block(200_000);
                }
                Err(_) => {
                    println!("capfeed: the queue is corrupt");
                    return 3;
                }
            }
        }
        if i % 64 == 0 {
            wake(&r);
        }
        posted += 1;
    }
    let n = posted;
    wake(&r);
    println!("capfeed posted {n}");
    let Some(done) = word(&r, W_DONE) else {
        return 2;
    };
    // Bounded: two minutes at most.
    let deadline = time::monotonic_ns() + 120_000_000_000;
    while done.load(Ordering::SeqCst) < n {
        if time::monotonic_ns() > deadline {
            println!("capfeed timeout done={}", done.load(Ordering::SeqCst));
            return 4;
        }
        wake(&r);
        hypercall::block(2_000_000);
    }
    let elapsed_us = (time::monotonic_ns() - t0) / 1000;
    let (mut missing, mut twice) = (0u64, 0u64);
    for i in 0..n {
        match r
            .word(DONE + i as usize * 8)
            .map(|d| d.load(Ordering::SeqCst))
        {
            Some(0) => missing += 1,
            Some(1) => {}
            _ => twice += 1,
        }
    }
    let mut slots = alloc::string::String::new();
    for s in 0..MAX_MEMBERS {
        if let Some(c) = word(&r, W_SLOT + s).map(|w| w.load(Ordering::SeqCst))
            && c > 0
        {
            slots.push_str(&alloc::format!(" {s}:{c}"));
        }
    }
    println!(
        "capfeed done n={n} missing={missing} twice={twice} total={} elapsed_us={elapsed_us} slots={}",
        done.load(Ordering::SeqCst),
        slots.trim()
    );
    if missing == 0 && twice == 0 { 0 } else { 1 }
}

/// Calls `CLONE_POINT` when no clone was asked for: each returns 0 at once, nothing changes.
fn hostile() -> i32 {
    use rebound_guest::abi::nr;
    let before = hypercall::generation();
    for i in 0..1000 {
        let r = hypercall::raw(nr::CLONE_POINT, &[u64::MAX, i, 0, 0, 0, 0]);
        if r != 0 {
            println!("caphostile: an unrequested clone point returned {r}");
            return 1;
        }
    }
    if hypercall::generation() != before || capacity::clone_requested() {
        println!("caphostile: the VM changed");
        return 1;
    }
    println!("caphostile ok");
    0
}

/// Does nothing until the host asks it to shut down (a VM whose CPU share can be lent).
fn idle() -> i32 {
    println!("capidle ready");
    while !boot::shutdown_requested() {
        hypercall::block(1_000_000_000);
    }
    println!("capidle done");
    0
}
