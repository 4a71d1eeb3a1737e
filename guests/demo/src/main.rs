//! Rebound's demo guest.
//!
//! Several tasks run under the SDK's dispatcher on one vCPU. Each computes a hash chain: block
//! `i` is 4 KiB derived from hash `h(i)`, and `h(i+1) = H(block i, h(i))`. Each block is written
//! to the disk through the I/O ring as soon as it exists; a task waiting for its write is
//! suspended and resumed when the VMM sets the completion indicator: no interrupt, no exit to
//! wait. Then every task reads its blocks back, recomputes the chain and checks it.
//!
//! Command line: `blocks=N tasks=T` (defaults 128 and 4).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;

use rebound_guest::dispatch::Dispatcher;
use rebound_guest::io::IoQueue;
use rebound_guest::{Cpu, println, time};

const BLOCK: usize = 4096;

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Block contents derived from a chain value.
fn expand(h: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK);
    let mut s = h;
    while out.len() < BLOCK {
        s = mix(s.wrapping_add(0x9e37_79b9_7f4a_7c15));
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// The chain step: hash of a block and the previous value.
fn step(block: &[u8], prev: u64) -> u64 {
    let mut h = prev ^ 0x5851_f42d_4c95_7f2d;
    for w in block.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = mix(h ^ u64::from_le_bytes(b)).wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    h
}

fn param(cpu: &Cpu, key: &str, default: u64) -> u64 {
    cpu.args()
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

struct Shared {
    written: Cell<u64>,
    verified: Cell<u64>,
    errors: Cell<u64>,
    digest: Cell<u64>,
}

fn main(cpu: Cpu) -> i32 {
    if cpu.id() != 0 {
        return 0;
    }
    let tasks = param(&cpu, "tasks", 4).clamp(1, 64);
    let blocks = param(&cpu, "blocks", 128).max(1);
    let need = tasks * blocks * BLOCK as u64;
    println!(
        "rebound demo: {tasks} tasks x {blocks} blocks of a hash chain, through the interrupt-free I/O ring"
    );
    if cpu.disk_size() < need {
        println!(
            "demo needs a disk of at least {} KiB (have {} KiB)",
            need >> 10,
            cpu.disk_size() >> 10
        );
        return 1;
    }
    let q = match IoQueue::setup(64) {
        Ok(q) => q,
        Err(e) => {
            println!("cannot set up the I/O ring: {e}");
            return 1;
        }
    };
    let t0 = time::monotonic_ns();
    let shared = Rc::new(Shared {
        written: Cell::new(0),
        verified: Cell::new(0),
        errors: Cell::new(0),
        digest: Cell::new(0),
    });
    let total = tasks * blocks;
    let mut d = Dispatcher::new();
    for t in 0..tasks {
        let s = shared.clone();
        d.spawn(async move {
            let base = t * blocks * BLOCK as u64;
            let seed = mix(0x7265_626f_756e_6400 ^ t);
            // Phase 1: compute the chain, writing each block as it is made.
            let mut h = seed;
            for i in 0..blocks {
                let block = expand(h);
                h = step(&block, h);
                let (r, _) = q.write(base + i * BLOCK as u64, block).await;
                if r != Ok(BLOCK as u32) {
                    s.errors.set(s.errors.get() + 1);
                }
                s.written.set(s.written.get() + 1);
                let w = s.written.get();
                if w.is_multiple_of((total / 4).max(1)) {
                    println!("  written {w}/{total} blocks");
                }
            }
            let (r, _) = q.flush().await;
            if r.is_err() {
                s.errors.set(s.errors.get() + 1);
            }
            // Phase 2: read back and recompute the chain from the disk's contents.
            let mut v = seed;
            for i in 0..blocks {
                let (r, block) = q.read(base + i * BLOCK as u64, vec![0u8; BLOCK]).await;
                if r != Ok(BLOCK as u32) || block != expand(v) {
                    s.errors.set(s.errors.get() + 1);
                }
                v = step(&block, v);
                s.verified.set(s.verified.get() + 1);
            }
            if v != h {
                s.errors.set(s.errors.get() + 1);
            }
            s.digest.set(s.digest.get() ^ mix(h ^ t));
        });
    }
    let stats = d.run();
    let ms = (time::monotonic_ns() - t0) / 1_000_000;
    println!(
        "  verified {}/{} blocks in {} ms; chain digest {:016x}",
        shared.verified.get(),
        total,
        ms,
        shared.digest.get()
    );
    println!(
        "  dispatcher: {} polls, {} I/O completions seen through indicators, {} waits in the VMM",
        stats.polls, stats.completions, stats.blocks
    );
    if shared.errors.get() == 0 {
        println!("demo OK");
        0
    } else {
        println!("demo FAILED: {} errors", shared.errors.get());
        1
    }
}

rebound_guest::entry!(main);
