//! Test modes for memory shared between VMs. Region layout used by all of them (data area):
//! member inboxes (one per slot), then a shared work queue, then application words.

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use core::sync::atomic::Ordering;

use rebound_guest::dispatch::{Dispatcher, Source};
use rebound_guest::share::{self, Acquired, Inbox, Message, Queue, Region};
use rebound_guest::{Cpu, hypercall, println, time};

const INBOX_CAPACITY: u64 = 256;
const INBOX_STRIDE: usize = Queue::bytes(INBOX_CAPACITY);
const WORK_OFFSET: usize = INBOX_STRIDE * 64;
const WORK_CAPACITY: u64 = 1024;
/// Application words start here (data-area offset).
pub const APP: usize = 1 << 21;
/// The cache's slots.
const CACHE_OFFSET: usize = APP + 4096;
const CACHE_SLOTS: usize = 64;
const CACHE_SLOT: usize = 4096 + 64;
const CACHE_WORDS: usize = 512;

fn sarg(cpu: &Cpu, i: usize) -> &str {
    cpu.args().split_whitespace().nth(i).unwrap_or("")
}

fn region(cpu: &Cpu) -> Option<Region> {
    let name = sarg(cpu, 1);
    let r = share::find(name);
    if r.is_none() {
        println!("no shared region {name:?}");
    }
    r
}

fn inbox_of(slot: usize) -> usize {
    INBOX_STRIDE * slot
}

/// A peer whose inbox is ready (waits up to 30 s for one).
fn wait_peer_inbox(r: &Region) -> usize {
    for _ in 0..30_000 {
        for p in r.peers() {
            if share::inbox_of(r, inbox_of(p), p).is_some() {
                return p;
            }
        }
        hypercall::block(1_000_000);
    }
    println!("no peer with an inbox came");
    hypercall::exit(3)
}

fn word(r: &Region, offset: usize) -> &core::sync::atomic::AtomicU64 {
    match r.word(offset) {
        Some(w) => w,
        None => {
            println!("region {} is too small for offset {offset}", r.name());
            hypercall::exit(3)
        }
    }
}

/// Dispatches one task that receives from `inbox` until it returns; `poll` false makes the
/// dispatcher go idle at once instead of polling briefly first.
fn run_inbox<F: core::future::Future<Output = ()> + 'static>(
    inbox: &Rc<Inbox>,
    poll: bool,
    task: F,
) {
    let mut d = Dispatcher::new();
    if !poll {
        d.set_poll_spins(0);
    }
    d.add_source(inbox.clone() as Rc<dyn Source>);
    d.spawn(task);
    d.run();
}

