//! `kv`: an in-memory key-value server speaking the Redis protocol (RESP2), for real Redis
//! clients (`redis-cli`, `redis-benchmark`) over the VM's first network interface.
//!
//! `rebound run --bundled kv --publish 127.0.0.1:6379:6379` is the way to start it. Command
//! line: `port=6379 maxmemory=MIB ip=A.B.C.D/P gw=A.B.C.D` (defaults: 6379, half of
//! the heap (connections' socket buffers take 256 KiB each), 10.0.2.15/24 through 10.0.2.2 as the user-mode backend expects). It serves until
//! the host asks it to shut down (Firecracker's `SendCtrlAltDel`), then prints its counters and
//! exits 0.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use rebound_guest::dispatch::{Dispatcher, Spawner};
use rebound_guest::io::IoQueue;
use rebound_guest::net::{Error, Ipv4Addr, Ipv4Config, Nic, Stack, TcpListener, TcpStream};
use rebound_guest::{Cpu, println, time};
use rebound_kv::{Connection, Status, Store};

/// Ring entries per direction.
const RING_ENTRIES: u32 = 256;
/// Connections that may be completing their handshake at once.
const BACKLOG: usize = 64;
/// How often expired keys are swept (besides on access).
const EXPIRE_PERIOD_NS: u64 = 100_000_000;

fn arg<'a>(cpu: &'a Cpu, key: &str) -> Option<&'a str> {
    cpu.args()
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn now_ms() -> u64 {
    time::monotonic_ns() / 1_000_000
}

#[derive(Default)]
struct Counters {
    connections: Cell<u64>,
    open: Cell<u64>,
    commands_bytes: Cell<u64>,
}

fn main(cpu: Cpu) -> i32 {
    if cpu.id() != 0 {
        return 0;
    }
    let port: u16 = arg(&cpu, "port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(6379);
    let cfg = Ipv4Config::from_args(cpu.args()).unwrap_or(Ipv4Config {
        addr: Ipv4Addr::new(10, 0, 2, 15),
        prefix: 24,
        gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
    });
    let heap = cpu.boot_info().heap_end - cpu.boot_info().heap_start;
    let limit = arg(&cpu, "maxmemory")
        .and_then(|m| m.parse::<u64>().ok())
        .map_or(heap / 2, |mib| mib << 20) as usize;
    let nic = match Nic::setup(0, RING_ENTRIES, RING_ENTRIES) {
        Ok(n) => n,
        Err(e) => {
            println!("kv: no network interface ({e}): run it with --publish or --tap");
            return 1;
        }
    };
    let stack = match Stack::new(nic, cfg.addr, cfg.prefix, cfg.gateway) {
        Ok(s) => s,
        Err(e) => {
            println!("kv: network setup failed: {e}");
            return 1;
        }
    };
    let listener = match TcpListener::bind_with_backlog(&stack, port, BACKLOG) {
        Ok(l) => l,
        Err(e) => {
            println!("kv: cannot listen on port {port}: {e}");
            return 1;
        }
    };
    let store = Rc::new(RefCell::new(Store::with_limit(limit)));
    let counters = Rc::new(Counters::default());
    let mut d = Dispatcher::new();
    d.add_source(stack.clone());
    let spawner = d.spawner();
    {
        let (store, counters, stack) = (store.clone(), counters.clone(), stack.clone());
        d.spawn(async move { accept_loop(listener, stack, store, counters, spawner).await });
    }
    // Keys with a TTL that nobody reads again are swept in the background.
    if let Ok(q) = IoQueue::setup(16) {
        let store = store.clone();
        d.spawn(async move {
            loop {
                let (r, _) = q.sleep(EXPIRE_PERIOD_NS).await;
                if r.is_err() {
                    return;
                }
                store.borrow_mut().expire_some(now_ms(), 200);
            }
        });
    }
    println!(
        "kv: serving the Redis protocol on {}:{port} ({} MiB for data)",
        stack.addr(),
        limit >> 20
    );
    let stats = d.run();
    let s = store.borrow();
    println!(
        "kv: shut down: {} keys, {} connections served, dispatcher polls={} blocks={}",
        s.len(),
        counters.connections.get(),
        stats.polls,
        stats.blocks
    );
    0
}

async fn accept_loop(
    listener: TcpListener,
    stack: Rc<Stack>,
    store: Rc<RefCell<Store>>,
    counters: Rc<Counters>,
    spawner: Spawner,
) {
    loop {
        match listener.accept().await {
            Ok(conn) => {
                counters.connections.set(counters.connections.get() + 1);
                spawner.spawn(serve(conn, store.clone(), counters.clone()));
            }
            Err(Error::RingBroken) => {
                println!("kv: the network interface's rings broke; setting them up again");
                if let Err(e) = stack.reset() {
                    println!("kv: cannot set the network interface up again: {e}");
                    return;
                }
            }
            Err(e) => {
                println!("kv: accept failed: {e}");
                return;
            }
        }
    }
}

/// One client: bytes in, replies out, until it quits or goes away.
async fn serve(conn: TcpStream, store: Rc<RefCell<Store>>, counters: Rc<Counters>) {
    counters.open.set(counters.open.get() + 1);
    let mut client = Connection::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut out: Vec<u8> = Vec::new();
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        counters
            .commands_bytes
            .set(counters.commands_bytes.get() + n as u64);
        let mut input = &buf[..n];
        let mut status;
        loop {
            out.clear();
            status = client.feed(input, &mut store.borrow_mut(), now_ms(), &mut out);
            input = &[];
            if !out.is_empty() && conn.write_all(&out).await.is_err() {
                status = Status::Close;
            }
            if matches!(status, Status::Close) || !client.has_backlog() {
                break;
            }
        }
        if matches!(status, Status::Close) {
            let _ = conn.flush().await;
            break;
        }
    }
    conn.close();
    counters.open.set(counters.open.get() - 1);
}

rebound_guest::entry!(main);
