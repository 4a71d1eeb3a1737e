//! The guest the test suite and benchmarks drive. The first word of the command line picks the
//! mode; the rest are its arguments. Every mode prints what it checks and exits 0 on success.
#![no_std]
#![no_main]

extern crate alloc;

mod capacity;
mod emulation;
mod indicators;
mod memory;
mod nested;
mod net;
mod programs;
mod sharing;

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use rebound_guest::abi::{self, errno, io, nr};
use rebound_guest::dispatch::Dispatcher;
use rebound_guest::hypercall::{self, raw};
use rebound_guest::io::IoQueue;
use rebound_guest::{Cpu, println, time};

fn arg(cpu: &Cpu, i: usize, default: u64) -> u64 {
    cpu.args()
        .split_whitespace()
        .nth(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main(cpu: Cpu) -> i32 {
    let mode = cpu.args().split_whitespace().next().unwrap_or("hello");
    if cpu.id() != 0 && mode != "multi" && mode != "spin" && mode != "emumulti" {
        return 0; // secondary vCPUs park unless the mode uses them
    }
    match mode {
        "hello" => {
            println!("hello from vCPU {} of {}", cpu.id(), cpu.count());
            0
        }
        "exit" => arg(&cpu, 1, 0) as i32,
        "ticks" => ticks(&cpu),
        "multi" => multi(&cpu),
        "fault-pf" => {
            // SAFETY: deliberately faulting: nothing is mapped at 0x10.
            unsafe { core::ptr::write_volatile(0x10 as *mut u64, 1) };
            0
        }
        "fault-gp" => {
            // SAFETY: deliberately faulting: wrmsr is privileged at CPL3 (and not emulated).
            unsafe { core::arch::asm!("wrmsr", in("ecx") 0x10u32, in("eax") 0u32, in("edx") 0u32) };
            0
        }
        "fault-ud" => {
            // SAFETY: deliberately faulting.
            unsafe { core::arch::asm!("ud2") };
            0
        }
        "fault-port" => {
            // SAFETY: deliberately faulting: the fault port is closed to CPL3.
            unsafe { core::arch::asm!("out dx, al", in("dx") abi::port::FAULT, in("al") 0u8) };
            0
        }
        "fault-write-pagetable" => {
            // SAFETY: deliberately faulting: page tables are supervisor-only.
            unsafe { core::ptr::write_volatile(0x1000 as *mut u64, 0) };
            0
        }
        "fault-stack" => recurse(0) as i32,
        "panic" => panic!("boom at step {}", arg(&cpu, 1, 3)),
        "hostile" => hostile(&cpu),
        "io" => io_test(&cpu),
        "spin" => {
            // Every vCPU computes at CPL3 forever without leaving the guest: only a kick stops it.
            let mut x = u64::from(cpu.id());
            loop {
                x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        "seq" => seq(&cpu),
        "disk-scatter" => disk_scatter(&cpu),
        "disk-flood" => disk_flood(&cpu),
        "disk-fsync" => disk_fsync(&cpu),
        "dirty" => {
            // Writes one byte of each of K pages, round and round: whatever the host's
            // checkpoint period, (up to) K pages are dirty at each checkpoint.
            let k = arg(&cpu, 1, 64) as usize;
            let mut buf: Vec<u8> = vec![0; k * 4096];
            let mut n = 0u8;
            loop {
                n = n.wrapping_add(1);
                for p in 0..k {
                    // SAFETY: `p * 4096` is inside `buf`; volatile so every write happens.
                    unsafe { core::ptr::write_volatile(buf.as_mut_ptr().add(p * 4096), n) };
                }
            }
        }
        "rate" => rate(&cpu),
        "stress" => stress(&cpu),
        "hcbench" => {
            let n = arg(&cpu, 1, 10_000);
            let t0 = time::monotonic_ns();
            for _ in 0..n {
                raw(nr::ABI_VERSION, &[]);
            }
            let t1 = time::monotonic_ns();
            println!("hcbench {} {}", n, t1 - t0);
            0
        }
        "clock" => clock(&cpu),
        "warm" => {
            // Touches MIB MiB, says so, then keeps writing K of those pages round and round:
            // a VM with a working set that is never idle.
            let mib = arg(&cpu, 1, 16) as usize;
            let k = (arg(&cpu, 2, 64) as usize).clamp(1, mib * 256);
            let mut v: Vec<u8> = vec![0; mib << 20];
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            println!("warm ready {} MiB", mib);
            let mut n = 0u8;
            loop {
                n = n.wrapping_add(1);
                for p in 0..k {
                    // SAFETY: `p * 4096` is inside `v`; volatile so every write happens.
                    unsafe { core::ptr::write_volatile(v.as_mut_ptr().add(p * 4096), n) };
                }
                hypercall::yield_now();
            }
        }
        "touch" => {
            let mib = arg(&cpu, 1, 16) as usize;
            let mut v: Vec<u8> = vec![0; mib << 20];
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            println!("touched {} MiB", mib);
            loop {
                hypercall::block(u64::MAX);
            }
        }
        other => match net::run(other, &cpu) {
            Some(code) => code,
            None => match sharing::run(other, &cpu, |i, d| arg(&cpu, i, d))
                .or_else(|| memory::run(other, &cpu, |i, d| arg(&cpu, i, d)))
                .or_else(|| capacity::run(other, &cpu, |i, d| arg(&cpu, i, d)))
                .or_else(|| emulation::run(other, &cpu, |i, d| arg(&cpu, i, d)))
                .or_else(|| programs::run(other, &cpu, |i, d| arg(&cpu, i, d)))
                .or_else(|| nested::run(other, &cpu, |i, d| arg(&cpu, i, d)))
                .or_else(|| indicators::run(other, &cpu, |i, d| arg(&cpu, i, d)))
            {
                Some(code) => code,
                None => {
                    println!("unknown mode {other:?}");
                    2
                }
            },
        },
    }
}

fn stress_word(r: u64, i: u64) -> u64 {
    let mut z = (r << 40) ^ i ^ 0x5851_f42d_4c95_7f2d;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `stress MiB [rounds]`: round after round, fills a buffer with a pattern, reads it back and
/// checks every word (a page lost or mixed up by a checkpoint or rollback shows here), and prints
/// `stress round R sum=S` (S can be recomputed for any single round on the host).
fn stress(cpu: &Cpu) -> i32 {
    let words = (arg(cpu, 1, 8) << 20) / 8;
    let rounds = arg(cpu, 2, u64::MAX);
    let mut buf: Vec<u64> = vec![0; words as usize];
    for r in 0..rounds {
        let mut sum = 0u64;
        for (i, w) in buf.iter_mut().enumerate() {
            *w = stress_word(r, i as u64);
        }
        for (i, w) in buf.iter().enumerate() {
            let want = stress_word(r, i as u64);
            if *w != want {
                println!(
                    "stress MISMATCH round {} word {}: {:x} != {:x}",
                    r, i, *w, want
                );
                return 3;
            }
            sum = sum.rotate_left(5) ^ want;
        }
        println!("stress round {} sum={:016x}", r, sum);
    }
    0
}

/// `rate PCT SECS`: computes for SECS seconds while writing PCT tenths of a percent of guest
/// memory per second (cycling over a buffer of half of memory), then prints how much work it
/// did: `rate work=W pages=P`. Comparing W with and without checkpointing gives the slowdown.
fn rate(cpu: &Cpu) -> i32 {
    let permille = arg(cpu, 1, 10);
    let secs = arg(cpu, 2, 3);
    // 1: fill each page written with pseudo-random bytes (incompressible), not one byte.
    let fill = arg(cpu, 3, 0) == 1;
    let mem = cpu.boot_info().mem_size;
    let pages_per_sec = mem / 4096 * permille / 1000;
    let buf_pages = (mem / 2 / 4096) as usize;
    let mut buf: Vec<u8> = vec![0; buf_pages * 4096];
    let t0 = time::monotonic_ns();
    let end = t0 + secs * 1_000_000_000;
    let (mut work, mut written, mut x) = (0u64, 0u64, 1u64);
    loop {
        for _ in 0..100_000 {
            x = step(x, work);
            work += 1;
        }
        let now = time::monotonic_ns();
        if now >= end {
            break;
        }
        let due = (now - t0) * pages_per_sec / 1_000_000_000;
        while written < due {
            let p = (written as usize) % buf_pages;
            if fill {
                let mut r = x | 1;
                for w in buf[p * 4096..(p + 1) * 4096].chunks_exact_mut(8) {
                    r ^= r << 13;
                    r ^= r >> 7;
                    r ^= r << 17;
                    w.copy_from_slice(&r.to_le_bytes());
                }
            } else {
                // SAFETY: `p * 4096` is inside `buf`; volatile so the write happens.
                unsafe { core::ptr::write_volatile(buf.as_mut_ptr().add(p * 4096), x as u8) };
            }
            written += 1;
        }
    }
    println!("rate work={} pages={} x={:x}", work, written, x);
    0
}

/// One step of the test sequence.
fn step(x: u64, i: u64) -> u64 {
    let y = (x ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    y ^ (y >> 29)
}

/// `seq N [report]`: computes N steps of a deterministic sequence in guest memory, printing a
/// numbered progress line every `report` steps (default N/16). It checks the generation every
/// 2^16 steps: when it changes (a restore or a clone) it mixes the new generation in and prints
/// where, so the host can recompute the expected result. Ends with `seq done N result=X`.
fn seq(cpu: &Cpu) -> i32 {
    let n = arg(cpu, 1, 1 << 26);
    let report = arg(cpu, 2, (n / 16).max(1));
    // State lives in a heap array, not only in registers: restores must bring memory back too.
    let mut hist: Vec<u64> = vec![0; 4096];
    let mut x = 1u64;
    let mut gen_seen = hypercall::generation();
    let mut line = 0u64;
    for i in 0..n {
        x = step(x, i) ^ hist[(i % 4096) as usize];
        hist[(i % 4096) as usize] = x >> 7;
        if i % 65536 == 65535 {
            let g = hypercall::generation();
            if g != gen_seen {
                gen_seen = g;
                x ^= g;
                println!("seq gen {} at {}", g, i);
            }
        }
        if i % report == report - 1 {
            println!("seq line {} at {} x={:016x}", line, i + 1, x);
            line += 1;
        }
    }
    println!("seq done {} result={:016x}", n, x);
    0
}

/// `disk-fsync N`: N rounds of a 4 KiB write then a `FLUSH`, each awaited; prints the median
/// and 99th percentile of a round's latency (write + flush) in microseconds.
fn disk_fsync(cpu: &Cpu) -> i32 {
    let n = arg(cpu, 1, 1000).max(1);
    let blocks = (cpu.disk_size() / 4096).max(1);
    let lat = alloc::rc::Rc::new(core::cell::RefCell::new(Vec::with_capacity(n as usize)));
    let l = lat.clone();
    let mut d = Dispatcher::new();
    d.spawn(async move {
        let q = queue();
        let mut buf = vec![0u8; 4096];
        for i in 0..n {
            buf[..8].copy_from_slice(&i.to_le_bytes());
            let t = time::monotonic_ns();
            let (r, back) = q.write((i % blocks) * 4096, buf).await;
            buf = back;
            r.expect("disk-fsync write");
            let (r, _) = q.flush().await;
            r.expect("disk-fsync flush");
            l.borrow_mut().push(time::monotonic_ns() - t);
        }
    });
    d.run();
    let mut v = lat.borrow_mut();
    v.sort_unstable();
    let at = |q: usize| v[(v.len() - 1) * q / 100] / 1000;
    println!("disk-fsync {n} p50_us={} p99_us={}", at(50), at(99));
    0
}

/// `disk-flood MIB TASKS`: TASKS tasks write MIB MiB in all, 1 MiB at a time, across the
/// disk, as fast as they can; a write refused with `EAGAIN` (too much held for a checkpoint)
/// is submitted again at once, as a hostile guest would. Prints how many were refused.
fn disk_flood(cpu: &Cpu) -> i32 {
    let mib = arg(cpu, 1, 64);
    let tasks = arg(cpu, 2, 4).max(1);
    let chunks = (cpu.disk_size() >> 20).max(1);
    let refused = alloc::rc::Rc::new(core::cell::Cell::new(0u64));
    let t0 = time::monotonic_ns();
    let mut d = Dispatcher::new();
    for t in 0..tasks {
        let refused = refused.clone();
        d.spawn(async move {
            let q = queue();
            let mut buf = vec![t as u8 + 1; 1 << 20];
            let mut i = t;
            while i < mib {
                loop {
                    let (r, back) = q.write((i % chunks) << 20, buf).await;
                    buf = back;
                    match r {
                        Ok(_) => break,
                        Err(e) if e.0 == abi::errno::EAGAIN => refused.set(refused.get() + 1),
                        Err(e) => panic!("disk-flood write {i}: {e}"),
                    }
                }
                i += tasks;
            }
        });
    }
    d.run();
    println!(
        "disk-flood done {mib} MiB, {} writes refused, us={}",
        refused.get(),
        (time::monotonic_ns() - t0) / 1000
    );
    0
}

/// `disk-scatter N SLOTS PAUSE_US [QUIET]`: N steps; step i writes the sector record
/// `[magic, i, t]` (t: the monotonic clock) to the sector picked from t among SLOTS, prints
/// `rec SLOT i t` once the write completed (unless QUIET is 1), and waits PAUSE_US. Where each write lands
/// depends on the clock, so a step run again after a rollback writes elsewhere: a disk that
/// kept an undone write would hold a record nothing printed. At the end every slot is read back
/// and compared with what the guest remembers writing there (`disk-scatter verified N`), so a
/// restored or rolled-back guest checks that its disk came back with its memory.
fn disk_scatter(cpu: &Cpu) -> i32 {
    let n = arg(cpu, 1, 200);
    let slots = arg(cpu, 2, 64).max(1);
    let pause_ns = arg(cpu, 3, 1000) * 1000;
    let quiet = arg(cpu, 4, 0) == 1;
    let q = queue();
    let bad = alloc::rc::Rc::new(core::cell::Cell::new(u64::MAX));
    let verdict = bad.clone();
    let mut d = Dispatcher::new();
    d.spawn(async move {
        let mut table: Vec<Option<(u64, u64)>> = alloc::vec![None; slots as usize];
        for i in 0..n {
            let t = time::monotonic_ns();
            let slot = ((t / 997) ^ i.wrapping_mul(0x9e37_79b9)) % slots;
            table[slot as usize] = Some((i, t));
            let mut rec = vec![0u8; 512];
            rec[..8].copy_from_slice(b"SCATTER!");
            rec[8..16].copy_from_slice(&i.to_le_bytes());
            rec[16..24].copy_from_slice(&t.to_le_bytes());
            loop {
                let (r, back) = q.write(slot * 512, rec).await;
                rec = back;
                match r {
                    Ok(_) => break,
                    // Too much held for the checkpoint: it comes within an epoch.
                    Err(e) if e.0 == abi::errno::EAGAIN => {
                        let _ = q.sleep(1_000_000).await;
                    }
                    Err(e) => panic!("disk-scatter write {i}: {e}"),
                }
            }
            if !quiet {
                println!("rec {slot} {i} {t}");
            }
            if pause_ns > 0 {
                let _ = q.sleep(pause_ns).await;
            }
        }
        let mut wrong = 0;
        for (slot, want) in table.iter().enumerate() {
            let (r, got) = q.read(slot as u64 * 512, vec![0u8; 512]).await;
            let ok = r == Ok(512)
                && match want {
                    None => got.iter().all(|b| *b == 0),
                    Some((i, t)) => {
                        &got[..8] == b"SCATTER!"
                            && got[8..16] == i.to_le_bytes()
                            && got[16..24] == t.to_le_bytes()
                    }
                };
            if !ok {
                if wrong == 0 {
                    println!(
                        "disk-scatter slot {slot}: want {want:?}, disk has {:?}",
                        &got[..24]
                    );
                }
                wrong += 1;
            }
        }
        bad.set(wrong);
    });
    d.run();
    println!("disk-scatter done {n}");
    match verdict.get() {
        0 => {
            println!("disk-scatter verified {slots}");
            0
        }
        w => {
            println!("disk-scatter: {w} slots differ from what was written");
            1
        }
    }
}

#[inline(never)]
#[allow(unconditional_recursion)] // overflowing the stack is the point
fn recurse(n: u64) -> u64 {
    let pad = [n; 64];
    core::hint::black_box(&pad);
    recurse(n + 1) + pad[3]
}

/// `ticks MS COUNT [MIB]`: prints `tick N TIME` every MS ms (blocking in the VMM in between),
/// COUNT times (0: forever), after filling MIB MiB with incompressible bytes (memory a full
/// copy has to move).
fn ticks(cpu: &Cpu) -> i32 {
    let ms = arg(cpu, 1, 20);
    let count = arg(cpu, 2, 0);
    let mib = arg(cpu, 3, 0) as usize;
    let mut held: Vec<u64> = vec![0; mib << 17];
    let mut x = time::monotonic_ns() | 1;
    for w in held.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    if mib > 0 {
        println!("filled {} MiB {:x}", mib, held.iter().fold(0, |a, w| a ^ w));
    }
    let mut i = 0;
    loop {
        if rebound_guest::boot::shutdown_requested() {
            println!("shutdown requested after {i} ticks");
            return 0;
        }
        println!("tick {} {}", i, time::monotonic_ns());
        i += 1;
        if count != 0 && i >= count {
            return 0;
        }
        let deadline = time::monotonic_ns() + ms * 1_000_000;
        loop {
            let now = time::monotonic_ns();
            if now >= deadline {
                break;
            }
            hypercall::block(deadline - now);
        }
    }
}

static ARRIVED: AtomicU32 = AtomicU32::new(0);
static WORK: [AtomicU64; 32] = [const { AtomicU64::new(0) }; 32];

/// Every vCPU arrives at a barrier and then computes; vCPU 0 checks all of them were inside
/// the barrier at once (so they really ran concurrently) and that each did its work.
fn multi(cpu: &Cpu) -> i32 {
    let n = cpu.count();
    ARRIVED.fetch_add(1, Ordering::SeqCst);
    let start = time::monotonic_ns();
    while ARRIVED.load(Ordering::SeqCst) < n {
        if time::monotonic_ns() - start > 10_000_000_000 {
            println!(
                "vCPU {}: only {} of {} vCPUs arrived",
                cpu.id(),
                ARRIVED.load(Ordering::SeqCst),
                n
            );
            return 1;
        }
        core::hint::spin_loop();
    }
    let mut x = u64::from(cpu.id()) + 1;
    for _ in 0..10_000_000u32 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
    }
    WORK[cpu.id() as usize].store(x | 1, Ordering::SeqCst);
    println!("vCPU {} done", cpu.id());
    if cpu.id() != 0 {
        return 0;
    }
    while (0..n as usize).any(|i| WORK[i].load(Ordering::SeqCst) == 0) {
        hypercall::yield_now();
    }
    println!("all {} vCPUs ran concurrently", n);
    0
}

struct Checks {
    failed: u32,
    total: u32,
}

impl Checks {
    fn expect(&mut self, what: &str, got: i64, want: i64) {
        self.total += 1;
        if got != want {
            self.failed += 1;
            println!("FAIL {what}: got {got}, want {want}");
        } else {
            println!("ok {what}: {got}");
        }
    }
}

/// Hypercalls and I/O requests with hostile arguments: each must come back with the right
/// errno and leave the VM working.
fn hostile(cpu: &Cpu) -> i32 {
    let mem = cpu.boot_info().mem_size;
    let mut c = Checks {
        failed: 0,
        total: 0,
    };
    let buf = [b'x'; 16];
    let p = buf.as_ptr() as u64;
    c.expect(
        "console_write wild pointer",
        raw(nr::CONSOLE_WRITE, &[0xffff_ffff_ffff_0000, 8]),
        errno::EFAULT,
    );
    c.expect(
        "console_write huge length",
        raw(nr::CONSOLE_WRITE, &[p, 1 << 40]),
        errno::E2BIG,
    );
    c.expect(
        "console_write past the end",
        raw(nr::CONSOLE_WRITE, &[mem - 4, 100]),
        errno::EFAULT,
    );
    c.expect(
        "console_write wrapping range",
        raw(nr::CONSOLE_WRITE, &[u64::MAX - 2, 10]),
        errno::EFAULT,
    );
    c.expect("unknown hypercall", raw(999, &[]), errno::ENOSYS);
    c.expect(
        "unknown hypercall u32::MAX",
        raw(u32::MAX, &[]),
        errno::ENOSYS,
    );
    c.expect(
        "io_setup misaligned",
        raw(nr::IO_SETUP, &[p + 1, 8]),
        errno::EINVAL,
    );
    c.expect(
        "io_setup in the system area",
        raw(nr::IO_SETUP, &[0x1000, 8]),
        errno::EFAULT,
    );
    c.expect(
        "io_setup not a power of two",
        raw(nr::IO_SETUP, &[p, 3]),
        errno::EINVAL,
    );
    c.expect(
        "io_setup too many entries",
        raw(nr::IO_SETUP, &[p, 1 << 20]),
        errno::EINVAL,
    );
    c.expect(
        "io_setup past the end",
        raw(nr::IO_SETUP, &[mem - 64, 8]),
        errno::EFAULT,
    );
    c.expect(
        "block with zero timeout",
        raw(nr::BLOCK, &[0]),
        abi::BLOCK_TIMED_OUT,
    );
    c.expect(
        "abi_version",
        raw(nr::ABI_VERSION, &[]),
        i64::from(abi::ABI_VERSION),
    );

    // I/O requests pointing where they must not.
    queue();
    c.expect(
        "second io_setup",
        raw(nr::IO_SETUP, &[p & !7, 8]),
        errno::EBUSY,
    );
    let results = run_ops(vec![
        (io::OP_READ, 0, 4096),
        (io::OP_READ, 0, 100),
        (io::OP_WRITE, u64::MAX - 511, 512),
    ]);
    c.expect("read into a good buffer", results[0], 4096);
    c.expect("read of a partial sector", results[1], errno::EINVAL);
    c.expect("write past the disk end", results[2], errno::EINVAL);
    let scratch = [0u8; 512];
    c.expect(
        "unknown I/O op",
        raw_request(99, scratch.as_ptr() as u64, 512),
        errno::EINVAL,
    );
    // A request whose buffer is the page tables: completes with EFAULT, tables untouched.
    let r = raw_request(io::OP_READ, 0x1000, 4096);
    c.expect("read into the page tables", r, errno::EFAULT);
    println!("still alive after {} hostile checks", c.total);
    if c.failed == 0 {
        println!("hostile: all {} checks passed", c.total);
        0
    } else {
        println!("hostile: {} of {} checks failed", c.failed, c.total);
        1
    }
}

static QUEUE: AtomicPtr<IoQueue> = AtomicPtr::new(core::ptr::null_mut());

/// This vCPU's I/O ring, registered on first use (only vCPU 0 does I/O here).
fn queue() -> &'static IoQueue {
    let p = QUEUE.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: set below from a `&'static IoQueue`.
        return unsafe { &*p };
    }
    let q = IoQueue::setup(64).unwrap_or_else(|e| panic!("io setup: {e}"));
    QUEUE.store(core::ptr::from_ref(q).cast_mut(), Ordering::Release);
    q
}

/// Runs disk ops through the dispatcher, returns each result (bytes or errno).
fn run_ops(ops: Vec<(u32, u64, usize)>) -> Vec<i64> {
    let results = alloc::rc::Rc::new(core::cell::RefCell::new(vec![0i64; ops.len()]));
    let mut d = Dispatcher::new();
    for (i, (op, offset, len)) in ops.into_iter().enumerate() {
        let results = results.clone();
        d.spawn(async move {
            let q = queue();
            let buf = vec![0u8; len];
            let r = match op {
                io::OP_READ => q.read(offset, buf).await.0,
                io::OP_WRITE => q.write(offset, buf).await.0,
                _ => unreachable!("run_ops takes reads and writes"),
            };
            results.borrow_mut()[i] = match r {
                Ok(n) => i64::from(n),
                Err(e) => e.0,
            };
        });
    }
    d.run();
    results.borrow().clone()
}

/// Submits one request by hand (the safe API cannot express bad ops or buffers the guest does
/// not own) and blocks until it completes.
fn raw_request(op: u32, buf: u64, len: u32) -> i64 {
    let ind: &'static AtomicU64 =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(AtomicU64::new(0)));
    let req = abi::io::IoRequest {
        op,
        len,
        buf,
        offset: 0,
        completion: ind as *const AtomicU64 as u64,
    };
    rebound_guest::io::submit_raw(queue(), req);
    loop {
        if let Some(r) = abi::completion::decode(ind.load(Ordering::Acquire)) {
            return i64::from(r);
        }
        hypercall::block(u64::MAX);
    }
}

/// Tasks writing, reading back and checking disk blocks through the dispatcher, plus timers;
/// prints the dispatcher's statistics.
fn io_test(cpu: &Cpu) -> i32 {
    let tasks = arg(cpu, 1, 8);
    let blocks = arg(cpu, 2, 8);
    if cpu.disk_size() < tasks * blocks * 4096 {
        println!("disk too small: {} bytes", cpu.disk_size());
        return 1;
    }
    let bad = alloc::rc::Rc::new(core::cell::Cell::new(0u32));
    let mut d = Dispatcher::new();
    for t in 0..tasks {
        let bad = bad.clone();
        d.spawn(async move {
            let q = queue();
            for b in 0..blocks {
                let off = (t * blocks + b) * 4096;
                let data: Vec<u8> = (0..4096).map(|i| (i as u64 ^ off ^ t) as u8).collect();
                let (r, data) = q.write(off, data).await;
                if r != Ok(4096) {
                    bad.set(bad.get() + 1);
                }
                let (r, back) = q.read(off, vec![0u8; 4096]).await;
                if r != Ok(4096) || back != data {
                    bad.set(bad.get() + 1);
                }
            }
        });
    }
    let io = d.run();
    // Then a timer alone: with nothing else to do, the guest waits for its completion blocked
    // in the VMM, however the I/O above interleaved with the host's I/O thread.
    let mut d = Dispatcher::new();
    d.spawn(async {
        let (r, _) = queue().sleep(20_000_000).await;
        println!("timer done: {:?}", r);
    });
    let timer = d.run();
    let (polls, blocks_, completions) = (
        io.polls + timer.polls,
        io.blocks + timer.blocks,
        io.completions + timer.completions,
    );
    println!(
        "io: {} tasks x {} blocks, {} bad; dispatcher polls={} blocks={} completions={}",
        tasks,
        blocks,
        bad.get(),
        polls,
        blocks_,
        completions
    );
    if bad.get() == 0 && completions > 0 {
        0
    } else {
        1
    }
}

rebound_guest::entry!(main);

/// `clock [N]`: N (1000) readings of the monotonic clock, each between two readings of the
/// clock hypercall (the VMM's own clock): the first never ahead of the second, none earlier
/// than the one before. Then times N readings each way. Prints
/// `clock ok tsc=T ns_per_read=R hypercall_ns_per_read=H` (T: 1 if read from the TSC).
fn clock(cpu: &Cpu) -> i32 {
    let n = arg(cpu, 1, 1000);
    let hc = || raw(nr::CLOCK_MONOTONIC, &[]) as u64;
    // SAFETY: this vCPU's own page; `flags` is only read.
    let tsc = unsafe { core::ptr::read_volatile(&raw const (*hypercall::vcpu_page()).clock.flags) }
        & abi::clock_flags::TSC;
    println!("clock started tsc={tsc}");
    let mut last = 0;
    for i in 0..n {
        let before = hc();
        let t = time::monotonic_ns();
        let after = hc();
        // The two are the same function of the same counter; a few microseconds of slack
        // covers the TSC offset measured for this vCPU.
        if t + 20_000 < before || t > after + 20_000 || t < last {
            println!("clock: reading {i}: {t} outside [{before}, {after}] or before {last}");
            return 1;
        }
        last = t;
    }
    let t0 = hc();
    for _ in 0..n {
        core::hint::black_box(time::monotonic_ns());
    }
    let t1 = hc();
    for _ in 0..n {
        core::hint::black_box(hc());
    }
    let t2 = hc();
    println!(
        "clock ok tsc={tsc} ns_per_read={} hypercall_ns_per_read={}",
        (t1 - t0) / n.max(1),
        (t2 - t1) / n.max(1)
    );
    0
}
