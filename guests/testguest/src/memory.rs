//! Memory classes: a guest holding checksummed working data, a page cache and a swap area,
//! answering the host's requests (or, in `ignore` mode, never answering), and a hostile one.

use alloc::vec;
use alloc::vec::Vec;

use rebound_guest::abi::memory::{CACHE, SWAP, WORKING};
use rebound_guest::abi::{errno, memory as mabi, nr};
use rebound_guest::dispatch::Source;
use rebound_guest::hypercall::{self, raw};
use rebound_guest::memory::{Classes, PageCache, Pages, Requests, SwapArea, SwapSlot, give_back};
use rebound_guest::{Cpu, println, time};

const PAGE: usize = 4096;

pub fn run(mode: &str, cpu: &Cpu, arg: impl Fn(usize, u64) -> u64) -> Option<i32> {
    match mode {
        "memhold" => Some(memhold(cpu, &arg)),
        "memhostile" => Some(hostile()),
        _ => None,
    }
}

/// The bytes working page `i` holds.
fn fill(i: u64, page: &mut [u8; PAGE]) {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for w in page.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

#[derive(Clone, Copy)]
enum Where {
    Resident,
    Swapped(SwapSlot),
}

struct Held {
    working: Pages,
    places: Vec<Where>,
    cache: PageCache,
    swap: SwapArea,
}

impl Held {
    fn page(&self, i: u64) -> *mut [u8; PAGE] {
        (self.working.addr() + i * PAGE as u64) as *mut [u8; PAGE]
    }

    fn read(&self, i: u64) -> &[u8; PAGE] {
        // SAFETY: page `i` of our working area; only this vCPU uses it, and nothing writes it
        // while this borrow lives (writes go through `&mut self`).
        unsafe { &*self.page(i) }
    }

    fn write(&mut self, i: u64, data: &[u8; PAGE]) {
        // SAFETY: as for `read`, with `&mut self`.
        unsafe { (*self.page(i)).copy_from_slice(data) }
    }

    /// Whether working page `i` (wherever it is) holds what it should.
    fn check(&self, i: u64, buf: &mut [u8; PAGE], want: &mut [u8; PAGE]) -> bool {
        fill(i, want);
        match self.places[i as usize] {
            Where::Resident => self.read(i)[..] == want[..],
            Where::Swapped(s) => {
                self.swap.read(s, buf);
                buf[..] == want[..]
            }
        }
    }

    /// Gives up to `want` pages: cache first, then cold working pages moved to swap.
    fn give(&mut self, want: u64) -> u64 {
        let given = self.cache.shrink(want);
        given + self.move_to_swap(want - given)
    }

    /// Moves up to `want` of the coldest (highest) resident working pages into swap, giving
    /// their working pages back.
    fn move_to_swap(&mut self, want: u64) -> u64 {
        let mut moved = 0;
        let mut i = self.places.len();
        // The coldest pages are the highest: they move as one run, given back in one call.
        let mut run_end = None;
        while moved < want && i > 0 {
            i -= 1;
            if !matches!(self.places[i], Where::Resident) {
                continue;
            }
            let Some(slot) = self.swap.put(self.read(i as u64)) else {
                break;
            };
            self.places[i] = Where::Swapped(slot);
            moved += 1;
            match run_end {
                Some((start, _)) if start == i + 1 => {
                    run_end = Some((i, run_end.map_or(0, |r| r.1)))
                }
                Some((start, end)) => {
                    let _ = give_back(
                        self.working.addr() + (start * PAGE) as u64,
                        (end - start) as u64,
                    );
                    run_end = Some((i, i + 1));
                }
                None => run_end = Some((i, i + 1)),
            }
        }
        if let Some((start, end)) = run_end {
            let _ = give_back(
                self.working.addr() + (start * PAGE) as u64,
                (end - start) as u64,
            );
        }
        moved
    }

    /// Takes up to `n` pages back: swapped working pages first, then cache room.
    fn take(&mut self, n: u64) -> u64 {
        let mut taken = 0;
        let mut buf = [0u8; PAGE];
        let mut freed = Vec::new();
        for i in 0..self.places.len() {
            if taken >= n {
                break;
            }
            if let Where::Swapped(s) = self.places[i] {
                self.swap.read(s, &mut buf);
                self.write(i as u64, &buf);
                freed.push(s);
                self.places[i] = Where::Resident;
                taken += 1;
            }
        }
        self.swap.free_many(&mut freed);
        taken + self.cache.grow(n - taken)
    }
}

fn memhold(cpu: &Cpu, arg: &impl Fn(usize, u64) -> u64) -> i32 {
    let _ = cpu;
    let (w, c, s) = (arg(1, 8) << 8, arg(2, 4) << 8, arg(3, 8) << 8);
    let answer = arg(4, 1) != 0;
    let preswap = arg(5, 0) << 8;
    // Busy: work without pause (a CPU-bound guest), reporting its progress every 100 ms.
    let busy = arg(6, 0) != 0;
    let (Some(working), Some(cache_pages), Some(swap_pages)) =
        (Pages::alloc(w), Pages::alloc(c), Pages::alloc(s))
    else {
        println!("memhold: not enough memory");
        return 2;
    };
    let mut held = Held {
        working,
        places: vec![Where::Resident; w as usize],
        cache: PageCache::new(cache_pages),
        swap: SwapArea::new(swap_pages),
    };
    let mut page = [0u8; PAGE];
    for i in 0..w {
        fill(i, &mut page);
        held.write(i, &page);
    }
    let mut entry = [0u8; PAGE];
    for k in 0..c {
        fill(k + (1 << 40), &mut entry);
        held.cache.insert(k, &entry);
    }
    held.move_to_swap(preswap);
    let mut classes = Classes::new().expect("a page for the class table");
    classes.add(&held.working, WORKING).expect("room");
    classes.add(held.cache.pages(), CACHE).expect("room");
    classes.add(held.swap.pages(), SWAP).expect("room");
    if let Err(e) = classes.register() {
        println!("memhold: MEM_SETUP failed: {e}");
        return 3;
    }
    println!("memhold ready {} {} {}", w, c, s);
    let held = core::cell::RefCell::new(held);
    let requests = Requests::new(classes, |want| {
        let mut h = held.borrow_mut();
        let done = if want > 0 {
            h.give(want as u64) as i64
        } else {
            -(h.take(want.unsigned_abs()) as i64)
        };
        println!("memhold answered {want} with {done}");
        done
    });
    let (mut buf, mut want) = ([0u8; PAGE], [0u8; PAGE]);
    let mut next = 0u64;
    let mut work = 0u64;
    let mut cursor = 0u64;
    let mut last_report = time::monotonic_ns();
    loop {
        if rebound_guest::boot::shutdown_requested() {
            let h = held.borrow();
            let bad = (0..w).filter(|&i| !h.check(i, &mut buf, &mut want)).count();
            let swapped = h
                .places
                .iter()
                .filter(|p| matches!(p, Where::Swapped(_)))
                .count();
            println!("memhold verified {w} pages, {bad} bad, {swapped} in swap, {work} work");
            return i32::from(bad != 0);
        }
        if answer {
            requests.poll();
        }
        {
            // Steady work: check a few working pages and refill the cache where it has room.
            let h = held.borrow();
            for _ in 0..16 {
                if !h.check(next, &mut buf, &mut want) {
                    println!("memhold: working page {next} is damaged");
                    return 4;
                }
                next = (next + 1) % w;
                work += 1;
            }
            // Refill what the cache may hold again (a few entries per round, as a page cache
            // warms up).
            let (mut probes, mut filled) = (0, 0);
            while (h.cache.len() as u64) < h.cache.limit() && probes < c && filled < 1024 {
                let k = cursor;
                cursor = (cursor + 1) % c.max(1);
                probes += 1;
                let mut probe = [0u8; 8];
                if h.cache.get(k, &mut probe).is_none() {
                    fill(k + (1 << 40), &mut entry);
                    h.cache.insert(k, &entry);
                    filled += 1;
                }
            }
        }
        let now = time::monotonic_ns();
        if now - last_report > if busy { 100_000_000 } else { 200_000_000 } {
            println!("memhold work {work} at {now}");
            last_report = now;
        }
        if !busy {
            hypercall::block(5_000_000);
        }
    }
}

/// Hostile calls: each must be refused (or hurt only this guest), and the VM goes on.
fn hostile() -> i32 {
    let mut failures = 0;
    let mut expect = |what: &str, got: i64, want: i64| {
        if got != want {
            println!("memhostile: {what}: got {got}, want {want}");
            failures += 1;
        }
    };
    expect(
        "table in the system area",
        raw(nr::MEM_SETUP, &[0x1000]),
        errno::EFAULT,
    );
    expect(
        "table misaligned",
        raw(nr::MEM_SETUP, &[0x40_0003]),
        errno::EFAULT,
    );
    expect(
        "table past memory",
        raw(nr::MEM_SETUP, &[u64::MAX - 7]),
        errno::EFAULT,
    );
    let mut bad = Classes::new().expect("page");
    let one = Pages::alloc(1).expect("page");
    let _ = bad.add(&one, 9);
    expect(
        "unknown class",
        bad.register().map_or_else(|e| e.0, |_| 0),
        errno::EINVAL,
    );
    expect(
        "return misaligned",
        raw(nr::MEM_RETURN, &[0x40_0010, 1]),
        errno::EINVAL,
    );
    expect(
        "return nothing",
        raw(nr::MEM_RETURN, &[0x40_0000, 0]),
        errno::EINVAL,
    );
    expect(
        "return system",
        raw(nr::MEM_RETURN, &[0x1000, 1]),
        errno::EFAULT,
    );
    expect(
        "return too many",
        raw(nr::MEM_RETURN, &[0x40_0000, mabi::RETURN_MAX_PAGES + 1]),
        errno::E2BIG,
    );
    expect(
        "return past memory",
        raw(nr::MEM_RETURN, &[!0xfff, 2]),
        errno::EFAULT,
    );
    expect(
        "return overflow",
        raw(nr::MEM_RETURN, &[0x40_0000, u64::MAX]),
        errno::EINVAL,
    );
    // A page it still uses, given back: its own data is lost (reads zero), nothing else.
    let mine = Pages::alloc(4).expect("pages");
    // SAFETY: our own pages.
    let p = unsafe { &mut *(mine.addr() as *mut [u8; PAGE]) };
    p.fill(0xAB);
    expect("return in use", raw(nr::MEM_RETURN, &[mine.addr(), 1]), 1);
    expect(
        "returned page reads zero",
        i64::from(p.iter().all(|b| *b == 0)),
        1,
    );
    // A flood of calls.
    for i in 0..20_000u64 {
        let _ = raw(nr::MEM_RETURN, &[mine.addr() + (i % 4) * PAGE as u64, 1]);
        let _ = raw(nr::MEM_SETUP, &[i.wrapping_mul(4096)]);
    }
    p.fill(0xCD);
    expect("still usable", i64::from(p[100]), 0xCD);
    println!("memhostile done, {failures} failures");
    i32::from(failures != 0)
}