pub fn run(mode: &str, cpu: &Cpu, arg: impl Fn(usize, u64) -> u64) -> Option<i32> {
    Some(match mode {
        "share-info" => {
            let Some(r) = region(cpu) else { return Some(2) };
            println!(
                "share {} slot={} writable={} cache={} size={} peers={}",
                r.name(),
                r.slot(),
                r.writable(),
                r.is_cache(),
                r.size(),
                r.peers().count()
            );
            0
        }
        "share-write" => {
            let Some(r) = region(cpu) else { return Some(2) };
            let v = arg(2, 0);
            word(&r, APP).store(v, Ordering::SeqCst);
            println!("wrote {v}, read {}", word(&r, APP).load(Ordering::SeqCst));
            0
        }
        "share-read" => {
            let Some(r) = region(cpu) else { return Some(2) };
            println!("read {}", word(&r, APP).load(Ordering::SeqCst));
            0
        }
        "share-wait" => {
            // Waits until the application word equals the argument (another VM writes it).
            let Some(r) = region(cpu) else { return Some(2) };
            let v = arg(2, 1);
            while word(&r, APP).load(Ordering::SeqCst) != v {
                hypercall::block(1_000_000);
            }
            println!("saw {v}");
            0
        }
        // pong|ping REGION COUNT [always|idle] [nopoll]; sink REGION COUNT [lossy|exact] [nopoll]
        "pong" => pong(
            cpu,
            arg(2, 100),
            sarg(cpu, 3) == "always",
            sarg(cpu, 4) != "nopoll",
        ),
        "ping" => ping(
            cpu,
            arg(2, 100),
            sarg(cpu, 3) == "always",
            sarg(cpu, 4) != "nopoll",
        ),
        "sink" => sink(
            cpu,
            arg(2, 100),
            sarg(cpu, 3) == "lossy",
            sarg(cpu, 4) != "nopoll",
        ),
        "source" => source(cpu, arg(2, 100), sarg(cpu, 3) == "always"),
        "workq-put" => workq_put(cpu, arg(2, 100), arg(3, 1)),
        "workq-take" => workq_take(cpu),
        "lockstress" => lockstress(cpu, arg(2, 1000)),
        "lockhold" => {
            let Some(r) = region(cpu) else { return Some(2) };
            let i = arg(2, 0) as usize;
            let how = r.lock(i).lock();
            word(&r, APP).store(1, Ordering::SeqCst);
            println!("holding lock {i} ({how:?})");
            loop {
                hypercall::block(u64::MAX);
            }
        }
        "locktake" => {
            // Takes a lock (waiting for it, recovering it if need be) and says how it was left.
            let Some(r) = region(cpu) else { return Some(2) };
            let i = arg(2, 0) as usize;
            let l = r.lock(i);
            let how = l.lock();
            println!("took lock {i} ({how:?})");
            l.unlock();
            0
        }
        "lockwait" => {
            let Some(r) = region(cpu) else { return Some(2) };
            let l = r.lock(arg(2, 0) as usize);
            while l.try_lock().is_some() {
                // Not held yet: give it back and wait for the holder.
                l.unlock();
                hypercall::block(1_000_000);
            }
            println!("lock is held; waiting");
            let how = l.lock();
            println!(
                "acquired {}",
                if how == Acquired::Inconsistent {
                    "inconsistent"
                } else {
                    "clean"
                }
            );
            l.unlock();
            0
        }
        // The data lives in one VM's memory; only the lock (and inboxes) are shared.
        "lockowner" => lock_owner(cpu, arg(2, 2)),
        "lockclient" => lock_client(cpu, arg(2, 100)),
        "recover-loop" => {
            // Asks the VMM to recover dead members as fast as it can for `ms` milliseconds.
            let Some(r) = region(cpu) else { return Some(2) };
            let until = time::monotonic_ns() + arg(2, 1000) * 1_000_000;
            let (mut calls, mut recovered) = (0u64, 0u64);
            while time::monotonic_ns() < until {
                for _ in 0..100 {
                    recovered += r.recover();
                }
                calls += 100;
            }
            println!("recover-loop calls={calls} recovered={recovered}");
            0
        }
        "share-hostile" => hostile(cpu),
        "cache-writer" => cache_writer(cpu, arg(2, 1000)),
        "cache-reader" => cache_reader(cpu, arg(2, 100_000)),
        "pcache" => pcache(cpu),
        "lockbench" => {
            let Some(r) = region(cpu) else { return Some(2) };
            let n = arg(2, 1_000_000);
            let l = r.lock(7);
            let t0 = time::monotonic_ns();
            for _ in 0..n {
                if l.try_lock().is_none() {
                    println!("lock 7 unexpectedly held");
                    return Some(1);
                }
                l.unlock();
            }
            let t1 = time::monotonic_ns();
            println!("lockbench {n} {}", t1 - t0);
            0
        }
        _ => return None,
    })
}

fn pong(cpu: &Cpu, count: u64, always: bool, poll: bool) -> i32 {
    let Some(r) = region(cpu) else { return 2 };
    let Ok(inbox) = Inbox::create(&r, inbox_of(r.slot()), INBOX_CAPACITY) else {
        println!("cannot make an inbox");
        return 2;
    };
    println!("pong ready slot={}", r.slot());
    let ib = inbox.clone();
    let rings = Rc::new(core::cell::Cell::new(0u64));
    let rg = rings.clone();
    run_inbox(&inbox, poll, async move {
        for i in 0..count {
            let m = ib.recv().await;
            if m.word(0) != i {
                println!("pong ERROR expected {i}, got {}", m.word(0));
                hypercall::exit(1);
            }
            let to = m.word(1) as usize;
            let reply = Message::words(&[i]);
            loop {
                match share::send(&r, inbox_of(to), to, &reply) {
                    Ok((true, rang)) => {
                        if always && !rang {
                            r.wake(to);
                        }
                        rg.set(rg.get() + u64::from(rang || always));
                        break;
                    }
                    Ok((false, _)) => hypercall::yield_now(),
                    Err(_) => {
                        println!("pong ERROR corrupt reply queue");
                        hypercall::exit(1);
                    }
                }
            }
        }
    });
    println!(
        "pong done {count} rings={} woken={} corrupt={}",
        rings.get(),
        r.member(r.slot()).wakeups(),
        inbox.corruptions()
    );
    0
}

