//! {{name}}: a Rebound guest. Two tasks share one vCPU under the SDK's dispatcher: one finds
//! primes and hands them over through a queue, the other prints them. A task that has nothing
//! to do waits; the dispatcher runs the other, and when no task can run it blocks the vCPU in
//! the VMM instead of spinning.
//!
//! Command line (`--args`): `count=N` (default 10), how many primes to find.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::VecDeque;
use alloc::rc::Rc;
use core::cell::{Cell, RefCell};

use rebound_guest::dispatch::{Dispatcher, yield_now};
use rebound_guest::{Cpu, println, time};

/// The value of `key=value` on the command line.
fn arg(cpu: &Cpu, key: &str) -> Option<u64> {
    cpu.args()
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

fn main(cpu: Cpu) -> i32 {
    // Every vCPU runs `main`; this guest works on the first one only.
    if cpu.id() != 0 {
        return 0;
    }
    let count = arg(&cpu, "count").unwrap_or(10);
    println!("hello from {{name}} on vCPU {} of {}", cpu.id(), cpu.count());
    let queue: Rc<RefCell<VecDeque<u64>>> = Rc::default();
    let done = Rc::new(Cell::new(false));
    let started = time::monotonic_ns();
    let mut d = Dispatcher::new();
    {
        let (queue, done) = (queue.clone(), done.clone());
        d.spawn(async move {
            let mut found = 0;
            let mut n = 1;
            while found < count {
                n += 1;
                if is_prime(n) {
                    queue.borrow_mut().push_back(n);
                    found += 1;
                    // Let the printer run: tasks are cooperative.
                    yield_now().await;
                }
            }
            done.set(true);
        });
    }
    d.spawn(async move {
        loop {
            let next = queue.borrow_mut().pop_front();
            match next {
                Some(p) => println!("prime {p}"),
                None if done.get() => break,
                None => yield_now().await,
            }
        }
    });
    d.run();
    let ms = (time::monotonic_ns() - started) / 1_000_000;
    println!("{{name}}: {count} primes in {ms} ms");
    0
}

rebound_guest::entry!(main);
