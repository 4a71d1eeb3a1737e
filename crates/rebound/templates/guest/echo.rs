//! {{name}}: a Rebound guest serving TCP echo on its first network interface, one task per
//! client under the SDK's dispatcher. The network stack is a dispatcher source: frames arrive
//! through rings in guest memory, and an idle vCPU blocks in the VMM until one does (no
//! interrupt, no spinning).
//!
//! Run it with `rebound run target/release/{{name}} --publish 127.0.0.1:7000:7`, then
//! `nc 127.0.0.1 7000`. Command line (`--args`): `port=N` (default 7). It serves until the
//! host asks it to shut down (`SendCtrlAltDel` through the API).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::rc::Rc;
use alloc::vec;
use core::cell::Cell;

use rebound_guest::dispatch::Dispatcher;
use rebound_guest::net::{Error, Ipv4Addr, Ipv4Config, Nic, Stack, TcpListener, TcpStream};
use rebound_guest::{Cpu, println};

/// Ring entries per direction (a power of two).
const RING_ENTRIES: u32 = 256;
/// Clients that may be connecting at the same moment.
const BACKLOG: usize = 16;

fn arg(cpu: &Cpu, key: &str) -> Option<u64> {
    cpu.args()
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn main(cpu: Cpu) -> i32 {
    if cpu.id() != 0 {
        return 0;
    }
    let port = arg(&cpu, "port").map_or(7, |p| p as u16);
    // The address the user-mode backend (--publish) expects, unless `ip=A.B.C.D/P gw=A.B.C.D`.
    let cfg = Ipv4Config::from_args(cpu.args()).unwrap_or(Ipv4Config {
        addr: Ipv4Addr::new(10, 0, 2, 15),
        prefix: 24,
        gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
    });
    let nic = match Nic::setup(0, RING_ENTRIES, RING_ENTRIES) {
        Ok(n) => n,
        Err(e) => {
            println!("{{name}}: no network interface ({e}): run it with --publish or --tap");
            return 1;
        }
    };
    let stack = match Stack::new(nic, cfg.addr, cfg.prefix, cfg.gateway) {
        Ok(s) => s,
        Err(e) => {
            println!("{{name}}: network setup failed: {e}");
            return 1;
        }
    };
    let listener = match TcpListener::bind_with_backlog(&stack, port, BACKLOG) {
        Ok(l) => l,
        Err(e) => {
            println!("{{name}}: cannot listen on port {port}: {e}");
            return 1;
        }
    };
    let served = Rc::new(Cell::new(0u64));
    let mut d = Dispatcher::new();
    d.add_source(stack.clone());
    let spawner = d.spawner();
    let count = served.clone();
    d.spawn(async move {
        loop {
            match listener.accept().await {
                Ok(conn) => {
                    count.set(count.get() + 1);
                    spawner.spawn(echo(conn));
                }
                // A ring the guest damaged (or the VMM found bad): set it up again.
                Err(Error::RingBroken) => {
                    if let Err(e) = stack.reset() {
                        println!("{{name}}: cannot reset the network interface: {e}");
                        return;
                    }
                }
                Err(e) => {
                    println!("{{name}}: accept failed: {e}");
                    return;
                }
            }
        }
    });
    println!("{{name}}: echo on port {port}");
    d.run();
    println!("{{name}}: shut down after {} connections", served.get());
    0
}

/// One client: what it sends comes back, until it closes.
async fn echo(conn: TcpStream) {
    let mut buf = vec![0u8; 4096];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    conn.close();
}

rebound_guest::entry!(main);