fn ping(cpu: &Cpu, count: u64, always: bool, poll: bool) -> i32 {
    let Some(r) = region(cpu) else { return 2 };
    let Ok(inbox) = Inbox::create(&r, inbox_of(r.slot()), INBOX_CAPACITY) else {
        println!("cannot make an inbox");
        return 2;
    };
    let peer = wait_peer_inbox(&r);
    let me = r.slot() as u64;
    let ib = inbox.clone();
    let stats = Rc::new(core::cell::Cell::new((0u64, 0u64)));
    let st = stats.clone();
    run_inbox(&inbox, poll, async move {
        let t0 = time::monotonic_ns();
        let mut rings = 0;
        for i in 0..count {
            match share::send(&r, inbox_of(peer), peer, &Message::words(&[i, me])) {
                Ok((true, rang)) => {
                    if always && !rang {
                        r.wake(peer);
                    }
                    rings += u64::from(rang || always);
                }
                _ => {
                    println!("ping ERROR cannot send");
                    hypercall::exit(1);
                }
            }
            let m = ib.recv().await;
            if m.word(0) != i {
                println!("ping ERROR expected {i}, got {}", m.word(0));
                hypercall::exit(1);
            }
        }
        st.set((time::monotonic_ns() - t0, rings));
    });
    let (ns, rings) = stats.get();
    println!(
        "ping done {count} ns={ns} rings={rings} woken={}",
        r.member(r.slot()).wakeups()
    );
    0
}

fn sink(cpu: &Cpu, total: u64, lossy: bool, poll: bool) -> i32 {
    let Some(r) = region(cpu) else { return 2 };
    let Ok(inbox) = Inbox::create(&r, inbox_of(r.slot()), INBOX_CAPACITY) else {
        println!("cannot make an inbox");
        return 2;
    };
    println!("sink ready slot={}", r.slot());
    let ib = inbox.clone();
    let first = Rc::new(core::cell::Cell::new(0u64));
    let fst = first.clone();
    run_inbox(&inbox, poll, async move {
        // Senders by VM id, not slot: a sender that finished leaves its slot to the next one.
        let mut next: BTreeMap<u64, u64> = BTreeMap::new();
        // Lossy: run until `total` messages arrived after a corruption was noticed.
        let mut counted = 0;
        while counted < total {
            let m = ib.recv().await;
            if fst.get() == 0 {
                fst.set(time::monotonic_ns());
            }
            if !lossy || ib.corruptions() > 0 {
                counted += 1;
            }
            let (from, seq) = (m.word(0), m.word(1));
            if next.len() == 64 && !next.contains_key(&from) {
                println!("sink dropped a message from a 65th sender ({from:#x})");
                continue;
            }
            let want = next.get(&from).copied().unwrap_or(0);
            let ok = if lossy && ib.corruptions() > 0 {
                seq >= want
            } else {
                seq == want
            };
            if !ok {
                println!("sink ERROR from VM {from:#x}: expected {want}, got {seq}");
                hypercall::exit(1);
            }
            next.insert(from, seq + 1);
        }
    });
    // From the first message to the last: the receiving rate.
    println!(
        "sink done {total} corrupt={} ns={} woken={}",
        inbox.corruptions(),
        time::monotonic_ns() - first.get(),
        r.member(r.slot()).wakeups()
    );
    0
}

/// Sends `n` numbered messages to the first peer with an inbox; `always` rings its doorbell for
/// every message instead of only when it is idle (the comparison the benchmark makes).
fn source(cpu: &Cpu, n: u64, always: bool) -> i32 {
    let Some(r) = region(cpu) else { return 2 };
    let sink = wait_peer_inbox(&r);
    let me = share::vm_id();
    let (mut rings, mut full) = (0u64, 0u64);
    let mut i = 0;
    while i < n {
        match share::send(&r, inbox_of(sink), sink, &Message::words(&[me, i])) {
            Ok((true, rang)) => {
                if always && !rang {
                    r.wake(sink);
                }
                rings += u64::from(rang || always);
                i += 1;
            }
            Ok((false, _)) | Err(_) => {
                // Full, or corrupted by another VM (the sink resets it): try again shortly,
                // unless the sink is gone.
                if r.member(sink).vm_id() == 0 {
                    println!(
                        "source stopped at {i}: the sink (slot {sink}) left; this is slot {}",
                        r.slot()
                    );
                    return 0;
                }
                full += 1;
                hypercall::block(100_000);
            }
        }
    }
    println!("source done {n} rings={rings} full={full}");
    0
}

/// The shared work queue as a dispatcher source.
struct WorkQueue {
    q: Queue,
    wakers: core::cell::RefCell<alloc::vec::Vec<core::task::Waker>>,
}

impl Source for WorkQueue {
    fn poll(&self) -> bool {
        let ready = self.q.has_message();
        if ready {
            for w in self.wakers.borrow_mut().drain(..) {
                w.wake();
            }
        }
        ready
    }

    fn idle(&self, idle: bool) {
        share::set_busy(!idle);
    }
}

fn workq_put(cpu: &Cpu, n: u64, takers: u64) -> i32 {
    let Some(r) = region(cpu) else { return 2 };
    let Ok(q) = Queue::init(&r, WORK_OFFSET, WORK_CAPACITY) else {
        return 2;
    };
    // Takers announce themselves by incrementing a word once they look at the queue.
    while word(&r, APP + 8).load(Ordering::SeqCst) < takers {
        hypercall::block(1_000_000);
    }
    let mut rings = 0;
    let mut push = |m: Message| {
        while !q.push(&m).unwrap_or(false) {
            hypercall::block(100_000);
        }
        for p in r.peers() {
            rings += u64::from(r.wake_if_idle(p));
        }
    };
    for i in 0..n {
        push(Message::words(&[1, i]));
    }
    for _ in 0..takers {
        push(Message::words(&[0]));
    }
    println!("workq-put done {n} rings={rings}");
    0
}

fn workq_take(cpu: &Cpu) -> i32 {
    let Some(r) = region(cpu) else { return 2 };
    let q = loop {
        if let Ok(q) = Queue::at(&r, WORK_OFFSET) {
            break q;
        }
        hypercall::block(1_000_000);
    };
    let src = Rc::new(WorkQueue {
        q,
        wakers: core::cell::RefCell::new(alloc::vec::Vec::new()),
    });
    word(&r, APP + 8).fetch_add(1, Ordering::SeqCst);
    let result = Rc::new(core::cell::Cell::new((0u64, 0u64)));
    let (s2, res) = (src.clone(), result.clone());
    let mut d = Dispatcher::new();
    d.add_source(src.clone() as Rc<dyn Source>);
    d.spawn(async move {
        let (mut count, mut sum) = (0u64, 0u64);
        loop {
            let m = core::future::poll_fn(|cx| match s2.q.pop() {
                Ok(Some(m)) => core::task::Poll::Ready(m),
                _ => {
                    s2.wakers.borrow_mut().push(cx.waker().clone());
                    core::task::Poll::Pending
                }
            })
            .await;
            if m.word(0) == 0 {
                break;
            }
            count += 1;
            sum += m.word(1);
        }
        res.set((count, sum));
    });
    d.run();
    let (count, sum) = result.get();
    println!("workq-take done count={count} sum={sum}");
    0
}

/// Three VMs increment one counter under lock 0; inside, a pair of words must always agree.
fn lockstress(cpu: &Cpu, iters: u64) -> i32 {
    let Some(r) = region(cpu) else { return 2 };
    let (counter, a, b) = (word(&r, APP), word(&r, APP + 16), word(&r, APP + 24));
    let mine = word(&r, APP + 64 + 8 * r.slot());
    let lock = r.lock(0);
    let (mut inconsistent, mut reads) = (0u64, 0u64);
    for i in 0..iters {
        if i % 8 == 7 {
            // Readers see the pair whole.
            lock.read_lock();
            if a.load(Ordering::Relaxed) != b.load(Ordering::Relaxed) {
                println!("lockstress ERROR a reader saw a torn pair");
                return 1;
            }
            reads += 1;
            lock.read_unlock();
        }
        if lock.lock() == Acquired::Inconsistent {
            inconsistent += 1;
        }
        let c = counter.load(Ordering::Relaxed);
        a.store(c + 1, Ordering::Relaxed);
        for _ in 0..50 {
            core::hint::spin_loop();
        }
        if a.load(Ordering::Relaxed) != c + 1 {
            println!("lockstress ERROR another VM wrote inside the lock");
            return 1;
        }
        b.store(c + 1, Ordering::Relaxed);
        counter.store(c + 1, Ordering::Relaxed);
        mine.fetch_add(1, Ordering::Relaxed);
        lock.unlock();
    }
    println!("lockstress done {iters} reads={reads} inconsistent={inconsistent}");
    0
}

fn hostile(cpu: &Cpu) -> i32 {
    let Some(r) = region(cpu) else { return 2 };
    let victim = wait_peer_inbox(&r);
    let (p, _) = r.data();
    let base = inbox_of(victim);
    // Garbage over the victim's queue header and cells, and a lock "held" by nobody.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for off in (base + 8..base + 8 + 4096).step_by(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // SAFETY: inside the region's writable data area (the victim's inbox).
        unsafe { core::ptr::write_volatile(p.add(off).cast::<u64>(), x) };
    }
    // The region header (name, size, owner) is read-only for every guest: these stores are
    // dropped, and other VMs can still attach the region.
    for off in (0..64).step_by(8) {
        // SAFETY: the region header's page, mapped (read-only) in the share window.
        unsafe { core::ptr::write_volatile(r.base().add(off).cast::<u64>(), x) };
    }
    let lock_word = r.base() as u64 + share_lock_offset(3);
    // SAFETY: lock 3's word in the region header, which this VM may write.
    unsafe { core::ptr::write_volatile(lock_word as *mut u64, 200) };
    r.wake(victim);
    println!("hostile done victim={victim}");
    0
}

/// Where the owner of private data announces its slot (+1) to its clients.
const OWNER_WORD: usize = APP + 1024;
/// The lock that orders the clients' read-modify-write of the owner's data.
const OWNER_LOCK: usize = 5;
const OP_GET: u64 = 1;
const OP_SET: u64 = 2;
const OP_DONE: u64 = 3;

/// Keeps a counter in its own (private) memory and serves GET/SET requests from its inbox; ends
/// when `clients` said DONE. The counter is right only if the clients held the shared lock
/// across each GET..SET: the owner itself does nothing to order them.
fn lock_owner(cpu: &Cpu, clients: u64) -> i32 {
    let Some(r) = region(cpu) else { return 2 };
    let Ok(inbox) = Inbox::create(&r, inbox_of(r.slot()), INBOX_CAPACITY) else {
        return 2;
    };
    word(&r, OWNER_WORD).store(r.slot() as u64 + 1, Ordering::SeqCst);
    println!("owner ready slot={}", r.slot());
    let value = Rc::new(core::cell::Cell::new(0u64));
    let (ib, v) = (inbox.clone(), value.clone());
    let rr = r;
    run_inbox(&inbox, true, async move {
        let mut done = 0;
        while done < clients {
            let m = ib.recv().await;
            let (op, from) = (m.word(0), m.word(1) as usize);
            let reply = match op {
                OP_GET => v.get(),
                OP_SET => {
                    v.set(m.word(2));
                    m.word(2)
                }
                OP_DONE => {
                    done += 1;
                    continue;
                }
                _ => continue, // not a request: ignore it
            };
            while !matches!(
                share::send(&rr, inbox_of(from), from, &Message::words(&[reply])),
                Ok((true, _))
            ) {
                if from >= 64 || rr.member(from).vm_id() == 0 {
                    break; // no such client (any more)
                }
                hypercall::yield_now();
            }
        }
    });
    word(&r, OWNER_WORD).store(0, Ordering::SeqCst);
    println!("owner value={}", value.get());
    0
}

/// Adds 1 to the owner's counter `n` times: under the shared lock, GET it, then SET it + 1.
fn lock_client(cpu: &Cpu, n: u64) -> i32 {
    let Some(r) = region(cpu) else { return 2 };
    let Ok(inbox) = Inbox::create(&r, inbox_of(r.slot()), INBOX_CAPACITY) else {
        return 2;
    };
    let mut owner = 0;
    for _ in 0..30_000 {
        owner = word(&r, OWNER_WORD).load(Ordering::SeqCst) as usize;
        if owner != 0 {
            break;
        }
        hypercall::block(1_000_000);
    }
    if owner == 0 || owner > 64 {
        println!("client: no owner");
        return 3;
    }
    let owner = owner - 1;
    let me = r.slot() as u64;
    let ib = inbox.clone();
    let inconsistent = Rc::new(core::cell::Cell::new(0u64));
    let inc = inconsistent.clone();
    run_inbox(&inbox, true, async move {
        let call = |words: &[u64]| {
            let m = Message::words(words);
            while !matches!(share::send(&r, inbox_of(owner), owner, &m), Ok((true, _))) {
                hypercall::yield_now();
            }
        };
        let lock = r.lock(OWNER_LOCK);
        for _ in 0..n {
            if lock.lock() == Acquired::Inconsistent {
                inc.set(inc.get() + 1);
            }
            call(&[OP_GET, me]);
            let v = ib.recv().await.word(0);
            call(&[OP_SET, me, v + 1]);
            let _ = ib.recv().await;
            lock.unlock();
        }
        call(&[OP_DONE, me]);
    });
    println!("client done {n} inconsistent={}", inconsistent.get());
    0
}

fn share_lock_offset(i: usize) -> u64 {
    rebound_guest::abi::share::lock_offset(i)
}

fn cache_slot(r: &Region, s: usize) -> usize {
    let _ = r;
    CACHE_OFFSET + s * CACHE_SLOT
}

fn cache_word(block: u64, version: u64, i: u64) -> u64 {
    let mut z = (block << 40) ^ (version << 12) ^ i ^ 0x5851_f42d_4c95_7f2d;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 31)
}

/// Fills cache slots under lock 1 (a seqlock per slot for lock-free readers).
fn cache_writer(cpu: &Cpu, rounds: u64) -> i32 {
    let Some(r) = region(cpu) else { return 2 };
    let lock = r.lock(1);
    for round in 0..rounds {
        let s = (round as usize * 7) % CACHE_SLOTS;
        let at = cache_slot(&r, s);
        lock.lock();
        let seq = word(&r, at);
        let version = word(&r, at + 16).load(Ordering::Relaxed) + 1;
        let block = round % 1000;
        seq.fetch_add(1, Ordering::AcqRel); // odd: being written
        word(&r, at + 8).store(block, Ordering::Relaxed);
        word(&r, at + 16).store(version, Ordering::Relaxed);
        for i in 0..CACHE_WORDS {
            word(&r, at + 64 + 8 * i)
                .store(cache_word(block, version, i as u64), Ordering::Relaxed);
        }
        seq.fetch_add(1, Ordering::Release); // even: whole
        lock.unlock();
    }
    word(&r, APP + 32).store(1, Ordering::SeqCst);
    println!("cache-writer done {rounds}");
    0
}

/// Reads cache slots without locks or exits, checking every block is whole.
fn cache_reader(cpu: &Cpu, reads: u64) -> i32 {
    let Some(r) = region(cpu) else { return 2 };
    let (mut ok, mut retries, mut empty) = (0u64, 0u64, 0u64);
    let mut x = r.slot() as u64 + 1;
    while ok + empty < reads {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = cache_slot(&r, (x >> 33) as usize % CACHE_SLOTS);
        let seq = word(&r, at);
        let s1 = seq.load(Ordering::Acquire);
        if s1 % 2 == 1 {
            retries += 1;
            continue;
        }
        let block = word(&r, at + 8).load(Ordering::Relaxed);
        let version = word(&r, at + 16).load(Ordering::Relaxed);
        let mut whole = true;
        for i in 0..CACHE_WORDS {
            whole &= word(&r, at + 64 + 8 * i).load(Ordering::Relaxed)
                == cache_word(block, version, i as u64);
        }
        core::sync::atomic::fence(Ordering::Acquire);
        if seq.load(Ordering::Relaxed) != s1 {
            retries += 1;
            continue;
        }
        if version == 0 {
            empty += 1;
            continue;
        }
        if !whole {
            println!("cache-reader ERROR slot at {at} is torn (block {block} v{version})");
            return 1;
        }
        ok += 1;
    }
    println!("cache-reader done reads={ok} empty={empty} retries={retries}");
    0
}

/// A persistent cache: counts the VM's runs in its cache region.
fn pcache(cpu: &Cpu) -> i32 {
    let Some(r) = share::regions().find(|r| r.is_cache()) else {
        println!("no persistent cache attached");
        return 2;
    };
    let magic = word(&r, 8);
    let runs = word(&r, 0);
    if magic.load(Ordering::SeqCst) == 0xCAC4E {
        println!("cache warm: {} runs before", runs.load(Ordering::SeqCst));
    } else {
        println!("cache cold");
        runs.store(0, Ordering::SeqCst);
        magic.store(0xCAC4E, Ordering::SeqCst);
    }
    let _ = cpu;
    println!("cache now {}", runs.fetch_add(1, Ordering::SeqCst) + 1);
    0
}
